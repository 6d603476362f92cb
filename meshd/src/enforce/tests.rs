//! The enforcement decisions on real packet bytes, without sockets: what the data path drops,
//! what it lets through on the connection table, what a policy change cuts.

use super::*;
use policy::engine::PolicySet;
use proto::ip::{PROTO_ICMP, PROTO_TCP};

const ME: [u8; 4] = [100, 64, 0, 1];
const API: [u8; 4] = [100, 64, 0, 2];
const OTHER: [u8; 4] = [100, 64, 0, 3];
const API_KEY: [u8; 32] = [2; 32];
const ME_KEY: [u8; 32] = [1; 32];
const OTHER_KEY: [u8; 32] = [3; 32];

fn identity(name: &str, app: &str, ip: [u8; 4]) -> Identity {
    let addr = std::net::IpAddr::from(ip);
    Identity {
        endpoint: Endpoint {
            trust_domain: "example.org".into(),
            namespace: "microblog".into(),
            name: name.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            ip: Some(addr),
            ports: Vec::new(),
        },
        addrs: vec![proto::Cidr::new(addr, 32).unwrap()],
    }
}

/// This node is `post`; `api` may reach it on TCP 8080, and it may call nobody.
const POLICY: &str = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: post-allow-list, namespace: microblog}
spec:
  selector: app == 'post'
  ingress:
  - action: Allow
    protocol: TCP
    source: {serviceAccounts: {names: [api]}}
    destination: {ports: [8080]}
";

fn rules(yaml: &str, audit_all: bool, serial: u64) -> Rules {
    let docs = policy::model::parse_documents(yaml, "test").unwrap();
    let set = PolicySet::compile(&docs, Posture::ZeroTrust)
        .unwrap()
        .in_trust_domain("example.org");
    Rules::build(
        &set,
        identity("post", "post", ME),
        [
            (API_KEY, identity("api", "api", API)),
            (OTHER_KEY, identity("other", "other", OTHER)),
        ],
        audit_all,
        serial,
    )
}

fn enforcer(yaml: &str, audit_all: bool, conntrack_max: usize) -> Enforcer {
    Enforcer::new(
        rules(yaml, audit_all, 1),
        conntrack_max,
        FlowLog::start(None).unwrap(),
    )
}

fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[9] = proto;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p.extend_from_slice(l4);
    p
}

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let mut h = [0u8; 20];
    h[..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[13] = flags;
    ipv4(PROTO_TCP, src, dst, &h)
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

#[test]
fn ingress_allows_what_policy_allows_and_replies_ride_the_connection() {
    let e = enforcer(POLICY, false, 1024);
    let drops = DropCounters::default();
    assert!(e.ingress(&tcp(API, 40000, ME, 8080, SYN), &API_KEY, &drops));
    // The reply leaves although post's egress allows nothing: it belongs to an allowed flow.
    assert!(e.egress(&tcp(ME, 8080, API, 40000, SYN | ACK), &API_KEY, &drops));
    assert!(e.ingress(&tcp(API, 40000, ME, 8080, ACK), &API_KEY, &drops));
    // Another identity, another port, or post calling out: denied and counted.
    assert!(!e.ingress(&tcp(OTHER, 40001, ME, 8080, SYN), &OTHER_KEY, &drops));
    assert!(!e.ingress(&tcp(API, 40002, ME, 9090, SYN), &API_KEY, &drops));
    assert!(!e.egress(&tcp(ME, 40003, API, 8080, SYN), &API_KEY, &drops));
    assert_eq!(drops.get(Drop::PolicyIngress), 2);
    assert_eq!(drops.get(Drop::PolicyEgress), 1);
    let st = e.status();
    assert_eq!((st.allowed_flows, st.denied_packets), (1, 3));
    assert_eq!(st.conntrack_entries, 1);
}

#[test]
fn the_identity_is_the_authenticated_peers_not_the_address() {
    let e = enforcer(POLICY, false, 1024);
    let drops = DropCounters::default();
    // api's address, but authenticated as `other` (the data path checked that the address is
    // one of that peer's allowed IPs before asking): decided as `other`, denied.
    assert!(!e.ingress(&tcp(API, 40000, ME, 8080, SYN), &OTHER_KEY, &drops));
    // A key that is no member selects nothing.
    assert!(!e.ingress(&tcp(API, 40000, ME, 8080, SYN), &[9; 32], &drops));
}

#[test]
fn icmp_errors_about_a_tracked_flow_pass_and_others_do_not() {
    let e = enforcer(POLICY, false, 1024);
    let drops = DropCounters::default();
    let syn = tcp(API, 40000, ME, 8080, SYN);
    assert!(e.ingress(&syn, &API_KEY, &drops));
    // post's host says "port unreachable" about the SYN: quoted, related, passes outbound.
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&syn[..28]);
    assert!(e.egress(&ipv4(PROTO_ICMP, ME, API, &icmp), &API_KEY, &drops));
    // The same error about a flow nobody opened is a new ICMP flow, which policy denies.
    let other = tcp(API, 40999, ME, 8080, SYN);
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&other[..28]);
    assert!(!e.egress(&ipv4(PROTO_ICMP, ME, API, &icmp), &API_KEY, &drops));
    // Malformed transport headers are dropped and counted.
    assert!(!e.ingress(&ipv4(PROTO_TCP, API, ME, &[0; 5]), &API_KEY, &drops));
    assert_eq!(drops.get(Drop::PolicyMalformed), 1);
}

