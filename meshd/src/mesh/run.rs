//! The async shell around [`Membership`]: control datagrams in from the UDP thread, a tick, and
//! the actions carried out on the device, the kernel (addresses, routes) and the state directory.

use super::{state, Action, MemberState, Membership};
use crate::config::{Config, Identity};
use crate::device::Device;
use crate::netlink::Netlink;
use parking_lot::Mutex;
use proto::uapi::{PeerUpdate, SetRequest};
use proto::Key;
use rand_core::OsRng;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Control datagrams waiting for the mesh task; more are dropped and counted.
pub const CONTROL_BACKLOG: usize = 1024;
/// How often membership is re-checked (expiry is cut within this, plus the check itself).
const TICK: Duration = Duration::from_millis(500);
/// Control datagrams per second (and burst) accepted from one source address.
const PER_SOURCE_RATE: u32 = 50;
const PER_SOURCE_BURST: u32 = 100;
const MAX_SOURCES: usize = 4096;

/// Keepalive for mesh peers, so NAT and stateful firewalls keep the path open.
const KEEPALIVE_SECS: u16 = 25;

/// What the operator asks of the mesh task (SIGHUP and the admin socket).
pub enum Command {
    Reload,
    AddPeer(SocketAddr),
    /// Forget a member by base64 public key or `TD/NS/NAME`; the answer says whom.
    RemovePeer {
        id: String,
        reply: tokio::sync::oneshot::Sender<Result<String, String>>,
    },
}

/// Members as the admin socket shows them.
pub type MemberView = Arc<Mutex<BTreeMap<[u8; 32], MemberState>>>;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub struct Mesh {
    membership: Membership,
    config_path: PathBuf,
    dev: Arc<Device>,
    netlink: Netlink,
    state_dir: PathBuf,
    view: MemberView,
}

