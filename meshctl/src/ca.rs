//! `meshctl ca`: the mesh's root of trust. A CA directory holds `ca.key` (Ed25519 seed, mode
//! 0600), `ca.crt` (the self-signed CA certificate), `revoked.crl` (the signed revocation list)
//! and `issued.jsonl` (one line per certificate issued and not yet expired: what `ca revoke
//! --serial` checks).

use crate::Failure;
use anyhow::{anyhow, bail, Context};
use ed25519_dalek::SigningKey;
use keyfile as files;
use proto::armor;
use proto::cert::{CertBody, Certificate, RevocationList};
use std::path::{Path, PathBuf};

pub const DEFAULT_CA_TTL: &str = "3650d";

/// Each time `issued.jsonl` grows past another multiple of this size, the lines of expired
/// certificates are dropped.
pub const COMPACT_RECORD_BYTES: u64 = 1024 * 1024;
/// How long [`CaDir::lock`] waits for another process to let go of the CA directory.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct CaDir {
    pub dir: PathBuf,
}

impl CaDir {
    pub fn of(dir: &Path) -> CaDir {
        CaDir {
            dir: dir.to_path_buf(),
        }
    }
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn crl_path(&self) -> PathBuf {
        self.dir.join("revoked.crl")
    }
    pub fn issued_path(&self) -> PathBuf {
        self.dir.join("issued.jsonl")
    }

    /// The CA directory's lock, held until the file returned is dropped: what two processes
    /// on one CA directory (two `ca serve`, an issuer and `identity issue`) must not do at once,
    /// such as redeeming a token or compacting the record, is done under it. Each holds it for
    /// a moment; one that held it for [`LOCK_WAIT`] is stuck, and waiting longer would stop an
    /// issuer's serve loop, so that is an error.
    pub fn lock(&self) -> anyhow::Result<std::fs::File> {
        self.lock_within(LOCK_WAIT)
    }

    fn lock_within(&self, wait: std::time::Duration) -> anyhow::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join(".lock");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let start = std::time::Instant::now();
        loop {
            match f.try_lock() {
                Ok(()) => return Ok(f),
                Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < wait => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(std::fs::TryLockError::WouldBlock) => bail!(
                    "{} is held by another process for over {} (a stuck meshctl on this CA \
                     directory?)",
                    path.display(),
                    humantime::format_duration(wait)
                ),
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("locking {}", path.display()))
                }
            }
        }
    }

    /// Records a certificate this CA issued (appended, mode 0600 like the rest of the CA).
    pub fn record(&self, body: &CertBody) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let _locked = self.lock()?;
        let path = self.issued_path();
        let line = serde_json::json!({
            "serial": body.serial,
            "identity": body.identity(),
            "public_key": proto::Key(body.public_key).to_base64(),
            "not_after": crate::identity::utc(body.not_after),
            "expires": body.not_after,
        });
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let text = format!("{line}\n");
        f.write_all(text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
        drop(f);
        // Once each time the record grows past another COMPACT_RECORD_BYTES: never on every
        // line, however many live certificates it holds.
        let before = size.saturating_sub(text.len() as u64);
        if size / COMPACT_RECORD_BYTES > before / COMPACT_RECORD_BYTES {
            self.compact_record(now())?;
        }
        Ok(())
    }

    /// Drops the lines of certificates expired before `now` from the record: revoking one is
    /// pointless, and an online issuer's record would otherwise grow without end. Lines without
    /// an expiry (written by older meshctl) are kept. The caller holds [`CaDir::lock`].
    fn compact_record(&self, now: u64) -> anyhow::Result<()> {
        let path = self.issued_path();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .map_or(true, |v| v["expires"].as_u64().is_none_or(|e| e >= now))
            })
            .flat_map(|l| [l, "\n"])
            .collect();
        files::replace(&path, kept.as_bytes(), 0o600)
    }

    /// Whether this CA issued `serial`; `None` when it keeps no record (made before meshctl kept
    /// one).
    pub fn issued(&self, serial: u64) -> anyhow::Result<Option<bool>> {
        let path = self.issued_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Some(text.lines().any(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .is_ok_and(|v| v["serial"].as_u64() == Some(serial))
        })))
    }

    pub fn signing_key(&self) -> anyhow::Result<SigningKey> {
        let path = self.key_path();
        let text = files::read_secret(&path)?;
        let seed = armor::decode(armor::CA_PRIVATE_KEY, &text)
            .with_context(|| format!("{}", path.display()))?;
        let seed: [u8; 32] = seed
            .try_into()
            .map_err(|_| anyhow!("{}: a CA key is 32 bytes", path.display()))?;
        Ok(SigningKey::from_bytes(&seed))
    }

    /// The CA certificate and its revocation list, if it has one.
    pub fn certificate_and_crl(&self) -> anyhow::Result<(Certificate, Option<RevocationList>)> {
        let root = self.certificate()?;
        let crl = self.revocation_list(&root)?;
        Ok((root, crl))
    }

    pub fn certificate(&self) -> anyhow::Result<Certificate> {
        load_certificate(&self.cert_path())
    }

    /// The current revocation list, if the CA has issued one.
    pub fn revocation_list(&self, ca: &Certificate) -> anyhow::Result<Option<RevocationList>> {
        let path = self.crl_path();
        if !path.exists() {
            return Ok(None);
        }
        let bytes = armor::decode(armor::REVOCATION_LIST, &files::read(&path)?)
            .with_context(|| format!("{}", path.display()))?;
        let crl = RevocationList::decode(&bytes).with_context(|| format!("{}", path.display()))?;
        crl.verify(ca)
            .with_context(|| format!("{}: not signed by this CA", path.display()))?;
        Ok(Some(crl))
    }
}

