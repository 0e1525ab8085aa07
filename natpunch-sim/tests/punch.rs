//! Rendezvous + punching ladder through simulated NATs on a virtual clock:
//! every technique, end to end, in milliseconds of real time.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use natpunch_proto::identity::{Ephemeral, Identity, PeerId};
use natpunch_proto::nat::{AllocationKind, Behaviour};
use natpunch_proto::punch::{make_offer, Punch, PunchConfig, PunchEvent, Role, SideView, Strategy};
use natpunch_proto::rendezvous::{
    ClientEvent, NatSummary, PeerInfo, RendezvousClient, RendezvousServer,
};
use natpunch_proto::{SocketId, Transmit};
use natpunch_sim::{Nat, NatConfig, Packet, PortAllocation};

const SERVER: &str = "192.0.2.1:3478";
/// Where a host sends to take a fresh mapping (the server's other address).
const ALT: &str = "192.0.2.2:3478";
/// One-way latency of every hop in the simulation.
const HOP: Duration = Duration::from_millis(10);

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

struct Host {
    id: Identity,
    ip: IpAddr,
    nat: Option<Nat>,
    nat_summary: NatSummary,
    sockets: Vec<SocketAddr>,
    client: RendezvousClient,
    punch: Option<Punch>,
    observed: Option<SocketAddr>,
    fresh: Option<SocketAddr>,
    outcome: Option<PunchEvent>,
}

impl Host {
    fn new(seed: u8, ip: &str, nat: Option<NatConfig>) -> Host {
        let id = Identity::from_seed([seed; 32]);
        let ip: IpAddr = ip.parse().unwrap();
        let nat_summary = match &nat {
            None => NatSummary {
                mapping: Some(Behaviour::EndpointIndependent),
                filtering: Some(Behaviour::EndpointIndependent),
                allocation: Some(AllocationKind::Preserving),
                delta: None,
                opener_ttl: None,
                nat: Some(false),
            },
            Some(c) => NatSummary {
                mapping: Some(c.mapping),
                filtering: Some(c.filtering),
                allocation: Some(match c.allocation {
                    PortAllocation::Preserving => AllocationKind::Preserving,
                    PortAllocation::Sequential { .. } => AllocationKind::Sequential,
                    PortAllocation::Random => AllocationKind::Random,
                }),
                delta: match c.allocation {
                    PortAllocation::Sequential { delta, .. } => Some(delta),
                    _ => None,
                },
                opener_ttl: Some(2),
                nat: Some(true),
            },
        };
        let info = PeerInfo {
            nat: nat_summary,
            candidates: vec![SocketAddr::new(ip, 40000)],
        };
        Host {
            client: RendezvousClient::new(id.clone(), addr(SERVER), SocketId(0), info),
            id,
            ip,
            nat: nat.map(Nat::new),
            nat_summary,
            sockets: vec![SocketAddr::new(ip, 40000)],
            punch: None,
            observed: None,
            fresh: None,
            outcome: None,
        }
    }

    fn peer_id(&self) -> PeerId {
        self.id.peer_id()
    }

    /// Takes a fresh mapping from socket 0 (the NAT's next allocation).
    fn take_fresh(&mut self) -> Option<SocketAddr> {
        let src = self.sockets[0];
        let p = Packet {
            src,
            dst: addr(ALT),
            payload: vec![],
        };
        let mapped = match self.nat.as_mut() {
            Some(n) => n.outbound(p).map(|p| p.src),
            None => Some(src),
        };
        self.fresh = mapped;
        mapped
    }

    fn ensure_sockets(&mut self, n: usize) {
        while self.sockets.len() < n {
            let port = 40000 + self.sockets.len() as u16 * 3;
            self.sockets.push(SocketAddr::new(self.ip, port));
        }
    }
}

/// A datagram in flight: (arrival, tie-break, destination, src, dst, payload).
type InFlight = (Instant, u64, usize, SocketAddr, SocketAddr, Vec<u8>);

