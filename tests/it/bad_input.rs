//! The bad-input table of the client-server API: every malformed request gets the spec's
//! errcode and status, never a 500, a panic or a hang, and nothing stored is lost; plus the
//! HTTP layer that browsers and clients rely on (CORS preflight, gzip, body size limit).
//!
//! [Standard error response](https://spec.matrix.org/v1.16/client-server-api/#standard-error-response),
//! [web browser clients](https://spec.matrix.org/v1.16/client-server-api/#web-browser-clients)

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{TestServer, User, assert_error, assert_ok, bodies, enc};

/// A room with two messages, to check afterwards that bad input destroyed nothing.
async fn stored_room(alice: &User) -> (String, Vec<String>) {
    let room_id = alice.create_room(json!({"preset": "private_chat", "name": "Keep me"})).await;
    alice.send_text(&room_id, "first").await;
    alice.send_text(&room_id, "second").await;
    (room_id, vec!["first".to_owned(), "second".to_owned()])
}

/// The room and its messages are still there, and the server still answers.
async fn assert_intact(alice: &User, room_id: &str, expected: &[String]) {
    let whoami = assert_ok(alice.client.get("/_matrix/client/v3/account/whoami").await);
    assert_eq!(whoami["user_id"], alice.user_id);
    let name = assert_ok(
        alice
            .client
            .get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.name", enc(room_id)))
            .await,
    );
    assert_eq!(name["name"], "Keep me");
    let messages = alice.messages(room_id, "dir=f&limit=100").await;
    assert_eq!(bodies(messages["chunk"].as_array().expect("chunk")), expected);
    let joined = assert_ok(alice.client.get("/_matrix/client/v3/joined_rooms").await);
    assert!(
        joined["joined_rooms"].as_array().expect("joined_rooms").iter().any(|room| room == room_id)
    );
}

#[tokio::test]
async fn malformed_json_is_m_not_json() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    for body in [&b"{"[..], b"{\"name\": ", b"not json", b"{'single': 'quotes'}", b"\xff\xfe"] {
        let answer = alice
            .client
            .request_raw(Method::POST, "/_matrix/client/v3/createRoom", Some(body.to_vec()))
            .await;
        assert_error(&answer, 400, "M_NOT_JSON");
    }
    let answer = server
        .client()
        .request_raw(Method::POST, "/_matrix/client/v3/login", Some(b"{".to_vec()))
        .await;
    assert_error(&answer, 400, "M_NOT_JSON");
    let room_id = alice.create_room(json!({})).await;
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/txn1", enc(&room_id));
    let answer = alice.client.request_raw(Method::PUT, &path, Some(b"{\"body\":".to_vec())).await;
    assert_error(&answer, 400, "M_NOT_JSON");
}

#[tokio::test]
async fn wrong_shape_is_m_bad_json() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let cases = [
        (Method::POST, "/_matrix/client/v3/createRoom", json!({"preset": 5})),
        (Method::POST, "/_matrix/client/v3/createRoom", json!({"invite": "not-a-list"})),
        (Method::POST, "/_matrix/client/v3/createRoom", json!([1, 2, 3])),
        (Method::POST, "/_matrix/client/v3/login", json!({"type": 1})),
        (Method::POST, "/_matrix/client/v3/user_directory/search", json!({"search_term": 7})),
    ];
    for (method, path, body) in cases {
        let answer =
            alice.client.request_raw(method, path, Some(body.to_string().into_bytes())).await;
        assert_error(&answer, 400, "M_BAD_JSON");
    }
    let room_id = alice.create_room(json!({})).await;
    // A JSON array is valid JSON but not an event content.
    let answer = alice.send_txn(&room_id, "array", json!(["a"])).await;
    assert_error(&answer, 400, "M_BAD_JSON");
    let answer = alice
        .client
        .post(&format!("/_matrix/client/v3/rooms/{}/invite", enc(&room_id)), json!({"user_id": 12}))
        .await;
    assert_error(&answer, 400, "M_BAD_JSON");
    let answer = alice
        .client
        .put(
            &format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room_id), enc(&alice.user_id)),
            json!({"typing": "yes"}),
        )
        .await;
    assert_error(&answer, 400, "M_BAD_JSON");
}

