//! Segmentation and coalescing offloads for the TUN device, without I/O.
//!
//! With `IFF_VNET_HDR` and TSO/USO turned on, one read from a Linux TUN device brings a
//! *super-packet*: up to 64 KiB of one TCP or UDP flow behind a single IP and transport header,
//! described by a `virtio_net_hdr` ([`VnetHdr`]) in front of it. meshd cuts it into segments no
//! larger than the MTU ([`split`]), checks each against policy and encrypts each as one WireGuard
//! data message. On the way in, the decrypted TCP segments of one flow that follow each other are
//! put back behind one header ([`Coalescer`], GRO in user space) and written with one `writev`.
//! The kernel then carries one packet through its stack where it would have carried forty.
//!
//! Everything here is pure: the data path owns the buffers ([`Arena`]) and the system calls.
//! Every length and offset read from a packet or a header is checked; bad input yields an error
//! or is left alone (never a panic).
//!
//! Design after wireguard-go's `tun/offload_linux.go` and the kernel's `tcp_gso_segment` and
//! `tcp_gro_receive`; see the README for what was taken and what was not.

mod arena;
mod checksum;
mod coalesce;
mod split;
#[cfg(test)]
mod tests;

pub use arena::Arena;
pub use checksum::{fold, pseudo_header_sum, sum};
pub use coalesce::{Coalescer, Group, MAX_GROUP_SEGMENTS};
pub use split::{complete_checksum, split, SplitError};

/// Size of the `virtio_net_hdr` the TUN device puts before each packet (`TUNSETVNETHDRSZ`'s
/// default; the 12-byte variant with `num_buffers` is not used).
pub const VNET_HDR_LEN: usize = 10;

/// `virtio_net_hdr.flags`: the checksum at `csum_start + csum_offset` holds only the
/// pseudo-header sum, and the rest is still to be added.
pub const F_NEEDS_CSUM: u8 = 1;

/// `virtio_net_hdr.gso_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoType {
    None,
    TcpV4,
    TcpV6,
    /// UDP segmentation (USO), IPv4 or IPv6.
    UdpL4,
}

impl GsoType {
    const NONE: u8 = 0;
    const TCPV4: u8 = 1;
    const TCPV6: u8 = 4;
    const UDP_L4: u8 = 5;
    /// Set with a TCP type when the flow uses ECN (CWR is then kept on the first segment only,
    /// which [`split`] always does).
    const ECN: u8 = 0x80;

    fn from_wire(b: u8) -> Option<GsoType> {
        match b & !Self::ECN {
            Self::NONE => Some(GsoType::None),
            Self::TCPV4 => Some(GsoType::TcpV4),
            Self::TCPV6 => Some(GsoType::TcpV6),
            Self::UDP_L4 => Some(GsoType::UdpL4),
            _ => None,
        }
    }

    fn to_wire(self) -> u8 {
        match self {
            GsoType::None => Self::NONE,
            GsoType::TcpV4 => Self::TCPV4,
            GsoType::TcpV6 => Self::TCPV6,
            GsoType::UdpL4 => Self::UDP_L4,
        }
    }
}

