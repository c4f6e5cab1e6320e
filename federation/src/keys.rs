//! Server keys: our own `/_matrix/key/v2/server` answer, checking a peer's answer (its
//! self-signature), and the [`KeyStore`] trait through which fetched keys are persisted.
//!
//! [Retrieving server keys](https://spec.matrix.org/v1.16/server-server-api/#retrieving-server-keys)

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedServerName, ServerName, SigningKeyAlgorithm,
    signatures::{to_canonical_json_string_for_signing, verify_canonical_json_bytes},
};
use serde::{Deserialize, Serialize};

use crate::{Error, ServerSigningKey};

/// One public key of a server, as we know it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVerifyKey {
    /// The public key, unpadded base64.
    pub key: String,
    /// Until when (ms since the epoch) the key may be used: the response's `valid_until_ts`
    /// for current keys, `expired_ts` for old ones.
    pub valid_until_ts: u64,
}

impl StoredVerifyKey {
    /// The raw key bytes.
    pub fn key_bytes(&self) -> Option<Vec<u8>> {
        STANDARD_NO_PAD.decode(self.key.trim_end_matches('=')).ok()
    }
}

/// What we keep about one server's keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredServerKeys {
    /// The latest key response, exactly as the server signed it (a notary answers with it).
    pub response: CanonicalJsonObject,
    /// Its `valid_until_ts`.
    pub valid_until_ts: u64,
    /// Every key we have seen, current and old, by key id.
    pub verify_keys: BTreeMap<String, StoredVerifyKey>,
    /// When we last fetched (ms since the epoch), to rate-limit refetches for unknown keys.
    pub fetched_at_ms: u64,
}

/// Where fetched server keys are persisted. `src/` implements it over the database; tests use
/// [`MemoryKeyStore`].
pub trait KeyStore: Send + Sync + 'static {
    /// The keys stored for `server_name`, if any.
    fn load_server_keys(&self, server_name: &ServerName)
    -> Result<Option<StoredServerKeys>, Error>;
    /// Replaces the keys stored for `server_name`.
    fn store_server_keys(
        &self,
        server_name: &ServerName,
        keys: &StoredServerKeys,
    ) -> Result<(), Error>;
}

/// A [`KeyStore`] in memory, for tests.
#[derive(Debug, Default)]
pub struct MemoryKeyStore {
    servers: Mutex<HashMap<OwnedServerName, StoredServerKeys>>,
}

impl KeyStore for MemoryKeyStore {
    fn load_server_keys(
        &self,
        server_name: &ServerName,
    ) -> Result<Option<StoredServerKeys>, Error> {
        let servers = self.servers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(servers.get(server_name).cloned())
    }

    fn store_server_keys(
        &self,
        server_name: &ServerName,
        keys: &StoredServerKeys,
    ) -> Result<(), Error> {
        let mut servers = self.servers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        servers.insert(server_name.to_owned(), keys.clone());
        Ok(())
    }
}

/// An old key of ours, listed in `old_verify_keys`.
#[derive(Clone, Debug)]
pub struct OldVerifyKey {
    /// `ed25519:<version>`.
    pub key_id: String,
    /// The public key, unpadded base64.
    pub key: String,
    /// When it stopped being used (ms since the epoch).
    pub expired_ts: u64,
}

/// Our own key response, signed by us: the body of `GET /_matrix/key/v2/server`.
pub fn own_server_keys(
    signing_key: &ServerSigningKey,
    old_verify_keys: &[OldVerifyKey],
    valid_until_ts: u64,
) -> Result<CanonicalJsonObject, Error> {
    let mut verify_keys = CanonicalJsonObject::new();
    verify_keys.insert(
        signing_key.key_id(),
        object([("key", CanonicalJsonValue::String(signing_key.public_key_base64()))]),
    );
    let mut old = CanonicalJsonObject::new();
    for key in old_verify_keys {
        old.insert(
            key.key_id.clone(),
            object([
                ("key", CanonicalJsonValue::String(key.key.clone())),
                ("expired_ts", integer(key.expired_ts)),
            ]),
        );
    }
    let mut response = CanonicalJsonObject::new();
    response.insert(
        "server_name".into(),
        CanonicalJsonValue::String(signing_key.server_name().to_string()),
    );
    response.insert("valid_until_ts".into(), integer(valid_until_ts));
    response.insert("verify_keys".into(), CanonicalJsonValue::Object(verify_keys));
    response.insert("old_verify_keys".into(), CanonicalJsonValue::Object(old));
    signing_key.sign_json(&mut response)?;
    Ok(response)
}

