//! Account registration (`/register`, `/register/available`) and its user-interactive auth.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use super::fixtures::{has_single_stage_flow, server_name, uia_session};
use crate::client::{Ctx, str_field, v3};

crate::tests! { "registration";
    register_without_auth_answers_401_with_flows_and_session => "user-interactive-authentication-api";
    register_with_dummy_stage_returns_credentials => "post_matrixclientv3register";
    registered_user_id_uses_requested_localpart => "post_matrixclientv3register";
    register_taken_username_is_user_in_use => "post_matrixclientv3register";
    register_invalid_username_is_invalid_username => "post_matrixclientv3register";
    register_with_inhibit_login_returns_no_token => "post_matrixclientv3register";
    register_with_device_id_and_display_name_creates_that_device => "post_matrixclientv3register";
    register_token_works_for_whoami => "post_matrixclientv3register";
    username_available_for_free_name => "get_matrixclientv3registeravailable";
    username_available_reports_taken_name => "get_matrixclientv3registeravailable";
    username_available_rejects_invalid_name => "get_matrixclientv3registeravailable";
    register_with_unknown_session_is_rejected => "user-interactive-authentication-api";
}

async fn register_without_auth_answers_401_with_flows_and_session(ctx: Ctx) -> Result<()> {
    let name = ctx.unique("reg");
    let resp =
        ctx.post(&v3("/register"), json!({"username": name, "password": "pw-long-enough"})).await?;
    let body = resp.status(401)?;
    uia_session(&body)?;
    ensure!(has_single_stage_flow(&body, "m.login.dummy"), "no m.login.dummy flow: {body}");
    Ok(())
}

async fn register_with_dummy_stage_returns_credentials(ctx: Ctx) -> Result<()> {
    let name = ctx.unique("reg");
    let body = ctx.register_open(&name, "pw-long-enough").await?;
    for field in ["user_id", "access_token", "device_id"] {
        ensure!(body.get(field).is_some_and(Value::is_string), "no {field}: {body}");
    }
    Ok(())
}

async fn registered_user_id_uses_requested_localpart(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    ensure!(
        user.user_id == format!("@{}:{}", user.localpart, server_name(&user)),
        "user id {} does not use localpart {}",
        user.user_id,
        user.localpart
    );
    Ok(())
}

async fn register_taken_username_is_user_in_use(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let body = json!({"username": user.localpart, "password": "pw-long-enough"});
    let first = ctx.post(&v3("/register"), body.clone()).await?;
    if first.status == 400 {
        first.err(400, "M_USER_IN_USE")?;
        return Ok(());
    }
    let session = uia_session(&first.status(401)?)?;
    let mut body = body;
    body["auth"] = json!({"type": "m.login.dummy", "session": session});
    ctx.post(&v3("/register"), body).await?.err(400, "M_USER_IN_USE")?;
    Ok(())
}

async fn register_invalid_username_is_invalid_username(ctx: Ctx) -> Result<()> {
    let body = json!({
        "username": "Not A Valid Name!",
        "password": "pw-long-enough",
        "auth": {"type": "m.login.dummy"},
    });
    ctx.post(&v3("/register"), body).await?.err(400, "M_INVALID_USERNAME")?;
    Ok(())
}

async fn register_with_inhibit_login_returns_no_token(ctx: Ctx) -> Result<()> {
    let name = ctx.unique("reg");
    let mut body = json!({"username": name, "password": "pw-long-enough", "inhibit_login": true});
    let session = uia_session(&ctx.post(&v3("/register"), body.clone()).await?.status(401)?)?;
    body["auth"] = json!({"type": "m.login.dummy", "session": session});
    let answer = ctx.post(&v3("/register"), body).await?.ok()?;
    str_field(&answer, "user_id")?;
    ensure!(answer.get("access_token").is_none(), "inhibit_login still gave a token: {answer}");
    ensure!(answer.get("device_id").is_none(), "inhibit_login still gave a device: {answer}");
    Ok(())
}

async fn register_with_device_id_and_display_name_creates_that_device(ctx: Ctx) -> Result<()> {
    let name = ctx.unique("reg");
    let mut body = json!({
        "username": name,
        "password": "pw-long-enough",
        "device_id": "CONFDEVICE",
        "initial_device_display_name": "Conformance phone",
    });
    let session = uia_session(&ctx.post(&v3("/register"), body.clone()).await?.status(401)?)?;
    body["auth"] = json!({"type": "m.login.dummy", "session": session});
    let answer = ctx.post(&v3("/register"), body).await?.ok()?;
    ensure!(str_field(&answer, "device_id")? == "CONFDEVICE", "device id not kept: {answer}");
    let token = str_field(&answer, "access_token")?;
    let device = ctx
        .request(
            reqwest::Method::GET,
            &v3("/devices/CONFDEVICE"),
            Some(token),
            crate::client::Body::None,
        )
        .await?
        .ok()?;
    ensure!(
        device.get("display_name") == Some(&json!("Conformance phone")),
        "display name not kept: {device}"
    );
    Ok(())
}

async fn register_token_works_for_whoami(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let body = user.get(&v3("/account/whoami")).await?.ok()?;
    ensure!(str_field(&body, "user_id")? == user.user_id, "whoami answered {body}");
    Ok(())
}

async fn username_available_for_free_name(ctx: Ctx) -> Result<()> {
    let name = ctx.unique("free");
    let body = ctx.get(&v3(&format!("/register/available?username={name}"))).await?.ok()?;
    ensure!(body.get("available") == Some(&json!(true)), "not available: {body}");
    Ok(())
}

async fn username_available_reports_taken_name(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    ctx.get(&v3(&format!("/register/available?username={}", user.localpart)))
        .await?
        .err(400, "M_USER_IN_USE")?;
    Ok(())
}

async fn username_available_rejects_invalid_name(ctx: Ctx) -> Result<()> {
    ctx.get(&v3("/register/available?username=not%20valid%21"))
        .await?
        .err(400, "M_INVALID_USERNAME")?;
    Ok(())
}

/// Completing a stage needs a session the server handed out.
async fn register_with_unknown_session_is_rejected(ctx: Ctx) -> Result<()> {
    let name = ctx.unique("reg");
    let body = json!({
        "username": name,
        "password": "pw-long-enough",
        "auth": {"type": "m.login.dummy", "session": "no-such-session-anywhere"},
    });
    let resp = ctx.post(&v3("/register"), body).await?;
    ensure!(
        matches!(resp.status, 400 | 401) && resp.body.get("errcode").is_some(),
        "unknown session not rejected with 400/401 and an errcode: {} {}",
        resp.status,
        resp.body
    );
    Ok(())
}
