//! Dehydrated devices (MSC3814, unstable prefix): a user sets one with its keys; other users
//! query and claim its keys and send it room keys as to-device messages; a later login reads
//! them a page at a time (nothing deleted, so a cut-short rehydration can start over, and
//! across a restart); replacing or deleting the device removes the old one everywhere; bad
//! requests get the MSC's errors and change nothing.

use serde_json::{Value, json};

use crate::harness::{TestServer, User, assert_error, assert_ok, enc};

const DEHYDRATED: &str = "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device";

fn events_path(device_id: &str) -> String {
    format!("{DEHYDRATED}/{}/events", enc(device_id))
}

/// The body of `PUT /dehydrated_device` for `device_id` of `user`.
fn dehydrated_body(user: &User, device_id: &str, pickle: &str) -> Value {
    json!({
        "device_id": device_id,
        "device_data": {"algorithm": "org.matrix.msc3814.v1.olm", "device_pickle": pickle},
        "initial_device_display_name": "Dehydrated device",
        "device_keys": {
            "user_id": user.user_id,
            "device_id": device_id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {
                format!("curve25519:{device_id}"): "curve-key",
                format!("ed25519:{device_id}"): "ed-key",
            },
            "dehydrated": true,
            "signatures": {user.user_id.clone(): {format!("ed25519:{device_id}"): "self-sig"}},
        },
        "one_time_keys": {
            "signed_curve25519:AAAA": {"key": "otk-a", "signatures": {}},
        },
        "fallback_keys": {
            "signed_curve25519:FFFF": {"key": "fallback", "fallback": true, "signatures": {}},
        },
    })
}

/// Sends one to-device message per transaction from `from` to `to`'s `device_id`.
async fn send_to(from: &User, to: &User, device_id: &str, count: usize, first: usize) {
    for n in first..first + count {
        let path = format!("/_matrix/client/v3/sendToDevice/m.room_key/txn-{n}");
        let body = json!({"messages": {to.user_id.clone(): {device_id: {"n": n}}}});
        assert_ok(from.client.put(&path, body).await);
    }
}

/// Every page of the device's events from the start: the `n` of each, and the last token.
async fn read_all(user: &User, device_id: &str) -> (Vec<u64>, String) {
    let mut numbers = Vec::new();
    let mut next_batch: Option<String> = None;
    loop {
        let body = match &next_batch {
            Some(token) => json!({"next_batch": token}),
            None => json!({}),
        };
        let page = assert_ok(user.client.post(&events_path(device_id), body).await);
        let token = page["next_batch"].as_str().expect("a next_batch").to_owned();
        let events = page["events"].as_array().expect("events");
        if events.is_empty() {
            if let Some(previous) = &next_batch {
                assert_eq!(previous, &token, "the last token comes back");
            }
            return (numbers, token);
        }
        assert!(events.len() <= 100, "a page holds at most 100");
        numbers.extend(
            events.iter().map(|event| event["content"]["n"].as_u64().expect("a numbered message")),
        );
        for event in events {
            assert_eq!(event["type"], "m.room_key");
        }
        next_batch = Some(token);
    }
}

