//! The connection core (the coordinator the CLI runs) through simulated
//! NATs on a virtual clock: every technique end to end, connects that do
//! not wait for NAT discovery, many peers at once, loss, declines, a
//! server restart, a second process with the same key, and a path that a
//! re-punch repairs.

use std::collections::HashSet;
use std::time::Duration;

use natpunch_proto::coordinator::{ConnectError, HostEvent, Policy, ServerMemo};
use natpunch_proto::identity::PeerId;
use natpunch_proto::nat::Behaviour::{self, *};
use natpunch_proto::portmap::MapProtocol;
use natpunch_proto::punch::{PunchFailure, Strategy};
use natpunch_proto::rendezvous::wire::DeclineReason;
use natpunch_sim::world::{HostSpec, World};
use natpunch_sim::PortAllocation;

/// One-way delay per access link, as in the lab's benchmark.
const HOP: Duration = Duration::from_millis(20);

/// A NAT preset, as the lab names them.
#[derive(Debug, Clone, Copy)]
struct Nat(Behaviour, Behaviour, PortAllocation);

const FULL_CONE: Nat = Nat(
    EndpointIndependent,
    EndpointIndependent,
    PortAllocation::Preserving,
);
const PORT_RESTRICTED: Nat = Nat(
    EndpointIndependent,
    AddressAndPortDependent,
    PortAllocation::Preserving,
);
const SYM_SEQ: Nat = Nat(
    AddressAndPortDependent,
    AddressAndPortDependent,
    PortAllocation::Sequential {
        start: 20000,
        delta: 1,
    },
);
const SYM_SEQ2: Nat = Nat(
    AddressAndPortDependent,
    AddressAndPortDependent,
    PortAllocation::Sequential {
        start: 30000,
        delta: 2,
    },
);
const SYM_RANDOM: Nat = Nat(
    AddressAndPortDependent,
    AddressAndPortDependent,
    PortAllocation::Random,
);

fn listener() -> Policy {
    Policy {
        accept: true,
        allow: None,
    }
}

fn connector() -> Policy {
    Policy::default()
}

/// How soon discovery reports a warm host's facts (before any connect),
/// and a cold one's (two round trips: tests I, then II and III).
const WARM: Duration = Duration::ZERO;
const COLD: Duration = Duration::from_millis(80);

fn host(w: &mut World, seed: u8, nat: Option<Nat>, policy: Policy, facts: Duration) -> usize {
    host_mapped(w, seed, nat, policy, facts, None)
}

/// [`host`] whose gateway maps its port (`Some(false)`: announced but
/// never forwarded).
fn host_mapped(
    w: &mut World,
    seed: u8,
    nat: Option<Nat>,
    policy: Policy,
    facts: Duration,
    portmap: Option<bool>,
) -> usize {
    let nat = nat.map(|Nat(m, f, a)| w.add_nat(m, f, a, u64::from(seed)));
    w.add_host(HostSpec {
        seed,
        nat,
        policy,
        facts_after: Some(facts),
        server_memo: None,
        relay: false,
        portmap,
    })
}

fn connected(w: &World, h: usize) -> Option<(Duration, Strategy)> {
    w.find(h, |e| match e {
        HostEvent::Connected { strategy, .. } => Some(*strategy),
        _ => None,
    })
    .map(|(t, s)| (t.saturating_duration_since(w.start), s))
}

fn failure(w: &World, h: usize) -> Option<ConnectError> {
    w.find(h, |e| match e {
        HostEvent::ConnectFailed { error, .. } => Some(error.clone()),
        _ => None,
    })
    .map(|(_, e)| e)
}

#[derive(Debug)]
struct Outcome {
    a: Option<Strategy>,
    b: Option<Strategy>,
    /// From A's connect to A's `Connected`.
    took: Option<Duration>,
    failure: Option<ConnectError>,
    /// The techniques each side (A, B) sent probes for.
    attempts: [Vec<Strategy>; 2],
    /// Probes each side sent until it connected.
    probes_sent: [u64; 2],
    /// Sockets each side opened (fresh mappings, birthday's many).
    sockets_opened: [usize; 2],
}

