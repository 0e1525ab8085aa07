//! The hole-punching ladder, sans-IO.
//!
//! [`Punch`] runs one attempt between two peers that the rendezvous server
//! introduced. From both NAT reports it picks the technique the pair needs
//! ([`plan::classify`]); each technique is its own module producing probe
//! streams ([`lan`], [`cone`], [`predict`], [`ttl`], [`birthday`]). The
//! machine sends them on schedule, answers the peer's probes, and reports
//! `Connected` once a path is confirmed both ways.
//!
//! Authentication: each peer signs an ephemeral X25519 key with its
//! identity key (the *offer*); both derive the session key from the two
//! ephemerals, so the server cannot forge it. Probes carry the sender's
//! offer until the peer has shown it holds the key; acks, confirms and
//! keepalives always carry a MAC. A stray or forged packet never counts:
//! the initiator connects only on an authenticated ack of its own probe,
//! the responder only on the initiator's authenticated confirm.

pub mod birthday;
pub mod cone;
pub mod lan;
pub mod plan;
pub mod predict;
pub mod ttl;
pub mod wire;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use plan::{classify, PairKind, PlanConfig, SideView, Stream};
pub use wire::Strategy;

use crate::identity::{self, Ephemeral, PeerId};
use crate::rendezvous::wire::{context, offer_bytes, Offer};
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
    /// Keepalive on a connected path: below the 30 s UDP timeout of many
    /// home NATs (RFC 4787 REQ-5 asks for 2 min; routers do less).
    pub const KEEPALIVE: Duration = Duration::from_secs(15);
    /// A connected path with nothing received for this long is dead: three
    /// missed keepalives.
    pub const PATH_DEAD: Duration = Duration::from_secs(45);
    /// Confirms the initiator re-sends while the responder keeps probing.
    pub const MAX_CONFIRMS: u32 = 8;
}

/// Peer-reflexive paths probed back at most (bounds work per attempt).
const MAX_REFLEXIVE: usize = 64;

/// Our role: the initiator nominates the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Initiator,
    Responder,
}

/// Settings for one attempt.
#[derive(Debug, Clone)]
pub struct PunchConfig {
    pub plan: PlanConfig,
    pub timeout: Duration,
    pub keepalive: Duration,
    pub path_dead: Duration,
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
                seed,
            },
            timeout: defaults::TIMEOUT,
            keepalive: defaults::KEEPALIVE,
            path_dead: defaults::PATH_DEAD,
        }
    }
}

/// The confirmed path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Path {
    pub socket: SocketId,
    pub remote: SocketAddr,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PunchEvent {
    /// A technique started sending.
    Attempt {
        strategy: Strategy,
    },
    Connected {
        path: Path,
        strategy: Strategy,
        elapsed: Duration,
        probes_sent: u64,
        bytes_sent: u64,
    },
    Failed {
        reason: String,
    },
    /// The connected path went silent.
    PathLost {
        path: Path,
    },
}

#[derive(Debug)]
struct Running {
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
    created: Instant,
    deadline: Instant,
    streams: Vec<Running>,
    planned: bool,
    /// Peer-reflexive paths already probed back.
    reflexive: Vec<Path>,
    /// When prediction streams start (once both fresh mappings exist).
    prediction_at: Option<Instant>,
    attempted: Vec<Strategy>,
    state: State,
    path: Option<Path>,
    winner: Option<Strategy>,
    confirms: u32,
    last_rx: Instant,
    next_keepalive: Option<Instant>,
    seq: u32,
    probes_sent: u64,
    bytes_sent: u64,
    rejected: u64,
    out: VecDeque<Transmit>,
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

impl Punch {
    /// A new attempt. `offer` must be [`make_offer`] of `eph`. `start_at`
    /// is the coordinated moment from the server.
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
        let mut p = Self {
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
            created: now,
            deadline,
            streams: Vec::new(),
            planned: false,
            reflexive: Vec::new(),
            prediction_at: None,
            attempted: Vec::new(),
            state: State::Waiting,
            path: None,
            winner: None,
            confirms: 0,
            last_rx: now,
            next_keepalive: None,
            seq: 0,
            probes_sent: 0,
            bytes_sent: 0,
            rejected: 0,
            out: VecDeque::new(),
            events: VecDeque::new(),
            cfg,
        };
        if let PairKind::Impossible(reason) = &p.kind {
            p.state = State::Done;
            p.events.push_back(PunchEvent::Failed {
                reason: reason.clone(),
            });
        }
        p
    }

    /// The technique this pair needs.
    pub fn kind(&self) -> &PairKind {
        &self.kind
    }

    /// Sockets the caller must provide (socket 0 is the main one).
    pub fn sockets_needed(&self) -> usize {
        1 + plan::extra_sockets(&self.kind, &self.me, &self.cfg.plan)
    }

    pub fn path(&self) -> Option<Path> {
        self.path
    }

    pub fn session(&self) -> u64 {
        self.session
    }

    /// The session key, once both offers are known (for the data session).
    pub fn session_key(&self) -> Option<[u8; 32]> {
        self.key
    }

    /// Packets dropped as forged, stray or unauthenticated.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// The peer's offer arrived through the server.
    pub fn set_peer_offer(&mut self, ephemeral: &[u8; 32], sig: &[u8]) {
        self.accept_offer(ephemeral, sig);
    }

    /// Both fresh mappings are taken (the server's `Accepted` for the
    /// initiator, `Go` for the responder): prediction starts at `start_at`.
    /// `fresh` is the peer's fresh mapping if this message carries it.
    pub fn set_peer_fresh(&mut self, now: Instant, fresh: Option<SocketAddr>, start_at: Instant) {
        if fresh.is_some() {
            self.peer.fresh = fresh;
        }
        if self.prediction_at.is_some() {
            return;
        }
        self.prediction_at = Some(start_at);
        if self.planned && self.state == State::Punching {
            self.start_prediction(now);
        }
    }

