//! The node-to-node control protocol, carried on meshd's UDP port beside WireGuard's messages
//! (which start with a type 1 to 4 and three zero bytes; ours start with `MSHP`). Specified in
//! `proto/PROTOCOL.md` section 4. Pure: keys, randomness and time come in as arguments.
//!
//! - `Probe` / `ProbeReply`: a node that knows only a seed's address asks for its certificate (or,
//!   if that does not fit one datagram, `ProbeKey`: its key). The probe is padded so the reply is
//!   never more than three times its size (no amplification).
//! - `Sealed`: every other message, encrypted and authenticated with ChaCha20-Poly1305 under a key
//!   from two X25519 agreements: the sender's fresh ephemeral key with the receiver's static key,
//!   and the sender's static key with the receiver's static key. Only the holder of the sender's
//!   static private key can produce a message that opens, and each carries a counter the receiver
//!   checks against a sliding replay window. The sender's static key travels encrypted to the
//!   receiver, as in WireGuard's handshake, so the underlay does not show who is talking.

use crate::cert::{CertError, Certificate, RevocationList, MAX_CERT_BYTES, MAX_CRL_BYTES};
use crate::reader::{Reader, Truncated};
use crate::Cidr;
use blake2::digest::Mac;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use x25519_dalek::{PublicKey, StaticSecret};

pub const MAGIC: &[u8; 4] = b"MSHP";
pub const VERSION: u8 = 3;
const HEADER_LEN: usize = 6;
const TYPE_PROBE: u8 = 1;
const TYPE_PROBE_REPLY: u8 = 2;
const TYPE_SEALED: u8 = 3;
const TYPE_PROBE_KEY: u8 = 4;
const TYPE_COOKIE_REPLY: u8 = 5;
/// A probe is padded to at least this many bytes.
pub const MIN_PROBE_BYTES: usize = 1200;
/// A reply may be at most this many times the size of the probe it answers.
pub const AMPLIFICATION_FACTOR: usize = 3;
/// Largest control datagram sent or accepted (fits a UDP datagram over IPv4 and IPv6).
pub const MAX_DATAGRAM_BYTES: usize = 65000;
const TAG_LEN: usize = 16;
/// Header, ephemeral key, counter: the associated data of the sender's encrypted key.
const SEALED_CLEAR_LEN: usize = HEADER_LEN + 32 + 8;
/// ... and the sender's encrypted static key: the associated data of the message.
const SEALED_HEADER_LEN: usize = SEALED_CLEAR_LEN + 32 + TAG_LEN;
const STATIC_LABEL: &[u8] = b"static";
/// The trailer of a sealed datagram: the pair MAC, then the cookie.
pub const MAC_LEN: usize = 16;
pub const COOKIE_LEN: usize = 16;
const TRAILER_LEN: usize = MAC_LEN + COOKIE_LEN;
/// Bytes a sealed datagram adds to its plaintext: header, encrypted sender key, tag and trailer.
pub const SEALED_OVERHEAD: usize = SEALED_HEADER_LEN + TAG_LEN + TRAILER_LEN;
const PAIR_LABEL: &[u8] = b"pair";
const COOKIE_REPLY_LEN: usize = HEADER_LEN + MAC_LEN + COOKIE_LEN;
/// Largest number of members in one `Members` message.
pub const MAX_MEMBERS: usize = 256;
/// Width of the replay window, in sealed datagrams: wide enough for a whole member list of a
/// large mesh, sent in one burst and reordered on the way (2,048 datagrams carry about 10,000
/// members).
pub const REPLAY_WINDOW: u64 = 2048;
const WINDOW_WORDS: usize = (REPLAY_WINDOW / 64) as usize;
const KDF_LABEL: &[u8] = b"meshd control v1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("not a control message")]
    NotControl,
    #[error("unsupported control protocol version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown control message type {0}")]
    UnknownType(u8),
    #[error("truncated: {field} needs bytes past offset {offset}")]
    Truncated { field: &'static str, offset: usize },
    #[error("larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("{0} unexpected bytes at the end")]
    TrailingBytes(usize),
    #[error("a probe must be padded to at least {MIN_PROBE_BYTES} bytes")]
    ProbeTooSmall,
    #[error("the message does not authenticate")]
    Unauthentic,
    #[error("a key agreement with a low-order point")]
    WeakKey,
    #[error("{field} is invalid: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
    #[error("certificate: {0}")]
    Certificate(#[from] CertError),
}

/// A node to contact first: where to find it, and its static key when the operator names it
/// (then it is greeted with a sealed Hello instead of a probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seed {
    pub addr: SocketAddr,
    pub key: Option<[u8; 32]>,
}

/// How a seed is written: `IP:PORT` or `KEY@IP:PORT`.
pub const SEED_FORMAT: &str = "IP:port or KEY@IP:port (KEY: the node's public key in base64)";

impl std::str::FromStr for Seed {
    type Err = String;

    /// `IP:PORT` or `KEY@IP:PORT`, KEY in WireGuard's base64.
    fn from_str(s: &str) -> Result<Seed, String> {
        let bad = || format!("`{s}` is not {SEED_FORMAT}");
        let (key, addr) = match s.split_once('@') {
            Some((k, a)) => (Some(crate::Key::from_base64(k).map_err(|_| bad())?.0), a),
            None => (None, s),
        };
        Ok(Seed {
            addr: addr.parse().map_err(|_| bad())?,
            key,
        })
    }
}

impl std::fmt::Display for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.key {
            Some(k) => write!(f, "{}@{}", crate::Key(k).to_base64(), self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// A control datagram as it crosses the network.
// Decoded once per datagram and consumed at once; boxing the certificate would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datagram<'a> {
    Probe {
        nonce: [u8; 16],
    },
    ProbeReply {
        nonce: [u8; 16],
        certificate: Certificate,
    },
    /// The reply of a node whose certificate does not fit one unfragmented datagram: only its
    /// static key. The prober seals its Hello to that key; the node's Hello, with the certificate,
    /// answers it.
    ProbeKey {
        nonce: [u8; 16],
        key: [u8; 32],
    },
    Sealed(Sealed<'a>),
    /// "Prove you receive at your address": the answer to a sealed datagram from an address the
    /// receiver does not know, echoing that datagram's MAC. The sender repeats the datagram with
    /// `cookie` in its trailer.
    CookieReply {
        echo: [u8; MAC_LEN],
        cookie: [u8; COOKIE_LEN],
    },
}

/// A sealed message before it is opened. Who sent it is known only once it is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed<'a> {
    pub ephemeral: [u8; 32],
    pub counter: u64,
    /// The sender's static key, encrypted, and its tag.
    sender: &'a [u8],
    header: &'a [u8],
    ciphertext: &'a [u8],
    /// Everything the MAC covers: the datagram up to the trailer.
    macced: &'a [u8],
    pub mac: [u8; MAC_LEN],
    pub cookie: [u8; COOKIE_LEN],
}

/// True if `datagram` is a control message rather than a WireGuard one.
#[inline]
pub fn is_control(datagram: &[u8]) -> bool {
    datagram.len() >= 4 && &datagram[..4] == MAGIC
}

fn header(kind: u8) -> Vec<u8> {
    let mut b = Vec::with_capacity(MIN_PROBE_BYTES);
    b.extend_from_slice(MAGIC);
    b.push(VERSION);
    b.push(kind);
    b
}

pub fn encode_probe(nonce: &[u8; 16]) -> Vec<u8> {
    let mut b = header(TYPE_PROBE);
    b.extend_from_slice(nonce);
    b.resize(MIN_PROBE_BYTES, 0);
    b
}

/// The reply to a probe of `probe_len` bytes: the certificate, or only its key if the certificate
/// does not fit one unfragmented datagram ([`crate::segment::DATAGRAM_BYTES`]). `None` if even that
/// would exceed the amplification limit.
pub fn encode_probe_reply(
    nonce: &[u8; 16],
    certificate: &Certificate,
    probe_len: usize,
) -> Option<Vec<u8>> {
    let mut b = header(TYPE_PROBE_REPLY);
    b.extend_from_slice(nonce);
    let cert = certificate.encode();
    b.extend_from_slice(&(cert.len() as u16).to_be_bytes());
    b.extend_from_slice(&cert);
    if b.len() > crate::segment::DATAGRAM_BYTES {
        b = header(TYPE_PROBE_KEY);
        b.extend_from_slice(nonce);
        b.extend_from_slice(&certificate.body.public_key);
    }
    (b.len() <= probe_len.saturating_mul(AMPLIFICATION_FACTOR)).then_some(b)
}

/// Parses a control datagram (without opening a sealed one).
pub fn decode(datagram: &[u8]) -> Result<Datagram<'_>, ControlError> {
    if datagram.len() > MAX_DATAGRAM_BYTES {
        return Err(ControlError::TooLarge {
            max: MAX_DATAGRAM_BYTES,
        });
    }
    if !is_control(datagram) {
        return Err(ControlError::NotControl);
    }
    let mut r = Reader::new(datagram, 4);
    let version = r.u8("version")?;
    if version != VERSION {
        return Err(ControlError::UnsupportedVersion(version));
    }
    match r.u8("type")? {
        TYPE_PROBE => {
            if datagram.len() < MIN_PROBE_BYTES {
                return Err(ControlError::ProbeTooSmall);
            }
            Ok(Datagram::Probe {
                nonce: r.array("nonce")?,
            })
        }
        TYPE_PROBE_REPLY => {
            let nonce = r.array("nonce")?;
            let len = r.u16("certificate length")? as usize;
            let certificate = Certificate::decode(r.take("certificate", len)?)?;
            finish(&r)?;
            Ok(Datagram::ProbeReply { nonce, certificate })
        }
        TYPE_PROBE_KEY => {
            let nonce = r.array("nonce")?;
            let key = r.array("key")?;
            finish(&r)?;
            Ok(Datagram::ProbeKey { nonce, key })
        }
        TYPE_SEALED => {
            let ephemeral = r.array("ephemeral")?;
            let counter = r.u64("counter")?;
            let sender = r.take("sender", 32 + TAG_LEN)?;
            if datagram.len() < r.off + TAG_LEN + TRAILER_LEN {
                return Err(ControlError::Truncated {
                    field: "ciphertext",
                    offset: r.off,
                });
            }
            let end = datagram.len() - TRAILER_LEN;
            Ok(Datagram::Sealed(Sealed {
                sender,
                ephemeral,
                counter,
                header: &datagram[..SEALED_HEADER_LEN],
                ciphertext: &datagram[r.off..end],
                macced: &datagram[..end],
                mac: datagram[end..end + MAC_LEN].try_into().expect("16 bytes"),
                cookie: datagram[end + MAC_LEN..].try_into().expect("16 bytes"),
            }))
        }
        TYPE_COOKIE_REPLY => {
            let echo = r.array("echo")?;
            let cookie = r.array("cookie")?;
            finish(&r)?;
            Ok(Datagram::CookieReply { echo, cookie })
        }
        t => Err(ControlError::UnknownType(t)),
    }
}

