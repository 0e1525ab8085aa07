//! STUN message codec: RFC 8489 (and RFC 5389) messages, the RFC 5780
//! NAT-behaviour attributes and the RFC 3489 "classic" form.
//!
//! Written by hand rather than on `stun-types`/`stun-proto` because we need
//! three things those crates do not give together: RFC 3489 messages that
//! carry no magic cookie (Debian's `stun` client still sends them and expects
//! a MAPPED-ADDRESS answer), the RFC 5780 attributes (OTHER-ADDRESS,
//! RESPONSE-ORIGIN, RESPONSE-PORT, PADDING, CHANGE-REQUEST) and the legacy
//! CHANGED-ADDRESS/SOURCE-ADDRESS as first-class values, and a decoder whose
//! every failure is a typed [`DecodeError`] with a bounded allocation, so the
//! server can drop and count hostile packets.
//!
//! The decoder is strict: the header bits, lengths, attribute padding,
//! address families and FINGERPRINT are all checked; attributes after
//! MESSAGE-INTEGRITY other than MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are
//! ignored, as RFC 8489 §14.5 requires; nothing may follow FINGERPRINT.
//! Unknown comprehension-optional attributes (0x8000-0xFFFF) are skipped;
//! unknown comprehension-required ones are kept so that a server can answer
//! 420 with UNKNOWN-ATTRIBUTES.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;
use sha2::Sha256;

/// The fixed value in bytes 4..8 of every RFC 5389/8489 message (§5).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// XORed into the CRC-32 of FINGERPRINT (RFC 8489 §14.7).
const FINGERPRINT_XOR: u32 = 0x5354_554e;
/// Size of the STUN header (RFC 8489 §5).
pub const HEADER_LEN: usize = 20;
/// Most attributes one message may carry. A Binding request needs a handful;
/// 64 bounds the per-packet allocation on hostile input.
pub const MAX_ATTRIBUTES: usize = 64;
/// Longest SOFTWARE / reason phrase / USERNAME we accept: RFC 8489 §14.3,
/// §14.8 and §14.14 bound them to 763 (or 509) bytes.
const MAX_TEXT_LEN: usize = 763;

/// Attribute type codes (RFC 8489 §18.3, RFC 5780 §7, RFC 3489 §11.2).
pub mod attr {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const RESPONSE_ADDRESS: u16 = 0x0002;
    pub const CHANGE_REQUEST: u16 = 0x0003;
    pub const SOURCE_ADDRESS: u16 = 0x0004;
    pub const CHANGED_ADDRESS: u16 = 0x0005;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const PADDING: u16 = 0x0026;
    pub const RESPONSE_PORT: u16 = 0x0027;
    pub const SOFTWARE: u16 = 0x8022;
    pub const FINGERPRINT: u16 = 0x8028;
    pub const RESPONSE_ORIGIN: u16 = 0x802B;
    pub const OTHER_ADDRESS: u16 = 0x802C;
}

/// The STUN Binding method, the only one natpunch's server answers.
pub const METHOD_BINDING: u16 = 0x001;

/// Message class (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

/// A 96-bit transaction ID plus the four bytes in front of it: the magic
/// cookie for RFC 5389/8489, or the first four bytes of a 128-bit RFC 3489 ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransactionId {
    /// Bytes 4..8 of the header.
    pub cookie: u32,
    /// Bytes 8..20 of the header.
    pub id: [u8; 12],
}

impl TransactionId {
    /// An RFC 8489 transaction ID (with the magic cookie).
    pub fn new(id: [u8; 12]) -> Self {
        Self {
            cookie: MAGIC_COOKIE,
            id,
        }
    }

    /// Whether this message uses the RFC 5389/8489 form.
    pub fn is_modern(&self) -> bool {
        self.cookie == MAGIC_COOKIE
    }

    fn xor_key(&self) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[..4].copy_from_slice(&self.cookie.to_be_bytes());
        k[4..].copy_from_slice(&self.id);
        k
    }
}

