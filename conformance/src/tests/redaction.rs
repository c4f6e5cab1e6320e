//! Redaction: `PUT /rooms/{roomId}/redact/{eventId}/{txnId}` and what is left of the event.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use super::fixtures::two_in_public_room;
use crate::client::{Ctx, User, array, enc, is_type, room_path, str_field};

crate::tests! { "redaction";
    redact_returns_an_event_id => "put_matrixclientv3roomsroomidredacteventidtxnid";
    redacted_event_loses_its_content => "redactions";
    redacted_event_carries_redacted_because => "redactions";
    redaction_reason_is_kept => "put_matrixclientv3roomsroomidredacteventidtxnid";
    redaction_is_seen_by_other_member => "mroomredaction";
    redacted_event_is_stripped_in_messages => "redactions";
    redacted_member_event_keeps_membership => "redactions";
}

async fn redact(user: &User, room_id: &str, event_id: &str, body: Value) -> Result<String> {
    let txn = user.ctx.unique("txn");
    let path = room_path(room_id, &format!("/redact/{}/{}", enc(event_id), enc(&txn)));
    let answer = user.put(&path, body).await?.ok()?;
    Ok(str_field(&answer, "event_id")?.to_owned())
}

async fn fetch(user: &User, room_id: &str, event_id: &str) -> Result<Value> {
    user.get(&room_path(room_id, &format!("/event/{}", enc(event_id)))).await?.ok()
}

async fn redact_returns_an_event_id(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let event_id = user.send_text(&room_id, "oops").await?;
    let redaction = redact(&user, &room_id, &event_id, json!({})).await?;
    ensure!(redaction.starts_with('$') && redaction != event_id, "redaction id {redaction}");
    Ok(())
}

async fn redacted_event_loses_its_content(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let event_id = user.send_text(&room_id, "secret words").await?;
    redact(&user, &room_id, &event_id, json!({})).await?;
    let event = fetch(&user, &room_id, &event_id).await?;
    ensure!(event.get("content") == Some(&json!({})), "content kept: {event}");
    ensure!(is_type(&event, "m.room.message"), "type changed: {event}");
    Ok(())
}

async fn redacted_event_carries_redacted_because(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let event_id = user.send_text(&room_id, "to redact").await?;
    let redaction = redact(&user, &room_id, &event_id, json!({})).await?;
    let event = fetch(&user, &room_id, &event_id).await?;
    let because = event.pointer("/unsigned/redacted_because");
    ensure!(
        because.is_some_and(|b| b.get("event_id") == Some(&json!(redaction))),
        "redacted_because: {event}"
    );
    Ok(())
}

async fn redaction_reason_is_kept(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let event_id = user.send_text(&room_id, "to redact").await?;
    let redaction = redact(&user, &room_id, &event_id, json!({"reason": "typo"})).await?;
    let event = fetch(&user, &room_id, &redaction).await?;
    ensure!(event.pointer("/content/reason") == Some(&json!("typo")), "{event}");
    Ok(())
}

async fn redaction_is_seen_by_other_member(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let event_id = a.send_text(&room_id, "soon gone").await?;
    let redaction = redact(&a, &room_id, &event_id, json!({})).await?;
    let event = b.sync_until_event_id(&room_id, &redaction).await?;
    ensure!(is_type(&event, "m.room.redaction"), "{event}");
    // Room versions up to 10 carry `redacts` at the top level, version 11 in the content.
    let redacts = event.get("redacts").or_else(|| event.pointer("/content/redacts"));
    ensure!(redacts == Some(&json!(event_id)), "redacts: {event}");
    Ok(())
}

async fn redacted_event_is_stripped_in_messages(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let event_id = a.send_text(&room_id, "gone in history").await?;
    redact(&a, &room_id, &event_id, json!({})).await?;
    let messages = b.get(&room_path(&room_id, "/messages?dir=b&limit=10")).await?.ok()?;
    let event = array(&messages, "/chunk")
        .iter()
        .find(|e| e.get("event_id") == Some(&json!(event_id)))
        .cloned();
    let Some(event) = event else { anyhow::bail!("redacted event not in /messages: {messages}") };
    ensure!(event.get("content") == Some(&json!({})), "content kept: {event}");
    Ok(())
}

async fn redacted_member_event_keeps_membership(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    b.put(
        &crate::client::v3(&format!("/profile/{}/displayname", enc(&b.user_id))),
        json!({"displayname": "Redact Me"}),
    )
    .await?
    .ok()?;
    let member_event_id = crate::client::eventually("b's member event with the name", || async {
        let state = a.get(&room_path(&room_id, "/state")).await?.ok()?;
        Ok(state.as_array().into_iter().flatten().find_map(|e| {
            (is_type(e, "m.room.member")
                && e.get("state_key") == Some(&json!(b.user_id))
                && e.pointer("/content/displayname") == Some(&json!("Redact Me")))
            .then(|| e.get("event_id").and_then(Value::as_str).map(str::to_owned))
            .flatten()
        }))
    })
    .await?;
    redact(&a, &room_id, &member_event_id, json!({})).await?;
    let event = fetch(&a, &room_id, &member_event_id).await?;
    ensure!(event.get("content") == Some(&json!({"membership": "join"})), "{event}");
    Ok(())
}
