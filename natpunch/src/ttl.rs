//! Limited-TTL probes for hole punching (Wei, Xiao and Chen, "Automatic
//! NAT traversal with limited TTL", 2008).
//!
//! **Why.** When both peers punch at once, the first packet that reaches
//! the other side's NAT before that NAT has a mapping for us is dropped, and
//! some NATs punish it: a port-restricted NAT may answer with an ICMP error
//! or a RST that tears down the peer's fresh mapping, and some symmetric
//! NATs blacklist the endpoint. The punching ladder therefore opens its own
//! mapping(s) first with packets whose TTL is large enough to leave every
//! NAT of ours but too small to reach the peer's NAT, and only then sends
//! at the normal TTL.
//!
//! **How the opener TTL is chosen.** [`discover_hops`] traceroutes to a
//! STUN server with one Binding request per TTL on a socket with
//! `IP_RECVERR`, and reads who dropped each probe from the socket's error
//! queue ([`read_icmp_errors`]). Two Linux facts shape the rule:
//!
//! - a packet whose TTL runs out *at* a NAT is dropped in forwarding, before
//!   source NAT, so it creates no mapping: to open a NAT the probe must pass
//!   it and die at the next router;
//! - a time-exceeded error from a router beyond our NAT is related to the
//!   mapping and un-NATed back to us, so every hop is visible.
//!
//! So the opener TTL is the smallest TTL whose offender has a *public*
//! address after at least one private hop ([`opener_ttl`]): that probe has
//! crossed every NAT whose inside used private addresses (RFC 1918,
//! RFC 6598 shared space, ULA) and died at the first router outside them.
//! Documentation ranges count as public because the NAT lab uses them as
//! its internet.
//!
//! **Limits.** A NAT that sources its time-exceeded errors from its public
//! address looks like a public hop and is missed (with no other private
//! hop the rule answers `None`); routers that send no ICMP, or rate-limit it
//! (Linux: a burst of 6, then 1/s per destination), leave gaps, which the
//! rule steps over; a provider that numbers plain routers (not NATs) from
//! private space yields a TTL larger than needed, which still opens all our
//! NATs but comes closer to the peer. A NAT numbered from public space on
//! both sides is invisible. `None` means no NAT was detected or nothing was
//! learned; the caller then punches at the normal TTL.

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use natpunch_proto::stun::message::{Class, Message, TransactionId};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Defaults for [`discover_hops`]' arguments, with their constraints
/// (tested in `defaults_constraints`).
pub mod defaults {
    use std::time::Duration;

    /// Highest TTL to try. NATs sit at the edge: a home NAT at hop 1 and a
    /// carrier NAT usually within the next few hops, so the opener TTL is
    /// small; 16 still reaches most STUN servers (median internet path is
    /// about 15 hops, CAIDA Ark). traceroute(8) defaults to 30, but we need
    /// the edge, not the whole path. Must stay below 64, Linux's default
    /// TTL (`net.ipv4.ip_default_ttl`), so a probe never outlives a normal
    /// packet.
    pub const MAX_TTL: u8 = 16;

    /// TTLs probed at first; the rest only if the target is farther. A home
    /// NAT, a carrier NAT and the first routers sit within 8 hops, and
    /// every probe that reaches the server is one more request it answers.
    pub const FIRST_WAVE: u8 = 8;

    /// How long to wait for the server's answer after the probes, and for
    /// silent hops after the server answered: 500 ms, RFC 8489 §6.2.1's
    /// initial RTO, since the last hop is an ordinary STUN transaction.
    /// All probes leave at once and every router answers in one RTT, so a
    /// run normally ends well before this.
    pub const PER_HOP_TIMEOUT: Duration = Duration::from_millis(500);
}

/// Error-queue entries read at most per [`read_icmp_errors`] call, so a
/// flood of ICMP cannot keep the caller in one call forever. 64 is far
/// above the one entry per probe that [`discover_hops`] expects.
const MAX_ERRORS_PER_READ: usize = 64;
/// Bytes of the original datagram kept per error. ICMPv6 errors quote up to
/// 1232 bytes (RFC 4443 §2.4(c): the error fits in the 1280-byte minimum
/// MTU), ICMPv4 up to 548 (576 − 28, RFC 1812 §4.3.2.3); the kernel strips
/// the IP and UDP headers. Longer quotes are truncated, and we only need
/// the 20-byte STUN header.
const ERR_PAYLOAD_LEN: usize = 1232;
/// Control buffer for one error-queue read. An `IP_RECVERR` cmsg is
/// CMSG_SPACE(16 + 28) = 64 bytes at most (`sock_extended_err` plus a
/// `sockaddr_in6` offender); 256 leaves room for other enabled cmsgs
/// (timestamps, PKTINFO). Extra cmsgs are truncated (MSG_CTRUNC), never
/// written past the buffer.
const CONTROL_LEN: usize = 256;
/// Largest datagram read while waiting for the STUN answer; as in the
/// server, longer ones are truncated and then fail to decode.
const RECV_BUF: usize = 2048;
/// Receive errors in a row (other than "would block") before giving up,
/// as in iroh's transports (STYLE.md: 8 receive errors in a row are fatal).
/// With `IP_RECVERR` each ICMP error also surfaces once as a receive error
/// (`sk_err`), so single errors are expected.
const MAX_RECV_ERRORS: u32 = 8;

