//! Mesh certificates and revocation lists: a versioned, canonical binary encoding signed with
//! Ed25519. The layout is specified in `proto/PROTOCOL.md`; test vectors are in
//! `proto/testdata/`.
//!
//! A certificate binds a public key to a name. A CA certificate binds the CA's Ed25519 key to its
//! trust domain and is self-signed; an identity certificate binds a workload's X25519 (WireGuard)
//! key to `TRUST_DOMAIN/NAMESPACE/NAME`, its labels and its overlay addresses, signed by the CA.
//! A CA certificate may list address ranges: its scope. Its identities' addresses must then lie
//! within them, or they are refused (as a Nebula CA limits its certificates' networks).
//! Decoding accepts exactly one byte string per certificate (sorted, unique labels and addresses,
//! host bits zero, no trailing bytes), so a signature covers the only encoding of its content.

use crate::reader::{Reader, Truncated};
use crate::Cidr;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const CERT_MAGIC: &[u8; 4] = b"MSHC";
pub const CRL_MAGIC: &[u8; 4] = b"MSHR";
pub const VERSION: u8 = 1;
/// Certificate format version that also lists routes (a gateway's grant); a certificate without
/// routes is always encoded as version 1, so each content has one encoding.
pub const VERSION_ROUTES: u8 = 2;
/// Certificate format version that also lists named ports (after the routes, which it always
/// lists, perhaps none); used exactly when the certificate names ports.
pub const VERSION_PORTS: u8 = 3;
/// Named ports in one certificate at most.
pub const MAX_PORTS: usize = 64;
/// No valid certificate is larger: 3 names, 64 labels and 16 addresses at their maximum sizes.
pub const MAX_CERT_BYTES: usize = 32 * 1024;
pub const MAX_LABELS: usize = 64;
pub const MAX_ADDRS: usize = 16;
/// Serials in one revocation list at most: the list crosses the control protocol as one message
/// ([`crate::segment::MAX_MESSAGE_BYTES`]), which holds a little over 8,000.
pub const MAX_REVOKED: usize = 8_000;
/// A revoked key weighs as much as this many serials against [`MAX_REVOKED`] (32 bytes against 8),
/// so that any valid list still crosses the control protocol as one message.
pub const KEY_WEIGHT: usize = 4;
pub const MAX_CRL_BYTES: usize = 64 + 8 * MAX_REVOKED + 4 + 512;
/// Revocation-list format version that also lists revoked public keys.
pub const CRL_VERSION_KEYS: u8 = 2;
const SIGNATURE_LEN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertKind {
    Ca = 1,
    Identity = 2,
}

/// What a certificate says, before it is signed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertBody {
    pub kind: CertKind,
    pub serial: u64,
    /// Validity, in seconds since the Unix epoch, both inclusive.
    pub not_before: u64,
    pub not_after: u64,
    pub trust_domain: String,
    /// Empty for a CA.
    pub namespace: String,
    /// The service account for an identity; the CA's name for a CA.
    pub name: String,
    /// X25519 (identity) or Ed25519 (CA) public key.
    #[serde(serialize_with = "b64")]
    pub public_key: [u8; 32],
    /// Ed25519 public key of the signing CA (the CA's own key for a CA).
    #[serde(serialize_with = "b64")]
    pub issuer: [u8; 32],
    pub labels: BTreeMap<String, String>,
    /// An identity's overlay addresses; for a CA, the ranges its identities may hold (none: any).
    pub addrs: Vec<Cidr>,
    /// Ranges outside the mesh this identity may serve as a gateway (granted only by the CA).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Cidr>,
    /// An identity's named ports, as a Kubernetes container's (`http` = 8080/TCP): rules that
    /// name a port match them. Sorted and unique by (name, protocol).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<NamedPort>,
}

/// A named port of an identity: `NAME=PORT/PROTOCOL`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct NamedPort {
    /// An IANA service name, as Kubernetes requires of a port name: 1–15 of `a-z 0-9 -`, at least
    /// one letter, no `-` at either end or twice in a row.
    pub name: String,
    /// 6 (TCP), 17 (UDP) or 132 (SCTP).
    pub protocol: u8,
    /// 1–65535.
    pub port: u16,
}

impl NamedPort {
    /// Checks a named port as a certificate holds it.
    pub fn validate(&self) -> Result<(), CertError> {
        let n = &self.name;
        let ok = (1..=15).contains(&n.len())
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && n.bytes().any(|b| b.is_ascii_lowercase())
            && !n.starts_with('-')
            && !n.ends_with('-')
            && !n.contains("--");
        if !ok {
            return Err(invalid(
                "port name",
                n,
                "1-15 of a-z 0-9 -, a letter among them, no - at either end or twice",
            ));
        }
        if !matches!(self.protocol, 6 | 17 | 132) {
            return Err(invalid(
                "port protocol",
                &self.protocol.to_string(),
                "must be 6 (TCP), 17 (UDP) or 132 (SCTP)",
            ));
        }
        if self.port == 0 {
            return Err(invalid("port", "0", "must be 1-65535"));
        }
        Ok(())
    }
}

impl std::fmt::Display for NamedPort {
    /// `http=8080/tcp`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.protocol {
            6 => "tcp",
            17 => "udp",
            132 => "sctp",
            _ => "?",
        };
        write!(f, "{}={}/{proto}", self.name, self.port)
    }
}