#[test]
fn a_peer_cannot_deliver_icmp_errors_about_another_peers_flow() {
    let e = enforcer(POLICY, false, 1024);
    let drops = DropCounters::default();
    // post answers api's SYN: a tracked flow through api's tunnel.
    assert!(e.ingress(&tcp(API, 40000, ME, 8080, SYN), &API_KEY, &drops));
    let reply = tcp(ME, 8080, API, 40000, SYN | ACK);
    assert!(e.egress(&reply, &API_KEY, &drops));
    // `other` (denied by policy) sends "host unreachable" quoting post's reply to api, from its
    // own address, through its own tunnel: not its flow, so it is a new ICMP flow, denied.
    let mut icmp = vec![3, 1, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&reply[..28]);
    assert!(!e.ingress(&ipv4(PROTO_ICMP, OTHER, ME, &icmp), &OTHER_KEY, &drops));
    assert_eq!(drops.get(Drop::PolicyIngress), 1);
    // The same error from api's own tunnel is part of api's flow.
    assert!(e.ingress(&ipv4(PROTO_ICMP, API, ME, &icmp), &API_KEY, &drops));
}

#[test]
fn a_policy_change_cuts_flows_it_denies_and_keeps_the_others() {
    let e = enforcer(POLICY, false, 1024);
    let drops = DropCounters::default();
    assert!(e.ingress(&tcp(API, 40000, ME, 8080, SYN), &API_KEY, &drops));
    // Same policy under a new serial: the flow stays.
    e.install(rules(POLICY, false, 2));
    assert!(e.ingress(&tcp(API, 40000, ME, 8080, ACK), &API_KEY, &drops));
    assert_eq!(e.status().cut_flows, 0);
    // The allow-list moves to port 9090: the 8080 flow is cut, its next segment denied.
    e.install(rules(&POLICY.replace("8080", "9090"), false, 3));
    assert_eq!(e.status().cut_flows, 1);
    assert!(!e.ingress(&tcp(API, 40000, ME, 8080, ACK), &API_KEY, &drops));
    assert_eq!(e.status().serial, 3);
}

#[test]
fn audit_mode_passes_and_counts_what_it_would_deny() {
    let e = enforcer(POLICY, true, 1024);
    let drops = DropCounters::default();
    assert!(e.ingress(&tcp(OTHER, 40001, ME, 8080, SYN), &OTHER_KEY, &drops));
    assert!(e.egress(&tcp(ME, 40002, API, 8080, SYN), &API_KEY, &drops));
    let st = e.status();
    assert_eq!(
        (st.audited_flows, st.denied_packets, st.allowed_flows),
        (2, 0, 0)
    );
    assert_eq!(
        drops.get(Drop::PolicyIngress) + drops.get(Drop::PolicyEgress),
        0
    );
    // Per policy: the annotation audits only that policy's denials.
    let annotated = POLICY.replace(
        "namespace: microblog}",
        "namespace: microblog, annotations: {policy.mesh/audit: \"true\"}}",
    );
    let e = enforcer(&annotated, false, 1024);
    assert!(e.ingress(&tcp(OTHER, 40001, ME, 8080, SYN), &OTHER_KEY, &drops));
    // post's egress: no policy selects it, so default-deny, which no policy can audit.
    assert!(!e.egress(&tcp(ME, 40002, API, 8080, SYN), &API_KEY, &drops));
}

#[test]
fn the_connection_table_is_bounded_and_counts_evictions() {
    let e = enforcer(POLICY, false, 16);
    let drops = DropCounters::default();
    for port in 0..200u16 {
        assert!(e.ingress(&tcp(API, 20000 + port, ME, 8080, SYN), &API_KEY, &drops));
    }
    let st = e.status();
    assert!(st.conntrack_entries <= 16, "{st:?}");
    assert_eq!(st.conntrack_entries as u64 + st.conntrack_evictions, 200);
}

fn ipv6(next: u8, src: u16, dst: u16, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
    p[6] = next;
    p[7] = 64;
    let addr = |last: u16| {
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        a[14..].copy_from_slice(&last.to_be_bytes());
        a
    };
    p[8..24].copy_from_slice(&addr(src));
    p[24..40].copy_from_slice(&addr(dst));
    p.extend_from_slice(l4);
    p
}

