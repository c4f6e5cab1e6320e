//! An end-to-end encrypted conversation across the two servers, with a real client on each
//! side: matrix-sdk (the Rust SDK of Element X, in-memory stores) logs in a user of each
//! server, they share an encrypted room, each sends a message and each decrypts the other's.
//! Between the servers that takes `user/keys/query` and `user/keys/claim` (each side's keys
//! fetched from the other server) and `m.direct_to_device` (the megolm room key,
//! Olm-encrypted, to the other server's device); the room events are `m.room.encrypted`
//! on both servers. A device the guest adds later decrypts the next message too, which takes
//! the `m.device_list_update` its server sends.
//!
//! [End-to-end encryption](https://spec.matrix.org/v1.16/server-server-api/#end-to-end-encryption),
//! [device management](https://spec.matrix.org/v1.16/server-server-api/#device-management),
//! [send-to-device messaging](https://spec.matrix.org/v1.16/server-server-api/#send-to-device-messaging)

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use matrix_sdk::config::SyncSettings;
use matrix_sdk::deserialized_responses::TimelineEventKind;
use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::{EventId, OwnedEventId, OwnedRoomId, RoomId};
use matrix_sdk::{Client as SdkClient, Room, RoomState};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::{Sides, eventually, wait_membership};
use crate::client::{User, enc, room_path, short, v3};

/// A matrix-sdk device of a suite user, with its sync loop running in the background (the
/// SDK uploads keys, tracks device lists and sends and receives to-device messages there).
struct Device {
    client: SdkClient,
    sync: JoinHandle<()>,
}

impl Drop for Device {
    fn drop(&mut self) {
        self.sync.abort();
    }
}

impl Device {
    /// Logs `user` in as a new device on its own server and starts syncing.
    async fn login(user: &User) -> Result<Self> {
        let client =
            crate::rust_sdk::sdk_login(user.ctx.base_url(), user, "conformance federation e2ee")
                .await?;
        let sync = tokio::spawn({
            let client = client.clone();
            async move {
                let settings = SyncSettings::default().timeout(Duration::from_secs(2));
                // The check notices a dead loop by what stops arriving, and says what it
                // waited for; the error itself would only repeat that.
                let _ = client.sync(settings).await;
            }
        });
        client.encryption().wait_for_e2ee_initialization_tasks().await;
        Ok(Self { client, sync })
    }

    fn device_id(&self) -> Result<String> {
        self.client.device_id().map(ToString::to_string).ok_or_else(|| anyhow!("not logged in"))
    }

    /// The room once this device's sync has it joined and knows it is encrypted.
    async fn encrypted_room(&self, room_id: &RoomId) -> Result<Room> {
        let user_id = self.client.user_id().map(ToString::to_string).unwrap_or_default();
        eventually(&format!("the encrypted room joined in {user_id}'s matrix-sdk"), || async {
            let Some(room) = self.client.get_room(room_id) else { return Ok(None) };
            if room.state() != RoomState::Joined {
                return Ok(None);
            }
            let encrypted = room.latest_encryption_state().await?.is_encrypted();
            Ok(encrypted.then_some(room))
        })
        .await
    }
}

/// Waits until `observer`'s server lists `device` of `owner` with its identity keys; for a
/// user of the other server that is a `keys/query` over federation.
async fn wait_device_keys(observer: &User, owner: &User, device: &Device) -> Result<()> {
    let device_id = device.device_id()?;
    let pointer = format!("/device_keys/{}/{device_id}/keys/curve25519:{device_id}", owner.user_id);
    eventually(&format!("{}'s device keys seen by {}", owner.user_id, observer.user_id), || async {
        let answer = observer
            .post(&v3("/keys/query"), json!({"device_keys": {&owner.user_id: []}}))
            .await?
            .ok()?;
        Ok(answer.pointer(&pointer).map(|_| ()))
    })
    .await
}

/// Waits until `observer`'s client has `device` in its own store, learnt from a `keys/query`
/// its sync's `device_lists.changed` prompted.
async fn wait_known_to(observer: &Device, device: &Device) -> Result<()> {
    let user_id = device.client.user_id().ok_or_else(|| anyhow!("not logged in"))?.to_owned();
    let device_id = device.client.device_id().ok_or_else(|| anyhow!("not logged in"))?.to_owned();
    eventually(&format!("{user_id}'s device {device_id} known to the other client"), || async {
        Ok(observer.client.encryption().get_device(&user_id, &device_id).await?.map(|_| ()))
    })
    .await
}

