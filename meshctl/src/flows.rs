//! `meshctl flows [--mesh] [--follow] [--denied] [--staged] [--since D] [--from ID] [--to ID]
//! [--policy NAME] [-o table|wide|json|yaml]`: the flow log of the local meshd, or of every node
//! of the mesh.

use crate::status::request;
use crate::{Failure, Output};
use anyhow::{anyhow, Context};
use proto::admin::{FlowEnd, FlowRecord, Request, Response};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// How often `--follow` asks for new records.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

/// Which records `meshctl flows` shows.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only flows denied (or audited, or rate-limited) by the enforced policies.
    pub denied: bool,
    /// Only new flows the staged policies would deny.
    pub staged: bool,
    /// Only records of the last this long.
    pub since: Option<Duration>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub policy: Option<String>,
}

impl Filter {
    /// The RFC 3339 time records must be at or after, if `since` is given.
    fn not_before(&self) -> Option<String> {
        let t = std::time::SystemTime::now().checked_sub(self.since?)?;
        Some(humantime::format_rfc3339_millis(t).to_string())
    }

    /// Whether `r` passes the filters the daemon does not apply itself.
    fn keeps(&self, r: &FlowRecord, not_before: Option<&str>) -> bool {
        let names = |e: &FlowEnd, id: &str| {
            let full = match (&e.trust_domain, &e.namespace, &e.name) {
                (Some(td), Some(ns), Some(n)) => {
                    Some((format!("{td}/{ns}/{n}"), format!("{ns}/{n}")))
                }
                _ => None,
            };
            e.ip == id
                || e.spiffe_id.as_deref() == Some(id)
                || full.is_some_and(|(a, b)| a == id || b == id)
        };
        let policy = |p: &str| {
            r.policy == p
                || r.policy.ends_with(&format!(" {p}"))
                || r.policy.ends_with(&format!("/{p}"))
        };
        not_before.is_none_or(|t| r.time.as_str() >= t)
            && (!self.denied || r.verdict != "allow")
            && (!self.staged || r.staged.as_ref().is_some_and(|s| s.verdict == "deny"))
            && self.from.as_deref().is_none_or(|id| names(&r.src, id))
            && self.to.as_deref().is_none_or(|id| names(&r.dst, id))
            && self.policy.as_deref().is_none_or(policy)
    }
}

fn header(out: &mut impl Write, output: Output, mesh: bool) -> Result<(), Failure> {
    if matches!(output, Output::Table | Output::Wide) {
        let node = if mesh {
            format!("{:<32} ", "NODE")
        } else {
            String::new()
        };
        writeln!(
            out,
            "{node}{:<24} {:<7} {:<8} {:<12} {:<8} {:<56} {:<56} POLICY",
            "TIME", "EVENT", "DIR", "VERDICT", "PROTO", "SOURCE", "DESTINATION"
        )
        .context("writing stdout")?;
    }
    Ok(())
}

/// Prints `r`; false once stdout is closed (a pager quit).
fn print(out: &mut impl Write, r: &FlowRecord, output: Output) -> Result<bool, Failure> {
    let line = match output {
        Output::Json => serde_json::to_string(r).context("encoding")?,
        Output::Yaml => format!(
            "---\n{}",
            serde_yaml_ng::to_string(r).context("encoding")?.trim_end()
        ),
        Output::Table => row(r, false),
        Output::Wide => row(r, true),
    };
    Ok(writeln!(out, "{line}").is_ok())
}

