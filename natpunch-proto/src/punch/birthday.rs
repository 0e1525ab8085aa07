//! Birthday probing for a port-restricted cone and a random symmetric NAT.
//!
//! The hard (symmetric) side opens `n` sockets, each sending to the cone's
//! observed address, so its NAT holds `n` random mappings toward the cone.
//! The cone side sprays `m` probes at random ports of the hard side's
//! public IP; each opens its own filter for that port. A probe that lands
//! on one of the `n` mappings goes through, is acked, and the path is up.
//! P(hit) = 1 - (1 - n/P)^m over P = 64 512 usable ports: n = 256 and
//! m = 1024 give 98.3 %, m = 2048 give 99.97 %.

use std::net::SocketAddr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::plan::{PlanConfig, SideView, Stream};
use super::wire::Strategy;
use crate::SocketId;

/// Lowest port sprayed: NATs do not hand out privileged ports.
pub const FIRST_PORT: u16 = 1024;
/// Time between the hard side's re-sends from each socket, so that a probe
/// sent after the cone's filter opened still arrives.
pub const HARD_INTERVAL: Duration = Duration::from_millis(500);

/// The probability that `m` sprayed probes hit one of `n` random mappings.
pub fn success_probability(n: u32, m: u32) -> f64 {
    let ports = f64::from(65_536 - u32::from(FIRST_PORT));
    1.0 - (1.0 - f64::from(n) / ports).powf(f64::from(m))
}

/// The easy side sprays distinct random ports of the hard side's IP,
/// seeded so a run can be replayed.
pub fn easy_streams(peer: &SideView, cfg: &PlanConfig) -> Vec<Stream> {
    let mut ports: Vec<u16> = (FIRST_PORT..=u16::MAX).collect();
    ports.shuffle(&mut StdRng::seed_from_u64(cfg.seed));
    ports.truncate(cfg.birthday_probes as usize);
    let ip = peer.observed.ip();
    let gap = Duration::from_secs(1) / cfg.spray_rate.max(1);
    vec![Stream {
        strategy: Strategy::Birthday,
        socket: SocketId(0),
        targets: ports.into_iter().map(|p| SocketAddr::new(ip, p)).collect(),
        offset: Duration::ZERO,
        interval: Duration::from_secs(3600),
        rounds: 1,
        gap,
        first_ttl: None,
    }]
}

/// The hard side's sockets 1..=n each open one mapping toward the easy
/// side's observed address.
pub fn hard_streams(peer: &SideView, cfg: &PlanConfig) -> Vec<Stream> {
    (1..=cfg.birthday_sockets as usize)
        .map(|k| Stream {
            // With a known limited TTL, each socket only opens its mapping
            // and never reaches the cone's NAT: a probe arriving there would
            // leave a conntrack entry that makes a Linux NAT re-map the very
            // spray probe that hits this mapping (a "clash"). The hit is
            // answered by our ack. Without a TTL, probe the cone directly.
            strategy: Strategy::Birthday,
            socket: SocketId(k),
            targets: vec![peer.observed],
            // Spread the burst over ~50 ms so the NAT is not flooded.
            offset: Duration::from_micros(200 * k as u64),
            interval: HARD_INTERVAL,
            rounds: if cfg.ttl.is_some() { 1 } else { u32::MAX },
            gap: Duration::ZERO,
            first_ttl: cfg.ttl,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_meet_the_issue_figures() {
        assert!(success_probability(256, 1024) > 0.98);
        assert!(success_probability(256, 2048) > 0.999);
    }
}
