//! The relay: the rendezvous server forwards a session's already-encrypted
//! QUIC packets between its two peers when no direct path exists (yet).
//!
//! A relay channel is an introduction's session number. The server opens
//! it when an authenticated `Connect` names a registered target (both
//! ends are then known: the initiator's address from its signed,
//! cookie-checked request, the target's from its signed registration), so
//! a client has proved its key before anything is relayed for it, and a
//! stranger who does not know the 64-bit session number cannot use or
//! even probe a channel. Each end's address follows that peer's later
//! signed requests (a re-registration, an `Accept`, a re-punch's
//! `Connect`), so a channel survives a NAT rebinding.
//!
//! The frame is `0x2C`, the channel (8 bytes, big-endian), then the
//! payload, and the server forwards it unchanged: it never decrypts, never
//! answers, and a relayed datagram is exactly as large as the one it
//! received. An empty payload is a keepalive (it refreshes the channel and
//! the NAT mappings toward the server; it is not forwarded).
//!
//! Hand-written because no crate fits: TURN (RFC 8656) allocates
//! transport addresses and relays to arbitrary hosts, while this relay
//! only joins two peers the rendezvous already authenticated, addressed by
//! their session, with 9 bytes of overhead.

pub mod server;
pub mod stream;

pub use server::{RelayConfig, RelayServer, RelayStats};

/// First byte of every relay frame (after STUN 0x00–0x03, rendezvous 0x2A
/// and punch 0x2B; QUIC starts at 0x40).
pub const MAGIC: u8 = 0x2C;
/// Magic byte and channel number.
pub const HEADER: usize = 9;
/// The QUIC packet size every path can carry, relayed or not: 1452 bytes
/// (1500-byte MTU under IPv6 and UDP headers) minus the relay header, so
/// that a session can move between a relay path and a direct path without
/// meeting a black hole (iroh PR #2835).
pub const MAX_QUIC_PAYLOAD: u16 = 1452 - HEADER as u16;
/// Largest payload relayed: what QUIC sends, so that a relayed datagram
/// (1452 bytes) fits a 1500-byte MTU under IPv6 or IPv4 and UDP headers,
/// and a run of them can leave the server as one GSO batch.
pub const MAX_PAYLOAD: usize = MAX_QUIC_PAYLOAD as usize;

/// Whether the datagram is a relay frame.
pub fn is_relay(buf: &[u8]) -> bool {
    buf.first() == Some(&MAGIC)
}

/// Why a datagram is not a relay frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayWireError {
    #[error("not a relay frame")]
    NotRelay,
    #[error("relay frame of {len} bytes is shorter than its header")]
    Truncated { len: usize },
    #[error("relay payload of {len} bytes exceeds {MAX_PAYLOAD}")]
    TooLarge { len: usize },
}

/// Writes a frame's header for `channel` into `out` (cleared first), then
/// the payload.
pub fn encode_into(channel: u64, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(HEADER + payload.len());
    out.push(MAGIC);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(payload);
}

/// A frame for `channel`.
pub fn encode(channel: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(channel, payload, &mut out);
    out
}

/// The header of a frame: its channel number.
pub fn header(channel: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0] = MAGIC;
    h[1..].copy_from_slice(&channel.to_be_bytes());
    h
}

/// A frame's channel and payload.
pub fn decode(buf: &[u8]) -> Result<(u64, &[u8]), RelayWireError> {
    match buf.split_first() {
        Some((&MAGIC, rest)) => {
            let Some((ch, payload)) = rest.split_first_chunk::<8>() else {
                return Err(RelayWireError::Truncated { len: buf.len() });
            };
            if payload.len() > MAX_PAYLOAD {
                return Err(RelayWireError::TooLarge { len: payload.len() });
            }
            Ok((u64::from_be_bytes(*ch), payload))
        }
        _ => Err(RelayWireError::NotRelay),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        let f = encode(0x0102_0304_0506_0708, b"quic");
        assert_eq!(f.len(), HEADER + 4);
        assert_eq!(&f[..HEADER], &header(0x0102_0304_0506_0708));
        assert_eq!(decode(&f), Ok((0x0102_0304_0506_0708, &b"quic"[..])));
        assert_eq!(decode(&encode(7, &[])), Ok((7, &[][..])));
        assert_eq!(
            decode(&[MAGIC, 1, 2]),
            Err(RelayWireError::Truncated { len: 3 })
        );
        assert_eq!(decode(&[0x2A, 0, 0]), Err(RelayWireError::NotRelay));
        assert_eq!(decode(&[]), Err(RelayWireError::NotRelay));
        let big = encode(1, &[0x40; MAX_PAYLOAD + 1]);
        assert_eq!(
            decode(&big),
            Err(RelayWireError::TooLarge {
                len: MAX_PAYLOAD + 1
            })
        );
        assert!(is_relay(&f) && !is_relay(b"\x2a"));
        // A relayed datagram fits a 1500-byte MTU under IPv6 and UDP.
        assert_eq!(HEADER + MAX_PAYLOAD, 1452);
    }
}
