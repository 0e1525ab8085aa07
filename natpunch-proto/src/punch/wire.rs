//! Punch frames: probes, acks, the initiator's confirm and keepalives.
//!
//! Fixed layout (hand-written: 17 bytes of header that must be parsed fast
//! and bounded, for up to thousands of birthday probes):
//!
//! ```text
//! 0     magic 0x2B          1  version      2  kind      3  strategy
//! 4..12 session (u64 BE)    12..16 seq (u32 BE)          16 flags
//! then  offer (32-byte X25519 key + 64-byte signature) if flags & 1
//! then  MAC (16 bytes HMAC-SHA256 over everything before it) if flags & 2
//! ```

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::portmap::MapProtocol;

/// First byte of every punch frame (after STUN's 0-3 and rendezvous' 0x2A,
/// below QUIC's 0x40+).
pub const MAGIC: u8 = 0x2B;
pub const VERSION: u8 = 1;
const HEADER: usize = 17;
const OFFER_LEN: usize = 96;
const MAC_LEN: usize = 16;
const FLAG_OFFER: u8 = 1;
const FLAG_MAC: u8 = 2;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Probe = 1,
    Ack = 2,
    Confirm = 3,
    Keepalive = 4,
}

/// Which technique sent a probe (echoed in acks, named in events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    Lan,
    Cone,
    Predict,
    Ttl,
    Birthday,
    /// Not a punching technique: the server's relay (never in a probe).
    Relay,
    /// To the port a gateway maps for one side, and by which protocol.
    Portmap(MapProtocol),
    /// A TCP stream punched by simultaneous open ([`super::tcp`]).
    Tcp,
    /// Through a TURN server's relayed address (RFC 8656): a relay path,
    /// found by probing like a direct one, but never ending the attempt.
    Turn,
}

impl Strategy {
    pub fn as_str(&self) -> &'static str {
        match self {
            Strategy::Lan => "lan",
            Strategy::Cone => "cone",
            Strategy::Predict => "predict",
            Strategy::Ttl => "ttl",
            Strategy::Birthday => "birthday",
            Strategy::Relay => "relay",
            Strategy::Portmap(_) => "portmap",
            Strategy::Tcp => "tcp",
            Strategy::Turn => "turn",
        }
    }

    /// The mapping protocol, for [`Strategy::Portmap`].
    pub fn protocol(&self) -> Option<MapProtocol> {
        match self {
            Strategy::Portmap(p) => Some(*p),
            _ => None,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Strategy::Lan => 1,
            Strategy::Cone => 2,
            Strategy::Predict => 3,
            Strategy::Ttl => 4,
            Strategy::Birthday => 5,
            Strategy::Relay => 6,
            Strategy::Portmap(MapProtocol::Pcp) => 7,
            Strategy::Portmap(MapProtocol::NatPmp) => 8,
            Strategy::Portmap(MapProtocol::Upnp) => 9,
            Strategy::Tcp => 10,
            Strategy::Turn => 11,
        }
    }

    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Strategy::Lan,
            2 => Strategy::Cone,
            3 => Strategy::Predict,
            4 => Strategy::Ttl,
            5 => Strategy::Birthday,
            7 => Strategy::Portmap(MapProtocol::Pcp),
            8 => Strategy::Portmap(MapProtocol::NatPmp),
            9 => Strategy::Portmap(MapProtocol::Upnp),
            10 => Strategy::Tcp,
            11 => Strategy::Turn,
            _ => return None,
        })
    }
}

/// The session number of a punch frame, without checking the rest (for
/// routing it to its attempt, which then checks everything).
pub fn session_of(buf: &[u8]) -> Option<u64> {
    if buf.len() < HEADER || buf[0] != MAGIC || buf[1] != VERSION {
        return None;
    }
    let b: [u8; 8] = buf[4..12].try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

/// A parsed frame; `signed_len` is where the MAC starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PunchFrame {
    pub kind: Kind,
    pub strategy: Strategy,
    pub session: u64,
    pub seq: u32,
    /// The sender's offer: (X25519 public key, signature).
    pub offer: Option<([u8; 32], [u8; 64])>,
    pub mac: Option<[u8; 16]>,
    signed_len: usize,
}

/// Why a datagram is not a punch frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PunchWireError {
    #[error("not a punch frame")]
    NotPunch,
    #[error("punch frame version {0}")]
    Version(u8),
    #[error("punch frame of {0} bytes has a bad length or fields")]
    Malformed(usize),
}

/// Whether the datagram is a punch frame.
pub fn is_punch(buf: &[u8]) -> bool {
    buf.first() == Some(&MAGIC)
}

