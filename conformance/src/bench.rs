//! Load scenarios of `hearth-bench`: each drives one running homeserver through the standard
//! client-server API only, so the same code measures Hearth and Synapse, and returns named
//! figures. The binary runs them against both servers in one run and prints the ratios.
//!
//! - S1 send throughput: 1 and 10 concurrent senders into one room.
//! - S2 delivery latency: clients long-polling `/sync` in one room while messages arrive at a
//!   fixed rate; latency from the start of the send request to the arrival in each client.
//! - S3 initial sync: a user in many rooms with members and history, with lazy-loaded members
//!   and timeline limits 1, 5 and 20, and once with full member state.
//! - S4 footprint: resident memory idle and after load, start-up time empty and with data.
//! - S5 federation ingest: a synthetic signing peer (`peer.rs`) joins a room over federation,
//!   fills it with state, and sends messages in transactions of 50; PDUs accepted per second.
//! - S6 state resolution: criterion benches in the workspace (`benches/state_res.rs`); the
//!   binary runs them and reads criterion's estimates.
//! - S7 disk: database bytes per message sent, read at rest (after a graceful restart).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use futures::stream::{self, StreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use ruma::{CanonicalJsonObject, RoomVersionId};

use crate::client::{Ctx, User, enc, room_path, v3};
use crate::launcher::Launched;
use crate::peer::{self, Peer, SignedRequest};

/// Which way a figure is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    /// More is better (throughput).
    Higher,
    /// Less is better (latency, memory, bytes).
    Lower,
}

/// One measured figure of one scenario on one server.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Figure {
    /// `S1`..`S7`.
    pub scenario: String,
    /// What was measured, e.g. `10 senders: messages/s`.
    pub metric: String,
    /// The value, in the unit the metric names.
    pub value: f64,
    /// Which way is better.
    pub better: Better,
}

impl Figure {
    /// A figure of `scenario`.
    pub fn new(scenario: &str, metric: impl Into<String>, value: f64, better: Better) -> Self {
        Self { scenario: scenario.to_owned(), metric: metric.into(), value, better }
    }
}

/// Sizes of the scenarios; `smoke()` is a few seconds in all, `Default` is the documented run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sizes {
    /// S1: messages per run (split among the senders).
    pub s1_messages: usize,
    /// S1: the concurrency levels.
    pub s1_senders: Vec<usize>,
    /// S2: clients long-polling `/sync`.
    pub s2_clients: usize,
    /// S2: how many rooms the clients are spread over, one measurement for each.
    #[serde(default = "one_room")]
    pub s2_rooms: Vec<usize>,
    /// S2: messages per second sent into the room.
    pub s2_rate: u32,
    /// S2: how long messages are sent.
    pub s2_seconds: u32,
    /// S3: rooms the measured user is in.
    pub s3_rooms: usize,
    /// S3: members of each room (the measured user included).
    pub s3_members: usize,
    /// S3: messages of history in each room.
    pub s3_history: usize,
    /// S7: messages sent to measure disk use.
    pub s7_messages: usize,
    /// S5: state events the peer adds to the room before the messages.
    #[serde(default)]
    pub s5_state: usize,
    /// S5: messages the peer sends, in transactions of 50.
    #[serde(default)]
    pub s5_messages: usize,
}

/// What results files from before `s2_rooms` measured.
fn one_room() -> Vec<usize> {
    vec![1]
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            s1_messages: 2000,
            s1_senders: vec![1, 10],
            s2_clients: 1000,
            s2_rooms: vec![1, 100],
            s2_rate: 50,
            s2_seconds: 20,
            s3_rooms: 50,
            s3_members: 50,
            s3_history: 20,
            s7_messages: 5000,
            s5_state: 30_000,
            s5_messages: 5000,
        }
    }
}

impl Sizes {
    /// A run of a few seconds that only proves the tool works.
    pub fn smoke() -> Self {
        Self {
            s1_messages: 40,
            s1_senders: vec![1, 4],
            s2_clients: 5,
            s2_rooms: vec![1, 2],
            s2_rate: 20,
            s2_seconds: 2,
            s3_rooms: 3,
            s3_members: 3,
            s3_history: 3,
            s7_messages: 50,
            s5_state: 50,
            s5_messages: 100,
        }
    }
}

