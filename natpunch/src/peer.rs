//! The peer driver: one main UDP socket carrying STUN, rendezvous and punch
//! traffic (demultiplexed by first byte), plus the extra sockets birthday
//! probing needs. It measures the NAT, registers, and then listens for or
//! makes introductions, running the sans-IO punching ladder for each.

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
use tokio::sync::mpsc;

use crate::nat::{discover, NatError, NatOptions};
use crate::net::{bind_udp, route_source, NetError};
use crate::ttl;

/// What the peer should do once registered.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Wait for introductions.
    Listen,
    /// Connect to this peer.
    Connect(PeerId),
}

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
    /// Stop after the first connection (or failure).
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
}

type Datagram = (usize, SocketAddr, Vec<u8>);

/// The attempt in progress.
struct Attempt {
    peer: PeerId,
    punch: Punch,
    role: Role,
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
    sockets: Vec<Arc<UdpSocket>>,
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
    readers: Vec<tokio::task::JoinHandle<()>>,
    events: mpsc::Sender<PeerEvent>,
    done: bool,
}

/// Runs a peer until `once` is satisfied or the event receiver is dropped.
pub async fn run(
    cfg: PeerConfig,
    mode: Mode,
    events: mpsc::Sender<PeerEvent>,
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
    let _ = events
        .send(PeerEvent::NatMeasured {
            report: Box::new(report.clone()),
            opener_ttl,
        })
        .await;
    let nat = NatSummary::from_report(&report, opener_ttl);

    let main = bind_udp(SocketAddr::new(ip, cfg.source_port.unwrap_or(0)), false)?;
    let local = main.local_addr().map_err(|source| NetError::Bind {
        addr: SocketAddr::new(ip, 0),
        source,
    })?;
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
        sockets: Vec::new(),
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
        events,
        done: false,
    };
    d.add_socket(main);
    d.client.start(Instant::now());
    let mut target = match mode {
        Mode::Connect(t) => Some(t),
        Mode::Listen => None,
    };
    loop {
        d.flush().await;
        d.drain_events(&mut target).await?;
        d.flush().await;
        if d.done || d.events.is_closed() {
            return Ok(());
        }
        let deadline = [
            d.client.poll_timeout(),
            d.stun.poll_timeout(),
            d.attempt.as_ref().and_then(|a| a.punch.poll_timeout()),
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
            _ = tokio::time::sleep_until(deadline.into()) => {
                let now = Instant::now();
                d.client.handle_timeout(now);
                d.stun.handle_timeout(now);
                if let Some(a) = d.attempt.as_mut() {
                    a.punch.handle_timeout(now);
                }
            }
        }
    }
}

impl Driver {
    fn add_socket(&mut self, s: UdpSocket) {
        let s = Arc::new(s);
        let i = self.sockets.len();
        let (sock, tx) = (s.clone(), self.tx.clone());
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                match sock.recv_from(&mut buf).await {
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
        self.readers.push(reader);
        self.sockets.push(s);
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
        if let Some(ttl_val) = t.ttl {
            let _ = ttl::set_ttl(s.as_ref(), u32::from(ttl_val));
        }
        if let Err(e) = s.send_to(&t.payload, t.destination).await {
            tracing::trace!(to = %t.destination, error = %e, "send failed");
        }
        if t.ttl.is_some() {
            // Back to the default (64 on Linux) for what follows.
            let _ = ttl::set_ttl(s.as_ref(), 64);
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

    async fn emit(&self, e: PeerEvent) {
        let _ = self.events.send(e).await;
    }

    async fn drain_events(&mut self, target: &mut Option<PeerId>) -> Result<(), PeerError> {
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
                        })
                        .await;
                        if let Some(t) = target.take() {
                            self.connect_started = Some(now);
                            let session: u64 = rand::random();
                            let eph = Ephemeral::from_secret(rand::random());
                            let offer =
                                make_offer(&self.cfg.identity, session, Role::Initiator, &eph);
                            self.with_fresh(
                                now,
                                AfterFresh::Connect {
                                    target: t,
                                    session,
                                    eph,
                                    offer,
                                },
                            );
                        }
                    }
                }
                ClientEvent::Peer {
                    session,
                    peer,
                    observed,
                    info,
                    start_at,
                } => {
                    let Some((s, eph, offer, fresh)) = self.connect_sent.take() else {
                        continue;
                    };
                    if s != session {
                        continue;
                    }
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
                    self.start_attempt(peer, punch, Role::Initiator, started)
                        .await;
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
                    if self
                        .attempt
                        .as_ref()
                        .is_some_and(|a| a.punch.path().is_none())
                    {
                        tracing::debug!("busy with another attempt; ignoring an introduction");
                        continue;
                    }
                    self.emit(PeerEvent::Incoming { from }).await;
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
                    self.start_attempt(from, punch, Role::Responder, now).await;
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
                    if session.is_some() || !self.client.is_registered() {
                        // Our own introduction was refused: the connect is over.
                        if session.is_some() && session == self.connect_sent.as_ref().map(|c| c.0) {
                            self.connect_sent = None;
                            self.done = true;
                        }
                        self.emit(PeerEvent::Failed {
                            peer_id: peer,
                            reason: code.describe().to_string(),
                        })
                        .await;
                        if self.cfg.once {
                            self.done = true;
                        }
                    }
                }
                ClientEvent::ServerUnreachable { server } => {
                    if self.observed.is_none() || self.connect_sent.is_some() {
                        return Err(PeerError::ServerUnreachable(server));
                    }
                }
            }
        }
        self.drain_punch().await;
        Ok(())
    }

    fn punch_cfg(&self) -> PunchConfig {
        let mut c = self.cfg.punch.clone();
        c.plan.seed = rand::random();
        c.plan.ttl = self.cfg.ttl.or(self.nat.opener_ttl);
        c
    }

    async fn start_attempt(&mut self, peer: PeerId, punch: Punch, role: Role, started: Instant) {
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
        self.attempt = Some(Attempt {
            peer,
            punch,
            role,
            started,
        });
    }

    async fn drain_punch(&mut self) {
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
        for ev in evs {
            match ev {
                PunchEvent::Attempt { strategy } => {
                    self.emit(PeerEvent::Attempt {
                        peer_id: peer,
                        strategy,
                    })
                    .await
                }
                PunchEvent::Connected {
                    path,
                    strategy,
                    probes_sent,
                    bytes_sent,
                    ..
                } => {
                    // From the start of the whole attempt, not of punching.
                    let elapsed = started.elapsed();
                    self.close_spare_sockets(path);
                    self.emit(PeerEvent::Connected {
                        peer_id: peer,
                        strategy,
                        remote: path.remote,
                        elapsed,
                        probes_sent,
                        bytes_sent,
                    })
                    .await;
                    if self.cfg.once {
                        self.done = true;
                    }
                }
                PunchEvent::Failed { reason } => {
                    self.emit(PeerEvent::Failed {
                        peer_id: Some(peer),
                        reason,
                    })
                    .await;
                    self.attempt = None;
                    // A failed connect ends the run; a listener keeps
                    // waiting for the next introduction unless --once.
                    if self.cfg.once || role == Role::Initiator {
                        self.done = true;
                    }
                    return;
                }
                PunchEvent::PathLost { .. } => {
                    self.emit(PeerEvent::PathLost { peer_id: peer }).await;
                    self.attempt = None;
                    return;
                }
            }
        }
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
                self.readers[i].abort();
                self.sockets[i] = self.sockets[0].clone();
            }
        }
    }
}
