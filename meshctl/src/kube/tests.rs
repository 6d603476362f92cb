//! The Kubernetes source against recorded API responses (testdata/kube/, see its README): the
//! real kube-rs client and watcher, answered by a service that stands in for the API server.

use super::*;
use http::{Request, Response};
use kube::client::Body;
use proto::workload::{authorize, Issuance, Refusal, WorkloadRef, WorkloadView};
use std::sync::atomic::{AtomicBool, Ordering};
use view::reviewed_node;

fn recorded(file: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/kube")
        .join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A client whose API server answers lists and the first pod watch from the recordings, holds
/// every later watch open, and answers a TokenReview with `review` (after 1.5 s for a token
/// that says "slow"). Each request is logged as "METHOD PATH?QUERY BODY".
fn client(review: &'static str, log: Arc<Mutex<Vec<String>>>) -> kube::Client {
    let watched = Arc::new(AtomicBool::new(false));
    let service = tower::service_fn(move |req: Request<Body>| {
        let (log, watched) = (log.clone(), watched.clone());
        async move {
            let (method, path) = (req.method().to_string(), req.uri().path().to_string());
            let query = req.uri().query().unwrap_or("").to_string();
            let body = req.into_body().collect_bytes().await.unwrap_or_default();
            log.lock().unwrap().push(format!(
                "{method} {path}?{query} {}",
                String::from_utf8_lossy(&body)
            ));
            let watch = query.split('&').any(|p| p == "watch=true");
            let data = match (path.as_str(), watch) {
                ("/api/v1/pods", true) if !watched.swap(true, Ordering::SeqCst) => {
                    recorded("pods-watch.jsonl")
                }
                (_, true) => futures::future::pending().await,
                ("/api/v1/pods", false) => recorded("pods-list.json"),
                ("/api/v1/namespaces", false) => recorded("namespaces-list.json"),
                ("/api/v1/nodes", false) => recorded("nodes-list.json"),
                ("/apis/authentication.k8s.io/v1/tokenreviews", false) => {
                    if String::from_utf8_lossy(&body).contains("slow") {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                    }
                    recorded(review)
                }
                _ => {
                    return Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(404)
                            .body(Body::from(b"{}".to_vec()))
                            .unwrap(),
                    )
                }
            };
            Ok(Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Body::from(data))
                .unwrap())
        }
    });
    kube::Client::new(service, "default")
}

fn source(review: &'static str) -> (KubeSource, Arc<Mutex<Vec<String>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let rt = runtime().unwrap();
    let client = rt.block_on(async { client(review, log.clone()) });
    let policy = NodePolicy {
        service_account: "kube-system/meshd".into(),
        audience: "meshd-issuer".into(),
    };
    (KubeSource::with_client(rt, client, "nodes", policy), log)
}

