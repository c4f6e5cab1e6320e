//! Per-user account data, global and per room (tags and `m.fully_read` live here too).
//! Each change takes a stream position so that `/sync` reports it.
//!
//! [Client config](https://spec.matrix.org/v1.16/client-server-api/#client-config)

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ruma::{OwnedUserId, RoomId, UserId, push::Ruleset};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use storage::{Db, keys};

use crate::notify::Notifier;

const DATA: &str = "user_room_type_to_account_data";
const CHANGES: &str = "user_position_to_account_data_change";

#[derive(Serialize, Deserialize)]
struct Stored {
    content: Value,
    position: u64,
}

#[derive(Serialize, Deserialize)]
struct Change {
    room_id: String,
    kind: String,
}

/// Room account data events by room id.
pub type RoomAccountData = std::collections::BTreeMap<String, Vec<Value>>;

/// How many users' push rules are kept before the kept ones are dropped and read again.
const PUSH_RULES_KEPT_MAX: usize = 10_000;

/// A user's push rules, with their JSON as a fingerprint: unread counts are kept per ruleset.
pub struct UserPushRules {
    /// The rules.
    pub ruleset: Ruleset,
    /// The rules as JSON.
    pub fingerprint: Arc<str>,
}

/// Push rules kept between syncs (every `/sync` evaluates them). `generation` moves with
/// every change, so a ruleset read while a change was being written is never kept.
#[derive(Default)]
struct PushRulesCache {
    generation: u64,
    users: HashMap<OwnedUserId, Arc<UserPushRules>>,
}

/// The account data component.
#[derive(Clone)]
pub struct AccountData {
    db: Db,
    notifier: Notifier,
    push_rules: Arc<Mutex<PushRulesCache>>,
}

impl AccountData {
    /// The component over `db`.
    pub fn new(db: Db, notifier: Notifier) -> Self {
        Self { db, notifier, push_rules: Arc::default() }
    }

    fn key(user_id: &UserId, room_id: Option<&RoomId>, kind: &str) -> Vec<u8> {
        let room = room_id.map(RoomId::as_str).unwrap_or("");
        keys::join(&[user_id.as_bytes(), room.as_bytes(), kind.as_bytes()])
    }

    /// Sets one entry.
    pub fn set(
        &self,
        user_id: &UserId,
        room_id: Option<&RoomId>,
        kind: &str,
        content: Value,
    ) -> Result<(), storage::Error> {
        let key = Self::key(user_id, room_id, kind);
        let (position, ()) = self.db.write_at_next_position(|position, batch| {
            batch.put(DATA, &key, &Stored { content, position })?;
            let mut change_key = keys::prefix(&[user_id.as_bytes()]);
            change_key.extend_from_slice(&keys::encode_u64(position));
            let room_id = room_id.map(|room| room.to_string()).unwrap_or_default();
            batch.put(CHANGES, &change_key, &Change { room_id, kind: kind.to_owned() })
        })?;
        if room_id.is_none() && kind == "m.push_rules" {
            let mut cache = self.push_rules_cache();
            cache.generation += 1;
            cache.users.remove(user_id);
        }
        self.notifier.notify(position);
        Ok(())
    }

    /// One entry.
    pub fn get(
        &self,
        user_id: &UserId,
        room_id: Option<&RoomId>,
        kind: &str,
    ) -> Result<Option<Value>, storage::Error> {
        Ok(self
            .db
            .get::<Stored>(DATA, &Self::key(user_id, room_id, kind))?
            .map(|stored| stored.content))
    }

    /// The user's push rules: the stored `m.push_rules`, else the server-default ruleset.
    pub fn push_rules(&self, user_id: &UserId) -> Result<Ruleset, storage::Error> {
        if let Some(stored) = self.get(user_id, None, "m.push_rules")?
            && let Some(global) = stored.get("global")
            && let Ok(ruleset) = serde_json::from_value::<ruma::push::Ruleset>(global.clone())
        {
            return Ok(ruleset);
        }
        Ok(Ruleset::server_default(user_id))
    }

