//! The policy set in force on this node, pure: taken only when signed by a configured policy
//! admin and newer than the one running, compiled whole before it replaces anything. The node
//! saves what it takes in the state directory (`Stored::Policy`), so a restart enforces it again
//! at once.

use crate::enforce::{identity_of_cert, Holder, Rules};
use policy::engine::{PolicySet, Posture};
use proto::cert::CertBody;
use proto::policyset::SignedPolicySet;

pub struct PolicyBook {
    /// This node's trust domain: the one the policies are written for.
    trust_domain: String,
    admins: Vec<[u8; 32]>,
    posture: Posture,
    audit: bool,
    pub current: Option<SignedPolicySet>,
    set: PolicySet,
    /// The highest serial this node ever ran, also one saved by an earlier run that no longer
    /// verifies (its admin was removed): nothing at or below it is taken again.
    floor: u64,
}

impl PolicyBook {
    /// The policy admins' keys: who signs sets, and who may read the mesh's flow logs.
    pub fn admins(&self) -> &[[u8; 32]] {
        &self.admins
    }

    pub fn new(
        trust_domain: &str,
        admins: Vec<[u8; 32]>,
        posture: Posture,
        audit: bool,
    ) -> PolicyBook {
        PolicyBook {
            trust_domain: trust_domain.to_string(),
            admins,
            posture,
            audit,
            current: None,
            set: PolicySet::compile(&[], posture)
                .unwrap_or_default()
                .in_trust_domain(trust_domain),
            floor: 0,
        }
    }

    /// Takes the set saved by an earlier run: enforced again if it still verifies; its serial
    /// stays the floor either way.
    pub fn restore(&mut self, encoded: &[u8]) -> Result<String, String> {
        if let Ok(signed) = SignedPolicySet::decode(encoded) {
            let result = self.accept(encoded);
            self.floor = self.floor.max(signed.serial);
            result
        } else {
            self.accept(encoded)
        }
    }

    /// The federations of the set in force.
    pub fn federations(&self) -> Vec<proto::trust::Federation> {
        self.set.federations().to_vec()
    }