#[test]
fn ipv6_flows_and_icmpv6_echo_are_decided_and_tracked_alike() {
    let v6 = |last: u16| -> proto::Cidr { format!("fd00::{last:x}/128").parse().unwrap() };
    let mut me = identity("post", "post", ME);
    me.addrs.push(v6(1));
    let mut api = identity("api", "api", API);
    api.addrs.push(v6(2));
    let yaml = format!(
        "{POLICY}---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: ping6, namespace: microblog}}\nspec:\n  selector: app == 'post'\n  ingress:\n  - action: Allow\n    protocol: ICMPv6\n    icmp: {{type: 128}}\n"
    );
    let docs = policy::model::parse_documents(&yaml, "test").unwrap();
    let set = PolicySet::compile(&docs, Posture::ZeroTrust)
        .unwrap()
        .in_trust_domain("example.org");
    let e = Enforcer::new(
        Rules::build(&set, me, [(API_KEY, api)], false, 1),
        1024,
        FlowLog::start(None).unwrap(),
    );
    let drops = DropCounters::default();
    let mut syn = [0u8; 20];
    syn[..2].copy_from_slice(&40000u16.to_be_bytes());
    syn[2..4].copy_from_slice(&8080u16.to_be_bytes());
    syn[13] = SYN;
    assert!(e.ingress(&ipv6(PROTO_TCP, 2, 1, &syn), &API_KEY, &drops));
    syn[2..4].copy_from_slice(&22u16.to_be_bytes());
    assert!(!e.ingress(&ipv6(PROTO_TCP, 2, 1, &syn), &API_KEY, &drops));
    // Echo request in, reply out on the same identifier; another identifier's reply is new.
    let req = [128, 0, 0, 0, 0x12, 0x34, 0, 1];
    let rep = [129, 0, 0, 0, 0x12, 0x34, 0, 1];
    let stray = [129, 0, 0, 0, 0x99, 0x99, 0, 1];
    const ICMPV6: u8 = 58;
    assert!(e.ingress(&ipv6(ICMPV6, 2, 1, &req), &API_KEY, &drops));
    assert!(e.egress(&ipv6(ICMPV6, 1, 2, &rep), &API_KEY, &drops));
    assert!(!e.egress(&ipv6(ICMPV6, 1, 2, &stray), &API_KEY, &drops));
}

#[test]
fn the_flow_log_names_both_identities_and_pages_without_gaps() {
    let e = enforcer(POLICY, false, 1024);
    let drops = DropCounters::default();
    assert!(e.ingress(&tcp(API, 40000, ME, 8080, SYN), &API_KEY, &drops));
    assert!(!e.ingress(&tcp(OTHER, 40001, ME, 8080, SYN), &OTHER_KEY, &drops));
    // The denied SYN's retry is not logged again; a third flow is.
    assert!(!e.ingress(&tcp(OTHER, 40001, ME, 8080, SYN), &OTHER_KEY, &drops));
    assert!(e.ingress(&tcp(API, 40002, ME, 8080, SYN), &API_KEY, &drops));
    let log = e.flow_log();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while log.query(0, false, false, 100).0.len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the logger wrote nothing"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (all, next) = log.query(0, false, false, 100);
    assert_eq!(all.len(), 3);
    assert_eq!(next, all[2].seq);
    let first = &all[0];
    assert_eq!(
        (first.verdict.as_str(), first.direction.as_str()),
        ("allow", "ingress")
    );
    assert_eq!(first.src.name.as_deref(), Some("api"));
    assert_eq!(first.dst.name.as_deref(), Some("post"));
    assert_eq!(first.dst.port, Some(8080));
    assert_eq!(first.policy, "NetworkPolicy microblog/post-allow-list");
    assert_eq!(first.rule.as_deref(), Some("ingress[0]"));
    assert_eq!(all[1].verdict, "deny");
    assert_eq!(all[1].policy, "end-of-policies");
    // Paging: one at a time gives the same records, in order, without gaps.
    let mut since = 0;
    let mut paged = Vec::new();
    loop {
        let (page, next) = log.query(since, false, false, 1);
        if page.is_empty() {
            break;
        }
        paged.extend(page);
        since = next;
    }
    assert_eq!(paged, all);
    let (denied, _) = log.query(0, true, false, 100);
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].src.name.as_deref(), Some("other"));
}

/// A staged policy changes no packet's fate; the flow log records what it would have decided, and
/// the query for staged denials finds exactly those flows.
#[test]
fn the_flow_log_records_the_staged_verdict_and_packets_pass_as_enforced() {
    let staged = format!(
        "{POLICY}---
apiVersion: projectcalico.org/v3
kind: StagedNetworkPolicy
metadata: {{name: no-api, namespace: microblog}}
spec:
  order: 1
  selector: app == 'post'
  ingress:
  - action: Deny
    source: {{serviceAccounts: {{names: [api]}}}}
"
    );
    let e = enforcer(&staged, false, 1024);
    let drops = DropCounters::default();
    assert!(
        e.ingress(&tcp(API, 40000, ME, 8080, SYN), &API_KEY, &drops),
        "staged denies nothing"
    );
    assert!(!e.ingress(&tcp(OTHER, 40001, ME, 8080, SYN), &OTHER_KEY, &drops));
    let log = e.flow_log();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while log.query(0, false, false, 100).0.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the logger wrote nothing"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (all, _) = log.query(0, false, false, 100);
    assert_eq!(all[0].verdict, "allow");
    let s = all[0].staged.as_ref().expect("a staged verdict");
    assert_eq!(
        (s.verdict.as_str(), s.policy.as_str(), s.rule.as_deref()),
        (
            "deny",
            "StagedNetworkPolicy microblog/no-api",
            Some("ingress[0]")
        )
    );
    let s = all[1].staged.as_ref().unwrap();
    assert_eq!(
        (s.verdict.as_str(), s.policy.as_str()),
        ("deny", "end-of-policies")
    );
    let (would, _) = log.query(0, false, true, 100);
    assert_eq!(would.len(), 2);
    // Without staged policies, no staged verdict.
    let plain = enforcer(POLICY, false, 1024);
    assert!(plain.ingress(&tcp(API, 40000, ME, 8080, SYN), &API_KEY, &drops));
    while plain.flow_log().query(0, false, false, 100).0.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the logger wrote nothing"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(plain.flow_log().query(0, false, false, 100).0[0]
        .staged
        .is_none());
    assert!(plain.flow_log().query(0, false, true, 100).0.is_empty());
}

