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
//! It also answers join requests (PROTOCOL.md §12): a node with a single-use join token (DIR/tokens/,
//! `meshctl ca token create`) is given a node certificate, signed with the CA's key (`ca.key`),
//! for the key that sealed the request; with `--kubernetes`, a node with its projected
//! service-account token ([`kubernetes`]). A node joining again within a minute is given the same
//! certificate ([`joins`]).
//!
//! The sealed side, pure, is [`proto::issuer::Responder`]; [`serve`] is the loop around a
//! socket: it waits for a datagram at most [`POLL`], then answers the joins whose reviews came
//! back.

use crate::ca::{self, CaDir};
use crate::Failure;
use anyhow::{anyhow, Context};
use ed25519_dalek::SigningKey;
use joins::Joins;
use keyfile as files;
use proto::armor;
use proto::cert::{CertBody, Certificate};
use proto::control::{Credential, Issued, Joined, Message};
use proto::issuer::{Opened, Responder};
use rand_core::RngCore;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use x25519_dalek::StaticSecret;

pub mod joins;
mod kubernetes;

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
        let signing = CaDir::of(&self.dir).signing_key()?;
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
/// The Kubernetes source of workloads, and who may join as a node with a projected token.
#[derive(clap::Args)]
pub struct KubeArgs {
    /// Take workloads from the Kubernetes cluster the issuer runs in (or KUBECONFIG's) instead
    /// of the registry: pods, namespaces and nodes, listed and watched; pod addresses from each
    /// node's pod CIDR. Nodes join with their projected service-account token.
    #[arg(long)]
    pub kubernetes: bool,
    /// The namespace of node certificates: a pod on node N runs on NAMESPACE/N.
    #[arg(long, default_value = "nodes", requires = "kubernetes")]
    pub node_namespace: String,
    /// The service account of meshd's DaemonSet, NAMESPACE/NAME: only its tokens join.
    #[arg(long, default_value = "kube-system/meshd", requires = "kubernetes")]
    pub node_service_account: String,
    /// The audience of the projected tokens nodes join with.
    #[arg(long, default_value = "meshd-issuer", requires = "kubernetes")]
    pub audience: String,
    /// How long a node certificate from a projected token lives at most (10m to 7d); never
    /// longer than the token (the DaemonSet renews it at half of its life).
    #[arg(long, default_value = "24h", requires = "kubernetes")]
    pub node_ttl: String,
}

/// `meshctl ca serve --prepare`: the issuer's files, made if missing, and its key.
pub fn prepare(ca_path: &Path) -> Result<(), Failure> {
    let root = ca::root_of(ca_path)?;
    let issuer = IssuerDir::of(ca_path);
    let keys = issuer.load_or_create(&root)?;
    println!(
        "key  {} (nodes: [issuer] key)",
        proto::Key(x25519_dalek::PublicKey::from(&keys.secret).to_bytes()).to_base64()
    );
    println!(
        "workload CA {} (nodes that do not join: trust.workload_cas)",
        issuer.ca_cert().display()
    );
    Ok(())
}

/// Where the issuer takes workloads from.
enum Source {
    Registry(Watched<proto::workload::Registry>),
    Kubernetes(Box<kubernetes::Kubernetes>),
}

/// How long the issuer waits for a datagram before it looks at reviews come back.
const POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// How long a node certificate from a projected token may live, at most and at least.
const NODE_TTL_RANGE: std::ops::RangeInclusive<u64> = 600..=7 * 24 * 3600;

