//! The hole-punching ladder, sans-IO.
//!
//! [`Punch`] runs one attempt between two peers that the rendezvous server
//! introduced. Facts about either NAT may arrive while it runs (a peer
//! that just started is still measuring); on every new fact it classifies
//! the pair again ([`plan::classify`]) and starts the groups of probe
//! streams the technique needs ([`plan::groups`]), never stopping the ones
//! already running, so it escalates rather than restarts. Each technique
//! is its own module producing probe streams ([`lan`], [`cone`],
//! [`predict`], [`ttl`], [`birthday`]). Prediction and anything a
//! symmetric NAT sends wait for the server's coordinated start ("go"),
//! which comes once both mappings are known; a cone's direct probes start
//! at once. The machine sends the streams on schedule, answers the peer's
//! probes, and reports `Connected` once a path is confirmed both ways.
//!
//! A path through a TURN server ([`turn`]: either side's allocation) is
//! probed and confirmed the same way, but it is a relay path: it is
//! reported as `Relayed` and punching goes on, so a direct path found
//! later still wins; a pair that can have no direct path settles on it
//! and then fails with the reason.
//!
//! Authentication: each peer signs an ephemeral X25519 key with its
//! identity key (the *offer*); both derive the session key from the two
//! ephemerals, so the server cannot forge it. Probes carry the sender's
//! offer until the peer has shown it holds the key; acks, confirms and
//! keepalives always carry a MAC. A stray or forged packet never counts:
//! the initiator connects only on an authenticated ack of its own probe,
//! the responder only on the initiator's authenticated confirm. Once
//! connected, the machine keeps the key: it answers probes on new paths
//! and validates a path on request ([`Punch::validate`]), which is how a
//! session follows a NAT that rebinds.

pub mod birthday;
pub mod cone;
pub mod lan;
pub mod plan;
pub mod portmap;
pub mod predict;
pub mod tcp;
pub mod ttl;
pub mod turn;
pub mod wire;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use plan::{classify, Group, NoPath, PairKind, PlanConfig, SideView, Stream};
pub use wire::Strategy;

use crate::identity::{self, Ephemeral, PeerId};
use crate::portmap::Mapped;
use crate::rendezvous::wire::{context, offer_bytes, Offer};
use crate::rendezvous::NatSummary;
use crate::{SocketId, Transmit};
use wire::{Kind, PunchFrame};

/// Defaults, each with its reason.
pub mod defaults {
    use std::time::Duration;

    /// Time between probe rounds to one target: a lost probe costs at most
    /// this; 100 ms keeps a cone pair within 1.5× its physical floor.
    pub const INTERVAL: Duration = Duration::from_millis(100);
    /// Ports probed around a predicted one: covers up to 15 ports taken by
    /// other hosts behind the same NAT between our fresh mapping and the
    /// punch.
    pub const WINDOW: u16 = 16;
    /// Birthday: sockets on the hard side, probes and rate on the easy
    /// side. 256 × 2048 gives 99.97 % (see [`super::birthday`]); 2000 pps
    /// sprays it in about a second without flooding a home uplink
    /// (~2.6 Mbit/s of 129-byte probes).
    pub const BIRTHDAY_SOCKETS: u16 = 256;
    pub const BIRTHDAY_PROBES: u32 = 2048;
    pub const SPRAY_RATE: u32 = 2000;
    /// Give up after this long without a confirmed path.
    pub const TIMEOUT: Duration = Duration::from_secs(10);
    /// Confirms the initiator re-sends while the responder keeps probing.
    pub const MAX_CONFIRMS: u32 = 8;
    /// Probes sent to validate a new path of a connected pair (one per
    /// [`INTERVAL`]) before it counts as dead.
    pub const VALIDATION_TRIES: u32 = 10;
    /// A side still measuring its hops holds its direct probes this long
    /// past the start for the opener TTL: without openers, a probe that
    /// reaches the peer's NAT before the peer's own first packet leaves
    /// makes a Linux NAT map the peer to another port (a conntrack clash).
    /// Hop discovery sends every TTL at once and ends in about one round
    /// trip to the server, which a connector's introduction takes anyway;
    /// when a router stays silent, this caps what waiting costs.
    pub const HOPS_GRACE: Duration = Duration::from_millis(60);
    /// A copy of each probe follows it this long after, in the first
    /// [`HEDGED_ROUNDS`] rounds of streams of at most
    /// [`HEDGE_MAX_TARGETS`] targets (not birthday's sprays). A probe and
    /// its ack cross four access links: at 10 % loss on each a round gets
    /// through 66 % of the time, with the copy about 90 %, so a lost round
    /// (an [`INTERVAL`]) becomes rare at the cost of twice the probes for
    /// 300 ms. The copy trails by 10 ms so that it is not lost in the same
    /// queue overflow as the first.
    pub const PROBE_HEDGE: Duration = Duration::from_millis(10);
    pub const HEDGED_ROUNDS: u32 = 3;
    pub const HEDGE_MAX_TARGETS: usize = 32;
    /// With a mapped port on either side, what needs coordination
    /// (prediction, birthday, limited-TTL openers) waits this long past
    /// the start: the mapped port answers in one peer-to-peer round trip
    /// (a probe, its ack and the confirm: 1.5 RTT, 300 ms at a 200 ms
    /// RTT) plus one lost round, and those techniques then never cost the
    /// hundreds of probes and sockets they would.
    pub const PORTMAP_GRACE: Duration = Duration::from_millis(500);
    /// A pair with no direct path waits at most this long for a port
    /// mapping either side is still asking for: PCP and NAT-PMP answer
    /// across the LAN in milliseconds and their retries reach 1.75 s
    /// (RFC 6886 §3.1: 250 + 500 + 1000 ms); a session is on the relay
    /// meanwhile.
    pub const PORTMAP_WAIT: Duration = Duration::from_secs(2);
    /// A pair with no direct path whose TURN path is found keeps its
    /// attempt this long before failing, so the confirm reaches the
    /// responder (the responder probes until it arrives, each probe
    /// answered by one: ten rounds cover heavy loss).
    pub const RELAY_SETTLE: Duration = Duration::from_secs(1);
    /// A pair with no direct path waits at most this long for a TURN
    /// allocation either side is still making: one Allocate and its 401
    /// challenge are two round trips to the TURN server, three seconds is
    /// the first retransmissions' worth on a lossy path.
    pub const TURN_WAIT: Duration = Duration::from_secs(3);
}

