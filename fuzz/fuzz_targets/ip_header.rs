//! IP headers of packets read from the TUN device or decrypted from a peer.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proto::ip::addrs(data);
});
