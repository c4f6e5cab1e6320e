//! `hearth-bench`: the side-by-side load generator. It starts Hearth and Synapse on loopback
//! (or drives one running server), runs the chosen scenarios against each, prints one table
//! with both results and the ratio, and writes the figures as JSON; `hearth-bench docs`
//! turns that JSON into `docs/performance.md`, so no figure is typed by hand.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use conformance::bench::{self, Better, Figure, Sizes};
use conformance::client::{Ctx, Registration};
use conformance::launcher::{self, Launched};
use conformance::peer::Peer;
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug)]
#[command(name = "hearth-bench", about = "Side-by-side homeserver benchmarks (Hearth vs Synapse)")]
struct Cli {
    #[command(subcommand)]
    command: Option<Commands>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Commands {
    /// Writes docs/performance.md from the JSON results of a run.
    Docs {
        /// The results file of a run.
        #[arg(long, default_value = "target/bench-results.json")]
        results: PathBuf,
        /// Where to write the page.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Results of runs at sizes beyond what a side-by-side run reaches (Hearth only, such
        /// as S7 at 1M messages), each shown in its own table with its command. Repeatable.
        #[arg(long)]
        scale: Vec<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Servers {
    Hearth,
    Synapse,
    Both,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Scenarios to run: S1, S2, S3, S4, S5, S6, S7, or `all`.
    #[arg(default_value = "all")]
    scenarios: Vec<String>,
    /// Which servers to start (ignored with --base-url).
    #[arg(long, value_enum, default_value = "both")]
    server: Servers,
    /// Drive a server that is already running instead (S4 and S7 need a started one).
    #[arg(long)]
    base_url: Option<String>,
    /// Synapse's registration shared secret, for --base-url servers without open registration.
    #[arg(long)]
    registration_secret: Option<String>,
    /// The Hearth binary (default: build the release binary of this workspace).
    #[arg(long)]
    hearth_bin: Option<PathBuf>,
    /// Tiny sizes: a few seconds in all, only proves the tool works.
    #[arg(long)]
    smoke: bool,
    /// Pin each server to CPU 0 and this tool to CPU 1 (`taskset`).
    #[arg(long)]
    pin: bool,
    /// S2: clients long-polling `/sync`.
    #[arg(long)]
    s2_clients: Option<usize>,
    /// S2: the room counts to spread the clients over, one measurement each (`1,100`).
    #[arg(long, value_delimiter = ',')]
    s2_rooms: Option<Vec<usize>>,
    /// S3: rooms of the measured user.
    #[arg(long)]
    s3_rooms: Option<usize>,
    /// S3: members per room.
    #[arg(long)]
    s3_members: Option<usize>,
    /// S7: messages sent to measure disk use.
    #[arg(long)]
    s7_messages: Option<usize>,
    /// S5: state events the federation peer adds to the room before its messages.
    #[arg(long)]
    s5_state: Option<usize>,
    /// S5: messages the federation peer sends, in transactions of 50.
    #[arg(long)]
    s5_messages: Option<usize>,
    /// S6: the cargo profile the state resolution benches are built with (`bench` is the
    /// optimised release build; `dev` reuses the test build, with only dependencies optimised).
    #[arg(long)]
    s6_profile: Option<String>,
    /// Keep the figures of an earlier results file for the scenarios this run does not measure
    /// (per server), so one page can show scenarios measured in different runs.
    #[arg(long)]
    merge: Option<PathBuf>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/bench-results.json")]
    output: PathBuf,
}

/// What a run measured, as written to the results file.
#[derive(Serialize, Deserialize)]
struct Results {
    /// The command line that produced these figures.
    command: String,
    /// When (UTC, RFC 3339 without sub-seconds).
    date: String,
    /// CPU model, cores and memory of the machine.
    machine: String,
    /// The scenario sizes.
    sizes: Sizes,
    /// Whether servers were pinned to a core.
    pinned: bool,
    /// How this tool was built (`release`, or `dev` with optimised dependencies).
    #[serde(default)]
    tool_profile: String,
    /// Figures per server label (`hearth`, `synapse`, or the base URL).
    servers: Vec<(String, String, Vec<Figure>)>,
    /// Scenarios a server could not complete, with the error.
    #[serde(default)]
    failures: Vec<String>,
    /// The cargo profile of S6's benches, when S6 ran.
    #[serde(default)]
    s6_profile: Option<String>,
    /// Earlier runs whose figures were kept for scenarios this run did not measure.
    #[serde(default)]
    merged: Vec<Earlier>,
}

/// An earlier run some figures come from.
#[derive(Serialize, Deserialize)]
struct Earlier {
    command: String,
    date: String,
    machine: String,
    tool_profile: String,
    /// The scenarios whose figures come from that run.
    scenarios: Vec<String>,
}

const SCENARIOS: [&str; 7] = ["S1", "S2", "S3", "S4", "S5", "S6", "S7"];

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
            Some(Commands::Docs { results, output, scale }) => docs(&results, output, &scale),
            None => run(cli.run).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn selected(args: &RunArgs) -> Result<Vec<&'static str>> {
    let mut chosen = Vec::new();
    for name in &args.scenarios {
        let name = name.to_uppercase();
        if name == "ALL" {
            return Ok(SCENARIOS.to_vec());
        }
        match SCENARIOS.iter().find(|known| **known == name) {
            Some(known) => chosen.push(*known),
            None => bail!("unknown scenario {name}; known: {}", SCENARIOS.join(", ")),
        }
    }
    Ok(chosen)
}

async fn run(args: RunArgs) -> Result<()> {
    let scenarios = selected(&args)?;
    let mut sizes = if args.smoke { Sizes::smoke() } else { Sizes::default() };
    if let Some(value) = args.s2_clients {
        sizes.s2_clients = value;
    }
    if let Some(value) = args.s2_rooms {
        sizes.s2_rooms = value;
    }
    if let Some(value) = args.s3_rooms {
        sizes.s3_rooms = value;
    }
    if let Some(value) = args.s3_members {
        sizes.s3_members = value;
    }
    if let Some(value) = args.s7_messages {
        sizes.s7_messages = value;
    }
    if let Some(value) = args.s5_state {
        sizes.s5_state = value;
    }
    if let Some(value) = args.s5_messages {
        sizes.s5_messages = value;
    }
    // S5's peer exists before the servers start: they are told to trust its CA.
    let peer = if scenarios.contains(&"S5") && args.base_url.is_none() {
        Some(Peer::start().await.context("starting the federation peer")?)
    } else {
        None
    };
    let peer_ca = peer.as_ref().map(Peer::ca_path);
    if args.pin {
        pin(std::process::id(), 1).await?;
    }
    let mut servers = Vec::new();
    let mut failures = Vec::new();
    if let Some(base_url) = &args.base_url {
        let registration = match &args.registration_secret {
            Some(secret) => Registration::SharedSecret(secret.clone()),
            None => Registration::Open,
        };
        let ctx = Ctx::new(base_url, registration)?;
        let version = server_version(&ctx).await;
        let mut failed = Vec::new();
        let figures = measure(&ctx, None, None, &scenarios, &sizes, args.pin, &mut failed).await?;
        failures.extend(failed.into_iter().map(|failure| format!("{base_url} {failure}")));
        servers.push((base_url.clone(), version, figures));
    } else {
        let labels: &[&str] = match args.server {
            Servers::Hearth => &["hearth"],
            Servers::Synapse => &["synapse"],
            Servers::Both => &["hearth", "synapse"],
        };
        for label in labels {
            let mut launched = if *label == "hearth" {
                let binary = launcher::hearth_binary(
                    args.hearth_bin.clone(),
                    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from),
                )
                .await?;
                launcher::start_hearth(&binary, peer_ca.as_deref()).await?
            } else {
                launcher::start_synapse(peer_ca.as_deref()).await?
            };
            println!(
                "{label}: started at {} in {} ms",
                launched.base_url,
                launched.startup.as_millis()
            );
            let ctx = Ctx::new(&launched.base_url, launched.registration.clone())?;
            let version = server_version(&ctx).await;
            let mut failed = Vec::new();
            let figures = measure(
                &ctx,
                Some(&mut launched),
                peer.as_ref(),
                &scenarios,
                &sizes,
                args.pin,
                &mut failed,
            )
            .await;
            failures.extend(failed.into_iter().map(|failure| format!("{label} {failure}")));
            launched.stop().await;
            servers.push(((*label).to_owned(), version, figures?));
        }
    }
    // S6 measures Hearth's code in-process, not a server: its figures go with Hearth's.
    let s6_profile = if scenarios.contains(&"S6") {
        let profile = args
            .s6_profile
            .clone()
            .unwrap_or_else(|| if args.smoke { "dev" } else { "bench" }.to_owned());
        println!("  S6 ... (cargo bench --profile {profile})");
        match bench::s6_state_resolution(&profile, args.smoke).await {
            Ok(found) => {
                for figure in &found {
                    println!("    {}: {:.1}", figure.metric, figure.value);
                }
                match servers.iter_mut().find(|(label, _, _)| label == "hearth") {
                    Some((_, _, figures)) => figures.extend(found),
                    None => servers.insert(0, ("hearth".to_owned(), "Hearth".to_owned(), found)),
                }
            }
            Err(error) => {
                println!("    S6 did not complete: {error:#}");
                failures.push(format!("hearth S6: {error:#}"));
            }
        }
        Some(profile)
    } else {
        None
    };
    let mut results = Results {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        date: utc_now().await,
        machine: machine(),
        sizes,
        pinned: args.pin,
        tool_profile: if cfg!(debug_assertions) { "dev" } else { "release" }.to_owned(),
        servers,
        failures,
        s6_profile,
        merged: Vec::new(),
    };
    if let Some(earlier) = &args.merge {
        merge(&mut results, earlier, &scenarios)?;
    }
    print!("{}", table(&results));
    for failure in &results.failures {
        println!("did not complete: {failure}");
    }
    if let Some(parent) = args.output.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.output, serde_json::to_vec_pretty(&results)?)
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!("results: {}", args.output.display());
    Ok(())
}

