//! `/sync` and what it carries: initial and incremental syncs, long polling, timeline limits
//! and `prev_batch`, filters, the invite and leave sections, `full_state`, account data,
//! typing, receipts, read markers, tags, presence, the user directory, push rules and unread
//! notification counts.
//!
//! [Syncing](https://spec.matrix.org/v1.16/client-server-api/#syncing),
//! [filtering](https://spec.matrix.org/v1.16/client-server-api/#filtering)

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{TestServer, User, assert_ok, bodies, enc, timeline, timeline_has};

fn state_events<'a>(sync: &'a Value, section: &str, room_id: &str) -> &'a [Value] {
    sync["rooms"][section][room_id]["state"]["events"].as_array().map_or(&[], Vec::as_slice)
}

fn has_state(events: &[Value], kind: &str, state_key: &str) -> bool {
    events.iter().any(|event| event["type"] == kind && event["state_key"] == state_key)
}

fn ephemeral<'a>(sync: &'a Value, room_id: &str) -> &'a [Value] {
    sync["rooms"]["join"][room_id]["ephemeral"]["events"].as_array().map_or(&[], Vec::as_slice)
}

/// A room where Alice and Bob are both joined.
async fn shared_room(alice: &User, bob: &User) -> String {
    let room_id = alice.create_room(json!({"preset": "public_chat", "name": "Shared"})).await;
    bob.join(&room_id).await;
    room_id
}

#[tokio::test]
async fn initial_then_incremental() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room_id = alice.create_room(json!({"name": "Room", "topic": "Things"})).await;
    let first = alice.send_text(&room_id, "one").await;
    let initial = alice.sync(None, 0).await;
    assert!(initial["next_batch"].is_string(), "{initial}");
    assert!(timeline_has(&initial, &room_id, &first), "{initial}");
    // The room's state is in the state section or the timeline.
    let room = &initial["rooms"]["join"][&room_id];
    let mut all_state: Vec<Value> = state_events(&initial, "join", &room_id).to_vec();
    all_state.extend(
        timeline(&initial, &room_id)
            .iter()
            .filter(|event| event.get("state_key").is_some())
            .cloned(),
    );
    for kind in
        ["m.room.create", "m.room.power_levels", "m.room.join_rules", "m.room.name", "m.room.topic"]
    {
        assert!(has_state(&all_state, kind, ""), "{kind} missing: {room}");
    }
    assert!(has_state(&all_state, "m.room.member", &alice.user_id));
    // Events carry the client format fields.
    let event =
        timeline(&initial, &room_id).iter().find(|event| event["event_id"] == first).unwrap();
    for field in ["type", "sender", "origin_server_ts", "content", "event_id"] {
        assert!(event.get(field).is_some(), "{field} missing in {event}");
    }
    assert!(event.get("room_id").is_none() || event["room_id"] == room_id);
    assert!(
        event.get("auth_events").is_none() && event.get("prev_events").is_none(),
        "federation fields leak: {event}"
    );

    let since = initial["next_batch"].as_str().unwrap();
    let nothing = alice.sync(Some(since), 0).await;
    assert!(
        nothing["rooms"]["join"].get(&room_id).is_none(),
        "an idle room is left out: {nothing}"
    );
    let second = alice.send_text(&room_id, "two").await;
    let incremental = alice
        .sync_until(Some(since.to_owned()), |sync| timeline_has(sync, &room_id, &second))
        .await;
    assert_eq!(bodies(timeline(&incremental, &room_id)), vec!["two".to_owned()]);
    assert_eq!(incremental["rooms"]["join"][&room_id]["timeline"]["limited"], false);
    assert!(
        state_events(&incremental, "join", &room_id).is_empty(),
        "no state repeated: {incremental}"
    );
    // A new room shows up in an incremental sync with its state.
    let other = alice.create_room(json!({"name": "Other"})).await;
    let answer = alice
        .sync_until(incremental["next_batch"].as_str().map(str::to_owned), |sync| {
            sync["rooms"]["join"][&other].is_object()
        })
        .await;
    let mut other_state: Vec<Value> = state_events(&answer, "join", &other).to_vec();
    other_state.extend(timeline(&answer, &other).iter().cloned());
    assert!(has_state(&other_state, "m.room.create", ""), "{answer}");
}

