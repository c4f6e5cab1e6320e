//! Read markers: `POST /rooms/{roomId}/read_markers` and `m.fully_read` room account data.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use super::fixtures::two_in_public_room;
use crate::client::{Ctx, array, enc, is_type, joined_room, room_path, v3};

crate::tests! { "read_markers";
    fully_read_marker_is_stored_as_room_account_data => "post_matrixclientv3roomsroomidread_markers";
    fully_read_marker_appears_in_sync_account_data => "fully-read-markers";
    read_markers_with_m_read_sends_a_public_receipt => "post_matrixclientv3roomsroomidread_markers";
    fully_read_cannot_be_set_through_account_data => "put_matrixclientv3useruseridroomsroomidaccount_datatype";
}

async fn fully_read_marker_is_stored_as_room_account_data(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let event_id = user.send_text(&room_id, "read up to here").await?;
    user.post(&room_path(&room_id, "/read_markers"), json!({"m.fully_read": event_id}))
        .await?
        .ok()?;
    let path = v3(&format!(
        "/user/{}/rooms/{}/account_data/m.fully_read",
        enc(&user.user_id),
        enc(&room_id)
    ));
    let content = user.get(&path).await?.ok()?;
    ensure!(content.get("event_id") == Some(&json!(event_id)), "{content}");
    Ok(())
}

async fn fully_read_marker_appears_in_sync_account_data(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let event_id = user.send_text(&room_id, "marker").await?;
    user.post(&room_path(&room_id, "/read_markers"), json!({"m.fully_read": event_id}))
        .await?
        .ok()?;
    user.sync_until("", "m.fully_read in room account data", |sync| {
        let room = joined_room(sync, &room_id)?;
        array(room, "/account_data/events")
            .iter()
            .find(|e| {
                is_type(e, "m.fully_read")
                    && e.pointer("/content/event_id") == Some(&json!(event_id))
            })
            .map(|_| ())
    })
    .await
}

async fn read_markers_with_m_read_sends_a_public_receipt(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let event_id = a.send_text(&room_id, "seen").await?;
    b.post(
        &room_path(&room_id, "/read_markers"),
        json!({"m.fully_read": event_id, "m.read": event_id}),
    )
    .await?
    .ok()?;
    a.sync_until("", "b's receipt", |sync| {
        let room = joined_room(sync, &room_id)?;
        array(room, "/ephemeral/events").iter().filter(|e| is_type(e, "m.receipt")).find_map(|e| {
            e.pointer(&format!("/content/{event_id}/m.read/{}", b.user_id)).map(|_| ())
        })
    })
    .await
}

/// The spec answers 405 `M_BAD_JSON` for account data types the server manages itself.
async fn fully_read_cannot_be_set_through_account_data(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let event_id = user.send_text(&room_id, "x").await?;
    let path = v3(&format!(
        "/user/{}/rooms/{}/account_data/m.fully_read",
        enc(&user.user_id),
        enc(&room_id)
    ));
    let resp = user.put(&path, json!({"event_id": event_id})).await?;
    let _: Value = resp.err(405, "M_BAD_JSON")?;
    Ok(())
}