/// The value at quantile `q` (0..=1) of sorted samples, or 0 when there are none.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn sorted(mut samples: Vec<f64>) -> Vec<f64> {
    samples.sort_by(f64::total_cmp);
    samples
}

/// Registers `count` users, `concurrency` at a time.
async fn users(ctx: &Ctx, stem: &str, count: usize) -> Result<Vec<User>> {
    stream::iter(0..count)
        .map(|_| ctx.user_named(stem))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Creates a public room owned by `owner` and joins `members` to it.
async fn room_with(owner: &User, members: &[User]) -> Result<String> {
    let room_id = owner
        .create_room(json!({"preset": "public_chat", "name": "bench"}))
        .await
        .context("creating the room")?;
    let joined: Vec<Result<String>> =
        stream::iter(members).map(|user| user.join(&room_id)).buffer_unordered(8).collect().await;
    for result in joined {
        result.context("joining the room")?;
    }
    Ok(room_id)
}

/// Sends one text message with a unique transaction id and returns its latency.
async fn send_one(user: &User, room_id: &str, body: &str) -> Result<Duration> {
    let txn = user.ctx.unique("t");
    let path = room_path(room_id, &format!("/send/m.room.message/{}", enc(&txn)));
    let started = Instant::now();
    user.put(&path, json!({"msgtype": "m.text", "body": body})).await?.ok()?;
    Ok(started.elapsed())
}

/// S1: send throughput with each concurrency level of `sizes.s1_senders`.
pub async fn s1_send(ctx: &Ctx, sizes: &Sizes) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for &senders in &sizes.s1_senders {
        let owner = ctx.user_named("s1owner").await?;
        let others = users(ctx, "s1sender", senders.saturating_sub(1)).await?;
        let room_id = room_with(&owner, &others).await?;
        let mut all = vec![owner];
        all.extend(others);
        let per_sender = sizes.s1_messages / senders.max(1);
        let started = Instant::now();
        let latencies: Vec<Result<Vec<f64>>> = stream::iter(all)
            .map(|user| {
                let room_id = room_id.clone();
                async move {
                    let mut latencies = Vec::with_capacity(per_sender);
                    for index in 0..per_sender {
                        let latency = send_one(&user, &room_id, &format!("s1 {index}")).await?;
                        latencies.push(millis(latency));
                    }
                    Ok(latencies)
                }
            })
            .buffer_unordered(senders)
            .collect()
            .await;
        let elapsed = started.elapsed();
        let mut samples = Vec::new();
        for result in latencies {
            samples.extend(result?);
        }
        let samples = sorted(samples);
        let label = if senders == 1 { "1 sender".to_owned() } else { format!("{senders} senders") };
        figures.push(Figure::new(
            "S1",
            format!("{label}: messages/s"),
            samples.len() as f64 / elapsed.as_secs_f64(),
            Better::Higher,
        ));
        figures.push(Figure::new(
            "S1",
            format!("{label}: p50 latency ms"),
            quantile(&samples, 0.5),
            Better::Lower,
        ));
        figures.push(Figure::new(
            "S1",
            format!("{label}: p99 latency ms"),
            quantile(&samples, 0.99),
            Better::Lower,
        ));
    }
    Ok(figures)
}

/// A `/sync` filter that keeps answers small: room timelines only, no presence.
fn lean_filter(timeline_limit: u32) -> Value {
    json!({
        "presence": {"not_types": ["*"]},
        "account_data": {"not_types": ["*"]},
        "room": {
            "timeline": {"limit": timeline_limit},
            "state": {"lazy_load_members": true},
            "ephemeral": {"not_types": ["*"]},
            "account_data": {"not_types": ["*"]},
        },
    })
}

fn sync_path(filter: &Value, since: Option<&str>, timeout_ms: u64) -> String {
    let mut path =
        format!("{}?filter={}&timeout={timeout_ms}", v3("/sync"), enc(&filter.to_string()));
    if let Some(since) = since {
        path.push_str(&format!("&since={}", enc(since)));
    }
    path
}

/// S2: delivery latency to clients long-polling `/sync`, for each room count of
/// `sizes.s2_rooms`: the clients are spread over the rooms, and the messages go to the rooms in
/// turn.
pub async fn s2_delivery(ctx: &Ctx, sizes: &Sizes) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for &rooms in &sizes.s2_rooms {
        figures.extend(s2_delivery_in(ctx, sizes, rooms.max(1)).await?);
    }
    Ok(figures)
}

