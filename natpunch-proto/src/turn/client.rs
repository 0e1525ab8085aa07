//! The TURN client's state machine: one allocation on one server.
//!
//! Feed it what the server sends ([`Client::handle_input`]: a datagram,
//! or one frame of a stream cut with [`super::stream_frame_len`]) and the
//! time ([`Client::handle_timeout`]); take what to send
//! ([`Client::poll_transmit`]), what happened ([`Client::poll_event`]) and
//! when to wake ([`Client::poll_timeout`]). Peer data goes out through
//! [`Client::send`] once the peer's address is permitted
//! ([`Client::permit`]) and, for 4 bytes of overhead instead of 36, bound
//! to a channel ([`Client::bind`]).
//!
//! The allocation is refreshed at half its granted lifetime, however short
//! a server makes it; permissions every [`PERMISSION_REFRESH`] and channels
//! every [`CHANNEL_REFRESH`]. A 438 (stale nonce) is answered with the new
//! nonce; a 401 after our credentials were sent fails the allocation with
//! the server's words. [`Client::release`] deletes the allocation
//! (a Refresh with lifetime 0, RFC 8656 §7).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::RngExt;

use super::{attr, method, Credentials, Transport, TurnError, CHANNEL_MAX, CHANNEL_MIN};
use crate::stun::message::{
    decode_xor_address, verify_integrity, xor_address_value, Attribute, Class, Encoder, Integrity,
    Message, TransactionId,
};

/// First retransmission timeout over UDP (RFC 8489 §6.2.1's default RTO).
pub const RTO: Duration = Duration::from_millis(500);
/// Requests sent at most over UDP: 500 ms, 1, 2, 4 s apart and a last
/// wait of 8 s, 15.5 s in all (RFC 8489's Rc = 7 would be 39.5 s: too long
/// for a person waiting on a connect).
pub const TRANSMITS: u32 = 5;
/// Over TCP and TLS a request is sent once and waited for this long (the
/// UDP schedule's total).
pub const STREAM_TIMEOUT: Duration = Duration::from_millis(15_500);
/// Permissions last 300 s (RFC 8656 §9); refreshed a minute early.
pub const PERMISSION_REFRESH: Duration = Duration::from_secs(240);
/// Channel bindings last 600 s (RFC 8656 §12); refreshed a minute early.
pub const CHANNEL_REFRESH: Duration = Duration::from_secs(540);
/// A refresh is never sooner than this after the last (a server granting
/// a lifetime of a second or two must not make us flood it).
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Stale-nonce (438) retries in a row before giving up: a server that
/// keeps changing its nonce is broken, not slow.
const MAX_NONCE_RETRIES: u32 = 3;
/// Peers we keep permissions and channels for at most: one session needs
/// one or two; this bounds what a caller's mistake can make us keep.
pub const MAX_PEERS: usize = 256;
/// Over UDP an allocation sends the server a Binding indication this
/// often: a NAT in front of us forgets an idle UDP mapping (30 s is
/// common; RFC 4787 REQ-5 asks 2 minutes, which many do not keep), and
/// the server then sees our next Refresh from a new port and answers 437.
/// 15 s is ICE's keepalive period (RFC 8445 §11).
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// Peer data the server relayed to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerData {
    pub peer: SocketAddr,
    pub data: Vec<u8>,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The allocation exists: peers reach us at `relayed`; the server saw
    /// us at `mapped`.
    Allocated {
        relayed: SocketAddr,
        mapped: Option<SocketAddr>,
        lifetime: Duration,
    },
    /// The allocation was refreshed for `lifetime`.
    Refreshed {
        lifetime: Duration,
    },
    /// Data from `ip` is relayed to us, and ours to it.
    Permitted(IpAddr),
    PermissionFailed {
        ip: IpAddr,
        error: TurnError,
    },
    /// `peer` is bound to a channel: [`Client::send`] uses it from now on.
    ChannelBound {
        peer: SocketAddr,
        channel: u16,
    },
    ChannelFailed {
        peer: SocketAddr,
        error: TurnError,
    },
    /// The allocation is deleted (after [`Client::release`]).
    Released,
    /// The allocation failed or was lost; nothing more will happen.
    Failed(TurnError),
}

