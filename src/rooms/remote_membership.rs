//! Membership changes that need another server: a local user joins a room this server is not
//! in (`make_join`, sign, `send_join`, then the room's state and auth chain are checked and
//! stored), invites a user of another server (`invite`, countersigned by the invitee's server),
//! or rejects an invite to a room this server is not in (`make_leave` + `send_leave`).
//!
//! [Joining rooms](https://spec.matrix.org/v1.16/server-server-api/#joining-rooms),
//! [inviting to a room](https://spec.matrix.org/v1.16/server-server-api/#inviting-to-a-room),
//! [rejecting invites](https://spec.matrix.org/v1.16/server-server-api/#leaving-rooms-rejecting-invites)

use std::collections::{BTreeMap, HashMap, HashSet};

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, MilliSecondsSinceUnixEpoch, OwnedEventId,
    OwnedServerName, RoomId, RoomVersionId, UserId,
};
use serde_json::{Value, json};
use tracing::instrument;

use super::{
    Appended, MembershipRecord, NewEvent, Pdu, RoomError, RoomRecord, Rooms, USER_ROOMS,
    ingest::{MembershipRemoteError, Plan, Remote},
    peers,
};

/// How many servers a join tries before giving up.
pub const JOIN_SERVERS_TRIED_MAX: usize = 5;
/// The most events (state and auth chain together) taken from one `send_join` answer.
pub const SEND_JOIN_EVENTS_MAX: usize = 200_000;

/// The room versions this server can take part in, for `make_join`'s `ver`.
pub fn supported_room_versions() -> Vec<RoomVersionId> {
    use RoomVersionId::*;
    [V2, V3, V4, V5, V6, V7, V8, V9, V10, V11, V12]
        .into_iter()
        .filter(|version| federation::signing::rules_for(version).is_ok())
        .collect()
}

fn remote_error(error: MembershipRemoteError) -> RoomError {
    match error {
        MembershipRemoteError::Refused(reason) => RoomError::Forbidden(reason),
        MembershipRemoteError::Failed(reason) => RoomError::Remote(reason),
    }
}

impl Rooms {
    /// Whether joining `room_id` needs another server: the room is unknown here, or no local
    /// user is in it, so our copy may be stale and only a resident server can build the join.
    pub fn join_needs_remote(&self, room_id: &RoomId) -> Result<bool, RoomError> {
        let Some(_room) = self.room(room_id)? else { return Ok(true) };
        if self.has_local_member(room_id)? {
            return Ok(false);
        }
        Ok(!self.servers_in_room(room_id)?.is_empty())
    }

    /// Servers that may help `user_id` join or leave `room_id`: those given by the client,
    /// then the inviter's server, then the servers we last saw in the room, then the server
    /// named in the room id (before room version 12).
    pub fn candidate_servers(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        given: &[OwnedServerName],
    ) -> Result<Vec<OwnedServerName>, RoomError> {
        let mut servers: Vec<OwnedServerName> = given.to_vec();
        if let Some(record) = self.membership(room_id, user_id)?
            && matches!(record.membership.as_str(), "invite" | "knock")
        {
            if record.membership == "invite"
                && let Some(invite) = self.pdu(&record.event_id)?
            {
                servers.push(invite.sender.server_name().to_owned());
            }
            // The servers whose users sent the stripped state are in the room.
            let stripped = record.invite_state.as_deref().unwrap_or_default();
            servers.extend(
                stripped
                    .iter()
                    .filter_map(|event| event.get("sender").and_then(Value::as_str))
                    .filter_map(|sender| UserId::parse(sender).ok())
                    .map(|sender| sender.server_name().to_owned()),
            );
        }
        servers.extend(self.servers_in_room(room_id)?);
        if let Some(server) = room_id.server_name() {
            servers.push(server.to_owned());
        }
        let mut seen = HashSet::new();
        servers.retain(|server| server != self.server_name() && seen.insert(server.clone()));
        Ok(servers)
    }

