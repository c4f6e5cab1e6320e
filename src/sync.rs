//! `/sync`: what changed for a user since a stream position, or everything on an initial sync,
//! with long polling that wakes on the notifier as soon as something relevant is committed.
//!
//! A sync token is `s<position>`: everything up to that stream position has been delivered.
//!
//! [Syncing](https://spec.matrix.org/v1.16/client-server-api/#syncing)

use std::{
    collections::{BTreeSet, HashSet},
    sync::Arc,
    time::Duration,
};

use ruma::{
    OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UInt, UserId,
    push::{Action, FlattenedJson, PushConditionRoomCtx, Ruleset},
    serde::Raw,
};
use serde_json::{Map, Value, json};
use tracing::instrument;

use crate::{
    account_data::UserPushRules,
    api::{AppState, error::ApiError, extract::Auth},
    filter::{EventFilter, Filter},
    kept::Kept,
    rooms::{Direction, EventMeta, MembershipRecord, Pdu, RoomError, VisibilityMemo},
};

/// The default timeline limit of a sync.
pub const DEFAULT_TIMELINE_LIMIT: usize = 10;

/// Formats a stream position as a token.
pub fn token(position: u64) -> String {
    format!("s{position}")
}

/// Parses a token made by [`token`] (a bare number is accepted too, and the to-device
/// cursor of a sync token is ignored).
pub fn parse_token(token: &str) -> Option<u64> {
    parse_sync_token(token).map(|(position, _)| position)
}

/// Parses a sync token: `s<position>`, or `s<position>_<cursor>` when that sync had to leave
/// to-device messages for the next one (the cursor says which it delivered).
pub fn parse_sync_token(token: &str) -> Option<(u64, Option<u64>)> {
    let bare = token.strip_prefix('s').or_else(|| token.strip_prefix('t')).unwrap_or(token);
    match bare.split_once('_') {
        Some((position, cursor)) => Some((position.parse().ok()?, Some(cursor.parse().ok()?))),
        None => Some((bare.parse().ok()?, None)),
    }
}

/// What the client asked for.
pub struct SyncRequest {
    /// The filter to apply.
    pub filter: Filter,
    /// Position the client has seen everything up to.
    pub since: Option<u64>,
    /// The to-device cursor of the `since` token, if it has one.
    pub to_device_cursor: Option<u64>,
    /// Send the full state of every room.
    pub full_state: bool,
    /// How long to wait for something new.
    pub timeout: Duration,
    /// Send `state_after` (state at the end of the timeline) instead of `state`.
    pub use_state_after: bool,
}

/// Timeline events picked for a room.
struct Timeline {
    events: Vec<(Pdu, EventMeta)>,
    limited: bool,
    prev_batch: u64,
}

/// Runs a sync, waiting up to the timeout for something new when nothing is.
#[instrument(skip_all, fields(user_id = %auth.user_id))]
pub async fn sync(state: &AppState, auth: &Auth, request: SyncRequest) -> Result<Value, ApiError> {
    let mut receiver = state.notifier.subscribe();
    let deadline = tokio::time::Instant::now() + request.timeout;
    'build: loop {
        receiver.borrow_and_update();
        let mut seen = state.notifier.seen();
        let position = state.rooms.position();
        let (response, changed, rooms) = build(state, auth, &request, position).await?;
        if changed
            || state.notifier.is_closed()
            || request.since.is_none()
            || request.full_state
            || request.since.is_some_and(|since| since > position)
        {
            return Ok(response);
        }
        loop {
            let typing_expiry =
                state.ephemeral.next_typing_expiry().map(tokio::time::Instant::from_std);
            let wake = typing_expiry.map_or(deadline, |expiry| expiry.min(deadline));
            tokio::select! {
                result = receiver.changed() => {
                    if result.is_err() {
                        return Ok(response);
                    }
                    receiver.borrow_and_update();
                    if state.notifier.is_closed() || state.notifier.concerns(&mut seen, &rooms) {
                        continue 'build;
                    }
                }
                () = tokio::time::sleep_until(wake) => {
                    if wake >= deadline {
                        return Ok(response);
                    }
                    state.ephemeral.expire_typing()?;
                    continue 'build;
                }
            }
        }
    }
}

