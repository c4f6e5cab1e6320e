//! End-to-end encryption, the local half: key upload, query and claim (one-time keys claimed
//! exactly once, fallback keys), key changes, cross-signing and signatures, and to-device
//! messages (delivered until acknowledged, never after, and kept across a restart).

use ruma::{CanonicalJsonObject, signatures::Ed25519KeyPair};
use serde_json::{Value, json};

use crate::harness::{TestServer, User, assert_error, assert_ok, enc};

const UPLOAD: &str = "/_matrix/client/v3/keys/upload";
const QUERY: &str = "/_matrix/client/v3/keys/query";
const CLAIM: &str = "/_matrix/client/v3/keys/claim";

pub(crate) fn device_keys(user: &User) -> Value {
    json!({
        "user_id": user.user_id,
        "device_id": user.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{}", user.device_id): "curve-key",
            format!("ed25519:{}", user.device_id): "ed-key",
        },
        "signatures": {user.user_id.clone(): {format!("ed25519:{}", user.device_id): "self-sig"}},
    })
}

fn one_time_key(id: &str) -> (String, Value) {
    (format!("signed_curve25519:{id}"), json!({"key": format!("otk-{id}"), "signatures": {}}))
}

async fn claim(claimer: &User, owner: &User) -> Value {
    let body = json!({"one_time_keys": {owner.user_id.clone(): {owner.device_id.clone(): "signed_curve25519"}}});
    let answer = assert_ok(claimer.client.post(CLAIM, body).await);
    answer["one_time_keys"][&owner.user_id][&owner.device_id].clone()
}

async fn query(querier: &User, owner: &User) -> Value {
    assert_ok(querier.client.post(QUERY, json!({"device_keys": {owner.user_id.clone(): []}})).await)
}

#[tokio::test]
async fn keys_are_uploaded_queried_and_claimed() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let otks: serde_json::Map<String, Value> =
        [one_time_key("a"), one_time_key("b")].into_iter().collect();
    let answer = assert_ok(
        alice
            .client
            .post(UPLOAD, json!({"device_keys": device_keys(&alice), "one_time_keys": otks}))
            .await,
    );
    assert_eq!(answer["one_time_key_counts"]["signed_curve25519"], 2);
    // Keys of someone else's device are refused.
    assert_error(
        &alice.client.post(UPLOAD, json!({"device_keys": device_keys(&bob)})).await,
        400,
        "M_INVALID_PARAM",
    );

    let answer = query(&bob, &alice).await;
    let keys = &answer["device_keys"][&alice.user_id][&alice.device_id];
    assert_eq!(keys["keys"][format!("ed25519:{}", alice.device_id)], "ed-key");
    assert_eq!(answer["failures"], json!({}));

    let claimed = claim(&bob, &alice).await;
    let claimed = claimed.as_object().expect("a key for alice's device");
    assert_eq!(claimed.len(), 1);
    assert!(claimed.keys().all(|id| id.starts_with("signed_curve25519:")));
    let sync = alice.sync(None, 0).await;
    assert_eq!(sync["device_one_time_keys_count"]["signed_curve25519"], 1);

    // Logging out deletes the device's keys.
    assert_ok(alice.client.post("/_matrix/client/v3/logout", json!({})).await);
    let answer = query(&bob, &alice).await;
    assert_eq!(answer["device_keys"][&alice.user_id], json!({}));
}

#[tokio::test]
async fn a_one_time_key_is_claimed_exactly_once_under_concurrent_claims() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let (otk_id, otk) = one_time_key("only");
    let fallback = json!({"signed_curve25519:fb": {"key": "fallback", "fallback": true}});
    assert_ok(
        alice
            .client
            .post(
                UPLOAD,
                json!({"one_time_keys": {otk_id.clone(): otk}, "fallback_keys": fallback}),
            )
            .await,
    );
    let claims = futures::future::join_all((0..10).map(|_| claim(&bob, &alice))).await;
    let with_otk = claims.iter().filter(|keys| keys.get(&otk_id).is_some()).count();
    let with_fallback =
        claims.iter().filter(|keys| keys.get("signed_curve25519:fb").is_some()).count();
    assert_eq!((with_otk, with_fallback), (1, 9), "claims: {claims:?}");
}