/// What `room` makes of `event_id` right now: its decrypted body, or why not.
async fn decryption(room: &Room, event_id: &EventId, sender: &str) -> Result<String, String> {
    let event = room.event(event_id, None).await.map_err(|error| format!("fetching: {error}"))?;
    let decrypted = match &event.kind {
        TimelineEventKind::Decrypted(decrypted) => decrypted,
        TimelineEventKind::UnableToDecrypt { utd_info, .. } => {
            return Err(format!("unable to decrypt: {:?}", utd_info.reason));
        }
        TimelineEventKind::PlainText { .. } => return Err("it was not encrypted".to_owned()),
    };
    let clear: Value = serde_json::from_str(decrypted.event.json().get())
        .map_err(|error| format!("decrypted event is not JSON: {error}"))?;
    if clear["type"] != "m.room.message" || clear["sender"] != sender {
        return Err(format!("decrypted to {}", short(&clear)));
    }
    clear["content"]["body"].as_str().map(str::to_owned).ok_or_else(|| short(&clear))
}

/// Waits until `room` decrypts `event_id` (keys may still be on their way) and checks its
/// body; reports the last reason it could not.
async fn wait_decrypted(room: &Room, event_id: &EventId, sender: &str, body: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match decryption(room, event_id, sender).await {
            Ok(found) if found == body => return Ok(()),
            Ok(found) => bail!("{event_id} decrypted to the body {found:?}, expected {body:?}"),
            Err(reason) if tokio::time::Instant::now() > deadline => {
                bail!("{event_id} from {sender} not decrypted within 30 s: {reason}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// What `viewer`'s server holds for `event_id`: it must be megolm ciphertext only.
async fn check_stored_encrypted(viewer: &User, room_id: &RoomId, event_id: &EventId) -> Result<()> {
    let path = room_path(room_id.as_str(), &format!("/event/{}", enc(event_id.as_str())));
    let stored = viewer.get(&path).await?.ok()?;
    ensure!(
        stored["type"] == "m.room.encrypted"
            && stored["content"]["algorithm"] == "m.megolm.v1.aes-sha2"
            && stored["content"]["ciphertext"].is_string()
            && stored["content"].get("body").is_none(),
        "{}'s server holds {}",
        viewer.user_id,
        short(&stored)
    );
    Ok(())
}

/// `from` sends `body`; `to` on the other server decrypts it, and both servers hold only
/// ciphertext.
async fn send_and_decrypt(
    (from, from_room): (&User, &Room),
    (to, to_room): (&User, &Room),
    body: &str,
) -> Result<()> {
    let event_id: OwnedEventId = from_room
        .send(RoomMessageEventContent::text_plain(body))
        .await
        .with_context(|| format!("{} sending with matrix-sdk", from.user_id))?
        .response
        .event_id;
    wait_decrypted(to_room, &event_id, &from.user_id, body)
        .await
        .with_context(|| format!("{} decrypting", to.user_id))?;
    check_stored_encrypted(from, from_room.room_id(), &event_id).await?;
    check_stored_encrypted(to, to_room.room_id(), &event_id).await
}

pub(super) async fn encrypted_conversation(sides: Sides) -> Result<()> {
    let owner = sides.home.user_named("owner").await?;
    let guest = sides.away.user_named("guest").await?;
    let owner_device = Device::login(&owner).await?;
    let guest_device = Device::login(&guest).await?;
    // Each server can fetch the other's user's keys before they share a room.
    wait_device_keys(&owner, &guest, &guest_device).await?;
    wait_device_keys(&guest, &owner, &owner_device).await?;

    let room_id = owner
        .create_room(json!({
            "preset": "private_chat",
            "name": "Encrypted across servers",
            "invite": [guest.user_id],
            "initial_state": [{
                "type": "m.room.encryption",
                "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2"},
            }],
        }))
        .await?;
    let room_id = OwnedRoomId::try_from(room_id.as_str())?;
    eventually("the invite in the guest's matrix-sdk", || async {
        Ok(guest_device
            .client
            .get_room(&room_id)
            .is_some_and(|room| room.state() == RoomState::Invited)
            .then_some(()))
    })
    .await?;
    guest_device.client.join_room_by_id(&room_id).await.context("joining with matrix-sdk")?;
    wait_membership(&owner, room_id.as_str(), &guest.user_id, "join").await?;
    let owner_room = owner_device.encrypted_room(&room_id).await?;
    let guest_room = guest_device.encrypted_room(&room_id).await?;

    send_and_decrypt((&owner, &owner_room), (&guest, &guest_room), "secret from home").await?;
    send_and_decrypt((&guest, &guest_room), (&owner, &owner_room), "secret from away").await?;

    // A device the guest adds now, while the servers share a room, reaches the owner's client
    // only through an `m.device_list_update` to the owner's server (which then lists the
    // guest in `device_lists.changed`, or refreshes the devices it keeps for the guest). The
    // first device stops first, so the room key can only come from the owner.
    drop(guest_device);
    let late_device = Device::login(&guest).await?;
    wait_device_keys(&owner, &guest, &late_device).await?;
    wait_known_to(&owner_device, &late_device).await?;
    let late_room = late_device.encrypted_room(&room_id).await?;
    send_and_decrypt((&owner, &owner_room), (&guest, &late_room), "secret for a new device").await
}
