//! The device: one TUN interface, one UDP socket, and the peers. Configuration changes (from the
//! UAPI) build a new immutable [`Snapshot`] and publish it with one atomic pointer swap; the
//! data-path threads read the current snapshot without taking any lock, and lock only the one
//! peer a packet belongs to.

mod datapath;
mod receive;
mod send;
mod tun;
mod udp;

use crate::drops::DropCounters;
use crate::peer::Peer;
use crate::routing::AllowedIps;
use anyhow::Context;
use arc_swap::{ArcSwap, ArcSwapOption};
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519;
use parking_lot::Mutex;
use proto::relay::{Endpoint, Tag};
use proto::uapi::{self, DeviceInfo, PeerInfo, SetRequest, UapiError};
use proto::Key;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::SystemTime;

pub use datapath::run_timers;

/// Handshake messages per second above which the device answers with cookies
/// (WireGuard paper section 5.3; boringtun's device uses the same figure).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

pub struct Device {
    pub name: String,
    pub mtu_bytes: u32,
    tun: tun::Tun,
    /// Whether offloads are wanted (`--offloads`); each is still used only where the kernel has it.
    offloads_wanted: bool,
    config: Mutex<Config>,
    snapshot: ArcSwap<Snapshot>,
    udp: ArcSwapOption<udp::Underlay>,
    /// Drops not attributable to one peer.
    pub drops: DropCounters,
    /// Control-protocol bytes (UDP payload) received and sent.
    pub control_rx_bytes: std::sync::atomic::AtomicU64,
    pub control_tx_bytes: std::sync::atomic::AtomicU64,
    /// Where control-protocol datagrams go in mesh mode.
    control: std::sync::OnceLock<tokio::sync::mpsc::Sender<(Endpoint, Vec<u8>)>>,
    /// Whether this node relays frames between its members (`[relay] serve`; PROTOCOL.md §9).
    relay_serve: std::sync::atomic::AtomicBool,
    /// Frames relayed, and their bytes.
    pub relayed: std::sync::atomic::AtomicU64,
    pub relayed_bytes: std::sync::atomic::AtomicU64,
    /// TUN reads and writes, and the segments they carried (added once per batch).
    pub tun_io: TunIo,
    /// Milliseconds since the Unix epoch, as of the last timer tick (250 ms): what the data path
    /// stamps packets with, without a clock read per packet.
    clock_ms: std::sync::atomic::AtomicU64,
    /// Mesh mode: policy enforcement on both data paths.
    enforcer: std::sync::OnceLock<Arc<crate::enforce::Enforcer>>,
}

/// What went through the TUN device: the reads and the segments they were cut into, the writes
/// and the packets they carried.
#[derive(Default)]
pub struct TunIo {
    pub reads: AtomicU64,
    pub read_segments: AtomicU64,
    pub writes: AtomicU64,
    pub written_packets: AtomicU64,
}

struct Config {
    private_key: Option<Key>,
    /// The port the socket is bound to (the operator's, or the kernel's pick for 0).
    listen_port: u16,
    fwmark: u32,
    peers: BTreeMap<Key, Arc<Peer>>,
    next_index: u32,
}

/// The immutable view the data path reads: who to send to, who a message is from.
pub struct Snapshot {
    pub routes: AllowedIps<Arc<Peer>>,
    pub by_index: HashMap<u32, Arc<Peer>>,
    pub by_key: HashMap<[u8; 32], Arc<Peer>>,
    /// Peers by their tag in relay frames.
    pub by_tag: HashMap<Tag, Arc<Peer>>,
    pub local: Option<LocalKeys>,
}

pub struct LocalKeys {
    pub secret: x25519::StaticSecret,
    pub public: x25519::PublicKey,
    /// This node's tag in relay frames.
    pub tag: Tag,
    /// Shared by every peer: MAC1 checks and cookies for handshakes before a peer is known.
    pub rate_limiter: Arc<RateLimiter>,
}

