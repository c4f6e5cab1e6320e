//! Typing, receipts, presence and device lists between servers: what a local user's typing,
//! public read receipt, presence or device and cross-signing key change becomes for the servers that share a room with them (EDUs queued in
//! the outbox), and what such EDUs from another server change here.
//!
//! [Typing](https://spec.matrix.org/v1.16/server-server-api/#typing-notifications),
//! [receipts](https://spec.matrix.org/v1.16/server-server-api/#receipts),
//! [presence](https://spec.matrix.org/v1.16/server-server-api/#presence)

use std::time::Duration;

use ruma::{EventId, OwnedEventId, OwnedUserId, RoomId, ServerName, UserId};
use serde_json::{Value, json};

use crate::{ephemeral::Ephemeral, rooms::Rooms};

/// How long a remote user's typing lasts unless their server says it stopped sooner.
pub const REMOTE_TYPING_TIMEOUT: Duration = Duration::from_secs(30);
/// The most presence updates taken from one EDU.
pub const PRESENCE_UPDATES_MAX: usize = 100;

/// Why an EDU could not be handled or sent.
#[derive(Debug, thiserror::Error)]
pub enum EduError {
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] storage::Error),
    /// The room core failed.
    #[error(transparent)]
    Room(#[from] crate::rooms::RoomError),
}

/// Tells the servers in the room that a local user started or stopped typing.
pub fn send_typing(
    rooms: &Rooms,
    room_id: &RoomId,
    user_id: &UserId,
    typing: bool,
) -> Result<(), EduError> {
    let servers = rooms.servers_in_room(room_id)?;
    let content = json!({"room_id": room_id, "user_id": user_id, "typing": typing});
    rooms.outbox().send_edu(&servers, "m.typing", content)?;
    Ok(())
}

/// Tells the servers in the room of a local user's public read receipt (`m.read`; private
/// receipts never leave this server).
pub fn send_receipt(
    rooms: &Rooms,
    room_id: &RoomId,
    user_id: &UserId,
    event_id: &EventId,
    thread_id: Option<&str>,
    ts: u64,
) -> Result<(), EduError> {
    let servers = rooms.servers_in_room(room_id)?;
    let mut data = json!({"ts": ts});
    if let Some(thread_id) = thread_id {
        data["thread_id"] = json!(thread_id);
    }
    let content = json!({
        room_id.as_str(): {"m.read": {user_id.as_str(): {"event_ids": [event_id], "data": data}}}
    });
    rooms.outbox().send_edu(&servers, "m.receipt", content)?;
    Ok(())
}

/// Tells every server that shares a room with a local user of their new presence.
pub fn send_presence(
    rooms: &Rooms,
    user_id: &UserId,
    presence: &str,
    status_msg: Option<&str>,
) -> Result<(), EduError> {
    let servers = rooms.servers_sharing_a_room(user_id)?;
    let mut update = json!({
        "user_id": user_id,
        "presence": presence,
        "last_active_ago": 0,
        "currently_active": presence == "online",
    });
    if let Some(status_msg) = status_msg {
        update["status_msg"] = json!(status_msg);
    }
    rooms.outbox().send_edu(&servers, "m.presence", json!({"push": [update]}))?;
    Ok(())
}

/// Tells the servers that share a room with a local user that one of their devices changed
/// (new keys) or was deleted
/// ([`m.device_list_update`](https://spec.matrix.org/v1.16/server-server-api/#device-management)).
/// The outbox chains the updates about one user through `stream_id` and `prev_id`;
/// `stream_id_at_least` is the user's key-change position.
pub fn send_device_list_update(
    rooms: &Rooms,
    user_id: &UserId,
    device_id: &str,
    stream_id_at_least: u64,
    keys: Option<&Value>,
    deleted: bool,
) -> Result<(), EduError> {
    let servers = rooms.servers_sharing_a_room(user_id)?;
    let mut content = json!({"user_id": user_id, "device_id": device_id});
    if deleted {
        content["deleted"] = json!(true);
    }
    if let Some(keys) = keys {
        content["keys"] = keys.clone();
    }
    rooms.outbox().send_device_list_update(&servers, user_id, stream_id_at_least, content)?;
    Ok(())
}

