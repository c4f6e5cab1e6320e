//! `POST /createRoom`: presets, name and topic, aliases, invites, initial state, power level
//! overrides, creation content, room versions and direct chats.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use super::fixtures::{membership_of, server_name};
use crate::client::{Ctx, array, enc, is_type, str_field, v3};

crate::tests! { "create_room";
    create_room_returns_a_room_id => "post_matrixclientv3createroom";
    create_room_requires_authentication => "post_matrixclientv3createroom";
    creator_is_joined_and_sent_the_create_event => "post_matrixclientv3createroom";
    creator_can_change_power_levels => "post_matrixclientv3createroom";
    preset_private_chat_is_invite_only_with_shared_history => "post_matrixclientv3createroom";
    preset_public_chat_is_public => "post_matrixclientv3createroom";
    preset_trusted_private_chat_gives_invitees_creator_power => "post_matrixclientv3createroom";
    visibility_public_without_preset_defaults_to_public_chat => "post_matrixclientv3createroom";
    name_and_topic_become_state => "post_matrixclientv3createroom";
    room_alias_name_creates_alias_and_canonical_alias => "post_matrixclientv3createroom";
    room_alias_name_in_use_is_room_in_use => "post_matrixclientv3createroom";
    invite_list_invites_users => "post_matrixclientv3createroom";
    initial_state_is_applied => "post_matrixclientv3createroom";
    power_level_content_override_is_applied => "post_matrixclientv3createroom";
    creation_content_is_merged_into_create_event => "post_matrixclientv3createroom";
    explicit_room_version_is_used => "post_matrixclientv3createroom";
    default_room_version_matches_capabilities => "get_matrixclientv3capabilities";
    unknown_room_version_is_unsupported_room_version => "post_matrixclientv3createroom";
    is_direct_marks_the_invite => "post_matrixclientv3createroom";
    created_room_is_in_joined_rooms => "get_matrixclientv3joined_rooms";
}

async fn create_room_returns_a_room_id(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_room(json!({})).await?;
    ensure!(room_id.starts_with('!'), "room id {room_id} does not start with !");
    Ok(())
}

async fn create_room_requires_authentication(ctx: Ctx) -> Result<()> {
    ctx.post(&v3("/createRoom"), json!({})).await?.err(401, "M_MISSING_TOKEN")?;
    Ok(())
}

async fn creator_is_joined_and_sent_the_create_event(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_room(json!({})).await?;
    ensure!(membership_of(&user, &room_id, &user.user_id).await? == "join", "creator not joined");
    let state = user.get(&crate::client::room_path(&room_id, "/state")).await?.ok()?;
    let events = state.as_array().cloned().unwrap_or_default();
    let create = events.iter().find(|e| is_type(e, "m.room.create"));
    ensure!(
        create.is_some_and(|e| e.get("sender") == Some(&json!(user.user_id))),
        "no m.room.create sent by the creator in {state}"
    );
    Ok(())
}

async fn creator_can_change_power_levels(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_room(json!({})).await?;
    let mut levels = user.get_state(&room_id, "m.room.power_levels", "").await?;
    levels["events_default"] = json!(10);
    user.put_state(&room_id, "m.room.power_levels", "", levels).await?;
    Ok(())
}

async fn preset_private_chat_is_invite_only_with_shared_history(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_room(json!({"preset": "private_chat"})).await?;
    let join_rules = user.get_state(&room_id, "m.room.join_rules", "").await?;
    ensure!(join_rules.get("join_rule") == Some(&json!("invite")), "{join_rules}");
    let history = user.get_state(&room_id, "m.room.history_visibility", "").await?;
    ensure!(history.get("history_visibility") == Some(&json!("shared")), "{history}");
    let guests = user.get_state(&room_id, "m.room.guest_access", "").await?;
    ensure!(guests.get("guest_access") == Some(&json!("can_join")), "{guests}");
    Ok(())
}

async fn preset_public_chat_is_public(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_room(json!({"preset": "public_chat"})).await?;
    let join_rules = user.get_state(&room_id, "m.room.join_rules", "").await?;
    ensure!(join_rules.get("join_rule") == Some(&json!("public")), "{join_rules}");
    let history = user.get_state(&room_id, "m.room.history_visibility", "").await?;
    ensure!(history.get("history_visibility") == Some(&json!("shared")), "{history}");
    Ok(())
}

async fn preset_trusted_private_chat_gives_invitees_creator_power(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id =
        a.create_room(json!({"preset": "trusted_private_chat", "invite": [b.user_id]})).await?;
    let join_rules = a.get_state(&room_id, "m.room.join_rules", "").await?;
    ensure!(join_rules.get("join_rule") == Some(&json!("invite")), "{join_rules}");
    let levels = a.get_state(&room_id, "m.room.power_levels", "").await?;
    let b_level = levels.pointer(&format!("/users/{}", b.user_id)).and_then(Value::as_i64);
    let a_level = levels.pointer(&format!("/users/{}", a.user_id)).and_then(Value::as_i64);
    // From room version 12 on, creators are not in `users` and outrank everyone: invitees
    // get the creator's power by becoming `additional_creators` of the create event.
    let create = a.get_state(&room_id, "m.room.create", "").await?;
    let additional = array(&create, "/additional_creators");
    ensure!(
        additional.contains(&json!(b.user_id)) || (b_level.is_some() && b_level == a_level),
        "invitee level {b_level:?}, creator level {a_level:?}: {levels}; create: {create}"
    );
    Ok(())
}

async fn visibility_public_without_preset_defaults_to_public_chat(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_room(json!({"visibility": "public"})).await?;
    let join_rules = user.get_state(&room_id, "m.room.join_rules", "").await?;
    ensure!(join_rules.get("join_rule") == Some(&json!("public")), "{join_rules}");
    Ok(())
}

