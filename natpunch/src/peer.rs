//! The peer driver: one main UDP socket carrying STUN, rendezvous, punch
//! and QUIC traffic (demultiplexed by first byte in
//! [`crate::session::socket`]), plus the extra sockets birthday probing
//! needs. It measures the NAT, registers, and then makes or answers
//! introductions, running the sans-IO punching ladder for each. Once a
//! hole is punched, the session layer's QUIC handshake runs through it, on
//! the winning socket; when a session's path stalls it punches again and
//! points the session at the new address.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use natpunch_proto::identity::{Ephemeral, Identity, PeerId};
use natpunch_proto::nat::{DiscoveryConfig, NatReport};
use natpunch_proto::punch::{
    make_offer, Path, Punch, PunchConfig, PunchEvent, Role, SideView, Strategy,
};
use natpunch_proto::rendezvous::wire::{is_rendezvous, NatSummary, PeerInfo};
use natpunch_proto::rendezvous::{ClientEvent, ErrorCode, Offer, RendezvousClient};
use natpunch_proto::stun::message::{looks_like_stun, Message, TransactionId};
use natpunch_proto::stun::transaction::{Client as StunClient, Outcome, Timing};
use natpunch_proto::{SocketId, Transmit};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use crate::nat::{discover, NatError, NatOptions};
use crate::net::{bind_udp, route_source, NetError};
use crate::session::endpoint::{Shared, UserCommand};
use crate::session::socket::{Datagram, MuxSocket};
use crate::session::{Connection, Internal, SessionError};
use crate::ttl;

/// Settings.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub identity: Identity,
    /// The rendezvous server.
    pub server: SocketAddr,
    /// STUN server for NAT discovery (default: the rendezvous server).
    pub stun: Option<SocketAddr>,
    pub source_ip: Option<IpAddr>,
    pub source_port: Option<u16>,
    /// Limited TTL override (`-t`); default: discovered.
    pub ttl: Option<u8>,
    pub punch: PunchConfig,
    /// Discovery retransmission timeout (shorter in the lab).
    pub rto: Duration,
    /// Punch only: stop after the first punched path (or failure),
    /// without a QUIC session.
    pub once: bool,
}

