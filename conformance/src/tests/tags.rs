//! Room tagging: `/user/{userId}/rooms/{roomId}/tags` and the `m.tag` room account data.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use crate::client::{Ctx, array, enc, is_type, joined_room, v3};

crate::tests! { "tags";
    tag_put_then_list_with_order => "put_matrixclientv3useruseridroomsroomidtagstag";
    tag_delete_removes_it => "delete_matrixclientv3useruseridroomsroomidtagstag";
    tags_appear_as_m_tag_in_sync => "room-tagging";
    other_users_tags_are_forbidden => "get_matrixclientv3useruseridroomsroomidtags";
}

fn tags_path(user_id: &str, room_id: &str, rest: &str) -> String {
    v3(&format!("/user/{}/rooms/{}/tags{rest}", enc(user_id), enc(room_id)))
}

async fn tag_put_then_list_with_order(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    user.put(&tags_path(&user.user_id, &room_id, "/m.favourite"), json!({"order": 0.25}))
        .await?
        .ok()?;
    user.put(&tags_path(&user.user_id, &room_id, "/u.work"), json!({})).await?.ok()?;
    let body = user.get(&tags_path(&user.user_id, &room_id, "")).await?.ok()?;
    ensure!(
        body.pointer("/tags/m.favourite/order").and_then(Value::as_f64) == Some(0.25),
        "{body}"
    );
    ensure!(body.pointer("/tags/u.work").is_some(), "{body}");
    Ok(())
}

async fn tag_delete_removes_it(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let path = tags_path(&user.user_id, &room_id, "/u.temp");
    user.put(&path, json!({})).await?.ok()?;
    user.delete(&path).await?.ok()?;
    let body = user.get(&tags_path(&user.user_id, &room_id, "")).await?.ok()?;
    ensure!(body.pointer("/tags/u.temp").is_none(), "{body}");
    Ok(())
}

async fn tags_appear_as_m_tag_in_sync(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    user.put(&tags_path(&user.user_id, &room_id, "/m.lowpriority"), json!({})).await?.ok()?;
    user.sync_until("", "m.tag room account data", |sync| {
        let room = joined_room(sync, &room_id)?;
        array(room, "/account_data/events")
            .iter()
            .find(|e| is_type(e, "m.tag") && e.pointer("/content/tags/m.lowpriority").is_some())
            .map(|_| ())
    })
    .await
}

async fn other_users_tags_are_forbidden(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_private_room().await?;
    b.get(&tags_path(&a.user_id, &room_id, "")).await?.err(403, "M_FORBIDDEN")?;
    Ok(())
}