/// The `virtio_net_hdr` (include/uapi/linux/virtio_net.h), in the host's byte order as the TUN
/// device uses it unless told otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: GsoType,
    /// Length of the IP and transport headers (a hint; [`split`] measures them itself).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// A plain packet: no segmentation, checksums complete.
    pub const PLAIN: VnetHdr = VnetHdr {
        flags: 0,
        gso_type: GsoType::None,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Reads the header at the front of `buf`; `None` if it is short or of an unknown GSO type.
    pub fn decode(buf: &[u8]) -> Option<VnetHdr> {
        let b: &[u8; VNET_HDR_LEN] = buf.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: GsoType::from_wire(b[1])?,
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type.to_wire();
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

pub(crate) const PROTO_TCP: u8 = 6;
pub(crate) const PROTO_UDP: u8 = 17;
pub(crate) const TCP_HEADER_MIN: usize = 20;
pub(crate) const UDP_HEADER_LEN: usize = 8;
/// Offsets of the checksum field in the TCP and UDP headers.
pub(crate) const TCP_CSUM_OFFSET: usize = 16;
pub(crate) const UDP_CSUM_OFFSET: usize = 6;

/// Where the parts of an IPv4 or IPv6 packet carrying TCP or UDP are. Only what segmentation and
/// coalescing need: IPv6 extension headers are not walked (such packets are left whole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub v6: bool,
    /// IP header length.
    pub ip_len: usize,
    pub protocol: u8,
    /// IP and transport header length: where the payload starts.
    pub hdr_len: usize,
}

impl Layout {
    /// Measures `packet`'s headers; `None` unless it is IPv4 or IPv6 (no extension headers) with
    /// a whole TCP or UDP header whose lengths fit inside `packet`.
    pub fn of(packet: &[u8]) -> Option<Layout> {
        let (v6, ip_len, protocol) = match packet.first()? >> 4 {
            4 => {
                let ihl = usize::from(packet[0] & 0x0f) * 4;
                (false, ihl, *packet.get(9)?)
            }
            6 => (true, crate::ip::IPV6_HEADER_LEN, *packet.get(6)?),
            _ => return None,
        };
        if ip_len < crate::ip::IPV4_HEADER_MIN || packet.len() < ip_len {
            return None;
        }
        let l4_len = match protocol {
            PROTO_TCP => {
                let off = usize::from(*packet.get(ip_len + 12)? >> 4) * 4;
                if off < TCP_HEADER_MIN {
                    return None;
                }
                off
            }
            PROTO_UDP => UDP_HEADER_LEN,
            _ => return None,
        };
        let hdr_len = ip_len + l4_len;
        (packet.len() >= hdr_len).then_some(Layout {
            v6,
            ip_len,
            protocol,
            hdr_len,
        })
    }

    /// The addresses, as they enter the pseudo-header.
    pub fn addrs<'a>(&self, packet: &'a [u8]) -> (&'a [u8], &'a [u8]) {
        if self.v6 {
            (&packet[8..24], &packet[24..40])
        } else {
            (&packet[12..16], &packet[16..20])
        }
    }

    pub fn csum_offset(&self) -> usize {
        if self.protocol == PROTO_TCP {
            TCP_CSUM_OFFSET
        } else {
            UDP_CSUM_OFFSET
        }
    }

    /// Writes the IP header's length field for a packet of `total` bytes, and for IPv4 its
    /// header checksum.
    pub fn set_ip_length(&self, packet: &mut [u8], total: usize) {
        if self.v6 {
            let payload = (total - crate::ip::IPV6_HEADER_LEN) as u16;
            packet[4..6].copy_from_slice(&payload.to_be_bytes());
        } else {
            packet[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            set_ipv4_checksum(&mut packet[..self.ip_len]);
        }
    }
}

/// Recomputes an IPv4 header's checksum in place.
pub(crate) fn set_ipv4_checksum(header: &mut [u8]) {
    header[10..12].fill(0);
    let c = !fold(sum(header, 0));
    header[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Writes the complete transport checksum of `packet` (laid out as `l`).
pub(crate) fn set_transport_checksum(l: &Layout, packet: &mut [u8]) {
    let at = l.ip_len + l.csum_offset();
    packet[at..at + 2].fill(0);
    let (src, dst) = l.addrs(packet);
    let len = packet.len() - l.ip_len;
    let s = sum(
        &packet[l.ip_len..],
        pseudo_header_sum(src, dst, l.protocol, len),
    );
    let mut c = !fold(s);
    if c == 0 && l.protocol == PROTO_UDP {
        c = 0xffff; // RFC 768: 0 means "no checksum"
    }
    packet[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// Whether `packet`'s transport checksum verifies.
pub(crate) fn transport_checksum_ok(l: &Layout, packet: &[u8]) -> bool {
    let (src, dst) = l.addrs(packet);
    let len = packet.len() - l.ip_len;
    fold(sum(
        &packet[l.ip_len..],
        pseudo_header_sum(src, dst, l.protocol, len),
    )) == 0xffff
}
