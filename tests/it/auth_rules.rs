//! Authorization by the room's auth rules: power levels decide who may change state, kick,
//! ban, redact and invite; join rules and bans decide who may join; and a rejected event never
//! enters the room.
//!
//! [Authorization rules](https://spec.matrix.org/v1.16/rooms/v11/#authorization-rules),
//! [`m.room.power_levels`](https://spec.matrix.org/v1.16/client-server-api/#mroompower_levels)

use serde_json::{Value, json};

use crate::harness::{TestServer, User, assert_error, assert_ok, enc, state_path, timeline};

async fn redact(user: &User, room_id: &str, event_id: &str, txn: &str) -> (u16, Value) {
    user.client
        .put(
            &format!("/_matrix/client/v3/rooms/{}/redact/{}/{txn}", enc(room_id), enc(event_id)),
            json!({}),
        )
        .await
}

async fn set_user_level(admin: &User, room_id: &str, user_id: &str, level: i64) {
    let mut levels =
        assert_ok(admin.client.get(&state_path(room_id, "m.room.power_levels", "")).await);
    levels["users"][user_id] = json!(level);
    assert_ok(admin.put_state(room_id, "m.room.power_levels", "", levels).await);
}

/// A public room created by Alice (100) that Bob (0) and Carol (0) joined.
async fn room_of_three(server: &TestServer) -> (User, User, User, String) {
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room_id = alice.create_room(json!({"preset": "public_chat", "name": "Rules"})).await;
    bob.join(&room_id).await;
    carol.join(&room_id).await;
    (alice, bob, carol, room_id)
}

