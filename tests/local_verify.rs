//! `verification: local` against the API stand-in over real HTTPS: the key set is fetched
//! with tokengate's reviewer credentials, minted tokens are verified locally, and every
//! verdict is compared with what TokenReview says about the same token (differential), for
//! a corpus of token kinds and for thousands of randomly mutated tokens.
//!
//! Objects for the lookups are read from the stand-in's API (GET service account / pod), as
//! the watch caches would hold them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenReview, TokenReviewStatus};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube_standin::{KeyAlg, MintRequest, Options, Standin};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokengate::keys::{KeySet, KeySettings, KubeKeySource};
use tokengate::review::{Reviewer, Verdict};
use tokengate::verify::{
    verify, verify_with_keys, CannotJudge, InvalidKind, LocalVerdict, MemoryObjects, Stale,
};

const AUD: &str = "data-store";
const MAX_STALENESS: Duration = Duration::from_secs(300);

async fn client(kubeconfig: &Path) -> kube::Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    kube::Client::try_from(config).expect("kube client")
}

/// tokengate's own credentials, the reviewer kubeconfig, with its `tokenFile` read on every
/// request (as review.rs does, so a rotated token is used at once).
async fn key_source(kubeconfig: &Path) -> KubeKeySource {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    let token_file = config.auth_info.token_file.take().expect("a tokenFile");
    let client = kube::Client::try_from(config).expect("kube client");
    KubeKeySource::new(client).with_auth_header(Arc::new(move || {
        let token = std::fs::read_to_string(&token_file).ok()?;
        http::HeaderValue::try_from(format!("Bearer {}", token.trim())).ok()
    }))
}

async fn reviewer(kubeconfig: &Path) -> Reviewer {
    let config = tokengate::Config::from_yaml_str(&format!(
        r#"
kubernetes:
  kubeconfig: "{}"
  timeout: 5s
  retries: 1
routes:
  - name: data-store
    audiences: [{AUD}]
"#,
        kubeconfig.display()
    ))
    .expect("config");
    let metrics = Arc::new(tokengate::metrics::Metrics::new(["data-store"]));
    Reviewer::connect(&config.kubernetes, metrics)
        .await
        .expect("reviewer")
}

/// The stand-in plus everything a comparison needs.
struct Env {
    standin: Standin,
    admin: kube::Client,
    reviewer: Reviewer,
    keys: KeySet,
}

impl Env {
    async fn start(opts: Options) -> Env {
        Env::around(Standin::start(opts).await.expect("stand-in")).await
    }

    async fn around(standin: Standin) -> Env {
        let admin = client(&standin.admin_kubeconfig_path()).await;
        let reviewer = reviewer(&standin.kubeconfig_path()).await;
        let source = key_source(&standin.kubeconfig_path()).await;
        let keys = KeySet::new(
            source,
            KeySettings {
                refresh_every: Duration::from_secs(3600),
                unknown_kid_interval: Duration::from_millis(1),
            },
        );
        keys.refresh().await.expect("first JWKS fetch");
        Env {
            standin,
            admin,
            reviewer,
            keys,
        }
    }

    /// The objects the token's (unverified) claims name, as the API server has them now.
    async fn objects(&self, token: &str) -> MemoryObjects {
        let mut objects = MemoryObjects::new(SystemTime::now());
        let Some(claims) = unverified_claims(token) else {
            return objects;
        };
        let k = &claims["kubernetes.io"];
        let (Some(ns), Some(sa)) = (
            k["namespace"].as_str(),
            k["serviceaccount"]["name"].as_str(),
        ) else {
            return objects;
        };
        if ns.is_empty() || sa.is_empty() {
            return objects;
        }
        let sas: Api<ServiceAccount> = Api::namespaced(self.admin.clone(), ns);
        if let Some(found) = sas.get_opt(sa).await.expect("GET serviceaccount") {
            objects.add_service_account(ns, sa, found.metadata.uid.as_deref().unwrap_or(""));
            if let Some(t) = found.metadata.deletion_timestamp {
                objects.set_service_account_deleting(ns, sa, SystemTime::from(t.0));
            }
        }
        if let Some(pod) = k["pod"]["name"].as_str().filter(|p| !p.is_empty()) {
            let pods: Api<Pod> = Api::namespaced(self.admin.clone(), ns);
            if let Some(found) = pods.get_opt(pod).await.expect("GET pod") {
                objects.add_pod(
                    ns,
                    pod,
                    found.metadata.uid.as_deref().unwrap_or(""),
                    found
                        .metadata
                        .deletion_timestamp
                        .map(|t| SystemTime::from(t.0)),
                );
            }
        }
        objects
    }

    /// Raw TokenReview status (for the API server's wording).
    async fn token_review(&self, token: &str, audiences: &[String]) -> TokenReviewStatus {
        let api: Api<TokenReview> = Api::all(self.admin.clone());
        // Through JSON: the generated types' shapes change between k8s-openapi versions.
        let review: TokenReview = serde_json::from_value(serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": audiences}
        }))
        .expect("TokenReview object");
        api.create(&PostParams::default(), &review)
            .await
            .expect("TokenReview")
            .status
            .unwrap_or_default()
    }

    async fn local(&self, token: &str, audiences: &[String]) -> LocalVerdict {
        let objects = self.objects(token).await;
        verify_with_keys(token, audiences, &self.keys, &objects, MAX_STALENESS).await
    }

    async fn token_request(&self, ns: &str, sa: &str, kind: &str, name: &str) -> String {
        let api: Api<ServiceAccount> = Api::namespaced(self.admin.clone(), ns);
        let request: TokenRequest = serde_json::from_value(serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [AUD],
                "boundObjectRef": {"kind": kind, "apiVersion": "v1", "name": name}
            }
        }))
        .expect("TokenRequest object");
        api.create_token_request(sa, &PostParams::default(), &request)
            .await
            .expect("TokenRequest")
            .status
            .and_then(|st| serde_json::to_value(st).ok())
            .and_then(|st| st["token"].as_str().map(str::to_owned))
            .expect("token")
    }
}