async fn build(
    state: &AppState,
    auth: &Auth,
    request: &SyncRequest,
    position: u64,
) -> Result<(Value, bool, HashSet<OwnedRoomId>), ApiError> {
    let ruleset = state.account_data.push_rules_shared(&auth.user_id)?;
    let user_id = &auth.user_id;
    let since = request.since;
    let filter = &request.filter;
    let mut join = Map::new();
    let mut invite = Map::new();
    let mut knock = Map::new();
    let mut leave = Map::new();
    let (global_data, mut room_data) = state.account_data.events_since(user_id, since)?;

    // Presence is looked up for the members of joined rooms only when the filter can let any
    // through.
    let presence_wanted = filter.presence.may_allow_type("m.presence");
    let mut presence_users: BTreeSet<OwnedUserId> = BTreeSet::from([user_id.clone()]);
    // Device list tracking: users whose keys changed, or whom the user newly shares a room
    // with, are `changed`; those the user no longer shares any room with are `left`.
    // [Tracking the device list](https://spec.matrix.org/v1.16/client-server-api/#tracking-the-device-list-for-a-user)
    let mut devices_changed: BTreeSet<OwnedUserId> = BTreeSet::new();
    let mut devices_left: BTreeSet<OwnedUserId> = BTreeSet::new();
    // The rooms whose events may change this user's next response: every room it has a
    // membership in (a change of its membership is announced to everyone).
    let mut rooms = HashSet::new();
    for (room_id, record) in state.rooms.rooms_of_user(user_id)? {
        rooms.insert(room_id.clone());
        if !filter.room.allows_room(&room_id) || record.position > position {
            continue;
        }
        let newly = since.is_none_or(|since| record.position > since);
        match record.membership.as_str() {
            "join" => {
                let members = state.rooms.members(&room_id)?;
                if presence_wanted {
                    presence_users.extend(members.joined.iter().cloned());
                }
                if let Some(since) = since {
                    for (member, member_record) in &members.all {
                        let joined = member_record.membership == "join";
                        if member == user_id || !newly && member_record.position <= since {
                            continue;
                        }
                        if joined {
                            devices_changed.insert(member.clone());
                        } else if !newly
                            && !devices_left.contains(member)
                            && !state.rooms.share_a_room(user_id, member)?
                        {
                            devices_left.insert(member.clone());
                        }
                    }
                }
                let room_since = if newly { None } else { since };
                let data = room_data.remove(room_id.as_str()).unwrap_or_default();
                if let Some(room) = joined_room(
                    state, auth, request, &room_id, room_since, position, data, &ruleset,
                )
                .await?
                {
                    join.insert(room_id.to_string(), room);
                }
            }
            "invite" if newly => {
                let events = invited_room(state, &room_id, &record)?;
                invite.insert(
                    room_id.to_string(),
                    object([("invite_state", events_section(events))]),
                );
            }
            "knock" if newly => {
                let events = invited_room(state, &room_id, &record)?;
                knock
                    .insert(room_id.to_string(), object([("knock_state", events_section(events))]));
            }
            // On an initial sync, rooms the user left by themselves need `include_leave`;
            // kicks and bans are always reported so the user learns of them.
            "leave" | "ban"
                if !record.forgotten
                    && (since.is_some() && newly
                        || since.is_none()
                            && (filter.room.include_leave
                                || removed_by_other(state, user_id, &record)?)) =>
            {
                if since.is_some() {
                    for member in &state.rooms.members(&room_id)?.joined {
                        if !devices_left.contains(member)
                            && !state.rooms.share_a_room(user_id, member)?
                        {
                            devices_left.insert(member.clone());
                        }
                    }
                }
                if let Some(room) = left_room(state, auth, request, &room_id, &record, since)? {
                    leave.insert(room_id.to_string(), room);
                }
            }
            _ => {}
        }
    }

    let mut presence = Vec::new();
    for member in presence_users {
        if filter.presence.allows("m.presence", member.as_str())
            && let Some(event) = state.ephemeral.presence_event(&member, since)?
        {
            presence.push(event);
        }
    }
    let account_data: Vec<Value> = global_data
        .into_iter()
        .filter(|event| {
            filter.account_data.allows(event["type"].as_str().unwrap_or(""), user_id.as_str())
        })
        .collect();
    if let Some(since) = since {
        for changed_user in state.e2ee.changed_users(since, position)? {
            if !devices_changed.contains(&changed_user)
                && state.rooms.share_a_room(user_id, &changed_user)?
            {
                devices_changed.insert(changed_user);
            }
        }
    }
    devices_changed.retain(|changed_user| !devices_left.contains(changed_user));
    let (to_device, to_device_cursor) = state.e2ee.to_device_events(
        user_id,
        &auth.device_id,
        since,
        request.to_device_cursor,
        position,
    )?;
    let next_batch = match to_device_cursor {
        Some(cursor) => format!("{}_{cursor}", token(position)),
        None => token(position),
    };
    let one_time_keys_count = state.e2ee.one_time_key_counts(user_id, &auth.device_id)?;
    let unused_fallback_key_types =
        state.e2ee.unused_fallback_key_types(user_id, &auth.device_id)?;
    let changed = !join.is_empty()
        || !to_device.is_empty()
        || !devices_changed.is_empty()
        || !devices_left.is_empty()
        || !invite.is_empty()
        || !knock.is_empty()
        || !leave.is_empty()
        || !presence.is_empty()
        || !account_data.is_empty();
    // Built by moving the sections in: `json!` would copy every interpolated value.
    let response = object([
        ("next_batch", Value::String(next_batch)),
        (
            "rooms",
            object([
                ("join", Value::Object(join)),
                ("invite", Value::Object(invite)),
                ("leave", Value::Object(leave)),
                ("knock", Value::Object(knock)),
            ]),
        ),
        ("presence", events_section(presence)),
        ("account_data", events_section(account_data)),
        ("to_device", events_section(to_device)),
        ("device_lists", json!({"changed": devices_changed, "left": devices_left})),
        ("device_one_time_keys_count", json!(one_time_keys_count)),
        ("device_unused_fallback_key_types", json!(unused_fallback_key_types)),
    ]);
    Ok((response, changed, rooms))
}