impl Device {
    /// Creates the TUN interface `name` with `mtu_bytes`, brings it up and binds the UDP socket on
    /// a kernel-chosen port, as wireguard-go does until the operator sets one. With `offloads`,
    /// TUN segmentation and coalescing and UDP GSO/GRO are used where the kernel has them.
    pub fn create(name: &str, mtu_bytes: u32, offloads: bool) -> anyhow::Result<Arc<Device>> {
        let tun = tun::Tun::create(name, mtu_bytes, offloads)?;
        let socket = udp::bind(0, 0, offloads).context("binding the UDP socket")?;
        tracing::info!(interface = name, offloads = %tun.offloads, "TUN device up");
        let listen_port = socket.socket.local_addr()?.port();
        let dev = Arc::new(Device {
            name: name.to_string(),
            mtu_bytes,
            tun,
            offloads_wanted: offloads,
            config: Mutex::new(Config {
                private_key: None,
                listen_port,
                fwmark: 0,
                peers: BTreeMap::new(),
                next_index: rand_index(),
            }),
            snapshot: ArcSwap::from_pointee(Snapshot::empty()),
            udp: ArcSwapOption::empty(),
            drops: DropCounters::default(),
            control: std::sync::OnceLock::new(),
            relay_serve: Default::default(),
            relayed: Default::default(),
            relayed_bytes: Default::default(),
            tun_io: TunIo::default(),
            clock_ms: std::sync::atomic::AtomicU64::new(crate::mesh::run::now_ms()),
            enforcer: std::sync::OnceLock::new(),
            control_rx_bytes: Default::default(),
            control_tx_bytes: Default::default(),
        });
        dev.install_socket(socket);
        datapath::spawn_tun_reader(dev.clone())?;
        Ok(dev)
    }

    /// Mesh mode: control-protocol datagrams are handed to `tx` from now on.
    pub fn set_control_sink(&self, tx: tokio::sync::mpsc::Sender<(Endpoint, Vec<u8>)>) {
        let _ = self.control.set(tx);
    }

    /// Mesh mode: whether frames between two members are relayed (`[relay] serve`).
    pub fn set_relay(&self, serve: bool) {
        self.relay_serve
            .store(serve, std::sync::atomic::Ordering::Relaxed);
    }

    /// Where the device sends to peer `key` from now on (the node derives it; a relayed path
    /// the UAPI cannot name). A handshake that has not completed is sent again at once to the
    /// new endpoint: one sent to the old (a member's listed address that turned out unreachable)
    /// would otherwise be retried only after WireGuard's 5-second rekey timeout.
    /// `local`: the peer is of this node's trust domain (what a relay checks).
    pub fn set_endpoint(&self, key: &[u8; 32], endpoint: Endpoint, local: bool) {
        let snap = self.snapshot();
        let Some(peer) = snap.by_key.get(key) else {
            return;
        };
        peer.local
            .store(local, std::sync::atomic::Ordering::Relaxed);
        let endpoint = match endpoint {
            Endpoint::Direct(a) => Endpoint::Direct(udp::canonical(a)),
            relayed => relayed,
        };
        datapath::move_endpoint(self, peer, endpoint, snap.local.as_ref().map(|l| l.tag));
    }

    /// Mesh mode: every packet is subject to `enforcer` from now on.
    pub fn set_enforcer(&self, enforcer: Arc<crate::enforce::Enforcer>) {
        let _ = self.enforcer.set(enforcer);
    }

    pub fn enforcer(&self) -> Option<&Arc<crate::enforce::Enforcer>> {
        self.enforcer.get()
    }

