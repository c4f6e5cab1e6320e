//! Room aliases, the public room directory and room visibility.
//!
//! [Room aliases](https://spec.matrix.org/v1.16/client-server-api/#room-aliases),
//! [listing rooms](https://spec.matrix.org/v1.16/client-server-api/#listing-rooms)

use axum::{
    Json, Router,
    extract::{FromRequestParts, State},
    http::request::Parts,
    routing::get,
};
use ruma::{OwnedRoomAliasId, OwnedRoomId, OwnedServerName};
use serde::Deserialize;
use serde_json::json;

use super::membership::visible_until;
use crate::{
    api::{
        AppState,
        error::{ApiError, ApiResult},
        extract::{Auth, Body, PathIds, Query, parse_id},
    },
    remote_directory,
    rooms::directory::PublicRoomsRequest,
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

/// `GET /_matrix/client/v3/directory/room/{roomAlias}`: an alias of this server from the
/// table, one of another server asked of that server (`query/directory`).
async fn get_alias(State(state): State<AppState>, path: PathIds) -> ApiResult {
    let alias = alias(&path)?;
    let resolved = if alias.server_name() == state.config.server_name {
        state
            .rooms
            .resolve_local_alias_with_servers(&alias)?
            .ok_or_else(|| ApiError::not_found("Room alias not found"))?
    } else {
        remote_directory::query_alias(&state.federation, &alias).await?
    };
    Ok(Json(json!({"room_id": resolved.room_id, "servers": resolved.servers})))
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
    include_all_networks: Option<String>,
}

#[derive(Deserialize, Default)]
struct PublicRoomsBody {
    limit: Option<usize>,
    since: Option<String>,
    server: Option<String>,
    filter: Option<PublicRoomsFilter>,
    #[serde(default)]
    include_all_networks: bool,
}

/// `filter` of `POST /publicRooms` (client and federation alike).
#[derive(Deserialize, Default)]
pub(crate) struct PublicRoomsFilter {
    pub(crate) generic_search_term: Option<String>,
    #[serde(default)]
    pub(crate) room_types: Vec<Option<String>>,
}

/// `limit` from a query string.
pub(crate) fn parse_limit(limit: Option<&str>) -> Result<Option<usize>, ApiError> {
    limit.map(str::parse::<usize>).transpose().map_err(|_| ApiError::invalid_param("Invalid limit"))
}

/// `include_all_networks` from a query string.
pub(crate) fn parse_flag(flag: Option<&str>) -> Result<bool, ApiError> {
    match flag {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(ApiError::invalid_param("include_all_networks must be true or false")),
    }
}

/// A page of this server's directory, or of `server`'s asked over federation.
async fn public_rooms(
    state: &AppState,
    server: Option<&str>,
    request: PublicRoomsRequest,
    include_all_networks: bool,
) -> ApiResult {
    match server.filter(|server| *server != state.config.server_name.as_str()) {
        None => Ok(Json(json!(state.rooms.public_rooms(&request)?))),
        Some(server) => {
            let server: OwnedServerName = parse_id(server, "server")?;
            let page = remote_directory::public_rooms(
                &state.federation,
                &server,
                &request,
                include_all_networks,
            )
            .await?;
            Ok(Json(page))
        }
    }
}

/// `GET /_matrix/client/v3/publicRooms`: open to all for this server's rooms; asking another
/// server through this one takes an access token.
async fn get_public_rooms(
    State(state): State<AppState>,
    Query(query): Query<PublicRoomsQuery>,
    mut parts: Parts,
) -> ApiResult {
    if query.server.as_deref().is_some_and(|server| server != state.config.server_name.as_str()) {
        Auth::from_request_parts(&mut parts, &state).await?;
    }
    let request = PublicRoomsRequest {
        limit: parse_limit(query.limit.as_deref())?,
        since: query.since,
        ..PublicRoomsRequest::default()
    };
    let include_all_networks = parse_flag(query.include_all_networks.as_deref())?;
    public_rooms(&state, query.server.as_deref(), request, include_all_networks).await
}

/// `POST /_matrix/client/v3/publicRooms`
async fn post_public_rooms(
    State(state): State<AppState>,
    _auth: Auth,
    Query(query): Query<PublicRoomsQuery>,
    Body(body): Body<PublicRoomsBody>,
) -> ApiResult {
    let filter = body.filter.unwrap_or_default();
    let request = PublicRoomsRequest {
        limit: body.limit,
        since: body.since,
        search: filter.generic_search_term,
        room_types: filter.room_types,
    };
    let server = query.server.as_deref().or(body.server.as_deref());
    public_rooms(&state, server, request, body.include_all_networks).await
}
