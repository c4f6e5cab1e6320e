//! Device management.
//!
//! [Device management](https://spec.matrix.org/v1.16/client-server-api/#device-management)

use axum::{
    Json, Router,
    extract::State,
    routing::{get, post},
};
use ruma::{OwnedDeviceId, UserId};
use serde::Deserialize;
use serde_json::{Value, json};

use super::account::password_stage;
use crate::{
    accounts::Device,
    api::{
        AppState,
        error::{ApiError, ApiResult},
        extract::{Auth, Body, PathIds},
    },
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/v3/devices", get(get_devices))
        .route(
            "/_matrix/client/v3/devices/{deviceId}",
            get(get_device).put(update_device).delete(delete_device),
        )
        .route("/_matrix/client/v3/delete_devices", post(delete_devices))
}

fn device_json(device: &Device) -> Value {
    json!({
        "device_id": device.device_id,
        "display_name": device.display_name,
        "last_seen_ts": device.last_seen_ts,
    })
}

/// `GET /_matrix/client/v3/devices`
async fn get_devices(State(state): State<AppState>, auth: Auth) -> ApiResult {
    let devices: Vec<Value> =
        state.accounts.devices(&auth.user_id)?.iter().map(device_json).collect();
    Ok(Json(json!({"devices": devices})))
}

/// `GET /_matrix/client/v3/devices/{deviceId}`
async fn get_device(State(state): State<AppState>, auth: Auth, path: PathIds) -> ApiResult {
    let device = state
        .accounts
        .device(&auth.user_id, path.get("deviceId")?)?
        .ok_or_else(|| ApiError::not_found("Unknown device"))?;
    Ok(Json(device_json(&device)))
}

#[derive(Deserialize)]
struct UpdateBody {
    display_name: Option<String>,
}

/// `PUT /_matrix/client/v3/devices/{deviceId}`
async fn update_device(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<UpdateBody>,
) -> ApiResult {
    state.accounts.rename_device(&auth.user_id, path.get("deviceId")?, body.display_name)?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct DeleteBody {
    auth: Option<Value>,
}

/// `DELETE /_matrix/client/v3/devices/{deviceId}`
async fn delete_device(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<DeleteBody>,
) -> ApiResult {
    let device_id = path.get("deviceId")?;
    if state.accounts.device(&auth.user_id, device_id)?.is_none() {
        return Err(ApiError::not_found("Unknown device"));
    }
    state
        .uia
        .check(body.auth.as_ref(), &[&["m.login.password"]], password_stage(&state, &auth))
        .await?;
    state.accounts.delete_device(&auth.user_id, device_id)?;
    forget_devices(&state, &auth.user_id, &[device_id.into()])?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct DeleteManyBody {
    devices: Vec<String>,
    auth: Option<Value>,
}

/// `POST /_matrix/client/v3/delete_devices`
async fn delete_devices(
    State(state): State<AppState>,
    auth: Auth,
    Body(body): Body<DeleteManyBody>,
) -> ApiResult {
    state
        .uia
        .check(body.auth.as_ref(), &[&["m.login.password"]], password_stage(&state, &auth))
        .await?;
    let mut deleted = Vec::new();
    for device_id in &body.devices {
        match state.accounts.delete_device(&auth.user_id, device_id) {
            Ok(()) => deleted.push(device_id.as_str().into()),
            Err(crate::accounts::AccountError::UnknownDevice) => {}
            Err(error) => return Err(error.into()),
        }
    }
    forget_devices(&state, &auth.user_id, &deleted)?;
    Ok(Json(json!({})))
}

/// Forgets deleted devices' keys and to-device queues, and tells the servers that share a room
/// with the user that they are gone.
pub(crate) fn forget_devices(
    state: &AppState,
    user_id: &UserId,
    device_ids: &[OwnedDeviceId],
) -> Result<(), ApiError> {
    state.e2ee.delete_devices(user_id, device_ids)?;
    let stream_id = state.e2ee.device_list_stream_id(user_id)?;
    for device_id in device_ids {
        crate::edus::send_device_list_update(
            &state.rooms,
            user_id,
            device_id.as_str(),
            stream_id,
            None,
            true,
        )?;
    }
    Ok(())
}
