//! The connection core, sans-IO: one [`Host`] per endpoint, with one
//! state per remote peer.
//!
//! The host owns the rendezvous client (registration, heartbeats,
//! introductions), our NAT facts as they arrive ([`Host::handle_fact`]),
//! every punch attempt, and per remote peer ([`RemoteKey`]) the path its
//! traffic takes. Attempts to and from different peers run side by side;
//! the bounds are global ([`defaults`]): attempts at once, sockets, and a
//! token bucket for all probes. Behind a symmetric NAT, attempts take
//! turns between their fresh mapping and their first probes, so that each
//! one's prediction sees the ports it expects.
//!
//! The driver feeds datagrams, time, facts, user connects and what the
//! session layer sees (a session up or down, a stalled path, a peer's
//! packets from a new address), and carries out the [`HostEvent`]s: open
//! and close sockets, map paths to remotes ([`HostEvent::Learn`],
//! [`HostEvent::Route`]), start QUIC when a connect has its path.
//!
//! A connect does not wait for NAT discovery: it goes out with whatever
//! facts are known (pending ones marked), and later facts follow as
//! updates, through the server, to both punch machines.

pub mod error;
mod remote;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

pub use error::ConnectError;
pub use remote::RemoteKey;
use remote::{Remote, Validator};

use crate::identity::{Ephemeral, Identity, PeerId};
use crate::nat::discovery::Fact;
use crate::nat::Behaviour;
use crate::portmap::{check_external, Mapped};
use crate::punch::tcp::TcpPlan;
use crate::punch::{make_offer, Path, Punch, PunchConfig, PunchEvent, Role, SideView, Strategy};
use crate::rendezvous::wire::{
    Cookie, DeclineReason, ErrorCode, NatSummary as PeerNat, Offer, PartyState, Pending, TcpInfo,
};
use crate::rendezvous::{ClientEvent, NatSummary, PeerInfo, RendezvousClient};
use crate::stun::message::{looks_like_stun, Message, TransactionId};
use crate::stun::transaction::{Client as StunClient, Outcome, Timing};
use crate::{SocketId, Transmit};

/// Limits and timings, each with its reason.
pub mod defaults {
    use std::time::Duration;

    /// Attempts under way at once, both roles: more connects wait in a
    /// queue, more introductions are declined as busy. Each costs a punch
    /// machine and ~10–200 probes/s, bounded again by the probe bucket.
    pub const MAX_ATTEMPTS: usize = 128;
    /// Attempts with one remote at once (a connect and a re-punch).
    pub const MAX_ATTEMPTS_PER_PEER: usize = 2;
    /// Extra sockets open at once (birthday's mappings, fresh mappings):
    /// one birthday hard side (256) with room to spare, well below the
    /// usual limit of 1024 file descriptors.
    pub const SOCKET_BUDGET: usize = 320;
    /// Punch probes per second over all attempts, and the burst: a
    /// birthday spray (2000/s) plus dozens of cone and prediction attempts,
    /// ~5 Mbit/s at most, so 100 peers at once cannot flood an uplink.
    pub const PROBE_RATE: f64 = 5000.0;
    pub const PROBE_BURST: f64 = 500.0;
    /// Probes waiting for the bucket at most; beyond, the oldest is
    /// dropped (probes repeat every round anyway).
    pub const PROBE_QUEUE: usize = 8192;
    /// The side that introduced itself punches again this long after a
    /// stall, so the other side's registration refresh reaches the
    /// server first.
    pub const REPUNCH_DELAY: Duration = Duration::from_millis(800);
    /// At most one re-punch per remote this often (an attempt and its
    /// round trips fit in it).
    pub const REPUNCH_EVERY: Duration = Duration::from_secs(4);
    /// A remote with no session and no attempt is forgotten after this.
    pub const REMOTE_LINGER: Duration = Duration::from_secs(30);
    /// When the server's introduction budget for the target is spent and
    /// it says the next one is possible within this long, wait and retry.
    pub const MAX_LIMIT_WAIT: Duration = Duration::from_secs(3);
    /// Behind a symmetric NAT, attempts take turns from their fresh
    /// mapping until this long after their coordinated start, when their
    /// first new mappings exist (the openers' lead is 20 ms).
    pub const ALLOC_HOLD: Duration = Duration::from_millis(60);
    /// A turn is never held longer than this (the other side vanished).
    pub const ALLOC_MAX: Duration = Duration::from_secs(3);
    /// A fresh mapping's Binding: 4 sends 100 ms apart, doubling.
    pub const FRESH_TIMING_RTO: Duration = Duration::from_millis(100);
    /// ... with a second copy 10 ms after the first: the fresh mapping
    /// gates a symmetric side's start, and one lost datagram should not
    /// cost an RTO.
    pub const FRESH_HEDGE: Duration = Duration::from_millis(10);
    /// A relayed session whose punch failed (or whose direct path died
    /// and could not be punched again) tries direct again this long after:
    /// NATs and firewalls change (a mapping ages out, a rule is lifted),
    /// and an attempt costs about a hundred probes.
    pub const DIRECT_RETRY: Duration = Duration::from_secs(30);
    /// When punching fails before the target accepted (the facts ruled a
    /// direct path out at once), the relay waits this long for the
    /// acceptance before the connect fails: the target's Accept comes one
    /// round trip after its introduction, or a symmetric target's fresh
    /// mapping later.
    pub const RELAY_WAIT: Duration = Duration::from_secs(5);
    /// Where UDP may still work, a TCP punch joins an attempt that has
    /// not connected this long after its start: UDP connects cones and
    /// predictable NATs within a few round trips, so TCP's SYNs (and the
    /// session's move onto a stream, with its head-of-line blocking) are
    /// spent only where UDP is slow or failing.
    pub const TCP_GRACE: Duration = Duration::from_secs(2);
    /// A TCP punch gives up this long before its attempt's deadline, so
    /// that its connects' errors (refused, unreachable) are the attempt's
    /// reason instead of a bare timeout: the driver's report reaches the
    /// coordinator in-process, in well under a millisecond.
    pub const TCP_REPORT_MARGIN: Duration = Duration::from_millis(200);
    /// TCP's limited-TTL openers only where the server is at least this
    /// far: a router's ICMP "time exceeded" aborts the opener's socket
    /// within one round trip to it, and the real SYN follows 2.5–5 ms
    /// after the opener; on a shorter path the peer's SYN can land in
    /// that gap, where only the listener answers it, and a NAT built on
    /// Linux conntrack drops that answer (its sequence number is not the
    /// opener's). Measured in the lab: with openers, 0 of 10 cone pairs
    /// at 0 ms of delay and 10 of 10 at 10 ms; without, 10 of 10 at 0 ms.
    pub const TCP_OPENER_MIN_RTT: Duration = Duration::from_millis(4);
    /// A stream the driver punched or accepted, never claimed by an
    /// attempt's frames within this long, is closed.
    pub const TCP_UNCLAIMED: Duration = Duration::from_secs(15);
    /// Unclaimed streams kept at most; beyond, the oldest is closed (a
    /// scanner connecting to the punching port holds no more than this).
    pub const MAX_UNCLAIMED: usize = 64;
}

/// When TCP is punched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcpMode {
    /// Never (no TCP facts are announced).
    #[default]
    Off,
    /// Beside UDP: at once where UDP is blocked on either side, else
    /// after [`defaults::TCP_GRACE`] while UDP has found nothing.
    Fallback,
    /// Direct paths are TCP only (`--tcp`).
    Only,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TcpStage {
    Idle,
    Running,
    Over,
}

/// A relay path: the rendezvous server's channel between us and a remote
/// ([`crate::relay`]), always from our main socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RelayPath {
    pub server: SocketAddr,
    pub channel: u64,
}

/// Where a remote's traffic goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Direct(Path),
    Relay(RelayPath),
    /// Through a TURN server: from our allocation's socket to the peer,
    /// or from our main socket to the peer's relayed address.
    Turn(Path),
}

/// Names a user's connect, so its answer finds its way back.
pub type RequestId = u64;

/// Who may start a session with us.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// We accept sessions at all (a listener: we register).
    pub accept: bool,
    /// If set, only these peers may.
    pub allow: Option<HashSet<PeerId>>,
}

/// Settings of a [`Host`].
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub identity: Identity,
    /// This process, among others with the same key.
    pub instance: u64,
    /// The rendezvous server.
    pub server: SocketAddr,
    /// Where fresh mappings are taken (a STUN server; usually the same).
    pub stun: SocketAddr,
    /// The main socket's local address (our LAN candidate).
    pub local: SocketAddr,
    pub policy: Policy,
    pub punch: PunchConfig,
    /// The limited TTL, when set by hand (`-t`).
    pub ttl: Option<u8>,
    /// Seed for session numbers and ephemeral keys (a test replays a run).
    pub seed: u64,
    /// What an earlier process on this network learned of the server.
    pub server_memo: Option<ServerMemo>,
    /// Start sessions on the server's relay at once, and move them to a
    /// direct path when punching finds one (off for punch-only runs).
    pub relay: bool,
    /// A port mapper runs beside us and reports with
    /// [`Host::set_portmap`]; until it does, peers hear that a mapping
    /// may be on its way.
    pub portmap: bool,
    /// When TCP is punched; our TCP facts come with [`Host::set_tcp`].
    pub tcp: TcpMode,
    /// TURN allocations the driver is making; their relayed addresses
    /// come with [`Host::set_turn`], and until then peers hear that they
    /// are on their way.
    pub turn: usize,
}

/// The rendezvous server's address cookie and round trip, as an earlier
/// process kept them ([`HostEvent::ServerCookie`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerMemo {
    pub cookie: Cookie,
    /// How old the cookie is now.
    pub age: Duration,
    pub rtt: Duration,
}