fn unverified_claims(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// How the two modes disagreed about one token.
#[derive(Debug)]
enum Disagreement {
    /// Local said Valid, TokenReview did not: a security bug.
    LocalTooLenient(String),
    /// Local refused a token TokenReview (mode) accepted, or categories differ.
    Verdict(String),
    /// Same verdict, different words.
    Wording(String),
}

impl Disagreement {
    fn text(&self) -> &str {
        match self {
            Disagreement::LocalTooLenient(t)
            | Disagreement::Verdict(t)
            | Disagreement::Wording(t) => t,
        }
    }
}

/// Disagreements about the verdict (wording aside), printed.
fn serious(all: Vec<Disagreement>) -> Vec<String> {
    for d in &all {
        eprintln!("disagreement: {d:?}");
    }
    all.iter()
        .filter(|d| !matches!(d, Disagreement::Wording(_)))
        .map(|d| d.text().to_owned())
        .collect()
}

/// Compares local verification with TokenReview mode (precheck, then the Reviewer) for one
/// token; empty if they agree or local fell back (CannotJudge).
async fn compare(env: &Env, label: &str, token: &str, audiences: &[String]) -> Vec<Disagreement> {
    let local = env.local(token, audiences).await;
    let raw = env.token_review(token, audiences).await;
    let tokenreview_mode = env
        .reviewer
        .review(
            token,
            audiences,
            "",
            &tokengate::cache::Interest::unconditional(),
        )
        .await
        .expect("TokenReview mode");
    let mut out = Vec::new();
    match (&local, &tokenreview_mode) {
        (LocalVerdict::Valid(v), Verdict::Authenticated(identity)) => {
            if v.identity != *identity {
                out.push(Disagreement::LocalTooLenient(format!(
                    "{label}: identities differ: local {:?}, TokenReview {identity:?}",
                    v.identity
                )));
            }
            if Some(&v.audiences) != raw.audiences.as_ref() {
                out.push(Disagreement::Verdict(format!(
                    "{label}: audiences differ: local {:?}, TokenReview {:?}",
                    v.audiences, raw.audiences
                )));
            }
        }
        (LocalVerdict::Valid(_), Verdict::Rejected(d)) => {
            out.push(Disagreement::LocalTooLenient(format!(
                "{label}: local Valid, TokenReview mode {d:?} ({:?})",
                raw.error
            )));
        }
        (LocalVerdict::Invalid(i), Verdict::Rejected(_)) => {
            // TokenReview mode reports every API refusal as token_rejected, except a
            // confirmed-audience mismatch; precheck (run before both) refuses a wrong
            // audience and an expired token on its own.
            let precheck = tokengate::precheck::precheck(token, audiences, unix_now());
            let expected = match precheck {
                Err(d) => d.code(),
                Ok(_) => "token_rejected",
            };
            let local_code = match precheck {
                Err(d) => d.code(),
                Ok(_) => i.kind.denial_code(),
            };
            if local_code != expected {
                out.push(Disagreement::Verdict(format!(
                    "{label}: local {:?}, TokenReview mode {expected}",
                    i.kind
                )));
            }
            if raw.error.as_deref() != Some(i.token_review_error().as_str()) {
                out.push(Disagreement::Wording(format!(
                    "{label}: local says {:?}, TokenReview says {:?}",
                    i.token_review_error(),
                    raw.error
                )));
            }
        }
        (LocalVerdict::Invalid(i), Verdict::Authenticated(_)) => {
            out.push(Disagreement::Verdict(format!(
                "{label}: local {:?} ({}), TokenReview authenticated",
                i.kind, i.reason
            )));
        }
        (LocalVerdict::CannotJudge(_), _) => {}
        (LocalVerdict::Stale(s), _) => {
            out.push(Disagreement::Verdict(format!("{label}: stale {s:?}")));
        }
    }
    out
}

async fn seed(env: &Env) {
    let s = &env.standin;
    s.create_service_account("payments", "api");
    s.create_service_account("payments", "worker");
    s.create_pod("payments", "api-0", "api", Some("worker-1"));
    s.create_pod("payments", "api-1", "api", None);
    s.create_pod("payments", "doomed", "api", None);
    s.create_pod("payments", "reborn", "api", None);
    s.create_service_account("batch", "job");
    s.create_service_account("batch", "gone");
    s.create_service_account("batch", "renewed");
}

fn mint(env: &Env, req: MintRequest) -> String {
    env.standin.mint(&req).expect("mint")
}

/// A corpus of token kinds, with the route audiences to check each against.
async fn corpus(env: &Env) -> Vec<(&'static str, String, Vec<String>)> {
    let now = unix_now();
    let route = vec![AUD.to_owned()];
    let pod = |p: &str| MintRequest::new("payments", "api").audience(AUD).pod(p);
    let mut c = vec![
        ("pod-bound", mint(env, pod("api-0")), route.clone()),
        ("pod-bound, no node", mint(env, pod("api-1")), route.clone()),
        (
            "unbound",
            mint(env, MintRequest::new("batch", "job").audience(AUD)),
            route.clone(),
        ),
        (
            "several audiences",
            mint(
                env,
                MintRequest::new("batch", "job")
                    .audience("vault")
                    .audience(AUD)
                    .audience("x"),
            ),
            vec!["x".into(), "y".into(), AUD.into()],
        ),
        (
            "wrong audience",
            mint(env, MintRequest::new("batch", "job").audience("vault")),
            route.clone(),
        ),
        (
            "API audience only",
            mint(env, MintRequest::new("batch", "job")),
            route.clone(),
        ),
        (
            "expired inside the leeway",
            mint(env, pod("api-0").issued_at(now - 3600 - 30)),
            route.clone(),
        ),
        (
            "expired",
            mint(env, pod("api-0").issued_at(now - 3600 - 600)),
            route.clone(),
        ),
        (
            "issued in the future",
            mint(env, pod("api-0").issued_at(now + 600)),
            route.clone(),
        ),
        (
            "issued a little in the future",
            mint(env, pod("api-0").issued_at(now + 30)),
            route.clone(),
        ),
        ("pod deleted", mint(env, pod("doomed")), route.clone()),
        ("pod recreated", mint(env, pod("reborn")), route.clone()),
        (
            "service account deleted",
            mint(env, MintRequest::new("batch", "gone").audience(AUD)),
            route.clone(),
        ),
        (
            "service account recreated",
            mint(env, MintRequest::new("batch", "renewed").audience(AUD)),
            route.clone(),
        ),
    ];
    let legacy = env
        .standin
        .mint_legacy("batch", "job", "job-token")
        .expect("legacy token");
    c.push(("legacy", legacy.clone(), route.clone()));
    c.push((
        "legacy, API audience",
        legacy,
        vec![Options::default().issuer],
    ));
    c.push((
        "secret-bound",
        env.token_request("batch", "job", "Secret", "job-token")
            .await,
        route.clone(),
    ));
    c.push((
        "node-bound",
        env.token_request("payments", "api", "Node", "worker-1")
            .await,
        route.clone(),
    ));
    // Revocations after minting.
    env.standin.delete_pod("payments", "doomed");
    env.standin.create_pod("payments", "reborn", "api", None);
    env.standin.delete_service_account("batch", "gone");
    env.standin.create_service_account("batch", "renewed");
    c
}

#[tokio::test]
async fn keys_are_fetched_with_tokengates_credentials() {
    let env = Env::start(Options::default()).await;
    let snap = env.keys.snapshot().expect("keys");
    assert_eq!(snap.issuer(), Options::default().issuer);
    assert_eq!(
        snap.kids().into_iter().collect::<Vec<_>>(),
        env.standin.key_ids()
    );
    assert_eq!(snap.len(), 1);
    assert!(snap.age(SystemTime::now()) < Duration::from_secs(60));
}

#[tokio::test]
async fn verify_corpus_agrees_with_tokenreview() {
    let env = Env::start(Options::default()).await;
    seed(&env).await;
    let corpus = corpus(&env).await;
    let mut disagreements = Vec::new();
    let mut outcomes = BTreeMap::new();
    for (label, token, audiences) in &corpus {
        let local = env.local(token, audiences).await;
        outcomes.insert(*label, format!("{local:?}"));
        disagreements.extend(compare(&env, label, token, audiences).await);
    }
    eprintln!("corpus outcomes: {outcomes:#?}");
    let serious = serious(disagreements);
    assert!(serious.is_empty(), "{serious:#?}");

    // And each kind lands where it should.
    let verdict = |label: &str| {
        let (_, token, auds) = corpus.iter().find(|(l, ..)| *l == label).unwrap();
        (token.clone(), auds.clone())
    };
    for (label, expect) in [
        ("pod-bound", "valid"),
        ("pod-bound, no node", "valid"),
        ("unbound", "valid"),
        ("several audiences", "valid"),
        ("expired inside the leeway", "valid"),
        ("issued a little in the future", "valid"),
        ("wrong audience", "wrong_audience"),
        ("API audience only", "wrong_audience"),
        ("expired", "token_expired"),
        ("issued in the future", "token_rejected"),
        ("pod deleted", "token_rejected"),
        ("pod recreated", "token_rejected"),
        ("service account deleted", "token_rejected"),
        ("service account recreated", "token_rejected"),
        ("legacy", "legacy_token"),
        ("legacy, API audience", "legacy_token"),
        ("secret-bound", "secret_bound"),
        ("node-bound", "node_bound"),
    ] {
        let (token, auds) = verdict(label);
        let got = match env.local(&token, &auds).await {
            LocalVerdict::Valid(_) => "valid",
            LocalVerdict::Invalid(i) => i.kind.denial_code(),
            LocalVerdict::CannotJudge(c) => c.code(),
            LocalVerdict::Stale(_) => "stale",
        };
        assert_eq!(got, expect, "{label}: {}", outcomes[label]);
    }
}

#[tokio::test]
async fn key_rotation_unknown_kid_refresh_and_retired_keys() {
    let env = Env::start(Options::default()).await;
    seed(&env).await;
    let route = vec![AUD.to_owned()];
    let old_kid = env.standin.key_ids()[0].clone();
    let old = mint(&env, MintRequest::new("batch", "job").audience(AUD));
    let mut removed = env.keys.subscribe_removed();

    // A new ES256 key signs from now on; its kid is unknown until a refresh.
    let new_kid = env.standin.add_signing_key(KeyAlg::Es256);
    let new = mint(&env, MintRequest::new("batch", "job").audience(AUD));
    let stale_snapshot = env.keys.snapshot().unwrap();
    let objects = env.objects(&new).await;
    assert!(matches!(
        verify(&new, &route, &stale_snapshot, &objects, MAX_STALENESS, SystemTime::now()),
        LocalVerdict::Invalid(ref i) if i.kind == InvalidKind::UnknownKey
    ));
    let LocalVerdict::Valid(v) = env.local(&new, &route).await else {
        panic!("new key not picked up")
    };
    assert_eq!(v.kid, new_kid);
    assert!(serious(compare(&env, "new key", &new, &route).await).is_empty());
    assert!(serious(compare(&env, "old key", &old, &route).await).is_empty());

    // Retiring the old key: the refresh reports it, and its tokens are refused as the API
    // server refuses them.
    // tokengate's own token was signed with the old key too: rotate it first, as a kubelet
    // would after the API server's keys changed.
    env.standin.rotate_reviewer_token();
    env.standin.retire_key(&old_kid);
    let changes = env.keys.refresh().await.unwrap();
    assert_eq!(changes.removed, vec![old_kid.clone()]);
    assert_eq!(&*removed.recv().await.unwrap(), &[old_kid]);
    match env.local(&old, &route).await {
        LocalVerdict::Invalid(i) => {
            assert_eq!(i.kind, InvalidKind::UnknownKey);
            assert_eq!(i.reason, "invalid signature, no keys found");
        }
        other => panic!("{other:?}"),
    }
    assert!(serious(compare(&env, "retired key", &old, &route).await).is_empty());
}

#[tokio::test]
async fn verify_with_api_server_down_keeps_last_keys_until_max_staleness() {
    let env = Env::start(Options::default()).await;
    seed(&env).await;
    let route = vec![AUD.to_owned()];
    let token = mint(&env, MintRequest::new("batch", "job").audience(AUD));
    let objects = env.objects(&token).await;
    env.standin.set_fault(kube_standin::Fault::Down);
    assert!(env.keys.refresh().await.is_err());
    let snap = env.keys.snapshot().expect("last-known keys");
    let now = SystemTime::now();
    assert!(matches!(
        verify(&token, &route, &snap, &objects, MAX_STALENESS, now),
        LocalVerdict::Valid(_)
    ));
    let later = now + MAX_STALENESS + Duration::from_secs(5);
    let mut fresh_objects = objects.clone();
    fresh_objects.set_synced_at(Some(later));
    assert!(matches!(
        verify(&token, &route, &snap, &fresh_objects, MAX_STALENESS, later),
        LocalVerdict::Stale(Stale::Keys(_))
    ));
    env.standin.set_fault(kube_standin::Fault::None);
    env.keys.refresh().await.expect("refresh after recovery");
}

// ---------------------------------------------------------------- mutation

const B64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The token with each part decoded as Go does (trailing bits ignored) and re-encoded.
fn canonical(token: &str) -> String {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    let go = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::RequireNone)
            .with_decode_allow_trailing_bits(true),
    );
    token
        .split('.')
        .map(|part| match go.decode(part) {
            Ok(bytes) => URL_SAFE_NO_PAD.encode(bytes),
            Err(_) => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn enc(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap_or_default())
}

/// One random mutation of `token`. `others` are other genuine tokens to borrow parts from.
fn mutate(rng: &mut impl Rng, token: &str, others: &[String], kids: &[String]) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let (h, p, s) = (parts[0], parts[1], parts[2]);
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap();
    let payload: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap();
    match rng.random_range(0..10) {
        // A random character anywhere.
        0 => {
            let mut b = token.as_bytes().to_vec();
            let i = rng.random_range(0..b.len());
            b[i] = if rng.random_bool(0.9) {
                B64URL[rng.random_range(0..B64URL.len())]
            } else {
                b".=+/{}\"\\!~"[rng.random_range(0..10)]
            };
            String::from_utf8(b).unwrap_or_default()
        }
        // Header: algorithm and kid games.
        1 | 2 => {
            let mut hd = header.clone();
            match rng.random_range(0..6) {
                0 => {
                    let algs = [
                        "none", "None", "HS256", "HS512", "RS256", "ES256", "RS384", "PS256",
                        "ES384", "",
                    ];
                    hd["alg"] = Value::from(algs[rng.random_range(0..algs.len())]);
                }
                1 => {
                    hd.as_object_mut().map(|m| m.remove("kid"));
                }
                2 => hd["kid"] = Value::from(kids[rng.random_range(0..kids.len())].clone()),
                3 => hd["kid"] = Value::from("forged"),
                4 => hd["typ"] = Value::from("JWT"),
                _ => hd["alg"] = Value::from(5),
            }
            format!("{}.{p}.{s}", enc(&hd))
        }
        // Claims: the things an attacker would like to change.
        3..=5 => {
            let mut c = payload.clone();
            let now = unix_now();
            match rng.random_range(0..9) {
                0 => c["aud"] = serde_json::json!(["data-store", "anything"]),
                1 => c["exp"] = Value::from(now + 100_000),
                2 => c["exp"] = Value::from(now - 100_000),
                3 => c["iss"] = Value::from("https://evil.example.com"),
                4 => c["kubernetes.io"]["serviceaccount"]["name"] = Value::from("admin"),
                5 => c["kubernetes.io"]["namespace"] = Value::from("kube-system"),
                6 => c["kubernetes.io"]["pod"] = serde_json::json!({"name": "api-1", "uid": "x"}),
                7 => c["sub"] = Value::from("system:serviceaccount:kube-system:admin"),
                _ => {
                    c.as_object_mut().map(|m| m.remove("kubernetes.io"));
                }
            }
            format!("{h}.{}.{s}", enc(&c))
        }
        // Signature bytes.
        6 | 7 => {
            let mut sig = URL_SAFE_NO_PAD.decode(s).unwrap();
            match rng.random_range(0..5) {
                0 if !sig.is_empty() => {
                    let i = rng.random_range(0..sig.len());
                    sig[i] ^= 1 << rng.random_range(0..8);
                }
                1 => sig.truncate(rng.random_range(0..sig.len().max(1))),
                2 => sig.push(rng.random()),
                3 => sig.clear(),
                _ => sig.iter_mut().for_each(|b| *b = 0),
            }
            format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(sig))
        }
        // Parts from another genuine token.
        8 => {
            let other = &others[rng.random_range(0..others.len())];
            let o: Vec<&str> = other.split('.').collect();
            match rng.random_range(0..3) {
                0 => format!("{}.{p}.{s}", o[0]),
                1 => format!("{h}.{}.{s}", o[1]),
                _ => format!("{h}.{p}.{}", o[2]),
            }
        }
        // Structure.
        _ => match rng.random_range(0..4) {
            0 => format!("{h}.{p}"),
            1 => format!("{token}.{s}"),
            2 => format!("{h}.{p}.{s}="),
            _ => token.replacen('.', "..", 1),
        },
    }
}