struct World {
    now: Instant,
    server: RendezvousServer,
    hosts: [Host; 2],
    queue: BinaryHeap<Reverse<InFlight>>,
    counter: u64,
}

/// Destination index: 0/1 = host, 2 = server.
const TO_SERVER: usize = 2;

impl World {
    fn route_out(&mut self, from_host: usize, t: Transmit) {
        let src = self.hosts[from_host].sockets[t.socket.0];
        let mut pkt = Packet {
            src,
            dst: t.destination,
            payload: t.payload,
        };
        if let Some(n) = self.hosts[from_host].nat.as_mut() {
            match n.outbound(pkt) {
                Some(p) => pkt = p,
                None => return,
            }
            // Hairpinned back inside.
            if pkt.dst.ip() == self.hosts[from_host].ip {
                self.push(from_host, pkt.src, pkt.dst, pkt.payload);
                return;
            }
        }
        if pkt.dst == addr(SERVER) {
            self.push(TO_SERVER, pkt.src, pkt.dst, pkt.payload);
            return;
        }
        for h in 0..2 {
            let host = &mut self.hosts[h];
            let arrives = match host.nat.as_mut() {
                Some(n) if n.public_ip() == pkt.dst.ip() => n.inbound(pkt.clone()),
                None if host.ip == pkt.dst.ip() => Some(pkt.clone()),
                _ => continue,
            };
            if let Some(p) = arrives {
                self.push(h, p.src, p.dst, p.payload);
            }
            return;
        }
    }

    fn push(&mut self, to: usize, src: SocketAddr, dst: SocketAddr, payload: Vec<u8>) {
        self.counter += 1;
        self.queue.push(Reverse((
            self.now + HOP,
            self.counter,
            to,
            src,
            dst,
            payload,
        )));
    }

    fn flush(&mut self) {
        while let Some(o) = self.server.poll_transmit() {
            // Server → host: through the host's NAT.
            for h in 0..2 {
                let host = &mut self.hosts[h];
                let arrives = match host.nat.as_mut() {
                    Some(n) if n.public_ip() == o.to.ip() => n.inbound(Packet {
                        src: o.from,
                        dst: o.to,
                        payload: o.payload.clone(),
                    }),
                    None if host.ip == o.to.ip() => Some(Packet {
                        src: o.from,
                        dst: o.to,
                        payload: o.payload.clone(),
                    }),
                    _ => continue,
                };
                if let Some(p) = arrives {
                    self.push(h, p.src, p.dst, p.payload);
                }
                break;
            }
        }
        for h in 0..2 {
            let mut out = Vec::new();
            while let Some(t) = self.hosts[h].client.poll_transmit() {
                out.push(t);
            }
            if let Some(p) = self.hosts[h].punch.as_mut() {
                while let Some(t) = p.poll_transmit() {
                    out.push(t);
                }
            }
            for t in out {
                self.route_out(h, t);
            }
        }
    }

