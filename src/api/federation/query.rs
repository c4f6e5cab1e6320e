//! Queries peers make about our users: `query/profile`.
//!
//! [Query types](https://spec.matrix.org/v1.16/server-server-api/#query-types)

use axum::{Json, Router, extract::State, routing::get};
use ruma::OwnedUserId;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::{
    accounts::Accounts,
    api::{
        AppState,
        error::{ApiError, ApiResult},
        extract::{Query, parse_id},
        federation::XMatrixOrigin,
    },
};

/// Routes of this module (all behind the X-Matrix check).
pub fn routes() -> Router<AppState> {
    Router::new().route("/_matrix/federation/v1/query/profile", get(query_profile))
}

#[derive(Deserialize)]
struct ProfileQuery {
    user_id: String,
    #[serde(default)]
    field: Option<String>,
}

/// `GET /_matrix/federation/v1/query/profile`
async fn query_profile(
    State(accounts): State<Accounts>,
    XMatrixOrigin(origin): XMatrixOrigin,
    Query(query): Query<ProfileQuery>,
) -> ApiResult {
    let user_id: OwnedUserId = parse_id(&query.user_id, "user_id")?;
    tracing::debug!(%origin, %user_id, "profile query");
    let account = accounts
        .account(&user_id)?
        .filter(|account| !account.deactivated)
        .ok_or_else(|| ApiError::not_found("Profile was not found"))?;
    let mut profile = Map::new();
    let wanted = |name: &str| query.field.as_deref().is_none_or(|field| field == name);
    if let Some(displayname) = account.displayname.filter(|_| wanted("displayname")) {
        profile.insert("displayname".into(), json!(displayname));
    }
    if let Some(avatar_url) = account.avatar_url.filter(|_| wanted("avatar_url")) {
        profile.insert("avatar_url".into(), json!(avatar_url));
    }
    Ok(Json(Value::Object(profile)))
}
