//! State resolution v2 ([the spec](https://spec.matrix.org/v1.16/rooms/v2/#state-resolution),
//! with room version 12's changes) over dense integer ids.
//!
//! A resolution first reads every event it can touch (the states' events and their auth
//! chains) into an arena, in batches, one per level of the auth DAG. From then on an event is
//! a `u32`: its auth events are index vectors, a state is a vector indexed by a dense
//! (type, state key) id, mainline positions are memoised, and both sorts run on precomputed
//! keys. Only the authorization rules themselves are ruma's
//! (`check_state_dependent_auth_rules`, `auth_types_for_event`), called once per event the
//! iterative auth checks visit.
//!
//! It answers what `ruma::state_res::resolve` answers, down to how it treats events that are
//! missing or malformed: the differential tests below run both on generated forks of several
//! room versions and compare. The one difference is where ruma's own answer depends on its
//! hash order: an event that does not cite the create event (see
//! `Resolver::sort_power_events`). And where power levels events cite each other in a
//! cycle (possible only where event ids are not hashes), ruma's mainline walk never ends;
//! ours stops: an error for the mainline, the event left out of the mainline sort.

use std::{
    cmp::{Ordering, Reverse},
    collections::{BTreeMap, BinaryHeap, HashMap, HashSet},
    sync::Arc,
};

use ruma::{
    EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedUserId, RoomId,
    events::{
        StateEventType, TimelineEventType,
        room::{member::MembershipState, power_levels::UserPowerLevel},
    },
    room_version_rules::{AuthorizationRules, StateResolutionV2Rules},
    state_res::events::{
        RoomCreateEvent, RoomMemberEvent, RoomPowerLevelsEvent, RoomPowerLevelsIntField,
    },
};

use super::Pdu;

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A state map as the rest of the server keeps it: (type, state key) to event id.
pub(crate) type StringStateMap = BTreeMap<(String, String), OwnedEventId>;

/// No event, or no (type, state key), in a dense vector.
const NONE: u32 = u32::MAX;

/// The power level a room creator has when no power levels event says otherwise.
const DEFAULT_CREATOR_POWER_LEVEL: i32 = 100;

/// One stored event of a resolution.
struct Node {
    pdu: Arc<Pdu>,
    /// Its auth events, in their order, as ids of the arena (present or missing).
    auth: Vec<u32>,
    /// Its (type, state key), for state events.
    key: u32,
}

/// Every event id a resolution has met, each with a dense id; the events found in the store
/// (or given) keep their parsed PDU.
struct Arena {
    index: FastMap<OwnedEventId, u32>,
    ids: Vec<OwnedEventId>,
    /// `None`: not in the store.
    nodes: Vec<Option<Node>>,
    /// Ids met but not read yet.
    pending: Vec<u32>,
    /// Dense ids of (type, state key), by type, then by state key (looked up without a copy).
    keys: FastMap<TimelineEventType, FastMap<String, u32>>,
    /// Each dense (type, state key), as the keys of `keys`.
    key_types: Vec<(TimelineEventType, String)>,
}

impl Arena {
    fn new() -> Self {
        Self {
            index: FastMap::default(),
            ids: Vec::new(),
            nodes: Vec::new(),
            pending: Vec::new(),
            keys: FastMap::default(),
            key_types: Vec::new(),
        }
    }

    /// The dense id of `event_id`, new ones queued for reading.
    fn intern(&mut self, event_id: &EventId) -> u32 {
        if let Some(&id) = self.index.get(event_id) {
            return id;
        }
        let id = self.ids.len() as u32;
        self.index.insert(event_id.to_owned(), id);
        self.ids.push(event_id.to_owned());
        self.nodes.push(None);
        self.pending.push(id);
        id
    }

    fn key(&mut self, kind: &TimelineEventType, state_key: &str) -> u32 {
        if let Some(&key) = self.keys.get(kind).and_then(|keys| keys.get(state_key)) {
            return key;
        }
        let key = self.key_types.len() as u32;
        self.key_types.push((kind.clone(), state_key.to_owned()));
        self.keys.entry(kind.clone()).or_default().insert(state_key.to_owned(), key);
        key
    }

    fn key_of(&self, kind: &StateEventType, state_key: &str) -> Option<u32> {
        let kind = TimelineEventType::from(kind.clone());
        self.keys.get(&kind).and_then(|keys| keys.get(state_key)).copied()
    }

    /// Places a read (or given) event at its id; its auth events are interned.
    fn place(&mut self, id: u32, pdu: Arc<Pdu>) {
        let auth = pdu.auth_events.iter().map(|auth| self.intern(auth)).collect();
        let key = match &pdu.state_key {
            Some(state_key) => self.key(&pdu.kind, state_key),
            None => NONE,
        };
        self.nodes[id as usize] = Some(Node { pdu, auth, key });
    }