/// What the driver must do, and what the user may want to know.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostEvent {
    /// Bind a new UDP socket (same local IP as the main one) as `id`,
    /// before sending anything on it.
    OpenSocket {
        id: SocketId,
    },
    CloseSocket {
        id: SocketId,
    },
    /// Datagrams arriving on `path` come from `remote`.
    Learn {
        remote: RemoteKey,
        path: Path,
    },
    /// Send `remote`'s traffic on `path` from now on.
    Route {
        remote: RemoteKey,
        path: Path,
    },
    /// `remote` can be reached through `relay`: its frames arriving there
    /// are `remote`'s, and its traffic goes there while no direct path is
    /// confirmed.
    RelayRoute {
        remote: RemoteKey,
        relay: RelayPath,
    },
    /// The direct path died: send `remote`'s traffic on its relay.
    UseRelay {
        remote: RemoteKey,
    },
    /// A peer we punch with may send from these IPs: each TURN allocation
    /// lets them in (RFC 8656 §9: permissions are per IP address).
    TurnPermit {
        ips: Vec<std::net::IpAddr>,
    },
    /// A new address cookie from the rendezvous server: keep it (with the
    /// round trip) for the next process on this network.
    ServerCookie {
        cookie: Cookie,
        rtt: Option<Duration>,
    },
    /// `remote` is gone: drop its route.
    Forget {
        remote: RemoteKey,
    },
    /// A path to `remote` is up. With a `request`, start the session for
    /// the user who asked; without, we are the responder (the peer starts
    /// it) or it repaired a path. Relay-first, the first path is the relay
    /// (`strategy` [`Strategy::Relay`], `path` the server); a direct path
    /// found later is a [`HostEvent::PathChanged`].
    Connected {
        request: Option<RequestId>,
        remote: RemoteKey,
        path: Path,
        strategy: Strategy,
        role: Role,
        /// From the connect (or the introduction) to the confirmed path.
        elapsed: Duration,
        probes_sent: u64,
        bytes_sent: u64,
        /// An existing path was used: no punching at all.
        reused: bool,
    },
    ConnectFailed {
        request: RequestId,
        peer: PeerId,
        error: ConnectError,
    },
    /// A listener is registered (first time, or again).
    Registered {
        observed: SocketAddr,
    },
    ServerLost {
        server: SocketAddr,
    },
    ServerBack {
        server: SocketAddr,
    },
    /// Another process with our key took over our registration.
    Displaced,
    /// The server refused our registration (it serves members only).
    ServerRefused {
        code: ErrorCode,
    },
    /// A peer asks to connect and we take it.
    Incoming {
        peer: PeerId,
    },
    /// We turned a peer's introduction down.
    Refused {
        peer: PeerId,
        reason: DeclineReason,
    },
    /// A punching technique started.
    Attempt {
        peer: PeerId,
        strategy: Strategy,
    },
    /// An attempt we did not start (or a repair) failed.
    AttemptFailed {
        peer: PeerId,
        error: ConnectError,
    },
    /// A live remote's traffic moved to another path.
    PathChanged {
        remote: RemoteKey,
        from: Option<Via>,
        to: Via,
        /// The technique that punched the new path, when one did, and how
        /// long its attempt took.
        strategy: Option<Strategy>,
        elapsed: Option<Duration>,
    },
    /// Punching for a relayed remote failed: it stays on the relay (and
    /// tries direct again later unless the NATs rule it out).
    DirectFailed {
        remote: RemoteKey,
        error: ConnectError,
    },
    /// Punch TCP for attempt `session`: from our TCP punching port, SYNs
    /// to `plan`'s targets from `at` on (openers first when it says so),
    /// listening on the port too; each stream that comes up is reported
    /// with [`Host::tcp_stream`], and the end of trying with
    /// [`Host::tcp_over`].
    TcpPunch {
        session: u64,
        plan: TcpPlan,
        at: Instant,
        /// Give up by then (just before the attempt's own deadline) and
        /// report why.
        until: Instant,
    },
    /// Measure the TCP punching port's mapping again ([`Host::set_tcp`]
    /// takes the answer): a NAT that maps TCP per destination moved on
    /// since the last measurement, and a punch predicts from it.
    MeasureTcp,
    /// Stop punching TCP for `session` (its streams that carry nothing are
    /// closed by [`HostEvent::CloseSocket`]).
    TcpStop {
        session: u64,
    },
    /// A re-punch after a stall found a path (maybe the same one: the
    /// NATs' mappings are made again).
    PathRepaired {
        remote: RemoteKey,
        path: Path,
        strategy: Strategy,
    },
    /// A session's path stopped answering; punching again.
    Stalled {
        remote: RemoteKey,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Behind a symmetric NAT: waiting for our turn to take a fresh mapping.
    WaitTurn,
    /// Taking a fresh mapping before our Connect or Accept.
    Fresh,
    /// Connect sent, waiting for the server's introduction.
    Introducing,
    /// The punch machine runs.
    Punching,
}

/// One attempt (one introduction), either role.
#[derive(Debug)]
struct Attempt {
    peer: PeerId,
    role: Role,
    request: Option<RequestId>,
    /// A re-punch of this remote's path.
    repair: Option<RemoteKey>,
    remote: Option<RemoteKey>,
    eph: Option<Ephemeral>,
    offer: Offer,
    punch: Option<Punch>,
    /// Our fresh mapping for this attempt.
    fresh: Option<SocketAddr>,
    phase: Phase,
    /// The punch's socket indices → ours (index 0: the main socket).
    sockets: Vec<SocketId>,
    started: Instant,
    /// The responder's introduction, kept until its Accept goes out.
    incoming: Option<IncomingIntro>,
    /// It holds the symmetric-NAT turn until then.
    turn_until: Option<Instant>,
    /// Its session started on the relay: a punched path moves it, a
    /// failure leaves it there.
    relayed: bool,
    /// The server relays this session (it starts there once the target
    /// has accepted).
    relay_offered: bool,
    /// The relay node's address, if it is not the server itself.
    relay_at: Option<SocketAddr>,
    /// The server's relay channel for this session is in place (the
    /// target accepted).
    channel_ready: bool,
    /// Punching failed before the relay could start: reported once it has
    /// (or at the instant, if the target has not accepted by then).
    deferred: Option<(ConnectError, Instant)>,
    /// The peer's TCP port and facts, and its host candidates.
    peer_tcp: Option<TcpInfo>,
    peer_nat: PeerNat,
    peer_lan: Vec<SocketAddr>,
    tcp: TcpStage,
    /// A TCP stream joined the attempt (its probes decide now).
    tcp_claimed: bool,
    /// Our Connect (or Accept) carried our TCP facts.
    tcp_told: bool,
    /// Both sides' TCP facts came with the introduction, and neither NAT
    /// maps TCP per destination (such a side measures again before its
    /// Connect or Accept): the TCP punch starts at the introduction's
    /// start. Otherwise at the server's go, which comes with the Accept,
    /// so both sides have both sides' facts by then.
    tcp_intro: bool,
    /// When the TCP punch is due (fallback mode).
    tcp_at: Option<Instant>,
}

#[derive(Debug, Clone)]
struct IncomingIntro {
    observed: SocketAddr,
    info: PeerInfo,
    offer: Offer,
    fresh: Option<SocketAddr>,
    start_at: Instant,
}

/// A token bucket for probes, with its queue.
#[derive(Debug)]
struct Pacer {
    tokens: f64,
    last: Option<Instant>,
    queue: VecDeque<Transmit>,
    dropped: u64,
}

impl Pacer {
    fn refill(&mut self, now: Instant) {
        let elapsed = self
            .last
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        self.tokens = (self.tokens + elapsed * defaults::PROBE_RATE).min(defaults::PROBE_BURST);
        self.last = Some(now);
    }

