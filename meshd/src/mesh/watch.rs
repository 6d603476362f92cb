//! `reload_on_change = true`: the configuration file and every file it names (certificate, key,
//! trust bundle, revocation lists, policy-admin keys) are read every [`WATCH_INTERVAL`]; when any
//! changes, the node reloads as on SIGHUP, and the outcome is logged. This is how a node follows
//! a Kubernetes ConfigMap or Secret that is updated in place (its files are swapped under a
//! symlink). A refused reload is not retried until the files change again.

use super::run::Command;
use crate::config::Config;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc::Sender;

pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);
/// Bytes of each file read for the fingerprint; a larger file is compared by its first bytes,
/// size and modification time.
const MAX_READ_BYTES: u64 = 1 << 20;

/// The files a configuration names, besides itself.
pub fn named_files(cfg: &Config) -> Vec<PathBuf> {
    let mut v = vec![
        cfg.identity.certificate.clone(),
        cfg.identity.private_key.clone(),
    ];
    v.extend(cfg.trust.bundle.iter().cloned());
    v.extend(cfg.trust.revocation_lists.iter().cloned());
    v.extend(cfg.trust.policy_admins.iter().cloned());
    v
}

/// What a file is now, for comparison: its size, modification time and first
/// [`MAX_READ_BYTES`]; `None` when missing, unreadable or not a regular file (a FIFO would block).
fn snapshot(path: &Path) -> Option<(u64, Option<std::time::SystemTime>, Vec<u8>)> {
    use std::io::Read;
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_READ_BYTES)
        .read_to_end(&mut bytes)
        .ok()?;
    Some((meta.len(), meta.modified().ok(), bytes))
}

/// A digest of `config` and of the files it names now (a missing or unreadable file counts as
/// such, so its return is a change too). Blocking: the shell runs it off the async thread.
pub fn fingerprint(config: &Path) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let own = snapshot(config);
    own.hash(&mut h);
    let text = own.map(|(_, _, bytes)| bytes);
    let named = text
        .and_then(|t| String::from_utf8(t).ok())
        .and_then(|t| Config::parse(&t, config).ok())
        .map(|c| named_files(&c))
        .unwrap_or_default();
    for f in named {
        f.hash(&mut h);
        snapshot(&f).hash(&mut h);
    }
    h.finish()
}

/// The fingerprint, read on a blocking thread so a slow disk never stalls the node.
async fn fingerprint_off_thread(config: &Path) -> Option<u64> {
    let config = config.to_path_buf();
    tokio::task::spawn_blocking(move || fingerprint(&config))
        .await
        .ok()
}

/// Asks for a reload whenever the fingerprint of `config` changes.
pub async fn run(config: PathBuf, commands: Sender<Command>) {
    let Some(mut last) = fingerprint_off_thread(&config).await else {
        return;
    };
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Some(now) = fingerprint_off_thread(&config).await else {
            continue;
        };
        if now == last {
            continue;
        }
        last = now;
        tracing::info!(config = %config.display(), "configuration files changed: reloading");
        if commands
            .send(Command::Reload { reply: None })
            .await
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_to_the_file_or_to_a_file_it_names_changes_the_fingerprint() {
        let dir = std::env::temp_dir().join(format!("meshd-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("node.crt");
        let bundle = dir.join("ca.crt");
        std::fs::write(&cert, "one").unwrap();
        std::fs::write(&bundle, "ca").unwrap();
        let config = dir.join("meshd.toml");
        let text = format!(
            "[interface]\nname = \"m0\"\n[identity]\ncertificate = \"{}\"\nprivate_key = \"{}\"\n[trust]\nbundle = [\"{}\"]\n",
            cert.display(),
            dir.join("node.key").display(),
            bundle.display()
        );
        std::fs::write(&config, &text).unwrap();
        let a = fingerprint(&config);
        assert_eq!(a, fingerprint(&config), "nothing changed");
        std::fs::write(&cert, "two").unwrap();
        let b = fingerprint(&config);
        assert_ne!(a, b, "a renewed certificate");
        std::fs::write(&bundle, "ca2").unwrap();
        let c = fingerprint(&config);
        assert_ne!(b, c, "a new trust bundle");
        std::fs::write(&config, text.replace("m0", "m1")).unwrap();
        assert_ne!(c, fingerprint(&config), "the file itself");
        // A named file that is a FIFO (opening it would block the node) counts as unreadable.
        let fifo = dir.join("node.key");
        let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a path we own, with a valid NUL-terminated string.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let with_fifo = fingerprint(&config);
        assert_eq!(
            with_fifo,
            fingerprint(&config),
            "read without blocking, stable"
        );
        std::fs::write(&config, "not toml [").unwrap();
        let broken = fingerprint(&config);
        assert_eq!(
            broken,
            fingerprint(&config),
            "a broken file is stable: one reload, refused"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
