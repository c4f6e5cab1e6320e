//! The outbound sender: one queue per destination server, drained in transactions of at most
//! [`PDUS_PER_TRANSACTION_MAX`] PDUs and [`EDUS_PER_TRANSACTION_MAX`] EDUs
//! (`PUT /_matrix/federation/v1/send/{txnId}`), with exponential backoff for servers that do
//! not answer.
//!
//! [Transactions](https://spec.matrix.org/v1.16/server-server-api/#transactions)
//!
//! What is queued lives in an [`OutboundQueue`] (the database, in `src/`), written in the same
//! batch as the event it carries, so nothing acknowledged locally is lost by a crash: after a
//! restart [`Sender::run`] finds every destination with pending items and sends them.
//! A transaction's id names the first and last queue ids it carries, so a retry of the same
//! items reuses the same id and the receiver can tell a repeat from new work.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use reqwest::Method;
use ruma::{OwnedServerName, ServerName};
use serde_json::{Value, json};
use tokio::{
    sync::{Notify, mpsc},
    task::JoinSet,
    time::Instant,
};
use tracing::Instrument;

use crate::{Client, Error};

/// The most PDUs one transaction carries.
pub const PDUS_PER_TRANSACTION_MAX: usize = 50;
/// The most EDUs one transaction carries.
pub const EDUS_PER_TRANSACTION_MAX: usize = 100;

/// What a queued item is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboundKind {
    /// A PDU, sent as it is stored (signed).
    Pdu,
    /// An EDU (`{"edu_type": ..., "content": ...}`).
    Edu,
}

/// One item waiting for a destination.
#[derive(Clone, Debug)]
pub struct OutboundItem {
    /// Its place in the destination's queue: increasing, never reused.
    pub id: u64,
    /// PDU or EDU.
    pub kind: OutboundKind,
    /// The JSON sent.
    pub json: Value,
}

/// Where outbound items are persisted. `src/` implements it over the database.
pub trait OutboundQueue: Send + Sync + 'static {
    /// Every destination that has items waiting.
    fn destinations(&self) -> Result<Vec<OwnedServerName>, Error>;
    /// Up to `limit` items waiting for `destination`, oldest first.
    fn pending(&self, destination: &ServerName, limit: usize) -> Result<Vec<OutboundItem>, Error>;
    /// Removes delivered items.
    fn remove(&self, destination: &ServerName, ids: &[u64]) -> Result<(), Error>;
}

/// The sender's limits.
#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// The wait after the first failed attempt; it doubles with every further failure.
    pub retry_initial: Duration,
    /// The longest wait between two attempts.
    pub retry_max: Duration,
    /// How many destinations are sent to at the same time.
    pub concurrent_destinations_max: usize,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            retry_initial: Duration::from_secs(2),
            retry_max: Duration::from_secs(600),
            concurrent_destinations_max: 50,
        }
    }
}

/// The outbound sender: cheap to clone; [`Sender::wake`] is called after items are queued.
#[derive(Clone)]
pub struct Sender {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    queue: Arc<dyn OutboundQueue>,
    config: SenderConfig,
    wake_tx: mpsc::UnboundedSender<Wake>,
    wake_rx: Mutex<Option<mpsc::UnboundedReceiver<Wake>>>,
}

enum Wake {
    /// New items for the destination.
    Queued(OwnedServerName),
    /// The destination was heard from: retry now rather than after its backoff.
    Alive(OwnedServerName),
}

/// Wakes a [`Sender`] from wherever items are queued.
#[derive(Clone)]
pub struct Waker {
    wake_tx: mpsc::UnboundedSender<Wake>,
}

impl Waker {
    /// Says that items were queued for `destination`.
    pub fn wake(&self, destination: &ServerName) {
        let _ = self.wake_tx.send(Wake::Queued(destination.to_owned()));
    }

    /// Says that `server` just talked to us: a backoff towards it ends now.
    pub fn peer_alive(&self, server: &ServerName) {
        let _ = self.wake_tx.send(Wake::Alive(server.to_owned()));
    }
}

