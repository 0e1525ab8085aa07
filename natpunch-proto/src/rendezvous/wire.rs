//! Rendezvous frames: `0x2A`, a version byte, then a postcard body.
//!
//! The first byte tells rendezvous traffic apart from STUN (0x00-0x03),
//! punch probes (0x2B) and QUIC (0x40-0xFF) on the one UDP socket (RFC 7983
//! style demultiplexing). A frame never exceeds [`MAX_FRAME`], so decoding
//! allocates at most that much whatever the input.
//!
//! The exchange, for one introduction (A connects to the listener B):
//!
//! ```text
//! A → S  Hello                      S → A  Challenge(cookie)
//! A → S  Connect(cookie, facts)     S → A  Peer(B's facts, start)     S → B  Incoming(A's facts, start)
//! B → S  Accept(facts, fresh)       S → B  Sync(…)                    S → A  Sync(B's offer, facts)
//! either → S  Update(later facts)   S → sender Sync(ack)             S → other Sync(new facts)
//! either → S  Poll                  S → sender Sync (the other side's latest state, and Go)
//! ```
//!
//! Facts that are still being measured are marked [`Pending`]; the side
//! sends an `Update` when they are known, and the server hands both sides
//! one coordinated start for prediction (`Sync.start_in_ms`) once both
//! mappings are known. A listener (an endpoint that accepts sessions)
//! registers and sends `Ping` heartbeats; a connector needs only a cookie.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::identity::PeerId;
use crate::nat::{AllocationKind, Behaviour, NatReport};
use crate::portmap::Mapped;

/// First byte of every rendezvous frame.
pub const MAGIC: u8 = 0x2A;
/// The wire version this code speaks. Version 2: connectors need no
/// registration, facts can arrive late (`Update`/`Sync`), heartbeats.
/// Version 3: a listener is homed on a relay node, and introductions say
/// which node relays the session. Version 4: a peer's facts carry the
/// port its gateway maps for it. Version 5: and its TCP punching port.
/// Version 6: and the addresses TURN servers relay for it.
pub const VERSION: u8 = 6;
/// Largest frame: below the 1280-byte IPv6 minimum MTU minus headers, so a
/// frame is never fragmented.
pub const MAX_FRAME: usize = 1200;
/// Host candidates a peer may announce (LAN addresses, forwarded ports).
pub const MAX_CANDIDATES: usize = 8;
/// TURN relayed addresses a peer may announce: one per `--turn` server,
/// and nobody needs more than a few (each costs the other side a probe
/// stream).
pub const MAX_TURN: usize = 4;

/// Facts not measured yet: an `Update` will bring them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Pending {
    /// Mapping behaviour and port allocation (one or two round trips).
    pub mapping: bool,
    /// Filtering behaviour (the slowest: it waits for answers that may
    /// never come).
    pub filtering: bool,
    /// The limited TTL that opens our NAT(s).
    pub hops: bool,
    /// Our gateway is still being asked for a port mapping: a pair with
    /// no direct path otherwise waits for it (a short while).
    pub portmap: bool,
    /// Our TCP punching port is still being measured.
    pub tcp: bool,
    /// A TURN allocation is on its way: a pair with no direct path waits
    /// for its relayed address (a short while).
    pub turn: bool,
}

impl Pending {
    /// Nothing measured yet. (A port mapping is pending only where a port
    /// mapper runs: [`crate::coordinator::HostConfig::portmap`].)
    pub const ALL: Pending = Pending {
        mapping: true,
        filtering: true,
        hops: true,
        portmap: false,
        tcp: false,
        turn: false,
    };

    /// A NAT fact is still being measured (the port mapping is not one).
    pub fn any(&self) -> bool {
        self.mapping || self.filtering || self.hops
    }
}

/// What a peer knows of its NAT, as the other side needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NatSummary {
    pub mapping: Option<Behaviour>,
    pub filtering: Option<Behaviour>,
    pub allocation: Option<AllocationKind>,
    pub delta: Option<i32>,
    /// TTL that opens our outermost NAT without reaching the peer's.
    pub opener_ttl: Option<u8>,
    /// Whether a NAT was seen at all (`Some(false)`: public address).
    pub nat: Option<bool>,
    /// What is still being measured (`None` above then means "not yet").
    pub pending: Pending,
}