    /// Joins `user_id` to a room through one of `servers`: the first that hands out a join
    /// template and accepts the signed join. Returns the join's event id.
    #[instrument(skip_all, fields(room_id = %room_id, user_id = %user_id))]
    pub async fn join_remote(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        servers: &[OwnedServerName],
        content: Value,
        remote: &Remote,
    ) -> Result<OwnedEventId, RoomError> {
        let mut last_error = RoomError::Remote("No server to join the room through".into());
        for server in servers.iter().filter(|server| *server != self.server_name()) {
            match self.join_through(server, room_id, user_id, content.clone(), remote).await {
                Ok(event_id) => return Ok(event_id),
                Err(error) => {
                    tracing::info!(%server, %error, "join through this server failed");
                    let refused = matches!(error, RoomError::Forbidden(_));
                    last_error = error;
                    if refused {
                        break;
                    }
                }
            }
        }
        Err(last_error)
    }

    async fn join_through(
        &self,
        server: &ruma::ServerName,
        room_id: &RoomId,
        user_id: &UserId,
        content: Value,
        remote: &Remote,
    ) -> Result<OwnedEventId, RoomError> {
        let supported = supported_room_versions();
        let (version, template) = remote
            .membership
            .make_membership(server, room_id, user_id, "join", &supported)
            .await
            .map_err(remote_error)?;
        if !supported.contains(&version) {
            return Err(RoomError::UnsupportedRoomVersion(version.to_string()));
        }
        let (event_id, join) =
            self.sign_membership_template(template, &version, room_id, user_id, "join", content)?;
        let answer = remote
            .membership
            .send_membership(server, room_id, &event_id, "join", join.clone())
            .await
            .map_err(remote_error)?;
        // For restricted rooms the resident server adds its signature: take its copy when it
        // is the same event.
        let join = match answer.get("event").cloned().and_then(peers::to_canonical) {
            Some(signed)
                if federation::signing::event_id_of(&signed, &version).ok().as_ref()
                    == Some(&event_id) =>
            {
                signed
            }
            _ => join,
        };
        let events = |field: &str| -> Vec<CanonicalJsonObject> {
            answer
                .get(field)
                .and_then(Value::as_array)
                .map(|list| {
                    list.iter()
                        .take(SEND_JOIN_EVENTS_MAX)
                        .filter_map(|event| peers::to_canonical(event.clone()))
                        .collect()
                })
                .unwrap_or_default()
        };
        let state = events("state");
        let auth_chain = events("auth_chain");
        if state.len() + auth_chain.len() > SEND_JOIN_EVENTS_MAX {
            return Err(RoomError::Remote("The room's state is too large".into()));
        }
        self.import_joined_room(room_id, &version, event_id, join, state, auth_chain, remote).await
    }

    /// Fills in and signs a `make_join`/`make_leave` template for `user_id`.
    fn sign_membership_template(
        &self,
        mut template: CanonicalJsonObject,
        version: &RoomVersionId,
        room_id: &RoomId,
        user_id: &UserId,
        membership: &str,
        mut content: Value,
    ) -> Result<(OwnedEventId, CanonicalJsonObject), RoomError> {
        let text = |key: &str| match template.get(key) {
            Some(CanonicalJsonValue::String(value)) => Some(value.clone()),
            _ => None,
        };
        if text("room_id").as_deref() != Some(room_id.as_str())
            || text("sender").as_deref() != Some(user_id.as_str())
            || text("state_key").as_deref() != Some(user_id.as_str())
            || text("type").as_deref() != Some("m.room.member")
        {
            return Err(RoomError::Remote("The server sent a template for another event".into()));
        }
        // A restricted join names the resident user that authorises it: keep that.
        if let Some(CanonicalJsonValue::Object(offered)) = template.get("content")
            && let Some(CanonicalJsonValue::String(via)) =
                offered.get("join_authorised_via_users_server")
        {
            content["join_authorised_via_users_server"] = json!(via);
        }
        content["membership"] = json!(membership);
        let content = match ruma::canonical_json::to_canonical_value(content) {
            Ok(value @ CanonicalJsonValue::Object(_)) => value,
            _ => return Err(RoomError::BadEvent("member content is not canonical JSON".into())),
        };
        template.insert("content".into(), content);
        let now = ruma::canonical_json::to_canonical_value(MilliSecondsSinceUnixEpoch::now())
            .map_err(|error| RoomError::BadEvent(error.to_string()))?;
        template.insert("origin_server_ts".into(), now);
        if template.contains_key("origin") {
            template.insert(
                "origin".into(),
                CanonicalJsonValue::String(self.server_name().to_string()),
            );
        }
        for key in ["signatures", "hashes", "unsigned", "event_id"] {
            template.remove(key);
        }
        let event_id = self.inner.signing_key.hash_and_sign_pdu(&mut template, version)?;
        Ok((event_id, template))
    }

