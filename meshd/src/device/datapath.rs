//! The packet threads and what both paths share. Two OS threads carry the data: `tun-rx`
//! (send.rs: plaintext from the TUN device, encrypted to the UDP socket) and `udp-rx`
//! (receive.rs: datagrams from the socket, decrypted to the TUN device). Each owns its buffers
//! for its whole life, so no packet allocates, and each reads the configuration through a
//! lock-free snapshot, locking a peer once per batch of its packets. Here: the messages that
//! are not data (handshakes, cookies, relay frames, control), taken one at a time, the verbs on
//! a peer (keepalive, moving its endpoint), and the protocol timers, a tokio task.

use super::udp::Underlay;
use super::Device;
use crate::drops::Drop;
use crate::peer::Peer;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use proto::relay::{self, Endpoint, Tag, HEADER_LEN};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Largest IP packet, and so the largest plaintext.
const MAX_PACKET_BYTES: usize = 65535;
/// Room for a relay frame's header (20 bytes; every datagram is made after that much headroom,
/// so that a relayed one is framed without a copy), then the WireGuard data header and tag (32
/// bytes) or a whole handshake message (148).
pub(super) const MAX_DATAGRAM_BYTES: usize = HEADER_LEN + MAX_PACKET_BYTES + 148;
/// How often the protocol timers are driven (boringtun's own device uses 250 ms).
const TIMER_TICK: Duration = Duration::from_millis(250);

pub(super) fn spawn_tun_reader(dev: Arc<Device>) -> std::io::Result<()> {
    dev.tun.set_nonblocking()?;
    std::thread::Builder::new()
        .name("tun-rx".into())
        .spawn(move || {
            // Counted from here: the buffers made once, then (never) per packet.
            crate::allocs::mark(crate::allocs::Path::Send);
            let mut sender = super::send::Sender::new();
            loop {
                if let Err(e) = sender.run_once(&dev) {
                    tracing::error!(error = %e, "reading the TUN device failed; stopping");
                    crate::api::remove_socket_files();
                    std::process::exit(1);
                }
            }
        })?;
    Ok(())
}

pub(super) fn spawn_udp_reader(dev: Arc<Device>, socket: Arc<Underlay>) {
    let spawned = std::thread::Builder::new()
        .name("udp-rx".into())
        .spawn(move || super::receive::udp_loop(&dev, &socket));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the UDP receive thread");
    }
}

/// Sends a keepalive to `peer` now (a handshake initiation first if there is no session).
pub(super) fn keepalive_now(dev: &Device, peer: &Peer) {
    let mut out = [0u8; 256];
    let (len, endpoint) = {
        let mut st = peer.state.lock();
        let Some(endpoint) = st.endpoint else {
            return; // nowhere to send it; the timers send one once an endpoint is known
        };
        let Some(tunn) = st.tunn.as_mut() else {
            return;
        };
        match tunn.encapsulate(&[], &mut out[HEADER_LEN..]) {
            TunnResult::WriteToNetwork(d) => (d.len(), Some(endpoint)),
            _ => return,
        }
    };
    let me = dev.snapshot().local.as_ref().map(|l| l.tag);
    send(dev, peer, &mut out, len, endpoint, me);
}

/// Moves `peer` to `endpoint`; without a session, sends a handshake initiation there now.
pub(super) fn move_endpoint(dev: &Device, peer: &Peer, endpoint: Endpoint, me: Option<Tag>) {
    let mut out = [0u8; 256];
    let len = {
        let mut st = peer.state.lock();
        if st.endpoint == Some(endpoint) {
            return;
        }
        st.endpoint = Some(endpoint);
        let Some(tunn) = st.tunn.as_mut() else {
            return;
        };
        if tunn.time_since_last_handshake().is_some() {
            return; // the session goes on at the new endpoint
        }
        match tunn.format_handshake_initiation(&mut out[HEADER_LEN..], true) {
            TunnResult::WriteToNetwork(d) => d.len(),
            _ => return,
        }
    };
    send(dev, peer, &mut out, len, Some(endpoint), me);
}

