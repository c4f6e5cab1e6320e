//! Key management for end-to-end encryption: upload, query, claim, changes, cross-signing
//! keys and signatures. Query and claim reach other servers for their users
//! ([`crate::e2ee::remote`]); signatures of other servers' users are not forwarded.
//!
//! [Key management API](https://spec.matrix.org/v1.16/client-server-api/#key-management-api),
//! [cross-signing](https://spec.matrix.org/v1.16/client-server-api/#cross-signing)

use std::{collections::BTreeMap, time::Duration};

use axum::{
    Json, Router,
    extract::State,
    routing::{get, post},
};
use ruma::{OwnedDeviceId, OwnedUserId, UserId};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::account::password_stage;
use crate::{
    api::{
        AppState,
        error::{ApiError, ApiResult, signature_failure},
        extract::{Auth, Body, Query},
    },
    e2ee::{ClaimedKey, CrossSigningKind, remote},
    sync::parse_token,
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/v3/keys/upload", post(upload_keys))
        .route("/_matrix/client/v3/keys/query", post(query_keys))
        .route("/_matrix/client/v3/keys/claim", post(claim_keys))
        .route("/_matrix/client/v3/keys/changes", get(get_key_changes))
        .route("/_matrix/client/v3/keys/device_signing/upload", post(upload_cross_signing_keys))
        .route("/_matrix/client/v3/keys/signatures/upload", post(upload_signatures))
}

#[derive(Deserialize)]
struct UploadBody {
    device_keys: Option<Value>,
    #[serde(default)]
    one_time_keys: Map<String, Value>,
    #[serde(default)]
    fallback_keys: Map<String, Value>,
}

/// `POST /_matrix/client/v3/keys/upload`
async fn upload_keys(
    State(state): State<AppState>,
    auth: Auth,
    Body(body): Body<UploadBody>,
) -> ApiResult {
    let counts = upload_and_announce(
        &state,
        &auth.user_id,
        &auth.device_id,
        body.device_keys.as_ref(),
        &body.one_time_keys,
        &body.fallback_keys,
    )?;
    Ok(Json(json!({"one_time_key_counts": counts})))
}

/// Stores a device's uploaded keys; new device keys are news for the servers that share a
/// room with the user (`m.device_list_update`). Returns the one-time key counts.
pub(crate) fn upload_and_announce(
    state: &AppState,
    user_id: &UserId,
    device_id: &ruma::DeviceId,
    device_keys: Option<&Value>,
    one_time_keys: &Map<String, Value>,
    fallback_keys: &Map<String, Value>,
) -> Result<BTreeMap<String, u64>, ApiError> {
    let before = state.e2ee.device_list_stream_id(user_id)?;
    let counts =
        state.e2ee.upload_keys(user_id, device_id, device_keys, one_time_keys, fallback_keys)?;
    let after = state.e2ee.device_list_stream_id(user_id)?;
    if after != before {
        crate::edus::send_device_list_update(
            &state.rooms,
            user_id,
            device_id.as_str(),
            after,
            device_keys,
            false,
        )?;
    }
    Ok(counts)
}

#[derive(Deserialize)]
struct QueryBody {
    device_keys: BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>,
    #[serde(default)]
    timeout: Option<Value>,
}

fn is_local(state: &AppState, user_id: &UserId) -> bool {
    user_id.server_name() == state.accounts.server_name()
}

/// The `timeout` of `keys/query` and `keys/claim`: how long to wait for other servers, in
/// milliseconds. Anything but a non-negative integer means the default.
fn remote_timeout(timeout: Option<&Value>) -> Duration {
    timeout.and_then(Value::as_u64).map_or(remote::DEFAULT_TIMEOUT, Duration::from_millis)
}

/// Display names of the user's devices, by device id.
pub(crate) fn device_names(
    state: &AppState,
    user_id: &UserId,
) -> Result<BTreeMap<String, Option<String>>, ApiError> {
    Ok(state
        .accounts
        .devices(user_id)?
        .into_iter()
        .map(|device| (device.device_id.to_string(), device.display_name))
        .collect())
}

