//! End-to-end encryption, the server's part: it stores and routes keys and ciphertext, never
//! plaintext.
//! Device keys, one-time keys (each claimed exactly once), fallback keys, cross-signing keys
//! and their signatures, the key-change log behind `keys/changes` and sync `device_lists`, and
//! the per-device to-device queues.
//!
//! [End-to-end encryption](https://spec.matrix.org/v1.16/client-server-api/#end-to-end-encryption),
//! [send-to-device messaging](https://spec.matrix.org/v1.16/client-server-api/#send-to-device-messaging)
//!
//! Other servers' users: [`remote`] asks their servers; received EDUs land here through
//! [`E2ee::record_remote_key_change`] and [`E2ee::receive_remote_to_device`].

pub mod remote;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use ruma::{DeviceId, OwnedDeviceId, OwnedUserId, ServerName, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use storage::{Batch, Db, keys};
use tracing::instrument;

use crate::notify::Notifier;

/// (user, device) -> the signed device keys object, as uploaded (plus merged signatures).
const DEVICE_KEYS: &str = "user_device_to_device_keys";
/// (user, device, algorithm, upload sequence ++ `algorithm:key_id`) -> one unclaimed
/// one-time key. The sequence makes key order upload order, which is claim order.
const ONE_TIME_KEYS: &str = "user_device_algorithm_upload_to_one_time_key";
/// (user, device, algorithm) -> the device's fallback key of that algorithm.
const FALLBACK_KEYS: &str = "user_device_algorithm_to_fallback_key";
/// (user, kind) -> a cross-signing key (`master`, `self_signing`, `user_signing`).
const CROSS_SIGNING_KEYS: &str = "user_kind_to_cross_signing_key";
/// (position, user) -> nothing: the user's keys or devices changed at that position.
const KEY_CHANGES: &str = "position_user_to_key_change";
/// (user, device, position, index) -> a to-device message waiting for delivery.
const TO_DEVICE: &str = "user_device_position_to_to_device";
/// (user, device, cursor id) -> the table key of the last to-device message a sync delivered
/// when it had to leave some out; the id goes into its `next_batch` (see
/// [`E2ee::to_device_events`]).
const TO_DEVICE_CURSORS: &str = "user_device_batch_to_to_device_cursor";
/// At most this many to-device messages go into one sync answer; the rest wait for the next.
pub const TO_DEVICE_PER_SYNC_MAX: usize = 100;
/// (sender user, sender device, txn id) -> nothing: the transaction was already sent.
const TO_DEVICE_TXNS: &str = "user_device_txn_to_to_device_txn";
/// (origin server, `message_id`) -> nothing: that server's `m.direct_to_device` EDU was already
/// delivered.
const REMOTE_TO_DEVICE_MESSAGES: &str = "server_message_to_to_device_message";
/// user -> the stream position of the user's last key change (8 bytes, big-endian): the
/// `stream_id` of the user's device list over federation.
const LAST_KEY_CHANGE: &str = "user_to_last_key_change";
/// user -> the user's dehydrated device ([`DehydratedDevice`], MSC3814).
const DEHYDRATED_DEVICES: &str = "user_id_to_dehydrated_device";
/// At most this many to-device messages go into one page of a dehydrated device's events.
pub const DEHYDRATED_EVENTS_PER_PAGE_MAX: usize = 100;
/// Where a to-device message sits in a device's inbox: (stream position, index).
pub type InboxPlace = (u64, u64);

/// A user's dehydrated device
/// ([MSC3814](https://github.com/matrix-org/matrix-spec-proposals/pull/3814)): a device with
/// keys and a to-device inbox but no login, whose private keys the client stores encrypted
/// in `device_data`, so that a later login can read the room keys sent to it meanwhile.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DehydratedDevice {
    /// The device id (the device's Curve25519 identity key, by the MSC's rule).
    pub device_id: OwnedDeviceId,
    /// The client's encrypted device, opaque to the server.
    pub device_data: Value,
}

/// Why an E2EE operation failed.
#[derive(Debug, thiserror::Error)]
pub enum E2eeError {
    /// The uploaded keys are malformed or belong to someone else.
    #[error("invalid keys: {0}")]
    InvalidKeys(String),
    /// A cross-signing key is not signed by the user's master key.
    #[error("invalid signature: {0}")]
    InvalidSignature(String),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] storage::Error),
}

/// The three cross-signing keys of a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrossSigningKind {
    /// The master key, which signs the other two.
    Master,
    /// Signs the user's own devices.
    SelfSigning,
    /// Signs other users' master keys.
    UserSigning,
}

impl CrossSigningKind {
    /// Every kind.
    pub const ALL: [Self; 3] = [Self::Master, Self::SelfSigning, Self::UserSigning];

    /// The `usage` name of the key, as the spec spells it.
    pub fn usage(self) -> &'static str {
        match self {
            Self::Master => "master",
            Self::SelfSigning => "self_signing",
            Self::UserSigning => "user_signing",
        }
    }
}

#[derive(Serialize, Deserialize)]
struct FallbackKey {
    key_id: String,
    key: Value,
    used: bool,
}

#[derive(Serialize, Deserialize)]
struct ToDeviceMessage {
    sender: String,
    #[serde(rename = "type")]
    kind: String,
    content: Value,
}

