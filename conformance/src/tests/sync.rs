//! `GET /sync`: initial and incremental syncs, long-polling, limited timelines, filters
//! (stored and inline), lazy-loaded members, and the invite and leave sections.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use super::fixtures::two_in_public_room;
use crate::client::{
    Ctx, User, array, bodies, enc, is_type, joined_room, pointer_key, str_field, timeline, v3,
};

crate::tests! { "sync";
    initial_sync_has_next_batch_and_joined_room => "get_matrixclientv3sync";
    initial_sync_room_has_state_and_timeline => "get_matrixclientv3sync";
    incremental_sync_returns_only_new_events => "get_matrixclientv3sync";
    long_poll_wakes_up_on_message_from_other_user => "get_matrixclientv3sync";
    long_poll_without_events_waits_then_returns => "get_matrixclientv3sync";
    timeline_limit_sets_limited_and_prev_batch => "syncing";
    short_timeline_is_not_limited => "syncing";
    filter_create_then_get_round_trips => "post_matrixclientv3useruseridfilter";
    filter_of_other_user_is_forbidden => "get_matrixclientv3useruseridfilterfilterid";
    unknown_filter_id_is_not_found => "get_matrixclientv3useruseridfilterfilterid";
    stored_filter_applies_to_sync => "filtering";
    inline_filter_applies_to_sync => "filtering";
    filter_types_keeps_only_those_types => "filtering";
    filter_not_types_drops_those_types => "filtering";
    filter_senders_keeps_only_those_senders => "filtering";
    filter_rooms_restricts_rooms => "filtering";
    lazy_load_members_sends_only_relevant_members => "lazy-loading-room-members";
    invite_appears_in_invite_section_with_stripped_state => "get_matrixclientv3sync";
    leave_appears_in_leave_section => "get_matrixclientv3sync";
    rejected_invite_leaves_invite_section => "get_matrixclientv3sync";
    full_state_returns_state_on_incremental_sync => "get_matrixclientv3sync";
    lazy_loading_summary_counts_members_and_names_heroes => "lazy-loading-room-members";
    sync_requires_authentication => "get_matrixclientv3sync";
}

async fn filtered_sync(user: &User, filter: Value, since: Option<&str>) -> Result<Value> {
    let mut query = format!("timeout=0&filter={}", enc(&filter.to_string()));
    if let Some(since) = since {
        query.push_str(&format!("&since={}", enc(since)));
    }
    user.sync(&query).await
}

async fn initial_sync_has_next_batch_and_joined_room(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let body = user.initial_sync().await?;
    str_field(&body, "next_batch")?;
    ensure!(joined_room(&body, &room_id).is_some(), "room not in rooms.join: {body}");
    Ok(())
}

async fn initial_sync_room_has_state_and_timeline(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_room(json!({"name": "Synced"})).await?;
    let event_id = user.send_text(&room_id, "hi").await?;
    let body = user.initial_sync().await?;
    let room = joined_room(&body, &room_id).cloned().unwrap_or_default();
    let mut events: Vec<Value> = array(&room, "/state/events").to_vec();
    events.extend(array(&room, "/timeline/events").iter().cloned());
    for event_type in ["m.room.create", "m.room.name", "m.room.member"] {
        ensure!(events.iter().any(|e| is_type(e, event_type)), "no {event_type} in {room}");
    }
    ensure!(
        array(&room, "/timeline/events")
            .iter()
            .any(|e| e.get("event_id") == Some(&json!(event_id))),
        "message not in timeline"
    );
    Ok(())
}

async fn incremental_sync_returns_only_new_events(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    user.send_text(&room_id, "old").await?;
    let first = user.initial_sync().await?;
    let since = str_field(&first, "next_batch")?.to_owned();
    let new_id = user.send_text(&room_id, "new").await?;
    let body = user.sync(&format!("since={}&timeout=10000", enc(&since))).await?;
    let events: Vec<Value> = timeline(&body, &room_id).into_iter().cloned().collect();
    ensure!(bodies(&events) == ["new"], "incremental timeline: {:?}", bodies(&events));
    ensure!(events.iter().any(|e| e.get("event_id") == Some(&json!(new_id))), "new event id");
    ensure!(str_field(&body, "next_batch")? != since, "next_batch did not move");
    Ok(())
}