    /// Reads every pending event, and the events they cite, until none is pending. More than
    /// `bound` ids is an error: some auth chain is then longer than a resolution reads.
    fn load(
        &mut self,
        bound: usize,
        read: &mut impl FnMut(&[OwnedEventId]) -> Vec<Option<Pdu>>,
    ) -> Result<(), String> {
        while !self.pending.is_empty() {
            if self.ids.len() > bound {
                return Err("auth chain too long".into());
            }
            let batch = std::mem::take(&mut self.pending);
            let wanted: Vec<OwnedEventId> =
                batch.iter().map(|&id| self.ids[id as usize].clone()).collect();
            for (id, pdu) in batch.into_iter().zip(read(&wanted)) {
                if let Some(pdu) = pdu {
                    self.place(id, Arc::new(pdu));
                }
            }
        }
        Ok(())
    }

    fn node(&self, id: u32) -> Option<&Node> {
        self.nodes.get(id as usize).and_then(Option::as_ref)
    }

    fn pdu(&self, id: u32) -> Option<&Pdu> {
        self.node(id).map(|node| &*node.pdu)
    }

    fn id(&self, id: u32) -> &EventId {
        &self.ids[id as usize]
    }
}

/// Resolves `states` (at least two, not all equal) with the rules of room versions 2 and up.
/// `read` reads a batch of events from the store (`None`: not there); `extra` is an event not
/// stored yet that may appear in the states. Every event and auth chain is bounded by
/// `chain_max` events.
pub(crate) fn resolve(
    auth_rules: &AuthorizationRules,
    rules: &StateResolutionV2Rules,
    states: &[StringStateMap],
    extra: Option<&Pdu>,
    chain_max: usize,
    mut read: impl FnMut(&[OwnedEventId]) -> Vec<Option<Pdu>>,
) -> Result<StringStateMap, String> {
    let mut arena = Arena::new();
    if let Some(extra) = extra {
        let id = arena.intern(&extra.event_id);
        // Given, so not to be read.
        arena.pending.retain(|&pending| pending != id);
        arena.place(id, Arc::new(extra.clone()));
    }
    // The states as dense (key, event) pairs. A state's keys are its own, whatever its events
    // say.
    let dense: Vec<Vec<(u32, u32)>> = states
        .iter()
        .map(|state| {
            state
                .iter()
                .map(|((kind, state_key), event_id)| {
                    let key = arena.key(&TimelineEventType::from(kind.as_str()), state_key);
                    (key, arena.intern(event_id))
                })
                .collect()
        })
        .collect();
    let state_ids = arena.ids.len();
    // The extra event and the room's create event may come on top.
    let bound = chain_max.saturating_mul(states.len()).saturating_add(state_ids + 2);
    arena.load(bound, &mut read)?;
    // The room's create event. Since room version 12 it is no auth event, and its id is the
    // room's; before, it is the one create event among the events read.
    let room_create = if auth_rules.room_create_event_id_as_room_id {
        let room_id = (0..arena.nodes.len() as u32)
            .filter_map(|id| arena.pdu(id))
            .find(|pdu| pdu.kind != TimelineEventType::RoomCreate)
            .map(|pdu| pdu.room_id.clone());
        match room_id.and_then(|room_id| create_event_id(&room_id)) {
            Some(create_id) => {
                let id = arena.intern(&create_id);
                arena.load(bound, &mut read)?;
                arena.node(id).map(|_| id)
            }
            None => None,
        }
    } else {
        (0..arena.nodes.len() as u32).find(|&id| {
            arena.pdu(id).is_some_and(|pdu| is_type_and_key(pdu, &TimelineEventType::RoomCreate))
        })
    };
    let create_key = arena.key(&TimelineEventType::RoomCreate, "");
    let resolver = Resolver { arena, auth_rules, room_create, create_key };
    resolver.run(rules, &dense, chain_max)
}

/// The create event's id of a room whose id is derived from it (room version 12).
fn create_event_id(room_id: &RoomId) -> Option<OwnedEventId> {
    let local = room_id.as_str().strip_prefix('!')?;
    EventId::parse(format!("${local}")).ok()
}

struct Resolver<'a> {
    arena: Arena,
    auth_rules: &'a AuthorizationRules,
    /// The room's create event.
    room_create: Option<u32>,
    /// The dense id of (`m.room.create`, "").
    create_key: u32,
}