#[tokio::test]
async fn the_fallback_key_is_used_when_one_time_keys_run_out() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let (otk_id, otk) = one_time_key("1");
    let fallback = json!({"signed_curve25519:fb": {"key": "fallback", "fallback": true}});
    assert_ok(
        alice
            .client
            .post(
                UPLOAD,
                json!({"one_time_keys": {otk_id.clone(): otk}, "fallback_keys": fallback}),
            )
            .await,
    );
    let sync = alice.sync(None, 0).await;
    assert_eq!(sync["device_unused_fallback_key_types"], json!(["signed_curve25519"]));

    assert!(claim(&bob, &alice).await.get(&otk_id).is_some());
    let second = claim(&bob, &alice).await;
    assert_eq!(second["signed_curve25519:fb"]["key"], "fallback");
    // A used fallback key is handed out again until the device replaces it.
    assert_eq!(claim(&bob, &alice).await["signed_curve25519:fb"]["key"], "fallback");

    let sync = alice.sync(None, 0).await;
    assert_eq!(sync["device_unused_fallback_key_types"], json!([]));
    assert_eq!(sync["device_one_time_keys_count"]["signed_curve25519"], 0);

    // Without one-time or fallback keys, the device is left out.
    let carol = server.register("carol").await;
    assert_eq!(claim(&bob, &carol).await, Value::Null);
}

fn to_device_events(sync: &Value) -> Vec<Value> {
    sync["to_device"]["events"].as_array().cloned().unwrap_or_default()
}

async fn send_to_device(sender: &User, txn: &str, messages: Value) {
    let path = format!("/_matrix/client/v3/sendToDevice/m.room_key_request/{}", enc(txn));
    assert_ok(sender.client.put(&path, json!({"messages": messages})).await);
}

#[tokio::test]
async fn to_device_messages_are_redelivered_until_acknowledged_and_never_after() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let start = bob.sync(None, 0).await["next_batch"].as_str().expect("token").to_owned();

    let messages = json!({bob.user_id.clone(): {bob.device_id.clone(): {"n": 1}}});
    send_to_device(&alice, "txn1", messages.clone()).await;
    // The same transaction again is not a second message.
    send_to_device(&alice, "txn1", messages).await;

    let first = bob.sync(Some(&start), 5_000).await;
    let events = to_device_events(&first);
    assert_eq!(events.len(), 1, "sync: {first}");
    assert_eq!(events[0]["sender"], alice.user_id);
    assert_eq!(events[0]["type"], "m.room_key_request");
    assert_eq!(events[0]["content"], json!({"n": 1}));
    // The answer was lost: the client syncs from the same token and gets it again.
    let again = bob.sync(Some(&start), 0).await;
    assert_eq!(to_device_events(&again), events);
    // Syncing from the new token acknowledges it: never delivered again.
    let next = again["next_batch"].as_str().expect("token").to_owned();
    assert!(to_device_events(&bob.sync(Some(&next), 0).await).is_empty());
    assert!(to_device_events(&bob.sync(Some(&start), 0).await).is_empty());

    // `*` reaches every device of the user, and a long poll wakes for it.
    let login = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "bob"}, "password": "secret-password"});
    let second_device = assert_ok(server.client().post("/_matrix/client/v3/login", login).await);
    let bob2 = User {
        user_id: bob.user_id.clone(),
        device_id: second_device["device_id"].as_str().expect("device").to_owned(),
        client: server.client().with_token(second_device["access_token"].as_str().expect("token")),
    };
    let bob2_start = bob2.sync(None, 0).await["next_batch"].as_str().expect("token").to_owned();
    let waiting = bob2.sync_until(Some(bob2_start), |sync| !to_device_events(sync).is_empty());
    let send = send_to_device(&alice, "txn2", json!({bob.user_id.clone(): {"*": {"n": 2}}}));
    let (woken, ()) = tokio::join!(waiting, send);
    assert_eq!(to_device_events(&woken)[0]["content"], json!({"n": 2}));
    let for_bob = bob.sync(Some(&next), 0).await;
    assert_eq!(to_device_events(&for_bob)[0]["content"], json!({"n": 2}));
}

