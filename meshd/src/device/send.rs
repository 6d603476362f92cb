//! The send path, thread `tun-rx`: plaintext from the TUN device to encrypted datagrams.
//!
//! 1. Read a packet from the TUN device (with offloads, a TCP or UDP super-packet of up to
//!    64 KiB), then more without waiting while there are more, up to one batch.
//! 2. Cut each into segments no larger than the MTU, with their own headers and checksums
//!    (`proto::offload::split`), into the batch's arena. Nothing allocates.
//! 3. Per segment, in order: the peer (longest-prefix match on the destination, in the snapshot
//!    read once per batch) and the egress policy. A segment dropped is counted alone; the others
//!    of its super-packet go on.
//! 4. Per run of segments to the same peer: the peer's lock is taken once, each segment is
//!    encrypted into the datagram buffer right after the previous one, and the lock released.
//! 5. The run's datagrams are sent: equal-sized ones in one `sendmsg` (UDP GSO), and the
//!    counters are added once per run.
//!
//! A segment from one of this node's workloads to another (pods of one node, whose traffic the
//! CNI plugin steers through the mesh interface) has no peer: it is checked against both ends'
//! policies and written back to the TUN device.
//!
//! Locking: the snapshot is lock-free; a peer's lock is held only while its run is encrypted,
//! never while sending. Policy takes its connection-table shard per segment.

use super::udp::Run;
use super::{Device, Snapshot};
use crate::drops::Drop;
use crate::peer::Peer;
use boringtun::noise::TunnResult;
use proto::offload::{self, Arena, VnetHdr, VNET_HDR_LEN};
use proto::relay::{self, Endpoint, Tag, HEADER_LEN};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Largest read from the TUN device: a 64 KiB packet and its virtio header.
const READ_BYTES: usize = VNET_HDR_LEN + 65535;
/// Segments in one batch, and the bytes they may take.
const BATCH_PACKETS: usize = 256;
const BATCH_BYTES: usize = 384 << 10;
/// Most reads in one batch (each may bring 44 segments).
const BATCH_READS: usize = 16;
/// What one datagram adds to its segment at most: a relay header, the WireGuard data header and
/// tag, and padding to 16 bytes; or a whole handshake initiation instead of it.
const SEAL_OVERHEAD: usize = HEADER_LEN + 32 + 15 + 148;

/// The buffers of the send thread, allocated once.
pub(super) struct Sender {
    raw: Vec<u8>,
    plain: Arena,
    /// Arena indices of the segments of the current run (same peer, passed policy).
    run: Vec<u16>,
    sealed: Vec<u8>,
    /// Lengths of the datagrams in `sealed`, back to back.
    lens: Vec<usize>,
    /// How they leave: one message per run.
    runs: Vec<Run>,
}

impl Sender {
    pub(super) fn new() -> Sender {
        Sender {
            raw: vec![0; READ_BYTES],
            plain: Arena::new(BATCH_BYTES, BATCH_PACKETS),
            run: Vec::with_capacity(BATCH_PACKETS),
            sealed: vec![0; BATCH_BYTES + BATCH_PACKETS * SEAL_OVERHEAD],
            lens: Vec::with_capacity(BATCH_PACKETS),
            runs: Vec::with_capacity(BATCH_PACKETS),
        }
    }

