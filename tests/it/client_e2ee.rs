//! End-to-end encryption with a real client: `matrix-sdk` (feature `e2e-encryption`, memory
//! stores) drives Hearth through device keys, one-time key claims, to-device room keys,
//! megolm messages, cross-signing (with a reset behind user-interactive auth), secret storage
//! and server-side key backup.
//!
//! Alice and Bob share an encrypted room and each decrypts the other's messages (the server
//! only ever holds `m.room.encrypted`); Bob sees Alice's device as cross-signed by its owner;
//! a second device of Alice's, logged in later, cannot decrypt the history until it recovers
//! the backup key from secret storage and downloads the room keys from the backup.

use std::{future::Future, time::Duration};

use matrix_sdk::{
    Client as SdkClient, Room,
    config::SyncSettings,
    deserialized_responses::TimelineEventKind,
    encryption::CrossSigningResetAuthType,
    ruma::{
        EventId, OwnedEventId, OwnedRoomId, OwnedUserId,
        api::client::{room::create_room, uiaa},
        events::room::message::RoomMessageEventContent,
    },
};
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::harness::{TestServer, User, assert_ok, enc};

/// How long any one expected thing may take to happen.
const WAIT: Duration = Duration::from_secs(60);
const PASSWORD: &str = "secret-password";

/// Polls `attempt` until it yields a value; panics after [`WAIT`].
async fn eventually<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: not in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A logged-in SDK client with its sync loop running in the background (the SDK uploads keys,
/// sends to-device messages and tracks device lists from that loop).
struct Device {
    client: SdkClient,
    sync: Option<JoinHandle<()>>,
}

impl Device {
    async fn login(server: &TestServer, localpart: &str, display_name: &str) -> Self {
        let client = SdkClient::builder()
            .homeserver_url(&server.base_url)
            .build()
            .await
            .expect("SDK client builds");
        client
            .matrix_auth()
            .login_username(localpart, PASSWORD)
            .initial_device_display_name(display_name)
            .send()
            .await
            .expect("login");
        let sync = tokio::spawn({
            let client = client.clone();
            async move {
                let settings = SyncSettings::default().timeout(Duration::from_secs(2));
                if let Err(error) = client.sync(settings).await {
                    panic!("sync loop failed: {error:?}");
                }
            }
        });
        let device = Self { client, sync: Some(sync) };
        device.client.encryption().wait_for_e2ee_initialization_tasks().await;
        device
    }

    fn user_id(&self) -> OwnedUserId {
        self.client.user_id().expect("logged in").to_owned()
    }

    fn stop_syncing(&mut self) {
        if let Some(sync) = self.sync.take() {
            sync.abort();
        }
    }

    async fn room(&self, room_id: &OwnedRoomId) -> Room {
        eventually("the room reaches the client", || async { self.client.get_room(room_id) }).await
    }

    /// Whether the server holds keys for this device (uploaded from the sync loop).
    async fn wait_for_device_keys(&self, observer: &User) {
        let user_id = self.user_id();
        let device_id = self.client.device_id().expect("logged in").to_string();
        eventually("the device keys are uploaded", || async {
            let answer = assert_ok(
                observer
                    .client
                    .post(
                        "/_matrix/client/v3/keys/query",
                        serde_json::json!({"device_keys": {user_id.as_str(): []}}),
                    )
                    .await,
            );
            answer["device_keys"][user_id.as_str()].get(&device_id).map(|_| ())
        })
        .await;
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop_syncing();
    }
}

/// The body of an event as this device decrypts it, or `None` while it cannot.
async fn decrypted_body(room: &Room, event_id: &EventId) -> Option<String> {
    let event = room.event(event_id, None).await.ok()?;
    let TimelineEventKind::Decrypted(decrypted) = &event.kind else { return None };
    let event: Value = serde_json::from_str(decrypted.event.json().get()).ok()?;
    event["content"]["body"].as_str().map(str::to_owned)
}

/// Waits until `room` decrypts `event_id` and returns its body.
async fn wait_for_decryption(room: &Room, event_id: &EventId) -> String {
    eventually("the event decrypts", || decrypted_body(room, event_id)).await
}

/// What the server stores for an event: it must be ciphertext, never the plaintext.
async fn assert_stored_encrypted(observer: &User, room_id: &OwnedRoomId, event_id: &EventId) {
    let answer = assert_ok(
        observer
            .client
            .get(&format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(room_id.as_str()),
                enc(event_id.as_str())
            ))
            .await,
    );
    assert_eq!(answer["type"], "m.room.encrypted", "{answer}");
    assert_eq!(answer["content"]["algorithm"], "m.megolm.v1.aes-sha2", "{answer}");
    assert!(answer["content"]["ciphertext"].is_string(), "{answer}");
    assert!(answer["content"].get("body").is_none(), "{answer}");
}

