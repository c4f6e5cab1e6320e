//! Account registration and management: `register`, `register/available`, `whoami`,
//! `account/password`, `account/deactivate`.
//!
//! [Account registration and management](https://spec.matrix.org/v1.16/client-server-api/#account-registration-and-management)

use axum::{
    Json, Router,
    extract::State,
    routing::{get, post},
};
use ruma::OwnedDeviceId;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    api::{
        AppState,
        error::{ApiError, ApiResult},
        extract::{Auth, Body, Query},
        uia::StageContext,
    },
    config::Registration,
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/v3/register", post(register))
        .route("/_matrix/client/v3/register/available", get(register_available))
        .route(
            "/_matrix/client/v1/register/m.login.registration_token/validity",
            get(registration_token_validity),
        )
        .route("/_matrix/client/v3/account/whoami", get(whoami))
        .route("/_matrix/client/v3/account/password", post(change_password))
        .route("/_matrix/client/v3/account/deactivate", post(deactivate))
}

#[derive(Deserialize)]
struct KindQuery {
    kind: Option<String>,
}

#[derive(Deserialize)]
struct RegisterBody {
    username: Option<String>,
    password: Option<String>,
    device_id: Option<OwnedDeviceId>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    inhibit_login: bool,
    auth: Option<Value>,
}

/// `POST /_matrix/client/v3/register`
async fn register(
    State(state): State<AppState>,
    Query(query): Query<KindQuery>,
    Body(body): Body<RegisterBody>,
) -> ApiResult {
    if query.kind.as_deref() == Some("guest") {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "M_GUEST_ACCESS_FORBIDDEN",
            "Guest access is disabled",
        ));
    }
    let flows: &[&[&str]] = match state.config.registration {
        Registration::Closed => return Err(ApiError::forbidden("Registration has been disabled")),
        Registration::Token => &[&["m.login.registration_token"]],
        Registration::Open => &[&["m.login.dummy"]],
    };
    let localpart = match &body.username {
        Some(username) => username.clone(),
        None => crate::accounts::random_string(12).to_lowercase(),
    };
    let user_id = state.accounts.user_id_for(&localpart)?;
    if state.accounts.exists(&user_id)? {
        return Err(ApiError::user_in_use());
    }
    if let Some(password) = &body.password
        && password.len() > 512
    {
        return Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "M_WEAK_PASSWORD",
            "Password too long",
        ));
    }
    state
        .uia
        .check(
            body.auth.as_ref(),
            flows,
            StageContext {
                user_id: None,
                registration_token: state.config.registration_token.as_deref(),
                accounts: &state.accounts,
            },
        )
        .await?;
    state.accounts.create(&user_id, body.password.as_deref(), false).await?;
    tracing::info!(%user_id, "account registered");
    if body.inhibit_login {
        return Ok(Json(json!({"user_id": user_id, "home_server": state.config.server_name})));
    }
    let (device_id, access_token) =
        state.accounts.create_device(&user_id, body.device_id, body.initial_device_display_name)?;
    Ok(Json(json!({
        "user_id": user_id,
        "access_token": access_token,
        "device_id": device_id,
        "home_server": state.config.server_name,
    })))
}

#[derive(Deserialize)]
struct AvailableQuery {
    username: String,
}

/// `GET /_matrix/client/v3/register/available`
async fn register_available(
    State(state): State<AppState>,
    Query(query): Query<AvailableQuery>,
) -> ApiResult {
    let user_id = state.accounts.user_id_for(&query.username)?;
    if state.accounts.exists(&user_id)? {
        return Err(ApiError::user_in_use());
    }
    Ok(Json(json!({"available": true})))
}

#[derive(Deserialize)]
struct TokenQuery {
    token: String,
}

/// `GET /_matrix/client/v1/register/m.login.registration_token/validity`
async fn registration_token_validity(
    State(state): State<AppState>,
    Query(query): Query<TokenQuery>,
) -> ApiResult {
    if state.config.registration != Registration::Token {
        return Err(ApiError::forbidden("Registration tokens are not in use"));
    }
    Ok(Json(
        json!({"valid": state.config.registration_token.as_deref() == Some(query.token.as_str())}),
    ))
}

/// `GET /_matrix/client/v3/account/whoami`
async fn whoami(auth: Auth) -> ApiResult {
    Ok(Json(json!({"user_id": auth.user_id, "device_id": auth.device_id, "is_guest": false})))
}

#[derive(Deserialize)]
struct PasswordBody {
    new_password: String,
    #[serde(default = "default_true")]
    logout_devices: bool,
    auth: Option<Value>,
}

fn default_true() -> bool {
    true
}

/// `POST /_matrix/client/v3/account/password`
async fn change_password(
    State(state): State<AppState>,
    auth: Auth,
    Body(body): Body<PasswordBody>,
) -> ApiResult {
    state
        .uia
        .check(body.auth.as_ref(), &[&["m.login.password"]], password_stage(&state, &auth))
        .await?;
    state.accounts.set_password(&auth.user_id, &body.new_password).await?;
    if body.logout_devices {
        let others: Vec<_> = state
            .accounts
            .devices(&auth.user_id)?
            .into_iter()
            .map(|device| device.device_id)
            .filter(|device_id| *device_id != auth.device_id)
            .collect();
        state.accounts.delete_all_devices(&auth.user_id, Some(auth.device_id.as_str()))?;
        crate::api::client::device::forget_devices(&state, &auth.user_id, &others)?;
    }
    Ok(Json(json!({})))
}

/// The `m.login.password` stage for the authenticated user.
pub fn password_stage<'a>(state: &'a AppState, auth: &'a Auth) -> StageContext<'a> {
    StageContext {
        user_id: Some(&auth.user_id),
        registration_token: None,
        accounts: &state.accounts,
    }
}

#[derive(Deserialize)]
struct DeactivateBody {
    auth: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    erase: bool,
}

/// `POST /_matrix/client/v3/account/deactivate`
async fn deactivate(
    State(state): State<AppState>,
    auth: Auth,
    Body(body): Body<DeactivateBody>,
) -> ApiResult {
    state
        .uia
        .check(body.auth.as_ref(), &[&["m.login.password"]], password_stage(&state, &auth))
        .await?;
    for room_id in state.rooms.joined_rooms(&auth.user_id)? {
        if let Err(error) = state
            .rooms
            .set_membership(&room_id, &auth.user_id, &auth.user_id, "leave", None, None)
            .await
        {
            tracing::warn!(%room_id, %error, "deactivated user could not leave room");
        }
    }
    let devices: Vec<_> =
        state.accounts.devices(&auth.user_id)?.into_iter().map(|device| device.device_id).collect();
    state.accounts.deactivate(&auth.user_id)?;
    crate::api::client::device::forget_devices(&state, &auth.user_id, &devices)?;
    tracing::info!(user_id = %auth.user_id, "account deactivated");
    Ok(Json(json!({"id_server_unbind_result": "no-support"})))
}
