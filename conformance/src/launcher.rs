//! Starts the server under test on loopback (Synapse from a cached virtualenv, or the Hearth
//! binary) with a fresh data directory and a random port, and stops it afterwards.
//!
//! This module and the CLI are the only places that look at the process environment.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::json;
use tokio::process::{Child, Command};

use crate::client::Registration;

/// The Synapse release the suite is checked against.
pub const SYNAPSE_VERSION: &str = "1.163.2";

/// A server process the suite started; it is killed when this is dropped.
pub struct Launched {
    child: Child,
    pub base_url: String,
    /// The server name (with its port: `localhost:<port>`), the `destination` of federation
    /// requests to it.
    pub server_name: String,
    pub registration: Registration,
    log_path: PathBuf,
    /// How to start the process again on the same data (see [`Launched::restart`]).
    spawn: Spawn,
    /// From spawning the process to its first answer on `/_matrix/client/versions`.
    pub startup: Duration,
    /// Where the server keeps its database (for disk-use figures).
    pub database_dir: PathBuf,
    /// Holds the data directory until the server is gone.
    _data_dir: tempfile::TempDir,
}

/// The command line, environment and output file of a server process.
#[derive(Clone)]
struct Spawn {
    program: PathBuf,
    args: Vec<std::ffi::OsString>,
    env: Vec<(String, std::ffi::OsString)>,
    current_dir: Option<PathBuf>,
    output: PathBuf,
}

impl Spawn {
    fn spawn(&self) -> Result<Child> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.output)?;
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        if let Some(dir) = &self.current_dir {
            command.current_dir(dir);
        }
        command.spawn().with_context(|| format!("starting {}", self.program.display()))
    }
}

impl Launched {
    /// Stops the server and waits for it to exit.
    pub async fn stop(mut self) {
        // An error here means it already exited, which is what we want.
        let _ = self.child.kill().await;
    }

    /// The server's process id (for memory figures).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Stops the server gracefully (SIGTERM, then SIGKILL after 30 s) and starts it again on
    /// the same data, measuring the new start-up time.
    pub async fn restart(&mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
        self.child = self.spawn.spawn()?;
        self.wait_until_ready(Duration::from_secs(90)).await
    }

