//! The issuer's Kubernetes source with real processes (issue 14): `meshctl ca serve --kubernetes`
//! on the underlay, its API server a stand-in in the issuer's namespace that answers with the
//! responses of meshctl/testdata/kube/ (no API server can run here), a node that joins with its
//! projected service-account token, and its meshd attaching the cluster's pods.

use mesh_tests::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

const ISSUER: &str = "198.18.3.100:7100";
const API: &str = "127.0.0.1:6443";
/// How long the node's projected token has left: its node certificate lives no longer.
const TOKEN_LEFT_SECS: u64 = 1800;

/// A projected token as the kubelet writes it, of meshd's pod on node-2 (the recorded
/// meshd-x7k2p), expiring at `exp`. Its signature is junk: only the stand-in's review vouches
/// for a token.
fn projected_token(exp: u64) -> String {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let claims = serde_json::json!({
        "aud": ["meshd-issuer"],
        "exp": exp,
        "iat": exp - 3600,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "kubernetes.io": {
            "namespace": "kube-system",
            "node": {"name": "node-2", "uid": "c0ffee00-0000-4000-8000-000000000002"},
            "pod": {"name": "meshd-x7k2p", "uid": "8f7e6d5c-4b3a-4291-8807-f6e5d4c3b2a1"},
            "serviceaccount": {"name": "meshd", "uid": "6d5c4b3a-2918-4706-95f4-e3d2c1b0a9f8"}
        },
        "nbf": exp - 3600,
        "sub": "system:serviceaccount:kube-system:meshd"
    });
    format!(
        "{}.{}.{}",
        b64(br#"{"alg":"RS256","kid":"lab"}"#),
        b64(claims.to_string().as_bytes()),
        b64(exp.to_string().as_bytes())
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn recorded(file: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../meshctl/testdata/kube")
            .join(file),
    )
    .unwrap()
}

/// The stand-in API server on `API` in namespace `ns`: lists from the recordings, the pod watch's
/// recorded events (then the watch stays open, as every other watch), TokenReviews by token:
/// `node_token` is node-2's, any other is refused as the API server refuses an expired one.
fn api_server(ns: &str, node_token: String) {
    let ready = std::sync::mpsc::channel();
    let tx = ready.0;
    in_netns(ns, move || {
        let listener = TcpListener::bind(API).unwrap();
        tx.send(()).unwrap();
        let mut pods_watched = false;
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut length = 0;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            let watch = query.split('&').any(|p| p == "watch=true");
            let send = |conn: &mut std::net::TcpStream, status: &str, data: &[u8]| {
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    data.len()
                );
                let _ = conn.write_all(data);
            };
            if watch {
                let events = if path == "/api/v1/pods" && !pods_watched {
                    pods_watched = true;
                    recorded("pods-watch.jsonl")
                } else {
                    Vec::new()
                };
                // Streamed until the connection closes, as a watch is.
                std::thread::spawn(move || {
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n"
                    );
                    let _ = conn.write_all(&events);
                    let _ = conn.flush();
                    std::thread::sleep(Duration::from_secs(120));
                });
                continue;
            }
            match path {
                "/api/v1/pods" => send(&mut conn, "200 OK", &recorded("pods-list.json")),
                "/api/v1/namespaces" => {
                    send(&mut conn, "200 OK", &recorded("namespaces-list.json"))
                }
                "/api/v1/nodes" => send(&mut conn, "200 OK", &recorded("nodes-list.json")),
                "/apis/authentication.k8s.io/v1/tokenreviews" => {
                    let asked: serde_json::Value =
                        serde_json::from_slice(&body).unwrap_or_default();
                    let file = if asked["spec"]["token"].as_str() == Some(&node_token) {
                        "tokenreview-node.json"
                    } else {
                        "tokenreview-expired.json"
                    };
                    send(&mut conn, "201 Created", &recorded(file));
                }
                _ => send(&mut conn, "404 Not Found", b"{}"),
            }
        }
    });
    ready.1.recv_timeout(Duration::from_secs(5)).unwrap();
}