/// Which runs the `kept` scenarios of an earlier results file come from: each run that file
/// carried over names only the kept scenarios it measured (a scenario measured again since is
/// no longer its), and the file's own run (`own_run`) the kept ones no carried run names.
fn provenance(carried: Vec<Earlier>, mut own_run: Earlier, kept: &[String]) -> Vec<Earlier> {
    let mut runs: Vec<Earlier> = carried
        .into_iter()
        .filter_map(|mut run| {
            run.scenarios.retain(|scenario| kept.contains(scenario));
            (!run.scenarios.is_empty()).then_some(run)
        })
        .collect();
    own_run.scenarios = kept
        .iter()
        .filter(|scenario| !runs.iter().any(|run| run.scenarios.contains(scenario)))
        .cloned()
        .collect();
    if !own_run.scenarios.is_empty() {
        runs.push(own_run);
    }
    runs
}

/// Keeps the figures of `earlier` for the scenarios this run did not measure, per server, and
/// their sizes; the page then names both runs.
fn merge(results: &mut Results, earlier: &Path, scenarios: &[&str]) -> Result<()> {
    let old: Results = serde_json::from_slice(
        &std::fs::read(earlier).with_context(|| format!("reading {}", earlier.display()))?,
    )
    .with_context(|| format!("parsing {}", earlier.display()))?;
    // A server this run did not start keeps all its figures (a `--server hearth` run leaves
    // Synapse's as they were).
    let ran: Vec<String> = results.servers.iter().map(|(label, _, _)| label.clone()).collect();
    let mut kept = Vec::new();
    for (label, version, figures) in old.servers {
        let ran_again = ran.contains(&label);
        let figures: Vec<Figure> = figures
            .into_iter()
            .filter(|figure| !(ran_again && scenarios.contains(&figure.scenario.as_str())))
            .collect();
        for figure in &figures {
            if !kept.contains(&figure.scenario) {
                kept.push(figure.scenario.clone());
            }
        }
        match results.servers.iter_mut().find(|(known, _, _)| *known == label) {
            Some((_, _, current)) => {
                let mut merged = figures;
                merged.append(current);
                *current = merged;
            }
            None => results.servers.push((label, version, figures)),
        }
    }
    let sizes = &mut results.sizes;
    for scenario in &kept {
        match scenario.as_str() {
            "S1" => {
                (sizes.s1_messages, sizes.s1_senders) =
                    (old.sizes.s1_messages, old.sizes.s1_senders.clone())
            }
            "S2" => {
                (sizes.s2_clients, sizes.s2_rate, sizes.s2_seconds) =
                    (old.sizes.s2_clients, old.sizes.s2_rate, old.sizes.s2_seconds);
                sizes.s2_rooms = old.sizes.s2_rooms.clone();
            }
            "S3" => {
                (sizes.s3_rooms, sizes.s3_members, sizes.s3_history) =
                    (old.sizes.s3_rooms, old.sizes.s3_members, old.sizes.s3_history)
            }
            "S5" => {
                (sizes.s5_state, sizes.s5_messages) = (old.sizes.s5_state, old.sizes.s5_messages)
            }
            "S7" => sizes.s7_messages = old.sizes.s7_messages,
            _ => {}
        }
    }
    if kept.contains(&"S6".to_owned()) && results.s6_profile.is_none() {
        results.s6_profile = old.s6_profile;
    }
    // A failure reads "<server> <scenario>: <error>": kept with its scenario's figures, or when
    // this run did not start that server.
    for failure in old.failures {
        let mut words = failure.split_whitespace();
        let server = words.next().unwrap_or_default();
        let scenario = words.next().unwrap_or_default().trim_end_matches(':').to_owned();
        let server_kept = !ran.iter().any(|label| label == server);
        if server_kept && !kept.contains(&scenario) {
            kept.push(scenario.clone());
        }
        if kept.contains(&scenario) {
            results.failures.push(failure);
        }
    }
    let own_run = Earlier {
        command: old.command,
        date: old.date,
        machine: old.machine,
        tool_profile: old.tool_profile,
        scenarios: Vec::new(),
    };
    results.merged.extend(provenance(old.merged, own_run, &kept));
    Ok(())
}

