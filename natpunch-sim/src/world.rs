//! A whole deployment on a virtual clock: the rendezvous and STUN servers,
//! any number of [`Host`]s (the very coordinator the CLI runs), each on the
//! internet or behind a [`Nat`] (NATs may be shared), with a one-way delay
//! and seeded random loss on every access link.
//!
//! Each step jumps to the next wakeup (a datagram's arrival, a host's
//! timer, a scheduled fact), so a ten-second attempt runs in milliseconds.
//!
//! Topology: a host sits behind its NAT with no delay between them; the
//! NAT (or a host with a public address) reaches "the internet" over its
//! access link, which adds [`World::hop`] one way and drops with
//! [`World::loss`]. The servers sit on the internet with no access delay.
//! Limited-TTL packets: TTL 1 dies before the host's NAT, TTL 2 passes the
//! NAT (creating its mapping) and dies at the first router, more reaches
//! the destination.
//!
//! `NATPUNCH_SIM_TRACE=1` prints every datagram's fate (sent, lost on
//! which link, dropped or filtered by a NAT) with its virtual time.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use natpunch_proto::coordinator::{Host, HostConfig, HostEvent, Policy, RequestId, ServerMemo};
use natpunch_proto::identity::{Identity, PeerId};
use natpunch_proto::nat::{AllocationKind, Behaviour, Fact};
use natpunch_proto::portmap::{MapProtocol, Mapped};
use natpunch_proto::punch::PunchConfig;
use natpunch_proto::ratelimit::RateLimit;
use natpunch_proto::rendezvous::wire::is_rendezvous;
use natpunch_proto::rendezvous::RendezvousServer;
use natpunch_proto::stun::message::looks_like_stun;
use natpunch_proto::stun::server::{Server as StunServer, ServerConfig, Transport};
use natpunch_proto::{SocketId, Transmit};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::{Nat, NatConfig, Packet, PortAllocation};

/// The servers' address (rendezvous and STUN on one port, as deployed).
pub const SERVER: &str = "192.0.2.1:3478";

fn server() -> SocketAddr {
    SERVER.parse().expect("literal address")
}

/// How a host joins the world.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// The host's identity seed (hosts with one seed share a key).
    pub seed: u8,
    /// Which NAT (index into the world's NATs), or on the internet.
    pub nat: Option<usize>,
    pub policy: Policy,
    /// The NAT facts arrive this long after start, as discovery would
    /// report them (`None`: never; they stay pending).
    pub facts_after: Option<Duration>,
    /// The server's cookie and round trip, as an earlier process kept.
    pub server_memo: Option<ServerMemo>,
    /// Relay-first sessions (the server relays; the sim forwards the
    /// frames but has no QUIC, so only the events are checked).
    pub relay: bool,
    /// Its NAT maps the main socket's port for it (PCP, say), announced
    /// from the start; `Some(false)`: announced, but the gateway does not
    /// forward it (a broken port mapper).
    pub portmap: Option<bool>,
}

/// One host and what it did.
pub struct SimHost {
    pub host: Host,
    pub spec: HostSpec,
    pub ip: IpAddr,
    pub peer_id: PeerId,
    /// Local ports by socket.
    sockets: HashMap<SocketId, u16>,
    next_port: u16,
    /// When discovery reports the NAT facts.
    facts_at: Option<Instant>,
    /// Everything the host reported, with the time.
    pub events: Vec<(Instant, HostEvent)>,
    /// Remotes it learned paths for (receive side), and its routes.
    pub routes: HashMap<natpunch_proto::coordinator::RemoteKey, natpunch_proto::punch::Path>,
    pub alive: bool,
    /// Datagrams it sent to the servers.
    pub to_server: u64,
}

/// A datagram in flight: (arrival, tie-break, src, dst, payload).
type InFlight = (Instant, u64, SocketAddr, SocketAddr, Vec<u8>);