    /// The last lines of the server's log, to explain a failed start.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits until `GET /_matrix/client/versions` answers 200, or the process exits.
    async fn wait_until_ready(&mut self, limit: Duration) -> Result<()> {
        let started = Instant::now();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
        let url = format!("{}/_matrix/client/versions", self.base_url);
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("server exited during start-up ({status}); log tail:\n{}", self.log_tail());
            }
            if let Ok(response) = http.get(&url).send().await
                && response.status().is_success()
            {
                self.startup = started.elapsed();
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "server did not answer {url} within {} s; log tail:\n{}",
                    limit.as_secs(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released for the server to take).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// `$HOME/.cache`, where the virtualenv and builds are cached.
#[allow(clippy::disallowed_methods, reason = "the launcher is where the environment is read")]
pub fn cache_dir() -> Result<PathBuf> {
    let home = std::env::var("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache"))
}

async fn run_checked(command: &mut Command, what: &str) -> Result<()> {
    let output = command.output().await.with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Installs the pinned Synapse into the cached virtualenv unless it is there already.
async fn ensure_synapse_venv() -> Result<PathBuf> {
    let venv = cache_dir()?.join("hearth-synapse-venv");
    let python = venv.join("bin").join("python");
    let installed = Command::new(&python)
        .args(["-c", "import importlib.metadata as m; print(m.version('matrix-synapse'))"])
        .output()
        .await
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned());
    if installed.as_deref() == Some(SYNAPSE_VERSION) {
        return Ok(venv);
    }
    eprintln!("installing matrix-synapse=={SYNAPSE_VERSION} into {}", venv.display());
    if !python.exists() {
        run_checked(Command::new("python3").arg("-m").arg("venv").arg(&venv), "python3 -m venv")
            .await?;
    }
    run_checked(
        Command::new(venv.join("bin").join("pip")).args([
            "install",
            "--quiet",
            &format!("matrix-synapse=={SYNAPSE_VERSION}"),
        ]),
        "pip install matrix-synapse",
    )
    .await?;
    Ok(venv)
}

/// Every rate limit Synapse has, raised far above what the suite does.
fn rate_limits() -> serde_json::Value {
    let high = json!({"per_second": 10000, "burst_count": 100000});
    let mut config = serde_json::Map::new();
    for name in [
        "rc_message",
        "rc_registration",
        "rc_registration_token_validity",
        "rc_admin_redaction",
        "rc_joins_per_room",
        "rc_key_requests",
        "rc_3pid_validation",
        "rc_third_party_invite",
        "rc_media_create",
        "rc_delayed_event_mgmt",
        "rc_room_creation",
        "rc_reports",
        "rc_user_directory",
        "rc_profile",
    ] {
        config.insert(name.to_owned(), high.clone());
    }
    config.insert(
        "rc_login".to_owned(),
        json!({"address": high, "account": high, "failed_attempts": high}),
    );
    config.insert("rc_joins".to_owned(), json!({"local": high, "remote": high}));
    config.insert(
        "rc_invites".to_owned(),
        json!({"per_room": high, "per_user": high, "per_issuer": high}),
    );
    config.insert("rc_presence".to_owned(), json!({"per_user": high}));
    config.insert(
        "rc_federation".to_owned(),
        json!({
            "window_size": 1000,
            "sleep_limit": 10000,
            "sleep_delay": 1,
            "reject_limit": 10000,
            "concurrent": 100,
        }),
    );
    serde_json::Value::Object(config)
}

/// Starts Synapse with a fresh SQLite database on a random loopback port. With `peer_ca`, it
/// trusts that CA for outbound federation and may contact loopback addresses (S5's peer).
pub async fn start_synapse(peer_ca: Option<&Path>) -> Result<Launched> {
    let venv = ensure_synapse_venv().await?;
    let python = venv.join("bin").join("python");
    let data_dir = tempfile::Builder::new().prefix("conformance-synapse-").tempdir()?;
    let dir = data_dir.path();
    let port = free_port()?;
    let server_name = format!("localhost:{port}");
    let config_path = dir.join("homeserver.yaml");
    run_checked(
        Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "--server-name", &server_name, "--config-path"])
            .arg(&config_path)
            .arg("--data-directory")
            .arg(dir)
            .args(["--generate-config", "--report-stats=no"])
            .current_dir(dir),
        "synapse --generate-config",
    )
    .await?;

    // JSON is YAML, and Synapse merges later config files over earlier ones at the top level.
    let secret = format!("conformance-{port}-shared-secret");
    let mut overrides = json!({
        "listeners": [{
            "port": port,
            "bind_addresses": ["127.0.0.1"],
            "type": "http",
            "tls": false,
            "x_forwarded": false,
            "resources": [{"names": ["client", "federation"], "compress": false}],
        }],
        "public_baseurl": format!("http://127.0.0.1:{port}/"),
        "serve_client_wellknown": true,
        "database": {"name": "sqlite3", "args": {"database": dir.join("homeserver.db")}},
        "enable_registration": true,
        "enable_registration_without_verification": true,
        "registration_shared_secret": secret,
        // Registration and login hash passwords; the default 12 rounds cost 0.3 s of CPU each.
        "bcrypt_rounds": 4,
        "report_stats": false,
        "trusted_key_servers": [],
        "suppress_key_server_warning": true,
        "room_list_publication_rules": [{"action": "allow"}],
        "alias_creation_rules": [{"action": "allow"}],
        "caches": {"sync_response_cache_duration": 0},
        "presence": {"enabled": true},
        "user_directory": {"enabled": true, "search_all_users": false},
        "url_preview_enabled": false,
    });
    if let (Some(target), serde_json::Value::Object(limits)) =
        (overrides.as_object_mut(), rate_limits())
    {
        target.extend(limits);
    }
    if let (Some(target), Some(ca)) = (overrides.as_object_mut(), peer_ca) {
        // Peers' certificates are checked against their CA; loopback peers are allowed.
        target.insert("federation_verify_certificates".to_owned(), json!(true));
        target.insert("federation_custom_ca_list".to_owned(), json!([ca]));
        target.insert("federation_ip_range_blacklist".to_owned(), json!([]));
        target.insert("ip_range_whitelist".to_owned(), json!(["127.0.0.0/8"]));
    }
    let overrides_path = dir.join("overrides.yaml");
    std::fs::write(&overrides_path, serde_json::to_string_pretty(&overrides)?)?;

    let log_path = dir.join("stdout.log");
    let spawn = Spawn {
        program: python,
        args: vec![
            "-m".into(),
            "synapse.app.homeserver".into(),
            "--config-path".into(),
            config_path.into_os_string(),
            "--config-path".into(),
            overrides_path.into_os_string(),
        ],
        env: Vec::new(),
        current_dir: Some(dir.to_path_buf()),
        output: log_path.clone(),
    };
    let child = spawn.spawn().context("starting Synapse")?;
    let mut launched = Launched {
        child,
        base_url: format!("http://127.0.0.1:{port}"),
        server_name: server_name.clone(),
        registration: Registration::Open,
        log_path: dir.join("homeserver.log"),
        spawn,
        startup: Duration::ZERO,
        database_dir: dir.to_path_buf(),
        _data_dir: data_dir,
    };
    if let Err(error) = launched.wait_until_ready(Duration::from_secs(90)).await {
        let stdout = std::fs::read_to_string(&log_path).unwrap_or_default();
        launched.stop().await;
        return Err(error.context(format!("Synapse stdout/stderr:\n{stdout}")));
    }
    Ok(launched)
}

