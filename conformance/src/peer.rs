//! A synthetic federation peer for S5 (federation ingest): a server name on loopback with its
//! own ed25519 key, serving its keys over HTTPS with a certificate of its own CA, and signing
//! the requests and PDUs it sends to the server under test.
//!
//! It uses only ruma (canonical JSON, signatures, reference hashes), rustls and rcgen, so this
//! crate stays independent of the servers it measures. The server under test must trust the
//! peer's CA ([`Peer::ca_path`]) and may contact private addresses; the peer's name carries
//! its port, so it is contacted directly
//! ([resolving server names](https://spec.matrix.org/v1.16/server-server-api/#resolving-server-names)).
//!
//! The peer answers, with a small HTTP/1.1 responder, `GET /_matrix/key/v2/server`
//! ([publishing keys](https://spec.matrix.org/v1.16/server-server-api/#publishing-keys)) and,
//! for the PDUs it signed, `GET /event/{eventId}` and `POST /get_missing_events/{roomId}`:
//! a server that queues incoming PDUs and drops some when the queue is long (Synapse does)
//! fetches them back from the peer, as it would from any real server. Anything else gets a
//! 404.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use ruma::signatures::Ed25519KeyPair;
use ruma::{CanonicalJsonObject, CanonicalJsonValue, RoomVersionId};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::client::enc;

/// The key version the peer publishes.
const KEY_VERSION: &str = "bench";

/// The synthetic peer: its name, key and key server.
pub struct Peer {
    server_name: String,
    key_pair: Ed25519KeyPair,
    ca_path: PathBuf,
    /// Holds the CA and certificate files until the peer is gone.
    _pki: crate::launcher::TestPki,
    http: reqwest::Client,
    key_server: JoinHandle<()>,
    /// The PDUs the peer signed, by event id, for the servers that fetch them back.
    events: Events,
}

/// The peer's own PDUs by event id.
type Events = Arc<std::sync::Mutex<std::collections::HashMap<String, Value>>>;

impl Drop for Peer {
    fn drop(&mut self) {
        self.key_server.abort();
    }
}