/// ICMPv4 time exceeded (RFC 792).
const ICMP_TIME_EXCEEDED: u8 = 11;
/// ICMPv4 destination unreachable (RFC 792), and its port-unreachable code.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// ICMPv6 time exceeded (RFC 4443 §3.3).
const ICMP6_TIME_EXCEEDED: u8 = 3;
/// ICMPv6 destination unreachable (RFC 4443 §3.1), and its port-unreachable code.
const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PORT_UNREACH: u8 = 4;

/// Errors from [`discover_hops`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TtlError {
    #[error("source address {local_ip} is not the same family as target {target}")]
    FamilyMismatch {
        local_ip: IpAddr,
        target: SocketAddr,
    },
    #[error("cannot bind the probe socket to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot set {option} on the probe socket")]
    SetOption {
        option: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot send the TTL {ttl} probe to {target}")]
    Send {
        ttl: u8,
        target: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot receive on the probe socket")]
    Receive {
        #[source]
        source: io::Error,
    },
}

/// One entry of a socket's error queue that came from an ICMP or ICMPv6
/// error (entries of other origins are drained and dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IcmpError {
    /// The node that sent the error (`SO_EE_OFFENDER`), if the kernel knew.
    pub offender: Option<IpAddr>,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// The errno the kernel derived from it (`ee_errno`).
    pub errno: i32,
    /// Where the failed datagram was going (`msg_name`).
    pub original_destination: Option<SocketAddr>,
    /// Whether this is an ICMPv6 error (types differ from ICMPv4).
    pub icmpv6: bool,
    /// The start of the failed datagram's UDP payload, as quoted by the
    /// offender (at most [`ERR_PAYLOAD_LEN`] bytes; RFC 792 routers may
    /// quote only the UDP header, leaving this empty).
    pub payload: Vec<u8>,
}

impl IcmpError {
    /// TTL (hop limit) exceeded in transit.
    pub fn is_time_exceeded(&self) -> bool {
        let t = if self.icmpv6 {
            ICMP6_TIME_EXCEEDED
        } else {
            ICMP_TIME_EXCEEDED
        };
        self.icmp_type == t
    }

    /// Any destination-unreachable error.
    pub fn is_unreachable(&self) -> bool {
        let t = if self.icmpv6 {
            ICMP6_DEST_UNREACH
        } else {
            ICMP_DEST_UNREACH
        };
        self.icmp_type == t
    }

    /// Port unreachable: the destination host itself answered.
    pub fn is_port_unreachable(&self) -> bool {
        let c = if self.icmpv6 {
            ICMP6_PORT_UNREACH
        } else {
            ICMP_PORT_UNREACH
        };
        self.is_unreachable() && self.icmp_code == c
    }
}

/// What [`discover_hops`] learned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct HopReport {
    /// Who is at each distance: index 0 is TTL 1. `None` where no answer
    /// came. When the target was reached, the last entry is the target.
    pub hops: Vec<Option<IpAddr>>,
    /// The smallest TTL at which the target answered.
    pub target_distance: Option<u8>,
    /// The TTL for NAT-opening probes ([`opener_ttl`] of `hops`).
    pub opener_ttl: Option<u8>,
    /// Every hop before the opener TTL (or before the target) answered, so
    /// the opener TTL is certain. A router that rate-limits its ICMP
    /// errors (Linux: about one per second per destination) leaves a gap,
    /// and a gap can make the rule pick a TTL that reaches too far.
    pub complete: bool,
}

impl HopReport {
    /// The opener TTL, if nothing before it is unknown.
    pub fn certain_opener_ttl(&self) -> Option<u8> {
        let ttl = self.opener_ttl?;
        self.hops
            .iter()
            .take(usize::from(ttl))
            .all(Option::is_some)
            .then_some(ttl)
    }
}

/// Sets the TTL of outgoing unicast packets: `IP_TTL` on an IPv4 socket,
/// `IPV6_UNICAST_HOPS` on an IPv6 one. A dual-stack IPv6 socket (not
/// `IPV6_V6ONLY`) gets `IP_TTL` too, which Linux applies to IPv4-mapped
/// destinations instead of the hop limit.
pub fn set_ttl(sock: &impl AsFd, ttl: u32) -> io::Result<()> {
    let s = SockRef::from(sock);
    if !s.local_addr()?.is_ipv6() {
        return s.set_ttl_v4(ttl);
    }
    s.set_unicast_hops_v6(ttl)?;
    if !s.only_v6()? {
        s.set_ttl_v4(ttl)?;
    }
    Ok(())
}

/// The TTL of outgoing unicast packets (see [`set_ttl`]).
pub fn get_ttl(sock: &impl AsFd) -> io::Result<u32> {
    let s = SockRef::from(sock);
    if s.local_addr()?.is_ipv6() {
        s.unicast_hops_v6()
    } else {
        s.ttl_v4()
    }
}

