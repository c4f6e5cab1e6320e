//! Push rules: the server-default ruleset, with the user's changes kept as `m.push_rules`
//! account data.
//!
//! [Push rules](https://spec.matrix.org/v1.16/client-server-api/#push-rules)

use axum::{Json, Router, extract::State, routing::get};
use ruma::push::Ruleset;
use serde_json::{Value, json};

use crate::api::{
    AppState,
    error::{ApiError, ApiResult},
    extract::Auth,
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/v3/pushrules/", get(get_push_rules))
        .route("/_matrix/client/v3/pushrules", get(get_push_rules))
        .route("/_matrix/client/v3/pushrules/global/", get(get_global_rules))
}

/// The user's ruleset: stored, or the server default.
pub fn ruleset(state: &AppState, auth: &Auth) -> Result<Value, ApiError> {
    if let Some(stored) = state.account_data.get(&auth.user_id, None, "m.push_rules")?
        && stored.get("global").is_some()
    {
        return Ok(stored["global"].clone());
    }
    serde_json::to_value(Ruleset::server_default(&auth.user_id)).map_err(ApiError::internal)
}

/// `GET /_matrix/client/v3/pushrules/`
async fn get_push_rules(State(state): State<AppState>, auth: Auth) -> ApiResult {
    Ok(Json(json!({"global": ruleset(&state, &auth)?})))
}

/// `GET /_matrix/client/v3/pushrules/global/`
async fn get_global_rules(State(state): State<AppState>, auth: Auth) -> ApiResult {
    Ok(Json(ruleset(&state, &auth)?))
}