/// A federation request signed by the peer (X-Matrix), ready to send.
pub struct SignedRequest {
    url: String,
    method: reqwest::Method,
    authorization: String,
    /// The JSON body, serialised.
    body: Option<Vec<u8>>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// A JSON value as a canonical JSON object.
pub fn object(value: Value) -> Result<CanonicalJsonObject> {
    match CanonicalJsonValue::try_from(value).context("not canonical JSON")? {
        CanonicalJsonValue::Object(object) => Ok(object),
        _ => bail!("not a JSON object"),
    }
}

impl Peer {
    /// Makes a CA and a certificate for `127.0.0.1`, a signing key, and starts serving the keys
    /// over TLS on a free port of `127.0.0.1`; the server name is `127.0.0.1:<port>`.
    pub async fn start() -> Result<Self> {
        let pki = crate::launcher::TestPki::new()?;
        let leaf = pki.leaf("127.0.0.1")?;

        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the peer")?;
        let address = listener.local_addr()?;
        let server_name = format!("127.0.0.1:{}", address.port());
        let document = Ed25519KeyPair::generate();
        let key_pair = Ed25519KeyPair::from_der(&document, KEY_VERSION.to_owned())
            .context("loading the peer key")?;
        // The key server signs with its own copy of the key.
        let server_key = Ed25519KeyPair::from_der(&document, KEY_VERSION.to_owned())
            .context("loading the peer key")?;

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from_pem_file(&leaf.cert)?],
                PrivateKeyDer::from_pem_file(&leaf.key)?,
            )?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let name = server_name.clone();
        let events = Events::default();
        let served = events.clone();
        let key_server = tokio::spawn(async move {
            let server_key = Arc::new(server_key);
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (acceptor, server_key, name, served) =
                    (acceptor.clone(), server_key.clone(), name.clone(), served.clone());
                tokio::spawn(async move {
                    // A failed handshake or a broken connection only ends that connection.
                    let _ = serve(acceptor, tcp, &server_key, &name, &served).await;
                });
            }
        });
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .context("building the HTTP client")?;
        Ok(Self { server_name, key_pair, ca_path: leaf.ca, _pki: pki, http, key_server, events })
    }

    /// The peer's server name, `127.0.0.1:<port>`.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// The PEM file of the CA that signed the peer's certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.ca_path.clone()
    }

    /// A user id on the peer.
    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.server_name)
    }

    /// Adds the content hash and the peer's signature to a PDU of `room_version` and returns
    /// its event id, the reference hash ([signing events](https://spec.matrix.org/v1.16/server-server-api/#signing-events)).
    pub fn hash_and_sign(
        &self,
        pdu: &mut CanonicalJsonObject,
        room_version: &RoomVersionId,
    ) -> Result<String> {
        let rules = room_version.rules().context("unknown room version")?;
        ruma::signatures::hash_and_sign_event(
            &self.server_name,
            &self.key_pair,
            pdu,
            &rules.redaction,
        )
        .context("signing a PDU")?;
        let event_id = event_id_of(pdu, room_version)?;
        let json = serde_json::to_value(&*pdu)?;
        self.events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(event_id.clone(), json);
        Ok(event_id)
    }

    /// Signs a request for the server named `destination`, reached at `base_url`, with the
    /// peer's key ([request authentication](https://spec.matrix.org/v1.16/server-server-api/#request-authentication)),
    /// without sending it: its URL, `Authorization` header and body bytes, so that a benchmark
    /// can do this work before its clock starts. [`Peer::send`] sends it.
    pub fn sign_request(
        &self,
        base_url: &str,
        destination: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<SignedRequest> {
        let mut signed = json!({
            "method": method.as_str(),
            "uri": path,
            "origin": self.server_name,
            "destination": destination,
        });
        if let Some(body) = body {
            signed["content"] = body.clone();
        }
        let mut signed = object(signed)?;
        ruma::signatures::sign_json(&self.server_name, &self.key_pair, &mut signed)
            .context("signing a request")?;
        let signature = signed
            .get("signatures")
            .and_then(|value| value.as_object())
            .and_then(|by_server| by_server.get(&self.server_name))
            .and_then(|value| value.as_object())
            .and_then(|by_key| by_key.get(&format!("ed25519:{KEY_VERSION}")))
            .and_then(|value| value.as_str())
            .context("no signature")?
            .to_owned();
        let authorization = format!(
            "X-Matrix origin=\"{}\",destination=\"{destination}\",key=\"ed25519:{KEY_VERSION}\",sig=\"{signature}\"",
            self.server_name
        );
        Ok(SignedRequest {
            url: format!("{}{path}", base_url.trim_end_matches('/')),
            method,
            authorization,
            body: body.map(serde_json::to_vec).transpose()?,
        })
    }

    /// Sends a signed request; its status and JSON answer (`null` when it is not JSON).
    pub async fn send(&self, signed: &SignedRequest) -> Result<(u16, Value)> {
        let SignedRequest { url, method, authorization, body } = signed;
        let mut request =
            self.http.request(method.clone(), url).header("Authorization", authorization);
        if let Some(body) = body {
            request = request.header("Content-Type", "application/json").body(body.clone());
        }
        let response = request.send().await.with_context(|| format!("{method} {url}"))?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.with_context(|| format!("{method} {url}: body"))?;
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }

    /// A transaction path with a fresh id.
    pub fn transaction_path(&self, counter: u64) -> String {
        format!("/_matrix/federation/v1/send/{}", enc(&format!("bench{}-{counter}", now_ms())))
    }
}

/// The event id of a signed PDU of room version 3 or later: `$` and its reference hash.
pub fn event_id_of(pdu: &CanonicalJsonObject, room_version: &RoomVersionId) -> Result<String> {
    let rules = room_version.rules().context("unknown room version")?;
    let hash = ruma::signatures::reference_hash(pdu, &rules).context("reference hash")?;
    Ok(format!("${hash}"))
}