#[test]
fn membership_changes_resolve_only_what_changed_and_decide_as_a_rebuild() {
    // With a staged policy that denies `other` when it is service account `api`: the staged
    // view grows with the members too.
    let yaml = format!(
        "{POLICY}---
apiVersion: projectcalico.org/v3
kind: StagedNetworkPolicy
metadata: {{name: no-other, namespace: microblog}}
spec:
  order: 1
  selector: app == 'post'
  ingress: [{{action: Deny, source: {{selector: app == 'other'}}}}]
"
    );
    let docs = policy::model::parse_documents(&yaml, "test").unwrap();
    let set = PolicySet::compile(&docs, Posture::ZeroTrust)
        .unwrap()
        .in_trust_domain("example.org");
    let me = identity("post", "post", ME);
    let api = identity("api", "api", API);
    let other = identity("other", "other", OTHER);
    let first = Rules::build(&set, me.clone(), [(API_KEY, api.clone())], false, 1);
    let decide = |r: &Rules, key: &[u8; 32], src: [u8; 4]| {
        let flow = FlowKey::parse(&tcp(src, 40000, ME, 8080, SYN)).unwrap();
        let d = r
            .decide(Direction::Ingress, &flow, r.identity_of(key))
            .expect("a flow to this node");
        let v = d.verdict;
        let s = r.staged_verdict(&flow, &d).expect("a staged verdict");
        let staged = r.staged.as_ref().unwrap().policy_name(&s).to_string();
        (
            v.allow,
            r.compiled.policy_name(&v).to_string(),
            s.allow,
            staged,
        )
    };
    // A member joins: only it is resolved; decisions equal a rebuild's.
    let both = [(API_KEY, api.clone()), (OTHER_KEY, other.clone())];
    let grown = first.with_members(&set, &me, both.clone()).unwrap();
    let rebuilt = Rules::build(&set, me.clone(), both, false, 1);
    assert_eq!(grown.identities.len(), 3);
    for (key, ip) in [(API_KEY, API), (OTHER_KEY, OTHER)] {
        assert_eq!(decide(&grown, &key, ip), decide(&rebuilt, &key, ip));
    }
    assert!(decide(&grown, &API_KEY, API).0);
    // `other` renews as a service account the policy allows: a new index, allowed now.
    let renamed = identity("api", "other", OTHER);
    let renewed = grown
        .with_members(&set, &me, [(API_KEY, api.clone()), (OTHER_KEY, renamed)])
        .unwrap();
    assert_eq!(
        renewed.identities.len(),
        4,
        "the old index is retired, not reused"
    );
    let d = decide(&renewed, &OTHER_KEY, OTHER);
    assert!(d.0 && !d.2, "{d:?}");
    assert_eq!(d.3, "StagedNetworkPolicy microblog/no-other");
    // `api` leaves: its key and addresses no longer name anyone.
    let shrunk = renewed
        .with_members(&set, &me, [(OTHER_KEY, identity("other", "other", OTHER))])
        .unwrap();
    assert_eq!(shrunk.identity_of(&API_KEY), UNKNOWN);
    assert_eq!(shrunk.owners.lookup(std::net::IpAddr::from(API)), None);
    assert!(!decide(&shrunk, &API_KEY, API).0);
    // A changed local identity, or many retired indices, ask for a rebuild.
    assert!(first
        .with_members(
            &set,
            &identity("post2", "post", ME),
            [] as [([u8; 32], Identity); 0]
        )
        .is_none());
}

/// `packet` as the first fragment of datagram `id` (more fragments follow).
fn first_fragment(mut packet: Vec<u8>, id: u16) -> Vec<u8> {
    packet[4..6].copy_from_slice(&id.to_be_bytes());
    packet[6] = 0x20;
    packet
}

/// A later fragment of datagram `id` from `src` to `dst`: no transport header, offset 3.
fn later_fragment(proto: u8, src: [u8; 4], dst: [u8; 4], id: u16) -> Vec<u8> {
    let mut p = ipv4(proto, src, dst, &[0xab; 16]);
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[7] = 3;
    p
}

