//! The dataplane tests once more with meshd's offloads forced off (`MESHD_OFFLOADS=off`): one
//! packet per TUN read and write, one datagram per send; what a kernel without them gets.

const OFFLOADS: &str = "off";

#[path = "dataplane/cases.rs"]
mod cases;
