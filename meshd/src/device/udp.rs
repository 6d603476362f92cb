//! The underlay socket: one dual-stack UDP socket carries IPv4 and IPv6 peers.
//!
//! Batched I/O goes through quinn-udp (see the README for why): `recvmmsg` with UDP GRO (one
//! receive brings up to 64 datagrams of one sender back to back), and UDP GSO (`UDP_SEGMENT`:
//! the equal-sized datagrams of one batch to one peer leave in one `sendmsg`). quinn-udp finds
//! out at start whether the kernel has them, and turns GSO off, logging why, when a send fails
//! with the error that means the device cannot do it. The socket is non-blocking; a thread that
//! must wait polls.

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

/// Most bytes in one GSO send: the UDP length field bounds the whole, not each datagram.
const MAX_GSO_BYTES: usize = 65000;

/// Socket buffer size asked of the kernel; bursts at line rate overflow the default.
const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// The bound socket and whether it is an IPv6 (dual-stack) one.
pub struct Underlay {
    pub socket: UdpSocket,
    pub is_v6: bool,
    state: UdpSocketState,
    /// Whether several datagrams may leave in one `sendmsg` (offloads on and the kernel able).
    gso: bool,
}

impl Underlay {
    /// Sends `datagram` to `to`, waiting while the socket's buffer is full; an IPv4 peer is
    /// addressed as IPv4-mapped on a dual-stack socket.
    #[inline]
    pub fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<usize> {
        let to = for_socket(to, self.is_v6);
        loop {
            match self.socket.send_to(datagram, to) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(libc::POLLOUT)?,
                r => return r,
            }
        }
    }

    /// Sends the datagrams laid out back to back in `datagrams`, each `size` bytes but the last
    /// (which may be shorter), to `to`: in one `sendmsg` per up to 64 datagrams with GSO, else
    /// one by one. Returns how many were sent; the first error ends the batch.
    pub fn send_segments(
        &self,
        datagrams: &[u8],
        size: usize,
        to: SocketAddr,
    ) -> (usize, io::Result<()>) {
        let max = if self.gso {
            self.state
                .max_gso_segments()
                .min(MAX_GSO_BYTES / size.max(1))
        } else {
            1
        };
        if max <= 1 || datagrams.len() <= size {
            return self.send_each(datagrams, size, to);
        }
        let to = for_socket(to, self.is_v6);
        let mut sent = 0;
        for chunk in datagrams.chunks(size * max) {
            let t = Transmit {
                destination: to,
                ecn: None,
                contents: chunk,
                segment_size: Some(size),
                src_ip: None,
            };
            loop {
                match self.state.try_send(UdpSockRef::from(&self.socket), &t) {
                    Ok(()) => {
                        sent += chunk.len().div_ceil(size);
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if let Err(e) = self.wait(libc::POLLOUT) {
                            return (sent, Err(e));
                        }
                    }
                    // GSO refused (quinn-udp has turned it off and said so): this chunk one by
                    // one, and the next ones too.
                    Err(_) => {
                        let (n, r) = self.send_each(chunk, size, to);
                        sent += n;
                        if r.is_err() {
                            return (sent, r);
                        }
                        break;
                    }
                }
            }
        }
        (sent, Ok(()))
    }

    fn send_each(&self, datagrams: &[u8], size: usize, to: SocketAddr) -> (usize, io::Result<()>) {
        let mut sent = 0;
        for d in datagrams.chunks(size) {
            if let Err(e) = self.send_to(d, to) {
                return (sent, Err(e));
            }
            sent += 1;
        }
        (sent, Ok(()))
    }

    /// Receives into `bufs` (each at least 64 KiB, for GRO), waiting for the first datagram:
    /// `meta[i]` says who sent buffer `i`'s datagrams and their size (`stride`). Returns how many
    /// buffers were filled; after [`shutdown`], buffers of 0 bytes.
    pub fn recv(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        loop {
            match self.state.recv(UdpSockRef::from(&self.socket), bufs, meta) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(libc::POLLIN)?,
                r => return r,
            }
        }
    }

    /// Whether several datagrams leave in one `sendmsg` (offloads on, and the kernel has not
    /// refused UDP_SEGMENT so far).
    pub fn gso(&self) -> bool {
        self.gso && self.state.max_gso_segments() > 1
    }

    fn wait(&self, events: libc::c_short) -> io::Result<()> {
        super::tun::wait(self.socket.as_raw_fd(), events)
    }
}

