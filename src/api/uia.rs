//! User-interactive authentication: sessions, flows and the stages this server offers
//! (`m.login.dummy`, `m.login.registration_token`, `m.login.password`).
//!
//! [User-interactive authentication](https://spec.matrix.org/v1.16/client-server-api/#user-interactive-authentication-api)

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ruma::UserId;
use serde_json::{Value, json};

use crate::{
    accounts::{Accounts, random_string},
    api::error::ApiError,
};

/// How long an unfinished session lives.
const SESSION_LIFETIME: Duration = Duration::from_secs(30 * 60);

#[derive(Clone)]
struct Session {
    completed: Vec<String>,
    created: Instant,
}

/// Open UIA sessions (in memory: they are short-lived by design).
#[derive(Clone, Default)]
pub struct UiaSessions {
    sessions: Arc<Mutex<HashMap<String, Session>>>,
}

/// What a stage checks against.
pub struct StageContext<'a> {
    /// For `m.login.password`: the user who must prove their password.
    pub user_id: Option<&'a UserId>,
    /// For `m.login.registration_token`: the token.
    pub registration_token: Option<&'a str>,
    /// Accounts, to check passwords.
    pub accounts: &'a Accounts,
}

impl UiaSessions {
    fn state(&self, session_id: &str, flows: &[&[&str]], completed: &[String]) -> Value {
        let mut state = json!({
            "flows": flows.iter().map(|stages| json!({"stages": stages})).collect::<Vec<_>>(),
            "params": {},
            "session": session_id,
        });
        if !completed.is_empty() {
            state["completed"] = json!(completed);
        }
        state
    }

    /// Checks the `auth` dict of a request against `flows`. `Ok(())` once a flow is complete;
    /// otherwise the 401 answer that tells the client what is left.
    pub async fn check(
        &self,
        auth: Option<&Value>,
        flows: &[&[&str]],
        context: StageContext<'_>,
    ) -> Result<(), ApiError> {
        let mut sessions =
            self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        sessions.retain(|_, session| session.created.elapsed() < SESSION_LIFETIME);
        let Some(auth) = auth.filter(|auth| auth.is_object()) else {
            let session_id = random_string(24);
            self.store(&session_id, Session { completed: Vec::new(), created: Instant::now() });
            return Err(ApiError::user_interactive(self.state(&session_id, flows, &[]), None));
        };
        let session_id = auth.get("session").and_then(Value::as_str).map(str::to_owned);
        let (session_id, mut session) = match session_id {
            Some(id) => match sessions.get(&id) {
                Some(session) => (id, session.clone()),
                None => {
                    return Err(
                        ApiError::bad_request("Unknown session").with("errcode", "M_UNKNOWN")
                    );
                }
            },
            None => (random_string(24), Session { completed: Vec::new(), created: Instant::now() }),
        };
        let stage = auth.get("type").and_then(Value::as_str).unwrap_or("");
        if !stage.is_empty() {
            let allowed = flows.iter().any(|flow| flow.contains(&stage));
            let passed = allowed && self.run_stage(stage, auth, &context).await?;
            if !passed {
                self.store(&session_id, session.clone());
                let (errcode, error) = if allowed {
                    ("M_FORBIDDEN", "Invalid authentication")
                } else {
                    ("M_UNRECOGNIZED", "Unknown authentication stage")
                };
                return Err(ApiError::user_interactive(
                    self.state(&session_id, flows, &session.completed),
                    Some((errcode, error)),
                ));
            }
            if !session.completed.iter().any(|done| done == stage) {
                session.completed.push(stage.to_owned());
            }
        }
        if flows
            .iter()
            .any(|flow| flow.iter().all(|stage| session.completed.iter().any(|done| done == stage)))
        {
            self.sessions
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .remove(&session_id);
            return Ok(());
        }
        self.store(&session_id, session.clone());
        Err(ApiError::user_interactive(self.state(&session_id, flows, &session.completed), None))
    }

    fn store(&self, session_id: &str, session: Session) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        sessions.retain(|_, session| session.created.elapsed() < SESSION_LIFETIME);
        sessions.insert(session_id.to_owned(), session);
    }

    async fn run_stage(
        &self,
        stage: &str,
        auth: &Value,
        context: &StageContext<'_>,
    ) -> Result<bool, ApiError> {
        Ok(match stage {
            "m.login.dummy" => true,
            "m.login.registration_token" => {
                let given = auth.get("token").and_then(Value::as_str);
                given.is_some() && given == context.registration_token
            }
            "m.login.password" => {
                let Some(user_id) = context.user_id else { return Ok(false) };
                let claimed = auth
                    .get("identifier")
                    .and_then(|identifier| identifier.get("user"))
                    .or_else(|| auth.get("user"))
                    .and_then(Value::as_str);
                if let Some(claimed) = claimed
                    && context.accounts.parse_user(claimed).as_deref() != Some(user_id)
                {
                    return Ok(false);
                }
                let password = auth.get("password").and_then(Value::as_str).unwrap_or("");
                context
                    .accounts
                    .check_password(user_id, password)
                    .await
                    .map_err(ApiError::internal)?
            }
            _ => false,
        })
    }
}
