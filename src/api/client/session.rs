//! Login and logout.
//!
//! [Login](https://spec.matrix.org/v1.16/client-server-api/#login)

use axum::{
    Json, Router,
    extract::State,
    routing::{get, post},
};
use ruma::OwnedDeviceId;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{Auth, Body},
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/v3/login", get(login_flows).post(login))
        .route("/_matrix/client/v3/logout", post(logout))
        .route("/_matrix/client/v3/logout/all", post(logout_all))
}

/// `GET /_matrix/client/v3/login`
async fn login_flows() -> Json<Value> {
    Json(json!({"flows": [{"type": "m.login.password"}]}))
}

#[derive(Deserialize)]
struct LoginBody {
    #[serde(rename = "type")]
    kind: String,
    identifier: Option<Value>,
    user: Option<String>,
    password: Option<String>,
    device_id: Option<OwnedDeviceId>,
    initial_device_display_name: Option<String>,
}

/// `POST /_matrix/client/v3/login`
async fn login(State(state): State<AppState>, Body(body): Body<LoginBody>) -> ApiResult {
    if body.kind != "m.login.password" {
        return Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            "Unknown login type",
        ));
    }
    let user = match &body.identifier {
        Some(identifier) => {
            if identifier.get("type").and_then(Value::as_str) != Some("m.id.user") {
                return Err(ApiError::new(
                    axum::http::StatusCode::BAD_REQUEST,
                    "M_UNKNOWN",
                    "Only m.id.user identifiers are supported",
                ));
            }
            identifier.get("user").and_then(Value::as_str).map(str::to_owned)
        }
        None => body.user.clone(),
    };
    let user = user.ok_or_else(|| ApiError::missing_param("Missing user identifier"))?;
    let password =
        body.password.as_deref().ok_or_else(|| ApiError::missing_param("Missing password"))?;
    let forbidden = || ApiError::forbidden("Invalid username or password");
    let user_id = state.accounts.parse_user(&user).ok_or_else(forbidden)?;
    let account = state.accounts.account(&user_id)?.ok_or_else(forbidden)?;
    if account.deactivated {
        return Err(ApiError::user_deactivated());
    }
    if !state.accounts.check_password(&user_id, password).await? {
        return Err(forbidden());
    }
    let (device_id, access_token) =
        state.accounts.create_device(&user_id, body.device_id, body.initial_device_display_name)?;
    tracing::info!(%user_id, %device_id, "logged in");
    Ok(Json(json!({
        "user_id": user_id,
        "access_token": access_token,
        "device_id": device_id,
        "home_server": state.config.server_name,
    })))
}

/// `POST /_matrix/client/v3/logout`
async fn logout(State(state): State<AppState>, auth: Auth) -> ApiResult {
    state.accounts.delete_device(&auth.user_id, auth.device_id.as_str())?;
    crate::api::client::device::forget_devices(
        &state,
        &auth.user_id,
        std::slice::from_ref(&auth.device_id),
    )?;
    Ok(Json(json!({})))
}

/// `POST /_matrix/client/v3/logout/all`
async fn logout_all(State(state): State<AppState>, auth: Auth) -> ApiResult {
    let devices: Vec<_> =
        state.accounts.devices(&auth.user_id)?.into_iter().map(|device| device.device_id).collect();
    state.accounts.delete_all_devices(&auth.user_id, None)?;
    crate::api::client::device::forget_devices(&state, &auth.user_id, &devices)?;
    Ok(Json(json!({})))
}
