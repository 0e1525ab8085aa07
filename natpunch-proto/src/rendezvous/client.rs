//! The sans-IO rendezvous client: registers (and keeps registering) with
//! the server, asks for introductions and answers them.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::wire::{self, context, Cookie, ErrorCode, Frame, Offer, PeerInfo};
use crate::identity::{Identity, PeerId};
use crate::{SocketId, Transmit};

/// Re-register this often: below the 30 s UDP timeout many NATs use, so
/// the mapping toward the server stays open too (RFC 4787 REQ-5 asks for
/// 2 min, but measured home routers go lower).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(25);
/// First retransmission of an unanswered request; doubles each time.
pub const RETRANSMIT: Duration = Duration::from_millis(250);
/// Sends of one request before giving up: 250+500+1000+2000 ms → ~3.75 s.
pub const MAX_SENDS: u32 = 5;

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    Registered {
        observed: SocketAddr,
    },
    /// Our Connect was answered with the target's registration.
    Peer {
        session: u64,
        peer: PeerId,
        observed: SocketAddr,
        info: PeerInfo,
        start_at: Instant,
    },
    /// Someone asks to connect to us.
    Incoming {
        session: u64,
        from: PeerId,
        observed: SocketAddr,
        info: PeerInfo,
        offer: Offer,
        fresh: Option<SocketAddr>,
        start_at: Instant,
    },
    /// The target answered our Connect.
    Accepted {
        session: u64,
        offer: Offer,
        fresh: Option<SocketAddr>,
        start_at: Instant,
    },
    /// Our Accept was forwarded.
    Go {
        session: u64,
        start_at: Instant,
    },
    Error {
        code: ErrorCode,
        session: Option<u64>,
    },
    /// A request got no answer after [`MAX_SENDS`] sends.
    ServerUnreachable {
        server: SocketAddr,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Hello,
    Register,
    Connect(u64),
    Accept(u64),
    Decline(u64),
}

#[derive(Debug)]
struct Pending {
    kind: Kind,
    /// What to re-send with a new cookie (Connect/Accept).
    origin: Option<Queued>,
    payload: Vec<u8>,
    sends: u32,
    next: Instant,
    rto: Duration,
}

/// A request waiting for a cookie (Connect/Accept before registration).
#[derive(Debug, Clone)]
enum Queued {
    Connect {
        target: PeerId,
        session: u64,
        offer: Offer,
        fresh: Option<SocketAddr>,
    },
    Accept {
        session: u64,
        offer: Offer,
        fresh: Option<SocketAddr>,
    },
    Decline {
        session: u64,
    },
}

/// The client machine, on one socket.
pub struct RendezvousClient {
    identity: Identity,
    peer: PeerId,
    server: SocketAddr,
    socket: SocketId,
    info: PeerInfo,
    cookie: Option<Cookie>,
    registered: bool,
    next_refresh: Option<Instant>,
    pending: Vec<Pending>,
    queued: Vec<Queued>,
    out: VecDeque<Transmit>,
    events: VecDeque<ClientEvent>,
}

impl std::fmt::Debug for RendezvousClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RendezvousClient")
            .field("peer", &self.peer)
            .field("server", &self.server)
            .field("registered", &self.registered)
            .finish_non_exhaustive()
    }
}

