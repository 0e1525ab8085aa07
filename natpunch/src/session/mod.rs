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

pub mod congestion;
pub mod endpoint;
pub mod service;
pub mod socket;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use natpunch_proto::coordinator::ConnectError;
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

/// A stalled route is reported again at most this often (the coordinator's
/// re-punch spacing, `coordinator::defaults::REPUNCH_EVERY`).
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

/// Why a session could not be set up.
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
    QuicConnect(#[from] quinn::ConnectError),
    /// The coordinator found no way to the peer (offline, declined, no
    /// path, …): the typed reason.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The endpoint stopped (its fatal error), or was shut down (`None`).
    #[error("the endpoint stopped: {}", .0.as_deref().map_or("it was shut down".to_string(), |e| chain(e)))]
    Stopped(Option<Arc<crate::peer::PeerError>>),
}

/// An error and its sources, in one line ("cannot bind …: Address in use").
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

impl SessionError {
    /// A stable machine-readable name (the `code` of `--json` events).
    pub fn code(&self) -> &'static str {
        match self {
            SessionError::Tls(_) => "tls",
            SessionError::Socket(_) => "socket",
            SessionError::WrongKey { .. } => "wrong-key",
            SessionError::Handshake { .. } => "handshake-failed",
            SessionError::HandshakeTimeout { .. } => "handshake-timeout",
            SessionError::QuicConnect(_) => "quic-connect",
            SessionError::Connect(e) => e.code(),
            SessionError::Stopped(Some(e)) => e.code(),
            SessionError::Stopped(None) => "stopped",
        }
    }
}

/// Why a session ended, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEnd {
    /// Both sides finished (`close::DONE`).
    Done,
    /// The peer closed it with an application code and its reason.
    PeerClosed { code: u64, reason: String },
    /// We closed it.
    LocallyClosed,
    /// The path was silent for the idle timeout.
    TimedOut,
    /// The peer no longer knows the session (it restarted).
    Reset,
    /// Another transport error.
    Transport(String),
    /// Not over.
    Open,
}

impl SessionEnd {
    /// Why `conn` ended.
    pub fn of(conn: &Connection) -> Self {
        Self::of_quic(conn.quic())
    }

    pub(crate) fn of_quic(conn: &quinn::Connection) -> Self {
        match conn.close_reason() {
            None => SessionEnd::Open,
            Some(quinn::ConnectionError::TimedOut) => SessionEnd::TimedOut,
            Some(quinn::ConnectionError::ApplicationClosed(c))
                if c.error_code == quinn::VarInt::from_u32(close::DONE) =>
            {
                SessionEnd::Done
            }
            Some(quinn::ConnectionError::ApplicationClosed(c)) => SessionEnd::PeerClosed {
                code: c.error_code.into_inner(),
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            },
            Some(quinn::ConnectionError::LocallyClosed) => SessionEnd::LocallyClosed,
            Some(quinn::ConnectionError::Reset) => SessionEnd::Reset,
            Some(e) => SessionEnd::Transport(e.to_string()),
        }
    }

    /// A stable machine-readable name.
    pub fn code(&self) -> &'static str {
        match self {
            SessionEnd::Done => "done",
            SessionEnd::PeerClosed { .. } => "peer-closed",
            SessionEnd::LocallyClosed => "closed",
            SessionEnd::TimedOut => "timed-out",
            SessionEnd::Reset => "reset",
            SessionEnd::Transport(_) => "transport-error",
            SessionEnd::Open => "open",
        }
    }

    /// One line for people, naming the peer.
    pub fn describe(&self, peer: PeerId, idle_secs: u64) -> String {
        match self {
            SessionEnd::Done => format!("the session with {peer} is done"),
            SessionEnd::PeerClosed { reason, .. } => {
                format!("{peer} closed the session: {reason}")
            }
            SessionEnd::LocallyClosed => format!("the session with {peer} was closed here"),
            SessionEnd::TimedOut => format!(
                "the path to {peer} went silent for {idle_secs} s: the peer or its network is gone"
            ),
            SessionEnd::Reset => format!("{peer} no longer knows this session (it restarted)"),
            SessionEnd::Transport(e) => format!("the session with {peer} ended: {e}"),
            SessionEnd::Open => format!("the session with {peer} is still open"),
        }
    }
}

/// MTU discovery: probe up to a 1500-byte Ethernet MTU under IPv6 and UDP
/// headers (1452 bytes) less the relay's 9-byte header, so that a session
/// can move between the relay and a direct path without a black hole;
/// again every minute so that a path that moved to a better one regains
/// the size (see [`socket`] for the whole policy).
const MTU_UPPER: u16 = natpunch_proto::relay::MAX_QUIC_PAYLOAD;
const MTU_REPROBE: Duration = Duration::from_secs(60);