/// The world; see the module documentation.
pub struct World {
    pub start: Instant,
    pub now: Instant,
    pub server: RendezvousServer,
    pub stun: StunServer,
    /// The servers answer (a restart is a down period and a new server).
    pub server_up: bool,
    pub nats: Vec<Nat>,
    pub hosts: Vec<SimHost>,
    /// One-way delay of every access link.
    pub hop: Duration,
    /// Drop probability on every access link crossing.
    pub loss: f64,
    rng: StdRng,
    queue: BinaryHeap<Reverse<InFlight>>,
    counter: u64,
    next_ip: u8,
    /// Datagrams dropped by loss.
    pub lost: u64,
    /// Print every datagram's fate on stderr (`NATPUNCH_SIM_TRACE=1`).
    pub trace: bool,
}

impl World {
    /// An empty world with `hop` one-way delay per access link and `loss`.
    pub fn new(hop: Duration, loss: f64, seed: u64) -> Self {
        let now = Instant::now();
        Self {
            start: now,
            now,
            server: RendezvousServer::new([3; 32]),
            stun: StunServer::new(ServerConfig {
                primary: server(),
                alternate: None,
                software: None,
                rate_limit: RateLimit::unlimited(),
            }),
            server_up: true,
            nats: Vec::new(),
            hosts: Vec::new(),
            hop,
            loss,
            rng: StdRng::seed_from_u64(seed),
            queue: BinaryHeap::new(),
            counter: 0,
            next_ip: 2,
            lost: 0,
            trace: std::env::var_os("NATPUNCH_SIM_TRACE").is_some(),
        }
    }

    /// One datagram's fate, for `NATPUNCH_SIM_TRACE`.
    fn log(&self, src: SocketAddr, dst: SocketAddr, payload: &[u8], fate: &str) {
        if !self.trace {
            return;
        }
        let what = if is_rendezvous(payload) {
            "rendezvous".to_string()
        } else if looks_like_stun(payload) {
            "stun".to_string()
        } else {
            match natpunch_proto::punch::wire::decode(payload) {
                Ok(f) => format!("punch {:?} {:?} seq {}", f.kind, f.strategy, f.seq),
                Err(_) => format!("{} bytes", payload.len()),
            }
        };
        eprintln!(
            "{:>8.1} ms  {src} -> {dst}  {what}: {fate}",
            self.elapsed().as_secs_f64() * 1000.0
        );
    }

    /// Adds a NAT with public address `198.51.100.<n>`; its index.
    pub fn add_nat(
        &mut self,
        mapping: Behaviour,
        filtering: Behaviour,
        allocation: PortAllocation,
        seed: u64,
    ) -> usize {
        let n = self.nats.len();
        self.nats.push(Nat::new(NatConfig {
            public_ip: format!("198.51.100.{}", n + 2).parse().expect("literal"),
            mapping,
            filtering,
            allocation,
            hairpin: true,
            seed,
        }));
        n
    }

    /// Adds a host and starts it; its index.
    pub fn add_host(&mut self, spec: HostSpec) -> usize {
        let i = self.hosts.len();
        let octet = self.next_ip;
        self.next_ip = self.next_ip.wrapping_add(1);
        let ip: IpAddr = match spec.nat {
            Some(n) => format!("10.0.{n}.{octet}"),
            None => format!("203.0.113.{octet}"),
        }
        .parse()
        .expect("literal");
        let identity = Identity::from_seed([spec.seed; 32]);
        let peer_id = identity.peer_id();
        let local = SocketAddr::new(ip, 40000);
        let host = Host::new(HostConfig {
            identity,
            instance: 1000 + i as u64,
            server: server(),
            stun: server(),
            local,
            policy: spec.policy.clone(),
            punch: PunchConfig::new(i as u64),
            ttl: None,
            seed: 77 + i as u64,
            server_memo: spec.server_memo,
            relay: spec.relay,
            portmap: spec.portmap.is_some(),
            tcp: natpunch_proto::coordinator::TcpMode::Off,
            turn: 0,
        });
        let facts_at = spec.facts_after.map(|after| self.now + after);
        let mut sockets = HashMap::new();
        sockets.insert(SocketId(0), 40000);
        self.hosts.push(SimHost {
            host,
            spec,
            ip,
            peer_id,
            sockets,
            next_port: 40001,
            facts_at,
            events: Vec::new(),
            routes: HashMap::new(),
            alive: true,
            to_server: 0,
        });
        let now = self.now;
        if let (Some(works), Some(n)) = (self.hosts[i].spec.portmap, self.hosts[i].spec.nat) {
            let addr = if works {
                self.nats[n].map_port(local)
            } else {
                SocketAddr::new(self.nats[n].public_ip(), 9)
            };
            let mapped = Mapped {
                addr,
                protocol: MapProtocol::Pcp,
            };
            self.hosts[i].host.set_portmap(now, Some(mapped));
        }
        self.apply_facts(i);
        self.hosts[i].host.start(now);
        self.drain(i);
        i
    }

