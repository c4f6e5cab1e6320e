//! `TestServer`: boots the real server in-process on a random loopback port with a fresh data
//! directory, and a small HTTP client for tests (`Client`).

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use hearth::{config::Config, server::Server};
use serde_json::{Value, json};
use tokio::{sync::oneshot, task::JoinHandle};

/// A running server.
pub(crate) struct TestServer {
    pub(crate) base_url: String,
    pub(crate) server_name: String,
    pub(crate) data_dir: PathBuf,
    /// The TLS listener's address, when `HEARTH_TLS_LISTEN` was set.
    pub(crate) tls_address: Option<SocketAddr>,
    /// The room core, for tests that stand in for a remote server's transport.
    pub(crate) rooms: hearth::rooms::Rooms,
    _temp: Option<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// The port of the server name (`ip:port`).
    pub(crate) fn port(&self) -> u16 {
        self.server_name.rsplit(':').next().and_then(|port| port.parse().ok()).expect("a port")
    }

    /// Starts a server with open registration on a fresh data directory.
    pub(crate) async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts a server with extra `HEARTH_*` settings (as environment-style pairs).
    pub(crate) async fn start_with(settings: &[(&str, &str)]) -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let data_dir = temp.path().to_path_buf();
        let mut server = Self::start_in(data_dir, settings).await;
        server._temp = Some(temp);
        server
    }

    /// Starts a server on an existing data directory (for restart tests).
    pub(crate) async fn start_in(data_dir: PathBuf, settings: &[(&str, &str)]) -> Self {
        Self::try_start_in(data_dir, settings).await.expect("server starts")
    }

    /// [`TestServer::start_in`], with the error when the server cannot bind its listeners.
    pub(crate) async fn try_start_in(
        data_dir: PathBuf,
        settings: &[(&str, &str)],
    ) -> Result<Self, hearth::server::ServerError> {
        let mut environment: BTreeMap<String, String> = BTreeMap::new();
        environment.insert("HEARTH_LISTEN".into(), "127.0.0.1:0".into());
        environment.insert("HEARTH_DATA_DIR".into(), data_dir.display().to_string());
        environment.insert("HEARTH_REGISTRATION".into(), "open".into());
        environment.insert("HEARTH_LOG".into(), "warn".into());
        for (key, value) in settings {
            environment.insert((*key).to_owned(), (*value).to_owned());
        }
        let config = Config::from_sources("", &environment).expect("test config");
        let server_name = config.server_name.to_string();
        let server = Server::bind(config).await?;
        let address = server.local_addr().expect("bound address");
        let tls_address = server.tls_local_addr().map(|address| address.expect("TLS address"));
        let rooms = server.rooms().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve(async {
                    let _ = stopped.await;
                })
                .await
                .expect("server runs");
        });
        Ok(Self {
            base_url: format!("http://{address}"),
            server_name,
            data_dir,
            tls_address,
            rooms,
            _temp: None,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Makes the server own `temp` (its data directory), removed when the server is dropped.
    pub(crate) fn keep(&mut self, temp: tempfile::TempDir) {
        self._temp = Some(temp);
    }

    /// Stops the server and waits until it has released the database. Returns the temp dir
    /// owner so the data survives for a restart.
    pub(crate) async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("server stops in time")
                .expect("server task");
        }
        self._temp.take()
    }

    /// An unauthenticated client.
    pub(crate) fn client(&self) -> Client {
        Client { base_url: self.base_url.clone(), token: None, http: reqwest::Client::new() }
    }

    /// Registers a user (open registration, dummy stage) and returns a logged-in client.
    pub(crate) async fn register(&self, localpart: &str) -> User {
        let client = self.client();
        let (status, body) = client
            .post("/_matrix/client/v3/register", json!({"username": localpart, "password": "secret-password", "auth": {"type": "m.login.dummy"}}))
            .await;
        assert_eq!(status, 200, "register {localpart}: {body}");
        User {
            user_id: body["user_id"].as_str().expect("user_id").to_owned(),
            device_id: body["device_id"].as_str().expect("device_id").to_owned(),
            client: client.with_token(body["access_token"].as_str().expect("token")),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A registered user.
pub(crate) struct User {
    pub(crate) user_id: String,
    pub(crate) device_id: String,
    pub(crate) client: Client,
}

/// A tiny JSON-over-HTTP client.
#[derive(Clone)]
pub(crate) struct Client {
    pub(crate) base_url: String,
    pub(crate) token: Option<String>,
    pub(crate) http: reqwest::Client,
}

impl Client {
    /// The same client with an access token.
    pub(crate) fn with_token(&self, token: &str) -> Self {
        Self { token: Some(token.to_owned()), ..self.clone() }
    }

    /// Sends a request with a raw body and returns status and JSON (or `Null`).
    pub(crate) async fn request_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base_url));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body);
        }
        let response = tokio::time::timeout(Duration::from_secs(60), request.send())
            .await
            .expect("request finishes in time")
            .expect("request is sent");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.expect("body");
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// `GET path`.
    pub(crate) async fn get(&self, path: &str) -> (u16, Value) {
        self.request_raw(reqwest::Method::GET, path, None).await
    }

    /// `POST path` with JSON.
    pub(crate) async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request_raw(reqwest::Method::POST, path, Some(body.to_string().into_bytes())).await
    }

    /// `PUT path` with JSON.
    pub(crate) async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.request_raw(reqwest::Method::PUT, path, Some(body.to_string().into_bytes())).await
    }

    /// `DELETE path` with JSON.
    pub(crate) async fn delete(&self, path: &str, body: Value) -> (u16, Value) {
        self.request_raw(reqwest::Method::DELETE, path, Some(body.to_string().into_bytes())).await
    }

    /// Sends a request with extra headers and returns the whole response (headers and raw,
    /// undecoded body), for tests of CORS, compression and body limits.
    pub(crate) async fn request_full(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> reqwest::Response {
        // matrix-sdk turns on reqwest's `gzip` feature, which would decode answers and drop
        // their `content-encoding`; this client shows the bytes as sent.
        let raw = reqwest::Client::builder().no_gzip().build().expect("plain HTTP client");
        let mut request = raw.request(method, format!("{}{path}", self.base_url));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        tokio::time::timeout(Duration::from_secs(60), request.send())
            .await
            .expect("request finishes in time")
            .expect("request is sent")
    }

    /// The access token, which must be set.
    pub(crate) fn access_token(&self) -> &str {
        self.token.as_deref().expect("client has a token")
    }
}

