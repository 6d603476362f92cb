//! A signed policy set: the whole allow-list of a mesh, versioned and signed by a policy-admin key
//! that every node's trust configuration names (PROTOCOL.md section 6). Nodes pass it to one
//! another over the control protocol; each verifies the signature itself and takes only a newer
//! version, so a node can relay a set but never forge or roll one back.
//!
//! ```text
//! "MSHS" | version=1 | serial u64 | issued_at u64 | signer [32] | len u32 | YAML [len] | sig [64]
//! ```
//! The signature (Ed25519, by `signer`) covers every byte before it.

use crate::reader::{Reader, Truncated};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

pub const MAGIC: &[u8; 4] = b"MSHS";
pub const VERSION: u8 = 1;
/// Upper bound on the YAML a set carries (10,000 policies of a few hundred bytes fit).
pub const MAX_DOCUMENTS_BYTES: usize = 8 << 20;
const HEADER_BYTES: usize = 4 + 1 + 8 + 8 + 32 + 4;
const SIGNATURE_BYTES: usize = 64;
pub const MAX_SET_BYTES: usize = HEADER_BYTES + MAX_DOCUMENTS_BYTES + SIGNATURE_BYTES;

/// Armor label of the policy-admin signing key and of its public half.
pub const ADMIN_PRIVATE_KEY: &str = "MESH POLICY ADMIN KEY";
pub const ADMIN_PUBLIC_KEY: &str = "MESH POLICY ADMIN PUBLIC KEY";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPolicySet {
    /// Monotonic: a node takes a set only if its serial is above the one it runs.
    pub serial: u64,
    /// Seconds since the Unix epoch, when the set was signed.
    pub issued_at: u64,
    /// The policy-admin public key (Ed25519) that signed.
    pub signer: [u8; 32],
    /// The policies and namespaces, as a YAML stream.
    pub documents: String,
    pub signature: [u8; 64],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicySetError {
    #[error("policy set truncated at byte {offset} (reading {field})")]
    Truncated { field: &'static str, offset: usize },
    #[error("policy set larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("not a policy set (magic {0:?})")]
    BadMagic([u8; 4]),
    #[error("policy set format version {0} is not supported (this build reads version 1)")]
    UnsupportedVersion(u8),
    #[error("{0} trailing bytes after the signature")]
    Trailing(usize),
    #[error("the documents are not UTF-8")]
    NotUtf8,
    #[error("signed by {signer}, which is not a policy-admin key this node trusts")]
    UnknownSigner { signer: String },
    #[error("the signature does not verify")]
    BadSignature,
}

impl From<Truncated> for PolicySetError {
    fn from(t: Truncated) -> Self {
        PolicySetError::Truncated {
            field: t.field,
            offset: t.offset,
        }
    }
}

fn body(serial: u64, issued_at: u64, signer: &[u8; 32], documents: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_BYTES + documents.len() + SIGNATURE_BYTES);
    b.extend_from_slice(MAGIC);
    b.push(VERSION);
    b.extend_from_slice(&serial.to_be_bytes());
    b.extend_from_slice(&issued_at.to_be_bytes());
    b.extend_from_slice(signer);
    b.extend_from_slice(&(documents.len() as u32).to_be_bytes());
    b.extend_from_slice(documents.as_bytes());
    b
}

impl SignedPolicySet {
    pub fn sign(
        serial: u64,
        issued_at: u64,
        documents: String,
        key: &SigningKey,
    ) -> Result<SignedPolicySet, PolicySetError> {
        if documents.len() > MAX_DOCUMENTS_BYTES {
            return Err(PolicySetError::TooLarge {
                max: MAX_DOCUMENTS_BYTES,
            });
        }
        let signer = key.verifying_key().to_bytes();
        let signature = key
            .sign(&body(serial, issued_at, &signer, &documents))
            .to_bytes();
        Ok(SignedPolicySet {
            serial,
            issued_at,
            signer,
            documents,
            signature,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = body(self.serial, self.issued_at, &self.signer, &self.documents);
        b.extend_from_slice(&self.signature);
        b
    }

    /// Decodes and checks the structure; [`SignedPolicySet::verify`] checks who signed.
    pub fn decode(bytes: &[u8]) -> Result<SignedPolicySet, PolicySetError> {
        if bytes.len() > MAX_SET_BYTES {
            return Err(PolicySetError::TooLarge { max: MAX_SET_BYTES });
        }
        let mut r = Reader::new(bytes, 0);
        let magic: [u8; 4] = r.array("magic")?;
        if &magic != MAGIC {
            return Err(PolicySetError::BadMagic(magic));
        }
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(PolicySetError::UnsupportedVersion(version));
        }
        let serial = r.u64("serial")?;
        let issued_at = r.u64("issued_at")?;
        let signer = r.array("signer")?;
        let len = u32::from_be_bytes(r.array("length")?) as usize;
        if len > MAX_DOCUMENTS_BYTES {
            return Err(PolicySetError::TooLarge {
                max: MAX_DOCUMENTS_BYTES,
            });
        }
        let documents = std::str::from_utf8(r.take("documents", len)?)
            .map_err(|_| PolicySetError::NotUtf8)?
            .to_string();
        let signature = r.array("signature")?;
        if r.remaining() != 0 {
            return Err(PolicySetError::Trailing(r.remaining()));
        }
        Ok(SignedPolicySet {
            serial,
            issued_at,
            signer,
            documents,
            signature,
        })
    }

    /// Checks that one of `admins` (Ed25519 public keys) signed this set.
    pub fn verify(&self, admins: &[[u8; 32]]) -> Result<(), PolicySetError> {
        if !admins.contains(&self.signer) {
            return Err(PolicySetError::UnknownSigner {
                signer: crate::Key(self.signer).to_base64(),
            });
        }
        let key =
            VerifyingKey::from_bytes(&self.signer).map_err(|_| PolicySetError::BadSignature)?;
        let msg = body(self.serial, self.issued_at, &self.signer, &self.documents);
        key.verify(&msg, &Signature::from_bytes(&self.signature))
            .map_err(|_| PolicySetError::BadSignature)
    }

    /// A short digest for status displays and change detection: BLAKE2s-256 of the encoding.
    pub fn digest(&self) -> [u8; 32] {
        digest_of(&self.encode())
    }
}

/// The digest of an encoded set (BLAKE2s-256 of its bytes), as offers name it (section 6), so a
/// receiver can check transferred bytes before it decodes anything.
pub fn digest_of(encoded: &[u8]) -> [u8; 32] {
    use blake2::Digest;
    blake2::Blake2s256::digest(encoded).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn round_trips_and_verifies_only_for_its_admin() {
        let set =
            SignedPolicySet::sign(7, 1_800_000_000, "kind: Namespace\n".into(), &key(1)).unwrap();
        let back = SignedPolicySet::decode(&set.encode()).unwrap();
        assert_eq!(back, set);
        let admin = key(1).verifying_key().to_bytes();
        back.verify(&[admin]).unwrap();
        let other = key(2).verifying_key().to_bytes();
        assert!(matches!(
            back.verify(&[other]),
            Err(PolicySetError::UnknownSigner { .. })
        ));
        assert!(matches!(
            back.verify(&[]),
            Err(PolicySetError::UnknownSigner { .. })
        ));
    }

    #[test]
    fn a_changed_serial_or_document_breaks_the_signature() {
        let admin = key(1).verifying_key().to_bytes();
        let set = SignedPolicySet::sign(7, 1, "a: 1\n".into(), &key(1)).unwrap();
        let mut newer = set.clone();
        newer.serial = 8;
        assert_eq!(newer.verify(&[admin]), Err(PolicySetError::BadSignature));
        let mut edited = set.clone();
        edited.documents = "a: 2\n".into();
        assert_eq!(edited.verify(&[admin]), Err(PolicySetError::BadSignature));
        // A signer field swapped to a trusted key does not make another key's signature valid.
        let forged = SignedPolicySet::sign(9, 1, "a: 1\n".into(), &key(3)).unwrap();
        let mut relabelled = forged;
        relabelled.signer = admin;
        assert_eq!(
            relabelled.verify(&[admin]),
            Err(PolicySetError::BadSignature)
        );
    }

    #[test]
    fn names_what_is_wrong() {
        let set = SignedPolicySet::sign(1, 1, "x".into(), &key(1))
            .unwrap()
            .encode();
        assert!(matches!(
            SignedPolicySet::decode(&set[..set.len() - 1]),
            Err(PolicySetError::Truncated {
                field: "signature",
                ..
            })
        ));
        let mut extra = set.clone();
        extra.push(0);
        assert_eq!(
            SignedPolicySet::decode(&extra),
            Err(PolicySetError::Trailing(1))
        );
        let mut v2 = set.clone();
        v2[4] = 2;
        assert_eq!(
            SignedPolicySet::decode(&v2),
            Err(PolicySetError::UnsupportedVersion(2))
        );
        assert!(matches!(
            SignedPolicySet::decode(b"MSHCxxxx"),
            Err(PolicySetError::BadMagic(_))
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = SignedPolicySet::decode(&bytes);
        }

        #[test]
        fn flipping_any_bit_is_detected(pos in 0usize..200, bit in 0u8..8) {
            let admin = key(1).verifying_key().to_bytes();
            let enc = SignedPolicySet::sign(3, 4, "kind: Namespace\nmetadata: {name: a}\n".into(), &key(1)).unwrap().encode();
            let mut b = enc.clone();
            let pos = pos % b.len();
            b[pos] ^= 1 << bit;
            let ok = SignedPolicySet::decode(&b).map(|s| s.verify(&[admin]).is_ok()).unwrap_or(false);
            prop_assert!(!ok);
        }
    }
}
