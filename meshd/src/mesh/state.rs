//! The state directory: the members a node has learned, so that a restarted node rejoins without
//! its seeds. Saved atomically as JSON (certificates in base64, endpoints as text); every entry is
//! verified again when it is read back.

use super::MemberState;
use anyhow::Context;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use proto::cert::Certificate;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

#[derive(serde::Serialize, serde::Deserialize)]
struct Entry {
    certificate: String,
    endpoint: SocketAddr,
}

const FILE: &str = "members.json";

pub fn save(dir: &Path, members: &BTreeMap<[u8; 32], MemberState>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let entries: Vec<Entry> = members
        .values()
        .map(|m| Entry {
            certificate: STANDARD.encode(m.certificate.encode()),
            endpoint: m.endpoint,
        })
        .collect();
    let text = serde_json::to_string_pretty(&entries)?;
    let path = dir.join(FILE);
    let tmp = dir.join(format!("{FILE}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))
}

/// The saved members; an unreadable entry is skipped with a warning, never fatal.
pub fn load(dir: &Path) -> Vec<(Certificate, SocketAddr)> {
    let path = dir.join(FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Vec::new();
    };
    let entries: Vec<Entry> = match serde_json::from_str(&text) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable state file");
            return Vec::new();
        }
    };
    entries
        .into_iter()
        .filter_map(|e| {
            let bytes = STANDARD.decode(&e.certificate).ok()?;
            Certificate::decode(&bytes).ok().map(|c| (c, e.endpoint))
        })
        .collect()
}
