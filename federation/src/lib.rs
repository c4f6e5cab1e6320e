//! Hearth's server-server protocol: the server's signing key and event signing
//! (`signing`), the checks of received PDUs' hashes and signatures (`verify`), X-Matrix request signing and verification (`request`), server keys and
//! their store (`keys`), server discovery (`discovery`), and the [`Client`] that ties them
//! together for outbound requests, key fetching, the notary and inbound request checks, and
//! the outbound [`Sender`] (per-destination transaction queues with backoff).
//!
//! The crate knows nothing of the database or the room core: what it persists goes through
//! [`KeyStore`] and [`OutboundQueue`].
#![warn(missing_docs)]

pub mod client;
pub mod discovery;
pub mod error;
pub mod keys;
pub mod request;
pub mod sender;
pub mod signing;
pub mod verify;

pub use client::{Client, ClientConfig};
pub use error::Error;
pub use keys::{KeyStore, MemoryKeyStore, StoredServerKeys, StoredVerifyKey};
pub use request::XMatrix;
pub use reqwest::Method;
pub use sender::{OutboundItem, OutboundKind, OutboundQueue, Sender, SenderConfig, Waker};
pub use signing::ServerSigningKey;
