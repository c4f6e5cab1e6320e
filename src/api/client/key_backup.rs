//! Server-side key backups: `room_keys/version` (create, latest, get, update, delete) and
//! `room_keys/keys` for all rooms, one room or one session (put, get, delete). The logic lives
//! in `src/key_backup.rs`.
//!
//! [Server-side key backups](https://spec.matrix.org/v1.16/client-server-api/#server-side-key-backups)

use std::collections::BTreeMap;

use axum::{Json, Router, extract::State, routing::post};
use ruma::{OwnedRoomId, RoomId};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::{
    api::{
        AppState,
        error::{ApiResult, empty_object},
        extract::{Auth, Body, PathIds, Query},
    },
    key_backup::{BackupVersion, KeyBackup, KeyBackupData, KeySelection, KeysUpdate, RoomKeys},
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/v3/room_keys/version", post(create_version).get(get_latest_version))
        .route(
            "/_matrix/client/v3/room_keys/version/{version}",
            axum::routing::get(get_version).put(update_version).delete(delete_version),
        )
        .route(
            "/_matrix/client/v3/room_keys/keys",
            axum::routing::put(put_all_keys).get(get_all_keys).delete(delete_all_keys),
        )
        .route(
            "/_matrix/client/v3/room_keys/keys/{roomId}",
            axum::routing::put(put_room_keys).get(get_room_keys).delete(delete_room_keys),
        )
        .route(
            "/_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}",
            axum::routing::put(put_session_key).get(get_session_key).delete(delete_session_key),
        )
}

#[derive(Deserialize)]
struct VersionBody {
    algorithm: String,
    auth_data: Map<String, Value>,
    version: Option<String>,
}

fn version_json(version: BackupVersion) -> Json<Value> {
    Json(json!({
        "version": version.version,
        "algorithm": version.algorithm,
        "auth_data": version.auth_data,
        "etag": version.etag,
        "count": version.count,
    }))
}

fn update_json(update: KeysUpdate) -> Json<Value> {
    Json(json!({"etag": update.etag, "count": update.count}))
}

/// `POST /_matrix/client/v3/room_keys/version`
async fn create_version(
    State(key_backup): State<KeyBackup>,
    auth: Auth,
    Body(body): Body<VersionBody>,
) -> ApiResult {
    let version = key_backup.create_version(&auth.user_id, &body.algorithm, body.auth_data)?;
    Ok(Json(json!({"version": version})))
}

/// `GET /_matrix/client/v3/room_keys/version`
async fn get_latest_version(State(key_backup): State<KeyBackup>, auth: Auth) -> ApiResult {
    Ok(version_json(key_backup.latest_version(&auth.user_id)?))
}

/// `GET /_matrix/client/v3/room_keys/version/{version}`
async fn get_version(State(key_backup): State<KeyBackup>, auth: Auth, path: PathIds) -> ApiResult {
    Ok(version_json(key_backup.version(&auth.user_id, path.get("version")?)?))
}

/// `PUT /_matrix/client/v3/room_keys/version/{version}`
async fn update_version(
    State(key_backup): State<KeyBackup>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<VersionBody>,
) -> ApiResult {
    key_backup.update_version(
        &auth.user_id,
        path.get("version")?,
        body.version.as_deref(),
        &body.algorithm,
        body.auth_data,
    )?;
    Ok(empty_object())
}

/// `DELETE /_matrix/client/v3/room_keys/version/{version}`
async fn delete_version(
    State(key_backup): State<KeyBackup>,
    auth: Auth,
    path: PathIds,
) -> ApiResult {
    key_backup.delete_version(&auth.user_id, path.get("version")?)?;
    Ok(empty_object())
}

/// The `?version=` every `room_keys/keys` request must carry.
#[derive(Deserialize)]
struct VersionQuery {
    version: String,
}

#[derive(Deserialize)]
struct RoomKeyBackup {
    sessions: BTreeMap<String, KeyBackupData>,
}

#[derive(Deserialize)]
struct AllKeysBody {
    rooms: BTreeMap<OwnedRoomId, RoomKeyBackup>,
}

fn rooms_json(room_keys: RoomKeys) -> Value {
    let rooms: Map<String, Value> = room_keys
        .into_iter()
        .map(|(room_id, sessions)| (room_id.to_string(), sessions_json(sessions)))
        .collect();
    Value::Object(rooms)
}

fn sessions_json(sessions: BTreeMap<String, KeyBackupData>) -> Value {
    json!({"sessions": sessions.into_iter().map(|(id, data)| (id, key_json(data))).collect::<Map<_, _>>()})
}

