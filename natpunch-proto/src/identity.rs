//! Peer identities, peer IDs, signatures and the ephemeral key agreement.
//!
//! A natpunch peer is named by its Ed25519 public key, the [`PeerId`]. The
//! rendezvous server lets a peer register or answer as an ID only when it
//! signs with that ID's key, so knowing an ID is not enough to impersonate it.
//! Two peers that meet through the server agree on an end-to-end session key
//! from X25519 [`Ephemeral`] keys; each side signs its ephemeral public key
//! with its [`Identity`], so the server, which relays the keys, cannot swap in
//! its own.
//!
//! Why these choices:
//! - **The ID is the public key itself**, not a hash of it, so a verifier
//!   needs nothing but the ID (iroh's `NodeId` makes the same choice).
//! - **The text form carries a checksum**: people paste IDs into config files
//!   and chat, and a one-character typo would otherwise name a different,
//!   valid key, making a connection hang instead of failing at parse time.
//!   Base32 (RFC 4648, lowercase) avoids case and `+/` trouble in shells,
//!   URLs and DNS labels.
//! - **Signatures are domain-separated and the context is length-prefixed**,
//!   so a signature made for one purpose (say, a registration) can never be
//!   replayed as another (say, an ephemeral key), and contexts `"ab"+"c"`
//!   and `"a"+"bc"` sign different bytes.
//! - **Verification is strict** (`verify_strict`): it rejects small-order
//!   keys and non-canonical `R`, so a signature is not malleable and a weak
//!   key cannot sign "everything".
//! - **The key agreement rejects low-order points**: otherwise a relay could
//!   hand both peers a low-order public key and force a known, all-zero
//!   shared secret.
//!
//! This module is sans-IO like the rest of the crate: it reads no files and
//! no OS randomness. Secrets come in as seeds; the `natpunch` crate's
//! `keyfile` module stores the identity seed and draws it from the OS.

use std::fmt;
use std::str::FromStr;

use data_encoding::{DecodeKind, BASE32_NOPAD, BASE32_NOPAD_NOCASE};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hkdf::Hkdf;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey as XPublicKey, StaticSecret};

/// Bytes in an Ed25519 public key, and so in a [`PeerId`] (RFC 8032 §5.1.5).
pub const PEER_ID_LEN: usize = 32;
/// Bytes of checksum appended to the key in the text form. 16 bits make a
/// random typo slip through with probability 2^-16 while adding only three
/// characters; the text form is for humans, the wire carries raw bytes.
pub const CHECKSUM_LEN: usize = 2;
/// Characters in the text form: base32 of 34 bytes is ceil(272 / 5) = 55
/// characters without padding (RFC 4648 §6).
pub const PEER_ID_TEXT_LEN: usize = (8 * (PEER_ID_LEN + CHECKSUM_LEN)).div_ceil(5);
/// Characters of the text form that `Debug` shows: 50 bits, enough to tell
/// apart the peers in one log, and short enough to read.
const DEBUG_TEXT_LEN: usize = 10;
/// Hashed in front of the key for the checksum, so it cannot be mistaken for
/// any other SHA-256 of a public key. The `v1` lets a later text form differ.
const CHECKSUM_DOMAIN: &[u8] = b"natpunch peer-id checksum v1\0";
/// Bytes in an Ed25519 signature (RFC 8032 §5.1.6).
pub const SIGNATURE_LEN: usize = 64;
/// Prefix of every message an [`Identity`] signs. Every signature made with
/// an identity key starts with it, so the key signs nothing of another
/// protocol's shape even if it were reused. The `v1` allows a new layout.
const SIGNATURE_DOMAIN: &[u8] = b"natpunch identity signature v1\0";
/// Bytes in an X25519 key (RFC 7748 §5).
pub const X25519_KEY_LEN: usize = 32;
/// Bytes of the session key [`Ephemeral::agree`] returns: the HKDF-SHA256
/// output of one hash length, the key size of ChaCha20-Poly1305 and AES-256.
pub const SESSION_KEY_LEN: usize = 32;

/// An Ed25519 signature as sent on the wire.
pub type Signature64 = [u8; SIGNATURE_LEN];

