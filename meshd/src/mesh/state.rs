//! The state directory: what a node must still know after a restart. Members (so it rejoins
//! without its seeds), revocation lists (so a revoked member stays out), replay floors (so control
//! datagrams captured before the restart are refused after it) and the policy set in force (so it
//! enforces at once). The node ([`super::node`]) says what each file must hold; this module only
//! writes and reads them: atomically, the directory mode 0700 and every file 0600, since they name
//! the mesh's members and its policy. Everything read back is verified again by the node.

use super::membership::Floor;
use super::node::{Saved, Stored};
use anyhow::Context;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use proto::cert::{Certificate, RevocationList};
use proto::control::Member;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

#[derive(serde::Serialize, serde::Deserialize)]
struct Entry {
    certificate: String,
    endpoint: SocketAddr,
}

const MEMBERS: &str = "members.json";
const REVOCATIONS: &str = "revocations.json";
const FLOORS: &str = "replay.json";
const POLICY: &str = "policy.set";
const ATTACHED: &str = "workloads.json";

/// An attached workload as saved: its reference and the certificate held (base64).
#[derive(serde::Serialize, serde::Deserialize)]
struct AttachedEntry {
    namespace: String,
    name: String,
    uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    certificate: Option<String>,
}

/// Creates `dir` (mode 0700) if needed, and takes group and other access away from an existing one.
pub fn prepare(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))
            .with_context(|| format!("restricting {} to its owner", dir.display()))?;
    }
    Ok(())
}

/// Writes `bytes` to `dir/name` atomically, mode 0600 from the start.
pub fn write_private(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    prepare(dir)?;
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))
}

/// Saves one file of the state directory.
pub fn save(dir: &Path, stored: &Stored) -> anyhow::Result<()> {
    match stored {
        Stored::Members(members) => {
            let entries: Vec<Entry> = members
                .iter()
                .map(|m| Entry {
                    certificate: STANDARD.encode(m.certificate.encode()),
                    endpoint: m.endpoint,
                })
                .collect();
            write_private(dir, MEMBERS, &serde_json::to_vec_pretty(&entries)?)
        }
        Stored::Revocations(lists) => {
            let texts: Vec<String> = lists.iter().map(|l| STANDARD.encode(l.encode())).collect();
            write_private(dir, REVOCATIONS, &serde_json::to_vec_pretty(&texts)?)
        }
        Stored::Floors(floors) => write_private(dir, FLOORS, &serde_json::to_vec(floors)?),
        Stored::Policy(encoded) => write_private(dir, POLICY, encoded),
        Stored::Attached(list) => {
            let entries: Vec<AttachedEntry> = list
                .iter()
                .map(|(w, c)| AttachedEntry {
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                    uid: w.uid.clone(),
                    certificate: c.as_ref().map(|c| STANDARD.encode(c.encode())),
                })
                .collect();
            write_private(dir, ATTACHED, &serde_json::to_vec_pretty(&entries)?)
        }
    }
}

/// Reads a JSON file of the state directory; a missing file is empty, an unreadable one is
/// skipped with a warning, never fatal.
fn read_json<T: serde::de::DeserializeOwned + Default>(dir: &Path, name: &str) -> T {
    let path = dir.join(name);
    let Ok(text) = std::fs::read(&path) else {
        return T::default();
    };
    serde_json::from_slice(&text).unwrap_or_else(|e| {
        tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable state file");
        T::default()
    })
}

/// Everything the state directory holds.
pub fn load(dir: &Path) -> Saved {
    let entries: Vec<Entry> = read_json(dir, MEMBERS);
    let members = entries
        .into_iter()
        .filter_map(|e| {
            let bytes = STANDARD.decode(&e.certificate).ok()?;
            Certificate::decode(&bytes).ok().map(|certificate| Member {
                certificate,
                endpoint: e.endpoint,
            })
        })
        .collect();
    let texts: Vec<String> = read_json(dir, REVOCATIONS);
    let revocations = texts
        .iter()
        .filter_map(|t| RevocationList::decode(&STANDARD.decode(t).ok()?).ok())
        .collect();
    let floors: Vec<Floor> = read_json(dir, FLOORS);
    let policy = std::fs::read(dir.join(POLICY)).ok();
    let entries: Vec<AttachedEntry> = read_json(dir, ATTACHED);
    let attached = entries
        .into_iter()
        .map(|e| {
            let certificate = e
                .certificate
                .and_then(|t| Certificate::decode(&STANDARD.decode(t).ok()?).ok());
            let w = proto::workload::WorkloadRef {
                namespace: e.namespace,
                name: e.name,
                uid: e.uid,
            };
            (w, certificate)
        })
        .collect();
    Saved {
        members,
        revocations,
        floors,
        policy,
        attached,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn files_are_private_and_read_back() {
        let dir = std::env::temp_dir().join(format!("meshd-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let floors = vec![Floor {
            sender: [3; 32],
            counter: 42,
            heard_ms: 7,
        }];
        save(&dir, &Stored::Floors(floors.clone())).unwrap();
        save(&dir, &Stored::Policy(b"MSHS".to_vec())).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700, "the directory is its owner's alone");
        assert_eq!(mode(&dir.join(FLOORS)), 0o600);
        assert_eq!(mode(&dir.join(POLICY)), 0o600);
        let saved = load(&dir);
        assert_eq!(saved.floors, floors);
        assert_eq!(saved.policy.as_deref(), Some(&b"MSHS"[..]));
        std::fs::write(dir.join(MEMBERS), "{not json").unwrap();
        assert!(
            load(&dir).members.is_empty(),
            "an unreadable file is skipped"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
