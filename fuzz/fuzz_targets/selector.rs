//! Calico selectors from policy files: parse, and what parses prints back to the same selector.
#![no_main]
use libfuzzer_sys::fuzz_target;
use policy::Selector;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(sel) = Selector::parse(text) {
            let printed = sel.to_string();
            assert_eq!(Selector::parse(&printed).as_ref(), Ok(&sel), "{printed}");
        }
    }
});
