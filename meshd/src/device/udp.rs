//! The underlay socket: one dual-stack UDP socket carries IPv4 and IPv6 peers.
//!
//! Batched both ways. `recvmmsg` with `MSG_WAITFORONE` waits for the first datagram and takes
//! whatever else is queued, up to [`RECV_BUFFERS`] messages; with UDP GRO each may hold up to 64
//! datagrams of one sender back to back (a control message says their size). `sendmmsg` sends
//! a batch in one call, and with UDP GSO (`UDP_SEGMENT`) the equal-sized datagrams to one peer
//! go as one message. Whether the kernel has GSO and GRO is found out at start; GSO is turned
//! off, said once in the log, when a segmented send fails with the error that means the device
//! cannot do it. The socket stays blocking: the data-path threads wait in the kernel, not in
//! `poll` (see the README for why this is not quinn-udp).

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// Most bytes in one GSO send: the UDP length field bounds the whole, not each datagram.
const MAX_GSO_BYTES: usize = 65000;
/// Most datagrams in one GSO send (the kernel's UDP_MAX_SEGMENTS).
const MAX_GSO_SEGMENTS: usize = 64;

/// Socket buffer size asked of the kernel; bursts at line rate overflow the default.
const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// Messages in one `recvmmsg`, and the size of each buffer: a GRO batch is at most 64 KiB.
pub const RECV_BUFFERS: usize = 16;
const RECV_BUFFER_BYTES: usize = 1 << 16;
/// Room for the control messages of one received message (UDP_GRO's int).
const RECV_CMSG_BYTES: usize = 64;

/// The bound socket and whether it is an IPv6 (dual-stack) one.
pub struct Underlay {
    pub socket: UdpSocket,
    pub is_v6: bool,
    /// Whether several datagrams may leave in one message (offloads on and the kernel able).
    gso: bool,
    /// Cleared when the kernel refuses a segmented send at run time.
    gso_ok: AtomicBool,
}

/// Messages in one `sendmmsg`.
const MAX_MESSAGES: usize = 64;

/// What a batch send got out: datagrams, and their bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub datagrams: usize,
    pub bytes: usize,
}

/// One message of a batch: `bytes` of datagrams of `size` bytes each (the last may be shorter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub bytes: usize,
    pub size: usize,
}

impl Run {
    pub fn datagrams(&self) -> usize {
        self.bytes.div_ceil(self.size.max(1))
    }
}

/// A control message carrying UDP_SEGMENT (the GSO segment size), aligned for cmsghdr.
#[derive(Clone, Copy, Default)]
#[repr(C, align(8))]
struct SegmentCmsg {
    bytes: [u8; SEGMENT_CMSG_SPACE],
}

/// CMSG_SPACE(sizeof(u16)) on Linux: a 16-byte header and the value, padded to 8.
const SEGMENT_CMSG_SPACE: usize = 24;