#[tokio::test]
async fn a_dehydrated_device_collects_room_keys_for_a_later_login() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let versions = assert_ok(alice.client.get("/_matrix/client/versions").await);
    assert_eq!(versions["unstable_features"]["org.matrix.msc3814"], true);
    assert_error(&alice.client.get(DEHYDRATED).await, 404, "M_NOT_FOUND");

    let answer = alice.client.put(DEHYDRATED, dehydrated_body(&alice, "DEHYD1", "pickle-1")).await;
    assert_eq!(assert_ok(answer)["device_id"], "DEHYD1");
    let got = assert_ok(alice.client.get(DEHYDRATED).await);
    assert_eq!(got["device_id"], "DEHYD1");
    assert_eq!(got["device_data"]["device_pickle"], "pickle-1");

    // Other users see it as a device of alice's: keys to query, a one-time key to claim.
    let query = json!({"device_keys": {alice.user_id.clone(): []}});
    let keys = assert_ok(bob.client.post("/_matrix/client/v3/keys/query", query.clone()).await);
    let device = &keys["device_keys"][&alice.user_id]["DEHYD1"];
    assert_eq!(device["dehydrated"], true, "{keys}");
    let claim = json!({"one_time_keys": {alice.user_id.clone(): {"DEHYD1": "signed_curve25519"}}});
    let claimed = assert_ok(bob.client.post("/_matrix/client/v3/keys/claim", claim.clone()).await);
    assert_eq!(
        claimed["one_time_keys"][&alice.user_id]["DEHYD1"]["signed_curve25519:AAAA"]["key"],
        "otk-a"
    );
    let claimed = assert_ok(bob.client.post("/_matrix/client/v3/keys/claim", claim).await);
    assert_eq!(
        claimed["one_time_keys"][&alice.user_id]["DEHYD1"]["signed_curve25519:FFFF"]["key"],
        "fallback",
        "the fallback key once the one-time keys are gone"
    );
    let devices = assert_ok(alice.client.get("/_matrix/client/v3/devices").await);
    assert!(devices["devices"].as_array().unwrap().iter().any(|d| d["device_id"] == "DEHYD1"));

    // Bob sends it room keys: more than one page of them.
    send_to(&bob, &alice, "DEHYD1", 105, 0).await;
    let (numbers, token) = read_all(&alice, "DEHYD1").await;
    assert_eq!(numbers, (0..105).collect::<Vec<u64>>());
    // Nothing was deleted: reading again from the start gives them all again, and a message
    // sent later comes after the last token.
    let (again, _) = read_all(&alice, "DEHYD1").await;
    assert_eq!(again.len(), 105);
    send_to(&bob, &alice, "DEHYD1", 1, 200).await;
    let page =
        assert_ok(alice.client.post(&events_path("DEHYD1"), json!({"next_batch": token})).await);
    let later: Vec<&Value> = page["events"].as_array().unwrap().iter().collect();
    assert_eq!(later.len(), 1);
    assert_eq!(later[0]["content"]["n"], 200);
    assert_eq!(later[0]["sender"], bob.user_id.as_str());

    // The device and its inbox survive a restart.
    let data_dir = server.data_dir.clone();
    let _temp = server.stop().await.expect("temp dir");
    let server = TestServer::start_in(data_dir, &[]).await;
    let alice = alice.on(&server);
    let (numbers, _) = read_all(&alice, "DEHYD1").await;
    assert_eq!(numbers.len(), 106);

    // Refusals, which change nothing.
    assert_error(
        &alice.client.post(&events_path(&alice.device_id), json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_error(
        &alice.client.post(&events_path("DEHYD1"), json!({"next_batch": "nonsense"})).await,
        400,
        "M_INVALID_PARAM",
    );
    let mut wrong = dehydrated_body(&alice, "DEHYD2", "pickle-2");
    wrong["device_keys"]["device_id"] = json!("OTHER");
    assert_error(&alice.client.put(DEHYDRATED, wrong).await, 400, "M_INVALID_PARAM");
    let mut no_algorithm = dehydrated_body(&alice, "DEHYD2", "pickle-2");
    no_algorithm["device_data"] = json!({});
    assert_error(&alice.client.put(DEHYDRATED, no_algorithm).await, 400, "M_INVALID_PARAM");
    let clash = dehydrated_body(&alice, &alice.device_id, "pickle-2");
    assert_error(&alice.client.put(DEHYDRATED, clash).await, 400, "M_INVALID_PARAM");
    assert_error(&alice.client.put(DEHYDRATED, json!({"device_id": 1})).await, 400, "M_BAD_JSON");
    assert_eq!(assert_ok(alice.client.get(DEHYDRATED).await)["device_id"], "DEHYD1");

    // A new dehydrated device replaces the old one everywhere.
    let answer = alice.client.put(DEHYDRATED, dehydrated_body(&alice, "DEHYD2", "pickle-2")).await;
    assert_eq!(assert_ok(answer)["device_id"], "DEHYD2");
    let keys = assert_ok(alice.client.post("/_matrix/client/v3/keys/query", query.clone()).await);
    let devices = keys["device_keys"][&alice.user_id].as_object().unwrap();
    assert!(devices.contains_key("DEHYD2") && !devices.contains_key("DEHYD1"), "{keys}");
    assert_error(&alice.client.post(&events_path("DEHYD1"), json!({})).await, 403, "M_FORBIDDEN");
    let (numbers, _) = read_all(&alice, "DEHYD2").await;
    assert!(numbers.is_empty(), "a new device starts with an empty inbox");

    // Deleting it.
    let answer = assert_ok(alice.client.delete(DEHYDRATED, json!({})).await);
    assert_eq!(answer["device_id"], "DEHYD2");
    assert_error(&alice.client.get(DEHYDRATED).await, 404, "M_NOT_FOUND");
    assert_error(&alice.client.delete(DEHYDRATED, json!({})).await, 404, "M_NOT_FOUND");
    let devices = assert_ok(alice.client.get("/_matrix/client/v3/devices").await);
    assert!(!devices["devices"].as_array().unwrap().iter().any(|d| d["device_id"] == "DEHYD2"));
    server.stop().await;
}