    /// Reads one batch from the TUN device (waiting for its first packet) and sends it.
    pub(super) fn run_once(&mut self, dev: &Device) -> std::io::Result<()> {
        let mut reads = 0;
        loop {
            match dev.tun.read(&mut self.raw) {
                Ok(n) => {
                    self.take(dev, n);
                    reads += 1;
                    if reads >= BATCH_READS || !self.plain.has_room(READ_BYTES) {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if !self.plain.is_empty() {
                        break;
                    }
                    dev.tun.wait_readable()?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.flush(dev);
        dev.tun_io.reads.fetch_add(reads as u64, Relaxed);
        Ok(())
    }

    /// Splits the packet just read (`raw[..n]`) into the arena, sending what is there whenever
    /// it fills.
    fn take(&mut self, dev: &Device, n: usize) {
        let (hdr, packet) = if dev.tun.offloads.vnet_hdr {
            match VnetHdr::decode(&self.raw[..n]) {
                Some(h) => (h, VNET_HDR_LEN..n),
                None => {
                    dev.drops.count(Drop::OffloadMalformed);
                    return;
                }
            }
        } else {
            (VnetHdr::PLAIN, 0..n)
        };
        let mut resume = 0;
        loop {
            match offload::split(
                &hdr,
                &self.raw[packet.clone()],
                &mut self.plain,
                &mut resume,
            ) {
                Ok(true) => return,
                Ok(false) => self.flush(dev),
                Err(e) => {
                    tracing::trace!(error = %e, "cannot split a packet from the TUN device");
                    dev.drops.count(Drop::OffloadMalformed);
                    return;
                }
            }
        }
    }

    /// Checks, encrypts and sends every segment in the arena, then empties it.
    fn flush(&mut self, dev: &Device) {
        dev.tun_io
            .read_segments
            .fetch_add(self.plain.len() as u64, Relaxed);
        let snap = dev.snapshot();
        let policy = dev.enforcer.get();
        let mut current: Option<&Arc<Peer>> = None;
        self.run.clear();
        for i in 0..self.plain.len() {
            let packet = self.plain.get(i);
            let Some(addrs) = proto::ip::addrs(packet) else {
                dev.drops.count(Drop::NotIp);
                continue;
            };
            let Some(peer) = snap.routes.lookup(addrs.dst) else {
                // Between two workloads of this node: both ends' policies, then back to the
                // kernel, which delivers it to the receiver's veth.
                match policy {
                    Some(p) if p.is_local_workload(addrs.dst) => {
                        if p.between(packet, &dev.drops)
                            && super::receive::write_packet(dev, packet).is_err()
                        {
                            dev.drops.count(Drop::TunWrite);
                        }
                    }
                    _ => dev.drops.count(Drop::NoRoute),
                }
                continue;
            };
            // Egress policy of this node's identity, before anything is encrypted.
            if let Some(policy) = policy {
                if !policy.egress(packet, &peer.public_key.0, &peer.drops) {
                    continue;
                }
            }
            if let Some(p) = current.filter(|p| !Arc::ptr_eq(p, peer)) {
                self.seal_and_send(dev, &snap, p);
            }
            current = Some(peer);
            self.run.push(i as u16);
        }
        if let Some(p) = current {
            self.seal_and_send(dev, &snap, p);
        }
        self.plain.clear();
    }

    /// Encrypts the run's segments for `peer` under one lock, then sends them.
    fn seal_and_send(&mut self, dev: &Device, snap: &Snapshot, peer: &Peer) {
        let me = snap.local.as_ref().map(|l| l.tag);
        self.lens.clear();
        let endpoint = {
            let mut st = peer.state.lock();
            let endpoint = st.endpoint;
            let Some(tunn) = st.tunn.as_mut() else {
                peer.drops
                    .count_n(Drop::NoPrivateKey, self.run.len() as u64);
                self.run.clear();
                return;
            };
            let head = match endpoint {
                Some(Endpoint::Relayed { .. }) => HEADER_LEN,
                _ => 0,
            };
            let mut at = 0;
            for &i in &self.run {
                let dst = &mut self.sealed[at + head..];
                let start = dst.as_ptr() as usize;
                let (skip, len) = match tunn.encapsulate(self.plain.get(usize::from(i)), dst) {
                    TunnResult::WriteToNetwork(d) => (d.as_ptr() as usize - start, d.len()),
                    TunnResult::Done => continue, // queued until the handshake completes
                    TunnResult::Err(e) => {
                        tracing::trace!(peer = %peer.public_key, error = ?e, "encapsulate failed");
                        continue;
                    }
                    // encapsulate never writes to the tunnel.
                    TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => continue,
                };
                if skip != 0 {
                    self.sealed
                        .copy_within(at + head + skip..at + head + skip + len, at + head);
                }
                self.lens.push(head + len);
                at += head + len;
            }
            endpoint
        };
        self.run.clear();
        send_sealed(
            dev,
            peer,
            &mut self.sealed,
            &self.lens,
            &mut self.runs,
            endpoint,
            me,
        );
    }
}

/// Sends the datagrams laid out back to back in `sealed` (lengths `lens`, each with room for a
/// relay header in front when `endpoint` is relayed), all in as few `sendmmsg` calls as the
/// batch allows: datagrams of equal size (and one shorter after them) as one GSO message.
fn send_sealed(
    dev: &Device,
    peer: &Peer,
    sealed: &mut [u8],
    lens: &[usize],
    runs: &mut Vec<Run>,
    endpoint: Option<Endpoint>,
    me: Option<Tag>,
) {
    if lens.is_empty() {
        return;
    }
    let count = lens.len() as u64;
    let Some(endpoint) = endpoint else {
        peer.drops.count_n(Drop::NoEndpoint, count);
        return;
    };
    let sock = dev.udp.load();
    let Some(sock) = sock.as_ref() else {
        peer.drops.count_n(Drop::UdpSend, count);
        return;
    };
    let to = match endpoint {
        Endpoint::Direct(a) => a,
        Endpoint::Relayed { relay, tag } => {
            let Some(me) = me else {
                peer.drops.count_n(Drop::UdpSend, count);
                return;
            };
            let header = relay::Header {
                ttl: relay::INITIAL_TTL,
                src: me,
                dst: tag,
            };
            let mut at = 0;
            for len in lens {
                let head: &mut [u8; HEADER_LEN] = (&mut sealed[at..at + HEADER_LEN])
                    .try_into()
                    .expect("HEADER_LEN bytes");
                header.write(head);
                at += len;
            }
            relay
        }
    };
    cut_runs(lens, |size| sock.max_segments(size), runs);
    let total: usize = lens.iter().sum();
    let (sent, result) = sock.send_runs(&sealed[..total], runs, to);
    if let Err(e) = result {
        tracing::trace!(peer = %peer.public_key, error = %e, "send failed");
    }
    peer.add_tx_batch(sent.bytes, sent.datagrams as u64);
    // A refused message counts as a drop of each of its datagrams.
    let failed = lens.len().saturating_sub(sent.datagrams) as u64;
    if failed > 0 {
        peer.drops.count_n(Drop::UdpSend, failed);
    }
}

/// Cuts datagrams of lengths `lens` into messages: as many of one size as `max(size)` allows,
/// then at most one shorter (what one GSO message may carry; with `max` 1, one datagram each).
fn cut_runs(lens: &[usize], max: impl Fn(usize) -> usize, runs: &mut Vec<Run>) {
    runs.clear();
    let mut k = 0;
    while k < lens.len() {
        let size = lens[k];
        let max = max(size);
        let mut end = k + 1;
        while end < lens.len() && end - k < max && lens[end] == size {
            end += 1;
        }
        if end < lens.len() && end - k < max && lens[end] < size {
            end += 1;
        }
        runs.push(Run {
            bytes: lens[k..end].iter().sum(),
            size,
        });
        k = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_are_cut_into_messages_gso_can_carry() {
        let mut runs = Vec::new();
        let run = |bytes, size| Run { bytes, size };
        cut_runs(&[100, 100, 100, 40, 100, 7, 7, 200], |_| 64, &mut runs);
        assert_eq!(
            runs,
            [run(340, 100), run(107, 100), run(7, 7), run(200, 200)]
        );
        cut_runs(&[100; 5], |_| 2, &mut runs);
        assert_eq!(runs, [run(200, 100), run(200, 100), run(100, 100)]);
        cut_runs(&[100, 40, 30], |_| 1, &mut runs);
        assert_eq!(runs, [run(100, 100), run(40, 40), run(30, 30)]);
        // The limit is per size: 3 of the small ones, 1 of the large.
        cut_runs(&[10, 10, 10, 10, 500, 500], |s| 30 / s.min(30), &mut runs);
        assert_eq!(
            runs,
            [run(30, 10), run(10, 10), run(500, 500), run(500, 500)]
        );
        cut_runs(&[], |_| 64, &mut runs);
        assert!(runs.is_empty());
    }
}