/// A long poll that is still pending after a while is parked on the server; a message sent
/// then must answer it well before its timeout.
async fn long_poll_wakes_up_on_message_from_other_user(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let mut since = str_field(&b.initial_sync().await?, "next_batch")?.to_owned();
    let timeout_ms = 20_000u64;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let query = format!("since={}&timeout={timeout_ms}", enc(&since));
        let mut poll = Box::pin(b.sync(&query));
        match tokio::time::timeout(Duration::from_millis(500), &mut poll).await {
            // Answered early with something else (b's own join, presence): poll again.
            Ok(body) => {
                since = str_field(&body?, "next_batch")?.to_owned();
                ensure!(Instant::now() < deadline, "sync never stayed pending for 500 ms");
            }
            Err(_pending) => {
                a.send_text(&room_id, "wake up").await?;
                let sent = Instant::now();
                let body = poll.await?;
                let waited = sent.elapsed();
                ensure!(
                    waited < Duration::from_millis(timeout_ms / 2),
                    "the pending sync answered {waited:?} after the message, not woken by it"
                );
                let woken_by =
                    bodies(&timeline(&body, &room_id).into_iter().cloned().collect::<Vec<_>>());
                ensure!(
                    woken_by.contains(&"wake up".to_owned()),
                    "woken without the message: {body}"
                );
                return Ok(());
            }
        }
    }
}

async fn long_poll_without_events_waits_then_returns(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    // Let presence and other start-up noise settle, then poll a quiet room.
    let mut since = str_field(&user.initial_sync().await?, "next_batch")?.to_owned();
    for _ in 0..3 {
        let started = Instant::now();
        let body = user.sync(&format!("since={}&timeout=1000", enc(&since))).await?;
        let waited = started.elapsed();
        ensure!(timeline(&body, &room_id).is_empty(), "events in a quiet room: {body}");
        ensure!(waited < Duration::from_secs(10), "a 1 s long poll took {waited:?}");
        if waited >= Duration::from_millis(900) {
            return Ok(());
        }
        since = str_field(&body, "next_batch")?.to_owned();
    }
    anyhow::bail!("sync never waited for the timeout in a quiet room")
}

async fn timeline_limit_sets_limited_and_prev_batch(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    for index in 0..5 {
        user.send_text(&room_id, &format!("t{index}")).await?;
    }
    let body = filtered_sync(&user, json!({"room": {"timeline": {"limit": 2}}}), None).await?;
    let room = joined_room(&body, &room_id).cloned().unwrap_or_default();
    let events = array(&room, "/timeline/events");
    ensure!(bodies(events) == ["t3", "t4"], "timeline {:?}", bodies(events));
    ensure!(room.pointer("/timeline/limited") == Some(&json!(true)), "not limited: {room}");
    ensure!(room.pointer("/timeline/prev_batch").is_some_and(Value::is_string), "{room}");
    Ok(())
}

async fn short_timeline_is_not_limited(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let since = str_field(&user.initial_sync().await?, "next_batch")?.to_owned();
    user.send_text(&room_id, "just one").await?;
    let body =
        filtered_sync(&user, json!({"room": {"timeline": {"limit": 10}}}), Some(&since)).await?;
    let room = joined_room(&body, &room_id).cloned().unwrap_or_default();
    ensure!(bodies(array(&room, "/timeline/events")) == ["just one"], "{room}");
    ensure!(room.pointer("/timeline/limited") != Some(&json!(true)), "limited: {room}");
    Ok(())
}

async fn create_filter(user: &User, filter: Value) -> Result<String> {
    let path = v3(&format!("/user/{}/filter", enc(&user.user_id)));
    let body = user.post(&path, filter).await?.ok()?;
    Ok(str_field(&body, "filter_id")?.to_owned())
}

async fn filter_create_then_get_round_trips(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let filter = json!({"room": {"timeline": {"limit": 7, "types": ["m.room.message"]}}});
    let filter_id = create_filter(&user, filter.clone()).await?;
    let path = v3(&format!("/user/{}/filter/{}", enc(&user.user_id), enc(&filter_id)));
    let body = user.get(&path).await?.ok()?;
    ensure!(body.pointer("/room/timeline/limit") == Some(&json!(7)), "{body}");
    ensure!(body.pointer("/room/timeline/types") == Some(&json!(["m.room.message"])), "{body}");
    Ok(())
}