impl NatSummary {
    pub fn from_report(r: &NatReport, opener_ttl: Option<u8>) -> Self {
        Self {
            mapping: r.mapping,
            filtering: r.filtering,
            allocation: r.allocation.kind,
            delta: r.allocation.delta,
            opener_ttl,
            nat: r.nat,
            pending: Pending::default(),
        }
    }

    /// Nothing known yet, everything on its way.
    pub fn measuring() -> Self {
        Self {
            pending: Pending::ALL,
            ..Self::default()
        }
    }
}

/// What a peer tells the server about itself (the server adds the address
/// it observes; it never trusts a claimed one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PeerInfo {
    pub nat: NatSummary,
    /// Host candidates: LAN addresses and manually forwarded ports.
    pub candidates: Vec<SocketAddr>,
    /// A port our gateway maps to our main socket (PCP, NAT-PMP or UPnP):
    /// the best candidate, reachable by anyone.
    pub mapped: Option<Mapped>,
    /// Our TCP punching port, when we punch TCP too.
    pub tcp: Option<TcpInfo>,
    /// Addresses TURN servers relay to us (RFC 8656 relayed transport
    /// addresses): the other side probes them from its main socket, and
    /// they carry the session when nothing direct does.
    pub turn: Vec<SocketAddr>,
}

/// A peer's TCP punching port: how its NAT maps it (STUN over TCP from
/// that very port, to two of the server's ports), and whether the peer
/// can only use TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpInfo {
    /// The port's mapping as the server saw it (the server drops it when
    /// its IP is not the one the frame came from).
    pub mapped: SocketAddr,
    /// TCP mapping behaviour (it can differ from UDP's).
    pub mapping: Option<Behaviour>,
    /// TCP port allocation, and its step.
    pub allocation: Option<AllocationKind>,
    pub delta: Option<i32>,
    /// The local port (LAN peers reach it at our LAN addresses).
    pub local_port: u16,
    /// Direct paths must be TCP: UDP is blocked here, or the user said so
    /// (`--tcp`).
    pub only: bool,
}

/// A stateless proof that the sender receives at its source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cookie {
    /// Server clock in ms when issued (wrapping).
    pub issued_ms: u32,
    pub mac: [u8; 16],
}

/// A peer's half of the session key, signed by its identity key so that
/// the other peer (not the server) can check who sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub ephemeral: [u8; 32],
    /// Identity signature over (session, role, ephemeral); 64 bytes.
    pub sig: Vec<u8>,
}

/// Why a target turned an introduction down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DeclineReason {
    /// The target does not accept sessions (it only connects out).
    NotAccepting,
    /// The target's allow list does not name the initiator.
    NotAllowed,
    /// The target has as many attempts under way as it allows.
    Busy,
}

impl DeclineReason {
    /// A stable machine-readable name.
    pub fn code(&self) -> &'static str {
        match self {
            DeclineReason::NotAccepting => "not-accepting",
            DeclineReason::NotAllowed => "not-allowed",
            DeclineReason::Busy => "busy",
        }
    }
}

/// Why the server refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The target is not registered (unknown or offline: deliberately one
    /// answer, so IDs cannot be probed for existence beyond "online").
    PeerOffline,
    /// The cookie is missing, stale or for another address: say Hello.
    BadCookie,
    BadSignature,
    /// The frame's version is not spoken here.
    UnsupportedVersion,
    /// The session is unknown, expired, or not the sender's.
    NoSession,
    /// The target declined.
    Declined(DeclineReason),
    /// The target's budget of introductions is spent for now; the error's
    /// `retry_after_ms` says when the next one is possible.
    IntroductionLimit,
    /// The server holds as many registrations or sessions as it may.
    ServerFull,
    /// The server serves only members (a peer that relays for others
    /// serves the peers it has sessions with), and the sender, or the
    /// target it named, is not one.
    NotMember,
}

impl ErrorCode {
    /// A stable machine-readable name.
    pub fn code(&self) -> &'static str {
        match self {
            ErrorCode::PeerOffline => "offline",
            ErrorCode::BadCookie => "bad-cookie",
            ErrorCode::BadSignature => "bad-signature",
            ErrorCode::UnsupportedVersion => "unsupported-version",
            ErrorCode::NoSession => "no-session",
            ErrorCode::Declined(_) => "declined",
            ErrorCode::IntroductionLimit => "introduction-limit",
            ErrorCode::ServerFull => "server-full",
            ErrorCode::NotMember => "not-member",
        }
    }
}