fn dh(secret: &StaticSecret, public: &[u8; 32]) -> Result<[u8; 32], ControlError> {
    let shared = secret.diffie_hellman(&PublicKey::from(*public));
    if !shared.was_contributory() {
        return Err(ControlError::WeakKey);
    }
    Ok(shared.to_bytes())
}

/// The key that hides the sender's static key: only the receiver can open it.
fn static_key(es: &[u8; 32], clear: &[u8], receiver: &[u8; 32]) -> [u8; 32] {
    let mut mac = <blake2::Blake2sMac256 as Mac>::new_from_slice(KDF_LABEL)
        .expect("label is a valid key length");
    mac.update(STATIC_LABEL);
    mac.update(es);
    mac.update(clear);
    mac.update(receiver);
    mac.finalize().into_bytes().into()
}

fn aead(key: [u8; 32], msg: &[u8], aad: &[u8]) -> Vec<u8> {
    ChaCha20Poly1305::new(&key.into())
        .encrypt(&[0u8; 12].into(), Payload { msg, aad })
        .expect("a message within the datagram limit encrypts")
}

fn unaead(key: [u8; 32], msg: &[u8], aad: &[u8]) -> Result<Vec<u8>, ControlError> {
    ChaCha20Poly1305::new(&key.into())
        .decrypt(&[0u8; 12].into(), Payload { msg, aad })
        .map_err(|_| ControlError::Unauthentic)
}

fn message_key(es: &[u8; 32], ss: &[u8; 32], header: &[u8], receiver: &[u8; 32]) -> [u8; 32] {
    let mut mac = <blake2::Blake2sMac256 as Mac>::new_from_slice(KDF_LABEL)
        .expect("label is a valid key length");
    mac.update(es);
    mac.update(ss);
    mac.update(header);
    mac.update(receiver);
    mac.finalize().into_bytes().into()
}

/// Seals `plaintext` (one segment) from `sender` to `receiver`: what [`seal_message`] does for
/// each segment, for tests that build datagrams by hand.
#[cfg(test)]
fn seal(
    sender: &StaticSecret,
    receiver: &[u8; 32],
    ephemeral: &StaticSecret,
    counter: u64,
    plaintext: &[u8],
) -> Result<Vec<u8>, ControlError> {
    let pair = Pair::new(sender, receiver)?;
    let ephemeral = Ephemeral::new(ephemeral, receiver)?;
    Agreed {
        pair: &pair,
        ephemeral: &ephemeral,
    }
    .seal(counter, plaintext)
}

/// Seals `message` from `sender` to `receiver` as its segments ([`crate::segment`]), each a
/// datagram of at most [`crate::segment::DATAGRAM_BYTES`], with counters `first_counter`,
/// `first_counter + 1`, .... The segments share `ephemeral` (fresh for every message); each
/// segment's key still differs, as the key covers the header and so the counter.
pub fn seal_message(
    sender: &StaticSecret,
    receiver: &[u8; 32],
    ephemeral: &StaticSecret,
    first_counter: u64,
    message: &[u8],
) -> Result<Vec<Vec<u8>>, ControlError> {
    let pair = Pair::new(sender, receiver)?;
    seal_message_in(&pair, ephemeral, first_counter, message)
}

/// [`seal_message`] with the static-static agreement made earlier: one Diffie-Hellman (the
/// ephemeral's) per message instead of two.
pub fn seal_message_in(
    pair: &Pair,
    ephemeral: &StaticSecret,
    first_counter: u64,
    message: &[u8],
) -> Result<Vec<Vec<u8>>, ControlError> {
    seal_message_with(
        pair,
        &Ephemeral::new(ephemeral, pair.peer())?,
        first_counter,
        message,
    )
}

/// [`seal_message`] with both agreements made earlier: no Diffie-Hellman. `ephemeral` must be
/// for `pair`'s peer; a sender keeps one per receiver for at most
/// [`EPHEMERAL_LIFETIME_MS`] (PROTOCOL.md section 4).
pub fn seal_message_with(
    pair: &Pair,
    ephemeral: &Ephemeral,
    first_counter: u64,
    message: &[u8],
) -> Result<Vec<Vec<u8>>, ControlError> {
    if ephemeral.peer != pair.peer {
        return Err(ControlError::Invalid {
            field: "ephemeral",
            reason: "made for another receiver",
        });
    }
    let agreed = Agreed { pair, ephemeral };
    crate::segment::split(message)?
        .iter()
        .zip(first_counter..)
        .map(|(seg, counter)| agreed.seal(counter, seg))
        .collect()
}

/// How long a sender may seal messages to one receiver under one ephemeral key. Every message's
/// key still differs (it covers the counter). The ephemeral term keeps a thief of the sender's
/// static key from opening what it sent; it does nothing against a thief of the receiver's
/// (PROTOCOL.md section 4), so control messages carry nothing secret.
pub const EPHEMERAL_LIFETIME_MS: u64 = 120_000;

/// A sender's ephemeral key for one receiver, with its agreement with the receiver's static key.
#[derive(Clone)]
pub struct Ephemeral {
    public: [u8; 32],
    es: [u8; 32],
    peer: [u8; 32],
}

impl Ephemeral {
    /// From a fresh random secret (which is not kept).
    pub fn new(secret: &StaticSecret, peer: &[u8; 32]) -> Result<Ephemeral, ControlError> {
        Ok(Ephemeral {
            public: *PublicKey::from(secret).as_bytes(),
            es: dh(secret, peer)?,
            peer: *peer,
        })
    }
}

impl std::fmt::Debug for Ephemeral {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ephemeral")
            .field("public", &crate::Key(self.public))
            .finish_non_exhaustive()
    }
}

/// What a receiver computed from a sender's ephemeral key: kept, it opens the sender's next
/// datagrams under the same ephemeral key without a Diffie-Hellman
/// ([`Sealed::open_sender_known`]). The same computation, done once.
#[derive(Clone)]
pub struct EphemeralAgreement {
    ephemeral: [u8; 32],
    es: [u8; 32],
}

/// What a node's static key agrees with one peer's (PROTOCOL.md section 4): the static-static
/// Diffie-Hellman and the pair key of the MAC. Made once per peer and kept, so sealing to a
/// member or opening from one costs one Diffie-Hellman, not two.
#[derive(Clone)]
pub struct Pair {
    own: [u8; 32],
    peer: [u8; 32],
    ss: [u8; 32],
    mac: [u8; 32],
}

impl Pair {
    pub fn new(own: &StaticSecret, peer: &[u8; 32]) -> Result<Pair, ControlError> {
        Pair::with_public(own, PublicKey::from(own).as_bytes(), peer)
    }

    /// [`Pair::new`] when the caller already holds `own`'s public key (saves a scalar
    /// multiplication).
    pub fn with_public(
        own: &StaticSecret,
        own_public: &[u8; 32],
        peer: &[u8; 32],
    ) -> Result<Pair, ControlError> {
        let ss = dh(own, peer)?;
        Ok(Pair {
            own: *own_public,
            peer: *peer,
            mac: pair_from(&ss, own_public, peer),
            ss,
        })
    }

    /// The peer's static key.
    pub fn peer(&self) -> &[u8; 32] {
        &self.peer
    }

    /// The key of the MAC both ends put on their sealed datagrams ([`Sealed::mac_valid`]).
    pub fn mac_key(&self) -> &[u8; 32] {
        &self.mac
    }
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("peer", &crate::Key(self.peer))
            .finish_non_exhaustive()
    }
}

/// The agreements of one sealed message, made once for all its segments.
struct Agreed<'a> {
    pair: &'a Pair,
    ephemeral: &'a Ephemeral,
}

fn pair_from(ss: &[u8; 32], a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut mac = <blake2::Blake2sMac256 as Mac>::new_from_slice(KDF_LABEL)
        .expect("label is a valid key length");
    mac.update(PAIR_LABEL);
    mac.update(ss);
    mac.update(lo);
    mac.update(hi);
    mac.finalize().into_bytes().into()
}

/// The key two nodes share for the MAC of their sealed datagrams (PROTOCOL.md section 4): from
/// their static-static agreement, the same in both directions. A receiver computes it once per
/// member and then tells that member's datagrams from forgeries with one MAC, before any
/// Diffie-Hellman.
pub fn pair_key(own: &StaticSecret, peer: &[u8; 32]) -> Result<[u8; 32], ControlError> {
    Ok(Pair::new(own, peer)?.mac)
}