impl std::str::FromStr for NamedPort {
    type Err = CertError;
    /// `NAME=PORT[/tcp|udp|sctp]` (TCP when left out, as in Kubernetes).
    fn from_str(s: &str) -> Result<NamedPort, CertError> {
        let bad = || invalid("named port", s, "expected NAME=PORT[/tcp|udp|sctp]");
        let (name, rest) = s.split_once('=').ok_or_else(bad)?;
        let (port, proto) = rest.split_once('/').unwrap_or((rest, "tcp"));
        let protocol = match proto.to_ascii_lowercase().as_str() {
            "tcp" => 6,
            "udp" => 17,
            "sctp" => 132,
            _ => return Err(bad()),
        };
        let p = NamedPort {
            name: name.to_string(),
            protocol,
            port: port.parse().map_err(|_| bad())?,
        };
        p.validate()?;
        Ok(p)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    pub body: CertBody,
    pub signature: [u8; 64],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("truncated: {field} needs bytes past offset {offset}")]
    Truncated { field: &'static str, offset: usize },
    #[error("{extra} unexpected bytes after the signature")]
    TrailingBytes { extra: usize },
    #[error("larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("not a mesh {what} (bad magic)")]
    BadMagic { what: &'static str },
    #[error("unsupported version {0} (this build reads versions 1 to 3)")]
    UnsupportedVersion(u8),
    #[error("unknown certificate kind {0}")]
    BadKind(u8),
    #[error("{field} `{value}` is invalid: {reason}")]
    InvalidField {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{field} is not in canonical form: {reason}")]
    NotCanonical {
        field: &'static str,
        reason: &'static str,
    },
    #[error("the signature does not verify")]
    BadSignature,
    #[error("expired at {not_after} (now {now})")]
    Expired { not_after: u64, now: u64 },
    #[error("not valid before {not_before} (now {now})")]
    NotYetValid { not_before: u64, now: u64 },
    #[error("issued by a CA that is not in the trust bundle")]
    UnknownIssuer,
    #[error("serial {serial} is revoked")]
    Revoked { serial: u64 },
    #[error("the public key of serial {serial} is revoked")]
    RevokedKey { serial: u64 },
    #[error("a {kind:?} certificate where a {expected:?} one is needed")]
    WrongKind { kind: CertKind, expected: CertKind },
    #[error("trust domain {trust_domain} is not trusted here (neither this node's nor federated)")]
    UntrustedTrustDomain { trust_domain: String },
    #[error("{field} `{value}` is outside its CA's scope ({scope})")]
    OutOfScope {
        field: &'static str,
        value: String,
        scope: String,
    },
}

fn b64_keys<S: serde::Serializer>(keys: &[[u8; 32]], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(keys.len()))?;
    for k in keys {
        seq.serialize_element(&crate::Key(*k).to_base64())?;
    }
    seq.end()
}

fn b64<S: serde::Serializer>(k: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&crate::Key(*k))
}

impl CertBody {
    /// A CA's body: self-issued by `public_key`, granting addresses in `ranges` (none: any).
    pub fn ca(
        trust_domain: &str,
        name: &str,
        public_key: [u8; 32],
        serial: u64,
        validity: (u64, u64),
        ranges: Vec<Cidr>,
    ) -> CertBody {
        CertBody {
            kind: CertKind::Ca,
            serial,
            not_before: validity.0,
            not_after: validity.1,
            trust_domain: trust_domain.to_string(),
            namespace: String::new(),
            name: name.to_string(),
            public_key,
            issuer: public_key,
            labels: BTreeMap::new(),
            addrs: ranges,
            routes: Vec::new(),
            ports: Vec::new(),
        }
    }

    /// The identity as a SPIFFE ID: `spiffe://TD/ns/NS/sa/NAME`.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.name
        )
    }

    /// `TD/NS/NAME`.
    pub fn identity(&self) -> String {
        format!("{}/{}/{}", self.trust_domain, self.namespace, self.name)
    }

    /// Checks every field against the format's rules (names, sizes, ordering).
    pub fn validate(&self) -> Result<(), CertError> {
        check_trust_domain(&self.trust_domain)?;
        match self.kind {
            CertKind::Ca => {
                if !self.namespace.is_empty() {
                    return Err(invalid(
                        "namespace",
                        &self.namespace,
                        "a CA has no namespace",
                    ));
                }
                check_name("name", &self.name, 253)?;
                if !self.labels.is_empty() {
                    return Err(invalid("labels", "", "a CA has no labels"));
                }
                if self.public_key != self.issuer {
                    return Err(invalid("issuer", "", "a CA certificate is self-signed"));
                }
            }
            CertKind::Identity => {
                check_name("namespace", &self.namespace, 63)?;
                check_name("name", &self.name, 253)?;
            }
        }
        if self.not_after < self.not_before {
            return Err(invalid(
                "not_after",
                &self.not_after.to_string(),
                "before not_before",
            ));
        }
        if self.labels.len() > MAX_LABELS {
            return Err(invalid(
                "labels",
                &self.labels.len().to_string(),
                "more than 64",
            ));
        }
        for (k, v) in &self.labels {
            check_label_key(k)?;
            check_label_value(v)?;
        }
        if self.addrs.len() > MAX_ADDRS {
            return Err(invalid(
                "addrs",
                &self.addrs.len().to_string(),
                "more than 16",
            ));
        }
        if self.routes.len() > MAX_ADDRS {
            return Err(invalid(
                "routes",
                &self.routes.len().to_string(),
                "more than 16",
            ));
        }
        if !self.routes.is_empty() && self.kind == CertKind::Ca {
            return Err(invalid("routes", "", "a CA has no routes"));
        }
        if !self.routes.windows(2).all(|w| w[0] < w[1]) {
            return Err(CertError::NotCanonical {
                field: "routes",
                reason: "not sorted and unique",
            });
        }
        if !self.addrs.windows(2).all(|w| w[0] < w[1]) {
            return Err(CertError::NotCanonical {
                field: "addrs",
                reason: "not sorted and unique",
            });
        }
        if self.ports.len() > MAX_PORTS {
            return Err(invalid(
                "ports",
                &self.ports.len().to_string(),
                "more than 64",
            ));
        }
        if !self.ports.is_empty() && self.kind == CertKind::Ca {
            return Err(invalid("ports", "", "a CA has no ports"));
        }
        for p in &self.ports {
            p.validate()?;
        }
        if !self
            .ports
            .windows(2)
            .all(|w| (&w[0].name, w[0].protocol) < (&w[1].name, w[1].protocol))
        {
            return Err(CertError::NotCanonical {
                field: "ports",
                reason: "not sorted and unique by name and protocol",
            });
        }
        Ok(())
    }

    /// The canonical encoding of the body: what the signature covers.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(256);
        b.extend_from_slice(CERT_MAGIC);
        b.push(self.version());
        b.push(self.kind as u8);
        b.extend_from_slice(&self.serial.to_be_bytes());
        b.extend_from_slice(&self.not_before.to_be_bytes());
        b.extend_from_slice(&self.not_after.to_be_bytes());
        b.extend_from_slice(&self.public_key);
        b.extend_from_slice(&self.issuer);
        for s in [&self.trust_domain, &self.namespace, &self.name] {
            put_str(&mut b, s);
        }
        b.push(self.labels.len() as u8);
        for (k, v) in &self.labels {
            put_str(&mut b, k);
            put_str(&mut b, v);
        }
        put_cidrs(&mut b, &self.addrs);
        if self.version() >= VERSION_ROUTES {
            put_cidrs(&mut b, &self.routes);
        }
        if self.version() == VERSION_PORTS {
            b.push(self.ports.len() as u8);
            for p in &self.ports {
                put_str(&mut b, &p.name);
                b.push(p.protocol);
                b.extend_from_slice(&p.port.to_be_bytes());
            }
        }
        b
    }

    /// The one version that encodes this content: 3 with named ports, else 2 with routes, else 1.
    fn version(&self) -> u8 {
        if !self.ports.is_empty() {
            VERSION_PORTS
        } else if !self.routes.is_empty() {
            VERSION_ROUTES
        } else {
            VERSION
        }
    }

    /// Signs the body with the CA's key. The body must name that key as its issuer.
    pub fn sign(self, ca: &SigningKey) -> Result<Certificate, CertError> {
        self.validate()?;
        if self.issuer != ca.verifying_key().to_bytes() {
            return Err(invalid("issuer", "", "does not match the signing key"));
        }
        let signature = ca.sign(&self.encode()).to_bytes();
        Ok(Certificate {
            body: self,
            signature,
        })
    }
}