    fn next_token(&self, now: Instant) -> Option<Instant> {
        if self.queue.is_empty() {
            return None;
        }
        let missing = (1.0 - self.tokens).max(0.0);
        Some(now + Duration::from_secs_f64(missing / defaults::PROBE_RATE))
    }
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostStats {
    pub attempts: u64,
    pub connected: u64,
    pub failed: u64,
    pub declined: u64,
    pub probes_dropped: u64,
    /// Punch frames for no known attempt.
    pub stray_punch: u64,
}

/// The coordinator; see the module documentation.
pub struct Host {
    cfg: HostConfig,
    rng: StdRng,
    client: RendezvousClient,
    stun: StunClient,
    nat: NatSummary,
    /// The newest mapping the NAT made for us in discovery: the fresh
    /// mapping of attempts that started before our facts were known.
    latest: Option<SocketAddr>,
    /// The port our gateway maps to the main socket, as the driver's
    /// port mapper reports it.
    mapped: Option<Mapped>,
    /// What peers were last told of it ([`Host::announced`]).
    last_announced: Option<Mapped>,
    attempts: HashMap<u64, Attempt>,
    remotes: HashMap<RemoteKey, Remote>,
    /// Connects waiting for capacity.
    queue: VecDeque<(PeerId, RequestId, Instant)>,
    /// Connects to retry when the server's introduction limit allows.
    retries: Vec<(Instant, PeerId, RequestId, Instant)>,
    /// Fresh-mapping transactions: which attempt, on which socket.
    fresh: HashMap<TransactionId, (u64, SocketId)>,
    /// Behind a symmetric NAT, the attempt whose turn it is.
    turn: Option<u64>,
    turn_queue: VecDeque<u64>,
    next_socket: usize,
    open_sockets: HashSet<SocketId>,
    pacer: Pacer,
    out: VecDeque<Transmit>,
    events: VecDeque<HostEvent>,
    stats: HostStats,
    closing: bool,
    /// The server is reached over TCP: no UDP gets through here.
    udp_blocked: bool,
    /// The server refused our registration (not a member), and we said so.
    refused: bool,
    /// Our TCP punching port's facts, once discovered.
    tcp: Option<TcpInfo>,
    /// Connects (`--tcp`) waiting for our TCP facts.
    tcp_waiting: Vec<(PeerId, Option<RequestId>, Option<RemoteKey>, Instant)>,
    /// Responders (`--tcp`) whose Accept waits for our TCP facts.
    tcp_accepting: Vec<(u64, Option<SocketAddr>)>,
    /// A punch used our TCP facts and our NAT maps TCP per destination:
    /// the next attempt measures again first.
    tcp_stale: bool,
    /// Streams the driver has up that no attempt claimed yet, and since
    /// when (an accepted stream is claimed by the first punch frame on it).
    streams: HashMap<SocketId, (SocketAddr, Instant)>,
    /// Our TURN allocations: the driver's socket for each, and the address
    /// the server relays to us.
    allocations: Vec<(SocketId, SocketAddr)>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("attempts", &self.attempts.len())
            .field("remotes", &self.remotes.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Host {
    /// A host; call [`Host::start`] to begin registering.
    pub fn new(cfg: HostConfig) -> Self {
        let mut nat = NatSummary::measuring();
        nat.pending.portmap = cfg.portmap;
        nat.pending.tcp = cfg.tcp != TcpMode::Off;
        nat.pending.turn = cfg.turn > 0;
        let info = PeerInfo {
            nat,
            candidates: vec![cfg.local],
            mapped: None,
            tcp: None,
            turn: Vec::new(),
        };
        let client = RendezvousClient::new(
            cfg.identity.clone(),
            cfg.instance,
            cfg.server,
            SocketId(0),
            cfg.policy.accept,
            info,
        );
        Self {
            rng: StdRng::seed_from_u64(cfg.seed),
            client,
            stun: StunClient::new(),
            nat,
            latest: None,
            mapped: None,
            last_announced: None,
            attempts: HashMap::new(),
            remotes: HashMap::new(),
            queue: VecDeque::new(),
            retries: Vec::new(),
            fresh: HashMap::new(),
            turn: None,
            turn_queue: VecDeque::new(),
            next_socket: 1,
            open_sockets: HashSet::new(),
            pacer: Pacer {
                tokens: defaults::PROBE_BURST,
                last: None,
                queue: VecDeque::new(),
                dropped: 0,
            },
            out: VecDeque::new(),
            events: VecDeque::new(),
            stats: HostStats::default(),
            closing: false,
            udp_blocked: false,
            refused: false,
            tcp: None,
            tcp_waiting: Vec::new(),
            tcp_accepting: Vec::new(),
            tcp_stale: false,
            streams: HashMap::new(),
            allocations: Vec::new(),
            cfg,
        }
    }

    pub fn peer_id(&self) -> PeerId {
        self.client.peer_id()
    }

    pub fn stats(&self) -> HostStats {
        HostStats {
            probes_dropped: self.pacer.dropped,
            ..self.stats
        }
    }

    /// Our NAT facts so far.
    pub fn nat(&self) -> NatSummary {
        self.nat
    }

    /// Attempts under way.
    pub fn attempts(&self) -> usize {
        self.attempts.len()
    }

    /// Starts: a cookie from the server, and the registration if we accept
    /// sessions.
    pub fn start(&mut self, now: Instant) {
        if let Some(m) = self.cfg.server_memo {
            self.client.prime(now, Some((m.cookie, m.age)), Some(m.rtt));
        }
        self.client.start(now);
        self.flush_client(now);
    }

    /// Leaves cleanly: unregisters, stops every attempt.
    pub fn close(&mut self, now: Instant) {
        self.closing = true;
        self.client.close(now);
        let requests: Vec<(RequestId, PeerId)> = self
            .attempts
            .values()
            .filter_map(|a| a.request.map(|r| (r, a.peer)))
            .chain(self.queue.iter().map(|(p, r, _)| (*r, *p)))
            .collect();
        for (request, peer) in requests {
            self.events.push_back(HostEvent::ConnectFailed {
                request,
                peer,
                error: ConnectError::Closing,
            });
        }
        self.attempts.clear();
        self.queue.clear();
        self.flush_client(now);
    }

    fn info(&self) -> PeerInfo {
        PeerInfo {
            nat: self.nat,
            candidates: vec![self.cfg.local],
            mapped: self.announced(),
            tcp: self.tcp_info(),
            turn: self.turn_addrs(),
        }
    }

    /// The addresses our TURN allocations relay to us.
    fn turn_addrs(&self) -> Vec<SocketAddr> {
        self.allocations
            .iter()
            .map(|(_, a)| *a)
            .take(crate::rendezvous::wire::MAX_TURN)
            .collect()
    }

    /// The punch's local IDs of our TURN sockets.
    fn turn_locals(&self) -> Vec<SocketId> {
        self.allocations
            .iter()
            .map(|(id, _)| SocketId(TURN_LOCAL + id.0))
            .collect()
    }

    /// Lets a peer's addresses through our TURN allocations.
    fn permit(&mut self, addrs: impl IntoIterator<Item = SocketAddr>) {
        if self.allocations.is_empty() && !self.nat.pending.turn {
            return;
        }
        let mut ips: Vec<std::net::IpAddr> = addrs.into_iter().map(|a| a.ip()).collect();
        ips.sort();
        ips.dedup();
        if !ips.is_empty() {
            self.events.push_back(HostEvent::TurnPermit { ips });
        }
    }

    /// Direct paths from here are TCP only (`--tcp`, or UDP is blocked).
    fn tcp_alone(&self) -> bool {
        self.cfg.tcp == TcpMode::Only || (self.cfg.tcp != TcpMode::Off && self.udp_blocked)
    }

    /// Our TCP facts as announced: only where TCP is punched, and marked
    /// TCP-only when UDP is blocked here or the user said so.
    fn tcp_info(&self) -> Option<TcpInfo> {
        if self.cfg.tcp == TcpMode::Off {
            return None;
        }
        self.tcp.map(|t| TcpInfo {
            only: self.cfg.tcp == TcpMode::Only || self.udp_blocked,
            ..t
        })
    }

    /// Our mapped port, if it is worth announcing: the gateway's external
    /// address must be the one the server sees us at (else another NAT
    /// beyond the gateway owns the path).
    fn announced(&self) -> Option<Mapped> {
        let observed = self.client.observed().map(|o| o.ip());
        self.mapped
            .filter(|m| check_external(m.addr.ip(), observed).is_ok())
    }

    fn me_view(&self, fresh: Option<SocketAddr>) -> SideView {
        SideView {
            nat: self.nat,
            observed: self.client.observed().unwrap_or(self.cfg.local),
            fresh,
            candidates: vec![self.cfg.local],
            mapped: self.announced(),
            turn: self.turn_addrs(),
        }
    }

    /// Behind a symmetric NAT, an attempt takes a fresh mapping from a new
    /// socket. Not with a mapped port: the main socket is reachable there
    /// by anyone and the peer aims at it, so attempts stay on it.
    fn me_hard(&self) -> bool {
        self.me_view(None).hard() && self.announced().is_none()
    }

    fn punch_cfg(&mut self) -> PunchConfig {
        let mut c = self.cfg.punch.clone();
        c.plan.seed = self.rng.random();
        c.plan.ttl = self.cfg.ttl.or(self.nat.opener_ttl);
        c
    }

    // ---- inputs ------------------------------------------------------

    /// A user's connect to `peer`.
    pub fn connect(&mut self, now: Instant, peer: PeerId, request: RequestId) {
        if peer == self.peer_id() {
            self.events.push_back(HostEvent::ConnectFailed {
                request,
                peer,
                error: ConnectError::OwnPeerId { peer },
            });
            return;
        }
        if self.closing {
            self.events.push_back(HostEvent::ConnectFailed {
                request,
                peer,
                error: ConnectError::Closing,
            });
            return;
        }
        // A live path to that peer: a new session can use it at once.
        if let Some(r) = self
            .remotes
            .values()
            .filter(|r| r.peer() == peer && r.live())
            .max_by_key(|r| r.sessions)
        {
            let via = match (r.on_relay, r.relay, r.path) {
                (true, Some(relay), _) => Some((
                    Path {
                        socket: SocketId(0),
                        remote: relay.server,
                    },
                    Strategy::Relay,
                )),
                (_, _, Some(path)) => Some((path, r.strategy.unwrap_or(Strategy::Cone))),
                _ => None,
            };
            if let Some((path, strategy)) = via {
                self.events.push_back(HostEvent::Connected {
                    request: Some(request),
                    remote: r.key,
                    path,
                    strategy,
                    role: Role::Initiator,
                    elapsed: Duration::ZERO,
                    probes_sent: 0,
                    bytes_sent: 0,
                    reused: true,
                });
                return;
            }
        }
        if !self.has_capacity(peer) {
            self.queue.push_back((peer, request, now));
            return;
        }
        self.start_initiator(now, peer, Some(request), None, now);
    }

    fn has_capacity(&self, peer: PeerId) -> bool {
        self.attempts.len() < defaults::MAX_ATTEMPTS
            && self.attempts.values().filter(|a| a.peer == peer).count()
                < defaults::MAX_ATTEMPTS_PER_PEER
    }

    fn new_attempt(&mut self, now: Instant, peer: PeerId, role: Role, session: u64) -> Attempt {
        let eph = Ephemeral::from_secret(self.rng.random());
        let offer = make_offer(&self.cfg.identity, session, role, &eph);
        Attempt {
            peer,
            role,
            request: None,
            repair: None,
            remote: None,
            eph: Some(eph),
            offer,
            punch: None,
            fresh: None,
            phase: Phase::Introducing,
            sockets: vec![SocketId(0)],
            started: now,
            incoming: None,
            turn_until: None,
            relayed: false,
            relay_offered: false,
            relay_at: None,
            channel_ready: false,
            deferred: None,
            peer_tcp: None,
            peer_nat: PeerNat::default(),
            peer_lan: Vec::new(),
            tcp: TcpStage::Idle,
            tcp_claimed: false,
            tcp_told: false,
            tcp_intro: false,
            tcp_at: None,
        }
    }

    fn start_initiator(
        &mut self,
        now: Instant,
        peer: PeerId,
        request: Option<RequestId>,
        repair: Option<RemoteKey>,
        started: Instant,
    ) {
        self.refresh_tcp();
        if self.cfg.tcp == TcpMode::Only && self.nat.pending.tcp {
            // The introduction then carries our TCP port, and the server's
            // coordinated start is the TCP punch's too.
            self.tcp_waiting.push((peer, request, repair, started));
            return;
        }
        let session = self.rng.random();
        let mut a = self.new_attempt(now, peer, Role::Initiator, session);
        a.request = request;
        a.repair = repair;
        a.started = started;
        self.stats.attempts += 1;
        // A fresh UDP mapping serves UDP prediction only; over TCP alone it
        // would take the very port the TCP prediction counts on.
        let hard = self.me_hard() && !self.tcp_alone();
        self.attempts.insert(session, a);
        if hard {
            self.wait_turn(now, session);
        } else {
            self.send_connect(now, session);
        }
    }

    fn send_connect(&mut self, now: Instant, session: u64) {
        let info = self.info();
        let Some(a) = self.attempts.get_mut(&session) else {
            return;
        };
        a.phase = Phase::Introducing;
        a.tcp_told = info.tcp.is_some();
        let fresh = a.fresh;
        tracing::debug!(peer = %a.peer, session, ?fresh, pending = ?info.nat.pending, "connect sent");
        self.client
            .connect(now, a.peer, session, a.offer.clone(), info, fresh);
    }

    /// Behind a symmetric NAT: one attempt at a time from its fresh mapping
    /// to its first probes.
    fn wait_turn(&mut self, now: Instant, session: u64) {
        if let Some(a) = self.attempts.get_mut(&session) {
            a.phase = Phase::WaitTurn;
        }
        if self.turn.is_none() {
            self.take_turn(now, session);
        } else {
            tracing::debug!(
                session,
                waiting = self.turn_queue.len() + 1,
                "waiting for the symmetric-NAT turn"
            );
            self.turn_queue.push_back(session);
        }
    }

    fn take_turn(&mut self, now: Instant, session: u64) {
        self.turn = Some(session);
        if let Some(a) = self.attempts.get_mut(&session) {
            a.turn_until = Some(now + defaults::ALLOC_MAX);
        }
        self.take_fresh(now, session);
    }

    fn end_turn(&mut self, now: Instant, session: u64) {
        if self.turn != Some(session) {
            self.turn_queue.retain(|s| *s != session);
            return;
        }
        self.turn = None;
        while let Some(next) = self.turn_queue.pop_front() {
            if self.attempts.contains_key(&next) {
                self.take_turn(now, next);
                break;
            }
        }
    }

    /// A fresh mapping: a Binding from a new socket, which the NAT maps
    /// to its next port.
    fn take_fresh(&mut self, now: Instant, session: u64) {
        let Some(id) = self.open_socket() else {
            // No socket to spare: go on without a fresh mapping (prediction
            // then has nothing to predict from, other techniques still run).
            return self.fresh_done(now, session, None);
        };
        if let Some(a) = self.attempts.get_mut(&session) {
            a.phase = Phase::Fresh;
        }
        let req = Message::binding_request(TransactionId::new(self.rng.random()));
        let timing = Timing {
            rto: defaults::FRESH_TIMING_RTO,
            ..Timing::probe()
        }
        .hedged(defaults::FRESH_HEDGE);
        let tid = self.stun.start(now, id, self.cfg.stun, &req, timing, false);
        tracing::debug!(session, socket = id.0, "taking a fresh mapping");
        self.fresh.insert(tid, (session, id));
    }

    fn fresh_done(&mut self, now: Instant, session: u64, fresh: Option<SocketAddr>) {
        tracing::debug!(session, ?fresh, "fresh mapping");
        let info = self.info();
        let Some(a) = self.attempts.get_mut(&session) else {
            return;
        };
        a.fresh = fresh;
        match a.role {
            Role::Initiator => self.send_connect(now, session),
            Role::Responder if self.cfg.tcp == TcpMode::Only && self.nat.pending.tcp => {
                // Our Accept carries our TCP port: the server's go then
                // reaches the initiator with it, and both punch at the go.
                self.tcp_accepting.push((session, fresh));
            }
            Role::Responder => {
                a.phase = Phase::Punching;
                if let Some(p) = a.punch.as_mut() {
                    p.update_me(now, info.nat, fresh, info.mapped);
                }
                let offer = a.offer.clone();
                self.client.accept(now, session, offer, info, fresh);
                self.drive_attempt(now, session);
            }
        }
    }

    fn open_socket(&mut self) -> Option<SocketId> {
        if self.open_sockets.len() >= defaults::SOCKET_BUDGET {
            return None;
        }
        let id = SocketId(self.next_socket);
        self.next_socket += 1;
        self.open_sockets.insert(id);
        self.events.push_back(HostEvent::OpenSocket { id });
        Some(id)
    }

    fn close_socket(&mut self, id: SocketId) {
        if id.0 != 0 && self.open_sockets.remove(&id) {
            self.events.push_back(HostEvent::CloseSocket { id });
        }
    }

    /// The driver could not bind socket `id`.
    pub fn socket_failed(&mut self, now: Instant, id: SocketId) {
        self.open_sockets.remove(&id);
        let fresh: Vec<TransactionId> = self
            .fresh
            .iter()
            .filter(|(_, (_, s))| *s == id)
            .map(|(t, _)| *t)
            .collect();
        for tid in fresh {
            self.stun.cancel(&tid);
            if let Some((session, _)) = self.fresh.remove(&tid) {
                self.fresh_done(now, session, None);
            }
        }
    }

    /// A fact about our NAT, as measured.
    pub fn handle_fact(&mut self, now: Instant, fact: Fact) {
        let before = self.nat;
        let mut fresh_now = None;
        match fact {
            Fact::Mapping {
                nat,
                mapping,
                allocation,
                delta,
                latest,
                ..
            } => {
                self.nat.nat = nat;
                self.nat.mapping = mapping;
                self.nat.allocation = allocation;
                self.nat.delta = delta;
                self.nat.pending.mapping = false;
                self.latest = latest;
                fresh_now = latest;
            }
            Fact::Filtering { filtering } => {
                self.nat.filtering = filtering;
                self.nat.pending.filtering = false;
            }
            Fact::OpenerTtl { ttl } => {
                self.nat.opener_ttl = ttl;
                self.nat.pending.hops = false;
                for a in self.attempts.values_mut() {
                    if let Some(p) = a.punch.as_mut() {
                        p.set_opener_ttl(self.cfg.ttl.or(ttl));
                    }
                }
            }
            Fact::Unreachable => {
                // No STUN answers: nothing more will be measured; punch as
                // if the NAT were a cone (the likelier case).
                self.nat.pending = Pending {
                    portmap: self.nat.pending.portmap,
                    ..Default::default()
                };
            }
        }
        if self.nat == before && fresh_now.is_none() {
            // Nothing new (a cached fact measured again): no updates.
            return;
        }
        self.facts_changed(now, fresh_now);
    }

    /// The port our gateway maps to the main socket (`None`: no mapping,
    /// none to be had, or it was lost). Announced to the server and to
    /// every attempt.
    pub fn set_portmap(&mut self, now: Instant, mapped: Option<Mapped>) {
        if self.mapped == mapped && !self.nat.pending.portmap {
            return;
        }
        self.nat.pending.portmap = false;
        tracing::debug!(?mapped, "mapped port");
        self.mapped = mapped;
        if self.announced().is_some() {
            // Attempts that took a fresh socket probe from the main one
            // now: the peer aims at its mapped port.
            let mut fresh_sockets = Vec::new();
            for a in self.attempts.values_mut() {
                if a.sockets[0] != SocketId(0) {
                    fresh_sockets.push(std::mem::replace(&mut a.sockets[0], SocketId(0)));
                }
            }
            for id in fresh_sockets {
                self.close_socket(id);
            }
        }
        self.facts_changed(now, None);
    }

    /// Asks for our TCP facts again when a punch used them up (a NAT
    /// that maps per destination gives the next connection the next
    /// port). Like UDP's fresh mapping, but for the one punching port.
    fn refresh_tcp(&mut self) {
        if !self.tcp_stale || self.cfg.tcp == TcpMode::Off || self.nat.pending.tcp {
            return;
        }
        self.tcp_stale = false;
        self.nat.pending.tcp = true;
        self.events.push_back(HostEvent::MeasureTcp);
    }

    /// Our TCP punching port's facts (STUN over TCP from it), or `None`
    /// when it could not be measured: announced to the server and to
    /// every attempt.
    pub fn set_tcp(&mut self, now: Instant, tcp: Option<TcpInfo>) {
        if self.tcp == tcp && !self.nat.pending.tcp {
            return;
        }
        tracing::debug!(?tcp, "TCP punching port");
        self.tcp = tcp;
        self.nat.pending.tcp = false;
        for (peer, request, repair, started) in std::mem::take(&mut self.tcp_waiting) {
            self.start_initiator(now, peer, request, repair, started);
        }
        for (session, fresh) in std::mem::take(&mut self.tcp_accepting) {
            self.fresh_done(now, session, fresh);
        }
        self.facts_changed(now, None);
    }

    /// Our TURN allocations (the driver's socket for each, and the address
    /// it relays), and whether more are being made (`pending`: at start, or
    /// again after a loss, when peers still wait for them and still get
    /// permissions): announced to the server and to every attempt.
    pub fn set_turn(&mut self, now: Instant, turn: Vec<(SocketId, SocketAddr)>, pending: bool) {
        if self.allocations == turn && self.nat.pending.turn == pending {
            return;
        }
        tracing::debug!(?turn, "TURN relayed addresses");
        let lost: Vec<SocketId> = self
            .allocations
            .iter()
            .filter(|(id, a)| !turn.contains(&(*id, *a)))
            .map(|(id, _)| *id)
            .collect();
        self.allocations = turn;
        self.nat.pending.turn = pending;
        // Remotes whose traffic went through a lost allocation punch
        // again (on the server's relay meanwhile, where there is one).
        let stranded: Vec<RemoteKey> = self
            .remotes
            .values()
            .filter(|r| !r.on_relay && r.path.is_some_and(|p| lost.contains(&p.socket)))
            .map(|r| r.key)
            .collect();
        for key in stranded {
            self.path_stalled(now, key);
        }
        let locals = self.turn_locals();
        for a in self.attempts.values_mut() {
            if let Some(p) = a.punch.as_mut() {
                p.set_turn_sockets(locals.clone());
            }
        }
        self.facts_changed(now, None);
    }

    /// The driver has a TCP stream `socket` up to `remote` on our punching
    /// port: for `session` when its own SYNs made it (the attempt probes
    /// through it at once), or accepted (claimed by the first punch frame
    /// on it, whichever attempt it names).
    pub fn tcp_stream(
        &mut self,
        now: Instant,
        socket: SocketId,
        remote: SocketAddr,
        session: Option<u64>,
    ) {
        self.open_sockets.insert(socket);
        match session.filter(|s| self.attempts.contains_key(s)) {
            Some(session) => self.claim_stream(now, session, socket, remote, true),
            None => {
                if self.streams.len() >= defaults::MAX_UNCLAIMED {
                    let oldest = self
                        .streams
                        .iter()
                        .min_by_key(|(_, (_, at))| *at)
                        .map(|(id, _)| *id);
                    if let Some(id) = oldest {
                        self.streams.remove(&id);
                        self.close_socket(id);
                    }
                }
                self.streams.insert(socket, (remote, now));
            }
        }
    }

    /// A new ID for a stream the driver is about to report.
    pub fn stream_id(&mut self) -> SocketId {
        let id = SocketId(self.next_socket);
        self.next_socket += 1;
        id
    }

    fn claim_stream(
        &mut self,
        now: Instant,
        session: u64,
        socket: SocketId,
        remote: SocketAddr,
        probe: bool,
    ) {
        self.streams.remove(&socket);
        let Some(a) = self.attempts.get_mut(&session) else {
            return;
        };
        let local = match a.sockets.iter().position(|s| *s == socket) {
            Some(i) => i,
            None => {
                a.sockets.push(socket);
                a.sockets.len() - 1
            }
        };
        a.tcp_claimed = true;
        tracing::debug!(session, socket = socket.0, %remote, probe, "TCP stream joins the attempt");
        if let Some(p) = a.punch.as_mut() {
            p.add_tcp_path(now, SocketId(local), remote, probe);
        }
        self.drive_attempt(now, session);
    }

    /// The driver's TCP punch for `session` ended without a stream
    /// (`reason` says why, for people).
    pub fn tcp_over(&mut self, now: Instant, session: u64, reason: String) {
        let Some(a) = self.attempts.get_mut(&session) else {
            return;
        };
        a.tcp = TcpStage::Over;
        tracing::debug!(session, %reason, "TCP punch over");
        if a.tcp_claimed {
            // A stream is up (accepted, maybe): its probes decide.
            return;
        }
        if let Some(p) = a.punch.as_mut() {
            p.tcp_failed(now, reason);
        }
        self.drive_attempt(now, session);
    }

    /// Starts the TCP punch of `session` when it is due: both sides'
    /// TCP facts known, and TCP called for (only TCP, or UDP slow).
    fn maybe_tcp(&mut self, now: Instant, session: u64) {
        if self.cfg.tcp == TcpMode::Off {
            return;
        }
        let mine = self.tcp_info();
        let mine_pending = self.nat.pending.tcp;
        let only_me = self.cfg.tcp == TcpMode::Only || self.udp_blocked;
        let mut plan_cfg = self.cfg.punch.plan.clone();
        plan_cfg.ttl = self.cfg.ttl;
        plan_cfg.tcp_openers &= self
            .client
            .rtt()
            .is_none_or(|r| r >= defaults::TCP_OPENER_MIN_RTT);
        let nat = self.nat;
        let Some(a) = self.attempts.get_mut(&session) else {
            return;
        };
        if a.tcp != TcpStage::Idle || a.phase != Phase::Punching {
            return;
        }
        let Some(p) = a.punch.as_mut() else {
            return;
        };
        if !p.is_punching() {
            return;
        }
        let only = only_me || a.peer_tcp.is_some_and(|t| t.only);
        if only && p.uses_udp() {
            tracing::debug!(session, "direct paths are TCP only");
            p.tcp_only(now);
        }
        let mut stale = false;
        let (mine, peer) = match (mine, a.peer_tcp) {
            (Some(m), Some(p)) => (m, p),
            (None, _) if only && !mine_pending => {
                a.tcp = TcpStage::Over;
                p.tcp_failed(
                    now,
                    "our TCP port could not be measured (no TCP answer from the server)".into(),
                );
                return;
            }
            (_, None) if only && !a.peer_nat.pending.tcp => {
                a.tcp = TcpStage::Over;
                p.tcp_failed(
                    now,
                    "the peer does not punch TCP (it runs with --no-tcp, or a version without TCP)"
                        .into(),
                );
                return;
            }
            _ => return,
        };
        // Both sides must send their openers within an opener's life of
        // each other: the introduction's start, or else the server's go.
        let start = if a.tcp_intro {
            p.start_at()
        } else if let Some(go) = p.go_at() {
            go
        } else {
            return;
        };
        let at = if only {
            start
        } else {
            let due = start + defaults::TCP_GRACE;
            if now < due {
                a.tcp_at = Some(due);
                return;
            }
            now
        };
        a.tcp_at = None;
        match crate::punch::tcp::plan(&mine, &nat, &peer, &a.peer_nat, &a.peer_lan, &plan_cfg) {
            Ok(plan) => {
                tracing::debug!(
                    session,
                    ?plan,
                    in_ms = at.saturating_duration_since(now).as_millis() as u64,
                    "TCP punch"
                );
                stale = !maps_once(Some(mine));
                a.tcp = TcpStage::Running;
                p.set_tcp_pending();
                let until = p
                    .deadline()
                    .checked_sub(defaults::TCP_REPORT_MARGIN)
                    .unwrap_or(at)
                    .max(at);
                self.events.push_back(HostEvent::TcpPunch {
                    session,
                    plan,
                    at,
                    until,
                });
            }
            Err(e) => {
                tracing::debug!(session, error = %e, "no TCP punch");
                a.tcp = TcpStage::Over;
                p.tcp_failed(now, e.to_string());
            }
        }
        self.tcp_stale |= stale;
    }

    /// Our facts changed: the server and every attempt under way hear of
    /// them.
    fn facts_changed(&mut self, now: Instant, fresh_now: Option<SocketAddr>) {
        let info = self.info();
        if info.mapped != self.last_announced {
            if let (Some(m), None) = (self.mapped, info.mapped) {
                let observed = self.client.observed().map(|o| o.ip());
                if let Err(why) = check_external(m.addr.ip(), observed) {
                    tracing::info!(mapped = %m.addr, %why, "mapped port not announced");
                }
            }
            self.last_announced = info.mapped;
        }
        self.client.set_info(now, info.clone());
        let hard = self.me_hard();
        let sessions: Vec<u64> = self.attempts.keys().copied().collect();
        for session in sessions {
            let Some(a) = self.attempts.get_mut(&session) else {
                continue;
            };
            if matches!(a.phase, Phase::WaitTurn | Phase::Fresh) {
                continue;
            }
            // An attempt that began before we knew we are behind a
            // symmetric NAT uses discovery's newest mapping as its fresh one.
            if hard && a.fresh.is_none() {
                a.fresh = fresh_now;
            }
            let fresh = a.fresh;
            if let Some(p) = a.punch.as_mut() {
                p.update_me(now, info.nat, fresh, info.mapped);
            }
            self.client.update(now, session, info.clone(), fresh);
            self.drive_attempt(now, session);
        }
        self.flush_client(now);
    }

    /// A datagram for the control plane (not QUIC) arrived on `socket`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        socket: SocketId,
        from: SocketAddr,
        data: &[u8],
    ) {
        if crate::rendezvous::wire::is_rendezvous(data) {
            if socket.0 == 0 {
                self.client.handle_input(now, from, data);
                self.flush_client(now);
            }
        } else if looks_like_stun(data) {
            self.stun.handle_input(now, socket, from, data);
            self.flush_stun(now);
        } else if crate::punch::wire::is_punch(data) {
            self.punch_input(now, socket, from, data);
        }
    }

    fn punch_input(&mut self, now: Instant, socket: SocketId, from: SocketAddr, data: &[u8]) {
        let Some(session) = crate::punch::wire::session_of(data) else {
            return;
        };
        if let Some((remote, _)) = self
            .streams
            .get(&socket)
            .copied()
            .filter(|_| self.attempts.contains_key(&session))
        {
            // The first frame on an accepted stream names its attempt.
            self.claim_stream(now, session, socket, remote, false);
        }
        if let Some(a) = self.attempts.get_mut(&session) {
            let Some(local) = local_socket(&a.sockets, &self.allocations, socket) else {
                return;
            };
            if let Some(p) = a.punch.as_mut() {
                p.handle_input(now, local, from, data);
            }
            self.drive_attempt(now, session);
            return;
        }
        // A connected pair's validator (its session number is the punch's).
        let key = self.remotes.iter().find_map(|(k, r)| {
            r.validator
                .as_ref()
                .filter(|v| v.punch.session() == session)
                .map(|_| *k)
        });
        match key {
            Some(key) => {
                if let Some(v) = self
                    .remotes
                    .get_mut(&key)
                    .and_then(|r| r.validator.as_mut())
                {
                    if let Some(local) = v.sockets.iter().position(|s| *s == socket) {
                        v.punch.handle_input(now, SocketId(local), from, data);
                    }
                }
                self.drive_validator(key);
            }
            None => {
                self.stats.stray_punch += 1;
                tracing::trace!(%from, "punch frame for no attempt");
            }
        }
    }

    /// A QUIC session came up on `remote`'s route.
    pub fn session_up(&mut self, now: Instant, remote: RemoteKey) {
        let r = self
            .remotes
            .entry(remote)
            .or_insert_with(|| Remote::new(remote, false, now));
        r.sessions += 1;
        r.idle_since = None;
    }

    /// A QUIC session on `remote`'s route ended.
    pub fn session_down(&mut self, now: Instant, remote: RemoteKey) {
        if let Some(r) = self.remotes.get_mut(&remote) {
            r.sessions = r.sessions.saturating_sub(1);
            if r.sessions == 0 && r.repairing.is_none() {
                r.idle_since = Some(now);
                r.repunch_at = None;
            }
        }
    }

    /// `remote`'s path stopped answering: the side that introduced itself
    /// punches again; the other refreshes its registration so that the
    /// server can reach it.
    pub fn path_stalled(&mut self, now: Instant, remote: RemoteKey) {
        let Some(r) = self.remotes.get_mut(&remote) else {
            return;
        };
        self.events.push_back(HostEvent::Stalled { remote });
        tracing::debug!(peer = %remote.peer, initiator = r.initiator, on_relay = r.on_relay, "path stalled");
        if let (Some(relay), false) = (r.relay, r.on_relay) {
            // The relay carries the session while we punch again.
            r.on_relay = true;
            self.events.push_back(HostEvent::UseRelay { remote });
            let turn = r.strategy == Some(Strategy::Turn);
            self.events.push_back(HostEvent::PathChanged {
                remote,
                from: r.path.map(if turn { Via::Turn } else { Via::Direct }),
                to: Via::Relay(relay),
                strategy: None,
                elapsed: None,
            });
        }
        if r.initiator {
            let recent = r
                .last_repunch
                .is_some_and(|t| now.saturating_duration_since(t) < defaults::REPUNCH_EVERY);
            // (A later retry already planned, after a failed punch, is
            // brought forward: the path it was waiting beside is gone.)
            let soon = now + defaults::REPUNCH_DELAY;
            if r.repairing.is_none() && !recent && r.repunch_at.is_none_or(|t| t > soon) {
                r.repunch_at = Some(soon);
            }
        }
        self.client.refresh(now);
        self.flush_client(now);
    }

    /// The driver reaches the server over a TCP stream now, because UDP
    /// got no answer (for the rest of this endpoint's life): what waits
    /// for the server goes out again. Punching cannot work from here, so
    /// attempts under way end with [`crate::punch::PunchFailure::UdpBlocked`]
    /// (relayed ones stay relayed), and attempts the server relays end so
    /// as soon as their relay is up; an attempt the server does not relay
    /// (its relay is off) fails when its punch times out.
    pub fn server_over_tcp(&mut self, now: Instant) {
        self.udp_blocked = true;
        self.client.resend_now(now);
        self.flush_client(now);
        if self.cfg.tcp != TcpMode::Off {
            // TCP punching may still find a direct path: attempts go on
            // over TCP only, and peers hear that we are TCP only.
            for a in self.attempts.values_mut() {
                if let Some(p) = a.punch.as_mut().filter(|p| p.uses_udp()) {
                    p.tcp_only(now);
                }
            }
            self.facts_changed(now, None);
            return;
        }
        let doomed: Vec<u64> = self
            .attempts
            .iter()
            .filter(|(_, a)| {
                a.relayed || (a.phase == Phase::Punching && a.punch.is_some() && !a.relay_offered)
            })
            .map(|(s, _)| *s)
            .collect();
        for s in doomed {
            self.udp_blocked_fail(now, s);
        }
    }

    fn udp_blocked_fail(&mut self, now: Instant, session: u64) {
        let Some(peer) = self.attempts.get(&session).map(|a| a.peer) else {
            return;
        };
        let failure = crate::punch::PunchFailure::UdpBlocked;
        let error = ConnectError::Punch { peer, failure };
        if !self.defer_until_accepted(now, session, error.clone()) {
            self.fail_attempt(now, session, error);
        }
    }

    /// A relayed responder's punch failed before the server held its
    /// Accept: the initiator starts on the relay only when it does, so the
    /// Accept goes out (now, if it was waiting for a fresh mapping) and the
    /// failure is told once the server holds it. `false`: nothing to wait
    /// for, fail now.
    fn defer_until_accepted(&mut self, now: Instant, session: u64, error: ConnectError) -> bool {
        let Some(a) = self.attempts.get(&session) else {
            return false;
        };
        if !(a.relayed && a.role == Role::Responder && !self.client.holds_our_state(session)) {
            return false;
        }
        tracing::debug!(session, %error, "no direct path; accepting for the relay");
        let early = a.phase != Phase::Punching;
        let offer = a.offer.clone();
        let info = self.info();
        if let Some(a) = self.attempts.get_mut(&session) {
            a.phase = Phase::Punching;
            a.deferred = Some((error, now + defaults::RELAY_WAIT));
        }
        if early {
            self.client.accept(now, session, offer, info, None);
            self.flush_client(now);
        }
        true
    }

    /// A peer that was sending fell silent: be reachable for its re-punch.
    pub fn peer_quiet(&mut self, now: Instant) {
        self.client.refresh(now);
        self.flush_client(now);
    }

    /// The session layer saw `remote`'s packets arrive on a path that is
    /// not its route (the peer's NAT rebound): validate it, then move.
    pub fn new_source(&mut self, now: Instant, remote: RemoteKey, path: Path) {
        let Some(r) = self.remotes.get_mut(&remote) else {
            return;
        };
        if r.path == Some(path) {
            return;
        }
        if let Some(v) = r.validator.as_mut() {
            if let Some(local) = v.local_path(path) {
                v.punch.validate(now, local);
            }
        }
        self.drive_validator(remote);
    }

    /// Advances every timer. A spurious call is a no-op.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.client.handle_timeout(now);
        self.flush_client(now);
        self.stun.handle_timeout(now);
        self.flush_stun(now);
        let sessions: Vec<u64> = self.attempts.keys().copied().collect();
        for session in sessions {
            let gave_up = self.attempts.get(&session).is_some_and(|a| {
                a.deferred.as_ref().is_some_and(|(_, at)| {
                    now >= *at
                        || (a.role == Role::Responder && self.client.holds_our_state(session))
                })
            });
            if gave_up {
                if let Some((e, _)) = self
                    .attempts
                    .get_mut(&session)
                    .and_then(|a| a.deferred.take())
                {
                    self.fail_attempt(now, session, e);
                }
                continue;
            }
            let expired_turn = self
                .attempts
                .get(&session)
                .and_then(|a| a.turn_until)
                .is_some_and(|t| now >= t);
            if expired_turn {
                if let Some(a) = self.attempts.get_mut(&session) {
                    a.turn_until = None;
                }
                self.end_turn(now, session);
            }
            if let Some(p) = self
                .attempts
                .get_mut(&session)
                .and_then(|a| a.punch.as_mut())
            {
                p.handle_timeout(now);
            }
            self.drive_attempt(now, session);
        }
        let unclaimed: Vec<SocketId> = self
            .streams
            .iter()
            .filter(|(_, (_, at))| now >= *at + defaults::TCP_UNCLAIMED)
            .map(|(id, _)| *id)
            .collect();
        for id in unclaimed {
            self.streams.remove(&id);
            self.close_socket(id);
        }
        let keys: Vec<RemoteKey> = self.remotes.keys().copied().collect();
        for key in keys {
            if let Some(v) = self
                .remotes
                .get_mut(&key)
                .and_then(|r| r.validator.as_mut())
            {
                v.punch.handle_timeout(now);
            }
            self.drive_validator(key);
            self.remote_timers(now, key);
        }
        let due: Vec<(Instant, PeerId, RequestId, Instant)> = self
            .retries
            .iter()
            .filter(|r| now >= r.0)
            .copied()
            .collect();
        self.retries.retain(|r| now < r.0);
        for (_, peer, request, started) in due {
            self.start_initiator(now, peer, Some(request), None, started);
        }
        self.pace(now);
    }