/// Why a string or byte string is not a [`PeerId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerIdError {
    #[error("a peer ID has {expected} characters, this one has {len}", expected = PEER_ID_TEXT_LEN)]
    Length { len: usize },
    #[error(
        "character {found:?} at position {position} is not in the peer ID alphabet (a-z, 2-7)"
    )]
    BadChar { position: usize, found: char },
    #[error("the last character (position {position}) cannot end a peer ID; is it mistyped?")]
    NonZeroTrailingBits { position: usize },
    #[error("checksum mismatch (carried {carried:#06x}, computed {computed:#06x}); the peer ID is mistyped")]
    ChecksumMismatch { carried: u16, computed: u16 },
    #[error("the key is not the canonical encoding of an Ed25519 point")]
    InvalidPoint,
    #[error("the key is a small-order Ed25519 point, which no one can be held to")]
    WeakKey,
}

/// Why a signature does not verify. Every variant is a rejection; none is
/// retryable, and callers should not tell the remote which one it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    #[error("the peer ID's key cannot be decoded")]
    BadKey,
    #[error("the signature does not match the peer ID, context and message")]
    Mismatch,
}

/// Why an X25519 agreement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AgreeError {
    /// The peer's public key has low order, so the shared secret is all zero
    /// and known to anyone (RFC 7748 §6.1). Fatal: the peer, or whoever
    /// relayed its key, is misbehaving.
    #[error("the peer's X25519 key has low order (all-zero shared secret)")]
    LowOrderPoint,
}

/// A peer's name: its Ed25519 public key, always a valid, canonical,
/// large-order point.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId([u8; PEER_ID_LEN]);

impl PeerId {
    /// Validates a raw public key: it must decode to an Ed25519 point, be
    /// its canonical encoding (so one key has one ID) and not have small
    /// order.
    pub fn from_bytes(bytes: [u8; PEER_ID_LEN]) -> Result<Self, PeerIdError> {
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| PeerIdError::InvalidPoint)?;
        if key.to_edwards().compress().to_bytes() != bytes {
            return Err(PeerIdError::InvalidPoint);
        }
        if key.is_weak() {
            return Err(PeerIdError::WeakKey);
        }
        Ok(Self(bytes))
    }

    /// The raw public key.
    pub fn as_bytes(&self) -> &[u8; PEER_ID_LEN] {
        &self.0
    }

    fn checksum(key: &[u8; PEER_ID_LEN]) -> [u8; CHECKSUM_LEN] {
        let digest = Sha256::new()
            .chain_update(CHECKSUM_DOMAIN)
            .chain_update(key)
            .finalize();
        [digest[0], digest[1]]
    }

    /// The text form as ASCII bytes (lowercase base32 of key + checksum).
    fn text(&self) -> [u8; PEER_ID_TEXT_LEN] {
        let mut raw = [0u8; PEER_ID_LEN + CHECKSUM_LEN];
        raw[..PEER_ID_LEN].copy_from_slice(&self.0);
        raw[PEER_ID_LEN..].copy_from_slice(&Self::checksum(&self.0));
        let mut text = [0u8; PEER_ID_TEXT_LEN];
        // Lengths are constants; the test `text_len_matches_encoding` pins
        // that `encode_len` agrees, so this cannot panic.
        BASE32_NOPAD.encode_mut(&raw, &mut text);
        text.make_ascii_lowercase();
        text
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.text()
            .iter()
            .try_for_each(|&b| fmt::Write::write_char(f, char::from(b)))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PeerId(")?;
        self.text()[..DEBUG_TEXT_LEN]
            .iter()
            .try_for_each(|&b| fmt::Write::write_char(f, char::from(b)))?;
        f.write_str("…)")
    }
}

impl FromStr for PeerId {
    type Err = PeerIdError;

