//! The node certificates the issuer gave by joins, kept while it runs: a flood of joins by one
//! node costs one signature and one line of the record a minute, and who holds a live node
//! certificate of ours is known (its renewals are reviewed within a budget of their own).

use proto::cert::Certificate;
use std::collections::HashMap;

/// For this long after a node certificate is given, a node joining again as the same identity
/// with the same key is given the same certificate, and one with another key is refused.
pub const REUSE_SECS: u64 = 60;

/// Node identities and keys kept, at most: past it, those expired are forgotten, then all.
const MAX_KEPT: usize = 100_000;

#[derive(Default)]
pub struct Joins {
    /// The last certificate given to each node identity, and when.
    by_identity: HashMap<String, (Certificate, u64)>,
    /// The keys holding a node certificate given by a join: until it expires, and as whom.
    keys: HashMap<[u8; 32], (u64, String)>,
}

impl Joins {
    /// The node certificate of `identity` for `sender` at `now`: the one given less than
    /// [`REUSE_SECS`] ago if it was given to `sender`, a refusal if it was given to another
    /// key, else what `sign` makes (remembered).
    pub fn answer(
        &mut self,
        identity: &str,
        sender: &[u8; 32],
        now: u64,
        sign: impl FnOnce() -> Result<Certificate, String>,
    ) -> Result<Certificate, String> {
        if let Some((cert, at)) = self.by_identity.get(identity) {
            let recent = now < at.saturating_add(REUSE_SECS) && now <= cert.body.not_after;
            // Given again only while it has half its life left: never one about to expire.
            let fresh = cert.body.not_after.saturating_sub(now)
                >= cert.body.not_after.saturating_sub(*at) / 2;
            let same = cert.body.public_key == *sender;
            if recent && fresh && same {
                return Ok(cert.clone());
            }
            if recent && !same {
                return Err(format!(
                    "another key joined as {identity} {} s ago; ask again in {} s",
                    now.saturating_sub(*at),
                    at.saturating_add(REUSE_SECS).saturating_sub(now)
                ));
            }
        }
        let cert = sign()?;
        if self.by_identity.len() >= MAX_KEPT || self.keys.len() >= MAX_KEPT {
            self.forget_expired(now);
        }
        if self.by_identity.len() >= MAX_KEPT || self.keys.len() >= MAX_KEPT {
            self.by_identity.clear();
            self.keys.clear();
        }
        self.keys
            .insert(*sender, (cert.body.not_after, identity.to_string()));
        self.by_identity
            .insert(identity.to_string(), (cert.clone(), now));
        Ok(cert)
    }

    /// The node identity `key` holds a certificate of, given by a join and still valid at
    /// `now`.
    pub fn known(&self, key: &[u8; 32], now: u64) -> Option<&str> {
        self.keys
            .get(key)
            .filter(|(until, _)| *until >= now)
            .map(|(_, identity)| identity.as_str())
    }

    fn forget_expired(&mut self, now: u64) {
        self.keys.retain(|_, (until, _)| *until >= now);
        self.by_identity
            .retain(|_, (cert, _)| cert.body.not_after >= now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::cert::CertBody;

    fn cert(key: u8, not_after: u64) -> Certificate {
        let signing = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let mut body = CertBody::ca("example.org", "node", [key; 32], 1, (0, not_after), vec![]);
        body.kind = proto::cert::CertKind::Identity;
        body.namespace = "nodes".into();
        body.issuer = signing.verifying_key().to_bytes();
        body.sign(&signing).unwrap()
    }

    #[test]
    fn a_node_joining_again_within_a_minute_is_given_the_same_certificate_unsigned() {
        let mut j = Joins::default();
        let mut signed = 0;
        let mut sign = |k| {
            signed += 1;
            Ok(cert(k, 10_000))
        };
        let first = j.answer("nodes/n1", &[1; 32], 100, || sign(1)).unwrap();
        for t in 100..100 + REUSE_SECS {
            let again = j.answer("nodes/n1", &[1; 32], t, || sign(1)).unwrap();
            assert_eq!(again.encode(), first.encode());
        }
        assert_eq!(j.known(&[1; 32], 5_000), Some("nodes/n1"));
        assert_eq!(j.known(&[1; 32], 10_001), None, "expired");
        j.answer("nodes/n1", &[1; 32], 100 + REUSE_SECS, || sign(1))
            .unwrap();
        assert_eq!(signed, 2, "one signature a minute");
    }

    #[test]
    fn another_key_for_the_same_node_within_a_minute_is_refused_and_later_given_its_own() {
        let mut j = Joins::default();
        j.answer("nodes/n1", &[1; 32], 100, || Ok(cert(1, 10_000)))
            .unwrap();
        let e = j
            .answer("nodes/n1", &[2; 32], 130, || Ok(cert(2, 10_000)))
            .unwrap_err();
        assert!(e.contains("another key") && e.contains("30 s"), "{e}");
        assert_eq!(j.known(&[2; 32], 130), None);
        let c = j
            .answer("nodes/n1", &[2; 32], 160, || Ok(cert(2, 10_000)))
            .unwrap();
        assert_eq!(c.body.public_key, [2; 32]);
        assert_eq!(j.known(&[2; 32], 160), Some("nodes/n1"));
    }

    #[test]
    fn a_certificate_past_half_its_life_is_not_given_again() {
        let mut j = Joins::default();
        j.answer("nodes/n1", &[1; 32], 100, || Ok(cert(1, 160)))
            .unwrap();
        let again = j
            .answer("nodes/n1", &[1; 32], 140, || Ok(cert(1, 1_000)))
            .unwrap();
        assert_eq!(again.body.not_after, 1_000, "a new one");
    }

    #[test]
    fn a_refused_signature_is_not_remembered() {
        let mut j = Joins::default();
        assert!(j
            .answer("nodes/n1", &[1; 32], 100, || Err("revoked".into()))
            .is_err());
        assert!(j
            .answer("nodes/n1", &[2; 32], 101, || Ok(cert(2, 10_000)))
            .is_ok());
    }
}
