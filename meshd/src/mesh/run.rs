//! The async shell around [`Membership`]: control datagrams in from the UDP thread, a tick, and
//! the actions carried out on the device, the kernel (addresses, routes) and the state directory.

use super::policy_store::{self, PolicyStore};
use super::policy_sync::{PolicySync, SyncAction};
use super::{state, Action, MemberState, Membership};
use crate::config::{Config, Identity};
use crate::device::Device;
use crate::enforce::flowlog::FlowLog;
use crate::enforce::Enforcer;
use crate::netlink::Netlink;
use anyhow::Context;
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
    AddPeer(proto::control::Seed),
    /// Forget a member by base64 public key or `TD/NS/NAME`; the answer says whom.
    RemovePeer {
        id: String,
        reply: tokio::sync::oneshot::Sender<Result<String, String>>,
    },
    /// Install a signed policy set (its encoding) and pass it on to every member.
    ApplyPolicy {
        encoded: Vec<u8>,
        reply: tokio::sync::oneshot::Sender<Result<String, String>>,
    },
    /// The signed policy set in force (its encoding), if any.
    GetPolicy {
        reply: tokio::sync::oneshot::Sender<Option<Vec<u8>>>,
    },
    /// The policy serial of this node and of every member, as last heard.
    PolicyStatus {
        reply: tokio::sync::oneshot::Sender<Vec<proto::admin::NodePolicy>>,
    },
}

