//! Profiles: display name and avatar URL, one field or the whole profile, and their
//! propagation as member events into the user's rooms.
//!
//! [Profiles](https://spec.matrix.org/v1.16/client-server-api/#profiles)

use serde_json::json;

use crate::harness::{TestServer, assert_error, assert_ok, enc, state_path, timeline};

#[tokio::test]
async fn displayname_and_avatar_url() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let base = format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id));
    // Nothing set yet.
    assert_error(&alice.client.get(&format!("{base}/avatar_url")).await, 404, "M_NOT_FOUND");
    assert_ok(
        alice.client.put(&format!("{base}/displayname"), json!({"displayname": "Alice"})).await,
    );
    assert_ok(
        alice
            .client
            .put(&format!("{base}/avatar_url"), json!({"avatar_url": "mxc://localhost/abc"}))
            .await,
    );
    assert_eq!(
        assert_ok(bob.client.get(&format!("{base}/displayname")).await),
        json!({"displayname": "Alice"})
    );
    assert_eq!(
        assert_ok(bob.client.get(&format!("{base}/avatar_url")).await),
        json!({"avatar_url": "mxc://localhost/abc"})
    );
    let whole = assert_ok(server.client().get(&base).await);
    assert_eq!(whole, json!({"displayname": "Alice", "avatar_url": "mxc://localhost/abc"}));
    // Only the owner may change it.
    assert_error(
        &bob.client.put(&format!("{base}/displayname"), json!({"displayname": "Mallory"})).await,
        403,
        "M_FORBIDDEN",
    );
    assert_eq!(
        assert_ok(alice.client.get(&format!("{base}/displayname")).await)["displayname"],
        "Alice"
    );
    // Unknown users.
    let answer =
        alice.client.get(&format!("/_matrix/client/v3/profile/{}", enc("@nobody:localhost"))).await;
    assert_error(&answer, 404, "M_NOT_FOUND");
    // Clearing with null.
    assert_ok(alice.client.put(&format!("{base}/avatar_url"), json!({"avatar_url": null})).await);
    let whole = assert_ok(server.client().get(&base).await);
    assert!(whole.get("avatar_url").is_none_or(|url| url.is_null()), "{whole}");
}

#[tokio::test]
async fn changes_reach_rooms_as_member_events() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room_id = alice.create_room(json!({"preset": "public_chat"})).await;
    let second_room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room_id).await;
    let since = bob.sync_until(None, |sync| sync["rooms"]["join"][&room_id].is_object()).await["next_batch"].as_str().unwrap().to_owned();
    let base = format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id));
    assert_ok(
        alice
            .client
            .put(&format!("{base}/displayname"), json!({"displayname": "Alice in Wonderland"}))
            .await,
    );
    assert_ok(
        alice
            .client
            .put(&format!("{base}/avatar_url"), json!({"avatar_url": "mxc://localhost/rabbit"}))
            .await,
    );
    let answer = bob
        .sync_until(Some(since), |sync| {
            timeline(sync, &room_id).iter().any(|event| {
                event["type"] == "m.room.member"
                    && event["state_key"] == alice.user_id
                    && event["content"]["avatar_url"] == "mxc://localhost/rabbit"
            })
        })
        .await;
    let member = timeline(&answer, &room_id)
        .iter()
        .rev()
        .find(|event| event["type"] == "m.room.member" && event["state_key"] == alice.user_id)
        .unwrap();
    assert_eq!(member["content"]["membership"], "join");
    assert_eq!(member["content"]["displayname"], "Alice in Wonderland");
    assert_eq!(member["sender"], alice.user_id);
    // Every room of Alice's got the change.
    let state = assert_ok(
        alice.client.get(&state_path(&second_room, "m.room.member", &alice.user_id)).await,
    );
    assert_eq!(state["displayname"], "Alice in Wonderland");
    let members = assert_ok(
        bob.client.get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room_id))).await,
    );
    assert_eq!(members["joined"][&alice.user_id]["display_name"], "Alice in Wonderland");
    assert_eq!(members["joined"][&alice.user_id]["avatar_url"], "mxc://localhost/rabbit");
    // A room joined later starts with the profile.
    let third = bob.create_room(json!({"preset": "public_chat"})).await;
    alice.join(&third).await;
    let state =
        assert_ok(bob.client.get(&state_path(&third, "m.room.member", &alice.user_id)).await);
    assert_eq!(state["displayname"], "Alice in Wonderland");
    assert_eq!(state["avatar_url"], "mxc://localhost/rabbit");
}

#[tokio::test]
async fn own_profile_change_is_an_incremental_update_not_a_rejoin() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room_id = alice.create_room(json!({"preset": "private_chat"})).await;
    for index in 0..12 {
        alice.send_text(&room_id, &format!("message {index}")).await;
    }
    let first = alice.sync(None, 0).await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let (status, _) = alice
        .client
        .put(
            &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id)),
            json!({"displayname": "Alice A."}),
        )
        .await;
    assert_eq!(status, 200);
    let update =
        alice.sync_until(Some(since), |sync| sync["rooms"]["join"][&room_id].is_object()).await;
    let room = &update["rooms"]["join"][&room_id];
    // Only the new member event, not the room replayed as if newly joined.
    let events = room["timeline"]["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{room}");
    assert_eq!(events[0]["content"]["displayname"], "Alice A.");
    assert_eq!(room["timeline"]["limited"], false, "{room}");
}
