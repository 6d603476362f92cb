//! The receive path, thread `udp-rx`: datagrams from the underlay to plaintext on the TUN device.
//!
//! 1. One `recvmmsg` brings up to `udp::RECV_BUFFERS` messages, each with up to 64 datagrams of
//!    one sender when UDP GRO joined them.
//! 2. A WireGuard data message goes the fast way: its peer is found by receiver index in the
//!    snapshot read once per batch, and the peer's lock is taken once per run of messages from
//!    that peer. It is decrypted straight into the batch's arena; its inner source must be one of
//!    the peer's allowed IPs and ingress policy must allow it, else it is dropped and counted
//!    alone. Counters are added once per run.
//!    Anything else (handshakes, cookies, relay frames, control messages) goes through
//!    `datapath::on_datagram` one by one, as before.
//! 3. At the end of the batch (or when the arena is full), TCP segments of one flow that follow
//!    each other are joined (`proto::offload::Coalescer`), and every packet is written to the
//!    TUN device with one `writev`: a joined one with a virtio header that has the kernel cut it
//!    again if it must.

use super::datapath::{admit_inbound, drop_reason, on_datagram, MAX_DATAGRAM_BYTES};
use super::udp::{RecvBatch, Underlay};
use super::{Device, Snapshot};
use crate::drops::Drop;
use crate::peer::{Peer, PeerState};
use boringtun::noise::TunnResult;
use parking_lot::MutexGuard;
use proto::offload::{Arena, Coalescer, VnetHdr, MAX_GROUP_SEGMENTS};
use proto::relay::Endpoint;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Decrypted packets held before they are written, and their bytes.
const BATCH_PACKETS: usize = 512;
const BATCH_BYTES: usize = 512 << 10;
/// A WireGuard data message: type 4, three zero bytes, then index, counter, and at least a tag.
const DATA_MIN_BYTES: usize = 32;

pub(super) fn udp_loop(dev: &Device, socket: &Arc<Underlay>) {
    // Counted from here: the buffers made once, then (never) per packet.
    crate::allocs::mark(crate::allocs::Path::Receive);
    let mut batch = RecvBatch::default();
    let mut rx = Receiver {
        plain: Arena::new(BATCH_BYTES, BATCH_PACKETS),
        coalescer: Coalescer::new(BATCH_PACKETS, dev.tun.offloads.uso),
        out: vec![0u8; MAX_DATAGRAM_BYTES],
    };
    loop {
        let n = match socket.recv(&mut batch) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if is_current(dev, socket) {
                    tracing::error!(error = %e, "UDP receive failed");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
                return;
            }
        };
        if !is_current(dev, socket) {
            return; // replaced (a new listen port) and shut down
        }
        let snap = dev.snapshot();
        let mut held = Held::default();
        for i in 0..n {
            let (m, buf) = batch.message(i);
            if m.truncated {
                dev.drops.count(Drop::Oversized);
                continue;
            }
            let from = m.from;
            for datagram in buf.chunks(m.stride) {
                if is_data(datagram) {
                    rx.on_data(dev, socket, &snap, &mut held, datagram, from);
                } else {
                    // One at a time, after what came before it (a relayed packet must not
                    // overtake a direct one of the same peer).
                    held.release(dev);
                    rx.flush(dev);
                    on_datagram(dev, socket, datagram, from, &mut rx.out);
                }
            }
        }
        held.release(dev);
        rx.flush(dev);
    }
}

/// Whether `datagram` is shaped as a WireGuard transport data message (RFC-less, see the
/// WireGuard paper section 5.4.6): the fast path then tries it.
#[inline]
fn is_data(datagram: &[u8]) -> bool {
    datagram.len() >= DATA_MIN_BYTES && datagram[..4] == [4, 0, 0, 0]
}

fn is_current(dev: &Device, socket: &Arc<Underlay>) -> bool {
    dev.udp
        .load()
        .as_ref()
        .is_some_and(|cur| Arc::ptr_eq(cur, socket))
}

/// Most datagrams decrypted under one taking of a peer's lock: the send thread waits for it,
/// and datagrams that fail to authenticate (anyone can send them with a copied index) must not
/// keep it for a whole batch.
const HOLD_MAX: u32 = 64;

/// The peer whose lock the batch holds, and what its run has counted so far.
#[derive(Default)]
struct Held<'a> {
    peer: Option<&'a Arc<Peer>>,
    state: Option<MutexGuard<'a, PeerState>>,
    /// Datagrams tried under this taking of the lock.
    uses: u32,
    bytes: usize,
    packets: u64,
}

impl<'a> Held<'a> {
    /// Holds `peer`'s lock (releasing another's first).
    fn take(&mut self, dev: &Device, peer: &'a Arc<Peer>) -> &mut PeerState {
        if !self.peer.is_some_and(|p| Arc::ptr_eq(p, peer)) || self.uses >= HOLD_MAX {
            self.release(dev);
            self.peer = Some(peer);
            self.state = Some(peer.state.lock());
        }
        self.uses += 1;
        self.state.as_mut().expect("held with its peer")
    }

