//! meshctl: the operator's tool. One module per subcommand group.

mod ca;
mod federation;
mod flows;
mod graph_html;
mod graph_svg;
mod identity;
mod issuer;
mod join;
mod keys;
mod kube;
mod lab;
mod peer;
mod policy;
mod policy_set;
mod status;
mod workload;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// The version and the git commit built from (`meshctl --version`, `meshctl version`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("MESH_GIT_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    version = VERSION,
    about = "Operate a meshd mesh: CA and identities, keys, peers, policy, flows, status, and the local lab"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The certificate authority: the mesh's root of trust.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Identity certificates for workloads.
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// The registry of workloads an online issuer may certify (VMs, the lab): register, list,
    /// remove.
    Workload {
        #[command(subcommand)]
        command: WorkloadCommand,
    },
    /// Join the mesh without copying keys: make this node's key pair here and trade a join token
    /// (meshctl ca token create) for a certificate binding it, from the online issuer.
    Join(join::JoinArgs),
    /// Print meshctl's version and the git commit it was built from.
    Version,
    /// Print a completion script for a shell, e.g. `meshctl completion bash >
    /// /etc/bash_completion.d/meshctl`.
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages: meshctl.1 and one per subcommand (meshctl-policy-apply.1, ...).
    Man {
        /// The directory to write them into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Print a new private key (base64), like `wg genkey`.
    Genkey,
    /// Read a private key on stdin and print its public key, like `wg pubkey`.
    Pubkey,
    /// Peering on a mesh-mode daemon: add an endpoint, list members, remove one.
    Peer {
        #[command(subcommand)]
        command: PeerCommand,
        #[command(flatten)]
        daemon: Daemon,
    },
    /// The mesh's policy set (apply, diff, delete, get, list, status) and what-if tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
        #[command(flatten)]
        daemon: Daemon,
    },
    /// Trust in other clusters' CAs, each within a scope (part of the signed policy set).
    Federation {
        #[command(subcommand)]
        command: FederationCommand,
        #[command(flatten)]
        daemon: Daemon,
    },
    /// The example application of Calico's zero-trust guide, as a local mesh of network namespaces.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
        /// Where the lab keeps its CA, keys, configurations and logs.
        #[arg(long, global = true, default_value = lab::DEFAULT_DIR)]
        dir: PathBuf,
        /// Prefix of the lab's network namespaces and interfaces.
        #[arg(long, global = true, default_value = lab::DEFAULT_PREFIX)]
        prefix: String,
    },
    /// The flow log: every new flow with its verdict and deciding policy, and every end of one.
    Flows {
        /// Keep printing new records as they come.
        #[arg(long)]
        follow: bool,
        /// Only denied (and audited) flows.
        #[arg(long)]
        denied: bool,
        /// Only flows the staged policies (StagedNetworkPolicy, ...) would deny: what promoting
        /// them would cut.
        #[arg(long)]
        staged: bool,
        /// Every node's flow log (this node and each member of its trust domain), pulled over
        /// the control protocol with a query signed by the policy-admin key; each record names
        /// its node.
        #[arg(long)]
        mesh: bool,
        /// With --mesh: the policy-admin signing key (members answer only queries their
        /// configured admins signed).
        #[arg(long, default_value = policy_set::DEFAULT_ADMIN_KEY, requires = "mesh")]
        key: PathBuf,
        /// Only records of the last DURATION (30s, 10m, 2h, 1d).
        #[arg(long, value_name = "DURATION")]
        since: Option<String>,
        /// Only flows from this identity ([TD/]NS/NAME, SPIFFE ID) or address.
        #[arg(long, value_name = "ID")]
        from: Option<String>,
        /// Only flows to this identity or address.
        #[arg(long, value_name = "ID")]
        to: Option<String>,
        /// Only flows decided by this policy (NAME, NS/NAME, or as the log writes it).
        #[arg(long, value_name = "NAME")]
        policy: Option<String>,
        #[arg(short, long, value_enum, default_value_t = Output::Table, help = OUTPUT_HELP)]
        output: Output,
        #[command(flatten)]
        daemon: Daemon,
    },
    /// Make a mesh-mode daemon re-read its configuration (as SIGHUP) and print what it applied;
    /// exit 1 with the daemon's reason when it refused (the running configuration stays).
    Reload {
        #[command(flatten)]
        daemon: Daemon,
        /// Same as -i (kept for scripts written before -i).
        #[arg(hide = true, conflicts_with = "interface")]
        ifname: Option<String>,
    },
    /// The node (identity, certificate, policy, control protocol) and its peers, read from the
    /// running daemon; every running meshd when no -i is given.
    Status {
        #[arg(short, long, value_enum, default_value_t = Output::Table, help = OUTPUT_HELP)]
        output: Output,
        #[command(flatten)]
        daemon: Daemon,
        /// Same as -i (kept for scripts written before -i).
        #[arg(hide = true, conflicts_with = "interface")]
        ifname: Option<String>,
    },
}

