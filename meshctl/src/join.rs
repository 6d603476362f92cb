//! Joining without copying keys (PROTOCOL.md §12): `meshctl ca token create` makes a single-use
//! join token for one node identity; `meshctl join` on the node makes the node's key pair there,
//! and trades the token for a certificate binding it, from the online issuer (`meshctl ca
//! serve`), over the sealed control channel. The private key never leaves the node; the CA keeps
//! only a verifier of each token's secret.

use crate::ca::{self, CaDir};
use crate::identity::{FieldArgs, Fields, DEFAULT_IDENTITY_TTL};
use crate::issuer::joins::Joins;
use crate::issuer::IssuerDir;
use crate::Failure;
use anyhow::{anyhow, bail, Context};
use keyfile as files;
use proto::armor;
use proto::cert::Certificate;
use proto::control::{self, Credential, Datagram, Joined, Message};
use proto::join::{Invitation, Token};
use proto::Key;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use x25519_dalek::StaticSecret;

#[derive(clap::Args)]
pub struct TokenArgs {
    /// The CA directory: the token is filed in DIR/tokens/ (mode 0600, a verifier only).
    #[arg(long, value_name = "DIR")]
    pub ca: PathBuf,
    #[command(flatten)]
    pub fields: FieldArgs,
    /// How long the token may be redeemed, e.g. 1h, 15m.
    #[arg(long, default_value = "1h")]
    pub ttl: String,
    /// How long the node certificate it is redeemed for lives.
    #[arg(long, default_value = DEFAULT_IDENTITY_TTL)]
    pub cert_ttl: String,
    /// The issuer's underlay address, written into the token so that `meshctl join` needs
    /// nothing else.
    #[arg(long, value_name = "IP:PORT")]
    pub issuer: Option<SocketAddr>,
}

/// The directory of a CA's outstanding and redeemed tokens.
pub fn tokens_dir(ca: &Path) -> PathBuf {
    ca.join("tokens")
}

/// A token as the CA files it: what it invites, and the verifier of its secret.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    verifier: String,
    expires: u64,
    namespace: String,
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    addrs: Vec<String>,
    #[serde(default)]
    routes: Vec<String>,
    #[serde(default)]
    ports: Vec<String>,
    lifetime_secs: u64,
    #[serde(default)]
    redeemed_by: Option<String>,
}

impl TokenFile {
    fn of(inv: &Invitation) -> TokenFile {
        let texts = |v: &[proto::Cidr]| v.iter().map(|c| c.to_string()).collect();
        TokenFile {
            verifier: hex::encode(inv.verifier),
            expires: inv.expires,
            namespace: inv.namespace.clone(),
            name: inv.name.clone(),
            labels: inv.labels.clone(),
            addrs: texts(&inv.addrs),
            routes: texts(&inv.routes),
            ports: inv.ports.iter().map(|p| p.to_string()).collect(),
            lifetime_secs: inv.lifetime_secs,
            redeemed_by: inv.redeemed_by.map(|k| Key(k).to_base64()),
        }
    }

    fn invitation(self) -> anyhow::Result<Invitation> {
        let cidrs = |v: &[String]| -> anyhow::Result<Vec<proto::Cidr>> {
            v.iter()
                .map(|c| c.parse().map_err(|e| anyhow!("`{c}`: {e}")))
                .collect()
        };
        let mut verifier = [0u8; 32];
        hex::decode_to_slice(&self.verifier, &mut verifier)
            .map_err(|e| anyhow!("verifier: {e}"))?;
        Ok(Invitation {
            verifier,
            expires: self.expires,
            namespace: self.namespace,
            name: self.name,
            labels: self.labels,
            addrs: cidrs(&self.addrs)?,
            routes: cidrs(&self.routes)?,
            ports: self
                .ports
                .iter()
                .map(|p| p.parse().map_err(|e| anyhow!("port `{p}`: {e}")))
                .collect::<anyhow::Result<_>>()?,
            lifetime_secs: self.lifetime_secs,
            redeemed_by: self
                .redeemed_by
                .map(|k| Key::from_base64(&k).map(|k| k.0))
                .transpose()
                .map_err(|e| anyhow!("redeemed_by: {e}"))?,
        })
    }
}

/// The token filed under `id` in `dir`, if there is one.
pub fn load_token(dir: &Path, id: &str) -> anyhow::Result<Option<Invitation>> {
    // An id is 32 hex digits (what token_id makes); anything else names no file.
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let path = dir.join(format!("{id}.json"));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow!(e).context(format!("reading {}", path.display()))),
    };
    let file: TokenFile =
        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    file.invitation()
        .with_context(|| format!("{}", path.display()))
        .map(Some)
}