#[test]
fn a_later_fragment_passes_only_when_its_first_fragment_did() {
    let e = enforcer(POLICY, false, 1024);
    let drops = DropCounters::default();
    // api's SYN to 8080 in fragments: the first is decided (allowed), the rest follow it.
    let first = first_fragment(tcp(API, 40000, ME, 8080, SYN), 77);
    assert!(e.ingress(&first, &API_KEY, &drops));
    assert!(e.ingress(&later_fragment(PROTO_TCP, API, ME, 77), &API_KEY, &drops));
    // A later fragment of a datagram whose first fragment nobody saw, or was denied, is dropped
    // and counted: its ports are not there for policy to see.
    assert!(!e.ingress(&later_fragment(PROTO_TCP, API, ME, 78), &API_KEY, &drops));
    let denied = first_fragment(tcp(OTHER, 40001, ME, 8080, SYN), 79);
    assert!(!e.ingress(&denied, &OTHER_KEY, &drops));
    assert!(!e.ingress(
        &later_fragment(PROTO_TCP, OTHER, ME, 79),
        &OTHER_KEY,
        &drops
    ));
    // The same identification from another address is another datagram.
    assert!(!e.ingress(
        &later_fragment(PROTO_TCP, OTHER, ME, 77),
        &OTHER_KEY,
        &drops
    ));
    assert_eq!(drops.get(Drop::PolicyFragment), 3);
}

/// A gateway serving 198.19.0.0/24 (this node, `post`), and a client (`api`) behind it.
const EXTERNAL_HOST: [u8; 4] = [198, 19, 0, 5];
const GATEWAY_POLICY: &str = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata: {name: partner-db, labels: {role: partner-db}}
spec:
  nets: [198.19.0.0/24]
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: api-out, namespace: microblog}
spec:
  selector: app == 'api'
  egress:
  - action: Allow
    protocol: TCP
    destination: {selector: role == 'partner-db', namespaceSelector: global(), ports: [5432]}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: from-partner, namespace: microblog}
spec:
  selector: app == 'api'
  ingress:
  - action: Allow
    protocol: TCP
    source: {selector: role == 'partner-db', namespaceSelector: global()}
    destination: {ports: [8080]}
";

fn gateway() -> Enforcer {
    let mut r = rules(GATEWAY_POLICY, false, 1);
    r = r.serving(&["198.19.0.0/24".parse().unwrap()]);
    Enforcer::new(r, 1024, FlowLog::start(None).unwrap())
}

/// At the gateway, traffic between a member and a route it serves is decided by the member's
/// policy, the source identity being the authenticated peer: api's egress to the partner
/// database, api's ingress from it; replies ride the connection table; nothing else crosses.
#[test]
fn a_gateway_decides_forwarded_flows_by_the_members_policy() {
    let e = gateway();
    let drops = DropCounters::default();
    // api → partner-db:5432, decrypted at the gateway: api's egress allows it.
    assert!(e.ingress(&tcp(API, 40000, EXTERNAL_HOST, 5432, SYN), &API_KEY, &drops));
    // The database's answer, read from the TUN device on its way back: tracked.
    assert!(e.egress(
        &tcp(EXTERNAL_HOST, 5432, API, 40000, SYN | ACK),
        &API_KEY,
        &drops
    ));
    // api → another port, and `other` (no egress policy) → the database: denied here.
    assert!(!e.ingress(&tcp(API, 40001, EXTERNAL_HOST, 22, SYN), &API_KEY, &drops));
    assert!(!e.ingress(
        &tcp(OTHER, 40002, EXTERNAL_HOST, 5432, SYN),
        &OTHER_KEY,
        &drops
    ));
    assert_eq!(
        drops.get(Drop::PolicyEgress),
        2,
        "decided as the member's egress"
    );
    // partner-db → api:8080, read from the TUN device at the gateway: api's ingress allows it.
    assert!(e.egress(&tcp(EXTERNAL_HOST, 50000, API, 8080, SYN), &API_KEY, &drops));
    // ... but not to `other`, nor to api's other ports.
    assert!(!e.egress(
        &tcp(EXTERNAL_HOST, 50001, OTHER, 8080, SYN),
        &OTHER_KEY,
        &drops
    ));
    assert!(!e.egress(&tcp(EXTERNAL_HOST, 50002, API, 22, SYN), &API_KEY, &drops));
    assert_eq!(
        drops.get(Drop::PolicyIngress),
        2,
        "decided as the member's ingress"
    );
    // An address outside the routes this node serves is not its to forward, either way.
    let elsewhere = [198, 19, 7, 5];
    assert!(!e.ingress(&tcp(API, 40003, elsewhere, 5432, SYN), &API_KEY, &drops));
    assert!(!e.egress(&tcp(elsewhere, 5432, API, 8080, SYN), &API_KEY, &drops));
    assert_eq!(drops.get(Drop::PolicyNotHere), 2);
}