#[tokio::test]
async fn verify_mutated_tokens_never_valid_locally_when_tokenreview_refuses() {
    let env = Env::start(Options::default()).await;
    seed(&env).await;
    env.standin.add_signing_key(KeyAlg::Es256);
    env.keys.refresh().await.unwrap();
    // Genuine tokens to mutate: RS256 is gone as signer, but still verifies.
    let route = vec![AUD.to_owned()];
    let es = mint(
        &env,
        MintRequest::new("payments", "api")
            .audience(AUD)
            .pod("api-0"),
    );
    let es_unbound = mint(&env, MintRequest::new("batch", "job").audience(AUD));
    let legacy = env
        .standin
        .mint_legacy("batch", "job", "job-token")
        .expect("legacy");
    let bases = vec![es, es_unbound, legacy];
    let kids = env.standin.key_ids();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x70ce_9a7e);
    let per_base: usize = std::env::var("TOKENGATE_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);

    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut lenient = Vec::new();
    let mut other = Vec::new();
    for base in &bases {
        for i in 0..per_base {
            let token = mutate(&mut rng, base, &bases, &kids);
            let objects = env.objects(&token).await;
            let local = verify_with_keys(&token, &route, &env.keys, &objects, MAX_STALENESS).await;
            let raw = env.token_review(&token, &route).await;
            let authenticated = raw.authenticated == Some(true);
            let key = match (&local, authenticated) {
                (LocalVerdict::Valid(_), true) => "both valid",
                (LocalVerdict::Valid(_), false) => "LOCAL VALID, TOKENREVIEW NOT",
                (LocalVerdict::Invalid(_), false) => "both refuse",
                (LocalVerdict::Invalid(_), true) => "local refuses, TokenReview accepts",
                (LocalVerdict::CannotJudge(_), _) => "fallback to TokenReview",
                (LocalVerdict::Stale(_), _) => "stale",
            };
            *counts.entry(key).or_default() += 1;
            match (&local, authenticated) {
                (LocalVerdict::Valid(v), true) => {
                    let user = raw.user.unwrap_or_default();
                    if user.username.as_deref() != Some(v.identity.username.as_str())
                        || user.uid != v.identity.uid
                    {
                        lenient.push(format!("#{i}: identity differs: {v:?} vs {user:?}"));
                    }
                }
                (LocalVerdict::Valid(_), false) => {
                    // Go decodes base64url without checking the unused trailing bits, so a
                    // real API server accepts a signature whose last character differs only
                    // there; the stand-in decodes strictly. Ask again with the canonical form.
                    let canonical = canonical(&token);
                    if canonical != token
                        && env.token_review(&canonical, &route).await.authenticated == Some(true)
                    {
                        *counts
                            .entry("  (non-canonical base64: Go accepts, stand-in refuses)")
                            .or_default() += 1;
                    } else {
                        lenient.push(format!("#{i}: TokenReview says {:?}", raw.error));
                    }
                }
                (LocalVerdict::Invalid(inv), false)
                    if raw.error.as_deref() != Some(inv.token_review_error().as_str()) =>
                {
                    *counts.entry("  (same verdict, other wording)").or_default() += 1;
                }
                (LocalVerdict::Invalid(inv), true) => {
                    other.push(format!("#{i}: local {:?}: {}", inv.kind, inv.reason));
                }
                _ => {}
            }
        }
    }
    eprintln!(
        "mutation outcomes ({} tokens): {counts:#?}",
        per_base * bases.len()
    );
    for o in &other {
        eprintln!("disagreement: {o}");
    }
    assert!(
        lenient.is_empty(),
        "local accepted what TokenReview refused: {lenient:#?}"
    );
    assert!(
        other.is_empty(),
        "local refused what TokenReview accepted: {other:#?}"
    );
    assert_eq!(counts.get("stale"), None);
    assert!(counts.get("both refuse").copied().unwrap_or(0) > per_base);
}