async fn s2_delivery_in(ctx: &Ctx, sizes: &Sizes, rooms: usize) -> Result<Vec<Figure>> {
    let owner = ctx.user_named("s2sender").await?;
    let clients = users(ctx, "s2client", sizes.s2_clients).await?;
    // Client i is in room i % rooms; so is message k.
    let mut room_ids = Vec::with_capacity(rooms);
    for room in 0..rooms {
        let members: Vec<User> = clients.iter().skip(room).step_by(rooms).cloned().collect();
        room_ids.push(room_with(&owner, &members).await?);
    }
    let filter = lean_filter(50);
    let total = (sizes.s2_rate * sizes.s2_seconds) as usize;
    ensure!(total >= rooms, "S2: {total} messages cannot reach {rooms} rooms");
    // When each message's send request started, by its body.
    let sent_at: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; total]));
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(sizes.s2_clients.max(1));
    let deadline = Instant::now() + Duration::from_secs(u64::from(sizes.s2_seconds) + 120);

    let mut tasks = Vec::new();
    for (index, client) in clients.into_iter().enumerate() {
        let room = index % rooms;
        // The last message this client's room gets.
        let last = (0..total).rev().find(|message| message % rooms == room).unwrap_or(0);
        let (filter, room_id, sent_at, latencies, ready_tx) = (
            filter.clone(),
            room_ids[room].clone(),
            sent_at.clone(),
            latencies.clone(),
            ready_tx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let first = client.get(&sync_path(&filter, None, 0)).await?.ok()?;
            let mut since = first["next_batch"].as_str().unwrap_or_default().to_owned();
            let _ = ready_tx.send(()).await;
            let mut received = 0usize;
            let mut seen_last = false;
            let pointer = format!(
                "/rooms/join/{}/timeline/events",
                room_id.replace('~', "~0").replace('/', "~1")
            );
            while !seen_last && Instant::now() < deadline {
                let answer = client.get(&sync_path(&filter, Some(&since), 10_000)).await?.ok()?;
                let arrived = Instant::now();
                since = answer["next_batch"].as_str().unwrap_or_default().to_owned();
                let events =
                    answer.pointer(&pointer).and_then(Value::as_array).cloned().unwrap_or_default();
                for event in events {
                    let Some(index) = event["content"]["body"]
                        .as_str()
                        .and_then(|body| body.strip_prefix("s2 "))
                        .and_then(|index| index.parse::<usize>().ok())
                    else {
                        continue;
                    };
                    received += 1;
                    seen_last |= index == last;
                    if let Some(Some(sent)) = sent_at.lock().await.get(index) {
                        latencies.lock().await.push(millis(arrived.duration_since(*sent)));
                    }
                }
            }
            anyhow::Ok(received)
        }));
    }
    drop(ready_tx);
    for _ in 0..sizes.s2_clients {
        if ready_rx.recv().await.is_none() {
            for task in tasks {
                task.await??;
            }
            bail!("a client stopped before its first sync");
        }
    }
    // Let every client's long poll reach the server.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let interval = Duration::from_secs_f64(1.0 / f64::from(sizes.s2_rate.max(1)));
    let mut ticker = tokio::time::interval(interval);
    let mut sends = Vec::new();
    for index in 0..total {
        ticker.tick().await;
        let (owner, room_id, sent_at) =
            (owner.clone(), room_ids[index % rooms].clone(), sent_at.clone());
        sends.push(tokio::spawn(async move {
            sent_at.lock().await[index] = Some(Instant::now());
            send_one(&owner, &room_id, &format!("s2 {index}")).await
        }));
    }
    for send in sends {
        send.await??;
    }
    let mut delivered = 0usize;
    for task in tasks {
        delivered += task.await??;
    }
    // Each message is for the clients of its room.
    let expected: usize =
        (0..total).map(|message| (message % rooms..sizes.s2_clients).step_by(rooms).len()).sum();
    let samples = sorted(std::mem::take(&mut *latencies.lock().await));
    let label = if rooms == 1 {
        format!("{} clients, {}/s", sizes.s2_clients, sizes.s2_rate)
    } else {
        format!("{} clients in {rooms} rooms, {}/s", sizes.s2_clients, sizes.s2_rate)
    };
    Ok(vec![
        Figure::new(
            "S2",
            format!("{label}: % delivered through sync"),
            100.0 * delivered as f64 / expected.max(1) as f64,
            Better::Higher,
        ),
        Figure::new(
            "S2",
            format!("{label}: p50 delivery ms"),
            quantile(&samples, 0.5),
            Better::Lower,
        ),
        Figure::new(
            "S2",
            format!("{label}: p99 delivery ms"),
            quantile(&samples, 0.99),
            Better::Lower,
        ),
    ])
}

