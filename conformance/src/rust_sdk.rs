//! The matrix-sdk real-client scenario: the Rust SDK that Element X is built on, driven
//! against the server under test through its own HTTP client and `/sync` loop. Two users log
//! in, create a room, invite, join, exchange messages both ways, paginate the history back to
//! the room's creation and leave. Each step is reported like a suite test; once a step fails,
//! the steps that build on it are skipped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use matrix_sdk::config::SyncSettings;
use matrix_sdk::room::MessagesOptions;
use matrix_sdk::ruma::api::client::filter::{FilterDefinition, RoomEventFilter, RoomFilter};
use matrix_sdk::ruma::api::client::room::create_room;
use matrix_sdk::ruma::api::client::sync::sync_events::v3::Filter;
use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::{OwnedRoomId, UInt, UserId};
use matrix_sdk::{Client as SdkClient, LoopCtrl, Room};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::client::{Ctx, User};
use crate::report::{Outcome, TestResult};
use crate::runner::{Finished, record};

/// What the report links for each step.
const RUST_SDK_URL: &str = "https://github.com/matrix-org/matrix-rust-sdk";

/// How long one expected thing may take to show up through sync.
const WAIT: Duration = Duration::from_secs(30);

/// Messages each user sends in the conversation step.
const MESSAGES_EACH: usize = 20;

/// The steps, in order; each builds on the ones before.
const STEPS: [&str; 8] = [
    "rust_sdk::login_with_password",
    "rust_sdk::sync_loop_starts",
    "rust_sdk::create_room",
    "rust_sdk::invite_reaches_invitee",
    "rust_sdk::join_room",
    "rust_sdk::messages_both_ways_in_order",
    "rust_sdk::paginate_history_back_to_creation",
    "rust_sdk::leave_seen_by_other",
];

/// Everything one client has seen through its sync loop.
#[derive(Default)]
struct Seen {
    /// Timeline events of joined rooms, in the order sync delivered them.
    timeline: Vec<(OwnedRoomId, Value)>,
    /// Rooms the user was invited to.
    invites: Vec<OwnedRoomId>,
    /// Completed sync responses.
    syncs: u64,
    /// Sync errors (the loop stops at the first).
    errors: Vec<String>,
}

impl Seen {
    /// `(sender, body)` of each distinct message in `room_id`, in sync order.
    fn messages(&self, room_id: &OwnedRoomId) -> Vec<(String, String)> {
        let mut ids: Vec<&str> = Vec::new();
        let mut messages = Vec::new();
        for (room, event) in &self.timeline {
            if room != room_id || event["type"] != "m.room.message" {
                continue;
            }
            let id = event["event_id"].as_str().unwrap_or_default();
            if ids.contains(&id) {
                continue;
            }
            ids.push(id);
            messages.push((
                event["sender"].as_str().unwrap_or_default().to_owned(),
                event["content"]["body"].as_str().unwrap_or_default().to_owned(),
            ));
        }
        messages
    }

    fn has_member_event(&self, room_id: &OwnedRoomId, user_id: &str, membership: &str) -> bool {
        self.timeline.iter().any(|(room, event)| {
            room == room_id
                && event["type"] == "m.room.member"
                && event["state_key"] == user_id
                && event["content"]["membership"] == membership
        })
    }
}

