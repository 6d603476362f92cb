//! `meshctl status`: what the running daemon reports over its admin socket.

use crate::{Failure, Output};
use anyhow::{anyhow, bail, Context};
use proto::admin::{self, Request, Response, Status};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub fn run(ifname: Option<String>, output: Output, socket: Option<PathBuf>) -> Result<(), Failure> {
    let sockets: Vec<PathBuf> = match (socket, ifname) {
        (Some(s), _) => vec![s],
        (None, Some(name)) => vec![PathBuf::from(admin::socket_path(&name))],
        (None, None) => running_sockets()?,
    };
    let mut all = Vec::new();
    for s in &sockets {
        all.push(query(s)?);
    }
    let mut out = std::io::stdout().lock();
    let shown = if all.len() == 1 {
        output.data(&all[0])?
    } else {
        output.data(&all)?
    };
    if let Some(wide) = shown {
        for s in &all {
            write!(out, "{}", table(s, wide)).context("writing stdout")?;
        }
    }
    Ok(())
}

fn running_sockets() -> Result<Vec<PathBuf>, Failure> {
    let dir = Path::new(admin::SOCKET_DIR);
    let entries = std::fs::read_dir(dir)
        .map_err(|e| anyhow!("no meshd is running ({}: {e})", dir.display()))?;
    let mut v: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(anyhow!("no meshd is running (no socket in {})", dir.display()).into());
    }
    Ok(v)
}

