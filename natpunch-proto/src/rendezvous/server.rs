//! The sans-IO rendezvous server: registrations bound to keys, and
//! coordinated introductions whose facts may arrive late.
//!
//! - A peer proves its address with a stateless cookie (Hello/Challenge,
//!   like a DTLS or QUIC retry cookie) and its identity with an Ed25519
//!   signature over every request that changes state. The server records
//!   the address it observes, never a claimed one.
//! - Nothing unverified gets a reply larger than its request, every source
//!   is rate-limited, every target ID has an introduction budget, and
//!   registrations, sessions and limiter tables are bounded.
//! - There is no way to list peers: a request names the ID it wants.
//! - Listeners register and send heartbeats (`Ping`); a second process
//!   with the same key takes the registration over and the first is told
//!   (`Pong::HeldByOther`), and told again when it may come back.
//! - Each introduction keeps both sides' latest state (offer, facts, fresh
//!   mapping). A side's `Update` or `Poll` is answered with the other
//!   side's state, and once both mappings are known the server fixes one
//!   start for prediction and gives each side its own delay to it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::wire::{
    self, context, Cookie, DeclineReason, ErrorCode, Frame, PartyState, PeerInfo, RegStatus,
};
use crate::identity::{self, PeerId};
use crate::ratelimit::{RateLimit, RateLimiter};
use crate::relay::server::End;
use crate::relay::{RelayConfig, RelayServer, RelayStats};

/// A cookie is good for this long; running clients renew theirs after
/// [`super::client::COOKIE_RENEW`], and a new process may start with one
/// an earlier process on its network kept (up to
/// [`super::client::CACHED_COOKIE_MAX_AGE`]), saving the Hello round trip.
/// It proves only that someone at the address received the server's
/// answer; a longer life only lengthens how long an attacker who was once
/// on that path could keep sending from the address.
pub const COOKIE_LIFETIME: Duration = Duration::from_secs(600);
/// A registration lives this long without a heartbeat: five missed
/// [`super::client::HEARTBEAT`]s, so a crashed listener's key is free again
/// (for a displaced instance) within 15 s.
pub const REGISTRATION_TTL: Duration = Duration::from_secs(15);
/// An introduction lives this long: longer than any punch attempt
/// (10 s by default) plus its rendezvous round trips.
pub const SESSION_TTL: Duration = Duration::from_secs(30);
/// A peer's round trip when it claims none and its cookie is old: half of
/// it delays that peer's start, so an old cookie must not stand for it.
/// One second covers any terrestrial path.
pub const UNKNOWN_RTT: Duration = Duration::from_secs(1);
/// Added to the staggered start so both peers' first probes leave after
/// they have processed the message (scheduling jitter on loaded hosts).
pub const START_MARGIN: Duration = Duration::from_millis(10);
/// Registrations held at most (memory bound: about 1 KB each).
pub const MAX_REGISTRATIONS: usize = 100_000;
/// Introductions held at most (about 1 KB each).
pub const MAX_SESSIONS: usize = 20_000;
/// Per source address (IP and port, one peer process): 40 frames/s, burst
/// 80. A connect costs about six frames, hedged twice; a listener sends a
/// heartbeat every 3 s and a handful of frames per introduction.
pub const SOURCE_LIMIT: RateLimit = RateLimit {
    rate: 40.0,
    burst: 80.0,
    max_sources: 65_536,
};
/// Per source IP: many peers can share one (a carrier-grade NAT, an
/// office), so the cap is only against floods: 2000 frames/s, burst 4000.
pub const IP_LIMIT: RateLimit = RateLimit {
    rate: 2000.0,
    burst: 4000.0,
    max_sources: 65_536,
};
/// Introductions to one target ID: 20/s, burst 100, sized for a listener
/// that a fleet of laptops reconnects to at once, while a flood of
/// introductions cannot make one peer punch toward thousands of others.
/// Retransmissions and introductions to an offline target cost nothing.
pub const TARGET_LIMIT: RateLimit = RateLimit {
    rate: 20.0,
    burst: 100.0,
    max_sources: 65_536,
};
/// While the target has not answered, an initiator's poll repeats its
/// `Incoming` at most this often (the target may have lost both copies).
pub const INCOMING_REPEAT: Duration = Duration::from_millis(500);
/// Hedging: pushed frames that the receiver does not ask for again
/// (`Incoming`, pushed `Sync`) are sent twice, so that one random loss does
/// not cost a retransmission timeout on the critical path.
pub const PUSH_COPIES: usize = 2;

