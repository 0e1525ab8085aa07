//! Sequential port prediction for a cone and a predictable symmetric NAT.
//!
//! The symmetric side sends first to the cone's observed address; that is
//! the first new mapping its NAT creates after its fresh mapping, so its
//! port is `fresh + delta` (more if other traffic takes ports in between).
//! The cone side probes the window `fresh + delta·k`, k = 1..=window, then
//! a few steps *behind* the fresh mapping: when a session re-punches after
//! its NAT dropped the mapping, the session's own retransmissions toward
//! the peer have usually taken a port just before the fresh one.

use std::net::SocketAddr;
use std::time::Duration;

use super::plan::{port_step, PlanConfig, SideView, Stream};
use super::wire::Strategy;
use crate::SocketId;

/// Ports behind the fresh mapping to try (one for the session's own
/// traffic, one for a registration refresh, one spare).
const BEHIND: i32 = 3;

/// Predicted ports of `peer`'s next mappings, in creation order, then the
/// few just before its fresh mapping. A port-preserving NAT keeps the main
/// socket's port, which the server observed.
pub fn predicted(peer: &SideView, window: u16) -> Vec<SocketAddr> {
    let Some(fresh) = peer.fresh else {
        return Vec::new();
    };
    let delta = peer.nat.delta.unwrap_or(0);
    if delta == 0 {
        return vec![SocketAddr::new(fresh.ip(), peer.observed.port())];
    }
    (1..=i32::from(window))
        .chain((1..=BEHIND).map(|k| -k))
        .filter_map(|k| port_step(fresh.port(), delta, k))
        .map(|p| SocketAddr::new(fresh.ip(), p))
        .collect()
}

/// The easy side's probes to the hard side's predicted ports (the hard
/// side's own part is a plain direct stream to our observed address).
pub fn easy_streams(peer: &SideView, cfg: &PlanConfig) -> Vec<Stream> {
    let targets = predicted(peer, cfg.window);
    if targets.is_empty() {
        return Vec::new();
    }
    super::ttl::with_openers(
        Stream {
            strategy: Strategy::Predict,
            socket: SocketId(0),
            targets,
            offset: Duration::ZERO,
            interval: cfg.interval,
            rounds: u32::MAX,
            gap: Duration::ZERO,
            first_ttl: None,
        },
        cfg.ttl,
    )
}
