//! PDUs: the signed events of a room as they are stored and federated, and their client
//! format.
//!
//! [PDUs](https://spec.matrix.org/v1.16/server-server-api/#pdus)

use std::sync::OnceLock;

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId,
    OwnedUserId, RoomId, RoomVersionId, UserId,
    events::{StateEventType, TimelineEventType},
};
use serde::Deserialize;
use serde_json::{Value, value::RawValue as RawJsonValue};

/// A parsed PDU, with the signed JSON it came from.
#[derive(Clone, Debug)]
pub struct Pdu {
    /// The event id (reference hash, or the `event_id` field in room versions 1 and 2).
    pub event_id: OwnedEventId,
    /// The room.
    pub room_id: OwnedRoomId,
    /// Who sent it.
    pub sender: OwnedUserId,
    /// When the sending server says it was sent.
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    /// The event type.
    pub kind: TimelineEventType,
    /// The content.
    pub content: Box<RawJsonValue>,
    /// Present on state events.
    pub state_key: Option<String>,
    /// The events this one follows.
    pub prev_events: Vec<OwnedEventId>,
    /// The events that authorize it.
    pub auth_events: Vec<OwnedEventId>,
    /// Depth in the DAG.
    pub depth: u64,
    /// What a redaction redacts (top-level before room version 11, in `content` since).
    pub redacts: Option<OwnedEventId>,
    /// Whether the signed JSON has a `room_id` (a version 12 create event has none).
    has_room_id: bool,
    /// The signed PDU exactly as stored and sent to peers: see [`Pdu::json`].
    signed: Signed,
}

/// The signed JSON of a PDU: its canonical text (as stored and sent), and the object parsed
/// from it, only the first time something needs it (federation, hashes, redaction) unless the
/// PDU was built from the object. Most reads (`/sync`, auth checks, state resolution) need only
/// the parsed fields, and building and freeing the object of every event they read was most
/// of their cost.
#[derive(Clone, Debug)]
struct Signed {
    text: Box<str>,
    object: OnceLock<CanonicalJsonObject>,
}

/// Why a PDU could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid PDU: {0}")]
pub struct PduError(pub String);

#[derive(Deserialize)]
struct Fields {
    #[serde(default)]
    room_id: Option<OwnedRoomId>,
    sender: OwnedUserId,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    kind: TimelineEventType,
    content: Box<RawJsonValue>,
    #[serde(default)]
    state_key: Option<String>,
    #[serde(default)]
    prev_events: Vec<EventRef>,
    #[serde(default)]
    auth_events: Vec<EventRef>,
    #[serde(default)]
    depth: u64,
    #[serde(default)]
    redacts: Option<OwnedEventId>,
}

/// An event reference: a plain id since room version 3, an `[id, {hashes}]` pair before. Read
/// straight into the id, without building a JSON value of it first.
struct EventRef(OwnedEventId);

