//! Joining, leaving, knocking and invites through this server: `make_join` + `send_join` v2,
//! `make_leave` + `send_leave` v2, `make_knock` + `send_knock`, and `invite` v2.
//!
//! [Joining rooms](https://spec.matrix.org/v1.16/server-server-api/#joining-rooms),
//! [leaving rooms](https://spec.matrix.org/v1.16/server-server-api/#leaving-rooms-rejecting-invites),
//! [knocking](https://spec.matrix.org/v1.16/server-server-api/#knocking-upon-a-room),
//! [inviting](https://spec.matrix.org/v1.16/server-server-api/#inviting-to-a-room)

use axum::{
    Json, Router,
    extract::State,
    http::request::Parts,
    routing::{get, put},
};
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomVersionId};
use serde::Deserialize;
use serde_json::{Value, json};

use super::XMatrixOrigin;
use crate::{
    api::{
        AppState,
        error::{ApiError, ApiResult},
        extract::{Body, PathIds},
    },
    rooms::{
        Rooms,
        ingest::Remote,
        peers::{to_canonical, to_value},
    },
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/federation/v1/make_join/{roomId}/{userId}", get(make_join))
        .route("/_matrix/federation/v2/send_join/{roomId}/{eventId}", put(send_join))
        .route("/_matrix/federation/v1/make_leave/{roomId}/{userId}", get(make_leave))
        .route("/_matrix/federation/v2/send_leave/{roomId}/{eventId}", put(send_leave))
        .route("/_matrix/federation/v1/make_knock/{roomId}/{userId}", get(make_knock))
        .route("/_matrix/federation/v1/send_knock/{roomId}/{eventId}", put(send_knock))
        .route("/_matrix/federation/v2/invite/{roomId}/{eventId}", put(invite))
}

/// `GET /_matrix/federation/v1/make_join/{roomId}/{userId}?ver=...` (`ver` repeats).
async fn make_join(
    State(rooms): State<Rooms>,
    XMatrixOrigin(origin): XMatrixOrigin,
    path: PathIds,
    parts: Parts,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let user_id: OwnedUserId = path.id("userId")?;
    let versions = supported_versions(&parts)?;
    let template = rooms.make_join(&origin, &room_id, &user_id, &versions)?;
    Ok(Json(json!({"room_version": template.room_version, "event": to_value(&template.event)})))
}

/// The room versions a `make_*` request says its server supports (`ver`, repeated).
fn supported_versions(parts: &Parts) -> Result<Vec<RoomVersionId>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(parts.uri.query().unwrap_or(""))
        .map_err(|error| ApiError::invalid_param(format!("Bad query string: {error}")))?;
    Ok(pairs
        .into_iter()
        .filter(|(key, _)| key == "ver")
        .filter_map(|(_, value)| RoomVersionId::try_from(value).ok())
        .collect())
}

/// `GET /_matrix/federation/v1/make_knock/{roomId}/{userId}?ver=...` (`ver` repeats and, unlike
/// for `make_join`, is required).
async fn make_knock(
    State(rooms): State<Rooms>,
    XMatrixOrigin(origin): XMatrixOrigin,
    path: PathIds,
    parts: Parts,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let user_id: OwnedUserId = path.id("userId")?;
    let versions = supported_versions(&parts)?;
    if versions.is_empty() {
        return Err(ApiError::missing_param("ver: the room versions the server supports"));
    }
    let template = rooms.make_knock(&origin, &room_id, &user_id, &versions)?;
    Ok(Json(json!({"room_version": template.room_version, "event": to_value(&template.event)})))
}

/// `PUT /_matrix/federation/v1/send_knock/{roomId}/{eventId}`
async fn send_knock(
    State(rooms): State<Rooms>,
    State(remote): State<Remote>,
    XMatrixOrigin(origin): XMatrixOrigin,
    path: PathIds,
    Body(event): Body<Value>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let event_id: OwnedEventId = path.id("eventId")?;
    let event = to_canonical(event).ok_or_else(|| ApiError::bad_json("Not a PDU"))?;
    let state = rooms.send_knock(&origin, &room_id, &event_id, event, &remote).await?;
    Ok(Json(json!({"knock_room_state": state.iter().map(to_value).collect::<Vec<_>>()})))
}

/// `GET /_matrix/federation/v1/make_leave/{roomId}/{userId}`
async fn make_leave(
    State(rooms): State<Rooms>,
    XMatrixOrigin(origin): XMatrixOrigin,
    path: PathIds,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let user_id: OwnedUserId = path.id("userId")?;
    let template = rooms.make_leave(&origin, &room_id, &user_id)?;
    Ok(Json(json!({"room_version": template.room_version, "event": to_value(&template.event)})))
}

/// `PUT /_matrix/federation/v2/send_join/{roomId}/{eventId}`
async fn send_join(
    State(rooms): State<Rooms>,
    State(remote): State<Remote>,
    XMatrixOrigin(origin): XMatrixOrigin,
    path: PathIds,
    Body(event): Body<Value>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let event_id: OwnedEventId = path.id("eventId")?;
    let event = to_canonical(event).ok_or_else(|| ApiError::bad_json("Not a PDU"))?;
    let joined = rooms.send_join(&origin, &room_id, &event_id, event, &remote).await?;
    Ok(Json(json!({
        "origin": joined.origin,
        "state": joined.state.iter().map(to_value).collect::<Vec<_>>(),
        "auth_chain": joined.auth_chain.iter().map(to_value).collect::<Vec<_>>(),
        "event": to_value(&joined.event),
        "members_omitted": joined.members_omitted,
    })))
}

/// `PUT /_matrix/federation/v2/send_leave/{roomId}/{eventId}`
async fn send_leave(
    State(rooms): State<Rooms>,
    State(remote): State<Remote>,
    XMatrixOrigin(origin): XMatrixOrigin,
    path: PathIds,
    Body(event): Body<Value>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let event_id: OwnedEventId = path.id("eventId")?;
    let event = to_canonical(event).ok_or_else(|| ApiError::bad_json("Not a PDU"))?;
    rooms.send_leave(&origin, &room_id, &event_id, event, &remote).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct Invite {
    room_version: RoomVersionId,
    event: Value,
    #[serde(default)]
    invite_room_state: Vec<Value>,
}

/// `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}`
async fn invite(
    State(rooms): State<Rooms>,
    State(remote): State<Remote>,
    XMatrixOrigin(origin): XMatrixOrigin,
    path: PathIds,
    Body(invite): Body<Invite>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let event_id: OwnedEventId = path.id("eventId")?;
    let event = to_canonical(invite.event).ok_or_else(|| ApiError::bad_json("Not a PDU"))?;
    let signed = rooms
        .receive_invite(
            &origin,
            &room_id,
            &event_id,
            &invite.room_version,
            event,
            invite.invite_room_state,
            &remote,
        )
        .await?;
    Ok(Json(json!({"event": to_value(&signed)})))
}
