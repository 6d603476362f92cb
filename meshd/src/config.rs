//! The mesh-mode configuration file (TOML). Parsing and validation are pure; [`load`] reads the
//! files the configuration names and checks that they make a usable identity.
//!
//! ```toml
//! log_format = "text"      # or "json": one object per line; text has colour only on a terminal
//!
//! [interface]
//! name = "mesh0"
//! listen_port = 51820      # default 51820
//! mtu = 1420               # default 1420
//!
//! [identity]
//! certificate = "/etc/meshd/node.crt"
//! private_key = "/etc/meshd/node.key"   # mode 0600
//!
//! [trust]
//! bundle = ["/etc/meshd/ca.crt"]            # CA certificates trusted for peers
//! revocation_lists = ["/etc/meshd/revoked.crl"]   # optional
//!
//! policy_admins = ["/etc/meshd/policy-admin.pub"]  # keys whose signed policy sets are taken
//! workload_cas = ["/etc/meshd/issuer-ca.crt"]   # workload issuers' CAs (workload certificates only)
//!
//! [peering]
//! seeds = ["198.18.0.1:51820"]   # underlay endpoints to contact first; KEY@IP:PORT names the
//!                                 # seed's public key too, so no probe is needed
//! answer_probes = true            # false: answer nothing to a sender without a certificate
//!                                 # (every node must then name this one as KEY@IP:PORT)
//! state_dir = "/var/lib/meshd"    # default
//!
//! [policy]
//! posture = "zero-trust"   # default; "calico": only endpoints a policy selects are default-deny
//! audit = false            # true: log and count denials, but let the packets pass
//! conntrack_max = 262144   # tracked flows; the oldest is evicted (and counted) beyond this
//! flow_log = "/var/lib/meshd/flows.jsonl"   # default: flows.jsonl in the state directory
//!
//! [gateway]
//! routes = ["198.19.0.0/24"]   # routes outside the mesh this node serves; each must be granted
//!                              # by its certificate (`meshctl identity issue --route`)
//! masquerade = false           # true: forwarded traffic leaves with this node's underlay address
//!
//! [relay]
//! serve = false        # true: relay frames between members that cannot reach each other
//! via = ["KEY"]        # members (public keys) to reach others through when their own address
//!                      # does not answer: this cluster's relay, for a federated cluster
//!
//! [issuer]
//! endpoint = "198.18.0.1:7100"   # the workload issuer (`meshctl ca serve`) on the underlay
//! # or endpoints = ["198.18.0.1:7100", "198.18.0.2:7100"]: each host it may run on, asked in
//! # turn while it does not answer
//! key = "KEY"                    # its public key, as `meshctl ca serve` prints it
//! ```

use anyhow::{anyhow, bail, Context};
use proto::cert::{Certificate, RevocationList};
use proto::control::Seed;
use proto::{armor, Key};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Relays a node names at most (each unheard member is greeted through every one).
pub const MAX_RELAYS: usize = 8;

/// How meshd writes its log lines (`log_format`, or `meshd --log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines; colour only when standard error is a terminal.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `message` and the fields).
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub log_format: LogFormat,
    /// Reload when this file or a file it names changes (checked every 5 s), as for a
    /// Kubernetes ConfigMap updated in place.
    #[serde(default)]
    pub reload_on_change: bool,
    pub interface: InterfaceSection,
    pub identity: IdentitySection,
    pub trust: TrustSection,
    #[serde(default)]
    pub peering: PeeringSection,
    #[serde(default)]
    pub policy: PolicySection,
    #[serde(default)]
    pub gateway: GatewaySection,
    #[serde(default)]
    pub relay: RelaySection,
    #[serde(default)]
    pub metrics: MetricsSection,
    /// The workload issuer this node asks for the certificates of the workloads it runs; none:
    /// this node runs no workloads of their own identity.
    #[serde(default)]
    pub issuer: Option<IssuerSection>,
}

/// `[issuer]`: where the online workload issuer listens, and its key.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerSection {
    #[serde(default)]
    pub endpoint: Option<std::net::SocketAddr>,
    /// The addresses of every host the issuer may run on (a Deployment that may move between
    /// control-plane nodes): a request unanswered for a second goes to the next.
    #[serde(default)]
    pub endpoints: Option<Vec<std::net::SocketAddr>>,
    pub key: String,
}

/// `[issuer] endpoints` holds at most this many addresses.
pub const MAX_ISSUER_ENDPOINTS: usize = 8;

