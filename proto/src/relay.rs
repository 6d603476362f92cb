//! Relay frames (PROTOCOL.md §9): how a WireGuard or control datagram crosses one or more relay
//! nodes to a node whose underlay the sender cannot reach, end to end encrypted as before.
//!
//! A frame is `7 ‖ ttl ‖ 0 0 ‖ source tag (8) ‖ destination tag (8) ‖ inner datagram`: 20 bytes,
//! what an IPv4 underlay leaves spare under a 1,500-byte MTU when the tunnel MTU is 1,420. A tag
//! names a node by its static key ([`Tag::of`]); the tags are end to end, and each relay picks
//! the next hop from its own path to the destination. Nothing in the header is authenticated:
//! the inner datagram is (WireGuard, or a sealed control message), and a relay forwards only
//! between its members along its own paths to them.

use blake2::{Blake2s256, Digest};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The first byte of a frame: WireGuard's message types are 1 to 4 (followed by three zero
/// bytes), a control datagram starts with `MSHP`.
pub const FRAME_TYPE: u8 = 7;
pub const HEADER_LEN: usize = 20;
/// Hops a frame may take: a sender's relay, then the receiver's relay, with room to spare.
pub const INITIAL_TTL: u8 = 4;

/// A node's name in relay frames: the first 8 bytes of BLAKE2s-256("meshd relay tag" ‖ key).
/// Finding a key with another node's tag takes about 2^64 tries.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(pub [u8; 8]);

impl Tag {
    pub fn of(key: &[u8; 32]) -> Tag {
        let mut h = Blake2s256::new();
        h.update(b"meshd relay tag");
        h.update(key);
        let d = h.finalize();
        let mut t = [0u8; 8];
        t.copy_from_slice(&d[..8]);
        Tag(t)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Where a node is reached: at its own underlay address, or through a relay (the first hop) with
/// frames addressed to its tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    Direct(SocketAddr),
    Relayed { relay: SocketAddr, tag: Tag },
}

impl Endpoint {
    /// Where the datagram goes on the underlay.
    pub fn first_hop(&self) -> SocketAddr {
        match self {
            Endpoint::Direct(a) => *a,
            Endpoint::Relayed { relay, .. } => *relay,
        }
    }

    pub fn ip(&self) -> IpAddr {
        self.first_hop().ip()
    }

    pub fn is_relayed(&self) -> bool {
        matches!(self, Endpoint::Relayed { .. })
    }

    /// The node's own address, if this is one.
    pub fn direct(&self) -> Option<SocketAddr> {
        match self {
            Endpoint::Direct(a) => Some(*a),
            Endpoint::Relayed { .. } => None,
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Endpoint {
        Endpoint::Direct(a)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Direct(a) => write!(f, "{a}"),
            Endpoint::Relayed { relay, .. } => write!(f, "{relay} (relay)"),
        }
    }
}

/// A frame's header, as read from the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub ttl: u8,
    pub src: Tag,
    pub dst: Tag,
}

impl Header {
    pub fn write(&self, buf: &mut [u8; HEADER_LEN]) {
        buf[0] = FRAME_TYPE;
        buf[1] = self.ttl;
        buf[2] = 0;
        buf[3] = 0;
        buf[4..12].copy_from_slice(&self.src.0);
        buf[12..20].copy_from_slice(&self.dst.0);
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        self.write(&mut b);
        b
    }
}

/// Whether `datagram` is a relay frame (its type byte), before any other check.
#[inline]
pub fn is_frame(datagram: &[u8]) -> bool {
    datagram.first() == Some(&FRAME_TYPE)
}

/// The header and the inner datagram of a frame; `None` for anything else, a frame with nonzero
/// reserved bytes, or one with nothing inside.
pub fn parse(datagram: &[u8]) -> Option<(Header, &[u8])> {
    if datagram.len() <= HEADER_LEN || datagram[0] != FRAME_TYPE || datagram[2..4] != [0, 0] {
        return None;
    }
    let mut src = [0u8; 8];
    let mut dst = [0u8; 8];
    src.copy_from_slice(&datagram[4..12]);
    dst.copy_from_slice(&datagram[12..20]);
    Some((
        Header {
            ttl: datagram[1],
            src: Tag(src),
            dst: Tag(dst),
        },
        &datagram[HEADER_LEN..],
    ))
}

/// A whole frame around `inner`, from `src` to `dst`, as its first sender makes it.
pub fn frame(src: Tag, dst: Tag, inner: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + inner.len());
    v.extend_from_slice(
        &Header {
            ttl: INITIAL_TTL,
            src,
            dst,
        }
        .to_bytes(),
    );
    v.extend_from_slice(inner);
    v
}

