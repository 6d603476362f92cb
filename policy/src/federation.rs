//! `mesh.io/v1` `Federation`: trust in another cluster's CAs, within a scope. It travels in the
//! signed policy set, so it is signed by a policy admin, versioned, spread and kept exactly as
//! policies are (PROTOCOL.md sections 6 and 7).
//!
//! ```yaml
//! apiVersion: mesh.io/v1
//! kind: Federation
//! metadata:
//!   name: partner.org            # the remote trust domain
//! spec:
//!   bundle: |                    # its CA certificates (two during a rotation)
//!     -----BEGIN MESH CERTIFICATE-----
//!     ...
//!   addresses: [100.65.0.0/16]   # the overlay ranges its identities may hold (required)
//!   namespaces: [microblog]      # the namespaces they may name (default: any)
//!   routes: []                   # the ranges its gateways may serve (default: none)
//! ```

use proto::cert::{CertKind, Certificate};
use proto::trust::Federation;
use proto::Cidr;
use serde::Deserialize;

pub const API_VERSION: &str = "mesh.io/v1";
pub const KIND: &str = "Federation";
/// CA certificates in one federation at most (a rotation needs two).
pub const MAX_CAS: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FederationSpec {
    pub bundle: String,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub routes: Vec<String>,
}

/// What is wrong with a federation: the field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FederationError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> FederationError {
    FederationError {
        field: field.into(),
        message: message.into(),
    }
}

fn cidrs(field: &str, v: &[String]) -> Result<Vec<Cidr>, FederationError> {
    v.iter()
        .enumerate()
        .map(|(i, t)| {
            let c: Cidr = t
                .parse()
                .map_err(|e| err(format!("{field}[{i}]"), format!("`{t}`: {e}")))?;
            if c.to_string() != *t {
                return Err(err(
                    format!("{field}[{i}]"),
                    format!("`{t}` has host bits set (did you mean {c}?)"),
                ));
            }
            Ok(c)
        })
        .collect()
}

/// The federation a document describes: `name` is the remote trust domain. Every CA of the bundle
/// must be a self-signed CA certificate of that trust domain.
pub fn federation(name: &str, spec: &FederationSpec) -> Result<Federation, FederationError> {
    proto::cert::check_trust_domain(name).map_err(|e| err("metadata.name", e.to_string()))?;
    let blocks = proto::armor::decode_all(proto::armor::CERTIFICATE, &spec.bundle)
        .map_err(|e| err("spec.bundle", e.to_string()))?;
    if blocks.is_empty() {
        return Err(err(
            "spec.bundle",
            "no `-----BEGIN MESH CERTIFICATE-----` block: give the remote CA's certificate",
        ));
    }
    if blocks.len() > MAX_CAS {
        return Err(err(
            "spec.bundle",
            format!("more than {MAX_CAS} CA certificates"),
        ));
    }
    let mut cas = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        let at = format!("spec.bundle certificate {}", i + 1);
        let ca = Certificate::decode(b).map_err(|e| err(&at, e.to_string()))?;
        if ca.body.kind != CertKind::Ca {
            return Err(err(&at, "not a CA certificate"));
        }
        if ca.body.trust_domain != name {
            return Err(err(
                &at,
                format!("a CA of trust domain {}, not {name}", ca.body.trust_domain),
            ));
        }
        ca.verify_signature(&ca.body.public_key)
            .map_err(|_| err(&at, "its self-signature does not verify"))?;
        cas.push(ca);
    }
    let addresses = cidrs("spec.addresses", &spec.addresses)?;
    if addresses.is_empty() {
        return Err(err(
            "spec.addresses",
            "a federation needs the overlay ranges its identities may hold",
        ));
    }
    for (i, ns) in spec.namespaces.iter().enumerate() {
        proto::cert::check_name("namespace", ns, 63)
            .map_err(|e| err(format!("spec.namespaces[{i}]"), e.to_string()))?;
    }
    Ok(Federation {
        trust_domain: name.to_string(),
        cas,
        addresses,
        namespaces: spec.namespaces.clone(),
        routes: cidrs("spec.routes", &spec.routes)?,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use proto::cert::CertBody;

    /// A self-signed CA certificate of `td` from key seed `seed`, armored.
    pub(crate) fn ca(td: &str, seed: u8) -> String {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let pk = key.verifying_key().to_bytes();
        let cert = CertBody::ca(td, "ca", pk, 1, (0, u64::MAX / 2), vec![])
            .sign(&key)
            .unwrap();
        proto::armor::encode(proto::armor::CERTIFICATE, &cert.encode())
    }

    fn spec(bundle: String) -> FederationSpec {
        FederationSpec {
            bundle,
            addresses: vec!["100.65.0.0/16".into()],
            namespaces: vec!["microblog".into()],
            routes: vec![],
        }
    }

    #[test]
    fn a_rotation_bundle_gives_two_cas() {
        let f = federation(
            "partner.org",
            &spec(ca("partner.org", 1) + &ca("partner.org", 2)),
        )
        .unwrap();
        assert_eq!(f.cas.len(), 2);
        assert_eq!(f.addresses[0].to_string(), "100.65.0.0/16");
    }

    #[test]
    fn every_mistake_names_its_field() {
        let cases: Vec<(FederationSpec, &str, &str)> = vec![
            (spec(String::new()), "spec.bundle", "BEGIN"),
            (
                spec(ca("example.org", 1)),
                "spec.bundle certificate 1",
                "example.org",
            ),
            (
                FederationSpec {
                    addresses: vec![],
                    ..spec(ca("partner.org", 1))
                },
                "spec.addresses",
                "ranges",
            ),
            (
                FederationSpec {
                    addresses: vec!["100.65.0.1/16".into()],
                    ..spec(ca("partner.org", 1))
                },
                "spec.addresses[0]",
                "host bits",
            ),
            (
                FederationSpec {
                    namespaces: vec!["Bad_NS".into()],
                    ..spec(ca("partner.org", 1))
                },
                "spec.namespaces[0]",
                "a-z",
            ),
        ];
        for (s, field, says) in cases {
            let e = federation("partner.org", &s).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.message.contains(says), "{e}");
        }
        let e = federation("Partner!", &spec(ca("partner.org", 1))).unwrap_err();
        assert_eq!(e.field, "metadata.name");
    }

    #[test]
    fn a_forged_ca_is_refused() {
        let mut text = ca("partner.org", 1);
        // Flip a byte inside the base64 of the certificate (not in the armor lines).
        let line = text.lines().nth(1).unwrap().to_string();
        let flipped: String = line
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i == 20 {
                    if c == 'A' {
                        'B'
                    } else {
                        'A'
                    }
                } else {
                    c
                }
            })
            .collect();
        text = text.replacen(&line, &flipped, 1);
        let e = federation("partner.org", &spec(text)).unwrap_err();
        assert!(e.field.starts_with("spec.bundle"), "{e}");
    }
}
