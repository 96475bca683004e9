//! Writes kubeconfig files that `kube::Config`, kubectl and the Python client load as
//! they are: the CA inline as `certificate-authority-data`, and either a `tokenFile`
//! (re-read by clients, so rotation works) or a static `token`.

use std::io::Write as _;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// How the kubeconfig's user authenticates.
pub enum Credential<'a> {
    /// `user.tokenFile`.
    TokenFile(&'a Path),
    /// `user.token`.
    Token(&'a str),
}

/// Quotes a string for YAML (double-quoted style; JSON strings are valid YAML).
fn yq(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

/// Renders a kubeconfig with one cluster, user and context.
pub fn render(server: &str, ca_pem: &str, user: &str, cred: &Credential<'_>) -> String {
    let ca_data = STANDARD.encode(ca_pem.as_bytes());
    let cred_line = match cred {
        Credential::TokenFile(p) => format!("tokenFile: {}", yq(&p.to_string_lossy())),
        Credential::Token(t) => format!("token: {}", yq(t)),
    };
    let server = yq(server);
    [
        "apiVersion: v1".to_string(),
        "kind: Config".to_string(),
        "clusters:".to_string(),
        "- name: kube-standin".to_string(),
        "  cluster:".to_string(),
        format!("    server: {server}"),
        format!("    certificate-authority-data: {ca_data}"),
        "users:".to_string(),
        format!("- name: {user}"),
        "  user:".to_string(),
        format!("    {cred_line}"),
        "contexts:".to_string(),
        format!("- name: {user}@kube-standin"),
        "  context:".to_string(),
        "    cluster: kube-standin".to_string(),
        format!("    user: {user}"),
        format!("current-context: {user}@kube-standin"),
        "preferences: {}".to_string(),
        String::new(),
    ]
    .join("\n")
}

/// Writes `contents` to `path` atomically: a temporary file in the same directory, then
/// rename, so a reader sees the old or the new contents, never a partial file.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(contents)?;
    tmp.as_file().sync_all()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o600))?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
