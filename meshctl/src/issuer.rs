//! `meshctl ca serve`: the online issuer of workload certificates (PROTOCOL.md §11).
//!
//! It listens on the underlay, not on the mesh, so it needs no mesh to be up. A node seals a
//! request with its own static key over the control protocol's crypto, naming workloads only by
//! reference; the issuer checks that the node's certificate names the sealing key and verifies
//! against the node CA (`ca.crt`, `revoked.crl`), reads everything else from its registry
//! (`workloads.yaml`), and signs each grant with its own CA key (`issuer/ca.key`): a workload
//! certificate can never ask as a node.
//!
//! Files in the CA directory's `issuer/`, made by the first `serve`: `ca.key` (mode 0600) and
//! `ca.crt` (the workload CA: every node names it in `trust.workload_cas`), `static.key` (the X25519 key
//! requests are sealed to, mode 0600; nodes name its public key in `[issuer] key`).
//!
//! [`Responder`] is the pure part: opening, budgets, replay windows, reassembly and sealing,
//! with time as an argument. [`serve`] is the loop around a socket.

use crate::ca::{self, CaDir};
use crate::Failure;
use anyhow::{anyhow, Context};
use ed25519_dalek::SigningKey;
use keyfile as files;
use proto::armor;
use proto::cert::{CertBody, Certificate};
use proto::control::{self, Datagram, Message, ReplayWindow};
use proto::limiter::SourceLimiter;
use proto::segment::Reassembly;
use rand_core::RngCore;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use x25519_dalek::StaticSecret;

/// Sealed datagrams opened per second (two Diffie-Hellman operations each), in all and per
/// source address: a flood costs the issuer no more.
const OPENS_PER_SEC: u32 = 2_000;
const OPENS_PER_SOURCE_PER_SEC: u32 = 50;
/// Senders whose replay windows are kept; a node's counters follow its clock, so a sender
/// forgotten and heard again is still refused datagrams older than its next one only within
/// this many senders.
const MAX_SENDERS: usize = 65_536;
/// Sealed counters follow the clock at this many per millisecond, as a node's do.
const COUNTER_PER_MS: u64 = 1_000_000;

/// The sealed side of the issuer: who sent what, once, within budget.
pub struct Responder {
    secret: StaticSecret,
    replay: HashMap<[u8; 32], ReplayWindow>,
    reassembly: Reassembly,
    opens: SourceLimiter<()>,
    per_source: SourceLimiter<IpAddr>,
    counter: u64,
}

impl Responder {
    pub fn new(secret: StaticSecret) -> Responder {
        Responder {
            secret,
            replay: HashMap::new(),
            reassembly: Reassembly::default(),
            opens: SourceLimiter::new(OPENS_PER_SEC, OPENS_PER_SEC, 1),
            per_source: SourceLimiter::new(
                OPENS_PER_SOURCE_PER_SEC,
                2 * OPENS_PER_SOURCE_PER_SEC,
                4096,
            ),
            counter: 0,
        }
    }

