//! Two real Hearth servers on 127.0.0.2 and 127.0.0.3 (TLS, a test CA, names with explicit
//! ports) federating through the client API only: users join rooms of the other server both
//! ways, exchange 100 messages each way in order, see each other type, read and change
//! presence, invite, kick, ban and leave across servers.
//!
//! [Joining rooms](https://spec.matrix.org/v1.16/server-server-api/#joining-rooms),
//! [transactions](https://spec.matrix.org/v1.16/server-server-api/#transactions),
//! [inviting](https://spec.matrix.org/v1.16/server-server-api/#inviting-to-a-room)

use std::time::Duration;

use serde_json::{Value, json};

use crate::{
    federation_transport::{Pki, start_on},
    harness::{User, bodies, enc},
};

/// The message bodies of a room as `user` sees them through `/messages`, oldest first.
async fn room_bodies(user: &User, room_id: &str) -> Vec<String> {
    let messages = user.messages(room_id, "dir=b&limit=1000").await;
    let mut found = bodies(messages["chunk"].as_array().map(Vec::as_slice).unwrap_or_default());
    found.reverse();
    found
}

/// Polls until `check` holds on what `probe` returns (or panics after 30 s).
async fn eventually<T: std::fmt::Debug, F: std::future::Future<Output = T>>(
    what: &str,
    mut probe: impl FnMut() -> F,
    check: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let value = probe().await;
        if check(&value) {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: not in time; last: {value:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `user`'s membership in a room, as their own server's state says.
async fn membership_of(viewer: &User, room_id: &str, user_id: &str) -> Option<String> {
    let (status, content) = viewer
        .client
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.member/{}",
            enc(room_id),
            enc(user_id)
        ))
        .await;
    (status == 200).then(|| content["membership"].as_str().unwrap_or_default().to_owned())
}

/// The ephemeral events of one type in a room of a sync answer.
fn ephemeral_of(sync: &Value, room_id: &str, kind: &str) -> Vec<Value> {
    sync["rooms"]["join"][room_id]["ephemeral"]["events"]
        .as_array()
        .map(|events| events.iter().filter(|event| event["type"] == kind).cloned().collect())
        .unwrap_or_default()
}

async fn join_via(user: &User, room_id: &str, server: &str) -> (u16, Value) {
    user.client
        .post(
            &format!("/_matrix/client/v3/join/{}?server_name={}", enc(room_id), enc(server)),
            json!({}),
        )
        .await
}

#[tokio::test]
async fn two_hearths_join_talk_and_moderate_across_servers() {
    let pki = Pki::new();
    let a = start_on(&pki, "127.0.0.2").await;
    let b = start_on(&pki, "127.0.0.3").await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;

    // Bob on B joins alice's public room on A.
    let room_id = alice.create_room(json!({"preset": "public_chat", "name": "Pair"})).await;
    let (status, answer) = join_via(&bob, &room_id, &a.server_name).await;
    assert_eq!(status, 200, "remote join: {answer}");
    assert_eq!(answer["room_id"], room_id.as_str());
    // B has the room's state; A has bob's join.
    let (status, name) = bob
        .client
        .get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room_id)))
        .await;
    assert_eq!((status, name["name"].as_str()), (200, Some("Pair")), "{name}");
    assert_eq!(membership_of(&bob, &room_id, &alice.user_id).await.as_deref(), Some("join"));
    assert_eq!(membership_of(&alice, &room_id, &bob.user_id).await.as_deref(), Some("join"));
    let (_, joined) = bob.client.get("/_matrix/client/v3/joined_rooms").await;
    assert_eq!(joined["joined_rooms"], json!([room_id]), "{joined}");

    // Bob's new device keys reach alice's server: she sees him in device_lists.changed, and
    // her keys/query asks B for them.
    let since = alice.sync(None, 0).await["next_batch"].as_str().expect("next_batch").to_owned();
    let (status, answer) = bob
        .client
        .post(
            "/_matrix/client/v3/keys/upload",
            json!({"device_keys": crate::e2ee::device_keys(&bob)}),
        )
        .await;
    assert_eq!(status, 200, "keys/upload: {answer}");
    alice
        .sync_until(Some(since), |sync| {
            sync["device_lists"]["changed"]
                .as_array()
                .is_some_and(|changed| changed.iter().any(|user| user == bob.user_id.as_str()))
        })
        .await;
    let (status, keys) = alice
        .client
        .post("/_matrix/client/v3/keys/query", json!({"device_keys": {&bob.user_id: []}}))
        .await;
    assert_eq!(status, 200, "keys/query: {keys}");
    assert!(keys["device_keys"][&bob.user_id][&bob.device_id].is_object(), "{keys}");

    // 100 messages each way; each side sees both senders' messages in their order.
    for n in 0..100 {
        alice.send_text(&room_id, &format!("a{n}")).await;
        bob.send_text(&room_id, &format!("b{n}")).await;
    }
    let expected_a: Vec<String> = (0..100).map(|n| format!("a{n}")).collect();
    let expected_b: Vec<String> = (0..100).map(|n| format!("b{n}")).collect();
    for (viewer, name) in [(&alice, "alice"), (&bob, "bob")] {
        let seen = eventually(
            &format!("{name} sees all 200 messages"),
            || room_bodies(viewer, &room_id),
            |seen| seen.len() >= 200,
        )
        .await;
        let from_a: Vec<String> =
            seen.iter().filter(|body| body.starts_with('a')).cloned().collect();
        let from_b: Vec<String> =
            seen.iter().filter(|body| body.starts_with('b')).cloned().collect();
        assert_eq!(from_a, expected_a, "{name}'s view of alice's messages");
        assert_eq!(from_b, expected_b, "{name}'s view of bob's messages");
    }
    // Bob's sync shows alice's messages in the room's timeline too.
    let sync = bob.sync(None, 0).await;
    assert!(sync["rooms"]["join"][&room_id]["timeline"]["events"].is_array(), "{sync}");

    // Typing and read receipts both ways, through each side's /sync.
    let last = {
        let messages = alice.messages(&room_id, "dir=b&limit=1").await;
        messages["chunk"][0]["event_id"].as_str().expect("an event").to_owned()
    };
    for (from, to) in [(&alice, &bob), (&bob, &alice)] {
        let (status, answer) = from
            .client
            .put(
                &format!(
                    "/_matrix/client/v3/rooms/{}/typing/{}",
                    enc(&room_id),
                    enc(&from.user_id)
                ),
                json!({"typing": true, "timeout": 20_000}),
            )
            .await;
        assert_eq!(status, 200, "typing: {answer}");
        to.sync_until(None, |sync| {
            ephemeral_of(sync, &room_id, "m.typing").iter().any(|event| {
                event["content"]["user_ids"]
                    .as_array()
                    .is_some_and(|users| users.iter().any(|user| user == from.user_id.as_str()))
            })
        })
        .await;
        let (status, answer) = from
            .client
            .post(
                &format!(
                    "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
                    enc(&room_id),
                    enc(&last)
                ),
                json!({}),
            )
            .await;
        assert_eq!(status, 200, "receipt: {answer}");
        to.sync_until(None, |sync| {
            ephemeral_of(sync, &room_id, "m.receipt")
                .iter()
                .any(|event| event["content"][&last]["m.read"].get(&from.user_id).is_some())
        })
        .await;
        // Presence: the other side's users see it in `presence` and through the presence API.
        let status_msg = format!("busy on {}", from.user_id);
        let (status, answer) = from
            .client
            .put(
                &format!("/_matrix/client/v3/presence/{}/status", enc(&from.user_id)),
                json!({"presence": "unavailable", "status_msg": status_msg}),
            )
            .await;
        assert_eq!(status, 200, "presence: {answer}");
        to.sync_until(None, |sync| {
            sync["presence"]["events"].as_array().into_iter().flatten().any(|event| {
                event["sender"] == from.user_id.as_str()
                    && event["content"]["presence"] == "unavailable"
                    && event["content"]["status_msg"] == status_msg.as_str()
            })
        })
        .await;
        let path = format!("/_matrix/client/v3/presence/{}/status", enc(&from.user_id));
        let (status, answer) = to.client.get(&path).await;
        assert_eq!(status, 200, "presence of a remote user: {answer}");
        assert_eq!(answer["presence"], "unavailable", "{answer}");
        assert_eq!(answer["status_msg"], status_msg.as_str(), "{answer}");
    }

    // The other way: alice on A joins bob's room on B.
    let bobs_room = bob.create_room(json!({"preset": "public_chat", "name": "Bob's"})).await;
    let (status, answer) = join_via(&alice, &bobs_room, &b.server_name).await;
    assert_eq!(status, 200, "remote join: {answer}");
    let hello = alice.send_text(&bobs_room, "hello from A").await;
    eventually(
        "bob sees alice's message",
        || room_bodies(&bob, &bobs_room),
        |seen| seen.contains(&"hello from A".to_owned()),
    )
    .await;
    let _ = hello;

    // A private room: alice invites carol on B, carol sees the invite and joins.
    let carol = b.register("carol").await;
    let private = alice.create_room(json!({"preset": "private_chat", "name": "Secret"})).await;
    alice.invite(&private, &carol.user_id).await;
    carol.sync_until(None, |sync| sync["rooms"]["invite"].get(&private).is_some()).await;
    let (status, answer) = carol
        .client
        .post(&format!("/_matrix/client/v3/rooms/{}/join", enc(&private)), json!({}))
        .await;
    assert_eq!(status, 200, "join after a remote invite: {answer}");
    eventually(
        "alice sees carol join",
        || membership_of(&alice, &private, &carol.user_id),
        |m| m.as_deref() == Some("join"),
    )
    .await;
    carol.send_text(&private, "thanks").await;
    eventually(
        "alice sees carol's message",
        || room_bodies(&alice, &private),
        |seen| seen.contains(&"thanks".to_owned()),
    )
    .await;

    // Kick: bob is removed from alice's room and B learns it.
    let (status, answer) =
        alice.room_post(&room_id, "kick", json!({"user_id": bob.user_id, "reason": "test"})).await;
    assert_eq!(status, 200, "kick: {answer}");
    eventually(
        "B sees bob kicked",
        || membership_of(&bob, &room_id, &bob.user_id),
        |m| m.as_deref() == Some("leave"),
    )
    .await;
    // Bob may rejoin the public room (through A, since B no longer has a local member).
    let (status, answer) = join_via(&bob, &room_id, &a.server_name).await;
    assert_eq!(status, 200, "rejoin: {answer}");
    eventually(
        "alice sees bob back",
        || membership_of(&alice, &room_id, &bob.user_id),
        |m| m.as_deref() == Some("join"),
    )
    .await;

    // Ban: carol is banned from the private room and cannot come back.
    let (status, answer) =
        alice.room_post(&private, "ban", json!({"user_id": carol.user_id})).await;
    assert_eq!(status, 200, "ban: {answer}");
    eventually(
        "B sees carol banned",
        || membership_of(&carol, &private, &carol.user_id),
        |m| m.as_deref() == Some("ban"),
    )
    .await;
    let (status, answer) = join_via(&carol, &private, &a.server_name).await;
    assert_eq!(status, 403, "a banned user's join: {answer}");
    assert_eq!(answer["errcode"], "M_FORBIDDEN", "{answer}");

    // Leave: bob leaves alice's room; A sees it.
    let (status, answer) = bob.room_post(&room_id, "leave", json!({})).await;
    assert_eq!(status, 200, "leave: {answer}");
    eventually(
        "alice sees bob leave",
        || membership_of(&alice, &room_id, &bob.user_id),
        |m| m.as_deref() == Some("leave"),
    )
    .await;

    // Rejecting a remote invite to a room B is not in.
    let dave = b.register("dave").await;
    let another = alice.create_room(json!({"preset": "private_chat"})).await;
    alice.invite(&another, &dave.user_id).await;
    dave.sync_until(None, |sync| sync["rooms"]["invite"].get(&another).is_some()).await;
    let (status, answer) = dave.room_post(&another, "leave", json!({})).await;
    assert_eq!(status, 200, "reject: {answer}");
    eventually(
        "alice sees dave's rejection",
        || membership_of(&alice, &another, &dave.user_id),
        |m| m.as_deref() == Some("leave"),
    )
    .await;
    let sync = dave.sync(None, 0).await;
    assert!(sync["rooms"]["invite"].get(&another).is_none(), "{sync}");

    b.stop().await;
    a.stop().await;
}