    /// Policies in the set in force.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn serial(&self) -> u64 {
        self.current.as_ref().map_or(0, |s| s.serial)
    }

    /// For a set an operator applies here: it must be the direct successor of the set in force
    /// (the one `meshctl policy apply` read and merged into). A set that raced with another apply
    /// is refused rather than silently replacing that change.
    pub fn check_next(&self, encoded: &[u8]) -> Result<(), String> {
        let signed = SignedPolicySet::decode(encoded).map_err(|e| e.to_string())?;
        let running = self.serial();
        if signed.serial != running + 1 {
            return Err(format!(
                "policy set {} does not follow set {running}, which is in force (another apply \
                 landed since this one read the set?); apply again",
                signed.serial
            ));
        }
        Ok(())
    }

    /// Verifies and compiles `encoded`, then makes it current. On any error the running set
    /// stays in force and the error says what was wrong.
    pub fn accept(&mut self, encoded: &[u8]) -> Result<String, String> {
        let signed = SignedPolicySet::decode(encoded).map_err(|e| e.to_string())?;
        signed.verify(&self.admins).map_err(|e| e.to_string())?;
        let running = self.current.as_ref().map(|c| (c.serial, c.digest()));
        if !super::policy_sync::supersedes((signed.serial, signed.digest()), running)
            || (self.current.is_none() && signed.serial <= self.floor)
        {
            return Err(match &self.current {
                Some(c) => format!(
                    "policy set {} is not newer than set {}, which is in force",
                    signed.serial, c.serial
                ),
                None => format!(
                    "policy set {} is not newer than set {}, which this node ran before",
                    signed.serial, self.floor
                ),
            });
        }
        let set = compile(&signed, self.posture, &self.trust_domain)?;
        let msg = format!(
            "policy set {} in force: {} policies",
            signed.serial,
            set.len()
        );
        self.floor = self.floor.max(signed.serial);
        self.set = set;
        self.current = Some(signed);
        Ok(msg)
    }

    /// Takes new policy admins, posture and audit mode, as a restart with them would: the set in
    /// force is compiled again under the new posture (refused, changing nothing, if it does not
    /// compile), and dropped if no admin signs it any more (its serial stays the floor). Returns
    /// what an operator should know.
    pub fn reconfigure(
        &mut self,
        admins: Vec<[u8; 32]>,
        posture: Posture,
        audit: bool,
    ) -> Result<Vec<String>, String> {
        let mut notes = Vec::new();
        let trusted = self
            .current
            .as_ref()
            .filter(|s| s.verify(&admins).is_ok())
            .cloned();
        if let (Some(c), None) = (&self.current, &trusted) {
            notes.push(format!(
                "policy set {} is signed by no policy admin any more: no set in force",
                c.serial
            ));
        }
        let set = match &trusted {
            Some(signed) => compile(signed, posture, &self.trust_domain)?,
            None => PolicySet::compile(&[], posture)
                .unwrap_or_default()
                .in_trust_domain(&self.trust_domain),
        };
        self.admins = admins;
        self.posture = posture;
        self.audit = audit;
        self.current = trusted;
        self.set = set;
        Ok(notes)
    }

    /// The set in force, in a few words.
    pub fn describe(&self) -> String {
        match &self.current {
            Some(s) => format!(
                "policy set {} in force: {} policies",
                s.serial,
                self.set.len()
            ),
            None => "no policy set in force".into(),
        }
    }

    /// The rules for this node (`me`) and the `others` (its workloads, the members and theirs,
    /// by [`Holder`]). When `prev` was built from the set in force, only the identities that
    /// changed are resolved.
    pub fn rules<'a>(
        &self,
        me: &CertBody,
        others: impl Iterator<Item = (Holder, &'a CertBody)> + Clone,
        served: &[proto::Cidr],
        prev: Option<&Rules>,
    ) -> Rules {
        let local = identity_of_cert(me);
        let members = others.map(|(h, body)| (h, identity_of_cert(body)));
        let incremental = prev
            .filter(|p| {
                p.serial == self.serial() && p.audit_all == self.audit && p.served == served
            })
            .and_then(|p| p.with_members(&self.set, &local, members.clone()));
        incremental.unwrap_or_else(|| {
            Rules::build(&self.set, local, members, self.audit, self.serial()).serving(served)
        })
    }
}