/// Finds or builds the Hearth binary.
pub async fn hearth_binary(
    explicit: Option<PathBuf>,
    cargo_target_dir: Option<PathBuf>,
) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path);
    }
    let workspace = workspace_root();
    eprintln!("building hearth: cargo build --release --bin hearth in {}", workspace.display());
    run_checked(
        Command::new("cargo")
            .args(["build", "--release", "--bin", "hearth"])
            .current_dir(&workspace)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit()),
        "cargo build --release --bin hearth",
    )
    .await?;
    let target = cargo_target_dir.unwrap_or_else(|| workspace.join("target"));
    let target = if target.is_absolute() { target } else { workspace.join(target) };
    Ok(target.join("release").join("hearth"))
}

/// Cargo's target directory for this workspace: `CARGO_TARGET_DIR` when set (relative to the
/// workspace), else `target/` in the workspace.
#[allow(clippy::disallowed_methods, reason = "the launcher is where the environment is read")]
pub fn cargo_target_dir() -> PathBuf {
    let workspace = workspace_root();
    match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(target) if target.is_absolute() => target,
        Some(target) => workspace.join(target),
        None => workspace.join("target"),
    }
}

/// The workspace root: the directory above this crate's manifest.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Starts Hearth with open registration, a fresh data directory and a random port. With
/// `peer_ca`, it trusts that CA for outbound federation and may contact private addresses
/// (S5's peer, on loopback).
pub async fn start_hearth(binary: &Path, peer_ca: Option<&Path>) -> Result<Launched> {
    let data_dir = tempfile::Builder::new().prefix("conformance-hearth-").tempdir()?;
    let port = free_port()?;
    let log_path = data_dir.path().join("hearth.log");
    // The data directory proper is a fresh, empty subdirectory, apart from the log.
    std::fs::create_dir(data_dir.path().join("data"))?;
    let server_name = format!("localhost:{port}");
    let mut env: Vec<(String, std::ffi::OsString)> = vec![
        ("HEARTH_LISTEN".to_owned(), format!("127.0.0.1:{port}").into()),
        ("HEARTH_DATA_DIR".to_owned(), data_dir.path().join("data").into_os_string()),
        ("HEARTH_SERVER_NAME".to_owned(), server_name.clone().into()),
        ("HEARTH_REGISTRATION".to_owned(), "open".into()),
    ];
    if let Some(ca) = peer_ca {
        env.push(("HEARTH_FEDERATION_CA".to_owned(), ca.as_os_str().to_owned()));
        env.push(("HEARTH_FEDERATION_ALLOW_PRIVATE".to_owned(), "true".into()));
    }
    let spawn = Spawn {
        program: binary.to_path_buf(),
        args: vec!["serve".into()],
        env,
        current_dir: None,
        output: log_path.clone(),
    };
    let child = spawn.spawn()?;
    let mut launched = Launched {
        child,
        base_url: format!("http://127.0.0.1:{port}"),
        server_name,
        registration: Registration::Open,
        log_path,
        spawn,
        startup: Duration::ZERO,
        database_dir: data_dir.path().join("data"),
        _data_dir: data_dir,
    };
    if let Err(error) = launched.wait_until_ready(Duration::from_secs(60)).await {
        launched.stop().await;
        return Err(error);
    }
    Ok(launched)
}