#[tokio::test]
async fn to_device_messages_survive_a_restart() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let start = bob.sync(None, 0).await["next_batch"].as_str().expect("token").to_owned();
    send_to_device(&alice, "t", json!({bob.user_id.clone(): {bob.device_id.clone(): {"n": 1}}}))
        .await;

    let data_dir = server.data_dir.clone();
    let _temp = server.stop().await;
    let server = TestServer::start_in(data_dir, &[]).await;
    let bob = bob.on(&server);
    let sync = bob.sync(Some(&start), 5_000).await;
    let events = to_device_events(&sync);
    assert_eq!(events.len(), 1, "sync: {sync}");
    assert_eq!(events[0]["content"], json!({"n": 1}));
    let next = sync["next_batch"].as_str().expect("token").to_owned();
    assert!(to_device_events(&bob.sync(Some(&next), 0).await).is_empty());
}

#[tokio::test]
async fn key_changes_reach_users_who_share_a_room() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room_id = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room_id).await;
    let bob_start = bob.sync(None, 0).await["next_batch"].as_str().expect("token").to_owned();
    let carol_start = carol.sync(None, 0).await["next_batch"].as_str().expect("token").to_owned();

    assert_ok(alice.client.post(UPLOAD, json!({"device_keys": device_keys(&alice)})).await);

    let sync = bob
        .sync_until(Some(bob_start.clone()), |sync| {
            sync["device_lists"]["changed"]
                .as_array()
                .is_some_and(|changed| changed.iter().any(|user| *user == alice.user_id))
        })
        .await;
    let to = sync["next_batch"].as_str().expect("token");
    let changes = assert_ok(
        bob.client.get(&format!("/_matrix/client/v3/keys/changes?from={bob_start}&to={to}")).await,
    );
    assert_eq!(changes["changed"], json!([alice.user_id]));

    // Carol shares no room with alice: she hears nothing.
    let carol_sync = carol.sync(Some(&carol_start), 0).await;
    assert_eq!(carol_sync["device_lists"]["changed"], json!([]));
    let to = carol_sync["next_batch"].as_str().expect("token");
    let changes = assert_ok(
        carol
            .client
            .get(&format!("/_matrix/client/v3/keys/changes?from={carol_start}&to={to}"))
            .await,
    );
    assert_eq!(changes["changed"], json!([]));

    // When bob leaves the only room they share, alice is `left`.
    let before_leave = sync["next_batch"].as_str().expect("token").to_owned();
    assert_ok(bob.room_post(&room_id, "leave", json!({})).await);
    let sync = bob.sync(Some(&before_leave), 0).await;
    assert_eq!(sync["device_lists"]["left"], json!([alice.user_id]), "sync: {sync}");
}

/// An ed25519 key pair whose key id is its unpadded base64 public key, as cross-signing keys
/// are named.
pub(crate) struct SigningKey {
    pair: Ed25519KeyPair,
    public: String,
}

pub(crate) fn signing_key() -> SigningKey {
    let der = Ed25519KeyPair::generate();
    let public = ruma::serde::Base64::<ruma::serde::base64::Standard, _>::new(
        Ed25519KeyPair::from_der(&der, "x".into()).expect("key").public_key().to_vec(),
    )
    .encode();
    SigningKey { pair: Ed25519KeyPair::from_der(&der, public.clone()).expect("key"), public }
}

/// Signs `object` as `signer` with `key`, keeping its other signatures.
fn sign(object: &mut Value, signer: &str, key: &SigningKey) {
    let mut canonical: CanonicalJsonObject = serde_json::from_value(object.clone()).expect("json");
    ruma::signatures::sign_json(signer, &key.pair, &mut canonical).expect("signing");
    *object = serde_json::to_value(canonical).expect("json");
}