    /// Parses the text form; accepts upper case and surrounding whitespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let len = s.chars().count();
        if len != PEER_ID_TEXT_LEN {
            return Err(PeerIdError::Length { len });
        }
        // Checked here rather than left to the decoder so that the error
        // names the character, and positions count characters, not bytes.
        if let Some((position, found)) = s
            .chars()
            .enumerate()
            .find(|(_, c)| !matches!(c, 'a'..='z' | 'A'..='Z' | '2'..='7'))
        {
            return Err(PeerIdError::BadChar { position, found });
        }
        let mut raw = [0u8; PEER_ID_LEN + CHECKSUM_LEN];
        match BASE32_NOPAD_NOCASE.decode_mut(s.as_bytes(), &mut raw) {
            Ok(_) => {}
            Err(partial) => {
                let position = partial.error.position;
                return Err(match partial.error.kind {
                    DecodeKind::Trailing => PeerIdError::NonZeroTrailingBits { position },
                    DecodeKind::Symbol => PeerIdError::BadChar {
                        position,
                        found: s
                            .as_bytes()
                            .get(position)
                            .map_or(char::REPLACEMENT_CHARACTER, |&b| char::from(b)),
                    },
                    // Length and padding were checked above; keep a typed
                    // answer rather than a panic should the decoder disagree.
                    _ => PeerIdError::Length { len },
                });
            }
        }
        let mut key = [0u8; PEER_ID_LEN];
        key.copy_from_slice(&raw[..PEER_ID_LEN]);
        let carried = u16::from_be_bytes([raw[PEER_ID_LEN], raw[PEER_ID_LEN + 1]]);
        let computed = u16::from_be_bytes(Self::checksum(&key));
        if carried != computed {
            return Err(PeerIdError::ChecksumMismatch { carried, computed });
        }
        Self::from_bytes(key)
    }
}

/// Binary formats (postcard on the wire) get the 32 key bytes as a fixed
/// tuple, with no length prefix; human-readable ones (JSON, TOML configs)
/// get the checksummed text form.
impl Serialize for PeerId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for PeerId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        if deserializer.is_human_readable() {
            let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
            text.parse().map_err(D::Error::custom)
        } else {
            let bytes = <[u8; PEER_ID_LEN]>::deserialize(deserializer)?;
            Self::from_bytes(bytes).map_err(D::Error::custom)
        }
    }
}

/// A peer's Ed25519 key pair. Its secret half is wiped on drop; `Debug`
/// shows only the [`PeerId`].
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl Identity {
    /// The identity whose secret key is `seed` (RFC 8032 §5.1.5). The caller
    /// draws the seed from a CSPRNG (or a test seed) and stores it.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// The secret seed, for the key file. The caller should wipe its copy.
    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// This identity's peer ID.
    pub fn peer_id(&self) -> PeerId {
        // A key derived from a seed is a canonical point of large order
        // (a clamped scalar times the base point), so no validation needed.
        PeerId(self.key.verifying_key().to_bytes())
    }

    /// Signs `msg` for the purpose named by `context` (e.g.
    /// `b"natpunch/rendezvous/register"`). [`verify`] must be given the same
    /// context.
    pub fn sign(&self, context: &[u8], msg: &[u8]) -> Signature64 {
        self.key.sign(&signed_bytes(context, msg)).to_bytes()
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("peer_id", &self.peer_id())
            .finish_non_exhaustive()
    }
}

/// The bytes an identity key actually signs:
/// `SIGNATURE_DOMAIN || u64_be(context.len()) || context || msg`.
fn signed_bytes(context: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNATURE_DOMAIN.len() + 8 + context.len() + msg.len());
    out.extend_from_slice(SIGNATURE_DOMAIN);
    // usize is at most 64 bits on every target Rust supports today.
    out.extend_from_slice(&(context.len() as u64).to_be_bytes());
    out.extend_from_slice(context);
    out.extend_from_slice(msg);
    out
}

/// Checks that `peer` signed `msg` under `context` (strict Ed25519:
/// canonical `R` and `s`, no small-order key or `R`).
pub fn verify(
    peer: &PeerId,
    context: &[u8],
    msg: &[u8],
    sig: &Signature64,
) -> Result<(), SignatureError> {
    let key = VerifyingKey::from_bytes(peer.as_bytes()).map_err(|_| SignatureError::BadKey)?;
    let sig = Signature::from_bytes(sig);
    key.verify_strict(&signed_bytes(context, msg), &sig)
        .map_err(|_| SignatureError::Mismatch)
}

/// One side's X25519 key for a single session. The secret is wiped on drop,
/// and [`Ephemeral::agree`] consumes it so it is used once.
pub struct Ephemeral {
    secret: StaticSecret,
}

