//! Room aliases and the public room directory of local rooms, as the client API and the
//! federation queries (`query/directory`, `publicRooms`) both serve them.
//!
//! [Room aliases](https://spec.matrix.org/v1.16/client-server-api/#room-aliases),
//! [listing rooms](https://spec.matrix.org/v1.16/client-server-api/#listing-rooms)

use ruma::{
    OwnedRoomAliasId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomAliasId, RoomId, UserId,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use storage::keys;

use super::{RoomError, Rooms};

const ALIASES: &str = "room_alias_to_room_id";
const ROOM_ALIASES: &str = "room_id_alias_to_unit";
const PUBLIC: &str = "public_room_id_to_unit";

/// The most rooms one page of the public room directory holds when the request sets no
/// smaller limit.
pub const PUBLIC_ROOMS_PAGE_MAX: usize = 500;

/// What a public room directory request asks for.
#[derive(Clone, Debug, Default)]
pub struct PublicRoomsRequest {
    /// The most rooms in the page (at most [`PUBLIC_ROOMS_PAGE_MAX`]).
    pub limit: Option<usize>,
    /// The `next_batch` or `prev_batch` of an earlier page.
    pub since: Option<String>,
    /// `filter.generic_search_term`: matched, case-insensitively, against name, topic and
    /// canonical alias.
    pub search: Option<String>,
    /// `filter.room_types`: the room types to list (`None` stands for rooms without a type);
    /// empty lists every room.
    pub room_types: Vec<Option<String>>,
}

/// One page of the public room directory.
#[derive(Clone, Debug, Serialize)]
pub struct PublicRoomsPage {
    /// The rooms, largest first.
    pub chunk: Vec<Value>,
    /// The token of the next page, if there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_batch: Option<String>,
    /// The token of the previous page, if there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev_batch: Option<String>,
    /// How many rooms match in all.
    pub total_room_count_estimate: usize,
}

/// Where an alias points: the room, and servers likely to be in it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResolvedAlias {
    /// The room.
    pub room_id: OwnedRoomId,
    /// Servers that can help join it, this one first.
    pub servers: Vec<OwnedServerName>,
}

#[derive(Serialize, Deserialize)]
struct AliasRecord {
    room_id: OwnedRoomId,
    creator: OwnedUserId,
}

impl Rooms {
    /// A local alias from its localpart.
    pub fn local_alias(&self, name: &str) -> Result<OwnedRoomAliasId, RoomError> {
        if name.is_empty() || name.contains(':') || name.contains(char::is_whitespace) {
            return Err(RoomError::InvalidAlias(format!(
                "Invalid characters in room alias: {name}"
            )));
        }
        OwnedRoomAliasId::try_from(format!("#{name}:{}", self.server_name()))
            .map_err(|error| RoomError::InvalidAlias(error.to_string()))
    }

    /// The room a local alias points to.
    pub fn resolve_local_alias(
        &self,
        alias: &RoomAliasId,
    ) -> Result<Option<OwnedRoomId>, RoomError> {
        Ok(self.db().get::<AliasRecord>(ALIASES, alias.as_bytes())?.map(|record| record.room_id))
    }

    /// A local alias with the servers in its room: this one first, then every server with a
    /// joined member (`GET /directory/room/{alias}` and `query/directory`).
    pub fn resolve_local_alias_with_servers(
        &self,
        alias: &RoomAliasId,
    ) -> Result<Option<ResolvedAlias>, RoomError> {
        let Some(room_id) = self.resolve_local_alias(alias)? else {
            return Ok(None);
        };
        let mut servers = vec![self.server_name().clone()];
        for member in self.joined_members(&room_id)? {
            if !servers.iter().any(|server| server.as_str() == member.server_name().as_str()) {
                servers.push(member.server_name().to_owned());
            }
        }
        Ok(Some(ResolvedAlias { room_id, servers }))
    }

    /// Creates a local alias.
    pub fn put_alias(
        &self,
        alias: &RoomAliasId,
        room_id: &RoomId,
        creator: &UserId,
    ) -> Result<(), RoomError> {
        if alias.server_name() != self.server_name() {
            return Err(RoomError::InvalidAlias("Alias must be on this server".into()));
        }
        if self.resolve_local_alias(alias)?.is_some() {
            return Err(RoomError::AliasInUse);
        }
        let mut batch = self.db().batch();
        batch.put(
            ALIASES,
            alias.as_bytes(),
            &AliasRecord { room_id: room_id.to_owned(), creator: creator.to_owned() },
        )?;
        batch.put(ROOM_ALIASES, &keys::join(&[room_id.as_bytes(), alias.as_bytes()]), &())?;
        self.db().write(batch)?;
        Ok(())
    }

    /// Deletes a local alias if `user_id` may: its creator, a server admin, or a room member
    /// with the power to change the canonical alias.
    pub fn delete_alias(
        &self,
        alias: &RoomAliasId,
        user_id: &UserId,
        is_admin: bool,
    ) -> Result<(), RoomError> {
        let Some(record) = self.db().get::<AliasRecord>(ALIASES, alias.as_bytes())? else {
            return Err(RoomError::NotFound);
        };
        let allowed = is_admin || record.creator == user_id || {
            let levels = self.power_levels(&record.room_id)?;
            levels.user_level(user_id) >= levels.event_level("m.room.canonical_alias", true)
        };
        if !allowed {
            return Err(RoomError::Forbidden(
                "You don't have permission to delete the alias".into(),
            ));
        }
        let mut batch = self.db().batch();
        batch.delete(ALIASES, alias.as_bytes())?;
        batch.delete(ROOM_ALIASES, &keys::join(&[record.room_id.as_bytes(), alias.as_bytes()]))?;
        self.db().write(batch)?;
        Ok(())
    }

