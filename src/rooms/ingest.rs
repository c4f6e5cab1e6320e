//! Receiving events from other servers: the checks the spec orders on receipt of a PDU,
//! state before the event (resolved with state resolution v2 where the DAG forks), soft
//! failure, and persisting with forward extremities and current state kept in step.
//!
//! [Checks performed on receipt of a PDU](https://spec.matrix.org/v1.16/server-server-api/#checks-performed-on-receipt-of-a-pdu)
//!
//! What this needs from the transport (verify keys of a server, events fetched from a server)
//! comes through the [`ServerKeys`] and [`RemoteEvents`] traits, so this module knows nothing
//! of HTTP, request signing or key caching.

use std::{
    borrow::Borrow,
    cell::RefCell,
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use federation::verify::ReceivedPdu;
use futures::future::BoxFuture;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, MilliSecondsSinceUnixEpoch, OwnedEventId,
    OwnedServerName, RoomId, RoomVersionId, ServerName, UInt,
    events::{StateEventType, TimelineEventType},
    room_version_rules::RoomVersionRules,
    serde::Base64,
    signatures::Verified,
};
use serde_json::Value;
use storage::{Batch, Wal};
use tracing::{Instrument, instrument};

use super::{EventMeta, Pdu, ROOMS, RoomError, RoomRecord, Rooms, state};

/// The most PDUs one `/send` transaction may carry ([transactions](https://spec.matrix.org/v1.16/server-server-api/#transactions)).
pub const PDUS_PER_TRANSACTION_MAX: usize = 50;
/// The most EDUs one `/send` transaction may carry.
pub const EDUS_PER_TRANSACTION_MAX: usize = 100;
/// The most auth events fetched (one by one) to check one received PDU.
pub const AUTH_EVENTS_FETCHED_MAX: usize = 50;
/// The most events an auth chain walk visits; a longer chain is an error, not a hang.
pub const AUTH_CHAIN_EVENTS_MAX: usize = 100_000;

/// The bounds on what other servers can make the room core fetch, from the config
/// (`federation_missing_events_max`, ...).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The most events one `get_missing_events` call asks for when prev events are missing.
    pub missing_events_max: usize,
    /// The most events fetched one by one to complete the state that `state_ids` names.
    pub state_events_fetched_max: usize,
    /// The most events one `backfill` call asks for.
    pub backfill_events_max: usize,
    /// How many servers one backfill tries.
    pub backfill_servers_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            missing_events_max: 50,
            state_events_fetched_max: 200,
            backfill_events_max: 100,
            backfill_servers_max: 5,
        }
    }
}

/// The transport could not give what was asked (unreachable server, bad answer, no key).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RemoteError(pub String);

/// The verify keys of servers: the transport fetches them (directly or through a notary),
/// checks their self-signatures and caches them.
pub trait ServerKeys: Send + Sync {
    /// The ed25519 verify keys of `server` valid at `valid_at`, by key id (`ed25519:abc`):
    /// current keys and old keys that were valid then.
    fn verify_keys<'a>(
        &'a self,
        server: &'a ServerName,
        valid_at: MilliSecondsSinceUnixEpoch,
    ) -> BoxFuture<'a, Result<BTreeMap<String, Base64>, RemoteError>>;
}

/// Events fetched from another server, as signed PDUs that this module checks itself.
pub trait RemoteEvents: Send + Sync {
    /// `GET /_matrix/federation/v1/event/{eventId}` on `server`: the one PDU.
    fn get_event<'a>(
        &'a self,
        server: &'a ServerName,
        event_id: &'a EventId,
    ) -> BoxFuture<'a, Result<CanonicalJsonObject, RemoteError>>;

    /// `POST /_matrix/federation/v1/get_missing_events/{roomId}` on `server`: up to `limit`
    /// events between `earliest_events` (which we have) and `latest_events` (which we want to
    /// connect), in any order.
    fn get_missing_events<'a>(
        &'a self,
        server: &'a ServerName,
        room_id: &'a RoomId,
        earliest_events: &'a [OwnedEventId],
        latest_events: &'a [OwnedEventId],
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<CanonicalJsonObject>, RemoteError>>;

    /// `GET /_matrix/federation/v1/backfill/{roomId}` on `server`: up to `limit` events from
    /// `from` (included) backwards through their prev events, in any order.
    fn backfill<'a>(
        &'a self,
        server: &'a ServerName,
        room_id: &'a RoomId,
        from: &'a [OwnedEventId],
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<CanonicalJsonObject>, RemoteError>>;

    /// `GET /_matrix/federation/v1/state_ids/{roomId}?event_id=` on `server`: the ids of the
    /// state events before `event_id` (`pdu_ids`). The auth chain ids are not asked for: the
    /// auth events of every fetched event are followed anyway.
    fn state_ids<'a>(
        &'a self,
        server: &'a ServerName,
        room_id: &'a RoomId,
        event_id: &'a EventId,
    ) -> BoxFuture<'a, Result<Vec<OwnedEventId>, RemoteError>>;
}

/// Why another server did not help with a membership change.
#[derive(Debug, thiserror::Error)]
pub enum MembershipRemoteError {
    /// It answered that the change is not allowed (403) or the room is unknown to it (404).
    #[error("{0}")]
    Refused(String),
    /// It could not be reached or answered something else.
    #[error("{0}")]
    Failed(String),
}

/// Membership handshakes with a server that is in a room
/// ([joining rooms](https://spec.matrix.org/v1.16/server-server-api/#joining-rooms),
/// [inviting](https://spec.matrix.org/v1.16/server-server-api/#inviting-to-a-room),
/// [leaving](https://spec.matrix.org/v1.16/server-server-api/#leaving-rooms-rejecting-invites)).
pub trait RemoteMembership: Send + Sync {
    /// `make_join` or `make_leave` (by `membership`) on `server`: the room version and the
    /// event template.
    fn make_membership<'a>(
        &'a self,
        server: &'a ServerName,
        room_id: &'a RoomId,
        user_id: &'a ruma::UserId,
        membership: &'a str,
        supported_versions: &'a [RoomVersionId],
    ) -> BoxFuture<'a, Result<(RoomVersionId, CanonicalJsonObject), MembershipRemoteError>>;

    /// `send_join` or `send_leave` v2 (by `membership`) on `server`: its JSON answer.
    fn send_membership<'a>(
        &'a self,
        server: &'a ServerName,
        room_id: &'a RoomId,
        event_id: &'a EventId,
        membership: &'a str,
        event: CanonicalJsonObject,
    ) -> BoxFuture<'a, Result<Value, MembershipRemoteError>>;

    /// `invite` v2 on the invitee's `server`: the event countersigned by it.
    fn invite<'a>(
        &'a self,
        server: &'a ServerName,
        room_id: &'a RoomId,
        event_id: &'a EventId,
        room_version: &'a RoomVersionId,
        event: CanonicalJsonObject,
        invite_room_state: Vec<Value>,
    ) -> BoxFuture<'a, Result<CanonicalJsonObject, MembershipRemoteError>>;
}

