//! The server-server API, one module per spec section: the routes peers call, and the
//! X-Matrix check that runs before every `/_matrix/federation/*` handler except `version` and
//! `openid/userinfo` (which a third party calls with an OpenID token instead).
//! Handlers never trust a server name they were told: the origin comes from
//! [`XMatrixOrigin`], which only the check provides.
//!
//! [Server-server API](https://spec.matrix.org/v1.16/server-server-api/)

pub mod directory;
pub mod edus;
pub mod events;
pub mod keys;
pub mod membership;
pub mod openid;
pub mod query;
pub mod transactions;
pub mod user;

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Body,
    extract::{FromRequestParts, OriginalUri, Request, State},
    http::{header, request::Parts},
    middleware::{self, Next},
    response::Response,
    routing::get,
};
use ruma::{CanonicalJsonValue, OwnedServerName};
use serde_json::{Value, json};

use crate::api::{
    AppState,
    error::{ApiError, XMatrixError},
};

/// Routes of the server-server API. `state` is needed to build the X-Matrix middleware.
pub fn routes(state: AppState) -> Router<AppState> {
    let authenticated = Router::new()
        .merge(query::routes())
        .merge(transactions::routes())
        .merge(events::routes())
        .merge(membership::routes())
        .merge(user::routes())
        .merge(directory::routes())
        .route_layer(middleware::from_fn_with_state(state, verify_x_matrix));
    Router::new()
        .route("/_matrix/federation/v1/version", get(version))
        .merge(keys::routes())
        .merge(openid::routes())
        .merge(authenticated)
}

/// `GET /_matrix/federation/v1/version`
async fn version() -> Json<Value> {
    Json(json!({"server": {"name": "Hearth", "version": env!("CARGO_PKG_VERSION")}}))
}

/// The origin of a request whose X-Matrix signature has been verified.
#[derive(Clone, Debug)]
pub struct XMatrixOrigin(pub OwnedServerName);

impl<S: Send + Sync> FromRequestParts<S> for XMatrixOrigin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // Only the middleware puts it there: a handler outside the authenticated routes that
        // asks for it gets a refusal rather than an unchecked origin.
        parts
            .extensions
            .get::<XMatrixOrigin>()
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("Request is not signed"))
    }
}

/// The request body as the canonical JSON its X-Matrix signature was checked over (a body
/// that is not canonical JSON cannot carry a valid signature). A handler that takes it, for
/// a body of many PDUs, skips parsing the body a second time.
#[derive(Clone, Debug)]
pub struct SignedContent(Arc<CanonicalJsonValue>);

impl SignedContent {
    /// The body, moved out when this is its only holder (else copied).
    pub fn into_value(self) -> CanonicalJsonValue {
        Arc::try_unwrap(self.0).unwrap_or_else(|shared| (*shared).clone())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for SignedContent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // Taken out, so that the handler holds the only reference. No body: `{}`.
        Ok(parts.extensions.remove::<SignedContent>().unwrap_or_else(|| {
            SignedContent(Arc::new(CanonicalJsonValue::Object(Default::default())))
        }))
    }
}

/// Reads the body (within `max_request_bytes`), verifies the X-Matrix header over method, URI,
/// origin, destination and body with the origin's key, then hands the request on with the
/// verified [`XMatrixOrigin`], the same body, and the body as [`SignedContent`].
async fn verify_x_matrix(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, state.config.max_request_bytes)
        .await
        .map_err(|_| ApiError::too_large())?;
    let uri =
        parts.extensions.get::<OriginalUri>().map(|uri| uri.0.clone()).unwrap_or(parts.uri.clone());
    let target = uri.path_and_query().map(|target| target.as_str()).unwrap_or(uri.path());
    let authorization = match parts.headers.get(header::AUTHORIZATION) {
        Some(value) => {
            Some(value.to_str().map_err(|_| ApiError::unauthorized("Authorization is not text"))?)
        }
        None => None,
    };
    let (origin, content) = state
        .federation
        .verify_request(authorization, parts.method.as_str(), target, &bytes)
        .await
        .map_err(XMatrixError)?;
    if let Some(content) = content {
        parts.extensions.insert(SignedContent(Arc::new(content)));
    }
    // A server that reaches us is up: what we queued for it need not wait out a backoff.
    state.rooms.outbox().peer_alive(&origin);
    parts.extensions.insert(XMatrixOrigin(origin));
    Ok(next.run(Request::from_parts(parts, Body::from(bytes))).await)
}

/// `origin_server_ts` for responses.
fn now() -> ruma::MilliSecondsSinceUnixEpoch {
    ruma::MilliSecondsSinceUnixEpoch::now()
}
