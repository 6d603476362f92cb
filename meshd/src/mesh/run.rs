//! The async shell around the pure [`Node`]: control datagrams in from the UDP thread, a tick, the
//! operator's commands, and the node's actions carried out on the device, the kernel (addresses,
//! routes) and the state directory. It decides nothing: every decision is the node's.

use super::node::{Action, Event, Node, NodeConfig};
use super::{state, MemberState};
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
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Control datagrams waiting for the mesh task; more are dropped and counted.
pub const CONTROL_BACKLOG: usize = 1024;
/// How often the node's time moves (expiry is cut within this, plus the check itself).
const TICK: Duration = Duration::from_millis(500);

/// Keepalive for mesh peers, so NAT and stateful firewalls keep the path open.
const KEEPALIVE_SECS: u16 = 25;

/// What the operator asks of the mesh task (SIGHUP and the admin socket).
pub enum Command {
    /// Re-read the configuration and what it names (SIGHUP, `meshctl reload`); the answer says
    /// what changed and what needs a restart, or why nothing changed.
    Reload {
        reply: Option<tokio::sync::oneshot::Sender<Result<String, String>>>,
    },
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
    /// `flows --mesh`: every member's flow log, for a query a policy admin signed for this node.
    MeshFlows {
        query: Vec<u8>,
        reply: tokio::sync::oneshot::Sender<Result<proto::admin::MeshFlows, String>>,
    },
    /// A workload this node runs: answered with its certificate once in force, or refused.
    Attach {
        workload: proto::workload::WorkloadRef,
        reply: tokio::sync::oneshot::Sender<Result<proto::cert::Certificate, String>>,
    },
    /// A workload this node no longer runs.
    Detach {
        workload: proto::workload::WorkloadRef,
        reply: tokio::sync::oneshot::Sender<Result<String, String>>,
    },
    /// The workloads this node runs, and those in force behind each member.
    Workloads {
        reply: tokio::sync::oneshot::Sender<super::node::WorkloadStatus>,
    },
    /// What the control protocol spent and refused.
    ControlStatus {
        reply: tokio::sync::oneshot::Sender<(
            proto::admin::ControlStatus,
            proto::admin::OwnCertificate,
        )>,
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
    node: Node,
    config_path: PathBuf,
    dev: Arc<Device>,
    netlink: Netlink,
    state_dir: PathBuf,
    view: MemberView,
    enforcer: Arc<Enforcer>,
    /// The masquerade table while this node serves routes with `gateway.masquerade`.
    _masquerade: Option<crate::forwarding::Masquerade>,
    /// The configuration in force, and the trust bundle and policy admins it named: what a
    /// reload compares the files with.
    running: Config,
    bundle: Vec<proto::cert::Certificate>,
    admins: Vec<[u8; 32]>,
    revocations: Vec<proto::cert::RevocationList>,
    /// This node's own flow queries waiting for members' answers, by nonce.
    flow_queries: BTreeMap<u64, super::flows_shell::Pending>,
    /// Who waits for an attached workload's identity (the CNI plugin's ADD).
    attach_waiters: AttachWaiters,
}

/// The answers owed for attached workloads.
#[derive(Default)]
struct AttachWaiters(
    BTreeMap<
        proto::workload::WorkloadRef,
        Vec<tokio::sync::oneshot::Sender<Result<proto::cert::Certificate, String>>>,
    >,
);

impl AttachWaiters {
    fn wait(
        &mut self,
        w: proto::workload::WorkloadRef,
        reply: tokio::sync::oneshot::Sender<Result<proto::cert::Certificate, String>>,
    ) {
        let list = self.0.entry(w).or_default();
        list.retain(|r| !r.is_closed());
        list.push(reply);
    }

