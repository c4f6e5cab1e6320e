//! Retrieving events: single events, state and auth chains at an event, backfill and
//! missing events.
//!
//! [Retrieving events](https://spec.matrix.org/v1.16/server-server-api/#retrieving-events),
//! [backfilling](https://spec.matrix.org/v1.16/server-server-api/#backfilling-and-retrieving-missing-events)

use axum::{
    Json, Router,
    extract::State,
    http::request::Parts,
    routing::{get, post},
};
use ruma::{OwnedEventId, OwnedRoomId};
use serde::Deserialize;
use serde_json::json;

use super::{XMatrixOrigin, now};
use crate::{
    api::{
        AppState,
        error::{ApiError, ApiResult},
        extract::{Body, PathIds, Query},
    },
    rooms::{Rooms, peers::to_value},
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/federation/v1/event/{eventId}", get(get_event))
        .route("/_matrix/federation/v1/state/{roomId}", get(get_state))
        .route("/_matrix/federation/v1/state_ids/{roomId}", get(get_state_ids))
        .route("/_matrix/federation/v1/event_auth/{roomId}/{eventId}", get(get_event_auth))
        .route("/_matrix/federation/v1/backfill/{roomId}", get(backfill))
        .route("/_matrix/federation/v1/get_missing_events/{roomId}", post(get_missing_events))
}

/// `GET /_matrix/federation/v1/event/{eventId}`
async fn get_event(
    State(rooms): State<Rooms>,
    XMatrixOrigin(origin): XMatrixOrigin,
    path: PathIds,
) -> ApiResult {
    let event_id: OwnedEventId = path.id("eventId")?;
    let pdu = rooms.event_for_server(&origin, &event_id)?;
    Ok(Json(json!({
        "origin": rooms.server_name(),
        "origin_server_ts": now(),
        "pdus": [to_value(&pdu)],
    })))
}

#[derive(Deserialize)]
struct AtEvent {
    event_id: OwnedEventId,
}

/// `GET /_matrix/federation/v1/state/{roomId}`
async fn get_state(
    State(rooms): State<Rooms>,
    XMatrixOrigin(origin): XMatrixOrigin,
    path: PathIds,
    Query(query): Query<AtEvent>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let state = rooms.state_for_server(&origin, &room_id, &query.event_id)?;
    Ok(Json(json!({
        "pdus": state.pdus.iter().map(to_value).collect::<Vec<_>>(),
        "auth_chain": state.auth_chain.iter().map(to_value).collect::<Vec<_>>(),
    })))
}

/// `GET /_matrix/federation/v1/state_ids/{roomId}`
async fn get_state_ids(
    State(rooms): State<Rooms>,
    XMatrixOrigin(origin): XMatrixOrigin,
    path: PathIds,
    Query(query): Query<AtEvent>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let state = rooms.state_ids_for_server(&origin, &room_id, &query.event_id)?;
    Ok(Json(json!({"pdu_ids": state.pdus, "auth_chain_ids": state.auth_chain})))
}

/// `GET /_matrix/federation/v1/event_auth/{roomId}/{eventId}`
async fn get_event_auth(
    State(rooms): State<Rooms>,
    XMatrixOrigin(origin): XMatrixOrigin,
    path: PathIds,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let event_id: OwnedEventId = path.id("eventId")?;
    let chain = rooms.event_auth_for_server(&origin, &room_id, &event_id)?;
    Ok(Json(json!({"auth_chain": chain.iter().map(to_value).collect::<Vec<_>>()})))
}

/// `GET /_matrix/federation/v1/backfill/{roomId}?v=...&limit=...` (`v` repeats).
async fn backfill(
    State(rooms): State<Rooms>,
    XMatrixOrigin(origin): XMatrixOrigin,
    path: PathIds,
    parts: Parts,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(parts.uri.query().unwrap_or(""))
        .map_err(|error| ApiError::invalid_param(format!("Bad query string: {error}")))?;
    let mut from = Vec::new();
    let mut limit = None;
    for (key, value) in pairs {
        match key.as_str() {
            "v" => from.push(
                OwnedEventId::try_from(value)
                    .map_err(|_| ApiError::invalid_param("Invalid event id in v"))?,
            ),
            "limit" => {
                limit = Some(
                    value.parse::<usize>().map_err(|_| ApiError::invalid_param("Invalid limit"))?,
                )
            }
            _ => {}
        }
    }
    let limit = limit.ok_or_else(|| ApiError::missing_param("limit"))?;
    if from.is_empty() {
        return Err(ApiError::missing_param("v"));
    }
    let pdus = rooms.backfill_for_server(&origin, &room_id, &from, limit)?;
    Ok(Json(json!({
        "origin": rooms.server_name(),
        "origin_server_ts": now(),
        "pdus": pdus.iter().map(to_value).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
struct MissingEvents {
    earliest_events: Vec<OwnedEventId>,
    latest_events: Vec<OwnedEventId>,
    #[serde(default = "default_limit")]
    limit: usize,
    #[serde(default)]
    min_depth: u64,
}

fn default_limit() -> usize {
    10
}

/// `POST /_matrix/federation/v1/get_missing_events/{roomId}`
async fn get_missing_events(
    State(rooms): State<Rooms>,
    XMatrixOrigin(origin): XMatrixOrigin,
    path: PathIds,
    Body(request): Body<MissingEvents>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let events = rooms.missing_events_for_server(
        &origin,
        &room_id,
        &request.earliest_events,
        &request.latest_events,
        request.limit,
        request.min_depth,
    )?;
    Ok(Json(json!({"events": events.iter().map(to_value).collect::<Vec<_>>()})))
}