impl Certificate {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.body.encode();
        b.extend_from_slice(&self.signature);
        b
    }

    /// Decodes and checks the structure; does not verify the signature (see [`Certificate::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<Certificate, CertError> {
        if bytes.len() > MAX_CERT_BYTES {
            return Err(CertError::TooLarge {
                max: MAX_CERT_BYTES,
            });
        }
        let mut r = Reader::new(bytes, 0);
        if r.take("magic", 4)? != CERT_MAGIC {
            return Err(CertError::BadMagic {
                what: "certificate",
            });
        }
        let version = r.u8("version")?;
        if !matches!(version, VERSION | VERSION_ROUTES | VERSION_PORTS) {
            return Err(CertError::UnsupportedVersion(version));
        }
        let kind = match r.u8("kind")? {
            1 => CertKind::Ca,
            2 => CertKind::Identity,
            k => return Err(CertError::BadKind(k)),
        };
        let serial = r.u64("serial")?;
        let not_before = r.u64("not_before")?;
        let not_after = r.u64("not_after")?;
        let public_key = r.array::<32>("public_key")?;
        let issuer = r.array::<32>("issuer")?;
        let trust_domain = read_str(&mut r, "trust_domain")?;
        let namespace = read_str(&mut r, "namespace")?;
        let name = read_str(&mut r, "name")?;
        let n_labels = r.u8("labels")? as usize;
        let mut labels = BTreeMap::new();
        let mut last: Option<String> = None;
        for _ in 0..n_labels {
            let k = read_str(&mut r, "label key")?;
            let v = read_str(&mut r, "label value")?;
            if last.as_ref().is_some_and(|l| *l >= k) {
                return Err(CertError::NotCanonical {
                    field: "labels",
                    reason: "keys not sorted and unique",
                });
            }
            last = Some(k.clone());
            labels.insert(k, v);
        }
        let addrs = read_cidrs(&mut r, "addrs")?;
        let routes = if version >= VERSION_ROUTES {
            let routes = read_cidrs(&mut r, "routes")?;
            if routes.is_empty() && version == VERSION_ROUTES {
                return Err(CertError::NotCanonical {
                    field: "routes",
                    reason: "version 2 without routes (that is version 1)",
                });
            }
            routes
        } else {
            Vec::new()
        };
        let mut ports = Vec::new();
        if version == VERSION_PORTS {
            let n = r.u8("ports")? as usize;
            if n == 0 {
                return Err(CertError::NotCanonical {
                    field: "ports",
                    reason: "version 3 without ports (that is version 1 or 2)",
                });
            }
            for _ in 0..n {
                let name = read_str(&mut r, "port name")?;
                let protocol = r.u8("port protocol")?;
                let port = u16::from_be_bytes(r.array::<2>("port")?);
                ports.push(NamedPort {
                    name,
                    protocol,
                    port,
                });
            }
        }
        let signature =
            <[u8; 64]>::try_from(r.take("signature", SIGNATURE_LEN)?).expect("64 bytes");
        if r.off != bytes.len() {
            return Err(CertError::TrailingBytes {
                extra: bytes.len() - r.off,
            });
        }
        let body = CertBody {
            kind,
            serial,
            not_before,
            not_after,
            trust_domain,
            namespace,
            name,
            public_key,
            issuer,
            labels,
            addrs,
            routes,
            ports,
        };
        body.validate()?;
        Ok(Certificate { body, signature })
    }

    /// Checks the signature against `issuer` (an Ed25519 public key).
    pub fn verify_signature(&self, issuer: &[u8; 32]) -> Result<(), CertError> {
        let key = VerifyingKey::from_bytes(issuer).map_err(|_| CertError::BadSignature)?;
        key.verify_strict(&self.body.encode(), &Signature::from_bytes(&self.signature))
            .map_err(|_| CertError::BadSignature)
    }

    /// Checks a CA certificate: self-signed and valid at `now`.
    pub fn verify_ca(&self, now: u64) -> Result<(), CertError> {
        if self.body.kind != CertKind::Ca {
            return Err(CertError::WrongKind {
                kind: self.body.kind,
                expected: CertKind::Ca,
            });
        }
        self.verify_signature(&self.body.public_key)?;
        check_time(&self.body, now)
    }

    /// Checks an identity certificate against a trust bundle of CA certificates at time `now`:
    /// issued by a bundle CA of the same trust domain, signature valid, within both validity
    /// periods, and not in `revoked` (a revocation list already verified for that CA).
    pub fn verify_identity(
        &self,
        bundle: &[Certificate],
        now: u64,
        revoked: Option<&RevocationList>,
    ) -> Result<(), CertError> {
        self.check_identity(bundle, now, revoked, Signatures::All)
    }

    /// [`Certificate::verify_identity`] against CA certificates whose self-signatures the caller
    /// checked once already ([`Certificate::verify_ca`]): one signature check instead of two,
    /// for a node that checks many certificates against the same bundle.
    pub fn verify_identity_checked_bundle(
        &self,
        checked: &[Certificate],
        now: u64,
        revoked: Option<&RevocationList>,
    ) -> Result<(), CertError> {
        self.check_identity(checked, now, revoked, Signatures::Identity)
    }

    /// Everything [`Certificate::verify_identity_checked_bundle`] checks but the signature: for a
    /// certificate, byte for byte, whose signature the caller verified before against the same
    /// bundle. Times, the CA's trust domain and the revocation list are checked again.
    pub fn recheck_identity(
        &self,
        checked: &[Certificate],
        now: u64,
        revoked: Option<&RevocationList>,
    ) -> Result<(), CertError> {
        self.check_identity(checked, now, revoked, Signatures::None)
    }

    fn check_identity(
        &self,
        bundle: &[Certificate],
        now: u64,
        revoked: Option<&RevocationList>,
        signatures: Signatures,
    ) -> Result<(), CertError> {
        if self.body.kind != CertKind::Identity {
            return Err(CertError::WrongKind {
                kind: self.body.kind,
                expected: CertKind::Identity,
            });
        }
        let ca = bundle
            .iter()
            .find(|ca| {
                ca.body.kind == CertKind::Ca
                    && ca.body.public_key == self.body.issuer
                    && ca.body.trust_domain == self.body.trust_domain
            })
            .ok_or(CertError::UnknownIssuer)?;
        if signatures == Signatures::All {
            ca.verify_ca(now)?;
        } else {
            check_time(&ca.body, now)?;
        }
        if signatures != Signatures::None {
            self.verify_signature(&ca.body.public_key)?;
        }
        check_time(&self.body, now)?;
        check_ranges(&ca.body, &self.body)?;
        if let Some(crl) = revoked {
            if crl.issuer == ca.body.public_key {
                if crl.revokes_serial(self.body.serial) {
                    return Err(CertError::Revoked {
                        serial: self.body.serial,
                    });
                }
                if crl.revokes_key(&self.body.public_key) {
                    return Err(CertError::RevokedKey {
                        serial: self.body.serial,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Which signatures [`Certificate::check_identity`] verifies.
#[derive(PartialEq, Eq, Clone, Copy)]
enum Signatures {
    All,
    Identity,
    None,
}

/// An identity's addresses against its CA's ranges, if the CA lists any.
pub fn check_ranges(ca: &CertBody, id: &CertBody) -> Result<(), CertError> {
    if ca.addrs.is_empty() {
        return Ok(());
    }
    match id
        .addrs
        .iter()
        .find(|a| !ca.addrs.iter().any(|r| r.covers(a)))
    {
        Some(a) => Err(CertError::OutOfScope {
            field: "address",
            value: a.to_string(),
            scope: format!("CA {} grants {}", ca.name, list(&ca.addrs)),
        }),
        None => Ok(()),
    }
}

/// `a, b, c`.
pub fn list<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_time(body: &CertBody, now: u64) -> Result<(), CertError> {
    if now < body.not_before {
        return Err(CertError::NotYetValid {
            not_before: body.not_before,
            now,
        });
    }
    if now > body.not_after {
        return Err(CertError::Expired {
            not_after: body.not_after,
            now,
        });
    }
    Ok(())
}

/// A CA-signed list of revoked serials and public keys. A higher `number` replaces a lower one. A
/// revoked key stays refused in any certificate, also one issued after the list (a renewal that
/// kept a stolen key).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RevocationList {
    pub trust_domain: String,
    #[serde(serialize_with = "b64")]
    pub issuer: [u8; 32],
    pub number: u64,
    pub issued_at: u64,
    /// Sorted, unique.
    pub serials: Vec<u64>,
    /// Sorted, unique; a list without keys is encoded as version 1, with keys as version 2.
    #[serde(serialize_with = "b64_keys")]
    pub keys: Vec<[u8; 32]>,
    #[serde(skip)]
    pub signature: [u8; 64],
}

impl RevocationList {
    /// Whether the list names `serial` (its lists are sorted).
    pub fn revokes_serial(&self, serial: u64) -> bool {
        self.serials.binary_search(&serial).is_ok()
    }

    /// Whether the list names `key`.
    pub fn revokes_key(&self, key: &[u8; 32]) -> bool {
        self.keys.binary_search(key).is_ok()
    }

    /// Whether the list names the certificate `body`, by serial or by key.
    pub fn revokes(&self, body: &CertBody) -> bool {
        self.revokes_serial(body.serial) || self.revokes_key(&body.public_key)
    }

    fn encode_body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + 8 * self.serials.len());
        b.extend_from_slice(CRL_MAGIC);
        b.push(if self.keys.is_empty() {
            VERSION
        } else {
            CRL_VERSION_KEYS
        });
        b.extend_from_slice(&self.issuer);
        b.extend_from_slice(&self.number.to_be_bytes());
        b.extend_from_slice(&self.issued_at.to_be_bytes());
        put_str(&mut b, &self.trust_domain);
        b.extend_from_slice(&(self.serials.len() as u32).to_be_bytes());
        for s in &self.serials {
            b.extend_from_slice(&s.to_be_bytes());
        }
        if !self.keys.is_empty() {
            b.extend_from_slice(&(self.keys.len() as u32).to_be_bytes());
            for k in &self.keys {
                b.extend_from_slice(k);
            }
        }
        b
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.encode_body();
        b.extend_from_slice(&self.signature);
        b
    }

    /// Builds and signs a list of serials; `serials` are sorted and de-duplicated.
    pub fn sign(
        trust_domain: &str,
        number: u64,
        issued_at: u64,
        serials: Vec<u64>,
        ca: &SigningKey,
    ) -> Result<RevocationList, CertError> {
        RevocationList::sign_with_keys(trust_domain, number, issued_at, serials, vec![], ca)
    }

    /// Builds and signs a list of serials and public keys; both are sorted and de-duplicated.
    pub fn sign_with_keys(
        trust_domain: &str,
        number: u64,
        issued_at: u64,
        mut serials: Vec<u64>,
        mut keys: Vec<[u8; 32]>,
        ca: &SigningKey,
    ) -> Result<RevocationList, CertError> {
        check_trust_domain(trust_domain)?;
        serials.sort_unstable();
        serials.dedup();
        keys.sort_unstable();
        keys.dedup();
        check_revoked_count(serials.len(), keys.len())?;
        let mut crl = RevocationList {
            trust_domain: trust_domain.to_string(),
            issuer: ca.verifying_key().to_bytes(),
            number,
            issued_at,
            serials,
            keys,
            signature: [0; 64],
        };
        crl.signature = ca.sign(&crl.encode_body()).to_bytes();
        Ok(crl)
    }

    pub fn decode(bytes: &[u8]) -> Result<RevocationList, CertError> {
        if bytes.len() > MAX_CRL_BYTES {
            return Err(CertError::TooLarge { max: MAX_CRL_BYTES });
        }
        let mut r = Reader::new(bytes, 0);
        if r.take("magic", 4)? != CRL_MAGIC {
            return Err(CertError::BadMagic {
                what: "revocation list",
            });
        }
        let version = r.u8("version")?;
        if version != VERSION && version != CRL_VERSION_KEYS {
            return Err(CertError::UnsupportedVersion(version));
        }
        let issuer = r.array::<32>("issuer")?;
        let number = r.u64("number")?;
        let issued_at = r.u64("issued_at")?;
        let trust_domain = read_str(&mut r, "trust_domain")?;
        check_trust_domain(&trust_domain)?;
        let count = u32::from_be_bytes(r.take("count", 4)?.try_into().expect("4 bytes")) as usize;
        check_revoked_count(count, 0)?;
        let mut serials = Vec::with_capacity(count);
        for _ in 0..count {
            let s = r.u64("serial")?;
            if serials.last().is_some_and(|l| *l >= s) {
                return Err(CertError::NotCanonical {
                    field: "serials",
                    reason: "not sorted and unique",
                });
            }
            serials.push(s);
        }
        let mut keys: Vec<[u8; 32]> = Vec::new();
        if version == CRL_VERSION_KEYS {
            let n =
                u32::from_be_bytes(r.take("key count", 4)?.try_into().expect("4 bytes")) as usize;
            check_revoked_count(count, n)?;
            if n == 0 {
                return Err(CertError::NotCanonical {
                    field: "keys",
                    reason: "a list without keys is version 1",
                });
            }
            for _ in 0..n {
                let k = r.array::<32>("key")?;
                if keys.last().is_some_and(|l| *l >= k) {
                    return Err(CertError::NotCanonical {
                        field: "keys",
                        reason: "not sorted and unique",
                    });
                }
                keys.push(k);
            }
        }
        let signature =
            <[u8; 64]>::try_from(r.take("signature", SIGNATURE_LEN)?).expect("64 bytes");
        if r.off != bytes.len() {
            return Err(CertError::TrailingBytes {
                extra: bytes.len() - r.off,
            });
        }
        Ok(RevocationList {
            trust_domain,
            issuer,
            number,
            issued_at,
            serials,
            keys,
            signature,
        })
    }

    /// Checks the list was signed by `ca` (a verified CA certificate).
    pub fn verify(&self, ca: &Certificate) -> Result<(), CertError> {
        if self.issuer != ca.body.public_key || self.trust_domain != ca.body.trust_domain {
            return Err(CertError::UnknownIssuer);
        }
        let key = VerifyingKey::from_bytes(&self.issuer).map_err(|_| CertError::BadSignature)?;
        key.verify_strict(&self.encode_body(), &Signature::from_bytes(&self.signature))
            .map_err(|_| CertError::BadSignature)
    }
}

/// Serials plus keys (each weighing [`KEY_WEIGHT`]) within [`MAX_REVOKED`].
fn check_revoked_count(serials: usize, keys: usize) -> Result<(), CertError> {
    let weight = serials.saturating_add(keys.saturating_mul(KEY_WEIGHT));
    if weight > MAX_REVOKED {
        return Err(invalid(
            "serials",
            &format!("{serials} serials and {keys} keys"),
            "more than a revocation list holds (8000 serials, a key counting as 4)",
        ));
    }
    Ok(())
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    // validate() bounds every string to 255 bytes.
    b.push(s.len() as u8);
    b.extend_from_slice(s.as_bytes());
}

fn invalid(field: &'static str, value: &str, reason: &'static str) -> CertError {
    CertError::InvalidField {
        field,
        value: value.to_string(),
        reason,
    }
}

/// SPIFFE trust domain: 1 to 255 of lowercase letters, digits, `.`, `-`, `_`.
pub fn check_trust_domain(s: &str) -> Result<(), CertError> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid("trust_domain", s, "1 to 255 of a-z 0-9 . - _"))
    }
}