#[tokio::test]
async fn missing_and_unknown_tokens() {
    let server = TestServer::start().await;
    let anonymous = server.client();
    for path in [
        "/_matrix/client/v3/account/whoami",
        "/_matrix/client/v3/sync",
        "/_matrix/client/v3/joined_rooms",
    ] {
        assert_error(&anonymous.get(path).await, 401, "M_MISSING_TOKEN");
        let answer = anonymous.with_token("not-a-token").get(path).await;
        assert_error(&answer, 401, "M_UNKNOWN_TOKEN");
    }
    assert_error(
        &anonymous.post("/_matrix/client/v3/createRoom", json!({})).await,
        401,
        "M_MISSING_TOKEN",
    );
    // The deprecated query parameter is checked too.
    let answer = anonymous.get("/_matrix/client/v3/account/whoami?access_token=nope").await;
    assert_error(&answer, 401, "M_UNKNOWN_TOKEN");
    // A token is not a prefix match.
    let alice = server.register("alice").await;
    let truncated = &alice.client.access_token()[..alice.client.access_token().len() - 1];
    assert_error(
        &anonymous.with_token(truncated).get("/_matrix/client/v3/account/whoami").await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    let query =
        format!("/_matrix/client/v3/account/whoami?access_token={}", alice.client.access_token());
    assert_eq!(assert_ok(anonymous.get(&query).await)["user_id"], alice.user_id);
}

#[tokio::test]
async fn unknown_endpoint_and_wrong_method_are_m_unrecognized() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    for path in
        ["/_matrix/client/v3/no_such_endpoint", "/_matrix/client/v3/rooms", "/_matrix/nothing", "/"]
    {
        assert_error(&alice.client.get(path).await, 404, "M_UNRECOGNIZED");
    }
    assert_error(&server.client().get("/_matrix/client/v3/not_here").await, 404, "M_UNRECOGNIZED");
    let answer =
        alice.client.request_raw(Method::DELETE, "/_matrix/client/v3/createRoom", None).await;
    assert_error(&answer, 405, "M_UNRECOGNIZED");
    let answer = alice.client.request_raw(Method::GET, "/_matrix/client/v3/createRoom", None).await;
    assert_error(&answer, 405, "M_UNRECOGNIZED");
    let answer = alice.client.request_raw(Method::PUT, "/_matrix/client/v3/sync", None).await;
    assert_error(&answer, 405, "M_UNRECOGNIZED");
}

#[tokio::test]
async fn invalid_ids_in_path_are_m_invalid_param() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room_id = alice.create_room(json!({})).await;
    let bad_room = ["not-a-room", "@alice:localhost", "#alias:localhost"];
    for room in bad_room {
        let room = enc(room);
        assert_error(
            &alice.client.get(&format!("/_matrix/client/v3/rooms/{room}/state")).await,
            400,
            "M_INVALID_PARAM",
        );
        assert_error(
            &alice.client.get(&format!("/_matrix/client/v3/rooms/{room}/messages")).await,
            400,
            "M_INVALID_PARAM",
        );
        assert_error(
            &alice
                .client
                .put(
                    &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t1"),
                    json!({"body": "x"}),
                )
                .await,
            400,
            "M_INVALID_PARAM",
        );
        assert_error(
            &alice.client.post(&format!("/_matrix/client/v3/rooms/{room}/join"), json!({})).await,
            400,
            "M_INVALID_PARAM",
        );
    }
    for user in ["not-a-user", "alice", "@:", "!room:localhost"] {
        let user = enc(user);
        assert_error(
            &alice.client.get(&format!("/_matrix/client/v3/profile/{user}")).await,
            400,
            "M_INVALID_PARAM",
        );
        assert_error(
            &alice.client.get(&format!("/_matrix/client/v3/presence/{user}/status")).await,
            400,
            "M_INVALID_PARAM",
        );
    }
    let answer = alice
        .client
        .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room_id), enc("not-an-event")))
        .await;
    assert_error(&answer, 400, "M_INVALID_PARAM");
    // A user id in a body that is not a user id is the wrong shape or an invalid parameter.
    let answer = alice
        .client
        .post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room_id)),
            json!({"user_id": "bob"}),
        )
        .await;
    assert!(
        answer.0 == 400
            && matches!(answer.1["errcode"].as_str(), Some("M_INVALID_PARAM" | "M_BAD_JSON")),
        "{answer:?}"
    );
    // Bad query parameters.
    let answer = alice
        .client
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?limit=lots", enc(&room_id)))
        .await;
    assert_error(&answer, 400, "M_INVALID_PARAM");
    let answer = alice
        .client
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=sideways", enc(&room_id)))
        .await;
    assert_error(&answer, 400, "M_INVALID_PARAM");
    assert_error(
        &alice.client.get("/_matrix/client/v3/sync?since=garbage").await,
        400,
        "M_INVALID_PARAM",
    );
    assert_error(
        &alice.client.get("/_matrix/client/v3/sync?timeout=soon").await,
        400,
        "M_INVALID_PARAM",
    );
}

