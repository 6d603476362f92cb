//! The WireGuard dataplane, end to end: real meshd processes (and Debian's wireguard-go) in
//! network namespaces, driven by the stock `wg` tool. meshd runs with its offloads on: TUN
//! segmentation and coalescing, UDP GSO and GRO.

const OFFLOADS: &str = "on";

#[path = "dataplane/cases.rs"]
mod cases;