    fn remote_timers(&mut self, now: Instant, key: RemoteKey) {
        let Some(r) = self.remotes.get_mut(&key) else {
            return;
        };
        if r.keepalive_at.is_some_and(|t| now >= t) {
            r.keepalive_at = None;
            if let Some(relay) = r.relay.filter(|_| r.sessions > 0 || r.on_relay) {
                r.keepalive_at = Some(now + crate::relay::server::KEEPALIVE);
                self.out.push_back(Transmit {
                    socket: SocketId(0),
                    destination: relay.server,
                    payload: crate::relay::encode(relay.channel, &[]),
                    ttl: None,
                });
            }
        }
        if r.repunch_at.is_some_and(|t| now >= t) {
            r.repunch_at = None;
            r.last_repunch = Some(now);
            let peer = r.peer();
            tracing::debug!(%peer, "punching again for a stalled path");
            if r.sessions > 0 && self.has_capacity(peer) {
                // The re-punch's number is known once it starts.
                let before: HashSet<u64> = self.attempts.keys().copied().collect();
                self.start_initiator(now, peer, None, Some(key), now);
                let new = self.attempts.keys().find(|k| !before.contains(k)).copied();
                if let Some(r) = self.remotes.get_mut(&key) {
                    r.repairing = new;
                }
            }
            return;
        }
        let idle = r
            .idle_since
            .is_some_and(|t| now.saturating_duration_since(t) >= defaults::REMOTE_LINGER);
        let busy = self.attempts.values().any(|a| a.remote == Some(key));
        if idle && !busy {
            if let Some(r) = self.remotes.remove(&key) {
                if let Some(p) = r.path {
                    self.close_socket(p.socket);
                }
                self.events.push_back(HostEvent::Forget { remote: key });
            }
        }
    }

