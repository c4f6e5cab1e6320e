//! Knocking: a user of B knocks on A's room over signed HTTP (`make_knock` + `send_knock`,
//! two real servers on 127.0.0.2 and 127.0.0.3 with TLS), A's admin sees the knock in `/sync`
//! and invites the knocker; the spec's refusals; a local user knocking through the
//! client API (`POST /knock/{roomIdOrAlias}`); and a user of B knocking on A's room through
//! B's client API, which sends the `make_knock`/`send_knock` itself.
//!
//! [Knocking upon a room](https://spec.matrix.org/v1.16/server-server-api/#knocking-upon-a-room),
//! [knocking on rooms](https://spec.matrix.org/v1.16/client-server-api/#knocking-on-rooms)

use federation::{Client, Error, Method, ServerSigningKey};
use ruma::{CanonicalJsonValue, RoomVersionId, ServerName};
use serde_json::{Value, json};

use crate::{
    federation_transport::{Pki, client_as, object, start_on},
    harness::{TestServer, User, assert_error, assert_ok, enc, state_path, timeline_has},
};

/// `ver=1&ver=2...` for the given versions.
fn versions_query(versions: &[&str]) -> String {
    versions.iter().map(|version| format!("ver={version}")).collect::<Vec<_>>().join("&")
}

const ALL_VERSIONS: [&str; 11] = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11"];

/// A signed federation request whose refusal is returned as (status, body).
async fn send(
    client: &Client,
    to: &ServerName,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    match client.send_request(to, method, path, body).await {
        Ok(answer) => (200, answer),
        Err(Error::Status { status, body, .. }) => {
            (status, serde_json::from_str(&body).unwrap_or(Value::Null))
        }
        Err(error) => panic!("request failed: {error}"),
    }
}

/// A room of `creator` in `room_version` whose join rule is `join_rule`.
async fn room_with_join_rule(creator: &User, room_version: &str, join_rule: &str) -> String {
    let room_id = creator
        .create_room(json!({
            "preset": "private_chat",
            "room_version": room_version,
            "name": "Knock here",
        }))
        .await;
    let answer =
        creator.put_state(&room_id, "m.room.join_rules", "", json!({"join_rule": join_rule})).await;
    assert_ok(answer);
    room_id
}

fn signing_key(server: &TestServer) -> ServerSigningKey {
    ServerSigningKey::load_or_generate(
        &server.data_dir.join("signing.key"),
        ServerName::parse(&server.server_name).expect("test setup"),
    )
    .expect("test setup")
}