    /// One datagram from `from`: the sender and its message once a whole message has arrived,
    /// `None` while segments are missing, or why it was dropped.
    pub fn open(
        &mut self,
        now_ms: u64,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Result<Option<([u8; 32], Message)>, String> {
        let Datagram::Sealed(sealed) = control::decode(datagram).map_err(|e| e.to_string())? else {
            return Err("not a sealed datagram".into());
        };
        if !self.per_source.allow(from.ip(), now_ms) || !self.opens.allow((), now_ms) {
            return Err("over budget".into());
        }
        let opened = sealed.open(&self.secret).map_err(|e| e.to_string())?;
        let sender = opened.sender;
        if self
            .replay
            .get(&sender)
            .is_some_and(|w| !w.would_accept(sealed.counter, 1))
        {
            return Err("replayed".into());
        }
        let whole = self
            .reassembly
            .add(sender, sealed.counter, &opened.plaintext, now_ms)
            .map_err(|e| e.to_string())?;
        let Some(whole) = whole else {
            return Ok(None);
        };
        if !self.replay.contains_key(&sender) && self.replay.len() >= MAX_SENDERS {
            self.replay.clear();
        }
        let window = self.replay.entry(sender).or_default();
        if !window.accept_run(whole.first_counter, whole.count) {
            return Err("replayed".into());
        }
        let msg = Message::decode(&whole.message).map_err(|e| e.to_string())?;
        Ok(Some((sender, msg)))
    }

    /// `msg` sealed to `to`, as datagrams.
    pub fn seal(
        &mut self,
        to: &[u8; 32],
        msg: &Message,
        now_ms: u64,
        rng: &mut impl RngCore,
    ) -> Vec<Vec<u8>> {
        let first = (self.counter + 1).max(now_ms.saturating_mul(COUNTER_PER_MS));
        let mut e = [0u8; 32];
        rng.fill_bytes(&mut e);
        match control::seal_message(
            &self.secret,
            to,
            &StaticSecret::from(e),
            first,
            &msg.encode(),
        ) {
            Ok(datagrams) => {
                self.counter = first + datagrams.len() as u64 - 1;
                datagrams
            }
            Err(_) => Vec::new(),
        }
    }
}

/// The issuer's files in a CA directory.
pub struct IssuerDir {
    pub dir: PathBuf,
}

impl IssuerDir {
    pub fn of(ca: &Path) -> IssuerDir {
        IssuerDir {
            dir: ca.join("issuer"),
        }
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn static_key(&self) -> PathBuf {
        self.dir.join("static.key")
    }

    /// The issuer's keys and CA certificate, made now if the directory has none: a workload CA
    /// of the node CA's trust domain and address ranges, valid as long as the node CA.
    pub fn load_or_create(&self, root: &Certificate) -> anyhow::Result<Keys> {
        if !self.ca_key().exists() {
            std::fs::create_dir_all(&self.dir)
                .with_context(|| format!("creating {}", self.dir.display()))?;
            let mut seed = [0u8; 32];
            rand_core::OsRng.fill_bytes(&mut seed);
            let key = SigningKey::from_bytes(&seed);
            let body = CertBody::ca(
                &root.body.trust_domain,
                "workload-issuer",
                key.verifying_key().to_bytes(),
                ca::new_serial(),
                (ca::now(), root.body.not_after),
                root.body.addrs.clone(),
            );
            let cert = body
                .sign(&key)
                .map_err(|e| anyhow!("the workload CA: {e}"))?;
            files::create(
                &self.ca_key(),
                armor::encode(armor::CA_PRIVATE_KEY, &seed).as_bytes(),
                0o600,
            )?;
            files::create(
                &self.ca_cert(),
                armor::encode(armor::CERTIFICATE, &cert.encode()).as_bytes(),
                0o644,
            )?;
        }
        if !self.static_key().exists() {
            let key = proto::Key::generate_private();
            files::create(&self.static_key(), key.to_base64().as_bytes(), 0o600)?;
        }
        let signing = CaDir {
            dir: self.dir.clone(),
        }
        .signing_key()?;
        let text = files::read_secret(&self.static_key())?;
        let key = proto::Key::from_base64(text.trim())
            .map_err(|e| anyhow!("{}: {e}", self.static_key().display()))?;
        Ok(Keys {
            signing,
            secret: StaticSecret::from(key.0),
        })
    }
}

pub struct Keys {
    /// Signs workload certificates (the workload CA's key).
    pub signing: SigningKey,
    /// What requests are sealed to.
    pub secret: StaticSecret,
}

/// Serves requests on `listen` until killed.
pub fn serve(ca_path: &Path, listen: SocketAddr, ttl: &str) -> Result<(), Failure> {
    let lifetime = proto::duration::parse(ttl)
        .map_err(|e| Failure::input(anyhow!("--ttl: {e}")))?
        .as_secs();
    if !(60..=7 * 24 * 3600).contains(&lifetime) {
        return Err(Failure::input(anyhow!(
            "--ttl {ttl}: a workload certificate lives from 1 minute to 7 days"
        )));
    }
    let ca = CaDir {
        dir: ca_path.to_path_buf(),
    };
    let root = ca.certificate().map_err(|e| {
        Failure::input(e.context(format!(
            "{} is not a CA directory (see meshctl ca init)",
            ca_path.display()
        )))
    })?;
    let issuer = IssuerDir::of(ca_path);
    let keys = issuer.load_or_create(&root)?;
    let public = x25519_dalek::PublicKey::from(&keys.secret).to_bytes();
    let socket =
        std::net::UdpSocket::bind(listen).with_context(|| format!("listening on {listen}"))?;
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(1)))
        .context("setting the socket's timeout")?;
    println!(
        "issuing workload certificates of trust domain {} on {listen}",
        root.body.trust_domain
    );
    println!(
        "  key  {} (nodes: [issuer] key)",
        proto::Key(public).to_base64()
    );
    println!(
        "  workload CA {} (name it in every node's trust.workload_cas)",
        issuer.ca_cert().display()
    );
    let (trust, _) = proto::trust::Trust::new(&root.body.trust_domain, vec![root.clone()]);
    let mut responder = Responder::new(keys.secret);
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(anyhow!(e).context("receiving").into()),
        };
        // Wall-clock time: the counters of answers follow it, so that they stay above those
        // before a restart of the issuer.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let (sender, msg) = match responder.open(now_ms, from, &buf[..n]) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(why) => {
                eprintln!("{from}: dropped: {why}");
                continue;
            }
        };
        let Message::IssueRequest {
            nonce,
            certificate,
            workloads,
        } = msg
        else {
            eprintln!("{from}: dropped: not an issue request");
            continue;
        };
        // Read for every request: a workload registered or removed a moment ago counts.
        let results = match ca.revocation_list(&root).and_then(|crl| {
            let registry = crate::workload::load(&crate::workload::registry_path(ca_path))?;
            Ok((crl, registry))
        }) {
            Err(e) => {
                eprintln!("{from}: cannot answer: {e:#}");
                continue;
            }
            Ok((crl, registry)) => {
                let issuance = proto::workload::Issuance {
                    trust_domain: root.body.trust_domain.clone(),
                    node_issuers: vec![root.body.public_key],
                    now: ca::now(),
                    lifetime_secs: lifetime,
                };
                let issuer_key = keys.signing.verifying_key().to_bytes();
                let sign = |g: &proto::workload::Grant| {
                    g.body(ca::new_serial(), issuer_key)
                        .sign(&keys.signing)
                        .map_err(|e| format!("not signed: {e}"))
                };
                proto::workload::answer(
                    &sender,
                    &certificate,
                    &workloads,
                    &trust,
                    crl.as_ref(),
                    &registry,
                    &issuance,
                    sign,
                )
            }
        };
        let node = certificate.body.identity();
        let results = match results {
            Ok(r) => r,
            Err(why) => {
                eprintln!("{from}: {node}: refused: {why}");
                workloads.iter().map(|_| Err(why.clone())).collect()
            }
        };
        for (w, r) in workloads.iter().zip(&results) {
            match r {
                Ok(c) => eprintln!(
                    "{from}: {node}: issued {}/{} as {} ({}), until {}",
                    w.namespace,
                    w.name,
                    c.body.identity(),
                    proto::cert::list(&c.body.addrs),
                    crate::identity::utc(c.body.not_after)
                ),
                Err(why) => eprintln!("{from}: {node}: refused {}/{}: {why}", w.namespace, w.name),
            }
        }
        let answer = Message::IssueAnswer { nonce, results };
        for d in responder.seal(&sender, &answer, now_ms, &mut rand_core::OsRng) {
            if let Err(e) = socket.send_to(&d, from) {
                eprintln!("{from}: answer not sent: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
