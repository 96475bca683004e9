//! Helpers shared by the stand-in's conformance tests: HTTPS clients built from the
//! stand-in's own kubeconfig (so every test also exercises it), raw requests that keep
//! the status code and exact body, and JWT inspection.

#![allow(dead_code)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http_body_util::BodyExt as _;
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube_standin::{MetadataStyle, MintRequest, Options, Standin};

/// A raw HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

/// A client for the stand-in that authenticates with `token` (or not at all).
pub async fn client(s: &Standin, token: Option<&str>) -> kube::Client {
    let kc = Kubeconfig::read_from(s.admin_kubeconfig_path()).expect("admin kubeconfig");
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config from kubeconfig");
    cfg.auth_info = AuthInfo::default();
    // kube retries 429/503/504 by default; the tests want to see each answer.
    cfg.default_retry = false;
    if let Some(t) = token {
        cfg.auth_info.token = Some(t.to_string().into());
    }
    kube::Client::try_from(cfg).expect("client")
}

/// A client from a kubeconfig file, loaded exactly as tokengate loads it.
pub async fn client_from_kubeconfig(path: &std::path::Path) -> kube::Client {
    let kc = Kubeconfig::read_from(path).expect("kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config from kubeconfig");
    kube::Client::try_from(cfg).expect("client")
}

/// Sends a request and returns status, headers and body, whatever the status.
pub async fn call(
    c: &kube::Client,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Answer {
    let mut b = http::Request::builder().method(method).uri(path);
    let bytes = match body {
        Some(v) => {
            b = b.header("content-type", "application/json");
            serde_json::to_vec(v).unwrap()
        }
        None => Vec::new(),
    };
    let req = b.body(kube::client::Body::from(bytes)).unwrap();
    let resp = c.send(req).await.expect("request failed");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    }
}

/// The status code of a request without a body.
pub async fn status_of(c: &kube::Client, method: &str, path: &str) -> u16 {
    call(c, method, path, None).await.status
}

/// POSTs a TokenReview and returns the answer.
pub async fn review(c: &kube::Client, token: &str, audiences: &[&str]) -> Answer {
    let mut spec = serde_json::json!({ "token": token });
    if !audiences.is_empty() {
        spec["audiences"] = serde_json::json!(audiences);
    }
    call(
        c,
        "POST",
        "/apis/authentication.k8s.io/v1/tokenreviews",
        Some(&serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": spec
        })),
    )
    .await
}

/// `status.error` of a TokenReview answer (asserting 201).
pub async fn review_error(c: &kube::Client, token: &str, audiences: &[&str]) -> String {
    let a = review(c, token, audiences).await;
    assert_eq!(a.status, 201, "{}", a.body);
    let v = a.json();
    assert!(
        v["status"].get("authenticated").is_none(),
        "authenticated must be absent on failure: {}",
        a.body
    );
    assert_eq!(v["status"]["user"], serde_json::json!({}), "{}", a.body);
    assert!(v["status"].get("audiences").is_none(), "{}", a.body);
    v["status"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The decoded, raw (key order preserved) JSON of a JWT's header and payload.
pub fn jwt_parts(token: &str) -> (String, String) {
    let mut it = token.split('.');
    let h = URL_SAFE_NO_PAD.decode(it.next().unwrap()).unwrap();
    let p = URL_SAFE_NO_PAD.decode(it.next().unwrap()).unwrap();
    (String::from_utf8(h).unwrap(), String::from_utf8(p).unwrap())
}

/// The claims of a JWT, parsed.
pub fn claims(token: &str) -> serde_json::Value {
    serde_json::from_str(&jwt_parts(token).1).expect("JWT claims are JSON")
}

/// Removes insignificant whitespace from JSON text, keeping key order.
pub fn compact(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut in_str = false;
    let mut escaped = false;
    for c in raw.chars() {
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

/// The raw text of the value of top-level key `key` in compact JSON `raw`.
pub fn raw_field<'a>(raw: &'a str, key: &str) -> &'a str {
    let needle = format!("\"{key}\":");
    let start = raw.find(&needle).expect("key present") + needle.len();
    let bytes = raw.as_bytes();
    let mut depth = 0i32;
    let mut in_str = false;
    let mut escaped = false;
    for (i, &b) in bytes.iter().enumerate().skip(start) {
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                if depth == 0 {
                    return &raw[start..i];
                }
                depth -= 1;
                if depth == 0 {
                    return &raw[start..=i];
                }
            }
            b',' if depth == 0 => return &raw[start..i],
            _ => {}
        }
    }
    &raw[start..]
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Tries to connect to `addr` up to `tries` times, `every` apart, until connecting succeeds
/// (`open`) or fails (`!open`); returns whether the listener got there.
pub async fn wait_for_listener(
    addr: std::net::SocketAddr,
    open: bool,
    tries: u32,
    every: std::time::Duration,
) -> bool {
    for _ in 0..tries {
        if tokio::net::TcpStream::connect(addr).await.is_ok() == open {
            return true;
        }
        tokio::time::sleep(every).await;
    }
    false
}

/// A stand-in configured like the cluster the seed's TokenReview came from
/// (`fixtures/seed-tokenreview-response.json`): issuer `kubernetes.default.svc`, API
/// audiences `api` and `vault`, and no `jti` (tokens from before Kubernetes 1.29).
pub async fn seed_like_standin(style: MetadataStyle) -> Standin {
    Standin::start(Options {
        issuer: "kubernetes.default.svc".to_string(),
        api_audiences: vec!["api".to_string(), "vault".to_string()],
        jti: false,
        metadata_style: style,
        ..Default::default()
    })
    .await
    .expect("start")
}

/// The seed's token minted again, with the UIDs it is bound to.
pub struct SeedToken {
    pub sa_uid: String,
    pub pod_uid: String,
    pub token: String,
}

/// Creates the seed's `test/nginx` service account and pod, and mints a token like the
/// seed's: audience `vault`, bound to pod `nginx`, valid for 7200 s.
pub fn mint_seed_token(s: &Standin) -> SeedToken {
    let sa_uid = s.create_service_account("test", "nginx");
    let pod_uid = s.create_pod("test", "nginx", "nginx", None);
    let token = s
        .mint(
            &MintRequest::new("test", "nginx")
                .audience("vault")
                .pod("nginx")
                .expires_in(7200),
        )
        .unwrap();
    SeedToken {
        sa_uid,
        pod_uid,
        token,
    }
}