fn object<const N: usize>(fields: [(&str, CanonicalJsonValue); N]) -> CanonicalJsonValue {
    CanonicalJsonValue::Object(
        fields.into_iter().map(|(key, value)| (key.to_owned(), value)).collect(),
    )
}

fn integer(value: u64) -> CanonicalJsonValue {
    CanonicalJsonValue::Integer(ruma::Int::try_from(value).unwrap_or(ruma::Int::MAX))
}

/// Checks a key response of `server_name` (its name, its keys, its self-signature by at least
/// one of its current keys) and merges it into what we knew (`previous`), so old keys stay
/// known.
pub fn check_server_keys(
    server_name: &ServerName,
    response: CanonicalJsonObject,
    previous: Option<StoredServerKeys>,
    now_ms: u64,
) -> Result<StoredServerKeys, Error> {
    let invalid = |reason: &str| Error::InvalidResponse {
        server_name: server_name.to_owned(),
        reason: reason.to_owned(),
    };
    match response.get("server_name") {
        Some(CanonicalJsonValue::String(name)) if name == server_name.as_str() => {}
        _ => return Err(invalid("server_name does not match")),
    }
    let valid_until_ts = match response.get("valid_until_ts") {
        Some(CanonicalJsonValue::Integer(value)) => u64::try_from(i64::from(*value)).unwrap_or(0),
        _ => return Err(invalid("missing valid_until_ts")),
    };
    let mut current = BTreeMap::new();
    let Some(CanonicalJsonValue::Object(verify_keys)) = response.get("verify_keys") else {
        return Err(invalid("missing verify_keys"));
    };
    for (key_id, key) in verify_keys {
        let key = key_field(key, "key").ok_or_else(|| invalid("a verify key has no key"))?;
        current.insert(key_id.clone(), StoredVerifyKey { key: key.to_owned(), valid_until_ts });
    }
    let mut old = BTreeMap::new();
    if let Some(CanonicalJsonValue::Object(old_keys)) = response.get("old_verify_keys") {
        for (key_id, key) in old_keys {
            let (Some(public_key), Some(CanonicalJsonValue::Integer(expired_ts))) = (
                key_field(key, "key"),
                match key {
                    CanonicalJsonValue::Object(key) => key.get("expired_ts"),
                    _ => None,
                },
            ) else {
                return Err(invalid("an old verify key lacks key or expired_ts"));
            };
            let expired_ts = u64::try_from(i64::from(*expired_ts)).unwrap_or(0);
            old.insert(
                key_id.clone(),
                StoredVerifyKey { key: public_key.to_owned(), valid_until_ts: expired_ts },
            );
        }
    }
    let Some(CanonicalJsonValue::Object(signatures)) = response.get("signatures") else {
        return Err(invalid("unsigned"));
    };
    let Some(CanonicalJsonValue::Object(own_signatures)) = signatures.get(server_name.as_str())
    else {
        return Err(invalid("not signed by the server itself"));
    };
    let canonical = to_canonical_json_string_for_signing(&response)?;
    let mut verified = false;
    for (key_id, signature) in own_signatures {
        let Some(key) = current.get(key_id) else { continue };
        let (Some(public_key), CanonicalJsonValue::String(signature)) =
            (key.key_bytes(), signature)
        else {
            return Err(invalid("a signature or key is not base64"));
        };
        let signature = STANDARD_NO_PAD
            .decode(signature.trim_end_matches('='))
            .map_err(|_| invalid("a signature is not base64"))?;
        verify_canonical_json_bytes(
            &SigningKeyAlgorithm::Ed25519,
            &public_key,
            &signature,
            canonical.as_bytes(),
        )
        .map_err(|_| Error::InvalidSignature {
            server_name: server_name.to_owned(),
            key_id: key_id.clone(),
        })?;
        verified = true;
    }
    if !verified {
        return Err(invalid("not signed by any of its verify_keys"));
    }
    let mut verify_keys = previous.map(|previous| previous.verify_keys).unwrap_or_default();
    verify_keys.extend(old);
    verify_keys.extend(current);
    Ok(StoredServerKeys { response, valid_until_ts, verify_keys, fetched_at_ms: now_ms })
}