#[test]
fn verify_cannot_judge_codes_are_distinct() {
    let all = [
        CannotJudge::LegacyToken,
        CannotJudge::UnknownIssuer,
        CannotJudge::SecretBound,
        CannotJudge::NodeBound,
        CannotJudge::NoAudience,
        CannotJudge::UnusableKey,
        CannotJudge::ObjectsUnknown,
        CannotJudge::UnexpectedClaims,
    ];
    let codes: std::collections::BTreeSet<_> = all.iter().map(|c| c.code()).collect();
    assert_eq!(codes.len(), all.len());
}

// ------------------------------------------------- signed claim variations

/// The stand-in's signing keys, read from its saved state (process mode keeps them in
/// `state.json`), so tokens with any claims can be signed that its TokenReview accepts as
/// genuine signatures.
fn saved_signing_keys(dir: &Path) -> Vec<kube_standin::keys::SigningKey> {
    let state: Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).expect("state.json"))
            .expect("state JSON");
    state["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| {
            let alg = match k["alg"].as_str() {
                Some("ES256") => KeyAlg::Es256,
                _ => KeyAlg::Rs256,
            };
            let der = base64::engine::general_purpose::STANDARD
                .decode(k["pkcs8"].as_str().expect("pkcs8"))
                .expect("base64");
            kube_standin::keys::SigningKey::from_pkcs8(alg, &der).expect("key")
        })
        .collect()
}