impl Mesh {
    /// Sets the device up for mesh mode (key, port, addresses) and restores saved members.
    pub async fn start(
        dev: Arc<Device>,
        config_path: PathBuf,
        cfg: &Config,
        id: Identity,
        view: MemberView,
    ) -> anyhow::Result<Mesh> {
        let set = SetRequest {
            private_key: Some(Some(id.private_key)),
            listen_port: Some(cfg.interface.listen_port),
            ..SetRequest::default()
        };
        dev.apply(&set)
            .map_err(|e| anyhow::anyhow!("configuring the interface: {e}"))?;
        let netlink = Netlink::connect(&cfg.interface.name)?;
        for a in &id.certificate.body.addrs {
            netlink.add_address(*a).await?;
        }
        let secret = x25519_dalek::StaticSecret::from(id.private_key.0);
        let mut membership = Membership::new(
            secret,
            id.certificate,
            id.bundle,
            id.revocation_lists,
            now_ms(),
        );
        for s in cfg.seeds() {
            membership.add_seed(s, &mut OsRng);
        }
        let mut mesh = Mesh {
            membership,
            config_path,
            dev,
            netlink,
            state_dir: cfg.peering.state_dir.clone(),
            view,
        };
        let saved = state::load(&mesh.state_dir);
        tracing::info!(members = saved.len(), dir = %mesh.state_dir.display(), "restoring saved members");
        for (cert, ep) in saved {
            let actions = mesh.membership.restore(cert, ep, now_ms());
            mesh.execute(actions).await;
        }
        Ok(mesh)
    }

    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<(SocketAddr, Vec<u8>)>,
        mut commands: mpsc::Receiver<Command>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        let mut limiter =
            super::ratelimit::SourceLimiter::new(PER_SOURCE_RATE, PER_SOURCE_BURST, MAX_SOURCES);
        loop {
            let actions = tokio::select! {
                Some(cmd) = commands.recv() => match self.command(cmd).await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "command refused; the running configuration stays in force");
                        continue;
                    }
                },
                Some((from, datagram)) = rx.recv() => {
                    if !limiter.allow(from.ip(), now_ms()) {
                        self.dev.count_control_refusal();
                        continue;
                    }
                    match self.membership.on_datagram(now_ms(), from, &datagram, &mut OsRng) {
                        Ok(a) => a,
                        Err(refusal) => {
                            tracing::debug!(%from, %refusal, "control datagram refused");
                            self.dev.count_control_refusal();
                            continue;
                        }
                    }
                }
                _ = tick.tick() => self.membership.on_tick(now_ms(), &mut OsRng),
            };
            self.execute(actions).await;
        }
    }

    async fn command(&mut self, cmd: Command) -> anyhow::Result<Vec<Action>> {
        match cmd {
            Command::Reload => self.reload().await,
            Command::AddPeer(addr) => {
                self.membership.add_seed(addr, &mut OsRng);
                Ok(self.membership.on_tick(now_ms(), &mut OsRng))
            }
            Command::RemovePeer { id, reply } => {
                let found = self.membership.members().iter().find(|(k, m)| {
                    Key(**k).to_base64() == id || m.certificate.body.identity() == id
                });
                match found.map(|(k, m)| (*k, m.certificate.body.identity())) {
                    Some((key, identity)) => {
                        let _ = reply.send(Ok(format!("removed {identity} ({})", Key(key))));
                        Ok(self.membership.forget(&key))
                    }
                    None => {
                        let _ = reply.send(Err(format!("no member {id}")));
                        Ok(Vec::new())
                    }
                }
            }
        }
    }

    /// Re-reads the configuration's identity, trust bundle and revocation lists (SIGHUP or
    /// `meshctl reload`). A renewed certificate and key take effect without a restart: the
    /// device gets the new key, members get the new certificate, sessions re-handshake.
    async fn reload(&mut self) -> anyhow::Result<Vec<Action>> {
        let (_, id) = crate::read_config(&self.config_path)?;
        let now = now_ms();
        let mut actions = Vec::new();
        for crl in id.revocation_lists.iter().cloned() {
            actions.extend(
                self.membership
                    .add_revocation(now, crl, &mut OsRng)
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            );
        }
        if id.certificate != *self.membership.certificate() {
            let set = SetRequest {
                private_key: Some(Some(id.private_key)),
                ..SetRequest::default()
            };
            self.dev
                .apply(&set)
                .map_err(|e| anyhow::anyhow!("new private key: {e}"))?;
            for a in &id.certificate.body.addrs {
                self.netlink.add_address(*a).await?;
            }
            tracing::info!(identity = %id.certificate.body.identity(), serial = id.certificate.body.serial, "identity renewed");
            let secret = x25519_dalek::StaticSecret::from(id.private_key.0);
            actions.extend(self.membership.renew(
                secret,
                id.certificate,
                id.bundle,
                now,
                &mut OsRng,
            ));
        }
        Ok(actions)
    }

    async fn execute(&mut self, actions: Vec<Action>) {
        let mut persist = false;
        for a in actions {
            match a {
                Action::Send { to, datagram } => {
                    if let Err(e) = self.dev.send_datagram(&datagram, to) {
                        tracing::debug!(%to, error = %e, "control send failed");
                    }
                }
                Action::Install {
                    key,
                    endpoint,
                    addrs,
                } => {
                    let upd = PeerUpdate {
                        public_key: Key(key),
                        remove: false,
                        update_only: false,
                        preshared_key: None,
                        endpoint: Some(endpoint),
                        persistent_keepalive_secs: Some(KEEPALIVE_SECS),
                        replace_allowed_ips: true,
                        allowed_ips: addrs.clone(),
                    };
                    if let Err(e) = self.dev.apply(&SetRequest {
                        peers: vec![upd],
                        ..SetRequest::default()
                    }) {
                        tracing::warn!(peer = %Key(key), error = %e, "installing peer failed");
                    }
                    for a in addrs {
                        if let Err(e) = self.netlink.add_route(a).await {
                            tracing::warn!(error = %e, "route");
                        }
                    }
                    if let Some(m) = self.membership.members().get(&key) {
                        tracing::info!(peer = %Key(key), identity = %m.certificate.body.identity(), %endpoint, "peer installed");
                    }
                }
                Action::Remove { key, addrs, reason } => {
                    let upd = PeerUpdate {
                        public_key: Key(key),
                        remove: true,
                        update_only: false,
                        preshared_key: None,
                        endpoint: None,
                        persistent_keepalive_secs: None,
                        replace_allowed_ips: false,
                        allowed_ips: vec![],
                    };
                    let _ = self.dev.apply(&SetRequest {
                        peers: vec![upd],
                        ..SetRequest::default()
                    });
                    for a in addrs {
                        let _ = self.netlink.del_route(a).await;
                    }
                    tracing::info!(peer = %Key(key), %reason, "peer removed");
                }
                Action::Persist => persist = true,
            }
        }
        if persist {
            *self.view.lock() = self.membership.members().clone();
            if let Err(e) = state::save(&self.state_dir, self.membership.members()) {
                tracing::warn!(error = %e, "saving members");
            }
        }
    }
}
