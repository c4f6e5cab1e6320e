//! The test context: an HTTP client bound to the server under test, fresh users, and the
//! small request/assertion vocabulary every test module uses.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use hmac::{Hmac, Mac};
use rand::Rng;
use reqwest::Method;
use serde_json::{Value, json};

/// How the suite gets new accounts on the server under test.
#[derive(Clone, Debug)]
pub enum Registration {
    /// `POST /register` with the `m.login.dummy` stage (open registration).
    Open,
    /// Synapse's shared-secret admin API, `/_synapse/admin/v1/register`.
    SharedSecret(String),
}

/// What every test gets: where the server is, how to make users, and a client.
#[derive(Clone)]
pub struct Ctx {
    inner: Arc<CtxInner>,
}

struct CtxInner {
    base_url: String,
    http: reqwest::Client,
    registration: Registration,
    /// Makes user names unique within one run; the run prefix makes them unique across runs.
    counter: AtomicU64,
    run_prefix: String,
}

/// A response: status and body, the body parsed as JSON when it is JSON (else `Null`).
#[derive(Clone, Debug)]
pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
    pub what: String,
}

impl Resp {
    /// Fails unless the status is 200, returning the body.
    pub fn ok(self) -> Result<Value> {
        if self.status != 200 {
            bail!("{}: expected 200, got {} {}", self.what, self.status, short(&self.body));
        }
        Ok(self.body)
    }

    /// Fails unless the status and `errcode` are the given ones.
    pub fn err(self, status: u16, errcode: &str) -> Result<Value> {
        let got = self.body.get("errcode").and_then(Value::as_str).unwrap_or("<none>");
        if self.status != status || got != errcode {
            bail!(
                "{}: expected {status} {errcode}, got {} {}",
                self.what,
                self.status,
                short(&self.body)
            );
        }
        Ok(self.body)
    }

    /// Fails unless the status is the given one and the body carries one of the `errcodes`.
    pub fn err_any(self, status: u16, errcodes: &[&str]) -> Result<Value> {
        let got = self.body.get("errcode").and_then(Value::as_str).unwrap_or("<none>");
        if self.status != status || !errcodes.contains(&got) {
            bail!(
                "{}: expected {status} with one of {errcodes:?}, got {} {}",
                self.what,
                self.status,
                short(&self.body)
            );
        }
        Ok(self.body)
    }

    /// Fails unless the status is the given one.
    pub fn status(self, status: u16) -> Result<Value> {
        if self.status != status {
            bail!("{}: expected {status}, got {} {}", self.what, self.status, short(&self.body));
        }
        Ok(self.body)
    }
}