/// The CA certificate of the CA directory `dir`, or an input error that says it is none.
pub fn root_of(dir: &Path) -> Result<Certificate, crate::Failure> {
    CaDir::of(dir).certificate().map_err(|e| {
        crate::Failure::input(e.context(format!(
            "{} is not a CA directory (see meshctl ca init)",
            dir.display()
        )))
    })
}

pub fn load_certificate(path: &Path) -> anyhow::Result<Certificate> {
    let bytes = armor::decode(armor::CERTIFICATE, &files::read(path)?)
        .with_context(|| format!("{}", path.display()))?;
    Certificate::decode(&bytes).with_context(|| format!("{}", path.display()))
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A serial that orders certificates by issue time (microseconds since the epoch, times 1024)
/// with 10 random bits, so two certificates of one identity issued in the same second are still
/// ordered: a node takes only the newest certificate of an identity (not_before, then serial).
pub fn new_serial() -> u64 {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let mut b = [0u8; 2];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    (micros << 10) | u64::from(u16::from_be_bytes(b) & 0x3ff)
}

pub fn init(
    trust_domain: &str,
    out: &Path,
    ttl: &str,
    addresses: &[String],
) -> Result<(), Failure> {
    let ttl = proto::duration::parse(ttl).map_err(|e| Failure::input(anyhow!("--ttl: {e}")))?;
    let mut ranges: Vec<proto::Cidr> = addresses
        .iter()
        .map(|a| {
            a.parse()
                .map_err(|e| Failure::input(anyhow!("--addresses `{a}`: {e}")))
        })
        .collect::<Result<_, _>>()?;
    ranges.sort();
    ranges.dedup();
    let ca = CaDir::of(out);
    if ca.key_path().exists() || ca.cert_path().exists() {
        return Err(anyhow!(
            "{} already holds a CA; refusing to overwrite it",
            out.display()
        )
        .into());
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut seed = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
    let key = SigningKey::from_bytes(&seed);
    let public = key.verifying_key().to_bytes();
    let now = now();
    let cert = CertBody::ca(
        trust_domain,
        "mesh-ca",
        public,
        new_serial(),
        (now, now.saturating_add(ttl.as_secs())),
        ranges,
    )
    .sign(&key)
    .map_err(|e| Failure::input(anyhow!("--trust-domain: {e}")))?;
    files::create(
        &ca.key_path(),
        armor::encode(armor::CA_PRIVATE_KEY, &seed).as_bytes(),
        0o600,
    )?;
    files::create(
        &ca.cert_path(),
        armor::encode(armor::CERTIFICATE, &cert.encode()).as_bytes(),
        0o644,
    )?;
    println!("CA for trust domain {trust_domain} in {}", out.display());
    if !cert.body.addrs.is_empty() {
        println!(
            "  grants addresses in {} only",
            proto::cert::list(&cert.body.addrs)
        );
    }
    println!(
        "  key  {} (mode 600: keep it offline)",
        ca.key_path().display()
    );
    println!(
        "  cert {} (distribute it as the trust bundle)",
        ca.cert_path().display()
    );
    Ok(())
}

/// Adds serials and keys to the CA's revocation list: `serial`, `key` (base64), and both of the
/// certificate file `cert`. A revoked key is refused in any certificate, also one issued later.
pub fn revoke(
    dir: &Path,
    serial: Option<u64>,
    key: Option<&str>,
    cert_file: Option<&Path>,
) -> Result<(), Failure> {
    let ca = CaDir::of(dir);
    let signing = ca.signing_key()?;
    let cert = ca.certificate()?;
    if cert.body.public_key != signing.verifying_key().to_bytes() {
        let (k, c) = (ca.key_path(), ca.cert_path());
        return Err(anyhow!("{} does not belong to {}", k.display(), c.display()).into());
    }
    if let Some(s) = serial {
        match ca.issued(s)? {
            Some(true) => {}
            Some(false) => {
                return Err(Failure::input(anyhow!(
                    "--serial {s}: not in {} (this CA never issued it, or it expired and was \
                     dropped from the record); revoke a certificate with --cert FILE, a key with \
                     --key",
                    ca.issued_path().display()
                )))
            }
            None => {
                return Err(Failure::input(anyhow!(
                    "--serial {s}: {} keeps no record of what it issued ({} is missing), so a \
                     serial cannot be checked; revoke with --cert FILE or --key KEY",
                    dir.display(),
                    ca.issued_path().display()
                )))
            }
        }
    }
    let mut add_serials: Vec<u64> = serial.into_iter().collect();
    let mut add_keys: Vec<[u8; 32]> = Vec::new();
    if let Some(k) = key {
        let k =
            proto::Key::from_base64(k).map_err(|e| Failure::input(anyhow!("--key `{k}`: {e}")))?;
        add_keys.push(k.0);
    }
    if let Some(path) = cert_file {
        let revoked = load_certificate(path).map_err(Failure::input)?;
        if revoked.body.issuer != cert.body.public_key {
            return Err(anyhow!("{} was not issued by this CA", path.display()).into());
        }
        add_serials.push(revoked.body.serial);
        add_keys.push(revoked.body.public_key);
    }
    if add_serials.is_empty() && add_keys.is_empty() {
        return Err(Failure::input(anyhow!(
            "name what to revoke: --serial N, --key KEY or --cert FILE"
        )));
    }
    let (number, mut serials, mut keys) = match ca.revocation_list(&cert)? {
        Some(c) => (c.number + 1, c.serials, c.keys),
        None => (1, vec![], vec![]),
    };
    let fresh_serials: Vec<u64> = add_serials
        .into_iter()
        .filter(|s| !serials.contains(s))
        .collect();
    let fresh_keys: Vec<[u8; 32]> = add_keys.into_iter().filter(|k| !keys.contains(k)).collect();
    if fresh_serials.is_empty() && fresh_keys.is_empty() {
        println!("already revoked");
        return Ok(());
    }
    serials.extend(&fresh_serials);
    keys.extend(&fresh_keys);
    let crl = RevocationList::sign_with_keys(
        &cert.body.trust_domain,
        number,
        now(),
        serials,
        keys,
        &signing,
    )
    .map_err(|e| anyhow!("signing the revocation list: {e}"))?;
    files::replace(
        &ca.crl_path(),
        armor::encode(armor::REVOCATION_LIST, &crl.encode()).as_bytes(),
        0o644,
    )?;
    let what: Vec<String> = fresh_serials
        .iter()
        .map(|s| format!("serial {s}"))
        .chain(fresh_keys.iter().map(|k| format!("key {}", proto::Key(*k))))
        .collect();
    println!(
        "revoked {}: {} now lists {} serial(s) and {} key(s), number {number}",
        what.join(", "),
        ca.crl_path().display(),
        crl.serials.len(),
        crl.keys.len()
    );
    Ok(())
}

/// What `ca crl inspect -o json` prints.
#[derive(serde::Serialize)]
struct CrlView {
    trust_domain: String,
    number: u64,
    issued_at: String,
    issuer: String,
    serials: Vec<u64>,
    keys: Vec<String>,
    /// "ok", or why it does not verify; absent without --ca.
    #[serde(skip_serializing_if = "Option::is_none")]
    verification: Option<String>,
}

/// Prints a revocation list: its number, when it was signed, and what it revokes; with `--ca`,
/// whether that CA signed it. Exit 1 when it does not verify.
pub fn crl_inspect(
    file: &Path,
    ca_dir: Option<&Path>,
    output: crate::Output,
) -> Result<(), Failure> {
    let bytes = armor::decode(armor::REVOCATION_LIST, &files::read(file)?)
        .with_context(|| format!("{}", file.display()))
        .map_err(Failure::input)?;
    let crl = RevocationList::decode(&bytes)
        .with_context(|| format!("{}", file.display()))
        .map_err(Failure::input)?;
    let verification = match ca_dir {
        None => None,
        Some(d) => {
            let ca = CaDir::of(d).certificate()?;
            Some(match crl.verify(&ca) {
                Ok(()) => "ok".to_string(),
                Err(e) => e.to_string(),
            })
        }
    };
    let view = CrlView {
        trust_domain: crl.trust_domain.clone(),
        number: crl.number,
        issued_at: crate::identity::utc(crl.issued_at),
        issuer: proto::Key(crl.issuer).to_base64(),
        serials: crl.serials.clone(),
        keys: crl
            .keys
            .iter()
            .map(|k| proto::Key(*k).to_base64())
            .collect(),
        verification,
    };
    if let Some(_wide) = output.data(&view)? {
        println!("Revocation list {}", file.display());
        println!("  trust domain {}", view.trust_domain);
        println!("  number       {}", view.number);
        println!("  issued at    {}", view.issued_at);
        println!("  issuer       {}", view.issuer);
        let list = |v: Vec<String>| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        println!(
            "  serials      {}",
            list(view.serials.iter().map(u64::to_string).collect())
        );
        println!("  keys         {}", list(view.keys.clone()));
        println!(
            "  verifies     {}",
            view.verification
                .as_deref()
                .unwrap_or("not checked (give --ca DIR)")
        );
    }
    match &view.verification {
        Some(v) if v != "ok" => Err(anyhow!("{}: {v}", file.display()).into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_drops_expired_certificates_and_keeps_the_rest() {
        let dir = std::env::temp_dir().join(format!("meshctl-record-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = CaDir::of(&dir);
        let body = |serial: u64, not_after: u64| {
            let mut b = CertBody::ca("example.org", "n", [1; 32], serial, (0, not_after), vec![]);
            b.namespace = "nodes".into();
            b
        };
        std::fs::write(
            ca.issued_path(),
            "{\"serial\":1,\"identity\":\"older meshctl\"}\n",
        )
        .unwrap();
        ca.record(&body(2, 100)).unwrap();
        ca.record(&body(3, 5_000)).unwrap();
        {
            let _locked = ca.lock().unwrap();
            ca.compact_record(1_000).unwrap();
        }
        assert_eq!(ca.issued(1).unwrap(), Some(true), "no expiry: kept");
        assert_eq!(ca.issued(2).unwrap(), Some(false), "expired: dropped");
        assert_eq!(ca.issued(3).unwrap(), Some(true));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ca.issued_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_lock_held_too_long_by_another_process_is_an_error_that_names_it_not_a_hang() {
        let dir = std::env::temp_dir().join(format!("meshctl-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = CaDir::of(&dir);
        // Another open file description on the same lock file: as another process would be.
        let held = ca.lock().unwrap();
        let start = std::time::Instant::now();
        let e = ca
            .lock_within(std::time::Duration::from_millis(100))
            .unwrap_err()
            .to_string();
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
        assert!(
            e.contains(".lock is held by another process for over 100ms"),
            "{e}"
        );
        // Let go of in time: taken.
        let waiter = std::thread::spawn({
            let dir = dir.clone();
            move || {
                CaDir::of(&dir)
                    .lock_within(std::time::Duration::from_secs(5))
                    .is_ok()
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(held);
        assert!(waiter.join().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
