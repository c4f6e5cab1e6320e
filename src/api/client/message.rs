//! Reading history: `messages` (pagination both ways, backfilling from other servers past
//! the oldest event we have) and `context`.
//!
//! [Getting events for a room](https://spec.matrix.org/v1.16/client-server-api/#get_matrixclientv3roomsroomidmessages)

use axum::{Json, Router, extract::State, routing::get};
use ruma::{OwnedEventId, OwnedRoomId, RoomId};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{membership::visible_until, sync::resolve_filter};
use crate::{
    api::{
        AppState,
        error::{ApiError, ApiResult},
        extract::{Auth, PathIds, Query},
    },
    filter::EventFilter,
    rooms::{Direction, EventMeta, Pdu},
    sync::{parse_token, token},
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/v3/rooms/{roomId}/messages", get(get_messages))
        .route("/_matrix/client/v3/rooms/{roomId}/context/{eventId}", get(get_context))
}

#[derive(Deserialize)]
struct MessagesQuery {
    from: Option<String>,
    to: Option<String>,
    dir: Option<String>,
    limit: Option<String>,
    filter: Option<String>,
}

fn room_filter(
    state: &AppState,
    auth: &Auth,
    filter: Option<&str>,
) -> Result<EventFilter, ApiError> {
    let Some(raw) = filter.filter(|raw| !raw.is_empty()) else { return Ok(EventFilter::default()) };
    let value: Value =
        serde_json::from_str(raw).map_err(|_| ApiError::not_json("Invalid filter JSON"))?;
    if value.get("room").is_some() {
        return Ok(resolve_filter(state, auth, Some(raw))?.room.timeline);
    }
    serde_json::from_value(value)
        .map_err(|error| ApiError::bad_json(format!("Invalid filter: {error}")))
}

fn parse_limit(limit: Option<&str>, default: usize, max: usize) -> Result<usize, ApiError> {
    match limit {
        None => Ok(default),
        Some(limit) => limit
            .parse::<usize>()
            .map(|limit| limit.min(max))
            .map_err(|_| ApiError::invalid_param("Invalid limit")),
    }
}

/// Walks the timeline from `from` in `direction`, keeping events the filter allows, until
/// `limit` are found, `stop` is passed or the room's start/end is reached. Returns the events
/// and whether more may follow.
#[allow(clippy::too_many_arguments)] // Where, which way, how far, and for whom.
fn paginate(
    state: &AppState,
    viewer: &ruma::UserId,
    room_id: &RoomId,
    mut cursor: u64,
    stop: Option<u64>,
    direction: Direction,
    limit: usize,
    filter: &EventFilter,
) -> Result<(Vec<(Pdu, EventMeta)>, bool), ApiError> {
    let mut picked = Vec::new();
    loop {
        let batch = state.rooms.timeline(room_id, cursor, stop, direction, 64)?;
        if batch.is_empty() {
            return Ok((picked, false));
        }
        for (position, event_id) in &batch {
            cursor = *position;
            if picked.len() == limit {
                return Ok((picked, true));
            }
            let (Some(pdu), Some(meta)) = (state.rooms.pdu(event_id)?, state.rooms.meta(event_id)?)
            else {
                continue;
            };
            if filter.allows_pdu(&pdu) && state.rooms.visible_to(viewer, &pdu, &meta)? {
                picked.push((pdu, meta));
            }
        }
    }
}

/// Member events of the senders of `events` at the given snapshot, for lazy loading.
fn lazy_members(
    state: &AppState,
    auth: &Auth,
    room_id: &RoomId,
    events: &[(Pdu, EventMeta)],
) -> Result<Vec<Value>, ApiError> {
    let mut senders: Vec<&ruma::UserId> =
        events.iter().map(|(pdu, _)| pdu.sender.as_ref()).collect();
    senders.sort();
    senders.dedup();
    let mut members = Vec::new();
    for sender in senders {
        if let Some(event_id) =
            state.rooms.current_state_event_id(room_id, "m.room.member", sender.as_str())?
            && let Some((_, _, value)) =
                state.rooms.client_event_by_id(&event_id, Some((&auth.user_id, &auth.device_id)))?
        {
            members.push(value);
        }
    }
    Ok(members)
}