    /// What discovery would report behind NAT `nat` (or on the internet).
    fn facts_for(&mut self, nat: Option<usize>, ip: IpAddr) -> Vec<Fact> {
        let Some(n) = nat else {
            return vec![
                Fact::Mapping {
                    nat: Some(false),
                    mapping: Some(Behaviour::EndpointIndependent),
                    allocation: Some(AllocationKind::Preserving),
                    delta: None,
                    latest: None,
                    rtt: Some(self.hop * 2),
                },
                Fact::Filtering {
                    filtering: Some(Behaviour::EndpointIndependent),
                },
                Fact::OpenerTtl { ttl: None },
            ];
        };
        let c = *self.nats[n].config();
        // Discovery's newest mapping: made just now, from a socket of ours.
        let latest = self.nats[n]
            .outbound(Packet {
                src: SocketAddr::new(ip, 39999),
                dst: "192.0.2.2:3478".parse().expect("literal"),
                payload: Vec::new(),
            })
            .map(|p| p.src);
        vec![
            Fact::Mapping {
                nat: Some(true),
                mapping: Some(c.mapping),
                allocation: Some(match c.allocation {
                    PortAllocation::Preserving => AllocationKind::Preserving,
                    PortAllocation::Sequential { .. } => AllocationKind::Sequential,
                    PortAllocation::Random => AllocationKind::Random,
                }),
                delta: match c.allocation {
                    PortAllocation::Sequential { delta, .. } => Some(delta),
                    _ => None,
                },
                latest,
                rtt: Some(self.hop * 2),
            },
            Fact::Filtering {
                filtering: Some(c.filtering),
            },
            Fact::OpenerTtl { ttl: Some(2) },
        ]
    }

    /// Reports discovery's facts when they are due. Its newest mapping
    /// is made right then (its last test, as real discovery's tests II and
    /// III come last).
    fn apply_facts(&mut self, h: usize) {
        let now = self.now;
        if self.hosts[h].facts_at.is_none_or(|t| t > now) {
            return;
        }
        self.hosts[h].facts_at = None;
        let (nat, ip) = (self.hosts[h].spec.nat, self.hosts[h].ip);
        for f in self.facts_for(nat, ip) {
            self.hosts[h].host.handle_fact(now, f);
        }
    }

    /// A user's connect from host `h` to host `to`.
    pub fn connect(&mut self, h: usize, to: PeerId, request: RequestId) {
        let now = self.now;
        self.hosts[h].host.connect(now, to, request);
        self.drain(h);
    }

    /// Carries out host `h`'s events and sends its datagrams.
    pub fn drain(&mut self, h: usize) {
        let now = self.now;
        while let Some(ev) = self.hosts[h].host.poll_event() {
            let host = &mut self.hosts[h];
            match &ev {
                HostEvent::OpenSocket { id } => {
                    let port = host.next_port;
                    host.next_port = host.next_port.wrapping_add(1).max(1024);
                    host.sockets.insert(*id, port);
                }
                HostEvent::CloseSocket { id } => {
                    host.sockets.remove(id);
                }
                HostEvent::Route { remote, path } | HostEvent::Learn { remote, path } => {
                    host.routes.insert(*remote, *path);
                }
                _ => {}
            }
            host.events.push((now, ev));
        }
        while let Some(t) = self.hosts[h].host.poll_transmit() {
            self.send_from(h, t);
        }
    }