/// At a client, an address no identity holds is outside the mesh: api's traffic to the partner
/// database (through its gateway peer) is decided against the network's labels.
#[test]
fn a_client_decides_traffic_to_an_external_network_by_its_labels() {
    let r = Rules::build(
        &{
            let docs = policy::model::parse_documents(GATEWAY_POLICY, "test").unwrap();
            PolicySet::compile(&docs, Posture::ZeroTrust)
                .unwrap()
                .in_trust_domain("example.org")
        },
        identity("api", "api", API),
        [(ME_KEY, identity("post", "post", ME))],
        false,
        1,
    );
    let e = Enforcer::new(r, 1024, FlowLog::start(None).unwrap());
    let drops = DropCounters::default();
    assert!(e.egress(&tcp(API, 40000, EXTERNAL_HOST, 5432, SYN), &ME_KEY, &drops));
    assert!(!e.egress(&tcp(API, 40001, EXTERNAL_HOST, 80, SYN), &ME_KEY, &drops));
    // From the database to api:8080 through the gateway: api's ingress, by the network's labels.
    assert!(e.ingress(&tcp(EXTERNAL_HOST, 50000, API, 8080, SYN), &ME_KEY, &drops));
    // A source the gateway peer does hold (its own address) is that identity, not outside.
    assert!(!e.ingress(&tcp(ME, 50001, API, 8080, SYN), &ME_KEY, &drops));
}

/// A member's tracked flow is decided again as the member's: once it is no member (it left,
/// was revoked, or its federation was removed), the flow is cut, even under a rule that lets
/// any address in (an address no identity holds is not the member it was).
#[test]
fn a_flow_of_a_member_that_left_is_cut_even_where_any_address_may_come_in() {
    let open = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: open, namespace: microblog}
spec:
  selector: app == 'post'
  ingress: [{action: Allow}]
";
    let e = enforcer(open, false, 1024);
    let drops = DropCounters::default();
    assert!(e.ingress(&tcp(API, 40000, ME, 8080, SYN), &API_KEY, &drops));
    let docs = policy::model::parse_documents(open, "test").unwrap();
    let set = PolicySet::compile(&docs, Posture::ZeroTrust)
        .unwrap()
        .in_trust_domain("example.org");
    let without_api = Rules::build(
        &set,
        identity("post", "post", ME),
        [(OTHER_KEY, identity("other", "other", OTHER))],
        false,
        1,
    );
    e.install(without_api);
    assert_eq!(e.status().cut_flows, 1, "api's flow is cut");
}

/// post lets api and other in on 8080, each held to 2 new connections and 5 packets a second
/// (per source identity: the two never share a bucket).
const LIMITED: &str = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: post-allow-list
  namespace: microblog
  annotations:
    policy.mesh/rate-limit: 'ingress[0]: {connectionsPerSecond: 2, packetsPerSecond: 5}'
spec:
  selector: app == 'post'
  ingress:
  - action: Allow
    protocol: TCP
    source: {serviceAccounts: {names: [api, other]}}
    destination: {ports: [8080]}
";

#[test]
fn a_rate_limit_holds_one_source_and_leaves_the_other_alone() {
    // The rates are low enough that the microseconds this test takes refill nothing.
    let e = enforcer(LIMITED, false, 1024);
    let drops = DropCounters::default();
    let opened: Vec<u16> = (40000..40010)
        .filter(|&p| e.ingress(&tcp(API, p, ME, 8080, SYN), &API_KEY, &drops))
        .collect();
    assert_eq!(opened, [40000, 40001], "two connections a second from api");
    assert_eq!(drops.get(Drop::RateLimited), 8);
    // other has its own bucket.
    assert!(e.ingress(&tcp(OTHER, 40000, ME, 8080, SYN), &OTHER_KEY, &drops));
    // api's packets: 5 a second, two of them spent on its SYNs. Replies are post's own, free.
    let acks = (0..10)
        .filter(|_| e.ingress(&tcp(API, 40000, ME, 8080, ACK), &API_KEY, &drops))
        .count();
    assert_eq!(acks, 3);
    for _ in 0..10 {
        assert!(e.egress(&tcp(ME, 8080, API, 40000, ACK), &API_KEY, &drops));
    }
    let st = e.status();
    assert_eq!(st.rate_limited_packets, 8 + 7);
    assert_eq!(st.rate_meters, 2);
    assert_eq!(st.rate_limits.len(), 1);
    let c = &st.rate_limits[0];
    assert_eq!(
        (c.direction.as_str(), c.policy.as_str()),
        ("ingress", "NetworkPolicy microblog/post-allow-list")
    );
    assert_eq!((c.refused_connections, c.dropped_packets), (8, 15));
    // The flow log says which flows were limited.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (records, _) = e.flow_log().query(0, true, false, 100);
    assert!(
        records
            .iter()
            .any(|r| r.verdict == "rate-limited" && r.event == "new"),
        "{records:?}"
    );
    assert!(
        records
            .iter()
            .any(|r| r.verdict == "rate-limited" && r.event == "limited"),
        "{records:?}"
    );

    // The limit lifted by a new set: the tracked flows run on, unmetered.
    e.install(rules(POLICY, false, 2));
    let acks = (0..10)
        .filter(|_| e.ingress(&tcp(API, 40000, ME, 8080, ACK), &API_KEY, &drops))
        .count();
    assert_eq!(acks, 10);
}

#[test]
fn a_forgotten_meter_is_found_again_from_the_rules_in_force() {
    let e = enforcer(LIMITED, false, 1024);
    let drops = DropCounters::default();
    assert!(e.ingress(&tcp(API, 40000, ME, 8080, SYN), &API_KEY, &drops));
    // As if the meter had been forgotten while idle: the next packets meet a new, full one.
    e.limiter.forget_all();
    let acks = (0..10)
        .filter(|_| e.ingress(&tcp(API, 40000, ME, 8080, ACK), &API_KEY, &drops))
        .count();
    assert_eq!(acks, 5, "the rule's packet rate, from a full bucket");
}