    /// The local aliases of a room.
    pub fn room_aliases(&self, room_id: &RoomId) -> Result<Vec<OwnedRoomAliasId>, RoomError> {
        let prefix = keys::prefix(&[room_id.as_bytes()]);
        Ok(self
            .db()
            .scan_prefix(ROOM_ALIASES, &prefix)?
            .into_iter()
            .filter_map(|(key, _)| {
                OwnedRoomAliasId::try_from(String::from_utf8(key[prefix.len()..].to_vec()).ok()?)
                    .ok()
            })
            .collect())
    }

    /// Lists or unlists a room in the public directory.
    pub fn set_public(&self, room_id: &RoomId, public: bool) -> Result<(), RoomError> {
        let mut batch = self.db().batch();
        if public {
            batch.put(PUBLIC, room_id.as_bytes(), &())?;
        } else {
            batch.delete(PUBLIC, room_id.as_bytes())?;
        }
        self.db().write(batch)?;
        Ok(())
    }

    /// Whether a room is listed.
    pub fn is_public(&self, room_id: &RoomId) -> Result<bool, RoomError> {
        Ok(self.db().contains(PUBLIC, room_id.as_bytes())?)
    }

    /// One page of the public room directory. `since` is a token of an earlier page
    /// (`p<offset>`); an unknown one is [`RoomError::InvalidParam`].
    ///
    /// [`GET /publicRooms`](https://spec.matrix.org/v1.16/client-server-api/#get_matrixclientv3publicrooms)
    pub fn public_rooms(&self, request: &PublicRoomsRequest) -> Result<PublicRoomsPage, RoomError> {
        let start = match request.since.as_deref() {
            Some(since) => since
                .strip_prefix('p')
                .and_then(|offset| offset.parse::<usize>().ok())
                .ok_or_else(|| RoomError::InvalidParam("Invalid since token".into()))?,
            None => 0,
        };
        let all = self.public_room_entries(request)?;
        let limit = request.limit.unwrap_or(PUBLIC_ROOMS_PAGE_MAX).min(PUBLIC_ROOMS_PAGE_MAX);
        let total = all.len();
        let chunk: Vec<Value> = all.into_iter().skip(start).take(limit).collect();
        let end = start + chunk.len();
        Ok(PublicRoomsPage {
            next_batch: (end < total).then(|| format!("p{end}")),
            prev_batch: (start > 0).then(|| format!("p{}", start.saturating_sub(limit))),
            chunk,
            total_room_count_estimate: total,
        })
    }

    /// The directory entries of listed rooms that match the request's filter, largest first.
    pub fn public_room_entries(
        &self,
        request: &PublicRoomsRequest,
    ) -> Result<Vec<Value>, RoomError> {
        let search =
            request.search.as_deref().map(str::to_lowercase).filter(|search| !search.is_empty());
        let mut chunks = Vec::new();
        for (key, _) in self.db().scan_prefix(PUBLIC, b"")? {
            let Ok(room_id) = OwnedRoomId::try_from(String::from_utf8_lossy(&key).into_owned())
            else {
                continue;
            };
            let chunk = self.directory_entry(&room_id)?;
            if let Some(search) = &search {
                let haystack = format!(
                    "{} {} {}",
                    chunk.get("name").and_then(Value::as_str).unwrap_or(""),
                    chunk.get("topic").and_then(Value::as_str).unwrap_or(""),
                    chunk.get("canonical_alias").and_then(Value::as_str).unwrap_or(""),
                )
                .to_lowercase();
                if !haystack.contains(search) {
                    continue;
                }
            }
            let room_type = chunk.get("room_type").and_then(Value::as_str).map(str::to_owned);
            if !request.room_types.is_empty() && !request.room_types.contains(&room_type) {
                continue;
            }
            chunks.push(chunk);
        }
        chunks.sort_by_key(|chunk| {
            std::cmp::Reverse(chunk["num_joined_members"].as_u64().unwrap_or(0))
        });
        Ok(chunks)
    }

    fn directory_entry(&self, room_id: &RoomId) -> Result<Value, RoomError> {
        let text = |kind: &str, field: &str| -> Result<Option<Value>, RoomError> {
            Ok(self
                .current_state_content(room_id, kind, "")?
                .and_then(|content| content.get(field).cloned()))
        };
        let join_rule = text("m.room.join_rules", "join_rule")?.unwrap_or(json!("invite"));
        let mut chunk = json!({
            "room_id": room_id,
            "num_joined_members": self.joined_member_count(room_id)?,
            "world_readable": text("m.room.history_visibility", "history_visibility")? == Some(json!("world_readable")),
            "guest_can_join": text("m.room.guest_access", "guest_access")? == Some(json!("can_join")),
            "join_rule": join_rule,
        });
        for (kind, field, key) in [
            ("m.room.name", "name", "name"),
            ("m.room.topic", "topic", "topic"),
            ("m.room.canonical_alias", "alias", "canonical_alias"),
            ("m.room.avatar", "url", "avatar_url"),
            ("m.room.create", "type", "room_type"),
        ] {
            if let Some(value) = text(kind, field)? {
                chunk[key] = value;
            }
        }
        Ok(chunk)
    }
}