/// Invitees named in `createRoom` who are on another server are invited through their server
/// (`invite` v2), like those of `/invite`: they see the invite with the room's stripped state
/// (its encryption too, which clients need to set up E2EE) and can join. An unreachable
/// server does not fail the room's creation; its user is just not invited.
#[tokio::test]
async fn invitees_of_create_room_on_another_server_get_the_invite() {
    let pki = Pki::new();
    let a = start_on(&pki, "127.0.0.2").await;
    let b = start_on(&pki, "127.0.0.3").await;
    let alice = a.register("alice").await;
    let carol = a.register("carol").await;
    let bob = b.register("bob").await;
    // Nothing listens on port 1, so that server refuses at once.
    let unreachable = "@nobody:127.0.0.4:1";

    let room_id = alice
        .create_room(json!({
            "preset": "private_chat",
            "is_direct": true,
            "invite": [bob.user_id, carol.user_id, unreachable],
            "initial_state": [{
                "type": "m.room.encryption",
                "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2"},
            }],
        }))
        .await;

    let sync = bob.sync_until(None, |sync| sync["rooms"]["invite"].get(&room_id).is_some()).await;
    let invite_state = &sync["rooms"]["invite"][&room_id]["invite_state"]["events"];
    let stripped = |kind: &str, state_key: &str| {
        invite_state.as_array().and_then(|events| {
            events.iter().find(|event| event["type"] == kind && event["state_key"] == state_key)
        })
    };
    let encryption = stripped("m.room.encryption", "").expect("encryption in the invite state");
    assert_eq!(encryption["content"]["algorithm"], "m.megolm.v1.aes-sha2", "{invite_state}");
    let invite = stripped("m.room.member", &bob.user_id).expect("bob's invite in its state");
    assert_eq!(invite["content"]["is_direct"], true, "{invite}");
    carol.sync_until(None, |sync| sync["rooms"]["invite"].get(&room_id).is_some()).await;
    assert_eq!(membership_of(&alice, &room_id, unreachable).await, None);

    let (status, answer) = bob
        .client
        .post(&format!("/_matrix/client/v3/rooms/{}/join", enc(&room_id)), json!({}))
        .await;
    assert_eq!(status, 200, "join after a createRoom invite: {answer}");
    eventually(
        "alice sees bob join",
        || membership_of(&alice, &room_id, &bob.user_id),
        |membership| membership.as_deref() == Some("join"),
    )
    .await;

    b.stop().await;
    a.stop().await;
}
