//! Every packet meshd does not deliver has a reason and a counter.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! drop_reasons {
    ($($variant:ident => $name:literal: $doc:literal),* $(,)?) => {
        /// Why a packet was dropped.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Drop { $(#[doc = $doc] $variant),* }

        impl Drop {
            pub const ALL: &'static [Drop] = &[$(Drop::$variant),*];
            pub fn name(self) -> &'static str {
                match self { $(Drop::$variant => $name),* }
            }
        }
    };
}

drop_reasons! {
    NotIp => "not_ip": "A packet read from the TUN device is not IPv4 or IPv6.",
    NoRoute => "no_route": "No peer's allowed IPs hold the destination.",
    NoPrivateKey => "no_private_key": "The interface has no private key yet.",
    NoEndpoint => "no_endpoint": "The peer has no known endpoint to send to.",
    MalformedDatagram => "malformed_datagram": "A UDP datagram is not a WireGuard message.",
    Oversized => "oversized_datagram": "A UDP datagram is larger than any valid message.",
    UnknownIndex => "unknown_receiver_index": "A message names a session index no peer owns.",
    UnknownPeer => "unknown_peer": "A handshake from a static key that is not a configured peer.",
    BadMac => "bad_mac": "A handshake message failed its MAC check.",
    CookieSent => "under_load_cookie_sent": "A handshake under load was answered with a cookie.",
    HandshakeFailed => "handshake_failed": "A handshake message failed to authenticate.",
    DecryptFailed => "decrypt_failed": "A data message failed to authenticate.",
    Replay => "replay": "A data message with a counter already seen or too old.",
    NoSession => "no_session": "A data message for a session that does not exist (any more).",
    SourceNotAllowed => "source_not_allowed": "A decrypted packet's inner source is outside the peer's allowed IPs.",
    NotIpInner => "inner_not_ip": "A decrypted packet is not IPv4 or IPv6.",
    OffloadMalformed => "offload_malformed": "A packet from the TUN device that cannot be cut into segments as its virtio header says.",
    TunWrite => "tun_write_failed": "Writing to the TUN device failed.",
    UdpSend => "udp_send_failed": "Sending on the UDP socket failed.",
    ControlNotMesh => "control_in_plain_mode": "A control-protocol datagram reached a node not in mesh mode.",
    ControlBacklog => "control_backlog_full": "A control-protocol datagram arrived while the mesh task was behind.",
    ControlRefused => "control_refused": "A control-protocol datagram was malformed, unauthentic, replayed or from an untrusted identity.",
    PolicyEgress => "policy_denied_egress": "Policy denied a new flow leaving this node (before encryption).",
    PolicyIngress => "policy_denied_ingress": "Policy denied a new flow arriving at this node (after decryption).",
    PolicyMalformed => "policy_unparsable": "A packet's transport header was too short or malformed for policy to decide.",
    PolicyFragment => "policy_fragment_unmatched": "A later fragment whose first fragment did not pass (policy cannot see its ports).",
    RateLimited => "rate_limited": "A packet over the rate limit of the rule that allowed its flow, for its source identity (policy.mesh/rate-limit).",
    PolicyNotHere => "policy_not_this_node": "A packet neither to nor from this node's addresses nor a route it serves as a gateway.",
    RelayNotServed => "relay_not_served": "A relay frame for another node reached a node that relays for no one.",
    RelayUnknownNode => "relay_unknown_node": "A relay frame from or to a node that is not a member here.",
    RelayWrongPath => "relay_wrong_path": "A relay frame that did not arrive along this node's path to its source, or would go back where it came from.",
    RelayExpired => "relay_expired": "A relay frame that used up its hops, or claims more than a sender gives.",
    RelayForeignPair => "relay_foreign_pair": "A relay frame between two members of other trust domains.",
}

/// One counter per reason; lock-free, shared by the data-path threads.
pub struct DropCounters([AtomicU64; Drop::ALL.len()]);

impl Default for DropCounters {
    fn default() -> Self {
        DropCounters(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl DropCounters {
    #[inline]
    pub fn count(&self, reason: Drop) {
        self.0[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `n` packets dropped for `reason` at once (a batch).
    #[inline]
    pub fn count_n(&self, reason: Drop, n: u64) {
        self.0[reason as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self, reason: Drop) -> u64 {
        self.0[reason as usize].load(Ordering::Relaxed)
    }

    /// The non-zero counters by name, for status output.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        Drop::ALL
            .iter()
            .map(|d| (d.name().to_string(), self.get(*d)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_reason() {
        let c = DropCounters::default();
        c.count(Drop::Replay);
        c.count(Drop::Replay);
        c.count(Drop::NoRoute);
        let s = c.snapshot();
        assert_eq!(s.get("replay"), Some(&2));
        assert_eq!(s.get("no_route"), Some(&1));
        assert_eq!(s.len(), 2);
    }
}