fn key_field<'a>(value: &'a CanonicalJsonValue, field: &str) -> Option<&'a str> {
    match value {
        CanonicalJsonValue::Object(object) => match object.get(field) {
            Some(CanonicalJsonValue::String(text))
                if STANDARD_NO_PAD
                    .decode(text.trim_end_matches('='))
                    .is_ok_and(|bytes| bytes.len() == 32) =>
            {
                Some(text)
            }
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use ruma::server_name;

    use super::*;

    fn signing_key(dir: &tempfile::TempDir, name: &str) -> ServerSigningKey {
        ServerSigningKey::load_or_generate(&dir.path().join(name), ServerName::parse(name).unwrap())
            .unwrap()
    }

    #[test]
    fn our_keys_pass_our_own_check() {
        let dir = tempfile::tempdir().unwrap();
        let key = signing_key(&dir, "a.test");
        let old = OldVerifyKey {
            key_id: "ed25519:old".into(),
            key: signing_key(&dir, "b.test").public_key_base64(),
            expired_ts: 5,
        };
        let response = own_server_keys(&key, &[old], 1000).unwrap();
        let stored = check_server_keys(server_name!("a.test"), response, None, 7).unwrap();
        assert_eq!(stored.valid_until_ts, 1000);
        assert_eq!(stored.fetched_at_ms, 7);
        assert_eq!(stored.verify_keys[&key.key_id()].key, key.public_key_base64());
        assert_eq!(stored.verify_keys[&key.key_id()].valid_until_ts, 1000);
        assert_eq!(stored.verify_keys["ed25519:old"].valid_until_ts, 5);
    }

    #[test]
    fn forged_or_foreign_responses_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = signing_key(&dir, "a.test");
        let response = own_server_keys(&key, &[], 1000).unwrap();
        // Another server's name.
        assert!(check_server_keys(server_name!("b.test"), response.clone(), None, 0).is_err());
        // A field changed after signing.
        let mut tampered = response.clone();
        tampered.insert("valid_until_ts".into(), integer(99_999));
        let error = check_server_keys(server_name!("a.test"), tampered, None, 0);
        assert!(matches!(error, Err(Error::InvalidSignature { .. })), "{error:?}");
        // A key swapped for an attacker's, signed by the attacker's key under the same name.
        let attacker = ServerSigningKey::load_or_generate(
            &dir.path().join("evil"),
            server_name!("a.test").to_owned(),
        )
        .unwrap();
        let mut forged = own_server_keys(&attacker, &[], 1000).unwrap();
        forged.insert("verify_keys".into(), response["verify_keys"].clone());
        assert!(check_server_keys(server_name!("a.test"), forged, None, 0).is_err());
        // Unsigned.
        let mut unsigned = response.clone();
        unsigned.remove("signatures");
        assert!(check_server_keys(server_name!("a.test"), unsigned, None, 0).is_err());
        // A key that is not 32 bytes of base64.
        let mut bad_key = response;
        bad_key.insert(
            "verify_keys".into(),
            object([(
                key.key_id().as_str(),
                object([("key", CanonicalJsonValue::String("abc".into()))]),
            )]),
        );
        assert!(check_server_keys(server_name!("a.test"), bad_key, None, 0).is_err());
    }

    #[test]
    fn old_keys_are_kept_across_fetches() {
        let dir = tempfile::tempdir().unwrap();
        let first = signing_key(&dir, "a.test");
        let stored = check_server_keys(
            server_name!("a.test"),
            own_server_keys(&first, &[], 10).unwrap(),
            None,
            0,
        )
        .unwrap();
        std::fs::remove_file(dir.path().join("a.test")).unwrap();
        let second = signing_key(&dir, "a.test");
        let merged = check_server_keys(
            server_name!("a.test"),
            own_server_keys(&second, &[], 20).unwrap(),
            Some(stored),
            1,
        )
        .unwrap();
        assert!(
            merged.verify_keys.contains_key(&first.key_id()) || first.key_id() == second.key_id()
        );
        assert_eq!(merged.verify_keys[&second.key_id()].valid_until_ts, 20);
    }

    #[test]
    fn the_memory_store_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let key = signing_key(&dir, "a.test");
        let stored = check_server_keys(
            server_name!("a.test"),
            own_server_keys(&key, &[], 10).unwrap(),
            None,
            0,
        )
        .unwrap();
        let store = MemoryKeyStore::default();
        assert_eq!(store.load_server_keys(server_name!("a.test")).unwrap(), None);
        store.store_server_keys(server_name!("a.test"), &stored).unwrap();
        assert_eq!(store.load_server_keys(server_name!("a.test")).unwrap(), Some(stored));
    }
}
