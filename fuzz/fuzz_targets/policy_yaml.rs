//! Policy YAML as an operator (or anyone with the admin socket) may send it: parse and compile.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(docs) = policy::model::parse_documents(text, "fuzz.yaml") {
            let _ = policy::engine::PolicySet::compile(&docs, policy::engine::Posture::ZeroTrust);
        }
    }
});