/// What the room core needs from the transport to take part in federation.
#[derive(Clone)]
pub struct Remote {
    /// Verify keys of servers.
    pub keys: Arc<dyn ServerKeys>,
    /// Events fetched from servers.
    pub events: Arc<dyn RemoteEvents>,
    /// Membership handshakes.
    pub membership: Arc<dyn RemoteMembership>,
}

/// Why a received PDU was dropped or rejected.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Not a valid PDU of its room version.
    #[error("invalid event: {0}")]
    Malformed(String),
    /// The room is not one this server is in.
    #[error("unknown room")]
    UnknownRoom,
    /// The signatures do not verify (or the keys could not be had).
    #[error("bad signature: {0}")]
    Signature(String),
    /// An auth event could not be had.
    #[error("missing auth events: {0}")]
    MissingAuthEvents(String),
    /// The event fails the auth rules against its own auth events.
    #[error("not authorized by its auth events: {0}")]
    AuthEvents(String),
    /// Prev events are missing and could not be fetched.
    #[error("missing prev events: {0}")]
    MissingPrevEvents(String),
    /// The states of the prev events could not be resolved.
    #[error("state resolution failed: {0}")]
    StateResolution(String),
    /// The event fails the auth rules against the state before it.
    #[error("not authorized by the state before it: {0}")]
    StateBefore(String),
    /// The room's server ACL denies the server.
    #[error("server {0} is denied by the room's server ACL")]
    ServerDenied(OwnedServerName),
    /// Storage or a stored event failed.
    #[error(transparent)]
    Room(#[from] RoomError),
}

impl From<storage::Error> for IngestError {
    fn from(error: storage::Error) -> Self {
        Self::Room(RoomError::Storage(error))
    }
}

/// What became of an accepted PDU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// Persisted into the room's DAG, timeline and (for state) current state.
    Persisted,
    /// Persisted, but it fails against the current state: not in the timeline, not a
    /// forward extremity.
    SoftFailed,
    /// Already known.
    AlreadyKnown,
}

/// Why a whole transaction was refused.
#[derive(Debug, thiserror::Error)]
pub enum TransactionError {
    /// More than [`PDUS_PER_TRANSACTION_MAX`] PDUs.
    #[error("a transaction carries at most {PDUS_PER_TRANSACTION_MAX} PDUs")]
    TooManyPdus,
    /// More than [`EDUS_PER_TRANSACTION_MAX`] EDUs.
    #[error("a transaction carries at most {EDUS_PER_TRANSACTION_MAX} EDUs")]
    TooManyEdus,
}

/// The per-PDU results of a transaction, as `/send` answers them.
pub type TransactionResults = BTreeMap<OwnedEventId, Result<Accepted, IngestError>>;

/// A received PDU redacted and serialised for its event id and signature checks, with its
/// room's version and that version's rules (see [`Rooms::prepare_remote`]).
struct Prepared {
    received: ReceivedPdu,
    version: RoomVersionId,
    rules: RoomVersionRules,
}

/// Hands the WAL records a transaction's PDUs left buffered to the OS when dropped: when the
/// transaction is answered, and also if its request is dropped midway.
struct FlushWalOnDrop<'a>(&'a storage::Db);

impl Drop for FlushWalOnDrop<'_> {
    fn drop(&mut self) {
        if let Err(error) = self.0.flush_wal_buffer() {
            tracing::error!(%error, "flushing the write-ahead log failed");
        }
    }
}

/// A PDU that passed the checks that need no room state: format, signatures, hash.
pub(super) struct Checked {
    pub(super) pdu: Pdu,
    pub(super) rules: RoomVersionRules,
}

impl Rooms {
    /// Handles the PDUs of one `/send` transaction from `origin`, in order. EDUs are counted
    /// for the limit only: typing, receipts and presence over federation are not handled here.
    pub async fn receive_transaction(
        &self,
        origin: &ServerName,
        txn_id: &str,
        pdus: Vec<CanonicalJsonValue>,
        edus_count: usize,
        remote: &Remote,
    ) -> Result<TransactionResults, TransactionError> {
        if pdus.len() > PDUS_PER_TRANSACTION_MAX {
            return Err(TransactionError::TooManyPdus);
        }
        if edus_count > EDUS_PER_TRANSACTION_MAX {
            return Err(TransactionError::TooManyEdus);
        }
        let span = tracing::info_span!("transaction", %origin, txn_id, pdus = pdus.len());
        async move {
            // The PDUs' writes leave their WAL records buffered; this hands them to the OS
            // once, when the transaction is answered (or dropped).
            let _flush = FlushWalOnDrop(self.db());
            let mut results = TransactionResults::new();
            for value in pdus {
                let CanonicalJsonValue::Object(json) = value else {
                    tracing::debug!("PDU is not a JSON object: dropped");
                    continue;
                };
                // The result is keyed by event id: a PDU without a computable one is dropped.
                let Some(prepared) = self.prepare_remote(&json) else {
                    tracing::debug!("PDU without a computable event id: dropped");
                    continue;
                };
                let event_id = prepared.received.event_id().clone();
                let result = self
                    .receive_pdu_inner(origin, json, remote, true, Some(prepared), Wal::Buffer)
                    .await;
                if let Err(error) = &result {
                    tracing::info!(%event_id, %error, "PDU not accepted");
                }
                results.insert(event_id, result);
            }
            Ok(results)
        }
        .instrument(span)
        .await
    }

    /// A remote PDU redacted and serialised for its event id and signature checks, with its
    /// room's version, if the room is known.
    fn prepare_remote(&self, json: &CanonicalJsonObject) -> Option<Prepared> {
        let room_id = match json.get("room_id") {
            Some(CanonicalJsonValue::String(room_id)) => RoomId::parse(room_id).ok()?,
            _ => return None,
        };
        let version = self.known_room_version(&room_id).ok()??;
        let rules = federation::signing::rules_for(&version).ok()?;
        let received = ReceivedPdu::prepare(json, &rules).ok()?;
        Some(Prepared { received, version, rules })
    }

    /// Receives one PDU from `origin`: every check on receipt, in the spec's order, fetching
    /// missing auth and prev events from `origin` (bounded), then persisting it.
    #[instrument(skip_all, fields(origin = %origin))]
    pub async fn receive_pdu(
        &self,
        origin: &ServerName,
        json: CanonicalJsonObject,
        remote: &Remote,
    ) -> Result<Accepted, IngestError> {
        self.receive_pdu_inner(origin, json, remote, true, None, Wal::Flush).await
    }

