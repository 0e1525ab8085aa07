//! LAN / same NAT: both peers share a public address, so their host
//! candidates are reachable directly; hairpinning via the public address
//! is tried as well.

use std::time::Duration;

use super::cone;
use super::plan::{PlanConfig, SideView, Stream};
use super::wire::Strategy;
use crate::SocketId;

pub fn streams(_me: &SideView, peer: &SideView, cfg: &PlanConfig) -> Vec<Stream> {
    let mut v = Vec::new();
    if !peer.candidates.is_empty() {
        v.push(Stream {
            strategy: Strategy::Lan,
            socket: SocketId(0),
            targets: peer.candidates.clone(),
            offset: Duration::ZERO,
            interval: cfg.interval,
            rounds: u32::MAX,
            gap: Duration::ZERO,
            first_ttl: None,
        });
    }
    // Hairpin through the shared NAT, a little later so LAN wins when both
    // work.
    let mut hairpin = cone::streams(peer, cfg, Strategy::Cone);
    for s in &mut hairpin {
        s.offset = cfg.interval / 2;
    }
    v.extend(hairpin);
    v
}
