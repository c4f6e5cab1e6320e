//! Dehydrated devices ([MSC3814](https://github.com/matrix-org/matrix-spec-proposals/pull/3814),
//! under its unstable prefix `org.matrix.msc3814.v1`): a device a client uploads with its keys
//! and its own encrypted private state, which receives room keys while the user has no
//! device logged in; a later login reads them through the events endpoint and then replaces
//! the device.
//!
//! Each user has at most one. It is a device like any other for key queries, claims and
//! to-device messages, but it has no access token.

use axum::{
    Json, Router,
    extract::State,
    routing::{get, post},
};
use ruma::OwnedDeviceId;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::device::forget_devices;
use crate::{
    api::{
        AppState,
        error::{ApiError, ApiResult},
        extract::{Auth, Body, PathIds},
    },
    e2ee::DehydratedDevice,
};

const PREFIX: &str = "/_matrix/client/unstable/org.matrix.msc3814.v1";

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            &format!("{PREFIX}/dehydrated_device"),
            get(get_dehydrated_device).put(put_dehydrated_device).delete(delete_dehydrated_device),
        )
        .route(&format!("{PREFIX}/dehydrated_device/{{deviceId}}/events"), post(events))
}

#[derive(Deserialize)]
struct PutBody {
    device_id: OwnedDeviceId,
    device_data: Map<String, Value>,
    initial_device_display_name: Option<String>,
    device_keys: Map<String, Value>,
    #[serde(default)]
    one_time_keys: Map<String, Value>,
    #[serde(default)]
    fallback_keys: Map<String, Value>,
}

/// The user's dehydrated device, if it still exists as a device (deleting it through
/// `/devices` ends it too).
fn current(state: &AppState, auth: &Auth) -> Result<Option<DehydratedDevice>, ApiError> {
    let Some(dehydrated) = state.e2ee.dehydrated_device(&auth.user_id)? else { return Ok(None) };
    if state.accounts.device(&auth.user_id, dehydrated.device_id.as_str())?.is_none() {
        return Ok(None);
    }
    Ok(Some(dehydrated))
}

/// Deletes the user's dehydrated device (keys, inbox, the device) and its record.
fn remove(state: &AppState, auth: &Auth, dehydrated: &DehydratedDevice) -> Result<(), ApiError> {
    match state.accounts.delete_device(&auth.user_id, dehydrated.device_id.as_str()) {
        Ok(()) | Err(crate::accounts::AccountError::UnknownDevice) => {}
        Err(error) => return Err(error.into()),
    }
    forget_devices(state, &auth.user_id, std::slice::from_ref(&dehydrated.device_id))?;
    state.e2ee.remove_dehydrated_device(&auth.user_id)?;
    Ok(())
}

/// `PUT /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device`: sets the user's
/// dehydrated device with its keys, replacing any earlier one.
async fn put_dehydrated_device(
    State(state): State<AppState>,
    auth: Auth,
    Body(body): Body<PutBody>,
) -> ApiResult {
    if !body.device_data.get("algorithm").is_some_and(Value::is_string) {
        return Err(ApiError::invalid_param("device_data needs an algorithm"));
    }
    if body.device_keys.get("user_id").and_then(Value::as_str) != Some(auth.user_id.as_str())
        || body.device_keys.get("device_id").and_then(Value::as_str)
            != Some(body.device_id.as_str())
    {
        return Err(ApiError::invalid_param("device_keys must name the user and the device"));
    }
    let previous = current(&state, &auth)?;
    let replaces_itself =
        previous.as_ref().is_some_and(|previous| previous.device_id == body.device_id);
    if !replaces_itself && state.accounts.device(&auth.user_id, body.device_id.as_str())?.is_some()
    {
        return Err(ApiError::invalid_param("A device of the user already has this id"));
    }
    if let Some(previous) = &previous {
        remove(&state, &auth, previous)?;
    }
    state.accounts.create_device_without_login(
        &auth.user_id,
        &body.device_id,
        body.initial_device_display_name,
    )?;
    let device_keys = Value::Object(body.device_keys);
    super::keys::upload_and_announce(
        &state,
        &auth.user_id,
        &body.device_id,
        Some(&device_keys),
        &body.one_time_keys,
        &body.fallback_keys,
    )?;
    let dehydrated = DehydratedDevice {
        device_id: body.device_id.clone(),
        device_data: Value::Object(body.device_data),
    };
    state.e2ee.set_dehydrated_device(&auth.user_id, &dehydrated)?;
    Ok(Json(json!({"device_id": body.device_id})))
}

/// `GET /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device`
async fn get_dehydrated_device(State(state): State<AppState>, auth: Auth) -> ApiResult {
    let dehydrated =
        current(&state, &auth)?.ok_or_else(|| ApiError::not_found("No dehydrated device"))?;
    Ok(Json(json!({"device_id": dehydrated.device_id, "device_data": dehydrated.device_data})))
}

/// `DELETE /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device`
async fn delete_dehydrated_device(State(state): State<AppState>, auth: Auth) -> ApiResult {
    let dehydrated =
        current(&state, &auth)?.ok_or_else(|| ApiError::not_found("No dehydrated device"))?;
    remove(&state, &auth, &dehydrated)?;
    Ok(Json(json!({"device_id": dehydrated.device_id})))
}

#[derive(Deserialize, Default)]
struct EventsBody {
    next_batch: Option<String>,
}

/// A page token: `<position>_<index>` of the last message of the page.
fn parse_batch(token: &str) -> Option<(u64, u64)> {
    let (position, index) = token.split_once('_')?;
    Some((position.parse().ok()?, index.parse().ok()?))
}

/// `POST /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device/{deviceId}/events`:
/// the dehydrated device's to-device messages, a page at a time; an empty page (with the same
/// token) means there are no more.
async fn events(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<EventsBody>,
) -> ApiResult {
    let device_id = path.get("deviceId")?;
    let dehydrated = current(&state, &auth)?;
    let Some(dehydrated) = dehydrated.filter(|device| device.device_id.as_str() == device_id)
    else {
        return Err(ApiError::forbidden("Not the user's dehydrated device"));
    };
    let after = match body.next_batch.as_deref() {
        None => None,
        Some(token) => {
            Some(parse_batch(token).ok_or_else(|| ApiError::invalid_param("Unknown next_batch"))?)
        }
    };
    let (events, last) = state.e2ee.to_device_page(&auth.user_id, &dehydrated.device_id, after)?;
    let next_batch = match last {
        Some((position, index)) => format!("{position}_{index}"),
        None => "0_0".to_owned(),
    };
    Ok(Json(json!({"events": events, "next_batch": next_batch})))
}