    /// [`Rooms::receive_pdu`], with the PDU already prepared (event id, room version and rules)
    /// when the caller has it. `wal`: [`Wal::Buffer`] when the caller flushes the WAL after.
    async fn receive_pdu_inner(
        &self,
        origin: &ServerName,
        json: CanonicalJsonObject,
        remote: &Remote,
        fetch_missing_prev: bool,
        known: Option<Prepared>,
        wal: Wal,
    ) -> Result<Accepted, IngestError> {
        // 1. and 2. and 3.: format, signatures, content hash.
        let Checked { pdu, rules } = self.check_received_as(json, remote, known).await?;
        let room_id = pdu.room_id.clone();
        if !self.server_allowed(&room_id, origin)? {
            return Err(IngestError::ServerDenied(origin.to_owned()));
        }
        if self.meta(&pdu.event_id)?.is_some() {
            return Ok(Accepted::AlreadyKnown);
        }
        if pdu.kind == TimelineEventType::RoomCreate || pdu.prev_events.is_empty() {
            return Err(IngestError::Malformed(
                "a room's create event cannot be sent to it".into(),
            ));
        }
        self.fetch_missing_auth_events(origin, &pdu, remote).await?;
        // 4. Auth against the event's own auth events.
        let answers = self.check_auth_events(&pdu, &rules).map_err(IngestError::AuthEvents)?;

        // Missing prev events: ask the origin for the gap, once, and take what connects.
        let missing_events_max = self.inner.limits.missing_events_max;
        let missing: Vec<OwnedEventId> = self.missing_prev_events(&pdu)?;
        if !missing.is_empty() && fetch_missing_prev {
            let earliest = self.room(&room_id)?.ok_or(IngestError::UnknownRoom)?;
            let latest = [pdu.event_id.clone()];
            match remote
                .events
                .get_missing_events(
                    origin,
                    &room_id,
                    &earliest.forward_extremities,
                    &latest,
                    missing_events_max,
                )
                .await
            {
                Ok(events) => {
                    let mut events: Vec<(UInt, CanonicalJsonObject)> = events
                        .into_iter()
                        .take(missing_events_max)
                        .map(|json| {
                            let depth = match json.get("depth") {
                                Some(CanonicalJsonValue::Integer(depth)) => {
                                    UInt::try_from(i64::from(*depth)).unwrap_or_default()
                                }
                                _ => UInt::default(),
                            };
                            (depth, json)
                        })
                        .collect();
                    events.sort_by_key(|(depth, _)| *depth);
                    for (_, json) in events {
                        // One level only: the gap's own gaps are not chased.
                        let result = Box::pin(
                            self.receive_pdu_inner(origin, json, remote, false, None, wal),
                        )
                        .await;
                        if let Err(error) = result {
                            tracing::debug!(%error, "missing event not accepted");
                        }
                    }
                }
                Err(error) => tracing::info!(%error, "get_missing_events failed"),
            }
        }
        // Asked again only if something was missing: the fetch above may have filled it.
        let missing = if missing.is_empty() { missing } else { self.missing_prev_events(&pdu)? };
        let given_state = if missing.is_empty() {
            None
        } else {
            let list: Vec<String> = missing.iter().map(ToString::to_string).collect();
            if !fetch_missing_prev {
                return Err(IngestError::MissingPrevEvents(list.join(", ")));
            }
            // The gap could not be filled: without the prev events there is no state before
            // the event here, so the origin is asked for it (`state_ids`), and what it names
            // is fetched and checked
            // ([checks on receipt](https://spec.matrix.org/v1.16/server-server-api/#checks-performed-on-receipt-of-a-pdu)).
            match self.fetch_state_at(origin, &pdu, remote).await {
                Ok(state) => {
                    tracing::info!(
                        event_id = %pdu.event_id,
                        missing = missing.len(),
                        state = state.len(),
                        "prev events missing: state before the event taken from state_ids"
                    );
                    Some(state)
                }
                Err(error) => {
                    return Err(IngestError::MissingPrevEvents(format!(
                        "{} (and no state from state_ids: {error})",
                        list.join(", ")
                    )));
                }
            }
        };

        let lock = self.room_lock(&room_id);
        let _guard = lock.lock().await;
        if self.meta(&pdu.event_id)?.is_some() {
            return Ok(Accepted::AlreadyKnown);
        }
        let mut room = self.room(&room_id)?.ok_or(IngestError::UnknownRoom)?;
        self.accept_locked(&mut room, &pdu, &rules, given_state, Some(&answers), wal)
    }

    /// The state before `pdu` as `origin` has it: the ids `state_ids` answers, with every
    /// event of them this server lacks fetched (at most `state_events_fetched_max`), checked
    /// like a received PDU (format, signatures, hash, its auth events) and stored as an
    /// outlier.
    pub(super) async fn fetch_state_at(
        &self,
        origin: &ServerName,
        pdu: &Pdu,
        remote: &Remote,
    ) -> Result<BTreeMap<(String, String), OwnedEventId>, IngestError> {
        let room_id = &pdu.room_id;
        let ids = remote
            .events
            .state_ids(origin, room_id, &pdu.event_id)
            .await
            .map_err(|error| IngestError::MissingPrevEvents(format!("state_ids: {error}")))?;
        let mut missing = Vec::new();
        for event_id in &ids {
            if !self.db().contains(super::PDUS, event_id.as_bytes())? && !missing.contains(event_id)
            {
                missing.push(event_id.clone());
            }
        }
        let budget = self.inner.limits.state_events_fetched_max;
        if missing.len() > budget {
            return Err(IngestError::MissingPrevEvents(format!(
                "the state names {} events we lack, more than {budget}",
                missing.len()
            )));
        }
        self.fetch_outliers(origin, room_id, missing, budget, remote).await?;
        let mut state = BTreeMap::new();
        for event_id in ids {
            let event = self
                .pdu(&event_id)?
                .ok_or_else(|| IngestError::MissingPrevEvents(format!("{event_id} not stored")))?;
            let Some(state_key) = event.state_key.clone() else {
                return Err(IngestError::Malformed(format!("{event_id} is not a state event")));
            };
            if event.room_id != *room_id {
                return Err(IngestError::Malformed(format!("{event_id} is in another room")));
            }
            if state.insert((event.kind.to_string(), state_key), event_id.clone()).is_some() {
                return Err(IngestError::Malformed("the state names one key twice".into()));
            }
        }
        if !state.contains_key(&("m.room.create".to_owned(), String::new())) {
            return Err(IngestError::Malformed("the state has no create event".into()));
        }
        Ok(state)
    }

    /// Checks 1 to 3: a valid PDU of a known room's version, signed by the servers the room
    /// version requires, redacted when its content hash does not match.
    pub(super) async fn check_received(
        &self,
        json: CanonicalJsonObject,
        remote: &Remote,
    ) -> Result<Checked, IngestError> {
        self.check_received_as(json, remote, None).await
    }

