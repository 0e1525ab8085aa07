//! The peer driver: a thin tokio loop around the sans-IO connection core
//! ([`natpunch_proto::coordinator::Host`]).
//!
//! It binds the main UDP socket and puts the path table
//! ([`crate::session::socket::PathSocket`]) and one quinn endpoint on it
//! at once, starts registering or connecting at once, and runs NAT
//! discovery ([`crate::nat::survey`]) and hop discovery in the background,
//! feeding each fact to the coordinator as it is measured. It carries out
//! what the coordinator asks (open and close sockets, point routes at
//! paths, start QUIC when a connect has its path) and tells it what the
//! session layer sees (sessions up and down, stalled routes, a peer's
//! packets from a new path). With `serve_relay` it also runs the server's
//! rendezvous and relay ([`crate::stun_server`]) for the peers that hold a
//! session with it, keeping the server's member list in step with them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use natpunch_proto::coordinator::{
    ConnectError, Host, HostConfig, HostEvent, Policy, RemoteKey, RequestId, TcpMode, Via,
};
use natpunch_proto::identity::{Identity, PeerId};
use natpunch_proto::nat::{DiscoveryConfig, Fact, NatReport};
use natpunch_proto::punch::{Path, PunchConfig, Role, Strategy};
use natpunch_proto::rendezvous::wire::DeclineReason;
use natpunch_proto::stun::transaction::Timing;
use natpunch_proto::SocketId;
use tokio::sync::{mpsc, oneshot};

use crate::nat::{NatError, NatOptions};
use crate::nat_cache;
use crate::net::{bind_udp, route_source, NetError};
use crate::server_tcp::LinkNews;
use crate::session::endpoint::{Shared, UserCommand};
use crate::session::socket::{Datagram, PathSocket, SocketNews};
use crate::session::{Connection, Internal, SessionEnd, SessionError};
use crate::ttl;
use natpunch_proto::relay::stream::encode_record;

/// Control datagrams (≤ [`crate::session::socket::MAX_CONTROL`] bytes
/// each) waiting for the driver: a birthday burst is 256 sockets × a few
/// probes, and forty peers' introductions fit many times over.
const CONTROL_QUEUE: usize = 4096;

/// Settings.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub identity: Identity,
    /// The rendezvous server.
    pub server: SocketAddr,
    /// STUN server for NAT discovery and fresh mappings (default: the
    /// rendezvous server).
    pub stun: Option<SocketAddr>,
    pub source_ip: Option<IpAddr>,
    pub source_port: Option<u16>,
    /// Limited TTL override (`-t`); default: discovered.
    pub ttl: Option<u8>,
    pub punch: PunchConfig,
    /// Discovery's first retransmission timeout, before a round trip is
    /// measured (shorter in the lab).
    pub rto: Duration,
    /// Punch only: stop after the first punched path (or failure),
    /// without a QUIC session.
    pub once: bool,
    /// Start from the facts the last discovery on this network measured
    /// ([`crate::nat_cache`]), and keep them for the next run.
    pub nat_cache: bool,
    /// Start sessions on the server's relay at once and move them to a
    /// direct path when one is punched (never in punch-only runs).
    pub relay: bool,
    /// Serve rendezvous and relay to the peers we have sessions with, on
    /// this UDP and TCP port of our address (0: any free port): for a peer
    /// others can reach directly (a public address, a forwarded port).
    pub serve_relay: Option<u16>,
    /// Ask the gateway to map the main socket's port (PCP, NAT-PMP, UPnP
    /// IGD) and announce it as our best candidate; `None`: never ask.
    pub portmap: Option<crate::portmap::PortmapConfig>,
    /// When TCP is punched ([`crate::tcp`]).
    pub tcp: TcpMode,
    /// TURN servers to allocate on ([`crate::turn`]): each relayed address
    /// is announced to peers, and a session goes through it when nothing
    /// direct works. An allocation that cannot be made stops the run.
    pub turn: Vec<crate::turn::TurnServer>,
}

/// A path as events show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathView {
    /// Straight to the peer's `remote` address from our `local` socket
    /// (a punched TCP stream when `tcp`).
    Direct {
        remote: SocketAddr,
        local: Option<SocketAddr>,
        tcp: bool,
    },
    /// Through the relay on `server`.
    Relay { server: SocketAddr },
    /// Through a TURN server: to the peer's `remote` address from our
    /// allocation (which the server relays to us at `relayed`), or to the
    /// peer's relayed address `remote` from our main socket.
    Turn {
        remote: SocketAddr,
        relayed: Option<SocketAddr>,
    },
}

impl PathView {
    /// `"direct"` or `"relay"`.
    pub fn kind(&self) -> &'static str {
        match self {
            PathView::Direct { .. } => "direct",
            PathView::Relay { .. } | PathView::Turn { .. } => "relay",
        }
    }

    /// What relays it: `"turn"` for a TURN server, `None` otherwise.
    pub fn via(&self) -> Option<&'static str> {
        matches!(self, PathView::Turn { .. }).then_some("turn")
    }

    /// The address the traffic goes to (the peer, or the relay).
    pub fn remote(&self) -> SocketAddr {
        match self {
            PathView::Direct { remote, .. } => *remote,
            PathView::Relay { server } => *server,
            PathView::Turn { remote, .. } => *remote,
        }
    }
}