/// The server's limits (all of them can be lifted for benchmarks).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub source: RateLimit,
    pub ip: RateLimit,
    pub target: RateLimit,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            source: SOURCE_LIMIT,
            ip: IP_LIMIT,
            target: TARGET_LIMIT,
        }
    }
}

impl Limits {
    /// No rate limits at all (benchmarks on loopback only).
    pub fn unlimited() -> Self {
        Self {
            source: RateLimit::unlimited(),
            ip: RateLimit::unlimited(),
            target: RateLimit::unlimited(),
        }
    }
}

/// A datagram to send: from which local address, to whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub payload: Vec<u8>,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RendezvousStats {
    pub received: u64,
    pub malformed: u64,
    pub unsupported_version: u64,
    pub bad_cookie: u64,
    pub bad_signature: u64,
    /// Frames dropped by the per-source or per-IP limits (unanswered).
    pub rate_limited: u64,
    /// Introductions refused because the target's budget was spent.
    pub introduction_limited: u64,
    /// Requests refused because the tables were full.
    pub server_full: u64,
    /// Replies suppressed because they would have been larger than an
    /// unverified request.
    pub amplification_dropped: u64,
    pub registrations: u64,
    /// Registrations another instance of the same key took over.
    pub displaced: u64,
    pub introductions: u64,
    pub updates: u64,
    pub pings: u64,
    /// Requests refused because the server serves members only.
    pub not_member: u64,
}

/// Another instance of a key that a newer registration displaced.
#[derive(Debug, Clone, Copy)]
struct Displaced {
    addr: SocketAddr,
    local: SocketAddr,
    instance: u64,
    expires: Instant,
}

#[derive(Debug, Clone)]
struct Registration {
    addr: SocketAddr,
    local: SocketAddr,
    instance: u64,
    info: PeerInfo,
    rtt: Duration,
    expires: Instant,
    displaced: Option<Displaced>,
    /// The relay node it is homed on (`None`: this one).
    home: Option<SocketAddr>,
}

/// One side of an introduction.
#[derive(Debug, Clone)]
struct Party {
    peer: PeerId,
    instance: u64,
    addr: SocketAddr,
    local: SocketAddr,
    rtt: Duration,
    /// Offer, facts and fresh mapping, once this side has spoken (the
    /// target: once it accepted).
    state: Option<PartyState>,
    /// The last state number received (0: Connect or Accept).
    seq: u32,
}

impl Party {
    fn mapping_known(&self) -> bool {
        self.state
            .as_ref()
            .is_some_and(|s| !s.info.nat.pending.mapping)
    }
}

#[derive(Debug, Clone)]
struct Session {
    initiator: Party,
    target: Party,
    expires: Instant,
    /// The target declined; kept until it expires so that a late or
    /// repeated Connect, Poll or Decline gets the same answer.
    declined: Option<DeclineReason>,
    /// The moment both sides start prediction, once both mappings are
    /// known and the target accepted.
    go: Option<Instant>,
    /// When the target was last sent its `Incoming`.
    incoming_at: Option<Instant>,
    /// A relay channel joins the two (numbered as the session).
    relayed: bool,
}

/// Which side of a session a frame came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SideOf {
    Initiator,
    Target,
}

/// The server machine.
pub struct RendezvousServer {
    secret: [u8; 32],
    base: Option<Instant>,
    regs: HashMap<PeerId, Registration>,
    sessions: HashMap<u64, Session>,
    sources: RateLimiter<SocketAddr>,
    ips: RateLimiter<IpAddr>,
    targets: RateLimiter<PeerId>,
    out: VecDeque<Outgoing>,
    stats: RendezvousStats,
    last_sweep: Option<Instant>,
    relay: RelayServer,
    /// When set, only these peers may register, connect or be connected
    /// to (a peer serving the peers it has sessions with).
    members: Option<HashSet<PeerId>>,
}