impl Ephemeral {
    /// The ephemeral key with this secret scalar (clamped per RFC 7748 §5).
    /// The caller draws it from a CSPRNG, fresh for every session.
    pub fn from_secret(secret: [u8; X25519_KEY_LEN]) -> Self {
        Self {
            secret: StaticSecret::from(secret),
        }
    }

    /// The public key to send (signed with [`Identity::sign`]) to the peer.
    pub fn public(&self) -> [u8; X25519_KEY_LEN] {
        XPublicKey::from(&self.secret).to_bytes()
    }

    /// Derives the session key: HKDF-SHA256 (RFC 5869) with `salt` over the
    /// X25519 shared secret, expanded with `info`. Both sides must pass the
    /// same `salt` and `info`; bind into them what the key is for and the
    /// transcript (both peer IDs and both ephemeral public keys, in an order
    /// both sides agree on), so the key belongs to this one session.
    pub fn agree(
        self,
        peer_public: &[u8; X25519_KEY_LEN],
        salt: &[u8],
        info: &[u8],
    ) -> Result<[u8; SESSION_KEY_LEN], AgreeError> {
        let shared = self.secret.diffie_hellman(&XPublicKey::from(*peer_public));
        if !shared.was_contributory() {
            return Err(AgreeError::LowOrderPoint);
        }
        let mut okm = [0u8; SESSION_KEY_LEN];
        Hkdf::<Sha256>::new(Some(salt), shared.as_bytes())
            .expand(info, &mut okm)
            .expect("32 bytes is within HKDF-SHA256's 255 * 32 byte limit");
        Ok(okm)
    }
}

impl fmt::Debug for Ephemeral {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ephemeral")
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALPHABET: &str = "abcdefghijklmnopqrstuvwxyz234567";
    const CTX: &[u8] = b"natpunch/test";

    fn id(n: u8) -> Identity {
        Identity::from_seed([n; 32])
    }

    #[test]
    fn text_len_matches_encoding() {
        assert_eq!(
            BASE32_NOPAD.encode_len(PEER_ID_LEN + CHECKSUM_LEN),
            PEER_ID_TEXT_LEN
        );
        assert_eq!(PEER_ID_TEXT_LEN, 55);
    }

    #[test]
    fn text_round_trip() {
        for n in 0..8 {
            let p = id(n).peer_id();
            let text = p.to_string();
            assert_eq!(text.len(), PEER_ID_TEXT_LEN);
            assert!(text.chars().all(|c| ALPHABET.contains(c)), "{text}");
            assert_eq!(text.parse::<PeerId>(), Ok(p));
            assert_eq!(text.to_uppercase().parse::<PeerId>(), Ok(p));
            assert_eq!(format!(" \t{text}\n").parse::<PeerId>(), Ok(p));
        }
    }

    #[test]
    fn debug_is_short() {
        let p = id(1).peer_id();
        let text = p.to_string();
        assert_eq!(format!("{p:?}"), format!("PeerId({}…)", &text[..10]));
        let dbg = format!("{:?}", id(1));
        assert!(dbg.contains(&text[..10]), "{dbg}");
        let seed_hex: String = id(1).seed().iter().map(|b| format!("{b:02x}")).collect();
        assert!(!dbg.contains(&seed_hex));
    }

    #[test]
    fn every_single_character_typo_is_rejected() {
        // A 16-bit checksum lets one typo in 65536 through; over the 1705
        // typos of one ID that is a ~2.6% chance per ID (halved by point
        // validation), so this checks fixed IDs, not a property.
        for n in 0..4 {
            let text = id(n).peer_id().to_string();
            for position in 0..text.len() {
                for c in ALPHABET.chars() {
                    let mut typo: Vec<char> = text.chars().collect();
                    if typo[position] == c {
                        continue;
                    }
                    typo[position] = c;
                    let typo: String = typo.into_iter().collect();
                    assert!(
                        typo.parse::<PeerId>().is_err(),
                        "typo {c:?} at {position} accepted"
                    );
                }
            }
        }
    }

