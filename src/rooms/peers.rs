//! What other servers may read from our rooms and do in them: single events, state and auth
//! chains at an event, backfill, missing events, joining and leaving through a resident
//! server (`make_join`/`send_join`, `make_leave`/`send_leave`), knocking
//! (`make_knock`/`send_knock`), and invites of our users to rooms elsewhere.
//!
//! Reads check the room's server ACL and history visibility: a server may read an event when
//! one of its users was in the room at that event, or the room is world readable
//! ([history visibility](https://spec.matrix.org/v1.16/server-server-api/#authorization)).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, OwnedEventId, RoomId, RoomVersionId,
    ServerName, UserId, events::TimelineEventType,
};
use serde::Serialize;
use serde_json::{Value, json};

use super::{
    EventMeta, MembershipRecord, NewEvent, PDUS, Pdu, RoomError, Rooms, USER_ROOMS,
    ingest::{Accepted, IngestError, Remote, auth_chain},
};

/// The most events one `backfill` answer holds.
pub const BACKFILL_MAX: usize = 100;
/// The most events one `get_missing_events` answer holds.
pub const MISSING_EVENTS_SERVED_MAX: usize = 50;
/// The most stripped state events kept with an invite.
pub const INVITE_STATE_MAX: usize = 50;
/// The state events a server shares about a room with one who is not in it yet (the
/// [stripped state](https://spec.matrix.org/v1.16/client-server-api/#stripped-state) the spec
/// recommends), the create event first.
pub const STRIPPED_STATE_TYPES: [&str; 7] = [
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.encryption",
    "m.room.topic",
];

/// Why a server's request about a room failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The room or event is not known here.
    #[error("not found")]
    NotFound,
    /// The server may not see this, or may not do it.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The requesting server supports none of the room's version.
    #[error("incompatible room version {0}")]
    IncompatibleRoomVersion(RoomVersionId),
    /// The event in the request is not what the endpoint takes.
    #[error("bad event: {0}")]
    BadEvent(String),
    /// The event is well formed but not the membership the endpoint is for.
    #[error("wrong membership: {0}")]
    WrongMembership(String),
    /// The event was refused by the checks on receipt.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// Storage or a stored event failed.
    #[error(transparent)]
    Room(#[from] RoomError),
}

impl From<storage::Error> for PeerError {
    fn from(error: storage::Error) -> Self {
        Self::Room(RoomError::Storage(error))
    }
}

/// The room state at an event, as PDUs or ids, with the auth chain of that state.
#[derive(Clone, Debug, Serialize)]
pub struct StateAt<T> {
    /// The state events.
    pub pdus: Vec<T>,
    /// Their full auth chain.
    pub auth_chain: Vec<T>,
}

/// The answer of `send_join` v2.
#[derive(Clone, Debug, Serialize)]
pub struct JoinedRoom {
    /// This server.
    pub origin: String,
    /// The room state before the join.
    pub state: Vec<CanonicalJsonObject>,
    /// The auth chain of that state and of the join.
    pub auth_chain: Vec<CanonicalJsonObject>,
    /// The join as accepted.
    pub event: CanonicalJsonObject,
    /// Always false: the full state is sent.
    pub members_omitted: bool,
}

/// A membership template of `make_join` / `make_leave`.
#[derive(Clone, Debug, Serialize)]
pub struct MembershipTemplate {
    /// The room's version.
    pub room_version: RoomVersionId,
    /// The event for the remote server to complete and sign.
    pub event: CanonicalJsonObject,
}