#[tokio::test]
async fn default_user_cannot_do_moderator_things_until_raised() {
    let server = TestServer::start().await;
    let (alice, bob, carol, room_id) = room_of_three(&server).await;
    let carol_message = carol.send_text(&room_id, "carol's words").await;

    // Bob at 0 may talk but not change the name (50), kick (50), ban (50) or redact others (50).
    bob.send_text(&room_id, "i can talk").await;
    assert_error(
        &bob.put_state(&room_id, "m.room.name", "", json!({"name": "Bob's"})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_error(
        &bob.put_state(&room_id, "m.room.topic", "", json!({"topic": "Bob's"})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_error(
        &bob.room_post(&room_id, "kick", json!({"user_id": carol.user_id})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_error(
        &bob.room_post(&room_id, "ban", json!({"user_id": carol.user_id})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_error(&redact(&bob, &room_id, &carol_message, "r1").await, 403, "M_FORBIDDEN");
    assert_error(
        &bob.put_state(
            &room_id,
            "m.room.power_levels",
            "",
            json!({"users": {bob.user_id.clone(): 100}}),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );
    // But may redact his own events.
    let own = bob.send_text(&room_id, "mine").await;
    assert_ok(redact(&bob, &room_id, &own, "r2").await);
    // Nothing Bob tried changed anything.
    let name = assert_ok(alice.client.get(&state_path(&room_id, "m.room.name", "")).await);
    assert_eq!(name["name"], "Rules");
    let carol_state =
        assert_ok(alice.client.get(&state_path(&room_id, "m.room.member", &carol.user_id)).await);
    assert_eq!(carol_state["membership"], "join");
    let carol_event = assert_ok(
        alice
            .client
            .get(&format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room_id),
                enc(&carol_message)
            ))
            .await,
    );
    assert_eq!(carol_event["content"]["body"], "carol's words");

    // Raised to 50, Bob is a moderator.
    set_user_level(&alice, &room_id, &bob.user_id, 50).await;
    assert_ok(bob.put_state(&room_id, "m.room.name", "", json!({"name": "Bob's"})).await);
    assert_ok(redact(&bob, &room_id, &carol_message, "r3").await);
    assert_ok(bob.room_post(&room_id, "kick", json!({"user_id": carol.user_id})).await);
    carol.join(&room_id).await;
    assert_ok(bob.room_post(&room_id, "ban", json!({"user_id": carol.user_id})).await);
    // He still cannot touch the power levels (100) or ban someone with more power.
    let mut levels =
        assert_ok(alice.client.get(&state_path(&room_id, "m.room.power_levels", "")).await);
    levels["users"][&bob.user_id] = json!(100);
    assert_error(
        &bob.put_state(&room_id, "m.room.power_levels", "", levels).await,
        403,
        "M_FORBIDDEN",
    );
    assert_error(
        &bob.room_post(&room_id, "ban", json!({"user_id": alice.user_id})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_error(
        &bob.room_post(&room_id, "kick", json!({"user_id": alice.user_id})).await,
        403,
        "M_FORBIDDEN",
    );
    let alice_state =
        assert_ok(bob.client.get(&state_path(&room_id, "m.room.member", &alice.user_id)).await);
    assert_eq!(alice_state["membership"], "join");
}

#[tokio::test]
async fn cannot_ban_or_kick_equal_or_higher_power() {
    let server = TestServer::start().await;
    let (alice, bob, carol, room_id) = room_of_three(&server).await;
    set_user_level(&alice, &room_id, &bob.user_id, 50).await;
    set_user_level(&alice, &room_id, &carol.user_id, 50).await;
    // Equal power: neither may kick or ban the other.
    assert_error(
        &bob.room_post(&room_id, "ban", json!({"user_id": carol.user_id})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_error(
        &bob.room_post(&room_id, "kick", json!({"user_id": carol.user_id})).await,
        403,
        "M_FORBIDDEN",
    );
    // A moderator cannot raise someone above themself or lower a peer.
    let mut levels =
        assert_ok(alice.client.get(&state_path(&room_id, "m.room.power_levels", "")).await);
    levels["users"][&carol.user_id] = json!(0);
    assert_error(
        &bob.put_state(&room_id, "m.room.power_levels", "", levels).await,
        403,
        "M_FORBIDDEN",
    );
    // The admin may.
    assert_ok(alice.room_post(&room_id, "ban", json!({"user_id": carol.user_id})).await);
}

#[tokio::test]
async fn events_default_and_per_event_levels() {
    let server = TestServer::start().await;
    let (alice, bob, _carol, room_id) = room_of_three(&server).await;
    let mut levels =
        assert_ok(alice.client.get(&state_path(&room_id, "m.room.power_levels", "")).await);
    levels["events_default"] = json!(10);
    levels["events"]["org.example.open"] = json!(0);
    levels["events"]["m.room.topic"] = json!(0);
    assert_ok(alice.put_state(&room_id, "m.room.power_levels", "", levels).await);
    assert_error(
        &bob.send_txn(&room_id, "t1", json!({"msgtype": "m.text", "body": "muted"})).await,
        403,
        "M_FORBIDDEN",
    );
    let open = bob
        .client
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/org.example.open/t2", enc(&room_id)),
            json!({}),
        )
        .await;
    assert_ok(open);
    assert_ok(bob.put_state(&room_id, "m.room.topic", "", json!({"topic": "anyone may"})).await);
    // Invite needs `invite` (0 by default in public_chat): raise it.
    let dave = server.register("dave").await;
    let mut levels =
        assert_ok(alice.client.get(&state_path(&room_id, "m.room.power_levels", "")).await);
    levels["invite"] = json!(50);
    assert_ok(alice.put_state(&room_id, "m.room.power_levels", "", levels).await);
    let answer = bob.room_post(&room_id, "invite", json!({"user_id": dave.user_id})).await;
    assert_error(&answer, 403, "M_FORBIDDEN");
}

#[tokio::test]
async fn join_rules_and_bans() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let private = alice.create_room(json!({"preset": "private_chat"})).await;
    // No invite: no join.
    assert_error(
        &bob.client.post(&format!("/_matrix/client/v3/join/{}", enc(&private)), json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    // A non-member cannot send or invite themselves.
    assert_error(
        &bob.send_txn(&private, "t", json!({"msgtype": "m.text", "body": "x"})).await,
        403,
        "M_FORBIDDEN",
    );
    let member =
        bob.put_state(&private, "m.room.member", &bob.user_id, json!({"membership": "join"})).await;
    assert_error(&member, 403, "M_FORBIDDEN");
    // After an invite, join works; after a ban, not even an invite helps.
    alice.invite(&private, &bob.user_id).await;
    bob.join(&private).await;
    assert_ok(alice.room_post(&private, "ban", json!({"user_id": bob.user_id})).await);
    assert_error(
        &bob.client.post(&format!("/_matrix/client/v3/join/{}", enc(&private)), json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_error(
        &alice.room_post(&private, "invite", json!({"user_id": bob.user_id})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_error(
        &bob.send_txn(&private, "t2", json!({"msgtype": "m.text", "body": "x"})).await,
        403,
        "M_FORBIDDEN",
    );
    // A banned user of a public room cannot join either.
    let public = alice.create_room(json!({"preset": "public_chat"})).await;
    let carol = server.register("carol").await;
    carol.join(&public).await;
    assert_ok(alice.room_post(&public, "ban", json!({"user_id": carol.user_id})).await);
    assert_error(
        &carol.client.post(&format!("/_matrix/client/v3/join/{}", enc(&public)), json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    // A user cannot set someone else's membership to join.
    let dave = server.register("dave").await;
    let answer = alice
        .put_state(&public, "m.room.member", &dave.user_id, json!({"membership": "join"}))
        .await;
    assert_error(&answer, 403, "M_FORBIDDEN");
    // A second m.room.create is always rejected (content differs from the first one, so this
    // is not an idempotent resend).
    let create = alice
        .put_state(&public, "m.room.create", "", json!({"room_version": "11", "m.federate": false}))
        .await;
    assert_error(&create, 403, "M_FORBIDDEN");
    let current = assert_ok(alice.client.get(&state_path(&public, "m.room.create", "")).await);
    assert!(current.get("m.federate").is_none(), "{current}");
}

#[tokio::test]
async fn invalid_power_levels_are_rejected_in_v10_plus() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room_id = alice.create_room(json!({"room_version": "11"})).await;
    let mut levels =
        assert_ok(alice.client.get(&state_path(&room_id, "m.room.power_levels", "")).await);
    levels["users"][&alice.user_id] = json!("100");
    let answer = alice.put_state(&room_id, "m.room.power_levels", "", levels).await;
    assert!(answer.0 == 400 || answer.0 == 403, "string power levels in v11: {answer:?}");
    let levels =
        assert_ok(alice.client.get(&state_path(&room_id, "m.room.power_levels", "")).await);
    assert_eq!(levels["users"][&alice.user_id], 100);
}

#[tokio::test]
async fn rejected_events_never_appear() {
    let server = TestServer::start().await;
    let (alice, bob, carol, room_id) = room_of_three(&server).await;
    let since = carol.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let bob_since = bob.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    // Rejected: a name change, a kick and a power-level grab by Bob.
    assert_error(
        &bob.put_state(&room_id, "m.room.name", "", json!({"name": "hijacked"})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_error(
        &bob.room_post(&room_id, "kick", json!({"user_id": carol.user_id})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_error(
        &bob.put_state(
            &room_id,
            "m.room.power_levels",
            "",
            json!({"users": {bob.user_id.clone(): 100}}),
        )
        .await,
        403,
        "M_FORBIDDEN",
    );
    // Then a legitimate message marks the end.
    let marker = alice.send_text(&room_id, "marker").await;
    let answer = carol
        .sync_until(Some(since.clone()), |sync| {
            timeline(sync, &room_id).iter().any(|event| event["event_id"] == marker)
        })
        .await;
    let is_rejected = |event: &Value| {
        event["content"]["name"] == "hijacked"
            || (event["type"] == "m.room.member"
                && event["state_key"] == carol.user_id
                && event["content"]["membership"] == "leave")
            || (event["type"] == "m.room.power_levels" && event["sender"] == bob.user_id)
    };
    let events: Vec<&Value> = timeline(&answer, &room_id).iter().collect();
    assert!(!events.iter().any(|event| is_rejected(event)), "rejected event in sync: {answer}");
    assert_eq!(events.len(), 1, "only the marker is new: {answer}");
    // Nor for the sender.
    let answer = bob
        .sync_until(Some(bob_since), |sync| {
            timeline(sync, &room_id).iter().any(|event| event["event_id"] == marker)
        })
        .await;
    assert!(!timeline(&answer, &room_id).iter().any(is_rejected), "{answer}");
    // Nor in /messages, nor in the state.
    let page = carol.messages(&room_id, "dir=b&limit=100").await;
    assert!(
        !page["chunk"].as_array().unwrap().iter().any(is_rejected),
        "rejected event in /messages: {page}"
    );
    let state = assert_ok(
        carol.client.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(&room_id))).await,
    );
    assert!(!state.as_array().unwrap().iter().any(is_rejected), "{state}");
    // And the room goes on: the next event builds on the accepted ones.
    let after = bob.send_text(&room_id, "still fine").await;
    let event = assert_ok(
        carol
            .client
            .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room_id), enc(&after)))
            .await,
    );
    assert_eq!(event["content"]["body"], "still fine");
}