    /// [`Rooms::check_received`], with the PDU already prepared (its room version and rules too) when the
    /// caller did that from the same JSON (the event id is a hash of the redacted event
    /// without `unsigned`, so the checks here do not change it).
    async fn check_received_as(
        &self,
        mut json: CanonicalJsonObject,
        remote: &Remote,
        known: Option<Prepared>,
    ) -> Result<Checked, IngestError> {
        let room_id = match json.get("room_id") {
            Some(CanonicalJsonValue::String(room_id)) => RoomId::parse(room_id)
                .map_err(|error| IngestError::Malformed(format!("room_id: {error}")))?,
            _ => return Err(IngestError::Malformed("missing room_id".into())),
        };
        let Prepared { received, version, rules } = match known {
            Some(prepared) => prepared,
            None => {
                let version = self.known_room_version(&room_id)?.ok_or(IngestError::UnknownRoom)?;
                let rules = federation::signing::rules_for(&version).map_err(RoomError::from)?;
                Prepared { received: prepare(&json, &rules)?, version, rules }
            }
        };
        self.check_prepared(&mut json, &received, &version, &rules, remote).await?;
        let pdu = Pdu::from_json(received.into_event_id(), json)
            .map_err(|error| IngestError::Malformed(error.to_string()))?;
        if pdu.room_id != room_id {
            return Err(IngestError::Malformed("room_id does not match".into()));
        }
        Ok(Checked { pdu, rules })
    }

    /// Format, signatures and content hash of a PDU of `version`, redacting it in place when
    /// only the hash fails ([validating hashes and signatures](https://spec.matrix.org/v1.16/server-server-api/#validating-hashes-and-signatures-on-received-events)).
    /// Returns its event id, from the same redaction.
    pub(crate) async fn check_signed_pdu(
        &self,
        json: &mut CanonicalJsonObject,
        version: &RoomVersionId,
        rules: &RoomVersionRules,
        remote: &Remote,
    ) -> Result<OwnedEventId, IngestError> {
        let received = prepare(json, rules)?;
        self.check_prepared(json, &received, version, rules, remote).await?;
        Ok(received.into_event_id())
    }

    /// [`Rooms::check_signed_pdu`] of a PDU prepared from `json` (whose event id the caller
    /// already has from [`prepare`]).
    pub(super) async fn check_prepared(
        &self,
        json: &mut CanonicalJsonObject,
        received: &ReceivedPdu,
        version: &RoomVersionId,
        rules: &RoomVersionRules,
        remote: &Remote,
    ) -> Result<(), IngestError> {
        // What the sender put in `unsigned` is not covered by the signature: it is not kept.
        json.remove("unsigned");
        ruma::state_res::check_pdu_format(json, &rules.event_format)
            .map_err(IngestError::Malformed)?;
        let servers =
            ruma::signatures::required_server_signatures_to_verify_event(json, &rules.signatures)
                .map_err(|error| IngestError::Signature(error.to_string()))?;
        let origin_server_ts = match json.get("origin_server_ts") {
            Some(CanonicalJsonValue::Integer(ts)) => UInt::try_from(i64::from(*ts))
                .map(MilliSecondsSinceUnixEpoch)
                .map_err(|_| IngestError::Malformed("bad origin_server_ts".into()))?,
            _ => return Err(IngestError::Malformed("missing origin_server_ts".into())),
        };
        let mut key_map = ruma::signatures::PublicKeyMap::new();
        for server in &servers {
            let keys =
                remote.keys.verify_keys(server, origin_server_ts).await.map_err(|error| {
                    IngestError::Signature(format!("keys of {server}: {error}"))
                })?;
            key_map.insert(server.to_string(), keys);
        }
        let verified = received
            .verify(json, servers, &key_map)
            .map_err(|error| IngestError::Signature(error.to_string()))?;
        if verified == Verified::Signatures {
            tracing::info!(room_version = %version, "content hash mismatch: event redacted");
            let redacted = ruma::canonical_json::redact(json.clone(), &rules.redaction, None)
                .map_err(|error| IngestError::Malformed(error.to_string()))?;
            *json = redacted;
        }
        Ok(())
    }

    /// Fetches the auth events of `pdu` this server lacks (and theirs) from `origin`, checks
    /// each (format, signatures, hash, its own auth events) and stores them as outliers.
    pub(super) async fn fetch_missing_auth_events(
        &self,
        origin: &ServerName,
        pdu: &Pdu,
        remote: &Remote,
    ) -> Result<(), IngestError> {
        let mut to_fetch: Vec<OwnedEventId> = Vec::new();
        for event_id in &pdu.auth_events {
            if !self.has_pdu(event_id)? {
                to_fetch.push(event_id.clone());
            }
        }
        self.fetch_outliers(origin, &pdu.room_id, to_fetch, AUTH_EVENTS_FETCHED_MAX, remote).await
    }

    /// Fetches `to_fetch` and the auth events of theirs this server lacks from `origin` (at
    /// most `budget` events), checks each (format, signatures, hash, its own auth events) and
    /// stores them as outliers, oldest first.
    async fn fetch_outliers(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        mut to_fetch: Vec<OwnedEventId>,
        mut budget: usize,
        remote: &Remote,
    ) -> Result<(), IngestError> {
        if to_fetch.is_empty() {
            return Ok(());
        }
        let mut fetched: Vec<Checked> = Vec::new();
        while let Some(event_id) = to_fetch.pop() {
            if self.has_pdu(&event_id)?
                || fetched.iter().any(|checked| checked.pdu.event_id == event_id)
            {
                continue;
            }
            if budget == 0 {
                return Err(IngestError::MissingAuthEvents("too many to fetch".into()));
            }
            budget -= 1;
            let json =
                remote.events.get_event(origin, &event_id).await.map_err(|error| {
                    IngestError::MissingAuthEvents(format!("{event_id}: {error}"))
                })?;
            let checked = self.check_received(json, remote).await?;
            if checked.pdu.event_id != event_id || checked.pdu.room_id != room_id {
                return Err(IngestError::MissingAuthEvents(format!(
                    "{origin} answered another event for {event_id}"
                )));
            }
            for auth_id in &checked.pdu.auth_events {
                if !self.has_pdu(auth_id)? {
                    to_fetch.push(auth_id.clone());
                }
            }
            fetched.push(checked);
        }
        // Store them oldest first: each once all its auth events are stored.
        while !fetched.is_empty() {
            let ready = fetched.iter().position(|checked| {
                checked.pdu.auth_events.iter().all(|id| self.has_pdu(id).unwrap_or(false))
            });
            let Some(index) = ready else {
                return Err(IngestError::MissingAuthEvents("auth events form no chain".into()));
            };
            let checked = fetched.swap_remove(index);
            self.check_auth_events(&checked.pdu, &checked.rules).map_err(|error| {
                IngestError::MissingAuthEvents(format!("{}: {error}", checked.pdu.event_id))
            })?;
            self.store_outlier(&checked.pdu)?;
        }
        Ok(())
    }