/// Events for the CLI (and scripts, as JSON).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PeerEvent {
    /// NAT discovery finished (it runs while we connect).
    NatMeasured {
        report: Box<NatReport>,
        opener_ttl: Option<u8>,
    },
    Registered {
        peer_id: PeerId,
        observed: SocketAddr,
    },
    /// The rendezvous server stopped answering our heartbeats.
    ServerLost {
        server: SocketAddr,
    },
    ServerBack {
        server: SocketAddr,
    },
    /// UDP to the server got no answer: its frames (and the relay) go
    /// over TCP now.
    ServerOverTcp {
        server: SocketAddr,
    },
    /// The server refused our registration: it serves only the peers its
    /// owner has sessions with.
    ServerRefused {
        server: SocketAddr,
        code: &'static str,
    },
    /// What the port mapper found: a mapped port (announced), a gateway
    /// whose mapping is of no use, or no protocol at all.
    Portmap {
        news: crate::portmap::PortmapNews,
    },
    /// We serve rendezvous and relay, at `addr`, to the peers we have
    /// sessions with (`--serve-relay`).
    ServingRelay {
        addr: SocketAddr,
    },
    /// Another process with our key registered; we no longer receive
    /// introductions until it leaves.
    Displaced {
        peer_id: PeerId,
    },
    Incoming {
        from: PeerId,
    },
    Attempt {
        peer_id: PeerId,
        strategy: Strategy,
    },
    Connected {
        peer_id: PeerId,
        strategy: Strategy,
        remote: SocketAddr,
        role: Role,
        /// From the connect (or the introduction) to the confirmed path.
        elapsed: Duration,
        probes_sent: u64,
        bytes_sent: u64,
        /// A live path to the peer was used: no punching.
        reused: bool,
        /// The relay is reached over TCP (UDP is blocked here).
        over_tcp: bool,
    },
    Failed {
        peer_id: PeerId,
        error: ConnectError,
    },
    /// We turned a peer away.
    Refused {
        peer_id: PeerId,
        reason: DeclineReason,
    },
    /// A QUIC session is up (authenticated), on `path`.
    SessionStarted {
        peer_id: PeerId,
        path: PathView,
    },
    /// A session's path moved (another address of the peer, another
    /// socket of ours, from the relay to a direct path or back).
    PathChanged {
        peer_id: PeerId,
        from: Option<PathView>,
        to: PathView,
        /// The technique that punched the new path, when one did, and how
        /// long from the connect (or introduction) its attempt took.
        strategy: Option<Strategy>,
        elapsed: Option<Duration>,
    },
    /// Punching failed for a relayed peer: its sessions stay on the relay.
    Relayed {
        peer_id: PeerId,
        error: ConnectError,
    },
    /// A stalled session's path works again (punched anew).
    PathRepaired {
        peer_id: PeerId,
        remote: SocketAddr,
        local: Option<SocketAddr>,
        strategy: Strategy,
    },
    /// A session's path stopped answering; punching again.
    Stalled {
        peer_id: PeerId,
    },
    SessionEnded {
        peer_id: PeerId,
        end: SessionEnd,
    },
    /// A TURN allocation is made: peers are told to reach us at `relayed`.
    TurnAllocated {
        server: SocketAddr,
        transport: &'static str,
        relayed: SocketAddr,
        elapsed: Duration,
    },
    /// A TURN allocation was lost; peers are no longer told of it, and
    /// another is being made.
    TurnLost {
        error: String,
    },
    /// A TURN allocation was released at the end (`confirmed`: the server
    /// answered).
    TurnReleased {
        confirmed: bool,
    },
}

/// Errors that stop the peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Nat(#[from] NatError),
    #[error("cannot start QUIC on the socket: {0}")]
    Socket(#[source] std::io::Error),
    /// `--serve-relay` could not start its server.
    #[error("cannot serve the relay: {0}")]
    Serve(String),
    /// The rendezvous server never answered since we started (a listener
    /// that has registered once keeps trying instead, and says so).
    #[error("no answer from the rendezvous server {server}: it is down, the address is wrong, or UDP is blocked")]
    ServerUnreachable { server: SocketAddr },
    /// A `--turn` allocation could not be made.
    #[error(transparent)]
    Turn(#[from] crate::turn::TurnDriverError),
}

impl PeerError {
    /// A stable machine-readable name.
    pub fn code(&self) -> &'static str {
        match self {
            PeerError::Net(NetError::Bind { .. }) => "bind",
            PeerError::Net(_) => "network",
            PeerError::Nat(_) => "nat-discovery",
            PeerError::Socket(_) => "socket",
            PeerError::Serve(_) => "serve-relay",
            PeerError::ServerUnreachable { .. } => "server-unreachable",
            PeerError::Turn(_) => "turn",
        }
    }
}

/// Where the answer to a user's connect goes.
type Reply = oneshot::Sender<Result<Connection, SessionError>>;

