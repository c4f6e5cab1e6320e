//! Room state snapshots, stored as deltas against a parent snapshot.
//!
//! A snapshot maps short state keys (type, state_key) to short event ids. Each state event
//! makes a new snapshot holding only its change and a pointer to the previous one; when the
//! chain of deltas grows long a full copy is written, so that loading never walks far
//! ([`full_copy_due`]). Events point at the snapshot before and after them.
//!
//! In memory a full map is a persistent hash map ([`imbl`]): the map after a state event
//! shares all but the changed path with the map before it, so adding an event to a room of
//! tens of thousands of state events neither copies them nor keeps a second copy cached.

use std::{collections::BTreeMap, sync::Arc};

use ruma::OwnedEventId;
use serde::{Deserialize, Serialize};
use storage::{Batch, Db, keys};

use crate::kept::Kept;

/// A chain of deltas is allowed at least this long before a full snapshot is written...
pub const FULL_EVERY: u32 = 50;
/// ...and, for a large state, one delta for every this many entries of it: a full copy of a
/// state of n entries then costs each of the n/64 events before it 64 entries of writing,
/// however large the room, where a fixed chain length made each event pay n/50 (a room of
/// 30,000 state events wrote a 30,000-entry copy every 50 events). Loading from a cold cache
/// reads at most n/64 small deltas besides the copy of n entries.
const ENTRIES_PER_DELTA: usize = 64;
const CACHE_MAX: usize = 2048;
/// How many snapshots' chain depths are kept.
const DEPTHS_MAX: usize = 65_536;

const SNAPSHOTS: &str = "snapshot_to_delta";
const STATE_KEY_TO_SHORT: &str = "state_key_to_short";
const SHORT_TO_STATE_KEY: &str = "short_to_state_key";

/// A full state map: short state key -> short event id.
pub type ShortState = imbl::HashMap<u64, u64>;

#[derive(Serialize, Deserialize)]
struct Snapshot {
    parent: Option<u64>,
    depth: u32,
    changes: Vec<(u64, u64)>,
}

/// How many (type, state_key) pairs of short ids are kept in memory before the kept ones are
/// dropped and read again.
const NAMES_MAX: usize = 65_536;

/// A (type, state_key) pair.
type StateKey = Arc<(String, String)>;

/// Recently used full state maps, and the (type, state_key) pairs behind short ids (which never
/// change once allocated).
pub struct SnapshotCache {
    maps: Kept<u64, Arc<ShortState>>,
    names: Kept<u64, StateKey>,
    /// How deep in its chain each snapshot is (they never change): a child's depth would
    /// otherwise parse its parent's stored record, a whole copy when the parent is a full one.
    depths: Kept<u64, u32>,
}

impl Default for SnapshotCache {
    fn default() -> Self {
        Self {
            maps: Kept::new(CACHE_MAX),
            names: Kept::new(NAMES_MAX),
            depths: Kept::new(DEPTHS_MAX),
        }
    }
}

/// Whether a snapshot whose parent is `parent_depth` deep, of `len` entries, is written as a
/// full copy rather than one more delta.
pub fn full_copy_due(parent_depth: u32, len: usize) -> bool {
    let allowed = FULL_EVERY.max(u32::try_from(len / ENTRIES_PER_DELTA).unwrap_or(u32::MAX));
    parent_depth + 1 >= allowed
}

/// How deep snapshot `id` is in its chain of deltas (0 for a full copy or none).
fn depth_of(db: &Db, cache: &SnapshotCache, id: Option<u64>) -> Result<u32, storage::Error> {
    let Some(id) = id else { return Ok(0) };
    if let Some(depth) = cache.depths.get(&id) {
        return Ok(depth);
    }
    let depth = db.get::<Snapshot>(SNAPSHOTS, &keys::encode_u64(id))?.map_or(0, |s| s.depth);
    cache.depths.insert(id, depth);
    Ok(depth)
}

impl SnapshotCache {
    fn get(&self, id: u64) -> Option<Arc<ShortState>> {
        self.maps.get(&id)
    }

    fn put(&self, id: u64, state: Arc<ShortState>) {
        self.maps.insert(id, state);
    }
}

/// The (type, state_key) pair behind a short state key id.
fn state_key_of_short(
    db: &Db,
    cache: &SnapshotCache,
    short: u64,
) -> Result<Option<StateKey>, storage::Error> {
    if let Some(names) = cache.names.get(&short) {
        return Ok(Some(names));
    }
    let Some(names) = db.get::<(String, String)>(SHORT_TO_STATE_KEY, &keys::encode_u64(short))?
    else {
        return Ok(None);
    };
    let names = Arc::new(names);
    cache.names.insert(short, names.clone());
    Ok(Some(names))
}