    /// Stores an event known without its state (an auth event fetched to check another): its
    /// PDU and short id, no metadata, no timeline row. The caller has checked it; the criterion
    /// benches (`benches/state_res.rs`) use this to lay out generated forks.
    pub fn store_outlier(&self, pdu: &Pdu) -> Result<(), RoomError> {
        if self.has_pdu(&pdu.event_id)? {
            return Ok(());
        }
        let db = self.db();
        let mut batch = db.batch();
        let short = db.next_short(&mut batch)?;
        self.write_pdu_rows(&mut batch, pdu, short)?;
        db.write(batch)?;
        Ok(())
    }

    /// Check 4: the auth rules against the event's own auth events. On success, the state
    /// entries the state-dependent rules asked for and which auth event answered each.
    pub(crate) fn check_auth_events(
        &self,
        pdu: &Pdu,
        rules: &RoomVersionRules,
    ) -> Result<AuthAnswers, String> {
        // Each auth event is read and parsed once, for both halves of the check.
        let listed: Vec<Arc<Pdu>> = pdu
            .auth_events
            .iter()
            .filter_map(|event_id| self.auth_pdu(event_id).ok().flatten())
            .collect();
        ruma::state_res::check_state_independent_auth_rules(&rules.authorization, pdu, |id| {
            match listed.iter().find(|event| event.event_id == id) {
                Some(event) => Some(event.clone()),
                None => self.auth_pdu(id).ok().flatten(),
            }
        })?;
        let mut auth_state: HashMap<(StateEventType, String), Arc<Pdu>> = HashMap::new();
        for event in &listed {
            if let Some(pair) = event.state_pair() {
                auth_state.insert(pair, event.clone());
            }
        }
        // Since room version 12 the create event is not listed: the room id names it.
        if rules.authorization.room_create_event_id_as_room_id
            && let Some(create) = self.create_event_of(&pdu.room_id)
        {
            auth_state.insert((StateEventType::RoomCreate, String::new()), Arc::new(create));
        }
        let answers = RefCell::new(AuthAnswers::default());
        ruma::state_res::check_state_dependent_auth_rules(
            &rules.authorization,
            pdu,
            |kind, state_key| {
                let pair = (kind.clone(), state_key.to_owned());
                let found = auth_state.get(&pair).cloned();
                answers.borrow_mut().asked.push((pair, found.as_ref().map(|e| e.event_id.clone())));
                found
            },
        )?;
        Ok(answers.into_inner())
    }

    /// The create event of a room whose id is derived from it (room version 12 and later):
    /// `!x` is created by `$x`. Found even before the room has state here (while joining).
    pub(crate) fn create_event_of(&self, room_id: &RoomId) -> Option<Pdu> {
        if let Ok(Some(create)) = self.current_state_pdu(room_id, "m.room.create", "") {
            return Some(create);
        }
        let event_id = EventId::parse(format!("${}", room_id.as_str().strip_prefix('!')?)).ok()?;
        self.pdu(&event_id).ok().flatten()
    }

    /// Prev events of `pdu` this server has no state for.
    pub(super) fn missing_prev_events(&self, pdu: &Pdu) -> Result<Vec<OwnedEventId>, RoomError> {
        let mut missing = Vec::new();
        for event_id in &pdu.prev_events {
            if self.meta(event_id)?.is_none_or(|meta| meta.outlier) {
                missing.push(event_id.clone());
            }
        }
        Ok(missing)
    }