fn sign_claims(key: &kube_standin::keys::SigningKey, header: &Value, claims: &Value) -> String {
    let input = format!("{}.{}", enc(header), enc(claims));
    let sig = key.sign(input.as_bytes()).expect("sign");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// Claims mutated one or a few at a time, re-signed with the real key: exercises the claim
/// checks (issuer, audience, time edges, objects, bindings, odd shapes) against the
/// stand-in's authenticator, not just the signature.
#[tokio::test]
async fn verify_signed_claim_variations_agree_with_tokenreview() {
    let dir = tempfile::tempdir().expect("tempdir");
    let standin = Standin::start_persistent(Options {
        dir: Some(dir.path().to_owned()),
        ..Options::default()
    })
    .await
    .expect("stand-in");
    let env = Env::around(standin).await;
    seed(&env).await;
    env.standin.delete_pod("payments", "doomed");
    let es_kid = env.standin.add_signing_key(KeyAlg::Es256);
    env.keys.refresh().await.expect("refresh");
    let keys = saved_signing_keys(dir.path());
    assert_eq!(keys.len(), 2);

    let route = vec![AUD.to_owned()];
    let base = unverified_claims(&mint(
        &env,
        MintRequest::new("payments", "api")
            .audience(AUD)
            .pod("api-0"),
    ))
    .expect("claims");
    let sa_uid = base["kubernetes.io"]["serviceaccount"]["uid"].clone();
    let job = unverified_claims(&mint(&env, MintRequest::new("batch", "job").audience(AUD)))
        .expect("claims");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0051_97ed);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut lenient = Vec::new();
    let mut stricter = Vec::new();
    let mut wording = Vec::new();
    for i in 0..400 {
        // Time edges are exact to the second: local verification and the TokenReview must
        // see the same second, so an attempt that straddles one is made again.
        let (c, local, raw) = loop {
            let millis = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_millis());
            if millis > 800 {
                tokio::time::sleep(Duration::from_millis(u64::from(1000 - millis) + 10)).await;
            }
            let now = unix_now();
            let mut attempt = rng.clone();
            let (c, key) = vary(&mut attempt, &base, &job, &sa_uid, &keys, now);
            let header = if attempt.random_bool(0.1) {
                serde_json::json!({"alg": key.alg_name()})
            } else {
                serde_json::json!({"alg": key.alg_name(), "kid": key.kid()})
            };
            let token = sign_claims(key, &header, &c);
            let objects = env.objects(&token).await;
            let local = verify_with_keys(&token, &route, &env.keys, &objects, MAX_STALENESS).await;
            let raw = env.token_review(&token, &route).await;
            if unix_now() == now {
                rng = attempt;
                break (c, local, raw);
            }
        };
        let accepted = raw.authenticated == Some(true);
        let label = match &local {
            LocalVerdict::Valid(_) => "valid".to_owned(),
            LocalVerdict::Invalid(inv) => format!("invalid/{:?}", inv.kind),
            LocalVerdict::CannotJudge(why) => format!("fallback/{}", why.code()),
            LocalVerdict::Stale(_) => "stale".to_owned(),
        };
        *counts
            .entry(format!(
                "{label}, TokenReview {}",
                if accepted { "accepts" } else { "refuses" }
            ))
            .or_default() += 1;
        match (&local, accepted) {
            (LocalVerdict::Valid(v), true) => {
                let user = raw.user.unwrap_or_default();
                if user.username.as_deref() != Some(v.identity.username.as_str())
                    || user.uid != v.identity.uid
                    || raw.audiences.as_ref() != Some(&v.audiences)
                {
                    lenient.push(format!("#{i}: identity differs: {v:?} vs {user:?}"));
                }
            }
            (LocalVerdict::Valid(_), false) => {
                lenient.push(format!("#{i}: {c}: TokenReview says {:?}", raw.error));
            }
            (LocalVerdict::Invalid(inv), true) => {
                stricter.push(format!("#{i}: {c}: local {:?}: {}", inv.kind, inv.reason));
            }
            (LocalVerdict::Invalid(inv), false)
                if raw.error.as_deref() != Some(inv.token_review_error().as_str()) =>
            {
                wording.push(format!(
                    "#{i}: local {:?}, TokenReview {:?}",
                    inv.token_review_error(),
                    raw.error
                ));
            }
            _ => {}
        }
    }
    eprintln!("signed claim variations (ES256 kid {es_kid}): {counts:#?}");
    for w in &wording {
        eprintln!("wording: {w}");
    }
    for s in &stricter {
        eprintln!("local stricter: {s}");
    }
    assert!(
        lenient.is_empty(),
        "local accepted what TokenReview refused: {lenient:#?}"
    );
    assert!(
        stricter.is_empty(),
        "local refused what TokenReview accepted: {stricter:#?}"
    );
    assert!(wording.is_empty(), "{wording:#?}");
}