#[tokio::test]
async fn oversized_body_is_m_too_large() {
    let server = TestServer::start_with(&[("HEARTH_MAX_REQUEST_BYTES", "2048")]).await;
    let alice = server.register("alice").await;
    let (room_id, expected) = stored_room(&alice).await;
    let anonymous = server.client();
    let big = json!({"msgtype": "m.text", "body": "x".repeat(8192)}).to_string().into_bytes();
    let topic = json!({"topic": "t".repeat(8192)}).to_string().into_bytes();
    let create = json!({"name": "n".repeat(8192)}).to_string().into_bytes();
    let login = json!({"type": "m.login.password", "user": "alice", "password": "p".repeat(8192)})
        .to_string()
        .into_bytes();
    // Through every kind of body extractor: a message and a state event (raw bytes) and JSON
    // bodies, with and without a token.
    let cases = [
        (
            &alice.client,
            Method::PUT,
            format!("/_matrix/client/v3/rooms/{}/send/m.room.message/big", enc(&room_id)),
            big,
        ),
        (
            &alice.client,
            Method::PUT,
            format!("/_matrix/client/v3/rooms/{}/state/m.room.topic", enc(&room_id)),
            topic,
        ),
        (&alice.client, Method::POST, "/_matrix/client/v3/createRoom".to_owned(), create),
        (&anonymous, Method::POST, "/_matrix/client/v3/login".to_owned(), login),
    ];
    let mut wrong = Vec::new();
    for (client, method, path, body) in cases {
        let (status, answer) = client.request_raw(method.clone(), &path, Some(body)).await;
        if (status, answer["errcode"].as_str()) != (413, Some("M_TOO_LARGE")) {
            wrong.push(format!("{method} {path}: {status} {answer}"));
        }
    }
    assert!(wrong.is_empty(), "not 413 M_TOO_LARGE: {wrong:#?}");
    // A body just under the limit still goes through.
    let small = alice
        .send_txn(&room_id, "small", json!({"msgtype": "m.text", "body": "y".repeat(1024)}))
        .await;
    assert_ok(small);
    let mut expected = expected;
    expected.push("y".repeat(1024));
    assert_intact(&alice, &room_id, &expected).await;
}

#[tokio::test]
async fn taken_user_id_is_m_user_in_use() {
    let server = TestServer::start().await;
    server.register("alice").await;
    let body = json!({"username": "alice", "password": "another-password", "auth": {"type": "m.login.dummy"}});
    assert_error(
        &server.client().post("/_matrix/client/v3/register", body).await,
        400,
        "M_USER_IN_USE",
    );
    let answer = server.client().get("/_matrix/client/v3/register/available?username=alice").await;
    assert_error(&answer, 400, "M_USER_IN_USE");
    // The original account is untouched.
    let login = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "secret-password"});
    assert_ok(server.client().post("/_matrix/client/v3/login", login).await);
}