/// Picks timeline events in `(lower, upper]`, newest `limit` of those the filter allows.
#[allow(clippy::too_many_arguments)] // The room, the window, the limit, and for whom.
fn timeline(
    state: &AppState,
    viewer: &UserId,
    room_id: &RoomId,
    lower: Option<u64>,
    upper: u64,
    limit: usize,
    filter: &EventFilter,
) -> Result<Timeline, RoomError> {
    let mut picked = Vec::new();
    let mut cursor = upper.saturating_add(1);
    let floor = lower.map(|lower| lower + 1);
    let mut limited = false;
    let mut visibility = VisibilityMemo::default();
    // The first batch is what the limit needs (and one more, to tell whether the timeline is
    // limited); later ones, where events were filtered out, double up to 64. Each step back
    // through a table still in its memtable is a skip-list search, so a fixed batch of 64
    // cost a timeline of 5 about twelve times the reading it used.
    let mut batch_size = (limit + 1).min(TIMELINE_BATCH_MAX);
    'scan: loop {
        let batch =
            state.rooms.timeline(room_id, cursor, floor, Direction::Backward, batch_size)?;
        batch_size = (batch_size * 2).min(TIMELINE_BATCH_MAX);
        if batch.is_empty() {
            break;
        }
        for (position, event_id) in &batch {
            cursor = *position;
            let (Some(pdu), Some(meta)) = (state.rooms.pdu(event_id)?, state.rooms.meta(event_id)?)
            else {
                continue;
            };
            if !filter.allows_pdu(&pdu)
                || !state.rooms.visible_to_memo(viewer, &pdu, &meta, &mut visibility)?
            {
                continue;
            }
            if picked.len() == limit {
                limited = true;
                break 'scan;
            }
            picked.push((pdu, meta));
        }
    }
    picked.reverse();
    let prev_batch = picked.first().map(|(_, meta)| meta.position - 1).unwrap_or(upper);
    Ok(Timeline { events: picked, limited, prev_batch })
}

/// The most timeline entries read in one step back.
const TIMELINE_BATCH_MAX: usize = 64;

fn timeline_limit(state: &AppState, filter: &EventFilter) -> usize {
    filter
        .limit
        .map(|limit| limit as usize)
        .unwrap_or(DEFAULT_TIMELINE_LIMIT)
        .min(state.config.timeline_limit_max)
}