/// `use_state_after` (spec v1.16; matrix-sdk 0.18 always sends it): the room's state comes in
/// `state_after`, up to the end of the timeline, and `state` is left out.
#[tokio::test]
async fn use_state_after() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room_id = alice.create_room(json!({"name": "Before"})).await;
    let initial = alice.sync_query("use_state_after=true").await;
    let room = &initial["rooms"]["join"][&room_id];
    assert!(room.get("state").is_none(), "state must not be sent with use_state_after: {room}");
    let after = room["state_after"]["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no state_after: {room}"));
    assert!(has_state(after, "m.room.create", "") && has_state(after, "m.room.name", ""), "{room}");
    let since = initial["next_batch"].as_str().unwrap();
    assert_ok(alice.put_state(&room_id, "m.room.name", "", json!({"name": "After"})).await);
    alice.send_text(&room_id, "after the rename").await;
    let answer = alice.sync_query(&format!("use_state_after=true&since={since}")).await;
    let room = &answer["rooms"]["join"][&room_id];
    assert!(room.get("state").is_none(), "{room}");
    let after = room["state_after"]["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no state_after: {room}"));
    let name = after.iter().find(|event| event["type"] == "m.room.name").unwrap_or_else(|| {
        panic!("the rename is a state change up to the end of the timeline: {room}")
    });
    assert_eq!(name["content"]["name"], "After");
}

#[tokio::test]
async fn long_poll_wakes_when_another_user_sends() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room_id = shared_room(&alice, &bob).await;
    let since = bob.sync_until(None, |sync| sync["rooms"]["join"][&room_id].is_object()).await;
    let since =
        bob.sync(since["next_batch"].as_str(), 0).await["next_batch"].as_str().unwrap().to_owned();
    let started = tokio::time::Instant::now();
    let waiting = {
        let client = bob.client.clone();
        let since = since.clone();
        tokio::spawn(async move {
            client.get(&format!("/_matrix/client/v3/sync?since={since}&timeout=55000")).await
        })
    };
    let event_id = alice.send_text(&room_id, "wake up").await;
    let (status, answer) = waiting.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert!(
        timeline_has(&answer, &room_id, &event_id),
        "long poll returned without the event: {answer}"
    );
    // It returned because of the event, not because the 55 s timeout ran out.
    assert!(started.elapsed() < Duration::from_secs(50), "long poll did not wake up");
    // An idle long poll ends at its timeout with nothing new and the same position.
    let next = answer["next_batch"].as_str().unwrap();
    let idle = bob.sync(Some(next), 300).await;
    assert!(idle["rooms"]["join"].get(&room_id).is_none(), "{idle}");
}

#[tokio::test]
async fn timeline_limit_limited_and_prev_batch() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room_id = alice.create_room(json!({"name": "Busy"})).await;
    let sent: Vec<String> = (0..20).map(|index| format!("message {index}")).collect();
    for text in &sent {
        alice.send_text(&room_id, text).await;
    }
    let filter = enc(&json!({"room": {"timeline": {"limit": 5}}}).to_string());
    let answer = alice.sync_query(&format!("filter={filter}")).await;
    let room = &answer["rooms"]["join"][&room_id];
    assert_eq!(bodies(timeline(&answer, &room_id)), sent[15..].to_vec());
    assert_eq!(room["timeline"]["limited"], true);
    // The state that is not in the timeline is in the state section.
    assert!(has_state(state_events(&answer, "join", &room_id), "m.room.name", ""), "{room}");
    // prev_batch continues backwards exactly where the timeline starts.
    let mut from = room["timeline"]["prev_batch"].as_str().expect("prev_batch").to_owned();
    let mut earlier: Vec<String> = Vec::new();
    let mut pages = 0;
    loop {
        let page = alice.messages(&room_id, &format!("dir=b&limit=4&from={from}")).await;
        let mut chunk_bodies = bodies(page["chunk"].as_array().unwrap());
        chunk_bodies.reverse();
        chunk_bodies.extend(earlier);
        earlier = chunk_bodies;
        pages += 1;
        assert!(pages < 50, "pagination does not end");
        match page["end"].as_str() {
            Some(end) => from = end.to_owned(),
            None => break,
        }
    }
    assert_eq!(earlier, sent[..15].to_vec());
    // An incremental sync with more new events than the limit is limited too.
    let since = answer["next_batch"].as_str().unwrap();
    for index in 0..8 {
        alice.send_text(&room_id, &format!("later {index}")).await;
    }
    let answer = alice.sync_query(&format!("filter={filter}&since={since}")).await;
    assert_eq!(answer["rooms"]["join"][&room_id]["timeline"]["limited"], true);
    assert_eq!(
        bodies(timeline(&answer, &room_id)),
        (3..8).map(|index| format!("later {index}")).collect::<Vec<_>>()
    );
    let gap = alice
        .messages(
            &room_id,
            &format!(
                "dir=b&limit=10&from={}&to={since}",
                answer["rooms"]["join"][&room_id]["timeline"]["prev_batch"].as_str().unwrap()
            ),
        )
        .await;
    let mut gap_bodies = bodies(gap["chunk"].as_array().unwrap());
    gap_bodies.reverse();
    assert_eq!(gap_bodies, (0..3).map(|index| format!("later {index}")).collect::<Vec<_>>());
}

