//! The room core: the one place where events are built, authorized, persisted and announced.
//!
//! Every event is a full PDU of its room version: `prev_events` from the forward extremities,
//! `auth_events` chosen by the auth-event selection rules, a content hash, this server's
//! signature and an event id as the room version defines it. Authorization uses ruma's
//! implementation of the room version's auth rules against the room's current state. One
//! accepted event is one RocksDB batch at one new stream position.

pub mod backfill;
pub mod create;
pub mod directory;
pub mod ingest;
pub mod membership;
pub mod pdu;
pub mod peers;
pub mod remote_membership;
mod resolution;
pub mod state;

use std::{
    borrow::Borrow,
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use federation::{OutboundKind, ServerSigningKey};
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, DeviceId, EventId, MilliSecondsSinceUnixEpoch,
    OwnedEventId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomId, RoomVersionId, ServerName,
    UserId, events::TimelineEventType, room_version_rules::EventsReferenceFormatVersion,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use storage::{Batch, Db, keys};
use tracing::instrument;

use crate::{kept::Kept, notify::Notifier, outbox::Outbox};
pub use pdu::Pdu;

/// Why a room operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    /// The room is not known here.
    #[error("room not found")]
    NotFound,
    /// The event is not known here (or not visible).
    #[error("event not found")]
    EventNotFound,
    /// The auth rules (or a server-side rule) forbid it.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The event content is not valid for its type.
    #[error("bad event: {0}")]
    BadEvent(String),
    /// The room version is not one we can create.
    #[error("unsupported room version {0}")]
    UnsupportedRoomVersion(String),
    /// The event is larger than the 64 KiB a PDU may be.
    #[error("event too large")]
    TooLarge,
    /// The alias is taken.
    #[error("alias already exists")]
    AliasInUse,
    /// The alias is not valid.
    #[error("invalid alias: {0}")]
    InvalidAlias(String),
    /// A request parameter is not valid (a pagination token, say).
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    /// Signing failed.
    #[error(transparent)]
    Signing(#[from] federation::Error),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] storage::Error),
    /// A stored PDU did not parse.
    #[error(transparent)]
    Pdu(#[from] pdu::PduError),
    /// No other server could help (unreachable, or its answer was unusable).
    #[error("remote server: {0}")]
    Remote(String),
}

/// What we keep about a room.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoomRecord {
    /// The room version.
    pub room_version: RoomVersionId,
    /// The `prev_events` of the next event.
    pub forward_extremities: Vec<OwnedEventId>,
    /// The highest depth seen.
    pub depth: u64,
    /// The state snapshot after the newest event.
    pub current_snapshot: Option<u64>,
    /// The stream position of the newest event.
    pub last_position: u64,
}

/// What we keep about an event besides its PDU. Fields at their default (none, false) are
/// not written, so the common row stays short; reading fills them back in.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventMeta {
    /// The room.
    pub room_id: OwnedRoomId,
    /// Its stream position.
    pub position: u64,
    /// Its short id.
    pub short: u64,
    /// The state snapshot before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_before: Option<u64>,
    /// The state snapshot after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_after: Option<u64>,
    /// The device and transaction id it was sent with, for `unsigned.transaction_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction: Option<(String, String)>,
    /// The redaction that redacted it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redacted_by: Option<OwnedEventId>,
    /// A remote event that passed the auth rules at its place in the DAG but not against the
    /// room's current state: stored, but neither in the timeline nor a forward extremity
    /// ([soft failure](https://spec.matrix.org/v1.16/server-server-api/#soft-failure)).
    #[serde(default, skip_serializing_if = "is_false")]
    pub soft_failed: bool,
    /// The room's current state after this event was accepted, when it differs from
    /// `state_after` (the DAG had other forward extremities whose state was resolved in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_after: Option<u64>,
    /// A state event learnt from a resident server's answer when this server joined: shown
    /// to clients as room state, but with no state of its own here (its state is not known),
    /// so it counts as missing when a later event names it as a prev event.
    #[serde(default, skip_serializing_if = "is_false")]
    pub outlier: bool,
}

/// Fields that are false in almost every row are left out of it (see [`EventMeta`]).
fn is_false(value: &bool) -> bool {
    !*value
}

/// A user's membership in a room, as indexed for lookups.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MembershipRecord {
    /// `join`, `invite`, `leave`, `ban` or `knock`.
    pub membership: String,
    /// The newest member event.
    pub event_id: OwnedEventId,
    /// The stream position at which this membership began (profile changes keep it).
    pub position: u64,
    /// Whether the user forgot the room.
    #[serde(default)]
    pub forgotten: bool,
    /// For an invite to a room this server is not in: the stripped state the inviting server
    /// sent, shown in `/sync`'s invite section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invite_state: Option<Vec<Value>>,
}

/// An event a local user wants to send.
#[derive(Clone, Debug)]
pub struct NewEvent {
    /// The type.
    pub kind: String,
    /// The content.
    pub content: Value,
    /// Present for state events.
    pub state_key: Option<String>,
    /// For redactions: the redacted event.
    pub redacts: Option<OwnedEventId>,
}

impl NewEvent {
    /// A state event.
    pub fn state(kind: impl Into<String>, state_key: impl Into<String>, content: Value) -> Self {
        Self { kind: kind.into(), content, state_key: Some(state_key.into()), redacts: None }
    }

    /// A message-like event.
    pub fn message(kind: impl Into<String>, content: Value) -> Self {
        Self { kind: kind.into(), content, state_key: None, redacts: None }
    }
}

/// A client transaction: the same (user, device, txn id) yields the same event.
#[derive(Clone, Debug)]
pub struct Transaction {
    /// The device.
    pub device_id: String,
    /// The client's transaction id.
    pub txn_id: String,
}

/// A persisted event.
#[derive(Clone, Debug)]
pub struct Appended {
    /// Its id.
    pub event_id: OwnedEventId,
    /// Its stream position.
    pub position: u64,
}

/// The room core component.
#[derive(Clone)]
pub struct Rooms {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    signing_key: Arc<ServerSigningKey>,
    default_room_version: RoomVersionId,
    notifier: Notifier,
    room_locks: Mutex<HashMap<OwnedRoomId, Arc<tokio::sync::Mutex<()>>>>,
    /// One backfill per room at a time: a second pagination waits, then finds the events.
    backfill_locks: Mutex<HashMap<OwnedRoomId, Arc<tokio::sync::Mutex<()>>>>,
    snapshots: state::SnapshotCache,
    outbox: Outbox,
    members: MemberCache,
    auth_pdus: AuthPduCache,
    /// Room versions by room: a room's version is fixed at its creation and a room record is
    /// never deleted, so an entry never goes stale. Every received PDU needs its room's version
    /// before anything else (for its event id), which would otherwise read and parse the
    /// whole room record.
    room_versions: Kept<OwnedRoomId, RoomVersionId>,
    limits: ingest::Limits,
}

