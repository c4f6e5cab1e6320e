//! Runs the registered tests with bounded concurrency and a per-test timeout, applies the
//! expected-failures list, prints one line per test and builds the JSON report.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use futures::StreamExt;
use futures::future::BoxFuture;

use crate::client::Ctx;
use crate::report::{Outcome, Report, TestResult};

/// One conformance test.
pub(crate) struct Test {
    /// `area::behaviour`, unique; the area is the spec section (module) it belongs to.
    pub(crate) name: String,
    /// The spec paragraph it checks.
    pub(crate) spec: &'static str,
    /// When Synapse deliberately differs from the spec here, the spec quote saying so; the test
    /// then checks what Synapse does and the deviation is listed in the output and report.
    pub(crate) deviation: Option<&'static str>,
    pub(crate) run: fn(Ctx) -> BoxFuture<'static, Result<()>>,
}

impl Test {
    pub(crate) fn area(&self) -> &str {
        self.name.split("::").next().unwrap_or(&self.name)
    }
}

/// Declares tests of a module: `tests![area; name => "spec-anchor", fn_name; ...]`.
/// The anchor is appended to the client-server API URL of spec v1.16.
#[macro_export]
macro_rules! tests {
    ($area:literal; $($func:ident => $anchor:literal $(, deviation = $deviation:literal)?);* $(;)?) => {
        pub(crate) fn tests() -> Vec<$crate::runner::Test> {
            vec![$(
                $crate::runner::Test {
                    name: format!("{}::{}", $area, stringify!($func)),
                    spec: concat!("https://spec.matrix.org/v1.16/client-server-api/#", $anchor),
                    deviation: $crate::tests!(@deviation $($deviation)?),
                    run: |ctx| Box::pin($func(ctx)),
                },
            )*]
        }
    };
    (@deviation) => { None };
    (@deviation $deviation:literal) => { Some($deviation) };
}

/// The expected-failures list: test name to the reason it is a known gap.
pub(crate) fn read_expected_failures(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading expected failures {}", path.display()))?;
    let mut known = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, reason) = match line.split_once('#') {
            Some((name, reason)) => (name.trim(), reason.trim()),
            None => (line, "no reason given"),
        };
        known.insert(name.to_owned(), reason.to_owned());
    }
    Ok(known)
}

/// Runs the tests and returns the report; printing happens as results come in.
pub(crate) async fn run(
    ctx: Ctx,
    tests: Vec<Test>,
    expected_failures: &BTreeMap<String, String>,
    concurrency: usize,
    timeout: Duration,
) -> Vec<TestResult> {
    let results: Vec<TestResult> = futures::stream::iter(tests)
        .map(|test| {
            let ctx = ctx.clone();
            async move {
                let started = Instant::now();
                let outcome = match tokio::time::timeout(timeout, (test.run)(ctx)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(format!("{error:#}")),
                    Err(_) => Err(format!("timed out after {} s", timeout.as_secs())),
                };
                let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                record(
                    Finished {
                        name: test.name.clone(),
                        area: test.area().to_owned(),
                        spec: test.spec.to_owned(),
                        deviation: test.deviation.map(str::to_owned),
                        duration_ms,
                    },
                    outcome,
                    expected_failures,
                )
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut results = results;
    results.sort_by(|a, b| a.name.cmp(&b.name));
    results
}

/// A test that has run, before its outcome is classified.
pub(crate) struct Finished {
    pub(crate) name: String,
    pub(crate) area: String,
    pub(crate) spec: String,
    pub(crate) deviation: Option<String>,
    pub(crate) duration_ms: u64,
}

/// Applies the expected-failures list to an outcome, prints the test's line, and returns its
/// result for the report.
pub(crate) fn record(
    test: Finished,
    outcome: Result<(), String>,
    expected_failures: &BTreeMap<String, String>,
) -> TestResult {
    let known_gap = expected_failures.get(&test.name);
    let (outcome, reason) = match (outcome, known_gap) {
        (Ok(()), None) => (Outcome::Pass, None),
        (Ok(()), Some(_)) => {
            println!("NOTE {} passes now: remove it from the expected-failures list", test.name);
            (Outcome::Pass, None)
        }
        (Err(error), None) => (Outcome::Fail, Some(error)),
        (Err(error), Some(gap)) => {
            (Outcome::Skip, Some(format!("known gap in this server: {gap} (error: {error})")))
        }
    };
    let line = match (&outcome, &reason) {
        (Outcome::Pass, _) => format!("PASS {}", test.name),
        (Outcome::Fail, Some(reason)) => format!("FAIL {}: {reason}", test.name),
        (Outcome::Skip, Some(reason)) => format!("SKIP {}: {reason}", test.name),
        (_, None) => format!("{outcome:?} {}", test.name),
    };
    match &test.deviation {
        Some(deviation) => println!("{line} [synapse-deviation: {deviation}]"),
        None => println!("{line}"),
    }
    TestResult {
        name: test.name,
        area: test.area,
        spec: test.spec,
        outcome,
        reason,
        deviation: test.deviation,
        duration_ms: test.duration_ms,
    }
}

/// Prints the closing lines: deviations, then exactly `N passed, M failed, K skipped`.
pub(crate) fn print_summary(report: &Report) {
    let deviations: Vec<&TestResult> =
        report.tests.iter().filter(|test| test.deviation.is_some()).collect();
    if !deviations.is_empty() {
        println!(
            "synapse deviations (Synapse differs from the spec text; these tests accept both):"
        );
        for test in deviations {
            println!("  {}: {}", test.name, test.deviation.as_deref().unwrap_or_default());
        }
    }
    println!("{} passed, {} failed, {} skipped", report.passed, report.failed, report.skipped);
}