struct Driver {
    cfg: PeerConfig,
    /// To the task that keeps this network's cache entry.
    cache: mpsc::UnboundedSender<CacheNews>,
    shared: Arc<Shared>,
    host: Host,
    socket: Arc<PathSocket>,
    endpoint: quinn::Endpoint,
    local_ip: IpAddr,
    requests: HashMap<RequestId, Reply>,
    next_request: RequestId,
    /// Live QUIC connections by route, to nudge after the path moves.
    conns: HashMap<SocketAddr, Vec<quinn::Connection>>,
    /// We registered at least once (a listener).
    registered: bool,
    /// The divert queue's sender (a TCP link feeds it too).
    divert: mpsc::Sender<Datagram>,
    /// The server answered on UDP at least once.
    udp_heard: bool,
    /// Records for the server, when it is reached over TCP.
    tcp: Option<mpsc::Sender<Vec<u8>>>,
    /// When to try TCP (while UDP gets no answer).
    tcp_at: Option<Instant>,
    tcp_news: mpsc::UnboundedSender<LinkNews>,
    /// Why the run must stop.
    fatal: Option<PeerError>,
    /// The rendezvous and relay we serve to our peers, and the peers with
    /// sessions (its members, with their session counts).
    served: Option<crate::stun_server::RunningServer>,
    members: HashMap<PeerId, usize>,
    done: bool,
    /// Our TCP punching port (listening), when TCP is punched.
    punch_port: Option<SocketAddr>,
    punch_news: mpsc::UnboundedSender<crate::tcp::TcpNews>,
    /// TCP discovery has started (it runs once).
    tcp_measuring: bool,
    /// TCP punches under way, by attempt.
    tcp_punches: HashMap<u64, tokio::task::JoinHandle<()>>,
    /// Readers of punched streams, by socket.
    stream_tasks: HashMap<SocketId, tokio::task::JoinHandle<()>>,
    /// TURN allocations serving as sockets, and those made so far (with
    /// the addresses they relay).
    turn: Vec<crate::turn::TurnPath>,
    turn_ready: Vec<(SocketId, SocketAddr)>,
    /// Paths through a TURN server (for how events show them).
    turn_paths: std::collections::HashSet<Path>,
}

/// Runs a peer until its [`crate::session::Endpoint`] is closed or
/// dropped, a fatal error, or (punch-only mode) the first result; then
/// deletes its port mapping, whichever way it ended.
pub(crate) async fn run(
    cfg: PeerConfig,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<UserCommand>,
    internal: mpsc::Receiver<Internal>,
) -> Result<(), PeerError> {
    let mut portmapper = None;
    let r = drive(cfg, shared, commands, internal, &mut portmapper).await;
    if let Some(p) = portmapper {
        p.shutdown().await;
    }
    r
}