async fn name_and_topic_become_state(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id =
        user.create_room(json!({"name": "Conformance room", "topic": "Testing things"})).await?;
    let name = user.get_state(&room_id, "m.room.name", "").await?;
    ensure!(name.get("name") == Some(&json!("Conformance room")), "{name}");
    let topic = user.get_state(&room_id, "m.room.topic", "").await?;
    ensure!(topic.get("topic") == Some(&json!("Testing things")), "{topic}");
    Ok(())
}

async fn room_alias_name_creates_alias_and_canonical_alias(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let localpart = ctx.unique("alias");
    let room_id = user.create_room(json!({"room_alias_name": localpart})).await?;
    let alias = format!("#{localpart}:{}", server_name(&user));
    let resolved = user.get(&v3(&format!("/directory/room/{}", enc(&alias)))).await?.ok()?;
    ensure!(str_field(&resolved, "room_id")? == room_id, "alias resolves to {resolved}");
    let canonical = user.get_state(&room_id, "m.room.canonical_alias", "").await?;
    ensure!(canonical.get("alias") == Some(&json!(alias)), "{canonical}");
    Ok(())
}

async fn room_alias_name_in_use_is_room_in_use(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let localpart = ctx.unique("alias");
    user.create_room(json!({"room_alias_name": localpart})).await?;
    user.post(&v3("/createRoom"), json!({"room_alias_name": localpart}))
        .await?
        .err(400, "M_ROOM_IN_USE")?;
    Ok(())
}

async fn invite_list_invites_users(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_room(json!({"invite": [b.user_id]})).await?;
    ensure!(membership_of(&a, &room_id, &b.user_id).await? == "invite", "b is not invited");
    b.join(&room_id).await?;
    Ok(())
}

async fn initial_state_is_applied(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user
        .create_room(json!({
            "initial_state": [
                {"type": "org.example.conformance", "state_key": "k", "content": {"v": 1}},
                {"type": "m.room.guest_access", "state_key": "", "content": {"guest_access": "forbidden"}},
            ],
        }))
        .await?;
    let custom = user.get_state(&room_id, "org.example.conformance", "k").await?;
    ensure!(custom == json!({"v": 1}), "{custom}");
    let guests = user.get_state(&room_id, "m.room.guest_access", "").await?;
    ensure!(guests.get("guest_access") == Some(&json!("forbidden")), "{guests}");
    Ok(())
}

async fn power_level_content_override_is_applied(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user
        .create_room(json!({"power_level_content_override": {"events_default": 42, "invite": 7}}))
        .await?;
    let levels = user.get_state(&room_id, "m.room.power_levels", "").await?;
    ensure!(levels.get("events_default") == Some(&json!(42)), "{levels}");
    ensure!(levels.get("invite") == Some(&json!(7)), "{levels}");
    Ok(())
}

async fn creation_content_is_merged_into_create_event(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user
        .create_room(json!({"creation_content": {"m.federate": false, "org.example.extra": "x"}}))
        .await?;
    let create = user.get_state(&room_id, "m.room.create", "").await?;
    ensure!(create.get("m.federate") == Some(&json!(false)), "{create}");
    ensure!(create.get("org.example.extra") == Some(&json!("x")), "{create}");
    ensure!(create.get("room_version").is_some_and(Value::is_string), "no room_version: {create}");
    Ok(())
}

async fn explicit_room_version_is_used(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_room(json!({"room_version": "10"})).await?;
    let create = user.get_state(&room_id, "m.room.create", "").await?;
    ensure!(create.get("room_version") == Some(&json!("10")), "{create}");
    Ok(())
}

async fn default_room_version_matches_capabilities(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let capabilities = user.get(&v3("/capabilities")).await?.ok()?;
    let default = capabilities.pointer("/capabilities/m.room_versions/default").cloned();
    let room_id = user.create_room(json!({})).await?;
    let create = user.get_state(&room_id, "m.room.create", "").await?;
    ensure!(create.get("room_version") == default.as_ref(), "create {create}, default {default:?}");
    Ok(())
}

async fn unknown_room_version_is_unsupported_room_version(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    user.post(&v3("/createRoom"), json!({"room_version": "org.example.no-such-version"}))
        .await?
        .err(400, "M_UNSUPPORTED_ROOM_VERSION")?;
    Ok(())
}

async fn is_direct_marks_the_invite(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a
        .create_room(
            json!({"preset": "trusted_private_chat", "is_direct": true, "invite": [b.user_id]}),
        )
        .await?;
    let member = a.get_state(&room_id, "m.room.member", &b.user_id).await?;
    ensure!(member.get("is_direct") == Some(&json!(true)), "{member}");
    let invite = b
        .sync_until("", "the invite", |sync| {
            sync.pointer(&format!("/rooms/invite/{}", crate::client::pointer_key(&room_id)))
                .cloned()
        })
        .await?;
    let own_member = array(&invite, "/invite_state/events")
        .iter()
        .find(|e| is_type(e, "m.room.member") && e.get("state_key") == Some(&json!(b.user_id)));
    ensure!(
        own_member.is_some_and(|e| e.pointer("/content/is_direct") == Some(&json!(true))),
        "invite_state lacks is_direct: {invite}"
    );
    Ok(())
}

async fn created_room_is_in_joined_rooms(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_room(json!({})).await?;
    let body = user.get(&v3("/joined_rooms")).await?.ok()?;
    ensure!(array(&body, "/joined_rooms").contains(&json!(room_id)), "{body}");
    Ok(())
}
