//! A relay frame from the network: parse it and decide it against a few members' paths, with
//! every tag, source address and hop count the input makes; a forwarded frame never goes back
//! where it came from, and a delivered one is never from this node.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::relay::{self, Endpoint, Tag, Verdict};
use std::net::SocketAddr;

fuzz_target!(|data: &[u8]| {
    let Some((header, _inner)) = relay::parse(data) else {
        return;
    };
    let me = Tag::of(&[0; 32]);
    let members: Vec<(Tag, (Endpoint, bool))> = (1..4u8)
        .map(|i| {
            let direct = SocketAddr::from(([198, 18, 0, i], 51820));
            let ep = if i == 3 {
                Endpoint::Relayed {
                    relay: SocketAddr::from(([198, 18, 0, 2], 51820)),
                    tag: Tag::of(&[i; 32]),
                }
            } else {
                Endpoint::Direct(direct)
            };
            (Tag::of(&[i; 32]), (ep, i == 1))
        })
        .collect();
    let from = SocketAddr::from(([198, 18, 0, data.len() as u8 % 4], 51820));
    for serve in [false, true] {
        let v = relay::decide(&header, from, me, serve, |t| {
            members.iter().find(|(m, _)| m == t).map(|(_, e)| *e)
        });
        match v {
            Verdict::Forward(to) => {
                assert!(serve && to != from && (2..=relay::INITIAL_TTL).contains(&header.ttl))
            }
            Verdict::Deliver(_) => assert!(header.dst == me && header.src != me),
            Verdict::Drop(_) => {}
        }
    }
});