fn key_json(data: KeyBackupData) -> Value {
    json!({
        "first_message_index": data.first_message_index,
        "forwarded_count": data.forwarded_count,
        "is_verified": data.is_verified,
        "session_data": data.session_data,
    })
}

fn room_id(path: &PathIds) -> Result<OwnedRoomId, crate::api::error::ApiError> {
    path.id("roomId")
}

/// `PUT /_matrix/client/v3/room_keys/keys`
async fn put_all_keys(
    State(key_backup): State<KeyBackup>,
    auth: Auth,
    Query(query): Query<VersionQuery>,
    Body(body): Body<AllKeysBody>,
) -> ApiResult {
    let room_keys: RoomKeys =
        body.rooms.into_iter().map(|(room_id, room)| (room_id, room.sessions)).collect();
    Ok(update_json(key_backup.put_keys(&auth.user_id, &query.version, &room_keys)?))
}

/// `GET /_matrix/client/v3/room_keys/keys`
async fn get_all_keys(
    State(key_backup): State<KeyBackup>,
    auth: Auth,
    Query(query): Query<VersionQuery>,
) -> ApiResult {
    let room_keys = key_backup.get_keys(&auth.user_id, &query.version, KeySelection::All)?;
    Ok(Json(json!({"rooms": rooms_json(room_keys)})))
}

/// `DELETE /_matrix/client/v3/room_keys/keys`
async fn delete_all_keys(
    State(key_backup): State<KeyBackup>,
    auth: Auth,
    Query(query): Query<VersionQuery>,
) -> ApiResult {
    Ok(update_json(key_backup.delete_keys(&auth.user_id, &query.version, KeySelection::All)?))
}

/// `PUT /_matrix/client/v3/room_keys/keys/{roomId}`
async fn put_room_keys(
    State(key_backup): State<KeyBackup>,
    auth: Auth,
    path: PathIds,
    Query(query): Query<VersionQuery>,
    Body(body): Body<RoomKeyBackup>,
) -> ApiResult {
    let room_keys = RoomKeys::from([(room_id(&path)?, body.sessions)]);
    Ok(update_json(key_backup.put_keys(&auth.user_id, &query.version, &room_keys)?))
}

/// `GET /_matrix/client/v3/room_keys/keys/{roomId}`: `{"sessions": {}}` when the room has
/// no keys.
async fn get_room_keys(
    State(key_backup): State<KeyBackup>,
    auth: Auth,
    path: PathIds,
    Query(query): Query<VersionQuery>,
) -> ApiResult {
    let room_id = room_id(&path)?;
    let mut room_keys =
        key_backup.get_keys(&auth.user_id, &query.version, KeySelection::Room(&room_id))?;
    Ok(Json(sessions_json(room_keys.remove(&room_id).unwrap_or_default())))
}

/// `DELETE /_matrix/client/v3/room_keys/keys/{roomId}`
async fn delete_room_keys(
    State(key_backup): State<KeyBackup>,
    auth: Auth,
    path: PathIds,
    Query(query): Query<VersionQuery>,
) -> ApiResult {
    let room_id = room_id(&path)?;
    let selection = KeySelection::Room(&room_id);
    Ok(update_json(key_backup.delete_keys(&auth.user_id, &query.version, selection)?))
}

/// `PUT /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
async fn put_session_key(
    State(key_backup): State<KeyBackup>,
    auth: Auth,
    path: PathIds,
    Query(query): Query<VersionQuery>,
    Body(body): Body<KeyBackupData>,
) -> ApiResult {
    let session_id = path.get("sessionId")?.to_owned();
    let room_keys = RoomKeys::from([(room_id(&path)?, BTreeMap::from([(session_id, body)]))]);
    Ok(update_json(key_backup.put_keys(&auth.user_id, &query.version, &room_keys)?))
}

/// `GET /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`: `M_NOT_FOUND` when the
/// backup has no key for the session.
async fn get_session_key(
    State(key_backup): State<KeyBackup>,
    auth: Auth,
    path: PathIds,
    Query(query): Query<VersionQuery>,
) -> ApiResult {
    let room_id = room_id(&path)?;
    let data = key_backup.get_session_key(
        &auth.user_id,
        &query.version,
        &room_id,
        path.get("sessionId")?,
    )?;
    Ok(Json(key_json(data)))
}

/// `DELETE /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
async fn delete_session_key(
    State(key_backup): State<KeyBackup>,
    auth: Auth,
    path: PathIds,
    Query(query): Query<VersionQuery>,
) -> ApiResult {
    let room_id: &RoomId = &room_id(&path)?;
    let selection = KeySelection::Session(room_id, path.get("sessionId")?);
    Ok(update_json(key_backup.delete_keys(&auth.user_id, &query.version, selection)?))
}