/// Runs the scenarios against one server; S4, S5 and S7 only when this tool started it.
async fn measure(
    ctx: &Ctx,
    mut launched: Option<&mut Launched>,
    peer: Option<&Peer>,
    scenarios: &[&str],
    sizes: &Sizes,
    pinned: bool,
    failures: &mut Vec<String>,
) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    if pinned && let Some(pid) = launched.as_ref().and_then(|l| l.pid()) {
        pin(pid, 0).await?;
    }
    let footprint = scenarios.contains(&"S4");
    if footprint && let Some(launched) = launched.as_ref() {
        figures.push(Figure::new(
            "S4",
            "start-up, empty database: ms",
            launched.startup.as_secs_f64() * 1000.0,
            Better::Lower,
        ));
        tokio::time::sleep(Duration::from_secs(2)).await;
        if let Some(pid) = launched.pid() {
            figures.push(Figure::new(
                "S4",
                "resident memory idle: MiB",
                bench::rss_mib(pid)?,
                Better::Lower,
            ));
        }
    }
    // The footprint after load is read after S1 to S3 (the client load), before S5 and S7:
    // S7 restarts the server to read its database at rest.
    let mut after_load = None;
    for scenario in scenarios {
        if *scenario == "S6" {
            // Not a server scenario: run once, by `run`.
            continue;
        }
        if footprint
            && after_load.is_none()
            && matches!(*scenario, "S5" | "S7")
            && let Some(pid) = launched.as_ref().and_then(|l| l.pid())
        {
            after_load = Some(bench::rss_mib(pid)?);
        }
        println!("  {scenario} ...");
        let found = match *scenario {
            "S1" => bench::s1_send(ctx, sizes).await,
            "S2" => bench::s2_delivery(ctx, sizes).await,
            "S3" => bench::s3_initial_sync(ctx, sizes).await,
            "S5" => match (launched.as_ref(), peer) {
                (Some(launched), Some(peer)) => {
                    let target = bench::FederationTarget {
                        base_url: &launched.base_url,
                        server_name: &launched.server_name,
                    };
                    bench::s5_federation_ingest(ctx, sizes, peer, &target).await
                }
                _ => Ok(Vec::new()),
            },
            "S7" => match launched.as_mut() {
                Some(launched) => {
                    let found = bench::s7_disk(ctx, sizes, launched).await;
                    // The restarted server is a new process: pin it again.
                    if pinned && let Some(pid) = launched.pid() {
                        pin(pid, 0).await?;
                    }
                    found
                }
                None => Ok(Vec::new()),
            },
            _ => Ok(Vec::new()),
        };
        // A server that cannot complete a scenario (requests time out under the load) is a
        // result too: it is reported, and the other scenarios still run.
        let found = match found {
            Ok(found) => found,
            Err(error) => {
                println!("    {scenario} did not complete: {error:#}");
                failures.push(format!("{scenario}: {error:#}"));
                Vec::new()
            }
        };
        for figure in &found {
            println!("    {}: {:.1}", figure.metric, figure.value);
        }
        figures.extend(found);
    }
    if footprint && let Some(launched) = launched.as_mut() {
        let after_load = match after_load {
            Some(mib) => Some(mib),
            None => launched.pid().map(bench::rss_mib).transpose()?,
        };
        if let Some(mib) = after_load {
            figures.push(Figure::new(
                "S4",
                "resident memory after S1 to S3: MiB",
                mib,
                Better::Lower,
            ));
        }
        let bytes = bench::database_bytes(&launched.database_dir)?;
        launched.restart().await?;
        figures.push(Figure::new(
            "S4",
            format!("start-up with this run's data ({:.1} MiB): ms", bytes as f64 / 1048576.0),
            launched.startup.as_secs_f64() * 1000.0,
            Better::Lower,
        ));
    }
    Ok(figures)
}

