//! The server-server API, one module per spec section, and the [`Origin`] of a request.
//!
//! Handlers here never trust a server name they were told: the origin comes from the
//! [`Origin`] extractor, the seam where the transport's X-Matrix verification plugs in.

pub mod events;
pub mod membership;
pub mod transactions;

use axum::{Router, extract::FromRequestParts, http::request::Parts};
use ruma::OwnedServerName;

use crate::api::{AppState, error::ApiError};

/// The server a federation request comes from, as its signature proved it.
///
/// Until the transport verifies the `Authorization: X-Matrix` header, no request can prove
/// an origin, so every federation request is refused with 401 `M_UNAUTHORIZED`: an
/// unverified origin is never trusted. The transport replaces this extractor's body with its
/// verification.
#[derive(Clone, Debug)]
pub struct Origin(pub OwnedServerName);

impl<S: Send + Sync> FromRequestParts<S> for Origin {
    type Rejection = ApiError;

    async fn from_request_parts(_parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Err(ApiError::unauthorized("Federation request signatures cannot be verified yet"))
    }
}

/// Every server-server route.
pub fn routes() -> Router<AppState> {
    Router::new().merge(transactions::routes()).merge(events::routes()).merge(membership::routes())
}

/// `origin_server_ts` for responses.
fn now() -> ruma::MilliSecondsSinceUnixEpoch {
    ruma::MilliSecondsSinceUnixEpoch::now()
}