/// One STUN attribute, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribute {
    MappedAddress(SocketAddr),
    XorMappedAddress(SocketAddr),
    ResponseOrigin(SocketAddr),
    OtherAddress(SocketAddr),
    /// RFC 3489 CHANGED-ADDRESS, the classic form of OTHER-ADDRESS.
    ChangedAddress(SocketAddr),
    /// RFC 3489 SOURCE-ADDRESS, the classic form of RESPONSE-ORIGIN.
    SourceAddress(SocketAddr),
    ChangeRequest {
        change_ip: bool,
        change_port: bool,
    },
    ResponsePort(u16),
    /// PADDING of this many bytes (RFC 5780 §7.6); its content is ignored.
    Padding(u16),
    Software(String),
    Username(String),
    ErrorCode {
        code: u16,
        reason: String,
    },
    UnknownAttributes(Vec<u16>),
    /// HMAC-SHA1 over the message (RFC 8489 §14.5).
    MessageIntegrity([u8; 20]),
    /// HMAC-SHA256, possibly truncated to 16..=32 bytes (RFC 8489 §14.6).
    MessageIntegritySha256(Vec<u8>),
    Fingerprint(u32),
    /// Anything else; kept so a server can list unknown
    /// comprehension-required types in a 420 answer.
    Unknown {
        kind: u16,
        value: Vec<u8>,
    },
}

impl Attribute {
    /// The attribute's type code.
    pub fn kind(&self) -> u16 {
        match self {
            Attribute::MappedAddress(_) => attr::MAPPED_ADDRESS,
            Attribute::XorMappedAddress(_) => attr::XOR_MAPPED_ADDRESS,
            Attribute::ResponseOrigin(_) => attr::RESPONSE_ORIGIN,
            Attribute::OtherAddress(_) => attr::OTHER_ADDRESS,
            Attribute::ChangedAddress(_) => attr::CHANGED_ADDRESS,
            Attribute::SourceAddress(_) => attr::SOURCE_ADDRESS,
            Attribute::ChangeRequest { .. } => attr::CHANGE_REQUEST,
            Attribute::ResponsePort(_) => attr::RESPONSE_PORT,
            Attribute::Padding(_) => attr::PADDING,
            Attribute::Software(_) => attr::SOFTWARE,
            Attribute::Username(_) => attr::USERNAME,
            Attribute::ErrorCode { .. } => attr::ERROR_CODE,
            Attribute::UnknownAttributes(_) => attr::UNKNOWN_ATTRIBUTES,
            Attribute::MessageIntegrity(_) => attr::MESSAGE_INTEGRITY,
            Attribute::MessageIntegritySha256(_) => attr::MESSAGE_INTEGRITY_SHA256,
            Attribute::Fingerprint(_) => attr::FINGERPRINT,
            Attribute::Unknown { kind, .. } => *kind,
        }
    }

    /// Length of the value on the wire, before padding.
    pub fn value_len(&self) -> usize {
        match self {
            Attribute::MappedAddress(a)
            | Attribute::XorMappedAddress(a)
            | Attribute::ResponseOrigin(a)
            | Attribute::OtherAddress(a)
            | Attribute::ChangedAddress(a)
            | Attribute::SourceAddress(a) => address_len(a),
            Attribute::ChangeRequest { .. }
            | Attribute::ResponsePort(_)
            | Attribute::Fingerprint(_) => 4,
            Attribute::Padding(n) => *n as usize,
            Attribute::Software(s) | Attribute::Username(s) => s.len(),
            Attribute::ErrorCode { reason, .. } => 4 + reason.len(),
            Attribute::UnknownAttributes(v) => 2 * v.len(),
            Attribute::MessageIntegrity(_) => 20,
            Attribute::MessageIntegritySha256(v) => v.len(),
            Attribute::Unknown { value, .. } => value.len(),
        }
    }

    /// Bytes this attribute takes on the wire: header, value and padding.
    pub fn encoded_len(&self) -> usize {
        4 + padded(self.value_len())
    }
}