impl<'de> Deserialize<'de> for EventRef {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = EventRef;
            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("an event id, or an [event id, hashes] pair")
            }
            fn visit_str<E: serde::de::Error>(self, id: &str) -> Result<EventRef, E> {
                OwnedEventId::try_from(id)
                    .map(EventRef)
                    .map_err(|_| E::custom(format!("bad event reference {id:?}")))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<EventRef, A::Error> {
                let id: EventRef = seq
                    .next_element()?
                    .ok_or_else(|| serde::de::Error::custom("empty event reference"))?;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(id)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

fn event_refs(refs: Vec<EventRef>) -> Vec<OwnedEventId> {
    refs.into_iter().map(|EventRef(id)| id).collect()
}

impl Pdu {
    /// Parses a signed PDU: its canonical text is written once, the fields are parsed from
    /// it, and both are kept (the text is what is stored).
    pub fn from_json(event_id: OwnedEventId, json: CanonicalJsonObject) -> Result<Self, PduError> {
        let text = serde_json::to_string(&json).map_err(|error| PduError(error.to_string()))?;
        let fields: Fields =
            serde_json::from_str(&text).map_err(|error| PduError(error.to_string()))?;
        Self::from_fields(event_id, fields, Signed { text: text.into(), object: json.into() })
    }

    /// Parses a signed PDU from its JSON text (as stored). Only the fields are parsed; the
    /// text is kept for [`Pdu::json`].
    pub fn from_slice(event_id: OwnedEventId, bytes: &[u8]) -> Result<Self, PduError> {
        let text = std::str::from_utf8(bytes).map_err(|error| PduError(error.to_string()))?;
        let fields: Fields =
            serde_json::from_str(text).map_err(|error| PduError(error.to_string()))?;
        Self::from_fields(event_id, fields, Signed { text: text.into(), object: OnceLock::new() })
    }

    /// The signed PDU exactly as stored and sent to peers, parsed from the stored text the
    /// first time it is asked for.
    pub fn json(&self) -> Result<&CanonicalJsonObject, PduError> {
        let Signed { text, object } = &self.signed;
        if let Some(object) = object.get() {
            return Ok(object);
        }
        let parsed = Self::parse_signed(text)?;
        Ok(object.get_or_init(|| parsed))
    }

    /// The signed PDU as an owned object (see [`Pdu::json`]).
    pub fn into_json(self) -> Result<CanonicalJsonObject, PduError> {
        let Signed { text, object } = self.signed;
        match object.into_inner() {
            Some(object) => Ok(object),
            None => Self::parse_signed(&text),
        }
    }

    /// The signed PDU as canonical JSON text, for storing.
    pub fn signed_text(&self) -> &str {
        &self.signed.text
    }

    fn parse_signed(text: &str) -> Result<CanonicalJsonObject, PduError> {
        serde_json::from_str(text).map_err(|error| PduError(format!("signed JSON: {error}")))
    }

    fn from_fields(
        event_id: OwnedEventId,
        fields: Fields,
        signed: Signed,
    ) -> Result<Self, PduError> {
        // Only a redaction redacts: the content of any other event is not parsed again.
        let redacts = if fields.kind == TimelineEventType::RoomRedaction {
            #[derive(Deserialize)]
            struct Redacts {
                redacts: Option<OwnedEventId>,
            }
            fields.redacts.or_else(|| {
                serde_json::from_str::<Redacts>(fields.content.get())
                    .ok()
                    .and_then(|content| content.redacts)
            })
        } else {
            None
        };
        // Since room version 12 the create event has no room id: the room id is derived from it.
        let has_room_id = fields.room_id.is_some();
        let room_id = match fields.room_id {
            Some(room_id) => room_id,
            None if fields.kind == TimelineEventType::RoomCreate => {
                OwnedRoomId::try_from(format!("!{}", &event_id.as_str()[1..]))
                    .map_err(|error| PduError(format!("room id from create event: {error}")))?
            }
            None => return Err(PduError("missing room_id".into())),
        };
        Ok(Self {
            event_id,
            room_id,
            sender: fields.sender,
            origin_server_ts: fields.origin_server_ts,
            kind: fields.kind,
            content: fields.content,
            state_key: fields.state_key,
            prev_events: event_refs(fields.prev_events),
            auth_events: event_refs(fields.auth_events),
            depth: fields.depth,
            redacts,
            has_room_id,
            signed,
        })
    }

    /// The content as a JSON value.
    pub fn content_value(&self) -> Value {
        serde_json::from_str(self.content.get()).unwrap_or(Value::Null)
    }

    /// Whether this is a state event.
    pub fn is_state(&self) -> bool {
        self.state_key.is_some()
    }

    /// The state map key of a state event.
    pub fn state_pair(&self) -> Option<(StateEventType, String)> {
        Some((self.kind.to_string().into(), self.state_key.clone()?))
    }

    /// `content.membership` of a member event.
    pub fn membership(&self) -> Option<String> {
        if self.kind != TimelineEventType::RoomMember {
            return None;
        }
        self.content_value().get("membership").and_then(Value::as_str).map(str::to_owned)
    }

    /// The client format of this event ([client-server API](https://spec.matrix.org/v1.16/client-server-api/#room-event-format)),
    /// redacted when `redacted_because` is given.
    pub fn to_client(
        &self,
        room_version: &RoomVersionId,
        redacted_because: Option<Value>,
        mut unsigned: serde_json::Map<String, Value>,
    ) -> Value {
        let mut content = self.content_value();
        if let Some(because) = redacted_because {
            content = redacted_content(&content, &self.kind, room_version);
            unsigned.insert("redacted_because".into(), because);
        }
        let mut event = serde_json::json!({
            "type": self.kind.to_string(),
            "content": content,
            "event_id": self.event_id,
            "sender": self.sender,
            "origin_server_ts": self.origin_server_ts,
            "room_id": self.room_id,
        });
        if let Some(state_key) = &self.state_key {
            event["state_key"] = Value::String(state_key.clone());
        }
        if let Some(redacts) = &self.redacts {
            event["redacts"] = Value::String(redacts.to_string());
        }
        let age =
            MilliSecondsSinceUnixEpoch::now().get().saturating_sub(self.origin_server_ts.get());
        unsigned.insert("age".into(), Value::from(u64::from(age)));
        event["unsigned"] = Value::Object(unsigned);
        event
    }

    /// The stripped state form used in invites ([stripped state](https://spec.matrix.org/v1.16/client-server-api/#stripped-state)).
    pub fn to_stripped(&self) -> Value {
        serde_json::json!({
            "type": self.kind.to_string(),
            "state_key": self.state_key,
            "content": self.content_value(),
            "sender": self.sender,
        })
    }

    /// Whether `user_id` is the sender.
    pub fn sent_by(&self, user_id: &UserId) -> bool {
        self.sender == user_id
    }

    /// The room.
    pub fn room(&self) -> &RoomId {
        &self.room_id
    }
}

/// Content with only the keys the room version's redaction algorithm keeps.
pub fn redacted_content(
    content: &Value,
    kind: &TimelineEventType,
    room_version: &RoomVersionId,
) -> Value {
    let Some(rules) = room_version.rules() else { return serde_json::json!({}) };
    let Ok(CanonicalJsonValue::Object(mut object)) =
        ruma::canonical_json::to_canonical_value(content)
    else {
        return serde_json::json!({});
    };
    ruma::canonical_json::redact_content_in_place(&mut object, &rules.redaction, kind.to_string());
    serde_json::to_value(object).unwrap_or_else(|_| serde_json::json!({}))
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        // A version 12 create event carries no room id; its room id is derived from it.
        self.has_room_id.then_some(&*self.room_id)
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }
    fn content(&self) -> &RawJsonValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }
    fn rejected(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_pdu_keeps_its_text_and_parses_the_object_on_demand() {
        let text = r#"{"auth_events":["$a"],"content":{"body":"hi","n":1},"depth":3,"hashes":{"sha256":"x"},"origin_server_ts":5,"prev_events":["$b"],"room_id":"!r:x","sender":"@u:x","signatures":{"x":{"ed25519:k":"s"}},"type":"m.room.message"}"#;
        let event_id = OwnedEventId::try_from("$e").unwrap();
        let stored = Pdu::from_slice(event_id.clone(), text.as_bytes()).unwrap();
        assert_eq!(stored.sender, "@u:x");
        assert_eq!(stored.auth_events, ["$a"]);
        // Stored again, the text is written back unchanged.
        assert_eq!(stored.signed_text(), text);
        // The object parsed on demand is the one a PDU built from the object holds.
        let object: CanonicalJsonObject = serde_json::from_str(text).unwrap();
        let built = Pdu::from_json(event_id, object.clone()).unwrap();
        assert_eq!(stored.json().unwrap(), &object);
        assert_eq!(stored.json().unwrap(), built.json().unwrap());
        assert_eq!(stored.clone().into_json().unwrap(), object);
        assert_eq!(built.signed_text(), text);
        // A stored text that is no canonical JSON fails when the object is asked for.
        let floats = text.replace(r#""n":1"#, r#""n":1.5"#);
        let odd =
            Pdu::from_slice(OwnedEventId::try_from("$f").unwrap(), floats.as_bytes()).unwrap();
        assert!(odd.json().is_err());
    }

    #[test]
    fn event_references_parse_in_both_formats_and_only_redactions_redact() {
        let parse =
            |text: &str| Pdu::from_slice(OwnedEventId::try_from("$e:x").unwrap(), text.as_bytes());
        // Room versions 1 and 2: `[id, {hashes}]` pairs.
        let old = parse(r#"{"auth_events":[["$a:x",{"sha256":"h"}]],"content":{},"depth":2,"origin_server_ts":5,"prev_events":[["$b:x",{}],["$c:x",{"sha256":"h"}]],"redacts":"$t:x","room_id":"!r:x","sender":"@u:x","type":"m.room.redaction"}"#).unwrap();
        assert_eq!(old.auth_events, ["$a:x"]);
        assert_eq!(old.prev_events, ["$b:x", "$c:x"]);
        assert_eq!(old.redacts.as_ref().map(|id| id.as_str()), Some("$t:x"));
        // Since room version 11 the redacted event is in the content.
        let new = parse(r#"{"auth_events":["$a"],"content":{"redacts":"$t"},"depth":2,"origin_server_ts":5,"prev_events":["$b"],"room_id":"!r:x","sender":"@u:x","type":"m.room.redaction"}"#).unwrap();
        assert_eq!(new.redacts.as_ref().map(|id| id.as_str()), Some("$t"));
        // Any other event redacts nothing, whatever it carries.
        let message = parse(r#"{"auth_events":["$a"],"content":{"redacts":"$t"},"depth":2,"origin_server_ts":5,"prev_events":["$b"],"redacts":"$t","room_id":"!r:x","sender":"@u:x","type":"m.room.message"}"#).unwrap();
        assert_eq!(message.redacts, None);
        // A reference that is no event id, or an empty pair, is an error.
        for refs in [r#"["nope"]"#, "[[]]", "[1]"] {
            let text = format!(
                r#"{{"auth_events":{refs},"content":{{}},"depth":2,"origin_server_ts":5,"prev_events":[],"room_id":"!r:x","sender":"@u:x","type":"m.room.message"}}"#
            );
            assert!(parse(&text).is_err(), "{refs}");
        }
    }
}