/// A test CA and leaf certificates for servers that federate on loopback addresses.
pub struct TestPki {
    dir: tempfile::TempDir,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// The certificate and key files of one server.
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that signed every leaf: what peers trust.
    pub ca: PathBuf,
}

impl TestPki {
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("conformance-pki-").tempdir()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name = distinguished_name("Hearth conformance test CA");
        let key = rcgen::KeyPair::generate()?;
        let certificate = params.self_signed(&key)?;
        std::fs::write(dir.path().join("ca.pem"), certificate.pem())?;
        Ok(Self { dir, issuer: rcgen::Issuer::new(params, key) })
    }

    /// A leaf certificate for the IP address `ip` (its only subject alternative name).
    pub fn leaf(&self, ip: &str) -> Result<TlsFiles> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![ip.to_owned()])?;
        // A subject of its own: a leaf named like its issuer looks self-signed to OpenSSL
        // (Synapse's verifier), which then refuses it.
        params.distinguished_name = distinguished_name(ip);
        let certificate = params.signed_by(&key, &self.issuer)?;
        let cert = self.dir.path().join(format!("{ip}.crt"));
        let key_path = self.dir.path().join(format!("{ip}.key"));
        std::fs::write(&cert, certificate.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok(TlsFiles { cert, key: key_path, ca: self.dir.path().join("ca.pem") })
    }
}

/// A distinguished name with only a common name.
fn distinguished_name(common_name: &str) -> rcgen::DistinguishedName {
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, common_name);
    name
}

/// A free TCP port on `ip`.
fn free_port_on(ip: &str) -> Result<u16> {
    let listener = TcpListener::bind((ip, 0)).with_context(|| format!("finding a port on {ip}"))?;
    Ok(listener.local_addr()?.port())
}

/// A server started to federate: its launch and its server name (`ip:tls_port`).
pub struct Federating {
    pub launched: Launched,
    pub server_name: String,
}

/// Starts Hearth on `ip` for federation: the client API in plain HTTP, client and federation
/// APIs over TLS on the port its server name carries, trusting the test CA for peers.
pub async fn start_hearth_federating(
    binary: &Path,
    ip: &str,
    tls: &TlsFiles,
) -> Result<Federating> {
    let data_dir = tempfile::Builder::new().prefix("conformance-hearth-").tempdir()?;
    let (port, tls_port) = (free_port_on(ip)?, free_port_on(ip)?);
    let server_name = format!("{ip}:{tls_port}");
    let log_path = data_dir.path().join("hearth.log");
    std::fs::create_dir(data_dir.path().join("data"))?;
    let spawn = Spawn {
        program: binary.to_path_buf(),
        args: vec!["serve".into()],
        env: vec![
            ("HEARTH_LISTEN".to_owned(), format!("{ip}:{port}").into()),
            ("HEARTH_DATA_DIR".to_owned(), data_dir.path().join("data").into_os_string()),
            ("HEARTH_SERVER_NAME".to_owned(), server_name.clone().into()),
            ("HEARTH_REGISTRATION".to_owned(), "open".into()),
            ("HEARTH_TLS_LISTEN".to_owned(), server_name.clone().into()),
            ("HEARTH_TLS_CERT".to_owned(), tls.cert.clone().into_os_string()),
            ("HEARTH_TLS_KEY".to_owned(), tls.key.clone().into_os_string()),
            ("HEARTH_FEDERATION_CA".to_owned(), tls.ca.clone().into_os_string()),
            ("HEARTH_FEDERATION_ALLOW_PRIVATE".to_owned(), "true".into()),
        ],
        current_dir: None,
        output: log_path.clone(),
    };
    let child = spawn.spawn()?;
    let mut launched = Launched {
        child,
        server_name: server_name.clone(),
        base_url: format!("http://{ip}:{port}"),
        registration: Registration::Open,
        log_path,
        spawn,
        startup: Duration::ZERO,
        database_dir: data_dir.path().join("data"),
        _data_dir: data_dir,
    };
    if let Err(error) = launched.wait_until_ready(Duration::from_secs(60)).await {
        launched.stop().await;
        return Err(error);
    }
    Ok(Federating { launched, server_name })
}

