//! A real Matrix client against Hearth: `matrix-sdk` registers and logs in two users, who
//! create a room, invite, join and exchange 100 messages, with typing, a read receipt and a
//! display-name change, all seen through the SDK's own `/sync` loop, then paginated back with
//! the SDK; and an SDK session and sync token that outlive a server restart.
//!
//! To see the requests the SDK makes, call
//! `crate::harness::log_to_test_output("tower_http=debug")` at the start of a test and run it
//! with `--nocapture`.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use matrix_sdk::{
    Client as SdkClient, LoopCtrl,
    config::SyncSettings,
    ruma::{
        OwnedEventId, OwnedRoomId, UInt,
        api::client::{
            account::register,
            filter::{FilterDefinition, RoomEventFilter, RoomFilter},
            receipt::create_receipt::v3::ReceiptType,
            room::create_room,
            sync::sync_events::v3::Filter,
            uiaa,
        },
        events::{receipt::ReceiptThread, room::message::RoomMessageEventContent},
    },
};
use serde_json::Value;
use tokio::{sync::watch, task::JoinHandle};

use crate::harness::TestServer;

/// How long any one expected thing may take to show up.
const WAIT: Duration = Duration::from_secs(30);

/// Everything one client has seen through sync.
#[derive(Default)]
struct Seen {
    /// Timeline events of joined rooms, in the order sync delivered them.
    timeline: Vec<(OwnedRoomId, Value)>,
    /// State events of joined rooms (state and timeline sections).
    state: Vec<(OwnedRoomId, Value)>,
    /// Ephemeral events of joined rooms.
    ephemeral: Vec<(OwnedRoomId, Value)>,
    /// Rooms the user was invited to.
    invites: Vec<OwnedRoomId>,
    /// Sync errors (the loop stops at the first).
    errors: Vec<String>,
}

impl Seen {
    fn messages(&self, room_id: &OwnedRoomId) -> Vec<(String, String)> {
        let mut seen_ids: Vec<&str> = Vec::new();
        let mut messages = Vec::new();
        for (room, event) in &self.timeline {
            if room != room_id || event["type"] != "m.room.message" {
                continue;
            }
            let event_id = event["event_id"].as_str().unwrap_or_default();
            // A client deduplicates by event id; count each event once.
            if seen_ids.contains(&event_id) {
                continue;
            }
            seen_ids.push(event_id);
            messages.push((
                event["sender"].as_str().unwrap_or_default().to_owned(),
                event["content"]["body"].as_str().unwrap_or_default().to_owned(),
            ));
        }
        messages
    }
}

fn to_value<T>(raw: &matrix_sdk::ruma::serde::Raw<T>) -> Value {
    serde_json::from_str(raw.json().get()).unwrap_or(Value::Null)
}

/// An SDK client with a background sync loop recording what it sees.
struct SdkUser {
    client: SdkClient,
    seen: Arc<Mutex<Seen>>,
    changes: watch::Receiver<u64>,
    task: Option<JoinHandle<()>>,
}

impl SdkUser {
    async fn client_for(server: &TestServer) -> SdkClient {
        SdkClient::builder()
            .homeserver_url(&server.base_url)
            .build()
            .await
            .expect("SDK client builds")
    }

    /// Starts syncing in the background with a timeline limit large enough that nothing is
    /// cut (the 100 messages must all arrive through sync).
    fn start(client: SdkClient) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (notify, changes) = watch::channel(0u64);
        let mut timeline = RoomEventFilter::default();
        timeline.limit = Some(UInt::from(200u32));
        let mut room = RoomFilter::default();
        room.timeline = timeline;
        let mut definition = FilterDefinition::default();
        definition.room = room;
        let settings = SyncSettings::default()
            .timeout(Duration::from_secs(5))
            .filter(Filter::FilterDefinition(definition));
        let task = {
            let client = client.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let result = client
                    .sync_with_result_callback(settings, |response| {
                        let seen = seen.clone();
                        let notify = notify.clone();
                        async move {
                            let mut control = LoopCtrl::Continue;
                            {
                                let mut seen = seen.lock().expect("seen lock");
                                match response {
                                    Ok(response) => record(&mut seen, &response),
                                    Err(error) => {
                                        seen.errors.push(format!("{error:?}"));
                                        control = LoopCtrl::Break;
                                    }
                                }
                            }
                            notify.send_modify(|count| *count += 1);
                            Ok(control)
                        }
                    })
                    .await;
                if let Err(error) = result {
                    seen.lock().expect("seen lock").errors.push(format!("{error:?}"));
                }
            })
        };
        Self { client, seen, changes, task: Some(task) }
    }

    /// Waits until `predicate` holds on what was seen; panics with a description after
    /// [`WAIT`] or when the sync loop failed.
    async fn wait_for(&mut self, what: &str, predicate: impl Fn(&Seen) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            {
                let seen = self.seen.lock().expect("seen lock");
                assert!(seen.errors.is_empty(), "{what}: sync failed: {:?}", seen.errors);
                if predicate(&seen) {
                    return;
                }
            }
            let changed = tokio::time::timeout_at(deadline, self.changes.changed()).await;
            assert!(matches!(changed, Ok(Ok(()))), "{what}: not seen in time");
        }
    }

    fn messages(&self, room_id: &OwnedRoomId) -> Vec<(String, String)> {
        self.seen.lock().expect("seen lock").messages(room_id)
    }
}