/// How many room versions [`Inner::room_versions`] keeps.
const ROOM_VERSIONS_MAX: usize = 4096;

/// How many PDUs [`Rooms::pdus`] reads in one batched lookup.
const PDUS_PER_BATCH_READ: usize = 1024;

/// How many parsed auth events are kept before the kept ones are dropped and read again.
const AUTH_PDUS_MAX: usize = 1024;

/// Parsed state events recently used to authorize events: every message of a room is checked
/// against the same create event, power levels and its sender's membership, twice (against
/// its auth events and against the state before it). A stored PDU never changes (a redaction
/// is kept beside it), so an entry is never stale.
struct AuthPduCache {
    pdus: Kept<OwnedEventId, Arc<Pdu>>,
}

impl Default for AuthPduCache {
    fn default() -> Self {
        Self { pdus: Kept::new(AUTH_PDUS_MAX) }
    }
}

/// The last answer of [`Rooms::visible_to_memo`]: a state snapshot and whether its events
/// are visible.
#[derive(Default)]
pub struct VisibilityMemo {
    last: Option<(u64, bool)>,
}

/// Whether `pdu` is `user_id`'s own member event (whose own membership decides whether they
/// see it).
fn own_member_event(user_id: &UserId, pdu: &Pdu) -> bool {
    pdu.kind == TimelineEventType::RoomMember && pdu.state_key.as_deref() == Some(user_id.as_str())
}

/// A stored PDU parsed; an error names the event.
fn parse_stored(event_id: &EventId, bytes: &[u8]) -> Result<Pdu, pdu::PduError> {
    Pdu::from_slice(event_id.to_owned(), bytes)
        .map_err(|error| pdu::PduError(format!("stored PDU {event_id}: {}", error.0)))
}

/// The per-room async lock of `locks`, made on first use.
fn lock_of(
    locks: &Mutex<HashMap<OwnedRoomId, Arc<tokio::sync::Mutex<()>>>>,
    room_id: &RoomId,
) -> Arc<tokio::sync::Mutex<()>> {
    let mut locks = locks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    locks.entry(room_id.to_owned()).or_default().clone()
}

/// Each room's members and the other servers joined to it, kept so that neither a new event
/// (where it goes) nor a `/sync` (device lists, summaries, counts) scans the room's member rows.
/// An entry is good for the room's membership version it was read at; the version moves after
/// every committed write that changes a member event of the room, so an answer read while such
/// a write was under way is never kept past it.
#[derive(Default)]
struct MemberCache {
    rooms: Mutex<HashMap<OwnedRoomId, MemberCacheEntry>>,
}

#[derive(Default)]
struct MemberCacheEntry {
    version: u64,
    /// Read at `version`: a membership change clears both.
    members: Option<Arc<RoomMembers>>,
    servers: Option<Arc<[OwnedServerName]>>,
}

/// A room's members (every membership) as its current state has them.
#[derive(Debug, Default)]
pub struct RoomMembers {
    /// Every member with a member event in the current state, in user id order.
    pub all: Vec<(OwnedUserId, MembershipRecord)>,
    /// The joined ones among them, in the same order.
    pub joined: Vec<OwnedUserId>,
}

impl MemberCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<OwnedRoomId, MemberCacheEntry>> {
        self.rooms.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What `pick` finds in the room's entry if it is kept, else the version a fresh read
    /// belongs to.
    fn get<T: Clone>(
        &self,
        room_id: &RoomId,
        pick: impl FnOnce(&MemberCacheEntry) -> Option<T>,
    ) -> Result<T, u64> {
        let rooms = self.lock();
        let Some(entry) = rooms.get(room_id) else { return Err(0) };
        pick(entry).ok_or(entry.version)
    }

    /// Lets `put` keep a fresh read made at `version`, unless the membership moved meanwhile.
    fn put(&self, room_id: &RoomId, version: u64, put: impl FnOnce(&mut MemberCacheEntry)) {
        let mut rooms = self.lock();
        let entry = rooms.entry(room_id.to_owned()).or_default();
        if entry.version == version {
            put(entry);
        }
    }

    /// Called after a write that changed a member event of the room has been committed.
    fn membership_changed(&self, room_id: &RoomId) {
        let mut rooms = self.lock();
        let entry = rooms.entry(room_id.to_owned()).or_default();
        entry.version = entry.version.wrapping_add(1);
        entry.members = None;
        entry.servers = None;
    }
}

/// The largest PDU, in bytes of canonical JSON ([size limits](https://spec.matrix.org/v1.16/client-server-api/#size-limits)).
pub const PDU_BYTES_MAX: usize = 65_536;

const ROOMS: &str = "room_id_to_room";
const PDUS: &str = "event_id_to_pdu";
pub(crate) const METAS: &str = "event_id_to_meta";
const TIMELINE: &str = "room_position_to_event_id";
const CURRENT_STATE: &str = "room_state_key_to_event_id";
const USER_ROOMS: &str = "user_room_to_membership";
const ROOM_USERS: &str = "room_user_to_membership";
const TXNS: &str = "txn_to_event_id";
const RELATIONS: &str = "event_relations";

/// The two ways through a room's timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Towards older events.
    Backward,
    /// Towards newer events.
    Forward,
}

