//! Checks of a received PDU's event id, content hash and signatures, computed from one
//! redaction of the event.
//!
//! The event id (the reference hash) and the signatures cover the same bytes: the redacted
//! event without `signatures` and `unsigned`, as canonical JSON. [`ReceivedPdu::prepare`]
//! redacts once and serialises those bytes once; the content hash is serialised straight from
//! the event, skipping its three excluded fields, without copying it. Computing the same with
//! ruma's `reference_hash` and `verify_event` redacts twice and copies the event four times,
//! which was a large part of receiving a PDU.
//!
//! [Validating hashes and signatures](https://spec.matrix.org/v1.16/server-server-api/#validating-hashes-and-signatures-on-received-events),
//! [reference hashes](https://spec.matrix.org/v1.16/server-server-api/#calculating-the-reference-hash-for-an-event),
//! [content hashes](https://spec.matrix.org/v1.16/server-server-api/#calculating-the-content-hash-for-an-event).

use std::collections::{BTreeMap, HashMap};
use std::sync::{LazyLock, Mutex};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD},
};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedServerName,
    canonical_json::redact,
    room_version_rules::{EventIdFormatVersion, RoomVersionRules},
    serde::{Base64, base64::Standard},
    signatures::{PublicKeyMap, Verified},
};
use serde::{Serialize, Serializer, ser::SerializeMap};
use sha2::{Digest, Sha256};

/// The most bytes the canonical JSON of a PDU may have (the spec's 65,536-byte limit, as
/// ruma applies it to the hashed forms).
const PDU_BYTES_MAX: usize = 65_535;

/// Why a received PDU's hashes or signatures could not be checked, or failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The event cannot be redacted or serialised, or is too large.
    #[error("PDU JSON: {0}")]
    Json(String),
    /// A field the checks need is missing or has the wrong type.
    #[error("PDU field {0} is missing or malformed")]
    Field(&'static str),
    /// A server whose signature the room version requires did not sign.
    #[error("no signature of {0}")]
    NoSignature(OwnedServerName),
    /// No key of a required server is known.
    #[error("no public keys of {0}")]
    NoKeys(OwnedServerName),
    /// None of a required server's signatures uses a key known here.
    #[error("no signature of {0} by a known key")]
    NoKnownKey(OwnedServerName),
    /// A signature by a known key does not verify.
    #[error("signature of {server} by {key_id} does not verify")]
    Invalid {
        /// The signing server.
        server: OwnedServerName,
        /// The key it named.
        key_id: String,
    },
}

/// A received PDU's reference hash and signed bytes, from one redaction.
#[derive(Debug)]
pub struct ReceivedPdu {
    event_id: OwnedEventId,
    /// The canonical JSON of the redacted event without `signatures` and `unsigned`: what
    /// every signature covers, and (versions 3 and later) what the event id hashes.
    signed: String,
}

impl ReceivedPdu {
    /// Redacts `pdu` by its room version's rules and serialises what its signatures cover;
    /// the event id is the hash of that (or the `event_id` field, in versions 1 and 2).
    pub fn prepare(
        pdu: &CanonicalJsonObject,
        rules: &RoomVersionRules,
    ) -> Result<Self, VerifyError> {
        let redacted = redact(pdu.clone(), &rules.redaction, None)
            .map_err(|error| VerifyError::Json(error.to_string()))?;
        let signed = canonical_without(&redacted, &["signatures", "unsigned"])?;
        let event_id = match rules.event_id_format {
            EventIdFormatVersion::V1 => match pdu.get("event_id") {
                Some(CanonicalJsonValue::String(event_id)) => event_id.as_str(),
                _ => return Err(VerifyError::Field("event_id")),
            }
            .try_into()
            .map_err(|_| VerifyError::Field("event_id"))?,
            format => {
                let hash = Sha256::digest(signed.as_bytes());
                let encoded = match format {
                    EventIdFormatVersion::V2 => STANDARD_NO_PAD.encode(hash),
                    _ => URL_SAFE_NO_PAD.encode(hash),
                };
                format!("${encoded}").try_into().map_err(|_| VerifyError::Field("event_id"))?
            }
        };
        Ok(Self { event_id, signed })
    }

    /// The event id.
    pub fn event_id(&self) -> &OwnedEventId {
        &self.event_id
    }

    /// Takes the event id.
    pub fn into_event_id(self) -> OwnedEventId {
        self.event_id
    }

