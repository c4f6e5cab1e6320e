//! Ephemeral and semi-persistent room data that is not part of the DAG: typing notifications
//! (in memory), read receipts and presence (persisted). Each change takes a stream position
//! so that `/sync` reports it once.
//!
//! [Typing](https://spec.matrix.org/v1.16/client-server-api/#typing-notifications),
//! [receipts](https://spec.matrix.org/v1.16/client-server-api/#receipts),
//! [presence](https://spec.matrix.org/v1.16/client-server-api/#presence)

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use storage::{Db, keys};

use crate::{accounts::now_ms, notify::Notifier};

const RECEIPTS: &str = "room_receipt_to_receipt";
const RECEIPT_CHANGES: &str = "room_position_to_receipt";
const PRESENCE: &str = "user_id_to_presence";

/// A stored receipt.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Receipt {
    /// `m.read` or `m.read.private`.
    pub receipt_type: String,
    /// Whose receipt.
    pub user_id: OwnedUserId,
    /// The event read up to.
    pub event_id: OwnedEventId,
    /// When (ms).
    pub ts: u64,
    /// The thread, for threaded receipts (`main` or a thread root).
    pub thread_id: Option<String>,
    /// Stream position of the change.
    pub position: u64,
}

/// A user's presence.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Presence {
    /// `online`, `offline` or `unavailable`.
    pub presence: String,
    /// Free text status.
    pub status_msg: Option<String>,
    /// Last activity (ms).
    pub last_active_ts: u64,
    /// Stream position of the change.
    pub position: u64,
}

#[derive(Default)]
struct RoomTyping {
    users: HashMap<OwnedUserId, Instant>,
    position: u64,
}

/// The ephemeral component.
#[derive(Clone)]
pub struct Ephemeral {
    db: Db,
    notifier: Notifier,
    typing: Arc<Mutex<HashMap<OwnedRoomId, RoomTyping>>>,
}

/// Longest typing timeout honoured.
const TYPING_MAX: Duration = Duration::from_secs(120);

impl Ephemeral {
    /// The component over `db`.
    pub fn new(db: Db, notifier: Notifier) -> Self {
        Self { db, notifier, typing: Arc::default() }
    }

    fn bump(&self) -> Result<u64, storage::Error> {
        let (position, ()) = self.db.write_at_next_position(|_, _| Ok(()))?;
        Ok(position)
    }

    /// Starts or stops `user_id` typing in a room.
    pub fn set_typing(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        typing: bool,
        timeout: Duration,
    ) -> Result<(), storage::Error> {
        let position = self.bump()?;
        {
            let mut rooms = self.typing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let room = rooms.entry(room_id.to_owned()).or_default();
            if typing {
                room.users.insert(user_id.to_owned(), Instant::now() + timeout.min(TYPING_MAX));
            } else {
                room.users.remove(user_id);
            }
            room.position = position;
        }
        self.notifier.notify(position);
        Ok(())
    }

    /// When the next typing notification runs out, if any.
    pub fn next_typing_expiry(&self) -> Option<Instant> {
        let rooms = self.typing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        rooms.values().flat_map(|room| room.users.values().copied()).min()
    }

    /// Drops typing notifications that ran out, as a change `/sync` reports (so clients learn
    /// that the user stopped typing even without an explicit stop).
    pub fn expire_typing(&self) -> Result<(), storage::Error> {
        let now = Instant::now();
        let expired: Vec<OwnedRoomId> = {
            let rooms = self.typing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            rooms
                .iter()
                .filter(|(_, room)| room.users.values().any(|expires| *expires <= now))
                .map(|(room_id, _)| room_id.clone())
                .collect()
        };
        if expired.is_empty() {
            return Ok(());
        }
        let position = self.bump()?;
        {
            let mut rooms = self.typing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for room_id in expired {
                if let Some(room) = rooms.get_mut(&room_id) {
                    room.users.retain(|_, expires| *expires > now);
                    room.position = position;
                }
            }
        }
        self.notifier.notify(position);
        Ok(())
    }

    /// The typing users of a room, and the position of the last change; `None` when nothing
    /// changed after `since`.
    /// An initial sync always gets the (possibly empty) list.
    pub fn typing(&self, room_id: &RoomId, since: Option<u64>) -> Option<Vec<OwnedUserId>> {
        let rooms = self.typing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(room) = rooms.get(room_id) else {
            return since.is_none().then(Vec::new);
        };
        let now = Instant::now();
        let users: Vec<OwnedUserId> = room
            .users
            .iter()
            .filter(|(_, expires)| **expires > now)
            .map(|(user, _)| user.clone())
            .collect();
        match since {
            Some(since) if room.position <= since => None,
            _ => Some(users),
        }
    }