/// How many backfill requests one `/messages` page may make while it has fewer events than
/// asked for.
const BACKFILLS_PER_PAGE_MAX: usize = 3;

/// A place in a room's history between two events, as `/messages` tokens name it: `s<n>`
/// just after stream position `n` (the tokens `/sync` hands out too), or `h<n>` just before
/// the backfilled event of order `n`, which lies before every stream position.
#[derive(Clone, Copy, Debug)]
enum Place {
    Stream(u64),
    History(u64),
}

impl Place {
    fn parse(raw: &str) -> Option<Self> {
        match raw.strip_prefix('h') {
            Some(order) => order.parse().ok().map(Place::History),
            None => parse_token(raw).map(Place::Stream),
        }
    }

    fn token(self) -> String {
        match self {
            Place::Stream(position) => token(position),
            Place::History(order) => format!("h{order}"),
        }
    }
}

/// Walks the backfilled history from `bound` in `direction` (below it going backward, from
/// it on going forward), keeping what the filter and history visibility allow, until `limit`
/// are found or the history ends. Returns the events with their orders, the last order
/// looked at, and whether more may follow.
#[allow(clippy::type_complexity)] // Events, where the walk stopped, whether there is more.
fn paginate_history(
    state: &AppState,
    viewer: &ruma::UserId,
    room_id: &RoomId,
    bound: u64,
    direction: Direction,
    limit: usize,
    filter: &EventFilter,
) -> Result<(Vec<(u64, Pdu, EventMeta)>, Option<u64>, bool), ApiError> {
    let mut picked = Vec::new();
    let mut cursor = bound;
    let mut last = None;
    loop {
        let batch = state.rooms.history(room_id, cursor, direction, 64)?;
        if batch.is_empty() {
            return Ok((picked, last, false));
        }
        for (order, event_id) in &batch {
            if picked.len() == limit {
                return Ok((picked, last, true));
            }
            last = Some(*order);
            cursor = match direction {
                Direction::Backward => *order,
                Direction::Forward => order.saturating_add(1),
            };
            let (Some(pdu), Some(meta)) = (state.rooms.pdu(event_id)?, state.rooms.meta(event_id)?)
            else {
                continue;
            };
            if filter.allows_pdu(&pdu) && state.rooms.visible_to(viewer, &pdu, &meta)? {
                picked.push((*order, pdu, meta));
            }
        }
        if direction == Direction::Forward && cursor == u64::MAX {
            return Ok((picked, last, false));
        }
    }
}

/// Backfills the room once; a failure is logged and counts as nothing found: the page is
/// answered with what we have.
async fn backfill_once(state: &AppState, room_id: &RoomId) -> usize {
    match state.rooms.backfill(room_id, &state.remote).await {
        Ok(stored) => stored,
        Err(error) => {
            tracing::warn!(%room_id, %error, "backfill failed");
            0
        }
    }
}