/// A limited source cannot slip packets past its meter as later fragments or as ICMP errors
/// about its own flow: each counts as a packet would.
#[test]
fn later_fragments_and_icmp_errors_count_against_the_meter() {
    let e = enforcer(LIMITED, false, 1024);
    let drops = DropCounters::default();
    // api's SYN in fragments: one connection and one packet token; 3 packets left of 5.
    let first = first_fragment(tcp(API, 40000, ME, 8080, SYN), 77);
    assert!(e.ingress(&first, &API_KEY, &drops));
    let later = (0..10)
        .filter(|_| e.ingress(&later_fragment(PROTO_TCP, API, ME, 77), &API_KEY, &drops))
        .count();
    assert_eq!(later, 4, "the packet rate holds for later fragments too");
    // An ICMP error from api quoting post's reply of that flow: counted, and over the limit.
    let quoted = tcp(ME, 8080, API, 40000, SYN | ACK);
    let mut icmp = vec![3, 1, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted[..28]);
    let error = ipv4(PROTO_ICMP, API, ME, &icmp);
    assert!(!e.ingress(&error, &API_KEY, &drops));
    assert_eq!(drops.get(Drop::RateLimited), 6 + 1);
}

/// Node B (key [`API_KEY`], its own identity `node-b` at [`API`]) runs two pods: `api` and
/// `other`; this node (`node-a` at [`ME`]) runs `post`. The guide's allow-list is post's.
fn pods() -> Enforcer {
    let docs = policy::model::parse_documents(POLICY, "test").unwrap();
    let set = PolicySet::compile(&docs, Posture::ZeroTrust)
        .unwrap()
        .in_trust_domain("example.org");
    let workload = |key| Holder::Member {
        key,
        workload: true,
    };
    let rules = Rules::build(
        &set,
        identity("node-a", "node", ME),
        [
            (Holder::Local, identity("post", "post", POST_POD)),
            (Holder::from(API_KEY), identity("node-b", "node", API)),
            (workload(API_KEY), identity("api", "api", API_POD)),
            (workload(API_KEY), identity("other", "other", OTHER_POD)),
            (Holder::from(OTHER_KEY), identity("node-c", "node", OTHER)),
            (workload(OTHER_KEY), identity("api", "api", FAR_API_POD)),
        ],
        false,
        1,
    );
    Enforcer::new(rules, 1024, FlowLog::start(None).unwrap())
}

const POST_POD: [u8; 4] = [100, 64, 9, 1];
const API_POD: [u8; 4] = [100, 64, 9, 2];
const OTHER_POD: [u8; 4] = [100, 64, 9, 3];
const FAR_API_POD: [u8; 4] = [100, 64, 9, 4];

#[test]
fn each_workload_behind_one_tunnel_is_its_own_identity_on_both_ends() {
    let e = pods();
    let drops = DropCounters::default();
    // Through node B's one tunnel: api's packets are api's, other's are other's.
    assert!(e.ingress(&tcp(API_POD, 40000, POST_POD, 8080, SYN), &API_KEY, &drops));
    assert!(!e.ingress(
        &tcp(OTHER_POD, 40001, POST_POD, 8080, SYN),
        &API_KEY,
        &drops
    ));
    // Node B itself is not api, whatever its tunnel carries.
    assert!(!e.ingress(&tcp(API, 40002, POST_POD, 8080, SYN), &API_KEY, &drops));
    // The allow-list is post's, not this node's: node-a's own address takes nothing.
    assert!(!e.ingress(&tcp(API_POD, 40003, ME, 8080, SYN), &API_KEY, &drops));
    assert_eq!(drops.get(Drop::PolicyIngress), 3);
    // On the way out, post's egress is post's: it allows nothing, its replies ride the flow.
    assert!(e.egress(
        &tcp(POST_POD, 8080, API_POD, 40000, SYN | ACK),
        &API_KEY,
        &drops
    ));
    assert!(!e.egress(&tcp(POST_POD, 40004, API_POD, 8080, SYN), &API_KEY, &drops));
    assert_eq!(drops.get(Drop::PolicyEgress), 1);
}

#[test]
fn a_workload_address_of_another_node_names_nobody_through_this_tunnel() {
    let e = pods();
    let drops = DropCounters::default();
    // An api pod on node C, claimed through node B's tunnel (the data path drops this before
    // asking, as the address is not B's; the rules fail closed on their own too).
    assert!(!e.ingress(
        &tcp(FAR_API_POD, 40000, POST_POD, 8080, SYN),
        &API_KEY,
        &drops
    ));
    // Through its own node's tunnel it is api.
    assert!(e.ingress(
        &tcp(FAR_API_POD, 40000, POST_POD, 8080, SYN),
        &OTHER_KEY,
        &drops
    ));
}