/// Events for the CLI (and scripts, as JSON).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PeerEvent {
    NatMeasured {
        report: Box<NatReport>,
        opener_ttl: Option<u8>,
    },
    Registered {
        peer_id: PeerId,
        observed: SocketAddr,
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
        elapsed: Duration,
        probes_sent: u64,
        bytes_sent: u64,
    },
    Failed {
        peer_id: Option<PeerId>,
        reason: String,
    },
    PathLost {
        peer_id: PeerId,
    },
    /// A QUIC session is up (authenticated).
    SessionStarted {
        peer_id: PeerId,
        remote: SocketAddr,
    },
    /// A session's path moved to a new address (NAT rebinding, re-punch).
    PathChanged {
        peer_id: PeerId,
        remote: SocketAddr,
    },
    /// A session's path stopped answering; punching again.
    Stalled {
        peer_id: PeerId,
    },
    SessionEnded {
        peer_id: PeerId,
    },
    /// A peer finished the handshake but is not welcome here.
    Refused {
        peer_id: PeerId,
        reason: String,
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
    #[error("no answer from the STUN server {0}: it is down or UDP is blocked")]
    StunUnreachable(SocketAddr),
    #[error("no answer from the rendezvous server {0}")]
    ServerUnreachable(SocketAddr),
    #[error("the rendezvous server refused: {0}")]
    Refused(&'static str),
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// Where the answer to a user's connect goes.
type Reply = oneshot::Sender<Result<Connection, SessionError>>;

/// A live session, as the driver tracks it.
#[derive(Debug, Clone, Copy)]
struct Live {
    socket: usize,
    /// The address quinn knows the peer by.
    remote: SocketAddr,
    /// We started it (and so re-punch it when it stalls).
    client: bool,
}

/// The attempt in progress.
struct Attempt {
    peer: PeerId,
    punch: Punch,
    role: Role,
    /// A re-punch for our stalled session that quinn knows at this address.
    repair: Option<SocketAddr>,
    /// When the attempt began: our Connect (initiator) or the server's
    /// Incoming (responder).
    started: Instant,
}

/// What waits for a fresh mapping before it can go out.
enum AfterFresh {
    Connect {
        target: PeerId,
        session: u64,
        eph: Ephemeral,
        offer: Offer,
    },
    Accept {
        session: u64,
        offer: Offer,
    },
}

struct Driver {
    cfg: PeerConfig,
    shared: Arc<Shared>,
    sockets: Vec<Arc<UdpSocket>>,
    /// The QUIC side of a socket, once it carries (or may carry) sessions.
    quic: Vec<Option<(Arc<MuxSocket>, quinn::Endpoint)>>,
    /// Connects asked for before we were registered.
    queued: VecDeque<(PeerId, Reply)>,
    /// Who waits for the connect in progress.
    waiting: Option<(PeerId, Reply)>,
    /// The connect in progress repairs the session quinn knows at this
    /// address (set by a stall, taken when the punch starts).
    repairing: Option<SocketAddr>,
    /// Live sessions by peer and the address quinn knows it by (one peer
    /// may run several sessions, e.g. two processes with one key).
    sessions: HashMap<(PeerId, SocketAddr), Live>,
    /// Drop the finished punch machine after the next flush.
    retire_attempt: bool,
    /// A re-punch waiting for [`crate::session::REPUNCH_DELAY`].
    repunch: Option<(Instant, PeerId, SocketAddr)>,
    tx: mpsc::Sender<Datagram>,
    client: RendezvousClient,
    stun: StunClient,
    nat: NatSummary,
    local: SocketAddr,
    observed: Option<SocketAddr>,
    /// Where to take fresh mappings: the server's other IP, primary port.
    fresh_target: Option<SocketAddr>,
    fresh_pending: Option<(TransactionId, AfterFresh)>,
    attempt: Option<Attempt>,
    /// Introduction waiting for the punch machine (initiator).
    connect_sent: Option<(u64, Ephemeral, Offer, Option<SocketAddr>)>,
    /// When the current connect began (before the fresh mapping).
    connect_started: Option<Instant>,
    readers: Vec<Option<tokio::task::JoinHandle<()>>>,
    done: bool,
}

/// Runs a peer until its [`crate::session::Endpoint`] is dropped, a
/// fatal error, or (punch-only mode) the first result.
pub(crate) async fn run(
    cfg: PeerConfig,
    shared: Arc<Shared>,
    mut commands: mpsc::Receiver<UserCommand>,
    mut internal: mpsc::Receiver<Internal>,
) -> Result<(), PeerError> {
    let stun = cfg.stun.unwrap_or(cfg.server);
    let ip = match cfg.source_ip {
        Some(ip) => ip,
        None => route_source(cfg.server)?,
    };
    // Measure the NAT and the hops to it, at once.
    let mut opts = NatOptions::new(stun);
    opts.source_ip = Some(ip);
    opts.discovery = DiscoveryConfig {
        timing: Timing {
            rto: cfg.rto,
            ..Timing::probe()
        },
        ..DiscoveryConfig::new(stun, rand::random())
    };
    let hops = ttl::discover_hops(
        ip,
        stun,
        ttl::defaults::MAX_TTL,
        ttl::defaults::PER_HOP_TIMEOUT,
    );
    let (report, hops) = tokio::join!(discover(opts), hops);
    let report = report?;
    if report.mapped.is_none() {
        return Err(PeerError::StunUnreachable(stun));
    }
    let opener_ttl = cfg.ttl.or_else(|| hops.ok().and_then(|h| h.opener_ttl));
    let _ = shared.events.try_send(PeerEvent::NatMeasured {
        report: Box::new(report.clone()),
        opener_ttl,
    });
    let nat = NatSummary::from_report(&report, opener_ttl);

    let main = bind_udp(SocketAddr::new(ip, cfg.source_port.unwrap_or(0)), false)?;
    let local = main.local_addr().map_err(|source| NetError::Bind {
        addr: SocketAddr::new(ip, 0),
        source,
    })?;
    // Control datagrams (≤ MAX_CONTROL bytes each) waiting for the driver:
    // a birthday burst is 256 sockets × a few probes.
    let (tx, mut rx) = mpsc::channel::<Datagram>(4096);
    let mut d = Driver {
        client: RendezvousClient::new(
            cfg.identity.clone(),
            cfg.server,
            SocketId(0),
            PeerInfo {
                nat,
                candidates: vec![local],
            },
        ),
        fresh_target: report
            .other_address
            .map(|o| SocketAddr::new(o.ip(), stun.port())),
        cfg,
        shared,
        sockets: Vec::new(),
        quic: Vec::new(),
        queued: VecDeque::new(),
        waiting: None,
        repairing: None,
        sessions: HashMap::new(),
        retire_attempt: false,
        repunch: None,
        tx,
        stun: StunClient::new(),
        nat,
        local,
        observed: None,
        fresh_pending: None,
        attempt: None,
        connect_sent: None,
        connect_started: None,
        readers: Vec::new(),
        done: false,
    };
    d.add_socket(main);
    // The main socket carries QUIC from the start (unless punch-only).
    if !d.cfg.once {
        d.ensure_quic(0).map_err(PeerError::Session)?;
    }
    d.client.start(Instant::now());
    loop {
        d.flush().await;
        d.drain_events().await?;
        d.flush().await;
        if d.retire_attempt {
            d.retire_attempt = false;
            d.attempt = None;
        }
        if d.done {
            return Ok(());
        }
        let deadline = [
            d.client.poll_timeout(),
            d.stun.poll_timeout(),
            d.attempt.as_ref().and_then(|a| a.punch.poll_timeout()),
            d.repunch.map(|r| r.0),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            got = rx.recv() => {
                let Some((i, from, data)) = got else { return Ok(()) };
                d.input(Instant::now(), i, from, &data);
                // Drain what else is already queued before re-arming.
                while let Ok((i, from, data)) = rx.try_recv() {
                    d.input(Instant::now(), i, from, &data);
                }
            }
            cmd = commands.recv() => match cmd {
                Some(UserCommand::Connect { peer, reply }) => d.want_connect(Instant::now(), peer, reply),
                Some(UserCommand::Dial { peer, addr, reply }) => d.dial(peer, addr, reply),
                // The endpoint is gone: nobody can use what we would do.
                None => return Ok(()),
            },
            Some(msg) = internal.recv() => d.internal(msg),
            _ = tokio::time::sleep_until(deadline.into()) => {
                let now = Instant::now();
                d.client.handle_timeout(now);
                d.stun.handle_timeout(now);
                if let Some(a) = d.attempt.as_mut() {
                    a.punch.handle_timeout(now);
                }
                if let Some((_, peer, remote)) = d.repunch.filter(|r| now >= r.0) {
                    d.repunch = None;
                    d.connect(now, peer, None, Some(remote));
                }
            }
        }
    }
}

impl Driver {
    fn add_socket(&mut self, s: UdpSocket) {
        let s = Arc::new(s);
        let i = self.sockets.len();
        self.sockets.push(s.clone());
        self.quic.push(None);
        if i == 0 && !self.cfg.once {
            // quinn reads the main socket and hands us what is not QUIC.
            self.readers.push(None);
            return;
        }
        let tx = self.tx.clone();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                match s.recv_from(&mut buf).await {
                    Ok((n, from)) => {
                        if tx.send((i, from, buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::trace!(socket = i, error = %e, "receive error");
                        if tx.is_closed() {
                            return;
                        }
                    }
                }
            }
        });
        self.readers.push(Some(reader));
    }

    /// Puts QUIC on socket `i` (the main one, or a birthday winner).
    fn ensure_quic(&mut self, i: usize) -> Result<(Arc<MuxSocket>, quinn::Endpoint), SessionError> {
        if let Some(q) = self.quic.get(i).and_then(|q| q.clone()) {
            return Ok(q);
        }
        let Some(sock) = self.sockets.get(i).cloned() else {
            return Err(SessionError::Stopped(format!("no socket {i}")));
        };
        if let Some(r) = self.readers.get_mut(i).and_then(Option::take) {
            r.abort();
        }
        let mux = Arc::new(MuxSocket::new(sock, i, self.tx.clone()).map_err(SessionError::Socket)?);
        let ep = self.shared.quic_endpoint(mux.clone(), i)?;
        self.quic[i] = Some((mux.clone(), ep.clone()));
        Ok((mux, ep))
    }

    /// A connect from the user.
    fn want_connect(&mut self, now: Instant, peer: PeerId, reply: Reply) {
        self.connect(now, peer, Some(reply), None);
    }

    /// Starts an introduction to `peer`: for a user (`reply`), or to
    /// repair the session quinn knows at `repair`.
    fn connect(
        &mut self,
        now: Instant,
        peer: PeerId,
        reply: Option<Reply>,
        repair: Option<SocketAddr>,
    ) {
        if self.observed.is_none() || self.connect_sent.is_some() || self.punching() {
            match reply {
                Some(r) => self.queued.push_back((peer, r)),
                // A re-punch that cannot start now is retried on the next stall.
                None => tracing::debug!(%peer, "busy; re-punch skipped"),
            }
            return;
        }
        if let Some(r) = reply {
            if let Some((p, old)) = self.waiting.replace((peer, r)) {
                let _ = old.send(Err(SessionError::Punch {
                    peer: p,
                    reason: "superseded by another connect".into(),
                }));
            }
        }
        self.repairing = repair;
        self.connect_started = Some(now);
        let session: u64 = rand::random();
        let eph = Ephemeral::from_secret(rand::random());
        let offer = make_offer(&self.cfg.identity, session, Role::Initiator, &eph);
        self.with_fresh(
            now,
            AfterFresh::Connect {
                target: peer,
                session,
                eph,
                offer,
            },
        );
    }

    /// A QUIC handshake straight to a known address, on the main socket.
    fn dial(&mut self, peer: PeerId, addr: SocketAddr, reply: Reply) {
        match self.ensure_quic(0) {
            Ok((mux, ep)) => {
                let shared = self.shared.clone();
                tokio::spawn(async move {
                    let _ = reply.send(shared.dial(ep, mux, 0, addr, peer).await);
                });
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// The next queued connect, once the previous one is over.
    fn next_connect(&mut self, now: Instant) {
        if self.waiting.is_none() && self.connect_sent.is_none() {
            if let Some((peer, reply)) = self.queued.pop_front() {
                self.want_connect(now, peer, reply);
            }
        }
    }

    /// A fresh mapping or a punch is under way: no new attempt now.
    fn punching(&self) -> bool {
        self.fresh_pending.is_some()
            || self
                .attempt
                .as_ref()
                .is_some_and(|a| a.punch.path().is_none())
    }

    /// Whoever waits for the connect to `peer`, if anyone.
    fn take_waiting(&mut self, peer: PeerId) -> Option<Reply> {
        if self.waiting.as_ref().is_some_and(|(p, _)| *p == peer) {
            self.waiting.take().map(|(_, r)| r)
        } else {
            None
        }
    }

    fn internal(&mut self, msg: Internal) {
        let now = Instant::now();
        match msg {
            Internal::Up {
                peer,
                socket,
                remote,
                client,
            } => {
                self.sessions.insert(
                    (peer, remote),
                    Live {
                        socket,
                        remote,
                        client,
                    },
                );
                // The punch machine's work is done; QUIC keeps the path. (A
                // responder may not have seen the Confirm; its peer's
                // handshake arriving says the same.)
                if self.attempt.as_ref().is_some_and(|a| {
                    a.peer == peer
                        && match a.punch.path() {
                            Some(p) => p.remote == remote,
                            None => a.role == Role::Responder,
                        }
                }) {
                    self.attempt = None;
                }
                self.emit(PeerEvent::SessionStarted {
                    peer_id: peer,
                    remote,
                });
            }
            Internal::Moved { peer, from, remote } => {
                if let Some(mut l) = self.sessions.remove(&(peer, from)) {
                    l.remote = remote;
                    self.sessions.insert((peer, remote), l);
                }
                self.emit(PeerEvent::PathChanged {
                    peer_id: peer,
                    remote,
                });
            }
            Internal::Down { peer, remote } => {
                if self.sessions.remove(&(peer, remote)).is_some() {
                    self.emit(PeerEvent::SessionEnded { peer_id: peer });
                }
            }
            Internal::Quiet => self.client.refresh(now),
            Internal::Stalled { peer, remote } => {
                let Some(live) = self.sessions.get(&(peer, remote)).copied() else {
                    return;
                };
                self.emit(PeerEvent::Stalled { peer_id: peer });
                // Be reachable at our current address for a re-punch.
                self.client.refresh(now);
                if live.client {
                    // We re-punch: a Connect from a new address makes the
                    // server re-check it (BadCookie) and introduces us
                    // afresh; after a pause that lets the peer refresh its
                    // own registration.
                    self.repunch = Some((now + crate::session::REPUNCH_DELAY, peer, remote));
                }
            }
        }
        self.next_connect(now);
    }

    fn input(&mut self, now: Instant, i: usize, from: SocketAddr, data: &[u8]) {
        if is_rendezvous(data) {
            self.client.handle_input(now, from, data);
        } else if looks_like_stun(data) {
            self.stun.handle_input(now, SocketId(i), from, data);
        } else if let Some(a) = self.attempt.as_mut() {
            if !a.punch.handle_input(now, SocketId(i), from, data) {
                tracing::trace!(%from, "unknown datagram dropped");
            }
        }
    }

    async fn send(&self, t: Transmit) {
        let Some(s) = self.sockets.get(t.socket.0) else {
            return;
        };
        let sent = match t.ttl {
            // Per packet: the socket's TTL, which QUIC shares, stays put.
            Some(ttl_val) => {
                s.async_io(tokio::io::Interest::WRITABLE, || {
                    ttl::send_with_ttl(s.as_ref(), &t.payload, t.destination, ttl_val)
                })
                .await
            }
            None => s.send_to(&t.payload, t.destination).await,
        };
        if let Err(e) = sent {
            tracing::trace!(to = %t.destination, error = %e, "send failed");
        }
    }

    async fn flush(&mut self) {
        let mut out = Vec::new();
        while let Some(t) = self.client.poll_transmit() {
            out.push(t);
        }
        while let Some(t) = self.stun.poll_transmit() {
            out.push(t);
        }
        if let Some(a) = self.attempt.as_mut() {
            while let Some(t) = a.punch.poll_transmit() {
                out.push(t);
            }
        }
        for t in out {
            self.send(t).await;
        }
    }

    fn me(&self, fresh: Option<SocketAddr>) -> SideView {
        SideView {
            nat: self.nat,
            observed: self.observed.unwrap_or(self.local),
            fresh,
            candidates: vec![self.local],
        }
    }

    /// Starts a fresh-mapping Binding, or runs `then` at once if not needed.
    fn with_fresh(&mut self, now: Instant, then: AfterFresh) {
        // A cone's next mapping is the one it has; only others need a fresh one.
        match self.fresh_target.filter(|_| !self.me(None).easy()) {
            Some(dest) => {
                let req = Message::binding_request(TransactionId::new(rand::random()));
                let tid = self
                    .stun
                    .start(now, SocketId(0), dest, &req, Timing::probe(), false);
                self.fresh_pending = Some((tid, then));
            }
            None => self.after_fresh(now, then, None),
        }
    }

    fn after_fresh(&mut self, now: Instant, then: AfterFresh, fresh: Option<SocketAddr>) {
        match then {
            AfterFresh::Connect {
                target,
                session,
                eph,
                offer,
            } => {
                self.client
                    .connect(now, target, session, offer.clone(), fresh);
                self.connect_sent = Some((session, eph, offer, fresh));
            }
            AfterFresh::Accept { session, offer } => self.client.accept(now, session, offer, fresh),
        }
    }

    fn emit(&self, e: PeerEvent) {
        if self.shared.events.try_send(e).is_err() {
            tracing::trace!("event dropped: nobody reads events");
        }
    }

    /// The connect in progress failed before a path existed.
    fn fail_connect(&mut self, reason: String) {
        if let Some((peer, reply)) = self.waiting.take() {
            let _ = reply.send(Err(SessionError::Punch { peer, reason }));
        }
    }

    async fn drain_events(&mut self) -> Result<(), PeerError> {
        let now = Instant::now();
        while let Some(ev) = self.stun.poll_event() {
            if let Some((tid, ..)) = &self.fresh_pending {
                if *tid == ev.transaction {
                    let fresh = match &ev.outcome {
                        Outcome::Success { response, .. } => response.mapped_address(),
                        _ => None,
                    };
                    if let Some((_, then)) = self.fresh_pending.take() {
                        self.after_fresh(now, then, fresh);
                    }
                }
            }
        }
        while let Some(ev) = self.client.poll_event() {
            match ev {
                ClientEvent::Registered { observed } => {
                    let first = self.observed.is_none();
                    self.observed = Some(observed);
                    if first {
                        self.emit(PeerEvent::Registered {
                            peer_id: self.client.peer_id(),
                            observed,
                        });
                        self.next_connect(now);
                    }
                }
                ClientEvent::Peer {
                    session,
                    peer,
                    observed,
                    info,
                    start_at,
                } => {
                    // Only the answer to our introduction in progress: a late
                    // duplicate for an earlier one must not consume it.
                    if self.connect_sent.as_ref().is_none_or(|c| c.0 != session) {
                        continue;
                    }
                    let Some((_, eph, offer, fresh)) = self.connect_sent.take() else {
                        continue;
                    };
                    let view = SideView {
                        nat: info.nat,
                        observed,
                        fresh: None,
                        candidates: info.candidates,
                    };
                    let punch = Punch::new(
                        self.punch_cfg(),
                        Role::Initiator,
                        session,
                        self.client.peer_id(),
                        peer,
                        eph,
                        &offer,
                        self.me(fresh),
                        view,
                        now,
                        start_at,
                    );
                    let started = self.connect_started.take().unwrap_or(now);
                    self.start_attempt(peer, punch, Role::Initiator, started);
                }
                ClientEvent::Incoming {
                    session,
                    from,
                    observed,
                    info,
                    offer,
                    fresh,
                    start_at,
                } => {
                    // Policy first: nobody we would refuse gets our probes,
                    // our sockets or our time.
                    let refusal = if self.shared.server.is_none() {
                        Some(format!(
                            "{from} asked to connect, but this peer does not accept sessions"
                        ))
                    } else if self
                        .shared
                        .allow
                        .as_ref()
                        .is_some_and(|a| !a.contains(&from))
                    {
                        Some(format!(
                            "{from} is not allowed by {} (--allow)",
                            self.client.peer_id()
                        ))
                    } else {
                        None
                    };
                    if let Some(reason) = refusal {
                        self.client.decline(now, session);
                        self.emit(PeerEvent::Refused {
                            peer_id: from,
                            reason,
                        });
                        continue;
                    }
                    if self.punching() {
                        tracing::debug!("busy with another attempt; ignoring an introduction");
                        continue;
                    }
                    self.emit(PeerEvent::Incoming { from });
                    let eph = Ephemeral::from_secret(rand::random());
                    let my_offer = make_offer(&self.cfg.identity, session, Role::Responder, &eph);
                    let view = SideView {
                        nat: info.nat,
                        observed,
                        fresh,
                        candidates: info.candidates,
                    };
                    let mut punch = Punch::new(
                        self.punch_cfg(),
                        Role::Responder,
                        session,
                        self.client.peer_id(),
                        from,
                        eph,
                        &my_offer,
                        self.me(None),
                        view,
                        now,
                        start_at,
                    );
                    punch.set_peer_offer(&offer.ephemeral, &offer.sig);
                    self.start_attempt(from, punch, Role::Responder, now);
                    self.with_fresh(
                        now,
                        AfterFresh::Accept {
                            session,
                            offer: my_offer,
                        },
                    );
                }
                ClientEvent::Accepted {
                    session,
                    offer,
                    fresh,
                    start_at,
                } => {
                    if let Some(a) = self
                        .attempt
                        .as_mut()
                        .filter(|a| a.punch.session() == session)
                    {
                        a.punch.set_peer_offer(&offer.ephemeral, &offer.sig);
                        a.punch.set_peer_fresh(now, fresh, start_at);
                    }
                }
                ClientEvent::Go { session, start_at } => {
                    if let Some(a) = self
                        .attempt
                        .as_mut()
                        .filter(|a| a.punch.session() == session)
                    {
                        a.punch.set_peer_fresh(now, None, start_at);
                    }
                }
                ClientEvent::Error { code, session } => {
                    let peer = self.attempt.as_ref().map(|a| a.peer);
                    if matches!(code, ErrorCode::UnsupportedVersion) {
                        return Err(PeerError::Refused(code.describe()));
                    }
                    // Our introduction: still waiting for the server, or
                    // already punching (a Decline can follow the Peer).
                    let punching = self.attempt.as_ref().is_some_and(|a| {
                        a.role == Role::Initiator
                            && Some(a.punch.session()) == session
                            && a.punch.path().is_none()
                    });
                    let ours = session.is_some()
                        && (punching || session == self.connect_sent.as_ref().map(|c| c.0));
                    if session.is_some() && !ours {
                        // About another session: the acknowledgement of our
                        // own Decline, or a late answer. Nothing to do here.
                        tracing::debug!(?code, ?session, "error for another session ignored");
                        continue;
                    }
                    if session.is_some() || !self.client.is_registered() {
                        // Our own introduction was refused: the connect is over.
                        let peer = peer.or(self.waiting.as_ref().map(|w| w.0));
                        if ours {
                            self.connect_sent = None;
                            if punching {
                                self.attempt = None;
                            }
                            self.fail_connect(code.describe().to_string());
                        }
                        self.emit(PeerEvent::Failed {
                            peer_id: peer,
                            reason: code.describe().to_string(),
                        });
                        if self.cfg.once {
                            self.done = true;
                        }
                    }
                }
                ClientEvent::ServerUnreachable { server } => {
                    if self.observed.is_none() || (self.cfg.once && self.connect_sent.is_some()) {
                        return Err(PeerError::ServerUnreachable(server));
                    }
                    if self.connect_sent.take().is_some() {
                        self.fail_connect(PeerError::ServerUnreachable(server).to_string());
                    }
                }
            }
        }
        self.drain_punch();
        self.next_connect(now);
        Ok(())
    }

    fn punch_cfg(&self) -> PunchConfig {
        let mut c = self.cfg.punch.clone();
        c.plan.seed = rand::random();
        c.plan.ttl = self.cfg.ttl.or(self.nat.opener_ttl);
        c
    }

    fn start_attempt(&mut self, peer: PeerId, punch: Punch, role: Role, started: Instant) {
        let need = punch.sockets_needed();
        while self.sockets.len() < need {
            match bind_udp(SocketAddr::new(self.local.ip(), 0), false) {
                Ok(s) => self.add_socket(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open a birthday socket");
                    break;
                }
            }
        }
        let repair = match role {
            Role::Initiator => self.repairing.take(),
            Role::Responder => None,
        };
        self.attempt = Some(Attempt {
            peer,
            punch,
            role,
            repair,
            started,
        });
    }

    fn drain_punch(&mut self) {
        let Some(a) = self.attempt.as_mut() else {
            return;
        };
        let peer = a.peer;
        let mut evs = Vec::new();
        while let Some(ev) = a.punch.poll_event() {
            evs.push(ev);
        }
        let role = a.role;
        let started = a.started;
        let repair = a.repair;
        for ev in evs {
            match ev {
                PunchEvent::Attempt { strategy } => self.emit(PeerEvent::Attempt {
                    peer_id: peer,
                    strategy,
                }),
                PunchEvent::Connected {
                    path,
                    strategy,
                    probes_sent,
                    bytes_sent,
                    ..
                } => {
                    // From the start of the whole attempt, not of punching.
                    let elapsed = started.elapsed();
                    self.connect_sent = None;
                    self.close_spare_sockets(path);
                    self.emit(PeerEvent::Connected {
                        peer_id: peer,
                        strategy,
                        remote: path.remote,
                        elapsed,
                        probes_sent,
                        bytes_sent,
                    });
                    if self.cfg.once {
                        self.done = true;
                        continue;
                    }
                    self.on_punched(peer, path, role, repair);
                }
                PunchEvent::Failed { reason } => {
                    self.emit(PeerEvent::Failed {
                        peer_id: Some(peer),
                        reason: reason.clone(),
                    });
                    self.attempt = None;
                    self.connect_sent = None;
                    if role == Role::Initiator {
                        self.fail_connect(reason);
                    }
                    // A failed punch-only connect ends the run; a listener
                    // keeps waiting for the next introduction unless --once.
                    if self.cfg.once {
                        self.done = true;
                    }
                    return;
                }
                PunchEvent::PathLost { .. } => {
                    self.emit(PeerEvent::PathLost { peer_id: peer });
                    self.attempt = None;
                    return;
                }
            }
        }
    }

    /// A hole is punched: start the QUIC session through it, or point an
    /// existing session at it.
    fn on_punched(&mut self, peer: PeerId, path: Path, role: Role, repair: Option<SocketAddr>) {
        if let Some(remote) = repair {
            // Our stalled session: same socket, the peer at a new address.
            // (A QUIC server follows its client's migration by itself; a
            // client needs the socket layer to re-point the address.)
            match self.sessions.get(&(peer, remote)).copied() {
                Some(live) if live.socket == path.socket.0 => {
                    if let Some((mux, _)) = self.quic.get(live.socket).and_then(|q| q.as_ref()) {
                        mux.set_alias(remote, path.remote);
                    }
                    self.emit(PeerEvent::PathChanged {
                        peer_id: peer,
                        remote: path.remote,
                    });
                }
                Some(_) => {
                    tracing::warn!(%peer, "re-punch found a path on another socket; session keeps waiting")
                }
                None => tracing::debug!(%peer, "the session ended before its re-punch"),
            }
            self.retire_attempt = true;
            return;
        }
        if role == Role::Responder && self.sessions.keys().any(|(p, _)| *p == peer) {
            // Likely the peer repairing its session with us: QUIC follows
            // the peer's new address when it arrives. A new session, if it
            // is one, comes through the accept loop all the same.
            self.retire_attempt = true;
        }
        let quic = self.ensure_quic(path.socket.0);
        if let Err(e) = &quic {
            tracing::warn!(%peer, error = %e, "cannot start QUIC on the punched socket");
        }
        // The responder's QUIC handshake arrives at its accept loop.
        let reply = match role {
            Role::Initiator => self.take_waiting(peer),
            Role::Responder => None,
        };
        let Some(reply) = reply else {
            return;
        };
        let (mux, ep) = match quic {
            Ok(q) => q,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let r = shared.dial(ep, mux, path.socket.0, path.remote, peer).await;
            let _ = reply.send(r);
        });
    }

    /// Birthday sockets other than the winner are closed at once.
    fn close_spare_sockets(&mut self, path: Path) {
        if self.sockets.len() <= 1 {
            return;
        }
        let keep = path.socket.0;
        tracing::debug!(
            closed = self.sockets.len() - 1,
            kept = keep,
            "closing unused probe sockets"
        );
        // Stop their readers (which hold the last references) and keep the
        // indices stable by pointing the slots at the main socket.
        for i in 1..self.sockets.len() {
            if i != keep {
                if let Some(r) = self.readers[i].take() {
                    r.abort();
                }
                self.sockets[i] = self.sockets[0].clone();
            }
        }
    }
}
