//! Server-side key backups over HTTP: versions (create, latest, get, update, delete with
//! tombstones), keys for all rooms, one room and one session, the replace rules, `etag` and
//! `count`, and the errcodes of each endpoint.

use serde_json::{Value, json};

use crate::harness::{TestServer, User, assert_error, assert_ok, enc};

const VERSION: &str = "/_matrix/client/v3/room_keys/version";
const KEYS: &str = "/_matrix/client/v3/room_keys/keys";
const ALGORITHM: &str = "m.megolm_backup.v1.curve25519-aes-sha2";
const ROOM: &str = "!room:example.org";

fn key(first_message_index: u64, forwarded_count: u64, is_verified: bool, tag: &str) -> Value {
    json!({
        "first_message_index": first_message_index,
        "forwarded_count": forwarded_count,
        "is_verified": is_verified,
        "session_data": {"ephemeral": "e", "ciphertext": tag, "mac": "m"},
    })
}

async fn create_version(user: &User, public_key: &str) -> String {
    let answer = assert_ok(
        user.client
            .post(VERSION, json!({"algorithm": ALGORITHM, "auth_data": {"public_key": public_key}}))
            .await,
    );
    answer["version"].as_str().expect("version").to_owned()
}

fn session_path(room_id: &str, session_id: &str, version: &str) -> String {
    format!("{KEYS}/{}/{}?version={version}", enc(room_id), enc(session_id))
}

async fn put_session(user: &User, version: &str, session_id: &str, data: Value) -> (u16, Value) {
    user.client.put(&session_path(ROOM, session_id, version), data).await
}

async fn stored_ciphertext(user: &User, version: &str, session_id: &str) -> Value {
    let answer = assert_ok(user.client.get(&session_path(ROOM, session_id, version)).await);
    answer["session_data"]["ciphertext"].clone()
}

#[tokio::test]
async fn backup_versions_are_created_read_updated_and_deleted() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;

    assert_error(&alice.client.get(VERSION).await, 404, "M_NOT_FOUND");
    let first = create_version(&alice, "key1").await;
    let latest = assert_ok(alice.client.get(VERSION).await);
    assert_eq!(latest["version"], first);
    assert_eq!(latest["algorithm"], ALGORITHM);
    assert_eq!(latest["auth_data"], json!({"public_key": "key1"}));
    assert_eq!(latest["count"], 0);
    assert!(latest["etag"].is_string(), "{latest}");
    // Backups are per user.
    assert_error(&bob.client.get(VERSION).await, 404, "M_NOT_FOUND");
    assert_error(&bob.client.get(&format!("{VERSION}/{first}")).await, 404, "M_NOT_FOUND");

    let second = create_version(&alice, "key2").await;
    assert_ne!(first, second);
    assert_eq!(assert_ok(alice.client.get(VERSION).await)["version"], second);
    let by_version = assert_ok(alice.client.get(&format!("{VERSION}/{first}")).await);
    assert_eq!(by_version["auth_data"]["public_key"], "key1");

    // Only auth_data changes; the version in the body must match the path, the algorithm must
    // stay.
    let path = format!("{VERSION}/{first}");
    let update =
        json!({"algorithm": ALGORITHM, "auth_data": {"public_key": "key1b"}, "version": first});
    assert_ok(alice.client.put(&path, update).await);
    let by_version = assert_ok(alice.client.get(&path).await);
    assert_eq!(by_version["auth_data"]["public_key"], "key1b");
    let wrong = json!({"algorithm": ALGORITHM, "auth_data": {}, "version": second});
    assert_error(&alice.client.put(&path, wrong).await, 400, "M_INVALID_PARAM");
    let other_algorithm = json!({"algorithm": "org.example.other", "auth_data": {}});
    assert_error(&alice.client.put(&path, other_algorithm).await, 400, "M_INVALID_PARAM");
    let update = json!({"algorithm": ALGORITHM, "auth_data": {}});
    assert_error(&alice.client.put(&format!("{VERSION}/999"), update).await, 404, "M_NOT_FOUND");
    assert_error(&alice.client.put(&path, json!({"auth_data": {}})).await, 400, "M_BAD_JSON");
    assert_error(
        &alice.client.post(VERSION, json!({"algorithm": ALGORITHM, "auth_data": "nope"})).await,
        400,
        "M_BAD_JSON",
    );

    // Deleting the latest makes the previous one the latest; deleting again succeeds; a
    // version that never existed is unknown.
    assert_ok(alice.client.delete(&format!("{VERSION}/{second}"), json!({})).await);
    assert_ok(alice.client.delete(&format!("{VERSION}/{second}"), json!({})).await);
    assert_error(&alice.client.get(&format!("{VERSION}/{second}")).await, 404, "M_NOT_FOUND");
    assert_eq!(assert_ok(alice.client.get(VERSION).await)["version"], first);
    assert_error(
        &alice.client.delete(&format!("{VERSION}/999"), json!({})).await,
        404,
        "M_NOT_FOUND",
    );
    assert_error(&alice.client.get(&format!("{VERSION}/not-a-version")).await, 404, "M_NOT_FOUND");
    // A new version never reuses a deleted one's number.
    let third = create_version(&alice, "key3").await;
    assert!(third != first && third != second, "{first} {second} {third}");
    assert_ok(alice.client.delete(&format!("{VERSION}/{third}"), json!({})).await);
    assert_ok(alice.client.delete(&format!("{VERSION}/{first}"), json!({})).await);
    assert_error(&alice.client.get(VERSION).await, 404, "M_NOT_FOUND");
}

