//! The sans-IO rendezvous client: a cookie for every request, a
//! registration and heartbeat when we accept sessions, and per
//! introduction the exchange of offers, facts and the start of prediction.
//!
//! Requests are retransmitted with an RTO derived from the round trip the
//! first answer measured, and each request is *hedged*: a second copy goes
//! out [`HEDGE`] after the first, so one random loss costs nothing. While
//! an introduction waits for the other side, the client polls the server;
//! the server also pushes news, so polls only cover lost pushes.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::wire::{
    self, context, Cookie, DeclineReason, ErrorCode, Frame, Offer, PartyState, PeerInfo, RegStatus,
};
use crate::identity::{Identity, PeerId};
use crate::{SocketId, Transmit};

/// A listener asks "am I still registered?" this often, so that after a
/// server restart (or a NAT that changed our address) it is reachable
/// again within ~3 s plus two round trips (goal: 5 s). ~50 bytes/s.
pub const HEARTBEAT: Duration = Duration::from_secs(3);
/// While the server does not answer, ask this often, so its return is
/// noticed within a second.
pub const LOST_HEARTBEAT: Duration = Duration::from_secs(1);
/// Renew the cookie when it is this old (the server accepts it for
/// [`super::server::COOKIE_LIFETIME`], 600 s), so a request never waits
/// for a fresh one.
pub const COOKIE_RENEW: Duration = Duration::from_secs(60);
/// A cookie an earlier process kept is used up to this age (half the
/// server's lifetime: room for the two clocks to disagree); an older one
/// would likely cost a BadCookie round trip on top of the Hello.
pub const CACHED_COOKIE_MAX_AGE: Duration = Duration::from_secs(300);
/// First retransmission timeout, before any round trip is measured: a
/// lost first Hello costs this. 100 ms re-sends spuriously on paths slower
/// than that, which costs a few small datagrams.
pub const INITIAL_RTO: Duration = Duration::from_millis(100);
/// Bounds on the RTO derived from the measured round trip (2 × SRTT).
pub const MIN_RTO: Duration = Duration::from_millis(50);
pub const MAX_RTO: Duration = Duration::from_secs(2);
/// Sends of one request before giving up (RTO doubling: with a 100 ms RTO
/// the last one leaves at 3.1 s and the request fails at 6.3 s).
pub const MAX_SENDS: u32 = 6;
/// Heartbeats are given up sooner: the server counts as lost after this
/// many unanswered sends.
pub const PING_SENDS: u32 = 3;
/// The second copy of each request leaves this long after the first.
pub const HEDGE: Duration = Duration::from_millis(5);
/// While an introduction waits for the other side or the start, ask the
/// server this often (at least; 3 × SRTT on slower paths). Pushes come
/// hedged, so a poll only covers the rare loss of both copies; a listener
/// with dozens of introductions under way stays far below the server's
/// per-source limit.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Introductions remembered after they end, so that late duplicates of
/// their frames are recognised (and bounded in number).
pub const MAX_SESSIONS: usize = 4096;
/// How long an ended introduction is remembered.
pub const ENDED_KEEP: Duration = Duration::from_secs(60);

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// We are registered (first time, or again after a loss or a
    /// displacement).
    Registered { observed: SocketAddr },
    /// Our Connect was answered with the target's registration.
    Peer {
        session: u64,
        peer: PeerId,
        instance: u64,
        observed: SocketAddr,
        /// Where the server saw our Connect come from.
        yours: SocketAddr,
        info: PeerInfo,
        start_at: Instant,
        /// The node that relays this session (channel = session number).
        relay: Option<super::wire::RelayNode>,
    },
    /// Someone asks to connect to us.
    Incoming {
        session: u64,
        from: PeerId,
        instance: u64,
        observed: SocketAddr,
        offer: Offer,
        info: PeerInfo,
        fresh: Option<SocketAddr>,
        start_at: Instant,
        relay: Option<super::wire::RelayNode>,
    },
    /// The other side's latest state, and the start of prediction once both
    /// mappings are known.
    Sync {
        session: u64,
        peer: Option<PartyState>,
        start_at: Option<Instant>,
    },
    Error {
        code: ErrorCode,
        session: Option<u64>,
        retry_after: Option<Duration>,
    },
    /// A request got no answer after [`MAX_SENDS`] sends (`session`: the
    /// introduction it was for).
    ServerUnreachable {
        server: SocketAddr,
        session: Option<u64>,
    },
    /// Heartbeats stopped being answered.
    ServerLost { server: SocketAddr },
    /// The server answers again.
    ServerBack { server: SocketAddr },
    /// Another process with our key took the registration over.
    Displaced,
    /// The server gave us a new address cookie (worth keeping for the next
    /// process on this network, with the round trip measured so far).
    Cookie {
        cookie: Cookie,
        rtt: Option<Duration>,
    },
}

