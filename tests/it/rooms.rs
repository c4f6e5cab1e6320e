//! Rooms: `createRoom` and its options, room versions, membership changes and member lists,
//! state, sending with transaction ids, redaction, single events, `/messages` and `/context`.
//!
//! [Rooms](https://spec.matrix.org/v1.16/client-server-api/#rooms),
//! [room membership](https://spec.matrix.org/v1.16/client-server-api/#room-membership),
//! [events](https://spec.matrix.org/v1.16/client-server-api/#events)

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{TestServer, User, assert_error, assert_ok, bodies, enc, state_path};

async fn state_content(user: &User, room_id: &str, kind: &str, state_key: &str) -> (u16, Value) {
    user.client.get(&state_path(room_id, kind, state_key)).await
}

async fn current(user: &User, room_id: &str, kind: &str, state_key: &str) -> Value {
    assert_ok(state_content(user, room_id, kind, state_key).await)
}

async fn membership(user: &User, room_id: &str, user_id: &str) -> Option<String> {
    let (status, content) = state_content(user, room_id, "m.room.member", user_id).await;
    (status == 200).then(|| content["membership"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn presets_set_join_rules_and_visibility() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let public = alice.create_room(json!({"preset": "public_chat"})).await;
    assert_eq!(current(&alice, &public, "m.room.join_rules", "").await["join_rule"], "public");
    assert_eq!(
        current(&alice, &public, "m.room.history_visibility", "").await["history_visibility"],
        "shared"
    );
    let private = alice.create_room(json!({"preset": "private_chat"})).await;
    assert_eq!(current(&alice, &private, "m.room.join_rules", "").await["join_rule"], "invite");
    assert_eq!(
        current(&alice, &private, "m.room.guest_access", "").await["guest_access"],
        "can_join"
    );
    // trusted_private_chat: invitees get the creator's power level.
    let trusted =
        alice.create_room(json!({"preset": "trusted_private_chat", "invite": [bob.user_id]})).await;
    let levels = current(&alice, &trusted, "m.room.power_levels", "").await;
    assert_eq!(levels["users"][&bob.user_id], 100, "{levels}");
    assert_eq!(levels["users"][&alice.user_id], 100);
    // No preset: visibility decides (private -> private_chat, public -> public_chat).
    let default = alice.create_room(json!({})).await;
    assert_eq!(current(&alice, &default, "m.room.join_rules", "").await["join_rule"], "invite");
    let listed = alice.create_room(json!({"visibility": "public", "name": "Listed"})).await;
    assert_eq!(current(&alice, &listed, "m.room.join_rules", "").await["join_rule"], "public");
    let directory = assert_ok(bob.client.get("/_matrix/client/v3/publicRooms").await);
    let chunk = directory["chunk"].as_array().unwrap();
    let entry = chunk
        .iter()
        .find(|room| room["room_id"] == listed)
        .unwrap_or_else(|| panic!("not listed: {directory}"));
    assert_eq!(entry["name"], "Listed");
    assert_eq!(entry["num_joined_members"], 1);
    assert!(
        !chunk.iter().any(|room| room["room_id"] == public),
        "public_chat without visibility is not listed"
    );
    let visibility = assert_ok(
        bob.client.get(&format!("/_matrix/client/v3/directory/list/room/{}", enc(&listed))).await,
    );
    assert_eq!(visibility["visibility"], "public");
    // Unknown presets are refused.
    let answer =
        alice.client.post("/_matrix/client/v3/createRoom", json!({"preset": "party"})).await;
    assert_eq!(answer.0, 400, "{answer:?}");
}

#[tokio::test]
async fn create_room_options() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let answer = assert_ok(
        alice
            .client
            .post(
                "/_matrix/client/v3/createRoom",
                json!({
                    "preset": "private_chat",
                    "name": "Options",
                    "topic": "All of them",
                    "room_alias_name": "options",
                    "invite": [bob.user_id],
                    "is_direct": true,
                    "initial_state": [
                        {"type": "m.room.history_visibility", "content": {"history_visibility": "joined"}},
                        {"type": "org.example.state", "state_key": "k", "content": {"v": 1}},
                    ],
                    "power_level_content_override": {"events_default": 10, "users": {alice.user_id.clone(): 100, bob.user_id.clone(): 20}},
                    "creation_content": {"m.federate": false, "type": "org.example.room_type"},
                }),
            )
            .await,
    );
    let room_id = answer["room_id"].as_str().unwrap().to_owned();
    assert!(room_id.starts_with('!'), "{answer}");
    assert_eq!(current(&alice, &room_id, "m.room.name", "").await["name"], "Options");
    assert_eq!(current(&alice, &room_id, "m.room.topic", "").await["topic"], "All of them");
    let alias = current(&alice, &room_id, "m.room.canonical_alias", "").await;
    assert_eq!(alias["alias"], "#options:localhost");
    let resolved = assert_ok(
        alice
            .client
            .get(&format!("/_matrix/client/v3/directory/room/{}", enc("#options:localhost")))
            .await,
    );
    assert_eq!(resolved["room_id"], room_id);
    assert!(resolved["servers"].as_array().unwrap().contains(&json!("localhost")));
    // initial_state overrides the preset's history visibility and adds custom state.
    assert_eq!(
        current(&alice, &room_id, "m.room.history_visibility", "").await["history_visibility"],
        "joined"
    );
    assert_eq!(current(&alice, &room_id, "org.example.state", "k").await["v"], 1);
    let levels = current(&alice, &room_id, "m.room.power_levels", "").await;
    assert_eq!(levels["events_default"], 10);
    assert_eq!(levels["users"][&bob.user_id], 20);
    assert_eq!(levels["users"][&alice.user_id], 100);
    let create = current(&alice, &room_id, "m.room.create", "").await;
    assert_eq!(create["m.federate"], false);
    assert_eq!(create["type"], "org.example.room_type");
    assert_eq!(create["room_version"], "11", "default room version");
    // The invite carries is_direct.
    let invite = current(&alice, &room_id, "m.room.member", &bob.user_id).await;
    assert_eq!(invite["membership"], "invite");
    assert_eq!(invite["is_direct"], true);
    let invite_event = assert_ok(
        alice
            .client
            .get(&format!("{}?format=event", state_path(&room_id, "m.room.member", &bob.user_id)))
            .await,
    );
    assert_eq!(invite_event["sender"], alice.user_id);
    assert_eq!(invite_event["type"], "m.room.member");
    // Inviting a user who does not exist fails the whole request.
    let answer = alice
        .client
        .post("/_matrix/client/v3/createRoom", json!({"invite": ["@nobody:localhost"]}))
        .await;
    assert!(answer.0 >= 400 && answer.0 < 500, "{answer:?}");
}

#[tokio::test]
async fn room_versions() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    for version in ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11"] {
        let room_id = alice.create_room(json!({"room_version": version, "preset": "public_chat", "name": format!("v{version}")})).await;
        let create = current(&alice, &room_id, "m.room.create", "").await;
        assert_eq!(create["room_version"], version);
        // The creator field is gone from version 11 on.
        if version == "11" {
            assert!(create.get("creator").is_none(), "{create}");
        } else {
            assert_eq!(create["creator"], alice.user_id, "v{version}: {create}");
        }
        bob.join(&room_id).await;
        let event_id = bob.send_text(&room_id, &format!("hello v{version}")).await;
        // Event ids: v1 and v2 `$opaque:server`, v3 base64, v4+ url-safe base64 without a server.
        assert!(event_id.starts_with('$'));
        match version {
            "1" | "2" => assert!(event_id.ends_with(":localhost"), "{event_id}"),
            _ => assert!(!event_id.contains(':') && event_id.len() == 44, "v{version}: {event_id}"),
        }
        let event = assert_ok(
            alice
                .client
                .get(&format!(
                    "/_matrix/client/v3/rooms/{}/event/{}",
                    enc(&room_id),
                    enc(&event_id)
                ))
                .await,
        );
        assert_eq!(event["content"]["body"], format!("hello v{version}"));
        assert_ok(alice.put_state(&room_id, "m.room.topic", "", json!({"topic": "ok"})).await);
        let redaction = alice
            .client
            .put(
                &format!(
                    "/_matrix/client/v3/rooms/{}/redact/{}/r{version}",
                    enc(&room_id),
                    enc(&event_id)
                ),
                json!({}),
            )
            .await;
        assert_ok(redaction);
    }
    let capabilities = assert_ok(alice.client.get("/_matrix/client/v3/capabilities").await);
    let versions = &capabilities["capabilities"]["m.room_versions"];
    assert_eq!(versions["default"], "11", "{capabilities}");
    for version in ["1", "2", "6", "10", "11"] {
        assert_eq!(versions["available"][version], "stable", "{capabilities}");
    }
    let answer =
        alice.client.post("/_matrix/client/v3/createRoom", json!({"room_version": "999"})).await;
    assert_error(&answer, 400, "M_UNSUPPORTED_ROOM_VERSION");
    let answer =
        alice.client.post("/_matrix/client/v3/createRoom", json!({"room_version": ""})).await;
    assert_eq!(answer.0, 400, "{answer:?}");
}