#[tokio::test]
async fn keys_are_stored_read_and_deleted_per_session_room_and_backup() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let version = create_version(&alice, "key").await;
    let other_room = "!other:example.org";

    let answer = assert_ok(put_session(&alice, &version, "s1", key(0, 0, false, "one")).await);
    assert_eq!(answer["count"], 1);
    let etag_after_one = answer["etag"].clone();
    assert!(etag_after_one.is_string());
    let answer = assert_ok(
        alice
            .client
            .put(
                &format!("{KEYS}/{}?version={version}", enc(ROOM)),
                json!({"sessions": {"s2": key(0, 0, false, "two")}}),
            )
            .await,
    );
    assert_eq!(answer["count"], 2);
    assert_ne!(answer["etag"], etag_after_one);
    let answer = assert_ok(
        alice
            .client
            .put(
                &format!("{KEYS}?version={version}"),
                json!({"rooms": {other_room: {"sessions": {"s3": key(0, 0, false, "three")}}}}),
            )
            .await,
    );
    assert_eq!(answer["count"], 3);
    let info = assert_ok(alice.client.get(VERSION).await);
    assert_eq!((info["count"].clone(), info["etag"].clone()), (json!(3), answer["etag"].clone()));

    let all = assert_ok(alice.client.get(&format!("{KEYS}?version={version}")).await);
    assert_eq!(all["rooms"][ROOM]["sessions"]["s1"], key(0, 0, false, "one"));
    assert_eq!(all["rooms"][ROOM]["sessions"]["s2"], key(0, 0, false, "two"));
    assert_eq!(all["rooms"][other_room]["sessions"]["s3"], key(0, 0, false, "three"));
    let room =
        assert_ok(alice.client.get(&format!("{KEYS}/{}?version={version}", enc(ROOM))).await);
    assert_eq!(room["sessions"].as_object().map(|sessions| sessions.len()), Some(2));
    let empty = assert_ok(
        alice.client.get(&format!("{KEYS}/{}?version={version}", enc("!none:example.org"))).await,
    );
    assert_eq!(empty, json!({"sessions": {}}));
    assert_error(
        &alice.client.get(&session_path(ROOM, "missing", &version)).await,
        404,
        "M_NOT_FOUND",
    );

    // Deleting one session, then a room, then everything; each answer has etag and count.
    let answer =
        assert_ok(alice.client.delete(&session_path(ROOM, "s1", &version), json!({})).await);
    assert_eq!(answer["count"], 2);
    let answer = assert_ok(
        alice.client.delete(&format!("{KEYS}/{}?version={version}", enc(ROOM)), json!({})).await,
    );
    assert_eq!(answer["count"], 1);
    let answer =
        assert_ok(alice.client.delete(&format!("{KEYS}?version={version}"), json!({})).await);
    assert_eq!(answer["count"], 0);
    assert!(answer["etag"].is_string());
    let all = assert_ok(alice.client.get(&format!("{KEYS}?version={version}")).await);
    assert_eq!(all, json!({"rooms": {}}));

    // Deleting a version deletes its keys.
    assert_ok(put_session(&alice, &version, "s1", key(0, 0, false, "one")).await);
    assert_ok(alice.client.delete(&format!("{VERSION}/{version}"), json!({})).await);
    assert_error(&alice.client.get(&format!("{KEYS}?version={version}")).await, 404, "M_NOT_FOUND");
}

