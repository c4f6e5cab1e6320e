//! Server-side key backups: per-user backup versions (`algorithm`, `auth_data`) and the
//! encrypted megolm session keys stored in them, with the replace rules of the spec, an `etag`
//! that changes whenever the stored keys change, and a key `count`.
//!
//! The server never sees the keys themselves: `session_data` and `auth_data` are opaque.
//! Keys can only be written to the latest version; a deleted version stays known as a
//! tombstone so that deleting it again succeeds and its number is never handed out again.
//!
//! [Server-side key backups](https://spec.matrix.org/v1.16/client-server-api/#server-side-key-backups)

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use ruma::{OwnedRoomId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use storage::{Db, keys};
use tracing::instrument;

/// (user, version) -> the backup version's record ([`StoredVersion`]).
const VERSIONS: &str = "user_version_to_key_backup_version";
/// (user, version, room, session) -> the backed-up session key ([`KeyBackupData`]).
const ROOM_KEYS: &str = "user_version_room_session_to_room_key";

/// Why a key backup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyBackupError {
    /// The user has no backup (or deleted every one).
    #[error("no current backup version")]
    NoBackup,
    /// The named version does not exist (or was deleted).
    #[error("unknown backup version")]
    UnknownVersion,
    /// Keys may only be written to the latest version.
    #[error("wrong backup version, the current one is {current_version}")]
    WrongVersion {
        /// The latest version.
        current_version: String,
    },
    /// The body names a different version than the path.
    #[error("the version in the body does not match the path")]
    VersionMismatch,
    /// An update tried to change the backup's algorithm.
    #[error("the algorithm does not match the backup's")]
    AlgorithmMismatch,
    /// The backup holds no key for that session.
    #[error("no key for that session")]
    KeyNotFound,
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] storage::Error),
}

/// A backup version as stored.
#[derive(Clone, Serialize, Deserialize)]
struct StoredVersion {
    algorithm: String,
    auth_data: Map<String, Value>,
    /// Bumped whenever a key of the version is added, replaced or deleted.
    etag: u64,
    /// How many keys the version holds.
    count: u64,
    /// A deleted version keeps its record (without keys) so its number stays used.
    deleted: bool,
}

/// A backup version as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupVersion {
    /// The opaque version string (a decimal number here).
    pub version: String,
    /// The backup algorithm.
    pub algorithm: String,
    /// Algorithm-dependent data (the backup's public key and its signatures).
    pub auth_data: Map<String, Value>,
    /// Changes whenever the stored keys change.
    pub etag: String,
    /// How many keys the backup holds.
    pub count: u64,
}

impl BackupVersion {
    fn new(version: u64, stored: StoredVersion) -> Self {
        Self {
            version: version.to_string(),
            algorithm: stored.algorithm,
            auth_data: stored.auth_data,
            etag: stored.etag.to_string(),
            count: stored.count,
        }
    }
}

/// One backed-up session key (`KeyBackupData` in the spec).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyBackupData {
    /// The index of the first message the key can decrypt.
    pub first_message_index: u64,
    /// How many times the key was forwarded between devices.
    pub forwarded_count: u64,
    /// Whether the backing-up device verified the device the key came from.
    pub is_verified: bool,
    /// The encrypted key, opaque to the server.
    pub session_data: Map<String, Value>,
}

impl KeyBackupData {
    /// Whether `self` should replace `current` for the same session: a verified key beats an
    /// unverified one, then the lower `first_message_index` wins, then the lower
    /// `forwarded_count`; on a tie the stored key stays.
    pub fn replaces(&self, current: &Self) -> bool {
        if self.is_verified != current.is_verified {
            return self.is_verified;
        }
        if self.first_message_index != current.first_message_index {
            return self.first_message_index < current.first_message_index;
        }
        self.forwarded_count < current.forwarded_count
    }
}

/// A stored table entry: key and value bytes.
type Entry = (Vec<u8>, Vec<u8>);

/// Session keys by room id, then by session id.
pub type RoomKeys = BTreeMap<OwnedRoomId, BTreeMap<String, KeyBackupData>>;

/// Which keys of a version a read or delete covers.
#[derive(Clone, Copy)]
pub enum KeySelection<'a> {
    /// Every key of the version.
    All,
    /// The keys of one room.
    Room(&'a RoomId),
    /// One session's key.
    Session(&'a RoomId, &'a str),
}

/// The `etag` and `count` a key write or delete answers with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeysUpdate {
    /// The version's etag after the change.
    pub etag: String,
    /// How many keys the version holds after the change.
    pub count: u64,
}

/// The key backup component.
#[derive(Clone)]
pub struct KeyBackup {
    db: Db,
    /// Held around read-modify-write sequences (new version numbers, key replacement, the
    /// count and etag), so concurrent uploads never lose a key or miscount.
    lock: Arc<Mutex<()>>,
}