#[tokio::test]
async fn aliases() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room_id =
        alice.create_room(json!({"room_alias_name": "taken", "preset": "public_chat"})).await;
    let answer =
        bob.client.post("/_matrix/client/v3/createRoom", json!({"room_alias_name": "taken"})).await;
    assert_error(&answer, 400, "M_ROOM_IN_USE");
    let answer = bob
        .client
        .post("/_matrix/client/v3/createRoom", json!({"room_alias_name": "bad:alias"}))
        .await;
    assert_eq!(answer.0, 400, "{answer:?}");
    // put, get, list, delete.
    let alias = enc("#second:localhost");
    assert_ok(
        alice
            .client
            .put(&format!("/_matrix/client/v3/directory/room/{alias}"), json!({"room_id": room_id}))
            .await,
    );
    let answer = alice
        .client
        .put(&format!("/_matrix/client/v3/directory/room/{alias}"), json!({"room_id": room_id}))
        .await;
    assert_eq!(answer.0, 409, "an existing alias: {answer:?}");
    assert_eq!(
        assert_ok(bob.client.get(&format!("/_matrix/client/v3/directory/room/{alias}")).await)["room_id"],
        room_id
    );
    bob.join(&room_id).await;
    let list = assert_ok(
        bob.client.get(&format!("/_matrix/client/v3/rooms/{}/aliases", enc(&room_id))).await,
    );
    let aliases = list["aliases"].as_array().unwrap();
    assert!(
        aliases.contains(&json!("#taken:localhost"))
            && aliases.contains(&json!("#second:localhost")),
        "{list}"
    );
    // Only its creator (or a moderator) deletes an alias.
    let answer =
        bob.client.delete(&format!("/_matrix/client/v3/directory/room/{alias}"), json!({})).await;
    assert_error(&answer, 403, "M_FORBIDDEN");
    assert_ok(
        alice.client.delete(&format!("/_matrix/client/v3/directory/room/{alias}"), json!({})).await,
    );
    assert_error(
        &bob.client.get(&format!("/_matrix/client/v3/directory/room/{alias}")).await,
        404,
        "M_NOT_FOUND",
    );
    assert_error(
        &alice
            .client
            .delete(&format!("/_matrix/client/v3/directory/room/{alias}"), json!({}))
            .await,
        404,
        "M_NOT_FOUND",
    );
    // Joining by alias.
    let carol = server.register("carol").await;
    let answer = assert_ok(
        carol
            .client
            .post(&format!("/_matrix/client/v3/join/{}", enc("#taken:localhost")), json!({}))
            .await,
    );
    assert_eq!(answer["room_id"], room_id);
    let answer = carol
        .client
        .post(&format!("/_matrix/client/v3/join/{}", enc("#missing:localhost")), json!({}))
        .await;
    assert_error(&answer, 404, "M_NOT_FOUND");
}

