//! Rendezvous frames: `0x2A`, a version byte, then a postcard body.
//!
//! The first byte tells rendezvous traffic apart from STUN (0x00-0x03),
//! punch probes (0x2B) and QUIC (0x40-0xFF) on the one UDP socket (RFC 7983
//! style demultiplexing). A frame never exceeds [`MAX_FRAME`], so decoding
//! allocates at most that much whatever the input.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::identity::PeerId;
use crate::nat::{AllocationKind, Behaviour, NatReport};

/// First byte of every rendezvous frame.
pub const MAGIC: u8 = 0x2A;
/// The wire version this code speaks.
pub const VERSION: u8 = 1;
/// Largest frame: below the 1280-byte IPv6 minimum MTU minus headers, so a
/// frame is never fragmented.
pub const MAX_FRAME: usize = 1200;
/// Host candidates a peer may announce (LAN addresses, forwarded ports).
pub const MAX_CANDIDATES: usize = 8;

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

/// Why the server refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The target is not registered (unknown or offline: deliberately one
    /// answer, so IDs cannot be probed for existence beyond "online").
    PeerOffline,
    /// Register first.
    NotRegistered,
    /// The cookie is missing, stale or for another address: say Hello.
    BadCookie,
    BadSignature,
    RateLimited,
    /// The frame's version is not spoken here.
    UnsupportedVersion,
    /// The session is unknown or expired.
    NoSession,
    /// The target declined.
    Declined,
}

impl ErrorCode {
    pub fn describe(&self) -> &'static str {
        match self {
            ErrorCode::PeerOffline => "peer is offline or unknown",
            ErrorCode::NotRegistered => "not registered with the server",
            ErrorCode::BadCookie => "stale address cookie",
            ErrorCode::BadSignature => "signature does not match the peer ID",
            ErrorCode::RateLimited => "rate-limited by the server",
            ErrorCode::UnsupportedVersion => "server speaks another protocol version",
            ErrorCode::NoSession => "session unknown or expired",
            ErrorCode::Declined => {
                "the peer declined: it does not accept sessions, or not from us (--allow)"
            }
        }
    }
}

/// Every rendezvous message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Client → server: asks for a cookie.
    Hello { peer: PeerId },
    /// Server → client.
    Challenge { cookie: Cookie },
    /// Client → server, signed.
    Register {
        peer: PeerId,
        cookie: Cookie,
        info: PeerInfo,
        sig: Vec<u8>,
    },
    /// Server → client: the address the server saw.
    Registered {
        observed: SocketAddr,
        expires_s: u16,
    },
    /// Client → server, signed: connect me to `target`. `fresh` is a
    /// mapping taken just now (for port prediction).
    Connect {
        peer: PeerId,
        target: PeerId,
        cookie: Cookie,
        session: u64,
        offer: Offer,
        fresh: Option<SocketAddr>,
        sig: Vec<u8>,
    },
    /// Server → initiator: the target's registration, and when to start.
    Peer {
        session: u64,
        peer: PeerId,
        observed: SocketAddr,
        info: PeerInfo,
        start_in_ms: u16,
    },
    /// Server → target: someone asks to connect, and when to start.
    Incoming {
        session: u64,
        from: PeerId,
        observed: SocketAddr,
        info: PeerInfo,
        offer: Offer,
        fresh: Option<SocketAddr>,
        start_in_ms: u16,
    },
    /// Target → server, signed: my fresh mapping and my offer.
    Accept {
        peer: PeerId,
        cookie: Cookie,
        session: u64,
        offer: Offer,
        fresh: Option<SocketAddr>,
        sig: Vec<u8>,
    },
    /// Server → initiator: the target's answer.
    Accepted {
        session: u64,
        offer: Offer,
        fresh: Option<SocketAddr>,
        start_in_ms: u16,
    },
    /// Server → target: go (after its Accept was forwarded).
    Go { session: u64, start_in_ms: u16 },
    Error {
        code: ErrorCode,
        session: Option<u64>,
    },
    /// Target → server, signed: I will not take this session (not
    /// accepting, or the initiator is not on my allow list). The server
    /// tells the initiator (`Error` `Declined`) and acknowledges with the
    /// same error.
    Decline {
        peer: PeerId,
        cookie: Cookie,
        session: u64,
        sig: Vec<u8>,
    },
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
            let count = match &frame {
                Frame::Register { info, .. }
                | Frame::Peer { info, .. }
                | Frame::Incoming { info, .. } => info.candidates.len(),
                _ => 0,
            };
            if count > MAX_CANDIDATES {
                return Err(WireError::TooManyCandidates { count });
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
    match &mut f {
        Frame::Register { sig, .. }
        | Frame::Connect { sig, .. }
        | Frame::Accept { sig, .. }
        | Frame::Decline { sig, .. } => sig.clear(),
        _ => {}
    }
    postcard::to_allocvec(&f).unwrap_or_default()
}

/// Signature contexts (domain separation).
pub mod context {
    pub const FRAME: &[u8] = b"natpunch/rendezvous-frame/v1";
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
