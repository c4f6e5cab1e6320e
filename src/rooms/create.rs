//! Room creation: the initial events of `createRoom`, in the order the spec gives.
//!
//! [Creation](https://spec.matrix.org/v1.16/client-server-api/#creation)

use ruma::{OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomVersionId, UserId};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{NewEvent, RoomError, RoomRecord, Rooms, ingest::Remote};
use crate::accounts::random_string;

/// What `createRoom` asks for.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CreateRoom {
    /// `public` rooms are listed in the directory.
    #[serde(default)]
    pub visibility: Option<String>,
    /// Local part of an alias to create.
    #[serde(default)]
    pub room_alias_name: Option<String>,
    /// `m.room.name`.
    #[serde(default)]
    pub name: Option<String>,
    /// `m.room.topic`.
    #[serde(default)]
    pub topic: Option<String>,
    /// Users to invite.
    #[serde(default)]
    pub invite: Vec<OwnedUserId>,
    /// Third-party invites (not supported: must be empty).
    #[serde(default)]
    pub invite_3pid: Vec<Value>,
    /// The room version.
    #[serde(default)]
    pub room_version: Option<String>,
    /// Extra content of `m.room.create`.
    #[serde(default)]
    pub creation_content: Option<Map<String, Value>>,
    /// Extra state events.
    #[serde(default)]
    pub initial_state: Vec<InitialState>,
    /// `private_chat`, `public_chat` or `trusted_private_chat`.
    #[serde(default)]
    pub preset: Option<String>,
    /// Flags the invites as direct chats.
    #[serde(default)]
    pub is_direct: bool,
    /// Overrides of the default power levels.
    #[serde(default)]
    pub power_level_content_override: Option<Map<String, Value>>,
}

/// One `initial_state` entry.
#[derive(Clone, Debug, Deserialize)]
pub struct InitialState {
    /// Event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// State key.
    #[serde(default)]
    pub state_key: String,
    /// Content.
    pub content: Value,
}

/// The result of [`Rooms::create_room`].
#[derive(Clone, Debug)]
pub struct CreatedRoom {
    /// The new room.
    pub room_id: OwnedRoomId,
    /// The alias, when one was asked for.
    pub alias: Option<OwnedRoomAliasId>,
}

