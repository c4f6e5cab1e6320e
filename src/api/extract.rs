//! Request extractors that fail with Matrix errors: the access token ([`Auth`]), a JSON body
//! ([`Body`]), query strings ([`Query`]) and path parameters ([`PathIds`]).

use std::collections::HashMap;

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{header, request::Parts},
};
use ruma::{OwnedDeviceId, OwnedUserId};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    accounts::Accounts,
    api::{AppState, error::ApiError},
};

/// The authenticated user and device of a request.
#[derive(Clone, Debug)]
pub struct Auth {
    /// Who is calling.
    pub user_id: OwnedUserId,
    /// From which device.
    pub device_id: OwnedDeviceId,
    /// Whether the user is a server admin.
    pub is_admin: bool,
}

/// The access token of a request, from the `Authorization` header or the deprecated
/// `access_token` query parameter.
pub fn access_token(parts: &Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(header::AUTHORIZATION)
        && let Ok(value) = value.to_str()
        && let Some(token) = value.strip_prefix("Bearer ")
    {
        return Some(token.trim().to_owned());
    }
    let query = parts.uri.query()?;
    form_urlencoded_pairs(query).into_iter().find(|(key, _)| key == "access_token").map(|(_, v)| v)
}

fn form_urlencoded_pairs(query: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query).unwrap_or_default()
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = access_token(parts).ok_or_else(ApiError::missing_token)?;
        let accounts: &Accounts = &state.accounts;
        let session = accounts
            .session_for_token(&token)
            .map_err(ApiError::internal)?
            .ok_or_else(ApiError::unknown_token)?;
        Ok(Self {
            user_id: session.user_id,
            device_id: session.device_id,
            is_admin: session.is_admin,
        })
    }
}

/// A JSON body, parsed with Matrix errors: not JSON gives `M_NOT_JSON`, the wrong shape gives
/// `M_BAD_JSON`, too large gives `M_TOO_LARGE`. An empty body counts as `{}`.
pub struct Body<T>(pub T);

impl<T> FromRequest<AppState> for Body<T>
where
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit = state.config.max_request_bytes;
        let bytes = axum::body::to_bytes(request.into_body(), limit)
            .await
            .map_err(|_| ApiError::too_large())?;
        parse_json(&bytes).map(Body)
    }
}

/// Parses a JSON object body into `T`.
pub fn parse_json<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    let value: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
        Value::Object(Default::default())
    } else {
        serde_json::from_slice(bytes)
            .map_err(|error| ApiError::not_json(format!("Content not JSON: {error}")))?
    };
    if !value.is_object() {
        return Err(ApiError::bad_json("Content must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|error| ApiError::bad_json(error.to_string()))
}

/// A query string parsed with `M_INVALID_PARAM` on failure.
pub struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str(query).map(Query).map_err(|error| {
            let text = error.to_string();
            if text.starts_with("missing field") {
                ApiError::missing_param(format!("Missing query parameter: {text}"))
            } else {
                ApiError::invalid_param(format!("Bad query string: {text}"))
            }
        })
    }
}

/// Path parameters as strings; handlers parse the ids they need with [`parse_id`].
pub struct PathIds(pub HashMap<String, String>);

impl<S> FromRequestParts<S> for PathIds
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map(|path| PathIds(path.0))
            .map_err(|error| ApiError::invalid_param(format!("Bad path: {error}")))
    }
}

impl PathIds {
    /// A path parameter parsed into an id type, `M_INVALID_PARAM` when it is not valid.
    pub fn id<T>(&self, name: &str) -> Result<T, ApiError>
    where
        T: TryFrom<String>,
    {
        let raw = self.get(name)?;
        parse_id(raw, name)
    }

    /// A path parameter as text.
    pub fn get(&self, name: &str) -> Result<&str, ApiError> {
        self.0.get(name).map(String::as_str).ok_or_else(|| ApiError::missing_param(name.to_owned()))
    }
}

/// Parses an id, `M_INVALID_PARAM` when it is not valid.
pub fn parse_id<T: TryFrom<String>>(raw: &str, what: &str) -> Result<T, ApiError> {
    T::try_from(raw.to_owned())
        .map_err(|_| ApiError::invalid_param(format!("Invalid {what}: {raw}")))
}
