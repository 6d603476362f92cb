//! The issuer's Kubernetes side (`meshctl ca serve --kubernetes`): workloads from the cluster's
//! view, and nodes joining with their projected service-account token.
//!
//! A join costs the API server a TokenReview, so before one is asked:
//! 1. the token's claims must pass [`KubeView::precheck`] (for our audience, unexpired, bound to
//!    a running meshd pod on a node): junk and tokens of anything else cost nothing;
//! 2. a token reviewed in the last [`REVIEW_CACHE_MS`] is answered from that review, however
//!    many sources send it;
//! 3. reviews are spent within budgets: one for keys holding a live node certificate of ours
//!    (renewals, which a flood by others never starves), one for the rest, in all and per source
//!    network;
//! 4. at most [`crate::kube::MAX_REVIEWS_IN_FLIGHT`] wait at once, off the serve loop, so the
//!    requests of nodes in the mesh are answered meanwhile.
//!
//! The reviewed token then joins as its node ([`KubeView::joining_node`]), for no longer than
//! the token lives.

use super::joins::Joins;
use crate::kube::view::{KubeView, Review, TokenClaims};
use crate::kube::{KubeSource, Reviewed};
use proto::cert::Certificate;
use proto::issuer::Opened;
use proto::limiter::{source_of, SourceLimiter};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::mpsc;

/// TokenReviews asked of the API server per second: for keys holding a live node certificate,
/// for the others in all, and for the others per source network.
pub const KNOWN_REVIEWS_PER_SEC: u32 = 20;
pub const REVIEWS_PER_SEC: u32 = 20;
pub const REVIEWS_PER_SOURCE_PER_SEC: u32 = 1;

/// How long a review's answer stands for the same token.
pub const REVIEW_CACHE_MS: u64 = 30_000;
const MAX_CACHED_REVIEWS: usize = 4096;

/// How long after its first lists a (re)started issuer waits before it assigns addresses: the
/// kubelets report meanwhile the addresses of pods certified just before a restart.
pub const ASSIGN_GRACE_MS: u64 = 10_000;

/// The shortest node certificate given: a token this close to expiry is refused (the kubelet
/// rotates it long before).
const MIN_NODE_LIFETIME_SECS: u64 = 60;

/// The budgets reviews are spent within.
struct ReviewBudget {
    known: SourceLimiter<()>,
    others: SourceLimiter<()>,
    per_source: SourceLimiter<IpAddr>,
}

impl Default for ReviewBudget {
    fn default() -> ReviewBudget {
        ReviewBudget {
            known: SourceLimiter::new(KNOWN_REVIEWS_PER_SEC, KNOWN_REVIEWS_PER_SEC, 1),
            others: SourceLimiter::new(REVIEWS_PER_SEC, REVIEWS_PER_SEC, 1),
            per_source: SourceLimiter::new(REVIEWS_PER_SOURCE_PER_SEC, 2, 4096),
        }
    }
}

impl ReviewBudget {
    /// Whether a review for a key that is `known` (holds a live node certificate of ours), or
    /// else from `from`, is within budget at `now_ms` (and spends it).
    fn allow(&mut self, known: bool, from: IpAddr, now_ms: u64) -> bool {
        if known {
            self.known.allow((), now_ms)
        } else {
            self.per_source.allow(source_of(from), now_ms) && self.others.allow((), now_ms)
        }
    }
}

/// A join waiting for its review.
struct Pending {
    opened: Opened,
    from: SocketAddr,
    claims: TokenClaims,
    digest: [u8; 32],
}

/// What became of a join.
// Returned once per join and taken apart at once: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Step {
    /// Answer it now.
    Answer(Opened, Result<Certificate, String>),
    /// Its review was asked; [`Kubernetes::poll`] gives the answer.
    Asked,
    /// Answer nothing (over a budget): why, for the log.
    Dropped(String),
}

pub struct Kubernetes {
    pub source: KubeSource,
    node_namespace: String,
    node_lifetime: u64,
    budget: ReviewBudget,
    reviewed: HashMap<[u8; 32], (Result<Review, String>, u64)>,
    pending: HashMap<u64, Pending>,
    next_ticket: u64,
    done: mpsc::Sender<Reviewed<u64>>,
    answers: mpsc::Receiver<Reviewed<u64>>,
    ready_since: Option<u64>,
}

impl Kubernetes {
    pub fn new(source: KubeSource, node_namespace: String, node_lifetime: u64) -> Kubernetes {
        let (done, answers) = mpsc::channel();
        Kubernetes {
            source,
            node_namespace,
            node_lifetime,
            budget: ReviewBudget::default(),
            reviewed: HashMap::new(),
            pending: HashMap::new(),
            next_ticket: 0,
            done,
            answers,
            ready_since: None,
        }
    }