impl IssuerSection {
    /// Where the issuer may listen: `endpoint`, or `endpoints` (validated by [`Config::parse`]).
    pub fn addresses(&self) -> Vec<std::net::SocketAddr> {
        self.endpoint
            .into_iter()
            .chain(self.endpoints.iter().flatten().copied())
            .collect()
    }
}

/// `[metrics]`: Prometheus metrics and health endpoints, off unless `listen` is set. They name
/// peers and identities: listen on a loopback or management address, not a public one.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// `ADDR:PORT` for `/metrics`, `/healthz` and `/readyz`.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySection {
    #[serde(default)]
    pub serve: bool,
    #[serde(default)]
    pub via: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    #[serde(default)]
    pub routes: Vec<String>,
    #[serde(default)]
    pub masquerade: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    #[serde(default)]
    pub posture: PostureSetting,
    #[serde(default)]
    pub audit: bool,
    #[serde(default = "default_conntrack_max")]
    pub conntrack_max: usize,
    #[serde(default)]
    pub flow_log: Option<PathBuf>,
}

impl Default for PolicySection {
    fn default() -> Self {
        PolicySection {
            posture: PostureSetting::default(),
            audit: false,
            conntrack_max: default_conntrack_max(),
            flow_log: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PostureSetting {
    #[default]
    ZeroTrust,
    Calico,
}

fn default_conntrack_max() -> usize {
    262_144
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceSection {
    pub name: String,
    #[serde(default = "default_port")]
    pub listen_port: u16,
    #[serde(default = "default_mtu")]
    pub mtu: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySection {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSection {
    pub bundle: Vec<PathBuf>,
    #[serde(default)]
    pub revocation_lists: Vec<PathBuf>,
    /// Public keys of the policy administrators (armored Ed25519 keys).
    #[serde(default)]
    pub policy_admins: Vec<PathBuf>,
    /// CA certificates of workload issuers (`meshctl ca serve` makes CA_DIR/issuer/ca.crt):
    /// trusted for workload certificates only, never for a node's own.
    #[serde(default)]
    pub workload_cas: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeeringSection {
    #[serde(default)]
    pub seeds: Vec<String>,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Whether a probe (from a sender that has shown no certificate) gets this node's certificate
    /// or key in reply.
    #[serde(default = "yes")]
    pub answer_probes: bool,
}

impl Default for PeeringSection {
    fn default() -> Self {
        PeeringSection {
            seeds: Vec::new(),
            state_dir: default_state_dir(),
            answer_probes: true,
        }
    }
}

fn default_port() -> u16 {
    51820
}
fn default_mtu() -> u32 {
    1420
}
fn yes() -> bool {
    true
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/meshd")
}

/// A configuration error: the file, and what is wrong where (TOML's own messages carry the line
/// and column; ours name the key).
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl Config {
    /// Parses and validates `text`, read from `path` (used only in error messages).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let err = |message: String| ConfigError {
            path: path.display().to_string(),
            message,
        };
        let cfg: Config =
            toml::from_str(text).map_err(|e| err(e.to_string().trim_end().to_string()))?;
        if crate::parse_ifname(&cfg.interface.name).is_err() {
            return Err(err(format!(
                "interface.name: `{}` is not an interface name (1 to 15 letters, digits, - _ .)",
                cfg.interface.name
            )));
        }
        if !(576..=65535).contains(&cfg.interface.mtu) {
            return Err(err(format!(
                "interface.mtu: {} is not within 576..=65535",
                cfg.interface.mtu
            )));
        }
        if cfg.trust.bundle.is_empty() {
            return Err(err(
                "trust.bundle: at least one CA certificate is needed".into()
            ));
        }
        if !(1..=16_777_216).contains(&cfg.policy.conntrack_max) {
            return Err(err(format!(
                "policy.conntrack_max: {} is not within 1..=16777216",
                cfg.policy.conntrack_max
            )));
        }
        for (i, s) in cfg.peering.seeds.iter().enumerate() {
            if let Err(e) = s.parse::<Seed>() {
                return Err(err(format!("peering.seeds[{i}]: {e}")));
            }
        }
        for (i, r) in cfg.gateway.routes.iter().enumerate() {
            match r.parse::<proto::Cidr>() {
                Err(e) => return Err(err(format!("gateway.routes[{i}]: `{r}`: {e}"))),
                Ok(c) if c.to_string() != *r => {
                    return Err(err(format!(
                        "gateway.routes[{i}]: `{r}` has host bits set (did you mean {c}?)"
                    )))
                }
                Ok(_) => {}
            }
        }
        if cfg.gateway.routes.len() > proto::cert::MAX_ADDRS {
            return Err(err("gateway.routes: more than 16".into()));
        }
        for (i, k) in cfg.relay.via.iter().enumerate() {
            if let Err(e) = Key::from_base64(k) {
                return Err(err(format!(
                    "relay.via[{i}]: `{k}` is not a public key (base64 of 32 bytes): {e}"
                )));
            }
        }
        if cfg.relay.via.len() > MAX_RELAYS {
            return Err(err(format!("relay.via: more than {MAX_RELAYS}")));
        }
        if let Some(i) = &cfg.issuer {
            match (&i.endpoint, i.endpoints.as_ref().map(Vec::len)) {
                (None, None) => return Err(err("issuer: give endpoint or endpoints".into())),
                (Some(_), Some(_)) => {
                    return Err(err("issuer: give endpoint or endpoints, not both".into()))
                }
                (None, Some(0)) => return Err(err("issuer.endpoints: empty".into())),
                (None, Some(n)) if n > MAX_ISSUER_ENDPOINTS => {
                    return Err(err(format!(
                        "issuer.endpoints: more than {MAX_ISSUER_ENDPOINTS}"
                    )))
                }
                _ => {}
            }
            let listed = i.endpoints.as_deref().unwrap_or_default();
            for (n, a) in listed.iter().enumerate() {
                if listed[..n].contains(a) {
                    return Err(err(format!("issuer.endpoints[{n}]: `{a}` is listed twice")));
                }
            }
            if let Err(e) = Key::from_base64(&i.key) {
                return Err(err(format!(
                    "issuer.key: `{}` is not a public key (base64 of 32 bytes): {e}",
                    i.key
                )));
            }
        }
        Ok(cfg)
    }

    /// The workload issuer's key and addresses (validated by [`Config::parse`]).
    pub fn issuer(&self) -> Option<([u8; 32], Vec<std::net::SocketAddr>)> {
        let i = self.issuer.as_ref()?;
        Some((Key::from_base64(&i.key).ok()?.0, i.addresses()))
    }

    /// The members asked to relay (validated by [`Config::parse`]).
    pub fn relays(&self) -> Vec<[u8; 32]> {
        self.relay
            .via
            .iter()
            .filter_map(|k| Key::from_base64(k).ok())
            .map(|k| k.0)
            .collect()
    }

    /// The routes this node serves as a gateway (validated by [`Config::parse`]).
    pub fn gateway_routes(&self) -> Vec<proto::Cidr> {
        self.gateway
            .routes
            .iter()
            .filter_map(|r| r.parse().ok())
            .collect()
    }

    pub fn seeds(&self) -> Vec<Seed> {
        self.peering
            .seeds
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect()
    }
}

/// The identity and trust material a configuration names, read and checked.
pub struct Identity {
    pub private_key: Key,
    pub certificate: Certificate,
    pub bundle: Vec<Certificate>,
    pub revocation_lists: Vec<RevocationList>,
    /// Ed25519 public keys of the policy administrators.
    pub policy_admins: Vec<[u8; 32]>,
    /// The keys of the workload CAs (their certificates are in `bundle`).
    pub workload_cas: Vec<[u8; 32]>,
}

fn read_cert(path: &Path) -> anyhow::Result<Certificate> {
    let text = keyfile::read(path)?;
    let bytes =
        armor::decode(armor::CERTIFICATE, &text).with_context(|| path.display().to_string())?;
    Certificate::decode(&bytes).with_context(|| path.display().to_string())
}

/// Reads the key, certificate, bundle and revocation lists, and checks that the certificate is
/// for this key and verifies against the bundle at `now`.
pub fn load(cfg: &Config, now: u64) -> anyhow::Result<Identity> {
    let key_path = &cfg.identity.private_key;
    let key_text = keyfile::read_secret(key_path)?;
    let private_key =
        Key::from_base64(&key_text).map_err(|e| anyhow!("{}: {e}", key_path.display()))?;
    let cert_path = &cfg.identity.certificate;
    let certificate = read_cert(cert_path)?;
    let mut bundle = Vec::new();
    for p in &cfg.trust.bundle {
        let ca = read_cert(p)?;
        ca.verify_ca(now)
            .with_context(|| format!("{}: not a usable CA certificate", p.display()))?;
        bundle.push(ca);
    }
    let mut workload_cas = Vec::new();
    for p in &cfg.trust.workload_cas {
        let ca = read_cert(p)?;
        ca.verify_ca(now)
            .with_context(|| format!("{}: not a usable CA certificate", p.display()))?;
        if bundle
            .iter()
            .any(|b| b.body.public_key == ca.body.public_key)
        {
            bail!(
                "{}: also in trust.bundle; a workload CA is trusted for workload certificates \
                 only, so name it in trust.workload_cas alone",
                p.display()
            );
        }
        workload_cas.push(ca.body.public_key);
        bundle.push(ca);
    }
    let mut revocation_lists = Vec::new();
    for p in &cfg.trust.revocation_lists {
        let text = keyfile::read(p)?;
        let bytes = armor::decode(armor::REVOCATION_LIST, &text)
            .with_context(|| p.display().to_string())?;
        let crl = RevocationList::decode(&bytes).with_context(|| p.display().to_string())?;
        let ca = bundle
            .iter()
            .find(|ca| ca.body.public_key == crl.issuer)
            .ok_or_else(|| {
                anyhow!(
                    "{}: issued by a CA that is not in trust.bundle",
                    p.display()
                )
            })?;
        crl.verify(ca).with_context(|| p.display().to_string())?;
        revocation_lists.push(crl);
    }
    let mut policy_admins = Vec::new();
    for p in &cfg.trust.policy_admins {
        let text = keyfile::read(p)?;
        let bytes = armor::decode(proto::policyset::ADMIN_PUBLIC_KEY, &text)
            .with_context(|| p.display().to_string())?;
        let key: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            anyhow!(
                "{}: a policy-admin key is 32 bytes, not {}",
                p.display(),
                b.len()
            )
        })?;
        policy_admins.push(key);
    }
    if workload_cas.contains(&certificate.body.issuer) {
        bail!(
            "{} is a workload certificate (its CA is in trust.workload_cas), not a node's",
            cert_path.display()
        );
    }
    if private_key.public().0 != certificate.body.public_key {
        bail!(
            "{} is for key {}, but {} holds the private key of {}",
            cert_path.display(),
            Key(certificate.body.public_key),
            key_path.display(),
            private_key.public()
        );
    }
    let crl = revocation_lists
        .iter()
        .find(|c| c.issuer == certificate.body.issuer);
    certificate
        .verify_identity(&bundle, now, crl)
        .with_context(|| {
            format!(
                "{} does not verify against trust.bundle",
                cert_path.display()
            )
        })?;
    for r in cfg.gateway_routes() {
        if !certificate.body.routes.iter().any(|g| g.covers(&r)) {
            bail!(
                "gateway.routes: {r} is not granted by {} (it grants {}); a node serves only \
                 routes its CA granted (meshctl identity issue --route)",
                cert_path.display(),
                if certificate.body.routes.is_empty() {
                    "none".to_string()
                } else {
                    proto::cert::list(&certificate.body.routes)
                }
            );
        }
    }
    Ok(Identity {
        private_key,
        certificate,
        bundle,
        revocation_lists,
        policy_admins,
        workload_cas,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[interface]
name = "mesh0"

[identity]
certificate = "/etc/meshd/node.crt"
private_key = "/etc/meshd/node.key"

[trust]
bundle = ["/etc/meshd/ca.crt"]

[peering]
seeds = ["198.18.0.1:51820", "[fd01::1]:51820", "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=@198.18.0.3:51820"]
"#;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("/etc/meshd/meshd.toml"))
    }

    #[test]
    fn parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!((c.interface.listen_port, c.interface.mtu), (51820, 1420));
        let seeds = c.seeds();
        assert_eq!(seeds.len(), 3);
        assert_eq!((seeds[0].key, seeds[2].key), (None, Some([1; 32])));
        assert_eq!(seeds[2].addr, "198.18.0.3:51820".parse().unwrap());
        assert!(c.peering.answer_probes);
        assert_eq!(c.peering.state_dir, PathBuf::from("/var/lib/meshd"));
    }

    #[test]
    fn the_log_format_is_text_or_json() {
        assert_eq!(parse(GOOD).unwrap().log_format, LogFormat::Text);
        let c = parse(&format!("log_format = \"json\"\n{GOOD}")).unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        let e = parse(&format!("log_format = \"xml\"\n{GOOD}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `xml`"), "{e}");
    }

    #[test]
    fn relays_are_named_by_key_and_a_bad_one_is_named_in_the_error() {
        let key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
        let c = parse(&format!(
            "{GOOD}\n[relay]\nserve = true\nvia = [\"{key}\"]\n"
        ))
        .unwrap();
        assert!(c.relay.serve);
        assert_eq!(c.relays(), vec![[1; 32]]);
        assert!(
            !parse(GOOD).unwrap().relay.serve,
            "no relaying unless asked"
        );
        let e = parse(&format!("{GOOD}\n[relay]\nvia = [\"198.18.0.1:51820\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("relay.via[0]: `198.18.0.1:51820` is not a public key"),
            "{e}"
        );
        let e = parse(&format!(
            "{GOOD}\n[issuer]\nendpoint = \"198.18.0.1:7100\"\nkey = \"abc\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("issuer.key: `abc` is not a public key"), "{e}");
        let key = Key([7; 32]).to_base64();
        let c = parse(&format!(
            "{GOOD}\n[issuer]\nendpoint = \"198.18.0.1:7100\"\nkey = \"{key}\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.issuer(),
            Some(([7; 32], vec!["198.18.0.1:7100".parse().unwrap()]))
        );
        let issuer = |lines: &str| parse(&format!("{GOOD}\n[issuer]\n{lines}key = \"{key}\"\n"));
        let two = issuer("endpoints = [\"198.18.0.1:7100\", \"[fd00::2]:7100\"]\n").unwrap();
        assert_eq!(
            two.issuer().unwrap().1,
            [
                "198.18.0.1:7100".parse::<std::net::SocketAddr>().unwrap(),
                "[fd00::2]:7100".parse().unwrap()
            ]
        );
        for (lines, says) in [
            ("", "issuer: give endpoint or endpoints"),
            (
                "endpoint = \"198.18.0.1:7100\"\nendpoints = [\"198.18.0.2:7100\"]\n",
                "not both",
            ),
            (
                "endpoints = [\"198.18.0.1:7100\", \"198.18.0.1:7100\"]\n",
                "issuer.endpoints[1]: `198.18.0.1:7100` is listed twice",
            ),
            (
                "endpoint = \"198.18.0.1:7100\"\nendpoints = []\n",
                "not both",
            ),
            ("endpoints = []\n", "issuer.endpoints: empty"),
            (
                "endpoints = [\"198.18.0.1\"]\n",
                "invalid socket address syntax",
            ),
        ] {
            let e = issuer(lines).unwrap_err().to_string();
            assert!(e.contains(says), "{lines}: {e}");
        }
        let e = parse(&format!("{GOOD}\n[relay]\nserves = true\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `serves`"), "{e}");
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let e = parse(&GOOD.replace("name = \"mesh0\"", "name = \"mesh0\"\nlisten_prot = 1"))
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("/etc/meshd/meshd.toml:"), "{msg}");
        assert!(msg.contains("unknown field `listen_prot`"), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");

        let e = parse(&GOOD.replace("198.18.0.1:51820", "198.18.0.1"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("peering.seeds[0]: `198.18.0.1` is not IP:port or KEY@IP:port"),
            "{e}"
        );
        let e = parse(&GOOD.replace("AQEB", "!QEB"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("peering.seeds[2]"), "{e}");
        let e = parse(&GOOD.replace("\"mesh0\"", "\"a/b\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("interface.name"), "{e}");
        let e = parse(&GOOD.replace("[\"/etc/meshd/ca.crt\"]", "[]"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("trust.bundle"), "{e}");
        let e = parse(&GOOD.replace("name = \"mesh0\"", "name = \"mesh0\"\nmtu = \"big\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mtu"), "{e}");
        let e = parse(&format!("{GOOD}\n[policy]\nposture = \"open\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `open`"), "{e}");
        let c = parse(&format!(
            "{GOOD}\n[policy]\nposture = \"calico\"\naudit = true\n"
        ))
        .unwrap();
        assert_eq!(
            (c.policy.posture, c.policy.audit),
            (PostureSetting::Calico, true)
        );
        let e = parse(&format!("{GOOD}\n[policy]\nconntrack_max = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("policy.conntrack_max"), "{e}");
        let e = parse("[interface]\nname = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `identity`"), "{e}");
    }
}
