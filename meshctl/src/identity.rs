//! `meshctl identity`: certificates binding a workload's WireGuard key to its name, namespace,
//! labels and overlay addresses.

use crate::ca::{self, CaDir};
use crate::{Failure, Output};
use anyhow::{anyhow, Context};
use keyfile as files;
use proto::armor;
use proto::cert::{CertBody, CertKind};
use proto::{Cidr, Key};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const DEFAULT_IDENTITY_TTL: &str = "720h";

#[derive(clap::Args)]
pub struct IssueArgs {
    /// The CA directory (ca.key, ca.crt) that signs.
    #[arg(long, value_name = "DIR")]
    pub ca: PathBuf,
    #[command(flatten)]
    pub fields: FieldArgs,
    /// Validity, e.g. 30d, 12h, 90s.
    #[arg(long, default_value = DEFAULT_IDENTITY_TTL)]
    pub ttl: String,
    /// The node's WireGuard public key (from `meshctl genkey | meshctl pubkey` or wg); the
    /// private key then never leaves that node. Without it a key pair is made here.
    #[arg(long)]
    pub public_key: Option<PathBuf>,
    /// Directory for NAME.crt (and NAME.key when the key pair is made here, mode 0600).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Renew in place: replace OUT/NAME.crt; the key in OUT/NAME.key (if there) stays and the
    /// new certificate binds it, so the node keeps its key (reload it to take the certificate).
    #[arg(long)]
    pub force: bool,
}

/// What an identity certificate says of its holder, as flags.
#[derive(clap::Args)]
pub struct FieldArgs {
    /// The workload's namespace.
    #[arg(long)]
    pub namespace: String,
    /// The service account name.
    #[arg(long)]
    pub name: String,
    /// A label KEY=VALUE; repeat for more.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// An overlay address or prefix; repeat for more.
    #[arg(long = "ip", required = true)]
    pub ips: Vec<String>,
    /// A range outside the mesh this identity may serve as a gateway; repeat for more.
    #[arg(long = "route", value_name = "CIDR")]
    pub routes: Vec<String>,
    /// A named port NAME=PORT[/tcp|udp|sctp] (TCP if left out), as a Kubernetes container port:
    /// rules that name the port (`ports: [http]`) match it; repeat for more.
    #[arg(long = "port", value_name = "NAME=PORT/PROTO")]
    pub ports: Vec<String>,
}

/// [`FieldArgs`] checked: sorted, without duplicates.
pub struct Fields {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub addrs: Vec<Cidr>,
    pub routes: Vec<Cidr>,
    pub ports: Vec<proto::cert::NamedPort>,
}

impl FieldArgs {
    pub fn parse(&self) -> Result<Fields, Failure> {
        let input = |e: anyhow::Error| Failure::input(e);
        let labels = parse_labels(&self.labels)?;
        let mut addrs = Vec::new();
        for ip in &self.ips {
            let c: Cidr = ip.parse().map_err(|e| input(anyhow!("--ip `{ip}`: {e}")))?;
            addrs.push(c);
        }
        addrs.sort();
        addrs.dedup();
        let mut routes = Vec::new();
        for r in &self.routes {
            let c: Cidr = r
                .parse()
                .map_err(|e| input(anyhow!("--route `{r}`: {e}")))?;
            if c.to_string() != *r {
                return Err(input(anyhow!(
                    "--route `{r}`: host bits set (did you mean {c}?)"
                )));
            }
            routes.push(c);
        }
        routes.sort();
        routes.dedup();
        let mut ports: Vec<proto::cert::NamedPort> = Vec::new();
        for p in &self.ports {
            let np: proto::cert::NamedPort =
                p.parse().map_err(|e| input(anyhow!("--port `{p}`: {e}")))?;
            if let Some(other) = ports
                .iter()
                .find(|o| o.name == np.name && o.protocol == np.protocol)
            {
                return Err(input(anyhow!(
                    "--port `{p}`: {} is named already ({other})",
                    np.name
                )));
            }
            ports.push(np);
        }
        ports.sort();
        if addrs.is_empty() {
            return Err(input(anyhow!(
                "--ip: an identity needs at least one overlay address"
            )));
        }
        Ok(Fields {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            labels,
            addrs,
            routes,
            ports,
        })
    }
}

/// `--label KEY=VALUE` flags as a map; a key given twice is an error.
pub fn parse_labels(flags: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    let mut labels = BTreeMap::new();
    for l in flags {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| Failure::input(anyhow!("--label `{l}`: expected KEY=VALUE")))?;
        if labels.insert(k.to_string(), v.to_string()).is_some() {
            return Err(Failure::input(anyhow!("--label: key `{k}` given twice")));
        }
    }
    Ok(labels)
}