/// The help of every `-f`.
const FILES_HELP: &str =
    "Policy files or directories (Calico v3, Kubernetes NetworkPolicy, Namespace YAML); - reads standard input";

/// The help of every `-o`.
const OUTPUT_HELP: &str = "Output format: table, wide (more columns), json or yaml";

/// Which daemon a command talks to.
#[derive(clap::Args, Clone, Default)]
struct Daemon {
    /// Interface of the daemon; needed only when several run.
    #[arg(short = 'i', long = "interface", value_name = "IFNAME", global = true)]
    interface: Option<String>,
    /// Admin socket to use instead of /run/meshd/IFNAME.sock.
    #[arg(long, value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
}

impl Daemon {
    /// The admin socket: the one named, the interface's, or the only meshd running.
    fn path(&self) -> Result<PathBuf, Failure> {
        peer::socket(self.interface.as_deref(), self.socket.clone())
    }
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build the example: one node per service, identities, policies, traffic, and a report.
    Up {
        /// The example to build (microblog: Calico's zero-trust guide).
        #[arg(long, default_value = "microblog")]
        example: String,
        /// Run the services as pods on this many nodes (2 to 4), created through the CNI plugin
        /// and given their identities by the workload issuer; without it, one node per service.
        #[arg(long)]
        nodes: Option<usize>,
    },
    /// Each node of the lab: peers, policy serial, flows.
    Status,
    /// Stop every meshd of the lab and remove its namespaces and files.
    Down,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Add or replace the objects of these files in the mesh's policy set (signed, pushed to every node).
    Apply {
        #[arg(short = 'f', long = "file", required = true, value_name = "FILE|DIR|-", help = FILES_HELP)]
        files: Vec<PathBuf>,
        /// The policy-admin signing key.
        #[arg(long, default_value = policy_set::DEFAULT_ADMIN_KEY)]
        key: PathBuf,
    },
    /// Show what `apply -f` would change, per object; with --connectivity, which flows between
    /// identities it newly allows and newly denies. Exit 1 when there are differences.
    Diff {
        #[arg(short = 'f', long = "file", required = true, value_name = "FILE|DIR|-", help = FILES_HELP)]
        files: Vec<PathBuf>,
        /// Compare what the two sets decide for every pair of identities and every protocol and
        /// port a rule names, instead of their text.
        #[arg(long)]
        connectivity: bool,
        /// The identities to compare (a YAML list of [TD/]NS/NAME,K=V..., or the output of
        /// `meshctl status -o yaml`); default: the live mesh's members.
        #[arg(long, value_name = "FILE", requires = "connectivity")]
        identities: Option<PathBuf>,
        #[arg(short, long, value_enum, default_value_t = Output::Table, help = OUTPUT_HELP)]
        output: Output,
    },
    /// Remove objects: KIND NAME (networkpolicy NS/NAME, globalnetworkpolicy NAME, stagednetworkpolicy NS/NAME, tier NAME, namespace NAME, ...), or those of -f files.
    Delete {
        /// networkpolicy, globalnetworkpolicy, namespace, ... (as `policy list` names them).
        kind: Option<String>,
        /// The object's name (NAMESPACE/NAME for namespaced kinds).
        name: Option<String>,
        #[arg(short = 'f', long = "file", value_name = "FILE|DIR|-", help = FILES_HELP)]
        files: Vec<PathBuf>,
        /// The policy-admin signing key.
        #[arg(long, default_value = policy_set::DEFAULT_ADMIN_KEY)]
        key: PathBuf,
    },
    /// Print the set in force, or one object of it (KIND NAME).
    Get {
        /// networkpolicy, globalnetworkpolicy, namespace, ... (as `policy list` names them).
        kind: Option<String>,
        /// The object's name (NAMESPACE/NAME for namespaced kinds).
        name: Option<String>,
        #[arg(short, long, value_enum, default_value_t = Output::Yaml, help = OUTPUT_HELP)]
        output: Output,
    },
    /// The objects of the set in force.
    List {
        #[arg(short, long, value_enum, default_value_t = Output::Table, help = OUTPUT_HELP)]
        output: Output,
    },
    /// The policy serial each node of the mesh runs.
    Status {
        #[arg(short, long, value_enum, default_value_t = Output::Table, help = OUTPUT_HELP)]
        output: Output,
    },
    /// Create a policy-admin key pair: FILE (mode 0600) signs sets; FILE.pub goes in trust.policy_admins.
    AdminKey {
        /// Where to write the private key (FILE.pub gets the public one).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// What would happen to one flow: ALLOW or DENY, and the policy and rule that decided: for
    /// policy files (offline), or for the set in force on the local meshd when no -f is given.
    Check {
        #[arg(short = 'f', long = "file", value_name = "FILE|DIR|-", help = FILES_HELP)]
        files: Vec<PathBuf>,
        /// The source: [TRUST_DOMAIN/]NAMESPACE/NAME[,KEY=VALUE...] (NAME is the service
        /// account; without TRUST_DOMAIN, the local one), or an IP address outside the mesh.
        /// Without -f and without labels, the labels and address come from the member's
        /// certificate in the live mesh.
        #[arg(long)]
        from: String,
        /// The destination, as --from.
        #[arg(long)]
        to: String,
        /// The source's address, for policies that match nets (default: none).
        #[arg(long, value_name = "IP")]
        from_ip: Option<String>,
        /// The destination's address, for policies that match nets or external networks.
        #[arg(long, value_name = "IP")]
        to_ip: Option<String>,
        /// tcp, udp, icmp, icmpv6, sctp or a protocol number.
        #[arg(long, default_value = "tcp")]
        proto: String,
        /// Destination port.
        #[arg(long)]
        port: Option<u16>,
        /// zero-trust (what no policy selects is denied) or calico (it is allowed); default:
        /// zero-trust for files, the daemon's own for the set in force.
        #[arg(long, value_parser = ["zero-trust", "calico"])]
        posture: Option<String>,
        /// The local trust domain, whose identities the policies are written for (identities of
        /// any other are matched only by selectors naming mesh.io/trust-domain); default: the
        /// daemon's own for the set in force, cluster.local for files.
        #[arg(long)]
        trust_domain: Option<String>,
        #[arg(short, long, value_enum, default_value_t = Output::Table, help = OUTPUT_HELP)]
        output: Output,
    },
    /// Run the PolicyTest cases of policy files against the set they make, offline: each case
    /// with its verdict, and for a failure what decided; exit 1 when any fails. `policy apply`
    /// runs them too, and refuses a change that fails one.
    Test {
        #[arg(short = 'f', long = "file", required = true, value_name = "FILE|DIR|-", help = FILES_HELP)]
        files: Vec<PathBuf>,
        /// zero-trust (what no policy selects is denied) or calico (it is allowed).
        #[arg(long, value_parser = ["zero-trust", "calico"], default_value = "zero-trust")]
        posture: String,
        /// The local trust domain, whose identities the policies are written for.
        #[arg(long, default_value = policy::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        #[arg(short, long, value_enum, default_value_t = Output::Table, help = OUTPUT_HELP)]
        output: Output,
    },
    /// The flow graph the policies allow: identities (and external networks) as nodes, allowed
    /// flows as edges labelled with protocol and port, and the policies that allowed them; for
    /// policy files, or without -f for the set in force and the live mesh's members.
    Graph {
        #[arg(short = 'f', long = "file", value_name = "FILE|DIR|-", help = FILES_HELP)]
        files: Vec<PathBuf>,
        /// The identities to draw (a YAML list of [TD/]NS/NAME,K=V..., or the output of
        /// `meshctl status -o yaml`); default: with -f, those the files' PolicyTest cases name,
        /// without, the live mesh's members.
        #[arg(long, value_name = "FILE")]
        identities: Option<PathBuf>,
        /// Merge the identities that share the value of this label into one node.
        #[arg(long, value_name = "LABEL")]
        group_by: Option<String>,
        /// Flow logs to overlay (`meshctl flows -o json` or a node's flows.jsonl; repeat for
        /// more): edges used, allowed but never used, denied attempts, would-be denials.
        #[arg(long = "flows", value_name = "FILE")]
        flows: Vec<PathBuf>,
        /// zero-trust (what no policy selects is denied) or calico (it is allowed); default:
        /// zero-trust for files, the daemon's own for the set in force.
        #[arg(long, value_parser = ["zero-trust", "calico"])]
        posture: Option<String>,
        /// The local trust domain, whose identities the policies are written for; default:
        /// cluster.local for files, the daemon's own for the set in force.
        #[arg(long)]
        trust_domain: Option<String>,
        /// table, wide, json, yaml, or dot (Graphviz).
        #[arg(short, long, value_enum, default_value_t = GraphOutput::Table)]
        output: GraphOutput,
    },
    /// Least-privilege allow-lists from observed flows (flow logs gathered in audit mode, say):
    /// per identity, one ingress and one egress NetworkPolicy allowing exactly the flows seen,
    /// with `# review:` comments, and a PolicyTest of the flows seen and of flows next to them
    /// never seen. Denied flows are left out (and listed).
    Suggest {
        /// Flow logs (`meshctl flows -o json` or a node's flows.jsonl; repeat for more).
        #[arg(long = "flows", value_name = "FILE", required = true)]
        flows: Vec<PathBuf>,
        /// Suggest policies only for this namespace's identities.
        #[arg(long)]
        namespace: Option<String>,
        /// Select identities by service-account name, or by all their labels.
        #[arg(long, value_parser = ["names", "labels"], default_value = "names")]
        by: String,
        /// The local trust domain, whose identities get policies.
        #[arg(long, default_value = policy::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// yaml: the policies (default); table or wide: a summary of them; json: both.
        #[arg(short, long, value_enum, default_value_t = Output::Yaml, help = OUTPUT_HELP)]
        output: Output,
    },
    /// Evaluate a Calico selector against a label set: prints true or false.
    Selector {
        /// The selector, e.g. "app == 'post' && has(tier)".
        expr: String,
        /// Labels as K=V,K=V.
        #[arg(long, default_value = "")]
        labels: String,
    },
}

#[derive(Subcommand)]
enum FederationCommand {
    /// Trust another cluster's CAs (add or replace), within a scope: identities of that trust
    /// domain are admitted only with addresses inside --addresses and, if given, namespaces in
    /// --namespaces; policy selects them only by naming mesh.io/trust-domain.
    Add {
        /// The remote trust domain.
        #[arg(long)]
        trust_domain: String,
        /// Its CA certificates (one file; two CAs during a rotation).
        #[arg(long, value_name = "FILE")]
        bundle: PathBuf,
        /// The namespaces its identities may name; default: any.
        #[arg(long, value_delimiter = ',', value_name = "NS,...")]
        namespaces: Vec<String>,
        /// The overlay ranges its identities may hold; default: the ranges its CA lists.
        #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
        addresses: Vec<String>,
        /// The ranges its gateways may serve; default: none.
        #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
        routes: Vec<String>,
        /// The policy-admin signing key.
        #[arg(long, default_value = policy_set::DEFAULT_ADMIN_KEY)]
        key: PathBuf,
    },
    /// The federations in force: trust domain, scope, CAs.
    List {
        #[arg(short, long, value_enum, default_value_t = Output::Table, help = OUTPUT_HELP)]
        output: Output,
    },
    /// Stop trusting a trust domain: every member of it is cut.
    Remove {
        /// The remote trust domain to stop trusting.
        trust_domain: String,
        /// The policy-admin signing key.
        #[arg(long, default_value = policy_set::DEFAULT_ADMIN_KEY)]
        key: PathBuf,
    },
}

#[derive(Subcommand)]
enum PeerCommand {
    /// Contact an underlay endpoint (IP:port, or KEY@IP:port to greet the node there by its key
    /// without a probe) and peer with the node there if its certificate verifies.
    Add {
        /// IP:PORT, or KEY@IP:PORT.
        endpoint: String,
    },
    /// The members this node knows: identity, endpoint, addresses, key, labels.
    List {
        #[arg(short, long, value_enum, default_value_t = Output::Table, help = OUTPUT_HELP)]
        output: Output,
    },
    /// Forget a member, by public key or TD/NS/NAME, and refuse it until the daemon restarts.
    Remove {
        /// The member's public key (base64), or its identity [TD/]NAMESPACE/NAME.
        id: String,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA: an Ed25519 key (mode 0600) and a self-signed CA certificate.
    Init {
        /// The trust domain its identities belong to (as in SPIFFE IDs), e.g. cluster.local.
        #[arg(long)]
        trust_domain: String,
        /// The directory to create: ca.key (mode 0600) and ca.crt.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity, e.g. 3650d, 8760h.
        #[arg(long, default_value = ca::DEFAULT_CA_TTL)]
        ttl: String,
        /// The overlay ranges this CA's identities may hold (its scope), comma-separated; every
        /// address it grants must lie inside one. Default: any address.
        #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
        addresses: Vec<String>,
    },
    /// Add a serial to the CA's signed revocation list (DIR/revoked.crl).
    Revoke {
        /// The CA directory (ca.key, ca.crt, revoked.crl).
        #[arg(long)]
        ca: PathBuf,
        /// Revoke the certificate with this serial.
        #[arg(long)]
        serial: Option<u64>,
        /// Revoke this public key (base64) in every certificate, also ones issued later.
        #[arg(long, value_name = "KEY")]
        key: Option<String>,
        /// Revoke this certificate: its serial and its public key.
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
    },
    /// Revocation lists.
    Crl {
        #[command(subcommand)]
        command: CrlCommand,
    },
    /// Single-use join tokens: a node redeems one with meshctl join for its certificate, from
    /// the online issuer (meshctl ca serve), and its private key never leaves it.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Issue workload certificates online: nodes ask over the underlay, sealed with their own
    /// key, for the workloads the registry (DIR/workloads.yaml) places on them. Makes
    /// DIR/issuer/ (the workload CA and the key requests are sealed to) the first time.
    Serve {
        /// The CA directory (ca.crt and revoked.crl vouch for nodes; workloads.yaml says who
        /// runs where).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The underlay address and UDP port to listen on.
        #[arg(long, value_name = "IP:PORT", required_unless_present = "prepare")]
        listen: Option<std::net::SocketAddr>,
        /// Only make DIR/issuer/ (the workload CA and the issuer's key) if missing, print the
        /// key, and exit: for an issuer that will run elsewhere (a Kubernetes Deployment).
        #[arg(long, conflicts_with = "listen")]
        prepare: bool,
        /// How long a workload certificate lives (nodes renew at half of it).
        #[arg(long, default_value = "1h")]
        ttl: String,
        #[command(flatten)]
        kube: issuer::KubeArgs,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a join token for one node identity; prints the token (give it to the node only).
    Create(join::TokenArgs),
}

#[derive(Subcommand)]
enum CrlCommand {
    /// Show a revocation list: its number, when it was signed, what it revokes; with --ca,
    /// whether that CA signed it (exit 1 if not).
    Inspect {
        /// The revocation list (e.g. CA_DIR/revoked.crl).
        file: PathBuf,
        /// The CA directory whose signature to check.
        #[arg(long)]
        ca: Option<PathBuf>,
        #[arg(short, long, value_enum, default_value_t = Output::Table, help = OUTPUT_HELP)]
        output: Output,
    },
}

#[derive(Subcommand)]
enum WorkloadCommand {
    /// Register a workload on a node (or replace the one of that namespace and name).
    Register(workload::RegisterArgs),
    /// List the registered workloads.
    List {
        /// The CA directory whose registry (workloads.yaml) to read.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        #[arg(short, long, value_enum, default_value_t = Output::Table, help = OUTPUT_HELP)]
        output: Output,
    },
    /// Attach a workload to the running node (as the CNI plugin's ADD does): the node asks the
    /// issuer for its certificate; exit 0 once its identity is in force here, 1 with the reason
    /// when it is refused or does not come within --wait.
    Attach {
        #[command(flatten)]
        reference: workload::RefArgs,
        /// How long to wait for the certificate.
        #[arg(long, default_value = "10s")]
        wait: String,
        #[command(flatten)]
        daemon: Daemon,
    },
    /// Detach a workload from the running node (as the CNI plugin's DEL does): its identity is
    /// withdrawn from the mesh.
    Detach {
        #[command(flatten)]
        reference: workload::RefArgs,
        #[command(flatten)]
        daemon: Daemon,
    },
    /// Remove a workload: no certificate is issued for it any more.
    Remove {
        /// The CA directory whose registry (workloads.yaml) this changes.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The workload's namespace.
        #[arg(long)]
        namespace: String,
        /// The workload's name.
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand)]
enum IdentityCommand {
    /// Issue a certificate binding a WireGuard public key to TD/NAMESPACE/NAME, labels and addresses.
    Issue(identity::IssueArgs),
    /// Show every field of a certificate, its validity, and whether it verifies.
    Inspect {
        /// The certificate file (NAME.crt).
        file: PathBuf,
        /// Verify against this CA directory (its ca.crt and revoked.crl).
        #[arg(long)]
        ca: Option<PathBuf>,
        #[arg(short, long, value_enum, default_value_t = Output::Table, help = OUTPUT_HELP)]
        output: Output,
    },
}

/// How `policy graph` prints: the four of every read command, and pictures.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum GraphOutput {
    /// One line per edge.
    Table,
    /// The edges with the policies that allowed them.
    Wide,
    Json,
    Yaml,
    /// Graphviz DOT.
    Dot,
    /// An SVG picture, laid out here (no Graphviz needed).
    Svg,
    /// One self-contained page: the picture, the edges, and the observed flows (--flows) in a
    /// table a filter box narrows.
    Html,
}

/// How a read command prints: the same four everywhere.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum Output {
    /// Columns for a terminal.
    Table,
    /// The table with more columns.
    Wide,
    /// JSON (one object per line for a stream of records).
    Json,
    /// YAML (one document per record for a stream).
    Yaml,
}

impl Output {
    /// Prints `value` as JSON or YAML and returns `None`; for a table returns `Some(wide)`, and
    /// the caller prints it.
    pub fn data<T: serde::Serialize>(self, value: &T) -> Result<Option<bool>, Failure> {
        use anyhow::Context;
        match self {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(value).context("encoding JSON")?
            ),
            Output::Yaml => print!(
                "{}",
                serde_yaml_ng::to_string(value).context("encoding YAML")?
            ),
            Output::Table => return Ok(Some(false)),
            Output::Wide => return Ok(Some(true)),
        }
        Ok(None)
    }
}