impl std::fmt::Debug for RendezvousServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RendezvousServer")
            .field("registrations", &self.regs.len())
            .field("sessions", &self.sessions.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl RendezvousServer {
    /// `secret` keys the address cookies; draw it from the OS at start.
    pub fn new(secret: [u8; 32]) -> Self {
        Self::with_limits(secret, Limits::default())
    }

    pub fn with_limits(secret: [u8; 32], limits: Limits) -> Self {
        Self::with_relay(secret, limits, RelayConfig::default())
    }

    /// With the relay's settings too.
    pub fn with_relay(secret: [u8; 32], limits: Limits, relay: RelayConfig) -> Self {
        Self {
            secret,
            base: None,
            regs: HashMap::new(),
            sessions: HashMap::new(),
            sources: RateLimiter::new(limits.source),
            ips: RateLimiter::new(limits.ip),
            targets: RateLimiter::new(limits.target),
            out: VecDeque::new(),
            stats: RendezvousStats::default(),
            last_sweep: None,
            relay: RelayServer::new(relay),
            members: None,
        }
    }

    pub fn stats(&self) -> RendezvousStats {
        self.stats
    }

    /// Registered peers right now.
    pub fn registered(&self) -> usize {
        self.regs.len()
    }

    /// Serve only these peers (`None`: everyone). Registrations of peers
    /// that are no longer members end at once.
    pub fn set_members(&mut self, members: Option<HashSet<PeerId>>) {
        if let Some(m) = &members {
            self.regs.retain(|p, _| m.contains(p));
        }
        self.members = members;
    }

    fn is_member(&self, peer: &PeerId) -> bool {
        self.members.as_ref().is_none_or(|m| m.contains(peer))
    }

    /// The relay's counters, channels open and peers on them now.
    pub fn relay_stats(&self) -> (RelayStats, usize, usize) {
        (
            self.relay.stats(),
            self.relay.channels(),
            self.relay.peers(),
        )
    }

    /// Handles one relay frame (first byte 0x2C) that arrived from `from`.
    /// Relay frames have their own per-peer budgets, not the per-source
    /// limits of control frames.
    pub fn handle_relay(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        self.relay.handle(now, from, data, &mut self.out);
    }

    fn ms(&mut self, now: Instant) -> u32 {
        let base = *self.base.get_or_insert(now);
        now.checked_duration_since(base)
            .unwrap_or_default()
            .as_millis() as u32
    }

    /// A cookie binds the issue time and the source IP address only: not
    /// the port, so that every socket and process of a host (or of hosts
    /// behind one NAT address) can use it, and not the peer ID, which each
    /// request proves by its signature instead.
    fn mac(&self, issued_ms: u32, addr: SocketAddr) -> [u8; 16] {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.secret)
            .expect("HMAC takes any key length");
        m.update(&issued_ms.to_be_bytes());
        m.update(addr.ip().to_canonical().to_string().as_bytes());
        let full: [u8; 32] = m.finalize().into_bytes().into();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    /// Checks a cookie; returns the time since it was issued (an RTT
    /// estimate when the client answered at once).
    fn check_cookie(&mut self, now: Instant, c: &Cookie, from: SocketAddr) -> Option<Duration> {
        let age = Duration::from_millis(u64::from(self.ms(now).wrapping_sub(c.issued_ms)));
        let expected = self.mac(c.issued_ms, from);
        let equal = expected
            .iter()
            .zip(c.mac.iter())
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            == 0;
        if equal && age <= COOKIE_LIFETIME {
            Some(age)
        } else {
            self.stats.bad_cookie += 1;
            None
        }
    }

    fn send(&mut self, from: SocketAddr, to: SocketAddr, frame: &Frame) {
        self.out.push_back(Outgoing {
            from,
            to,
            payload: wire::encode(frame),
        });
    }

    /// A frame the receiver will not ask for again: sent [`PUSH_COPIES`]
    /// times.
    fn push(&mut self, from: SocketAddr, to: SocketAddr, frame: &Frame) {
        let payload = wire::encode(frame);
        for _ in 0..PUSH_COPIES {
            self.out.push_back(Outgoing {
                from,
                to,
                payload: payload.clone(),
            });
        }
    }

    /// Replies to a not-yet-verified request only if the reply is no
    /// larger than the request.
    fn reply_unverified(
        &mut self,
        local: SocketAddr,
        to: SocketAddr,
        request_len: usize,
        frame: &Frame,
    ) {
        let payload = wire::encode(frame);
        if payload.len() > request_len {
            self.stats.amplification_dropped += 1;
            return;
        }
        self.out.push_back(Outgoing {
            from: local,
            to,
            payload,
        });
    }

    fn error(&mut self, r: &Request, code: ErrorCode, session: Option<u64>) {
        self.error_after(r, code, session, None);
    }

    fn error_after(
        &mut self,
        r: &Request,
        code: ErrorCode,
        session: Option<u64>,
        retry_after: Option<Duration>,
    ) {
        let retry_after_ms = retry_after.map(|d| d.as_millis().min(u128::from(u32::MAX)) as u32);
        self.reply_unverified(
            r.local,
            r.from,
            r.len,
            &Frame::Error {
                code,
                session,
                retry_after_ms,
            },
        );
    }

    /// Checks a request's address cookie and signature; the cookie's age.
    fn authenticate(
        &mut self,
        r: &Request,
        frame: &Frame,
        peer: &PeerId,
        cookie: &Cookie,
        sig: &[u8],
    ) -> Result<Duration, ErrorCode> {
        let Some(age) = self.check_cookie(r.now, cookie, r.from) else {
            return Err(ErrorCode::BadCookie);
        };
        if !self.verify(frame, peer, sig) {
            return Err(ErrorCode::BadSignature);
        }
        Ok(age)
    }

    fn verify(&mut self, frame: &Frame, peer: &PeerId, sig: &[u8]) -> bool {
        let Ok(sig) = <[u8; 64]>::try_from(sig) else {
            self.stats.bad_signature += 1;
            return false;
        };
        let ok = identity::verify(peer, context::FRAME, &wire::signed_bytes(frame), &sig).is_ok();
        if !ok {
            self.stats.bad_signature += 1;
        }
        ok
    }

    /// The session `session` and which side `peer` is in it.
    fn side_of(&self, session: u64, peer: &PeerId) -> Option<SideOf> {
        let s = self.sessions.get(&session)?;
        if s.initiator.peer == *peer {
            Some(SideOf::Initiator)
        } else if s.target.peer == *peer {
            Some(SideOf::Target)
        } else {
            None
        }
    }

    /// Handles one datagram that arrived on `local` from `from`.
    pub fn handle(&mut self, now: Instant, local: SocketAddr, from: SocketAddr, data: &[u8]) {
        self.stats.received += 1;
        if !self.sources.allow(now, from) || !self.ips.allow(now, from.ip()) {
            self.stats.rate_limited += 1;
            return;
        }
        let r = Request {
            now,
            local,
            from,
            len: data.len(),
        };
        let frame = match wire::decode(data) {
            Ok(f) => f,
            Err(wire::WireError::UnsupportedVersion { got }) => {
                self.stats.unsupported_version += 1;
                tracing::debug!(%from, got, "rendezvous frame of unsupported version");
                return self.error(&r, ErrorCode::UnsupportedVersion, None);
            }
            Err(e) => {
                self.stats.malformed += 1;
                tracing::trace!(%from, error = %e, "dropped malformed rendezvous frame");
                return;
            }
        };
        self.expire(now);
        match &frame {
            Frame::Hello { .. } => {
                let issued_ms = self.ms(now);
                let mac = self.mac(issued_ms, from);
                self.reply_unverified(
                    local,
                    from,
                    r.len,
                    &Frame::Challenge {
                        cookie: Cookie { issued_ms, mac },
                    },
                );
            }
            Frame::Register {
                peer,
                instance,
                cookie,
                info,
                rtt_ms,
                home,
                sig,
            } => match self.authenticate(&r, &frame, peer, cookie, sig) {
                Ok(_) if !self.is_member(peer) => {
                    self.stats.not_member += 1;
                    self.error(&r, ErrorCode::NotMember, None)
                }
                Ok(age) => {
                    let rtt = round_trip(age, *rtt_ms);
                    let home = home.filter(|h| Some(*h) != self.relay.public());
                    self.register(&r, *peer, *instance, vetted(info, from), rtt, home)
                }
                Err(code) => self.error(&r, code, None),
            },
            Frame::Ping { peer, instance } => self.ping(&r, *peer, *instance),
            Frame::Unregister {
                peer,
                instance,
                cookie,
                sig,
            } if self.authenticate(&r, &frame, peer, cookie, sig).is_ok() => {
                self.unregister(&r, *peer, *instance);
            }
            Frame::Connect {
                peer,
                instance,
                target,
                cookie,
                session,
                offer,
                info,
                fresh,
                rtt_ms,
                sig,
            } => {
                let rtt = match self.authenticate(&r, &frame, peer, cookie, sig) {
                    Ok(age) => round_trip(age, *rtt_ms),
                    Err(code) => return self.error(&r, code, Some(*session)),
                };
                let me = Party {
                    peer: *peer,
                    instance: *instance,
                    addr: from,
                    local,
                    rtt,
                    state: Some(PartyState {
                        offer: offer.clone(),
                        info: vetted(info, from),
                        fresh: *fresh,
                    }),
                    seq: 0,
                };
                self.connect(&r, me, *target, *session);
            }
            Frame::Accept {
                peer,
                cookie,
                session,
                offer,
                info,
                fresh,
                sig,
            } => {
                if let Err(code) = self.authenticate(&r, &frame, peer, cookie, sig) {
                    return self.error(&r, code, Some(*session));
                }
                if self.side_of(*session, peer) != Some(SideOf::Target) {
                    return self.error(&r, ErrorCode::NoSession, Some(*session));
                }
                self.relay.accept(*session);
                let state = PartyState {
                    offer: offer.clone(),
                    info: vetted(info, from),
                    fresh: *fresh,
                };
                self.new_state(&r, *session, SideOf::Target, 0, state);
            }
            Frame::Update {
                peer,
                cookie,
                session,
                seq,
                info,
                fresh,
                sig,
            } => {
                if let Err(code) = self.authenticate(&r, &frame, peer, cookie, sig) {
                    return self.error(&r, code, Some(*session));
                }
                let Some(side) = self.side_of(*session, peer) else {
                    return self.error(&r, ErrorCode::NoSession, Some(*session));
                };
                let offer = self
                    .sessions
                    .get(session)
                    .and_then(|s| s.party(side).state.as_ref())
                    .map(|s| s.offer.clone());
                let Some(offer) = offer else {
                    // A target updating before it accepted: nothing to
                    // update yet; its Accept carries the facts.
                    return self.error(&r, ErrorCode::NoSession, Some(*session));
                };
                self.stats.updates += 1;
                let state = PartyState {
                    offer,
                    info: vetted(info, from),
                    fresh: *fresh,
                };
                self.new_state(&r, *session, side, *seq, state);
            }
            Frame::Poll {
                peer,
                cookie,
                session,
            } => {
                if self.check_cookie(now, cookie, from).is_none() {
                    return self.error(&r, ErrorCode::BadCookie, Some(*session));
                }
                let Some(side) = self.side_of(*session, peer) else {
                    return self.error(&r, ErrorCode::NoSession, Some(*session));
                };
                self.poll(&r, *session, side);
            }
            Frame::Decline {
                peer,
                cookie,
                session,
                reason,
                sig,
            } => {
                if let Err(code) = self.authenticate(&r, &frame, peer, cookie, sig) {
                    return self.error(&r, code, Some(*session));
                }
                if self.side_of(*session, peer) != Some(SideOf::Target) {
                    return self.error(&r, ErrorCode::NoSession, Some(*session));
                }
                self.decline(&r, *session, *reason);
            }
            // Server-to-client frames arriving here are ignored.
            _ => {}
        }
    }

    fn register(
        &mut self,
        r: &Request,
        peer: PeerId,
        instance: u64,
        info: PeerInfo,
        rtt: Duration,
        home: Option<SocketAddr>,
    ) {
        if !self.regs.contains_key(&peer) && self.regs.len() >= MAX_REGISTRATIONS {
            self.stats.server_full += 1;
            return self.error(r, ErrorCode::ServerFull, None);
        }
        let old = self.regs.get(&peer).cloned();
        let displaced = match old {
            // Another process with this key, still alive: it loses the
            // registration and is told so.
            Some(o) if o.instance != instance && o.expires > r.now => {
                self.stats.displaced += 1;
                self.push(
                    o.local,
                    o.addr,
                    &Frame::Pong {
                        status: RegStatus::HeldByOther,
                    },
                );
                Some(Displaced {
                    addr: o.addr,
                    local: o.local,
                    instance: o.instance,
                    expires: r.now + REGISTRATION_TTL,
                })
            }
            // The same process again (perhaps from a new address), or the
            // old one expired: keep whatever it had displaced.
            Some(o) => o.displaced.filter(|d| d.instance != instance),
            None => None,
        };
        self.relay.rebind(peer, instance, r.from, r.local);
        self.regs.insert(
            peer,
            Registration {
                addr: r.from,
                local: r.local,
                instance,
                info,
                rtt,
                expires: r.now + REGISTRATION_TTL,
                displaced,
                home,
            },
        );
        self.stats.registrations += 1;
        let expires_s = REGISTRATION_TTL.as_secs() as u16;
        self.send(
            r.local,
            r.from,
            &Frame::Registered {
                observed: r.from,
                expires_s,
                home: self.relay.public(),
            },
        );
    }

    fn ping(&mut self, r: &Request, peer: PeerId, instance: u64) {
        self.stats.pings += 1;
        let status = match self.regs.get_mut(&peer) {
            Some(reg) if reg.instance == instance && reg.addr == r.from => {
                reg.expires = r.now + REGISTRATION_TTL;
                RegStatus::Registered
            }
            // Only the displaced instance hears that another holds the key;
            // anyone else learns nothing about the registration.
            Some(reg)
                if reg
                    .displaced
                    .is_some_and(|d| d.instance == instance && d.expires > r.now) =>
            {
                if let Some(d) = reg.displaced.as_mut() {
                    d.addr = r.from;
                    d.local = r.local;
                    d.expires = r.now + REGISTRATION_TTL;
                }
                RegStatus::HeldByOther
            }
            _ => RegStatus::NotRegistered,
        };
        self.reply_unverified(r.local, r.from, r.len, &Frame::Pong { status });
    }

    fn unregister(&mut self, r: &Request, peer: PeerId, instance: u64) {
        if self
            .regs
            .get(&peer)
            .is_some_and(|reg| reg.instance == instance)
        {
            if let Some(old) = self.regs.remove(&peer) {
                self.vacate(&old, r.now);
            }
        }
        self.send(
            r.local,
            r.from,
            &Frame::Pong {
                status: RegStatus::NotRegistered,
            },
        );
    }

    /// A registration ended: the instance it displaced may come back.
    fn vacate(&mut self, old: &Registration, now: Instant) {
        if let Some(d) = old.displaced.filter(|d| d.expires > now) {
            self.push(
                d.local,
                d.addr,
                &Frame::Pong {
                    status: RegStatus::NotRegistered,
                },
            );
        }
    }

    fn connect(&mut self, r: &Request, me: Party, target: PeerId, session: u64) {
        if !self.is_member(&me.peer) || !self.is_member(&target) {
            self.stats.not_member += 1;
            return self.error(r, ErrorCode::NotMember, Some(session));
        }
        // A signed request from a new address (a re-punch after the NAT
        // rebound): the peer's relay channels follow it.
        self.relay.rebind(me.peer, me.instance, me.addr, me.local);
        if let Some(s) = self.sessions.get(&session) {
            if s.initiator.peer != me.peer || s.target.peer != target {
                // Someone else's session number: refuse without revealing it.
                return self.error(r, ErrorCode::NoSession, Some(session));
            }
            if let Some(reason) = s.declined {
                return self.error(r, ErrorCode::Declined(reason), Some(session));
            }
            // A retransmission (our answer was lost or slow): introduce
            // again, without spending the target's budget.
            return self.introduce(r.now, session, false);
        }
        let Some(them) = self
            .regs
            .get(&target)
            .filter(|t| t.expires > r.now)
            .cloned()
        else {
            return self.error(r, ErrorCode::PeerOffline, Some(session));
        };
        if !self.targets.allow(r.now, target) {
            self.stats.introduction_limited += 1;
            let wait = self.targets.retry_after(r.now, target);
            return self.error_after(r, ErrorCode::IntroductionLimit, Some(session), Some(wait));
        }
        if self.sessions.len() >= MAX_SESSIONS {
            self.stats.server_full += 1;
            return self.error(r, ErrorCode::ServerFull, Some(session));
        }
        self.stats.introductions += 1;
        let end = |p: &Party| End {
            peer: p.peer,
            instance: p.instance,
            addr: p.addr,
            local: p.local,
        };
        let target_end = End {
            peer: target,
            instance: them.instance,
            addr: them.addr,
            local: them.local,
        };
        // The target's home node relays the session; a target homed on
        // another node is relayed there (no state is shared between
        // nodes), so this one opens no channel.
        let relayed = if let Some(elsewhere) = them.home {
            tracing::debug!(session, %elsewhere, "target homed on another relay node");
            false
        } else {
            match self.relay.open(r.now, session, end(&me), target_end) {
                Ok(()) => true,
                Err(e) => {
                    if self.relay.enabled() {
                        tracing::debug!(session, error = %e, "no relay channel");
                    }
                    false
                }
            }
        };
        self.sessions.insert(
            session,
            Session {
                target: Party {
                    peer: target,
                    instance: them.instance,
                    addr: them.addr,
                    local: them.local,
                    rtt: them.rtt,
                    state: None,
                    seq: 0,
                },
                initiator: me,
                expires: r.now + SESSION_TTL,
                declined: None,
                go: None,
                incoming_at: None,
                relayed,
            },
        );
        self.introduce(r.now, session, true);
    }

    /// The relay node of a session this node relays (itself).
    fn relay_node(&self, relayed: bool) -> Option<super::wire::RelayNode> {
        relayed.then(|| super::wire::RelayNode {
            addr: self.relay.public(),
        })
    }

    /// Sends the initiator its `Peer` and the target its `Incoming`.
    fn introduce(&mut self, now: Instant, session: u64, first: bool) {
        let Some(s) = self.sessions.get(&session).cloned() else {
            return;
        };
        let (a, b) = (&s.initiator, &s.target);
        let b_info = self
            .regs
            .get(&b.peer)
            .filter(|reg| reg.instance == b.instance)
            .map(|reg| reg.info.clone())
            .unwrap_or_default();
        let (start_a, _) = stagger(a.rtt, b.rtt);
        self.send(
            a.local,
            a.addr,
            &Frame::Peer {
                session,
                peer: b.peer,
                instance: b.instance,
                observed: b.addr,
                yours: a.addr,
                info: b_info,
                start_in_ms: start_a,
                relay: self.relay_node(s.relayed),
            },
        );
        self.introduce_target(now, session, first);
    }

    /// The target's `Incoming`: hedged, and repeated (now and then) while
    /// the initiator asks and the target has not answered.
    fn introduce_target(&mut self, now: Instant, session: u64, first: bool) {
        // The target may have registered again (a new address after its NAT
        // dropped the mapping): introduce it where it is now.
        if let Some(s) = self.sessions.get_mut(&session) {
            if let Some(reg) = self
                .regs
                .get(&s.target.peer)
                .filter(|reg| reg.instance == s.target.instance)
            {
                s.target.addr = reg.addr;
                s.target.local = reg.local;
                s.target.rtt = reg.rtt;
            }
        }
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let due = s
            .incoming_at
            .is_none_or(|t| now.saturating_duration_since(t) >= INCOMING_REPEAT);
        if !(first || (s.target.state.is_none() && due)) {
            return;
        }
        s.incoming_at = Some(now);
        let s = s.clone();
        let (a, b) = (&s.initiator, &s.target);
        let Some(a_state) = a.state.clone() else {
            return;
        };
        let (_, start_b) = stagger(a.rtt, b.rtt);
        self.push(
            b.local,
            b.addr,
            &Frame::Incoming {
                session,
                from: a.peer,
                instance: a.instance,
                observed: a.addr,
                offer: a_state.offer,
                info: a_state.info,
                fresh: a_state.fresh,
                start_in_ms: start_b,
                relay: self.relay_node(s.relayed),
            },
        );
    }

    /// A side's new state (Accept or Update): acknowledged with the other
    /// side's state, and pushed to the other side.
    fn new_state(&mut self, r: &Request, session: u64, side: SideOf, seq: u32, state: PartyState) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if let Some(reason) = s.declined {
            return self.error(r, ErrorCode::Declined(reason), Some(session));
        }
        let party = s.party_mut(side);
        // The newest state wins; a late retransmission of an older one is
        // only acknowledged again.
        let newer = party.state.is_none() || seq > party.seq;
        // The side may have moved (a NAT rebinding): answer where it is.
        party.addr = r.from;
        party.local = r.local;
        let (peer, instance) = (party.peer, party.instance);
        self.relay.rebind(peer, instance, r.from, r.local);
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let party = s.party_mut(side);
        if newer {
            party.seq = seq;
            party.state = Some(state);
        }
        let started = s.go.is_none();
        self.maybe_go(r.now, session);
        let go_now = started && self.sessions.get(&session).is_some_and(|s| s.go.is_some());
        self.sync_to(r.now, session, side, false);
        if newer || go_now {
            self.sync_to(r.now, session, side.other(), true);
        }
    }

    fn poll(&mut self, r: &Request, session: u64, side: SideOf) {
        if let Some(reason) = self.sessions.get(&session).and_then(|s| s.declined) {
            return self.error(r, ErrorCode::Declined(reason), Some(session));
        }
        if let Some(s) = self.sessions.get_mut(&session) {
            let party = s.party_mut(side);
            party.addr = r.from;
            party.local = r.local;
        }
        self.sync_to(r.now, session, side, false);
        // An initiator still waiting: the target may have missed its
        // Incoming, so it gets it again (now and then).
        if side == SideOf::Initiator {
            self.introduce_target(r.now, session, false);
        }
    }

    /// Both mappings known and the target accepted: fix the start.
    fn maybe_go(&mut self, now: Instant, session: u64) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if s.go.is_some() || !s.initiator.mapping_known() || !s.target.mapping_known() {
            return;
        }
        let half = |d: Duration| d / 2;
        s.go = Some(now + half(s.initiator.rtt.max(s.target.rtt)) + START_MARGIN);
    }

    /// Sends one side the other side's state.
    fn sync_to(&mut self, now: Instant, session: u64, to: SideOf, pushed: bool) {
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        let me = s.party(to);
        let other = s.party(to.other());
        // The delay from when this side receives the frame (half its RTT
        // from now) to the common start.
        let start_in_ms = s.go.map(|go| {
            let arrives = now + me.rtt / 2;
            ms16(go.saturating_duration_since(arrives))
        });
        let frame = Frame::Sync {
            session,
            ack: me.state.as_ref().map(|_| me.seq),
            peer: other.state.clone(),
            start_in_ms,
        };
        let (local, addr) = (me.local, me.addr);
        if pushed {
            self.push(local, addr, &frame);
        } else {
            self.send(local, addr, &frame);
        }
    }

    fn decline(&mut self, r: &Request, session: u64, reason: DeclineReason) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let first = s.declined.is_none();
        s.declined = Some(reason);
        s.relayed = false;
        self.relay.close(session);
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        let (a_local, a_addr) = (s.initiator.local, s.initiator.addr);
        // The initiator hears it once; a repeated Decline is only
        // acknowledged again.
        if first {
            self.push(
                a_local,
                a_addr,
                &Frame::Error {
                    code: ErrorCode::Declined(reason),
                    session: Some(session),
                    retry_after_ms: None,
                },
            );
        }
        // The acknowledgement, so the target stops retransmitting.
        self.error(r, ErrorCode::Declined(reason), Some(session));
    }

    /// Drops expired registrations and sessions (a full sweep at most once a
    /// second, so the cost per request stays constant).
    pub fn expire(&mut self, now: Instant) {
        if self.last_sweep.is_some_and(|t| {
            now.checked_duration_since(t).unwrap_or_default() < Duration::from_secs(1)
        }) {
            return;
        }
        self.last_sweep = Some(now);
        let gone: Vec<PeerId> = self
            .regs
            .iter()
            .filter(|(_, r)| r.expires <= now)
            .map(|(p, _)| *p)
            .collect();
        for p in gone {
            if let Some(old) = self.regs.remove(&p) {
                self.vacate(&old, now);
            }
        }
        self.sessions.retain(|_, s| s.expires > now);
        self.relay.expire(now);
    }

    pub fn poll_transmit(&mut self) -> Option<Outgoing> {
        self.out.pop_front()
    }
}