/// A logged-in SDK client with a background sync loop recording what it sees.
struct SdkUser {
    client: SdkClient,
    seen: Arc<Mutex<Seen>>,
    changes: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl Drop for SdkUser {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A matrix-sdk client (memory stores) logged in as `user` on `base_url`, as a new device
/// named `device_name`.
pub(crate) async fn sdk_login(base_url: &str, user: &User, device_name: &str) -> Result<SdkClient> {
    let client = SdkClient::builder()
        .homeserver_url(base_url)
        .build()
        .await
        .context("building the SDK client")?;
    client
        .matrix_auth()
        .login_username(&user.localpart, &user.password)
        .initial_device_display_name(device_name)
        .send()
        .await
        .with_context(|| format!("logging {} in with matrix-sdk", user.user_id))?;
    Ok(client)
}

impl SdkUser {
    async fn login(base_url: &str, user: &User) -> Result<SdkClient> {
        sdk_login(base_url, user, "conformance rust_sdk").await
    }

    /// Starts the sync loop, with a timeline limit large enough that nothing is cut.
    fn start(client: SdkClient) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (notify, changes) = watch::channel(0u64);
        let mut timeline = RoomEventFilter::default();
        timeline.limit = Some(UInt::from(100u32));
        let mut room = RoomFilter::default();
        room.timeline = timeline;
        let mut definition = FilterDefinition::default();
        definition.room = room;
        let settings = SyncSettings::default()
            .timeout(Duration::from_secs(5))
            .filter(Filter::FilterDefinition(definition));
        let task = {
            let (client, seen) = (client.clone(), seen.clone());
            tokio::spawn(async move {
                let result = client
                    .sync_with_result_callback(settings, |response| {
                        let (seen, notify) = (seen.clone(), notify.clone());
                        async move {
                            let control = match response {
                                Ok(response) => {
                                    remember(&mut lock(&seen), &response);
                                    LoopCtrl::Continue
                                }
                                Err(error) => {
                                    lock(&seen).errors.push(format!("{error:?}"));
                                    LoopCtrl::Break
                                }
                            };
                            notify.send_modify(|count| *count += 1);
                            Ok(control)
                        }
                    })
                    .await;
                if let Err(error) = result {
                    lock(&seen).errors.push(format!("{error:?}"));
                }
            })
        };
        Self { client, seen, changes, task }
    }

    /// Waits until `predicate` holds on what was seen, failing after [`WAIT`] or when the sync
    /// loop stopped with an error.
    async fn wait_for(&mut self, what: &str, predicate: impl Fn(&Seen) -> bool) -> Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            {
                let seen = lock(&self.seen);
                if let Some(error) = seen.errors.first() {
                    bail!("{what}: the sync loop failed: {error}");
                }
                if predicate(&seen) {
                    return Ok(());
                }
            }
            match tokio::time::timeout_at(deadline, self.changes.changed()).await {
                Ok(Ok(())) => {}
                _ => bail!("{what}: not seen through sync within {} s", WAIT.as_secs()),
            }
        }
    }

    fn user_id(&self) -> String {
        self.client.user_id().map(ToString::to_string).unwrap_or_default()
    }

    fn room(&self, room_id: &OwnedRoomId) -> Result<Room> {
        self.client.get_room(room_id).ok_or_else(|| anyhow!("{room_id} unknown to the SDK"))
    }
}