fn address_len(a: &SocketAddr) -> usize {
    match a {
        SocketAddr::V4(_) => 8,
        SocketAddr::V6(_) => 20,
    }
}

fn padded(n: usize) -> usize {
    (n + 3) & !3
}

/// A decoded STUN message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub class: Class,
    pub method: u16,
    pub transaction: TransactionId,
    pub attributes: Vec<Attribute>,
}

/// Why a datagram is not a STUN message we accept. Every variant is a drop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("{len} bytes is shorter than a STUN header")]
    TooShort { len: usize },
    #[error("the two top bits of the message type are set (not STUN)")]
    NotStun,
    #[error("header says {declared} bytes of attributes, datagram has {actual}")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("message length {len} is not a multiple of 4")]
    UnalignedLength { len: usize },
    #[error("attribute {kind:#06x} at offset {offset} runs past the end")]
    AttributeOverrun { kind: u16, offset: usize },
    #[error("attribute {kind:#06x} has invalid length {len}")]
    BadAttributeLength { kind: u16, len: usize },
    #[error("attribute {kind:#06x} has unknown address family {family:#04x}")]
    BadAddressFamily { kind: u16, family: u8 },
    #[error("attribute {kind:#06x} is not valid UTF-8")]
    BadText { kind: u16 },
    #[error("ERROR-CODE class {class} is outside 3..=6")]
    BadErrorCode { class: u8 },
    #[error("more than {max} attributes", max = MAX_ATTRIBUTES)]
    TooManyAttributes,
    #[error("FINGERPRINT mismatch: carried {carried:#010x}, computed {computed:#010x}")]
    FingerprintMismatch { carried: u32, computed: u32 },
    #[error("attribute {kind:#06x} follows FINGERPRINT")]
    AfterFingerprint { kind: u16 },
}

/// Why an integrity check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IntegrityError {
    #[error("the message carries no MESSAGE-INTEGRITY attribute")]
    Missing,
    #[error("MESSAGE-INTEGRITY does not match the key")]
    Mismatch,
}

/// Where each integrity attribute starts in the raw message, for checking.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IntegrityOffsets {
    pub sha1: Option<usize>,
    pub sha256: Option<usize>,
}

/// Reads the message type of a buffer that starts with a STUN header, to
/// tell STUN from other traffic on a shared socket (RFC 7983 §7: the first
/// byte of STUN is 0..=3).
pub fn looks_like_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER_LEN && buf[0] <= 3
}

/// Total length of the message whose header starts `buf`, for framing STUN
/// over a stream (RFC 8489 §6.2.2). `None` until 4 bytes are there or if the
/// top bits say it is not STUN.
pub fn framed_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < 4 || buf[0] & 0xC0 != 0 {
        return None;
    }
    Some(HEADER_LEN + u16::from_be_bytes([buf[2], buf[3]]) as usize)
}

fn class_of(msg_type: u16) -> Class {
    match ((msg_type >> 7) & 0b10) | ((msg_type >> 4) & 0b1) {
        0b00 => Class::Request,
        0b01 => Class::Indication,
        0b10 => Class::Success,
        _ => Class::Error,
    }
}

fn method_of(msg_type: u16) -> u16 {
    (msg_type & 0x000F) | ((msg_type & 0x00E0) >> 1) | ((msg_type & 0x3E00) >> 2)
}