/// Files `inv` under `id` in `dir`, replacing what was there, readable by the owner only.
pub fn save_token(dir: &Path, id: &str, inv: &Invitation) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = serde_json::to_string_pretty(&TokenFile::of(inv))?;
    files::replace(&dir.join(format!("{id}.json")), text.as_bytes(), 0o600)?;
    Ok(())
}

/// `meshctl ca token create`.
pub fn create(a: TokenArgs) -> Result<(), Failure> {
    let input = |e: anyhow::Error| Failure::input(e);
    let ttl = proto::duration::parse(&a.ttl).map_err(|e| input(anyhow!("--ttl: {e}")))?;
    let lifetime =
        proto::duration::parse(&a.cert_ttl).map_err(|e| input(anyhow!("--cert-ttl: {e}")))?;
    let Fields {
        namespace,
        name,
        labels,
        addrs,
        routes,
        ports,
    } = a.fields.parse()?;
    let root = ca::root_of(&a.ca)?;
    let mut secret = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut secret);
    let now = ca::now();
    let invitation = Invitation {
        verifier: proto::join::verifier(&secret),
        expires: now.saturating_add(ttl.as_secs()),
        namespace,
        name,
        labels,
        addrs,
        routes,
        ports,
        lifetime_secs: lifetime.as_secs(),
        redeemed_by: None,
    };
    // The certificate it will make must be one this CA may grant: said now, not at the node.
    let example = proto::join::node_body(
        &invitation,
        &root.body.trust_domain,
        [0; 32],
        root.body.public_key,
        0,
        now,
        root.body.not_after,
    );
    proto::cert::check_ranges(&root.body, &example).map_err(|e| input(anyhow!("--ip: {e}")))?;
    let keys = IssuerDir::of(&a.ca).load_or_create(&root)?;
    let token = Token {
        secret,
        issuer_key: x25519_dalek::PublicKey::from(&keys.secret).to_bytes(),
        endpoint: a.issuer,
    };
    let id = proto::join::token_id(&secret);
    save_token(&tokens_dir(&a.ca), &id, &invitation)?;
    eprintln!(
        "token {id} for {} until {} (single use; redeem with meshctl join{})",
        example.identity(),
        crate::identity::utc(invitation.expires),
        if a.issuer.is_some() {
            ""
        } else {
            " --issuer IP:PORT"
        }
    );
    println!("{}", token.encode());
    Ok(())
}

/// What the issuer answers a join request with: the node certificate for `sender`, or why not.
///
/// A token gives one certificate, ever. Its first redemption signs it and files it beside the
/// token (`tokens/<id>.crt`), under the CA directory's lock, so of two issuers on one CA
/// directory one redeems the token first and the other sees it redeemed; the same key redeeming
/// again (its answer was lost) is given that certificate again, unless it was revoked or expired
/// meanwhile: revoking it by serial stops the token too.
pub fn answer_token(
    ca_path: &Path,
    secret: &[u8; 32],
    sender: &[u8; 32],
    now: u64,
) -> Result<Certificate, String> {
    let dir = tokens_dir(ca_path);
    let id = proto::join::token_id(secret);
    let read = |dir: &Path| {
        load_token(dir, &id)
            .map_err(|e| format!("the issuer cannot read its tokens: {e:#}"))?
            .ok_or_else(|| proto::join::JoinRefusal::Unknown.to_string())
    };
    // Refused before the lock is taken: a stranger's guess costs one file lookup.
    proto::join::redeem(&read(&dir)?, secret, sender, now).map_err(|e| e.to_string())?;
    let ca_dir = CaDir::of(ca_path);
    let (root, crl) = ca_dir
        .certificate_and_crl()
        .map_err(|e| format!("the issuer cannot read its CA: {e:#}"))?;
    let cert_path = dir.join(format!("{id}.crt"));
    let locked = ca_dir
        .lock()
        .map_err(|e| format!("the issuer cannot lock its CA directory: {e:#}"))?;
    let mut invitation = read(&dir)?;
    proto::join::redeem(&invitation, secret, sender, now).map_err(|e| e.to_string())?;
    if cert_path.exists() {
        let given = ca::load_certificate(&cert_path).map_err(|e| format!("{e:#}"))?;
        // Only ever to the key it binds, whatever a crash left in the token's file.
        if given.body.public_key != *sender {
            return Err(proto::join::JoinRefusal::Used.to_string());
        }
        if crl.as_ref().is_some_and(|l| l.revokes(&given.body)) {
            return Err("the certificate this token was redeemed for is revoked".into());
        }
        if given.body.not_after < now {
            return Err(
                "the certificate this token was redeemed for has expired; ask for a new token"
                    .into(),
            );
        }
        return Ok(given);
    }
    let cert = node_certificate(&ca_dir, &root, crl.as_ref(), &invitation, sender, now)?;
    // Filed before it is answered, the key first: a second key is refused even if this answer
    // is lost or the issuer stops between the two writes.
    invitation.redeemed_by = Some(*sender);
    save_token(&dir, &id, &invitation).map_err(|e| format!("token not updated: {e:#}"))?;
    files::create(
        &cert_path,
        armor::encode(armor::CERTIFICATE, &cert.encode()).as_bytes(),
        0o600,
    )
    .map_err(|e| format!("token not updated: {e:#}"))?;
    drop(locked);
    ca_dir
        .record(&cert.body)
        .map_err(|e| format!("not recorded: {e:#}"))?;
    Ok(cert)
}

