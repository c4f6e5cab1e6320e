//! Room creation, state, sending, redaction and single events.
//!
//! [Rooms](https://spec.matrix.org/v1.16/client-server-api/#rooms),
//! [sending events](https://spec.matrix.org/v1.16/client-server-api/#sending-events-to-a-room),
//! [redactions](https://spec.matrix.org/v1.16/client-server-api/#redactions)

use axum::{
    Json, Router,
    extract::State,
    routing::{get, post, put},
};
use ruma::{OwnedEventId, OwnedRoomId};
use serde::Deserialize;
use serde_json::{Value, json};

use super::membership::visible_until;
use crate::{
    api::{
        AppState,
        error::{ApiError, ApiResult},
        extract::{Auth, Body, PathIds, Query},
    },
    rooms::{NewEvent, Transaction, create::CreateRoom},
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/v3/createRoom", post(create_room))
        .route(
            "/_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}",
            put(send_message_event),
        )
        .route("/_matrix/client/v3/rooms/{roomId}/state", get(get_state))
        .route(
            "/_matrix/client/v3/rooms/{roomId}/state/{eventType}",
            get(get_state_event_empty_key).put(send_state_event_empty_key),
        )
        // The trailing slash of an empty state key is optional.
        .route(
            "/_matrix/client/v3/rooms/{roomId}/state/{eventType}/",
            get(get_state_event_empty_key).put(send_state_event_empty_key),
        )
        .route(
            "/_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}",
            get(get_state_event).put(send_state_event),
        )
        .route("/_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}", put(redact_event))
        .route("/_matrix/client/v3/rooms/{roomId}/event/{eventId}", get(get_event))
}

/// `POST /_matrix/client/v3/createRoom`
async fn create_room(
    State(state): State<AppState>,
    auth: Auth,
    Body(body): Body<CreateRoom>,
) -> ApiResult {
    let account = state.accounts.account(&auth.user_id)?.unwrap_or_default();
    for invitee in &body.invite {
        if invitee.server_name() == state.config.server_name && !state.accounts.exists(invitee)? {
            return Err(ApiError::not_found(format!("Unknown user {invitee}")));
        }
    }
    let created = state
        .rooms
        .create_room(&auth.user_id, (account.displayname, account.avatar_url), body, &state.remote)
        .await?;
    tracing::info!(room_id = %created.room_id, creator = %auth.user_id, "room created");
    let mut answer = json!({"room_id": created.room_id});
    if let Some(alias) = created.alias {
        answer["room_alias"] = json!(alias);
    }
    Ok(Json(answer))
}

fn room_id_for_send(state: &AppState, path: &PathIds) -> Result<OwnedRoomId, ApiError> {
    let room_id: OwnedRoomId = path.id("roomId")?;
    if state.rooms.room(&room_id)?.is_none() {
        return Err(ApiError::forbidden("You are not in this room"));
    }
    Ok(room_id)
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}`
async fn send_message_event(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(content): Body<Value>,
) -> ApiResult {
    let room_id = room_id_for_send(&state, &path)?;
    let kind = path.get("eventType")?.to_owned();
    let transaction = Transaction {
        device_id: auth.device_id.to_string(),
        txn_id: path.get("txnId")?.to_owned(),
    };
    let appended = state
        .rooms
        .append(&room_id, &auth.user_id, NewEvent::message(kind, content), Some(transaction))
        .await?;
    Ok(Json(json!({"event_id": appended.event_id})))
}

async fn send_state(
    state: &AppState,
    auth: &Auth,
    path: &PathIds,
    state_key: &str,
    content: Value,
) -> ApiResult {
    let room_id = room_id_for_send(state, path)?;
    let kind = path.get("eventType")?.to_owned();
    if let Some(current) = state.rooms.current_state_pdu(&room_id, &kind, state_key)?
        && current.content_value() == content
        && current.sender == auth.user_id
    {
        return Ok(Json(json!({"event_id": current.event_id})));
    }
    if kind == "m.room.canonical_alias" {
        check_canonical_alias(state, &room_id, &content)?;
    }
    let appended = state
        .rooms
        .append(&room_id, &auth.user_id, NewEvent::state(kind, state_key, content), None)
        .await?;
    Ok(Json(json!({"event_id": appended.event_id})))
}

/// Local aliases in `m.room.canonical_alias` must point to the room
/// ([spec](https://spec.matrix.org/v1.16/client-server-api/#mroomcanonical_alias)).
fn check_canonical_alias(
    state: &AppState,
    room_id: &OwnedRoomId,
    content: &Value,
) -> Result<(), ApiError> {
    let mut aliases: Vec<&str> = content.get("alias").and_then(Value::as_str).into_iter().collect();
    if let Some(alt) = content.get("alt_aliases").and_then(Value::as_array) {
        aliases.extend(alt.iter().filter_map(Value::as_str));
    }
    for alias in aliases {
        let alias = ruma::RoomAliasId::parse(alias).map_err(|_| {
            ApiError::new(axum::http::StatusCode::BAD_REQUEST, "M_BAD_ALIAS", "Invalid alias")
        })?;
        if alias.server_name() == state.config.server_name
            && state.rooms.resolve_local_alias(&alias)?.as_ref() != Some(room_id)
        {
            return Err(ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "M_BAD_ALIAS",
                "Alias does not point to this room",
            ));
        }
    }
    Ok(())
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
async fn send_state_event(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(content): Body<Value>,
) -> ApiResult {
    let state_key = path.get("stateKey")?.to_owned();
    send_state(&state, &auth, &path, &state_key, content).await
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}`
async fn send_state_event_empty_key(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(content): Body<Value>,
) -> ApiResult {
    send_state(&state, &auth, &path, "", content).await
}

