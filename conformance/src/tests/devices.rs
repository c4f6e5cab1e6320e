//! Device management: list, get, rename, and delete (one or many) behind user-interactive auth.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use super::fixtures::{has_single_stage_flow, password_auth, uia_session};
use crate::client::{Body, Ctx, User, array, enc, str_field, v3};

crate::tests! { "devices";
    devices_list_includes_current_device => "get_matrixclientv3devices";
    device_get_returns_its_fields => "get_matrixclientv3devicesdeviceid";
    device_get_unknown_is_not_found => "get_matrixclientv3devicesdeviceid";
    device_of_another_user_is_not_found => "get_matrixclientv3devicesdeviceid";
    device_rename_changes_display_name => "put_matrixclientv3devicesdeviceid";
    device_rename_unknown_is_not_found => "put_matrixclientv3devicesdeviceid";
    device_delete_without_auth_answers_uia => "delete_matrixclientv3devicesdeviceid";
    device_delete_with_wrong_password_is_forbidden => "delete_matrixclientv3devicesdeviceid";
    device_delete_with_password_removes_device_and_token => "delete_matrixclientv3devicesdeviceid";
    delete_devices_removes_several_devices => "post_matrixclientv3delete_devices";
}

fn device_ids(list: &Value) -> Vec<String> {
    array(list, "/devices")
        .iter()
        .filter_map(|d| d.get("device_id").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

async fn devices_list_includes_current_device(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let other = user.second_device().await?;
    let ids = device_ids(&user.get(&v3("/devices")).await?.ok()?);
    ensure!(ids.contains(&user.device_id) && ids.contains(&other.device_id), "devices {ids:?}");
    Ok(())
}

async fn device_get_returns_its_fields(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let device = user.get(&v3(&format!("/devices/{}", enc(&user.device_id)))).await?.ok()?;
    ensure!(str_field(&device, "device_id")? == user.device_id, "device: {device}");
    for field in ["display_name", "last_seen_ip"] {
        if let Some(value) = device.get(field) {
            ensure!(value.is_string() || value.is_null(), "{field} is not a string: {device}");
        }
    }
    if let Some(ts) = device.get("last_seen_ts") {
        ensure!(ts.is_i64() || ts.is_null(), "last_seen_ts is not an integer: {device}");
    }
    Ok(())
}

async fn device_get_unknown_is_not_found(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    user.get(&v3("/devices/NOSUCHDEVICE")).await?.err(404, "M_NOT_FOUND")?;
    Ok(())
}

async fn device_of_another_user_is_not_found(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    b.get(&v3(&format!("/devices/{}", enc(&a.device_id)))).await?.err(404, "M_NOT_FOUND")?;
    Ok(())
}

async fn device_rename_changes_display_name(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let path = v3(&format!("/devices/{}", enc(&user.device_id)));
    user.put(&path, json!({"display_name": "Renamed by conformance"})).await?.ok()?;
    let device = user.get(&path).await?.ok()?;
    ensure!(device.get("display_name") == Some(&json!("Renamed by conformance")), "{device}");
    Ok(())
}

async fn device_rename_unknown_is_not_found(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    user.put(&v3("/devices/NOSUCHDEVICE"), json!({"display_name": "x"}))
        .await?
        .err(404, "M_NOT_FOUND")?;
    Ok(())
}

async fn device_delete_without_auth_answers_uia(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let other = user.second_device().await?;
    let resp = user
        .request(
            reqwest::Method::DELETE,
            &v3(&format!("/devices/{}", enc(&other.device_id))),
            Body::Json(json!({})),
        )
        .await?;
    let body = resp.status(401)?;
    uia_session(&body)?;
    ensure!(has_single_stage_flow(&body, "m.login.password"), "no password flow: {body}");
    other.get(&v3("/account/whoami")).await?.ok()?;
    Ok(())
}

/// Sends `method path body` once without auth to get a session, then with password auth.
async fn with_password_uia(
    user: &User,
    method: reqwest::Method,
    path: &str,
    body: Value,
    password: Option<&str>,
) -> Result<crate::client::Resp> {
    let first = user.request(method.clone(), path, Body::Json(body.clone())).await?;
    let session = uia_session(&first.status(401)?)?;
    let mut auth = password_auth(user, Some(&session));
    if let Some(password) = password {
        auth["password"] = json!(password);
    }
    let mut body = body;
    body["auth"] = auth;
    user.request(method, path, Body::Json(body)).await
}

async fn device_delete_with_wrong_password_is_forbidden(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let other = user.second_device().await?;
    let path = v3(&format!("/devices/{}", enc(&other.device_id)));
    let resp =
        with_password_uia(&user, reqwest::Method::DELETE, &path, json!({}), Some("wrong-password"))
            .await?;
    let body = resp.err(401, "M_FORBIDDEN")?;
    ensure!(body.get("flows").is_some(), "failed stage answer lacks flows: {body}");
    other.get(&v3("/account/whoami")).await?.ok()?;
    Ok(())
}

async fn device_delete_with_password_removes_device_and_token(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let other = user.second_device().await?;
    let path = v3(&format!("/devices/{}", enc(&other.device_id)));
    with_password_uia(&user, reqwest::Method::DELETE, &path, json!({}), None).await?.ok()?;
    user.get(&path).await?.err(404, "M_NOT_FOUND")?;
    other.get(&v3("/account/whoami")).await?.err(401, "M_UNKNOWN_TOKEN")?;
    Ok(())
}

async fn delete_devices_removes_several_devices(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let (second, third) = (user.second_device().await?, user.second_device().await?);
    let body = json!({"devices": [second.device_id, third.device_id]});
    with_password_uia(&user, reqwest::Method::POST, &v3("/delete_devices"), body, None)
        .await?
        .ok()?;
    let ids = device_ids(&user.get(&v3("/devices")).await?.ok()?);
    ensure!(ids == vec![user.device_id.clone()], "devices left: {ids:?}");
    second.get(&v3("/account/whoami")).await?.err(401, "M_UNKNOWN_TOKEN")?;
    Ok(())
}