/// One or two claim changes, and the key to sign with.
fn vary<'k>(
    rng: &mut impl Rng,
    base: &Value,
    job: &Value,
    sa_uid: &Value,
    keys: &'k [kube_standin::keys::SigningKey],
    now: i64,
) -> (Value, &'k kube_standin::keys::SigningKey) {
    let mut c = if rng.random_bool(0.7) {
        base.clone()
    } else {
        job.clone()
    };
    for _ in 0..rng.random_range(1..=2) {
        let t = now + rng.random_range(-4000..4000);
        let edge = now + [-61, -60, 59, 60, 61][rng.random_range(0..5)];
        match rng.random_range(0..22) {
            0 => c["aud"] = serde_json::json!([]),
            1 => c["aud"] = Value::from(AUD),
            2 => c["aud"] = serde_json::json!(["vault", AUD]),
            3 => c["aud"] = serde_json::json!(["vault"]),
            4 => {
                c.as_object_mut().map(|m| m.remove("aud"));
            }
            5 => c["exp"] = Value::from(t),
            6 => c["exp"] = Value::from(now - 60 - rng.random_range(-1..=1)),
            7 => c["nbf"] = Value::from(edge),
            8 => c["iat"] = Value::from(edge),
            9 => {
                c.as_object_mut().map(|m| m.remove("exp"));
            }
            10 => c["iss"] = Value::from("https://other.example.com"),
            11 => c["iss"] = Value::from("kubernetes/serviceaccount"),
            12 => c["kubernetes.io"]["serviceaccount"]["uid"] = Value::from("not-the-uid"),
            13 => c["kubernetes.io"]["serviceaccount"]["name"] = Value::from("worker"),
            14 => c["kubernetes.io"]["namespace"] = Value::from("batch"),
            15 => c["kubernetes.io"]["pod"] = serde_json::json!({"name": "doomed", "uid": "x"}),
            16 => c["kubernetes.io"]["pod"]["uid"] = Value::from("other-pod-uid"),
            17 => {
                c["kubernetes.io"]["secret"] = serde_json::json!({"name": "job-token", "uid": "u"})
            }
            18 => {
                if let Some(k) = c["kubernetes.io"].as_object_mut() {
                    k.remove("pod");
                }
            }
            19 => c["kubernetes.io"]["serviceaccount"]["uid"] = sa_uid.clone(),
            20 => c["exp"] = Value::from(now as f64 - 60.5),
            _ => c["jti"] = Value::Null,
        }
    }
    let key = &keys[rng.random_range(0..keys.len())];
    (c, key)
}