/// Binds `port` on every address, IPv6 and IPv4 alike (falling back to IPv4 alone where the host
/// has no IPv6). With `offloads`, UDP GSO and GRO are used where the kernel has them.
pub fn bind(port: u16, fwmark: u32, offloads: bool) -> io::Result<Underlay> {
    use socket2::{Domain, Protocol, Socket, Type};
    let (socket, is_v6) = match Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)) {
        Ok(s) => {
            s.set_only_v6(false)?;
            s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
            (s, true)
        }
        Err(_) => {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
            (s, false)
        }
    };
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    let socket: UdpSocket = socket.into();
    if fwmark != 0 {
        set_mark(&socket, fwmark)?;
    }
    let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
    // Past net.core.[rw]mem_max where CAP_NET_ADMIN allows, as wireguard-go does.
    let fd = socket.as_raw_fd();
    setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        SOCKET_BUFFER_BYTES as libc::c_int,
    );
    setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        SOCKET_BUFFER_BYTES as libc::c_int,
    );
    // quinn-udp forbids fragmentation (QUIC probes path MTUs itself); meshd keeps the kernel's
    // default, so a datagram a little over a path's MTU is fragmented rather than lost.
    setsockopt(
        fd,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_WANT,
    );
    if is_v6 {
        setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_WANT,
        );
        setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 0);
    }
    let gso = offloads && state.max_gso_segments() > 1;
    if !offloads {
        setsockopt(fd, libc::SOL_UDP, libc::UDP_GRO, 0);
    } else if !gso {
        tracing::info!("UDP segmentation (GSO) off: the kernel does not offer UDP_SEGMENT");
    }
    Ok(Underlay {
        socket,
        is_v6,
        state,
        gso,
    })
}

fn setsockopt(fd: std::os::fd::RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: setsockopt(2) with a pointer to one int and its size; a failure leaves the option
    // as it was, which is safe for every option set here.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

pub fn set_mark(socket: &UdpSocket, mark: u32) -> io::Result<()> {
    socket2::SockRef::from(socket).set_mark(mark)
}

/// Wakes any thread blocked in `recv` on `socket` (Linux returns 0 from it after a shutdown).
pub fn shutdown(socket: &UdpSocket) {
    // SAFETY: shutdown(2) on a valid descriptor we own; the error for an unconnected UDP socket
    // (ENOTCONN) is expected and harmless, the wake-up happens anyway.
    unsafe {
        libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// The address as the operator wrote it: IPv4-mapped IPv6 (what a dual-stack socket reports for
/// an IPv4 peer) back to IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// The address to give `sendto` on `socket`: IPv4 peers as IPv4-mapped on a dual-stack socket.
#[inline]
pub fn for_socket(addr: SocketAddr, socket_is_v6: bool) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if socket_is_v6 => {
            SocketAddr::new(IpAddr::V6(a.ip().to_ipv6_mapped()), a.port())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_round_trip() {
        let v4: SocketAddr = "198.18.0.1:51820".parse().unwrap();
        let mapped = for_socket(v4, true);
        assert_eq!(mapped.to_string(), "[::ffff:198.18.0.1]:51820");
        assert_eq!(canonical(mapped), v4);
        assert_eq!(for_socket(v4, false), v4);
        let v6: SocketAddr = "[fd00::1]:1".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
