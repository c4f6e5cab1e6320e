//! The room-level half of federation, driven directly through the room core where the
//! transport (X-Matrix, key fetching) would stand: PDUs signed with a real ed25519 key of
//! `remote.test` are fed in, and what a local user sees is checked over HTTP.
//!
//! [Checks performed on receipt of a PDU](https://spec.matrix.org/v1.16/server-server-api/#checks-performed-on-receipt-of-a-pdu)

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use federation::ServerSigningKey;
use futures::future::BoxFuture;
use hearth::rooms::{
    Rooms,
    ingest::{
        Accepted, IngestError, MembershipRemoteError, Remote, RemoteError, RemoteEvents,
        RemoteMembership, ServerKeys,
    },
    peers::{PeerError, to_canonical},
};
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, MilliSecondsSinceUnixEpoch, OwnedEventId,
    OwnedRoomId, OwnedServerName, RoomId, ServerName, UserId, canonical_json::to_canonical_value,
    events::TimelineEventType, serde::Base64,
};
use serde_json::{Value, json};

use crate::harness::{TestServer, User, assert_ok, bodies, enc, state_path, timeline_has};

/// A remote server as far as the room core can tell: a signing key, the keys it publishes,
/// and the events it would serve.
pub(crate) struct RemoteServer {
    pub(crate) name: OwnedServerName,
    pub(crate) key: ServerSigningKey,
    _dir: tempfile::TempDir,
}

impl RemoteServer {
    pub(crate) fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().expect("test fixture");
        let name = OwnedServerName::try_from(name).expect("test fixture");
        let key = ServerSigningKey::load_or_generate(&dir.path().join("key"), name.clone())
            .expect("test fixture");
        Self { name, key, _dir: dir }
    }

    pub(crate) fn user(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.name)
    }
}

/// Published keys and served events of the fake remote servers.
#[derive(Default)]
pub(crate) struct FakeTransport {
    keys: Mutex<HashMap<OwnedServerName, BTreeMap<String, Base64>>>,
    events: Mutex<HashMap<OwnedEventId, CanonicalJsonObject>>,
}

impl FakeTransport {
    pub(crate) fn publish(&self, server: &RemoteServer) {
        let key = Base64::parse(server.key.public_key_base64()).expect("test fixture");
        self.keys
            .lock()
            .expect("test fixture")
            .insert(server.name.clone(), BTreeMap::from([(server.key.key_id(), key)]));
    }

    /// Makes an event available to `get_event` and `get_missing_events`.
    pub(crate) fn serve(&self, event_id: &EventId, json: &CanonicalJsonObject) {
        self.events.lock().expect("test fixture").insert(event_id.to_owned(), json.clone());
    }

    pub(crate) fn remote(self: &Arc<Self>) -> Remote {
        Remote { keys: self.clone(), events: self.clone(), membership: self.clone() }
    }
}

/// These tests feed PDUs directly: no membership handshake reaches another server.
impl RemoteMembership for FakeTransport {
    fn make_membership<'a>(
        &'a self,
        server: &'a ServerName,
        _room_id: &'a RoomId,
        _user_id: &'a ruma::UserId,
        _membership: &'a str,
        _supported_versions: &'a [ruma::RoomVersionId],
    ) -> BoxFuture<'a, Result<(ruma::RoomVersionId, CanonicalJsonObject), MembershipRemoteError>>
    {
        Box::pin(
            async move { Err(MembershipRemoteError::Failed(format!("{server} is not reachable"))) },
        )
    }

    fn send_membership<'a>(
        &'a self,
        server: &'a ServerName,
        _room_id: &'a RoomId,
        _event_id: &'a EventId,
        _membership: &'a str,
        _event: CanonicalJsonObject,
    ) -> BoxFuture<'a, Result<Value, MembershipRemoteError>> {
        Box::pin(
            async move { Err(MembershipRemoteError::Failed(format!("{server} is not reachable"))) },
        )
    }

    fn invite<'a>(
        &'a self,
        server: &'a ServerName,
        _room_id: &'a RoomId,
        _event_id: &'a EventId,
        _room_version: &'a ruma::RoomVersionId,
        _event: CanonicalJsonObject,
        _invite_room_state: Vec<Value>,
    ) -> BoxFuture<'a, Result<CanonicalJsonObject, MembershipRemoteError>> {
        Box::pin(
            async move { Err(MembershipRemoteError::Failed(format!("{server} is not reachable"))) },
        )
    }
}

impl ServerKeys for FakeTransport {
    fn verify_keys<'a>(
        &'a self,
        server: &'a ServerName,
        _valid_at: MilliSecondsSinceUnixEpoch,
    ) -> BoxFuture<'a, Result<BTreeMap<String, Base64>, RemoteError>> {
        let keys = self.keys.lock().expect("test fixture").get(server).cloned();
        Box::pin(async move { keys.ok_or_else(|| RemoteError(format!("no keys for {server}"))) })
    }
}