/// Asserts that an answer is a Matrix error with this status and errcode.
#[track_caller]
pub(crate) fn assert_error(answer: &(u16, Value), status: u16, errcode: &str) {
    assert_eq!(
        (answer.0, answer.1["errcode"].as_str()),
        (status, Some(errcode)),
        "answer: {}",
        answer.1
    );
}

/// Asserts a 200 answer and returns its body.
#[track_caller]
pub(crate) fn assert_ok(answer: (u16, Value)) -> Value {
    assert_eq!(answer.0, 200, "answer: {}", answer.1);
    answer.1
}

/// Sends the server's log lines at `filter` (e.g. `hearth=debug`) to the test output; for
/// debugging a test, as the in-process server does not install a subscriber itself.
#[allow(dead_code)]
pub(crate) fn log_to_test_output(filter: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}

/// The events of a room's timeline in a sync answer (`join` section), or none.
pub(crate) fn timeline<'a>(sync: &'a Value, room_id: &str) -> &'a [Value] {
    sync["rooms"]["join"][room_id]["timeline"]["events"].as_array().map_or(&[], Vec::as_slice)
}

/// Whether a sync answer's joined timeline of the room holds the event.
pub(crate) fn timeline_has(sync: &Value, room_id: &str, event_id: &str) -> bool {
    timeline(sync, room_id).iter().any(|event| event["event_id"] == event_id)
}

