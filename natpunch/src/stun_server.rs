//! Tokio driver for the server's sans-IO machines: STUN on UDP (one to
//! four sockets: RFC 5780 needs 2 IPs × 2 ports) and on TCP with RFC 8489
//! §6.2.2 framing; the rendezvous protocol (0x2A) and the relay (0x2C) on
//! the same UDP sockets, and all three over TCP on the same port for
//! networks that drop UDP ([`natpunch_proto::relay::stream`] records).
//!
//! A peer on TCP is, to the machines, its TCP address seen from a *tag*
//! local address (the listener's, as an IPv6 address with a flow label no
//! real socket has); what they send "from" a tag goes down that peer's
//! connection, through a bounded queue that drops when full.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

use natpunch_proto::relay::stream::{encode_record, Decoder, Record};
use natpunch_proto::relay::{is_relay, RelayConfig, RelayStats};
use natpunch_proto::rendezvous::server::{Limits, Outgoing, RendezvousStats};
use natpunch_proto::rendezvous::wire::is_rendezvous;
use natpunch_proto::rendezvous::RendezvousServer;
use natpunch_proto::stun::server::{Server, ServerConfig, ServerStats, Transport};
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use crate::batch::{RecvBatch, SendBatch};
use crate::net::{bind_tcp_listener, bind_udp, NetError};

/// Concurrent TCP connections at most. A plain STUN client costs a task
/// and a few KiB; a natpunch peer up to its queue ([`TCP_QUEUE`] records,
/// ~0.75 MB) and the kernel's send buffer, so 1024 bound memory to under
/// 1 GB in the worst case (typically far less: queues stay near empty).
pub const MAX_TCP_CONNECTIONS: usize = 1024;
/// A TCP client that sends nothing for this long is dropped. RFC 8489
/// §6.2.2 lets servers close idle connections; 10 s covers a slow client's
/// request and answer several times over.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A natpunch peer on TCP (it sent a record) is dropped after this long
/// without a byte: its heartbeats (3 s) or relay keepalives (15 s) keep it.
pub const TCP_PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections from one IP at most (a carrier NAT's many users share one,
/// and each peer needs one; a flood from one address cannot take all).
pub const MAX_TCP_PER_IP: usize = 64;
/// Datagrams waiting for one TCP peer's connection; beyond, they are
/// dropped (QUIC sees loss and slows down) rather than queued without
/// bound behind a slow reader. 512 full-size packets are 0.7 MB: 60 ms of
/// a 100 Mbit/s path (iroh-relay keeps 512 per client, DERP 32).
pub const TCP_QUEUE: usize = 512;
/// Batches read from one socket before turning to the others, so one busy
/// socket cannot starve the rest (8 x 32 datagrams).
const UDP_ROUNDS: usize = 8;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("--alt needs explicit IP addresses on both sides, not {0}")]
    WildcardWithAlt(SocketAddr),
    #[error("--alt {alt} must differ from --listen {primary} in both IP and port")]
    AltNotDistinct {
        primary: SocketAddr,
        alt: SocketAddr,
    },
}

/// The flow label that marks a tag address (no real socket has one).
const TCP_TAG_FLOW: u32 = 0x0000_77C9;

/// The tag standing for TCP peers of the listener at `local`.
fn tcp_tag(local: SocketAddr) -> SocketAddr {
    let ip = match local.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    SocketAddr::V6(SocketAddrV6::new(ip, local.port(), TCP_TAG_FLOW, 0))
}

/// Where the machines' datagrams go: the UDP sockets, and the queues of
/// peers connected over TCP.
struct Wires {
    udp: Vec<Arc<UdpSocket>>,
    locals: Vec<SocketAddr>,
    tags: Vec<SocketAddr>,
    tcp: Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
    /// Datagrams dropped because a TCP peer's queue was full.
    tcp_dropped: AtomicU64,
}