/// The state section: what the client needs besides the timeline.
#[allow(clippy::too_many_arguments)] // Each is one distinct input of the spec's rule.
fn state_section(
    state: &AppState,
    auth: &Auth,
    filter: &Filter,
    timeline: &Timeline,
    room_since: Option<u64>,
    room_id: &RoomId,
    upper: u64,
    full_state: bool,
) -> Result<Vec<Value>, ApiError> {
    let since_snapshot = match room_since {
        Some(since) if !full_state => {
            let since_snapshot = state.rooms.snapshot_at_position(room_id, since)?;
            // A whole timeline that goes on from `since` says itself what changed, unless its
            // first event does not follow on from the state at `since`: a gap in the DAG
            // bridged with the state another server gave (`state_ids`). Checked before any
            // state is loaded: this is what almost every incremental sync finds.
            if !timeline.limited
                && timeline
                    .events
                    .first()
                    .is_none_or(|(_, meta)| meta.state_before == since_snapshot)
            {
                return Ok(Vec::new());
            }
            Some(since_snapshot)
        }
        _ => None,
    };
    let start_snapshot = match timeline.events.first() {
        Some((_, meta)) => meta.state_before,
        None => state.rooms.snapshot_at_position(room_id, upper)?,
    };
    let lazy = filter.room.state.lazy_load_members;
    let senders: Vec<&UserId> =
        timeline.events.iter().map(|(pdu, _)| pdu.sender.as_ref()).collect();
    let in_timeline: Vec<&OwnedEventId> =
        timeline.events.iter().map(|(pdu, _)| &pdu.event_id).collect();
    let wanted = state.rooms.state_changes(start_snapshot, since_snapshot, |kind, key| {
        filter.room.state.may_allow_type(kind)
            && (!lazy || wanted_member(auth, &senders, kind, key))
    })?;
    let mut events = Vec::new();
    for event_id in wanted.into_values() {
        if in_timeline.contains(&&event_id) {
            continue;
        }
        let Some((pdu, _, value)) =
            state.rooms.client_event_by_id(&event_id, Some((&auth.user_id, &auth.device_id)))?
        else {
            continue;
        };
        if filter.room.state.allows_pdu(&pdu) {
            events.push(value);
        }
    }
    Ok(events)
}

/// The room's state section: `state` (before the timeline) or, when the client asks with
/// `use_state_after`, `state_after` (at the end of the timeline).
fn room_state(
    state: &AppState,
    auth: &Auth,
    request: &SyncRequest,
    timeline: &Timeline,
    room_since: Option<u64>,
    room_id: &RoomId,
    upper: u64,
) -> Result<(&'static str, Vec<Value>), ApiError> {
    if !request.use_state_after {
        let events = state_section(
            state,
            auth,
            &request.filter,
            timeline,
            room_since,
            room_id,
            upper,
            request.full_state,
        )?;
        return Ok(("state", events));
    }
    let filter = &request.filter.room.state;
    let senders: Vec<&UserId> =
        timeline.events.iter().map(|(pdu, _)| pdu.sender.as_ref()).collect();
    let since_snapshot = match room_since {
        Some(since) if !request.full_state => {
            Some(state.rooms.snapshot_at_position(room_id, since)?)
        }
        _ => None,
    };
    let wanted = state.rooms.state_changes(
        state.rooms.snapshot_at_position(room_id, upper)?,
        since_snapshot,
        |kind, key| {
            filter.may_allow_type(kind)
                && (!filter.lazy_load_members || wanted_member(auth, &senders, kind, key))
        },
    )?;
    let mut events = Vec::new();
    for event_id in wanted.into_values() {
        if let Some((pdu, _, value)) =
            state.rooms.client_event_by_id(&event_id, Some((&auth.user_id, &auth.device_id)))?
            && filter.allows_pdu(&pdu)
        {
            events.push(value);
        }
    }
    Ok(("state_after", events))
}

/// With lazy-loaded members, whether the state entry `(kind, key)` is sent: every entry but
/// the member events of users other than the syncing one and the timeline's senders.
fn wanted_member(auth: &Auth, senders: &[&UserId], kind: &str, key: &str) -> bool {
    kind != "m.room.member"
        || key == auth.user_id.as_str()
        || senders.iter().any(|sender| sender.as_str() == key)
}

