//! A test harness that builds real hosts on one machine: network namespaces joined by veth pairs,
//! real `meshd`, `wireguard-go` and `wg` processes inside them, and traffic from threads that
//! enter a namespace. Everything a [`Lab`] creates is removed when it is dropped, also when a test
//! fails part-way.
//!
//! Addresses: underlay from 198.18.0.0/15 (IPv6 fd01::/64), overlay from 100.64.0.0/10 (IPv6
//! fd00::/64), all inside namespaces the lab made.

pub mod policy_lab;
pub mod traffic;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

/// True if this machine can run the network tests (root and /dev/net/tun). When it cannot, the
/// test is skipped with a message, except under `CI=true`, where it fails loudly.
pub fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tun = Path::new("/dev/net/tun").exists();
    let tools = ["ip", "wg", "ping"].iter().all(|t| which(t).is_some());
    if root && tun && tools {
        return true;
    }
    let why = format!("needs root ({root}), /dev/net/tun ({tun}) and ip, wg, ping ({tools})");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("network test cannot run under CI: {why}");
    }
    eprintln!("SKIPPED: {why}");
    false
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// The path of a workspace binary, built (once per test process) in the profile this test runs in.
pub fn bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir")
        .to_path_buf();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-q",
            "-p",
            "meshd",
            "-p",
            "meshctl",
            "-p",
            "meshd-cni",
        ]);
        if profile_dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(
            status.success(),
            "cargo build of meshd, meshctl and meshd-cni failed"
        );
    });
    let p = profile_dir.join(name);
    assert!(p.exists(), "{} not built", p.display());
    p
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn sh(args: &[&str]) -> String {
    let out = run(Command::new(args[0]).args(&args[1..]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static LABS: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// Removes the namespaces of labs whose test process died without its `Drop` running (killed,
/// or the machine stopped mid-run): each lab's directory names its owner's pid and its
/// namespaces. Logs kept by a failed test stay; only its namespaces go. Never panics.
fn sweep_orphans() {
    let Ok(dirs) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for d in dirs.flatten() {
        let dir = d.path();
        if !d.file_name().to_string_lossy().starts_with("meshtest-") {
            continue;
        }
        let Some(pid) = std::fs::read_to_string(dir.join("owner.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only asks whether the process exists.
        let alive = pid as u32 == std::process::id() || unsafe { libc::kill(pid, 0) } == 0;
        if alive {
            continue;
        }
        let list = dir.join("namespaces");
        for ns in std::fs::read_to_string(&list).unwrap_or_default().lines() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns.trim()])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_file(&list);
        let _ = std::fs::remove_file(dir.join("owner.pid"));
    }
}

/// A set of hosts (network namespaces) and the processes running in them.
pub struct Lab {
    /// Unique per lab: namespaces, interfaces and socket names all start with it.
    pub prefix: String,
    namespaces: Vec<String>,
    children: Vec<(String, Child)>,
    pub dir: PathBuf,
    /// Environment given to every meshd started from now on (`NOTIFY_SOCKET`, say).
    pub env: Vec<(String, String)>,
    /// A command meshd is started under from now on (`strace -f -o FILE`, say).
    pub exec_prefix: Vec<String>,
}

impl Lab {
    pub fn new() -> Lab {
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("mt{:04x}{n}", std::process::id() & 0xffff);
        let dir = std::env::temp_dir().join(format!("meshtest-{prefix}"));
        SWEEP.call_once(sweep_orphans);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("lab temp dir");
        let _ = std::fs::write(dir.join("owner.pid"), std::process::id().to_string());
        Lab {
            prefix,
            namespaces: Vec::new(),
            children: Vec::new(),
            dir,
            env: Vec::new(),
            exec_prefix: Vec::new(),
        }
    }

    /// A name unique to this lab, short enough for an interface (15 bytes).
    pub fn name(&self, suffix: &str) -> String {
        let n = format!("{}{suffix}", self.prefix);
        assert!(n.len() <= 15, "interface name {n} too long");
        n
    }

    /// Creates a host: a network namespace with loopback up and IPv6 DAD off (so addresses are
    /// usable at once).
    pub fn host(&mut self, suffix: &str) -> String {
        let ns = self.name(suffix);
        sh(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        // For the sweep of a later run, should this process die before its Drop.
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("namespaces"))
        {
            let _ = writeln!(f, "{ns}");
        }
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        for k in [
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ] {
            sh(&["ip", "netns", "exec", &ns, "sysctl", "-qw", k]);
        }
        ns
    }

    /// Joins two hosts with a veth pair; returns the two interface names.
    pub fn link(
        &mut self,
        a: &str,
        a_addrs: &[&str],
        b: &str,
        b_addrs: &[&str],
    ) -> (String, String) {
        let (ia, ib) = (format!("v{a}"), format!("v{b}"));
        let (ia, ib) = (truncate(&ia), truncate(&ib));
        sh(&[
            "ip", "link", "add", &ia, "netns", a, "type", "veth", "peer", "name", &ib, "netns", b,
        ]);
        for (ns, ifc, addrs) in [(a, &ia, a_addrs), (b, &ib, b_addrs)] {
            for addr in addrs {
                sh(&["ip", "-n", ns, "addr", "add", addr, "dev", ifc, "nodad"]);
            }
            sh(&["ip", "-n", ns, "link", "set", ifc, "up"]);
        }
        (ia, ib)
    }

    /// Starts meshd in the foreground in `ns` with interface `ifname`; returns once its UAPI socket
    /// answers.
    pub fn meshd(&mut self, ns: &str, ifname: &str) {
        self.spawn_meshd(ns, ifname, &[ifname.as_ref()]);
    }

    /// Runs `meshd --foreground ARGS` in `ns`, logging to the lab directory as `ifname`, and
    /// waits for its UAPI socket.
    fn spawn_meshd(&mut self, ns: &str, ifname: &str, args: &[&std::ffi::OsStr]) {
        let log = File::create(self.dir.join(format!("{ifname}.log"))).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(&self.exec_prefix)
            .arg(bin("meshd"))
            .arg("--foreground")
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning meshd");
        self.children.push((ifname.to_string(), child));
        self.wait_for_uapi(ifname);
    }

    /// Runs `program ARGS` in `ns` as process `name` (stopped with the lab), its standard output
    /// and error in the lab directory as `name.log`.
    pub fn spawn(&mut self, ns: &str, name: &str, program: &Path, args: &[&str]) {
        self.forget_exited(name);
        let log = File::create(self.dir.join(format!("{name}.log"))).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawning");
        self.children.push((name.to_string(), child));
    }

    /// Forgets a daemon of interface `ifname` that has exited, so that another can take the name.
    fn forget_exited(&mut self, ifname: &str) {
        self.children
            .retain_mut(|(n, c)| n != ifname || matches!(c.try_wait(), Ok(None)));
    }

    /// Starts Debian's wireguard-go in the foreground in `ns` with interface `ifname`.
    pub fn wireguard_go(&mut self, ns: &str, ifname: &str) {
        self.forget_exited(ifname);
        let log = File::create(self.dir.join(format!("{ifname}.log"))).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "wireguard-go", "-f", ifname])
            .env("LOG_LEVEL", "debug")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawning wireguard-go (is it installed?)");
        self.children.push((ifname.to_string(), child));
        self.wait_for_uapi(ifname);
    }

    fn wait_for_uapi(&mut self, ifname: &str) {
        let sock = format!("/var/run/wireguard/{ifname}.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                return;
            }
            if let Some(status) = self.child(ifname).try_wait().expect("wait") {
                panic!("{ifname} exited at start ({status}): {}", self.log(ifname));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{sock} did not appear: {}", self.log(ifname));
    }

    pub fn child(&mut self, ifname: &str) -> &mut Child {
        &mut self
            .children
            .iter_mut()
            .find(|(n, _)| n == ifname)
            .expect("no such process")
            .1
    }

    /// True while the daemon of `ifname` runs.
    pub fn alive(&mut self, ifname: &str) -> bool {
        self.child(ifname).try_wait().expect("wait").is_none()
    }

    /// Sends `signal` to the daemon of `ifname` and waits (up to 10 s) for it to exit.
    pub fn stop(&mut self, ifname: &str, signal: i32) -> std::process::ExitStatus {
        let child = self.child(ifname);
        // `ip netns exec` execs the daemon, so the child's pid is the daemon's.
        // SAFETY: kill(2) on a pid we spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = child.try_wait().expect("wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{ifname} did not exit on signal {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the daemon of `ifname` without waiting (SIGHUP, say).
    pub fn signal(&mut self, ifname: &str, signal: i32) {
        let child = self.child(ifname);
        // SAFETY: kill(2) on a pid we spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, signal) };
    }

    pub fn log(&self, ifname: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{ifname}.log"))).unwrap_or_default()
    }

    /// Runs a command inside `ns`.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?} in {ns}: {e}"))
    }

    /// Runs a command inside `ns` and panics if it fails.
    pub fn exec_ok(&self, ns: &str, args: &[&str]) -> String {
        let out = self.exec(ns, args);
        assert!(
            out.status.success(),
            "{args:?} in {ns} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// True if `count` pings from `ns` to `addr` get at least one reply.
    pub fn ping(&self, ns: &str, addr: &str, count: u32) -> bool {
        self.exec(
            ns,
            &[
                "ping",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-W",
                "2",
                addr,
            ],
        )
        .status
        .success()
    }

    /// Pings until one reply or `timeout`; true if a reply came.
    pub fn ping_until(&self, ns: &str, addr: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .exec(ns, &["ping", "-c", "1", "-W", "1", addr])
                .status
                .success()
            {
                return true;
            }
        }
        false
    }

    /// Status of the meshd of `ifname`, as `meshctl status -o json` prints it.
    pub fn status(&self, ifname: &str) -> serde_json::Value {
        let out = run(Command::new(bin("meshctl")).args(["status", "-i", ifname, "-o", "json"]));
        serde_json::from_slice(&out.stdout).expect("meshctl status -o json is JSON")
    }

    /// Starts `tcpdump` writing every frame of `ifc` in `ns` to a file; stop it with
    /// [`Capture::finish`].
    /// Captures every frame on `ifc` in `ns` until [`Capture::finish`]. A wire carries datagrams
    /// one by one, while a veth pair passes a UDP GSO batch across whole: both ends of the link
    /// are first made to cut batches in software (`gso_max_segs 1`), so the capture holds the
    /// datagrams a physical wire would.
    pub fn capture(&mut self, ns: &str, ifc: &str) -> Capture {
        self.segment_on_wire(ns, ifc);
        let path = self.dir.join(format!("{ifc}.pcap"));
        let err_path = self.dir.join(format!("{ifc}.tcpdump.log"));
        let child = Command::new("ip")
            .args([
                "netns", "exec", ns, "tcpdump", "-i", ifc, "-U", "-B", "16384", "-s", "0", "-w",
            ])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(File::create(&err_path).expect("tcpdump log"))
            .spawn()
            .expect("spawning tcpdump (is it installed?)");
        // tcpdump says "listening on" once the capture runs.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = std::fs::read_to_string(&err_path).unwrap_or_default();
            if log.contains("listening on") {
                break;
            }
            assert!(Instant::now() < deadline, "tcpdump did not start: {log}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Capture { child, path }
    }
}

impl Lab {
    /// Sets `gso_max_segs 1` on `ifc` and on its veth peer, wherever in this lab that is.
    fn segment_on_wire(&self, ns: &str, ifc: &str) {
        let set = |ns: &str, ifc: &str| {
            let ok = Command::new("ip")
                .args(["-n", ns, "link", "set", "dev", ifc, "gso_max_segs", "1"])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "cannot set gso_max_segs on {ifc} in {ns}");
        };
        set(ns, ifc);
        // "5: name@if4: ..." : this link's index, and its peer's.
        let links = |ns: &str| -> Vec<(u32, String, u32)> {
            let out = Command::new("ip").args(["-n", ns, "-o", "link"]).output();
            let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            text.unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let mut f = l.split(": ");
                    let index = f.next()?.trim().parse().ok()?;
                    let (name, peer) = f.next()?.split_once("@if")?;
                    Some((index, name.to_string(), peer.parse().ok()?))
                })
                .collect()
        };
        let Some((index, _, peer)) = links(ns).into_iter().find(|(_, n, _)| n == ifc) else {
            return; // not a veth
        };
        for other in &self.namespaces {
            for (i, name, p) in links(other) {
                if i == peer && p == index && !(other == ns && name == ifc) {
                    set(other, &name);
                }
            }
        }
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            // A reaped child's pid may belong to someone else by now: signal only live ones.
            if matches!(child.try_wait(), Ok(None)) {
                // SAFETY: signalling our own unreaped child.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            }
        }
        for (_, child) in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for (name, _) in &self.children {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{name}.sock"));
            let _ = std::fs::remove_file(format!("/var/run/meshd/{name}.sock"));
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("lab logs kept in {}", self.dir.display());
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(15).collect()
}

pub struct Capture {
    child: Child,
    pub path: PathBuf,
}

impl Capture {
    /// Stops the capture and returns the captured frames.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let data = std::fs::read(&self.path).expect("reading capture");
        pcap_frames(&data)
    }
}

/// The frames of a classic pcap file (little-endian, as tcpdump writes on x86).
pub fn pcap_frames(data: &[u8]) -> Vec<Vec<u8>> {
    assert!(data.len() >= 24, "capture file too short");
    assert_eq!(
        &data[..4],
        &[0xd4, 0xc3, 0xb2, 0xa1],
        "not a little-endian pcap file"
    );
    let mut frames = Vec::new();
    let mut off = 24;
    while off + 16 <= data.len() {
        let incl = u32::from_le_bytes(data[off + 8..off + 12].try_into().unwrap()) as usize;
        off += 16;
        if off + incl > data.len() {
            break;
        }
        frames.push(data[off..off + incl].to_vec());
        off += incl;
    }
    frames
}

/// Runs `f` on a thread that has entered network namespace `ns`, and returns its result.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on a valid namespace descriptor affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// The byte at offset `i` of the test stream: a cheap pseudo-random pattern, so a dropped,
/// duplicated or reordered segment shows up as a mismatch.
#[inline]
pub fn pattern(i: u64) -> u8 {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i >> 7);
    x ^= x >> 29;
    x as u8
}

/// A TCP listener in `ns` on `addr` that reads one connection and checks it carries exactly
/// `bytes` of [`pattern`] (or, with a `canary`, the canary repeated). Returns the listener thread.
pub fn tcp_sink(
    ns: &str,
    addr: SocketAddr,
    bytes: u64,
    canary: Option<&'static [u8]>,
) -> std::thread::JoinHandle<Result<u64, String>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let h = in_netns(ns, move || {
        let listener = match TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready_tx.send(());
                return Err(format!("bind {addr}: {e}"));
            }
        };
        let _ = ready_tx.send(());
        listener.set_nonblocking(false).ok();
        let (mut s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut buf = vec![0u8; 1 << 16];
        let mut got: u64 = 0;
        loop {
            let n = match s.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("read after {got} bytes: {e}")),
            };
            if n == 0 {
                break;
            }
            for (k, b) in buf[..n].iter().enumerate() {
                let i = got + k as u64;
                let want = match canary {
                    Some(c) => c[(i % c.len() as u64) as usize],
                    None => pattern(i),
                };
                if *b != want {
                    return Err(format!("byte {i} is {b:#x}, expected {want:#x}"));
                }
            }
            got += n as u64;
        }
        if got != bytes {
            return Err(format!("received {got} bytes, expected {bytes}"));
        }
        Ok(got)
    });
    let _ = ready_rx.recv_timeout(Duration::from_secs(5));
    h
}

