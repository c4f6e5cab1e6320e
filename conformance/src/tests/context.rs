//! `GET /rooms/{roomId}/context/{eventId}`: the events around one event.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use crate::client::{Ctx, User, array, bodies, enc, is_type, room_path, str_field};

crate::tests! { "context";
    context_returns_event_with_events_before_and_after => "get_matrixclientv3roomsroomidcontexteventid";
    context_limit_caps_surrounding_events => "get_matrixclientv3roomsroomidcontexteventid";
    context_state_includes_members => "get_matrixclientv3roomsroomidcontexteventid";
    context_start_token_paginates_backwards => "get_matrixclientv3roomsroomidcontexteventid";
    context_of_unknown_event_is_not_found => "get_matrixclientv3roomsroomidcontexteventid";
    context_forbidden_to_non_members_of_private_room => "get_matrixclientv3roomsroomidcontexteventid";
}

/// A private room with messages c0..c4, returning the room and the id of c2.
async fn setup(user: &User) -> Result<(String, String)> {
    let room_id = user.create_private_room().await?;
    let mut middle = String::new();
    for index in 0..5 {
        let event_id = user.send_text(&room_id, &format!("c{index}")).await?;
        if index == 2 {
            middle = event_id;
        }
    }
    Ok((room_id, middle))
}

async fn context(user: &User, room_id: &str, event_id: &str, query: &str) -> Result<Value> {
    user.get(&room_path(room_id, &format!("/context/{}?{query}", enc(event_id)))).await?.ok()
}

async fn context_returns_event_with_events_before_and_after(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let (room_id, middle) = setup(&user).await?;
    let body = context(&user, &room_id, &middle, "limit=10").await?;
    ensure!(body.pointer("/event/event_id") == Some(&json!(middle)), "{body}");
    let before = bodies(array(&body, "/events_before"));
    let after = bodies(array(&body, "/events_after"));
    ensure!(
        before.starts_with(&["c1".to_owned(), "c0".to_owned()]),
        "before (newest first): {before:?}"
    );
    ensure!(after == ["c3", "c4"], "after: {after:?}");
    str_field(&body, "start")?;
    str_field(&body, "end")?;
    Ok(())
}

async fn context_limit_caps_surrounding_events(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let (room_id, middle) = setup(&user).await?;
    let body = context(&user, &room_id, &middle, "limit=2").await?;
    let total = array(&body, "/events_before").len() + array(&body, "/events_after").len();
    ensure!(total <= 2, "{total} events around with limit 2: {body}");
    Ok(())
}

async fn context_state_includes_members(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let (room_id, middle) = setup(&user).await?;
    let body = context(&user, &room_id, &middle, "limit=2").await?;
    ensure!(
        array(&body, "/state").iter().any(
            |e| is_type(e, "m.room.member") && e.get("state_key") == Some(&json!(user.user_id))
        ),
        "no member state: {body}"
    );
    Ok(())
}

async fn context_start_token_paginates_backwards(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let (room_id, middle) = setup(&user).await?;
    let body = context(&user, &room_id, &middle, "limit=2").await?;
    let before = bodies(array(&body, "/events_before"));
    let start = str_field(&body, "start")?;
    let older = user
        .get(&room_path(&room_id, &format!("/messages?dir=b&limit=10&from={}", enc(start))))
        .await?
        .ok()?;
    let older = bodies(array(&older, "/chunk"));
    for message in ["c0", "c1"] {
        let message = message.to_owned();
        ensure!(
            before.contains(&message) || older.contains(&message),
            "{message} neither before the event nor before the start token"
        );
    }
    ensure!(!older.iter().any(|b| b == "c2" || b == "c3"), "pagination went forwards: {older:?}");
    Ok(())
}

async fn context_of_unknown_event_is_not_found(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    user.get(&room_path(&room_id, "/context/%24nosuchevent")).await?.err(404, "M_NOT_FOUND")?;
    Ok(())
}

async fn context_forbidden_to_non_members_of_private_room(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let (room_id, middle) = setup(&a).await?;
    b.get(&room_path(&room_id, &format!("/context/{}", enc(&middle))))
        .await?
        .err(403, "M_FORBIDDEN")?;
    Ok(())
}