    /// Unlocks, and adds the run's counters to the peer.
    fn release(&mut self, dev: &Device) {
        self.state = None;
        if let Some(peer) = self.peer.take() {
            if self.packets > 0 {
                peer.add_rx_batch(self.bytes, self.packets);
                peer.last_rx_ms
                    .store(dev.clock_ms(), std::sync::atomic::Ordering::Relaxed);
            }
        }
        self.uses = 0;
        self.bytes = 0;
        self.packets = 0;
    }
}

struct Receiver {
    plain: Arena,
    coalescer: Coalescer,
    /// Scratch for replies and the slow path.
    out: Vec<u8>,
}

impl Receiver {
    /// One data message from `from`: decrypted into the arena if it authenticates, its source
    /// is the peer's and policy allows it.
    fn on_data<'a>(
        &mut self,
        dev: &Device,
        socket: &Underlay,
        snap: &'a Snapshot,
        held: &mut Held<'a>,
        datagram: &[u8],
        from: SocketAddr,
    ) {
        let index = u32::from_le_bytes(datagram[4..8].try_into().expect("4 bytes"));
        let Some(peer) = snap.by_index.get(&(index >> 8)) else {
            dev.drops.count(Drop::UnknownIndex);
            return;
        };
        if !self.plain.has_room(datagram.len()) {
            held.release(dev); // no peer waits on this thread's TUN writes
            self.flush(dev);
        }
        let st = held.take(dev, peer);
        let Some(tunn) = st.tunn.as_mut() else {
            peer.drops.count(Drop::NoPrivateKey);
            return;
        };
        let room = self
            .plain
            .room(datagram.len())
            .expect("room made above for a datagram");
        let base = room.as_ptr() as usize;
        let delivered = match tunn.decapsulate(Some(from.ip()), datagram, room) {
            TunnResult::WriteToTunnelV4(p, src) => Some((
                p.as_ptr() as usize - base,
                p.len(),
                std::net::IpAddr::V4(src),
            )),
            TunnResult::WriteToTunnelV6(p, src) => Some((
                p.as_ptr() as usize - base,
                p.len(),
                std::net::IpAddr::V6(src),
            )),
            TunnResult::Done => None, // a keepalive
            TunnResult::WriteToNetwork(reply) => {
                let _ = socket.send_to(reply, from).map(|n| peer.add_tx(n));
                None
            }
            TunnResult::Err(e) => {
                peer.drops.count(drop_reason(&e));
                return;
            }
        };
        // The message authenticated: this is where the peer is now (WireGuard paper 2.1).
        st.endpoint = Some(Endpoint::Direct(from));
        held.bytes += datagram.len();
        held.packets += 1;
        let Some((skip, len, src)) = delivered else {
            return;
        };
        let room = self.plain.room(skip + len).expect("written just now");
        if admit_inbound(dev, snap, peer, src, &room[skip..skip + len]) {
            self.plain.commit_at(skip, len);
        }
    }

    /// Writes every packet in the arena to the TUN device, joined where offloads allow, and
    /// empties it.
    fn flush(&mut self, dev: &Device) {
        if self.plain.is_empty() {
            return;
        }
        let offloads = dev.tun.offloads;
        if offloads.vnet_hdr && offloads.tso {
            self.coalescer.clear();
            for i in 0..self.plain.len() {
                self.coalescer.push(&self.plain, i);
            }
            self.coalescer.finish(&mut self.plain);
            for g in self.coalescer.groups() {
                let hdr = g.vnet_hdr().encode();
                let mut parts = [IoSlice::new(&[]); 1 + MAX_GROUP_SEGMENTS];
                parts[0] = IoSlice::new(&hdr);
                let mut k = 1;
                for (j, i) in self.coalescer.members(g).enumerate() {
                    let p = self.plain.get(i);
                    let p = if j == 0 {
                        p
                    } else {
                        &p[usize::from(g.hdr_len)..]
                    };
                    parts[k] = IoSlice::new(p);
                    k += 1;
                }
                if dev.tun.write_vectored(&parts[..k]).is_err() {
                    dev.drops.count_n(Drop::TunWrite, u64::from(g.count));
                }
            }
            dev.tun_io
                .writes
                .fetch_add(self.coalescer.groups().len() as u64, Relaxed);
        } else {
            for p in self.plain.iter() {
                if dev.write_packet(p).is_err() {
                    dev.drops.count(Drop::TunWrite);
                }
            }
            dev.tun_io
                .writes
                .fetch_add(self.plain.len() as u64, Relaxed);
        }
        dev.tun_io
            .written_packets
            .fetch_add(self.plain.len() as u64, Relaxed);
        self.plain.clear();
    }
}

/// Writes one whole packet to the TUN device (after a plain virtio header when it has them).
pub(super) fn write_packet(dev: &Device, packet: &[u8]) -> std::io::Result<usize> {
    if dev.tun.offloads.vnet_hdr {
        let hdr = VnetHdr::PLAIN.encode();
        dev.tun
            .write_vectored(&[IoSlice::new(&hdr), IoSlice::new(packet)])
    } else {
        dev.tun.write_vectored(&[IoSlice::new(packet)])
    }
}