impl ToDeviceMessage {
    /// The message as clients get it (`sender`, `type`, `content`).
    fn into_event(self) -> Value {
        serde_json::json!({"sender": self.sender, "type": self.kind, "content": self.content})
    }
}

/// One claimed key: whose, and the `algorithm:key_id` with its key object.
pub struct ClaimedKey {
    /// The key's owner.
    pub user_id: OwnedUserId,
    /// The key's device.
    pub device_id: OwnedDeviceId,
    /// `algorithm:key_id`.
    pub key_id: String,
    /// The key object (or string) as uploaded.
    pub key: Value,
}

/// Why one object of a signature upload was not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignatureFailure {
    /// The object carries no signature by the uploader.
    MissingSignature,
    /// A signature does not verify with the uploader's key it names, or names no such key.
    InvalidSignature,
    /// No stored device or cross-signing key has that id.
    UnknownKey,
}

/// Signature upload failures, by user id and key id.
pub type SignatureFailures = BTreeMap<String, BTreeMap<String, SignatureFailure>>;

/// A stored object that signatures can be merged into.
struct SignedObject {
    table: &'static str,
    key: Vec<u8>,
    value: Value,
}

/// A to-device message for one recipient device.
pub struct ToDeviceDelivery {
    /// The recipient.
    pub user_id: OwnedUserId,
    /// The recipient's device.
    pub device_id: OwnedDeviceId,
    /// The message content.
    pub content: Value,
}

/// The E2EE component.
#[derive(Clone)]
pub struct E2ee {
    db: Db,
    notifier: Notifier,
    /// Held around read-then-write sequences (claiming a key, checking a transaction id), so
    /// that two requests never both see the same unclaimed key.
    lock: Arc<Mutex<()>>,
}

fn device_key(user_id: &UserId, device_id: &str) -> Vec<u8> {
    keys::join(&[user_id.as_bytes(), device_id.as_bytes()])
}

fn algorithm_of(key_id: &str) -> Result<&str, E2eeError> {
    match key_id.split_once(':') {
        Some((algorithm, id)) if !algorithm.is_empty() && !id.is_empty() => Ok(algorithm),
        _ => Err(E2eeError::InvalidKeys(format!("Key id {key_id} is not algorithm:key_id"))),
    }
}

/// The `algorithm:key_id` of a one-time key's table key, given the (user, device) prefix:
/// after the algorithm and its separator come the 8-byte upload sequence and the key id.
fn one_time_key_id<'k>(device_prefix: &[u8], key: &'k [u8]) -> Option<&'k str> {
    let rest = key.get(device_prefix.len()..)?;
    let separator = rest.iter().position(|byte| *byte == keys::SEP)?;
    std::str::from_utf8(rest.get(separator + 1 + 8..)?).ok()
}

/// The public key of a cross-signing key object: the value of its one `keys` entry.
fn cross_signing_public_key(key: &Value) -> Option<&str> {
    key.get("keys")?.as_object()?.values().next()?.as_str()
}

/// Whether `object` carries a valid signature by `signer` under `key_id` (`ed25519:...`),
/// checked with `public_key` (unpadded base64) over the object's canonical JSON without
/// `signatures` and `unsigned`.
/// [Signing JSON](https://spec.matrix.org/v1.16/appendices/#signing-json)
fn signed_by(object: &Value, signer: &UserId, key_id: &str, public_key: &str) -> bool {
    use base64::Engine as _;
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let Some(signature) = object
        .get("signatures")
        .and_then(|signatures| signatures.get(signer.as_str()))
        .and_then(|by_signer| by_signer.get(key_id))
        .and_then(Value::as_str)
    else {
        return false;
    };
    let Ok(canonical) = serde_json::from_value::<ruma::CanonicalJsonObject>(object.clone()) else {
        return false;
    };
    let Ok(canonical) = ruma::signatures::to_canonical_json_string_for_signing(&canonical) else {
        return false;
    };
    let (Ok(public_key), Ok(signature)) = (engine.decode(public_key), engine.decode(signature))
    else {
        return false;
    };
    key_id.starts_with("ed25519:")
        && ruma::signatures::verify_canonical_json_bytes(
            &ruma::SigningKeyAlgorithm::Ed25519,
            &public_key,
            &signature,
            canonical.as_bytes(),
        )
        .is_ok()
}

