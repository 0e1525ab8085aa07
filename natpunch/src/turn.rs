//! TURN allocations (RFC 8656) over UDP, TCP or TLS: binds
//! [`natpunch_proto::turn::Client`] to a socket and its timers.
//!
//! [`Allocation::start`] resolves the server of a `turn:`/`turns:` URI,
//! connects (TCP, or TLS with rustls: the system's usual web roots, or a
//! CA file for a private server), and runs the client on its own task.
//! The caller asks for permissions, channels and sends through the handle,
//! and reads the client's events and the peers' data from it. Dropping
//! the handle releases the allocation (best effort); [`Allocation::release`]
//! waits for the server's answer.
//!
//! Credentials live in the client and never reach a log line: `Debug`
//! of [`natpunch_proto::turn::Credentials`] hides the password.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use natpunch_proto::turn::client::{Event, PeerData};
use natpunch_proto::turn::{stream_frame_len, Client, Credentials, Transport, TurnError, TurnUri};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;

use crate::net::resolve;
use crate::session::socket::PathSocket;
use natpunch_proto::SocketId;

/// Connecting to the TURN server (TCP handshake, TLS handshake) gives up
/// after this: ten times a slow path's round trip.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A release waits this long for the server's answer (one UDP
/// retransmission schedule is 15.5 s; an exiting process should not).
pub const RELEASE_WAIT: Duration = Duration::from_secs(2);
/// Largest frame or datagram from the server: a STUN message or
/// ChannelData is at most 4 + 65535 bytes.
const MAX_FRAME: usize = 4 + 65_536;
/// Reports (events and peer data) waiting for the caller at most; peer
/// data beyond is dropped and counted (the peer's transport sees loss),
/// events wait for room. 1024 datagrams are about 1.5 MB.
const MAX_REPORTS: usize = 1024;
/// A write to the server that does not finish within this ends the
/// allocation (a server that stopped reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an allocation could not start or ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TurnDriverError {
    #[error(transparent)]
    Resolve(#[from] crate::net::NetError),
    #[error("cannot reach the TURN server {server} over {transport}")]
    Connect {
        server: SocketAddr,
        transport: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with the TURN server {server} failed")]
    Tls {
        server: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA file {path}: {why}")]
    Ca { path: String, why: String },
    #[error(transparent)]
    Turn(#[from] TurnError),
}

/// What the caller asks of a running allocation.
#[derive(Debug)]
enum Command {
    Permit(IpAddr),
    Forget(IpAddr),
    Bind(SocketAddr),
    Send(SocketAddr, Vec<u8>),
    Release,
}

/// What a running allocation reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    Event(Event),
    Data(PeerData),
}

/// A TURN server to allocate on.
#[derive(Debug, Clone)]
pub struct TurnServer {
    pub uri: TurnUri,
    pub credentials: Credentials,
    /// Extra trust anchors for `turns:` (PEM); without, the web's roots.
    pub ca: Option<std::path::PathBuf>,
}

/// A handle on one allocation's task.
pub struct Allocation {
    server: SocketAddr,
    transport: Transport,
    commands: mpsc::UnboundedSender<Command>,
    reports: mpsc::Receiver<Report>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Allocation {
    /// Connects to `server` and starts allocating; the first report is
    /// [`Event::Allocated`] or [`Event::Failed`].
    pub async fn start(server: &TurnServer) -> Result<Allocation, TurnDriverError> {
        let uri = &server.uri;
        let addr = resolve(&uri.host, uri.port, false).await?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (report_tx, reports) = mpsc::channel(MAX_REPORTS);
        let task = match uri.transport {
            Transport::Udp => {
                let sock = async {
                    let s = UdpSocket::bind(SocketAddr::new(unspecified(addr), 0)).await?;
                    s.connect(addr).await?;
                    Ok::<_, std::io::Error>(s)
                }
                .await
                .map_err(|source| TurnDriverError::Connect {
                    server: addr,
                    transport: "udp",
                    source,
                })?;
                let client = Client::new(
                    addr,
                    Transport::Udp,
                    server.credentials.clone(),
                    Instant::now(),
                );
                tokio::spawn(run_udp(client, sock, command_rx, report_tx))
            }
            Transport::Tcp | Transport::Tls => {
                let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr));
                let tcp = match connect.await {
                    Ok(r) => r,
                    Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut)),
                }
                .map_err(|source| TurnDriverError::Connect {
                    server: addr,
                    transport: uri.transport.as_str(),
                    source,
                })?;
                let _ = tcp.set_nodelay(true);
                let client = Client::new(
                    addr,
                    uri.transport,
                    server.credentials.clone(),
                    Instant::now(),
                );
                if uri.transport == Transport::Tls {
                    let tls = tls_connect(tcp, addr, &uri.host, server.ca.as_deref()).await?;
                    tokio::spawn(run_stream(client, tls, command_rx, report_tx))
                } else {
                    tokio::spawn(run_stream(client, tcp, command_rx, report_tx))
                }
            }
        };
        Ok(Allocation {
            server: addr,
            transport: uri.transport,
            commands,
            reports,
            task: Some(task),
        })
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The next event or peer data; `None` once the allocation's task ended.
    pub async fn next(&mut self) -> Option<Report> {
        self.reports.recv().await
    }

    pub fn permit(&self, ip: IpAddr) {
        let _ = self.commands.send(Command::Permit(ip));
    }

    /// Lets `ip`'s permission and channels lapse.
    pub fn forget(&self, ip: IpAddr) {
        let _ = self.commands.send(Command::Forget(ip));
    }

    pub fn bind(&self, peer: SocketAddr) {
        let _ = self.commands.send(Command::Bind(peer));
    }

    pub fn send(&self, peer: SocketAddr, data: Vec<u8>) {
        let _ = self.commands.send(Command::Send(peer, data));
    }

    /// Deletes the allocation and waits (up to [`RELEASE_WAIT`]) for the
    /// server to confirm: whether it did.
    pub async fn release(mut self) -> bool {
        let _ = self.commands.send(Command::Release);
        let wait = async {
            while let Some(r) = self.reports.recv().await {
                match r {
                    Report::Event(Event::Released) => return true,
                    Report::Event(Event::Failed(_)) => return false,
                    _ => {}
                }
            }
            false
        };
        let done = tokio::time::timeout(RELEASE_WAIT, wait)
            .await
            .unwrap_or(false);
        if let Some(t) = self.task.take() {
            t.abort();
        }
        done
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        // The task sends the release and ends on its own (while the
        // runtime lives).
        let _ = self.commands.send(Command::Release);
    }
}

