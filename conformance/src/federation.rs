//! The federation section: two homeservers on loopback addresses (Hearth and Hearth, or Hearth
//! and Synapse), federating over TLS with a test CA, driven through their client APIs only.
//! Each check runs both ways: the room on the first server with a user of the second joining,
//! and the reverse.
//!
//! [Server-server API](https://spec.matrix.org/v1.16/server-server-api/)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use futures::future::BoxFuture;
use serde_json::{Value, json};

use crate::client::{Ctx, User, array, enc, room_path, short, timeline, v3};
use crate::report::TestResult;
use crate::runner::{Finished, record};

mod e2ee;

/// The two servers, as their clients see them.
#[derive(Clone)]
pub(crate) struct Pair {
    pub(crate) first: Ctx,
    pub(crate) second: Ctx,
    pub(crate) first_name: String,
    pub(crate) second_name: String,
}

/// Which server has the room: `home` creates it, `away` joins from the other server.
struct Sides {
    home: Ctx,
    away: Ctx,
    home_name: String,
}

impl Pair {
    fn sides(&self, room_on_first: bool) -> Sides {
        if room_on_first {
            Sides {
                home: self.first.clone(),
                away: self.second.clone(),
                home_name: self.first_name.clone(),
            }
        } else {
            Sides {
                home: self.second.clone(),
                away: self.first.clone(),
                home_name: self.second_name.clone(),
            }
        }
    }
}

type Check = fn(Sides) -> BoxFuture<'static, Result<()>>;

const SPEC: &str = "https://spec.matrix.org/v1.16/server-server-api/";

fn checks() -> Vec<(&'static str, &'static str, Check)> {
    vec![
        ("join_a_room_of_the_other_server", "#joining-rooms", |s| Box::pin(join_room(s))),
        ("messages_both_ways_in_order", "#transactions", |s| Box::pin(messages_both_ways(s))),
        ("typing_reaches_the_other_server", "#typing-notifications", |s| Box::pin(typing(s))),
        ("read_receipts_reach_the_other_server", "#receipts", |s| Box::pin(receipts(s))),
        ("invite_across_servers_then_join", "#inviting-to-a-room", |s| Box::pin(invite(s))),
        ("reject_an_invite_from_the_other_server", "#leaving-rooms-rejecting-invites", |s| {
            Box::pin(reject_invite(s))
        }),
        ("kick_across_servers", "#leaving-rooms-rejecting-invites", |s| Box::pin(kick(s))),
        ("ban_across_servers_blocks_rejoining", "#leaving-rooms-rejecting-invites", |s| {
            Box::pin(ban(s))
        }),
        ("leave_across_servers", "#leaving-rooms-rejecting-invites", |s| Box::pin(leave(s))),
        ("encrypted_conversation_with_matrix_sdk", "#end-to-end-encryption", |s| {
            Box::pin(e2ee::encrypted_conversation(s))
        }),
    ]
}

/// Runs every check both ways, one at a time (each with `timeout`), and returns the results.
pub(crate) async fn run(
    pair: &Pair,
    expected_failures: &BTreeMap<String, String>,
    timeout: Duration,
) -> Vec<TestResult> {
    let mut results = Vec::new();
    for room_on_first in [true, false] {
        let way = if room_on_first { "room_on_first" } else { "room_on_second" };
        for (name, anchor, check) in checks() {
            let started = Instant::now();
            let outcome =
                match tokio::time::timeout(timeout, check(pair.sides(room_on_first))).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(format!("{error:#}")),
                    Err(_) => Err(format!("timed out after {} s", timeout.as_secs())),
                };
            let finished = Finished {
                name: format!("federation::{name}_{way}"),
                area: "federation".to_owned(),
                spec: format!("{SPEC}{anchor}"),
                deviation: None,
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            };
            results.push(record(finished, outcome, expected_failures));
        }
    }
    results
}

/// Polls `probe` until it gives `Some`, for at most 30 s (federation is asynchronous).
async fn eventually<T, F: std::future::Future<Output = Result<Option<T>>>>(
    what: &str,
    mut probe: impl FnMut() -> F,
) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(value) = probe().await? {
            return Ok(value);
        }
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `viewer`'s server's idea of `user_id`'s membership, if it has one.
async fn membership(viewer: &User, room_id: &str, user_id: &str) -> Result<Option<String>> {
    let path = room_path(room_id, &format!("/state/m.room.member/{}", enc(user_id)));
    let resp = viewer.get(&path).await?;
    Ok((resp.status == 200)
        .then(|| resp.body["membership"].as_str().unwrap_or_default().to_owned()))
}