/// Pins every thread of a process to one CPU with `taskset`.
async fn pin(pid: u32, cpu: u32) -> Result<()> {
    let status = tokio::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .context("running taskset")?;
    if !status.success() {
        bail!("taskset exited with {status}");
    }
    Ok(())
}

async fn server_version(ctx: &Ctx) -> String {
    let answer = ctx.get("/_matrix/federation/v1/version").await.ok();
    answer
        .and_then(|resp| {
            let server = resp.body.get("server")?;
            Some(format!("{} {}", server.get("name")?.as_str()?, server.get("version")?.as_str()?))
        })
        .unwrap_or_else(|| "unknown version".to_owned())
}

async fn utc_now() -> String {
    let output =
        tokio::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output().await;
    output
        .ok()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// CPU model, core count and memory, from `/proc`.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    // The machine's cores, not this process's (`--pin` leaves it one).
    let cores = cpuinfo.lines().filter(|line| line.starts_with("processor")).count();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1048576.0);
    format!("{model}, {cores} cores, {mem_gib:.0} GiB")
}

/// The comparison table: one row per figure, Hearth and Synapse side by side, and how many
/// times better Hearth is (below 1 means worse).
fn table(results: &Results) -> String {
    let mut rows: Vec<(String, String, Better)> = Vec::new();
    for (_, _, figures) in &results.servers {
        for figure in figures {
            if !rows.iter().any(|(s, m, _)| *s == figure.scenario && *m == figure.metric) {
                rows.push((figure.scenario.clone(), figure.metric.clone(), figure.better));
            }
        }
    }
    let value = |server: usize, scenario: &str, metric: &str| -> Option<f64> {
        results
            .servers
            .get(server)?
            .2
            .iter()
            .find(|f| f.scenario == scenario && f.metric == metric)
            .map(|f| f.value)
    };
    let names: Vec<&str> = results.servers.iter().map(|(label, _, _)| label.as_str()).collect();
    let mut out = String::new();
    let _ = write!(out, "| scenario | metric |");
    for name in &names {
        let _ = write!(out, " {name} |");
    }
    let compare = names.len() == 2;
    if compare {
        let _ = write!(out, " {} vs {} |", names[0], names[1]);
    }
    out.push('\n');
    let _ = write!(out, "| --- | --- |{}", " ---: |".repeat(names.len() + usize::from(compare)));
    out.push('\n');
    for (scenario, metric, better) in rows {
        let _ = write!(out, "| {scenario} | {metric} |");
        let values: Vec<Option<f64>> =
            (0..names.len()).map(|i| value(i, &scenario, &metric)).collect();
        for value in &values {
            match value {
                Some(value) => {
                    let _ = write!(out, " {value:.1} |");
                }
                None => out.push_str(" - |"),
            }
        }
        if compare {
            let ratio = match (values[0], values[1], better) {
                (Some(a), Some(b), Better::Higher) if b > 0.0 => Some(a / b),
                (Some(a), Some(b), Better::Lower) if a > 0.0 => Some(b / a),
                _ => None,
            };
            match ratio {
                Some(ratio) => {
                    let _ = write!(out, " {ratio:.1}x |");
                }
                None => out.push_str(" - |"),
            }
        }
        out.push('\n');
    }
    out
}

