//! Secure sessions on the punched path: QUIC (quinn) with TLS 1.3 and the
//! peers' own Ed25519 keys, on the same UDP socket (and so the same NAT
//! mapping) that STUN, rendezvous and punching used.
//!
//! - [`endpoint`]: the library API, [`Endpoint::bind`], [`Endpoint::connect`]
//!   and [`Endpoint::accept`].
//! - [`socket`]: the multiplexing socket quinn runs on.
//! - [`tls`]: raw-public-key TLS (RFC 7250) bound to peer IDs.
//! - [`service`]: what runs on a session's streams: the netcat-style pipe
//!   and named TCP services (`--expose`/`--forward`/`--to`).
//!
//! Liveness: quinn sends a keepalive after [`KEEPALIVE`] of silence, which
//! holds NAT mappings open; the socket layer notices a path that stopped
//! answering within [`STALL_AFTER`] and the peer driver re-punches through
//! the rendezvous server. A path that stays dead for the idle timeout ends
//! the session with [`SessionError`]'s "timed out" message.

pub mod endpoint;
pub mod service;
pub mod socket;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use natpunch_proto::identity::PeerId;
use tokio::sync::mpsc;

pub use endpoint::{Endpoint, EndpointConfig};
pub use quinn::{RecvStream, SendStream};

/// Keepalive interval. RFC 4787 REQ-5 asks NATs to keep UDP mappings for
/// 2 min, but many home routers and carrier NATs use 30 s (measured by
/// Hätönen et al., IMC 2010: median ~60 s, a tenth ≤ 30 s). 10 s leaves
/// room for two lost keepalives inside the shortest common timeout.
pub const KEEPALIVE: Duration = Duration::from_secs(10);

/// A session whose path stays silent this long is over (RFC 9000 §10.1).
/// Three keepalive intervals, so a re-punch has time to find a new path.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Datagrams sent for this long with nothing heard back mark the path as
/// stalled (several PTOs at lab and Internet RTTs, RFC 9002 §6.2).
pub const STALL_AFTER: Duration = Duration::from_millis(1500);

/// A peer that was sending at least this often and then falls silent for
/// [`STALL_AFTER`] may have lost its path: we refresh our registration so
/// that the rendezvous server can reach us for the re-punch (cheap: two
/// small datagrams, so a pause in a transfer may trigger it harmlessly).
pub const ACTIVE_GAP: Duration = Duration::from_millis(200);

/// The side that re-punches waits this long first, so that the other
/// side's registration refresh reaches the server before the
/// introduction does.
pub const REPUNCH_DELAY: Duration = Duration::from_millis(800);

/// Minimum spacing of re-punch attempts for one session (one punch attempt
/// with its rendezvous round trips fits in it).
pub const REPUNCH_EVERY: Duration = Duration::from_secs(4);

/// The QUIC handshake must finish in this long once the hole is punched
/// (a few RTTs plus RFC 9002 §6.2.2's initial PTO of 1 s, twice).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Upper bound on lingering after a close: three PTOs at a 200 ms RTT
/// (RFC 9000 §10.2), so a lost CONNECTION_CLOSE is repeated.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// How often a session's monitor looks at its path.
const MONITOR_TICK: Duration = Duration::from_millis(250);

/// Application close codes.
pub mod close {
    /// Everything was sent and received.
    pub const DONE: u32 = 0;
    /// The user interrupted (Ctrl-C) or the program stopped.
    pub const INTERRUPTED: u32 = 1;
    /// The accepting side's `--allow` list does not have this peer.
    pub const NOT_ALLOWED: u32 = 2;
    /// A local error ended the session (the reason says which).
    pub const ERROR: u32 = 3;
}

/// Why a session could not be set up or ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot start QUIC on the socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("peer at {remote} presented the key of {got}, but we expected {expected}: refused")]
    WrongKey {
        expected: PeerId,
        got: PeerId,
        remote: SocketAddr,
    },
    #[error("the QUIC handshake with {peer} at {remote} failed: {source}")]
    Handshake {
        peer: PeerId,
        remote: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("the QUIC handshake with {peer} at {remote} did not finish in {secs} s")]
    HandshakeTimeout {
        peer: PeerId,
        remote: SocketAddr,
        secs: u64,
    },
    #[error("cannot start the QUIC handshake: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("could not reach {peer}: {reason}")]
    Punch { peer: PeerId, reason: String },
    #[error("the endpoint stopped: {0}")]
    Stopped(String),
}

/// Transport settings shared by both sides.
pub(crate) fn transport(idle: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // A short idle timeout needs keepalives inside it (three per timeout).
    t.keep_alive_interval(Some(KEEPALIVE.min(idle / 3)));
    // An idle timeout above 2^62 µs is impossible; fall back to the default.
    let idle = quinn::IdleTimeout::try_from(idle)
        .unwrap_or(quinn::IdleTimeout::from(quinn::VarInt::from_u32(30_000)));
    t.max_idle_timeout(Some(idle));
    // Windows sized for 1 Gbit/s at 60 ms RTT (7.5 MB in flight): quinn's
    // defaults (1.25 MB per stream) cap a long path well below the link.
    t.stream_receive_window(quinn::VarInt::from_u32(8 << 20));
    t.receive_window(quinn::VarInt::from_u32(16 << 20));
    t.send_window(16 << 20);
    // One stream per forwarded TCP connection.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
    Arc::new(t)
}

