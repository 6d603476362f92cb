//! Joining the mesh (PROTOCOL.md §12): a node that has no certificate yet makes its own key pair
//! and asks the online issuer for a node certificate binding that key, sealed with the key
//! itself, so the private key never leaves the node. It proves it was invited with a single-use
//! join token that the CA made (`meshctl ca token create`); the token also carries the issuer's
//! public key, so the node knows the answer (and the CA certificate in it) is the issuer's.
//!
//! Pure: the token's text form and the decision whether a token may be redeemed by a key.

use crate::cert::{CertBody, CertKind, NamedPort};
use crate::Cidr;
use blake2::digest::Mac;
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// What every token's text starts with (and the version of its form).
pub const TOKEN_PREFIX: &str = "meshjoin1.";

/// A join token as the operator hands it to a node: the secret, and whom to ask.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub secret: [u8; 32],
    /// The issuer's public key: answers are sealed with it.
    pub issuer_key: [u8; 32],
    /// Where the issuer listens, if the CA knew it when it made the token.
    pub endpoint: Option<SocketAddr>,
}

/// The secret never shows in logs or panics.
impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("id", &token_id(&self.secret))
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// `meshjoin1.` then base64url of the secret, the issuer key and the endpoint's text.
    pub fn encode(&self) -> String {
        use base64::Engine;
        let mut b = Vec::with_capacity(64 + 48);
        b.extend_from_slice(&self.secret);
        b.extend_from_slice(&self.issuer_key);
        if let Some(e) = self.endpoint {
            b.extend_from_slice(e.to_string().as_bytes());
        }
        format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        )
    }

    pub fn parse(text: &str) -> Result<Token, String> {
        use base64::Engine;
        let body = text.trim().strip_prefix(TOKEN_PREFIX).ok_or_else(|| {
            format!("not a join token (it starts with {TOKEN_PREFIX}; see meshctl ca token create)")
        })?;
        if body.len() > 200 {
            return Err("the join token is too long".into());
        }
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| "the join token is damaged (not base64url)".to_string())?;
        if b.len() < 64 {
            return Err("the join token is cut short".into());
        }
        let endpoint = match &b[64..] {
            [] => None,
            e => Some(
                std::str::from_utf8(e)
                    .ok()
                    .and_then(|e| e.parse().ok())
                    .ok_or("the join token's issuer address is damaged")?,
            ),
        };
        Ok(Token {
            secret: b[..32].try_into().expect("32 bytes"),
            issuer_key: b[32..64].try_into().expect("32 bytes"),
            endpoint,
        })
    }
}

fn keyed(domain: &[u8], secret: &[u8; 32]) -> [u8; 32] {
    let mut mac =
        <blake2::Blake2sMac256 as Mac>::new_from_slice(secret).expect("a 32-byte key fits");
    mac.update(domain);
    mac.finalize().into_bytes().into()
}

/// The name the CA files a token under: it tells nothing of the secret.
pub fn token_id(secret: &[u8; 32]) -> String {
    hex::encode(&keyed(b"meshd join token id", secret)[..16])
}

/// What the CA keeps to check a secret with: the secret itself is never stored.
pub fn verifier(secret: &[u8; 32]) -> [u8; 32] {
    keyed(b"meshd join token verifier", secret)
}

/// What a token invites: the node certificate it will be redeemed for, but for the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invitation {
    pub verifier: [u8; 32],
    /// The token is good until then (seconds since the Unix epoch).
    pub expires: u64,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub addrs: Vec<Cidr>,
    pub routes: Vec<Cidr>,
    pub ports: Vec<NamedPort>,
    /// How long the node certificate lives.
    pub lifetime_secs: u64,
    /// The key that redeemed it, once one has.
    pub redeemed_by: Option<[u8; 32]>,
}

/// Why a token is not honoured. A requester learns no more than "not a token of ours" unless it
/// holds the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefusal {
    #[error("unknown join token")]
    Unknown,
    #[error("the join token expired")]
    Expired,
    #[error("the join token was used already, by another key")]
    Used,
}

/// Whether `sender` (the key that sealed the request, so its holder's) may redeem `invitation`
/// with `secret` at `now`. A token is single-use: once redeemed, only the same key may redeem it
/// again (its answer may have been lost), and only until the token expires.
pub fn redeem(
    invitation: &Invitation,
    secret: &[u8; 32],
    sender: &[u8; 32],
    now: u64,
) -> Result<(), JoinRefusal> {
    let v = verifier(secret);
    // Compared in constant time: the time taken says nothing of how much of it matched.
    let diff = v
        .iter()
        .zip(invitation.verifier.iter())
        .fold(0u8, |d, (a, b)| d | (a ^ b));
    if diff != 0 {
        return Err(JoinRefusal::Unknown);
    }
    if now > invitation.expires {
        return Err(JoinRefusal::Expired);
    }
    match invitation.redeemed_by {
        Some(k) if k != *sender => Err(JoinRefusal::Used),
        _ => Ok(()),
    }
}

/// How far before `now` a node certificate from a join starts: a node whose clock is a little
/// behind the issuer's still takes it.
pub const CLOCK_SKEW_SECS: u64 = 120;

/// The node certificate a redeemed invitation makes, for `public_key`, signed by `issuer`
/// (the CA), living from `now` (less [`CLOCK_SKEW_SECS`]), never past `ca_not_after`.
pub fn node_body(
    invitation: &Invitation,
    trust_domain: &str,
    public_key: [u8; 32],
    issuer: [u8; 32],
    serial: u64,
    now: u64,
    ca_not_after: u64,
) -> CertBody {
    CertBody {
        kind: CertKind::Identity,
        serial,
        not_before: now.saturating_sub(CLOCK_SKEW_SECS),
        not_after: now
            .saturating_add(invitation.lifetime_secs)
            .min(ca_not_after),
        trust_domain: trust_domain.to_string(),
        namespace: invitation.namespace.clone(),
        name: invitation.name.clone(),
        public_key,
        issuer,
        labels: invitation.labels.clone(),
        addrs: invitation.addrs.clone(),
        routes: invitation.routes.clone(),
        ports: invitation.ports.clone(),
    }
}

#[cfg(test)]
#[path = "join/tests.rs"]
mod tests;