/// Connects from `ns` to `addr` and sends `bytes` of [`pattern`] (or the canary), in chunks with
/// `pause` between them. Returns the elapsed time.
pub fn tcp_send(
    ns: &str,
    addr: SocketAddr,
    bytes: u64,
    canary: Option<&'static [u8]>,
    pause: Duration,
) -> Result<Duration, String> {
    in_netns(ns, move || {
        let start = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_write_timeout(Some(Duration::from_secs(30))).ok();
        let mut buf = vec![0u8; 1 << 16];
        let mut sent: u64 = 0;
        while sent < bytes {
            let n = ((bytes - sent) as usize).min(buf.len());
            for (k, b) in buf[..n].iter_mut().enumerate() {
                let i = sent + k as u64;
                *b = match canary {
                    Some(c) => c[(i % c.len() as u64) as usize],
                    None => pattern(i),
                };
            }
            s.write_all(&buf[..n])
                .map_err(|e| format!("write after {sent} bytes: {e}"))?;
            sent += n as u64;
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
        s.shutdown(std::net::Shutdown::Write).ok();
        // Wait for the sink to close, so the transfer is complete end to end.
        let _ = s.read(&mut buf);
        Ok(start.elapsed())
    })
    .join()
    .map_err(|_| "sender thread panicked".to_string())?
}

/// Sends `bytes` from `from_ns` to `to_addr` in `to_ns` and checks it arrives byte for byte.
pub fn tcp_transfer(from_ns: &str, to_ns: &str, to_addr: SocketAddr, bytes: u64) -> Duration {
    let sink = tcp_sink(to_ns, to_addr, bytes, None);
    let elapsed = tcp_send(from_ns, to_addr, bytes, None, Duration::ZERO)
        .unwrap_or_else(|e| panic!("sending to {to_addr}: {e}"));
    let got = sink.join().expect("sink thread");
    assert_eq!(got, Ok(bytes), "transfer to {to_addr}");
    elapsed
}

/// Writes a fresh WireGuard private key to a file (mode 0600) for `wg set ... private-key` and
/// returns (path, public key).
pub fn keypair(lab: &Lab, name: &str) -> (PathBuf, String) {
    let key = sh(&["wg", "genkey"]);
    let path = lab.dir.join(format!("{name}.key"));
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .expect("key file");
        f.write_all(key.as_bytes()).expect("write key");
    }
    let out = Command::new("wg")
        .arg("pubkey")
        .stdin(File::open(&path).expect("key"))
        .output()
        .expect("wg pubkey");
    (
        path,
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

/// `wg` with the given arguments; panics on failure.
pub fn wg(args: &[&str]) -> String {
    let mut v = vec!["wg"];
    v.extend_from_slice(args);
    sh(&v)
}

/// Which implementation a node runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Impl {
    Meshd,
    WireguardGo,
}

/// Two hosts `a` and `b` joined by a veth (underlay 198.18.0.1/.2 and fd01::1/::2), each running a
/// WireGuard interface (overlay 100.64.0.1/.2 and fd00::1/::2) configured as the other's peer.
pub struct Pair {
    pub a: String,
    pub b: String,
    pub ia: String,
    pub ib: String,
    pub veth_a: String,
    pub veth_b: String,
    pub pub_a: String,
    pub pub_b: String,
    pub key_a: PathBuf,
    pub key_b: PathBuf,
}

pub const PORT_A: u16 = 51820;
pub const PORT_B: u16 = 51821;

impl Pair {
    pub fn new(lab: &mut Lab, b_impl: Impl) -> Pair {
        Self::with_endpoints(lab, b_impl, "198.18.0.1", "198.18.0.2")
    }

    /// As [`Pair::new`], with the endpoints each side is told (IPv4 or IPv6 underlay).
    pub fn with_endpoints(lab: &mut Lab, b_impl: Impl, ep_a: &str, ep_b: &str) -> Pair {
        let a = lab.host("a");
        let b = lab.host("b");
        let (veth_a, veth_b) = lab.link(
            &a,
            &["198.18.0.1/24", "fd01::1/64"],
            &b,
            &["198.18.0.2/24", "fd01::2/64"],
        );
        let ia = lab.name("wa");
        let ib = lab.name("wb");
        lab.meshd(&a, &ia);
        match b_impl {
            Impl::Meshd => lab.meshd(&b, &ib),
            Impl::WireguardGo => lab.wireguard_go(&b, &ib),
        }
        let (key_a, pub_a) = keypair(lab, "a");
        let (key_b, pub_b) = keypair(lab, "b");
        let fmt_ep = |ip: &str, port: u16| {
            if ip.contains(':') {
                format!("[{ip}]:{port}")
            } else {
                format!("{ip}:{port}")
            }
        };
        wg(&[
            "set",
            &ia,
            "private-key",
            key_a.to_str().unwrap(),
            "listen-port",
            &PORT_A.to_string(),
            "peer",
            &pub_b,
            "endpoint",
            &fmt_ep(ep_b, PORT_B),
            "allowed-ips",
            "100.64.0.2/32,fd00::2/128",
        ]);
        wg(&[
            "set",
            &ib,
            "private-key",
            key_b.to_str().unwrap(),
            "listen-port",
            &PORT_B.to_string(),
            "peer",
            &pub_a,
            "endpoint",
            &fmt_ep(ep_a, PORT_A),
            "allowed-ips",
            "100.64.0.1/32,fd00::1/128",
        ]);
        for (ns, ifc, v4, v6) in [
            (&a, &ia, "100.64.0.1/24", "fd00::1/64"),
            (&b, &ib, "100.64.0.2/24", "fd00::2/64"),
        ] {
            sh(&["ip", "-n", ns, "addr", "add", v4, "dev", ifc]);
            sh(&["ip", "-n", ns, "addr", "add", v6, "dev", ifc, "nodad"]);
            sh(&["ip", "-n", ns, "link", "set", ifc, "up"]);
        }
        Pair {
            a,
            b,
            ia,
            ib,
            veth_a,
            veth_b,
            pub_a,
            pub_b,
            key_a,
            key_b,
        }
    }
}

/// Parses `wg show IFNAME dump`: the interface line, then one line per peer with
/// public key, preshared key, endpoint, allowed ips, latest handshake, rx, tx, keepalive.
pub fn wg_dump_peers(ifname: &str) -> Vec<Vec<String>> {
    wg(&["show", ifname, "dump"])
        .lines()
        .skip(1)
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

/// A switch: a namespace holding a bridge that hosts attach to, for topologies of more than two.
pub struct Switch {
    pub ns: String,
}

impl Lab {
    pub fn switch(&mut self) -> Switch {
        self.switch_named("sw")
    }

    /// A second (third...) switch: `suffix` names its namespace.
    pub fn switch_named(&mut self, suffix: &str) -> Switch {
        let ns = self.host(suffix);
        sh(&["ip", "-n", &ns, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &ns, "link", "set", "br0", "up"]);
        Switch { ns }
    }

    /// Attaches `host` to the switch with underlay address `addr` (CIDR) on its interface `u0`.
    pub fn attach(&mut self, sw: &Switch, host: &str, addr: &str) {
        self.attach_as(sw, host, "u0", addr);
    }

    /// [`Lab::attach`] on the host's interface `ifc` (a host on two switches).
    pub fn attach_as(&mut self, sw: &Switch, host: &str, ifc: &str, addr: &str) {
        let port = truncate(&format!("p{host}{ifc}"));
        sh(&[
            "ip", "link", "add", ifc, "netns", host, "type", "veth", "peer", "name", &port,
            "netns", &sw.ns,
        ]);
        sh(&["ip", "-n", &sw.ns, "link", "set", &port, "master", "br0"]);
        sh(&["ip", "-n", &sw.ns, "link", "set", &port, "up"]);
        sh(&["ip", "-n", host, "addr", "add", addr, "dev", ifc, "nodad"]);
        sh(&["ip", "-n", host, "link", "set", ifc, "up"]);
    }

    /// Starts meshd in mesh mode in `ns` from the configuration file `config` (again, after
    /// [`Lab::stop`], for a restart).
    /// Starts `meshd --foreground --config CONFIG` in `ns` as user and group `uid`, holding only
    /// CAP_NET_ADMIN and CAP_NET_BIND_SERVICE (ambient), as `deploy/systemd/meshd-mesh.service`
    /// runs it. Its socket directories are private tmpfs mounts of its own mount namespace, owned
    /// by that user, so the host's stay root's: reach it over the overlay, not its sockets. The
    /// files the configuration names must be readable by `uid`, and its state directory
    /// writable.
    pub fn meshd_unprivileged(&mut self, ns: &str, ifname: &str, config: &Path, uid: u32) {
        let log = File::create(self.dir.join(format!("{ifname}.log"))).expect("log file");
        // Every step execs the next, so the child's pid is meshd's.
        // Debian makes /dev/net/tun mode 0666, as meshd expects; some sandboxes make it 0600, so
        // a node of that mode is made in the private mount namespace.
        let script = format!(
            "set -e; for d in /run/wireguard /run/meshd /run/meshd-dev; do mkdir -p $d; \
             mount -t tmpfs -o mode=0755 none $d; chown {uid}:{uid} $d; done; \
             mknod -m 0666 /run/meshd-dev/tun c 10 200; \
             mount --bind /run/meshd-dev/tun /dev/net/tun; \
             exec setpriv --reuid={uid} --regid={uid} --clear-groups \
             --inh-caps=+net_admin,+net_bind_service --ambient-caps=+net_admin,+net_bind_service \
             \"$0\" --foreground --config \"$1\""
        );
        let child = Command::new("ip")
            .args([
                "netns", "exec", ns, "unshare", "--mount", "sh", "-c", &script,
            ])
            .arg(bin("meshd"))
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning meshd");
        self.children.push((ifname.to_string(), child));
    }

    pub fn meshd_config(&mut self, ns: &str, ifname: &str, config: &Path) {
        self.forget_exited(ifname);
        self.spawn_meshd(ns, ifname, &["--config".as_ref(), config.as_os_str()]);
    }
}

/// A CA and the identities of a test mesh, made with the real meshctl.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(lab: &Lab, trust_domain: &str, name: &str) -> Pki {
        let dir = lab.dir.join(name);
        run(Command::new(bin("meshctl"))
            .args(["ca", "init", "--trust-domain", trust_domain, "--out"])
            .arg(&dir));
        Pki { dir }
    }

    /// A CA that grants only addresses inside `ranges` (comma-separated CIDRs).
    pub fn with_ranges(lab: &Lab, trust_domain: &str, name: &str, ranges: &str) -> Pki {
        let dir = lab.dir.join(name);
        run(Command::new(bin("meshctl"))
            .args([
                "ca",
                "init",
                "--trust-domain",
                trust_domain,
                "--addresses",
                ranges,
            ])
            .arg("--out")
            .arg(&dir));
        Pki { dir }
    }

    /// Issues an identity `ns/name` with overlay address `ip` (extra meshctl arguments allowed);
    /// returns (certificate, key) paths.
    pub fn issue(&self, ns: &str, name: &str, ip: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
        let out = self.dir.join("ids");
        run(Command::new(bin("meshctl"))
            .args(["identity", "issue", "--ca"])
            .arg(&self.dir)
            .args(["--namespace", ns, "--name", name, "--ip", ip, "--out"])
            .arg(&out)
            .args(extra));
        (
            out.join(format!("{name}.crt")),
            out.join(format!("{name}.key")),
        )
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
}

/// Writes a mesh-mode configuration for interface `ifname`; returns its path.
/// A mesh-mode configuration for tests of peering, not policy: Calico's posture, so that with no
/// policy set every flow passes.
pub fn mesh_config(
    lab: &Lab,
    ifname: &str,
    cert: &Path,
    key: &Path,
    bundle: &[PathBuf],
    seeds: &[&str],
) -> PathBuf {
    mesh_config_with(
        lab,
        ifname,
        cert,
        key,
        bundle,
        seeds,
        &MeshPolicy::default(),
    )
}

/// The `[policy]` settings and policy-admin keys of a test node.
pub struct MeshPolicy {
    pub posture: &'static str,
    pub audit: bool,
    pub admins: Vec<PathBuf>,
}

impl Default for MeshPolicy {
    fn default() -> Self {
        MeshPolicy {
            posture: "calico",
            audit: false,
            admins: Vec::new(),
        }
    }
}

pub fn mesh_config_with(
    lab: &Lab,
    ifname: &str,
    cert: &Path,
    key: &Path,
    bundle: &[PathBuf],
    seeds: &[&str],
    policy: &MeshPolicy,
) -> PathBuf {
    let q = |p: &Path| format!("\"{}\"", p.display());
    let text = format!(
        "[interface]\nname = \"{ifname}\"\nlisten_port = 51820\n\n[identity]\ncertificate = {}\nprivate_key = {}\n\n[trust]\nbundle = [{}]\npolicy_admins = [{}]\n\n[peering]\nseeds = [{}]\nstate_dir = {}\n\n[policy]\nposture = \"{}\"\naudit = {}\n\n[metrics]\nlisten = \"{METRICS}\"\n",
        q(cert),
        q(key),
        bundle.iter().map(|b| q(b)).collect::<Vec<_>>().join(", "),
        policy.admins.iter().map(|b| q(b)).collect::<Vec<_>>().join(", "),
        seeds.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", "),
        q(&lab.dir.join(format!("state-{ifname}"))),
        policy.posture,
        policy.audit,
    );
    let path = lab.dir.join(format!("{ifname}.toml"));
    std::fs::write(&path, text).expect("writing config");
    path
}