/// Parses and compiles the documents of a verified set for `trust_domain`.
fn compile(
    signed: &SignedPolicySet,
    posture: Posture,
    trust_domain: &str,
) -> Result<PolicySet, String> {
    let source = format!("policy set {}", signed.serial);
    let docs = policy::model::parse_documents(&signed.documents, &source).map_err(|errs| {
        errs.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    Ok(PolicySet::compile(&docs, posture)
        .map_err(|errs| {
            errs.iter()
                .map(|e| format!("{source}: {e}"))
                .collect::<Vec<_>>()
                .join("\n")
        })?
        .in_trust_domain(trust_domain))
}

pub fn posture(p: crate::config::PostureSetting) -> Posture {
    match p {
        crate::config::PostureSetting::ZeroTrust => Posture::ZeroTrust,
        crate::config::PostureSetting::Calico => Posture::Calico,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
    const POLICY: &str = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  selector: all()\n  ingress: [{action: Allow}]\n";

    fn signed(serial: u64, docs: &str, key: u8) -> Vec<u8> {
        SignedPolicySet::sign(serial, 0, docs.into(), &SigningKey::from_bytes(&[key; 32]))
            .unwrap()
            .encode()
    }

    fn admin() -> [u8; 32] {
        SigningKey::from_bytes(&[1; 32]).verifying_key().to_bytes()
    }

    fn book(admins: Vec<[u8; 32]>) -> PolicyBook {
        PolicyBook::new("example.org", admins, Posture::ZeroTrust, false)
    }

    #[test]
    fn takes_only_newer_sets_its_admin_signed_and_keeps_the_old_one_on_any_error() {
        let mut store = book(vec![admin()]);
        assert_eq!(store.serial(), 0);
        store.accept(&signed(2, POLICY, 1)).unwrap();
        assert_eq!(store.serial(), 2);
        let refused = [
            (signed(3, POLICY, 9), "not a policy-admin key"),
            (signed(1, NS, 1), "not newer than set 2"),
            (signed(3, "kind: Nonsense\n", 1), "is not one of"),
            (signed(3, &POLICY.replace("all()", "all("), 1), "selector"),
            (b"MSHS".to_vec(), "truncated"),
        ];
        for (bytes, why) in refused {
            let e = store.accept(&bytes).unwrap_err();
            assert!(e.contains(why), "{e} (wanted {why})");
            assert_eq!(store.serial(), 2, "the running set stays after: {e}");
        }
    }

    #[test]
    fn a_reload_takes_new_admins_posture_and_audit_as_a_restart_would() {
        let mut store = book(vec![admin()]);
        store.accept(&signed(3, POLICY, 1)).unwrap();
        // Another posture and audit mode: the set in force stays, compiled again.
        let notes = store
            .reconfigure(vec![admin()], Posture::Calico, true)
            .unwrap();
        assert!(notes.is_empty());
        assert_eq!((store.serial(), store.set.len(), store.audit), (3, 1, true));
        assert_eq!(store.posture, Posture::Calico);
        // Its admin removed: no set in force, said so; nothing at or below 3 comes back.
        let other = SigningKey::from_bytes(&[2; 32]).verifying_key().to_bytes();
        let notes = store
            .reconfigure(vec![other], Posture::ZeroTrust, false)
            .unwrap();
        assert!(
            notes[0].contains("policy set 3 is signed by no policy admin"),
            "{notes:?}"
        );
        assert_eq!((store.serial(), store.set.len()), (0, 0));
        assert!(store.accept(&signed(3, POLICY, 2)).is_err());
        store.accept(&signed(4, POLICY, 2)).unwrap();
    }

    #[test]
    fn an_operators_set_must_follow_the_one_in_force() {
        let mut store = book(vec![admin()]);
        store.check_next(&signed(1, POLICY, 1)).unwrap();
        store.accept(&signed(1, POLICY, 1)).unwrap();
        // Two operators read set 1; one applies 2; the other's 2 (or a jump to 5) is refused.
        store.accept(&signed(2, NS, 1)).unwrap();
        let e = store.check_next(&signed(2, POLICY, 1)).unwrap_err();
        assert!(e.contains("does not follow set 2"), "{e}");
        assert!(store.check_next(&signed(5, POLICY, 1)).is_err());
        store.check_next(&signed(3, POLICY, 1)).unwrap();
    }

    #[test]
    fn a_saved_set_is_enforced_again_and_its_serial_stays_the_floor_even_when_refused() {
        let saved = signed(4, POLICY, 1);
        let mut again = book(vec![admin()]);
        again.restore(&saved).unwrap();
        assert_eq!(again.serial(), 4);
        assert_eq!(again.set.len(), 1);
        // A node whose admins changed does not enforce a set it no longer trusts ...
        let other = SigningKey::from_bytes(&[2; 32]).verifying_key().to_bytes();
        let mut rotated = book(vec![other]);
        assert!(rotated.restore(&saved).is_err());
        assert_eq!(rotated.serial(), 0);
        // ... and still takes nothing older than what it ran: a replayed old set stays out.
        let e = rotated.accept(&signed(3, POLICY, 2)).unwrap_err();
        assert!(e.contains("which this node ran before"), "{e}");
        rotated.accept(&signed(5, POLICY, 2)).unwrap();
    }
}