/// Transport settings shared by both sides.
pub(crate) fn transport(idle: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // A short idle timeout needs keepalives inside it (three per timeout).
    t.keep_alive_interval(Some(KEEPALIVE.min(idle / 3)));
    // An idle timeout above 2^62 µs is impossible; fall back to the default.
    let idle = quinn::IdleTimeout::try_from(idle)
        .unwrap_or(quinn::IdleTimeout::from(quinn::VarInt::from_u32(30_000)));
    t.max_idle_timeout(Some(idle));
    // Windows sized for 1 Gbit/s at 200 ms RTT (25 MB in flight) with
    // room for loss recovery: a lost packet holds back the stream's data
    // for ~2 RTTs, and the window must cover that or the sender stalls.
    // quinn's defaults (1.25 MB per stream) cap a long path well below the
    // link; 8 MiB capped a 100 ms path at 670 Mbit/s, and 32 MiB held
    // 1 % loss at 100 ms to 550 Mbit/s where 64 MiB moved 620–660
    // (measured, bench session). They are credit, not allocations: memory
    // is used only while data waits for a retransmission or the
    // application stops reading.
    t.stream_receive_window(quinn::VarInt::from_u32(64 << 20));
    t.receive_window(quinn::VarInt::from_u32(96 << 20));
    t.send_window(96 << 20);
    // BBR, its window held near the path's BDP (see [`congestion`]).
    t.congestion_controller_factory(Arc::new(congestion::LowQueueFactory::default()));
    // One stream per forwarded TCP connection.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER).interval(MTU_REPROBE);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

/// Messages from session tasks to the peer driver.
#[derive(Debug)]
pub(crate) enum Internal {
    /// A session is up on the route quinn knows as `mapped`.
    Up {
        peer: PeerId,
        mapped: SocketAddr,
        conn: quinn::Connection,
    },
    Down {
        peer: PeerId,
        mapped: SocketAddr,
    },
    /// The route stopped answering.
    Stalled {
        mapped: SocketAddr,
    },
    /// A steadily sending peer fell silent.
    Quiet,
}

/// An authenticated, encrypted session with one peer.
#[derive(Debug, Clone)]
pub struct Connection {
    conn: quinn::Connection,
    peer: PeerId,
    ep: quinn::Endpoint,
    socket: Arc<socket::PathSocket>,
}

impl Connection {
    /// Wraps a finished handshake and starts watching its route.
    pub(crate) fn start(
        ep: quinn::Endpoint,
        conn: quinn::Connection,
        peer: PeerId,
        socket: Arc<socket::PathSocket>,
        client: bool,
        internal: mpsc::Sender<Internal>,
    ) -> Self {
        let mapped = conn.remote_address();
        tracing::debug!(%peer, client, "session up");
        let _ = internal.try_send(Internal::Up {
            peer,
            mapped,
            conn: conn.clone(),
        });
        tokio::spawn(monitor(conn.clone(), peer, socket.clone(), internal));
        Self {
            conn,
            peer,
            ep,
            socket,
        }
    }

    /// The peer's ID, as its TLS key proved.
    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    /// The real address the session's datagrams go to now (it changes when
    /// the path moves; quinn's own address for the peer never does).
    pub fn remote_address(&self) -> SocketAddr {
        self.socket
            .path_of(self.conn.remote_address())
            .map_or(self.conn.remote_address(), |p| p.remote)
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

    /// Why the session ended (or that it has not).
    pub fn end(&self) -> SessionEnd {
        SessionEnd::of(self)
    }

    /// The underlying quinn connection (datagrams, stats).
    pub fn quic(&self) -> &quinn::Connection {
        &self.conn
    }
}

/// Watches one session's route: reports stalls (for re-punching) and the
/// end.
async fn monitor(
    conn: quinn::Connection,
    peer: PeerId,
    socket: Arc<socket::PathSocket>,
    internal: mpsc::Sender<Internal>,
) {
    let mapped = conn.remote_address();
    let mut last_report: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(MONITOR_TICK);
    loop {
        tokio::select! {
            _ = conn.closed() => break,
            _ = tick.tick() => {}
        }
        let Some(l) = socket.liveness(mapped) else {
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
                let _ = internal.try_send(Internal::Stalled { mapped });
            } else {
                tracing::debug!(%peer, silent_ms, "peer fell silent; refreshing registration");
                let _ = internal.try_send(Internal::Quiet);
            }
        }
    }
    let _ = internal.try_send(Internal::Down { peer, mapped });
}