/// B listens (warm: it has run a while), then A connects, cold (its facts
/// arrive `a_facts` after it starts, while the connect is under way).
fn pair(a: Option<Nat>, b: Option<Nat>, a_facts: Duration, loss: f64, seed: u64) -> Outcome {
    pair_mapped(a, b, a_facts, loss, seed, [None, None])
}

/// [`pair`] with port mappings on A's and B's gateways.
fn pair_mapped(
    a: Option<Nat>,
    b: Option<Nat>,
    a_facts: Duration,
    loss: f64,
    seed: u64,
    portmap: [Option<bool>; 2],
) -> Outcome {
    let mut w = World::new(HOP, loss, seed);
    let hb = host_mapped(&mut w, 2, b, listener(), WARM, portmap[1]);
    let target = w.hosts[hb].peer_id;
    assert!(
        w.run_until(Duration::from_secs(5), |w| w
            .find(hb, |e| matches!(e, HostEvent::Registered { .. })
                .then_some(()))
            .is_some()),
        "B never registered"
    );
    let ha = host_mapped(&mut w, 1, a, connector(), a_facts, portmap[0]);
    let t0 = w.now;
    w.connect(ha, target, 1);
    w.run_until(Duration::from_secs(20), |w| {
        (connected(w, ha).is_some() && connected(w, hb).is_some()) || failure(w, ha).is_some()
    });
    let ca = connected(&w, ha);
    let attempts = |h: usize| -> Vec<Strategy> {
        w.hosts[h]
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                HostEvent::Attempt { strategy, .. } => Some(*strategy),
                _ => None,
            })
            .collect()
    };
    let probes_sent = |h: usize| -> u64 {
        w.hosts[h]
            .events
            .iter()
            .find_map(|(_, e)| match e {
                HostEvent::Connected { probes_sent, .. } => Some(*probes_sent),
                _ => None,
            })
            .unwrap_or(0)
    };
    let sockets = |h: usize| {
        w.hosts[h]
            .events
            .iter()
            .filter(|(_, e)| matches!(e, HostEvent::OpenSocket { .. }))
            .count()
    };
    Outcome {
        probes_sent: [probes_sent(ha), probes_sent(hb)],
        sockets_opened: [sockets(ha), sockets(hb)],
        a: ca.map(|c| c.1),
        b: connected(&w, hb).map(|c| c.1),
        took: ca.map(|c| c.0.saturating_sub(t0.saturating_duration_since(w.start))),
        failure: failure(&w, ha),
        attempts: [attempts(ha), attempts(hb)],
    }
}

/// The physical floor of a connect: A reaches B through the server (one
/// hop each way on each access link) plus one A↔B round trip.
fn floor() -> Duration {
    HOP * 2 + HOP * 4
}

fn assert_pair(a: Nat, b: Nat, want: Strategy) {
    for (facts, what) in [(WARM, "warm"), (COLD, "cold")] {
        let o = pair(Some(a), Some(b), facts, 0.0, 1);
        assert_eq!(o.a, Some(want), "{a:?} / {b:?} ({what}): A {:?}", o.failure);
        assert_eq!(o.b, Some(want), "{a:?} / {b:?} ({what}): B");
    }
}

#[test]
fn cone_pairs_connect_by_cone() {
    assert_pair(PORT_RESTRICTED, PORT_RESTRICTED, Strategy::Cone);
    assert_pair(FULL_CONE, PORT_RESTRICTED, Strategy::Cone);
}

#[test]
fn cone_and_sequential_symmetric_connect_by_prediction() {
    assert_pair(PORT_RESTRICTED, SYM_SEQ, Strategy::Predict);
    assert_pair(SYM_SEQ, PORT_RESTRICTED, Strategy::Predict);
    assert_pair(FULL_CONE, SYM_SEQ2, Strategy::Predict);
}

#[test]
fn two_sequential_symmetric_nats_connect_by_ttl_prediction() {
    assert_pair(SYM_SEQ, SYM_SEQ2, Strategy::Ttl);
    assert_pair(SYM_SEQ2, SYM_SEQ, Strategy::Ttl);
}