/// `POST /_matrix/client/v3/keys/query`
///
/// Users of other servers: their servers are asked (see [`remote::query_keys`]) and their
/// answers merged in; servers that fail are listed in `failures`.
async fn query_keys(
    State(state): State<AppState>,
    auth: Auth,
    Body(body): Body<QueryBody>,
) -> ApiResult {
    let mut device_keys = Map::new();
    let mut master_keys = Map::new();
    let mut self_signing_keys = Map::new();
    let mut user_signing_keys = Map::new();
    let (local, remote): (BTreeMap<_, _>, BTreeMap<_, _>) =
        body.device_keys.into_iter().partition(|(user_id, _)| is_local(&state, user_id));
    for (user_id, wanted) in &local {
        let names = device_names(&state, user_id)?;
        let devices = state.e2ee.device_keys_for_query(user_id, wanted, &names)?;
        device_keys.insert(user_id.to_string(), Value::Object(devices));
        let mut sections = vec![
            (CrossSigningKind::Master, &mut master_keys),
            (CrossSigningKind::SelfSigning, &mut self_signing_keys),
        ];
        // The user-signing key is only ever shown to its owner.
        if *user_id == auth.user_id {
            sections.push((CrossSigningKind::UserSigning, &mut user_signing_keys));
        }
        for (kind, section) in sections {
            if let Some(key) = state.e2ee.cross_signing_key(user_id, kind)? {
                section.insert(user_id.to_string(), key);
            }
        }
    }
    let mut failures = Map::new();
    if !remote.is_empty() {
        let timeout = remote_timeout(body.timeout.as_ref());
        let answers = remote::query_keys(&state.federation, remote, timeout).await;
        device_keys.extend(answers.device_keys);
        master_keys.extend(answers.master_keys);
        self_signing_keys.extend(answers.self_signing_keys);
        failures = answers.failures;
    }
    Ok(Json(json!({
        "device_keys": device_keys,
        "master_keys": master_keys,
        "self_signing_keys": self_signing_keys,
        "user_signing_keys": user_signing_keys,
        "failures": failures,
    })))
}

#[derive(Deserialize)]
struct ClaimBody {
    one_time_keys: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, String>>,
    #[serde(default)]
    timeout: Option<Value>,
}

/// `POST /_matrix/client/v3/keys/claim`
///
/// Keys of other servers' users are claimed from their servers (see [`remote::claim_keys`]);
/// servers that fail are listed in `failures`.
async fn claim_keys(
    State(state): State<AppState>,
    _auth: Auth,
    Body(body): Body<ClaimBody>,
) -> ApiResult {
    let (local, remote): (BTreeMap<_, _>, BTreeMap<_, _>) =
        body.one_time_keys.into_iter().partition(|(user_id, _)| is_local(&state, user_id));
    let mut wanted = Vec::new();
    for (user_id, devices) in local {
        for (device_id, algorithm) in devices {
            wanted.push((user_id.clone(), device_id, algorithm));
        }
    }
    let mut one_time_keys = claimed_keys_json(state.e2ee.claim_keys(&wanted)?);
    let mut failures = Map::new();
    if !remote.is_empty() {
        let timeout = remote_timeout(body.timeout.as_ref());
        let answers = remote::claim_keys(&state.federation, remote, timeout).await;
        one_time_keys.extend(answers.one_time_keys);
        failures = answers.failures;
    }
    Ok(Json(json!({"one_time_keys": one_time_keys, "failures": failures})))
}

/// Claimed keys as `keys/claim` answers them: user -> device -> `algorithm:key_id` -> key.
pub(crate) fn claimed_keys_json(claimed: Vec<ClaimedKey>) -> Map<String, Value> {
    let mut one_time_keys: BTreeMap<String, BTreeMap<String, Map<String, Value>>> = BTreeMap::new();
    for claimed in claimed {
        one_time_keys
            .entry(claimed.user_id.to_string())
            .or_default()
            .entry(claimed.device_id.to_string())
            .or_default()
            .insert(claimed.key_id, claimed.key);
    }
    one_time_keys.into_iter().map(|(user_id, devices)| (user_id, json!(devices))).collect()
}