impl Resolver<'_> {
    fn run(
        &self,
        rules: &StateResolutionV2Rules,
        states: &[Vec<(u32, u32)>],
        chain_max: usize,
    ) -> Result<StringStateMap, String> {
        let keys = self.arena.key_types.len();
        let events = self.arena.ids.len();

        // The unconflicted state map and the conflicted state set.
        let mut per_key: Vec<Vec<(u32, u32)>> = vec![Vec::new(); keys];
        for state in states {
            for &(key, event) in state {
                let slot = &mut per_key[key as usize];
                match slot.iter_mut().find(|(seen, _)| *seen == event) {
                    Some((_, count)) => *count += 1,
                    None => slot.push((event, 1)),
                }
            }
        }
        let mut unconflicted: Vec<(u32, u32)> = Vec::new();
        let mut conflicted: Vec<u32> = Vec::new();
        for (key, slot) in per_key.iter().enumerate() {
            for &(event, count) in slot {
                if count as usize == states.len() {
                    unconflicted.push((key as u32, event));
                } else {
                    conflicted.push(event);
                }
            }
        }
        if conflicted.is_empty() {
            return Ok(self.to_strings(unconflicted.into_iter()));
        }

        // The full conflicted set: the auth difference, the conflicted state set and, since
        // room version 12, the conflicted state subgraph; only events that are stored.
        let mut full = vec![false; events];
        let mut include = |event: u32| full[event as usize] = self.arena.node(event).is_some();
        self.auth_difference(states, chain_max)?.into_iter().for_each(&mut include);
        conflicted.iter().copied().for_each(&mut include);
        if rules.consider_conflicted_state_subgraph {
            self.conflicted_subgraph(&conflicted, chain_max).into_iter().for_each(&mut include);
        }

        // 1. The power events, with the events of their auth chains in the full conflicted
        //    set, in reverse topological power order.
        let power: Vec<u32> = (0..events as u32)
            .filter(|&event| full[event as usize] && self.is_power_event(event))
            .collect();
        let sorted_power = self.sort_power_events(&power, &full)?;

        // 2. The iterative auth checks on them, from the unconflicted state map (from nothing
        //    since room version 12).
        let mut state = vec![NONE; keys];
        if !rules.begin_iterative_auth_checks_with_empty_state_map {
            for &(key, event) in &unconflicted {
                state[key as usize] = event;
            }
        }
        self.iterative_auth_checks(&sorted_power, &mut state)?;

        // 3. Every other event of the full conflicted set, in mainline order of the resolved
        //    power levels.
        let mut in_power = vec![false; events];
        for &event in &sorted_power {
            in_power[event as usize] = true;
        }
        let remaining: Vec<u32> = (0..events as u32)
            .filter(|&event| full[event as usize] && !in_power[event as usize])
            .collect();
        let power_levels = self
            .arena
            .key_of(&StateEventType::RoomPowerLevels, "")
            .map(|key| state[key as usize])
            .filter(|&event| event != NONE);
        let sorted_remaining = self.mainline_sort(&remaining, power_levels)?;

        // 4. The iterative auth checks on those.
        self.iterative_auth_checks(&sorted_remaining, &mut state)?;

        // 5. The unconflicted state map wins.
        for &(key, event) in &unconflicted {
            state[key as usize] = event;
        }
        let resolved = state
            .iter()
            .enumerate()
            .filter(|(_, event)| **event != NONE)
            .map(|(key, &event)| (key as u32, event));
        Ok(self.to_strings(resolved))
    }

    fn to_strings(&self, entries: impl Iterator<Item = (u32, u32)>) -> StringStateMap {
        entries
            .map(|(key, event)| {
                let (kind, state_key) = &self.arena.key_types[key as usize];
                ((kind.to_string(), state_key.clone()), self.arena.id(event).to_owned())
            })
            .collect()
    }

    /// Events in some states' full auth chains but not in all. A chain longer than
    /// `chain_max` is an error.
    fn auth_difference(
        &self,
        states: &[Vec<(u32, u32)>],
        chain_max: usize,
    ) -> Result<Vec<u32>, String> {
        let events = self.arena.ids.len();
        let mut counts = vec![0_u32; events];
        // The last state whose chain an event was counted in, plus one.
        let mut seen = vec![0_u32; events];
        let mut stack: Vec<u32> = Vec::new();
        for (number, state) in states.iter().enumerate() {
            let stamp = number as u32 + 1;
            let mut size = 0_usize;
            for &(_, event) in state {
                if let Some(node) = self.arena.node(event) {
                    stack.extend(&node.auth);
                }
            }
            while let Some(event) = stack.pop() {
                if seen[event as usize] == stamp {
                    continue;
                }
                seen[event as usize] = stamp;
                counts[event as usize] += 1;
                size += 1;
                if size > chain_max {
                    return Err("auth chain too long".into());
                }
                if let Some(node) = self.arena.node(event) {
                    stack.extend(node.auth.iter().filter(|&&auth| seen[auth as usize] != stamp));
                }
            }
        }
        let all = states.len() as u32;
        Ok((0..events as u32)
            .filter(|&event| counts[event as usize] > 0 && counts[event as usize] < all)
            .collect())
    }

    /// The conflicted state subgraph (room version 12): events on an auth path from one
    /// conflicted event to another, the conflicted events included.
    fn conflicted_subgraph(&self, conflicted: &[u32], chain_max: usize) -> Vec<u32> {
        let events = self.arena.ids.len();
        // Everything reachable from a conflicted event, with the reverse edges.
        let mut in_graph = vec![false; events];
        let mut graph_size = 0_usize;
        let mut cited_by: Vec<Vec<u32>> = vec![Vec::new(); events];
        let mut stack: Vec<u32> = conflicted.to_vec();
        while let Some(event) = stack.pop() {
            if in_graph[event as usize] || graph_size > chain_max {
                continue;
            }
            in_graph[event as usize] = true;
            graph_size += 1;
            if let Some(node) = self.arena.node(event) {
                for &auth in &node.auth {
                    cited_by[auth as usize].push(event);
                    stack.push(auth);
                }
            }
        }
        // The events from which a conflicted event is reachable: walked back from them.
        let mut reaches = vec![false; events];
        let mut stack: Vec<u32> = conflicted.to_vec();
        while let Some(event) = stack.pop() {
            if reaches[event as usize] {
                continue;
            }
            reaches[event as usize] = true;
            stack.extend(cited_by[event as usize].iter().filter(|&&by| in_graph[by as usize]));
        }
        (0..events as u32)
            .filter(|&event| reaches[event as usize] && in_graph[event as usize])
            .collect()
    }

    /// A power event: power levels, join rules or create, or a member event whose sender
    /// removes (leave or ban) someone else.
    fn is_power_event(&self, event: u32) -> bool {
        let Some(pdu) = self.arena.pdu(event) else { return false };
        match pdu.kind {
            TimelineEventType::RoomPowerLevels
            | TimelineEventType::RoomJoinRules
            | TimelineEventType::RoomCreate => pdu.state_key.as_deref() == Some(""),
            TimelineEventType::RoomMember => {
                let removes = RoomMemberEvent::new(pdu).membership().is_ok_and(|membership| {
                    matches!(membership, MembershipState::Leave | MembershipState::Ban)
                });
                removes && pdu.state_key.as_deref() != Some(pdu.sender.as_str())
            }
            _ => false,
        }
    }

    /// The power events and the events of their auth chains in the full conflicted set, in
    /// reverse topological power order (Kahn's algorithm, the smallest candidate first:
    /// greater sender power, then earlier `origin_server_ts`, then smaller event id).
    fn sort_power_events(&self, power: &[u32], full: &[bool]) -> Result<Vec<u32>, String> {
        let events = self.arena.ids.len();
        let mut in_graph = vec![false; events];
        let mut graph: Vec<u32> = Vec::new();
        // Per event of the graph, its auth events in the full conflicted set (no repeats).
        let mut outgoing: FastMap<u32, Vec<u32>> = FastMap::default();
        let mut stack: Vec<u32> = power.to_vec();
        while let Some(event) = stack.pop() {
            if in_graph[event as usize] {
                continue;
            }
            in_graph[event as usize] = true;
            graph.push(event);
            let mut edges: Vec<u32> = Vec::new();
            if let Some(node) = self.arena.node(event) {
                for &auth in &node.auth {
                    if full[auth as usize] && !edges.contains(&auth) {
                        edges.push(auth);
                        if !in_graph[auth as usize] {
                            stack.push(auth);
                        }
                    }
                }
            }
            outgoing.insert(event, edges);
        }
        graph.sort_unstable();

        // The sender's power level of each event, from its own auth events, and the room's
        // creators (ruma learns those from the auth events of the first event it looks at that
        // cites the create event, in its hash order, so that an event that does not cite it
        // may get another answer there).
        let creators = match self.room_create.and_then(|id| self.arena.pdu(id)) {
            Some(create) if !graph.is_empty() => {
                Some(RoomCreateEvent::new(create).creators(self.auth_rules)?)
            }
            _ => None,
        };
        let mut levels: FastMap<u32, UserPowerLevel> = FastMap::default();
        for &event in &graph {
            levels.insert(event, self.power_level_for_sender(event, creators.as_ref())?);
        }
        let tie_breaker = |event: u32| -> Result<TieBreaker<'_>, String> {
            let pdu = self.arena.pdu(event).ok_or_else(|| not_found(self.arena.id(event)))?;
            let power_level = *levels.get(&event).ok_or_else(|| not_found(self.arena.id(event)))?;
            Ok(TieBreaker {
                power_level,
                origin_server_ts: pdu.origin_server_ts,
                event_id: self.arena.id(event),
                event,
            })
        };

        let mut remaining_out: FastMap<u32, usize> = FastMap::default();
        let mut incoming: FastMap<u32, Vec<u32>> = FastMap::default();
        let mut heap = BinaryHeap::new();
        for &event in &graph {
            let edges = &outgoing[&event];
            if edges.is_empty() {
                heap.push(Reverse(tie_breaker(event)?));
            } else {
                for &auth in edges {
                    incoming.entry(auth).or_default().push(event);
                }
                remaining_out.insert(event, edges.len());
            }
        }
        let mut sorted = Vec::with_capacity(graph.len());
        while let Some(Reverse(next)) = heap.pop() {
            for &parent in incoming.get(&next.event).into_iter().flatten() {
                let left = remaining_out.get_mut(&parent).expect("every parent has edges");
                *left -= 1;
                if *left == 0 {
                    heap.push(Reverse(tie_breaker(parent)?));
                }
            }
            sorted.push(next.event);
        }
        Ok(sorted)
    }

    /// The power level of an event's sender by the first power levels event among its auth
    /// events.
    fn power_level_for_sender(
        &self,
        event: u32,
        creators: Option<&HashSet<OwnedUserId>>,
    ) -> Result<UserPowerLevel, String> {
        let rules = self.auth_rules;
        let node = self.arena.node(event);
        let power_levels = node
            .and_then(|node| {
                node.auth
                    .iter()
                    .filter_map(|&auth| self.arena.pdu(auth))
                    .find(|auth_pdu| is_type_and_key(auth_pdu, &TimelineEventType::RoomPowerLevels))
            })
            .map(RoomPowerLevelsEvent::new);
        match (node, creators) {
            (Some(node), Some(creators)) => {
                let sender = &node.pdu.sender;
                if rules.explicitly_privilege_room_creators && creators.contains(sender) {
                    Ok(UserPowerLevel::Infinite)
                } else if let Some(power_levels) = &power_levels {
                    power_levels.user_power_level(sender, rules).map(Into::into)
                } else if creators.contains(sender) {
                    Ok(ruma::Int::from(DEFAULT_CREATOR_POWER_LEVEL).into())
                } else {
                    Ok(RoomPowerLevelsIntField::UsersDefault.default_value().into())
                }
            }
            _ => match &power_levels {
                Some(power_levels) => power_levels
                    .get_as_int_or_default(RoomPowerLevelsIntField::UsersDefault, rules)
                    .map(Into::into),
                None => Ok(RoomPowerLevelsIntField::UsersDefault.default_value().into()),
            },
        }
    }

    /// The iterative auth checks: each event in turn joins `state` when the authorization
    /// rules allow it against `state`, falling back on its own auth events for what `state`
    /// lacks.
    fn iterative_auth_checks(&self, events: &[u32], state: &mut [u32]) -> Result<(), String> {
        let rules = self.auth_rules;
        // The events the rules may ask for, each under its (type, state key).
        let mut auth_events: Vec<(u32, u32)> = Vec::with_capacity(8);
        let put = |auth_events: &mut Vec<(u32, u32)>, key: u32, auth: u32| match auth_events
            .iter_mut()
            .find(|(held, _)| *held == key)
        {
            Some(slot) => slot.1 = auth,
            None => auth_events.push((key, auth)),
        };
        for &event in events {
            let node = self.arena.node(event).ok_or_else(|| not_found(self.arena.id(event)))?;
            let pdu = &*node.pdu;
            let Some(state_key) = pdu.state_key.as_deref() else {
                return Err("missing state key".into());
            };
            auth_events.clear();
            for &auth in &node.auth {
                if let Some(auth_node) = self.arena.node(auth) {
                    if auth_node.key == NONE {
                        return Err("missing state key".into());
                    }
                    put(&mut auth_events, auth_node.key, auth);
                }
            }
            if rules.room_create_event_id_as_room_id
                && pdu.kind != TimelineEventType::RoomCreate
                && let Some(create) = self.room_create
                && self.same_room(create, pdu)
            {
                put(&mut auth_events, self.create_key, create);
            }
            let Ok(auth_types) = ruma::state_res::auth_types_for_event(
                &pdu.kind,
                &pdu.sender,
                Some(state_key),
                &pdu.content,
                rules,
            ) else {
                continue;
            };
            for (kind, key_state) in auth_types {
                let Some(key) = self.arena.key_of(&kind, &key_state) else { continue };
                let held = state[key as usize];
                if held != NONE && self.arena.node(held).is_some() {
                    put(&mut auth_events, key, held);
                }
            }
            let allowed =
                ruma::state_res::check_state_dependent_auth_rules(rules, pdu, |kind, key| {
                    let kind = TimelineEventType::from(kind.clone());
                    auth_events
                        .iter()
                        .find(|(held, _)| {
                            let (held_kind, held_key) = &self.arena.key_types[*held as usize];
                            *held_kind == kind && held_key == key
                        })
                        .and_then(|&(_, auth)| self.arena.pdu(auth))
                });
            if allowed.is_ok() {
                state[node.key as usize] = event;
            }
        }
        Ok(())
    }

    /// Whether the create event `create` is of the room of `pdu`.
    fn same_room(&self, create: u32, pdu: &Pdu) -> bool {
        self.arena.pdu(create).is_some_and(|create| create.room_id == pdu.room_id)
    }

    /// The events in mainline order of `power_levels`: by mainline position (an event with no
    /// power levels event in its chain first, then from the deepest mainline event to the
    /// latest), then `origin_server_ts`, then event id. An event whose power levels chain
    /// cites a missing event is left out.
    fn mainline_sort(&self, events: &[u32], power_levels: Option<u32>) -> Result<Vec<u32>, String> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let count = self.arena.ids.len();
        // The mainline, from the latest power levels event back.
        let mut mainline: Vec<u32> = Vec::new();
        let mut next = power_levels;
        while let Some(event) = next {
            mainline.push(event);
            let node = self.arena.node(event).ok_or_else(|| not_found(self.arena.id(event)))?;
            next = None;
            for &auth in &node.auth {
                let auth_pdu =
                    self.arena.pdu(auth).ok_or_else(|| not_found(self.arena.id(event)))?;
                if is_type_and_key(auth_pdu, &TimelineEventType::RoomPowerLevels) {
                    next = Some(auth);
                    break;
                }
            }
            if mainline.len() > count {
                return Err("the power levels events cite each other".into());
            }
        }
        // Positions: 1 for the deepest mainline event, up to the latest; 0 for none.
        const UNKNOWN: u32 = u32::MAX;
        const MISSING: u32 = u32::MAX - 1;
        let mut position = vec![UNKNOWN; count];
        for (depth, &event) in mainline.iter().rev().enumerate() {
            position[event as usize] = depth as u32 + 1;
        }
        let mut keyed: Vec<(u32, MilliSecondsSinceUnixEpoch, &EventId, u32)> = Vec::new();
        let mut walk: Vec<u32> = Vec::new();
        for &event in events {
            let Some(pdu) = self.arena.pdu(event) else { continue };
            // Up the power levels chain to a known position, then the positions set back
            // down it.
            walk.clear();
            let mut at = event;
            let found = loop {
                match position[at as usize] {
                    UNKNOWN => {}
                    known => break known,
                }
                walk.push(at);
                match self.power_levels_parent(at) {
                    Ok(Some(parent)) => at = parent,
                    Ok(None) => break 0,
                    Err(()) => break MISSING,
                }
                if walk.len() > count {
                    break MISSING;
                }
            };
            for &walked in &walk {
                position[walked as usize] = found;
            }
            if found != MISSING {
                keyed.push((found, pdu.origin_server_ts, self.arena.id(event), event));
            }
        }
        keyed.sort_unstable();
        Ok(keyed.into_iter().map(|(.., event)| event).collect())
    }

    /// The first power levels event among an event's auth events; an error when a missing
    /// event comes before it.
    fn power_levels_parent(&self, event: u32) -> Result<Option<u32>, ()> {
        let node = self.arena.node(event).ok_or(())?;
        for &auth in &node.auth {
            let auth_pdu = self.arena.pdu(auth).ok_or(())?;
            if is_type_and_key(auth_pdu, &TimelineEventType::RoomPowerLevels) {
                return Ok(Some(auth));
            }
        }
        Ok(None)
    }
}