#[tokio::test]
async fn public_room_directory() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let mut listed = Vec::new();
    for index in 0..3 {
        listed.push(alice.create_room(json!({"visibility": "public", "name": format!("Room {index}"), "topic": "searchable"})).await);
    }
    let hidden = alice.create_room(json!({"preset": "public_chat", "name": "Hidden"})).await;
    // GET without auth, with paging.
    let page = assert_ok(server.client().get("/_matrix/client/v3/publicRooms?limit=2").await);
    assert_eq!(page["chunk"].as_array().unwrap().len(), 2);
    assert_eq!(page["total_room_count_estimate"], 3);
    let next = page["next_batch"].as_str().expect("next_batch");
    let rest = assert_ok(
        server.client().get(&format!("/_matrix/client/v3/publicRooms?limit=2&since={next}")).await,
    );
    assert_eq!(rest["chunk"].as_array().unwrap().len(), 1);
    let mut seen: Vec<Value> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest["chunk"].as_array().unwrap())
        .map(|room| room["room_id"].clone())
        .collect();
    seen.sort_by_key(|id| id.to_string());
    let mut expected: Vec<Value> = listed.iter().map(|id| json!(id)).collect();
    expected.sort_by_key(|id| id.to_string());
    assert_eq!(seen, expected);
    // POST with a search term.
    let found = assert_ok(
        alice
            .client
            .post(
                "/_matrix/client/v3/publicRooms",
                json!({"filter": {"generic_search_term": "Room 1"}}),
            )
            .await,
    );
    let chunk = found["chunk"].as_array().unwrap();
    assert_eq!(chunk.len(), 1, "{found}");
    assert_eq!(chunk[0]["room_id"], listed[1]);
    // Publishing and unpublishing.
    let path = format!("/_matrix/client/v3/directory/list/room/{}", enc(&hidden));
    assert_eq!(assert_ok(alice.client.get(&path).await)["visibility"], "private");
    let bob = server.register("bob").await;
    bob.join(&hidden).await;
    assert_error(&bob.client.put(&path, json!({"visibility": "public"})).await, 403, "M_FORBIDDEN");
    assert_ok(alice.client.put(&path, json!({"visibility": "public"})).await);
    let all = assert_ok(server.client().get("/_matrix/client/v3/publicRooms").await);
    assert!(all["chunk"].as_array().unwrap().iter().any(|room| room["room_id"] == hidden), "{all}");
    assert_ok(alice.client.put(&path, json!({"visibility": "private"})).await);
    let all = assert_ok(server.client().get("/_matrix/client/v3/publicRooms").await);
    assert!(!all["chunk"].as_array().unwrap().iter().any(|room| room["room_id"] == hidden));
}