pub(crate) fn cross_signing_key(
    user: &User,
    usage: &str,
    key: &SigningKey,
    master: Option<&SigningKey>,
) -> Value {
    let mut object = json!({
        "user_id": user.user_id,
        "usage": [usage],
        "keys": {format!("ed25519:{}", key.public): key.public},
    });
    if let Some(master) = master {
        sign(&mut object, &user.user_id, master);
    }
    object
}

fn password_auth(user: &User, session: Option<&str>) -> Value {
    let mut auth = json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user.user_id},
        "password": "secret-password",
    });
    if let Some(session) = session {
        auth["session"] = json!(session);
    }
    auth
}

const SIGNING_UPLOAD: &str = "/_matrix/client/v3/keys/device_signing/upload";
const SIGNATURES_UPLOAD: &str = "/_matrix/client/v3/keys/signatures/upload";

#[tokio::test]
async fn cross_signing_keys_and_signatures_show_in_query() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    assert_ok(alice.client.post(UPLOAD, json!({"device_keys": device_keys(&alice)})).await);
    let (master, self_signing, user_signing) = (signing_key(), signing_key(), signing_key());
    let keys = json!({
        "master_key": cross_signing_key(&alice, "master", &master, None),
        "self_signing_key": cross_signing_key(&alice, "self_signing", &self_signing, Some(&master)),
        "user_signing_key": cross_signing_key(&alice, "user_signing", &user_signing, Some(&master)),
    });
    // A self-signing key that the master key did not sign is refused.
    let mut unsigned = keys.clone();
    unsigned["self_signing_key"] = cross_signing_key(&alice, "self_signing", &self_signing, None);
    assert_error(&alice.client.post(SIGNING_UPLOAD, unsigned).await, 400, "M_INVALID_SIGNATURE");
    // The first upload needs no user-interactive auth, nor does a retry of the same keys.
    assert_ok(alice.client.post(SIGNING_UPLOAD, keys.clone()).await);
    assert_ok(alice.client.post(SIGNING_UPLOAD, keys.clone()).await);
    // Replacing them does.
    let new_self_signing = signing_key();
    let mut replacement = json!({
        "self_signing_key": cross_signing_key(&alice, "self_signing", &new_self_signing, Some(&master)),
    });
    let challenge = alice.client.post(SIGNING_UPLOAD, replacement.clone()).await;
    assert_eq!(challenge.0, 401, "answer: {}", challenge.1);
    let session = challenge.1["session"].as_str().expect("session");
    replacement["auth"] = password_auth(&alice, Some(session));
    assert_ok(alice.client.post(SIGNING_UPLOAD, replacement).await);
    // A key of someone else is refused.
    let foreign = json!({
        "master_key": cross_signing_key(&bob, "master", &signing_key(), None),
        "auth": password_auth(&alice, None),
    });
    assert_error(&alice.client.post(SIGNING_UPLOAD, foreign).await, 400, "M_INVALID_PARAM");

    // Alice's (new) self-signing key signs her device; a forged signature is refused.
    let mut signed_device = device_keys(&alice);
    sign(&mut signed_device, &alice.user_id, &new_self_signing);
    let mut forged_device = device_keys(&alice);
    forged_device["keys"]["curve25519:other"] = json!("changed");
    sign(&mut forged_device, &alice.user_id, &new_self_signing);
    let self_signature = format!("ed25519:{}", new_self_signing.public);
    let answer = assert_ok(
        alice
            .client
            .post(
                SIGNATURES_UPLOAD,
                json!({alice.user_id.clone(): {alice.device_id.clone(): signed_device}}),
            )
            .await,
    );
    assert_eq!(answer["failures"], json!({}));
    let answer = assert_ok(
        alice
            .client
            .post(
                SIGNATURES_UPLOAD,
                json!({alice.user_id.clone(): {alice.device_id.clone(): forged_device, "UNKNOWN": {"signatures": {alice.user_id.clone(): {"ed25519:x": "x"}}}}}),
            )
            .await,
    );
    assert_eq!(
        answer["failures"][&alice.user_id][&alice.device_id]["errcode"],
        "M_INVALID_SIGNATURE"
    );
    assert_eq!(answer["failures"][&alice.user_id]["UNKNOWN"]["errcode"], "M_NOT_FOUND");

    // Bob's user-signing key signs alice's master key.
    let (bob_master, bob_user_signing) = (signing_key(), signing_key());
    let bob_keys = json!({
        "master_key": cross_signing_key(&bob, "master", &bob_master, None),
        "user_signing_key": cross_signing_key(&bob, "user_signing", &bob_user_signing, Some(&bob_master)),
    });
    assert_ok(bob.client.post(SIGNING_UPLOAD, bob_keys).await);
    let mut signed_master = cross_signing_key(&alice, "master", &master, None);
    sign(&mut signed_master, &bob.user_id, &bob_user_signing);
    let answer = assert_ok(
        bob.client
            .post(
                SIGNATURES_UPLOAD,
                json!({alice.user_id.clone(): {master.public.clone(): signed_master}}),
            )
            .await,
    );
    assert_eq!(answer["failures"], json!({}));

    let seen_by_bob = query(&bob, &alice).await;
    let device = &seen_by_bob["device_keys"][&alice.user_id][&alice.device_id];
    assert!(device["signatures"][&alice.user_id][&self_signature].is_string(), "{device}");
    assert_eq!(
        device["signatures"][&alice.user_id][format!("ed25519:{}", alice.device_id)],
        "self-sig"
    );
    assert!(device["keys"].get("curve25519:other").is_none());
    let stored_master = &seen_by_bob["master_keys"][&alice.user_id];
    assert_eq!(stored_master["keys"][format!("ed25519:{}", master.public)], master.public);
    let bob_signature = format!("ed25519:{}", bob_user_signing.public);
    assert!(
        stored_master["signatures"][&bob.user_id][&bob_signature].is_string(),
        "{stored_master}"
    );
    let stored_self_signing = &seen_by_bob["self_signing_keys"][&alice.user_id];
    assert_eq!(stored_self_signing["keys"][&self_signature], new_self_signing.public);
    // The user-signing key is only shown to its owner.
    assert!(seen_by_bob["user_signing_keys"].get(&alice.user_id).is_none());
    let seen_by_alice = query(&alice, &alice).await;
    assert_eq!(
        seen_by_alice["user_signing_keys"][&alice.user_id]["usage"],
        json!(["user_signing"])
    );
}