#[derive(Deserialize)]
struct ChangesQuery {
    from: String,
    to: String,
}

/// `GET /_matrix/client/v3/keys/changes`
async fn get_key_changes(
    State(state): State<AppState>,
    auth: Auth,
    Query(query): Query<ChangesQuery>,
) -> ApiResult {
    let from = parse_token(&query.from).ok_or_else(|| ApiError::invalid_param("Invalid from"))?;
    let to = parse_token(&query.to).ok_or_else(|| ApiError::invalid_param("Invalid to"))?;
    let mut changed = Vec::new();
    for user_id in state.e2ee.changed_users(from, to)? {
        if state.rooms.share_a_room(&auth.user_id, &user_id)? {
            changed.push(user_id);
        }
    }
    Ok(Json(json!({"changed": changed, "left": []})))
}

#[derive(Deserialize)]
struct CrossSigningBody {
    master_key: Option<Value>,
    self_signing_key: Option<Value>,
    user_signing_key: Option<Value>,
    auth: Option<Value>,
}

/// `POST /_matrix/client/v3/keys/device_signing/upload`
///
/// User-interactive auth, except for the first upload (the spec allows that while the user
/// has no cross-signing keys, so a fresh client can bootstrap without a password) and for a
/// retry that uploads exactly the stored keys, which changes nothing.
async fn upload_cross_signing_keys(
    State(state): State<AppState>,
    auth: Auth,
    Body(body): Body<CrossSigningBody>,
) -> ApiResult {
    let uploaded: Vec<(CrossSigningKind, Value)> = [
        (CrossSigningKind::Master, body.master_key),
        (CrossSigningKind::SelfSigning, body.self_signing_key),
        (CrossSigningKind::UserSigning, body.user_signing_key),
    ]
    .into_iter()
    .filter_map(|(kind, key)| key.map(|key| (kind, key)))
    .collect();
    if state.e2ee.has_cross_signing_keys(&auth.user_id)? {
        if state.e2ee.cross_signing_keys_unchanged(&auth.user_id, &uploaded)? {
            return Ok(Json(json!({})));
        }
        state
            .uia
            .check(body.auth.as_ref(), &[&["m.login.password"]], password_stage(&state, &auth))
            .await?;
    }
    state.e2ee.upload_cross_signing_keys(&auth.user_id, &uploaded)?;
    let uploaded_key = |kind: CrossSigningKind| {
        uploaded.iter().find(|(uploaded_kind, _)| *uploaded_kind == kind).map(|(_, key)| key)
    };
    crate::edus::send_signing_key_update(
        &state.rooms,
        &auth.user_id,
        uploaded_key(CrossSigningKind::Master),
        uploaded_key(CrossSigningKind::SelfSigning),
    )?;
    Ok(Json(json!({})))
}

/// `POST /_matrix/client/v3/keys/signatures/upload`
async fn upload_signatures(
    State(state): State<AppState>,
    auth: Auth,
    Body(body): Body<BTreeMap<OwnedUserId, Map<String, Value>>>,
) -> ApiResult {
    let (local, remote): (BTreeMap<_, _>, BTreeMap<_, _>) =
        body.into_iter().partition(|(user_id, _)| is_local(&state, user_id));
    for user_id in remote.keys() {
        tracing::warn!(%user_id, "signatures for a remote user are not supported yet");
    }
    let failures = state.e2ee.upload_signatures(&auth.user_id, &local)?;
    let failures: BTreeMap<String, BTreeMap<String, Value>> = failures
        .into_iter()
        .map(|(user_id, keys)| {
            let keys = keys
                .into_iter()
                .map(|(key_id, failure)| (key_id, signature_failure(failure)))
                .collect();
            (user_id, keys)
        })
        .collect();
    Ok(Json(json!({"failures": failures})))
}
