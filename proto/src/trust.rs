//! Who a node trusts, and for what (PROTOCOL.md section 7). Pure.
//!
//! A node trusts the CAs of its own trust domain (the one of its own certificate) from its trust
//! bundle; a CA that lists address ranges grants only those ([`crate::cert::check_ranges`]). It
//! trusts another cluster's CAs only through a [`Federation`]: a trust domain, its CAs, and the
//! scope within which they may vouch: overlay addresses, optionally namespaces, and the routes
//! their gateways may serve. A certificate outside its CA's scope is refused, with
//! [`CertError::OutOfScope`] naming the field.
//!
//! A federated identity never holds an address of a local CA's ranges, whatever its federation
//! says: another cluster cannot take the addresses this one grants.

use crate::cert::{list, CertError, CertKind, Certificate, RevocationList};
use crate::Cidr;
use std::collections::BTreeMap;

/// The label policy selectors use for an identity's trust domain. Set from the certificate's
/// trust domain, never from its labels ([`crate::cert::RESERVED_LABEL_PREFIX`]).
pub const TRUST_DOMAIN_LABEL: &str = "mesh.io/trust-domain";

/// Another cluster's CAs, trusted within a scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Federation {
    pub trust_domain: String,
    /// Its CA certificates (two during a rotation).
    pub cas: Vec<Certificate>,
    /// Overlay ranges its identities' addresses must lie in.
    pub addresses: Vec<Cidr>,
    /// Namespaces its identities may name; empty: any.
    pub namespaces: Vec<String>,
    /// Ranges its gateways may serve.
    pub routes: Vec<Cidr>,
}

/// Whether a certificate's signature is verified, or was verified before (the same bytes,
/// against the same CAs): see [`Certificate::recheck_identity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signature {
    Verify,
    Known,
}

/// The CAs a node trusts and their scopes. CA self-signatures are checked when they are taken,
/// once, not with every certificate.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    local: String,
    local_cas: Vec<Certificate>,
    /// The ranges the local CAs list: no federated identity holds any of these.
    local_ranges: Vec<Cidr>,
    federations: BTreeMap<String, Federation>,
}

impl Trust {
    /// Trust in the CAs of `bundle` that are of trust domain `local` and self-signed; the others
    /// are returned with the reason they were left out.
    pub fn new(local: &str, bundle: Vec<Certificate>) -> (Trust, Vec<(String, String)>) {
        let mut left_out = Vec::new();
        let mut local_cas = Vec::new();
        for ca in bundle {
            match check_ca(&ca) {
                Err(why) => left_out.push((ca.body.identity(), why)),
                Ok(()) if ca.body.trust_domain != local => left_out.push((
                    ca.body.identity(),
                    format!(
                        "of trust domain {}, not this node's {local}: another cluster's CA is \
                         trusted through a federation, within a scope",
                        ca.body.trust_domain
                    ),
                )),
                Ok(()) => local_cas.push(ca),
            }
        }
        let local_ranges = local_cas
            .iter()
            .flat_map(|c| c.body.addrs.iter().copied())
            .collect();
        let trust = Trust {
            local: local.to_string(),
            local_cas,
            local_ranges,
            federations: BTreeMap::new(),
        };
        (trust, left_out)
    }

    /// Replaces the federations; returns those left out (or CAs left out of one), with why.
    pub fn federate(&mut self, federations: Vec<Federation>) -> Vec<(String, String)> {
        let mut left_out = Vec::new();
        self.federations.clear();
        for mut f in federations {
            if f.trust_domain == self.local {
                left_out.push((
                    f.trust_domain.clone(),
                    "is this node's own trust domain".to_string(),
                ));
                continue;
            }
            f.cas.retain(|ca| match check_ca(ca) {
                Ok(()) if ca.body.trust_domain == f.trust_domain => true,
                Ok(()) => {
                    left_out.push((
                        ca.body.identity(),
                        format!("is not of trust domain {}", f.trust_domain),
                    ));
                    false
                }
                Err(why) => {
                    left_out.push((ca.body.identity(), why));
                    false
                }
            });
            self.federations.insert(f.trust_domain.clone(), f);
        }
        left_out
    }

    /// The address ranges the local CAs list (none: they grant any address).
    pub fn local_ranges(&self) -> &[Cidr] {
        &self.local_ranges
    }

    /// This node's trust domain.
    pub fn local(&self) -> &str {
        &self.local
    }

    pub fn is_local(&self, trust_domain: &str) -> bool {
        trust_domain == self.local
    }

