//! `meshd-cni`: the CNI plugin of the mesh. A kubelet (or the lab, or a test) runs it as the CNI
//! specification says: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS`
//! (`K8S_POD_NAMESPACE=...;K8S_POD_NAME=...;K8S_POD_UID=...`) and the network configuration as
//! JSON on standard input.
//!
//! ADD asks the node's meshd to attach the pod and waits (bounded, `attachWaitMs`) until meshd
//! holds the pod's certificate in force; only then does the pod get a network: a veth pair, the
//! addresses its certificate names (never another), a /32 (/128) host route to it, strict
//! reverse-path filtering and an nftables rule on the host side that drops any source address
//! but the pod's. Before its identity exists no packet of the pod can leave, and when meshd is
//! down or refuses, ADD fails and leaves nothing behind. DEL withdraws the identity and removes
//! what ADD made, and succeeds when it is already gone. CHECK says whether all of it is still in
//! place (the identity in force, the veth, the addresses, the rules), changing nothing. The pure part (configuration, arguments, results, rules) is `spec.rs`.

mod spec;

use spec::{CniError, NetConf, Pod};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::Command;

/// The neighbour the pod's routes point at: answered for by the host side of its veth.
const GATEWAY_V4: &str = "169.254.1.1";
const GATEWAY_V6: &str = "fe80::1";
/// The plugin's lock and what it keeps of each pod (its addresses).
const STATE_DIR: &str = "/run/meshd-cni";
/// The routing table (and rule priority) that sends traffic from pods to pods of this node
/// through the mesh interface.
const LOCAL_TABLE: u32 = 5182;

fn main() {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut input = Vec::new();
    if command != "VERSION" {
        let _ = std::io::stdin()
            .take(spec::MAX_CONF_BYTES as u64 + 1)
            .read_to_end(&mut input);
    }
    let version = serde_json::from_slice::<serde_json::Value>(&input)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .filter(|v| spec::SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| "1.0.0".to_string());
    let result = match command.as_str() {
        "VERSION" => Ok(Some(spec::version_result(&version))),
        "ADD" | "DEL" | "CHECK" => spec::parse_conf(&input).and_then(|conf| run(&command, &conf)),
        other => Err(CniError::new(
            spec::INVALID_ENV,
            "CNI_COMMAND must be ADD, DEL, CHECK or VERSION",
            format!("`{other}`"),
        )),
    };
    let mut out = std::io::stdout();
    match result {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
        }
        Ok(None) => {}
        Err(e) => {
            let _ = writeln!(out, "{}", e.to_json(&version));
            std::process::exit(1);
        }
    }
}

/// What the runtime says of the container.
struct Env {
    container_id: String,
    netns: String,
    ifname: String,
    pod: Pod,
}

fn env(name: &str) -> Result<String, CniError> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| CniError::new(spec::INVALID_ENV, format!("{name} is not set"), ""))
}

fn read_env(command: &str) -> Result<Env, CniError> {
    let container_id = env("CNI_CONTAINERID")?;
    let ifname = env("CNI_IFNAME")?;
    spec::check_ifname("CNI_IFNAME", &ifname)
        .map_err(|e| CniError::new(spec::INVALID_ENV, "invalid CNI_IFNAME", e))?;
    // DEL may come without a namespace (it is gone); ADD and CHECK need it.
    let netns = match command {
        "DEL" => std::env::var("CNI_NETNS").unwrap_or_default(),
        _ => env("CNI_NETNS")?,
    };
    let pod = spec::parse_args(&std::env::var("CNI_ARGS").unwrap_or_default())?;
    Ok(Env {
        container_id,
        netns,
        ifname,
        pod,
    })
}

fn run(command: &str, conf: &NetConf) -> Result<Option<serde_json::Value>, CniError> {
    let e = read_env(command)?;
    let host = spec::host_veth(&e.container_id, &e.ifname);
    match command {
        "ADD" => add(conf, &e, &host).map(Some),
        "DEL" => {
            del(conf, &e, &host)?;
            Ok(None)
        }
        _ => {
            check(conf, &e, &host)?;
            Ok(None)
        }
    }
}