/// Sets up cross-signing, then resets it, which needs user-interactive auth with the password
/// because keys exist.
async fn bootstrap_and_reset_cross_signing(device: &Device, localpart: &str) {
    let encryption = device.client.encryption();
    if let Err(error) = encryption.bootstrap_cross_signing(None).await {
        let info = error.as_uiaa_response().unwrap_or_else(|| panic!("bootstrap: {error:?}"));
        encryption
            .bootstrap_cross_signing(Some(password_auth(localpart, info.session.clone())))
            .await
            .expect("bootstrap with the password");
    }
    let status = encryption.cross_signing_status().await.expect("cross-signing status");
    assert!(status.is_complete(), "{status:?}");
    let first_master = master_key(device).await;

    let handle = encryption
        .reset_cross_signing()
        .await
        .expect("reset starts")
        .expect("replacing cross-signing keys asks for auth");
    let CrossSigningResetAuthType::Uiaa(info) = handle.auth_type() else {
        panic!("expected user-interactive auth, got {:?}", handle.auth_type());
    };
    assert!(
        info.flows
            .iter()
            .any(|flow| flow.stages.iter().any(|stage| stage.as_str() == "m.login.password")),
        "flows: {:?}",
        info.flows
    );
    handle
        .auth(Some(password_auth(localpart, info.session.clone())))
        .await
        .expect("reset with the password");
    assert_ne!(master_key(device).await, first_master, "the reset made a new master key");
}

fn password_auth(localpart: &str, session: Option<String>) -> uiaa::AuthData {
    let mut password = uiaa::Password::new(
        uiaa::UserIdentifier::Matrix(uiaa::MatrixUserIdentifier::new(localpart.to_owned())),
        PASSWORD.to_owned(),
    );
    password.session = session;
    uiaa::AuthData::Password(password)
}

async fn master_key(device: &Device) -> Option<String> {
    let identity =
        device.client.encryption().request_user_identity(&device.user_id()).await.ok()??;
    let master = identity.master_key().get_first_key()?;
    Some(master.to_base64())
}

