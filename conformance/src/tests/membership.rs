//! Room membership: join (by id and alias), knock, invite, leave, kick, ban, unban, forget, and the
//! member listings (`joined_rooms`, `joined_members`, `members` with its filters).

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use super::fixtures::{membership_of, server_name, two_in_public_room};
use crate::client::{Ctx, array, enc, is_type, room_path, str_field, v3};

crate::tests! { "membership";
    join_public_room_by_id => "post_matrixclientv3joinroomidoralias";
    join_public_room_by_alias => "post_matrixclientv3joinroomidoralias";
    join_via_rooms_join_endpoint => "post_matrixclientv3roomsroomidjoin";
    join_invite_only_room_without_invite_is_forbidden => "post_matrixclientv3joinroomidoralias";
    join_is_seen_by_other_member => "post_matrixclientv3joinroomidoralias";
    knock_is_seen_by_member_who_can_invite => "post_matrixclientv3knockroomidoralias";
    knock_on_public_room_is_forbidden => "post_matrixclientv3knockroomidoralias";
    invite_then_join => "post_matrixclientv3roomsroomidinvite";
    invite_by_non_member_is_forbidden => "post_matrixclientv3roomsroomidinvite";
    invite_of_joined_member_is_forbidden => "post_matrixclientv3roomsroomidinvite";
    reject_invite_by_leaving => "post_matrixclientv3roomsroomidleave";
    leave_sets_membership_leave => "post_matrixclientv3roomsroomidleave";
    leave_with_reason_keeps_the_reason => "post_matrixclientv3roomsroomidleave";
    kick_removes_member_with_reason => "post_matrixclientv3roomsroomidkick";
    kick_without_power_is_forbidden => "post_matrixclientv3roomsroomidkick";
    kicked_user_can_rejoin_public_room => "post_matrixclientv3roomsroomidkick";
    ban_sets_ban_and_blocks_rejoin => "post_matrixclientv3roomsroomidban";
    ban_without_power_is_forbidden => "post_matrixclientv3roomsroomidban";
    unban_allows_rejoin => "post_matrixclientv3roomsroomidunban";
    forget_after_leave_succeeds => "post_matrixclientv3roomsroomidforget";
    forget_while_joined_is_rejected => "post_matrixclientv3roomsroomidforget";
    joined_rooms_lists_and_drops_rooms => "get_matrixclientv3joined_rooms";
    joined_members_lists_members_with_profiles => "get_matrixclientv3roomsroomidjoined_members";
    members_lists_member_events => "get_matrixclientv3roomsroomidmembers";
    members_filtered_by_membership => "get_matrixclientv3roomsroomidmembers";
    members_filtered_by_not_membership => "get_matrixclientv3roomsroomidmembers";
    members_at_earlier_token_omit_later_joins => "get_matrixclientv3roomsroomidmembers";
    members_of_private_room_forbidden_to_non_members => "get_matrixclientv3roomsroomidmembers";
}