async fn drive(
    cfg: PeerConfig,
    shared: Arc<Shared>,
    mut commands: mpsc::Receiver<UserCommand>,
    mut internal: mpsc::Receiver<Internal>,
    portmapper: &mut Option<crate::portmap::Portmapper>,
) -> Result<(), PeerError> {
    let stun = cfg.stun.unwrap_or(cfg.server);
    let ip = match cfg.source_ip {
        Some(ip) => ip,
        None => route_source(cfg.server)?,
    };
    let main = bind_udp(SocketAddr::new(ip, cfg.source_port.unwrap_or(0)), false)?;
    crate::net::grow_buffers(&main, crate::net::BURST_BUFFER);
    let local = main.local_addr().map_err(|source| NetError::Bind {
        addr: SocketAddr::new(ip, cfg.source_port.unwrap_or(0)),
        source,
    })?;
    let (divert_tx, mut divert) = mpsc::channel::<Datagram>(CONTROL_QUEUE);
    let (news_tx, mut news) = mpsc::unbounded_channel::<SocketNews>();
    let (tcp_news_tx, mut tcp_news) = mpsc::unbounded_channel::<LinkNews>();
    let socket =
        Arc::new(PathSocket::new(main, divert_tx.clone(), news_tx).map_err(PeerError::Socket)?);
    let endpoint = shared.quic_endpoint(socket.clone()).map_err(|e| match e {
        SessionError::Socket(io) => PeerError::Socket(io),
        other => PeerError::Socket(std::io::Error::other(other.to_string())),
    })?;
    // What the last run on this network measured (and the server's
    // cookie), before anything goes out; discovery runs beside the
    // connect, on its own sockets.
    let entry = cfg
        .nat_cache
        .then(nat_cache::cache_dir)
        .flatten()
        .map(|dir| nat_cache::entry_path(&dir, ip, stun));
    let cached = entry
        .as_ref()
        .and_then(|(path, mac)| nat_cache::load(path, mac.as_deref()));
    let host = Host::new(HostConfig {
        identity: cfg.identity.clone(),
        instance: rand::random(),
        server: cfg.server,
        stun,
        local,
        policy: Policy {
            accept: shared.server.is_some(),
            allow: shared.allow.clone(),
        },
        punch: cfg.punch.clone(),
        ttl: cfg.ttl,
        seed: rand::random(),
        relay: cfg.relay && !cfg.once,
        portmap: cfg.portmap.is_some(),
        tcp: cfg.tcp,
        turn: cfg.turn.len(),
        server_memo: cached
            .as_ref()
            .and_then(|c| c.server)
            .and_then(|n| n.memo(cfg.server)),
    });
    let (portmap_tx, mut portmap_news) = mpsc::unbounded_channel();
    if let Some(pc) = cfg.portmap.clone() {
        *portmapper = Some(crate::portmap::Portmapper::spawn(local, pc, portmap_tx));
    }
    let (punch_tcp_tx, mut punch_tcp) = mpsc::unbounded_channel::<crate::tcp::TcpNews>();
    let punch_port = if cfg.tcp == TcpMode::Off {
        None
    } else {
        match crate::tcp::listen(local) {
            Ok((listener, addr)) => {
                tokio::spawn(crate::tcp::accept_loop(listener, punch_tcp_tx.clone()));
                Some(addr)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for TCP punching: TCP paths are off");
                None
            }
        }
    };
    let (surveyed_tx, mut surveyed) = oneshot::channel::<()>();
    let (facts_tx, mut facts) = mpsc::unbounded_channel::<Fact>();
    let (cache_tx, cache_rx) = mpsc::unbounded_channel::<CacheNews>();
    tokio::spawn(keep_cache(entry, cached.clone(), cache_rx, facts_tx));
    tokio::spawn(discover(
        cfg.clone(),
        ip,
        stun,
        cached.clone(),
        cache_tx.clone(),
        shared.clone(),
        surveyed_tx,
    ));
    let mut d = Driver {
        cfg,
        cache: cache_tx,
        shared,
        host,
        socket,
        endpoint,
        local_ip: ip,
        requests: HashMap::new(),
        next_request: 1,
        conns: HashMap::new(),
        registered: false,
        served: None,
        members: HashMap::new(),
        divert: divert_tx,
        udp_heard: false,
        tcp: None,
        tcp_at: Some(Instant::now() + crate::server_tcp::TCP_FALLBACK_AFTER),
        tcp_news: tcp_news_tx,
        fatal: None,
        done: false,
        punch_port,
        punch_news: punch_tcp_tx,
        tcp_measuring: false,
        tcp_punches: HashMap::new(),
        stream_tasks: HashMap::new(),
        turn: Vec::new(),
        turn_ready: Vec::new(),
        turn_paths: Default::default(),
    };
    if let Some(c) = &cached {
        tracing::debug!(?c, "NAT facts from the cache");
        for f in c.facts() {
            d.host.handle_fact(Instant::now(), f);
        }
    }
    if let Some(port) = d.cfg.serve_relay {
        d.serve_relay(port).await?;
    }
    let (turn_tx, mut turn_news) = mpsc::unbounded_channel::<crate::turn::PathNews>();
    for server in d.cfg.turn.clone() {
        let id = d.host.stream_id();
        d.turn.push(crate::turn::TurnPath::spawn(
            server,
            id,
            d.socket.clone(),
            turn_tx.clone(),
        ));
    }
    d.host.start(Instant::now());
    let mut surveyed_done = false;
    loop {
        d.flush().await;
        if let Some(e) = d.fatal.take() {
            d.close_turn().await;
            return Err(e);
        }
        if d.done {
            d.close_turn().await;
            return Ok(());
        }
        let deadline = d
            .host
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let tcp_at = d
            .tcp_at
            .filter(|_| !d.udp_heard && !d.cfg.once)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            got = divert.recv() => {
                let Some((id, from, data)) = got else {
                    d.close_turn().await;
                    return Ok(());
                };
                let now = Instant::now();
                d.heard(id, from);
                d.host.handle_datagram(now, id, from, &data);
                // Drain what else is already queued before flushing.
                while let Ok((id, from, data)) = divert.try_recv() {
                    d.heard(id, from);
                    d.host.handle_datagram(now, id, from, &data);
                }
            }
            _ = tokio::time::sleep_until(tcp_at.into()), if d.tcp_at.is_some() && !d.udp_heard && !d.cfg.once => {
                d.tcp_at = None;
                tracing::debug!(server = %d.cfg.server, "no answer on UDP yet: trying TCP too");
                crate::server_tcp::spawn_connect(
                    d.cfg.server,
                    d.local_ip,
                    d.socket.clone(),
                    d.divert.clone(),
                    d.tcp_news.clone(),
                );
            }
            Some(n) = tcp_news.recv() => d.on_link(n),
            Some(n) = punch_tcp.recv() => d.on_tcp(n),
            r = &mut surveyed, if !surveyed_done => {
                surveyed_done = true;
                if r.is_ok() {
                    d.measure_tcp();
                }
            }
            Some(fact) = facts.recv() => d.host.handle_fact(Instant::now(), fact),
            Some(news) = portmap_news.recv() => d.on_portmap(news),
            Some(news) = turn_news.recv() => d.on_turn(news),
            Some(SocketNews::NewSource { mapped, path }) = news.recv() => {
                if let Some(key) = d.socket.key_of(mapped) {
                    d.host.new_source(Instant::now(), key, path);
                }
            }
            cmd = commands.recv() => match cmd {
                Some(UserCommand::Connect { peer, reply }) => d.connect(peer, reply),
                Some(UserCommand::Dial { peer, addr, reply }) => d.dial(peer, addr, reply),
                Some(UserCommand::Close { done }) => {
                    d.close().await;
                    // The mapping is deleted before the caller hears we
                    // are done (it may exit right after).
                    if let Some(p) = portmapper.take() {
                        p.shutdown().await;
                    }
                    let _ = done.send(());
                    return Ok(());
                }
                // The endpoint is gone: leave cleanly.
                None => {
                    d.close().await;
                    return Ok(());
                }
            },
            Some(msg) = internal.recv() => d.internal(msg),
            _ = tokio::time::sleep_until(deadline.into()) => d.host.handle_timeout(Instant::now()),
        }
    }
}

/// A cache entry's file and the gateway's link-layer address now.
type CacheEntry = (std::path::PathBuf, Option<String>);

/// What goes into this network's cache entry.
enum CacheNews {
    /// Measured now (also passed on to the coordinator).
    Fact(Fact),
    /// The rendezvous server gave us a cookie.
    Server(nat_cache::ServerNote),
}

