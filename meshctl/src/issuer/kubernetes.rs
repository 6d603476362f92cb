//! The issuer's Kubernetes side (`meshctl ca serve --kubernetes`): workloads from the cluster's
//! view, and nodes joining with their projected service-account token.
//!
//! A join costs the API server a TokenReview, so before one is asked:
//! 1. the token's claims must pass [`KubeView::precheck`] (for our audience, unexpired, bound to
//!    a running meshd pod on a node): junk and tokens of anything else cost nothing;
//! 2. a token the API server answered for in the last [`REVIEW_CACHE_MS`] is answered from that
//!    review, however many sources send it, and one being reviewed is waited for, not asked
//!    again;
//! 3. reviews are spent within budgets: per pod the token is bound to (so a node, even one
//!    compromised, spends at most its own share), one for keys holding a live node certificate
//!    of ours (renewals, which a flood by others never starves), one for the rest, in all and
//!    per source network. A known key's share of its pod is its own: tokens forged to name a
//!    node's pod (the claims are read before any review) spend the share of unknown keys only;
//! 4. at most [`crate::kube::MAX_REVIEWS_IN_FLIGHT`] wait at once (half of them for keys we
//!    know), off the serve loop, so the requests of nodes in the mesh are answered meanwhile.
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
/// Reviews per second for tokens bound to one pod (a node's meshd).
pub const REVIEWS_PER_POD_PER_SEC: u32 = 1;

/// Joins waiting for one review of the same token, at most.
const MAX_WAITING_PER_REVIEW: usize = 4;

/// How long a review's answer stands for the same token.
pub const REVIEW_CACHE_MS: u64 = 30_000;
const MAX_CACHED_REVIEWS: usize = 4096;