    fn lose(&mut self) -> bool {
        if self.loss > 0.0 && self.rng.random::<f64>() < self.loss {
            self.lost += 1;
            true
        } else {
            false
        }
    }

    fn send_from(&mut self, h: usize, t: Transmit) {
        if !self.hosts[h].alive {
            return;
        }
        let Some(port) = self.hosts[h].sockets.get(&t.socket).copied() else {
            return;
        };
        if t.destination == server() {
            self.hosts[h].to_server += 1;
        }
        let mut pkt = Packet {
            src: SocketAddr::new(self.hosts[h].ip, port),
            dst: t.destination,
            payload: t.payload,
        };
        if t.ttl == Some(1) {
            self.log(pkt.src, pkt.dst, &pkt.payload, "TTL 1, dies before the NAT");
            return;
        }
        if let Some(n) = self.hosts[h].spec.nat {
            let hairpin = pkt.dst.ip() == self.nats[n].public_ip();
            let (src, dst) = (pkt.src, pkt.dst);
            match self.nats[n].outbound(pkt) {
                Some(p) => pkt = p,
                None => {
                    self.log(src, dst, &[], "dropped by the NAT");
                    return;
                }
            }
            if hairpin {
                // Turned back inside by the NAT, destination rewritten.
                self.push(Duration::ZERO, pkt);
                return;
            }
            if t.ttl == Some(2) {
                // The mapping exists now; the packet dies at the router.
                return;
            }
        } else if t.ttl == Some(2) {
            return;
        }
        if self.lose() {
            self.log(pkt.src, pkt.dst, &pkt.payload, "lost on the sender's link");
            return;
        }
        let delay = if pkt.dst == server() {
            self.hop
        } else {
            // Our access link, then the receiver's.
            if self.lose() {
                self.log(
                    pkt.src,
                    pkt.dst,
                    &pkt.payload,
                    "lost on the receiver's link",
                );
                return;
            }
            self.hop * 2
        };
        self.log(pkt.src, pkt.dst, &pkt.payload, "sent");
        self.push(delay, pkt);
    }

    fn push(&mut self, delay: Duration, p: Packet) {
        self.counter += 1;
        self.queue.push(Reverse((
            self.now + delay,
            self.counter,
            p.src,
            p.dst,
            p.payload,
        )));
    }

    /// A datagram arrives at `dst`.
    fn arrive(&mut self, src: SocketAddr, dst: SocketAddr, payload: Vec<u8>) {
        let now = self.now;
        if let Some(h) = self
            .hosts
            .iter()
            .position(|x| x.ip == dst.ip() && x.spec.nat.is_some())
        {
            // Hairpinned: already translated to the inside address.
            return self.deliver(h, src, dst, payload);
        }
        if dst == server() {
            if !self.server_up {
                return;
            }
            if is_rendezvous(&payload) || natpunch_proto::relay::is_relay(&payload) {
                if is_rendezvous(&payload) {
                    self.server.handle(now, server(), src, &payload);
                } else {
                    self.server.handle_relay(now, src, &payload);
                }
                while let Some(o) = self.server.poll_transmit() {
                    self.send_from_server(o.to, o.payload);
                }
            } else if looks_like_stun(&payload) {
                let mut out = Vec::new();
                if let Some(r) =
                    self.stun
                        .handle(now, Transport::Udp, server(), src, &payload, &mut out)
                {
                    self.send_from_server(r.to, out);
                }
            }
            return;
        }
        // Through a NAT with that public address, or straight to a host.
        let trace = self.trace.then(|| payload.clone());
        let inside = match self.nats.iter_mut().find(|n| n.public_ip() == dst.ip()) {
            Some(n) => match n.inbound(Packet { src, dst, payload }) {
                Some(p) => p,
                None => {
                    if let Some(p) = trace {
                        self.log(src, dst, &p, "filtered by the NAT");
                    }
                    return;
                }
            },
            None => Packet { src, dst, payload },
        };
        let Some(h) = self.hosts.iter().position(|x| x.ip == inside.dst.ip()) else {
            return;
        };
        self.deliver(h, inside.src, inside.dst, inside.payload);
    }

