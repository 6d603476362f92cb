//! `meshctl lab up --example microblog | status | down`: the example application of Calico's
//! zero-trust guide, built on this machine. Each service is a node in its own network namespace,
//! with its own identity and its own meshd; the lab applies the allow-lists, runs traffic for
//! every edge of the flow graph and for flows that are not edges, and reports who decided what.
//!
//! Namespaces are `mlab-*` (`--prefix`), the underlay is 198.18.3.0/24 on a bridge, the overlay 100.64.3.0/24.

mod nodes;

use crate::Failure;
use anyhow::{anyhow, bail, Context};
use proto::admin::{FlowRecord, Request, Response};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the lab keeps its CA, keys, configurations, state and logs.
pub const DEFAULT_DIR: &str = "/var/tmp/meshlab";
/// The default prefix of the lab's namespaces and interfaces.
pub const DEFAULT_PREFIX: &str = "mlab";
static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Names this run's namespaces and interfaces `PREFIX-SERVICE` (at most 6 characters, so every
/// interface name fits Linux's 15).
pub fn set_prefix(prefix: &str) -> Result<(), Failure> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 6
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !ok {
        return Err(Failure::input(anyhow!(
            "--prefix `{prefix}`: 1 to 6 lowercase letters or digits"
        )));
    }
    let _ = PREFIX.set(prefix.to_string());
    Ok(())
}

fn prefix() -> &'static str {
    PREFIX.get().map_or(DEFAULT_PREFIX, String::as_str)
}

/// The services of the guide: name, the port it serves, and whom it calls.
const SERVICES: [(&str, u16); 5] = [
    ("api", 0),
    ("post", 8080),
    ("search", 8080),
    ("user", 8080),
    ("storage", 5432),
];
const EDGES: [(&str, &str); 6] = [
    ("api", "post"),
    ("api", "search"),
    ("api", "user"),
    ("search", "post"),
    ("post", "storage"),
    ("user", "storage"),
];
const NOT_EDGES: [(&str, &str); 2] = [("search", "user"), ("api", "storage")];

const NAMESPACE_YAML: &str = include_str!("../../examples/microblog/namespace.yaml");
const POST_YAML: &str = include_str!("../../examples/microblog/post-allow-list.yaml");
const OTHERS_YAML: &str = include_str!("../../examples/microblog/allow-lists.yaml");

fn ns(service: &str) -> String {
    format!("{}-{service}", prefix())
}
fn ifname(service: &str) -> String {
    format!("{}-{service}", prefix())
}
fn index(service: &str) -> usize {
    SERVICES
        .iter()
        .position(|(s, _)| *s == service)
        .expect("a service")
        + 1
}
fn overlay(service: &str) -> String {
    format!("100.64.3.{}", index(service))
}
fn port(service: &str) -> u16 {
    SERVICES[index(service) - 1].1
}
fn socket(service: &str) -> PathBuf {
    PathBuf::from(proto::admin::socket_path(&ifname(service)))
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs this meshctl with `args`, quietly; fails with its stderr.
fn meshctl(args: &[&str]) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("finding meshctl")?;
    let out = Command::new(exe).args(args).output()?;
    if !out.status.success() {
        bail!(
            "meshctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// meshd: beside this meshctl (a cargo build), else on PATH.
fn meshd() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("meshd")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("meshd"))
}

/// Every network namespace on the host.
fn all_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// What a lab made, written into its directory as it goes (`lab.json`), so that `lab down`
/// removes exactly that: the namespaces it added and the daemons it started, then the directory,
/// which it created. Nothing else, whatever its name, is touched.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Manifest {
    namespaces: Vec<String>,
    /// Each daemon's pid and its configuration file (a pid reused by another process since is
    /// not signalled).
    daemons: Vec<(u32, PathBuf)>,
    /// A lab of nodes running pods (`--nodes`); 0: one node per service.
    #[serde(default)]
    nodes: usize,
}

const MANIFEST: &str = "lab.json";