#[tokio::test]
async fn filters_create_get_inline_and_apply() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room_id = shared_room(&alice, &bob).await;
    alice.send_text(&room_id, "from alice").await;
    bob.send_text(&room_id, "from bob").await;
    assert_ok(
        bob.client
            .put(
                &format!("/_matrix/client/v3/rooms/{}/send/org.example.custom/c1", enc(&room_id)),
                json!({"x": 1}),
            )
            .await,
    );

    let definition = json!({"room": {"timeline": {"limit": 50, "types": ["m.room.message"], "senders": [bob.user_id]}}});
    let path = format!("/_matrix/client/v3/user/{}/filter", enc(&alice.user_id));
    let created = assert_ok(alice.client.post(&path, definition.clone()).await);
    let filter_id = created["filter_id"].as_str().expect("filter_id").to_owned();
    let stored = assert_ok(alice.client.get(&format!("{path}/{}", enc(&filter_id))).await);
    assert_eq!(stored["room"]["timeline"]["types"], json!(["m.room.message"]));
    assert_eq!(stored["room"]["timeline"]["senders"], json!([bob.user_id]));
    // Someone else's filters are not readable.
    let answer = bob.client.get(&format!("{path}/{}", enc(&filter_id))).await;
    assert!(answer.0 == 403 || answer.0 == 404, "{answer:?}");
    let answer = alice.client.get(&format!("{path}/nonexistent")).await;
    assert_eq!((answer.0, answer.1["errcode"].as_str()), (404, Some("M_NOT_FOUND")));

    // By id.
    let answer = alice.sync_query(&format!("filter={}", enc(&filter_id))).await;
    assert_eq!(bodies(timeline(&answer, &room_id)), vec!["from bob".to_owned()]);
    assert!(
        timeline(&answer, &room_id)
            .iter()
            .all(|event| event["type"] == "m.room.message" && event["sender"] == bob.user_id)
    );
    // Inline.
    let inline = enc(&json!({"room": {"timeline": {"limit": 50, "not_types": ["m.room.message", "m.room.member"]}}}).to_string());
    let answer = alice.sync_query(&format!("filter={inline}")).await;
    let events = timeline(&answer, &room_id);
    assert!(events.iter().any(|event| event["type"] == "org.example.custom"), "{answer}");
    assert!(
        events
            .iter()
            .all(|event| event["type"] != "m.room.message" && event["type"] != "m.room.member")
    );
    // Wildcards.
    let inline =
        enc(&json!({"room": {"timeline": {"limit": 50, "types": ["org.example.*"]}}}).to_string());
    let answer = alice.sync_query(&format!("filter={inline}")).await;
    let kinds: Vec<&str> =
        timeline(&answer, &room_id).iter().map(|event| event["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["org.example.custom"]);
    // Room filters.
    let inline = enc(&json!({"room": {"not_rooms": [room_id]}}).to_string());
    let answer = alice.sync_query(&format!("filter={inline}")).await;
    assert!(answer["rooms"]["join"].get(&room_id).is_none(), "{answer}");
    // Filters apply to /messages too.
    let inline =
        enc(&json!({"types": ["m.room.message"], "not_senders": [alice.user_id]}).to_string());
    let page = alice.messages(&room_id, &format!("dir=b&limit=10&filter={inline}")).await;
    assert_eq!(bodies(page["chunk"].as_array().unwrap()), vec!["from bob".to_owned()]);
    assert_eq!(page["chunk"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn lazy_load_members() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room_id = shared_room(&alice, &bob).await;
    carol.join(&room_id).await;
    bob.send_text(&room_id, "bob speaks").await;
    for index in 0..3 {
        carol.send_text(&room_id, &format!("carol {index}")).await;
    }
    let filter =
        enc(&json!({"room": {"timeline": {"limit": 2}, "state": {"lazy_load_members": true}}})
            .to_string());
    let answer = alice.sync_query(&format!("filter={filter}")).await;
    let state = state_events(&answer, "join", &room_id);
    assert!(
        has_state(state, "m.room.member", &carol.user_id),
        "sender's member event missing: {answer}"
    );
    assert!(has_state(state, "m.room.member", &alice.user_id), "own member event missing");
    assert!(
        !has_state(state, "m.room.member", &bob.user_id),
        "bob did not speak in the timeline: {answer}"
    );
    // Without lazy loading, every member is there.
    let filter = enc(&json!({"room": {"timeline": {"limit": 2}}}).to_string());
    let answer = alice.sync_query(&format!("filter={filter}")).await;
    assert!(has_state(state_events(&answer, "join", &room_id), "m.room.member", &bob.user_id));
    // /messages with lazy loading returns the senders' member events in `state`.
    let filter = enc(&json!({"lazy_load_members": true}).to_string());
    let page = alice.messages(&room_id, &format!("dir=b&limit=2&filter={filter}")).await;
    let state = page["state"].as_array().expect("state with lazy loading");
    assert!(has_state(state, "m.room.member", &carol.user_id), "{page}");
    assert!(!has_state(state, "m.room.member", &bob.user_id), "{page}");
}

#[tokio::test]
async fn invite_section_has_invite_state() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room_id = alice
        .create_room(json!({"preset": "private_chat", "name": "Secret", "topic": "hush"}))
        .await;
    let since = bob.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    alice.invite(&room_id, &bob.user_id).await;
    let answer =
        bob.sync_until(Some(since), |sync| sync["rooms"]["invite"][&room_id].is_object()).await;
    let events = answer["rooms"]["invite"][&room_id]["invite_state"]["events"]
        .as_array()
        .expect("invite_state");
    assert!(has_state(events, "m.room.create", ""), "{answer}");
    assert!(has_state(events, "m.room.join_rules", ""));
    let name = events.iter().find(|event| event["type"] == "m.room.name").expect("name");
    assert_eq!(name["content"]["name"], "Secret");
    let invite = events
        .iter()
        .find(|event| event["type"] == "m.room.member" && event["state_key"] == bob.user_id)
        .expect("own invite");
    assert_eq!(invite["content"]["membership"], "invite");
    assert_eq!(invite["sender"], alice.user_id);
    // Stripped state: no event ids needed, but type, state_key, sender and content are.
    for event in events {
        for field in ["type", "state_key", "sender", "content"] {
            assert!(event.get(field).is_some(), "{field} missing in {event}");
        }
    }
    // Also in an initial sync; not in join.
    let initial = bob.sync(None, 0).await;
    assert!(initial["rooms"]["invite"][&room_id].is_object());
    assert!(initial["rooms"]["join"].get(&room_id).is_none());
    // After joining, it moves to join.
    let since = initial["next_batch"].as_str().unwrap().to_owned();
    bob.join(&room_id).await;
    let answer =
        bob.sync_until(Some(since), |sync| sync["rooms"]["join"][&room_id].is_object()).await;
    assert!(answer["rooms"]["invite"].get(&room_id).is_none());
}

#[tokio::test]
async fn leave_section_after_leave_and_kick() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room_id = shared_room(&alice, &bob).await;
    let since = bob.sync_until(None, |sync| sync["rooms"]["join"][&room_id].is_object()).await["next_batch"].as_str().unwrap().to_owned();
    alice.send_text(&room_id, "before leaving").await;
    assert_ok(bob.room_post(&room_id, "leave", json!({})).await);
    let answer = bob
        .sync_until(Some(since.clone()), |sync| sync["rooms"]["leave"][&room_id].is_object())
        .await;
    let left = &answer["rooms"]["leave"][&room_id];
    let events = left["timeline"]["events"].as_array().expect("leave timeline");
    let leave = events
        .iter()
        .find(|event| event["type"] == "m.room.member" && event["state_key"] == bob.user_id)
        .expect("own leave event");
    assert_eq!(leave["content"]["membership"], "leave");
    assert!(answer["rooms"]["join"].get(&room_id).is_none());
    // Messages after leaving are not delivered.
    let next = answer["next_batch"].as_str().unwrap().to_owned();
    alice.send_text(&room_id, "after leaving").await;
    let later = bob.sync(Some(&next), 200).await;
    assert!(
        later["rooms"]["join"].get(&room_id).is_none()
            && later["rooms"]["leave"].get(&room_id).is_none(),
        "{later}"
    );
    // A room Bob left by himself is not in an initial sync without include_leave.
    let initial = bob.sync(None, 0).await;
    assert!(initial["rooms"]["leave"].get(&room_id).is_none(), "{initial}");

    // Kick: Carol is kicked by Alice and sees it in leave, with the reason.
    let carol = server.register("carol").await;
    carol.join(&room_id).await;
    let since = carol.sync_until(None, |sync| sync["rooms"]["join"][&room_id].is_object()).await["next_batch"].as_str().unwrap().to_owned();
    assert_ok(
        alice
            .room_post(&room_id, "kick", json!({"user_id": carol.user_id, "reason": "testing"}))
            .await,
    );
    let answer =
        carol.sync_until(Some(since), |sync| sync["rooms"]["leave"][&room_id].is_object()).await;
    let events = answer["rooms"]["leave"][&room_id]["timeline"]["events"].as_array().unwrap();
    let kick = events
        .iter()
        .find(|event| event["type"] == "m.room.member" && event["state_key"] == carol.user_id)
        .expect("kick event");
    assert_eq!(kick["content"]["membership"], "leave");
    assert_eq!(kick["sender"], alice.user_id);
    assert_eq!(kick["content"]["reason"], "testing");
    // Initial syncs include rooms the user left by themselves only when the filter asks, but
    // always report kicks and bans (as Synapse does), so the user learns of them.
    let initial = carol.sync(None, 0).await;
    assert!(initial["rooms"]["leave"][&room_id].is_object(), "{initial}");
    let filter = enc(&json!({"room": {"include_leave": true}}).to_string());
    let initial = carol.sync_query(&format!("filter={filter}")).await;
    assert!(initial["rooms"]["leave"][&room_id].is_object(), "{initial}");
}

#[tokio::test]
async fn full_state() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room_id = alice.create_room(json!({"name": "Full", "topic": "state"})).await;
    let since = alice.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    alice.send_text(&room_id, "new").await;
    let answer = alice.sync_query(&format!("since={since}&full_state=true")).await;
    let state = state_events(&answer, "join", &room_id);
    for kind in
        ["m.room.create", "m.room.power_levels", "m.room.name", "m.room.topic", "m.room.join_rules"]
    {
        assert!(has_state(state, kind, ""), "{kind} missing with full_state: {answer}");
    }
    assert!(has_state(state, "m.room.member", &alice.user_id));
    assert_eq!(bodies(timeline(&answer, &room_id)), vec!["new".to_owned()]);
    // Without full_state, no state repeats.
    let answer = alice.sync_query(&format!("since={since}")).await;
    assert!(state_events(&answer, "join", &room_id).is_empty(), "{answer}");
    // full_state with nothing new returns at once, with the room.
    let next = answer["next_batch"].as_str().unwrap();
    let answer = alice.sync_query(&format!("since={next}&full_state=true&timeout=30000")).await;
    assert!(has_state(state_events(&answer, "join", &room_id), "m.room.create", ""), "{answer}");
}