/// What a request is for; at most one outstanding request per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Hello,
    Register,
    Ping,
    Unregister,
    /// The one outstanding request of an introduction.
    Session(u64),
}

/// A request that needs a cookie to be built.
#[derive(Debug, Clone)]
enum Queued {
    Register,
    Unregister,
    Connect {
        target: PeerId,
        session: u64,
        offer: Offer,
        info: PeerInfo,
        fresh: Option<SocketAddr>,
    },
    Accept {
        session: u64,
        offer: Offer,
        info: PeerInfo,
        fresh: Option<SocketAddr>,
    },
    Update {
        session: u64,
        seq: u32,
        info: PeerInfo,
        fresh: Option<SocketAddr>,
    },
    Poll {
        session: u64,
    },
    Decline {
        session: u64,
        reason: DeclineReason,
    },
}

impl Queued {
    fn kind(&self) -> Kind {
        match self {
            Queued::Register => Kind::Register,
            Queued::Unregister => Kind::Unregister,
            Queued::Connect { session, .. }
            | Queued::Accept { session, .. }
            | Queued::Update { session, .. }
            | Queued::Poll { session }
            | Queued::Decline { session, .. } => Kind::Session(*session),
        }
    }
}

#[derive(Debug)]
struct Pending {
    kind: Kind,
    /// What to re-send with a new cookie.
    origin: Option<Queued>,
    payload: Vec<u8>,
    sends: u32,
    max_sends: u32,
    first_sent: Option<Instant>,
    next: Instant,
    rto: Duration,
}

/// Our side of one introduction.
#[derive(Debug)]
struct Sess {
    /// Our newest state number (Connect/Accept 0, then Updates).
    seq: u32,
    /// The state request to (re)send until the server holds `seq`.
    state: Option<Queued>,
    /// The server holds our state `seq`.
    acked: bool,
    /// An update waiting for the previous state to be acknowledged.
    deferred: Option<Queued>,
    /// The start of prediction arrived.
    go: bool,
    /// The Peer or Incoming frame has been seen.
    introduced: bool,
    next_poll: Option<Instant>,
    ended: Option<Instant>,
}

impl Sess {
    fn new(state: Option<Queued>) -> Self {
        Self {
            seq: 0,
            state,
            acked: false,
            deferred: None,
            go: false,
            introduced: false,
            next_poll: None,
            ended: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    /// Not registering (we do not accept sessions), or not yet.
    No,
    Registered,
    /// Another instance holds our key's registration.
    Displaced,
}

/// The client machine, on one socket.
pub struct RendezvousClient {
    identity: Identity,
    peer: PeerId,
    instance: u64,
    server: SocketAddr,
    socket: SocketId,
    /// We accept sessions, so we register and keep the registration.
    listen: bool,
    info: PeerInfo,
    cookie: Option<(Cookie, Instant)>,
    reg: Reg,
    /// The address the server last saw us at.
    observed: Option<SocketAddr>,
    /// The relay node we are homed on, as the server names itself.
    home: Option<SocketAddr>,
    srtt: Option<Duration>,
    next_ping: Option<Instant>,
    lost: bool,
    closing: bool,
    pending: Vec<Pending>,
    queued: Vec<Queued>,
    sessions: HashMap<u64, Sess>,
    out: VecDeque<Transmit>,
    events: VecDeque<ClientEvent>,
}

impl std::fmt::Debug for RendezvousClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RendezvousClient")
            .field("peer", &self.peer)
            .field("server", &self.server)
            .field("reg", &self.reg)
            .finish_non_exhaustive()
    }
}

