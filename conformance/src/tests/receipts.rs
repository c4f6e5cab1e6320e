//! Receipts: `POST /rooms/{roomId}/receipt/{receiptType}/{eventId}`, public and private.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use super::fixtures::two_in_public_room;
use crate::client::{Ctx, array, enc, is_type, joined_room, room_path};

crate::tests! { "receipts";
    read_receipt_is_seen_by_other_member => "receipts";
    private_read_receipt_is_seen_only_by_its_owner => "private-read-receipts";
    threaded_receipt_on_main_timeline_is_accepted => "threaded-read-receipts";
    unknown_receipt_type_is_rejected => "post_matrixclientv3roomsroomidreceiptreceipttypeeventid";
}

fn receipt_path(room_id: &str, receipt_type: &str, event_id: &str) -> String {
    room_path(room_id, &format!("/receipt/{}/{}", enc(receipt_type), enc(event_id)))
}

/// The `ts` of `user_id`'s receipt of `receipt_type` on `event_id` in a sync answer.
fn receipt_ts(
    sync: &Value,
    room_id: &str,
    event_id: &str,
    receipt_type: &str,
    user_id: &str,
) -> Option<u64> {
    let room = joined_room(sync, room_id)?;
    array(room, "/ephemeral/events").iter().filter(|e| is_type(e, "m.receipt")).find_map(|e| {
        let receipts = e.get("content")?.get(event_id)?.get(receipt_type)?;
        receipts.get(user_id)?.get("ts")?.as_u64()
    })
}

async fn read_receipt_is_seen_by_other_member(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let event_id = a.send_text(&room_id, "read me").await?;
    b.post(&receipt_path(&room_id, "m.read", &event_id), json!({})).await?.ok()?;
    a.sync_until("", "b's read receipt", |sync| {
        receipt_ts(sync, &room_id, &event_id, "m.read", &b.user_id)
    })
    .await?;
    Ok(())
}

async fn private_read_receipt_is_seen_only_by_its_owner(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let event_id = a.send_text(&room_id, "quietly read").await?;
    b.post(&receipt_path(&room_id, "m.read.private", &event_id), json!({})).await?.ok()?;
    b.sync_until("", "b's own private receipt", |sync| {
        receipt_ts(sync, &room_id, &event_id, "m.read.private", &b.user_id)
    })
    .await?;
    // A public receipt sent afterwards is a marker: once a sees it, the private one had its chance.
    let marker = b.send_text(&room_id, "marker").await?;
    b.post(&receipt_path(&room_id, "m.read", &marker), json!({})).await?.ok()?;
    let mut leaked = false;
    a.sync_until("", "b's public marker receipt", |sync| {
        leaked |= receipt_ts(sync, &room_id, &event_id, "m.read.private", &b.user_id).is_some();
        receipt_ts(sync, &room_id, &marker, "m.read", &b.user_id)
    })
    .await?;
    ensure!(!leaked, "a saw b's private receipt");
    Ok(())
}

async fn threaded_receipt_on_main_timeline_is_accepted(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let event_id = a.send_text(&room_id, "main").await?;
    b.post(&receipt_path(&room_id, "m.read", &event_id), json!({"thread_id": "main"}))
        .await?
        .ok()?;
    let thread = a
        .sync_until("", "b's threaded receipt", |sync| {
            let room = joined_room(sync, &room_id)?;
            array(room, "/ephemeral/events").iter().filter(|e| is_type(e, "m.receipt")).find_map(
                |e| e.pointer(&format!("/content/{event_id}/m.read/{}", b.user_id)).cloned(),
            )
        })
        .await?;
    ensure!(thread.get("thread_id") == Some(&json!("main")), "{thread}");
    Ok(())
}

async fn unknown_receipt_type_is_rejected(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let event_id = user.send_text(&room_id, "x").await?;
    let resp = user.post(&receipt_path(&room_id, "org.example.seen", &event_id), json!({})).await?;
    ensure!(
        resp.status == 400 && resp.body.get("errcode").is_some(),
        "got {} {}",
        resp.status,
        resp.body
    );
    Ok(())
}
