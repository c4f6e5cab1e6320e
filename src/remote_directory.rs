//! The room directory of other servers, asked over federation for our clients: where a remote
//! alias points (`query/directory`) and a remote server's public rooms (`publicRooms`).
//!
//! [Room aliases](https://spec.matrix.org/v1.16/server-server-api/#get_matrixfederationv1querydirectory),
//! [public room directory](https://spec.matrix.org/v1.16/server-server-api/#public-room-directory)

use federation::Method;
use ruma::{OwnedRoomId, OwnedServerName, RoomAliasId, ServerName};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::rooms::directory::{PublicRoomsRequest, ResolvedAlias};

/// The most servers kept from a remote alias answer.
pub const ALIAS_SERVERS_MAX: usize = 100;

/// Why a remote directory request failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteDirectoryError {
    /// The alias's server says it has no such alias.
    #[error("the alias's server does not know it")]
    AliasNotFound,
    /// The alias's server could not be asked, or answered nonsense.
    #[error("the alias's server could not be asked: {0}")]
    AliasUnreachable(#[source] federation::Error),
    /// The server answered the room list request with a Matrix error, passed on as is.
    #[error("the server refused: {status} {errcode}")]
    Refused {
        /// Its HTTP status.
        status: u16,
        /// Its `errcode`.
        errcode: String,
        /// Its `error`.
        error: String,
    },
    /// The server could not be asked for its room list, or answered nonsense.
    #[error("the server could not be asked: {0}")]
    Unreachable(#[source] federation::Error),
}

#[derive(Deserialize)]
struct AliasAnswer {
    room_id: OwnedRoomId,
    #[serde(default)]
    servers: Vec<Value>,
}

/// Asks the alias's server where `alias` points (`GET /_matrix/federation/v1/query/directory`).
pub async fn query_alias(
    client: &federation::Client,
    alias: &RoomAliasId,
) -> Result<ResolvedAlias, RemoteDirectoryError> {
    let query = serde_urlencoded::to_string([("room_alias", alias.as_str())])
        .map_err(|error| bad_answer(alias.server_name(), error.to_string()))
        .map_err(RemoteDirectoryError::AliasUnreachable)?;
    let path = format!("/_matrix/federation/v1/query/directory?{query}");
    let answer = match client.send_request(alias.server_name(), Method::GET, &path, None).await {
        Ok(answer) => answer,
        Err(federation::Error::Status { status: 404, .. }) => {
            return Err(RemoteDirectoryError::AliasNotFound);
        }
        Err(error) => return Err(RemoteDirectoryError::AliasUnreachable(error)),
    };
    let answer: AliasAnswer = serde_json::from_value(answer).map_err(|error| {
        RemoteDirectoryError::AliasUnreachable(bad_answer(alias.server_name(), error.to_string()))
    })?;
    // Unparsable server names are dropped rather than failing the whole answer.
    let servers = answer
        .servers
        .into_iter()
        .filter_map(|server| OwnedServerName::try_from(server.as_str()?).ok())
        .take(ALIAS_SERVERS_MAX)
        .collect();
    Ok(ResolvedAlias { room_id: answer.room_id, servers })
}

/// Asks `server` for a page of its public rooms: `GET /_matrix/federation/v1/publicRooms`
/// when there is no filter, `POST` with the filter otherwise. Answers the page as the server
/// sent it, once it looks like one.
pub async fn public_rooms(
    client: &federation::Client,
    server: &ServerName,
    request: &PublicRoomsRequest,
    include_all_networks: bool,
) -> Result<Value, RemoteDirectoryError> {
    let filtered = request.search.is_some() || !request.room_types.is_empty();
    let answer = if filtered {
        let mut body = Map::new();
        if let Some(limit) = request.limit {
            body.insert("limit".into(), json!(limit));
        }
        if let Some(since) = &request.since {
            body.insert("since".into(), json!(since));
        }
        let mut filter = Map::new();
        if let Some(search) = &request.search {
            filter.insert("generic_search_term".into(), json!(search));
        }
        if !request.room_types.is_empty() {
            filter.insert("room_types".into(), json!(request.room_types));
        }
        body.insert("filter".into(), Value::Object(filter));
        body.insert("include_all_networks".into(), json!(include_all_networks));
        let path = "/_matrix/federation/v1/publicRooms";
        client.send_request(server, Method::POST, path, Some(Value::Object(body))).await
    } else {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        if let Some(limit) = request.limit {
            pairs.push(("limit", limit.to_string()));
        }
        if let Some(since) = &request.since {
            pairs.push(("since", since.clone()));
        }
        pairs.push(("include_all_networks", include_all_networks.to_string()));
        let query = serde_urlencoded::to_string(&pairs)
            .map_err(|error| RemoteDirectoryError::Unreachable(bad_answer(server, error)))?;
        let path = format!("/_matrix/federation/v1/publicRooms?{query}");
        client.send_request(server, Method::GET, &path, None).await
    };
    let answer = answer.map_err(|error| {
        if let federation::Error::Status { status, body, .. } = &error
            // A 401 is about our signature, not the client's request: not passed on.
            && (400..500).contains(status)
            && *status != 401
            && let Ok(parsed) = serde_json::from_str::<Value>(body)
            && let Some(errcode) = parsed.get("errcode").and_then(Value::as_str)
        {
            return RemoteDirectoryError::Refused {
                status: *status,
                errcode: errcode.to_owned(),
                error: parsed.get("error").and_then(Value::as_str).unwrap_or("").to_owned(),
            };
        }
        RemoteDirectoryError::Unreachable(error)
    })?;
    if !answer.get("chunk").is_some_and(Value::is_array) {
        return Err(RemoteDirectoryError::Unreachable(bad_answer(server, "no chunk")));
    }
    Ok(answer)
}

fn bad_answer(server: &ServerName, reason: impl ToString) -> federation::Error {
    federation::Error::InvalidResponse {
        server_name: server.to_owned(),
        reason: reason.to_string(),
    }
}
