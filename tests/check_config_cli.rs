//! `tokengate check-config` and `--version`, run as the built binary.

use std::process::Command;

fn tokengate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tokengate"))
}

fn check_config(yaml: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokengate.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = tokengate()
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("running tokengate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn valid_config_passes() {
    let (ok, stdout, stderr) = check_config(
        "routes:\n  - name: data-store\n    match: {context_extensions: {route: data-store}}\n    audiences: [data-store]\n",
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("OK (1 route)"), "{stdout}");
}

#[test]
fn unknown_field_is_named_with_its_line() {
    let (ok, _, stderr) = check_config(
        "listen:\n  grpc: 127.0.0.1:9001\nroutes:\n  - name: a\n    audiences: [a]\n    audeinces: [b]\n",
    );
    assert!(!ok);
    assert!(
        stderr.contains("line 6: routes[0].audeinces: unknown field"),
        "{stderr}"
    );
    assert!(stderr.contains("tokengate.yaml"), "{stderr}");
}

#[test]
fn every_bad_value_is_reported_at_once() {
    let yaml = "\
listen:
  grpc: localhost
kubernetes:
  timeout: 2 seconds
routes:
  - name: a
    audiences: [a]
    invalid_token_status: 418
cache:
  negative_ttl: 5
";
    let (ok, _, stderr) = check_config(yaml);
    assert!(!ok);
    for expected in [
        "line 2: listen.grpc:",
        "line 4: kubernetes.timeout:",
        "line 8: routes[0].invalid_token_status: must be 401 or 403",
        "line 10: cache.negative_ttl:",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn missing_file_fails() {
    let out = tokengate()
        .args(["check-config", "/nonexistent/tokengate.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn version() {
    let out = tokengate().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}
