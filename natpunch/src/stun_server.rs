//! Tokio driver for the server's sans-IO machines: STUN on UDP (one to
//! four sockets: RFC 5780 needs 2 IPs × 2 ports) and on TCP with RFC 8489
//! §6.2.2 framing; the rendezvous protocol (0x2A) and the relay (0x2C) on
//! the same UDP sockets.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

use natpunch_proto::relay::{is_relay, RelayConfig, RelayStats};
use natpunch_proto::rendezvous::server::{Limits, RendezvousStats};
use natpunch_proto::rendezvous::wire::is_rendezvous;
use natpunch_proto::rendezvous::RendezvousServer;
use natpunch_proto::stun::message::{framed_len, HEADER_LEN};
use natpunch_proto::stun::server::{Server, ServerConfig, ServerStats, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::batch::{RecvBatch, SendBatch};
use crate::net::{bind_tcp_listener, bind_udp, NetError};

/// Concurrent TCP connections at most; each costs a task and a 64 KiB
/// buffer at worst, so 1024 bounds memory to ~64 MiB.
pub const MAX_TCP_CONNECTIONS: usize = 1024;
/// A TCP client that sends nothing for this long is dropped. RFC 8489
/// §6.2.2 lets servers close idle connections; 10 s covers a slow client's
/// request and answer several times over.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Batches read from one socket before turning to the others, so one busy
/// socket cannot starve the rest (8 x 32 datagrams).
const UDP_ROUNDS: usize = 8;
/// Largest datagram we read; STUN requests are far smaller, and anything
/// longer is truncated and then fails to decode (dropped and counted).
const RECV_BUF: usize = 2048;

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

/// A running server; dropping it does not stop it, call [`RunningServer::shutdown`].
pub struct RunningServer {
    core: Arc<Mutex<Cores>>,
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
        let mut listeners = Vec::new();
        for a in &locals {
            listeners.push((*a, bind_tcp_listener(*a)?));
        }
        // With port 0 the kernel picks: report what was bound.
        let locals: Vec<SocketAddr> = sockets
            .iter()
            .zip(&locals)
            .map(|(s, a)| s.local_addr().unwrap_or(*a))
            .collect();
        let core = Arc::new(Mutex::new(core));
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(udp_loop(core.clone(), sockets, stop_rx.clone()));
        let permits = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
        for (local, l) in listeners {
            tasks.spawn(tcp_accept_loop(
                core.clone(),
                l,
                local,
                permits.clone(),
                stop_rx.clone(),
            ));
        }
        Ok(Self {
            core,
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
    sockets: Vec<Arc<UdpSocket>>,
    mut stop: watch::Receiver<bool>,
) {
    let locals: Vec<SocketAddr> = sockets.iter().filter_map(|s| s.local_addr().ok()).collect();
    let mut rb = RecvBatch::new();
    let mut sends: Vec<SendBatch> = sockets.iter().map(|_| SendBatch::new()).collect();
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
                        let (data, from) = rb.get(k);
                        let Some(from) = from else { continue };
                        if is_relay(data) {
                            core.rendezvous.handle_relay(now, from, data);
                            while let Some(o) = core.rendezvous.poll_transmit() {
                                if let Some(j) = locals.iter().position(|l| *l == o.from) {
                                    sends[j].push(&o.payload, o.to);
                                }
                            }
                            continue;
                        }
                        if is_rendezvous(data) {
                            core.rendezvous.handle(now, locals[i], from, data);
                            while let Some(o) = core.rendezvous.poll_transmit() {
                                if let Some(j) = locals.iter().position(|l| *l == o.from) {
                                    sends[j].push(&o.payload, o.to);
                                }
                            }
                            continue;
                        }
                        let Some(reply) =
                            core.stun
                                .handle(now, Transport::Udp, locals[i], from, data, &mut out)
                        else {
                            continue;
                        };
                        if let Some(j) = locals.iter().position(|l| *l == reply.from) {
                            sends[j].push(&out, reply.to);
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
    listener: tokio::net::TcpListener,
    local: SocketAddr,
    permits: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
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
        let core = core.clone();
        conns.spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_tcp(core, stream, local, remote).await {
                tracing::trace!(%remote, error = %e, "tcp connection ended");
            }
        });
        while conns.try_join_next().is_some() {}
    }
    conns.shutdown().await;
}

async fn serve_tcp(
    core: Arc<Mutex<Cores>>,
    mut stream: TcpStream,
    local: SocketAddr,
    remote: SocketAddr,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(RECV_BUF);
    let mut out = Vec::with_capacity(256);
    let mut chunk = [0u8; RECV_BUF];
    loop {
        // Serve every complete message already buffered.
        while let Some(len) = framed_len(&buf) {
            if buf.len() < len {
                break;
            }
            let msg: Vec<u8> = buf.drain(..len).collect();
            let reply = lock(&core).stun.handle(
                Instant::now(),
                Transport::Tcp,
                local,
                remote,
                &msg,
                &mut out,
            );
            if reply.is_some() {
                stream.write_all(&out).await?;
            }
        }
        if buf.len() >= 4 && framed_len(&buf).is_none() {
            // Not STUN framing: nothing sensible can follow.
            return Ok(());
        }
        if buf.len() > HEADER_LEN + u16::MAX as usize {
            return Ok(());
        }
        let n = tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read(&mut chunk))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "idle"))??;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
