//! The admin socket for `meshctl`: one JSON request line, one JSON answer line.

use super::read_line_bounded;
use crate::device::Device;
use crate::mesh::run::{Command, MemberView};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use proto::admin::MemberInfo;
use proto::admin::{Request, Response, MAX_MESSAGE_BYTES};
use std::sync::Arc;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc::Sender;

/// What the admin socket answers from.
#[derive(Clone)]
pub struct Admin {
    pub dev: Arc<Device>,
    pub members: MemberView,
    /// Mesh mode: our own identity (`TD/NS/NAME`) and SPIFFE ID.
    pub me: Option<String>,
    pub me_spiffe: Option<String>,
    pub commands: Sender<Command>,
}

pub async fn serve(listener: UnixListener, admin: Admin) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let admin = admin.clone();
                tokio::spawn(async move {
                    if let Err(e) = session(stream, admin).await {
                        tracing::debug!(error = %e, "admin connection ended");
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "admin accept failed"),
        }
    }
}

impl Admin {
    async fn answer(&self, req: Request) -> Response {
        if self.me.is_none() && !matches!(req, Request::Status) {
            return Response::Error {
                message: "not in mesh mode (start meshd with --config)".into(),
            };
        }
        match req {
            Request::Status => match self.status().await {
                Ok(status) => Response::Status(status),
                Err(e) => e,
            },
            Request::Reload => {
                let (reply, answer) = tokio::sync::oneshot::channel();
                match self
                    .ask(Command::Reload { reply: Some(reply) }, answer)
                    .await
                {
                    Ok(Ok(message)) => Response::Done { message },
                    Ok(Err(message)) => Response::Error { message },
                    Err(e) => e,
                }
            }
            Request::PeerAdd { endpoint } => match endpoint.parse::<proto::control::Seed>() {
                Ok(seed) => match self.commands.send(Command::AddPeer(seed)).await {
                    Ok(()) => Response::Done {
                        message: format!("contacting {}", seed.addr),
                    },
                    Err(_) => Response::Error {
                        message: "the mesh task has stopped".into(),
                    },
                },
                Err(message) => Response::Error { message },
            },
            Request::PeerList => {
                let mut behind = match self.workloads().await {
                    Ok(w) => w.1,
                    Err(r) => return r,
                };
                let members = self.members.lock();
                Response::Peers(
                    members
                        .iter()
                        .map(|(k, m)| {
                            let b = &m.certificate.body;
                            MemberInfo {
                                public_key: proto::Key(*k).to_base64(),
                                identity: b.identity(),
                                spiffe_id: b.spiffe_id(),
                                labels: b.labels.clone(),
                                ports: b.ports.iter().map(ToString::to_string).collect(),
                                addrs: b.addrs.clone(),
                                endpoint: m.endpoint.to_string(),
                                serial: b.serial,
                                not_after: b.not_after,
                                workloads: behind.remove(k).unwrap_or_default(),
                            }
                        })
                        .collect(),
                )
            }
            Request::Flows {
                since,
                denied_only,
                staged_denied,
                limit,
            } => match self.dev.enforcer() {
                Some(e) => {
                    let (records, next) =
                        e.flow_log()
                            .query(since, denied_only, staged_denied, limit.min(10_000));
                    Response::Flows { records, next }
                }
                None => Response::Error {
                    message: "no policy enforcement on this interface".into(),
                },
            },
            Request::PolicyGet => {
                let (reply, answer) = tokio::sync::oneshot::channel();
                match self.ask(Command::GetPolicy { reply }, answer).await {
                    Ok(set) => Response::Policy {
                        set: set.map(|b| STANDARD.encode(b)),
                    },
                    Err(e) => e,
                }
            }
            Request::PolicyStatus => {
                let (reply, answer) = tokio::sync::oneshot::channel();
                match self.ask(Command::PolicyStatus { reply }, answer).await {
                    Ok(nodes) => Response::PolicyStatus(nodes),
                    Err(e) => e,
                }
            }
            Request::MeshFlows { query } => {
                let Ok(query) = STANDARD.decode(query.trim()) else {
                    return Response::Error {
                        message: "the flow query is not base64".into(),
                    };
                };
                let (reply, answer) = tokio::sync::oneshot::channel();
                match self.ask(Command::MeshFlows { query, reply }, answer).await {
                    Ok(Ok(flows)) => Response::MeshFlows(flows),
                    Ok(Err(message)) => Response::Error { message },
                    Err(e) => e,
                }
            }
            Request::WorkloadAttach {
                namespace,
                name,
                uid,
                wait_ms,
            } => {
                let workload = proto::workload::WorkloadRef {
                    namespace,
                    name,
                    uid,
                };
                let what = format!("{}/{}", workload.namespace, workload.name);
                let (reply, answer) = tokio::sync::oneshot::channel();
                if self
                    .commands
                    .send(Command::Attach {
                        workload: workload.clone(),
                        reply,
                    })
                    .await
                    .is_err()
                {
                    return Response::Error {
                        message: "the mesh task has stopped".into(),
                    };
                }
                let wait = std::time::Duration::from_millis(wait_ms.clamp(100, 120_000));
                match tokio::time::timeout(wait, answer).await {
                    Ok(Ok(Ok(c))) => Response::Workload {
                        identity: c.body.identity(),
                        addresses: c.body.addrs.clone(),
                        not_after: c.body.not_after,
                    },
                    Ok(Ok(Err(message))) => Response::Error {
                        message: format!("workload {what}: {message}"),
                    },
                    Ok(Err(_)) => Response::Error {
                        message: "the mesh task has stopped".into(),
                    },
                    Err(_) => {
                        // Where it stands now: still unanswered, or the issuer said "not yet".
                        let (reply, answer) = tokio::sync::oneshot::channel();
                        let state = self
                            .ask(Command::Workloads { reply }, answer)
                            .await
                            .ok()
                            .and_then(|(attached, _)| {
                                attached.into_iter().find(|a| {
                                    (&a.namespace, &a.name, &a.uid)
                                        == (&workload.namespace, &workload.name, &workload.uid)
                                })
                            })
                            .map_or("detached meanwhile".to_string(), |a| a.state);
                        Response::Error {
                            message: format!(
                                "workload {what}: no certificate within {} ms: {state}",
                                wait.as_millis()
                            ),
                        }
                    }
                }
            }
            Request::WorkloadDetach {
                namespace,
                name,
                uid,
            } => {
                let workload = proto::workload::WorkloadRef {
                    namespace,
                    name,
                    uid,
                };
                let (reply, answer) = tokio::sync::oneshot::channel();
                match self.ask(Command::Detach { workload, reply }, answer).await {
                    Ok(Ok(message)) => Response::Done { message },
                    Ok(Err(message)) => Response::Error { message },
                    Err(e) => e,
                }
            }
            Request::PolicyApply { set } => {
                let Ok(encoded) = STANDARD.decode(set.trim()) else {
                    return Response::Error {
                        message: "the policy set is not base64".into(),
                    };
                };
                let (reply, answer) = tokio::sync::oneshot::channel();
                match self
                    .ask(Command::ApplyPolicy { encoded, reply }, answer)
                    .await
                {
                    Ok(Ok(message)) => Response::Done { message },
                    Ok(Err(message)) => Response::Error { message },
                    Err(e) => e,
                }
            }
            Request::PeerRemove { id } => {
                let (reply, answer) = tokio::sync::oneshot::channel();
                if self
                    .commands
                    .send(Command::RemovePeer { id, reply })
                    .await
                    .is_err()
                {
                    return Response::Error {
                        message: "the mesh task has stopped".into(),
                    };
                }
                match answer.await {
                    Ok(Ok(message)) => Response::Done { message },
                    Ok(Err(message)) => Response::Error { message },
                    Err(_) => Response::Error {
                        message: "the mesh task has stopped".into(),
                    },
                }
            }
        }
    }
}