/// A node offers its policy set to one member in turn this often, so a member that missed a
/// change (it was down, a datagram was lost) catches up.
const POLICY_OFFER_INTERVAL_MS: u64 = 5_000;

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
    store: PolicyStore,
    sync: PolicySync,
    enforcer: Arc<Enforcer>,
    offer_turn: usize,
    next_offer_ms: u64,
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
            membership.add_seed(s.addr, s.key, &mut OsRng);
        }
        membership.set_answer_probes(cfg.peering.answer_probes);
        let store = PolicyStore::open(
            &cfg.peering.state_dir,
            id.policy_admins.clone(),
            policy_store::posture(cfg.policy.posture),
            cfg.policy.audit,
        );
        let mut sync = PolicySync::default();
        if let Some(set) = &store.current {
            sync.set_current(set.serial, set.encode(), set.digest());
        }
        let log_path = cfg
            .policy
            .flow_log
            .clone()
            .unwrap_or_else(|| cfg.peering.state_dir.join("flows.jsonl"));
        let log = FlowLog::start(Some(log_path.clone()))
            .with_context(|| format!("opening the flow log {}", log_path.display()))?;
        let rules = store.rules(&membership.certificate().body, membership.members(), None);
        let enforcer = Arc::new(Enforcer::new(rules, cfg.policy.conntrack_max, log));
        dev.set_enforcer(enforcer.clone());
        tokio::spawn(expire_flows(enforcer.clone()));
        let mut mesh = Mesh {
            membership,
            config_path,
            dev,
            netlink,
            state_dir: cfg.peering.state_dir.clone(),
            view,
            store,
            sync,
            enforcer,
            offer_turn: 0,
            next_offer_ms: 0,
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
                _ = tick.tick() => {
                    let mut a = self.membership.on_tick(now_ms(), &mut OsRng);
                    let sync = self.sync.on_tick(now_ms());
                    a.extend(self.sync_actions(sync));
                    a.extend(self.offer_in_turn());
                    a
                }
            };
            self.execute(actions).await;
        }
    }

    async fn command(&mut self, cmd: Command) -> anyhow::Result<Vec<Action>> {
        match cmd {
            Command::Reload => self.reload().await,
            Command::AddPeer(seed) => {
                self.membership.add_seed(seed.addr, seed.key, &mut OsRng);
                Ok(self.membership.on_tick(now_ms(), &mut OsRng))
            }
            Command::ApplyPolicy { encoded, reply } => {
                let result = self
                    .store
                    .check_next(&encoded)
                    .and_then(|()| self.take_policy(&encoded));
                let announce = result.is_ok();
                let _ = reply.send(result);
                Ok(if announce {
                    self.announce_policy()
                } else {
                    Vec::new()
                })
            }
            Command::GetPolicy { reply } => {
                let _ = reply.send(self.store.current.as_ref().map(|s| s.encode()));
                Ok(Vec::new())
            }
            Command::PolicyStatus { reply } => {
                let _ = reply.send(self.policy_status());
                Ok(Vec::new())
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
        let (cfg, id) = crate::read_config(&self.config_path)?;
        self.membership.set_answer_probes(cfg.peering.answer_probes);
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
            // Addresses the renewed certificate no longer names are no longer ours.
            let old = self.membership.certificate().body.addrs.clone();
            for a in old
                .iter()
                .filter(|a| !id.certificate.body.addrs.contains(a))
            {
                self.netlink.del_address(*a).await?;
                tracing::info!(address = %a, "overlay address removed: not in the renewed certificate");
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
            self.refresh_rules();
        }
        Ok(actions)
    }

    /// Verifies, compiles and installs a signed policy set; the running one stays on any error.
    fn take_policy(&mut self, encoded: &[u8]) -> Result<String, String> {
        let msg = self.store.accept(encoded)?;
        if let Some(set) = &self.store.current {
            self.sync
                .set_current(set.serial, encoded.to_vec(), set.digest());
        }
        self.refresh_rules();
        tracing::info!("{msg}");
        Ok(msg)
    }

    /// Resolves the policy against this node and the current members, and installs the result
    /// in the data path (which re-decides established flows).
    fn refresh_rules(&self) {
        let prev = self.enforcer.rules();
        let rules = self.store.rules(
            &self.membership.certificate().body,
            self.membership.members(),
            Some(&prev),
        );
        self.enforcer.install(rules);
    }

    fn announce_policy(&mut self) -> Vec<Action> {
        let Some(offer) = self.sync.offer() else {
            return Vec::new();
        };
        let keys: Vec<[u8; 32]> = self.membership.members().keys().copied().collect();
        keys.iter()
            .flat_map(|k| self.membership.send_to(k, &offer, &mut OsRng))
            .collect()
    }

    fn offer_in_turn(&mut self) -> Vec<Action> {
        let now = now_ms();
        let n = self.membership.members().len();
        if now < self.next_offer_ms || n == 0 {
            return Vec::new();
        }
        self.next_offer_ms = now + POLICY_OFFER_INTERVAL_MS;
        let Some(offer) = self.sync.offer() else {
            return Vec::new();
        };
        self.offer_turn = (self.offer_turn + 1) % n;
        let key = *self
            .membership
            .members()
            .keys()
            .nth(self.offer_turn)
            .expect("index in range");
        self.membership.send_to(&key, &offer, &mut OsRng)
    }

    fn sync_actions(&mut self, acts: Vec<SyncAction>) -> Vec<Action> {
        let mut out = Vec::new();
        for a in acts {
            match a {
                SyncAction::Send(to, msg) => {
                    out.extend(self.membership.send_to(&to, &msg, &mut OsRng))
                }
                SyncAction::Complete { from, encoded } => match self.take_policy(&encoded) {
                    Ok(_) => out.extend(self.announce_policy()),
                    Err(e) => {
                        tracing::warn!(from = %Key(from), error = %e, "policy set from a member refused; the running one stays in force");
                        self.sync.distrust(from, now_ms());
                    }
                },
            }
        }
        out
    }

    fn policy_status(&self) -> Vec<proto::admin::NodePolicy> {
        let hex = |d: [u8; 32]| hex_prefix(&d);
        let mut out = vec![proto::admin::NodePolicy {
            identity: self.membership.certificate().body.identity(),
            serial: self.store.serial(),
            digest: self.store.current.as_ref().map(|s| hex(s.digest())),
        }];
        for (k, m) in self.membership.members() {
            let heard = self.sync.heard.get(k);
            out.push(proto::admin::NodePolicy {
                identity: m.certificate.body.identity(),
                serial: heard.map_or(0, |h| h.0),
                digest: heard.map(|h| hex(h.1)),
            });
        }
        out
    }

    async fn execute(&mut self, actions: Vec<Action>) {
        // Membership already changed when these actions were made: resolve policy for the new
        // members before their peers exist on the device, so no packet meets an unknown identity.
        if actions.iter().any(|a| {
            matches!(
                a,
                Action::Install { .. } | Action::Remove { .. } | Action::Persist
            )
        }) {
            self.refresh_rules();
        }
        let mut persist = false;
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            match a {
                Action::Policy { from, msg } => {
                    let acts = self.sync.on_message(from, *msg, now_ms());
                    queue.extend(self.sync_actions(acts));
                }
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
                    if let Some(offer) = self.sync.offer() {
                        queue.extend(self.membership.send_to(&key, &offer, &mut OsRng));
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

/// The first 8 bytes of a digest in hex: enough to tell sets apart at a glance.
fn hex_prefix(d: &[u8; 32]) -> String {
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Forgets idle flows (writing their closing records) once a second.
async fn expire_flows(enforcer: Arc<Enforcer>) {
    let mut tick = tokio::time::interval(crate::enforce::flowlog::EXPIRE_INTERVAL);
    loop {
        tick.tick().await;
        enforcer.expire();
    }
}
