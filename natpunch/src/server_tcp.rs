//! The peer's link to its server over TCP, for networks that drop UDP.
//!
//! The peer driver starts on UDP. If the server has not answered a single
//! datagram after [`TCP_FALLBACK_AFTER`], it also opens a TCP connection
//! to the same address and port, and from then on every datagram for the
//! server (rendezvous, STUN, relay) travels in records
//! ([`natpunch_proto::relay::stream`]). What comes back is sorted as on
//! UDP: relayed QUIC packets go to quinn through the path table
//! ([`PathSocket::inject_relayed`]), the rest to the driver as if it had
//! arrived on the main socket. Punching needs UDP, so such a peer's
//! sessions stay on the relay.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use natpunch_proto::relay::is_relay;
use natpunch_proto::relay::stream::{Decoder, Record};
use natpunch_proto::SocketId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::mpsc;

use crate::session::socket::{Datagram, PathSocket};

/// The server gets this long to answer on UDP before TCP is tried too:
/// ten times a slow path's round trip, and early enough that the
/// rendezvous requests (which give up after ~6 s) are sent again on TCP
/// with time to spare.
pub const TCP_FALLBACK_AFTER: Duration = Duration::from_millis(1000);
/// A TCP connect that takes longer is given up (and tried again later).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Records waiting to be written at most; beyond, they are dropped (QUIC
/// sees loss; rendezvous requests are retransmitted). 1024 full-size
/// packets are 1.5 MB.
pub const WRITE_QUEUE: usize = 1024;

/// After a failed or lost link, TCP is tried again this long after (while
/// UDP still gets no answer).
pub const RETRY_AFTER: Duration = Duration::from_secs(3);

/// A connected link: records to write go into `tx`.
#[derive(Debug)]
pub struct ServerTcp {
    pub tx: mpsc::Sender<Vec<u8>>,
}

/// What becomes of a link.
#[derive(Debug)]
pub enum LinkNews {
    Up(ServerTcp),
    Failed(io::Error),
    Closed,
}

/// Connects to `server` from `source_ip` in the background; `news` hears
/// whether it came up, and later that it closed.
pub fn spawn_connect(
    server: SocketAddr,
    source_ip: IpAddr,
    socket: Arc<PathSocket>,
    divert: mpsc::Sender<Datagram>,
    news: mpsc::UnboundedSender<LinkNews>,
) {
    tokio::spawn(async move {
        let n = match connect(server, source_ip, socket, divert, news.clone()).await {
            Ok(link) => LinkNews::Up(link),
            Err(e) => LinkNews::Failed(e),
        };
        let _ = news.send(n);
    });
}

/// A write that makes no progress for this long ends the connection: a
/// peer that stops reading cannot hold it (or the queue behind it).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes gathered from the queue into one write at most.
const WRITE_BATCH: usize = 64 * 1024;

/// The writing half of a stream behind a bounded queue of ready-made
/// records (the caller drops what does not fit): each write takes what is
/// queued, up to 64 KiB. The task ends when every sender is gone, or a
/// write fails or stalls for [`WRITE_TIMEOUT`].
pub(crate) fn spawn_writer(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    queue: usize,
) -> (mpsc::Sender<Vec<u8>>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(queue);
    let task = tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(first) = rx.recv().await {
            buf.clear();
            buf.extend_from_slice(&first);
            while buf.len() < WRITE_BATCH {
                match rx.try_recv() {
                    Ok(more) => buf.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&buf)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TCP write failed");
                    break;
                }
                Err(_) => {
                    tracing::debug!("TCP write stalled: closing");
                    break;
                }
            }
        }
    });
    (tx, task)
}

/// Reads `rd` until it closes or brings something that is not a record,
/// handing each record's datagram to `on` (bare STUN, which only a plain
/// STUN client sends, is skipped). `what` names the stream in logs.
pub(crate) async fn read_records(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    what: &str,
    mut on: impl FnMut(Vec<u8>),
) {
    let mut d = Decoder::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match rd.read(&mut chunk).await {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "{what}: read failed");
                return;
            }
        };
        d.push(&chunk[..n]);
        loop {
            match d.next_record() {
                Ok(Some(Record::Datagram(data))) => on(data),
                Ok(Some(Record::Stun(_))) => {}
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "{what}: bad stream");
                    return;
                }
            }
        }
    }
}

/// Connects to `server` from `source_ip`, and starts the tasks that read
/// and write it. `news` is told when the connection closes.
async fn connect(
    server: SocketAddr,
    source_ip: IpAddr,
    socket: Arc<PathSocket>,
    divert: mpsc::Sender<Datagram>,
    news: mpsc::UnboundedSender<LinkNews>,
) -> io::Result<ServerTcp> {
    let s = match source_ip {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    s.bind(SocketAddr::new(source_ip, 0))?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, s.connect(server))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TCP connect timed out"))??;
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let (tx, _writer) = spawn_writer(wr, WRITE_QUEUE);
    tokio::spawn(async move {
        read_records(rd, "TCP link to the server", |data| {
            if is_relay(&data) && socket.inject_relayed(server, &data) {
                return;
            }
            if divert.try_send((SocketId(0), server, data)).is_err() {
                tracing::trace!("control queue full: datagram from the TCP link dropped");
            }
        })
        .await;
        let _ = news.send(LinkNews::Closed);
    });
    Ok(ServerTcp { tx })
}