    /// Checks the state and auth chain a resident server sent with our join (format,
    /// signatures, hashes, each event against its auth events), stores them, and persists the
    /// join on top of that state, as the room's one forward extremity.
    #[allow(clippy::too_many_arguments)] // The parts of a send_join answer.
    async fn import_joined_room(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        join_id: OwnedEventId,
        join: CanonicalJsonObject,
        state: Vec<CanonicalJsonObject>,
        auth_chain: Vec<CanonicalJsonObject>,
        remote: &Remote,
    ) -> Result<OwnedEventId, RoomError> {
        let rules = federation::signing::rules_for(version)?;
        let mut checked: HashMap<OwnedEventId, Pdu> = HashMap::new();
        let mut state_ids: Vec<OwnedEventId> = Vec::new();
        for mut json in auth_chain.into_iter().chain(state.iter().cloned()) {
            let Ok(received) = super::ingest::prepare(&json, &rules) else { continue };
            if checked.contains_key(received.event_id()) {
                continue;
            }
            let event_id = received.event_id().clone();
            if let Err(error) =
                self.check_prepared(&mut json, &received, version, &rules, remote).await
            {
                tracing::info!(%event_id, %error, "event of the joined room dropped");
                continue;
            }
            match Pdu::from_json(event_id.clone(), json) {
                Ok(pdu) if pdu.room_id == room_id => {
                    checked.insert(event_id, pdu);
                }
                _ => tracing::info!(%event_id, "event of another room or malformed: dropped"),
            }
        }
        for json in &state {
            if let Ok(event_id) = federation::signing::event_id_of(json, version)
                && checked.contains_key(&event_id)
            {
                state_ids.push(event_id);
            }
        }
        // Store oldest first, each once its auth events are stored and allow it.
        let mut pending: Vec<Pdu> = checked.into_values().collect();
        pending.sort_by_key(|pdu| std::cmp::Reverse(pdu.depth));
        let mut rejected: HashSet<OwnedEventId> = HashSet::new();
        loop {
            let before = pending.len();
            let mut waiting = Vec::new();
            while let Some(pdu) = pending.pop() {
                if self.pdu(&pdu.event_id)?.is_some() {
                    continue;
                }
                if pdu.auth_events.iter().any(|id| rejected.contains(id)) {
                    rejected.insert(pdu.event_id.clone());
                    continue;
                }
                if !pdu.auth_events.iter().all(|id| self.pdu(id).ok().flatten().is_some()) {
                    waiting.push(pdu);
                    continue;
                }
                match self.check_auth_events(&pdu, &rules) {
                    Ok(_) => self.store_outlier(&pdu)?,
                    Err(reason) => {
                        tracing::info!(event_id = %pdu.event_id, reason, "event fails its auth events");
                        rejected.insert(pdu.event_id.clone());
                    }
                }
            }
            if waiting.is_empty() || waiting.len() == before {
                for pdu in &waiting {
                    tracing::info!(event_id = %pdu.event_id, "auth events missing: dropped");
                }
                break;
            }
            waiting.reverse();
            pending = waiting;
        }
        let mut state_map: BTreeMap<(String, String), OwnedEventId> = BTreeMap::new();
        for event_id in state_ids {
            if let Some(pdu) = self.pdu(&event_id)?
                && let Some(state_key) = &pdu.state_key
            {
                state_map.insert((pdu.kind.to_string(), state_key.clone()), event_id);
            }
        }
        if !state_map.contains_key(&("m.room.create".to_owned(), String::new())) {
            return Err(RoomError::Remote("The room's state has no valid create event".into()));
        }

        let join = Pdu::from_json(join_id.clone(), join)?;
        let fetch = |kind: &ruma::events::StateEventType, key: &str| {
            state_map
                .get(&(kind.to_string(), key.to_owned()))
                .and_then(|event_id| self.pdu(event_id).ok().flatten())
        };
        ruma::state_res::check_state_independent_auth_rules(&rules.authorization, &join, |id| {
            self.pdu(id).ok().flatten()
        })
        .map_err(RoomError::Forbidden)?;
        ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, &join, fetch)
            .map_err(RoomError::Forbidden)?;

