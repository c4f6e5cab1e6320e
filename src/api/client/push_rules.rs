//! Push rules: the server-default ruleset plus the user's own rules and changes, kept as
//! `m.push_rules` account data (so they reach the user's other clients through sync).
//!
//! [Push rules](https://spec.matrix.org/v1.16/client-server-api/#push-rules)

use axum::{Json, Router, extract::State, routing::get};
use ruma::{
    OwnedRoomId, OwnedUserId,
    push::{
        Action, InsertPushRuleError, NewConditionalPushRule, NewPatternedPushRule, NewPushRule,
        NewSimplePushRule, RemovePushRuleError, RuleKind, Ruleset,
    },
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{Auth, Body, PathIds, Query},
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/v3/pushrules/", get(get_push_rules))
        .route("/_matrix/client/v3/pushrules", get(get_push_rules))
        .route("/_matrix/client/v3/pushrules/global/", get(get_global_rules))
        .route(
            "/_matrix/client/v3/pushrules/global/{kind}/{ruleId}",
            get(get_rule).put(put_rule).delete(delete_rule),
        )
        .route(
            "/_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled",
            get(get_enabled).put(put_enabled),
        )
        .route(
            "/_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions",
            get(get_actions).put(put_actions),
        )
}

const KINDS: [&str; 5] = ["override", "content", "room", "sender", "underride"];

fn ruleset(state: &AppState, auth: &Auth) -> Result<Ruleset, ApiError> {
    Ok(state.account_data.push_rules(&auth.user_id)?)
}

fn save(state: &AppState, auth: &Auth, ruleset: &Ruleset) -> Result<(), ApiError> {
    let global = serde_json::to_value(ruleset).map_err(ApiError::internal)?;
    state.account_data.set(&auth.user_id, None, "m.push_rules", json!({"global": global}))?;
    Ok(())
}

/// The ruleset as JSON, with every kind present (empty kinds as empty lists).
fn ruleset_json(ruleset: &Ruleset) -> Result<Value, ApiError> {
    let mut value = serde_json::to_value(ruleset).map_err(ApiError::internal)?;
    for kind in KINDS {
        if value.get(kind).is_none() {
            value[kind] = json!([]);
        }
    }
    Ok(value)
}

fn kind(path: &PathIds) -> Result<RuleKind, ApiError> {
    let kind = path.get("kind")?;
    if !KINDS.contains(&kind) {
        return Err(ApiError::invalid_param(format!("Unknown push rule kind {kind}")));
    }
    Ok(RuleKind::from(kind))
}

/// The rule as JSON, or `M_NOT_FOUND`.
fn find(ruleset: &Ruleset, path: &PathIds) -> Result<Value, ApiError> {
    let kind_name = path.get("kind")?;
    kind(path)?;
    let rule_id = path.get("ruleId")?;
    ruleset_json(ruleset)?[kind_name]
        .as_array()
        .and_then(|rules| rules.iter().find(|rule| rule["rule_id"] == rule_id))
        .cloned()
        .ok_or_else(|| ApiError::not_found("Push rule not found"))
}

/// `GET /_matrix/client/v3/pushrules/`
async fn get_push_rules(State(state): State<AppState>, auth: Auth) -> ApiResult {
    Ok(Json(json!({"global": ruleset_json(&ruleset(&state, &auth)?)?})))
}

/// `GET /_matrix/client/v3/pushrules/global/`
async fn get_global_rules(State(state): State<AppState>, auth: Auth) -> ApiResult {
    Ok(Json(ruleset_json(&ruleset(&state, &auth)?)?))
}

/// `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
async fn get_rule(State(state): State<AppState>, auth: Auth, path: PathIds) -> ApiResult {
    Ok(Json(find(&ruleset(&state, &auth)?, &path)?))
}

#[derive(Deserialize)]
struct PlaceQuery {
    before: Option<String>,
    after: Option<String>,
}

#[derive(Deserialize)]
struct RuleBody {
    actions: Vec<Action>,
    #[serde(default)]
    conditions: Option<Value>,
    pattern: Option<String>,
}

