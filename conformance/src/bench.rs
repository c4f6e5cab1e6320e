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
//! - S7 disk: database bytes per message sent.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use futures::stream::{self, StreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::client::{Ctx, User, enc, room_path, v3};

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
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            s1_messages: 2000,
            s1_senders: vec![1, 10],
            s2_clients: 1000,
            s2_rate: 50,
            s2_seconds: 20,
            s3_rooms: 50,
            s3_members: 50,
            s3_history: 20,
            s7_messages: 5000,
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
            s2_rate: 20,
            s2_seconds: 2,
            s3_rooms: 3,
            s3_members: 3,
            s3_history: 3,
            s7_messages: 50,
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

/// S2: delivery latency to clients long-polling `/sync`.
pub async fn s2_delivery(ctx: &Ctx, sizes: &Sizes) -> Result<Vec<Figure>> {
    let owner = ctx.user_named("s2sender").await?;
    let clients = users(ctx, "s2client", sizes.s2_clients).await?;
    let room_id = room_with(&owner, &clients).await?;
    let filter = lean_filter(50);
    let total = (sizes.s2_rate * sizes.s2_seconds) as usize;
    // When each message's send request started, by its body.
    let sent_at: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; total]));
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(sizes.s2_clients.max(1));
    let deadline = Instant::now() + Duration::from_secs(u64::from(sizes.s2_seconds) + 120);

    let mut tasks = Vec::new();
    for client in clients {
        let (filter, room_id, sent_at, latencies, ready_tx) =
            (filter.clone(), room_id.clone(), sent_at.clone(), latencies.clone(), ready_tx.clone());
        tasks.push(tokio::spawn(async move {
            let first = client.get(&sync_path(&filter, None, 0)).await?.ok()?;
            let mut since = first["next_batch"].as_str().unwrap_or_default().to_owned();
            let _ = ready_tx.send(()).await;
            let mut received = 0usize;
            let mut seen_last = false;
            while !seen_last && Instant::now() < deadline {
                let answer = client.get(&sync_path(&filter, Some(&since), 10_000)).await?.ok()?;
                let arrived = Instant::now();
                since = answer["next_batch"].as_str().unwrap_or_default().to_owned();
                let events = answer
                    .pointer(&format!(
                        "/rooms/join/{}/timeline/events",
                        room_id.replace('~', "~0").replace('/', "~1")
                    ))
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for event in events {
                    let Some(index) = event["content"]["body"]
                        .as_str()
                        .and_then(|body| body.strip_prefix("s2 "))
                        .and_then(|index| index.parse::<usize>().ok())
                    else {
                        continue;
                    };
                    received += 1;
                    seen_last |= index + 1 == total;
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
        let (owner, room_id, sent_at) = (owner.clone(), room_id.clone(), sent_at.clone());
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
    let expected = total * sizes.s2_clients;
    let samples = sorted(std::mem::take(&mut *latencies.lock().await));
    let label = format!("{} clients, {}/s", sizes.s2_clients, sizes.s2_rate);
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

/// S7: database bytes per message.
pub async fn s7_disk(ctx: &Ctx, sizes: &Sizes, database: &Path) -> Result<Vec<Figure>> {
    let owner = ctx.user_named("s7owner").await?;
    let others = users(ctx, "s7sender", 9).await?;
    let room_id = room_with(&owner, &others).await?;
    let mut all = vec![owner];
    all.extend(others);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = database_bytes(database)?;
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
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = database_bytes(database)?;
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