#[tokio::test]
async fn account_data_global_and_per_room() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room_id = alice.create_room(json!({})).await;
    let since = alice.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let user = enc(&alice.user_id);
    assert_ok(
        alice
            .client
            .put(
                &format!("/_matrix/client/v3/user/{user}/account_data/org.example.global"),
                json!({"a": 1}),
            )
            .await,
    );
    assert_ok(
        alice
            .client
            .put(
                &format!(
                    "/_matrix/client/v3/user/{user}/rooms/{}/account_data/org.example.room",
                    enc(&room_id)
                ),
                json!({"b": 2}),
            )
            .await,
    );
    let got = assert_ok(
        alice
            .client
            .get(&format!("/_matrix/client/v3/user/{user}/account_data/org.example.global"))
            .await,
    );
    assert_eq!(got, json!({"a": 1}));
    let got = assert_ok(
        alice
            .client
            .get(&format!(
                "/_matrix/client/v3/user/{user}/rooms/{}/account_data/org.example.room",
                enc(&room_id)
            ))
            .await,
    );
    assert_eq!(got, json!({"b": 2}));
    let answer = alice
        .client
        .get(&format!("/_matrix/client/v3/user/{user}/account_data/org.example.missing"))
        .await;
    assert_eq!((answer.0, answer.1["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    let answer = alice
        .sync_until(Some(since), |sync| {
            sync["account_data"]["events"].as_array().is_some_and(|events| {
                events.iter().any(|event| event["type"] == "org.example.global")
            }) && sync["rooms"]["join"][&room_id]["account_data"]["events"].as_array().is_some_and(
                |events| events.iter().any(|event| event["type"] == "org.example.room"),
            )
        })
        .await;
    let global = answer["account_data"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|event| event["type"] == "org.example.global")
        .unwrap();
    assert_eq!(global["content"], json!({"a": 1}));
    // Other users cannot read or write it.
    let bob = server.register("bob").await;
    let answer = bob
        .client
        .get(&format!("/_matrix/client/v3/user/{user}/account_data/org.example.global"))
        .await;
    assert_eq!(answer.0, 403, "{answer:?}");
    let answer = bob
        .client
        .put(&format!("/_matrix/client/v3/user/{user}/account_data/org.example.global"), json!({}))
        .await;
    assert_eq!(answer.0, 403, "{answer:?}");
}

#[tokio::test]
async fn typing_and_receipts_in_ephemeral() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room_id = shared_room(&alice, &bob).await;
    let event_id = alice.send_text(&room_id, "read me").await;
    let since = alice.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();

    let path = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room_id), enc(&bob.user_id));
    assert_ok(bob.client.put(&path, json!({"typing": true, "timeout": 30000})).await);
    let typing = |sync: &Value| {
        ephemeral(sync, &room_id).iter().any(|event| {
            event["type"] == "m.typing"
                && event["content"]["user_ids"]
                    .as_array()
                    .is_some_and(|ids| ids.contains(&json!(bob.user_id)))
        })
    };
    let answer = alice.sync_until(Some(since.clone()), typing).await;
    // Stopping typing is delivered as an empty list.
    assert_ok(bob.client.put(&path, json!({"typing": false})).await);
    alice
        .sync_until(answer["next_batch"].as_str().map(str::to_owned), |sync| {
            ephemeral(sync, &room_id).iter().any(|event| {
                event["type"] == "m.typing" && event["content"]["user_ids"] == json!([])
            })
        })
        .await;
    // Typing for someone else is forbidden.
    let other =
        format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room_id), enc(&alice.user_id));
    assert_eq!(bob.client.put(&other, json!({"typing": true})).await.0, 403);

    // A private receipt is seen by its author only.
    let receipt = |kind: &str| {
        format!("/_matrix/client/v3/rooms/{}/receipt/{kind}/{}", enc(&room_id), enc(&event_id))
    };
    let since = alice.sync(Some(&since), 0).await["next_batch"].as_str().unwrap().to_owned();
    assert_ok(bob.client.post(&receipt("m.read.private"), json!({})).await);
    let private_seen = |sync: &Value| {
        ephemeral(sync, &room_id).iter().any(|event| {
            event["type"] == "m.receipt"
                && event["content"][&event_id]["m.read.private"].is_object()
        })
    };
    bob.sync_until(None, private_seen).await;
    assert_ok(bob.client.post(&receipt("m.read"), json!({})).await);
    let answer = alice
        .sync_until(Some(since), |sync| {
            ephemeral(sync, &room_id).iter().any(|event| {
                event["type"] == "m.receipt"
                    && event["content"][&event_id]["m.read"][&bob.user_id]["ts"].is_number()
            })
        })
        .await;
    assert!(!private_seen(&answer), "alice sees bob's private receipt: {answer}");
    let initial = alice.sync(None, 0).await;
    assert!(
        !private_seen(&initial),
        "alice sees bob's private receipt in an initial sync: {initial}"
    );
    // Threaded receipts are accepted and carry the thread.
    assert_ok(bob.client.post(&receipt("m.read"), json!({"thread_id": "main"})).await);
    let answer = alice
        .sync_until(None, |sync| {
            ephemeral(sync, &room_id).iter().any(|event| {
                event["type"] == "m.receipt"
                    && event["content"][&event_id]["m.read"][&bob.user_id]["thread_id"] == "main"
            })
        })
        .await;
    assert!(answer["next_batch"].is_string());
    // Unknown receipt types are refused.
    let answer = bob.client.post(&receipt("m.nonsense"), json!({})).await;
    assert_eq!(answer.0, 400, "{answer:?}");
}

