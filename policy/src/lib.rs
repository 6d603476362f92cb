//! The policy engine, pure: Calico's selector language now; policy compilation and evaluation
//! next. Nothing here does I/O, so all of it is unit-tested, property-tested and fuzzed alone.

pub mod conntrack;
pub mod engine;
pub mod federation;
pub mod fragments;
pub mod graph;
pub mod location;
pub mod model;
pub mod ratelimit;
pub mod selector;
pub mod suggest;
pub mod testing;

pub use selector::{Selector, SelectorError};