async fn wait_membership(
    viewer: &User,
    room_id: &str,
    user_id: &str,
    expected: &str,
) -> Result<()> {
    eventually(&format!("{user_id}'s membership {expected} seen by {}", viewer.user_id), || async {
        Ok((membership(viewer, room_id, user_id).await?.as_deref() == Some(expected)).then_some(()))
    })
    .await
}

/// The message bodies of the room in `viewer`'s `/messages`, oldest first.
async fn bodies(viewer: &User, room_id: &str) -> Result<Vec<String>> {
    let messages = viewer.get(&room_path(room_id, "/messages?dir=b&limit=500")).await?.ok()?;
    let mut found: Vec<String> = array(&messages, "/chunk")
        .iter()
        .filter(|event| event["type"] == "m.room.message")
        .filter_map(|event| event["content"]["body"].as_str().map(str::to_owned))
        .collect();
    found.reverse();
    Ok(found)
}

async fn wait_body(viewer: &User, room_id: &str, body: &str) -> Result<()> {
    eventually(&format!("{body:?} seen by {}", viewer.user_id), || async {
        Ok(bodies(viewer, room_id).await?.iter().any(|found| found == body).then_some(()))
    })
    .await
}

/// Waits until `user`'s sync lists the room under `rooms.<section>` (`invite`, `leave`).
async fn wait_section(user: &User, section: &str, room_id: &str) -> Result<()> {
    let pointer = format!("/rooms/{section}/{}", crate::client::pointer_key(room_id));
    user.sync_until("", &format!("the room under rooms.{section}"), |sync| {
        sync.pointer(&pointer).map(|_| ())
    })
    .await
}

/// `user` joins `room_id` through `server`.
async fn join_via(user: &User, room_id: &str, server: &str) -> Result<crate::client::Resp> {
    user.post(&v3(&format!("/join/{}?server_name={}", enc(room_id), enc(server))), json!({})).await
}

/// A public room on `home` with a user of `away` joined.
async fn joined_room(sides: &Sides) -> Result<(User, User, String)> {
    let owner = sides.home.user_named("owner").await?;
    let guest = sides.away.user_named("guest").await?;
    let room_id = owner.create_room(json!({"preset": "public_chat", "name": "Federated"})).await?;
    join_via(&guest, &room_id, &sides.home_name).await?.ok().context("joining over federation")?;
    wait_membership(&owner, &room_id, &guest.user_id, "join").await?;
    Ok((owner, guest, room_id))
}

async fn join_room(sides: Sides) -> Result<()> {
    let (owner, guest, room_id) = joined_room(&sides).await?;
    // The joining server has the room's state: its name and the owner's membership.
    let name = guest.get_state(&room_id, "m.room.name", "").await?;
    ensure!(name["name"] == "Federated", "room name on the joining server: {}", short(&name));
    wait_membership(&guest, &room_id, &owner.user_id, "join").await?;
    let joined = guest.get(&v3("/joined_rooms")).await?.ok()?;
    ensure!(
        array(&joined, "/joined_rooms").iter().any(|id| id == room_id.as_str()),
        "joined_rooms: {}",
        short(&joined)
    );
    // The guest's sync shows the room with the owner's membership in its state.
    guest
        .sync_until("", "the joined room in sync", |sync| {
            crate::client::joined_room(sync, &room_id).map(|_| ())
        })
        .await?;
    Ok(())
}