/// Sends one request to the admin socket at `path` and returns the answer.
pub fn request(path: &Path, req: &Request) -> anyhow::Result<Response> {
    let mut stream = UnixStream::connect(path)
        .with_context(|| format!("connecting to meshd at {}", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut text = serde_json::to_string(req)?;
    text.push('\n');
    stream
        .write_all(text.as_bytes())
        .context("sending the request")?;
    let mut line = String::new();
    BufReader::new(stream)
        .take(admin::MAX_MESSAGE_BYTES as u64)
        .read_line(&mut line)
        .context("reading the answer")?;
    serde_json::from_str(&line).context("decoding the answer")
}

/// Sends one status request to the admin socket at `path`.
pub fn query(path: &Path) -> anyhow::Result<Status> {
    match request(path, &Request::Status)? {
        Response::Status(s) => Ok(s),
        Response::Error { message } => bail!("meshd refused: {message}"),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// `meshctl reload`: the daemon re-reads its identity, trust bundle and revocation lists.
/// `meshctl reload`: the daemon's answer, or exit 1 with its reason.
pub fn reload(path: &Path) -> Result<(), Failure> {
    let ifname = path
        .file_stem()
        .map_or("meshd".into(), |s| s.to_string_lossy().into_owned());
    match request(path, &Request::Reload)? {
        Response::Done { message } => {
            println!("{ifname}: {message}");
            Ok(())
        }
        Response::Error { message } => Err(anyhow!(
            "{ifname}: reload refused, the running configuration stays in force: {message}"
        )
        .into()),
        other => Err(anyhow!("unexpected answer {other:?}").into()),
    }
}

use std::io::Read;

/// A peer heard from within [`proto::admin::OFFLINE_AFTER_SECS`] (mesh peers send a keepalive
/// every 25 s).
fn online(last_seen_secs: Option<u64>) -> bool {
    last_seen_secs.is_some_and(|a| a < proto::admin::OFFLINE_AFTER_SECS)
}

/// How long until `not_after`, in the largest units that say it ("29d 23h", "5h 2m", "40s"), or
/// how long ago it passed.
fn time_left(not_after: u64, now: u64) -> String {
    let (secs, ago) = if not_after >= now {
        (not_after - now, false)
    } else {
        (now - not_after, true)
    };
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    let span = if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {}s", secs % 60)
    } else {
        format!("{secs}s")
    };
    if ago {
        format!("{span} ago")
    } else {
        format!("in {span}")
    }
}

/// EXPIRED, REVOKED (or another reason members refuse it), or EXPIRES SOON (less than a quarter
/// of its lifetime left): what the operator must act on.
fn certificate_warning(c: &proto::admin::OwnCertificate, now: u64) -> Option<String> {
    if now >= c.not_after {
        return Some("EXPIRED: members refuse this node; renew it".into());
    }
    if let Some(p) = &c.problem {
        let what = if p.contains("revoked") {
            "REVOKED"
        } else {
            "REFUSED"
        };
        return Some(format!("{what}: {p}"));
    }
    let lifetime = c.not_after.saturating_sub(c.not_before);
    (c.not_after - now < lifetime / 4).then(|| "EXPIRES SOON: renew it".to_string())
}

/// The node, then its peers; `wide` adds packet and handshake counters and what the control
/// protocol received.
fn table(s: &Status, wide: bool) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    if let Some(id) = &s.identity {
        let _ = writeln!(o, "identity {id}  {}", s.spiffe_id.as_deref().unwrap_or(""));
    }
    if let Some(c) = &s.certificate {
        let now = crate::ca::now();
        let _ = writeln!(
            o,
            "  addresses {}  serial {}  expires {} ({}){}",
            proto::cert::list(&c.addresses),
            c.serial,
            crate::identity::utc(c.not_after),
            time_left(c.not_after, now),
            match certificate_warning(c, now) {
                Some(w) => format!("  {w}"),
                None => String::new(),
            }
        );
    }
    if !s.workloads.is_empty() {
        let _ = writeln!(o, "workloads {} attached", s.workloads.len());
        let now = crate::ca::now();
        for w in &s.workloads {
            let _ = write!(
                o,
                "  {}/{} (uid {}): {}",
                w.namespace, w.name, w.uid, w.state
            );
            if let Some(c) = &w.certificate {
                let _ = write!(
                    o,
                    "  {}  {}  expires {} ({})",
                    c.identity,
                    proto::cert::list(&c.addresses),
                    crate::identity::utc(c.not_after),
                    time_left(c.not_after, now)
                );
            }
            let _ = writeln!(o);
        }
    }
    let _ = writeln!(
        o,
        "interface {}  public key {}  port {}  mtu {}",
        s.interface,
        s.public_key.as_deref().unwrap_or("(none)"),
        s.listen_port,
        s.mtu_bytes
    );
    if let Some(p) = &s.policy {
        let _ = writeln!(
            o,
            "  policy set {}  {} policies  posture {}{}  flows: {} allowed, {} denied packets, {} audited, {} cut  conntrack {} (evicted {})",
            p.serial,
            p.policies,
            p.posture,
            if p.audit { " (audit mode)" } else { "" },
            p.allowed_flows,
            p.denied_packets,
            p.audited_flows,
            p.cut_flows,
            p.conntrack_entries,
            p.conntrack_evictions
        );
    }
    if let Some(d) = &s.datapath {
        let per = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
        let _ = writeln!(
            o,
            "  datapath: tun {}  udp gso {}  tun reads {} ({:.1} segments each)  tun writes {} ({:.1} packets each)",
            d.tun_offloads,
            if d.udp_gso { "on" } else { "off" },
            d.tun_reads,
            per(d.tun_read_segments, d.tun_reads),
            d.tun_writes,
            per(d.tun_written_packets, d.tun_writes),
        );
    }
    if s.relayed_datagrams > 0 {
        let _ = writeln!(
            o,
            "  relay: {} datagrams ({} bytes) relayed between members",
            s.relayed_datagrams, s.relayed_bytes
        );
    }
    if let Some(c) = &s.control {
        let _ = writeln!(
            o,
            "  control: {} members  {} bytes in, {} out  {} Diffie-Hellman on received datagrams  {} cookie replies  refused: {}",
            c.members,
            s.control_rx_bytes,
            s.control_tx_bytes,
            c.dh_ops,
            c.cookie_replies,
            if c.refused.is_empty() {
                "-".to_string()
            } else {
                drops(&c.refused)
            }
        );
    }
    if let (true, Some(c)) = (wide, &s.control) {
        let _ = writeln!(o, "  control messages received: {}", drops(&c.received));
    }
    if !s.drops.is_empty() {
        let _ = writeln!(o, "  drops: {}", drops(&s.drops));
    }
    let _ = writeln!(
        o,
        "  {:<44}  {:<22}  {:<7}  {:>9}  {:>12}  {:>12}  DROPS",
        "PEER", "ENDPOINT", "STATE", "HANDSHAKE", "RX BYTES", "TX BYTES"
    );
    for p in &s.peers {
        let hs = p
            .handshake_age_secs
            .map(|a| format!("{a}s ago"))
            .unwrap_or_else(|| "never".into());
        let _ = writeln!(
            o,
            "  {:<44}  {:<22}  {:<7}  {:>9}  {:>12}  {:>12}  {}",
            p.public_key,
            p.endpoint.as_deref().unwrap_or("(none)"),
            if online(p.last_seen_secs) {
                "online"
            } else {
                "offline"
            },
            hs,
            p.rx_bytes,
            p.tx_bytes,
            if p.drops.is_empty() {
                "-".to_string()
            } else {
                drops(&p.drops)
            }
        );
        if let Some(id) = &p.identity {
            let spiffe = p.spiffe_id.as_deref().unwrap_or("");
            let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let expiry = p
                .cert_not_after
                .map(|t| format!("certificate expires {}", crate::identity::utc(t)))
                .unwrap_or_default();
            let ports = if p.ports.is_empty() {
                String::new()
            } else {
                format!("ports: {}  ", p.ports.join(","))
            };
            let _ = writeln!(
                o,
                "    identity: {id}  {spiffe}  labels: {}  {ports}{expiry}",
                if labels.is_empty() {
                    "-".into()
                } else {
                    labels.join(",")
                }
            );
        }
        if wide {
            let _ = writeln!(
                o,
                "    packets: {} in, {} out  handshakes received: {}  last seen: {}",
                p.rx_packets,
                p.tx_packets,
                p.handshakes,
                p.last_seen_secs
                    .map_or("never".to_string(), |a| format!("{a}s ago"))
            );
        }
        if !p.workloads.is_empty() {
            let ws: Vec<String> = p
                .workloads
                .iter()
                .map(|w| format!("{} ({})", w.identity, proto::cert::list(&w.addresses)))
                .collect();
            let _ = writeln!(o, "    workloads: {}", ws.join(", "));
        }
        let ips: Vec<String> = p.allowed_ips.iter().map(|c| c.to_string()).collect();
        let _ = writeln!(
            o,
            "    allowed ips: {}",
            if ips.is_empty() {
                "(none)".into()
            } else {
                ips.join(", ")
            }
        );
    }
    o
}

fn drops(d: &std::collections::BTreeMap<String, u64>) -> String {
    d.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(not_before: u64, not_after: u64, problem: Option<&str>) -> proto::admin::OwnCertificate {
        proto::admin::OwnCertificate {
            not_before,
            not_after,
            problem: problem.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn the_node_says_when_its_certificate_needs_the_operator() {
        let day = 86_400;
        assert_eq!(certificate_warning(&own(0, 30 * day, None), 10 * day), None);
        assert!(certificate_warning(&own(0, 30 * day, None), 25 * day)
            .unwrap()
            .starts_with("EXPIRES SOON"));
        assert!(certificate_warning(&own(0, 30 * day, None), 30 * day)
            .unwrap()
            .starts_with("EXPIRED"));
        let revoked = own(0, 30 * day, Some("serial 7 is revoked"));
        assert_eq!(
            certificate_warning(&revoked, day).unwrap(),
            "REVOKED: serial 7 is revoked"
        );
        assert_eq!(time_left(30 * day, 10 * day + 3600), "in 19d 23h");
        assert_eq!(time_left(100, 160), "1m 0s ago");
        assert!(online(Some(59)) && !online(Some(60)) && !online(None));
    }
}
