//! `meshctl workload`: the registry of workloads an online issuer may certify, for VMs and the
//! lab (Kubernetes has its own: the API server). It lives in the CA directory as
//! `workloads.yaml`; `register`, `list` and `remove` read it whole, check it, and replace it
//! atomically, so a refused change leaves the registry as it was. What a workload may be, and who
//! may be given its certificate, is decided in `proto::workload`.

use crate::{Failure, Output};
use anyhow::{anyhow, Context};
use proto::cert::NamedPort;
use proto::workload::{NodeName, Registry, Workload, WorkloadRef, WorkloadView};
use proto::Cidr;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The largest registry file read.
const MAX_REGISTRY_BYTES: u64 = 16 << 20;

/// One workload as the file writes it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Entry {
    namespace: String,
    name: String,
    uid: String,
    service_account: String,
    /// `NAMESPACE/NAME` of the node's own certificate.
    node: String,
    addrs: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    /// `NAME=PORT/PROTO`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ports: Vec<String>,
}

impl Entry {
    fn of(w: &Workload) -> Entry {
        Entry {
            namespace: w.reference.namespace.clone(),
            name: w.reference.name.clone(),
            uid: w.reference.uid.clone(),
            service_account: w.service_account.clone(),
            node: w.node.to_string(),
            addrs: w.addrs.clone(),
            labels: w.labels.clone(),
            ports: w.ports.iter().map(ToString::to_string).collect(),
        }
    }

    fn workload(self) -> anyhow::Result<Workload> {
        let node = parse_node(&self.node)?;
        let ports = self
            .ports
            .iter()
            .map(|p| {
                p.parse::<NamedPort>()
                    .map_err(|e| anyhow!("port `{p}`: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Workload {
            reference: WorkloadRef {
                namespace: self.namespace,
                name: self.name,
                uid: self.uid,
            },
            service_account: self.service_account,
            labels: self.labels,
            addrs: self.addrs,
            ports,
            node,
        })
    }
}

/// `NAMESPACE/NAME` of a node.
fn parse_node(s: &str) -> anyhow::Result<NodeName> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(NodeName {
                namespace: ns.to_string(),
                name: name.to_string(),
            })
        }
        _ => Err(anyhow!(
            "node `{s}`: expected NAMESPACE/NAME, as the node's certificate names it"
        )),
    }
}

/// The registry file of CA directory `ca`.
pub fn registry_path(ca: &Path) -> PathBuf {
    ca.join("workloads.yaml")
}

/// Reads and checks a registry file; a missing file is an empty registry.
pub fn load(path: &Path) -> anyhow::Result<Registry> {
    use std::io::Read;
    let reading = || format!("reading {}", path.display());
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Registry::default()),
        Err(e) => return Err(e).with_context(reading),
        Ok(m) if !m.is_file() => return Err(anyhow!("{}: not a regular file", path.display())),
        Ok(_) => {}
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .with_context(reading)?
        .take(MAX_REGISTRY_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(reading)?;
    if text.len() as u64 > MAX_REGISTRY_BYTES {
        return Err(anyhow!(
            "{}: larger than {MAX_REGISTRY_BYTES} bytes",
            path.display()
        ));
    }
    parse(&text).with_context(|| format!("{}", path.display()))
}

/// Checks that `ca` is a CA directory (it has ca.crt), so that a mistyped path is an error,
/// not an empty registry.
fn ca_dir(ca: &Path) -> Result<(), Failure> {
    if ca.join("ca.crt").is_file() {
        Ok(())
    } else {
        Err(Failure::input(anyhow!(
            "{} is not a CA directory (no ca.crt; see meshctl ca init)",
            ca.display()
        )))
    }
}

/// The registry's lock: an exclusive `flock` on workloads.lock in the CA directory, held from
/// reading the registry to replacing it, so two changes at once never lose one.
struct Lock(#[allow(dead_code)] std::fs::File);

fn lock(ca: &Path) -> anyhow::Result<Lock> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = ca.join("workloads.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock(2) on a descriptor we own; released when it closes.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("locking {}", path.display()));
    }
    Ok(Lock(f))
}

/// A registry from its YAML text: a list of workloads.
fn parse(text: &str) -> anyhow::Result<Registry> {
    let entries: Vec<Entry> = if text.trim().is_empty() {
        Vec::new()
    } else {
        serde_yaml_ng::from_str(text)?
    };
    let mut registry = Registry::default();
    for (i, e) in entries.into_iter().enumerate() {
        let what = format!("workload {} ({}/{})", i + 1, e.namespace, e.name);
        let w = e.workload().with_context(|| what.clone())?;
        if registry.register(w)?.is_some() {
            return Err(anyhow!("{what}: registered twice"));
        }
    }
    Ok(registry)
}