/// The short id of a (type, state_key) pair, if it has one.
pub fn state_key_short(
    db: &Db,
    kind: &str,
    state_key: &str,
) -> Result<Option<u64>, storage::Error> {
    let key = keys::join(&[kind.as_bytes(), state_key.as_bytes()]);
    Ok(db.get_raw(STATE_KEY_TO_SHORT, &key)?.as_deref().and_then(keys::decode_u64))
}

/// The short id of a (type, state_key) pair, allocated in `batch` when it has none yet.
pub fn state_key_short_or_new(
    db: &Db,
    batch: &mut Batch<'_>,
    kind: &str,
    state_key: &str,
) -> Result<u64, storage::Error> {
    if let Some(short) = state_key_short(db, kind, state_key)? {
        return Ok(short);
    }
    let short = db.next_short(batch)?;
    let key = keys::join(&[kind.as_bytes(), state_key.as_bytes()]);
    batch.put_raw(STATE_KEY_TO_SHORT, &key, &keys::encode_u64(short))?;
    batch.put(SHORT_TO_STATE_KEY, &keys::encode_u64(short), &(kind, state_key))?;
    Ok(short)
}

/// The event id behind a short id.
pub fn event_id_of_short(db: &Db, short: u64) -> Result<Option<OwnedEventId>, storage::Error> {
    Ok(db
        .get_raw("short_to_event_id", &keys::encode_u64(short))?
        .and_then(|bytes| OwnedEventId::try_from(String::from_utf8(bytes).ok()?).ok()))
}

/// Loads the full short state map of a snapshot (`None` is the empty state before a room's
/// create event).
pub fn load_snapshot(
    db: &Db,
    cache: &SnapshotCache,
    id: Option<u64>,
) -> Result<Arc<ShortState>, storage::Error> {
    let Some(id) = id else { return Ok(Arc::default()) };
    if let Some(state) = cache.get(id) {
        return Ok(state);
    }
    let mut chain = Vec::new();
    let mut next = Some(id);
    let mut base: Arc<ShortState> = Arc::default();
    while let Some(current) = next {
        if let Some(state) = cache.get(current) {
            base = state;
            break;
        }
        let Some(snapshot) = db.get::<Snapshot>(SNAPSHOTS, &keys::encode_u64(current))? else {
            break;
        };
        next = snapshot.parent;
        chain.push((current, snapshot));
    }
    // Every snapshot of the chain is kept, not only the one asked for: whoever walks a room's
    // history backwards (`/messages`, or `prev_content` over `/state`) asks next for an
    // ancestor, which would otherwise rebuild the chain from its full copy again (hundreds of
    // deltas over tens of thousands of entries, for every state event of a large room). The
    // maps share their structure, so each costs only the nodes its delta touched.
    let mut state = (*base).clone();
    let mut loaded = base;
    for (current, snapshot) in chain.iter().rev() {
        for (state_key, event) in &snapshot.changes {
            state.insert(*state_key, *event);
        }
        loaded = Arc::new(state.clone());
        cache.put(*current, loaded.clone());
    }
    Ok(loaded)
}

/// Writes a new snapshot: `parent` plus the state event `(kind, state_key) -> event_short`.
pub fn add_to_snapshot(
    db: &Db,
    cache: &SnapshotCache,
    batch: &mut Batch<'_>,
    parent: Option<u64>,
    kind: &str,
    state_key: &str,
    event_short: u64,
) -> Result<u64, storage::Error> {
    let state_key_short = state_key_short_or_new(db, batch, kind, state_key)?;
    let id = db.next_short(batch)?;
    let parent_depth = depth_of(db, cache, parent)?;
    let mut full = (*load_snapshot(db, cache, parent)?).clone();
    full.insert(state_key_short, event_short);
    let snapshot = if parent.is_none() || full_copy_due(parent_depth, full.len()) {
        Snapshot { parent: None, depth: 0, changes: full.iter().map(|(k, v)| (*k, *v)).collect() }
    } else {
        Snapshot { parent, depth: parent_depth + 1, changes: vec![(state_key_short, event_short)] }
    };
    put_snapshot(cache, batch, id, &snapshot, full)
}