impl Wires {
    /// Sends `o` where its `from` says: into `batches` (the UDP loop), at
    /// once on a UDP socket (dropped if the socket is full), or down a TCP
    /// peer's connection.
    fn deliver(&self, o: Outgoing, batches: Option<&mut [SendBatch]>) {
        if let Some(j) = self.locals.iter().position(|l| *l == o.from) {
            match batches {
                Some(b) => b[j].push(&o.payload, o.to),
                None => {
                    if let Err(e) = self.udp[j].try_send_to(&o.payload, o.to) {
                        tracing::trace!(to = %o.to, error = %e, "udp send failed");
                    }
                }
            }
            return;
        }
        if self.tags.contains(&o.from) {
            let tx = self
                .tcp
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&o.to)
                .cloned();
            let sent = tx.is_some_and(|tx| tx.try_send(encode_record(&o.payload)).is_ok());
            if !sent {
                self.tcp_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A running server; dropping it does not stop it, call [`RunningServer::shutdown`].
pub struct RunningServer {
    core: Arc<Mutex<Cores>>,
    wires: Arc<Wires>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    locals: Vec<SocketAddr>,
}

/// The sans-IO machines sharing the server's sockets: STUN, and the
/// rendezvous protocol (first byte 0x2A) on the same port.
pub(crate) struct Cores {
    stun: Server,
    rendezvous: RendezvousServer,
}

fn lock(core: &Mutex<Cores>) -> MutexGuard<'_, Cores> {
    // A panic while holding the lock cannot leave the server in a state
    // worse than a dropped packet, so a poisoned lock is still usable.
    core.lock().unwrap_or_else(|p| p.into_inner())
}

impl RunningServer {
    /// Binds every address and starts serving, with the relay on and its
    /// default quotas.
    pub async fn start(config: ServerConfig) -> Result<Self, ServerError> {
        Self::start_with(config, RelayConfig::default()).await
    }

    /// Binds every address and starts serving, with these relay settings.
    pub async fn start_with(config: ServerConfig, relay: RelayConfig) -> Result<Self, ServerError> {
        if let Some(alt) = config.alternate {
            let p = config.primary;
            if p.ip().is_unspecified() || alt.ip().is_unspecified() {
                return Err(ServerError::WildcardWithAlt(p));
            }
            if p.ip() == alt.ip() || p.port() == alt.port() {
                return Err(ServerError::AltNotDistinct { primary: p, alt });
            }
        }
        // `--no-rate-limit` lifts the rendezvous limits too (per source,
        // per IP and per target), for benchmarks on loopback.
        let limits = if config.rate_limit.rate.is_infinite() {
            Limits::unlimited()
        } else {
            Limits::default()
        };
        let core = Cores {
            stun: Server::new(config),
            rendezvous: RendezvousServer::with_relay(rand::random(), limits, relay),
        };
        let locals = core.stun.local_addresses();
        let mut sockets = Vec::new();
        for a in &locals {
            let s = bind_udp(*a, true)?;
            crate::net::grow_buffers(&s, crate::net::BURST_BUFFER);
            sockets.push(Arc::new(s));
        }
        // With port 0 the kernel picks: report what was bound, and serve
        // TCP on the same ports.
        let locals: Vec<SocketAddr> = sockets
            .iter()
            .zip(&locals)
            .map(|(s, a)| s.local_addr().unwrap_or(*a))
            .collect();
        let mut listeners = Vec::new();
        for a in &locals {
            listeners.push((*a, bind_tcp_listener(*a)?));
        }
        let core = Arc::new(Mutex::new(core));
        let wires = Arc::new(Wires {
            udp: sockets.clone(),
            locals: locals.clone(),
            tags: locals.iter().map(|l| tcp_tag(*l)).collect(),
            tcp: Mutex::new(HashMap::new()),
            tcp_dropped: AtomicU64::new(0),
        });
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(udp_loop(
            core.clone(),
            wires.clone(),
            sockets,
            stop_rx.clone(),
        ));
        let permits = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
        for (local, l) in listeners {
            tasks.spawn(tcp_accept_loop(
                core.clone(),
                wires.clone(),
                l,
                local,
                permits.clone(),
                stop_rx.clone(),
            ));
        }
        Ok(Self {
            core,
            wires,
            stop,
            tasks,
            locals,
        })
    }

    /// The UDP addresses served.
    pub fn local_addresses(&self) -> &[SocketAddr] {
        &self.locals
    }

    pub fn stats(&self) -> ServerStats {
        lock(&self.core).stun.stats()
    }

    /// Rendezvous counters and the number of registered peers.
    pub fn rendezvous_stats(&self) -> (RendezvousStats, usize) {
        let c = lock(&self.core);
        (c.rendezvous.stats(), c.rendezvous.registered())
    }

    /// The relay's counters, channels open and peers on them now.
    pub fn relay_stats(&self) -> (RelayStats, usize, usize) {
        lock(&self.core).rendezvous.relay_stats()
    }

    /// Serve rendezvous and relay only to these peers (`None`: to all).
    pub fn set_members(
        &self,
        members: Option<std::collections::HashSet<natpunch_proto::identity::PeerId>>,
    ) {
        lock(&self.core).rendezvous.set_members(members);
    }

    /// Datagrams dropped because a TCP peer's queue was full, and TCP
    /// peers connected now.
    pub fn tcp_stats(&self) -> (u64, usize) {
        (
            self.wires.tcp_dropped.load(Ordering::Relaxed),
            self.wires
                .tcp
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len(),
        )
    }

    /// Stops every task and returns the final STUN counters.
    pub async fn shutdown(self) -> ServerStats {
        self.shutdown_all().await.0
    }

    /// Stops every task and returns the final STUN, rendezvous and relay
    /// counters.
    pub async fn shutdown_all(mut self) -> (ServerStats, RendezvousStats, RelayStats) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        (
            self.stats(),
            self.rendezvous_stats().0,
            self.relay_stats().0,
        )
    }
}

async fn udp_loop(
    core: Arc<Mutex<Cores>>,
    wires: Arc<Wires>,
    sockets: Vec<Arc<UdpSocket>>,
    mut stop: watch::Receiver<bool>,
) {
    let locals: Vec<SocketAddr> = sockets.iter().filter_map(|s| s.local_addr().ok()).collect();
    // GRO where the kernel has it: a relayed stream arrives coalesced, and
    // leaves as GSO batches (the frames are forwarded unchanged, so one
    // batch in is one batch out).
    let gro = sockets
        .iter()
        .all(|s| crate::batch::enable_gro(s.as_ref()).is_ok());
    let mut rb = if gro {
        RecvBatch::with_gro()
    } else {
        RecvBatch::new()
    };
    let mut sends: Vec<SendBatch> = sockets
        .iter()
        .map(|_| SendBatch::with_gso(crate::batch::GSO_MAX_SEGMENTS))
        .collect();
    let mut out = Vec::with_capacity(256);
    loop {
        // Wait until any socket is readable (or we are told to stop).
        let ready = tokio::select! {
            _ = stop.changed() => return,
            i = any_readable(&sockets) => i,
        };
        let Some(first) = ready else { return };
        for (i, sock) in sockets
            .iter()
            .enumerate()
            .cycle()
            .skip(first)
            .take(sockets.len())
        {
            for _ in 0..UDP_ROUNDS {
                match sock.try_io(Interest::READABLE, || rb.recv(sock.as_ref())) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // ICMP errors from past sends surface here on Linux;
                        // they say nothing about this socket's health.
                        tracing::trace!(error = %e, "udp receive error");
                        continue;
                    }
                }
                {
                    let mut core = lock(&core);
                    let now = Instant::now();
                    for k in 0..rb.len() {
                        let (segments, from) = rb.segments(k);
                        let Some(from) = from else { continue };
                        for data in segments {
                            if is_relay(data) || is_rendezvous(data) {
                                if is_relay(data) {
                                    core.rendezvous.handle_relay(now, from, data);
                                } else {
                                    core.rendezvous.handle(now, locals[i], from, data);
                                }
                                while let Some(o) = core.rendezvous.poll_transmit() {
                                    wires.deliver(o, Some(&mut sends));
                                }
                                continue;
                            }
                            let Some(reply) = core.stun.handle(
                                now,
                                Transport::Udp,
                                locals[i],
                                from,
                                data,
                                &mut out,
                            ) else {
                                continue;
                            };
                            if let Some(j) = locals.iter().position(|l| *l == reply.from) {
                                sends[j].push(&out, reply.to);
                            }
                        }
                    }
                }
                for (j, batch) in sends.iter_mut().enumerate() {
                    flush(&sockets[j], batch).await;
                }
            }
        }
    }
}

