//! Room aliases (`/directory/room/{roomAlias}`, `/rooms/{roomId}/aliases`) and the public room
//! directory (`/directory/list/room/{roomId}`, `/publicRooms`).

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use super::fixtures::server_name;
use crate::client::{Ctx, User, array, enc, room_path, str_field, v3};

crate::tests! { "aliases_directory";
    put_alias_then_resolve => "put_matrixclientv3directoryroomroomalias";
    resolve_answers_servers => "get_matrixclientv3directoryroomroomalias";
    put_existing_alias_conflicts => "put_matrixclientv3directoryroomroomalias";
    resolve_unknown_alias_is_not_found => "get_matrixclientv3directoryroomroomalias";
    delete_alias_then_resolve_is_not_found => "delete_matrixclientv3directoryroomroomalias";
    delete_alias_of_other_user_is_forbidden => "delete_matrixclientv3directoryroomroomalias";
    room_aliases_lists_local_aliases => "get_matrixclientv3roomsroomidaliases";
    room_aliases_of_private_room_forbidden_to_non_members => "get_matrixclientv3roomsroomidaliases";
    room_visibility_defaults_to_private => "get_matrixclientv3directorylistroomroomid";
    room_visibility_can_be_set_public => "put_matrixclientv3directorylistroomroomid";
    room_visibility_of_unknown_room_is_not_found => "get_matrixclientv3directorylistroomroomid";
    public_rooms_get_lists_published_room => "get_matrixclientv3publicrooms";
    public_rooms_post_filters_by_search_term => "post_matrixclientv3publicrooms";
    public_rooms_limit_and_next_batch => "get_matrixclientv3publicrooms";
    unpublished_room_is_not_in_public_rooms => "get_matrixclientv3publicrooms";
}

fn alias_path(alias: &str) -> String {
    v3(&format!("/directory/room/{}", enc(alias)))
}

fn new_alias(ctx: &Ctx, user: &User) -> String {
    format!("#{}:{}", ctx.unique("al"), server_name(user))
}

async fn put_alias_then_resolve(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let alias = new_alias(&ctx, &user);
    user.put(&alias_path(&alias), json!({"room_id": room_id})).await?.ok()?;
    let body = user.get(&alias_path(&alias)).await?.ok()?;
    ensure!(str_field(&body, "room_id")? == room_id, "{body}");
    Ok(())
}

async fn resolve_answers_servers(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let other = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let alias = new_alias(&ctx, &user);
    user.put(&alias_path(&alias), json!({"room_id": room_id})).await?.ok()?;
    let body = other.get(&alias_path(&alias)).await?.ok()?;
    ensure!(str_field(&body, "room_id")? == room_id, "{body}");
    ensure!(array(&body, "/servers").contains(&json!(server_name(&user))), "servers: {body}");
    Ok(())
}

async fn put_existing_alias_conflicts(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let other_room = user.create_private_room().await?;
    let alias = new_alias(&ctx, &user);
    user.put(&alias_path(&alias), json!({"room_id": room_id})).await?.ok()?;
    user.put(&alias_path(&alias), json!({"room_id": other_room})).await?.err(409, "M_UNKNOWN")?;
    Ok(())
}

async fn resolve_unknown_alias_is_not_found(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    user.get(&alias_path(&new_alias(&ctx, &user))).await?.err(404, "M_NOT_FOUND")?;
    Ok(())
}

async fn delete_alias_then_resolve_is_not_found(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let alias = new_alias(&ctx, &user);
    user.put(&alias_path(&alias), json!({"room_id": room_id})).await?.ok()?;
    user.delete(&alias_path(&alias)).await?.ok()?;
    user.get(&alias_path(&alias)).await?.err(404, "M_NOT_FOUND")?;
    user.delete(&alias_path(&alias)).await?.err(404, "M_NOT_FOUND")?;
    Ok(())
}

async fn delete_alias_of_other_user_is_forbidden(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_public_room().await?;
    b.join(&room_id).await?;
    let alias = new_alias(&ctx, &a);
    a.put(&alias_path(&alias), json!({"room_id": room_id})).await?.ok()?;
    b.delete(&alias_path(&alias)).await?.err(403, "M_FORBIDDEN")?;
    a.get(&alias_path(&alias)).await?.ok()?;
    Ok(())
}

async fn room_aliases_lists_local_aliases(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_private_room().await?;
    let (first, second) = (new_alias(&ctx, &user), new_alias(&ctx, &user));
    for alias in [&first, &second] {
        user.put(&alias_path(alias), json!({"room_id": room_id})).await?.ok()?;
    }
    let body = user.get(&room_path(&room_id, "/aliases")).await?.ok()?;
    let aliases = array(&body, "/aliases");
    ensure!(aliases.contains(&json!(first)) && aliases.contains(&json!(second)), "{body}");
    Ok(())
}