impl Drop for SdkUser {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn record(seen: &mut Seen, response: &matrix_sdk::sync::SyncResponse) {
    for (room_id, update) in &response.rooms.joined {
        for event in &update.timeline.events {
            let value = to_value(event.raw());
            if value.get("state_key").is_some() {
                seen.state.push((room_id.clone(), value.clone()));
            }
            seen.timeline.push((room_id.clone(), value));
        }
        let state = match &update.state {
            matrix_sdk::sync::State::Before(events) | matrix_sdk::sync::State::After(events) => {
                events
            }
        };
        for event in state {
            seen.state.push((room_id.clone(), to_value(event)));
        }
        for event in &update.ephemeral {
            seen.ephemeral.push((room_id.clone(), to_value(event)));
        }
    }
    for room_id in response.rooms.invited.keys() {
        seen.invites.push(room_id.clone());
    }
}

/// Registers through the SDK with the user-interactive flow: the first request gets the 401
/// with a session and the `m.login.dummy` flow, the second completes it and logs the client in.
async fn register_with_sdk(client: &SdkClient, username: &str, password: &str) {
    let mut request = register::v3::Request::new();
    request.username = Some(username.to_owned());
    request.password = Some(password.to_owned());
    let error = client
        .matrix_auth()
        .register(request.clone())
        .await
        .expect_err("first register asks for auth");
    let info =
        error.as_uiaa_response().unwrap_or_else(|| panic!("expected a UIA 401, got {error:?}"));
    assert!(
        info.flows
            .iter()
            .any(|flow| flow.stages.iter().any(|stage| stage.as_str() == "m.login.dummy")),
        "flows: {:?}",
        info.flows
    );
    let session = info.session.clone().expect("UIA session");
    let mut dummy = uiaa::Dummy::new();
    dummy.session = Some(session);
    request.auth = Some(uiaa::AuthData::Dummy(dummy));
    let response = client.matrix_auth().register(request).await.expect("register completes");
    assert!(response.access_token.is_some());
    assert!(client.user_id().is_some(), "register logs the client in");
}

#[tokio::test]
async fn two_sdk_clients_chat() {
    let server = TestServer::start().await;

    // Alice registers through the SDK; Bob registers over plain HTTP and logs in with the SDK.
    let alice_client = SdkUser::client_for(&server).await;
    register_with_sdk(&alice_client, "alice", "alice-password").await;
    let _ = server.register("bob").await;
    let bob_client = SdkUser::client_for(&server).await;
    bob_client
        .matrix_auth()
        .login_username("bob", "secret-password")
        .initial_device_display_name("sdk")
        .send()
        .await
        .expect("bob logs in");
    let alice_id = alice_client.user_id().expect("alice id").to_owned();
    let bob_id = bob_client.user_id().expect("bob id").to_owned();
    assert_eq!(alice_id.as_str(), "@alice:localhost");
    assert_eq!(bob_id.as_str(), "@bob:localhost");

    let mut alice = SdkUser::start(alice_client);
    let mut bob = SdkUser::start(bob_client);

    // Alice creates a room and invites Bob, who sees the invite through sync and joins.
    let mut request = create_room::v3::Request::new();
    request.name = Some("SDK room".to_owned());
    request.preset = Some(create_room::v3::RoomPreset::PrivateChat);
    let alice_room = alice.client.create_room(request).await.expect("room created");
    let room_id = alice_room.room_id().to_owned();
    alice_room.invite_user_by_id(&bob_id).await.expect("invite");
    bob.wait_for("bob's invite", |seen| seen.invites.contains(&room_id)).await;
    let bob_room = bob.client.join_room_by_id(&room_id).await.expect("bob joins");
    alice
        .wait_for("bob's join", |seen| {
            seen.state.iter().any(|(room, event)| {
                *room == room_id
                    && event["type"] == "m.room.member"
                    && event["state_key"] == bob_id.as_str()
                    && event["content"]["membership"] == "join"
            })
        })
        .await;
    bob.wait_for("the room in bob's joined rooms", |seen| {
        seen.timeline.iter().any(|(room, _)| *room == room_id)
    })
    .await;

    // 50 messages each way, alternating so that the order is known: a0 b0 a1 b1 ...
    let mut expected = Vec::new();
    for index in 0..50 {
        let text = format!("alice {index}");
        alice_room.send(RoomMessageEventContent::text_plain(&text)).await.expect("alice sends");
        expected.push((alice_id.to_string(), text));
        let text = format!("bob {index}");
        bob_room.send(RoomMessageEventContent::text_plain(&text)).await.expect("bob sends");
        expected.push((bob_id.to_string(), text));
    }
    let complete = |seen: &Seen| seen.messages(&room_id).len() >= 100;
    alice.wait_for("all 100 messages (alice)", complete).await;
    bob.wait_for("all 100 messages (bob)", complete).await;
    assert_eq!(alice.messages(&room_id), expected, "alice's view of the conversation");
    assert_eq!(bob.messages(&room_id), expected, "bob's view of the conversation");

    // Bob types; Alice sees it in the ephemeral section.
    bob_room.typing_notice(true).await.expect("typing");
    alice
        .wait_for("bob typing", |seen| {
            seen.ephemeral.iter().any(|(room, event)| {
                *room == room_id
                    && event["type"] == "m.typing"
                    && event["content"]["user_ids"]
                        .as_array()
                        .is_some_and(|ids| ids.iter().any(|id| id == bob_id.as_str()))
            })
        })
        .await;

    // Bob reads Alice's last message; Alice sees the receipt.
    let last_from_alice: OwnedEventId = {
        let seen = bob.seen.lock().expect("seen lock");
        let event = seen
            .timeline
            .iter()
            .rev()
            .find(|(room, event)| {
                *room == room_id
                    && event["sender"] == alice_id.as_str()
                    && event["type"] == "m.room.message"
            })
            .map(|(_, event)| event["event_id"].as_str().expect("event id").to_owned())
            .expect("bob saw a message from alice");
        event.try_into().expect("event id")
    };
    bob_room
        .send_single_receipt(ReceiptType::Read, ReceiptThread::Unthreaded, last_from_alice.clone())
        .await
        .expect("receipt");
    alice
        .wait_for("bob's read receipt", |seen| {
            seen.ephemeral.iter().any(|(room, event)| {
                *room == room_id
                    && event["type"] == "m.receipt"
                    && event["content"][last_from_alice.as_str()]["m.read"][bob_id.as_str()]
                        .is_object()
            })
        })
        .await;
    // The SDK's own view agrees.
    let receipt = alice_room
        .load_user_receipt(
            matrix_sdk::ruma::events::receipt::ReceiptType::Read,
            ReceiptThread::Unthreaded,
            &bob_id,
        )
        .await
        .expect("receipt store");
    assert_eq!(receipt.map(|(event_id, _)| event_id), Some(last_from_alice));

    // Alice changes her display name; Bob sees her new member event, and the SDK's room member.
    alice.client.account().set_display_name(Some("Alice Liddell")).await.expect("display name");
    bob.wait_for("alice's new display name", |seen| {
        seen.state.iter().any(|(room, event)| {
            *room == room_id
                && event["type"] == "m.room.member"
                && event["state_key"] == alice_id.as_str()
                && event["content"]["displayname"] == "Alice Liddell"
                && event["content"]["membership"] == "join"
        })
    })
    .await;
    let member = bob_room
        .get_member_no_sync(&alice_id)
        .await
        .expect("member store")
        .expect("alice is a member");
    assert_eq!(member.display_name(), Some("Alice Liddell"));
    assert_eq!(
        alice.client.account().get_display_name().await.expect("own display name").as_deref(),
        Some("Alice Liddell")
    );

    // Back-pagination through the SDK (`/messages`) finds the same 100 messages, in order,
    // and reaches the start of the room.
    let mut paginated: Vec<Value> = Vec::new();
    let mut from: Option<String> = None;
    let mut reached_start = false;
    for _ in 0..50 {
        let mut options = matrix_sdk::room::MessagesOptions::backward().from(from.as_deref());
        options.limit = UInt::from(17u32);
        let page = bob_room.messages(options).await.expect("messages");
        paginated.extend(page.chunk.iter().map(|event| to_value(event.raw())));
        match page.end {
            Some(end) => from = Some(end),
            None => {
                reached_start = true;
                break;
            }
        }
    }
    assert!(reached_start, "pagination did not end");
    assert_eq!(
        paginated.last().map(|event| event["type"].clone()),
        Some(Value::from("m.room.create"))
    );
    paginated.reverse();
    let paginated_messages: Vec<(String, String)> = paginated
        .iter()
        .filter(|event| event["type"] == "m.room.message")
        .map(|event| {
            (
                event["sender"].as_str().unwrap_or_default().to_owned(),
                event["content"]["body"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(paginated_messages, expected, "bob's back-pagination");

    // The room's name came through state.
    assert_eq!(bob_room.name().as_deref(), Some("SDK room"));
}

/// The SDK's session and sync token survive a server restart: a client restored from the
/// saved session on the restarted server is still logged in, and an incremental sync from
/// its pre-restart token brings exactly what happened since.
#[tokio::test]
async fn sdk_session_and_sync_token_survive_a_restart() {
    let server = TestServer::start().await;
    server.register("alice").await;
    let client = SdkUser::client_for(&server).await;
    client.matrix_auth().login_username("alice", "secret-password").send().await.expect("login");
    let mut request = create_room::v3::Request::new();
    request.name = Some("Durable".to_owned());
    let room = client.create_room(request).await.expect("room");
    let room_id = room.room_id().to_owned();
    for index in 0..3 {
        room.send(RoomMessageEventContent::text_plain(format!("before {index}")))
            .await
            .expect("send");
    }
    let before = client.sync_once(SyncSettings::default()).await.expect("sync before restart");
    let session = client.matrix_auth().session().expect("session");
    drop(room);
    drop(client);

    let data_dir = server.data_dir.clone();
    let _temp = server.stop().await;
    let server = TestServer::start_in(data_dir, &[]).await;
    let client = SdkUser::client_for(&server).await;
    client
        .matrix_auth()
        .restore_session(session.clone(), matrix_sdk::store::RoomLoadSettings::default())
        .await
        .expect("restore session");
    let whoami = client.whoami().await.expect("the old access token still works");
    assert_eq!(whoami.user_id, session.meta.user_id);
    // Something new, sent with the same token over plain HTTP.
    let http = server.client().with_token(&session.tokens.access_token);
    let path = format!(
        "/_matrix/client/v3/rooms/{}/send/m.room.message/after",
        crate::harness::enc(room_id.as_str())
    );
    let sent = http.put(&path, serde_json::json!({"msgtype": "m.text", "body": "after"})).await;
    assert_eq!(sent.0, 200, "{sent:?}");
    let after = client
        .sync_once(SyncSettings::default().token(before.next_batch.clone()))
        .await
        .expect("sync");
    let update = after.rooms.joined.get(&room_id).expect("the room has news");
    let texts: Vec<String> = update
        .timeline
        .events
        .iter()
        .map(|event| to_value(event.raw()))
        .filter(|event| event["type"] == "m.room.message")
        .map(|event| event["content"]["body"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(texts, vec!["after".to_owned()]);
    assert!(!update.timeline.limited);
    // A second client restored from the same session learns the room from an initial sync
    // (the first one has already seen this `next_batch`, which the SDK skips).
    let client = SdkUser::client_for(&server).await;
    client
        .matrix_auth()
        .restore_session(session, matrix_sdk::store::RoomLoadSettings::default())
        .await
        .expect("restore session");
    client.sync_once(SyncSettings::default()).await.expect("initial sync");
    let room = client.get_room(&room_id).expect("room known after sync");
    assert_eq!(room.name().as_deref(), Some("Durable"));
}