    fn events(&mut self, initiator_target: PeerId) {
        let now = self.now;
        for h in 0..2 {
            while let Some(ev) = self.hosts[h].client.poll_event() {
                let other = 1 - h;
                match ev {
                    ClientEvent::Registered { observed } => self.hosts[h].observed = Some(observed),
                    ClientEvent::Peer {
                        session,
                        peer,
                        observed,
                        info,
                        start_at,
                    } => {
                        let host = &mut self.hosts[h];
                        let me = SideView {
                            nat: host.nat_summary,
                            observed: host.observed.unwrap(),
                            fresh: host.fresh,
                            candidates: vec![host.sockets[0]],
                        };
                        let peer_view = SideView {
                            nat: info.nat,
                            observed,
                            fresh: None,
                            candidates: info.candidates,
                        };
                        let eph = Ephemeral::from_secret([h as u8 + 50; 32]);
                        let offer = make_offer(&host.id, session, Role::Initiator, &eph);
                        let p = Punch::new(
                            PunchConfig::new(9),
                            Role::Initiator,
                            session,
                            host.peer_id(),
                            peer,
                            eph,
                            &offer,
                            me,
                            peer_view,
                            now,
                            start_at,
                        );
                        host.ensure_sockets(p.sockets_needed());
                        host.punch = Some(p);
                    }
                    ClientEvent::Incoming {
                        session,
                        from,
                        observed,
                        info,
                        offer,
                        fresh,
                        start_at,
                    } => {
                        let host = &mut self.hosts[h];
                        let my_fresh =
                            if host.nat_summary.mapping != Some(Behaviour::EndpointIndependent) {
                                host.take_fresh()
                            } else {
                                None
                            };
                        let me = SideView {
                            nat: host.nat_summary,
                            observed: host.observed.unwrap(),
                            fresh: my_fresh,
                            candidates: vec![host.sockets[0]],
                        };
                        let peer_view = SideView {
                            nat: info.nat,
                            observed,
                            fresh,
                            candidates: info.candidates,
                        };
                        let eph = Ephemeral::from_secret([h as u8 + 60; 32]);
                        let my_offer = make_offer(&host.id, session, Role::Responder, &eph);
                        let mut p = Punch::new(
                            PunchConfig::new(10),
                            Role::Responder,
                            session,
                            host.peer_id(),
                            from,
                            eph,
                            &my_offer,
                            me,
                            peer_view,
                            now,
                            start_at,
                        );
                        p.set_peer_offer(&offer.ephemeral, &offer.sig);
                        host.ensure_sockets(p.sockets_needed());
                        host.punch = Some(p);
                        host.client.accept(now, session, my_offer, my_fresh);
                    }
                    ClientEvent::Accepted {
                        offer,
                        fresh,
                        start_at,
                        ..
                    } => {
                        if let Some(p) = self.hosts[h].punch.as_mut() {
                            p.set_peer_offer(&offer.ephemeral, &offer.sig);
                            p.set_peer_fresh(now, fresh, start_at);
                        }
                    }
                    ClientEvent::Go { start_at, .. } => {
                        if let Some(p) = self.hosts[h].punch.as_mut() {
                            p.set_peer_fresh(now, None, start_at);
                        }
                    }
                    other_ev => panic!("host {h}: unexpected {other_ev:?} (other {other})"),
                }
            }
            if let Some(p) = self.hosts[h].punch.as_mut() {
                while let Some(ev) = p.poll_event() {
                    if matches!(ev, PunchEvent::Connected { .. } | PunchEvent::Failed { .. }) {
                        self.hosts[h].outcome = Some(ev);
                    }
                }
            }
        }
        let _ = initiator_target;
    }

    fn next_wake(&self) -> Option<Instant> {
        let mut t = self.queue.peek().map(|Reverse(x)| x.0);
        for h in &self.hosts {
            for x in [
                h.client.poll_timeout(),
                h.punch.as_ref().and_then(|p| p.poll_timeout()),
            ]
            .into_iter()
            .flatten()
            {
                t = Some(t.map_or(x, |y| y.min(x)));
            }
        }
        t
    }

    fn step(&mut self, target: PeerId) -> bool {
        let Some(t) = self.next_wake() else {
            return false;
        };
        self.now = self.now.max(t);
        let now = self.now;
        while self.queue.peek().is_some_and(|Reverse(x)| x.0 <= now) {
            let Reverse((_, _, to, src, dst, payload)) = self.queue.pop().unwrap();
            if to == TO_SERVER {
                self.server.handle(now, addr(SERVER), src, &payload);
            } else {
                let host = &mut self.hosts[to];
                let Some(sock) = host.sockets.iter().position(|s| *s == dst) else {
                    continue;
                };
                if !host.client.handle_input(now, src, &payload) {
                    if let Some(p) = host.punch.as_mut() {
                        p.handle_input(now, SocketId(sock), src, &payload);
                    }
                }
            }
        }
        for h in &mut self.hosts {
            h.client.handle_timeout(now);
            if let Some(p) = h.punch.as_mut() {
                p.handle_timeout(now);
            }
        }
        self.events(target);
        self.flush();
        true
    }
}