// ------------------------------------------------- forgeries and object states

/// What each side concluded, in one word, for the per-kind expectations below.
fn local_word(v: &LocalVerdict) -> &'static str {
    match v {
        LocalVerdict::Valid(_) => "valid",
        LocalVerdict::Invalid(i) => i.kind.denial_code(),
        LocalVerdict::CannotJudge(_) => "fallback",
        LocalVerdict::Stale(_) => "stale",
    }
}

/// The second half of the differential corpus (the first is [`corpus`]): forged and altered
/// tokens, keys that are unknown, absent or rotated out, another issuer, `nbf` ahead, a
/// token over 16 KiB, and terminating pods inside and past their window. Each kind must get
/// the same verdict (and identity) locally as from TokenReview, and the verdict it is here
/// to exercise.
#[tokio::test]
async fn verify_corpus_of_forgeries_and_object_states_agrees_with_tokenreview() {
    let dir = tempfile::tempdir().expect("tempdir");
    let standin = Standin::start_persistent(Options {
        dir: Some(dir.path().to_owned()),
        ..Options::default()
    })
    .await
    .expect("stand-in");
    let env = Env::around(standin).await;
    seed(&env).await;
    let route = vec![AUD.to_owned()];
    let signing_kid = env.standin.signing_key_id();
    let key = saved_signing_keys(dir.path())
        .into_iter()
        .find(|k| k.kid() == signing_kid)
        .expect("the signing key in state.json");
    let genuine = mint(
        &env,
        MintRequest::new("payments", "api")
            .audience(AUD)
            .pod("api-0"),
    );
    let claims = unverified_claims(&genuine).expect("claims");
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(genuine.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    let parts: Vec<&str> = genuine.split('.').collect();

    let mut kinds: Vec<(&str, String, &str)> = Vec::new();
    // Altered in transit.
    let mut altered = claims.clone();
    altered["kubernetes.io"]["serviceaccount"]["name"] = "worker".into();
    kinds.push((
        "tampered payload",
        format!("{}.{}.{}", parts[0], enc(&altered), parts[2]),
        "token_rejected",
    ));
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[5] ^= 0x40;
    kinds.push((
        "tampered signature",
        format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(&sig)),
        "token_rejected",
    ));
    kinds.push((
        "alg none",
        format!(
            "{}.{}.",
            enc(&serde_json::json!({"alg": "none", "kid": signing_kid})),
            parts[1]
        ),
        "token_rejected",
    ));
    let hs_header = enc(&serde_json::json!({"alg": "HS256", "kid": signing_kid}));
    let hs_input = format!("{hs_header}.{}", parts[1]);
    let jwk = serde_json::to_value(key.jwk()).unwrap();
    let public = serde_json::to_vec(&jwk).unwrap();
    let hmac = aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &public),
        hs_input.as_bytes(),
    );
    kinds.push((
        "HS256 keyed with the public key",
        format!("{hs_input}.{}", URL_SAFE_NO_PAD.encode(hmac.as_ref())),
        "token_rejected",
    ));
    // Keys.
    let stranger = kube_standin::keys::SigningKey::generate(key.alg()).expect("key");
    let mut stranger_header = header.clone();
    stranger_header["kid"] = stranger.kid().into();
    kinds.push((
        "unknown kid (a key the cluster never published)",
        sign_claims(&stranger, &stranger_header, &claims),
        "token_rejected",
    ));
    let mut no_kid = header.clone();
    no_kid.as_object_mut().unwrap().remove("kid");
    kinds.push((
        "no kid (every key tried)",
        sign_claims(&key, &no_kid, &claims),
        "valid",
    ));
    // Claims the key signed but the API server refuses.
    let mut other_issuer = claims.clone();
    other_issuer["iss"] = "https://issuer.example".into();
    kinds.push((
        "another issuer",
        sign_claims(&key, &header, &other_issuer),
        "fallback",
    ));
    let mut not_yet = claims.clone();
    not_yet["nbf"] = (unix_now() + 600).into();
    kinds.push((
        "nbf in the future",
        sign_claims(&key, &header, &not_yet),
        "token_rejected",
    ));
    kinds.push((
        "over 16 KiB",
        format!("{}.{}.{}", parts[0], "A".repeat(16 * 1024), parts[2]),
        "token_too_large",
    ));
    // A key rotated out of the JWKS.
    let rotated_kid = env.standin.add_signing_key(KeyAlg::Es256);
    let rotated = mint(
        &env,
        MintRequest::new("payments", "api")
            .audience(AUD)
            .pod("api-0"),
    );
    assert!(env.standin.sign_with_key(&signing_kid));
    assert!(env.standin.retire_key(&rotated_kid));
    env.keys.refresh().await.expect("refresh");
    kinds.push(("rotated-out key", rotated, "token_rejected"));

    let mut disagreements = Vec::new();
    for (label, token, expect) in &kinds {
        disagreements.extend(compare(&env, label, token, &route).await);
        let local = env.local(token, &route).await;
        assert_eq!(local_word(&local), *expect, "{label}: {local:?}");
    }
    let serious = serious(disagreements);
    assert!(serious.is_empty(), "{serious:#?}");

    // Terminating pods, judged at the cluster's own clock (the stand-in's, advanced).
    env.standin.set_pod_reaping(false);
    env.standin
        .create_pod("payments", "ending", "api", Some("worker-1"));
    env.standin
        .create_pod("payments", "ended", "api", Some("worker-1"));
    let ending = mint(
        &env,
        MintRequest::new("payments", "api")
            .audience(AUD)
            .pod("ending"),
    );
    let ended = mint(
        &env,
        MintRequest::new("payments", "api")
            .audience(AUD)
            .pod("ended"),
    );
    assert!(env
        .standin
        .delete_pod_graceful("payments", "ended", Some(1)));
    env.standin.advance_clock(90);
    assert!(env
        .standin
        .delete_pod_graceful("payments", "ending", Some(30)));
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(env.standin.now() as u64);
    let snapshot = env.keys.snapshot().expect("keys");
    for (label, token, expect_valid) in [
        ("terminating pod inside its window", &ending, true),
        (
            "terminating pod past deletionTimestamp + 60 s",
            &ended,
            false,
        ),
    ] {
        let objects = env.objects(token).await;
        let local = verify(token, &route, &snapshot, &objects, MAX_STALENESS, now);
        let review = env
            .reviewer
            .review(
                token,
                &route,
                "",
                &tokengate::cache::Interest::unconditional(),
            )
            .await
            .expect("TokenReview");
        match (&local, &review) {
            (LocalVerdict::Valid(v), Verdict::Authenticated(id)) if expect_valid => {
                assert_eq!(&v.identity, id, "{label}")
            }
            (LocalVerdict::Invalid(i), Verdict::Rejected(_)) if !expect_valid => {
                assert_eq!(
                    env.token_review(token, &route).await.error.as_deref(),
                    Some(i.token_review_error().as_str()),
                    "{label}"
                );
            }
            other => panic!("{label}: {other:?}"),
        }
    }
}
