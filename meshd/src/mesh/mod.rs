//! The mesh node and its shell. `node.rs` is the whole node as one pure state machine (membership,
//! revocation, renewal, policy sync and the decision to take a set, and the peers, routes and
//! addresses derived from them); `run.rs` is the thin async shell that carries its actions out on
//! the device, the kernel and the state directory (`state.rs`).

pub mod attach;
#[cfg(test)]
mod federation_tests;
pub mod flows;
pub mod flows_shell;
#[cfg(test)]
mod gateway_tests;
pub mod gateways;
pub mod membership;
pub mod node;
pub mod policy_book;
pub mod policy_sync;

pub mod run;
#[cfg(test)]
mod scale;
#[cfg(test)]
pub mod sim;
pub mod state;
pub mod watch;
#[cfg(test)]
mod workload_node_tests;
pub mod workloads;

pub use membership::{MemberState, Refusal};