    /// [`AccountData::push_rules`] with their fingerprint, kept between calls until they
    /// change.
    pub fn push_rules_shared(
        &self,
        user_id: &UserId,
    ) -> Result<Arc<UserPushRules>, storage::Error> {
        let generation = {
            let cache = self.push_rules_cache();
            if let Some(rules) = cache.users.get(user_id) {
                return Ok(rules.clone());
            }
            cache.generation
        };
        let ruleset = self.push_rules(user_id)?;
        let fingerprint = serde_json::to_string(&ruleset).unwrap_or_default().into();
        let rules = Arc::new(UserPushRules { ruleset, fingerprint });
        let mut cache = self.push_rules_cache();
        if cache.generation == generation {
            if cache.users.len() >= PUSH_RULES_KEPT_MAX {
                cache.users.clear();
            }
            cache.users.insert(user_id.to_owned(), rules.clone());
        }
        Ok(rules)
    }

    fn push_rules_cache(&self) -> std::sync::MutexGuard<'_, PushRulesCache> {
        self.push_rules.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Account data events for sync: global ones, and per room. Everything on an initial sync,
    /// what changed after `since` otherwise.
    pub fn events_since(
        &self,
        user_id: &UserId,
        since: Option<u64>,
    ) -> Result<(Vec<Value>, RoomAccountData), storage::Error> {
        let mut global = Vec::new();
        let mut rooms: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
        let prefix = keys::prefix(&[user_id.as_bytes()]);
        let mut wanted: Vec<(String, String)> = Vec::new();
        match since {
            None => {
                for (key, _) in self.db.scan_prefix(DATA, &prefix)? {
                    let parts = keys::split(&key[prefix.len()..]);
                    if let [room, kind] = parts.as_slice() {
                        wanted.push((
                            String::from_utf8_lossy(room).into_owned(),
                            String::from_utf8_lossy(kind).into_owned(),
                        ));
                    }
                }
            }
            Some(since) => {
                let mut start = prefix.clone();
                start.extend_from_slice(&keys::encode_u64(since + 1));
                self.db.for_each_prefix_from(CHANGES, &prefix, &start, |_, value| {
                    if let Ok(change) = serde_json::from_slice::<Change>(value)
                        && !wanted.contains(&(change.room_id.clone(), change.kind.clone()))
                    {
                        wanted.push((change.room_id, change.kind));
                    }
                    true
                })?;
            }
        }
        for (room, kind) in wanted {
            let key = keys::join(&[user_id.as_bytes(), room.as_bytes(), kind.as_bytes()]);
            let Some(stored) = self.db.get::<Stored>(DATA, &key)? else { continue };
            let event = json!({"type": kind, "content": stored.content});
            if room.is_empty() {
                global.push(event);
            } else {
                rooms.entry(room).or_default().push(event);
            }
        }
        Ok((global, rooms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_push_rules_follow_each_change() {
        let dir = tempfile::tempdir().unwrap();
        let data = AccountData::new(Db::open(dir.path()).unwrap(), Notifier::new());
        let user: OwnedUserId = "@u:x".try_into().unwrap();
        let default = data.push_rules_shared(&user).unwrap();
        let json = |ruleset: &Ruleset| serde_json::to_string(ruleset).unwrap();
        assert_eq!(json(&default.ruleset), json(&Ruleset::server_default(&user)));
        // Kept: the second call shares the first answer.
        assert!(Arc::ptr_eq(&default, &data.push_rules_shared(&user).unwrap()));
        // A change is seen at once, and other account data leaves the kept rules alone.
        let mut changed = Ruleset::server_default(&user);
        changed.underride.clear();
        data.set(&user, None, "m.push_rules", json!({"global": changed})).unwrap();
        let after = data.push_rules_shared(&user).unwrap();
        assert_eq!(json(&after.ruleset), json(&changed));
        assert!(after.ruleset.underride.is_empty());
        assert_ne!(after.fingerprint, default.fingerprint);
        data.set(&user, None, "m.direct", json!({})).unwrap();
        assert!(Arc::ptr_eq(&after, &data.push_rules_shared(&user).unwrap()));
    }
}