/// A failure and the exit code it maps to: 1 when the operation failed, 2 for bad input.
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn input(error: anyhow::Error) -> Failure {
        Failure { code: 2, error }
    }

    /// Exit 1 with nothing more on stderr: the answer on stdout already says it ("DENY",
    /// differences found), as `grep` and `diff` exit 1.
    pub fn answer() -> Failure {
        Failure {
            code: 1,
            error: anyhow::anyhow!(""),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        Failure { code: 1, error }
    }
}

/// `meshctl man --out DIR`.
fn man_pages(out: &std::path::Path) -> Result<(), Failure> {
    use anyhow::Context;
    use clap::CommandFactory;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cmd = Cli::command().name("meshctl");
    clap_mangen::generate_to(cmd, out)
        .with_context(|| format!("writing man pages into {}", out.display()))?;
    println!("man pages written to {}", out.display());
    Ok(())
}

fn policy_command(command: PolicyCommand, daemon: Daemon) -> Result<(), Failure> {
    let daemon = || daemon.path();
    let named = |kind: Option<String>, name: Option<String>| match (kind, name) {
        (Some(k), Some(n)) => policy_set::object_name(&k, &n).map(Some),
        (None, None) => Ok(None),
        _ => Err(Failure::input(anyhow::anyhow!("give both KIND and NAME"))),
    };
    match command {
        PolicyCommand::Selector { expr, labels } => policy::selector(&expr, &labels),
        PolicyCommand::Suggest {
            flows,
            namespace,
            by,
            trust_domain,
            output,
        } => policy::suggest(&flows, namespace, &by, trust_domain, output),
        PolicyCommand::Test {
            files,
            posture,
            trust_domain,
            output,
        } => {
            let set = policy::load_for(&files, &posture, &trust_domain)?;
            policy::test(&set, output)
        }
        PolicyCommand::Graph {
            files,
            identities,
            group_by,
            flows,
            posture,
            trust_domain,
            output,
        } => {
            let (set, live) = if files.is_empty() {
                let socket = daemon()?;
                let posture = posture.as_deref().map(policy::posture);
                let set = policy_set::running(&socket, posture, trust_domain.as_deref())?;
                (set, Some(policy_set::known(&socket)?))
            } else {
                let set = policy::load_for(
                    &files,
                    posture.as_deref().unwrap_or("zero-trust"),
                    trust_domain
                        .as_deref()
                        .unwrap_or(policy::DEFAULT_TRUST_DOMAIN),
                )?;
                (set, None)
            };
            policy::graph(
                &set,
                identities.as_deref(),
                live,
                group_by.as_deref(),
                &flows,
                output,
            )
        }
        PolicyCommand::Check {
            files,
            from,
            to,
            from_ip,
            to_ip,
            proto,
            port,
            posture,
            trust_domain,
            output,
        } => {
            let posture = posture.as_deref().map(policy::posture);
            let mut known = None;
            let set = if files.is_empty() {
                let socket = daemon()?;
                known = Some(policy_set::known(&socket)?);
                policy_set::running(&socket, posture, trust_domain.as_deref())?
            } else {
                policy::validate_paths(&files)?;
                policy::load(&files, posture.unwrap_or_default())?.in_trust_domain(
                    trust_domain
                        .as_deref()
                        .unwrap_or(policy::DEFAULT_TRUST_DOMAIN),
                )
            };
            policy::check(policy::CheckArgs {
                set,
                known,
                output,
                from: &from,
                to: &to,
                from_ip: from_ip.as_deref(),
                to_ip: to_ip.as_deref(),
                proto: &proto,
                port,
            })
        }
        PolicyCommand::Apply { files, key } => policy_set::apply(&daemon()?, &files, &key),
        PolicyCommand::Diff {
            files,
            connectivity: false,
            output,
            ..
        } => policy_set::diff(&daemon()?, &files, output),
        PolicyCommand::Diff {
            files,
            identities,
            output,
            ..
        } => policy_set::connectivity(&daemon()?, &files, identities.as_deref(), output),
        PolicyCommand::Delete {
            kind,
            name,
            files,
            key,
        } => {
            let mut names: Vec<String> = named(kind, name)?.into_iter().collect();
            if !files.is_empty() {
                names.extend(
                    policy_set::read_objects(&files)?
                        .objects
                        .into_iter()
                        .map(|o| o.name),
                );
            }
            if names.is_empty() {
                return Err(Failure::input(anyhow::anyhow!(
                    "name what to delete: KIND NAME, or -f FILE"
                )));
            }
            policy_set::delete(&daemon()?, names, &key)
        }
        PolicyCommand::Get { kind, name, output } => {
            policy_set::get(&daemon()?, named(kind, name)?, output)
        }
        PolicyCommand::List { output } => policy_set::list(&daemon()?, output),
        PolicyCommand::Status { output } => policy_set::status(&daemon()?, output),
        PolicyCommand::AdminKey { out } => policy_set::admin_key(&out),
    }
}

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of stdout goes away
    // (`meshctl flows | head`), instead of panicking on the failed write.
    // SAFETY: resetting a signal disposition to its default before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Ca {
            command:
                CaCommand::Init {
                    trust_domain,
                    out,
                    ttl,
                    addresses,
                },
        } => ca::init(&trust_domain, &out, &ttl, &addresses),
        Command::Ca {
            command:
                CaCommand::Revoke {
                    ca,
                    serial,
                    key,
                    cert,
                },
        } => ca::revoke(&ca, serial, key.as_deref(), cert.as_deref()),
        Command::Ca {
            command:
                CaCommand::Crl {
                    command: CrlCommand::Inspect { file, ca, output },
                },
        } => ca::crl_inspect(&file, ca.as_deref(), output),
        Command::Ca {
            command:
                CaCommand::Serve {
                    ca,
                    listen,
                    ttl,
                    kube,
                    prepare,
                },
        } => match listen {
            Some(listen) if !prepare => issuer::serve(&ca, listen, &ttl, kube),
            _ => issuer::prepare(&ca),
        },
        Command::Ca {
            command:
                CaCommand::Token {
                    command: TokenCommand::Create(args),
                },
        } => join::create(args),
        Command::Join(args) => join::join(args),
        Command::Identity {
            command: IdentityCommand::Issue(args),
        } => identity::issue(args),
        Command::Identity {
            command: IdentityCommand::Inspect { file, ca, output },
        } => identity::inspect(&file, ca.as_deref(), output),
        Command::Workload {
            command: WorkloadCommand::Register(args),
        } => workload::register(args),
        Command::Workload {
            command: WorkloadCommand::List { ca, output },
        } => workload::list(&ca, output),
        Command::Workload {
            command:
                WorkloadCommand::Attach {
                    reference,
                    wait,
                    daemon,
                },
        } => daemon
            .path()
            .and_then(|path| workload::attach(&path, reference, &wait)),
        Command::Workload {
            command: WorkloadCommand::Detach { reference, daemon },
        } => daemon
            .path()
            .and_then(|path| workload::detach(&path, reference)),
        Command::Workload {
            command:
                WorkloadCommand::Remove {
                    ca,
                    namespace,
                    name,
                },
        } => workload::remove(&ca, &namespace, &name),
        Command::Version => {
            println!("meshctl {VERSION}");
            Ok(())
        }
        Command::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "meshctl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { out } => man_pages(&out),
        Command::Genkey => keys::genkey(),
        Command::Pubkey => keys::pubkey(),
        Command::Reload { daemon, ifname } => {
            let daemon = Daemon {
                interface: daemon.interface.or(ifname),
                ..daemon
            };
            daemon.path().and_then(|path| status::reload(&path))
        }
        Command::Policy { command, daemon } => policy_command(command, daemon),
        Command::Lab {
            command,
            dir,
            prefix,
        } => lab::set_prefix(&prefix).and_then(|()| match command {
            LabCommand::Up { example, nodes } => lab::up(&example, &dir, nodes),
            LabCommand::Status => lab::status(&dir),
            LabCommand::Down => lab::down(&dir),
        }),
        Command::Flows {
            follow,
            denied,
            staged,
            mesh,
            key,
            since,
            from,
            to,
            policy,
            output,
            daemon,
        } => daemon.path().and_then(|path| {
            let since = since
                .as_deref()
                .map(proto::duration::parse)
                .transpose()
                .map_err(|e| Failure::input(anyhow::anyhow!("--since: {e}")))?;
            let filter = flows::Filter {
                denied,
                staged,
                since,
                from,
                to,
                policy,
            };
            if mesh {
                flows::mesh(&path, &key, follow, &filter, output)
            } else {
                flows::run(&path, follow, &filter, output)
            }
        }),
        Command::Federation { command, daemon } => daemon.path().and_then(|path| match command {
            FederationCommand::Add {
                trust_domain,
                bundle,
                namespaces,
                addresses,
                routes,
                key,
            } => federation::add(
                &path,
                federation::AddArgs {
                    trust_domain: &trust_domain,
                    bundle: &bundle,
                    namespaces: &namespaces,
                    addresses: &addresses,
                    routes: &routes,
                    key: &key,
                },
            ),
            FederationCommand::List { output } => federation::list(&path, output),
            FederationCommand::Remove { trust_domain, key } => {
                federation::remove(&path, &trust_domain, &key)
            }
        }),
        Command::Peer { command, daemon } => match daemon.path() {
            Err(f) => Err(f),
            Ok(path) => match command {
                PeerCommand::Add { endpoint } => peer::add(&path, &endpoint),
                PeerCommand::List { output } => peer::list(&path, output),
                PeerCommand::Remove { id } => peer::remove(&path, &id),
            },
        },
        Command::Status {
            output,
            daemon,
            ifname,
        } => status::run(daemon.interface.or(ifname), output, daemon.socket),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            let message = format!("{:#}", f.error);
            if !message.is_empty() {
                eprintln!("meshctl: {message}");
            }
            ExitCode::from(f.code)
        }
    }
}

#[cfg(test)]
mod cli_tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every flag and argument of every command says what it is for, and `-o` means the same
    /// four formats everywhere (`policy graph` adds pictures after them).
    #[test]
    fn every_argument_has_help_and_outputs_agree() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
                if arg.get_short() == Some('o') {
                    let values: Vec<String> = arg
                        .get_possible_values()
                        .iter()
                        .map(|v| v.get_name().to_string())
                        .collect();
                    assert_eq!(values[..4], ["table", "wide", "json", "yaml"], "{path}");
                    if values.len() > 4 {
                        assert_eq!(path, "meshctl policy graph");
                    }
                }
                if arg.get_short() == Some('i') {
                    assert_eq!(arg.get_long(), Some("interface"), "{path}");
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "meshctl", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
        Cli::command().debug_assert();
    }
}