/// Writes a snapshot holding exactly `full`: a delta against `parent` when `full` only adds to
/// or replaces entries of it, a full copy otherwise (or when the chain is long).
pub fn write_snapshot(
    db: &Db,
    cache: &SnapshotCache,
    batch: &mut Batch<'_>,
    parent: Option<u64>,
    full: ShortState,
) -> Result<u64, storage::Error> {
    let id = db.next_short(batch)?;
    let base = load_snapshot(db, cache, parent)?;
    let parent_depth = depth_of(db, cache, parent)?;
    let removes = base.keys().any(|key| !full.contains_key(key));
    let snapshot = if parent.is_none() || removes || full_copy_due(parent_depth, full.len()) {
        Snapshot { parent: None, depth: 0, changes: full.iter().map(|(k, v)| (*k, *v)).collect() }
    } else {
        let changes =
            full.iter().filter(|(k, v)| base.get(k) != Some(v)).map(|(k, v)| (*k, *v)).collect();
        Snapshot { parent, depth: parent_depth + 1, changes }
    };
    put_snapshot(cache, batch, id, &snapshot, full)
}

/// Writes snapshot `id` in `batch` and keeps its depth and its full map.
fn put_snapshot(
    cache: &SnapshotCache,
    batch: &mut Batch<'_>,
    id: u64,
    snapshot: &Snapshot,
    full: ShortState,
) -> Result<u64, storage::Error> {
    batch.put(SNAPSHOTS, &keys::encode_u64(id), snapshot)?;
    cache.depths.insert(id, snapshot.depth);
    cache.put(id, Arc::new(full));
    Ok(id)
}

/// The short id of an event, if it has one.
pub fn short_of_event(db: &Db, event_id: &ruma::EventId) -> Result<Option<u64>, storage::Error> {
    Ok(db.get_raw("event_id_to_short", event_id.as_bytes())?.as_deref().and_then(keys::decode_u64))
}

/// The state of a snapshot with full keys and event ids.
pub fn resolve_snapshot(
    db: &Db,
    cache: &SnapshotCache,
    id: Option<u64>,
) -> Result<BTreeMap<(String, String), OwnedEventId>, storage::Error> {
    resolve_changes(db, cache, id, None, |_, _| true)
}

