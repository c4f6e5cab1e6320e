//! Profiles: display name and avatar, carried into the user's rooms as member events.
//!
//! [Profiles](https://spec.matrix.org/v1.16/client-server-api/#profiles)

use axum::{Json, Router, extract::State, routing::get};
use ruma::OwnedUserId;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{Auth, Body, PathIds},
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new().route("/_matrix/client/v3/profile/{userId}", get(get_profile)).route(
        "/_matrix/client/v3/profile/{userId}/{keyName}",
        get(get_profile_field).put(set_profile_field),
    )
}

fn profile_of(state: &AppState, path: &PathIds) -> Result<(OwnedUserId, Value), ApiError> {
    let user_id: OwnedUserId = path.id("userId")?;
    let account = state
        .accounts
        .account(&user_id)?
        .filter(|account| !account.deactivated)
        .ok_or_else(|| ApiError::not_found("Profile was not found"))?;
    let mut profile = json!({});
    if let Some(displayname) = account.displayname {
        profile["displayname"] = json!(displayname);
    }
    if let Some(avatar_url) = account.avatar_url {
        profile["avatar_url"] = json!(avatar_url);
    }
    Ok((user_id, profile))
}

/// `GET /_matrix/client/v3/profile/{userId}`
async fn get_profile(State(state): State<AppState>, path: PathIds) -> ApiResult {
    Ok(Json(profile_of(&state, &path)?.1))
}

/// `GET /_matrix/client/v3/profile/{userId}/{keyName}`
async fn get_profile_field(State(state): State<AppState>, path: PathIds) -> ApiResult {
    let (_, profile) = profile_of(&state, &path)?;
    let key = path.get("keyName")?;
    match profile.get(key) {
        Some(value) => Ok(Json(json!({ key: value }))),
        None => Err(ApiError::not_found("Profile field not set")),
    }
}

#[derive(Deserialize)]
#[serde(transparent)]
struct FieldBody(serde_json::Map<String, Value>);

/// `PUT /_matrix/client/v3/profile/{userId}/{keyName}`
async fn set_profile_field(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<FieldBody>,
) -> ApiResult {
    let user_id: OwnedUserId = path.id("userId")?;
    if user_id != auth.user_id {
        return Err(ApiError::forbidden("Cannot change another user's profile"));
    }
    let key = path.get("keyName")?;
    let value = match body.0.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.clone()),
        Some(_) => return Err(ApiError::bad_json(format!("{key} must be a string"))),
    };
    if value.as_ref().is_some_and(|text| text.len() > 256) {
        return Err(ApiError::bad_json(format!("{key} is too long")));
    }
    let mut account =
        state.accounts.account(&user_id)?.ok_or_else(|| ApiError::not_found("Unknown user"))?;
    match key {
        "displayname" => account.displayname = value,
        "avatar_url" => {
            if value.as_ref().is_some_and(|url| !url.starts_with("mxc://"))
                && value.as_deref() != Some("")
            {
                return Err(ApiError::bad_json("avatar_url must be an mxc:// URI"));
            }
            account.avatar_url = value.filter(|url| !url.is_empty());
        }
        _ => return Err(ApiError::bad_json("Only displayname and avatar_url can be set")),
    }
    state.accounts.put_account(&user_id, &account)?;
    state
        .rooms
        .update_profile_in_rooms(&user_id, (account.displayname, account.avatar_url))
        .await?;
    Ok(Json(json!({})))
}
