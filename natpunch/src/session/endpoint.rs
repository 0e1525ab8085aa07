//! The library API.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use natpunch::session::{Endpoint, EndpointConfig};
//! use natpunch::proto::identity::{Identity, PeerId};
//!
//! let me = Identity::from_seed(rand::random());
//! let server = "203.0.113.10:3478".parse()?;
//! let endpoint = Endpoint::bind(EndpointConfig::new(me, server))?;
//! let peer: PeerId = "…the other side's peer ID…".parse()?;
//! let conn = endpoint.connect(peer).await?;
//! let (mut send, mut recv) = conn.open_bi().await?;
//! send.write_all(b"hello").await?;
//! send.finish()?;
//! let reply = recv.read_to_end(1 << 20).await?;
//! # let _ = reply; Ok(()) }
//! ```
//!
//! One [`Endpoint`] is one peer process: one identity, one main UDP
//! socket (plus what punching needs), one quinn endpoint over all of them.
//! `connect` punches a hole to a peer and runs a QUIC handshake through it;
//! connects to many peers run at once. With [`EndpointConfig::accept`] it
//! registers with the rendezvous server and `accept` yields the sessions
//! other peers started.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use natpunch_proto::identity::{Identity, PeerId};
use natpunch_proto::punch::PunchConfig;
use natpunch_proto::rendezvous::wire::DeclineReason;
use tokio::sync::{mpsc, oneshot, watch};

use super::socket::PathSocket;
use super::{
    close, tls, transport, Connection, Internal, SessionError, CLOSE_LINGER, HANDSHAKE_TIMEOUT,
};
use crate::peer::{self, PeerConfig, PeerError, PeerEvent};

/// Settings of an [`Endpoint`].
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Identity, rendezvous server, punching settings.
    pub peer: PeerConfig,
    /// Accept sessions that other peers start.
    pub accept: bool,
    /// If set, only these peers may start sessions with us.
    pub allow: Option<HashSet<PeerId>>,
    /// A session whose path is silent this long ends.
    pub idle_timeout: Duration,
}