impl RemoteEvents for FakeTransport {
    fn get_event<'a>(
        &'a self,
        _server: &'a ServerName,
        event_id: &'a EventId,
    ) -> BoxFuture<'a, Result<CanonicalJsonObject, RemoteError>> {
        let event = self.events.lock().expect("test fixture").get(event_id).cloned();
        Box::pin(async move { event.ok_or_else(|| RemoteError("not found".into())) })
    }

    fn get_missing_events<'a>(
        &'a self,
        _server: &'a ServerName,
        _room_id: &'a RoomId,
        earliest_events: &'a [OwnedEventId],
        latest_events: &'a [OwnedEventId],
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<CanonicalJsonObject>, RemoteError>> {
        let events = self.events.lock().expect("test fixture").clone();
        Box::pin(async move {
            let mut found = Vec::new();
            let mut queue: Vec<OwnedEventId> = Vec::new();
            for latest in latest_events {
                if let Some(CanonicalJsonValue::Array(prevs)) =
                    events.get(latest).and_then(|event| event.get("prev_events"))
                {
                    queue.extend(prevs.iter().filter_map(|prev| match prev {
                        CanonicalJsonValue::String(id) => OwnedEventId::try_from(id.as_str()).ok(),
                        _ => None,
                    }));
                }
            }
            while let Some(event_id) = queue.pop() {
                if found.len() == limit || earliest_events.contains(&event_id) {
                    continue;
                }
                let Some(event) = events.get(&event_id) else { continue };
                if let Some(CanonicalJsonValue::Array(prevs)) = event.get("prev_events") {
                    queue.extend(prevs.iter().filter_map(|prev| match prev {
                        CanonicalJsonValue::String(id) => OwnedEventId::try_from(id.as_str()).ok(),
                        _ => None,
                    }));
                }
                found.push(event.clone());
            }
            Ok(found)
        })
    }

    /// These tests fill gaps through `get_missing_events` only.
    fn backfill<'a>(
        &'a self,
        server: &'a ServerName,
        _room_id: &'a RoomId,
        _from: &'a [OwnedEventId],
        _limit: usize,
    ) -> BoxFuture<'a, Result<Vec<CanonicalJsonObject>, RemoteError>> {
        Box::pin(async move { Err(RemoteError(format!("{server} serves no backfill"))) })
    }

    fn state_ids<'a>(
        &'a self,
        server: &'a ServerName,
        _room_id: &'a RoomId,
        _event_id: &'a EventId,
    ) -> BoxFuture<'a, Result<Vec<OwnedEventId>, RemoteError>> {
        Box::pin(async move { Err(RemoteError(format!("{server} serves no state_ids"))) })
    }
}

/// An unsigned remote event following the room's forward extremities, with auth events
/// chosen from the current state the way a sending server would.
pub(crate) fn draft(
    rooms: &Rooms,
    room_id: &RoomId,
    sender: &str,
    kind: &str,
    state_key: Option<&str>,
    content: Value,
) -> Value {
    let room = rooms.room(room_id).expect("test fixture").expect("test fixture");
    let rules = room.room_version.rules().expect("test fixture");
    let sender_id = UserId::parse(sender).expect("test fixture");
    let auth_types = ruma::state_res::auth_types_for_event(
        &TimelineEventType::from(kind),
        &sender_id,
        state_key,
        &serde_json::value::to_raw_value(&content).expect("test fixture"),
        &rules.authorization,
    )
    .expect("test fixture");
    let mut auth_events: Vec<OwnedEventId> = Vec::new();
    for (auth_kind, auth_key) in auth_types {
        if let Some(event_id) = rooms
            .current_state_event_id(room_id, &auth_kind.to_string(), &auth_key)
            .expect("test fixture")
            && !auth_events.contains(&event_id)
        {
            auth_events.push(event_id);
        }
    }
    let mut event = json!({
        "room_id": room_id,
        "sender": sender,
        "type": kind,
        "content": content,
        "prev_events": room.forward_extremities,
        "auth_events": auth_events,
        "depth": room.depth + 1,
        "origin_server_ts": MilliSecondsSinceUnixEpoch::now(),
    });
    if let Some(state_key) = state_key {
        event["state_key"] = json!(state_key);
    }
    event
}

/// Hashes and signs a draft with the server's key.
pub(crate) fn sign(
    rooms: &Rooms,
    server: &RemoteServer,
    event: Value,
) -> (OwnedEventId, CanonicalJsonObject) {
    let room_id =
        RoomId::parse(event["room_id"].as_str().expect("test fixture")).expect("test fixture");
    let version = rooms.room_version(&room_id).expect("test fixture");
    let CanonicalJsonValue::Object(mut object) = to_canonical_value(event).expect("test fixture")
    else {
        panic!("not an object")
    };
    let event_id = server.key.hash_and_sign_pdu(&mut object, &version).expect("test fixture");
    (event_id, object)
}

struct Setup {
    server: TestServer,
    alice: User,
    room_id: OwnedRoomId,
    remote: RemoteServer,
    transport: Arc<FakeTransport>,
}

impl Setup {
    async fn new(preset: &str) -> Self {
        let server = TestServer::start().await;
        let alice = server.register("alice").await;
        let room_id = alice.create_room(json!({"preset": preset})).await;
        let room_id = OwnedRoomId::try_from(room_id).expect("test fixture");
        let remote = RemoteServer::new("remote.test");
        let transport = Arc::new(FakeTransport::default());
        transport.publish(&remote);
        Self { server, alice, room_id, remote, transport }
    }

    fn rooms(&self) -> &Rooms {
        &self.server.rooms
    }

    fn draft(&self, sender: &str, kind: &str, state_key: Option<&str>, content: Value) -> Value {
        draft(self.rooms(), &self.room_id, sender, kind, state_key, content)
    }

    fn sign(&self, event: Value) -> (OwnedEventId, CanonicalJsonObject) {
        sign(self.rooms(), &self.remote, event)
    }