/// S3: initial sync of a user in many rooms with members and history.
pub async fn s3_initial_sync(ctx: &Ctx, sizes: &Sizes) -> Result<Vec<Figure>> {
    let user = ctx.user_named("s3user").await?;
    let members = users(ctx, "s3member", sizes.s3_members.saturating_sub(1)).await?;
    let rooms: Vec<Result<String>> = stream::iter(0..sizes.s3_rooms)
        .map(|_| {
            let (user, members) = (&user, &members);
            async move {
                let room_id = room_with(user, members).await?;
                for index in 0..sizes.s3_history {
                    let sender = &members.get(index % members.len().max(1)).unwrap_or(user);
                    send_one(sender, &room_id, &format!("s3 {index}")).await?;
                }
                Ok(room_id)
            }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    for room in rooms {
        room?;
    }
    let mut figures = Vec::new();
    let mut cases: Vec<(String, Value)> = [1u32, 5, 20]
        .iter()
        .map(|&limit| (format!("lazy members, timeline {limit}: ms"), lean_filter(limit)))
        .collect();
    let mut full = lean_filter(20);
    full["room"]["state"]["lazy_load_members"] = json!(false);
    cases.push(("full member state, timeline 20: ms".to_owned(), full));
    for (label, filter) in cases {
        let mut samples = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            let answer = user.get(&sync_path(&filter, None, 0)).await?.ok()?;
            samples.push(millis(started.elapsed()));
            let joined = answer["rooms"]["join"].as_object().map_or(0, serde_json::Map::len);
            ensure!(joined == sizes.s3_rooms, "initial sync listed {joined} joined rooms");
        }
        let label = format!("{}x{} rooms, {label}", sizes.s3_rooms, sizes.s3_members);
        figures.push(Figure::new("S3", label, quantile(&sorted(samples), 0.5), Better::Lower));
    }
    Ok(figures)
}

/// S7: database bytes per message, at rest: the server is stopped gracefully and started
/// again before each reading, so what is counted is what the database keeps (RocksDB's
/// compressed tables, SQLite's file after its write-ahead log is checkpointed), not a
/// write-ahead log or a memtable of the moment.
pub async fn s7_disk(ctx: &Ctx, sizes: &Sizes, launched: &mut Launched) -> Result<Vec<Figure>> {
    let owner = ctx.user_named("s7owner").await?;
    let others = users(ctx, "s7sender", 9).await?;
    let room_id = room_with(&owner, &others).await?;
    let mut all = vec![owner];
    all.extend(others);
    launched.restart().await?;
    let before = database_bytes(&launched.database_dir)?;
    let per_sender = sizes.s7_messages / all.len();
    let body = "The quick brown fox jumps over the lazy dog, a message of about a hundred bytes.";
    let results: Vec<Result<()>> = stream::iter(all.iter())
        .map(|user| {
            let room_id = room_id.clone();
            async move {
                for _ in 0..per_sender {
                    send_one(user, &room_id, body).await?;
                }
                Ok(())
            }
        })
        .buffer_unordered(10)
        .collect()
        .await;
    for result in results {
        result?;
    }
    launched.restart().await?;
    let after = database_bytes(&launched.database_dir)?;
    let sent = (per_sender * all.len()) as f64;
    Ok(vec![Figure::new(
        "S7",
        format!("{} messages: database bytes per message", per_sender * all.len()),
        after.saturating_sub(before) as f64 / sent,
        Better::Lower,
    )])
}

/// Bytes of a server's database: Synapse's `homeserver.db*` files when the directory holds
/// them, else every file under the directory (Hearth's RocksDB).
pub fn database_bytes(dir: &Path) -> Result<u64> {
    let synapse = dir.join("homeserver.db").exists();
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).with_context(|| current.display().to_string())? {
            let entry = entry?;
            let metadata = entry.metadata()?;
            if metadata.is_dir() {
                if !synapse {
                    pending.push(entry.path());
                }
            } else if !synapse || entry.file_name().to_string_lossy().starts_with("homeserver.db") {
                total += metadata.len();
            }
        }
    }
    Ok(total)
}