/// The entries of snapshot `id` that differ from snapshot `since` (all of them without
/// `since`) and whose (type, state_key) `keep` accepts, with full keys and event ids. The
/// comparison and `keep` run before any event id is read, so a `/sync` that wants a few
/// members of a large room reads only those.
pub fn resolve_changes(
    db: &Db,
    cache: &SnapshotCache,
    id: Option<u64>,
    since: Option<Option<u64>>,
    keep: impl Fn(&str, &str) -> bool,
) -> Result<BTreeMap<(String, String), OwnedEventId>, storage::Error> {
    let short_state = load_snapshot(db, cache, id)?;
    let before = since.map(|since| load_snapshot(db, cache, since)).transpose()?;
    let mut state = BTreeMap::new();
    for (state_key_short, event_short) in short_state.iter() {
        if before.as_ref().is_some_and(|before| before.get(state_key_short) == Some(event_short)) {
            continue;
        }
        let Some(names) = state_key_of_short(db, cache, *state_key_short)? else {
            continue;
        };
        let (kind, state_key) = &*names;
        if !keep(kind, state_key) {
            continue;
        }
        if let Some(event_id) = event_id_of_short(db, *event_short)? {
            state.insert((kind.clone(), state_key.clone()), event_id);
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stores `event_id` under a short id, the way an event's rows do.
    fn store_event(db: &Db, short: u64, event_id: &str) {
        let mut batch = db.batch();
        batch.put_raw("short_to_event_id", &keys::encode_u64(short), event_id.as_bytes()).unwrap();
        db.write(batch).unwrap();
    }

    #[test]
    fn changes_are_the_differing_entries_that_pass_the_filter() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let cache = SnapshotCache::default();
        let mut parent = None;
        let mut snapshots = Vec::new();
        let entries = [
            ("m.room.create", "", 1, "$create"),
            ("m.room.member", "@a:x", 2, "$a"),
            ("m.room.member", "@b:x", 3, "$b"),
            ("m.room.name", "", 4, "$name"),
            ("m.room.member", "@b:x", 5, "$b2"),
        ];
        for (kind, state_key, short, event_id) in entries {
            store_event(&db, short, event_id);
            let mut batch = db.batch();
            let id =
                add_to_snapshot(&db, &cache, &mut batch, parent, kind, state_key, short).unwrap();
            db.write(batch).unwrap();
            parent = Some(id);
            snapshots.push(parent);
        }
        let key = |kind: &str, state_key: &str| (kind.to_owned(), state_key.to_owned());
        let id = |id: &str| OwnedEventId::try_from(id).unwrap();
        // A cold cache reads the names from the store.
        let cold = SnapshotCache::default();
        let all = resolve_snapshot(&db, &cold, parent).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[&key("m.room.member", "@b:x")], id("$b2"));
        // Against the state after the first member: the second member, the name and the new
        // event of `@b:x`; not the create event nor `@a:x`, which did not change.
        let changed = resolve_changes(&db, &cold, parent, Some(snapshots[1]), |_, _| true).unwrap();
        assert_eq!(
            changed,
            BTreeMap::from([
                (key("m.room.member", "@b:x"), id("$b2")),
                (key("m.room.name", ""), id("$name"))
            ])
        );
        // The filter sees each (type, state_key) and drops what it refuses.
        let no_members =
            resolve_changes(&db, &cache, parent, None, |kind, _| kind != "m.room.member").unwrap();
        assert_eq!(
            no_members.keys().cloned().collect::<Vec<_>>(),
            [key("m.room.create", ""), key("m.room.name", "")]
        );
        // Nothing changed against itself.
        assert!(
            resolve_changes(&db, &cache, parent, Some(parent), |_, _| true).unwrap().is_empty()
        );
    }

    #[test]
    fn large_states_are_copied_whole_less_often() {
        assert!(!full_copy_due(FULL_EVERY - 2, 100));
        assert!(full_copy_due(FULL_EVERY - 1, 100));
        assert!(!full_copy_due(400, 30_000));
        assert!(full_copy_due(30_000 / 64 - 1, 30_000));
        // A chain longer than FULL_EVERY over a large state loads the same from a cold cache,
        // and its depth is read from the store when the cache does not know it.
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let cache = SnapshotCache::default();
        let entries = 64 * (FULL_EVERY as usize + 30);
        // Keys far above the short ids the new members' (type, state_key) pairs get.
        let full: ShortState =
            (0..entries as u64).map(|key| (key + 1_000_000, key + 100_000)).collect();
        let mut batch = db.batch();
        let mut parent = Some(write_snapshot(&db, &cache, &mut batch, None, full).unwrap());
        db.write(batch).unwrap();
        let (mut depths, mut ids) = (Vec::new(), Vec::new());
        for index in 0..(FULL_EVERY + 40) as u64 {
            let mut batch = db.batch();
            let kind = "m.room.member";
            let id = add_to_snapshot(
                &db,
                &cache,
                &mut batch,
                parent,
                kind,
                &format!("@u{index}:x"),
                index + 1,
            )
            .unwrap();
            db.write(batch).unwrap();
            parent = Some(id);
            ids.push(id);
            depths.push(depth_of(&db, &SnapshotCache::default(), parent).unwrap());
        }
        // One full copy in the 90 deltas (allowed 81 deep), not one every 50.
        assert_eq!(depths.iter().filter(|depth| **depth == 0).count(), 1, "{depths:?}");
        assert_eq!(depths[..80], (1..=80).collect::<Vec<u32>>()[..]);
        let cold_cache = SnapshotCache::default();
        let cold = load_snapshot(&db, &cold_cache, parent).unwrap();
        assert_eq!(cold.len(), entries + (FULL_EVERY as usize + 40));
        assert_eq!(*cold, *load_snapshot(&db, &cache, parent).unwrap());
        // The cold load kept the snapshots it passed through, back to the full copy, equal to
        // what the warm cache built as they were written.
        let copy = depths.iter().rposition(|depth| *depth == 0).unwrap();
        for id in &ids[copy..] {
            assert_eq!(*cold_cache.get(*id).expect("kept"), *cache.get(*id).unwrap());
        }
        assert!(cold_cache.get(ids[copy - 1]).is_none());
    }

    #[test]
    fn long_chains_reload_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let cache = SnapshotCache::default();
        let mut parent = None;
        for index in 0..(FULL_EVERY * 2 + 3) as u64 {
            let mut batch = db.batch();
            let id = add_to_snapshot(
                &db,
                &cache,
                &mut batch,
                parent,
                "m.room.member",
                &format!("@u{}:x", index % 7),
                index + 1000,
            )
            .unwrap();
            db.write(batch).unwrap();
            parent = Some(id);
        }
        let cold = SnapshotCache::default();
        let state = load_snapshot(&db, &cold, parent).unwrap();
        assert_eq!(state.len(), 7);
        assert_eq!(*state, *load_snapshot(&db, &cache, parent).unwrap());
        assert!(state.values().any(|event| *event == 1000 + (FULL_EVERY * 2 + 2) as u64));
    }
}
