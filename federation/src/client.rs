//! The federation [`Client`]: outbound requests signed with X-Matrix over reqwest + rustls, after
//! server discovery; remote key fetching and caching; the notary; and the check of inbound
//! X-Matrix requests (which needs the origin's keys, hence lives here).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use hickory_resolver::{TokioResolver, proto::rr::RData};
use reqwest::{
    Method,
    dns::{Addrs, Name, Resolve, Resolving},
    header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HOST},
};
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedServerName, ServerName, signatures::PublicKeySet,
};
use serde_json::Value;
use tracing::Instrument;

use crate::{
    Error, ServerSigningKey,
    discovery::{self, Destination},
    keys::{self, KeyStore, OldVerifyKey, StoredServerKeys},
    request::{self, XMatrix},
};

/// The limits and trust settings of the client.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Contact peers that resolve to loopback, private or link-local addresses (tests only).
    pub allow_private: bool,
    /// A PEM file of extra CA certificates trusted besides the system roots.
    pub extra_ca_file: Option<PathBuf>,
    /// How long connecting (TCP and TLS) may take.
    pub connect_timeout: Duration,
    /// How long a whole request may take.
    pub request_timeout: Duration,
    /// The largest response body read from a peer.
    pub max_response_bytes: usize,
    /// How many `.well-known` answers are cached at most.
    pub well_known_cache_max: usize,
    /// How long after a fetch a peer's keys are not fetched again for an unknown key id.
    pub key_refetch_interval: Duration,
    /// How many servers one notary query may name.
    pub key_query_servers_max: usize,
    /// How long our own key response says it is valid.
    pub key_valid_for: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            allow_private: false,
            extra_ca_file: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            max_response_bytes: 20 * 1024 * 1024,
            well_known_cache_max: 10_000,
            key_refetch_interval: Duration::from_secs(60),
            key_query_servers_max: 100,
            key_valid_for: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// The federation client: cheap to clone, shared by everything that talks to other servers.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    signing_key: Arc<ServerSigningKey>,
    old_verify_keys: Vec<OldVerifyKey>,
    key_store: Arc<dyn KeyStore>,
    config: ClientConfig,
    dns: Option<Arc<TokioResolver>>,
    /// SRV results: the TLS name reqwest asks to resolve -> the host to connect to instead.
    connect_overrides: Arc<Mutex<HashMap<String, String>>>,
    well_known: Mutex<HashMap<OwnedServerName, (Option<String>, Instant)>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Client")
            .field("server_name", self.inner.signing_key.server_name())
            .finish_non_exhaustive()
    }
}

/// Resolves names for reqwest through DNS (or the SRV override) and refuses non-public
/// addresses unless they are allowed.
struct CheckedResolver {
    dns: Option<Arc<TokioResolver>>,
    allow_private: bool,
    connect_overrides: Arc<Mutex<HashMap<String, String>>>,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = {
            let overrides =
                self.connect_overrides.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            overrides.get(name.as_str()).cloned().unwrap_or_else(|| name.as_str().to_owned())
        };
        let dns = self.dns.clone();
        let allow_private = self.allow_private;
        Box::pin(async move {
            let addresses = lookup_addresses(dns.as_deref(), &host).await?;
            let addresses: Vec<SocketAddr> = addresses
                .into_iter()
                .filter(|address| allow_private || !discovery::is_non_public(*address))
                .map(|address| SocketAddr::new(address, 0))
                .collect();
            if addresses.is_empty() {
                return Err(format!("{host} resolves to no permitted address").into());
            }
            Ok(Box::new(addresses.into_iter()) as Addrs)
        })
    }
}