/// Where every test node serves its metrics and health endpoints: its namespace's own loopback.
pub const METRICS: &str = "127.0.0.1:9469";

/// `GET path` from the metrics listener of the node in `ns`: the status code and the body.
pub fn http_get(ns: &str, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&METRICS.parse().unwrap(), Duration::from_secs(2))
            .expect("connecting to the metrics listener");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        s.write_all(request.as_bytes())
            .expect("sending the request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("reading the answer");
        let code = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        (code, body.to_string())
    })
    .join()
    .expect("metrics request")
}

/// The value of the sample `series` (name and labels exactly as exposed) in metrics `text`.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Runs meshctl here (outside any namespace), with nothing on standard input.
pub fn meshctl(args: &[&str]) -> Output {
    Command::new(bin("meshctl"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running meshctl")
}

/// What a command printed, standard output then standard error.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The public key an issuer spawned as "issuer" in `lab` prints once it listens.
pub fn issuer_key(lab: &Lab) -> String {
    let log = lab.dir.join("issuer.log");
    let mut key = None;
    wait_for("the issuer to listen", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        key = text
            .lines()
            .find(|l| l.trim_start().starts_with("key "))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(str::to_string);
        key.is_some()
    });
    key.expect("waited for above")
}

/// Waits until `done` holds, checking every 50 ms; fails the test naming `what` after `limit`.
/// Returns how long it took.
pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// Whether a TCP connection from `ns` to `addr` opens within `timeout`.
pub fn tcp_connects(ns: &str, addr: SocketAddr, timeout: Duration) -> bool {
    in_netns(ns, move || {
        TcpStream::connect_timeout(&addr, timeout).is_ok()
    })
    .join()
    .unwrap_or(false)
}

/// A TCP server in `ns` on `addr` that accepts (and closes) every connection, for the life of the
/// test process; returns once it listens.
pub fn tcp_accept_all(ns: &str, addr: SocketAddr) {
    let (tx, rx) = std::sync::mpsc::channel();
    drop(in_netns(ns, move || {
        let l = TcpListener::bind(addr).expect("bind");
        let _ = tx.send(());
        for s in l.incoming() {
            drop(s);
        }
    }));
    rx.recv_timeout(Duration::from_secs(5)).expect("listening");
}

/// The flow log of the daemon of interface `ifname` (`meshctl flows -o json`), denied flows only
/// with `denied`.
pub fn flow_records(ifname: &str, denied: bool) -> Vec<serde_json::Value> {
    let mut cmd = Command::new(bin("meshctl"));
    cmd.args(["flows", "-o", "json", "-i", ifname]);
    if denied {
        cmd.arg("--denied");
    }
    let out = run(&mut cmd);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("flow record is JSON"))
        .collect()
}