impl Rooms {
    /// Whether `server` may read `pdu` (server ACL and history visibility at the event).
    pub fn server_may_see(
        &self,
        server: &ServerName,
        pdu: &Pdu,
        meta: &EventMeta,
    ) -> Result<bool, RoomError> {
        if !self.server_allowed(&pdu.room_id, server)? {
            return Ok(false);
        }
        let state = self.state_at(meta.state_before)?;
        let visibility = state
            .get(&("m.room.history_visibility".to_owned(), String::new()))
            .and_then(|event_id| self.pdu(event_id).ok().flatten())
            .and_then(|event| {
                event.content_value().get("history_visibility")?.as_str().map(str::to_owned)
            })
            .unwrap_or_else(|| "shared".to_owned());
        if visibility == "world_readable" {
            return Ok(true);
        }
        let memberships = |state: &BTreeMap<(String, String), OwnedEventId>| -> Vec<String> {
            state
                .iter()
                .filter(|((kind, state_key), _)| {
                    kind == "m.room.member"
                        && UserId::parse(state_key.as_str())
                            .is_ok_and(|user_id| user_id.server_name() == server)
                })
                .filter_map(|(_, event_id)| self.pdu(event_id).ok().flatten()?.membership())
                .collect()
        };
        let at_event = memberships(&state);
        let own_event = pdu.sender.server_name() == server;
        let allowed = own_event
            || at_event.iter().any(|membership| match visibility.as_str() {
                "joined" => membership == "join",
                _ => membership == "join" || membership == "invite",
            });
        if allowed || visibility != "shared" {
            return Ok(allowed);
        }
        // `shared`: a server with a user in the room now may read the history.
        let current = self.current_state_ids(&pdu.room_id)?;
        Ok(memberships(&current).iter().any(|membership| membership == "join"))
    }

    /// An event with its metadata, if `server` may read it.
    fn readable_event(
        &self,
        server: &ServerName,
        event_id: &EventId,
    ) -> Result<(Pdu, EventMeta), PeerError> {
        let (Some(pdu), Some(meta)) = (self.pdu(event_id)?, self.meta(event_id)?) else {
            return Err(PeerError::NotFound);
        };
        if !self.server_may_see(server, &pdu, &meta)? {
            return Err(PeerError::Forbidden("You may not see this event".into()));
        }
        Ok((pdu, meta))
    }

    /// The PDU as served to peers: redacted when it was redacted here.
    fn served_json(
        &self,
        pdu: &Pdu,
        meta: Option<&EventMeta>,
    ) -> Result<CanonicalJsonObject, RoomError> {
        if meta.is_some_and(|meta| meta.redacted_by.is_some()) {
            let rules = federation::signing::rules_for(&self.room_version(&pdu.room_id)?)?;
            if let Ok(redacted) =
                ruma::canonical_json::redact(pdu.json()?.clone(), &rules.redaction, None)
            {
                return Ok(redacted);
            }
        }
        Ok(pdu.json()?.clone())
    }

    /// `GET /_matrix/federation/v1/event/{eventId}`.
    pub fn event_for_server(
        &self,
        server: &ServerName,
        event_id: &EventId,
    ) -> Result<CanonicalJsonObject, PeerError> {
        let (pdu, meta) = self.readable_event(server, event_id)?;
        Ok(self.served_json(&pdu, Some(&meta))?)
    }

