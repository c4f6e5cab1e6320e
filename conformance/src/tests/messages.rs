//! History: `GET /rooms/{roomId}/messages` in both directions with `from`, `to`, `limit` and
//! `filter`.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use super::fixtures::two_in_public_room;
use crate::client::{Ctx, User, array, bodies, enc, is_type, room_path, str_field};

crate::tests! { "messages";
    backwards_returns_newest_first => "get_matrixclientv3roomsroomidmessages";
    forwards_without_from_starts_at_the_beginning => "get_matrixclientv3roomsroomidmessages";
    limit_caps_the_chunk_and_end_continues => "get_matrixclientv3roomsroomidmessages";
    backwards_from_sync_prev_batch_reaches_older_events => "get_matrixclientv3roomsroomidmessages";
    forwards_from_token_returns_newer_events => "get_matrixclientv3roomsroomidmessages";
    to_token_stops_pagination => "get_matrixclientv3roomsroomidmessages";
    paginating_past_the_start_returns_no_end => "get_matrixclientv3roomsroomidmessages";
    filter_types_restricts_events => "get_matrixclientv3roomsroomidmessages";
    filter_not_senders_excludes_sender => "get_matrixclientv3roomsroomidmessages";
    lazy_load_members_returns_sender_member_state => "lazy-loading-room-members";
    messages_forbidden_to_non_members_of_private_room => "get_matrixclientv3roomsroomidmessages";
    invalid_dir_is_rejected => "get_matrixclientv3roomsroomidmessages";
}

async fn messages(user: &User, room_id: &str, query: &str) -> Result<Value> {
    user.get(&room_path(room_id, &format!("/messages?{query}"))).await?.ok()
}

/// A private room with `count` messages `m0`, `m1`, ...
async fn room_with_messages(user: &User, count: usize) -> Result<String> {
    let room_id = user.create_private_room().await?;
    for index in 0..count {
        user.send_text(&room_id, &format!("m{index}")).await?;
    }
    Ok(room_id)
}

async fn backwards_returns_newest_first(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = room_with_messages(&user, 3).await?;
    let body = messages(&user, &room_id, "dir=b&limit=3").await?;
    ensure!(bodies(array(&body, "/chunk")) == ["m2", "m1", "m0"], "{body}");
    str_field(&body, "start")?;
    Ok(())
}

async fn forwards_without_from_starts_at_the_beginning(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = room_with_messages(&user, 3).await?;
    let body = messages(&user, &room_id, "dir=f&limit=50").await?;
    let chunk = array(&body, "/chunk");
    ensure!(
        chunk.first().is_some_and(|e| is_type(e, "m.room.create")),
        "first is not the create event: {body}"
    );
    ensure!(bodies(chunk) == ["m0", "m1", "m2"], "{body}");
    Ok(())
}

async fn limit_caps_the_chunk_and_end_continues(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = room_with_messages(&user, 5).await?;
    let first = messages(&user, &room_id, "dir=b&limit=2").await?;
    ensure!(array(&first, "/chunk").len() == 2, "{first}");
    ensure!(bodies(array(&first, "/chunk")) == ["m4", "m3"], "{first}");
    let end = str_field(&first, "end")?;
    let second = messages(&user, &room_id, &format!("dir=b&limit=2&from={}", enc(end))).await?;
    ensure!(bodies(array(&second, "/chunk")) == ["m2", "m1"], "{second}");
    Ok(())
}

async fn backwards_from_sync_prev_batch_reaches_older_events(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = room_with_messages(&user, 4).await?;
    let filter = enc(&json!({"room": {"timeline": {"limit": 1}}}).to_string());
    let sync = user.sync(&format!("timeout=0&filter={filter}")).await?;
    let room = crate::client::joined_room(&sync, &room_id);
    let prev_batch = room.and_then(|r| r.pointer("/timeline/prev_batch")).and_then(Value::as_str);
    let Some(prev_batch) = prev_batch else { anyhow::bail!("no prev_batch: {sync}") };
    ensure!(
        bodies(&crate::client::timeline(&sync, &room_id).into_iter().cloned().collect::<Vec<_>>())
            == ["m3"],
        "timeline"
    );
    let body =
        messages(&user, &room_id, &format!("dir=b&limit=2&from={}", enc(prev_batch))).await?;
    ensure!(bodies(array(&body, "/chunk")) == ["m2", "m1"], "{body}");
    Ok(())
}