/// What the handlers need of the datagram at hand.
struct Request {
    now: Instant,
    local: SocketAddr,
    from: SocketAddr,
    len: usize,
}

impl SideOf {
    fn other(self) -> SideOf {
        match self {
            SideOf::Initiator => SideOf::Target,
            SideOf::Target => SideOf::Initiator,
        }
    }
}

impl Session {
    fn party(&self, side: SideOf) -> &Party {
        match side {
            SideOf::Initiator => &self.initiator,
            SideOf::Target => &self.target,
        }
    }

    fn party_mut(&mut self, side: SideOf) -> &mut Party {
        match side {
            SideOf::Initiator => &mut self.initiator,
            SideOf::Target => &mut self.target,
        }
    }
}

/// A peer's round trip: the cookie's age bounds it from above (the cookie
/// went there and back), and the peer's own measurement, when it sends
/// one, is the better figure (its cookie may be minutes old). A peer that
/// claims too little only starts its own probes early.
fn round_trip(cookie_age: Duration, claimed_ms: Option<u32>) -> Duration {
    match claimed_ms {
        Some(ms) => cookie_age.min(Duration::from_millis(u64::from(ms))),
        None => cookie_age.min(UNKNOWN_RTT),
    }
}

fn ms16(d: Duration) -> u16 {
    d.as_millis().min(u128::from(u16::MAX)) as u16
}

