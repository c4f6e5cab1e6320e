//! Send-to-device messaging: `PUT /sendToDevice/{eventType}/{txnId}`, idempotent per sending
//! device and transaction id. Delivery happens in `/sync` (`src/sync.rs`); messages for users
//! of other servers leave as `m.direct_to_device` EDUs.
//!
//! [Send-to-device messaging](https://spec.matrix.org/v1.16/client-server-api/#send-to-device-messaging)

use std::collections::BTreeMap;

use axum::{Json, Router, extract::State, routing::put};
use ruma::{OwnedDeviceId, OwnedServerName, OwnedUserId, UserId};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    accounts::Accounts,
    api::{
        AppState,
        error::{ApiError, ApiResult},
        extract::{Auth, Body, PathIds},
    },
    e2ee::ToDeviceDelivery,
};

/// Routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new().route("/_matrix/client/v3/sendToDevice/{eventType}/{txnId}", put(send_to_device))
}

#[derive(Deserialize)]
struct SendBody {
    messages: BTreeMap<OwnedUserId, BTreeMap<String, Value>>,
}

/// `PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}`
async fn send_to_device(
    State(state): State<AppState>,
    auth: Auth,
    path: PathIds,
    Body(body): Body<SendBody>,
) -> ApiResult {
    let kind = path.get("eventType")?;
    let txn_id = path.get("txnId")?;
    let mut deliveries = Vec::new();
    let mut remote: BTreeMap<OwnedServerName, BTreeMap<OwnedUserId, BTreeMap<String, Value>>> =
        BTreeMap::new();
    for (user_id, devices) in body.messages {
        if user_id.server_name() != state.accounts.server_name() {
            remote.entry(user_id.server_name().to_owned()).or_default().insert(user_id, devices);
            continue;
        }
        deliveries.extend(local_deliveries(&state.accounts, &user_id, devices)?);
    }
    state.e2ee.send_to_device(&auth.user_id, &auth.device_id, txn_id, kind, &deliveries)?;
    // Users of other servers get theirs through their server (`m.direct_to_device`). The
    // message id is derived from the sending device and transaction, so a client's retry of
    // the same transaction is recognised by the receiving server as the same message.
    let message_id = message_id(&auth.user_id, auth.device_id.as_str(), txn_id);
    for (server, messages) in remote {
        let content = json!({
            "sender": auth.user_id,
            "type": kind,
            "message_id": message_id,
            "messages": messages,
        });
        state.rooms.outbox().send_edu(&[server], "m.direct_to_device", content)?;
    }
    Ok(Json(json!({})))
}

/// The deliveries of one local user's messages (device id or `*` -> content): `*` means every
/// device of the user, and devices that do not exist are skipped.
pub(crate) fn local_deliveries(
    accounts: &Accounts,
    user_id: &UserId,
    devices: BTreeMap<String, Value>,
) -> Result<Vec<ToDeviceDelivery>, ApiError> {
    let existing: Vec<OwnedDeviceId> =
        accounts.devices(user_id)?.into_iter().map(|device| device.device_id).collect();
    let mut deliveries = Vec::new();
    for (device, content) in devices {
        let targets: Vec<OwnedDeviceId> = if device == "*" {
            existing.clone()
        } else {
            existing.iter().filter(|known| known.as_str() == device).cloned().collect()
        };
        for device_id in targets {
            deliveries.push(ToDeviceDelivery {
                user_id: user_id.to_owned(),
                device_id,
                content: content.clone(),
            });
        }
    }
    Ok(deliveries)
}

/// A `message_id` of at most 32 characters naming one (sender, device, transaction).
fn message_id(user_id: &UserId, device_id: &str, txn_id: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("{user_id}\n{device_id}\n{txn_id}").as_bytes());
    let mut id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest);
    id.truncate(32);
    id
}