impl EndpointConfig {
    /// Defaults: accept sessions from anyone, STUN on the rendezvous server.
    pub fn new(identity: Identity, server: SocketAddr) -> Self {
        Self {
            peer: PeerConfig {
                identity,
                server,
                stun: None,
                source_ip: None,
                source_port: None,
                ttl: None,
                punch: PunchConfig::new(0),
                rto: Duration::from_millis(250),
                once: false,
                nat_cache: true,
                relay: true,
                serve_relay: None,
                portmap: Some(crate::portmap::PortmapConfig::default()),
                // Opt-in for now (`--tcp`, `--tcp-fallback`).
                tcp: natpunch_proto::coordinator::TcpMode::Off,
                turn: Vec::new(),
            },
            accept: true,
            allow: None,
            idle_timeout: super::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Requests from the [`Endpoint`] to its driver.
#[derive(Debug)]
pub(crate) enum UserCommand {
    Connect {
        peer: PeerId,
        reply: oneshot::Sender<Result<Connection, SessionError>>,
    },
    /// No punching: the peer has a public or forwarded port.
    Dial {
        peer: PeerId,
        addr: SocketAddr,
        reply: oneshot::Sender<Result<Connection, SessionError>>,
    },
    /// Leave cleanly (unregister), then stop.
    Close { done: oneshot::Sender<()> },
}

/// What the driver and the session tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub identity: Identity,
    pub allow: Option<HashSet<PeerId>>,
    pub transport: Arc<quinn::TransportConfig>,
    pub server: Option<quinn::ServerConfig>,
    pub incoming: mpsc::Sender<Connection>,
    pub internal: mpsc::Sender<Internal>,
    pub events: mpsc::Sender<PeerEvent>,
}

impl Shared {
    /// The one quinn endpoint, over every socket the path table owns
    /// (accepting, if we accept).
    pub fn quic_endpoint(
        self: &Arc<Self>,
        socket: Arc<PathSocket>,
    ) -> Result<quinn::Endpoint, SessionError> {
        let mut ec = quinn::EndpointConfig::default();
        // Every QUIC packet keeps its fixed bit, so the first byte tells it
        // from STUN and our frames (RFC 9287 greasing would blur that).
        ec.grease_quic_bit(false);
        // Our connection IDs have the length the path table parses.
        ec.cid_generator(|| Box::new(RandomCids));
        let ep = quinn::Endpoint::new_with_abstract_socket(
            ec,
            self.server.clone(),
            socket.clone(),
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(SessionError::Socket)?;
        if self.server.is_some() {
            tokio::spawn(accept_loop(ep.clone(), socket, self.clone()));
        }
        Ok(ep)
    }

    /// Runs the QUIC handshake to `peer` on the route quinn knows as
    /// `mapped` (whose real address, for messages, is `real`).
    pub async fn dial(
        self: Arc<Self>,
        ep: quinn::Endpoint,
        socket: Arc<PathSocket>,
        mapped: SocketAddr,
        real: SocketAddr,
        peer: PeerId,
    ) -> Result<Connection, SessionError> {
        let (crypto, mismatch) = tls::client_crypto(&self.identity, peer)?;
        let mut cc = quinn::ClientConfig::new(crypto);
        cc.transport_config(self.transport.clone());
        let connecting = ep.connect_with(cc, mapped, "natpunch")?;
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => Ok(Connection::start(
                ep,
                conn,
                peer,
                socket,
                true,
                self.internal.clone(),
            )),
            Ok(Err(source)) => Err(match mismatch.seen() {
                Some(got) => SessionError::WrongKey {
                    expected: peer,
                    got,
                    remote: real,
                },
                None => SessionError::Handshake {
                    peer,
                    remote: real,
                    source,
                },
            }),
            Err(_) => Err(SessionError::HandshakeTimeout {
                peer,
                remote: real,
                secs: HANDSHAKE_TIMEOUT.as_secs(),
            }),
        }
    }
}

/// Random connection IDs of the length the path table parses
/// ([`super::socket::CID_LEN`]), never retired by age.
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let bytes: [u8; super::socket::CID_LEN] = rand::random();
        quinn::ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        super::socket::CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

async fn accept_loop(ep: quinn::Endpoint, socket: Arc<PathSocket>, shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            i = ep.accept() => i,
            // The Endpoint is gone: take no new sessions (live ones go on).
            _ = shared.incoming.closed() => None,
        };
        let Some(incoming) = incoming else {
            ep.set_server_config(None);
            return;
        };
        let (socket, shared, ep) = (socket.clone(), shared.clone(), ep.clone());
        tokio::spawn(async move {
            let mapped = incoming.remote_address();
            let remote = socket.path_of(mapped).map_or(mapped, |p| p.remote);
            let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::info!(%remote, error = %e, "incoming handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!(%remote, "incoming handshake timed out");
                    return;
                }
            };
            let Some(peer) = tls::peer_id_of(&conn) else {
                conn.close(close::ERROR.into(), b"no Ed25519 key presented");
                return;
            };
            if shared.allow.as_ref().is_some_and(|a| !a.contains(&peer)) {
                let reason = format!(
                    "{peer} is not allowed by {} (--allow)",
                    shared.identity.peer_id()
                );
                conn.close(close::NOT_ALLOWED.into(), reason.as_bytes());
                let _ = shared.events.try_send(PeerEvent::Refused {
                    peer_id: peer,
                    reason: DeclineReason::NotAllowed,
                });
                return;
            }
            let c = Connection::start(ep, conn, peer, socket, false, shared.internal.clone());
            if shared.incoming.send(c.clone()).await.is_err() {
                c.close(close::INTERRUPTED, "not accepting sessions");
            }
        });
    }
}

/// How the endpoint's task ended.
type Finished = Option<Result<(), Arc<PeerError>>>;

/// One peer process; see the module documentation.
#[derive(Debug)]
pub struct Endpoint {
    peer_id: PeerId,
    commands: mpsc::Sender<UserCommand>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<Connection>>,
    events: Mutex<Option<mpsc::Receiver<PeerEvent>>>,
    finished: watch::Receiver<Finished>,
}