/// Why [`Client::send`] cannot send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    #[error("no allocation")]
    NoAllocation,
    #[error("no permission for {0} yet")]
    NoPermission(IpAddr),
    #[error("{0} bytes do not fit in one TURN message")]
    TooLong(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Allocate,
    Refresh { lifetime: Option<u32> },
    Permission(IpAddr),
    Channel(SocketAddr, u16),
}

impl Request {
    fn method(&self) -> u16 {
        match self {
            Request::Allocate => method::ALLOCATE,
            Request::Refresh { .. } => method::REFRESH,
            Request::Permission(_) => method::CREATE_PERMISSION,
            Request::Channel(..) => method::CHANNEL_BIND,
        }
    }

    fn what(&self) -> &'static str {
        match self {
            Request::Allocate => "Allocate",
            Request::Refresh { lifetime: Some(0) } => "the release",
            Request::Refresh { .. } => "Refresh",
            Request::Permission(_) => "CreatePermission",
            Request::Channel(..) => "ChannelBind",
        }
    }
}

struct Pending {
    request: Request,
    bytes: Vec<u8>,
    /// Transmissions so far.
    sent: u32,
    next: Instant,
    started: Instant,
    /// Sent with our credentials (a 401 then means they are wrong).
    authenticated: bool,
    /// Stale-nonce (438) answers this request already had.
    nonce_retries: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Allocating,
    Allocated {
        relayed: SocketAddr,
        /// When to refresh; none while a Refresh is out.
        refresh_at: Option<Instant>,
        /// When the server drops the allocation unless refreshed.
        expires: Instant,
    },
    Releasing,
    Closed,
}

#[derive(Debug, Clone, Copy)]
struct Grant {
    active: bool,
    /// When to refresh (active), or none while the request is out.
    refresh_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Channel {
    number: u16,
    grant: Grant,
}

/// Counters of what was dropped, for logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Not STUN or ChannelData we can read, or an answer to nothing we asked.
    pub dropped: u64,
    /// An answer whose MESSAGE-INTEGRITY did not match our key.
    pub bad_integrity: u64,
}

/// One allocation on one TURN server.
pub struct Client {
    server: SocketAddr,
    transport: Transport,
    credentials: Credentials,
    realm: Option<Vec<u8>>,
    nonce: Option<Vec<u8>>,
    key: Option<[u8; 16]>,
    state: State,
    pending: HashMap<TransactionId, Pending>,
    permissions: HashMap<IpAddr, Grant>,
    channels: HashMap<SocketAddr, Channel>,
    by_number: HashMap<u16, SocketAddr>,
    next_channel: u16,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    stats: Stats,
    /// The next keepalive (UDP, while allocated).
    keepalive_at: Option<Instant>,
}