    /// Checks 5 and 6 and the write, with the room lock held: state before the event from its
    /// prev events (resolved where they differ), auth against it (reject), auth against the
    /// current state (soft fail), then one batch with extremities and current state.
    ///
    /// `given_state` is the state before the event when its prev events are missing and it
    /// came from `state_ids` instead; the prev events this server has still leave the forward
    /// extremities.
    fn accept_locked(
        &self,
        room: &mut RoomRecord,
        pdu: &Pdu,
        rules: &RoomVersionRules,
        given_state: Option<BTreeMap<(String, String), OwnedEventId>>,
        answers: Option<&AuthAnswers>,
        wal: Wal,
    ) -> Result<Accepted, IngestError> {
        let room_id = pdu.room_id.clone();
        let mut prev_snapshots: Vec<Option<u64>> = Vec::new();
        for event_id in &pdu.prev_events {
            let meta = match self.meta(event_id)? {
                Some(meta) if !meta.outlier => meta,
                _ if given_state.is_some() => continue,
                _ => return Err(IngestError::MissingPrevEvents(event_id.to_string())),
            };
            if meta.room_id != room_id {
                return Err(IngestError::Malformed(format!(
                    "prev event {event_id} is in another room"
                )));
            }
            if !prev_snapshots.contains(&meta.state_after) {
                prev_snapshots.push(meta.state_after);
            }
        }
        // The common case: the event follows exactly the room's forward extremities, whose
        // state is the current state. Nothing forks, so the state before the event is the
        // current state and the checks read only the few entries the auth rules name, instead
        // of every entry of a room that may hold tens of thousands.
        if given_state.is_none()
            && let [snapshot] = prev_snapshots.as_slice()
            && *snapshot == room.current_snapshot
            && room.forward_extremities.len() == pdu.prev_events.len()
            && room.forward_extremities.iter().all(|id| pdu.prev_events.contains(id))
        {
            return self.accept_linear(room, pdu, rules, answers, wal);
        }
        // 5. State before the event.
        let from_state_ids = given_state.is_some();
        let (state_before, before_snapshot) = if let Some(given) = given_state {
            (given, None)
        } else if let [snapshot] = prev_snapshots.as_slice() {
            (self.state_at(*snapshot)?, Some(*snapshot))
        } else {
            let states = prev_snapshots
                .iter()
                .map(|snapshot| self.state_at(*snapshot))
                .collect::<Result<Vec<_>, _>>()?;
            (self.resolve_states(rules, states, None)?, None)
        };
        let fetch_from = |state: &BTreeMap<(String, String), OwnedEventId>,
                          kind: &StateEventType,
                          state_key: &str| {
            state
                .get(&(kind.to_string(), state_key.to_owned()))
                .and_then(|event_id| self.auth_pdu(event_id).ok().flatten())
        };
        ruma::state_res::check_state_dependent_auth_rules(
            &rules.authorization,
            pdu,
            |kind, key| fetch_from(&state_before, kind, key),
        )
        .map_err(IngestError::StateBefore)?;
        // 6. Soft failure against the current state.
        let current = self.state_at(room.current_snapshot)?;
        let soft_failed = ruma::state_res::check_state_dependent_auth_rules(
            &rules.authorization,
            pdu,
            |kind, key| fetch_from(&current, kind, key),
        )
        .err();
        if let Some(reason) = &soft_failed {
            tracing::info!(event_id = %pdu.event_id, reason, "event soft-failed");
        }
        let redaction_applies = match &pdu.redacts {
            Some(redacts) => self.remote_redaction_applies(&state_before, pdu, redacts)?,
            None => false,
        };
        let mut state_after = state_before.clone();
        if let Some(state_key) = &pdu.state_key {
            state_after.insert((pdu.kind.to_string(), state_key.clone()), pdu.event_id.clone());
        }
        // The event replaces its prev events among the forward extremities; the current state
        // is the resolution of the extremities' states.
        let mut extremities: Vec<OwnedEventId> = room
            .forward_extremities
            .iter()
            .filter(|event_id| !pdu.prev_events.contains(event_id))
            .cloned()
            .collect();
        extremities.push(pdu.event_id.clone());
        let new_current = if soft_failed.is_some() {
            None
        } else if extremities.len() == 1 {
            Some(state_after.clone())
        } else {
            let mut states = vec![state_after.clone()];
            for event_id in extremities.iter().filter(|id| **id != pdu.event_id) {
                let snapshot = self.meta(event_id)?.and_then(|meta| meta.state_after);
                states.push(self.state_at(snapshot)?);
            }
            Some(self.resolve_states(rules, states, Some(pdu))?)
        };
        for map in [Some(&state_before), new_current.as_ref()].into_iter().flatten() {
            for event_id in map.values() {
                if *event_id != pdu.event_id
                    && state::short_of_event(self.db(), event_id)?.is_none()
                {
                    return Err(IngestError::StateResolution(format!(
                        "state event {event_id} is not stored"
                    )));
                }
            }
        }
        // State events fetched for `state_ids` are outliers: those that become current state
        // get the metadata that shows them to clients, as after a join.
        let mut shown = Vec::new();
        if from_state_ids && let Some(new_current) = &new_current {
            for event_id in new_current.values() {
                if *event_id != pdu.event_id && self.meta(event_id)?.is_none() {
                    shown.push(event_id.clone());
                }
            }
        }
        let plan = Plan {
            state_before,
            before_snapshot,
            state_after,
            current,
            new_current,
            extremities,
            redaction_applies,
        };
        let (position, members_changed) =
            self.db().write_at_next_position_with(wal, |position, batch| {
                let members_changed = self.persist_remote(batch, room, pdu, position, plan)?;
                self.write_shown_outliers(batch, &room_id, &shown, position)?;
                Ok(members_changed)
            })?;
        tracing::debug!(event_id = %pdu.event_id, position, "remote event persisted");
        if members_changed {
            self.room_membership_changed(&pdu.room_id);
        }
        self.announce(
            &pdu.room_id,
            position,
            members_changed || pdu.kind == TimelineEventType::RoomMember,
        );
        Ok(if soft_failed.is_some() { Accepted::SoftFailed } else { Accepted::Persisted })
    }

    /// Checks 5 and 6 and the write for an event whose prev events are exactly the forward
    /// extremities and whose state before is the current state (see [`Rooms::accept_locked`]).
    /// The soft-fail check is the state-before check against the same state, so it cannot fail
    /// where that passed; the state after is the current state plus the event, one delta.
    ///
    /// When every state entry the auth rules asked of the event's auth events (`answers`) is
    /// the same event in the current state, the check against the current state would ask the
    /// same and get the same answers, so it is not run again: the rules are a function of the
    /// event and those answers.
    fn accept_linear(
        &self,
        room: &mut RoomRecord,
        pdu: &Pdu,
        rules: &RoomVersionRules,
        answers: Option<&AuthAnswers>,
        wal: Wal,
    ) -> Result<Accepted, IngestError> {
        let db = self.db();
        let current = state::load_snapshot(db, &self.inner.snapshots, room.current_snapshot)?;
        let lookup = |kind: &str, state_key: &str| -> Result<Option<OwnedEventId>, RoomError> {
            let Some(key_short) = state::state_key_short(db, kind, state_key)? else {
                return Ok(None);
            };
            match current.get(&key_short) {
                Some(event_short) => Ok(state::event_id_of_short(db, *event_short)?),
                None => Ok(None),
            }
        };
        let answered_alike = answers.is_some_and(|answers| {
            answers.asked.iter().all(|((kind, state_key), answered)| {
                lookup(&kind.to_string(), state_key).is_ok_and(|current| current == *answered)
            })
        });
        if !answered_alike {
            ruma::state_res::check_state_dependent_auth_rules(
                &rules.authorization,
                pdu,
                |kind, state_key| {
                    let event_id = lookup(&kind.to_string(), state_key).ok().flatten()?;
                    self.auth_pdu(&event_id).ok().flatten()
                },
            )
            .map_err(IngestError::StateBefore)?;
        }
        let redaction_applies = match &pdu.redacts {
            Some(redacts) => {
                let mut levels = BTreeMap::new();
                if let Some(event_id) = lookup("m.room.power_levels", "")? {
                    levels.insert(("m.room.power_levels".to_owned(), String::new()), event_id);
                }
                self.remote_redaction_applies(&levels, pdu, redacts)?
            }
            None => false,
        };
        let room_id = pdu.room_id.clone();
        let (position, ()) = db.write_at_next_position_with(wal, |position, batch| {
            let short = db.next_short(batch)?;
            let state_before = room.current_snapshot;
            let mut state_after = state_before;
            if let Some(state_key) = &pdu.state_key {
                let kind = pdu.kind.to_string();
                state_after = Some(state::add_to_snapshot(
                    db,
                    &self.inner.snapshots,
                    batch,
                    state_before,
                    &kind,
                    state_key,
                    short,
                )?);
                self.index_current_state(batch, &room_id, &kind, state_key, Some(pdu), position)?;
            }
            let meta = EventMeta {
                room_id: room_id.clone(),
                position,
                short,
                state_before,
                state_after,
                transaction: None,
                redacted_by: None,
                soft_failed: false,
                current_after: None,
                outlier: false,
            };
            self.write_event_rows(batch, pdu, &meta, true, redaction_applies)?;
            room.forward_extremities = vec![pdu.event_id.clone()];
            room.depth = room.depth.max(pdu.depth);
            room.current_snapshot = state_after;
            room.last_position = position;
            batch.put(ROOMS, room_id.as_bytes(), &*room)?;
            Ok(())
        })?;
        tracing::debug!(event_id = %pdu.event_id, position, "remote event persisted");
        let membership = pdu.kind == TimelineEventType::RoomMember;
        if membership {
            self.room_membership_changed(&room_id);
        }
        self.announce(&room_id, position, membership);
        Ok(Accepted::Persisted)
    }