/// Peer-reflexive paths probed back, and paths heard from, at most (bounds
/// work and memory per attempt).
const MAX_REFLEXIVE: usize = 64;

/// Our role: the initiator nominates the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Initiator,
    Responder,
}

/// Settings for one attempt.
#[derive(Debug, Clone)]
pub struct PunchConfig {
    pub plan: PlanConfig,
    pub timeout: Duration,
}

impl PunchConfig {
    pub fn new(seed: u64) -> Self {
        Self {
            plan: PlanConfig {
                window: defaults::WINDOW,
                birthday_sockets: defaults::BIRTHDAY_SOCKETS,
                birthday_probes: defaults::BIRTHDAY_PROBES,
                spray_rate: defaults::SPRAY_RATE,
                interval: defaults::INTERVAL,
                ttl: None,
                tcp_openers: true,
                seed,
            },
            timeout: defaults::TIMEOUT,
        }
    }
}

/// A path: which of our sockets, and the peer's address as seen from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Path {
    pub socket: SocketId,
    pub remote: SocketAddr,
}

/// Why an attempt found no path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PunchFailure {
    /// The two NATs admit no direct path: a relay is needed.
    #[error("{0}")]
    NoPathPossible(NoPath),
    /// Nothing got through in time.
    #[error("no direct path within {} s (tried: {}; {})", .after.as_secs(), tried_list(.tried), probes(*.probes_sent))]
    TimedOut {
        after: Duration,
        tried: Vec<Strategy>,
        probes_sent: u64,
    },
    /// Our network lets no UDP through (the server answers only over
    /// TCP): punching cannot work from here.
    #[error("no direct path possible: this network lets no UDP through (the server answers only over TCP)")]
    UdpBlocked,
    /// Direct paths had to be TCP, and TCP punching found none.
    #[error("no direct TCP path: {reason}")]
    Tcp { reason: String },
}

impl PunchFailure {
    /// A stable machine-readable name.
    pub fn code(&self) -> &'static str {
        match self {
            PunchFailure::NoPathPossible(_) => "no-path-possible",
            PunchFailure::TimedOut { .. } => "punch-timed-out",
            PunchFailure::UdpBlocked => "udp-blocked",
            PunchFailure::Tcp { .. } => "no-tcp-path",
        }
    }
}