/// What the sender knows of one destination.
#[derive(Default)]
struct Destination {
    /// A worker is sending to it.
    busy: bool,
    /// Items were queued while the worker ran: look again when it ends.
    again: bool,
    /// Failed attempts in a row.
    failures: u32,
    /// When the next attempt may start after failures.
    retry_at: Option<Instant>,
}

impl Sender {
    /// A sender that delivers what `queue` holds through `client`.
    pub fn new(client: Client, queue: Arc<dyn OutboundQueue>, config: SenderConfig) -> Self {
        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        Self {
            inner: Arc::new(Inner {
                client,
                queue,
                config,
                wake_tx,
                wake_rx: Mutex::new(Some(wake_rx)),
            }),
        }
    }

    /// A handle that wakes this sender. It does not keep the sender (or its queue) alive, so
    /// the queue may hold it without a reference cycle.
    pub fn waker(&self) -> Waker {
        Waker { wake_tx: self.inner.wake_tx.clone() }
    }

    /// Sends until `shutdown` is notified: first whatever was left queued, then what
    /// [`Sender::wake`] announces. Runs once per sender.
    pub async fn run(&self, shutdown: Arc<Notify>) {
        let Some(mut wake_rx) =
            self.inner.wake_rx.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
        else {
            tracing::error!("the outbound sender was started twice");
            return;
        };
        let mut destinations: HashMap<OwnedServerName, Destination> = HashMap::new();
        let mut workers: JoinSet<(OwnedServerName, Result<(), Error>)> = JoinSet::new();
        let mut waiting: Vec<OwnedServerName> = Vec::new();
        match self.inner.queue.destinations() {
            Ok(pending) => waiting.extend(pending),
            Err(error) => tracing::error!(%error, "reading the outbound queue"),
        }
        let stop = shutdown.notified();
        tokio::pin!(stop);
        loop {
            // Start what may start.
            let now = Instant::now();
            waiting.retain(|destination| {
                let state = destinations.entry(destination.clone()).or_default();
                if state.busy {
                    state.again = true;
                    return false;
                }
                if state.retry_at.is_some_and(|at| at > now) {
                    return false;
                }
                if workers.len() >= self.inner.config.concurrent_destinations_max {
                    return true;
                }
                state.busy = true;
                state.again = false;
                let sender = self.clone();
                let destination = destination.clone();
                let span = tracing::info_span!("outbound", destination = %destination);
                workers.spawn(
                    async move {
                        let result = sender.drain(&destination).await;
                        (destination, result)
                    }
                    .instrument(span),
                );
                false
            });
            let next_retry = destinations
                .iter()
                .filter(|(_, state)| !state.busy)
                .filter_map(|(_, state)| state.retry_at)
                .min();
            let retry = async {
                match next_retry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut stop => break,
                wake = wake_rx.recv() => match wake {
                    Some(Wake::Queued(destination)) => waiting.push(destination),
                    Some(Wake::Alive(server)) => {
                        if let Some(state) = destinations.get_mut(&server)
                            && state.retry_at.take().is_some()
                        {
                            state.failures = 0;
                            waiting.push(server);
                        }
                    }
                    None => break,
                },
                Some(joined) = workers.join_next(), if !workers.is_empty() => {
                    let Ok((destination, result)) = joined else { continue };
                    let state = destinations.entry(destination.clone()).or_default();
                    state.busy = false;
                    match result {
                        Ok(()) => {
                            state.failures = 0;
                            state.retry_at = None;
                            if state.again {
                                waiting.push(destination);
                            } else {
                                destinations.remove(&destination);
                            }
                        }
                        Err(error) => {
                            state.failures = state.failures.saturating_add(1);
                            let wait = backoff(&self.inner.config, state.failures);
                            tracing::info!(%destination, %error, failures = state.failures, wait_ms = wait.as_millis() as u64, "destination unreachable: backing off");
                            state.retry_at = Some(Instant::now() + wait);
                        }
                    }
                }
                () = retry => {
                    let now = Instant::now();
                    for (destination, state) in &mut destinations {
                        if !state.busy && state.retry_at.is_some_and(|at| at <= now) {
                            state.retry_at = None;
                            waiting.push(destination.clone());
                        }
                    }
                }
            }
        }
        workers.shutdown().await;
    }