    async fn send(&self, pdus: Vec<&CanonicalJsonObject>) -> BTreeMap<OwnedEventId, String> {
        let pdus = pdus.into_iter().map(|pdu| CanonicalJsonValue::Object(pdu.clone())).collect();
        let results = self
            .rooms()
            .receive_transaction(&self.remote.name, "txn1", pdus, 0, &self.transport.remote())
            .await
            .expect("test fixture");
        results
            .into_iter()
            .map(|(event_id, result)| {
                let text = match result {
                    Ok(Accepted::Persisted) => "persisted".to_owned(),
                    Ok(Accepted::SoftFailed) => "soft-failed".to_owned(),
                    Ok(Accepted::AlreadyKnown) => "known".to_owned(),
                    Err(error) => format!("error: {error}"),
                };
                (event_id, text)
            })
            .collect()
    }

    /// Bob of remote.test joins the (public) room; returns the join's id.
    async fn remote_join(&self, localpart: &str) -> OwnedEventId {
        let user = self.remote.user(localpart);
        let (join_id, join) = self.sign(self.draft(
            &user,
            "m.room.member",
            Some(&user),
            json!({"membership": "join"}),
        ));
        let results = self.send(vec![&join]).await;
        assert_eq!(results[&join_id], "persisted");
        join_id
    }
}

#[tokio::test]
async fn a_remote_join_and_messages_reach_local_users() {
    let setup = Setup::new("public_chat").await;
    let bob = setup.remote.user("bob");
    let (join_id, join) = setup.sign(setup.draft(
        &bob,
        "m.room.member",
        Some(&bob),
        json!({"membership": "join", "displayname": "Bob"}),
    ));
    let mut first = setup.draft(
        &bob,
        "m.room.message",
        None,
        json!({"msgtype": "m.text", "body": "hello from remote"}),
    );
    first["prev_events"] = json!([join_id]);
    first["depth"] = json!(first["depth"].as_u64().unwrap() + 1);
    first["auth_events"].as_array_mut().unwrap().push(json!(join_id));
    let (first_id, first) = setup.sign(first);
    let results = setup.send(vec![&join, &first]).await;
    assert_eq!(results[&join_id], "persisted", "{results:?}");
    assert_eq!(results[&first_id], "persisted", "{results:?}");

    let sync = setup.alice.sync(None, 0).await;
    let room = setup.room_id.as_str();
    assert!(timeline_has(&sync, room, join_id.as_str()), "{sync}");
    assert!(timeline_has(&sync, room, first_id.as_str()), "{sync}");
    let members = assert_ok(
        setup
            .alice
            .client
            .get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(room)))
            .await,
    );
    assert_eq!(members["joined"][&bob]["display_name"], "Bob", "{members}");
    let messages = setup.alice.messages(room, "dir=b&limit=5").await;
    assert_eq!(bodies(messages["chunk"].as_array().unwrap()), ["hello from remote"]);

    // A later local message follows the remote one; the DAG stays a line.
    let reply = setup.alice.send_text(room, "hi bob").await;
    let room_record = setup.rooms().room(&setup.room_id).unwrap().unwrap();
    assert_eq!(room_record.forward_extremities, [OwnedEventId::try_from(reply).unwrap()]);
    let pdu = setup.rooms().pdu(&room_record.forward_extremities[0]).unwrap().unwrap();
    assert_eq!(pdu.prev_events, vec![first_id.clone()]);

    // The same PDU again is answered as known, not stored twice.
    assert_eq!(setup.send(vec![&first]).await[&first_id], "known");
}

#[tokio::test]
async fn missing_prev_events_are_fetched_from_the_origin() {
    let setup = Setup::new("public_chat").await;
    let join_id = setup.remote_join("bob").await;
    let bob = setup.remote.user("bob");
    let mut ids = Vec::new();
    let mut previous = join_id.clone();
    let mut pdus = Vec::new();
    for (index, body) in ["one", "two", "three"].iter().enumerate() {
        let mut event =
            setup.draft(&bob, "m.room.message", None, json!({"msgtype": "m.text", "body": body}));
        event["prev_events"] = json!([previous]);
        event["depth"] = json!(event["depth"].as_u64().unwrap() + index as u64);
        let (event_id, pdu) = setup.sign(event);
        setup.transport.serve(&event_id, &pdu);
        previous = event_id.clone();
        ids.push(event_id);
        pdus.push(pdu);
    }
    // Only the last one is sent: the two before it come through get_missing_events.
    let results = setup.send(vec![&pdus[2]]).await;
    assert_eq!(results[&ids[2]], "persisted", "{results:?}");
    let messages = setup.alice.messages(setup.room_id.as_str(), "dir=b&limit=10").await;
    assert_eq!(bodies(messages["chunk"].as_array().unwrap()), ["three", "two", "one"]);

    // A gap the origin cannot fill is an error for that PDU, and nothing is stored.
    let mut orphan =
        setup.draft(&bob, "m.room.message", None, json!({"msgtype": "m.text", "body": "orphan"}));
    orphan["prev_events"] = json!(["$unknownunknownunknownunknownunknownunknow"]);
    let (orphan_id, orphan) = setup.sign(orphan);
    let results = setup.send(vec![&orphan]).await;
    assert!(results[&orphan_id].starts_with("error: missing prev events"), "{results:?}");
    assert!(setup.rooms().pdu(&orphan_id).unwrap().is_none());
}