async fn messages_both_ways(sides: Sides) -> Result<()> {
    let (owner, guest, room_id) = joined_room(&sides).await?;
    const COUNT: usize = 20;
    for n in 0..COUNT {
        owner.send_text(&room_id, &format!("home {n}")).await?;
        guest.send_text(&room_id, &format!("away {n}")).await?;
    }
    let expected =
        |prefix: &str| -> Vec<String> { (0..COUNT).map(|n| format!("{prefix} {n}")).collect() };
    for viewer in [&owner, &guest] {
        let seen = eventually(&format!("all messages seen by {}", viewer.user_id), || async {
            let seen = bodies(viewer, &room_id).await?;
            Ok((seen.len() >= 2 * COUNT).then_some(seen))
        })
        .await?;
        for prefix in ["home", "away"] {
            let of: Vec<String> =
                seen.iter().filter(|body| body.starts_with(prefix)).cloned().collect();
            ensure!(of == expected(prefix), "{} sees {prefix} messages as {of:?}", viewer.user_id);
        }
    }
    // And the away server's sync delivers the home server's messages.
    let last = owner.send_text(&room_id, "last").await?;
    guest
        .sync_until("", "the last message in sync", |sync| {
            timeline(sync, &room_id)
                .iter()
                .any(|event| event["event_id"] == last.as_str())
                .then_some(())
        })
        .await?;
    Ok(())
}

fn ephemeral_has(
    sync: &Value,
    room_id: &str,
    kind: &str,
    matches: impl Fn(&Value) -> bool,
) -> bool {
    sync.pointer(&format!("/rooms/join/{}/ephemeral/events", crate::client::pointer_key(room_id)))
        .and_then(Value::as_array)
        .is_some_and(|events| events.iter().any(|event| event["type"] == kind && matches(event)))
}

async fn typing(sides: Sides) -> Result<()> {
    let (owner, guest, room_id) = joined_room(&sides).await?;
    for (from, to) in [(&owner, &guest), (&guest, &owner)] {
        let path = room_path(&room_id, &format!("/typing/{}", enc(&from.user_id)));
        from.put(&path, json!({"typing": true, "timeout": 20000})).await?.ok()?;
        to.sync_until("", "the typing notification", |sync| {
            ephemeral_has(sync, &room_id, "m.typing", |event| {
                array(event, "/content/user_ids").iter().any(|user| user == from.user_id.as_str())
            })
            .then_some(())
        })
        .await?;
    }
    Ok(())
}

async fn receipts(sides: Sides) -> Result<()> {
    let (owner, guest, room_id) = joined_room(&sides).await?;
    for (from, to) in [(&owner, &guest), (&guest, &owner)] {
        let body = format!("read me, {}", to.user_id);
        let event_id = from.send_text(&room_id, &body).await?;
        wait_body(to, &room_id, &body).await?;
        let path = room_path(&room_id, &format!("/receipt/m.read/{}", enc(&event_id)));
        to.post(&path, json!({})).await?.ok()?;
        from.sync_until("", "the read receipt", |sync| {
            ephemeral_has(sync, &room_id, "m.receipt", |event| {
                event["content"][&event_id]["m.read"].get(&to.user_id).is_some()
            })
            .then_some(())
        })
        .await?;
    }
    Ok(())
}

async fn invite(sides: Sides) -> Result<()> {
    let owner = sides.home.user_named("owner").await?;
    let guest = sides.away.user_named("guest").await?;
    let room_id =
        owner.create_room(json!({"preset": "private_chat", "name": "Invite only"})).await?;
    owner.invite(&room_id, &guest.user_id).await?;
    wait_section(&guest, "invite", &room_id).await?;
    guest
        .post(&room_path(&room_id, "/join"), json!({}))
        .await?
        .ok()
        .context("joining after the invite")?;
    wait_membership(&owner, &room_id, &guest.user_id, "join").await?;
    guest.send_text(&room_id, "thanks for the invite").await?;
    wait_body(&owner, &room_id, "thanks for the invite").await
}

async fn reject_invite(sides: Sides) -> Result<()> {
    let owner = sides.home.user_named("owner").await?;
    let guest = sides.away.user_named("guest").await?;
    let room_id = owner.create_private_room().await?;
    owner.invite(&room_id, &guest.user_id).await?;
    wait_section(&guest, "invite", &room_id).await?;
    guest.leave(&room_id).await.context("rejecting the invite")?;
    wait_membership(&owner, &room_id, &guest.user_id, "leave").await
}

async fn kick(sides: Sides) -> Result<()> {
    let (owner, guest, room_id) = joined_room(&sides).await?;
    owner.post(&room_path(&room_id, "/kick"), json!({"user_id": guest.user_id})).await?.ok()?;
    wait_section(&guest, "leave", &room_id).await?;
    Ok(())
}