/// What a Kubernetes node whose projected token the API server vouched for is given: the
/// certificate of `namespace/name` with `addrs`, for `lifetime_secs` (sign it with
/// [`sign_node`]).
pub fn node_invitation(
    namespace: &str,
    name: &str,
    addrs: Vec<proto::Cidr>,
    lifetime_secs: u64,
) -> Invitation {
    Invitation {
        verifier: [0; 32],
        expires: 0,
        namespace: namespace.to_string(),
        name: name.to_string(),
        labels: BTreeMap::new(),
        addrs,
        routes: Vec::new(),
        ports: Vec::new(),
        lifetime_secs,
        redeemed_by: None,
    }
}

/// The node certificate `invitation` makes for `sender`, signed with the CA's key within its
/// scope; none for a revoked key (a node cut off), whatever it shows.
fn node_certificate(
    ca_dir: &CaDir,
    root: &Certificate,
    crl: Option<&proto::cert::RevocationList>,
    invitation: &Invitation,
    sender: &[u8; 32],
    now: u64,
) -> Result<Certificate, String> {
    if crl.is_some_and(|l| l.revokes_key(sender)) {
        return Err("this key is revoked".into());
    }
    let key = ca_dir
        .signing_key()
        .map_err(|e| format!("the issuer cannot sign node certificates: {e:#}"))?;
    let body = proto::join::node_body(
        invitation,
        &root.body.trust_domain,
        *sender,
        root.body.public_key,
        ca::new_serial(),
        now,
        root.body.not_after,
    );
    proto::cert::check_ranges(&root.body, &body).map_err(|e| e.to_string())?;
    body.sign(&key).map_err(|e| format!("not signed: {e}"))
}

/// The node certificate `invitation` makes for `sender`, signed and recorded; or the one given
/// to it a moment ago ([`Joins`]), unless that was revoked meanwhile.
pub fn sign_node(
    ca_path: &Path,
    joins: &mut Joins,
    invitation: &Invitation,
    sender: &[u8; 32],
    now: u64,
) -> Result<Certificate, String> {
    let ca_dir = CaDir::of(ca_path);
    let (root, crl) = ca_dir
        .certificate_and_crl()
        .map_err(|e| format!("the issuer cannot read its CA: {e:#}"))?;
    let identity = format!("{}/{}", invitation.namespace, invitation.name);
    let cert = joins.answer(&identity, sender, now, || {
        let cert = node_certificate(&ca_dir, &root, crl.as_ref(), invitation, sender, now)?;
        ca_dir
            .record(&cert.body)
            .map_err(|e| format!("not recorded: {e:#}"))?;
        Ok(cert)
    })?;
    if crl.is_some_and(|l| l.revokes(&cert.body)) {
        return Err("this key or its certificate is revoked".into());
    }
    Ok(cert)
}

#[derive(clap::Args)]
pub struct JoinArgs {
    /// The join token (from meshctl ca token create); it shows in the process list, so prefer
    /// --token-file on a shared host.
    #[arg(long, group = "credential")]
    pub token: Option<String>,
    /// A file holding the join token.
    #[arg(long, value_name = "FILE", group = "credential")]
    pub token_file: Option<PathBuf>,
    /// Join as a Kubernetes node with this projected service-account token file (meshd's
    /// DaemonSet); the issuer asks the API server whose it is and which node it is bound to.
    #[arg(long, value_name = "FILE", group = "credential")]
    pub service_account_token: Option<PathBuf>,
    /// The issuer's underlay address, if the token does not name it (or to override it); again
    /// for each host it may run on, asked in turn while it does not answer.
    #[arg(long, value_name = "IP:PORT")]
    pub issuer: Vec<SocketAddr>,
    /// The issuer's public key (what `meshctl ca serve` prints), when no join token names it.
    #[arg(long, value_name = "KEY")]
    pub issuer_key: Option<String>,
    /// Take the issuer's address and key from meshd's configuration (its [issuer] section)
    /// where --issuer or --issuer-key is not given.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Keep the certificate renewed: join again at half its life (reading the token file again,
    /// as the kubelet rotates it), and retry every 30 s while the issuer does not answer;
    /// meshd takes the new certificate with `reload_on_change`.
    #[arg(long, requires = "service_account_token")]
    pub renew: bool,
    /// Where to write node.key (made here, mode 0600, kept if there), node.crt, ca.crt and
    /// workload-ca.crt.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// How long to keep asking.
    #[arg(long, default_value = "30s")]
    pub wait: String,
}