#[tokio::test]
async fn a_stored_session_key_is_replaced_only_by_a_better_one() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let version = create_version(&alice, "key").await;
    let etag = |answer: &Value| answer["etag"].clone();

    let first = assert_ok(put_session(&alice, &version, "s", key(5, 2, false, "start")).await);
    // Not better: a higher index, or a higher forwarded count, or an exact tie.
    for worse in
        [key(6, 0, false, "later"), key(5, 3, false, "more-forwarded"), key(5, 2, false, "tie")]
    {
        let answer = assert_ok(put_session(&alice, &version, "s", worse).await);
        assert_eq!((etag(&answer), answer["count"].clone()), (etag(&first), json!(1)));
        assert_eq!(stored_ciphertext(&alice, &version, "s").await, "start");
    }
    // A lower forwarded count at the same index wins.
    let answer =
        assert_ok(put_session(&alice, &version, "s", key(5, 1, false, "less-forwarded")).await);
    assert_ne!(etag(&answer), etag(&first));
    assert_eq!(stored_ciphertext(&alice, &version, "s").await, "less-forwarded");
    // A lower index wins over a lower forwarded count.
    assert_ok(put_session(&alice, &version, "s", key(4, 9, false, "earlier")).await);
    assert_eq!(stored_ciphertext(&alice, &version, "s").await, "earlier");
    // A verified key wins over anything unverified, and an unverified one never replaces it.
    assert_ok(put_session(&alice, &version, "s", key(50, 50, true, "verified")).await);
    assert_eq!(stored_ciphertext(&alice, &version, "s").await, "verified");
    assert_ok(put_session(&alice, &version, "s", key(0, 0, false, "unverified")).await);
    assert_eq!(stored_ciphertext(&alice, &version, "s").await, "verified");
    let info = assert_ok(alice.client.get(VERSION).await);
    assert_eq!(info["count"], 1);
}

#[tokio::test]
async fn keys_go_only_to_the_latest_version_and_bad_requests_get_their_errcodes() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let data = key(0, 0, false, "x");

    // No backup at all.
    assert_error(&put_session(&alice, "1", "s", data.clone()).await, 404, "M_NOT_FOUND");
    let old = create_version(&alice, "old").await;
    let current = create_version(&alice, "new").await;
    // An older version that exists: M_WRONG_ROOM_KEYS_VERSION with the current version.
    let answer = put_session(&alice, &old, "s", data.clone()).await;
    assert_error(&answer, 403, "M_WRONG_ROOM_KEYS_VERSION");
    assert_eq!(answer.1["current_version"], current);
    // A version that never existed.
    assert_error(&put_session(&alice, "999", "s", data.clone()).await, 404, "M_NOT_FOUND");
    // The version parameter is required.
    assert_error(
        &alice.client.put(&format!("{KEYS}/{}/s", enc(ROOM)), data.clone()).await,
        400,
        "M_MISSING_PARAM",
    );
    assert_error(&alice.client.get(KEYS).await, 400, "M_MISSING_PARAM");
    // Malformed key data and room ids.
    assert_error(
        &put_session(&alice, &current, "s", json!({"first_message_index": 0})).await,
        400,
        "M_BAD_JSON",
    );
    assert_error(
        &alice
            .client
            .put(&format!("{KEYS}/{}/s?version={current}", enc("not-a-room")), data.clone())
            .await,
        400,
        "M_INVALID_PARAM",
    );
    assert_error(
        &alice
            .client
            .put(
                &format!("{KEYS}?version={current}"),
                json!({"rooms": {"not-a-room": {"sessions": {}}}}),
            )
            .await,
        400,
        "M_BAD_JSON",
    );
    assert_error(
        &alice
            .client
            .request_raw(
                reqwest::Method::PUT,
                &session_path(ROOM, "s", &current),
                Some(b"{".to_vec()),
            )
            .await,
        400,
        "M_NOT_JSON",
    );
    // Reads of an older version still work; unknown versions are not found.
    assert_eq!(
        assert_ok(alice.client.get(&format!("{KEYS}?version={old}")).await),
        json!({"rooms": {}})
    );
    assert_error(&alice.client.get(&format!("{KEYS}?version=999")).await, 404, "M_NOT_FOUND");
    assert_error(
        &alice.client.delete(&format!("{KEYS}?version=999"), json!({})).await,
        404,
        "M_NOT_FOUND",
    );
    // Without a token.
    assert_error(&server.client().get(VERSION).await, 401, "M_MISSING_TOKEN");
    assert_ok(put_session(&alice, &current, "s", data).await);
}
