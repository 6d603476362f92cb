//! IP headers of packets read from the TUN device or decrypted from a peer: addresses, and the
//! flow key (IPv6 extension headers, fragments, transport headers), and the flow an ICMP error
//! quotes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proto::ip::addrs(data);
    let _ = proto::ip::FlowKey::parse(data);
    let _ = proto::ip::FlowKey::quoted(data);
});
