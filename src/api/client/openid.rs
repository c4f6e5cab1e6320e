//! OpenID: a token with which a user proves its Matrix identity to a third party, which checks
//! it with this server's `openid/userinfo` (in `api/federation/openid.rs`).
//!
//! [OpenID](https://spec.matrix.org/v1.16/client-server-api/#openid)

use axum::{Json, Router, extract::State, routing::post};
use ruma::OwnedUserId;
use serde_json::{Map, Value, json};

use crate::{
    accounts::OPENID_TOKEN_LIFETIME_S,
    api::{
        AppState,
        error::{ApiError, ApiResult},
        extract::{Auth, Body, PathIds},
    },
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/v3/user/{userId}/openid/request_token", post(request_token))
}

/// `POST /_matrix/client/v3/user/{userId}/openid/request_token`: only for oneself. The body is
/// an object reserved for future use.
async fn request_token(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(_body): Body<Map<String, Value>>,
) -> ApiResult {
    let user_id: OwnedUserId = path.id("userId")?;
    if user_id != auth.user_id {
        return Err(ApiError::forbidden("Cannot request an OpenID token for another user"));
    }
    let access_token = state.accounts.create_openid_token(&user_id)?;
    Ok(Json(json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "matrix_server_name": state.config.server_name,
        "expires_in": OPENID_TOKEN_LIFETIME_S,
    })))
}
