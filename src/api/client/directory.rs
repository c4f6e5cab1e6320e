//! Room aliases, the public room directory and room visibility.
//!
//! [Room aliases](https://spec.matrix.org/v1.16/client-server-api/#room-aliases),
//! [listing rooms](https://spec.matrix.org/v1.16/client-server-api/#listing-rooms)

use axum::{Json, Router, extract::State, routing::get};
use ruma::{OwnedRoomAliasId, OwnedRoomId};
use serde::Deserialize;
use serde_json::{Value, json};

use super::membership::visible_until;
use crate::api::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{Auth, Body, PathIds, Query},
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/_matrix/client/v3/directory/room/{roomAlias}",
            get(get_alias).put(put_alias).delete(delete_alias),
        )
        .route("/_matrix/client/v3/rooms/{roomId}/aliases", get(get_room_aliases))
        .route(
            "/_matrix/client/v3/directory/list/room/{roomId}",
            get(get_visibility).put(set_visibility),
        )
        .route("/_matrix/client/v3/publicRooms", get(get_public_rooms).post(post_public_rooms))
}

fn alias(path: &PathIds) -> Result<OwnedRoomAliasId, ApiError> {
    path.id("roomAlias")
}

/// `GET /_matrix/client/v3/directory/room/{roomAlias}`
async fn get_alias(State(state): State<AppState>, path: PathIds) -> ApiResult {
    let alias = alias(&path)?;
    if alias.server_name() != state.config.server_name {
        return Err(ApiError::not_found("Room alias not found (remote aliases need federation)"));
    }
    let room_id = state
        .rooms
        .resolve_local_alias(&alias)?
        .ok_or_else(|| ApiError::not_found("Room alias not found"))?;
    Ok(Json(json!({"room_id": room_id, "servers": [state.config.server_name]})))
}

#[derive(Deserialize)]
struct PutAliasBody {
    room_id: OwnedRoomId,
}

/// `PUT /_matrix/client/v3/directory/room/{roomAlias}`
async fn put_alias(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<PutAliasBody>,
) -> ApiResult {
    let alias = alias(&path)?;
    if alias.server_name() != state.config.server_name {
        return Err(ApiError::invalid_param("Alias must be on this server"));
    }
    if state.rooms.room(&body.room_id)?.is_none() {
        return Err(ApiError::not_found("Room not found"));
    }
    if !state.rooms.is_joined(&body.room_id, &auth.user_id)? && !auth.is_admin {
        return Err(ApiError::forbidden("You are not in this room"));
    }
    match state.rooms.put_alias(&alias, &body.room_id, &auth.user_id) {
        Err(crate::rooms::RoomError::AliasInUse) => {
            Err(ApiError::conflict("Room alias already exists"))
        }
        Err(error) => Err(error.into()),
        Ok(()) => Ok(Json(json!({}))),
    }
}

/// `DELETE /_matrix/client/v3/directory/room/{roomAlias}`
async fn delete_alias(State(state): State<AppState>, auth: Auth, path: PathIds) -> ApiResult {
    let alias = alias(&path)?;
    match state.rooms.delete_alias(&alias, &auth.user_id, auth.is_admin) {
        Err(crate::rooms::RoomError::NotFound) => Err(ApiError::not_found("Room alias not found")),
        Err(error) => Err(error.into()),
        Ok(()) => Ok(Json(json!({}))),
    }
}

/// `GET /_matrix/client/v3/rooms/{roomId}/aliases`
async fn get_room_aliases(State(state): State<AppState>, auth: Auth, path: PathIds) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    visible_until(&state, &auth, &room_id)?;
    Ok(Json(json!({"aliases": state.rooms.room_aliases(&room_id)?})))
}

/// `GET /_matrix/client/v3/directory/list/room/{roomId}`
async fn get_visibility(State(state): State<AppState>, path: PathIds) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    if state.rooms.room(&room_id)?.is_none() {
        return Err(ApiError::not_found("Room not found"));
    }
    let visibility = if state.rooms.is_public(&room_id)? { "public" } else { "private" };
    Ok(Json(json!({"visibility": visibility})))
}