#[tokio::test]
async fn forged_signatures_are_rejected() {
    let setup = Setup::new("public_chat").await;
    // Same server name, another key: not the key remote.test publishes.
    let forger = RemoteServer::new("remote.test");
    let bob = setup.remote.user("bob");
    let (join_id, join) = sign(
        setup.rooms(),
        &forger,
        setup.draft(&bob, "m.room.member", Some(&bob), json!({"membership": "join"})),
    );
    let results = setup.send(vec![&join]).await;
    assert!(results[&join_id].starts_with("error: bad signature"), "{results:?}");
    assert!(setup.rooms().pdu(&join_id).unwrap().is_none());
    assert!(!setup.rooms().is_joined(&setup.room_id, &UserId::parse(&bob).unwrap()).unwrap());

    // A server that does not publish keys at all cannot send either.
    let stranger = RemoteServer::new("stranger.test");
    let carol = stranger.user("carol");
    let (carol_join_id, carol_join) = sign(
        setup.rooms(),
        &stranger,
        setup.draft(&carol, "m.room.member", Some(&carol), json!({"membership": "join"})),
    );
    let results = setup.send(vec![&carol_join]).await;
    assert!(results[&carol_join_id].starts_with("error: bad signature"), "{results:?}");

    // A signed event whose signed parts were changed afterwards fails too.
    let (tampered_id, mut tampered) =
        setup.sign(setup.draft(&bob, "m.room.member", Some(&bob), json!({"membership": "join"})));
    tampered.insert("depth".into(), CanonicalJsonValue::Integer(99u32.into()));
    let results = setup.send(vec![&tampered]).await;
    assert!(!results.contains_key(&tampered_id) || results[&tampered_id].starts_with("error"));
    assert!(
        results.values().all(|result| result.starts_with("error: bad signature")),
        "{results:?}"
    );
}

#[tokio::test]
async fn a_wrong_content_hash_gets_the_event_redacted() {
    let setup = Setup::new("public_chat").await;
    setup.remote_join("bob").await;
    let bob = setup.remote.user("bob");
    let (event_id, mut pdu) = setup.sign(setup.draft(
        &bob,
        "m.room.message",
        None,
        json!({"msgtype": "m.text", "body": "original"}),
    ));
    // The content is not covered by the signature, only by the hash: swap it after signing.
    let CanonicalJsonValue::Object(content) =
        to_canonical_value(json!({"msgtype": "m.text", "body": "swapped"})).unwrap()
    else {
        unreachable!()
    };
    pdu.insert("content".into(), CanonicalJsonValue::Object(content));
    let results = setup.send(vec![&pdu]).await;
    assert_eq!(results[&event_id], "persisted", "{results:?}");
    let stored = setup.rooms().pdu(&event_id).unwrap().unwrap();
    assert_eq!(stored.content_value(), json!({}));
    let sync = setup.alice.sync(None, 0).await;
    let event = crate::harness::timeline(&sync, setup.room_id.as_str())
        .iter()
        .find(|event| event["event_id"] == event_id.as_str())
        .unwrap_or_else(|| panic!("not in sync: {sync}"))
        .clone();
    assert_eq!(event["content"], json!({}), "{event}");
}

#[tokio::test]
async fn events_failing_auth_are_rejected() {
    let setup = Setup::new("public_chat").await;
    let eve = setup.remote.user("eve");
    // Eve never joined: a message of hers fails against its own auth events.
    let (event_id, pdu) = setup.sign(setup.draft(
        &eve,
        "m.room.message",
        None,
        json!({"msgtype": "m.text", "body": "let me in"}),
    ));
    let results = setup.send(vec![&pdu]).await;
    assert!(
        results[&event_id].starts_with("error: not authorized by its auth events"),
        "{results:?}"
    );
    assert!(setup.rooms().pdu(&event_id).unwrap().is_none());

    // Bob joined but may not change the power levels (he has level 0).
    setup.remote_join("bob").await;
    let bob = setup.remote.user("bob");
    let levels = setup
        .rooms()
        .current_state_content(&setup.room_id, "m.room.power_levels", "")
        .unwrap()
        .unwrap();
    let mut raised = levels.clone();
    raised["users"][&bob] = json!(100);
    let (raise_id, raise) = setup.sign(setup.draft(&bob, "m.room.power_levels", Some(""), raised));
    let results = setup.send(vec![&raise]).await;
    assert!(results[&raise_id].starts_with("error: not authorized"), "{results:?}");
    assert_eq!(
        setup
            .rooms()
            .current_state_content(&setup.room_id, "m.room.power_levels", "")
            .unwrap()
            .unwrap(),
        levels
    );

    // An event of another room's server cannot claim auth events from elsewhere: an unknown
    // room is refused outright.
    let mut elsewhere = setup.draft(&bob, "m.room.message", None, json!({"body": "x"}));
    elsewhere["room_id"] = json!("!nowhere:remote.test");
    let CanonicalJsonValue::Object(elsewhere) = to_canonical_value(elsewhere).unwrap() else {
        unreachable!()
    };
    assert!(setup.send(vec![&elsewhere]).await.is_empty());
    let result =
        setup.rooms().receive_pdu(&setup.remote.name, elsewhere, &setup.transport.remote()).await;
    assert!(matches!(result, Err(IngestError::UnknownRoom)), "{result:?}");
}

