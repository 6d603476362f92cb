//! Segmentation (TSO/USO in user space): one super-packet from the TUN device becomes segments
//! no larger than the MTU, each a whole packet with its own headers and complete checksums, as
//! the kernel's `tcp_gso_segment` and `__udp_gso_segment` would have made them.

use super::{
    set_transport_checksum, Arena, GsoType, Layout, VnetHdr, F_NEEDS_CSUM, PROTO_TCP, PROTO_UDP,
};

/// Why a packet from the TUN device cannot be split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("the packet's headers do not match its virtio header: {0}")]
    Malformed(&'static str),
    #[error("a single segment does not fit an empty arena")]
    NoRoom,
}

/// TCP flags that belong on one segment only: FIN and PSH on the last, CWR on the first.
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Writes the segments of `packet` (as described by `hdr`) into `out`, starting with the one
/// whose payload begins at `*resume` (0 for a new packet). Returns `Ok(true)` once the last
/// segment is written, `Ok(false)` when `out` filled first: `*resume` then says where to go on
/// after the caller has emptied it. A packet without GSO is one segment, its checksum completed
/// if the header says it is partial.
pub fn split(
    hdr: &VnetHdr,
    packet: &[u8],
    out: &mut Arena,
    resume: &mut usize,
) -> Result<bool, SplitError> {
    if hdr.gso_type == GsoType::None {
        let Some(room) = out.room(packet.len()) else {
            return if out.is_empty() {
                Err(SplitError::NoRoom)
            } else {
                Ok(false)
            };
        };
        room.copy_from_slice(packet);
        complete_checksum(hdr, room)?;
        out.commit(packet.len());
        return Ok(true);
    }
    let l = Layout::of(packet).ok_or(SplitError::Malformed("no whole IP and TCP/UDP header"))?;
    match (hdr.gso_type, l.v6, l.protocol) {
        (GsoType::TcpV4, false, PROTO_TCP) | (GsoType::TcpV6, true, PROTO_TCP) => {}
        (GsoType::UdpL4, _, PROTO_UDP) => {}
        _ => return Err(SplitError::Malformed("GSO type and headers disagree")),
    }
    let gso_size = usize::from(hdr.gso_size);
    if gso_size == 0 {
        return Err(SplitError::Malformed("GSO size 0"));
    }
    let payload = &packet[l.hdr_len..];
    let head = &packet[..l.hdr_len];
    let ip_id = u16::from_be_bytes([packet[4], packet[5]]);
    let tcp_seq = (l.protocol == PROTO_TCP).then(|| {
        let at = l.ip_len + 4;
        u32::from_be_bytes(packet[at..at + 4].try_into().expect("4 bytes"))
    });
    let mut off = *resume;
    while off < payload.len() || (off == 0 && payload.is_empty()) {
        let chunk = gso_size.min(payload.len() - off);
        let seg_len = l.hdr_len + chunk;
        let Some(seg) = out.room(seg_len) else {
            if out.is_empty() {
                return Err(SplitError::NoRoom);
            }
            *resume = off;
            return Ok(false);
        };
        seg[..l.hdr_len].copy_from_slice(head);
        seg[l.hdr_len..].copy_from_slice(&payload[off..off + chunk]);
        let index = off / gso_size;
        let last = off + chunk >= payload.len();
        if !l.v6 {
            seg[4..6].copy_from_slice(&ip_id.wrapping_add(index as u16).to_be_bytes());
        }
        let t = l.ip_len;
        if let Some(seq) = tcp_seq {
            seg[t + 4..t + 8].copy_from_slice(&seq.wrapping_add(off as u32).to_be_bytes());
            if !last {
                seg[t + 13] &= !(TCP_FIN | TCP_PSH);
            }
            if index > 0 {
                seg[t + 13] &= !TCP_CWR;
            }
        } else {
            seg[t + 4..t + 6].copy_from_slice(&((seg_len - t) as u16).to_be_bytes());
        }
        l.set_ip_length(seg, seg_len);
        set_transport_checksum(&l, seg);
        out.commit(seg_len);
        off += chunk;
        if chunk == 0 {
            break; // a header-only packet is one segment
        }
    }
    *resume = 0;
    Ok(true)
}

/// Completes a partial checksum (`F_NEEDS_CSUM`: the field holds the pseudo-header sum) in
/// place, as the kernel's `skb_checksum_help` does; a packet without the flag is left as it is.
pub fn complete_checksum(hdr: &VnetHdr, packet: &mut [u8]) -> Result<(), SplitError> {
    if hdr.flags & F_NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > packet.len() {
        return Err(SplitError::Malformed("checksum offset beyond the packet"));
    }
    let c = match !super::fold(super::sum(&packet[start..], 0)) {
        0 => 0xffff,
        c => c,
    };
    packet[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}