/// What a node does with a frame it received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// For this node: the inner datagram, from this endpoint (the relay that handed it over and
    /// the sender's tag), which its authentication must then vouch for.
    Deliver(Endpoint),
    /// For a member this node relays to: send the frame on, one hop less to live.
    Forward(SocketAddr),
    Drop(Refused),
}

/// Why a frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// This node relays for no one (`[relay] serve = false`).
    NotRelay,
    /// The source or destination is not a member here (or is this node itself).
    UnknownNode,
    /// It did not arrive along this node's own path to its source (a spoofed or looping frame).
    WrongPath,
    /// Its hops are used up (or it claims more than a sender may give it).
    Expired,
    /// Neither end is of the relay's own trust domain: a relay serves its own cluster, and does
    /// not join two others that may not trust each other.
    ForeignPair,
}

impl Refused {
    pub fn as_str(&self) -> &'static str {
        match self {
            Refused::NotRelay => "relay_not_served",
            Refused::UnknownNode => "relay_unknown_node",
            Refused::WrongPath => "relay_wrong_path",
            Refused::Expired => "relay_expired",
            Refused::ForeignPair => "relay_foreign_pair",
        }
    }
}

/// The decision for a frame with `header` that arrived from `from`, at a node whose tag is `me`.
/// `path` gives this node's current endpoint of a member by tag, and whether the member is of
/// this node's trust domain. A relay forwards only between two members one of which is of its
/// own trust domain, only a frame that came along its own path to the source (the reverse-path
/// check routers make against spoofing), never back where it came from, and never more than
/// [`INITIAL_TTL`] hops.
pub fn decide(
    header: &Header,
    from: SocketAddr,
    me: Tag,
    serve: bool,
    path: impl Fn(&Tag) -> Option<(Endpoint, bool)>,
) -> Verdict {
    if header.dst == me {
        if header.src == me {
            return Verdict::Drop(Refused::UnknownNode);
        }
        return Verdict::Deliver(Endpoint::Relayed {
            relay: from,
            tag: header.src,
        });
    }
    if !serve {
        return Verdict::Drop(Refused::NotRelay);
    }
    if header.src == me {
        return Verdict::Drop(Refused::UnknownNode);
    }
    let (Some((back, src_local)), Some((next, dst_local))) = (path(&header.src), path(&header.dst))
    else {
        return Verdict::Drop(Refused::UnknownNode);
    };
    if back.first_hop() != from {
        return Verdict::Drop(Refused::WrongPath);
    }
    if !src_local && !dst_local {
        return Verdict::Drop(Refused::ForeignPair);
    }
    if header.ttl <= 1 || header.ttl > INITIAL_TTL {
        return Verdict::Drop(Refused::Expired);
    }
    let to = next.first_hop();
    if to == from {
        return Verdict::Drop(Refused::WrongPath);
    }
    Verdict::Forward(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn frames_round_trip_and_garbage_is_no_frame() {
        let (a, b) = (Tag::of(&[1; 32]), Tag::of(&[2; 32]));
        assert_ne!(a, b);
        let f = frame(a, b, b"inner");
        assert_eq!(f.len(), HEADER_LEN + 5);
        let (h, inner) = parse(&f).unwrap();
        assert_eq!(
            (h.ttl, h.src, h.dst, inner),
            (INITIAL_TTL, a, b, &b"inner"[..])
        );
        assert!(parse(&f[..HEADER_LEN]).is_none(), "nothing inside");
        let mut bad = f.clone();
        bad[2] = 1;
        assert!(parse(&bad).is_none(), "reserved bytes must be zero");
        assert!(
            parse(&[1, 0, 0, 0, 9, 9, 9, 9]).is_none(),
            "a WireGuard message"
        );
        assert!(parse(b"MSHP\x03\x03").is_none(), "a control datagram");
        assert!(!is_frame(b"MSHP") && !is_frame(&[4, 0, 0, 0]) && is_frame(&f));
    }

    /// A relay between a1 (direct, of its own trust domain) and b1 (behind another relay, of
    /// another), with gb (b's relay), c1 (of a third trust domain, direct) and a5 (of its own,
    /// behind gb).
    fn paths(t: &Tag) -> Option<(Endpoint, bool)> {
        let (a1, b1, gb, c1) = (
            Tag::of(&[1; 32]),
            Tag::of(&[2; 32]),
            Tag::of(&[3; 32]),
            Tag::of(&[4; 32]),
        );
        if *t == a1 {
            Some((Endpoint::Direct(addr("198.18.1.1:51820")), true))
        } else if *t == b1 {
            let relay = addr("198.19.0.2:51820");
            Some((Endpoint::Relayed { relay, tag: b1 }, false))
        } else if *t == gb {
            Some((Endpoint::Direct(addr("198.19.0.2:51820")), false))
        } else if *t == c1 {
            Some((Endpoint::Direct(addr("198.19.0.3:51820")), false))
        } else if *t == Tag::of(&[5; 32]) {
            // A member of its own trust domain that it reaches through b's relay.
            let relay = addr("198.19.0.2:51820");
            Some((Endpoint::Relayed { relay, tag: *t }, true))
        } else {
            None
        }
    }

    #[test]
    fn a_relay_forwards_between_members_along_its_own_paths() {
        let me = Tag::of(&[9; 32]);
        let (a1, b1) = (Tag::of(&[1; 32]), Tag::of(&[2; 32]));
        let h = Header {
            ttl: INITIAL_TTL,
            src: a1,
            dst: b1,
        };
        let from_a1 = addr("198.18.1.1:51820");
        let from_gb = addr("198.19.0.2:51820");
        assert_eq!(
            decide(&h, from_a1, me, true, paths),
            Verdict::Forward(from_gb)
        );
        // The way back: b1's frames come from the relay on our path to b1.
        let back = Header {
            ttl: 3,
            src: b1,
            dst: a1,
        };
        assert_eq!(
            decide(&back, from_gb, me, true, paths),
            Verdict::Forward(from_a1)
        );
        // A spoofed source (a1's tag from elsewhere), a loop back to the sender, hops used up,
        // a stranger, and a node that relays for no one.
        assert_eq!(
            decide(&h, addr("198.18.1.66:51820"), me, true, paths),
            Verdict::Drop(Refused::WrongPath)
        );
        let stranger = Header {
            dst: Tag::of(&[7; 32]),
            ..h
        };
        assert_eq!(
            decide(&stranger, from_a1, me, true, paths),
            Verdict::Drop(Refused::UnknownNode)
        );
        assert_eq!(
            decide(&Header { ttl: 1, ..h }, from_a1, me, true, paths),
            Verdict::Drop(Refused::Expired)
        );
        // More hops than a sender gives: a loop of relays cannot keep a frame for 255 rounds.
        assert_eq!(
            decide(&Header { ttl: 255, ..h }, from_a1, me, true, paths),
            Verdict::Drop(Refused::Expired)
        );
        // Two members of other trust domains are not joined through this relay.
        let foreign = Header {
            ttl: 3,
            src: Tag::of(&[4; 32]),
            dst: b1,
        };
        assert_eq!(
            decide(&foreign, addr("198.19.0.3:51820"), me, true, paths),
            Verdict::Drop(Refused::ForeignPair)
        );
        assert_eq!(
            decide(&h, from_a1, me, false, paths),
            Verdict::Drop(Refused::NotRelay)
        );
        let looped = Header {
            src: Tag::of(&[3; 32]),
            dst: Tag::of(&[5; 32]),
            ttl: 3,
        };
        assert_eq!(
            decide(&looped, from_gb, me, true, paths),
            Verdict::Drop(Refused::WrongPath)
        );
    }

    #[test]
    fn a_frame_for_this_node_is_delivered_from_the_relay_and_the_senders_tag() {
        let me = Tag::of(&[2; 32]);
        let a1 = Tag::of(&[1; 32]);
        let from = addr("198.19.0.2:51820");
        let h = Header {
            ttl: 2,
            src: a1,
            dst: me,
        };
        // Delivered whether or not this node relays, and whatever its paths: the inner datagram
        // authenticates itself.
        assert_eq!(
            decide(&h, from, me, false, |_| None),
            Verdict::Deliver(Endpoint::Relayed {
                relay: from,
                tag: a1
            })
        );
        let own = Header { src: me, ..h };
        assert_eq!(
            decide(&own, from, me, true, paths),
            Verdict::Drop(Refused::UnknownNode)
        );
    }
}