fn message_type(class: Class, method: u16) -> u16 {
    let c = match class {
        Class::Request => 0b00,
        Class::Indication => 0b01,
        Class::Success => 0b10,
        Class::Error => 0b11,
    };
    let m = method & 0x0FFF;
    (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
}

impl Message {
    /// A message with no attributes.
    pub fn new(class: Class, method: u16, transaction: TransactionId) -> Self {
        Self {
            class,
            method,
            transaction,
            attributes: Vec::new(),
        }
    }

    /// A Binding request with the given transaction ID.
    pub fn binding_request(transaction: TransactionId) -> Self {
        Self::new(Class::Request, METHOD_BINDING, transaction)
    }

    /// Appends an attribute (builder style).
    pub fn with(mut self, a: Attribute) -> Self {
        self.attributes.push(a);
        self
    }

    /// The first attribute of the given type.
    pub fn get(&self, kind: u16) -> Option<&Attribute> {
        self.attributes.iter().find(|a| a.kind() == kind)
    }

    /// The mapped address: XOR-MAPPED-ADDRESS if present, else MAPPED-ADDRESS.
    pub fn mapped_address(&self) -> Option<SocketAddr> {
        self.attributes
            .iter()
            .find_map(|a| match a {
                Attribute::XorMappedAddress(s) => Some(*s),
                _ => None,
            })
            .or_else(|| self.find_addr(attr::MAPPED_ADDRESS))
    }

    /// OTHER-ADDRESS, or the RFC 3489 CHANGED-ADDRESS.
    pub fn other_address(&self) -> Option<SocketAddr> {
        self.find_addr(attr::OTHER_ADDRESS)
            .or_else(|| self.find_addr(attr::CHANGED_ADDRESS))
    }

    /// RESPONSE-ORIGIN, or the RFC 3489 SOURCE-ADDRESS.
    pub fn response_origin(&self) -> Option<SocketAddr> {
        self.find_addr(attr::RESPONSE_ORIGIN)
            .or_else(|| self.find_addr(attr::SOURCE_ADDRESS))
    }

    /// The ERROR-CODE's number, if this carries one.
    pub fn error_code(&self) -> Option<u16> {
        self.attributes.iter().find_map(|a| match a {
            Attribute::ErrorCode { code, .. } => Some(*code),
            _ => None,
        })
    }

    /// The CHANGE-REQUEST flags, `(false, false)` when absent.
    pub fn change_request(&self) -> (bool, bool) {
        self.attributes
            .iter()
            .find_map(|a| match a {
                Attribute::ChangeRequest {
                    change_ip,
                    change_port,
                } => Some((*change_ip, *change_port)),
                _ => None,
            })
            .unwrap_or((false, false))
    }

    fn find_addr(&self, kind: u16) -> Option<SocketAddr> {
        self.attributes.iter().find_map(|a| match a {
            Attribute::MappedAddress(s)
            | Attribute::ResponseOrigin(s)
            | Attribute::OtherAddress(s)
            | Attribute::ChangedAddress(s)
            | Attribute::SourceAddress(s)
                if a.kind() == kind =>
            {
                Some(*s)
            }
            _ => None,
        })
    }

    /// Bytes [`Message::encode`] writes (before any integrity or fingerprint
    /// that [`Encoder`] adds).
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + self
                .attributes
                .iter()
                .map(Attribute::encoded_len)
                .sum::<usize>()
    }

    /// Writes the message into `out` (appending). MESSAGE-INTEGRITY and
    /// FINGERPRINT attributes in `attributes` are written as given; use
    /// [`Encoder`] to compute them.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&message_type(self.class, self.method).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.transaction.cookie.to_be_bytes());
        out.extend_from_slice(&self.transaction.id);
        for a in &self.attributes {
            encode_attribute(a, &self.transaction, out);
        }
        set_length(&mut out[start..]);
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode(&mut v);
        v
    }

    /// Decodes one whole datagram.
    pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
        Self::decode_with_offsets(buf).map(|(m, _)| m)
    }

    /// Decodes and also returns where the integrity attributes start, so
    /// that [`verify_integrity`] can check them against a key.
    pub fn decode_with_offsets(buf: &[u8]) -> Result<(Message, IntegrityOffsets), DecodeError> {
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::TooShort { len: buf.len() });
        }
        let msg_type = u16::from_be_bytes([buf[0], buf[1]]);
        if msg_type & 0xC000 != 0 {
            return Err(DecodeError::NotStun);
        }
        let declared = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        if !declared.is_multiple_of(4) {
            return Err(DecodeError::UnalignedLength { len: declared });
        }
        if declared + HEADER_LEN != buf.len() {
            return Err(DecodeError::LengthMismatch {
                declared,
                actual: buf.len() - HEADER_LEN,
            });
        }
        let cookie = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let mut id = [0u8; 12];
        id.copy_from_slice(&buf[8..20]);
        let transaction = TransactionId { cookie, id };
        let mut msg = Message::new(class_of(msg_type), method_of(msg_type), transaction);
        let mut offsets = IntegrityOffsets::default();
        let mut pos = HEADER_LEN;
        let mut seen_fingerprint = false;
        while pos < buf.len() {
            // At least 4 bytes remain: lengths are multiples of 4.
            let kind = u16::from_be_bytes([buf[pos], buf[pos + 1]]);
            let len = u16::from_be_bytes([buf[pos + 2], buf[pos + 3]]) as usize;
            let value_start = pos + 4;
            let value_end = value_start + len;
            if padded(len) + value_start > buf.len() {
                return Err(DecodeError::AttributeOverrun { kind, offset: pos });
            }
            if seen_fingerprint {
                return Err(DecodeError::AfterFingerprint { kind });
            }
            let value = &buf[value_start..value_end];
            let after_integrity = offsets.sha1.is_some() || offsets.sha256.is_some();
            match kind {
                attr::FINGERPRINT => {
                    let carried = decode_u32(kind, value)?;
                    let computed = fingerprint_of(&buf[..pos], buf.len());
                    if carried != computed {
                        return Err(DecodeError::FingerprintMismatch { carried, computed });
                    }
                    seen_fingerprint = true;
                    push(&mut msg, Attribute::Fingerprint(carried))?;
                }
                attr::MESSAGE_INTEGRITY_SHA256 if offsets.sha256.is_none() => {
                    if !(16..=32).contains(&len) || !len.is_multiple_of(4) {
                        return Err(DecodeError::BadAttributeLength { kind, len });
                    }
                    offsets.sha256 = Some(pos);
                    push(&mut msg, Attribute::MessageIntegritySha256(value.to_vec()))?;
                }
                // RFC 8489 §14.5: everything else after an integrity
                // attribute is ignored.
                _ if after_integrity => {}
                attr::MESSAGE_INTEGRITY => {
                    let mac: [u8; 20] = value
                        .try_into()
                        .map_err(|_| DecodeError::BadAttributeLength { kind, len })?;
                    offsets.sha1 = Some(pos);
                    push(&mut msg, Attribute::MessageIntegrity(mac))?;
                }
                _ => {
                    if let Some(a) = decode_attribute(kind, value, &transaction)? {
                        push(&mut msg, a)?;
                    }
                }
            }
            pos = value_start + padded(len);
        }
        Ok((msg, offsets))
    }
}