impl Rooms {
    /// The room core over `db`, signing with `signing_key`, fetching from other servers no
    /// more than `limits` allow.
    pub fn new(
        db: Db,
        signing_key: Arc<ServerSigningKey>,
        default_room_version: RoomVersionId,
        notifier: Notifier,
        outbox: Outbox,
        limits: ingest::Limits,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                db,
                signing_key,
                default_room_version,
                notifier,
                room_locks: Mutex::new(HashMap::new()),
                backfill_locks: Mutex::new(HashMap::new()),
                snapshots: state::SnapshotCache::default(),
                outbox,
                members: MemberCache::default(),
                auth_pdus: AuthPduCache::default(),
                room_versions: Kept::new(ROOM_VERSIONS_MAX),
                limits,
            }),
        }
    }

    pub(crate) fn db(&self) -> &Db {
        &self.inner.db
    }

    /// This server's name.
    pub fn server_name(&self) -> &OwnedServerName {
        self.inner.signing_key.server_name()
    }

    /// The room version new rooms get.
    pub fn default_room_version(&self) -> &RoomVersionId {
        &self.inner.default_room_version
    }

    fn room_lock(&self, room_id: &RoomId) -> Arc<tokio::sync::Mutex<()>> {
        lock_of(&self.inner.room_locks, room_id)
    }

    fn backfill_lock(&self, room_id: &RoomId) -> Arc<tokio::sync::Mutex<()>> {
        lock_of(&self.inner.backfill_locks, room_id)
    }

    /// The stored room record.
    pub fn room(&self, room_id: &RoomId) -> Result<Option<RoomRecord>, RoomError> {
        Ok(self.db().get(ROOMS, room_id.as_bytes())?)
    }

    /// The room's version, or `NotFound`.
    pub fn room_version(&self, room_id: &RoomId) -> Result<RoomVersionId, RoomError> {
        self.known_room_version(room_id)?.ok_or(RoomError::NotFound)
    }

    /// The room's version if the room is known here, kept in memory once read.
    pub fn known_room_version(&self, room_id: &RoomId) -> Result<Option<RoomVersionId>, RoomError> {
        if let Some(version) = self.inner.room_versions.get(room_id) {
            return Ok(Some(version));
        }
        let Some(room) = self.room(room_id)? else { return Ok(None) };
        self.inner.room_versions.insert(room_id.to_owned(), room.room_version.clone());
        Ok(Some(room.room_version))
    }

    /// All rooms known here.
    pub fn all_rooms(&self) -> Result<Vec<OwnedRoomId>, RoomError> {
        Ok(self
            .db()
            .scan_prefix(ROOMS, b"")?
            .into_iter()
            .filter_map(|(key, _)| OwnedRoomId::try_from(String::from_utf8(key).ok()?).ok())
            .collect())
    }

    /// A PDU by id.
    pub fn pdu(&self, event_id: &EventId) -> Result<Option<Pdu>, RoomError> {
        let parsed =
            self.db().read(PDUS, event_id.as_bytes(), |bytes| parse_stored(event_id, bytes))?;
        Ok(parsed.transpose()?)
    }

    /// The stored PDUs of many events, read in one batched lookup, in the order of `event_ids`
    /// (`None`: not stored). A stored PDU that does not parse is an error, as in [`Rooms::pdu`].
    pub fn pdus<I: Borrow<EventId>>(&self, event_ids: &[I]) -> Result<Vec<Option<Pdu>>, RoomError> {
        let mut found: Vec<Option<Pdu>> = Vec::with_capacity(event_ids.len());
        // In batches of a bounded size: a batch's values are held until all of them are read.
        for ids in event_ids.chunks(PDUS_PER_BATCH_READ) {
            let start = found.len();
            found.resize_with(start + ids.len(), || None);
            let mut failed = None;
            let keys: Vec<&[u8]> = ids.iter().map(|id| id.borrow().as_bytes()).collect();
            self.db().read_many(PDUS, &keys, |index, bytes| {
                match parse_stored(ids[index].borrow(), bytes) {
                    Ok(pdu) => found[start + index] = Some(pdu),
                    Err(error) => {
                        failed.get_or_insert(error);
                    }
                }
            })?;
            if let Some(error) = failed {
                return Err(error.into());
            }
        }
        Ok(found)
    }

    /// The PDU of a state event used in an auth check, shared: kept in memory between checks
    /// (see [`AuthPduCache`]).
    pub(crate) fn auth_pdu(&self, event_id: &EventId) -> Result<Option<Arc<Pdu>>, RoomError> {
        if let Some(pdu) = self.inner.auth_pdus.pdus.get(event_id) {
            return Ok(Some(pdu));
        }
        let Some(pdu) = self.pdu(event_id)? else { return Ok(None) };
        let pdu = Arc::new(pdu);
        self.inner.auth_pdus.pdus.insert(event_id.to_owned(), pdu.clone());
        Ok(Some(pdu))
    }

    /// Whether the PDU of an event is stored (as an outlier or in the timeline).
    pub fn has_pdu(&self, event_id: &EventId) -> Result<bool, RoomError> {
        // A kept auth event is stored, and stored PDUs are never deleted.
        if self.inner.auth_pdus.pdus.get(event_id).is_some() {
            return Ok(true);
        }
        Ok(self.db().contains(PDUS, event_id.as_bytes())?)
    }

    /// An event's metadata.
    pub fn meta(&self, event_id: &EventId) -> Result<Option<EventMeta>, RoomError> {
        Ok(self.db().get(METAS, event_id.as_bytes())?)
    }

    /// The id of the current state event `(kind, state_key)`.
    pub fn current_state_event_id(
        &self,
        room_id: &RoomId,
        kind: &str,
        state_key: &str,
    ) -> Result<Option<OwnedEventId>, RoomError> {
        let key = keys::join(&[room_id.as_bytes(), kind.as_bytes(), state_key.as_bytes()]);
        Ok(self.db().get(CURRENT_STATE, &key)?)
    }

    /// The current state event `(kind, state_key)`.
    pub fn current_state_pdu(
        &self,
        room_id: &RoomId,
        kind: &str,
        state_key: &str,
    ) -> Result<Option<Pdu>, RoomError> {
        match self.current_state_event_id(room_id, kind, state_key)? {
            Some(event_id) => self.pdu(&event_id),
            None => Ok(None),
        }
    }

    /// The content of a current state event.
    pub fn current_state_content(
        &self,
        room_id: &RoomId,
        kind: &str,
        state_key: &str,
    ) -> Result<Option<Value>, RoomError> {
        Ok(self.current_state_pdu(room_id, kind, state_key)?.map(|pdu| pdu.content_value()))
    }

    /// The whole current state, keyed by (type, state_key).
    pub fn current_state_ids(
        &self,
        room_id: &RoomId,
    ) -> Result<BTreeMap<(String, String), OwnedEventId>, RoomError> {
        let prefix = keys::prefix(&[room_id.as_bytes()]);
        let mut state = BTreeMap::new();
        for (key, value) in self.db().scan_prefix(CURRENT_STATE, &prefix)? {
            let rest = &key[prefix.len()..];
            let parts = keys::split(rest);
            if parts.len() != 2 {
                continue;
            }
            let (Ok(kind), Ok(state_key), Ok(event_id)) = (
                String::from_utf8(parts[0].to_vec()),
                String::from_utf8(parts[1].to_vec()),
                serde_json::from_slice::<OwnedEventId>(&value),
            ) else {
                continue;
            };
            state.insert((kind, state_key), event_id);
        }
        Ok(state)
    }

    /// A user's membership in a room.
    pub fn membership(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<Option<MembershipRecord>, RoomError> {
        Ok(self.db().get(USER_ROOMS, &keys::join(&[user_id.as_bytes(), room_id.as_bytes()]))?)
    }

    /// Whether the user is joined to the room.
    pub fn is_joined(&self, room_id: &RoomId, user_id: &UserId) -> Result<bool, RoomError> {
        Ok(self.membership(room_id, user_id)?.is_some_and(|record| record.membership == "join"))
    }

    /// Every room the user has a membership in.
    pub fn rooms_of_user(
        &self,
        user_id: &UserId,
    ) -> Result<Vec<(OwnedRoomId, MembershipRecord)>, RoomError> {
        let prefix = keys::prefix(&[user_id.as_bytes()]);
        let mut rooms = Vec::new();
        for (key, value) in self.db().scan_prefix(USER_ROOMS, &prefix)? {
            let Ok(room_id) =
                OwnedRoomId::try_from(String::from_utf8_lossy(&key[prefix.len()..]).into_owned())
            else {
                continue;
            };
            if let Ok(record) = serde_json::from_slice(&value) {
                rooms.push((room_id, record));
            }
        }
        Ok(rooms)
    }

    /// Rooms the user is joined to.
    pub fn joined_rooms(&self, user_id: &UserId) -> Result<Vec<OwnedRoomId>, RoomError> {
        Ok(self
            .rooms_of_user(user_id)?
            .into_iter()
            .filter(|(_, record)| record.membership == "join")
            .map(|(room_id, _)| room_id)
            .collect())
    }

    /// Every member (any membership) of a room, from the current state; kept between
    /// membership changes.
    pub fn members(&self, room_id: &RoomId) -> Result<Arc<RoomMembers>, RoomError> {
        let version = match self.inner.members.get(room_id, |entry| entry.members.clone()) {
            Ok(members) => return Ok(members),
            Err(version) => version,
        };
        let prefix = keys::prefix(&[room_id.as_bytes()]);
        let mut members = RoomMembers::default();
        for (key, value) in self.db().scan_prefix(ROOM_USERS, &prefix)? {
            let Ok(user_id) =
                OwnedUserId::try_from(String::from_utf8_lossy(&key[prefix.len()..]).into_owned())
            else {
                continue;
            };
            if let Ok(record) = serde_json::from_slice::<MembershipRecord>(&value) {
                if record.membership == "join" {
                    members.joined.push(user_id.clone());
                }
                members.all.push((user_id, record));
            }
        }
        let members = Arc::new(members);
        self.inner.members.put(room_id, version, |entry| entry.members = Some(members.clone()));
        Ok(members)
    }

    /// Joined members of a room.
    pub fn joined_members(&self, room_id: &RoomId) -> Result<Vec<OwnedUserId>, RoomError> {
        Ok(self.members(room_id)?.joined.clone())
    }

    /// How many users are joined to a room.
    pub fn joined_member_count(&self, room_id: &RoomId) -> Result<usize, RoomError> {
        Ok(self.members(room_id)?.joined.len())
    }

    /// The other servers with a user joined to the room: where its new events go.
    pub fn servers_in_room(&self, room_id: &RoomId) -> Result<Vec<OwnedServerName>, RoomError> {
        let version = match self.inner.members.get(room_id, |entry| entry.servers.clone()) {
            Ok(servers) => return Ok(servers.to_vec()),
            Err(version) => version,
        };
        let mut servers: Vec<OwnedServerName> = Vec::new();
        for user_id in &self.members(room_id)?.joined {
            let server = user_id.server_name();
            if server != self.server_name() && !servers.iter().any(|known| known == server) {
                servers.push(server.to_owned());
            }
        }
        let kept: Arc<[OwnedServerName]> = servers.clone().into();
        self.inner.members.put(room_id, version, |entry| entry.servers = Some(kept));
        Ok(servers)
    }

    /// The other servers that share at least one room with `user_id`: where news about the
    /// user (presence, device lists) goes.
    pub fn servers_sharing_a_room(
        &self,
        user_id: &UserId,
    ) -> Result<Vec<OwnedServerName>, RoomError> {
        let mut servers: Vec<OwnedServerName> = Vec::new();
        for room_id in self.joined_rooms(user_id)? {
            for server in self.servers_in_room(&room_id)? {
                if !servers.contains(&server) {
                    servers.push(server);
                }
            }
        }
        Ok(servers)
    }

    /// Forgets the kept members and servers of a room after a committed write changed one of
    /// its member events.
    pub(crate) fn room_membership_changed(&self, room_id: &RoomId) {
        self.inner.members.membership_changed(room_id);
    }

    /// Whether a user of this server is joined to the room: then our copy of it is current
    /// and local events can be built on it.
    pub fn has_local_member(&self, room_id: &RoomId) -> Result<bool, RoomError> {
        Ok(self
            .members(room_id)?
            .joined
            .iter()
            .any(|user_id| user_id.server_name() == self.server_name()))
    }

    /// The outbound queue (for EDUs that concern a room's servers).
    pub fn outbox(&self) -> &Outbox {
        &self.inner.outbox
    }

    /// Queues an event this server accepted on behalf of `origin` (a `send_join`, say) for the
    /// other servers in the room, which learn of it from us.
    pub(crate) fn forward_to_room(&self, pdu: &Pdu, origin: &ServerName) -> Result<(), RoomError> {
        let destinations: Vec<OwnedServerName> = self
            .servers_in_room(&pdu.room_id)?
            .into_iter()
            .filter(|server| server != origin)
            .collect();
        if destinations.is_empty() {
            return Ok(());
        }
        let outbox = &self.inner.outbox;
        let mut batch = self.db().batch();
        outbox.queue_in_batch(
            &mut batch,
            &destinations,
            OutboundKind::Pdu,
            &peers::to_value(pdu.json()?),
        )?;
        self.db().write(batch)?;
        outbox.wake(&destinations);
        Ok(())
    }

    /// Whether two users share a joined room.
    pub fn share_a_room(&self, a: &UserId, b: &UserId) -> Result<bool, RoomError> {
        if a == b {
            return Ok(true);
        }
        for room_id in self.joined_rooms(a)? {
            if self.is_joined(&room_id, b)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The event a client transaction produced, if it was sent before.
    pub fn transaction_event(
        &self,
        user_id: &UserId,
        transaction: &Transaction,
    ) -> Result<Option<OwnedEventId>, RoomError> {
        let key = keys::join(&[
            user_id.as_bytes(),
            transaction.device_id.as_bytes(),
            transaction.txn_id.as_bytes(),
        ]);
        Ok(self.db().get(TXNS, &key)?)
    }

    /// Builds, authorizes and persists a new local event.
    #[instrument(skip_all, fields(room_id = %room_id, sender = %sender, kind = %event.kind))]
    pub async fn append(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        event: NewEvent,
        transaction: Option<Transaction>,
    ) -> Result<Appended, RoomError> {
        let lock = self.room_lock(room_id);
        let _guard = lock.lock().await;
        if let Some(transaction) = &transaction
            && let Some(event_id) = self.transaction_event(sender, transaction)?
        {
            let position = self.meta(&event_id)?.map(|meta| meta.position).unwrap_or(0);
            return Ok(Appended { event_id, position });
        }
        let mut room = self.room(room_id)?.ok_or(RoomError::NotFound)?;
        self.append_locked(&mut room, Some(room_id), sender, event, transaction)
    }

    /// An unsigned event of `sender` that follows the room's forward extremities, with
    /// `auth_events` chosen from the current state: the body of a local event before it is
    /// hashed and signed, and the template `make_join`/`make_leave` hand to a remote server.
    fn event_template(
        &self,
        room: &RoomRecord,
        room_id: Option<&RoomId>,
        sender: &UserId,
        event: &NewEvent,
        origin: &ruma::ServerName,
    ) -> Result<CanonicalJsonObject, RoomError> {
        let rules = federation::signing::rules_for(&room.room_version)?;
        let kind = TimelineEventType::from(event.kind.clone());
        let content_raw = serde_json::value::to_raw_value(&event.content)
            .map_err(|error| RoomError::BadEvent(error.to_string()))?;
        let auth_types = ruma::state_res::auth_types_for_event(
            &kind,
            sender,
            event.state_key.as_deref(),
            &content_raw,
            &rules.authorization,
        )
        .map_err(RoomError::BadEvent)?;
        let mut auth_events = Vec::new();
        if let Some(room_id) = room_id {
            for (auth_kind, auth_key) in &auth_types {
                if let Some(event_id) =
                    self.current_state_event_id(room_id, &auth_kind.to_string(), auth_key)?
                    && !auth_events.contains(&event_id)
                {
                    auth_events.push(event_id);
                }
            }
        }
        let reference = |event_id: &OwnedEventId| -> Result<Value, RoomError> {
            match rules.events_reference_format {
                EventsReferenceFormatVersion::V1 => {
                    let pdu = self.pdu(event_id)?.ok_or(RoomError::EventNotFound)?;
                    let hash = ruma::signatures::reference_hash(pdu.json()?, &rules)
                        .map_err(|error| RoomError::BadEvent(error.to_string()))?;
                    Ok(json!([event_id, {"sha256": hash}]))
                }
                _ => Ok(json!(event_id)),
            }
        };
        let prev_events: Vec<Value> =
            room.forward_extremities.iter().map(reference).collect::<Result<_, _>>()?;
        let auth_refs: Vec<Value> = auth_events.iter().map(reference).collect::<Result<_, _>>()?;
        let depth = room.depth + 1;
        let mut object = json!({
            "sender": sender,
            "origin_server_ts": MilliSecondsSinceUnixEpoch::now(),
            "type": event.kind,
            "content": event.content,
            "prev_events": prev_events,
            "auth_events": auth_refs,
            "depth": depth,
        });
        if let Some(room_id) = room_id {
            object["room_id"] = json!(room_id);
        }
        if rules.redaction.keep_origin_membership_prev_state {
            object["origin"] = json!(origin);
        }
        if let Some(state_key) = &event.state_key {
            object["state_key"] = json!(state_key);
        }
        if let Some(redacts) = &event.redacts {
            if rules.redaction.content_field_redacts {
                object["content"]["redacts"] = json!(redacts);
            } else {
                object["redacts"] = json!(redacts);
            }
        }
        let CanonicalJsonValue::Object(canonical) =
            ruma::canonical_json::to_canonical_value(object).map_err(|error| {
                RoomError::BadEvent(format!("event is not canonical JSON: {error}"))
            })?
        else {
            return Err(RoomError::BadEvent("event is not an object".into()));
        };
        Ok(canonical)
    }

    /// Builds, authorizes and persists an event while the room lock is held.
    ///
    /// `room_id` is `None` only for the create event of a room version whose room id is derived
    /// from that event (version 12 and later).
    fn append_locked(
        &self,
        room: &mut RoomRecord,
        room_id: Option<&RoomId>,
        sender: &UserId,
        event: NewEvent,
        transaction: Option<Transaction>,
    ) -> Result<Appended, RoomError> {
        let pdu = self.build_event(room, room_id, sender, event)?;
        self.commit_event(room, pdu, sender, transaction)
    }

    /// Builds a local event on the room's forward extremities, signs it and authorizes it
    /// against the current state, without persisting it. The room lock must be held.
    fn build_event(
        &self,
        room: &RoomRecord,
        room_id: Option<&RoomId>,
        sender: &UserId,
        event: NewEvent,
    ) -> Result<Pdu, RoomError> {
        let version = room.room_version.clone();
        let rules = federation::signing::rules_for(&version)?;
        let mut canonical =
            self.event_template(room, room_id, sender, &event, self.server_name())?;
        // The spec caps PDUs at 65536 bytes of canonical JSON, signatures included; leave room
        // for the hash and signature this server adds.
        let size = serde_json::to_vec(&canonical).map(|bytes| bytes.len()).unwrap_or(usize::MAX);
        if size > PDU_BYTES_MAX - 256 {
            return Err(RoomError::TooLarge);
        }
        let event_id = self.inner.signing_key.hash_and_sign_pdu(&mut canonical, &version)?;
        let pdu = Pdu::from_json(event_id, canonical)?;
        let room_id: &RoomId = &pdu.room_id.clone();

        ruma::state_res::check_state_independent_auth_rules(&rules.authorization, &pdu, |id| {
            self.pdu(id).ok().flatten()
        })
        .map_err(RoomError::Forbidden)?;
        ruma::state_res::check_state_dependent_auth_rules(
            &rules.authorization,
            &pdu,
            |kind, key| self.current_state_pdu(room_id, &kind.to_string(), key).ok().flatten(),
        )
        .map_err(RoomError::Forbidden)?;
        if let Some(redacts) = &pdu.redacts {
            self.authorize_redaction(room_id, &pdu, redacts)?;
        }
        Ok(pdu)
    }

    /// Wakes `/sync` for a committed event of `room_id`: only those in the room, unless it
    /// changed a membership (which concerns the member too, who may not be in it yet).
    pub(crate) fn announce(&self, room_id: &RoomId, position: u64, membership: bool) {
        if membership {
            self.inner.notifier.notify(position);
        } else {
            self.inner.notifier.notify_room(room_id, position);
        }
    }

    /// Persists a built local event in one batch with its outbound queue rows, then wakes
    /// `/sync` and the federation sender. The room lock must be held.
    fn commit_event(
        &self,
        room: &mut RoomRecord,
        pdu: Pdu,
        sender: &UserId,
        transaction: Option<Transaction>,
    ) -> Result<Appended, RoomError> {
        let destinations = self.destinations_of(&pdu)?;
        let outbound = match destinations.is_empty() {
            true => None,
            false => Some(peers::to_value(pdu.json()?)),
        };
        let (position, ()) = self.db().write_at_next_position(|position, batch| {
            self.persist(
                batch,
                room,
                &pdu,
                position,
                transaction.as_ref().map(|txn| (sender, txn)),
            )?;
            if let Some(json) = &outbound {
                self.inner.outbox.queue_in_batch(batch, &destinations, OutboundKind::Pdu, json)?;
            }
            Ok(())
        })?;
        tracing::debug!(event_id = %pdu.event_id, position, "event persisted");
        let membership = pdu.kind == TimelineEventType::RoomMember;
        if membership {
            self.room_membership_changed(&pdu.room_id);
        }
        self.announce(&pdu.room_id, position, membership);
        self.inner.outbox.wake(&destinations);
        Ok(Appended { event_id: pdu.event_id, position })
    }

    /// The servers a new local event goes to: every other server with a joined user, and the
    /// server of a remote user whose membership it changes (kick, ban, unban). An invite
    /// reaches the invitee's server through `/invite` instead.
    fn destinations_of(&self, pdu: &Pdu) -> Result<Vec<OwnedServerName>, RoomError> {
        let mut destinations = self.servers_in_room(&pdu.room_id)?;
        if pdu.kind == TimelineEventType::RoomMember
            && pdu.membership().as_deref() != Some("invite")
            && let Some(target) = pdu.state_key.as_deref().and_then(|key| UserId::parse(key).ok())
        {
            let server = target.server_name();
            if server != self.server_name() && !destinations.iter().any(|known| known == server) {
                destinations.push(server.to_owned());
            }
        }
        Ok(destinations)
    }

    /// Redactions need the redact power level unless they redact the sender's own event
    /// ([redactions](https://spec.matrix.org/v1.16/client-server-api/#redactions)).
    fn authorize_redaction(
        &self,
        room_id: &RoomId,
        redaction: &Pdu,
        redacts: &EventId,
    ) -> Result<(), RoomError> {
        if let Some(target) = self.pdu(redacts)?
            && target.room_id == room_id
            && target.sender == redaction.sender
        {
            return Ok(());
        }
        let levels = self.power_levels(room_id)?;
        if levels.user_level(&redaction.sender) >= levels.get("redact", 50) {
            Ok(())
        } else {
            Err(RoomError::Forbidden("You don't have permission to redact events".into()))
        }
    }

    fn persist(
        &self,
        batch: &mut Batch<'_>,
        room: &mut RoomRecord,
        pdu: &Pdu,
        position: u64,
        transaction: Option<(&UserId, &Transaction)>,
    ) -> Result<(), storage::Error> {
        let db = self.db();
        let room_id = &pdu.room_id;
        let short = db.next_short(batch)?;
        let state_before = room.current_snapshot;
        let mut state_after = state_before;
        if let Some(state_key) = &pdu.state_key {
            let kind = pdu.kind.to_string();
            let snapshot = state::add_to_snapshot(
                db,
                &self.inner.snapshots,
                batch,
                state_before,
                &kind,
                state_key,
                short,
            )?;
            state_after = Some(snapshot);
            self.index_current_state(batch, room_id, &kind, state_key, Some(pdu), position)?;
        }
        let meta = EventMeta {
            room_id: room_id.clone(),
            position,
            short,
            state_before,
            state_after,
            transaction: transaction.map(|(_, txn)| (txn.device_id.clone(), txn.txn_id.clone())),
            redacted_by: None,
            soft_failed: false,
            current_after: None,
            outlier: false,
        };
        self.write_event_rows(batch, pdu, &meta, true, true)?;
        if let Some((user_id, txn)) = transaction {
            let key =
                keys::join(&[user_id.as_bytes(), txn.device_id.as_bytes(), txn.txn_id.as_bytes()]);
            batch.put(TXNS, &key, &pdu.event_id)?;
        }
        room.forward_extremities = vec![pdu.event_id.clone()];
        room.depth = room.depth.max(pdu.depth);
        room.current_snapshot = state_after;
        room.last_position = position;
        batch.put(ROOMS, room_id.as_bytes(), room)?;
        Ok(())
    }

    /// Writes the rows of one event: its PDU, short id, metadata, timeline entry (when
    /// `in_timeline`), relation and, for a redaction that takes effect, the mark on the
    /// redacted event.
    fn write_event_rows(
        &self,
        batch: &mut Batch<'_>,
        pdu: &Pdu,
        meta: &EventMeta,
        in_timeline: bool,
        apply_redaction: bool,
    ) -> Result<(), storage::Error> {
        let db = self.db();
        let room_id = &pdu.room_id;
        self.write_pdu_rows(batch, pdu, meta.short)?;
        batch.put(METAS, pdu.event_id.as_bytes(), meta)?;
        if in_timeline {
            batch.put(TIMELINE, &timeline_key(room_id, meta.position), &pdu.event_id)?;
        }
        if in_timeline
            && apply_redaction
            && let Some(redacts) = &pdu.redacts
            && let Some(mut target) = db.get::<EventMeta>(METAS, redacts.as_bytes())?
            && target.room_id == *room_id
            && target.redacted_by.is_none()
        {
            target.redacted_by = Some(pdu.event_id.clone());
            batch.put(METAS, redacts.as_bytes(), &target)?;
        }
        if in_timeline
            && let Some(relates_to) = pdu.content_value().get("m.relates_to")
            && let Some(parent) = relates_to.get("event_id").and_then(Value::as_str)
        {
            let key = keys::join(&[parent.as_bytes(), pdu.event_id.as_bytes()]);
            batch.put(RELATIONS, &key, &relates_to.get("rel_type"))?;
        }
        Ok(())
    }

    /// Writes a PDU and its short id (both ways): all an outlier gets.
    fn write_pdu_rows(
        &self,
        batch: &mut Batch<'_>,
        pdu: &Pdu,
        short: u64,
    ) -> Result<(), storage::Error> {
        batch.put_raw(PDUS, pdu.event_id.as_bytes(), pdu.signed_text().as_bytes())?;
        batch.put_raw("event_id_to_short", pdu.event_id.as_bytes(), &keys::encode_u64(short))?;
        batch.put_raw("short_to_event_id", &keys::encode_u64(short), pdu.event_id.as_bytes())?;
        Ok(())
    }

    /// Makes `pdu` the current state event `(kind, state_key)` (or removes the entry when
    /// `pdu` is `None`), and keeps the membership indexes in step.
    fn index_current_state(
        &self,
        batch: &mut Batch<'_>,
        room_id: &RoomId,
        kind: &str,
        state_key: &str,
        pdu: Option<&Pdu>,
        position: u64,
    ) -> Result<(), storage::Error> {
        let db = self.db();
        let key = keys::join(&[room_id.as_bytes(), kind.as_bytes(), state_key.as_bytes()]);
        let Some(pdu) = pdu else {
            batch.delete(CURRENT_STATE, &key)?;
            return Ok(());
        };
        batch.put(CURRENT_STATE, &key, &pdu.event_id)?;
        if let (Some(membership), Ok(user_id)) = (pdu.membership(), UserId::parse(state_key)) {
            // A member event that keeps the membership (a profile change) does not move the
            // position at which the membership began: sync keys "newly joined" off it.
            let user_room = keys::join(&[user_id.as_bytes(), room_id.as_bytes()]);
            let previous = db.get::<MembershipRecord>(USER_ROOMS, &user_room)?;
            let (position, forgotten) = match previous {
                Some(previous) if previous.membership == membership => {
                    (previous.position, previous.forgotten)
                }
                _ => (position, false),
            };
            let record = MembershipRecord {
                membership,
                event_id: pdu.event_id.clone(),
                position,
                forgotten,
                invite_state: None,
            };
            batch.put(USER_ROOMS, &user_room, &record)?;
            batch.put(
                ROOM_USERS,
                &keys::join(&[room_id.as_bytes(), user_id.as_bytes()]),
                &record,
            )?;
        }
        Ok(())
    }

    /// Timeline events of a room in one direction, starting after `from` (exclusive, in the
    /// direction of travel) and stopping at `to` (inclusive) or after `limit` events.
    pub fn timeline(
        &self,
        room_id: &RoomId,
        from: u64,
        to: Option<u64>,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<(u64, OwnedEventId)>, RoomError> {
        let prefix = keys::prefix(&[room_id.as_bytes()]);
        let mut events = Vec::new();
        let mut visit = |key: &[u8], value: &[u8]| {
            let Some(position) = key.get(prefix.len()..).and_then(keys::decode_u64) else {
                return true;
            };
            if let Some(to) = to {
                let past = match direction {
                    Direction::Backward => position < to,
                    Direction::Forward => position > to,
                };
                if past {
                    return false;
                }
            }
            if let Ok(event_id) = serde_json::from_slice::<OwnedEventId>(value) {
                events.push((position, event_id));
            }
            events.len() < limit
        };
        if limit == 0 {
            return Ok(events);
        }
        match direction {
            Direction::Backward => {
                if from == 0 {
                    return Ok(events);
                }
                let start = timeline_key(room_id, from - 1);
                self.db().for_each_prefix_rev(TIMELINE, &prefix, &start, &mut visit)?;
            }
            Direction::Forward => {
                let start = timeline_key(room_id, from.saturating_add(1));
                self.db().for_each_prefix_from(TIMELINE, &prefix, &start, &mut visit)?;
            }
        }
        Ok(events)
    }

    /// Events that relate to `event_id` (`m.relates_to.event_id`), with their relation type.
    pub fn relations(
        &self,
        event_id: &EventId,
    ) -> Result<Vec<(OwnedEventId, Option<String>)>, RoomError> {
        let prefix = keys::prefix(&[event_id.as_bytes()]);
        let mut related = Vec::new();
        for (key, value) in self.db().scan_prefix(RELATIONS, &prefix)? {
            let Ok(child) =
                OwnedEventId::try_from(String::from_utf8_lossy(&key[prefix.len()..]).into_owned())
            else {
                continue;
            };
            related.push((child, serde_json::from_slice::<Option<String>>(&value).ok().flatten()));
        }
        Ok(related)
    }

    /// The client format of an event as `viewer` sees it: redacted if it was redacted, with
    /// `unsigned.transaction_id` for the device that sent it.
    pub fn client_event(
        &self,
        pdu: &Pdu,
        meta: Option<&EventMeta>,
        viewer: Option<(&UserId, &DeviceId)>,
    ) -> Result<Value, RoomError> {
        let version = self.room_version(&pdu.room_id)?;
        let mut unsigned = serde_json::Map::new();
        let mut redacted_because = None;
        if let Some(meta) = meta {
            if let Some((user_id, device_id)) = viewer
                && pdu.sender == user_id
                && let Some((device, txn_id)) = &meta.transaction
                && device == device_id.as_str()
            {
                unsigned.insert("transaction_id".into(), Value::String(txn_id.clone()));
            }
            if let Some(redaction_id) = &meta.redacted_by
                && let Some(redaction) = self.pdu(redaction_id)?
            {
                redacted_because =
                    Some(redaction.to_client(&version, None, serde_json::Map::new()));
            }
            if let Some(state_key) = &pdu.state_key
                && let Some(before) = meta.state_before
                && let Some(previous) =
                    self.state_event_at(before, &pdu.kind.to_string(), state_key)?
                && let Some(previous) = self.pdu(&previous)?
            {
                unsigned.insert("prev_content".into(), previous.content_value());
                unsigned.insert("replaces_state".into(), json!(previous.event_id));
            }
        }
        Ok(pdu.to_client(&version, redacted_because, unsigned))
    }

    /// Loads an event with its metadata and renders it for a viewer. Soft-failed events are
    /// never shown to clients.
    pub fn client_event_by_id(
        &self,
        event_id: &EventId,
        viewer: Option<(&UserId, &DeviceId)>,
    ) -> Result<Option<(Pdu, EventMeta, Value)>, RoomError> {
        let (Some(pdu), Some(meta)) = (self.pdu(event_id)?, self.meta(event_id)?) else {
            return Ok(None);
        };
        if meta.soft_failed {
            return Ok(None);
        }
        let value = self.client_event(&pdu, Some(&meta), viewer)?;
        Ok(Some((pdu, meta, value)))
    }

    /// The event id of `(kind, state_key)` in a state snapshot.
    pub fn state_event_at(
        &self,
        snapshot: u64,
        kind: &str,
        state_key: &str,
    ) -> Result<Option<OwnedEventId>, RoomError> {
        let Some(state_key_short) = state::state_key_short(self.db(), kind, state_key)? else {
            return Ok(None);
        };
        let state = state::load_snapshot(self.db(), &self.inner.snapshots, Some(snapshot))?;
        match state.get(&state_key_short) {
            Some(short) => Ok(state::event_id_of_short(self.db(), *short)?),
            None => Ok(None),
        }
    }

    /// The full state in a snapshot, keyed by (type, state_key).
    pub fn state_at(
        &self,
        snapshot: Option<u64>,
    ) -> Result<BTreeMap<(String, String), OwnedEventId>, RoomError> {
        Ok(state::resolve_snapshot(self.db(), &self.inner.snapshots, snapshot)?)
    }

    /// The entries of `snapshot` that differ from `since` (all of them without `since`) and
    /// whose (type, state_key) `keep` accepts; see [`state::resolve_changes`].
    pub fn state_changes(
        &self,
        snapshot: Option<u64>,
        since: Option<Option<u64>>,
        keep: impl Fn(&str, &str) -> bool,
    ) -> Result<BTreeMap<(String, String), OwnedEventId>, RoomError> {
        Ok(state::resolve_changes(self.db(), &self.inner.snapshots, snapshot, since, keep)?)
    }

    /// The state snapshot in force after stream position `position` of a room.
    pub fn snapshot_at_position(
        &self,
        room_id: &RoomId,
        position: u64,
    ) -> Result<Option<u64>, RoomError> {
        let events =
            self.timeline(room_id, position.saturating_add(1), None, Direction::Backward, 1)?;
        match events.first() {
            Some((_, event_id)) => {
                Ok(self.meta(event_id)?.and_then(|meta| meta.current_after.or(meta.state_after)))
            }
            None => Ok(None),
        }
    }

    /// The room's power levels, with the spec's defaults when there is no event.
    pub fn power_levels(&self, room_id: &RoomId) -> Result<PowerLevels, RoomError> {
        let content = self.current_state_content(room_id, "m.room.power_levels", "")?;
        let (creators, creators_privileged) = self.creators(room_id)?;
        Ok(PowerLevels { content, creators, creators_privileged })
    }

    /// The room's creators: the create event's sender, plus `additional_creators` in room
    /// versions that privilege creators (12 and later).
    fn creators(&self, room_id: &RoomId) -> Result<(Vec<OwnedUserId>, bool), RoomError> {
        let Some(create) = self.current_state_pdu(room_id, "m.room.create", "")? else {
            return Ok((Vec::new(), false));
        };
        let privileged = self
            .room(room_id)?
            .and_then(|room| room.room_version.rules())
            .is_some_and(|rules| rules.authorization.explicitly_privilege_room_creators);
        let mut creators = vec![create.sender.clone()];
        if privileged
            && let Some(additional) =
                create.content_value().get("additional_creators").and_then(Value::as_array)
        {
            creators.extend(
                additional.iter().filter_map(|user| OwnedUserId::try_from(user.as_str()?).ok()),
            );
        }
        Ok((creators, privileged))
    }

    /// Marks a room forgotten for a user who is no longer in it.
    pub fn forget(&self, room_id: &RoomId, user_id: &UserId) -> Result<(), RoomError> {
        let key = keys::join(&[user_id.as_bytes(), room_id.as_bytes()]);
        let Some(mut record) = self.db().get::<MembershipRecord>(USER_ROOMS, &key)? else {
            return Err(RoomError::NotFound);
        };
        if record.membership == "join" || record.membership == "invite" {
            return Err(RoomError::BadEvent("The user is still in the room".into()));
        }
        record.forgotten = true;
        let mut batch = self.db().batch();
        batch.put(USER_ROOMS, &key, &record)?;
        self.db().write(batch)?;
        Ok(())
    }

    /// [`Rooms::visible_to`] with the answers kept in `memo` per state snapshot: they depend
    /// on the snapshot alone, except for the viewer's own member events, which are asked
    /// each time. For a scan of one room's events (consecutive messages share a snapshot).
    pub fn visible_to_memo(
        &self,
        user_id: &UserId,
        pdu: &Pdu,
        meta: &EventMeta,
        memo: &mut VisibilityMemo,
    ) -> Result<bool, RoomError> {
        let snapshot = meta.state_before.filter(|_| !own_member_event(user_id, pdu));
        if let (Some(snapshot), Some((seen, visible))) = (snapshot, memo.last)
            && seen == snapshot
        {
            return Ok(visible);
        }
        let visible = self.visible_to(user_id, pdu, meta)?;
        if let Some(snapshot) = snapshot {
            memo.last = Some((snapshot, visible));
        }
        Ok(visible)
    }

    /// Whether `user_id` may see an event under the room's history visibility at that event
    /// ([history visibility](https://spec.matrix.org/v1.16/client-server-api/#history-visibility)).
    /// `shared` and `world_readable` history is visible to anyone allowed into the room's
    /// history at all (callers check that); `invited` and `joined` need that membership at
    /// the event.
    pub fn visible_to(
        &self,
        user_id: &UserId,
        pdu: &Pdu,
        meta: &EventMeta,
    ) -> Result<bool, RoomError> {
        let Some(snapshot) = meta.state_before else { return Ok(true) };
        let visibility = match self.state_event_at(snapshot, "m.room.history_visibility", "")? {
            Some(event_id) => self
                .pdu(&event_id)?
                .and_then(|event| {
                    event
                        .content_value()
                        .get("history_visibility")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| "shared".to_owned()),
            None => "shared".to_owned(),
        };
        let allowed: &[&str] = match visibility.as_str() {
            "invited" => &["invite", "join"],
            "joined" => &["join"],
            _ => return Ok(true),
        };
        // For the user's own member event, the membership it establishes counts.
        let membership = if own_member_event(user_id, pdu) {
            pdu.membership()
        } else {
            match self.state_event_at(snapshot, "m.room.member", user_id.as_str())? {
                Some(event_id) => self.pdu(&event_id)?.and_then(|event| event.membership()),
                None => None,
            }
        };
        Ok(membership.is_some_and(|membership| allowed.contains(&membership.as_str())))
    }

    /// The server's stream position.
    pub fn position(&self) -> u64 {
        self.db().position()
    }
}

/// A room's power levels ([`m.room.power_levels`](https://spec.matrix.org/v1.16/client-server-api/#mroompower_levels)).
#[derive(Clone, Debug)]
pub struct PowerLevels {
    content: Option<Value>,
    creators: Vec<OwnedUserId>,
    /// Room version 12 and later: creators outrank everyone.
    creators_privileged: bool,
}

impl PowerLevels {
    /// A top-level level (`ban`, `kick`, `redact`, `invite`, `state_default`, ...).
    pub fn get(&self, key: &str, default: i64) -> i64 {
        match &self.content {
            Some(content) => content.get(key).and_then(as_level).unwrap_or(default),
            // Without a power levels event, only the creator is privileged and everything is 0.
            None => 0,
        }
    }

    /// A user's level.
    pub fn user_level(&self, user_id: &UserId) -> i64 {
        if self.creators_privileged && self.creators.iter().any(|creator| creator == user_id) {
            return i64::MAX;
        }
        match &self.content {
            Some(content) => content
                .get("users")
                .and_then(|users| users.get(user_id.as_str()))
                .and_then(as_level)
                .unwrap_or_else(|| content.get("users_default").and_then(as_level).unwrap_or(0)),
            None => {
                if self.creators.iter().any(|creator| creator == user_id) {
                    100
                } else {
                    0
                }
            }
        }
    }

    /// The level needed to send an event of `kind`.
    pub fn event_level(&self, kind: &str, is_state: bool) -> i64 {
        let Some(content) = &self.content else { return 0 };
        content.get("events").and_then(|events| events.get(kind)).and_then(as_level).unwrap_or_else(
            || {
                if is_state {
                    content.get("state_default").and_then(as_level).unwrap_or(50)
                } else {
                    content.get("events_default").and_then(as_level).unwrap_or(0)
                }
            },
        )
    }
}

fn as_level(value: &Value) -> Option<i64> {
    value.as_i64().or_else(|| value.as_str().and_then(|text| text.parse().ok()))
}

fn timeline_key(room_id: &RoomId, position: u64) -> Vec<u8> {
    let mut key = keys::prefix(&[room_id.as_bytes()]);
    key.extend_from_slice(&keys::encode_u64(position));
    key
}
