//! The workload issuer's sealed side (PROTOCOL.md §11), pure: it opens requests within a budget,
//! once each (a replay window per sender) and whole (reassembly), and seals answers whose
//! counters follow the clock. `meshctl ca serve` runs it on a socket; the mesh simulator runs it
//! on the simulated underlay.

use crate::control::{self, Datagram, Message, ReplayWindow};
use crate::limiter::SourceLimiter;
use crate::segment::Reassembly;
use rand_core::RngCore;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use x25519_dalek::StaticSecret;

/// Sealed datagrams opened per second (two Diffie-Hellman operations each), in all and per
/// source address: a flood costs the issuer no more.
pub const OPENS_PER_SEC: u32 = 2_000;
pub const OPENS_PER_SOURCE_PER_SEC: u32 = 50;
/// Senders whose replay windows are kept; a node's counters follow its clock, so a sender
/// forgotten and heard again is still refused datagrams older than its next one only within
/// this many senders.
const MAX_SENDERS: usize = 65_536;
/// Sealed counters follow the clock at this many per millisecond, as a node's do.
pub const COUNTER_PER_MS: u64 = 1_000_000;

/// A whole message opened: who sealed it, and its counters.
#[derive(Debug)]
pub struct Opened {
    pub sender: [u8; 32],
    pub msg: Message,
    first_counter: u64,
    count: u16,
}

/// The sealed side of the issuer: who sent what, once, within budget.
pub struct Responder {
    secret: StaticSecret,
    replay: HashMap<[u8; 32], ReplayWindow>,
    reassembly: Reassembly,
    opens: SourceLimiter<()>,
    per_source: SourceLimiter<IpAddr>,
    counter: u64,
}

impl Responder {
    pub fn new(secret: StaticSecret) -> Responder {
        Responder {
            secret,
            replay: HashMap::new(),
            reassembly: Reassembly::default(),
            opens: SourceLimiter::new(OPENS_PER_SEC, OPENS_PER_SEC, 1),
            per_source: SourceLimiter::new(
                OPENS_PER_SOURCE_PER_SEC,
                2 * OPENS_PER_SOURCE_PER_SEC,
                4096,
            ),
            counter: 0,
        }
    }

    /// One datagram from `from`: the sender and its message once a whole message has arrived,
    /// `None` while segments are missing, or why it was dropped.
    /// A whole message is only checked against the sender's replay window here; [`Responder::
    /// confirm`] takes its counters once the sender proved to be a node, so that senders with
    /// throwaway keys never fill the table of windows.
    pub fn open(
        &mut self,
        now_ms: u64,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Result<Option<Opened>, String> {
        let Datagram::Sealed(sealed) = control::decode(datagram).map_err(|e| e.to_string())? else {
            return Err("not a sealed datagram".into());
        };
        if !self
            .per_source
            .allow(crate::limiter::source_of(from.ip()), now_ms)
            || !self.opens.allow((), now_ms)
        {
            return Err("over budget".into());
        }
        let opened = sealed.open(&self.secret).map_err(|e| e.to_string())?;
        let sender = opened.sender;
        if self
            .replay
            .get(&sender)
            .is_some_and(|w| !w.would_accept(sealed.counter, 1))
        {
            return Err("replayed".into());
        }
        let whole = self
            .reassembly
            .add(sender, sealed.counter, &opened.plaintext, now_ms)
            .map_err(|e| e.to_string())?;
        let Some(whole) = whole else {
            return Ok(None);
        };
        if self
            .replay
            .get(&sender)
            .is_some_and(|w| !w.would_accept(whole.first_counter, whole.count))
        {
            return Err("replayed".into());
        }
        let msg = Message::decode(&whole.message).map_err(|e| e.to_string())?;
        Ok(Some(Opened {
            sender,
            msg,
            first_counter: whole.first_counter,
            count: whole.count,
        }))
    }

    /// Takes the counters of `opened`, from a sender that proved to be a node: the same message
    /// is refused from now on. False if they were taken meanwhile.
    pub fn confirm(&mut self, opened: &Opened) -> bool {
        if !self.replay.contains_key(&opened.sender) && self.replay.len() >= MAX_SENDERS {
            self.replay.clear();
        }
        self.replay
            .entry(opened.sender)
            .or_default()
            .accept_run(opened.first_counter, opened.count)
    }

    /// `msg` sealed to `to`, as datagrams.
    pub fn seal(
        &mut self,
        to: &[u8; 32],
        msg: &Message,
        now_ms: u64,
        rng: &mut impl RngCore,
    ) -> Vec<Vec<u8>> {
        let first = (self.counter + 1).max(now_ms.saturating_mul(COUNTER_PER_MS));
        let mut e = [0u8; 32];
        rng.fill_bytes(&mut e);
        match control::seal_message(
            &self.secret,
            to,
            &StaticSecret::from(e),
            first,
            &msg.encode(),
        ) {
            Ok(datagrams) => {
                self.counter = first + datagrams.len() as u64 - 1;
                datagrams
            }
            Err(_) => Vec::new(),
        }
    }
}

#[cfg(test)]
#[path = "issuer/tests.rs"]
mod tests;