/// The bodies of the `m.room.message` events of a list of events, in order.
pub(crate) fn bodies(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|event| event["type"] == "m.room.message")
        .filter_map(|event| event["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

/// `/rooms/{roomId}/state/{eventType}[/{stateKey}]`: no trailing slash for the empty state key.
pub(crate) fn state_path(room_id: &str, kind: &str, state_key: &str) -> String {
    let mut path = format!("/_matrix/client/v3/rooms/{}/state/{kind}", enc(room_id));
    if !state_key.is_empty() {
        path.push('/');
        path.push_str(&enc(state_key));
    }
    path
}

/// Percent-encodes a path segment (ids contain `!`, `#`, `:`, `$`).
pub(crate) fn enc(segment: &str) -> String {
    let mut out = String::new();
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

impl User {
    /// The same account and device on `server` (a restarted server: new address, same token).
    pub(crate) fn on(&self, server: &TestServer) -> User {
        User {
            user_id: self.user_id.clone(),
            device_id: self.device_id.clone(),
            client: server.client().with_token(self.client.access_token()),
        }
    }

    /// Creates a room and returns its id.
    pub(crate) async fn create_room(&self, body: Value) -> String {
        let (status, answer) = self.client.post("/_matrix/client/v3/createRoom", body).await;
        assert_eq!(status, 200, "createRoom: {answer}");
        answer["room_id"].as_str().expect("room_id").to_owned()
    }

    /// Sends a text message and returns its event id.
    pub(crate) async fn send_text(&self, room_id: &str, body: &str) -> String {
        let txn = format!("t{}", rand_suffix());
        let (status, answer) = self
            .client
            .put(
                &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room_id)),
                json!({"msgtype": "m.text", "body": body}),
            )
            .await;
        assert_eq!(status, 200, "send: {answer}");
        answer["event_id"].as_str().expect("event_id").to_owned()
    }

    /// Sends a message event with an explicit transaction id; returns status and answer.
    pub(crate) async fn send_txn(&self, room_id: &str, txn: &str, content: Value) -> (u16, Value) {
        self.client
            .put(
                &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room_id)),
                content,
            )
            .await
    }

    /// Sends a state event; returns status and answer.
    pub(crate) async fn put_state(
        &self,
        room_id: &str,
        kind: &str,
        state_key: &str,
        content: Value,
    ) -> (u16, Value) {
        self.client.put(&state_path(room_id, kind, state_key), content).await
    }

    /// Invites a user.
    pub(crate) async fn invite(&self, room_id: &str, user_id: &str) {
        let (status, answer) = self
            .client
            .post(
                &format!("/_matrix/client/v3/rooms/{}/invite", enc(room_id)),
                json!({"user_id": user_id}),
            )
            .await;
        assert_eq!(status, 200, "invite: {answer}");
    }

    /// `POST /rooms/{roomId}/{action}` (`leave`, `kick`, `ban`, ...) with a body.
    pub(crate) async fn room_post(&self, room_id: &str, action: &str, body: Value) -> (u16, Value) {
        self.client.post(&format!("/_matrix/client/v3/rooms/{}/{action}", enc(room_id)), body).await
    }

    /// `GET /rooms/{roomId}/messages?{query}`.
    pub(crate) async fn messages(&self, room_id: &str, query: &str) -> Value {
        let (status, answer) = self
            .client
            .get(&format!("/_matrix/client/v3/rooms/{}/messages?{query}", enc(room_id)))
            .await;
        assert_eq!(status, 200, "messages: {answer}");
        answer
    }

    /// One `/sync` with extra query parameters (`filter=...&full_state=true`), already encoded.
    pub(crate) async fn sync_query(&self, query: &str) -> Value {
        let (status, answer) = self.client.get(&format!("/_matrix/client/v3/sync?{query}")).await;
        assert_eq!(status, 200, "sync: {answer}");
        answer
    }

    /// Joins a room.
    pub(crate) async fn join(&self, room_id: &str) {
        let (status, answer) =
            self.client.post(&format!("/_matrix/client/v3/join/{}", enc(room_id)), json!({})).await;
        assert_eq!(status, 200, "join: {answer}");
    }

    /// One `/sync`.
    pub(crate) async fn sync(&self, since: Option<&str>, timeout_ms: u64) -> Value {
        let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}");
        if let Some(since) = since {
            path.push_str(&format!("&since={since}"));
        }
        let (status, answer) = self.client.get(&path).await;
        assert_eq!(status, 200, "sync: {answer}");
        answer
    }

    /// Syncs until `predicate` holds on a response (or panics after 20 s).
    pub(crate) async fn sync_until(
        &self,
        mut since: Option<String>,
        predicate: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let answer = self.sync(since.as_deref(), 5_000).await;
            if predicate(&answer) {
                return answer;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not met in time; last sync: {answer}"
            );
            since = answer["next_batch"].as_str().map(str::to_owned);
        }
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}