fn read_results(path: &Path) -> Result<Results> {
    serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))
}

fn docs(results_path: &Path, output: Option<PathBuf>, scale: &[PathBuf]) -> Result<()> {
    let results = read_results(results_path)?;
    let output =
        output.unwrap_or_else(|| launcher::workspace_root().join("docs").join("performance.md"));
    let mut page = String::new();
    page.push_str("# Performance\n\n");
    page.push_str("<!-- Generated by `hearth-bench docs` from the results of one run; do not edit by hand. -->\n\n");
    page.push_str(
        "Hearth and Synapse measured side by side by `hearth-bench` (in `conformance/`), in the same run, \
on the same machine, through the standard client-server API (S5: the server-server API, driven by a \
synthetic federation peer; S6: Hearth's state resolution in-process, which Synapse has no equivalent bench for). The last column says how many times \
better Hearth is (throughput: Hearth / Synapse; times, memory and bytes: Synapse / Hearth); below 1 means worse.\n\n",
    );
    let _ = writeln!(page, "- Date: {}", results.date);
    let _ = writeln!(page, "- Machine: {}", results.machine);
    for (label, version, _) in &results.servers {
        let _ = writeln!(page, "- {label}: {version}");
    }
    let _ = writeln!(
        page,
        "- Servers pinned to one core: {}",
        if results.pinned {
            "yes (server on CPU 0, load generator on CPU 1)"
        } else {
            "no (server and load generator share the cores)"
        }
    );
    let _ = writeln!(page, "- Sizes: {}", serde_json::to_string(&results.sizes)?);
    if !results.tool_profile.is_empty() {
        let _ =
            writeln!(page, "- Load generator built with the `{}` profile", results.tool_profile);
    }
    // The server binary of every run behind the page, as its command line named it.
    let commands = std::iter::once(results.command.as_str())
        .chain(results.merged.iter().map(|earlier| earlier.command.as_str()));
    let mut profiles: Vec<&str> = commands.filter_map(hearth_profile).collect();
    profiles.sort_unstable();
    profiles.dedup();
    for profile in profiles {
        let _ = writeln!(
            page,
            "- Hearth binary: built with the `{profile}` cargo profile{}",
            match profile {
                "debug" => " in at least one run (see Reproduce); a release build is faster",
                "release" => " (the shipped `dist` build adds whole-program optimisation)",
                _ => "",
            }
        );
    }
    if let Some(profile) = &results.s6_profile {
        let _ = writeln!(
            page,
            "- S6 benches built with the `{profile}` cargo profile{}",
            if profile == "dev" {
                " (dependencies optimised, ruma's authorization rules among them; Hearth's own code, its state resolution included, not)"
            } else {
                ""
            }
        );
    }
    for earlier in &results.merged {
        let _ = writeln!(
            page,
            "- {} from an earlier run: {} on {}, load generator built with `{}`",
            earlier.scenarios.join(", "),
            earlier.date,
            earlier.machine,
            earlier.tool_profile
        );
    }
    page.push_str("\n## Results\n\n");
    page.push_str(&table(&results));
    page.push_str(&s6_goal(&results));
    if !results.failures.is_empty() {
        page.push_str("\nScenarios a server could not complete (with the error the tool saw):\n\n");
        for failure in &results.failures {
            let _ = writeln!(page, "- {}", failure.replace('\n', " "));
        }
    }
    if !scale.is_empty() {
        page.push_str(&at_scale(scale)?);
    }
    page.push_str("\n## Reproduce\n\n```sh\n");
    for earlier in &results.merged {
        let _ = writeln!(page, "{}", reproducible(&earlier.command));
    }
    let _ = writeln!(page, "{}", reproducible(&results.command));
    let results_file =
        option_value(&results.command, "--output").unwrap_or("target/bench-results.json");
    let _ = writeln!(
        page,
        "cargo run --release -p conformance --bin hearth-bench -- docs --results {results_file}\n```\n"
    );
    page.push_str(SCENARIO_NOTES);
    std::fs::write(&output, page).with_context(|| format!("writing {}", output.display()))?;
    println!("wrote {}", output.display());
    Ok(())
}

