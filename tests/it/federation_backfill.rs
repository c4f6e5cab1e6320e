//! History a server never received, between two real Hearth servers on 127.0.0.x (TLS, a test
//! CA): a user who joins a room of another server pages back through everything before the
//! join (`backfill`), without `/sync` reporting it as new, and a gap the sender cannot fill
//! through `get_missing_events` is bridged with the state at the event (`state_ids`). A
//! backfilled event with a bad signature is dropped without harming what is stored.
//!
//! [Backfilling](https://spec.matrix.org/v1.16/server-server-api/#backfilling-and-retrieving-missing-events),
//! [checks on receipt](https://spec.matrix.org/v1.16/server-server-api/#checks-performed-on-receipt-of-a-pdu)

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use federation::{Method, ServerSigningKey};
use futures::future::BoxFuture;
use hearth::rooms::{
    Rooms,
    ingest::{
        MembershipRemoteError, Remote, RemoteError, RemoteEvents, RemoteMembership, ServerKeys,
    },
};
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, MilliSecondsSinceUnixEpoch, OwnedEventId,
    OwnedRoomId, OwnedServerName, RoomId, RoomVersionId, ServerName, UserId,
    canonical_json::to_canonical_value, serde::Base64,
};
use serde_json::{Value, json};

use crate::{
    federation_transport::{Pki, client_as, start_on_free_port, start_on_port_with},
    harness::{TestServer, User, bodies, enc},
};

/// Starts a server named `ip:<free port>` with extra settings.
async fn start(pki: &Pki, ip: &str, extra: &[(&str, &str)]) -> TestServer {
    start_on_free_port(pki, ip, extra).await
}

async fn join_via(user: &User, room_id: &str, server: &str) {
    let (status, answer) = user
        .client
        .post(
            &format!("/_matrix/client/v3/join/{}?server_name={}", enc(room_id), enc(server)),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "join: {answer}");
}

/// Every event `user` gets paging `/messages` backwards from the newest, `limit` at a time,
/// newest first, and how many pages that took.
async fn page_back(user: &User, room_id: &str, limit: usize) -> (Vec<Value>, usize) {
    let mut events = Vec::new();
    let mut from: Option<String> = None;
    for page in 1..=50 {
        let mut query = format!("dir=b&limit={limit}");
        if let Some(from) = &from {
            query.push_str(&format!("&from={from}"));
        }
        let answer = user.messages(room_id, &query).await;
        events.extend(answer["chunk"].as_array().cloned().unwrap_or_default());
        match answer["end"].as_str() {
            Some(end) => from = Some(end.to_owned()),
            None => return (events, page),
        }
    }
    panic!("pagination did not end after 50 pages");
}

fn ids(events: &[Value]) -> Vec<String> {
    events.iter().filter_map(|event| event["event_id"].as_str().map(str::to_owned)).collect()
}

/// The room's current state as `user`'s server has it: (type, state_key, event id).
async fn current_state(user: &User, room_id: &str) -> Vec<(String, String, String)> {
    let (status, state) =
        user.client.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(room_id))).await;
    assert_eq!(status, 200, "state: {state}");
    let mut entries: Vec<(String, String, String)> = state
        .as_array()
        .into_iter()
        .flatten()
        .map(|event| {
            let text = |key: &str| event[key].as_str().unwrap_or_default().to_owned();
            (text("type"), text("state_key"), text("event_id"))
        })
        .collect();
    entries.sort();
    entries
}