/// Start delays (ms) for two peers so their first probes leave together:
/// the server sends both messages now, each arrives after half its RTT.
fn stagger(rtt_a: Duration, rtt_b: Duration) -> (u16, u16) {
    let half = |d: Duration| d / 2;
    let t = half(rtt_a.max(rtt_b)) + START_MARGIN;
    (
        ms16(t.saturating_sub(half(rtt_a))),
        ms16(t.saturating_sub(half(rtt_b))),
    )
}

/// A peer's facts as passed on: a mapped port on another address than the
/// one the request came from is dropped, so that nobody can point the
/// other peer's probes at a third party.
fn vetted(info: &PeerInfo, from: SocketAddr) -> PeerInfo {
    let mut info = info.clone();
    if info.mapped.is_some_and(|m| m.addr.ip() != from.ip()) {
        tracing::debug!(%from, mapped = ?info.mapped, "mapped port on a foreign address dropped");
        info.mapped = None;
    }
    if info.tcp.is_some_and(|t| t.mapped.ip() != from.ip()) {
        // Nobody is made to send SYNs to someone else's address.
        tracing::debug!(%from, tcp = ?info.tcp, "TCP port on a foreign address dropped");
        info.tcp = None;
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stagger_aligns_arrivals() {
        let (a, b) = stagger(Duration::from_millis(100), Duration::from_millis(20));
        // A's message arrives at 50 ms, B's at 10 ms: both start at 60 ms.
        assert_eq!(50 + a, 10 + b);
        assert_eq!(a, START_MARGIN.as_millis() as u16);
    }
}
