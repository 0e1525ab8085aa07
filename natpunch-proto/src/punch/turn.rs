//! A TURN relayed address (RFC 8656): the peer holds an allocation on a
//! TURN server and announced the address it relays, and has permitted our
//! public IP there. One stream from our main socket to each such address
//! opens our NAT toward it whatever the NAT does, and the peer answers
//! through the allocation. It starts at once, like a mapped port: one
//! packet per round, no coordination.
//!
//! A path found this way is a relay path ([`super::Strategy::Turn`]): it
//! carries the session while nothing direct does, and never ends the
//! attempt ([`super::PunchEvent::Relayed`]).

use super::plan::{PlanConfig, SideView, Stream};
use super::wire::Strategy;
use crate::SocketId;

/// One stream to `peer`'s relayed addresses (none without any).
pub fn streams(peer: &SideView, cfg: &PlanConfig) -> Vec<Stream> {
    if peer.turn.is_empty() {
        return Vec::new();
    }
    vec![Stream {
        strategy: Strategy::Turn,
        socket: SocketId(0),
        targets: peer.turn.clone(),
        offset: std::time::Duration::ZERO,
        interval: cfg.interval,
        rounds: u32::MAX,
        gap: std::time::Duration::ZERO,
        first_ttl: None,
    }]
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use crate::identity::{Ephemeral, Identity};
    use crate::nat::{AllocationKind, Behaviour};
    use crate::punch::{
        make_offer, Path, Punch, PunchConfig, PunchEvent, PunchFailure, Role, SideView,
    };
    use crate::rendezvous::NatSummary;
    use crate::SocketId;

    const SESSION: u64 = 42;
    /// B's TURN allocation, as its punch machine knows it.
    const TURN: SocketId = SocketId(7);

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    /// A side behind a NAT that picks random ports for each destination
    /// (no direct path between two of them), maybe with relayed addresses.
    fn symmetric(ip: &str, turn: Vec<SocketAddr>) -> SideView {
        SideView {
            nat: NatSummary {
                mapping: Some(Behaviour::AddressAndPortDependent),
                filtering: Some(Behaviour::AddressAndPortDependent),
                allocation: Some(AllocationKind::Random),
                delta: None,
                opener_ttl: Some(2),
                nat: Some(true),
                pending: Default::default(),
            },
            observed: addr(&format!("{ip}:4000")),
            fresh: None,
            candidates: vec![],
            mapped: None,
            turn,
        }
    }

    /// A (initiator) and B (responder, holding an allocation that relays
    /// `relayed`), both symmetric-random, with each other's offers.
    fn pair(now: Instant, relayed: SocketAddr) -> (Punch, Punch) {
        let (ia, ib) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
        let (ea, eb) = (
            Ephemeral::from_secret([3; 32]),
            Ephemeral::from_secret([4; 32]),
        );
        let (oa, ob) = (
            make_offer(&ia, SESSION, Role::Initiator, &ea),
            make_offer(&ib, SESSION, Role::Responder, &eb),
        );
        let cfg = PunchConfig::new(1);
        let mut a = Punch::new(
            cfg.clone(),
            Role::Initiator,
            SESSION,
            ia.peer_id(),
            ib.peer_id(),
            ea,
            &oa,
            symmetric("198.51.100.2", vec![]),
            symmetric("198.51.100.18", vec![relayed]),
            now,
            now,
        );
        let mut b = Punch::new(
            cfg,
            Role::Responder,
            SESSION,
            ib.peer_id(),
            ia.peer_id(),
            eb,
            &ob,
            symmetric("198.51.100.18", vec![relayed]),
            symmetric("198.51.100.2", vec![]),
            now,
            now,
        );
        b.set_turn_sockets(vec![TURN]);
        a.set_peer_offer(&ob.ephemeral, &ob.sig);
        b.set_peer_offer(&oa.ephemeral, &oa.sig);
        (a, b)
    }

    /// Runs both machines for `secs` over a network where only the TURN
    /// server carries packets: A's to `relayed` reach B's allocation from
    /// A's NAT mapping toward the server, and B's answers there come back
    /// to A from `relayed`. Every other packet is lost. Returns each
    /// side's events.
    fn run(
        a: &mut Punch,
        b: &mut Punch,
        relayed: SocketAddr,
        start: Instant,
        secs: u64,
    ) -> (Vec<PunchEvent>, Vec<PunchEvent>) {
        let a_mapping = addr("198.51.100.2:51000");
        let (mut ea, mut eb) = (Vec::new(), Vec::new());
        let mut now = start;
        while now < start + Duration::from_secs(secs) {
            a.handle_timeout(now);
            b.handle_timeout(now);
            while let Some(t) = a.poll_transmit() {
                if t.destination == relayed {
                    b.handle_input(now, TURN, a_mapping, &t.payload);
                }
            }
            while let Some(t) = b.poll_transmit() {
                if t.socket == TURN && t.destination == a_mapping {
                    a.handle_input(now, SocketId(0), relayed, &t.payload);
                }
            }
            ea.extend(std::iter::from_fn(|| a.poll_event()));
            eb.extend(std::iter::from_fn(|| b.poll_event()));
            now += Duration::from_millis(5);
        }
        (ea, eb)
    }

    fn relayed_path(events: &[PunchEvent]) -> Option<Path> {
        events.iter().find_map(|e| match e {
            PunchEvent::Relayed { path, .. } => Some(*path),
            _ => None,
        })
    }

    #[test]
    fn a_pair_with_no_direct_path_finds_the_turn_path_then_says_why_it_stays() {
        let now = Instant::now();
        let relayed = addr("203.0.113.9:50000");
        let (mut a, mut b) = pair(now, relayed);
        let (ea, eb) = run(&mut a, &mut b, relayed, now, 3);
        assert_eq!(
            relayed_path(&ea),
            Some(Path {
                socket: SocketId(0),
                remote: relayed
            }),
            "A: {ea:?}"
        );
        assert_eq!(
            relayed_path(&eb),
            Some(Path {
                socket: TURN,
                remote: addr("198.51.100.2:51000")
            }),
            "B: {eb:?}"
        );
        for (side, events) in [("A", &ea), ("B", &eb)] {
            // Never a direct connect; after the TURN path settled, the
            // reason it stays relayed.
            assert!(
                !events
                    .iter()
                    .any(|e| matches!(e, PunchEvent::Connected { .. })),
                "{side}: {events:?}"
            );
            assert!(
                events.iter().any(|e| matches!(
                    e,
                    PunchEvent::Failed {
                        failure: PunchFailure::NoPathPossible(_)
                    }
                )),
                "{side}: {events:?}"
            );
        }
    }

    #[test]
    fn a_turn_path_is_found_within_the_first_rounds() {
        let now = Instant::now();
        let relayed = addr("203.0.113.9:50000");
        let (mut a, mut b) = pair(now, relayed);
        let (ea, _) = run(&mut a, &mut b, relayed, now, 1);
        let elapsed = ea.iter().find_map(|e| match e {
            PunchEvent::Relayed { elapsed, .. } => Some(*elapsed),
            _ => None,
        });
        // The first probe and its ack cross at once here: the path is
        // found in the first round or two, never after the settle time.
        assert!(
            elapsed.is_some_and(|e| e < Duration::from_millis(250)),
            "{ea:?}"
        );
    }
}