fn member_ids(members: &Value) -> Vec<String> {
    array(members, "/chunk")
        .iter()
        .filter_map(|e| e.get("state_key").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

async fn join_public_room_by_id(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_public_room().await?;
    ensure!(b.join(&room_id).await? == room_id, "join answered another room id");
    ensure!(membership_of(&a, &room_id, &b.user_id).await? == "join", "b not joined");
    Ok(())
}

async fn join_public_room_by_alias(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let localpart = ctx.unique("joinalias");
    let room_id =
        a.create_room(json!({"preset": "public_chat", "room_alias_name": localpart})).await?;
    let alias = format!("#{localpart}:{}", server_name(&a));
    ensure!(b.join(&alias).await? == room_id, "join by alias answered another room id");
    ensure!(membership_of(&a, &room_id, &b.user_id).await? == "join", "b not joined");
    Ok(())
}

async fn join_via_rooms_join_endpoint(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_public_room().await?;
    let body = b.post(&room_path(&room_id, "/join"), json!({})).await?.ok()?;
    ensure!(str_field(&body, "room_id")? == room_id, "{body}");
    Ok(())
}

async fn join_invite_only_room_without_invite_is_forbidden(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_private_room().await?;
    b.post(&v3(&format!("/join/{}", enc(&room_id))), json!({})).await?.err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn join_is_seen_by_other_member(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    a.sync_until_timeline_event(&room_id, "b's join", |event| {
        is_type(event, "m.room.member")
            && event.get("state_key") == Some(&json!(b.user_id))
            && event.pointer("/content/membership") == Some(&json!("join"))
    })
    .await?;
    Ok(())
}

/// A room whose join rule is `knock` (every default room version since 7 has knocking).
async fn knock_room(a: &crate::client::User) -> Result<String> {
    a.create_room(json!({
        "preset": "private_chat",
        "initial_state": [
            {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}
        ],
    }))
    .await
}

async fn knock_is_seen_by_member_who_can_invite(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = knock_room(&a).await?;
    let body = b
        .post(&v3(&format!("/knock/{}", enc(&room_id))), json!({"reason": "please"}))
        .await?
        .ok()?;
    ensure!(str_field(&body, "room_id")? == room_id, "{body}");
    a.sync_until_timeline_event(&room_id, "b's knock", |event| {
        is_type(event, "m.room.member")
            && event.get("state_key") == Some(&json!(b.user_id))
            && event.pointer("/content/membership") == Some(&json!("knock"))
    })
    .await?;
    a.invite(&room_id, &b.user_id).await?;
    ensure!(membership_of(&a, &room_id, &b.user_id).await? == "invite", "b not invited");
    Ok(())
}

async fn knock_on_public_room_is_forbidden(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_public_room().await?;
    b.post(&v3(&format!("/knock/{}", enc(&room_id))), json!({})).await?.err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn invite_then_join(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_private_room().await?;
    a.invite(&room_id, &b.user_id).await?;
    let member = a.get_state(&room_id, "m.room.member", &b.user_id).await?;
    ensure!(member.get("membership") == Some(&json!("invite")), "{member}");
    b.join(&room_id).await?;
    ensure!(membership_of(&a, &room_id, &b.user_id).await? == "join", "b not joined");
    Ok(())
}

async fn invite_by_non_member_is_forbidden(ctx: Ctx) -> Result<()> {
    let (a, b, c) = (ctx.user().await?, ctx.user().await?, ctx.user().await?);
    let room_id = a.create_private_room().await?;
    b.post(&room_path(&room_id, "/invite"), json!({"user_id": c.user_id}))
        .await?
        .err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn invite_of_joined_member_is_forbidden(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    a.post(&room_path(&room_id, "/invite"), json!({"user_id": b.user_id}))
        .await?
        .err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn reject_invite_by_leaving(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_private_room().await?;
    a.invite(&room_id, &b.user_id).await?;
    b.leave(&room_id).await?;
    ensure!(membership_of(&a, &room_id, &b.user_id).await? == "leave", "invite not rejected");
    Ok(())
}

async fn leave_sets_membership_leave(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    b.leave(&room_id).await?;
    ensure!(membership_of(&a, &room_id, &b.user_id).await? == "leave", "b did not leave");
    Ok(())
}

async fn leave_with_reason_keeps_the_reason(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    b.post(&room_path(&room_id, "/leave"), json!({"reason": "bye now"})).await?.ok()?;
    let member = a.get_state(&room_id, "m.room.member", &b.user_id).await?;
    ensure!(member.get("reason") == Some(&json!("bye now")), "{member}");
    Ok(())
}

async fn kick_removes_member_with_reason(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    a.post(&room_path(&room_id, "/kick"), json!({"user_id": b.user_id, "reason": "testing"}))
        .await?
        .ok()?;
    let event = b
        .sync_until("", "the kick", |sync| {
            let path =
                format!("/rooms/leave/{}/timeline/events", crate::client::pointer_key(&room_id));
            array(sync, &path)
                .iter()
                .find(|e| {
                    is_type(e, "m.room.member")
                        && e.get("state_key") == Some(&json!(b.user_id))
                        && e.pointer("/content/membership") == Some(&json!("leave"))
                })
                .cloned()
        })
        .await?;
    ensure!(event.pointer("/content/membership") == Some(&json!("leave")), "{event}");
    ensure!(event.pointer("/content/reason") == Some(&json!("testing")), "{event}");
    ensure!(event.get("sender") == Some(&json!(a.user_id)), "{event}");
    Ok(())
}

async fn kick_without_power_is_forbidden(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    b.post(&room_path(&room_id, "/kick"), json!({"user_id": a.user_id}))
        .await?
        .err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn kicked_user_can_rejoin_public_room(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    a.post(&room_path(&room_id, "/kick"), json!({"user_id": b.user_id})).await?.ok()?;
    b.join(&room_id).await?;
    Ok(())
}

async fn ban_sets_ban_and_blocks_rejoin(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    a.post(&room_path(&room_id, "/ban"), json!({"user_id": b.user_id, "reason": "spam"}))
        .await?
        .ok()?;
    let member = a.get_state(&room_id, "m.room.member", &b.user_id).await?;
    ensure!(member.get("membership") == Some(&json!("ban")), "{member}");
    ensure!(member.get("reason") == Some(&json!("spam")), "{member}");
    // The spec leaves the errcode open ("a meaningful errcode"); Synapse says M_BAD_STATE.
    let resp = b.post(&room_path(&room_id, "/join"), json!({})).await?;
    ensure!(
        resp.status == 403 && resp.body.get("errcode").is_some(),
        "{} {}",
        resp.status,
        resp.body
    );
    Ok(())
}

async fn ban_without_power_is_forbidden(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    b.post(&room_path(&room_id, "/ban"), json!({"user_id": a.user_id}))
        .await?
        .err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn unban_allows_rejoin(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    a.post(&room_path(&room_id, "/ban"), json!({"user_id": b.user_id})).await?.ok()?;
    a.post(&room_path(&room_id, "/unban"), json!({"user_id": b.user_id})).await?.ok()?;
    ensure!(membership_of(&a, &room_id, &b.user_id).await? == "leave", "unban is not leave");
    b.join(&room_id).await?;
    Ok(())
}

async fn forget_after_leave_succeeds(ctx: Ctx) -> Result<()> {
    let (_a, b, room_id) = two_in_public_room(&ctx).await?;
    b.leave(&room_id).await?;
    b.post(&room_path(&room_id, "/forget"), json!({})).await?.ok()?;
    let rooms = b.get(&v3("/joined_rooms")).await?.ok()?;
    ensure!(!array(&rooms, "/joined_rooms").contains(&json!(room_id)), "{rooms}");
    Ok(())
}

async fn forget_while_joined_is_rejected(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    user.post(&room_path(&room_id, "/forget"), json!({})).await?.err(400, "M_UNKNOWN")?;
    Ok(())
}

async fn joined_rooms_lists_and_drops_rooms(ctx: Ctx) -> Result<()> {
    let (_a, b, room_id) = two_in_public_room(&ctx).await?;
    let rooms = b.get(&v3("/joined_rooms")).await?.ok()?;
    ensure!(array(&rooms, "/joined_rooms").contains(&json!(room_id)), "{rooms}");
    b.leave(&room_id).await?;
    let rooms = b.get(&v3("/joined_rooms")).await?.ok()?;
    ensure!(!array(&rooms, "/joined_rooms").contains(&json!(room_id)), "{rooms}");
    Ok(())
}

async fn joined_members_lists_members_with_profiles(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    b.put(&v3(&format!("/profile/{}/displayname", enc(&b.user_id))), json!({"displayname": "Bee"}))
        .await?
        .ok()?;
    let room_id = a.create_public_room().await?;
    b.join(&room_id).await?;
    let body = a.get(&room_path(&room_id, "/joined_members")).await?.ok()?;
    let joined = body.get("joined").and_then(Value::as_object);
    ensure!(joined.is_some_and(|j| j.len() == 2 && j.contains_key(&a.user_id)), "joined: {body}");
    ensure!(
        body.pointer(&format!("/joined/{}/display_name", b.user_id)) == Some(&json!("Bee")),
        "b's display name missing: {body}"
    );
    Ok(())
}

async fn members_lists_member_events(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    let body = a.get(&room_path(&room_id, "/members")).await?.ok()?;
    let mut ids = member_ids(&body);
    ids.sort();
    let mut expected = vec![a.user_id.clone(), b.user_id.clone()];
    expected.sort();
    ensure!(ids == expected, "members {ids:?}");
    ensure!(array(&body, "/chunk").iter().all(|e| is_type(e, "m.room.member")), "{body}");
    Ok(())
}

async fn members_filtered_by_membership(ctx: Ctx) -> Result<()> {
    let (a, b, c) = (ctx.user().await?, ctx.user().await?, ctx.user().await?);
    let room_id = a.create_public_room().await?;
    b.join(&room_id).await?;
    a.invite(&room_id, &c.user_id).await?;
    let invited = a.get(&room_path(&room_id, "/members?membership=invite")).await?.ok()?;
    ensure!(member_ids(&invited) == vec![c.user_id.clone()], "invited {invited}");
    let joined = a.get(&room_path(&room_id, "/members?membership=join")).await?.ok()?;
    let ids = member_ids(&joined);
    ensure!(ids.len() == 2 && !ids.contains(&c.user_id), "joined {ids:?}");
    Ok(())
}

async fn members_filtered_by_not_membership(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    b.leave(&room_id).await?;
    let body = a.get(&room_path(&room_id, "/members?not_membership=leave")).await?.ok()?;
    ensure!(member_ids(&body) == vec![a.user_id.clone()], "{body}");
    Ok(())
}

async fn members_at_earlier_token_omit_later_joins(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_public_room().await?;
    a.send_text(&room_id, "before b joins").await?;
    let sync = a.initial_sync().await?;
    let token = str_field(&sync, "next_batch")?.to_owned();
    b.join(&room_id).await?;
    let now = a.get(&room_path(&room_id, "/members")).await?.ok()?;
    ensure!(member_ids(&now).contains(&b.user_id), "b missing now: {now}");
    let then = a.get(&room_path(&room_id, &format!("/members?at={}", enc(&token)))).await?.ok()?;
    ensure!(!member_ids(&then).contains(&b.user_id), "b present at the earlier token: {then}");
    Ok(())
}

async fn members_of_private_room_forbidden_to_non_members(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_private_room().await?;
    b.get(&room_path(&room_id, "/members")).await?.err(403, "M_FORBIDDEN")?;
    Ok(())
}