    /// Records a receipt. Receipts only move forward in the timeline; the caller checks that.
    pub fn set_receipt(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        receipt_type: &str,
        event_id: &ruma::EventId,
        thread_id: Option<String>,
    ) -> Result<(), storage::Error> {
        let thread_key = thread_id.clone().unwrap_or_default();
        let key = keys::join(&[
            room_id.as_bytes(),
            receipt_type.as_bytes(),
            user_id.as_bytes(),
            thread_key.as_bytes(),
        ]);
        let (position, ()) = self.db.write_at_next_position(|position, batch| {
            let receipt = Receipt {
                receipt_type: receipt_type.to_owned(),
                user_id: user_id.to_owned(),
                event_id: event_id.to_owned(),
                ts: now_ms(),
                thread_id,
                position,
            };
            batch.put(RECEIPTS, &key, &receipt)?;
            let mut change_key = keys::prefix(&[room_id.as_bytes()]);
            change_key.extend_from_slice(&keys::encode_u64(position));
            batch.put(RECEIPT_CHANGES, &change_key, &receipt)?;
            Ok(())
        })?;
        self.notifier.notify(position);
        Ok(())
    }

    /// A user's own receipt of a type in a room (unthreaded or `main`).
    pub fn receipt(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        receipt_type: &str,
    ) -> Result<Option<Receipt>, storage::Error> {
        let prefix =
            keys::prefix(&[room_id.as_bytes(), receipt_type.as_bytes(), user_id.as_bytes()]);
        let mut newest: Option<Receipt> = None;
        for (_, value) in self.db.scan_prefix(RECEIPTS, &prefix)? {
            if let Ok(receipt) = serde_json::from_slice::<Receipt>(&value)
                && matches!(receipt.thread_id.as_deref(), None | Some("main"))
                && newest.as_ref().is_none_or(|current| receipt.position > current.position)
            {
                newest = Some(receipt);
            }
        }
        Ok(newest)
    }

    /// The `m.receipt` event for a room as `viewer` sees it: all receipts on an initial sync,
    /// the changes after `since` otherwise. Private receipts are only shown to their owner.
    pub fn receipt_event(
        &self,
        room_id: &RoomId,
        viewer: &UserId,
        since: Option<u64>,
    ) -> Result<Option<Value>, storage::Error> {
        let receipts: Vec<Receipt> = match since {
            None => self
                .db
                .scan_prefix(RECEIPTS, &keys::prefix(&[room_id.as_bytes()]))?
                .into_iter()
                .filter_map(|(_, value)| serde_json::from_slice(&value).ok())
                .collect(),
            Some(since) => {
                let prefix = keys::prefix(&[room_id.as_bytes()]);
                let mut start = prefix.clone();
                start.extend_from_slice(&keys::encode_u64(since + 1));
                let mut found = Vec::new();
                self.db.for_each_prefix_from(RECEIPT_CHANGES, &prefix, &start, |_, value| {
                    if let Ok(receipt) = serde_json::from_slice::<Receipt>(value) {
                        found.push(receipt);
                    }
                    true
                })?;
                found
            }
        };
        let mut content: Map<String, Value> = Map::new();
        for receipt in receipts {
            if receipt.receipt_type == "m.read.private" && receipt.user_id != viewer {
                continue;
            }
            let mut entry = json!({"ts": receipt.ts});
            if let Some(thread_id) = &receipt.thread_id {
                entry["thread_id"] = json!(thread_id);
            }
            let by_event = content.entry(receipt.event_id.to_string()).or_insert_with(|| json!({}));
            by_event[&receipt.receipt_type][receipt.user_id.as_str()] = entry;
        }
        if content.is_empty() {
            return Ok(None);
        }
        Ok(Some(json!({"type": "m.receipt", "content": content, "room_id": room_id})))
    }

    /// Sets a user's presence.
    pub fn set_presence(
        &self,
        user_id: &UserId,
        presence: &str,
        status_msg: Option<String>,
    ) -> Result<(), storage::Error> {
        let (position, ()) = self.db.write_at_next_position(|position, batch| {
            let record = Presence {
                presence: presence.to_owned(),
                status_msg,
                last_active_ts: now_ms(),
                position,
            };
            batch.put(PRESENCE, user_id.as_bytes(), &record)
        })?;
        self.notifier.notify(position);
        Ok(())
    }

    /// A user's presence.
    pub fn presence(&self, user_id: &UserId) -> Result<Option<Presence>, storage::Error> {
        self.db.get(PRESENCE, user_id.as_bytes())
    }

    /// The `m.presence` event of a user, if it changed after `since`.
    pub fn presence_event(
        &self,
        user_id: &UserId,
        since: Option<u64>,
    ) -> Result<Option<Value>, storage::Error> {
        let Some(presence) = self.presence(user_id)? else { return Ok(None) };
        if since.is_some_and(|since| presence.position <= since) {
            return Ok(None);
        }
        Ok(Some(json!({
            "type": "m.presence",
            "sender": user_id,
            "content": presence_content(&presence),
        })))
    }
}

/// The content of a presence event or `GET presence/{userId}/status`.
pub fn presence_content(presence: &Presence) -> Value {
    let active_ago = now_ms().saturating_sub(presence.last_active_ts);
    let mut content = json!({
        "presence": presence.presence,
        "last_active_ago": active_ago,
        "currently_active": presence.presence == "online" && active_ago < 5 * 60 * 1000,
    });
    if let Some(status_msg) = &presence.status_msg {
        content["status_msg"] = json!(status_msg);
    }
    content
}