/// The order of candidates in the reverse topological power sort: smallest first.
#[derive(PartialEq, Eq)]
struct TieBreaker<'a> {
    power_level: UserPowerLevel,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    event_id: &'a EventId,
    event: u32,
}

impl Ord for TieBreaker<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        // The greater power level is the smaller.
        other
            .power_level
            .cmp(&self.power_level)
            .then(self.origin_server_ts.cmp(&other.origin_server_ts))
            .then(self.event_id.cmp(other.event_id))
    }
}

impl PartialOrd for TieBreaker<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn is_type_and_key(pdu: &Pdu, kind: &TimelineEventType) -> bool {
    pdu.kind == *kind && pdu.state_key.as_deref() == Some("")
}

fn not_found(event_id: &EventId) -> String {
    format!("event not found: {event_id}")
}

#[cfg(test)]
mod tests {
    //! Differential tests: this resolution against ruma's `state_res::resolve`, on generated
    //! forks of rooms of versions 6, 11 and 12 with every kind of power event, events that
    //! fail their checks, tied timestamps and, in some, events missing from the store.

    use std::collections::HashMap;

    use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
    use ruma::{
        RoomVersionId,
        events::StateEventType,
        room_version_rules::RoomVersionRules,
        state_res::{StateMap, utils::event_id_set::EventIdSet},
    };
    use serde_json::{Value, json};