    fn start_prediction(&mut self, now: Instant) {
        let Some(at) = self.prediction_at else { return };
        let extra = plan::prediction_streams(&self.kind, &self.me, &self.peer, &self.cfg.plan);
        self.add_streams(now, at, extra);
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

    fn add_streams(&mut self, now: Instant, start: Instant, streams: Vec<Stream>) {
        for s in streams {
            if !self.attempted.contains(&s.strategy) {
                self.attempted.push(s.strategy);
                self.events.push_back(PunchEvent::Attempt {
                    strategy: s.strategy,
                });
            }
            let next = start.max(now) + s.offset;
            self.streams.push(Running {
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
        self.last_rx = now;
        self.on_frame(now, socket, from, &f);
        true
    }

    fn on_frame(&mut self, now: Instant, socket: SocketId, from: SocketAddr, f: &PunchFrame) {
        let path = Path {
            socket,
            remote: from,
        };
        match f.kind {
            Kind::Probe => {
                if self.key.is_some() {
                    let ack = self.frame(Kind::Ack, f.strategy);
                    self.send(socket, from, ack, None, false);
                }
                // A probe from an address we never aimed at (a mapping the
                // peer's NAT made just now) is a peer-reflexive candidate:
                // probe it back, so the initiator gets an ack to nominate.
                if self.state == State::Punching
                    && !self.reflexive.contains(&path)
                    && self.reflexive.len() < MAX_REFLEXIVE
                {
                    self.reflexive.push(path);
                    let probe = self.frame(Kind::Probe, f.strategy);
                    self.send(socket, from, probe, None, true);
                }
                if self.role == Role::Initiator
                    && self.path == Some(path)
                    && self.confirms < defaults::MAX_CONFIRMS
                {
                    self.send_confirm(path);
                }
            }
            Kind::Ack => {
                if self.role == Role::Initiator && self.state != State::Connected {
                    self.connect(now, path, f.strategy);
                    self.send_confirm(path);
                } else if self.role == Role::Initiator
                    && self.path == Some(path)
                    && self.confirms < defaults::MAX_CONFIRMS
                {
                    self.send_confirm(path);
                }
            }
            Kind::Confirm => {
                if self.role == Role::Responder && self.state != State::Connected {
                    self.connect(now, path, f.strategy);
                }
            }
            Kind::Keepalive => {}
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
        self.winner = Some(strategy);
        self.streams.clear();
        self.next_keepalive = Some(now + self.cfg.keepalive);
        let elapsed = now.checked_duration_since(self.created).unwrap_or_default();
        self.events.push_back(PunchEvent::Connected {
            path,
            strategy,
            elapsed,
            probes_sent: self.probes_sent,
            bytes_sent: self.bytes_sent,
        });
    }

    /// Advances the schedule. A spurious call is a no-op.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Done => return,
            State::Waiting if now >= self.start_at => {
                self.state = State::Punching;
                self.planned = true;
                let streams = plan::streams(&self.kind, &self.me, &self.peer, &self.cfg.plan);
                let start = self.start_at;
                self.add_streams(now, start, streams);
                self.start_prediction(now);
            }
            _ => {}
        }
        if self.state == State::Connected {
            if let (Some(t), Some(path)) = (self.next_keepalive, self.path) {
                if now >= t {
                    let k = self.frame(Kind::Keepalive, self.winner.unwrap_or(Strategy::Cone));
                    self.send(path.socket, path.remote, k, None, false);
                    self.next_keepalive = Some(now + self.cfg.keepalive);
                }
                if now.checked_duration_since(self.last_rx).unwrap_or_default()
                    >= self.cfg.path_dead
                {
                    self.state = State::Done;
                    self.events.push_back(PunchEvent::PathLost { path });
                }
            }
            return;
        }
        if self.state == State::Punching && now >= self.deadline {
            self.state = State::Done;
            self.streams.clear();
            let tried: Vec<&str> = self.attempted.iter().map(|s| s.as_str()).collect();
            self.events.push_back(PunchEvent::Failed {
                reason: format!(
                    "no direct path within {:?} (tried: {}; {} probes sent)",
                    self.cfg.timeout,
                    if tried.is_empty() {
                        "nothing, waiting for the peer's mapping".to_string()
                    } else {
                        tried.join(", ")
                    },
                    self.probes_sent
                ),
            });
            return;
        }
        // Send every due probe.
        let mut due = Vec::new();
        for r in &mut self.streams {
            while now >= r.next && r.round < r.stream.rounds {
                let target = r.stream.targets[r.index];
                let ttl = if r.round == 0 {
                    r.stream.first_ttl
                } else {
                    None
                };
                due.push((r.stream.socket, target, ttl, r.stream.strategy));
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
        for (socket, target, ttl, strategy) in due {
            let p = self.frame(Kind::Probe, strategy);
            self.send(socket, target, p, ttl, true);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Done => None,
            State::Waiting => Some(self.start_at),
            State::Connected => {
                let dead = self.last_rx + self.cfg.path_dead;
                Some(self.next_keepalive.map_or(dead, |k| k.min(dead)))
            }
            State::Punching => Some(
                self.streams
                    .iter()
                    .map(|r| r.next)
                    .min()
                    .map_or(self.deadline, |t| t.min(self.deadline)),
            ),
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<PunchEvent> {
        self.events.pop_front()
    }

    /// Stops the attempt (or the connected path's keepalives).
    pub fn close(&mut self) {
        self.state = State::Done;
        self.streams.clear();
    }
}
