//! Account data (global and per room) and room tags.
//!
//! [Client config](https://spec.matrix.org/v1.16/client-server-api/#client-config),
//! [room tagging](https://spec.matrix.org/v1.16/client-server-api/#room-tagging)

use axum::{Json, Router, extract::State, routing::get};
use ruma::{OwnedRoomId, OwnedUserId};
use serde_json::{Map, Value, json};

use crate::api::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{Auth, Body, PathIds},
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/_matrix/client/v3/user/{userId}/account_data/{type}",
            get(get_global).put(set_global),
        )
        .route(
            "/_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}",
            get(get_room).put(set_room),
        )
        .route("/_matrix/client/v3/user/{userId}/rooms/{roomId}/tags", get(get_tags))
        .route(
            "/_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}",
            axum::routing::put(put_tag).delete(delete_tag),
        )
}

fn own(auth: &Auth, path: &PathIds) -> Result<OwnedUserId, ApiError> {
    let user_id: OwnedUserId = path.id("userId")?;
    if user_id != auth.user_id {
        return Err(ApiError::forbidden("Cannot access another user's account data"));
    }
    Ok(user_id)
}

fn settable(kind: &str) -> Result<(), ApiError> {
    // These are managed by the server through their own endpoints.
    if kind == "m.fully_read" || kind == "m.push_rules" {
        return Err(ApiError::new(
            axum::http::StatusCode::METHOD_NOT_ALLOWED,
            "M_BAD_JSON",
            format!("Cannot set {kind} through the account data API"),
        ));
    }
    Ok(())
}

/// Reads one entry; empty content counts as absent (clients "delete" by writing `{}`).
fn read(state: &AppState, auth: &Auth, path: &PathIds, room_id: Option<OwnedRoomId>) -> ApiResult {
    let user_id = own(auth, path)?;
    let content = state.account_data.get(&user_id, room_id.as_deref(), path.get("type")?)?;
    content
        .filter(|content| content.as_object().is_some_and(|object| !object.is_empty()))
        .map(Json)
        .ok_or_else(|| ApiError::not_found("Account data not found"))
}

/// Writes one entry, unless the server manages that type.
fn write(
    state: &AppState,
    auth: &Auth,
    path: &PathIds,
    room_id: Option<OwnedRoomId>,
    content: Value,
) -> ApiResult {
    let user_id = own(auth, path)?;
    let kind = path.get("type")?;
    settable(kind)?;
    state.account_data.set(&user_id, room_id.as_deref(), kind, content)?;
    Ok(Json(json!({})))
}

/// `GET /_matrix/client/v3/user/{userId}/account_data/{type}`
async fn get_global(State(state): State<AppState>, auth: Auth, path: PathIds) -> ApiResult {
    read(&state, &auth, &path, None)
}

/// `PUT /_matrix/client/v3/user/{userId}/account_data/{type}`
async fn set_global(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<Value>,
) -> ApiResult {
    write(&state, &auth, &path, None, body)
}

/// `GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
async fn get_room(State(state): State<AppState>, auth: Auth, path: PathIds) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    read(&state, &auth, &path, Some(room_id))
}

/// `PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
async fn set_room(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<Value>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    write(&state, &auth, &path, Some(room_id), body)
}

fn tags(
    state: &AppState,
    user_id: &OwnedUserId,
    room_id: &OwnedRoomId,
) -> Result<Map<String, Value>, ApiError> {
    Ok(state
        .account_data
        .get(user_id, Some(room_id), "m.tag")?
        .and_then(|content| content.get("tags").and_then(Value::as_object).cloned())
        .unwrap_or_default())
}

/// `GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags`
async fn get_tags(State(state): State<AppState>, auth: Auth, path: PathIds) -> ApiResult {
    let user_id = own(&auth, &path)?;
    let room_id: OwnedRoomId = path.id("roomId")?;
    Ok(Json(json!({"tags": tags(&state, &user_id, &room_id)?})))
}

/// `PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}`
async fn put_tag(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<Map<String, Value>>,
) -> ApiResult {
    let user_id = own(&auth, &path)?;
    let room_id: OwnedRoomId = path.id("roomId")?;
    if let Some(order) = body.get("order")
        && !order.is_number()
    {
        return Err(ApiError::bad_json("order must be a number"));
    }
    let mut current = tags(&state, &user_id, &room_id)?;
    current.insert(path.get("tag")?.to_owned(), Value::Object(body));
    state.account_data.set(&user_id, Some(&room_id), "m.tag", json!({"tags": current}))?;
    Ok(Json(json!({})))
}

/// `DELETE /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}`
async fn delete_tag(State(state): State<AppState>, auth: Auth, path: PathIds) -> ApiResult {
    let user_id = own(&auth, &path)?;
    let room_id: OwnedRoomId = path.id("roomId")?;
    let mut current = tags(&state, &user_id, &room_id)?;
    current.remove(path.get("tag")?);
    state.account_data.set(&user_id, Some(&room_id), "m.tag", json!({"tags": current}))?;
    Ok(Json(json!({})))
}