/// `meshctl join`.
pub fn join(a: JoinArgs) -> Result<(), Failure> {
    let input = |e: anyhow::Error| Failure::input(e);
    let token = match (&a.token, &a.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => Some(files::read_secret(f)?),
        (None, None) => None,
    }
    .map(|t| Token::parse(&t).map_err(|e| input(anyhow!("the join token: {e}"))))
    .transpose()?;
    if token.is_none() && a.service_account_token.is_none() {
        return Err(input(anyhow!(
            "--token, --token-file or --service-account-token is needed"
        )));
    }
    let wait = proto::duration::parse(&a.wait).map_err(|e| input(anyhow!("--wait: {e}")))?;
    let configured = match &a.config {
        Some(path) => configured_issuer(path).map_err(input)?,
        None => (Vec::new(), None),
    };
    let issuer: Vec<SocketAddr> = [
        a.issuer.clone(),
        configured.0,
        token
            .as_ref()
            .and_then(|t| t.endpoint)
            .into_iter()
            .collect(),
    ]
    .into_iter()
    .find(|list| !list.is_empty())
    .ok_or_else(|| {
        input(anyhow!(
            "no issuer address: give --issuer IP:PORT (or --config, or a token that names it)"
        ))
    })?;
    // What meshd takes in [issuer] endpoints, which this prints.
    if issuer.len() > MAX_ISSUER_ADDRESSES {
        return Err(input(anyhow!(
            "the issuer's addresses (--issuer, or [issuer] endpoints): more than \
             {MAX_ISSUER_ADDRESSES}"
        )));
    }
    if let Some(twice) = issuer
        .iter()
        .enumerate()
        .find(|(n, a)| issuer[..*n].contains(a))
    {
        return Err(input(anyhow!(
            "the issuer's addresses (--issuer, or [issuer] endpoints): {} is given twice",
            twice.1
        )));
    }
    let issuer_key = match (a.issuer_key.as_ref().or(configured.1.as_ref()), &token) {
        (Some(k), _) => {
            Key::from_base64(k.trim())
                .map_err(|e| input(anyhow!("the issuer's key: {e}")))?
                .0
        }
        (None, Some(t)) => t.issuer_key,
        (None, None) => {
            return Err(input(anyhow!(
                "no issuer key: give --issuer-key KEY (or --config, or a join token)"
            )))
        }
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    // Absolute, so that the configuration it prints holds from anywhere.
    let out =
        std::fs::canonicalize(&a.out).with_context(|| format!("finding {}", a.out.display()))?;
    let key_path = out.join("node.key");
    // The key is made here and stays: asking again (a lost answer, a second run) binds the same.
    let private = if key_path.exists() {
        let t = files::read_secret(&key_path)?;
        Key::from_base64(t.trim()).map_err(|e| input(anyhow!("{}: {e}", key_path.display())))?
    } else {
        let k = Key::generate_private();
        files::create(&key_path, format!("{k}\n").as_bytes(), 0o600)?;
        k
    };
    let secret = StaticSecret::from(private.0);
    // The node certificate held (a renewal, or a join again after a restart), shown with a
    // projected token so that the issuer knows the key even if it restarted since.
    // With a certificate held, also the plain credential, for an issuer that does not take
    // the renewal's.
    let credential = |held: Option<&Certificate>| -> Result<Vec<Credential>, Failure> {
        Ok(match (&token, &a.service_account_token) {
            (Some(t), _) => vec![Credential::Token(t.secret)],
            (None, Some(f)) => {
                let jwt = files::read_secret(f)?;
                let jwt = jwt.trim();
                if jwt.len() > control::MAX_SA_TOKEN_BYTES {
                    return Err(input(anyhow!(
                        "{}: longer than a service-account token may be",
                        f.display()
                    )));
                }
                let held = held
                    .filter(|c| c.body.public_key == private.public().0)
                    .filter(|c| c.body.not_after > ca::now())
                    .map(|c| Box::new(c.clone()));
                let plain = Credential::ServiceAccount {
                    token: jwt.to_string(),
                    held: None,
                };
                match held {
                    Some(held) => vec![
                        Credential::ServiceAccount {
                            token: jwt.to_string(),
                            held: Some(held),
                        },
                        plain,
                    ],
                    None => vec![plain],
                }
            }
            (None, None) => unreachable!("checked above"),
        })
    };
    let write = |joined: &Joined| -> Result<(), Failure> {
        check(joined, &private.public().0)?;
        let pem = |c: &Certificate| armor::encode(armor::CERTIFICATE, &c.encode());
        // The CAs first, the node's certificate last: a reload that sees the new certificate
        // sees the CAs it verifies against.
        for (file, cert) in [
            ("ca.crt", &joined.ca),
            ("workload-ca.crt", &joined.workload_ca),
            ("node.crt", &joined.certificate),
        ] {
            files::replace(&out.join(file), pem(cert).as_bytes(), 0o644)?;
        }
        println!(
            "joined as {} ({}), until {}",
            joined.certificate.body.identity(),
            proto::cert::list(&joined.certificate.body.addrs),
            crate::identity::utc(joined.certificate.body.not_after)
        );
        Ok(())
    };
    let held = ca::load_certificate(&out.join("node.crt")).ok();
    // The address that answered last is asked first the next time.
    let mut first = 0;
    let joined = ask(
        &secret,
        &issuer_key,
        &issuer,
        &mut first,
        &credential(held.as_ref())?,
        wait,
    )?;
    write(&joined)?;
    let d = |f: &str| out.join(f).display().to_string();
    let endpoints = match &issuer[..] {
        [one] => format!("endpoint = \"{one}\""),
        many => format!(
            "endpoints = [{}]",
            many.iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    println!(
        "# for meshd's configuration:\n[identity]\ncertificate = \"{}\"\nprivate_key = \"{}\"\n\n\
         [trust]\nbundle = [\"{}\"]\nworkload_cas = [\"{}\"]\n\n[issuer]\n{endpoints}\n\
         key = \"{}\"",
        d("node.crt"),
        d("node.key"),
        d("ca.crt"),
        d("workload-ca.crt"),
        Key(issuer_key).to_base64()
    );
    if !a.renew {
        return Ok(());
    }
    let mut current = joined.certificate;
    loop {
        let b = &current.body;
        let half = b.not_before + (b.not_after.saturating_sub(b.not_before)) / 2;
        std::thread::sleep(Duration::from_secs(half.saturating_sub(ca::now()).max(1)));
        // Until renewed: every 30 s (the certificate stays in force meanwhile).
        loop {
            let renewed = credential(Some(&current))
                .and_then(|c| ask(&secret, &issuer_key, &issuer, &mut first, &c, wait))
                .and_then(|j| write(&j).map(|()| j));
            match renewed {
                Ok(j) => {
                    current = j.certificate;
                    break;
                }
                Err(f) => {
                    eprintln!("meshctl: renewal: {:#} (again in 30 s)", f.error);
                    std::thread::sleep(Duration::from_secs(30));
                }
            }
        }
    }
}

/// The issuer's addresses and key in meshd's configuration `path` ([issuer] endpoint or
/// endpoints, and key).
fn configured_issuer(path: &Path) -> anyhow::Result<(Vec<SocketAddr>, Option<String>)> {
    let text = files::read(path)?;
    let doc: toml::Table = text
        .parse()
        .with_context(|| format!("{}: not TOML", path.display()))?;
    let Some(issuer) = doc.get("issuer").and_then(|i| i.as_table()) else {
        bail!("{}: no [issuer] section", path.display());
    };
    let listed: Vec<&toml::Value> = match (issuer.get("endpoint"), issuer.get("endpoints")) {
        (Some(one), None) => vec![one],
        (None, Some(toml::Value::Array(many))) if !many.is_empty() => many.iter().collect(),
        (None, Some(toml::Value::Array(_))) => {
            bail!("{}: [issuer] endpoints is empty", path.display())
        }
        (None, None) => Vec::new(),
        (None, Some(_)) => bail!(
            "{}: [issuer] endpoints must be a list of IP:PORT",
            path.display()
        ),
        (Some(_), Some(_)) => bail!(
            "{}: [issuer] takes endpoint (IP:PORT) or endpoints (a list of them), not both",
            path.display()
        ),
    };
    let endpoint = listed
        .into_iter()
        .map(|e| {
            e.as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow!("{}: [issuer] endpoint {e} is not IP:PORT", path.display()))
        })
        .collect::<anyhow::Result<Vec<SocketAddr>>>()?;
    let key = issuer
        .get("key")
        .and_then(|k| k.as_str())
        .map(str::to_string);
    Ok((endpoint, key))
}

/// The certificate binds our key and the CA the (authenticated) answer names signed it.
fn check(joined: &Joined, public: &[u8; 32]) -> anyhow::Result<()> {
    let cert = &joined.certificate;
    if cert.body.public_key != *public {
        bail!("the issuer's certificate names another key than this node's");
    }
    cert.verify_identity(std::slice::from_ref(&joined.ca), ca::now(), None)
        .map_err(|e| anyhow!("the issuer's certificate does not verify: {e}"))?;
    Ok(())
}

/// The issuer's addresses a node takes, at most (as meshd's `[issuer] endpoints`).
const MAX_ISSUER_ADDRESSES: usize = 8;

/// One of the addresses the issuer may listen at: a socket connected to it, and what an
/// issuer under load asks of us there.
struct Asked {
    at: SocketAddr,
    socket: std::net::UdpSocket,
    /// The issuer's cookie for our address as it sees it from here (proof that we receive
    /// there): the last datagrams sent are repeated with it, and every later one carries it.
    cookie: Option<[u8; control::COOKIE_LEN]>,
    sent: Vec<Vec<u8>>,
}

impl Asked {
    fn open(at: SocketAddr) -> anyhow::Result<Asked> {
        let bind: SocketAddr = if at.is_ipv4() {
            "0.0.0.0:0".parse().expect("an address")
        } else {
            "[::]:0".parse().expect("an address")
        };
        let socket = std::net::UdpSocket::bind(bind).context("opening a UDP socket")?;
        socket
            .connect(at)
            .with_context(|| format!("reaching the issuer at {at}"))?;
        socket
            .set_nonblocking(true)
            .context("setting the socket non-blocking")?;
        Ok(Asked {
            at,
            socket,
            cookie: None,
            sent: Vec::new(),
        })
    }
}

/// Asks the issuer (whose key is `issuer_key`) until it answers or `wait` passes: each second
/// at the next of the addresses it may listen at, `issuer`, so that one that is down or no
/// longer hosts it costs a second.
///
/// The first address asked is `issuer[*first]`, and `*first` becomes the one that answered.
/// `credentials` are shown in turn after a first round at every address: a renewal's (with
/// the node certificate held), then the plain one, which an issuer older than credential kind
/// 3 takes.
fn ask(
    own: &StaticSecret,
    issuer_key: &[u8; 32],
    issuer: &[SocketAddr],
    first: &mut usize,
    credentials: &[Credential],
    wait: Duration,
) -> Result<Joined, Failure> {
    let mut asked = Vec::new();
    for at in issuer {
        // One address this host cannot use (IPv6 on an IPv4-only host) leaves the others.
        match Asked::open(*at) {
            Ok(a) => asked.push(a),
            Err(e) => eprintln!("meshctl: not asking the issuer at {at}: {e:#}"),
        }
    }
    if asked.is_empty() {
        return Err(anyhow!(
            "none of the issuer's addresses ({}) can be reached from here",
            proto::cert::list(issuer)
        )
        .into());
    }
    let start_at = issuer.get(*first).copied();
    let start_turn = asked
        .iter()
        .position(|a| Some(a.at) == start_at)
        .unwrap_or(0);
    let mut turn = start_turn;
    let listed = proto::cert::list(issuer);
    let mut nonce = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    let nonce = u64::from_be_bytes(nonce);
    let requests: Vec<Vec<u8>> = credentials
        .iter()
        .map(|c| {
            Message::JoinRequest {
                nonce,
                credential: c.clone(),
            }
            .encode()
        })
        .collect();
    let rounds_per_pass = asked.len().max(2);
    let mut reassembly = proto::segment::Reassembly::default();
    let start = Instant::now();
    let mut last_sent: Option<Instant> = None;
    let mut buf = vec![0u8; 65_535];
    while start.elapsed() < wait {
        if last_sent.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            let round = turn - start_turn;
            let request = &requests[(round / rounds_per_pass) % requests.len()];
            let at = turn % asked.len();
            let a = &mut asked[at];
            turn += 1;
            let now_ms = wall_ms();
            let mut e = [0u8; 32];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut e);
            a.sent = control::seal_message(
                own,
                issuer_key,
                &StaticSecret::from(e),
                now_ms.saturating_mul(proto::issuer::COUNTER_PER_MS),
                request,
            )
            .map_err(|e| anyhow!("sealing the request: {e}"))?;
            for d in &mut a.sent {
                if let Some(c) = &a.cookie {
                    control::set_cookie(d, c);
                }
                // A send that fails (no route yet) is tried again with the next round.
                let _ = a.socket.send(d);
            }
            last_sent = Some(Instant::now());
        }
        let Some((i, n)) = asked
            .iter_mut()
            .enumerate()
            .find_map(|(i, a)| a.socket.recv(&mut buf).ok().map(|n| (i, n)))
        else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let a = &mut asked[i];
        let sealed = match control::decode(&buf[..n]) {
            Ok(Datagram::Sealed(sealed)) => sealed,
            Ok(Datagram::CookieReply { echo, cookie: c }) => {
                // The datagram it answers, repeated with it (as meshd does); the others of the
                // request get their own replies.
                if let Some(d) = a.sent.iter_mut().find(|d| control::mac_of(d) == Some(echo)) {
                    a.cookie = Some(c);
                    control::set_cookie(d, &c);
                    let _ = a.socket.send(d);
                }
                continue;
            }
            _ => continue,
        };
        let Ok(opened) = sealed.open(own) else {
            continue;
        };
        if opened.sender != *issuer_key {
            continue;
        }
        let Ok(Some(whole)) =
            reassembly.add(opened.sender, sealed.counter, &opened.plaintext, wall_ms())
        else {
            continue;
        };
        match Message::decode(&whole.message) {
            Ok(Message::JoinAnswer { nonce: n, result }) if n == nonce => {
                let at = a.at;
                *first = issuer.iter().position(|x| *x == at).unwrap_or(0);
                return result.map_err(|why| anyhow!("the issuer at {at} refused: {why}").into());
            }
            _ => continue,
        }
    }
    Err(anyhow!(
        "no answer from the issuer at {listed} within {} (is `meshctl ca serve` running there, \
         and is the token's issuer key its key?)",
        a_while(wait)
    )
    .into())
}