/// Resident memory of a process in MiB, from `/proc/<pid>/status`.
pub fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).context("no VmRSS line")?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS without a value")?
        .parse()
        .context("VmRSS value")?;
    if kib <= 0.0 {
        bail!("VmRSS is {kib}");
    }
    Ok(kib / 1024.0)
}

/// PDUs per transaction, the most a transaction may carry
/// ([transactions](https://spec.matrix.org/v1.16/server-server-api/#transactions)).
const PDUS_PER_TRANSACTION: usize = 50;

/// The peer's view of the room it joined: what the next PDU references.
struct PeerRoom {
    room_id: String,
    room_version: RoomVersionId,
    sender: String,
    create_id: String,
    power_levels_id: String,
    member_id: String,
    prev_id: String,
    depth: u64,
}

impl PeerRoom {
    /// The next PDU of the peer's user, following the last one, signed.
    fn next(
        &mut self,
        peer: &Peer,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
    ) -> Result<CanonicalJsonObject> {
        self.depth += 1;
        let mut pdu = json!({
            "room_id": self.room_id,
            "sender": self.sender,
            "origin_server_ts": peer::now_ms(),
            "type": kind,
            "content": content,
            "prev_events": [self.prev_id],
            "auth_events": [self.create_id, self.power_levels_id, self.member_id],
            "depth": self.depth,
        });
        if let Some(state_key) = state_key {
            pdu["state_key"] = json!(state_key);
        }
        let mut pdu = peer::object(pdu)?;
        self.prev_id = peer.hash_and_sign(&mut pdu, &self.room_version)?;
        Ok(pdu)
    }
}

/// The server under test as the peer addresses it: its URL and its server name.
pub struct FederationTarget<'a> {
    /// Where its federation API answers (plain HTTP on loopback).
    pub base_url: &'a str,
    /// Its server name, the `destination` of signed requests.
    pub server_name: &'a str,
}

impl FederationTarget<'_> {
    /// A request to this server signed by `peer`, ready for [`Peer::send`].
    fn signed(
        &self,
        peer: &Peer,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<SignedRequest> {
        peer.sign_request(self.base_url, self.server_name, method, path, body)
    }
}

/// Joins the peer's user to a public room of the server under test with `make_join` and
/// `send_join` v2 ([joining rooms](https://spec.matrix.org/v1.16/server-server-api/#joining-rooms)).
async fn peer_join(
    ctx: &Ctx,
    peer: &Peer,
    target: &FederationTarget<'_>,
    localpart: &str,
) -> Result<(PeerRoom, User)> {
    let owner = ctx.user_named("s5owner").await?;
    let sender = peer.user_id(localpart);
    let mut users = serde_json::Map::new();
    users.insert(owner.user_id.clone(), json!(100));
    users.insert(sender.clone(), json!(100));
    let room_id = owner
        .create_room(json!({
            "preset": "public_chat",
            "room_version": "11",
            "power_level_content_override": {"users": users},
        }))
        .await
        .context("creating the room")?;
    Ok((join_as(peer, target, &room_id, localpart).await?.0, owner))
}