#[tokio::test]
async fn read_markers_set_fully_read() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room_id = shared_room(&alice, &bob).await;
    let event_id = alice.send_text(&room_id, "marker").await;
    let path = format!("/_matrix/client/v3/rooms/{}/read_markers", enc(&room_id));
    assert_ok(bob.client.post(&path, json!({"m.fully_read": event_id, "m.read": event_id})).await);
    let answer = bob
        .sync_until(None, |sync| {
            sync["rooms"]["join"][&room_id]["account_data"]["events"].as_array().is_some_and(
                |events| {
                    events.iter().any(|event| {
                        event["type"] == "m.fully_read" && event["content"]["event_id"] == event_id
                    })
                },
            )
        })
        .await;
    assert!(answer["next_batch"].is_string());
    let data = assert_ok(
        bob.client
            .get(&format!(
                "/_matrix/client/v3/user/{}/rooms/{}/account_data/m.fully_read",
                enc(&bob.user_id),
                enc(&room_id)
            ))
            .await,
    );
    assert_eq!(data["event_id"], event_id);
    // The m.read part is a public receipt.
    alice
        .sync_until(None, |sync| {
            ephemeral(sync, &room_id).iter().any(|event| {
                event["type"] == "m.receipt"
                    && event["content"][&event_id]["m.read"][&bob.user_id].is_object()
            })
        })
        .await;
}