/// Keeps this network's entry: each measured fact goes to the coordinator
/// and into the entry, which is written as it grows (a punch-only run may
/// end before discovery does), and so does each new server cookie. Ends
/// when the driver and discovery are both done.
async fn keep_cache(
    entry: Option<CacheEntry>,
    cached: Option<nat_cache::Cached>,
    mut news: mpsc::UnboundedReceiver<CacheNews>,
    facts: mpsc::UnboundedSender<Fact>,
) {
    let mut c = cached.unwrap_or_default();
    while let Some(n) = news.recv().await {
        match n {
            CacheNews::Fact(f) => {
                let _ = facts.send(f);
                c.learn(&f);
            }
            CacheNews::Server(note) => c.server = Some(note),
        }
        let Some((path, mac)) = &entry else {
            continue;
        };
        if c.mapping.is_some() || c.nat == Some(false) || c.server.is_some() {
            c.gateway_mac = nat_cache::gateway_mac().or(mac.clone());
            if let Err(e) = nat_cache::store(path, &c) {
                tracing::debug!(error = %e, path = %path.display(), "cannot write the NAT cache");
            }
        }
    }
}

/// NAT discovery and hop discovery at once; each fact to the coordinator
/// (through [`keep_cache`]) as soon as it is known, and the report for the
/// user at the end. With the cache, last time's facts for this network
/// went first, and what is measured now replaces them.
async fn discover(
    cfg: PeerConfig,
    ip: IpAddr,
    stun: SocketAddr,
    cached: Option<nat_cache::Cached>,
    news: mpsc::UnboundedSender<CacheNews>,
    shared: Arc<Shared>,
    surveyed: oneshot::Sender<()>,
) {
    let mut opts = NatOptions::new(stun);
    opts.source_ip = Some(ip);
    opts.discovery = DiscoveryConfig {
        timing: Timing {
            rto: cfg.rto,
            ..Timing::probe()
        },
        ..DiscoveryConfig::new(stun, rand::random())
    };
    let (measured_tx, mut measured) = mpsc::unbounded_channel::<Fact>();
    let keep = async {
        while let Some(f) = measured.recv().await {
            let _ = news.send(CacheNews::Fact(f));
        }
    };
    let hops_tx = measured_tx.clone();
    let cached_ttl = cached.as_ref().and_then(|c| c.opener_ttl);
    let fresh_ttl = cached.as_ref().and_then(|c| c.fresh_opener_ttl());
    let hops = async move {
        if let Some(t) = cfg.ttl {
            let _ = hops_tx.send(Fact::OpenerTtl { ttl: Some(t) });
            return Some(t);
        }
        if let Some(t) = fresh_ttl {
            // Measured minutes ago on this network: the routers' ICMP
            // budget is better kept for when it matters.
            return Some(t);
        }
        let report = ttl::discover_hops(
            ip,
            stun,
            ttl::defaults::MAX_TTL,
            ttl::defaults::PER_HOP_TIMEOUT,
        )
        .await
        .map_err(|e| tracing::debug!(error = %e, "hop discovery failed"))
        .ok();
        // A gap before the opener TTL (a router rate-limiting its ICMP)
        // makes it uncertain: the cached one, measured whole, stays.
        let certain = report.as_ref().and_then(|r| r.certain_opener_ttl());
        let ttl = match (certain, cached_ttl) {
            (Some(t), _) => Some(t),
            (None, Some(c)) => {
                tracing::debug!(
                    ?report,
                    "hop discovery incomplete: keeping the cached opener TTL"
                );
                return Some(c);
            }
            (None, None) => None,
        };
        let _ = hops_tx.send(Fact::OpenerTtl { ttl });
        ttl
    };
    let survey = async move {
        let r = tokio::join!(crate::nat::survey(opts, measured_tx), hops);
        // The TCP port is measured after UDP's mappings are made, so that
        // its newest mapping is the one before the punch's own.
        let _ = surveyed.send(());
        r
    };
    let ((report, opener_ttl), ()) = tokio::join!(survey, keep);
    match report {
        Ok(report) => {
            if report.mapped.is_none() {
                tracing::warn!(server = %stun, "no answer from the STUN server: it is down or UDP is blocked");
            }
            let _ = shared.events.try_send(PeerEvent::NatMeasured {
                report: Box::new(report),
                opener_ttl,
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "NAT discovery failed; connecting without its facts");
            let _ = news.send(CacheNews::Fact(Fact::Unreachable));
        }
    }
}

impl Driver {
    /// Starts the rendezvous and relay we serve to our peers: the server's
    /// own code, so the same authentication and quotas, open only to the
    /// peers with a session to us.
    async fn serve_relay(&mut self, port: u16) -> Result<(), PeerError> {
        let config = natpunch_proto::stun::server::ServerConfig {
            primary: SocketAddr::new(self.local_ip, port),
            alternate: None,
            software: None,
            rate_limit: natpunch_proto::stun::server::DEFAULT_RATE_LIMIT,
        };
        let server = crate::stun_server::RunningServer::start(config)
            .await
            .map_err(|e| PeerError::Serve(e.to_string()))?;
        server.set_members(Some(Default::default()));
        if let Some(addr) = server.local_addresses().first().copied() {
            self.emit(PeerEvent::ServingRelay { addr });
        }
        self.served = Some(server);
        Ok(())
    }

    /// A session with `peer` began (`+1`) or ended (`-1`): the peers we
    /// serve follow.
    fn membership(&mut self, peer: PeerId, up: bool) {
        let Some(server) = &self.served else {
            return;
        };
        let n = self.members.entry(peer).or_default();
        if up {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
        }
        self.members.retain(|_, n| *n > 0);
        server.set_members(Some(self.members.keys().copied().collect()));
    }

    /// A datagram from the server on UDP: UDP works (with or without TCP).
    fn heard(&mut self, id: SocketId, from: SocketAddr) {
        if id == SocketId(0) && from == self.cfg.server && self.tcp.is_none() {
            self.udp_heard = true;
        }
    }

    fn on_link(&mut self, n: LinkNews) {
        match n {
            LinkNews::Up(link) if !self.udp_heard => {
                tracing::info!(server = %self.cfg.server, "UDP to the server gets no answer: using TCP");
                self.socket.set_stream(Some(link.tx.clone()));
                self.tcp = Some(link.tx);
                self.emit(PeerEvent::ServerOverTcp {
                    server: self.cfg.server,
                });
                self.host.server_over_tcp(Instant::now());
                // UDP discovery has nothing to find here: TCP's now.
                self.measure_tcp();
            }
            // UDP answered meanwhile: the link is not needed.
            LinkNews::Up(_) => {}
            LinkNews::Failed(e) => {
                tracing::debug!(error = %e, "TCP to the server failed");
                self.tcp_at = Some(Instant::now() + crate::server_tcp::RETRY_AFTER);
            }
            LinkNews::Closed => {
                if self.tcp.take().is_some() {
                    tracing::info!(server = %self.cfg.server, "the TCP link to the server closed");
                    self.socket.set_stream(None);
                }
                self.tcp_at = Some(Instant::now() + crate::server_tcp::RETRY_AFTER);
            }
        }
    }

    /// Measures the TCP punching port's mapping (one measurement at a
    /// time; again when the host asks, [`HostEvent::MeasureTcp`]).
    fn measure_tcp(&mut self) {
        let Some(local) = self.punch_port.filter(|_| !self.tcp_measuring) else {
            return;
        };
        self.tcp_measuring = true;
        let server = self.cfg.stun.unwrap_or(self.cfg.server);
        let news = self.punch_news.clone();
        tokio::spawn(async move {
            let facts = match crate::tcp::discover::discover(local, server).await {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::info!(error = %e, "no TCP answer from the server: TCP is not punched");
                    None
                }
            };
            let _ = news.send(crate::tcp::TcpNews::Facts(facts));
        });
    }

    fn on_tcp(&mut self, n: crate::tcp::TcpNews) {
        use crate::tcp::TcpNews;
        let now = Instant::now();
        match n {
            TcpNews::Facts(f) => {
                self.tcp_measuring = false;
                self.host.set_tcp(now, f);
            }
            TcpNews::Up {
                session,
                stream,
                remote,
            } => {
                let id = self.host.stream_id();
                let task = crate::tcp::stream::attach(
                    id,
                    stream,
                    remote,
                    self.socket.clone(),
                    self.divert.clone(),
                );
                self.stream_tasks.insert(id, task);
                self.host.tcp_stream(now, id, remote, session);
            }
            TcpNews::Over { session, reason } => {
                self.tcp_punches.remove(&session);
                self.host.tcp_over(now, session, reason);
            }
        }
    }

    fn on_portmap(&mut self, news: crate::portmap::PortmapNews) {
        use crate::portmap::PortmapNews;
        let now = Instant::now();
        let mapped = match &news {
            PortmapNews::Mapped(m) => Some(*m),
            _ => None,
        };
        // Also after "none to be had": peers stop waiting for one.
        self.host.set_portmap(now, mapped);
        self.emit(PeerEvent::Portmap { news });
    }

    fn emit(&self, e: PeerEvent) {
        if self.shared.events.try_send(e).is_err() {
            tracing::trace!("event dropped: nobody reads events");
        }
    }

    fn connect(&mut self, peer: PeerId, reply: Reply) {
        let id = self.next_request;
        self.next_request += 1;
        self.requests.insert(id, reply);
        self.host.connect(Instant::now(), peer, id);
    }

    /// A QUIC handshake straight to a known address, on the main socket.
    fn dial(&mut self, peer: PeerId, addr: SocketAddr, reply: Reply) {
        let mapped = self.socket.direct_route(Path {
            socket: SocketId(0),
            remote: addr,
        });
        self.spawn_dial(peer, mapped, addr, reply);
    }

    fn spawn_dial(&self, peer: PeerId, mapped: SocketAddr, real: SocketAddr, reply: Reply) {
        let (shared, ep, socket) = (
            self.shared.clone(),
            self.endpoint.clone(),
            self.socket.clone(),
        );
        tokio::spawn(async move {
            let r = shared.dial(ep, socket, mapped, real, peer).await;
            let _ = reply.send(r);
        });
    }

    /// Leaves: unregister, and let the datagrams go out; stops what we
    /// serve.
    async fn close(&mut self) {
        self.host.close(Instant::now());
        self.flush().await;
        if let Some(s) = self.served.take() {
            s.shutdown().await;
        }
        self.close_turn().await;
    }

    /// Releases every TURN allocation, each waiting for its server.
    async fn close_turn(&mut self) {
        let paths = std::mem::take(&mut self.turn);
        let closing: Vec<_> = paths.into_iter().map(|p| tokio::spawn(p.close())).collect();
        for c in closing {
            if let Ok(Some(confirmed)) = c.await {
                self.emit(PeerEvent::TurnReleased { confirmed });
            }
        }
    }

    fn on_turn(&mut self, news: crate::turn::PathNews) {
        use crate::turn::PathNews;
        let now = Instant::now();
        match news {
            PathNews::Allocated {
                id,
                relayed,
                server,
                transport,
                elapsed,
            } => {
                self.turn_ready.retain(|(t, _)| *t != id);
                self.turn_ready.push((id, relayed));
                let pending = self.turn_ready.len() < self.turn.len();
                self.emit(PeerEvent::TurnAllocated {
                    server,
                    transport: transport.as_str(),
                    relayed,
                    elapsed,
                });
                self.host.set_turn(now, self.turn_ready.clone(), pending);
            }
            // Never made: the user asked for this server, and its answer
            // (a wrong password, say) is the reason the run stops.
            PathNews::Failed { error } => self.fatal = Some(PeerError::Turn(error)),
            PathNews::Lost { id, error } => {
                tracing::warn!(error = %error, "TURN allocation lost: making another");
                self.turn_ready.retain(|(t, _)| *t != id);
                self.emit(PeerEvent::TurnLost {
                    error: error.to_string(),
                });
                // Being made again: peers still wait for it.
                self.host.set_turn(now, self.turn_ready.clone(), true);
            }
        }
    }

    async fn flush(&mut self) {
        while let Some(ev) = self.host.poll_event() {
            self.on_host_event(ev);
        }
        while let Some(t) = self.host.poll_transmit() {
            if let Some(tx) = self
                .tcp
                .as_ref()
                .filter(|_| t.socket == SocketId(0) && t.destination == self.cfg.server)
            {
                if tx.try_send(encode_record(&t.payload)).is_err() {
                    tracing::trace!("TCP link queue full: datagram for the server dropped");
                }
                continue;
            }
            if let Err(e) = self
                .socket
                .send_control(t.socket, t.destination, &t.payload, t.ttl)
                .await
            {
                tracing::trace!(to = %t.destination, error = %e, "send failed");
            }
        }
    }

    fn on_host_event(&mut self, ev: HostEvent) {
        let now = Instant::now();
        match ev {
            HostEvent::OpenSocket { id } => {
                let r = bind_udp(SocketAddr::new(self.local_ip, 0), false)
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|s| self.socket.add_socket(id, s));
                if let Err(e) = r {
                    tracing::warn!(error = %e, "cannot open a socket");
                    self.host.socket_failed(now, id);
                }
            }
            HostEvent::CloseSocket { id } => {
                self.socket.remove_socket(id);
                if let Some(t) = self.stream_tasks.remove(&id) {
                    t.abort();
                }
            }
            HostEvent::TcpPunch {
                session,
                plan,
                at,
                until,
            } => {
                if let Some(local) = self.punch_port {
                    let task = tokio::spawn(crate::tcp::punch::run(
                        session,
                        plan,
                        local,
                        at,
                        until,
                        self.punch_news.clone(),
                    ));
                    if let Some(old) = self.tcp_punches.insert(session, task) {
                        old.abort();
                    }
                }
            }
            HostEvent::MeasureTcp => self.measure_tcp(),
            HostEvent::TcpStop { session } => {
                if let Some(t) = self.tcp_punches.remove(&session) {
                    t.abort();
                }
            }
            HostEvent::Learn { remote, path } => {
                let mapped = self.socket.route_for(remote);
                self.socket.learn(mapped, path);
            }
            HostEvent::Route { remote, path } => {
                let mapped = self.socket.route_for(remote);
                self.socket.set_path(mapped, path);
            }
            HostEvent::RelayRoute { remote, relay } => {
                let mapped = self.socket.route_for(remote);
                self.socket.set_relay(mapped, relay);
            }
            HostEvent::UseRelay { remote } => {
                let mapped = self.socket.route_for(remote);
                self.socket.use_relay(mapped);
                self.nudge(remote);
            }
            HostEvent::TurnPermit { ips } => {
                for p in &self.turn {
                    for ip in &ips {
                        p.permit(*ip);
                    }
                }
            }
            HostEvent::DirectFailed { remote, error } => self.emit(PeerEvent::Relayed {
                peer_id: remote.peer,
                error,
            }),
            HostEvent::Forget { remote } => {
                let mapped = self.socket.route_for(remote);
                self.socket.forget(mapped);
            }
            HostEvent::Connected {
                request,
                remote,
                path,
                strategy,
                role,
                elapsed,
                probes_sent,
                bytes_sent,
                reused,
            } => {
                if strategy == Strategy::Turn {
                    self.turn_paths.insert(path);
                }
                self.emit(PeerEvent::Connected {
                    peer_id: remote.peer,
                    strategy,
                    remote: path.remote,
                    role,
                    elapsed,
                    probes_sent,
                    bytes_sent,
                    reused,
                    over_tcp: (strategy == Strategy::Relay && self.tcp.is_some())
                        || self.socket.is_stream(path.socket),
                });
                if self.cfg.once {
                    self.done = true;
                    return;
                }
                if let Some(reply) = request.and_then(|r| self.requests.remove(&r)) {
                    let mapped = self.socket.route_for(remote);
                    self.spawn_dial(remote.peer, mapped, path.remote, reply);
                }
            }
            HostEvent::ConnectFailed {
                request,
                peer,
                error,
            } => {
                self.emit(PeerEvent::Failed {
                    peer_id: peer,
                    error: error.clone(),
                });
                if let Some(reply) = self.requests.remove(&request) {
                    let _ = reply.send(Err(SessionError::Connect(error)));
                }
                if self.cfg.once {
                    self.done = true;
                }
            }
            HostEvent::AttemptFailed { peer, error } => {
                self.emit(PeerEvent::Failed {
                    peer_id: peer,
                    error,
                });
                if self.cfg.once {
                    self.done = true;
                }
            }
            HostEvent::Registered { observed } => {
                self.registered = true;
                self.emit(PeerEvent::Registered {
                    peer_id: self.host.peer_id(),
                    observed,
                })
            }
            HostEvent::ServerLost { server } if !self.registered => {
                self.fatal = Some(PeerError::ServerUnreachable { server });
            }
            HostEvent::ServerLost { server } => self.emit(PeerEvent::ServerLost { server }),
            HostEvent::ServerBack { server } => self.emit(PeerEvent::ServerBack { server }),
            HostEvent::ServerCookie {
                cookie,
                rtt: Some(rtt),
            } => {
                let note = nat_cache::ServerNote::now(self.cfg.server, cookie, rtt);
                let _ = self.cache.send(CacheNews::Server(note));
            }
            HostEvent::ServerRefused { code } => self.emit(PeerEvent::ServerRefused {
                server: self.cfg.server,
                code: code.code(),
            }),
            HostEvent::Displaced => self.emit(PeerEvent::Displaced {
                peer_id: self.host.peer_id(),
            }),
            HostEvent::Incoming { peer } => self.emit(PeerEvent::Incoming { from: peer }),
            HostEvent::Refused { peer, reason } => self.emit(PeerEvent::Refused {
                peer_id: peer,
                reason,
            }),
            HostEvent::Attempt { peer, strategy } => self.emit(PeerEvent::Attempt {
                peer_id: peer,
                strategy,
            }),
            HostEvent::PathChanged {
                remote,
                from,
                to,
                strategy,
                elapsed,
            } => {
                self.nudge(remote);
                if let Via::Turn(p) = to {
                    self.turn_paths.insert(p);
                }
                self.emit(PeerEvent::PathChanged {
                    peer_id: remote.peer,
                    from: from.map(|v| self.view(v)),
                    to: self.view(to),
                    strategy,
                    elapsed,
                });
            }
            HostEvent::PathRepaired {
                remote,
                path,
                strategy,
            } => {
                self.nudge(remote);
                self.emit(PeerEvent::PathRepaired {
                    peer_id: remote.peer,
                    remote: path.remote,
                    local: self.socket.local_of(path.socket),
                    strategy,
                });
            }
            HostEvent::Stalled { remote } => self.emit(PeerEvent::Stalled {
                peer_id: remote.peer,
            }),
            _ => {}
        }
    }

    fn view(&self, via: Via) -> PathView {
        match via {
            Via::Turn(p) => self.turn_view(p),
            Via::Direct(p) if self.turn_paths.contains(&p) => self.turn_view(p),
            Via::Direct(p) => PathView::Direct {
                remote: p.remote,
                local: self.socket.local_of(p.socket),
                tcp: self.socket.is_stream(p.socket),
            },
            Via::Relay(r) => PathView::Relay { server: r.server },
        }
    }

    fn turn_view(&self, p: Path) -> PathView {
        PathView::Turn {
            remote: p.remote,
            relayed: self
                .socket
                .is_turn(p.socket)
                .then(|| self.socket.local_of(p.socket))
                .flatten(),
        }
    }

    /// After a path moved or was repaired, each session on it sends a tiny
    /// datagram at once: the peer's acknowledgement tells quinn's loss
    /// detection what was lost meanwhile, instead of waiting out a
    /// backed-off probe timeout.
    fn nudge(&mut self, remote: RemoteKey) {
        let mapped = self.socket.route_for(remote);
        if let Some(conns) = self.conns.get_mut(&mapped) {
            conns.retain(|c| c.close_reason().is_none());
            for c in conns.iter() {
                let _ = c.send_datagram(bytes::Bytes::from_static(&[0]));
            }
        }
    }

    fn internal(&mut self, msg: Internal) {
        let now = Instant::now();
        match msg {
            Internal::Up { peer, mapped, conn } => {
                self.membership(peer, true);
                if let Some(key) = self.socket.key_of(mapped) {
                    self.host.session_up(now, key);
                }
                let conns = self.conns.entry(mapped).or_default();
                conns.retain(|c| c.close_reason().is_none());
                conns.push(conn);
                let path = match (self.socket.relay_of(mapped), self.socket.path_of(mapped)) {
                    (Some(r), _) if self.socket.on_relay(mapped) => Via::Relay(r),
                    (_, Some(p)) => Via::Direct(p),
                    // A dial to a known address: the route's own.
                    _ => Via::Direct(Path {
                        socket: SocketId(0),
                        remote: mapped,
                    }),
                };
                self.emit(PeerEvent::SessionStarted {
                    peer_id: peer,
                    path: self.view(path),
                });
            }
            Internal::Down { peer, mapped } => {
                self.membership(peer, false);
                if let Some(key) = self.socket.key_of(mapped) {
                    self.host.session_down(now, key);
                }
                let mut end = SessionEnd::Open;
                if let Some(conns) = self.conns.get_mut(&mapped) {
                    if let Some(c) = conns.iter().find(|c| c.close_reason().is_some()) {
                        end = SessionEnd::of_quic(c);
                    }
                    conns.retain(|c| c.close_reason().is_none());
                }
                self.emit(PeerEvent::SessionEnded { peer_id: peer, end });
            }
            Internal::Stalled { mapped } => {
                if let Some(key) = self.socket.key_of(mapped) {
                    self.host.path_stalled(now, key);
                }
            }
            Internal::Quiet => self.host.peer_quiet(now),
        }
    }
}