fn mac16(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    let mut mac = <blake2::Blake2sMac256 as Mac>::new_from_slice(key)
        .expect("a 32-byte key is a valid key length");
    for p in parts {
        mac.update(p);
    }
    let full: [u8; 32] = mac.finalize().into_bytes().into();
    full[..16].try_into().expect("16 bytes")
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &[u8; 16], b: &[u8; 16]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The cookie of source `from` under `secret` (rotated by the receiver): proof that the sender
/// receives at that address, checked without state.
pub fn cookie(secret: &[u8; 32], from: &SocketAddr) -> [u8; COOKIE_LEN] {
    let ip = match from.ip() {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    mac16(secret, &[&ip, &from.port().to_be_bytes()])
}

/// The cookie of a sender reached through `relay` under `tag` (PROTOCOL.md §9).
pub fn cookie_relayed(secret: &[u8; 32], relay: &SocketAddr, tag: &[u8; 8]) -> [u8; COOKIE_LEN] {
    let ip = match relay.ip() {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    mac16(secret, &[&ip, &relay.port().to_be_bytes(), tag])
}

/// The answer to a sealed datagram from an unknown address (its MAC `echo`).
pub fn encode_cookie_reply(echo: &[u8; MAC_LEN], cookie: &[u8; COOKIE_LEN]) -> Vec<u8> {
    let mut b = header(TYPE_COOKIE_REPLY);
    b.extend_from_slice(echo);
    b.extend_from_slice(cookie);
    debug_assert_eq!(b.len(), COOKIE_REPLY_LEN);
    b
}

/// Puts `cookie` in the trailer of a sealed datagram (it is covered by neither the MAC nor the
/// encryption, so a datagram can be repeated with it).
pub fn set_cookie(datagram: &mut [u8], cookie: &[u8; COOKIE_LEN]) {
    if datagram.len() >= SEALED_OVERHEAD {
        let n = datagram.len();
        datagram[n - COOKIE_LEN..].copy_from_slice(cookie);
    }
}

/// The MAC of a sealed datagram (to match a cookie reply's echo).
pub fn mac_of(datagram: &[u8]) -> Option<[u8; MAC_LEN]> {
    let n = datagram.len();
    (n >= SEALED_OVERHEAD).then(|| {
        datagram[n - TRAILER_LEN..n - COOKIE_LEN]
            .try_into()
            .expect("16 bytes")
    })
}

impl Agreed<'_> {
    fn seal(&self, counter: u64, plaintext: &[u8]) -> Result<Vec<u8>, ControlError> {
        if SEALED_OVERHEAD + plaintext.len() > MAX_DATAGRAM_BYTES {
            return Err(ControlError::TooLarge {
                max: MAX_DATAGRAM_BYTES,
            });
        }
        let receiver = &self.pair.peer;
        let es = &self.ephemeral.es;
        let mut b = header(TYPE_SEALED);
        b.extend_from_slice(&self.ephemeral.public);
        b.extend_from_slice(&counter.to_be_bytes());
        let hidden = aead(static_key(es, &b, receiver), &self.pair.own, &b);
        b.extend_from_slice(&hidden);
        let ct = aead(message_key(es, &self.pair.ss, &b, receiver), plaintext, &b);
        b.extend_from_slice(&ct);
        let mac = mac16(&self.pair.mac, &[&b]);
        b.extend_from_slice(&mac);
        b.extend_from_slice(&[0; COOKIE_LEN]);
        Ok(b)
    }
}

/// A sealed datagram, opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The sender's static key: it holds the private key, or the datagram would not open.
    pub sender: [u8; 32],
    pub plaintext: Vec<u8>,
}

impl Sealed<'_> {
    /// Opens the message with the receiver's static key: first the sender's static key, then the
    /// message. Success proves the sender holds the private key of the static key returned; the
    /// caller still checks `self.counter` for replay.
    pub fn open(&self, receiver: &StaticSecret) -> Result<Opened, ControlError> {
        let step = self.open_sender(receiver)?;
        self.open_message(receiver, step)
    }

    /// The first step of [`Sealed::open`]: one Diffie-Hellman reveals who claims to send, so
    /// that the receiver can check the counter and the sender's budget before the second.
    pub fn open_sender(&self, receiver: &StaticSecret) -> Result<SenderStep, ControlError> {
        self.open_sender_as(receiver, PublicKey::from(receiver).as_bytes())
    }

    /// [`Sealed::open_sender`] when the caller holds the receiver's public key.
    pub fn open_sender_as(
        &self,
        receiver: &StaticSecret,
        receiver_public: &[u8; 32],
    ) -> Result<SenderStep, ControlError> {
        let es = dh(receiver, &self.ephemeral)?;
        self.sender_under(receiver_public, es)
    }

    /// [`Sealed::open_sender_as`] with an agreement kept from an earlier datagram: no
    /// Diffie-Hellman. `None` if this datagram's ephemeral key is another.
    pub fn open_sender_known(
        &self,
        receiver_public: &[u8; 32],
        known: &EphemeralAgreement,
    ) -> Option<Result<SenderStep, ControlError>> {
        (known.ephemeral == self.ephemeral).then(|| self.sender_under(receiver_public, known.es))
    }

    fn sender_under(
        &self,
        receiver_public: &[u8; 32],
        es: [u8; 32],
    ) -> Result<SenderStep, ControlError> {
        let clear = &self.header[..SEALED_CLEAR_LEN];
        let sender: [u8; 32] = unaead(static_key(&es, clear, receiver_public), self.sender, clear)?
            .try_into()
            .map_err(|_| ControlError::Unauthentic)?;
        Ok(SenderStep {
            sender,
            es,
            ephemeral: self.ephemeral,
        })
    }

    /// The second step: the message, which opens only if `step.sender` sealed it.
    pub fn open_message(
        &self,
        receiver: &StaticSecret,
        step: SenderStep,
    ) -> Result<Opened, ControlError> {
        let pair = Pair::new(receiver, &step.sender)?;
        self.open_message_in(&pair, step)
    }

    /// [`Sealed::open_message`] with the receiver's agreement with `step.sender` made earlier
    /// (no Diffie-Hellman). A pair with another peer than the claimed sender opens nothing.
    pub fn open_message_in(&self, pair: &Pair, step: SenderStep) -> Result<Opened, ControlError> {
        if pair.peer != step.sender {
            return Err(ControlError::Unauthentic);
        }
        let key = message_key(&step.es, &pair.ss, self.header, &pair.own);
        let plaintext = unaead(key, self.ciphertext, self.header)?;
        Ok(Opened {
            sender: step.sender,
            plaintext,
        })
    }

    /// Whether the MAC was made with `pair` (see [`pair_key`]): one keyed hash, no
    /// Diffie-Hellman. A datagram from a known member's address whose MAC holds is that
    /// member's (or a replay of one, which its counter tells).
    pub fn mac_valid(&self, pair: &[u8; 32]) -> bool {
        same(&mac16(pair, &[self.macced]), &self.mac)
    }
}

/// Who claims to have sealed a datagram, before the claim is proven.
pub struct SenderStep {
    pub sender: [u8; 32],
    es: [u8; 32],
    ephemeral: [u8; 32],
}

impl SenderStep {
    /// The agreement to keep once the message opened, for the sender's next datagrams.
    pub fn agreement(&self) -> EphemeralAgreement {
        EphemeralAgreement {
            ephemeral: self.ephemeral,
            es: self.es,
        }
    }
}

/// Accepts each counter at most once, and none older than the window behind the newest seen
/// (RFC 6479's idea, as WireGuard uses for its data messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayWindow {
    newest: u64,
    /// A ring of [`REPLAY_WINDOW`] bits: the bit of counter `c` (at `c % REPLAY_WINDOW`) is set
    /// if `c` was seen; bits of counters past `newest` are clear.
    seen: Box<[u64; WINDOW_WORDS]>,
    any: bool,
}

impl Default for ReplayWindow {
    fn default() -> ReplayWindow {
        ReplayWindow {
            newest: 0,
            seen: Box::new([0; WINDOW_WORDS]),
            any: false,
        }
    }
}

fn window_bit(counter: u64) -> (usize, u64) {
    let i = counter % REPLAY_WINDOW;
    ((i / 64) as usize, 1 << (i % 64))
}

impl ReplayWindow {
    /// A window that refuses every counter up to `floor`: for a sender whose counters before a
    /// restart of this node are known only as a bound.
    pub fn above(floor: u64) -> ReplayWindow {
        ReplayWindow {
            newest: floor,
            seen: Box::new([u64::MAX; WINDOW_WORDS]),
            any: true,
        }
    }

    /// The newest counter taken, if any.
    pub fn newest(&self) -> Option<u64> {
        self.any.then_some(self.newest)
    }

    /// Whether [`ReplayWindow::accept_run`] would take the run, without taking it: checked
    /// before the work a message costs.
    pub fn would_accept(&self, first: u64, count: u16) -> bool {
        (0..u64::from(count)).all(|i| match first.checked_add(i) {
            None => false,
            Some(_) if !self.any => true,
            Some(c) if c > self.newest => true,
            Some(c) => {
                let (w, b) = window_bit(c);
                self.newest - c < REPLAY_WINDOW && self.seen[w] & b == 0
            }
        })
    }

    /// True, and remembers them, if none of the `count` counters from `first` on was seen or is
    /// too old (the segments of one message, [`crate::segment`]); otherwise false, remembering
    /// nothing.
    pub fn accept_run(&mut self, first: u64, count: u16) -> bool {
        if !self.would_accept(first, count) {
            return false;
        }
        for i in 0..u64::from(count) {
            // No overflow: would_accept checked every counter of the run.
            let taken = self.accept(first + i);
            debug_assert!(taken, "would_accept said every counter is new");
        }
        true
    }

    /// True, and remembers it, if `counter` was not seen and is not too old.
    pub fn accept(&mut self, counter: u64) -> bool {
        if !self.any {
            *self.seen = [0; WINDOW_WORDS];
            self.newest = counter;
            self.any = true;
        } else if counter > self.newest {
            // The counters between the old newest and this one are unseen: clear their bits.
            if counter - self.newest >= REPLAY_WINDOW {
                *self.seen = [0; WINDOW_WORDS];
            } else {
                for c in self.newest + 1..=counter {
                    let (w, b) = window_bit(c);
                    self.seen[w] &= !b;
                }
            }
            self.newest = counter;
        } else if self.newest - counter >= REPLAY_WINDOW {
            return false;
        }
        let (w, b) = window_bit(counter);
        if self.seen[w] & b != 0 {
            return false;
        }
        self.seen[w] |= b;
        true
    }
}

/// What a sealed message says.
#[derive(Debug, Clone, PartialEq, Eq)]
// A Hello carries a whole certificate; messages are control traffic, a few per second, so the
// size of the enum costs nothing worth an indirection.
#[allow(clippy::large_enum_variant)]
pub enum Message {
    /// "This is who I am": the sender's certificate, which must name the sealing key.
    /// `want_members` asks the receiver to answer with the members it knows, unless its
    /// [`members_digest`] equals `digest` (then both already know the same mesh).
    Hello {
        certificate: Certificate,
        want_members: bool,
        /// Asks the receiver for its workload list (the sender holds none of it: it just met the
        /// receiver, or restarted).
        want_workloads: bool,
        digest: [u8; 32],
        /// For each CA of the sender's trust bundle, the number of the newest revocation list it
        /// holds (0: none), so that the receiver sends it any newer list it has.
        revocations: Vec<CrlVersion>,
    },
    /// Members the sender knows, with the endpoint it last saw each at.
    Members(Vec<Member>),
    /// A CA's current revocation list.
    Revocation(RevocationList),
    /// "I run policy set `serial`, `length` bytes, with this digest" (section 6).
    PolicyOffer {
        serial: u64,
        length: u32,
        digest: [u8; 32],
    },
    /// "Send me policy set `serial` from byte `offset`."
    PolicyRequest { serial: u64, offset: u32 },
    /// Bytes `offset..offset + data.len()` of the encoded signed policy set `serial`.
    PolicyChunk {
        serial: u64,
        offset: u32,
        length: u32,
        data: Vec<u8>,
    },
    /// "Which routes do you serve now?", to a member whose certificate grants routes (section 8).
    GatewayProbe { nonce: u64 },
    /// The answer: the probe's nonce and the routes the sender serves (none: it serves nothing).
    GatewayServing { nonce: u64, routes: Vec<Cidr> },
    /// "Send me your flow log": a query signed by a policy admin, naming the sender as the node
    /// that asks ([`crate::flowquery`], section 9).
    FlowQuery { query: Vec<u8> },
    /// Part `part` of the answer to the query `nonce`: flow-log records as JSON lines; `last` on
    /// the final part, with `next`, the sequence number to ask from next time.
    FlowAnswer {
        nonce: u64,
        part: u16,
        last: bool,
        next: u64,
        records: Vec<u8>,
    },
    /// "These are all the workload certificates I hold now": each binds a workload's identity
    /// to the sender's key. It replaces the sender's list of a lower `version`; an empty list
    /// withdraws them all.
    Workloads {
        version: u64,
        certificates: Vec<Certificate>,
    },
    /// "I took your workload list `version`" (or a newer one): the sender stops repeating it.
    WorkloadsTaken { version: u64 },
    /// A node asks the workload issuer for the certificates of workloads it runs (section 11):
    /// its own certificate, which must name the sealing key, and the workloads by reference
    /// only.
    IssueRequest {
        nonce: u64,
        certificate: Certificate,
        workloads: Vec<crate::workload::WorkloadRef>,
    },
    /// The issuer's answer to request `nonce`: for each workload asked, in order, its
    /// certificate, or why not, for good or for now.
    IssueAnswer { nonce: u64, results: Vec<Issued> },
    /// A node that has no certificate yet asks the issuer for one (section 12), sealed with the
    /// key the certificate is to bind, proving with `credential` that it may.
    JoinRequest { nonce: u64, credential: Credential },
    /// The issuer's answer to join request `nonce`: the node's certificate and the CAs it needs,
    /// or why not.
    JoinAnswer {
        nonce: u64,
        result: Result<Joined, String>,
    },
}

