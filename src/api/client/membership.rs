//! Room membership endpoints: join, knock, invite, leave, forget, kick, ban, unban, and the
//! member lists.
//!
//! [Room membership](https://spec.matrix.org/v1.16/client-server-api/#room-membership)

use axum::{
    Json, Router,
    extract::{RawQuery, State},
    routing::{get, post},
};
use ruma::{OwnedRoomId, OwnedServerName, OwnedUserId, RoomAliasId, RoomId};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::api::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{Auth, Body, PathIds, Query, parse_id},
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/v3/join/{roomIdOrAlias}", post(join_by_id_or_alias))
        .route("/_matrix/client/v3/rooms/{roomId}/join", post(join_by_id))
        .route("/_matrix/client/v3/knock/{roomIdOrAlias}", post(knock))
        .route("/_matrix/client/v3/rooms/{roomId}/invite", post(invite))
        .route("/_matrix/client/v3/rooms/{roomId}/leave", post(leave))
        .route("/_matrix/client/v3/rooms/{roomId}/forget", post(forget))
        .route("/_matrix/client/v3/rooms/{roomId}/kick", post(kick))
        .route("/_matrix/client/v3/rooms/{roomId}/ban", post(ban))
        .route("/_matrix/client/v3/rooms/{roomId}/unban", post(unban))
        .route("/_matrix/client/v3/joined_rooms", get(joined_rooms))
        .route("/_matrix/client/v3/rooms/{roomId}/joined_members", get(joined_members))
        .route("/_matrix/client/v3/rooms/{roomId}/members", get(members))
}

#[derive(Deserialize, Default)]
struct ReasonBody {
    reason: Option<String>,
}

fn profile(state: &AppState, auth: &Auth) -> Result<(Option<String>, Option<String>), ApiError> {
    let account = state.accounts.account(&auth.user_id)?.unwrap_or_default();
    Ok((account.displayname, account.avatar_url))
}

/// The content of the user's own member event sent through another server: the membership,
/// their profile and the reason.
fn member_content(
    state: &AppState,
    auth: &Auth,
    membership: &str,
    reason: Option<String>,
) -> Result<serde_json::Value, ApiError> {
    let (displayname, avatar_url) = profile(state, auth)?;
    let mut content = json!({"membership": membership});
    if let Some(name) = displayname {
        content["displayname"] = json!(name);
    }
    if let Some(url) = avatar_url {
        content["avatar_url"] = json!(url);
    }
    if let Some(reason) = reason {
        content["reason"] = json!(reason);
    }
    Ok(content)
}

async fn join_room(
    state: &AppState,
    auth: &Auth,
    room_id: &RoomId,
    reason: Option<String>,
    via: &[OwnedServerName],
) -> ApiResult {
    if state.rooms.join_needs_remote(room_id)? {
        // Only a server in the room can build our join on its current state.
        let servers = state.rooms.candidate_servers(room_id, &auth.user_id, via)?;
        let content = member_content(state, auth, "join", reason)?;
        state.rooms.join_remote(room_id, &auth.user_id, &servers, content, &state.remote).await?;
        return Ok(Json(json!({"room_id": room_id})));
    }
    state.rooms.join(room_id, &auth.user_id, profile(state, auth)?, reason).await?;
    Ok(Json(json!({"room_id": room_id})))
}

/// The servers a client names for a join (`via`, and the older `server_name`), in order.
fn via_servers(query: Option<&str>) -> Vec<OwnedServerName> {
    let pairs: Vec<(String, String)> =
        query.and_then(|query| serde_urlencoded::from_str(query).ok()).unwrap_or_default();
    pairs
        .into_iter()
        .filter(|(key, _)| key == "via" || key == "server_name")
        .filter_map(|(_, value)| OwnedServerName::try_from(value).ok())
        .collect()
}

/// `POST /_matrix/client/v3/join/{roomIdOrAlias}`
async fn join_by_id_or_alias(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    RawQuery(query): RawQuery,
    Body(body): Body<ReasonBody>,
) -> ApiResult {
    let mut via = via_servers(query.as_deref());
    let (room_id, servers) = room_id_or_alias(&state, &path).await?;
    via.extend(servers);
    join_room(&state, &auth, &room_id, body.reason, &via).await
}

