//! Batched UDP I/O: `recvmmsg`/`sendmmsg` on Linux, so a busy server pays
//! one system call per batch instead of one per datagram, and optionally
//! UDP GRO and GSO (Linux 4.18/5.0), so a relayed stream of same-size
//! datagrams crosses the kernel as 64 KB super-datagrams.
//!
//! Hand-written on `libc` because the crate made for this, quinn-udp,
//! batches receives but sends one destination per call (GSO needs a single
//! destination), and a STUN server answers many destinations at once;
//! here each message of a `sendmmsg` may be a GSO batch for its own
//! destination.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// Datagrams per batch. 32 amortises the system call well (each extra
/// datagram costs far less than a call) while keeping buffers at 64 KiB.
pub const BATCH: usize = 32;
/// Bytes per receive slot; larger datagrams are truncated and then fail
/// to decode, which the caller counts as malformed.
pub const SLOT: usize = 2048;
/// Bytes per receive slot with GRO: the largest coalesced batch.
pub const GRO_SLOT: usize = 65_536;
/// GSO: segments per send at most (the kernel's UDP_MAX_SEGMENTS is 64)
/// and bytes per send (a 64 KB IP datagram's worth).
pub const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65_000;
/// linux/udp.h: the socket options and control messages for GSO and GRO
/// (not exported by the libc crate for glibc targets).
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Room for one control message with an int.
const CONTROL: usize = 64;