#[tokio::test]
async fn membership_lifecycle() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room_id = alice.create_room(json!({"preset": "private_chat", "name": "Members"})).await;
    // Invite, then join by id through /rooms/{id}/join.
    alice.invite(&room_id, &bob.user_id).await;
    assert_eq!(membership(&alice, &room_id, &bob.user_id).await.as_deref(), Some("invite"));
    let answer = assert_ok(
        bob.client
            .post(
                &format!("/_matrix/client/v3/rooms/{}/join", enc(&room_id)),
                json!({"reason": "hi"}),
            )
            .await,
    );
    assert_eq!(answer["room_id"], room_id);
    assert_eq!(membership(&alice, &room_id, &bob.user_id).await.as_deref(), Some("join"));
    let joined = assert_ok(bob.client.get("/_matrix/client/v3/joined_rooms").await);
    assert_eq!(joined["joined_rooms"], json!([room_id]));
    // Carol is invited and joins through /join/{roomIdOrAlias} with a room id.
    alice.invite(&room_id, &carol.user_id).await;
    carol.join(&room_id).await;
    let members = assert_ok(
        alice
            .client
            .get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room_id)))
            .await,
    );
    let joined = members["joined"].as_object().unwrap();
    assert_eq!(joined.len(), 3);
    assert!(joined.contains_key(&bob.user_id) && joined.contains_key(&carol.user_id), "{members}");
    let before_kick = bob.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();

    // Kick Carol, ban Bob.
    assert_ok(
        alice.room_post(&room_id, "kick", json!({"user_id": carol.user_id, "reason": "out"})).await,
    );
    assert_eq!(membership(&alice, &room_id, &carol.user_id).await.as_deref(), Some("leave"));
    assert_ok(
        alice.room_post(&room_id, "ban", json!({"user_id": bob.user_id, "reason": "bad"})).await,
    );
    let ban = current(&alice, &room_id, "m.room.member", &bob.user_id).await;
    assert_eq!((ban["membership"].as_str(), ban["reason"].as_str()), (Some("ban"), Some("bad")));
    assert_error(
        &bob.client.post(&format!("/_matrix/client/v3/join/{}", enc(&room_id)), json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_eq!(
        assert_ok(bob.client.get("/_matrix/client/v3/joined_rooms").await)["joined_rooms"],
        json!([])
    );
    // Kicking someone not in the room fails.
    let dave = server.register("dave").await;
    assert_error(
        &alice.room_post(&room_id, "kick", json!({"user_id": dave.user_id})).await,
        403,
        "M_FORBIDDEN",
    );
    // Unban: back to leave; then an invite lets Bob in again.
    assert_ok(alice.room_post(&room_id, "unban", json!({"user_id": bob.user_id})).await);
    assert_eq!(membership(&alice, &room_id, &bob.user_id).await.as_deref(), Some("leave"));
    assert_error(
        &bob.client.post(&format!("/_matrix/client/v3/join/{}", enc(&room_id)), json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    alice.invite(&room_id, &bob.user_id).await;
    bob.join(&room_id).await;

    // members with membership / not_membership / at.
    let members_path = format!("/_matrix/client/v3/rooms/{}/members", enc(&room_id));
    let all = assert_ok(alice.client.get(&members_path).await);
    let chunk = all["chunk"].as_array().unwrap();
    assert_eq!(chunk.len(), 3, "{all}");
    assert!(
        chunk.iter().all(|event| event["type"] == "m.room.member" && event["event_id"].is_string())
    );
    let states = |answer: &Value| -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = answer["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .map(|event| {
                (
                    event["state_key"].as_str().unwrap().to_owned(),
                    event["content"]["membership"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        pairs.sort();
        pairs
    };
    let joined = assert_ok(alice.client.get(&format!("{members_path}?membership=join")).await);
    assert_eq!(
        states(&joined),
        vec![(alice.user_id.clone(), "join".to_owned()), (bob.user_id.clone(), "join".to_owned())]
    );
    let not_joined =
        assert_ok(alice.client.get(&format!("{members_path}?not_membership=join")).await);
    assert_eq!(states(&not_joined), vec![(carol.user_id.clone(), "leave".to_owned())]);
    let at = assert_ok(alice.client.get(&format!("{members_path}?at={before_kick}")).await);
    assert_eq!(
        states(&at),
        vec![
            (alice.user_id.clone(), "join".to_owned()),
            (bob.user_id.clone(), "join".to_owned()),
            (carol.user_id.clone(), "join".to_owned())
        ],
        "members at a token before the kick"
    );
    // Carol, who left, sees the members as of when she left; she cannot read joined_members.
    let seen_by_carol = assert_ok(carol.client.get(&members_path).await);
    assert!(states(&seen_by_carol).contains(&(carol.user_id.clone(), "leave".to_owned())));
    assert_error(
        &carol
            .client
            .get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room_id)))
            .await,
        403,
        "M_FORBIDDEN",
    );
    // Dave never joined: no member list.
    assert_error(&dave.client.get(&members_path).await, 403, "M_FORBIDDEN");

    // Leave and forget.
    assert_ok(bob.room_post(&room_id, "leave", json!({})).await);
    assert_eq!(membership(&alice, &room_id, &bob.user_id).await.as_deref(), Some("leave"));
    assert_eq!(
        alice.room_post(&room_id, "forget", json!({})).await.0,
        400,
        "alice is still joined"
    );
    assert_ok(bob.room_post(&room_id, "forget", json!({})).await);
    let filter = enc(&json!({"room": {"include_leave": true}}).to_string());
    let sync = bob.sync_query(&format!("filter={filter}")).await;
    assert!(
        sync["rooms"]["leave"].get(&room_id).is_none(),
        "a forgotten room is not in sync: {sync}"
    );
    // Leaving a room one was never in.
    assert_eq!(dave.room_post(&room_id, "leave", json!({})).await.0, 403);
}

#[tokio::test]
async fn state_get_all_one_and_put() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room_id = alice.create_room(json!({"preset": "public_chat", "name": "State"})).await;
    let put =
        assert_ok(alice.put_state(&room_id, "m.room.topic", "", json!({"topic": "first"})).await);
    assert!(put["event_id"].as_str().is_some_and(|id| id.starts_with('$')));
    assert_ok(
        alice
            .put_state(&room_id, "org.example.custom", "key/with:odd chars", json!({"n": 1}))
            .await,
    );
    assert_eq!(
        current(&alice, &room_id, "org.example.custom", "key/with:odd chars").await,
        json!({"n": 1})
    );
    assert_ok(alice.put_state(&room_id, "m.room.topic", "", json!({"topic": "second"})).await);
    // All state.
    bob.join(&room_id).await;
    let all = assert_ok(
        bob.client.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(&room_id))).await,
    );
    let events = all.as_array().expect("an array of events");
    for (kind, key) in [
        ("m.room.create", ""),
        ("m.room.power_levels", ""),
        ("m.room.join_rules", ""),
        ("m.room.name", ""),
        ("m.room.topic", ""),
        ("m.room.member", alice.user_id.as_str()),
        ("m.room.member", bob.user_id.as_str()),
        ("org.example.custom", "key/with:odd chars"),
    ] {
        assert!(
            events.iter().any(|event| event["type"] == kind && event["state_key"] == key),
            "{kind} {key}: {all}"
        );
    }
    let topics: Vec<&Value> =
        events.iter().filter(|event| event["type"] == "m.room.topic").collect();
    assert_eq!(topics.len(), 1);
    assert_eq!(topics[0]["content"]["topic"], "second");
    // Missing state is 404 M_NOT_FOUND.
    assert_error(&state_content(&bob, &room_id, "m.room.avatar", "").await, 404, "M_NOT_FOUND");
    assert_error(
        &state_content(&bob, &room_id, "m.room.member", "@nobody:localhost").await,
        404,
        "M_NOT_FOUND",
    );
    // Sending the same state twice is idempotent.
    let again =
        assert_ok(alice.put_state(&room_id, "m.room.topic", "", json!({"topic": "second"})).await);
    let event = assert_ok(
        alice
            .client
            .get(&format!("{}?format=event", state_path(&room_id, "m.room.topic", "")))
            .await,
    );
    assert_eq!(again["event_id"], event["event_id"]);
    // Someone who is not in the room cannot read its state.
    let carol = server.register("carol").await;
    let private = alice.create_room(json!({"preset": "private_chat"})).await;
    assert_error(
        &carol.client.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(&private))).await,
        403,
        "M_FORBIDDEN",
    );
    assert_error(&state_content(&carol, &private, "m.room.create", "").await, 403, "M_FORBIDDEN");
    assert_error(
        &carol.put_state(&private, "m.room.topic", "", json!({"topic": "x"})).await,
        403,
        "M_FORBIDDEN",
    );
}