fn push(msg: &mut Message, a: Attribute) -> Result<(), DecodeError> {
    if msg.attributes.len() >= MAX_ATTRIBUTES {
        return Err(DecodeError::TooManyAttributes);
    }
    msg.attributes.push(a);
    Ok(())
}

fn decode_u32(kind: u16, value: &[u8]) -> Result<u32, DecodeError> {
    let b: [u8; 4] = value
        .try_into()
        .map_err(|_| DecodeError::BadAttributeLength {
            kind,
            len: value.len(),
        })?;
    Ok(u32::from_be_bytes(b))
}

fn decode_text(kind: u16, value: &[u8]) -> Result<String, DecodeError> {
    if value.len() > MAX_TEXT_LEN {
        return Err(DecodeError::BadAttributeLength {
            kind,
            len: value.len(),
        });
    }
    String::from_utf8(value.to_vec()).map_err(|_| DecodeError::BadText { kind })
}

/// Decodes a (possibly XORed) address attribute value (RFC 8489 §14.1-14.2).
fn decode_address(
    kind: u16,
    value: &[u8],
    xor: Option<&TransactionId>,
) -> Result<SocketAddr, DecodeError> {
    let bad_len = DecodeError::BadAttributeLength {
        kind,
        len: value.len(),
    };
    if value.len() < 4 {
        return Err(bad_len);
    }
    let family = value[1];
    let key = xor.map(TransactionId::xor_key);
    let mut port = u16::from_be_bytes([value[2], value[3]]);
    if let Some(k) = &key {
        port ^= u16::from_be_bytes([k[0], k[1]]);
    }
    let ip = match (family, value.len()) {
        (0x01, 8) => {
            let mut b = [value[4], value[5], value[6], value[7]];
            if let Some(k) = &key {
                b.iter_mut().zip(k.iter()).for_each(|(x, y)| *x ^= y);
            }
            IpAddr::V4(Ipv4Addr::from(b))
        }
        (0x02, 20) => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&value[4..20]);
            if let Some(k) = &key {
                b.iter_mut().zip(k.iter()).for_each(|(x, y)| *x ^= y);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        (0x01 | 0x02, _) => return Err(bad_len),
        (f, _) => return Err(DecodeError::BadAddressFamily { kind, family: f }),
    };
    Ok(SocketAddr::new(ip, port))
}