/// The peer's signed key response
/// ([`GET /_matrix/key/v2/server`](https://spec.matrix.org/v1.16/server-server-api/#get_matrixkeyv2server)).
fn key_response(key_pair: &Ed25519KeyPair, server_name: &str) -> Result<Vec<u8>> {
    let mut response = object(json!({
        "server_name": server_name,
        "valid_until_ts": now_ms() + 86_400_000,
        "verify_keys": {
            format!("ed25519:{KEY_VERSION}"): {"key": STANDARD_NO_PAD.encode(key_pair.public_key())},
        },
        "old_verify_keys": {},
    }))?;
    ruma::signatures::sign_json(server_name, key_pair, &mut response)?;
    Ok(serde_json::to_vec(&response)?)
}

/// Answers one request of a TLS connection, then closes it.
async fn serve(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    key_pair: &Ed25519KeyPair,
    server_name: &str,
    events: &Events,
) -> Result<()> {
    let mut stream = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await??;
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = received.windows(4).position(|window| window == b"\r\n\r\n") {
            break at + 4;
        }
        let read =
            tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await??;
        if read == 0 || received.len() > 16_384 {
            return Ok(());
        }
        received.extend_from_slice(&buffer[..read]);
    };
    let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
    let content_length = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(1 << 20);
    while received.len() < head_end + content_length {
        let read =
            tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await??;
        if read == 0 {
            return Ok(());
        }
        received.extend_from_slice(&buffer[..read]);
    }
    let body: Value = serde_json::from_slice(&received[head_end..]).unwrap_or(Value::Null);
    let path = head.split_whitespace().nth(1).unwrap_or_default();
    let path = path.split('?').next().unwrap_or_default();
    let not_found =
        || ("404 Not Found", br#"{"errcode":"M_NOT_FOUND","error":"not here"}"#.to_vec());
    let (status, body) = if path.starts_with("/_matrix/key/v2/server") {
        ("200 OK", key_response(key_pair, server_name)?)
    } else if let Some(event_id) = path.strip_prefix("/_matrix/federation/v1/event/") {
        let event_id = percent_decode(event_id);
        let pdu =
            events.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&event_id).cloned();
        match pdu {
            Some(pdu) => {
                let answer =
                    json!({"origin": server_name, "origin_server_ts": now_ms(), "pdus": [pdu]});
                ("200 OK", serde_json::to_vec(&answer)?)
            }
            None => not_found(),
        }
    } else if path.starts_with("/_matrix/federation/v1/get_missing_events/") {
        let missing = missing_events(events, &body);
        ("200 OK", serde_json::to_vec(&json!({"events": missing}))?)
    } else {
        not_found()
    };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await?;
    Ok(())
}

/// `%XX` escapes of a path segment decoded.
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%'
            && let Some(byte) =
                segment.get(index + 1..index + 3).and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            decoded.push(byte);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// The answer to `get_missing_events`: the peer's events before `latest_events` (walking
/// prev events) and not at or before `earliest_events`, at most `limit` (default 10), oldest
/// first ([`POST /get_missing_events`](https://spec.matrix.org/v1.16/server-server-api/#post_matrixfederationv1get_missing_eventsroomid)).
fn missing_events(events: &Events, request: &Value) -> Vec<Value> {
    let ids = |key: &str| -> Vec<String> {
        request[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    };
    let limit = request["limit"].as_u64().unwrap_or(10).min(100) as usize;
    let earliest = ids("earliest_events");
    let events = events.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut found: Vec<Value> = Vec::new();
    let mut frontier: Vec<String> = ids("latest_events");
    let mut seen: std::collections::HashSet<String> = frontier.iter().cloned().collect();
    while found.len() < limit {
        let mut next = Vec::new();
        for event_id in &frontier {
            let Some(pdu) = events.get(event_id) else { continue };
            for prev in
                pdu["prev_events"].as_array().into_iter().flatten().filter_map(Value::as_str)
            {
                if earliest.iter().any(|id| id == prev) || !seen.insert(prev.to_owned()) {
                    continue;
                }
                if let Some(prev_pdu) = events.get(prev) {
                    if found.len() < limit {
                        found.push(prev_pdu.clone());
                    }
                    next.push(prev.to_owned());
                }
            }
        }
        if next.is_empty() {
            break;
        }
        frontier = next;
    }
    found.sort_by_key(|pdu| pdu["depth"].as_u64().unwrap_or(0));
    found
}
