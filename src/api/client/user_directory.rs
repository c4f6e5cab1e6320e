//! User directory search over local users: those who share a room with the searcher, or are
//! in a public room.
//!
//! [User directory](https://spec.matrix.org/v1.16/client-server-api/#user-directory)

use axum::{Json, Router, extract::State, routing::post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{
    AppState,
    error::ApiResult,
    extract::{Auth, Body},
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new().route("/_matrix/client/v3/user_directory/search", post(search_users))
}

#[derive(Deserialize)]
struct SearchBody {
    search_term: String,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    10
}

/// `POST /_matrix/client/v3/user_directory/search`
async fn search_users(
    State(state): State<AppState>,
    auth: Auth,
    Body(body): Body<SearchBody>,
) -> ApiResult {
    let term = body.search_term.to_lowercase();
    let mut visible = std::collections::BTreeSet::new();
    for room_id in state.rooms.joined_rooms(&auth.user_id)? {
        visible.extend(state.rooms.joined_members(&room_id)?);
    }
    for room in state.rooms.public_room_entries(&Default::default())? {
        if let Some(room_id) =
            room.get("room_id").and_then(Value::as_str).and_then(|id| ruma::RoomId::parse(id).ok())
        {
            visible.extend(state.rooms.joined_members(&room_id)?);
        }
    }
    let mut results = Vec::new();
    for user_id in visible {
        let Some(account) =
            state.accounts.account(&user_id)?.filter(|account| !account.deactivated)
        else {
            continue;
        };
        let name = account.displayname.clone().unwrap_or_default();
        if !user_id.as_str().to_lowercase().contains(&term) && !name.to_lowercase().contains(&term)
        {
            continue;
        }
        results.push(json!({"user_id": user_id, "display_name": account.displayname, "avatar_url": account.avatar_url}));
    }
    let limited = results.len() > body.limit;
    results.truncate(body.limit);
    Ok(Json(json!({"results": results, "limited": limited})))
}
