//! Federation transport between two real servers on 127.0.0.2 and 127.0.0.3: TLS with a test CA,
//! server names with explicit ports (contacted directly, as the spec says), key fetching and the
//! notary, X-Matrix signing and its refusals, and the private-address guard.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use federation::{
    Client, ClientConfig, Error, MemoryKeyStore, Method, ServerSigningKey, keys, request,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, ServerName};
use serde_json::{Value, json};

use crate::harness::TestServer;

/// A test CA and the files of its leaf certificates.
pub(crate) struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().expect("test setup");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("test setup");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("test setup");
        let certificate = params.self_signed(&key).expect("test setup");
        std::fs::write(dir.path().join("ca.pem"), certificate.pem()).expect("test setup");
        Self { dir, issuer: Issuer::new(params, key) }
    }

    fn ca_path(&self) -> String {
        self.dir.path().join("ca.pem").display().to_string()
    }

    /// A leaf certificate for `ip`: (certificate file, key file).
    fn leaf(&self, ip: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("test setup");
        let certificate = CertificateParams::new(vec![ip.to_owned()])
            .expect("test setup")
            .signed_by(&key, &self.issuer)
            .expect("test setup");
        let cert_path = self.dir.path().join(format!("{ip}.crt"));
        let key_path = self.dir.path().join(format!("{ip}.key"));
        std::fs::write(&cert_path, certificate.pem()).expect("test setup");
        std::fs::write(&key_path, key.serialize_pem()).expect("test setup");
        (cert_path, key_path)
    }
}

/// Starts a server on `ip` whose name is `ip:<TLS port>`, serving TLS there.
pub(crate) async fn start_on(pki: &Pki, ip: &str) -> TestServer {
    start_on_free_port(pki, ip, &[]).await
}

/// [`start_on`] with extra settings, which win over the ones it sets.
pub(crate) async fn start_on_free_port(pki: &Pki, ip: &str, extra: &[(&str, &str)]) -> TestServer {
    // The name must carry the TLS port, so the port is chosen before the server binds it; in
    // between, another test can take it (tests run in parallel on the same addresses), so a
    // port found taken is given up for another.
    let mut attempts = 0;
    loop {
        let port = std::net::TcpListener::bind((ip, 0))
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let temp = tempfile::tempdir().expect("test setup");
        match try_start_on_port_with(pki, ip, port, temp.path().to_path_buf(), extra).await {
            Ok(mut server) => {
                server.keep(temp);
                return server;
            }
            Err(error) if attempts < 5 => {
                attempts += 1;
                eprintln!("port {port} of {ip} was taken ({error}); trying another");
            }
            Err(error) => panic!("server starts: {error}"),
        }
    }
}

/// Starts (or restarts) the server named `ip:port` on `data_dir`, serving TLS on that port.
pub(crate) async fn start_on_port(pki: &Pki, ip: &str, port: u16, data_dir: PathBuf) -> TestServer {
    start_on_port_with(pki, ip, port, data_dir, &[]).await
}

/// [`start_on_port`] with extra settings, which win over the ones it sets.
pub(crate) async fn start_on_port_with(
    pki: &Pki,
    ip: &str,
    port: u16,
    data_dir: PathBuf,
    extra: &[(&str, &str)],
) -> TestServer {
    try_start_on_port_with(pki, ip, port, data_dir, extra).await.expect("server starts")
}

/// [`start_on_port_with`], with the error when the server cannot bind its listeners.
async fn try_start_on_port_with(
    pki: &Pki,
    ip: &str,
    port: u16,
    data_dir: PathBuf,
    extra: &[(&str, &str)],
) -> Result<TestServer, hearth::server::ServerError> {
    let (cert, key) = pki.leaf(ip);
    let server_name = format!("{ip}:{port}");
    let tls_listen = format!("{ip}:{port}");
    let listen = format!("{ip}:0");
    let (cert, key, ca) = (cert.display().to_string(), key.display().to_string(), pki.ca_path());
    let mut settings: Vec<(&str, &str)> = vec![
        ("HEARTH_SERVER_NAME", &server_name),
        ("HEARTH_LISTEN", &listen),
        ("HEARTH_TLS_LISTEN", &tls_listen),
        ("HEARTH_TLS_CERT", &cert),
        ("HEARTH_TLS_KEY", &key),
        ("HEARTH_FEDERATION_CA", &ca),
        ("HEARTH_FEDERATION_ALLOW_PRIVATE", "true"),
    ];
    settings.extend_from_slice(extra);
    TestServer::try_start_in(data_dir, &settings).await
}

