//! `meshctl flows [--follow] [--denied] [--staged] [-o table|wide|json|yaml]`: the flow log of
//! the local meshd.

use crate::status::request;
use crate::{Failure, Output};
use anyhow::{anyhow, Context};
use proto::admin::{FlowEnd, FlowRecord, Request, Response};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// How often `--follow` asks for new records.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

/// Which records `meshctl flows` asks for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Filter {
    /// Only flows denied (or audited) by the enforced policies.
    pub denied: bool,
    /// Only new flows the staged policies would deny.
    pub staged: bool,
}

pub fn run(socket: &Path, follow: bool, filter: Filter, output: Output) -> Result<(), Failure> {
    let mut since = 0;
    let mut out = std::io::stdout().lock();
    if matches!(output, Output::Table | Output::Wide) {
        writeln!(
            out,
            "{:<24} {:<7} {:<8} {:<12} {:<8} {:<56} {:<56} POLICY",
            "TIME", "EVENT", "DIR", "VERDICT", "PROTO", "SOURCE", "DESTINATION"
        )
        .context("writing stdout")?;
    }
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
        for r in &records {
            let line = match output {
                Output::Json => serde_json::to_string(r).context("encoding")?,
                Output::Yaml => format!(
                    "---\n{}",
                    serde_yaml_ng::to_string(r).context("encoding")?.trim_end()
                ),
                Output::Table => row(r, false),
                Output::Wide => row(r, true),
            };
            if writeln!(out, "{line}").is_err() {
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
    let mut line = format!(
        "{:<24} {:<7} {:<8} {:<12} {:<8} {:<56} {:<56} {policy}",
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