impl Admin {
    /// False once the mesh task (mesh mode) has stopped taking commands.
    pub fn alive(&self) -> bool {
        self.me.is_none() || !self.commands.is_closed()
    }

    /// The whole view of the node: device, peers with their identities, control protocol,
    /// policy and own certificate. `meshctl status` and the metrics both show this.
    pub async fn status(&self) -> Result<proto::admin::Status, Response> {
        let mut status = self.dev.status();
        status.identity = self.me.clone();
        status.spiffe_id = self.me_spiffe.clone();
        if self.me.is_some() {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let (control, own) = self.ask(Command::ControlStatus { reply }, answer).await?;
            status.control = Some(control);
            status.identity = Some(own.identity.clone());
            status.spiffe_id = Some(own.spiffe_id.clone());
            status.certificate = Some(own);
        }
        let mut behind = self.workloads().await?;
        status.workloads = std::mem::take(&mut behind.0);
        let members = self.members.lock();
        for p in &mut status.peers {
            let key = proto::Key::from_base64(&p.public_key)
                .map(|k| k.0)
                .unwrap_or_default();
            if let Some(m) = members.get(&key) {
                p.identity = Some(m.certificate.body.identity());
                p.spiffe_id = Some(m.certificate.body.spiffe_id());
                p.labels = m.certificate.body.labels.clone();
                p.ports = m
                    .certificate
                    .body
                    .ports
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                p.cert_not_after = Some(m.certificate.body.not_after);
            }
            p.workloads = behind.1.remove(&key).unwrap_or_default();
        }
        Ok(status)
    }

    /// Mesh mode: the workloads this node runs, and those in force behind each member; nothing
    /// otherwise.
    async fn workloads(&self) -> Result<crate::mesh::node::WorkloadStatus, Response> {
        if self.me.is_none() {
            return Ok(Default::default());
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.ask(Command::Workloads { reply }, answer).await
    }

    /// Hands `cmd` to the mesh task and waits for its answer.
    async fn ask<T>(
        &self,
        cmd: Command,
        answer: tokio::sync::oneshot::Receiver<T>,
    ) -> Result<T, Response> {
        let stopped = || Response::Error {
            message: "the mesh task has stopped".into(),
        };
        self.commands.send(cmd).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }
}

async fn session(stream: UnixStream, admin: Admin) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    while read_line_bounded(&mut rd, &mut line, MAX_MESSAGE_BYTES).await? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(req) => admin.answer(req).await,
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        let mut text = serde_json::to_string(&response).map_err(std::io::Error::other)?;
        text.push('\n');
        wr.write_all(text.as_bytes()).await?;
    }
    Ok(())
}
