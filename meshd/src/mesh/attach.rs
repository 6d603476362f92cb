//! The workloads this node runs (attached by the CNI plugin, or by the operator with `meshctl
//! workload attach`), and their certificates from the issuer: asked for by reference only,
//! renewed at half-life, kept while the issuer does not answer (until they expire), dropped when
//! the issuer refuses (the workload was deleted or moved). Pure: time and randomness come in as
//! arguments; the node seals the requests and announces the certificates.

use proto::cert::Certificate;
use proto::control::{Issued, MAX_ISSUE_WORKLOADS};
use proto::workload::WorkloadRef;
use rand_core::RngCore;
use std::collections::{BTreeMap, HashMap};

/// A workload without a certificate is asked for again this often while the issuer does not
/// answer.
const FIRST_RETRY_MS: u64 = 1_000;
/// A certificate past half its life is asked to be renewed this often until it is.
const RENEW_RETRY_MS: u64 = 10_000;
/// A workload the issuer cannot decide yet (it has not listed its workloads, or assigns no
/// address yet) is asked for again this often.
const LATER_RETRY_MS: u64 = 3_000;
/// Requests whose answers are awaited at most (older ones are forgotten: their workloads are
/// asked for again).
const MAX_PENDING: usize = 64;

#[derive(Debug, Default, Clone)]
struct Attached {
    certificate: Option<Certificate>,
    /// When it was last asked for.
    asked_ms: Option<u64>,
    /// Why the issuer last refused it.
    refused: Option<String>,
    /// Why the issuer last said it cannot decide yet (it is asked again; what is held stays).
    later: Option<String>,
    /// Asks since the issuer last answered for it.
    misses: u32,
    /// Restored after a restart and not yet answered for: the workload may have been deleted
    /// while this node was down (a CNI DEL that found meshd down), so the issuer is asked at
    /// once, however young the certificate held, and its refusal withdraws it.
    unconfirmed: bool,
}

/// What became of an attached workload after an answer: its certificate, or why it has none.
pub type Outcome = (WorkloadRef, Result<Certificate, String>);

#[derive(Debug, Default)]
pub struct Attachments {
    attached: BTreeMap<WorkloadRef, Attached>,
    /// How many unanswered asks for a certificate held are repeated after a second rather than
    /// ten: one per address the issuer may listen at, each asked in turn (see
    /// [`Attachments::set_issuer_addresses`]).
    quick_retries: u32,
    /// Requests in flight: their workloads, by nonce, and when they were sent.
    pending: HashMap<u64, (Vec<WorkloadRef>, u64)>,
}

/// A workload's line in `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedStatus {
    pub reference: WorkloadRef,
    pub certificate: Option<Certificate>,
    pub refused: Option<String>,
    pub later: Option<String>,
}

impl Attachments {
    /// The issuer may listen at `n` addresses: a renewal or a check unanswered is asked again
    /// after a second until each has been tried, so that finding where it moved takes seconds.
    pub fn set_issuer_addresses(&mut self, n: usize) {
        self.quick_retries = u32::try_from(n).unwrap_or(u32::MAX);
    }

    /// Takes back a workload attached before a restart, with the certificate held then (the
    /// node checks it again before it announces it). The issuer is asked for it at once: it
    /// says whether the workload still runs here.
    pub fn restore(&mut self, w: WorkloadRef, certificate: Option<Certificate>) {
        self.attached.insert(
            w,
            Attached {
                certificate,
                unconfirmed: true,
                ..Attached::default()
            },
        );
    }

    /// Every attached workload with the certificate held, for the state directory.
    pub fn saved(&self) -> Vec<(WorkloadRef, Option<Certificate>)> {
        self.attached
            .iter()
            .map(|(w, a)| (w.clone(), a.certificate.clone()))
            .collect()
    }

    /// This node's key changed: every certificate held names the old one, and each workload is
    /// asked for again at once.
    pub fn rekey(&mut self) {
        for a in self.attached.values_mut() {
            a.certificate = None;
            a.asked_ms = None;
        }
    }

    /// Attaches `w` (again: nothing changes, its certificate is kept).
    pub fn attach(&mut self, w: WorkloadRef) {
        self.attached.entry(w).or_default();
    }

    /// Detaches `w`; true if it was attached.
    pub fn detach(&mut self, w: &WorkloadRef) -> bool {
        self.attached.remove(w).is_some()
    }

    /// The certificates held, of every attached workload.
    pub fn certificates(&self) -> Vec<Certificate> {
        self.attached
            .values()
            .filter_map(|a| a.certificate.clone())
            .collect()
    }

    pub fn status(&self) -> Vec<AttachedStatus> {
        self.attached
            .iter()
            .map(|(r, a)| AttachedStatus {
                reference: r.clone(),
                certificate: a.certificate.clone(),
                refused: a.refused.clone(),
                later: a.later.clone(),
            })
            .collect()
    }