    /// A redaction takes effect when its sender may redact others' events, or redacts an
    /// event of its own server ([redactions](https://spec.matrix.org/v1.16/rooms/v11/#handling-redactions)).
    pub(super) fn remote_redaction_applies(
        &self,
        state: &BTreeMap<(String, String), OwnedEventId>,
        redaction: &Pdu,
        redacts: &EventId,
    ) -> Result<bool, RoomError> {
        if let Some(target) = self.pdu(redacts)?
            && target.sender.server_name() == redaction.sender.server_name()
        {
            return Ok(true);
        }
        let levels = match state.get(&("m.room.power_levels".to_owned(), String::new())) {
            Some(event_id) => self.pdu(event_id)?.map(|pdu| pdu.content_value()),
            None => None,
        };
        let Some(levels) = levels else { return Ok(false) };
        let level_of = |value: Option<&Value>, default: i64| {
            value
                .and_then(|value| value.as_i64().or_else(|| value.as_str()?.parse().ok()))
                .unwrap_or(default)
        };
        let sender_level = level_of(
            levels.get("users").and_then(|users| users.get(redaction.sender.as_str())),
            level_of(levels.get("users_default"), 0),
        );
        Ok(sender_level >= level_of(levels.get("redact"), 50))
    }

    /// Gives state events known only as outliers the metadata that shows them to clients as
    /// room state from `position` on (`EventMeta::outlier`), in `batch`.
    pub(super) fn write_shown_outliers(
        &self,
        batch: &mut Batch<'_>,
        room_id: &RoomId,
        event_ids: &[OwnedEventId],
        position: u64,
    ) -> Result<(), storage::Error> {
        for event_id in event_ids {
            if self.db().contains(super::METAS, event_id.as_bytes())? {
                continue;
            }
            let Some(short) = state::short_of_event(self.db(), event_id)? else { continue };
            let meta = EventMeta {
                room_id: room_id.to_owned(),
                position,
                short,
                state_before: None,
                state_after: None,
                transaction: None,
                redacted_by: None,
                soft_failed: false,
                current_after: None,
                outlier: true,
            };
            batch.put(super::METAS, event_id.as_bytes(), &meta)?;
        }
        Ok(())
    }

    pub(super) fn persist_remote(
        &self,
        batch: &mut Batch<'_>,
        room: &mut RoomRecord,
        pdu: &Pdu,
        position: u64,
        plan: Plan,
    ) -> Result<bool, storage::Error> {
        let db = self.db();
        let room_id = &pdu.room_id;
        let short = db.next_short(batch)?;
        let mut shorts = ShortIds::default();
        let state_before = match plan.before_snapshot {
            Some(snapshot) => snapshot,
            None => Some(self.write_state(
                batch,
                &mut shorts,
                room.current_snapshot,
                &plan.state_before,
                pdu,
                short,
            )?),
        };
        let state_after = match &pdu.state_key {
            Some(_) => Some(self.write_state(
                batch,
                &mut shorts,
                state_before,
                &plan.state_after,
                pdu,
                short,
            )?),
            None => state_before,
        };
        let mut meta = EventMeta {
            room_id: room_id.clone(),
            position,
            short,
            state_before,
            state_after,
            transaction: None,
            redacted_by: None,
            soft_failed: plan.new_current.is_none(),
            current_after: None,
            outlier: false,
        };
        let Some(new_current) = plan.new_current else {
            self.write_event_rows(batch, pdu, &meta, false, false)?;
            return Ok(false);
        };
        let current_snapshot = if new_current == plan.state_after {
            state_after
        } else {
            let snapshot =
                self.write_state(batch, &mut shorts, state_after, &new_current, pdu, short)?;
            meta.current_after = Some(snapshot);
            Some(snapshot)
        };
        // Keep the current-state and membership indexes in step with the new current state.
        let mut changed: Vec<(&(String, String), Option<&OwnedEventId>)> = Vec::new();
        for (key, event_id) in &new_current {
            if plan.current.get(key) != Some(event_id) {
                changed.push((key, Some(event_id)));
            }
        }
        for key in plan.current.keys() {
            if !new_current.contains_key(key) {
                changed.push((key, None));
            }
        }
        let members_changed = changed.iter().any(|((kind, _), _)| kind == "m.room.member");
        for ((kind, state_key), event_id) in changed {
            let event = match event_id {
                Some(event_id) if *event_id == pdu.event_id => Some(pdu.clone()),
                Some(event_id) => self.pdu(event_id).ok().flatten(),
                None => None,
            };
            self.index_current_state(batch, room_id, kind, state_key, event.as_ref(), position)?;
        }
        self.write_event_rows(batch, pdu, &meta, true, plan.redaction_applies)?;
        room.forward_extremities = plan.extremities;
        room.depth = room.depth.max(pdu.depth);
        room.current_snapshot = current_snapshot;
        room.last_position = position;
        batch.put(ROOMS, room_id.as_bytes(), room)?;
        Ok(members_changed)
    }

    /// Writes a state map as a snapshot (a delta against `parent` where it can be). `pdu`
    /// (short id `short`) may be in the map before it is stored; every other event in it is
    /// stored (checked before the write).
    pub(super) fn write_state(
        &self,
        batch: &mut Batch<'_>,
        shorts: &mut ShortIds,
        parent: Option<u64>,
        map: &BTreeMap<(String, String), OwnedEventId>,
        pdu: &Pdu,
        short: u64,
    ) -> Result<u64, storage::Error> {
        let db = self.db();
        let mut full = state::ShortState::new();
        for ((kind, state_key), event_id) in map {
            let key_short = match shorts.keys.get(&(kind.clone(), state_key.clone())) {
                Some(key_short) => *key_short,
                None => {
                    let key_short = state::state_key_short_or_new(db, batch, kind, state_key)?;
                    shorts.keys.insert((kind.clone(), state_key.clone()), key_short);
                    key_short
                }
            };
            let event_short = if *event_id == pdu.event_id {
                Some(short)
            } else {
                state::short_of_event(db, event_id)?
            };
            if let Some(event_short) = event_short {
                full.insert(key_short, event_short);
            }
        }
        state::write_snapshot(db, &self.inner.snapshots, batch, parent, full)
    }

