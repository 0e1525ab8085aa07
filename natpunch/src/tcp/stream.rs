//! A punched stream under the path table: records in both directions,
//! one datagram each ([`natpunch_proto::relay::stream`]).

use std::net::SocketAddr;
use std::sync::Arc;

use natpunch_proto::relay::stream::{Decoder, Record};
use natpunch_proto::SocketId;
use tokio::io::AsyncReadExt;
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
    let (mut rd, wr) = stream.into_split();
    let (tx, writer) = crate::server_tcp::spawn_writer(wr, WRITE_QUEUE);
    socket.add_stream(id, tx, local);
    tokio::spawn(async move {
        let mut d = Decoder::new();
        let mut chunk = vec![0u8; 64 * 1024];
        'read: loop {
            let n = match rd.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "punched TCP stream: read failed");
                    break;
                }
            };
            d.push(&chunk[..n]);
            loop {
                match d.next_record() {
                    Ok(Some(Record::Datagram(data))) => {
                        tracing::trace!(%remote, socket = id.0, len = data.len(), first = data.first().copied().unwrap_or(0), "record from a punched stream");
                        if socket.inject_stream(id, remote, &data) {
                            continue;
                        }
                        if divert.try_send((id, remote, data)).is_err() {
                            tracing::trace!(
                                "control queue full: datagram from a TCP stream dropped"
                            );
                        }
                    }
                    // Nobody sends bare STUN on a punched stream.
                    Ok(Some(Record::Stun(_))) => {}
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(%remote, error = %e, "punched TCP stream: bad data, closing");
                        break 'read;
                    }
                }
            }
        }
        tracing::debug!(%remote, socket = id.0, "punched TCP stream closed");
        socket.remove_socket(id);
        writer.abort();
    })
}
