//! natpunch's sans-IO core.
//!
//! Nothing in this crate opens a socket or reads a clock: every state
//! machine takes `now` and received datagrams as input, and hands back
//! datagrams to send and the next instant it wants to be woken
//! (`poll_transmit`, `poll_event`, `poll_timeout`). The tokio drivers in the
//! `natpunch` crate bind these machines to real sockets; tests drive them
//! with a virtual clock.
//!
//! - [`stun`]: STUN codec (RFC 8489/5389/3489, RFC 5780 attributes),
//!   client transactions and the Binding server.
//! - [`nat`]: NAT behaviour discovery (RFC 5780 §4) and the port allocation
//!   pattern, producing a [`nat::NatReport`].
//! - [`rendezvous`]: registration and introductions (server and client).
//! - [`punch`]: the hole-punching ladder, one attempt.
//! - [`coordinator`]: the connection core: every attempt, and per remote
//!   peer the path its traffic takes.
//! - [`relay`]: the server's relay between two introduced peers.
//! - [`portmap`]: port mapping's vocabulary (PCP, NAT-PMP, UPnP IGD) and
//!   its pure decisions: which external address to announce, when to renew.
//! - [`ratelimit`]: bounded per-source token buckets for servers.

pub mod coordinator;
pub mod identity;
pub mod nat;
pub mod portmap;
pub mod punch;
pub mod ratelimit;
pub mod relay;
pub mod rendezvous;
pub mod stun;
pub mod turn;

/// Names one of the caller's sockets. Machines that use several sockets
/// (NAT discovery, birthday probing) say which one sends each datagram, and
/// the caller says which one received each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SocketId(pub usize);

/// A datagram a machine wants sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Which of the caller's sockets sends it.
    pub socket: SocketId,
    pub destination: std::net::SocketAddr,
    pub payload: Vec<u8>,
    /// Send with this IP TTL instead of the socket's default (limited-TTL
    /// openers for hole punching).
    pub ttl: Option<u8>,
}
