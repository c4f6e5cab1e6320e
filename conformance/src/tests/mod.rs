//! The conformance tests, one module per section of the client-server API spec, and the
//! fixtures they share.

mod account_data;
mod aliases_directory;
mod bad_input;
mod context;
mod create_room;
mod devices;
mod e2ee;
mod fixtures;
mod login;
mod membership;
mod messages;
mod openid;
mod power_levels;
mod presence;
mod profile;
mod push_rules;
mod read_markers;
mod receipts;
mod redaction;
mod registration;
mod send;
mod state;
mod sync;
mod tags;
mod typing;
mod user_directory;
mod versions;

use crate::runner::Test;

/// Every test of the suite.
pub(crate) fn all() -> Vec<Test> {
    [
        versions::tests(),
        registration::tests(),
        login::tests(),
        devices::tests(),
        profile::tests(),
        create_room::tests(),
        membership::tests(),
        power_levels::tests(),
        state::tests(),
        send::tests(),
        redaction::tests(),
        messages::tests(),
        context::tests(),
        sync::tests(),
        typing::tests(),
        receipts::tests(),
        read_markers::tests(),
        account_data::tests(),
        tags::tests(),
        aliases_directory::tests(),
        presence::tests(),
        user_directory::tests(),
        push_rules::tests(),
        e2ee::tests(),
        openid::tests(),
        bad_input::tests(),
    ]
    .into_iter()
    .flatten()
    .collect()
}