fn decode_attribute(
    kind: u16,
    value: &[u8],
    tid: &TransactionId,
) -> Result<Option<Attribute>, DecodeError> {
    let len = value.len();
    let a = match kind {
        attr::MAPPED_ADDRESS => Attribute::MappedAddress(decode_address(kind, value, None)?),
        attr::XOR_MAPPED_ADDRESS => {
            Attribute::XorMappedAddress(decode_address(kind, value, Some(tid))?)
        }
        attr::RESPONSE_ORIGIN => Attribute::ResponseOrigin(decode_address(kind, value, None)?),
        attr::OTHER_ADDRESS => Attribute::OtherAddress(decode_address(kind, value, None)?),
        attr::CHANGED_ADDRESS => Attribute::ChangedAddress(decode_address(kind, value, None)?),
        attr::SOURCE_ADDRESS => Attribute::SourceAddress(decode_address(kind, value, None)?),
        attr::CHANGE_REQUEST => {
            let v = decode_u32(kind, value)?;
            Attribute::ChangeRequest {
                change_ip: v & 0x4 != 0,
                change_port: v & 0x2 != 0,
            }
        }
        attr::RESPONSE_PORT => {
            let v = decode_u32(kind, value)?;
            Attribute::ResponsePort((v >> 16) as u16)
        }
        attr::PADDING => Attribute::Padding(len as u16),
        attr::SOFTWARE => Attribute::Software(decode_text(kind, value)?),
        attr::USERNAME => {
            if len > 513 {
                return Err(DecodeError::BadAttributeLength { kind, len });
            }
            Attribute::Username(decode_text(kind, value)?)
        }
        attr::ERROR_CODE => {
            if len < 4 {
                return Err(DecodeError::BadAttributeLength { kind, len });
            }
            let class = value[2] & 0x07;
            if !(3..=6).contains(&class) {
                return Err(DecodeError::BadErrorCode { class });
            }
            let number = value[3];
            if number > 99 {
                return Err(DecodeError::BadAttributeLength { kind, len });
            }
            Attribute::ErrorCode {
                code: class as u16 * 100 + number as u16,
                reason: decode_text(kind, &value[4..])?,
            }
        }
        attr::UNKNOWN_ATTRIBUTES => {
            if !len.is_multiple_of(2) {
                return Err(DecodeError::BadAttributeLength { kind, len });
            }
            Attribute::UnknownAttributes(
                value
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect(),
            )
        }
        // Unknown comprehension-optional: skip (RFC 8489 §15).
        k if k >= 0x8000 => return Ok(None),
        _ => Attribute::Unknown {
            kind,
            value: value.to_vec(),
        },
    };
    Ok(Some(a))
}

/// The value of an XOR'ed address attribute for `tid` (TURN's
/// XOR-PEER-ADDRESS and XOR-RELAYED-ADDRESS use XOR-MAPPED-ADDRESS's form,
/// RFC 8656 §18.3 and §18.5).
pub fn xor_address_value(a: &SocketAddr, tid: &TransactionId) -> Vec<u8> {
    let mut v = Vec::with_capacity(20);
    encode_address(a, Some(tid), &mut v);
    v
}

