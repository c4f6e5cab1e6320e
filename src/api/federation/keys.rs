//! Server keys: our own (`/_matrix/key/v2/server`) and the notary (`/_matrix/key/v2/query`),
//! which answers from our store and fetches what it lacks, co-signing every answer.
//!
//! [Retrieving server keys](https://spec.matrix.org/v1.16/server-server-api/#retrieving-server-keys)

use std::collections::BTreeMap;

use axum::{
    Json, Router,
    extract::State,
    routing::{get, post},
};
use ruma::OwnedServerName;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{
    AppState,
    error::ApiResult,
    extract::{Body, PathIds, Query},
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/key/v2/server", get(get_server_keys))
        .route("/_matrix/key/v2/query", post(query_server_keys))
        .route("/_matrix/key/v2/query/{serverName}", get(get_remote_server_keys))
}

/// `GET /_matrix/key/v2/server`
async fn get_server_keys(State(federation): State<federation::Client>) -> ApiResult {
    Ok(Json(serde_json::to_value(federation.own_server_keys()?).unwrap_or_default()))
}

#[derive(Deserialize)]
struct MinimumValidUntil {
    #[serde(default)]
    minimum_valid_until_ts: Option<u64>,
}

/// `GET /_matrix/key/v2/query/{serverName}`
async fn get_remote_server_keys(
    State(federation): State<federation::Client>,
    path: PathIds,
    Query(query): Query<MinimumValidUntil>,
) -> ApiResult {
    let server_name: OwnedServerName = path.id("serverName")?;
    let servers = BTreeMap::from([(server_name, query.minimum_valid_until_ts.unwrap_or(0))]);
    answer(&federation, servers).await
}

#[derive(Deserialize)]
struct KeyQuery {
    server_keys: BTreeMap<String, BTreeMap<String, MinimumValidUntil>>,
}

/// `POST /_matrix/key/v2/query`
async fn query_server_keys(
    State(federation): State<federation::Client>,
    Body(query): Body<KeyQuery>,
) -> ApiResult {
    // Names that are not server names cannot have keys; they are left out like unreachable
    // servers. The criteria of several key ids of one server ask for the latest of them.
    let servers = query
        .server_keys
        .into_iter()
        .filter_map(|(server_name, criteria)| {
            let server_name = OwnedServerName::try_from(server_name).ok()?;
            let minimum = criteria
                .values()
                .filter_map(|criteria| criteria.minimum_valid_until_ts)
                .max()
                .unwrap_or(0);
            Some((server_name, minimum))
        })
        .collect();
    answer(&federation, servers).await
}

async fn answer(
    federation: &federation::Client,
    servers: BTreeMap<OwnedServerName, u64>,
) -> ApiResult {
    let server_keys = federation.query_server_keys(servers).await?;
    Ok(Json(
        json!({ "server_keys": server_keys.into_iter().map(|keys| serde_json::to_value(keys).unwrap_or(Value::Null)).collect::<Vec<_>>() }),
    ))
}