/// Starts Synapse on `ip` for federation (see `shared/synapse-on-loopback.md`): the client API
/// in plain HTTP, federation over TLS on the port its server name carries, loopback peers
/// allowed, keys fetched from the origin itself.
pub async fn start_synapse_federating(ip: &str, tls: &TlsFiles) -> Result<Federating> {
    let venv = ensure_synapse_venv().await?;
    let python = venv.join("bin").join("python");
    let data_dir = tempfile::Builder::new().prefix("conformance-synapse-").tempdir()?;
    let dir = data_dir.path();
    let (port, tls_port) = (free_port_on(ip)?, free_port_on(ip)?);
    let server_name = format!("{ip}:{tls_port}");
    let config_path = dir.join("homeserver.yaml");
    run_checked(
        Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "--server-name", &server_name, "--config-path"])
            .arg(&config_path)
            .arg("--data-directory")
            .arg(dir)
            .args(["--generate-config", "--report-stats=no"])
            .current_dir(dir),
        "synapse --generate-config",
    )
    .await?;
    let mut overrides = json!({
        "listeners": [
            {
                "port": port,
                "bind_addresses": [ip],
                "type": "http",
                "tls": false,
                "x_forwarded": false,
                "resources": [{"names": ["client"], "compress": false}],
            },
            {
                "port": tls_port,
                "bind_addresses": [ip],
                "type": "http",
                "tls": true,
                "resources": [{"names": ["federation"], "compress": false}],
            },
        ],
        "tls_certificate_path": tls.cert,
        "tls_private_key_path": tls.key,
        // Both sides check the other's certificate against the test CA.
        "federation_verify_certificates": true,
        "federation_custom_ca_list": [tls.ca],
        "federation_ip_range_blacklist": [],
        "ip_range_whitelist": ["127.0.0.0/8"],
        "public_baseurl": format!("http://{ip}:{port}/"),
        "database": {"name": "sqlite3", "args": {"database": dir.join("homeserver.db")}},
        "enable_registration": true,
        "enable_registration_without_verification": true,
        "bcrypt_rounds": 4,
        "report_stats": false,
        "trusted_key_servers": [],
        "suppress_key_server_warning": true,
        "caches": {"sync_response_cache_duration": 0},
        "presence": {"enabled": true},
        "url_preview_enabled": false,
    });
    if let (Some(target), serde_json::Value::Object(limits)) =
        (overrides.as_object_mut(), rate_limits())
    {
        target.extend(limits);
    }
    let overrides_path = dir.join("overrides.yaml");
    std::fs::write(&overrides_path, serde_json::to_string_pretty(&overrides)?)?;
    let log_path = dir.join("stdout.log");
    let spawn = Spawn {
        program: python,
        args: vec![
            "-m".into(),
            "synapse.app.homeserver".into(),
            "--config-path".into(),
            config_path.into_os_string(),
            "--config-path".into(),
            overrides_path.into_os_string(),
        ],
        env: Vec::new(),
        current_dir: Some(dir.to_path_buf()),
        output: log_path.clone(),
    };
    let child = spawn.spawn().context("starting Synapse")?;
    let mut launched = Launched {
        child,
        server_name: server_name.clone(),
        base_url: format!("http://{ip}:{port}"),
        registration: Registration::Open,
        log_path: dir.join("homeserver.log"),
        spawn,
        startup: Duration::ZERO,
        database_dir: dir.to_path_buf(),
        _data_dir: data_dir,
    };
    if let Err(error) = launched.wait_until_ready(Duration::from_secs(90)).await {
        let stdout = std::fs::read_to_string(&log_path).unwrap_or_default();
        launched.stop().await;
        return Err(error.context(format!("Synapse stdout/stderr:\n{stdout}")));
    }
    Ok(Federating { launched, server_name })
}