pub fn issue(a: IssueArgs) -> Result<(), Failure> {
    let input = |e: anyhow::Error| Failure::input(e);
    let ttl = proto::duration::parse(&a.ttl).map_err(|e| input(anyhow!("--ttl: {e}")))?;
    let Fields {
        namespace,
        name,
        labels,
        addrs,
        routes,
        ports,
    } = a.fields.parse()?;

    let ca_dir = CaDir { dir: a.ca.clone() };
    let ca_key = ca_dir.signing_key()?;
    let ca_cert = ca_dir.certificate()?;
    if ca_cert.body.public_key != ca_key.verifying_key().to_bytes() {
        return Err(anyhow!(
            "{} does not belong to {}",
            ca_dir.key_path().display(),
            ca_dir.cert_path().display()
        )
        .into());
    }

    let cert_path = a.out.join(format!("{name}.crt"));
    let key_path = a.out.join(format!("{name}.key"));
    if cert_path.exists() && !a.force {
        return Err(anyhow!(
            "{} exists; refusing to overwrite it (--force renews it in place)",
            cert_path.display()
        )
        .into());
    }
    let (public, new_private) = match &a.public_key {
        Some(path) => {
            let text = files::read(path)?;
            let k =
                Key::from_base64(&text).map_err(|e| input(anyhow!("{}: {e}", path.display())))?;
            (k, None)
        }
        None if a.force && key_path.exists() => {
            let text = files::read_secret(&key_path)?;
            let private = Key::from_base64(&text)
                .map_err(|e| input(anyhow!("{}: {e}", key_path.display())))?;
            (private.public(), None)
        }
        None => {
            if key_path.exists() {
                return Err(
                    anyhow!("{} exists; refusing to overwrite it", key_path.display()).into(),
                );
            }
            let private = Key::generate_private();
            (private.public(), Some(private))
        }
    };
    let now = ca::now();
    let not_after = now
        .saturating_add(ttl.as_secs())
        .min(ca_cert.body.not_after);
    let cert = CertBody {
        kind: CertKind::Identity,
        serial: ca::new_serial(),
        not_before: now,
        not_after,
        trust_domain: ca_cert.body.trust_domain.clone(),
        namespace,
        name,
        public_key: public.0,
        issuer: ca_cert.body.public_key,
        labels,
        addrs,
        routes,
        ports,
    }
    .sign(&ca_key)
    .map_err(|e| input(anyhow!("{e}")))?;
    proto::cert::check_ranges(&ca_cert.body, &cert.body)
        .map_err(|e| input(anyhow!("--ip: {e}")))?;

    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    if let Some(private) = new_private {
        files::create(&key_path, format!("{private}\n").as_bytes(), 0o600)?;
        println!("key  {} (mode 600)", key_path.display());
    }
    ca_dir.record(&cert.body)?;
    let pem = armor::encode(armor::CERTIFICATE, &cert.encode());
    if a.force {
        files::replace(&cert_path, pem.as_bytes(), 0o644)?;
    } else {
        files::create(&cert_path, pem.as_bytes(), 0o644)?;
    }
    println!(
        "cert {} for {} serial {}",
        cert_path.display(),
        cert.body.spiffe_id(),
        cert.body.serial
    );
    Ok(())
}

/// What `inspect` prints as JSON.
#[derive(serde::Serialize)]
struct Inspection<'a> {
    #[serde(flatten)]
    body: &'a CertBody,
    identity: String,
    spiffe_id: String,
    not_before_utc: String,
    not_after_utc: String,
    /// "ok", or why it does not verify; absent without --ca (except for a self-signed CA).
    verification: Option<String>,
}

pub fn inspect(file: &Path, ca_dir: Option<&Path>, output: Output) -> Result<(), Failure> {
    let cert = ca::load_certificate(file).map_err(Failure::input)?;
    let now = ca::now();
    let verification: Option<Result<(), String>> = match (ca_dir, cert.body.kind) {
        (Some(dir), CertKind::Identity) => {
            let d = CaDir::of(dir);
            let (ca_cert, crl) = d.certificate_and_crl()?;
            Some(
                cert.verify_identity(&[ca_cert], now, crl.as_ref())
                    .map_err(|e| e.to_string()),
            )
        }
        (_, CertKind::Ca) => Some(cert.verify_ca(now).map_err(|e| e.to_string())),
        (None, CertKind::Identity) => None,
    };
    let b = &cert.body;
    let view = Inspection {
        body: b,
        identity: b.identity(),
        spiffe_id: b.spiffe_id(),
        not_before_utc: utc(b.not_before),
        not_after_utc: utc(b.not_after),
        verification: verification
            .clone()
            .map(|v| v.err().unwrap_or_else(|| "ok".into())),
    };
    if let Some(_wide) = output.data(&view)? {
        println!("{:?} certificate {}", b.kind, file.display());
        if b.kind == CertKind::Identity {
            println!("  identity     {}", view.identity);
            println!("  spiffe id    {}", view.spiffe_id);
        } else {
            println!("  trust domain {}", b.trust_domain);
            println!("  name         {}", b.name);
        }
        println!("  serial       {}", b.serial);
        println!("  public key   {}", Key(b.public_key));
        println!("  issuer       {}", Key(b.issuer));
        println!(
            "  valid        {} .. {}",
            view.not_before_utc, view.not_after_utc
        );
        let labels: Vec<String> = b.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "  labels       {}",
            if labels.is_empty() {
                "-".into()
            } else {
                labels.join(",")
            }
        );
        let addrs: Vec<String> = b.addrs.iter().map(|a| a.to_string()).collect();
        println!(
            "  addresses    {}",
            if addrs.is_empty() {
                "-".into()
            } else {
                addrs.join(",")
            }
        );
        if !b.routes.is_empty() {
            println!("  routes       {}", proto::cert::list(&b.routes));
        }
        if !b.ports.is_empty() {
            println!("  ports        {}", proto::cert::list(&b.ports));
        }
        match &verification {
            Some(Ok(())) => println!("  verifies     yes"),
            Some(Err(e)) => println!("  verifies     NO: {e}"),
            None => println!("  verifies     not checked (give --ca DIR)"),
        }
    }
    match verification {
        Some(Err(e)) => Err(anyhow!("{} does not verify: {e}", file.display()).into()),
        _ => Ok(()),
    }
}

/// `secs` as RFC 3339 UTC, as every meshctl output writes times.
pub fn utc(secs: u64) -> String {
    proto::time::rfc3339(secs)
}
