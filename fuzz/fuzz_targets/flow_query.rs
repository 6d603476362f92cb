//! Signed flow queries from untrusted bytes: decoding and checking never panic, and nothing
//! that was not signed by the admin verifies.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::flowquery::FlowQuery;

fuzz_target!(|data: &[u8]| {
    if let Ok((q, signature)) = FlowQuery::decode(data) {
        // The fuzzer holds no admin's private key: a query it makes never verifies.
        let admins = [[7u8; 32]];
        assert!(q.verify(&signature, &admins, &q.requester, q.issued_at).is_err());
    }
});