    // ---- rendezvous --------------------------------------------------

    fn flush_client(&mut self, now: Instant) {
        while let Some(t) = self.client.poll_transmit() {
            self.out.push_back(t);
        }
        while let Some(ev) = self.client.poll_event() {
            self.on_client_event(now, ev);
        }
        while let Some(t) = self.client.poll_transmit() {
            self.out.push_back(t);
        }
    }

    fn on_client_event(&mut self, now: Instant, ev: ClientEvent) {
        match ev {
            ClientEvent::Registered { observed } => {
                self.refused = false;
                self.events.push_back(HostEvent::Registered { observed });
                // The observed address decides whether our mapped port is
                // announced: tell the server and the attempts if that
                // changed.
                if self.mapped.is_some() && self.announced() != self.last_announced {
                    self.facts_changed(now, None);
                }
            }
            ClientEvent::ServerLost { server } => {
                self.events.push_back(HostEvent::ServerLost { server })
            }
            ClientEvent::ServerBack { server } => {
                self.events.push_back(HostEvent::ServerBack { server })
            }
            ClientEvent::Displaced => self.events.push_back(HostEvent::Displaced),
            ClientEvent::Cookie { cookie, rtt } => self
                .events
                .push_back(HostEvent::ServerCookie { cookie, rtt }),
            ClientEvent::Peer {
                session,
                peer,
                instance,
                observed,
                info,
                start_at,
                relay,
                ..
            } => {
                self.on_peer(
                    now,
                    session,
                    RemoteKey { peer, instance },
                    observed,
                    info,
                    start_at,
                );
                if let Some(a) = self.attempts.get_mut(&session) {
                    a.relay_offered = relay.is_some();
                    a.relay_at = relay.and_then(|n| n.addr);
                }
            }
            ClientEvent::Incoming {
                session,
                from,
                instance,
                observed,
                offer,
                info,
                fresh,
                start_at,
                relay,
            } => {
                let intro = IncomingIntro {
                    observed,
                    info,
                    offer,
                    fresh,
                    start_at,
                };
                let key = RemoteKey {
                    peer: from,
                    instance,
                };
                self.on_incoming(now, session, key, intro);
                if let Some(a) = self.attempts.get_mut(&session) {
                    a.relay_offered = relay.is_some();
                    a.relay_at = relay.and_then(|n| n.addr);
                }
                self.relay_first(now, session);
            }
            ClientEvent::Sync {
                session,
                peer,
                start_at,
            } => self.on_sync(now, session, peer, start_at),
            ClientEvent::Error {
                code,
                session,
                retry_after,
            } => {
                let Some(session) = session else {
                    tracing::debug!(?code, "the server refused a request");
                    // Told once (the registration is retried with every
                    // heartbeat, in case we become a member).
                    if code == ErrorCode::NotMember && !self.refused {
                        self.refused = true;
                        self.events.push_back(HostEvent::ServerRefused { code });
                    }
                    return;
                };
                let Some(a) = self.attempts.get(&session) else {
                    return;
                };
                let peer = a.peer;
                let error = match code {
                    ErrorCode::PeerOffline => ConnectError::Offline { peer },
                    ErrorCode::Declined(reason) => ConnectError::Declined { peer, reason },
                    ErrorCode::IntroductionLimit => {
                        let wait = retry_after.unwrap_or(defaults::MAX_LIMIT_WAIT);
                        if wait < defaults::MAX_LIMIT_WAIT && a.role == Role::Initiator {
                            if let Some(request) = a.request {
                                let started = a.started;
                                self.retries.push((now + wait, peer, request, started));
                                self.remove_attempt(now, session);
                                return;
                            }
                        }
                        ConnectError::IntroductionLimit { peer, retry_after }
                    }
                    ErrorCode::ServerFull => ConnectError::ServerFull,
                    ErrorCode::NotMember => ConnectError::NotMember { peer },
                    code => ConnectError::Refused { code },
                };
                self.fail_attempt(now, session, error);
            }
            ClientEvent::ServerUnreachable { server, session } => match session {
                Some(session) => {
                    self.fail_attempt(now, session, ConnectError::ServerUnreachable { server })
                }
                None => {
                    // No answer to our Hello: every connect waiting for the
                    // server fails.
                    let waiting: Vec<u64> = self
                        .attempts
                        .iter()
                        .filter(|(_, a)| a.phase == Phase::Introducing)
                        .map(|(s, _)| *s)
                        .collect();
                    for s in waiting {
                        self.fail_attempt(now, s, ConnectError::ServerUnreachable { server });
                    }
                }
            },
        }
    }