/// How long after its first lists a (re)started issuer waits before it assigns addresses: the
/// kubelets report meanwhile the addresses of pods certified just before a restart.
pub const ASSIGN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The shortest node certificate given: a token this close to expiry is refused (the kubelet
/// rotates it long before).
const MIN_NODE_LIFETIME_SECS: u64 = 60;

/// The budgets reviews are spent within.
struct ReviewBudget {
    per_pod: SourceLimiter<u64>,
    known: SourceLimiter<()>,
    others: SourceLimiter<()>,
    per_source: SourceLimiter<IpAddr>,
    /// Keys the hashes of pod UIDs (a sender cannot aim at another pod's bucket).
    hasher: std::collections::hash_map::RandomState,
}

impl Default for ReviewBudget {
    fn default() -> ReviewBudget {
        ReviewBudget {
            per_pod: SourceLimiter::new(REVIEWS_PER_POD_PER_SEC, 2, 65_536),
            known: SourceLimiter::new(KNOWN_REVIEWS_PER_SEC, KNOWN_REVIEWS_PER_SEC, 1),
            others: SourceLimiter::new(REVIEWS_PER_SEC, REVIEWS_PER_SEC, 1),
            per_source: SourceLimiter::new(REVIEWS_PER_SOURCE_PER_SEC, 2, 4096),
            hasher: Default::default(),
        }
    }
}

impl ReviewBudget {
    /// Whether a review of a token bound to pod `pod_uid`, for a `known` key (it holds a live
    /// node certificate of ours for the node the token is bound to), or else for a key we do
    /// not know from `from`, is within budget at `now_ms` (and spends it).
    fn allow(&mut self, pod_uid: &str, known: bool, from: IpAddr, now_ms: u64) -> bool {
        use std::hash::BuildHasher;
        // A pod's share for the keys of its node we know, and one for all keys we do not.
        let pod = self.hasher.hash_one((pod_uid, known));
        if known {
            self.per_pod.allow(pod, now_ms) && self.known.allow((), now_ms)
        } else {
            self.per_source.allow(source_of(from), now_ms)
                && self.per_pod.allow(pod, now_ms)
                && self.others.allow((), now_ms)
        }
    }
}

/// Whether a key known as node identity `known_as` counts as known for a token bound to
/// `node`: only for its own node, so that a node's key spends the budget of renewals on that
/// node's token alone, and tokens it forges for other nodes' pods the budget of strangers.
fn known_for(known_as: Option<&str>, node_namespace: &str, node: &str) -> bool {
    known_as.is_some_and(|k| k.split_once('/') == Some((node_namespace, node)))
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
    /// What the API server answered lately, by token digest, and until when it stands.
    reviewed: HashMap<[u8; 32], (Review, u64)>,
    /// The joins waiting for each review asked, and the review asked for each token digest.
    pending: HashMap<u64, Vec<Pending>>,
    in_review: HashMap<[u8; 32], u64>,
    next_ticket: u64,
    done: mpsc::Sender<Reviewed<u64>>,
    answers: mpsc::Receiver<Reviewed<u64>>,
    ready_since: Option<std::time::Instant>,
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
            in_review: HashMap::new(),
            next_ticket: 0,
            done,
            answers,
            ready_since: None,
        }
    }

    fn view(&self) -> std::sync::MutexGuard<'_, KubeView> {
        self.source.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A node's join with projected token `jwt`, sealed by `opened.sender`, from `from`;
    /// `known_as` says which node identity that key holds a live node certificate of ours
    /// for, if any (asked only once the token's claims passed). A key counts as known only
    /// for a token bound to that same node.
    #[allow(clippy::too_many_arguments)]
    pub fn join(
        &mut self,
        ca_path: &Path,
        joins: &mut Joins,
        jwt: &str,
        opened: Opened,
        known_as: &mut dyn FnMut() -> Option<String>,
        from: SocketAddr,
        now_ms: u64,
    ) -> Step {
        let now = now_ms / 1000;
        // Not listed yet (just restarted): nothing can be decided, so nothing is answered, and
        // the node asks again (a refusal would end its join).
        if !self.view().ready() {
            return Step::Dropped("the issuer has not listed the cluster yet".into());
        }
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
                let result = self.admit(ca_path, joins, Ok(review), &claims, &opened, now);
                return Step::Answer(opened, result);
            }
        }
        let waiting = Pending {
            opened,
            from,
            claims,
            digest,
        };
        if let Some(ticket) = self.in_review.get(&digest) {
            let waiters = self.pending.entry(*ticket).or_default();
            if waiters.len() >= MAX_WAITING_PER_REVIEW {
                return Step::Dropped("the same token is being reviewed".into());
            }
            waiters.push(waiting);
            return Step::Asked;
        }
        let known = known_for(
            known_as().as_deref(),
            &self.node_namespace,
            &waiting.claims.node,
        );
        if !self
            .budget
            .allow(&waiting.claims.pod.uid, known, from.ip(), now_ms)
        {
            return Step::Dropped("over the review budget".into());
        }
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        if !self.source.review(jwt, ticket, known, self.done.clone()) {
            return Step::Dropped("too many reviews waiting for the API server".into());
        }
        self.in_review.insert(digest, ticket);
        self.pending.insert(ticket, vec![waiting]);
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
        self.start_assigning();
        let mut answered = Vec::new();
        while let Ok(Reviewed { ticket, review }) = self.answers.try_recv() {
            let waiting = self.pending.remove(&ticket).unwrap_or_default();
            let Some(digest) = waiting.first().map(|p| p.digest) else {
                continue;
            };
            self.in_review.remove(&digest);
            // Only what the API server said stands; a timeout or an error is asked again.
            if let Ok(r) = &review {
                if self.reviewed.len() >= MAX_CACHED_REVIEWS {
                    self.reviewed.retain(|_, (_, until)| *until > now_ms);
                }
                if self.reviewed.len() < MAX_CACHED_REVIEWS {
                    self.reviewed
                        .insert(digest, (r.clone(), now_ms + REVIEW_CACHE_MS));
                }
            }
            for p in waiting {
                let result = self.admit(
                    ca_path,
                    joins,
                    review.clone(),
                    &p.claims,
                    &p.opened,
                    now_ms / 1000,
                );
                answered.push((p.opened, p.from, result));
            }
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

    /// Starts assigning addresses [`ASSIGN_GRACE`] after the view is first ready.
    fn start_assigning(&mut self) {
        let mut view = self.source.view.lock().unwrap_or_else(|e| e.into_inner());
        if view.assigning() || !view.ready() {
            return;
        }
        let since = *self.ready_since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() >= ASSIGN_GRACE {
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
                    b.allow(&format!("pod-{i}"), false, from, now + u64::from(*i) / 10)
                })
                .count();
            flooded += flood;
            // Meanwhile every renewal of a node in the mesh is reviewed.
            let renewed = (0..KNOWN_REVIEWS_PER_SEC)
                .filter(|i| {
                    let pod = format!("meshd-{i}");
                    b.allow(&pod, true, "198.18.9.9".parse().unwrap(), now + 999)
                })
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
        assert!(b.allow("p1", false, one, 0) && b.allow("p2", false, same_64, 0));
        assert!(!b.allow("p3", false, one, 10), "the same /64");
        assert!(b.allow("p4", false, one, 1_010));
    }

    #[test]
    fn a_node_spends_at_most_its_own_pods_share_even_with_a_key_we_know() {
        let mut b = ReviewBudget::default();
        let from: IpAddr = "198.18.0.5".parse().unwrap();
        // A compromised node, known, naming its own meshd pod in forged tokens for 10 s.
        let spent = (0..10_000u64)
            .filter(|t| b.allow("its-pod", true, from, *t))
            .count();
        assert!(spent <= 2 + 10, "{spent} reviews");
        // Every other node's renewal is still reviewed.
        assert!((0..10).all(|i| b.allow(&format!("pod-{i}"), true, from, 10_000)));
    }

    #[test]
    fn a_node_s_key_is_known_only_for_its_own_node_so_forging_tokens_for_others_starves_nothing() {
        assert!(known_for(Some("nodes/node-5"), "nodes", "node-5"));
        assert!(!known_for(Some("nodes/node-5"), "nodes", "node-6"));
        assert!(!known_for(Some("other/node-5"), "nodes", "node-5"));
        assert!(!known_for(None, "nodes", "node-5"));
        let mut b = ReviewBudget::default();
        let compromised: IpAddr = "198.18.0.5".parse().unwrap();
        for second in 0..10u64 {
            // Node 5, compromised, with its known key, forges tokens naming the meshd pods of
            // 40 other nodes, a token each (no cache helps): reviewed as a stranger's.
            let forged = (0..40u64)
                .filter(|i| *i != 5)
                .filter(|i| {
                    let known = known_for(Some("nodes/node-5"), "nodes", &format!("node-{i}"));
                    b.allow(&format!("meshd-{i}"), known, compromised, second * 1000 + i)
                })
                .count();
            assert!(forged <= 2, "{forged} in second {second}");
            // Every other node's renewal is still reviewed.
            for i in 100..100 + u64::from(KNOWN_REVIEWS_PER_SEC) {
                let node = format!("node-{i}");
                let known = known_for(Some(&format!("nodes/{node}")), "nodes", &node);
                let from = IpAddr::from([198, 18, 1, i as u8]);
                assert!(
                    b.allow(&format!("meshd-{i}"), known, from, second * 1000 + 500),
                    "{node} in second {second}"
                );
            }
        }
    }

    #[test]
    fn tokens_forged_to_name_a_node_s_pod_never_starve_that_node_s_renewal() {
        let mut b = ReviewBudget::default();
        for second in 0..10u64 {
            // 1,000 joins a second from new keys and addresses, their tokens' claims naming the
            // meshd pod of the node (a pod's UID is no secret); they all fail review, after.
            for i in 0..1_000u32 {
                let from = IpAddr::from([198, 18, (i >> 8) as u8, i as u8]);
                b.allow("meshd-node-7", false, from, second * 1000 + u64::from(i));
            }
            // The node itself, renewing with its key: reviewed every time.
            assert!(
                b.allow(
                    "meshd-node-7",
                    true,
                    "198.18.0.7".parse().unwrap(),
                    second * 1000 + 999
                ),
                "second {second}"
            );
        }
    }
}