/// A battery of garbage against many endpoints: each answer is a 4xx Matrix error (never a
/// 5xx, never a hang), and afterwards the stored room and its messages are intact.
#[tokio::test]
async fn garbage_never_breaks_the_server_or_loses_data() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let (room_id, expected) = stored_room(&alice).await;
    let room = enc(&room_id);
    let user = enc(&alice.user_id);
    let endpoints: Vec<(Method, String)> = vec![
        (Method::POST, "/_matrix/client/v3/register".into()),
        (Method::POST, "/_matrix/client/v3/login".into()),
        (Method::POST, "/_matrix/client/v3/createRoom".into()),
        (Method::PUT, format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/g1")),
        (Method::PUT, format!("/_matrix/client/v3/rooms/{room}/state/m.room.create")),
        (Method::PUT, format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{user}")),
        (Method::PUT, format!("/_matrix/client/v3/rooms/{room}/state/m.room.join_rules")),
        (Method::POST, format!("/_matrix/client/v3/rooms/{room}/invite")),
        (Method::POST, format!("/_matrix/client/v3/rooms/{room}/kick")),
        (Method::POST, format!("/_matrix/client/v3/rooms/{room}/ban")),
        (Method::POST, format!("/_matrix/client/v3/rooms/{room}/read_markers")),
        (Method::PUT, format!("/_matrix/client/v3/rooms/{room}/typing/{user}")),
        (Method::PUT, format!("/_matrix/client/v3/profile/{user}/displayname")),
        (Method::PUT, format!("/_matrix/client/v3/user/{user}/account_data/m.custom")),
        (Method::POST, format!("/_matrix/client/v3/user/{user}/filter")),
        (Method::PUT, format!("/_matrix/client/v3/presence/{user}/status")),
        (Method::POST, "/_matrix/client/v3/user_directory/search".into()),
        (Method::POST, "/_matrix/client/v3/account/password".into()),
        (Method::POST, "/_matrix/client/v3/delete_devices".into()),
        (Method::PUT, format!("/_matrix/client/v3/directory/room/{}", enc("#garbage:localhost"))),
    ];
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let garbage: Vec<Vec<u8>> = vec![
        b"{".to_vec(),
        b"[]".to_vec(),
        b"null".to_vec(),
        b"\"text\"".to_vec(),
        b"42".to_vec(),
        b"{\"name\": {\"nested\": [1, 2, {\"deep\": null}]}}".to_vec(),
        b"{\"users\": {\"@alice:localhost\": \"100\"}}".to_vec(),
        b"{\"membership\": \"join\", \"displayname\": 5}".to_vec(),
        b"{\"join_rule\": 7}".to_vec(),
        deep.into_bytes(),
        vec![0, 159, 146, 150],
    ];
    for (method, path) in &endpoints {
        for body in &garbage {
            let (status, answer) =
                alice.client.request_raw(method.clone(), path, Some(body.clone())).await;
            assert!(
                status < 500,
                "{method} {path} with {:?}: {status} {answer}",
                String::from_utf8_lossy(&body[..body.len().min(40)])
            );
            // A user-interactive-auth challenge is a 401 without errcode.
            if status != 200 && answer.get("flows").is_none() {
                assert!(
                    answer["errcode"].as_str().is_some_and(|code| code.starts_with("M_")),
                    "{method} {path}: {answer}"
                );
            }
        }
    }
    // Queries with garbage.
    for query in [
        "filter=%7B",
        "filter=nope",
        "since=s99999999999999999999999",
        "timeout=-1",
        "full_state=maybe",
    ] {
        let (status, answer) = alice.client.get(&format!("/_matrix/client/v3/sync?{query}")).await;
        assert!(status < 500, "sync?{query}: {status} {answer}");
    }
    for query in ["from=zzz", "to=!!", "limit=-5", "filter=%5B%5D", "dir=f&from=s999999999"] {
        let (status, answer) =
            alice.client.get(&format!("/_matrix/client/v3/rooms/{room}/messages?{query}")).await;
        assert!(status < 500, "messages?{query}: {status} {answer}");
    }
    assert_intact(&alice, &room_id, &expected).await;
}

#[tokio::test]
async fn cors_preflight_and_headers() {
    let server = TestServer::start().await;
    let client = server.client();
    let response = client
        .request_full(
            Method::OPTIONS,
            "/_matrix/client/v3/login",
            &[
                ("Origin", "https://app.example.org"),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "authorization, content-type"),
            ],
            None,
        )
        .await;
    assert!(response.status().is_success(), "preflight status {}", response.status());
    let headers = response.headers();
    assert_eq!(
        headers.get("access-control-allow-origin").and_then(|v| v.to_str().ok()),
        Some("*"),
        "{headers:?}"
    );
    let methods =
        headers.get("access-control-allow-methods").and_then(|v| v.to_str().ok()).unwrap_or("");
    for method in ["GET", "POST", "PUT", "DELETE", "OPTIONS"] {
        assert!(methods.contains(method), "allow-methods {methods}");
    }
    let allowed_headers = headers
        .get("access-control-allow-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_lowercase();
    assert!(
        allowed_headers.contains("authorization") && allowed_headers.contains("content-type"),
        "{allowed_headers}"
    );
    // A preflight for an authenticated endpoint needs no token.
    let response = client
        .request_full(
            Method::OPTIONS,
            "/_matrix/client/v3/sync",
            &[("Origin", "https://app.example.org"), ("Access-Control-Request-Method", "GET")],
            None,
        )
        .await;
    assert!(response.status().is_success(), "preflight of /sync: {}", response.status());
    // Plain answers, errors included, carry the header too.
    let response = client
        .request_full(
            Method::GET,
            "/_matrix/client/versions",
            &[("Origin", "https://app.example.org")],
            None,
        )
        .await;
    assert_eq!(
        response.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()),
        Some("*")
    );
    let response = client
        .request_full(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            &[("Origin", "https://app.example.org")],
            None,
        )
        .await;
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()),
        Some("*")
    );
}

