//! Integration tests: the real server on `127.0.0.1:0` with a fresh RocksDB in a temp dir,
//! spoken to over HTTP. One test binary for the crate so linking stays fast.

// matrix-sdk's crypto types are deeply nested; proving its sync future `Send` needs more
// than the default 128 levels.
#![recursion_limit = "256"]

mod harness;

mod accounts;
mod auth_rules;
mod bad_input;
mod basics;
mod client_e2ee;
mod client_sdk;
mod dehydrated_device;
mod discovery;
mod e2ee;
mod federation_backfill;
mod federation_directory;
mod federation_e2ee;
mod federation_knock;
mod federation_pair;
mod federation_restart;
mod federation_rooms;
mod federation_transport;
mod federation_wire;
mod key_backup;
mod openid;
mod profile;
mod restart;
mod rooms;
mod sync;
mod tidy;
