//! E2EE across servers, the asking side: `keys/query` and `keys/claim` for users of other
//! servers. One signed request per server, all of them at once, each bounded by the client's
//! `timeout`; a server that does not answer in time, or answers with an error, is named in
//! `failures`. What a server answers is kept only for the users and devices asked of it, so a
//! server can never speak for another server's users.
//!
//! Nothing is cached: every query asks again, so an answer is never staler than the remote
//! server's own view.
//!
//! [End-to-end encryption](https://spec.matrix.org/v1.16/server-server-api/#end-to-end-encryption),
//! [`keys/query`](https://spec.matrix.org/v1.16/client-server-api/#post_matrixclientv3keysquery)

use std::{collections::BTreeMap, time::Duration};

use futures::future::join_all;
use ruma::{OwnedDeviceId, OwnedServerName, OwnedUserId};
use serde_json::{Map, Value, json};

/// `POST /_matrix/federation/v1/user/keys/query`.
const QUERY_PATH: &str = "/_matrix/federation/v1/user/keys/query";
/// `POST /_matrix/federation/v1/user/keys/claim`.
const CLAIM_PATH: &str = "/_matrix/federation/v1/user/keys/claim";

/// How long the client waits for remote servers when it sends no `timeout`: the spec's
/// recommended 10 seconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Remote servers' answers to a `keys/query`, merged, in the client API's shape.
#[derive(Debug, Default, PartialEq)]
pub struct RemoteKeys {
    /// user -> device -> device keys (with `unsigned` as the owning server gave it).
    pub device_keys: Map<String, Value>,
    /// user -> master key.
    pub master_keys: Map<String, Value>,
    /// user -> self-signing key.
    pub self_signing_keys: Map<String, Value>,
    /// server name -> `{}`, for every server that did not answer.
    pub failures: Map<String, Value>,
}

/// Remote servers' answers to a `keys/claim`, merged, in the client API's shape.
#[derive(Debug, Default, PartialEq)]
pub struct RemoteClaims {
    /// user -> device -> `algorithm:key_id` -> key.
    pub one_time_keys: Map<String, Value>,
    /// server name -> `{}`, for every server that did not answer.
    pub failures: Map<String, Value>,
}

/// Splits a request's users by their server.
fn by_server<T>(
    wanted: BTreeMap<OwnedUserId, T>,
) -> BTreeMap<OwnedServerName, BTreeMap<OwnedUserId, T>> {
    let mut servers: BTreeMap<OwnedServerName, BTreeMap<OwnedUserId, T>> = BTreeMap::new();
    for (user_id, value) in wanted {
        servers.entry(user_id.server_name().to_owned()).or_default().insert(user_id, value);
    }
    servers
}

/// Posts each body to its server at `path`, all at once, each within `timeout`. Returns every
/// server with its answer, or `None` when it failed (logged here).
async fn ask_servers(
    client: &federation::Client,
    path: &str,
    bodies: Vec<(OwnedServerName, Value)>,
    timeout: Duration,
) -> Vec<(OwnedServerName, Option<Value>)> {
    let requests = bodies.into_iter().map(|(server, body)| async move {
        let answer = tokio::time::timeout(
            timeout,
            client.send_request(&server, federation::Method::POST, path, Some(body)),
        )
        .await;
        let answer = match answer {
            Ok(Ok(answer)) => Some(answer),
            Ok(Err(error)) => {
                tracing::info!(%server, path, %error, "remote server failed to answer");
                None
            }
            Err(_) => {
                tracing::info!(%server, path, timeout_ms = timeout.as_millis(), "remote server timed out");
                None
            }
        };
        (server, answer)
    });
    join_all(requests).await
}

/// `keys/query` for users of other servers (device id lists, empty for all devices).
#[tracing::instrument(skip_all, fields(users = wanted.len()))]
pub async fn query_keys(
    client: &federation::Client,
    wanted: BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>,
    timeout: Duration,
) -> RemoteKeys {
    let servers = by_server(wanted);
    let bodies = servers
        .iter()
        .map(|(server, asked)| (server.clone(), json!({"device_keys": asked})))
        .collect();
    let mut merged = RemoteKeys::default();
    for (server, answer) in ask_servers(client, QUERY_PATH, bodies, timeout).await {
        match (answer, servers.get(&server)) {
            (Some(answer), Some(asked)) => keep_query_answer(asked, &answer, &mut merged),
            _ => {
                merged.failures.insert(server.to_string(), json!({}));
            }
        }
    }
    merged
}

/// `keys/claim` for users of other servers (device -> algorithm).
#[tracing::instrument(skip_all, fields(users = wanted.len()))]
pub async fn claim_keys(
    client: &federation::Client,
    wanted: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, String>>,
    timeout: Duration,
) -> RemoteClaims {
    let servers = by_server(wanted);
    let bodies = servers
        .iter()
        .map(|(server, asked)| (server.clone(), json!({"one_time_keys": asked})))
        .collect();
    let mut merged = RemoteClaims::default();
    for (server, answer) in ask_servers(client, CLAIM_PATH, bodies, timeout).await {
        match (answer, servers.get(&server)) {
            (Some(answer), Some(asked)) => keep_claim_answer(asked, &answer, &mut merged),
            _ => {
                merged.failures.insert(server.to_string(), json!({}));
            }
        }
    }
    merged
}

