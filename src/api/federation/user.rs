//! What peers ask about our users' devices and keys: `user/devices/{userId}` (the device
//! list, with its `stream_id`), `user/keys/query` and `user/keys/claim`. Only local users are
//! answered; another server's users are `M_INVALID_PARAM` (devices) or left out (keys).
//! User-signing keys never leave the server.
//!
//! [Device management](https://spec.matrix.org/v1.16/server-server-api/#device-management),
//! [end-to-end encryption](https://spec.matrix.org/v1.16/server-server-api/#end-to-end-encryption)

use std::collections::BTreeMap;

use axum::{
    Json, Router,
    extract::State,
    routing::{get, post},
};
use ruma::{OwnedDeviceId, OwnedUserId, UserId};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::{
    api::{
        AppState,
        client::keys::{claimed_keys_json, device_names},
        error::{ApiError, ApiResult},
        extract::{Body, PathIds},
        federation::XMatrixOrigin,
    },
    e2ee::CrossSigningKind,
};

/// Routes of this module (all behind the X-Matrix check).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/federation/v1/user/devices/{userId}", get(get_devices))
        .route("/_matrix/federation/v1/user/keys/query", post(query_keys))
        .route("/_matrix/federation/v1/user/keys/claim", post(claim_keys))
}

fn is_local(state: &AppState, user_id: &UserId) -> bool {
    user_id.server_name() == state.accounts.server_name()
}

/// `GET /_matrix/federation/v1/user/devices/{userId}`
///
/// Every device with keys (the spec requires `keys`), its display name, the master and
/// self-signing keys, and the list's `stream_id` (the position of the user's last key change).
async fn get_devices(
    State(state): State<AppState>,
    XMatrixOrigin(origin): XMatrixOrigin,
    path: PathIds,
) -> ApiResult {
    let user_id: OwnedUserId = path.id("userId")?;
    if !is_local(&state, &user_id) {
        return Err(ApiError::invalid_param("The user is not local to this server"));
    }
    tracing::debug!(%origin, %user_id, "device list query");
    // The stream id is read before the devices: a change landing in between has a larger one,
    // so its `m.device_list_update` is never taken as already seen.
    let stream_id = state.e2ee.device_list_stream_id(&user_id)?;
    let names = device_names(&state, &user_id)?;
    let devices: Vec<Value> = state
        .e2ee
        .device_keys(&user_id)?
        .into_iter()
        .map(|(device_id, keys)| {
            let mut device = json!({"device_id": device_id, "keys": keys});
            if let Some(Some(name)) = names.get(&device_id) {
                device["device_display_name"] = json!(name);
            }
            device
        })
        .collect();
    let mut answer = json!({"user_id": user_id, "stream_id": stream_id, "devices": devices});
    for (kind, field) in [
        (CrossSigningKind::Master, "master_key"),
        (CrossSigningKind::SelfSigning, "self_signing_key"),
    ] {
        if let Some(key) = state.e2ee.cross_signing_key(&user_id, kind)? {
            answer[field] = key;
        }
    }
    Ok(Json(answer))
}

#[derive(Deserialize)]
struct QueryBody {
    device_keys: BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>,
}

/// `POST /_matrix/federation/v1/user/keys/query`
async fn query_keys(
    State(state): State<AppState>,
    XMatrixOrigin(origin): XMatrixOrigin,
    Body(body): Body<QueryBody>,
) -> ApiResult {
    let mut device_keys = Map::new();
    let mut master_keys = Map::new();
    let mut self_signing_keys = Map::new();
    for (user_id, wanted) in &body.device_keys {
        if !is_local(&state, user_id) {
            tracing::debug!(%origin, %user_id, "keys/query for a user of another server: left out");
            continue;
        }
        let names = device_names(&state, user_id)?;
        let devices = state.e2ee.device_keys_for_query(user_id, wanted, &names)?;
        device_keys.insert(user_id.to_string(), Value::Object(devices));
        for (kind, section) in [
            (CrossSigningKind::Master, &mut master_keys),
            (CrossSigningKind::SelfSigning, &mut self_signing_keys),
        ] {
            if let Some(key) = state.e2ee.cross_signing_key(user_id, kind)? {
                section.insert(user_id.to_string(), key);
            }
        }
    }
    Ok(Json(json!({
        "device_keys": device_keys,
        "master_keys": master_keys,
        "self_signing_keys": self_signing_keys,
    })))
}

#[derive(Deserialize)]
struct ClaimBody {
    one_time_keys: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, String>>,
}

/// `POST /_matrix/federation/v1/user/keys/claim`: the same claim as the client API's, so a key
/// is handed out at most once whoever asks.
async fn claim_keys(
    State(state): State<AppState>,
    XMatrixOrigin(origin): XMatrixOrigin,
    Body(body): Body<ClaimBody>,
) -> ApiResult {
    let mut wanted = Vec::new();
    for (user_id, devices) in body.one_time_keys {
        if !is_local(&state, &user_id) {
            tracing::debug!(%origin, %user_id, "keys/claim for a user of another server: left out");
            continue;
        }
        for (device_id, algorithm) in devices {
            wanted.push((user_id.clone(), device_id, algorithm));
        }
    }
    let one_time_keys = claimed_keys_json(state.e2ee.claim_keys(&wanted)?);
    Ok(Json(json!({"one_time_keys": one_time_keys})))
}