/// Messages from session tasks to the peer driver.
#[derive(Debug)]
pub(crate) enum Internal {
    /// A session is up on socket `socket`, quinn knows the peer as `remote`.
    Up {
        peer: PeerId,
        socket: usize,
        remote: SocketAddr,
        client: bool,
    },
    /// quinn moved the session to another address (the peer rebound and
    /// its NAT let the new address through).
    Moved {
        peer: PeerId,
        from: SocketAddr,
        remote: SocketAddr,
    },
    Down {
        peer: PeerId,
        remote: SocketAddr,
    },
    /// The path stopped answering.
    Stalled {
        peer: PeerId,
        remote: SocketAddr,
    },
    /// A steadily sending peer fell silent: refresh our registration.
    Quiet,
}

/// An authenticated, encrypted session with one peer.
#[derive(Debug, Clone)]
pub struct Connection {
    conn: quinn::Connection,
    peer: PeerId,
    ep: quinn::Endpoint,
}

impl Connection {
    /// Wraps a finished handshake and starts watching its path.
    pub(crate) fn start(
        ep: quinn::Endpoint,
        conn: quinn::Connection,
        peer: PeerId,
        mux: Arc<socket::MuxSocket>,
        socket: usize,
        client: bool,
        internal: mpsc::Sender<Internal>,
    ) -> Self {
        let remote = conn.remote_address();
        mux.watch(remote);
        let _ = internal.try_send(Internal::Up {
            peer,
            socket,
            remote,
            client,
        });
        tokio::spawn(monitor(conn.clone(), peer, mux, internal));
        Self { conn, peer, ep }
    }

    /// The peer's ID, as its TLS key proved.
    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    /// The address quinn uses for the peer (the punched one).
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Opens a bidirectional stream.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), quinn::ConnectionError> {
        self.conn.open_bi().await
    }

    /// Waits for the peer to open a bidirectional stream.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), quinn::ConnectionError> {
        self.conn.accept_bi().await
    }

    /// Closes the session with an application code and reason.
    pub fn close(&self, code: u32, reason: &str) {
        self.conn
            .close(quinn::VarInt::from_u32(code), reason.as_bytes());
    }

    /// Closes the session and lingers while the close may still need
    /// repeating (RFC 9000 §10.2's closing state), at most [`CLOSE_LINGER`].
    pub async fn close_and_wait(&self, code: u32, reason: &str) {
        self.close(code, reason);
        let _ = tokio::time::timeout(CLOSE_LINGER, self.ep.wait_idle()).await;
    }

    /// Waits until the session ends, and says why.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.conn.closed().await
    }

    /// The underlying quinn connection (datagrams, stats).
    pub fn quic(&self) -> &quinn::Connection {
        &self.conn
    }
}

/// Watches one session's path: reports stalls (for re-punching), moves and
/// the end.
async fn monitor(
    conn: quinn::Connection,
    peer: PeerId,
    mux: Arc<socket::MuxSocket>,
    internal: mpsc::Sender<Internal>,
) {
    let mut remote = conn.remote_address();
    let mut last_report: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(MONITOR_TICK);
    loop {
        tokio::select! {
            _ = conn.closed() => break,
            _ = tick.tick() => {}
        }
        let now = conn.remote_address();
        if now != remote {
            mux.unwatch(remote);
            mux.watch(now);
            let _ = internal.try_send(Internal::Moved {
                peer,
                from: remote,
                remote: now,
            });
            remote = now;
        }
        let Some(l) = mux.liveness(remote) else {
            continue;
        };
        // One unanswered datagram may be a bare ACK; more means quinn is
        // probing (PTO) or sending data that nobody acknowledges.
        let stalled = l.unanswered >= 2
            && l.first_unanswered
                .is_some_and(|t| t.elapsed() >= STALL_AFTER);
        let quiet = l.prev_gap <= ACTIVE_GAP && l.last_rx.elapsed() >= STALL_AFTER;
        if !(stalled || quiet) {
            last_report = None;
        } else if last_report.is_none_or(|t| t.elapsed() >= REPUNCH_EVERY) {
            let silent_ms = l.last_rx.elapsed().as_millis() as u64;
            last_report = Some(tokio::time::Instant::now());
            if stalled {
                tracing::info!(%peer, silent_ms, "path stalled");
                let _ = internal.try_send(Internal::Stalled { peer, remote });
            } else {
                tracing::debug!(%peer, silent_ms, "peer fell silent; refreshing registration");
                let _ = internal.try_send(Internal::Quiet);
            }
        }
    }
    mux.unwatch(remote);
    let _ = internal.try_send(Internal::Down { peer, remote });
}
