//! natpunch's tokio drivers: they bind the sans-IO machines of
//! `natpunch-proto` to real sockets and timers.
//!
//! - [`stun_server`]: the server: STUN/RFC 5780, rendezvous and relay, on
//!   UDP and TCP.
//! - [`nat`]: runs NAT behaviour discovery and returns a report.
//! - [`net`]: socket and name-resolution helpers.
//! - [`batch`]: batched UDP receive and send (recvmmsg/sendmmsg).
//! - [`peer`]: the peer driver: discovery, rendezvous, punching, relay.
//! - [`server_tcp`]: the peer's TCP link to its server where UDP is blocked.
//! - [`tcp`]: TCP hole punching: the punching port, simultaneous open,
//!   punched streams as paths.
//! - [`turn`]: allocations on TURN servers (RFC 8656) over UDP, TCP or TLS.
//! - [`session`]: QUIC sessions on the punched path, and the library API
//!   ([`session::Endpoint`]).

pub mod batch;
pub mod keyfile;
pub mod nat;
pub mod nat_cache;
pub mod net;
pub mod peer;
pub mod portmap;
pub mod server_tcp;
pub mod session;
pub mod stun_server;
pub mod tcp;
pub mod ttl;
pub mod turn;

pub use natpunch_proto as proto;
