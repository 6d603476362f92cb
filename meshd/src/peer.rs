//! One WireGuard peer: boringtun's `Tunn` (the Noise IK state machine and transport keys), its
//! endpoint, its allowed IPs and its counters. The mutable protocol state sits behind a per-peer
//! lock; the counters are atomics so status never waits on the data path.

use crate::drops::DropCounters;
use boringtun::noise::Tunn;
use boringtun::x25519;
use parking_lot::Mutex;
use proto::relay::{Endpoint, Tag};
use proto::{Cidr, Key};
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Peer {
    pub public_key: Key,
    /// Its tag in relay frames.
    pub tag: Tag,
    /// Mesh mode: it is of this node's trust domain (a relay joins only pairs with one such end).
    pub local: std::sync::atomic::AtomicBool,
    /// Our 24-bit local index for this peer; boringtun puts it in the top bits of every session
    /// index, so a message's receiver index names the peer it belongs to.
    pub index: u32,
    pub state: Mutex<PeerState>,
    /// UDP payload bytes sent to and received from this peer, as `wg show` reports transfer.
    pub tx_bytes: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Datagrams sent to and authenticated from this peer.
    pub tx_packets: AtomicU64,
    pub rx_packets: AtomicU64,
    /// Handshake messages from this peer that authenticated.
    pub handshakes: AtomicU64,
    /// The device's coarse clock ([`crate::device::Device::clock_ms`]) when the last
    /// authenticated datagram arrived from the peer; 0: never.
    pub last_rx_ms: AtomicU64,
    pub drops: DropCounters,
}

/// What the data path and the configuration both change.
pub struct PeerState {
    /// `None` until the interface has a private key.
    pub tunn: Option<Tunn>,
    pub endpoint: Option<Endpoint>,
    pub allowed_ips: Vec<Cidr>,
    pub preshared_key: Option<Key>,
    pub keepalive_secs: u16,
}

impl Peer {
    pub fn new(public_key: Key, index: u32) -> Peer {
        Peer {
            tag: Tag::of(&public_key.0),
            local: Default::default(),
            public_key,
            index,
            state: Mutex::new(PeerState {
                tunn: None,
                endpoint: None,
                allowed_ips: Vec::new(),
                preshared_key: None,
                keepalive_secs: 0,
            }),
            tx_bytes: AtomicU64::new(0),
            rx_bytes: AtomicU64::new(0),
            tx_packets: AtomicU64::new(0),
            rx_packets: AtomicU64::new(0),
            handshakes: AtomicU64::new(0),
            last_rx_ms: AtomicU64::new(0),
            drops: DropCounters::default(),
        }
    }

    #[inline]
    pub fn add_tx(&self, bytes: usize) {
        self.add_tx_batch(bytes, 1);
    }

    #[inline]
    pub fn add_rx(&self, bytes: usize) {
        self.add_rx_batch(bytes, 1);
    }

    /// Counts `packets` datagrams of `bytes` in all, sent in one batch.
    #[inline]
    pub fn add_tx_batch(&self, bytes: usize, packets: u64) {
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.tx_packets.fetch_add(packets, Ordering::Relaxed);
    }

    /// Counts `packets` authenticated datagrams of `bytes` in all, received in one batch.
    #[inline]
    pub fn add_rx_batch(&self, bytes: usize, packets: u64) {
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.rx_packets.fetch_add(packets, Ordering::Relaxed);
    }
}

impl PeerState {
    /// Builds a fresh protocol state for the current keys and settings. Sessions in flight are
    /// dropped; the peers re-handshake on the next packet.
    pub fn reset_tunnel(&mut self, private_key: Option<&Key>, peer_key: &Key, index: u32) {
        self.tunn = private_key.map(|k| {
            Tunn::new(
                x25519::StaticSecret::from(k.0),
                x25519::PublicKey::from(peer_key.0),
                self.preshared_key.map(|k| k.0),
                (self.keepalive_secs > 0).then_some(self.keepalive_secs),
                index,
                None,
            )
        });
    }
}