fn render(
    state: &AppState,
    auth: &Auth,
    events: &[(Pdu, EventMeta)],
) -> Result<Vec<Value>, ApiError> {
    events
        .iter()
        .map(|(pdu, meta)| {
            Ok(state.rooms.client_event(pdu, Some(meta), Some((&auth.user_id, &auth.device_id)))?)
        })
        .collect()
}

#[allow(clippy::too_many_arguments)] // The room, the window and what to render it with.
async fn joined_room(
    state: &AppState,
    auth: &Auth,
    request: &SyncRequest,
    room_id: &RoomId,
    room_since: Option<u64>,
    upper: u64,
    account_data: Vec<Value>,
    ruleset: &UserPushRules,
) -> Result<Option<Value>, ApiError> {
    let filter = &request.filter;
    let limit = timeline_limit(state, &filter.room.timeline);
    let timeline =
        timeline(state, &auth.user_id, room_id, room_since, upper, limit, &filter.room.timeline)?;
    let (state_key, state_events) =
        room_state(state, auth, request, &timeline, room_since, room_id, upper)?;
    let mut ephemeral = Vec::new();
    if let Some(users) = state.ephemeral.typing(room_id, room_since) {
        ephemeral.push(json!({"type": "m.typing", "content": {"user_ids": users}}));
    }
    if let Some(receipts) = state.ephemeral.receipt_event(room_id, &auth.user_id, room_since)? {
        ephemeral.push(receipts);
    }
    ephemeral
        .retain(|event| filter.room.ephemeral.allows(event["type"].as_str().unwrap_or(""), ""));
    let account_data: Vec<Value> = account_data
        .into_iter()
        .filter(|event| {
            filter
                .room
                .account_data
                .allows(event["type"].as_str().unwrap_or(""), auth.user_id.as_str())
        })
        .collect();
    if room_since.is_some()
        && !request.full_state
        && timeline.events.is_empty()
        && state_events.is_empty()
        && ephemeral.is_empty()
        && account_data.is_empty()
    {
        return Ok(None);
    }
    let (notification_count, highlight_count) =
        unread_counts(state, &auth.user_id, room_id, upper, ruleset).await?;
    let members = state.rooms.members(room_id)?;
    let joined = members.joined.len();
    let invited = members.all.iter().filter(|(_, record)| record.membership == "invite").count();
    let mut summary = json!({"m.joined_member_count": joined, "m.invited_member_count": invited});
    if state.rooms.current_state_event_id(room_id, "m.room.name", "")?.is_none()
        && state.rooms.current_state_event_id(room_id, "m.room.canonical_alias", "")?.is_none()
    {
        let heroes: Vec<&OwnedUserId> = members
            .all
            .iter()
            .filter(|(user_id, record)| {
                *user_id != auth.user_id
                    && (record.membership == "join" || record.membership == "invite")
            })
            .map(|(user_id, _)| user_id)
            .take(5)
            .collect();
        summary["m.heroes"] = json!(heroes);
    }
    Ok(Some(object([
        ("timeline", timeline_section(state, auth, &timeline)?),
        (state_key, events_section(state_events)),
        ("ephemeral", events_section(ephemeral)),
        ("account_data", events_section(account_data)),
        (
            "unread_notifications",
            json!({"notification_count": notification_count, "highlight_count": highlight_count}),
        ),
        ("unread_thread_notifications", Value::Object(Map::new())),
        ("summary", summary),
    ])))
}

/// A JSON object of these fields, the values moved in (`json!` copies what it interpolates,
/// which for a sync response is every event in it).
fn object<const N: usize>(fields: [(&str, Value); N]) -> Value {
    Value::Object(fields.into_iter().map(|(key, value)| (key.to_owned(), value)).collect())
}

/// A room's `timeline`: its events rendered for the client, whether it is limited, and the
/// token to paginate back from.
fn timeline_section(state: &AppState, auth: &Auth, timeline: &Timeline) -> Result<Value, ApiError> {
    Ok(object([
        ("events", Value::Array(render(state, auth, &timeline.events)?)),
        ("limited", Value::Bool(timeline.limited)),
        ("prev_batch", Value::String(token(timeline.prev_batch))),
    ]))
}