/// The room named by the `roomIdOrAlias` path segment, and the servers that can help join it
/// when an alias of another server named it (asked through `query/directory`).
async fn room_id_or_alias(
    state: &AppState,
    path: &PathIds,
) -> Result<(OwnedRoomId, Vec<OwnedServerName>), ApiError> {
    let target = path.get("roomIdOrAlias")?;
    if !target.starts_with('#') {
        return Ok((parse_id(target, "room id or alias")?, Vec::new()));
    }
    let alias =
        RoomAliasId::parse(target).map_err(|_| ApiError::invalid_param("Invalid room alias"))?;
    if alias.server_name() == state.config.server_name {
        let room_id = state
            .rooms
            .resolve_local_alias(&alias)?
            .ok_or_else(|| ApiError::not_found("Room alias not found"))?;
        return Ok((room_id, Vec::new()));
    }
    match crate::remote_directory::query_alias(&state.federation, &alias).await {
        Ok(resolved) => Ok((resolved.room_id, resolved.servers)),
        Err(error) => {
            tracing::info!(%alias, %error, "remote alias not resolved");
            Err(ApiError::not_found("Room alias not found"))
        }
    }
}

/// `POST /_matrix/client/v3/knock/{roomIdOrAlias}`: knocks on a room, through the servers in
/// it (`via`, `server_name`, the alias's servers) when no user of this server is joined.
async fn knock(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    RawQuery(query): RawQuery,
    Body(body): Body<ReasonBody>,
) -> ApiResult {
    let mut via = via_servers(query.as_deref());
    let (room_id, servers) = room_id_or_alias(&state, &path).await?;
    via.extend(servers);
    if state.rooms.join_needs_remote(&room_id)? {
        let servers = state.rooms.candidate_servers(&room_id, &auth.user_id, &via)?;
        let content = member_content(&state, &auth, "knock", body.reason)?;
        state.rooms.knock_remote(&room_id, &auth.user_id, &servers, content, &state.remote).await?;
        return Ok(Json(json!({"room_id": room_id})));
    }
    state.rooms.knock(&room_id, &auth.user_id, profile(&state, &auth)?, body.reason).await?;
    Ok(Json(json!({"room_id": room_id})))
}

/// `POST /_matrix/client/v3/rooms/{roomId}/join`
async fn join_by_id(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<ReasonBody>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    join_room(&state, &auth, &room_id, body.reason, &[]).await
}

#[derive(Deserialize)]
struct TargetBody {
    user_id: OwnedUserId,
    reason: Option<String>,
}

async fn change(
    state: &AppState,
    auth: &Auth,
    path: &PathIds,
    body: TargetBody,
    membership: &str,
    expect_current: Option<&str>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    if state.rooms.room(&room_id)?.is_none() {
        return Err(ApiError::not_found("Room not found"));
    }
    if membership == "invite"
        && body.user_id.server_name() == state.config.server_name
        && !state.accounts.exists(&body.user_id)?
    {
        return Err(ApiError::not_found("Unknown user"));
    }
    if let Some(expected) = expect_current {
        let current =
            state.rooms.membership(&room_id, &body.user_id)?.map(|record| record.membership);
        if current.as_deref() != Some(expected) {
            return Err(ApiError::forbidden(format!("The user's membership is not {expected}")));
        }
    }
    if membership == "invite" && body.user_id.server_name() != state.config.server_name {
        let mut content = json!({"membership": "invite"});
        if let Some(reason) = body.reason {
            content["reason"] = json!(reason);
        }
        state
            .rooms
            .invite_remote(&room_id, &auth.user_id, &body.user_id, content, &state.remote)
            .await?;
        return Ok(Json(json!({})));
    }
    state
        .rooms
        .set_membership(&room_id, &auth.user_id, &body.user_id, membership, body.reason, None)
        .await?;
    Ok(Json(json!({})))
}

/// `POST /_matrix/client/v3/rooms/{roomId}/invite`
async fn invite(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<TargetBody>,
) -> ApiResult {
    change(&state, &auth, &path, body, "invite", None).await
}

/// `POST /_matrix/client/v3/rooms/{roomId}/kick`
async fn kick(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<TargetBody>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let current = state.rooms.membership(&room_id, &body.user_id)?.map(|record| record.membership);
    if !matches!(current.as_deref(), Some("join" | "invite" | "knock")) {
        return Err(ApiError::forbidden("The user is not in the room"));
    }
    change(&state, &auth, &path, body, "leave", None).await
}

/// `POST /_matrix/client/v3/rooms/{roomId}/ban`
async fn ban(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<TargetBody>,
) -> ApiResult {
    change(&state, &auth, &path, body, "ban", None).await
}

/// `POST /_matrix/client/v3/rooms/{roomId}/unban`
async fn unban(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<TargetBody>,
) -> ApiResult {
    change(&state, &auth, &path, body, "leave", Some("ban")).await
}