#[tokio::test]
async fn large_answers_are_gzipped_when_asked() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room_id = alice.create_room(json!({"name": "Big"})).await;
    for index in 0..30 {
        alice
            .send_text(
                &room_id,
                &format!("message number {index} with some padding to make it larger"),
            )
            .await;
    }
    let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=30", enc(&room_id));
    let response =
        alice.client.request_full(Method::GET, &path, &[("Accept-Encoding", "gzip")], None).await;
    assert_eq!(response.status(), 200);
    let headers = format!("{:?}", response.headers());
    assert_eq!(
        response.headers().get("content-encoding").and_then(|v| v.to_str().ok()),
        Some("gzip"),
        "{headers}"
    );
    let compressed = response.bytes().await.unwrap();
    assert_eq!(&compressed[..2], &[0x1f, 0x8b], "gzip magic");
    // Without Accept-Encoding the same answer is plain JSON, and larger than compressed.
    let response = alice.client.request_full(Method::GET, &path, &[], None).await;
    assert!(response.headers().get("content-encoding").is_none());
    let plain: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(plain["chunk"].as_array().unwrap().len(), 30);
    assert!(compressed.len() < plain.to_string().len(), "compressed {} >= plain", compressed.len());
    // /sync (what clients fetch the most) is compressed too.
    let response = alice
        .client
        .request_full(Method::GET, "/_matrix/client/v3/sync", &[("Accept-Encoding", "gzip")], None)
        .await;
    assert_eq!(
        response.headers().get("content-encoding").and_then(|v| v.to_str().ok()),
        Some("gzip")
    );
}

/// Event content must be canonical JSON to be hashed and signed: floats and integers outside
/// ±(2^53 - 1) are refused with 400 (never a 500), and the room is untouched.
#[tokio::test]
async fn non_canonical_json_content_is_refused() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let (room_id, expected) = stored_room(&alice).await;
    let bodies_sent: [&[u8]; 4] = [
        b"{\"msgtype\": \"m.text\", \"body\": \"f\", \"n\": 1.5}",
        b"{\"msgtype\": \"m.text\", \"body\": \"big\", \"n\": 9007199254740993}",
        b"{\"msgtype\": \"m.text\", \"body\": \"small\", \"n\": -9007199254740993}",
        b"{\"msgtype\": \"m.text\", \"body\": \"exp\", \"n\": 1e3}",
    ];
    for (index, body) in bodies_sent.iter().enumerate() {
        let path =
            format!("/_matrix/client/v3/rooms/{}/send/m.room.message/n{index}", enc(&room_id));
        let (status, answer) =
            alice.client.request_raw(Method::PUT, &path, Some(body.to_vec())).await;
        assert_eq!(status, 400, "{}: {answer}", String::from_utf8_lossy(body));
        assert!(
            matches!(answer["errcode"].as_str(), Some("M_BAD_JSON" | "M_NOT_JSON")),
            "{answer}"
        );
        let path =
            crate::harness::state_path(&room_id, "org.example.numbers", &format!("k{index}"));
        let (status, answer) =
            alice.client.request_raw(Method::PUT, &path, Some(body.to_vec())).await;
        assert_eq!(status, 400, "state {}: {answer}", String::from_utf8_lossy(body));
    }
    // The largest safe integer is fine.
    let ok = alice
        .send_txn(
            &room_id,
            "max",
            json!({"msgtype": "m.text", "body": "max", "n": 9_007_199_254_740_991_i64}),
        )
        .await;
    assert_ok(ok);
    let mut expected = expected;
    expected.push("max".to_owned());
    assert_intact(&alice, &room_id, &expected).await;
}