/// Sends everything queued, waiting for the socket to drain if needed.
async fn flush(sock: &UdpSocket, batch: &mut SendBatch) {
    let mut sent = 0;
    while sent < batch.len() {
        match sock.try_io(Interest::WRITABLE, || batch.send(sock, sent)) {
            Ok(n) => sent += n.max(1),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if sock.writable().await.is_err() {
                    break;
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EIO) && batch.has_gso_from(sent) => {
                // No GSO on this path: single datagrams from now on.
                tracing::debug!(error = %e, "GSO send failed; sending datagrams one by one");
                batch.disable_gso_from(sent);
            }
            Err(e) if batch.is_gso(sent) => {
                // This message as a batch was refused (a segment too large
                // for the path, say): its datagrams go one by one.
                tracing::debug!(error = %e, "a GSO message failed; splitting it");
                batch.split(sent);
            }
            Err(e) => {
                // One bad destination (e.g. unroutable) fails the call at
                // that datagram: count it as lost and go on.
                tracing::debug!(error = %e, "send failed");
                sent += 1;
            }
        }
    }
    batch.clear();
}

/// Index of a socket that is readable.
async fn any_readable(sockets: &[Arc<UdpSocket>]) -> Option<usize> {
    std::future::poll_fn(|cx| {
        let mut failed = 0;
        for (i, s) in sockets.iter().enumerate() {
            match s.poll_recv_ready(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(Some(i)),
                Poll::Ready(Err(e)) => {
                    tracing::warn!(error = %e, "udp socket failed");
                    failed += 1;
                }
                Poll::Pending => {}
            }
        }
        if failed == sockets.len() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    })
    .await
}