/// `GET /_matrix/client/v3/rooms/{roomId}/messages`
///
/// Backward pagination goes through the timeline, then through the backfilled history, and
/// when that ends before the room's start, asks other servers for more (`backfill`).
async fn get_messages(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Query(query): Query<MessagesQuery>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let direction = match query.dir.as_deref() {
        Some("b") | None => Direction::Backward,
        Some("f") => Direction::Forward,
        Some(_) => return Err(ApiError::invalid_param("dir must be b or f")),
    };
    let until = visible_until(&state, &auth, &room_id)?;
    let limit = parse_limit(query.limit.as_deref(), 10, state.config.timeline_limit_max)?;
    let filter = room_filter(&state, &auth, query.filter.as_deref())?;
    let ceiling = until.unwrap_or_else(|| state.rooms.position());
    let parse = |raw: &str| {
        Place::parse(raw).ok_or_else(|| ApiError::invalid_param("Invalid pagination token"))
    };
    let from = match query.from.as_deref() {
        Some(raw) => parse(raw)?,
        None => match direction {
            Direction::Backward => Place::Stream(ceiling),
            Direction::Forward => Place::Stream(0),
        },
    };
    let to = query.to.as_deref().map(parse).transpose()?;
    let viewer = &auth.user_id;
    let mut events: Vec<(Pdu, EventMeta)> = Vec::new();
    let mut end: Option<Place> = None;
    match direction {
        Direction::Backward => {
            let mut history_from = match from {
                Place::History(order) => Some(order),
                Place::Stream(from) => {
                    // Backwards from token n: positions n, n-1, ... down to (exclusive) `to`.
                    let stop = match to {
                        Some(Place::Stream(to)) => Some(to + 1),
                        _ => None,
                    };
                    let start = from.min(ceiling).saturating_add(1);
                    let (picked, more) =
                        paginate(&state, viewer, &room_id, start, stop, direction, limit, &filter)?;
                    events = picked;
                    if more && let Some((_, meta)) = events.last() {
                        end = Some(Place::Stream(meta.position.saturating_sub(1)));
                        None
                    } else if matches!(to, Some(Place::Stream(_)))
                        || !state.rooms.has_history(&room_id)?
                    {
                        None
                    } else if events.len() == limit {
                        end = Some(Place::History(u64::MAX));
                        None
                    } else {
                        Some(u64::MAX)
                    }
                }
            };
            let stop = match to {
                Some(Place::History(to)) => Some(to),
                _ => None,
            };
            let mut backfills = 0;
            while let Some(bound) = history_from {
                let (picked, last, more) = paginate_history(
                    &state,
                    viewer,
                    &room_id,
                    bound,
                    direction,
                    limit - events.len(),
                    &filter,
                )?;
                let mut reached = last.unwrap_or(bound);
                for (order, pdu, meta) in picked {
                    if let Some(stop) = stop
                        && order < stop
                    {
                        reached = stop;
                        break;
                    }
                    reached = order;
                    events.push((pdu, meta));
                }
                history_from = None;
                if stop.is_some_and(|stop| reached <= stop) {
                    break;
                }
                if more || events.len() == limit {
                    end = Some(Place::History(reached));
                    break;
                }
                // The history ends here: ask the room's other servers for what comes before.
                if backfills == BACKFILLS_PER_PAGE_MAX {
                    end = Some(Place::History(reached));
                    break;
                }
                backfills += 1;
                if backfill_once(&state, &room_id).await > 0 {
                    history_from = Some(reached);
                }
            }
        }
        Direction::Forward => {
            let stream_from = match from {
                Place::Stream(from) => Some(from),
                Place::History(order) => {
                    let (picked, last, more) = paginate_history(
                        &state, viewer, &room_id, order, direction, limit, &filter,
                    )?;
                    events = picked.into_iter().map(|(_, pdu, meta)| (pdu, meta)).collect();
                    if more {
                        end = last.map(|last| Place::History(last.saturating_add(1)));
                        None
                    } else {
                        // The history is read: the timeline follows it.
                        Some(0)
                    }
                }
            };
            if let Some(from) = stream_from
                && events.len() < limit
            {
                // Forwards from token n: positions n+1, ... up to (inclusive) `to` and the
                // ceiling.
                let stop = match to {
                    Some(Place::Stream(to)) => to.min(ceiling),
                    _ => ceiling,
                };
                let (picked, more) = paginate(
                    &state,
                    viewer,
                    &room_id,
                    from,
                    Some(stop),
                    direction,
                    limit - events.len(),
                    &filter,
                )?;
                if more && let Some((_, meta)) = picked.last() {
                    end = Some(Place::Stream(meta.position));
                }
                events.extend(picked);
            }
        }
    }
    let chunk: Vec<Value> = events
        .iter()
        .map(|(pdu, meta)| {
            state.rooms.client_event(pdu, Some(meta), Some((&auth.user_id, &auth.device_id)))
        })
        .collect::<Result<_, _>>()?;
    let mut answer = json!({"chunk": chunk, "start": from.token()});
    if let Some(end) = end {
        answer["end"] = json!(end.token());
    }
    if filter.lazy_load_members {
        answer["state"] = json!(lazy_members(&state, &auth, &room_id, &events)?);
    }
    Ok(Json(answer))
}

