//! The sans-IO rendezvous server: registrations bound to keys, and
//! coordinated introductions.
//!
//! - A peer proves its address with a stateless cookie (Hello/Challenge,
//!   like a DTLS or QUIC retry cookie) and its identity with an Ed25519
//!   signature over every request. The server records the address it
//!   observes, never a claimed one.
//! - Nothing unverified gets a reply larger than its request, every source
//!   IP and every target ID is rate-limited, and registrations, sessions and
//!   limiter tables are bounded.
//! - There is no way to list peers: a request names the ID it wants.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::wire::{self, context, Cookie, ErrorCode, Frame, PeerInfo};
use crate::identity::{self, PeerId};
use crate::ratelimit::{RateLimit, RateLimiter};

/// A cookie is good for this long: a peer refreshes every
/// [`super::client::REFRESH_INTERVAL`], well inside it.
pub const COOKIE_LIFETIME: Duration = Duration::from_secs(120);
/// A registration lives this long without refresh: three missed refreshes.
pub const REGISTRATION_TTL: Duration = Duration::from_secs(75);
/// An introduction must be accepted within this long.
pub const SESSION_TTL: Duration = Duration::from_secs(30);
/// Added to the staggered start so both peers' first probes leave after
/// they have processed the message (scheduling jitter on loaded hosts).
pub const START_MARGIN: Duration = Duration::from_millis(10);
/// Registrations held at most (memory bound: about 1 KB each).
pub const MAX_REGISTRATIONS: usize = 100_000;
/// Pending introductions held at most.
pub const MAX_SESSIONS: usize = 10_000;
/// Per source IP: 20 frames/s, burst 40. A peer needs ~2 per 25 s plus a
/// handful per connection attempt.
pub const SOURCE_LIMIT: RateLimit = RateLimit {
    rate: 20.0,
    burst: 40.0,
    max_sources: 65_536,
};
/// Introductions to one target ID: 1/s, burst 10, so nobody can flood a
/// peer with punch traffic through us.
pub const TARGET_LIMIT: RateLimit = RateLimit {
    rate: 1.0,
    burst: 10.0,
    max_sources: 65_536,
};

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
    pub rate_limited: u64,
    /// Replies suppressed because they would have been larger than an
    /// unverified request.
    pub amplification_dropped: u64,
    pub registrations: u64,
    pub introductions: u64,
}

#[derive(Debug, Clone)]
struct Registration {
    addr: SocketAddr,
    local: SocketAddr,
    info: PeerInfo,
    rtt: Duration,
    expires: Instant,
}

#[derive(Debug, Clone)]
struct Session {
    initiator: PeerId,
    target: PeerId,
    expires: Instant,
    /// The target declined; kept until it expires so that a late or
    /// repeated Connect or Decline gets the same answer.
    declined: bool,
}