/// Polls until `user` sees a message with `body` in the room.
async fn wait_for_body(user: &User, room_id: &str, body: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let messages = user.messages(room_id, "dir=b&limit=20").await;
        if bodies(messages["chunk"].as_array().map(Vec::as_slice).unwrap_or_default())
            .iter()
            .any(|seen| seen == body)
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body} did not arrive");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_joiner_pages_back_through_history_it_never_received() {
    let pki = Pki::new();
    let a = start(&pki, "127.0.0.6", &[]).await;
    // Small backfills, so that one page takes several and the history several pages.
    let b = start(&pki, "127.0.0.7", &[("HEARTH_FEDERATION_BACKFILL_EVENTS_MAX", "25")]).await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let room_id = alice
        .create_room(json!({
            "preset": "public_chat",
            "name": "History",
            "initial_state": [{
                "type": "m.room.history_visibility",
                "state_key": "",
                "content": {"history_visibility": "shared"},
            }],
        }))
        .await;
    for n in 0..60 {
        alice.send_text(&room_id, &format!("m{n}")).await;
    }
    join_via(&bob, &room_id, &a.server_name).await;
    let since = bob.sync(None, 0).await["next_batch"].as_str().expect("next_batch").to_owned();

    // Bob pages back from his join through all 60 messages and the room's creation.
    let (events, pages) = page_back(&bob, &room_id, 30).await;
    let found = bodies(&events);
    let expected: Vec<String> = (0..60).rev().map(|n| format!("m{n}")).collect();
    assert_eq!(found, expected, "the messages, newest first");
    assert_eq!(events.first().map(|event| &event["state_key"]), Some(&json!(bob.user_id)));
    assert_eq!(events.last().map(|event| &event["type"]), Some(&json!("m.room.create")));
    for kind in ["m.room.power_levels", "m.room.join_rules", "m.room.history_visibility"] {
        assert!(events.iter().any(|event| event["type"] == kind), "{kind} is missing");
    }
    assert!(pages >= 3, "{pages} pages");
    // Exactly what alice's server has, in the same order.
    let (alice_events, _) = page_back(&alice, &room_id, 1000).await;
    assert_eq!(ids(&events), ids(&alice_events));
    // Backfilled events carry their place in the room's state.
    let name_change = events.iter().find(|event| event["type"] == "m.room.name").unwrap();
    assert_eq!(name_change["content"]["name"], "History");

    // None of it is new to bob's /sync, nor does it notify him.
    let backfilled: Vec<String> = ids(&events[1..]);
    let sync = bob.sync(Some(&since), 0).await;
    let timeline = sync["rooms"]["join"][&room_id]["timeline"]["events"].as_array();
    for event in timeline.into_iter().flatten() {
        let id = event["event_id"].as_str().unwrap_or_default();
        assert!(!backfilled.iter().any(|known| known == id), "{id} in /sync: {sync}");
    }
    let initial = bob.sync(None, 0).await;
    let room = &initial["rooms"]["join"][&room_id];
    assert!(bodies(room["timeline"]["events"].as_array().unwrap()).is_empty(), "{room}");
    let notified = room["unread_notifications"]["notification_count"].as_u64().unwrap_or(0);
    assert_eq!(notified, 0, "{room}");
    // Nor did the room's DAG or current state move on bob's server.
    let record = b.rooms.room(&OwnedRoomId::try_from(room_id.as_str()).unwrap()).unwrap().unwrap();
    assert_eq!(
        record.forward_extremities,
        [OwnedEventId::try_from(ids(&events)[0].as_str()).unwrap()]
    );
    assert_eq!(current_state(&bob, &room_id).await, current_state(&alice, &room_id).await);

    // History visibility applies to backfilled events: in a `joined` room, bob sees nothing
    // from before his join.
    let private_id = alice
        .create_room(json!({
            "preset": "public_chat",
            "initial_state": [{
                "type": "m.room.history_visibility",
                "state_key": "",
                "content": {"history_visibility": "joined"},
            }],
        }))
        .await;
    for n in 0..5 {
        alice.send_text(&private_id, &format!("secret{n}")).await;
    }
    join_via(&bob, &private_id, &a.server_name).await;
    let (hidden, _) = page_back(&bob, &private_id, 30).await;
    assert!(bodies(&hidden).is_empty(), "{hidden:?}");
    assert_eq!(hidden.first().map(|event| &event["state_key"]), Some(&json!(bob.user_id)));
    alice.send_text(&private_id, "after").await;
    wait_for_body(&bob, &private_id, "after").await;

    // With alice's server gone, the history is still all there: it is stored on bob's.
    a.stop().await;
    let (again_events, _) = page_back(&bob, &room_id, 30).await;
    assert_eq!(ids(&again_events), ids(&events));
    b.stop().await;
}