impl E2ee {
    /// The component over `db`.
    pub fn new(db: Db, notifier: Notifier) -> Self {
        Self { db, notifier, lock: Arc::default() }
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Commits `fill` in one batch; when users' keys changed, at a new stream position with
    /// their entries in the key-change log, and wakes `/sync`.
    fn commit(
        &self,
        changed: &[&UserId],
        fill: impl FnOnce(&mut Batch<'_>) -> Result<(), storage::Error>,
    ) -> Result<(), E2eeError> {
        if changed.is_empty() {
            let mut batch = self.db.batch();
            fill(&mut batch)?;
            self.db.write(batch)?;
            return Ok(());
        }
        let (position, ()) = self.db.write_at_next_position(|position, batch| {
            fill(batch)?;
            for user_id in changed {
                let mut key = keys::encode_u64(position).to_vec();
                key.extend_from_slice(user_id.as_bytes());
                batch.put_raw(KEY_CHANGES, &key, b"")?;
                batch.put_raw(LAST_KEY_CHANGE, user_id.as_bytes(), &keys::encode_u64(position))?;
            }
            Ok(())
        })?;
        self.notifier.notify(position);
        Ok(())
    }

    /// `keys/upload`: stores device keys (a key change when they differ from the stored ones),
    /// new one-time keys (an id already stored keeps its key) and fallback keys (replacing the
    /// previous one of the algorithm). Returns the one-time key counts.
    #[instrument(skip_all, fields(user_id = %user_id, device_id = %device_id))]
    pub fn upload_keys(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        device_keys: Option<&Value>,
        one_time_keys: &Map<String, Value>,
        fallback_keys: &Map<String, Value>,
    ) -> Result<BTreeMap<String, u64>, E2eeError> {
        let key = device_key(user_id, device_id.as_str());
        let mut changed = Vec::new();
        if let Some(device_keys) = device_keys {
            if device_keys.get("user_id").and_then(Value::as_str) != Some(user_id.as_str())
                || device_keys.get("device_id").and_then(Value::as_str) != Some(device_id.as_str())
            {
                return Err(E2eeError::InvalidKeys(
                    "device_keys must name the uploading user and device".into(),
                ));
            }
            let stored: Option<Value> = self.db.get(DEVICE_KEYS, &key)?;
            if stored.as_ref() != Some(device_keys) {
                changed.push(user_id);
            }
        }
        for key_id in one_time_keys.keys().chain(fallback_keys.keys()) {
            algorithm_of(key_id)?;
        }
        // A key id that is already stored keeps its key: a client retrying an upload must not
        // create a second copy of a key.
        let device_prefix = keys::prefix(&[user_id.as_bytes(), device_id.as_bytes()]);
        let mut stored_key_ids = std::collections::BTreeSet::new();
        self.db.for_each_prefix(ONE_TIME_KEYS, &device_prefix, |key, _| {
            if let Some(key_id) = one_time_key_id(&device_prefix, key) {
                stored_key_ids.insert(key_id.to_owned());
            }
            true
        })?;
        let new_one_time_keys: Vec<(&String, &Value)> =
            one_time_keys.iter().filter(|(key_id, _)| !stored_key_ids.contains(*key_id)).collect();
        let db = &self.db;
        self.commit(&changed, |batch| {
            if let Some(device_keys) = device_keys {
                batch.put(DEVICE_KEYS, &key, device_keys)?;
            }
            if !new_one_time_keys.is_empty() {
                // One sequence number per upload: the spec orders claims by upload call and
                // leaves the order within one call open.
                let upload = db.next_short(batch)?;
                for (key_id, value) in new_one_time_keys {
                    let algorithm = key_id.split_once(':').map_or(key_id.as_str(), |(a, _)| a);
                    let mut otk_key = keys::prefix(&[
                        user_id.as_bytes(),
                        device_id.as_bytes(),
                        algorithm.as_bytes(),
                    ]);
                    otk_key.extend_from_slice(&keys::encode_u64(upload));
                    otk_key.extend_from_slice(key_id.as_bytes());
                    batch.put(ONE_TIME_KEYS, &otk_key, value)?;
                }
            }
            for (key_id, value) in fallback_keys {
                let algorithm = key_id.split_once(':').map_or(key_id.as_str(), |(a, _)| a);
                let fallback =
                    FallbackKey { key_id: key_id.clone(), key: value.clone(), used: false };
                let fallback_key =
                    keys::join(&[user_id.as_bytes(), device_id.as_bytes(), algorithm.as_bytes()]);
                batch.put(FALLBACK_KEYS, &fallback_key, &fallback)?;
            }
            Ok(())
        })?;
        self.one_time_key_counts(user_id, device_id)
    }

    /// How many unclaimed one-time keys the device has, per algorithm (`signed_curve25519` is
    /// always present, as clients expect).
    pub fn one_time_key_counts(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<BTreeMap<String, u64>, E2eeError> {
        let mut counts = BTreeMap::from([("signed_curve25519".to_owned(), 0)]);
        let prefix = keys::prefix(&[user_id.as_bytes(), device_id.as_bytes()]);
        self.db.for_each_prefix(ONE_TIME_KEYS, &prefix, |key, _| {
            if let Some((algorithm, _)) =
                one_time_key_id(&prefix, key).and_then(|key_id| key_id.split_once(':'))
            {
                *counts.entry(algorithm.to_owned()).or_default() += 1;
            }
            true
        })?;
        Ok(counts)
    }

    /// The algorithms of the device's fallback keys that were not used yet.
    pub fn unused_fallback_key_types(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> Result<Vec<String>, E2eeError> {
        let prefix = keys::prefix(&[user_id.as_bytes(), device_id.as_bytes()]);
        let mut types = Vec::new();
        for (key, value) in self.db.scan_prefix(FALLBACK_KEYS, &prefix)? {
            if let Ok(fallback) = serde_json::from_slice::<FallbackKey>(&value)
                && !fallback.used
            {
                types.push(String::from_utf8_lossy(&key[prefix.len()..]).into_owned());
            }
        }
        Ok(types)
    }

    /// The device keys of a user's devices, by device id.
    pub fn device_keys(&self, user_id: &UserId) -> Result<BTreeMap<String, Value>, E2eeError> {
        let prefix = keys::prefix(&[user_id.as_bytes()]);
        let mut devices = BTreeMap::new();
        for (key, value) in self.db.scan_prefix(DEVICE_KEYS, &prefix)? {
            let device_id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            let value = serde_json::from_slice(&value).map_err(|source| {
                storage::Error::Corrupt { table: DEVICE_KEYS.to_owned(), source }
            })?;
            devices.insert(device_id, value);
        }
        Ok(devices)
    }

    /// The device keys of `keys/query` (client or federation) for one user: the wanted
    /// devices (all when `wanted` is empty), each with `unsigned.device_display_name` from
    /// `names` (device id -> display name) when the device has one.
    pub fn device_keys_for_query(
        &self,
        user_id: &UserId,
        wanted: &[OwnedDeviceId],
        names: &BTreeMap<String, Option<String>>,
    ) -> Result<Map<String, Value>, E2eeError> {
        let mut devices = Map::new();
        for (device_id, mut keys) in self.device_keys(user_id)? {
            if !wanted.is_empty() && !wanted.iter().any(|wanted| wanted.as_str() == device_id) {
                continue;
            }
            if let Some(Some(name)) = names.get(&device_id)
                && let Some(object) = keys.as_object_mut()
            {
                object.insert("unsigned".into(), serde_json::json!({"device_display_name": name}));
            }
            devices.insert(device_id, keys);
        }
        Ok(devices)
    }

    /// One of the user's cross-signing keys.
    pub fn cross_signing_key(
        &self,
        user_id: &UserId,
        kind: CrossSigningKind,
    ) -> Result<Option<Value>, E2eeError> {
        let key = keys::join(&[user_id.as_bytes(), kind.usage().as_bytes()]);
        Ok(self.db.get(CROSS_SIGNING_KEYS, &key)?)
    }

    /// Whether the user has uploaded cross-signing keys.
    pub fn has_cross_signing_keys(&self, user_id: &UserId) -> Result<bool, E2eeError> {
        Ok(self.cross_signing_key(user_id, CrossSigningKind::Master)?.is_some())
    }

    /// Whether every uploaded cross-signing key is already stored as is (a retried upload,
    /// which changes nothing and needs no user-interactive auth).
    pub fn cross_signing_keys_unchanged(
        &self,
        user_id: &UserId,
        uploaded: &[(CrossSigningKind, Value)],
    ) -> Result<bool, E2eeError> {
        for (kind, key) in uploaded {
            if self.cross_signing_key(user_id, *kind)?.as_ref() != Some(key) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// `keys/claim`: takes one one-time key of the algorithm for each (user, device); when the
    /// device has none left, its fallback key (marked used, and handed out again until
    /// replaced). Devices with neither are left out.
    /// Read and delete happen under one lock and in one batch, so a key is claimed exactly
    /// once.
    #[instrument(skip_all, fields(count = wanted.len()))]
    pub fn claim_keys(
        &self,
        wanted: &[(OwnedUserId, OwnedDeviceId, String)],
    ) -> Result<Vec<ClaimedKey>, E2eeError> {
        let _guard = self.locked();
        let mut batch = self.db.batch();
        let mut claimed = Vec::new();
        let mut taken: Vec<Vec<u8>> = Vec::new();
        for (user_id, device_id, algorithm) in wanted {
            let device_prefix = keys::prefix(&[user_id.as_bytes(), device_id.as_bytes()]);
            let prefix =
                keys::prefix(&[user_id.as_bytes(), device_id.as_bytes(), algorithm.as_bytes()]);
            let mut found = None;
            // The oldest upload first; keys this request already took are skipped.
            self.db.for_each_prefix(ONE_TIME_KEYS, &prefix, |key, value| {
                if !taken.iter().any(|done| done == key) {
                    found = Some((key.to_vec(), value.to_vec()));
                    return false;
                }
                true
            })?;
            if let Some((key, value)) = found {
                let key_id = one_time_key_id(&device_prefix, &key).unwrap_or_default().to_owned();
                let value = serde_json::from_slice(&value).map_err(|source| {
                    storage::Error::Corrupt { table: ONE_TIME_KEYS.to_owned(), source }
                })?;
                batch.delete(ONE_TIME_KEYS, &key)?;
                taken.push(key);
                claimed.push(ClaimedKey {
                    user_id: user_id.clone(),
                    device_id: device_id.clone(),
                    key_id,
                    key: value,
                });
                continue;
            }
            let fallback_key =
                keys::join(&[user_id.as_bytes(), device_id.as_bytes(), algorithm.as_bytes()]);
            if let Some(mut fallback) = self.db.get::<FallbackKey>(FALLBACK_KEYS, &fallback_key)? {
                if !fallback.used {
                    fallback.used = true;
                    batch.put(FALLBACK_KEYS, &fallback_key, &fallback)?;
                }
                claimed.push(ClaimedKey {
                    user_id: user_id.clone(),
                    device_id: device_id.clone(),
                    key_id: fallback.key_id,
                    key: fallback.key,
                });
            }
        }
        self.db.write(batch)?;
        Ok(claimed)
    }

    /// `keys/device_signing/upload`: stores the given cross-signing keys after checking that
    /// each belongs to the user and says its usage; a key change for the user.
    #[instrument(skip_all, fields(user_id = %user_id))]
    pub fn upload_cross_signing_keys(
        &self,
        user_id: &UserId,
        uploaded: &[(CrossSigningKind, Value)],
    ) -> Result<(), E2eeError> {
        for (kind, key) in uploaded {
            if key.get("user_id").and_then(Value::as_str) != Some(user_id.as_str()) {
                return Err(E2eeError::InvalidKeys(format!(
                    "The {} key does not belong to {user_id}",
                    kind.usage()
                )));
            }
            let usage = key.get("usage").and_then(Value::as_array);
            if !usage.is_some_and(|usage| usage.iter().any(|u| u == kind.usage())) {
                return Err(E2eeError::InvalidKeys(format!(
                    "The {} key must have usage {}",
                    kind.usage(),
                    kind.usage()
                )));
            }
            if key.get("keys").and_then(Value::as_object).is_none_or(Map::is_empty) {
                return Err(E2eeError::InvalidKeys(format!(
                    "The {} key has no keys",
                    kind.usage()
                )));
            }
        }
        // The self-signing and user-signing keys must be signed by the master key: the one in
        // this upload, else the stored one.
        let uploaded_master = uploaded
            .iter()
            .find(|(kind, _)| *kind == CrossSigningKind::Master)
            .map(|(_, key)| key.clone());
        let master = match uploaded_master {
            Some(master) => Some(master),
            None => self.cross_signing_key(user_id, CrossSigningKind::Master)?,
        };
        for (kind, key) in uploaded {
            if *kind == CrossSigningKind::Master {
                continue;
            }
            let Some(master_public) = master.as_ref().and_then(cross_signing_public_key) else {
                return Err(E2eeError::InvalidKeys(format!(
                    "The {} key needs a master key",
                    kind.usage()
                )));
            };
            if !signed_by(key, user_id, &format!("ed25519:{master_public}"), master_public) {
                return Err(E2eeError::InvalidSignature(format!(
                    "The {} key is not signed by the master key",
                    kind.usage()
                )));
            }
        }
        if uploaded.is_empty() {
            return Ok(());
        }
        self.commit(&[user_id], |batch| {
            for (kind, key) in uploaded {
                let table_key = keys::join(&[user_id.as_bytes(), kind.usage().as_bytes()]);
                batch.put(CROSS_SIGNING_KEYS, &table_key, key)?;
            }
            Ok(())
        })
    }

    /// `keys/signatures/upload`: merges the `signatures` of each uploaded object into the
    /// stored device key or cross-signing key it names (a device id, or a cross-signing
    /// public key). Returns the failures.
    #[instrument(skip_all, fields(signer = %signer))]
    pub fn upload_signatures(
        &self,
        signer: &UserId,
        signed: &BTreeMap<OwnedUserId, Map<String, Value>>,
    ) -> Result<SignatureFailures, E2eeError> {
        let mut failures = SignatureFailures::new();
        let mut updates: Vec<(&'static str, Vec<u8>, Value)> = Vec::new();
        let mut changed: Vec<&UserId> = Vec::new();
        for (user_id, objects) in signed {
            for (key_id, object) in objects {
                let mut fail = |failure: SignatureFailure| {
                    failures
                        .entry(user_id.to_string())
                        .or_default()
                        .insert(key_id.clone(), failure);
                };
                let Some(new_signatures) = object
                    .get("signatures")
                    .and_then(|signatures| signatures.get(signer.as_str()))
                    .and_then(Value::as_object)
                else {
                    fail(SignatureFailure::MissingSignature);
                    continue;
                };
                let Some(SignedObject { table, key: table_key, value: mut stored }) =
                    self.signed_object(user_id, key_id)?
                else {
                    fail(SignatureFailure::UnknownKey);
                    continue;
                };
                // Each new signature must verify over the stored object (not the uploaded copy,
                // which could differ) with a key of the signer's.
                let mut verified = true;
                for (signing_key_id, signature) in new_signatures {
                    // Clients send the whole object back, with the signatures it already had.
                    let already_stored = stored
                        .get("signatures")
                        .and_then(|signatures| signatures.get(signer.as_str()))
                        .and_then(|by_signer| by_signer.get(signing_key_id))
                        == Some(signature);
                    if already_stored {
                        continue;
                    }
                    let public_key = self.signer_public_key(signer, signing_key_id)?;
                    let mut candidate = stored.clone();
                    if let Some(object) = candidate.as_object_mut() {
                        object.insert(
                            "signatures".into(),
                            serde_json::json!({signer.as_str(): {signing_key_id: signature}}),
                        );
                    }
                    if !public_key.is_some_and(|public_key| {
                        signed_by(&candidate, signer, signing_key_id, &public_key)
                    }) {
                        verified = false;
                    }
                }
                if !verified {
                    fail(SignatureFailure::InvalidSignature);
                    continue;
                }
                let Some(stored_object) = stored.as_object_mut() else { continue };
                let signatures =
                    stored_object.entry("signatures").or_insert_with(|| Value::Object(Map::new()));
                if !signatures.is_object() {
                    *signatures = Value::Object(Map::new());
                }
                let Some(by_signer) = signatures.as_object_mut().map(|signatures| {
                    signatures.entry(signer.as_str()).or_insert_with(|| Value::Object(Map::new()))
                }) else {
                    continue;
                };
                if let Some(by_signer) = by_signer.as_object_mut() {
                    for (signing_key_id, signature) in new_signatures {
                        by_signer.insert(signing_key_id.clone(), signature.clone());
                    }
                }
                updates.retain(|(t, k, _)| !(*t == table && *k == table_key));
                updates.push((table, table_key, stored));
                if !changed.contains(&user_id.as_ref()) {
                    changed.push(user_id);
                }
            }
        }
        if !updates.is_empty() {
            self.commit(&changed, |batch| {
                for (table, key, value) in &updates {
                    batch.put(table, key, value)?;
                }
                Ok(())
            })?;
        }
        Ok(failures)
    }

    /// The stored object a signature upload names: a device of the user, or one of the user's
    /// cross-signing keys by its public key. Pending updates of the same request are not seen,
    /// so each object of a request is merged against the stored version.
    fn signed_object(
        &self,
        user_id: &UserId,
        key_id: &str,
    ) -> Result<Option<SignedObject>, E2eeError> {
        let device = device_key(user_id, key_id);
        if let Some(value) = self.db.get::<Value>(DEVICE_KEYS, &device)? {
            return Ok(Some(SignedObject { table: DEVICE_KEYS, key: device, value }));
        }
        for kind in CrossSigningKind::ALL {
            if let Some(value) = self.cross_signing_key(user_id, kind)?
                && value
                    .get("keys")
                    .and_then(Value::as_object)
                    .is_some_and(|keys| keys.values().any(|public| public == key_id))
            {
                let key = keys::join(&[user_id.as_bytes(), kind.usage().as_bytes()]);
                return Ok(Some(SignedObject { table: CROSS_SIGNING_KEYS, key, value }));
            }
        }
        Ok(None)
    }

    /// The public key behind one of the signer's key ids (`ed25519:<device id>` for a device,
    /// `ed25519:<public key>` for a cross-signing key).
    fn signer_public_key(
        &self,
        signer: &UserId,
        signing_key_id: &str,
    ) -> Result<Option<String>, E2eeError> {
        let Some(name) = signing_key_id.strip_prefix("ed25519:") else { return Ok(None) };
        if let Some(device) = self.db.get::<Value>(DEVICE_KEYS, &device_key(signer, name))?
            && let Some(public_key) =
                device.get("keys").and_then(|keys| keys.get(signing_key_id)).and_then(Value::as_str)
        {
            return Ok(Some(public_key.to_owned()));
        }
        for kind in CrossSigningKind::ALL {
            if let Some(key) = self.cross_signing_key(signer, kind)?
                && cross_signing_public_key(&key) == Some(name)
            {
                return Ok(Some(name.to_owned()));
            }
        }
        Ok(None)
    }

    /// Users whose keys or devices changed at positions in `(from, to]`.
    pub fn changed_users(&self, from: u64, to: u64) -> Result<Vec<OwnedUserId>, E2eeError> {
        let mut users: Vec<OwnedUserId> = Vec::new();
        let start = keys::encode_u64(from.saturating_add(1));
        self.db.for_each_prefix_from(KEY_CHANGES, b"", &start, |key, _| {
            let Some(position) = key.get(..8).and_then(keys::decode_u64) else { return true };
            if position > to {
                return false;
            }
            if let Ok(user_id) = OwnedUserId::try_from(String::from_utf8_lossy(&key[8..]).as_ref())
                && !users.contains(&user_id)
            {
                users.push(user_id);
            }
            true
        })?;
        Ok(users)
    }

    /// A remote user's devices or cross-signing keys changed (an `m.device_list_update` or
    /// `m.signing_key_update` EDU): a key-change entry, so that local users who share a room
    /// with them see it in `device_lists.changed` and `keys/changes` and query the keys again.
    /// Nothing of the remote user's keys is kept here: `keys/query` always asks their server.
    #[instrument(skip_all, fields(user_id = %user_id))]
    pub fn record_remote_key_change(&self, user_id: &UserId) -> Result<(), E2eeError> {
        self.commit(&[user_id], |_| Ok(()))
    }

    /// The `stream_id` of the user's device list over federation: the position of the user's
    /// last key change (0 before any), so it grows with every change.
    /// [Device management](https://spec.matrix.org/v1.16/server-server-api/#device-management)
    pub fn device_list_stream_id(&self, user_id: &UserId) -> Result<u64, E2eeError> {
        Ok(self
            .db
            .get_raw(LAST_KEY_CHANGE, user_id.as_bytes())?
            .and_then(|bytes| keys::decode_u64(&bytes))
            .unwrap_or(0))
    }

    /// Forgets deleted devices: their keys and to-device queues; a key change for the user.
    #[instrument(skip_all, fields(user_id = %user_id))]
    pub fn delete_devices(
        &self,
        user_id: &UserId,
        device_ids: &[OwnedDeviceId],
    ) -> Result<(), E2eeError> {
        if device_ids.is_empty() {
            return Ok(());
        }
        let _guard = self.locked();
        let mut doomed: Vec<(&str, Vec<u8>)> = Vec::new();
        for device_id in device_ids {
            doomed.push((DEVICE_KEYS, device_key(user_id, device_id.as_str())));
            let prefix = keys::prefix(&[user_id.as_bytes(), device_id.as_bytes()]);
            for table in [ONE_TIME_KEYS, FALLBACK_KEYS, TO_DEVICE, TO_DEVICE_CURSORS] {
                self.db.for_each_prefix(table, &prefix, |key, _| {
                    doomed.push((table, key.to_vec()));
                    true
                })?;
            }
        }
        self.commit(&[user_id], |batch| {
            for (table, key) in &doomed {
                batch.delete(table, key)?;
            }
            Ok(())
        })
    }

    /// `sendToDevice`: queues each message for its device, all at one stream position.
    /// Returns false, and queues nothing, when the sender's device already used `txn_id`.
    #[instrument(skip_all, fields(sender = %sender, kind = %kind))]
    pub fn send_to_device(
        &self,
        sender: &UserId,
        sender_device: &DeviceId,
        txn_id: &str,
        kind: &str,
        messages: &[ToDeviceDelivery],
    ) -> Result<bool, E2eeError> {
        let txn_key = keys::join(&[sender.as_bytes(), sender_device.as_bytes(), txn_id.as_bytes()]);
        self.queue_to_device((TO_DEVICE_TXNS, &txn_key), sender, kind, messages)
    }

    /// An `m.direct_to_device` EDU from `origin`: queues each message like
    /// [`E2ee::send_to_device`]. Returns false, and queues nothing, when `origin` already sent
    /// `message_id` (servers retry transactions, and the spec makes the id the idempotence key).
    /// [Send-to-device messaging](https://spec.matrix.org/v1.16/server-server-api/#send-to-device-messaging)
    #[instrument(skip_all, fields(origin = %origin, sender = %sender, kind = %kind))]
    pub fn receive_remote_to_device(
        &self,
        origin: &ServerName,
        message_id: &str,
        sender: &UserId,
        kind: &str,
        messages: &[ToDeviceDelivery],
    ) -> Result<bool, E2eeError> {
        let message_key = keys::join(&[origin.as_bytes(), message_id.as_bytes()]);
        self.queue_to_device((REMOTE_TO_DEVICE_MESSAGES, &message_key), sender, kind, messages)
    }

    /// Queues to-device messages at one stream position, unless `(table, key)` (the idempotence
    /// record) is already there; writes that record in the same batch, under the lock.
    fn queue_to_device(
        &self,
        (done_table, done_key): (&str, &[u8]),
        sender: &UserId,
        kind: &str,
        messages: &[ToDeviceDelivery],
    ) -> Result<bool, E2eeError> {
        let _guard = self.locked();
        if self.db.contains(done_table, done_key)? {
            return Ok(false);
        }
        let (position, ()) = self.db.write_at_next_position(|position, batch| {
            batch.put_raw(done_table, done_key, b"")?;
            for (index, message) in (0u64..).zip(messages) {
                let mut key =
                    keys::prefix(&[message.user_id.as_bytes(), message.device_id.as_bytes()]);
                key.extend_from_slice(&keys::encode_u64(position));
                key.extend_from_slice(&keys::encode_u64(index));
                let stored = ToDeviceMessage {
                    sender: sender.to_string(),
                    kind: kind.to_owned(),
                    content: message.content.clone(),
                };
                batch.put(TO_DEVICE, &key, &stored)?;
            }
            Ok(())
        })?;
        drop(_guard);
        self.notifier.notify(position);
        Ok(true)
    }

    /// The user's dehydrated device, if one is set.
    pub fn dehydrated_device(
        &self,
        user_id: &UserId,
    ) -> Result<Option<DehydratedDevice>, E2eeError> {
        Ok(self.db.get(DEHYDRATED_DEVICES, user_id.as_bytes())?)
    }

    /// Makes `device` the user's dehydrated device (replacing the record of any earlier one;
    /// the caller deletes that device).
    pub fn set_dehydrated_device(
        &self,
        user_id: &UserId,
        device: &DehydratedDevice,
    ) -> Result<(), E2eeError> {
        let mut batch = self.db.batch();
        batch.put(DEHYDRATED_DEVICES, user_id.as_bytes(), device)?;
        self.db.write(batch)?;
        Ok(())
    }

    /// Forgets the user's dehydrated device record.
    pub fn remove_dehydrated_device(&self, user_id: &UserId) -> Result<(), E2eeError> {
        let mut batch = self.db.batch();
        batch.delete(DEHYDRATED_DEVICES, user_id.as_bytes())?;
        self.db.write(batch)?;
        Ok(())
    }

    /// One page of a device's to-device messages after `after` (the `(position, index)` of
    /// the last message of the previous page), oldest first, at most
    /// [`DEHYDRATED_EVENTS_PER_PAGE_MAX`]; and where the page ended (`after` again when it is
    /// empty). Nothing is deleted: a rehydration that is cut short can start over.
    pub fn to_device_page(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        after: Option<InboxPlace>,
    ) -> Result<(Vec<Value>, Option<InboxPlace>), E2eeError> {
        let prefix = keys::prefix(&[user_id.as_bytes(), device_id.as_bytes()]);
        let mut events = Vec::new();
        let mut last = after;
        self.db.for_each_prefix(TO_DEVICE, &prefix, |key, value| {
            let suffix = &key[prefix.len()..];
            let (Some(position), Some(index)) = (
                suffix.get(..8).and_then(keys::decode_u64),
                suffix.get(8..16).and_then(keys::decode_u64),
            ) else {
                return true;
            };
            if after.is_some_and(|after| (position, index) <= after) {
                return true;
            }
            if events.len() == DEHYDRATED_EVENTS_PER_PAGE_MAX {
                return false;
            }
            if let Ok(message) = serde_json::from_slice::<ToDeviceMessage>(value) {
                events.push(message.into_event());
            }
            last = Some((position, index));
            true
        })?;
        Ok((events, last))
    }

    /// The device's to-device messages for a sync, at most [`TO_DEVICE_PER_SYNC_MAX`], in order,
    /// and the cursor to put in `next_batch` when some had to wait for the next sync.
    ///
    /// First deletes what the client acknowledged by syncing from `since`: up to the last
    /// message delivered under `cursor` when the token has one, else everything at or before
    /// `since`. Then returns the rest up to `upto`. A lost answer is delivered again (the client
    /// retries with the same token), an acknowledged one never.
    pub fn to_device_events(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        since: Option<u64>,
        cursor: Option<u64>,
        upto: u64,
    ) -> Result<(Vec<Value>, Option<u64>), E2eeError> {
        let prefix = keys::prefix(&[user_id.as_bytes(), device_id.as_bytes()]);
        let cursor_key = |cursor: u64| {
            let mut key = prefix.clone();
            key.extend_from_slice(&keys::encode_u64(cursor));
            key
        };
        let acked_up_to = match (since, cursor) {
            (Some(_), Some(cursor)) => self.db.get_raw(TO_DEVICE_CURSORS, &cursor_key(cursor))?,
            _ => None,
        };
        let mut acknowledged = Vec::new();
        let mut events = Vec::new();
        let mut last_delivered = None;
        let mut limited = false;
        self.db.for_each_prefix(TO_DEVICE, &prefix, |key, value| {
            let Some(position) = key.get(prefix.len()..prefix.len() + 8).and_then(keys::decode_u64)
            else {
                return true;
            };
            let acked = match (&acked_up_to, since) {
                (Some(last), _) => key <= last.as_slice(),
                (None, Some(since)) => position <= since,
                (None, None) => false,
            };
            if acked {
                acknowledged.push(key.to_vec());
                return true;
            }
            if position > upto {
                return false;
            }
            if events.len() == TO_DEVICE_PER_SYNC_MAX {
                limited = true;
                return false;
            }
            if let Ok(message) = serde_json::from_slice::<ToDeviceMessage>(value) {
                events.push(message.into_event());
            }
            last_delivered = Some(key.to_vec());
            true
        })?;
        let mut batch = self.db.batch();
        for key in &acknowledged {
            batch.delete(TO_DEVICE, key)?;
        }
        if since.is_some() {
            // Cursors older than the token's are done with: the client has moved past them. A
            // token without one means the client is past every cursor.
            let mut done = Vec::new();
            self.db.for_each_prefix(TO_DEVICE_CURSORS, &prefix, |key, _| {
                let id = key.get(prefix.len()..).and_then(keys::decode_u64);
                if cursor.is_none_or(|cursor| id.is_some_and(|id| id < cursor)) {
                    done.push(key.to_vec());
                }
                true
            })?;
            for key in &done {
                batch.delete(TO_DEVICE_CURSORS, key)?;
            }
        }
        let mut next_cursor = None;
        if limited && let Some(last_delivered) = &last_delivered {
            let id = self.db.next_short(&mut batch)?;
            batch.put_raw(TO_DEVICE_CURSORS, &cursor_key(id), last_delivered)?;
            next_cursor = Some(id);
        }
        if !batch.is_empty() {
            self.db.write(batch)?;
        }
        Ok((events, next_cursor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e2ee() -> (tempfile::TempDir, E2ee) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let notifier = Notifier::new();
        (dir, E2ee::new(db, notifier))
    }

    #[test]
    fn one_time_keys_are_claimed_once_in_upload_order_then_the_fallback_key() {
        let (_dir, e2ee) = e2ee();
        let user_id: OwnedUserId = "@a:x".try_into().unwrap();
        let device_id: OwnedDeviceId = "D".into();
        let upload = |otks: Value, fallback: Value| {
            e2ee.upload_keys(
                &user_id,
                &device_id,
                None,
                otks.as_object().unwrap(),
                fallback.as_object().unwrap(),
            )
            .unwrap()
        };
        let fallback = serde_json::json!({"signed_curve25519:f": {"key": "fb"}});
        upload(serde_json::json!({"signed_curve25519:z": {"key": "old"}}), fallback);
        let counts = upload(
            serde_json::json!({"signed_curve25519:a": {"key": "new"}, "signed_curve25519:z": {"key": "dup"}}),
            serde_json::json!({}),
        );
        assert_eq!(counts["signed_curve25519"], 2);
        let wanted = [(user_id.clone(), device_id.clone(), "signed_curve25519".to_owned())];
        let claim = || {
            let claimed = e2ee.claim_keys(&wanted).unwrap();
            (claimed[0].key_id.clone(), claimed[0].key["key"].as_str().unwrap().to_owned())
        };
        assert_eq!(claim(), ("signed_curve25519:z".to_owned(), "old".to_owned()));
        assert_eq!(claim(), ("signed_curve25519:a".to_owned(), "new".to_owned()));
        assert_eq!(e2ee.unused_fallback_key_types(&user_id, &device_id).unwrap().len(), 1);
        assert_eq!(claim(), ("signed_curve25519:f".to_owned(), "fb".to_owned()));
        assert!(e2ee.unused_fallback_key_types(&user_id, &device_id).unwrap().is_empty());
        assert_eq!(e2ee.one_time_key_counts(&user_id, &device_id).unwrap()["signed_curve25519"], 0);
    }
}