/// Queues ICMP errors for this socket's datagrams on its error queue
/// (`IP_RECVERR` / `IPV6_RECVERR`), where [`read_icmp_errors`] finds them.
/// Side effect, per ip(7): each error also fails the next receive (or
/// send) once with its errno.
pub fn enable_recverr(sock: &impl AsFd) -> io::Result<()> {
    let s = SockRef::from(sock);
    let (level, name) = if s.local_addr()?.is_ipv6() {
        (libc::SOL_IPV6, libc::IPV6_RECVERR)
    } else {
        (libc::SOL_IP, libc::IP_RECVERR)
    };
    let on: libc::c_int = 1;
    // SAFETY: the option value points at a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Drains the socket's error queue without blocking and returns its ICMP
/// errors, oldest first (at most [`MAX_ERRORS_PER_READ`] per call; call
/// again while it returns a full batch). Empty when the queue is empty.
pub fn read_icmp_errors(sock: &impl AsFd) -> io::Result<Vec<IcmpError>> {
    let fd = sock.as_fd().as_raw_fd();
    let mut out = Vec::new();
    for _ in 0..MAX_ERRORS_PER_READ {
        match recv_error(fd) {
            Ok(Some(Some(e))) => out.push(e),
            // Not from ICMP (e.g. a local EMSGSIZE): drained, skipped.
            Ok(Some(None)) => {}
            Ok(None) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Sends one datagram with its own TTL (hop limit), set per packet as
/// ancillary data (`IP_TTL` / `IPV6_HOPLIMIT` in `sendmsg`, ip(7) and
/// RFC 3542 §6.3), so the socket's default, which QUIC shares, never
/// changes.
pub fn send_with_ttl(sock: &impl AsFd, buf: &[u8], dest: SocketAddr, ttl: u8) -> io::Result<usize> {
    let fd = sock.as_fd().as_raw_fd();
    let v6 = SockRef::from(sock).local_addr()?.is_ipv6();
    let is_v6_dest = dest.is_ipv6();
    let dest = socket2::SockAddr::from(match (v6, dest) {
        // A dual-stack socket reaches IPv4 through a mapped address.
        (true, SocketAddr::V4(a)) => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        (_, d) => d,
    });
    // An IPv4 destination (on a dual-stack socket too) goes out by the IPv4
    // path, which reads IP_TTL and ignores IPV6_HOPLIMIT.
    let (level, kind) = if v6 && is_v6_dest {
        (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT)
    } else {
        (libc::IPPROTO_IP, libc::IP_TTL)
    };
    let mut control = ControlBuf([0; CONTROL_LEN]);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: zeroed msghdr is valid; every pointer set below targets a
    // buffer that outlives the call, with its true length. The control
    // buffer is aligned for cmsghdr and CMSG_SPACE(int) ≤ CONTROL_LEN.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = dest.as_ptr().cast_mut().cast();
        msg.msg_namelen = dest.len();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(io::Error::other("no room for the TTL control message"));
        }
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(
            libc::CMSG_DATA(cmsg).cast::<libc::c_int>(),
            libc::c_int::from(ttl),
        );
        libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A control buffer aligned for `cmsghdr`.
#[repr(C, align(8))]
struct ControlBuf([u8; CONTROL_LEN]);

/// One `recvmsg(MSG_ERRQUEUE)`: `Ok(None)` when the queue is empty,
/// `Ok(Some(None))` for an entry that is not an ICMP error.
fn recv_error(fd: libc::c_int) -> io::Result<Option<Option<IcmpError>>> {
    let mut payload = [0u8; ERR_PAYLOAD_LEN];
    let mut control = ControlBuf([0; CONTROL_LEN]);
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: zeroed msghdr is valid; every pointer set below targets a
    // local buffer that outlives the call, with its true length.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = CONTROL_LEN as _;
    let n = loop {
        // SAFETY: msg describes the buffers above; the kernel writes
        // within the lengths it is given.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(e),
        }
    };
    let controllen = (msg.msg_controllen as usize).min(CONTROL_LEN);
    let Some(ext) = parse_control(&control, controllen) else {
        return Ok(Some(None));
    };
    let (origin_ok, icmpv6) = match ext.ee.ee_origin {
        libc::SO_EE_ORIGIN_ICMP => (true, false),
        libc::SO_EE_ORIGIN_ICMP6 => (true, true),
        _ => (false, false),
    };
    if !origin_ok {
        return Ok(Some(None));
    }
    let namelen = (msg.msg_namelen as usize).min(size_of::<libc::sockaddr_storage>());
    // SAFETY: name is a live sockaddr_storage; we view its first namelen
    // bytes (clamped to its size) as bytes.
    let name_bytes = unsafe {
        std::slice::from_raw_parts(
            (&name as *const libc::sockaddr_storage).cast::<u8>(),
            namelen,
        )
    };
    Ok(Some(Some(IcmpError {
        offender: ext.offender,
        icmp_type: ext.ee.ee_type,
        icmp_code: ext.ee.ee_code,
        errno: i32::try_from(ext.ee.ee_errno).unwrap_or(i32::MAX),
        original_destination: sockaddr_from_bytes(name_bytes),
        icmpv6,
        payload: payload[..n.min(ERR_PAYLOAD_LEN)].to_vec(),
    })))
}

/// The extended error found in a control buffer.
struct Extended {
    ee: libc::sock_extended_err,
    offender: Option<IpAddr>,
}

/// Finds the `IP_RECVERR` (or `IPV6_RECVERR`) cmsg in the first
/// `controllen` bytes of `control`. Never reads outside them, whatever
/// the lengths claim.
fn parse_control(control: &ControlBuf, controllen: usize) -> Option<Extended> {
    let controllen = controllen.min(CONTROL_LEN);
    let base = control.0.as_ptr() as usize;
    // SAFETY: zeroed msghdr is valid; it only describes the control buffer
    // for the CMSG_* walkers, which read it and never write.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_control = control.0.as_ptr() as *mut libc::c_void;
    msg.msg_controllen = controllen as _;
    // SAFETY: CMSG_FIRSTHDR reads only msg, and returns null unless a whole
    // cmsghdr fits in msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        let off = cmsg as usize - base;
        // SAFETY: FIRSTHDR/NXTHDR return only headers that lie wholly
        // within the buffer, and the buffer is 8-aligned like the kernel's
        // CMSG_ALIGN, so this is an aligned in-bounds read.
        let hdr = unsafe { std::ptr::read(cmsg) };
        let len = hdr.cmsg_len as usize;
        // A length past the buffer (truncated or bogus): stop before the
        // walkers compute with it.
        if len < size_of::<libc::cmsghdr>() || len > controllen - off {
            return None;
        }
        // SAFETY: pointer arithmetic within the header checked above.
        let data_start = unsafe { libc::CMSG_DATA(cmsg) } as usize - base;
        let data = control.0.get(data_start..off + len).unwrap_or(&[]);
        let is_err = (hdr.cmsg_level == libc::SOL_IP && hdr.cmsg_type == libc::IP_RECVERR)
            || (hdr.cmsg_level == libc::SOL_IPV6 && hdr.cmsg_type == libc::IPV6_RECVERR);
        if is_err {
            return parse_extended(data);
        }
        // SAFETY: msg describes the buffer; cmsg is a header inside it
        // whose length was checked to fit, so NXTHDR's sums cannot wrap.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    None
}

/// A `sock_extended_err` followed by its offender address.
fn parse_extended(data: &[u8]) -> Option<Extended> {
    let ee_len = size_of::<libc::sock_extended_err>();
    if data.len() < ee_len {
        return None;
    }
    let ee_ptr = data.as_ptr().cast::<libc::sock_extended_err>();
    // SAFETY: data holds at least one sock_extended_err (checked above);
    // read_unaligned copies it out whatever the alignment.
    let ee = unsafe { std::ptr::read_unaligned(ee_ptr) };
    // SAFETY: SO_EE_OFFENDER is `ee + 1`, pointer arithmetic that stays
    // within (or one past) data, since data holds a whole ee.
    let off_ptr = unsafe { libc::SO_EE_OFFENDER(ee_ptr) };
    let start = off_ptr as usize - data.as_ptr() as usize;
    let offender = sockaddr_from_bytes(data.get(start..).unwrap_or(&[])).map(|a| a.ip());
    Some(Extended { ee, offender })
}

/// An IPv4 or IPv6 socket address from the bytes of a `sockaddr`; `None`
/// for another family (the kernel leaves AF_UNSPEC when it has no
/// offender) or too few bytes.
fn sockaddr_from_bytes(b: &[u8]) -> Option<SocketAddr> {
    let fam = b.get(..size_of::<libc::sa_family_t>())?;
    let family = libc::sa_family_t::from_ne_bytes(fam.try_into().ok()?);
    match i32::from(family) {
        libc::AF_INET if b.len() >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: b holds a whole sockaddr_in (checked); read_unaligned
            // copies it out whatever the alignment.
            let a = unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<libc::sockaddr_in>()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if b.len() >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for a whole sockaddr_in6.
            let a = unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<libc::sockaddr_in6>()) };
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

/// Whether a hop's address is public for the opener rule: anything but
/// private (RFC 1918, RFC 6598 shared 100.64.0.0/10, IPv6 ULA), loopback,
/// link-local, unspecified/"this network", 192.0.0.0/24 (IETF protocol
/// assignments, e.g. DS-Lite), broadcast, multicast and reserved space.
/// Documentation (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
/// 2001:db8::/32) and benchmarking (198.18.0.0/15) ranges count as
/// public: the NAT lab's internet is numbered from them.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let first = v6.segments()[0];
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || first & 0xfe00 == 0xfc00 // ULA fc00::/7
                || first & 0xffc0 == 0xfe80 // link-local fe80::/10
                || first & 0xffc0 == 0xfec0) // site-local fec0::/10 (deprecated)
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    let shared = a == 100 && (64..128).contains(&b); // RFC 6598
    let ietf = a == 192 && b == 0 && c == 0; // RFC 6890 192.0.0.0/24
    !(ip.is_private()
        || shared
        || ietf
        || ip.is_loopback()
        || ip.is_link_local()
        || a == 0
        || ip.is_broadcast()
        || ip.is_multicast()
        || a >= 240)
}

/// The opener TTL for a path: the smallest TTL whose hop is public
/// ([`is_public`]) and comes after at least one non-public hop. `None` if
/// no non-public hop precedes a public one (no NAT seen, or nothing
/// learned). Unknown hops (`None`) are skipped. See the module doc for
/// the limits of this rule.
pub fn opener_ttl(hops: &[Option<IpAddr>]) -> Option<u8> {
    let mut private_seen = false;
    for (i, hop) in hops.iter().enumerate() {
        let Some(ip) = hop else { continue };
        if !is_public(*ip) {
            private_seen = true;
        } else if private_seen {
            return u8::try_from(i + 1).ok();
        }
    }
    None
}

/// Traceroutes from `local_ip` to the STUN server `target` with one
/// Binding request per TTL from 1 to `max_ttl`, all sent at once (each
/// with its own TTL), so the whole path is known in about one round trip
/// to the target. Each router sees exactly one expiring probe, so ICMP
/// rate limits (Linux: per destination) do not bite. Any STUN response
/// (success or error) or a port unreachable from the target means the
/// target was reached at that TTL; a destination-unreachable from a router
/// ends the path early. Errors are matched to their probe by the
/// transaction ID quoted in them. The run ends when every hop before the
/// target has answered, or `per_hop_timeout` after the target did (hops
/// that send no ICMP stay unknown), or `per_hop_timeout` after the sends if
/// the target never answers. See the module doc for how `opener_ttl` is
/// chosen.
pub async fn discover_hops(
    local_ip: IpAddr,
    target: SocketAddr,
    max_ttl: u8,
    per_hop_timeout: Duration,
) -> Result<HopReport, TtlError> {
    if local_ip.is_ipv4() != target.is_ipv4() {
        return Err(TtlError::FamilyMismatch { local_ip, target });
    }
    let sock = bind_probe_socket(SocketAddr::new(local_ip, 0))?;
    let mut run = Run {
        target,
        ids: Vec::new(),
        hops: Vec::new(),
        target_distance: None,
        path_ended: false,
    };
    let mut buf = vec![0u8; RECV_BUF];
    let mut recv_errors = 0u32;
    tracing::debug!(local = %local_ip, %target, max_ttl, "discovering hops");
    let first_wave = max_ttl.min(defaults::FIRST_WAVE);
    // A probe that cannot be sent (a local firewall, a full buffer) leaves
    // its hop unknown, like a lost one; only a wave of failures is an error.
    let mut sent = 0u8;
    let mut last_error = None;
    for ttl in 1..=first_wave {
        match send_ttl(&sock, &mut run, ttl).await {
            Ok(()) => sent += 1,
            Err(e) => {
                tracing::debug!(error = %e, "hop probe not sent");
                last_error = Some(e);
            }
        }
    }
    if let (0, Some(e)) = (sent, last_error) {
        return Err(e);
    }
    let started = tokio::time::Instant::now();
    let mut deadline = started + per_hop_timeout;
    let mut reached = false;
    let mut second_wave = first_wave >= max_ttl;
    while !run.complete() {
        let now = tokio::time::Instant::now();
        if !second_wave
            && run.target_distance.is_none()
            && (run.first_wave_answered(first_wave) || now >= started + per_hop_timeout / 2)
        {
            // The near hops answered (or some stay silent) and the target
            // is farther: the rest.
            second_wave = true;
            for ttl in first_wave + 1..=max_ttl {
                if let Err(e) = send_ttl(&sock, &mut run, ttl).await {
                    tracing::debug!(error = %e, "hop probe not sent");
                }
            }
            deadline = now + per_hop_timeout;
        }
        // Until the second wave is sent (or no longer needed), wake for it
        // halfway; after that only the deadline matters. (A wake time in the
        // past here would spin without ever yielding.)
        let wake = if second_wave || run.target_distance.is_some() {
            deadline
        } else {
            deadline.min(started + per_hop_timeout / 2)
        };
        if !reached && run.target_distance.is_some() {
            // Hops that have not answered by now are given a little longer.
            reached = true;
            deadline = deadline.min(tokio::time::Instant::now() + per_hop_timeout);
        }
        let ready =
            match tokio::time::timeout_at(wake, sock.ready(Interest::READABLE | Interest::ERROR))
                .await
            {
                Err(_) if wake < deadline => continue,
                Err(_) => break,
                Ok(r) => r.map_err(|source| TtlError::Receive { source })?,
            };
        if ready.is_error() {
            // try_io clears the error readiness only when the closure
            // says WouldBlock, i.e. once the queue is empty.
            match sock.try_io(Interest::ERROR, || {
                let v = read_icmp_errors(&sock)?;
                if v.is_empty() {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(v)
                }
            }) {
                Ok(v) => v.into_iter().for_each(|e| run.apply(max_ttl, e)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(source) => return Err(TtlError::Receive { source }),
            }
        }
        if ready.is_readable() {
            loop {
                match sock.try_recv_from(&mut buf) {
                    Ok((n, from)) => {
                        recv_errors = 0;
                        run.answer(from, &buf[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // The errno of a queued ICMP error surfaces once
                    // here (sk_err); the error queue has its details.
                    Err(source) => {
                        recv_errors += 1;
                        tracing::trace!(error = %source, "receive error");
                        if recv_errors >= MAX_RECV_ERRORS {
                            return Err(TtlError::Receive { source });
                        }
                    }
                }
            }
        }
    }
    // Anything that arrived while we were finishing.
    if let Ok(v) = read_icmp_errors(&sock) {
        v.into_iter().for_each(|e| run.apply(max_ttl, e));
    }
    let complete = run.complete();
    let mut hops = run.hops;
    if let Some(d) = run.target_distance {
        hops.truncate(usize::from(d));
    }
    let report = HopReport {
        opener_ttl: opener_ttl(&hops),
        hops,
        target_distance: run.target_distance,
        complete,
    };
    tracing::debug!(?report, "hop discovery done");
    Ok(report)
}

/// A UDP socket for tokio with `IP_RECVERR` on.
fn bind_probe_socket(addr: SocketAddr) -> Result<UdpSocket, TtlError> {
    let bind = |source| TtlError::Bind { addr, source };
    let s =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(bind)?;
    if addr.is_ipv6() {
        s.set_only_v6(true).map_err(bind)?;
    }
    s.set_nonblocking(true).map_err(bind)?;
    s.bind(&addr.into()).map_err(bind)?;
    let option = if addr.is_ipv6() {
        "IPV6_RECVERR"
    } else {
        "IP_RECVERR"
    };
    enable_recverr(&s).map_err(|source| TtlError::SetOption { option, source })?;
    UdpSocket::from_std(s.into()).map_err(bind)
}

/// Sends the probe for `ttl` (the next one) with a new transaction ID.
async fn send_ttl(sock: &UdpSocket, run: &mut Run, ttl: u8) -> Result<(), TtlError> {
    let id: [u8; 12] = rand::random();
    run.ids.push(id);
    run.hops.push(None);
    let req = Message::binding_request(TransactionId::new(id)).to_bytes();
    send_probe(sock, run, ttl, &req).await
}

/// Sends one probe with its own TTL. A pending ICMP error fails the next
/// send once with its errno (ip(7), IP_RECVERR), so we drain the queue
/// first and retry once after draining again.
async fn send_probe(sock: &UdpSocket, run: &mut Run, ttl: u8, req: &[u8]) -> Result<(), TtlError> {
    let drain = |run: &mut Run| {
        if let Ok(v) = read_icmp_errors(sock) {
            v.into_iter().for_each(|e| run.apply(ttl, e));
        }
    };
    drain(run);
    let target = run.target;
    let send = || async {
        sock.async_io(Interest::WRITABLE, || send_with_ttl(sock, req, target, ttl))
            .await
    };
    let Err(e) = send().await else {
        tracing::trace!(ttl, "probe sent");
        return Ok(());
    };
    tracing::trace!(ttl, error = %e, "probe send failed, retrying once");
    drain(run);
    send().await.map(|_| ()).map_err(|source| TtlError::Send {
        ttl,
        target,
        source,
    })
}

/// State of one [`discover_hops`] run.
struct Run {
    target: SocketAddr,
    /// Transaction ID of each probe; index 0 is TTL 1.
    ids: Vec<[u8; 12]>,
    hops: Vec<Option<IpAddr>>,
    target_distance: Option<u8>,
    path_ended: bool,
}

impl Run {
    /// Every probe of the first wave has its hop.
    fn first_wave_answered(&self, wave: u8) -> bool {
        self.hops
            .iter()
            .take(usize::from(wave))
            .all(Option::is_some)
    }

    /// Every hop before the target (or the end of the path) answered.
    fn complete(&self) -> bool {
        let end = match (self.target_distance, self.path_ended) {
            (Some(d), _) => usize::from(d).saturating_sub(1),
            (None, true) => self.hops.iter().rposition(Option::is_some).unwrap_or(0),
            (None, false) => return false,
        };
        self.hops.iter().take(end).all(Option::is_some)
    }

    /// The index of the probe whose transaction ID starts at byte 8 of a
    /// STUN header (the layout of every STUN message).
    fn probe_of(&self, stun: &[u8]) -> Option<usize> {
        let id = stun.get(8..20)?;
        self.ids.iter().position(|p| p[..] == *id)
    }

    fn reached(&mut self, index: usize, at: IpAddr) {
        let ttl = u8::try_from(index + 1).unwrap_or(u8::MAX);
        if self.target_distance.is_none_or(|d| ttl < d) {
            tracing::debug!(ttl, "target reached");
            self.target_distance = Some(ttl);
            if let Some(h) = self.hops.get_mut(index) {
                *h = Some(at);
            }
        }
    }

    /// Records an ICMP error; `current` is the TTL last sent, used when
    /// the quote is too short to name the probe.
    fn apply(&mut self, current: u8, e: IcmpError) {
        if e.original_destination.is_some_and(|d| d != self.target) {
            return;
        }
        let index = match self.probe_of(&e.payload) {
            Some(i) => i,
            None => usize::from(current.saturating_sub(1)),
        };
        tracing::trace!(?e, ttl = index + 1, "icmp error");
        if e.is_time_exceeded() {
            if let (Some(slot), Some(ip)) = (self.hops.get_mut(index), e.offender) {
                if slot.is_none() {
                    tracing::debug!(ttl = index + 1, hop = %ip, "hop");
                    *slot = Some(ip);
                }
            }
        } else if e.is_port_unreachable() && e.offender == Some(self.target.ip()) {
            self.reached(index, self.target.ip());
        } else if e.is_unreachable() {
            tracing::debug!(ttl = index + 1, offender = ?e.offender, code = e.icmp_code, "path ends");
            self.path_ended = true;
        }
    }

    /// A datagram on the socket: the target's STUN answer to one probe.
    fn answer(&mut self, from: SocketAddr, data: &[u8]) {
        if from.ip() != self.target.ip() {
            return;
        }
        let Ok(msg) = Message::decode(data) else {
            return;
        };
        if !matches!(msg.class, Class::Success | Class::Error) {
            return;
        }
        if let Some(i) = self.probe_of(data) {
            self.reached(i, from.ip());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Receives one datagram on a socket with `IP_RECVTTL` and returns the
    /// TTL it arrived with.
    fn recv_ttl(sock: &std::net::UdpSocket) -> Option<i32> {
        let fd = sock.as_raw_fd();
        let mut payload = [0u8; 64];
        let mut control = ControlBuf([0; CONTROL_LEN]);
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        };
        // SAFETY: as in recv_error: local buffers with their true lengths.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.0.as_mut_ptr().cast();
            msg.msg_controllen = CONTROL_LEN as _;
            if libc::recvmsg(fd, &mut msg, 0) < 0 {
                return None;
            }
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_TTL {
                    return Some(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>()));
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        None
    }

    #[test]
    fn per_packet_ttl_applies_to_that_packet_only() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let on: libc::c_int = 1;
        // SAFETY: setsockopt with a live fd and an int option value.
        let rc = unsafe {
            libc::setsockopt(
                rx.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_RECVTTL,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let default = get_ttl(&tx).unwrap();
        let to = rx.local_addr().unwrap();
        assert_eq!(send_with_ttl(&tx, b"low", to, 3).unwrap(), 3);
        assert_eq!(recv_ttl(&rx), Some(3));
        // The socket's own TTL is untouched: the next plain send uses it.
        assert_eq!(get_ttl(&tx).unwrap(), default);
        tx.send_to(b"plain", to).unwrap();
        assert_eq!(recv_ttl(&rx), Some(default as i32));
    }

    fn v4(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn defaults_constraints() {
        const { assert!(defaults::MAX_TTL >= 1 && defaults::MAX_TTL < 64) };
        assert!(
            defaults::PER_HOP_TIMEOUT * u32::from(defaults::MAX_TTL) <= Duration::from_secs(10)
        );
    }

    #[test]
    fn address_classes() {
        for p in [
            "10.0.1.1",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "100.64.1.1",
            "100.127.255.254",
            "127.0.0.1",
            "169.254.1.1",
            "0.0.0.0",
            "192.0.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fc00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(p.parse().unwrap()), "{p} should not be public");
        }
        for p in [
            "198.51.100.1",
            "203.0.113.10",
            "192.0.2.1",
            "198.18.0.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "2001:db8::1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(p.parse().unwrap()), "{p} should be public");
        }
    }

    #[test]
    fn opener_rule() {
        // The lab: double NAT, then single NAT.
        let double = [
            v4("10.0.1.1"),
            v4("100.64.1.1"),
            v4("198.51.100.1"),
            v4("203.0.113.10"),
        ];
        assert_eq!(opener_ttl(&double), Some(3));
        let single = [v4("10.0.2.1"), v4("198.51.100.17"), v4("203.0.113.10")];
        assert_eq!(opener_ttl(&single), Some(2));
        // No NAT on the path, or nothing learned.
        assert_eq!(opener_ttl(&[v4("192.0.2.1"), v4("203.0.113.10")]), None);
        assert_eq!(opener_ttl(&[]), None);
        assert_eq!(opener_ttl(&[None, None, None]), None);
        // Only private hops answered.
        assert_eq!(opener_ttl(&[v4("10.0.0.1"), v4("100.64.0.1"), None]), None);
        // Silent hops are stepped over, on either side.
        assert_eq!(
            opener_ttl(&[None, v4("10.0.0.1"), None, v4("8.8.8.8")]),
            Some(4)
        );
        // A NAT answering from its public address hides itself; a later
        // private hop (a carrier NAT's inside) still counts.
        assert_eq!(
            opener_ttl(&[v4("203.0.113.5"), v4("100.64.0.1"), v4("8.8.8.8")]),
            Some(3)
        );
        // The smallest qualifying TTL wins.
        assert_eq!(
            opener_ttl(&[v4("10.0.0.1"), v4("8.8.4.4"), v4("10.1.0.1"), v4("8.8.8.8")]),
            Some(2)
        );
        // IPv6: ULA, then global.
        let v6 = [
            Some("fd00::1".parse().unwrap()),
            Some("2001:db8::1".parse().unwrap()),
        ];
        assert_eq!(opener_ttl(&v6), Some(2));
    }

    #[test]
    fn long_path_does_not_overflow() {
        let mut hops = vec![v4("10.0.0.1")];
        hops.extend(std::iter::repeat_n(None, 300));
        hops.push(v4("8.8.8.8"));
        assert_eq!(opener_ttl(&hops), None);
    }

    fn control_with(level: i32, ty: i32, data: &[u8]) -> (ControlBuf, usize) {
        let mut c = ControlBuf([0; CONTROL_LEN]);
        // SAFETY: CMSG_LEN/CMSG_SPACE are arithmetic.
        let (len, space) = unsafe {
            (
                libc::CMSG_LEN(data.len() as u32) as usize,
                libc::CMSG_SPACE(data.len() as u32) as usize,
            )
        };
        let hdr = libc::cmsghdr {
            cmsg_len: len as _,
            cmsg_level: level,
            cmsg_type: ty,
        };
        // SAFETY: c is 8-aligned and larger than a cmsghdr.
        unsafe { std::ptr::write(c.0.as_mut_ptr().cast::<libc::cmsghdr>(), hdr) };
        let start = len - data.len();
        c.0[start..len].copy_from_slice(data);
        (c, space)
    }

    fn ee_bytes(origin: u8, ty: u8, code: u8, offender: Option<SocketAddrV4>) -> Vec<u8> {
        let ee = libc::sock_extended_err {
            ee_errno: libc::EHOSTUNREACH as u32,
            ee_origin: origin,
            ee_type: ty,
            ee_code: code,
            ee_pad: 0,
            ee_info: 0,
            ee_data: 0,
        };
        let mut v = vec![0u8; size_of::<libc::sock_extended_err>()];
        // SAFETY: v holds exactly one sock_extended_err.
        unsafe { std::ptr::write_unaligned(v.as_mut_ptr().cast(), ee) };
        // SAFETY: zeroed sockaddr_in is valid.
        let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        if let Some(a) = offender {
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
        }
        let mut b = vec![0u8; size_of::<libc::sockaddr_in>()];
        // SAFETY: b holds exactly one sockaddr_in.
        unsafe { std::ptr::write_unaligned(b.as_mut_ptr().cast(), sin) };
        v.extend_from_slice(&b);
        v
    }

    #[test]
    fn parses_a_recverr_cmsg() {
        let off = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 0);
        let data = ee_bytes(libc::SO_EE_ORIGIN_ICMP, 11, 0, Some(off));
        let (c, len) = control_with(libc::SOL_IP, libc::IP_RECVERR, &data);
        let ext = parse_control(&c, len).expect("parsed");
        assert_eq!(ext.ee.ee_type, 11);
        assert_eq!(ext.offender, Some(IpAddr::V4(*off.ip())));
        // No offender (AF_UNSPEC).
        let data = ee_bytes(libc::SO_EE_ORIGIN_ICMP, 11, 0, None);
        let (c, len) = control_with(libc::SOL_IP, libc::IP_RECVERR, &data);
        assert_eq!(parse_control(&c, len).expect("parsed").offender, None);
        // Other cmsgs are skipped.
        let (c, len) = control_with(libc::SOL_SOCKET, libc::SO_TIMESTAMP, &data);
        assert!(parse_control(&c, len).is_none());
    }

    #[test]
    fn odd_control_data_never_panics() {
        let off = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 0);
        let data = ee_bytes(libc::SO_EE_ORIGIN_ICMP, 11, 0, Some(off));
        let (c, len) = control_with(libc::SOL_IP, libc::IP_RECVERR, &data);
        // Every truncation of the buffer.
        for l in 0..=len {
            let _ = parse_control(&c, l);
        }
        // A too-short error (offender cut off, then the ee itself).
        for cut in 0..data.len() {
            let (c, len) = control_with(libc::SOL_IP, libc::IP_RECVERR, &data[..cut]);
            let parsed = parse_control(&c, len);
            if cut < size_of::<libc::sock_extended_err>() {
                assert!(parsed.is_none());
            }
        }
        // Lengths that lie: tiny, huge, past the buffer.
        for bogus in [0usize, 1, 15, CONTROL_LEN + 1, usize::MAX / 2, usize::MAX] {
            let (mut c, _) = control_with(libc::SOL_IP, libc::IP_RECVERR, &data);
            // SAFETY: c is 8-aligned and starts with a cmsghdr.
            unsafe { (*c.0.as_mut_ptr().cast::<libc::cmsghdr>()).cmsg_len = bogus as _ };
            assert!(parse_control(&c, CONTROL_LEN).is_none());
            assert!(parse_control(&c, usize::MAX).is_none());
        }
        // Garbage everywhere.
        let mut c = ControlBuf([0xff; CONTROL_LEN]);
        assert!(parse_control(&c, CONTROL_LEN).is_none());
        c.0.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        let _ = parse_control(&c, CONTROL_LEN);
        assert_eq!(sockaddr_from_bytes(&[]), None);
        assert_eq!(sockaddr_from_bytes(&[2]), None);
        assert_eq!(sockaddr_from_bytes(&[2, 0, 0, 0]), None);
    }

    #[test]
    fn icmp_error_kinds() {
        let mut e = IcmpError {
            offender: None,
            icmp_type: 11,
            icmp_code: 0,
            errno: libc::EHOSTUNREACH,
            original_destination: None,
            icmpv6: false,
            payload: Vec::new(),
        };
        assert!(e.is_time_exceeded() && !e.is_unreachable());
        e.icmp_type = 3;
        e.icmp_code = 3;
        assert!(e.is_port_unreachable() && e.is_unreachable() && !e.is_time_exceeded());
        e.icmpv6 = true;
        assert!(e.is_time_exceeded() && !e.is_port_unreachable());
        e.icmp_type = 1;
        e.icmp_code = 4;
        assert!(e.is_port_unreachable());
    }

    #[tokio::test]
    async fn ttl_options_round_trip() {
        let s4 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        set_ttl(&s4, 3).unwrap();
        assert_eq!(get_ttl(&s4).unwrap(), 3);
        enable_recverr(&s4).unwrap();
        assert!(read_icmp_errors(&s4).unwrap().is_empty());
        if let Ok(s6) = std::net::UdpSocket::bind("[::1]:0") {
            set_ttl(&s6, 5).unwrap();
            assert_eq!(get_ttl(&s6).unwrap(), 5);
            enable_recverr(&s6).unwrap();
        }
        // Dual stack: both the hop limit and the IPv4 TTL.
        let dual = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP));
        if let Ok(dual) = dual {
            if dual.set_only_v6(false).is_ok() {
                set_ttl(&dual, 7).unwrap();
                assert_eq!(dual.unicast_hops_v6().unwrap(), 7);
                assert_eq!(dual.ttl_v4().unwrap(), 7);
            }
        }
    }

    #[tokio::test]
    async fn loopback_port_unreachable_reaches_the_error_queue() {
        // A closed port on loopback answers port unreachable: the error
        // queue must carry it with the original destination and payload.
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dest = closed.local_addr().unwrap();
        drop(closed);
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        enable_recverr(&s).unwrap();
        s.set_nonblocking(true).unwrap();
        s.send_to(b"0123456789abcdefghijklmn", dest).unwrap();
        let mut got = Vec::new();
        for _ in 0..100 {
            got = read_icmp_errors(&s).unwrap();
            if !got.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let e = got.first().expect("an ICMP error");
        assert!(e.is_port_unreachable(), "{e:?}");
        assert_eq!(e.errno, libc::ECONNREFUSED);
        assert_eq!(e.original_destination, Some(dest));
        assert_eq!(e.offender, Some(dest.ip()));
        assert_eq!(e.payload, b"0123456789abcdefghijklmn");
    }

    #[tokio::test]
    async fn loopback_target_is_one_hop_away() {
        let server = natpunch_proto::stun::server::ServerConfig {
            primary: "127.0.0.1:0".parse().unwrap(),
            alternate: None,
            software: None,
            rate_limit: natpunch_proto::stun::server::DEFAULT_RATE_LIMIT,
        };
        let running = crate::stun_server::RunningServer::start(server)
            .await
            .unwrap();
        let target = running.local_addresses()[0];
        let report = discover_hops(target.ip(), target, 4, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(report.target_distance, Some(1));
        assert_eq!(report.hops, vec![Some(target.ip())]);
        assert_eq!(report.opener_ttl, None);
        running.shutdown().await;
        // A closed port answers port unreachable: reached too.
        let report = discover_hops(target.ip(), target, 4, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(report.target_distance, Some(1), "{report:?}");
    }
}
