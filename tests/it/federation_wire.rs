//! The room core and the transport wired together, over real signed HTTP between two servers
//! on 127.0.0.2 and 127.0.0.3 with TLS: B's identity joins A's room with `make_join` +
//! `send_join` v2 and sends a message in a transaction; A fetches B's keys from B over TLS
//! to check every signature, and A's local user sees the message.
//!
//! [Joining rooms](https://spec.matrix.org/v1.16/server-server-api/#joining-rooms),
//! [transactions](https://spec.matrix.org/v1.16/server-server-api/#transactions)

use federation::{Method, ServerSigningKey, signing};
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, MilliSecondsSinceUnixEpoch, OwnedEventId,
    RoomVersionId, ServerName,
};
use serde_json::{Value, json};

use crate::{
    federation_transport::{Pki, client_as, object, start_on},
    harness::{bodies, enc, timeline_has},
};

/// The event id of a PDU as the room version derives it.
fn event_id(pdu: &Value, room_version: &RoomVersionId) -> OwnedEventId {
    signing::event_id_of(&object(pdu.clone()), room_version).expect("a valid PDU")
}

/// The id of the state event of `kind` (empty state key unless given) in a `send_join` list.
fn state_event_id(
    events: &[Value],
    kind: &str,
    state_key: &str,
    room_version: &RoomVersionId,
) -> OwnedEventId {
    let event = events
        .iter()
        .find(|event| event["type"] == kind && event["state_key"] == state_key)
        .unwrap_or_else(|| panic!("no {kind} in {events:?}"));
    event_id(event, room_version)
}

/// A message from `sender` after `prev`, hashed and signed with `key`.
fn signed_message(
    key: &ServerSigningKey,
    room_version: &RoomVersionId,
    room_id: &str,
    sender: &str,
    (prev, depth): (&OwnedEventId, u64),
    auth_events: &[OwnedEventId],
    body: &str,
) -> (OwnedEventId, Value) {
    let mut pdu = object(json!({
        "room_id": room_id,
        "sender": sender,
        "type": "m.room.message",
        "content": {"msgtype": "m.text", "body": body},
        "prev_events": [prev],
        "auth_events": auth_events,
        "depth": depth,
        "origin_server_ts": MilliSecondsSinceUnixEpoch::now(),
    }));
    let event_id = key.hash_and_sign_pdu(&mut pdu, room_version).expect("test fixture");
    (event_id, serde_json::to_value(CanonicalJsonValue::Object(pdu)).expect("test fixture"))
}

