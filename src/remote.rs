//! The room core's view of other servers ([`ServerKeys`], [`RemoteEvents`]) implemented over
//! the federation client: verify keys come from the client's key cache and fetching, and
//! missing events are fetched with signed `event` and `get_missing_events` requests.

use std::{collections::BTreeMap, sync::Arc};

use futures::future::BoxFuture;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, MilliSecondsSinceUnixEpoch, OwnedEventId,
    RoomId, ServerName, serde::Base64,
};
use serde_json::{Value, json};

use crate::rooms::ingest::{Remote, RemoteError, RemoteEvents, ServerKeys};

/// The federation client as the room core's window on other servers.
struct OverFederation {
    client: federation::Client,
}

/// A [`Remote`] that reaches other servers through `client`.
pub fn over_federation(client: federation::Client) -> Remote {
    let remote = Arc::new(OverFederation { client });
    Remote { keys: remote.clone(), events: remote }
}

/// Percent-encodes one path segment.
fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn canonical(value: Value) -> Result<CanonicalJsonObject, RemoteError> {
    match CanonicalJsonValue::try_from(value) {
        Ok(CanonicalJsonValue::Object(object)) => Ok(object),
        Ok(_) => Err(RemoteError("a PDU is not a JSON object".to_owned())),
        Err(error) => Err(RemoteError(format!("a PDU is not canonical JSON: {error}"))),
    }
}

impl ServerKeys for OverFederation {
    fn verify_keys<'a>(
        &'a self,
        server: &'a ServerName,
        _valid_at: MilliSecondsSinceUnixEpoch,
    ) -> BoxFuture<'a, Result<BTreeMap<String, Base64>, RemoteError>> {
        Box::pin(async move {
            let stored = self
                .client
                .server_keys(server, None, 0)
                .await
                .map_err(|error| RemoteError(format!("keys of {server}: {error}")))?;
            Ok(stored
                .verify_keys
                .iter()
                .filter_map(|(key_id, key)| Some((key_id.clone(), Base64::new(key.key_bytes()?))))
                .collect())
        })
    }
}

impl RemoteEvents for OverFederation {
    fn get_event<'a>(
        &'a self,
        server: &'a ServerName,
        event_id: &'a EventId,
    ) -> BoxFuture<'a, Result<CanonicalJsonObject, RemoteError>> {
        Box::pin(async move {
            let path = format!("/_matrix/federation/v1/event/{}", segment(event_id.as_str()));
            let answer = self
                .client
                .send_request(server, federation::Method::GET, &path, None)
                .await
                .map_err(|error| RemoteError(format!("event {event_id} from {server}: {error}")))?;
            let pdu = answer
                .get("pdus")
                .and_then(Value::as_array)
                .and_then(|pdus| pdus.first())
                .cloned()
                .ok_or_else(|| RemoteError(format!("{server} sent no PDU for {event_id}")))?;
            canonical(pdu)
        })
    }

    fn get_missing_events<'a>(
        &'a self,
        server: &'a ServerName,
        room_id: &'a RoomId,
        earliest_events: &'a [OwnedEventId],
        latest_events: &'a [OwnedEventId],
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<CanonicalJsonObject>, RemoteError>> {
        Box::pin(async move {
            let path =
                format!("/_matrix/federation/v1/get_missing_events/{}", segment(room_id.as_str()));
            let body = json!({
                "earliest_events": earliest_events,
                "latest_events": latest_events,
                "limit": limit,
            });
            let answer = self
                .client
                .send_request(server, federation::Method::POST, &path, Some(body))
                .await
                .map_err(|error| RemoteError(format!("missing events from {server}: {error}")))?;
            let events =
                answer.get("events").and_then(Value::as_array).cloned().unwrap_or_default();
            events.into_iter().take(limit).map(canonical).collect()
        })
    }
}
