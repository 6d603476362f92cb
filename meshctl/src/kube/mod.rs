//! The Kubernetes source of workloads (`meshctl ca serve --kubernetes`): it lists and watches
//! pods, namespaces and nodes through the API server with kube-rs, and keeps the pure
//! [`view::KubeView`] that the issuer decides from; and it asks the API server (TokenReview)
//! whose a node's projected service-account token is, when a node joins with it.
//!
//! The watches and reviews run on a small Tokio runtime of their own; the issuer's loop reads the
//! view under a lock, and takes the answers of reviews as they come ([`KubeSource::review`]), so
//! a slow API server never holds up the requests of nodes already in the mesh.

pub mod view;

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1 as core;
use kube::api::{Api, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use proto::Cidr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use view::{KubeView, Namespace, Node, NodePolicy, Pod, Review};

/// How long a TokenReview may take before the join is refused.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// The key of a reviewed token's extra information that names the node its pod runs on
/// (Kubernetes 1.32 and later put it there for projected tokens bound to a pod).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The keys naming the pod the token is bound to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// Reviews asked and not yet answered, at most.
pub const MAX_REVIEWS_IN_FLIGHT: usize = 16;

/// A review's answer, with what the asker tagged it with.
pub struct Reviewed<T> {
    pub ticket: T,
    pub review: Result<Review, String>,
}

/// The source: the shared view, the client, and the runtime that drives both.
pub struct KubeSource {
    pub view: Arc<Mutex<KubeView>>,
    client: kube::Client,
    runtime: tokio::runtime::Runtime,
    pub policy: NodePolicy,
    in_flight: Arc<AtomicUsize>,
}

impl KubeSource {
    /// Connects with the in-cluster configuration (or KUBECONFIG) and starts the watches.
    pub fn connect(node_namespace: &str, policy: NodePolicy) -> anyhow::Result<KubeSource> {
        let runtime = runtime()?;
        let client = runtime.block_on(async {
            let config = kube::Config::infer()
                .await
                .map_err(|e| anyhow::anyhow!("no Kubernetes configuration: {e}"))?;
            kube::Client::try_from(config)
                .map_err(|e| anyhow::anyhow!("the Kubernetes client: {e}"))
        })?;
        Ok(KubeSource::with_client(
            runtime,
            client,
            node_namespace,
            policy,
        ))
    }

    /// The source over `client` (tests give one that answers with recorded responses).
    pub fn with_client(
        runtime: tokio::runtime::Runtime,
        client: kube::Client,
        node_namespace: &str,
        policy: NodePolicy,
    ) -> KubeSource {
        // Always as restarted: the issuer cannot know whether it assigned addresses before.
        let view = Arc::new(Mutex::new(KubeView::restarted(node_namespace)));
        runtime.spawn(watch::<core::Pod>(client.clone(), view.clone()));
        runtime.spawn(watch::<core::Namespace>(client.clone(), view.clone()));
        runtime.spawn(watch::<core::Node>(client.clone(), view.clone()));
        KubeSource {
            view,
            client,
            runtime,
            policy,
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Asks the API server what it says of `token` (a TokenReview for the policy's audience),
    /// without waiting: the answer comes on `done` with `ticket`, within [`REVIEW_TIMEOUT`].
    /// False, and nothing asked, while [`MAX_REVIEWS_IN_FLIGHT`] are unanswered, or half of them
    /// unless the asker is `known` (holds a node certificate of ours): the other half is kept
    /// for those.
    pub fn review<T: Send + 'static>(
        &self,
        token: &str,
        ticket: T,
        known: bool,
        done: mpsc::Sender<Reviewed<T>>,
    ) -> bool {
        let limit = if known {
            MAX_REVIEWS_IN_FLIGHT
        } else {
            MAX_REVIEWS_IN_FLIGHT / 2
        };
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= limit {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.policy.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let in_flight = self.in_flight.clone();
        self.runtime.spawn(async move {
            let answer =
                tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &request))
                    .await;
            let review = match answer {
                Err(_) => Err("the API server did not review the token in time".to_string()),
                Ok(Err(e)) => Err(format!("the API server refused the review: {e}")),
                Ok(Ok(r)) => Ok(review_of(r)),
            };
            in_flight.fetch_sub(1, Ordering::AcqRel);
            let _ = done.send(Reviewed { ticket, review });
        });
        true
    }
}

/// What a TokenReview's status says, as the view decides from it.
fn review_of(reviewed: TokenReview) -> Review {
    let status = reviewed.status.unwrap_or_default();
    let user = status.user.unwrap_or_default();
    let mut extra = user.extra.unwrap_or_default();
    Review {
        authenticated: status.authenticated.unwrap_or(false),
        error: status.error,
        username: user.username.unwrap_or_default(),
        audiences: status.audiences.unwrap_or_default(),
        node: extra.remove(NODE_NAME_EXTRA).unwrap_or_default(),
        pod_name: extra.remove(POD_NAME_EXTRA).unwrap_or_default(),
        pod_uid: extra.remove(POD_UID_EXTRA).unwrap_or_default(),
    }
}

/// A Tokio runtime of two worker threads for the watches and reviews.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kube")
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the Kubernetes runtime: {e}"))
}

/// A kind of object the issuer watches, and how it enters the view.
trait InView:
    kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned
{
    /// The view's form of it.
    type Item;
    /// None for an object that lacks what the view needs.
    fn item(&self) -> Option<Self::Item>;
    /// A full list: it replaces every one known.
    fn listed(view: &mut KubeView, all: Vec<Self::Item>);
    fn applied(view: &mut KubeView, item: Self::Item);
    fn deleted(view: &mut KubeView, object: &Self);
}

impl InView for core::Pod {
    type Item = Pod;
    fn item(&self) -> Option<Pod> {
        pod(self)
    }
    fn listed(view: &mut KubeView, all: Vec<Pod>) {
        view.pods_listed(all)
    }
    fn applied(view: &mut KubeView, item: Pod) {
        view.pod_applied(item)
    }
    fn deleted(view: &mut KubeView, p: &Self) {
        if let (Some(ns), Some(name)) = (&p.metadata.namespace, &p.metadata.name) {
            view.pod_deleted(ns, name)
        }
    }
}

impl InView for core::Namespace {
    type Item = Namespace;
    fn item(&self) -> Option<Namespace> {
        namespace(self)
    }
    fn listed(view: &mut KubeView, all: Vec<Namespace>) {
        view.namespaces_listed(all)
    }
    fn applied(view: &mut KubeView, item: Namespace) {
        view.namespace_applied(item)
    }
    fn deleted(view: &mut KubeView, n: &Self) {
        if let Some(name) = &n.metadata.name {
            view.namespace_deleted(name)
        }
    }
}

impl InView for core::Node {
    type Item = Node;
    fn item(&self) -> Option<Node> {
        node(self)
    }
    fn listed(view: &mut KubeView, all: Vec<Node>) {
        view.nodes_listed(all)
    }
    fn applied(view: &mut KubeView, item: Node) {
        view.node_applied(item)
    }
    fn deleted(view: &mut KubeView, n: &Self) {
        if let Some(name) = &n.metadata.name {
            view.node_deleted(name)
        }
    }
}

/// Lists and watches every object of kind `K` for ever (relisting after an expired watch,
/// backing off after errors), applying what it reports to the view.
async fn watch<K: InView + Send + 'static>(client: kube::Client, view: Arc<Mutex<KubeView>>) {
    let api = Api::<K>::all(client);
    let mut stream =
        std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
    let mut init = Vec::new();
    while let Some(event) = stream.next().await {
        let mut v = view.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            Ok(Event::Init) => init.clear(),
            Ok(Event::InitApply(k)) => init.extend(k.item()),
            Ok(Event::InitDone) => K::listed(&mut v, std::mem::take(&mut init)),
            Ok(Event::Apply(k)) => {
                if let Some(item) = k.item() {
                    K::applied(&mut v, item)
                }
            }
            Ok(Event::Delete(k)) => K::deleted(&mut v, &k),
            Err(e) => eprintln!("kubernetes watch: {e}"),
        }
    }
}

