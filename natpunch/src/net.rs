//! Socket helpers shared by the drivers: binding with socket2, finding the
//! local address the kernel would route from, resolving `HOST[:PORT]`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

/// Errors from resolving or binding.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    #[error("cannot resolve {host}")]
    Resolve { host: String, source: io::Error },
    #[error("{host} has no {family} address")]
    NoAddress { host: String, family: &'static str },
    #[error("cannot bind {addr}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("no route to {dest}")]
    NoRoute { dest: SocketAddr, source: io::Error },
}

/// Resolves `HOST[:PORT]` (a bare IPv6 literal or `[v6]:port` too),
/// defaulting the port. Prefers IPv4 when the name has both, unless `v6`.
pub async fn resolve(
    spec: &str,
    default_port: u16,
    prefer_v6: bool,
) -> Result<SocketAddr, NetError> {
    if let Ok(a) = spec.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = spec.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    let with_port = if spec
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        spec.to_string()
    } else {
        format!("{spec}:{default_port}")
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&with_port)
        .await
        .map_err(|source| NetError::Resolve {
            host: spec.to_string(),
            source,
        })?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv6() == prefer_v6)
        .or(addrs.first())
        .copied()
        .ok_or(NetError::NoAddress {
            host: spec.to_string(),
            family: if prefer_v6 { "IPv6" } else { "IPv4" },
        })
}

/// The local IP the kernel picks to reach `dest` (a connected UDP socket
/// sends nothing, it only asks the routing table).
pub fn route_source(dest: SocketAddr) -> Result<IpAddr, NetError> {
    let any = match dest {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    };
    let s =
        std::net::UdpSocket::bind(any).map_err(|source| NetError::Bind { addr: any, source })?;
    s.connect(dest)
        .and_then(|_| s.local_addr())
        .map(|a| a.ip())
        .map_err(|source| NetError::NoRoute { dest, source })
}

/// Binds a non-blocking UDP socket for tokio. `reuse` sets SO_REUSEADDR so
/// a server restart does not wait for old sockets.
pub fn bind_udp(addr: SocketAddr, reuse: bool) -> Result<UdpSocket, NetError> {
    let err = |source| NetError::Bind { addr, source };
    let s =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        s.set_only_v6(true).map_err(err)?;
    }
    if reuse {
        s.set_reuse_address(true).map_err(err)?;
    }
    s.set_nonblocking(true).map_err(err)?;
    s.bind(&addr.into()).map_err(err)?;
    UdpSocket::from_std(s.into()).map_err(err)
}

/// Receive and send buffer for a socket that takes bursts: the server (forty
/// peers behind one NAT starting at once send ~1500 datagrams within
/// 50 ms; with Linux's default 208 KB receive buffer the lab server dropped
/// 1473 of 4567, measured with `nstat UdpRcvbufErrors`) and a peer's main
/// socket, which carries every QUIC session. 4 MiB holds ~2000 full-size
/// datagrams; it is a cap, not an allocation.
pub const BURST_BUFFER: usize = 4 << 20;

/// Raises a socket's buffers to `bytes`. The kernel caps the plain option
/// at `net.core.rmem_max`/`wmem_max`; root (a server) may go past the cap
/// with SO_RCVBUFFORCE/SO_SNDBUFFORCE. Best effort: returns the receive
/// buffer the kernel granted.
pub fn grow_buffers(sock: &UdpSocket, bytes: usize) -> usize {
    let s = socket2::SockRef::from(sock);
    let _ = s.set_recv_buffer_size(bytes);
    let _ = s.set_send_buffer_size(bytes);
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        let force = |opt: libc::c_int| {
            // SAFETY: setsockopt on a socket we own, with a c_int value.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if s.recv_buffer_size().is_ok_and(|got| got < bytes) {
            force(libc::SO_RCVBUFFORCE);
        }
        if s.send_buffer_size().is_ok_and(|got| got < bytes) {
            force(libc::SO_SNDBUFFORCE);
        }
    }
    let got = s.recv_buffer_size().unwrap_or(0);
    tracing::debug!(asked = bytes, got, "socket buffers");
    got
}

/// Binds a listening TCP socket for tokio.
pub fn bind_tcp_listener(addr: SocketAddr) -> Result<tokio::net::TcpListener, NetError> {
    let err = |source| NetError::Bind { addr, source };
    let s =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    if addr.is_ipv6() {
        s.set_only_v6(true).map_err(err)?;
    }
    s.set_reuse_address(true).map_err(err)?;
    s.set_nonblocking(true).map_err(err)?;
    s.bind(&addr.into()).map_err(err)?;
    // Backlog: a STUN server's TCP connections are short; 1024 absorbs a
    // burst of clients without the kernel's SYN queue dropping them.
    s.listen(1024).map_err(err)?;
    tokio::net::TcpListener::from_std(s.into()).map_err(err)
}