fn nat(
    ip: &str,
    mapping: Behaviour,
    filtering: Behaviour,
    allocation: PortAllocation,
    seed: u64,
) -> Option<NatConfig> {
    Some(NatConfig {
        public_ip: ip.parse().unwrap(),
        mapping,
        filtering,
        allocation,
        hairpin: true,
        seed,
    })
}

/// Runs A → B; returns both outcomes.
fn run(
    a: Option<NatConfig>,
    b: Option<NatConfig>,
) -> (Option<PunchEvent>, Option<PunchEvent>, Duration) {
    let mut w = World {
        now: Instant::now(),
        server: RendezvousServer::new([3; 32]),
        hosts: [Host::new(1, "10.0.1.2", a), Host::new(2, "10.0.2.2", b)],
        queue: BinaryHeap::new(),
        counter: 0,
    };
    if w.hosts[0].nat.is_none() {
        w.hosts[0] = Host::new(1, "203.0.113.5", None);
    }
    if w.hosts[1].nat.is_none() {
        w.hosts[1] = Host::new(2, "203.0.113.6", None);
    }
    let t0 = w.now;
    for h in &mut w.hosts {
        h.client.start(t0);
    }
    w.flush();
    let target = w.hosts[1].peer_id();
    let mut connected_at = None;
    for _ in 0..200_000 {
        if w.hosts[0].client.is_registered()
            && w.hosts[1].client.is_registered()
            && w.hosts[0].punch.is_none()
            && connected_at.is_none()
        {
            connected_at = Some(w.now);
            let fresh = if w.hosts[0].nat_summary.mapping != Some(Behaviour::EndpointIndependent) {
                w.hosts[0].take_fresh()
            } else {
                None
            };
            let eph = Ephemeral::from_secret([50; 32]);
            let offer = make_offer(&w.hosts[0].id, 77, Role::Initiator, &eph);
            let now = w.now;
            w.hosts[0].client.connect(now, target, 77, offer, fresh);
            w.flush();
        }
        if w.hosts[0].outcome.is_some() && w.hosts[1].outcome.is_some() {
            break;
        }
        if !w.step(target) || w.now > t0 + Duration::from_secs(60) {
            break;
        }
    }
    let elapsed = w.now - connected_at.unwrap_or(t0);
    (
        w.hosts[0].outcome.clone(),
        w.hosts[1].outcome.clone(),
        elapsed,
    )
}

fn strategy(e: &Option<PunchEvent>) -> Option<Strategy> {
    match e {
        Some(PunchEvent::Connected { strategy, .. }) => Some(*strategy),
        _ => None,
    }
}

use Behaviour::*;

#[test]
fn cone_pairs_connect_by_cone() {
    let (a, b, t) = run(
        nat(
            "198.51.100.2",
            EndpointIndependent,
            AddressAndPortDependent,
            PortAllocation::Preserving,
            1,
        ),
        nat(
            "198.51.100.3",
            EndpointIndependent,
            AddressAndPortDependent,
            PortAllocation::Preserving,
            2,
        ),
    );
    assert_eq!(strategy(&a), Some(Strategy::Cone), "{a:?}");
    assert_eq!(strategy(&b), Some(Strategy::Cone), "{b:?}");
    // Floor: B learns at 2 hops + A↔B RTT of 4 hops... a few hops of slack.
    assert!(t < Duration::from_millis(250), "{t:?}");
}

