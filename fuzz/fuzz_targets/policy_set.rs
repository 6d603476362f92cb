//! Signed policy sets from untrusted bytes (they arrive in chunks from other nodes): decode,
//! re-encode what decodes (canonical), check a signature, and parse the documents as a node would.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::policyset::SignedPolicySet;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = SignedPolicySet::decode(data) {
        assert_eq!(s.encode(), data);
        let _ = s.verify(&[[7; 32], s.signer]);
        let _ = policy::model::objects(&s.documents, "fuzz");
    }
});
