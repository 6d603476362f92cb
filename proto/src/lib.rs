//! Pure wire formats shared by `meshd` and `meshctl`. Nothing here owns a socket, a file or a clock,
//! so every codec can be unit-tested, property-tested and fuzzed on its own.

pub mod admin;
pub mod armor;
pub mod cert;
pub mod cidr;
pub mod control;
pub mod duration;
pub mod flowquery;
pub mod ip;
pub mod issuer;
pub mod join;
pub mod key;
pub mod limiter;
pub mod offload;
pub mod policyset;
mod reader;
pub mod relay;
pub mod segment;
pub mod time;
pub mod trust;
pub mod uapi;
pub mod workload;

pub use cidr::Cidr;
pub use key::Key;
