//! Restarts while the other server keeps sending: what A queued for a B that was down reaches
//! B once it is back (A's outbound queue waits out the outage), what A queued survives A's own
//! restart, and in the end both servers hold the same room state and the same events.
//!
//! [Transactions](https://spec.matrix.org/v1.16/server-server-api/#transactions)

use std::{collections::BTreeSet, time::Duration};

use serde_json::{Value, json};

use crate::{
    federation_transport::{Pki, start_on, start_on_port},
    harness::{User, enc},
};

/// Every message id of the room in `user`'s `/messages`, and the current state as
/// (type, state_key) -> event id.
async fn room_view(
    user: &User,
    room_id: &str,
) -> (BTreeSet<String>, BTreeSet<(String, String, String)>) {
    let messages = user.messages(room_id, "dir=b&limit=1000").await;
    let events = messages["chunk"]
        .as_array()
        .into_iter()
        .flatten()
        // B joined later: the history before its join is not in its timeline.
        .filter(|event| event["type"] == "m.room.message")
        .filter_map(|event| event["event_id"].as_str().map(str::to_owned))
        .collect();
    let (status, state) =
        user.client.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(room_id))).await;
    assert_eq!(status, 200, "state: {state}");
    let state = state
        .as_array()
        .into_iter()
        .flatten()
        .map(|event: &Value| {
            let text = |key: &str| event[key].as_str().unwrap_or_default().to_owned();
            (text("type"), text("state_key"), text("event_id"))
        })
        .collect();
    (events, state)
}

/// Waits until both users see the same events and state, with at least `events_min` events.
async fn converge(a: &User, b: &User, room_id: &str, events_min: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    loop {
        let view_a = room_view(a, room_id).await;
        let view_b = room_view(b, room_id).await;
        if view_a == view_b && view_a.0.len() >= events_min {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the servers did not converge: A has {} events, B has {}; state equal: {}",
            view_a.0.len(),
            view_b.0.len(),
            view_a.1 == view_b.1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn nothing_is_lost_when_either_server_restarts() {
    let pki = Pki::new();
    let a = start_on(&pki, "127.0.0.4").await;
    let b = start_on(&pki, "127.0.0.5").await;
    let (a_port, b_port) = (a.port(), b.port());
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let room_id = alice.create_room(json!({"preset": "public_chat"})).await;
    let (status, answer) = bob
        .client
        .post(
            &format!("/_matrix/client/v3/join/{}?via={}", enc(&room_id), enc(&a.server_name)),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "join: {answer}");
    alice.send_text(&room_id, "before").await;
    converge(&alice, &bob, &room_id, 1).await;

    // B goes down; A keeps sending into the room.
    let b_data = b.stop().await.expect("B's data directory");
    for n in 0..20 {
        alice.send_text(&room_id, &format!("while B was down {n}")).await;
    }
    // A goes down too, with those messages still queued for B.
    let a_data = a.stop().await.expect("A's data directory");
    let b = start_on_port(&pki, "127.0.0.5", b_port, b_data.path().to_path_buf()).await;
    let bob = bob.on(&b);
    // B talks meanwhile: its message waits for A.
    bob.send_text(&room_id, "while A was down").await;
    let a = start_on_port(&pki, "127.0.0.4", a_port, a_data.path().to_path_buf()).await;
    let alice = alice.on(&a);

    // Both queues drain after the restarts; both sides end with the same room.
    converge(&alice, &bob, &room_id, 22).await;
    let (events, _) = room_view(&bob, &room_id).await;
    assert!(events.len() == 22, "{events:?}");
    b.stop().await;
    a.stop().await;
    drop((a_data, b_data));
}