pub fn serve(ca_path: &Path, listen: SocketAddr, ttl: &str, kube: KubeArgs) -> Result<(), Failure> {
    let lifetime = proto::duration::parse(ttl)
        .map_err(|e| Failure::input(anyhow!("--ttl: {e}")))?
        .as_secs();
    if !(60..=7 * 24 * 3600).contains(&lifetime) {
        return Err(Failure::input(anyhow!(
            "--ttl {ttl}: a workload certificate lives from 1 minute to 7 days"
        )));
    }
    if listen.ip().is_unspecified() {
        return Err(Failure::input(anyhow!(
            "--listen {listen}: name the address nodes reach the issuer at (its answers leave \
             from it, and nodes take them only from there)"
        )));
    }
    let root = ca::root_of(ca_path)?;
    let issuer = IssuerDir::of(ca_path);
    let keys = issuer.load_or_create(&root)?;
    let workload_ca = ca::load_certificate(&issuer.ca_cert())?;
    let public = x25519_dalek::PublicKey::from(&keys.secret).to_bytes();
    let source = if kube.kubernetes {
        let node_lifetime = proto::duration::parse(&kube.node_ttl)
            .map_err(|e| Failure::input(anyhow!("--node-ttl: {e}")))?
            .as_secs();
        if !NODE_TTL_RANGE.contains(&node_lifetime) {
            return Err(Failure::input(anyhow!(
                "--node-ttl {}: a node certificate lives from 10 minutes to 7 days",
                kube.node_ttl
            )));
        }
        if !kube.node_service_account.contains('/') {
            return Err(Failure::input(anyhow!(
                "--node-service-account {}: expected NAMESPACE/NAME",
                kube.node_service_account
            )));
        }
        let policy = crate::kube::view::NodePolicy {
            service_account: kube.node_service_account.clone(),
            audience: kube.audience.clone(),
        };
        let source = crate::kube::KubeSource::connect(&kube.node_namespace, policy)?;
        Source::Kubernetes(Box::new(kubernetes::Kubernetes::new(
            source,
            kube.node_namespace.clone(),
            node_lifetime,
        )))
    } else {
        // Read again whenever it changes: a workload registered or removed a moment ago counts.
        Source::Registry(Watched::new(crate::workload::registry_path(ca_path)))
    };
    let socket =
        std::net::UdpSocket::bind(listen).with_context(|| format!("listening on {listen}"))?;
    socket
        .set_read_timeout(Some(POLL))
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
    if kube.kubernetes {
        println!(
            "  workloads from Kubernetes; nodes join as {}/NODE with tokens of {} for {}",
            kube.node_namespace, kube.node_service_account, kube.audience
        );
    }
    let (trust, _) = proto::trust::Trust::new(&root.body.trust_domain, vec![root.clone()]);
    let mut issuer = Issuer {
        ca_path,
        crl: Watched::new(CaDir::of(ca_path).crl_path()),
        root,
        workload_ca,
        trust,
        lifetime,
        responder: Responder::new(keys.secret.clone()),
        keys,
        socket,
        log: Log::default(),
        newest: NewestNodes::default(),
        joins: Joins::default(),
        source,
    };
    let mut buf = vec![0u8; 65_535];
    loop {
        match issuer.socket.recv_from(&mut buf) {
            Ok((n, from)) => issuer.datagram(&buf[..n], from),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(anyhow!(e).context("receiving").into()),
        }
        issuer.poll();
    }
}

/// The running issuer: its keys and CA, its socket, and what it keeps while it runs.
struct Issuer<'a> {
    ca_path: &'a Path,
    root: Certificate,
    workload_ca: Certificate,
    trust: proto::trust::Trust,
    crl: Watched<Option<proto::cert::RevocationList>>,
    /// How long a workload certificate lives.
    lifetime: u64,
    keys: Keys,
    socket: std::net::UdpSocket,
    responder: Responder,
    log: Log,
    newest: NewestNodes,
    joins: Joins,
    source: Source,
}

