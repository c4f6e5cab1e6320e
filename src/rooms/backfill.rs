//! Backfill: history older than anything this server has of a room (everything before our
//! join, say), asked of the other servers in the room when a client paginates past it.
//!
//! [Backfilling](https://spec.matrix.org/v1.16/server-server-api/#backfilling-and-retrieving-missing-events)
//!
//! Every backfilled event is checked as a received PDU is (format, signatures, content hash,
//! auth against its auth events, then against the state before it) and stored as
//! *historical*: with its PDU, metadata and state snapshots, but at no stream position. It is
//! never a forward extremity, never changes the current state, never shows in `/sync` and
//! never notifies. Its place is its *order* in `room_order_to_historical_event_id`: every
//! batch is given orders below the oldest one stored, oldest event first, so `/messages`
//! reads it newest first after the timeline's oldest event.

use std::collections::{BTreeMap, HashSet};

use ruma::{
    OwnedEventId, OwnedServerName, RoomId, ServerName, events::StateEventType,
    room_version_rules::RoomVersionRules,
};
use storage::keys;
use tracing::instrument;

use super::{
    Direction, EventMeta, METAS, Pdu, RoomError, Rooms,
    ingest::{Checked, IngestError, Remote, ShortIds},
    state,
};

/// The table of historical events: (room, order) -> event id.
const HISTORY: &str = "room_order_to_historical_event_id";

/// How many of the oldest events are looked at for prev events we lack.
const OLDEST_EVENTS_LOOKED_AT: usize = 50;

/// The most event ids one backfill starts from (`v`).
const BACKFILL_FROM_MAX: usize = 20;

fn history_key(room_id: &RoomId, order: u64) -> Vec<u8> {
    let mut key = keys::prefix(&[room_id.as_bytes()]);
    key.extend_from_slice(&keys::encode_u64(order));
    key
}

