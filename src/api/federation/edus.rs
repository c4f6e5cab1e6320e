//! The EDUs of a received transaction, dispatched by `edu_type`: typing, receipts and
//! presence (through [`crate::edus`]), device list and
//! cross-signing key updates (a key change for the remote user, so local users who share a
//! room query the keys again) and to-device messages (queued once per `message_id`).
//! An EDU that is malformed, or speaks for users of another server than the sender, is dropped
//! and logged; it never fails the transaction.
//!
//! [EDUs](https://spec.matrix.org/v1.16/server-server-api/#edus),
//! [device management](https://spec.matrix.org/v1.16/server-server-api/#device-management),
//! [send-to-device messaging](https://spec.matrix.org/v1.16/server-server-api/#send-to-device-messaging)

use std::collections::BTreeMap;

use ruma::{OwnedUserId, ServerName, UserId};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;

use crate::api::{AppState, client::to_device::local_deliveries, error::ApiError};

/// The longest `message_id` the spec allows, in code points.
const MESSAGE_ID_MAX_CHARS: usize = 32;

/// Handles the EDUs of one transaction from `origin` (already bounded in number by the
/// transaction check). Fails only when storage does, so that the sender retries.
pub(crate) async fn receive_edus(
    state: &AppState,
    origin: &ServerName,
    edus: Vec<Value>,
) -> Result<(), ApiError> {
    // Several updates for one user in a transaction make one key change.
    let mut key_changes: Vec<OwnedUserId> = Vec::new();
    for edu in edus {
        let Some(edu_type) = edu.get("edu_type").and_then(Value::as_str).map(str::to_owned) else {
            tracing::debug!(%origin, "EDU without edu_type: dropped");
            continue;
        };
        let content = edu.get("content").cloned().unwrap_or(Value::Null);
        match edu_type.as_str() {
            "m.device_list_update" | "m.signing_key_update" => {
                if let Some(user_id) = key_update_user(origin, &edu_type, content)
                    && !key_changes.contains(&user_id)
                {
                    key_changes.push(user_id);
                }
            }
            "m.direct_to_device" => direct_to_device(state, origin, content)?,
            other => {
                match crate::edus::receive(&state.rooms, &state.ephemeral, origin, other, &content)
                {
                    Ok(true) => {}
                    Ok(false) => tracing::debug!(edu_type = other, "EDU type not handled"),
                    Err(error) => tracing::warn!(edu_type = other, %error, "EDU not applied"),
                }
            }
        }
    }
    for user_id in key_changes {
        // Only users who are in a room here can matter to a local user; a key change for
        // anyone else would only grow the log.
        if state.rooms.joined_rooms(&user_id)?.is_empty() {
            tracing::debug!(%origin, %user_id, "key update for a user in no room here: dropped");
            continue;
        }
        state.e2ee.record_remote_key_change(&user_id)?;
    }
    Ok(())
}

/// Parses an EDU's content, logging and dropping it when it does not fit.
fn parse<T: DeserializeOwned>(origin: &ServerName, edu_type: &str, content: Value) -> Option<T> {
    match serde_json::from_value(content) {
        Ok(parsed) => Some(parsed),
        Err(error) => {
            tracing::debug!(%origin, edu_type, %error, "malformed EDU: dropped");
            None
        }
    }
}

/// Whether `user_id` belongs to `origin`; logs the refusal.
fn speaks_for(origin: &ServerName, edu_type: &str, user_id: &UserId) -> bool {
    let own = user_id.server_name() == origin;
    if !own {
        tracing::info!(%origin, edu_type, %user_id, "EDU about another server's user: dropped");
    }
    own
}

/// The `user_id` of both key updates; the rest (`device_id`, `stream_id`, `prev_id`, `keys`,
/// the cross-signing keys) is not needed, as every update is a resync trigger.
#[derive(Deserialize)]
struct KeyUpdate {
    user_id: OwnedUserId,
}

/// `m.device_list_update` and `m.signing_key_update`: the user whose keys changed, if the EDU
/// is well formed and about a user of `origin`.
///
/// No remote device list is kept here (`keys/query` asks the user's server every time), so
/// there is nothing to update incrementally and the `prev_id` rule has nothing to guard: the
/// change only tells local clients to query again.
fn key_update_user(origin: &ServerName, edu_type: &str, content: Value) -> Option<OwnedUserId> {
    let update: KeyUpdate = parse(origin, edu_type, content)?;
    speaks_for(origin, edu_type, &update.user_id).then_some(update.user_id)
}

#[derive(Deserialize)]
struct DirectToDevice {
    sender: OwnedUserId,
    #[serde(rename = "type")]
    kind: String,
    message_id: String,
    messages: BTreeMap<OwnedUserId, BTreeMap<String, Value>>,
}

/// `m.direct_to_device`: the messages for local users' devices (named, or `*` for all), queued
/// at most once per (`origin`, `message_id`).
fn direct_to_device(state: &AppState, origin: &ServerName, content: Value) -> Result<(), ApiError> {
    const EDU_TYPE: &str = "m.direct_to_device";
    let Some(edu) = parse::<DirectToDevice>(origin, EDU_TYPE, content) else { return Ok(()) };
    if !speaks_for(origin, EDU_TYPE, &edu.sender) {
        return Ok(());
    }
    if edu.message_id.is_empty() || edu.message_id.chars().count() > MESSAGE_ID_MAX_CHARS {
        tracing::debug!(%origin, "m.direct_to_device with a bad message_id: dropped");
        return Ok(());
    }
    let mut deliveries = Vec::new();
    for (user_id, devices) in edu.messages {
        if user_id.server_name() != state.accounts.server_name() {
            continue;
        }
        deliveries.extend(local_deliveries(&state.accounts, &user_id, devices)?);
    }
    let queued = state.e2ee.receive_remote_to_device(
        origin,
        &edu.message_id,
        &edu.sender,
        &edu.kind,
        &deliveries,
    )?;
    if !queued {
        tracing::debug!(%origin, message_id = %edu.message_id, "to-device message seen before");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn check(content: Value, expected: Option<&str>) {
        let origin = <&ServerName>::try_from("b.test").unwrap();
        let user_id = key_update_user(origin, "m.device_list_update", content);
        assert_eq!(user_id.as_deref().map(UserId::as_str), expected);
    }

    #[test]
    fn a_key_update_counts_only_for_users_of_its_origin() {
        check(
            json!({"user_id": "@bob:b.test", "device_id": "D", "stream_id": 1}),
            Some("@bob:b.test"),
        );
        check(json!({"user_id": "@bob:a.test", "device_id": "D", "stream_id": 1}), None);
        check(json!({"user_id": "not a user id"}), None);
        check(json!({"device_id": "D"}), None);
        check(Value::Null, None);
    }
}
