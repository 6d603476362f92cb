//! Workload certificates: the identities of the workloads each member runs, as that member last
//! announced them, and which certificate holds each workload address. Part of membership.
//!
//! A member (a node) has one key and one certificate of its own. Each workload it runs (a pod; on
//! a VM, a service with its own overlay address) has a short-lived certificate bound to the same
//! key, which the node announces with the others it holds now (`Workloads`, PROTOCOL.md §11).
//! The caller verifies every certificate and that it names the announcer's key; this book decides
//! which of them are in force.
//!
//! What holds here, whatever arrives:
//! - A workload certificate holds host addresses only, and no address is held by two
//!   certificates. The newest certificate for an address (by `not_before`, then serial) holds it,
//!   on whichever member: an address reused by a new workload on another node goes to the new
//!   workload's certificate, and the older certificate is out of force everywhere.
//! - An older certificate for an address stays refused after the newer one left (withdrawn,
//!   expired early by revocation), until it expires itself: a member cannot bring back a
//!   workload that was rescheduled elsewhere (this node remembers it in memory: a restarted node
//!   learns the newest certificate again from the member that holds it).
//! - An announcement replaces everything its member announced before, so a withdrawn workload is
//!   out of force as soon as its member says so. An announcement of a version no newer than one
//!   already taken changes nothing.
//! - No workload address overlaps a member's own addresses or this node's (`taken`).

use super::membership::Refusal;
use proto::cert::Certificate;
use proto::Cidr;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Which certificate is newer: by `not_before`, then serial.
type Rank = (u64, u64);

fn rank(c: &Certificate) -> Rank {
    (c.body.not_before, c.body.serial)
}

/// An address as a key: (family, address), as [`Cidr::span`] gives it.
type Addr = (u8, u128);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holder {
    key: [u8; 32],
    rank: Rank,
}

#[derive(Debug, Default)]
pub struct WorkloadBook {
    /// The certificates in force, by the key they are bound to (this node's included).
    held: BTreeMap<[u8; 32], Vec<Certificate>>,
    /// The sealed counter of the announcement each member's list was taken from.
    heard: HashMap<[u8; 32], u64>,
    /// The certificate holding each workload address.
    at: BTreeMap<Addr, Holder>,
    /// The newest certificate ever seen for each address, and when it expires (seconds since the
    /// Unix epoch): an older one is refused until then.
    newest: HashMap<Addr, (Rank, u64)>,
}

/// What an announcement changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Taken {
    /// Keys whose certificates in force changed (the announcer's, and those whose certificates
    /// a newer one displaced).
    pub changed: BTreeSet<[u8; 32]>,
    /// Certificates of the announcement that are not in force, and why.
    pub refused: Vec<Refusal>,
}

impl WorkloadBook {
    /// The workload certificates in force bound to `key`.
    pub fn of(&self, key: &[u8; 32]) -> &[Certificate] {
        self.held.get(key).map_or(&[], Vec::as_slice)
    }