/// Decodes the value of an XOR'ed address attribute of type `kind`.
pub fn decode_xor_address(
    kind: u16,
    value: &[u8],
    tid: &TransactionId,
) -> Result<SocketAddr, DecodeError> {
    decode_address(kind, value, Some(tid))
}

fn encode_address(a: &SocketAddr, xor: Option<&TransactionId>, out: &mut Vec<u8>) {
    let key = xor.map(TransactionId::xor_key);
    let mut port = a.port();
    if let Some(k) = &key {
        port ^= u16::from_be_bytes([k[0], k[1]]);
    }
    match a.ip() {
        IpAddr::V4(ip) => {
            out.extend_from_slice(&[0, 0x01]);
            out.extend_from_slice(&port.to_be_bytes());
            let mut b = ip.octets();
            if let Some(k) = &key {
                b.iter_mut().zip(k.iter()).for_each(|(x, y)| *x ^= y);
            }
            out.extend_from_slice(&b);
        }
        IpAddr::V6(ip) => {
            out.extend_from_slice(&[0, 0x02]);
            out.extend_from_slice(&port.to_be_bytes());
            let mut b = ip.octets();
            if let Some(k) = &key {
                b.iter_mut().zip(k.iter()).for_each(|(x, y)| *x ^= y);
            }
            out.extend_from_slice(&b);
        }
    }
}

fn encode_attribute(a: &Attribute, tid: &TransactionId, out: &mut Vec<u8>) {
    let len = a.value_len();
    out.extend_from_slice(&a.kind().to_be_bytes());
    out.extend_from_slice(&(len as u16).to_be_bytes());
    match a {
        Attribute::XorMappedAddress(s) => encode_address(s, Some(tid), out),
        Attribute::MappedAddress(s)
        | Attribute::ResponseOrigin(s)
        | Attribute::OtherAddress(s)
        | Attribute::ChangedAddress(s)
        | Attribute::SourceAddress(s) => encode_address(s, None, out),
        Attribute::ChangeRequest {
            change_ip,
            change_port,
        } => {
            let v = (u32::from(*change_ip) << 2) | (u32::from(*change_port) << 1);
            out.extend_from_slice(&v.to_be_bytes());
        }
        Attribute::ResponsePort(p) => {
            out.extend_from_slice(&p.to_be_bytes());
            out.extend_from_slice(&[0, 0]);
        }
        Attribute::Padding(n) => out.resize(out.len() + *n as usize, 0),
        Attribute::Software(s) | Attribute::Username(s) => out.extend_from_slice(s.as_bytes()),
        Attribute::ErrorCode { code, reason } => {
            out.extend_from_slice(&[0, 0, (code / 100) as u8 & 0x07, (code % 100) as u8]);
            out.extend_from_slice(reason.as_bytes());
        }
        Attribute::UnknownAttributes(v) => v
            .iter()
            .for_each(|t| out.extend_from_slice(&t.to_be_bytes())),
        Attribute::MessageIntegrity(m) => out.extend_from_slice(m),
        Attribute::MessageIntegritySha256(m) => out.extend_from_slice(m),
        Attribute::Fingerprint(f) => out.extend_from_slice(&f.to_be_bytes()),
        Attribute::Unknown { value, .. } => out.extend_from_slice(value),
    }
    out.resize(out.len() + (padded(len) - len), 0);
}

fn set_length(msg: &mut [u8]) {
    let body = (msg.len() - HEADER_LEN) as u16;
    msg[2..4].copy_from_slice(&body.to_be_bytes());
}

/// CRC-32 of `prefix` with the header length patched to `total_len - 20`
/// (the length that includes the FINGERPRINT itself), XORed per §14.7.
fn fingerprint_of(prefix: &[u8], total_len: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&prefix[..2]);
    h.update(&((total_len - HEADER_LEN) as u16).to_be_bytes());
    h.update(&prefix[4..]);
    h.finalize() ^ FINGERPRINT_XOR
}

