//! Presence: `PUT`/`GET /presence/{userId}/status` and `m.presence` in sync.

use anyhow::{Result, ensure};
use serde_json::json;

use super::fixtures::two_in_public_room;
use crate::client::{Ctx, array, enc, is_type, v3};

crate::tests! { "presence";
    presence_put_then_get => "put_matrixclientv3presenceuseridstatus";
    presence_is_readable_by_room_member => "get_matrixclientv3presenceuseridstatus";
    presence_appears_in_sync_of_room_member => "presence";
    setting_other_users_presence_is_forbidden => "put_matrixclientv3presenceuseridstatus";
    invalid_presence_state_is_rejected => "put_matrixclientv3presenceuseridstatus";
}

fn presence_path(user_id: &str) -> String {
    v3(&format!("/presence/{}/status", enc(user_id)))
}

async fn presence_put_then_get(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    user.put(&presence_path(&user.user_id), json!({"presence": "online", "status_msg": "testing"}))
        .await?
        .ok()?;
    let body = user.get(&presence_path(&user.user_id)).await?.ok()?;
    ensure!(body.get("presence") == Some(&json!("online")), "{body}");
    ensure!(body.get("status_msg") == Some(&json!("testing")), "{body}");
    Ok(())
}

async fn presence_is_readable_by_room_member(ctx: Ctx) -> Result<()> {
    let (a, b, _room_id) = two_in_public_room(&ctx).await?;
    a.put(&presence_path(&a.user_id), json!({"presence": "unavailable", "status_msg": "away"}))
        .await?
        .ok()?;
    let body = b.get(&presence_path(&a.user_id)).await?.ok()?;
    ensure!(body.get("presence") == Some(&json!("unavailable")), "{body}");
    Ok(())
}

async fn presence_appears_in_sync_of_room_member(ctx: Ctx) -> Result<()> {
    let (a, b, _room_id) = two_in_public_room(&ctx).await?;
    a.put(&presence_path(&a.user_id), json!({"presence": "online", "status_msg": "here"}))
        .await?
        .ok()?;
    b.sync_until("", "a's presence", |sync| {
        array(sync, "/presence/events")
            .iter()
            .find(|e| {
                is_type(e, "m.presence")
                    && e.get("sender") == Some(&json!(a.user_id))
                    && e.pointer("/content/status_msg") == Some(&json!("here"))
            })
            .map(|_| ())
    })
    .await
}

async fn setting_other_users_presence_is_forbidden(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    b.put(&presence_path(&a.user_id), json!({"presence": "online"}))
        .await?
        .err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn invalid_presence_state_is_rejected(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let resp = user.put(&presence_path(&user.user_id), json!({"presence": "dancing"})).await?;
    ensure!(resp.status == 400, "got {} {}", resp.status, resp.body);
    Ok(())
}
