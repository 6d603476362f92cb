//! A mesh-wide flow-log query: what `meshctl flows --mesh` asks every member for, signed by a
//! policy admin (the key that signs policy sets), so that only a node the policy admin trusts can
//! read the flows of others. The query names the node that asks (its static key): a member
//! answers only that node, over the control protocol's sealed channel, so a query seen or kept
//! by another member is worth nothing to it. It is fresh for [`FRESH_SECS`], and its nonce is
//! answered once. Specified in `proto/PROTOCOL.md` section 10.

use crate::reader::{Reader, Truncated};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

const MAGIC: &[u8; 4] = b"MSFQ";
const VERSION: u8 = 1;
/// A query is answered within this many seconds of its `issued_at`, either way (clocks of the
/// mesh are assumed within a minute, as certificates already assume).
pub const FRESH_SECS: u64 = 60;
/// Records one member returns for one query at most.
pub const MAX_LIMIT: u16 = 5000;
/// Per-node cursors a query carries at most (one per member of a large mesh is not needed:
/// a node without a cursor answers from `since`).
pub const MAX_CURSORS: usize = 1024;
const SIGNATURE_BYTES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowQuery {
    /// The policy admin's Ed25519 key that signed it.
    pub admin: [u8; 32],
    /// The static key of the node that asks; members answer only it.
    pub requester: [u8; 32],
    pub nonce: u64,
    /// Unix seconds.
    pub issued_at: u64,
    /// Only records of this Unix second or later (0: every record kept).
    pub since: u64,
    pub denied_only: bool,
    pub limit: u16,
    /// Per member (static key): only records after this sequence number of its log.
    pub cursors: Vec<([u8; 32], u64)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlowQueryError {
    #[error("truncated at {field} (offset {offset})")]
    Truncated { field: &'static str, offset: usize },
    #[error("not a flow query (magic)")]
    BadMagic,
    #[error("unsupported flow query version {0}")]
    UnsupportedVersion(u8),
    #[error("{0} trailing bytes")]
    Trailing(usize),
    #[error("more than {MAX_CURSORS} cursors")]
    TooManyCursors,
    #[error("limit {0} is not 1 to {MAX_LIMIT}")]
    Limit(u16),
    #[error("since {since} is after the query was issued ({issued_at})")]
    Since { since: u64, issued_at: u64 },
    #[error("signed by a key that is not a policy admin here")]
    NotAdmin,
    #[error("the signature does not verify")]
    BadSignature,
    #[error("asked by another node than the one that sent it")]
    WrongRequester,
    #[error("issued at {issued_at}, not within {FRESH_SECS} s of now ({now})")]
    Stale { issued_at: u64, now: u64 },
}

impl From<Truncated> for FlowQueryError {
    fn from(t: Truncated) -> Self {
        FlowQueryError::Truncated {
            field: t.field,
            offset: t.offset,
        }
    }
}

impl FlowQuery {
    fn body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(128 + self.cursors.len() * 40);
        b.extend_from_slice(MAGIC);
        b.push(VERSION);
        b.extend_from_slice(&self.admin);
        b.extend_from_slice(&self.requester);
        b.extend_from_slice(&self.nonce.to_be_bytes());
        b.extend_from_slice(&self.issued_at.to_be_bytes());
        b.extend_from_slice(&self.since.to_be_bytes());
        b.push(u8::from(self.denied_only));
        b.extend_from_slice(&self.limit.to_be_bytes());
        let n = self.cursors.len().min(MAX_CURSORS);
        b.extend_from_slice(&(n as u16).to_be_bytes());
        for (k, seq) in &self.cursors[..n] {
            b.extend_from_slice(k);
            b.extend_from_slice(&seq.to_be_bytes());
        }
        b
    }

    /// The query signed with `key` (which sets `admin`): the bytes to send.
    pub fn sign(mut self, key: &SigningKey) -> Vec<u8> {
        self.admin = key.verifying_key().to_bytes();
        let mut b = self.body();
        let signature = key.sign(&b).to_bytes();
        b.extend_from_slice(&signature);
        b
    }

    /// Decodes a signed query and checks its structure; [`FlowQuery::verify`] says whether to
    /// answer it.
    pub fn decode(bytes: &[u8]) -> Result<(FlowQuery, [u8; SIGNATURE_BYTES]), FlowQueryError> {
        let mut r = Reader::new(bytes, 0);
        if &r.array::<4>("magic")? != MAGIC {
            return Err(FlowQueryError::BadMagic);
        }
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(FlowQueryError::UnsupportedVersion(version));
        }
        let admin = r.array("admin")?;
        let requester = r.array("requester")?;
        let nonce = r.u64("nonce")?;
        let issued_at = r.u64("issued_at")?;
        let since = r.u64("since")?;
        let denied_only = r.u8("denied_only")? != 0;
        let limit = r.u16("limit")?;
        if limit == 0 || limit > MAX_LIMIT {
            return Err(FlowQueryError::Limit(limit));
        }
        let n = usize::from(r.u16("cursor count")?);
        if n > MAX_CURSORS {
            return Err(FlowQueryError::TooManyCursors);
        }
        let mut cursors = Vec::with_capacity(n);
        for _ in 0..n {
            cursors.push((r.array("cursor key")?, r.u64("cursor")?));
        }
        let signature = r.array("signature")?;
        if r.remaining() != 0 {
            return Err(FlowQueryError::Trailing(r.remaining()));
        }
        Ok((
            FlowQuery {
                admin,
                requester,
                nonce,
                issued_at,
                since,
                denied_only,
                limit,
                cursors,
            },
            signature,
        ))
    }

    /// Whether a member whose policy admins are `admins` answers this query, sent by the node
    /// with static key `sender`, at Unix second `now`.
    pub fn verify(
        &self,
        signature: &[u8; SIGNATURE_BYTES],
        admins: &[[u8; 32]],
        sender: &[u8; 32],
        now: u64,
    ) -> Result<(), FlowQueryError> {
        // The cheap checks first: the signature is checked last.
        if !admins.contains(&self.admin) {
            return Err(FlowQueryError::NotAdmin);
        }
        if self.requester != *sender {
            return Err(FlowQueryError::WrongRequester);
        }
        if self.issued_at.abs_diff(now) > FRESH_SECS {
            return Err(FlowQueryError::Stale {
                issued_at: self.issued_at,
                now,
            });
        }
        if self.since > self.issued_at {
            return Err(FlowQueryError::Since {
                since: self.since,
                issued_at: self.issued_at,
            });
        }
        let key = VerifyingKey::from_bytes(&self.admin).map_err(|_| FlowQueryError::NotAdmin)?;
        key.verify(&self.body(), &Signature::from_bytes(signature))
            .map_err(|_| FlowQueryError::BadSignature)
    }

    /// When this query stops being fresh anywhere, in Unix milliseconds: how long its nonce
    /// must be remembered.
    pub fn stale_after_ms(&self) -> u64 {
        self.issued_at
            .saturating_add(FRESH_SECS + 1)
            .saturating_mul(1000)
    }

    /// The cursor this query gives member `key` (0: from the start, or `since`).
    pub fn cursor(&self, key: &[u8; 32]) -> u64 {
        self.cursors
            .iter()
            .find(|(k, _)| k == key)
            .map_or(0, |(_, s)| *s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query() -> FlowQuery {
        FlowQuery {
            admin: [0; 32],
            requester: [7; 32],
            nonce: 42,
            issued_at: 1_000_000,
            since: 999_000,
            denied_only: true,
            limit: 1000,
            cursors: vec![([1; 32], 5), ([2; 32], 9)],
        }
    }

    #[test]
    fn a_signed_query_round_trips_and_verifies_only_as_signed() {
        let admin = SigningKey::from_bytes(&[3; 32]);
        let bytes = query().sign(&admin);
        let (q, sig) = FlowQuery::decode(&bytes).unwrap();
        let admins = [admin.verifying_key().to_bytes()];
        assert_eq!(q.admin, admins[0]);
        assert_eq!(q.cursors, query().cursors);
        assert_eq!(q.cursor(&[2; 32]), 9);
        assert_eq!(q.cursor(&[4; 32]), 0);
        assert_eq!(q.verify(&sig, &admins, &[7; 32], 1_000_030), Ok(()));
        // Another admin list, another sender, too old or too new, any bit changed.
        let other = [SigningKey::from_bytes(&[4; 32]).verifying_key().to_bytes()];
        assert_eq!(
            q.verify(&sig, &other, &[7; 32], 1_000_000),
            Err(FlowQueryError::NotAdmin)
        );
        assert_eq!(
            q.verify(&sig, &admins, &[8; 32], 1_000_000),
            Err(FlowQueryError::WrongRequester)
        );
        for now in [1_000_061, 999_939] {
            assert!(matches!(
                q.verify(&sig, &admins, &[7; 32], now),
                Err(FlowQueryError::Stale { .. })
            ));
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1;
            let Ok((q2, sig2)) = FlowQuery::decode(&b) else {
                continue;
            };
            assert!(
                q2.verify(&sig2, &admins, &[7; 32], 1_000_000).is_err(),
                "bit flip at {i} still verifies"
            );
        }
        // Every truncation is an error, never a panic.
        for n in 0..bytes.len() {
            assert!(FlowQuery::decode(&bytes[..n]).is_err());
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(FlowQuery::decode(&long), Err(FlowQueryError::Trailing(1)));
    }

    #[test]
    fn bounds_are_checked_before_anything_is_allocated() {
        let admin = SigningKey::from_bytes(&[3; 32]);
        for limit in [0, MAX_LIMIT + 1] {
            let mut q = query();
            q.limit = limit;
            assert_eq!(
                FlowQuery::decode(&q.sign(&admin)),
                Err(FlowQueryError::Limit(limit))
            );
        }
        // A `since` after the query was made is refused before anything reads it (a time too
        // large to print).
        let mut q = query();
        q.since = u64::MAX;
        let (q, sig) = FlowQuery::decode(&q.sign(&admin)).unwrap();
        assert!(matches!(
            q.verify(
                &sig,
                &[admin.verifying_key().to_bytes()],
                &[7; 32],
                1_000_000
            ),
            Err(FlowQueryError::Since { .. })
        ));
        let mut bytes = query().sign(&admin);
        // The cursor count field: claim 65,535 cursors.
        let at = 4 + 1 + 32 + 32 + 8 + 8 + 8 + 1 + 2;
        bytes[at..at + 2].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(
            FlowQuery::decode(&bytes),
            Err(FlowQueryError::TooManyCursors)
        );
    }
}
