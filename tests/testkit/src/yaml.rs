//! YAML files as `serde_json::Value`, for tests that check the structure of published configs
//! and manifests (Envoy configs, kustomize output, the compose file).

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

/// Parses one YAML document.
pub fn parse(text: &str) -> Result<Value> {
    serde_saphyr::from_str(text).context("parsing YAML")
}

/// Parses a multi-document YAML stream (e.g. `kubectl kustomize` output), skipping empty docs.
pub fn parse_all(text: &str) -> Result<Vec<Value>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).context("parsing YAML stream")?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Reads and parses a file relative to the workspace root.
pub fn load(relative: &str) -> Result<Value> {
    let path = crate::workspace_root().join(relative);
    load_path(&path)
}

/// Reads and parses a file.
pub fn load_path(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("in {}", path.display()))
}

/// Follows a path of object keys and array indices (`"a.0.b"`); `Value::Null` when absent.
pub fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    static NULL: Value = Value::Null;
    path.split('.')
        .filter(|s| !s.is_empty())
        .try_fold(v, |cur, seg| match seg.parse::<usize>() {
            Ok(i) => cur.get(i),
            Err(_) => cur.get(seg),
        })
        .unwrap_or(&NULL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_streams_and_walks_paths() {
        let docs = parse_all("a: {b: [1, {c: x}]}\n---\n---\nd: true\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(at(&docs[0], "a.b.1.c"), "x");
        assert_eq!(at(&docs[0], "a.b.0"), 1);
        assert!(at(&docs[0], "a.zz").is_null());
        assert_eq!(at(&docs[1], "d"), true);
    }
}