impl Endpoint {
    /// Starts the endpoint: registration (if it accepts sessions) at once,
    /// NAT discovery in the background. Must be called inside a tokio
    /// runtime.
    pub fn bind(config: EndpointConfig) -> Result<Self, SessionError> {
        let peer_id = config.peer.identity.peer_id();
        let transport = transport(config.idle_timeout);
        let server = if config.accept {
            let mut s =
                quinn::ServerConfig::with_crypto(tls::server_crypto(&config.peer.identity)?);
            s.transport_config(transport.clone());
            Some(s)
        } else {
            None
        };
        // Checks our key loads before anything goes on the wire.
        tls::client_crypto(&config.peer.identity, peer_id)?;
        // Queue sizes: events are dropped when nobody reads them; sessions
        // wait for accept() (a full queue delays the peer's handshake, not
        // us); internal messages are a few per session per second.
        let (events_tx, events_rx) = mpsc::channel(1024);
        let (incoming_tx, incoming_rx) = mpsc::channel(64);
        let (internal_tx, internal_rx) = mpsc::channel(1024);
        let (commands_tx, commands_rx) = mpsc::channel(64);
        let (finished_tx, finished_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            identity: config.peer.identity.clone(),
            allow: config.allow,
            transport,
            server,
            incoming: incoming_tx,
            internal: internal_tx,
            events: events_tx,
        });
        tokio::spawn(async move {
            let r = peer::run(config.peer, shared, commands_rx, internal_rx).await;
            let _ = finished_tx.send(Some(r.map_err(Arc::new)));
        });
        Ok(Self {
            peer_id,
            commands: commands_tx,
            incoming: tokio::sync::Mutex::new(incoming_rx),
            events: Mutex::new(Some(events_rx)),
            finished: finished_rx,
        })
    }

    /// Our peer ID.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Progress events (registered, punching, sessions, NAT measured), for
    /// a UI or `--json`. Can be taken once; untaken events are dropped.
    pub fn events(&self) -> Option<mpsc::Receiver<PeerEvent>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Punches through to `peer` and runs the QUIC handshake. The
    /// connection is authenticated: the other side proved it holds the key
    /// of `peer`. Connects to different peers run at once.
    pub async fn connect(&self, peer: PeerId) -> Result<Connection, SessionError> {
        self.request(|reply| UserCommand::Connect { peer, reply })
            .await
    }

    /// Connects to `peer` at a known address (a public or forwarded port),
    /// without an introduction or punching. The peer must still prove its
    /// key.
    pub async fn connect_addr(
        &self,
        peer: PeerId,
        addr: SocketAddr,
    ) -> Result<Connection, SessionError> {
        self.request(|reply| UserCommand::Dial { peer, addr, reply })
            .await
    }

    /// Sends a command to the driver and waits for its answer.
    async fn request(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<Connection, SessionError>>) -> UserCommand,
    ) -> Result<Connection, SessionError> {
        let (reply, rx) = oneshot::channel();
        if self.commands.send(command(reply)).await.is_err() {
            return Err(SessionError::Stopped(self.stop_error().await));
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(SessionError::Stopped(self.stop_error_now())),
        }
    }

    /// The next session another peer started; `None` once the endpoint
    /// has stopped.
    pub async fn accept(&self) -> Option<Connection> {
        let mut incoming = self.incoming.lock().await;
        let mut finished = self.finished.clone();
        tokio::select! {
            c = incoming.recv() => c,
            _ = finished.wait_for(|f| f.is_some()) => None,
        }
    }

    /// Leaves cleanly: a listener unregisters, so the server stops
    /// introducing others to it at once, and the gateway's port mapping is
    /// deleted. Live sessions go on.
    pub async fn close(&self) {
        let (done, rx) = oneshot::channel();
        if self
            .commands
            .send(UserCommand::Close { done })
            .await
            .is_ok()
        {
            // Unregistering, then deleting the port mapping (bounded).
            let bound = CLOSE_LINGER + crate::portmap::SHUTDOWN_BOUND;
            let _ = tokio::time::timeout(bound, rx).await;
        }
    }

    /// Waits until the endpoint stops (a fatal error, a close, or when
    /// punch-only mode is done) and returns why.
    pub async fn finished(&self) -> Result<(), SessionError> {
        match self.stop_error().await {
            None => Ok(()),
            Some(e) => Err(SessionError::Stopped(Some(e))),
        }
    }

    async fn stop_error(&self) -> Option<Arc<PeerError>> {
        let mut finished = self.finished.clone();
        let r = match finished.wait_for(|f| f.is_some()).await {
            Ok(f) => f.clone().and_then(|r| r.err()),
            Err(_) => None,
        };
        r
    }

    /// Why a request got no answer: the driver's error if it stopped.
    fn stop_error_now(&self) -> Option<Arc<PeerError>> {
        self.finished.borrow().clone().and_then(|r| r.err())
    }
}