impl RendezvousClient {
    /// A client for `identity` (this process is `instance` of it). With
    /// `listen` it registers and keeps the registration alive.
    pub fn new(
        identity: Identity,
        instance: u64,
        server: SocketAddr,
        socket: SocketId,
        listen: bool,
        info: PeerInfo,
    ) -> Self {
        Self {
            peer: identity.peer_id(),
            identity,
            instance,
            server,
            socket,
            listen,
            info,
            cookie: None,
            reg: Reg::No,
            observed: None,
            home: None,
            srtt: None,
            next_ping: None,
            lost: false,
            closing: false,
            pending: Vec::new(),
            queued: Vec::new(),
            sessions: HashMap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    pub fn instance(&self) -> u64 {
        self.instance
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    pub fn is_registered(&self) -> bool {
        self.reg == Reg::Registered
    }

    /// We hold a cookie (requests go out without a Hello first).
    pub fn has_cookie(&self) -> bool {
        self.cookie.is_some()
    }

    /// The smoothed round trip to the server, once measured.
    pub fn rtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The address the server saw us at last.
    pub fn observed(&self) -> Option<SocketAddr> {
        self.observed
    }

    /// Starts: a cookie, and the registration if we listen.
    pub fn start(&mut self, now: Instant) {
        if self.listen {
            self.submit(now, Queued::Register);
        } else if self.cookie.is_none() {
            // A cookie before the first connect, unless one was kept.
            self.hello(now);
        }
    }

    /// Our facts changed: a listener registers them again.
    pub fn set_info(&mut self, now: Instant, info: PeerInfo) {
        if info == self.info {
            return;
        }
        self.info = info;
        if self.listen && self.reg != Reg::Displaced {
            self.submit(now, Queued::Register);
        }
    }

    /// Registers again now (our address may have changed, e.g. a NAT
    /// dropped our mapping), without waiting for the heartbeat to say so.
    pub fn refresh(&mut self, now: Instant) {
        if self.listen && self.reg != Reg::Displaced {
            // The cookie is bound to the old address; a new one is needed.
            self.cookie = None;
            self.submit(now, Queued::Register);
        }
    }

    /// Leaves: a listener unregisters (sent a few times, unanswered is fine).
    pub fn close(&mut self, now: Instant) {
        self.closing = true;
        self.next_ping = None;
        if self.listen && self.reg == Reg::Registered {
            self.submit(now, Queued::Unregister);
        }
    }

    fn hello(&mut self, now: Instant) {
        if self.pending.iter().any(|p| p.kind == Kind::Hello) {
            return;
        }
        let payload = wire::encode(&Frame::Hello { peer: self.peer });
        self.request(now, Kind::Hello, None, payload, MAX_SENDS);
    }

    /// Starts from what an earlier process on this network learned: a
    /// cookie `age` old (used only if younger than
    /// [`CACHED_COOKIE_MAX_AGE`]) and the round trip to the server, so the
    /// first request goes out at once with a fitting RTO, and our start
    /// delay is computed from a real figure. Call before anything is sent.
    pub fn prime(
        &mut self,
        now: Instant,
        cookie: Option<(Cookie, Duration)>,
        rtt: Option<Duration>,
    ) {
        if let Some(rtt) = rtt {
            self.srtt = Some(rtt);
        }
        // The cookie alone would make the server take its age as our
        // round trip; without a figure to claim it is not used.
        if let (Some((c, age)), Some(_)) = (cookie, rtt) {
            if age < CACHED_COOKIE_MAX_AGE {
                self.cookie = Some((c, now.checked_sub(age).unwrap_or(now)));
            }
        }
    }

    /// Our round trip to the server for the server's timing, once measured.
    fn rtt_ms(&self) -> Option<u32> {
        self.srtt
            .map(|d| d.as_millis().min(u128::from(u32::MAX)) as u32)
    }

    fn rto(&self) -> Duration {
        match self.srtt {
            Some(s) => (s * 2).clamp(MIN_RTO, MAX_RTO),
            None => INITIAL_RTO,
        }
    }

    fn request(
        &mut self,
        now: Instant,
        kind: Kind,
        origin: Option<Queued>,
        payload: Vec<u8>,
        max_sends: u32,
    ) {
        tracing::trace!(?kind, ?origin, "rendezvous request");
        self.pending.retain(|p| p.kind != kind);
        let rto = self.rto();
        self.pending.push(Pending {
            kind,
            origin,
            payload,
            sends: 0,
            max_sends,
            first_sent: None,
            next: now,
            rto,
        });
        self.send_due(now);
    }

    fn sign(&self, frame: &mut Frame) {
        let sig = self
            .identity
            .sign(context::FRAME, &wire::signed_bytes(frame))
            .to_vec();
        if let Some(s) = frame.sig_mut() {
            *s = sig;
        }
    }

    /// Asks the server to introduce us to `target`. `info` may still have
    /// pending facts; [`Self::update`] sends them later.
    pub fn connect(
        &mut self,
        now: Instant,
        target: PeerId,
        session: u64,
        offer: Offer,
        info: PeerInfo,
        fresh: Option<SocketAddr>,
    ) {
        let q = Queued::Connect {
            target,
            session,
            offer,
            info,
            fresh,
        };
        self.start_session(session, Sess::new(Some(q.clone())));
        self.submit(now, q);
    }

    /// Answers an introduction.
    pub fn accept(
        &mut self,
        now: Instant,
        session: u64,
        offer: Offer,
        info: PeerInfo,
        fresh: Option<SocketAddr>,
    ) {
        let q = Queued::Accept {
            session,
            offer,
            info,
            fresh,
        };
        if let Some(s) = self.sessions.get_mut(&session) {
            s.state = Some(q.clone());
            s.acked = false;
        }
        self.submit(now, q);
    }

    /// Facts measured since our Connect or Accept (and a fresh mapping).
    /// Sent once the server holds our previous state.
    pub fn update(
        &mut self,
        now: Instant,
        session: u64,
        info: PeerInfo,
        fresh: Option<SocketAddr>,
    ) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if s.ended.is_some() || s.state.is_none() {
            return;
        }
        s.seq += 1;
        let q = Queued::Update {
            session,
            seq: s.seq,
            info,
            fresh,
        };
        if !s.acked {
            s.deferred = Some(q);
            return;
        }
        s.state = Some(q.clone());
        s.acked = false;
        self.submit(now, q);
    }

    /// Our state request for `session` was acknowledged: the deferred
    /// update, if any, goes out now.
    fn state_acked(&mut self, now: Instant, session: u64) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        s.acked = true;
        if let Some(q) = s.deferred.take() {
            s.state = Some(q.clone());
            s.acked = false;
            self.submit(now, q);
        }
    }

    /// Refuses an introduction (see [`Frame::Decline`]).
    pub fn decline(&mut self, now: Instant, session: u64, reason: DeclineReason) {
        let q = Queued::Decline { session, reason };
        match self.sessions.get_mut(&session) {
            Some(s) => {
                s.state = Some(q.clone());
                s.acked = false;
            }
            None => self.start_session(session, Sess::new(Some(q.clone()))),
        }
        self.submit(now, q);
    }

    /// Whether the server holds our newest state of `session` (our
    /// Connect or Accept, and every Update since).
    pub fn holds_our_state(&self, session: u64) -> bool {
        self.sessions.get(&session).is_some_and(|s| s.acked)
    }

    /// We are done with an introduction: no more requests for it.
    pub fn end_session(&mut self, now: Instant, session: u64) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.ended.get_or_insert(now);
            s.next_poll = None;
        }
        self.pending.retain(|p| p.kind != Kind::Session(session));
        self.queued.retain(|q| q.kind() != Kind::Session(session));
    }

    fn start_session(&mut self, session: u64, sess: Sess) {
        if self.sessions.len() >= MAX_SESSIONS {
            // Forget the introduction that ended first (or, if none has
            // ended, the one with the smallest number: bounded either way).
            let victim = self
                .sessions
                .iter()
                .min_by_key(|(id, s)| (s.ended.is_none(), s.ended, **id))
                .map(|(id, _)| *id);
            if let Some(v) = victim {
                self.sessions.remove(&v);
            }
        }
        self.sessions.insert(session, sess);
    }

    fn submit(&mut self, now: Instant, q: Queued) {
        if self.cookie.is_none() {
            let kind = q.kind();
            let is_poll = matches!(q, Queued::Poll { .. });
            if is_poll && self.queued.iter().any(|o| o.kind() == kind) {
                // Whatever waits for this introduction asks as much.
                return;
            }
            // A newer request replaces an older one of the same kind.
            self.queued.retain(|o| o.kind() != kind);
            self.queued.push(q);
            self.hello(now);
            return;
        }
        self.send_queued(now, q);
    }

    fn send_queued(&mut self, now: Instant, q: Queued) {
        let Some((cookie, _)) = self.cookie else {
            self.queued.push(q);
            return;
        };
        let peer = self.peer;
        let origin = q.clone();
        let mut f = match q {
            Queued::Register => Frame::Register {
                peer,
                instance: self.instance,
                cookie,
                info: self.info.clone(),
                rtt_ms: self.rtt_ms(),
                home: self.home,
                sig: Vec::new(),
            },
            Queued::Unregister => Frame::Unregister {
                peer,
                instance: self.instance,
                cookie,
                sig: Vec::new(),
            },
            Queued::Connect {
                target,
                session,
                offer,
                info,
                fresh,
            } => Frame::Connect {
                peer,
                instance: self.instance,
                target,
                cookie,
                session,
                offer,
                info,
                fresh,
                rtt_ms: self.rtt_ms(),
                sig: Vec::new(),
            },
            Queued::Accept {
                session,
                offer,
                info,
                fresh,
            } => Frame::Accept {
                peer,
                cookie,
                session,
                offer,
                info,
                fresh,
                sig: Vec::new(),
            },
            Queued::Update {
                session,
                seq,
                info,
                fresh,
            } => Frame::Update {
                peer,
                cookie,
                session,
                seq,
                info,
                fresh,
                sig: Vec::new(),
            },
            Queued::Poll { session } => Frame::Poll {
                peer,
                cookie,
                session,
            },
            Queued::Decline { session, reason } => Frame::Decline {
                peer,
                cookie,
                session,
                reason,
                sig: Vec::new(),
            },
        };
        self.sign(&mut f);
        let max = if matches!(origin, Queued::Unregister) {
            // Best effort on the way out.
            2
        } else {
            MAX_SENDS
        };
        self.request(now, origin.kind(), Some(origin), wire::encode(&f), max);
    }

    /// A request of `kind` was answered.
    fn done(&mut self, now: Instant, kind: Kind) {
        if let Some(i) = self.pending.iter().position(|p| p.kind == kind) {
            let p = self.pending.swap_remove(i);
            // Karn's rule: only an unambiguous sample (sent once, plus its
            // hedge) measures the round trip.
            if p.sends <= 2 {
                if let Some(first) = p.first_sent {
                    let sample = now.saturating_duration_since(first);
                    self.srtt = Some(match self.srtt {
                        Some(s) => (s * 7 + sample) / 8,
                        None => sample,
                    });
                }
            }
        }
        if self.lost {
            self.lost = false;
            self.events.push_back(ClientEvent::ServerBack {
                server: self.server,
            });
        }
    }

    fn at(now: Instant, ms: u16) -> Instant {
        now + Duration::from_millis(u64::from(ms))
    }

    fn poll_interval(&self) -> Duration {
        self.srtt
            .map_or(POLL_INTERVAL, |s| (s * 3).max(POLL_INTERVAL))
    }

    /// Offers a datagram from `from`; `true` if it was ours.
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, data: &[u8]) -> bool {
        if !wire::is_rendezvous(data) {
            return false;
        }
        if from != self.server {
            tracing::trace!(%from, "rendezvous frame from a non-server address ignored");
            return true;
        }
        let frame = match wire::decode(data) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "bad frame from the server");
                return true;
            }
        };
        self.on_frame(now, frame);
        true
    }

    fn on_frame(&mut self, now: Instant, frame: Frame) {
        match frame {
            Frame::Challenge { cookie } => {
                if !self.pending.iter().any(|p| p.kind == Kind::Hello) {
                    // A duplicate (the hedge's answer): the first one counted.
                    return;
                }
                self.done(now, Kind::Hello);
                self.cookie = Some((cookie, now));
                self.events.push_back(ClientEvent::Cookie {
                    cookie,
                    rtt: self.srtt,
                });
                for q in std::mem::take(&mut self.queued) {
                    self.send_queued(now, q);
                }
            }
            Frame::Registered { observed, home, .. } => {
                if !self.pending.iter().any(|p| p.kind == Kind::Register) {
                    return;
                }
                self.done(now, Kind::Register);
                // A refresh (new facts, same address) is not news.
                let news = self.reg != Reg::Registered || self.observed != Some(observed);
                self.observed = Some(observed);
                self.home = home;
                self.reg = Reg::Registered;
                self.next_ping = Some(now + HEARTBEAT);
                if news {
                    self.events.push_back(ClientEvent::Registered { observed });
                }
            }
            Frame::Pong { status } => self.on_pong(now, status),
            Frame::Peer {
                session,
                peer,
                instance,
                observed,
                yours,
                info,
                start_in_ms,
                relay,
            } => {
                let interval = self.poll_interval();
                let Some(s) = self.sessions.get_mut(&session) else {
                    return;
                };
                if s.introduced || s.ended.is_some() {
                    return;
                }
                s.introduced = true;
                s.next_poll = Some(now + interval);
                self.done(now, Kind::Session(session));
                self.state_acked(now, session);
                self.observed.get_or_insert(yours);
                self.events.push_back(ClientEvent::Peer {
                    session,
                    peer,
                    instance,
                    observed,
                    yours,
                    info,
                    start_at: Self::at(now, start_in_ms),
                    relay,
                });
            }
            Frame::Incoming {
                session,
                from,
                instance,
                observed,
                offer,
                info,
                fresh,
                start_in_ms,
                relay,
            } => {
                if self.sessions.contains_key(&session) {
                    // A duplicate (hedged or repeated for a poll).
                    return;
                }
                let mut s = Sess::new(None);
                s.introduced = true;
                self.start_session(session, s);
                self.events.push_back(ClientEvent::Incoming {
                    session,
                    from,
                    instance,
                    observed,
                    offer,
                    info,
                    fresh,
                    start_at: Self::at(now, start_in_ms),
                    relay,
                });
            }
            Frame::Sync {
                session,
                ack,
                peer,
                start_in_ms,
            } => {
                let interval = self.poll_interval();
                let Some(s) = self.sessions.get_mut(&session) else {
                    return;
                };
                if s.ended.is_some() {
                    return;
                }
                let start_at = start_in_ms.map(|ms| Self::at(now, ms));
                let first_go = start_at.is_some() && !s.go;
                s.go |= start_at.is_some();
                // Keep asking until the start is known, once we have said
                // our part (a target that has not accepted has nothing to
                // wait for yet).
                s.next_poll = (!s.go && s.state.is_some()).then(|| now + interval);
                // The server holds the state we are waiting on (a later one
                // may already be deferred behind it).
                let waiting_on = match &s.state {
                    Some(Queued::Update { seq, .. }) => *seq,
                    _ => 0,
                };
                let holds_ours = ack.is_some_and(|a| a >= waiting_on) && !s.acked;
                let accepting =
                    matches!(s.state, Some(Queued::Accept { .. } | Queued::Update { .. }));
                let outstanding = self
                    .pending
                    .iter()
                    .find(|p| p.kind == Kind::Session(session))
                    .and_then(|p| p.origin.as_ref())
                    .map(|q| matches!(q, Queued::Poll { .. }));
                match outstanding {
                    // A poll is answered by any Sync.
                    Some(true) => self.done(now, Kind::Session(session)),
                    // Our Accept or Update is answered once the server holds it.
                    Some(false) if holds_ours && accepting => {
                        self.done(now, Kind::Session(session))
                    }
                    _ => {}
                }
                if holds_ours && accepting {
                    self.state_acked(now, session);
                }
                // A repeated start changes nothing for the receiver.
                let start_at = if first_go { start_at } else { None };
                self.events.push_back(ClientEvent::Sync {
                    session,
                    peer,
                    start_at,
                });
            }
            Frame::Error {
                code: ErrorCode::BadCookie,
                ..
            } => {
                // Our address changed or the cookie aged: get a new one and
                // re-send what is pending.
                self.cookie = None;
                for p in std::mem::take(&mut self.pending) {
                    // A heartbeat needs no cookie; it is simply sent again.
                    self.queued.extend(p.origin);
                }
                self.hello(now);
            }
            Frame::Error {
                code,
                session,
                retry_after_ms,
            } => {
                if let Some(id) = session {
                    self.pending.retain(|p| p.kind != Kind::Session(id));
                    if let Some(s) = self.sessions.get_mut(&id) {
                        if s.ended.is_some() {
                            return;
                        }
                        s.next_poll = None;
                        // Our own Decline acknowledged: the introduction is over.
                        if matches!(s.state, Some(Queued::Decline { .. })) {
                            s.ended = Some(now);
                            return;
                        }
                        s.ended = Some(now);
                    }
                } else if self.pending.iter().any(|p| p.kind == Kind::Register) {
                    self.pending.retain(|p| p.kind != Kind::Register);
                }
                self.events.push_back(ClientEvent::Error {
                    code,
                    session,
                    retry_after: retry_after_ms.map(|ms| Duration::from_millis(u64::from(ms))),
                });
            }
            _ => {}
        }
    }

    fn on_pong(&mut self, now: Instant, status: RegStatus) {
        let answered = self
            .pending
            .iter()
            .any(|p| p.kind == Kind::Ping || p.kind == Kind::Unregister);
        if answered {
            self.done(now, Kind::Ping);
            self.done(now, Kind::Unregister);
        }
        if self.closing || !self.listen {
            return;
        }
        match status {
            RegStatus::Registered => {
                if self.reg == Reg::Displaced {
                    self.reg = Reg::Registered;
                }
            }
            RegStatus::NotRegistered => {
                // Never registered here, expired, the server restarted, our
                // address changed, or the instance that displaced us left.
                if !self.pending.iter().any(|p| p.kind == Kind::Register) {
                    self.reg = Reg::No;
                    self.cookie = None;
                    self.submit(now, Queued::Register);
                }
            }
            RegStatus::HeldByOther => {
                if self.reg != Reg::Displaced {
                    self.reg = Reg::Displaced;
                    self.events.push_back(ClientEvent::Displaced);
                }
            }
        }
        if self.next_ping.is_none_or(|t| t <= now) {
            self.next_ping = Some(now + HEARTBEAT);
        }
    }

    /// The way to the server changed (UDP gave no answer; a TCP stream
    /// carries the frames now): every request waiting for an answer goes
    /// out again at once, with its full budget of sends.
    pub fn resend_now(&mut self, now: Instant) {
        for p in &mut self.pending {
            p.next = now;
            p.sends = 0;
            p.rto = INITIAL_RTO;
        }
        self.send_due(now);
    }

    /// Retransmits, polls, heartbeats; a spurious call is a no-op.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some((_, got)) = self.cookie {
            if now.saturating_duration_since(got) >= COOKIE_RENEW && !self.closing {
                // A new cookie before the old one ages out; requests keep
                // using the old one until then.
                self.cookie = self.cookie.map(|(c, _)| (c, now));
                self.hello_renew(now);
            }
        }
        if self.listen && !self.closing && self.next_ping.is_some_and(|t| now >= t) {
            self.next_ping = None;
            let payload = wire::encode(&Frame::Ping {
                peer: self.peer,
                instance: self.instance,
            });
            self.request(now, Kind::Ping, None, payload, PING_SENDS);
        }
        let polls: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.ended.is_none() && s.next_poll.is_some_and(|t| now >= t))
            .map(|(id, _)| *id)
            .collect();
        for id in polls {
            if let Some(s) = self.sessions.get_mut(&id) {
                s.next_poll = None;
            }
            let busy = self.pending.iter().any(|p| p.kind == Kind::Session(id))
                || self.queued.iter().any(|q| q.kind() == Kind::Session(id));
            if !busy {
                self.submit(now, Queued::Poll { session: id });
            }
        }
        self.send_due(now);
        self.sessions.retain(|_, s| {
            s.ended
                .is_none_or(|t| now.saturating_duration_since(t) < ENDED_KEEP)
        });
    }

    /// A renewal Hello that does not hold requests back: they keep the
    /// current cookie until the new one arrives.
    fn hello_renew(&mut self, now: Instant) {
        self.hello(now);
    }

    fn send_due(&mut self, now: Instant) {
        let mut gave_up = Vec::new();
        for p in &mut self.pending {
            if now < p.next {
                continue;
            }
            if p.sends >= p.max_sends {
                gave_up.push(p.kind);
                continue;
            }
            p.sends += 1;
            tracing::trace!(kind = ?p.kind, sends = p.sends, "rendezvous send");
            p.first_sent.get_or_insert(now);
            p.next = if p.sends == 1 {
                // The hedge: a second copy right behind the first.
                now + HEDGE
            } else {
                let next = now + p.rto;
                p.rto = (p.rto * 2).min(MAX_RTO);
                next
            };
            self.out.push_back(Transmit {
                socket: self.socket,
                destination: self.server,
                payload: p.payload.clone(),
                ttl: None,
            });
        }
        if gave_up.is_empty() {
            return;
        }
        self.pending.retain(|p| !gave_up.contains(&p.kind));
        for kind in gave_up {
            match kind {
                Kind::Ping | Kind::Register if self.listen => {
                    if !self.lost {
                        self.lost = true;
                        self.events.push_back(ClientEvent::ServerLost {
                            server: self.server,
                        });
                    }
                    // Keep asking, often, so the return is noticed quickly.
                    self.next_ping = Some(now + LOST_HEARTBEAT);
                    if kind == Kind::Register {
                        self.reg = Reg::No;
                    }
                }
                Kind::Unregister => {}
                Kind::Session(id) => {
                    if let Some(s) = self.sessions.get_mut(&id) {
                        s.ended.get_or_insert(now);
                    }
                    self.events.push_back(ClientEvent::ServerUnreachable {
                        server: self.server,
                        session: Some(id),
                    });
                }
                Kind::Hello | Kind::Register | Kind::Ping => {
                    let waiting: Vec<u64> = self
                        .queued
                        .iter()
                        .filter_map(|q| match q.kind() {
                            Kind::Session(id) => Some(id),
                            _ => None,
                        })
                        .collect();
                    self.queued
                        .retain(|q| !matches!(q.kind(), Kind::Session(_)));
                    for id in &waiting {
                        if let Some(s) = self.sessions.get_mut(id) {
                            s.ended.get_or_insert(now);
                        }
                        self.events.push_back(ClientEvent::ServerUnreachable {
                            server: self.server,
                            session: Some(*id),
                        });
                    }
                    if waiting.is_empty() {
                        self.events.push_back(ClientEvent::ServerUnreachable {
                            server: self.server,
                            session: None,
                        });
                    }
                    if self.listen && !self.closing {
                        if !self.lost {
                            self.lost = true;
                            self.events.push_back(ClientEvent::ServerLost {
                                server: self.server,
                            });
                        }
                        self.next_ping = Some(now + LOST_HEARTBEAT);
                    }
                }
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let renew = self.cookie.map(|(_, got)| got + COOKIE_RENEW);
        self.pending
            .iter()
            .map(|p| p.next)
            .chain(self.next_ping)
            .chain(renew.filter(|_| !self.closing))
            .chain(self.sessions.values().filter_map(|s| s.next_poll))
            .min()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }
}
