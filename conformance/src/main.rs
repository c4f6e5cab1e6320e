//! `conformance`: the black-box Matrix homeserver suite. It starts (or connects to) a server,
//! runs the client-server API tests against it, prints one line per test and writes a JSON
//! report; `conformance docs` turns reports into `docs/conformance.md`.

// matrix-sdk's crypto types are deeply nested; proving its sync future `Send` needs more
// than the default 128 levels.
#![recursion_limit = "256"]

use conformance::{client, launcher};

mod clients;
mod federation;
mod report;
mod runner;
mod rust_sdk;
mod tests;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use crate::client::{Ctx, Registration};
use crate::report::Report;

#[derive(Parser, Debug)]
#[command(about = "Black-box Matrix client-server API conformance suite")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Commands>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Commands {
    /// Writes docs/conformance.md from the JSON reports of Hearth and Synapse runs.
    Docs {
        /// Reports of Hearth runs, merged (shown as "not run" when absent); repeatable.
        #[arg(long)]
        hearth: Vec<PathBuf>,
        /// Reports of Synapse runs, merged (shown as "not run" when absent); repeatable.
        #[arg(long)]
        synapse: Vec<PathBuf>,
        /// Reports of federation section runs (one per pair); repeatable.
        #[arg(long)]
        federation: Vec<PathBuf>,
        /// Where to write the page.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Runs the matrix-js-sdk real-client scenario (Node 22) against the server.
    ClientJs(RunArgs),
    /// Runs the matrix-sdk (Rust) real-client scenario against the server.
    ClientRust(RunArgs),
    /// Runs the federation section against two servers it starts on loopback addresses.
    Federation(FederationArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PairKind {
    /// Two Hearth servers.
    HearthHearth,
    /// Hearth first, Synapse second.
    HearthSynapse,
}

#[derive(clap::Args, Debug)]
struct FederationArgs {
    /// Which two servers federate.
    #[arg(long, value_enum)]
    pair: PairKind,
    /// The Hearth binary (default: build it from the workspace).
    #[arg(long, env = "HEARTH_BIN")]
    hearth_bin: Option<PathBuf>,
    /// Where cargo puts builds, to find the Hearth binary it built.
    #[arg(long, env = "CARGO_TARGET_DIR", hide = true)]
    cargo_target_dir: Option<PathBuf>,
    /// Where to write the JSON report (default target/conformance-federation-<pair>.json).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Each check fails when it takes longer than this.
    #[arg(long, default_value_t = 90)]
    timeout_secs: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Server {
    Hearth,
    Synapse,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Start this server on loopback, run against it, stop it (wins over `--base-url`).
    #[arg(long)]
    server: Option<Server>,
    /// Run against a server that is already running at this URL.
    #[arg(long, env = "CONFORMANCE_SERVER")]
    base_url: Option<String>,
    /// Register users through Synapse's shared-secret admin API with this secret.
    #[arg(long)]
    registration_secret: Option<String>,
    /// Run only the tests whose name contains this (or one of these, comma-separated).
    #[arg(long)]
    filter: Option<String>,
    /// Where to write the JSON report (default target/conformance-<server>.json).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Tests known to fail on this server, one per line with a `# reason`.
    #[arg(long)]
    expected_failures: Option<PathBuf>,
    /// The Hearth binary for `--server hearth` (default: build it from the workspace).
    #[arg(long, env = "HEARTH_BIN")]
    hearth_bin: Option<PathBuf>,
    /// Where cargo puts builds, to find the Hearth binary it built.
    #[arg(long, env = "CARGO_TARGET_DIR", hide = true)]
    cargo_target_dir: Option<PathBuf>,
    /// How many tests run at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Each test fails when it takes longer than this.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
    /// List the tests and exit.
    #[arg(long)]
    list: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Some(Commands::Docs { hearth, synapse, federation, output }) => {
                docs(hearth, synapse, federation, output)
            }
            Some(Commands::ClientJs(args)) => run(args, Suite::JsSdk).await,
            Some(Commands::ClientRust(args)) => run(args, Suite::RustSdk).await,
            Some(Commands::Federation(args)) => run_federation(args).await,
            None => run(cli.run, Suite::Conformance).await,
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn docs(
    hearth: Vec<PathBuf>,
    synapse: Vec<PathBuf>,
    federation: Vec<PathBuf>,
    output: Option<PathBuf>,
) -> Result<bool> {
    let read = |paths: &[PathBuf]| -> Result<Vec<Report>> {
        paths.iter().map(|path| Report::read(path)).collect::<Result<Vec<_>>>()
    };
    let (hearth, synapse) = (Report::merge(read(&hearth)?), Report::merge(read(&synapse)?));
    let pairs = read(&federation)?;
    let output =
        output.unwrap_or_else(|| launcher::workspace_root().join("docs").join("conformance.md"));
    report::write_docs(hearth.as_ref(), synapse.as_ref(), &pairs, &output)?;
    println!("wrote {}", output.display());
    Ok(true)
}

/// Starts the pair, runs the federation section, stops both; `Ok(false)` when a check failed.
async fn run_federation(args: FederationArgs) -> Result<bool> {
    let binary =
        launcher::hearth_binary(args.hearth_bin.clone(), args.cargo_target_dir.clone()).await?;
    let pki = launcher::TestPki::new()?;
    let (label, first, second) = match args.pair {
        PairKind::HearthHearth => {
            let first =
                launcher::start_hearth_federating(&binary, "127.0.0.10", &pki.leaf("127.0.0.10")?)
                    .await?;
            let second =
                launcher::start_hearth_federating(&binary, "127.0.0.11", &pki.leaf("127.0.0.11")?)
                    .await?;
            ("hearth+hearth", first, second)
        }
        PairKind::HearthSynapse => {
            let first =
                launcher::start_hearth_federating(&binary, "127.0.0.12", &pki.leaf("127.0.0.12")?)
                    .await?;
            let second =
                launcher::start_synapse_federating("127.0.0.13", &pki.leaf("127.0.0.13")?).await?;
            ("hearth+synapse", first, second)
        }
    };
    let pair = federation::Pair {
        first: Ctx::new(&first.launched.base_url, first.launched.registration.clone())?,
        second: Ctx::new(&second.launched.base_url, second.launched.registration.clone())?,
        first_name: first.server_name.clone(),
        second_name: second.server_name.clone(),
    };
    println!(
        "running the federation section between {} and {} ({label})",
        first.server_name, second.server_name
    );
    let started = Instant::now();
    let no_known_gaps = Default::default();
    let timeout = Duration::from_secs(args.timeout_secs);
    let mut first = first;
    let checks = async {
        let mut results = federation::run(&pair, &no_known_gaps, timeout).await;
        let restart = first.launched.restart();
        results.push(
            federation::restart_while_the_other_side_sends(&pair, restart, &no_known_gaps, timeout)
                .await,
        );
        results
    };
    let outcome = tokio::select! {
        results = checks => Ok(results),
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    first.launched.stop().await;
    second.launched.stop().await;
    let results = outcome?;
    let wall_time_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let report = Report::new(label, None, pair.first.base_url(), None, wall_time_ms, results);
    let report_path = args.report.clone().unwrap_or_else(|| {
        launcher::workspace_root()
            .join("target")
            .join(format!("conformance-federation-{}.json", label.replace('+', "-")))
    });
    report.write(&report_path).context("writing the report")?;
    println!("report: {} (wall time {:.1} s)", report_path.display(), wall_time_ms as f64 / 1000.0);
    runner::print_summary(&report);
    Ok(report.failed == 0)
}

/// What `run` runs against the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Suite {
    /// The Rust black-box tests of `src/tests/`.
    Conformance,
    /// The matrix-js-sdk scenario of `clients/js/`.
    JsSdk,
    /// The matrix-sdk scenario of `src/rust_sdk.rs`.
    RustSdk,
}

/// Runs the suite; `Ok(false)` when a test failed.
async fn run(args: RunArgs, suite: Suite) -> Result<bool> {
    let mut tests = if suite == Suite::Conformance { tests::all() } else { Vec::new() };
    if let Some(filter) = &args.filter {
        let parts: Vec<&str> = filter.split(',').map(str::trim).collect();
        tests.retain(|test| parts.iter().any(|part| test.name.contains(part)));
    }
    let mut names: Vec<&str> = tests.iter().map(|test| test.name.as_str()).collect();
    names.sort_unstable();
    if let Some(pair) = names.windows(2).find(|pair| pair[0] == pair[1]) {
        bail!("two tests are named {}", pair[0]);
    }
    if args.list {
        for name in names {
            println!("{name}");
        }
        return Ok(true);
    }

    let (server_label, launched) = match (args.server, &args.base_url) {
        (Some(Server::Synapse), _) => ("synapse", Some(launcher::start_synapse(None).await?)),
        (Some(Server::Hearth), _) => {
            let binary =
                launcher::hearth_binary(args.hearth_bin.clone(), args.cargo_target_dir.clone())
                    .await?;
            ("hearth", Some(launcher::start_hearth(&binary, None).await?))
        }
        (None, Some(_)) => ("external", None),
        (None, None) => bail!("give --server hearth|synapse or --base-url URL"),
    };
    let (base_url, registration) = match (&launched, &args.base_url) {
        (Some(launched), _) => (launched.base_url.clone(), launched.registration.clone()),
        (None, Some(url)) => (
            url.clone(),
            match &args.registration_secret {
                Some(secret) => Registration::SharedSecret(secret.clone()),
                None => Registration::Open,
            },
        ),
        (None, None) => bail!("no server to run against"),
    };

    // The server is stopped on every path out of here, Ctrl-C included.
    let outcome = tokio::select! {
        outcome = run_against(&args, suite, server_label, &base_url, registration, tests) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if let Some(launched) = launched {
        launched.stop().await;
    }
    outcome
}

async fn run_against(
    args: &RunArgs,
    suite: Suite,
    server_label: &str,
    base_url: &str,
    registration: Registration,
    tests: Vec<runner::Test>,
) -> Result<bool> {
    let expected_failures_path = args.expected_failures.clone().or_else(|| match args.server {
        Some(Server::Hearth) => {
            let path = launcher::workspace_root().join("conformance/expected-failures/hearth.txt");
            path.exists().then_some(path)
        }
        _ => None,
    });
    let expected_failures = match &expected_failures_path {
        Some(path) => runner::read_expected_failures(path)?,
        None => Default::default(),
    };
    let ctx = Ctx::new(base_url, registration)?;
    let server_version = ctx
        .get("/_matrix/federation/v1/version")
        .await
        .ok()
        .filter(|resp| resp.status == 200)
        .and_then(|resp| {
            let name = resp.body.pointer("/server/name")?.as_str()?.to_owned();
            let version = resp.body.pointer("/server/version")?.as_str()?.to_owned();
            Some(format!("{name} {version}"))
        });
    let what = match suite {
        Suite::Conformance => format!("{} tests", tests.len()),
        Suite::JsSdk => "the matrix-js-sdk scenario".to_owned(),
        Suite::RustSdk => "the matrix-sdk scenario".to_owned(),
    };
    println!(
        "running {what} against {server_label} at {base_url}{}",
        server_version.as_deref().map(|v| format!(" ({v})")).unwrap_or_default()
    );
    let started = Instant::now();
    let results = match suite {
        Suite::Conformance => {
            runner::run(
                ctx,
                tests,
                &expected_failures,
                args.concurrency,
                Duration::from_secs(args.timeout_secs),
            )
            .await
        }
        Suite::JsSdk => clients::run_js_sdk(&ctx, &expected_failures).await?,
        Suite::RustSdk => rust_sdk::run_rust_sdk(&ctx, &expected_failures).await?,
    };
    let wall_time_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let report = Report::new(
        server_label,
        server_version,
        base_url,
        args.filter.clone(),
        wall_time_ms,
        results,
    );
    let report_path = args.report.clone().unwrap_or_else(|| {
        let suffix = match suite {
            Suite::Conformance => "",
            Suite::JsSdk => "-js-sdk",
            Suite::RustSdk => "-rust-sdk",
        };
        launcher::workspace_root()
            .join("target")
            .join(format!("conformance-{server_label}{suffix}.json"))
    });
    report.write(&report_path).context("writing the report")?;
    println!("report: {} (wall time {:.1} s)", report_path.display(), wall_time_ms as f64 / 1000.0);
    runner::print_summary(&report);
    Ok(report.failed == 0)
}