    /// Drops certificates that expired by `now` (seconds); true if one did.
    pub fn expire(&mut self, now: u64) -> bool {
        let mut changed = false;
        for a in self.attached.values_mut() {
            if a.certificate
                .as_ref()
                .is_some_and(|c| c.body.not_after < now)
            {
                a.certificate = None;
                changed = true;
            }
        }
        changed
    }

    /// The requests to send now, each with its nonce: workloads without a certificate, those
    /// whose certificate is past half its life, and those restored but not yet confirmed, not
    /// asked for lately.
    pub fn due(&mut self, now_ms: u64, rng: &mut impl RngCore) -> Vec<(u64, Vec<WorkloadRef>)> {
        let now = now_ms / 1000;
        self.pending
            .retain(|_, (_, sent)| now_ms < *sent + 10 * RENEW_RETRY_MS);
        // When of its life (in tenths) a certificate is renewed.
        let past = |c: &Certificate, tenths: u64| {
            let b = &c.body;
            now >= b.not_before + b.not_after.saturating_sub(b.not_before) * tenths / 10
        };
        let asked_lately = |a: &Attached| a.asked_ms.is_some_and(|t| now_ms < t + RENEW_RETRY_MS);
        // Renewals go together: once one certificate is at half its life, those past 3/10 of
        // theirs are renewed with it, so that a node's renewals, each of which it announces to
        // every member, come in few rounds, not one per workload.
        let round = self
            .attached
            .values()
            .any(|a| a.certificate.as_ref().is_some_and(|c| past(c, 5)) && !asked_lately(a));
        let due: Vec<WorkloadRef> = self
            .attached
            .iter_mut()
            .filter(|(_, a)| {
                let (wait, wanted) = match &a.certificate {
                    // Refused: the issuer is asked again, slowly, until the workload is
                    // detached (it may be registered in a moment).
                    None if a.refused.is_some() => (RENEW_RETRY_MS, true),
                    None if a.later.is_some() => (LATER_RETRY_MS, true),
                    None => (FIRST_RETRY_MS, true),
                    Some(c) => (
                        match a.misses {
                            1.. if a.misses < self.quick_retries => FIRST_RETRY_MS,
                            _ => RENEW_RETRY_MS,
                        },
                        a.unconfirmed || past(c, 5) || (round && past(c, 3)),
                    ),
                };
                wanted && a.asked_ms.is_none_or(|t| now_ms >= t + wait)
            })
            .map(|(r, a)| {
                a.asked_ms = Some(now_ms);
                a.misses = a.misses.saturating_add(1);
                r.clone()
            })
            .collect();
        let mut out = Vec::new();
        for chunk in due.chunks(MAX_ISSUE_WORKLOADS) {
            if self.pending.len() >= MAX_PENDING {
                let oldest = self
                    .pending
                    .iter()
                    .min_by_key(|(_, (_, t))| *t)
                    .map(|(n, _)| *n);
                if let Some(n) = oldest {
                    self.pending.remove(&n);
                }
            }
            let nonce = rng.next_u64();
            self.pending.insert(nonce, (chunk.to_vec(), now_ms));
            out.push((nonce, chunk.to_vec()));
        }
        out
    }

    /// Takes the issuer's answer to request `nonce`: a certificate bound to `key` replaces the
    /// one held if newer; a refusal drops the one held (the issuer's view is the authority:
    /// the workload was deleted, replaced or moved); "later" changes nothing held, and the
    /// workload is asked for again. Returns what became of each workload still attached that
    /// the issuer decided; an answer to no request of ours changes nothing.
    pub fn on_answer(&mut self, nonce: u64, results: Vec<Issued>, key: &[u8; 32]) -> Vec<Outcome> {
        let Some((asked, _)) = self.pending.remove(&nonce) else {
            return Vec::new();
        };
        // The issuer answers where it is asked now: no workload needs a quick retry to find it.
        for a in self.attached.values_mut() {
            a.misses = 0;
        }
        let mut out = Vec::new();
        for (w, r) in asked.into_iter().zip(results) {
            let Some(a) = self.attached.get_mut(&w) else {
                continue; // detached meanwhile
            };
            let r = match r {
                Issued::Later(why) => {
                    a.later = Some(why);
                    a.refused = None;
                    continue;
                }
                Issued::Certificate(c) => Ok(c),
                Issued::Refused(why) => Err(why),
            };
            a.unconfirmed = false;
            a.later = None;
            let r = r.and_then(|c| {
                if c.body.public_key == *key {
                    Ok(c)
                } else {
                    Err("the issuer's certificate names another key than this node's".into())
                }
            });
            match r {
                Ok(c) => {
                    let newer = a.certificate.as_ref().is_none_or(|h| {
                        (c.body.not_before, c.body.serial) > (h.body.not_before, h.body.serial)
                    });
                    if newer {
                        a.certificate = Some(c);
                    }
                    let held = a.certificate.clone().expect("set or kept above");
                    out.push((w, Ok(held)));
                    a.refused = None;
                }
                Err(why) => {
                    a.certificate = None;
                    a.refused = Some(why.clone());
                    out.push((w, Err(why)));
                }
            }
        }
        out
    }
}

#[cfg(test)]
#[path = "attach_tests.rs"]
mod tests;