#[tokio::test]
async fn two_users_chat_encrypted_cross_sign_and_a_new_device_restores_from_backup() {
    let server = TestServer::start().await;
    let alice_http = server.register("alice").await;
    let bob_http = server.register("bob").await;
    let alice = Device::login(&server, "alice", "alice laptop").await;
    let bob = Device::login(&server, "bob", "bob phone").await;
    alice.wait_for_device_keys(&bob_http).await;
    bob.wait_for_device_keys(&alice_http).await;

    bootstrap_and_reset_cross_signing(&alice, "alice").await;

    // An encrypted room with both of them.
    let mut request = create_room::v3::Request::new();
    request.invite = vec![bob.user_id()];
    request.preset = Some(create_room::v3::RoomPreset::PrivateChat);
    let alice_room = alice.client.create_room(request).await.expect("room created");
    alice_room.enable_encryption().await.expect("encryption enabled");
    let room_id = alice_room.room_id().to_owned();
    bob.client.join_room_by_id(&room_id).await.expect("bob joins");
    let bob_room = bob.room(&room_id).await;
    eventually("alice sees bob joined", || async {
        let members = alice_room.members(matrix_sdk::RoomMemberships::JOIN).await.ok()?;
        members.iter().any(|member| member.user_id() == bob.user_id()).then_some(())
    })
    .await;

    // Each decrypts the other's message.
    let hello: OwnedEventId = alice_room
        .send(RoomMessageEventContent::text_plain("hello bob, this is secret"))
        .await
        .expect("alice sends")
        .response
        .event_id;
    assert_stored_encrypted(&bob_http, &room_id, &hello).await;
    assert_eq!(wait_for_decryption(&bob_room, &hello).await, "hello bob, this is secret");
    let reply: OwnedEventId = bob_room
        .send(RoomMessageEventContent::text_plain("hi alice, secret received"))
        .await
        .expect("bob sends")
        .response
        .event_id;
    assert_stored_encrypted(&alice_http, &room_id, &reply).await;
    assert_eq!(wait_for_decryption(&alice_room, &reply).await, "hi alice, secret received");

    // Bob sees Alice's device as verified by its owner (the self-signing key of her new
    // cross-signing identity signed it).
    let alice_device_id = alice.client.device_id().expect("device").to_owned();
    eventually("bob sees alice's device cross-signed by alice", || async {
        let device =
            bob.client.encryption().get_device(&alice.user_id(), &alice_device_id).await.ok()??;
        device.is_cross_signed_by_owner().then_some(())
    })
    .await;

    // Alice turns on recovery: a backup, secret storage, and every room key uploaded.
    let recovery_key = alice
        .client
        .encryption()
        .recovery()
        .enable()
        .wait_for_backups_to_upload()
        .await
        .expect("recovery enabled");
    let backup = assert_ok(alice_http.client.get("/_matrix/client/v3/room_keys/version").await);
    assert_eq!(backup["algorithm"], "m.megolm_backup.v1.curve25519-aes-sha2");
    assert!(backup["count"].as_u64().is_some_and(|count| count >= 2), "backup: {backup}");
    let version = backup["version"].as_str().expect("version").to_owned();
    let keys = assert_ok(
        alice_http
            .client
            .get(&format!("/_matrix/client/v3/room_keys/keys?version={version}"))
            .await,
    );
    let sessions = &keys["rooms"][room_id.as_str()]["sessions"];
    assert!(sessions.as_object().is_some_and(|sessions| sessions.len() >= 2), "keys: {keys}");

    // A second device of Alice's, with her first device gone quiet so no key can come from it.
    let mut alice = alice;
    alice.stop_syncing();
    let alice_again = Device::login(&server, "alice", "alice tablet").await;
    let room_again = alice_again.room(&room_id).await;
    assert_eq!(decrypted_body(&room_again, &hello).await, None, "no key before recovery");
    alice_again.client.encryption().recovery().recover(&recovery_key).await.expect("recovered");
    alice_again
        .client
        .encryption()
        .backups()
        .download_room_keys_for_room(&room_id)
        .await
        .expect("room keys downloaded from the backup");
    assert_eq!(wait_for_decryption(&room_again, &hello).await, "hello bob, this is secret");
    assert_eq!(wait_for_decryption(&room_again, &reply).await, "hi alice, secret received");

    // Recovery imported the cross-signing keys, and the new device signed itself with them;
    // Bob sees that too.
    let new_device_id = alice_again.client.device_id().expect("device").to_owned();
    eventually("bob sees alice's new device cross-signed by alice", || async {
        let device =
            bob.client.encryption().get_device(&alice.user_id(), &new_device_id).await.ok()??;
        device.is_cross_signed_by_owner().then_some(())
    })
    .await;
}
