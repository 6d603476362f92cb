//! The underlay socket: one dual-stack UDP socket carries IPv4 and IPv6 peers.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

/// Socket buffer size asked of the kernel; bursts at line rate overflow the default.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// The bound socket and whether it is an IPv6 (dual-stack) one.
pub struct Underlay {
    pub socket: UdpSocket,
    pub is_v6: bool,
}

impl Underlay {
    /// Sends `datagram` to `to`; an IPv4 peer is addressed as IPv4-mapped on a dual-stack socket.
    #[inline]
    pub fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.socket.send_to(datagram, for_socket(to, self.is_v6))
    }
}

/// Binds `port` on every address, IPv6 and IPv4 alike (falling back to IPv4 alone where the host
/// has no IPv6).
pub fn bind(port: u16, fwmark: u32) -> io::Result<Underlay> {
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
    Ok(Underlay { socket, is_v6 })
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