/// The issuer's answer for one workload.
// At most 16 in an answer, mostly certificates: boxing them would only add allocations.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Issued {
    /// Its certificate.
    Certificate(Certificate),
    /// Refused, for good (deleted, moved, replaced, unknown): the node drops what it holds.
    Refused(String),
    /// Not decided now (the issuer has not listed its workloads yet, or assigns no address
    /// yet after a restart): the node keeps what it holds and asks again.
    Later(String),
}

impl From<Result<Certificate, String>> for Issued {
    fn from(r: Result<Certificate, String>) -> Issued {
        match r {
            Ok(c) => Issued::Certificate(c),
            Err(why) => Issued::Refused(why),
        }
    }
}

/// What a joining node proves that it may join with.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// The secret of a single-use join token (`meshctl ca token create`).
    Token([u8; 32]),
    /// A Kubernetes node's projected service-account token (a JWT), for a TokenReview, and the
    /// node certificate it holds now, if any: a renewal the issuer knows for one (the
    /// certificate binds the sealing key and verifies), however recently the issuer restarted.
    ServiceAccount {
        token: String,
        held: Option<Box<Certificate>>,
    },
}

/// Secrets never show in logs.
impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Token(s) => write!(f, "Token({})", crate::join::token_id(s)),
            Credential::ServiceAccount { token, held } => write!(
                f,
                "ServiceAccount({} bytes, {})",
                token.len(),
                if held.is_some() { "renewal" } else { "first" }
            ),
        }
    }
}

/// A node's certificate, as a join gives it, with the CAs it needs to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The node's own certificate, binding the key that sealed the request.
    pub certificate: Certificate,
    /// The CA that signed it: the node's trust bundle.
    pub ca: Certificate,
    /// The issuer's workload CA: the node's `trust.workload_cas`.
    pub workload_ca: Certificate,
}

/// The longest service-account token a join request carries.
pub const MAX_SA_TOKEN_BYTES: usize = 8 * 1024;

impl Message {
    /// A short name of the kind, for counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Members(_) => "members",
            Message::Revocation(_) => "revocation",
            Message::PolicyOffer { .. } => "policy_offer",
            Message::PolicyRequest { .. } => "policy_request",
            Message::PolicyChunk { .. } => "policy_chunk",
            Message::GatewayProbe { .. } => "gateway_probe",
            Message::GatewayServing { .. } => "gateway_serving",
            Message::FlowQuery { .. } => "flow_query",
            Message::FlowAnswer { .. } => "flow_answer",
            Message::Workloads { .. } => "workloads",
            Message::WorkloadsTaken { .. } => "workloads_taken",
            Message::IssueRequest { .. } => "issue_request",
            Message::IssueAnswer { .. } => "issue_answer",
            Message::JoinRequest { .. } => "join_request",
            Message::JoinAnswer { .. } => "join_answer",
        }
    }
}

/// Routes in one [`Message::GatewayServing`] at most (as many as a certificate grants).
pub const MAX_SERVING_ROUTES: usize = crate::cert::MAX_ADDRS;

/// Largest number of CAs a Hello reports revocation lists for.
pub const MAX_HELLO_CAS: usize = 64;

/// The revocation list a node holds for one CA: the CA's key and the list's number (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CrlVersion {
    pub issuer: [u8; 32],
    pub number: u64,
}

/// Largest piece of a policy set in one message; with the sealing overhead it stays under
/// [`MAX_DATAGRAM_BYTES`].
pub const MAX_POLICY_CHUNK_BYTES: usize = 32 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub certificate: Certificate,
    pub endpoint: SocketAddr,
}

/// Bytes of an encoded `Members` message before its first member.
pub const MEMBERS_HEADER_LEN: usize = 3;

impl Member {
    /// Bytes this member takes in an encoded `Members` message.
    pub fn encoded_len(&self) -> usize {
        let ip = if self.endpoint.is_ipv4() { 4 } else { 16 };
        2 + self.certificate.encode().len() + 1 + ip + 2
    }
}

/// A digest of a set of members' static keys: BLAKE2s-256 of the keys in ascending order. Two
/// nodes that know the same mesh (each counting itself) have the same digest.
pub fn members_digest<'a>(keys: impl IntoIterator<Item = &'a [u8; 32]>) -> [u8; 32] {
    use blake2::Digest;
    let mut sorted: Vec<&[u8; 32]> = keys.into_iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut h = blake2::Blake2s256::new();
    for k in sorted {
        h.update(k);
    }
    h.finalize().into()
}