    fn deliver(&mut self, h: usize, src: SocketAddr, dst: SocketAddr, payload: Vec<u8>) {
        if !self.hosts[h].alive {
            return;
        }
        let Some(socket) = self.hosts[h]
            .sockets
            .iter()
            .find(|(_, p)| **p == dst.port())
            .map(|(s, _)| *s)
        else {
            return;
        };
        let now = self.now;
        self.hosts[h]
            .host
            .handle_datagram(now, socket, src, &payload);
        self.drain(h);
    }

    fn send_from_server(&mut self, to: SocketAddr, payload: Vec<u8>) {
        if self.lose() {
            self.log(server(), to, &payload, "lost");
            return;
        }
        self.log(server(), to, &payload, "sent");
        self.push(
            self.hop,
            Packet {
                src: server(),
                dst: to,
                payload,
            },
        );
    }

    fn next_wake(&self) -> Option<Instant> {
        let mut t = self.queue.peek().map(|Reverse(x)| x.0);
        for h in self.hosts.iter().filter(|h| h.alive) {
            let timers = h.host.poll_timeout().into_iter().chain(h.facts_at);
            for x in timers {
                t = Some(t.map_or(x, |y| y.min(x)));
            }
        }
        t
    }

    /// One step to the next wakeup; `false` when nothing is left to do.
    pub fn step(&mut self) -> bool {
        let Some(t) = self.next_wake() else {
            return false;
        };
        self.now = self.now.max(t);
        let now = self.now;
        while self.queue.peek().is_some_and(|Reverse(x)| x.0 <= now) {
            let Some(Reverse((_, _, src, dst, payload))) = self.queue.pop() else {
                break;
            };
            self.arrive(src, dst, payload);
        }
        for h in 0..self.hosts.len() {
            if !self.hosts[h].alive {
                continue;
            }
            self.apply_facts(h);
            self.hosts[h].host.handle_timeout(now);
            self.drain(h);
        }
        true
    }

    /// Steps until `done` holds or `limit` of virtual time passed; whether
    /// `done` held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&World) -> bool) -> bool {
        let end = self.now + limit;
        for _ in 0..2_000_000 {
            if done(self) {
                return true;
            }
            if self.now > end || !self.step() {
                return done(self);
            }
        }
        done(self)
    }

    /// Virtual time since the world began.
    pub fn elapsed(&self) -> Duration {
        self.now.saturating_duration_since(self.start)
    }

    /// The first event of host `h` matching `f`, with its time.
    pub fn find<T>(&self, h: usize, f: impl Fn(&HostEvent) -> Option<T>) -> Option<(Instant, T)> {
        self.hosts[h]
            .events
            .iter()
            .find_map(|(t, e)| f(e).map(|x| (*t, x)))
    }

    /// A new rendezvous server (a restart: the old one's state is gone).
    pub fn restart_server(&mut self) {
        self.server = RendezvousServer::new([9; 32]);
    }

    /// Stops host `h` abruptly (a crash: nothing more is sent).
    pub fn kill(&mut self, h: usize) {
        self.hosts[h].alive = false;
    }

    /// Stops host `h` cleanly (it unregisters).
    pub fn close(&mut self, h: usize) {
        let now = self.now;
        self.hosts[h].host.close(now);
        self.drain(h);
        self.hosts[h].alive = false;
    }

    /// The distinct peers host `h` reached (Connected events).
    pub fn connected_to(&self, h: usize) -> HashSet<PeerId> {
        self.hosts[h]
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                HostEvent::Connected { remote, .. } => Some(remote.peer),
                _ => None,
            })
            .collect()
    }
}