fn a_while(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA in a fresh directory, with one token for nodes/n1 (100.64.0.1) filed; its secret.
    fn ca_with_token(tag: &str) -> (PathBuf, [u8; 32]) {
        let dir = std::env::temp_dir().join(format!("meshctl-join-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(ca::init("example.org", &dir, "1d", &["100.64.0.0/16".into()]).is_ok());
        let secret = [9u8; 32];
        let invitation = Invitation {
            verifier: proto::join::verifier(&secret),
            expires: ca::now() + 3600,
            namespace: "nodes".into(),
            name: "n1".into(),
            labels: BTreeMap::new(),
            addrs: vec!["100.64.0.1/32".parse().unwrap()],
            routes: vec![],
            ports: vec![],
            lifetime_secs: 3600,
            redeemed_by: None,
        };
        save_token(
            &tokens_dir(&dir),
            &proto::join::token_id(&secret),
            &invitation,
        )
        .unwrap();
        (dir, secret)
    }

    #[test]
    fn of_keys_racing_for_one_token_on_two_issuers_exactly_one_redeems_it() {
        let (dir, secret) = ca_with_token("race");
        // Each thread is an issuer of its own (its own memory of joins), on one CA directory.
        let results: Vec<Result<Certificate, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (1..=8u8)
                .map(|k| {
                    let dir = &dir;
                    s.spawn(move || answer_token(dir, &secret, &[k; 32], ca::now()))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let won: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
        assert_eq!(won.len(), 1, "{results:?}");
        for r in results.iter().filter(|r| r.is_err()) {
            assert!(r.as_ref().unwrap_err().contains("used already"), "{r:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_token_gives_one_certificate_ever_and_revoking_it_stops_the_token_too() {
        let (dir, secret) = ca_with_token("flood");
        let now = ca::now();
        let first = answer_token(&dir, &secret, &[1; 32], now).unwrap();
        // A flood of redemptions by the holder: the same certificate, no signature, no record.
        for t in 0..200 {
            let again = answer_token(&dir, &secret, &[1; 32], now + t).unwrap();
            assert_eq!(again.encode(), first.encode());
        }
        let record = std::fs::read_to_string(CaDir::of(&dir).issued_path()).unwrap();
        assert_eq!(
            record.lines().filter(|l| l.contains("nodes/n1")).count(),
            1,
            "{record}"
        );
        // Revoked by serial: the token gives nothing more, to its holder or a thief.
        assert!(crate::ca::revoke(&dir, Some(first.body.serial), None, None).is_ok());
        let e = answer_token(&dir, &secret, &[1; 32], now).unwrap_err();
        assert!(e.contains("revoked"), "{e}");
        let e = answer_token(&dir, &secret, &[2; 32], now).unwrap_err();
        assert!(e.contains("used already"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_key_is_known_only_by_a_live_unrevoked_certificate_of_this_ca_that_binds_it() {
        use crate::issuer::shows_key;
        let (dir, secret) = ca_with_token("shows");
        let now = ca::now();
        let cert = answer_token(&dir, &secret, &[1; 32], now).unwrap();
        let (root, crl) = CaDir::of(&dir).certificate_and_crl().unwrap();
        assert!(shows_key(&cert, &[1; 32], &root, crl.as_ref(), now));
        // Certificates are public: shown by another key (which sealed the request), nothing.
        assert!(!shows_key(&cert, &[2; 32], &root, crl.as_ref(), now));
        assert!(!shows_key(
            &cert,
            &[1; 32],
            &root,
            None,
            cert.body.not_after + 1
        ));
        let mut stretched = cert.clone();
        stretched.body.not_after += 86_400;
        assert!(!shows_key(&stretched, &[1; 32], &root, None, now));
        let (other, _) = ca_with_token("shows-other");
        let (other_root, _) = CaDir::of(&other).certificate_and_crl().unwrap();
        assert!(!shows_key(&cert, &[1; 32], &other_root, None, now));
        assert!(crate::ca::revoke(&dir, Some(cert.body.serial), None, None).is_ok());
        let (_, crl) = CaDir::of(&dir).certificate_and_crl().unwrap();
        assert!(!shows_key(&cert, &[1; 32], &root, crl.as_ref(), now));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&other);
    }

    /// An issuer older than credential kind 3 on loopback: it answers (with a refusal that
    /// says so) only requests without a certificate held, and drops the rest, as it cannot
    /// decode them. Its address and public key.
    fn old_issuer() -> (SocketAddr, [u8; 32]) {
        let secret = StaticSecret::from([0x42; 32]);
        let public = x25519_dalek::PublicKey::from(&secret).to_bytes();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let at = socket.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut responder = proto::issuer::Responder::new(secret);
            let mut buf = vec![0u8; 65_535];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let Ok(Some(opened)) = responder.open(wall_ms(), from, &buf[..n]) else {
                    continue;
                };
                let Message::JoinRequest {
                    nonce,
                    credential: Credential::ServiceAccount { held: None, .. },
                } = opened.msg
                else {
                    continue;
                };
                let answer = Message::JoinAnswer {
                    nonce,
                    result: Err("answered by the old issuer".into()),
                };
                for d in responder.seal(&opened.sender, &answer, wall_ms(), &mut rand_core::OsRng) {
                    let _ = socket.send_to(&d, from);
                }
            }
        });
        (at, public)
    }

    #[test]
    fn a_join_finds_the_issuer_past_a_dead_address_and_an_old_issuer_through_the_plain_credential()
    {
        let (at, key) = old_issuer();
        // Nothing listens there: a port of a socket just closed.
        let dead = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let own = StaticSecret::from([0x07; 32]);
        let held = Certificate {
            body: proto::cert::CertBody::ca("example.org", "n", [7; 32], 1, (0, u64::MAX), vec![]),
            signature: [0; 64],
        };
        let credentials = [
            Credential::ServiceAccount {
                token: "a.b.c".into(),
                held: Some(Box::new(held)),
            },
            Credential::ServiceAccount {
                token: "a.b.c".into(),
                held: None,
            },
        ];
        let mut first = 0;
        let start = Instant::now();
        let e = ask(
            &own,
            &key,
            &[dead, at],
            &mut first,
            &credentials,
            Duration::from_secs(10),
        )
        .unwrap_err()
        .error
        .to_string();
        assert!(e.contains("answered by the old issuer"), "{e}");
        assert_eq!(
            first, 1,
            "the address that answered is asked first next time"
        );
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "{:?}",
            start.elapsed()
        );
        // Asked first there, the next time answers at once (the renewal's credential first).
        let start = Instant::now();
        let e = ask(
            &own,
            &key,
            &[dead, at],
            &mut first,
            &credentials[1..],
            Duration::from_secs(10),
        )
        .unwrap_err()
        .error
        .to_string();
        assert!(e.contains("answered by the old issuer"), "{e}");
        assert!(
            start.elapsed() < Duration::from_millis(900),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn meshd_s_configuration_names_the_issuer_s_addresses_one_way_or_the_other() {
        let dir = std::env::temp_dir().join(format!("meshctl-conf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("meshd.toml");
        let with = |issuer: &str| {
            std::fs::write(&path, format!("[issuer]\n{issuer}key = \"K\"\n")).unwrap();
            configured_issuer(&path)
                .map(|(at, _)| at)
                .map_err(|e| e.to_string())
        };
        let a: SocketAddr = "198.18.0.1:7100".parse().unwrap();
        let b: SocketAddr = "198.18.0.2:7100".parse().unwrap();
        assert_eq!(with("endpoint = \"198.18.0.1:7100\"\n"), Ok(vec![a]));
        assert_eq!(
            with("endpoints = [\"198.18.0.1:7100\", \"198.18.0.2:7100\"]\n"),
            Ok(vec![a, b])
        );
        for (issuer, says) in [
            ("endpoints = []\n", "endpoints is empty"),
            (
                "endpoints = \"198.18.0.1:7100\"\n",
                "endpoints must be a list",
            ),
            (
                "endpoint = \"198.18.0.1:7100\"\nendpoints = []\n",
                "not both",
            ),
            ("endpoints = [\"198.18.0.1\"]\n", "is not IP:PORT"),
        ] {
            let e = with(issuer).unwrap_err();
            assert!(e.contains(says), "{issuer}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_certificate_filed_for_a_token_goes_only_to_the_key_it_binds() {
        // As if the issuer stopped after filing the certificate and before marking the token.
        let (dir, secret) = ca_with_token("crash");
        let now = ca::now();
        let first = answer_token(&dir, &secret, &[1; 32], now).unwrap();
        let id = proto::join::token_id(&secret);
        let mut inv = load_token(&tokens_dir(&dir), &id).unwrap().unwrap();
        inv.redeemed_by = None;
        save_token(&tokens_dir(&dir), &id, &inv).unwrap();
        let e = answer_token(&dir, &secret, &[2; 32], now).unwrap_err();
        assert!(e.contains("used already"), "{e}");
        let again = answer_token(&dir, &secret, &[1; 32], now).unwrap();
        assert_eq!(again.encode(), first.encode());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