#[test]
fn rules_grown_by_workloads_decide_as_rules_built_from_scratch() {
    let docs = policy::model::parse_documents(POLICY, "test").unwrap();
    let set = PolicySet::compile(&docs, Posture::ZeroTrust)
        .unwrap()
        .in_trust_domain("example.org");
    let me = identity("node-a", "node", ME);
    let workload = Holder::Member {
        key: API_KEY,
        workload: true,
    };
    let mut others = vec![
        (Holder::from(API_KEY), identity("node-b", "node", API)),
        (Holder::Local, identity("post", "post", POST_POD)),
    ];
    let first = Rules::build(&set, me.clone(), others.clone(), false, 1);
    others.push((workload, identity("api", "api", API_POD)));
    let grown = first.with_members(&set, &me, others.clone()).unwrap();
    let rebuilt = Rules::build(&set, me.clone(), others.clone(), false, 1);
    assert_eq!(grown.identities.len(), 4, "only the pod is added");
    let flow = FlowKey::parse(&tcp(API_POD, 40000, POST_POD, 8080, SYN)).unwrap();
    let decide = |r: &Rules| {
        let d = r
            .decide(Direction::Ingress, &flow, r.identity_of(&API_KEY))
            .unwrap();
        (
            d.verdict.allow,
            r.identity(d.src).unwrap().endpoint.name.clone(),
        )
    };
    assert_eq!(decide(&grown), (true, "api".to_string()));
    assert_eq!(decide(&grown), decide(&rebuilt));
    // The pod leaves: its address names nobody, and node B's tunnel carries nothing for it.
    others.pop();
    let shrunk = grown.with_members(&set, &me, others).unwrap();
    let d = shrunk
        .decide(Direction::Ingress, &flow, shrunk.identity_of(&API_KEY))
        .unwrap();
    assert!(!d.verdict.allow);
    assert_eq!(d.src, EXTERNAL);
}

const WEB_POD: [u8; 4] = [100, 64, 9, 5];

/// This node runs post and web; `extra` is added to the post allow-list (zero trust: web may
/// send to post on 8080).
fn two_local_pods(extra: &str) -> Enforcer {
    Enforcer::new(two_local_rules(extra), 1024, FlowLog::start(None).unwrap())
}

fn two_local_rules(extra: &str) -> Rules {
    let yaml = format!(
        "{POLICY}---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: web-out, namespace: microblog}}
spec:
  selector: app == 'web'
  egress: [{{action: Allow, protocol: TCP, destination: {{ports: [8080]}}}}]
{extra}"
    );
    let docs = policy::model::parse_documents(&yaml, "test").unwrap();
    let set = PolicySet::compile(&docs, Posture::ZeroTrust)
        .unwrap()
        .in_trust_domain("example.org");
    Rules::build(
        &set,
        identity("node-a", "node", ME),
        [
            (Holder::Local, identity("post", "post", POST_POD)),
            (Holder::Local, identity("web", "web", WEB_POD)),
        ],
        false,
        1,
    )
}

#[test]
fn traffic_between_two_workloads_of_this_node_needs_both_ends_policies() {
    let e = two_local_pods("");
    let drops = DropCounters::default();
    assert!(e.is_local_workload(POST_POD.into()) && !e.is_local_workload(ME.into()));
    // web's egress allows it; post's ingress (its allow-list) does not: dropped as ingress.
    assert!(!e.between(&tcp(WEB_POD, 40000, POST_POD, 8080, SYN), &drops));
    assert_eq!(drops.get(Drop::PolicyIngress), 1);
    // post may send nothing (zero trust, no egress rule): dropped as egress.
    assert!(!e.between(&tcp(POST_POD, 40001, WEB_POD, 8080, SYN), &drops));
    assert_eq!(drops.get(Drop::PolicyEgress), 1);
    // The node itself is no workload: not for this path.
    assert!(!e.between(&tcp(ME, 40002, POST_POD, 8080, SYN), &drops));
    assert_eq!(drops.get(Drop::PolicyNotHere), 1);
    // post's allow-list admits web too: the flow passes, and its replies ride it.
    let e = two_local_pods(
        "---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: post-from-web, namespace: microblog}
spec:
  selector: app == 'post'
  ingress: [{action: Allow, protocol: TCP, source: {serviceAccounts: {names: [web]}}, destination: {ports: [8080]}}]
",
    );
    assert!(e.between(&tcp(WEB_POD, 40000, POST_POD, 8080, SYN), &drops));
    assert!(e.between(&tcp(POST_POD, 8080, WEB_POD, 40000, SYN | ACK), &drops));
    assert_eq!(e.status().allowed_flows, 1);
    // A large segment of the tracked flow, fragmented: its later fragment follows its first.
    let first = first_fragment(tcp(WEB_POD, 40000, POST_POD, 8080, ACK), 77);
    assert!(e.between(&first, &drops));
    assert!(e.between(&later_fragment(PROTO_TCP, WEB_POD, POST_POD, 77), &drops));
    assert!(!e.between(&later_fragment(PROTO_TCP, WEB_POD, POST_POD, 78), &drops));
    // A new policy set that drops the allowance cuts the flow.
    e.install(two_local_rules(""));
    assert_eq!(e.status().cut_flows, 1);
    assert!(!e.between(&tcp(WEB_POD, 40000, POST_POD, 8080, ACK), &drops));
}
