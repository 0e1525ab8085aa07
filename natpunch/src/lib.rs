//! natpunch's tokio drivers: they bind the sans-IO machines of
//! `natpunch-proto` to real sockets and timers.
//!
//! - [`stun_server`]: the STUN/RFC 5780 server on UDP and TCP.
//! - [`nat`]: runs NAT behaviour discovery and returns a report.
//! - [`net`]: socket and name-resolution helpers.
//! - [`batch`]: batched UDP receive and send (recvmmsg/sendmmsg).

pub mod batch;
pub mod keyfile;
pub mod nat;
pub mod net;
pub mod peer;
pub mod stun_server;
pub mod ttl;

pub use natpunch_proto as proto;
