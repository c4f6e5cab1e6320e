//! Login, logout, logout of all devices and `whoami`.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use crate::client::{Body, Ctx, str_field, v3};

crate::tests! { "login";
    login_flows_include_password => "get_matrixclientv3login";
    login_with_user_id_identifier_returns_token => "post_matrixclientv3login";
    login_with_localpart_identifier_returns_full_user_id => "post_matrixclientv3login";
    login_with_wrong_password_is_forbidden => "post_matrixclientv3login";
    login_of_unknown_user_is_forbidden => "post_matrixclientv3login";
    login_with_unknown_type_is_rejected => "post_matrixclientv3login";
    login_with_device_id_keeps_that_device_id => "post_matrixclientv3login";
    login_creates_a_new_device_each_time => "post_matrixclientv3login";
    whoami_returns_user_and_device => "get_matrixclientv3accountwhoami";
    whoami_requires_authentication => "get_matrixclientv3accountwhoami";
    logout_invalidates_the_token => "post_matrixclientv3logout";
    logout_keeps_other_sessions => "post_matrixclientv3logout";
    logout_all_invalidates_every_token => "post_matrixclientv3logoutall";
}

async fn login_flows_include_password(ctx: Ctx) -> Result<()> {
    let body = ctx.get(&v3("/login")).await?.ok()?;
    let flows = body.get("flows").and_then(Value::as_array).cloned().unwrap_or_default();
    ensure!(
        flows.iter().any(|flow| flow.get("type") == Some(&json!("m.login.password"))),
        "no m.login.password flow: {body}"
    );
    Ok(())
}

async fn login_with_user_id_identifier_returns_token(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let body = ctx.login(&user.user_id, &user.password).await?;
    ensure!(str_field(&body, "user_id")? == user.user_id, "wrong user: {body}");
    let token = str_field(&body, "access_token")?;
    ensure!(token != user.access_token, "login reused the registration token");
    str_field(&body, "device_id")?;
    let whoami = ctx
        .request(reqwest::Method::GET, &v3("/account/whoami"), Some(token), Body::None)
        .await?
        .ok()?;
    ensure!(str_field(&whoami, "user_id")? == user.user_id, "token does not work: {whoami}");
    Ok(())
}

async fn login_with_localpart_identifier_returns_full_user_id(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let body = ctx.login(&user.localpart, &user.password).await?;
    ensure!(str_field(&body, "user_id")? == user.user_id, "wrong user: {body}");
    Ok(())
}

async fn login_with_wrong_password_is_forbidden(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let body = json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user.user_id},
        "password": "definitely-not-the-password",
    });
    ctx.post(&v3("/login"), body).await?.err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn login_of_unknown_user_is_forbidden(ctx: Ctx) -> Result<()> {
    let body = json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": ctx.unique("nobody")},
        "password": "whatever-password",
    });
    ctx.post(&v3("/login"), body).await?.err(403, "M_FORBIDDEN")?;
    Ok(())
}

async fn login_with_unknown_type_is_rejected(ctx: Ctx) -> Result<()> {
    let body = json!({"type": "org.example.no.such.login", "user": "someone"});
    let resp = ctx.post(&v3("/login"), body).await?;
    ensure!(
        resp.status == 400 && resp.body.get("errcode").is_some(),
        "got {} {}",
        resp.status,
        resp.body
    );
    Ok(())
}

async fn login_with_device_id_keeps_that_device_id(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let body = json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user.user_id},
        "password": user.password,
        "device_id": "MYLAPTOP",
        "initial_device_display_name": "Laptop",
    });
    let answer = ctx.post(&v3("/login"), body).await?.ok()?;
    ensure!(str_field(&answer, "device_id")? == "MYLAPTOP", "device id not kept: {answer}");
    let device = user.get(&v3("/devices/MYLAPTOP")).await?.ok()?;
    ensure!(device.get("display_name") == Some(&json!("Laptop")), "display name: {device}");
    Ok(())
}

async fn login_creates_a_new_device_each_time(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let first = ctx.login(&user.user_id, &user.password).await?;
    let second = ctx.login(&user.user_id, &user.password).await?;
    let ids = [&user.device_id, str_field(&first, "device_id")?, str_field(&second, "device_id")?];
    ensure!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2], "device ids repeat: {ids:?}");
    Ok(())
}

async fn whoami_returns_user_and_device(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let body = user.get(&v3("/account/whoami")).await?.ok()?;
    ensure!(str_field(&body, "user_id")? == user.user_id, "user: {body}");
    ensure!(str_field(&body, "device_id")? == user.device_id, "device: {body}");
    if let Some(is_guest) = body.get("is_guest") {
        ensure!(is_guest == &json!(false), "is_guest: {body}");
    }
    Ok(())
}

async fn whoami_requires_authentication(ctx: Ctx) -> Result<()> {
    ctx.get(&v3("/account/whoami")).await?.err(401, "M_MISSING_TOKEN")?;
    Ok(())
}

async fn logout_invalidates_the_token(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    user.post(&v3("/logout"), json!({})).await?.ok()?;
    user.get(&v3("/account/whoami")).await?.err(401, "M_UNKNOWN_TOKEN")?;
    Ok(())
}

async fn logout_keeps_other_sessions(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let other = user.second_device().await?;
    other.post(&v3("/logout"), json!({})).await?.ok()?;
    other.get(&v3("/account/whoami")).await?.err(401, "M_UNKNOWN_TOKEN")?;
    user.get(&v3("/account/whoami")).await?.ok()?;
    let devices = user.get(&v3("/devices")).await?.ok()?;
    let listed = devices.to_string();
    ensure!(
        !listed.contains(&format!("\"{}\"", other.device_id)),
        "logged-out device listed: {devices}"
    );
    Ok(())
}

async fn logout_all_invalidates_every_token(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let other = user.second_device().await?;
    user.post(&v3("/logout/all"), json!({})).await?.ok()?;
    user.get(&v3("/account/whoami")).await?.err(401, "M_UNKNOWN_TOKEN")?;
    other.get(&v3("/account/whoami")).await?.err(401, "M_UNKNOWN_TOKEN")?;
    Ok(())
}