/// A pod as the view holds it; none without a namespace, name or UID.
pub fn pod(p: &core::Pod) -> Option<Pod> {
    let m = &p.metadata;
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let ports = spec
        .into_iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|port| {
            let name = port.name.as_ref()?;
            let proto = port
                .protocol
                .as_deref()
                .unwrap_or("TCP")
                .to_ascii_lowercase();
            // Kubernetes validates the same rules; one it let through that ours refuse is left
            // out rather than refusing the pod.
            format!("{name}={}/{proto}", port.container_port)
                .parse()
                .ok()
        })
        .collect();
    Some(Pod {
        namespace: m.namespace.clone()?,
        name: m.name.clone()?,
        uid: m.uid.clone()?,
        node: spec.and_then(|s| s.node_name.clone()),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        labels: m.labels.clone().unwrap_or_default(),
        ports,
        ips: status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect(),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        finished: matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ),
    })
}

/// A node as the view holds it: its pod CIDRs (`spec.podCIDRs`, else `spec.podCIDR`).
pub fn node(n: &core::Node) -> Option<Node> {
    let spec = n.spec.as_ref();
    let texts: Vec<String> = spec
        .and_then(|s| s.pod_cidrs.clone())
        .filter(|c| !c.is_empty())
        .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
        .unwrap_or_default();
    Some(Node {
        name: n.metadata.name.clone()?,
        pod_cidrs: texts
            .iter()
            .filter_map(|c| c.parse::<Cidr>().ok())
            .collect(),
    })
}

/// A namespace as the view holds it: being deleted once it has a deletion time or its phase
/// says Terminating.
pub fn namespace(n: &core::Namespace) -> Option<Namespace> {
    Some(Namespace {
        name: n.metadata.name.clone()?,
        terminating: n.metadata.deletion_timestamp.is_some()
            || n.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating"),
    })
}

#[cfg(test)]
mod tests;