/// `GET /_matrix/client/v3/rooms/{roomId}/state`
async fn get_state(State(state): State<AppState>, auth: Auth, path: PathIds) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let until = visible_until(&state, &auth, &room_id)?;
    let state_ids = match until {
        Some(position) => {
            state.rooms.state_at(state.rooms.snapshot_at_position(&room_id, position)?)?
        }
        None => state.rooms.current_state_ids(&room_id)?,
    };
    let mut events = Vec::new();
    for event_id in state_ids.values() {
        if let Some((_, _, value)) =
            state.rooms.client_event_by_id(event_id, Some((&auth.user_id, &auth.device_id)))?
        {
            events.push(value);
        }
    }
    Ok(Json(Value::Array(events)))
}

#[derive(Deserialize)]
struct FormatQuery {
    format: Option<String>,
}

async fn get_one_state(
    state: &AppState,
    auth: &Auth,
    path: &PathIds,
    state_key: &str,
    format: Option<String>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let kind = path.get("eventType")?;
    let until = visible_until(state, auth, &room_id)?;
    let event_id = match until {
        Some(position) => match state.rooms.snapshot_at_position(&room_id, position)? {
            Some(snapshot) => state.rooms.state_event_at(snapshot, kind, state_key)?,
            None => None,
        },
        None => state.rooms.current_state_event_id(&room_id, kind, state_key)?,
    };
    let event_id = event_id.ok_or_else(|| ApiError::not_found("Event not found"))?;
    let (_, _, value) = state
        .rooms
        .client_event_by_id(&event_id, Some((&auth.user_id, &auth.device_id)))?
        .ok_or_else(|| ApiError::not_found("Event not found"))?;
    if format.as_deref() == Some("event") {
        return Ok(Json(value));
    }
    Ok(Json(value.get("content").cloned().unwrap_or_else(|| json!({}))))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
async fn get_state_event(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Query(query): Query<FormatQuery>,
) -> ApiResult {
    let state_key = path.get("stateKey")?.to_owned();
    get_one_state(&state, &auth, &path, &state_key, query.format).await
}

/// `GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}`
async fn get_state_event_empty_key(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Query(query): Query<FormatQuery>,
) -> ApiResult {
    get_one_state(&state, &auth, &path, "", query.format).await
}

#[derive(Deserialize, Default)]
struct RedactBody {
    reason: Option<String>,
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}`
async fn redact_event(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<RedactBody>,
) -> ApiResult {
    let room_id = room_id_for_send(&state, &path)?;
    let event_id: OwnedEventId = path.id("eventId")?;
    let mut content = json!({});
    if let Some(reason) = body.reason {
        content["reason"] = json!(reason);
    }
    let event = NewEvent {
        kind: "m.room.redaction".into(),
        content,
        state_key: None,
        redacts: Some(event_id),
    };
    let transaction = Transaction {
        device_id: auth.device_id.to_string(),
        txn_id: path.get("txnId")?.to_owned(),
    };
    let appended = state.rooms.append(&room_id, &auth.user_id, event, Some(transaction)).await?;
    Ok(Json(json!({"event_id": appended.event_id})))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/event/{eventId}`
async fn get_event(State(state): State<AppState>, auth: Auth, path: PathIds) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let event_id: OwnedEventId = path.id("eventId")?;
    let until = visible_until(&state, &auth, &room_id)
        .map_err(|_| ApiError::not_found("Event not found"))?;
    let (pdu, meta, value) = state
        .rooms
        .client_event_by_id(&event_id, Some((&auth.user_id, &auth.device_id)))?
        .ok_or_else(|| ApiError::not_found("Event not found"))?;
    if pdu.room_id != room_id || until.is_some_and(|until| meta.position > until) {
        return Err(ApiError::not_found("Event not found"));
    }
    Ok(Json(value))
}