async fn filter_of_other_user_is_forbidden(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let filter_id = create_filter(&a, json!({})).await?;
    let path = v3(&format!("/user/{}/filter/{}", enc(&a.user_id), enc(&filter_id)));
    b.get(&path).await?.err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn unknown_filter_id_is_not_found(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let path = v3(&format!("/user/{}/filter/987654", enc(&user.user_id)));
    user.get(&path).await?.err(404, "M_NOT_FOUND")?;
    Ok(())
}

async fn stored_filter_applies_to_sync(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    for index in 0..3 {
        user.send_text(&room_id, &format!("s{index}")).await?;
    }
    let filter_id = create_filter(&user, json!({"room": {"timeline": {"limit": 1}}})).await?;
    let body = user.sync(&format!("timeout=0&filter={}", enc(&filter_id))).await?;
    let events: Vec<Value> = timeline(&body, &room_id).into_iter().cloned().collect();
    ensure!(events.len() == 1 && bodies(&events) == ["s2"], "timeline {events:?}");
    Ok(())
}

async fn inline_filter_applies_to_sync(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    user.send_text(&room_id, "i0").await?;
    user.send_text(&room_id, "i1").await?;
    let body = filtered_sync(&user, json!({"room": {"timeline": {"limit": 1}}}), None).await?;
    let events: Vec<Value> = timeline(&body, &room_id).into_iter().cloned().collect();
    ensure!(events.len() == 1 && bodies(&events) == ["i1"], "timeline {events:?}");
    Ok(())
}

async fn filter_types_keeps_only_those_types(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    user.send(&room_id, "org.example.a", json!({})).await?;
    user.send_text(&room_id, "msg").await?;
    let filter = json!({"room": {"timeline": {"types": ["org.example.a"]}}});
    let body = filtered_sync(&user, filter, None).await?;
    let events = timeline(&body, &room_id);
    ensure!(!events.is_empty() && events.iter().all(|e| is_type(e, "org.example.a")), "{events:?}");
    Ok(())
}

async fn filter_not_types_drops_those_types(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    user.send(&room_id, "org.example.noise", json!({})).await?;
    user.send_text(&room_id, "signal").await?;
    let filter = json!({"room": {"timeline": {"not_types": ["org.example.noise"]}}});
    let body = filtered_sync(&user, filter, None).await?;
    let events = timeline(&body, &room_id);
    ensure!(!events.iter().any(|e| is_type(e, "org.example.noise")), "{events:?}");
    ensure!(events.iter().any(|e| is_type(e, "m.room.message")), "{events:?}");
    Ok(())
}

async fn filter_senders_keeps_only_those_senders(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    a.send_text(&room_id, "from a").await?;
    b.send_text(&room_id, "from b").await?;
    let filter = json!({"room": {"timeline": {"senders": [b.user_id], "limit": 50}}});
    let body = filtered_sync(&a, filter, None).await?;
    let events = timeline(&body, &room_id);
    ensure!(!events.is_empty(), "no events from b");
    ensure!(events.iter().all(|e| e.get("sender") == Some(&json!(b.user_id))), "{events:?}");
    Ok(())
}

async fn filter_rooms_restricts_rooms(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let wanted = user.create_private_room().await?;
    let other = user.create_private_room().await?;
    let body = filtered_sync(&user, json!({"room": {"rooms": [wanted]}}), None).await?;
    ensure!(joined_room(&body, &wanted).is_some(), "wanted room missing");
    ensure!(joined_room(&body, &other).is_none(), "filtered-out room present");
    Ok(())
}

async fn lazy_load_members_sends_only_relevant_members(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    // A named room: unnamed ones also get the members of their heroes (see the summary test).
    let room_id = a.create_room(json!({"preset": "public_chat", "name": "Lazy"})).await?;
    b.join(&room_id).await?;
    let c = ctx.user().await?;
    c.join(&room_id).await?;
    c.send_text(&room_id, "from c").await?;
    let filter = json!({"room": {
        "state": {"lazy_load_members": true},
        "timeline": {"limit": 1},
    }});
    let body = filtered_sync(&a, filter, None).await?;
    let room = joined_room(&body, &room_id).cloned().unwrap_or_default();
    ensure!(bodies(array(&room, "/timeline/events")) == ["from c"], "{room}");
    let members: Vec<&str> = array(&room, "/state/events")
        .iter()
        .filter(|e| is_type(e, "m.room.member"))
        .filter_map(|e| e.get("state_key").and_then(Value::as_str))
        .collect();
    ensure!(members.contains(&c.user_id.as_str()), "sender c missing: {members:?}");
    ensure!(!members.contains(&b.user_id.as_str()), "silent b sent anyway: {members:?}");
    Ok(())
}

async fn invite_appears_in_invite_section_with_stripped_state(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_room(json!({"preset": "private_chat", "name": "Invite me"})).await?;
    a.invite(&room_id, &b.user_id).await?;
    let invite = b
        .sync_until("", "the invite", |sync| {
            sync.pointer(&format!("/rooms/invite/{}", pointer_key(&room_id))).cloned()
        })
        .await?;
    let events = array(&invite, "/invite_state/events");
    ensure!(
        events.iter().any(|e| is_type(e, "m.room.member")
            && e.get("state_key") == Some(&json!(b.user_id))
            && e.pointer("/content/membership") == Some(&json!("invite"))),
        "no invite member event: {invite}"
    );
    ensure!(
        events.iter().any(|e| is_type(e, "m.room.name")
            && e.pointer("/content/name") == Some(&json!("Invite me"))),
        "no room name in invite_state: {invite}"
    );
    for event in events {
        ensure!(event.get("sender").is_some() && event.get("state_key").is_some(), "{event}");
    }
    Ok(())
}

async fn leave_appears_in_leave_section(ctx: Ctx) -> Result<()> {
    let (_a, b, room_id) = two_in_public_room(&ctx).await?;
    let since = str_field(&b.initial_sync().await?, "next_batch")?.to_owned();
    b.leave(&room_id).await?;
    let body = b.sync(&format!("since={}&timeout=10000", enc(&since))).await?;
    let left = body.pointer(&format!("/rooms/leave/{}", pointer_key(&room_id)));
    ensure!(left.is_some(), "room not in rooms.leave: {body}");
    ensure!(joined_room(&body, &room_id).is_none(), "room still in rooms.join");
    Ok(())
}

async fn rejected_invite_leaves_invite_section(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_private_room().await?;
    a.invite(&room_id, &b.user_id).await?;
    b.leave(&room_id).await?;
    let body = b.initial_sync().await?;
    ensure!(
        body.pointer(&format!("/rooms/invite/{}", pointer_key(&room_id))).is_none(),
        "rejected invite still listed: {body}"
    );
    Ok(())
}

async fn full_state_returns_state_on_incremental_sync(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_room(json!({"name": "Full"})).await?;
    let since = str_field(&user.initial_sync().await?, "next_batch")?.to_owned();
    user.send_text(&room_id, "poke").await?;
    let body = user.sync(&format!("since={}&timeout=0&full_state=true", enc(&since))).await?;
    let room = joined_room(&body, &room_id).cloned().unwrap_or_default();
    let mut events: Vec<Value> = array(&room, "/state/events").to_vec();
    events.extend(array(&room, "/timeline/events").iter().cloned());
    for event_type in ["m.room.create", "m.room.name", "m.room.power_levels"] {
        ensure!(events.iter().any(|e| is_type(e, event_type)), "no {event_type}: {room}");
    }
    Ok(())
}

/// Servers send the room summary when members are lazy-loaded: clients then lack the full
/// member list to name the room themselves.
async fn lazy_loading_summary_counts_members_and_names_heroes(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let c = ctx.user().await?;
    a.invite(&room_id, &c.user_id).await?;
    let filter = json!({"room": {"state": {"lazy_load_members": true}}});
    let body = filtered_sync(&a, filter, None).await?;
    let summary = joined_room(&body, &room_id).and_then(|room| room.get("summary")).cloned();
    let Some(summary) = summary else { anyhow::bail!("no summary: {body}") };
    ensure!(summary.get("m.joined_member_count") == Some(&json!(2)), "{summary}");
    ensure!(summary.get("m.invited_member_count") == Some(&json!(1)), "{summary}");
    let heroes = array(&summary, "/m.heroes");
    ensure!(heroes.contains(&json!(b.user_id)), "b not among heroes: {summary}");
    ensure!(!heroes.contains(&json!(a.user_id)), "the syncing user is a hero: {summary}");
    Ok(())
}

async fn sync_requires_authentication(ctx: Ctx) -> Result<()> {
    ctx.get(&v3("/sync")).await?.err(401, "M_MISSING_TOKEN")?;
    Ok(())
}