    fn answer(
        &mut self,
        w: &proto::workload::WorkloadRef,
        r: Result<proto::cert::Certificate, String>,
    ) {
        for reply in self.0.remove(w).unwrap_or_default() {
            let _ = reply.send(r.clone());
        }
    }
}

impl Mesh {
    /// Sets the device up for mesh mode (key, port), builds the node from the configuration and
    /// the state directory, and carries out what it derives (addresses, peers, routes).
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
        let gateway_routes = cfg.gateway_routes();
        let masquerade = if gateway_routes.is_empty() {
            None
        } else {
            crate::forwarding::check(&gateway_routes)?;
            tracing::info!(routes = %proto::cert::list(&gateway_routes), "serving as a gateway");
            cfg.gateway
                .masquerade
                .then(|| crate::forwarding::Masquerade::install(&cfg.interface.name))
                .transpose()?
        };
        let state_dir = cfg.peering.state_dir.clone();
        state::prepare(&state_dir)?;
        let saved = state::load(&state_dir);
        let (bundle, admins) = (id.bundle.clone(), id.policy_admins.clone());
        let revocations = id.revocation_lists.clone();
        let node_cfg = NodeConfig {
            secret: x25519_dalek::StaticSecret::from(id.private_key.0),
            certificate: id.certificate,
            bundle: id.bundle,
            revocations: id.revocation_lists,
            admins: id.policy_admins.clone(),
            posture: super::policy_book::posture(cfg.policy.posture),
            audit: cfg.policy.audit,
            answer_probes: cfg.peering.answer_probes,
            seeds: cfg.seeds(),
            gateway_routes,
            relays: cfg.relays(),
            issuer: cfg.issuer(),
            workload_cas: id.workload_cas.clone(),
        };
        dev.set_relay(cfg.relay.serve);
        if cfg.relay.serve {
            tracing::info!("relaying between members");
        }
        let (node, actions) = Node::new(node_cfg, saved, now_ms(), &mut OsRng);
        let log_path = cfg
            .policy
            .flow_log
            .clone()
            .unwrap_or_else(|| state_dir.join("flows.jsonl"));
        let log = FlowLog::start(Some(log_path.clone()))
            .with_context(|| format!("opening the flow log {}", log_path.display()))?;
        let rules = node.rules(None);
        let enforcer = Arc::new(Enforcer::new(rules, cfg.policy.conntrack_max, log));
        dev.set_enforcer(enforcer.clone());
        tokio::spawn(expire_flows(enforcer.clone()));
        let mut mesh = Mesh {
            node,
            config_path,
            dev,
            netlink,
            state_dir,
            view,
            enforcer,
            _masquerade: masquerade,
            running: cfg.clone(),
            bundle,
            admins,
            revocations,
            flow_queries: BTreeMap::new(),
            attach_waiters: AttachWaiters::default(),
        };
        mesh.execute(actions).await;
        Ok(mesh)
    }

    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<(proto::relay::Endpoint, Vec<u8>)>,
        mut commands: mpsc::Receiver<Command>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        loop {
            let event = tokio::select! {
                Some(cmd) = commands.recv() => match self.command(cmd).await {
                    Some(event) => event,
                    None => continue,
                },
                // Every budget is the node's: it tells a member's datagrams from a spoofed
                // flood by their MAC, not by the source address a flood can forge.
                Some((from, bytes)) = rx.recv() => Event::Datagram { from, bytes },
                _ = tick.tick() => {
                    self.finish_flow_queries(false);
                    Event::Tick
                }
            };
            let datagram = matches!(event, Event::Datagram { .. });
            match self.node.handle(event, now_ms(), &mut OsRng) {
                Ok(actions) => self.execute(actions).await,
                Err(refusal) if datagram => {
                    tracing::debug!(%refusal, "control datagram refused");
                    self.dev.count_control_refusal();
                }
                Err(refusal) => {
                    tracing::warn!(%refusal, "refused; the running configuration stays in force")
                }
            }
        }
    }

    /// The event a command makes, after answering what needs no event; `None` when done.
    async fn command(&mut self, cmd: Command) -> Option<Event> {
        match cmd {
            Command::Reload { reply } => {
                crate::notify::reloading();
                let answer = self.reload().await;
                match &answer {
                    Ok(summary) => tracing::info!(%summary, "reloaded"),
                    Err(reason) => tracing::warn!(
                        %reason,
                        "reload refused; the running configuration stays in force"
                    ),
                }
                let outcome = match &answer {
                    Ok(_) => "reloaded".to_string(),
                    // One line: the protocol separates its fields by newlines.
                    Err(reason) => format!("reload refused: {}", reason.replace('\n', " ")),
                };
                crate::notify::notify(&format!("READY=1\nSTATUS={outcome}"));
                if let Some(reply) = reply {
                    let _ = reply.send(answer);
                }
                None
            }
            Command::AddPeer(seed) => Some(Event::AddSeed(seed)),
            Command::ApplyPolicy { encoded, reply } => {
                let answer =
                    match self
                        .node
                        .handle(Event::ApplyPolicy(encoded), now_ms(), &mut OsRng)
                    {
                        Ok(actions) => {
                            self.execute(actions).await;
                            let book = self.node.policy();
                            Ok(format!(
                                "policy set {} in force: {} policies",
                                book.serial(),
                                book.len()
                            ))
                        }
                        Err(e) => Err(match e {
                            super::Refusal::Policy(text) => text,
                            other => other.to_string(),
                        }),
                    };
                let _ = reply.send(answer);
                None
            }
            Command::GetPolicy { reply } => {
                let _ = reply.send(self.node.policy().current.as_ref().map(|s| s.encode()));
                None
            }
            Command::PolicyStatus { reply } => {
                let _ = reply.send(self.policy_status());
                None
            }
            Command::MeshFlows { query, reply } => {
                match self
                    .node
                    .handle(Event::QueryFlows(query), now_ms(), &mut OsRng)
                {
                    Ok(actions) => {
                        for a in &actions {
                            if let Action::FlowsAsked { serve, members } = a {
                                let own = self.node.certificate().body.clone();
                                let local =
                                    super::flows_shell::read(self.enforcer.flow_log(), serve);
                                let pending = super::flows_shell::Pending::new(
                                    reply,
                                    now_ms() + super::flows::ANSWER_WAIT_MS,
                                    (own.public_key, own.identity()),
                                    local,
                                    members.clone(),
                                );
                                self.flow_queries.insert(serve.nonce, pending);
                                break;
                            }
                        }
                        self.execute(actions).await;
                        self.finish_flow_queries(false);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
                None
            }
            Command::Attach { workload, reply } => {
                match self
                    .node
                    .handle(Event::Attach(workload.clone()), now_ms(), &mut OsRng)
                {
                    Ok(actions) => {
                        // Attached again while its certificate is in force: answered at once.
                        let held = self.node.attached().into_iter().find_map(|a| {
                            (a.reference == workload)
                                .then_some(a.certificate)
                                .flatten()
                                .filter(|c| self.node.own_workloads().contains(c))
                        });
                        match held {
                            Some(c) => {
                                let _ = reply.send(Ok(c));
                            }
                            None => self.attach_waiters.wait(workload, reply),
                        }
                        self.execute(actions).await;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
                None
            }
            Command::Detach { workload, reply } => {
                let _ = reply.send(Ok(format!(
                    "workload {}/{} detached",
                    workload.namespace, workload.name
                )));
                self.attach_waiters.answer(
                    &workload,
                    Err("detached before its identity was issued".into()),
                );
                Some(Event::Detach(workload))
            }
            Command::Workloads { reply } => {
                let _ = reply.send(self.node.workload_status());
                None
            }
            Command::ControlStatus { reply } => {
                let own = self.node.own_certificate(now_ms());
                let _ = reply.send((self.node.control_status(), own));
                None
            }
            Command::RemovePeer { id, reply } => {
                // NAMESPACE/NAME names an identity of this node's own trust domain, as
                // everywhere else in meshctl.
                let own_td = self.node.own_certificate(now_ms()).identity;
                let own_td = own_td.split('/').next().unwrap_or_default();
                let full = match id.matches('/').count() {
                    1 => format!("{own_td}/{id}"),
                    _ => id.clone(),
                };
                let found = self.node.members().iter().find(|(k, m)| {
                    Key(**k).to_base64() == id || m.certificate.body.identity() == full
                });
                match found.map(|(k, m)| (*k, m.certificate.body.identity())) {
                    Some((key, identity)) => {
                        let _ = reply.send(Ok(format!("removed {identity} ({})", Key(key))));
                        Some(Event::Forget(key))
                    }
                    None => {
                        let _ = reply.send(Err(format!("no member {id}")));
                        None
                    }
                }
            }
        }
    }

    async fn handle_logged(&mut self, event: Event) {
        match self.node.handle(event, now_ms(), &mut OsRng) {
            Ok(actions) => self.execute(actions).await,
            Err(e) => {
                tracing::warn!(refusal = %e, "refused; the running configuration stays in force")
            }
        }
    }

    /// Re-reads the configuration's identity, trust bundle and revocation lists (SIGHUP or
    /// `meshctl reload`) into the events that carry them to the node. A renewed key goes to the
    /// device first, so that sessions re-handshake with it.
    /// Re-reads the configuration file and what it names, and applies what changed: the
    /// identity (a renewal), the trust bundle, revocation lists, new seeds, `answer_probes`, the
    /// policy admins and `[policy]` posture and audit. A file that does not read, parse or verify
    /// changes nothing; settings that need a restart are named in the answer and left as they run.
    async fn reload(&mut self) -> Result<String, String> {
        let (cfg, id) = crate::read_config(&self.config_path).map_err(|e| format!("{e:#}"))?;
        let mut done = Vec::new();
        let restart = restart_needed(&self.running, &cfg);
        let posture = super::policy_book::posture(cfg.policy.posture);
        // The policy settings first: the one change that can be refused (the set in force must
        // compile under the new posture), before anything else moved.
        let policy = (cfg.policy.posture != self.running.policy.posture
            || cfg.policy.audit != self.running.policy.audit
            || id.policy_admins != self.admins)
            .then(|| Event::Reconfigure {
                admins: id.policy_admins.clone(),
                posture,
                audit: cfg.policy.audit,
            });
        if let Some(event) = policy {
            match self.node.handle(event, now_ms(), &mut OsRng) {
                Ok(actions) => self.execute(actions).await,
                Err(super::Refusal::Policy(why)) => return Err(why),
                Err(other) => return Err(other.to_string()),
            }
            done.push(format!(
                "policy: posture {}, audit {}, {} admins; {}",
                match cfg.policy.posture {
                    crate::config::PostureSetting::ZeroTrust => "zero-trust",
                    crate::config::PostureSetting::Calico => "calico",
                },
                if cfg.policy.audit { "on" } else { "off" },
                id.policy_admins.len(),
                self.node.policy().describe()
            ));
        }
        let mut events: Vec<Event> = Vec::new();
        if id.certificate != *self.node.certificate() {
            let set = SetRequest {
                private_key: Some(Some(id.private_key)),
                ..SetRequest::default()
            };
            self.dev
                .apply(&set)
                .map_err(|e| format!("new private key: {e}"))?;
            done.push(format!(
                "identity {} renewed: serial {}",
                id.certificate.body.identity(),
                id.certificate.body.serial
            ));
            events.push(Event::Renew {
                secret: x25519_dalek::StaticSecret::from(id.private_key.0),
                certificate: id.certificate.clone(),
                bundle: id.bundle.clone(),
            });
        } else if id.bundle != self.bundle {
            done.push(format!("trust bundle: {} CAs", id.bundle.len()));
            events.push(Event::Trust {
                bundle: id.bundle.clone(),
            });
        }
        events.push(Event::WorkloadCas(id.workload_cas.clone()));
        for crl in &id.revocation_lists {
            events.push(Event::AddRevocation(crl.clone()));
        }
        if id.revocation_lists != self.revocations {
            done.push(format!("revocation lists: {}", id.revocation_lists.len()));
        }
        if cfg.peering.answer_probes != self.running.peering.answer_probes {
            done.push(format!("answer_probes = {}", cfg.peering.answer_probes));
        }
        events.push(Event::AnswerProbes(cfg.peering.answer_probes));
        let new_seeds: Vec<_> = cfg
            .seeds()
            .into_iter()
            .filter(|s| !self.running.seeds().contains(s))
            .collect();
        if !new_seeds.is_empty() {
            done.push(format!("{} new seeds", new_seeds.len()));
        }
        events.extend(new_seeds.into_iter().map(Event::AddSeed));
        for e in events {
            self.handle_logged(e).await;
        }
        let mut running = cfg;
        // What needs a restart keeps running as it was, and stays so for the next comparison.
        keep_restart_settings(&mut running, &self.running);
        self.running = running;
        self.bundle = id.bundle;
        self.admins = id.policy_admins;
        self.revocations = id.revocation_lists;
        let mut answer = if done.is_empty() {
            "nothing changed".to_string()
        } else {
            done.join("; ")
        };
        if !restart.is_empty() {
            answer.push_str(&format!(
                "; needs a restart (running as before): {}",
                restart.join(", ")
            ));
        }
        Ok(answer)
    }

    /// Resolves the policy against this node and the current members, and installs the result
    /// in the data path (which re-decides established flows).
    fn refresh_rules(&self) {
        let prev = self.enforcer.rules();
        let rules = self.node.rules(Some(&prev));
        self.enforcer.install(rules);
    }

    /// Answers the operator for each query whose members all answered, or whose time is up
    /// (`all`: every query, as the task stops).
    fn finish_flow_queries(&mut self, all: bool) {
        let now = now_ms();
        let done: Vec<u64> = self
            .flow_queries
            .iter()
            .filter(|(_, p)| all || p.complete() || p.due(now))
            .map(|(n, _)| *n)
            .collect();
        for nonce in done {
            if let Some(p) = self.flow_queries.remove(&nonce) {
                p.finish();
            }
        }
    }

    /// Sends the datagrams of `actions`, which carry nothing else (answers the node sealed).
    fn send_only(&self, actions: Vec<Action>) {
        for a in actions {
            if let Action::Send { to, datagram } = a {
                if let Err(e) = self.dev.send_datagram(&datagram, to) {
                    tracing::debug!(%to, error = %e, "control send failed");
                }
            }
        }
    }

    fn policy_status(&self) -> Vec<proto::admin::NodePolicy> {
        let hex = |d: [u8; 32]| hex_prefix(&d);
        let book = self.node.policy();
        let mut out = vec![proto::admin::NodePolicy {
            identity: self.node.certificate().body.identity(),
            serial: book.serial(),
            digest: book.current.as_ref().map(|s| hex(s.digest())),
            last_seen_secs: None,
            this_node: true,
        }];
        let snap = self.dev.snapshot();
        for (k, m) in self.node.members() {
            let heard = self.node.heard_policy(k);
            let seen = snap.by_key.get(k).and_then(|p| self.dev.last_seen_secs(p));
            out.push(proto::admin::NodePolicy {
                identity: m.certificate.body.identity(),
                serial: heard.map_or(0, |h| h.0),
                digest: heard.map(|h| hex(h.1)),
                last_seen_secs: seen,
                this_node: false,
            });
        }
        out
    }

    async fn execute(&mut self, actions: Vec<Action>) {
        let mut members_changed = false;
        for a in actions {
            match a {
                Action::Send { to, datagram } => {
                    if let Err(e) = self.dev.send_datagram(&datagram, to) {
                        tracing::debug!(%to, error = %e, "control send failed");
                    }
                }
                Action::Resolve => {
                    self.refresh_rules();
                    members_changed = true;
                }
                Action::Peer {
                    key,
                    endpoint,
                    addrs,
                } => {
                    let upd = PeerUpdate {
                        public_key: Key(key),
                        remove: false,
                        update_only: false,
                        preshared_key: None,
                        endpoint: None, // set below, where a pending handshake follows it
                        persistent_keepalive_secs: Some(KEEPALIVE_SECS),
                        replace_allowed_ips: true,
                        allowed_ips: addrs,
                    };
                    if let Err(e) = self.dev.apply(&SetRequest {
                        peers: vec![upd],
                        ..SetRequest::default()
                    }) {
                        tracing::warn!(peer = %Key(key), error = %e, "installing peer failed");
                    }
                    let td = &self.node.certificate().body.trust_domain;
                    let local = self
                        .node
                        .members()
                        .get(&key)
                        .is_some_and(|m| m.certificate.body.trust_domain == *td);
                    self.dev.set_endpoint(&key, endpoint, local);
                    if let Some(m) = self.node.members().get(&key) {
                        tracing::info!(peer = %Key(key), identity = %m.certificate.body.identity(), %endpoint, "peer installed");
                    }
                }
                Action::Unpeer { key, reason } => {
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
                    tracing::info!(peer = %Key(key), %reason, "peer removed");
                }
                Action::Route(c) => {
                    if let Err(e) = self.netlink.add_route(c).await {
                        tracing::warn!(route = %c, error = %e, "adding route");
                    }
                }
                Action::Unroute(c) => {
                    if let Err(e) = self.netlink.del_route(c).await {
                        tracing::debug!(route = %c, error = %e, "removing route");
                    }
                }
                Action::Address(c) => {
                    if let Err(e) = self.netlink.add_address(c).await {
                        tracing::warn!(address = %c, error = %e, "adding address");
                    }
                }
                Action::Unaddress(c) => match self.netlink.del_address(c).await {
                    Ok(()) => {
                        tracing::info!(address = %c, "overlay address removed: not in the certificate")
                    }
                    Err(e) => tracing::warn!(address = %c, error = %e, "removing address"),
                },
                Action::Store(stored) => {
                    if let Err(e) = state::save(&self.state_dir, &stored) {
                        tracing::warn!(error = %format!("{e:#}"), "saving state");
                    }
                }
                // Read at once and answered through the node, which seals for the member.
                Action::ServeFlows { to, serve } => {
                    let (records, next) =
                        super::flows_shell::read(self.enforcer.flow_log(), &serve);
                    let messages = super::flows_shell::answer(serve.nonce, &records, next);
                    match self.node.handle(
                        Event::AnswerFlows { to, messages },
                        now_ms(),
                        &mut OsRng,
                    ) {
                        Ok(sends) => self.send_only(sends),
                        Err(e) => tracing::debug!(refusal = %e, "flow answer not sent"),
                    }
                }
                Action::FlowsAsked { .. } => {}
                Action::Attached(outcomes) => {
                    for (w, r) in outcomes {
                        match &r {
                            Ok(c) => {
                                tracing::info!(workload = %format!("{}/{}", w.namespace, w.name), identity = %c.body.identity(), "workload identity issued")
                            }
                            Err(why) => {
                                tracing::warn!(workload = %format!("{}/{}", w.namespace, w.name), %why, "workload identity refused")
                            }
                        }
                        self.attach_waiters.answer(&w, r);
                    }
                }
                Action::OwnWorkloads { held, refused } => {
                    let held: Vec<String> = held.iter().map(|c| c.body.identity()).collect();
                    tracing::info!(?held, ?refused, "this node's workload certificates");
                }
                Action::FlowAnswer {
                    from,
                    nonce,
                    part,
                    last,
                    next,
                    records,
                } => {
                    if let Some(p) = self.flow_queries.get_mut(&nonce) {
                        p.part(from, part, &records, next, last);
                    }
                    self.finish_flow_queries(false);
                }
            }
        }
        if members_changed {
            *self.view.lock() = self.node.members().clone();
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

/// The settings that differ between `running` and `new` and that only a restart applies.
fn restart_needed(running: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    if running.log_format != new.log_format {
        out.push("log_format");
    }
    if running.reload_on_change != new.reload_on_change {
        out.push("reload_on_change");
    }
    if running.interface != new.interface {
        out.push("[interface]");
    }
    if running.peering.state_dir != new.peering.state_dir {
        out.push("peering.state_dir");
    }
    if running
        .peering
        .seeds
        .iter()
        .any(|s| !new.peering.seeds.contains(s))
    {
        out.push("peering.seeds (a removed seed)");
    }
    if running.policy.conntrack_max != new.policy.conntrack_max {
        out.push("policy.conntrack_max");
    }
    if running.policy.flow_log != new.policy.flow_log {
        out.push("policy.flow_log");
    }
    if running.gateway != new.gateway {
        out.push("[gateway]");
    }
    if running.relay != new.relay {
        out.push("[relay]");
    }
    if running.metrics != new.metrics {
        out.push("[metrics]");
    }
    out
}

/// `new` with the settings only a restart applies put back as they run.
fn keep_restart_settings(new: &mut Config, running: &Config) {
    new.log_format = running.log_format;
    new.reload_on_change = running.reload_on_change;
    new.interface = running.interface.clone();
    new.peering.state_dir = running.peering.state_dir.clone();
    new.policy.conntrack_max = running.policy.conntrack_max;
    new.policy.flow_log = running.policy.flow_log.clone();
    new.gateway = running.gateway.clone();
    new.relay = running.relay.clone();
    new.metrics = running.metrics.clone();
    for s in &running.peering.seeds {
        if !new.peering.seeds.contains(s) {
            new.peering.seeds.push(s.clone());
        }
    }
}