const MSG_HELLO: u8 = 1;
const MSG_MEMBERS: u8 = 2;
const MSG_REVOCATION: u8 = 3;
const MSG_POLICY_OFFER: u8 = 4;
const MSG_POLICY_REQUEST: u8 = 5;
const MSG_POLICY_CHUNK: u8 = 6;
const MSG_GATEWAY_PROBE: u8 = 7;
const MSG_GATEWAY_SERVING: u8 = 8;
const MSG_FLOW_QUERY: u8 = 9;
const MSG_FLOW_ANSWER: u8 = 10;
const MSG_WORKLOADS: u8 = 11;
const MSG_WORKLOADS_TAKEN: u8 = 12;
const MSG_ISSUE_REQUEST: u8 = 13;
const MSG_ISSUE_ANSWER: u8 = 14;
const MSG_JOIN_REQUEST: u8 = 15;
const MSG_JOIN_ANSWER: u8 = 16;
/// Workloads one issue request names at most.
pub const MAX_ISSUE_WORKLOADS: usize = 16;
/// A refusal's reason in an issue answer is at most this long (a longer one is cut).
pub const MAX_REASON_BYTES: usize = 255;
/// Workload certificates one node announces at most (Kubernetes runs at most 110 pods on a
/// node by default).
pub const MAX_WORKLOADS: usize = 128;
/// Largest signed flow query.
pub const MAX_FLOW_QUERY_BYTES: usize = 48 * 1024;
/// Largest piece of flow-log records in one [`Message::FlowAnswer`]; with the sealing overhead
/// it stays under [`MAX_DATAGRAM_BYTES`].
pub const MAX_FLOW_ANSWER_BYTES: usize = 48 * 1024;

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(512);
        match self {
            Message::Hello {
                certificate,
                want_members,
                want_workloads,
                digest,
                revocations,
            } => {
                b.push(MSG_HELLO);
                b.push(u8::from(*want_members) | u8::from(*want_workloads) << 1);
                b.extend_from_slice(digest);
                put_cert(&mut b, certificate);
                // Senders list at most MAX_HELLO_CAS; a longer list is cut, never invalid.
                let n = revocations.len().min(MAX_HELLO_CAS);
                b.push(n as u8);
                for v in &revocations[..n] {
                    b.extend_from_slice(&v.issuer);
                    b.extend_from_slice(&v.number.to_be_bytes());
                }
            }
            Message::Members(members) => {
                b.push(MSG_MEMBERS);
                b.extend_from_slice(&(members.len() as u16).to_be_bytes());
                for m in members {
                    put_cert(&mut b, &m.certificate);
                    match m.endpoint.ip() {
                        IpAddr::V4(a) => {
                            b.push(4);
                            b.extend_from_slice(&a.octets());
                        }
                        IpAddr::V6(a) => {
                            b.push(6);
                            b.extend_from_slice(&a.octets());
                        }
                    }
                    b.extend_from_slice(&m.endpoint.port().to_be_bytes());
                }
            }
            Message::Revocation(crl) => {
                b.push(MSG_REVOCATION);
                let bytes = crl.encode();
                b.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
                b.extend_from_slice(&bytes);
            }
            Message::PolicyOffer {
                serial,
                length,
                digest,
            } => {
                b.push(MSG_POLICY_OFFER);
                b.extend_from_slice(&serial.to_be_bytes());
                b.extend_from_slice(&length.to_be_bytes());
                b.extend_from_slice(digest);
            }
            Message::PolicyRequest { serial, offset } => {
                b.push(MSG_POLICY_REQUEST);
                b.extend_from_slice(&serial.to_be_bytes());
                b.extend_from_slice(&offset.to_be_bytes());
            }
            Message::PolicyChunk {
                serial,
                offset,
                length,
                data,
            } => {
                b.push(MSG_POLICY_CHUNK);
                b.extend_from_slice(&serial.to_be_bytes());
                b.extend_from_slice(&offset.to_be_bytes());
                b.extend_from_slice(&length.to_be_bytes());
                b.extend_from_slice(&(data.len() as u32).to_be_bytes());
                b.extend_from_slice(data);
            }
            Message::FlowQuery { query } => {
                b.push(MSG_FLOW_QUERY);
                b.extend_from_slice(&(query.len() as u32).to_be_bytes());
                b.extend_from_slice(query);
            }
            Message::FlowAnswer {
                nonce,
                part,
                last,
                next,
                records,
            } => {
                b.push(MSG_FLOW_ANSWER);
                b.extend_from_slice(&nonce.to_be_bytes());
                b.extend_from_slice(&part.to_be_bytes());
                b.push(u8::from(*last));
                b.extend_from_slice(&next.to_be_bytes());
                b.extend_from_slice(&(records.len() as u32).to_be_bytes());
                b.extend_from_slice(records);
            }
            Message::WorkloadsTaken { version } => {
                b.push(MSG_WORKLOADS_TAKEN);
                b.extend_from_slice(&version.to_be_bytes());
            }
            Message::IssueRequest {
                nonce,
                certificate,
                workloads,
            } => {
                b.push(MSG_ISSUE_REQUEST);
                b.extend_from_slice(&nonce.to_be_bytes());
                put_cert(&mut b, certificate);
                // Senders ask for at most MAX_ISSUE_WORKLOADS; a longer list is cut.
                let n = workloads.len().min(MAX_ISSUE_WORKLOADS);
                b.push(n as u8);
                for w in &workloads[..n] {
                    for s in [&w.namespace, &w.name, &w.uid] {
                        put_short(&mut b, s);
                    }
                }
            }
            Message::JoinRequest { nonce, credential } => {
                b.push(MSG_JOIN_REQUEST);
                b.extend_from_slice(&nonce.to_be_bytes());
                match credential {
                    Credential::Token(secret) => {
                        b.push(1);
                        b.extend_from_slice(secret);
                    }
                    Credential::ServiceAccount { token, held } => {
                        b.push(if held.is_some() { 3 } else { 2 });
                        // Senders keep within MAX_SA_TOKEN_BYTES; a longer one is cut.
                        let jwt = &token.as_bytes()[..token.len().min(MAX_SA_TOKEN_BYTES)];
                        b.extend_from_slice(&(jwt.len() as u16).to_be_bytes());
                        b.extend_from_slice(jwt);
                        if let Some(c) = held {
                            put_cert(&mut b, c);
                        }
                    }
                }
            }
            Message::JoinAnswer { nonce, result } => {
                b.push(MSG_JOIN_ANSWER);
                b.extend_from_slice(&nonce.to_be_bytes());
                match result {
                    Ok(j) => {
                        b.push(1);
                        for c in [&j.certificate, &j.ca, &j.workload_ca] {
                            put_cert(&mut b, c);
                        }
                    }
                    Err(why) => {
                        b.push(0);
                        put_short(&mut b, why);
                    }
                }
            }
            Message::IssueAnswer { nonce, results } => {
                b.push(MSG_ISSUE_ANSWER);
                b.extend_from_slice(&nonce.to_be_bytes());
                let n = results.len().min(MAX_ISSUE_WORKLOADS);
                b.push(n as u8);
                for r in &results[..n] {
                    match r {
                        Issued::Certificate(c) => {
                            b.push(1);
                            put_cert(&mut b, c);
                        }
                        Issued::Refused(why) => {
                            b.push(0);
                            put_short(&mut b, why);
                        }
                        Issued::Later(why) => {
                            b.push(2);
                            put_short(&mut b, why);
                        }
                    }
                }
            }
            Message::Workloads {
                version,
                certificates,
            } => {
                b.push(MSG_WORKLOADS);
                b.extend_from_slice(&version.to_be_bytes());
                // Senders hold at most MAX_WORKLOADS; a longer list is cut, never invalid.
                let n = certificates.len().min(MAX_WORKLOADS);
                b.push(n as u8);
                for c in &certificates[..n] {
                    put_cert(&mut b, c);
                }
            }
            Message::GatewayProbe { nonce } => {
                b.push(MSG_GATEWAY_PROBE);
                b.extend_from_slice(&nonce.to_be_bytes());
            }
            Message::GatewayServing { nonce, routes } => {
                b.push(MSG_GATEWAY_SERVING);
                b.extend_from_slice(&nonce.to_be_bytes());
                let n = routes.len().min(MAX_SERVING_ROUTES);
                b.push(n as u8);
                for c in &routes[..n] {
                    match c.addr() {
                        IpAddr::V4(a) => {
                            b.extend_from_slice(&[4, c.prefix_len()]);
                            b.extend_from_slice(&a.octets());
                        }
                        IpAddr::V6(a) => {
                            b.extend_from_slice(&[6, c.prefix_len()]);
                            b.extend_from_slice(&a.octets());
                        }
                    }
                }
            }
        }
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<Message, ControlError> {
        if bytes.len() > MAX_DATAGRAM_BYTES {
            return Err(ControlError::TooLarge {
                max: MAX_DATAGRAM_BYTES,
            });
        }
        let mut r = Reader::new(bytes, 0);
        let msg = match r.u8("message type")? {
            MSG_HELLO => {
                let wants = r.u8("wants")?;
                if wants > 3 {
                    return Err(ControlError::Invalid {
                        field: "wants",
                        reason: "only bits 0 (members) and 1 (workloads) are defined",
                    });
                }
                let (want_members, want_workloads) = (wants & 1 != 0, wants & 2 != 0);
                let digest = r.array("digest")?;
                let certificate = read_cert(&mut r)?;
                let n = usize::from(r.u8("revocation list count")?);
                if n > MAX_HELLO_CAS {
                    return Err(ControlError::Invalid {
                        field: "revocation list count",
                        reason: "more than 64",
                    });
                }
                let mut revocations = Vec::with_capacity(n);
                for _ in 0..n {
                    revocations.push(CrlVersion {
                        issuer: r.array("issuer")?,
                        number: r.u64("list number")?,
                    });
                }
                Message::Hello {
                    certificate,
                    want_members,
                    want_workloads,
                    digest,
                    revocations,
                }
            }
            MSG_MEMBERS => {
                let n = r.u16("member count")? as usize;
                if n > MAX_MEMBERS {
                    return Err(ControlError::Invalid {
                        field: "member count",
                        reason: "more than 256",
                    });
                }
                let mut members = Vec::with_capacity(n);
                for _ in 0..n {
                    let certificate = read_cert(&mut r)?;
                    let ip: IpAddr = match r.u8("endpoint family")? {
                        4 => Ipv4Addr::from(r.array::<4>("endpoint address")?).into(),
                        6 => Ipv6Addr::from(r.array::<16>("endpoint address")?).into(),
                        _ => {
                            return Err(ControlError::Invalid {
                                field: "endpoint family",
                                reason: "must be 4 or 6",
                            })
                        }
                    };
                    let port = r.u16("endpoint port")?;
                    members.push(Member {
                        certificate,
                        endpoint: SocketAddr::new(ip, port),
                    });
                }
                Message::Members(members)
            }
            MSG_REVOCATION => {
                let n = u32::from_be_bytes(r.array("revocation list length")?) as usize;
                if n > MAX_CRL_BYTES {
                    return Err(ControlError::TooLarge { max: MAX_CRL_BYTES });
                }
                Message::Revocation(RevocationList::decode(r.take("revocation list", n)?)?)
            }
            MSG_POLICY_OFFER => Message::PolicyOffer {
                serial: r.u64("serial")?,
                length: u32::from_be_bytes(r.array("length")?),
                digest: r.array("digest")?,
            },
            MSG_POLICY_REQUEST => Message::PolicyRequest {
                serial: r.u64("serial")?,
                offset: u32::from_be_bytes(r.array("offset")?),
            },
            MSG_POLICY_CHUNK => {
                let serial = r.u64("serial")?;
                let offset = u32::from_be_bytes(r.array("offset")?);
                let length = u32::from_be_bytes(r.array("length")?);
                let n = u32::from_be_bytes(r.array("chunk length")?) as usize;
                if n > MAX_POLICY_CHUNK_BYTES {
                    return Err(ControlError::TooLarge {
                        max: MAX_POLICY_CHUNK_BYTES,
                    });
                }
                let data = r.take("chunk", n)?.to_vec();
                let end = offset as usize + n;
                if length as usize > crate::policyset::MAX_SET_BYTES || end > length as usize {
                    return Err(ControlError::Invalid {
                        field: "chunk",
                        reason: "outside the policy set's length",
                    });
                }
                Message::PolicyChunk {
                    serial,
                    offset,
                    length,
                    data,
                }
            }
            MSG_GATEWAY_PROBE => Message::GatewayProbe {
                nonce: r.u64("nonce")?,
            },
            MSG_WORKLOADS_TAKEN => Message::WorkloadsTaken {
                version: r.u64("version")?,
            },
            MSG_ISSUE_REQUEST => {
                let nonce = r.u64("nonce")?;
                let certificate = read_cert(&mut r)?;
                let n = usize::from(r.u8("workload count")?);
                if n > MAX_ISSUE_WORKLOADS {
                    return Err(ControlError::Invalid {
                        field: "workload count",
                        reason: "more than 16",
                    });
                }
                let mut workloads = Vec::with_capacity(n);
                for _ in 0..n {
                    workloads.push(crate::workload::WorkloadRef {
                        namespace: read_short(&mut r, "namespace")?,
                        name: read_short(&mut r, "name")?,
                        uid: read_short(&mut r, "uid")?,
                    });
                }
                Message::IssueRequest {
                    nonce,
                    certificate,
                    workloads,
                }
            }
            MSG_JOIN_REQUEST => {
                let nonce = r.u64("nonce")?;
                let credential = match r.u8("credential kind")? {
                    1 => Credential::Token(r.array("token secret")?),
                    kind @ (2 | 3) => {
                        let n = usize::from(r.u16("service-account token length")?);
                        if n > MAX_SA_TOKEN_BYTES {
                            return Err(ControlError::Invalid {
                                field: "service-account token",
                                reason: "longer than 8 KiB",
                            });
                        }
                        let jwt = r.take("service-account token", n)?;
                        let token =
                            String::from_utf8(jwt.to_vec()).map_err(|_| ControlError::Invalid {
                                field: "service-account token",
                                reason: "not UTF-8",
                            })?;
                        let held = match kind {
                            3 => Some(Box::new(read_cert(&mut r)?)),
                            _ => None,
                        };
                        Credential::ServiceAccount { token, held }
                    }
                    _ => {
                        return Err(ControlError::Invalid {
                            field: "credential kind",
                            reason: "must be 1, 2 or 3",
                        })
                    }
                };
                Message::JoinRequest { nonce, credential }
            }
            MSG_JOIN_ANSWER => {
                let nonce = r.u64("nonce")?;
                let result = match r.u8("result")? {
                    1 => Ok(Joined {
                        certificate: read_cert(&mut r)?,
                        ca: read_cert(&mut r)?,
                        workload_ca: read_cert(&mut r)?,
                    }),
                    0 => Err(read_short(&mut r, "reason")?),
                    _ => {
                        return Err(ControlError::Invalid {
                            field: "result",
                            reason: "must be 0 or 1",
                        })
                    }
                };
                Message::JoinAnswer { nonce, result }
            }
            MSG_ISSUE_ANSWER => {
                let nonce = r.u64("nonce")?;
                let n = usize::from(r.u8("result count")?);
                if n > MAX_ISSUE_WORKLOADS {
                    return Err(ControlError::Invalid {
                        field: "result count",
                        reason: "more than 16",
                    });
                }
                let mut results = Vec::with_capacity(n);
                for _ in 0..n {
                    results.push(match r.u8("result")? {
                        1 => Issued::Certificate(read_cert(&mut r)?),
                        0 => Issued::Refused(read_short(&mut r, "reason")?),
                        2 => Issued::Later(read_short(&mut r, "reason")?),
                        _ => {
                            return Err(ControlError::Invalid {
                                field: "result",
                                reason: "must be 0, 1 or 2",
                            })
                        }
                    });
                }
                Message::IssueAnswer { nonce, results }
            }
            MSG_WORKLOADS => {
                let version = r.u64("version")?;
                let n = usize::from(r.u8("workload count")?);
                if n > MAX_WORKLOADS {
                    return Err(ControlError::Invalid {
                        field: "workload count",
                        reason: "more than 128",
                    });
                }
                let mut certificates = Vec::with_capacity(n);
                for _ in 0..n {
                    certificates.push(read_cert(&mut r)?);
                }
                Message::Workloads {
                    version,
                    certificates,
                }
            }
            MSG_FLOW_QUERY => {
                let n = u32::from_be_bytes(r.array("query length")?) as usize;
                if n > MAX_FLOW_QUERY_BYTES {
                    return Err(ControlError::TooLarge {
                        max: MAX_FLOW_QUERY_BYTES,
                    });
                }
                Message::FlowQuery {
                    query: r.take("query", n)?.to_vec(),
                }
            }
            MSG_FLOW_ANSWER => {
                let nonce = r.u64("nonce")?;
                let part = r.u16("part")?;
                let last = r.u8("last")? != 0;
                let next = r.u64("next")?;
                let n = u32::from_be_bytes(r.array("records length")?) as usize;
                if n > MAX_FLOW_ANSWER_BYTES {
                    return Err(ControlError::TooLarge {
                        max: MAX_FLOW_ANSWER_BYTES,
                    });
                }
                Message::FlowAnswer {
                    nonce,
                    part,
                    last,
                    next,
                    records: r.take("records", n)?.to_vec(),
                }
            }
            MSG_GATEWAY_SERVING => {
                let nonce = r.u64("nonce")?;
                let n = usize::from(r.u8("route count")?);
                if n > MAX_SERVING_ROUTES {
                    return Err(ControlError::Invalid {
                        field: "route count",
                        reason: "more than 16",
                    });
                }
                let mut routes = Vec::with_capacity(n);
                for _ in 0..n {
                    let (family, len) = (r.u8("route family")?, r.u8("route prefix length")?);
                    let ip: IpAddr = match family {
                        4 => Ipv4Addr::from(r.array::<4>("route")?).into(),
                        6 => Ipv6Addr::from(r.array::<16>("route")?).into(),
                        _ => {
                            return Err(ControlError::Invalid {
                                field: "route family",
                                reason: "must be 4 or 6",
                            })
                        }
                    };
                    let c = Cidr::new(ip, len).map_err(|_| ControlError::Invalid {
                        field: "route prefix length",
                        reason: "too long for the family",
                    })?;
                    if c.addr() != ip {
                        return Err(ControlError::Invalid {
                            field: "route",
                            reason: "host bits set",
                        });
                    }
                    routes.push(c);
                }
                Message::GatewayServing { nonce, routes }
            }
            t => return Err(ControlError::UnknownType(t)),
        };
        finish(&r)?;
        Ok(msg)
    }
}