    fn on_peer(
        &mut self,
        now: Instant,
        session: u64,
        key: RemoteKey,
        observed: SocketAddr,
        info: PeerInfo,
        start_at: Instant,
    ) {
        let cfg = self.punch_cfg();
        let my_id = self.peer_id();
        let my_mapped = self.announced();
        let turn_locals = self.turn_locals();
        let my_turn = self.turn_addrs();
        match self.attempts.get(&session) {
            Some(a) if a.role == Role::Initiator && a.punch.is_none() => {}
            _ => return,
        }
        self.permit([observed]);
        let Some(a) = self.attempts.get_mut(&session) else {
            return;
        };
        let Some(eph) = a.eph.take() else {
            return;
        };
        a.peer_tcp = info.tcp;
        a.tcp_intro = a.tcp_told && maps_once(info.tcp) && maps_once(self.tcp);
        a.peer_nat = info.nat;
        a.peer_lan = info.candidates.clone();
        let peer_view = SideView {
            nat: info.nat,
            observed,
            fresh: None,
            candidates: info.candidates,
            mapped: info.mapped,
            turn: info.turn,
        };
        let me = SideView {
            nat: self.nat,
            observed: self.client.observed().unwrap_or(self.cfg.local),
            fresh: a.fresh,
            candidates: vec![self.cfg.local],
            mapped: my_mapped,
            turn: my_turn,
        };
        let mut punch = Punch::new(
            cfg,
            Role::Initiator,
            session,
            my_id,
            key.peer,
            eph,
            &a.offer,
            me,
            peer_view,
            now,
            start_at,
        );
        tracing::debug!(session, peer = %key.peer, instance = key.instance, %observed, kind = ?punch.kind(), "introduced");
        punch.set_turn_sockets(turn_locals);
        a.punch = Some(punch);
        a.remote = Some(key);
        a.phase = Phase::Punching;
        let repair = a.repair;
        let r = self
            .remotes
            .entry(key)
            .or_insert_with(|| Remote::new(key, true, now));
        r.initiator = true;
        r.idle_since = None;
        if repair.is_some_and(|k| k != key) {
            // The peer restarted: the re-punch reaches a new process, whose
            // path the old sessions cannot use.
            if let Some(old) = repair.and_then(|k| self.remotes.get_mut(&k)) {
                old.repairing = None;
            }
        }
        self.drive_attempt(now, session);
    }

    /// The server relays `session` and both sides took it (the target
    /// accepted): the remote can be reached through the relay at once. A
    /// new session starts there (the user's connect is answered now) while
    /// the attempt keeps punching; a re-punch only renews the channel (the
    /// server may have restarted and lost the old one).
    fn relay_first(&mut self, now: Instant, session: u64) {
        if !self.cfg.relay {
            return;
        }
        let Some(a) = self.attempts.get_mut(&session) else {
            return;
        };
        let Some(key) = a.remote.filter(|_| a.relay_offered) else {
            return;
        };
        let Some(r) = self.remotes.get_mut(&key) else {
            return;
        };
        let relay = RelayPath {
            server: a.relay_at.unwrap_or(self.cfg.server),
            channel: session,
        };
        if r.relay != Some(relay) {
            r.relay = Some(relay);
            r.keepalive_at = Some(now + crate::relay::server::KEEPALIVE);
            self.events
                .push_back(HostEvent::RelayRoute { remote: key, relay });
        }
        a.channel_ready = true;
        let fresh = r.path.is_none() && a.repair.is_none() && !a.relayed && !r.on_relay;
        if fresh {
            r.on_relay = true;
            r.announced = true;
            a.relayed = true;
            self.events.push_back(HostEvent::UseRelay { remote: key });
            tracing::debug!(session, peer = %key.peer, "relayed until a direct path is found");
            self.events.push_back(HostEvent::Connected {
                request: a.request.take(),
                remote: key,
                path: Path {
                    socket: SocketId(0),
                    remote: relay.server,
                },
                strategy: Strategy::Relay,
                role: a.role,
                elapsed: now.saturating_duration_since(a.started),
                probes_sent: 0,
                bytes_sent: 0,
                reused: false,
            });
        } else if r.on_relay {
            // A re-punch (or a second introduction) renewed the channel
            // of a relayed remote: its failure is news for the relay only.
            a.relayed = true;
        }
        if let Some((e, _)) = self
            .attempts
            .get_mut(&session)
            .and_then(|a| a.deferred.take())
        {
            self.fail_attempt(now, session, e);
        } else if self.udp_blocked && self.cfg.tcp == TcpMode::Off {
            self.udp_blocked_fail(now, session);
        }
    }