/// Wall-clock milliseconds: the counters of answers follow it, so that they stay above those
/// before a restart of the issuer.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Issuer<'_> {
    /// One datagram from `from`.
    fn datagram(&mut self, datagram: &[u8], from: SocketAddr) {
        let now_ms = now_ms();
        let opened = match self.responder.open(now_ms, from, datagram) {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(dropped) => {
                if let Some(reply) = &dropped.reply {
                    let _ = self.socket.send_to(reply, from);
                }
                self.log.line(now_ms, format!("{from}: dropped: {dropped}"));
                return;
            }
        };
        match &opened.msg {
            Message::JoinRequest { credential, .. } => match credential {
                Credential::Token(secret) => {
                    let result =
                        crate::join::answer_token(self.ca_path, secret, &opened.sender, ca::now());
                    self.joined(opened, from, result, now_ms);
                }
                Credential::ServiceAccount { token: jwt, held } => {
                    let Source::Kubernetes(k) = &mut self.source else {
                        let why = "this issuer takes join tokens only (it has no Kubernetes \
                                       source)";
                        self.joined(opened, from, Err(why.into()), now_ms);
                        return;
                    };
                    // Known as a node: holds a live node certificate of ours, from a join here
                    // or shown with the request (a renewal after this issuer restarted), and is
                    // not revoked (a revoked node's key is a stranger's). Asked only once the
                    // token's claims passed, so a shown certificate costs its signature check
                    // only then.
                    let (root, now, sender) = (&self.root, now_ms / 1000, opened.sender);
                    let crl = self.crl.get(|p| read_crl(p, root)).ok();
                    let revoked =
                        crl.is_none_or(|c| c.as_ref().is_some_and(|l| l.revokes_key(&sender)));
                    let remembered = self.joins.known(&sender, now).map(str::to_string);
                    let log = &mut self.log;
                    let held = held.clone();
                    let mut known_as = || -> Option<String> {
                        if revoked {
                            return None;
                        }
                        if remembered.is_some() {
                            return remembered.clone();
                        }
                        let c = held.as_deref()?;
                        let crl = crl.and_then(|c| c.as_ref());
                        if !shows_key(c, &sender, root, crl, now) {
                            return None;
                        }
                        let key = proto::Key(sender).to_base64();
                        log.line(
                            now_ms,
                            format!("{from}: key {key}: shows its node certificate: a renewal"),
                        );
                        Some(format!("{}/{}", c.body.namespace, c.body.name))
                    };
                    let jwt = jwt.clone();
                    match k.join(
                        self.ca_path,
                        &mut self.joins,
                        &jwt,
                        opened,
                        &mut known_as,
                        from,
                        now_ms,
                    ) {
                        kubernetes::Step::Answer(opened, result) => {
                            self.joined(opened, from, result, now_ms)
                        }
                        kubernetes::Step::Asked => {}
                        kubernetes::Step::Dropped(why) => self
                            .log
                            .line(now_ms, format!("{from}: join dropped: {why}")),
                    }
                }
            },
            Message::IssueRequest { .. } => self.issue(opened, from, now_ms),
            _ => self
                .log
                .line(now_ms, format!("{from}: dropped: not a request")),
        }
    }

    /// Answers the joins whose reviews came back, and whatever else waits on time.
    fn poll(&mut self) {
        let Source::Kubernetes(k) = &mut self.source else {
            return;
        };
        let now_ms = now_ms();
        for (opened, from, result) in k.poll(self.ca_path, &mut self.joins, now_ms) {
            self.joined(opened, from, result, now_ms);
        }
    }

    /// Answers the join `opened` with `result`.
    fn joined(
        &mut self,
        opened: Opened,
        from: SocketAddr,
        result: Result<Certificate, String>,
        now_ms: u64,
    ) {
        let Message::JoinRequest { nonce, .. } = opened.msg else {
            return;
        };
        // Counters are taken only once a token proved good: senders with throwaway keys
        // never fill the table of replay windows.
        if result.is_ok() && !self.responder.confirm(&opened) {
            return;
        }
        let key = proto::Key(opened.sender).to_base64();
        match &result {
            Ok(c) => self.log.line(
                now_ms,
                format!(
                    "{from}: key {key}: joined as {} ({}), until {}",
                    c.body.identity(),
                    proto::cert::list(&c.body.addrs),
                    crate::identity::utc(c.body.not_after)
                ),
            ),
            Err(why) => self
                .log
                .line(now_ms, format!("{from}: key {key}: join refused: {why}")),
        }
        let answer = Message::JoinAnswer {
            nonce,
            result: result.map(|certificate| Joined {
                certificate,
                ca: self.root.clone(),
                workload_ca: self.workload_ca.clone(),
            }),
        };
        self.send(&opened.sender, from, &answer, now_ms);
    }

    /// Answers a node's request for workload certificates.
    fn issue(&mut self, opened: Opened, from: SocketAddr, now_ms: u64) {
        let Message::IssueRequest {
            nonce,
            certificate,
            workloads,
        } = &opened.msg
        else {
            return;
        };
        let node = certificate.body.identity();
        let root = &self.root;
        let crl = match self.crl.get(|p| read_crl(p, root)) {
            Ok(c) => c.clone(),
            Err(e) => {
                self.log
                    .line(now_ms, format!("{from}: cannot answer: {e:#}"));
                return;
            }
        };
        let now = ca::now();
        // The node first, before anything is read for it: a sender that is not one gets one
        // short refusal per workload asked, never more than it sent.
        let checked = proto::workload::check_node(
            &opened.sender,
            certificate,
            &self.trust,
            crl.as_ref(),
            now,
        )
        .and_then(|()| self.newest.check(&certificate.body));
        let results: Vec<Issued> = match checked {
            Err(why) => {
                self.log
                    .line(now_ms, format!("{from}: {node}: refused: {why}"));
                workloads
                    .iter()
                    .map(|_| Issued::Refused("node refused".to_string()))
                    .collect()
            }
            Ok(()) if !self.responder.confirm(&opened) => return,
            Ok(()) => {
                let held;
                // What a Kubernetes source says instead while it cannot decide yet.
                let (mut listed, mut assigning) = (true, true);
                let view: &dyn proto::workload::WorkloadView = match &mut self.source {
                    Source::Registry(registry) => match registry.get(crate::workload::load) {
                        Ok(r) => r,
                        Err(e) => {
                            self.log
                                .line(now_ms, format!("{from}: cannot answer: {e:#}"));
                            return;
                        }
                    },
                    Source::Kubernetes(k) => {
                        held = k.source.view.lock().unwrap_or_else(|e| e.into_inner());
                        (listed, assigning) = (held.ready(), held.assigning());
                        &*held
                    }
                };
                let issuance = proto::workload::Issuance {
                    trust_domain: self.root.body.trust_domain.clone(),
                    node_issuers: vec![self.root.body.public_key],
                    now,
                    lifetime_secs: self.lifetime,
                };
                let issuer_key = self.keys.signing.verifying_key().to_bytes();
                let log = &mut self.log;
                let signing = &self.keys.signing;
                workloads
                    .iter()
                    .map(|w| {
                        use proto::workload::Refusal;
                        // Not decided yet: the node keeps what it holds and asks again.
                        let r =
                            match proto::workload::authorize(&certificate.body, w, view, &issuance)
                            {
                                Err(Refusal::UnknownWorkload { .. }) if !listed => Issued::Later(
                                    "the issuer has not listed the cluster yet".into(),
                                ),
                                Err(e @ Refusal::NoAddress { .. }) if !assigning => {
                                    Issued::Later(format!(
                                        "{e} (a restarted issuer assigns addresses after {} s)",
                                        kubernetes::ASSIGN_GRACE.as_secs()
                                    ))
                                }
                                Err(e) => Issued::Refused(e.to_string()),
                                Ok(g) => match g.body(ca::new_serial(), issuer_key).sign(signing) {
                                    Ok(c) => Issued::Certificate(c),
                                    Err(e) => Issued::Refused(format!("not signed: {e}")),
                                },
                            };
                        log.line(
                            now_ms,
                            match &r {
                                Issued::Certificate(c) => format!(
                                    "{from}: {node}: issued {}/{} as {} ({}), until {}",
                                    w.namespace,
                                    w.name,
                                    c.body.identity(),
                                    proto::cert::list(&c.body.addrs),
                                    crate::identity::utc(c.body.not_after)
                                ),
                                Issued::Refused(why) => format!(
                                    "{from}: {node}: refused {}/{}: {why}",
                                    w.namespace, w.name
                                ),
                                Issued::Later(why) => format!(
                                    "{from}: {node}: not yet {}/{}: {why}",
                                    w.namespace, w.name
                                ),
                            },
                        );
                        r
                    })
                    .collect()
            }
        };
        let answer = Message::IssueAnswer {
            nonce: *nonce,
            results,
        };
        self.send(&opened.sender, from, &answer, now_ms);
    }

    /// Seals `answer` to `to` and sends it to `from`.
    fn send(&mut self, to: &[u8; 32], from: SocketAddr, answer: &Message, now_ms: u64) {
        let datagrams = self
            .responder
            .seal(to, answer, now_ms, &mut rand_core::OsRng);
        if datagrams.is_empty() {
            self.log.line(
                now_ms,
                format!("{from}: the answer is too large to seal; ask for fewer workloads at once"),
            );
        }
        for d in datagrams {
            if let Err(e) = self.socket.send_to(&d, from) {
                self.log
                    .line(now_ms, format!("{from}: answer not sent: {e}"));
            }
        }
    }
}

