//! The kernel side of serving routes as a gateway. Forwarding is the operator's switch: meshd
//! checks that it is on (it does not turn it on for the whole network namespace). With
//! `masquerade`, an nftables table of meshd's own rewrites the source of traffic forwarded from
//! the mesh interface to this node's address on the way out, so the external network needs no
//! route back into the overlay; it is replaced at start and removed at a clean stop.

use anyhow::{bail, Context};
use proto::Cidr;
use std::io::Write;
use std::process::{Command, Stdio};

/// Fails, naming the sysctl, unless forwarding is on for every address family of `routes`.
pub fn check(routes: &[Cidr]) -> anyhow::Result<()> {
    let on = |path: &str| {
        std::fs::read_to_string(path)
            .map(|v| v.trim() == "1")
            .unwrap_or(false)
    };
    if routes.iter().any(|r| r.addr().is_ipv4()) && !on("/proc/sys/net/ipv4/ip_forward") {
        bail!(
            "gateway.routes: IPv4 forwarding is off in this network namespace; a gateway forwards \
             (sysctl -w net.ipv4.ip_forward=1)"
        );
    }
    if routes.iter().any(|r| r.addr().is_ipv6()) && !on("/proc/sys/net/ipv6/conf/all/forwarding") {
        bail!(
            "gateway.routes: IPv6 forwarding is off in this network namespace; a gateway forwards \
             (sysctl -w net.ipv6.conf.all.forwarding=1)"
        );
    }
    Ok(())
}

/// meshd's masquerade table for interface `ifname`, while it lives.
pub struct Masquerade {
    table: String,
}

fn nft(script: &str) -> anyhow::Result<()> {
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // meshd holds CAP_NET_ADMIN in its permitted set only; nft needs it too.
    // SAFETY: between fork and exec, only capability system calls (no locks taken).
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let cap = caps::Capability::CAP_NET_ADMIN;
            caps::raise(None, caps::CapSet::Inheritable, cap)
                .and_then(|()| caps::raise(None, caps::CapSet::Ambient, cap))
                .map_err(std::io::Error::other)
        });
    }
    let mut child = cmd
        .spawn()
        .context("running nft (nftables) for gateway.masquerade")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .context("writing to nft")?;
    let out = child.wait_with_output().context("running nft")?;
    if !out.status.success() {
        bail!(
            "nft refused the masquerade table: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Masquerade {
    /// Installs (or replaces) the table: traffic forwarded from `ifname` to any other interface
    /// leaves with the outgoing interface's address.
    pub fn install(ifname: &str) -> anyhow::Result<Masquerade> {
        let table = format!("meshd_{}", ifname.replace(['-', '.'], "_"));
        nft(&format!(
            "table ip {table} {{}}\ndelete table ip {table}\n\
             table ip {table} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             iifname \"{ifname}\" oifname != \"{ifname}\" masquerade\n  }}\n}}\n"
        ))?;
        tracing::info!(%table, "gateway: forwarded traffic is masqueraded");
        Ok(Masquerade { table })
    }
}

impl Drop for Masquerade {
    fn drop(&mut self) {
        if let Err(e) = nft(&format!("delete table ip {}\n", self.table)) {
            tracing::warn!(error = %e, "removing the masquerade table");
        }
    }
}