fn render(registry: &Registry) -> String {
    let entries: Vec<Entry> = registry.iter().map(Entry::of).collect();
    let body = if entries.is_empty() {
        String::new()
    } else {
        serde_yaml_ng::to_string(&entries).expect("a registry encodes")
    };
    format!(
        "# Workloads an online issuer may certify: written by `meshctl workload register`.\n{body}"
    )
}

fn save(path: &Path, registry: &Registry) -> anyhow::Result<()> {
    keyfile::replace(path, render(registry).as_bytes(), 0o600)
}

#[derive(clap::Args)]
pub struct RegisterArgs {
    /// The CA directory whose registry (workloads.yaml) this changes.
    #[arg(long, value_name = "DIR")]
    pub ca: PathBuf,
    /// The workload's namespace.
    #[arg(long)]
    pub namespace: String,
    /// The workload's name (a pod's name; a VM service's name).
    #[arg(long)]
    pub name: String,
    /// Tells this workload from an earlier one of the same name (a pod's UID); made up when
    /// left out.
    #[arg(long)]
    pub uid: Option<String>,
    /// The service account: the name its certificate will carry.
    #[arg(long)]
    pub service_account: String,
    /// The node that runs it: NAMESPACE/NAME of that node's certificate.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub node: String,
    /// An overlay address (/32 or /128); repeat for more.
    #[arg(long = "ip", required = true)]
    pub ips: Vec<Cidr>,
    /// A label KEY=VALUE; repeat for more.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// A named port NAME=PORT[/tcp|udp|sctp]; repeat for more.
    #[arg(long = "port", value_name = "NAME=PORT/PROTO")]
    pub ports: Vec<NamedPort>,
}

pub fn register(a: RegisterArgs) -> Result<(), Failure> {
    let input = Failure::input;
    let labels = crate::identity::parse_labels(&a.labels)?;
    let node = parse_node(&a.node).map_err(|e| input(anyhow!("--node: {e}")))?;
    ca_dir(&a.ca)?;
    let _lock = lock(&a.ca)?;
    let path = registry_path(&a.ca);
    let mut registry = load(&path)?;
    // Without --uid, the same workload on the same node keeps its UID (a change of labels is
    // not a new pod); anything else is a new one.
    let uid = a.uid.unwrap_or_else(|| {
        registry
            .workload(&a.namespace, &a.name)
            .filter(|w| w.node == node)
            .map(|w| w.reference.uid.clone())
            .unwrap_or_else(|| format!("{:016x}", crate::ca::new_serial()))
    });
    let w = Workload {
        reference: WorkloadRef {
            namespace: a.namespace,
            name: a.name,
            uid,
        },
        service_account: a.service_account,
        labels,
        addrs: a.ips,
        ports: a.ports,
        node,
    };
    let said = format!(
        "{}/{} (uid {}) on {}",
        w.reference.namespace, w.reference.name, w.reference.uid, w.node
    );
    let replaced = registry
        .register(w)
        .map_err(|e| input(anyhow!("{e}; the registry is unchanged")))?;
    save(&path, &registry)?;
    match replaced {
        Some(old) => println!(
            "registered {said}, replacing uid {} on {}",
            old.reference.uid, old.node
        ),
        None => println!("registered {said}"),
    }
    Ok(())
}

pub fn remove(ca: &Path, namespace: &str, name: &str) -> Result<(), Failure> {
    ca_dir(ca)?;
    let _lock = lock(ca)?;
    let path = registry_path(ca);
    let mut registry = load(&path)?;
    let Some(old) = registry.remove(namespace, name) else {
        return Err(Failure::input(anyhow!(
            "no workload {namespace}/{name} in {}",
            path.display()
        )));
    };
    save(&path, &registry)?;
    println!(
        "removed {namespace}/{name} (uid {}) from {}",
        old.reference.uid, old.node
    );
    Ok(())
}

