//! TURN client (RFC 8656, and RFC 5766 servers), sans-IO: the relayed
//! transport address a TURN server allocates for us, its permissions and
//! channels, and peer data wrapped for the server and unwrapped from it.
//!
//! [`client::Client`] takes bytes from the server and time, and returns
//! bytes to send to the server, events and its next timer, like the rest
//! of this crate; `natpunch::turn` binds it to UDP, TCP or TLS.
//!
//! **Why by hand.** `turn-client-proto` 0.7.3 (with `turn-client-rustls`
//! 0.1.2), the crate this field has, was tried against coturn 4.6.1 and
//! fell short where users would notice: its events carry no STUN error
//! code, so a wrong password cannot be named as the server's "401
//! Unauthorized" (it retransmits for ~40 s, then closes); it discards a
//! refresh answer granting less than 600 s, so an allocation a server
//! limits to a short lifetime expires under the client; its ChannelData
//! over TCP and TLS lacks the padding to 4 bytes (RFC 8656 §12.5), which
//! desynchronised coturn's stream; and the TLS wrapper panics on any
//! message the inner client ignores. STUN encoding, integrity and
//! fingerprints are this crate's own ([`crate::stun::message`]); TURN adds
//! five methods, eight attributes, the long-term credential key and the
//! ChannelData framing, which is what this module writes.

pub mod client;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;

pub use client::{Client, Event, PeerData};

/// TURN methods (RFC 8656 §17).
pub mod method {
    pub const ALLOCATE: u16 = 0x003;
    pub const REFRESH: u16 = 0x004;
    pub const SEND: u16 = 0x006;
    pub const DATA: u16 = 0x007;
    pub const CREATE_PERMISSION: u16 = 0x008;
    pub const CHANNEL_BIND: u16 = 0x009;
}

/// TURN attributes (RFC 8656 §18) and the long-term credential ones
/// (RFC 8489 §14).
pub mod attr {
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
}

/// How we reach the TURN server: datagrams need retransmissions, streams
/// need ChannelData padded to 4 bytes (RFC 8656 §12.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    pub fn reliable(self) -> bool {
        !matches!(self, Transport::Udp)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

/// Long-term credentials (RFC 8489 §9.2). `Debug` never shows the
/// password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: password.into(),
        }
    }

    /// Time-limited credentials from a shared secret, as coturn's
    /// `use-auth-secret` checks them (the "TURN REST API" draft,
    /// draft-uberti-behave-turn-rest-00 §2.2): the username is the expiry
    /// time (Unix seconds) and `user`, the password the base64 of
    /// HMAC-SHA1(secret, username).
    pub fn time_limited(secret: &[u8], user: &str, expires_unix: u64) -> Self {
        let username = if user.is_empty() {
            expires_unix.to_string()
        } else {
            format!("{expires_unix}:{user}")
        };
        // HMAC accepts keys of any length.
        let mut m = <Hmac<Sha1> as KeyInit>::new_from_slice(secret).expect("HMAC takes any key");
        m.update(username.as_bytes());
        let password = data_encoding::BASE64.encode(&m.finalize().into_bytes());
        Self { username, password }
    }

    /// The long-term key: MD5(username ":" realm ":" password) (RFC 8489
    /// §9.2.2; the password as given, SASLprep not applied).
    pub fn key(&self, realm: &str) -> [u8; 16] {
        use md5::Digest;
        let mut h = md5::Md5::new();
        h.update(self.username.as_bytes());
        h.update(b":");
        h.update(realm.as_bytes());
        h.update(b":");
        h.update(self.password.as_bytes());
        h.finalize().into()
    }
}

/// Why the allocation (or a permission, or a channel) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TurnError {
    /// The server answered with an error code.
    #[error("the TURN server {server} answered {code} {reason}{hint}", hint = hint(*.code))]
    Rejected {
        server: SocketAddr,
        code: u16,
        reason: String,
    },
    /// No answer to a request in time.
    #[error("the TURN server {server} did not answer {what} within {} s", .after.as_secs_f32())]
    NoAnswer {
        server: SocketAddr,
        what: &'static str,
        after: Duration,
    },
    /// A success answer without what it must carry.
    #[error("the TURN server {server} answered {what} without {missing}")]
    Malformed {
        server: SocketAddr,
        what: &'static str,
        missing: &'static str,
    },
    /// The connection to the server closed.
    #[error("the connection to the TURN server {server} closed")]
    Closed { server: SocketAddr },
}

fn hint(code: u16) -> &'static str {
    match code {
        401 => " (wrong username or password, or expired time-limited credentials)",
        403 => " (the server forbids this peer address)",
        437 => " (the allocation is gone)",
        441 => " (wrong credentials for this allocation)",
        486 => " (this user has too many allocations)",
        508 => " (the server has no relay ports left)",
        _ => "",
    }
}

/// Channel numbers a client may bind (RFC 8656 §12).
pub const CHANNEL_MIN: u16 = 0x4000;
pub const CHANNEL_MAX: u16 = 0x4FFF;

/// Whether a datagram or frame from the server is ChannelData (its first
/// two bits are 01, RFC 8656 §12.4; STUN's are 00).
pub fn is_channel_data(buf: &[u8]) -> bool {
    buf.first().is_some_and(|b| b & 0xC0 == 0x40)
}

/// Why a stream from the server cannot be framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the TURN server's stream is out of step (first byte {first:#04x})")]
pub struct FrameError {
    pub first: u8,
}