/// A listener's registration as the server sees it (the answer to a
/// heartbeat).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RegStatus {
    /// Registered, at the address the ping came from.
    Registered,
    /// Not registered here (never, expired, the server restarted, or our
    /// address changed): register again.
    NotRegistered,
    /// Another process with this key registered after us and holds the
    /// registration; told only to the instance it displaced.
    HeldByOther,
}

/// The relay node that carries an introduced session: the target's home
/// node, where the channel (numbered as the session) lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayNode {
    /// The node's public relay address; `None`: the server that sent this
    /// frame, at the address the peer reaches it.
    pub addr: Option<SocketAddr>,
}

/// One side's state of an introduction, as the server relays it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartyState {
    pub offer: Offer,
    pub info: PeerInfo,
    /// A mapping taken just before punching (port prediction).
    pub fresh: Option<SocketAddr>,
}

/// Every rendezvous message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Client → server: asks for a cookie.
    Hello { peer: PeerId },
    /// Server → client.
    Challenge { cookie: Cookie },
    /// Listener → server, signed: make me reachable under my ID.
    /// `instance` tells two processes with one key apart.
    Register {
        peer: PeerId,
        instance: u64,
        cookie: Cookie,
        info: PeerInfo,
        /// Our measured round trip to the server (the cookie's age says
        /// it only when the cookie was just fetched).
        rtt_ms: Option<u32>,
        /// The relay node we are homed on, as that node names itself
        /// (`Registered::home`); `None`: this server.
        home: Option<SocketAddr>,
        sig: Vec<u8>,
    },
    /// Server → listener: the address the server saw, and the name of this
    /// relay node if it has one (a listener is homed on the node it
    /// registers with; lookups return it).
    Registered {
        observed: SocketAddr,
        expires_s: u16,
        home: Option<SocketAddr>,
    },
    /// Client → server, signed: connect me to `target`. Carries our facts
    /// (maybe still pending) and a fresh mapping if we have one.
    Connect {
        peer: PeerId,
        instance: u64,
        target: PeerId,
        cookie: Cookie,
        session: u64,
        offer: Offer,
        info: PeerInfo,
        fresh: Option<SocketAddr>,
        rtt_ms: Option<u32>,
        sig: Vec<u8>,
    },
    /// Server → initiator: the target's registration, and when to start
    /// the first probes. Acknowledges `Connect`. `yours` is the address
    /// the Connect came from (a connector has no registration to learn it).
    Peer {
        session: u64,
        peer: PeerId,
        instance: u64,
        observed: SocketAddr,
        yours: SocketAddr,
        info: PeerInfo,
        start_in_ms: u16,
        /// Where the session is relayed, if it is: the target's home node,
        /// where a channel numbered as the session joins the two
        /// ([`crate::relay`]).
        relay: Option<RelayNode>,
    },
    /// Server → target: someone asks to connect, and when to start.
    Incoming {
        session: u64,
        from: PeerId,
        instance: u64,
        observed: SocketAddr,
        offer: Offer,
        info: PeerInfo,
        fresh: Option<SocketAddr>,
        start_in_ms: u16,
        /// As in `Peer`.
        relay: Option<RelayNode>,
    },
    /// Target → server, signed: my offer, facts and fresh mapping.
    Accept {
        peer: PeerId,
        cookie: Cookie,
        session: u64,
        offer: Offer,
        info: PeerInfo,
        fresh: Option<SocketAddr>,
        sig: Vec<u8>,
    },
    /// Either side → server, signed: facts measured since (`seq` counts
    /// up from 1; the `Connect` or `Accept` was 0).
    Update {
        peer: PeerId,
        cookie: Cookie,
        session: u64,
        seq: u32,
        info: PeerInfo,
        fresh: Option<SocketAddr>,
        sig: Vec<u8>,
    },
    /// Either side → server: what is new in this session? (The cookie
    /// proves the address; the 64-bit session number is known only to the
    /// two sides and the server.)
    Poll {
        peer: PeerId,
        cookie: Cookie,
        session: u64,
    },
    /// Server → one side: the other side's latest state (once it has
    /// spoken), the number of the newest of our states the server holds
    /// (`ack`; none before our Accept arrived), and, once both mappings
    /// are known, when to start prediction.
    Sync {
        session: u64,
        ack: Option<u32>,
        peer: Option<PartyState>,
        start_in_ms: Option<u16>,
    },
    /// Target → server, signed: I will not take this session. The server
    /// tells the initiator and acknowledges with the same error.
    Decline {
        peer: PeerId,
        cookie: Cookie,
        session: u64,
        reason: DeclineReason,
        sig: Vec<u8>,
    },
    Error {
        code: ErrorCode,
        session: Option<u64>,
        /// For limits: when trying again can succeed.
        retry_after_ms: Option<u32>,
    },
    /// Listener → server, every few seconds: am I still registered here?
    /// Keeps the NAT mapping toward the server open too.
    Ping { peer: PeerId, instance: u64 },
    /// Server → listener: the answer to a `Ping`, or pushed when another
    /// instance takes over the registration or gives it back.
    Pong { status: RegStatus },
    /// Listener → server, signed: I am going away (clean exit).
    Unregister {
        peer: PeerId,
        instance: u64,
        cookie: Cookie,
        sig: Vec<u8>,
    },
}