/// The section of runs at larger sizes: per run its command, date, machine and sizes, and its
/// table.
fn at_scale(paths: &[PathBuf]) -> Result<String> {
    let mut out = String::from(
        "\n## At larger sizes\n\nRuns at sizes a side-by-side run does not reach in reasonable time (Synapse sets up about 50 joins or messages per second), so without a Synapse column unless the run had one.\n",
    );
    for path in paths {
        let results = read_results(path)?;
        let _ = writeln!(out, "\n`{}`\n", reproducible(&results.command).replace('\n', "` then `"));
        let _ = writeln!(
            out,
            "- {} on {}, pinned: {}; sizes: {}\n",
            results.date,
            results.machine,
            if results.pinned { "yes" } else { "no" },
            serde_json::to_string(&results.sizes)?
        );
        out.push_str(&table(&results));
        for failure in &results.failures {
            let _ = writeln!(out, "\n- did not complete: {}", failure.replace('\n', " "));
        }
    }
    Ok(out)
}

/// S6 against its goal (there is no Synapse figure to compare with).
fn s6_goal(results: &Results) -> String {
    let largest = bench::S6_SIZES[bench::S6_SIZES.len() - 1];
    let metric = format!("state resolution, {largest} conflicted state events: ms");
    let found = results
        .servers
        .iter()
        .flat_map(|(_, _, figures)| figures)
        .find(|figure| figure.scenario == "S6" && figure.metric == metric);
    match found {
        Some(figure) => format!(
            "\nS6 has no Synapse column: Synapse has no equivalent bench. Its goal is < 100 ms at {largest} conflicted state events on one core; measured {:.1} ms, so the goal is {}.\n",
            figure.value,
            if figure.value < 100.0 { "met" } else { "missed" }
        ),
        None => String::new(),
    }
}