impl Manifest {
    fn load(dir: &Path) -> Option<Manifest> {
        let text = std::fs::read_to_string(dir.join(MANIFEST)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join(MANIFEST);
        std::fs::write(&path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Its namespaces that still exist.
    fn live(&self) -> Vec<String> {
        let all = all_namespaces();
        self.namespaces
            .iter()
            .filter(|n| all.contains(n))
            .cloned()
            .collect()
    }
}

/// Adds namespace `name` and records it first.
fn add_namespace(dir: &Path, m: &mut Manifest, name: &str) -> anyhow::Result<()> {
    m.namespaces.push(name.to_string());
    m.save(dir)?;
    sh(&["ip", "netns", "add", name])
}

/// Checks that `dir` may hold a new lab: absent, empty, or a lab this command made that is down
/// (then emptied); and that no namespace the lab would add exists.
fn prepare(dir: &Path, ours: &[String]) -> Result<(), Failure> {
    if let Some(m) = Manifest::load(dir) {
        let live = m.live();
        if !live.is_empty() {
            return Err(anyhow!(
                "a lab is already up in {} ({}); `meshctl lab down --dir {}` removes it",
                dir.display(),
                live.join(", "),
                dir.display()
            )
            .into());
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
    } else if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(Failure::input(anyhow!(
            "--dir {}: not empty, and not a lab meshctl made (no {MANIFEST}); give a new or empty \
             directory",
            dir.display()
        )));
    }
    let all = all_namespaces();
    if let Some(taken) = ours.iter().find(|n| all.contains(n)) {
        return Err(Failure::input(anyhow!(
            "network namespace {taken} exists and is not this lab's; give another --prefix"
        )));
    }
    Ok(())
}

pub fn up(example: &str, dir: &Path, nodes: Option<usize>) -> Result<(), Failure> {
    if example != "microblog" {
        return Err(Failure::input(anyhow!(
            "no example `{example}` (there is: microblog)"
        )));
    }
    if let Some(n) = nodes.filter(|n| !(2..=4).contains(n)) {
        return Err(Failure::input(anyhow!("--nodes {n}: 2 to 4")));
    }
    let ours: Vec<String> = match nodes {
        Some(n) => nodes::namespaces(n),
        None => std::iter::once(format!("{}-sw", prefix()))
            .chain(SERVICES.iter().map(|(s, _)| ns(s)))
            .collect(),
    };
    prepare(dir, &ours)?;
    let started = Instant::now();
    let result = match nodes {
        Some(n) => nodes::build(dir, n).and_then(|()| nodes::report(n)),
        None => build(dir).and_then(|()| report()),
    };
    if let Err(e) = result {
        eprintln!("meshctl: the lab failed; removing it");
        let _ = down(dir);
        return Err(e.into());
    }
    println!(
        "\nlab up in {:.1} s. `meshctl lab status` shows it; `meshctl lab down` removes it.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn build(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut made = Manifest::default();
    made.save(dir)?;
    let d = |p: &str| dir.join(p).display().to_string();
    let sw = switch_and_trust(dir, &mut made)?;
    println!(
        "microblog lab in {}: CA lab.example, 5 services",
        dir.display()
    );
    for (service, _) in SERVICES {
        let i = index(service);
        let n = ns(service);
        add_namespace(dir, &mut made, &n)?;
        sh(&["ip", "-n", &n, "link", "set", "lo", "up"])?;
        attach(
            &sw,
            &n,
            &format!("{}p{i}", prefix()),
            &format!("198.18.3.{i}/24"),
        )?;
        meshctl(&[
            "identity",
            "issue",
            "--ca",
            &d("ca"),
            "--namespace",
            "microblog",
            "--name",
            service,
            "--label",
            &format!("app={service}"),
            "--ip",
            &format!("{}/32", overlay(service)),
            "--out",
            &d("ids"),
        ])?;
        let seeds = if i == 1 {
            String::new()
        } else {
            "\"198.18.3.1:51820\"".into()
        };
        let config = format!(
            "[interface]\nname = \"{}\"\n\n[identity]\ncertificate = \"{}\"\nprivate_key = \"{}\"\n\n\
             [trust]\nbundle = [\"{}\"]\npolicy_admins = [\"{}\"]\n\n[peering]\nseeds = [{seeds}]\n\
             state_dir = \"{}\"\n",
            ifname(service),
            d(&format!("ids/{service}.crt")),
            d(&format!("ids/{service}.key")),
            d("ca/ca.crt"),
            d("policy-admin.key.pub"),
            d(&format!("state-{service}")),
        );
        let cfg_path = dir.join(format!("{service}.toml"));
        std::fs::write(&cfg_path, config)?;
        let log = std::fs::File::create(dir.join(format!("{service}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &n])
            .arg(meshd())
            .arg("--foreground")
            .arg("--config")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting meshd")?;
        made.daemons.push((child.id(), cfg_path.clone()));
        made.save(dir)?;
        println!(
            "  {service:<8} namespace {n:<13} underlay 198.18.3.{i}  overlay {}  identity lab.example/microblog/{service}",
            overlay(service)
        );
    }
    // Wait for a full mesh: every node knows the other four.
    let deadline = Instant::now() + Duration::from_secs(30);
    for (service, _) in SERVICES {
        loop {
            let peers = match crate::status::request(&socket(service), &Request::PeerList) {
                Ok(Response::Peers(p)) => p.len(),
                _ => 0,
            };
            if peers == SERVICES.len() - 1 {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{service} did not meet every node within 30 s (log: {})",
                    d(&format!("{service}.log"))
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!("full mesh formed");
    // The policies, applied on one node; the mesh carries them to the others.
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    for (f, text) in [
        ("namespace.yaml", NAMESPACE_YAML),
        ("post-allow-list.yaml", POST_YAML),
        ("allow-lists.yaml", OTHERS_YAML),
    ] {
        std::fs::write(policies.join(f), text)?;
    }
    meshctl(&[
        "policy",
        "apply",
        "-f",
        &d("policies"),
        "--key",
        &d("policy-admin.key"),
        "-i",
        &ifname("api"),
    ])?;
    for (service, _) in SERVICES {
        wait_serial(service, 1)?;
    }
    println!("policy set 1 (examples/microblog) applied on api and in force on every node");
    Ok(())
}

/// The lab's switch (a bridge in namespace PREFIX-sw), its CA (lab.example) and its policy
/// administrator's key; returns the switch's namespace.
fn switch_and_trust(dir: &Path, made: &mut Manifest) -> anyhow::Result<String> {
    let d = |p: &str| dir.join(p).display().to_string();
    let sw = format!("{}-sw", prefix());
    add_namespace(dir, made, &sw)?;
    sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
    sh(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
    meshctl(&[
        "ca",
        "init",
        "--trust-domain",
        "lab.example",
        "--out",
        &d("ca"),
    ])?;
    meshctl(&["policy", "admin-key", "--out", &d("policy-admin.key")])?;
    Ok(sw)
}

/// Puts namespace `ns` on the lab's switch at `addr` (its port named `port`).
fn attach(sw: &str, ns: &str, port: &str, addr: &str) -> anyhow::Result<()> {
    sh(&[
        "ip", "link", "add", "u0", "netns", ns, "type", "veth", "peer", "name", port, "netns", sw,
    ])?;
    sh(&["ip", "-n", sw, "link", "set", port, "master", "br0"])?;
    sh(&["ip", "-n", sw, "link", "set", port, "up"])?;
    sh(&["ip", "-n", ns, "addr", "add", addr, "dev", "u0", "nodad"])?;
    sh(&["ip", "-n", ns, "link", "set", "u0", "up"])
}

fn wait_serial(service: &str, serial: u64) -> anyhow::Result<()> {
    wait_serial_at(&socket(service), service, serial)
}

/// Waits (up to 20 s) until the meshd at `socket` (node `what`) runs policy set `serial`.
fn wait_serial_at(socket: &Path, what: &str, serial: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Response::Status(s)) = crate::status::request(socket, &Request::Status) {
            if s.policy.is_some_and(|p| p.serial >= serial) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{what} did not get policy set {serial} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<anyhow::Result<T>> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).with_context(|| path.clone())?;
        // SAFETY: setns on a valid namespace descriptor affects only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("entering {path}: {}", std::io::Error::last_os_error());
        }
        Ok(f())
    })
}

/// Runs traffic for every edge and for the non-edges, and prints what happened and why.
fn report() -> anyhow::Result<()> {
    let servers: Vec<(String, SocketAddr)> = SERVICES
        .iter()
        .filter(|(_, p)| *p != 0)
        .map(|(s, p)| {
            (
                ns(s),
                SocketAddr::new(overlay(s).parse().expect("an address"), *p),
            )
        })
        .collect();
    let flows: Vec<(&str, &str, bool)> = EDGES
        .iter()
        .map(|(a, b)| (*a, *b, true))
        .chain(NOT_EDGES.iter().map(|(a, b)| (*a, *b, false)))
        .collect();
    let attempts: Vec<(String, SocketAddr)> = flows
        .iter()
        .map(|(from, to, _)| {
            let addr = SocketAddr::new(overlay(to).parse().expect("an address"), port(to));
            (ns(from), addr)
        })
        .collect();
    let results = run_flows(&servers, &attempts)?;
    println!("\n{:<22} {:<8} {:<9} DECIDED BY", "FLOW", "EDGE", "RESULT");
    let mut wrong = 0;
    for ((from, to, edge), ok) in flows.iter().zip(&results) {
        let why = decided_by(from, to);
        println!(
            "{:<22} {:<8} {:<9} {why}",
            format!("{from} -> {to}:{}", port(to)),
            if *edge { "yes" } else { "no" },
            if *ok { "ALLOWED" } else { "DENIED" },
        );
        if ok != edge {
            wrong += 1;
        }
    }
    if wrong > 0 {
        bail!("{wrong} flow(s) did not behave as the flow graph says");
    }
    println!("\nevery edge of the flow graph is allowed; every other flow is denied");
    Ok(())
}

/// Starts an echo server at each of `servers` (namespace, address), runs every attempt
/// (namespace, address) at once, stops the servers and lets the flow logs catch up; whether each
/// attempt got its answer.
fn run_flows(
    servers: &[(String, SocketAddr)],
    attempts: &[(String, SocketAddr)],
) -> anyhow::Result<Vec<bool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut running = Vec::new();
    for (n, addr) in servers {
        let (stop, addr) = (stop.clone(), *addr);
        let (tx, rx) = std::sync::mpsc::channel();
        running.push(in_netns(n, move || serve(addr, &stop, tx)));
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| anyhow!("{n}: the test server did not start"))??;
    }
    let threads: Vec<_> = attempts
        .iter()
        .map(|(n, addr)| {
            let addr = *addr;
            in_netns(n, move || round_trip(addr))
        })
        .collect();
    let results = threads
        .into_iter()
        .map(|h| h.join().ok().and_then(|r| r.ok()).unwrap_or(false))
        .collect();
    stop.store(true, Ordering::Relaxed);
    for s in running {
        let _ = s.join();
    }
    std::thread::sleep(Duration::from_millis(300)); // let the flow logs catch up
    Ok(results)
}

fn serve(addr: SocketAddr, stop: &AtomicBool, ready: std::sync::mpsc::Sender<anyhow::Result<()>>) {
    let l = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(anyhow!("bind {addr}: {e}")));
            return;
        }
    };
    let _ = l.set_nonblocking(true);
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((mut s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 64];
                if let Ok(n) = s.read(&mut buf) {
                    let _ = s.write_all(&buf[..n]);
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// One request and its answer; false if the connection does not open within 3 s.
fn round_trip(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(3)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let mut buf = [0u8; 5];
    s.write_all(b"hello").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"hello"
}

/// The deciding policies of the latest `from -> to` flow, from both nodes' flow logs.
fn decided_by(from: &str, to: &str) -> String {
    let find = |node: &str, direction: &str| -> Option<FlowRecord> {
        let Ok(Response::Flows { records, .. }) = crate::status::request(
            &socket(node),
            &Request::Flows {
                since: 0,
                denied_only: false,
                staged_denied: false,
                limit: 10_000,
            },
        ) else {
            return None;
        };
        records.into_iter().rev().find(|r| {
            r.event == "new"
                && r.direction == direction
                && r.src.ip == overlay(from)
                && r.dst.ip == overlay(to)
                && r.dst.port == Some(port(to))
        })
    };
    let show = |r: &FlowRecord| {
        let rule = r
            .rule
            .as_deref()
            .map(|x| format!(" {x}"))
            .unwrap_or_default();
        format!("{} {}{rule}", r.verdict, r.policy)
    };
    let egress = find(from, "egress");
    let ingress = find(to, "ingress");
    match (egress, ingress) {
        (Some(e), _) if e.verdict == "deny" => format!("egress of {from}: {}", show(&e)),
        (Some(e), Some(i)) => format!(
            "egress of {from}: {}; ingress of {to}: {}",
            show(&e),
            show(&i)
        ),
        (Some(e), None) => format!(
            "egress of {from}: {}; ingress of {to}: not logged",
            show(&e)
        ),
        (None, _) => "no flow-log record".into(),
    }
}

pub fn status(dir: &Path) -> Result<(), Failure> {
    let Some(made) = Manifest::load(dir).filter(|m| !m.live().is_empty()) else {
        println!("no lab is up in {}", dir.display());
        return Ok(());
    };
    println!("lab in {}", dir.display());
    if made.nodes > 0 {
        nodes::status(made.nodes);
        return Ok(());
    }
    println!(
        "{:<8} {:<14} {:<12} {:>5} {:>7} {:>8} {:>8} {:>8}",
        "SERVICE", "NAMESPACE", "OVERLAY", "PEERS", "POLICY", "ALLOWED", "DENIED", "FLOWS"
    );
    for (service, _) in SERVICES {
        match crate::status::request(&socket(service), &Request::Status) {
            Ok(Response::Status(s)) => {
                let p = s.policy.unwrap_or_default();
                println!(
                    "{:<8} {:<14} {:<12} {:>5} {:>7} {:>8} {:>8} {:>8}",
                    service,
                    ns(service),
                    overlay(service),
                    s.peers.len(),
                    p.serial,
                    p.allowed_flows,
                    p.denied_packets,
                    p.conntrack_entries
                );
            }
            _ => println!("{service:<8} {:<14} meshd is not answering", ns(service)),
        }
    }
    Ok(())
}

pub fn down(dir: &Path) -> Result<(), Failure> {
    let Some(made) = Manifest::load(dir) else {
        if std::fs::metadata(dir).is_err() {
            println!("no lab in {}", dir.display());
            return Ok(());
        }
        return Err(Failure::input(anyhow!(
            "{} holds no lab meshctl made (no {MANIFEST}); nothing removed",
            dir.display()
        )));
    };
    let mut stopped = 0;
    for (pid, config) in &made.daemons {
        let Ok(pid) = i32::try_from(*pid) else {
            continue;
        };
        if !runs_with(pid, config) {
            continue; // exited, or the pid is another process's now
        }
        // `ip netns exec` runs meshd in its own process (exec), so this is meshd.
        // SAFETY: sending a signal to a pid we started, checked to be still that daemon.
        if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
            stopped += 1;
            let deadline = Instant::now() + Duration::from_secs(5);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    if made.nodes > 0 {
        for s in nodes::sockets(made.nodes) {
            let _ = std::fs::remove_file(s);
        }
    } else {
        for (service, _) in SERVICES {
            let _ = std::fs::remove_file(socket(service));
        }
    }
    let gone = made.live();
    for n in &gone {
        let _ = sh(&["ip", "netns", "del", n]);
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    println!(
        "lab down: {stopped} daemon(s) stopped, {} namespace(s) removed",
        gone.len()
    );
    Ok(())
}

/// Whether `pid` is a live process whose command line names `config` (the daemon the lab
/// started, not another that took its pid since).
fn runs_with(pid: i32, config: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let wanted = config.as_os_str().as_encoded_bytes();
    alive(pid) && cmdline.split(|b| *b == 0).any(|arg| arg == wanted)
}

/// Whether `pid` runs (a zombie, exited but not yet reaped by its parent, does not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}