async fn forwards_from_token_returns_newer_events(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = room_with_messages(&user, 2).await?;
    let back = messages(&user, &room_id, "dir=b&limit=1").await?;
    let start = str_field(&back, "start")?.to_owned();
    // Nothing newer yet; then two more messages appear after the token.
    user.send_text(&room_id, "later1").await?;
    user.send_text(&room_id, "later2").await?;
    let body = messages(&user, &room_id, &format!("dir=f&limit=10&from={}", enc(&start))).await?;
    ensure!(bodies(array(&body, "/chunk")) == ["later1", "later2"], "{body}");
    Ok(())
}

async fn to_token_stops_pagination(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = room_with_messages(&user, 2).await?;
    let mark = messages(&user, &room_id, "dir=b&limit=1").await?;
    let to = str_field(&mark, "start")?.to_owned();
    user.send_text(&room_id, "after1").await?;
    user.send_text(&room_id, "after2").await?;
    let body = messages(&user, &room_id, &format!("dir=b&limit=10&to={}", enc(&to))).await?;
    ensure!(bodies(array(&body, "/chunk")) == ["after2", "after1"], "{body}");
    Ok(())
}

async fn paginating_past_the_start_returns_no_end(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = room_with_messages(&user, 1).await?;
    let mut from: Option<String> = None;
    for _ in 0..20 {
        let query = match &from {
            Some(token) => format!("dir=b&limit=5&from={}", enc(token)),
            None => "dir=b&limit=5".to_owned(),
        };
        let body = messages(&user, &room_id, &query).await?;
        match body.get("end").and_then(Value::as_str) {
            None => return Ok(()),
            Some(end) => from = Some(end.to_owned()),
        }
    }
    anyhow::bail!("still an end token after 20 pages of a small room")
}

async fn filter_types_restricts_events(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = room_with_messages(&user, 2).await?;
    user.send(&room_id, "org.example.other", json!({"x": 1})).await?;
    let filter = enc(&json!({"types": ["m.room.message"]}).to_string());
    let body = messages(&user, &room_id, &format!("dir=b&limit=10&filter={filter}")).await?;
    let chunk = array(&body, "/chunk");
    ensure!(!chunk.is_empty() && chunk.iter().all(|e| is_type(e, "m.room.message")), "{body}");
    Ok(())
}

async fn filter_not_senders_excludes_sender(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    a.send_text(&room_id, "from a").await?;
    b.send_text(&room_id, "from b").await?;
    let filter = enc(&json!({"not_senders": [a.user_id]}).to_string());
    let body = messages(&b, &room_id, &format!("dir=b&limit=20&filter={filter}")).await?;
    let chunk = array(&body, "/chunk");
    ensure!(chunk.iter().all(|e| e.get("sender") != Some(&json!(a.user_id))), "{body}");
    ensure!(bodies(chunk).contains(&"from b".to_owned()), "{body}");
    Ok(())
}

async fn lazy_load_members_returns_sender_member_state(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    b.send_text(&room_id, "b speaks").await?;
    let filter = enc(&json!({"lazy_load_members": true, "types": ["m.room.message"]}).to_string());
    let body = messages(&a, &room_id, &format!("dir=b&limit=1&filter={filter}")).await?;
    ensure!(bodies(array(&body, "/chunk")) == ["b speaks"], "{body}");
    let state = array(&body, "/state");
    ensure!(
        state
            .iter()
            .any(|e| is_type(e, "m.room.member") && e.get("state_key") == Some(&json!(b.user_id))),
        "no member event of the sender in state: {body}"
    );
    Ok(())
}

async fn messages_forbidden_to_non_members_of_private_room(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = room_with_messages(&a, 1).await?;
    b.get(&room_path(&room_id, "/messages?dir=b")).await?.err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn invalid_dir_is_rejected(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let resp = user.get(&room_path(&room_id, "/messages?dir=sideways")).await?;
    resp.err_any(400, &["M_INVALID_PARAM", "M_UNKNOWN"])?;
    Ok(())
}