pub fn list(ca: &Path, output: Output) -> Result<(), Failure> {
    ca_dir(ca)?;
    let registry = load(&registry_path(ca))?;
    let entries: Vec<Entry> = registry.iter().map(Entry::of).collect();
    let Some(wide) = output.data(&entries)? else {
        return Ok(());
    };
    println!(
        "NAMESPACE/NAME\tSERVICE ACCOUNT\tNODE\tADDRESSES{}",
        if wide { "\tUID\tLABELS" } else { "" }
    );
    for e in &entries {
        let addrs: Vec<String> = e.addrs.iter().map(ToString::to_string).collect();
        print!(
            "{}/{}\t{}\t{}\t{}",
            e.namespace,
            e.name,
            e.service_account,
            e.node,
            addrs.join(",")
        );
        if wide {
            let labels: Vec<String> = e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            print!("\t{}\t{}", e.uid, labels.join(","));
        }
        println!();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# a comment
- namespace: microblog
  name: post-1
  uid: u1
  serviceAccount: post
  node: nodes/node-a
  addrs: [100.64.1.5/32]
  labels: {app: post}
  ports: [http=8080/tcp]
- namespace: microblog
  name: api-1
  uid: u2
  serviceAccount: api
  node: nodes/node-b
  addrs: [100.64.2.5/32, fd00::2:5/128]
";

    #[test]
    fn a_registry_file_round_trips() {
        let r = parse(FILE).unwrap();
        assert_eq!(r.iter().count(), 2);
        let again = parse(&render(&r)).unwrap();
        assert_eq!(again, r);
        assert!(parse("").unwrap().iter().next().is_none());
        assert!(parse(&render(&Registry::default()))
            .unwrap()
            .iter()
            .next()
            .is_none());
    }

    #[test]
    fn a_bad_registry_file_says_which_workload_and_what() {
        let err = |text: &str| format!("{:#}", parse(text).unwrap_err());
        let e = err(&FILE.replace("serviceAccount: api", "serviceAcount: api"));
        assert!(e.contains("unknown field `serviceAcount`"), "{e}");
        let e = err(&FILE.replace("nodes/node-b", "node-b"));
        assert!(
            e.contains("workload 2 (microblog/api-1)") && e.contains("NAMESPACE/NAME"),
            "{e}"
        );
        let e = err(&FILE.replace("100.64.2.5/32", "100.64.1.5/32"));
        assert!(e.contains("is held by microblog/post-1"), "{e}");
        let e = err(&FILE.replace("http=8080/tcp", "http=80/icmp"));
        assert!(
            e.contains("workload 1 (microblog/post-1)") && e.contains("port"),
            "{e}"
        );
        let e = err(&FILE.replace("name: api-1", "name: post-1"));
        assert!(
            e.contains("workload 2 (microblog/post-1): registered twice"),
            "{e}"
        );
        let e = err("namespace: x");
        assert!(e.contains("invalid type"), "{e}");
    }
}

/// A workload as a node names it: for Kubernetes, the pod's namespace, name and UID.
#[derive(clap::Args, Clone, Debug)]
pub struct RefArgs {
    /// The workload's namespace.
    #[arg(long)]
    pub namespace: String,
    /// The workload's name (for Kubernetes, the pod's).
    #[arg(long)]
    pub name: String,
    /// The workload's UID.
    #[arg(long)]
    pub uid: String,
}

/// `meshctl workload attach`: answered once the node holds the workload's certificate in force.
pub fn attach(socket: &Path, r: RefArgs, wait: &str) -> Result<(), Failure> {
    let wait = proto::duration::parse(wait).map_err(|e| Failure::input(anyhow!("--wait: {e}")))?;
    let req = proto::admin::Request::WorkloadAttach {
        namespace: r.namespace,
        name: r.name,
        uid: r.uid,
        wait_ms: wait.as_millis() as u64,
    };
    let what = match &req {
        proto::admin::Request::WorkloadAttach {
            namespace, name, ..
        } => format!("{namespace}/{name}"),
        _ => unreachable!("made above"),
    };
    match crate::status::request(socket, &req)? {
        proto::admin::Response::Workload {
            identity,
            addresses,
            not_after,
        } => {
            println!(
                "workload {what} is {identity} ({}), until {}",
                proto::cert::list(&addresses),
                crate::identity::utc(not_after)
            );
            Ok(())
        }
        other => crate::peer::done(other),
    }
}

/// `meshctl workload detach`.
pub fn detach(socket: &Path, r: RefArgs) -> Result<(), Failure> {
    let req = proto::admin::Request::WorkloadDetach {
        namespace: r.namespace,
        name: r.name,
        uid: r.uid,
    };
    crate::peer::done(crate::status::request(socket, &req)?)
}