/// `{"events": [...]}`, the events moved in.
fn events_section(events: Vec<Value>) -> Value {
    object([("events", Value::Array(events))])
}

/// Whether someone else changed the user's membership (a kick or a ban).
fn removed_by_other(
    state: &AppState,
    user_id: &UserId,
    record: &MembershipRecord,
) -> Result<bool, ApiError> {
    Ok(state.rooms.pdu(&record.event_id)?.is_some_and(|event| event.sender != user_id))
}

/// The stripped state of a room the user is invited to or knocks on, their member event last.
fn invited_room(
    state: &AppState,
    room_id: &RoomId,
    record: &MembershipRecord,
) -> Result<Vec<Value>, ApiError> {
    let mut events = Vec::new();
    // An invite over federation to a room this server is not in: the inviting server's
    // stripped state stands in for the room's.
    let remote_state = record.invite_state.as_deref().unwrap_or_default();
    events.extend(remote_state.iter().cloned());
    for kind in crate::rooms::peers::STRIPPED_STATE_TYPES {
        if let Some(pdu) = state.rooms.current_state_pdu(room_id, kind, "")? {
            events.push(pdu.to_stripped());
        }
    }
    if let Some(invite) = state.rooms.pdu(&record.event_id)? {
        // The inviter's own member event; a knock is its sender's own.
        if invite.state_key.as_deref() != Some(invite.sender.as_str())
            && let Some(inviter) =
                state.rooms.current_state_pdu(room_id, "m.room.member", invite.sender.as_str())?
        {
            events.push(inviter.to_stripped());
        }
        let mut stripped = invite.to_stripped();
        stripped["event_id"] = json!(invite.event_id);
        stripped["origin_server_ts"] = json!(invite.origin_server_ts);
        events.push(stripped);
    }
    Ok(events)
}

fn left_room(
    state: &AppState,
    auth: &Auth,
    request: &SyncRequest,
    room_id: &RoomId,
    record: &MembershipRecord,
    since: Option<u64>,
) -> Result<Option<Value>, ApiError> {
    let filter = &request.filter;
    let limit = timeline_limit(state, &filter.room.timeline);
    let timeline = timeline(
        state,
        &auth.user_id,
        room_id,
        since,
        record.position,
        limit,
        &filter.room.timeline,
    )?;
    let (state_key, state_events) =
        room_state(state, auth, request, &timeline, since, room_id, record.position)?;
    Ok(Some(object([
        ("timeline", timeline_section(state, auth, &timeline)?),
        (state_key, events_section(state_events)),
        ("account_data", events_section(Vec::new())),
    ])))
}

/// Notification and highlight counts of the events after the user's read receipt, as the
/// user's push rules (by default the server-default ruleset) decide for each event.
async fn unread_counts(
    state: &AppState,
    user_id: &UserId,
    room_id: &RoomId,
    upper: u64,
    ruleset: &UserPushRules,
) -> Result<(u64, u64), ApiError> {
    let mut read_position = 0;
    for receipt_type in ["m.read", "m.read.private"] {
        if let Some(receipt) = state.ephemeral.receipt(room_id, user_id, receipt_type)?
            && let Some(meta) = state.rooms.meta(&receipt.event_id)?
        {
            read_position = read_position.max(meta.position);
        }
    }
    let display_name = state
        .rooms
        .current_state_content(room_id, "m.room.member", user_id.as_str())?
        .and_then(|content| content.get("displayname").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| user_id.localpart().to_owned());
    let member_count = state.rooms.joined_member_count(room_id)? as u64;
    let fingerprint = UnreadFingerprint {
        read_position,
        ruleset: ruleset.fingerprint.clone(),
        display_name: display_name.clone(),
        member_count,
    };
    // Counting resumes where the last count of this (user, room) stopped when nothing it
    // depends on changed; otherwise it starts again from the read receipt.
    let key = (user_id.to_owned(), room_id.to_owned());
    let mut counted = state
        .unread
        .get(&key)
        .filter(|counted| counted.fingerprint == fingerprint && counted.up_to <= upper)
        .unwrap_or(UnreadCount {
            fingerprint: fingerprint.clone(),
            up_to: read_position,
            notifications: 0,
            highlights: 0,
        });
    let context = PushConditionRoomCtx::new(
        room_id.to_owned(),
        UInt::try_from(member_count).unwrap_or_default(),
        user_id.to_owned(),
        display_name,
    );
    let events =
        state.rooms.timeline(room_id, counted.up_to, Some(upper), Direction::Forward, 1000)?;
    for (position, event_id) in events {
        if position <= counted.up_to {
            continue;
        }
        counted.up_to = position;
        let Some(event) = state.unread.flattened_event(state, &event_id)? else { continue };
        if event.get_str("sender") == Some(user_id.as_str()) {
            // Sending implies having read everything before.
            counted.notifications = 0;
            counted.highlights = 0;
            continue;
        }
        let actions = push_actions(&ruleset.ruleset, &event, &context).await;
        if actions.iter().any(Action::should_notify) {
            counted.notifications += 1;
            if actions.iter().any(Action::is_highlight) {
                counted.highlights += 1;
            }
        }
    }
    let answer = (counted.notifications, counted.highlights);
    state.unread.put(key, counted);
    Ok(answer)
}

