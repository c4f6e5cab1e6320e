//! The client-server API, one module per spec section.

pub mod account;
pub mod account_data;
pub mod dehydrated_device;
pub mod device;
pub mod directory;
pub mod discovery;
pub mod ephemeral;
pub mod key_backup;
pub mod keys;
pub mod membership;
pub mod message;
pub mod openid;
pub mod profile;
pub mod push_rules;
pub mod room;
pub mod session;
pub mod sync;
pub mod to_device;
pub mod user_directory;

use axum::Router;

use crate::api::AppState;

/// Every client-server route.
pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(discovery::routes())
        .merge(account::routes())
        .merge(session::routes())
        .merge(device::routes())
        .merge(profile::routes())
        .merge(room::routes())
        .merge(membership::routes())
        .merge(message::routes())
        .merge(sync::routes())
        .merge(ephemeral::routes())
        .merge(account_data::routes())
        .merge(directory::routes())
        .merge(user_directory::routes())
        .merge(push_rules::routes())
        .merge(keys::routes())
        .merge(key_backup::routes())
        .merge(to_device::routes())
        .merge(dehydrated_device::routes())
        .merge(openid::routes())
}