    /// Every trusted CA: the local ones, then each federation's.
    pub fn cas(&self) -> impl Iterator<Item = &Certificate> {
        self.local_cas
            .iter()
            .chain(self.federations.values().flat_map(|f| f.cas.iter()))
    }

    /// The trusted CA with this key.
    pub fn ca(&self, key: &[u8; 32]) -> Option<&Certificate> {
        self.cas().find(|c| c.body.public_key == *key)
    }

    pub fn federation(&self, trust_domain: &str) -> Option<&Federation> {
        self.federations.get(trust_domain)
    }

    pub fn federations(&self) -> impl Iterator<Item = &Federation> {
        self.federations.values()
    }

    /// Checks an identity certificate at `now` (seconds): issued by a CA trusted for its trust
    /// domain, within both validity periods, not in `revoked`, and within its CA's scope.
    pub fn check(
        &self,
        cert: &Certificate,
        now: u64,
        revoked: Option<&RevocationList>,
        signature: Signature,
    ) -> Result<(), CertError> {
        let td = &cert.body.trust_domain;
        let cas: &[Certificate] = if *td == self.local {
            &self.local_cas
        } else {
            match self.federations.get(td) {
                Some(f) => &f.cas,
                None => {
                    return Err(CertError::UntrustedTrustDomain {
                        trust_domain: td.clone(),
                    })
                }
            }
        };
        match signature {
            Signature::Verify => cert.verify_identity_checked_bundle(cas, now, revoked)?,
            Signature::Known => cert.recheck_identity(cas, now, revoked)?,
        }
        if let Some(f) = self.federations.get(td) {
            check_scope(f, &self.local_ranges, cert)?;
        }
        Ok(())
    }
}

fn check_ca(ca: &Certificate) -> Result<(), String> {
    if ca.body.kind != CertKind::Ca {
        return Err("not a CA certificate".into());
    }
    ca.verify_signature(&ca.body.public_key)
        .map_err(|_| "its self-signature does not verify".to_string())
}