#[tokio::test]
async fn a_large_to_device_backlog_is_delivered_in_parts_each_acknowledged_separately() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let start = bob.sync(None, 0).await["next_batch"].as_str().expect("token").to_owned();
    for n in 0..150 {
        let messages = json!({bob.user_id.clone(): {bob.device_id.clone(): {"n": n}}});
        send_to_device(&alice, &format!("t{n}"), messages).await;
    }
    let numbers = |sync: &Value| -> Vec<u64> {
        to_device_events(sync).iter().filter_map(|event| event["content"]["n"].as_u64()).collect()
    };
    let first = bob.sync(Some(&start), 0).await;
    assert_eq!(numbers(&first), (0..100).collect::<Vec<_>>());
    // A retry of the same sync gets the same part.
    let retry = bob.sync(Some(&start), 0).await;
    assert_eq!(numbers(&retry), (0..100).collect::<Vec<_>>());
    let middle = retry["next_batch"].as_str().expect("token").to_owned();
    let second = bob.sync(Some(&middle), 0).await;
    assert_eq!(numbers(&second), (100..150).collect::<Vec<_>>());
    // The second part is delivered again until acknowledged, though no new position was made.
    assert_eq!(numbers(&bob.sync(Some(&middle), 0).await), (100..150).collect::<Vec<_>>());
    let end = second["next_batch"].as_str().expect("token").to_owned();
    assert!(numbers(&bob.sync(Some(&end), 0).await).is_empty());
    // keys/changes takes a sync token with a to-device cursor too.
    assert_ok(
        bob.client.get(&format!("/_matrix/client/v3/keys/changes?from={middle}&to={end}")).await,
    );
}
