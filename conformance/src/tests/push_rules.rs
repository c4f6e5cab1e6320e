//! Push rules: the default ruleset and rule management under `/pushrules/`.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use crate::client::{Ctx, array, v3};

crate::tests! { "push_rules";
    default_ruleset_has_predefined_rules => "predefined-rules";
    get_single_predefined_rule => "get_matrixclientv3pushrulesglobalkindruleid";
    put_custom_rule_then_get_and_delete => "put_matrixclientv3pushrulesglobalkindruleid";
    disable_rule_through_enabled_endpoint => "put_matrixclientv3pushrulesglobalkindruleidenabled";
    unknown_rule_is_not_found => "get_matrixclientv3pushrulesglobalkindruleid";
}

async fn default_ruleset_has_predefined_rules(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let body = user.get(&v3("/pushrules/")).await?.ok()?;
    let rule_ids = |kind: &str| -> Vec<String> {
        array(&body, &format!("/global/{kind}"))
            .iter()
            .filter_map(|r| r.get("rule_id").and_then(Value::as_str).map(str::to_owned))
            .collect()
    };
    for (kind, rule_id) in [
        ("override", ".m.rule.master"),
        ("override", ".m.rule.suppress_notices"),
        ("override", ".m.rule.invite_for_me"),
        ("override", ".m.rule.member_event"),
        ("underride", ".m.rule.message"),
        ("underride", ".m.rule.encrypted"),
    ] {
        ensure!(rule_ids(kind).contains(&rule_id.to_owned()), "no {kind} rule {rule_id}");
    }
    for kind in ["override", "content", "room", "sender", "underride"] {
        ensure!(body.pointer(&format!("/global/{kind}")).is_some_and(Value::is_array), "no {kind}");
    }
    Ok(())
}

async fn get_single_predefined_rule(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let rule = user.get(&v3("/pushrules/global/override/.m.rule.master")).await?.ok()?;
    ensure!(rule.get("rule_id") == Some(&json!(".m.rule.master")), "{rule}");
    ensure!(rule.get("default") == Some(&json!(true)), "{rule}");
    ensure!(rule.get("enabled") == Some(&json!(false)), "{rule}");
    Ok(())
}

async fn put_custom_rule_then_get_and_delete(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let path = v3("/pushrules/global/content/conformance_rule");
    user.put(&path, json!({"pattern": "cake*", "actions": ["notify"]})).await?.ok()?;
    let rule = user.get(&path).await?.ok()?;
    ensure!(rule.get("pattern") == Some(&json!("cake*")), "{rule}");
    ensure!(rule.get("default") == Some(&json!(false)), "{rule}");
    ensure!(rule.get("enabled") == Some(&json!(true)), "{rule}");
    user.delete(&path).await?.ok()?;
    user.get(&path).await?.err(404, "M_NOT_FOUND")?;
    Ok(())
}

async fn disable_rule_through_enabled_endpoint(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    let path = v3("/pushrules/global/override/.m.rule.suppress_notices/enabled");
    user.put(&path, json!({"enabled": false})).await?.ok()?;
    let body = user.get(&path).await?.ok()?;
    ensure!(body.get("enabled") == Some(&json!(false)), "{body}");
    Ok(())
}

async fn unknown_rule_is_not_found(ctx: Ctx) -> Result<()> {
    let user = ctx.user().await?;
    user.get(&v3("/pushrules/global/override/org.example.nosuchrule"))
        .await?
        .err(404, "M_NOT_FOUND")?;
    Ok(())
}