#[tokio::test]
async fn events_of_a_user_banned_since_are_soft_failed() {
    let setup = Setup::new("public_chat").await;
    let join_id = setup.remote_join("bob").await;
    let bob = setup.remote.user("bob");
    // Bob's server has not seen the ban yet: its message follows Bob's join.
    let mut late = setup.draft(
        &bob,
        "m.room.message",
        None,
        json!({"msgtype": "m.text", "body": "after the ban"}),
    );
    late["prev_events"] = json!([join_id]);
    let (late_id, late) = setup.sign(late);
    let (status, _) =
        setup.alice.room_post(setup.room_id.as_str(), "ban", json!({"user_id": bob})).await;
    assert_eq!(status, 200);
    let before = setup.rooms().room(&setup.room_id).unwrap().unwrap();

    let results = setup.send(vec![&late]).await;
    assert_eq!(results[&late_id], "soft-failed", "{results:?}");
    // Stored (it is part of the DAG), but not visible, not an extremity, not current.
    assert!(setup.rooms().pdu(&late_id).unwrap().is_some());
    let after = setup.rooms().room(&setup.room_id).unwrap().unwrap();
    assert_eq!(after.forward_extremities, before.forward_extremities);
    assert_eq!(after.current_snapshot, before.current_snapshot);
    let sync = setup.alice.sync(None, 0).await;
    assert!(!timeline_has(&sync, setup.room_id.as_str(), late_id.as_str()), "{sync}");
    let messages = setup.alice.messages(setup.room_id.as_str(), "dir=b&limit=20").await;
    assert!(!bodies(messages["chunk"].as_array().unwrap()).contains(&"after the ban".to_owned()));
    let single = setup
        .alice
        .client
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/event/{}",
            enc(setup.room_id.as_str()),
            enc(late_id.as_str())
        ))
        .await;
    crate::harness::assert_error(&single, 404, "M_NOT_FOUND");
    let membership = assert_ok(
        setup.alice.client.get(&state_path(setup.room_id.as_str(), "m.room.member", &bob)).await,
    );
    assert_eq!(membership["membership"], "ban");
}

/// An event that follows the room's latest event but cites an auth event the current state has
/// since replaced passes its own auth events and must still fail against the state before it:
/// the receive path may skip that second check only when the state answers alike.
#[tokio::test]
async fn an_event_citing_a_replaced_membership_fails_against_the_state_before_it() {
    let setup = Setup::new("public_chat").await;
    setup.remote_join("bob").await;
    let bob = setup.remote.user("bob");
    let mut stale = setup.draft(&bob, "m.room.message", None, json!({"body": "still here?"}));
    let (status, _) =
        setup.alice.room_post(setup.room_id.as_str(), "ban", json!({"user_id": bob})).await;
    assert_eq!(status, 200);
    let room = setup.rooms().room(&setup.room_id).unwrap().unwrap();
    // It follows the ban in the DAG, but its auth events still name Bob's join.
    stale["prev_events"] = json!(room.forward_extremities);
    stale["depth"] = json!(room.depth + 1);
    let (stale_id, stale) = setup.sign(stale);
    let results = setup.send(vec![&stale]).await;
    assert!(
        results[&stale_id].starts_with("error: not authorized by the state before it"),
        "{results:?}"
    );
    assert!(setup.rooms().pdu(&stale_id).unwrap().is_none());
    let after = setup.rooms().room(&setup.room_id).unwrap().unwrap();
    assert_eq!(after.forward_extremities, room.forward_extremities);

    // A message whose auth events are the current state still comes in the same way.
    let carol = setup.remote.user("carol");
    setup.remote_join("carol").await;
    let (ok_id, ok) =
        setup.sign(setup.draft(&carol, "m.room.message", None, json!({"body": "hello"})));
    assert_eq!(setup.send(vec![&ok]).await[&ok_id], "persisted");
}

/// Two concurrent topic changes, one local and one from remote.test, on two forks of the DAG:
/// state resolution v2 orders them by power level mainline, then timestamp, then id.
async fn concurrent_topics(remote_ts_offset_ms: i64) -> (Setup, OwnedEventId, OwnedEventId) {
    let setup = Setup::new("public_chat").await;
    setup.remote_join("bob").await;
    let bob = setup.remote.user("bob");
    let room = setup.room_id.as_str();
    let mut levels = setup
        .rooms()
        .current_state_content(&setup.room_id, "m.room.power_levels", "")
        .expect("test fixture")
        .expect("test fixture");
    levels["users"][&bob] = json!(50);
    assert_ok(setup.alice.client.put(&state_path(room, "m.room.power_levels", ""), levels).await);
    // Bob's server saw the power levels, then Bob set a topic; meanwhile Alice set another.
    let mut remote_topic =
        setup.draft(&bob, "m.room.topic", Some(""), json!({"topic": "from bob"}));
    let now = MilliSecondsSinceUnixEpoch::now().get();
    let ts = i64::from(now) + remote_ts_offset_ms;
    remote_topic["origin_server_ts"] = json!(ts);
    let (remote_id, remote_topic) = setup.sign(remote_topic);
    let (status, local) = setup
        .alice
        .client
        .put(&state_path(room, "m.room.topic", ""), json!({"topic": "from alice"}))
        .await;
    assert_eq!(status, 200, "{local}");
    let local_id = OwnedEventId::try_from(local["event_id"].as_str().expect("test fixture"))
        .expect("test fixture");
    let results = setup.send(vec![&remote_topic]).await;
    assert_eq!(results[&remote_id], "persisted", "{results:?}");
    let record = setup.rooms().room(&setup.room_id).expect("test fixture").expect("test fixture");
    let mut extremities = record.forward_extremities.clone();
    extremities.sort();
    let mut expected = vec![local_id.clone(), remote_id.clone()];
    expected.sort();
    assert_eq!(extremities, expected, "the DAG forked");
    (setup, local_id, remote_id)
}