/// A Kubernetes-style DNS name: lowercase alphanumerics, `-` and `.`, starting and ending with an
/// alphanumeric, at most `max` bytes.
pub fn check_name(field: &'static str, s: &str, max: usize) -> Result<(), CertError> {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let ok = !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| alnum(b) || b == b'-' || (b == b'.' && max > 63))
        && alnum(s.as_bytes()[0])
        && alnum(s.as_bytes()[s.len() - 1]);
    if ok {
        Ok(())
    } else if max == 63 {
        Err(invalid(
            field,
            s,
            "1 to 63 of a-z 0-9 -, starting and ending with a-z 0-9",
        ))
    } else {
        Err(invalid(
            field,
            s,
            "1 to 253 of a-z 0-9 - ., starting and ending with a-z 0-9",
        ))
    }
}

/// Labels under this prefix are the mesh's own (`mesh.io/trust-domain`): set from the
/// certificate's fields when policy looks at an identity, never carried as labels, so no CA can
/// make an identity look like one of another trust domain.
pub const RESERVED_LABEL_PREFIX: &str = "mesh.io/";

/// A Kubernetes label key: an optional DNS-subdomain prefix and `/`, then a name of 1 to 63
/// alphanumerics, `-`, `_`, `.`, starting and ending with an alphanumeric.
fn check_label_key(k: &str) -> Result<(), CertError> {
    if k.starts_with(RESERVED_LABEL_PREFIX) {
        return Err(invalid(
            "label key",
            k,
            "mesh.io/ labels are set by the mesh, not by certificates",
        ));
    }
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        check_name("label key prefix", p, 253)
            .map_err(|_| invalid("label key", k, "prefix must be a DNS subdomain"))?;
    }
    if !label_text(name, false) {
        return Err(invalid(
            "label key",
            k,
            "name part is 1 to 63 of A-Z a-z 0-9 - _ ., alphanumeric at both ends",
        ));
    }
    Ok(())
}

