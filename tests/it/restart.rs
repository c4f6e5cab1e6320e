//! Restart: a server stopped and started again on the same data directory keeps accounts,
//! access tokens, devices, rooms, history, account data and sync tokens.

use serde_json::json;

use crate::harness::{TestServer, assert_ok, bodies, enc, timeline};

/// Re-points a user's client at the restarted server (same token).
#[tokio::test]
async fn everything_survives_a_restart() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    assert_ok(
        alice
            .client
            .put(
                &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id)),
                json!({"displayname": "Alice"}),
            )
            .await,
    );
    let room_id = alice.create_room(json!({"preset": "public_chat", "name": "Persistent", "room_alias_name": "persist", "topic": "kept"})).await;
    bob.join(&room_id).await;
    let mut sent = Vec::new();
    let mut sent_ids = Vec::new();
    for index in 0..15 {
        let (sender, name) = if index % 2 == 0 { (&alice, "alice") } else { (&bob, "bob") };
        sent.push(format!("{name} {index}"));
        sent_ids.push(sender.send_text(&room_id, &format!("{name} {index}")).await);
    }
    let private =
        alice.create_room(json!({"preset": "private_chat", "invite": [bob.user_id]})).await;
    assert_ok(
        alice
            .client
            .put(
                &format!(
                    "/_matrix/client/v3/user/{}/account_data/org.example.settings",
                    enc(&alice.user_id)
                ),
                json!({"theme": "dark"}),
            )
            .await,
    );
    // Bob's client is fully caught up before the restart.
    let before = bob.sync_until(None, |sync| sync["rooms"]["join"][&room_id].is_object()).await;
    let caught_up = bob.sync(before["next_batch"].as_str(), 0).await;
    let since = caught_up["next_batch"].as_str().unwrap().to_owned();
    let alice_since = alice.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();

    let data_dir = server.data_dir.clone();
    let temp = server.stop().await.expect("temp dir handed back");
    assert_eq!(temp.path(), data_dir);
    let server = TestServer::start_in(data_dir.clone(), &[]).await;
    let alice = alice.on(&server);
    let bob = bob.on(&server);

    // Access tokens.
    let whoami = assert_ok(alice.client.get("/_matrix/client/v3/account/whoami").await);
    assert_eq!(
        (whoami["user_id"].as_str(), whoami["device_id"].as_str()),
        (Some(alice.user_id.as_str()), Some(alice.device_id.as_str()))
    );
    assert_eq!(
        assert_ok(bob.client.get("/_matrix/client/v3/account/whoami").await)["user_id"],
        bob.user_id
    );
    // Accounts: password login still works, and the profile.
    let login = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "secret-password"});
    assert_ok(server.client().post("/_matrix/client/v3/login", login).await);
    let devices = assert_ok(alice.client.get("/_matrix/client/v3/devices").await);
    assert!(
        devices["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|device| device["device_id"] == alice.device_id),
        "{devices}"
    );
    let profile = assert_ok(
        server.client().get(&format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id))).await,
    );
    assert_eq!(profile["displayname"], "Alice");
    // Registration knows the names are taken.
    let answer = server.client().get("/_matrix/client/v3/register/available?username=bob").await;
    assert_eq!(answer.1["errcode"], "M_USER_IN_USE");
    // Rooms, state and aliases.
    let joined = assert_ok(bob.client.get("/_matrix/client/v3/joined_rooms").await);
    assert!(joined["joined_rooms"].as_array().unwrap().contains(&json!(room_id)), "{joined}");
    let name = assert_ok(
        bob.client
            .get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.name", enc(&room_id)))
            .await,
    );
    assert_eq!(name["name"], "Persistent");
    let alias = assert_ok(
        bob.client
            .get(&format!("/_matrix/client/v3/directory/room/{}", enc("#persist:localhost")))
            .await,
    );
    assert_eq!(alias["room_id"], room_id);
    let members = assert_ok(
        bob.client.get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room_id))).await,
    );
    assert_eq!(members["joined"].as_object().unwrap().len(), 2);
    // History.
    let messages = bob.messages(&room_id, "dir=f&limit=100").await;
    assert_eq!(bodies(messages["chunk"].as_array().unwrap()), sent);
    let messages = bob.messages(&room_id, "dir=b&limit=5").await;
    let mut newest: Vec<String> = sent.iter().rev().take(5).cloned().collect();
    assert_eq!(bodies(messages["chunk"].as_array().unwrap()), newest);
    let older = bob
        .messages(&room_id, &format!("dir=b&limit=5&from={}", messages["end"].as_str().unwrap()))
        .await;
    newest = sent.iter().rev().skip(5).take(5).cloned().collect();
    assert_eq!(bodies(older["chunk"].as_array().unwrap()), newest);
    // Account data.
    let data = assert_ok(
        alice
            .client
            .get(&format!(
                "/_matrix/client/v3/user/{}/account_data/org.example.settings",
                enc(&alice.user_id)
            ))
            .await,
    );
    assert_eq!(data["theme"], "dark");
    // The invite is still pending.
    let initial = bob.sync(None, 0).await;
    assert!(initial["rooms"]["invite"][&private].is_object(), "invite lost: {initial}");

    // An old sync token: nothing new yet, so an incremental sync has no timeline events.
    let quiet = bob.sync(Some(&since), 0).await;
    assert!(timeline(&quiet, &room_id).is_empty(), "old events returned again: {quiet}");
    // New events after the restart get new positions: only they come back.
    let new_event = alice.send_text(&room_id, "after restart").await;
    let incremental =
        bob.sync_until(Some(since.clone()), |sync| !timeline(sync, &room_id).is_empty()).await;
    let events = timeline(&incremental, &room_id);
    assert_eq!(bodies(events), vec!["after restart".to_owned()], "{incremental}");
    assert_eq!(events[0]["event_id"], new_event);
    assert_eq!(incremental["rooms"]["join"][&room_id]["timeline"]["limited"], false);
    let answer = alice.sync(Some(&alice_since), 0).await;
    assert_eq!(bodies(timeline(&answer, &room_id)), vec!["after restart".to_owned()]);
    // The next token moves on from the old one.
    let next = incremental["next_batch"].as_str().unwrap();
    assert_ne!(next, since);
    assert!(timeline(&bob.sync(Some(next), 0).await, &room_id).is_empty());

    // New rooms and joins still work, and ids do not collide with old ones.
    bob.join(&private).await;
    let room_two = bob.create_room(json!({"name": "After"})).await;
    assert_ne!(room_two, room_id);
    let event = bob.send_text(&room_two, "fresh").await;
    assert!(!sent_ids.contains(&event) && event != new_event);

    // A second restart keeps what the first restarted server wrote.
    let alice_token = alice.client.access_token().to_owned();
    drop(alice);
    drop(bob);
    assert!(server.stop().await.is_none());
    let server = TestServer::start_in(data_dir, &[]).await;
    let alice = server.client().with_token(&alice_token);
    let messages = assert_ok(
        alice
            .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1", enc(&room_id)))
            .await,
    );
    assert_eq!(messages["chunk"][0]["content"]["body"], "after restart");
    let members = assert_ok(
        alice.get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&private))).await,
    );
    assert_eq!(members["joined"].as_object().unwrap().len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn logged_out_tokens_stay_dead_after_a_restart() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let token = alice.client.access_token().to_owned();
    assert_ok(alice.client.post("/_matrix/client/v3/logout", json!({})).await);
    let data_dir = server.data_dir.clone();
    let _temp = server.stop().await.expect("temp dir");
    let server = TestServer::start_in(data_dir, &[]).await;
    let answer = server.client().with_token(&token).get("/_matrix/client/v3/account/whoami").await;
    assert_eq!((answer.0, answer.1["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")));
    server.stop().await;
}