#[tokio::test]
async fn a_remote_server_joins_and_talks_over_signed_http() {
    let pki = Pki::new();
    let a = start_on(&pki, "127.0.0.2").await;
    let b = start_on(&pki, "127.0.0.3").await;
    let a_name = <&ServerName>::try_from(a.server_name.as_str()).unwrap();
    let alice = a.register("alice").await;
    let room_id = alice.create_room(json!({"preset": "public_chat", "name": "Wire"})).await;
    let bob = format!("@bob:{}", b.server_name);
    // B's real identity: A fetches B's keys from B's TLS listener to check what it signs.
    let as_b = client_as(&b, &pki, true);
    let b_key = ServerSigningKey::load_or_generate(
        &b.data_dir.join("signing.key"),
        ServerName::parse(&b.server_name).unwrap(),
    )
    .unwrap();

    // make_join: the template is for bob, in a version B said it supports.
    let versions: String = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11"]
        .iter()
        .map(|version| format!("ver={version}&"))
        .collect();
    let path = format!(
        "/_matrix/federation/v1/make_join/{}/{}?{}",
        enc(&room_id),
        enc(&bob),
        versions.trim_end_matches('&')
    );
    let template = as_b.send_request(a_name, Method::GET, &path, None).await.unwrap();
    let room_version = RoomVersionId::try_from(template["room_version"].as_str().unwrap()).unwrap();
    assert_eq!(template["event"]["state_key"], bob.as_str(), "{template}");
    assert_eq!(template["event"]["content"]["membership"], "join", "{template}");

    // send_join: the signed join comes back with the state before it and its auth chain.
    let mut join: CanonicalJsonObject = object(template["event"].clone());
    let join_id = b_key.hash_and_sign_pdu(&mut join, &room_version).unwrap();
    let join_depth = join.get("depth").and_then(|depth| match depth {
        CanonicalJsonValue::Integer(depth) => u64::try_from(i64::from(*depth)).ok(),
        _ => None,
    });
    let join_depth = join_depth.unwrap();
    let path =
        format!("/_matrix/federation/v2/send_join/{}/{}", enc(&room_id), enc(join_id.as_str()));
    let body = serde_json::to_value(CanonicalJsonValue::Object(join)).unwrap();
    let joined = as_b.send_request(a_name, Method::PUT, &path, Some(body)).await.unwrap();
    assert_eq!(joined["origin"], a.server_name.as_str(), "{joined}");
    let state = joined["state"].as_array().unwrap();
    let auth_chain = joined["auth_chain"].as_array().unwrap();
    let create_id = state_event_id(state, "m.room.create", "", &room_version);
    let power_levels_id = state_event_id(state, "m.room.power_levels", "", &room_version);
    let alice_member = state_event_id(state, "m.room.member", &alice.user_id, &room_version);
    let join_rules = state.iter().find(|event| event["type"] == "m.room.join_rules").unwrap();
    assert_eq!(join_rules["content"]["join_rule"], "public");
    assert!(
        state.iter().all(|event| event["state_key"] != bob.as_str()),
        "the state is the one before the join: {joined}"
    );
    let chain_ids: Vec<OwnedEventId> =
        auth_chain.iter().map(|event| event_id(event, &room_version)).collect();
    for needed in [&create_id, &power_levels_id, &alice_member] {
        assert!(chain_ids.contains(needed), "{needed} missing from the auth chain: {joined}");
    }
    assert_eq!(event_id(&joined["event"], &room_version), join_id);
    let (status, member) = alice
        .client
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.member/{}",
            enc(&room_id),
            enc(&bob)
        ))
        .await;
    assert_eq!((status, member["membership"].as_str()), (200, Some("join")), "{member}");

    // A transaction with bob's message, signed by B: accepted and shown to alice.
    let auth_events = [create_id.clone(), power_levels_id.clone(), join_id.clone()];
    let (message_id, message) = signed_message(
        &b_key,
        &room_version,
        &room_id,
        &bob,
        (&join_id, join_depth + 1),
        &auth_events,
        "hello over the wire",
    );
    let transaction = json!({
        "origin": b.server_name,
        "origin_server_ts": MilliSecondsSinceUnixEpoch::now(),
        "pdus": [message],
    });
    let path = "/_matrix/federation/v1/send/txn1";
    let answer =
        as_b.send_request(a_name, Method::PUT, path, Some(transaction.clone())).await.unwrap();
    assert_eq!(answer["pdus"][message_id.as_str()], json!({}), "{answer}");
    alice.sync_until(None, |sync| timeline_has(sync, &room_id, message_id.as_str())).await;
    let messages = alice.messages(&room_id, "dir=b&limit=5").await;
    let chunk = messages["chunk"].as_array().unwrap();
    assert_eq!(bodies(chunk).first().map(String::as_str), Some("hello over the wire"));
    assert_eq!(chunk[0]["sender"], bob.as_str());

    // The same transaction unsigned: refused before it reaches the room.
    let response = reqwest::Client::new()
        .put(format!("{}/_matrix/federation/v1/send/txn2", a.base_url))
        .json(&transaction)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["errcode"], "M_UNAUTHORIZED", "{body}");

    // Signed, but not the shape of a transaction: M_BAD_JSON, and nothing of it is taken.
    for (txn, body) in [
        ("bad1", json!({"origin": b.server_name, "pdus": {"not": "an array"}})),
        ("bad2", json!({"origin": b.server_name, "pdus": [], "edus": "none"})),
    ] {
        let path = format!("/_matrix/federation/v1/send/{txn}");
        let error = as_b.send_request(a_name, Method::PUT, &path, Some(body)).await.unwrap_err();
        match error {
            federation::Error::Status { status, body, .. } => {
                assert_eq!(status, 400, "{body}");
                assert!(body.contains("M_BAD_JSON"), "{body}");
            }
            other => panic!("{txn}: {other}"),
        }
    }

    // A PDU signed with a key B never published is refused in the per-PDU results.
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = ServerSigningKey::load_or_generate(
        &stranger_dir.path().join("stranger.key"),
        ServerName::parse(&b.server_name).unwrap(),
    )
    .unwrap();
    assert_ne!(stranger.key_id(), b_key.key_id());
    let (forged_id, forged) = signed_message(
        &stranger,
        &room_version,
        &room_id,
        &bob,
        (&message_id, join_depth + 2),
        &auth_events,
        "forged",
    );
    let transaction = json!({
        "origin": b.server_name,
        "origin_server_ts": MilliSecondsSinceUnixEpoch::now(),
        "pdus": [forged],
    });
    let answer = as_b
        .send_request(a_name, Method::PUT, "/_matrix/federation/v1/send/txn3", Some(transaction))
        .await
        .unwrap();
    let error = answer["pdus"][forged_id.as_str()]["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("bad signature"), "{answer}");
    let messages = alice.messages(&room_id, "dir=b&limit=5").await;
    let chunk = messages["chunk"].as_array().unwrap();
    assert!(!bodies(chunk).contains(&"forged".to_owned()), "{messages}");
    let (status, event) = alice
        .client
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/event/{}",
            enc(&room_id),
            enc(forged_id.as_str())
        ))
        .await;
    assert_eq!(status, 404, "{event}");

    b.stop().await;
    a.stop().await;
}