fn check_label_value(v: &str) -> Result<(), CertError> {
    if label_text(v, true) {
        Ok(())
    } else {
        Err(invalid(
            "label value",
            v,
            "0 to 63 of A-Z a-z 0-9 - _ ., alphanumeric at both ends",
        ))
    }
}

fn label_text(s: &str, may_be_empty: bool) -> bool {
    if s.is_empty() {
        return may_be_empty;
    }
    let b = s.as_bytes();
    s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

impl From<Truncated> for CertError {
    fn from(t: Truncated) -> CertError {
        CertError::Truncated {
            field: t.field,
            offset: t.offset,
        }
    }
}

/// A u8 count, then each prefix as family (4 or 6), length and address bytes.
fn put_cidrs(b: &mut Vec<u8>, cidrs: &[Cidr]) {
    b.push(cidrs.len() as u8);
    for a in cidrs {
        match a.addr() {
            IpAddr::V4(v4) => {
                b.extend_from_slice(&[4, a.prefix_len()]);
                b.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                b.extend_from_slice(&[6, a.prefix_len()]);
                b.extend_from_slice(&v6.octets());
            }
        }
    }
}

/// What [`put_cidrs`] wrote, host bits zero.
fn read_cidrs(r: &mut Reader, field: &'static str) -> Result<Vec<Cidr>, CertError> {
    let n = r.u8(field)? as usize;
    let mut out = Vec::with_capacity(n.min(MAX_ADDRS));
    for _ in 0..n {
        let family = r.u8("address family")?;
        let len = r.u8("prefix length")?;
        let addr: IpAddr = match family {
            4 => {
                Ipv4Addr::from(<[u8; 4]>::try_from(r.take("address", 4)?).expect("4 bytes")).into()
            }
            6 => Ipv6Addr::from(<[u8; 16]>::try_from(r.take("address", 16)?).expect("16 bytes"))
                .into(),
            f => return Err(invalid("address family", &f.to_string(), "must be 4 or 6")),
        };
        let cidr = Cidr::new(addr, len)
            .map_err(|_| invalid("prefix length", &len.to_string(), "too long for the family"))?;
        if cidr.addr() != addr {
            return Err(CertError::NotCanonical {
                field,
                reason: "host bits set",
            });
        }
        out.push(cidr);
    }
    Ok(out)
}

/// A u8-length-prefixed UTF-8 string.
fn read_str(r: &mut Reader, field: &'static str) -> Result<String, CertError> {
    let n = r.u8(field)? as usize;
    let b = r.take(field, n)?;
    String::from_utf8(b.to_vec()).map_err(|_| invalid(field, "", "not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 2026-01-01T00:00:00Z and a year later: the test vectors' validity.
    const T0: u64 = 1_767_225_600;
    const T1: u64 = T0 + 365 * 86400;

    fn ca_key() -> SigningKey {
        SigningKey::from_bytes(&core::array::from_fn(|i| i as u8 + 1))
    }

    fn ca_cert(key: &SigningKey, td: &str) -> Certificate {
        let pk = key.verifying_key().to_bytes();
        CertBody {
            kind: CertKind::Ca,
            serial: 1,
            not_before: T0,
            not_after: T1,
            trust_domain: td.into(),
            namespace: String::new(),
            name: "mesh-ca".into(),
            public_key: pk,
            issuer: pk,
            labels: BTreeMap::new(),
            addrs: vec![],
            routes: vec![],
            ports: vec![],
        }
        .sign(key)
        .unwrap()
    }

    fn identity_body(issuer: &SigningKey) -> CertBody {
        CertBody {
            kind: CertKind::Identity,
            serial: 0x0123_4567_89ab_cdef,
            not_before: T0,
            not_after: T1,
            trust_domain: "example.org".into(),
            namespace: "microblog".into(),
            name: "post".into(),
            public_key: crate::Key([7u8; 32]).public().0,
            issuer: issuer.verifying_key().to_bytes(),
            labels: [("app", "post"), ("svc-post", "access")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            addrs: vec![
                "100.64.0.5/32".parse().unwrap(),
                "fd00::5/128".parse().unwrap(),
            ],
            routes: vec![],
            ports: vec![],
        }
    }

    fn testdata(name: &str) -> String {
        let path = format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn unhex(text: &str) -> Vec<u8> {
        let clean: String = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .flat_map(|l| l.split_whitespace())
            .collect();
        hex::decode(clean).unwrap()
    }

    #[test]
    fn routes_make_version_2_and_only_routes_do() {
        let key = ca_key();
        let plain = identity_body(&key).sign(&key).unwrap();
        assert_eq!(plain.encode()[4], VERSION);
        let mut body = identity_body(&key);
        body.routes = vec![
            "198.19.0.0/24".parse().unwrap(),
            "fd19::/64".parse().unwrap(),
        ];
        let gw = body.sign(&key).unwrap();
        let bytes = gw.encode();
        assert_eq!(bytes[4], VERSION_ROUTES);
        assert_eq!(Certificate::decode(&bytes).unwrap(), gw);
        for n in 0..bytes.len() {
            assert!(
                Certificate::decode(&bytes[..n]).is_err(),
                "accepted at {n} bytes"
            );
        }
        // Version 2 with no routes is a second encoding of a version 1 certificate: refused.
        let mut v2 = plain.body.encode();
        v2[4] = VERSION_ROUTES;
        v2.push(0);
        v2.extend_from_slice(&plain.signature);
        assert!(matches!(
            Certificate::decode(&v2),
            Err(CertError::NotCanonical {
                field: "routes",
                ..
            })
        ));
        // A CA grants routes; it holds none.
        let mut ca = ca_cert(&key, "example.org").body;
        ca.routes = vec!["198.19.0.0/24".parse().unwrap()];
        assert!(ca.sign(&key).is_err());
    }

    fn with_ports(key: &SigningKey) -> CertBody {
        let mut body = identity_body(key);
        body.ports = ["http=8080/tcp", "dns=53/udp", "dns=53/tcp", "metrics=9090"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        body.ports.sort();
        body
    }

    #[test]
    fn named_ports_make_version_3_and_the_vector_matches_byte_for_byte() {
        let key = ca_key();
        let cert = with_ports(&key).sign(&key).unwrap();
        let bytes = cert.encode();
        assert_eq!(bytes[4], VERSION_PORTS);
        let expected = unhex(&testdata("identity-v3.hex"));
        assert_eq!(hex::encode(&bytes), hex::encode(&expected));
        let decoded = Certificate::decode(&expected).unwrap();
        assert_eq!(decoded, cert);
        assert_eq!(
            decoded
                .body
                .ports
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>(),
            [
                "dns=53/tcp",
                "dns=53/udp",
                "http=8080/tcp",
                "metrics=9090/tcp"
            ]
        );
        for n in 0..bytes.len() {
            assert!(
                Certificate::decode(&bytes[..n]).is_err(),
                "accepted at {n} bytes"
            );
        }
        // With routes too, still version 3.
        let mut body = with_ports(&key);
        body.routes = vec!["198.19.0.0/24".parse().unwrap()];
        let gw = body.sign(&key).unwrap();
        assert_eq!(Certificate::decode(&gw.encode()).unwrap(), gw);
        // Version 3 without ports is a second encoding of version 1: refused.
        let plain = identity_body(&key).sign(&key).unwrap();
        let mut v3 = plain.body.encode();
        v3[4] = VERSION_PORTS;
        v3.extend_from_slice(&[0, 0]);
        v3.extend_from_slice(&plain.signature);
        assert!(matches!(
            Certificate::decode(&v3),
            Err(CertError::NotCanonical { field: "ports", .. })
        ));
        // Unsorted or twice the same (name, protocol): refused when signing and decoding.
        let mut body = with_ports(&key);
        body.ports.swap(0, 2);
        assert!(matches!(
            body.sign(&key),
            Err(CertError::NotCanonical { field: "ports", .. })
        ));
        let mut body = with_ports(&key);
        body.ports[1] = body.ports[0].clone();
        assert!(body.sign(&key).is_err());
        // A CA has no ports; names, protocols and port numbers are checked.
        let mut ca = ca_cert(&key, "example.org").body;
        ca.ports = with_ports(&key).ports;
        assert!(ca.sign(&key).is_err());
        for bad in [
            "HTTP=80",
            "-web=80",
            "web-=80",
            "we--b=80",
            "1234=80",
            "averyveryverylongname=80",
            "web=0",
            "web=80/icmp",
            "web",
            "web=x",
        ] {
            assert!(bad.parse::<NamedPort>().is_err(), "{bad}");
        }
        let mut body = with_ports(&key);
        body.ports[0].protocol = 1;
        assert!(body.sign(&key).is_err());
    }

    #[test]
    fn a_certificate_cannot_carry_the_mesh_labels() {
        let mut body = identity_body(&ca_key());
        body.labels
            .insert("mesh.io/trust-domain".into(), "partner.org".into());
        let e = body.sign(&ca_key()).unwrap_err();
        assert!(e.to_string().contains("mesh.io/"), "{e}");
    }

    #[test]
    fn a_ca_with_ranges_grants_only_addresses_inside_them() {
        let key = ca_key();
        let mut ca = ca_cert(&key, "example.org").body;
        ca.addrs = vec![
            "100.64.0.0/24".parse().unwrap(),
            "fd00::/64".parse().unwrap(),
        ];
        let ca = ca.sign(&key).unwrap();
        let inside = identity_body(&key).sign(&key).unwrap();
        assert_eq!(
            inside.verify_identity(std::slice::from_ref(&ca), T0 + 1, None),
            Ok(())
        );
        let mut body = identity_body(&key);
        body.addrs = vec!["100.64.1.5/32".parse().unwrap()];
        let outside = body.sign(&key).unwrap();
        let e = outside.verify_identity(&[ca], T0 + 1, None).unwrap_err();
        assert!(
            matches!(&e, CertError::OutOfScope { field: "address", value, .. } if value == "100.64.1.5/32"),
            "{e}"
        );
    }

    #[test]
    fn identity_vector_matches_byte_for_byte() {
        let ca = ca_key();
        let cert = identity_body(&ca).sign(&ca).unwrap();
        let expected = unhex(&testdata("identity-v1.hex"));
        assert_eq!(hex::encode(cert.encode()), hex::encode(&expected));
        let decoded = Certificate::decode(&expected).unwrap();
        assert_eq!(decoded, cert);
        assert_eq!(
            decoded.body.spiffe_id(),
            "spiffe://example.org/ns/microblog/sa/post"
        );
        decoded
            .verify_identity(&[ca_cert(&ca, "example.org")], T0 + 1, None)
            .unwrap();
    }

    #[test]
    fn ca_and_crl_vectors_match_byte_for_byte() {
        let ca = ca_key();
        let cert = ca_cert(&ca, "example.org");
        assert_eq!(
            hex::encode(cert.encode()),
            hex::encode(unhex(&testdata("ca-v1.hex")))
        );
        cert.verify_ca(T0).unwrap();
        let crl = RevocationList::sign("example.org", 2, T0 + 60, vec![9, 3, 3], &ca).unwrap();
        assert_eq!(crl.serials, vec![3, 9]);
        let bytes = unhex(&testdata("crl-v1.hex"));
        assert_eq!(hex::encode(crl.encode()), hex::encode(&bytes));
        let decoded = RevocationList::decode(&bytes).unwrap();
        decoded.verify(&cert).unwrap();
        assert_eq!(decoded, crl);
    }

    #[test]
    fn a_list_with_keys_matches_its_vector_and_refuses_the_key_in_any_certificate() {
        let ca = ca_key();
        let bundle = [ca_cert(&ca, "example.org")];
        let cert = identity_body(&ca).sign(&ca).unwrap();
        let key = cert.body.public_key;
        let crl =
            RevocationList::sign_with_keys("example.org", 3, T0 + 60, vec![9], vec![key, key], &ca)
                .unwrap();
        assert_eq!(crl.keys, vec![key]);
        let bytes = unhex(&testdata("crl-v2.hex"));
        assert_eq!(hex::encode(crl.encode()), hex::encode(&bytes));
        let decoded = RevocationList::decode(&bytes).unwrap();
        decoded.verify(&bundle[0]).unwrap();
        assert_eq!(decoded, crl);
        // A certificate reissued for the revoked key, with a new serial, is refused too.
        let mut body = identity_body(&ca);
        body.serial = 4242;
        let reissued = body.sign(&ca).unwrap();
        assert_eq!(
            reissued.verify_identity(&bundle, T0 + 61, Some(&crl)),
            Err(CertError::RevokedKey { serial: 4242 })
        );
        // Version 2 with no keys is not canonical (that list is version 1).
        let mut v2_empty = RevocationList::sign("example.org", 3, T0, vec![9], &ca)
            .unwrap()
            .encode_body();
        v2_empty[4] = CRL_VERSION_KEYS;
        v2_empty.extend_from_slice(&0u32.to_be_bytes());
        v2_empty.extend_from_slice(&[0; 64]);
        assert!(matches!(
            RevocationList::decode(&v2_empty),
            Err(CertError::NotCanonical { field: "keys", .. })
        ));
        // Keys count against the bound: 2,000 keys fill a list.
        let many: Vec<[u8; 32]> = (0..2001u32)
            .map(|i| {
                let mut k = [0; 32];
                k[..4].copy_from_slice(&i.to_be_bytes());
                k
            })
            .collect();
        assert!(RevocationList::sign_with_keys(
            "example.org",
            1,
            T0,
            vec![],
            many[..2000].to_vec(),
            &ca
        )
        .is_ok());
        assert!(RevocationList::sign_with_keys("example.org", 1, T0, vec![], many, &ca).is_err());
    }

    #[test]
    fn verification_refuses_what_it_must() {
        let ca = ca_key();
        let bundle = [ca_cert(&ca, "example.org")];
        let cert = identity_body(&ca).sign(&ca).unwrap();
        assert_eq!(
            cert.verify_identity(&bundle, T1 + 1, None),
            Err(CertError::Expired {
                not_after: T1,
                now: T1 + 1
            })
        );
        assert!(matches!(
            cert.verify_identity(&bundle, T0 - 1, None),
            Err(CertError::NotYetValid { .. })
        ));
        let other = SigningKey::from_bytes(&[9u8; 32]);
        assert_eq!(
            cert.verify_identity(&[ca_cert(&other, "example.org")], T0, None),
            Err(CertError::UnknownIssuer)
        );
        assert_eq!(
            cert.verify_identity(&[ca_cert(&ca, "other.org")], T0, None),
            Err(CertError::UnknownIssuer)
        );
        let crl = RevocationList::sign("example.org", 1, T0, vec![cert.body.serial], &ca).unwrap();
        assert_eq!(
            cert.verify_identity(&bundle, T0, Some(&crl)),
            Err(CertError::Revoked {
                serial: cert.body.serial
            })
        );
        let mut forged = cert.clone();
        forged.body.addrs = vec!["100.64.0.6/32".parse().unwrap()];
        assert_eq!(
            forged.verify_identity(&bundle, T0, None),
            Err(CertError::BadSignature)
        );
        let self_made = identity_body(&other);
        assert!(
            self_made.clone().sign(&ca).is_err(),
            "the issuer must be the signing key"
        );
        let crl_by_other = RevocationList::sign("example.org", 1, T0, vec![], &other).unwrap();
        assert_eq!(
            crl_by_other.verify(&bundle[0]),
            Err(CertError::UnknownIssuer)
        );
    }

    #[test]
    fn the_cheaper_checks_skip_only_the_signatures_they_name() {
        let ca = ca_key();
        let good = ca_cert(&ca, "example.org");
        let mut bad_ca = good.clone();
        bad_ca.signature[0] ^= 1;
        let cert = identity_body(&ca).sign(&ca).unwrap();
        let mut forged = cert.clone();
        forged.body.addrs = vec!["100.64.0.6/32".parse().unwrap()];
        // A bundle checked once: a CA whose self-signature is broken is no longer looked at...
        assert_eq!(
            cert.verify_identity(std::slice::from_ref(&bad_ca), T0, None),
            Err(CertError::BadSignature)
        );
        assert_eq!(
            cert.verify_identity_checked_bundle(std::slice::from_ref(&bad_ca), T0, None),
            Ok(())
        );
        // ...but the identity's own signature is.
        let bundle = [good];
        assert_eq!(
            forged.verify_identity_checked_bundle(&bundle, T0, None),
            Err(CertError::BadSignature)
        );
        // A recheck skips the signature and nothing else: times, issuer, revocation.
        assert_eq!(forged.recheck_identity(&bundle, T0, None), Ok(()));
        assert!(matches!(
            cert.recheck_identity(&bundle, T1 + 1, None),
            Err(CertError::Expired { .. })
        ));
        let crl = RevocationList::sign("example.org", 1, T0, vec![cert.body.serial], &ca).unwrap();
        assert!(matches!(
            cert.recheck_identity(&bundle, T0, Some(&crl)),
            Err(CertError::Revoked { .. })
        ));
        assert_eq!(
            cert.recheck_identity(&[ca_cert(&ca, "other.org")], T0, None),
            Err(CertError::UnknownIssuer)
        );
    }

    #[test]
    fn every_truncation_is_rejected() {
        let ca = ca_key();
        let bytes = identity_body(&ca).sign(&ca).unwrap().encode();
        for n in 0..bytes.len() {
            assert!(
                Certificate::decode(&bytes[..n]).is_err(),
                "accepted {n} of {} bytes",
                bytes.len()
            );
        }
        let crl = RevocationList::sign("example.org", 1, T0, vec![1, 2, 3], &ca)
            .unwrap()
            .encode();
        for n in 0..crl.len() {
            assert!(RevocationList::decode(&crl[..n]).is_err());
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            Certificate::decode(&long),
            Err(CertError::TrailingBytes { extra: 1 })
        );
    }

    #[test]
    fn every_single_bit_flip_of_a_signed_certificate_is_rejected() {
        let ca = ca_key();
        let bundle = [ca_cert(&ca, "example.org")];
        let bytes = identity_body(&ca).sign(&ca).unwrap().encode();
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let r = Certificate::decode(&b).and_then(|c| c.verify_identity(&bundle, T0 + 1, None));
            assert!(r.is_err(), "bit {bit} flipped and still accepted");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let ca = ca_key();
        let mut b = identity_body(&ca);
        b.namespace = "Micro_Blog".into();
        assert!(matches!(
            b.clone().sign(&ca),
            Err(CertError::InvalidField {
                field: "namespace",
                ..
            })
        ));
        b.namespace = "microblog".into();
        b.labels.insert("-bad".into(), "x".into());
        assert!(matches!(
            b.clone().sign(&ca),
            Err(CertError::InvalidField {
                field: "label key",
                ..
            })
        ));
        b.labels.remove("-bad");
        b.addrs.reverse();
        assert!(matches!(
            b.sign(&ca),
            Err(CertError::NotCanonical { field: "addrs", .. })
        ));
        assert!(matches!(
            Certificate::decode(b"NOPE"),
            Err(CertError::BadMagic { .. })
        ));
        assert!(Certificate::decode(&vec![0u8; MAX_CERT_BYTES + 1]).is_err());
    }

    fn arb_body() -> impl Strategy<Value = CertBody> {
        let label = ("[a-z][a-z0-9]{0,10}", "[a-zA-Z0-9]{0,12}");
        (
            any::<u64>(),
            0u64..u64::MAX / 2,
            "[a-z0-9]{1,20}",
            "[a-z][a-z0-9-]{0,20}[a-z0-9]",
            proptest::collection::btree_map(label.0, label.1, 0..8),
            proptest::collection::btree_set((any::<u32>(), 0u8..=32), 0..6),
            proptest::collection::btree_set((0u32..1 << 16, 16u8..=24), 0..3),
            proptest::collection::btree_map(
                (
                    "[a-z][a-z0-9]{0,13}",
                    prop_oneof![Just(6u8), Just(17), Just(132)],
                ),
                1u16..,
                0..4,
            ),
        )
            .prop_map(|(serial, nb, ns, name, labels, addrs, routes, ports)| {
                let ca = ca_key();
                let mut addrs: Vec<Cidr> = addrs
                    .into_iter()
                    .map(|(a, l)| Cidr::new(IpAddr::V4(a.into()), l).unwrap())
                    .collect();
                addrs.sort();
                addrs.dedup();
                let mut routes: Vec<Cidr> = routes
                    .into_iter()
                    .map(|(a, l)| Cidr::new(IpAddr::V4((0xc613_0000 | a).into()), l).unwrap())
                    .collect();
                routes.sort();
                routes.dedup();
                let ports = ports
                    .into_iter()
                    .map(|((name, protocol), port)| NamedPort {
                        name,
                        protocol,
                        port,
                    })
                    .collect();
                CertBody {
                    kind: CertKind::Identity,
                    serial,
                    not_before: nb,
                    not_after: nb + 1000,
                    trust_domain: "td.example".into(),
                    namespace: ns,
                    name,
                    public_key: [3; 32],
                    issuer: ca.verifying_key().to_bytes(),
                    labels,
                    addrs,
                    routes,
                    ports,
                }
            })
    }

    proptest! {
        #[test]
        fn round_trips(body in arb_body()) {
            let cert = body.sign(&ca_key()).unwrap();
            let bytes = cert.encode();
            prop_assert!(bytes.len() <= MAX_CERT_BYTES);
            prop_assert_eq!(Certificate::decode(&bytes).unwrap(), cert);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Certificate::decode(&bytes);
            let _ = RevocationList::decode(&bytes);
        }
    }
}
