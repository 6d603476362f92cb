//! The TUN device, opened by hand so that it can carry a `virtio_net_hdr` before each packet
//! (`IFF_VNET_HDR`) and take the kernel's offloads (`TUNSETOFFLOAD`): checksums left partial,
//! TCP segmentation (TSO) and UDP segmentation (USO). Each is asked for at start and, when the
//! kernel refuses it, turned off with the reason logged; meshd then reads one MTU-sized packet per
//! read as before.

use anyhow::Context;
use std::ffi::CString;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// What the device was set up with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Every packet read and written has a `virtio_net_hdr` in front.
    pub vnet_hdr: bool,
    /// Reads may bring TCP super-packets, and joined TCP segments may be written.
    pub tso: bool,
    /// Reads may bring UDP super-packets.
    pub uso: bool,
}

impl std::fmt::Display for Offloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on = |b: bool| if b { "on" } else { "off" };
        write!(
            f,
            "vnet header {}, TSO {}, USO {}",
            on(self.vnet_hdr),
            on(self.tso),
            on(self.uso)
        )
    }
}

pub struct Tun {
    fd: OwnedFd,
    pub offloads: Offloads,
}

impl Tun {
    /// Creates TUN interface `name` with `mtu_bytes` and brings it up, with offloads when
    /// `want_offloads` and the kernel allows them.
    pub fn create(name: &str, mtu_bytes: u32, want_offloads: bool) -> anyhow::Result<Tun> {
        // SAFETY: open(2) with a NUL-terminated path; the result is checked.
        let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error()).context("opening /dev/net/tun");
        }
        // SAFETY: a descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut vnet_hdr = false;
        if want_offloads {
            let mut features: libc::c_uint = 0;
            // SAFETY: TUNGETFEATURES writes one unsigned int.
            if unsafe { libc::ioctl(raw, libc::TUNGETFEATURES, &mut features) } < 0 {
                tracing::info!(error = %io::Error::last_os_error(), "TUN offloads off: the kernel does not say what it supports");
            } else if features & libc::IFF_VNET_HDR as libc::c_uint == 0 {
                tracing::info!("TUN offloads off: the kernel has no IFF_VNET_HDR");
            } else {
                vnet_hdr = true;
            }
        }
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
        if vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq.
        if unsafe { libc::ioctl(raw, libc::TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("creating TUN interface {name}"));
        }
        let mut offloads = Offloads {
            vnet_hdr,
            ..Offloads::default()
        };
        if vnet_hdr {
            offloads = set_offloads(raw, offloads);
        }
        set_mtu_and_up(name, mtu_bytes)
            .with_context(|| format!("setting MTU {mtu_bytes} and bringing {name} up"))?;
        Ok(Tun { fd, offloads })
    }

    /// Reads one packet (with its virtio header when `offloads.vnet_hdr`).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read(2) into a buffer we own, at most its length.
        let n = unsafe { libc::read(self.raw(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one packet given in pieces (its virtio header first when `offloads.vnet_hdr`).
    pub fn write_vectored(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        let count = parts.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: IoSlice is ABI-compatible with iovec; writev(2) only reads them.
        let n = unsafe { libc::writev(self.raw(), parts.as_ptr().cast(), count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Makes reads return `WouldBlock` instead of waiting (writes to a TUN device never wait).
    pub fn set_nonblocking(&self) -> io::Result<()> {
        // SAFETY: fcntl(2) on our descriptor.
        let flags = unsafe { libc::fcntl(self.raw(), libc::F_GETFL) };
        if flags < 0
            || unsafe { libc::fcntl(self.raw(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until a read would not block.
    pub fn wait_readable(&self) -> io::Result<()> {
        wait(self.raw(), libc::POLLIN)
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Waits for `events` on `fd`, retrying on EINTR.
pub(super) fn wait(fd: RawFd, events: libc::c_short) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: poll(2) on one pollfd we own.
        if unsafe { libc::poll(&mut p, 1, -1) } >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Asks for checksum offload, TSO and USO; without USO when the kernel is older than 6.2; with
/// none of them (the vnet header alone) when it refuses even TSO.
fn set_offloads(fd: RawFd, mut offloads: Offloads) -> Offloads {
    let tso = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    let uso = libc::TUN_F_USO4 | libc::TUN_F_USO6;
    // SAFETY: TUNSETOFFLOAD takes the flags by value.
    let set = |flags: libc::c_uint| unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, flags as libc::c_ulong) } == 0;
    if set(tso | uso) {
        offloads.tso = true;
        offloads.uso = true;
    } else if set(tso) {
        tracing::info!(error = %io::Error::last_os_error(), "TUN UDP segmentation (USO) off: refused by the kernel");
        offloads.tso = true;
    } else {
        tracing::info!(error = %io::Error::last_os_error(), "TUN segmentation offloads off: refused by the kernel");
    }
    offloads
}

fn ifreq(name: &str) -> anyhow::Result<libc::ifreq> {
    let c = CString::new(name).context("interface name with a NUL byte")?;
    let bytes = c.as_bytes_with_nul();
    anyhow::ensure!(
        bytes.len() <= libc::IFNAMSIZ,
        "interface name {name} longer than 15 bytes"
    );
    // SAFETY: ifreq is plain data; all zeros is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

fn set_mtu_and_up(name: &str, mtu_bytes: u32) -> io::Result<()> {
    // SAFETY: a datagram socket only to carry interface ioctls; closed by OwnedFd.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: we own the new descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = ifreq(name).map_err(io::Error::other)?;
    req.ifr_ifru.ifru_mtu = mtu_bytes as libc::c_int;
    // SAFETY: SIOCSIFMTU, SIOCGIFFLAGS and SIOCSIFFLAGS read (and write) one ifreq.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