    /// Sends everything queued for `destination`, one transaction after the other, until the
    /// queue is empty or a transaction fails.
    async fn drain(&self, destination: &ServerName) -> Result<(), Error> {
        loop {
            let items = self
                .inner
                .queue
                .pending(destination, PDUS_PER_TRANSACTION_MAX + EDUS_PER_TRANSACTION_MAX)?;
            let batch = transaction_items(items);
            let (Some(first), Some(last)) = (batch.first(), batch.last()) else { return Ok(()) };
            let txn_id = format!("{}-{}", first.id, last.id);
            let mut pdus = Vec::new();
            let mut edus = Vec::new();
            for item in &batch {
                match item.kind {
                    OutboundKind::Pdu => pdus.push(item.json.clone()),
                    OutboundKind::Edu => edus.push(item.json.clone()),
                }
            }
            let body = json!({
                "origin": self.inner.client.server_name(),
                "origin_server_ts": now_ms(),
                "pdus": pdus,
                "edus": edus,
            });
            let path = format!("/_matrix/federation/v1/send/{txn_id}");
            let ids: Vec<u64> = batch.iter().map(|item| item.id).collect();
            let answer = match self
                .inner
                .client
                .send_request(destination, Method::PUT, &path, Some(body))
                .await
            {
                Ok(answer) => answer,
                // The receiver will never take this transaction (malformed, too large):
                // retrying it would block everything behind it.
                Err(Error::Status { status: status @ (400 | 413), body, .. }) => {
                    tracing::warn!(txn_id, status, body, "peer refused the transaction: dropped");
                    self.inner.queue.remove(destination, &ids)?;
                    continue;
                }
                Err(error) => return Err(error),
            };
            // A PDU the receiver refused is not sent again: the answer says why, once.
            if let Some(results) = answer.get("pdus").and_then(Value::as_object) {
                for (event_id, result) in results {
                    if let Some(error) = result.get("error") {
                        tracing::info!(%event_id, %error, "peer refused a PDU");
                    }
                }
            }
            self.inner.queue.remove(destination, &ids)?;
            tracing::debug!(txn_id, pdus = pdus.len(), edus = edus.len(), "transaction delivered");
        }
    }
}

/// The items of the next transaction: the oldest ones, stopping before the first that would
/// pass either limit, so the order of items is kept.
fn transaction_items(items: Vec<OutboundItem>) -> Vec<OutboundItem> {
    let (mut pdus, mut edus) = (0, 0);
    let mut taken = Vec::new();
    for item in items {
        let count = match item.kind {
            OutboundKind::Pdu => &mut pdus,
            OutboundKind::Edu => &mut edus,
        };
        let limit = match item.kind {
            OutboundKind::Pdu => PDUS_PER_TRANSACTION_MAX,
            OutboundKind::Edu => EDUS_PER_TRANSACTION_MAX,
        };
        if *count == limit {
            break;
        }
        *count += 1;
        taken.push(item);
    }
    taken
}

