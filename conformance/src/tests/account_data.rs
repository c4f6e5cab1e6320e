//! Client config: global and per-room account data, and its delivery through sync.

use anyhow::{Result, ensure};
use serde_json::json;

use crate::client::{Ctx, User, array, enc, is_type, joined_room, v3};

crate::tests! { "account_data";
    global_account_data_put_then_get => "put_matrixclientv3useruseridaccount_datatype";
    room_account_data_put_then_get => "put_matrixclientv3useruseridroomsroomidaccount_datatype";
    global_account_data_appears_in_sync => "client-config";
    room_account_data_appears_in_sync => "client-config";
    missing_account_data_is_not_found => "get_matrixclientv3useruseridaccount_datatype";
    other_users_account_data_is_forbidden => "get_matrixclientv3useruseridaccount_datatype";
    setting_other_users_account_data_is_forbidden => "put_matrixclientv3useruseridaccount_datatype";
    push_rules_cannot_be_set_through_account_data => "put_matrixclientv3useruseridaccount_datatype";
}

fn global_path(user: &User, user_id: &str, data_type: &str) -> String {
    let _ = user;
    v3(&format!("/user/{}/account_data/{}", enc(user_id), enc(data_type)))
}

fn room_path(user_id: &str, room_id: &str, data_type: &str) -> String {
    v3(&format!("/user/{}/rooms/{}/account_data/{}", enc(user_id), enc(room_id), enc(data_type)))
}

async fn global_account_data_put_then_get(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let path = global_path(&user, &user.user_id, "org.example.settings");
    user.put(&path, json!({"theme": "dark"})).await?.ok()?;
    let content = user.get(&path).await?.ok()?;
    ensure!(content == json!({"theme": "dark"}), "{content}");
    user.put(&path, json!({"theme": "light"})).await?.ok()?;
    let content = user.get(&path).await?.ok()?;
    ensure!(content == json!({"theme": "light"}), "overwrite: {content}");
    Ok(())
}

async fn room_account_data_put_then_get(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let path = room_path(&user.user_id, &room_id, "org.example.room_settings");
    user.put(&path, json!({"pinned": true})).await?.ok()?;
    let content = user.get(&path).await?.ok()?;
    ensure!(content == json!({"pinned": true}), "{content}");
    let global = global_path(&user, &user.user_id, "org.example.room_settings");
    user.get(&global).await?.err(404, "M_NOT_FOUND")?;
    Ok(())
}

async fn global_account_data_appears_in_sync(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    user.put(&global_path(&user, &user.user_id, "org.example.synced"), json!({"n": 1}))
        .await?
        .ok()?;
    user.sync_until("", "global account data", |sync| {
        array(sync, "/account_data/events")
            .iter()
            .find(|e| {
                is_type(e, "org.example.synced") && e.get("content") == Some(&json!({"n": 1}))
            })
            .map(|_| ())
    })
    .await
}

async fn room_account_data_appears_in_sync(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    user.put(&room_path(&user.user_id, &room_id, "org.example.synced_room"), json!({"n": 2}))
        .await?
        .ok()?;
    user.sync_until("", "room account data", |sync| {
        let room = joined_room(sync, &room_id)?;
        array(room, "/account_data/events")
            .iter()
            .find(|e| {
                is_type(e, "org.example.synced_room") && e.get("content") == Some(&json!({"n": 2}))
            })
            .map(|_| ())
    })
    .await
}

async fn missing_account_data_is_not_found(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    user.get(&global_path(&user, &user.user_id, "org.example.never_set"))
        .await?
        .err(404, "M_NOT_FOUND")?;
    Ok(())
}

async fn other_users_account_data_is_forbidden(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let path = global_path(&a, &a.user_id, "org.example.private");
    a.put(&path, json!({"secret": 1})).await?.ok()?;
    b.get(&path).await?.err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn setting_other_users_account_data_is_forbidden(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    b.put(&global_path(&b, &a.user_id, "org.example.private"), json!({"x": 1}))
        .await?
        .err(403, "M_FORBIDDEN")?;
    Ok(())
}

/// The spec answers 405 `M_BAD_JSON` for account data types the server manages itself.
async fn push_rules_cannot_be_set_through_account_data(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    user.put(&global_path(&user, &user.user_id, "m.push_rules"), json!({}))
        .await?
        .err(405, "M_BAD_JSON")?;
    Ok(())
}