#[tokio::test]
async fn a_remote_user_knocks_and_a_local_admin_invites_them() {
    let pki = Pki::new();
    let a = start_on(&pki, "127.0.0.2").await;
    let b = start_on(&pki, "127.0.0.3").await;
    let a_name = <&ServerName>::try_from(a.server_name.as_str()).unwrap();
    let alice = a.register("alice").await;
    let room_id = room_with_join_rule(&alice, "11", "knock").await;
    let since = alice.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let bob = format!("@bob:{}", b.server_name);
    let as_b = client_as(&b, &pki, true);
    let b_key = signing_key(&b);

    // make_knock: a knock template for bob in the room's version.
    let path = format!(
        "/_matrix/federation/v1/make_knock/{}/{}?{}",
        enc(&room_id),
        enc(&bob),
        versions_query(&ALL_VERSIONS)
    );
    let template = assert_ok(send(&as_b, a_name, Method::GET, &path, None).await);
    assert_eq!(template["room_version"], "11", "{template}");
    assert_eq!(template["event"]["type"], "m.room.member", "{template}");
    assert_eq!(template["event"]["state_key"], bob.as_str(), "{template}");
    assert_eq!(template["event"]["sender"], bob.as_str(), "{template}");
    assert_eq!(template["event"]["content"]["membership"], "knock", "{template}");

    // send_knock: accepted, answered with the room's state for bob's client.
    let mut knock = object(template["event"].clone());
    knock.insert(
        "content".into(),
        CanonicalJsonValue::Object(object(json!({"membership": "knock", "reason": "let me in"}))),
    );
    let knock_id = b_key.hash_and_sign_pdu(&mut knock, &RoomVersionId::V11).unwrap();
    let path =
        format!("/_matrix/federation/v1/send_knock/{}/{}", enc(&room_id), enc(knock_id.as_str()));
    let body = serde_json::to_value(CanonicalJsonValue::Object(knock)).unwrap();
    let answer = assert_ok(send(&as_b, a_name, Method::PUT, &path, Some(body)).await);
    let state = answer["knock_room_state"].as_array().unwrap();
    let kinds: Vec<&str> = state.iter().filter_map(|event| event["type"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"m.room.create"), "{answer}");
    for kind in ["m.room.join_rules", "m.room.name"] {
        assert!(kinds.contains(&kind), "{kind} missing: {answer}");
    }
    let name = state.iter().find(|event| event["type"] == "m.room.name").unwrap();
    assert_eq!(name["content"]["name"], "Knock here");
    assert!(name["signatures"].is_object(), "full PDUs are sent: {answer}");

    // The knock is a state event of the room: alice sees it and can let bob in.
    let sync =
        alice.sync_until(Some(since), |sync| timeline_has(sync, &room_id, knock_id.as_str())).await;
    let event = crate::harness::timeline(&sync, &room_id)
        .iter()
        .find(|event| event["event_id"] == knock_id.as_str())
        .unwrap();
    assert_eq!(event["content"]["membership"], "knock", "{event}");
    assert_eq!(event["content"]["reason"], "let me in", "{event}");
    let member = assert_ok(alice.client.get(&state_path(&room_id, "m.room.member", &bob)).await);
    assert_eq!(member["membership"], "knock");
    alice.invite(&room_id, &bob).await;
    let member = assert_ok(alice.client.get(&state_path(&room_id, "m.room.member", &bob)).await);
    assert_eq!(member["membership"], "invite");

    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn knocks_the_room_does_not_take_are_refused() {
    let pki = Pki::new();
    let a = start_on(&pki, "127.0.0.2").await;
    let b = start_on(&pki, "127.0.0.3").await;
    let a_name = <&ServerName>::try_from(a.server_name.as_str()).unwrap();
    let alice = a.register("alice").await;
    let knock_room = room_with_join_rule(&alice, "11", "knock").await;
    let public_room = room_with_join_rule(&alice, "11", "public").await;
    let old_room = room_with_join_rule(&alice, "6", "knock").await;
    let bob = format!("@bob:{}", b.server_name);
    let as_b = client_as(&b, &pki, true);
    let b_key = signing_key(&b);
    let make_knock = |room_id: &str, user_id: &str, versions: &[&str]| {
        format!(
            "/_matrix/federation/v1/make_knock/{}/{}?{}",
            enc(room_id),
            enc(user_id),
            versions_query(versions)
        )
    };

    // The room's version is not among those B supports.
    let path = make_knock(&knock_room, &bob, &["1", "2", "3", "4", "5", "6"]);
    let answer = send(&as_b, a_name, Method::GET, &path, None).await;
    assert_error(&answer, 400, "M_INCOMPATIBLE_ROOM_VERSION");
    assert_eq!(answer.1["room_version"], "11", "{}", answer.1);
    // `ver` is required.
    let path = format!("/_matrix/federation/v1/make_knock/{}/{}", enc(&knock_room), enc(&bob));
    assert_error(&send(&as_b, a_name, Method::GET, &path, None).await, 400, "M_MISSING_PARAM");
    // A room that takes no knocks, a version without knocking, a user of another server.
    for (room_id, user_id) in [
        (&public_room, bob.as_str()),
        (&old_room, bob.as_str()),
        (&knock_room, alice.user_id.as_str()),
    ] {
        let path = make_knock(room_id, user_id, &ALL_VERSIONS);
        assert_error(&send(&as_b, a_name, Method::GET, &path, None).await, 403, "M_FORBIDDEN");
    }
    // A room A does not know.
    let unknown = format!("!unknown:{}", a.server_name);
    let path = make_knock(&unknown, &bob, &ALL_VERSIONS);
    assert_error(&send(&as_b, a_name, Method::GET, &path, None).await, 404, "M_NOT_FOUND");

    // send_knock: a join is not a knock; a knock on a public room is refused.
    let path = make_knock(&knock_room, &bob, &ALL_VERSIONS);
    let template = assert_ok(send(&as_b, a_name, Method::GET, &path, None).await);
    let mut join = object(template["event"].clone());
    join.insert(
        "content".into(),
        CanonicalJsonValue::Object(object(json!({"membership": "join"}))),
    );
    let join_id = b_key.hash_and_sign_pdu(&mut join, &RoomVersionId::V11).unwrap();
    let path =
        format!("/_matrix/federation/v1/send_knock/{}/{}", enc(&knock_room), enc(join_id.as_str()));
    let body = serde_json::to_value(CanonicalJsonValue::Object(join)).unwrap();
    assert_error(
        &send(&as_b, a_name, Method::PUT, &path, Some(body)).await,
        400,
        "M_INVALID_PARAM",
    );
    let mut knock = object(template["event"].clone());
    knock.insert("room_id".into(), CanonicalJsonValue::String(public_room.clone()));
    let knock_id = b_key.hash_and_sign_pdu(&mut knock, &RoomVersionId::V11).unwrap();
    let path = format!(
        "/_matrix/federation/v1/send_knock/{}/{}",
        enc(&public_room),
        enc(knock_id.as_str())
    );
    let body = serde_json::to_value(CanonicalJsonValue::Object(knock)).unwrap();
    assert_error(&send(&as_b, a_name, Method::PUT, &path, Some(body)).await, 403, "M_FORBIDDEN");
    let path = format!("/_matrix/federation/v1/send_knock/{}/$abc", enc(&unknown));
    let body = json!({"type": "m.room.member"});
    assert_error(&send(&as_b, a_name, Method::PUT, &path, Some(body)).await, 404, "M_NOT_FOUND");
    let member = alice.client.get(&state_path(&public_room, "m.room.member", &bob)).await;
    assert_error(&member, 404, "M_NOT_FOUND");

    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn a_local_user_knocks_through_the_client_api() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let carol = server.register("carol").await;
    let room_id = room_with_join_rule(&alice, "11", "knock").await;
    let alias = format!("#knockers:{}", server.server_name);
    assert_ok(
        alice
            .client
            .put(
                &format!("/_matrix/client/v3/directory/room/{}", enc(&alias)),
                json!({"room_id": room_id}),
            )
            .await,
    );
    let since = alice.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();

    let answer = carol
        .client
        .post(&format!("/_matrix/client/v3/knock/{}", enc(&alias)), json!({"reason": "hello"}))
        .await;
    assert_eq!(assert_ok(answer)["room_id"], room_id.as_str());
    // The knocker sees the room under `knock`, with its stripped state.
    let sync = carol.sync_until(None, |sync| sync["rooms"]["knock"][&room_id].is_object()).await;
    let events = sync["rooms"]["knock"][&room_id]["knock_state"]["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().filter_map(|event| event["type"].as_str()).collect();
    assert!(kinds.contains(&"m.room.join_rules") && kinds.contains(&"m.room.name"), "{sync}");
    let own = events.iter().find(|event| event["type"] == "m.room.member").unwrap();
    assert_eq!(
        (own["state_key"].as_str(), own["content"]["membership"].as_str()),
        (Some(carol.user_id.as_str()), Some("knock"))
    );
    // The admin sees the knock and invites; the knocker sees the invite.
    alice
        .sync_until(Some(since), |sync| {
            crate::harness::timeline(sync, &room_id).iter().any(|event| {
                event["state_key"] == carol.user_id.as_str()
                    && event["content"]["membership"] == "knock"
            })
        })
        .await;
    alice.invite(&room_id, &carol.user_id).await;
    carol.sync_until(None, |sync| sync["rooms"]["invite"][&room_id].is_object()).await;

    // Refusals: a room without the knock rule, an unknown room, a room of another server.
    let public_room = room_with_join_rule(&alice, "11", "public").await;
    let knock = |target: &str| format!("/_matrix/client/v3/knock/{}", enc(target));
    assert_error(&carol.client.post(&knock(&public_room), json!({})).await, 403, "M_FORBIDDEN");
    let unknown = format!("!unknown:{}", server.server_name);
    assert_error(&carol.client.post(&knock(&unknown), json!({})).await, 404, "M_NOT_FOUND");
    assert_error(
        &carol.client.post(&knock("!elsewhere:remote.test"), json!({})).await,
        404,
        "M_NOT_FOUND",
    );
    server.stop().await;
}

#[tokio::test]
async fn a_user_knocks_through_their_own_server_then_is_let_in() {
    let pki = Pki::new();
    let a = start_on(&pki, "127.0.0.2").await;
    let b = start_on(&pki, "127.0.0.3").await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let dave = b.register("dave").await;
    let room_id = room_with_join_rule(&alice, "11", "knock").await;
    let since = alice.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let knock = |target: &str| {
        format!("/_matrix/client/v3/knock/{}?via={}", enc(target), enc(&a.server_name))
    };

    // B is not in the room: the knock goes through A.
    let answer = bob.client.post(&knock(&room_id), json!({"reason": "hello from B"})).await;
    assert_eq!(assert_ok(answer)["room_id"], room_id.as_str());
    let sync = bob.sync_until(None, |sync| sync["rooms"]["knock"][&room_id].is_object()).await;
    let events = sync["rooms"]["knock"][&room_id]["knock_state"]["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().filter_map(|event| event["type"].as_str()).collect();
    assert!(kinds.contains(&"m.room.create") && kinds.contains(&"m.room.name"), "{sync}");
    let name = events.iter().find(|event| event["type"] == "m.room.name").unwrap();
    assert_eq!(name["content"]["name"], "Knock here");

    // A knock can be taken back while B is still not in the room: `make_leave`/`send_leave`
    // through A, found from the knock's stripped state.
    assert_ok(dave.client.post(&knock(&room_id), json!({})).await);
    let knocked = dave.sync_until(None, |sync| sync["rooms"]["knock"][&room_id].is_object()).await;
    assert_ok(dave.room_post(&room_id, "leave", json!({})).await);
    let since_knock = knocked["next_batch"].as_str().map(str::to_owned);
    dave.sync_until(since_knock, |sync| sync["rooms"]["leave"][&room_id].is_object()).await;
    alice
        .sync_until(Some(since.clone()), |sync| {
            crate::harness::timeline(sync, &room_id).iter().any(|event| {
                event["state_key"] == dave.user_id.as_str()
                    && event["content"]["membership"] == "leave"
            })
        })
        .await;

    // A's admin sees the knock with its reason and lets bob in; bob joins.
    alice
        .sync_until(Some(since.clone()), |sync| {
            crate::harness::timeline(sync, &room_id).iter().any(|event| {
                event["state_key"] == bob.user_id.as_str()
                    && event["content"]["membership"] == "knock"
                    && event["content"]["reason"] == "hello from B"
            })
        })
        .await;
    alice.invite(&room_id, &bob.user_id).await;
    bob.sync_until(None, |sync| sync["rooms"]["invite"][&room_id].is_object()).await;
    bob.join(&room_id).await;
    let member =
        assert_ok(alice.client.get(&state_path(&room_id, "m.room.member", &bob.user_id)).await);
    assert_eq!(member["membership"], "join");

    // A room that takes no knocks: A's refusal reaches the client as 403.
    let public_room = room_with_join_rule(&alice, "11", "public").await;
    assert_error(&dave.client.post(&knock(&public_room), json!({})).await, 403, "M_FORBIDDEN");

    b.stop().await;
    a.stop().await;
}