async fn lookup_addresses(
    dns: Option<&TokioResolver>,
    host: &str,
) -> Result<Vec<IpAddr>, Box<dyn std::error::Error + Send + Sync>> {
    if let Ok(address) = host.parse::<IpAddr>() {
        return Ok(vec![address]);
    }
    let dns = dns.ok_or("no DNS resolver is configured")?;
    let lookup = dns.lookup_ip(host).await?;
    Ok(lookup.iter().collect())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Client {
    /// Builds the client: TLS roots (system plus `extra_ca_file`), timeouts, the checking
    /// resolver.
    pub fn new(
        signing_key: Arc<ServerSigningKey>,
        key_store: Arc<dyn KeyStore>,
        config: ClientConfig,
    ) -> Result<Self, Error> {
        let dns = match TokioResolver::builder_tokio().and_then(|builder| builder.build()) {
            Ok(resolver) => Some(Arc::new(resolver)),
            Err(error) => {
                tracing::warn!(%error, "no system DNS configuration; only IP literals resolve");
                None
            }
        };
        let connect_overrides = Arc::new(Mutex::new(HashMap::new()));
        let resolver = CheckedResolver {
            dns: dns.clone(),
            allow_private: config.allow_private,
            connect_overrides: connect_overrides.clone(),
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .no_proxy()
            .https_only(true)
            .redirect(reqwest::redirect::Policy::limited(5))
            .user_agent(concat!("Hearth/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(resolver));
        if let Some(path) = &config.extra_ca_file {
            let pem = std::fs::read(path)
                .map_err(|error| Error::Setup(format!("reading {}: {error}", path.display())))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|error| Error::Setup(format!("CA file {}: {error}", path.display())))?;
            if certificates.is_empty() {
                return Err(Error::Setup(format!(
                    "CA file {} holds no certificate",
                    path.display()
                )));
            }
            builder = builder.tls_certs_merge(certificates);
        }
        let http = builder.build().map_err(|error| Error::Setup(error.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                signing_key,
                old_verify_keys: Vec::new(),
                key_store,
                config,
                dns,
                connect_overrides,
                well_known: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// This server's name.
    pub fn server_name(&self) -> &ServerName {
        self.inner.signing_key.server_name()
    }

    /// Sends a request signed with X-Matrix to `destination` and returns its JSON answer.
    /// `path_and_query` is the request target as signed and sent, already percent-encoded
    /// (`/_matrix/federation/v1/state/%21room%3Aexample.org?event_id=...`).
    /// An answer other than 2xx is [`Error::Status`].
    pub async fn send_request(
        &self,
        destination: &ServerName,
        method: Method,
        path_and_query: &str,
        body: Option<Value>,
    ) -> Result<Value, Error> {
        let span = tracing::info_span!("federation_request", %destination, %method, path = %path_and_query);
        async {
            let content = body
                .map(|body| {
                    CanonicalJsonValue::try_from(body).map_err(|error| Error::InvalidResponse {
                        server_name: destination.to_owned(),
                        reason: format!("request body is not canonical JSON: {error}"),
                    })
                })
                .transpose()?;
            let authorization = request::sign_request(
                &self.inner.signing_key,
                destination,
                method.as_str(),
                path_and_query,
                content.as_ref(),
            )?;
            self.request(destination, method, path_and_query, content, Some(authorization)).await
        }
        .instrument(span)
        .await
    }

    async fn request(
        &self,
        destination: &ServerName,
        method: Method,
        path_and_query: &str,
        content: Option<CanonicalJsonValue>,
        authorization: Option<String>,
    ) -> Result<Value, Error> {
        let target = self.resolve_destination(destination).await?;
        let url = format!(
            "https://{}:{}{path_and_query}",
            discovery::url_host(&target.tls_name),
            target.port
        );
        let mut builder = self.inner.http.request(method, url).header(HOST, &target.host_header);
        if let Some(authorization) = authorization {
            builder = builder.header(AUTHORIZATION, authorization);
        }
        if let Some(content) = content {
            let bytes = serde_json::to_vec(&content).map_err(|error| Error::InvalidResponse {
                server_name: destination.to_owned(),
                reason: error.to_string(),
            })?;
            builder = builder.header(CONTENT_TYPE, "application/json").body(bytes);
        }
        let response = builder
            .send()
            .await
            .map_err(|source| Error::Http { server_name: destination.to_owned(), source })?;
        let status = response.status();
        let bytes = self.read_limited(destination, response).await?;
        if !status.is_success() {
            let body = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned();
            tracing::debug!(status = status.as_u16(), "peer answered with an error");
            return Err(Error::Status {
                server_name: destination.to_owned(),
                status: status.as_u16(),
                body,
            });
        }
        serde_json::from_slice(&bytes).map_err(|error| Error::InvalidResponse {
            server_name: destination.to_owned(),
            reason: format!("not JSON: {error}"),
        })
    }

    async fn read_limited(
        &self,
        server_name: &ServerName,
        mut response: reqwest::Response,
    ) -> Result<Vec<u8>, Error> {
        let limit_bytes = self.inner.config.max_response_bytes;
        let too_large =
            || Error::ResponseTooLarge { server_name: server_name.to_owned(), limit_bytes };
        if response.content_length().is_some_and(|length| length > limit_bytes as u64) {
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|source| Error::Http { server_name: server_name.to_owned(), source })?
        {
            if bytes.len() + chunk.len() > limit_bytes {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    /// Server discovery for `server_name`, as the spec orders it. Refuses IP literals in
    /// non-public ranges unless private addresses are allowed (names are checked when they
    /// resolve).
    pub async fn resolve_destination(
        &self,
        server_name: &ServerName,
    ) -> Result<Destination, Error> {
        let destination = match discovery::direct_destination(server_name) {
            Some(destination) => destination,
            None => self.discover(server_name).await?,
        };
        if let Ok(address) = destination.connect_host.parse::<IpAddr>()
            && !self.inner.config.allow_private
            && discovery::is_non_public(address)
        {
            return Err(Error::PrivateAddress { server_name: server_name.to_owned(), address });
        }
        if destination.connect_host != destination.tls_name {
            let mut overrides = self
                .inner
                .connect_overrides
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // Bounded like the `.well-known` cache; an entry dropped here is simply found again.
            if overrides.len() >= self.inner.config.well_known_cache_max {
                overrides.clear();
            }
            overrides.insert(destination.tls_name.clone(), destination.connect_host.clone());
        }
        Ok(destination)
    }

    async fn discover(&self, server_name: &ServerName) -> Result<Destination, Error> {
        let hostname = server_name.as_str().to_ascii_lowercase();
        if let Some(delegated) = self.well_known(server_name).await {
            if let Some(direct) = discovery::delegated_destination(&delegated) {
                return direct.map_err(|reason| Error::Resolve {
                    server_name: server_name.to_owned(),
                    reason,
                });
            }
            return Ok(self.srv_or_fallback(&delegated.to_ascii_lowercase()).await);
        }
        Ok(self.srv_or_fallback(&hostname).await)
    }

    async fn srv_or_fallback(&self, hostname: &str) -> Destination {
        if let Some(dns) = &self.inner.dns {
            for srv_name in discovery::srv_names(hostname) {
                let Ok(lookup) = dns.srv_lookup(srv_name.as_str()).await else { continue };
                let best = lookup
                    .answers()
                    .iter()
                    .filter_map(|record| match &record.data {
                        RData::SRV(srv) => Some(srv),
                        _ => None,
                    })
                    .min_by_key(|srv| (srv.priority, std::cmp::Reverse(srv.weight)));
                if let Some(srv) = best {
                    return discovery::srv_destination(hostname, &srv.target.to_ascii(), srv.port);
                }
            }
        }
        discovery::fallback_destination(hostname)
    }

    /// The `m.server` of `server_name`'s `.well-known/matrix/server`, cached; `None` when it
    /// has none (or the answer was invalid).
    async fn well_known(&self, server_name: &ServerName) -> Option<String> {
        {
            let cache =
                self.inner.well_known.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some((answer, expires)) = cache.get(server_name)
                && *expires > Instant::now()
            {
                return answer.clone();
            }
        }
        let url = format!("https://{}/.well-known/matrix/server", server_name.as_str());
        let fetched = async {
            let response = self.inner.http.get(url).send().await.ok()?;
            if !response.status().is_success() {
                return None;
            }
            let cache_control = response
                .headers()
                .get(CACHE_CONTROL)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned);
            let body = self.read_limited(server_name, response).await.ok()?;
            let server = discovery::parse_well_known(&body)?;
            Some((server, discovery::well_known_cache_duration(cache_control.as_deref())))
        }
        .await;
        let (answer, lifetime) = match fetched {
            Some((server, lifetime)) => (Some(server), lifetime),
            None => (None, discovery::WELL_KNOWN_ERROR_CACHE),
        };
        let mut cache =
            self.inner.well_known.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        if cache.len() >= self.inner.config.well_known_cache_max {
            cache.retain(|_, (_, expires)| *expires > now);
        }
        if cache.len() < self.inner.config.well_known_cache_max {
            cache.insert(server_name.to_owned(), (answer.clone(), now + lifetime));
        }
        answer
    }

    /// Our own key response (`GET /_matrix/key/v2/server`), signed now.
    pub fn own_server_keys(&self) -> Result<CanonicalJsonObject, Error> {
        let valid_until_ts = now_ms().saturating_add(
            u64::try_from(self.inner.config.key_valid_for.as_millis()).unwrap_or(u64::MAX),
        );
        keys::own_server_keys(&self.inner.signing_key, &self.inner.old_verify_keys, valid_until_ts)
    }

    /// Fetches `server_name`'s keys from the server itself, checks them and stores them.
    async fn fetch_server_keys(
        &self,
        server_name: &ServerName,
        previous: Option<StoredServerKeys>,
    ) -> Result<StoredServerKeys, Error> {
        let span = tracing::info_span!("fetch_server_keys", %server_name);
        async {
            let answer = self
                .request(server_name, Method::GET, "/_matrix/key/v2/server", None, None)
                .await?;
            let response = match CanonicalJsonValue::try_from(answer) {
                Ok(CanonicalJsonValue::Object(object)) => object,
                _ => {
                    return Err(Error::InvalidResponse {
                        server_name: server_name.to_owned(),
                        reason: "key response is not a canonical JSON object".into(),
                    });
                }
            };
            let stored = keys::check_server_keys(server_name, response, previous, now_ms())?;
            self.inner.key_store.store_server_keys(server_name, &stored)?;
            tracing::debug!(keys = stored.verify_keys.len(), "fetched server keys");
            Ok(stored)
        }
        .instrument(span)
        .await
    }

    /// `server_name`'s keys, from the store while they are valid (and contain `key_id`, when
    /// given), else fetched from the server. Our own keys never leave this process.
    pub async fn server_keys(
        &self,
        server_name: &ServerName,
        key_id: Option<&str>,
        minimum_valid_until_ts: u64,
    ) -> Result<StoredServerKeys, Error> {
        if server_name == self.server_name() {
            let response = self.own_server_keys()?;
            return keys::check_server_keys(server_name, response, None, now_ms());
        }
        let stored = self.inner.key_store.load_server_keys(server_name)?;
        let now = now_ms();
        if let Some(stored) = &stored {
            let fresh = stored.valid_until_ts >= minimum_valid_until_ts.max(now);
            let has_key = key_id.is_none_or(|key_id| stored.verify_keys.contains_key(key_id));
            if fresh && has_key {
                return Ok(stored.clone());
            }
            let refetch_after = stored.fetched_at_ms.saturating_add(
                u64::try_from(self.inner.config.key_refetch_interval.as_millis())
                    .unwrap_or(u64::MAX),
            );
            if fresh && now < refetch_after {
                // Fetched a moment ago and the key was not there: do not let every forged
                // request make us fetch again.
                return Ok(stored.clone());
            }
        }
        self.fetch_server_keys(server_name, stored).await
    }

    /// The public keys of `server_name` named by `key_ids`, fetched when unknown, in the form
    /// `ruma::signatures` verifies with (put it in a `PublicKeyMap` under the server's name).
    /// Keys past their validity are included: whether a key was valid when an event was sent
    /// is the room version's rule to apply.
    pub async fn verify_keys(
        &self,
        server_name: &ServerName,
        key_ids: &[&str],
    ) -> Result<PublicKeySet, Error> {
        let mut stored = self.server_keys(server_name, key_ids.first().copied(), 0).await?;
        if key_ids.iter().any(|key_id| !stored.verify_keys.contains_key(*key_id)) {
            stored = self
                .server_keys(server_name, None, now_ms().saturating_add(1))
                .await
                .unwrap_or(stored);
        }
        let mut set = PublicKeySet::new();
        for key_id in key_ids {
            if let Some(bytes) = stored.verify_keys.get(*key_id).and_then(|key| key.key_bytes()) {
                set.insert((*key_id).to_owned(), ruma::serde::Base64::new(bytes));
            }
        }
        Ok(set)
    }

    /// Checks an inbound request's `Authorization: X-Matrix` header (`None`: the header is
    /// missing) against the origin's current key, fetched when needed. Returns the origin, and
    /// the body as the canonical JSON the signature was checked over (`None`: empty), so that
    /// a handler need not parse it again. `uri` is the request target (path and query) as
    /// received; `body` the raw body.
    pub async fn verify_request(
        &self,
        authorization: Option<&str>,
        method: &str,
        uri: &str,
        body: &[u8],
    ) -> Result<(OwnedServerName, Option<CanonicalJsonValue>), Error> {
        let authorization = authorization
            .ok_or_else(|| Error::MalformedAuthorization("missing Authorization header".into()))?;
        let header = XMatrix::parse(authorization)?;
        let span = tracing::info_span!("verify_request", origin = %header.origin, %method, %uri);
        async {
            request::check_destination(&header, self.server_name())?;
            let content = request::request_content(body)?;
            if header.origin == self.server_name() {
                // Nobody else may claim to be us; our own key is not fetched over the network.
                let public_key = self.inner.signing_key.public_key_bytes();
                request::verify_request(
                    &header,
                    self.server_name(),
                    method,
                    uri,
                    content.as_ref(),
                    &public_key,
                )?;
                return Ok((header.origin, content));
            }
            let stored = self.server_keys(&header.origin, Some(&header.key_id), 0).await?;
            let unknown = || Error::UnknownKey {
                server_name: header.origin.clone(),
                key_id: header.key_id.clone(),
            };
            let key = stored.verify_keys.get(&header.key_id).ok_or_else(unknown)?;
            // A request is signed now: an old key (past its `expired_ts`) or keys past their
            // `valid_until_ts` that could not be refreshed do not authenticate it.
            if key.valid_until_ts < now_ms() {
                return Err(unknown());
            }
            let public_key = key.key_bytes().ok_or_else(unknown)?;
            request::verify_request(
                &header,
                self.server_name(),
                method,
                uri,
                content.as_ref(),
                &public_key,
            )?;
            Ok((header.origin.clone(), content))
        }
        .instrument(span)
        .await
    }

    /// The notary: for each server (at most `key_query_servers_max`), its key response from
    /// our store, fetched when missing or valid for less than the asked
    /// `minimum_valid_until_ts`, co-signed by us. Servers whose keys we cannot get are left
    /// out, as the spec says.
    pub async fn query_server_keys(
        &self,
        servers: BTreeMap<OwnedServerName, u64>,
    ) -> Result<Vec<CanonicalJsonObject>, Error> {
        let mut answers = Vec::new();
        for (server_name, minimum_valid_until_ts) in
            servers.into_iter().take(self.inner.config.key_query_servers_max)
        {
            let mut response = if server_name == self.server_name() {
                self.own_server_keys()?
            } else {
                let cached = self.inner.key_store.load_server_keys(&server_name)?;
                let fetched = match &cached {
                    Some(stored)
                        if stored.valid_until_ts >= minimum_valid_until_ts.max(now_ms()) =>
                    {
                        None
                    }
                    _ => match self.fetch_server_keys(&server_name, cached.clone()).await {
                        Ok(stored) => Some(stored),
                        Err(error) => {
                            tracing::info!(%server_name, %error, "notary: cannot fetch keys");
                            None
                        }
                    },
                };
                match fetched.or(cached) {
                    Some(stored) => stored.response,
                    None => continue,
                }
            };
            if server_name != self.server_name() {
                self.inner.signing_key.sign_json(&mut response)?;
            }
            answers.push(response);
        }
        Ok(answers)
    }
}

#[cfg(test)]
mod tests {
    use ruma::server_name;

    use super::*;
    use crate::MemoryKeyStore;

    struct Pair {
        _dir: tempfile::TempDir,
        origin: Arc<ServerSigningKey>,
        receiver: Client,
        store: Arc<MemoryKeyStore>,
    }

    /// A receiver `b.test` whose store knows `a.test`'s keys as fetched just now (so nothing is
    /// fetched again), valid until `valid_until_ts`.
    fn pair(valid_until_ts: u64) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let origin = Arc::new(
            ServerSigningKey::load_or_generate(
                &dir.path().join("a"),
                server_name!("a.test").to_owned(),
            )
            .unwrap(),
        );
        let receiver_key = ServerSigningKey::load_or_generate(
            &dir.path().join("b"),
            server_name!("b.test").to_owned(),
        )
        .unwrap();
        let store = Arc::new(MemoryKeyStore::default());
        let response = keys::own_server_keys(&origin, &[], valid_until_ts).unwrap();
        let stored =
            keys::check_server_keys(server_name!("a.test"), response, None, now_ms()).unwrap();
        store.store_server_keys(server_name!("a.test"), &stored).unwrap();
        let receiver =
            Client::new(Arc::new(receiver_key), store.clone(), ClientConfig::default()).unwrap();
        Pair { _dir: dir, origin, receiver, store }
    }

    fn signed(key: &ServerSigningKey, uri: &str) -> String {
        request::sign_request(
            key,
            server_name!("b.test"),
            "POST",
            uri,
            Some(&CanonicalJsonValue::Object(CanonicalJsonObject::new())),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn requests_verify_against_stored_keys() {
        let pair = pair(now_ms() + 3_600_000);
        let header = signed(&pair.origin, "/x");
        let (origin, _) =
            pair.receiver.verify_request(Some(&header), "POST", "/x", b"{}").await.unwrap();
        assert_eq!(origin, "a.test");
        // Same header, other body or URI.
        let error = pair.receiver.verify_request(Some(&header), "POST", "/x", b"{\"a\":1}").await;
        assert!(matches!(error, Err(Error::InvalidSignature { .. })), "{error:?}");
        let error = pair.receiver.verify_request(Some(&header), "POST", "/y", b"{}").await;
        assert!(matches!(error, Err(Error::InvalidSignature { .. })), "{error:?}");
        let error = pair.receiver.verify_request(None, "POST", "/x", b"{}").await;
        assert!(matches!(error, Err(Error::MalformedAuthorization(_))), "{error:?}");
    }

    #[tokio::test]
    async fn an_unknown_key_just_fetched_is_not_fetched_again() {
        let pair = pair(now_ms() + 3_600_000);
        let dir = tempfile::tempdir().unwrap();
        let stranger = ServerSigningKey::load_or_generate(
            &dir.path().join("s"),
            server_name!("a.test").to_owned(),
        )
        .unwrap();
        // a.test is not reachable here: an error other than UnknownKey would mean a fetch.
        let error =
            pair.receiver.verify_request(Some(&signed(&stranger, "/x")), "POST", "/x", b"{}").await;
        assert!(matches!(error, Err(Error::UnknownKey { .. })), "{error:?}");
    }

    #[tokio::test]
    async fn old_keys_do_not_authenticate_requests() {
        let pair = pair(now_ms() + 3_600_000);
        // The origin's current key is now listed as expired an hour ago.
        let mut stored = pair.store.load_server_keys(server_name!("a.test")).unwrap().unwrap();
        for key in stored.verify_keys.values_mut() {
            key.valid_until_ts = now_ms() - 3_600_000;
        }
        pair.store.store_server_keys(server_name!("a.test"), &stored).unwrap();
        let error = pair
            .receiver
            .verify_request(Some(&signed(&pair.origin, "/x")), "POST", "/x", b"{}")
            .await;
        assert!(matches!(error, Err(Error::UnknownKey { .. })), "{error:?}");
    }

    #[tokio::test]
    async fn our_own_name_is_checked_with_our_own_key() {
        let pair = pair(now_ms() + 3_600_000);
        let dir = tempfile::tempdir().unwrap();
        let impostor = ServerSigningKey::load_or_generate(
            &dir.path().join("b"),
            server_name!("b.test").to_owned(),
        )
        .unwrap();
        let error =
            pair.receiver.verify_request(Some(&signed(&impostor, "/x")), "POST", "/x", b"{}").await;
        assert!(matches!(error, Err(Error::InvalidSignature { .. })), "{error:?}");
    }

    #[tokio::test]
    async fn private_ip_literals_are_refused_before_connecting() {
        let pair = pair(now_ms() + 3_600_000);
        for name in ["127.0.0.1:8448", "10.0.0.1", "[::1]:8448"] {
            let server_name = <&ServerName>::try_from(name).unwrap();
            let error = pair
                .receiver
                .send_request(server_name, Method::GET, "/_matrix/federation/v1/version", None)
                .await;
            assert!(matches!(error, Err(Error::PrivateAddress { .. })), "{name}: {error:?}");
        }
    }

    #[tokio::test]
    async fn the_notary_cosigns_what_it_holds() {
        let pair = pair(now_ms() + 3_600_000);
        let servers = BTreeMap::from([
            (server_name!("a.test").to_owned(), 0),
            (server_name!("b.test").to_owned(), 0),
        ]);
        let answers = pair.receiver.query_server_keys(servers).await.unwrap();
        assert_eq!(answers.len(), 2);
        let CanonicalJsonValue::Object(signatures) = &answers[0]["signatures"] else { panic!() };
        assert_eq!(signatures.keys().collect::<Vec<_>>(), ["a.test", "b.test"]);
        keys::check_server_keys(server_name!("a.test"), answers[0].clone(), None, 0).unwrap();
        keys::check_server_keys(server_name!("b.test"), answers[1].clone(), None, 0).unwrap();
    }
}
