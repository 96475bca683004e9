//! The results table: medians, ratios and latency from the files `bench/run.sh` writes.
//!
//! Inputs in the results directory:
//! - `sat.tsv`: `scenario<TAB>round<TAB>rps<TAB>bad` per saturation run (`bad` = non-2xx,
//!   socket errors or failed gRPC requests);
//! - `lat.jsonl`: one `tokengate-bench load` JSON line per fixed-rate run (`label` = scenario);
//! - `cpu.tsv`: `scenario<TAB>round<TAB>envoy<TAB>authz<TAB>standin`, CPU µs per request of
//!   each process (from /proc/PID/stat around each saturation run: where the time goes);
//! - `extra.txt`: free-form lines (single-flight, RSS) copied verbatim.
//!
//! A missing file means those runs were not made; a sample that is there but does not parse
//! fails the report (naming file and line) rather than entering a median as 0.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

/// Scenario keys in table order, with the row title.
const SCENARIOS: &[(&str, &str)] = &[
    ("noauth", "Envoy, no auth (direct_response)"),
    ("jwt_nocache", "Envoy + jwt_authn, no JWT cache"),
    ("jwt_cache", "Envoy + jwt_authn, JWT cache"),
    ("extauthz_null", "Envoy + ext_authz → null server"),
    (
        "extauthz_null_hdrs",
        "Envoy + ext_authz → null server answering with 7 identity headers",
    ),
    ("tokengate_hit", "Envoy + ext_authz → tokengate, cache hit"),
    (
        "tokengate_hit_http",
        "Envoy + ext_authz http_service (HTTP/1.1) → tokengate, cache hit",
    ),
    (
        "tokengate_hit_h2c",
        "Envoy + ext_authz http_service (h2c) → tokengate, cache hit",
    ),
    (
        "tokengate_miss",
        "Envoy + ext_authz → tokengate, cache miss (TokenReview +2 ms)",
    ),
    (
        "tokengate_miss_local",
        "Envoy + ext_authz → tokengate, cache miss, `verification: local`",
    ),
    ("check_null", "Check RPC alone → null server"),
    ("check_tokengate", "Check RPC alone → tokengate, cache hit"),
    (
        "check_tokengate_peer",
        "Check RPC alone → tokengate, cache hit, `require_peer` (mTLS peer checked)",
    ),
];

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

/// One saturation run (a line of `sat.tsv`).
#[derive(Debug, PartialEq)]
struct SatRun {
    scenario: String,
    rps: f64,
    bad: u64,
}

fn sat_run(line: &str) -> Result<SatRun> {
    let [scenario, _round, rps, bad] = fields(line)?;
    Ok(SatRun {
        scenario: scenario.to_string(),
        rps: number("rps", rps)?,
        bad: count("bad", bad)?,
    })
}

/// CPU µs per request of Envoy, the authz server and the stand-in (a line of `cpu.tsv`).
#[derive(Debug, PartialEq)]
struct CpuRun {
    scenario: String,
    us_per_request: [f64; 3],
}

fn cpu_run(line: &str) -> Result<CpuRun> {
    let [scenario, _round, envoy, authz, standin] = fields(line)?;
    Ok(CpuRun {
        scenario: scenario.to_string(),
        us_per_request: [
            number("envoy", envoy)?,
            number("authz", authz)?,
            number("standin", standin)?,
        ],
    })
}

/// One fixed-rate run (a line of `lat.jsonl`): its label and the JSON, checked to carry every
/// field the report reads.
fn lat_run(line: &str) -> Result<(String, serde_json::Value)> {
    let v: serde_json::Value = serde_json::from_str(line).context("not JSON")?;
    let label = v["label"].as_str().ok_or_else(|| anyhow!("no label"))?;
    for field in ["target_rps", "p50_us", "p99_us"] {
        if !v[field].as_f64().is_some_and(f64::is_finite) {
            bail!("{field} is not a number");
        }
    }
    if v["errors"].as_u64().is_none() {
        bail!("errors is not a count");
    }
    Ok((label.to_string(), v))
}

/// The tab-separated fields of `line`, exactly `N` of them.
fn fields<const N: usize>(line: &str) -> Result<[&str; N]> {
    let f: Vec<&str> = line.split('\t').collect();
    let n = f.len();
    f.try_into()
        .map_err(|_| anyhow!("{n} tab-separated fields, expected {N}"))
}