    /// State resolution of several state maps
    /// ([v2](https://spec.matrix.org/v1.16/rooms/v2/#state-resolution)). Maps that agree are
    /// merged without it. `extra` is an event not stored yet that may appear in the maps.
    ///
    /// Every event of the maps and of their auth chains is read from the store (outliers
    /// included). This is the path remote events take where the DAG forks; it is `pub` so that
    /// the criterion benches (`benches/state_res.rs`) measure exactly it.
    pub fn resolve_states(
        &self,
        rules: &RoomVersionRules,
        states: Vec<BTreeMap<(String, String), OwnedEventId>>,
        extra: Option<&Pdu>,
    ) -> Result<BTreeMap<(String, String), OwnedEventId>, IngestError> {
        let Some(first) = states.first() else { return Ok(BTreeMap::new()) };
        if states.iter().all(|state| state == first) {
            return Ok(first.clone());
        }
        let Some(v2_rules) = rules.state_res.v2_rules() else {
            return Err(IngestError::StateResolution(
                "state resolution v1 (room version 1) is not supported".into(),
            ));
        };
        // Read in batches; a batch that fails (a stored PDU that does not parse) is read again
        // one by one, each failure taken as missing.
        let read = |ids: &[OwnedEventId]| match self.pdus(ids) {
            Ok(found) => found,
            Err(_) => ids.iter().map(|id| self.pdu(id).ok().flatten()).collect(),
        };
        super::resolution::resolve(
            &rules.authorization,
            v2_rules,
            &states,
            extra,
            AUTH_CHAIN_EVENTS_MAX,
            read,
        )
        .map_err(IngestError::StateResolution)
    }

    /// Whether the room's server ACL lets `server` take part
    /// ([server ACLs](https://spec.matrix.org/v1.16/client-server-api/#server-access-control-lists-acls-for-rooms)).
    pub fn server_allowed(&self, room_id: &RoomId, server: &ServerName) -> Result<bool, RoomError> {
        let Some(acl) = self.current_state_content(room_id, "m.room.server_acl", "")? else {
            return Ok(true);
        };
        Ok(acl_allows(&acl, server))
    }
}

/// The state entries the state-dependent auth rules asked of an event's auth events, each
/// with the auth event that answered (`None`: not among them), in the order asked.
#[derive(Debug, Default)]
pub(crate) struct AuthAnswers {
    asked: Vec<((StateEventType, String), Option<OwnedEventId>)>,
}

/// What [`Rooms::accept_locked`] decided, for the write.
pub(super) struct Plan {
    pub(super) state_before: BTreeMap<(String, String), OwnedEventId>,
    /// The snapshot of `state_before` when it is a prev event's state (else it is written).
    pub(super) before_snapshot: Option<Option<u64>>,
    pub(super) state_after: BTreeMap<(String, String), OwnedEventId>,
    /// The room's current state before the event.
    pub(super) current: BTreeMap<(String, String), OwnedEventId>,
    /// The room's current state after it; `None` when the event soft-failed.
    pub(super) new_current: Option<BTreeMap<(String, String), OwnedEventId>>,
    pub(super) extremities: Vec<OwnedEventId>,
    pub(super) redaction_applies: bool,
}

/// Short ids allocated in a batch that is not written yet, so none is allocated twice.
#[derive(Default)]
pub(super) struct ShortIds {
    keys: HashMap<(String, String), u64>,
}

/// Sets and maps of event ids that live for one resolution or walk: seeded, but much faster
/// than std's SipHash on ids of 44 characters.
pub(crate) type FastSet<T> = HashSet<T, foldhash::fast::RandomState>;

/// Every event reachable through `auth_events` from `start` (not `start` itself unless
/// reachable), bounded by [`AUTH_CHAIN_EVENTS_MAX`].
pub(crate) fn auth_chain<P: Borrow<Pdu>>(
    start: impl IntoIterator<Item = OwnedEventId>,
    fetch: &impl Fn(&EventId) -> Option<P>,
) -> Result<FastSet<OwnedEventId>, String> {
    let mut chain = FastSet::default();
    let mut stack: Vec<OwnedEventId> = Vec::new();
    for event_id in start {
        if let Some(pdu) = fetch(&event_id) {
            stack.extend(pdu.borrow().auth_events.iter().cloned());
        }
    }
    while let Some(event_id) = stack.pop() {
        if !chain.insert(event_id.clone()) {
            continue;
        }
        if chain.len() > AUTH_CHAIN_EVENTS_MAX {
            return Err("auth chain too long".into());
        }
        if let Some(pdu) = fetch(&event_id) {
            stack
                .extend(pdu.borrow().auth_events.iter().filter(|id| !chain.contains(*id)).cloned());
        }
    }
    Ok(chain)
}

/// A received PDU redacted and serialised for its checks; a PDU that cannot be is malformed.
pub(super) fn prepare(
    json: &CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> Result<ReceivedPdu, IngestError> {
    ReceivedPdu::prepare(json, rules).map_err(|error| IngestError::Malformed(error.to_string()))
}

/// Whether an `m.room.server_acl` content allows `server`.
pub fn acl_allows(acl: &Value, server: &ServerName) -> bool {
    let host = server.host();
    let patterns = |field: &str| -> Vec<String> {
        acl.get(field)
            .and_then(Value::as_array)
            .map(|list| list.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    let allow_ip_literals = acl.get("allow_ip_literals").and_then(Value::as_bool).unwrap_or(true);
    if !allow_ip_literals && server.is_ip_literal() {
        return false;
    }
    if patterns("deny").iter().any(|pattern| glob_matches(pattern, host)) {
        return false;
    }
    patterns("allow").iter().any(|pattern| glob_matches(pattern, host))
}

/// `*` (any run) and `?` (one character) globbing, case-insensitively, as ACLs use it.
fn glob_matches(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.to_lowercase().chars().collect();
    let text: Vec<char> = text.to_lowercase().chars().collect();
    let (mut p, mut t) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            star = Some(p);
            mark = t;
            p += 1;
        } else if let Some(star) = star {
            p = star + 1;
            mark += 1;
            t = mark;
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p] == '*' {
        p += 1;
    }
    p == pattern.len()
}

#[cfg(test)]
mod tests {
    use ruma::server_name;
    use serde_json::json;

    use super::*;

    fn check(acl: Value, server: &ServerName, expected: bool) {
        assert_eq!(acl_allows(&acl, server), expected, "{acl} for {server}");
    }

    #[test]
    fn server_acls_follow_the_globs() {
        let acl = json!({"allow": ["*"], "deny": ["*.evil.test", "bad?.test"]});
        check(acl.clone(), server_name!("good.test"), true);
        check(acl.clone(), server_name!("a.evil.test"), false);
        check(acl.clone(), server_name!("bad1.test"), false);
        check(acl.clone(), server_name!("bad12.test"), true);
        check(json!({"allow": ["*"], "allow_ip_literals": false}), server_name!("1.2.3.4"), false);
        check(json!({"deny": []}), server_name!("good.test"), false);
        check(json!({"allow": ["GOOD.test"]}), server_name!("good.test:8448"), true);
    }
}
