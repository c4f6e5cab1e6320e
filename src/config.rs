//! The one configuration of a Hearth server: defaults, then the TOML file, then `HEARTH_*`
//! environment variables (one per field), parsed once at startup into typed values.
//!
//! Field by field documentation: `docs/configuration.md`.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use ruma::{OwnedServerName, RoomVersionId};
use serde::{Deserialize, Serialize};

/// Who may create accounts through `/register`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    /// Nobody: accounts are made by the admin with `hearth user create`.
    #[default]
    Closed,
    /// Anyone who presents the registration token (`m.login.registration_token`).
    Token,
    /// Anyone (`m.login.dummy`).
    Open,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// The server's configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The server name: the part after the colon in user ids and room aliases.
    pub server_name: OwnedServerName,
    /// Address and port of the plain-HTTP listener (client and, behind a proxy, federation API).
    pub listen: SocketAddr,
    /// Where the database and the signing key live.
    pub data_dir: PathBuf,
    /// Who may register: `closed`, `token` or `open`.
    pub registration: Registration,
    /// The token that `registration = "token"` asks for.
    pub registration_token: Option<String>,
    /// The room version of new rooms.
    pub default_room_version: RoomVersionId,
    /// The largest request body accepted, in bytes.
    pub max_request_bytes: usize,
    /// The base URL that clients are told to use in `/.well-known/matrix/client`.
    pub public_base_url: Option<String>,
    /// The `server` value of `/.well-known/matrix/server` (host:port that peers connect to).
    pub well_known_server: Option<String>,
    /// Log filter, as `RUST_LOG` syntax (`info`, `hearth=debug,info`).
    pub log: String,
    /// Log format: `pretty` or `json`.
    pub log_format: LogFormat,
    /// The longest `/sync` long-poll the server honours, in milliseconds.
    pub sync_timeout_max_ms: u64,
    /// How many events one `/messages` or `/sync` timeline may return at most.
    pub timeline_limit_max: usize,
    /// Address and port of the TLS listener (client and federation API), if any.
    pub tls_listen: Option<SocketAddr>,
    /// The PEM certificate chain of the TLS listener.
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of the TLS listener.
    pub tls_key: Option<PathBuf>,
    /// A PEM file of extra CA certificates trusted for outbound federation.
    pub federation_ca: Option<PathBuf>,
    /// Contact peers that resolve to loopback, private or link-local addresses.
    pub federation_allow_private: bool,
    /// How long connecting to a peer (TCP and TLS) may take, in milliseconds.
    pub federation_connect_timeout_ms: u64,
    /// How long one outbound federation request may take, in milliseconds.
    pub federation_request_timeout_ms: u64,
    /// The largest response body read from a peer, in bytes.
    pub federation_max_response_bytes: usize,
    /// How many `.well-known/matrix/server` answers are cached at most.
    pub federation_well_known_cache_max: usize,
    /// The shortest time between two key fetches from one peer for unknown key ids, in ms.
    pub federation_key_refetch_interval_ms: u64,
    /// How many servers one notary query (`/_matrix/key/v2/query`) may name.
    pub federation_key_query_servers_max: usize,
    /// How long our published server keys are declared valid, in milliseconds.
    pub federation_key_valid_ms: u64,
    /// The wait before retrying a peer after its first failed transaction, in milliseconds;
    /// it doubles with every further failure.
    pub federation_retry_initial_ms: u64,
    /// The longest wait between two attempts to reach a failing peer, in milliseconds.
    pub federation_retry_max_ms: u64,
    /// How many peers are sent transactions at the same time.
    pub federation_destinations_concurrent_max: usize,
    /// The most events one `get_missing_events` request asks for when a received event's
    /// prev events are missing.
    pub federation_missing_events_max: usize,
    /// The most events fetched one by one (`event`) to complete the state at an event that
    /// `state_ids` named, when its prev events could not be had.
    pub federation_state_events_fetched_max: usize,
    /// The most events one `backfill` request asks for when a client paginates past the
    /// oldest event we have.
    pub federation_backfill_events_max: usize,
    /// How many servers of the room one backfill tries, one after the other.
    pub federation_backfill_servers_max: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_name: "localhost".try_into().expect("localhost is a valid server name"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8008)),
            data_dir: PathBuf::from("hearth-data"),
            registration: Registration::Closed,
            registration_token: None,
            default_room_version: RoomVersionId::V11,
            max_request_bytes: 10 * 1024 * 1024,
            public_base_url: None,
            well_known_server: None,
            log: "info".to_owned(),
            log_format: LogFormat::Pretty,
            sync_timeout_max_ms: 60_000,
            timeline_limit_max: 1000,
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            federation_ca: None,
            federation_allow_private: false,
            federation_connect_timeout_ms: 10_000,
            federation_request_timeout_ms: 60_000,
            federation_max_response_bytes: 20 * 1024 * 1024,
            federation_well_known_cache_max: 10_000,
            federation_key_refetch_interval_ms: 60_000,
            federation_key_query_servers_max: 100,
            federation_key_valid_ms: 7 * 24 * 3600 * 1000,
            federation_retry_initial_ms: 2_000,
            federation_retry_max_ms: 600_000,
            federation_destinations_concurrent_max: 50,
            federation_missing_events_max: 50,
            federation_state_events_fetched_max: 200,
            federation_backfill_events_max: 100,
            federation_backfill_servers_max: 5,
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The file or an environment variable holds a bad value.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The environment variable that names the config file.
pub const CONFIG_ENV: &str = "HEARTH_CONFIG";