/// The log of requests: at most [`LOG_LINES_PER_SEC`] lines a second, then how many were left
/// out, so that a flood does not fill the disk.
#[derive(Default)]
struct Log {
    second: u64,
    lines: u32,
    left_out: u64,
}

const LOG_LINES_PER_SEC: u32 = 20;

impl Log {
    fn line(&mut self, now_ms: u64, text: String) {
        let second = now_ms / 1000;
        if second != self.second {
            if self.left_out > 0 {
                eprintln!("({} lines left out)", self.left_out);
            }
            (self.second, self.lines, self.left_out) = (second, 0, 0);
        }
        if self.lines < LOG_LINES_PER_SEC {
            self.lines += 1;
            eprintln!("{text}");
        } else {
            self.left_out += 1;
        }
    }
}

/// A file read again only when its modification time changes.
struct Watched<T> {
    path: PathBuf,
    stamp: Option<std::time::SystemTime>,
    value: Option<T>,
}

impl<T> Watched<T> {
    fn new(path: PathBuf) -> Watched<T> {
        Watched {
            path,
            stamp: None,
            value: None,
        }
    }

    fn get(&mut self, read: impl FnOnce(&Path) -> anyhow::Result<T>) -> anyhow::Result<&T> {
        let stamp = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if self.value.is_none() || stamp != self.stamp {
            self.value = Some(read(&self.path)?);
            self.stamp = stamp;
        }
        Ok(self.value.as_ref().expect("read above"))
    }
}

