//! The server signing key: generated once, kept in a file, used to hash and sign every event
//! this server creates, as the room version's rules say.
//!
//! [Signing events](https://spec.matrix.org/v1.16/server-server-api/#signing-events)

use std::{fs, io, path::Path};

use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
use rand::{Rng, distributions::Alphanumeric};
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedServerName, RoomVersionId,
    room_version_rules::{EventIdFormatVersion, RoomVersionRules},
    signatures::{Ed25519KeyPair, KeyPair},
};

use crate::Error;

/// The server's signing key.
pub struct ServerSigningKey {
    key_pair: Ed25519KeyPair,
    server_name: OwnedServerName,
}

impl std::fmt::Debug for ServerSigningKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ServerSigningKey")
            .field("server_name", &self.server_name)
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl ServerSigningKey {
    /// Loads the key from `path`, or generates one and writes it there (mode 0600) when the file
    /// does not exist. The file holds `ed25519 <version> <base64 pkcs8 document>`.
    pub fn load_or_generate(path: &Path, server_name: OwnedServerName) -> Result<Self, Error> {
        let shown = path.display().to_string();
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                let document = Ed25519KeyPair::generate();
                let version: String =
                    rand::thread_rng().sample_iter(&Alphanumeric).take(6).map(char::from).collect();
                let text = format!("ed25519 {version} {}\n", STANDARD_NO_PAD.encode(&*document));
                write_private(path, &text)
                    .map_err(|source| Error::KeyFile { path: shown.clone(), source })?;
                text
            }
            Err(source) => return Err(Error::KeyFile { path: shown, source }),
        };
        let bad = |reason: &str| Error::BadKey { path: shown.clone(), reason: reason.to_owned() };
        let mut parts = text.split_whitespace();
        if parts.next() != Some("ed25519") {
            return Err(bad("expected the algorithm ed25519"));
        }
        let version = parts.next().ok_or_else(|| bad("missing key version"))?;
        let document = parts.next().ok_or_else(|| bad("missing key"))?;
        let document = STANDARD_NO_PAD.decode(document).map_err(|_| bad("key is not base64"))?;
        let key_pair = Ed25519KeyPair::from_der(&document, version.to_owned())
            .map_err(|error| bad(&error.to_string()))?;
        Ok(Self { key_pair, server_name })
    }

    /// The key id, `ed25519:<version>`.
    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.key_pair.version())
    }

    /// The public key, unpadded base64.
    pub fn public_key_base64(&self) -> String {
        STANDARD_NO_PAD.encode(self.key_pair.public_key())
    }

    /// The public key, raw bytes.
    pub fn public_key_bytes(&self) -> Vec<u8> {
        self.key_pair.public_key().to_vec()
    }

    /// The server this key signs for.
    pub fn server_name(&self) -> &OwnedServerName {
        &self.server_name
    }

    /// Adds the content hash and this server's signature to a PDU and returns its event id.
    ///
    /// For room versions 1 and 2 the event id is chosen here and written into the PDU; later
    /// versions derive it from the reference hash and leave it out of the PDU.
    pub fn hash_and_sign_pdu(
        &self,
        pdu: &mut CanonicalJsonObject,
        room_version: &RoomVersionId,
    ) -> Result<OwnedEventId, Error> {
        let rules = rules_for(room_version)?;
        if rules.event_id_format == EventIdFormatVersion::V1 {
            let local: String =
                rand::thread_rng().sample_iter(&Alphanumeric).take(18).map(char::from).collect();
            let event_id = format!("${local}:{}", self.server_name);
            pdu.insert("event_id".to_owned(), CanonicalJsonValue::String(event_id));
        }
        ruma::signatures::hash_and_sign_event(
            self.server_name.as_str(),
            &self.key_pair,
            pdu,
            &rules.redaction,
        )?;
        event_id_of(pdu, room_version)
    }

    /// Adds this server's signature to a PDU that others created and signed, as a resident or
    /// invited server countersigns (an invite, a restricted join).
    pub fn sign_pdu(
        &self,
        pdu: &mut CanonicalJsonObject,
        room_version: &RoomVersionId,
    ) -> Result<(), Error> {
        let rules = rules_for(room_version)?;
        ruma::signatures::sign_event(
            self.server_name.as_str(),
            &self.key_pair,
            pdu,
            &rules.redaction,
        )?;
        Ok(())
    }

    /// Signs an arbitrary JSON object (used for key responses and requests).
    pub fn sign_json(&self, object: &mut CanonicalJsonObject) -> Result<(), Error> {
        ruma::signatures::sign_json(self.server_name.as_str(), &self.key_pair, object)?;
        Ok(())
    }

    /// A raw signature over bytes, unpadded base64.
    pub fn sign_bytes(&self, message: &[u8]) -> String {
        STANDARD_NO_PAD.encode(self.key_pair.sign(message).as_bytes())
    }
}

