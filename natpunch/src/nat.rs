//! Tokio driver for NAT discovery, and one-shot Binding requests over UDP
//! or TCP.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use natpunch_proto::nat::{Discovery, DiscoveryConfig, Fact, NatReport};
use natpunch_proto::stun::message::{framed_len, Message, TransactionId};
use natpunch_proto::stun::transaction::{Client, Outcome, Timing};
use natpunch_proto::SocketId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;

use crate::net::{bind_udp, route_source, NetError};

/// Errors from a discovery run or a Binding request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("source address {source_ip} is not the same family as server {server}")]
    FamilyMismatch {
        source_ip: IpAddr,
        server: SocketAddr,
    },
    #[error("no answer from {server} within {waited:?}: server down or UDP blocked")]
    NoAnswer {
        server: SocketAddr,
        waited: Duration,
    },
    #[error("{server} answered with error {code}")]
    ErrorResponse { server: SocketAddr, code: u16 },
    #[error("{server} answered without a mapped address")]
    NoMappedAddress { server: SocketAddr },
    #[error("TCP to {server}")]
    Tcp {
        server: SocketAddr,
        source: io::Error,
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub struct NatOptions {
    pub server: SocketAddr,
    /// Local IP to send from (`-i`); default: the one routing picks.
    pub source_ip: Option<IpAddr>,
    /// Local port of the primary socket (`-p`); default: any.
    pub source_port: Option<u16>,
    /// The sans-IO configuration (sockets, lifetime steps, timing, seed).
    pub discovery: DiscoveryConfig,
}

impl NatOptions {
    pub fn new(server: SocketAddr) -> Self {
        Self {
            server,
            source_ip: None,
            source_port: None,
            discovery: DiscoveryConfig::new(server, rand::random()),
        }
    }
}

/// Runs the whole discovery and returns the report. A server that never
/// answers still yields a report (`udp-blocked`); the caller decides
/// whether that is an error.
pub async fn discover(opts: NatOptions) -> Result<NatReport, NatError> {
    run(opts, None).await
}

/// Quick discovery for a peer that is connecting: each [`Fact`] goes to
/// `facts` as soon as it is measured; the report comes at the end.
pub async fn survey(
    mut opts: NatOptions,
    facts: mpsc::UnboundedSender<Fact>,
) -> Result<NatReport, NatError> {
    opts.discovery.quick = true;
    run(opts, Some(facts)).await
}

async fn run(
    opts: NatOptions,
    facts: Option<mpsc::UnboundedSender<Fact>>,
) -> Result<NatReport, NatError> {
    let ip = match opts.source_ip {
        Some(ip) => ip,
        None => route_source(opts.server)?,
    };
    if ip.is_ipv4() != opts.server.is_ipv4() {
        return Err(NatError::FamilyMismatch {
            source_ip: ip,
            server: opts.server,
        });
    }
    let mut sockets = Vec::new();
    let mut locals = Vec::new();
    for i in 0..opts.discovery.socket_count() {
        let port = if i == 0 {
            opts.source_port.unwrap_or(0)
        } else {
            0
        };
        let s = bind_udp(SocketAddr::new(ip, port), false)?;
        locals.push(s.local_addr().map_err(|source| NetError::Bind {
            addr: SocketAddr::new(ip, port),
            source,
        })?);
        sockets.push(std::sync::Arc::new(s));
    }
    tracing::debug!(?locals, server = %opts.server, "starting NAT discovery");
    let (tx, mut rx) = mpsc::channel::<(usize, SocketAddr, Vec<u8>)>(256);
    let mut readers = tokio::task::JoinSet::new();
    for (i, s) in sockets.iter().enumerate() {
        let (s, tx) = (s.clone(), tx.clone());
        readers.spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                match s.recv_from(&mut buf).await {
                    Ok((n, from)) => {
                        if tx.send((i, from, buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                    // ICMP errors from earlier sends (e.g. port
                    // unreachable) surface here; keep reading.
                    Err(e) => tracing::trace!(socket = i, error = %e, "receive error"),
                }
            }
        });
    }
    let mut d = Discovery::new(opts.discovery, locals);
    d.start(Instant::now());
    let report = loop {
        while let Some(t) = d.poll_transmit() {
            if let Some(s) = sockets.get(t.socket.0) {
                if let Err(e) = s.send_to(&t.payload, t.destination).await {
                    tracing::debug!(to = %t.destination, error = %e, "send failed");
                }
            }
        }
        while let Some(f) = d.poll_fact() {
            if let Some(tx) = &facts {
                let _ = tx.send(f);
            }
        }
        if let Some(r) = d.poll_report() {
            break r;
        }
        let deadline = d
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            got = rx.recv() => {
                if let Some((i, from, data)) = got {
                    d.handle_input(Instant::now(), SocketId(i), from, &data);
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => d.handle_timeout(Instant::now()),
        }
    };
    readers.shutdown().await;
    Ok(report)
}

/// One Binding request over UDP from `socket`; returns the mapped address.
pub async fn udp_binding(
    socket: &UdpSocket,
    server: SocketAddr,
    timing: Timing,
) -> Result<SocketAddr, NatError> {
    let mut c = Client::new();
    let req = Message::binding_request(TransactionId::new(rand::random()));
    c.start(Instant::now(), SocketId(0), server, &req, timing, false);
    let mut buf = vec![0u8; 2048];
    loop {
        while let Some(t) = c.poll_transmit() {
            if let Err(e) = socket.send_to(&t.payload, t.destination).await {
                tracing::debug!(error = %e, "send failed");
            }
        }
        if let Some(ev) = c.poll_event() {
            return outcome_to_mapped(server, ev.outcome, timing.total(false));
        }
        let deadline = c.poll_timeout().unwrap_or_else(Instant::now);
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    c.handle_input(Instant::now(), SocketId(0), from, &buf[..n]);
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => c.handle_timeout(Instant::now()),
        }
    }
}

/// One Binding request over TCP (RFC 8489 §6.2.2: sent once, answer within
/// Ti); returns the mapped address.
pub async fn tcp_binding(server: SocketAddr, ti: Duration) -> Result<SocketAddr, NatError> {
    let stream = tokio::time::timeout(ti, TcpStream::connect(server))
        .await
        .map_err(|_| NatError::NoAnswer { server, waited: ti })?
        .map_err(|source| NatError::Tcp { server, source })?;
    tcp_binding_on(stream, server, ti).await.map(|(m, _)| m)
}

/// One Binding request on a connected `stream` to `server`; the mapped
/// address and the server's OTHER-ADDRESS (RFC 5780), if it has one.
pub async fn tcp_binding_on(
    mut stream: TcpStream,
    server: SocketAddr,
    ti: Duration,
) -> Result<(SocketAddr, Option<SocketAddr>), NatError> {
    let tcp_err = |source| NatError::Tcp { server, source };
    let mut c = Client::new();
    let req = Message::binding_request(TransactionId::new(rand::random()));
    let timing = Timing {
        ti,
        ..Timing::default()
    };
    let start = Instant::now();
    c.start(start, SocketId(0), server, &req, timing, true);
    while let Some(t) = c.poll_transmit() {
        stream.write_all(&t.payload).await.map_err(tcp_err)?;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(len) = framed_len(&buf) {
            if buf.len() >= len {
                let msg: Vec<u8> = buf.drain(..len).collect();
                c.handle_input(Instant::now(), SocketId(0), server, &msg);
            }
        }
        if let Some(ev) = c.poll_event() {
            let other = match &ev.outcome {
                Outcome::Success { response, .. } => response.other_address(),
                _ => None,
            };
            return outcome_to_mapped(server, ev.outcome, ti).map(|m| (m, other));
        }
        let deadline = c.poll_timeout().unwrap_or_else(Instant::now);
        tokio::select! {
            r = stream.read(&mut chunk) => {
                let n = r.map_err(tcp_err)?;
                if n == 0 {
                    return Err(tcp_err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before answering")));
                }
                if buf.len() + n > 4096 {
                    return Err(tcp_err(io::Error::new(io::ErrorKind::InvalidData, "oversized answer")));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            _ = tokio::time::sleep_until(deadline.into()) => c.handle_timeout(Instant::now()),
        }
    }
}

fn outcome_to_mapped(
    server: SocketAddr,
    outcome: Outcome,
    waited: Duration,
) -> Result<SocketAddr, NatError> {
    match outcome {
        Outcome::Success { response, .. } => response
            .mapped_address()
            .ok_or(NatError::NoMappedAddress { server }),
        Outcome::Error { code, .. } => Err(NatError::ErrorResponse {
            server,
            code: code.unwrap_or(0),
        }),
        Outcome::Timeout => Err(NatError::NoAnswer { server, waited }),
    }
}
