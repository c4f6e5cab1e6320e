//! Transactions: `PUT /_matrix/federation/v1/send/{txnId}`, PDUs answered one by one, then
//! the EDUs handed to [`super::edus::receive_edus`] (typing, receipts, presence, device lists,
//! to-device).
//!
//! [Transactions](https://spec.matrix.org/v1.16/server-server-api/#transactions)

use axum::{Json, Router, extract::State, routing::put};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{XMatrixOrigin, edus::receive_edus};
use crate::{
    api::{
        AppState,
        error::{ApiError, ApiResult},
        extract::{Body, PathIds},
    },
    rooms::{Rooms, ingest::Remote},
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new().route("/_matrix/federation/v1/send/{txnId}", put(send_transaction))
}

#[derive(Deserialize)]
struct Transaction {
    #[serde(default)]
    pdus: Vec<Value>,
    #[serde(default)]
    edus: Vec<Value>,
}

/// `PUT /_matrix/federation/v1/send/{txnId}`
async fn send_transaction(
    State(state): State<AppState>,
    State(rooms): State<Rooms>,
    State(remote): State<Remote>,
    XMatrixOrigin(origin): XMatrixOrigin,
    path: PathIds,
    Body(transaction): Body<Transaction>,
) -> ApiResult {
    let txn_id = path.get("txnId")?;
    let results = rooms
        .receive_transaction(&origin, txn_id, transaction.pdus, transaction.edus.len(), &remote)
        .await
        .map_err(|error| ApiError::bad_json(error.to_string()))?;
    // After the PDUs: an EDU may concern a user whose join is in the same transaction.
    receive_edus(&state, &origin, transaction.edus).await?;
    let mut pdus = Map::new();
    for (event_id, result) in results {
        let answer = match result {
            Ok(_) => json!({}),
            Err(error) => json!({"error": error.to_string()}),
        };
        pdus.insert(event_id.to_string(), answer);
    }
    Ok(Json(json!({"pdus": pdus})))
}