    /// Sends one datagram on the underlay socket (control protocol), in a relay frame for a
    /// relayed endpoint.
    pub fn send_datagram(&self, datagram: &[u8], to: Endpoint) -> std::io::Result<usize> {
        match self.udp.load().as_ref() {
            Some(s) => {
                let n = match to {
                    Endpoint::Direct(a) => s.send_to(datagram, a)?,
                    Endpoint::Relayed { relay, tag } => {
                        let me =
                            self.snapshot()
                                .local
                                .as_ref()
                                .map(|l| l.tag)
                                .ok_or_else(|| {
                                    std::io::Error::new(std::io::ErrorKind::NotConnected, "no key")
                                })?;
                        s.send_to(&proto::relay::frame(me, tag, datagram), relay)?
                    }
                };
                self.control_tx_bytes
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                Ok(n)
            }
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "no UDP socket",
            )),
        }
    }

    /// The coarse clock (see `clock_ms`).
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn tick_clock(&self) {
        self.clock_ms.store(
            crate::mesh::run::now_ms(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Seconds since `peer` was last heard (an authenticated datagram), if ever.
    pub fn last_seen_secs(&self, peer: &Peer) -> Option<u64> {
        match peer.last_rx_ms.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            t => Some(self.clock_ms().saturating_sub(t) / 1000),
        }
    }

    pub fn count_control_refusal(&self) {
        self.drops.count(crate::drops::Drop::ControlRefused);
    }

    /// Writes one whole packet to the TUN device.
    fn write_packet(&self, packet: &[u8]) -> std::io::Result<usize> {
        receive::write_packet(self, packet)
    }

    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    fn install_socket(self: &Arc<Self>, socket: udp::Underlay) {
        let socket = Arc::new(socket);
        if let Some(old) = self.udp.swap(Some(socket.clone())) {
            // Wakes the old receive thread, which then sees it is no longer current and exits.
            udp::shutdown(&old.socket);
        }
        datapath::spawn_udp_reader(self.clone(), socket);
    }

    /// Applies a UAPI `set` in order, then publishes the new snapshot. A failure part-way leaves
    /// what was applied before it, as wireguard-go does.
    pub fn apply(self: &Arc<Self>, req: &SetRequest) -> Result<(), UapiError> {
        let mut kick = Vec::new();
        let mut cfg = self.config.lock();
        let result = self.apply_locked(&mut cfg, req, &mut kick);
        self.publish(&cfg);
        drop(cfg);
        // As the kernel module and wireguard-go do: a persistent keepalive newly turned on sends
        // one at once, which starts a handshake. A node that restarts thus renews its sessions
        // with every peer right away, instead of each peer finding out only after its own
        // REKEY_TIMEOUT.
        for peer in kick {
            datapath::keepalive_now(self, &peer);
        }
        result
    }

    fn apply_locked(
        self: &Arc<Self>,
        cfg: &mut Config,
        req: &SetRequest,
        kick: &mut Vec<Arc<Peer>>,
    ) -> Result<(), UapiError> {
        let key_changed = match req.private_key {
            Some(k) if k != cfg.private_key => {
                cfg.private_key = k;
                true
            }
            _ => false,
        };
        if let Some(fwmark) = req.fwmark {
            cfg.fwmark = fwmark;
            if let Some(s) = self.udp.load_full() {
                udp::set_mark(&s.socket, fwmark).map_err(|e| io_error("fwmark", e))?;
            }
        }
        if let Some(port) = req.listen_port {
            if port != cfg.listen_port || port == 0 {
                let socket =
                    udp::bind(port, cfg.fwmark, self.offloads_wanted).map_err(|e| UapiError {
                        line: 0,
                        key: "listen_port".into(),
                        reason: format!("cannot bind UDP port {port}: {e}"),
                        errno: uapi::EADDRINUSE,
                    })?;
                cfg.listen_port = socket.socket.local_addr().map(|a| a.port()).unwrap_or(port);
                self.install_socket(socket);
            }
        }
        if req.replace_peers {
            cfg.peers.clear();
        }
        if key_changed {
            // Our own public key may now equal a peer's; WireGuard removes such a peer.
            if let Some(k) = cfg.private_key {
                cfg.peers.remove(&k.public());
            }
            for peer in cfg.peers.values() {
                peer.state.lock().reset_tunnel(
                    cfg.private_key.as_ref(),
                    &peer.public_key,
                    peer.index,
                );
            }
        }
        for upd in &req.peers {
            if upd.remove {
                cfg.peers.remove(&upd.public_key);
                continue;
            }
            if cfg.private_key.map(|k| k.public()) == Some(upd.public_key) {
                continue;
            }
            let peer = match cfg.peers.get(&upd.public_key) {
                Some(p) => p.clone(),
                None if upd.update_only => continue,
                None => {
                    let index = cfg.next_index;
                    cfg.next_index = (cfg.next_index + 1) & 0x00ff_ffff;
                    let p = Arc::new(Peer::new(upd.public_key, index));
                    cfg.peers.insert(upd.public_key, p.clone());
                    p
                }
            };
            let mut st = peer.state.lock();
            let fresh = st.tunn.is_none();
            let mut rebuild = fresh;
            if let Some(psk) = upd.preshared_key {
                rebuild |= st.preshared_key != psk;
                st.preshared_key = psk;
            }
            if let Some(ka) = upd.persistent_keepalive_secs {
                if st.keepalive_secs != ka {
                    rebuild = true;
                    if ka > 0 {
                        kick.push(peer.clone());
                    }
                }
                st.keepalive_secs = ka;
            }
            if let Some(ep) = upd.endpoint {
                st.endpoint = Some(Endpoint::Direct(udp::canonical(ep)));
            }
            if upd.replace_allowed_ips {
                st.allowed_ips.clear();
            }
            for a in &upd.allowed_ips {
                if !st.allowed_ips.contains(a) {
                    st.allowed_ips.push(*a);
                }
            }
            drop(st);
            // An allowed IP belongs to one peer: claiming it takes it from any other, as in
            // WireGuard.
            for other in cfg.peers.values().filter(|o| !Arc::ptr_eq(o, &peer)) {
                other
                    .state
                    .lock()
                    .allowed_ips
                    .retain(|a| !upd.allowed_ips.contains(a));
            }
            let mut st = peer.state.lock();
            if rebuild {
                st.reset_tunnel(cfg.private_key.as_ref(), &peer.public_key, peer.index);
            }
        }
        Ok(())
    }

    /// Builds the data path's view of `cfg` and swaps it in.
    fn publish(&self, cfg: &Config) {
        let mut routes = AllowedIps::new();
        let mut by_index = HashMap::new();
        let mut by_key = HashMap::new();
        let mut by_tag = HashMap::new();
        for p in cfg.peers.values() {
            by_tag.insert(p.tag, p.clone());
            for a in &p.state.lock().allowed_ips {
                routes.insert(*a, p.clone());
            }
            by_index.insert(p.index, p.clone());
            by_key.insert(p.public_key.0, p.clone());
        }
        let local = cfg.private_key.map(|k| {
            let secret = x25519::StaticSecret::from(k.0);
            let public = x25519::PublicKey::from(&secret);
            let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
            LocalKeys {
                tag: Tag::of(public.as_bytes()),
                secret,
                public,
                rate_limiter,
            }
        });
        self.snapshot.store(Arc::new(Snapshot {
            routes,
            by_index,
            by_key,
            by_tag,
            local,
        }));
    }

    /// The UAPI `get` view.
    pub fn info(&self) -> DeviceInfo {
        let cfg = self.config.lock();
        let now = SystemTime::now();
        let peers = cfg
            .peers
            .values()
            .map(|p| {
                let st = p.state.lock();
                let last = st
                    .tunn
                    .as_ref()
                    .and_then(|t| t.time_since_last_handshake())
                    .and_then(|age| now.checked_sub(age))
                    .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map(|d| (d.as_secs(), d.subsec_nanos()))
                    .unwrap_or((0, 0));
                PeerInfo {
                    public_key: p.public_key,
                    preshared_key: st.preshared_key,
                    endpoint: st.endpoint.map(|e| e.first_hop()),
                    last_handshake: last,
                    tx_bytes: p.tx_bytes.load(std::sync::atomic::Ordering::Relaxed),
                    rx_bytes: p.rx_bytes.load(std::sync::atomic::Ordering::Relaxed),
                    persistent_keepalive_secs: st.keepalive_secs,
                    allowed_ips: st.allowed_ips.clone(),
                }
            })
            .collect();
        DeviceInfo {
            private_key: cfg.private_key,
            listen_port: cfg.listen_port,
            fwmark: cfg.fwmark,
            peers,
        }
    }

    /// The admin `status` view: the UAPI view plus drop counters and handshake ages.
    pub fn status(&self) -> proto::admin::Status {
        let info = self.info();
        let snap = self.snapshot();
        let peers = info
            .peers
            .iter()
            .map(|p| {
                let peer = snap.by_key.get(&p.public_key.0);
                let age = peer.and_then(|peer| {
                    peer.state
                        .lock()
                        .tunn
                        .as_ref()
                        .and_then(|t| t.time_since_last_handshake())
                });
                proto::admin::PeerStatus {
                    public_key: p.public_key.to_base64(),
                    endpoint: p.endpoint.map(|e| e.to_string()),
                    allowed_ips: p.allowed_ips.clone(),
                    handshake_age_secs: age.map(|a| a.as_secs()),
                    last_seen_secs: peer.and_then(|p| self.last_seen_secs(p)),
                    tx_bytes: p.tx_bytes,
                    rx_bytes: p.rx_bytes,
                    tx_packets: peer.map_or(0, |p| p.tx_packets.load(Relaxed)),
                    rx_packets: peer.map_or(0, |p| p.rx_packets.load(Relaxed)),
                    handshakes: peer.map_or(0, |p| p.handshakes.load(Relaxed)),
                    persistent_keepalive_secs: p.persistent_keepalive_secs,
                    drops: peer.map(|p| p.drops.snapshot()).unwrap_or_default(),
                    identity: None,
                    spiffe_id: None,
                    labels: Default::default(),
                    ports: Vec::new(),
                    cert_not_after: None,
                    workloads: Vec::new(),
                }
            })
            .collect();
        proto::admin::Status {
            interface: self.name.clone(),
            public_key: info.private_key.map(|k| k.public().to_base64()),
            listen_port: info.listen_port,
            mtu_bytes: self.mtu_bytes,
            peers,
            drops: self.drops.snapshot(),
            identity: None,
            spiffe_id: None,
            datapath: Some(proto::admin::DatapathStatus {
                tun_offloads: self.tun.offloads.to_string(),
                udp_gso: self.udp.load().as_ref().is_some_and(|u| u.gso()),
                send_allocations: crate::allocs::count(crate::allocs::Path::Send),
                receive_allocations: crate::allocs::count(crate::allocs::Path::Receive),
                tun_reads: self.tun_io.reads.load(Relaxed),
                tun_read_segments: self.tun_io.read_segments.load(Relaxed),
                tun_writes: self.tun_io.writes.load(Relaxed),
                tun_written_packets: self.tun_io.written_packets.load(Relaxed),
            }),
            policy: self.enforcer().map(|e| e.status()),
            control: None,
            certificate: None,
            workloads: Vec::new(),
            control_rx_bytes: self
                .control_rx_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            control_tx_bytes: self
                .control_tx_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            relayed_datagrams: self.relayed.load(std::sync::atomic::Ordering::Relaxed),
            relayed_bytes: self
                .relayed_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

impl Snapshot {
    fn empty() -> Snapshot {
        Snapshot {
            routes: AllowedIps::new(),
            by_index: HashMap::new(),
            by_key: HashMap::new(),
            by_tag: HashMap::new(),
            local: None,
        }
    }
}

fn io_error(key: &str, e: std::io::Error) -> UapiError {
    UapiError {
        line: 0,
        key: key.into(),
        reason: e.to_string(),
        errno: uapi::EIO,
    }
}

fn rand_index() -> u32 {
    let mut b = [0u8; 4];
    // A failure leaves zeros, which is a valid (if predictable) starting index.
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    u32::from_le_bytes(b) & 0x00ff_ffff
}
