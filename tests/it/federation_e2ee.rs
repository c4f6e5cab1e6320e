//! End-to-end encryption across two real servers on 127.0.0.2 and 127.0.0.3 with TLS: a user
//! on A queries and claims the keys of a user on B through A's client API (A asks B over
//! signed federation requests), an unreachable server lands in `failures`, and B's EDUs
//! (device list updates, to-device messages) reach A's users.
//!
//! [End-to-end encryption](https://spec.matrix.org/v1.16/server-server-api/#end-to-end-encryption),
//! [device management](https://spec.matrix.org/v1.16/server-server-api/#device-management),
//! [send-to-device messaging](https://spec.matrix.org/v1.16/server-server-api/#send-to-device-messaging)

use std::time::{Duration, Instant};

use federation::{Client, Method, ServerSigningKey};
use ruma::{CanonicalJsonValue, MilliSecondsSinceUnixEpoch, RoomVersionId, ServerName};
use serde_json::{Value, json};

use crate::{
    e2ee::{cross_signing_key, device_keys, signing_key},
    federation_transport::{Pki, client_as, object, start_on},
    harness::{TestServer, User, assert_ok, enc},
};

const UPLOAD: &str = "/_matrix/client/v3/keys/upload";
const QUERY: &str = "/_matrix/client/v3/keys/query";
const CLAIM: &str = "/_matrix/client/v3/keys/claim";

fn server_name(server: &TestServer) -> &ServerName {
    <&ServerName>::try_from(server.server_name.as_str()).expect("test setup")
}

/// Claims `owner`'s key of `signed_curve25519` through `claimer`'s server.
async fn claim(claimer: &User, owner: &User) -> Value {
    let body = json!({"one_time_keys": {owner.user_id.clone(): {owner.device_id.clone(): "signed_curve25519"}}});
    assert_ok(claimer.client.post(CLAIM, body).await)
}