    /// The state before `event_id` and its auth chain, as ids
    /// (`GET /_matrix/federation/v1/state_ids/{roomId}`).
    pub fn state_ids_for_server(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<StateAt<OwnedEventId>, PeerError> {
        let (pdu, meta) = self.readable_event(server, event_id)?;
        if pdu.room_id != room_id {
            return Err(PeerError::NotFound);
        }
        let state: Vec<OwnedEventId> = self.state_at(meta.state_before)?.into_values().collect();
        let chain = self.auth_chain_of(state.iter().cloned())?;
        Ok(StateAt { pdus: state, auth_chain: chain })
    }

    /// The state before `event_id` and its auth chain, as PDUs
    /// (`GET /_matrix/federation/v1/state/{roomId}`).
    pub fn state_for_server(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<StateAt<CanonicalJsonObject>, PeerError> {
        let ids = self.state_ids_for_server(server, room_id, event_id)?;
        Ok(StateAt {
            pdus: self.pdus_json(&ids.pdus)?,
            auth_chain: self.pdus_json(&ids.auth_chain)?,
        })
    }

    /// `GET /_matrix/federation/v1/event_auth/{roomId}/{eventId}`: the event's auth chain.
    pub fn event_auth_for_server(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<Vec<CanonicalJsonObject>, PeerError> {
        let (pdu, _) = self.readable_event(server, event_id)?;
        if pdu.room_id != room_id {
            return Err(PeerError::NotFound);
        }
        let chain = self.auth_chain_of([pdu.event_id.clone()])?;
        self.pdus_json(&chain)
    }

    /// `GET /_matrix/federation/v1/backfill/{roomId}`: `from` and the events before them,
    /// newest first, up to `limit` (at most [`BACKFILL_MAX`]) that `server` may read.
    pub fn backfill_for_server(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        from: &[OwnedEventId],
        limit: usize,
    ) -> Result<Vec<CanonicalJsonObject>, PeerError> {
        if self.room(room_id)?.is_none() {
            return Err(PeerError::NotFound);
        }
        if !self.server_allowed(room_id, server)? {
            return Err(PeerError::Forbidden("Denied by the room's server ACL".into()));
        }
        let limit = limit.min(BACKFILL_MAX);
        let mut seen: HashSet<OwnedEventId> = HashSet::new();
        // Newest first: always continue from the deepest event not yet taken.
        let mut frontier: BTreeSet<(u64, OwnedEventId)> = BTreeSet::new();
        for event_id in from {
            if let Some(pdu) = self.pdu(event_id)?
                && pdu.room_id == room_id
                && seen.insert(event_id.clone())
            {
                frontier.insert((pdu.depth, event_id.clone()));
            }
        }
        let mut events = Vec::new();
        while events.len() < limit {
            let Some((_, event_id)) = frontier.pop_last() else { break };
            let (Some(pdu), Some(meta)) = (self.pdu(&event_id)?, self.meta(&event_id)?) else {
                continue;
            };
            for prev in &pdu.prev_events {
                if seen.insert(prev.clone())
                    && let Some(prev_pdu) = self.pdu(prev)?
                {
                    frontier.insert((prev_pdu.depth, prev.clone()));
                }
            }
            if self.server_may_see(server, &pdu, &meta)? {
                events.push(self.served_json(&pdu, Some(&meta))?);
            }
        }
        Ok(events)
    }

    /// `POST /_matrix/federation/v1/get_missing_events/{roomId}`: events before
    /// `latest_events` back to (not including) `earliest_events`, oldest first.
    pub fn missing_events_for_server(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        earliest_events: &[OwnedEventId],
        latest_events: &[OwnedEventId],
        limit: usize,
        min_depth: u64,
    ) -> Result<Vec<CanonicalJsonObject>, PeerError> {
        if self.room(room_id)?.is_none() {
            return Err(PeerError::NotFound);
        }
        if !self.server_allowed(room_id, server)? {
            return Err(PeerError::Forbidden("Denied by the room's server ACL".into()));
        }
        let limit = limit.min(MISSING_EVENTS_SERVED_MAX);
        let mut seen: HashSet<OwnedEventId> = earliest_events.iter().cloned().collect();
        let mut queue: std::collections::VecDeque<OwnedEventId> = std::collections::VecDeque::new();
        for latest in latest_events {
            if let Some(pdu) = self.pdu(latest)?
                && pdu.room_id == room_id
            {
                seen.insert(latest.clone());
                queue.extend(pdu.prev_events.iter().cloned());
            }
        }
        let mut found: Vec<(u64, CanonicalJsonObject)> = Vec::new();
        while let Some(event_id) = queue.pop_front() {
            if found.len() >= limit {
                break;
            }
            if !seen.insert(event_id.clone()) {
                continue;
            }
            let (Some(pdu), Some(meta)) = (self.pdu(&event_id)?, self.meta(&event_id)?) else {
                continue;
            };
            if pdu.room_id != room_id || pdu.depth < min_depth {
                continue;
            }
            queue.extend(pdu.prev_events.iter().cloned());
            if self.server_may_see(server, &pdu, &meta)? {
                found.push((pdu.depth, self.served_json(&pdu, Some(&meta))?));
            }
        }
        found.sort_by_key(|(depth, _)| *depth);
        Ok(found.into_iter().map(|(_, json)| json).collect())
    }

    /// `GET /_matrix/federation/v1/make_join/{roomId}/{userId}`: a join template for a user of
    /// `server`, when the room's version is one it supports (none listed means version 1) and
    /// the join would be allowed now.
    pub fn make_join(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        user_id: &UserId,
        supported_versions: &[RoomVersionId],
    ) -> Result<MembershipTemplate, PeerError> {
        self.make_membership(server, room_id, user_id, supported_versions, "join")
    }

    /// `GET /_matrix/federation/v1/make_leave/{roomId}/{userId}`.
    pub fn make_leave(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<MembershipTemplate, PeerError> {
        let version = self.room_version(room_id).map_err(|_| PeerError::NotFound)?;
        self.make_membership(server, room_id, user_id, &[version], "leave")
    }

    fn make_membership(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        user_id: &UserId,
        supported_versions: &[RoomVersionId],
        membership: &str,
    ) -> Result<MembershipTemplate, PeerError> {
        let room = self.room(room_id)?.ok_or(PeerError::NotFound)?;
        if user_id.server_name() != server {
            return Err(PeerError::Forbidden("The user is not of the requesting server".into()));
        }
        if !self.server_allowed(room_id, server)? {
            return Err(PeerError::Forbidden("Denied by the room's server ACL".into()));
        }
        let supported = if supported_versions.is_empty() {
            std::slice::from_ref(&RoomVersionId::V1)
        } else {
            supported_versions
        };
        if !supported.contains(&room.room_version) {
            return Err(PeerError::IncompatibleRoomVersion(room.room_version));
        }
        let event =
            NewEvent::state("m.room.member", user_id.as_str(), json!({"membership": membership}));
        let template = self.event_template(&room, Some(room_id), user_id, &event, server)?;
        // The template would be refused later if the user may not do this now: say so now.
        let placeholder = OwnedEventId::try_from("$template")
            .map_err(|error| PeerError::BadEvent(format!("placeholder event id: {error}")))?;
        let draft = Pdu::from_json(placeholder, template.clone()).map_err(RoomError::from)?;
        let rules = federation::signing::rules_for(&room.room_version).map_err(RoomError::from)?;
        ruma::state_res::check_state_dependent_auth_rules(
            &rules.authorization,
            &draft,
            |kind, key| self.current_state_pdu(room_id, &kind.to_string(), key).ok().flatten(),
        )
        .map_err(PeerError::Forbidden)?;
        Ok(MembershipTemplate { room_version: room.room_version, event: template })
    }

    /// `PUT /_matrix/federation/v2/send_join/{roomId}/{eventId}`: accepts the remote-signed
    /// join and answers the state before it, with the auth chain, for the joining server.
    pub async fn send_join(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
        json: CanonicalJsonObject,
        remote: &Remote,
    ) -> Result<JoinedRoom, PeerError> {
        let pdu = self.accept_membership(server, room_id, event_id, json, remote, "join").await?;
        self.forward_to_room(&pdu, server)?;
        let meta = self.meta(&pdu.event_id)?.ok_or(PeerError::NotFound)?;
        let state: Vec<OwnedEventId> = self.state_at(meta.state_before)?.into_values().collect();
        let chain =
            self.auth_chain_of(state.iter().cloned().chain(std::iter::once(pdu.event_id.clone())))?;
        Ok(JoinedRoom {
            origin: self.server_name().to_string(),
            state: self.pdus_json(&state)?,
            auth_chain: self.pdus_json(&chain)?,
            event: pdu.into_json().map_err(RoomError::from)?,
            members_omitted: false,
        })
    }

    /// `PUT /_matrix/federation/v2/send_leave/{roomId}/{eventId}`.
    pub async fn send_leave(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
        json: CanonicalJsonObject,
        remote: &Remote,
    ) -> Result<(), PeerError> {
        let pdu = self.accept_membership(server, room_id, event_id, json, remote, "leave").await?;
        self.forward_to_room(&pdu, server)?;
        Ok(())
    }

    /// `GET /_matrix/federation/v1/make_knock/{roomId}/{userId}`: a knock template, when the
    /// room's version supports knocking (7 and later), is one the server supports, and the
    /// room's join rule lets the user knock now.
    ///
    /// [Knocking](https://spec.matrix.org/v1.16/server-server-api/#knocking-upon-a-room)
    pub fn make_knock(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        user_id: &UserId,
        supported_versions: &[RoomVersionId],
    ) -> Result<MembershipTemplate, PeerError> {
        let room = self.room(room_id)?.ok_or(PeerError::NotFound)?;
        self.check_knockable(room_id, &room.room_version)?;
        if !supported_versions.contains(&room.room_version) {
            return Err(PeerError::IncompatibleRoomVersion(room.room_version));
        }
        self.make_membership(server, room_id, user_id, supported_versions, "knock")
    }

    /// `PUT /_matrix/federation/v1/send_knock/{roomId}/{eventId}`: accepts the remote-signed
    /// knock, which becomes a state event of the room like any other member event, and answers
    /// the state that helps the knocking user identify the room.
    pub async fn send_knock(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
        json: CanonicalJsonObject,
        remote: &Remote,
    ) -> Result<Vec<CanonicalJsonObject>, PeerError> {
        let version = self.room_version(room_id).map_err(|_| PeerError::NotFound)?;
        self.check_knockable(room_id, &version)?;
        self.accept_membership(server, room_id, event_id, json, remote, "knock").await?;
        self.knock_room_state(room_id)
    }

    /// Refuses rooms one cannot knock on: a version before knocking existed, or a join rule
    /// other than `knock` (or `knock_restricted`, where the version has it).
    fn check_knockable(
        &self,
        room_id: &RoomId,
        room_version: &RoomVersionId,
    ) -> Result<(), PeerError> {
        let rules = federation::signing::rules_for(room_version).map_err(RoomError::from)?;
        if !rules.authorization.knocking {
            return Err(PeerError::Forbidden(format!(
                "Room version {room_version} does not support knocking"
            )));
        }
        let join_rule = self
            .current_state_content(room_id, "m.room.join_rules", "")?
            .and_then(|content| content.get("join_rule")?.as_str().map(str::to_owned));
        match join_rule.as_deref() {
            Some("knock") => Ok(()),
            Some("knock_restricted") if rules.authorization.knock_restricted_join_rule => Ok(()),
            _ => Err(PeerError::Forbidden("The room does not accept knocks".into())),
        }
    }

    /// The room state a knocking server passes to its user as stripped state: the create
    /// event (which the spec requires) and the events that name and describe the room, as
    /// full PDUs of the room version.
    pub fn knock_room_state(
        &self,
        room_id: &RoomId,
    ) -> Result<Vec<CanonicalJsonObject>, PeerError> {
        let mut events = Vec::new();
        for kind in STRIPPED_STATE_TYPES {
            if let Some(event_id) = self.current_state_event_id(room_id, kind, "")? {
                events.push(event_id);
            }
        }
        self.pdus_json(&events)
    }

    /// Checks that a `send_join`/`send_leave` event is the membership it claims, of a user of
    /// `server`, then receives it like any PDU; it must become part of the room.
    async fn accept_membership(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
        json: CanonicalJsonObject,
        remote: &Remote,
        membership: &str,
    ) -> Result<Pdu, PeerError> {
        let version = self.room_version(room_id).map_err(|_| PeerError::NotFound)?;
        let claimed = federation::signing::event_id_of(&json, &version)
            .map_err(|error| PeerError::BadEvent(error.to_string()))?;
        if claimed != event_id {
            return Err(PeerError::BadEvent("The event id does not match the event".into()));
        }
        let pdu = Pdu::from_json(claimed, json.clone())
            .map_err(|error| PeerError::BadEvent(error.to_string()))?;
        if pdu.room_id != room_id
            || pdu.kind != TimelineEventType::RoomMember
            || pdu.state_key.as_deref() != Some(pdu.sender.as_str())
            || pdu.membership().as_deref() != Some(membership)
        {
            return Err(PeerError::WrongMembership(format!("Not a {membership} of its sender")));
        }
        if pdu.sender.server_name() != server {
            return Err(PeerError::Forbidden("The sender is not of the requesting server".into()));
        }
        match self.receive_pdu(server, json, remote).await? {
            Accepted::Persisted | Accepted::AlreadyKnown => {}
            Accepted::SoftFailed => {
                return Err(PeerError::Forbidden(format!(
                    "The {membership} is not allowed by the room's current state"
                )));
            }
        }
        self.pdu(event_id)?.ok_or(PeerError::NotFound)
    }

    /// `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}`: checks an invite of one of our
    /// users made on `server`, countersigns it, and records it so that it shows in the user's
    /// `/sync`. Returns the countersigned event.
    #[allow(clippy::too_many_arguments)] // The request's parts, as the endpoint has them.
    pub async fn receive_invite(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
        room_version: &RoomVersionId,
        mut json: CanonicalJsonObject,
        invite_room_state: Vec<Value>,
        remote: &Remote,
    ) -> Result<CanonicalJsonObject, PeerError> {
        let Ok(rules) = federation::signing::rules_for(room_version) else {
            return Err(PeerError::IncompatibleRoomVersion(room_version.clone()));
        };
        let claimed = self.check_signed_pdu(&mut json, room_version, &rules, remote).await?;
        if claimed != event_id {
            return Err(PeerError::BadEvent("The event id does not match the event".into()));
        }
        let pdu = Pdu::from_json(claimed, json.clone())
            .map_err(|error| PeerError::BadEvent(error.to_string()))?;
        let invitee = pdu.state_key.as_deref().and_then(|key| UserId::parse(key).ok());
        let Some(invitee) = invitee else {
            return Err(PeerError::BadEvent("An invite names its invitee in state_key".into()));
        };
        if pdu.room_id != room_id
            || pdu.kind != TimelineEventType::RoomMember
            || pdu.membership().as_deref() != Some("invite")
        {
            return Err(PeerError::BadEvent("Not an invite".into()));
        }
        if invitee.server_name() != self.server_name() {
            return Err(PeerError::BadEvent("The invitee is not a user of this server".into()));
        }
        if pdu.sender.server_name() != server {
            return Err(PeerError::Forbidden("The sender is not of the requesting server".into()));
        }
        self.inner.signing_key.sign_pdu(&mut json, room_version).map_err(RoomError::from)?;
        // A room we are in gets the invite as a PDU too; only invites to rooms elsewhere are
        // recorded here, with the stripped state the inviting server sent.
        if self.room(room_id)?.is_none() {
            let signed = Pdu::from_json(pdu.event_id.clone(), json.clone())
                .map_err(|error| PeerError::BadEvent(error.to_string()))?;
            let invite_state: Vec<Value> = invite_room_state
                .into_iter()
                .filter(|event| event.is_object())
                .take(INVITE_STATE_MAX)
                .collect();
            let key = storage::keys::join(&[invitee.as_bytes(), room_id.as_bytes()]);
            let current = self.db().get::<MembershipRecord>(USER_ROOMS, &key)?;
            if current.as_ref().is_some_and(|record| record.membership == "ban") {
                return Err(PeerError::Forbidden("The user is banned from the room".into()));
            }
            let (position, ()) = self.db().write_at_next_position(|position, batch| {
                if !self.db().contains(PDUS, signed.event_id.as_bytes())? {
                    let short = self.db().next_short(batch)?;
                    self.write_pdu_rows(batch, &signed, short)?;
                }
                let record = MembershipRecord {
                    membership: "invite".to_owned(),
                    event_id: signed.event_id.clone(),
                    position,
                    forgotten: false,
                    invite_state: Some(invite_state),
                };
                batch.put(USER_ROOMS, &key, &record)
            })?;
            self.inner.notifier.notify(position);
        }
        Ok(json)
    }

    /// The auth chain of some events (not the events themselves), oldest first by depth.
    fn auth_chain_of(
        &self,
        events: impl IntoIterator<Item = OwnedEventId>,
    ) -> Result<Vec<OwnedEventId>, PeerError> {
        let chain = auth_chain(events, &|event_id: &EventId| self.pdu(event_id).ok().flatten())
            .map_err(|error| PeerError::Room(RoomError::BadEvent(error)))?;
        let mut chain: Vec<(u64, OwnedEventId)> = chain
            .into_iter()
            .filter_map(|event_id| Some((self.pdu(&event_id).ok()??.depth, event_id)))
            .collect();
        chain.sort();
        Ok(chain.into_iter().map(|(_, event_id)| event_id).collect())
    }

    fn pdus_json(&self, ids: &[OwnedEventId]) -> Result<Vec<CanonicalJsonObject>, PeerError> {
        let mut pdus = Vec::with_capacity(ids.len());
        for event_id in ids {
            if let Some(pdu) = self.pdu(event_id)? {
                let meta = self.meta(event_id)?;
                pdus.push(self.served_json(&pdu, meta.as_ref())?);
            }
        }
        Ok(pdus)
    }
}

/// A PDU as a JSON value for a response body.
pub fn to_value(pdu: &CanonicalJsonObject) -> Value {
    serde_json::to_value(pdu).unwrap_or(Value::Null)
}

/// Parses a JSON value from a request into a canonical JSON object.
pub fn to_canonical(value: Value) -> Option<CanonicalJsonObject> {
    match ruma::canonical_json::to_canonical_value(value) {
        Ok(CanonicalJsonValue::Object(object)) => Some(object),
        _ => None,
    }
}