/// The wait after `failures` failed attempts in a row: doubling from `retry_initial`, at most
/// `retry_max`.
fn backoff(config: &SenderConfig, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(20));
    config.retry_initial.saturating_mul(factor).min(config.retry_max)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use ruma::server_name;

    use super::*;
    use crate::{ClientConfig, MemoryKeyStore, ServerSigningKey};

    /// A queue in memory that counts how often the sender looked at it.
    #[derive(Default)]
    struct MemoryQueue {
        items: Mutex<HashMap<OwnedServerName, Vec<OutboundItem>>>,
        reads: AtomicUsize,
    }

    impl OutboundQueue for MemoryQueue {
        fn destinations(&self) -> Result<Vec<OwnedServerName>, Error> {
            Ok(self.items.lock().unwrap().keys().cloned().collect())
        }

        fn pending(
            &self,
            destination: &ServerName,
            limit: usize,
        ) -> Result<Vec<OutboundItem>, Error> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let items = self.items.lock().unwrap();
            Ok(items
                .get(destination)
                .map(|list| list.iter().take(limit).cloned().collect())
                .unwrap_or_default())
        }

        fn remove(&self, destination: &ServerName, ids: &[u64]) -> Result<(), Error> {
            if let Some(list) = self.items.lock().unwrap().get_mut(destination) {
                list.retain(|item| !ids.contains(&item.id));
            }
            Ok(())
        }
    }

    /// A peer that accepts connections and never says a word: its transactions time out,
    /// the sender backs off and tries again, and nothing queued for it is lost.
    #[tokio::test]
    async fn a_peer_that_never_answers_is_retried_and_loses_nothing() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((stream, _)) = silent.accept().await {
                open.push(stream);
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let key = ServerSigningKey::load_or_generate(
            &dir.path().join("key"),
            server_name!("sender.test").to_owned(),
        )
        .unwrap();
        let config = ClientConfig {
            allow_private: true,
            connect_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_millis(300),
            ..ClientConfig::default()
        };
        let client =
            Client::new(Arc::new(key), Arc::new(MemoryKeyStore::default()), config).unwrap();
        let destination = OwnedServerName::try_from(format!("127.0.0.1:{port}")).unwrap();
        let queue = Arc::new(MemoryQueue::default());
        queue.items.lock().unwrap().insert(
            destination.clone(),
            vec![OutboundItem { id: 1, kind: OutboundKind::Pdu, json: json!({"n": 1}) }],
        );
        let config = SenderConfig {
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_millis(100),
            concurrent_destinations_max: 4,
        };
        let sender = Sender::new(client, queue.clone(), config);
        let shutdown = Arc::new(Notify::new());
        let running = {
            let (sender, shutdown) = (sender.clone(), shutdown.clone());
            tokio::spawn(async move { sender.run(shutdown).await })
        };
        // At least three attempts (reads of the queue) within a few seconds: it keeps trying.
        let deadline = Instant::now() + Duration::from_secs(10);
        while queue.reads.load(Ordering::SeqCst) < 3 {
            assert!(Instant::now() < deadline, "the sender stopped trying");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(queue.pending(&destination, 10).unwrap().len(), 1, "the item is still queued");
        shutdown.notify_one();
        tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("the sender stops when told")
            .unwrap();
        held.abort();
    }

    fn item(id: u64, kind: OutboundKind) -> OutboundItem {
        OutboundItem { id, kind, json: json!({}) }
    }

    fn check(kinds: &[OutboundKind], expected_ids: std::ops::Range<u64>) {
        let items = kinds.iter().enumerate().map(|(id, kind)| item(id as u64, *kind)).collect();
        let ids: Vec<u64> = transaction_items(items).iter().map(|item| item.id).collect();
        assert_eq!(ids, expected_ids.collect::<Vec<_>>());
    }

    #[test]
    fn transactions_keep_order_and_limits() {
        use OutboundKind::{Edu, Pdu};
        check(&[Pdu, Edu, Pdu], 0..3);
        check(&[Pdu; 60], 0..50);
        check(&[Edu; 120], 0..100);
        let mut mixed = vec![Edu; 10];
        mixed.extend([Pdu; 55]);
        check(&mixed, 0..60);
        check(&[], 0..0);
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let config = SenderConfig {
            retry_initial: Duration::from_secs(2),
            retry_max: Duration::from_secs(60),
            concurrent_destinations_max: 1,
        };
        assert_eq!(backoff(&config, 1), Duration::from_secs(2));
        assert_eq!(backoff(&config, 2), Duration::from_secs(4));
        assert_eq!(backoff(&config, 5), Duration::from_secs(32));
        assert_eq!(backoff(&config, 6), Duration::from_secs(60));
        assert_eq!(backoff(&config, 1000), Duration::from_secs(60));
    }
}