/// A federated identity against its federation's scope and the local CAs' ranges.
pub fn check_scope(
    f: &Federation,
    local_ranges: &[Cidr],
    cert: &Certificate,
) -> Result<(), CertError> {
    let body = &cert.body;
    let out = |field, value: String, scope: String| CertError::OutOfScope {
        field,
        value,
        scope,
    };
    if !f.namespaces.is_empty() && !f.namespaces.contains(&body.namespace) {
        return Err(out(
            "namespace",
            body.namespace.clone(),
            format!(
                "federation {} allows namespaces {}",
                f.trust_domain,
                list(&f.namespaces)
            ),
        ));
    }
    for a in &body.addrs {
        if !f.addresses.iter().any(|r| r.covers(a)) {
            return Err(out(
                "address",
                a.to_string(),
                format!(
                    "federation {} allows {}",
                    f.trust_domain,
                    list(&f.addresses)
                ),
            ));
        }
        if let Some(r) = local_ranges.iter().find(|r| r.overlaps(a)) {
            return Err(out(
                "address",
                a.to_string(),
                format!("{r} is granted by this trust domain's own CA"),
            ));
        }
    }
    if let Some((r, l)) = body
        .routes
        .iter()
        .find_map(|r| local_ranges.iter().find(|l| l.overlaps(r)).map(|l| (r, l)))
    {
        return Err(out(
            "route",
            r.to_string(),
            format!("{l} is granted by this trust domain's own CA"),
        ));
    }
    if let Some(r) = body
        .routes
        .iter()
        .find(|r| !f.routes.iter().any(|g| g.covers(r)))
    {
        return Err(out(
            "route",
            r.to_string(),
            format!(
                "federation {} allows routes {}",
                f.trust_domain,
                if f.routes.is_empty() {
                    "none".to_string()
                } else {
                    list(&f.routes)
                }
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::CertBody;
    use ed25519_dalek::SigningKey;
    use proptest::prelude::*;

    const NOW: u64 = 1_800_000_000;

    fn ca(seed: u8, td: &str, ranges: &[&str]) -> (SigningKey, Certificate) {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
        let body = CertBody::ca(
            td,
            &format!("{td}-ca"),
            key.verifying_key().to_bytes(),
            1,
            (NOW - 10, NOW + 1000),
            ranges,
        );
        let cert = body.sign(&key).unwrap();
        (key, cert)
    }

    fn id(ca: &SigningKey, td: &str, ns: &str, addrs: &[&str]) -> Certificate {
        let mut addrs: Vec<Cidr> = addrs.iter().map(|r| r.parse().unwrap()).collect();
        addrs.sort();
        CertBody {
            kind: CertKind::Identity,
            serial: 7,
            not_before: NOW - 10,
            not_after: NOW + 100,
            trust_domain: td.into(),
            namespace: ns.into(),
            name: "api".into(),
            public_key: [9; 32],
            issuer: ca.verifying_key().to_bytes(),
            labels: Default::default(),
            addrs,
            routes: vec![],
            ports: vec![],
        }
        .sign(ca)
        .unwrap()
    }

    fn partner(cas: Vec<Certificate>) -> Federation {
        Federation {
            trust_domain: "partner.org".into(),
            cas,
            addresses: vec!["100.65.0.0/16".parse().unwrap()],
            namespaces: vec!["microblog".into()],
            routes: vec![],
        }
    }

    fn two_clusters() -> (Trust, SigningKey, SigningKey) {
        let (a_key, a_ca) = ca(1, "example.org", &["100.64.0.0/16"]);
        let (b_key, b_ca) = ca(2, "partner.org", &[]);
        let (mut trust, left) = Trust::new("example.org", vec![a_ca]);
        assert!(left.is_empty());
        assert!(trust.federate(vec![partner(vec![b_ca])]).is_empty());
        (trust, a_key, b_key)
    }

    fn refused_field(r: Result<(), CertError>) -> &'static str {
        match r {
            Err(CertError::OutOfScope { field, .. }) => field,
            other => panic!("expected an out-of-scope refusal, got {other:?}"),
        }
    }

    #[test]
    fn another_domains_ca_in_the_bundle_is_left_out() {
        let (_, a) = ca(1, "example.org", &[]);
        let (b_key, b) = ca(2, "partner.org", &[]);
        let (trust, left) = Trust::new("example.org", vec![a, b]);
        assert_eq!(left.len(), 1);
        assert!(left[0].1.contains("federation"), "{left:?}");
        let cert = id(&b_key, "partner.org", "demo", &["100.64.0.2/32"]);
        assert_eq!(
            trust.check(&cert, NOW, None, Signature::Verify),
            Err(CertError::UntrustedTrustDomain {
                trust_domain: "partner.org".into()
            })
        );
    }

    #[test]
    fn a_federated_identity_within_its_scope_is_trusted() {
        let (trust, _, b) = two_clusters();
        let cert = id(&b, "partner.org", "microblog", &["100.65.0.9/32"]);
        assert_eq!(trust.check(&cert, NOW, None, Signature::Verify), Ok(()));
    }

    #[test]
    fn a_federated_ca_cannot_vouch_for_the_local_trust_domain() {
        let (trust, _, b) = two_clusters();
        let cert = id(&b, "example.org", "microblog", &["100.65.0.9/32"]);
        assert_eq!(
            trust.check(&cert, NOW, None, Signature::Verify),
            Err(CertError::UnknownIssuer)
        );
    }

    #[test]
    fn out_of_scope_namespace_and_address_are_refused() {
        let (trust, _, b) = two_clusters();
        let ns = id(&b, "partner.org", "kube-system", &["100.65.0.9/32"]);
        assert_eq!(
            refused_field(trust.check(&ns, NOW, None, Signature::Verify)),
            "namespace"
        );
        let addr = id(&b, "partner.org", "microblog", &["100.64.0.2/32"]);
        assert_eq!(
            refused_field(trust.check(&addr, NOW, None, Signature::Verify)),
            "address"
        );
        let wide = id(&b, "partner.org", "microblog", &["100.65.0.0/15"]);
        assert_eq!(
            refused_field(trust.check(&wide, NOW, None, Signature::Verify)),
            "address"
        );
        // A route the federation does not allow (it allows none).
        let mut gw = id(&b, "partner.org", "microblog", &["100.65.0.9/32"]).body;
        gw.routes = vec!["198.19.0.0/24".parse().unwrap()];
        let gw = gw.sign(&b).unwrap();
        assert_eq!(
            refused_field(trust.check(&gw, NOW, None, Signature::Verify)),
            "route"
        );
    }

    #[test]
    fn a_federation_cannot_grant_the_local_cas_ranges() {
        let (a_key, a_ca) = ca(1, "example.org", &["100.64.0.0/16"]);
        let (b_key, b_ca) = ca(2, "partner.org", &[]);
        let (mut trust, _) = Trust::new("example.org", vec![a_ca]);
        let mut f = partner(vec![b_ca]);
        f.addresses = vec!["100.64.0.0/10".parse().unwrap()];
        trust.federate(vec![f]);
        let cert = id(&b_key, "partner.org", "microblog", &["100.64.0.2/32"]);
        assert_eq!(
            refused_field(trust.check(&cert, NOW, None, Signature::Verify)),
            "address"
        );
        // Outside the local ranges, the federation's scope decides.
        let cert = id(&b_key, "partner.org", "microblog", &["100.66.0.2/32"]);
        assert_eq!(trust.check(&cert, NOW, None, Signature::Verify), Ok(()));
        // Nor a route inside them, whatever the federation's routes allow.
        trust.federations.get_mut("partner.org").unwrap().routes =
            vec!["100.64.0.0/10".parse().unwrap()];
        let mut gw = id(&b_key, "partner.org", "microblog", &["100.66.0.2/32"]).body;
        gw.routes = vec!["100.64.5.0/24".parse().unwrap()];
        let gw = gw.sign(&b_key).unwrap();
        assert_eq!(
            refused_field(trust.check(&gw, NOW, None, Signature::Verify)),
            "route"
        );
        // The local CA's own ranges hold for local identities too.
        let local = id(&a_key, "example.org", "demo", &["100.66.0.2/32"]);
        assert_eq!(
            refused_field(trust.check(&local, NOW, None, Signature::Verify)),
            "address"
        );
    }

    #[test]
    fn removing_a_federation_untrusts_its_identities() {
        let (mut trust, _, b) = two_clusters();
        let cert = id(&b, "partner.org", "microblog", &["100.65.0.9/32"]);
        trust.federate(vec![]);
        assert!(matches!(
            trust.check(&cert, NOW, None, Signature::Known),
            Err(CertError::UntrustedTrustDomain { .. })
        ));
    }

    #[test]
    fn a_ca_of_another_domain_inside_a_federation_is_left_out() {
        let (_, a_ca) = ca(1, "example.org", &[]);
        let (_, c_ca) = ca(3, "third.org", &[]);
        let (mut trust, _) = Trust::new("example.org", vec![a_ca.clone()]);
        let left = trust.federate(vec![partner(vec![c_ca]), {
            let mut own = partner(vec![a_ca]);
            own.trust_domain = "example.org".into();
            own
        }]);
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(
            trust.federation("partner.org").map(|f| f.cas.len()),
            Some(0)
        );
        assert!(trust.federation("example.org").is_none());
    }

    #[test]
    fn both_cas_of_a_rotation_are_trusted() {
        let (_, a_ca) = ca(1, "example.org", &[]);
        let (old_key, old) = ca(2, "partner.org", &[]);
        let (new_key, new) = ca(4, "partner.org", &[]);
        let (mut trust, _) = Trust::new("example.org", vec![a_ca]);
        trust.federate(vec![partner(vec![old, new])]);
        for k in [&old_key, &new_key] {
            let cert = id(k, "partner.org", "microblog", &["100.65.1.1/32"]);
            assert_eq!(trust.check(&cert, NOW, None, Signature::Verify), Ok(()));
        }
    }

    proptest! {
        /// Whatever the federation's scope, an accepted remote identity's addresses lie inside
        /// it and outside the local CA's ranges, and its namespace is one it allows.
        #[test]
        fn accepted_remote_identities_are_within_scope(
            scope_len in 8u8..=24, scope_net in any::<u32>(),
            addr in any::<u32>(), addr_len in 8u8..=32,
            ns in prop::sample::select(vec!["microblog", "other", "kube-system"]),
        ) {
            let (_, a_ca) = ca(1, "example.org", &["100.64.0.0/16"]);
            let (b_key, b_ca) = ca(2, "partner.org", &[]);
            let (mut trust, _) = Trust::new("example.org", vec![a_ca]);
            let scope = Cidr::new(std::net::Ipv4Addr::from(scope_net).into(), scope_len).unwrap();
            let mut f = partner(vec![b_ca]);
            f.addresses = vec![scope];
            trust.federate(vec![f]);
            let a = Cidr::new(std::net::Ipv4Addr::from(addr).into(), addr_len).unwrap();
            let cert = id(&b_key, "partner.org", ns, &[&a.to_string()]);
            let ok = trust.check(&cert, NOW, None, Signature::Verify).is_ok();
            let local: Cidr = "100.64.0.0/16".parse().unwrap();
            prop_assert_eq!(ok, scope.covers(&a) && !local.overlaps(&a) && ns == "microblog");
        }
    }
}