async fn tcp_accept_loop(
    core: Arc<Mutex<Cores>>,
    wires: Arc<Wires>,
    listener: tokio::net::TcpListener,
    local: SocketAddr,
    permits: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let per_ip: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            a = listener.accept() => a,
        };
        let (stream, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%remote, "too many TCP connections, dropping");
            continue;
        };
        {
            let mut m = per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(remote.ip()).or_default();
            if *n >= MAX_TCP_PER_IP {
                tracing::debug!(%remote, "too many TCP connections from this IP, dropping");
                continue;
            }
            *n += 1;
        }
        let (core, wires, per_ip) = (core.clone(), wires.clone(), per_ip.clone());
        conns.spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_tcp(core, &wires, stream, local, remote).await {
                tracing::trace!(%remote, error = %e, "tcp connection ended");
            }
            let mut m = per_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = m.get_mut(&remote.ip()) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&remote.ip());
                }
            }
        });
        while conns.try_join_next().is_some() {}
    }
    conns.shutdown().await;
}

/// One TCP connection: bare STUN (answered bare) and records of any of our
/// datagrams (answered in records, and reachable by the relay and the
/// rendezvous server for as long as it stays open).
async fn serve_tcp(
    core: Arc<Mutex<Cores>>,
    wires: &Wires,
    stream: TcpStream,
    local: SocketAddr,
    remote: SocketAddr,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    let (tx, writer) = crate::server_tcp::spawn_writer(wr, TCP_QUEUE);
    let tag = tcp_tag(local);
    let mut decoder = Decoder::new();
    let mut out = Vec::with_capacity(256);
    let mut chunk = vec![0u8; 16 * 1024];
    let mut peer = false;
    let result = 'conn: loop {
        let idle = if peer {
            TCP_PEER_IDLE_TIMEOUT
        } else {
            TCP_IDLE_TIMEOUT
        };
        let n = match tokio::time::timeout(idle, rd.read(&mut chunk)).await {
            Err(_) => break Err(io::Error::new(io::ErrorKind::TimedOut, "idle")),
            Ok(Err(e)) => break Err(e),
            Ok(Ok(0)) => break Ok(()),
            Ok(Ok(n)) => n,
        };
        decoder.push(&chunk[..n]);
        loop {
            let record = match decoder.next_record() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    tracing::trace!(%remote, error = %e, "closing a TCP stream");
                    break 'conn Ok(());
                }
            };
            let now = Instant::now();
            match record {
                Record::Stun(m) => {
                    let reply =
                        lock(&core)
                            .stun
                            .handle(now, Transport::Tcp, local, remote, &m, &mut out);
                    if reply.is_some() && tx.try_send(out.clone()).is_err() {
                        wires.tcp_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Record::Datagram(d) if d.is_empty() => {}
                Record::Datagram(d) => {
                    if !peer {
                        peer = true;
                        wires
                            .tcp
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(remote, tx.clone());
                    }
                    let mut c = lock(&core);
                    if is_relay(&d) || is_rendezvous(&d) {
                        if is_relay(&d) {
                            c.rendezvous.handle_relay(now, remote, &d);
                        } else {
                            c.rendezvous.handle(now, tag, remote, &d);
                        }
                        let outs: Vec<Outgoing> =
                            std::iter::from_fn(|| c.rendezvous.poll_transmit()).collect();
                        drop(c);
                        for o in outs {
                            wires.deliver(o, None);
                        }
                    } else if c
                        .stun
                        .handle(now, Transport::Tcp, local, remote, &d, &mut out)
                        .is_some()
                    {
                        drop(c);
                        if tx.try_send(encode_record(&out)).is_err() {
                            wires.tcp_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    };
    // The relay and the rendezvous server can no longer reach the peer
    // here; the writer ends once the last sender is gone.
    wires
        .tcp
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&remote);
    drop(tx);
    let _ = writer.await;
    result
}