impl Frame {
    /// The peer information a frame carries, for the candidate limit.
    fn info(&self) -> Option<&PeerInfo> {
        match self {
            Frame::Register { info, .. }
            | Frame::Connect { info, .. }
            | Frame::Peer { info, .. }
            | Frame::Incoming { info, .. }
            | Frame::Accept { info, .. }
            | Frame::Update { info, .. } => Some(info),
            Frame::Sync {
                peer: Some(state), ..
            } => Some(&state.info),
            _ => None,
        }
    }

    /// The signature field of a signed frame.
    pub fn sig_mut(&mut self) -> Option<&mut Vec<u8>> {
        match self {
            Frame::Register { sig, .. }
            | Frame::Connect { sig, .. }
            | Frame::Accept { sig, .. }
            | Frame::Update { sig, .. }
            | Frame::Decline { sig, .. }
            | Frame::Unregister { sig, .. } => Some(sig),
            _ => None,
        }
    }
}

/// Why a datagram is not a frame we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("not a rendezvous frame")]
    NotRendezvous,
    #[error("rendezvous version {got} (we speak {VERSION})")]
    UnsupportedVersion { got: u8 },
    #[error("frame of {len} bytes exceeds {MAX_FRAME}")]
    TooLarge { len: usize },
    #[error("malformed frame body")]
    Malformed,
    #[error("too many candidates ({count})")]
    TooManyCandidates { count: usize },
}

/// Whether the datagram belongs to the rendezvous protocol.
pub fn is_rendezvous(buf: &[u8]) -> bool {
    buf.first() == Some(&MAGIC)
}

/// Encodes a frame.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let mut out = vec![MAGIC, VERSION];
    // Serialising our own types into a Vec cannot fail.
    if let Ok(body) = postcard::to_allocvec(frame) {
        out.extend_from_slice(&body);
    }
    out
}

/// Decodes a frame, checking magic, version, size and limits.
pub fn decode(buf: &[u8]) -> Result<Frame, WireError> {
    if buf.len() > MAX_FRAME {
        return Err(WireError::TooLarge { len: buf.len() });
    }
    match buf {
        [MAGIC, VERSION, body @ ..] => {
            let frame: Frame = postcard::from_bytes(body).map_err(|_| WireError::Malformed)?;
            let (count, turn) = frame
                .info()
                .map_or((0, 0), |i| (i.candidates.len(), i.turn.len()));
            if count > MAX_CANDIDATES || turn > MAX_TURN {
                return Err(WireError::TooManyCandidates {
                    count: count + turn,
                });
            }
            Ok(frame)
        }
        [MAGIC, v, ..] => Err(WireError::UnsupportedVersion { got: *v }),
        _ => Err(WireError::NotRendezvous),
    }
}

/// The bytes a signature over a frame covers: the frame with `sig` emptied,
/// so that signer and verifier agree byte for byte.
pub fn signed_bytes(frame: &Frame) -> Vec<u8> {
    let mut f = frame.clone();
    if let Some(sig) = f.sig_mut() {
        sig.clear();
    }
    postcard::to_allocvec(&f).unwrap_or_default()
}

/// Signature contexts (domain separation).
pub mod context {
    pub const FRAME: &[u8] = b"natpunch/rendezvous-frame/v2";
    pub const OFFER: &[u8] = b"natpunch/punch-offer/v1";
}

/// The bytes an [`Offer`]'s signature covers.
pub fn offer_bytes(session: u64, initiator: bool, ephemeral: &[u8; 32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(41);
    v.extend_from_slice(&session.to_be_bytes());
    v.push(u8::from(initiator));
    v.extend_from_slice(ephemeral);
    v
}