    /// Checks the signatures of `servers` on `pdu` (the event this was prepared from) with
    /// `keys`, then its content hash: at least one signature of each server by a known key,
    /// and every such signature valid. [`Verified::Signatures`] means the signatures hold but
    /// the content hash does not (the event is to be redacted).
    pub fn verify(
        &self,
        pdu: &CanonicalJsonObject,
        servers: impl IntoIterator<Item = OwnedServerName>,
        keys: &PublicKeyMap,
    ) -> Result<Verified, VerifyError> {
        let Some(CanonicalJsonValue::Object(signatures)) = pdu.get("signatures") else {
            return Err(VerifyError::Field("signatures"));
        };
        for server in servers {
            let Some(CanonicalJsonValue::Object(by_key)) = signatures.get(server.as_str()) else {
                return Err(VerifyError::NoSignature(server));
            };
            let Some(known) = keys.get(server.as_str()) else {
                return Err(VerifyError::NoKeys(server));
            };
            let mut checked = false;
            for (key_id, signature) in by_key {
                let Some(public_key) = known.get(key_id) else { continue };
                if !key_id.starts_with("ed25519:") {
                    continue;
                }
                let CanonicalJsonValue::String(signature) = signature else {
                    return Err(VerifyError::Field("signatures"));
                };
                if !verify_ed25519(public_key.as_bytes(), signature, self.signed.as_bytes()) {
                    return Err(VerifyError::Invalid { server, key_id: key_id.clone() });
                }
                checked = true;
            }
            if !checked {
                return Err(VerifyError::NoKnownKey(server));
            }
        }
        Ok(if content_hash_matches(pdu)? { Verified::All } else { Verified::Signatures })
    }
}

/// Whether `signature` (standard base64, padded or not) is `public_key`'s ed25519 signature
/// of `message`.
fn verify_ed25519(public_key: &[u8], signature: &str, message: &[u8]) -> bool {
    let Ok(public_key) = <[u8; 32]>::try_from(public_key) else { return false };
    let Some(key) = verifying_key(&public_key) else { return false };
    let Some(bytes) = decode_base64(signature) else { return false };
    let Ok(bytes) = <[u8; 64]>::try_from(bytes.as_slice()) else { return false };
    key.verify(message, &Signature::from_bytes(&bytes)).is_ok()
}

/// How many decompressed public keys [`verifying_key`] keeps.
const VERIFYING_KEYS_MAX: usize = 256;

/// The public key as a curve point. Decompressing it (a square root in the field) was about a
/// tenth of each ed25519 verification in the S5 profile, and a busy room's PDUs come from a
/// handful of keys, so the points are kept; the map is emptied when full.
fn verifying_key(public_key: &[u8; 32]) -> Option<VerifyingKey> {
    static KEPT: LazyLock<Mutex<HashMap<[u8; 32], VerifyingKey>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));
    let mut kept = KEPT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(key) = kept.get(public_key) {
        return Some(*key);
    }
    let key = VerifyingKey::from_bytes(public_key).ok()?;
    if kept.len() >= VERIFYING_KEYS_MAX {
        kept.clear();
    }
    kept.insert(*public_key, key);
    Some(key)
}

/// Standard base64, with or without padding, as ruma reads signatures and hashes.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    Base64::<Standard>::parse(text).ok().map(Base64::into_inner)
}

/// Whether the event's `hashes.sha256` is the hash of its canonical JSON without `hashes`,
/// `signatures` and `unsigned`.
fn content_hash_matches(pdu: &CanonicalJsonObject) -> Result<bool, VerifyError> {
    let Some(CanonicalJsonValue::Object(hashes)) = pdu.get("hashes") else {
        return Err(VerifyError::Field("hashes"));
    };
    let Some(CanonicalJsonValue::String(claimed)) = hashes.get("sha256") else {
        return Err(VerifyError::Field("hashes.sha256"));
    };
    let computed = Sha256::digest(canonical_without(pdu, &["hashes", "signatures", "unsigned"])?);
    Ok(decode_base64(claimed).is_some_and(|claimed| claimed == computed.as_slice()))
}

/// The canonical JSON of `object` without the top-level fields `skip`, at most
/// [`PDU_BYTES_MAX`] bytes.
fn canonical_without(object: &CanonicalJsonObject, skip: &[&str]) -> Result<String, VerifyError> {
    let text = serde_json::to_string(&Without { object, skip })
        .map_err(|error| VerifyError::Json(error.to_string()))?;
    if text.len() > PDU_BYTES_MAX {
        return Err(VerifyError::Json("the PDU is larger than 65,535 bytes".into()));
    }
    Ok(text)
}