/// The actions of the first of `ruleset`'s rules that applies to `event` (as
/// `Ruleset::get_actions`, with the event flattened once for every user who counts it).
async fn push_actions<'a>(
    ruleset: &'a Ruleset,
    event: &FlattenedJson,
    context: &PushConditionRoomCtx,
) -> &'a [Action] {
    for rule in ruleset {
        if rule.applies(event, context).await {
            return rule.actions();
        }
    }
    &[]
}

/// What an unread count depends on besides the events themselves.
#[derive(Clone, Debug, PartialEq, Eq)]
struct UnreadFingerprint {
    read_position: u64,
    ruleset: Arc<str>,
    display_name: String,
    member_count: u64,
}

/// The unread count of one user in one room up to a stream position.
#[derive(Clone, Debug)]
pub struct UnreadCount {
    fingerprint: UnreadFingerprint,
    up_to: u64,
    notifications: u64,
    highlights: u64,
}

/// The last unread count of each (user, room), so that a sync evaluates push rules only for
/// events that arrived since the previous one instead of every event since the read receipt.
#[derive(Clone)]
pub struct UnreadCounts {
    counts: std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<(OwnedUserId, ruma::OwnedRoomId), UnreadCount>>,
    >,
    /// Recent events in the flattened form push rules read, keyed by event id and whether the
    /// event is redacted: every member of a room counts each new event of it.
    flattened: Arc<Kept<(OwnedEventId, bool), Arc<FlattenedJson>>>,
}

impl Default for UnreadCounts {
    fn default() -> Self {
        Self { counts: Arc::default(), flattened: Arc::new(Kept::new(FLATTENED_KEPT_MAX)) }
    }
}

/// How many flattened events are kept before the kept ones are dropped and made again.
const FLATTENED_KEPT_MAX: usize = 4096;

impl UnreadCounts {
    fn get(&self, key: &(OwnedUserId, ruma::OwnedRoomId)) -> Option<UnreadCount> {
        self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(key).cloned()
    }

    fn put(&self, key: (OwnedUserId, ruma::OwnedRoomId), count: UnreadCount) {
        self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key, count);
    }

    /// An event in the client format (redacted if it is), flattened for push rules.
    fn flattened_event(
        &self,
        state: &AppState,
        event_id: &OwnedEventId,
    ) -> Result<Option<Arc<FlattenedJson>>, ApiError> {
        let Some(meta) = state.rooms.meta(event_id)? else { return Ok(None) };
        let key = (event_id.clone(), meta.redacted_by.is_some());
        if let Some(event) = self.flattened.get(&key) {
            return Ok(Some(event));
        }
        let Some(pdu) = state.rooms.pdu(event_id)? else { return Ok(None) };
        let rendered = state.rooms.client_event(&pdu, Some(&meta), None)?;
        let Ok(raw) = serde_json::value::to_raw_value(&rendered) else { return Ok(None) };
        let event = Arc::new(FlattenedJson::from_raw(&Raw::<Value>::from_json(raw)));
        self.flattened.insert(key, event.clone());
        Ok(Some(event))
    }
}
