//! Set-ups several tests share: two users in one room, a password UIA answer, server names.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use crate::client::{Ctx, User, str_field};

/// The server name part of a user id.
pub(crate) fn server_name(user: &User) -> &str {
    user.user_id.split_once(':').map(|(_, server)| server).unwrap_or_default()
}

/// Two fresh users: `a` created a public room and `b` joined it.
pub(crate) async fn two_in_public_room(ctx: &Ctx) -> Result<(User, User, String)> {
    let (a, b) = (ctx.user().await?, ctx.user().await?);
    let room_id = a.create_public_room().await?;
    b.join(&room_id).await?;
    Ok((a, b, room_id))
}

/// The `m.login.password` auth dict for user-interactive auth as `user`.
pub(crate) fn password_auth(user: &User, session: Option<&str>) -> Value {
    let mut auth = json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user.user_id},
        "password": user.password,
    });
    if let Some(session) = session {
        auth["session"] = json!(session);
    }
    auth
}

/// Checks a 401 user-interactive auth answer and returns its session.
pub(crate) fn uia_session(body: &Value) -> Result<String> {
    let flows = body.get("flows").and_then(Value::as_array);
    ensure!(flows.is_some_and(|flows| !flows.is_empty()), "UIA answer without flows: {body}");
    ensure!(body.get("params").is_some_and(Value::is_object), "UIA answer without params: {body}");
    Ok(str_field(body, "session")?.to_owned())
}

/// Whether some flow of a UIA answer is exactly the given single stage.
pub(crate) fn has_single_stage_flow(body: &Value, stage: &str) -> bool {
    body.get("flows").and_then(Value::as_array).is_some_and(|flows| {
        flows.iter().any(|flow| {
            flow.get("stages")
                .and_then(Value::as_array)
                .is_some_and(|stages| stages.len() == 1 && stages[0] == stage)
        })
    })
}

/// The membership of `user_id` in the room, read from the room state by `reader`.
pub(crate) async fn membership_of(reader: &User, room_id: &str, user_id: &str) -> Result<String> {
    let content = reader.get_state(room_id, "m.room.member", user_id).await?;
    Ok(str_field(&content, "membership")?.to_owned())
}
