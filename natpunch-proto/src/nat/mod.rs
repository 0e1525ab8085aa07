//! NAT behaviour discovery (RFC 5780 §4) and port allocation pattern.
//!
//! [`Discovery`] runs the tests against a STUN server over several caller-
//! owned sockets and produces a [`NatReport`]: mapping and filtering
//! behaviour, hairpinning, the allocation pattern that port prediction
//! needs, optionally the binding lifetime, and the classic RFC 3489 name.

pub mod allocation;
pub mod discovery;
pub mod report;

pub use discovery::{Discovery, DiscoveryConfig, Fact};
pub use report::{
    Allocation, AllocationKind, Behaviour, Classic, Lifetime, MappingSample, NatReport,
};