    fn on_incoming(&mut self, now: Instant, session: u64, key: RemoteKey, intro: IncomingIntro) {
        let peer = key.peer;
        // Policy first: nobody we would refuse gets our probes, our sockets
        // or our time.
        let refusal = if !self.cfg.policy.accept || self.closing {
            Some(DeclineReason::NotAccepting)
        } else if self
            .cfg
            .policy
            .allow
            .as_ref()
            .is_some_and(|a| !a.contains(&peer))
        {
            Some(DeclineReason::NotAllowed)
        } else if !self.has_capacity(peer) {
            Some(DeclineReason::Busy)
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.stats.declined += 1;
            self.client.decline(now, session, reason);
            self.events.push_back(HostEvent::Refused { peer, reason });
            return;
        }
        self.stats.attempts += 1;
        self.events.push_back(HostEvent::Incoming { peer });
        tracing::debug!(session, %peer, instance = key.instance, observed = %intro.observed, "incoming");
        self.refresh_tcp();
        let mut a = self.new_attempt(now, peer, Role::Responder, session);
        a.peer_tcp = intro.info.tcp;
        a.tcp_intro = !self.nat.pending.tcp && maps_once(intro.info.tcp) && maps_once(self.tcp);
        a.peer_nat = intro.info.nat;
        a.peer_lan = intro.info.candidates.clone();
        let cfg = self.punch_cfg();
        let peer_view = SideView {
            nat: intro.info.nat,
            observed: intro.observed,
            fresh: intro.fresh,
            candidates: intro.info.candidates.clone(),
            mapped: intro.info.mapped,
            turn: intro.info.turn.clone(),
        };
        let Some(eph) = a.eph.take() else {
            return;
        };
        // The address the server saw (a peer's NAT sends from one IP: RFC
        // 4787 REQ-2's paired pooling); never one the peer only claims.
        self.permit([intro.observed]);
        let mut punch = Punch::new(
            cfg,
            Role::Responder,
            session,
            self.peer_id(),
            peer,
            eph,
            &a.offer,
            self.me_view(None),
            peer_view,
            now,
            intro.start_at,
        );
        punch.set_peer_offer(&intro.offer.ephemeral, &intro.offer.sig);
        punch.set_turn_sockets(self.turn_locals());
        a.punch = Some(punch);
        a.remote = Some(key);
        a.incoming = Some(intro);
        let r = self
            .remotes
            .entry(key)
            .or_insert_with(|| Remote::new(key, false, now));
        r.idle_since = None;
        // A peer with a mapped port is reached from the main socket: no
        // fresh mapping to wait for.
        let peer_mapped = a.incoming.as_ref().is_some_and(|i| i.info.mapped.is_some());
        let peer_tcp_only = a.peer_tcp.is_some_and(|t| t.only);
        let hard = self.me_hard() && !peer_mapped && !self.tcp_alone() && !peer_tcp_only;
        self.attempts.insert(session, a);
        if hard {
            self.wait_turn(now, session);
        } else {
            self.fresh_done(now, session, None);
        }
        self.drive_attempt(now, session);
    }

    fn on_sync(
        &mut self,
        now: Instant,
        session: u64,
        peer: Option<PartyState>,
        start_at: Option<Instant>,
    ) {
        let Some(a) = self.attempts.get_mut(&session) else {
            return;
        };
        if a.role == Role::Responder && a.deferred.is_some() && self.client.holds_our_state(session)
        {
            // Our Accept is with the server: the relay carries the session,
            // and the punch's failure can be told.
            if let Some((e, _)) = a.deferred.take() {
                self.fail_attempt(now, session, e);
            }
            return;
        }
        let Some(p) = a.punch.as_mut() else {
            return;
        };
        let accepted = peer.is_some();
        if let Some(state) = peer {
            tracing::debug!(session, fresh = ?state.fresh, pending = ?state.info.nat.pending, "the peer's state");
            p.set_peer_offer(&state.offer.ephemeral, &state.offer.sig);
            p.update_peer(now, state.info.nat, state.fresh, state.info.mapped);
            p.update_peer_turn(now, state.info.turn.clone());
            a.peer_tcp = state.info.tcp;
            a.peer_nat = state.info.nat;
            a.peer_lan = state.info.candidates.clone();
        }
        if accepted && a.role == Role::Initiator {
            self.relay_first(now, session);
        }
        let Some(a) = self.attempts.get_mut(&session) else {
            return;
        };
        let Some(p) = a.punch.as_mut() else {
            return;
        };
        if let Some(at) = start_at {
            tracing::debug!(
                session,
                in_ms = at.saturating_duration_since(now).as_millis() as u64,
                "go"
            );
            p.go(now, at);
            if a.turn_until.is_some() {
                // Our first new mappings are made shortly after the start.
                a.turn_until = Some(at + defaults::ALLOC_HOLD);
            }
        }
        self.drive_attempt(now, session);
    }

    // ---- attempts ----------------------------------------------------

    /// Drains one attempt's punch machine: sockets it needs, transmits,
    /// events.
    fn drive_attempt(&mut self, now: Instant, session: u64) {
        self.maybe_tcp(now, session);
        let (need, have) = match self.attempts.get(&session) {
            Some(a) => match a.punch.as_ref() {
                Some(p) => (p.sockets_needed(), a.sockets.len()),
                None => return,
            },
            None => return,
        };
        for _ in have..need {
            let id = self.open_socket().unwrap_or_else(|| {
                tracing::warn!("socket budget spent: birthday runs with fewer sockets");
                NO_SOCKET
            });
            if let Some(a) = self.attempts.get_mut(&session) {
                a.sockets.push(id);
            }
        }
        let Some(a) = self.attempts.get_mut(&session) else {
            return;
        };
        let Some(p) = a.punch.as_mut() else {
            return;
        };
        let mut events = Vec::new();
        while let Some(t) = p.poll_transmit() {
            let Some(socket) = global_socket(&a.sockets, &self.allocations, t.socket) else {
                continue;
            };
            if socket == NO_SOCKET {
                continue;
            }
            let t = Transmit { socket, ..t };
            if is_probe(&t.payload) {
                push_probe(&mut self.pacer, t);
            } else {
                self.out.push_back(t);
            }
        }
        while let Some(ev) = p.poll_event() {
            events.push(ev);
        }
        for ev in events {
            self.on_punch_event(now, session, ev);
        }
        self.pace(now);
    }

    fn on_punch_event(&mut self, now: Instant, session: u64, ev: PunchEvent) {
        let Some(a) = self.attempts.get(&session) else {
            return;
        };
        let peer = a.peer;
        let turn = &self.allocations;
        let global = |a: &Attempt, p: Path| -> Option<Path> {
            let socket = global_socket(&a.sockets, turn, p.socket)?;
            Some(Path {
                socket,
                remote: p.remote,
            })
        };
        match ev {
            PunchEvent::Attempt { strategy } => {
                self.events.push_back(HostEvent::Attempt { peer, strategy })
            }
            PunchEvent::Heard { path } => {
                if let (Some(remote), Some(path)) = (a.remote, global(a, path)) {
                    self.events.push_back(HostEvent::Learn { remote, path });
                }
            }
            PunchEvent::Connected {
                path,
                strategy,
                elapsed: _,
                probes_sent,
                bytes_sent,
            } => {
                let Some(path) = global(a, path) else {
                    return;
                };
                let Some(remote) = a.remote else {
                    return;
                };
                self.stats.connected += 1;
                let (request, role, started, repair) = (a.request, a.role, a.started, a.repair);
                let relayed = a.relayed;
                self.events.push_back(HostEvent::Learn { remote, path });
                self.path_up(now, remote, path, strategy, session);
                if repair.is_some() {
                    self.events.push_back(HostEvent::PathRepaired {
                        remote,
                        path,
                        strategy,
                    });
                } else if !relayed {
                    self.events.push_back(HostEvent::Connected {
                        request,
                        remote,
                        path,
                        strategy,
                        role,
                        elapsed: now.saturating_duration_since(started),
                        probes_sent,
                        bytes_sent,
                        reused: false,
                    });
                }
                self.finish_attempt(now, session, Some(path));
            }
            PunchEvent::Failed { failure } => {
                let error = ConnectError::Punch { peer, failure };
                let wait_for_relay = self.cfg.relay
                    && a.relay_offered
                    && !a.channel_ready
                    && !a.relayed
                    && a.role == Role::Initiator;
                if wait_for_relay {
                    // The relay still connects us once the target accepts;
                    // the failure is reported then.
                    tracing::debug!(session, %error, "no direct path; waiting to start on the relay");
                    if let Some(a) = self.attempts.get_mut(&session) {
                        a.deferred = Some((error, now + defaults::RELAY_WAIT));
                    }
                    return;
                }
                if !self.defer_until_accepted(now, session, error.clone()) {
                    self.fail_attempt(now, session, error)
                }
            }
            PunchEvent::Relayed { path, elapsed: _ } => {
                if let Some(path) = global(a, path) {
                    self.turn_up(now, session, path);
                }
            }
            PunchEvent::PathValidated { .. } | PunchEvent::PathDead { .. } => {}
        }
    }

    /// A TURN path to the attempt's remote is confirmed both ways. It
    /// carries the remote's traffic unless a direct path does: a new
    /// session starts on it (the user's connect is answered), one on the
    /// server's relay moves to it, and the punch goes on for a direct
    /// path, which would take over.
    fn turn_up(&mut self, now: Instant, session: u64, path: Path) {
        let Some(a) = self.attempts.get_mut(&session) else {
            return;
        };
        let Some(key) = a.remote else {
            return;
        };
        self.events
            .push_back(HostEvent::Learn { remote: key, path });
        let r = self
            .remotes
            .entry(key)
            .or_insert_with(|| Remote::new(key, a.role == Role::Initiator, now));
        let on_turn = r.strategy == Some(Strategy::Turn);
        if r.path.is_some() && !r.on_relay && !on_turn && r.sessions > 0 {
            // A direct path in use is better: kept.
            return;
        }
        if r.path == Some(path) && !r.on_relay && a.request.is_none() {
            return;
        }
        let from = match (r.on_relay, r.relay) {
            (true, Some(relay)) => Some(Via::Relay(relay)),
            _ if on_turn => r.path.map(Via::Turn),
            _ => r.path.map(Via::Direct),
        };
        // What the old path held is let go: its socket (a fresh one), and
        // a lingering direct path's validator with its sockets.
        let old = r.path.filter(|o| o.socket != path.socket);
        let mut closing: Vec<SocketId> = old.map(|o| o.socket).into_iter().collect();
        if !on_turn {
            if let Some(v) = r.validator.take() {
                closing.extend(v.sockets.into_iter().filter(|s| *s != path.socket));
            }
        }
        // A user's connect is answered here whatever the remote's state
        // (a lingering remote has a path and no session).
        let fresh = (from.is_none() && a.repair.is_none() && !a.relayed) || a.request.is_some();
        r.path = Some(path);
        r.on_relay = false;
        r.strategy = Some(Strategy::Turn);
        a.relayed = true;
        tracing::debug!(session, peer = %key.peer, ?path, "on a TURN relay until a direct path is found");
        self.events
            .push_back(HostEvent::Route { remote: key, path });
        let elapsed = now.saturating_duration_since(a.started);
        if fresh && (!r.announced || a.request.is_some()) {
            r.announced = true;
            self.events.push_back(HostEvent::Connected {
                request: a.request.take(),
                remote: key,
                path,
                strategy: Strategy::Turn,
                role: a.role,
                elapsed,
                probes_sent: a.punch.as_ref().map_or(0, |p| p.probes_sent()),
                bytes_sent: 0,
                reused: false,
            });
        } else {
            self.events.push_back(HostEvent::PathChanged {
                remote: key,
                from,
                to: Via::Turn(path),
                strategy: Some(Strategy::Turn),
                elapsed: Some(elapsed),
            });
        }
        for socket in closing {
            self.close_socket(socket);
        }
    }