/// Tells the servers that share a room with a local user of their new master and
/// self-signing keys (`m.signing_key_update`; the user-signing key never leaves this server).
pub fn send_signing_key_update(
    rooms: &Rooms,
    user_id: &UserId,
    master_key: Option<&Value>,
    self_signing_key: Option<&Value>,
) -> Result<(), EduError> {
    if master_key.is_none() && self_signing_key.is_none() {
        return Ok(());
    }
    let servers = rooms.servers_sharing_a_room(user_id)?;
    let mut content = json!({"user_id": user_id});
    if let Some(key) = master_key {
        content["master_key"] = key.clone();
    }
    if let Some(key) = self_signing_key {
        content["self_signing_key"] = key.clone();
    }
    rooms.outbox().send_edu(&servers, "m.signing_key_update", content)?;
    Ok(())
}

/// A user id from an EDU, if it is a user of `origin` (a server speaks only for its users).
fn user_of(value: Option<&Value>, origin: &ServerName) -> Option<OwnedUserId> {
    let user_id = OwnedUserId::try_from(value?.as_str()?).ok()?;
    (user_id.server_name() == origin).then_some(user_id)
}

/// Handles `m.typing`, `m.receipt` and `m.presence` from `origin`; returns whether the EDU
/// was one of those. Anything malformed or not `origin`'s to say is ignored, as EDUs are
/// best-effort and get no answer.
pub fn receive(
    rooms: &Rooms,
    ephemeral: &Ephemeral,
    origin: &ServerName,
    edu_type: &str,
    content: &Value,
) -> Result<bool, EduError> {
    match edu_type {
        "m.typing" => {
            let room_id = content.get("room_id").and_then(Value::as_str);
            let Some(room_id) = room_id.and_then(|id| ruma::OwnedRoomId::try_from(id).ok()) else {
                return Ok(true);
            };
            let Some(user_id) = user_of(content.get("user_id"), origin) else { return Ok(true) };
            let typing = content.get("typing").and_then(Value::as_bool).unwrap_or(false);
            if rooms.is_joined(&room_id, &user_id)? {
                ephemeral.set_typing(&room_id, &user_id, typing, REMOTE_TYPING_TIMEOUT)?;
            }
            Ok(true)
        }
        "m.receipt" => {
            let Some(by_room) = content.as_object() else { return Ok(true) };
            for (room_id, receipts) in by_room {
                let Ok(room_id) = ruma::OwnedRoomId::try_from(room_id.as_str()) else { continue };
                let Some(read) = receipts.get("m.read").and_then(Value::as_object) else {
                    continue;
                };
                for (user_id, receipt) in read {
                    let Some(user_id) = user_of(Some(&json!(user_id)), origin) else { continue };
                    if !rooms.is_joined(&room_id, &user_id)? {
                        continue;
                    }
                    let thread_id = receipt
                        .pointer("/data/thread_id")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    let event_ids = receipt.get("event_ids").and_then(Value::as_array);
                    for event_id in event_ids.into_iter().flatten().filter_map(Value::as_str) {
                        let Ok(event_id) = OwnedEventId::try_from(event_id) else { continue };
                        if rooms.meta(&event_id)?.is_some_and(|meta| meta.room_id == room_id) {
                            ephemeral.set_receipt(
                                &room_id,
                                &user_id,
                                "m.read",
                                &event_id,
                                thread_id.clone(),
                            )?;
                        }
                    }
                }
            }
            Ok(true)
        }
        "m.presence" => {
            let updates = content.get("push").and_then(Value::as_array);
            for update in updates.into_iter().flatten().take(PRESENCE_UPDATES_MAX) {
                let Some(user_id) = user_of(update.get("user_id"), origin) else { continue };
                let presence = update.get("presence").and_then(Value::as_str).unwrap_or_default();
                if !matches!(presence, "online" | "offline" | "unavailable") {
                    continue;
                }
                // Only users someone here shares a room with are of interest.
                if rooms.joined_rooms(&user_id)?.is_empty() {
                    continue;
                }
                let status_msg =
                    update.get("status_msg").and_then(Value::as_str).map(str::to_owned);
                ephemeral.set_presence(&user_id, presence, status_msg)?;
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}