    fn view(&self) -> std::sync::MutexGuard<'_, KubeView> {
        self.source.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A node's join with projected token `jwt`, sealed by `opened.sender`, from `from`.
    pub fn join(
        &mut self,
        ca_path: &Path,
        joins: &mut Joins,
        jwt: &str,
        opened: Opened,
        from: SocketAddr,
        now_ms: u64,
    ) -> Step {
        let now = now_ms / 1000;
        let checked = crate::kube::view::token_claims(jwt).and_then(|claims| {
            self.view()
                .precheck(&claims, &self.source.policy, now)
                .map(|()| claims)
        });
        let claims = match checked {
            Ok(c) => c,
            Err(why) => return Step::Answer(opened, Err(why)),
        };
        let digest: [u8; 32] = blake2::Digest::finalize(blake2::Digest::chain_update(
            <blake2::Blake2s256 as blake2::Digest>::new(),
            jwt.as_bytes(),
        ))
        .into();
        if let Some((review, until)) = self.reviewed.get(&digest) {
            if now_ms < *until {
                let review = review.clone();
                let result = self.admit(ca_path, joins, review, &claims, &opened, now);
                return Step::Answer(opened, result);
            }
        }
        if !self
            .budget
            .allow(joins.known(&opened.sender, now), from.ip(), now_ms)
        {
            return Step::Dropped("over the review budget".into());
        }
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        if !self.source.review(jwt, ticket, self.done.clone()) {
            return Step::Dropped("too many reviews waiting for the API server".into());
        }
        self.pending.insert(
            ticket,
            Pending {
                opened,
                from,
                claims,
                digest,
            },
        );
        Step::Asked
    }

    /// The joins whose reviews have come back since, answered; and addresses assigned once the
    /// grace after the first lists is over.
    pub fn poll(
        &mut self,
        ca_path: &Path,
        joins: &mut Joins,
        now_ms: u64,
    ) -> Vec<(Opened, SocketAddr, Result<Certificate, String>)> {
        self.start_assigning(now_ms);
        let mut answered = Vec::new();
        while let Ok(Reviewed { ticket, review }) = self.answers.try_recv() {
            let Some(p) = self.pending.remove(&ticket) else {
                continue;
            };
            if self.reviewed.len() >= MAX_CACHED_REVIEWS {
                self.reviewed.retain(|_, (_, until)| *until > now_ms);
            }
            if self.reviewed.len() < MAX_CACHED_REVIEWS {
                self.reviewed
                    .insert(p.digest, (review.clone(), now_ms + REVIEW_CACHE_MS));
            }
            let result = self.admit(ca_path, joins, review, &p.claims, &p.opened, now_ms / 1000);
            answered.push((p.opened, p.from, result));
        }
        answered
    }

    /// The node certificate a reviewed token gives `opened.sender`.
    fn admit(
        &self,
        ca_path: &Path,
        joins: &mut Joins,
        review: Result<Review, String>,
        claims: &TokenClaims,
        opened: &Opened,
        now: u64,
    ) -> Result<Certificate, String> {
        let (joining, addrs) = {
            let view = self.view();
            let joining = view.joining_node(&review?, claims, &self.source.policy, now)?;
            let addrs = view
                .node_addresses(&joining.node)
                .ok_or_else(|| format!("node {} has no pod CIDR yet", joining.node))?;
            (joining, addrs)
        };
        let lifetime = self.node_lifetime.min(joining.expires.saturating_sub(now));
        if lifetime < MIN_NODE_LIFETIME_SECS {
            return Err("the token expires within a minute (the kubelet rotates it)".into());
        }
        let invitation =
            crate::join::node_invitation(&self.node_namespace, &joining.node, addrs, lifetime);
        crate::join::sign_node(ca_path, joins, &invitation, &opened.sender, now)
    }

    /// Starts assigning addresses [`ASSIGN_GRACE_MS`] after the view is first ready.
    fn start_assigning(&mut self, now_ms: u64) {
        let mut view = self.source.view.lock().unwrap_or_else(|e| e.into_inner());
        if view.assigning() || !view.ready() {
            return;
        }
        let since = *self.ready_since.get_or_insert(now_ms);
        if now_ms >= since + ASSIGN_GRACE_MS {
            view.start_assigning();
            drop(view);
            eprintln!("assigning pod addresses (the grace after listing the cluster is over)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_new_keys_from_many_sources_never_starves_the_renewals_of_known_ones() {
        let mut b = ReviewBudget::default();
        let mut flooded = 0;
        for second in 0..10u64 {
            let now = second * 1000;
            // 5,000 joins a second from new keys, each from an address of its own.
            let flood = (0..5_000u32)
                .filter(|i| {
                    let from = IpAddr::from([198, 18, (i >> 8) as u8, *i as u8]);
                    b.allow(false, from, now + u64::from(*i) / 10)
                })
                .count();
            flooded += flood;
            // Meanwhile every renewal of a node in the mesh is reviewed.
            let renewed = (0..KNOWN_REVIEWS_PER_SEC)
                .filter(|_| b.allow(true, "198.18.9.9".parse().unwrap(), now + 999))
                .count();
            assert_eq!(renewed, KNOWN_REVIEWS_PER_SEC as usize);
        }
        // The rate, after a burst of one second's worth.
        let most = (REVIEWS_PER_SEC * 11) as usize;
        assert!(flooded <= most, "{flooded} reviews for the flood in 10 s");
        // One source alone gets one a second, after a burst of two.
        let mut b = ReviewBudget::default();
        let one: IpAddr = "fd00::1".parse().unwrap();
        let same_64: IpAddr = "fd00::2".parse().unwrap();
        assert!(b.allow(false, one, 0) && b.allow(false, same_64, 0));
        assert!(!b.allow(false, one, 10), "the same /64");
        assert!(b.allow(false, one, 1_010));
    }
}