/// The server machine.
pub struct RendezvousServer {
    secret: [u8; 32],
    base: Option<Instant>,
    regs: HashMap<PeerId, Registration>,
    sessions: HashMap<u64, Session>,
    sources: RateLimiter<IpAddr>,
    targets: RateLimiter<PeerId>,
    out: VecDeque<Outgoing>,
    stats: RendezvousStats,
    last_sweep: Option<Instant>,
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
        Self::with_limits(secret, SOURCE_LIMIT, TARGET_LIMIT)
    }

    pub fn with_limits(secret: [u8; 32], sources: RateLimit, targets: RateLimit) -> Self {
        Self {
            secret,
            base: None,
            regs: HashMap::new(),
            sessions: HashMap::new(),
            sources: RateLimiter::new(sources),
            targets: RateLimiter::new(targets),
            out: VecDeque::new(),
            stats: RendezvousStats::default(),
            last_sweep: None,
        }
    }

    pub fn stats(&self) -> RendezvousStats {
        self.stats
    }

    /// Registered peers right now.
    pub fn registered(&self) -> usize {
        self.regs.len()
    }

    fn ms(&mut self, now: Instant) -> u32 {
        let base = *self.base.get_or_insert(now);
        now.checked_duration_since(base)
            .unwrap_or_default()
            .as_millis() as u32
    }

    fn mac(&self, issued_ms: u32, addr: SocketAddr, peer: &PeerId) -> [u8; 16] {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.secret)
            .expect("HMAC takes any key length");
        m.update(&issued_ms.to_be_bytes());
        m.update(addr.to_string().as_bytes());
        m.update(peer.as_bytes());
        let full: [u8; 32] = m.finalize().into_bytes().into();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    /// Checks a cookie; returns the time since it was issued (an RTT
    /// estimate when the client answered at once).
    fn check_cookie(
        &mut self,
        now: Instant,
        c: &Cookie,
        from: SocketAddr,
        peer: &PeerId,
    ) -> Option<Duration> {
        let age = Duration::from_millis(u64::from(self.ms(now).wrapping_sub(c.issued_ms)));
        let expected = self.mac(c.issued_ms, from, peer);
        let equal = expected
            .iter()
            .zip(c.mac.iter())
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            == 0;
        (equal && age <= COOKIE_LIFETIME).then_some(age)
    }

    fn send(&mut self, from: SocketAddr, to: SocketAddr, frame: &Frame) {
        self.out.push_back(Outgoing {
            from,
            to,
            payload: wire::encode(frame),
        });
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

    fn error(
        &mut self,
        local: SocketAddr,
        to: SocketAddr,
        request_len: usize,
        code: ErrorCode,
        session: Option<u64>,
    ) {
        self.reply_unverified(local, to, request_len, &Frame::Error { code, session });
    }

    /// Checks a request's address cookie and signature.
    fn authenticate(
        &mut self,
        now: Instant,
        frame: &Frame,
        from: SocketAddr,
        peer: &PeerId,
        cookie: &Cookie,
        sig: &[u8],
    ) -> Result<Duration, ErrorCode> {
        let Some(age) = self.check_cookie(now, cookie, from, peer) else {
            self.stats.bad_cookie += 1;
            return Err(ErrorCode::BadCookie);
        };
        if !self.verify(frame, peer, sig) {
            return Err(ErrorCode::BadSignature);
        }
        Ok(age)
    }

    /// Checks a target's answer (Accept or Decline) and finds the session
    /// it answers, which must be addressed to that target.
    #[allow(clippy::too_many_arguments)]
    fn answer_session(
        &mut self,
        now: Instant,
        frame: &Frame,
        from: SocketAddr,
        peer: &PeerId,
        cookie: &Cookie,
        sig: &[u8],
        session: u64,
    ) -> Result<Session, ErrorCode> {
        self.authenticate(now, frame, from, peer, cookie, sig)?;
        self.expire(now);
        self.sessions
            .get(&session)
            .cloned()
            .filter(|s| s.target == *peer)
            .ok_or(ErrorCode::NoSession)
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

    /// Handles one datagram that arrived on `local` from `from`.
    pub fn handle(&mut self, now: Instant, local: SocketAddr, from: SocketAddr, data: &[u8]) {
        self.stats.received += 1;
        if !self.sources.allow(now, from.ip()) {
            self.stats.rate_limited += 1;
            return;
        }
        let frame = match wire::decode(data) {
            Ok(f) => f,
            Err(wire::WireError::UnsupportedVersion { got }) => {
                self.stats.unsupported_version += 1;
                tracing::debug!(%from, got, "rendezvous frame of unsupported version");
                self.error(local, from, data.len(), ErrorCode::UnsupportedVersion, None);
                return;
            }
            Err(e) => {
                self.stats.malformed += 1;
                tracing::trace!(%from, error = %e, "dropped malformed rendezvous frame");
                return;
            }
        };
        let n = data.len();
        match &frame {
            Frame::Hello { peer } => {
                let issued_ms = self.ms(now);
                let mac = self.mac(issued_ms, from, peer);
                self.reply_unverified(
                    local,
                    from,
                    n,
                    &Frame::Challenge {
                        cookie: Cookie { issued_ms, mac },
                    },
                );
            }
            Frame::Register {
                peer,
                cookie,
                info,
                sig,
            } => {
                let rtt = match self.authenticate(now, &frame, from, peer, cookie, sig) {
                    Ok(age) => age,
                    Err(code) => return self.error(local, from, n, code, None),
                };
                self.expire(now);
                if !self.regs.contains_key(peer) && self.regs.len() >= MAX_REGISTRATIONS {
                    return self.error(local, from, n, ErrorCode::RateLimited, None);
                }
                self.regs.insert(
                    *peer,
                    Registration {
                        addr: from,
                        local,
                        info: info.clone(),
                        rtt,
                        expires: now + REGISTRATION_TTL,
                    },
                );
                self.stats.registrations += 1;
                let expires_s = REGISTRATION_TTL.as_secs() as u16;
                self.send(
                    local,
                    from,
                    &Frame::Registered {
                        observed: from,
                        expires_s,
                    },
                );
            }
            Frame::Connect {
                peer,
                target,
                cookie,
                session,
                offer,
                fresh,
                sig,
            } => {
                if let Err(code) = self.authenticate(now, &frame, from, peer, cookie, sig) {
                    return self.error(local, from, n, code, Some(*session));
                }
                self.expire(now);
                let Some(me) = self.regs.get_mut(peer).filter(|r| r.expires > now) else {
                    return self.error(local, from, n, ErrorCode::NotRegistered, Some(*session));
                };
                // The request's source is the freshest view of our mapping.
                me.addr = from;
                me.local = local;
                let me = me.clone();
                let retransmission = match self.sessions.get(session) {
                    Some(s) if s.initiator == *peer && s.target == *target => {
                        if s.declined {
                            return self.error(local, from, n, ErrorCode::Declined, Some(*session));
                        }
                        true
                    }
                    Some(_) => {
                        return self.error(local, from, n, ErrorCode::RateLimited, Some(*session))
                    }
                    None => false,
                };
                // A retransmission (our answer was lost or slow) is
                // introduced again without spending the target's budget.
                if !retransmission && !self.targets.allow(now, *target) {
                    self.stats.rate_limited += 1;
                    return self.error(local, from, n, ErrorCode::RateLimited, Some(*session));
                }
                let Some(them) = self.regs.get(target).filter(|r| r.expires > now).cloned() else {
                    return self.error(local, from, n, ErrorCode::PeerOffline, Some(*session));
                };
                if !retransmission {
                    if self.sessions.len() >= MAX_SESSIONS {
                        return self.error(local, from, n, ErrorCode::RateLimited, Some(*session));
                    }
                    self.sessions.insert(
                        *session,
                        Session {
                            initiator: *peer,
                            target: *target,
                            expires: now + SESSION_TTL,
                            declined: false,
                        },
                    );
                    self.stats.introductions += 1;
                }
                let (start_me, start_them) = stagger(me.rtt, them.rtt);
                self.send(
                    local,
                    from,
                    &Frame::Peer {
                        session: *session,
                        peer: *target,
                        observed: them.addr,
                        info: them.info.clone(),
                        start_in_ms: start_me,
                    },
                );
                self.send(
                    them.local,
                    them.addr,
                    &Frame::Incoming {
                        session: *session,
                        from: *peer,
                        observed: from,
                        info: me.info.clone(),
                        offer: offer.clone(),
                        fresh: *fresh,
                        start_in_ms: start_them,
                    },
                );
            }
            Frame::Accept {
                peer,
                cookie,
                session,
                offer,
                fresh,
                sig,
            } => {
                let s = match self.answer_session(now, &frame, from, peer, cookie, sig, *session) {
                    Ok(s) if !s.declined => s,
                    Ok(_) => {
                        return self.error(local, from, n, ErrorCode::NoSession, Some(*session))
                    }
                    Err(code) => return self.error(local, from, n, code, Some(*session)),
                };
                let (Some(a), Some(b)) = (
                    self.regs.get(&s.initiator).cloned(),
                    self.regs.get(peer).cloned(),
                ) else {
                    return self.error(local, from, n, ErrorCode::PeerOffline, Some(*session));
                };
                let (start_a, start_b) = stagger(a.rtt, b.rtt);
                self.send(
                    a.local,
                    a.addr,
                    &Frame::Accepted {
                        session: *session,
                        offer: offer.clone(),
                        fresh: *fresh,
                        start_in_ms: start_a,
                    },
                );
                self.send(
                    local,
                    from,
                    &Frame::Go {
                        session: *session,
                        start_in_ms: start_b,
                    },
                );
            }
            Frame::Decline {
                peer,
                cookie,
                session,
                sig,
            } => {
                let s = match self.answer_session(now, &frame, from, peer, cookie, sig, *session) {
                    Ok(s) => s,
                    Err(code) => return self.error(local, from, n, code, Some(*session)),
                };
                if let Some(d) = self.sessions.get_mut(session) {
                    d.declined = true;
                }
                // The initiator hears it once; a repeated Decline is only
                // acknowledged again.
                if let Some(a) = self.regs.get(&s.initiator).cloned().filter(|_| !s.declined) {
                    self.send(
                        a.local,
                        a.addr,
                        &Frame::Error {
                            code: ErrorCode::Declined,
                            session: Some(*session),
                        },
                    );
                }
                // The acknowledgement, so the target stops retransmitting.
                self.error(local, from, n, ErrorCode::Declined, Some(*session));
            }
            // Server-to-client frames arriving here are ignored.
            _ => {}
        }
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
        self.regs.retain(|_, r| r.expires > now);
        self.sessions.retain(|_, s| s.expires > now);
    }

    pub fn poll_transmit(&mut self) -> Option<Outgoing> {
        self.out.pop_front()
    }
}

/// Start delays (ms) for two peers so their first probes leave together:
/// the server sends both messages now, each arrives after half its RTT.
fn stagger(rtt_a: Duration, rtt_b: Duration) -> (u16, u16) {
    let half = |d: Duration| d / 2;
    let t = half(rtt_a.max(rtt_b)) + START_MARGIN;
    let ms = |d: Duration| d.as_millis().min(u128::from(u16::MAX)) as u16;
    (
        ms(t.saturating_sub(half(rtt_a))),
        ms(t.saturating_sub(half(rtt_b))),
    )
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