/// "When an empty string, the trailing slash on this endpoint is optional", and ruma-built
/// clients send it.
#[tokio::test]
async fn empty_state_key_with_trailing_slash() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room_id = alice.create_room(json!({})).await;
    let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(&room_id));
    assert_ok(alice.client.put(&path, json!({"topic": "slashed"})).await);
    assert_eq!(assert_ok(alice.client.get(&path).await)["topic"], "slashed");
    assert_eq!(current(&alice, &room_id, "m.room.topic", "").await["topic"], "slashed");
}

#[tokio::test]
async fn send_with_transaction_ids() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room_id = alice.create_room(json!({})).await;
    let content = json!({"msgtype": "m.text", "body": "once"});
    let first = assert_ok(alice.send_txn(&room_id, "txn-1", content.clone()).await);
    let second = assert_ok(alice.send_txn(&room_id, "txn-1", content.clone()).await);
    assert_eq!(first["event_id"], second["event_id"]);
    // The same transaction id from another device of the same user is a new event.
    let login = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "secret-password"});
    let other_device = assert_ok(server.client().post("/_matrix/client/v3/login", login).await);
    let other = User {
        user_id: alice.user_id.clone(),
        device_id: other_device["device_id"].as_str().unwrap().to_owned(),
        client: server.client().with_token(other_device["access_token"].as_str().unwrap()),
    };
    let third = assert_ok(other.send_txn(&room_id, "txn-1", content.clone()).await);
    assert_ne!(third["event_id"], first["event_id"]);
    // A different transaction id is a new event too.
    let fourth = assert_ok(alice.send_txn(&room_id, "txn-2", content).await);
    assert_ne!(fourth["event_id"], first["event_id"]);
    let page = alice.messages(&room_id, "dir=b&limit=10").await;
    assert_eq!(bodies(page["chunk"].as_array().unwrap()), vec!["once"; 3]);
    // The transaction id is echoed to the sending device only.
    let mine = alice.sync(None, 0).await;
    let echoed = crate::harness::timeline(&mine, &room_id)
        .iter()
        .find(|event| event["event_id"] == first["event_id"])
        .cloned()
        .unwrap();
    assert_eq!(echoed["unsigned"]["transaction_id"], "txn-1", "{echoed}");
    let theirs = other.sync(None, 0).await;
    let seen = crate::harness::timeline(&theirs, &room_id)
        .iter()
        .find(|event| event["event_id"] == first["event_id"])
        .cloned()
        .unwrap();
    assert!(seen["unsigned"].get("transaction_id").is_none(), "{seen}");
    // Any event type can be sent, including custom ones.
    let custom = alice
        .client
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/org.example.ping/p1", enc(&room_id)),
            json!({"n": 1}),
        )
        .await;
    assert_ok(custom);
}

#[tokio::test]
async fn redaction_strips_content() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room_id = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room_id).await;
    let event_id = bob.send_text(&room_id, "regrettable").await;
    let path =
        format!("/_matrix/client/v3/rooms/{}/redact/{}/red-1", enc(&room_id), enc(&event_id));
    let redaction = assert_ok(bob.client.put(&path, json!({"reason": "oops"})).await);
    let redaction_id = redaction["event_id"].as_str().unwrap().to_owned();
    // Idempotent per transaction.
    assert_eq!(
        assert_ok(bob.client.put(&path, json!({"reason": "oops"})).await)["event_id"],
        redaction_id
    );
    let event = assert_ok(
        alice
            .client
            .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room_id), enc(&event_id)))
            .await,
    );
    assert_eq!(event["content"], json!({}), "{event}");
    assert_eq!(event["type"], "m.room.message");
    let because = &event["unsigned"]["redacted_because"];
    assert_eq!(because["event_id"], redaction_id, "{event}");
    assert_eq!(because["content"]["reason"], "oops");
    let page = alice.messages(&room_id, "dir=b&limit=10").await;
    let chunk = page["chunk"].as_array().unwrap();
    let redacted = chunk
        .iter()
        .find(|event| event["event_id"] == event_id)
        .expect("redacted event stays in the timeline");
    assert_eq!(redacted["content"], json!({}));
    assert!(redacted["unsigned"]["redacted_because"].is_object());
    let redaction_event =
        chunk.iter().find(|event| event["event_id"] == redaction_id).expect("redaction event");
    assert_eq!(redaction_event["type"], "m.room.redaction");
    // v11: `redacts` is in the content (and may also be top-level for older clients).
    assert!(
        redaction_event["content"]["redacts"] == event_id || redaction_event["redacts"] == event_id,
        "{redaction_event}"
    );
    // The admin of the room redacts someone else's event.
    let other = bob.send_text(&room_id, "another").await;
    let path = format!("/_matrix/client/v3/rooms/{}/redact/{}/red-2", enc(&room_id), enc(&other));
    assert_ok(alice.client.put(&path, json!({})).await);
    let event = assert_ok(
        bob.client
            .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room_id), enc(&other)))
            .await,
    );
    assert_eq!(event["content"], json!({}));
    // Redacting a state event keeps the keys the algorithm preserves.
    let topic = assert_ok(
        alice
            .put_state(
                &room_id,
                "m.room.join_rules",
                "",
                json!({"join_rule": "public", "extra": 1}),
            )
            .await,
    );
    let path = format!(
        "/_matrix/client/v3/rooms/{}/redact/{}/red-3",
        enc(&room_id),
        enc(topic["event_id"].as_str().unwrap())
    );
    assert_ok(alice.client.put(&path, json!({})).await);
    let rules = current(&alice, &room_id, "m.room.join_rules", "").await;
    assert_eq!(rules, json!({"join_rule": "public"}));
}