/// Sends the datagram at `buf[HEADER_LEN..HEADER_LEN + len]` to a peer's endpoint, in a relay
/// frame (written into the headroom) for a relayed one, counting what cannot be sent.
#[inline]
fn send(
    dev: &Device,
    peer: &Peer,
    buf: &mut [u8],
    len: usize,
    endpoint: Option<Endpoint>,
    me: Option<Tag>,
) {
    let Some(endpoint) = endpoint else {
        peer.drops.count(Drop::NoEndpoint);
        return;
    };
    let sock = dev.udp.load();
    let Some(sock) = sock.as_ref() else {
        peer.drops.count(Drop::UdpSend);
        return;
    };
    match send_framed(sock, buf, HEADER_LEN, len, endpoint, me) {
        Ok(n) => peer.add_tx(n),
        Err(e) => {
            tracing::trace!(peer = %peer.public_key, error = %e, "send failed");
            peer.drops.count(Drop::UdpSend);
        }
    }
}

/// Sends `buf[start..start + len]` to `to`: as it is to a direct endpoint; for a relayed one,
/// after a frame header written just before it (`start` leaves room for one), or in a copy
/// when it does not.
#[inline]
fn send_framed(
    sock: &Underlay,
    buf: &mut [u8],
    start: usize,
    len: usize,
    to: Endpoint,
    me: Option<Tag>,
) -> std::io::Result<usize> {
    match (to, me) {
        (Endpoint::Direct(a), _) => sock.send_to(&buf[start..start + len], a),
        (Endpoint::Relayed { relay, tag }, Some(me)) if start >= HEADER_LEN => {
            let h = relay::Header {
                ttl: relay::INITIAL_TTL,
                src: me,
                dst: tag,
            };
            let head: &mut [u8; HEADER_LEN] = (&mut buf[start - HEADER_LEN..start])
                .try_into()
                .expect("HEADER_LEN bytes");
            h.write(head);
            sock.send_to(&buf[start - HEADER_LEN..start + len], relay)
        }
        (Endpoint::Relayed { relay, tag }, Some(me)) => {
            sock.send_to(&relay::frame(me, tag, &buf[start..start + len]), relay)
        }
        (Endpoint::Relayed { .. }, None) => Err(std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            "no key to frame with",
        )),
    }
}

/// Where `part` (a slice boringtun returned) starts in `buf`, which it was written into.
#[inline]
fn offset_in(buf_start: usize, part: &[u8]) -> usize {
    part.as_ptr() as usize - buf_start
}

/// One datagram from the underlay: a relay frame (delivered here or relayed on), or a datagram
/// from the sender itself. Never panics on any input.
pub(super) fn on_datagram(
    dev: &Device,
    socket: &Underlay,
    datagram: &[u8],
    from: SocketAddr,
    out: &mut [u8],
) {
    if relay::is_frame(datagram) {
        on_frame(dev, socket, datagram, from, out);
        return;
    }
    on_inner(dev, socket, datagram, Endpoint::Direct(from), out);
}