fn mac(key: &[u8; 32], data: &[u8]) -> [u8; 16] {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    let full: [u8; 32] = m.finalize().into_bytes().into();
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(&full[..MAC_LEN]);
    out
}

/// Encodes a frame; with `key`, appends the MAC.
pub fn encode(
    kind: Kind,
    strategy: Strategy,
    session: u64,
    seq: u32,
    offer: Option<(&[u8; 32], &[u8; 64])>,
    key: Option<&[u8; 32]>,
) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + OFFER_LEN + MAC_LEN);
    v.extend_from_slice(&[MAGIC, VERSION, kind as u8, strategy.to_u8()]);
    v.extend_from_slice(&session.to_be_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    let flags =
        if offer.is_some() { FLAG_OFFER } else { 0 } | if key.is_some() { FLAG_MAC } else { 0 };
    v.push(flags);
    if let Some((e, s)) = offer {
        v.extend_from_slice(e);
        v.extend_from_slice(s);
    }
    if let Some(k) = key {
        let m = mac(k, &v);
        v.extend_from_slice(&m);
    }
    v
}

/// Decodes a frame (the MAC is checked separately with [`verify_mac`]).
pub fn decode(buf: &[u8]) -> Result<PunchFrame, PunchWireError> {
    if !is_punch(buf) {
        return Err(PunchWireError::NotPunch);
    }
    if buf.len() < HEADER {
        return Err(PunchWireError::Malformed(buf.len()));
    }
    if buf[1] != VERSION {
        return Err(PunchWireError::Version(buf[1]));
    }
    let bad = || PunchWireError::Malformed(buf.len());
    let kind = match buf[2] {
        1 => Kind::Probe,
        2 => Kind::Ack,
        3 => Kind::Confirm,
        4 => Kind::Keepalive,
        _ => return Err(bad()),
    };
    let strategy = Strategy::from_u8(buf[3]).ok_or_else(bad)?;
    let session = u64::from_be_bytes(buf[4..12].try_into().map_err(|_| bad())?);
    let seq = u32::from_be_bytes(buf[12..16].try_into().map_err(|_| bad())?);
    let flags = buf[16];
    if flags & !(FLAG_OFFER | FLAG_MAC) != 0 {
        return Err(bad());
    }
    let want = HEADER
        + if flags & FLAG_OFFER != 0 {
            OFFER_LEN
        } else {
            0
        }
        + if flags & FLAG_MAC != 0 { MAC_LEN } else { 0 };
    if buf.len() != want {
        return Err(bad());
    }
    let mut pos = HEADER;
    let offer = if flags & FLAG_OFFER != 0 {
        let e: [u8; 32] = buf[pos..pos + 32].try_into().map_err(|_| bad())?;
        let s: [u8; 64] = buf[pos + 32..pos + 96].try_into().map_err(|_| bad())?;
        pos += OFFER_LEN;
        Some((e, s))
    } else {
        None
    };
    let signed_len = pos;
    let mac = if flags & FLAG_MAC != 0 {
        Some(buf[pos..pos + MAC_LEN].try_into().map_err(|_| bad())?)
    } else {
        None
    };
    Ok(PunchFrame {
        kind,
        strategy,
        session,
        seq,
        offer,
        mac,
        signed_len,
    })
}

/// Checks a frame's MAC against `key` (constant time).
pub fn verify_mac(frame: &PunchFrame, raw: &[u8], key: &[u8; 32]) -> bool {
    let (Some(m), Some(signed)) = (frame.mac, raw.get(..frame.signed_len)) else {
        return false;
    };
    let expected = mac(key, signed);
    expected
        .iter()
        .zip(m.iter())
        .fold(0u8, |a, (x, y)| a | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_mac() {
        let key = [7u8; 32];
        let raw = encode(
            Kind::Ack,
            Strategy::Predict,
            42,
            9,
            Some((&[1; 32], &[2; 64])),
            Some(&key),
        );
        assert_eq!(raw.len(), 17 + 96 + 16);
        let f = decode(&raw).unwrap();
        assert_eq!(
            (f.kind, f.strategy, f.session, f.seq),
            (Kind::Ack, Strategy::Predict, 42, 9)
        );
        assert!(verify_mac(&f, &raw, &key));
        assert!(!verify_mac(&f, &raw, &[8; 32]));
        let mut bad = raw.clone();
        bad[13] ^= 1;
        assert!(!verify_mac(&decode(&bad).unwrap(), &bad, &key));
        // Truncations and junk never panic.
        for n in 0..raw.len() {
            let _ = decode(&raw[..n]);
        }
        assert!(decode(&[MAGIC, 9, 1, 1]).is_err());
    }
}
