//! Typing notifications, receipts, read markers and presence.
//!
//! [Typing](https://spec.matrix.org/v1.16/client-server-api/#typing-notifications),
//! [receipts](https://spec.matrix.org/v1.16/client-server-api/#receipts),
//! [read markers](https://spec.matrix.org/v1.16/client-server-api/#fully-read-markers),
//! [presence](https://spec.matrix.org/v1.16/client-server-api/#presence)

use std::time::Duration;

use axum::{
    Json, Router,
    extract::State,
    routing::{get, post, put},
};
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId};
use serde::Deserialize;
use serde_json::json;

use crate::{
    api::{
        AppState,
        error::{ApiError, ApiResult},
        extract::{Auth, Body, PathIds},
    },
    ephemeral::presence_content,
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/v3/rooms/{roomId}/typing/{userId}", put(set_typing))
        .route(
            "/_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}",
            post(post_receipt),
        )
        .route("/_matrix/client/v3/rooms/{roomId}/read_markers", post(set_read_markers))
        .route("/_matrix/client/v3/presence/{userId}/status", get(get_presence).put(set_presence))
}

#[derive(Deserialize)]
struct TypingBody {
    typing: bool,
    timeout: Option<u64>,
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/typing/{userId}`
async fn set_typing(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<TypingBody>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let user_id: OwnedUserId = path.id("userId")?;
    if user_id != auth.user_id {
        return Err(ApiError::forbidden("Cannot set typing for another user"));
    }
    if !state.rooms.is_joined(&room_id, &auth.user_id)? {
        return Err(ApiError::forbidden("You are not in this room"));
    }
    let timeout = Duration::from_millis(body.timeout.unwrap_or(30_000));
    state.ephemeral.set_typing(&room_id, &auth.user_id, body.typing, timeout)?;
    crate::edus::send_typing(&state.rooms, &room_id, &auth.user_id, body.typing)?;
    Ok(Json(json!({})))
}

/// Checks the event is in the room and visible, and stores the receipt.
fn receipt(
    state: &AppState,
    auth: &Auth,
    room_id: &RoomId,
    receipt_type: &str,
    event_id: &OwnedEventId,
    thread_id: Option<String>,
) -> Result<(), ApiError> {
    if !state.rooms.is_joined(room_id, &auth.user_id)? {
        return Err(ApiError::forbidden("You are not in this room"));
    }
    let meta = state.rooms.meta(event_id)?.filter(|meta| meta.room_id == room_id);
    let Some(meta) = meta else { return Err(ApiError::not_found("Event not found")) };
    // Receipts never move backwards.
    if let Some(current) = state.ephemeral.receipt(room_id, &auth.user_id, receipt_type)?
        && thread_id.is_none()
        && let Some(current_meta) = state.rooms.meta(&current.event_id)?
        && current_meta.position >= meta.position
    {
        return Ok(());
    }
    state.ephemeral.set_receipt(
        room_id,
        &auth.user_id,
        receipt_type,
        event_id,
        thread_id.clone(),
    )?;
    if receipt_type == "m.read" {
        let ts = ruma::MilliSecondsSinceUnixEpoch::now().get().into();
        crate::edus::send_receipt(
            &state.rooms,
            room_id,
            &auth.user_id,
            event_id,
            thread_id.as_deref(),
            ts,
        )?;
    }
    Ok(())
}

#[derive(Deserialize, Default)]
struct ReceiptBody {
    thread_id: Option<String>,
}

/// `POST /_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}`
async fn post_receipt(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<ReceiptBody>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let event_id: OwnedEventId = path.id("eventId")?;
    let receipt_type = path.get("receiptType")?;
    match receipt_type {
        "m.read" | "m.read.private" => {
            receipt(&state, &auth, &room_id, receipt_type, &event_id, body.thread_id)?
        }
        "m.fully_read" => {
            if body.thread_id.is_some() {
                return Err(ApiError::bad_json("m.fully_read cannot be threaded"));
            }
            set_fully_read(&state, &auth, &room_id, &event_id)?;
        }
        _ => return Err(ApiError::invalid_param(format!("Unknown receipt type {receipt_type}"))),
    }
    Ok(Json(json!({})))
}

fn set_fully_read(
    state: &AppState,
    auth: &Auth,
    room_id: &RoomId,
    event_id: &OwnedEventId,
) -> Result<(), ApiError> {
    if !state.rooms.is_joined(room_id, &auth.user_id)? {
        return Err(ApiError::forbidden("You are not in this room"));
    }
    if state.rooms.meta(event_id)?.is_none_or(|meta| meta.room_id != room_id) {
        return Err(ApiError::not_found("Event not found"));
    }
    state.account_data.set(
        &auth.user_id,
        Some(room_id),
        "m.fully_read",
        json!({"event_id": event_id}),
    )?;
    Ok(())
}

#[derive(Deserialize)]
struct MarkersBody {
    #[serde(rename = "m.fully_read")]
    fully_read: Option<OwnedEventId>,
    #[serde(rename = "m.read")]
    read: Option<OwnedEventId>,
    #[serde(rename = "m.read.private")]
    read_private: Option<OwnedEventId>,
}

/// `POST /_matrix/client/v3/rooms/{roomId}/read_markers`
async fn set_read_markers(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<MarkersBody>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    if !state.rooms.is_joined(&room_id, &auth.user_id)? {
        return Err(ApiError::forbidden("You are not in this room"));
    }
    if let Some(event_id) = &body.fully_read {
        set_fully_read(&state, &auth, &room_id, event_id)?;
    }
    if let Some(event_id) = &body.read {
        receipt(&state, &auth, &room_id, "m.read", event_id, None)?;
    }
    if let Some(event_id) = &body.read_private {
        receipt(&state, &auth, &room_id, "m.read.private", event_id, None)?;
    }
    Ok(Json(json!({})))
}

/// `GET /_matrix/client/v3/presence/{userId}/status`
async fn get_presence(State(state): State<AppState>, auth: Auth, path: PathIds) -> ApiResult {
    let user_id: OwnedUserId = path.id("userId")?;
    if user_id.server_name() == state.config.server_name && !state.accounts.exists(&user_id)? {
        return Err(ApiError::not_found("Unknown user"));
    }
    if !state.rooms.share_a_room(&auth.user_id, &user_id)? {
        return Err(ApiError::forbidden("You cannot see this user's presence"));
    }
    match state.ephemeral.presence(&user_id)? {
        Some(presence) => Ok(Json(presence_content(&presence))),
        None => Ok(Json(json!({"presence": "offline"}))),
    }
}

#[derive(Deserialize)]
struct PresenceBody {
    presence: String,
    status_msg: Option<String>,
}

/// `PUT /_matrix/client/v3/presence/{userId}/status`
async fn set_presence(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<PresenceBody>,
) -> ApiResult {
    let user_id: OwnedUserId = path.id("userId")?;
    if user_id != auth.user_id {
        return Err(ApiError::forbidden("Cannot set another user's presence"));
    }
    if !matches!(body.presence.as_str(), "online" | "offline" | "unavailable") {
        return Err(ApiError::invalid_param("presence must be online, offline or unavailable"));
    }
    crate::edus::send_presence(&state.rooms, &user_id, &body.presence, body.status_msg.as_deref())?;
    state.ephemeral.set_presence(&user_id, &body.presence, body.status_msg)?;
    Ok(Json(json!({})))
}