/// A relay frame: for this node (its inner datagram is then taken as from the sender, through
/// the relay it came from) or, at a relay, for a member it forwards to (PROTOCOL.md §9).
fn on_frame(dev: &Device, socket: &Underlay, datagram: &[u8], from: SocketAddr, out: &mut [u8]) {
    let Some((header, inner)) = relay::parse(datagram) else {
        dev.drops.count(Drop::MalformedDatagram);
        return;
    };
    let snap = dev.snapshot();
    let Some(local) = snap.local.as_ref() else {
        dev.drops.count(Drop::NoPrivateKey);
        return;
    };
    let serve = dev.relay_serve.load(std::sync::atomic::Ordering::Relaxed);
    let path = |t: &Tag| {
        let peer = snap.by_tag.get(t)?;
        let local = peer.local.load(std::sync::atomic::Ordering::Relaxed);
        peer.state.lock().endpoint.map(|e| (e, local))
    };
    match relay::decide(&header, from, local.tag, serve, path) {
        relay::Verdict::Deliver(endpoint) => {
            if relay::is_frame(inner) {
                dev.drops.count(Drop::MalformedDatagram); // frames are never nested
                return;
            }
            on_inner(dev, socket, inner, endpoint, out);
        }
        relay::Verdict::Forward(to) => {
            let n = datagram.len();
            out[..n].copy_from_slice(datagram);
            out[1] = header.ttl - 1;
            match socket.send_to(&out[..n], to) {
                Ok(_) => {
                    dev.relayed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    dev.relayed_bytes
                        .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
                Err(_) => dev.drops.count(Drop::UdpSend),
            }
        }
        relay::Verdict::Drop(why) => dev.drops.count(match why {
            relay::Refused::NotRelay => Drop::RelayNotServed,
            relay::Refused::UnknownNode => Drop::RelayUnknownNode,
            relay::Refused::WrongPath => Drop::RelayWrongPath,
            relay::Refused::Expired => Drop::RelayExpired,
            relay::Refused::ForeignPair => Drop::RelayForeignPair,
        }),
    }
}

/// One datagram from a sender (directly or through a relay): find its peer, let boringtun
/// authenticate and decrypt it, then deliver, reply or count a drop.
fn on_inner(dev: &Device, socket: &Underlay, datagram: &[u8], from: Endpoint, out: &mut [u8]) {
    if proto::control::is_control(datagram) {
        // The control plane is not the data path: a copy per message is fine here.
        dev.control_rx_bytes
            .fetch_add(datagram.len() as u64, std::sync::atomic::Ordering::Relaxed);
        match dev.control.get() {
            Some(tx) => {
                if tx.try_send((from, datagram.to_vec())).is_err() {
                    dev.drops.count(Drop::ControlBacklog);
                }
            }
            None => dev.drops.count(Drop::ControlNotMesh),
        }
        return;
    }
    let snap = dev.snapshot();
    let Some(local) = snap.local.as_ref() else {
        dev.drops.count(Drop::NoPrivateKey);
        return;
    };
    let me = Some(local.tag);
    let base = out.as_ptr() as usize;
    let packet =
        match local
            .rate_limiter
            .verify_packet(Some(from.ip()), datagram, &mut out[HEADER_LEN..])
        {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                let (start, len) = (offset_in(base, cookie), cookie.len());
                let _ = send_framed(socket, out, start, len, from, me);
                dev.drops.count(Drop::CookieSent);
                return;
            }
            Err(TunnResult::Err(WireGuardError::InvalidMac)) => {
                dev.drops.count(Drop::BadMac);
                return;
            }
            Err(_) => {
                dev.drops.count(Drop::MalformedDatagram);
                return;
            }
        };
    let peer = match &packet {
        Packet::HandshakeInit(init) => {
            match parse_handshake_anon(&local.secret, &local.public, init) {
                Ok(half) => snap.by_key.get(&half.peer_static_public),
                Err(_) => {
                    dev.drops.count(Drop::HandshakeFailed);
                    return;
                }
            }
        }
        Packet::HandshakeResponse(p) => snap.by_index.get(&(p.receiver_idx >> 8)),
        Packet::PacketCookieReply(p) => snap.by_index.get(&(p.receiver_idx >> 8)),
        Packet::PacketData(p) => snap.by_index.get(&(p.receiver_idx >> 8)),
    };
    let Some(peer) = peer else {
        dev.drops.count(match packet {
            Packet::HandshakeInit(_) => Drop::UnknownPeer,
            _ => Drop::UnknownIndex,
        });
        return;
    };
    // Through a relay, the frame's source tag must be the peer's own: replies go to that tag.
    if let Endpoint::Relayed { tag, .. } = from {
        if tag != peer.tag {
            peer.drops.count(Drop::RelayWrongPath);
            return;
        }
    }
    // A cookie reply's key comes from the peer's public key, which anyone may know: it proves
    // nothing about where the peer is.
    let roams = !matches!(packet, Packet::PacketCookieReply(_));
    let handshake = matches!(
        packet,
        Packet::HandshakeInit(_) | Packet::HandshakeResponse(_)
    );

    let mut st = peer.state.lock();
    let Some(tunn) = st.tunn.as_mut() else {
        peer.drops.count(Drop::NoPrivateKey);
        return;
    };
    let delivered = match tunn.decapsulate(Some(from.ip()), datagram, &mut out[HEADER_LEN..]) {
        TunnResult::Done => None,
        TunnResult::WriteToNetwork(reply) => {
            let (start, len) = (offset_in(base, reply), reply.len());
            let _ = send_framed(socket, out, start, len, from, me).map(|n| peer.add_tx(n));
            flush_queue(tunn, socket, peer, from, me, out);
            None
        }
        TunnResult::WriteToTunnelV4(p, src) => {
            Some((offset_in(base, p), p.len(), std::net::IpAddr::V4(src)))
        }
        TunnResult::WriteToTunnelV6(p, src) => {
            Some((offset_in(base, p), p.len(), std::net::IpAddr::V6(src)))
        }
        TunnResult::Err(e) => {
            peer.drops.count(drop_reason(&e));
            return;
        }
    };
    // The message authenticated: this is where the peer is now (WireGuard paper section 2.1).
    if roams {
        st.endpoint = Some(from);
    }
    drop(st);
    peer.add_rx(datagram.len());
    if handshake {
        peer.handshakes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    peer.last_rx_ms
        .store(dev.clock_ms(), std::sync::atomic::Ordering::Relaxed);

    if let Some((start, len, src)) = delivered {
        let packet = &out[start..start + len];
        if admit_inbound(dev, &snap, peer, src, packet) && dev.write_packet(packet).is_err() {
            peer.drops.count(Drop::TunWrite);
        }
    }
}

/// Whether `packet`, decrypted from `peer` with inner source `src`, may reach the TUN device;
/// counts the drop when not. Both receive paths ask it, so no decrypted packet passes without:
/// - cryptokey routing, inbound: the inner source must be one of the peer's allowed IPs;
/// - the ingress policy of this node's identity, with the identity whose key authenticated it.
#[inline]
pub(super) fn admit_inbound(
    dev: &Device,
    snap: &super::Snapshot,
    peer: &Arc<Peer>,
    src: std::net::IpAddr,
    packet: &[u8],
) -> bool {
    if !snap
        .routes
        .lookup(src)
        .is_some_and(|owner| Arc::ptr_eq(owner, peer))
    {
        peer.drops.count(Drop::SourceNotAllowed);
        return false;
    }
    match dev.enforcer.get() {
        Some(policy) => policy.ingress(packet, &peer.public_key.0, &peer.drops),
        None => true,
    }
}

/// After a handshake completes, boringtun hands back the packets it queued while waiting.
fn flush_queue(
    tunn: &mut Tunn,
    socket: &Underlay,
    peer: &Peer,
    to: Endpoint,
    me: Option<Tag>,
    out: &mut [u8],
) {
    let base = out.as_ptr() as usize;
    while let TunnResult::WriteToNetwork(d) = tunn.decapsulate(None, &[], &mut out[HEADER_LEN..]) {
        let (start, len) = (offset_in(base, d), d.len());
        match send_framed(socket, out, start, len, to, me) {
            Ok(n) => peer.add_tx(n),
            Err(_) => peer.drops.count(Drop::UdpSend),
        }
    }
}

pub(super) fn drop_reason(e: &WireGuardError) -> Drop {
    match e {
        WireGuardError::InvalidCounter | WireGuardError::DuplicateCounter => Drop::Replay,
        WireGuardError::NoCurrentSession | WireGuardError::WrongIndex => Drop::NoSession,
        WireGuardError::InvalidAeadTag => Drop::DecryptFailed,
        WireGuardError::InvalidPacket => Drop::NotIpInner,
        WireGuardError::InvalidMac => Drop::BadMac,
        _ => Drop::HandshakeFailed,
    }
}

/// Drives every peer's handshake retry, rekey, keepalive and expiry timers, and resets the
/// handshake rate limiter once a second.
pub async fn run_timers(dev: Arc<Device>) {
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut out = vec![0u8; MAX_DATAGRAM_BYTES];
    let mut ticks: u64 = 0;
    loop {
        tick.tick().await;
        ticks += 1;
        dev.tick_clock();
        let snap = dev.snapshot();
        if ticks.is_multiple_of(4) {
            if let Some(local) = &snap.local {
                local.rate_limiter.reset_count();
            }
        }
        for peer in snap.by_key.values() {
            let (len, endpoint) = {
                let mut st = peer.state.lock();
                let endpoint = st.endpoint;
                let Some(tunn) = st.tunn.as_mut() else {
                    continue;
                };
                match tunn.update_timers(&mut out[HEADER_LEN..]) {
                    TunnResult::WriteToNetwork(d) => (d.len(), endpoint),
                    TunnResult::Err(WireGuardError::ConnectionExpired) => {
                        tracing::debug!(peer = %peer.public_key, "session expired");
                        continue;
                    }
                    _ => continue,
                }
            };
            let me = snap.local.as_ref().map(|l| l.tag);
            send(&dev, peer, &mut out, len, endpoint, me);
        }
    }
}
