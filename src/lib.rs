//! Hearth: a federated Matrix homeserver.
//!
//! The binary (`src/main.rs`) parses the command line; this library holds everything else.
//! See `docs/architecture.md` for the map.

pub mod account_data;
pub mod accounts;
pub mod api;
pub mod config;
pub mod e2ee;
pub mod edus;
pub mod ephemeral;
pub mod filter;
pub mod kept;
pub mod key_backup;
pub mod notify;
pub mod outbox;
pub mod remote;
pub mod remote_directory;
pub mod rooms;
pub mod server;
pub mod server_keys;
pub mod sync;
pub mod tls;
