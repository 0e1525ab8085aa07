//! The one UDP socket, shared by QUIC and the control traffic.
//!
//! [`MuxSocket`] is quinn's [`AsyncUdpSocket`]: quinn reads and writes the
//! socket through it, with the kernel's batch and GSO/GRO paths
//! (`quinn-udp`). It tells the protocols apart by the first byte:
//!
//! | first byte | what                                   |
//! |------------|----------------------------------------|
//! | 0x00–0x03  | STUN (RFC 8489 §5: top two bits zero)  |
//! | 0x2A       | rendezvous frames                      |
//! | 0x2B       | punch probes                           |
//! | 0x40–0xFF  | QUIC (RFC 9000 §17: fixed bit set; greasing it is off) |
//!
//! Everything below 0x40 is handed to the peer driver's channel; QUIC stays.
//!
//! It also keeps, for the sessions the driver asks it to watch, the time
//! of the last datagram heard from the peer and the sends since, so that a
//! dead path (a NAT that dropped or changed its mapping) is noticed in a
//! second or two, and an *alias*: the address quinn knows a peer by stays
//! fixed while the datagrams go to (and come from) the peer's new address
//! that re-punching found. QUIC clients do not follow a server that moves
//! (RFC 9000 §9), so this layer does it for them.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// A datagram for the peer driver: (socket index, source, bytes).
pub type Datagram = (usize, SocketAddr, Vec<u8>);

/// Largest control datagram we pass on: STUN, rendezvous and probe frames
/// are all far smaller; a bigger one is garbage and must not make the
/// driver's queue hold GRO-sized buffers.
pub const MAX_CONTROL: usize = 2048;

/// RFC 9000 §17.2/§17.3: both header forms set 0x40 (the fixed bit); with
/// greasing off every QUIC packet we accept starts at 0x40 or above.
pub fn is_quic(first: u8) -> bool {
    first >= 0x40
}

/// Liveness of one watched peer address.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// The last datagram from the peer.
    pub last_rx: Instant,
    /// The first datagram we sent after `last_rx`, if any.
    pub first_unanswered: Option<Instant>,
    /// How many datagrams we sent since `last_rx`.
    pub unanswered: u32,
    /// The gap before `last_rx`: small while the peer is sending steadily.
    pub prev_gap: std::time::Duration,
}

#[derive(Default)]
struct Paths {
    /// quinn's address for a peer → where its datagrams really go.
    alias: HashMap<SocketAddr, SocketAddr>,
    /// The reverse: a real source → quinn's address for it.
    reverse: HashMap<SocketAddr, SocketAddr>,
    /// Watched peers, by quinn's address.
    watched: HashMap<SocketAddr, Liveness>,
}

/// Counters, read by tests and `-v` logging.
#[derive(Debug, Default)]
pub struct MuxStats {
    pub quic_in: AtomicU64,
    pub diverted: AtomicU64,
    /// Control datagrams dropped because the driver's queue was full.
    pub divert_overflow: AtomicU64,
    /// QUIC segments dropped because a GRO batch mixed them with control
    /// datagrams (QUIC retransmits them).
    pub mixed_dropped: AtomicU64,
}

/// See the module documentation.
pub struct MuxSocket {
    io: Arc<UdpSocket>,
    state: UdpSocketState,
    index: usize,
    divert: mpsc::Sender<Datagram>,
    paths: Mutex<Paths>,
    pub stats: MuxStats,
}

