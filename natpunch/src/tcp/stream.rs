//! A punched stream under the path table: records in both directions,
//! one datagram each ([`natpunch_proto::relay::stream`]).

use std::net::SocketAddr;
use std::sync::Arc;

use natpunch_proto::SocketId;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::session::socket::{Datagram, PathSocket};

/// Records waiting to be written at most; beyond, they are dropped (QUIC
/// sees loss). 1024 full-size packets are 1.5 MB: more than a 1 Gbit/s
/// path's bandwidth-delay product at 10 ms.
pub const WRITE_QUEUE: usize = 1024;

/// Puts `stream` (from our punching port to `remote`) into the path table
/// as socket `id`, and reads it until it closes or the returned task is
/// aborted: QUIC goes to quinn, punch frames to the driver's `divert`
/// queue as if they came on a socket.
pub fn attach(
    id: SocketId,
    stream: TcpStream,
    remote: SocketAddr,
    socket: Arc<PathSocket>,
    divert: mpsc::Sender<Datagram>,
) -> JoinHandle<()> {
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::new(remote.ip(), 0));
    let (rd, wr) = stream.into_split();
    let (tx, writer) = crate::server_tcp::spawn_writer(wr, WRITE_QUEUE);
    socket.add_stream(id, tx, local);
    tokio::spawn(async move {
        crate::server_tcp::read_records(rd, "punched TCP stream", |data| {
            if socket.inject_stream(id, remote, &data) {
                return;
            }
            if divert.try_send((id, remote, data)).is_err() {
                tracing::trace!("control queue full: datagram from a TCP stream dropped");
            }
        })
        .await;
        tracing::debug!(%remote, socket = id.0, "punched TCP stream closed");
        socket.remove_socket(id);
        writer.abort();
    })
}
