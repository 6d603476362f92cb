//! 32-byte Curve25519 keys in the encodings WireGuard uses: base64 (what `wg genkey` prints and
//! `wg set` reads) and lowercase hex (what the cross-platform UAPI carries).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use std::fmt;

/// A 32-byte WireGuard key: private, public or preshared.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key is not valid base64: {0}")]
    Base64(String),
    #[error("key is not valid hex: {0}")]
    Hex(String),
    #[error("key must be 32 bytes, got {got}")]
    Length { got: usize },
}

impl Key {
    /// A fresh private key from the OS random source, clamped as RFC 7748 section 5 and
    /// `wg genkey` do, so the two tools' keys are interchangeable byte for byte.
    pub fn generate_private() -> Key {
        let mut bytes = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        Key(clamp(bytes))
    }

    /// The X25519 public key of this private key.
    pub fn public(&self) -> Key {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        Key(*x25519_dalek::PublicKey::from(&secret).as_bytes())
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; 32]
    }

    pub fn from_base64(text: &str) -> Result<Key, KeyError> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|e| KeyError::Base64(e.to_string()))?;
        Self::from_slice(&bytes)
    }

    pub fn from_hex(text: &str) -> Result<Key, KeyError> {
        let bytes = hex::decode(text.trim()).map_err(|e| KeyError::Hex(e.to_string()))?;
        Self::from_slice(&bytes)
    }

    fn from_slice(bytes: &[u8]) -> Result<Key, KeyError> {
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError::Length { got: bytes.len() })?;
        Ok(Key(arr))
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

fn clamp(mut k: [u8; 32]) -> [u8; 32] {
    k[0] &= 248;
    k[31] &= 127;
    k[31] |= 64;
    k
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// Debug never prints key material: a private key must not leak into logs.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({}…)", &self.to_base64()[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 7748 section 6.1: Alice's private and public key.
    #[test]
    fn public_key_matches_rfc7748_vector() {
        let private =
            Key::from_hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap();
        assert_eq!(
            private.public().to_hex(),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    #[test]
    fn generated_keys_are_clamped_and_distinct() {
        let a = Key::generate_private();
        let b = Key::generate_private();
        assert_ne!(a, b);
        for k in [a, b] {
            assert_eq!(k.0[0] & 7, 0);
            assert_eq!(k.0[31] & 0x80, 0);
            assert_eq!(k.0[31] & 0x40, 0x40);
        }
    }

    #[test]
    fn bad_encodings_are_named() {
        assert!(matches!(
            Key::from_base64("not base64!"),
            Err(KeyError::Base64(_))
        ));
        assert_eq!(Key::from_base64("AAAA"), Err(KeyError::Length { got: 3 }));
        assert!(matches!(Key::from_hex("zz"), Err(KeyError::Hex(_))));
        assert_eq!(Key::from_hex("00"), Err(KeyError::Length { got: 1 }));
    }

    #[test]
    fn debug_hides_the_key() {
        let k = Key([7u8; 32]);
        assert!(!format!("{k:?}").contains(&k.to_base64()));
    }

    proptest! {
        #[test]
        fn base64_and_hex_round_trip(bytes in any::<[u8; 32]>()) {
            let k = Key(bytes);
            prop_assert_eq!(Key::from_base64(&k.to_base64()).unwrap(), k);
            prop_assert_eq!(Key::from_hex(&k.to_hex()).unwrap(), k);
            prop_assert_eq!(k.to_base64().len(), 44);
        }
    }
}