impl fmt::Debug for MuxSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuxSocket")
            .field("local", &self.io.local_addr().ok())
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl MuxSocket {
    /// Wraps `io` (socket number `index` of the driver); control datagrams
    /// go to `divert`.
    pub fn new(
        io: Arc<UdpSocket>,
        index: usize,
        divert: mpsc::Sender<Datagram>,
    ) -> io::Result<Self> {
        let state = UdpSocketState::new(quinn::udp::UdpSockRef::from(&*io))?;
        tracing::debug!(
            socket = index,
            gso = state.max_gso_segments(),
            gro = state.gro_segments(),
            "QUIC on the shared socket"
        );
        Ok(Self {
            io,
            state,
            index,
            divert,
            paths: Mutex::new(Paths::default()),
            stats: MuxStats::default(),
        })
    }

    pub fn socket(&self) -> &Arc<UdpSocket> {
        &self.io
    }

    fn paths(&self) -> MutexGuard<'_, Paths> {
        // A panic while holding this lock cannot leave the maps half-updated
        // in a way that matters; keep going with what is there.
        self.paths.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts tracking the liveness of the peer quinn knows as `addr`.
    pub fn watch(&self, addr: SocketAddr) {
        self.paths().watched.insert(
            addr,
            Liveness {
                last_rx: Instant::now(),
                first_unanswered: None,
                unanswered: 0,
                prev_gap: std::time::Duration::MAX,
            },
        );
    }

    /// Stops tracking `addr` and forgets its alias.
    pub fn unwatch(&self, addr: SocketAddr) {
        let mut p = self.paths();
        p.watched.remove(&addr);
        if let Some(real) = p.alias.remove(&addr) {
            p.reverse.remove(&real);
        }
    }

    pub fn liveness(&self, addr: SocketAddr) -> Option<Liveness> {
        self.paths().watched.get(&addr).copied()
    }

    /// From now on, what quinn sends to `quic_addr` goes to `real`, and
    /// what comes from `real` is reported as from `quic_addr`.
    pub fn set_alias(&self, quic_addr: SocketAddr, real: SocketAddr) {
        let mut p = self.paths();
        if let Some(old) = p.alias.remove(&quic_addr) {
            p.reverse.remove(&old);
        }
        if quic_addr != real {
            p.alias.insert(quic_addr, real);
            p.reverse.insert(real, quic_addr);
        }
    }

    /// Where datagrams to `quic_addr` really go.
    pub fn real_address(&self, quic_addr: SocketAddr) -> SocketAddr {
        self.paths()
            .alias
            .get(&quic_addr)
            .copied()
            .unwrap_or(quic_addr)
    }

    fn divert_one(&self, from: SocketAddr, data: &[u8]) {
        if data.len() > MAX_CONTROL {
            self.stats.divert_overflow.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(%from, len = data.len(), "oversized control datagram dropped");
            return;
        }
        self.stats.diverted.fetch_add(1, Ordering::Relaxed);
        if self
            .divert
            .try_send((self.index, from, data.to_vec()))
            .is_err()
        {
            self.stats.divert_overflow.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(%from, "control queue full: datagram dropped");
        }
    }

    /// Sorts the `n` received batches: control datagrams out, QUIC kept
    /// (compacted to the front). Returns how many batches remain.
    fn sort_received(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], n: usize) -> usize {
        let now = Instant::now();
        let mut kept = 0;
        let mut paths = self.paths();
        for i in 0..n.min(bufs.len()).min(meta.len()) {
            let m = meta[i];
            let len = m.len.min(bufs[i].len());
            let stride = if m.stride == 0 { len.max(1) } else { m.stride };
            let data = &bufs[i][..len];
            let mut quic = 0usize;
            let mut other = 0usize;
            for seg in data.chunks(stride) {
                match seg.first() {
                    Some(&b) if is_quic(b) => quic += 1,
                    Some(_) => other += 1,
                    None => {}
                }
            }
            if other > 0 {
                for seg in data.chunks(stride) {
                    if seg.first().is_some_and(|&b| !is_quic(b)) {
                        self.divert_one(m.addr, seg);
                    }
                }
                if quic > 0 {
                    self.stats
                        .mixed_dropped
                        .fetch_add(quic as u64, Ordering::Relaxed);
                }
                continue;
            }
            if quic == 0 {
                continue;
            }
            self.stats.quic_in.fetch_add(quic as u64, Ordering::Relaxed);
            let addr = paths.reverse.get(&m.addr).copied().unwrap_or(m.addr);
            if let Some(l) = paths.watched.get_mut(&addr) {
                l.prev_gap = now.saturating_duration_since(l.last_rx);
                l.last_rx = now;
                l.first_unanswered = None;
                l.unanswered = 0;
            }
            if kept != i {
                let (front, back) = bufs.split_at_mut(i);
                front[kept][..len].copy_from_slice(&back[0][..len]);
            }
            meta[kept] = RecvMeta { addr, ..m };
            kept += 1;
        }
        kept
    }
}

impl AsyncUdpSocket for MuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable {
            io: self.io.clone(),
            fut: None,
        })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let real = {
            let mut p = self.paths();
            if let Some(l) = p.watched.get_mut(&transmit.destination) {
                l.first_unanswered.get_or_insert_with(Instant::now);
                l.unanswered = l.unanswered.saturating_add(1);
            }
            p.alias.get(&transmit.destination).copied()
        };
        let t = Transmit {
            destination: real.unwrap_or(transmit.destination),
            ecn: transmit.ecn,
            contents: transmit.contents,
            segment_size: transmit.segment_size,
            src_ip: transmit.src_ip,
        };
        self.io.try_io(Interest::WRITABLE, || {
            self.state.send((&*self.io).into(), &t)
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.io.poll_recv_ready(cx))?;
            match self.io.try_io(Interest::READABLE, || {
                self.state.recv((&*self.io).into(), bufs, meta)
            }) {
                Ok(n) => {
                    let kept = self.sort_received(bufs, meta, n);
                    if kept > 0 {
                        return Poll::Ready(Ok(kept));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // ICMP errors and the like: nothing quinn can act on.
                Err(e) => tracing::trace!(error = %e, "receive error"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

type WritableFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>;

/// Wakes one quinn task when the socket can be written again; each task
/// gets its own, so no waker is overwritten.
struct Writable {
    io: Arc<UdpSocket>,
    fut: Option<WritableFuture>,
}

impl fmt::Debug for Writable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writable").finish_non_exhaustive()
    }
}

impl UdpPoller for Writable {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let fut = this.fut.get_or_insert_with(|| {
            let io = this.io.clone();
            Box::pin(async move { io.writable().await })
        });
        let r = fut.as_mut().poll(cx);
        if r.is_ready() {
            this.fut = None;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_byte_classes_do_not_overlap() {
        // STUN's first byte is 0..=3, our frames 0x2A/0x2B; QUIC ≥ 0x40.
        for b in 0u8..=3 {
            assert!(!is_quic(b));
        }
        assert!(!is_quic(0x2A) && !is_quic(0x2B));
        assert!(is_quic(0x40) && is_quic(0xC0) && is_quic(0xFF));
    }
}