#[derive(Deserialize)]
struct VisibilityBody {
    visibility: String,
}

/// `PUT /_matrix/client/v3/directory/list/room/{roomId}`
async fn set_visibility(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<VisibilityBody>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    if state.rooms.room(&room_id)?.is_none() {
        return Err(ApiError::not_found("Room not found"));
    }
    let public = match body.visibility.as_str() {
        "public" => true,
        "private" => false,
        _ => return Err(ApiError::invalid_param("visibility must be public or private")),
    };
    let levels = state.rooms.power_levels(&room_id)?;
    if !auth.is_admin
        && levels.user_level(&auth.user_id) < levels.event_level("m.room.canonical_alias", true)
    {
        return Err(ApiError::forbidden(
            "You don't have permission to change the room's visibility",
        ));
    }
    state.rooms.set_public(&room_id, public)?;
    Ok(Json(json!({})))
}

#[derive(Deserialize, Default)]
struct PublicRoomsQuery {
    limit: Option<String>,
    since: Option<String>,
    server: Option<String>,
}

#[derive(Deserialize, Default)]
struct PublicRoomsBody {
    limit: Option<usize>,
    since: Option<String>,
    server: Option<String>,
    filter: Option<Value>,
}

fn public_rooms(
    state: &AppState,
    limit: Option<usize>,
    since: Option<&str>,
    search: Option<&str>,
) -> ApiResult {
    let all = state.rooms.public_rooms(search)?;
    let start = match since {
        Some(since) => since
            .strip_prefix('p')
            .and_then(|offset| offset.parse::<usize>().ok())
            .ok_or_else(|| ApiError::invalid_param("Invalid since token"))?,
        None => 0,
    };
    let limit = limit.unwrap_or(usize::MAX);
    let total = all.len();
    let chunk: Vec<Value> = all.into_iter().skip(start).take(limit).collect();
    let mut answer = json!({"chunk": chunk, "total_room_count_estimate": total});
    if start + chunk_len(&answer) < total {
        answer["next_batch"] = json!(format!("p{}", start + chunk_len(&answer)));
    }
    if start > 0 {
        answer["prev_batch"] = json!(format!("p{}", start.saturating_sub(limit)));
    }
    Ok(Json(answer))
}

fn chunk_len(answer: &Value) -> usize {
    answer["chunk"].as_array().map_or(0, Vec::len)
}

fn check_server(state: &AppState, server: Option<&str>) -> Result<(), ApiError> {
    match server {
        Some(server) if server != state.config.server_name.as_str() => {
            Err(ApiError::not_found("Listing remote servers' rooms needs federation"))
        }
        _ => Ok(()),
    }
}

/// `GET /_matrix/client/v3/publicRooms`
async fn get_public_rooms(
    State(state): State<AppState>,
    Query(query): Query<PublicRoomsQuery>,
) -> ApiResult {
    check_server(&state, query.server.as_deref())?;
    let limit = query
        .limit
        .as_deref()
        .map(str::parse::<usize>)
        .transpose()
        .map_err(|_| ApiError::invalid_param("Invalid limit"))?;
    public_rooms(&state, limit, query.since.as_deref(), None)
}

/// `POST /_matrix/client/v3/publicRooms`
async fn post_public_rooms(
    State(state): State<AppState>,
    _auth: Auth,
    Query(query): Query<PublicRoomsQuery>,
    Body(body): Body<PublicRoomsBody>,
) -> ApiResult {
    check_server(&state, query.server.as_deref().or(body.server.as_deref()))?;
    let search = body
        .filter
        .as_ref()
        .and_then(|filter| filter.get("generic_search_term"))
        .and_then(Value::as_str);
    public_rooms(&state, body.limit, body.since.as_deref(), search)
}