/// Over TCP and TLS, how many bytes the message that starts `buf` takes,
/// padding included (STUN: 20 + length; ChannelData: 4 + length rounded
/// up to 4, RFC 8656 §12.5). `Ok(None)` until its header is there.
pub fn stream_frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    match buf[0] & 0xC0 {
        0x00 => Ok(Some(crate::stun::message::HEADER_LEN + len)),
        0x40 => Ok(Some(4 + ((len + 3) & !3))),
        _ => Err(FrameError { first: buf[0] }),
    }
}

/// A `turn:` or `turns:` URI (RFC 7065): host, port and transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnUri {
    pub host: String,
    pub port: u16,
    pub transport: Transport,
}

/// Why a TURN URI does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{uri:?} is not a TURN URI ({why}); use turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT]")]
pub struct UriError {
    pub uri: String,
    pub why: &'static str,
}

/// The default ports (RFC 8656 §3.2 and RFC 7065 §3).
pub const PORT: u16 = 3478;
pub const TLS_PORT: u16 = 5349;

impl std::str::FromStr for TurnUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<Self, UriError> {
        let err = |why| UriError {
            uri: uri.to_string(),
            why,
        };
        let (secure, rest) = if let Some(r) = uri.strip_prefix("turns:") {
            (true, r)
        } else if let Some(r) = uri.strip_prefix("turn:") {
            (false, r)
        } else {
            return Err(err("it must start with turn: or turns:"));
        };
        let (hostport, query) = match rest.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (rest, None),
        };
        let mut transport = if secure {
            Transport::Tls
        } else {
            Transport::Udp
        };
        if let Some(q) = query {
            match q.strip_prefix("transport=") {
                Some("udp") if !secure => transport = Transport::Udp,
                Some("tcp") if !secure => transport = Transport::Tcp,
                Some("tcp") => {}
                Some("udp") => return Err(err("turns: runs over TLS, which is TCP")),
                _ => return Err(err("the only query is transport=udp or transport=tcp")),
            }
        }
        let default = if secure { TLS_PORT } else { PORT };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| err("unclosed ["))?;
            match after.strip_prefix(':') {
                Some(p) => (h, p.parse().map_err(|_| err("bad port"))?),
                None if after.is_empty() => (h, default),
                None => return Err(err("junk after ]")),
            }
        } else {
            let (h, p) = match hostport.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| err("bad port"))?),
                None => (hostport, default),
            };
            if h.contains(':') {
                return Err(err("an IPv6 address goes in brackets"));
            }
            (h, p)
        };
        if host.is_empty() || host.contains('/') || host.contains('@') {
            return Err(err("no host"));
        }
        if port == 0 {
            return Err(err("port 0"));
        }
        Ok(TurnUri {
            host: host.to_string(),
            port,
            transport,
        })
    }
}

impl fmt::Display for TurnUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.transport {
            Transport::Tls => write!(f, "turns:{host}:{}", self.port),
            Transport::Tcp => write!(f, "turn:{host}:{}?transport=tcp", self.port),
            Transport::Udp => write!(f, "turn:{host}:{}", self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_with_their_defaults() {
        let u: TurnUri = "turn:turn.example.org".parse().unwrap();
        assert_eq!((u.port, u.transport), (3478, Transport::Udp));
        let u: TurnUri = "turn:192.0.2.1:443?transport=tcp".parse().unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.transport),
            ("192.0.2.1", 443, Transport::Tcp)
        );
        let u: TurnUri = "turns:[2001:db8::1]".parse().unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.transport),
            ("2001:db8::1", 5349, Transport::Tls)
        );
        assert_eq!(u.to_string(), "turns:[2001:db8::1]:5349");
        for bad in [
            "stun:x",
            "turn:",
            "turn:x:0",
            "turn:x:y",
            "turns:x?transport=udp",
            "turn:x?foo=1",
        ] {
            assert!(bad.parse::<TurnUri>().is_err(), "{bad}");
        }
    }

    #[test]
    fn time_limited_credentials_follow_the_rest_draft() {
        // python3: base64(hmac.new(b"S3cret", b"1700000000:alice", sha1))
        let c = Credentials::time_limited(b"S3cret", "alice", 1_700_000_000);
        assert_eq!(c.username, "1700000000:alice");
        assert_eq!(c.password, "RWn1onPKprbAeQq8zmxAm/B/btc=");
        assert!(!format!("{c:?}").contains(&c.password));
    }

    #[test]
    fn the_long_term_key_is_md5_of_user_realm_password() {
        // python3: hashlib.md5(b"alice:example.org:secret")
        let k = Credentials::new("alice", "secret").key("example.org");
        assert_eq!(
            k,
            [84, 62, 26, 236, 93, 54, 20, 240, 49, 65, 101, 45, 106, 218, 81, 178]
        );
    }

    #[test]
    fn stream_frames_include_channel_padding() {
        assert_eq!(stream_frame_len(&[0x40, 0x00, 0x00, 0x05]), Ok(Some(12)));
        assert_eq!(stream_frame_len(&[0x01, 0x01, 0x00, 0x08]), Ok(Some(28)));
        assert_eq!(stream_frame_len(&[0x40, 0x00]), Ok(None));
        assert!(stream_frame_len(&[0x80, 0, 0, 0]).is_err());
    }
}