fn meshctl_in(lab: &Lab, ns: &str, args: &[&str]) -> Output {
    let mut all = vec![bin("meshctl").display().to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    lab.exec(ns, &all)
}

#[test]
fn a_kubernetes_node_joins_with_its_token_and_attaches_the_pods_the_cluster_places_on_it() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new();
    let sw = lab.switch();
    let pki = Pki::new(&lab, "example.org", "ca");
    let iss = lab.host("iss");
    lab.attach(&sw, &iss, "198.18.3.100/24");
    lab.exec_ok(&iss, &["ip", "link", "set", "lo", "up"]);
    let node_token = projected_token(unix_now() + TOKEN_LEFT_SECS);
    api_server(&iss, node_token.clone());
    let kubeconfig = lab.dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: http://{API}\n\
             contexts:\n- name: lab\n  context:\n    cluster: lab\n    user: issuer\n\
             current-context: lab\nusers:\n- name: issuer\n  user:\n    token: issuer-token\n"
        ),
    )
    .unwrap();
    let kubeconfig_env = format!("KUBECONFIG={}", kubeconfig.display());
    let ca = pki.dir.display().to_string();
    // The issuer, on the stand-in API server.
    let meshctl_bin = bin("meshctl");
    let issuer_args = [
        kubeconfig_env.as_str(),
        meshctl_bin.to_str().unwrap(),
        "ca",
        "serve",
        "--ca",
        &ca,
        "--listen",
        ISSUER,
        "--kubernetes",
        "--node-service-account",
        "kube-system/meshd",
    ];
    lab.spawn(&iss, "issuer", Path::new("/usr/bin/env"), &issuer_args);
    let key = issuer_key(&lab);

    // The node: it makes its key and joins with its projected token; the API server says which
    // node the token's pod runs on.
    let node = lab.host("n2");
    lab.attach(&sw, &node, "198.18.3.2/24");
    let tokens = lab.dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    std::fs::write(tokens.join("node"), &node_token).unwrap();
    // Expired by its own claims: refused without asking the API server.
    std::fs::write(tokens.join("expired"), projected_token(unix_now() - 60)).unwrap();
    // Claims that pass, but a token the API server never issued (it refuses the review).
    std::fs::write(tokens.join("forged"), projected_token(unix_now() + 600)).unwrap();
    // As the DaemonSet projects it (defaultMode 0400): a credential no one else reads.
    use std::os::unix::fs::PermissionsExt;
    for t in ["node", "expired", "forged"] {
        std::fs::set_permissions(tokens.join(t), std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    let ids = lab.dir.join("identity");
    let join = |token: &str, out: &Path| {
        meshctl_in(
            &lab,
            &node,
            &[
                "join",
                "--service-account-token",
                tokens.join(token).to_str().unwrap(),
                "--issuer",
                ISSUER,
                "--issuer-key",
                &key,
                "--out",
                out.to_str().unwrap(),
                "--wait",
                "10s",
            ],
        )
    };
    let out = join("expired", &lab.dir.join("refused"));
    assert!(!out.status.success());
    assert!(text(&out).contains("the token expired"), "{}", text(&out));
    let out = join("forged", &lab.dir.join("refused"));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("service account token has expired"),
        "{}",
        text(&out)
    );
    let out = join("node", &ids);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("joined as example.org/nodes/node-2 (100.64.2.1/32, fd00:64:2::1/128)"),
        "{}",
        text(&out)
    );
    // The certificate lives as long as the token, not the issuer's 24 h: a token taken from a
    // node is worth no more than what is left of it.
    let cert = proto::cert::Certificate::decode(
        &proto::armor::decode(
            proto::armor::CERTIFICATE,
            &std::fs::read_to_string(ids.join("node.crt")).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let left = cert.body.not_after.saturating_sub(unix_now());
    assert!(
        (TOKEN_LEFT_SECS - 120..=TOKEN_LEFT_SECS).contains(&left),
        "the node certificate has {left} s left"
    );
    // The same token from another key, a moment later: refused (one key per node a minute).
    let out = join("node", &lab.dir.join("second-key"));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("another key joined as"),
        "{}",
        text(&out)
    );

    // Its meshd, with what the join gave it, attaches the pods the cluster placed on node-2.
    let ifname = lab.name("k2");
    let cfg = mesh_config_with(
        &lab,
        &ifname,
        &ids.join("node.crt"),
        &ids.join("node.key"),
        &[ids.join("ca.crt")],
        &[],
        &MeshPolicy::default(),
    );
    let mut config = std::fs::read_to_string(&cfg).unwrap().replace(
        "policy_admins = [",
        &format!(
            "workload_cas = [\"{}\"]\npolicy_admins = [",
            ids.join("workload-ca.crt").display()
        ),
    );
    config.push_str(&format!(
        "\n[issuer]\nendpoint = \"{ISSUER}\"\nkey = \"{key}\"\n"
    ));
    std::fs::write(&cfg, config).unwrap();
    lab.meshd_config(&node, &ifname, &cfg);
    let attach = |name: &str, uid: &str| {
        meshctl_in(
            &lab,
            &node,
            &[
                "workload",
                "attach",
                "-i",
                &ifname,
                "--namespace",
                "microblog",
                "--name",
                name,
                "--uid",
                uid,
                "--wait",
                "5s",
            ],
        )
    };
    // api reported its address in the watch: it keeps it.
    let out = attach("api-5c6b7-kq8zt", "9a1d2e3f-4b5c-4d6e-8f70-81a2b3c4d5e6");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("example.org/microblog/api"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("100.64.2.41/32"), "{}", text(&out));
    // search, added by the watch without an address: one from node-2's blocks, once the
    // issuer's grace after listing is over (it assigns nothing in it).
    wait_for(
        "the issuer to assign addresses",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(lab.dir.join("issuer.log"))
                .unwrap_or_default()
                .contains("assigning pod addresses")
        },
    );
    let out = attach("search-6f7a8-p0wlm", "3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e6f");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("example.org/microblog/default"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("100.64.2."), "{}", text(&out));
    // post runs on node-1 (and the watch deleted it): refused.
    let out = attach("post-7d9f8-x2v4q", "0c8f3a52-1b7e-4d0c-9f7a-5f1d2a3b4c5d");
    assert!(!out.status.success(), "{}", text(&out));
    let log = std::fs::read_to_string(lab.dir.join("issuer.log")).unwrap();
    assert!(log.contains("joined as example.org/nodes/node-2"), "{log}");
    assert!(log.contains("refused microblog/post-7d9f8-x2v4q"), "{log}");
    assert!(!log.contains("shows its node certificate"), "{log}");

    // The issuer restarts and remembers no key; the node joins again (as its renew container
    // does) showing the certificate it holds: the issuer knows it for a renewal, whose review
    // budget no flood of new keys spends.
    lab.stop("issuer", libc::SIGTERM);
    lab.spawn(&iss, "issuer", Path::new("/usr/bin/env"), &issuer_args);
    let out = meshctl_in(
        &lab,
        &node,
        &[
            "join",
            "--service-account-token",
            tokens.join("node").to_str().unwrap(),
            "--issuer",
            ISSUER,
            "--issuer-key",
            &key,
            "--out",
            ids.to_str().unwrap(),
            "--wait",
            "10s",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let log = lab.log("issuer");
    assert!(
        log.contains("shows its node certificate: a renewal")
            && log.contains("joined as example.org/nodes/node-2"),
        "{log}"
    );
}
