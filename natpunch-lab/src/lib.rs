//! natpunch's NAT lab: topologies of Linux network namespaces joined by
//! veth pairs, with NATs built from nftables that reproduce every RFC 4787
//! behaviour, link impairment (rate, loss, delay), and guaranteed teardown.
//!
//! Linux only, and root only: every entry point checks and refuses with a
//! typed error otherwise.

pub mod delay;
pub mod expect;
pub mod grid;
pub mod nft;
pub mod runner;
pub mod spec;
pub mod throughput;
pub mod topology;
pub mod upnp;

pub use spec::{
    LinkSpec, Links, NatSpec, PortAllocation, Side, TopologySpec, Unsolicited, PRESETS,
};
pub use topology::{Lab, LabError, LabOptions, Node};
