//! `m.room.power_levels`: the defaults of a new room and what each level may do.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use super::fixtures::two_in_public_room;
use crate::client::{Ctx, User, room_path, state_path};

crate::tests! { "power_levels";
    default_power_levels_have_spec_defaults => "mroompower_levels";
    member_cannot_send_state_by_default => "mroompower_levels";
    raised_member_can_send_state => "mroompower_levels";
    per_event_type_level_lets_members_send_that_state => "mroompower_levels";
    raised_events_default_blocks_messages => "mroompower_levels";
    member_cannot_change_power_levels => "mroompower_levels";
    moderator_cannot_grant_more_than_own_level => "mroompower_levels";
    redacting_others_events_needs_redact_level => "mroompower_levels";
    raised_invite_level_blocks_member_invites => "mroompower_levels";
    moderator_can_kick => "mroompower_levels";
}

async fn levels(user: &User, room_id: &str) -> Result<Value> {
    user.get_state(room_id, "m.room.power_levels", "").await
}

/// Sets `b`'s level in the room through `a`.
async fn set_user_level(a: &User, room_id: &str, user_id: &str, level: i64) -> Result<()> {
    let mut content = levels(a, room_id).await?;
    content["users"][user_id] = json!(level);
    a.put_state(room_id, "m.room.power_levels", "", content).await?;
    Ok(())
}

async fn default_power_levels_have_spec_defaults(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let content = levels(&user, &room_id).await?;
    for (key, expected) in [("ban", 50), ("kick", 50), ("redact", 50), ("state_default", 50)] {
        ensure!(content.get(key) == Some(&json!(expected)), "{key} is not {expected}: {content}");
    }
    for key in ["events_default", "users_default"] {
        ensure!(content.get(key).is_none_or(|v| v == &json!(0)), "{key} is not 0: {content}");
    }
    ensure!(content.get("events").is_some_and(Value::is_object), "no events map: {content}");
    Ok(())
}

async fn member_cannot_send_state_by_default(ctx: Ctx) -> Result<()> {
    let (_a, b, room_id) = two_in_public_room(&ctx).await?;
    b.put(&state_path(&room_id, "m.room.topic", ""), json!({"topic": "nope"}))
        .await?
        .err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn raised_member_can_send_state(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    set_user_level(&a, &room_id, &b.user_id, 50).await?;
    b.put_state(&room_id, "m.room.topic", "", json!({"topic": "allowed now"})).await?;
    Ok(())
}

async fn per_event_type_level_lets_members_send_that_state(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let mut content = levels(&a, &room_id).await?;
    content["events"]["org.example.open"] = json!(0);
    a.put_state(&room_id, "m.room.power_levels", "", content).await?;
    b.put_state(&room_id, "org.example.open", "", json!({"ok": true})).await?;
    b.put(&state_path(&room_id, "org.example.closed", ""), json!({"ok": false}))
        .await?
        .err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn raised_events_default_blocks_messages(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let mut content = levels(&a, &room_id).await?;
    content["events_default"] = json!(10);
    a.put_state(&room_id, "m.room.power_levels", "", content).await?;
    let path = room_path(&room_id, &format!("/send/m.room.message/{}", ctx.unique("txn")));
    b.put(&path, json!({"msgtype": "m.text", "body": "muted"})).await?.err(403, "M_FORBIDDEN")?;
    a.send_text(&room_id, "creator still speaks").await?;
    Ok(())
}

async fn member_cannot_change_power_levels(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let mut content = levels(&a, &room_id).await?;
    content["users"][&b.user_id] = json!(100);
    b.put(&state_path(&room_id, "m.room.power_levels", ""), content)
        .await?
        .err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn moderator_cannot_grant_more_than_own_level(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let c = ctx.user().await?;
    c.join(&room_id).await?;
    let mut content = levels(&a, &room_id).await?;
    content["users"][&b.user_id] = json!(50);
    content["events"]["m.room.power_levels"] = json!(50);
    a.put_state(&room_id, "m.room.power_levels", "", content.clone()).await?;
    content["users"][&c.user_id] = json!(75);
    b.put(&state_path(&room_id, "m.room.power_levels", ""), content.clone())
        .await?
        .err(403, "M_FORBIDDEN")?;
    content["users"][&c.user_id] = json!(50);
    b.put_state(&room_id, "m.room.power_levels", "", content).await?;
    Ok(())
}

async fn redacting_others_events_needs_redact_level(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let from_a = a.send_text(&room_id, "a's message").await?;
    let from_b = b.send_text(&room_id, "b's message").await?;
    let redact = |event_id: &str| {
        room_path(
            &room_id,
            &format!("/redact/{}/{}", crate::client::enc(event_id), ctx.unique("txn")),
        )
    };
    b.put(&redact(&from_a), json!({})).await?.err(403, "M_FORBIDDEN")?;
    b.put(&redact(&from_b), json!({})).await?.ok()?;
    a.put(&redact(&from_a), json!({})).await?.ok()?;
    Ok(())
}

async fn raised_invite_level_blocks_member_invites(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let c = ctx.user().await?;
    let mut content = levels(&a, &room_id).await?;
    content["invite"] = json!(50);
    a.put_state(&room_id, "m.room.power_levels", "", content).await?;
    b.post(&room_path(&room_id, "/invite"), json!({"user_id": c.user_id}))
        .await?
        .err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn moderator_can_kick(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let c = ctx.user().await?;
    c.join(&room_id).await?;
    set_user_level(&a, &room_id, &b.user_id, 50).await?;
    b.post(&room_path(&room_id, "/kick"), json!({"user_id": c.user_id})).await?.ok()?;
    Ok(())
}