fn add(conf: &NetConf, e: &Env, host: &str) -> Result<serde_json::Value, CniError> {
    // First the identity: nothing is made for a pod the mesh will not certify. One that did
    // not come in time is detached, so meshd does not go on asking for a pod with no network.
    let (identity, addrs) = match attach(conf, &e.pod) {
        Ok(a) => a,
        Err(err) => {
            if err.code != spec::TRY_AGAIN_LATER {
                let _ = detach(conf, &e.pod);
            }
            return Err(err);
        }
    };
    if let Err(err) = plumb(e, host, &conf.mesh_interface, &addrs) {
        // Leave nothing behind: no veth, no rules, no identity.
        unplumb(host);
        let _ = detach(conf, &e.pod);
        return Err(err);
    }
    eprintln!(
        "meshd-cni: {}/{} is {identity} ({})",
        e.pod.namespace,
        e.pod.name,
        proto::cert::list(&addrs)
    );
    Ok(spec::add_result(
        &conf.cni_version,
        host,
        &e.ifname,
        &e.netns,
        &addrs,
    ))
}

fn del(conf: &NetConf, e: &Env, host: &str) -> Result<(), CniError> {
    unplumb(host);
    match detach(conf, &e.pod) {
        Ok(()) => Ok(()),
        // meshd is down: when it comes back it asks the issuer about every workload it saved,
        // and the issuer's refusal (the pod is gone) withdraws it; with the issuer down too, it
        // lapses when its certificate expires. The pod's network is gone either way.
        Err(err) if err.code == spec::TRY_AGAIN_LATER => {
            eprintln!("meshd-cni: {}", err.msg);
            Ok(())
        }
        Err(err) => Err(err),
    }
}

fn check(conf: &NetConf, e: &Env, host: &str) -> Result<(), CniError> {
    let fail =
        |what: String| CniError::new(spec::IO_FAILURE, "pod network not as ADD made it", what);
    let addrs = in_force(conf, &e.pod)?;
    if !sh(&["ip", "link", "show", "dev", host]).0 {
        return Err(fail(format!("no host veth {host}")));
    }
    let (ok, shown) = sh(&[
        "nsenter",
        &format!("--net={}", e.netns),
        "ip",
        "-o",
        "addr",
        "show",
        "dev",
        &e.ifname,
    ]);
    for a in &addrs {
        if !ok || !shown.contains(&a.to_string()) {
            return Err(fail(format!("{} is not on {} in the pod", a, e.ifname)));
        }
    }
    if !sh(&[
        "nft",
        "list",
        "chain",
        "inet",
        spec::TABLE,
        &format!("pod-{host}"),
    ])
    .0
    {
        return Err(fail(format!("no anti-spoofing chain for {host}")));
    }
    Ok(())
}

/// The addresses of the pod's identity if meshd holds it in force, asked without changing
/// anything (CHECK must not: it never attaches what is missing).
fn in_force(conf: &NetConf, pod: &Pod) -> Result<Vec<proto::Cidr>, CniError> {
    let refused = |what: String| {
        CniError::new(
            spec::IDENTITY_REFUSED,
            "the pod's identity is not in force",
            what,
        )
    };
    let status = match ask(conf, &proto::admin::Request::Status, 5_000)? {
        proto::admin::Response::Status(s) => s,
        // meshd runs but cannot say now: as when it is down, ask again later.
        proto::admin::Response::Error { message } => {
            return Err(CniError::new(
                spec::TRY_AGAIN_LATER,
                "meshd could not give its status",
                message,
            ))
        }
        other => {
            return Err(CniError::new(
                spec::IO_FAILURE,
                "unexpected answer from meshd",
                format!("{other:?}"),
            ))
        }
    };
    let w = status
        .workloads
        .into_iter()
        .find(|w| w.namespace == pod.namespace && w.name == pod.name && w.uid == pod.uid)
        .ok_or_else(|| refused(format!("meshd has no pod {}/{}", pod.namespace, pod.name)))?;
    match w.certificate {
        Some(c) if w.state == proto::admin::IN_FORCE => Ok(c.addresses),
        _ => Err(refused(format!(
            "{}/{}: {}",
            pod.namespace, pod.name, w.state
        ))),
    }
}

/// Asks meshd to attach the pod; its identity and addresses once in force.
fn attach(conf: &NetConf, pod: &Pod) -> Result<(String, Vec<proto::Cidr>), CniError> {
    let req = proto::admin::Request::WorkloadAttach {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        wait_ms: conf.attach_wait_ms,
    };
    match ask(conf, &req, conf.attach_wait_ms + 2_000)? {
        proto::admin::Response::Workload {
            identity,
            addresses,
            ..
        } => Ok((identity, addresses)),
        proto::admin::Response::Error { message } => Err(CniError::new(
            spec::IDENTITY_REFUSED,
            "the mesh gave the pod no identity",
            message,
        )),
        other => Err(CniError::new(
            spec::IO_FAILURE,
            "unexpected answer from meshd",
            format!("{other:?}"),
        )),
    }
}