    /// A confirmed path: the remote's traffic goes there, and the punch
    /// stays as the remote's validator.
    fn path_up(
        &mut self,
        now: Instant,
        key: RemoteKey,
        path: Path,
        strategy: Strategy,
        session: u64,
    ) {
        let validator = self.attempts.get_mut(&session).and_then(|a| {
            let punch = a.punch.take()?;
            Some(Validator {
                punch,
                sockets: a.sockets.clone(),
            })
        });
        let r = self
            .remotes
            .entry(key)
            .or_insert_with(|| Remote::new(key, false, now));
        let old = r.path.replace(path);
        let was_relay = std::mem::take(&mut r.on_relay);
        let was_turn = r.strategy == Some(Strategy::Turn) && old.is_some();
        let from = match (was_relay, r.relay) {
            (true, Some(relay)) => Some(Via::Relay(relay)),
            _ if was_turn => old.map(Via::Turn),
            _ => old.map(Via::Direct),
        };
        r.strategy = Some(strategy);
        if r.repairing == Some(session) {
            r.repairing = None;
        }
        // The old validator's sockets other than the new path's are done.
        let old_sockets: Vec<SocketId> = r.validator.take().map(|v| v.sockets).unwrap_or_default();
        r.validator = validator;
        let live = r.sessions > 0 || ((was_relay || was_turn) && r.announced);
        tracing::debug!(peer = %key.peer, ?path, ?strategy, session, was_relay, "path up");
        self.events
            .push_back(HostEvent::Route { remote: key, path });
        if live && (was_relay || old != Some(path)) {
            self.events.push_back(HostEvent::PathChanged {
                remote: key,
                from,
                to: Via::Direct(path),
                strategy: Some(strategy),
                elapsed: self
                    .attempts
                    .get(&session)
                    .map(|a| now.saturating_duration_since(a.started)),
            });
        }
        if let Some(o) = old.filter(|o| o.socket != path.socket) {
            self.close_socket(o.socket);
        }
        for s in old_sockets {
            if s != path.socket {
                self.close_socket(s);
            }
        }
    }

    fn drive_validator(&mut self, key: RemoteKey) {
        let Some(r) = self.remotes.get_mut(&key) else {
            return;
        };
        let Some(v) = r.validator.as_mut() else {
            return;
        };
        let mut validated = Vec::new();
        while let Some(t) = v.punch.poll_transmit() {
            let Some(socket) = v.sockets.get(t.socket.0).copied() else {
                continue;
            };
            if socket != NO_SOCKET {
                self.out.push_back(Transmit { socket, ..t });
            }
        }
        while let Some(ev) = v.punch.poll_event() {
            match ev {
                PunchEvent::PathValidated { path } | PunchEvent::Heard { path } => {
                    if let Some(g) = v.global_path(path) {
                        validated.push((g, matches!(ev, PunchEvent::PathValidated { .. })));
                    }
                }
                _ => {}
            }
        }
        for (path, switch) in validated {
            self.events
                .push_back(HostEvent::Learn { remote: key, path });
            if switch {
                if let Some(r) = self.remotes.get_mut(&key) {
                    if r.path != Some(path) || r.on_relay {
                        let from = match (std::mem::take(&mut r.on_relay), r.relay) {
                            (true, Some(relay)) => Some(Via::Relay(relay)),
                            _ => r.path.map(Via::Direct),
                        };
                        r.path = Some(path);
                        self.events
                            .push_back(HostEvent::Route { remote: key, path });
                        let strategy = r.strategy;
                        self.events.push_back(HostEvent::PathChanged {
                            remote: key,
                            from,
                            to: Via::Direct(path),
                            strategy,
                            elapsed: None,
                        });
                    }
                }
            }
        }
    }

    fn fail_attempt(&mut self, now: Instant, session: u64, error: ConnectError) {
        let Some(a) = self.attempts.get(&session) else {
            return;
        };
        tracing::debug!(session, peer = %a.peer, %error, "attempt failed");
        self.stats.failed += 1;
        let peer = a.peer;
        match (a.request, a.repair) {
            (Some(request), _) => self.events.push_back(HostEvent::ConnectFailed {
                request,
                peer,
                error,
            }),
            (None, repair) => {
                if let Some(r) = repair.and_then(|k| self.remotes.get_mut(&k)) {
                    r.repairing = None;
                }
                let relayed = a
                    .remote
                    .and_then(|k| self.remotes.get_mut(&k))
                    .filter(|r| r.on_relay || r.strategy == Some(Strategy::Turn));
                match relayed {
                    Some(r) => {
                        // The session goes on over the relay; try direct
                        // again later unless the NATs rule it out.
                        // (A TURN path may still come to a remote not on
                        // one: an allocation being made again after a loss.)
                        let on_turn = r.strategy == Some(Strategy::Turn) && !r.on_relay;
                        let turn = !on_turn && a.punch.as_ref().is_some_and(|p| p.turn_possible());
                        let hopeless = !turn
                            && matches!(
                                error,
                                ConnectError::Punch {
                                    failure: crate::punch::PunchFailure::NoPathPossible(_)
                                        | crate::punch::PunchFailure::UdpBlocked,
                                    ..
                                }
                            );
                        if r.initiator && !hopeless {
                            // (A sooner re-punch, for a path that stalled
                            // meanwhile, stays.)
                            let later = now + defaults::DIRECT_RETRY;
                            r.repunch_at = Some(r.repunch_at.map_or(later, |t| t.min(later)));
                        }
                        let remote = r.key;
                        self.events
                            .push_back(HostEvent::DirectFailed { remote, error });
                    }
                    None => self
                        .events
                        .push_back(HostEvent::AttemptFailed { peer, error }),
                }
            }
        }
        self.finish_attempt(now, session, None);
    }

    /// Ends an attempt: its sockets close (except one a path now uses), its
    /// turn passes on, queued connects may start.
    fn finish_attempt(&mut self, now: Instant, session: u64, keep: Option<Path>) {
        let Some(a) = self.attempts.get(&session) else {
            return;
        };
        let sockets = a.sockets.clone();
        let remote = a.remote;
        // A socket a remote's traffic uses stays (a TURN path may have
        // formed on the attempt's fresh socket). (The main socket is never
        // closed.)
        let in_use: HashSet<SocketId> = self
            .remotes
            .values()
            .filter_map(|r| r.path.map(|p| p.socket))
            .collect();
        for s in sockets {
            if Some(s) != keep.map(|p| p.socket) && s != NO_SOCKET && !in_use.contains(&s) {
                self.close_socket(s);
            }
        }
        self.remove_attempt(now, session);
        if let Some(r) = remote.and_then(|k| self.remotes.get_mut(&k)) {
            if r.sessions == 0 && r.idle_since.is_none() {
                r.idle_since = Some(now);
            }
        }
    }

    fn remove_attempt(&mut self, now: Instant, session: u64) {
        if let Some(a) = self.attempts.remove(&session) {
            if let Some(mut p) = a.punch {
                p.close();
            }
            if a.tcp == TcpStage::Running {
                self.events.push_back(HostEvent::TcpStop { session });
            }
        }
        let fresh: Vec<TransactionId> = self
            .fresh
            .iter()
            .filter(|(_, (s, _))| *s == session)
            .map(|(t, _)| *t)
            .collect();
        for tid in fresh {
            self.stun.cancel(&tid);
            if let Some((_, id)) = self.fresh.remove(&tid) {
                self.close_socket(id);
            }
        }
        self.client.end_session(now, session);
        self.end_turn(now, session);
        // Capacity freed: the next queued connect.
        while let Some((peer, request, started)) = self.queue.front().copied() {
            if !self.has_capacity(peer) {
                break;
            }
            self.queue.pop_front();
            self.start_initiator(now, peer, Some(request), None, started);
        }
    }

    // ---- STUN (fresh mappings) ---------------------------------------

    fn flush_stun(&mut self, now: Instant) {
        while let Some(t) = self.stun.poll_transmit() {
            self.out.push_back(t);
        }
        while let Some(ev) = self.stun.poll_event() {
            let Some((session, id)) = self.fresh.remove(&ev.transaction) else {
                continue;
            };
            let fresh = match &ev.outcome {
                Outcome::Success { response, .. } => response.mapped_address(),
                _ => None,
            };
            // The attempt probes from the fresh socket: its first packet to
            // the peer is certain to make a new mapping (the next port),
            // where the main socket may still hold one toward the peer
            // from an earlier session, which prediction would miss.
            // With a mapped port (ours, or the peer's: its stream may be
            // under way from the main socket already) the attempt stays
            // on the main socket.
            let mapped = self.announced().is_some();
            match (fresh, self.attempts.get_mut(&session)) {
                (Some(_), Some(a))
                    if !mapped && !a.punch.as_ref().is_some_and(|p| p.peer_mapped()) =>
                {
                    a.sockets[0] = id
                }
                _ => self.close_socket(id),
            }
            self.fresh_done(now, session, fresh);
        }
    }

    // ---- output ------------------------------------------------------

    fn pace(&mut self, now: Instant) {
        self.pacer.refill(now);
        while self.pacer.tokens >= 1.0 {
            let Some(t) = self.pacer.queue.pop_front() else {
                break;
            };
            self.pacer.tokens -= 1.0;
            self.out.push_back(t);
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<HostEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let now_hint = self.pacer.last;
        let attempts = self.attempts.values().flat_map(|a| {
            [
                a.punch.as_ref().and_then(|p| p.poll_timeout()),
                a.turn_until,
                a.deferred.as_ref().map(|(_, at)| *at),
                a.tcp_at,
            ]
        });
        let remotes = self
            .remotes
            .values()
            .map(|r| r.poll_timeout(defaults::REMOTE_LINGER));
        [
            self.client.poll_timeout(),
            self.stun.poll_timeout(),
            now_hint.and_then(|n| self.pacer.next_token(n)),
        ]
        .into_iter()
        .chain(attempts)
        .chain(remotes)
        .chain(self.retries.iter().map(|r| Some(r.0)))
        .chain(
            self.streams
                .values()
                .map(|(_, at)| Some(*at + defaults::TCP_UNCLAIMED)),
        )
        .flatten()
        .min()
    }
}

/// A socket slot the budget could not fill: nothing is sent from it.
const NO_SOCKET: SocketId = SocketId(usize::MAX);

/// A punch machine's local ID for our TURN socket `id` is this plus
/// `id`: far above its own (the main socket, birthday's, punched
/// streams), and unchanged when another allocation comes or goes.
const TURN_LOCAL: usize = usize::MAX / 2 + 1;

/// Our socket for a punch machine's local one.
fn global_socket(
    sockets: &[SocketId],
    turn: &[(SocketId, SocketAddr)],
    local: SocketId,
) -> Option<SocketId> {
    match local.0.checked_sub(TURN_LOCAL) {
        Some(g) => turn.iter().find(|(id, _)| id.0 == g).map(|(id, _)| *id),
        None => sockets.get(local.0).copied(),
    }
}

/// The punch machine's local ID for one of our sockets.
fn local_socket(
    sockets: &[SocketId],
    turn: &[(SocketId, SocketAddr)],
    socket: SocketId,
) -> Option<SocketId> {
    if let Some(i) = sockets.iter().position(|s| *s == socket) {
        return Some(SocketId(i));
    }
    turn.iter()
        .any(|(id, _)| *id == socket)
        .then_some(SocketId(TURN_LOCAL + socket.0))
}

/// A punch probe (paced), as opposed to acks and confirms (sent at once).
/// Known TCP facts of a NAT that maps TCP once per local port (not per
/// destination): they stay true from one punch to the next.
fn maps_once(tcp: Option<TcpInfo>) -> bool {
    tcp.is_some_and(|t| t.mapping == Some(Behaviour::EndpointIndependent))
}

fn is_probe(payload: &[u8]) -> bool {
    crate::punch::wire::is_punch(payload) && payload.get(2) == Some(&1)
}

fn push_probe(pacer: &mut Pacer, t: Transmit) {
    if pacer.queue.len() >= defaults::PROBE_QUEUE {
        pacer.queue.pop_front();
        pacer.dropped += 1;
    }
    pacer.queue.push_back(t);
}