#[derive(Deserialize)]
struct ContextQuery {
    limit: Option<String>,
    filter: Option<String>,
}

/// `GET /_matrix/client/v3/rooms/{roomId}/context/{eventId}`
async fn get_context(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Query(query): Query<ContextQuery>,
) -> ApiResult {
    let room_id: OwnedRoomId = path.id("roomId")?;
    let event_id: OwnedEventId = path.id("eventId")?;
    let until = visible_until(&state, &auth, &room_id)?;
    let limit = parse_limit(query.limit.as_deref(), 10, state.config.timeline_limit_max)?;
    let filter = room_filter(&state, &auth, query.filter.as_deref())?;
    let (pdu, meta, event) = state
        .rooms
        .client_event_by_id(&event_id, Some((&auth.user_id, &auth.device_id)))?
        .ok_or_else(|| ApiError::not_found("Event not found"))?;
    if pdu.room_id != room_id || until.is_some_and(|until| meta.position > until) {
        return Err(ApiError::not_found("Event not found"));
    }
    let ceiling = until.unwrap_or_else(|| state.rooms.position());
    let before_limit = limit / 2;
    let after_limit = limit - before_limit;
    let (before, _) = paginate(
        &state,
        &auth.user_id,
        &room_id,
        meta.position,
        None,
        Direction::Backward,
        before_limit,
        &filter,
    )?;
    let (after, _) = paginate(
        &state,
        &auth.user_id,
        &room_id,
        meta.position,
        Some(ceiling),
        Direction::Forward,
        after_limit,
        &filter,
    )?;
    let render = |events: &[(Pdu, EventMeta)]| -> Result<Vec<Value>, ApiError> {
        events
            .iter()
            .map(|(pdu, meta)| {
                Ok(state.rooms.client_event(
                    pdu,
                    Some(meta),
                    Some((&auth.user_id, &auth.device_id)),
                )?)
            })
            .collect()
    };
    // Backfilled events sit at position 0: no token goes below it.
    let start = before.last().map_or(meta.position, |(_, meta)| meta.position).saturating_sub(1);
    let end = after.last().map_or(meta.position, |(_, meta)| meta.position);
    let last_snapshot = after.last().map_or(meta.state_after, |(_, meta)| meta.state_after);
    let mut state_events = Vec::new();
    for ((kind, state_key), state_event_id) in state.rooms.state_at(last_snapshot)? {
        if filter.lazy_load_members && kind == "m.room.member" {
            let wanted =
                std::iter::once(&pdu).chain(before.iter().chain(after.iter()).map(|(pdu, _)| pdu));
            if !wanted.clone().any(|event| event.sender.as_str() == state_key) {
                continue;
            }
        }
        if let Some((_, _, value)) = state
            .rooms
            .client_event_by_id(&state_event_id, Some((&auth.user_id, &auth.device_id)))?
        {
            state_events.push(value);
        }
    }
    Ok(Json(json!({
        "event": event,
        "events_before": render(&before)?,
        "events_after": render(&after)?,
        "start": token(start),
        "end": token(end),
        "state": state_events,
    })))
}