#[tokio::test]
async fn keys_of_a_remote_user_are_queried_and_claimed_through_their_server() {
    let pki = Pki::new();
    let a = start_on(&pki, "127.0.0.2").await;
    let b = start_on(&pki, "127.0.0.3").await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let (status, _) = bob
        .client
        .put(
            &format!("/_matrix/client/v3/devices/{}", bob.device_id),
            json!({"display_name": "Bob's phone"}),
        )
        .await;
    assert_eq!(status, 200);
    // Bob's three cross-signing keys; the user-signing one must never leave B.
    let (master_key, self_signing_key, user_signing_key) =
        (signing_key(), signing_key(), signing_key());
    let master = cross_signing_key(&bob, "master", &master_key, None);
    let self_signing =
        cross_signing_key(&bob, "self_signing", &self_signing_key, Some(&master_key));
    let user_signing =
        cross_signing_key(&bob, "user_signing", &user_signing_key, Some(&master_key));
    assert_ok(
        bob.client
            .post(
                "/_matrix/client/v3/keys/device_signing/upload",
                json!({
                    "master_key": master,
                    "self_signing_key": self_signing,
                    "user_signing_key": user_signing,
                }),
            )
            .await,
    );
    assert_ok(
        bob.client
            .post(
                UPLOAD,
                json!({
                    "device_keys": device_keys(&bob),
                    "one_time_keys": {"signed_curve25519:only": {"key": "the-one", "signatures": {}}},
                }),
            )
            .await,
    );

    // keys/query on A for bob: A asks B and hands back bob's keys, name and master key.
    let answer = assert_ok(
        alice.client.post(QUERY, json!({"device_keys": {bob.user_id.clone(): []}})).await,
    );
    let keys = &answer["device_keys"][&bob.user_id][&bob.device_id];
    assert_eq!(keys["keys"][format!("ed25519:{}", bob.device_id)], "ed-key", "{answer}");
    assert_eq!(keys["unsigned"]["device_display_name"], "Bob's phone", "{answer}");
    assert_eq!(answer["master_keys"][&bob.user_id], master, "{answer}");
    assert_eq!(answer["self_signing_keys"][&bob.user_id], self_signing, "{answer}");
    assert_eq!(answer["user_signing_keys"], json!({}), "{answer}");
    assert_eq!(answer["failures"], json!({}), "{answer}");
    // A device that does not exist is simply absent.
    let answer = assert_ok(
        alice.client.post(QUERY, json!({"device_keys": {bob.user_id.clone(): ["NOPE"]}})).await,
    );
    assert_eq!(answer["device_keys"][&bob.user_id], json!({}), "{answer}");

    // keys/claim on A: bob's one one-time key, exactly once, whoever asks.
    let answer = claim(&alice, &bob).await;
    assert_eq!(
        answer["one_time_keys"][&bob.user_id][&bob.device_id],
        json!({"signed_curve25519:only": {"key": "the-one", "signatures": {}}}),
        "{answer}"
    );
    assert_eq!(answer["failures"], json!({}), "{answer}");
    let again = claim(&alice, &bob).await;
    assert_eq!(again["one_time_keys"], json!({}), "{again}");
    let local = claim(&bob, &bob).await;
    assert_eq!(local["one_time_keys"], json!({}), "{local}");
    let (status, sync) = bob.client.get("/_matrix/client/v3/sync?timeout=0").await;
    assert_eq!(status, 200);
    assert_eq!(sync["device_one_time_keys_count"]["signed_curve25519"], 0, "{sync}");

    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn the_federation_key_endpoints_serve_local_users_only() {
    let pki = Pki::new();
    let a = start_on(&pki, "127.0.0.2").await;
    let b = start_on(&pki, "127.0.0.3").await;
    let bob = b.register("bob").await;
    let (status, _) = bob
        .client
        .put(
            &format!("/_matrix/client/v3/devices/{}", bob.device_id),
            json!({"display_name": "Bob's phone"}),
        )
        .await;
    assert_eq!(status, 200);
    let answer = assert_ok(
        bob.client
            .post(
                UPLOAD,
                json!({
                    "device_keys": device_keys(&bob),
                    "one_time_keys": {"signed_curve25519:k1": {"key": "k1", "signatures": {}}},
                    "fallback_keys": {"signed_curve25519:fb": {"key": "fb", "fallback": true, "signatures": {}}},
                }),
            )
            .await,
    );
    assert_eq!(answer["one_time_key_counts"]["signed_curve25519"], 1);
    let as_a = client_as(&a, &pki, true);
    let b_name = server_name(&b);

    // user/devices: the device with keys and name, and a stream id that grows with changes.
    let path = format!("/_matrix/federation/v1/user/devices/{}", enc(&bob.user_id));
    let devices = as_a.send_request(b_name, Method::GET, &path, None).await.unwrap();
    assert_eq!(devices["user_id"], bob.user_id.as_str(), "{devices}");
    assert_eq!(devices["devices"][0]["device_id"], bob.device_id.as_str(), "{devices}");
    assert_eq!(devices["devices"][0]["device_display_name"], "Bob's phone", "{devices}");
    assert_eq!(devices["devices"][0]["keys"], device_keys(&bob), "{devices}");
    let first_stream_id = devices["stream_id"].as_u64().unwrap();
    let mut changed = device_keys(&bob);
    changed["keys"][format!("curve25519:{}", bob.device_id)] = json!("new-curve-key");
    assert_ok(bob.client.post(UPLOAD, json!({"device_keys": changed})).await);
    let devices = as_a.send_request(b_name, Method::GET, &path, None).await.unwrap();
    assert!(devices["stream_id"].as_u64().unwrap() > first_stream_id, "{devices}");
    // Another server's user is refused.
    let path = format!("/_matrix/federation/v1/user/devices/{}", enc("@carol:elsewhere.test"));
    let error = as_a.send_request(b_name, Method::GET, &path, None).await.unwrap_err();
    assert!(
        matches!(&error, federation::Error::Status { status: 400, body, .. } if body.contains("M_INVALID_PARAM")),
        "{error:?}"
    );

    // user/keys/query: device keys, nothing for other servers' users.
    let body = json!({"device_keys": {bob.user_id.clone(): [], "@carol:elsewhere.test": []}});
    let answer = as_a
        .send_request(b_name, Method::POST, "/_matrix/federation/v1/user/keys/query", Some(body))
        .await
        .unwrap();
    let keys = &answer["device_keys"][&bob.user_id][&bob.device_id];
    assert_eq!(keys["keys"][format!("curve25519:{}", bob.device_id)], "new-curve-key", "{answer}");
    assert!(answer["device_keys"].get("@carol:elsewhere.test").is_none(), "{answer}");
    assert!(answer.get("user_signing_keys").is_none(), "{answer}");

    // user/keys/claim: the one-time key once, then the fallback key.
    let body = json!({"one_time_keys": {bob.user_id.clone(): {bob.device_id.clone(): "signed_curve25519"}}});
    let claim_path = "/_matrix/federation/v1/user/keys/claim";
    let first =
        as_a.send_request(b_name, Method::POST, claim_path, Some(body.clone())).await.unwrap();
    assert!(
        first["one_time_keys"][&bob.user_id][&bob.device_id]["signed_curve25519:k1"].is_object(),
        "{first}"
    );
    let second = as_a.send_request(b_name, Method::POST, claim_path, Some(body)).await.unwrap();
    assert!(
        second["one_time_keys"][&bob.user_id][&bob.device_id]["signed_curve25519:fb"].is_object(),
        "{second}"
    );

    // Unsigned requests never reach the handlers.
    let response = reqwest::Client::new()
        .post(format!("{}/_matrix/federation/v1/user/keys/query", b.base_url))
        .json(&json!({"device_keys": {bob.user_id.clone(): []}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);

    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn unreachable_servers_are_listed_in_failures_within_the_timeout() {
    let pki = Pki::new();
    let a = start_on(&pki, "127.0.0.2").await;
    let alice = a.register("alice").await;
    let (status, _) = alice.client.post(UPLOAD, json!({"device_keys": device_keys(&alice)})).await;
    assert_eq!(status, 200);
    // A closed port: the connection is refused.
    let closed_port = std::net::TcpListener::bind("127.0.0.4:0").unwrap().local_addr().unwrap();
    let closed = format!("127.0.0.4:{}", closed_port.port());
    // A port that accepts connections and never answers: only the timeout ends the wait.
    let silent = std::net::TcpListener::bind("127.0.0.5:0").unwrap();
    let silent_name = format!("127.0.0.5:{}", silent.local_addr().unwrap().port());
    let started = Instant::now();
    let answer = assert_ok(
        alice
            .client
            .post(
                QUERY,
                json!({
                    "device_keys": {
                        alice.user_id.clone(): [],
                        format!("@x:{closed}"): [],
                        format!("@y:{silent_name}"): [],
                    },
                    "timeout": 1000,
                }),
            )
            .await,
    );
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert_eq!(
        answer["failures"],
        json!({closed.clone(): {}, silent_name.clone(): {}}),
        "{answer}"
    );
    // The local answer is there all the same.
    assert!(answer["device_keys"][&alice.user_id][&alice.device_id].is_object(), "{answer}");

    let answer = assert_ok(
        alice
            .client
            .post(
                CLAIM,
                json!({
                    "one_time_keys": {format!("@x:{closed}"): {"DEV": "signed_curve25519"}},
                    "timeout": 1000,
                }),
            )
            .await,
    );
    assert_eq!(answer["failures"], json!({closed: {}}), "{answer}");
    assert_eq!(answer["one_time_keys"], json!({}), "{answer}");
    drop(silent);
    a.stop().await;
}

/// B's identity and a way to speak for it.
struct AsB {
    client: Client,
    key: ServerSigningKey,
    name: String,
}

impl AsB {
    fn new(b: &TestServer, pki: &Pki) -> Self {
        let key = ServerSigningKey::load_or_generate(
            &b.data_dir.join("signing.key"),
            ServerName::parse(&b.server_name).expect("test setup"),
        )
        .expect("test setup");
        Self { client: client_as(b, pki, true), key, name: b.server_name.clone() }
    }

    /// Joins `user_id` (of B) to A's room with `make_join` and `send_join`, as B would.
    async fn join(&self, a: &TestServer, room_id: &str, user_id: &str) {
        let versions: String =
            (1..=11).map(|version| format!("ver={version}")).collect::<Vec<_>>().join("&");
        let path = format!(
            "/_matrix/federation/v1/make_join/{}/{}?{versions}",
            enc(room_id),
            enc(user_id)
        );
        let template = self
            .client
            .send_request(server_name(a), Method::GET, &path, None)
            .await
            .expect("test setup");
        let room_version =
            RoomVersionId::try_from(template["room_version"].as_str().expect("test setup"))
                .expect("test setup");
        let mut join = object(template["event"].clone());
        let join_id = self.key.hash_and_sign_pdu(&mut join, &room_version).expect("test setup");
        let path =
            format!("/_matrix/federation/v2/send_join/{}/{}", enc(room_id), enc(join_id.as_str()));
        let body = serde_json::to_value(CanonicalJsonValue::Object(join)).expect("test setup");
        self.client
            .send_request(server_name(a), Method::PUT, &path, Some(body))
            .await
            .expect("test setup");
    }

    /// Sends a transaction of EDUs to A.
    async fn send_edus(&self, a: &TestServer, txn_id: &str, edus: Value) -> Value {
        let transaction = json!({
            "origin": self.name,
            "origin_server_ts": MilliSecondsSinceUnixEpoch::now(),
            "pdus": [],
            "edus": edus,
        });
        let path = format!("/_matrix/federation/v1/send/{txn_id}");
        self.client
            .send_request(server_name(a), Method::PUT, &path, Some(transaction))
            .await
            .expect("test setup")
    }
}

fn changed(sync: &Value) -> Vec<String> {
    sync["device_lists"]["changed"]
        .as_array()
        .map(|users| users.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_device_list_update_reaches_local_users_who_share_a_room() {
    let pki = Pki::new();
    let a = start_on(&pki, "127.0.0.2").await;
    let b = start_on(&pki, "127.0.0.3").await;
    let alice = a.register("alice").await;
    let dave = a.register("dave").await;
    let room_id = alice.create_room(json!({"preset": "public_chat"})).await;
    let as_b = AsB::new(&b, &pki);
    let bob = format!("@bob:{}", b.server_name);
    let carol = format!("@carol:{}", b.server_name);
    as_b.join(&a, &room_id, &bob).await;
    let since = alice.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let dave_since = dave.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();

    let update = |user_id: &str, stream_id: u64| {
        json!({"edu_type": "m.device_list_update", "content": {
            "user_id": user_id,
            "device_id": "BOBPHONE",
            "stream_id": stream_id,
            "prev_id": [stream_id - 1],
            "keys": {"user_id": user_id, "device_id": "BOBPHONE"},
        }})
    };
    // An update for another server's user, one for a user of B in no room here, and one for
    // bob (twice); malformed EDUs around them change nothing.
    let answer = as_b
        .send_edus(
            &a,
            "dl1",
            json!([
                update(&format!("@mallory:{}", a.server_name), 2),
                update(&carol, 2),
                {"edu_type": "m.device_list_update", "content": {"device_id": "X"}},
                {"content": {}},
                update(&bob, 2),
                update(&bob, 3),
            ]),
        )
        .await;
    assert_eq!(answer["pdus"], json!({}), "{answer}");
    let sync = alice.sync_until(Some(since.clone()), |sync| !changed(sync).is_empty()).await;
    assert_eq!(changed(&sync), std::slice::from_ref(&bob), "{sync}");
    let to = sync["next_batch"].as_str().unwrap();
    let (status, changes) =
        alice.client.get(&format!("/_matrix/client/v3/keys/changes?from={since}&to={to}")).await;
    assert_eq!(status, 200);
    assert_eq!(changes["changed"], json!([bob.clone()]), "{changes}");
    // Dave shares no room with bob: nothing for him.
    let (status, changes) = dave
        .client
        .get(&format!("/_matrix/client/v3/keys/changes?from={dave_since}&to={to}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(changes["changed"], json!([]), "{changes}");

    // A cross-signing key update has the same effect.
    let since = to.to_owned();
    as_b.send_edus(
        &a,
        "sk1",
        json!([{"edu_type": "m.signing_key_update", "content": {
            "user_id": bob,
            "master_key": {"user_id": bob, "usage": ["master"], "keys": {"ed25519:m": "m"}},
        }}]),
    )
    .await;
    let sync = alice.sync_until(Some(since), |sync| !changed(sync).is_empty()).await;
    assert_eq!(changed(&sync), [bob], "{sync}");

    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn a_to_device_message_over_federation_is_delivered_exactly_once() {
    let pki = Pki::new();
    let a = start_on(&pki, "127.0.0.2").await;
    let b = start_on(&pki, "127.0.0.3").await;
    let alice = a.register("alice").await;
    let since = alice.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let as_b = AsB::new(&b, &pki);
    let bob = format!("@bob:{}", b.server_name);
    let to_device = |sender: &str, message_id: &str, device: &str| {
        json!({"edu_type": "m.direct_to_device", "content": {
            "sender": sender,
            "type": "m.room_key_request",
            "message_id": message_id,
            "messages": {alice.user_id.clone(): {device: {"body": message_id}}},
        }})
    };
    // The same message twice, in two transactions; one from a sender of another server.
    as_b.send_edus(&a, "td1", json!([to_device(&bob, "m1", &alice.device_id)])).await;
    as_b.send_edus(
        &a,
        "td2",
        json!([
            to_device(&bob, "m1", &alice.device_id),
            to_device(&format!("@mallory:{}", a.server_name), "m2", "*"),
            to_device(&bob, "m3", "*"),
        ]),
    )
    .await;
    // Each transaction is handled before it is answered, so one sync sees everything.
    let sync = alice.sync(Some(&since), 0).await;
    let events = sync["to_device"]["events"].as_array().unwrap();
    let bodies: Vec<&str> =
        events.iter().filter_map(|event| event["content"]["body"].as_str()).collect();
    assert_eq!(bodies, ["m1", "m3"], "{sync}");
    assert!(events.iter().all(|event| event["sender"] == bob.as_str()), "{sync}");
    assert_eq!(events[0]["type"], "m.room_key_request");
    // Acknowledged by the next sync, and the replayed id stays ignored.
    let next = sync["next_batch"].as_str().unwrap();
    as_b.send_edus(&a, "td3", json!([to_device(&bob, "m1", "*")])).await;
    let sync = alice.sync(Some(next), 0).await;
    assert_eq!(sync["to_device"]["events"], json!([]), "{sync}");

    // A message id longer than the spec's 32 code points is refused.
    let long = "x".repeat(33);
    as_b.send_edus(&a, "td4", json!([to_device(&bob, &long, "*")])).await;
    let next = sync["next_batch"].as_str().unwrap();
    let sync = alice.sync(Some(next), 0).await;
    assert_eq!(sync["to_device"]["events"], json!([]), "{sync}");

    b.stop().await;
    a.stop().await;
}