/// Joins the peer's user `localpart` to a public room of the server under test
/// (`make_join`, sign, `send_join` v2); also returns how many state events the answer held.
async fn join_as(
    peer: &Peer,
    target: &FederationTarget<'_>,
    room_id: &str,
    localpart: &str,
) -> Result<(PeerRoom, usize)> {
    let room_id = room_id.to_owned();
    let sender = peer.user_id(localpart);
    let path =
        format!("/_matrix/federation/v1/make_join/{}/{}?ver=11", enc(&room_id), enc(&sender));
    let make_join = target.signed(peer, reqwest::Method::GET, &path, None)?;
    let (status, answer) = peer.send(&make_join).await?;
    ensure!(status == 200, "make_join: {status} {}", crate::client::short(&answer));
    let room_version = RoomVersionId::try_from(answer["room_version"].as_str().unwrap_or("1"))
        .context("make_join: room version")?;
    let mut template = answer["event"].clone();
    template["origin_server_ts"] = json!(peer::now_ms());
    let depth = template["depth"].as_u64().context("make_join: no depth")?;
    let mut join = peer::object(template)?;
    let member_id = peer.hash_and_sign(&mut join, &room_version)?;
    let path = format!("/_matrix/federation/v2/send_join/{}/{}", enc(&room_id), enc(&member_id));
    let body = serde_json::to_value(&join)?;
    let send_join = target.signed(peer, reqwest::Method::PUT, &path, Some(&body))?;
    let (status, answer) = peer.send(&send_join).await?;
    ensure!(status == 200, "send_join: {status} {}", crate::client::short(&answer));
    let (mut create_id, mut power_levels_id) = (None, None);
    let state = answer["state"].as_array().context("send_join: no state")?;
    for pdu in state {
        let id = peer::event_id_of(&peer::object(pdu.clone())?, &room_version)?;
        match pdu["type"].as_str() {
            Some("m.room.create") => create_id = Some(id),
            Some("m.room.power_levels") => power_levels_id = Some(id),
            _ => {}
        }
    }
    let room = PeerRoom {
        room_id,
        room_version,
        sender,
        create_id: create_id.context("send_join: no create event in the state")?,
        power_levels_id: power_levels_id.context("send_join: no power levels in the state")?,
        prev_id: member_id.clone(),
        member_id,
        depth,
    };
    Ok((room, state.len()))
}

/// What sending PDUs in transactions gave: accepted, failed, and the first error seen (by the
/// per-PDU results), when the first transaction went out, and when the server showed the
/// last PDU (if it did).
struct Sent {
    accepted: usize,
    failed: usize,
    first_error: Option<String>,
    started: Instant,
    last_seen: Option<Instant>,
}

