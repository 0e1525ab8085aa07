//! Batched UDP I/O: `recvmmsg`/`sendmmsg` on Linux, so a busy server pays
//! one system call per batch instead of one per datagram.
//!
//! Hand-written on `libc` because the crate made for this, quinn-udp,
//! batches receives but sends one destination per call (GSO needs a single
//! destination), and a STUN server answers many destinations at once.
//! Other platforms fall back to one datagram per call.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// Datagrams per batch. 32 amortises the system call well (each extra
/// datagram costs far less than a call) while keeping buffers at 64 KiB.
pub const BATCH: usize = 32;
/// Bytes per receive slot; larger datagrams are truncated and then fail
/// to decode, which the caller counts as malformed.
pub const SLOT: usize = 2048;

/// Buffers for one batched receive.
pub struct RecvBatch {
    data: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    lens: Vec<usize>,
    count: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    pub fn new() -> Self {
        Self {
            data: vec![0; BATCH * SLOT],
            // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
            addrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            lens: vec![0; BATCH],
            count: 0,
        }
    }

    /// Datagrams from the last receive.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Datagram `i` and its source (`None` if the family is not IP).
    pub fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        let start = i * SLOT;
        (
            &self.data[start..start + self.lens[i]],
            from_storage(&self.addrs[i]),
        )
    }

    /// Receives up to [`BATCH`] datagrams without blocking. `WouldBlock`
    /// when none are waiting.
    pub fn recv(&mut self, sock: &impl AsRawFd) -> io::Result<usize> {
        self.count = 0;
        let mut iovs: Vec<libc::iovec> = self
            .data
            .chunks_exact_mut(SLOT)
            .map(|c| libc::iovec {
                iov_base: c.as_mut_ptr().cast(),
                iov_len: SLOT,
            })
            .collect();
        // SAFETY: zeroed mmsghdr is valid; every pointer set below points
        // into buffers that outlive the call.
        let mut hdrs: Vec<libc::mmsghdr> =
            (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (i, h) in hdrs.iter_mut().enumerate() {
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut iovs[i];
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: hdrs holds BATCH initialised headers as described above.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, h) in hdrs.iter().take(n).enumerate() {
            self.lens[i] = (h.msg_len as usize).min(SLOT);
        }
        self.count = n;
        Ok(n)
    }
}

/// Datagrams queued for one batched send.
#[derive(Default)]
pub struct SendBatch {
    data: Vec<u8>,
    items: Vec<(usize, usize, SocketAddr)>,
}

impl SendBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn clear(&mut self) {
        self.data.clear();
        self.items.clear();
    }

    /// Queues a datagram.
    pub fn push(&mut self, payload: &[u8], to: SocketAddr) {
        let start = self.data.len();
        self.data.extend_from_slice(payload);
        self.items.push((start, payload.len(), to));
    }

    /// Sends the queued datagrams from `skip` on, without blocking; returns
    /// how many went out (`WouldBlock` if none could).
    pub fn send(&mut self, sock: &impl AsRawFd, skip: usize) -> io::Result<usize> {
        let items = &self.items[skip.min(self.items.len())..];
        if items.is_empty() {
            return Ok(0);
        }
        let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
            items.iter().map(|(_, _, a)| to_storage(a)).collect();
        let mut iovs: Vec<libc::iovec> = items
            .iter()
            .map(|(s, l, _)| libc::iovec {
                iov_base: self.data[*s..].as_ptr() as *mut libc::c_void,
                iov_len: *l,
            })
            .collect();
        // SAFETY: as in recv, every pointer targets live buffers.
        let mut hdrs: Vec<libc::mmsghdr> = (0..items.len())
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        for (i, h) in hdrs.iter_mut().enumerate() {
            h.msg_hdr.msg_name = (&mut addrs[i].0 as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = addrs[i].1;
            h.msg_hdr.msg_iov = &mut iovs[i];
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: hdrs has items.len() initialised headers.
        let n = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                hdrs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a = unsafe { &*(s as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn to_storage(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid, and it is large and aligned
    // enough for either address type written into it.
    let mut s: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let p = (&mut s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>();
            // SAFETY: see above.
            unsafe {
                (*p).sin_family = libc::AF_INET as libc::sa_family_t;
                (*p).sin_port = v4.port().to_be();
                (*p).sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            }
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let p = (&mut s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
            // SAFETY: see above.
            unsafe {
                (*p).sin6_family = libc::AF_INET6 as libc::sa_family_t;
                (*p).sin6_port = v6.port().to_be();
                (*p).sin6_addr.s6_addr = v6.ip().octets();
                (*p).sin6_flowinfo = v6.flowinfo();
                (*p).sin6_scope_id = v6.scope_id();
            }
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (s, len as libc::socklen_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_round_trip_on_loopback() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = b.local_addr().unwrap();
        let mut sb = SendBatch::new();
        for i in 0..5u8 {
            sb.push(&[i; 10], to);
        }
        assert_eq!(sb.send(&a, 0).unwrap(), 5);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut rb = RecvBatch::new();
        assert_eq!(rb.recv(&b).unwrap(), 5);
        for i in 0..5 {
            let (d, from) = rb.get(i);
            assert_eq!(d, &[i as u8; 10]);
            assert_eq!(from, a.local_addr().ok());
        }
        assert_eq!(rb.recv(&b).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }
}