/// A non-negative number (a NaN or infinite rate is a broken sample, not a value).
fn number(what: &str, s: &str) -> Result<f64> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => bail!("{what} {s:?} is not a non-negative number"),
    }
}

/// A count.
fn count(what: &str, s: &str) -> Result<u64> {
    s.parse()
        .map_err(|_| anyhow!("{what} {s:?} is not a count"))
}

/// The rows of `dir/name`, one per non-empty line; none if the file does not exist.
fn rows<T>(dir: &Path, name: &str, parse: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    let path = dir.join(name);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    parse_rows(name, &text, parse)
}

fn parse_rows<T>(name: &str, text: &str, parse: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| parse(line).with_context(|| format!("{name} line {}: {line:?}", i + 1)))
        .collect()
}

/// Prints the Markdown report for `dir` on stdout.
pub fn print(dir: &Path) -> Result<()> {
    let mut runs: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut bad: BTreeMap<String, u64> = BTreeMap::new();
    for run in rows(dir, "sat.tsv", sat_run)? {
        runs.entry(run.scenario.clone()).or_default().push(run.rps);
        *bad.entry(run.scenario).or_default() += run.bad;
    }
    // Latency: possibly several runs per scenario; keep the median p50 and p99 (and the list).
    let mut lat_runs: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for (label, run) in rows(dir, "lat.jsonl", lat_run)? {
        lat_runs.entry(label).or_default().push(run);
    }
    let lat: BTreeMap<String, serde_json::Value> = lat_runs
        .iter()
        .map(|(k, runs)| {
            let pick = |field: &str| {
                let mut v: Vec<f64> = runs.iter().filter_map(|r| r[field].as_f64()).collect();
                median(&mut v)
            };
            let p99s: Vec<String> = runs.iter().map(|r| format!("{}", r["p99_us"])).collect();
            let errors: u64 = runs.iter().filter_map(|r| r["errors"].as_u64()).sum();
            let summary = serde_json::json!({
                "p50_us": pick("p50_us").round() as u64,
                "p99_us": pick("p99_us").round() as u64,
                "p99_runs": p99s.join(" / "),
                "errors": errors,
                "target_rps": runs[0]["target_rps"],
            });
            (k.clone(), summary)
        })
        .collect();
    let mut cpu: BTreeMap<String, [Vec<f64>; 3]> = BTreeMap::new();
    for run in rows(dir, "cpu.tsv", cpu_run)? {
        let entry = cpu.entry(run.scenario).or_default();
        for (column, v) in entry.iter_mut().zip(run.us_per_request) {
            column.push(v);
        }
    }
    let medians: BTreeMap<String, f64> = runs
        .iter()
        .map(|(k, v)| (k.clone(), median(&mut v.clone())))
        .collect();
    let m = |k: &str| medians.get(k).copied();
    let p99 = |k: &str| lat.get(k).and_then(|v| v["p99_us"].as_f64());
    let rate = lat
        .values()
        .next()
        .and_then(|v| v["target_rps"].as_f64())
        .unwrap_or(0.0);

    println!("| scenario | rps (median) | runs | ×no auth | ×jwt no cache | p50 µs @{rate:.0} rps | p99 µs | p99 − no auth p99 (µs) | CPU µs/req: Envoy | authz | API stand-in | errors |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (key, title) in SCENARIOS {
        let Some(med) = m(key) else { continue };
        let list = runs[*key]
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" / ");
        let (p50, p99v, added) = match lat.get(*key) {
            Some(v) => (
                format!("{}", v["p50_us"]),
                if lat_runs.get(*key).is_some_and(|r| r.len() > 1) {
                    format!("{} ({})", v["p99_us"], v["p99_runs"].as_str().unwrap_or(""))
                } else {
                    format!("{}", v["p99_us"])
                },
                match (p99(key), p99("noauth")) {
                    (Some(a), Some(b)) if !key.starts_with("check_") => format!("{:+.0}", a - b),
                    _ => "–".into(),
                },
            ),
            None => ("–".into(), "–".into(), "–".into()),
        };
        let lat_errors = lat
            .get(*key)
            .and_then(|v| v["errors"].as_u64())
            .unwrap_or(0);
        let (vs_noauth, vs_jwt) = if key.starts_with("check_") {
            ("–".to_string(), "–".to_string())
        } else {
            (
                ratio(Some(med), m("noauth")),
                ratio(Some(med), m("jwt_nocache")),
            )
        };
        let cpu_cols: Vec<String> = (0..3)
            .map(|i| {
                let v = cpu.get(*key).map_or(0.0, |c| median(&mut c[i].clone()));
                // Under 0.5 µs/request is idle background (timers), not work for this scenario.
                if v >= 0.5 {
                    format!("{v:.1}")
                } else {
                    "–".into()
                }
            })
            .collect();
        println!(
            "| {title} | {med:.0} | {list} | {vs_noauth} | {vs_jwt} | {p50} | {p99v} | {added} | {} | {} | {} | {} |",
            cpu_cols[0],
            cpu_cols[1],
            cpu_cols[2],
            bad.get(*key).copied().unwrap_or(0) + lat_errors
        );
    }
    println!();
    println!(
        "- tokengate cache hit ÷ null server (through Envoy): {} (target ≥ 0.95×)",
        ratio(m("tokengate_hit"), m("extauthz_null"))
    );
    println!(
        "- tokengate cache hit ÷ null server answering with the same identity headers: {}",
        ratio(m("tokengate_hit"), m("extauthz_null_hdrs"))
    );
    println!(
        "- tokengate ÷ null server (Check RPC alone): {}",
        ratio(m("check_tokengate"), m("check_null"))
    );
    println!(
        "- Envoy + tokengate (hit) ÷ jwt_authn without cache: {} (stretch goal ≥ 1.00×)",
        ratio(m("tokengate_hit"), m("jwt_nocache"))
    );
    // Issue 11: the same tokengate through Envoy's HTTP ext_authz (http_service) against gRPC:
    // requests/s, Envoy's and tokengate's CPU per request, median p50/p99 at the fixed rate.
    let cpu_col = |k: &str, i: usize| {
        cpu.get(k)
            .map(|c| median(&mut c[i].clone()))
            .map_or("–".into(), |v| format!("{v:.1}"))
    };
    let lat_of = |k: &str, f: &str| {
        lat.get(k)
            .and_then(|v| v[f].as_f64())
            .map_or("–".into(), |v| format!("{v:.0}"))
    };
    for (key, what) in [
        ("tokengate_hit_http", "HTTP/1.1"),
        ("tokengate_hit_h2c", "h2c"),
    ] {
        if m(key).is_none() || m("tokengate_hit").is_none() {
            continue;
        }
        println!(
            "- Envoy http_service ({what}) ÷ gRPC ext_authz, same tokengate: {} rps; Envoy CPU µs/req {} vs {}; tokengate {} vs {}; p50 {} vs {} µs, p99 {} vs {} µs",
            ratio(m(key), m("tokengate_hit")),
            cpu_col(key, 0),
            cpu_col("tokengate_hit", 0),
            cpu_col(key, 1),
            cpu_col("tokengate_hit", 1),
            lat_of(key, "p50_us"),
            lat_of("tokengate_hit", "p50_us"),
            lat_of(key, "p99_us"),
            lat_of("tokengate_hit", "p99_us"),
        );
    }
    // Issue 9: a local-mode miss against a hit (rps and tokengate's CPU per Check) and against
    // a TokenReview-mode miss.
    let authz_cpu = |k: &str| {
        cpu.get(k)
            .map(|c| median(&mut c[1].clone()))
            .filter(|v| *v > 0.0)
    };
    if m("check_tokengate_peer").is_some() {
        println!(
            "- cache hit with `require_peer` ÷ plain cache hit (Check RPC alone, same tokengate): {} of the requests/s; tokengate CPU per Check {} ({} vs {} µs; target within 5%)",
            ratio(m("check_tokengate_peer"), m("check_tokengate")),
            ratio(authz_cpu("check_tokengate_peer"), authz_cpu("check_tokengate")),
            authz_cpu("check_tokengate_peer").map_or("–".into(), |v| format!("{v:.1}")),
            authz_cpu("check_tokengate").map_or("–".into(), |v| format!("{v:.1}")),
        );
    }
    if m("tokengate_miss_local").is_some() {
        println!(
            "- local cache miss ÷ cache hit (through Envoy): {} of the requests/s; tokengate CPU per Check {} ({} vs {} µs; target ≤ 2.00×)",
            ratio(m("tokengate_miss_local"), m("tokengate_hit")),
            ratio(authz_cpu("tokengate_miss_local"), authz_cpu("tokengate_hit")),
            authz_cpu("tokengate_miss_local").map_or("–".into(), |v| format!("{v:.1}")),
            authz_cpu("tokengate_hit").map_or("–".into(), |v| format!("{v:.1}")),
        );
        println!(
            "- local cache miss ÷ TokenReview cache miss: {} of the requests/s; tokengate CPU per Check {}",
            ratio(m("tokengate_miss_local"), m("tokengate_miss")),
            ratio(authz_cpu("tokengate_miss_local"), authz_cpu("tokengate_miss")),
        );
    }
    if let (Some(a), Some(b), Some(c)) = (p99("tokengate_hit"), p99("noauth"), p99("extauthz_null"))
    {
        println!(
            "- tokengate added p99 at {rate:.0} rps: {:+.0} µs vs no auth, {:+.0} µs vs null server (target < 500 µs)",
            a - b,
            a - c
        );
    }
    if let Ok(extra) = std::fs::read_to_string(dir.join("extra.txt")) {
        for line in extra.lines().filter(|l| !l.trim().is_empty()) {
            println!("- {line}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn samples_parse_and_blank_lines_are_skipped() {
        let sat = parse_rows(
            "sat.tsv",
            "noauth\t1\t1234.5\t0\n\nnoauth\t2\t1300\t3\n",
            sat_run,
        );
        assert_eq!(
            sat.unwrap(),
            vec![
                SatRun {
                    scenario: "noauth".into(),
                    rps: 1234.5,
                    bad: 0
                },
                SatRun {
                    scenario: "noauth".into(),
                    rps: 1300.0,
                    bad: 3
                },
            ]
        );
        let cpu = parse_rows("cpu.tsv", "noauth\t1\t10.5\t0.0\t1.2\n", cpu_run).unwrap();
        assert_eq!(cpu[0].us_per_request, [10.5, 0.0, 1.2]);
        let line = r#"{"label":"noauth","target_rps":2000,"errors":0,"p50_us":80,"p99_us":300}"#;
        let lat = parse_rows("lat.jsonl", line, lat_run).unwrap();
        assert_eq!(lat[0].0, "noauth");
    }

    #[test]
    fn a_sample_that_does_not_parse_fails_the_report() {
        let e = err(parse_rows(
            "sat.tsv",
            "noauth\t1\t1000\t0\nnoauth\t2\t\t0\n",
            sat_run,
        ));
        assert!(e.contains("sat.tsv line 2") && e.contains("rps"), "{e}");
        let e = err(parse_rows("sat.tsv", "noauth\t1\t1000\tmany\n", sat_run));
        assert!(e.contains("bad \"many\""), "{e}");
        let e = err(parse_rows("sat.tsv", "noauth\t1\tnan\t0\n", sat_run));
        assert!(e.contains("rps \"nan\""), "{e}");
        let e = err(parse_rows("sat.tsv", "noauth\t1\t1000\n", sat_run));
        assert!(e.contains("3 tab-separated fields, expected 4"), "{e}");
        let e = err(parse_rows("cpu.tsv", "noauth\t1\t10.5\t-\t1.2\n", cpu_run));
        assert!(
            e.contains("cpu.tsv line 1") && e.contains("authz \"-\""),
            "{e}"
        );
        let e = err(parse_rows("cpu.tsv", "noauth\t1\t10.5\n", cpu_run));
        assert!(e.contains("expected 5"), "{e}");
        let e = err(parse_rows("lat.jsonl", "{\"label\":\"noauth\"", lat_run));
        assert!(
            e.contains("lat.jsonl line 1") && e.contains("not JSON"),
            "{e}"
        );
        let no_p99 = r#"{"label":"noauth","target_rps":2000,"errors":0,"p50_us":80}"#;
        let e = err(parse_rows("lat.jsonl", no_p99, lat_run));
        assert!(e.contains("p99_us is not a number"), "{e}");
    }

    #[test]
    fn a_missing_file_is_no_runs() {
        let dir = std::env::temp_dir().join("tokengate-bench-report-no-such-dir");
        assert!(rows(&dir, "sat.tsv", sat_run).unwrap().is_empty());
    }
}