#[tokio::test]
async fn get_one_event() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let carol = server.register("carol").await;
    let room_id = alice.create_room(json!({"preset": "private_chat"})).await;
    let event_id = alice.send_text(&room_id, "single").await;
    let path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room_id), enc(&event_id));
    let event = assert_ok(alice.client.get(&path).await);
    assert_eq!(event["event_id"], event_id);
    assert_eq!(event["room_id"], room_id);
    assert_eq!(event["sender"], alice.user_id);
    assert_eq!(event["content"]["body"], "single");
    assert!(event["origin_server_ts"].is_number());
    // Unknown events and events of another room are 404.
    let missing = format!(
        "/_matrix/client/v3/rooms/{}/event/{}",
        enc(&room_id),
        enc("$doesnotexist0000000000000000000000000000000")
    );
    assert_error(&alice.client.get(&missing).await, 404, "M_NOT_FOUND");
    let other_room = alice.create_room(json!({})).await;
    let wrong_room =
        format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&other_room), enc(&event_id));
    assert_error(&alice.client.get(&wrong_room).await, 404, "M_NOT_FOUND");
    // Non-members cannot read it.
    let answer = carol.client.get(&path).await;
    assert!(answer.0 == 404 || answer.0 == 403, "{answer:?}");
}

#[tokio::test]
async fn messages_pagination_both_directions() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room_id = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room_id).await;
    let sent: Vec<String> = (0..25).map(|index| format!("m{index:02}")).collect();
    for (index, text) in sent.iter().enumerate() {
        if index % 5 == 4 {
            bob.send_text(&room_id, text).await
        } else {
            alice.send_text(&room_id, text).await
        };
    }
    // Backwards from the end, page by page, until the start of the room.
    let mut backwards: Vec<Value> = Vec::new();
    let mut from: Option<String> = None;
    let mut pages = 0;
    loop {
        let query = match &from {
            Some(from) => format!("dir=b&limit=7&from={from}"),
            None => "dir=b&limit=7".to_owned(),
        };
        let page = alice.messages(&room_id, &query).await;
        let chunk = page["chunk"].as_array().unwrap();
        assert!(chunk.len() <= 7);
        assert!(page["start"].is_string());
        backwards.extend(chunk.iter().cloned());
        pages += 1;
        assert!(pages < 20, "no end");
        match page["end"].as_str() {
            Some(end) => from = Some(end.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        backwards.last().unwrap()["type"],
        "m.room.create",
        "the start of the room is reached"
    );
    let mut texts = bodies(&backwards);
    texts.reverse();
    assert_eq!(texts, sent);
    // Forwards from the start.
    let mut forwards: Vec<Value> = Vec::new();
    let mut from: Option<String> = None;
    loop {
        let query = match &from {
            Some(from) => format!("dir=f&limit=6&from={from}"),
            None => "dir=f&limit=6".to_owned(),
        };
        let page = alice.messages(&room_id, &query).await;
        forwards.extend(page["chunk"].as_array().unwrap().iter().cloned());
        match page["end"].as_str() {
            Some(end) => from = Some(end.to_owned()),
            None => break,
        }
        assert!(forwards.len() < 200);
    }
    assert_eq!(forwards.first().unwrap()["type"], "m.room.create");
    assert_eq!(bodies(&forwards), sent);
    let mut reversed: Vec<&Value> = backwards.iter().collect();
    reversed.reverse();
    let forward_ids: Vec<&Value> = forwards.iter().map(|event| &event["event_id"]).collect();
    let backward_ids: Vec<&Value> = reversed.iter().map(|event| &event["event_id"]).collect();
    assert_eq!(forward_ids, backward_ids, "both directions see the same events");
    // from/to: a window. Take the token after the 10th message from a forward page, and the
    // token at the 15th.
    let sync = alice.sync(None, 0).await;
    let end_token = sync["next_batch"].as_str().unwrap();
    let all = alice.messages(&room_id, &format!("dir=b&limit=5&from={end_token}")).await;
    assert_eq!(
        bodies(all["chunk"].as_array().unwrap()),
        sent.iter().rev().take(5).cloned().collect::<Vec<_>>()
    );
    let window_start = all["end"].as_str().unwrap();
    let window = alice
        .messages(&room_id, &format!("dir=b&limit=50&from={end_token}&to={window_start}"))
        .await;
    assert_eq!(
        bodies(window["chunk"].as_array().unwrap()),
        sent.iter().rev().take(5).cloned().collect::<Vec<_>>()
    );
    let window = alice
        .messages(&room_id, &format!("dir=f&limit=50&from={window_start}&to={end_token}"))
        .await;
    assert_eq!(bodies(window["chunk"].as_array().unwrap()), sent[20..].to_vec());
    // filter on /messages.
    let filter = enc(&json!({"senders": [bob.user_id]}).to_string());
    let page = alice.messages(&room_id, &format!("dir=b&limit=50&filter={filter}")).await;
    let from_bob = bodies(page["chunk"].as_array().unwrap());
    assert_eq!(from_bob, vec!["m24", "m19", "m14", "m09", "m04"]);
    // limit=0 returns nothing; a huge limit is capped, not an error.
    let page = alice.messages(&room_id, "dir=b&limit=0").await;
    assert_eq!(page["chunk"], json!([]));
    let page = alice.messages(&room_id, "dir=b&limit=100000").await;
    assert!(page["chunk"].as_array().unwrap().len() > 25);
    // A non-member cannot read a room with shared history.
    let carol = server.register("carol").await;
    let answer =
        carol.client.get(&format!("/_matrix/client/v3/rooms/{}/messages", enc(&room_id))).await;
    assert_error(&answer, 403, "M_FORBIDDEN");
    // A member who left sees history up to their leave only.
    assert_ok(bob.room_post(&room_id, "leave", json!({})).await);
    alice.send_text(&room_id, "after bob left").await;
    let page = bob.messages(&room_id, "dir=b&limit=3").await;
    assert!(
        !bodies(page["chunk"].as_array().unwrap()).contains(&"after bob left".to_owned()),
        "{page}"
    );
}

#[tokio::test]
async fn context_around_an_event() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room_id = alice.create_room(json!({"name": "Context"})).await;
    let mut ids = Vec::new();
    for index in 0..11 {
        ids.push(alice.send_text(&room_id, &format!("c{index}")).await);
    }
    let path =
        format!("/_matrix/client/v3/rooms/{}/context/{}?limit=6", enc(&room_id), enc(&ids[5]));
    let context = assert_ok(alice.client.get(&path).await);
    assert_eq!(context["event"]["event_id"], ids[5]);
    let before = bodies(context["events_before"].as_array().unwrap());
    let after = bodies(context["events_after"].as_array().unwrap());
    assert_eq!(before, vec!["c4", "c3", "c2"], "events_before is newest first");
    assert_eq!(after, vec!["c6", "c7", "c8"]);
    let state = context["state"].as_array().unwrap();
    assert!(state.iter().any(|event| event["type"] == "m.room.name"), "{context}");
    // start and end continue with /messages.
    let older = alice
        .messages(&room_id, &format!("dir=b&limit=2&from={}", context["start"].as_str().unwrap()))
        .await;
    assert_eq!(bodies(older["chunk"].as_array().unwrap()), vec!["c1", "c0"]);
    let newer = alice
        .messages(&room_id, &format!("dir=f&limit=5&from={}", context["end"].as_str().unwrap()))
        .await;
    assert_eq!(bodies(newer["chunk"].as_array().unwrap()), vec!["c9", "c10"]);
    // Unknown event.
    let path = format!(
        "/_matrix/client/v3/rooms/{}/context/{}",
        enc(&room_id),
        enc("$unknown000000000000000000000000000000000000")
    );
    assert_error(&alice.client.get(&path).await, 404, "M_NOT_FOUND");
    let answer = alice
        .client
        .request_raw(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/context/{}", enc(&room_id), enc(&ids[0])),
            None,
        )
        .await;
    assert_eq!(answer.0, 405);
}

