//! Two predictable symmetric NATs (Wei et al. 2008, "A New Method for
//! Symmetric NAT Traversal in UDP and TCP"): each side probes the other's
//! predicted ports in the same order, so its k-th new mapping is created
//! toward the peer's k-th, and the pair (k, k) lines up on both NATs.
//!
//! The first round leaves with a limited TTL: enough to pass our own NAT(s)
//! and create the mappings, too small to reach the peer's NAT, so nothing
//! arrives there before its own mapping exists (a NAT that answers
//! unsolicited packets with ICMP or RST, or blacklists the source, never
//! sees one). Normal-TTL rounds follow.

use std::time::Duration;

use super::plan::{PlanConfig, SideView, Stream};
use super::predict::predicted;
use super::wire::Strategy;
use crate::SocketId;

/// Pause after the opener round before normal probes: long enough for the
/// peer's openers (sent at the same coordinated moment) to have created its
/// mappings.
pub const OPENER_LEAD: Duration = Duration::from_millis(20);

pub fn streams(me: &SideView, peer: &SideView, cfg: &PlanConfig) -> Vec<Stream> {
    let targets = predicted(peer, cfg.window);
    if targets.is_empty() {
        return Vec::new();
    }
    let opener = cfg.ttl.or(me.nat.opener_ttl);
    let mut v = Vec::new();
    if let Some(ttl) = opener {
        v.push(Stream {
            strategy: Strategy::Ttl,
            socket: SocketId(0),
            targets: targets.clone(),
            offset: Duration::ZERO,
            interval: cfg.interval,
            rounds: 1,
            gap: Duration::ZERO,
            first_ttl: Some(ttl),
        });
    }
    v.push(Stream {
        strategy: if opener.is_some() {
            Strategy::Ttl
        } else {
            Strategy::Predict
        },
        socket: SocketId(0),
        targets,
        offset: if opener.is_some() {
            OPENER_LEAD
        } else {
            Duration::ZERO
        },
        interval: cfg.interval,
        rounds: u32::MAX,
        gap: Duration::ZERO,
        first_ttl: None,
    });
    v
}

/// Puts a limited-TTL opener round in front of `stream` (when a TTL is
/// known): the first packet to each target opens our NAT without reaching
/// the peer's, and real probes follow [`OPENER_LEAD`] later. This also
/// protects cone pairs: a probe that reaches the peer's NAT before the
/// peer's own mapping exists can leave a conntrack entry there that makes
/// Linux pick another port for the peer's mapping (a "conntrack clash").
pub fn with_openers(stream: Stream, ttl: Option<u8>) -> Vec<Stream> {
    match ttl {
        None => vec![stream],
        Some(t) => {
            let opener = Stream {
                rounds: 1,
                first_ttl: Some(t),
                ..stream.clone()
            };
            let normal = Stream {
                offset: stream.offset + OPENER_LEAD,
                ..stream
            };
            vec![opener, normal]
        }
    }
}
