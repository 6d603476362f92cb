//! A `Federation` object as it arrives in a policy set from another node (after the set's
//! signature, so from a policy admin, but still bytes): parse the YAML, decode the scope and the
//! CA bundle, and check certificates against the resulting trust.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(docs) = policy::model::parse_documents(text, "fuzz.yaml") else {
        return;
    };
    let mut federations = Vec::new();
    for d in &docs {
        if let policy::model::Document::Federation { metadata, spec } = d {
            if let Ok(f) = policy::federation::federation(&metadata.name, spec) {
                federations.push(f);
            }
        }
    }
    let cas: Vec<_> = federations.iter().flat_map(|f| f.cas.clone()).collect();
    let (mut trust, _) = proto::trust::Trust::new("example.org", cas.clone());
    trust.federate(federations);
    for ca in &cas {
        let _ = trust.check(ca, 0, None, proto::trust::Signature::Verify);
    }
});
