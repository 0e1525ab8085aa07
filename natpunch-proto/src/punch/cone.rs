//! Cone pairs: both sides send to each other's observed (server-reflexive)
//! address at the coordinated moment; each side's own send opens its filter
//! for the other's packets.

use super::plan::{PlanConfig, SideView, Stream};
use super::wire::Strategy;
use crate::SocketId;

/// One stream to the peer's observed address from socket 0, behind a
/// limited-TTL opener round when the TTL is known.
pub fn streams(peer: &SideView, cfg: &PlanConfig, strategy: Strategy) -> Vec<Stream> {
    super::ttl::with_openers(plain(peer, cfg, strategy), cfg.ttl)
}

/// The stream without openers.
pub fn plain(peer: &SideView, cfg: &PlanConfig, strategy: Strategy) -> Stream {
    Stream {
        strategy,
        socket: SocketId(0),
        targets: vec![peer.observed],
        offset: std::time::Duration::ZERO,
        interval: cfg.interval,
        rounds: u32::MAX,
        gap: std::time::Duration::ZERO,
        first_ttl: None,
    }
}