/// The run's command line as a `cargo run` invocation.
/// The command line of a run as one to type in the workspace: a Hearth binary of a cargo
/// target directory is named by its profile, and built first.
fn reproducible(command: &str) -> String {
    let mut args: Vec<String> = command.split_whitespace().skip(1).map(str::to_owned).collect();
    let mut build = None;
    if let Some(index) = args.iter().position(|arg| arg == "--hearth-bin")
        && let Some(profile) = hearth_profile(command)
    {
        build = Some(match profile {
            "release" => "cargo build --release --bin hearth".to_owned(),
            "debug" => "cargo build --bin hearth".to_owned(),
            _ => format!("cargo build --profile {profile} --bin hearth"),
        });
        args[index + 1] = format!("target/{profile}/hearth");
    }
    let run =
        format!("cargo run --release -p conformance --bin hearth-bench -- {}", args.join(" "));
    match build {
        Some(build) => format!("{build}\n{run}"),
        None => run,
    }
}

/// The cargo profile of the Hearth binary a run's command line names (`--hearth-bin` in a
/// cargo target directory: `release`, `dist` or `debug`).
fn hearth_profile(command: &str) -> Option<&str> {
    let path = option_value(command, "--hearth-bin")?;
    let profile = path.strip_suffix("/hearth")?.rsplit('/').next()?;
    ["release", "dist", "debug"].contains(&profile).then_some(profile)
}

/// The value given to `option` on a command line.
fn option_value<'a>(command: &'a str, option: &str) -> Option<&'a str> {
    let mut args = command.split_whitespace();
    args.find(|arg| *arg == option)?;
    args.next()
}

const SCENARIO_NOTES: &str = "## Scenarios and goals

| scenario | what | goal |
| --- | --- | --- |
| S1 | send throughput: 1 and 10 concurrent senders, one room, 2,000 messages per run | ≥ 20x Synapse, p99 < 10 ms |
| S2 | delivery latency: clients long-polling `/sync` in one room, and spread over 100 rooms (the messages going to the rooms in turn), 50 messages/s; from the start of the send request to arrival in each client | p99 < 20 ms and ≥ 10x better than Synapse |
| S3 | initial sync of a user in many rooms with members and history: lazy members with timeline 1/5/20, and full member state | ≥ 10x Synapse with lazy members, never slower with full state |
| S4 | footprint: resident memory idle and after the client load of S1 to S3, start-up time to a first answer, empty and with the run's data | idle < 30 MiB, start-up < 1 s empty |
| S5 | federation ingest: a synthetic peer (its own key, its keys served over TLS with its own CA) joins a public room by `make_join`/`send_join` v2, adds state events to it, then sends messages in transactions of 50 (`PUT /send/{txnId}`, every PDU and every transaction signed beforehand), the next once the server shows the last PDU of the one before (Synapse answers before processing and prunes a long queue); PDUs per second until the server shows the last one, counting only what is in the room then, and the PDUs that are not; then a second user of the peer joins the grown room (`make_join` + `send_join` v2, the whole state and auth chain in the answer) | ≥ 10,000 PDUs/s on one core, the join < 5 s; the room size the issue names is 30,000 state events (`--s5-state`) |
| S6 | state resolution: criterion benches (`benches/state_res.rs`) of `Rooms::resolve_states` on generated, signed room version 11 forks of 10, 1,000 and 10,000 conflicted state events (two branches: power levels, then every member renamed in one and leaving in the other), events read from RocksDB | < 100 ms at 10,000 on one core |
| S7 | disk: database bytes per message, at rest (the server is stopped gracefully and started again before each reading, so a write-ahead log of the moment is not counted) | ≤ 1 KiB per message and ≤ 1/3 of Synapse |