/// `meshctl flows --mesh`: signs a query with the policy-admin key for the local node, which
/// asks every member of its trust domain and merges the answers by time; `follow` asks again
/// each second from where each node's answer ended.
pub fn mesh(
    socket: &Path,
    key: &Path,
    follow: bool,
    filter: &Filter,
    output: Output,
) -> Result<(), Failure> {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use rand_core::RngCore;
    let admin = crate::policy_set::signing_key(key)?;
    let requester = match request(socket, &Request::Status)? {
        Response::Status(s) => s
            .public_key
            .as_deref()
            .and_then(|k| proto::Key::from_base64(k).ok())
            .ok_or_else(|| anyhow!("the interface has no key yet"))?,
        Response::Error { message } => return Err(anyhow!("meshd refused: {message}").into()),
        other => return Err(anyhow!("unexpected answer {other:?}").into()),
    };
    let since = filter
        .since
        .and_then(|d| std::time::SystemTime::now().checked_sub(d))
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let not_before = filter.not_before();
    let mut cursors: Vec<([u8; 32], u64)> = Vec::new();
    let mut out = std::io::stdout().lock();
    header(&mut out, output, true)?;
    loop {
        let query = proto::flowquery::FlowQuery {
            admin: [0; 32],
            requester: requester.0,
            nonce: rand_core::OsRng.next_u64(),
            issued_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            since,
            denied_only: filter.denied,
            limit: proto::flowquery::MAX_LIMIT,
            cursors: cursors.clone(),
        }
        .sign(&admin);
        let answer = match request(
            socket,
            &Request::MeshFlows {
                query: STANDARD.encode(query),
            },
        )? {
            Response::MeshFlows(a) => a,
            Response::Error { message } => return Err(anyhow!("meshd refused: {message}").into()),
            other => return Err(anyhow!("unexpected answer {other:?}").into()),
        };
        for r in answer
            .records
            .iter()
            .filter(|r| filter.keeps(r, not_before.as_deref()))
        {
            if !print(&mut out, r, output)? {
                return Ok(());
            }
        }
        let _ = out.flush();
        for n in &answer.nodes {
            if !n.answered && !follow {
                eprintln!("{}: did not answer in time", n.node);
            }
        }
        if !follow {
            return Ok(());
        }
        cursors = answer
            .nodes
            .iter()
            .filter_map(|n| Some((proto::Key::from_base64(&n.public_key).ok()?.0, n.next)))
            .collect();
        std::thread::sleep(Duration::from_secs(1));
    }
}

pub fn run(socket: &Path, follow: bool, filter: &Filter, output: Output) -> Result<(), Failure> {
    let mut since = 0;
    let not_before = filter.not_before();
    let mut out = std::io::stdout().lock();
    header(&mut out, output, false)?;
    loop {
        let (records, next) = match request(
            socket,
            &Request::Flows {
                since,
                denied_only: filter.denied,
                staged_denied: filter.staged,
                limit: 1000,
            },
        )? {
            Response::Flows { records, next } => (records, next),
            Response::Error { message } => return Err(anyhow!("meshd refused: {message}").into()),
            other => return Err(anyhow!("unexpected answer {other:?}").into()),
        };
        for r in records
            .iter()
            .filter(|r| filter.keeps(r, not_before.as_deref()))
        {
            if !print(&mut out, r, output)? {
                return Ok(()); // stdout closed (a pager quit): not an error
            }
        }
        let _ = out.flush();
        since = next;
        if !follow {
            return Ok(());
        }
        if records.len() < 1000 {
            std::thread::sleep(FOLLOW_POLL);
        }
    }
}

/// `SPIFFE_ID@IP[:PORT]`, or `?@IP` for an address no certificate names.
fn end(e: &FlowEnd) -> String {
    let who = e.spiffe_id.as_deref().unwrap_or("?");
    match e.port {
        Some(p) => format!("{who}@{}:{p}", e.ip),
        None => format!("{who}@{}", e.ip),
    }
}

/// One record; `wide` adds each end's labels.
fn row(r: &FlowRecord, wide: bool) -> String {
    let mut policy = r.policy.clone();
    if let Some(rule) = &r.rule {
        policy.push_str(&format!(" {rule}"));
    }
    if let (Some(p), Some(b)) = (r.packets, r.bytes) {
        policy.push_str(&format!(" ({p} packets, {b} bytes)"));
    }
    if let Some(s) = &r.staged {
        policy.push_str(&format!(" [staged: {} by {}", s.verdict, s.policy));
        if let Some(rule) = &s.rule {
            policy.push_str(&format!(" {rule}"));
        }
        policy.push(']');
    }
    let node = match &r.node {
        Some(n) => format!("{n:<32} "),
        None => String::new(),
    };
    let mut line = format!(
        "{node}{:<24} {:<7} {:<8} {:<12} {:<8} {:<56} {:<56} {policy}",
        r.time,
        r.event,
        r.direction,
        r.verdict,
        r.protocol,
        end(&r.src),
        end(&r.dst)
    );
    if wide {
        let labels = |e: &FlowEnd| {
            let l: Vec<String> = e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            if l.is_empty() {
                "-".to_string()
            } else {
                l.join(",")
            }
        };
        line.push_str(&format!(" src[{}] dst[{}]", labels(&r.src), labels(&r.dst)));
    }
    line
}