fn tried_list(tried: &[Strategy]) -> String {
    if tried.is_empty() {
        "nothing, the NAT facts never arrived".into()
    } else {
        tried
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn probes(n: u64) -> String {
    if n == 1 {
        "1 probe sent".into()
    } else {
        format!("{n} probes sent")
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PunchEvent {
    /// A technique started sending.
    Attempt {
        strategy: Strategy,
    },
    /// An authenticated frame arrived on a path not heard from before.
    Heard {
        path: Path,
    },
    Connected {
        path: Path,
        strategy: Strategy,
        elapsed: Duration,
        probes_sent: u64,
        bytes_sent: u64,
    },
    Failed {
        failure: PunchFailure,
    },
    /// A path asked for with [`Punch::validate`] answered.
    PathValidated {
        path: Path,
    },
    /// A path asked for with [`Punch::validate`] never answered.
    PathDead {
        path: Path,
    },
    /// A TURN relay path is confirmed both ways: it can carry the session
    /// while punching goes on (a direct path still ends the attempt).
    Relayed {
        path: Path,
        elapsed: Duration,
    },
}

#[derive(Debug)]
struct Running {
    /// The group that started it (its label may change with the pair's
    /// kind).
    group: Group,
    stream: Stream,
    round: u32,
    index: usize,
    next: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Punching,
    Connected,
    Done,
}

/// A path being validated on a connected pair.
#[derive(Debug, Clone, Copy)]
struct Validating {
    path: Path,
    next: Instant,
    tries: u32,
}

/// One attempt.
pub struct Punch {
    cfg: PunchConfig,
    role: Role,
    session: u64,
    peer_id: PeerId,
    my_id: PeerId,
    me: SideView,
    peer: SideView,
    kind: PairKind,
    eph: Option<Ephemeral>,
    my_offer: ([u8; 32], [u8; 64]),
    peer_offer: Option<[u8; 32]>,
    key: Option<[u8; 32]>,
    peer_has_key: bool,
    start_at: Instant,
    /// The coordinated start of prediction, once the server set it.
    go_at: Option<Instant>,
    created: Instant,
    deadline: Instant,
    streams: Vec<Running>,
    /// Groups started (each starts once).
    started: Vec<Group>,
    /// Peer-reflexive paths already probed back.
    reflexive: Vec<Path>,
    /// Paths an authenticated frame came from.
    heard: Vec<Path>,
    attempted: Vec<Strategy>,
    state: State,
    path: Option<Path>,
    winner: Option<Strategy>,
    /// Groups held back for a mapped port's chance are planned then.
    held: Option<Instant>,
    confirms: u32,
    validating: Vec<Validating>,
    /// UDP techniques run (off when direct paths must be TCP).
    udp: bool,
    /// A TCP punch is under way: no failure for want of a UDP path yet.
    tcp_pending: bool,
    /// Our sockets that are TCP streams.
    tcp_sockets: Vec<SocketId>,
    /// Our sockets that are TURN allocations.
    turn_sockets: Vec<SocketId>,
    /// The TURN path confirmed both ways, if any, and the confirms sent
    /// on it (initiator).
    relay: Option<Path>,
    relay_confirms: u32,
    /// A pair with no direct path fails then (its TURN path settled).
    settle_until: Option<Instant>,
    seq: u32,
    probes_sent: u64,
    bytes_sent: u64,
    rejected: u64,
    out: VecDeque<Transmit>,
    /// Probe copies due later: (when, socket, target, TTL, label).
    hedges: VecDeque<(Instant, SocketId, SocketAddr, Option<u8>, Strategy)>,
    events: VecDeque<PunchEvent>,
}

impl std::fmt::Debug for Punch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Punch")
            .field("session", &self.session)
            .field("role", &self.role)
            .field("kind", &self.kind)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Makes our signed offer for a session.
pub fn make_offer(
    identity: &identity::Identity,
    session: u64,
    role: Role,
    eph: &Ephemeral,
) -> Offer {
    let e = eph.public();
    let sig = identity.sign(
        context::OFFER,
        &offer_bytes(session, role == Role::Initiator, &e),
    );
    Offer {
        ephemeral: e,
        sig: sig.to_vec(),
    }
}

/// Checks a peer's offer against its ID.
pub fn verify_offer(
    peer: &PeerId,
    session: u64,
    peer_role: Role,
    ephemeral: &[u8; 32],
    sig: &[u8],
) -> bool {
    let Ok(sig) = <[u8; 64]>::try_from(sig) else {
        return false;
    };
    identity::verify(
        peer,
        context::OFFER,
        &offer_bytes(session, peer_role == Role::Initiator, ephemeral),
        &sig,
    )
    .is_ok()
}

/// What `group`'s probes are called for a pair of `kind`: the technique
/// they belong to.
fn label(group: Group, kind: PairKind, peer: &SideView) -> Strategy {
    match group {
        Group::Lan => Strategy::Lan,
        // The direct probes of a pair are the plan's technique's own: for a
        // birthday pair the one mapping they come from is one more port the
        // other side's spray can hit (CI saw exactly that win, reported as
        // "cone").
        Group::Direct => match kind {
            PairKind::Predict => Strategy::Predict,
            PairKind::Ttl => Strategy::Ttl,
            PairKind::Birthday => Strategy::Birthday,
            _ => Strategy::Cone,
        },
        Group::PredictEasy => Strategy::Predict,
        Group::Ttl => Strategy::Ttl,
        Group::BirthdayEasy | Group::BirthdayHard => Strategy::Birthday,
        Group::Portmap => match peer.mapped {
            Some(m) => Strategy::Portmap(m.protocol),
            None => Strategy::Cone,
        },
        Group::Tcp => Strategy::Tcp,
        Group::Turn => Strategy::Turn,
    }
}

/// The streams of `group` that `me` sends to `peer`.
fn group_streams(
    group: Group,
    me: &SideView,
    peer: &SideView,
    cfg: &PlanConfig,
    label: Strategy,
) -> Vec<Stream> {
    match group {
        Group::Lan => lan::streams(me, peer, cfg),
        Group::Direct => cone::streams(peer, cfg, label),
        Group::PredictEasy => predict::easy_streams(peer, cfg),
        Group::Ttl => ttl::streams(me, peer, cfg),
        Group::BirthdayEasy => birthday::easy_streams(peer, cfg),
        Group::BirthdayHard => birthday::hard_streams(peer, cfg),
        Group::Portmap => portmap::streams(peer, cfg),
        // Started by [`Punch::add_tcp_path`] once the driver has a stream.
        Group::Tcp => Vec::new(),
        Group::Turn => turn::streams(peer, cfg),
    }
}

/// Extra sockets `group` needs (birthday: the hard side's many mappings).
fn extra_sockets(group: Group, cfg: &PlanConfig) -> usize {
    if group == Group::BirthdayHard {
        cfg.birthday_sockets as usize
    } else {
        0
    }
}

impl Punch {
    /// A new attempt. `offer` must be [`make_offer`] of `eph`. `start_at`
    /// is the coordinated moment from the server's introduction.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: PunchConfig,
        role: Role,
        session: u64,
        my_id: PeerId,
        peer_id: PeerId,
        eph: Ephemeral,
        offer: &Offer,
        me: SideView,
        peer: SideView,
        now: Instant,
        start_at: Instant,
    ) -> Self {
        let kind = classify(&me, &peer);
        let sig: [u8; 64] = offer.sig.as_slice().try_into().unwrap_or([0; 64]);
        let deadline = start_at.max(now) + cfg.timeout;
        Self {
            role,
            session,
            peer_id,
            my_id,
            me,
            peer,
            kind,
            eph: Some(eph),
            my_offer: (offer.ephemeral, sig),
            peer_offer: None,
            key: None,
            peer_has_key: false,
            start_at,
            go_at: None,
            created: now,
            deadline,
            streams: Vec::new(),
            started: Vec::new(),
            reflexive: Vec::new(),
            heard: Vec::new(),
            attempted: Vec::new(),
            state: State::Waiting,
            path: None,
            winner: None,
            held: None,
            confirms: 0,
            validating: Vec::new(),
            udp: true,
            tcp_pending: false,
            tcp_sockets: Vec::new(),
            turn_sockets: Vec::new(),
            relay: None,
            relay_confirms: 0,
            settle_until: None,
            seq: 0,
            probes_sent: 0,
            bytes_sent: 0,
            rejected: 0,
            out: VecDeque::new(),
            hedges: VecDeque::new(),
            events: VecDeque::new(),
            cfg,
        }
    }

    /// The technique the pair needs, as far as the facts tell now.
    pub fn kind(&self) -> PairKind {
        self.kind
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The peer announced a mapped port.
    pub fn peer_mapped(&self) -> bool {
        self.peer.mapped.is_some()
    }

    /// Sockets the caller must provide (socket 0 is the main one).
    pub fn sockets_needed(&self) -> usize {
        1 + self
            .started
            .iter()
            .map(|g| extra_sockets(*g, &self.cfg.plan))
            .sum::<usize>()
    }

    pub fn path(&self) -> Option<Path> {
        self.path
    }

    pub fn session(&self) -> u64 {
        self.session
    }

    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    /// Still looking for a path (not connected, not failed).
    pub fn is_punching(&self) -> bool {
        matches!(self.state, State::Waiting | State::Punching)
    }

    /// The session key, once both offers are known.
    pub fn session_key(&self) -> Option<[u8; 32]> {
        self.key
    }

    /// Packets dropped as forged, stray or unauthenticated.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    pub fn probes_sent(&self) -> u64 {
        self.probes_sent
    }

    /// The peer's offer arrived through the server.
    pub fn set_peer_offer(&mut self, ephemeral: &[u8; 32], sig: &[u8]) {
        self.accept_offer(ephemeral, sig);
    }

    /// New facts about our own NAT (our fresh mapping, our mapped port).
    pub fn update_me(
        &mut self,
        now: Instant,
        nat: NatSummary,
        fresh: Option<SocketAddr>,
        mapped: Option<Mapped>,
    ) {
        self.me.nat = nat;
        self.me.mapped = mapped;
        if fresh.is_some() {
            self.me.fresh = fresh;
        }
        self.replan(now);
    }

    /// New facts about the peer's NAT (its fresh mapping, its mapped port).
    pub fn update_peer(
        &mut self,
        now: Instant,
        nat: NatSummary,
        fresh: Option<SocketAddr>,
        mapped: Option<Mapped>,
    ) {
        self.peer.nat = nat;
        if self.peer.mapped != mapped {
            // A new (or lost) mapping: the stream to the old one stops,
            // the plan starts one to the new.
            self.peer.mapped = mapped;
            self.streams.retain(|r| r.group != Group::Portmap);
            self.started.retain(|g| *g != Group::Portmap);
        }
        if fresh.is_some() {
            self.peer.fresh = fresh;
        }
        self.replan(now);
    }

    /// The limited TTL of our openers, once hop discovery found it (streams
    /// started from now on open our NAT with it).
    pub fn set_opener_ttl(&mut self, ttl: Option<u8>) {
        if self.cfg.plan.ttl.is_none() {
            self.cfg.plan.ttl = ttl;
        }
    }

    /// The server's coordinated start: both mappings are known, and what
    /// waited for it starts at `start_at`.
    pub fn go(&mut self, now: Instant, start_at: Instant) {
        if self.go_at.is_some() {
            return;
        }
        self.go_at = Some(start_at);
        self.replan(now);
    }

    /// Direct paths must be TCP: no UDP technique runs (`--tcp`, or UDP
    /// is blocked on one side); the attempt waits for
    /// [`Punch::add_tcp_path`] until its deadline.
    pub fn tcp_only(&mut self, now: Instant) {
        self.udp = false;
        self.tcp_pending = true;
        self.streams.retain(|r| r.group == Group::Tcp);
        self.hedges.clear();
        self.replan(now);
    }

    /// Whether UDP techniques run.
    pub fn uses_udp(&self) -> bool {
        self.udp
    }

    /// A TCP punch runs beside: until [`Punch::tcp_failed`], facts that
    /// rule out a UDP path do not end the attempt.
    pub fn set_tcp_pending(&mut self) {
        self.tcp_pending = true;
        // Its SYNs are not probes, but it was tried: a timeout says so.
        if !self.attempted.contains(&Strategy::Tcp) {
            self.attempted.push(Strategy::Tcp);
            self.events.push_back(PunchEvent::Attempt {
                strategy: Strategy::Tcp,
            });
        }
    }

    /// The TCP punch found no stream (`reason`, for people): a TCP-only
    /// attempt fails with it, another goes on as UDP allows.
    pub fn tcp_failed(&mut self, now: Instant, reason: String) {
        self.tcp_pending = false;
        if !self.udp && self.is_punching() {
            self.fail(PunchFailure::Tcp { reason });
            return;
        }
        self.replan(now);
    }

    /// When the attempt gives up.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The coordinated start.
    pub fn start_at(&self) -> Instant {
        self.start_at
    }

    /// The server's go, once known.
    pub fn go_at(&self) -> Option<Instant> {
        self.go_at
    }

    /// Socket `socket` (ours) is a TCP stream the driver connected to the
    /// peer at `remote`: its frames are the TCP technique's; with
    /// `probe`, the machine probes through it (the side whose connect or
    /// accept made it; the other side answers the first probe).
    pub fn add_tcp_path(
        &mut self,
        now: Instant,
        socket: SocketId,
        remote: SocketAddr,
        probe: bool,
    ) {
        if !self.tcp_sockets.contains(&socket) {
            self.tcp_sockets.push(socket);
        }
        if !probe || !self.is_punching() {
            return;
        }
        let stream = Stream {
            strategy: Strategy::Tcp,
            socket,
            targets: vec![remote],
            offset: Duration::ZERO,
            interval: self.cfg.plan.interval,
            rounds: u32::MAX,
            gap: Duration::ZERO,
            first_ttl: None,
        };
        self.add_streams(now, now.max(self.start_at), Group::Tcp, vec![stream]);
        self.handle_timeout(now);
    }

    /// Our sockets `ids` are TURN allocations: the peer's frames on them
    /// come through a relay, and a path there is a relay path.
    pub fn set_turn_sockets(&mut self, ids: Vec<SocketId>) {
        self.turn_sockets = ids;
    }

    /// New TURN relayed addresses of the peer (an allocation finished
    /// after the introduction): probed from now on.
    pub fn update_peer_turn(&mut self, now: Instant, turn: Vec<SocketAddr>) {
        if self.peer.turn == turn {
            return;
        }
        self.peer.turn = turn;
        self.streams.retain(|r| r.group != Group::Turn);
        self.started.retain(|g| *g != Group::Turn);
        self.replan(now);
    }

    /// The TURN path confirmed both ways, if any.
    pub fn relay_path(&self) -> Option<Path> {
        self.relay
    }

    /// Whether `path` goes through a TURN relay (ours or the peer's).
    fn is_turn(&self, path: Path) -> bool {
        self.turn_sockets.contains(&path.socket) || self.peer.turn.contains(&path.remote)
    }

    /// Either side has (or is making) a TURN allocation.
    pub fn turn_possible(&self) -> bool {
        !self.turn_sockets.is_empty()
            || !self.peer.turn.is_empty()
            || self.me.nat.pending.turn
            || self.peer.nat.pending.turn
    }

    /// Nothing direct can come of this attempt any more: what makes
    /// [`Punch::replan`] fail it (no direct path by the facts, no mapped
    /// port, none being asked for, no TCP punch under way).
    fn direct_hopeless(&self) -> bool {
        self.kind == PairKind::Impossible
            && self.udp
            && self.peer.mapped.is_none()
            && self.me.mapped.is_none()
            && !self.me.nat.pending.portmap
            && !self.peer.nat.pending.portmap
            && !self.tcp_pending
    }

    fn relay_found(&mut self, now: Instant, path: Path) {
        if self.relay.is_some() {
            return;
        }
        self.relay = Some(path);
        let elapsed = now.checked_duration_since(self.created).unwrap_or_default();
        tracing::debug!(session = self.session, ?path, "TURN path confirmed");
        self.events.push_back(PunchEvent::Relayed { path, elapsed });
        if self.direct_hopeless() {
            self.settle_until = Some(now + defaults::RELAY_SETTLE);
        }
        if self.role == Role::Responder {
            // The initiator's confirm came: our probes to its relay are
            // done (an initiator that lost our ack probes again, and each
            // probe gets one).
            self.streams.retain(|r| r.group != Group::Turn);
        }
    }

    fn send_relay_confirm(&mut self, path: Path) {
        let c = self.frame(Kind::Confirm, Strategy::Turn);
        self.relay_confirms += 1;
        self.send(path.socket, path.remote, c, None, false);
    }

    /// Starts the groups the facts now call for; fails the attempt when
    /// the facts say no direct path can exist.
    fn replan(&mut self, now: Instant) {
        if self.state != State::Punching {
            return;
        }
        self.kind = classify(&self.me, &self.peer);
        if !self.udp {
            return;
        }
        if !self.peer.turn.is_empty() && !self.started.contains(&Group::Turn) {
            let streams = turn::streams(&self.peer, &self.cfg.plan);
            self.started.push(Group::Turn);
            self.add_streams(now, self.start_at, Group::Turn, streams);
        }
        let mapped = self.peer.mapped.is_some() || self.me.mapped.is_some();
        if self.kind == PairKind::Impossible && !mapped {
            if self.turn_possible() {
                // No direct path, but a TURN path may carry the session:
                // found, it settles first (its confirms get through);
                // not found within the wait (an allocation late, or
                // relayed addresses that do not answer), the attempt
                // fails as it would without.
                if self.settle_until.is_some() {
                    return;
                }
                let until = self.start_at + defaults::TURN_WAIT;
                if now < until {
                    self.held = Some(self.held.map_or(until, |h| h.min(until)));
                    return;
                }
            }
            // A port mapping still being asked for (a gateway answers
            // after the connect went out) comes in an update: until it
            // does, or the wait is over, no direct path is declared.
            let asking = self.me.nat.pending.portmap || self.peer.nat.pending.portmap;
            let until = self.start_at + defaults::PORTMAP_WAIT;
            if asking && now < until {
                self.held = Some(until);
                return;
            }
            if self.tcp_pending {
                // A TCP punch may still find the path.
                return;
            }
            self.fail(PunchFailure::NoPathPossible(NoPath {
                me: self.me.nat,
                peer: self.peer.nat,
            }));
            return;
        }
        if let Some(m) = self.me.mapped {
            // Our mapped port is tried by the peer's probes to it.
            let s = Strategy::Portmap(m.protocol);
            if !self.attempted.contains(&s) {
                self.attempted.push(s);
            }
        }
        // Direct probes are the hard side's part of prediction once the
        // pair needs it; running ones are renamed accordingly.
        let kind = self.kind;
        for r in &mut self.streams {
            if r.group == Group::Direct {
                r.stream.strategy = label(Group::Direct, kind, &self.peer);
            }
        }
        let mut groups = match self.kind {
            PairKind::Undecided => vec![Group::Direct],
            k => plan::groups(k, &self.me),
        };
        // (Not behind one NAT: the LAN path is shorter than a hairpin
        // through the gateway.)
        if self.peer.mapped.is_some() && self.kind != PairKind::Lan {
            groups.insert(0, Group::Portmap);
        }
        for g in groups {
            if self.started.contains(&g) {
                continue;
            }
            if g == Group::Direct && self.awaiting_hops(now) {
                continue;
            }
            let early = plan::starts_early(g, &self.me, &self.peer);
            let at = match (early, self.go_at) {
                (true, _) => self.start_at,
                // A mapped port gets its chance before the costly
                // techniques start (or open their sockets): they are
                // planned once the grace is over.
                (false, Some(go)) if mapped => {
                    let at = go.max(self.start_at + defaults::PORTMAP_GRACE);
                    if at > now {
                        self.held = Some(self.held.map_or(at, |h| h.min(at)));
                        continue;
                    }
                    at
                }
                (false, Some(go)) => go,
                (false, None) => continue,
            };
            let streams = group_streams(
                g,
                &self.me,
                &self.peer,
                &self.cfg.plan,
                label(g, kind, &self.peer),
            );
            if streams.is_empty() {
                // Not ready (a prediction without the peer's fresh mapping):
                // tried again on the next fact.
                continue;
            }
            self.started.push(g);
            self.add_streams(now, at, g, streams);
        }
    }

    /// Our opener TTL is still being measured, and worth waiting for.
    fn awaiting_hops(&self, now: Instant) -> bool {
        self.me.nat.pending.hops
            && self.cfg.plan.ttl.is_none()
            && now < self.start_at + defaults::HOPS_GRACE
    }

    fn peer_role(&self) -> Role {
        match self.role {
            Role::Initiator => Role::Responder,
            Role::Responder => Role::Initiator,
        }
    }

    fn accept_offer(&mut self, ephemeral: &[u8; 32], sig: &[u8]) -> bool {
        if let Some(known) = &self.peer_offer {
            return known == ephemeral;
        }
        if !verify_offer(
            &self.peer_id,
            self.session,
            self.peer_role(),
            ephemeral,
            sig,
        ) {
            return false;
        }
        let Some(eph) = self.eph.take() else {
            return false;
        };
        let (init, resp) = match self.role {
            Role::Initiator => (self.my_id, self.peer_id),
            Role::Responder => (self.peer_id, self.my_id),
        };
        let mut info = b"natpunch/punch/v1".to_vec();
        info.extend_from_slice(init.as_bytes());
        info.extend_from_slice(resp.as_bytes());
        let (ei, er) = match self.role {
            Role::Initiator => (self.my_offer.0, *ephemeral),
            Role::Responder => (*ephemeral, self.my_offer.0),
        };
        info.extend_from_slice(&ei);
        info.extend_from_slice(&er);
        match eph.agree(ephemeral, &self.session.to_be_bytes(), &info) {
            Ok(k) => {
                self.key = Some(k);
                self.peer_offer = Some(*ephemeral);
                true
            }
            Err(_) => false,
        }
    }

    fn add_streams(&mut self, now: Instant, start: Instant, group: Group, streams: Vec<Stream>) {
        for s in streams {
            let next = start.max(now) + s.offset;
            self.streams.push(Running {
                group,
                stream: s,
                round: 0,
                index: 0,
                next,
            });
        }
    }

    fn frame(&mut self, kind: Kind, strategy: Strategy) -> Vec<u8> {
        self.seq = self.seq.wrapping_add(1);
        let offer = (!self.peer_has_key).then_some((&self.my_offer.0, &self.my_offer.1));
        wire::encode(
            kind,
            strategy,
            self.session,
            self.seq,
            offer,
            self.key.as_ref(),
        )
    }

    fn send(
        &mut self,
        socket: SocketId,
        destination: SocketAddr,
        payload: Vec<u8>,
        ttl: Option<u8>,
        probe: bool,
    ) {
        if probe {
            self.probes_sent += 1;
        }
        self.bytes_sent += payload.len() as u64;
        self.out.push_back(Transmit {
            socket,
            destination,
            payload,
            ttl,
        });
    }

    /// Offers a datagram; `true` if it was a punch frame (ours or not).
    pub fn handle_input(
        &mut self,
        now: Instant,
        socket: SocketId,
        from: SocketAddr,
        data: &[u8],
    ) -> bool {
        if !wire::is_punch(data) {
            return false;
        }
        if self.state == State::Done {
            return true;
        }
        let f = match wire::decode(data) {
            Ok(f) if f.session == self.session => f,
            _ => {
                self.rejected += 1;
                tracing::trace!(%from, "punch frame for another session or malformed");
                return true;
            }
        };
        if let Some((e, s)) = &f.offer {
            if !self.accept_offer(e, s) {
                self.rejected += 1;
                tracing::debug!(%from, "punch frame with a forged offer");
                return true;
            }
        }
        let authentic = match (&f.mac, &self.key) {
            (Some(_), Some(k)) => wire::verify_mac(&f, data, k),
            (Some(_), None) => false,
            // Only a probe may come without a MAC (the initiator's opener
            // before it knows the key), and only with a valid offer.
            (None, _) => f.kind == Kind::Probe && f.offer.is_some(),
        };
        if !authentic {
            self.rejected += 1;
            tracing::debug!(%from, "unauthenticated punch frame dropped");
            return true;
        }
        if f.mac.is_some() {
            self.peer_has_key = true;
        }
        let path = Path {
            socket,
            remote: from,
        };
        if !self.heard.contains(&path) && self.heard.len() < MAX_REFLEXIVE {
            self.heard.push(path);
            self.events.push_back(PunchEvent::Heard { path });
        }
        self.on_frame(now, path, &f);
        true
    }

    fn on_frame(&mut self, now: Instant, path: Path, f: &PunchFrame) {
        match f.kind {
            Kind::Probe => {
                let strategy = self.path_label(path, f.strategy);
                if self.key.is_some() {
                    let ack = self.frame(Kind::Ack, strategy);
                    self.send(path.socket, path.remote, ack, None, false);
                }
                let probes_before = self.probes_sent;
                // A probe from an address we never aimed at (a mapping the
                // peer's NAT made just now) is a peer-reflexive candidate:
                // probe it back, so the initiator gets an ack to nominate.
                if self.state == State::Punching
                    && !self.reflexive.contains(&path)
                    && self.reflexive.len() < MAX_REFLEXIVE
                {
                    self.reflexive.push(path);
                    let probe = self.frame(Kind::Probe, strategy);
                    self.send(path.socket, path.remote, probe, None, true);
                }
                if self.role == Role::Initiator
                    && self.path == Some(path)
                    && self.confirms < defaults::MAX_CONFIRMS
                {
                    self.send_confirm(path);
                }
                if self.role == Role::Initiator
                    && self.relay == Some(path)
                    && self.relay_confirms < defaults::MAX_CONFIRMS
                {
                    self.send_relay_confirm(path);
                }
                // An initiator holding the allocation has no stream of its
                // own toward the peer: each probe that comes through it
                // is answered by one of ours (above, only the first is),
                // until an ack confirms the path.
                if self.role == Role::Initiator
                    && self.relay.is_none()
                    && self.is_punching()
                    && self.turn_sockets.contains(&path.socket)
                    && self.probes_sent == probes_before
                {
                    let probe = self.frame(Kind::Probe, Strategy::Turn);
                    self.send(path.socket, path.remote, probe, None, true);
                }
            }
            Kind::Ack if self.is_turn(path) => {
                if let Some(i) = self.validating.iter().position(|v| v.path == path) {
                    self.validating.swap_remove(i);
                }
                // A relay path: noted, confirmed, and punching goes on.
                if self.role == Role::Initiator && self.is_punching() {
                    self.relay_found(now, path);
                    if self.relay == Some(path) && self.relay_confirms < defaults::MAX_CONFIRMS {
                        self.send_relay_confirm(path);
                    }
                }
            }
            Kind::Ack => {
                if let Some(i) = self.validating.iter().position(|v| v.path == path) {
                    self.validating.swap_remove(i);
                    self.events.push_back(PunchEvent::PathValidated { path });
                }
                if self.role == Role::Initiator && self.state == State::Punching {
                    let strategy = self.path_label(path, f.strategy);
                    self.connect(now, path, strategy);
                    self.send_confirm(path);
                } else if self.role == Role::Initiator
                    && self.path == Some(path)
                    && self.confirms < defaults::MAX_CONFIRMS
                {
                    self.send_confirm(path);
                }
            }
            Kind::Confirm if self.is_turn(path) => {
                if self.role == Role::Responder && self.is_punching() {
                    self.relay_found(now, path);
                }
            }
            Kind::Confirm => {
                // Also before our own start: we ack in any state, so the
                // initiator may nominate (and, punch-only, exit after its
                // confirms) before our coordinated start comes.
                if self.role == Role::Responder
                    && matches!(self.state, State::Punching | State::Waiting)
                {
                    self.connect(now, path, f.strategy);
                }
            }
            Kind::Keepalive => {}
        }
    }

    /// The technique a path to the peer's mapped port belongs to, whatever
    /// probe crossed it first (the peer's own probes leave from that port
    /// too, labelled with its plan's technique).
    fn path_label(&self, path: Path, label: Strategy) -> Strategy {
        if self.tcp_sockets.contains(&path.socket) {
            return Strategy::Tcp;
        }
        if self.is_turn(path) {
            return Strategy::Turn;
        }
        match self.peer.mapped {
            Some(m) if m.addr == path.remote => Strategy::Portmap(m.protocol),
            _ => label,
        }
    }

    fn send_confirm(&mut self, path: Path) {
        let strategy = self.winner.unwrap_or(Strategy::Cone);
        let c = self.frame(Kind::Confirm, strategy);
        self.confirms += 1;
        self.send(path.socket, path.remote, c, None, false);
    }

    fn connect(&mut self, now: Instant, path: Path, strategy: Strategy) {
        self.state = State::Connected;
        self.path = Some(path);
        // The technique is the one whose probe got through (the acked
        // probe's label, for the initiator; its Confirm tells the
        // responder, so both report the same).
        self.winner = Some(strategy);
        self.streams.clear();
        self.hedges.clear();
        let elapsed = now.checked_duration_since(self.created).unwrap_or_default();
        self.events.push_back(PunchEvent::Connected {
            path,
            strategy,
            elapsed,
            probes_sent: self.probes_sent,
            bytes_sent: self.bytes_sent,
        });
    }

    fn fail(&mut self, failure: PunchFailure) {
        self.state = State::Done;
        self.streams.clear();
        self.hedges.clear();
        self.events.push_back(PunchEvent::Failed { failure });
    }

    /// Probes `path` of a connected pair until the peer acknowledges
    /// (`PathValidated`) or [`defaults::VALIDATION_TRIES`] go unanswered
    /// (`PathDead`). Used when the peer's packets start coming from a new
    /// address, before traffic is sent there.
    pub fn validate(&mut self, now: Instant, path: Path) {
        if self.state != State::Connected || self.validating.iter().any(|v| v.path == path) {
            return;
        }
        if self.validating.len() >= MAX_REFLEXIVE {
            return;
        }
        self.validating.push(Validating {
            path,
            next: now,
            tries: 0,
        });
        self.handle_timeout(now);
    }

    /// Advances the schedule. A spurious call is a no-op.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Done => return,
            State::Waiting if now >= self.start_at => {
                self.state = State::Punching;
                self.replan(now);
            }
            _ => {}
        }
        if self.state == State::Connected {
            self.validate_due(now);
            return;
        }
        if self.state == State::Punching
            && !self.started.contains(&Group::Direct)
            && self.me.nat.pending.hops
            && now >= self.start_at + defaults::HOPS_GRACE
        {
            // The opener TTL did not come in time: go without.
            self.replan(now);
        }
        if self.state == State::Punching && self.held.is_some_and(|t| now >= t) {
            self.held = None;
            self.replan(now);
        }
        if self.state == State::Punching && self.settle_until.is_some_and(|t| now >= t) {
            self.settle_until = None;
            if self.direct_hopeless() {
                // The TURN path carries the session; no direct path exists.
                self.fail(PunchFailure::NoPathPossible(NoPath {
                    me: self.me.nat,
                    peer: self.peer.nat,
                }));
                return;
            }
            // Something direct may still come (a TCP punch, a port
            // mapping): the attempt runs to its deadline.
        }
        if self.state == State::Punching && now >= self.deadline {
            let failure = PunchFailure::TimedOut {
                after: self.cfg.timeout,
                tried: self.attempted.clone(),
                probes_sent: self.probes_sent,
            };
            self.fail(failure);
            return;
        }
        // Send every due probe (and, for the first rounds of a small
        // stream, its copy a little later).
        let mut due = Vec::new();
        for r in &mut self.streams {
            while now >= r.next && r.round < r.stream.rounds {
                let target = r.stream.targets[r.index];
                let ttl = if r.round == 0 {
                    r.stream.first_ttl
                } else {
                    None
                };
                let probe = (r.stream.socket, target, ttl, r.stream.strategy);
                due.push(probe);
                if r.round < defaults::HEDGED_ROUNDS
                    && r.stream.targets.len() <= defaults::HEDGE_MAX_TARGETS
                {
                    let (socket, target, ttl, strategy) = probe;
                    self.hedges.push_back((
                        r.next + defaults::PROBE_HEDGE,
                        socket,
                        target,
                        ttl,
                        strategy,
                    ));
                }
                r.index += 1;
                if r.index >= r.stream.targets.len() {
                    r.index = 0;
                    r.round += 1;
                    r.next += r.stream.interval;
                } else {
                    r.next += r.stream.gap;
                }
            }
        }
        self.streams.retain(|r| r.round < r.stream.rounds);
        // Copies are queued in time order per stream; a later stream's copy
        // may be due before an earlier one's, so take every due one.
        let mut i = 0;
        while i < self.hedges.len() {
            if self.hedges[i].0 <= now {
                if let Some((_, socket, target, ttl, strategy)) = self.hedges.remove(i) {
                    due.push((socket, target, ttl, strategy));
                }
            } else {
                i += 1;
            }
        }
        for (socket, target, ttl, strategy) in due {
            // A technique is attempted once its first probe goes out (a
            // scheduled one may never start: a mapped port won first).
            if !self.attempted.contains(&strategy) {
                self.attempted.push(strategy);
                self.events.push_back(PunchEvent::Attempt { strategy });
            }
            let p = self.frame(Kind::Probe, strategy);
            self.send(socket, target, p, ttl, true);
        }
    }

    fn validate_due(&mut self, now: Instant) {
        let strategy = self.winner.unwrap_or(Strategy::Cone);
        let mut sends = Vec::new();
        let mut dead = Vec::new();
        for v in &mut self.validating {
            if now < v.next {
                continue;
            }
            if v.tries >= defaults::VALIDATION_TRIES {
                dead.push(v.path);
                continue;
            }
            v.tries += 1;
            v.next = now + self.cfg.plan.interval;
            sends.push(v.path);
        }
        self.validating.retain(|v| !dead.contains(&v.path));
        for path in dead {
            self.events.push_back(PunchEvent::PathDead { path });
        }
        for path in sends {
            let p = self.frame(Kind::Probe, strategy);
            self.send(path.socket, path.remote, p, None, false);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Done => None,
            State::Waiting => Some(self.start_at),
            State::Connected => self.validating.iter().map(|v| v.next).min(),
            State::Punching => {
                let grace = (!self.started.contains(&Group::Direct) && self.me.nat.pending.hops)
                    .then(|| self.start_at + defaults::HOPS_GRACE);
                Some(
                    self.streams
                        .iter()
                        .map(|r| r.next)
                        .chain(self.hedges.iter().map(|h| h.0))
                        .chain(grace)
                        .chain(self.held)
                        .chain(self.settle_until)
                        .min()
                        .map_or(self.deadline, |t| t.min(self.deadline)),
                )
            }
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<PunchEvent> {
        self.events.pop_front()
    }

    /// Stops the attempt.
    pub fn close(&mut self) {
        self.state = State::Done;
        self.streams.clear();
        self.hedges.clear();
        self.validating.clear();
    }
}