/// Stopping the server does not wait for clients' long polls to run out: a `/sync` that is
/// waiting is answered (or cut) and the server stops, then restarts on the same data.
#[tokio::test]
async fn stop_does_not_wait_for_long_polls() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room_id = alice.create_room(json!({})).await;
    let since = alice.sync(None, 0).await["next_batch"].as_str().expect("next_batch").to_owned();
    let presence = format!("/_matrix/client/v3/presence/{}/status", enc(&alice.user_id));
    assert_ok(alice.client.put(&presence, json!({"presence": "online"})).await);
    // The long poll flips the presence (observable) but filters presence out, so that change
    // does not end it.
    let filter =
        enc(&json!({"presence": {"not_types": ["*"]}, "account_data": {"not_types": ["*"]}})
            .to_string());
    let waiting = {
        let client = alice.client.clone();
        tokio::spawn(async move {
            let path = format!(
                "/_matrix/client/v3/sync?since={since}&timeout=55000&set_presence=unavailable&filter={filter}"
            );
            let request = client
                .http
                .get(format!("{}{path}", client.base_url))
                .bearer_auth(client.access_token());
            request.send().await.map(|response| response.status().as_u16())
        })
    };
    // Wait until the long poll is under way.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while assert_ok(alice.client.get(&presence).await)["presence"] != "unavailable" {
        assert!(tokio::time::Instant::now() < deadline, "sync never reached the server");
        tokio::task::yield_now().await;
    }
    let data_dir = server.data_dir.clone();
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(20), server.stop()).await;
    let _temp = stopped.expect("server stops without waiting for the 55 s long poll");
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
        .await
        .expect("the long poll is answered or cut when the server stops")
        .expect("task");
    assert!(matches!(&outcome, Err(_) | Ok(200)), "{outcome:?}");
    let server = TestServer::start_in(data_dir, &[]).await;
    let alice = server.client().with_token(alice.client.access_token());
    let joined = assert_ok(alice.get("/_matrix/client/v3/joined_rooms").await);
    assert_eq!(joined["joined_rooms"], json!([room_id]));
    server.stop().await;
}
