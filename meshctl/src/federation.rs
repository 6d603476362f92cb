//! `meshctl federation add | list | remove`: trust another cluster's CAs within a scope. A
//! federation is a `mesh.io/v1` `Federation` object of the policy set (`policy::federation`):
//! signed here with the policy-admin key, handed to the local meshd, and spread to every node of
//! this trust domain like any change to the set.

use crate::policy_set::{current, merge, push, validate};
use crate::{Failure, Output};
use anyhow::{anyhow, Context};
use policy::model::{located_objects, Document};
use proto::trust::Federation;
use std::collections::BTreeMap;
use std::path::Path;

pub struct AddArgs<'a> {
    pub trust_domain: &'a str,
    pub bundle: &'a Path,
    pub namespaces: &'a [String],
    pub addresses: &'a [String],
    pub routes: &'a [String],
    pub key: &'a Path,
}

/// The object name of the federation with `td`.
fn object_name(td: &str) -> String {
    format!("Federation {td}")
}

/// A YAML flow list of plain strings (CIDRs and DNS names need no quoting).
fn flow_list(items: &[String]) -> String {
    format!("[{}]", items.join(", "))
}

/// The daemon's own trust domain (its identity is TD/NS/NAME).
fn own_trust_domain(socket: &Path) -> Result<Option<String>, Failure> {
    match crate::status::request(socket, &proto::admin::Request::Status)? {
        proto::admin::Response::Status(s) => Ok(s
            .identity
            .and_then(|i| i.split('/').next().map(str::to_string))),
        other => Err(anyhow!("unexpected answer {other:?}").into()),
    }
}

/// `meshctl federation add`: adds (or replaces) the federation with a trust domain.
pub fn add(socket: &Path, a: AddArgs) -> Result<(), Failure> {
    let input = |e: anyhow::Error| Failure::input(e);
    let bundle_text = std::fs::read_to_string(a.bundle)
        .with_context(|| format!("--bundle {}", a.bundle.display()))
        .map_err(input)?;
    if own_trust_domain(socket)?.as_deref() == Some(a.trust_domain) {
        return Err(input(anyhow!(
            "--trust-domain {}: that is this mesh's own trust domain; its CAs belong in trust.bundle",
            a.trust_domain
        )));
    }
    // Without --addresses, the remote CAs' own ranges are the scope; one of them must list some.
    let mut addresses = a.addresses.to_vec();
    if addresses.is_empty() {
        for block in proto::armor::decode_all(proto::armor::CERTIFICATE, &bundle_text)
            .map_err(|e| input(anyhow!("--bundle {}: {e}", a.bundle.display())))?
        {
            if let Ok(ca) = proto::cert::Certificate::decode(&block) {
                addresses.extend(ca.body.addrs.iter().map(|c| c.to_string()));
            }
        }
        if addresses.is_empty() {
            return Err(input(anyhow!(
                "--addresses: give the overlay ranges {}'s identities may hold (its CA lists none)",
                a.trust_domain
            )));
        }
    }
    let indented: String = bundle_text.lines().map(|l| format!("    {l}\n")).collect();
    let yaml = format!(
        "apiVersion: {}\nkind: {}\nmetadata:\n  name: {}\nspec:\n  addresses: {}\n  namespaces: {}\n  routes: {}\n  bundle: |\n{indented}",
        policy::federation::API_VERSION,
        policy::federation::KIND,
        a.trust_domain,
        flow_list(&addresses),
        flow_list(a.namespaces),
        flow_list(a.routes),
    );
    let new = located_objects(&yaml, "the federation").map_err(|e| {
        input(anyhow!(
            "{}",
            e.iter()
                .map(|e| e.message.clone())
                .collect::<Vec<_>>()
                .join("; ")
        ))
    })?;
    let new: Vec<policy::model::Object> = new.into_iter().map(|(_, o)| o).collect();
    let (serial, old) = current(socket)?;
    let merged = merge(&old, &new);
    validate(&merged, &BTreeMap::new())?;
    if merged == old {
        println!(
            "federation {} unchanged; policy set {serial} stays in force",
            a.trust_domain
        );
        return Ok(());
    }
    let verb = if old.contains_key(&object_name(a.trust_domain)) {
        "replaced"
    } else {
        "added"
    };
    let message = push(socket, a.key, serial, &merged)?;
    println!("federation {} {verb}", a.trust_domain);
    println!("{message}");
    Ok(())
}

/// `meshctl federation remove TD`: every member of that trust domain is cut.
pub fn remove(socket: &Path, td: &str, key: &Path) -> Result<(), Failure> {
    let (serial, mut objs) = current(socket)?;
    if objs.remove(&object_name(td)).is_none() {
        return Err(anyhow!("no federation with {td} in policy set {serial}").into());
    }
    let message = push(socket, key, serial, &objs)?;
    println!("federation {td} removed: its members are cut");
    println!("{message}");
    Ok(())
}

/// The federations of the set in force.
fn federations(socket: &Path) -> Result<(u64, Vec<Federation>), Failure> {
    let (serial, objs) = current(socket)?;
    let mut out = Vec::new();
    for o in objs.values().filter(|o| o.name.starts_with("Federation ")) {
        let docs = policy::model::parse_documents(&o.yaml, &o.name)
            .map_err(|e| anyhow!("{}: {}", o.name, e[0]))?;
        for d in docs {
            if let Document::Federation { metadata, spec } = d {
                out.push(
                    policy::federation::federation(&metadata.name, &spec)
                        .map_err(|e| anyhow!("{}: {e}", o.name))?,
                );
            }
        }
    }
    Ok((serial, out))
}

#[derive(serde::Serialize)]
struct View {
    trust_domain: String,
    cas: Vec<CaView>,
    addresses: Vec<String>,
    namespaces: Vec<String>,
    routes: Vec<String>,
}

#[derive(serde::Serialize)]
struct CaView {
    name: String,
    public_key: String,
    not_after: String,
}

/// `meshctl federation list [-o table|json]`.
pub fn list(socket: &Path, output: Output) -> Result<(), Failure> {
    let (serial, feds) = federations(socket)?;
    let views: Vec<View> = feds
        .iter()
        .map(|f| View {
            trust_domain: f.trust_domain.clone(),
            cas: f
                .cas
                .iter()
                .map(|c| CaView {
                    name: c.body.name.clone(),
                    public_key: proto::Key(c.body.public_key).to_base64(),
                    not_after: crate::identity::utc(c.body.not_after),
                })
                .collect(),
            addresses: f.addresses.iter().map(|c| c.to_string()).collect(),
            namespaces: f.namespaces.clone(),
            routes: f.routes.iter().map(|c| c.to_string()).collect(),
        })
        .collect();
    if let Some(_wide) =
        output.data(&serde_json::json!({ "serial": serial, "federations": views }))?
    {
        println!("policy set {serial}: {} federation(s)", views.len());
        for v in &views {
            let any = |l: &[String]| {
                if l.is_empty() {
                    "any".to_string()
                } else {
                    l.join(",")
                }
            };
            println!("{}", v.trust_domain);
            println!("  addresses   {}", v.addresses.join(","));
            println!("  namespaces  {}", any(&v.namespaces));
            println!(
                "  routes      {}",
                if v.routes.is_empty() {
                    "none".into()
                } else {
                    v.routes.join(",")
                }
            );
            for c in &v.cas {
                println!(
                    "  ca          {} {} (until {})",
                    c.name, c.public_key, c.not_after
                );
            }
        }
    }
    Ok(())
}