#[tokio::test]
async fn tags() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room_id = alice.create_room(json!({})).await;
    let base =
        format!("/_matrix/client/v3/user/{}/rooms/{}/tags", enc(&alice.user_id), enc(&room_id));
    assert_ok(alice.client.put(&format!("{base}/m.favourite"), json!({"order": 0.5})).await);
    assert_ok(alice.client.put(&format!("{base}/u.work"), json!({})).await);
    let got = assert_ok(alice.client.get(&base).await);
    assert_eq!(got["tags"]["m.favourite"]["order"], 0.5);
    assert!(got["tags"]["u.work"].is_object());
    let answer = alice
        .sync_until(None, |sync| {
            sync["rooms"]["join"][&room_id]["account_data"]["events"].as_array().is_some_and(
                |events| {
                    events.iter().any(|event| {
                        event["type"] == "m.tag" && event["content"]["tags"]["u.work"].is_object()
                    })
                },
            )
        })
        .await;
    assert!(answer["next_batch"].is_string());
    assert_ok(alice.client.delete(&format!("{base}/u.work"), json!({})).await);
    let got = assert_ok(alice.client.get(&base).await);
    assert!(got["tags"].get("u.work").is_none(), "{got}");
    assert!(got["tags"]["m.favourite"].is_object());
}