async fn room_aliases_of_private_room_forbidden_to_non_members(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_private_room().await?;
    b.get(&room_path(&room_id, "/aliases")).await?.err(403, "M_FORBIDDEN")?;
    Ok(())
}

fn visibility_path(room_id: &str) -> String {
    v3(&format!("/directory/list/room/{}", enc(room_id)))
}

async fn room_visibility_defaults_to_private(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_public_room().await?;
    let body = ctx.get(&visibility_path(&room_id)).await?.ok()?;
    ensure!(body.get("visibility") == Some(&json!("private")), "{body}");
    Ok(())
}

async fn room_visibility_can_be_set_public(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_public_room().await?;
    user.put(&visibility_path(&room_id), json!({"visibility": "public"})).await?.ok()?;
    let body = user.get(&visibility_path(&room_id)).await?.ok()?;
    ensure!(body.get("visibility") == Some(&json!("public")), "{body}");
    user.put(&visibility_path(&room_id), json!({"visibility": "private"})).await?.ok()?;
    let body = user.get(&visibility_path(&room_id)).await?.ok()?;
    ensure!(body.get("visibility") == Some(&json!("private")), "{body}");
    Ok(())
}

async fn room_visibility_of_unknown_room_is_not_found(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = format!("!nosuchroom{}:{}", ctx.unique("r"), server_name(&user));
    user.get(&visibility_path(&room_id)).await?.err(404, "M_NOT_FOUND")?;
    Ok(())
}

/// Every chunk entry of a public room list with this room id.
fn find_room<'a>(body: &'a Value, room_id: &str) -> Option<&'a Value> {
    array(body, "/chunk").iter().find(|r| r.get("room_id") == Some(&json!(room_id)))
}

async fn public_rooms_get_lists_published_room(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let name = ctx.unique("Listed room ");
    let room_id = user
        .create_room(json!({"preset": "public_chat", "visibility": "public", "name": name, "topic": "about"}))
        .await?;
    let body = crate::client::eventually("the room in /publicRooms", || async {
        let body = user.get(&v3("/publicRooms?limit=1000")).await?.ok()?;
        Ok(find_room(&body, &room_id).is_some().then_some(body))
    })
    .await?;
    let Some(room) = find_room(&body, &room_id) else { anyhow::bail!("vanished") };
    ensure!(room.get("name") == Some(&json!(name)), "{room}");
    ensure!(room.get("topic") == Some(&json!("about")), "{room}");
    ensure!(room.get("num_joined_members") == Some(&json!(1)), "{room}");
    ensure!(room.get("world_readable") == Some(&json!(false)), "{room}");
    ensure!(room.get("guest_can_join").is_some_and(Value::is_boolean), "{room}");
    ensure!(room.get("join_rule") == Some(&json!("public")), "{room}");
    Ok(())
}

async fn public_rooms_post_filters_by_search_term(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let term = ctx.unique("needle");
    let room_id = user
        .create_room(json!({"preset": "public_chat", "visibility": "public", "name": format!("Room {term}")}))
        .await?;
    user.create_room(json!({"preset": "public_chat", "visibility": "public", "name": "Other"}))
        .await?;
    let body = crate::client::eventually("the search to find the room", || async {
        let body = user
            .post(
                &v3("/publicRooms"),
                json!({"filter": {"generic_search_term": term}, "limit": 10}),
            )
            .await?
            .ok()?;
        Ok(find_room(&body, &room_id).is_some().then_some(body))
    })
    .await?;
    ensure!(array(&body, "/chunk").len() == 1, "search matched other rooms: {body}");
    Ok(())
}

async fn public_rooms_limit_and_next_batch(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    for _ in 0..3 {
        user.create_room(json!({"preset": "public_chat", "visibility": "public"})).await?;
    }
    let first = user.get(&v3("/publicRooms?limit=2")).await?.ok()?;
    ensure!(array(&first, "/chunk").len() == 2, "{first}");
    let next = str_field(&first, "next_batch")?;
    let second = user.get(&v3(&format!("/publicRooms?limit=2&since={}", enc(next)))).await?.ok()?;
    let second_chunk = array(&second, "/chunk");
    ensure!(!second_chunk.is_empty(), "second page empty: {second}");
    for room in second_chunk {
        let room_id = room.get("room_id").and_then(Value::as_str).unwrap_or_default();
        ensure!(find_room(&first, room_id).is_none(), "{room_id} on both pages");
    }
    Ok(())
}

async fn unpublished_room_is_not_in_public_rooms(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let room_id = user.create_public_room().await?;
    let body = user.get(&v3("/publicRooms?limit=1000")).await?.ok()?;
    ensure!(find_room(&body, &room_id).is_none(), "unpublished room listed");
    Ok(())
}
