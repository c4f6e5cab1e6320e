//! Transactions: `PUT /_matrix/federation/v1/send/{txnId}`, PDUs answered one by one, then
//! the EDUs handed to [`super::edus::receive_edus`] (typing, receipts, presence, device lists,
//! to-device).
//!
//! [Transactions](https://spec.matrix.org/v1.16/server-server-api/#transactions)

use axum::{Json, Router, extract::State, routing::put};
use ruma::CanonicalJsonValue;
use serde_json::{Map, Value, json};

use super::{SignedContent, XMatrixOrigin, edus::receive_edus};
use crate::{
    api::{
        AppState,
        error::{ApiError, ApiResult},
        extract::PathIds,
    },
    rooms::{Rooms, ingest::Remote},
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new().route("/_matrix/federation/v1/send/{txnId}", put(send_transaction))
}

/// The PDUs and EDUs of a transaction body; the other fields (`origin`,
/// `origin_server_ts`) are not used: the origin is the one the X-Matrix header proved.
struct Transaction {
    pdus: Vec<CanonicalJsonValue>,
    edus: Vec<Value>,
}

impl Transaction {
    /// Takes the two arrays out of the verified body (missing: empty), with `M_BAD_JSON` for
    /// a body that is not an object or arrays that are not arrays.
    fn from_content(content: CanonicalJsonValue) -> Result<Self, ApiError> {
        let CanonicalJsonValue::Object(mut body) = content else {
            return Err(ApiError::bad_json("Content must be a JSON object"));
        };
        let mut array = |field: &str| match body.remove(field) {
            None => Ok(Vec::new()),
            Some(CanonicalJsonValue::Array(items)) => Ok(items),
            Some(_) => Err(ApiError::bad_json(format!("{field} must be an array"))),
        };
        let pdus = array("pdus")?;
        let edus = array("edus")?.into_iter().map(Value::from).collect();
        Ok(Self { pdus, edus })
    }
}

/// `PUT /_matrix/federation/v1/send/{txnId}`
async fn send_transaction(
    State(state): State<AppState>,
    State(rooms): State<Rooms>,
    State(remote): State<Remote>,
    XMatrixOrigin(origin): XMatrixOrigin,
    path: PathIds,
    content: SignedContent,
) -> ApiResult {
    let txn_id = path.get("txnId")?;
    let transaction = Transaction::from_content(content.into_value())?;
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