#[tokio::test]
async fn presence_put_get_and_sync() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    shared_room(&alice, &bob).await;
    let path = format!("/_matrix/client/v3/presence/{}/status", enc(&alice.user_id));
    assert_ok(
        alice.client.put(&path, json!({"presence": "unavailable", "status_msg": "lunch"})).await,
    );
    let got = assert_ok(bob.client.get(&path).await);
    assert_eq!(got["presence"], "unavailable");
    assert_eq!(got["status_msg"], "lunch");
    assert_ok(alice.client.put(&path, json!({"presence": "online", "status_msg": "back"})).await);
    let answer = bob
        .sync_until(None, |sync| {
            sync["presence"]["events"].as_array().is_some_and(|events| {
                events.iter().any(|event| {
                    event["sender"] == alice.user_id
                        && event["content"]["presence"] == "online"
                        && event["content"]["status_msg"] == "back"
                })
            })
        })
        .await;
    assert!(answer["next_batch"].is_string());
    assert_eq!(bob.client.put(&path, json!({"presence": "online"})).await.0, 403);
    assert_eq!(alice.client.put(&path, json!({"presence": "sleepy"})).await.0, 400);
}

#[tokio::test]
async fn user_directory_search() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bobby").await;
    assert_ok(
        bob.client
            .put(
                &format!("/_matrix/client/v3/profile/{}/displayname", enc(&bob.user_id)),
                json!({"displayname": "Robert Tables"}),
            )
            .await,
    );
    // Local users who share a room are found by user id and by display name.
    shared_room(&alice, &bob).await;
    for term in ["bobby", "Robert", "tables"] {
        let answer = assert_ok(
            alice
                .client
                .post("/_matrix/client/v3/user_directory/search", json!({"search_term": term}))
                .await,
        );
        let results = answer["results"].as_array().expect("results");
        let found = results
            .iter()
            .find(|result| result["user_id"] == bob.user_id)
            .unwrap_or_else(|| panic!("{term}: {answer}"));
        assert_eq!(found["display_name"], "Robert Tables");
        assert!(answer["limited"].is_boolean());
    }
    let answer = assert_ok(
        alice
            .client
            .post("/_matrix/client/v3/user_directory/search", json!({"search_term": "zzzz"}))
            .await,
    );
    assert_eq!(answer["results"], json!([]));
    let answer = assert_ok(
        alice
            .client
            .post(
                "/_matrix/client/v3/user_directory/search",
                json!({"search_term": "b", "limit": 1}),
            )
            .await,
    );
    assert!(answer["results"].as_array().unwrap().len() <= 1);
}

#[tokio::test]
async fn push_rules_default_ruleset() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let answer = assert_ok(alice.client.get("/_matrix/client/v3/pushrules/").await);
    let global = &answer["global"];
    let ids = |kind: &str| -> Vec<String> {
        global[kind]
            .as_array()
            .unwrap_or_else(|| panic!("{kind}: {answer}"))
            .iter()
            .map(|rule| rule["rule_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let overrides = ids("override");
    for rule in [
        ".m.rule.master",
        ".m.rule.suppress_notices",
        ".m.rule.invite_for_me",
        ".m.rule.member_event",
    ] {
        assert!(overrides.iter().any(|id| id == rule), "{rule} missing: {overrides:?}");
    }
    assert_eq!(overrides[0], ".m.rule.master");
    assert_eq!(global["override"][0]["enabled"], false);
    let underride = ids("underride");
    for rule in [".m.rule.message", ".m.rule.room_one_to_one", ".m.rule.encrypted"] {
        assert!(underride.iter().any(|id| id == rule), "{rule} missing: {underride:?}");
    }
    // Each rule has the required fields (empty kinds may be left out: the spec makes every
    // kind optional).
    for kind in ["override", "content", "room", "sender", "underride"] {
        assert!(global[kind].is_array() || global[kind].is_null(), "{kind}: {answer}");
        for rule in global[kind].as_array().map_or(&[][..], Vec::as_slice) {
            assert!(
                rule["default"].is_boolean()
                    && rule["enabled"].is_boolean()
                    && rule["actions"].is_array(),
                "{rule}"
            );
        }
    }
    let scoped = assert_ok(alice.client.get("/_matrix/client/v3/pushrules/global/").await);
    assert_eq!(scoped["override"], global["override"]);
    assert_eq!(server.client().get("/_matrix/client/v3/pushrules/").await.0, 401);
}

#[tokio::test]
async fn unread_notification_counts() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room_id = shared_room(&alice, &bob).await;
    // A room with more than two members so it is not a one-to-one room for the rules.
    let carol = server.register("carol").await;
    carol.join(&room_id).await;
    let counts = |sync: &Value| {
        sync["rooms"]["join"][&room_id]["unread_notifications"]["notification_count"].as_u64()
    };
    let mut last = None;
    for index in 1..=3u64 {
        last = Some(alice.send_text(&room_id, &format!("unread {index}")).await);
        let answer = bob.sync(None, 0).await;
        assert_eq!(counts(&answer), Some(index), "after {index} messages: {answer}");
    }
    // A mention highlights.
    // Intentional mentions (`m.mentions`) are how the default push rules highlight since
    // Matrix 1.7; the display-name rules are deprecated and not in the default ruleset.
    let (status, _) = alice
        .client
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/mention", enc(&room_id)),
            json!({"msgtype": "m.text", "body": "hey bob, look", "m.mentions": {"user_ids": [bob.user_id]}}),
        )
        .await;
    assert_eq!(status, 200);
    let answer = bob.sync(None, 0).await;
    assert_eq!(counts(&answer), Some(4));
    assert_eq!(
        answer["rooms"]["join"][&room_id]["unread_notifications"]["highlight_count"], 1,
        "{answer}"
    );
    // Notices do not count.
    let notice =
        alice.send_txn(&room_id, "notice", json!({"msgtype": "m.notice", "body": "bot"})).await;
    assert_ok(notice);
    assert_eq!(counts(&bob.sync(None, 0).await), Some(4));
    // The sender's own counts stay at zero.
    assert_eq!(counts(&alice.sync(None, 0).await), Some(0));
    // A read receipt on the latest message resets the count; an incremental sync reports it.
    let since = bob.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let latest = alice.send_text(&room_id, "latest").await;
    assert!(last.is_some());
    let path =
        format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room_id), enc(&latest));
    assert_ok(bob.client.post(&path, json!({})).await);
    let answer = bob.sync_until(Some(since), |sync| counts(sync) == Some(0)).await;
    assert_eq!(answer["rooms"]["join"][&room_id]["unread_notifications"]["highlight_count"], 0);
    // New messages count again from the receipt.
    alice.send_text(&room_id, "one more").await;
    assert_eq!(counts(&bob.sync(None, 0).await), Some(1));
}

