//! `demo/run.sh`, the README's first command, run as a user would (with the binaries this
//! build already produced, so it does not start a nested cargo build). The script checks
//! every answer itself and exits non-zero on a surprise; this test also checks the
//! transcript and that it leaves no process behind.

use std::path::PathBuf;
use std::process::Command;

/// Where cargo put this build's binaries (tokengate's own; the workspace's others sit beside).
fn bin_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_tokengate"))
        .parent()
        .unwrap()
        .to_path_buf();
    for bin in ["kube-standin", "echo-upstream"] {
        assert!(
            dir.join(bin).is_file(),
            "{} missing: build the workspace binaries first \
             (`cargo build --workspace --bins`; ./scripts/test.sh does)",
            dir.join(bin).display()
        );
    }
    dir
}

#[test]
fn demo_prints_the_seeds_transcript() {
    let out = Command::new(testkit::workspace_root().join("demo/run.sh"))
        .env("DEMO_BIN_DIR", bin_dir())
        .env_remove("DEMO_KEEP")
        .output()
        .expect("run demo/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n--- stderr ---\n{stderr}"
    );
    let expected = [
        "-> HTTP 401  reason=missing_token   [ok]",
        "WWW-Authenticate: Bearer",
        "-> HTTP 403  reason=malformed_token   [ok]",
        "-> HTTP 200   [ok]",
        "data-store says: authenticated as system:serviceaccount:api:api",
        "x-k8s-pod-name: api-7d9f6",
        "-> HTTP 403  reason=wrong_audience   [ok]",
        "All answers as expected",
    ];
    let mut rest: &str = &stdout;
    for line in expected {
        let at = rest
            .find(line)
            .unwrap_or_else(|| panic!("transcript lacks {line:?} (in order):\n{stdout}"));
        rest = &rest[at + line.len()..];
    }
    // The forged identity header never reached the data-store.
    assert!(!stdout.contains("x-k8s-sa-user: system:serviceaccount:kube-system:admin"));
    assert!(!stdout.contains("UNEXPECTED"));

    // Everything was stopped on exit: the ports it announced are closed again.
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("tokengate 127.0.0.1:"))
        .expect("ports line");
    let addrs: Vec<std::net::SocketAddr> = line
        .split([' ', ','])
        .filter_map(|w| w.trim_start_matches("http://").parse().ok())
        .collect();
    assert_eq!(addrs.len(), 3, "{line}");
    for addr in addrs {
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "{addr} still accepts connections after the demo exited"
        );
    }
}
