use super::*;
use proptest::prelude::*;

fn invitation(secret: &[u8; 32]) -> Invitation {
    Invitation {
        verifier: verifier(secret),
        expires: 2_000,
        namespace: "nodes".into(),
        name: "vm-1".into(),
        labels: BTreeMap::from([("zone".into(), "a".into())]),
        addrs: vec!["100.64.0.7/32".parse().unwrap()],
        routes: vec![],
        ports: vec![],
        lifetime_secs: 3_600,
        redeemed_by: None,
    }
}

#[test]
fn a_token_reads_back_as_written_with_and_without_an_address() {
    for endpoint in [None, Some("198.18.3.100:7000".parse().unwrap())] {
        let t = Token {
            secret: [7; 32],
            issuer_key: [9; 32],
            endpoint,
        };
        let text = t.encode();
        assert!(text.starts_with(TOKEN_PREFIX));
        assert_eq!(Token::parse(&format!(" {text}\n")).unwrap(), t);
    }
}

#[test]
fn a_damaged_token_is_named_as_such() {
    let good = Token {
        secret: [1; 32],
        issuer_key: [2; 32],
        endpoint: None,
    }
    .encode();
    let bad_address = {
        use base64::Engine;
        let mut b = vec![1u8; 64];
        b.extend_from_slice(b"\xff:7000");
        format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        )
    };
    for (text, says) in [
        ("hello", "not a join token"),
        ("meshjoin1.***", "not base64url"),
        ("meshjoin1.AAAA", "cut short"),
        (&good[..good.len() - 4], "cut short"),
        (&bad_address, "issuer address"),
    ] {
        let e = Token::parse(text).unwrap_err();
        assert!(e.contains(says), "{text}: {e}");
    }
    let long = format!("{TOKEN_PREFIX}{}", "A".repeat(400));
    assert!(Token::parse(&long).unwrap_err().contains("too long"));
}

#[test]
fn the_debug_form_shows_no_secret() {
    let t = Token {
        secret: [0xab; 32],
        issuer_key: [2; 32],
        endpoint: None,
    };
    let shown = format!("{t:?}");
    assert!(!shown.contains("171") && !shown.contains("abab"), "{shown}");
}

#[test]
fn a_token_is_single_use_per_key_and_ends() {
    let secret = [5; 32];
    let mut inv = invitation(&secret);
    assert_eq!(
        redeem(&inv, &[6; 32], &[1; 32], 1_000),
        Err(JoinRefusal::Unknown)
    );
    assert_eq!(redeem(&inv, &secret, &[1; 32], 1_000), Ok(()));
    inv.redeemed_by = Some([1; 32]);
    // The same key again (its answer was lost): yes; another key: no.
    assert_eq!(redeem(&inv, &secret, &[1; 32], 1_500), Ok(()));
    assert_eq!(
        redeem(&inv, &secret, &[2; 32], 1_500),
        Err(JoinRefusal::Used)
    );
    assert_eq!(
        redeem(&inv, &secret, &[1; 32], 2_001),
        Err(JoinRefusal::Expired)
    );
}

#[test]
fn the_certificate_binds_the_joining_key_and_ends_with_the_ca() {
    let inv = invitation(&[5; 32]);
    let b = node_body(&inv, "lab.example", [3; 32], [4; 32], 77, 1_000, 2_000);
    assert_eq!((b.public_key, b.issuer, b.serial), ([3; 32], [4; 32], 77));
    // A node whose clock is a little behind takes it.
    assert_eq!(
        (b.not_before, b.not_after),
        (1_000 - CLOCK_SKEW_SECS, 2_000)
    );
    assert_eq!(b.identity(), "lab.example/nodes/vm-1");
    assert_eq!(b.addrs, inv.addrs);
    let b = node_body(&inv, "lab.example", [3; 32], [4; 32], 77, 1_000, 99_999);
    assert_eq!(b.not_after, 4_600);
}

proptest! {
    #[test]
    fn only_the_secret_redeems(secret in any::<[u8; 32]>(), other in any::<[u8; 32]>(),
                               key in any::<[u8; 32]>()) {
        let inv = invitation(&secret);
        prop_assert_eq!(redeem(&inv, &secret, &key, 0), Ok(()));
        if other != secret {
            prop_assert_eq!(redeem(&inv, &other, &key, 0), Err(JoinRefusal::Unknown));
            prop_assert_ne!(token_id(&other), token_id(&secret));
        }
    }

    #[test]
    fn any_text_parses_or_is_refused_without_panic(text in ".{0,300}") {
        let _ = Token::parse(&text);
        let _ = Token::parse(&format!("{TOKEN_PREFIX}{text}"));
    }
}
