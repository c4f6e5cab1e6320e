//! `/sync` and filters.
//!
//! [Syncing](https://spec.matrix.org/v1.16/client-server-api/#syncing),
//! [filtering](https://spec.matrix.org/v1.16/client-server-api/#filtering)

use std::time::Duration;

use axum::{
    Json, Router,
    extract::State,
    routing::{get, post},
};
use ruma::OwnedUserId;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    api::{
        AppState,
        error::{ApiError, ApiResult},
        extract::{Auth, Body, PathIds, Query},
    },
    filter::Filter,
    sync::{SyncRequest, parse_sync_token, sync},
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/v3/sync", get(sync_events))
        .route("/_matrix/client/v3/user/{userId}/filter", post(create_filter))
        .route("/_matrix/client/v3/user/{userId}/filter/{filterId}", get(get_filter))
}

#[derive(Deserialize)]
struct SyncQuery {
    filter: Option<String>,
    since: Option<String>,
    #[serde(default)]
    full_state: Option<String>,
    set_presence: Option<String>,
    timeout: Option<String>,
    use_state_after: Option<String>,
}

/// Resolves the `filter` parameter: a stored filter id or inline JSON.
pub fn resolve_filter(
    state: &AppState,
    auth: &Auth,
    filter: Option<&str>,
) -> Result<Filter, ApiError> {
    let Some(filter) = filter.filter(|filter| !filter.is_empty()) else {
        return Ok(Filter::default());
    };
    let value: Value = if filter.trim_start().starts_with('{') {
        serde_json::from_str(filter)
            .map_err(|error| ApiError::not_json(format!("Invalid filter JSON: {error}")))?
    } else {
        state
            .accounts
            .filter(&auth.user_id, filter)?
            .ok_or_else(|| ApiError::not_found("No such filter").with("errcode", "M_NOT_FOUND"))?
    };
    serde_json::from_value(value)
        .map_err(|error| ApiError::bad_json(format!("Invalid filter: {error}")))
}

/// `GET /_matrix/client/v3/sync`
async fn sync_events(
    State(state): State<AppState>,
    auth: Auth,
    Query(query): Query<SyncQuery>,
) -> ApiResult {
    let filter = resolve_filter(&state, &auth, query.filter.as_deref())?;
    let (since, to_device_cursor) = match query.since.as_deref() {
        Some(since) => {
            let (position, cursor) = parse_sync_token(since)
                .ok_or_else(|| ApiError::invalid_param("Invalid since token"))?;
            (Some(position), cursor)
        }
        None => (None, None),
    };
    let timeout_ms: u64 = match query.timeout.as_deref() {
        Some(timeout) => timeout.parse().map_err(|_| ApiError::invalid_param("Invalid timeout"))?,
        None => 0,
    };
    let full_state = match query.full_state.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::invalid_param("full_state must be true or false")),
    };
    let presence = query.set_presence.as_deref().unwrap_or("online");
    if !matches!(presence, "online" | "offline" | "unavailable") {
        return Err(ApiError::invalid_param("Invalid set_presence"));
    }
    if presence != "offline"
        && state
            .ephemeral
            .presence(&auth.user_id)?
            .is_none_or(|current| current.presence != presence)
    {
        state.ephemeral.set_presence(&auth.user_id, presence, None)?;
    }
    let timeout = Duration::from_millis(timeout_ms.min(state.config.sync_timeout_max_ms));
    let use_state_after = match query.use_state_after.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::invalid_param("use_state_after must be true or false")),
    };
    let request =
        SyncRequest { filter, since, to_device_cursor, full_state, timeout, use_state_after };
    let response = sync(&state, &auth, request).await?;
    Ok(Json(response))
}

fn own_user(auth: &Auth, path: &PathIds) -> Result<OwnedUserId, ApiError> {
    let user_id: OwnedUserId = path.id("userId")?;
    if user_id != auth.user_id {
        return Err(ApiError::forbidden("Cannot use filters of other users"));
    }
    Ok(user_id)
}

/// `POST /_matrix/client/v3/user/{userId}/filter`
async fn create_filter(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<Value>,
) -> ApiResult {
    let user_id = own_user(&auth, &path)?;
    let filter: Filter = serde_json::from_value(body.clone())
        .map_err(|error| ApiError::bad_json(format!("Invalid filter: {error}")))?;
    let _ = filter;
    let filter_id = state.accounts.create_filter(&user_id, &body)?;
    Ok(Json(json!({"filter_id": filter_id})))
}

/// `GET /_matrix/client/v3/user/{userId}/filter/{filterId}`
async fn get_filter(State(state): State<AppState>, auth: Auth, path: PathIds) -> ApiResult {
    let user_id = own_user(&auth, &path)?;
    let filter = state
        .accounts
        .filter(&user_id, path.get("filterId")?)?
        .ok_or_else(|| ApiError::not_found("No such filter"))?;
    Ok(Json(filter))
}