impl Rooms {
    /// Historical events of a room with their orders: going backward, those ordered below
    /// `bound`, newest first; going forward, those ordered at or above it, oldest first.
    pub fn history(
        &self,
        room_id: &RoomId,
        bound: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<(u64, OwnedEventId)>, RoomError> {
        let prefix = keys::prefix(&[room_id.as_bytes()]);
        let mut events = Vec::new();
        if limit == 0 {
            return Ok(events);
        }
        let mut visit = |key: &[u8], value: &[u8]| {
            let Some(order) = key.get(prefix.len()..).and_then(keys::decode_u64) else {
                return true;
            };
            if let Ok(event_id) = serde_json::from_slice::<OwnedEventId>(value) {
                events.push((order, event_id));
            }
            events.len() < limit
        };
        match direction {
            Direction::Backward => {
                if bound == 0 {
                    return Ok(events);
                }
                let start = history_key(room_id, bound - 1);
                self.db().for_each_prefix_rev(HISTORY, &prefix, &start, &mut visit)?;
            }
            Direction::Forward => {
                let start = history_key(room_id, bound);
                self.db().for_each_prefix_from(HISTORY, &prefix, &start, &mut visit)?;
            }
        }
        Ok(events)
    }

    /// The oldest events we have of a room: the oldest historical ones, or, before any
    /// backfill, the start of the timeline.
    fn oldest_events(&self, room_id: &RoomId) -> Result<Vec<OwnedEventId>, RoomError> {
        let history = self.history(room_id, 0, Direction::Forward, OLDEST_EVENTS_LOOKED_AT)?;
        if !history.is_empty() {
            return Ok(history.into_iter().map(|(_, event_id)| event_id).collect());
        }
        Ok(self
            .timeline(room_id, 0, None, Direction::Forward, OLDEST_EVENTS_LOOKED_AT)?
            .into_iter()
            .map(|(_, event_id)| event_id)
            .collect())
    }

    /// Where backfill starts: the prev events of our oldest events that we do not have, or
    /// know only as outliers (without their state).
    pub fn backward_extremities(&self, room_id: &RoomId) -> Result<Vec<OwnedEventId>, RoomError> {
        let mut from = Vec::new();
        for event_id in self.oldest_events(room_id)? {
            let Some(pdu) = self.pdu(&event_id)? else { continue };
            for prev in self.missing_prev_events(&pdu)? {
                if !from.contains(&prev) && from.len() < BACKFILL_FROM_MAX {
                    from.push(prev);
                }
            }
        }
        Ok(from)
    }

    /// Whether backward pagination may find events before the timeline's oldest: some are
    /// stored as history, or could be backfilled.
    pub fn has_history(&self, room_id: &RoomId) -> Result<bool, RoomError> {
        Ok(!self.history(room_id, u64::MAX, Direction::Backward, 1)?.is_empty()
            || !self.backward_extremities(room_id)?.is_empty())
    }

    /// Asks the servers in the room, one after the other (at most `backfill_servers_max`),
    /// for the events before our oldest, and stores those that pass the checks as history.
    /// Returns how many were stored; a server that fails or sends nothing usable is skipped,
    /// and when none helps nothing changes.
    #[instrument(skip_all, fields(room_id = %room_id))]
    pub async fn backfill(&self, room_id: &RoomId, remote: &Remote) -> Result<usize, RoomError> {
        let lock = self.backfill_lock(room_id);
        let _guard = lock.lock().await;
        let from = self.backward_extremities(room_id)?;
        if from.is_empty() {
            return Ok(0);
        }
        let limits = self.inner.limits;
        // The servers of the events that name the missing ones are the likeliest to have
        // them; then every other server in the room.
        let mut servers: Vec<OwnedServerName> = Vec::new();
        for event_id in self.oldest_events(room_id)? {
            if let Some(pdu) = self.pdu(&event_id)?
                && pdu.prev_events.iter().any(|prev| from.contains(prev))
            {
                servers.push(pdu.sender.server_name().to_owned());
            }
        }
        servers.extend(self.servers_in_room(room_id)?);
        let mut seen = HashSet::new();
        servers.retain(|server| server != self.server_name() && seen.insert(server.clone()));
        servers.truncate(limits.backfill_servers_max);
        for server in &servers {
            let events = match remote
                .events
                .backfill(server, room_id, &from, limits.backfill_events_max)
                .await
            {
                Ok(events) => events,
                Err(error) => {
                    tracing::info!(%server, %error, "backfill from this server failed");
                    continue;
                }
            };
            let mut checked: Vec<Checked> = Vec::new();
            for json in events.into_iter().take(limits.backfill_events_max) {
                match self.check_received(json, remote).await {
                    Ok(event) if event.pdu.room_id == room_id => {
                        if !checked.iter().any(|known| known.pdu.event_id == event.pdu.event_id) {
                            checked.push(event);
                        }
                    }
                    Ok(event) => {
                        tracing::info!(event_id = %event.pdu.event_id, "backfilled event of another room dropped");
                    }
                    Err(error) => tracing::info!(%server, %error, "backfilled event dropped"),
                }
            }
            let stored = self.store_history(server, room_id, checked, remote).await?;
            tracing::info!(%server, stored, "backfilled");
            if stored > 0 {
                return Ok(stored);
            }
        }
        Ok(0)
    }

    /// Stores checked backfilled events as history, oldest first, each once it passes the
    /// auth rules against its auth events and against the state before it.
    async fn store_history(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        mut checked: Vec<Checked>,
        remote: &Remote,
    ) -> Result<usize, RoomError> {
        checked.retain(|event| {
            self.meta(&event.pdu.event_id).ok().flatten().is_none_or(|meta| meta.outlier)
        });
        let ordered = oldest_first(checked);
        let count = u64::try_from(ordered.len()).unwrap_or(u64::MAX);
        let below = match self.history(room_id, 0, Direction::Forward, 1)?.first() {
            Some((order, _)) => *order,
            None => u64::MAX,
        };
        let first_order = below.saturating_sub(count);
        let mut stored = 0;
        for (index, Checked { pdu, rules }) in ordered.into_iter().enumerate() {
            let order = first_order + u64::try_from(index).unwrap_or(u64::MAX);
            if order >= below {
                break;
            }
            match self.accept_historical(server, &pdu, &rules, order, remote).await {
                Ok(true) => stored += 1,
                Ok(false) => {}
                Err(IngestError::Room(error)) => return Err(error),
                Err(error) => {
                    tracing::info!(event_id = %pdu.event_id, %error, "backfilled event rejected");
                }
            }
        }
        Ok(stored)
    }

    /// Checks one backfilled event against its auth events and the state before it, and
    /// stores it as history at `order`. `false`: it was stored meanwhile.
    async fn accept_historical(
        &self,
        server: &ServerName,
        pdu: &Pdu,
        rules: &RoomVersionRules,
        order: u64,
        remote: &Remote,
    ) -> Result<bool, IngestError> {
        self.fetch_missing_auth_events(server, pdu, remote).await?;
        self.check_auth_events(pdu, rules).map_err(IngestError::AuthEvents)?;
        // The state before it: nothing before the create event; the state after its prev
        // events when we have them all with their state (resolved where they differ);
        // otherwise the state the server says it had there.
        let mut prev_snapshots: Vec<Option<u64>> = Vec::new();
        let mut prevs_known = true;
        for prev in &pdu.prev_events {
            match self.meta(prev)? {
                Some(meta) if !meta.outlier && meta.room_id == pdu.room_id => {
                    if !prev_snapshots.contains(&meta.state_after) {
                        prev_snapshots.push(meta.state_after);
                    }
                }
                _ => prevs_known = false,
            }
        }
        let (state_before, parent) = if pdu.prev_events.is_empty() {
            (BTreeMap::new(), None)
        } else if prevs_known && let [snapshot] = prev_snapshots.as_slice() {
            (self.state_at(*snapshot)?, *snapshot)
        } else if prevs_known {
            let states = prev_snapshots
                .iter()
                .map(|snapshot| self.state_at(*snapshot))
                .collect::<Result<Vec<_>, _>>()?;
            (self.resolve_states(rules, states, None)?, None)
        } else {
            (self.fetch_state_at(server, pdu, remote).await?, None)
        };
        ruma::state_res::check_state_dependent_auth_rules(
            &rules.authorization,
            pdu,
            |kind: &StateEventType, state_key: &str| {
                let event_id = state_before.get(&(kind.to_string(), state_key.to_owned()))?;
                self.pdu(event_id).ok().flatten()
            },
        )
        .map_err(IngestError::StateBefore)?;
        let redaction_applies = match &pdu.redacts {
            Some(redacts) => self.remote_redaction_applies(&state_before, pdu, redacts)?,
            None => false,
        };

        let lock = self.room_lock(&pdu.room_id);
        let _guard = lock.lock().await;
        let known = self.meta(&pdu.event_id)?;
        if known.as_ref().is_some_and(|meta| !meta.outlier) {
            return Ok(false);
        }
        let db = self.db();
        let mut batch = db.batch();
        let short = match state::short_of_event(db, &pdu.event_id)? {
            Some(short) => short,
            None => {
                let short = db.next_short(&mut batch)?;
                self.write_pdu_rows(&mut batch, pdu, short)?;
                short
            }
        };
        let mut shorts = ShortIds::default();
        let before =
            self.write_state(&mut batch, &mut shorts, parent, &state_before, pdu, short)?;
        let after = match &pdu.state_key {
            Some(state_key) => {
                let mut state_after = state_before.clone();
                state_after.insert((pdu.kind.to_string(), state_key.clone()), pdu.event_id.clone());
                self.write_state(&mut batch, &mut shorts, Some(before), &state_after, pdu, short)?
            }
            None => before,
        };
        let meta = EventMeta {
            room_id: pdu.room_id.clone(),
            // Older than every stream position: nothing `/sync` reports.
            position: 0,
            short,
            state_before: Some(before),
            state_after: Some(after),
            transaction: None,
            redacted_by: known.and_then(|meta| meta.redacted_by),
            soft_failed: false,
            current_after: None,
            outlier: false,
        };
        batch.put(METAS, pdu.event_id.as_bytes(), &meta)?;
        batch.put(HISTORY, &history_key(&pdu.room_id, order), &pdu.event_id)?;
        if redaction_applies
            && let Some(redacts) = &pdu.redacts
            && let Some(mut target) = db.get::<EventMeta>(METAS, redacts.as_bytes())?
            && target.room_id == pdu.room_id
            && target.redacted_by.is_none()
        {
            target.redacted_by = Some(pdu.event_id.clone());
            batch.put(METAS, redacts.as_bytes(), &target)?;
        }
        db.write(batch)?;
        Ok(true)
    }
}

/// Events ordered so that each comes after those of its prev events that are among them
/// (by depth, then id, where the DAG leaves a choice).
fn oldest_first(mut events: Vec<Checked>) -> Vec<Checked> {
    events.sort_by(|a, b| (a.pdu.depth, &a.pdu.event_id).cmp(&(b.pdu.depth, &b.pdu.event_id)));
    let ids: HashSet<OwnedEventId> =
        events.iter().map(|event| event.pdu.event_id.clone()).collect();
    let mut placed: HashSet<OwnedEventId> = HashSet::new();
    let mut ordered = Vec::with_capacity(events.len());
    while !events.is_empty() {
        let before = ordered.len();
        let mut waiting = Vec::new();
        for event in events {
            let ready = event
                .pdu
                .prev_events
                .iter()
                .all(|prev| !ids.contains(prev) || placed.contains(prev));
            if ready {
                placed.insert(event.pdu.event_id.clone());
                ordered.push(event);
            } else {
                waiting.push(event);
            }
        }
        events = waiting;
        if ordered.len() == before {
            // Event ids are hashes, so prev events form no cycle; should they seem to, the
            // rest keep their depth order.
            ordered.append(&mut events);
        }
    }
    ordered
}
