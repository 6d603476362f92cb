//! The workload issuer's sealed side (PROTOCOL.md §11), pure: it opens requests within a budget,
//! once each (a replay window per sender) and whole (reassembly), and seals answers whose
//! counters follow the clock. Under load, a source must show a cookie (PROTOCOL.md §4: proof that
//! it receives at its address, checked with one MAC) before anything costs a Diffie-Hellman: a
//! flood from spoofed addresses spends the budget of sources without one, never that of nodes
//! that show it. `meshctl ca serve` runs it on a socket; the mesh simulator runs it
//! on the simulated underlay.

use crate::control::{self, Datagram, Message, ReplayWindow};
use crate::limiter::SourceLimiter;
use crate::segment::Reassembly;
use rand_core::RngCore;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use x25519_dalek::StaticSecret;

/// Sealed datagrams opened per second (two Diffie-Hellman operations each), in all and per
/// source address; as much again for datagrams that carry a valid cookie. A flood costs the
/// issuer no more than both.
pub const OPENS_PER_SEC: u32 = 2_000;
pub const OPENS_PER_SOURCE_PER_SEC: u32 = 50;
/// Senders whose replay windows are kept; a node's counters follow its clock, so a sender
/// forgotten and heard again is still refused datagrams older than its next one only within
/// this many senders.
const MAX_SENDERS: usize = 65_536;
/// Sealed counters follow the clock at this many per millisecond, as a node's do.
pub const COUNTER_PER_MS: u64 = 1_000_000;
/// Cookie replies per second per source network: a reply is smaller than the datagram it
/// answers and costs one MAC, so there is no cap for all sources (a flood from many would spend
/// it, and no node would be given a cookie); this one keeps a victim of spoofing from being sent
/// more than this.
pub const COOKIE_REPLIES_PER_SOURCE_PER_SEC: u32 = 50;
/// The cookie secret changes this often; a cookie of the one before still counts.
pub const COOKIE_EPOCH_MS: u64 = 120_000;

/// Why a datagram was not opened, and the cookie reply to send back, if one is owed.
#[derive(Debug)]
pub struct Dropped {
    pub why: String,
    pub reply: Option<Vec<u8>>,
}

impl Dropped {
    fn because(why: impl ToString) -> Dropped {
        Dropped {
            why: why.to_string(),
            reply: None,
        }
    }
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

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
    /// Opens for sources without a cookie, and for those with one.
    opens: SourceLimiter<()>,
    per_source: SourceLimiter<IpAddr>,
    proven_opens: SourceLimiter<()>,
    proven_per_source: SourceLimiter<IpAddr>,
    replies_per_source: SourceLimiter<IpAddr>,
    /// What each epoch's cookie secret is derived from.
    cookie_seed: [u8; 32],
    counter: u64,
}

impl Responder {
    pub fn new(secret: StaticSecret) -> Responder {
        Responder::with_open_budget(secret, OPENS_PER_SEC)
    }

    /// A responder that opens `opens_per_sec` datagrams without a cookie a second in all (0:
    /// every sender must show one first, as under a flood).
    pub fn with_open_budget(secret: StaticSecret, opens_per_sec: u32) -> Responder {
        let cookie_seed = keyed(&secret.to_bytes(), b"meshd issuer cookie seed");
        Responder {
            cookie_seed,
            secret,
            replay: HashMap::new(),
            reassembly: Reassembly::default(),
            opens: SourceLimiter::new(opens_per_sec, opens_per_sec, 1),
            per_source: SourceLimiter::new(
                OPENS_PER_SOURCE_PER_SEC,
                2 * OPENS_PER_SOURCE_PER_SEC,
                4096,
            ),
            proven_opens: SourceLimiter::new(OPENS_PER_SEC, OPENS_PER_SEC, 1),
            proven_per_source: SourceLimiter::new(
                OPENS_PER_SOURCE_PER_SEC,
                2 * OPENS_PER_SOURCE_PER_SEC,
                4096,
            ),
            replies_per_source: SourceLimiter::new(
                COOKIE_REPLIES_PER_SOURCE_PER_SEC,
                COOKIE_REPLIES_PER_SOURCE_PER_SEC,
                4096,
            ),
            counter: 0,
        }
    }

    /// The cookie of `from` in the epoch of `now_ms`, or `back` epochs before.
    fn cookie(&self, from: &SocketAddr, now_ms: u64, back: u64) -> [u8; control::COOKIE_LEN] {
        let epoch = (now_ms / COOKIE_EPOCH_MS).saturating_sub(back);
        control::cookie(&keyed(&self.cookie_seed, &epoch.to_be_bytes()), from)
    }

    /// One datagram from `from`: the sender and its message once a whole message has arrived,
    /// `None` while segments are missing, or why it was dropped.
    /// A whole message is only checked against the sender's replay window here; [`Responder::
    /// confirm`] takes its counters once the sender proved to be a node, so that senders with
    /// throwaway keys never fill the table of windows.
    /// Over budget, a source without a valid cookie is sent one (within the reply budget) in
    /// [`Dropped::reply`], and a datagram repeated with it opens within a budget of its own.
    pub fn open(
        &mut self,
        now_ms: u64,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Result<Option<Opened>, Dropped> {
        let Datagram::Sealed(sealed) = control::decode(datagram).map_err(Dropped::because)? else {
            return Err(Dropped::because("not a sealed datagram"));
        };
        let source = crate::limiter::source_of(from.ip());
        let proven = (0..2).any(|back| same(&self.cookie(&from, now_ms, back), &sealed.cookie));
        let within = if proven {
            self.proven_per_source.allow(source, now_ms) && self.proven_opens.allow((), now_ms)
        } else {
            self.per_source.allow(source, now_ms) && self.opens.allow((), now_ms)
        };
        if !within && proven {
            return Err(Dropped::because("over budget"));
        }
        if !within {
            let reply = (self.replies_per_source.allow(source, now_ms))
                .then(|| control::encode_cookie_reply(&sealed.mac, &self.cookie(&from, now_ms, 0)));
            return Err(Dropped {
                why: "over budget without a cookie".into(),
                reply,
            });
        }
        let opened = sealed.open(&self.secret).map_err(Dropped::because)?;
        let sender = opened.sender;
        if self
            .replay
            .get(&sender)
            .is_some_and(|w| !w.would_accept(sealed.counter, 1))
        {
            return Err(Dropped::because("replayed"));
        }
        let whole = self
            .reassembly
            .add(sender, sealed.counter, &opened.plaintext, now_ms)
            .map_err(Dropped::because)?;
        let Some(whole) = whole else {
            return Ok(None);
        };
        if self
            .replay
            .get(&sender)
            .is_some_and(|w| !w.would_accept(whole.first_counter, whole.count))
        {
            return Err(Dropped::because("replayed"));
        }
        let msg = Message::decode(&whole.message).map_err(Dropped::because)?;
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

/// BLAKE2s-MAC of `data` under `key`.
fn keyed(key: &[u8; 32], data: &[u8]) -> [u8; 32] {
    use blake2::digest::Mac;
    let mut mac = <blake2::Blake2sMac256 as Mac>::new_from_slice(key).expect("a 32-byte key fits");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &[u8; control::COOKIE_LEN], b: &[u8; control::COOKIE_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[path = "issuer/tests.rs"]
mod tests;