#[tokio::test]
async fn a_gap_the_sender_cannot_fill_is_bridged_with_state_ids() {
    let pki = Pki::new();
    let a = start(&pki, "127.0.0.8", &[]).await;
    // B asks for at most 2 missing events: a longer gap cannot be filled.
    let b = start(&pki, "127.0.0.9", &[("HEARTH_FEDERATION_MISSING_EVENTS_MAX", "2")]).await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let room_id = alice.create_room(json!({"preset": "public_chat", "name": "Before"})).await;
    join_via(&bob, &room_id, &a.server_name).await;
    alice.send_text(&room_id, "before").await;
    wait_for_body(&bob, &room_id, "before").await;
    let since = bob.sync(None, 0).await["next_batch"].as_str().expect("next_batch").to_owned();

    // A comes back unable to reach B (private addresses refused), so nothing it sends now
    // reaches B by its queue; it still answers B, whose keys it has stored.
    let a_port = a.port();
    let a_data = a.stop().await.expect("A's data");
    let a = start_on_port_with(
        &pki,
        "127.0.0.8",
        a_port,
        a_data.path().to_path_buf(),
        &[("HEARTH_FEDERATION_ALLOW_PRIVATE", "false")],
    )
    .await;
    assert_eq!(a.port(), a_port);
    let alice = alice.on(&a);
    let (status, answer) =
        alice.put_state(&room_id, "m.room.name", "", json!({"name": "Renamed"})).await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) =
        alice.put_state(&room_id, "m.room.topic", "", json!({"topic": "in the gap"})).await;
    assert_eq!(status, 200, "{answer}");
    let mut last = String::new();
    for n in 0..10 {
        last = alice.send_text(&room_id, &format!("gap{n}")).await;
    }

    // Only the newest event reaches B, the way a server that catches up with the latest
    // events only would send it: signed by A, from A.
    let last_id = OwnedEventId::try_from(last.as_str()).unwrap();
    let pdu = a.rooms.pdu(&last_id).unwrap().expect("A has its event").into_json().unwrap();
    let as_a = client_as(&a, &pki, true);
    let b_name = ServerName::parse(&b.server_name).unwrap();
    let answer = as_a
        .send_request(
            &b_name,
            Method::PUT,
            "/_matrix/federation/v1/send/gap1",
            Some(json!({
                "origin": a.server_name,
                "origin_server_ts": MilliSecondsSinceUnixEpoch::now(),
                "pdus": [pdu],
            })),
        )
        .await
        .expect("B answers the transaction");
    assert_eq!(answer["pdus"][last.as_str()], json!({}), "{answer}");

    // B took the state at the event from A: the room's name and topic changed in the gap.
    let (status, name) = bob
        .client
        .get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room_id)))
        .await;
    assert_eq!((status, name["name"].as_str()), (200, Some("Renamed")), "{name}");
    assert_eq!(current_state(&bob, &room_id).await, current_state(&alice, &room_id).await);
    let messages = bob.messages(&room_id, "dir=b&limit=5").await;
    assert_eq!(
        bodies(messages["chunk"].as_array().unwrap()).first().map(String::as_str),
        Some("gap9")
    );
    // The name change reaches bob's /sync as room state, though no timeline event carries it.
    let sync = bob.sync(Some(&since), 0).await;
    let state = sync["rooms"]["join"][&room_id]["state"]["events"].as_array().cloned();
    let timeline = sync["rooms"]["join"][&room_id]["timeline"]["events"].as_array().cloned();
    let all: Vec<Value> = state.into_iter().chain(timeline).flatten().collect();
    assert!(
        all.iter()
            .any(|event| event["type"] == "m.room.name" && event["content"]["name"] == "Renamed"),
        "{sync}"
    );
    b.stop().await;
    a.stop().await;
    drop(a_data);
}