/// Asks the kernel to coalesce received datagrams (UDP GRO); receive them
/// with [`RecvBatch::with_gro`].
pub fn enable_gro(sock: &impl AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads an int from a valid pointer.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            UDP_GRO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Buffers for one batched receive.
pub struct RecvBatch {
    data: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    lens: Vec<usize>,
    /// Each slot's segment size (GRO; the length when not coalesced).
    strides: Vec<usize>,
    control: Vec<[u8; CONTROL]>,
    slot: usize,
    gro: bool,
    count: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    pub fn new() -> Self {
        Self::sized(SLOT, false)
    }

    /// Buffers for a socket with [`enable_gro`]: each slot may hold up to
    /// 64 KB of coalesced datagrams ([`RecvBatch::segments`]).
    pub fn with_gro() -> Self {
        Self::sized(GRO_SLOT, true)
    }

    fn sized(slot: usize, gro: bool) -> Self {
        Self {
            data: vec![0; BATCH * slot],
            // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
            addrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            lens: vec![0; BATCH],
            strides: vec![0; BATCH],
            control: vec![[0; CONTROL]; if gro { BATCH } else { 0 }],
            slot,
            gro,
            count: 0,
        }
    }

    /// Slot `i`'s datagrams (one, or several coalesced by GRO) and their
    /// source.
    pub fn segments(&self, i: usize) -> (std::slice::Chunks<'_, u8>, Option<SocketAddr>) {
        let start = i * self.slot;
        let data = &self.data[start..start + self.lens[i]];
        (
            data.chunks(self.strides[i].max(1)),
            from_storage(&self.addrs[i]),
        )
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
        let start = i * self.slot;
        (
            &self.data[start..start + self.lens[i]],
            from_storage(&self.addrs[i]),
        )
    }

    /// Receives up to [`BATCH`] datagrams without blocking. `WouldBlock`
    /// when none are waiting.
    pub fn recv(&mut self, sock: &impl AsRawFd) -> io::Result<usize> {
        self.count = 0;
        let slot = self.slot;
        let mut iovs: Vec<libc::iovec> = self
            .data
            .chunks_exact_mut(slot)
            .map(|c| libc::iovec {
                iov_base: c.as_mut_ptr().cast(),
                iov_len: slot,
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
            if self.gro {
                h.msg_hdr.msg_control = self.control[i].as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = CONTROL as _;
            }
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
            self.lens[i] = (h.msg_len as usize).min(slot);
            self.strides[i] = if self.gro {
                gro_size(&h.msg_hdr).unwrap_or(self.lens[i])
            } else {
                self.lens[i]
            };
        }
        self.count = n;
        Ok(n)
    }
}

/// The segment size a GRO receive reported, if it coalesced.
fn gro_size(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: the kernel filled msg_control (msg_controllen bytes) with
    // well-formed control messages; CMSG_* walk them within those bounds.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let size = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(size).ok().filter(|s| *s > 0);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// One message of a batched send: a datagram, or with GSO several of one
/// size (the last may be shorter) for one destination.
#[derive(Debug, Clone, Copy)]
struct Item {
    start: usize,
    len: usize,
    to: SocketAddr,
    /// Segment size when `count > 1`.
    seg: usize,
    count: usize,
}

/// Datagrams queued for one batched send.
#[derive(Default)]
pub struct SendBatch {
    data: Vec<u8>,
    items: Vec<Item>,
    /// Segments per message at most (0 or 1: no GSO).
    gso: usize,
}

impl SendBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Consecutive datagrams of one size for one destination go out as one
    /// GSO message (up to `max_segments`); a socket without GSO support
    /// makes the first such send fail, after which the batch sends them
    /// one by one.
    pub fn with_gso(max_segments: usize) -> Self {
        Self {
            gso: max_segments.min(GSO_MAX_SEGMENTS),
            ..Self::default()
        }
    }

    /// Whether message `i` is a GSO batch.
    pub fn is_gso(&self, i: usize) -> bool {
        self.items.get(i).is_some_and(|it| it.count > 1)
    }

    /// Splits message `i` into single datagrams (GSO stays on for others).
    pub fn split(&mut self, i: usize) {
        let Some(it) = self.items.get(i).copied().filter(|it| it.count > 1) else {
            return;
        };
        let mut singles = Vec::with_capacity(it.count);
        let mut at = it.start;
        let end = it.start + it.len;
        while at < end {
            let len = it.seg.min(end - at);
            singles.push(Item {
                start: at,
                len,
                to: it.to,
                seg: 0,
                count: 1,
            });
            at += len;
        }
        self.items.splice(i..=i, singles);
    }

    /// Whether a message from `from` on is a GSO batch.
    pub fn has_gso_from(&self, from: usize) -> bool {
        self.items.iter().skip(from).any(|it| it.count > 1)
    }

    /// Splits every GSO message from message `from` on into single
    /// datagrams, and sends no more GSO messages.
    pub fn disable_gso_from(&mut self, from: usize) {
        self.gso = 0;
        let mut i = from.min(self.items.len());
        while i < self.items.len() {
            let n = self.items[i].count.max(1);
            self.split(i);
            i += n;
        }
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
        let len = payload.len();
        if self.gso > 1 && len > 0 {
            if let Some(last) = self.items.last_mut() {
                let seg = if last.count == 1 { last.len } else { last.seg };
                let joins = last.to == to
                    && last.start + last.len == start
                    && len <= seg
                    && last.len % seg == 0
                    && last.count < self.gso
                    && last.len + len <= GSO_MAX_BYTES;
                if joins {
                    self.data.extend_from_slice(payload);
                    last.seg = seg;
                    last.len += len;
                    last.count += 1;
                    return;
                }
            }
        }
        self.data.extend_from_slice(payload);
        self.items.push(Item {
            start,
            len,
            to,
            seg: 0,
            count: 1,
        });
    }

    /// Sends the queued datagrams from `skip` on, without blocking; returns
    /// how many went out (`WouldBlock` if none could).
    pub fn send(&mut self, sock: &impl AsRawFd, skip: usize) -> io::Result<usize> {
        let items = &self.items[skip.min(self.items.len())..];
        if items.is_empty() {
            return Ok(0);
        }
        let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
            items.iter().map(|it| to_storage(&it.to)).collect();
        let mut iovs: Vec<libc::iovec> = items
            .iter()
            .map(|it| libc::iovec {
                iov_base: self.data[it.start..].as_ptr() as *mut libc::c_void,
                iov_len: it.len,
            })
            .collect();
        let mut control: Vec<[u8; CONTROL]> = vec![[0; CONTROL]; items.len()];
        // SAFETY: as in recv, every pointer targets live buffers.
        let mut hdrs: Vec<libc::mmsghdr> = (0..items.len())
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        for (i, h) in hdrs.iter_mut().enumerate() {
            h.msg_hdr.msg_name = (&mut addrs[i].0 as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = addrs[i].1;
            h.msg_hdr.msg_iov = &mut iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            if items[i].count > 1 {
                let seg = items[i].seg as u16;
                h.msg_hdr.msg_control = control[i].as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE of a u16 fits in CONTROL bytes; the
                // header and data are written inside that buffer.
                unsafe {
                    h.msg_hdr.msg_controllen = libc::CMSG_SPACE(2) as _;
                    let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
                }
            }
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
    fn gso_batches_arrive_as_datagrams_and_gro_coalesces_them() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (to_b, to_c) = (b.local_addr().unwrap(), c.local_addr().unwrap());
        let mut sb = SendBatch::with_gso(GSO_MAX_SEGMENTS);
        for i in 0..10u8 {
            sb.push(&[i; 1200], to_b);
        }
        sb.push(&[10; 700], to_b); // a shorter last segment joins
        sb.push(&[11; 1200], to_b); // but nothing after it
        sb.push(&[12; 1200], to_c); // nor another destination
        assert_eq!(sb.len(), 3, "three messages");
        let sent = match sb.send(&a, 0) {
            Ok(n) => n,
            // No GSO here: the batch falls back to single datagrams.
            Err(_) => {
                sb.disable_gso_from(0);
                sb.send(&a, 0).unwrap()
            }
        };
        assert_eq!(sent, sb.len());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let gro = enable_gro(&b).is_ok();
        let mut rb = if gro {
            RecvBatch::with_gro()
        } else {
            RecvBatch::new()
        };
        let mut got = Vec::new();
        while let Ok(n) = rb.recv(&b) {
            for i in 0..n {
                let (segs, from) = rb.segments(i);
                assert_eq!(from, a.local_addr().ok());
                got.extend(segs.map(|s| (s[0], s.len())));
            }
        }
        let want: Vec<(u8, usize)> = (0..10u8)
            .map(|i| (i, 1200))
            .chain([(10, 700), (11, 1200)])
            .collect();
        assert_eq!(got, want);
        let mut rc = RecvBatch::new();
        assert_eq!(rc.recv(&c).unwrap(), 1);
        assert_eq!(rc.get(0).0, &[12u8; 1200][..]);
    }

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