/// A JSON value shortened for error messages.
pub fn short(value: &Value) -> String {
    let mut text = value.to_string();
    if text.len() > 300 {
        let mut cut = 300;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// Percent-encodes one path segment or query value (everything but RFC 3986 unreserved).
pub fn enc(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A request body: JSON, raw bytes (for malformed input), or none.
pub enum Body {
    None,
    Json(Value),
    Raw(Vec<u8>),
}

impl Ctx {
    pub fn new(base_url: &str, registration: Registration) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?;
        let run_prefix: String = {
            let mut rng = rand::thread_rng();
            (0..6).map(|_| char::from(b'a' + rng.gen_range(0..26u8))).collect()
        };
        Ok(Self {
            inner: Arc::new(CtxInner {
                base_url: base_url.trim_end_matches('/').to_owned(),
                http,
                registration,
                counter: AtomicU64::new(0),
                run_prefix,
            }),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.inner.base_url
    }

    /// A name no other test of any run uses, for users, aliases and transaction ids.
    pub fn unique(&self, stem: &str) -> String {
        let n = self.inner.counter.fetch_add(1, Ordering::Relaxed);
        format!("{stem}{}{n}", self.inner.run_prefix)
    }

    /// Sends a request; `token` is the access token, if any.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Body,
    ) -> Result<Resp> {
        let url = format!("{}{path}", self.inner.base_url);
        let what = format!("{method} {path}");
        let mut request = self.inner.http.request(method, &url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request = match body {
            Body::None => request,
            Body::Json(value) => request.json(&value),
            Body::Raw(bytes) => request.header("content-type", "application/json").body(bytes),
        };
        let response = request.send().await.with_context(|| format!("{what}: request failed"))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.with_context(|| format!("{what}: reading body"))?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Resp { status, body, headers, what })
    }

    /// An unauthenticated GET.
    pub async fn get(&self, path: &str) -> Result<Resp> {
        self.request(Method::GET, path, None, Body::None).await
    }

    /// An unauthenticated POST with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> Result<Resp> {
        self.request(Method::POST, path, None, Body::Json(body)).await
    }

    /// Registers a fresh user whose localpart starts with `stem`.
    pub async fn user_named(&self, stem: &str) -> Result<User> {
        let localpart = self.unique(stem);
        let password = format!("pw-{localpart}-secret");
        let body = match &self.inner.registration {
            Registration::Open => self.register_open(&localpart, &password).await?,
            Registration::SharedSecret(secret) => {
                self.register_shared_secret(secret, &localpart, &password).await?
            }
        };
        let field = |name: &str| -> Result<String> {
            body.get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("registration answer lacks {name}: {}", short(&body)))
        };
        Ok(User {
            ctx: self.clone(),
            user_id: field("user_id")?,
            access_token: field("access_token")?,
            device_id: field("device_id")?,
            localpart,
            password,
        })
    }

    /// Registers a fresh user.
    pub async fn user(&self) -> Result<User> {
        self.user_named("u").await
    }

    /// Runs the user-interactive auth round trip of open registration with `m.login.dummy`.
    pub async fn register_open(&self, localpart: &str, password: &str) -> Result<Value> {
        let path = "/_matrix/client/v3/register";
        let first = self.post(path, json!({"username": localpart, "password": password})).await?;
        let session = match first.status {
            200 => return Ok(first.body),
            401 => first.body.get("session").and_then(Value::as_str).map(str::to_owned),
            _ => bail!("register {localpart}: {} {}", first.status, short(&first.body)),
        };
        let mut auth = json!({"type": "m.login.dummy"});
        if let Some(session) = session {
            auth["session"] = json!(session);
        }
        self.post(path, json!({"username": localpart, "password": password, "auth": auth}))
            .await?
            .ok()
    }

    async fn register_shared_secret(
        &self,
        secret: &str,
        localpart: &str,
        password: &str,
    ) -> Result<Value> {
        let path = "/_synapse/admin/v1/register";
        let nonce_body = self.get(path).await?.ok()?;
        let nonce = nonce_body
            .get("nonce")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("no nonce in {}", short(&nonce_body)))?;
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes())
            .map_err(|error| anyhow!("HMAC key: {error}"))?;
        for (index, part) in [nonce, localpart, password, "notadmin"].iter().enumerate() {
            if index > 0 {
                mac.update(b"\0");
            }
            mac.update(part.as_bytes());
        }
        let digest: String =
            mac.finalize().into_bytes().iter().map(|byte| format!("{byte:02x}")).collect();
        self.post(
            path,
            json!({
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": false,
                "mac": digest,
            }),
        )
        .await?
        .ok()
    }

    /// Logs in with a password, returning the whole answer.
    pub async fn login(&self, user_id: &str, password: &str) -> Result<Value> {
        self.post(
            "/_matrix/client/v3/login",
            json!({
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": user_id},
                "password": password,
            }),
        )
        .await?
        .ok()
    }
}

/// A registered user with an access token.
#[derive(Clone)]
pub struct User {
    pub ctx: Ctx,
    pub user_id: String,
    pub access_token: String,
    pub device_id: String,
    pub localpart: String,
    pub password: String,
}