/// A limited incremental sync carries the state that changed in the gap it skipped, so the
/// client's view of the room stays right.
#[tokio::test]
async fn limited_incremental_sync_has_gap_state() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room_id = alice.create_room(json!({"preset": "public_chat", "name": "Old name"})).await;
    bob.join(&room_id).await;
    let filter = enc(&json!({"room": {"timeline": {"limit": 5}}}).to_string());
    let first = bob.sync_query(&format!("filter={filter}")).await;
    let since = first["next_batch"].as_str().expect("next_batch");
    assert_ok(alice.put_state(&room_id, "m.room.name", "", json!({"name": "New name"})).await);
    let carol = server.register("carol").await;
    carol.join(&room_id).await;
    for index in 0..10 {
        alice.send_text(&room_id, &format!("filler {index}")).await;
    }
    let answer = bob.sync_query(&format!("filter={filter}&since={since}")).await;
    let room = &answer["rooms"]["join"][&room_id];
    assert_eq!(room["timeline"]["limited"], true, "{room}");
    let state = state_events(&answer, "join", &room_id);
    let name = state
        .iter()
        .find(|event| event["type"] == "m.room.name")
        .unwrap_or_else(|| panic!("{room}"));
    assert_eq!(name["content"]["name"], "New name");
    assert!(
        has_state(state, "m.room.member", &carol.user_id),
        "carol's join happened in the gap: {room}"
    );
    // State that did not change is not repeated.
    assert!(!has_state(state, "m.room.create", ""), "{room}");
    // The timeline is the newest five.
    assert_eq!(
        bodies(timeline(&answer, &room_id)),
        (5..10).map(|i| format!("filler {i}")).collect::<Vec<_>>()
    );
}

/// A typing notification ends by itself when its timeout runs out.
#[tokio::test]
async fn typing_times_out() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room_id = shared_room(&alice, &bob).await;
    let path = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room_id), enc(&bob.user_id));
    assert_ok(bob.client.put(&path, json!({"typing": true, "timeout": 300})).await);
    let typing = alice
        .sync_until(None, |sync| {
            ephemeral(sync, &room_id).iter().any(|event| {
                event["type"] == "m.typing" && event["content"]["user_ids"] == json!([bob.user_id])
            })
        })
        .await;
    // Without any further request from Bob, Alice learns that he stopped.
    alice
        .sync_until(typing["next_batch"].as_str().map(str::to_owned), |sync| {
            ephemeral(sync, &room_id).iter().any(|event| {
                event["type"] == "m.typing" && event["content"]["user_ids"] == json!([])
            })
        })
        .await;
    let initial = alice.sync(None, 0).await;
    assert!(
        !ephemeral(&initial, &room_id).iter().any(|event| event["type"] == "m.typing"
            && event["content"]["user_ids"].as_array().is_some_and(|ids| !ids.is_empty())),
        "{initial}"
    );
}