/// A federation client that speaks as `server` (with its signing key), trusting the test CA.
pub(crate) fn client_as(server: &TestServer, pki: &Pki, allow_private: bool) -> Client {
    let config = ClientConfig {
        allow_private,
        extra_ca_file: Some(pki.ca_path().into()),
        ..ClientConfig::default()
    };
    client_with(server, config)
}

/// A federation client that speaks as `server`, with the given settings.
fn client_with(server: &TestServer, config: ClientConfig) -> Client {
    let signing_key = ServerSigningKey::load_or_generate(
        &server.data_dir.join("signing.key"),
        ServerName::parse(&server.server_name).expect("test setup"),
    )
    .expect("test setup");
    Client::new(Arc::new(signing_key), Arc::new(MemoryKeyStore::default()), config)
        .expect("test setup")
}

pub(crate) fn object(value: Value) -> CanonicalJsonObject {
    match CanonicalJsonValue::try_from(value).expect("test setup") {
        CanonicalJsonValue::Object(object) => object,
        other => panic!("not an object: {other:?}"),
    }
}

/// Sends a raw request to `server`'s plain listener with the given `Authorization`.
async fn raw_request(server: &TestServer, path: &str, authorization: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(format!("{}{path}", server.base_url));
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    let response = request.send().await.expect("test setup");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn two_servers_federate_over_tls_with_signed_requests() {
    let pki = Pki::new();
    let a = start_on(&pki, "127.0.0.2").await;
    let b = start_on(&pki, "127.0.0.3").await;
    let a_name = <&ServerName>::try_from(a.server_name.as_str()).unwrap();
    let b_name = <&ServerName>::try_from(b.server_name.as_str()).unwrap();
    let bob = b.register("bob").await;
    let (status, _) = bob
        .client
        .put(
            &format!("/_matrix/client/v3/profile/{}/displayname", bob.user_id),
            json!({"displayname": "Bob"}),
        )
        .await;
    assert_eq!(status, 200);

    // B's TLS listener answers with a certificate of the test CA.
    let tls_address: SocketAddr = b.tls_address.unwrap();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(pki.ca_path()).unwrap()).unwrap();
    let https = reqwest::Client::builder().tls_certs_only([ca]).build().unwrap();
    let version: Value = https
        .get(format!("https://{tls_address}/_matrix/federation/v1/version"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(version["server"]["name"], "Hearth");

    // A's notary fetches B's keys over discovery and TLS, checks them and co-signs them.
    let (status, b_own) = b.client().get("/_matrix/key/v2/server").await;
    assert_eq!(status, 200, "{b_own}");
    let (status, a_own) = a.client().get("/_matrix/key/v2/server").await;
    assert_eq!(status, 200, "{a_own}");
    let (status, answer) = a
        .client()
        .post("/_matrix/key/v2/query", json!({"server_keys": {b.server_name.clone(): {}}}))
        .await;
    assert_eq!(status, 200, "{answer}");
    let server_keys = answer["server_keys"].as_array().unwrap();
    assert_eq!(server_keys.len(), 1, "{answer}");
    let notarised = object(server_keys[0].clone());
    assert_eq!(notarised["verify_keys"], object(b_own.clone())["verify_keys"]);
    // B's own signature still verifies, and A's co-signature verifies with A's published key.
    keys::check_server_keys(b_name, notarised.clone(), None, 0).unwrap();
    let a_keys = keys::check_server_keys(a_name, object(a_own), None, 0).unwrap();
    let b_keys = keys::check_server_keys(b_name, object(b_own), None, 0).unwrap();
    let mut public_keys = ruma::signatures::PublicKeyMap::new();
    for (name, stored) in [(a_name, &a_keys), (b_name, &b_keys)] {
        let set = stored
            .verify_keys
            .iter()
            .map(|(id, key)| (id.clone(), ruma::serde::Base64::new(key.key_bytes().unwrap())))
            .collect();
        public_keys.insert(name.to_string(), set);
    }
    ruma::signatures::verify_json(&public_keys, &notarised).unwrap();
    let signers = notarised["signatures"].as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(signers.len(), 2, "{signers:?}");
    // The GET form answers the same from A's store.
    let (status, answer) =
        a.client().get(&format!("/_matrix/key/v2/query/{}", b.server_name)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["server_keys"][0]["verify_keys"], json!(notarised["verify_keys"]));

    // A request signed with A's key is accepted by B (which fetches A's keys over TLS).
    let as_a = client_as(&a, &pki, true);
    let path = format!("/_matrix/federation/v1/query/profile?user_id={}", bob.user_id);
    let profile = as_a.send_request(b_name, Method::GET, &path, None).await.unwrap();
    assert_eq!(profile["displayname"], "Bob");

    // Unsigned, forged, tampered and misdirected requests are refused.
    let (status, body) = raw_request(&b, &path, None).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{body}");
    let (status, body) = raw_request(&b, &path, Some("X-Matrix nonsense")).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{body}");
    let a_key =
        ServerSigningKey::load_or_generate(&a.data_dir.join("signing.key"), a_name.to_owned())
            .unwrap();
    // Another key under A's name and key id: the signature does not verify.
    let forged_file = a.data_dir.join("forged.key");
    ServerSigningKey::load_or_generate(&forged_file, a_name.to_owned()).unwrap();
    let forged_text = std::fs::read_to_string(&forged_file).unwrap();
    let version = a_key.key_id().trim_start_matches("ed25519:").to_owned();
    let forged_text = forged_text
        .split_whitespace()
        .enumerate()
        .map(|(index, part)| if index == 1 { version.clone() } else { part.to_owned() })
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(&forged_file, forged_text).unwrap();
    let forger = ServerSigningKey::load_or_generate(&forged_file, a_name.to_owned()).unwrap();
    assert_eq!(forger.key_id(), a_key.key_id());
    let forged = request::sign_request(&forger, b_name, "GET", &path, None).unwrap();
    let (status, body) = raw_request(&b, &path, Some(&forged)).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{body}");
    // A's real key, but signed for another URI.
    let other_uri = request::sign_request(
        &a_key,
        b_name,
        "GET",
        "/_matrix/federation/v1/query/profile?user_id=@x:y",
        None,
    )
    .unwrap();
    let (status, body) = raw_request(&b, &path, Some(&other_uri)).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{body}");
    // A's real key, for another destination.
    let misdirected = request::sign_request(
        &a_key,
        <&ServerName>::try_from("127.0.0.9:1").unwrap(),
        "GET",
        &path,
        None,
    )
    .unwrap();
    let (status, body) = raw_request(&b, &path, Some(&misdirected)).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
    // A key id A never published.
    let stranger =
        ServerSigningKey::load_or_generate(&a.data_dir.join("stranger.key"), a_name.to_owned())
            .unwrap();
    let unknown = request::sign_request(&stranger, b_name, "GET", &path, None).unwrap();
    let (status, body) = raw_request(&b, &path, Some(&unknown)).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{body}");
    // The correctly signed header still works over plain HTTP too (behind a proxy).
    let good = request::sign_request(&a_key, b_name, "GET", &path, None).unwrap();
    let (status, body) = raw_request(&b, &path, Some(&good)).await;
    assert_eq!((status, body["displayname"].as_str()), (200, Some("Bob")), "{body}");

    // With private addresses refused, B (on 127.0.0.3) is not contacted at all.
    let careful = client_as(&a, &pki, false);
    let error = careful.send_request(b_name, Method::GET, &path, None).await.unwrap_err();
    assert!(matches!(error, Error::PrivateAddress { .. }), "{error:?}");
    // An answer larger than the configured cap is dropped.
    let small = client_with(
        &a,
        ClientConfig {
            allow_private: true,
            extra_ca_file: Some(pki.ca_path().into()),
            max_response_bytes: 64,
            ..ClientConfig::default()
        },
    );
    let error =
        small.send_request(b_name, Method::GET, "/_matrix/key/v2/server", None).await.unwrap_err();
    assert!(matches!(error, Error::ResponseTooLarge { limit_bytes: 64, .. }), "{error:?}");
    // Without the test CA, B's certificate is not trusted.
    let untrusting =
        client_with(&a, ClientConfig { allow_private: true, ..ClientConfig::default() });
    let error = untrusting.send_request(b_name, Method::GET, &path, None).await.unwrap_err();
    assert!(matches!(error, Error::Http { .. }), "{error:?}");

    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn a_server_refusing_private_addresses_does_not_fetch_their_keys() {
    let pki = Pki::new();
    let b = start_on(&pki, "127.0.0.3").await;
    let a = TestServer::start_with(&[("HEARTH_FEDERATION_CA", &pki.ca_path())]).await;
    let (status, answer) = a
        .client()
        .post("/_matrix/key/v2/query", json!({"server_keys": {b.server_name.clone(): {}}}))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["server_keys"], json!([]), "{answer}");
    b.stop().await;
    a.stop().await;
}