impl Rooms {
    /// Creates a room as `creator` asked, and invites the invitees: local ones directly,
    /// other servers' users through their server (`invite` v2, see [`Rooms::invite_remote`]).
    pub async fn create_room(
        &self,
        creator: &UserId,
        profile: (Option<String>, Option<String>),
        request: CreateRoom,
        remote: &Remote,
    ) -> Result<CreatedRoom, RoomError> {
        let room_version = match &request.room_version {
            Some(version) => RoomVersionId::try_from(version.as_str())
                .map_err(|_| RoomError::UnsupportedRoomVersion(version.clone()))?,
            None => self.default_room_version().clone(),
        };
        if !can_create(&room_version) {
            return Err(RoomError::UnsupportedRoomVersion(room_version.to_string()));
        }
        if !request.invite_3pid.is_empty() {
            return Err(RoomError::BadEvent("Third-party invites are not supported".into()));
        }
        let alias = match &request.room_alias_name {
            Some(name) => {
                let alias = self.local_alias(name)?;
                if self.resolve_local_alias(&alias)?.is_some() {
                    return Err(RoomError::AliasInUse);
                }
                Some(alias)
            }
            None => None,
        };
        let rules = federation::signing::rules_for(&room_version)?;
        let derived_room_id = rules.authorization.room_create_event_id_as_room_id;
        // Version 12 rooms get their id from the create event; until it exists nobody can
        // address the room, so the lock on a placeholder id is enough.
        let mut room_id =
            OwnedRoomId::try_from(format!("!{}:{}", random_string(18), self.server_name()))
                .map_err(|error| RoomError::BadEvent(error.to_string()))?;
        let lock = self.room_lock(&room_id);
        let _guard = lock.lock().await;
        let mut room = RoomRecord {
            room_version: room_version.clone(),
            forward_extremities: Vec::new(),
            depth: 0,
            current_snapshot: None,
            last_position: 0,
        };

        let public = request.visibility.as_deref() == Some("public");
        let preset = request
            .preset
            .clone()
            .unwrap_or_else(|| if public { "public_chat".into() } else { "private_chat".into() });
        if !["public_chat", "private_chat", "trusted_private_chat"].contains(&preset.as_str()) {
            return Err(RoomError::BadEvent(format!("Unknown preset {preset}")));
        }

        let mut create_content = request.creation_content.clone().unwrap_or_default();
        create_content.insert("room_version".into(), json!(room_version));
        let privileged_creators = rules.authorization.explicitly_privilege_room_creators;
        if privileged_creators && preset == "trusted_private_chat" && !request.invite.is_empty() {
            create_content.insert("additional_creators".into(), json!(request.invite));
        }
        if rules.authorization.use_room_create_sender {
            create_content.remove("creator");
        } else {
            create_content.insert("creator".into(), json!(creator));
        }

        let mut events = vec![NewEvent::state("m.room.create", "", Value::Object(create_content))];
        let mut member = json!({"membership": "join"});
        if let Some(displayname) = profile.0 {
            member["displayname"] = json!(displayname);
        }
        if let Some(avatar_url) = profile.1 {
            member["avatar_url"] = json!(avatar_url);
        }
        events.push(NewEvent::state("m.room.member", creator.as_str(), member));

        let mut users = Map::new();
        if !privileged_creators {
            users.insert(creator.to_string(), json!(100));
        }
        if preset == "trusted_private_chat" && !privileged_creators {
            for invitee in &request.invite {
                users.insert(invitee.to_string(), json!(100));
            }
        }
        let mut power_levels = json!({
            "users": users,
            "users_default": 0,
            "events": {
                "m.room.name": 50,
                "m.room.power_levels": 100,
                "m.room.history_visibility": 100,
                "m.room.canonical_alias": 50,
                "m.room.avatar": 50,
                "m.room.tombstone": 100,
                "m.room.server_acl": 100,
                "m.room.encryption": 100,
            },
            "events_default": 0,
            "state_default": 50,
            "ban": 50,
            "kick": 50,
            "redact": 50,
            "invite": 0,
            "historical": 100,
            "notifications": {"room": 50},
        });
        if let Some(overrides) = &request.power_level_content_override {
            for (key, value) in overrides {
                power_levels[key] = value.clone();
            }
        }
        events.push(NewEvent::state("m.room.power_levels", "", power_levels));
        if let Some(alias) = &alias {
            events.push(NewEvent::state("m.room.canonical_alias", "", json!({"alias": alias})));
        }
        let join_rule = if preset == "public_chat" { "public" } else { "invite" };
        events.push(NewEvent::state("m.room.join_rules", "", json!({"join_rule": join_rule})));
        events.push(NewEvent::state(
            "m.room.history_visibility",
            "",
            json!({"history_visibility": "shared"}),
        ));
        if preset != "public_chat" {
            events.push(NewEvent::state(
                "m.room.guest_access",
                "",
                json!({"guest_access": "can_join"}),
            ));
        }
        for state in request.initial_state {
            if state.kind == "m.room.create" || state.kind == "m.room.member" {
                continue;
            }
            // Later initial_state entries replace the preset's for the same key.
            events.retain(|event| {
                event.kind == "m.room.create"
                    || event.kind == "m.room.member"
                    || !(event.kind == state.kind
                        && event.state_key.as_deref() == Some(state.state_key.as_str()))
            });
            events.push(NewEvent::state(state.kind, state.state_key, state.content));
        }
        if let Some(name) = &request.name {
            events.push(NewEvent::state("m.room.name", "", json!({"name": name})));
        }
        if let Some(topic) = &request.topic {
            events.push(NewEvent::state(
                "m.room.topic",
                "",
                json!({"topic": topic, "m.topic": {"m.text": [{"body": topic, "mimetype": "text/plain"}]}}),
            ));
        }
        for (index, event) in events.into_iter().enumerate() {
            if index == 0 && derived_room_id {
                let appended = self.append_locked(&mut room, None, creator, event, None)?;
                room_id = OwnedRoomId::try_from(format!("!{}", &appended.event_id.as_str()[1..]))
                    .map_err(|error| RoomError::BadEvent(error.to_string()))?;
                continue;
            }
            self.append_locked(&mut room, Some(&room_id), creator, event, None)?;
        }
        if let Some(alias) = &alias {
            self.put_alias(alias, &room_id, creator)?;
        }
        if public {
            self.set_public(&room_id, true)?;
        }
        drop(_guard);
        for invitee in &request.invite {
            let mut content = json!({"membership": "invite"});
            if request.is_direct {
                content["is_direct"] = json!(true);
            }
            if invitee.server_name() != self.server_name() {
                // An invite the invitee's server never countersigned would never reach them.
                // The room exists by now, so an unreachable server does not undo it: the
                // creator sees that the invitee was not invited and can try again.
                if let Err(error) =
                    self.invite_remote(&room_id, creator, invitee, content, remote).await
                {
                    tracing::warn!(%room_id, %invitee, %error, "createRoom: remote invite failed");
                }
                continue;
            }
            self.append(
                &room_id,
                creator,
                NewEvent::state("m.room.member", invitee.as_str(), content),
                None,
            )
            .await?;
        }
        Ok(CreatedRoom { room_id, alias })
    }
}

/// Room versions whose rooms this server can create: every stable version ruma knows.
pub fn can_create(room_version: &RoomVersionId) -> bool {
    room_version.rules().is_some_and(|rules| {
        rules.disposition == ruma::room_version_rules::RoomVersionDisposition::Stable
    })
}

/// The room versions this server can create, for `capabilities`.
pub fn creatable_versions() -> Vec<RoomVersionId> {
    use RoomVersionId::*;
    [V1, V2, V3, V4, V5, V6, V7, V8, V9, V10, V11, V12].into_iter().filter(can_create).collect()
}
