//! A mapped port: the peer's gateway forwards it to the peer's main socket
//! whoever sends (PCP, NAT-PMP or UPnP made it), so one stream from our
//! main socket reaches the peer whatever our NAT does, and the peer's
//! answer comes back through the mapping our own packet opened. It starts
//! at once: it costs one packet per round, and needs no coordination.

use super::plan::{PlanConfig, SideView, Stream};
use super::wire::Strategy;
use crate::SocketId;

/// The stream to `peer`'s mapped address (none when it has no mapping).
pub fn streams(peer: &SideView, cfg: &PlanConfig) -> Vec<Stream> {
    let Some(m) = peer.mapped else {
        return Vec::new();
    };
    vec![Stream {
        strategy: Strategy::Portmap(m.protocol),
        socket: SocketId(0),
        targets: vec![m.addr],
        offset: std::time::Duration::ZERO,
        interval: cfg.interval,
        rounds: u32::MAX,
        gap: std::time::Duration::ZERO,
        first_ttl: None,
    }]
}