/// The rules of a room version, or an error for versions this server does not know.
pub fn rules_for(room_version: &RoomVersionId) -> Result<RoomVersionRules, Error> {
    room_version.rules().ok_or_else(|| Error::UnsupportedRoomVersion(room_version.clone()))
}

/// The event id of a signed PDU: its `event_id` field in room versions 1 and 2, the reference
/// hash otherwise.
pub fn event_id_of(
    pdu: &CanonicalJsonObject,
    room_version: &RoomVersionId,
) -> Result<OwnedEventId, Error> {
    let rules = rules_for(room_version)?;
    if rules.event_id_format == EventIdFormatVersion::V1 {
        let Some(CanonicalJsonValue::String(event_id)) = pdu.get("event_id") else {
            return Err(Error::BadKey {
                path: String::new(),
                reason: "v1 PDU without event_id".into(),
            });
        };
        return Ok(event_id.as_str().try_into()?);
    }
    let hash = ruma::signatures::reference_hash(pdu, &rules)?;
    Ok(format!("${hash}").try_into()?)
}

fn write_private(path: &Path, text: &str) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    #[cfg(unix)]
    {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let mut file =
            fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        file.write_all(text.as_bytes())
    }
    #[cfg(not(unix))]
    {
        fs::write(path, text)
    }
}

#[cfg(test)]
mod tests {
    use ruma::{canonical_json::to_canonical_value, server_name};
    use serde_json::json;

    use super::*;

    fn pdu() -> CanonicalJsonObject {
        let value = to_canonical_value(json!({
            "room_id": "!r:example.org",
            "sender": "@a:example.org",
            "origin_server_ts": 1,
            "type": "m.room.message",
            "content": {"body": "hi", "msgtype": "m.text"},
            "prev_events": [],
            "auth_events": [],
            "depth": 1,
        }))
        .unwrap();
        match value {
            CanonicalJsonValue::Object(object) => object,
            _ => unreachable!(),
        }
    }

    #[test]
    fn key_is_generated_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        let first =
            ServerSigningKey::load_or_generate(&path, server_name!("example.org").to_owned())
                .unwrap();
        let second =
            ServerSigningKey::load_or_generate(&path, server_name!("example.org").to_owned())
                .unwrap();
        assert_eq!(first.key_id(), second.key_id());
        assert_eq!(first.public_key_base64(), second.public_key_base64());
    }

    #[test]
    fn signed_pdus_verify_and_ids_follow_the_room_version() {
        let dir = tempfile::tempdir().unwrap();
        let key = ServerSigningKey::load_or_generate(
            &dir.path().join("k"),
            server_name!("example.org").to_owned(),
        )
        .unwrap();
        for version in [RoomVersionId::V1, RoomVersionId::V3, RoomVersionId::V11] {
            let mut object = pdu();
            let event_id = key.hash_and_sign_pdu(&mut object, &version).unwrap();
            let rules = rules_for(&version).unwrap();
            let public_key = STANDARD_NO_PAD.decode(key.public_key_base64()).unwrap();
            let mut keys = std::collections::BTreeMap::new();
            let mut server_keys = std::collections::BTreeMap::new();
            server_keys.insert(key.key_id(), ruma::serde::Base64::new(public_key));
            keys.insert("example.org".to_owned(), server_keys);
            ruma::signatures::verify_event(&keys, &object, &rules).unwrap();
            match version {
                RoomVersionId::V1 => assert!(event_id.as_str().ends_with(":example.org")),
                _ => assert!(event_id.server_name().is_none()),
            }
        }
    }

    #[test]
    fn a_corrupt_key_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fs::write(&path, "ed25519 abc notbase64!!").unwrap();
        assert!(
            ServerSigningKey::load_or_generate(&path, server_name!("x.org").to_owned()).is_err()
        );
    }
}
