//! The one error type of the crate, [`Error`]: every failure of signing, key handling,
//! discovery and outbound requests, with its source kept.

use std::io;

use ruma::{OwnedServerName, RoomVersionId};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key file could not be read or written.
    #[error("key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: String,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The key file does not hold a valid key.
    #[error("key file {path} holds no valid ed25519 key: {reason}")]
    BadKey {
        /// The file.
        path: String,
        /// Why it is invalid.
        reason: String,
    },
    /// Hashing, signing or redacting JSON failed (for example it is too large).
    #[error("signing JSON: {0}")]
    Json(#[from] ruma::signatures::JsonError),
    /// The room version is not one this server knows.
    #[error("unsupported room version {0}")]
    UnsupportedRoomVersion(RoomVersionId),
    /// The computed event id is not valid.
    #[error("invalid event id: {0}")]
    EventId(#[from] ruma::IdParseError),
    /// The `Authorization: X-Matrix` header is missing or malformed.
    #[error("malformed X-Matrix authorization: {0}")]
    MalformedAuthorization(String),
    /// The request was signed for another server than this one.
    #[error("request is for destination {destination}, not this server")]
    WrongDestination {
        /// The destination the request names.
        destination: String,
    },
    /// A signature did not verify.
    #[error("invalid signature by {server_name} ({key_id})")]
    InvalidSignature {
        /// The server that supposedly signed.
        server_name: OwnedServerName,
        /// The key it named.
        key_id: String,
    },
    /// The server's keys do not include the named key (or it has expired).
    #[error("unknown key {key_id} of {server_name}")]
    UnknownKey {
        /// The server.
        server_name: OwnedServerName,
        /// The key id.
        key_id: String,
    },
    /// A peer's answer is not what the spec describes.
    #[error("invalid response from {server_name}: {reason}")]
    InvalidResponse {
        /// The peer.
        server_name: OwnedServerName,
        /// What is wrong.
        reason: String,
    },
    /// The peer resolves to a loopback, private or link-local address and
    /// `federation_allow_private` is off.
    #[error("refusing to contact {server_name}: it resolves to the non-public address {address}")]
    PrivateAddress {
        /// The peer.
        server_name: OwnedServerName,
        /// The address it resolved to.
        address: std::net::IpAddr,
    },
    /// Server discovery found no address.
    #[error("cannot resolve {server_name}: {reason}")]
    Resolve {
        /// The peer.
        server_name: OwnedServerName,
        /// Why.
        reason: String,
    },
    /// The HTTP request failed (connect, TLS, timeout).
    #[error("request to {server_name} failed: {source}")]
    Http {
        /// The peer.
        server_name: OwnedServerName,
        /// What failed.
        #[source]
        source: reqwest::Error,
    },
    /// The peer answered with an error status.
    #[error("{server_name} answered {status}: {body}")]
    Status {
        /// The peer.
        server_name: OwnedServerName,
        /// The HTTP status.
        status: u16,
        /// The start of the body (its Matrix error, usually).
        body: String,
    },
    /// The peer's answer is larger than `federation_max_response_bytes`.
    #[error("response from {server_name} exceeds {limit_bytes} bytes")]
    ResponseTooLarge {
        /// The peer.
        server_name: OwnedServerName,
        /// The limit.
        limit_bytes: usize,
    },
    /// The HTTP client could not be built (bad CA file, TLS setup).
    #[error("federation client setup: {0}")]
    Setup(String),
    /// The key store failed.
    #[error("key store: {0}")]
    KeyStore(#[source] Box<dyn std::error::Error + Send + Sync>),
}
