//! Server discovery: `/versions`, `.well-known/matrix/client` and `/capabilities`.

use anyhow::{Result, ensure};
use serde_json::Value;

use crate::client::{Ctx, v3};

crate::tests! { "versions";
    versions_lists_spec_versions => "get_matrixclientversions";
    versions_answers_with_an_access_token => "get_matrixclientversions";
    versions_unstable_features_are_booleans => "get_matrixclientversions";
    well_known_client_points_at_homeserver => "getwell-knownmatrixclient";
    capabilities_require_authentication => "get_matrixclientv3capabilities";
    capabilities_list_room_versions => "get_matrixclientv3capabilities";
    capabilities_flags_have_enabled_booleans => "get_matrixclientv3capabilities";
}

async fn versions_lists_spec_versions(ctx: Ctx) -> Result<()> {
    let body = ctx.get("/_matrix/client/versions").await?.ok()?;
    let versions = body.get("versions").and_then(Value::as_array);
    ensure!(versions.is_some_and(|v| !v.is_empty()), "no versions array: {body}");
    let versions = versions.into_iter().flatten();
    let strings: Vec<&str> = versions.filter_map(Value::as_str).collect();
    ensure!(strings.iter().any(|v| v.starts_with("v1.")), "no v1.x version in {strings:?}");
    Ok(())
}

async fn versions_answers_with_an_access_token(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let body = user.get("/_matrix/client/versions").await?.ok()?;
    ensure!(body.get("versions").is_some_and(Value::is_array), "no versions: {body}");
    Ok(())
}

async fn versions_unstable_features_are_booleans(ctx: Ctx) -> Result<()> {
    let body = ctx.get("/_matrix/client/versions").await?.ok()?;
    if let Some(features) = body.get("unstable_features") {
        let features = features.as_object();
        ensure!(features.is_some(), "unstable_features is not an object");
        for (name, value) in features.into_iter().flatten() {
            ensure!(value.is_boolean(), "unstable feature {name} is not a boolean: {value}");
        }
    }
    Ok(())
}

/// Serving the file is optional (404 is allowed); when served it must name the homeserver.
async fn well_known_client_points_at_homeserver(ctx: Ctx) -> Result<()> {
    let resp = ctx.get("/.well-known/matrix/client").await?;
    if resp.status == 404 {
        return Ok(());
    }
    let body = resp.ok()?;
    let base_url = body.pointer("/m.homeserver/base_url").and_then(Value::as_str);
    ensure!(
        base_url.is_some_and(|url| url.starts_with("http")),
        "m.homeserver.base_url missing: {body}"
    );
    Ok(())
}

async fn capabilities_require_authentication(ctx: Ctx) -> Result<()> {
    ctx.get(&v3("/capabilities")).await?.err(401, "M_MISSING_TOKEN")?;
    Ok(())
}

async fn capabilities_list_room_versions(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let body = user.get(&v3("/capabilities")).await?.ok()?;
    let versions = body.pointer("/capabilities/m.room_versions");
    let default = versions.and_then(|v| v.get("default")).and_then(Value::as_str);
    let available = versions.and_then(|v| v.get("available")).and_then(Value::as_object);
    let (Some(default), Some(available)) = (default, available) else {
        anyhow::bail!("m.room_versions lacks default or available: {body}");
    };
    ensure!(available.contains_key(default), "default {default} not among available");
    for (version, stability) in available {
        ensure!(
            matches!(stability.as_str(), Some("stable" | "unstable")),
            "room version {version} has stability {stability}"
        );
    }
    ensure!(available.contains_key("10"), "room version 10 is not available");
    Ok(())
}

async fn capabilities_flags_have_enabled_booleans(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let body = user.get(&v3("/capabilities")).await?.ok()?;
    for name in ["m.change_password", "m.set_displayname", "m.set_avatar_url", "m.3pid_changes"] {
        if let Some(capability) = body.pointer(&format!("/capabilities/{name}")) {
            ensure!(
                capability.get("enabled").is_some_and(Value::is_boolean),
                "{name} without boolean enabled: {capability}"
            );
        }
    }
    Ok(())
}
