//! Event filters for `/sync` and `/messages`: type and sender lists with `*` wildcards,
//! timeline limits and lazy-loaded members.
//!
//! [Filtering](https://spec.matrix.org/v1.16/client-server-api/#filtering)

use ruma::OwnedRoomId;
use serde::{Deserialize, Serialize};

use crate::rooms::Pdu;

/// A filter on events.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EventFilter {
    /// Most events to return.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Types to include (wildcards allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<String>>,
    /// Types to exclude.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_types: Option<Vec<String>>,
    /// Senders to include.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub senders: Option<Vec<String>>,
    /// Senders to exclude.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_senders: Option<Vec<String>>,
    /// Rooms to include.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<OwnedRoomId>>,
    /// Rooms to exclude.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_rooms: Option<Vec<OwnedRoomId>>,
    /// Only members who sent events in the timeline.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lazy_load_members: bool,
    /// Send member events again even if the client has them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub include_redundant_members: bool,
    /// Only events with (true) or without (false) a `url` in their content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains_url: Option<bool>,
}

/// The room part of a filter.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoomFilter {
    /// Rooms to include.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<OwnedRoomId>>,
    /// Rooms to exclude.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_rooms: Option<Vec<OwnedRoomId>>,
    /// Include rooms the user left.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub include_leave: bool,
    /// Timeline events.
    #[serde(default)]
    pub timeline: EventFilter,
    /// State events.
    #[serde(default)]
    pub state: EventFilter,
    /// Ephemeral events.
    #[serde(default)]
    pub ephemeral: EventFilter,
    /// Room account data.
    #[serde(default)]
    pub account_data: EventFilter,
}

/// A whole filter.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Filter {
    /// Room events.
    #[serde(default)]
    pub room: RoomFilter,
    /// Presence events.
    #[serde(default)]
    pub presence: EventFilter,
    /// Global account data.
    #[serde(default)]
    pub account_data: EventFilter,
    /// Which event fields to include (not applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_fields: Option<Vec<String>>,
    /// `client` or `federation` (only `client` is served).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_format: Option<String>,
}

fn matches_pattern(pattern: &str, value: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == value,
        Some((head, tail)) => {
            value.len() >= head.len()
                && value.starts_with(head)
                && matches_pattern_rest(tail, &value[head.len()..])
        }
    }
}

fn matches_pattern_rest(pattern: &str, value: &str) -> bool {
    if pattern.is_empty() {
        return true;
    }
    (0..=value.len())
        .filter(|index| value.is_char_boundary(*index))
        .any(|index| matches_pattern(pattern, &value[index..]))
}

impl EventFilter {
    /// Whether an event of this type and sender passes.
    pub fn allows(&self, kind: &str, sender: &str) -> bool {
        if !self.may_allow_type(kind) {
            return false;
        }
        if let Some(not_senders) = &self.not_senders
            && not_senders.iter().any(|value| value == sender)
        {
            return false;
        }
        if let Some(senders) = &self.senders
            && !senders.iter().any(|value| value == sender)
        {
            return false;
        }
        true
    }

    /// Whether some event of this type may pass, whoever sent it (the type filters only).
    pub fn may_allow_type(&self, kind: &str) -> bool {
        let excluded =
            self.not_types.as_ref().is_some_and(|not| not.iter().any(|p| matches_pattern(p, kind)));
        let included =
            self.types.as_ref().is_none_or(|types| types.iter().any(|p| matches_pattern(p, kind)));
        !excluded && included
    }

    /// Whether a PDU passes.
    pub fn allows_pdu(&self, pdu: &Pdu) -> bool {
        if !self.allows(&pdu.kind.to_string(), pdu.sender.as_str()) {
            return false;
        }
        if let Some(contains_url) = self.contains_url {
            let has_url = pdu.content_value().get("url").is_some();
            if has_url != contains_url {
                return false;
            }
        }
        true
    }

    /// Whether a room passes.
    pub fn allows_room(&self, room_id: &ruma::RoomId) -> bool {
        if self.not_rooms.as_ref().is_some_and(|rooms| rooms.iter().any(|room| room == room_id)) {
            return false;
        }
        self.rooms.as_ref().is_none_or(|rooms| rooms.iter().any(|room| room == room_id))
    }
}

impl RoomFilter {
    /// Whether a room passes.
    pub fn allows_room(&self, room_id: &ruma::RoomId) -> bool {
        if self.not_rooms.as_ref().is_some_and(|rooms| rooms.iter().any(|room| room == room_id)) {
            return false;
        }
        self.rooms.as_ref().is_none_or(|rooms| rooms.iter().any(|room| room == room_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(types: &[&str], not_types: &[&str], kind: &str, expected: bool) {
        let filter = EventFilter {
            types: (!types.is_empty()).then(|| types.iter().map(|t| t.to_string()).collect()),
            not_types: (!not_types.is_empty())
                .then(|| not_types.iter().map(|t| t.to_string()).collect()),
            ..EventFilter::default()
        };
        assert_eq!(filter.allows(kind, "@a:x"), expected, "{types:?} {not_types:?} {kind}");
    }

    #[test]
    fn types_and_wildcards() {
        check(&["m.room.message"], &[], "m.room.message", true);
        check(&["m.room.message"], &[], "m.room.member", false);
        check(&["m.room.*"], &[], "m.room.member", true);
        check(&["m.*.member"], &[], "m.room.member", true);
        check(&["*"], &["m.room.member"], "m.room.member", false);
        check(&[], &["m.*"], "m.room.name", false);
        check(&[], &[], "anything", true);
    }
}