    /// Every key with a workload certificate in force, and its certificates.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8; 32], &Vec<Certificate>)> {
        self.held.iter()
    }

    /// Whether a list from `key` was taken (perhaps an empty one).
    pub fn has_heard(&self, key: &[u8; 32]) -> bool {
        self.heard.contains_key(key)
    }

    /// Whether a list of `version` from `key` would be newer than the one taken.
    pub fn is_newer(&self, key: &[u8; 32], version: u64) -> bool {
        self.heard.get(key).is_none_or(|v| version > *v)
    }

    /// The key holding a workload address within `range`, if any.
    pub fn holder(&self, range: &Cidr) -> Option<[u8; 32]> {
        let (family, first, last) = range.span();
        self.at
            .range((family, first)..=(family, last))
            .next()
            .map(|(_, h)| h.key)
    }

    /// Takes `certificates`, all that member `key` holds now as its announcement numbered
    /// `counter` says, in place of what it announced before. Each must be verified and bound to
    /// `key` by the caller; `taken` names the holder of an address no workload may have (a
    /// member's own, or this node's).
    pub fn announce(
        &mut self,
        key: [u8; 32],
        counter: u64,
        mut certificates: Vec<Certificate>,
        taken: impl Fn(&Cidr) -> Option<String>,
    ) -> Taken {
        let mut out = Taken::default();
        if self.heard.get(&key).is_some_and(|c| *c >= counter) {
            return out;
        }
        self.heard.insert(key, counter);
        let before = self.held.remove(&key).unwrap_or_default();
        for c in &before {
            self.unclaim(c);
        }
        // Newest first, so that of two in one list claiming an address, the newer holds it.
        certificates.sort_by_key(|c| std::cmp::Reverse(rank(c)));
        certificates.dedup();
        let mut kept: Vec<Certificate> = Vec::new();
        for c in certificates {
            match self.check(&key, &c, &taken) {
                Err(e) => out.refused.push(e),
                Ok(()) => {
                    for holder in self.claim(key, &c) {
                        out.changed.insert(holder);
                    }
                    kept.push(c);
                }
            }
        }
        kept.sort_by(|a, b| a.body.addrs.cmp(&b.body.addrs));
        if kept != before {
            out.changed.insert(key);
        }
        if !kept.is_empty() {
            self.held.insert(key, kept);
        }
        out
    }

    fn check(
        &self,
        key: &[u8; 32],
        c: &Certificate,
        taken: &impl Fn(&Cidr) -> Option<String>,
    ) -> Result<(), Refusal> {
        let body = &c.body;
        let identity = body.identity();
        if body.public_key != *key {
            return Err(Refusal::KeyMismatch);
        }
        if body.addrs.is_empty() {
            return Err(Refusal::WorkloadWithoutAddress { identity });
        }
        for a in &body.addrs {
            let (family, first, last) = a.span();
            if first != last {
                return Err(Refusal::WorkloadRange { identity, addr: *a });
            }
            let addr = (family, first);
            // A holder of the same rank keeps the address (the first claim stays): a rank names
            // one certificate of a CA.
            let newer = self
                .newest
                .get(&addr)
                .map(|(r, _)| *r)
                .filter(|r| *r > rank(c))
                .into_iter()
                .chain(self.at.get(&addr).map(|h| h.rank).filter(|r| *r >= rank(c)))
                .next();
            if let Some((_, serial)) = newer {
                return Err(Refusal::Superseded {
                    identity,
                    newest: serial,
                });
            }
            if let Some(holder) = taken(a) {
                return Err(Refusal::AddressConflict {
                    identity,
                    addr: *a,
                    holder,
                });
            }
        }
        Ok(())
    }

    /// Records `c` as holding its addresses, displacing the older certificates there; returns
    /// the keys of those displaced.
    fn claim(&mut self, key: [u8; 32], c: &Certificate) -> Vec<[u8; 32]> {
        let mut displaced = Vec::new();
        for a in &c.body.addrs {
            let (family, first, _) = a.span();
            let addr = (family, first);
            if let Some(old) = self.at.get(&addr).copied() {
                displaced.push(old.key);
                self.displace(old);
            }
            self.at.insert(addr, Holder { key, rank: rank(c) });
            let newest = self
                .newest
                .entry(addr)
                .or_insert((rank(c), c.body.not_after));
            if rank(c) >= newest.0 {
                *newest = (rank(c), c.body.not_after);
            }
        }
        displaced
    }

    /// Takes the certificate `old` names out of force (a newer one claims one of its addresses).
    fn displace(&mut self, old: Holder) {
        let Some(list) = self.held.get_mut(&old.key) else {
            return;
        };
        let Some(i) = list.iter().position(|c| rank(c) == old.rank) else {
            return;
        };
        let c = list.remove(i);
        if list.is_empty() {
            self.held.remove(&old.key);
        }
        self.unclaim(&c);
    }

    fn unclaim(&mut self, c: &Certificate) {
        for a in &c.body.addrs {
            let (family, first, _) = a.span();
            let addr = (family, first);
            if self
                .at
                .get(&addr)
                .is_some_and(|h| h.key == c.body.public_key && h.rank == rank(c))
            {
                self.at.remove(&addr);
            }
        }
    }

    /// Forgets everything bound to `key` (it left the mesh); returns whether anything was in
    /// force.
    pub fn forget(&mut self, key: &[u8; 32]) -> bool {
        self.heard.remove(key);
        let Some(list) = self.held.remove(key) else {
            return false;
        };
        for c in &list {
            self.unclaim(c);
        }
        true
    }

    /// Takes out of force every certificate `keep` refuses (expired, revoked, no longer
    /// trusted), with the reason; returns the keys that lost one.
    pub fn retain(
        &mut self,
        mut keep: impl FnMut(&Certificate) -> Result<(), String>,
    ) -> Vec<([u8; 32], String, String)> {
        let mut lost = Vec::new();
        let mut gone = Vec::new();
        for (key, list) in self.held.iter_mut() {
            list.retain(|c| match keep(c) {
                Ok(()) => true,
                Err(why) => {
                    lost.push((*key, c.body.identity(), why));
                    gone.push(c.clone());
                    false
                }
            });
        }
        self.held.retain(|_, list| !list.is_empty());
        for c in &gone {
            self.unclaim(c);
        }
        lost
    }

    /// Forgets the newest-certificate records of addresses whose newest certificate expired
    /// before `now` (seconds): nothing older can be valid then.
    pub fn prune(&mut self, now: u64) {
        self.newest.retain(|_, (_, not_after)| *not_after >= now);
    }

    /// Whether the address index holds exactly what the certificates in force say (the
    /// simulator and the property test check it).
    #[cfg(test)]
    pub fn consistent(&self) -> bool {
        let mut at = BTreeMap::new();
        for (key, list) in &self.held {
            for c in list {
                for a in &c.body.addrs {
                    let (family, first, _) = a.span();
                    let holder = Holder {
                        key: *key,
                        rank: rank(c),
                    };
                    if at.insert((family, first), holder).is_some() {
                        return false;
                    }
                }
            }
        }
        at == self.at
    }
}

#[cfg(test)]
#[path = "workloads_tests.rs"]
mod tests;
