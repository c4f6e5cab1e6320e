//! What this server owes other servers: the persistent per-destination queue behind the
//! federation [`Sender`]. The room core writes a PDU's queue rows in the same batch as the
//! event, so an event acknowledged to a client is also on its way to every server in the room,
//! across crashes and restarts; EDUs (typing, receipts, presence, device lists, to-device) are
//! queued in a batch of their own.
//!
//! Table `destination_id_to_outbound`: (destination, queue id) -> [`Stored`] item.
//! Table `user_id_to_device_list_edu`: local user -> the `stream_id` of the last
//! `m.device_list_update` sent about them (the next one names it as its `prev_id`).

use std::sync::{Arc, Mutex, OnceLock};

use federation::{OutboundItem, OutboundKind, OutboundQueue, Sender, Waker};
use ruma::{OwnedServerName, ServerName, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use storage::{Batch, Db, keys};

const TABLE: &str = "destination_id_to_outbound";
const DEVICE_LIST_EDUS: &str = "user_id_to_device_list_edu";

/// One queued item as stored.
#[derive(Serialize, Deserialize)]
struct Stored {
    kind: OutboundKind,
    json: Value,
}

/// The outbound queue over the database, and the wake-up of the sender.
#[derive(Clone)]
pub struct Outbox {
    db: Db,
    waker: Arc<OnceLock<Waker>>,
    /// Orders device list updates: each takes the id after the last one, in one write.
    device_list_edus: Arc<Mutex<()>>,
}

fn store_error(error: storage::Error) -> federation::Error {
    federation::Error::KeyStore(Box::new(error))
}

impl Outbox {
    /// The queue over `db`; [`Outbox::attach`] connects the sender that drains it.
    pub fn new(db: Db) -> Self {
        Self { db, waker: Arc::new(OnceLock::new()), device_list_edus: Arc::new(Mutex::new(())) }
    }

    /// Connects the sender that [`Outbox::wake`] wakes.
    pub fn attach(&self, sender: Sender) {
        if self.waker.set(sender.waker()).is_err() {
            tracing::error!("an outbox was attached to a second sender");
        }
    }

    /// Adds `json` for each of `destinations` to `batch`.
    pub fn queue_in_batch(
        &self,
        batch: &mut Batch<'_>,
        destinations: &[OwnedServerName],
        kind: OutboundKind,
        json: &Value,
    ) -> Result<(), storage::Error> {
        let stored = Stored { kind, json: json.clone() };
        for destination in destinations {
            let id = self.db.next_short(batch)?;
            let key = keys::join(&[destination.as_bytes(), &keys::encode_u64(id)]);
            batch.put(TABLE, &key, &stored)?;
        }
        Ok(())
    }

    /// Tells the sender that `destinations` have new items.
    pub fn wake(&self, destinations: &[OwnedServerName]) {
        if let Some(sender) = self.waker.get() {
            for destination in destinations {
                sender.wake(destination);
            }
        }
    }

    /// Tells the sender that `server` just reached us, so a backoff towards it ends.
    pub fn peer_alive(&self, server: &ServerName) {
        if let Some(sender) = self.waker.get() {
            sender.peer_alive(server);
        }
    }

    /// Queues one EDU for `destinations` and wakes the sender.
    pub fn send_edu(
        &self,
        destinations: &[OwnedServerName],
        edu_type: &str,
        content: Value,
    ) -> Result<(), storage::Error> {
        if destinations.is_empty() {
            return Ok(());
        }
        let edu = json!({"edu_type": edu_type, "content": content});
        let mut batch = self.db.batch();
        self.queue_in_batch(&mut batch, destinations, OutboundKind::Edu, &edu)?;
        self.db.write(batch)?;
        self.wake(destinations);
        Ok(())
    }

    /// Queues an `m.device_list_update` about local user `user_id` for `destinations`.
    /// Updates about one user form a chain: each gets a `stream_id` above the last one's (and
    /// at least `stream_id_at_least`, the user's key-change position) and names the last one as
    /// its `prev_id`, so a receiver that missed one knows to resync
    /// ([device management](https://spec.matrix.org/v1.16/server-server-api/#device-management)).
    /// The chain moves on even when no server shares a room with the user. `content` gets
    /// `stream_id` and `prev_id` added.
    pub fn send_device_list_update(
        &self,
        destinations: &[OwnedServerName],
        user_id: &UserId,
        stream_id_at_least: u64,
        mut content: Value,
    ) -> Result<u64, storage::Error> {
        let _order = self.device_list_edus.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let last = self
            .db
            .get_raw(DEVICE_LIST_EDUS, user_id.as_bytes())?
            .and_then(|bytes| keys::decode_u64(&bytes));
        let stream_id = match last {
            Some(last) => stream_id_at_least.max(last + 1),
            None => stream_id_at_least.max(1),
        };
        content["stream_id"] = json!(stream_id);
        content["prev_id"] = json!(last.into_iter().collect::<Vec<u64>>());
        let mut batch = self.db.batch();
        batch.put_raw(DEVICE_LIST_EDUS, user_id.as_bytes(), &keys::encode_u64(stream_id))?;
        if !destinations.is_empty() {
            let edu = json!({"edu_type": "m.device_list_update", "content": content});
            self.queue_in_batch(&mut batch, destinations, OutboundKind::Edu, &edu)?;
        }
        self.db.write(batch)?;
        self.wake(destinations);
        Ok(stream_id)
    }

    /// How many items wait for `destination` (for tests and admin views).
    pub fn pending_count(&self, destination: &ServerName) -> Result<usize, storage::Error> {
        let prefix = keys::prefix(&[destination.as_bytes()]);
        let mut count = 0;
        self.db.for_each_prefix(TABLE, &prefix, |_, _| {
            count += 1;
            true
        })?;
        Ok(count)
    }
}

impl OutboundQueue for Outbox {
    fn destinations(&self) -> Result<Vec<OwnedServerName>, federation::Error> {
        let mut destinations: Vec<OwnedServerName> = Vec::new();
        self.db
            .for_each_prefix(TABLE, b"", |key, _| {
                let name = key.split(|byte| *byte == keys::SEP).next().unwrap_or_default();
                if let Ok(name) = ServerName::parse(String::from_utf8_lossy(name).as_ref())
                    && destinations.last() != Some(&name)
                {
                    destinations.push(name);
                }
                true
            })
            .map_err(store_error)?;
        Ok(destinations)
    }

    fn pending(
        &self,
        destination: &ServerName,
        limit: usize,
    ) -> Result<Vec<OutboundItem>, federation::Error> {
        let prefix = keys::prefix(&[destination.as_bytes()]);
        let mut items = Vec::new();
        self.db
            .for_each_prefix(TABLE, &prefix, |key, value| {
                let id = keys::decode_u64(&key[prefix.len()..]);
                match (id, serde_json::from_slice::<Stored>(value)) {
                    (Some(id), Ok(stored)) => {
                        items.push(OutboundItem { id, kind: stored.kind, json: stored.json })
                    }
                    _ => tracing::warn!(%destination, "unreadable outbound item skipped"),
                }
                items.len() < limit
            })
            .map_err(store_error)?;
        Ok(items)
    }

    fn remove(&self, destination: &ServerName, ids: &[u64]) -> Result<(), federation::Error> {
        let mut batch = self.db.batch();
        for id in ids {
            let key = keys::join(&[destination.as_bytes(), &keys::encode_u64(*id)]);
            batch.delete(TABLE, &key).map_err(store_error)?;
        }
        self.db.write(batch).map_err(store_error)
    }
}

#[cfg(test)]
mod tests {
    use ruma::server_name;

    use super::*;

    #[test]
    fn queued_items_come_back_in_order_per_destination_and_go_once_removed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Db::open(dir.path()).expect("database");
        let outbox = Outbox::new(db.clone());
        let (a, b) = (server_name!("a.test").to_owned(), server_name!("b.test:8448").to_owned());
        let mut batch = db.batch();
        outbox
            .queue_in_batch(
                &mut batch,
                &[a.clone(), b.clone()],
                OutboundKind::Pdu,
                &json!({"n": 1}),
            )
            .expect("queue");
        db.write(batch).expect("write");
        outbox.send_edu(std::slice::from_ref(&b), "m.typing", json!({"n": 2})).expect("edu");

        assert_eq!(outbox.destinations().expect("destinations"), vec![a.clone(), b.clone()]);
        let pending = outbox.pending(&b, 10).expect("pending");
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0].kind, OutboundKind::Pdu);
        assert_eq!(pending[1].json["content"]["n"], 2);
        assert!(pending[0].id < pending[1].id);
        assert_eq!(outbox.pending(&b, 1).expect("pending").len(), 1);

        outbox.remove(&b, &[pending[0].id]).expect("remove");
        assert_eq!(outbox.pending_count(&b).expect("count"), 1);
        assert_eq!(outbox.pending_count(&a).expect("count"), 1);
        outbox.remove(&b, &[pending[1].id]).expect("remove");
        assert_eq!(outbox.destinations().expect("destinations"), vec![a]);
    }

    #[test]
    fn device_list_updates_about_a_user_form_a_chain_of_stream_ids() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Db::open(dir.path()).expect("database");
        let outbox = Outbox::new(db.clone());
        let peer = server_name!("peer.test").to_owned();
        let alice = ruma::user_id!("@alice:here.test");
        let bob = ruma::user_id!("@bob:here.test");
        let first = outbox
            .send_device_list_update(&[], alice, 7, json!({"device_id": "A"}))
            .expect("first");
        assert_eq!(first, 7);
        // Two deletions at the same key-change position still get distinct, rising ids.
        let destinations = std::slice::from_ref(&peer);
        let second = outbox
            .send_device_list_update(destinations, alice, 9, json!({"device_id": "B"}))
            .expect("second");
        let third = outbox
            .send_device_list_update(destinations, alice, 9, json!({"device_id": "C"}))
            .expect("third");
        assert_eq!((second, third), (9, 10));
        let other = outbox
            .send_device_list_update(destinations, bob, 3, json!({"device_id": "D"}))
            .expect("bob");
        assert_eq!(other, 3);

        let pending = outbox.pending(&peer, 10).expect("pending");
        let contents: Vec<&Value> = pending.iter().map(|item| &item.json["content"]).collect();
        assert_eq!(contents.len(), 3);
        assert_eq!(pending[0].json["edu_type"], "m.device_list_update");
        assert_eq!((&contents[0]["stream_id"], &contents[0]["prev_id"]), (&json!(9), &json!([7])));
        assert_eq!((&contents[1]["stream_id"], &contents[1]["prev_id"]), (&json!(10), &json!([9])));
        assert_eq!((&contents[2]["stream_id"], &contents[2]["prev_id"]), (&json!(3), &json!([])));
        assert_eq!(contents[1]["device_id"], "C");
    }
}
