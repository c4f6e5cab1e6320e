//! Hearth's server-server protocol.
//!
//! For now this holds the server's ed25519 signing key and the signing of events (content
//! hash, signature, event id by the room version's rules). Request signing, key fetching,
//! discovery and the outbound sender join it with the federation work.
#![warn(missing_docs)]

pub mod signing;

pub use signing::{Error, ServerSigningKey};