fn wait(what: &str, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn node_cert(name: &str) -> proto::cert::CertBody {
    proto::cert::CertBody {
        kind: proto::cert::CertKind::Identity,
        serial: 1,
        not_before: 0,
        not_after: u64::MAX,
        trust_domain: "cluster.local".into(),
        namespace: "nodes".into(),
        name: name.into(),
        public_key: [1; 32],
        issuer: [2; 32],
        labels: Default::default(),
        addrs: vec![],
        routes: vec![],
        ports: vec![],
    }
}

fn ask(
    view: &KubeView,
    node: &str,
    name: &str,
    uid: &str,
) -> Result<proto::workload::Grant, Refusal> {
    let issuance = Issuance {
        trust_domain: "cluster.local".into(),
        node_issuers: vec![[2; 32]],
        now: 1_000,
        lifetime_secs: 3_600,
    };
    let request = WorkloadRef {
        namespace: "microblog".into(),
        name: name.into(),
        uid: uid.into(),
    };
    authorize(&node_cert(node), &request, view, &issuance)
}

const POST_UID: &str = "0c8f3a52-1b7e-4d0c-9f7a-5f1d2a3b4c5d";
const API_UID: &str = "9a1d2e3f-4b5c-4d6e-8f70-81a2b3c4d5e6";
const SEARCH_UID: &str = "3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e6f";

#[test]
fn the_listed_and_watched_cluster_decides_who_is_given_which_pod() {
    let (src, log) = source("tokenreview-node.json");
    wait("the three lists", || src.view.lock().unwrap().ready());
    // The watch events: api reports its address, search is added, post is deleted.
    wait("the pod watch's events", || {
        src.view
            .lock()
            .unwrap()
            .workload("microblog", "search-6f7a8-p0wlm")
            .is_some()
            && src
                .view
                .lock()
                .unwrap()
                .workload("microblog", "post-7d9f8-x2v4q")
                .is_none()
    });
    let mut v = src.view.lock().unwrap();
    // The source starts as a restarted issuer: no address is assigned until its grace is over.
    assert!(ask(&v, "node-2", "search-6f7a8-p0wlm", SEARCH_UID).is_err());
    v.start_assigning();

    let g = ask(&v, "node-2", "api-5c6b7-kq8zt", API_UID).unwrap();
    assert_eq!(
        (g.namespace.as_str(), g.name.as_str()),
        ("microblog", "api")
    );
    assert_eq!(g.labels["app"], "api");
    assert_eq!(proto::cert::list(&g.addrs), "100.64.2.41/32");
    assert_eq!(g.ports[0].to_string(), "http=8080/tcp");
    // A pod that reports no address yet is given one from its node's blocks (both families),
    // and the default service account.
    let g = ask(&v, "node-2", "search-6f7a8-p0wlm", SEARCH_UID).unwrap();
    assert_eq!(g.name, "default");
    assert_eq!(g.addrs.len(), 2);
    for (a, block) in g.addrs.iter().zip(["100.64.2.0/24", "fd00:64:2::/64"]) {
        assert!(
            block.parse::<Cidr>().unwrap().covers(a),
            "{a} not in {block}"
        );
    }
    assert_ne!(g.addrs[0].to_string(), "100.64.2.41/32");
    // Another node asking: refused. A deleted pod, a finished one, a host-network one, an old
    // UID: refused.
    assert!(matches!(
        ask(&v, "node-1", "api-5c6b7-kq8zt", API_UID),
        Err(Refusal::NotOnThisNode { .. })
    ));
    assert!(matches!(
        ask(&v, "node-1", "post-7d9f8-x2v4q", POST_UID),
        Err(Refusal::UnknownWorkload { .. })
    ));
    assert!(matches!(
        ask(
            &v,
            "node-1",
            "migrate-4hx9c",
            "7e6d5c4b-3a29-4817-a6f5-e4d3c2b1a098"
        ),
        Err(Refusal::UnknownWorkload { .. })
    ));
    assert!(v.workload("kube-system", "kube-proxy-8xk2m").is_none());
    assert!(matches!(
        ask(&v, "node-2", "api-5c6b7-kq8zt", "an-older-uid"),
        Err(Refusal::Replaced { .. })
    ));
    assert_eq!(
        proto::cert::list(&v.node_addresses("node-2").unwrap()),
        "100.64.2.1/32, fd00:64:2::1/128"
    );
    drop(v);
    // What the client asked: lists of all three, then watches from the list's version.
    let log = log.lock().unwrap();
    for expected in [
        "GET /api/v1/pods?",
        "GET /api/v1/namespaces?",
        "GET /api/v1/nodes?",
    ] {
        assert!(
            log.iter().any(|l| l.starts_with(expected)),
            "{expected}: {log:#?}"
        );
    }
    assert!(
        log.iter().any(|l| l.starts_with("GET /api/v1/pods?")
            && l.contains("watch=true")
            && l.contains("resourceVersion=48113")),
        "{log:#?}"
    );
}

#[test]
fn a_node_joins_with_its_reviewed_token_and_an_expired_one_is_refused() {
    let (src, log) = source("tokenreview-node.json");
    let (tx, rx) = std::sync::mpsc::channel();
    assert!(src.review(
        "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.e30.c2ln",
        7,
        false,
        tx.clone()
    ));
    let answer = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(answer.ticket, 7);
    let r = answer.review.unwrap();
    assert_eq!(reviewed_node(&r, &src.policy), Ok("node-2".into()));
    assert_eq!(r.pod_name, vec!["meshd-x7k2p".to_string()]);
    assert_eq!(
        r.pod_uid,
        vec!["8f7e6d5c-4b3a-4291-8807-f6e5d4c3b2a1".to_string()]
    );
    let sent = log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.starts_with("POST /apis/authentication.k8s.io/v1/tokenreviews"))
        .cloned()
        .expect("a TokenReview was made");
    let body: serde_json::Value =
        serde_json::from_str(sent.split_once(' ').unwrap().1.split_once(' ').unwrap().1).unwrap();
    assert_eq!(
        body["spec"]["token"],
        "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.e30.c2ln"
    );
    assert_eq!(body["spec"]["audiences"][0], "meshd-issuer");

    let (src, _) = source("tokenreview-expired.json");
    let (tx, rx) = std::sync::mpsc::channel();
    assert!(src.review("eyJ.e30.c2ln", 8, false, tx));
    let r = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .review
        .unwrap();
    let e = reviewed_node(&r, &src.policy).unwrap_err();
    assert!(e.contains("service account token has expired"), "{e}");
}

#[test]
fn reviews_are_waited_for_off_the_askers_thread_and_no_more_than_sixteen_at_once_half_kept_for_known_keys(
) {
    let (src, _) = source("tokenreview-node.json");
    let (tx, rx) = std::sync::mpsc::channel();
    let start = std::time::Instant::now();
    // Half for anyone, the other half kept for the keys the issuer knows.
    for ticket in 0..MAX_REVIEWS_IN_FLIGHT / 2 {
        assert!(src.review("slow.e30.c2ln", ticket, false, tx.clone()));
    }
    assert!(!src.review("slow.e30.c2ln", 98, false, tx.clone()));
    for ticket in MAX_REVIEWS_IN_FLIGHT / 2..MAX_REVIEWS_IN_FLIGHT {
        assert!(src.review("slow.e30.c2ln", ticket, true, tx.clone()));
    }
    assert!(
        !src.review("slow.e30.c2ln", 99, true, tx.clone()),
        "one more than the limit is not asked"
    );
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "asking waited for an answer: {:?}",
        start.elapsed()
    );
    let mut answered: Vec<usize> = (0..MAX_REVIEWS_IN_FLIGHT)
        .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap().ticket)
        .collect();
    answered.sort();
    assert_eq!(answered, (0..MAX_REVIEWS_IN_FLIGHT).collect::<Vec<_>>());
    assert!(
        src.review("slow.e30.c2ln", 100, false, tx),
        "room again once answered"
    );
}