/// Copies from one server's `user/keys/query` answer what was asked of it: the asked devices
/// of the asked users whose keys name that user and device, and cross-signing keys that name
/// their user. A user-signing key is never taken from another server.
fn keep_query_answer(
    asked: &BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>,
    answer: &Value,
    into: &mut RemoteKeys,
) {
    for (user_id, wanted) in asked {
        if let Some(devices) = answer
            .get("device_keys")
            .and_then(|devices| devices.get(user_id.as_str()))
            .and_then(Value::as_object)
        {
            let kept: Map<String, Value> = devices
                .iter()
                .filter(|(device_id, keys)| {
                    (wanted.is_empty() || wanted.iter().any(|wanted| wanted == device_id.as_str()))
                        && keys.get("user_id").and_then(Value::as_str) == Some(user_id.as_str())
                        && keys.get("device_id").and_then(Value::as_str) == Some(device_id.as_str())
                })
                .map(|(device_id, keys)| (device_id.clone(), keys.clone()))
                .collect();
            into.device_keys.insert(user_id.to_string(), Value::Object(kept));
        }
        for (section, target) in [
            ("master_keys", &mut into.master_keys),
            ("self_signing_keys", &mut into.self_signing_keys),
        ] {
            if let Some(key) = answer.get(section).and_then(|keys| keys.get(user_id.as_str()))
                && key.get("user_id").and_then(Value::as_str) == Some(user_id.as_str())
            {
                target.insert(user_id.to_string(), key.clone());
            }
        }
    }
}

/// Copies from one server's `user/keys/claim` answer what was asked of it: for each asked
/// device, its keys of the asked algorithm.
fn keep_claim_answer(
    asked: &BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, String>>,
    answer: &Value,
    into: &mut RemoteClaims,
) {
    for (user_id, devices) in asked {
        let Some(claimed) = answer
            .get("one_time_keys")
            .and_then(|users| users.get(user_id.as_str()))
            .and_then(Value::as_object)
        else {
            continue;
        };
        let mut kept_devices = Map::new();
        for (device_id, algorithm) in devices {
            let Some(keys) = claimed.get(device_id.as_str()).and_then(Value::as_object) else {
                continue;
            };
            let prefix = format!("{algorithm}:");
            let kept: Map<String, Value> = keys
                .iter()
                .filter(|(key_id, _)| key_id.starts_with(&prefix))
                .map(|(key_id, key)| (key_id.clone(), key.clone()))
                .collect();
            if !kept.is_empty() {
                kept_devices.insert(device_id.to_string(), Value::Object(kept));
            }
        }
        if !kept_devices.is_empty() {
            into.one_time_keys.insert(user_id.to_string(), Value::Object(kept_devices));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str) -> OwnedUserId {
        id.try_into().unwrap()
    }

    fn check_query(asked: &[(&str, &[&str])], answer: Value, expected: RemoteKeys) {
        let asked = asked
            .iter()
            .map(|(user_id, devices)| {
                (user(user_id), devices.iter().map(|device| (*device).into()).collect())
            })
            .collect();
        let mut merged = RemoteKeys::default();
        keep_query_answer(&asked, &answer, &mut merged);
        assert_eq!(merged, expected);
    }

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn a_query_answer_is_kept_only_for_what_was_asked() {
        let keys =
            |user_id: &str, device_id: &str| json!({"user_id": user_id, "device_id": device_id});
        let master = json!({"user_id": "@b:y", "usage": ["master"]});
        let answer = json!({
            "device_keys": {
                "@b:y": {"D1": keys("@b:y", "D1"), "D2": keys("@b:y", "D2"), "D3": keys("@b:y", "XX")},
                "@c:y": {"E": keys("@c:y", "E")},
                "@evil:z": {"F": keys("@evil:z", "F")},
            },
            "master_keys": {"@b:y": master, "@evil:z": {"user_id": "@evil:z"}, "@c:y": {"user_id": "@b:y"}},
            "self_signing_keys": {},
            "user_signing_keys": {"@b:y": {"user_id": "@b:y"}},
        });
        check_query(
            &[("@b:y", &[]), ("@c:y", &["other"]), ("@d:y", &[])],
            answer,
            RemoteKeys {
                // All of b's devices whose keys name them; c's asked device is unknown; d is
                // unknown to the server and so absent.
                device_keys: object(json!({
                    "@b:y": {"D1": keys("@b:y", "D1"), "D2": keys("@b:y", "D2")},
                    "@c:y": {},
                })),
                master_keys: object(json!({"@b:y": master})),
                ..RemoteKeys::default()
            },
        );
    }

    #[test]
    fn a_claim_answer_is_kept_only_for_the_asked_devices_and_algorithm() {
        let asked: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, String>> = [(
            user("@b:y"),
            [("D1".into(), "signed_curve25519".to_owned()), ("D2".into(), "x".to_owned())]
                .into_iter()
                .collect(),
        )]
        .into_iter()
        .collect();
        let answer = json!({"one_time_keys": {
            "@b:y": {
                "D1": {"signed_curve25519:AAA": {"key": "k"}},
                "D2": {"signed_curve25519:BBB": {"key": "wrong algorithm"}},
                "D9": {"signed_curve25519:CCC": {"key": "not asked"}},
            },
            "@evil:z": {"E": {"signed_curve25519:DDD": {"key": "not asked"}}},
        }});
        let mut merged = RemoteClaims::default();
        keep_claim_answer(&asked, &answer, &mut merged);
        assert_eq!(
            merged.one_time_keys,
            object(json!({"@b:y": {"D1": {"signed_curve25519:AAA": {"key": "k"}}}}))
        );
    }

    #[test]
    fn users_are_grouped_by_server() {
        let wanted: BTreeMap<OwnedUserId, u8> =
            [(user("@a:x"), 1), (user("@b:y"), 2), (user("@c:x"), 3)].into_iter().collect();
        let servers = by_server(wanted);
        let names: Vec<&str> = servers.keys().map(|server| server.as_str()).collect();
        assert_eq!(names, ["x", "y"]);
        assert_eq!(servers[<&ruma::ServerName>::try_from("x").unwrap()].len(), 2);
    }
}
