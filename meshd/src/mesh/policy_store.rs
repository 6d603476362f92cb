//! The policy set in force on this node: taken only when signed by a configured policy admin and
//! newer than the one running, compiled whole before it replaces anything, and saved in the state
//! directory so a restart enforces it again at once.

use super::MemberState;
use crate::enforce::{identity_of_cert, Rules};
use policy::engine::{PolicySet, Posture};
use proto::cert::CertBody;
use proto::policyset::SignedPolicySet;
use std::collections::BTreeMap;
use std::path::PathBuf;

const FILE: &str = "policy.set";

pub struct PolicyStore {
    admins: Vec<[u8; 32]>,
    posture: Posture,
    audit: bool,
    path: PathBuf,
    pub current: Option<SignedPolicySet>,
    set: PolicySet,
}

impl PolicyStore {
    /// The store of `state_dir`, with the saved set if there is one that still verifies.
    pub fn open(
        state_dir: &std::path::Path,
        admins: Vec<[u8; 32]>,
        posture: Posture,
        audit: bool,
    ) -> PolicyStore {
        let mut store = PolicyStore {
            admins,
            posture,
            audit,
            path: state_dir.join(FILE),
            current: None,
            set: PolicySet::compile(&[], posture).unwrap_or_default(),
        };
        if let Ok(bytes) = std::fs::read(&store.path) {
            match store.accept(&bytes) {
                Ok(msg) => tracing::info!(path = %store.path.display(), "{msg}"),
                Err(e) => {
                    tracing::warn!(path = %store.path.display(), error = %e, "saved policy set refused; enforcing none")
                }
            }
        }
        store
    }

    pub fn serial(&self) -> u64 {
        self.current.as_ref().map_or(0, |s| s.serial)
    }

    /// Verifies, compiles and saves `encoded`, then makes it current. On any error the running
    /// set stays in force and the error says what was wrong.
    pub fn accept(&mut self, encoded: &[u8]) -> Result<String, String> {
        let signed = SignedPolicySet::decode(encoded).map_err(|e| e.to_string())?;
        signed.verify(&self.admins).map_err(|e| e.to_string())?;
        let running = self.serial();
        if signed.serial <= running {
            return Err(format!(
                "policy set {} is not newer than set {running}, which is in force",
                signed.serial
            ));
        }
        let source = format!("policy set {}", signed.serial);
        let docs = policy::model::parse_documents(&signed.documents, &source).map_err(|errs| {
            errs.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        })?;
        let set = PolicySet::compile(&docs, self.posture).map_err(|errs| {
            errs.iter()
                .map(|e| format!("{source}: {e}"))
                .collect::<Vec<_>>()
                .join("\n")
        })?;
        if std::fs::read(&self.path).ok().as_deref() != Some(encoded) {
            save(&self.path, encoded).map_err(|e| format!("{e:#}"))?;
        }
        let msg = format!(
            "policy set {} in force: {} policies",
            signed.serial,
            set.len()
        );
        self.set = set;
        self.current = Some(signed);
        Ok(msg)
    }

    /// The rules for this node (`me`) and the current members.
    pub fn rules(&self, me: &CertBody, members: &BTreeMap<[u8; 32], MemberState>) -> Rules {
        Rules::build(
            &self.set,
            identity_of_cert(me),
            members
                .iter()
                .map(|(k, m)| (*k, identity_of_cert(&m.certificate.body))),
            self.audit,
            self.serial(),
        )
    }
}

fn save(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("set.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

pub fn posture(p: crate::config::PostureSetting) -> Posture {
    match p {
        crate::config::PostureSetting::ZeroTrust => Posture::ZeroTrust,
        crate::config::PostureSetting::Calico => Posture::Calico,
    }
}
