//! The issuer's sealed side, without a socket.

use super::*;

fn secret(b: u8) -> StaticSecret {
    StaticSecret::from([b; 32])
}

fn public(s: &StaticSecret) -> [u8; 32] {
    x25519_dalek::PublicKey::from(s).to_bytes()
}

const NODE: &str = "198.18.0.2:51820";

fn request(nonce: u64) -> Vec<u8> {
    Message::WorkloadsTaken { version: nonce }.encode()
}

#[test]
fn a_request_opens_once_and_its_replay_is_refused() {
    let mut r = Responder::new(secret(1));
    let from: SocketAddr = NODE.parse().unwrap();
    let d = control::seal_message(
        &secret(2),
        &public(&secret(1)),
        &secret(3),
        1_000,
        &request(7),
    )
    .unwrap();
    let opened = r.open(0, from, &d[0]).unwrap().unwrap();
    assert_eq!(opened.sender, public(&secret(2)));
    assert_eq!(opened.msg, Message::WorkloadsTaken { version: 7 });
    // Until the sender is confirmed as a node, its counters are not kept.
    assert!(r.open(1, from, &d[0]).unwrap().is_some());
    assert!(r.confirm(&opened));
    assert!(!r.confirm(&opened));
    assert_eq!(r.open(1, from, &d[0]).unwrap_err().why, "replayed");
    // A later one opens.
    let later = control::seal_message(
        &secret(2),
        &public(&secret(1)),
        &secret(3),
        2_000,
        &request(8),
    )
    .unwrap();
    assert!(r.open(2, from, &later[0]).unwrap().is_some());
}

#[test]
fn garbage_a_wrong_receiver_and_a_flood_from_one_address_are_dropped() {
    let mut r = Responder::new(secret(1));
    let from: SocketAddr = NODE.parse().unwrap();
    assert!(r.open(0, from, b"MSHPxxxx").is_err());
    assert!(r.open(0, from, &[0u8; 200]).is_err());
    let to_other =
        control::seal_message(&secret(2), &public(&secret(9)), &secret(3), 1, &request(1)).unwrap();
    assert!(r.open(0, from, &to_other[0]).is_err());
    // One address gets 100 opens in a burst, then 50 a second.
    let opened = (0..300u64)
        .filter(|i| {
            let d = control::seal_message(
                &secret(2),
                &public(&secret(1)),
                &secret(3),
                10 + i,
                &request(*i),
            )
            .unwrap();
            r.open(5, from, &d[0]).is_ok()
        })
        .count();
    // The burst, less the token the datagram sealed to another receiver spent, then nothing.
    assert_eq!(opened, 2 * OPENS_PER_SOURCE_PER_SEC as usize - 1);
}

#[test]
fn an_answer_opens_for_the_node_only_and_its_counters_follow_the_clock() {
    let mut r = Responder::new(secret(1));
    let node = secret(2);
    let answer = Message::IssueAnswer {
        nonce: 5,
        results: vec![crate::control::Issued::Refused(
            "no workload microblog/x is known".into(),
        )],
    };
    let now_ms = 1_800_000_000_000;
    let d = r.seal(&public(&node), &answer, now_ms, &mut rand_core::OsRng);
    assert_eq!(d.len(), 1);
    let Datagram::Sealed(s) = control::decode(&d[0]).unwrap() else {
        panic!("not sealed")
    };
    assert!(s.counter >= now_ms * COUNTER_PER_MS);
    let opened = s.open(&node).unwrap();
    assert_eq!(opened.sender, public(&secret(1)));
    assert!(s.open(&secret(3)).is_err());
}

#[test]
fn under_a_spoofed_flood_a_node_that_shows_its_cookie_is_still_opened() {
    let mut r = Responder::new(secret(1));
    let node: SocketAddr = NODE.parse().unwrap();
    // Sealed junk from 10,000 spoofed addresses in one instant: the budget of sources without
    // a cookie is spent.
    let junk =
        control::seal_message(&secret(7), &public(&secret(1)), &secret(3), 1, &request(1)).unwrap();
    let mut cookies_sent = 0;
    for i in 0..10_000u32 {
        let from = SocketAddr::from(([198, 18, (i >> 8) as u8, i as u8], 4000));
        if let Err(d) = r.open(10, from, &junk[0]) {
            cookies_sent += usize::from(d.reply.is_some());
        }
    }
    assert!(
        cookies_sent > 0,
        "each spoofed source was sent a cookie, not opened"
    );
    // The node's request, over that budget, is answered with a cookie (smaller than it) ...
    let d = control::seal_message(&secret(2), &public(&secret(1)), &secret(3), 50, &request(2))
        .unwrap();
    let dropped = r.open(10, node, &d[0]).unwrap_err();
    let reply = dropped.reply.expect("a cookie reply");
    assert!(reply.len() < d[0].len());
    let Ok(Datagram::CookieReply { echo, cookie }) = control::decode(&reply) else {
        panic!("not a cookie reply");
    };
    assert_eq!(Some(echo), control::mac_of(&d[0]));
    // ... and the same datagram repeated with the cookie opens.
    let mut again = d[0].clone();
    control::set_cookie(&mut again, &cookie);
    let opened = r.open(10, node, &again).unwrap().expect("a whole message");
    assert_eq!(opened.msg, Message::WorkloadsTaken { version: 2 });
    // The cookie is the node's address's: from another it is none.
    let other: SocketAddr = "198.18.0.3:51820".parse().unwrap();
    let dropped = r.open(10, other, &again).unwrap_err();
    assert!(dropped.why.contains("without a cookie"), "{dropped}");
    // It lasts into the next epoch of the cookie secret, not the one after.
    let c = r.cookie(&node, 0, 0);
    assert_eq!(r.cookie(&node, COOKIE_EPOCH_MS, 1), c);
    assert_ne!(r.cookie(&node, 2 * COOKIE_EPOCH_MS, 1), c);
    assert_ne!(r.cookie(&other, 0, 0), c);
}