/// The revocation list of the node CA, if it has one.
/// Whether `held` is a node certificate of `root`'s, in force at `now` and not revoked, that
/// binds `key` (the key the request was sealed with: only its holder can show it). The cheap
/// checks first; one signature at most.
pub(crate) fn shows_key(
    held: &Certificate,
    key: &[u8; 32],
    root: &Certificate,
    crl: Option<&proto::cert::RevocationList>,
    now: u64,
) -> bool {
    let b = &held.body;
    b.public_key == *key
        && b.issuer == root.body.public_key
        && (b.not_before..=b.not_after).contains(&now)
        && held
            .verify_identity(std::slice::from_ref(root), now, crl)
            .is_ok()
}

fn read_crl(
    path: &Path,
    root: &Certificate,
) -> anyhow::Result<Option<proto::cert::RevocationList>> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = armor::decode(armor::REVOCATION_LIST, &files::read(path)?)
        .with_context(|| format!("{}", path.display()))?;
    let crl = proto::cert::RevocationList::decode(&bytes)
        .with_context(|| format!("{}", path.display()))?;
    crl.verify(root)
        .with_context(|| format!("{}: not signed by the node CA", path.display()))?;
    Ok(Some(crl))
}

/// The newest certificate seen of each node (by `not_before`, then serial): an older one, such
/// as one whose key was replaced (stolen, rotated), is refused from then on, as members refuse
/// it. Kept while the issuer runs.
#[derive(Default)]
struct NewestNodes(std::collections::HashMap<String, (u64, u64)>);

impl NewestNodes {
    fn check(&mut self, node: &CertBody) -> Result<(), String> {
        let rank = (node.not_before, node.serial);
        let newest = self.0.entry(node.identity()).or_insert(rank);
        if rank < *newest {
            return Err(format!(
                "an older certificate of {} than one seen (serial {})",
                node.identity(),
                newest.1
            ));
        }
        *newest = rank;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(not_before: u64, serial: u64) -> CertBody {
        CertBody::ca(
            "example.org",
            "node-a",
            [1; 32],
            serial,
            (not_before, not_before + 10),
            vec![],
        )
    }

    #[test]
    fn an_older_node_certificate_is_refused_once_a_newer_one_asked() {
        let mut n = NewestNodes::default();
        assert!(n.check(&node(10, 1)).is_ok());
        assert!(n.check(&node(20, 2)).is_ok());
        let e = n.check(&node(10, 1)).unwrap_err();
        assert!(
            e.contains("older certificate") && e.contains("serial 2"),
            "{e}"
        );
        assert!(n.check(&node(20, 2)).is_ok(), "the newest again");
    }

    #[test]
    fn a_watched_file_is_read_again_only_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("meshctl-watched-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, "a").unwrap();
        let mut w = Watched::new(path.clone());
        let mut reads = 0;
        let mut read = |p: &Path| {
            reads += 1;
            Ok(std::fs::read_to_string(p)?)
        };
        assert_eq!(w.get(&mut read).unwrap(), "a");
        assert_eq!(w.get(&mut read).unwrap(), "a");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "b").unwrap();
        let t = std::time::SystemTime::now() + std::time::Duration::from_secs(1);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(t)
            .unwrap();
        assert_eq!(w.get(&mut read).unwrap(), "b");
        drop(w);
        assert_eq!(reads, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