    #[test]
    fn parse_errors_are_typed() {
        let text = id(3).peer_id().to_string();
        assert_eq!(
            text[1..].parse::<PeerId>(),
            Err(PeerIdError::Length { len: 54 })
        );
        assert_eq!(
            format!("{text}a").parse::<PeerId>(),
            Err(PeerIdError::Length { len: 56 })
        );
        assert_eq!("".parse::<PeerId>(), Err(PeerIdError::Length { len: 0 }));
        let bad = format!("{}1{}", &text[..7], &text[8..]);
        assert_eq!(
            bad.parse::<PeerId>(),
            Err(PeerIdError::BadChar {
                position: 7,
                found: '1'
            })
        );
        let bad = format!("{}é{}", &text[..7], &text[8..]);
        assert_eq!(
            bad.parse::<PeerId>(),
            Err(PeerIdError::BadChar {
                position: 7,
                found: 'é'
            })
        );
        // Flip a bit in a key-only character: the checksum catches it.
        let mut chars: Vec<char> = text.chars().collect();
        chars[0] = if chars[0] == 'a' { 'b' } else { 'a' };
        let typo: String = chars.into_iter().collect();
        assert!(matches!(
            typo.parse::<PeerId>(),
            Err(PeerIdError::ChecksumMismatch { .. } | PeerIdError::InvalidPoint)
        ));
    }

    #[test]
    fn from_bytes_validates_the_point() {
        let p = id(5).peer_id();
        assert_eq!(PeerId::from_bytes(*p.as_bytes()), Ok(p));
        // The identity point (y = 1) has order 1.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(PeerId::from_bytes(identity), Err(PeerIdError::WeakKey));
        // y = 2 is not the y-coordinate of any curve point.
        let mut not_on_curve = [0u8; 32];
        not_on_curve[0] = 2;
        assert_eq!(
            PeerId::from_bytes(not_on_curve),
            Err(PeerIdError::InvalidPoint)
        );
        // y = p + 1 is a non-canonical encoding of the identity's y.
        let mut non_canonical = [0xffu8; 32];
        non_canonical[0] = 0xee;
        non_canonical[31] = 0x7f;
        assert_eq!(
            PeerId::from_bytes(non_canonical),
            Err(PeerIdError::InvalidPoint)
        );
    }

    #[test]
    fn invalid_key_with_good_checksum_is_rejected_in_text() {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let text = PeerId(identity).to_string();
        assert_eq!(text.parse::<PeerId>(), Err(PeerIdError::WeakKey));
    }

