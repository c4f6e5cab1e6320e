//! Membership changes by local users: join, knock, invite, leave, kick, ban, unban, and
//! profile changes carried into every joined room as new member events.
//!
//! [Room membership](https://spec.matrix.org/v1.16/client-server-api/#room-membership)

use ruma::{RoomId, UserId};
use serde_json::{Value, json};

use super::{Appended, NewEvent, RoomError, Rooms};

impl Rooms {
    /// Joins `user_id` to a local room (public, or invited). Joining again is a no-op.
    pub async fn join(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        profile: (Option<String>, Option<String>),
        reason: Option<String>,
    ) -> Result<(), RoomError> {
        if self.room(room_id)?.is_none() {
            return Err(RoomError::NotFound);
        }
        if self.is_joined(room_id, user_id)? {
            return Ok(());
        }
        let mut content = member_content("join", profile, reason);
        if let Some(invite) =
            self.membership(room_id, user_id)?.filter(|record| record.membership == "invite")
            && let Some(invite) = self.pdu(&invite.event_id)?
            && invite.content_value().get("is_direct") == Some(&json!(true))
        {
            content["is_direct"] = json!(true);
        }
        self.append(
            room_id,
            user_id,
            NewEvent::state("m.room.member", user_id.as_str(), content),
            None,
        )
        .await?;
        Ok(())
    }

    /// Knocks on a local room as `user_id`: a `knock` member event, which the auth rules allow
    /// only in room versions with knocking whose join rule is `knock` (or `knock_restricted`).
    ///
    /// [Knocking on rooms](https://spec.matrix.org/v1.16/client-server-api/#knocking-on-rooms)
    pub async fn knock(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        profile: (Option<String>, Option<String>),
        reason: Option<String>,
    ) -> Result<(), RoomError> {
        if self.room(room_id)?.is_none() {
            return Err(RoomError::NotFound);
        }
        let content = member_content("knock", profile, reason);
        self.append(
            room_id,
            user_id,
            NewEvent::state("m.room.member", user_id.as_str(), content),
            None,
        )
        .await?;
        Ok(())
    }

    /// Changes `target`'s membership as `sender`: `invite`, `leave` (leave, kick, unban) or
    /// `ban`. The auth rules decide whether `sender` may.
    pub async fn set_membership(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        membership: &str,
        reason: Option<String>,
        extra: Option<(&str, Value)>,
    ) -> Result<Appended, RoomError> {
        if self.room(room_id)?.is_none() {
            return Err(RoomError::NotFound);
        }
        let current = self.membership(room_id, target)?.map(|record| record.membership);
        match (membership, current.as_deref()) {
            ("invite", Some("join")) => {
                return Err(RoomError::Forbidden(format!("{target} is already in the room")));
            }
            ("invite", Some("ban")) => {
                return Err(RoomError::Forbidden(format!("{target} is banned from the room")));
            }
            ("leave", None) if sender == target => {
                return Err(RoomError::Forbidden("You are not a member of this room".into()));
            }
            _ => {}
        }
        // Keep the target's profile on their member event when someone else changes it.
        let mut content = member_content(membership, (None, None), reason);
        if let Some((key, value)) = extra {
            content[key] = value;
        }
        self.append(
            room_id,
            sender,
            NewEvent::state("m.room.member", target.as_str(), content),
            None,
        )
        .await
    }

    /// Sends a new member event with the changed profile into every room the user is joined to.
    pub async fn update_profile_in_rooms(
        &self,
        user_id: &UserId,
        profile: (Option<String>, Option<String>),
    ) -> Result<(), RoomError> {
        for room_id in self.joined_rooms(user_id)? {
            let mut content = self
                .current_state_content(&room_id, "m.room.member", user_id.as_str())?
                .unwrap_or_else(|| json!({"membership": "join"}));
            match &profile.0 {
                Some(name) => content["displayname"] = json!(name),
                None => {
                    content.as_object_mut().map(|object| object.remove("displayname"));
                }
            }
            match &profile.1 {
                Some(url) => content["avatar_url"] = json!(url),
                None => {
                    content.as_object_mut().map(|object| object.remove("avatar_url"));
                }
            }
            content.as_object_mut().map(|object| object.remove("reason"));
            let event = NewEvent::state("m.room.member", user_id.as_str(), content);
            if let Err(error) = self.append(&room_id, user_id, event, None).await {
                tracing::warn!(%room_id, %error, "profile change not sent to room");
            }
        }
        Ok(())
    }
}

fn member_content(
    membership: &str,
    profile: (Option<String>, Option<String>),
    reason: Option<String>,
) -> Value {
    let mut content = json!({"membership": membership});
    if let Some(displayname) = profile.0 {
        content["displayname"] = json!(displayname);
    }
    if let Some(avatar_url) = profile.1 {
        content["avatar_url"] = json!(avatar_url);
    }
    if let Some(reason) = reason {
        content["reason"] = json!(reason);
    }
    content
}
