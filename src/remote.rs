//! The room core's view of other servers ([`ServerKeys`], [`RemoteEvents`]) implemented over
//! the federation client: verify keys come from the client's key cache and fetching, and
//! missing events are fetched with signed `event`, `get_missing_events`, `backfill` and
//! `state_ids` requests, and
//! membership handshakes (`make_join`/`send_join`, `make_leave`/`send_leave`, `invite`) are
//! signed requests too.

use std::{collections::BTreeMap, sync::Arc};

use futures::future::BoxFuture;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, MilliSecondsSinceUnixEpoch, OwnedEventId,
    RoomId, RoomVersionId, ServerName, UserId, serde::Base64,
};
use serde_json::{Value, json};

use crate::rooms::ingest::{
    MembershipRemoteError, Remote, RemoteError, RemoteEvents, RemoteMembership, ServerKeys,
};

/// The federation client as the room core's window on other servers.
struct OverFederation {
    client: federation::Client,
}

/// A [`Remote`] that reaches other servers through `client`.
pub fn over_federation(client: federation::Client) -> Remote {
    let remote = Arc::new(OverFederation { client });
    Remote { keys: remote.clone(), events: remote.clone(), membership: remote }
}

/// A refusal (403, 404) ends a join; anything else lets the next server be tried.
fn membership_error(error: federation::Error) -> MembershipRemoteError {
    match &error {
        federation::Error::Status { status: 403 | 404, body, .. } => {
            let message = serde_json::from_str::<Value>(body)
                .ok()
                .and_then(|body| body.get("error").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| error.to_string());
            MembershipRemoteError::Refused(message)
        }
        _ => MembershipRemoteError::Failed(error.to_string()),
    }
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

    fn backfill<'a>(
        &'a self,
        server: &'a ServerName,
        room_id: &'a RoomId,
        from: &'a [OwnedEventId],
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<CanonicalJsonObject>, RemoteError>> {
        Box::pin(async move {
            let mut path = format!(
                "/_matrix/federation/v1/backfill/{}?limit={limit}",
                segment(room_id.as_str())
            );
            for event_id in from {
                path.push_str(&format!("&v={}", segment(event_id.as_str())));
            }
            let answer = self
                .client
                .send_request(server, federation::Method::GET, &path, None)
                .await
                .map_err(|error| RemoteError(format!("backfill from {server}: {error}")))?;
            let pdus = answer.get("pdus").and_then(Value::as_array).cloned().unwrap_or_default();
            // A PDU that is not a JSON object is left out; the rest are checked one by one.
            Ok(pdus.into_iter().take(limit).filter_map(|pdu| canonical(pdu).ok()).collect())
        })
    }

    fn state_ids<'a>(
        &'a self,
        server: &'a ServerName,
        room_id: &'a RoomId,
        event_id: &'a EventId,
    ) -> BoxFuture<'a, Result<Vec<OwnedEventId>, RemoteError>> {
        Box::pin(async move {
            let path = format!(
                "/_matrix/federation/v1/state_ids/{}?event_id={}",
                segment(room_id.as_str()),
                segment(event_id.as_str())
            );
            let answer = self
                .client
                .send_request(server, federation::Method::GET, &path, None)
                .await
                .map_err(|error| RemoteError(format!("state_ids from {server}: {error}")))?;
            let ids = answer
                .get("pdu_ids")
                .and_then(Value::as_array)
                .ok_or_else(|| RemoteError(format!("{server} sent no pdu_ids")))?;
            ids.iter()
                .map(|id| {
                    id.as_str()
                        .and_then(|id| OwnedEventId::try_from(id).ok())
                        .ok_or_else(|| RemoteError(format!("{server} sent a bad event id")))
                })
                .collect()
        })
    }
}

impl RemoteMembership for OverFederation {
    fn make_membership<'a>(
        &'a self,
        server: &'a ServerName,
        room_id: &'a RoomId,
        user_id: &'a UserId,
        membership: &'a str,
        supported_versions: &'a [RoomVersionId],
    ) -> BoxFuture<'a, Result<(RoomVersionId, CanonicalJsonObject), MembershipRemoteError>> {
        Box::pin(async move {
            let mut path = format!(
                "/_matrix/federation/v1/make_{membership}/{}/{}",
                segment(room_id.as_str()),
                segment(user_id.as_str())
            );
            for (index, version) in supported_versions.iter().enumerate() {
                path.push(if index == 0 { '?' } else { '&' });
                path.push_str(&format!("ver={}", segment(version.as_str())));
            }
            let answer = self
                .client
                .send_request(server, federation::Method::GET, &path, None)
                .await
                .map_err(membership_error)?;
            let version = answer
                .get("room_version")
                .and_then(Value::as_str)
                .and_then(|version| RoomVersionId::try_from(version).ok())
                .unwrap_or(RoomVersionId::V1);
            let event = answer
                .get("event")
                .cloned()
                .ok_or_else(|| MembershipRemoteError::Failed(format!("{server} sent no template")))
                .and_then(|event| {
                    canonical(event).map_err(|error| MembershipRemoteError::Failed(error.0))
                })?;
            Ok((version, event))
        })
    }

    fn send_membership<'a>(
        &'a self,
        server: &'a ServerName,
        room_id: &'a RoomId,
        event_id: &'a EventId,
        membership: &'a str,
        event: CanonicalJsonObject,
    ) -> BoxFuture<'a, Result<Value, MembershipRemoteError>> {
        Box::pin(async move {
            // `send_knock` has only a v1; joins and leaves use v2.
            let api = if membership == "knock" { "v1" } else { "v2" };
            let path = format!(
                "/_matrix/federation/{api}/send_{membership}/{}/{}",
                segment(room_id.as_str()),
                segment(event_id.as_str())
            );
            let body = serde_json::to_value(&event)
                .map_err(|error| MembershipRemoteError::Failed(error.to_string()))?;
            self.client
                .send_request(server, federation::Method::PUT, &path, Some(body))
                .await
                .map_err(membership_error)
        })
    }

    fn invite<'a>(
        &'a self,
        server: &'a ServerName,
        room_id: &'a RoomId,
        event_id: &'a EventId,
        room_version: &'a RoomVersionId,
        event: CanonicalJsonObject,
        invite_room_state: Vec<Value>,
    ) -> BoxFuture<'a, Result<CanonicalJsonObject, MembershipRemoteError>> {
        Box::pin(async move {
            let path = format!(
                "/_matrix/federation/v2/invite/{}/{}",
                segment(room_id.as_str()),
                segment(event_id.as_str())
            );
            let body = json!({
                "room_version": room_version,
                "event": event,
                "invite_room_state": invite_room_state,
            });
            let answer = self
                .client
                .send_request(server, federation::Method::PUT, &path, Some(body))
                .await
                .map_err(membership_error)?;
            answer
                .get("event")
                .cloned()
                .ok_or_else(|| MembershipRemoteError::Failed(format!("{server} sent no event")))
                .and_then(|event| {
                    canonical(event).map_err(|error| MembershipRemoteError::Failed(error.0))
                })
        })
    }
}