/// An object serialised without some of its top-level fields (keys stay sorted: the map is
/// a `BTreeMap`).
struct Without<'a> {
    object: &'a BTreeMap<String, CanonicalJsonValue>,
    skip: &'a [&'a str],
}

impl Serialize for Without<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (key, value) in self.object {
            if !self.skip.contains(&key.as_str()) {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use ruma::{
        RoomVersionId, canonical_json::to_canonical_value, server_name,
        signatures::required_server_signatures_to_verify_event,
    };
    use serde_json::json;

    use super::*;
    use crate::{ServerSigningKey, signing::event_id_of};

    fn signed(version: &RoomVersionId) -> (CanonicalJsonObject, PublicKeyMap) {
        let dir = tempfile::tempdir().unwrap();
        let key = ServerSigningKey::load_or_generate(
            &dir.path().join("k"),
            server_name!("example.org").to_owned(),
        )
        .unwrap();
        let CanonicalJsonValue::Object(mut pdu) = to_canonical_value(json!({
            "room_id": "!r:example.org",
            "sender": "@a:example.org",
            "origin": "example.org",
            "origin_server_ts": 1,
            "type": "m.room.message",
            "content": {"body": "hi ü \u{1F600} \"q\"", "msgtype": "m.text"},
            "prev_events": ["$p"],
            "auth_events": ["$a"],
            "depth": 2,
        }))
        .unwrap() else {
            unreachable!()
        };
        key.hash_and_sign_pdu(&mut pdu, version).unwrap();
        pdu.insert("unsigned".into(), to_canonical_value(json!({"age": 5})).unwrap());
        let mut keys = PublicKeyMap::new();
        keys.insert(
            "example.org".into(),
            [(key.key_id(), Base64::new(key.public_key_bytes()))].into_iter().collect(),
        );
        (pdu, keys)
    }

    fn check(pdu: &CanonicalJsonObject, keys: &PublicKeyMap, version: &RoomVersionId) {
        let rules = version.rules().unwrap();
        let ours = ReceivedPdu::prepare(pdu, &rules).map(|received| {
            let servers =
                required_server_signatures_to_verify_event(pdu, &rules.signatures).unwrap();
            let verified = received.verify(pdu, servers, keys).map_err(|e| e.to_string());
            (received.event_id, verified)
        });
        let ruma = ruma::signatures::verify_event(keys, pdu, &rules).map_err(|e| e.to_string());
        let (event_id, verified) = ours.unwrap();
        assert_eq!(event_id, event_id_of(pdu, version).unwrap());
        assert_eq!(verified.is_ok(), ruma.is_ok(), "ours {verified:?}, ruma {ruma:?}");
        if let (Ok(ours), Ok(ruma)) = (verified, ruma) {
            assert_eq!(ours, ruma);
        }
    }

    #[test]
    fn agrees_with_ruma_on_ids_signatures_and_hashes() {
        for version in [RoomVersionId::V3, RoomVersionId::V10, RoomVersionId::V11] {
            let (pdu, keys) = signed(&version);
            check(&pdu, &keys, &version);

            // Content changed after signing: the signatures hold, the hash does not.
            let mut edited = pdu.clone();
            edited.insert("content".into(), to_canonical_value(json!({"body": "x"})).unwrap());
            check(&edited, &keys, &version);
            let rules = version.rules().unwrap();
            let servers = || required_server_signatures_to_verify_event(&edited, &rules.signatures);
            let verified = ReceivedPdu::prepare(&edited, &rules)
                .unwrap()
                .verify(&edited, servers().unwrap(), &keys)
                .unwrap();
            assert_eq!(verified, Verified::Signatures);

            // A redacted-covered field changed: the signature fails.
            let mut forged = pdu.clone();
            forged.insert("depth".into(), CanonicalJsonValue::Integer(9u32.into()));
            check(&forged, &keys, &version);
            assert!(matches!(
                ReceivedPdu::prepare(&forged, &rules).unwrap().verify(
                    &forged,
                    servers().unwrap(),
                    &keys
                ),
                Err(VerifyError::Invalid { .. })
            ));

            // No known key of the sender's server.
            let unknown: PublicKeyMap =
                [("example.org".to_owned(), BTreeMap::new())].into_iter().collect();
            check(&pdu, &unknown, &version);
            check(&pdu, &PublicKeyMap::new(), &version);

            // Signatures stripped.
            let mut unsigned = pdu.clone();
            unsigned.remove("signatures");
            assert!(
                ReceivedPdu::prepare(&unsigned, &rules)
                    .unwrap()
                    .verify(&unsigned, servers().unwrap(), &keys)
                    .is_err()
            );
        }
    }
}
