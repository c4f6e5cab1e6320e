//! The first smoke path: register, create a room, send, another user joins and syncs.

use serde_json::json;

use crate::harness::{TestServer, enc};

#[tokio::test]
async fn two_users_chat_through_sync() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room_id = alice.create_room(json!({"preset": "public_chat", "name": "Lobby"})).await;
    bob.join(&room_id).await;
    let event_id = alice.send_text(&room_id, "hello bob").await;
    let answer = bob
        .sync_until(None, |sync| {
            sync["rooms"]["join"][&room_id]["timeline"]["events"].as_array().is_some_and(|events| {
                events.iter().any(|event| event["event_id"] == json!(event_id))
            })
        })
        .await;
    let events = answer["rooms"]["join"][&room_id]["timeline"]["events"].as_array().unwrap();
    let message = events.iter().find(|event| event["event_id"] == json!(event_id)).unwrap();
    assert_eq!(message["content"]["body"], "hello bob");
    assert_eq!(message["sender"], json!(alice.user_id));
    let (status, members) =
        bob.client.get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room_id))).await;
    assert_eq!(status, 200);
    assert_eq!(members["joined"].as_object().unwrap().len(), 2);
}