fn lock(seen: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn remember(seen: &mut Seen, response: &matrix_sdk::sync::SyncResponse) {
    seen.syncs += 1;
    for (room_id, update) in &response.rooms.joined {
        for event in &update.timeline.events {
            let value = serde_json::from_str(event.raw().json().get()).unwrap_or(Value::Null);
            seen.timeline.push((room_id.clone(), value));
        }
    }
    seen.invites.extend(response.rooms.invited.keys().cloned());
}

/// What the steps share as they go.
#[derive(Default)]
struct Scenario {
    alice: Option<SdkUser>,
    bob: Option<SdkUser>,
    alice_client: Option<SdkClient>,
    bob_client: Option<SdkClient>,
    room_id: Option<OwnedRoomId>,
}

impl Scenario {
    fn users(&mut self) -> Result<(&mut SdkUser, &mut SdkUser)> {
        match (self.alice.as_mut(), self.bob.as_mut()) {
            (Some(alice), Some(bob)) => Ok((alice, bob)),
            _ => bail!("the sync loops are not running"),
        }
    }

    fn room_id(&self) -> Result<OwnedRoomId> {
        self.room_id.clone().ok_or_else(|| anyhow!("no room was created"))
    }

    async fn step(&mut self, index: usize, base_url: &str, users: &(User, User)) -> Result<()> {
        match index {
            0 => {
                self.alice_client = Some(SdkUser::login(base_url, &users.0).await?);
                self.bob_client = Some(SdkUser::login(base_url, &users.1).await?);
                let alice = self.alice_client.as_ref().and_then(|c| c.user_id());
                ensure!(
                    alice.is_some_and(|id| id.as_str() == users.0.user_id),
                    "the SDK reports user id {alice:?}, expected {}",
                    users.0.user_id
                );
            }
            1 => {
                let (alice, bob) = (self.alice_client.take(), self.bob_client.take());
                let (Some(alice), Some(bob)) = (alice, bob) else { bail!("not logged in") };
                self.alice = Some(SdkUser::start(alice));
                self.bob = Some(SdkUser::start(bob));
                let (alice, bob) = self.users()?;
                alice.wait_for("alice's first sync", |seen| seen.syncs > 0).await?;
                bob.wait_for("bob's first sync", |seen| seen.syncs > 0).await?;
            }
            2 => {
                let (alice, _) = self.users()?;
                let mut request = create_room::v3::Request::new();
                request.name = Some("matrix-sdk scenario".to_owned());
                request.preset = Some(create_room::v3::RoomPreset::PrivateChat);
                let room = alice.client.create_room(request).await.context("create_room")?;
                let room_id = room.room_id().to_owned();
                alice
                    .wait_for("the new room in alice's sync", |seen| {
                        seen.timeline.iter().any(|(room, _)| *room == room_id)
                    })
                    .await?;
                self.room_id = Some(room_id);
            }
            3 => {
                let room_id = self.room_id()?;
                let (alice, bob) = self.users()?;
                let bob_id = UserId::parse(bob.user_id())?;
                alice.room(&room_id)?.invite_user_by_id(&bob_id).await.context("invite")?;
                bob.wait_for("the invite in bob's sync", |seen| seen.invites.contains(&room_id))
                    .await?;
            }
            4 => {
                let room_id = self.room_id()?;
                let (alice, bob) = self.users()?;
                bob.client.join_room_by_id(&room_id).await.context("join_room_by_id")?;
                let bob_id = bob.user_id();
                alice
                    .wait_for("bob's join in alice's sync", |seen| {
                        seen.has_member_event(&room_id, &bob_id, "join")
                    })
                    .await?;
            }
            5 => {
                let room_id = self.room_id()?;
                let (alice, bob) = self.users()?;
                let (alice_room, bob_room) = (alice.room(&room_id)?, bob.room(&room_id)?);
                let mut expected = Vec::new();
                for index in 0..MESSAGES_EACH {
                    let text = format!("alice {index}");
                    alice_room.send(RoomMessageEventContent::text_plain(&text)).await?;
                    expected.push((alice.user_id(), text));
                    let text = format!("bob {index}");
                    bob_room.send(RoomMessageEventContent::text_plain(&text)).await?;
                    expected.push((bob.user_id(), text));
                }
                let complete = |seen: &Seen| seen.messages(&room_id).len() >= expected.len();
                alice.wait_for("every message in alice's sync", complete).await?;
                bob.wait_for("every message in bob's sync", complete).await?;
                for (name, user) in [("alice", &alice), ("bob", &bob)] {
                    let got = lock(&user.seen).messages(&room_id);
                    ensure!(got == expected, "{name} saw the messages as {got:?}");
                }
            }
            6 => {
                let room_id = self.room_id()?;
                let (_, bob) = self.users()?;
                let room = bob.room(&room_id)?;
                let mut from: Option<String> = None;
                let mut bodies = Vec::new();
                let mut reached_create = false;
                for _ in 0..50 {
                    let mut options = MessagesOptions::backward().from(from.as_deref());
                    options.limit = UInt::from(10u32);
                    let page = room.messages(options).await.context("room.messages")?;
                    for event in &page.chunk {
                        let value: Value = serde_json::from_str(event.raw().json().get())?;
                        if value["type"] == "m.room.create" {
                            reached_create = true;
                        }
                        if value["type"] == "m.room.message" {
                            bodies.push(value["content"]["body"].as_str().unwrap_or("").to_owned());
                        }
                    }
                    match page.end {
                        Some(end) if !page.chunk.is_empty() && !reached_create => from = Some(end),
                        _ => break,
                    }
                }
                ensure!(reached_create, "backward pagination never reached m.room.create");
                bodies.reverse();
                let expected: Vec<String> = (0..MESSAGES_EACH)
                    .flat_map(|index| [format!("alice {index}"), format!("bob {index}")])
                    .collect();
                ensure!(bodies == expected, "paginated history was {bodies:?}");
            }
            7 => {
                let room_id = self.room_id()?;
                let (alice, bob) = self.users()?;
                bob.room(&room_id)?.leave().await.context("leave")?;
                let bob_id = bob.user_id();
                alice
                    .wait_for("bob's leave in alice's sync", |seen| {
                        seen.has_member_event(&room_id, &bob_id, "leave")
                    })
                    .await?;
            }
            _ => bail!("no step {index}"),
        }
        Ok(())
    }
}

/// Registers two users through the suite's client, then runs the steps with matrix-sdk.
pub(crate) async fn run_rust_sdk(
    ctx: &Ctx,
    expected_failures: &BTreeMap<String, String>,
) -> Result<Vec<TestResult>> {
    let users = (ctx.user_named("rsalice").await?, ctx.user_named("rsbob").await?);
    let mut scenario = Scenario::default();
    let mut results = Vec::new();
    let mut failed: Option<String> = None;
    for (index, name) in STEPS.iter().enumerate() {
        if let Some(earlier) = &failed {
            println!("SKIP {name}: an earlier step failed ({earlier})");
            results.push(TestResult {
                name: (*name).to_owned(),
                area: "rust_sdk".to_owned(),
                spec: RUST_SDK_URL.to_owned(),
                outcome: Outcome::Skip,
                reason: Some(format!("an earlier step failed ({earlier})")),
                deviation: None,
                duration_ms: 0,
            });
            continue;
        }
        let started = Instant::now();
        let outcome =
            scenario.step(index, ctx.base_url(), &users).await.map_err(|e| format!("{e:#}"));
        if outcome.is_err() {
            failed = Some((*name).to_owned());
        }
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let test = Finished {
            name: (*name).to_owned(),
            area: "rust_sdk".to_owned(),
            spec: RUST_SDK_URL.to_owned(),
            deviation: None,
            duration_ms,
        };
        results.push(record(test, outcome, expected_failures));
    }
    Ok(results)
}