/// `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
async fn put_rule(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Query(place): Query<PlaceQuery>,
    Body(body): Body<RuleBody>,
) -> ApiResult {
    let kind = kind(&path)?;
    let rule_id = path.get("ruleId")?.to_owned();
    let rule = match kind {
        RuleKind::Override | RuleKind::Underride => {
            let new: NewConditionalPushRule = serde_json::from_value(json!({
                "rule_id": rule_id,
                "conditions": body.conditions.unwrap_or_else(|| json!([])),
                "actions": body.actions,
            }))
            .map_err(|error| ApiError::bad_json(format!("Invalid push rule: {error}")))?;
            if kind == RuleKind::Override {
                NewPushRule::Override(new)
            } else {
                NewPushRule::Underride(new)
            }
        }
        RuleKind::Content => {
            let pattern = body
                .pattern
                .ok_or_else(|| ApiError::missing_param("Content rules need a pattern"))?;
            NewPushRule::Content(NewPatternedPushRule::new(rule_id, pattern, body.actions))
        }
        RuleKind::Room => {
            let room_id = OwnedRoomId::try_from(rule_id)
                .map_err(|_| ApiError::invalid_param("Room rules are named by a room id"))?;
            NewPushRule::Room(NewSimplePushRule::new(room_id, body.actions))
        }
        RuleKind::Sender => {
            let user_id = OwnedUserId::try_from(rule_id)
                .map_err(|_| ApiError::invalid_param("Sender rules are named by a user id"))?;
            NewPushRule::Sender(NewSimplePushRule::new(user_id, body.actions))
        }
        _ => return Err(ApiError::invalid_param("Unknown push rule kind")),
    };
    let mut rules = ruleset(&state, &auth)?;
    match rules.insert(rule, place.after.as_deref(), place.before.as_deref()) {
        Ok(()) => {}
        Err(InsertPushRuleError::UnknownRuleId) => {
            return Err(ApiError::not_found("before/after rule not found"));
        }
        Err(error) => return Err(ApiError::invalid_param(error.to_string())),
    }
    save(&state, &auth, &rules)?;
    Ok(Json(json!({})))
}

/// `DELETE /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
async fn delete_rule(State(state): State<AppState>, auth: Auth, path: PathIds) -> ApiResult {
    let kind = kind(&path)?;
    let mut rules = ruleset(&state, &auth)?;
    match rules.remove(kind, path.get("ruleId")?) {
        Ok(()) => {}
        Err(RemovePushRuleError::NotFound) => {
            return Err(ApiError::not_found("Push rule not found"));
        }
        Err(error) => return Err(ApiError::invalid_param(error.to_string())),
    }
    save(&state, &auth, &rules)?;
    Ok(Json(json!({})))
}

/// `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled`
async fn get_enabled(State(state): State<AppState>, auth: Auth, path: PathIds) -> ApiResult {
    let rule = find(&ruleset(&state, &auth)?, &path)?;
    Ok(Json(json!({"enabled": rule["enabled"]})))
}

#[derive(Deserialize)]
struct EnabledBody {
    enabled: bool,
}

/// `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled`
async fn put_enabled(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<EnabledBody>,
) -> ApiResult {
    let kind = kind(&path)?;
    let mut rules = ruleset(&state, &auth)?;
    rules
        .set_enabled(kind, path.get("ruleId")?, body.enabled)
        .map_err(|_| ApiError::not_found("Push rule not found"))?;
    save(&state, &auth, &rules)?;
    Ok(Json(json!({})))
}

/// `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions`
async fn get_actions(State(state): State<AppState>, auth: Auth, path: PathIds) -> ApiResult {
    let rule = find(&ruleset(&state, &auth)?, &path)?;
    Ok(Json(json!({"actions": rule["actions"]})))
}

#[derive(Deserialize)]
struct ActionsBody {
    actions: Vec<Action>,
}

/// `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions`
async fn put_actions(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<ActionsBody>,
) -> ApiResult {
    let kind = kind(&path)?;
    let mut rules = ruleset(&state, &auth)?;
    rules
        .set_actions(kind, path.get("ruleId")?, body.actions)
        .map_err(|_| ApiError::not_found("Push rule not found"))?;
    save(&state, &auth, &rules)?;
    Ok(Json(json!({})))
}