fn version_key(user_id: &UserId, version: u64) -> Vec<u8> {
    keys::join(&[user_id.as_bytes(), &keys::encode_u64(version)])
}

fn room_key_prefix(user_id: &UserId, version: u64, selection: KeySelection<'_>) -> Vec<u8> {
    let version = keys::encode_u64(version);
    match selection {
        KeySelection::All => keys::prefix(&[user_id.as_bytes(), &version]),
        KeySelection::Room(room_id) => {
            keys::prefix(&[user_id.as_bytes(), &version, room_id.as_bytes()])
        }
        KeySelection::Session(room_id, session_id) => {
            keys::join(&[user_id.as_bytes(), &version, room_id.as_bytes(), session_id.as_bytes()])
        }
    }
}

fn room_key(user_id: &UserId, version: u64, room_id: &RoomId, session_id: &str) -> Vec<u8> {
    room_key_prefix(user_id, version, KeySelection::Session(room_id, session_id))
}

/// A version string as the number it stands for; anything else names no version.
fn parse_version(version: &str) -> Option<u64> {
    if version.is_empty() || !version.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    version.parse().ok()
}

impl KeyBackup {
    /// The component over `db`.
    pub fn new(db: Db) -> Self {
        Self { db, lock: Arc::default() }
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every version record of the user, deleted ones included, in version order.
    fn versions(&self, user_id: &UserId) -> Result<Vec<(u64, StoredVersion)>, KeyBackupError> {
        let prefix = keys::prefix(&[user_id.as_bytes()]);
        let mut versions = Vec::new();
        for (key, value) in self.db.scan_prefix(VERSIONS, &prefix)? {
            let Some(version) = key.get(prefix.len()..).and_then(keys::decode_u64) else {
                continue;
            };
            let stored = serde_json::from_slice(&value)
                .map_err(|source| storage::Error::Corrupt { table: VERSIONS.to_owned(), source })?;
            versions.push((version, stored));
        }
        Ok(versions)
    }

    /// The latest version that is not deleted.
    fn current(&self, user_id: &UserId) -> Result<Option<(u64, StoredVersion)>, KeyBackupError> {
        Ok(self.versions(user_id)?.into_iter().rev().find(|(_, stored)| !stored.deleted))
    }

    /// A version that exists and is not deleted.
    fn existing(
        &self,
        user_id: &UserId,
        version: &str,
    ) -> Result<(u64, StoredVersion), KeyBackupError> {
        let number = parse_version(version).ok_or(KeyBackupError::UnknownVersion)?;
        match self.db.get::<StoredVersion>(VERSIONS, &version_key(user_id, number))? {
            Some(stored) if !stored.deleted => Ok((number, stored)),
            _ => Err(KeyBackupError::UnknownVersion),
        }
    }

    /// `POST room_keys/version`: a new version, which becomes the latest. Its number is one
    /// more than any version the user ever had.
    #[instrument(skip_all, fields(user_id = %user_id))]
    pub fn create_version(
        &self,
        user_id: &UserId,
        algorithm: &str,
        auth_data: Map<String, Value>,
    ) -> Result<String, KeyBackupError> {
        let _guard = self.locked();
        let number = self.versions(user_id)?.last().map_or(1, |(number, _)| number + 1);
        let stored = StoredVersion {
            algorithm: algorithm.to_owned(),
            auth_data,
            etag: 0,
            count: 0,
            deleted: false,
        };
        let mut batch = self.db.batch();
        batch.put(VERSIONS, &version_key(user_id, number), &stored)?;
        self.db.write(batch)?;
        Ok(number.to_string())
    }

    /// `GET room_keys/version`: the latest version.
    pub fn latest_version(&self, user_id: &UserId) -> Result<BackupVersion, KeyBackupError> {
        let (number, stored) = self.current(user_id)?.ok_or(KeyBackupError::NoBackup)?;
        Ok(BackupVersion::new(number, stored))
    }

    /// `GET room_keys/version/{version}`.
    pub fn version(
        &self,
        user_id: &UserId,
        version: &str,
    ) -> Result<BackupVersion, KeyBackupError> {
        let (number, stored) = self.existing(user_id, version)?;
        Ok(BackupVersion::new(number, stored))
    }

    /// `PUT room_keys/version/{version}`: replaces `auth_data`; the algorithm must stay, and a
    /// version in the body must be the one in the path.
    #[instrument(skip_all, fields(user_id = %user_id, version = %version))]
    pub fn update_version(
        &self,
        user_id: &UserId,
        version: &str,
        body_version: Option<&str>,
        algorithm: &str,
        auth_data: Map<String, Value>,
    ) -> Result<(), KeyBackupError> {
        if body_version.is_some_and(|body_version| body_version != version) {
            return Err(KeyBackupError::VersionMismatch);
        }
        let _guard = self.locked();
        let (number, mut stored) = self.existing(user_id, version)?;
        if stored.algorithm != algorithm {
            return Err(KeyBackupError::AlgorithmMismatch);
        }
        stored.auth_data = auth_data;
        let mut batch = self.db.batch();
        batch.put(VERSIONS, &version_key(user_id, number), &stored)?;
        self.db.write(batch)?;
        Ok(())
    }

    /// `DELETE room_keys/version/{version}`: forgets the version's keys and marks it deleted.
    /// Deleting a deleted version again succeeds; a version that never existed is unknown.
    #[instrument(skip_all, fields(user_id = %user_id, version = %version))]
    pub fn delete_version(&self, user_id: &UserId, version: &str) -> Result<(), KeyBackupError> {
        let number = parse_version(version).ok_or(KeyBackupError::UnknownVersion)?;
        let _guard = self.locked();
        let key = version_key(user_id, number);
        let mut stored: StoredVersion =
            self.db.get(VERSIONS, &key)?.ok_or(KeyBackupError::UnknownVersion)?;
        if stored.deleted {
            return Ok(());
        }
        let mut batch = self.db.batch();
        for (key, _) in self.scan_selection(user_id, number, KeySelection::All)? {
            batch.delete(ROOM_KEYS, &key)?;
        }
        stored.deleted = true;
        stored.count = 0;
        stored.auth_data = Map::new();
        batch.put(VERSIONS, &key, &stored)?;
        self.db.write(batch)?;
        Ok(())
    }

    /// `PUT room_keys/keys[/{roomId}[/{sessionId}]]`: stores keys in the latest version. A
    /// session that already has a key keeps it unless the new one [`KeyBackupData::replaces`]
    /// it. The etag changes only when some key did.
    #[instrument(skip_all, fields(user_id = %user_id, version = %version))]
    pub fn put_keys(
        &self,
        user_id: &UserId,
        version: &str,
        room_keys: &RoomKeys,
    ) -> Result<KeysUpdate, KeyBackupError> {
        let _guard = self.locked();
        let (number, mut stored) = self.current(user_id)?.ok_or(KeyBackupError::NoBackup)?;
        if parse_version(version) != Some(number) {
            // An older version that still exists is the wrong one; anything else is unknown.
            self.existing(user_id, version)?;
            return Err(KeyBackupError::WrongVersion { current_version: number.to_string() });
        }
        let mut batch = self.db.batch();
        let mut changed = false;
        for (room_id, sessions) in room_keys {
            for (session_id, data) in sessions {
                let key = room_key(user_id, number, room_id, session_id);
                match self.db.get::<KeyBackupData>(ROOM_KEYS, &key)? {
                    Some(current) if !data.replaces(&current) => continue,
                    Some(_) => {}
                    None => stored.count += 1,
                }
                batch.put(ROOM_KEYS, &key, data)?;
                changed = true;
            }
        }
        if changed {
            stored.etag += 1;
            batch.put(VERSIONS, &version_key(user_id, number), &stored)?;
            self.db.write(batch)?;
        }
        Ok(KeysUpdate { etag: stored.etag.to_string(), count: stored.count })
    }

    /// `GET room_keys/keys[/{roomId}[/{sessionId}]]`: the selected keys of a version.
    pub fn get_keys(
        &self,
        user_id: &UserId,
        version: &str,
        selection: KeySelection<'_>,
    ) -> Result<RoomKeys, KeyBackupError> {
        let (number, _) = self.existing(user_id, version)?;
        let mut room_keys = RoomKeys::new();
        let version_prefix = room_key_prefix(user_id, number, KeySelection::All);
        for (key, value) in self.scan_selection(user_id, number, selection)? {
            let Some((room_id, session_id)) = key.get(version_prefix.len()..).and_then(|rest| {
                let separator = rest.iter().position(|byte| *byte == keys::SEP)?;
                let room_id = std::str::from_utf8(&rest[..separator]).ok()?;
                let session_id = std::str::from_utf8(&rest[separator + 1..]).ok()?;
                Some((OwnedRoomId::try_from(room_id).ok()?, session_id.to_owned()))
            }) else {
                continue;
            };
            let data = serde_json::from_slice(&value).map_err(|source| {
                storage::Error::Corrupt { table: ROOM_KEYS.to_owned(), source }
            })?;
            room_keys.entry(room_id).or_default().insert(session_id, data);
        }
        Ok(room_keys)
    }

    /// `GET room_keys/keys/{roomId}/{sessionId}`: one session's key.
    pub fn get_session_key(
        &self,
        user_id: &UserId,
        version: &str,
        room_id: &RoomId,
        session_id: &str,
    ) -> Result<KeyBackupData, KeyBackupError> {
        let (number, _) = self.existing(user_id, version)?;
        self.db
            .get(ROOM_KEYS, &room_key(user_id, number, room_id, session_id))?
            .ok_or(KeyBackupError::KeyNotFound)
    }

    /// The stored entries a selection covers.
    fn scan_selection(
        &self,
        user_id: &UserId,
        number: u64,
        selection: KeySelection<'_>,
    ) -> Result<Vec<Entry>, KeyBackupError> {
        let key = room_key_prefix(user_id, number, selection);
        Ok(match selection {
            KeySelection::Session(..) => {
                self.db.get_raw(ROOM_KEYS, &key)?.map(|value| (key, value)).into_iter().collect()
            }
            _ => self.db.scan_prefix(ROOM_KEYS, &key)?,
        })
    }

    /// `DELETE room_keys/keys[/{roomId}[/{sessionId}]]`: forgets the selected keys of a
    /// version (any existing version, not only the latest).
    #[instrument(skip_all, fields(user_id = %user_id, version = %version))]
    pub fn delete_keys(
        &self,
        user_id: &UserId,
        version: &str,
        selection: KeySelection<'_>,
    ) -> Result<KeysUpdate, KeyBackupError> {
        let _guard = self.locked();
        let (number, mut stored) = self.existing(user_id, version)?;
        let doomed = self.scan_selection(user_id, number, selection)?;
        if !doomed.is_empty() {
            let mut batch = self.db.batch();
            for (key, _) in &doomed {
                batch.delete(ROOM_KEYS, key)?;
            }
            stored.count = stored.count.saturating_sub(doomed.len() as u64);
            stored.etag += 1;
            batch.put(VERSIONS, &version_key(user_id, number), &stored)?;
            self.db.write(batch)?;
        }
        Ok(KeysUpdate { etag: stored.etag.to_string(), count: stored.count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_data(
        is_verified: bool,
        first_message_index: u64,
        forwarded_count: u64,
    ) -> KeyBackupData {
        KeyBackupData {
            first_message_index,
            forwarded_count,
            is_verified,
            session_data: Map::new(),
        }
    }

    #[track_caller]
    fn check(new: KeyBackupData, current: KeyBackupData, replaces: bool) {
        assert_eq!(new.replaces(&current), replaces, "{new:?} over {current:?}");
    }

    #[test]
    fn replace_rules_follow_the_spec_order() {
        check(key_data(true, 5, 5), key_data(false, 0, 0), true);
        check(key_data(false, 0, 0), key_data(true, 5, 5), false);
        check(key_data(false, 1, 9), key_data(false, 2, 0), true);
        check(key_data(false, 2, 0), key_data(false, 1, 9), false);
        check(key_data(true, 1, 1), key_data(true, 1, 2), true);
        check(key_data(true, 1, 2), key_data(true, 1, 1), false);
        check(key_data(true, 1, 1), key_data(true, 1, 1), false);
    }

    #[test]
    fn versions_count_etag_and_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let backup = KeyBackup::new(Db::open(dir.path()).unwrap());
        let user_id: &UserId = "@a:x".try_into().unwrap();
        let room_id: OwnedRoomId = "!r:x".try_into().unwrap();
        assert!(matches!(backup.latest_version(user_id), Err(KeyBackupError::NoBackup)));
        let first = backup.create_version(user_id, "alg", Map::new()).unwrap();
        let keys = RoomKeys::from([(
            room_id.clone(),
            BTreeMap::from([("s1".to_owned(), key_data(false, 3, 0))]),
        )]);
        let update = backup.put_keys(user_id, &first, &keys).unwrap();
        assert_eq!(update, KeysUpdate { etag: "1".into(), count: 1 });
        // The same key again changes nothing, not even the etag.
        assert_eq!(backup.put_keys(user_id, &first, &keys).unwrap(), update);
        let second = backup.create_version(user_id, "alg", Map::new()).unwrap();
        assert!(matches!(
            backup.put_keys(user_id, &first, &keys),
            Err(KeyBackupError::WrongVersion { current_version }) if current_version == second
        ));
        backup.delete_version(user_id, &second).unwrap();
        backup.delete_version(user_id, &second).unwrap();
        assert_eq!(backup.latest_version(user_id).unwrap().version, first);
        // A deleted number is never reused.
        let third = backup.create_version(user_id, "alg", Map::new()).unwrap();
        assert_eq!(third, "3");
        let all = backup.get_keys(user_id, &first, KeySelection::All).unwrap();
        assert_eq!(all, keys);
        let update = backup.delete_keys(user_id, &first, KeySelection::Room(&room_id)).unwrap();
        assert_eq!(update, KeysUpdate { etag: "2".into(), count: 0 });
    }
}