impl SegmentCmsg {
    fn set(&mut self, size: u16) {
        // SAFETY: the buffer is CMSG_SPACE(2) bytes and aligned for cmsghdr; the header and the
        // u16 after it fit (checked by the test below against libc's CMSG_SPACE).
        unsafe {
            let h = self.bytes.as_mut_ptr().cast::<libc::cmsghdr>();
            (*h).cmsg_level = libc::SOL_UDP;
            (*h).cmsg_type = libc::UDP_SEGMENT;
            (*h).cmsg_len = libc::CMSG_LEN(2) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(h).cast::<u16>(), size);
        }
    }
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

    /// How many datagrams one message may carry: up to 64 with UDP GSO (and at most
    /// [`MAX_GSO_BYTES`] in all), else 1.
    pub fn max_segments(&self, size: usize) -> usize {
        if self.gso() {
            MAX_GSO_SEGMENTS.min(MAX_GSO_BYTES / size.max(1)).max(1)
        } else {
            1
        }
    }

    /// Sends the datagrams laid out back to back in `datagrams` to `to`, cut into `runs`: each
    /// run is one message, several datagrams of `size` bytes (the last may be shorter) when it
    /// is longer than `size` (UDP GSO; see [`Underlay::max_segments`]). Up to [`MAX_MESSAGES`]
    /// messages leave in one `sendmmsg`. Returns what was sent, and the first error; a message
    /// the kernel refuses is skipped, the rest still go. A segmented message refused with EIO
    /// (a device without GSO) turns GSO off, said once, and is sent again one datagram at a
    /// time; one refused with EINVAL is sent again that way, GSO staying on.
    pub fn send_runs(
        &self,
        datagrams: &[u8],
        runs: &[Run],
        to: SocketAddr,
    ) -> (Sent, io::Result<()>) {
        let fd = self.socket.as_raw_fd();
        self.send_runs_via(datagrams, runs, to, |hdrs| {
            // SAFETY: `hdrs` are filled in by `send_runs_via`: each points at one iovec into
            // `datagrams`, the address and its own control buffer, all alive across the call;
            // the kernel only reads them.
            let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), hdrs.len() as _, 0) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as usize)
            }
        })
    }

    /// [`Underlay::send_runs`] with the `sendmmsg` system call as `sendmmsg` (tests pass one
    /// that refuses what a kernel without GSO would).
    fn send_runs_via(
        &self,
        datagrams: &[u8],
        runs: &[Run],
        to: SocketAddr,
        mut sendmmsg: impl FnMut(&mut [libc::mmsghdr]) -> io::Result<usize>,
    ) -> (Sent, io::Result<()>) {
        let addr = socket2::SockAddr::from(for_socket(to, self.is_v6));
        let (mut sent, mut bytes) = (0, 0);
        let mut first_error = Ok(());
        let mut at = 0;
        let mut i = 0;
        while i < runs.len() {
            let n = (runs.len() - i).min(MAX_MESSAGES);
            let batch = &runs[i..i + n];
            // SAFETY: all-zero mmsghdr and iovec are valid "empty" values; each is filled in below.
            let mut hdrs: [libc::mmsghdr; MAX_MESSAGES] = unsafe { std::mem::zeroed() };
            let mut iovs: [libc::iovec; MAX_MESSAGES] = unsafe { std::mem::zeroed() };
            let mut ctrl = [SegmentCmsg::default(); MAX_MESSAGES];
            let mut off = at;
            for (k, run) in batch.iter().enumerate() {
                iovs[k] = libc::iovec {
                    iov_base: datagrams[off..].as_ptr() as *mut libc::c_void,
                    iov_len: run.bytes,
                };
                let h = &mut hdrs[k].msg_hdr;
                h.msg_name = addr.as_ptr() as *mut libc::c_void;
                h.msg_namelen = addr.len();
                h.msg_iov = &mut iovs[k];
                h.msg_iovlen = 1;
                if run.bytes > run.size {
                    ctrl[k].set(run.size as u16);
                    h.msg_control = ctrl[k].bytes.as_mut_ptr().cast();
                    h.msg_controllen = ctrl[k].bytes.len() as _;
                }
                off += run.bytes;
            }
            let e = match sendmmsg(&mut hdrs[..n]) {
                Ok(0) => io::Error::other("sendmmsg sent no message"),
                Ok(r) => {
                    for run in &batch[..r.min(n)] {
                        sent += run.datagrams();
                        bytes += run.bytes;
                        at += run.bytes;
                    }
                    i += r.min(n);
                    continue;
                }
                Err(e) => e,
            };
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    if let Err(e) = self.wait(libc::POLLOUT) {
                        return (
                            Sent {
                                datagrams: sent,
                                bytes,
                            },
                            Err(e),
                        );
                    }
                    continue;
                }
                // EIO: the device cannot segment (wireguard-go turns GSO off on it too). EINVAL
                // can also mean one path's MTU is below the segment size (a forged ICMP
                // message can make it so): that message goes one datagram at a time, and GSO
                // stays on for everyone else.
                Some(code @ (libc::EIO | libc::EINVAL)) if batch[0].bytes > batch[0].size => {
                    if code == libc::EIO && self.gso_ok.swap(false, Relaxed) {
                        tracing::info!(error = %e, "UDP segmentation (GSO) off: the kernel refused a segmented send");
                    }
                    let run = batch[0];
                    let chunk = &datagrams[at..at + run.bytes];
                    let (k, r) = self.send_each(chunk, run.size, to);
                    sent += k;
                    bytes += chunk
                        .chunks(run.size)
                        .take(k)
                        .map(<[u8]>::len)
                        .sum::<usize>();
                    if first_error.is_ok() {
                        first_error = r;
                    }
                }
                _ => {
                    if first_error.is_ok() {
                        first_error = Err(e);
                    }
                }
            }
            // This message is done with (sent one by one, or refused): on to the next.
            at += batch[0].bytes;
            i += 1;
        }
        (
            Sent {
                datagrams: sent,
                bytes,
            },
            first_error,
        )
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

    /// Receives into `batch`, waiting for the first datagram and taking what else is queued.
    /// Returns how many messages arrived (see [`RecvBatch::message`]); after [`shutdown`],
    /// messages of 0 bytes.
    pub fn recv(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.prepare();
        loop {
            // SAFETY: `prepare` pointed every header at its own buffer, address and control
            // space inside `batch`, which outlives the call.
            let r = unsafe {
                libc::recvmmsg(
                    self.socket.as_raw_fd(),
                    batch.hdrs.as_mut_ptr(),
                    RECV_BUFFERS as _,
                    libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            };
            if r >= 0 {
                batch.decode(r as usize);
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Whether several datagrams leave in one message (offloads on, and the kernel has not
    /// refused UDP_SEGMENT so far).
    pub fn gso(&self) -> bool {
        self.gso && self.gso_ok.load(Relaxed)
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
    let mut gso = false;
    if offloads {
        gso = kernel_has_gso();
        if !gso {
            tracing::info!("UDP segmentation (GSO) off: the kernel does not offer UDP_SEGMENT");
        }
        if !setsockopt(fd, libc::SOL_UDP, libc::UDP_GRO, 1) {
            tracing::info!(error = %io::Error::last_os_error(), "UDP receive offload (GRO) off: refused by the kernel");
        }
    }
    Ok(Underlay {
        socket,
        is_v6,
        gso,
        gso_ok: AtomicBool::new(true),
    })
}

/// Whether the kernel takes UDP_SEGMENT (Linux 4.18 and later), asked of a socket that is never
/// bound or used.
fn kernel_has_gso() -> bool {
    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .is_ok_and(|probe| setsockopt(probe.as_raw_fd(), libc::SOL_UDP, libc::UDP_SEGMENT, 1200))
}

/// The buffers of one `recvmmsg`, allocated once and reused.
pub struct RecvBatch {
    bufs: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    ctrl: Vec<RecvCmsg>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    meta: Vec<Message>,
}

/// What one received message holds: datagrams from `from`, `len` bytes in all, each `stride`
/// bytes but the last (GRO); `truncated` when one did not fit (it is then dropped).
#[derive(Debug, Clone, Copy)]
pub struct Message {
    pub from: SocketAddr,
    pub len: usize,
    pub stride: usize,
    pub truncated: bool,
}

#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct RecvCmsg([u8; RECV_CMSG_BYTES]);

impl Default for RecvBatch {
    fn default() -> Self {
        // SAFETY: all-zero sockaddr_storage, iovec and mmsghdr are valid values; `prepare`
        // fills in the pointers before each call.
        let zeroed = || unsafe { MaybeUninit::<libc::sockaddr_storage>::zeroed().assume_init() };
        RecvBatch {
            bufs: vec![0; RECV_BUFFERS * RECV_BUFFER_BYTES],
            names: (0..RECV_BUFFERS).map(|_| zeroed()).collect(),
            ctrl: vec![RecvCmsg([0; RECV_CMSG_BYTES]); RECV_BUFFERS],
            iovs: (0..RECV_BUFFERS)
                .map(|_| libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            hdrs: (0..RECV_BUFFERS)
                .map(|_| unsafe { MaybeUninit::<libc::mmsghdr>::zeroed().assume_init() })
                .collect(),
            meta: Vec::with_capacity(RECV_BUFFERS),
        }
    }
}

impl RecvBatch {
    /// Message `i` of the last receive, and its bytes.
    pub fn message(&self, i: usize) -> (Message, &[u8]) {
        let m = self.meta[i];
        let start = i * RECV_BUFFER_BYTES;
        (m, &self.bufs[start..start + m.len.min(RECV_BUFFER_BYTES)])
    }

    /// Points every header at its buffer, address and control space. Each pointer comes from
    /// its Vec's one `as_mut_ptr` (none is invalidated by a later borrow of the same Vec).
    fn prepare(&mut self) {
        let bufs = self.bufs.as_mut_ptr();
        let names = self.names.as_mut_ptr();
        let ctrl = self.ctrl.as_mut_ptr();
        let iovs = self.iovs.as_mut_ptr();
        let hdrs = self.hdrs.as_mut_ptr();
        for i in 0..RECV_BUFFERS {
            // SAFETY: every index is below RECV_BUFFERS, the length of each Vec (and of `bufs`
            // in RECV_BUFFER_BYTES steps); the Vecs are never resized.
            unsafe {
                *iovs.add(i) = libc::iovec {
                    iov_base: bufs.add(i * RECV_BUFFER_BYTES).cast(),
                    iov_len: RECV_BUFFER_BYTES,
                };
                let m = &mut *hdrs.add(i);
                m.msg_len = 0;
                let h = &mut m.msg_hdr;
                h.msg_name = names.add(i).cast();
                h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as _;
                h.msg_iov = iovs.add(i);
                h.msg_iovlen = 1;
                h.msg_control = ctrl.add(i).cast();
                h.msg_controllen = RECV_CMSG_BYTES as _;
                h.msg_flags = 0;
            }
        }
    }

    fn decode(&mut self, n: usize) {
        self.meta.clear();
        for i in 0..n {
            let h = &self.hdrs[i].msg_hdr;
            let len = self.hdrs[i].msg_len as usize;
            // SAFETY: the kernel wrote a sockaddr of `msg_namelen` bytes into `names[i]`.
            let addr = unsafe { socket2::SockAddr::new(self.names[i], h.msg_namelen) };
            let from = addr
                .as_socket()
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
            let mut stride = len;
            // SAFETY: walking the control messages the kernel wrote, within msg_controllen.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(h);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                        let size =
                            std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                        if size > 0 {
                            stride = size as usize;
                        }
                    }
                    c = libc::CMSG_NXTHDR(h, c);
                }
            }
            self.meta.push(Message {
                from: canonical(from),
                len,
                stride: stride.max(1),
                truncated: h.msg_flags & libc::MSG_TRUNC != 0,
            });
        }
    }
}

/// Sets an int socket option; whether the kernel took it (a failure leaves the option as it was,
/// which is safe for every option set here).
fn setsockopt(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> bool {
    // SAFETY: setsockopt(2) with a pointer to one int and its size.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
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
    fn the_segment_control_message_is_what_libc_lays_out() {
        // SAFETY: CMSG_SPACE is a pure size computation.
        assert_eq!(SEGMENT_CMSG_SPACE, unsafe { libc::CMSG_SPACE(2) } as usize);
    }

    /// Seven datagrams back to back (sizes, bytes) and how GSO carries them: 100 100 100 40 (one
    /// message, segmented) | 7 | 100 60.
    fn batch() -> ([usize; 7], Vec<u8>, Vec<Run>) {
        let sizes = [100usize, 100, 100, 40, 7, 100, 60];
        let mut buf = Vec::new();
        for (i, n) in sizes.iter().enumerate() {
            buf.extend(std::iter::repeat_n(i as u8, *n));
        }
        let run = |bytes, size| Run { bytes, size };
        (sizes, buf, vec![run(340, 100), run(7, 7), run(160, 100)])
    }

    /// Sends [`batch`] through `send_runs_via` with a
    /// `sendmmsg` that refuses every segmented message with `errno`, as a kernel or device that
    /// cannot segment does. (This kernel segments in software even on a device without checksum
    /// offload, so the refusal cannot be provoked from outside.) Checks that every datagram
    /// arrives; returns the socket and the system calls made.
    fn send_refused(errno: i32) -> (Underlay, usize) {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_millis(500)))
            .unwrap();
        let tx = bind(0, 0, true).unwrap();
        assert!(tx.gso(), "this kernel has UDP GSO");
        let (sizes, buf, runs) = batch();
        let fd = tx.socket.as_raw_fd();
        let mut calls = 0;
        let (sent, r) = tx.send_runs_via(&buf, &runs, rx.local_addr().unwrap(), |hdrs| {
            calls += 1;
            // The kernel sends the messages before the first it refuses, and says how many.
            let ok = hdrs
                .iter()
                .take_while(|h| h.msg_hdr.msg_controllen == 0)
                .count();
            if ok == 0 {
                return Err(io::Error::from_raw_os_error(errno));
            }
            // SAFETY: the first `ok` headers as `send_runs_via` filled them in.
            let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), ok as _, 0) };
            assert!(r > 0, "{}", io::Error::last_os_error());
            Ok(r as usize)
        });
        r.unwrap();
        assert_eq!(
            sent,
            Sent {
                datagrams: sizes.len(),
                bytes: buf.len()
            },
            "every datagram counted as sent"
        );
        let mut got = Vec::new();
        let mut d = [0u8; 2048];
        while let Ok(k) = rx.recv(&mut d) {
            got.push(d[..k].to_vec());
        }
        let want: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| vec![i as u8; *n])
            .collect();
        assert_eq!(got, want, "every datagram arrives, in order");
        (tx, calls)
    }

    #[test]
    fn a_segmented_send_refused_with_eio_turns_gso_off_and_loses_nothing() {
        let (tx, calls) = send_refused(libc::EIO);
        // The three messages in one call: the first refused (and resent one by one); the other
        // two: the first sent, the second refused (resent one by one).
        assert_eq!(calls, 3);
        assert!(!tx.gso(), "GSO is off after EIO");
        assert_eq!(tx.max_segments(100), 1, "no more segmented sends");
    }

    #[test]
    fn a_segmented_send_refused_with_einval_is_resent_and_gso_stays_on() {
        // EINVAL can be one path's small MTU, which a forged ICMP message can cause: it must
        // not turn GSO off for every peer.
        let (tx, _) = send_refused(libc::EINVAL);
        assert!(tx.gso(), "GSO stays on after EINVAL");
        assert!(tx.max_segments(100) > 1);
    }

    #[test]
    fn a_batch_leaves_in_one_call_and_arrives_datagram_by_datagram() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let tx = bind(0, 0, true).unwrap();
        let (sizes, buf, segmented) = batch();
        // Segmented where GSO is on, one datagram per message where it is off.
        let runs: Vec<Run> = if tx.max_segments(100) > 1 {
            segmented
        } else {
            sizes.iter().map(|&n| Run { bytes: n, size: n }).collect()
        };
        let (sent, r) = tx.send_runs(&buf, &runs, rx.local_addr().unwrap());
        r.unwrap();
        assert_eq!(
            sent,
            Sent {
                datagrams: sizes.len(),
                bytes: buf.len()
            }
        );
        let mut got = [0u8; 2048];
        for (i, n) in sizes.iter().enumerate() {
            let k = rx.recv(&mut got).unwrap();
            assert_eq!(&got[..k], &vec![i as u8; *n][..], "datagram {i}");
        }
    }

    #[test]
    fn a_segmented_batch_is_received_as_its_datagrams_offloads_on_and_off() {
        for offloads in [true, false] {
            let rx = bind(0, 0, offloads).unwrap();
            let to: SocketAddr = ([127, 0, 0, 1], rx.socket.local_addr().unwrap().port()).into();
            let tx = bind(0, 0, offloads).unwrap();
            let mut buf = Vec::new();
            let sizes = [300usize, 300, 300, 300, 120];
            for (i, n) in sizes.iter().enumerate() {
                buf.extend(std::iter::repeat_n(i as u8 + 1, *n));
            }
            let runs = if tx.max_segments(300) > 1 {
                vec![Run {
                    bytes: 1320,
                    size: 300,
                }]
            } else {
                sizes.iter().map(|&n| Run { bytes: n, size: n }).collect()
            };
            let (sent, r) = tx.send_runs(&buf, &runs, to);
            r.unwrap();
            assert_eq!(sent.datagrams, 5);
            let mut batch = RecvBatch::default();
            let mut got = Vec::new();
            while got.len() < 5 {
                let n = rx.recv(&mut batch).unwrap();
                for i in 0..n {
                    let (m, bytes) = batch.message(i);
                    assert!(!m.truncated);
                    assert_eq!(m.from.port(), tx.socket.local_addr().unwrap().port());
                    assert!(
                        m.from.is_ipv4(),
                        "an IPv4 sender is reported as IPv4: {}",
                        m.from
                    );
                    got.extend(bytes.chunks(m.stride).map(<[u8]>::to_vec));
                }
            }
            let want: Vec<Vec<u8>> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| vec![i as u8 + 1; n])
                .collect();
            assert_eq!(got, want, "offloads {offloads}");
        }
    }

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
