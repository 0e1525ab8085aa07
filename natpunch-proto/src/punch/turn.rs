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
    /// The holder's TURN allocation, as its punch machine knows it.
    const TURN: SocketId = SocketId(7);
    const RELAYED: &str = "203.0.113.9:50000";
    /// The other side's NAT mapping toward the TURN server.
    const OTHER_MAPPING: &str = "198.51.100.2:51000";

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    /// A side behind a NAT that picks random ports for each destination
    /// (no direct path between two of them), maybe with relayed addresses.
    fn symmetric(ip: &str, turn: Vec<SocketAddr>) -> SideView {
        side(Behaviour::AddressAndPortDependent, ip, turn)
    }

    /// A side behind a port-restricted cone (a direct path exists).
    fn cone(ip: &str, turn: Vec<SocketAddr>) -> SideView {
        side(Behaviour::EndpointIndependent, ip, turn)
    }

    fn side(mapping: Behaviour, ip: &str, turn: Vec<SocketAddr>) -> SideView {
        SideView {
            nat: NatSummary {
                mapping: Some(mapping),
                filtering: Some(Behaviour::AddressAndPortDependent),
                allocation: Some(if mapping == Behaviour::EndpointIndependent {
                    AllocationKind::Preserving
                } else {
                    AllocationKind::Random
                }),
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

    /// The holder of an allocation that relays [`RELAYED`] and the other
    /// side, both symmetric-random, with each other's offers; the
    /// initiator is the holder when `initiator_holds`.
    fn machines(now: Instant, initiator_holds: bool) -> (Punch, Punch) {
        machines_behind(now, initiator_holds, symmetric)
    }

    /// [`machines`] behind NATs that `view` describes.
    fn machines_behind(
        now: Instant,
        initiator_holds: bool,
        view: fn(&str, Vec<SocketAddr>) -> SideView,
    ) -> (Punch, Punch) {
        let (ih, io) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
        let (eh, eo) = (
            Ephemeral::from_secret([3; 32]),
            Ephemeral::from_secret([4; 32]),
        );
        let (rh, ro) = if initiator_holds {
            (Role::Initiator, Role::Responder)
        } else {
            (Role::Responder, Role::Initiator)
        };
        let (oh, oo) = (
            make_offer(&ih, SESSION, rh, &eh),
            make_offer(&io, SESSION, ro, &eo),
        );
        let cfg = PunchConfig::new(1);
        let relayed = addr(RELAYED);
        let mut holder = Punch::new(
            cfg.clone(),
            rh,
            SESSION,
            ih.peer_id(),
            io.peer_id(),
            eh,
            &oh,
            view("198.51.100.18", vec![relayed]),
            view("198.51.100.2", vec![]),
            now,
            now,
        );
        let mut other = Punch::new(
            cfg,
            ro,
            SESSION,
            io.peer_id(),
            ih.peer_id(),
            eo,
            &oo,
            view("198.51.100.2", vec![]),
            view("198.51.100.18", vec![relayed]),
            now,
            now,
        );
        holder.set_turn_sockets(vec![TURN]);
        holder.set_peer_offer(&oo.ephemeral, &oo.sig);
        other.set_peer_offer(&oh.ephemeral, &oh.sig);
        (holder, other)
    }

    /// Runs both machines for `secs` over a network where only the TURN
    /// server carries packets: the other side's to [`RELAYED`] reach the
    /// holder's allocation from [`OTHER_MAPPING`], and the holder's
    /// answers there come back from [`RELAYED`], except the first `lose`
    /// of them. Every other packet is lost. Each side's events.
    fn run(
        holder: &mut Punch,
        other: &mut Punch,
        start: Instant,
        secs: u64,
        lose: u32,
    ) -> (Vec<PunchEvent>, Vec<PunchEvent>) {
        run_opening(holder, other, start, secs, lose, None)
    }

    /// [`run`], where from `direct_from` on the two main sockets also
    /// reach each other at their observed addresses (the NATs let the
    /// direct path through late).
    fn run_opening(
        holder: &mut Punch,
        other: &mut Punch,
        start: Instant,
        secs: u64,
        mut lose: u32,
        direct_from: Option<Duration>,
    ) -> (Vec<PunchEvent>, Vec<PunchEvent>) {
        let (h_seen, o_seen) = (addr("198.51.100.18:4000"), addr("198.51.100.2:4000"));
        let (relayed, mapping) = (addr(RELAYED), addr(OTHER_MAPPING));
        let (mut eh, mut eo) = (Vec::new(), Vec::new());
        let mut now = start;
        while now < start + Duration::from_secs(secs) {
            holder.handle_timeout(now);
            other.handle_timeout(now);
            let open = direct_from.is_some_and(|d| now >= start + d);
            while let Some(t) = other.poll_transmit() {
                if t.destination == relayed {
                    holder.handle_input(now, TURN, mapping, &t.payload);
                } else if open && t.socket == SocketId(0) && t.destination == h_seen {
                    holder.handle_input(now, SocketId(0), o_seen, &t.payload);
                }
            }
            while let Some(t) = holder.poll_transmit() {
                if open && t.socket == SocketId(0) && t.destination == o_seen {
                    other.handle_input(now, SocketId(0), h_seen, &t.payload);
                    continue;
                }
                if t.socket == TURN && t.destination == mapping {
                    if lose > 0 {
                        lose -= 1;
                        continue;
                    }
                    other.handle_input(now, SocketId(0), relayed, &t.payload);
                }
            }
            eh.extend(std::iter::from_fn(|| holder.poll_event()));
            eo.extend(std::iter::from_fn(|| other.poll_event()));
            now += Duration::from_millis(5);
        }
        (eh, eo)
    }

    fn relayed_path(events: &[PunchEvent]) -> Option<(Path, Duration)> {
        events.iter().find_map(|e| match e {
            PunchEvent::Relayed { path, elapsed } => Some((*path, *elapsed)),
            _ => None,
        })
    }

    fn failed(events: &[PunchEvent]) -> Option<&PunchFailure> {
        events.iter().find_map(|e| match e {
            PunchEvent::Failed { failure } => Some(failure),
            _ => None,
        })
    }

    /// Both sides found the TURN path (each as its own path) early.
    fn assert_found(eh: &[PunchEvent], eo: &[PunchEvent]) {
        let holder_path = Path {
            socket: TURN,
            remote: addr(OTHER_MAPPING),
        };
        let other_path = Path {
            socket: SocketId(0),
            remote: addr(RELAYED),
        };
        let (h, th) = relayed_path(eh).unwrap_or_else(|| panic!("holder: {eh:?}"));
        let (o, to) = relayed_path(eo).unwrap_or_else(|| panic!("other: {eo:?}"));
        assert_eq!((h, o), (holder_path, other_path));
        // A few probe rounds at most (every 100 ms), never the settle time.
        assert!(th.max(to) < Duration::from_millis(600), "{th:?} {to:?}");
    }

    #[test]
    fn a_pair_with_no_direct_path_finds_the_turn_path_then_says_why_it_stays() {
        let now = Instant::now();
        let (mut h, mut o) = machines(now, false);
        let (eh, eo) = run(&mut h, &mut o, now, 3, 0);
        assert_found(&eh, &eo);
        for (side, events) in [("holder", &eh), ("other", &eo)] {
            // Never a direct connect; after the TURN path settled, the
            // reason it stays relayed.
            assert!(
                !events
                    .iter()
                    .any(|e| matches!(e, PunchEvent::Connected { .. })),
                "{side}: {events:?}"
            );
            assert!(
                matches!(failed(events), Some(PunchFailure::NoPathPossible(_))),
                "{side}: {events:?}"
            );
        }
    }

    /// The initiator holds the allocation: it has no stream toward the
    /// peer, and its answers to the peer's probes are lost at first. Each
    /// probe that comes through is answered, so the path is found anyway.
    #[test]
    fn an_initiator_holding_the_allocation_finds_the_path_despite_lost_answers() {
        let now = Instant::now();
        let (mut h, mut o) = machines(now, true);
        let (eh, eo) = run(&mut h, &mut o, now, 2, 3);
        assert_found(&eh, &eo);
    }

    /// A TCP punch still under way: the TURN path carries the session, but
    /// the attempt is not ended as hopeless when it settles.
    #[test]
    fn a_tcp_punch_under_way_keeps_the_attempt_alive_past_the_settle() {
        let now = Instant::now();
        let (mut h, mut o) = machines(now, false);
        o.set_tcp_pending();
        let (eh, eo) = run(&mut h, &mut o, now, 4, 0);
        assert_found(&eh, &eo);
        assert!(failed(&eo).is_none(), "{eo:?}");
    }

    /// A direct path that opens after the TURN path was found still ends
    /// the attempt: the session moves there (TURN never stops punching).
    #[test]
    fn a_direct_path_found_after_the_turn_path_takes_over() {
        let now = Instant::now();
        let (mut h, mut o) = machines_behind(now, false, cone);
        let (eh, eo) = run_opening(&mut h, &mut o, now, 3, 0, Some(Duration::from_millis(800)));
        assert_found(&eh, &eo);
        for (side, events) in [("holder", &eh), ("other", &eo)] {
            let relayed_at = events
                .iter()
                .position(|e| matches!(e, PunchEvent::Relayed { .. }));
            let connected_at = events.iter().position(|e| {
                matches!(e, PunchEvent::Connected { path, .. } if path.socket == SocketId(0)
                    && path.remote != addr(RELAYED))
            });
            assert!(
                relayed_at.is_some() && connected_at > relayed_at,
                "{side}: {events:?}"
            );
        }
    }
}
