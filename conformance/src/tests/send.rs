//! Sending events: `PUT /rooms/{roomId}/send/{eventType}/{txnId}`, transaction idempotency,
//! fetching one event, and delivery to other members.

use anyhow::{Result, ensure};
use serde_json::json;

use super::fixtures::two_in_public_room;
use crate::client::{Ctx, enc, room_path, str_field};

crate::tests! { "send";
    send_message_returns_event_id => "put_matrixclientv3roomsroomidsendeventtypetxnid";
    same_transaction_id_returns_same_event_id => "transaction-identifiers";
    same_transaction_id_on_other_device_is_a_new_event => "transaction-identifiers";
    same_transaction_id_of_other_user_is_a_new_event => "transaction-identifiers";
    message_is_delivered_to_other_member => "put_matrixclientv3roomsroomidsendeventtypetxnid";
    transaction_id_is_echoed_only_to_sending_device => "transaction-identifiers";
    custom_event_type_is_delivered => "put_matrixclientv3roomsroomidsendeventtypetxnid";
    non_member_cannot_send => "put_matrixclientv3roomsroomidsendeventtypetxnid";
    get_event_returns_the_event => "get_matrixclientv3roomsroomideventeventid";
    get_unknown_event_is_not_found => "get_matrixclientv3roomsroomideventeventid";
    get_event_of_private_room_forbidden_to_non_members => "get_matrixclientv3roomsroomideventeventid";
}

fn send_path(room_id: &str, txn: &str) -> String {
    room_path(room_id, &format!("/send/m.room.message/{}", enc(txn)))
}

async fn send_message_returns_event_id(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let event_id = user.send_text(&room_id, "hello").await?;
    ensure!(event_id.starts_with('$'), "event id {event_id}");
    Ok(())
}

async fn same_transaction_id_returns_same_event_id(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let path = send_path(&room_id, &ctx.unique("txn"));
    let content = json!({"msgtype": "m.text", "body": "once"});
    let first = user.put(&path, content.clone()).await?.ok()?;
    let second = user.put(&path, content).await?.ok()?;
    ensure!(str_field(&first, "event_id")? == str_field(&second, "event_id")?, "{first} {second}");
    let messages = user.get(&room_path(&room_id, "/messages?dir=b&limit=20")).await?.ok()?;
    let count = crate::client::bodies(crate::client::array(&messages, "/chunk"))
        .iter()
        .filter(|b| *b == "once")
        .count();
    ensure!(count == 1, "the message was stored {count} times");
    Ok(())
}

async fn same_transaction_id_on_other_device_is_a_new_event(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let other = user.second_device().await?;
    let room_id = user.create_private_room().await?;
    let path = send_path(&room_id, &ctx.unique("txn"));
    let content = json!({"msgtype": "m.text", "body": "twice"});
    let first = user.put(&path, content.clone()).await?.ok()?;
    let second = other.put(&path, content).await?.ok()?;
    ensure!(str_field(&first, "event_id")? != str_field(&second, "event_id")?, "same event id");
    Ok(())
}

async fn same_transaction_id_of_other_user_is_a_new_event(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let path = send_path(&room_id, &ctx.unique("txn"));
    let content = json!({"msgtype": "m.text", "body": "each"});
    let first = a.put(&path, content.clone()).await?.ok()?;
    let second = b.put(&path, content).await?.ok()?;
    ensure!(str_field(&first, "event_id")? != str_field(&second, "event_id")?, "same event id");
    Ok(())
}

async fn message_is_delivered_to_other_member(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let event_id = a.send_text(&room_id, "hello b").await?;
    let event = b.sync_until_event_id(&room_id, &event_id).await?;
    ensure!(event.get("sender") == Some(&json!(a.user_id)), "{event}");
    ensure!(event.get("type") == Some(&json!("m.room.message")), "{event}");
    ensure!(
        event.get("content") == Some(&json!({"msgtype": "m.text", "body": "hello b"})),
        "{event}"
    );
    ensure!(event.get("origin_server_ts").is_some_and(serde_json::Value::is_u64), "{event}");
    Ok(())
}

async fn transaction_id_is_echoed_only_to_sending_device(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let txn = ctx.unique("txn");
    let sent = a
        .put(&send_path(&room_id, &txn), json!({"msgtype": "m.text", "body": "echo"}))
        .await?
        .ok()?;
    let event_id = str_field(&sent, "event_id")?;
    let own = a.sync_until_event_id(&room_id, event_id).await?;
    ensure!(own.pointer("/unsigned/transaction_id") == Some(&json!(txn)), "own copy: {own}");
    let theirs = b.sync_until_event_id(&room_id, event_id).await?;
    ensure!(theirs.pointer("/unsigned/transaction_id").is_none(), "other's copy: {theirs}");
    Ok(())
}

async fn custom_event_type_is_delivered(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let event_id = a.send(&room_id, "org.example.ping", json!({"n": 7})).await?;
    let event = b.sync_until_event_id(&room_id, &event_id).await?;
    ensure!(event.get("type") == Some(&json!("org.example.ping")), "{event}");
    ensure!(event.get("content") == Some(&json!({"n": 7})), "{event}");
    Ok(())
}

async fn non_member_cannot_send(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_public_room().await?;
    b.put(&send_path(&room_id, &ctx.unique("txn")), json!({"msgtype": "m.text", "body": "x"}))
        .await?
        .err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn get_event_returns_the_event(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let event_id = a.send_text(&room_id, "fetch me").await?;
    let event = b.get(&room_path(&room_id, &format!("/event/{}", enc(&event_id)))).await?.ok()?;
    ensure!(event.get("event_id") == Some(&json!(event_id)), "{event}");
    ensure!(event.get("room_id") == Some(&json!(room_id)), "{event}");
    ensure!(event.pointer("/content/body") == Some(&json!("fetch me")), "{event}");
    Ok(())
}

async fn get_unknown_event_is_not_found(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    user.get(&room_path(&room_id, "/event/%24nosuchevent")).await?.err(404, "M_NOT_FOUND")?;
    Ok(())
}

async fn get_event_of_private_room_forbidden_to_non_members(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_private_room().await?;
    let event_id = a.send_text(&room_id, "secret").await?;
    b.get(&room_path(&room_id, &format!("/event/{}", enc(&event_id))))
        .await?
        .err(404, "M_NOT_FOUND")?;
    Ok(())
}