impl Config {
    /// Loads defaults, then `file` (or the file named by `HEARTH_CONFIG`), then `HEARTH_*`
    /// variables from the process environment.
    pub fn load(file: Option<PathBuf>) -> Result<Self, ConfigError> {
        #[allow(clippy::disallowed_methods)] // The one place that reads the environment.
        let environment: BTreeMap<String, String> =
            std::env::vars().filter(|(name, _)| name.starts_with("HEARTH_")).collect();
        let file = file.or_else(|| environment.get(CONFIG_ENV).map(PathBuf::from));
        let text = match &file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.clone(), source })?,
            None => String::new(),
        };
        Self::from_sources(&text, &environment)
    }

    /// Builds the config from TOML text and environment variables (given as a map, for tests).
    pub fn from_sources(
        toml_text: &str,
        environment: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = toml_text
            .parse()
            .map_err(|error: toml::de::Error| ConfigError::Invalid(error.to_string()))?;
        let defaults = toml::Table::try_from(Self::default()).unwrap_or_default();
        for field in Self::field_names() {
            let variable = env_name(&field);
            if let Some(value) = environment.get(&variable) {
                // Numbers and booleans only where the field is one; everything else (tokens,
                // room versions, names) stays text even when it looks like a number.
                let typed = matches!(
                    defaults.get(&field),
                    Some(toml::Value::Integer(_) | toml::Value::Boolean(_))
                );
                let value =
                    if typed { env_value(value) } else { toml::Value::String(value.clone()) };
                table.insert(field.clone(), value);
            }
        }
        let config: Self = table
            .try_into()
            .map_err(|error: toml::de::Error| ConfigError::Invalid(error.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The names of all fields, from the serialized defaults.
    pub fn field_names() -> Vec<String> {
        let mut names: Vec<String> = toml::Table::try_from(Self::default())
            .map(|table| table.keys().cloned().collect())
            .unwrap_or_default();
        // Optional fields are absent from the serialized defaults.
        for optional in [
            "registration_token",
            "public_base_url",
            "well_known_server",
            "tls_listen",
            "tls_cert",
            "tls_key",
            "federation_ca",
        ] {
            if !names.iter().any(|name| name == optional) {
                names.push(optional.to_owned());
            }
        }
        names
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.registration == Registration::Token
            && self.registration_token.as_deref().is_none_or(str::is_empty)
        {
            return Err(ConfigError::Invalid(
                "registration = \"token\" needs registration_token (HEARTH_REGISTRATION_TOKEN)"
                    .into(),
            ));
        }
        if self.default_room_version.rules().is_none() {
            return Err(ConfigError::Invalid(format!(
                "default_room_version {} is not supported",
                self.default_room_version
            )));
        }
        if self.tls_listen.is_some() && (self.tls_cert.is_none() || self.tls_key.is_none()) {
            return Err(ConfigError::Invalid(
                "tls_listen needs tls_cert and tls_key (HEARTH_TLS_CERT, HEARTH_TLS_KEY)".into(),
            ));
        }
        Ok(())
    }

    /// The settings of the outbound transaction sender.
    pub fn sender(&self) -> federation::SenderConfig {
        use std::time::Duration;
        federation::SenderConfig {
            retry_initial: Duration::from_millis(self.federation_retry_initial_ms),
            retry_max: Duration::from_millis(self.federation_retry_max_ms),
            concurrent_destinations_max: self.federation_destinations_concurrent_max.max(1),
        }
    }

    /// The bounds on what a remote server can make the room core fetch.
    pub fn ingest_limits(&self) -> crate::rooms::ingest::Limits {
        crate::rooms::ingest::Limits {
            missing_events_max: self.federation_missing_events_max,
            state_events_fetched_max: self.federation_state_events_fetched_max,
            backfill_events_max: self.federation_backfill_events_max.max(1),
            backfill_servers_max: self.federation_backfill_servers_max,
        }
    }

    /// The settings of the federation client.
    pub fn federation_client(&self) -> federation::ClientConfig {
        use std::time::Duration;
        federation::ClientConfig {
            allow_private: self.federation_allow_private,
            extra_ca_file: self.federation_ca.clone(),
            connect_timeout: Duration::from_millis(self.federation_connect_timeout_ms),
            request_timeout: Duration::from_millis(self.federation_request_timeout_ms),
            max_response_bytes: self.federation_max_response_bytes,
            well_known_cache_max: self.federation_well_known_cache_max,
            key_refetch_interval: Duration::from_millis(self.federation_key_refetch_interval_ms),
            key_query_servers_max: self.federation_key_query_servers_max,
            key_valid_for: Duration::from_millis(self.federation_key_valid_ms),
        }
    }

    /// The database directory.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("db")
    }

    /// The signing key file.
    pub fn signing_key_path(&self) -> PathBuf {
        self.data_dir.join("signing.key")
    }
}

/// `server_name` -> `HEARTH_SERVER_NAME`.
pub fn env_name(field: &str) -> String {
    format!("HEARTH_{}", field.to_ascii_uppercase())
}

/// An environment value as TOML: numbers and booleans keep their type, anything else is a string.
fn env_value(value: &str) -> toml::Value {
    match format!("v = {value}").parse::<toml::Table>() {
        Ok(mut table) => match table.remove("v") {
            Some(parsed @ (toml::Value::Integer(_) | toml::Value::Boolean(_))) => parsed,
            _ => toml::Value::String(value.to_owned()),
        },
        Err(_) => toml::Value::String(value.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml_text: &str, environment: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let environment =
            environment.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect();
        Config::from_sources(toml_text, &environment)
    }

    #[test]
    fn defaults_are_safe() {
        let config = check("", &[]).unwrap();
        assert_eq!(config.server_name.as_str(), "localhost");
        assert_eq!(config.listen.to_string(), "127.0.0.1:8008");
        assert_eq!(config.registration, Registration::Closed);
        assert_eq!(config.default_room_version, RoomVersionId::V11);
    }

    #[test]
    fn environment_overrides_file() {
        let config = check(
            "server_name = \"a.test\"\nmax_request_bytes = 5\n",
            &[
                ("HEARTH_SERVER_NAME", "b.test:8448"),
                ("HEARTH_LISTEN", "127.0.0.2:9000"),
                ("HEARTH_REGISTRATION", "token"),
                ("HEARTH_REGISTRATION_TOKEN", "secret"),
                ("HEARTH_DATA_DIR", "/tmp/x"),
                ("HEARTH_DEFAULT_ROOM_VERSION", "10"),
            ],
        )
        .unwrap();
        assert_eq!(config.server_name.as_str(), "b.test:8448");
        assert_eq!(config.listen.to_string(), "127.0.0.2:9000");
        assert_eq!(config.registration, Registration::Token);
        assert_eq!(config.registration_token.as_deref(), Some("secret"));
        assert_eq!(config.max_request_bytes, 5);
        assert_eq!(config.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(config.default_room_version, RoomVersionId::V10);
        let numeric_token =
            check("", &[("HEARTH_REGISTRATION", "token"), ("HEARTH_REGISTRATION_TOKEN", "12345")]);
        assert_eq!(numeric_token.unwrap().registration_token.as_deref(), Some("12345"));
    }

    #[test]
    fn every_field_has_an_environment_variable() {
        let names = Config::field_names();
        assert!(names.len() >= 13, "{names:?}");
        let doc = include_str!("../docs/configuration.md");
        for name in names {
            assert!(
                doc.contains(&env_name(&name)),
                "docs/configuration.md lacks {}",
                env_name(&name)
            );
        }
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(check("nonsense = 1", &[]).is_err());
        assert!(check("", &[("HEARTH_REGISTRATION", "token")]).is_err());
        assert!(check("", &[("HEARTH_LISTEN", "not an address")]).is_err());
        assert!(check("", &[("HEARTH_DEFAULT_ROOM_VERSION", "99")]).is_err());
        assert!(check("", &[("HEARTH_TLS_LISTEN", "127.0.0.1:8448")]).is_err());
        assert!(check("", &[("HEARTH_FEDERATION_ALLOW_PRIVATE", "maybe")]).is_err());
    }

    #[test]
    fn federation_settings_come_from_the_environment() {
        let config = check(
            "",
            &[
                ("HEARTH_TLS_LISTEN", "127.0.0.2:8448"),
                ("HEARTH_TLS_CERT", "/c.pem"),
                ("HEARTH_TLS_KEY", "/k.pem"),
                ("HEARTH_FEDERATION_CA", "/ca.pem"),
                ("HEARTH_FEDERATION_ALLOW_PRIVATE", "true"),
                ("HEARTH_FEDERATION_MAX_RESPONSE_BYTES", "1000"),
            ],
        )
        .unwrap();
        assert_eq!(config.tls_listen.unwrap().to_string(), "127.0.0.2:8448");
        assert_eq!(config.tls_cert, Some(PathBuf::from("/c.pem")));
        assert!(config.federation_allow_private);
        let client = config.federation_client();
        assert!(client.allow_private);
        assert_eq!(client.max_response_bytes, 1000);
        assert_eq!(client.extra_ca_file, Some(PathBuf::from("/ca.pem")));
        assert!(!check("", &[]).unwrap().federation_allow_private);
    }

    #[test]
    fn the_example_config_parses() {
        check(include_str!("../docker/config.example.toml"), &[]).unwrap();
    }

    #[test]
    fn the_container_config_parses_and_listens_on_every_address() {
        let config =
            check(include_str!("../docker/config.toml"), &[("HEARTH_SERVER_NAME", "example.org")])
                .unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:8008");
        assert_eq!(config.data_dir, PathBuf::from("/data"));
        assert_eq!(config.server_name.as_str(), "example.org");
        assert_eq!(config.registration, Registration::Closed);
    }
}
