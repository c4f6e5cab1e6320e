//! Profiles: display name, avatar URL, the whole profile, and their propagation into rooms.

use anyhow::{Result, ensure};
use serde_json::json;

use super::fixtures::two_in_public_room;
use crate::client::{Ctx, enc, is_type, str_field, v3};

crate::tests! { "profile";
    displayname_set_then_get => "put_matrixclientv3profileuseridkeyname";
    avatar_url_set_then_get => "put_matrixclientv3profileuseridkeyname";
    whole_profile_has_displayname_and_avatar => "get_matrixclientv3profileuserid";
    profile_is_readable_by_other_users => "get_matrixclientv3profileuserid";
    profile_of_unknown_user_is_not_found => "get_matrixclientv3profileuserid",
        deviation = "404 \"There is no profile information for this user or this user does not exist\" (example errcode M_NOT_FOUND); Synapse answers 404 M_UNKNOWN, so either errcode passes";
    setting_another_users_displayname_is_forbidden => "put_matrixclientv3profileuseridkeyname",
        deviation = "403 M_FORBIDDEN \"The server is unwilling to perform the operation, either due to insufficient permissions\"; Synapse answers 400 M_FORBIDDEN, so either status passes";
    displayname_change_updates_member_event_seen_by_others => "events-on-change-of-profile-information";
    avatar_change_updates_member_event => "events-on-change-of-profile-information";
}

fn profile_path(user_id: &str, rest: &str) -> String {
    v3(&format!("/profile/{}{rest}", enc(user_id)))
}

async fn displayname_set_then_get(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let path = profile_path(&user.user_id, "/displayname");
    user.put(&path, json!({"displayname": "Conformance Tester"})).await?.ok()?;
    let body = user.get(&path).await?.ok()?;
    ensure!(str_field(&body, "displayname")? == "Conformance Tester", "{body}");
    Ok(())
}

async fn avatar_url_set_then_get(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let path = profile_path(&user.user_id, "/avatar_url");
    user.put(&path, json!({"avatar_url": "mxc://example.org/avatar"})).await?.ok()?;
    let body = user.get(&path).await?.ok()?;
    ensure!(str_field(&body, "avatar_url")? == "mxc://example.org/avatar", "{body}");
    Ok(())
}

async fn whole_profile_has_displayname_and_avatar(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    user.put(&profile_path(&user.user_id, "/displayname"), json!({"displayname": "Whole"}))
        .await?
        .ok()?;
    user.put(
        &profile_path(&user.user_id, "/avatar_url"),
        json!({"avatar_url": "mxc://example.org/w"}),
    )
    .await?
    .ok()?;
    let body = user.get(&profile_path(&user.user_id, "")).await?.ok()?;
    ensure!(body.get("displayname") == Some(&json!("Whole")), "{body}");
    ensure!(body.get("avatar_url") == Some(&json!("mxc://example.org/w")), "{body}");
    Ok(())
}

async fn profile_is_readable_by_other_users(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    a.put(&profile_path(&a.user_id, "/displayname"), json!({"displayname": "Visible"}))
        .await?
        .ok()?;
    let body = b.get(&profile_path(&a.user_id, "/displayname")).await?.ok()?;
    ensure!(body.get("displayname") == Some(&json!("Visible")), "{body}");
    Ok(())
}

async fn profile_of_unknown_user_is_not_found(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let nobody = format!("@{}:{}", ctx.unique("nobody"), super::fixtures::server_name(&user));
    user.get(&profile_path(&nobody, "")).await?.err_any(404, &["M_NOT_FOUND", "M_UNKNOWN"])?;
    Ok(())
}

async fn setting_another_users_displayname_is_forbidden(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let resp = b
        .put(&profile_path(&a.user_id, "/displayname"), json!({"displayname": "Hijacked"}))
        .await?;
    if resp.status == 400 {
        resp.err(400, "M_FORBIDDEN")?;
    } else {
        resp.err(403, "M_FORBIDDEN")?;
    }
    let body = a.get(&profile_path(&a.user_id, "/displayname")).await?;
    ensure!(body.body.get("displayname") != Some(&json!("Hijacked")), "name changed anyway");
    Ok(())
}

async fn displayname_change_updates_member_event_seen_by_others(ctx: Ctx) -> Result<()> {
    let (a, b, room_id) = two_in_public_room(&ctx).await?;
    a.put(&profile_path(&a.user_id, "/displayname"), json!({"displayname": "New Name"}))
        .await?
        .ok()?;
    b.sync_until_timeline_event(&room_id, "A's member event with the new name", |event| {
        is_type(event, "m.room.member")
            && event.get("state_key") == Some(&json!(a.user_id))
            && event.pointer("/content/displayname") == Some(&json!("New Name"))
            && event.pointer("/content/membership") == Some(&json!("join"))
    })
    .await?;
    Ok(())
}

async fn avatar_change_updates_member_event(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    user.put(
        &profile_path(&user.user_id, "/avatar_url"),
        json!({"avatar_url": "mxc://example.org/new"}),
    )
    .await?
    .ok()?;
    crate::client::eventually("the member event to carry the avatar", || async {
        let content = user.get_state(&room_id, "m.room.member", &user.user_id).await?;
        Ok((content.get("avatar_url") == Some(&json!("mxc://example.org/new"))).then_some(()))
    })
    .await
}
