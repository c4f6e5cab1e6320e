//! The HTTP surface (client-server and server-server APIs): the router, its middleware (CORS, gzip, tracing spans) and the
//! state each handler draws its components from.

pub mod client;
pub mod error;
pub mod extract;
pub mod federation;
pub mod uia;

use std::{sync::Arc, time::Duration};

use ::federation::ServerSigningKey;
use axum::{
    Router,
    extract::FromRef,
    http::{Method, header},
};
use tower_http::{
    CompressionLevel,
    compression::{
        CompressionLayer,
        predicate::{DefaultPredicate, Predicate as _, SizeAbove},
    },
    cors::{Any, CorsLayer},
    trace::TraceLayer,
};

use crate::{
    account_data::AccountData, accounts::Accounts, config::Config, e2ee::E2ee,
    ephemeral::Ephemeral, key_backup::KeyBackup, notify::Notifier, rooms::Rooms,
    rooms::ingest::Remote,
};

/// The router state. Handlers take the components they use (`State<Rooms>`), not all of it.
#[derive(Clone, FromRef)]
pub struct AppState {
    /// Configuration.
    pub config: Arc<Config>,
    /// Accounts, devices, tokens.
    pub accounts: Accounts,
    /// The room core.
    pub rooms: Rooms,
    /// Typing, receipts, presence.
    pub ephemeral: Ephemeral,
    /// Account data.
    pub account_data: AccountData,
    /// End-to-end encryption keys and to-device messages.
    pub e2ee: E2ee,
    /// Server-side key backups.
    pub key_backup: KeyBackup,
    /// User-interactive auth sessions.
    pub uia: uia::UiaSessions,
    /// The last unread count of each (user, room), for `/sync`.
    pub unread: crate::sync::UnreadCounts,
    /// Wakes `/sync`.
    pub notifier: Notifier,
    /// The server's signing key.
    pub signing_key: Arc<ServerSigningKey>,
    /// The federation client: outbound requests, server keys, inbound X-Matrix checks.
    pub federation: ::federation::Client,
    /// What the room core needs from the federation transport (keys, remote events).
    pub remote: Remote,
}

/// Answers smaller than this are not compressed.
const COMPRESS_ABOVE_BYTES: u16 = 2048;

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::HeaderName::from_static("x-requested-with"),
        ])
        .max_age(Duration::from_secs(86400));
    let max_request_bytes = state.config.max_request_bytes;
    client::routes()
        .merge(federation::routes(state.clone()))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(max_request_bytes))
        // Small answers (most `/sync` long polls, sends, receipts) go out as they are: gzip
        // would cost more time than the bytes it saves on them. Larger ones are compressed at
        // the fastest level.
        .layer(
            CompressionLayer::new()
                .gzip(true)
                .quality(CompressionLevel::Fastest)
                .compress_when(DefaultPredicate::new().and(SizeAbove::new(COMPRESS_ABOVE_BYTES))),
        )
        .layer(cors)
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn fallback() -> error::ApiError {
    error::ApiError::unrecognized()
}

async fn method_not_allowed() -> error::ApiError {
    error::ApiError::method_not_allowed()
}