fn unspecified(server: SocketAddr) -> IpAddr {
    match server {
        SocketAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

/// Applies a command (what it wraps for the server goes to `out`); `None`
/// means the handle is gone: release, and wait for the answer. Whether
/// commands may still come.
fn apply(client: &mut Client, now: Instant, cmd: Option<Command>, out: &mut Vec<Vec<u8>>) -> bool {
    match cmd {
        Some(Command::Permit(ip)) => client.permit(now, ip),
        Some(Command::Forget(ip)) => client.forget(ip),
        Some(Command::Bind(peer)) => client.bind(now, peer),
        Some(Command::Send(peer, data)) => {
            let mut buf = Vec::with_capacity(data.len() + 36);
            match client.send(peer, &data, &mut buf) {
                Ok(()) => out.push(buf),
                Err(e) => tracing::debug!(%peer, error = %e, "TURN: not sent"),
            }
        }
        Some(Command::Release) => client.release(now),
        None => {
            client.release(now);
            return false;
        }
    }
    true
}

/// Hands the client's events on (waiting for room: none is lost);
/// whether the client is done.
async fn report_events(client: &mut Client, reports: &mpsc::Sender<Report>) -> bool {
    while let Some(e) = client.poll_event() {
        tracing::debug!(server = %client.server(), event = ?e, "TURN");
        let _ = reports.send(Report::Event(e)).await;
    }
    client.is_closed()
}

/// Hands peer data on, or drops it when the caller is that far behind.
fn report_data(data: PeerData, reports: &mpsc::Sender<Report>, dropped: &mut u64) {
    if reports.try_send(Report::Data(data)).is_err() {
        *dropped += 1;
        tracing::trace!(
            dropped = *dropped,
            "TURN: peer data dropped, the reader is behind"
        );
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

async fn run_udp(
    mut client: Client,
    sock: UdpSocket,
    mut commands: mpsc::UnboundedReceiver<Command>,
    reports: mpsc::Sender<Report>,
) {
    let mut buf = vec![0u8; MAX_FRAME];
    let mut out: Vec<Vec<u8>> = Vec::new();
    let (mut open, mut dropped) = (true, 0u64);
    loop {
        out.extend(std::iter::from_fn(|| client.poll_transmit()));
        for b in out.drain(..) {
            if let Err(e) = sock.send(&b).await {
                tracing::debug!(error = %e, "TURN: send to the server failed");
            }
        }
        if report_events(&mut client, &reports).await {
            return;
        }
        tokio::select! {
            r = sock.recv(&mut buf) => match r {
                Ok(n) => {
                    if let Some(d) = client.handle_input(Instant::now(), &buf[..n]) {
                        report_data(d, &reports, &mut dropped);
                    }
                }
                // An ICMP error from the server's address; the
                // retransmissions decide.
                Err(e) => tracing::debug!(error = %e, "TURN: receive failed"),
            },
            cmd = commands.recv(), if open => {
                open = apply(&mut client, Instant::now(), cmd, &mut out);
            }
            _ = sleep_until(client.poll_timeout()) => client.handle_timeout(Instant::now()),
        }
    }
}

async fn run_stream<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: Client,
    stream: S,
    mut commands: mpsc::UnboundedReceiver<Command>,
    reports: mpsc::Sender<Report>,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut inbuf: Vec<u8> = Vec::with_capacity(2 * MAX_FRAME);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut out: Vec<Vec<u8>> = Vec::new();
    let server = client.server();
    let (mut open, mut dropped) = (true, 0u64);
    let closed = || Report::Event(Event::Failed(TurnError::Closed { server }));
    loop {
        out.extend(std::iter::from_fn(|| client.poll_transmit()));
        if !out.is_empty() {
            let write = async {
                for b in out.drain(..) {
                    wr.write_all(&b).await?;
                }
                // TLS may hold records until flushed.
                wr.flush().await
            };
            let done = tokio::time::timeout(WRITE_TIMEOUT, write).await;
            if !matches!(done, Ok(Ok(()))) {
                tracing::debug!(?done, "TURN: write to the server failed");
                let _ = reports.send(closed()).await;
                return;
            }
        }
        if report_events(&mut client, &reports).await {
            let _ = wr.shutdown().await;
            return;
        }
        tokio::select! {
            r = rd.read(&mut chunk) => match r {
                Ok(0) | Err(_) => {
                    let _ = reports.send(closed()).await;
                    return;
                }
                Ok(n) => {
                    inbuf.extend_from_slice(&chunk[..n]);
                    // Frames are handled in place; what is left is moved to
                    // the front once per read.
                    let mut at = 0;
                    loop {
                        match stream_frame_len(&inbuf[at..]) {
                            Ok(Some(len)) if inbuf.len() - at >= len => {
                                let frame = &inbuf[at..at + len];
                                at += len;
                                if let Some(d) = client.handle_input(Instant::now(), frame) {
                                    report_data(d, &reports, &mut dropped);
                                }
                            }
                            Ok(_) => break,
                            Err(e) => {
                                tracing::debug!(error = %e, "TURN: stream out of step");
                                let _ = reports.send(closed()).await;
                                return;
                            }
                        }
                    }
                    inbuf.drain(..at);
                }
            },
            cmd = commands.recv(), if open => {
                open = apply(&mut client, Instant::now(), cmd, &mut out);
            }
            _ = sleep_until(client.poll_timeout()) => client.handle_timeout(Instant::now()),
        }
    }
}

/// TLS 1.2/1.3 to the server (rustls with ring), its name checked
/// against the web's roots or the given CA file.
async fn tls_connect(
    tcp: TcpStream,
    server: SocketAddr,
    host: &str,
    ca: Option<&Path>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, TurnDriverError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let ca_err = |why: String| TurnDriverError::Ca {
                path: path.display().to_string(),
                why,
            };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| ca_err(e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| ca_err(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_err("no certificate in it".into()));
            }
            for c in certs {
                roots.add(c).map_err(|e| ca_err(e.to_string()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let tls_err = |source| TurnDriverError::Tls { server, source };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls_err(std::io::Error::other(e)))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| tls_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(r) => r.map_err(tls_err),
        Err(_) => Err(tls_err(std::io::ErrorKind::TimedOut.into())),
    }
}

/// After a lost allocation, the next one is asked for this long after,
/// doubling up to [`REALLOCATE_MAX`] while they fail: a TURN server that
/// restarts is back within seconds, one that is gone is not hammered.
const REALLOCATE_FIRST: Duration = Duration::from_secs(2);
const REALLOCATE_MAX: Duration = Duration::from_secs(60);

/// A peer's permission (and channels) are let lapse once nothing was
/// sent to or from its IP, nor asked for it, this long: twice a
/// permission's own lifetime (RFC 8656 §9: 300 s), so a quiet but live
/// session (keepalives every few seconds) never loses it, while peers
/// gone for good stop taking places among the client's 256.
const PERMISSION_IDLE: Duration = Duration::from_secs(600);
/// How often idle permissions are looked for.
const IDLE_SWEEP: Duration = Duration::from_secs(60);
/// A peer whose ChannelBind failed is bound again no sooner than this: a
/// server still holding its old channel refuses a new number until that
/// one expires (RFC 8656 §12: 10 minutes, and 5 more before reuse).
const REBIND_AFTER: Duration = Duration::from_secs(300);

/// Datagrams from the path table to one allocation waiting at most; beyond,
/// they are dropped (QUIC sees loss), as a full UDP send buffer would.
const PATH_QUEUE: usize = 1024;

/// What a TURN allocation under a peer's path table tells its driver.
#[derive(Debug)]
pub(crate) enum PathNews {
    /// Peers reach us at `relayed`, through `server`, `elapsed` after the
    /// allocation started.
    Allocated {
        id: SocketId,
        relayed: SocketAddr,
        server: SocketAddr,
        transport: Transport,
        elapsed: Duration,
    },
    /// The first allocation could not be made.
    Failed { error: TurnDriverError },
    /// A working allocation was lost; another is being made.
    Lost {
        id: SocketId,
        error: TurnDriverError,
    },
}

/// One allocation serving as socket `id` of a peer's path table
/// ([`crate::session::socket::PathSocket::add_turn`]): what the table sends
/// there is relayed to its destination, and what the server relays to us
/// comes back in sorted like a UDP socket's datagrams.
pub(crate) struct TurnPath {
    permits: mpsc::UnboundedSender<IpAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Ends with whether a release was confirmed (`None`: nothing was
    /// left to release).
    task: tokio::task::JoinHandle<Option<bool>>,
}

impl TurnPath {
    pub fn spawn(
        server: TurnServer,
        id: SocketId,
        socket: Arc<PathSocket>,
        news: mpsc::UnboundedSender<PathNews>,
    ) -> Self {
        let (permits, permit_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(carry(server, id, socket, news, permit_rx, stop_rx));
        Self {
            permits,
            stop: Some(stop),
            task,
        }
    }

    /// Lets datagrams from `ip` through (queued until the allocation exists).
    pub fn permit(&self, ip: IpAddr) {
        let _ = self.permits.send(ip);
    }

    /// Releases the allocation and waits for the server's answer (at most
    /// [`RELEASE_WAIT`] after the request): whether it confirmed, or
    /// `None` when there was no allocation to release.
    pub async fn close(mut self) -> Option<bool> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        // The task releases and ends; a little over the release's own wait.
        let wait = RELEASE_WAIT + Duration::from_millis(500);
        let r = tokio::time::timeout(wait, &mut self.task).await;
        self.task.abort();
        match r {
            Ok(Ok(done)) => done,
            _ => Some(false),
        }
    }
}

/// Makes an allocation: the handle and the address it relays to us.
async fn allocate(server: &TurnServer) -> Result<(Allocation, SocketAddr), TurnDriverError> {
    let mut alloc = Allocation::start(server).await?;
    loop {
        match alloc.next().await {
            Some(Report::Event(Event::Allocated { relayed, .. })) => return Ok((alloc, relayed)),
            Some(Report::Event(Event::Failed(e))) => return Err(TurnDriverError::Turn(e)),
            Some(_) => {}
            None => {
                return Err(TurnDriverError::Turn(TurnError::Closed {
                    server: alloc.server(),
                }))
            }
        }
    }
}

/// Runs socket `id`'s allocation: made at start (a failure then is the
/// run's), made again after a loss (the server restarted, the connection
/// broke), released when told to stop.
async fn carry(
    server: TurnServer,
    id: SocketId,
    socket: Arc<PathSocket>,
    news: mpsc::UnboundedSender<PathNews>,
    mut permits: mpsc::UnboundedReceiver<IpAddr>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Option<bool> {
    let mut made = false;
    let mut backoff = REALLOCATE_FIRST;
    // What peers were let in, and when they were last asked for or heard
    // from: let in again on a new allocation, let lapse when idle (as
    // many as the client keeps).
    let mut permitted: HashMap<IpAddr, Instant> = HashMap::new();
    let mut sweep = tokio::time::interval(IDLE_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let started = Instant::now();
        let made_now = tokio::select! {
            r = allocate(&server) => r,
            // Stopped while allocating: nothing to release (dropping the
            // handle releases one that was just being made).
            _ = &mut stop => return None,
        };
        let (mut alloc, relayed) = match made_now {
            Ok(a) => a,
            Err(error) if !made => {
                let _ = news.send(PathNews::Failed { error });
                return None;
            }
            Err(error) => {
                tracing::debug!(socket = id.0, %error, ?backoff, "TURN: allocating again failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = &mut stop => return None,
                }
                backoff = (backoff * 2).min(REALLOCATE_MAX);
                continue;
            }
        };
        made = true;
        backoff = REALLOCATE_FIRST;
        for ip in permitted.keys() {
            alloc.permit(*ip);
        }
        let (out, mut out_rx) = mpsc::channel(PATH_QUEUE);
        socket.add_turn(id, out, relayed);
        let _ = news.send(PathNews::Allocated {
            id,
            relayed,
            server: alloc.server(),
            transport: alloc.transport(),
            elapsed: started.elapsed(),
        });
        // Peers given a channel (ChannelData: 4 bytes of header instead
        // of a Send indication's 36, and it installs the permission too).
        let mut bound: std::collections::HashSet<SocketAddr> = Default::default();
        // Peers whose ChannelBind failed, and when: Send indications
        // carry their data until a bind may work again.
        let mut unbindable: HashMap<SocketAddr, Instant> = HashMap::new();
        let error = loop {
            tokio::select! {
                Some((peer, data)) = out_rx.recv() => {
                    let may_bind = unbindable.get(&peer).is_none_or(|t| t.elapsed() >= REBIND_AFTER);
                    if may_bind && bound.len() < natpunch_proto::turn::client::MAX_PEERS && bound.insert(peer) {
                        alloc.bind(peer);
                    }
                    if let Some(t) = permitted.get_mut(&peer.ip()) {
                        *t = Instant::now();
                    }
                    alloc.send(peer, data);
                }
                Some(ip) = permits.recv() => {
                    if permitted.len() < natpunch_proto::turn::client::MAX_PEERS || permitted.contains_key(&ip) {
                        permitted.insert(ip, Instant::now());
                    }
                    alloc.permit(ip);
                }
                _ = sweep.tick() => {
                    let idle: Vec<IpAddr> = permitted
                        .iter()
                        .filter(|(_, t)| t.elapsed() >= PERMISSION_IDLE)
                        .map(|(ip, _)| *ip)
                        .collect();
                    for ip in idle {
                        tracing::debug!(socket = id.0, %ip, "TURN: idle permission let lapse");
                        permitted.remove(&ip);
                        bound.retain(|p| p.ip() != ip);
                        alloc.forget(ip);
                    }
                    unbindable.retain(|_, t| t.elapsed() < REBIND_AFTER);
                }
                r = alloc.next() => match r {
                    Some(Report::Data(PeerData { peer, data })) => {
                        if let Some(t) = permitted.get_mut(&peer.ip()) {
                            *t = Instant::now();
                        }
                        if !socket.inject_stream(id, peer, &data) {
                            socket.divert_turn(id, peer, &data);
                        }
                    }
                    Some(Report::Event(Event::Failed(e))) => break TurnDriverError::Turn(e),
                    Some(Report::Event(Event::ChannelFailed { peer, error })) => {
                        tracing::debug!(socket = id.0, %peer, %error, "TURN: no channel; Send indications meanwhile");
                        bound.remove(&peer);
                        if unbindable.len() < natpunch_proto::turn::client::MAX_PEERS {
                            unbindable.insert(peer, Instant::now());
                        }
                    }
                    Some(Report::Event(e)) => tracing::trace!(socket = id.0, event = ?e, "TURN"),
                    None => break TurnDriverError::Turn(TurnError::Closed { server: alloc.server() }),
                },
                _ = &mut stop => {
                    socket.remove_socket(id);
                    return Some(alloc.release().await);
                }
            }
        };
        socket.pause_turn(id);
        let _ = news.send(PathNews::Lost { id, error });
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut stop => return None,
        }
    }
}
