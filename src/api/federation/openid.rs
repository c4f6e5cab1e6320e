//! `openid/userinfo`: a third party (not necessarily a homeserver) checks an OpenID token a
//! user gave it. The spec authenticates this endpoint with the token alone, so it sits outside
//! the X-Matrix check, like `version`.
//!
//! [OpenID](https://spec.matrix.org/v1.16/server-server-api/#openid)

use axum::{Json, Router, extract::State, routing::get};
use serde::Deserialize;
use serde_json::json;

use crate::{
    accounts::Accounts,
    api::{
        AppState,
        error::{ApiError, ApiResult},
        extract::Query,
    },
};

/// Routes of this module: NOT behind the X-Matrix check.
pub fn routes() -> Router<AppState> {
    Router::new().route("/_matrix/federation/v1/openid/userinfo", get(userinfo))
}

#[derive(Deserialize)]
struct UserinfoQuery {
    access_token: Option<String>,
}

/// `GET /_matrix/federation/v1/openid/userinfo?access_token=...`
async fn userinfo(
    State(accounts): State<Accounts>,
    Query(query): Query<UserinfoQuery>,
) -> ApiResult {
    let token = query.access_token.ok_or_else(ApiError::unknown_token)?;
    let user_id = accounts.openid_token_user(&token)?.ok_or_else(ApiError::unknown_token)?;
    Ok(Json(json!({"sub": user_id})))
}