/// Many senders at once: every send succeeds, every event is stored once, `/messages` in both
/// directions and `/sync` agree on one order, and each sender's events keep their order.
#[tokio::test]
async fn concurrent_senders_agree_on_one_timeline() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room_id = alice.create_room(json!({"preset": "public_chat"})).await;
    let mut users = vec![alice];
    for name in ["bob", "carol", "dave"] {
        let user = server.register(name).await;
        user.join(&room_id).await;
        users.push(user);
    }
    let mut tasks = Vec::new();
    for (index, user) in users.iter().enumerate() {
        let client = user.client.clone();
        let room_id = room_id.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for count in 0..15 {
                let path = format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.message/c{count}",
                    enc(&room_id)
                );
                let answer = client
                    .put(&path, json!({"msgtype": "m.text", "body": format!("u{index} {count}")}))
                    .await;
                assert_eq!(answer.0, 200, "{answer:?}");
                ids.push(answer.1["event_id"].as_str().expect("event_id").to_owned());
            }
            ids
        }));
    }
    let mut sent = Vec::new();
    for task in tasks {
        sent.extend(task.await.expect("sender task"));
    }
    let forwards = users[0].messages(&room_id, "dir=f&limit=1000").await;
    let forward_ids: Vec<&str> = forwards["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter(|event| event["type"] == "m.room.message")
        .map(|event| event["event_id"].as_str().expect("event_id"))
        .collect();
    assert_eq!(forward_ids.len(), 60);
    let mut unique = forward_ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 60, "an event is stored twice");
    for id in &sent {
        assert!(forward_ids.contains(&id.as_str()), "{id} missing");
    }
    // Per sender, in sending order.
    let texts = bodies(forwards["chunk"].as_array().expect("chunk"));
    for index in 0..4 {
        let mine: Vec<&String> =
            texts.iter().filter(|text| text.starts_with(&format!("u{index} "))).collect();
        let expected: Vec<String> = (0..15).map(|count| format!("u{index} {count}")).collect();
        assert_eq!(mine, expected.iter().collect::<Vec<_>>());
    }
    let backwards = users[1].messages(&room_id, "dir=b&limit=1000").await;
    let mut backward_ids: Vec<&str> = backwards["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter(|event| event["type"] == "m.room.message")
        .map(|event| event["event_id"].as_str().expect("event_id"))
        .collect();
    backward_ids.reverse();
    assert_eq!(backward_ids, forward_ids);
    let filter = enc(&json!({"room": {"timeline": {"limit": 1000}}}).to_string());
    let sync = users[2].sync_query(&format!("filter={filter}")).await;
    let sync_ids: Vec<&str> = crate::harness::timeline(&sync, &room_id)
        .iter()
        .filter(|event| event["type"] == "m.room.message")
        .map(|event| event["event_id"].as_str().expect("event_id"))
        .collect();
    assert_eq!(sync_ids, forward_ids);
    // The room still takes events afterwards (the DAG's extremities are sound).
    users[3].send_text(&room_id, "after the rush").await;
    assert_ok(users[0].put_state(&room_id, "m.room.topic", "", json!({"topic": "calm"})).await);
}

/// A room whose history visibility is set from the start, with Alice in it.
async fn room_with_history_visibility(alice: &User, visibility: &str) -> String {
    alice
        .create_room(json!({"preset": "public_chat", "initial_state": [
            {"type": "m.room.history_visibility", "content": {"history_visibility": visibility}}
        ]}))
        .await
}