/// `POST /_matrix/client/v3/rooms/{roomId}/leave`
async fn leave(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<ReasonBody>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let current = state.rooms.membership(&room_id, &auth.user_id)?.map(|record| record.membership);
    match current.as_deref() {
        Some("invite" | "knock") if !state.rooms.has_local_member(&room_id)? => {
            // A room this server is not in: only its servers can take the leave.
            let servers = state.rooms.candidate_servers(&room_id, &auth.user_id, &[])?;
            state
                .rooms
                .leave_remote(&room_id, &auth.user_id, &servers, body.reason, &state.remote)
                .await?;
        }
        Some("join" | "invite" | "knock") => {
            state
                .rooms
                .set_membership(&room_id, &auth.user_id, &auth.user_id, "leave", body.reason, None)
                .await?;
        }
        Some("leave" | "ban") => {}
        _ => return Err(ApiError::forbidden("You are not a member of this room")),
    }
    Ok(Json(json!({})))
}

/// `POST /_matrix/client/v3/rooms/{roomId}/forget`
async fn forget(State(state): State<AppState>, auth: Auth, path: PathIds) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    match state.rooms.membership(&room_id, &auth.user_id)? {
        None => return Err(ApiError::not_found("You are not a member of this room")),
        Some(record) if record.membership == "join" || record.membership == "invite" => {
            return Err(ApiError::bad_request("The user is still in the room"));
        }
        Some(_) => state.rooms.forget(&room_id, &auth.user_id)?,
    }
    Ok(Json(json!({})))
}

/// `GET /_matrix/client/v3/joined_rooms`
async fn joined_rooms(State(state): State<AppState>, auth: Auth) -> ApiResult {
    Ok(Json(json!({"joined_rooms": state.rooms.joined_rooms(&auth.user_id)?})))
}

/// Checks that the user may read the room's members and state: joined now, or was once (then
/// they see it as of when they left).
pub fn visible_until(
    state: &AppState,
    auth: &Auth,
    room_id: &RoomId,
) -> Result<Option<u64>, ApiError> {
    if state.rooms.room(room_id)?.is_none() {
        return Err(ApiError::forbidden("You are not a member of this room"));
    }
    match state.rooms.membership(room_id, &auth.user_id)? {
        Some(record) if record.membership == "join" => Ok(None),
        Some(record) if record.membership == "leave" || record.membership == "ban" => {
            Ok(Some(record.position))
        }
        _ => {
            let readable = state
                .rooms
                .current_state_content(room_id, "m.room.history_visibility", "")?
                .and_then(|content| content.get("history_visibility").cloned())
                == Some(json!("world_readable"));
            if readable {
                Ok(None)
            } else {
                Err(ApiError::forbidden("You are not a member of this room"))
            }
        }
    }
}

/// `GET /_matrix/client/v3/rooms/{roomId}/joined_members`
async fn joined_members(State(state): State<AppState>, auth: Auth, path: PathIds) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    if !state.rooms.is_joined(&room_id, &auth.user_id)? {
        return Err(ApiError::forbidden("You are not a member of this room"));
    }
    let mut joined = Map::new();
    for user_id in state.rooms.joined_members(&room_id)? {
        let content = state
            .rooms
            .current_state_content(&room_id, "m.room.member", user_id.as_str())?
            .unwrap_or_default();
        joined.insert(
            user_id.to_string(),
            json!({
                "display_name": content.get("displayname").cloned().unwrap_or(Value::Null),
                "avatar_url": content.get("avatar_url").cloned().unwrap_or(Value::Null),
            }),
        );
    }
    Ok(Json(json!({"joined": joined})))
}

#[derive(Deserialize)]
struct MembersQuery {
    at: Option<String>,
    membership: Option<String>,
    not_membership: Option<String>,
}

/// `GET /_matrix/client/v3/rooms/{roomId}/members`
async fn members(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Query(query): Query<MembersQuery>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let until = visible_until(&state, &auth, &room_id)?;
    let at = match &query.at {
        Some(token) => Some(
            crate::sync::parse_token(token)
                .ok_or_else(|| ApiError::invalid_param("Invalid at token"))?,
        ),
        None => None,
    };
    let at = match (at, until) {
        (Some(at), Some(until)) => Some(at.min(until)),
        (at, until) => at.or(until),
    };
    let state_ids = match at {
        Some(position) => {
            state.rooms.state_at(state.rooms.snapshot_at_position(&room_id, position)?)?
        }
        None => state.rooms.current_state_ids(&room_id)?,
    };
    let mut chunk = Vec::new();
    for ((kind, _), event_id) in state_ids {
        if kind != "m.room.member" {
            continue;
        }
        let Some((pdu, _, value)) =
            state.rooms.client_event_by_id(&event_id, Some((&auth.user_id, &auth.device_id)))?
        else {
            continue;
        };
        let membership = pdu.membership().unwrap_or_default();
        if query.membership.as_ref().is_some_and(|wanted| *wanted != membership) {
            continue;
        }
        if query.not_membership.as_ref().is_some_and(|unwanted| *unwanted == membership) {
            continue;
        }
        chunk.push(value);
    }
    Ok(Json(json!({"chunk": chunk})))
}