/// A peer that serves A's events as A would, but slips a forged event into its `backfill`
/// answer: the transport seam of the room core, backed by A's real room core and keys.
struct Tampering {
    a_rooms: Rooms,
    a_name: OwnedServerName,
    b_name: OwnedServerName,
    a_keys: BTreeMap<String, Base64>,
    forged: CanonicalJsonObject,
}

impl Tampering {
    fn remote(self: &Arc<Self>) -> Remote {
        Remote { keys: self.clone(), events: self.clone(), membership: self.clone() }
    }
}

impl ServerKeys for Tampering {
    fn verify_keys<'a>(
        &'a self,
        server: &'a ServerName,
        _valid_at: MilliSecondsSinceUnixEpoch,
    ) -> BoxFuture<'a, Result<BTreeMap<String, Base64>, RemoteError>> {
        let keys = (server == self.a_name).then(|| self.a_keys.clone());
        Box::pin(async move { keys.ok_or_else(|| RemoteError(format!("no keys for {server}"))) })
    }
}

impl RemoteEvents for Tampering {
    fn get_event<'a>(
        &'a self,
        _server: &'a ServerName,
        event_id: &'a EventId,
    ) -> BoxFuture<'a, Result<CanonicalJsonObject, RemoteError>> {
        let event = self.a_rooms.event_for_server(&self.b_name, event_id);
        Box::pin(async move { event.map_err(|error| RemoteError(error.to_string())) })
    }

    fn get_missing_events<'a>(
        &'a self,
        _server: &'a ServerName,
        _room_id: &'a RoomId,
        _earliest_events: &'a [OwnedEventId],
        _latest_events: &'a [OwnedEventId],
        _limit: usize,
    ) -> BoxFuture<'a, Result<Vec<CanonicalJsonObject>, RemoteError>> {
        Box::pin(async move { Ok(Vec::new()) })
    }

    fn backfill<'a>(
        &'a self,
        _server: &'a ServerName,
        room_id: &'a RoomId,
        from: &'a [OwnedEventId],
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<CanonicalJsonObject>, RemoteError>> {
        let events = self.a_rooms.backfill_for_server(&self.b_name, room_id, from, limit).map(
            |mut events| {
                let middle = events.len() / 2;
                events.insert(middle, self.forged.clone());
                events
            },
        );
        Box::pin(async move { events.map_err(|error| RemoteError(error.to_string())) })
    }

    fn state_ids<'a>(
        &'a self,
        _server: &'a ServerName,
        room_id: &'a RoomId,
        event_id: &'a EventId,
    ) -> BoxFuture<'a, Result<Vec<OwnedEventId>, RemoteError>> {
        let state = self.a_rooms.state_ids_for_server(&self.b_name, room_id, event_id);
        Box::pin(async move {
            state.map(|state| state.pdus).map_err(|error| RemoteError(error.to_string()))
        })
    }
}

/// Backfill does no membership handshake.
impl RemoteMembership for Tampering {
    fn make_membership<'a>(
        &'a self,
        server: &'a ServerName,
        _room_id: &'a RoomId,
        _user_id: &'a UserId,
        _membership: &'a str,
        _supported_versions: &'a [RoomVersionId],
    ) -> BoxFuture<'a, Result<(RoomVersionId, CanonicalJsonObject), MembershipRemoteError>> {
        Box::pin(async move { Err(MembershipRemoteError::Failed(format!("not via {server}"))) })
    }

    fn send_membership<'a>(
        &'a self,
        server: &'a ServerName,
        _room_id: &'a RoomId,
        _event_id: &'a EventId,
        _membership: &'a str,
        _event: CanonicalJsonObject,
    ) -> BoxFuture<'a, Result<Value, MembershipRemoteError>> {
        Box::pin(async move { Err(MembershipRemoteError::Failed(format!("not via {server}"))) })
    }

    fn invite<'a>(
        &'a self,
        server: &'a ServerName,
        _room_id: &'a RoomId,
        _event_id: &'a EventId,
        _room_version: &'a RoomVersionId,
        _event: CanonicalJsonObject,
        _invite_room_state: Vec<Value>,
    ) -> BoxFuture<'a, Result<CanonicalJsonObject, MembershipRemoteError>> {
        Box::pin(async move { Err(MembershipRemoteError::Failed(format!("not via {server}"))) })
    }
}