impl RendezvousClient {
    pub fn new(identity: Identity, server: SocketAddr, socket: SocketId, info: PeerInfo) -> Self {
        Self {
            peer: identity.peer_id(),
            identity,
            server,
            socket,
            info,
            cookie: None,
            registered: false,
            next_refresh: None,
            pending: Vec::new(),
            queued: Vec::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    pub fn is_registered(&self) -> bool {
        self.registered
    }

    /// Starts registering.
    pub fn start(&mut self, now: Instant) {
        self.hello(now);
    }

    /// Registers again now (our address may have changed, e.g. a NAT
    /// dropped our mapping), without waiting for the periodic refresh.
    pub fn refresh(&mut self, now: Instant) {
        self.hello(now);
    }

    fn hello(&mut self, now: Instant) {
        self.pending.retain(|p| p.kind != Kind::Hello);
        let payload = wire::encode(&Frame::Hello { peer: self.peer });
        self.request(now, Kind::Hello, payload);
    }

    fn request(&mut self, now: Instant, kind: Kind, payload: Vec<u8>) {
        self.request_from(now, kind, None, payload);
    }

    fn request_from(&mut self, now: Instant, kind: Kind, origin: Option<Queued>, payload: Vec<u8>) {
        self.pending.retain(|p| p.kind != kind);
        self.pending.push(Pending {
            kind,
            origin,
            payload,
            sends: 0,
            next: now,
            rto: RETRANSMIT,
        });
        self.handle_timeout(now);
    }

    fn sign(&self, frame: &mut Frame) {
        let sig = self
            .identity
            .sign(context::FRAME, &wire::signed_bytes(frame))
            .to_vec();
        match frame {
            Frame::Register { sig: s, .. }
            | Frame::Connect { sig: s, .. }
            | Frame::Accept { sig: s, .. }
            | Frame::Decline { sig: s, .. } => *s = sig,
            _ => {}
        }
    }

    fn register(&mut self, now: Instant, cookie: Cookie) {
        let mut f = Frame::Register {
            peer: self.peer,
            cookie,
            info: self.info.clone(),
            sig: Vec::new(),
        };
        self.sign(&mut f);
        self.request(now, Kind::Register, wire::encode(&f));
    }

    /// Asks the server to introduce us to `target`.
    pub fn connect(
        &mut self,
        now: Instant,
        target: PeerId,
        session: u64,
        offer: Offer,
        fresh: Option<SocketAddr>,
    ) {
        self.submit(
            now,
            Queued::Connect {
                target,
                session,
                offer,
                fresh,
            },
        );
    }

    /// Answers an introduction.
    pub fn accept(&mut self, now: Instant, session: u64, offer: Offer, fresh: Option<SocketAddr>) {
        self.submit(
            now,
            Queued::Accept {
                session,
                offer,
                fresh,
            },
        );
    }

    /// Refuses an introduction (see [`Frame::Decline`]).
    pub fn decline(&mut self, now: Instant, session: u64) {
        self.submit(now, Queued::Decline { session });
    }

    fn submit(&mut self, now: Instant, q: Queued) {
        match (self.cookie, self.registered) {
            (Some(cookie), true) => self.send_queued(now, cookie, q),
            _ => self.queued.push(q),
        }
    }

    fn send_queued(&mut self, now: Instant, cookie: Cookie, q: Queued) {
        let peer = self.peer;
        let origin = q.clone();
        let (kind, mut f) = match q {
            Queued::Connect {
                target,
                session,
                offer,
                fresh,
            } => (
                Kind::Connect(session),
                Frame::Connect {
                    peer,
                    target,
                    cookie,
                    session,
                    offer,
                    fresh,
                    sig: Vec::new(),
                },
            ),
            Queued::Accept {
                session,
                offer,
                fresh,
            } => (
                Kind::Accept(session),
                Frame::Accept {
                    peer,
                    cookie,
                    session,
                    offer,
                    fresh,
                    sig: Vec::new(),
                },
            ),
            Queued::Decline { session } => (
                Kind::Decline(session),
                Frame::Decline {
                    peer,
                    cookie,
                    session,
                    sig: Vec::new(),
                },
            ),
        };
        self.sign(&mut f);
        self.request_from(now, kind, Some(origin), wire::encode(&f));
    }

    fn done(&mut self, kind: Kind) {
        self.pending.retain(|p| p.kind != kind);
    }

    fn at(now: Instant, ms: u16) -> Instant {
        now + Duration::from_millis(u64::from(ms))
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
        match frame {
            Frame::Challenge { cookie } => {
                self.done(Kind::Hello);
                self.cookie = Some(cookie);
                self.register(now, cookie);
            }
            Frame::Registered { observed, .. } => {
                self.done(Kind::Register);
                self.registered = true;
                self.next_refresh = Some(now + REFRESH_INTERVAL);
                self.events.push_back(ClientEvent::Registered { observed });
                if let Some(cookie) = self.cookie {
                    for q in std::mem::take(&mut self.queued) {
                        self.send_queued(now, cookie, q);
                    }
                }
            }
            Frame::Peer {
                session,
                peer,
                observed,
                info,
                start_in_ms,
            } => {
                self.done(Kind::Connect(session));
                let start_at = Self::at(now, start_in_ms);
                self.events.push_back(ClientEvent::Peer {
                    session,
                    peer,
                    observed,
                    info,
                    start_at,
                });
            }
            Frame::Incoming {
                session,
                from,
                observed,
                info,
                offer,
                fresh,
                start_in_ms,
            } => {
                let start_at = Self::at(now, start_in_ms);
                self.events.push_back(ClientEvent::Incoming {
                    session,
                    from,
                    observed,
                    info,
                    offer,
                    fresh,
                    start_at,
                });
            }
            Frame::Accepted {
                session,
                offer,
                fresh,
                start_in_ms,
            } => {
                let start_at = Self::at(now, start_in_ms);
                self.events.push_back(ClientEvent::Accepted {
                    session,
                    offer,
                    fresh,
                    start_at,
                });
            }
            Frame::Go {
                session,
                start_in_ms,
            } => {
                self.done(Kind::Accept(session));
                let start_at = Self::at(now, start_in_ms);
                self.events.push_back(ClientEvent::Go { session, start_at });
            }
            Frame::Error {
                code: ErrorCode::BadCookie,
                ..
            } => {
                // Our address changed or the cookie aged: get a new one and
                // re-send what is pending.
                self.cookie = None;
                self.registered = false;
                for p in std::mem::take(&mut self.pending) {
                    self.queued.extend(p.origin);
                }
                self.hello(now);
            }
            Frame::Error { code, session } => {
                if let Some(s) = session {
                    self.done(Kind::Connect(s));
                    self.done(Kind::Accept(s));
                    self.done(Kind::Decline(s));
                }
                self.events.push_back(ClientEvent::Error { code, session });
            }
            _ => {}
        }
        true
    }

    /// Retransmits, refreshes; a spurious call is a no-op.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_refresh.is_some_and(|t| now >= t) {
            self.next_refresh = None;
            self.hello(now);
        }
        let mut gave_up = false;
        for p in &mut self.pending {
            if now < p.next {
                continue;
            }
            if p.sends >= MAX_SENDS {
                gave_up = true;
                continue;
            }
            p.sends += 1;
            p.next = now + p.rto;
            p.rto *= 2;
            self.out.push_back(Transmit {
                socket: self.socket,
                destination: self.server,
                payload: p.payload.clone(),
                ttl: None,
            });
        }
        if gave_up {
            self.pending.retain(|p| p.sends < MAX_SENDS || now < p.next);
            self.registered = false;
            self.events.push_back(ClientEvent::ServerUnreachable {
                server: self.server,
            });
            // Keep trying to register in the background.
            self.next_refresh = Some(now + REFRESH_INTERVAL);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending
            .iter()
            .map(|p| p.next)
            .chain(self.next_refresh)
            .min()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }
}