Synapse runs on SQLite with every rate limit raised (the launcher's configuration), Hearth on its embedded RocksDB; both start on a fresh data directory.

S3 at 300 rooms of 300 members and S4/S7 at 1M events need set-up times that Synapse cannot reach in a run of reasonable length (about 50 joins or messages per second). They are measured for Hearth alone (`--server hearth` with `--s3-rooms 300 --s3-members 300`, or `--s7-messages 1000000`, whose S4 start-up is then on that database) and shown under \"At larger sizes\" when the page is generated with `docs --scale <results>`.
";

#[cfg(test)]
mod tests {
    use super::{Earlier, Results, merge, provenance};
    use conformance::bench::{Better, Figure, Sizes};

    fn results(servers: &[(&str, &[&str])], failures: &[&str]) -> Results {
        Results {
            command: "bench".into(),
            date: String::new(),
            machine: String::new(),
            sizes: Sizes::default(),
            pinned: true,
            tool_profile: String::new(),
            servers: servers
                .iter()
                .map(|(label, scenarios)| {
                    let figures = scenarios
                        .iter()
                        .map(|scenario| Figure::new(scenario, "x", 1.0, Better::Lower))
                        .collect();
                    ((*label).to_owned(), String::new(), figures)
                })
                .collect(),
            failures: failures.iter().map(|failure| (*failure).to_owned()).collect(),
            s6_profile: None,
            merged: Vec::new(),
        }
    }

    #[test]
    fn a_run_of_one_server_keeps_the_others_figures_and_failures() {
        let dir = tempfile::tempdir().unwrap();
        let earlier = dir.path().join("earlier.json");
        let old = results(
            &[("hearth", &["S1", "S2"]), ("synapse", &["S1"])],
            &["synapse S2: timed out", "hearth S3: broke"],
        );
        std::fs::write(&earlier, serde_json::to_vec(&old).unwrap()).unwrap();
        // Hearth alone measured S2 and S3 again.
        let mut new = results(&[("hearth", &["S2", "S3"])], &[]);
        merge(&mut new, &earlier, &["S2", "S3"]).unwrap();
        let scenarios = |label: &str| -> Vec<String> {
            let (_, _, figures) = new.servers.iter().find(|(l, _, _)| l == label).unwrap();
            figures.iter().map(|figure| figure.scenario.clone()).collect()
        };
        assert_eq!(scenarios("hearth"), ["S1", "S2", "S3"]);
        assert_eq!(scenarios("synapse"), ["S1"]);
        // Synapse's S2 failure stays (Synapse did not run again); Hearth's S3 one is replaced.
        assert_eq!(new.failures, ["synapse S2: timed out"]);
    }

    fn run(command: &str, scenarios: &[&str]) -> Earlier {
        Earlier {
            command: command.to_owned(),
            date: String::new(),
            machine: String::new(),
            tool_profile: String::new(),
            scenarios: scenarios.iter().map(|scenario| scenario.to_string()).collect(),
        }
    }

    fn named(runs: &[Earlier]) -> Vec<(&str, Vec<&str>)> {
        runs.iter()
            .map(|run| (run.command.as_str(), run.scenarios.iter().map(String::as_str).collect()))
            .collect()
    }

    fn strings(scenarios: &[&str]) -> Vec<String> {
        scenarios.iter().map(|scenario| scenario.to_string()).collect()
    }

    #[test]
    fn a_scenario_measured_again_is_no_longer_the_earlier_runs() {
        // Run 2 measured S3 and S7 and carried the rest from run 1. Run 3 measures all but S6
        // again: only S6 is still run 1's.
        let carried = vec![run("one", &["S1", "S2", "S4", "S5", "S6"])];
        let runs = provenance(carried, run("two", &[]), &strings(&["S6"]));
        assert_eq!(named(&runs), [("one", vec!["S6"])]);
        // Run 4 measures S3, S5 and S7 again, merging run 3's file: S6 stays run 1's, and
        // S1, S2 and S4 are run 3's own.
        let runs = provenance(runs, run("three", &[]), &strings(&["S6", "S4", "S1", "S2"]));
        assert_eq!(named(&runs), [("one", vec!["S6"]), ("three", vec!["S4", "S1", "S2"])]);
    }
}