    use super::*;
    use crate::rooms::ingest::auth_chain;

    /// The reference: the conflicted state subgraph as the old path computed it for ruma.
    fn reference_subgraph(
        conflicted: &StateMap<Vec<OwnedEventId>>,
        fetch: &impl Fn(&EventId) -> Option<Pdu>,
    ) -> EventIdSet<OwnedEventId> {
        let targets: HashSet<OwnedEventId> = conflicted.values().flatten().cloned().collect();
        let mut graph: HashMap<OwnedEventId, Vec<OwnedEventId>> = HashMap::new();
        let mut stack: Vec<OwnedEventId> = targets.iter().cloned().collect();
        while let Some(event_id) = stack.pop() {
            if graph.contains_key(&event_id) {
                continue;
            }
            let auth = fetch(&event_id).map(|pdu| pdu.auth_events).unwrap_or_default();
            stack.extend(auth.iter().cloned());
            graph.insert(event_id, auth);
        }
        let mut reaches = targets;
        loop {
            let before = reaches.len();
            for (event_id, auth) in &graph {
                if !reaches.contains(event_id) && auth.iter().any(|id| reaches.contains(id)) {
                    reaches.insert(event_id.clone());
                }
            }
            if reaches.len() == before {
                break;
            }
        }
        reaches.into_iter().filter(|id| graph.contains_key(id)).collect()
    }

