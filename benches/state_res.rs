//! S6 of the performance issue: state resolution on generated forks, through Hearth's own path
//! (`Rooms::resolve_states`: the events and their auth chains read from the store in batches,
//! then Hearth's own state resolution v2 over dense ids, `src/rooms/resolution.rs`).
//!
//! Each fork is a room of version 11 whose events are real signed PDUs stored in a RocksDB in a
//! temp dir: a create event, the creator's join, power levels, public join rules and `m` joined
//! users. From there two branches diverge: branch A raises one user's power level and changes
//! every user's display name, branch B raises another user's power level and has every user
//! leave. The two states then differ in `2m + 2` events (the conflicted state set), which is
//! the size each bench names: 10, 1,000 and 10,000.
//!
//! Run: `cargo bench --bench state_res` (criterion's `--quick` or `--sample-size` shorten it; a
//! filter such as `state_res/10$` runs one size). `hearth-bench S6` runs it and reads the
//! figures from criterion's output into the results that `hearth-bench docs` publishes.

use std::{collections::BTreeMap, hint::black_box, sync::Arc};

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use federation::ServerSigningKey;
use hearth::{notify::Notifier, rooms::Pdu, rooms::Rooms};
use ruma::{OwnedEventId, OwnedRoomId, RoomVersionId, canonical_json::to_canonical_value};
use serde_json::{Value, json};

/// The server's allocator, so that the figures are the server's: resolution allocates and
/// frees many small objects, which the system allocator makes several times slower.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The sizes of the conflicted state set the issue names.
const SIZES: [usize; 3] = [10, 1_000, 10_000];

const SERVER: &str = "bench.example";

type StateMap = BTreeMap<(String, String), OwnedEventId>;

/// A generated fork: the store holding its events and the two states to resolve.
struct Fork {
    rooms: Rooms,
    states: Vec<StateMap>,
    _dir: tempfile::TempDir,
}

/// Builds and stores signed events of one room.
struct Builder {
    rooms: Rooms,
    key: Arc<ServerSigningKey>,
    room_id: OwnedRoomId,
    timestamp: u64,
}

impl Builder {
    /// Signs, stores and returns a state event.
    fn state(
        &mut self,
        kind: &str,
        state_key: &str,
        sender: &str,
        content: Value,
        prev: &Pdu,
        auth: &[&Pdu],
    ) -> Pdu {
        self.event(kind, state_key, sender, content, Some(prev), auth)
    }

    fn event(
        &mut self,
        kind: &str,
        state_key: &str,
        sender: &str,
        content: Value,
        prev: Option<&Pdu>,
        auth: &[&Pdu],
    ) -> Pdu {
        self.timestamp += 1;
        let value = json!({
            "room_id": self.room_id,
            "sender": sender,
            "origin_server_ts": self.timestamp,
            "type": kind,
            "state_key": state_key,
            "content": content,
            "prev_events": prev.map(|pdu| vec![pdu.event_id.clone()]).unwrap_or_default(),
            "auth_events": auth.iter().map(|pdu| pdu.event_id.clone()).collect::<Vec<_>>(),
            "depth": prev.map_or(1, |pdu| pdu.depth + 1),
        });
        let ruma::CanonicalJsonValue::Object(mut object) =
            to_canonical_value(value).expect("generated events are canonical JSON")
        else {
            unreachable!("an object")
        };
        let event_id =
            self.key.hash_and_sign_pdu(&mut object, &RoomVersionId::V11).expect("signing");
        let pdu = Pdu::from_json(event_id, object).expect("a generated event parses");
        self.rooms.store_outlier(&pdu).expect("storing a generated event");
        pdu
    }
}

fn user(index: usize) -> String {
    format!("@user{index}:{SERVER}")
}

fn state_key_of(pdu: &Pdu) -> (String, String) {
    (pdu.kind.to_string(), pdu.state_key.clone().unwrap_or_default())
}