/// How many of the sent PDUs the server under test holds, and since when: at once when it
/// showed the last one (`last_seen`); else it may have dropped queued PDUs (Synapse does when
/// its queue is long) and never got them all back, so what it holds once `count` has not
/// grown for 30 s is what it took, as of the last growth.
async fn settle<F: std::future::Future<Output = Result<usize>>>(
    last_seen: Option<Instant>,
    count: impl Fn() -> F,
) -> Result<(usize, Instant)> {
    if let Some(at) = last_seen {
        return Ok((count().await?, at));
    }
    const STALL: Duration = Duration::from_secs(30);
    let (mut last_count, mut last_growth) = (0, Instant::now());
    loop {
        let now = count().await?;
        if now > last_count {
            (last_count, last_growth) = (now, Instant::now());
        } else if last_growth.elapsed() > STALL {
            return Ok((last_count, last_growth));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Polls until `event_id` is visible to `viewer`, for at most `limit`; whether it became so.
async fn wait_visible(
    viewer: &User,
    room_id: &str,
    event_id: &str,
    limit: Duration,
) -> Result<bool> {
    let deadline = Instant::now() + limit;
    let path = room_path(room_id, &format!("/event/{}", enc(event_id)));
    while Instant::now() < deadline {
        if viewer.get(&path).await?.status == 200 {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(false)
}

/// How many of the room's current state events are of `kind`, as `viewer` sees them.
async fn state_count(viewer: &User, room_id: &str, kind: &str) -> Result<usize> {
    let state = viewer.get(&room_path(room_id, "/state")).await?.ok()?;
    Ok(state.as_array().into_iter().flatten().filter(|event| event["type"] == kind).count())
}

/// How many messages of the room's timeline have a body starting with `prefix`.
async fn message_count(viewer: &User, room_id: &str, prefix: &str) -> Result<usize> {
    let mut count = 0;
    let mut from: Option<String> = None;
    loop {
        let mut path = "/messages?dir=b&limit=1000".to_owned();
        if let Some(from) = &from {
            path.push_str(&format!("&from={}", enc(from)));
        }
        let page = viewer.get(&room_path(room_id, &path)).await?.ok()?;
        let chunk = page["chunk"].as_array().cloned().unwrap_or_default();
        count += chunk
            .iter()
            .filter(|event| {
                event["content"]["body"].as_str().is_some_and(|b| b.starts_with(prefix))
            })
            .count();
        match page["end"].as_str() {
            Some(end) if !chunk.is_empty() => from = Some(end.to_owned()),
            _ => return Ok(count),
        }
    }
}

/// Sends `count` PDUs made by `make` in transactions of 50, one transaction at a time, the
/// next once `viewer` sees the last PDU of the one before (or 30 s passed), and checks every
/// per-PDU result
/// ([`PUT /send/{txnId}`](https://spec.matrix.org/v1.16/server-server-api/#put_matrixfederationv1sendtxnid)).
async fn send_pdus(
    peer: &Peer,
    target: &FederationTarget<'_>,
    viewer: &User,
    room: &mut PeerRoom,
    count: usize,
    mut make: impl FnMut(&mut PeerRoom, usize) -> Result<CanonicalJsonObject>,
) -> Result<Sent> {
    let mut sent = Sent {
        accepted: 0,
        failed: 0,
        first_error: None,
        started: Instant::now(),
        last_seen: None,
    };
    // Every PDU is made and signed before the first transaction goes out, so the time
    // measured is the server's, not this tool's signing.
    let mut batches: Vec<(Vec<Value>, Vec<String>)> = Vec::new();
    let mut index = 0;
    while index < count {
        let (mut pdus, mut ids) = (Vec::new(), Vec::new());
        while index < count && pdus.len() < PDUS_PER_TRANSACTION {
            let pdu = make(room, index)?;
            ids.push(room.prev_id.clone());
            pdus.push(serde_json::to_value(&pdu)?);
            index += 1;
        }
        batches.push((pdus, ids));
    }
    // So is every transaction, with its X-Matrix signature: the signature covers the body,
    // and making and signing 50 PDUs' worth of canonical JSON is the tool's work.
    let mut signed = Vec::with_capacity(batches.len());
    for (transactions, (pdus, ids)) in (1u64..).zip(batches) {
        let body = json!({
            "origin": peer.server_name(),
            "origin_server_ts": peer::now_ms(),
            "pdus": pdus,
            "edus": [],
        });
        let path = peer.transaction_path(transactions);
        let request = target.signed(peer, reqwest::Method::PUT, &path, Some(&body))?;
        signed.push((request, ids));
    }
    sent.started = Instant::now();
    for (request, ids) in signed {
        let (status, answer) = peer.send(&request).await?;
        ensure!(status == 200, "send transaction: {status} {}", crate::client::short(&answer));
        // The next transaction waits until the server holds this one's last PDU: a server
        // that answers before processing (Synapse) would otherwise get a queue it prunes.
        if let Some(last) = ids.last() {
            let seen = wait_visible(viewer, &room.room_id, last, Duration::from_secs(30)).await?;
            sent.last_seen = seen.then(Instant::now);
        }
        for id in ids {
            match answer["pdus"].get(&id) {
                Some(result) if result.get("error").is_none() => sent.accepted += 1,
                other => {
                    sent.failed += 1;
                    if sent.first_error.is_none() {
                        sent.first_error = Some(format!(
                            "{id}: {}",
                            other.map_or("no result".to_owned(), |value| value.to_string())
                        ));
                    }
                }
            }
        }
    }
    Ok(sent)
}

/// S5: federation ingest. The synthetic peer joins a public room of the server under test,
/// adds `s5_state` state events to it, then sends `s5_messages` messages in transactions of
/// 50 as fast as the answers come; the figure is the rate of PDUs the server accepted.
pub async fn s5_federation_ingest(
    ctx: &Ctx,
    sizes: &Sizes,
    peer: &Peer,
    target: &FederationTarget<'_>,
) -> Result<Vec<Figure>> {
    const STATE_TYPE: &str = "org.hearth.bench.state";
    let (mut room, owner) = peer_join(ctx, peer, target, "s5peer").await?;
    let mut state = send_pdus(peer, target, &owner, &mut room, sizes.s5_state, |room, index| {
        let key = format!("key{index}");
        room.next(peer, STATE_TYPE, Some(&key), json!({"index": index}))
    })
    .await
    .context("sending the state events")?;
    // The time runs until the server shows the last PDU; what counts as accepted is what is
    // in the room then, whatever the per-PDU results said.
    let (in_room, at) =
        settle(state.last_seen, || state_count(&owner, &room.room_id, STATE_TYPE)).await?;
    let state_time = at - state.started;
    state.failed += state.accepted.saturating_sub(in_room);
    state.accepted = state.accepted.min(in_room);
    let mut messages =
        send_pdus(peer, target, &owner, &mut room, sizes.s5_messages, |room, index| {
            room.next(
                peer,
                "m.room.message",
                None,
                json!({"msgtype": "m.text", "body": format!("s5 {index}")}),
            )
        })
        .await
        .context("sending the messages")?;
    let (in_room, at) =
        settle(messages.last_seen, || message_count(&owner, &room.room_id, "s5 ")).await?;
    let messages_time = at - messages.started;
    messages.failed += messages.accepted.saturating_sub(in_room);
    messages.accepted = messages.accepted.min(in_room);
    // The other half: another user of the peer joins the room now that it is large; the
    // server has to hand out its whole state and auth chain.
    let started = Instant::now();
    let (_, state_in_answer) =
        join_as(peer, target, &room.room_id, "s5joiner").await.context("joining the large room")?;
    let join_time = started.elapsed();
    ensure!(
        state_in_answer > state.accepted,
        "the join's answer held {state_in_answer} state events, fewer than the room has"
    );
    for (what, sent) in [("state event", &state), ("message", &messages)] {
        if let Some(error) = &sent.first_error {
            println!("    S5: {} {what}s failed, the first: {error}", sent.failed);
        }
    }
    let rate = |sent: &Sent, time: Duration| sent.accepted as f64 / time.as_secs_f64().max(1e-9);
    Ok(vec![
        Figure::new(
            "S5",
            format!("{} state events: accepted PDUs/s", sizes.s5_state),
            rate(&state, state_time),
            Better::Higher,
        ),
        Figure::new(
            "S5",
            format!(
                "{} messages into a room of {} state events: accepted PDUs/s",
                sizes.s5_messages, sizes.s5_state
            ),
            rate(&messages, messages_time),
            Better::Higher,
        ),
        Figure::new(
            "S5",
            format!(
                "join of that room (make_join + send_join v2, {} state events): ms",
                sizes.s5_state
            ),
            millis(join_time),
            Better::Lower,
        ),
        Figure::new(
            "S5",
            "PDUs failed (an error in the per-PDU result, or not in the room afterwards)",
            (state.failed + messages.failed) as f64,
            Better::Lower,
        ),
    ])
}

/// S6's sizes: conflicted state events in the generated fork (`benches/state_res.rs`).
pub const S6_SIZES: [usize; 3] = [10, 1_000, 10_000];

/// S6: runs the criterion benches of state resolution (`cargo bench --bench state_res` in
/// this workspace, with `profile`) and reads the mean time of each size from criterion's
/// `estimates.json`. `smoke` runs only the smallest fork, briefly.
pub async fn s6_state_resolution(profile: &str, smoke: bool) -> Result<Vec<Figure>> {
    let workspace = crate::launcher::workspace_root();
    let mut command = tokio::process::Command::new("cargo");
    command.args(["bench", "--bench", "state_res", "--profile", profile, "--"]);
    if smoke {
        command.args([
            "--exact",
            "state_res/10",
            "--warm-up-time",
            "0.2",
            "--measurement-time",
            "1",
        ]);
    }
    let status = command
        .current_dir(&workspace)
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        .status()
        .await
        .context("running cargo bench")?;
    ensure!(status.success(), "cargo bench --bench state_res exited with {status}");
    let criterion = crate::launcher::cargo_target_dir().join("criterion").join("state_res");
    let sizes: &[usize] = if smoke { &S6_SIZES[..1] } else { &S6_SIZES };
    let mut figures = Vec::new();
    for size in sizes {
        let path = criterion.join(size.to_string()).join("new").join("estimates.json");
        let estimates: Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        let mean_ns = estimates["mean"]["point_estimate"]
            .as_f64()
            .with_context(|| format!("{}: no mean", path.display()))?;
        figures.push(Figure::new(
            "S6",
            format!("state resolution, {size} conflicted state events: ms"),
            mean_ns / 1e6,
            Better::Lower,
        ));
    }
    Ok(figures)
}