fn hmac_sha1(key: &[u8], prefix: &[u8], len_field: u16) -> [u8; 20] {
    // HMAC accepts keys of any length, so new_from_slice cannot fail.
    let mut m = <Hmac<Sha1> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(&prefix[..2]);
    m.update(&len_field.to_be_bytes());
    m.update(&prefix[4..]);
    m.finalize().into_bytes().into()
}

fn hmac_sha256(key: &[u8], prefix: &[u8], len_field: u16) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(&prefix[..2]);
    m.update(&len_field.to_be_bytes());
    m.update(&prefix[4..]);
    m.finalize().into_bytes().into()
}

/// Which integrity attribute to add when encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    Sha1,
    Sha256,
}

/// Encodes a message and appends, in RFC order, MESSAGE-INTEGRITY or
/// MESSAGE-INTEGRITY-SHA256 (short-term credentials: the key is the
/// password, RFC 8489 §9.1.1) and FINGERPRINT.
pub struct Encoder<'a> {
    pub integrity: Option<(Integrity, &'a [u8])>,
    pub fingerprint: bool,
}

impl Encoder<'_> {
    /// Writes `msg` followed by the trailing attributes into `out`.
    pub fn encode(&self, msg: &Message, out: &mut Vec<u8>) {
        let start = out.len();
        msg.encode(out);
        if let Some((kind, key)) = self.integrity {
            let (attr_kind, mac_len) = match kind {
                Integrity::Sha1 => (attr::MESSAGE_INTEGRITY, 20usize),
                Integrity::Sha256 => (attr::MESSAGE_INTEGRITY_SHA256, 32usize),
            };
            let body = &out[start..];
            let len_field = (body.len() - HEADER_LEN + 4 + mac_len) as u16;
            let mac: Vec<u8> = match kind {
                Integrity::Sha1 => hmac_sha1(key, body, len_field).to_vec(),
                Integrity::Sha256 => hmac_sha256(key, body, len_field).to_vec(),
            };
            out.extend_from_slice(&attr_kind.to_be_bytes());
            out.extend_from_slice(&(mac_len as u16).to_be_bytes());
            out.extend_from_slice(&mac);
            set_length(&mut out[start..]);
        }
        if self.fingerprint {
            let total = out.len() - start + 8;
            let crc = fingerprint_of(&out[start..], total);
            out.extend_from_slice(&attr::FINGERPRINT.to_be_bytes());
            out.extend_from_slice(&4u16.to_be_bytes());
            out.extend_from_slice(&crc.to_be_bytes());
            set_length(&mut out[start..]);
        }
    }
}

/// Checks the integrity attributes of a raw message against a short-term
/// key. MESSAGE-INTEGRITY-SHA256 is preferred when both are present.
pub fn verify_integrity(
    raw: &[u8],
    offsets: IntegrityOffsets,
    key: &[u8],
) -> Result<(), IntegrityError> {
    if let Some(pos) = offsets.sha256 {
        let len = u16::from_be_bytes([raw[pos + 2], raw[pos + 3]]) as usize;
        let len_field = (pos + 4 + len - HEADER_LEN) as u16;
        let mac = hmac_sha256(key, &raw[..pos], len_field);
        let carried = &raw[pos + 4..pos + 4 + len];
        return if constant_time_eq(&mac[..len], carried) {
            Ok(())
        } else {
            Err(IntegrityError::Mismatch)
        };
    }
    if let Some(pos) = offsets.sha1 {
        let len_field = (pos + 24 - HEADER_LEN) as u16;
        let mac = hmac_sha1(key, &raw[..pos], len_field);
        return if constant_time_eq(&mac, &raw[pos + 4..pos + 24]) {
            Ok(())
        } else {
            Err(IntegrityError::Mismatch)
        };
    }
    Err(IntegrityError::Missing)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
