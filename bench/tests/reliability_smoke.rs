//! Smoke test of the reliability harness (`bench/src/bin/reliability.rs`) with tiny numbers:
//! every phase runs against this workspace's debug tokengate and the harness exits 0, which
//! it does only when no verdict was wrong (no false allow, no allow with another identity, no
//! valid token denied during an API fault). The real figures come from `reliability/run.sh`.

use std::path::PathBuf;
use std::process::Command;

/// `target/debug/tokengate`, built by the same `cargo nextest run --workspace`.
fn tokengate() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let debug = exe.parent()?.parent()?;
    let bin = debug.join("tokengate");
    bin.is_file().then_some(bin)
}

#[test]
fn harness_runs_every_phase_without_a_wrong_verdict() {
    let Some(bin) = tokengate() else {
        panic!("target/debug/tokengate not built: run `cargo build -p tokengate` (nextest --workspace builds it)");
    };
    let out = Command::new(env!("CARGO_BIN_EXE_reliability"))
        .arg("--tokengate")
        .arg(&bin)
        .args([
            "--checks",
            "1500",
            "--concurrency",
            "32",
            "--connections",
            "2",
            "--flood",
            "200",
            "--resets",
            "100",
            "--idle",
            "20",
            "--fault-kinds",
            "429date,down",
            "--fault-window",
            "600ms",
            "--soak",
            "2s",
            "--soak-rate",
            "200",
            "--reload-every",
            "1s",
        ])
        .output()
        .expect("run the harness");
    let report = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{report}\n{log}",
        out.status
    );
    for heading in [
        "### 1. Randomized Checks",
        "### 2. Forged flood",
        "### 3. Idle and slow",
        "### 4. API-server fault cycle",
        "### 5. Soak",
    ] {
        assert!(report.contains(heading), "{heading} missing:\n{report}");
    }
    assert!(report.contains("| **0** | **0** |"), "{report}");
    assert!(report.contains("Verdict violations (false allows, allows with another identity, valid tokens denied during faults): **0**"), "{report}");
}