    #[test]
    fn serde_binary_is_32_raw_bytes_and_text_is_human() {
        let p = id(9).peer_id();
        let bin = postcard::to_allocvec(&p).unwrap();
        assert_eq!(bin.as_slice(), p.as_bytes());
        assert_eq!(postcard::from_bytes::<PeerId>(&bin).unwrap(), p);
        let mut weak = [0u8; 32];
        weak[0] = 1;
        assert!(postcard::from_bytes::<PeerId>(&weak).is_err());
        assert!(postcard::from_bytes::<PeerId>(&bin[..31]).is_err());

        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, format!("\"{p}\""));
        assert_eq!(serde_json::from_str::<PeerId>(&json).unwrap(), p);
        assert!(serde_json::from_str::<PeerId>("\"abc\"").is_err());
    }

    #[test]
    fn seed_round_trip() {
        let a = id(7);
        let b = Identity::from_seed(a.seed());
        assert_eq!(a.peer_id(), b.peer_id());
        assert_ne!(id(7).peer_id(), id(8).peer_id());
    }

    #[test]
    fn sign_and_verify() {
        let a = id(1);
        let sig = a.sign(CTX, b"hello");
        assert_eq!(verify(&a.peer_id(), CTX, b"hello", &sig), Ok(()));
        // Another key.
        assert_eq!(
            verify(&id(2).peer_id(), CTX, b"hello", &sig),
            Err(SignatureError::Mismatch)
        );
        // Another context.
        assert_eq!(
            verify(&a.peer_id(), b"natpunch/other", b"hello", &sig),
            Err(SignatureError::Mismatch)
        );
        // Another message.
        assert_eq!(
            verify(&a.peer_id(), CTX, b"hellp", &sig),
            Err(SignatureError::Mismatch)
        );
        // Every flipped signature bit.
        for bit in 0..SIGNATURE_LEN * 8 {
            let mut bad = sig;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                verify(&a.peer_id(), CTX, b"hello", &bad).is_err(),
                "bit {bit}"
            );
        }
    }

    #[test]
    fn contexts_cannot_collide() {
        let a = id(1);
        let sig = a.sign(b"ab", b"c");
        assert!(verify(&a.peer_id(), b"a", b"bc", &sig).is_err());
        assert!(verify(&a.peer_id(), b"", b"abc", &sig).is_err());
        assert_ne!(signed_bytes(b"ab", b"c"), signed_bytes(b"a", b"bc"));
    }

    #[test]
    fn agreement_matches_and_depends_on_salt() {
        let a = Ephemeral::from_secret([0x11; 32]);
        let b = Ephemeral::from_secret([0x22; 32]);
        let (pa, pb) = (a.public(), b.public());
        let ka = a.agree(&pb, b"salt", b"info").unwrap();
        let kb = b.agree(&pa, b"salt", b"info").unwrap();
        assert_eq!(ka, kb);

        let a = Ephemeral::from_secret([0x11; 32]);
        assert_ne!(a.agree(&pb, b"other salt", b"info").unwrap(), ka);
        let a = Ephemeral::from_secret([0x11; 32]);
        assert_ne!(a.agree(&pb, b"salt", b"other info").unwrap(), ka);
        let c = Ephemeral::from_secret([0x33; 32]);
        assert_ne!(c.agree(&pb, b"salt", b"info").unwrap(), ka);
    }

    #[test]
    fn low_order_public_keys_are_rejected() {
        // u = 0 (order 2), u = 1 (order 4) and a point of order 8, from
        // the low-order list libsodium and Bernstein's Curve25519 page give.
        let mut order8 = [0u8; 32];
        order8.copy_from_slice(&[
            0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f,
            0xc4, 0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16,
            0x5f, 0x49, 0xb8, 0x00,
        ]);
        let mut one = [0u8; 32];
        one[0] = 1;
        for bad in [[0u8; 32], one, order8] {
            let e = Ephemeral::from_secret([0x44; 32]);
            assert_eq!(
                e.agree(&bad, b"salt", b"info"),
                Err(AgreeError::LowOrderPoint)
            );
        }
    }

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn known_answers() {
        // RFC 8032 §7.1 TEST 1: seed -> public key.
        let a = Identity::from_seed(hex32(
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        ));
        let public = hex32("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
        assert_eq!(a.peer_id().as_bytes(), &public);
        // Text form, computed independently (Python base64 + hashlib).
        assert_eq!(
            a.peer_id().to_string(),
            "25njqamcweflpvkl73j4szahhihoc4xt3ktcgjnpaingr5yhkenexmq"
        );

        // RFC 7748 §6.1: Alice's and Bob's keys and their shared secret,
        // then HKDF-SHA256 (salt "salt", info "info") computed with Python.
        let alice = Ephemeral::from_secret(hex32(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        let bob = Ephemeral::from_secret(hex32(
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        ));
        assert_eq!(
            alice.public(),
            hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        let bob_public = bob.public();
        assert_eq!(
            bob_public,
            hex32("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
        );
        assert_eq!(
            alice.agree(&bob_public, b"salt", b"info"),
            Ok(hex32(
                "dfdf3ce5d8a064972e2c7033de0f29798e773efba52a80c07250c458c7c315a6"
            ))
        );
    }

    #[test]
    fn debug_hides_ephemeral_secret() {
        let e = Ephemeral::from_secret([0x55; 32]);
        let dbg = format!("{e:?}");
        assert!(dbg.contains("public"), "{dbg}");
        assert!(!dbg.contains("85, 85, 85"), "{dbg}");
    }

    proptest! {
        #[test]
        fn prop_text_round_trip(seed in any::<[u8; 32]>()) {
            let p = Identity::from_seed(seed).peer_id();
            prop_assert_eq!(p.to_string().parse::<PeerId>(), Ok(p));
            prop_assert_eq!(PeerId::from_bytes(*p.as_bytes()), Ok(p));
        }

        #[test]
        fn prop_parse_never_panics(s in "\\PC{0,80}") {
            let _ = s.parse::<PeerId>();
        }

        #[test]
        fn prop_parse_base32_noise_never_panics(s in "[a-z2-7]{55}") {
            if let Ok(p) = s.parse::<PeerId>() {
                prop_assert_eq!(p.to_string(), s);
            }
        }
    }
}