impl Client {
    /// Starts allocating on `server`: the first Allocate (without
    /// credentials, to learn the realm and nonce) is ready to send.
    pub fn new(
        server: SocketAddr,
        transport: Transport,
        credentials: Credentials,
        now: Instant,
    ) -> Self {
        let mut c = Self {
            server,
            transport,
            credentials,
            realm: None,
            nonce: None,
            key: None,
            state: State::Allocating,
            pending: HashMap::new(),
            permissions: HashMap::new(),
            channels: HashMap::new(),
            by_number: HashMap::new(),
            next_channel: CHANNEL_MIN,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            keepalive_at: None,
        };
        c.request(now, Request::Allocate);
        c
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Our relayed transport address, once allocated.
    pub fn relayed(&self) -> Option<SocketAddr> {
        match self.state {
            State::Allocated { relayed, .. } => Some(relayed),
            _ => None,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Whether data to and from `ip` is relayed now.
    pub fn permitted(&self, ip: IpAddr) -> bool {
        self.permissions.get(&ip).is_some_and(|g| g.active)
    }

    /// Asks for a permission for `ip` (kept, and refreshed, until the
    /// allocation ends). Asking again is free.
    pub fn permit(&mut self, now: Instant, ip: IpAddr) {
        if self.permissions.contains_key(&ip) || self.permissions.len() >= MAX_PEERS {
            return;
        }
        self.permissions.insert(
            ip,
            Grant {
                active: false,
                refresh_at: None,
            },
        );
        if self.relayed().is_some() {
            self.request(now, Request::Permission(ip));
        }
    }

    /// Stops keeping `ip`'s permission and channels: they are no longer
    /// refreshed, and the server lets them lapse (RFC 8656 §9: 300 s for a
    /// permission, §12: 600 s for a channel). A peer gone for good then
    /// no longer holds a place among [`MAX_PEERS`].
    pub fn forget(&mut self, ip: IpAddr) {
        self.permissions.remove(&ip);
        let gone: Vec<SocketAddr> = self
            .channels
            .keys()
            .filter(|p| p.ip() == ip)
            .copied()
            .collect();
        for peer in gone {
            if let Some(c) = self.channels.remove(&peer) {
                self.by_number.remove(&c.number);
            }
        }
    }

    /// Binds `peer` to a channel (which also permits its address).
    pub fn bind(&mut self, now: Instant, peer: SocketAddr) {
        if self.channels.contains_key(&peer) || self.channels.len() >= MAX_PEERS {
            return;
        }
        if self.next_channel > CHANNEL_MAX {
            return;
        }
        let number = self.next_channel;
        self.next_channel += 1;
        self.channels.insert(
            peer,
            Channel {
                number,
                grant: Grant {
                    active: false,
                    refresh_at: None,
                },
            },
        );
        self.by_number.insert(number, peer);
        if self.relayed().is_some() {
            self.request(now, Request::Channel(peer, number));
        }
    }

    /// `data` for `peer`, wrapped for the server: ChannelData on a bound
    /// channel (padded to 4 bytes over a stream), else a Send indication.
    pub fn send(&self, peer: SocketAddr, data: &[u8], out: &mut Vec<u8>) -> Result<(), SendError> {
        if self.relayed().is_none() {
            return Err(SendError::NoAllocation);
        }
        if data.len() > usize::from(u16::MAX) - 64 {
            return Err(SendError::TooLong(data.len()));
        }
        if let Some(ch) = self.channels.get(&peer).filter(|c| c.grant.active) {
            out.extend_from_slice(&ch.number.to_be_bytes());
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(data);
            if self.transport.reliable() {
                let pad = (4 - data.len() % 4) % 4;
                out.extend(std::iter::repeat_n(0u8, pad));
            }
            return Ok(());
        }
        if !self.permitted(peer.ip()) {
            return Err(SendError::NoPermission(peer.ip()));
        }
        let tid = TransactionId::new(rand::rng().random());
        let msg = Message::new(Class::Indication, method::SEND, tid)
            .with(Attribute::Unknown {
                kind: attr::XOR_PEER_ADDRESS,
                value: xor_address_value(&peer, &tid),
            })
            .with(Attribute::Unknown {
                kind: attr::DATA,
                value: data.to_vec(),
            });
        msg.encode(out);
        Ok(())
    }

    /// Deletes the allocation (a Refresh with lifetime 0); [`Event::Released`]
    /// follows, or [`Event::Failed`] if the server does not answer.
    pub fn release(&mut self, now: Instant) {
        match self.state {
            State::Allocated { .. } => {
                self.pending.retain(|_, p| p.request == Request::Allocate);
                self.state = State::Releasing;
                self.request(now, Request::Refresh { lifetime: Some(0) });
            }
            State::Allocating => {
                // An Allocate may be out: the server's allocation (if it
                // made one) times out by itself.
                self.pending.clear();
                self.state = State::Closed;
                self.events.push_back(Event::Released);
            }
            State::Releasing | State::Closed => {}
        }
    }

    /// The next bytes to send to the server.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Client::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let pending = self.pending.values().map(|p| p.next);
        let State::Allocated { refresh_at, .. } = self.state else {
            // Allocating or releasing: only the request out has a timer.
            return pending.min();
        };
        let grants = self
            .permissions
            .values()
            .filter_map(|g| g.refresh_at)
            .chain(self.channels.values().filter_map(|c| c.grant.refresh_at));
        pending
            .chain(refresh_at)
            .chain(grants)
            .chain(self.keepalive_at)
            .min()
    }

    /// Retransmissions, timeouts and refreshes that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut expired = Vec::new();
        for (tid, p) in self.pending.iter_mut() {
            if p.next > now {
                continue;
            }
            if self.transport.reliable() || p.sent >= TRANSMITS {
                expired.push(*tid);
                continue;
            }
            p.sent += 1;
            p.next = now
                + if p.sent == TRANSMITS {
                    RTO * 16
                } else {
                    RTO * (1 << (p.sent - 1))
                };
            self.transmits.push_back(p.bytes.clone());
        }
        for tid in expired {
            if let Some(p) = self.pending.remove(&tid) {
                // An unanswered refresh is sent again while the
                // allocation still has a whole retransmission schedule
                // left: the server keeps it until it expires.
                if let (Request::Refresh { lifetime: None }, State::Allocated { expires, .. }) =
                    (p.request, self.state)
                {
                    if expires.saturating_duration_since(now) > STREAM_TIMEOUT {
                        self.request(now, p.request);
                        continue;
                    }
                }
                let error = TurnError::NoAnswer {
                    server: self.server,
                    what: p.request.what(),
                    after: now.saturating_duration_since(p.started),
                };
                self.failed(p.request, error);
            }
        }
        if let State::Allocated {
            relayed,
            refresh_at: Some(at),
            expires,
        } = self.state
        {
            if at <= now {
                self.state = State::Allocated {
                    relayed,
                    refresh_at: None,
                    expires,
                };
                self.request(now, Request::Refresh { lifetime: None });
            }
        }
        if self.relayed().is_none() {
            return;
        }
        if self.keepalive_at.is_some_and(|t| t <= now) {
            let tid = TransactionId::new(rand::rng().random());
            let ind = Message::new(Class::Indication, crate::stun::message::METHOD_BINDING, tid);
            self.transmits.push_back(ind.to_bytes());
            self.keepalive_at = Some(now + KEEPALIVE);
        }
        let due: Vec<IpAddr> = self
            .permissions
            .iter()
            .filter(|(_, g)| g.refresh_at.is_some_and(|t| t <= now))
            .map(|(ip, _)| *ip)
            .collect();
        for ip in due {
            self.request(now, Request::Permission(ip));
        }
        let due: Vec<(SocketAddr, u16)> = self
            .channels
            .iter()
            .filter(|(_, c)| c.grant.refresh_at.is_some_and(|t| t <= now))
            .map(|(p, c)| (*p, c.number))
            .collect();
        for (peer, number) in due {
            self.request(now, Request::Channel(peer, number));
        }
    }

    /// One datagram (or stream frame) from the server: peer data, or
    /// nothing (an answer, or something dropped and counted).
    pub fn handle_input(&mut self, now: Instant, buf: &[u8]) -> Option<PeerData> {
        if super::is_channel_data(buf) {
            return self.channel_data(buf);
        }
        let (msg, offsets) = match Message::decode_with_offsets(buf) {
            Ok(m) => m,
            Err(e) => {
                self.stats.dropped += 1;
                tracing::trace!(error = %e, "TURN: not a message");
                return None;
            }
        };
        if msg.class == Class::Indication {
            return self.data_indication(&msg);
        }
        // Only answers, of the method asked (a reflected request of ours
        // is not one).
        let p = self
            .pending
            .get(&msg.transaction)
            .filter(|_| matches!(msg.class, Class::Success | Class::Error))
            .filter(|p| msg.method == p.request.method());
        let Some(p) = p else {
            self.stats.dropped += 1;
            tracing::trace!("TURN: an answer to nothing we asked");
            return None;
        };
        // Answers to authenticated requests must carry our integrity
        // (RFC 8489 §9.2.4), except the error answers 401 and 438 that
        // restart the exchange.
        let challenge = msg.class == Class::Error && matches!(msg.error_code(), Some(401 | 438));
        if p.authenticated && !challenge {
            let ok = self
                .key
                .is_some_and(|k| verify_integrity(buf, offsets, &k).is_ok());
            if !ok {
                self.stats.bad_integrity += 1;
                tracing::debug!("TURN: an answer without our integrity, dropped");
                return None;
            }
        }
        let p = self.pending.remove(&msg.transaction)?;
        match msg.class {
            Class::Success => self.success(now, p, &msg),
            Class::Error => self.error(now, p, &msg),
            _ => self.stats.dropped += 1,
        }
        None
    }

    fn channel_data(&mut self, buf: &[u8]) -> Option<PeerData> {
        let data = buf.get(4..).and_then(|rest| {
            let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
            rest.get(..len)
        });
        let number = u16::from_be_bytes([buf[0], *buf.get(1)?]);
        match (data, self.by_number.get(&number)) {
            (Some(data), Some(peer)) => Some(PeerData {
                peer: *peer,
                data: data.to_vec(),
            }),
            _ => {
                self.stats.dropped += 1;
                tracing::trace!(
                    number,
                    "TURN: ChannelData on no channel of ours, or cut short"
                );
                None
            }
        }
    }

    fn data_indication(&mut self, msg: &Message) -> Option<PeerData> {
        let peer = raw(msg, attr::XOR_PEER_ADDRESS)
            .and_then(|v| decode_xor_address(attr::XOR_PEER_ADDRESS, v, &msg.transaction).ok());
        let data = raw(msg, attr::DATA);
        match (msg.method, peer, data) {
            (method::DATA, Some(peer), Some(data)) => Some(PeerData {
                peer,
                data: data.to_vec(),
            }),
            _ => {
                self.stats.dropped += 1;
                tracing::trace!("TURN: an indication that is not Data, or lacks its attributes");
                None
            }
        }
    }

    fn success(&mut self, now: Instant, p: Pending, msg: &Message) {
        match p.request {
            Request::Allocate => {
                if self.state != State::Allocating {
                    return;
                }
                let relayed = raw(msg, attr::XOR_RELAYED_ADDRESS).and_then(|v| {
                    decode_xor_address(attr::XOR_RELAYED_ADDRESS, v, &msg.transaction).ok()
                });
                let Some(relayed) = relayed else {
                    self.fail(TurnError::Malformed {
                        server: self.server,
                        what: "Allocate",
                        missing: "XOR-RELAYED-ADDRESS",
                    });
                    return;
                };
                let lifetime = lifetime(msg);
                self.state = State::Allocated {
                    relayed,
                    refresh_at: Some(now + refresh_after(lifetime)),
                    expires: now + lifetime,
                };
                if self.transport == Transport::Udp {
                    self.keepalive_at = Some(now + KEEPALIVE);
                }
                self.events.push_back(Event::Allocated {
                    relayed,
                    mapped: msg.mapped_address(),
                    lifetime,
                });
                // What was asked for before the allocation existed.
                let ips: Vec<IpAddr> = self.permissions.keys().copied().collect();
                for ip in ips {
                    self.request(now, Request::Permission(ip));
                }
                let chans: Vec<(SocketAddr, u16)> =
                    self.channels.iter().map(|(p, c)| (*p, c.number)).collect();
                for (peer, number) in chans {
                    self.request(now, Request::Channel(peer, number));
                }
            }
            Request::Refresh { lifetime: Some(0) } => {
                self.close(Event::Released);
            }
            Request::Refresh { .. } => {
                let lifetime = lifetime(msg);
                if let State::Allocated { relayed, .. } = self.state {
                    self.state = State::Allocated {
                        relayed,
                        refresh_at: Some(now + refresh_after(lifetime)),
                        expires: now + lifetime,
                    };
                    self.events.push_back(Event::Refreshed { lifetime });
                }
            }
            Request::Permission(ip) => {
                if let Some(g) = self.permissions.get_mut(&ip) {
                    let first = !g.active;
                    g.active = true;
                    g.refresh_at = Some(now + PERMISSION_REFRESH);
                    if first {
                        self.events.push_back(Event::Permitted(ip));
                    }
                }
            }
            Request::Channel(peer, number) => {
                if let Some(c) = self.channels.get_mut(&peer) {
                    let first = !c.grant.active;
                    c.grant.active = true;
                    c.grant.refresh_at = Some(now + CHANNEL_REFRESH);
                    // A channel permits its peer's address too.
                    let g = self.permissions.entry(peer.ip()).or_insert(Grant {
                        active: false,
                        refresh_at: None,
                    });
                    let newly = !g.active;
                    g.active = true;
                    g.refresh_at.get_or_insert(now + PERMISSION_REFRESH);
                    if newly {
                        self.events.push_back(Event::Permitted(peer.ip()));
                    }
                    if first {
                        self.events.push_back(Event::ChannelBound {
                            peer,
                            channel: number,
                        });
                    }
                }
            }
        }
    }

    fn error(&mut self, now: Instant, p: Pending, msg: &Message) {
        let code = msg.error_code().unwrap_or(0);
        let realm = raw(msg, attr::REALM).map(<[u8]>::to_vec);
        let nonce = raw(msg, attr::NONCE).map(<[u8]>::to_vec);
        let retry = match code {
            // The challenge: learn the realm and nonce, ask again with
            // our credentials (once: a 401 to those means they are wrong).
            401 if !p.authenticated && realm.is_some() && nonce.is_some() => Some(0),
            // A new nonce (RFC 8489 §9.2.5): ask again with it.
            438 if nonce.is_some() && p.nonce_retries < MAX_NONCE_RETRIES => {
                Some(p.nonce_retries + 1)
            }
            _ => None,
        };
        if let Some(nonce_retries) = retry {
            if let Some(r) = realm {
                self.key = Some(
                    self.credentials
                        .key(std::str::from_utf8(&r).unwrap_or_default()),
                );
                self.realm = Some(r);
            }
            self.nonce = nonce;
            self.send_request(now, p.request, nonce_retries);
            return;
        }
        let reason = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                // (Some servers pad the phrase with NULs.)
                Attribute::ErrorCode { reason, .. } => {
                    Some(reason.trim_end_matches('\0').to_string())
                }
                _ => None,
            })
            .unwrap_or_default();
        let error = TurnError::Rejected {
            server: self.server,
            code,
            reason,
        };
        // A release whose allocation is already gone is a release.
        if p.request == (Request::Refresh { lifetime: Some(0) }) && code == 437 {
            self.close(Event::Released);
            return;
        }
        self.failed(p.request, error);
    }

    /// `request` got no answer or an error.
    fn failed(&mut self, request: Request, error: TurnError) {
        match request {
            Request::Allocate | Request::Refresh { .. } => self.fail(error),
            Request::Permission(ip) => {
                self.permissions.remove(&ip);
                self.events.push_back(Event::PermissionFailed { ip, error });
            }
            Request::Channel(peer, number) => {
                self.channels.remove(&peer);
                self.by_number.remove(&number);
                self.events.push_back(Event::ChannelFailed { peer, error });
            }
        }
    }

    fn fail(&mut self, error: TurnError) {
        self.close(Event::Failed(error));
    }

    fn close(&mut self, event: Event) {
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        self.keepalive_at = None;
        self.pending.clear();
        self.permissions.clear();
        self.channels.clear();
        self.by_number.clear();
        self.events.push_back(event);
    }

    /// Sends `request` (with our credentials once the realm is known).
    fn request(&mut self, now: Instant, request: Request) {
        self.send_request(now, request, 0);
    }

    fn send_request(&mut self, now: Instant, request: Request, nonce_retries: u32) {
        if self.state == State::Closed {
            return;
        }
        match request {
            Request::Permission(ip) => {
                if let Some(g) = self.permissions.get_mut(&ip) {
                    g.refresh_at = None;
                }
            }
            Request::Channel(peer, _) => {
                if let Some(c) = self.channels.get_mut(&peer) {
                    c.grant.refresh_at = None;
                }
            }
            _ => {}
        }
        let tid = TransactionId::new(rand::rng().random());
        let (m, attrs) = match request {
            Request::Allocate => (
                method::ALLOCATE,
                // UDP (17) relayed, RFC 8656 §18.13.
                vec![Attribute::Unknown {
                    kind: attr::REQUESTED_TRANSPORT,
                    value: vec![17, 0, 0, 0],
                }],
            ),
            Request::Refresh { lifetime } => (
                method::REFRESH,
                lifetime
                    .map(|l| Attribute::Unknown {
                        kind: attr::LIFETIME,
                        value: l.to_be_bytes().to_vec(),
                    })
                    .into_iter()
                    .collect(),
            ),
            Request::Permission(ip) => (
                method::CREATE_PERMISSION,
                vec![Attribute::Unknown {
                    kind: attr::XOR_PEER_ADDRESS,
                    value: xor_address_value(&SocketAddr::new(ip, 0), &tid),
                }],
            ),
            Request::Channel(peer, number) => (
                method::CHANNEL_BIND,
                vec![
                    Attribute::Unknown {
                        kind: attr::CHANNEL_NUMBER,
                        value: [number.to_be_bytes(), [0, 0]].concat(),
                    },
                    Attribute::Unknown {
                        kind: attr::XOR_PEER_ADDRESS,
                        value: xor_address_value(&peer, &tid),
                    },
                ],
            ),
        };
        let mut msg = Message::new(Class::Request, m, tid);
        msg.attributes = attrs;
        let authenticated = match (&self.realm, &self.nonce, &self.key) {
            (Some(realm), Some(nonce), Some(_)) => {
                msg.attributes
                    .push(Attribute::Username(self.credentials.username.clone()));
                msg.attributes.push(Attribute::Unknown {
                    kind: attr::REALM,
                    value: realm.clone(),
                });
                msg.attributes.push(Attribute::Unknown {
                    kind: attr::NONCE,
                    value: nonce.clone(),
                });
                true
            }
            _ => false,
        };
        let mut bytes = Vec::with_capacity(msg.encoded_len() + 24);
        let key = self.key;
        Encoder {
            integrity: key
                .as_ref()
                .filter(|_| authenticated)
                .map(|k| (Integrity::Sha1, &k[..])),
            fingerprint: false,
        }
        .encode(&msg, &mut bytes);
        let first_wait = if self.transport.reliable() {
            STREAM_TIMEOUT
        } else {
            RTO
        };
        self.transmits.push_back(bytes.clone());
        self.pending.insert(
            tid,
            Pending {
                request,
                bytes,
                sent: 1,
                next: now + first_wait,
                started: now,
                authenticated,
                nonce_retries,
            },
        );
    }
}

/// The LIFETIME a server granted (RFC 8656 §7.3: 600 s when absent).
fn lifetime(msg: &Message) -> Duration {
    let secs = raw(msg, attr::LIFETIME)
        .and_then(|v| <[u8; 4]>::try_from(v).ok())
        .map_or(600, u32::from_be_bytes);
    Duration::from_secs(u64::from(secs))
}

/// Refresh at half the lifetime: a lost refresh still leaves a quarter of
/// it for the retransmissions (15.5 s) on any lifetime of a minute or more.
fn refresh_after(lifetime: Duration) -> Duration {
    (lifetime / 2).max(MIN_REFRESH)
}

/// The raw value of a TURN attribute (decoded as unknown by the STUN codec).
fn raw(msg: &Message, kind: u16) -> Option<&[u8]> {
    msg.attributes.iter().find_map(|a| match a {
        Attribute::Unknown { kind: k, value } if *k == kind => Some(value.as_slice()),
        _ => None,
    })
}

#[cfg(test)]
mod tests;