fn put_cert(b: &mut Vec<u8>, c: &Certificate) {
    let bytes = c.encode();
    // A valid certificate is at most MAX_CERT_BYTES (32 KiB), within u16.
    b.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    b.extend_from_slice(&bytes);
}

/// A string of at most 255 bytes: u8 length ‖ UTF-8 (a longer one is cut at a character
/// boundary).
fn put_short(b: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(MAX_REASON_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    b.push(end as u8);
    b.extend_from_slice(&s.as_bytes()[..end]);
}

fn read_short(r: &mut Reader, field: &'static str) -> Result<String, ControlError> {
    let n = usize::from(r.u8(field)?);
    String::from_utf8(r.take(field, n)?.to_vec()).map_err(|_| ControlError::Invalid {
        field,
        reason: "not UTF-8",
    })
}

impl From<Truncated> for ControlError {
    fn from(t: Truncated) -> ControlError {
        ControlError::Truncated {
            field: t.field,
            offset: t.offset,
        }
    }
}

/// A u16-length-prefixed certificate.
fn read_cert(r: &mut Reader) -> Result<Certificate, ControlError> {
    let n = r.u16("certificate length")? as usize;
    if n > MAX_CERT_BYTES {
        return Err(ControlError::TooLarge {
            max: MAX_CERT_BYTES,
        });
    }
    Ok(Certificate::decode(r.take("certificate", n)?)?)
}

/// Nothing may follow the last field.
fn finish(r: &Reader) -> Result<(), ControlError> {
    match r.remaining() {
        0 => Ok(()),
        n => Err(ControlError::TrailingBytes(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::{CertBody, CertKind};
    use ed25519_dalek::SigningKey;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn secret(b: u8) -> StaticSecret {
        StaticSecret::from([b; 32])
    }

    fn cert_for(key: &StaticSecret, name: &str) -> Certificate {
        let ca = SigningKey::from_bytes(&[5; 32]);
        CertBody {
            kind: CertKind::Identity,
            serial: 7,
            not_before: 0,
            not_after: u64::MAX,
            trust_domain: "example.org".into(),
            namespace: "ns".into(),
            name: name.into(),
            public_key: *PublicKey::from(key).as_bytes(),
            issuer: ca.verifying_key().to_bytes(),
            labels: BTreeMap::new(),
            addrs: vec!["100.64.0.1/32".parse().unwrap()],
            routes: vec![],
            ports: vec![],
        }
        .sign(&ca)
        .unwrap()
    }

    fn open_datagram(
        d: &[u8],
        receiver: &StaticSecret,
    ) -> Result<(Vec<u8>, [u8; 32], u64), ControlError> {
        match decode(d)? {
            Datagram::Sealed(s) => s.open(receiver).map(|o| (o.plaintext, o.sender, s.counter)),
            other => panic!("not sealed: {other:?}"),
        }
    }

    #[test]
    fn sealed_round_trip_names_the_sender() {
        let (a, b) = (secret(1), secret(2));
        let b_pub = *PublicKey::from(&b).as_bytes();
        let d = seal(&a, &b_pub, &secret(3), 42, b"hello").unwrap();
        assert!(is_control(&d));
        let (plain, sender, counter) = open_datagram(&d, &b).unwrap();
        assert_eq!(plain, b"hello");
        assert_eq!(sender, *PublicKey::from(&a).as_bytes());
        assert_eq!(counter, 42);
        assert_eq!(
            open_datagram(&d, &secret(9)),
            Err(ControlError::Unauthentic),
            "only the receiver opens it"
        );
    }

    #[test]
    fn kept_agreements_open_exactly_what_a_full_open_does() {
        let (a, b) = (secret(1), secret(2));
        let (a_pub, b_pub) = (
            *PublicKey::from(&a).as_bytes(),
            *PublicKey::from(&b).as_bytes(),
        );
        let pair_ab = Pair::new(&a, &b_pub).unwrap();
        let pair_ba = Pair::with_public(&b, &b_pub, &a_pub).unwrap();
        assert_eq!(pair_ab.mac_key(), pair_ba.mac_key());
        // One ephemeral for two messages: each opens with the full computation...
        let eph = Ephemeral::new(&secret(3), &b_pub).unwrap();
        let first = seal_message_with(&pair_ab, &eph, 10, b"one").unwrap();
        let second = seal_message_with(&pair_ab, &eph, 11, b"two").unwrap();
        assert_ne!(first[0][..], second[0][..]);
        // (Each datagram is one segment: a segment header, then the message.)
        assert!(open_datagram(&first[0], &b).unwrap().0.ends_with(b"one"));
        assert!(open_datagram(&second[0], &b).unwrap().0.ends_with(b"two"));
        // ...and the second also with what the first left, without a Diffie-Hellman.
        let Ok(Datagram::Sealed(s1)) = decode(&first[0]) else {
            panic!("sealed")
        };
        let kept = s1.open_sender_as(&b, &b_pub).unwrap().agreement();
        let Ok(Datagram::Sealed(s2)) = decode(&second[0]) else {
            panic!("sealed")
        };
        let step = s2.open_sender_known(&b_pub, &kept).unwrap().unwrap();
        assert_eq!(step.sender, a_pub);
        let opened = s2.open_message_in(&pair_ba, step).unwrap().plaintext;
        assert_eq!(opened, open_datagram(&second[0], &b).unwrap().0);
        // A datagram under another ephemeral is not for the kept agreement.
        let other = seal_message_in(&pair_ab, &secret(4), 12, b"three").unwrap();
        let Ok(Datagram::Sealed(s3)) = decode(&other[0]) else {
            panic!("sealed")
        };
        assert!(s3.open_sender_known(&b_pub, &kept).is_none());
        // A pair with someone else opens nothing; an ephemeral for another receiver seals nothing.
        let step = s2.open_sender_known(&b_pub, &kept).unwrap().unwrap();
        let pair_b9 = Pair::new(&b, PublicKey::from(&secret(9)).as_bytes()).unwrap();
        assert_eq!(
            s2.open_message_in(&pair_b9, step).unwrap_err(),
            ControlError::Unauthentic
        );
        let eph_9 = Ephemeral::new(&secret(3), PublicKey::from(&secret(9)).as_bytes()).unwrap();
        assert!(seal_message_with(&pair_ab, &eph_9, 13, b"x").is_err());
        // A forged sender under the kept agreement does not open.
        let mut forged = second[0].clone();
        forged[SEALED_CLEAR_LEN] ^= 1;
        let Ok(Datagram::Sealed(sf)) = decode(&forged) else {
            panic!("sealed")
        };
        assert!(matches!(
            sf.open_sender_known(&b_pub, &kept),
            Some(Err(ControlError::Unauthentic))
        ));
    }

    #[test]
    fn every_bit_flip_of_a_sealed_message_is_refused() {
        let (a, b) = (secret(1), secret(2));
        let d = seal(
            &a,
            PublicKey::from(&b).as_bytes(),
            &secret(3),
            1,
            b"membership",
        )
        .unwrap();
        let pair = pair_key(&b, PublicKey::from(&a).as_bytes()).unwrap();
        assert_eq!(pair, pair_key(&a, PublicKey::from(&b).as_bytes()).unwrap());
        let mac_valid = |x: &[u8]| match decode(x) {
            Ok(Datagram::Sealed(s)) => s.mac_valid(&pair),
            _ => false,
        };
        assert!(mac_valid(&d));
        let cookie_at = d.len() - COOKIE_LEN;
        for bit in 0..cookie_at * 8 {
            let mut x = d.clone();
            x[bit / 8] ^= 1 << (bit % 8);
            assert!(!mac_valid(&x), "bit {bit}: the MAC catches it");
            if bit / 8 < cookie_at - MAC_LEN {
                assert!(
                    open_datagram(&x, &b).is_err() || decode(&x).is_err(),
                    "bit {bit}"
                );
            }
        }
        // The cookie is outside both: a datagram is repeated with one.
        let mut x = d.clone();
        set_cookie(&mut x, &[9; COOKIE_LEN]);
        assert!(mac_valid(&x));
        assert!(open_datagram(&x, &b).is_ok());
    }

    #[test]
    fn cookies_bind_the_source_address_and_replies_are_small() {
        let secret = [4u8; 32];
        let a: SocketAddr = "198.18.0.1:51820".parse().unwrap();
        let b: SocketAddr = "198.18.0.1:51821".parse().unwrap();
        assert_eq!(cookie(&secret, &a), cookie(&secret, &a));
        assert_ne!(cookie(&secret, &a), cookie(&secret, &b));
        assert_ne!(cookie(&secret, &a), cookie(&[5; 32], &a));
        let reply = encode_cookie_reply(&[1; MAC_LEN], &cookie(&secret, &a));
        assert_eq!(reply.len(), COOKIE_REPLY_LEN);
        assert_eq!(
            decode(&reply),
            Ok(Datagram::CookieReply {
                echo: [1; MAC_LEN],
                cookie: cookie(&secret, &a)
            })
        );
        assert!(decode(&reply[..reply.len() - 1]).is_err());
    }

    #[test]
    fn a_forged_sender_field_does_not_open() {
        // Mallory knows her ephemeral key, so she can put the victim's key in the sender field,
        // encrypted correctly; without the victim's private key the message still cannot open.
        let (mallory, victim, b) = (secret(6), secret(1), secret(2));
        let b_pub = *PublicKey::from(&b).as_bytes();
        let e = secret(3);
        let mut d = seal(&mallory, &b_pub, &e, 1, b"i am victim").unwrap();
        let clear = d[..SEALED_CLEAR_LEN].to_vec();
        let es = dh(&e, &b_pub).unwrap();
        let forged = aead(
            static_key(&es, &clear, &b_pub),
            PublicKey::from(&victim).as_bytes(),
            &clear,
        );
        d[SEALED_CLEAR_LEN..SEALED_HEADER_LEN].copy_from_slice(&forged);
        assert_eq!(open_datagram(&d, &b), Err(ControlError::Unauthentic));
    }

    #[test]
    fn the_sender_is_hidden_from_all_but_the_receiver() {
        let (a, b, c) = (secret(1), secret(2), secret(4));
        let d = seal(&a, PublicKey::from(&b).as_bytes(), &secret(3), 7, b"x").unwrap();
        let a_pub = PublicKey::from(&a);
        assert!(
            !d.windows(32).any(|w| w == a_pub.as_bytes()),
            "the sender's key is not on the wire"
        );
        assert_eq!(open_datagram(&d, &c), Err(ControlError::Unauthentic));
        assert_eq!(open_datagram(&d, &b).unwrap().1, *a_pub.as_bytes());
    }

    #[test]
    fn low_order_keys_are_refused() {
        let b = secret(2);
        let mut d = seal(
            &secret(1),
            PublicKey::from(&b).as_bytes(),
            &secret(3),
            1,
            b"x",
        )
        .unwrap();
        d[HEADER_LEN..HEADER_LEN + 32].fill(0);
        assert_eq!(open_datagram(&d, &b), Err(ControlError::WeakKey));
        assert_eq!(
            seal(&secret(1), &[0; 32], &secret(3), 1, b"x"),
            Err(ControlError::WeakKey)
        );
    }

    #[test]
    fn probes_are_padded_and_replies_bounded() {
        let nonce = [9u8; 16];
        let probe = encode_probe(&nonce);
        assert_eq!(probe.len(), MIN_PROBE_BYTES);
        assert_eq!(decode(&probe), Ok(Datagram::Probe { nonce }));
        assert_eq!(
            decode(&probe[..MIN_PROBE_BYTES - 1]),
            Err(ControlError::ProbeTooSmall)
        );
        let cert = cert_for(&secret(1), "seed");
        let reply = encode_probe_reply(&nonce, &cert, probe.len()).unwrap();
        assert!(reply.len() <= AMPLIFICATION_FACTOR * probe.len());
        assert_eq!(
            decode(&reply),
            Ok(Datagram::ProbeReply {
                nonce,
                certificate: cert.clone()
            })
        );
        assert_eq!(
            encode_probe_reply(&nonce, &cert, 50),
            None,
            "no 3x amplification"
        );

        // A certificate too large for one unfragmented datagram: the reply names only the key.
        let mut body = cert.body.clone();
        body.labels = (0..40)
            .map(|i| {
                (
                    format!("label-key-{i:02}"),
                    "a-value-of-some-length".repeat(2),
                )
            })
            .collect();
        let big = body.sign(&SigningKey::from_bytes(&[5; 32])).unwrap();
        let reply = encode_probe_reply(&nonce, &big, probe.len()).unwrap();
        assert!(reply.len() <= crate::segment::DATAGRAM_BYTES);
        assert_eq!(
            decode(&reply),
            Ok(Datagram::ProbeKey {
                nonce,
                key: big.body.public_key
            })
        );
        assert!(matches!(
            decode(&reply[..reply.len() - 1]),
            Err(ControlError::Truncated { .. })
        ));
    }

    #[test]
    fn seeds_are_written_with_or_without_a_key() {
        let plain: Seed = "198.18.0.1:51820".parse().unwrap();
        assert_eq!(plain.key, None);
        let keyed: Seed = format!("{}@[fd00::1]:51820", crate::Key([1; 32]).to_base64())
            .parse()
            .unwrap();
        assert_eq!(keyed.key, Some([1; 32]));
        assert_eq!(keyed.to_string().parse::<Seed>(), Ok(keyed));
        for bad in [
            "198.18.0.1",
            "@198.18.0.1:1",
            "AAAA@198.18.0.1:1",
            "x@y@198.18.0.1:1",
        ] {
            let e = bad.parse::<Seed>().unwrap_err();
            assert!(
                e.contains(&format!("`{bad}` is not IP:port or KEY@IP:port")),
                "{e}"
            );
        }
    }

    #[test]
    fn wireguard_messages_are_not_control() {
        for t in 1u8..=4 {
            assert!(!is_control(&[t, 0, 0, 0, 1, 2, 3]));
        }
        assert_eq!(
            decode(b"MSHP\x01\x01"),
            Err(ControlError::UnsupportedVersion(1)),
            "version 1 sealed whole messages, without segments"
        );
        assert_eq!(
            decode(b"MSHP\x02\x03"),
            Err(ControlError::UnsupportedVersion(2)),
            "version 2 Hellos did not carry revocation list numbers"
        );
        assert_eq!(decode(b"MSHP\x03\x09"), Err(ControlError::UnknownType(9)));
    }

    #[test]
    fn replay_window_accepts_each_counter_once() {
        let mut w = ReplayWindow::default();
        let top = 10_000;
        assert!(w.accept(top - 100));
        assert!(!w.accept(top - 100));
        assert!(w.accept(top - 102), "reordered but inside the window");
        assert!(!w.accept(top - 102));
        assert!(w.accept(top));
        assert!(!w.accept(top - REPLAY_WINDOW - 5), "older than the window");
        assert!(w.accept(top - 1));
        assert!(!w.accept(top - REPLAY_WINDOW));
        assert!(w.accept(top - REPLAY_WINDOW + 1));
        assert!(!w.accept(top - 100), "seen, still inside the window");
        // A jump of more than the window forgets everything before it.
        assert!(w.accept(top + 3 * REPLAY_WINDOW));
        assert!(!w.accept(top));
        assert!(w.accept(top + 3 * REPLAY_WINDOW - 1));
        assert!(w.accept(u64::MAX));
        assert!(!w.accept(u64::MAX));
        // A floor refuses everything up to it and takes what follows.
        let mut f = ReplayWindow::above(top);
        assert!(!f.accept(top) && !f.accept(top - 1) && !f.accept(top - REPLAY_WINDOW - 1));
        assert!(f.accept(top + 1));
        assert!(!f.accept(top + 1));
    }

    proptest::proptest! {
        /// The ring of bits decides as a plain set of seen counters with the same window does,
        /// for any order of arrival (reordering, duplicates, jumps).
        #[test]
        fn replay_window_is_a_sliding_set(steps in proptest::collection::vec((0u64..6000, proptest::bool::ANY), 1..400)) {
            let mut w = ReplayWindow::default();
            let mut seen = std::collections::BTreeSet::new();
            let mut newest: Option<u64> = None;
            let mut base = 1_000_000u64;
            for (offset, jump) in steps {
                if jump {
                    base += offset;
                }
                let c = base - offset.min(base);
                let model = match newest {
                    Some(n) if c + REPLAY_WINDOW <= n => false,
                    _ => !seen.contains(&c),
                };
                proptest::prop_assert_eq!(w.accept(c), model, "counter {}", c);
                if model {
                    seen.insert(c);
                    newest = Some(newest.map_or(c, |n| n.max(c)));
                }
            }
        }
    }

    #[test]
    fn a_run_of_counters_is_accepted_whole_or_not_at_all() {
        let mut w = ReplayWindow::default();
        assert!(w.accept_run(10, 5));
        assert!(!w.accept_run(10, 5), "the same message again");
        assert!(w.accept_run(15, 3), "the next message");
        let mut w = ReplayWindow::default();
        assert!(w.accept(12));
        assert!(!w.accept_run(10, 5), "one of its counters was seen");
        assert!(
            w.accept(10) && w.accept(11),
            "and none of the others was taken"
        );
        assert!(!w.accept_run(u64::MAX, 2), "counters past the end");
        assert!(w.accept_run(u64::MAX, 1), "the very last counter");
        assert!(!w.accept(u64::MAX));
    }

    #[test]
    fn the_largest_revocation_list_crosses_as_one_message() {
        let ca = SigningKey::from_bytes(&[5; 32]);
        let td = format!("{}.org", "a".repeat(240));
        let serials: Vec<u64> = (0..crate::cert::MAX_REVOKED as u64)
            .map(|i| i * 3 + u64::MAX / 2)
            .collect();
        let crl = RevocationList::sign(&td, 9, 10, serials.clone(), &ca).unwrap();
        let msg = Message::Revocation(crl).encode();
        assert!(
            msg.len() <= crate::segment::MAX_MESSAGE_BYTES,
            "{}",
            msg.len()
        );
        let to = *PublicKey::from(&secret(2)).as_bytes();
        assert!(seal_message(&secret(1), &to, &secret(3), 1, &msg).is_ok());
        let mut more = serials;
        more.push(1);
        assert!(
            RevocationList::sign(&td, 9, 10, more, &ca).is_err(),
            "one more is refused"
        );
    }

    #[test]
    fn a_large_message_crosses_in_small_datagrams_and_opens_whole() {
        let (a, b) = (secret(1), secret(2));
        let to = *PublicKey::from(&b).as_bytes();
        let msg = Message::Members(
            (0..40u8)
                .map(|i| Member {
                    certificate: cert_for(&secret(i + 10), "member"),
                    endpoint: "198.18.0.1:51820".parse().unwrap(),
                })
                .collect(),
        );
        let encoded = msg.encode();
        let datagrams = seal_message(&a, &to, &secret(3), 1000, &encoded).unwrap();
        assert!(datagrams.len() > 1, "{} bytes", encoded.len());
        let mut r = crate::segment::Reassembly::default();
        let mut whole = None;
        // Last first: the order they arrive in does not matter.
        for d in datagrams.iter().rev() {
            assert!(d.len() <= crate::segment::DATAGRAM_BYTES, "{}", d.len());
            let Datagram::Sealed(s) = decode(d).unwrap() else {
                panic!("not sealed")
            };
            let o = s.open(&b).unwrap();
            if let Some(w) = r.add(o.sender, s.counter, &o.plaintext, 0).unwrap() {
                whole = Some(w);
            }
        }
        let whole = whole.expect("complete");
        assert_eq!(whole.first_counter, 1000);
        assert_eq!(usize::from(whole.count), datagrams.len());
        assert_eq!(Message::decode(&whole.message).unwrap(), msg);
    }

    fn sample_messages() -> Vec<Message> {
        let ca = SigningKey::from_bytes(&[5; 32]);
        vec![
            Message::Hello {
                certificate: cert_for(&secret(1), "a"),
                want_members: true,
                want_workloads: true,
                digest: [7; 32],
                revocations: vec![CrlVersion {
                    issuer: [4; 32],
                    number: 9,
                }],
            },
            Message::Members(vec![
                Member {
                    certificate: cert_for(&secret(1), "a"),
                    endpoint: "198.18.0.1:51820".parse().unwrap(),
                },
                Member {
                    certificate: cert_for(&secret(2), "b"),
                    endpoint: "[fd01::2]:51821".parse().unwrap(),
                },
            ]),
            Message::Members(vec![]),
            Message::Revocation(
                RevocationList::sign("example.org", 3, 10, vec![1, 2], &ca).unwrap(),
            ),
            Message::PolicyOffer {
                serial: 9,
                length: 70_000,
                digest: [3; 32],
            },
            Message::PolicyRequest {
                serial: 9,
                offset: 32768,
            },
            Message::PolicyChunk {
                serial: 9,
                offset: 32768,
                length: 70_000,
                data: vec![0xab; 100],
            },
            Message::GatewayProbe { nonce: 77 },
            Message::Workloads {
                version: 0,
                certificates: vec![],
            },
            Message::Workloads {
                version: u64::MAX,
                certificates: vec![cert_for(&secret(1), "web"), cert_for(&secret(1), "api")],
            },
            Message::WorkloadsTaken { version: 77 },
            Message::IssueRequest {
                nonce: 5,
                certificate: cert_for(&secret(1), "node1"),
                workloads: vec![crate::workload::WorkloadRef {
                    namespace: "microblog".into(),
                    name: "post-7d9f8-x2v".into(),
                    uid: "0c8f3a52-1b7e-4d0c-9f7a-5f1d2a3b4c5d".into(),
                }],
            },
            Message::IssueAnswer {
                nonce: 5,
                results: vec![
                    Issued::Certificate(cert_for(&secret(1), "post")),
                    Issued::Refused("workload microblog/x does not run on node prod/node1".into()),
                    Issued::Later("the issuer has not listed the cluster yet".into()),
                ],
            },
            Message::JoinRequest {
                nonce: 6,
                credential: Credential::Token([4; 32]),
            },
            Message::JoinRequest {
                nonce: 7,
                credential: Credential::ServiceAccount {
                    token: "eyJhbGciOiJSUzI1NiJ9.e30.c2ln".into(),
                    held: None,
                },
            },
            Message::JoinRequest {
                nonce: 8,
                credential: Credential::ServiceAccount {
                    token: "eyJhbGciOiJSUzI1NiJ9.e30.c2ln".into(),
                    held: Some(Box::new(cert_for(&secret(1), "node-1"))),
                },
            },
            Message::JoinAnswer {
                nonce: 6,
                result: Ok(Joined {
                    certificate: cert_for(&secret(1), "vm-1"),
                    ca: cert_for(&secret(2), "ca"),
                    workload_ca: cert_for(&secret(3), "workload-issuer"),
                }),
            },
            Message::JoinAnswer {
                nonce: 6,
                result: Err("the join token expired".into()),
            },
            Message::FlowQuery {
                query: vec![1, 2, 3],
            },
            Message::FlowAnswer {
                nonce: 9,
                part: 2,
                last: true,
                next: 1234,
                records: b"{}\n".to_vec(),
            },
            Message::GatewayServing {
                nonce: 77,
                routes: vec![],
            },
            Message::GatewayServing {
                nonce: u64::MAX,
                routes: vec![
                    "198.19.0.0/24".parse().unwrap(),
                    "fd19::/64".parse().unwrap(),
                ],
            },
        ]
    }

    #[test]
    fn a_serving_answer_is_bounded_and_canonical() {
        let routes: Vec<Cidr> = (0..17)
            .map(|i| format!("198.19.{i}.0/24").parse().unwrap())
            .collect();
        let mut bytes = Message::GatewayServing { nonce: 1, routes }.encode();
        // The encoder cuts at 16; a decoder refuses a count above it.
        assert_eq!(bytes[9], 16);
        bytes[9] = 17;
        assert!(Message::decode(&bytes).is_err());
        let mut host_bits = Message::GatewayServing {
            nonce: 1,
            routes: vec!["198.19.0.0/24".parse().unwrap()],
        }
        .encode();
        let last = host_bits.len() - 1;
        host_bits[last] = 1;
        assert!(Message::decode(&host_bits).is_err());
    }

    #[test]
    fn a_policy_chunk_must_lie_inside_its_set() {
        let chunk = |offset, length| Message::PolicyChunk {
            serial: 1,
            offset,
            length,
            data: vec![0; 10],
        };
        assert!(Message::decode(&chunk(0, 10).encode()).is_ok());
        assert!(matches!(
            Message::decode(&chunk(1, 10).encode()),
            Err(ControlError::Invalid { field: "chunk", .. })
        ));
        assert!(matches!(
            Message::decode(&chunk(0, u32::MAX).encode()),
            Err(ControlError::Invalid { field: "chunk", .. })
        ));
    }

    #[test]
    fn messages_round_trip_and_every_truncation_is_refused() {
        for m in sample_messages() {
            let bytes = m.encode();
            assert_eq!(Message::decode(&bytes).unwrap(), m);
            for n in 0..bytes.len() {
                assert!(
                    Message::decode(&bytes[..n]).is_err(),
                    "{m:?} accepted at {n} bytes"
                );
            }
            let mut long = bytes.clone();
            long.push(0);
            assert_eq!(Message::decode(&long), Err(ControlError::TrailingBytes(1)));
        }
    }

    #[test]
    fn a_full_list_of_pod_certificates_is_one_message_and_one_more_is_refused() {
        // A pod's certificate as the issuer makes it: a few labels, two addresses, a port.
        let ca = SigningKey::from_bytes(&[5; 32]);
        let pod = |i: u32| {
            let mut c = cert_for(&secret(1), "microblog-post-service-account").body;
            c.serial = u64::from(i);
            c.namespace = "microblog-production".into();
            for (k, v) in [
                ("app", "post"),
                ("app.kubernetes.io/part-of", "microblog"),
                ("pod-template-hash", "7d9f8c6b5d"),
                ("tier", "backend"),
            ] {
                c.labels.insert(k.into(), v.into());
            }
            let [_, _, hi, lo] = i.to_be_bytes();
            c.addrs = vec![
                Cidr::new(Ipv4Addr::new(100, 64, hi, lo).into(), 32).unwrap(),
                Cidr::new(
                    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i as u16).into(),
                    128,
                )
                .unwrap(),
            ];
            c.ports = vec!["http=8080/tcp".parse().unwrap()];
            c.sign(&ca).unwrap()
        };
        let full: Vec<Certificate> = (0..MAX_WORKLOADS as u32).map(pod).collect();
        let msg = Message::Workloads {
            version: 1,
            certificates: full,
        };
        let bytes = msg.encode();
        assert!(bytes.len() <= MAX_DATAGRAM_BYTES, "{}", bytes.len());
        assert_eq!(Message::decode(&bytes).unwrap(), msg);
        let mut over = bytes.clone();
        over[9] = MAX_WORKLOADS as u8 + 1;
        over.extend_from_slice(&bytes[10..bytes.len() / MAX_WORKLOADS + 10]);
        assert!(matches!(
            Message::decode(&over),
            Err(ControlError::Invalid {
                field: "workload count",
                ..
            })
        ));
    }

    #[test]
    fn a_long_refusal_is_cut_at_a_character_boundary_and_a_long_list_is_refused() {
        let why = "é".repeat(200);
        let msg = Message::IssueAnswer {
            nonce: 1,
            results: vec![Issued::Refused(why.clone())],
        };
        let Message::IssueAnswer { results, .. } = Message::decode(&msg.encode()).unwrap() else {
            panic!("not an answer")
        };
        let Issued::Refused(cut) = results[0].clone() else {
            panic!("not a refusal")
        };
        assert_eq!(cut.len(), 254, "127 whole characters");
        assert!(why.starts_with(&cut));
        let mut bytes = Message::IssueAnswer {
            nonce: 1,
            results: vec![],
        }
        .encode();
        bytes[9] = MAX_ISSUE_WORKLOADS as u8 + 1;
        assert!(matches!(
            Message::decode(&bytes),
            Err(ControlError::Invalid {
                field: "result count",
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let _ = Message::decode(&bytes);
            let mut d = MAGIC.to_vec();
            d.extend_from_slice(&bytes);
            if let Ok(Datagram::Sealed(s)) = decode(&d) {
                let _ = s.open(&secret(2));
            }
        }
    }
}

#[cfg(test)]
mod vector {
    use super::*;

    /// `testdata/sealed-v3.hex`: sender static [01; 32], receiver static [02; 32], ephemeral
    /// [03; 32], counter 42, message "hello" (one segment).
    #[test]
    fn sealed_vector_matches_byte_for_byte() {
        let mut d = seal_message(
            &StaticSecret::from([1; 32]),
            PublicKey::from(&StaticSecret::from([2; 32])).as_bytes(),
            &StaticSecret::from([3; 32]),
            42,
            b"hello",
        )
        .unwrap();
        assert_eq!(d.len(), 1);
        let d = d.remove(0);
        let path = format!("{}/testdata/sealed-v3.hex", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        let hex: String = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .flat_map(|l| l.split_whitespace())
            .collect();
        assert_eq!(hex::encode(&d), hex);
    }
}