#[test]
fn port_restricted_and_random_symmetric_connect_by_birthday() {
    assert_pair(PORT_RESTRICTED, SYM_RANDOM, Strategy::Birthday);
    assert_pair(SYM_RANDOM, PORT_RESTRICTED, Strategy::Birthday);
}

#[test]
fn full_cone_and_random_symmetric_connect_by_cone() {
    assert_pair(FULL_CONE, SYM_RANDOM, Strategy::Cone);
}

#[test]
fn two_random_symmetric_nats_fail_with_a_reason() {
    let o = pair(Some(SYM_RANDOM), Some(SYM_RANDOM), COLD, 0.0, 1);
    match o.failure {
        Some(ConnectError::Punch {
            failure: PunchFailure::NoPathPossible(why),
            ..
        }) => assert!(why.to_string().contains("no direct path possible"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_mapped_port_connects_any_pair_in_one_round_trip_and_nothing_else_runs() {
    let pcp = Strategy::Portmap(MapProtocol::Pcp);
    for (a, b, mapped) in [
        (PORT_RESTRICTED, SYM_RANDOM, [None, Some(true)]),
        (SYM_RANDOM, SYM_RANDOM, [None, Some(true)]),
        (SYM_RANDOM, SYM_RANDOM, [Some(true), None]),
        (SYM_SEQ, SYM_RANDOM, [None, Some(true)]),
        (SYM_SEQ, SYM_SEQ2, [Some(true), Some(true)]),
    ] {
        for (facts, what) in [(WARM, "warm"), (COLD, "cold")] {
            let o = pair_mapped(Some(a), Some(b), facts, 0.0, 1, mapped);
            let case = format!("{a:?} / {b:?} mapped {mapped:?} ({what})");
            assert_eq!(o.a, Some(pcp), "{case}: A {:?}", o.failure);
            assert_eq!(o.b, Some(pcp), "{case}: B");
            // As fast as a cone pair: through the server, then one A↔B
            // round trip (one hop more when only the initiator is mapped:
            // the initiator nominates the path the responder's probe
            // opened).
            let cone = pair(Some(PORT_RESTRICTED), Some(PORT_RESTRICTED), facts, 0.0, 1)
                .took
                .expect("cone pair connects");
            let took = o.took.expect("connected");
            assert!(took <= cone + HOP, "{case}: {took:?} (cone pair: {cone:?})");
            // No spray, no birthday sockets: a handful of probes at most
            // (the direct stream's first rounds, hedged), and at most the
            // one socket of a symmetric side's fresh mapping.
            assert!(o.probes_sent[0] <= 8, "{case}: {:?}", o.probes_sent);
            assert!(
                o.sockets_opened.iter().all(|n| *n <= 1),
                "{case}: {:?} {:?}",
                o.sockets_opened,
                o.attempts
            );
        }
    }
}

#[test]
fn a_mapped_port_that_does_not_forward_costs_only_the_grace() {
    let o = pair_mapped(
        Some(PORT_RESTRICTED),
        Some(SYM_RANDOM),
        WARM,
        0.0,
        1,
        [None, Some(false)],
    );
    assert_eq!(o.a, Some(Strategy::Birthday), "{:?}", o.failure);
    let took = o.took.expect("connected");
    assert!(
        took >= natpunch_proto::punch::defaults::PORTMAP_GRACE
            && took <= natpunch_proto::punch::defaults::PORTMAP_GRACE + Duration::from_secs(2),
        "{took:?}"
    );
    // Without a mapping, two random symmetric NATs still fail at once.
    let o = pair_mapped(
        Some(SYM_RANDOM),
        Some(SYM_RANDOM),
        WARM,
        0.0,
        1,
        [None, Some(false)],
    );
    assert!(o.a.is_none() && o.failure.is_some(), "{o:?}");
}

#[test]
fn direct_hosts_connect() {
    let o = pair(None, None, COLD, 0.0, 1);
    assert_eq!(o.a, Some(Strategy::Cone));
    assert_eq!(o.b, Some(Strategy::Cone));
}

/// A cold connect does not wait for discovery: a cone pair connects within
/// twice the physical floor of the connect itself, counted from the
/// process start (here: from the connect, which is the first thing it does).
#[test]
fn a_cold_connect_takes_about_two_floors_not_seconds() {
    for (a, b, bound) in [
        (PORT_RESTRICTED, PORT_RESTRICTED, 2.0),
        (PORT_RESTRICTED, SYM_SEQ, 3.0),
        (SYM_SEQ, PORT_RESTRICTED, 3.0),
        (SYM_SEQ, SYM_SEQ2, 3.0),
    ] {
        let o = pair(Some(a), Some(b), COLD, 0.0, 1);
        let took = o
            .took
            .unwrap_or_else(|| panic!("{a:?} / {b:?}: {:?}", o.failure));
        let ratio = took.as_secs_f64() / floor().as_secs_f64();
        eprintln!("{a:?} / {b:?}: cold connect in {took:?} = {ratio:.2} x the floor");
        assert!(
            ratio <= bound,
            "{a:?} / {b:?}: {took:?} is {ratio:.2} x the floor"
        );
    }
}

/// With 10 % loss on every access link, every connect still succeeds
/// directly, and quickly: a cone pair's 95th percentile within three
/// floors. A pair with a symmetric side has one more round trip on its
/// critical path (the symmetric side's fresh mapping, then its Accept),
/// each exposed to loss, so its bound is half a floor wider.
#[test]
fn ten_percent_loss_costs_little() {
    for (a, b, want, bound) in [
        (PORT_RESTRICTED, PORT_RESTRICTED, Strategy::Cone, 3.0),
        (PORT_RESTRICTED, SYM_SEQ, Strategy::Predict, 3.5),
        (SYM_SEQ, PORT_RESTRICTED, Strategy::Predict, 3.5),
    ] {
        let mut times = Vec::new();
        for seed in 0..40 {
            let o = pair(Some(a), Some(b), COLD, 0.10, seed);
            assert_eq!(
                o.a,
                Some(want),
                "{a:?} / {b:?} seed {seed}: {:?}",
                o.failure
            );
            times.push(o.took.unwrap_or_default());
        }
        times.sort();
        let p95 = times[times.len() * 95 / 100 - 1];
        let ratio = p95.as_secs_f64() / floor().as_secs_f64();
        eprintln!(
            "{a:?} / {b:?}, 10 % loss: median {:?}, p95 {p95:?} ({ratio:.2} x the floor)",
            times[times.len() / 2],
        );
        assert!(
            ratio <= bound,
            "{a:?} / {b:?}: p95 {p95:?} is {ratio:.2} x the floor"
        );
    }
}

/// One connector connecting again and again to a listener behind a
/// sequential symmetric NAT (each session over before the next): every
/// connect is as fast as the second (the first also fetched the server's
/// cookie). The listener's probes leave from its
/// fresh socket, whose mapping toward the connector is new each time; from
/// its main socket they would reuse the first session's mapping, which
/// prediction stops covering once the NAT's counter has moved on.
#[test]
fn repeated_connects_to_a_symmetric_listener_stay_fast() {
    let mut w = World::new(HOP, 0.0, 1);
    let hb = host(&mut w, 2, Some(SYM_SEQ), listener(), WARM);
    let target = w.hosts[hb].peer_id;
    w.run_until(Duration::from_secs(5), |w| {
        w.find(hb, |e| {
            matches!(e, HostEvent::Registered { .. }).then_some(())
        })
        .is_some()
    });
    let ha = host(&mut w, 1, Some(PORT_RESTRICTED), connector(), WARM);
    let mut times = Vec::new();
    for i in 0..8u64 {
        let t0 = w.elapsed();
        let before = w.hosts[ha].events.len();
        w.connect(ha, target, i);
        w.run_until(Duration::from_secs(10), |w| {
            w.hosts[ha].events[before..]
                .iter()
                .any(|(_, e)| matches!(e, HostEvent::Connected { .. }))
        });
        let (at, strategy) = w.hosts[ha].events[before..]
            .iter()
            .find_map(|(t, e)| match e {
                HostEvent::Connected { strategy, .. } => Some((*t, *strategy)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("connect {i}: {:?}", failure(&w, ha)));
        assert_eq!(strategy, Strategy::Predict, "connect {i}");
        times.push(at.saturating_duration_since(w.start) - t0);
        // Let the attempts end on both sides before the next connect.
        w.run_until(Duration::from_secs(2), |_| false);
    }
    eprintln!("repeated connects: {times:?}");
    // The first one also fetched the server's cookie.
    for (i, t) in times.iter().enumerate().skip(2) {
        assert!(
            *t <= times[1] + Duration::from_millis(10),
            "connect {i} took {t:?}, the second {:?}",
            times[1]
        );
    }
}

/// A process that starts with the cookie (and round trip) an earlier
/// process on its network kept sends its Connect at once: it connects one
/// server round trip sooner than the earlier, cookieless one.
#[test]
fn a_kept_cookie_saves_the_hello_round_trip() {
    let mut w = World::new(HOP, 0.0, 1);
    let hb = host(&mut w, 2, Some(PORT_RESTRICTED), listener(), WARM);
    let target = w.hosts[hb].peer_id;
    w.run_until(Duration::from_secs(5), |w| {
        w.find(hb, |e| {
            matches!(e, HostEvent::Registered { .. }).then_some(())
        })
        .is_some()
    });
    let Nat(m, f, a) = PORT_RESTRICTED;
    let home = w.add_nat(m, f, a, 5);
    let run = |w: &mut World, seed: u8, memo: Option<ServerMemo>| {
        let h = w.add_host(HostSpec {
            seed,
            nat: Some(home),
            policy: connector(),
            // Known at once, as from the same cache as the cookie.
            facts_after: Some(WARM),
            server_memo: memo,
            relay: false,
            portmap: None,
        });
        let t0 = w.elapsed();
        w.connect(h, target, 1);
        w.run_until(Duration::from_secs(10), |w| connected(w, h).is_some());
        let (at, _) = connected(w, h).unwrap_or_else(|| panic!("{:?}", failure(w, h)));
        (h, at - t0)
    };
    let (first, took_first) = run(&mut w, 1, None);
    let (at, (cookie, rtt)) = w
        .find(first, |e| match e {
            HostEvent::ServerCookie { cookie, rtt } => Some((*cookie, *rtt)),
            _ => None,
        })
        .expect("the first process got a cookie");
    let rtt = rtt.expect("the Hello measured the round trip");
    // The second process (another key) starts a few seconds later.
    w.run_until(Duration::from_secs(3), |_| false);
    let memo = ServerMemo {
        cookie,
        age: w.now - at,
        rtt,
    };
    let (_, took_second) = run(&mut w, 3, Some(memo));
    eprintln!("without a kept cookie {took_first:?}, with one {took_second:?}");
    assert!(
        took_second + HOP * 2 <= took_first + Duration::from_millis(5),
        "{took_second:?} vs {took_first:?}"
    );
}

/// Forty connectors behind one NAT, each with its own key, at the same
/// moment: every one connects (no "busy", no prediction confusion).
#[test]
fn forty_connectors_at_once_all_connect() {
    for (their_nat, listener_nat) in [
        (PORT_RESTRICTED, PORT_RESTRICTED),
        (PORT_RESTRICTED, SYM_SEQ),
    ] {
        let mut w = World::new(HOP, 0.0, 7);
        let hb = host(&mut w, 200, Some(listener_nat), listener(), WARM);
        let target = w.hosts[hb].peer_id;
        w.run_until(Duration::from_secs(5), |w| {
            w.find(hb, |e| {
                matches!(e, HostEvent::Registered { .. }).then_some(())
            })
            .is_some()
        });
        let Nat(m, f, a) = their_nat;
        let shared = w.add_nat(m, f, a, 99);
        let hosts: Vec<usize> = (0..40)
            .map(|i| {
                w.add_host(HostSpec {
                    seed: 10 + i,
                    nat: Some(shared),
                    policy: connector(),
                    facts_after: Some(COLD),
                    server_memo: None,
                    relay: false,
                    portmap: None,
                })
            })
            .collect();
        for (i, h) in hosts.iter().enumerate() {
            w.connect(*h, target, i as u64);
        }
        w.run_until(Duration::from_secs(30), |w| {
            hosts
                .iter()
                .all(|h| connected(w, *h).is_some() || failure(w, *h).is_some())
                && w.connected_to(hb).len() == 40
        });
        let ok = hosts
            .iter()
            .filter(|h| connected(&w, **h).is_some())
            .count();
        let failures: Vec<_> = hosts.iter().filter_map(|h| failure(&w, *h)).collect();
        let ids: HashSet<PeerId> = w.connected_to(hb);
        eprintln!(
            "{their_nat:?} x40 → {listener_nat:?}: {ok}/40 in {:?}",
            w.elapsed()
        );
        assert_eq!(ok, 40, "{failures:?}");
        assert_eq!(ids.len(), 40);
    }
}

#[test]
fn declines_are_typed_and_nobody_is_probed() {
    let mut w = World::new(HOP, 0.0, 1);
    let friend = natpunch_proto::identity::Identity::from_seed([42; 32]).peer_id();
    let hb = host(
        &mut w,
        2,
        Some(PORT_RESTRICTED),
        Policy {
            accept: true,
            allow: Some([friend].into_iter().collect()),
        },
        WARM,
    );
    let hc = host(&mut w, 3, Some(PORT_RESTRICTED), connector(), WARM);
    w.run_until(Duration::from_secs(2), |_| false);
    let ha = host(&mut w, 1, Some(PORT_RESTRICTED), connector(), COLD);
    let (b, c) = (w.hosts[hb].peer_id, w.hosts[hc].peer_id);
    let me = w.hosts[ha].peer_id;
    w.connect(ha, b, 1);
    w.connect(ha, me, 2);
    w.run_until(Duration::from_secs(10), |w| {
        w.hosts[ha]
            .events
            .iter()
            .filter(|(_, e)| matches!(e, HostEvent::ConnectFailed { .. }))
            .count()
            >= 2
    });
    let failures: Vec<(u64, ConnectError)> = w.hosts[ha]
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            HostEvent::ConnectFailed { request, error, .. } => Some((*request, error.clone())),
            _ => None,
        })
        .collect();
    assert!(failures.contains(&(
        1,
        ConnectError::Declined {
            peer: b,
            reason: DeclineReason::NotAllowed
        }
    )));
    assert!(failures.contains(&(2, ConnectError::OwnPeerId { peer: me })));
    // The listener said why, and never punched.
    assert!(w
        .find(hb, |e| matches!(
            e,
            HostEvent::Refused {
                reason: DeclineReason::NotAllowed,
                ..
            }
        )
        .then_some(()))
        .is_some());
    assert!(w
        .find(hb, |e| matches!(e, HostEvent::Attempt { .. }).then_some(()))
        .is_none());
    // A peer that only connects out (C) is not registered: offline.
    w.connect(ha, c, 3);
    w.run_until(Duration::from_secs(10), |w| {
        w.hosts[ha]
            .events
            .iter()
            .any(|(_, e)| matches!(e, HostEvent::ConnectFailed { request: 3, .. }))
    });
    assert!(w.hosts[ha].events.iter().any(|(_, e)| matches!(
        e,
        HostEvent::ConnectFailed {
            request: 3,
            error: ConnectError::Offline { .. },
            ..
        }
    )));
}

/// The server restarts: the listener notices, says so, and is reachable
/// again within 5 s of the server's return.
#[test]
fn a_listener_is_back_within_five_seconds_of_a_server_restart() {
    let mut w = World::new(HOP, 0.0, 3);
    let hb = host(&mut w, 2, Some(PORT_RESTRICTED), listener(), WARM);
    w.run_until(Duration::from_secs(2), |_| false);
    w.server_up = false;
    w.run_until(Duration::from_secs(6), |_| false);
    assert!(w
        .find(hb, |e| matches!(e, HostEvent::ServerLost { .. })
            .then_some(()))
        .is_some());
    w.restart_server();
    w.server_up = true;
    let back = w.now;
    let registered_again = |w: &World| {
        w.hosts[hb]
            .events
            .iter()
            .any(|(t, e)| *t > back && matches!(e, HostEvent::Registered { .. }))
    };
    assert!(w.run_until(Duration::from_secs(5), registered_again));
    let took = w.now.saturating_duration_since(back);
    assert!(w
        .find(hb, |e| matches!(e, HostEvent::ServerBack { .. })
            .then_some(()))
        .is_some());
    // And a connect works.
    let target = w.hosts[hb].peer_id;
    let ha = host(&mut w, 1, Some(PORT_RESTRICTED), connector(), COLD);
    w.connect(ha, target, 1);
    assert!(w.run_until(Duration::from_secs(5), |w| connected(w, ha).is_some()));
    eprintln!("re-registered {took:?} after the server came back");
    assert!(took <= Duration::from_secs(5));
}

/// A second listener with the same key takes the registration over; the
/// first is told, and takes it back once the second leaves.
#[test]
fn a_second_process_with_one_key_displaces_the_first_which_is_told() {
    let mut w = World::new(HOP, 0.0, 4);
    let first = host(&mut w, 2, Some(PORT_RESTRICTED), listener(), WARM);
    w.run_until(Duration::from_secs(2), |_| false);
    let second = host(&mut w, 2, Some(FULL_CONE), listener(), WARM);
    assert!(w.run_until(Duration::from_secs(2), |w| w
        .find(first, |e| matches!(e, HostEvent::Displaced).then_some(()))
        .is_some()));
    w.close(second);
    let left = w.now;
    assert!(w.run_until(Duration::from_secs(5), |w| w.hosts[first]
        .events
        .iter()
        .any(|(t, e)| *t > left && matches!(e, HostEvent::Registered { .. }))));
    eprintln!(
        "the first listener is registered again {:?} after the second left",
        w.now.saturating_duration_since(left)
    );
}

/// Both NATs forget every mapping under a live session: the initiator
/// re-punches and the path moves, without the session layer noticing.
#[test]
fn a_stalled_path_is_repaired_by_a_new_punch() {
    for (a, b) in [(SYM_SEQ, PORT_RESTRICTED), (PORT_RESTRICTED, SYM_RANDOM)] {
        let mut w = World::new(HOP, 0.0, 5);
        let hb = host(&mut w, 2, Some(b), listener(), WARM);
        w.run_until(Duration::from_secs(1), |_| false);
        let ha = host(&mut w, 1, Some(a), connector(), WARM);
        let target = w.hosts[hb].peer_id;
        w.connect(ha, target, 1);
        assert!(
            w.run_until(Duration::from_secs(10), |w| connected(w, ha).is_some()
                && connected(w, hb).is_some())
        );
        let remote = w
            .find(ha, |e| match e {
                HostEvent::Connected { remote, .. } => Some(*remote),
                _ => None,
            })
            .map(|x| x.1)
            .expect("remote");
        let before = w.hosts[ha].routes.get(&remote).copied();
        let stalled_at = w.now;
        let now = w.now;
        w.hosts[ha].host.session_up(now, remote);
        for n in &mut w.nats {
            n.flush();
        }
        w.hosts[ha].host.path_stalled(now, remote);
        w.drain(ha);
        // B's session layer sees its peer fall silent: it registers again
        // (its NAT forgot the mapping toward the server too).
        w.hosts[hb].host.peer_quiet(now);
        w.drain(hb);
        assert!(
            w.run_until(Duration::from_secs(15), |w| w
                .find(ha, |e| matches!(e, HostEvent::PathRepaired { .. })
                    .then_some(()))
                .is_some()),
            "{a:?} / {b:?}: no new path: {:?}",
            w.hosts[ha].events.iter().map(|e| &e.1).collect::<Vec<_>>()
        );
        let after = w.hosts[ha].routes.get(&remote).copied();
        eprintln!(
            "{a:?} / {b:?}: repaired {:?} after the stall, path {before:?} → {after:?}",
            w.now.saturating_duration_since(stalled_at)
        );
    }
}