    /// Ruma's resolution of the same states, over the same store.
    fn reference(
        rules: &RoomVersionRules,
        states: &[StringStateMap],
        store: &HashMap<OwnedEventId, Pdu>,
    ) -> Result<StringStateMap, String> {
        let fetch = |id: &EventId| store.get(id).cloned();
        let maps: Vec<StateMap<OwnedEventId>> = states
            .iter()
            .map(|state| {
                state
                    .iter()
                    .map(|((kind, key), id)| {
                        ((StateEventType::from(kind.as_str()), key.clone()), id.clone())
                    })
                    .collect()
            })
            .collect();
        let mut chains = Vec::new();
        for map in &maps {
            chains.push(
                auth_chain(map.values().cloned(), &fetch)?
                    .into_iter()
                    .collect::<EventIdSet<OwnedEventId>>(),
            );
        }
        let resolved = ruma::state_res::resolve(
            &rules.authorization,
            rules.state_res.v2_rules().expect("v2"),
            &maps,
            chains,
            fetch,
            |conflicted| Some(reference_subgraph(conflicted, &fetch)),
        )
        .map_err(|error| error.to_string())?;
        Ok(resolved.into_iter().map(|((kind, key), id)| ((kind.to_string(), key), id)).collect())
    }

    fn ours(
        rules: &RoomVersionRules,
        states: &[StringStateMap],
        store: &HashMap<OwnedEventId, Pdu>,
        chain_max: usize,
    ) -> Result<StringStateMap, String> {
        resolve(
            &rules.authorization,
            rules.state_res.v2_rules().expect("v2"),
            states,
            None,
            chain_max,
            |ids| ids.iter().map(|id| store.get(id).cloned()).collect(),
        )
    }

