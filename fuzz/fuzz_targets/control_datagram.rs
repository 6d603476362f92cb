//! A control datagram as it arrives on the UDP port: parse it, and try to open a sealed one.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::control::{decode, Datagram};

fuzz_target!(|data: &[u8]| {
    if let Ok(Datagram::Sealed(s)) = decode(data) {
        let _ = s.open(&x25519_dalek::StaticSecret::from([2u8; 32]));
    }
});
