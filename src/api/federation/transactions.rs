//! Transactions: `PUT /_matrix/federation/v1/send/{txnId}`, PDUs answered one by one, then
//! the EDUs applied (typing, receipts, presence).
//!
//! [Transactions](https://spec.matrix.org/v1.16/server-server-api/#transactions)

use axum::{Json, Router, extract::State, routing::put};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::XMatrixOrigin;
use crate::{
    api::{
        AppState,
        error::{ApiError, ApiResult},
        extract::{Body, PathIds},
    },
    edus,
    ephemeral::Ephemeral,
    rooms::{
        Rooms,
        ingest::{EDUS_PER_TRANSACTION_MAX, Remote},
    },
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
    State(rooms): State<Rooms>,
    State(ephemeral): State<Ephemeral>,
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
    // EDUs after the PDUs, so a receipt can name an event of the same transaction.
    for edu in transaction.edus.iter().take(EDUS_PER_TRANSACTION_MAX) {
        let edu_type = edu.get("edu_type").and_then(Value::as_str).unwrap_or_default();
        let content = edu.get("content").unwrap_or(&Value::Null);
        match edus::receive(&rooms, &ephemeral, &origin, edu_type, content) {
            Ok(true) => {}
            Ok(false) => tracing::debug!(edu_type, "EDU type not handled"),
            Err(error) => tracing::warn!(edu_type, %error, "EDU not applied"),
        }
    }
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