/// `joined`: what came before a member joined stays hidden from them.
///
/// [History visibility](https://spec.matrix.org/v1.16/client-server-api/#room-history-visibility)
#[tokio::test]
async fn history_visibility_joined() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room_id = room_with_history_visibility(&alice, "joined").await;
    alice.send_text(&room_id, "before bob").await;
    alice.send_text(&room_id, "before bob again").await;
    bob.join(&room_id).await;
    alice.send_text(&room_id, "after bob").await;
    alice.send_text(&room_id, "after bob again").await;
    let page = bob.messages(&room_id, "dir=b&limit=100").await;
    assert_eq!(
        bodies(page["chunk"].as_array().expect("chunk")),
        vec!["after bob again", "after bob"],
        "{page}"
    );
    // Messages in a row share a state snapshot, whose answer the sync timeline reuses: on
    // both sides of the join it must be that snapshot's own.
    let sync = bob.sync(None, 0).await;
    let seen = bodies(crate::harness::timeline(&sync, &room_id));
    assert!(!seen.contains(&"before bob".to_owned()), "{sync}");
    assert!(!seen.contains(&"before bob again".to_owned()), "{sync}");
    assert!(seen.contains(&"after bob".to_owned()), "{sync}");
    assert!(seen.contains(&"after bob again".to_owned()), "{sync}");
    let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=f&limit=100", enc(&room_id));
    let forwards = assert_ok(bob.client.get(&path).await);
    assert!(
        !bodies(forwards["chunk"].as_array().expect("chunk")).contains(&"before bob".to_owned())
    );
}

/// `invited`: visible from the member's invite on.
#[tokio::test]
async fn history_visibility_invited() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let carol = server.register("carol").await;
    let room_id = room_with_history_visibility(&alice, "invited").await;
    alice.send_text(&room_id, "before the invite").await;
    alice.invite(&room_id, &carol.user_id).await;
    alice.send_text(&room_id, "between invite and join").await;
    carol.join(&room_id).await;
    let page = carol.messages(&room_id, "dir=b&limit=100").await;
    let seen = bodies(page["chunk"].as_array().expect("chunk"));
    assert!(seen.contains(&"between invite and join".to_owned()), "{page}");
    assert!(!seen.contains(&"before the invite".to_owned()), "{page}");
}

/// `world_readable`: anyone, member or not, reads the history; `shared` (the default of
/// public_chat) lets a new member read what came before they joined.
#[tokio::test]
async fn history_visibility_world_readable_and_shared() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let dave = server.register("dave").await;
    let room_id = room_with_history_visibility(&alice, "world_readable").await;
    alice.send_text(&room_id, "for everyone").await;
    let page = dave.messages(&room_id, "dir=b&limit=100").await;
    assert_eq!(bodies(page["chunk"].as_array().expect("chunk")), vec!["for everyone"]);
    let shared = alice.create_room(json!({"preset": "public_chat"})).await;
    alice.send_text(&shared, "said before dave").await;
    dave.join(&shared).await;
    let page = dave.messages(&shared, "dir=b&limit=100").await;
    assert!(
        bodies(page["chunk"].as_array().expect("chunk")).contains(&"said before dave".to_owned())
    );
}

/// Invites that cannot work: an unknown local user, an inviter who is not in the room, a user
/// who is already joined.
#[tokio::test]
async fn invite_errors() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room_id = alice.create_room(json!({"preset": "private_chat"})).await;
    let answer = alice.room_post(&room_id, "invite", json!({"user_id": "@nobody:localhost"})).await;
    assert_error(&answer, 404, "M_NOT_FOUND");
    let answer = bob.room_post(&room_id, "invite", json!({"user_id": carol.user_id})).await;
    assert_error(&answer, 403, "M_FORBIDDEN");
    alice.invite(&room_id, &bob.user_id).await;
    bob.join(&room_id).await;
    let answer = alice.room_post(&room_id, "invite", json!({"user_id": bob.user_id})).await;
    assert_error(&answer, 403, "M_FORBIDDEN");
    assert_eq!(membership(&alice, &room_id, &bob.user_id).await.as_deref(), Some("join"));
    // The invitee may reject by leaving; the invite then shows as leave.
    alice.invite(&room_id, &carol.user_id).await;
    assert_ok(carol.room_post(&room_id, "leave", json!({})).await);
    assert_eq!(membership(&alice, &room_id, &carol.user_id).await.as_deref(), Some("leave"));
}

/// Another member's client learns of a redaction through sync, and later syncs serve the
/// redacted event without its content.
#[tokio::test]
async fn redaction_reaches_other_members_through_sync() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room_id = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room_id).await;
    let event_id = alice.send_text(&room_id, "secret").await;
    let since = bob
        .sync_until(None, |sync| crate::harness::timeline_has(sync, &room_id, &event_id))
        .await["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned();
    let path = format!("/_matrix/client/v3/rooms/{}/redact/{}/r1", enc(&room_id), enc(&event_id));
    let redaction = assert_ok(alice.client.put(&path, json!({})).await)["event_id"]
        .as_str()
        .expect("event_id")
        .to_owned();
    let answer = bob
        .sync_until(Some(since), |sync| crate::harness::timeline_has(sync, &room_id, &redaction))
        .await;
    let event = crate::harness::timeline(&answer, &room_id)
        .iter()
        .find(|event| event["event_id"] == redaction)
        .expect("redaction");
    assert_eq!(event["type"], "m.room.redaction");
    let initial = bob.sync(None, 0).await;
    let original = crate::harness::timeline(&initial, &room_id)
        .iter()
        .find(|event| event["event_id"] == event_id)
        .expect("the redacted event is still in the timeline");
    assert_eq!(original["content"], json!({}), "{original}");
    assert_eq!(original["unsigned"]["redacted_because"]["event_id"], redaction);
}
