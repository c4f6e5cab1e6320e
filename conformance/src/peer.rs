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
//! The peer answers one kind of request, `GET /_matrix/key/v2/server`
//! ([publishing keys](https://spec.matrix.org/v1.16/server-server-api/#publishing-keys)), with
//! a small HTTP/1.1 responder: nothing else is needed of it while it joins a room and sends
//! transactions, and anything else gets a 404.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
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
    dir: tempfile::TempDir,
    http: reqwest::Client,
    key_server: JoinHandle<()>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.key_server.abort();
    }
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
        let dir = tempfile::Builder::new().prefix("hearth-bench-peer-").tempdir()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate()?;
        let ca = ca_params.self_signed(&ca_key)?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate()?;
        let leaf =
            CertificateParams::new(vec!["127.0.0.1".to_owned()])?.signed_by(&leaf_key, &issuer)?;

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
                vec![CertificateDer::from_pem_slice(leaf.pem().as_bytes())?],
                PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes())?,
            )?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let name = server_name.clone();
        let key_server = tokio::spawn(async move {
            let server_key = Arc::new(server_key);
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (acceptor, server_key, name) =
                    (acceptor.clone(), server_key.clone(), name.clone());
                tokio::spawn(async move {
                    // A failed handshake or a broken connection only ends that connection.
                    let _ = serve_keys(acceptor, tcp, &server_key, &name).await;
                });
            }
        });
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .context("building the HTTP client")?;
        Ok(Self { server_name, key_pair, dir, http, key_server })
    }

    /// The peer's server name, `127.0.0.1:<port>`.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// The PEM file of the CA that signed the peer's certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
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
        event_id_of(pdu, room_version)
    }

    /// Sends a request signed with the peer's key
    /// ([request authentication](https://spec.matrix.org/v1.16/server-server-api/#request-authentication))
    /// to `base_url`, for the server named `destination`. Returns the status and the body.
    pub async fn request(
        &self,
        base_url: &str,
        destination: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
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
        let url = format!("{}{path}", base_url.trim_end_matches('/'));
        let mut request =
            self.http.request(method.clone(), &url).header("Authorization", authorization);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.with_context(|| format!("{method} {path}"))?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.with_context(|| format!("{method} {path}: body"))?;
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

/// Answers the requests of one TLS connection, then closes it.
async fn serve_keys(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    key_pair: &Ed25519KeyPair,
    server_name: &str,
) -> Result<()> {
    let mut stream = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await??;
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        let read =
            tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await??;
        if read == 0 || head.len() > 16_384 {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..read]);
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.split_whitespace().nth(1).unwrap_or_default();
    let (status, body) = if path.starts_with("/_matrix/key/v2/server") {
        ("200 OK", key_response(key_pair, server_name)?)
    } else {
        ("404 Not Found", br#"{"errcode":"M_UNRECOGNIZED","error":"not served"}"#.to_vec())
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