/// Path of a client-server endpoint under `/_matrix/client/v3`.
pub fn v3(rest: &str) -> String {
    format!("/_matrix/client/v3{rest}")
}

/// Path of a room endpoint: `/_matrix/client/v3/rooms/{room_id}{rest}`.
pub fn room_path(room_id: &str, rest: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}{rest}", enc(room_id))
}

impl User {
    pub async fn request(&self, method: Method, path: &str, body: Body) -> Result<Resp> {
        self.ctx.request(method, path, Some(&self.access_token), body).await
    }

    pub async fn get(&self, path: &str) -> Result<Resp> {
        self.request(Method::GET, path, Body::None).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Result<Resp> {
        self.request(Method::PUT, path, Body::Json(body)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Resp> {
        self.request(Method::POST, path, Body::Json(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Resp> {
        self.request(Method::DELETE, path, Body::None).await
    }

    /// A user with the same account but its own fresh device (a second login).
    pub async fn second_device(&self) -> Result<User> {
        let body = self.ctx.login(&self.user_id, &self.password).await?;
        let mut other = self.clone();
        other.access_token = str_field(&body, "access_token")?.to_owned();
        other.device_id = str_field(&body, "device_id")?.to_owned();
        Ok(other)
    }

    /// `POST /createRoom`, returning the room id.
    pub async fn create_room(&self, body: Value) -> Result<String> {
        let answer = self.post(&v3("/createRoom"), body).await?.ok()?;
        Ok(str_field(&answer, "room_id")?.to_owned())
    }

    /// A private room with default settings.
    pub async fn create_private_room(&self) -> Result<String> {
        self.create_room(json!({"preset": "private_chat"})).await
    }

    /// A public room anyone on the server may join.
    pub async fn create_public_room(&self) -> Result<String> {
        self.create_room(json!({"preset": "public_chat"})).await
    }

    /// Joins by room id or alias, returning the room id the server answered.
    pub async fn join(&self, room_id_or_alias: &str) -> Result<String> {
        let answer =
            self.post(&v3(&format!("/join/{}", enc(room_id_or_alias))), json!({})).await?.ok()?;
        Ok(str_field(&answer, "room_id")?.to_owned())
    }

    pub async fn invite(&self, room_id: &str, user_id: &str) -> Result<()> {
        self.post(&room_path(room_id, "/invite"), json!({"user_id": user_id})).await?.ok()?;
        Ok(())
    }

    pub async fn leave(&self, room_id: &str) -> Result<()> {
        self.post(&room_path(room_id, "/leave"), json!({})).await?.ok()?;
        Ok(())
    }

    /// Sends an event with a fresh transaction id, returning the event id.
    pub async fn send(&self, room_id: &str, event_type: &str, content: Value) -> Result<String> {
        let txn = self.ctx.unique("txn");
        let answer = self
            .put(&room_path(room_id, &format!("/send/{}/{}", enc(event_type), enc(&txn))), content)
            .await?
            .ok()?;
        Ok(str_field(&answer, "event_id")?.to_owned())
    }

    /// Sends an `m.text` message, returning the event id.
    pub async fn send_text(&self, room_id: &str, body: &str) -> Result<String> {
        self.send(room_id, "m.room.message", json!({"msgtype": "m.text", "body": body})).await
    }

    /// Sets a state event, returning the event id.
    pub async fn put_state(
        &self,
        room_id: &str,
        event_type: &str,
        state_key: &str,
        content: Value,
    ) -> Result<String> {
        let answer = self.put(&state_path(room_id, event_type, state_key), content).await?.ok()?;
        Ok(str_field(&answer, "event_id")?.to_owned())
    }

    /// Reads a state event's content.
    pub async fn get_state(
        &self,
        room_id: &str,
        event_type: &str,
        state_key: &str,
    ) -> Result<Value> {
        self.get(&state_path(room_id, event_type, state_key)).await?.ok()
    }

    /// One `/sync` call with the given query string (without `?`).
    pub async fn sync(&self, query: &str) -> Result<Value> {
        let path = if query.is_empty() { v3("/sync") } else { format!("{}?{query}", v3("/sync")) };
        self.get(&path).await?.ok()
    }

    /// An initial sync with no timeout, returning the body.
    pub async fn initial_sync(&self) -> Result<Value> {
        self.sync("timeout=0").await
    }

    /// Syncs (from an initial sync, then incrementally) until `found` picks something out of a
    /// sync answer, or the deadline passes. `extra` is added to each query (e.g. a filter).
    pub async fn sync_until<T>(
        &self,
        extra: &str,
        what: &str,
        mut found: impl FnMut(&Value) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut since: Option<String> = None;
        loop {
            let mut query = String::new();
            if let Some(since) = &since {
                query.push_str(&format!("since={}&timeout=2000", enc(since)));
            } else {
                query.push_str("timeout=0");
            }
            if !extra.is_empty() {
                query.push('&');
                query.push_str(extra);
            }
            let body = self.sync(&query).await?;
            if let Some(value) = found(&body) {
                return Ok(value);
            }
            ensure!(Instant::now() < deadline, "timed out waiting for {what} in /sync");
            since = Some(str_field(&body, "next_batch")?.to_owned());
        }
    }

    /// Waits until this user's sync shows an event of the room's timeline that `matches`.
    pub async fn sync_until_timeline_event(
        &self,
        room_id: &str,
        what: &str,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        self.sync_until("", what, |body| {
            timeline(body, room_id).into_iter().find(|event| matches(event)).cloned()
        })
        .await
    }

    /// Waits until this user's sync shows the event with this id in the room's timeline.
    pub async fn sync_until_event_id(&self, room_id: &str, event_id: &str) -> Result<Value> {
        self.sync_until_timeline_event(room_id, event_id, |event| {
            event.get("event_id").and_then(Value::as_str) == Some(event_id)
        })
        .await
    }
}

/// `/rooms/{room_id}/state/{event_type}/{state_key}`.
pub fn state_path(room_id: &str, event_type: &str, state_key: &str) -> String {
    room_path(room_id, &format!("/state/{}/{}", enc(event_type), enc(state_key)))
}

/// A string field of a JSON object, or an error naming it.
pub fn str_field<'a>(value: &'a Value, name: &str) -> Result<&'a str> {
    value
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("missing string field {name:?} in {}", short(value)))
}

/// An array at a JSON pointer, or an empty slice.
pub fn array<'a>(value: &'a Value, pointer: &str) -> &'a [Value] {
    value.pointer(pointer).and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
}

/// Escapes a room id for use in a JSON pointer (`~` and `/` are special there).
pub fn pointer_key(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The timeline events of a joined room in a sync answer.
pub fn timeline<'a>(sync: &'a Value, room_id: &str) -> Vec<&'a Value> {
    array(sync, &format!("/rooms/join/{}/timeline/events", pointer_key(room_id))).iter().collect()
}

/// The joined room section of a sync answer, if present.
pub fn joined_room<'a>(sync: &'a Value, room_id: &str) -> Option<&'a Value> {
    sync.pointer(&format!("/rooms/join/{}", pointer_key(room_id)))
}

/// Whether an event (in sync or `/messages` form) has this type.
pub fn is_type(event: &Value, event_type: &str) -> bool {
    event.get("type").and_then(Value::as_str) == Some(event_type)
}

/// The `body` of each `m.room.message` in a list of events.
pub fn bodies(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|event| is_type(event, "m.room.message"))
        .filter_map(|event| {
            event.pointer("/content/body").and_then(Value::as_str).map(str::to_owned)
        })
        .collect()
}

/// Polls `check` until it returns `Some`, for behaviour the server applies in the background
/// (user directory indexing, for instance), with a short pause between rounds and a deadline.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