#[tokio::test]
async fn a_backfilled_event_with_a_bad_signature_is_dropped() {
    let pki = Pki::new();
    let a = start(&pki, "127.0.0.10", &[]).await;
    let b = start(&pki, "127.0.0.11", &[]).await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let room_id = alice.create_room(json!({"preset": "public_chat"})).await;
    let mut sent = Vec::new();
    for n in 0..10 {
        sent.push(alice.send_text(&room_id, &format!("m{n}")).await);
    }
    join_via(&bob, &room_id, &a.server_name).await;
    let room = OwnedRoomId::try_from(room_id.as_str()).unwrap();

    // A message "from alice" after m4, signed with a key that is not A's.
    let a_name = OwnedServerName::try_from(a.server_name.as_str()).unwrap();
    let forger_dir = tempfile::tempdir().unwrap();
    let forger =
        ServerSigningKey::load_or_generate(&forger_dir.path().join("key"), a_name.clone()).unwrap();
    let m4 = a.rooms.pdu(&OwnedEventId::try_from(sent[4].as_str()).unwrap()).unwrap().unwrap();
    let draft = json!({
        "room_id": room_id,
        "sender": alice.user_id,
        "type": "m.room.message",
        "content": {"msgtype": "m.text", "body": "forged"},
        "prev_events": [m4.event_id],
        "auth_events": m4.auth_events,
        "depth": m4.depth + 1,
        "origin_server_ts": MilliSecondsSinceUnixEpoch::now(),
    });
    let CanonicalJsonValue::Object(mut forged) = to_canonical_value(draft).unwrap() else {
        panic!("not an object")
    };
    let version = a.rooms.room_version(&room).unwrap();
    let forged_id = forger.hash_and_sign_pdu(&mut forged, &version).unwrap();

    let a_key = ServerSigningKey::load_or_generate(&a.data_dir.join("signing.key"), a_name.clone())
        .unwrap();
    let peer = Arc::new(Tampering {
        a_rooms: a.rooms.clone(),
        a_name: a_name.clone(),
        b_name: OwnedServerName::try_from(b.server_name.as_str()).unwrap(),
        a_keys: BTreeMap::from([(
            a_key.key_id(),
            Base64::parse(a_key.public_key_base64()).unwrap(),
        )]),
        forged,
    });
    let record_before = b.rooms.room(&room).unwrap().unwrap();
    let state_before = b.rooms.current_state_ids(&room).unwrap();

    let stored = b.rooms.backfill(&room, &peer.remote()).await.unwrap();
    assert!(stored >= 10, "{stored} stored");
    assert!(b.rooms.pdu(&forged_id).unwrap().is_none(), "the forged event is not stored");
    assert!(b.rooms.meta(&forged_id).unwrap().is_none());
    // What was there is untouched, and the real history is all there, in order.
    let record_after = b.rooms.room(&room).unwrap().unwrap();
    assert_eq!(record_after.forward_extremities, record_before.forward_extremities);
    assert_eq!(record_after.current_snapshot, record_before.current_snapshot);
    assert_eq!(b.rooms.current_state_ids(&room).unwrap(), state_before);
    let (events, _) = page_back(&bob, &room_id, 50).await;
    let expected: Vec<String> = (0..10).rev().map(|n| format!("m{n}")).collect();
    assert_eq!(bodies(&events), expected);
    assert_eq!(events.last().map(|event| &event["type"]), Some(&json!("m.room.create")));
    b.stop().await;
    a.stop().await;
}
