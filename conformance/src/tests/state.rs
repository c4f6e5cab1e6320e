//! Room state: `PUT`/`GET /rooms/{roomId}/state/{eventType}/{stateKey}` and the full state.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use super::fixtures::two_in_public_room;
use crate::client::{Ctx, is_type, room_path, state_path, str_field};

crate::tests! { "state";
    put_state_returns_event_id_and_get_returns_content => "put_matrixclientv3roomsroomidstateeventtypestatekey";
    state_keys_are_independent => "put_matrixclientv3roomsroomidstateeventtypestatekey";
    empty_state_key_works_without_trailing_slash => "put_matrixclientv3roomsroomidstateeventtypestatekey";
    get_missing_state_is_not_found => "get_matrixclientv3roomsroomidstateeventtypestatekey";
    full_state_lists_create_power_levels_and_members => "get_matrixclientv3roomsroomidstate";
    state_change_is_seen_by_other_member_in_sync => "put_matrixclientv3roomsroomidstateeventtypestatekey";
    state_of_private_room_is_forbidden_to_non_members => "get_matrixclientv3roomsroomidstateeventtypestatekey";
    overwritten_state_returns_latest_content => "get_matrixclientv3roomsroomidstateeventtypestatekey";
}

async fn put_state_returns_event_id_and_get_returns_content(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let event_id = user.put_state(&room_id, "m.room.topic", "", json!({"topic": "T"})).await?;
    ensure!(event_id.starts_with('$'), "event id {event_id}");
    let content = user.get_state(&room_id, "m.room.topic", "").await?;
    ensure!(content == json!({"topic": "T"}), "{content}");
    Ok(())
}

async fn state_keys_are_independent(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    user.put_state(&room_id, "org.example.kv", "one", json!({"n": 1})).await?;
    user.put_state(&room_id, "org.example.kv", "two", json!({"n": 2})).await?;
    ensure!(user.get_state(&room_id, "org.example.kv", "one").await? == json!({"n": 1}), "one");
    ensure!(user.get_state(&room_id, "org.example.kv", "two").await? == json!({"n": 2}), "two");
    Ok(())
}

/// The spec lets clients leave out the trailing slash when the state key is empty.
async fn empty_state_key_works_without_trailing_slash(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let path = room_path(&room_id, "/state/m.room.name");
    user.put(&path, json!({"name": "No slash"})).await?.ok()?;
    let content = user.get(&path).await?.ok()?;
    ensure!(content.get("name") == Some(&json!("No slash")), "{content}");
    let with_slash = user.get_state(&room_id, "m.room.name", "").await?;
    ensure!(with_slash == content, "{with_slash} differs from {content}");
    Ok(())
}

async fn get_missing_state_is_not_found(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    user.get(&state_path(&room_id, "org.example.absent", "")).await?.err(404, "M_NOT_FOUND")?;
    Ok(())
}

async fn full_state_lists_create_power_levels_and_members(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let state = a.get(&room_path(&room_id, "/state")).await?.ok()?;
    let events = state.as_array().cloned().unwrap_or_default();
    for event_type in ["m.room.create", "m.room.power_levels", "m.room.join_rules"] {
        ensure!(events.iter().any(|e| is_type(e, event_type)), "no {event_type} in {state}");
    }
    for user_id in [&a.user_id, &b.user_id] {
        ensure!(
            events.iter().any(|e| is_type(e, "m.room.member")
                && e.get("state_key") == Some(&json!(user_id))),
            "no member event for {user_id}"
        );
    }
    for event in &events {
        for field in ["event_id", "sender", "state_key", "type", "content", "origin_server_ts"] {
            ensure!(event.get(field).is_some(), "state event without {field}: {event}");
        }
    }
    Ok(())
}

async fn state_change_is_seen_by_other_member_in_sync(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let event_id = a.put_state(&room_id, "m.room.topic", "", json!({"topic": "Seen"})).await?;
    let event = b.sync_until_event_id(&room_id, &event_id).await?;
    ensure!(event.get("state_key") == Some(&json!("")), "{event}");
    ensure!(event.pointer("/content/topic") == Some(&json!("Seen")), "{event}");
    ensure!(str_field(&event, "sender")? == a.user_id, "{event}");
    Ok(())
}

async fn state_of_private_room_is_forbidden_to_non_members(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_private_room().await?;
    b.get(&state_path(&room_id, "m.room.create", "")).await?.err(403, "M_FORBIDDEN")?;
    b.get(&room_path(&room_id, "/state")).await?.err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn overwritten_state_returns_latest_content(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let first = user.put_state(&room_id, "m.room.topic", "", json!({"topic": "first"})).await?;
    let second = user.put_state(&room_id, "m.room.topic", "", json!({"topic": "second"})).await?;
    ensure!(first != second, "both writes answered event {first}");
    let content: Value = user.get_state(&room_id, "m.room.topic", "").await?;
    ensure!(content.get("topic") == Some(&json!("second")), "{content}");
    Ok(())
}
