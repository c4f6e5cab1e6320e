//! Queries peers make about our users and aliases: `query/profile`, `query/directory`.
//!
//! [Query types](https://spec.matrix.org/v1.16/server-server-api/#query-types)

use axum::{Json, Router, extract::State, routing::get};
use ruma::{OwnedRoomAliasId, OwnedUserId};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::{
    accounts::Accounts,
    api::{
        AppState,
        error::{ApiError, ApiResult},
        extract::{Query, parse_id},
        federation::XMatrixOrigin,
    },
    rooms::Rooms,
};

/// Routes of this module (all behind the X-Matrix check).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/federation/v1/query/profile", get(query_profile))
        .route("/_matrix/federation/v1/query/directory", get(query_directory))
}

#[derive(Deserialize)]
struct ProfileQuery {
    user_id: String,
    #[serde(default)]
    field: Option<String>,
}

/// `GET /_matrix/federation/v1/query/profile`
async fn query_profile(
    State(accounts): State<Accounts>,
    XMatrixOrigin(origin): XMatrixOrigin,
    Query(query): Query<ProfileQuery>,
) -> ApiResult {
    let user_id: OwnedUserId = parse_id(&query.user_id, "user_id")?;
    tracing::debug!(%origin, %user_id, "profile query");
    let account = accounts
        .account(&user_id)?
        .filter(|account| !account.deactivated)
        .ok_or_else(|| ApiError::not_found("Profile was not found"))?;
    let mut profile = Map::new();
    let wanted = |name: &str| query.field.as_deref().is_none_or(|field| field == name);
    if let Some(displayname) = account.displayname.filter(|_| wanted("displayname")) {
        profile.insert("displayname".into(), json!(displayname));
    }
    if let Some(avatar_url) = account.avatar_url.filter(|_| wanted("avatar_url")) {
        profile.insert("avatar_url".into(), json!(avatar_url));
    }
    Ok(Json(Value::Object(profile)))
}

#[derive(Deserialize)]
struct DirectoryQuery {
    room_alias: String,
}

/// `GET /_matrix/federation/v1/query/directory`: where one of our aliases points. Aliases of
/// other servers are not ours to answer.
async fn query_directory(
    State(rooms): State<Rooms>,
    XMatrixOrigin(origin): XMatrixOrigin,
    Query(query): Query<DirectoryQuery>,
) -> ApiResult {
    let alias: OwnedRoomAliasId = parse_id(&query.room_alias, "room_alias")?;
    tracing::debug!(%origin, %alias, "directory query");
    if alias.server_name().as_str() != rooms.server_name().as_str() {
        return Err(ApiError::not_found("Room alias not found"));
    }
    let resolved = rooms
        .resolve_local_alias_with_servers(&alias)?
        .ok_or_else(|| ApiError::not_found("Room alias not found"))?;
    Ok(Json(json!({"room_id": resolved.room_id, "servers": resolved.servers})))
}