/// A fork whose two states differ in `conflicted` events (`conflicted` is even and at least 4).
fn fork(conflicted: usize) -> Fork {
    let members = (conflicted - 2) / 2;
    let dir = tempfile::tempdir().expect("a temp dir");
    let db = storage::Db::open(&dir.path().join("db")).expect("opening RocksDB");
    let key = Arc::new(
        ServerSigningKey::load_or_generate(
            &dir.path().join("signing.key"),
            SERVER.try_into().expect("a server name"),
        )
        .expect("a signing key"),
    );
    let rooms = Rooms::new(
        db.clone(),
        key.clone(),
        RoomVersionId::V11,
        Notifier::new(),
        hearth::outbox::Outbox::new(db.clone()),
        hearth::rooms::ingest::Limits::default(),
    );
    let room_id: OwnedRoomId = format!("!bench:{SERVER}").try_into().expect("a room id");
    let mut builder = Builder { rooms: rooms.clone(), key, room_id, timestamp: 1_000_000 };
    let creator = format!("@creator:{SERVER}");

    let create =
        builder.event("m.room.create", "", &creator, json!({"room_version": "11"}), None, &[]);
    let creator_join = builder.state(
        "m.room.member",
        &creator,
        &creator,
        json!({"membership": "join"}),
        &create,
        &[&create],
    );
    let power_levels = |extra: Option<usize>| {
        let mut users = serde_json::Map::new();
        users.insert(creator.clone(), json!(100));
        if let Some(index) = extra {
            users.insert(user(index), json!(50));
        }
        json!({
            "users": users, "users_default": 0, "events_default": 0, "state_default": 50,
            "ban": 50, "kick": 50, "redact": 50, "invite": 0,
        })
    };
    let levels = builder.state(
        "m.room.power_levels",
        "",
        &creator,
        power_levels(None),
        &creator_join,
        &[&create, &creator_join],
    );
    let join_rules = builder.state(
        "m.room.join_rules",
        "",
        &creator,
        json!({"join_rule": "public"}),
        &levels,
        &[&create, &creator_join, &levels],
    );
    let mut base: StateMap = [&create, &creator_join, &levels, &join_rules]
        .into_iter()
        .map(|pdu| (state_key_of(pdu), pdu.event_id.clone()))
        .collect();
    let mut last = join_rules.clone();
    let mut joins = Vec::with_capacity(members);
    for index in 0..members {
        let join = builder.state(
            "m.room.member",
            &user(index),
            &user(index),
            json!({"membership": "join", "displayname": format!("user {index}")}),
            &last,
            &[&create, &levels, &join_rules],
        );
        base.insert(state_key_of(&join), join.event_id.clone());
        last = join.clone();
        joins.push(join);
    }

    // Branch A: a power level change, then a display name change of every member.
    let mut state_a = base.clone();
    let levels_a = builder.state(
        "m.room.power_levels",
        "",
        &creator,
        power_levels(Some(0)),
        &last,
        &[&create, &creator_join, &levels],
    );
    state_a.insert(state_key_of(&levels_a), levels_a.event_id.clone());
    let mut prev = levels_a.clone();
    for (index, join) in joins.iter().enumerate() {
        let rename = builder.state(
            "m.room.member",
            &user(index),
            &user(index),
            json!({"membership": "join", "displayname": format!("renamed {index}")}),
            &prev,
            &[&create, &levels_a, &join_rules, join],
        );
        state_a.insert(state_key_of(&rename), rename.event_id.clone());
        prev = rename;
    }

    // Branch B: another power level change, then every member leaves.
    let mut state_b = base;
    let levels_b = builder.state(
        "m.room.power_levels",
        "",
        &creator,
        power_levels(Some(members.saturating_sub(1))),
        &last,
        &[&create, &creator_join, &levels],
    );
    state_b.insert(state_key_of(&levels_b), levels_b.event_id.clone());
    let mut prev = levels_b.clone();
    for (index, join) in joins.iter().enumerate() {
        let leave = builder.state(
            "m.room.member",
            &user(index),
            &user(index),
            json!({"membership": "leave"}),
            &prev,
            &[&create, &levels_b, join],
        );
        state_b.insert(state_key_of(&leave), leave.event_id.clone());
        prev = leave;
    }
    let differing = state_a.iter().filter(|(key, id)| state_b.get(*key) != Some(id)).count();
    assert_eq!(differing * 2, conflicted, "the fork has the conflicted set it names");
    Fork { rooms, states: vec![state_a, state_b], _dir: dir }
}

fn state_res(criterion: &mut Criterion) {
    let rules = RoomVersionId::V11.rules().expect("room version 11 is known");
    let mut group = criterion.benchmark_group("state_res");
    group.sample_size(10);
    for size in SIZES {
        // Built once, and only when this size runs (criterion's filter skips the closure, and
        // calls it again for each sample).
        let mut built: Option<Fork> = None;
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |bencher, &size| {
            let fork = built.get_or_insert_with(|| {
                let fork = fork(size);
                let resolved = fork.rooms.resolve_states(&rules, fork.states.clone(), None);
                let resolved = resolved.expect("the fork resolves");
                assert!(resolved.len() >= fork.states[0].len(), "resolution keeps every key");
                fork
            });
            // The states are copied outside the measured time: the server passes its own.
            bencher.iter_batched(
                || fork.states.clone(),
                |states| black_box(fork.rooms.resolve_states(&rules, black_box(states), None)),
                BatchSize::LargeInput,
            );
        });
    }
    group.finish();
}

criterion_group!(benches, state_res);
criterion_main!(benches);