#[test]
fn cone_and_sequential_symmetric_connect_by_prediction() {
    for (a, b) in [
        (
            nat(
                "198.51.100.2",
                EndpointIndependent,
                AddressAndPortDependent,
                PortAllocation::Preserving,
                1,
            ),
            nat(
                "198.51.100.3",
                AddressAndPortDependent,
                AddressAndPortDependent,
                PortAllocation::Sequential {
                    start: 20000,
                    delta: 2,
                },
                2,
            ),
        ),
        (
            nat(
                "198.51.100.2",
                AddressAndPortDependent,
                AddressAndPortDependent,
                PortAllocation::Sequential {
                    start: 20000,
                    delta: 1,
                },
                1,
            ),
            nat(
                "198.51.100.3",
                EndpointIndependent,
                AddressAndPortDependent,
                PortAllocation::Preserving,
                2,
            ),
        ),
    ] {
        let (ea, eb, _) = run(a, b);
        assert_eq!(strategy(&ea), Some(Strategy::Predict), "{ea:?}");
        assert_eq!(strategy(&eb), Some(Strategy::Predict), "{eb:?}");
    }
}

#[test]
fn two_sequential_symmetric_nats_connect_by_ttl_prediction() {
    for delta in [1, 2] {
        let (a, b, _) = run(
            nat(
                "198.51.100.2",
                AddressAndPortDependent,
                AddressAndPortDependent,
                PortAllocation::Sequential {
                    start: 20000,
                    delta,
                },
                1,
            ),
            nat(
                "198.51.100.3",
                AddressAndPortDependent,
                AddressAndPortDependent,
                PortAllocation::Sequential {
                    start: 30000,
                    delta,
                },
                2,
            ),
        );
        assert_eq!(strategy(&a), Some(Strategy::Ttl), "delta {delta}: {a:?}");
        assert_eq!(strategy(&b), Some(Strategy::Ttl), "delta {delta}: {b:?}");
    }
}

#[test]
fn port_restricted_and_random_symmetric_connect_by_birthday() {
    for (seed, initiator_is_easy) in [(1, true), (2, false), (3, true)] {
        let easy = nat(
            "198.51.100.2",
            EndpointIndependent,
            AddressAndPortDependent,
            PortAllocation::Preserving,
            seed,
        );
        let hard = nat(
            "198.51.100.3",
            AddressAndPortDependent,
            AddressAndPortDependent,
            PortAllocation::Random,
            seed + 100,
        );
        let (a, b, t) = if initiator_is_easy {
            run(easy, hard)
        } else {
            run(hard, easy)
        };
        assert_eq!(strategy(&a), Some(Strategy::Birthday), "{a:?}");
        assert_eq!(strategy(&b), Some(Strategy::Birthday), "{b:?}");
        assert!(t < Duration::from_secs(5), "{t:?}");
    }
}

#[test]
fn full_cone_and_random_symmetric_connect_by_cone() {
    let (a, b, _) = run(
        nat(
            "198.51.100.2",
            EndpointIndependent,
            EndpointIndependent,
            PortAllocation::Preserving,
            1,
        ),
        nat(
            "198.51.100.3",
            AddressAndPortDependent,
            AddressAndPortDependent,
            PortAllocation::Random,
            2,
        ),
    );
    assert_eq!(strategy(&a), Some(Strategy::Cone), "{a:?}");
    assert_eq!(strategy(&b), Some(Strategy::Cone), "{b:?}");
}

#[test]
fn two_random_symmetric_nats_fail_with_a_reason() {
    let (a, _, _) = run(
        nat(
            "198.51.100.2",
            AddressAndPortDependent,
            AddressAndPortDependent,
            PortAllocation::Random,
            1,
        ),
        nat(
            "198.51.100.3",
            AddressAndPortDependent,
            AddressAndPortDependent,
            PortAllocation::Random,
            2,
        ),
    );
    match a {
        Some(PunchEvent::Failed { reason }) => {
            assert!(reason.contains("no direct path possible"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn direct_hosts_connect() {
    let (a, b, _) = run(None, None);
    assert_eq!(strategy(&a), Some(Strategy::Cone), "{a:?}");
    assert_eq!(strategy(&b), Some(Strategy::Cone), "{b:?}");
}