async fn ban(sides: Sides) -> Result<()> {
    let (owner, guest, room_id) = joined_room(&sides).await?;
    owner.post(&room_path(&room_id, "/ban"), json!({"user_id": guest.user_id})).await?.ok()?;
    wait_section(&guest, "leave", &room_id).await?;
    let rejoin = join_via(&guest, &room_id, &sides.home_name).await?;
    if rejoin.status == 200 {
        bail!("a banned user joined again: {}", short(&rejoin.body));
    }
    rejoin.err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn leave(sides: Sides) -> Result<()> {
    let (owner, guest, room_id) = joined_room(&sides).await?;
    guest.leave(&room_id).await?;
    wait_membership(&owner, &room_id, &guest.user_id, "leave").await
}

/// The room's current state as `viewer`'s server has it: (type, state key, event id), sorted.
async fn state_events(viewer: &User, room_id: &str) -> Result<Vec<(String, String, String)>> {
    let state = viewer.get(&room_path(room_id, "/state")).await?.ok()?;
    let mut events: Vec<(String, String, String)> = state
        .as_array()
        .into_iter()
        .flatten()
        .map(|event| {
            let text = |key: &str| event[key].as_str().unwrap_or_default().to_owned();
            (text("type"), text("state_key"), text("event_id"))
        })
        .collect();
    events.sort();
    Ok(events)
}

/// The one check that needs to control a server process: the first server (Hearth) restarts
/// while a user of the second keeps sending into a room of the first. Afterwards both servers
/// must hold the same messages, each sender's in order, and the same room state: what the
/// second server could not deliver during the restart arrives through its retries and
/// through the first server fetching the missing events (`get_missing_events`).
pub(crate) async fn restart_while_the_other_side_sends(
    pair: &Pair,
    restart: impl std::future::Future<Output = Result<()>>,
    expected_failures: &BTreeMap<String, String>,
    timeout: Duration,
) -> TestResult {
    let started = Instant::now();
    let check = async {
        let (owner, guest, room_id) = joined_room(&pair.sides(true)).await?;
        owner.send_text(&room_id, "before the restart").await?;
        wait_body(&guest, &room_id, "before the restart").await?;
        const COUNT: usize = 20;
        let sending = async {
            for n in 0..COUNT {
                guest.send_text(&room_id, &format!("during {n}")).await?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok::<_, anyhow::Error>(())
        };
        let (sent, restarted) = tokio::join!(sending, restart);
        sent.context("sending from the other server")?;
        restarted.context("restarting the first server")?;
        // A new event from the restarted server tells the other one it is back.
        owner.send_text(&room_id, "after the restart").await?;
        guest.send_text(&room_id, "after the restart, away").await?;
        let mut expected: Vec<String> = vec!["before the restart".to_owned()];
        expected.extend((0..COUNT).map(|n| format!("during {n}")));
        for viewer in [&owner, &guest] {
            let seen = eventually(&format!("every message seen by {}", viewer.user_id), || async {
                let seen = bodies(viewer, &room_id).await?;
                let complete = expected.iter().all(|body| seen.contains(body))
                    && seen.iter().any(|body| body == "after the restart")
                    && seen.iter().any(|body| body == "after the restart, away");
                Ok(complete.then_some(seen))
            })
            .await?;
            let during: Vec<&String> =
                seen.iter().filter(|body| body.starts_with("during ")).collect();
            let in_order: Vec<&String> = expected.iter().skip(1).collect();
            ensure!(during == in_order, "{} sees them as {during:?}", viewer.user_id);
        }
        // Both servers end with the same room state.
        let owner_state = state_events(&owner, &room_id).await?;
        let guest_state = state_events(&guest, &room_id).await?;
        ensure!(
            owner_state == guest_state,
            "the room state differs: {owner_state:?} against {guest_state:?}"
        );
        Ok(())
    };
    let outcome = match tokio::time::timeout(timeout * 2, check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(format!("{error:#}")),
        Err(_) => Err(format!("timed out after {} s", (timeout * 2).as_secs())),
    };
    let finished = Finished {
        name: "federation::restart_while_the_other_side_sends".to_owned(),
        area: "federation".to_owned(),
        spec: format!("{SPEC}#transactions"),
        deviation: None,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    record(finished, outcome, expected_failures)
}
