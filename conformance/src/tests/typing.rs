//! Typing notifications: `PUT /rooms/{roomId}/typing/{userId}` and `m.typing` in sync.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use super::fixtures::two_in_public_room;
use crate::client::{Ctx, User, array, enc, joined_room, room_path};

crate::tests! { "typing";
    typing_is_seen_by_other_member => "typing-notifications";
    stopping_typing_clears_the_user => "typing-notifications";
    typing_for_another_user_is_forbidden => "put_matrixclientv3roomsroomidtypinguserid";
    typing_in_room_not_joined_is_forbidden => "put_matrixclientv3roomsroomidtypinguserid";
}

fn typing_path(room_id: &str, user_id: &str) -> String {
    room_path(room_id, &format!("/typing/{}", enc(user_id)))
}

/// The user ids of the room's latest `m.typing` event in a sync answer, if there is one.
fn typing_users(sync: &Value, room_id: &str) -> Option<Vec<Value>> {
    let room = joined_room(sync, room_id)?;
    let event = array(room, "/ephemeral/events")
        .iter()
        .rev()
        .find(|e| crate::client::is_type(e, "m.typing"))?;
    Some(array(event, "/content/user_ids").to_vec())
}

async fn wait_for_typing(
    observer: &User,
    room_id: &str,
    want: impl Fn(&[Value]) -> bool,
) -> Result<()> {
    observer
        .sync_until("", "the typing notification", |sync| {
            typing_users(sync, room_id).filter(|users| want(users)).map(|_| ())
        })
        .await
}

async fn typing_is_seen_by_other_member(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    a.put(&typing_path(&room_id, &a.user_id), json!({"typing": true, "timeout": 30000}))
        .await?
        .ok()?;
    wait_for_typing(&b, &room_id, |users| users.contains(&json!(a.user_id))).await
}

async fn stopping_typing_clears_the_user(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let path = typing_path(&room_id, &a.user_id);
    a.put(&path, json!({"typing": true, "timeout": 30000})).await?.ok()?;
    wait_for_typing(&b, &room_id, |users| users.contains(&json!(a.user_id))).await?;
    a.put(&path, json!({"typing": false})).await?.ok()?;
    wait_for_typing(&b, &room_id, |users| !users.contains(&json!(a.user_id))).await
}

async fn typing_for_another_user_is_forbidden(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let resp =
        b.put(&typing_path(&room_id, &a.user_id), json!({"typing": true, "timeout": 1000})).await?;
    ensure!(
        matches!(resp.status, 400 | 403) && resp.body.get("errcode") == Some(&json!("M_FORBIDDEN")),
        "expected M_FORBIDDEN, got {} {}",
        resp.status,
        resp.body
    );
    Ok(())
}

async fn typing_in_room_not_joined_is_forbidden(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_private_room().await?;
    b.put(&typing_path(&room_id, &b.user_id), json!({"typing": true, "timeout": 1000}))
        .await?
        .err(403, "M_FORBIDDEN")?;
    Ok(())
}