        let lock = self.room_lock(room_id);
        let _guard = lock.lock().await;
        if self.meta(&join_id)?.is_some() {
            return Ok(join_id);
        }
        let mut room = self.room(room_id)?.unwrap_or(RoomRecord {
            room_version: version.clone(),
            forward_extremities: Vec::new(),
            depth: 0,
            current_snapshot: None,
            last_position: 0,
        });
        let current = self.state_at(room.current_snapshot)?;
        let mut state_after = state_map.clone();
        state_after.insert(("m.room.member".to_owned(), join.sender.to_string()), join_id.clone());
        let plan = Plan {
            state_before: state_map,
            before_snapshot: None,
            state_after: state_after.clone(),
            current,
            new_current: Some(state_after),
            extremities: vec![join_id.clone()],
            redaction_applies: false,
        };
        let shown: Vec<OwnedEventId> = plan.state_before.values().cloned().collect();
        let (position, ()) = self.db().write_at_next_position(|position, batch| {
            self.persist_remote(batch, &mut room, &join, position, plan)?;
            // The room's state events become visible to clients as of the join.
            self.write_shown_outliers(batch, room_id, &shown, position)
        })?;
        tracing::info!(event_id = %join_id, position, "joined a room over federation");
        self.room_membership_changed(room_id);
        self.inner.notifier.notify(position);
        Ok(join_id)
    }

    /// Invites a user of another server: the invite is built and authorized here, sent to
    /// the invitee's server to countersign, and persisted as it comes back.
    #[instrument(skip_all, fields(room_id = %room_id, target = %target))]
    pub async fn invite_remote(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        content: Value,
        remote: &Remote,
    ) -> Result<Appended, RoomError> {
        let lock = self.room_lock(room_id);
        let _guard = lock.lock().await;
        let mut room = self.room(room_id)?.ok_or(RoomError::NotFound)?;
        let event = NewEvent::state("m.room.member", target.as_str(), content);
        let pdu = self.build_event(&room, Some(room_id), sender, event)?;
        let invite_state = self.invite_room_state(room_id, sender)?;
        let signed = remote
            .membership
            .invite(
                target.server_name(),
                room_id,
                &pdu.event_id,
                &room.room_version,
                pdu.json()?.clone(),
                invite_state,
            )
            .await
            .map_err(remote_error)?;
        // Only the signatures may differ: the event the invitee's server signed must be ours.
        let mut json = pdu.json()?.clone();
        let returned_id = federation::signing::event_id_of(&signed, &room.room_version)
            .map_err(|error| RoomError::Remote(error.to_string()))?;
        if returned_id != pdu.event_id {
            return Err(RoomError::Remote("The invitee's server changed the invite".into()));
        }
        if let Some(signatures) = signed.get("signatures") {
            json.insert("signatures".into(), signatures.clone());
        }
        let pdu = Pdu::from_json(pdu.event_id.clone(), json)?;
        self.commit_event(&mut room, pdu, sender, None)
    }

    /// The stripped state an invitee's server is given: what a client needs to show the
    /// invite ([stripped state](https://spec.matrix.org/v1.16/client-server-api/#stripped-state)).
    pub fn invite_room_state(
        &self,
        room_id: &RoomId,
        sender: &UserId,
    ) -> Result<Vec<Value>, RoomError> {
        let mut events = Vec::new();
        for kind in peers::STRIPPED_STATE_TYPES {
            if let Some(pdu) = self.current_state_pdu(room_id, kind, "")? {
                events.push(pdu.to_stripped());
            }
        }
        if let Some(pdu) = self.current_state_pdu(room_id, "m.room.member", sender.as_str())? {
            events.push(pdu.to_stripped());
        }
        Ok(events)
    }

    /// Rejects an invite to (or leaves) a room this server is not in, through the servers
    /// that are: `make_leave`, sign, `send_leave`; then the user's membership is `leave`.
    #[instrument(skip_all, fields(room_id = %room_id, user_id = %user_id))]
    pub async fn leave_remote(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        servers: &[OwnedServerName],
        reason: Option<String>,
        remote: &Remote,
    ) -> Result<(), RoomError> {
        let mut last_error = RoomError::Remote("No server to leave the room through".into());
        for server in servers.iter().filter(|server| *server != self.server_name()) {
            let attempt = async {
                let (version, template) = remote
                    .membership
                    .make_membership(server, room_id, user_id, "leave", &[])
                    .await
                    .map_err(remote_error)?;
                let mut content = json!({});
                if let Some(reason) = &reason {
                    content["reason"] = json!(reason);
                }
                let (event_id, leave) = self.sign_membership_template(
                    template, &version, room_id, user_id, "leave", content,
                )?;
                remote
                    .membership
                    .send_membership(server, room_id, &event_id, "leave", leave.clone())
                    .await
                    .map_err(remote_error)?;
                Ok::<_, RoomError>(Pdu::from_json(event_id, leave)?)
            };
            match attempt.await {
                Ok(leave) => return self.record_remote_membership(room_id, user_id, &leave, None),
                Err(error) => {
                    tracing::info!(%server, %error, "leave through this server failed");
                    last_error = error;
                }
            }
        }
        Err(last_error)
    }

    /// Knocks on a room this server is not in, through one of `servers`: `make_knock`, sign,
    /// `send_knock`. The knock shows in the user's `/sync` with the stripped state the room's
    /// server answered with
    /// ([knocking](https://spec.matrix.org/v1.16/server-server-api/#knocking-upon-a-room)).
    #[instrument(skip_all, fields(room_id = %room_id, user_id = %user_id))]
    pub async fn knock_remote(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        servers: &[OwnedServerName],
        content: Value,
        remote: &Remote,
    ) -> Result<OwnedEventId, RoomError> {
        let mut last_error = RoomError::Remote("No server to knock through".into());
        let versions = supported_room_versions();
        for server in servers.iter().filter(|server| *server != self.server_name()) {
            let attempt = async {
                let (version, template) = remote
                    .membership
                    .make_membership(server, room_id, user_id, "knock", &versions)
                    .await
                    .map_err(remote_error)?;
                let (event_id, knock) = self.sign_membership_template(
                    template,
                    &version,
                    room_id,
                    user_id,
                    "knock",
                    content.clone(),
                )?;
                let answer = remote
                    .membership
                    .send_membership(server, room_id, &event_id, "knock", knock.clone())
                    .await
                    .map_err(remote_error)?;
                let stripped: Vec<Value> = answer
                    .get("knock_room_state")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|event| event.is_object())
                    .take(peers::INVITE_STATE_MAX)
                    .cloned()
                    .collect();
                Ok::<_, RoomError>((Pdu::from_json(event_id, knock)?, stripped))
            };
            match attempt.await {
                Ok((knock, stripped)) => {
                    self.record_remote_membership(room_id, user_id, &knock, Some(stripped))?;
                    return Ok(knock.event_id);
                }
                Err(error) => {
                    tracing::info!(%server, %error, "knock through this server failed");
                    let refused = matches!(error, RoomError::Forbidden(_));
                    last_error = error;
                    if refused {
                        break;
                    }
                }
            }
        }
        Err(last_error)
    }

    /// Records a user's membership in a room this server is not in (a rejected invite, a
    /// knock): the member event is kept as an outlier and the membership shows in the user's
    /// `/sync`, with the room's stripped state where there is one.
    fn record_remote_membership(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        event: &Pdu,
        stripped_state: Option<Vec<Value>>,
    ) -> Result<(), RoomError> {
        let Some(membership) = event.membership() else {
            return Err(RoomError::BadEvent("not a member event".into()));
        };
        let key = storage::keys::join(&[user_id.as_bytes(), room_id.as_bytes()]);
        let (position, ()) = self.db().write_at_next_position(|position, batch| {
            if !self.db().contains(super::PDUS, event.event_id.as_bytes())? {
                let short = self.db().next_short(batch)?;
                self.write_pdu_rows(batch, event, short)?;
            }
            let record = MembershipRecord {
                membership: membership.clone(),
                event_id: event.event_id.clone(),
                position,
                forgotten: false,
                invite_state: stripped_state.clone(),
            };
            batch.put(USER_ROOMS, &key, &record)
        })?;
        self.inner.notifier.notify(position);
        Ok(())
    }
}