    /// A generated room: every event, and the state at each branch tip.
    struct Room {
        version: RoomVersionId,
        rules: RoomVersionRules,
        rng: StdRng,
        room_id: String,
        creator: String,
        users: Vec<String>,
        events: Vec<Pdu>,
        clock: u64,
    }

    type Branch = BTreeMap<(String, String), Pdu>;

    impl Room {
        fn user(&mut self) -> String {
            let users = self.users.clone();
            users.choose(&mut self.rng).expect("users").clone()
        }

        /// A new event on `branch`, citing the auth events its type needs from the branch's
        /// state (sometimes one too few), applied to the branch without any check.
        fn event(
            &mut self,
            branch: &mut Branch,
            kind: &str,
            state_key: &str,
            sender: &str,
            content: Value,
        ) -> Pdu {
            let v12 = self.version == RoomVersionId::V12;
            let mut auth: Vec<OwnedEventId> = Vec::new();
            if kind != "m.room.create" {
                let content_raw = serde_json::value::to_raw_value(&content).expect("json");
                let types = ruma::state_res::auth_types_for_event(
                    &TimelineEventType::from(kind),
                    <&ruma::UserId>::try_from(sender).expect("user id"),
                    Some(state_key),
                    &content_raw,
                    &self.rules.authorization,
                )
                .unwrap_or_default();
                for (kind, key) in types {
                    if let Some(pdu) = branch.get(&(kind.to_string(), key)) {
                        auth.push(pdu.event_id.clone());
                    }
                }
                // Sometimes one is missing, but never the create event: where an event does
                // not cite it, ruma's answer depends on its hash order (see
                // `power_level_for_sender`).
                let create = self.events.first().map(|pdu| pdu.event_id.clone());
                let droppable: Vec<usize> =
                    (0..auth.len()).filter(|&at| Some(&auth[at]) != create.as_ref()).collect();
                if self.rng.gen_bool(0.05) && !droppable.is_empty() {
                    auth.remove(droppable[self.rng.gen_range(0..droppable.len())]);
                }
                auth.shuffle(&mut self.rng);
            }
            // Few distinct timestamps, so that ties are broken by power and by id.
            self.clock += self.rng.gen_range(0..3);
            let mut object = json!({
                "sender": sender,
                "origin_server_ts": self.clock,
                "type": kind,
                "state_key": state_key,
                "content": content,
                "prev_events": [],
                "auth_events": auth,
                "depth": self.events.len() + 1,
            });
            if !(v12 && kind == "m.room.create") {
                object["room_id"] = json!(self.room_id);
            }
            let event_id = OwnedEventId::try_from(format!("$e{:016x}", self.rng.r#gen::<u64>()))
                .expect("event id");
            let pdu = Pdu::from_slice(event_id, object.to_string().as_bytes()).expect("parses");
            branch.insert((kind.to_owned(), state_key.to_owned()), pdu.clone());
            self.events.push(pdu.clone());
            pdu
        }

        fn random_event(&mut self, branch: &mut Branch) {
            let sender = if self.rng.gen_bool(0.2) { self.creator.clone() } else { self.user() };
            let target = self.user();
            match self.rng.gen_range(0..10) {
                0 | 1 => {
                    let mut users = serde_json::Map::new();
                    users.insert(self.creator.clone(), json!(100));
                    for user in self.users.clone() {
                        if self.rng.gen_bool(0.3) {
                            users.insert(user, json!(self.rng.gen_range(0..4) * 25));
                        }
                    }
                    let content = json!({
                        "users": users,
                        "users_default": 0,
                        "state_default": self.rng.gen_range(0..3) * 25,
                        "ban": self.rng.gen_range(1..4) * 25,
                        "kick": self.rng.gen_range(1..4) * 25,
                        "events_default": 0,
                    });
                    self.event(branch, "m.room.power_levels", "", &sender, content);
                }
                2 => {
                    let rule = if self.rng.gen_bool(0.5) { "public" } else { "invite" };
                    self.event(
                        branch,
                        "m.room.join_rules",
                        "",
                        &sender,
                        json!({"join_rule": rule}),
                    );
                }
                3 => {
                    self.event(
                        branch,
                        "m.room.member",
                        &target,
                        &sender,
                        json!({"membership": "ban"}),
                    );
                }
                4 => {
                    self.event(
                        branch,
                        "m.room.member",
                        &target,
                        &sender,
                        json!({"membership": "leave"}),
                    );
                }
                5 => {
                    self.event(
                        branch,
                        "m.room.member",
                        &target,
                        &sender,
                        json!({"membership": "invite"}),
                    );
                }
                6 | 7 => {
                    let name = format!("name {}", self.rng.r#gen::<u16>());
                    self.event(
                        branch,
                        "m.room.member",
                        &sender,
                        &sender,
                        json!({"membership": "join", "displayname": name}),
                    );
                }
                8 => {
                    self.event(
                        branch,
                        "m.room.member",
                        &sender,
                        &sender,
                        json!({"membership": "leave"}),
                    );
                }
                _ => {
                    let topic = format!("topic {}", self.rng.r#gen::<u16>());
                    self.event(branch, "m.room.topic", "", &sender, json!({"topic": topic}));
                }
            }
        }
    }

    /// A room of `version` built from `seed`: a common start, then `branches` that fork from
    /// each other at random points. Returns the room and the branch states.
    fn generate(version: RoomVersionId, seed: u64, size: usize) -> (Room, Vec<StringStateMap>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let users: Vec<String> = (0..rng.gen_range(3..8)).map(|i| format!("@u{i}:x")).collect();
        let creator = "@creator:x".to_owned();
        let mut room = Room {
            rules: version.rules().expect("known version"),
            version: version.clone(),
            rng,
            room_id: "!room:x".into(),
            creator: creator.clone(),
            users: users.clone(),
            events: Vec::new(),
            clock: 1_000,
        };
        let mut base = Branch::new();
        let create_content = if version == RoomVersionId::V12 {
            json!({"room_version": "12", "additional_creators": [users[0]]})
        } else if room.rules.authorization.use_room_create_sender {
            json!({"room_version": version.as_str()})
        } else {
            json!({"room_version": version.as_str(), "creator": creator})
        };
        let create = room.event(&mut base, "m.room.create", "", &creator, create_content);
        if version == RoomVersionId::V12 {
            room.room_id = format!("!{}", &create.event_id.as_str()[1..]);
        }
        room.event(&mut base, "m.room.member", &creator, &creator, json!({"membership": "join"}));
        let levels = json!({"users": {&creator: 100, &users[1]: 50}, "state_default": 50});
        room.event(&mut base, "m.room.power_levels", "", &creator, levels);
        room.event(&mut base, "m.room.join_rules", "", &creator, json!({"join_rule": "public"}));
        for user in &users {
            room.event(&mut base, "m.room.member", user, user, json!({"membership": "join"}));
        }
        let mut branches = vec![base];
        for _ in 0..size {
            let pick = room.rng.gen_range(0..branches.len());
            if branches.len() < 4 && room.rng.gen_bool(0.08) {
                let fork = branches[pick].clone();
                branches.push(fork);
                continue;
            }
            let mut branch = std::mem::take(&mut branches[pick]);
            room.random_event(&mut branch);
            branches[pick] = branch;
        }
        if branches.len() < 2 {
            let mut fork = branches[0].clone();
            for _ in 0..5 {
                room.random_event(&mut fork);
            }
            branches.push(fork);
        }
        let states = branches
            .iter()
            .map(|branch| {
                branch.iter().map(|(key, pdu)| (key.clone(), pdu.event_id.clone())).collect()
            })
            .collect();
        (room, states)
    }

    fn check_version(version: RoomVersionId, seeds: std::ops::Range<u64>) {
        let (mut differed, mut failed) = (0, 0);
        for seed in seeds {
            let size = 20 + (seed as usize * 37) % 120;
            let (mut room, states) = generate(version.clone(), seed, size);
            let mut store: HashMap<OwnedEventId, Pdu> =
                room.events.iter().map(|pdu| (pdu.event_id.clone(), pdu.clone())).collect();
            // Every fourth room misses a few events.
            if seed % 4 == 3 {
                for pdu in &room.events {
                    if room.rng.gen_bool(0.04) {
                        store.remove(&pdu.event_id);
                    }
                }
            }
            let expected = reference(&room.rules, &states, &store);
            let got = ours(&room.rules, &states, &store, 100_000);
            match (got, expected) {
                (Ok(got), Ok(expected)) => {
                    assert_eq!(got, expected, "room version {version}, seed {seed}");
                    if states.windows(2).any(|pair| pair[0] != pair[1]) {
                        differed += 1;
                    }
                }
                // Both fail (a power levels event of the mainline is missing): the messages
                // differ.
                (Err(_), Err(_)) => failed += 1,
                (got, expected) => {
                    panic!("room version {version}, seed {seed}: {got:?} but ruma {expected:?}")
                }
            }
        }
        assert!(differed > 100, "the generated forks conflict and resolve: {differed}");
        assert!(failed < 20, "few resolutions fail: {failed}");
    }

    #[test]
    fn resolves_as_ruma_does_in_room_version_6() {
        check_version(RoomVersionId::V6, 0..150);
    }

    #[test]
    fn resolves_as_ruma_does_in_room_version_11() {
        check_version(RoomVersionId::V11, 1_000..1_150);
    }

    #[test]
    fn resolves_as_ruma_does_in_room_version_12() {
        check_version(RoomVersionId::V12, 2_000..2_150);
    }

    #[test]
    fn an_auth_chain_longer_than_the_bound_is_an_error() {
        let (room, states) = generate(RoomVersionId::V11, 7, 60);
        let store: HashMap<OwnedEventId, Pdu> =
            room.events.iter().map(|pdu| (pdu.event_id.clone(), pdu.clone())).collect();
        assert!(ours(&room.rules, &states, &store, 100_000).is_ok());
        let error = ours(&room.rules, &states, &store, 3).expect_err("chains are longer than 3");
        assert!(error.contains("auth chain too long"), "{error}");
    }
}
