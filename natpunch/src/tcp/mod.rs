//! TCP hole punching, the driver: the punching port, its discovery, the
//! simultaneous open, and the punched streams under the path table.
//!
//! **One port for everything TCP.** A listening socket and every outgoing
//! connect share one local port (the main UDP socket's number when free),
//! all with SO_REUSEADDR and SO_REUSEPORT (socket2): the NAT's mapping of
//! that port, measured by STUN over TCP from it ([`discover`]), is the
//! one the peer aims at, and whichever way the kernel resolves a
//! simultaneous open (our connect completes, the listener accepts, or
//! both SYNs cross) the stream appears on that port.
//!
//! **What runs on a punched stream.** The session's own QUIC packets,
//! framed one per record exactly as on the relay's TCP transport
//! ([`natpunch_proto::relay::stream`]), and the punch frames that
//! authenticate the path first. We chose this over a separate TLS 1.3
//! session on the stream because the stream is then one more path in the
//! path table ([`crate::session::socket::PathSocket`]): the same QUIC
//! connection (its Ed25519 raw-public-key handshake, its streams, the
//! pipe, `--expose`/`--forward`) starts on the relay and moves onto the
//! stream, or off it to UDP, without a new handshake or a lost byte, and
//! the library API does not change. The price is QUIC's congestion
//! control over TCP's (two control loops, and head-of-line blocking on
//! loss), which is why TCP is the fallback and UDP the first choice.
//!
//! [`punch`] carries out the coordinator's [`HostEvent::TcpPunch`]:
//! limited-TTL opener SYNs, then normal SYNs, retried with jitter until a
//! stream is up or the attempt gives up.
//!
//! [`HostEvent::TcpPunch`]: natpunch_proto::coordinator::HostEvent::TcpPunch

pub mod discover;
pub mod punch;
pub mod stream;

use std::io;
use std::net::SocketAddr;

use natpunch_proto::rendezvous::wire::TcpInfo;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// What the TCP tasks tell the peer driver.
#[derive(Debug)]
pub enum TcpNews {
    /// Discovery of the punching port finished (`None`: the server gave
    /// no TCP answer; TCP is not punched then).
    Facts(Option<TcpInfo>),
    /// A stream is up on the punching port: made by `session`'s SYNs, or
    /// accepted (`None`).
    Up {
        session: Option<u64>,
        stream: TcpStream,
        remote: SocketAddr,
    },
    /// `session`'s TCP punch ended without a stream.
    Over { session: u64, reason: String },
}

/// A TCP socket on `local` that shares its port with the listener and
/// the other connects (SO_REUSEADDR and SO_REUSEPORT).
pub fn reuse_socket(local: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(local),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if local.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    #[cfg(unix)]
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&local.into())?;
    Ok(s)
}

/// Listens on `local`; when its port is taken, on a free one. The
/// listener and its address.
pub fn listen(local: SocketAddr) -> io::Result<(TcpListener, SocketAddr)> {
    let s = match reuse_socket(local) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && local.port() != 0 => {
            tracing::debug!(%local, "TCP port taken: punching from another one");
            reuse_socket(SocketAddr::new(local.ip(), 0))?
        }
        Err(e) => return Err(e),
    };
    // Backlog: punched connections arrive one or a few at a time.
    s.listen(16)?;
    let l = TcpListener::from_std(s.into())?;
    let addr = l.local_addr()?;
    Ok((l, addr))
}

/// Accepts every connection on the punching port: each one is news (the
/// coordinator decides, by the punch frames on it, whose it is).
pub async fn accept_loop(l: TcpListener, news: tokio::sync::mpsc::UnboundedSender<TcpNews>) {
    loop {
        match l.accept().await {
            Ok((stream, remote)) => {
                tracing::debug!(%remote, "TCP stream accepted on the punching port");
                let _ = stream.set_nodelay(true);
                if news
                    .send(TcpNews::Up {
                        session: None,
                        stream,
                        remote,
                    })
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "TCP accept failed");
                // Out of descriptors and the like: give the system a moment.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