fn detach(conf: &NetConf, pod: &Pod) -> Result<(), CniError> {
    let req = proto::admin::Request::WorkloadDetach {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
    };
    match ask(conf, &req, 5_000)? {
        proto::admin::Response::Done { .. } => Ok(()),
        other => Err(CniError::new(
            spec::IO_FAILURE,
            "meshd did not detach the pod",
            format!("{other:?}"),
        )),
    }
}

/// One request on meshd's admin socket (one JSON line each way), within `timeout_ms`.
fn ask(
    conf: &NetConf,
    req: &proto::admin::Request,
    timeout_ms: u64,
) -> Result<proto::admin::Response, CniError> {
    let path = proto::admin::socket_path(&conf.mesh_interface);
    let down = |e: std::io::Error| {
        CniError::new(
            spec::TRY_AGAIN_LATER,
            format!("meshd of {} is not reachable", conf.mesh_interface),
            format!("{path}: {e}"),
        )
    };
    let mut s = std::os::unix::net::UnixStream::connect(&path).map_err(down)?;
    let timeout = Some(std::time::Duration::from_millis(timeout_ms));
    s.set_read_timeout(timeout).map_err(down)?;
    s.set_write_timeout(timeout).map_err(down)?;
    let mut line = serde_json::to_string(req).expect("a request serializes");
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(down)?;
    let mut answer = String::new();
    BufReader::new(s.take(proto::admin::MAX_MESSAGE_BYTES as u64))
        .read_line(&mut answer)
        .map_err(down)?;
    serde_json::from_str(&answer).map_err(|e| {
        CniError::new(
            spec::IO_FAILURE,
            "meshd's answer is not valid",
            e.to_string(),
        )
    })
}

/// Runs a command; (success, standard output).
fn sh(args: &[&str]) -> (bool, String) {
    match Command::new(args[0]).args(&args[1..]).output() {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        ),
        Err(_) => (false, String::new()),
    }
}

/// Runs a command that must succeed.
fn must(args: &[&str]) -> Result<String, CniError> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| {
            CniError::new(
                spec::IO_FAILURE,
                format!("running {}", args[0]),
                e.to_string(),
            )
        })?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(CniError::new(
            spec::IO_FAILURE,
            format!("`{}` failed", args.join(" ")),
            String::from_utf8_lossy(&o.stderr).trim().to_string(),
        ))
    }
}

/// Runs an nftables script from standard input.
fn nft(script: &str) -> Result<(), CniError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| CniError::new(spec::IO_FAILURE, "running nft", e.to_string()))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(|e| CniError::new(spec::IO_FAILURE, "writing to nft", e.to_string()))?;
    let o = child
        .wait_with_output()
        .map_err(|e| CniError::new(spec::IO_FAILURE, "running nft", e.to_string()))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(CniError::new(
            spec::IO_FAILURE,
            "nft refused the pod's rules",
            String::from_utf8_lossy(&o.stderr).trim().to_string(),
        ))
    }
}

