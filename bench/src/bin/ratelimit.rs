//! The cost of a rate-limited rule per packet: an established flow's connection-tracking lookup
//! alone (as for a rule without a limit), and with its meter (a packet under the limit, and one
//! over it, dropped); and a new flow's meter (connection, packet and byte buckets). 4,096 flows
//! from 1,000 source identities, as meshd keys them.
//! Run: cargo run --release -p mesh-bench --bin ratelimit

use policy::conntrack::{Conntrack, MeterKey, Timeouts, Tracked};
use policy::engine::Direction;
use policy::ratelimit::meters::{Limiter, MeterOf, Metered, Who};
use policy::ratelimit::{Per, Rate, RateLimit};
use std::hint::black_box;
use std::time::Instant;

const FLOWS: u32 = 4096;
const SOURCES: u32 = 1000;
const ROUNDS: u64 = 200;
const POLICY: &str = "NetworkPolicy ns0/post-allow-list";

fn limit(per_second: u64) -> RateLimit {
    let rate = Some(Rate {
        per_second,
        burst: per_second,
    });
    RateLimit {
        connections: rate,
        packets: rate,
        bytes: Some(Rate {
            per_second: per_second * 1500,
            burst: per_second * 1500,
        }),
        per: Per::Source,
    }
}

fn key(limiter: &Limiter, names: &[String], i: u32) -> MeterKey {
    limiter.key(&MeterOf {
        policy: POLICY,
        direction: Direction::Ingress,
        rule: 0,
        src: Who::Identity("example.org", "ns0", &names[(i % SOURCES) as usize]),
        dst: None,
    })
}

/// ns per established packet: the lookup, then the meter when `metered`.
fn established(limiter: &Limiter, lim: &RateLimit, metered: bool, names: &[String]) -> f64 {
    let mut ct = Conntrack::new(100_000, Timeouts::default());
    let flows: Vec<proto::ip::FlowKey> = (0..FLOWS)
        .map(|i| proto::ip::FlowKey {
            src: format!("100.64.{}.{}", i / 250, i % 250 + 1)
                .parse()
                .unwrap(),
            dst: "100.64.200.1".parse().unwrap(),
            protocol: proto::ip::PROTO_UDP,
            src_port: 10000 + i as u16,
            dst_port: 7000,
            icmp: None,
            tcp_flags: 0,
            later_fragment: false,
            fragment_id: None,
        })
        .collect();
    for (i, f) in flows.iter().enumerate() {
        let k = key(limiter, names, i as u32);
        limiter.admit_flow(k, lim, POLICY, Direction::Ingress, false, 100, 0);
        ct.insert_metered(f, 100, 0, 0, metered.then_some(k));
    }
    let t = Instant::now();
    let mut passed = 0u64;
    for r in 0..ROUNDS {
        for f in &flows {
            passed += u64::from(match ct.track(black_box(f), 100, r) {
                Tracked::Known { meter: Some(k), .. } => {
                    limiter.admit_packet(k, 100, r) == Metered::Pass
                }
                Tracked::Known { meter: None, .. } => true,
                Tracked::New => false,
            });
        }
    }
    black_box(passed);
    t.elapsed().as_nanos() as f64 / (ROUNDS * u64::from(FLOWS)) as f64
}

fn main() {
    let names: Vec<String> = (0..SOURCES).map(|i| format!("svc{i}")).collect();
    // Limits far above what the loop sends pass every packet; a limit of 1 a second drops all
    // but the first (the drop path).
    let (under, over) = (limit(1 << 30), limit(1));
    let plain = established(&Limiter::default(), &under, false, &names);
    let passing = established(&Limiter::default(), &under, true, &names);
    let dropping = established(&Limiter::default(), &over, true, &names);

    let limiter = Limiter::default();
    let keys: Vec<MeterKey> = (0..FLOWS).map(|i| key(&limiter, &names, i)).collect();
    let t = Instant::now();
    let mut passed = 0u64;
    for r in 0..ROUNDS {
        for k in &keys {
            let m = limiter.admit_flow(*k, &under, POLICY, Direction::Ingress, true, 100, r);
            passed += u64::from(m == Metered::Pass);
        }
    }
    black_box(passed);
    let new_flow = t.elapsed().as_nanos() as f64 / (ROUNDS * u64::from(FLOWS)) as f64;
    let t = Instant::now();
    for i in 0..ROUNDS as u32 * FLOWS {
        black_box(key(&limiter, &names, i));
    }
    let keying = t.elapsed().as_nanos() as f64 / (ROUNDS * u64::from(FLOWS)) as f64;

    println!("| packet | ns/packet | vs. no limit |");
    println!("|---|---|---|");
    println!("| established, rule without a limit (lookup only) | {plain:.0} | 1.00 |");
    println!(
        "| established, limited rule, under the limit | {passing:.0} | {:.2} |",
        passing / plain
    );
    println!(
        "| established, limited rule, over the limit (dropped) | {dropping:.0} | {:.2} |",
        dropping / plain
    );
    println!("| new flow: its meter's key (hash of policy, rule, identity) | {keying:.0} | |");
    println!("| new flow: connection, packet and byte buckets | {new_flow:.0} | |");
    println!("({} meters)", limiter.meters());
}