#[tokio::test]
async fn a_fork_is_resolved_by_state_resolution() {
    // Same power level mainline: the later timestamp wins, whichever arrived last.
    let (setup, local_id, remote_id) = concurrent_topics(60_000).await;
    let current = setup.rooms().current_state_event_id(&setup.room_id, "m.room.topic", "").unwrap();
    assert_eq!(current, Some(remote_id.clone()));
    let (later, local_later, remote_earlier) = concurrent_topics(-60_000).await;
    let current = later.rooms().current_state_event_id(&later.room_id, "m.room.topic", "").unwrap();
    assert_eq!(current, Some(local_later.clone()), "remote {remote_earlier} is older");

    // The next local event merges the fork: both tips are its prev events.
    let merge = setup.alice.send_text(setup.room_id.as_str(), "merged").await;
    let merge = setup.rooms().pdu(&OwnedEventId::try_from(merge).unwrap()).unwrap().unwrap();
    let mut prevs = merge.prev_events.clone();
    prevs.sort();
    let mut expected = vec![local_id, remote_id.clone()];
    expected.sort();
    assert_eq!(prevs, expected);
    let record = setup.rooms().room(&setup.room_id).unwrap().unwrap();
    assert_eq!(record.forward_extremities, vec![merge.event_id.clone()]);
    let topic = assert_ok(
        setup.alice.client.get(&state_path(setup.room_id.as_str(), "m.room.topic", "")).await,
    );
    assert_eq!(topic["topic"], "from bob");
    // Sync reports the resolved topic in the room state.
    let sync = setup.alice.sync_query("full_state=true").await;
    let state = sync["rooms"]["join"][setup.room_id.as_str()]["state"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let timeline = crate::harness::timeline(&sync, setup.room_id.as_str()).to_vec();
    let topics: Vec<&Value> = state
        .iter()
        .chain(timeline.iter())
        .filter(|event| event["type"] == "m.room.topic")
        .collect();
    assert!(topics.iter().any(|event| event["content"]["topic"] == "from bob"), "{sync}");
}

#[tokio::test]
async fn batched_pdu_reads_answer_like_single_reads() {
    // State resolution reads its events in batches (`Rooms::pdus`), more than one batch here.
    let setup = Setup::new("public_chat").await;
    let room = setup.rooms().room(&setup.room_id).unwrap().unwrap();
    let tip = setup.rooms().pdu(&room.forward_extremities[0]).unwrap().unwrap();
    let mut stored = tip.auth_events.clone();
    stored.push(tip.event_id.clone());
    let ids: Vec<OwnedEventId> = (0..2_500)
        .map(|index| match index % 3 {
            0 => OwnedEventId::try_from(format!("$missing{index}")).unwrap(),
            _ => stored[index % stored.len()].clone(),
        })
        .collect();
    let batched = setup.rooms().pdus(&ids).unwrap();
    assert_eq!(batched.len(), ids.len());
    for (event_id, found) in ids.iter().zip(&batched) {
        let single = setup.rooms().pdu(event_id).unwrap();
        assert_eq!(
            found.as_ref().map(|pdu| (&pdu.event_id, pdu.signed_text())),
            single.as_ref().map(|pdu| (&pdu.event_id, pdu.signed_text())),
            "{event_id}"
        );
    }
    assert_eq!(batched.iter().filter(|found| found.is_some()).count(), 2_500 - 834);
}

#[tokio::test]
async fn oversized_transactions_are_refused_whole() {
    let setup = Setup::new("public_chat").await;
    let pdus = vec![CanonicalJsonValue::Object(Default::default()); 51];
    let result = setup
        .rooms()
        .receive_transaction(&setup.remote.name, "big", pdus, 0, &setup.transport.remote())
        .await;
    assert!(result.is_err());
    let result = setup
        .rooms()
        .receive_transaction(&setup.remote.name, "edus", Vec::new(), 101, &setup.transport.remote())
        .await;
    assert!(result.is_err());
    // Garbage PDUs are dropped without an answer and without harm.
    let results = setup
        .rooms()
        .receive_transaction(
            &setup.remote.name,
            "junk",
            [json!({}), json!({"room_id": 5}), json!({"room_id": setup.room_id, "type": 1})]
                .into_iter()
                .map(|value| to_canonical_value(value).expect("test fixture"))
                .collect(),
            0,
            &setup.transport.remote(),
        )
        .await
        .unwrap();
    assert!(results.values().all(Result::is_err), "{results:?}");
}

/// The local server's published key, read from its key file.
fn local_keys(server: &TestServer) -> ruma::signatures::PublicKeyMap {
    let name = OwnedServerName::try_from(server.server_name.as_str()).expect("server name");
    let key = ServerSigningKey::load_or_generate(&server.data_dir.join("signing.key"), name)
        .expect("the server's key");
    let public = Base64::parse(key.public_key_base64()).expect("base64");
    BTreeMap::from([(server.server_name.clone(), BTreeMap::from([(key.key_id(), public)]))])
}

#[tokio::test]
async fn make_join_and_send_join_let_a_remote_user_in() {
    let setup = Setup::new("public_chat").await;
    let rooms = setup.rooms();
    let bob = UserId::parse(setup.remote.user("bob")).unwrap();
    let name = &setup.remote.name;
    // Versions the joining server does not speak are refused.
    let refused = rooms.make_join(name, &setup.room_id, &bob, &[ruma::RoomVersionId::V1]);
    assert!(matches!(refused, Err(PeerError::IncompatibleRoomVersion(_))), "{refused:?}");
    // Only for users of the asking server.
    let alice = UserId::parse(&setup.alice.user_id).unwrap();
    let version = rooms.room_version(&setup.room_id).unwrap();
    assert!(matches!(
        rooms.make_join(name, &setup.room_id, &alice, std::slice::from_ref(&version)),
        Err(PeerError::Forbidden(_))
    ));
    let template =
        rooms.make_join(name, &setup.room_id, &bob, std::slice::from_ref(&version)).unwrap();
    assert_eq!(template.room_version, version);
    let mut event = template.event;
    event.insert(
        "content".into(),
        CanonicalJsonValue::Object(
            [("membership".to_owned(), CanonicalJsonValue::String("join".into()))].into(),
        ),
    );
    let event_id = setup.remote.key.hash_and_sign_pdu(&mut event, &version).unwrap();
    let joined = rooms
        .send_join(name, &setup.room_id, &event_id, event, &setup.transport.remote())
        .await
        .unwrap();
    assert!(rooms.is_joined(&setup.room_id, &bob).unwrap());
    assert_eq!(joined.event.get("sender"), Some(&CanonicalJsonValue::String(bob.to_string())));

    // The state is the room's state before the join, complete with its auth chain, all signed.
    let state_types: Vec<String> = joined
        .state
        .iter()
        .filter_map(|pdu| match pdu.get("type") {
            Some(CanonicalJsonValue::String(kind)) => Some(kind.clone()),
            _ => None,
        })
        .collect();
    for kind in ["m.room.create", "m.room.power_levels", "m.room.join_rules", "m.room.member"] {
        assert!(state_types.iter().any(|have| have == kind), "{kind} missing: {state_types:?}");
    }
    let rules = version.rules().unwrap();
    let keys = local_keys(&setup.server);
    let mut known: Vec<OwnedEventId> = Vec::new();
    for pdu in joined.state.iter().chain(joined.auth_chain.iter()) {
        ruma::signatures::verify_event(&keys, pdu, &rules).expect("signed by the resident server");
        known.push(federation::signing::event_id_of(pdu, &version).unwrap());
    }
    for pdu in joined.state.iter().chain(joined.auth_chain.iter()).chain([&joined.event]) {
        let Some(CanonicalJsonValue::Array(auth)) = pdu.get("auth_events") else { continue };
        for auth_id in auth {
            let CanonicalJsonValue::String(auth_id) = auth_id else { panic!("{auth_id:?}") };
            assert!(known.iter().any(|id| id.as_str() == auth_id), "{auth_id} not in the answer");
        }
    }

    // The joined server may now read the room and its history.
    let state_ids = rooms.state_ids_for_server(name, &setup.room_id, &event_id).unwrap();
    assert_eq!(state_ids.pdus.len(), joined.state.len());
    let message = setup.alice.send_text(setup.room_id.as_str(), "welcome").await;
    let message = OwnedEventId::try_from(message).unwrap();
    let served = rooms.event_for_server(name, &message).unwrap();
    assert_eq!(served.get("event_id"), None, "room version 11 PDUs carry no event id");
    let backfill =
        rooms.backfill_for_server(name, &setup.room_id, std::slice::from_ref(&message), 3).unwrap();
    assert_eq!(backfill.len(), 3);
    assert_eq!(federation::signing::event_id_of(&backfill[0], &version).unwrap(), message);
    assert_eq!(federation::signing::event_id_of(&backfill[1], &version).unwrap(), event_id);
    let missing = rooms
        .missing_events_for_server(
            name,
            &setup.room_id,
            std::slice::from_ref(&event_id),
            std::slice::from_ref(&message),
            10,
            0,
        )
        .unwrap();
    assert!(missing.is_empty(), "the join is the message's only prev event");
    let auth = rooms.event_auth_for_server(name, &setup.room_id, &message).unwrap();
    assert!(auth.iter().any(|pdu| pdu.get("type") == Some(&CanonicalJsonValue::String("m.room.create".into()))));

    // A server with nobody in the (non world-readable) room may not.
    let other = OwnedServerName::try_from("other.test").unwrap();
    assert!(matches!(rooms.event_for_server(&other, &message), Err(PeerError::Forbidden(_))));

    // Leaving through make_leave/send_leave.
    let template = rooms.make_leave(name, &setup.room_id, &bob).unwrap();
    let mut leave = template.event;
    let leave_id = setup.remote.key.hash_and_sign_pdu(&mut leave, &version).unwrap();
    rooms
        .send_leave(name, &setup.room_id, &leave_id, leave, &setup.transport.remote())
        .await
        .unwrap();
    assert!(!rooms.is_joined(&setup.room_id, &bob).unwrap());
    let sync = setup.alice.sync(None, 0).await;
    assert!(timeline_has(&sync, setup.room_id.as_str(), leave_id.as_str()), "{sync}");
}

#[tokio::test]
async fn joins_the_room_does_not_allow_are_refused() {
    let setup = Setup::new("private_chat").await;
    let rooms = setup.rooms();
    let bob = UserId::parse(setup.remote.user("bob")).unwrap();
    let version = rooms.room_version(&setup.room_id).unwrap();
    let refused =
        rooms.make_join(&setup.remote.name, &setup.room_id, &bob, std::slice::from_ref(&version));
    assert!(matches!(refused, Err(PeerError::Forbidden(_))), "{refused:?}");
    // A join built by hand anyway is refused by the auth rules.
    let mut event = to_canonical(setup.draft(
        bob.as_str(),
        "m.room.member",
        Some(bob.as_str()),
        json!({"membership": "join"}),
    ))
    .unwrap();
    let event_id = setup.remote.key.hash_and_sign_pdu(&mut event, &version).unwrap();
    let result = rooms
        .send_join(&setup.remote.name, &setup.room_id, &event_id, event, &setup.transport.remote())
        .await;
    assert!(matches!(result, Err(PeerError::Ingest(_))), "{result:?}");
    assert!(!rooms.is_joined(&setup.room_id, &bob).unwrap());
}

#[tokio::test]
async fn invites_from_remote_servers_reach_the_invitee() {
    let setup = Setup::new("public_chat").await;
    let rooms = setup.rooms();
    let carol = setup.server.register("carol").await;
    let room_id = OwnedRoomId::try_from("!elsewhere:remote.test").unwrap();
    let bob = setup.remote.user("bob");
    let invite = json!({
        "room_id": room_id,
        "sender": bob,
        "type": "m.room.member",
        "state_key": carol.user_id,
        "content": {"membership": "invite"},
        "prev_events": ["$prevprevprevprevprevprevprevprevprevprevpre"],
        "auth_events": [],
        "depth": 5,
        "origin_server_ts": MilliSecondsSinceUnixEpoch::now(),
    });
    let version = ruma::RoomVersionId::V11;
    let mut event = to_canonical(invite).unwrap();
    let event_id = setup.remote.key.hash_and_sign_pdu(&mut event, &version).unwrap();
    let stripped = vec![
        json!({"type": "m.room.name", "state_key": "", "sender": bob, "content": {"name": "Elsewhere"}}),
    ];
    let signed = rooms
        .receive_invite(
            &setup.remote.name,
            &room_id,
            &event_id,
            &version,
            event.clone(),
            stripped.clone(),
            &setup.transport.remote(),
        )
        .await
        .unwrap();
    // Countersigned by this server, and still verifying for the inviting one.
    let mut keys = local_keys(&setup.server);
    keys.insert(
        setup.remote.name.to_string(),
        BTreeMap::from([(
            setup.remote.key.key_id(),
            Base64::parse(setup.remote.key.public_key_base64()).unwrap(),
        )]),
    );
    assert_eq!(
        ruma::signatures::verify_event(&keys, &signed, &version.rules().unwrap()).unwrap(),
        ruma::signatures::Verified::All
    );
    assert!(
        matches!(signed.get("signatures"), Some(CanonicalJsonValue::Object(map)) if map.contains_key(setup.server.server_name.as_str()))
    );
    let sync = carol.sync(None, 0).await;
    let invite_state = &sync["rooms"]["invite"][room_id.as_str()]["invite_state"]["events"];
    let events = invite_state.as_array().unwrap_or_else(|| panic!("no invite: {sync}"));
    assert!(events.iter().any(|event| event["content"]["name"] == "Elsewhere"), "{sync}");
    assert!(events.iter().any(|event| event["event_id"] == event_id.as_str()), "{sync}");

    // An invite with a forged signature, or for someone of another server, is refused.
    let forger = RemoteServer::new("remote.test");
    let mut forged = event.clone();
    forged.remove("signatures");
    forged.remove("hashes");
    let forged_id = forger.key.hash_and_sign_pdu(&mut forged, &version).unwrap();
    let result = rooms
        .receive_invite(
            &setup.remote.name,
            &room_id,
            &forged_id,
            &version,
            forged,
            Vec::new(),
            &setup.transport.remote(),
        )
        .await;
    assert!(matches!(result, Err(PeerError::Ingest(IngestError::Signature(_)))), "{result:?}");
}

#[tokio::test]
async fn federation_endpoints_trust_no_unverified_origin() {
    let setup = Setup::new("public_chat").await;
    let client = setup.server.client();
    let room = enc(setup.room_id.as_str());
    let bob = enc(&setup.remote.user("bob"));
    let requests: Vec<(reqwest::Method, String)> = vec![
        (reqwest::Method::PUT, "/_matrix/federation/v1/send/txn1".into()),
        (reqwest::Method::GET, "/_matrix/federation/v1/event/$abc".into()),
        (reqwest::Method::GET, format!("/_matrix/federation/v1/state/{room}?event_id=$abc")),
        (reqwest::Method::GET, format!("/_matrix/federation/v1/state_ids/{room}?event_id=$abc")),
        (reqwest::Method::GET, format!("/_matrix/federation/v1/event_auth/{room}/$abc")),
        (reqwest::Method::GET, format!("/_matrix/federation/v1/backfill/{room}?v=$abc&limit=5")),
        (reqwest::Method::POST, format!("/_matrix/federation/v1/get_missing_events/{room}")),
        (reqwest::Method::GET, format!("/_matrix/federation/v1/make_join/{room}/{bob}?ver=11")),
        (reqwest::Method::PUT, format!("/_matrix/federation/v2/send_join/{room}/$abc")),
        (reqwest::Method::GET, format!("/_matrix/federation/v1/make_leave/{room}/{bob}")),
        (reqwest::Method::PUT, format!("/_matrix/federation/v2/send_leave/{room}/$abc")),
        (reqwest::Method::PUT, format!("/_matrix/federation/v2/invite/{room}/$abc")),
        (reqwest::Method::GET, format!("/_matrix/federation/v1/make_knock/{room}/{bob}?ver=11")),
        (reqwest::Method::PUT, format!("/_matrix/federation/v1/send_knock/{room}/$abc")),
        (reqwest::Method::GET, "/_matrix/federation/v1/query/directory?room_alias=%23a%3Ab".into()),
        (reqwest::Method::GET, "/_matrix/federation/v1/publicRooms".into()),
        (reqwest::Method::POST, "/_matrix/federation/v1/publicRooms".into()),
    ];
    for (method, path) in requests {
        let answer = client
            .request_raw(
                method.clone(),
                &path,
                Some(br#"{"origin": "remote.test", "pdus": []}"#.to_vec()),
            )
            .await;
        crate::harness::assert_error(&answer, 401, "M_UNAUTHORIZED");
    }
}