/// The pod's network: the anti-spoofing rules first (so its first packet already meets them),
/// then the veth, addresses, neighbours and routes.
fn plumb(e: &Env, host: &str, mesh: &str, addrs: &[proto::Cidr]) -> Result<(), CniError> {
    let _lock = Lock::take()?;
    let new_table = !sh(&["nft", "list", "table", "inet", spec::TABLE]).0;
    nft(&spec::nft_install(host, addrs, mesh, new_table))?;
    save_addresses(host, addrs)?;
    let me = std::process::id().to_string();
    let netns = format!("--net={}", e.netns);
    let in_pod = |args: &[&str]| {
        let mut all = vec!["nsenter", netns.as_str()];
        all.extend_from_slice(args);
        must(&all)
    };
    // The mesh interface's MTU on both ends: the pod's packets fit the tunnel, so it never
    // depends on path-MTU discovery (a UDP sender of full-size datagrams would be refused).
    let mtu_path = format!("/sys/class/net/{mesh}/mtu");
    let mtu = std::fs::read_to_string(&mtu_path).map_err(|err| {
        CniError::new(
            spec::IO_FAILURE,
            format!("reading {mtu_path}"),
            err.to_string(),
        )
    })?;
    let mtu = mtu.trim();
    // Made in the pod's namespace, its peer moved to ours (this process's).
    in_pod(&[
        "ip", "link", "add", &e.ifname, "mtu", mtu, "type", "veth", "peer", "name", host, "mtu",
        mtu, "netns", &me,
    ])?;
    for (k, v) in [("rp_filter", "1"), ("forwarding", "1")] {
        must(&["sysctl", "-qw", &format!("net.ipv4.conf.{host}.{k}={v}")])?;
    }
    must(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    must(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
    let mac = must(&["cat", &format!("/sys/class/net/{host}/address")])?;
    let mac = mac.trim();
    let v4 = addrs.iter().any(|a| a.addr().is_ipv4());
    let v6 = addrs.iter().any(|a| a.addr().is_ipv6());
    if v6 {
        must(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{GATEWAY_V6}/64"),
            "dev",
            host,
            "nodad",
        ])?;
    }
    for a in addrs {
        in_pod(&[
            "ip",
            "addr",
            "add",
            &a.to_string(),
            "dev",
            &e.ifname,
            "nodad",
        ])?;
    }
    in_pod(&["ip", "link", "set", "dev", &e.ifname, "up"])?;
    if v4 {
        in_pod(&[
            "ip",
            "neigh",
            "replace",
            GATEWAY_V4,
            "lladdr",
            mac,
            "dev",
            &e.ifname,
            "nud",
            "permanent",
        ])?;
        in_pod(&[
            "ip", "route", "add", GATEWAY_V4, "dev", &e.ifname, "scope", "link",
        ])?;
        in_pod(&[
            "ip", "route", "add", "default", "via", GATEWAY_V4, "dev", &e.ifname,
        ])?;
    }
    if v6 {
        in_pod(&[
            "ip", "-6", "route", "add", "default", "via", GATEWAY_V6, "dev", &e.ifname,
        ])?;
    }
    // Traffic between pods of this node crosses the mesh interface too, so that both pods'
    // policies decide it: from any pod, this pod's addresses are routed to meshd (table
    // LOCAL_TABLE, asked first for packets that come in on a pod's veth); meshd writes what
    // passes back, and from the mesh interface the main table delivers it here. In place before
    // the veth carries anything.
    let table = LOCAL_TABLE.to_string();
    for a in addrs {
        must(&[
            "ip",
            "route",
            "replace",
            &a.to_string(),
            "dev",
            mesh,
            "table",
            &table,
        ])?;
    }
    for family in ["-4", "-6"] {
        must(&[
            "ip", family, "rule", "add", "iif", host, "lookup", &table, "priority", &table,
        ])?;
    }
    // Last, the host side: up, and the route to the pod through it.
    must(&["ip", "link", "set", "dev", host, "up"])?;
    for a in addrs {
        must(&["ip", "route", "replace", &a.to_string(), "dev", host])?;
    }
    Ok(())
}

/// Removes what [`plumb`] made; what is already gone is no error.
fn unplumb(host: &str) {
    let Ok(_lock) = Lock::take() else {
        return;
    };
    let table = LOCAL_TABLE.to_string();
    let addrs = saved_addresses(host);
    for a in &addrs {
        let _ = sh(&["ip", "route", "del", &a.to_string(), "table", &table]);
    }
    for family in ["-4", "-6"] {
        let _ = sh(&["ip", family, "rule", "del", "iif", host, "lookup", &table]);
    }
    // Deleting the host side deletes the pair, and the routes through it.
    let _ = sh(&["ip", "link", "del", "dev", host]);
    let _ = nft(&spec::nft_remove(host, &addrs));
    let _ = std::fs::remove_file(state_path(host));
}

/// Where the addresses of the pod behind veth `host` are kept from ADD to DEL (the veth and its
/// routes may be gone by then, with the pod's namespace).
fn state_path(host: &str) -> std::path::PathBuf {
    std::path::Path::new(STATE_DIR).join(host)
}

fn save_addresses(host: &str, addrs: &[proto::Cidr]) -> Result<(), CniError> {
    let text: String = addrs.iter().map(|a| format!("{a}\n")).collect();
    std::fs::write(state_path(host), text).map_err(|e| {
        CniError::new(
            spec::IO_FAILURE,
            "saving the pod's addresses",
            e.to_string(),
        )
    })
}

fn saved_addresses(host: &str) -> Vec<proto::Cidr> {
    std::fs::read_to_string(state_path(host))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

/// An exclusive lock held while the shared nftables table is changed, so that two pods added at
/// once never both create it.
struct Lock(#[allow(dead_code)] std::fs::File);

impl Lock {
    fn take() -> Result<Lock, CniError> {
        use std::os::fd::AsRawFd;
        let dir = std::path::Path::new(STATE_DIR);
        let io =
            |e: std::io::Error| CniError::new(spec::IO_FAILURE, "the plugin's lock", e.to_string());
        std::fs::create_dir_all(dir).map_err(io)?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(io)?;
        // SAFETY: flock(2) on a descriptor we own; released when it closes.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        Ok(Lock(f))
    }
}
