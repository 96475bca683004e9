//! The results table: medians, ratios and latency from the files `bench/run.sh` writes.
//!
//! Inputs in the results directory:
//! - `sat.tsv`: `scenario<TAB>round<TAB>rps<TAB>bad` per saturation run (`bad` = non-2xx,
//!   socket errors or failed gRPC requests);
//! - `lat.jsonl`: one `tokengate-bench load` JSON line per fixed-rate run (`label` = scenario);
//! - `cpu.tsv`: `scenario<TAB>round<TAB>envoy<TAB>authz<TAB>standin`, CPU µs per request of
//!   each process (from /proc/PID/stat around each saturation run: where the time goes);
//! - `extra.txt`: free-form lines (single-flight, RSS) copied verbatim.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;

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
        "tokengate_miss",
        "Envoy + ext_authz → tokengate, cache miss (TokenReview +2 ms)",
    ),
    ("check_null", "Check RPC alone → null server"),
    ("check_tokengate", "Check RPC alone → tokengate, cache hit"),
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

/// Prints the Markdown report for `dir` on stdout.
pub fn print(dir: &Path) -> Result<()> {
    let mut runs: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut bad: BTreeMap<String, u64> = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("sat.tsv")) {
        for line in text.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() < 4 {
                continue;
            }
            if let Ok(rps) = f[2].parse::<f64>() {
                runs.entry(f[0].to_string()).or_default().push(rps);
            }
            *bad.entry(f[0].to_string()).or_default() += f[3].parse::<u64>().unwrap_or(0);
        }
    }
    // Latency: possibly several runs per scenario; keep the median p50 and p99 (and the list).
    let mut lat_runs: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("lat.jsonl")) {
        for line in text.lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if let Some(l) = v["label"].as_str() {
                    lat_runs.entry(l.to_string()).or_default().push(v);
                }
            }
        }
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
    if let Ok(text) = std::fs::read_to_string(dir.join("cpu.tsv")) {
        for line in text.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            let entry = cpu.entry(f[0].to_string()).or_default();
            for (i, column) in entry.iter_mut().enumerate() {
                if let Some(v) = f.get(2 + i) {
                    column.push(v.parse().unwrap_or(0.0));
                }
            }
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
