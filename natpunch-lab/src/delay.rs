//! A user-space delay line: fixed link delay for the netns lab without netem.
//!
//! The lab needs link delay to reproduce real punch timing, and the usual
//! tool, `tc qdisc … netem delay`, needs `sch_netem`, which the lab's kernel
//! does not have. nftables cannot help either: the kernel has no nft `queue`
//! expression. What it does have is the xtables `NFQUEUE` target, so a rule
//! such as
//!
//! ```text
//! iptables -t mangle -A PREROUTING -i v1 -j NFQUEUE --queue-num 7 --queue-bypass
//! ```
//!
//! hands each packet to user space, and [`run`] holds the packet's verdict
//! for the configured delay before accepting it. The packet itself stays in
//! the kernel; only its metadata crosses (copy mode `NFQNL_COPY_META`).
//!
//! The `nfq` crate (pure Rust netlink) opens, binds and configures the
//! queue. The per-packet path is written by hand on the queue's netlink
//! socket, because `nfq` 0.2.5 costs a `recv` and a `send` per packet and
//! pins a 4 KiB buffer per held packet; that capped the line below
//! 78 kpkt/s (measured: a UDP flood at that rate through two lines came
//! out 80 % reordered). Here, metadata arrives in batches of up to
//! [`defaults::RECV_BATCH`] messages per `recvmmsg`, and one
//! `NFQNL_MSG_VERDICT_BATCH` message ("accept every packet up to id N")
//! releases every packet that is due: a fixed delay releases in arrival
//! order, which is the kernel's id order.
//!
//! It has two layers:
//!
//! - [`DelaySchedule`], the sans-IO core: it is fed `(now, id)` pairs and
//!   says when the oldest packet is due. No clock, no sockets.
//! - [`run`], a thin blocking driver: it waits on the netlink socket with
//!   `ppoll` until the next release time, receives, schedules and releases.
//!
//! # Failure behaviour
//!
//! - Overload drops, never reorders. The queue's fail-open flag stays off:
//!   with it, a packet the kernel cannot queue is accepted *undelayed* and
//!   overtakes the held ones, which TCP reads as loss. Without it, the
//!   kernel drops it and counts the drop (`queue_dropped`,
//!   `user_dropped`), which [`DelayStats::kernel_dropped`] reports. Our own
//!   bound, [`defaults::MAX_QUEUED`], also drops and counts.
//! - When the daemon stops, the kernel destroys the queue, and the
//!   `NFQUEUE` rule then drops every packet unless it carries
//!   `--queue-bypass`. Always add that flag.
//! - On `stop` the driver accepts every held packet at once, so stopping
//!   loses nothing that had reached it.
//! - A malformed kernel message is skipped and counted
//!   ([`DelayStats::malformed`]); this module has no `unwrap` on kernel
//!   data.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nfq::Queue;

/// Limits and tunables of the delay line. Each states its value's reason;
/// the unit test `defaults_constraints` checks how they relate.
pub mod defaults {
    use std::time::Duration;

    /// Most packets held at once: 100 000. A 1 Gbit/s link carries
    /// 1e9 × 0.1 / 8 / 1200 ≈ 10 400 QUIC-size packets in 100 ms, so this
    /// covers 100 ms one way at 1 Gbit/s of small (120-byte) packets, or
    /// 1 s of full ones. Each held packet costs us 16 bytes; the kernel
    /// keeps the packet itself.
    pub const MAX_QUEUED: usize = 100_000;

    /// Kernel queue length (`NFQA_CFG_QUEUE_MAXLEN`): twice [`MAX_QUEUED`].
    /// The kernel counts held packets too, and its default of 1024 would
    /// drop at 20 ms × 51 kpkt/s; above our own bound our counted drop
    /// acts first.
    pub const KERNEL_QUEUE_MAXLEN: u32 = 2 * MAX_QUEUED as u32;

    /// Longest delay accepted: 10 s. The longest real path a lab emulates
    /// (GEO satellite) is ~600 ms one way; more is a configuration error.
    pub const MAX_DELAY: Duration = Duration::from_secs(10);

    /// Longest single wait: 100 ms, the bound on how late `stop` is seen.
    pub const STOP_POLL_INTERVAL: Duration = Duration::from_millis(100);

    /// Messages taken per `recvmmsg`, and per wakeup before due packets
    /// are released: 64. At ~1 µs per message this bounds release
    /// lateness under a flood to well under 0.1 ms.
    pub const RECV_BATCH: usize = 64;

    /// Receive buffer per message: 1 KiB. A metadata-only packet message
    /// is ~100 bytes (headers, ids, interfaces, timestamp); a longer one
    /// is read truncated, and its packet id comes first.
    pub const MSG_BUF: usize = 1024;

    /// Receive errors in a row that end the driver: 8, as iroh's transports
    /// (iroh/src/socket/transports.rs). One error is usually a rejected
    /// verdict echoed back; eight means the socket is broken.
    pub const MAX_CONSECUTIVE_RECV_ERRORS: u32 = 8;

    /// Netlink receive buffer asked for: 8 MiB (`SO_RCVBUFFORCE`, root). A
    /// metadata-only message takes under 1 KiB of buffer (skb truesize), so
    /// a burst of 8 000+ unread packets fits before the kernel drops; the
    /// default ~208 KiB holds a few hundred.
    pub const RCVBUF_BYTES: usize = 8 << 20;
}

/// [`DelaySchedule::push`] refused a packet: the line holds its maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("delay line full: {max_queued} packets held")]
pub struct QueueFull {
    pub max_queued: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    release: Instant,
    id: u32,
}

/// Sans-IO core: a FIFO of packet ids, each released `delay` after it was
/// pushed.
///
/// A fixed delay keeps order. If the caller's `now` ever goes backwards, a
/// packet's release time is raised to its predecessor's so order still holds
/// and [`DelaySchedule::poll_timeout`] stays the earliest release.
#[derive(Debug, Clone)]
pub struct DelaySchedule {
    delay: Duration,
    max_queued: usize,
    held: VecDeque<Held>,
    high_water: usize,
}

impl DelaySchedule {
    /// A schedule holding at most [`defaults::MAX_QUEUED`] packets.
    pub fn new(delay: Duration) -> Self {
        Self::with_max_queued(delay, defaults::MAX_QUEUED)
    }

    /// A schedule holding at most `max_queued` packets.
    pub fn with_max_queued(delay: Duration, max_queued: usize) -> Self {
        Self {
            delay,
            max_queued,
            held: VecDeque::new(),
            high_water: 0,
        }
    }

    pub fn delay(&self) -> Duration {
        self.delay
    }

    pub fn max_queued(&self) -> usize {
        self.max_queued
    }

    /// Records packet `id`, which arrived at `now`. Fails when the line is
    /// full; the caller then drops the packet.
    pub fn push(&mut self, now: Instant, id: u32) -> Result<(), QueueFull> {
        if self.held.len() >= self.max_queued {
            return Err(QueueFull {
                max_queued: self.max_queued,
            });
        }
        // An `Instant` this close to its end cannot occur with a monotonic
        // clock; releasing at `now` beats a panic.
        let mut release = now.checked_add(self.delay).unwrap_or(now);
        if let Some(last) = self.held.back() {
            release = release.max(last.release);
        }
        self.held.push_back(Held { release, id });
        self.high_water = self.high_water.max(self.held.len());
        Ok(())
    }

    /// When the oldest held packet is due; `None` when nothing is held.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.held.front().map(|h| h.release)
    }

    /// Releases the oldest packet if it is due at `now`. Call until `None`.
    /// A call before the deadline (a spurious wakeup) changes nothing.
    pub fn pop_due(&mut self, now: Instant) -> Option<u32> {
        match self.held.front() {
            Some(h) if h.release <= now => self.held.pop_front().map(|h| h.id),
            _ => None,
        }
    }

    /// Releases the oldest packet whatever its time (for shutdown).
    pub fn pop_next(&mut self) -> Option<u32> {
        self.held.pop_front().map(|h| h.id)
    }

    /// Packets held now.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Most packets held at once so far.
    pub fn high_water(&self) -> usize {
        self.high_water
    }
}

/// Which queue setting the kernel refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueSetting {
    CopyRange,
    QueueMaxLen,
    FailOpen,
    Gso,
}

/// Why [`run`] stopped. All are fatal: the queue is closed on return, and
/// the kernel then drops any packet it still held for us.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DelayError {
    #[error("delay {delay:?} exceeds the maximum {max:?}")]
    InvalidDelay { delay: Duration, max: Duration },
    #[error("cannot open the nfnetlink queue socket")]
    Open(#[source] io::Error),
    /// Usually EPERM (not root) or EBUSY (another process owns the queue).
    #[error("cannot bind NFQUEUE {queue}")]
    Bind {
        queue: u16,
        #[source]
        source: io::Error,
    },
    #[error("NFQUEUE {queue}: the kernel refused setting {setting:?}")]
    Configure {
        queue: u16,
        setting: QueueSetting,
        #[source]
        source: io::Error,
    },
    /// Reading `/proc` to find the queue's socket failed.
    #[error("NFQUEUE {queue}: cannot look up the queue's netlink socket")]
    SocketLookup {
        queue: u16,
        #[source]
        source: io::Error,
    },
    /// No open file descriptor is the queue's netlink socket.
    #[error("NFQUEUE {queue}: no file descriptor has netlink port id {portid:?}")]
    SocketNotFound { queue: u16, portid: Option<u32> },
    #[error("waiting on the NFQUEUE socket failed")]
    Poll(#[source] io::Error),
    #[error("NFQUEUE {queue}: {consecutive} receive errors in a row")]
    Recv {
        queue: u16,
        consecutive: u32,
        #[source]
        source: io::Error,
    },
    #[error("NFQUEUE {queue}: sending a verdict failed")]
    Verdict {
        queue: u16,
        #[source]
        source: io::Error,
    },
}

/// What [`run`] is to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayLineConfig {
    /// The `--queue-num` of the `NFQUEUE` rule.
    pub queue: u16,
    /// Added to every packet, at most [`defaults::MAX_DELAY`].
    pub delay: Duration,
}

/// Counters returned by [`run`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DelayStats {
    /// Packets received from the kernel (delayed or dropped).
    pub packets: u64,
    /// Packets dropped because [`defaults::MAX_QUEUED`] were held.
    pub dropped_overflow: u64,
    /// Most packets held at once.
    pub max_queued: usize,
    /// Receive errors that were not fatal (see
    /// [`defaults::MAX_CONSECUTIVE_RECV_ERRORS`]).
    pub recv_errors: u64,
    /// Verdict messages sent (one per release batch, one per drop): the
    /// line's cost is per batch, not per packet.
    pub verdicts: u64,
    /// Verdicts the kernel refused.
    pub verdict_errors: u64,
    /// Kernel messages skipped as malformed.
    pub malformed: u64,
    /// Packets the kernel dropped because its queue or our socket was
    /// full, read at stop.
    pub kernel_dropped: u64,
}

/// Runs a delay line on NFQUEUE `config.queue` until `stop` is set, in the
/// network namespace of the calling thread. Blocks; `stop` is noticed within
/// [`defaults::STOP_POLL_INTERVAL`]. Needs CAP_NET_ADMIN.
///
/// On `stop` every held packet is accepted at once and the counters are
/// returned.
pub fn run(config: &DelayLineConfig, stop: &AtomicBool) -> Result<DelayStats, DelayError> {
    if config.delay > defaults::MAX_DELAY {
        return Err(DelayError::InvalidDelay {
            delay: config.delay,
            max: defaults::MAX_DELAY,
        });
    }
    let mut line = Line::open(config)?;
    tracing::debug!(
        queue = config.queue,
        delay = ?config.delay,
        fd = line.fd,
        "delay line started"
    );
    loop {
        // Check the clock before arming the wait (STYLE: drivers check the
        // clock before polling the sleep).
        let now = Instant::now();
        line.release_due(now)?;
        if stop.load(Ordering::Acquire) {
            break;
        }
        let wait = line
            .schedule
            .poll_timeout()
            .map_or(defaults::STOP_POLL_INTERVAL, |t| {
                t.saturating_duration_since(now)
                    .min(defaults::STOP_POLL_INTERVAL)
            });
        if wait_readable(line.fd, wait)? {
            line.receive()?;
        }
    }
    line.shutdown()?;
    tracing::debug!(queue = config.queue, stats = ?line.stats, "delay line stopped");
    Ok(line.stats)
}

/// The driver's state: the queue (kept open for its socket), the socket,
/// the schedule of held packet ids and the receive buffers.
struct Line {
    /// Owns the netlink socket `fd`; used for setup only.
    _queue: Queue,
    queue_num: u16,
    fd: RawFd,
    schedule: DelaySchedule,
    bufs: Vec<[u8; defaults::MSG_BUF]>,
    consecutive_errors: u32,
    seq: u32,
    stats: DelayStats,
}

impl Line {
    fn open(config: &DelayLineConfig) -> Result<Self, DelayError> {
        let q = config.queue;
        let configure = |setting| {
            move |source| DelayError::Configure {
                queue: q,
                setting,
                source,
            }
        };
        let mut queue = Queue::open().map_err(DelayError::Open)?;
        queue
            .bind(q)
            .map_err(|source| DelayError::Bind { queue: q, source })?;
        queue
            .set_queue_max_len(q, defaults::KERNEL_QUEUE_MAXLEN)
            .map_err(configure(QueueSetting::QueueMaxLen))?;
        // Overload drops (counted) rather than passing packets undelayed,
        // which would reorder them (module doc).
        queue
            .set_fail_open(q, false)
            .map_err(configure(QueueSetting::FailOpen))?;
        // We never read the payload, so GSO super-packets may stay whole:
        // the kernel then skips software segmentation.
        queue
            .set_recv_gso(q, true)
            .map_err(configure(QueueSetting::Gso))?;
        // Last: nfq's config calls discard packet messages that arrive while
        // they wait for the ack (the first batch verdict accepts those
        // too), and metadata-only mode (range 0 = NFQNL_COPY_META) in /proc
        // tells an observer that setup is done.
        queue
            .set_copy_range(q, 0)
            .map_err(configure(QueueSetting::CopyRange))?;
        let fd = queue_socket_fd(q)?;
        grow_rcvbuf(fd, defaults::RCVBUF_BYTES);
        queue.set_nonblocking(true);
        Ok(Self {
            _queue: queue,
            queue_num: q,
            fd,
            schedule: DelaySchedule::new(config.delay),
            bufs: vec![[0u8; defaults::MSG_BUF]; defaults::RECV_BATCH],
            consecutive_errors: 0,
            seq: 0,
            stats: DelayStats::default(),
        })
    }

    /// One `recvmmsg`: schedules every packet it carries, drops (one
    /// verdict each) what the schedule cannot hold. Returns how many
    /// datagrams it read.
    fn receive(&mut self) -> Result<usize, DelayError> {
        let n = match recv_batch(self.fd, &mut self.bufs) {
            Ok(lens) => lens,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(0),
            Err(source) => {
                // ENOBUFS: the socket overflowed and the kernel dropped
                // (and counted) packets; the socket itself is fine.
                self.consecutive_errors += 1;
                self.stats.recv_errors += 1;
                tracing::debug!(queue = self.queue_num, error = %source, "NFQUEUE receive error");
                if self.consecutive_errors >= defaults::MAX_CONSECUTIVE_RECV_ERRORS {
                    return Err(DelayError::Recv {
                        queue: self.queue_num,
                        consecutive: self.consecutive_errors,
                        source,
                    });
                }
                return Ok(0);
            }
        };
        self.consecutive_errors = 0;
        let now = Instant::now();
        let mut drops = Vec::new();
        for (buf, &len) in self.bufs.iter().zip(&n) {
            for msg in parse_messages(&buf[..len]) {
                match msg {
                    KernelMessage::Packet(id) => {
                        self.stats.packets += 1;
                        if self.schedule.push(now, id).is_err() {
                            self.stats.dropped_overflow += 1;
                            tracing::trace!(packet_id = id, "delay line full, dropped");
                            drops.push(id);
                        }
                    }
                    KernelMessage::Error(errno) => {
                        // A verdict the kernel refused (say, an id it had
                        // already flushed); nothing to undo.
                        self.stats.verdict_errors += 1;
                        tracing::debug!(queue = self.queue_num, errno, "verdict refused");
                    }
                    KernelMessage::Malformed => {
                        self.stats.malformed += 1;
                        tracing::trace!(
                            queue = self.queue_num,
                            "malformed NFQUEUE message skipped"
                        );
                    }
                    KernelMessage::Other => {}
                }
            }
        }
        for id in drops {
            self.send_verdict(VerdictKind::One, NF_DROP, id)?;
        }
        self.stats.max_queued = self.schedule.high_water();
        Ok(n.len())
    }

    /// Accepts every packet that is due, with one batch verdict.
    fn release_due(&mut self, now: Instant) -> Result<(), DelayError> {
        let mut last = None;
        while let Some(id) = self.schedule.pop_due(now) {
            last = Some(id);
        }
        match last {
            Some(id) => self.send_verdict(VerdictKind::Batch, NF_ACCEPT, id),
            None => Ok(()),
        }
    }

    fn send_verdict(&mut self, kind: VerdictKind, verdict: u32, id: u32) -> Result<(), DelayError> {
        self.seq = self.seq.wrapping_add(1);
        let msg = verdict_message(kind, self.queue_num, verdict, id, self.seq);
        // SAFETY: `msg` is valid for reads of its length during the call.
        let r = unsafe { libc::send(self.fd, msg.as_ptr().cast(), msg.len(), 0) };
        if r < 0 {
            return Err(DelayError::Verdict {
                queue: self.queue_num,
                source: io::Error::last_os_error(),
            });
        }
        self.stats.verdicts += 1;
        Ok(())
    }

    /// Accepts everything held, then whatever is already waiting in the
    /// socket (bounded), so stopping loses nothing that reached us; then
    /// reads the kernel's drop counters.
    fn shutdown(&mut self) -> Result<(), DelayError> {
        let mut last = None;
        while let Some(id) = self.schedule.pop_next() {
            last = Some(id);
        }
        if let Some(id) = last {
            self.send_verdict(VerdictKind::Batch, NF_ACCEPT, id)?;
        }
        for _ in 0..defaults::MAX_QUEUED / defaults::RECV_BATCH {
            if self.receive()? == 0 {
                break;
            }
            while let Some(id) = self.schedule.pop_next() {
                last = Some(id);
            }
            if let Some(id) = last.take() {
                self.send_verdict(VerdictKind::Batch, NF_ACCEPT, id)?;
            }
        }
        self.stats.kernel_dropped = kernel_drops(self.queue_num);
        Ok(())
    }
}

/// `NF_DROP` and `NF_ACCEPT` (linux/netfilter.h).
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

/// A verdict for one packet (`NFQNL_MSG_VERDICT`) or for every packet up to
/// and including an id (`NFQNL_MSG_VERDICT_BATCH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VerdictKind {
    One,
    Batch,
}

/// What one netlink message from the queue says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelMessage {
    /// A queued packet and its id.
    Packet(u32),
    /// `NLMSG_ERROR` with this errno (an ack of 0 never comes: verdicts do
    /// not ask for acks).
    Error(i32),
    /// A message too short for its own header or attributes.
    Malformed,
    /// Anything else (`NLMSG_DONE`, other subsystems).
    Other,
}

/// Netlink message and attribute layout (linux/netlink.h,
/// linux/netfilter/nfnetlink.h, linux/netfilter/nfnetlink_queue.h).
mod wire {
    pub const NLMSG_HDRLEN: usize = 16;
    pub const NFGEN_HDRLEN: usize = 4;
    pub const NLA_HDRLEN: usize = 4;
    pub const NLMSG_ERROR: u16 = 2;
    pub const NLM_F_REQUEST: u16 = 1;
    pub const NFNL_SUBSYS_QUEUE: u16 = 3;
    pub const NFQNL_MSG_PACKET: u16 = 0;
    pub const NFQNL_MSG_VERDICT: u16 = 1;
    pub const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
    pub const NFQA_PACKET_HDR: u16 = 1;
    pub const NFQA_VERDICT_HDR: u16 = 2;
    /// Attribute type bits (the top two are flags).
    pub const NLA_TYPE_MASK: u16 = 0x3fff;

    pub fn align4(n: usize) -> usize {
        (n + 3) & !3
    }
}

fn ne_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Splits one netlink datagram into its messages. Bounded by the datagram:
/// a length field that points past it ends the walk as `Malformed`.
fn parse_messages(datagram: &[u8]) -> Vec<KernelMessage> {
    use wire::*;
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= datagram.len() {
        let (Some(len), Some(ty)) = (ne_u32(datagram, off), ne_u16(datagram, off + 4)) else {
            break;
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || off + len > datagram.len() {
            out.push(KernelMessage::Malformed);
            break;
        }
        let body = &datagram[off + NLMSG_HDRLEN..off + len];
        out.push(if ty == NLMSG_ERROR {
            body.get(..4)
                .and_then(|e| e.try_into().ok())
                .map_or(KernelMessage::Malformed, |e| {
                    KernelMessage::Error(-i32::from_ne_bytes(e))
                })
        } else if ty == (NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET) {
            packet_id(body).map_or(KernelMessage::Malformed, KernelMessage::Packet)
        } else {
            KernelMessage::Other
        });
        off += align4(len);
    }
    out
}

/// The id in a packet message's `NFQA_PACKET_HDR` (big-endian, first
/// field), after the `nfgenmsg` header.
fn packet_id(body: &[u8]) -> Option<u32> {
    use wire::*;
    let mut off = NFGEN_HDRLEN;
    while off + NLA_HDRLEN <= body.len() {
        let len = usize::from(ne_u16(body, off)?);
        let ty = ne_u16(body, off + 2)? & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || off + len > body.len() {
            return None;
        }
        if ty == NFQA_PACKET_HDR {
            let id = body.get(off + NLA_HDRLEN..off + NLA_HDRLEN + 4)?;
            return Some(u32::from_be_bytes(id.try_into().ok()?));
        }
        off += align4(len);
    }
    None
}

/// A verdict message: netlink header, `nfgenmsg` (queue number,
/// big-endian), and `NFQA_VERDICT_HDR` { verdict, id } (big-endian).
fn verdict_message(kind: VerdictKind, queue: u16, verdict: u32, id: u32, seq: u32) -> [u8; 32] {
    use wire::*;
    let ty = NFNL_SUBSYS_QUEUE << 8
        | match kind {
            VerdictKind::One => NFQNL_MSG_VERDICT,
            VerdictKind::Batch => NFQNL_MSG_VERDICT_BATCH,
        };
    let mut m = [0u8; 32];
    m[0..4].copy_from_slice(&32u32.to_ne_bytes());
    m[4..6].copy_from_slice(&ty.to_ne_bytes());
    m[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    // m[12..16]: port id 0 (the kernel fills ours in).
    // nfgenmsg: family AF_UNSPEC, version NFNETLINK_V0, res_id = queue.
    m[18..20].copy_from_slice(&queue.to_be_bytes());
    m[20..22].copy_from_slice(&12u16.to_ne_bytes());
    m[22..24].copy_from_slice(&NFQA_VERDICT_HDR.to_ne_bytes());
    m[24..28].copy_from_slice(&verdict.to_be_bytes());
    m[28..32].copy_from_slice(&id.to_be_bytes());
    m
}

/// One `recvmmsg` into `bufs`, non-blocking; the length of each datagram
/// read (a truncated one counts as its buffer's length).
fn recv_batch(fd: RawFd, bufs: &mut [[u8; defaults::MSG_BUF]]) -> io::Result<Vec<usize>> {
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain data; all zeroes is a valid empty header.
    let mut hdrs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    // SAFETY: every header points at one live iovec over a live buffer;
    // all outlive the call. The count fits a c_uint (RECV_BATCH).
    let r = unsafe {
        libc::recvmmsg(
            fd,
            hdrs.as_mut_ptr(),
            hdrs.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(hdrs
        .iter()
        .take(r as usize)
        .map(|h| (h.msg_len as usize).min(defaults::MSG_BUF))
        .collect())
}

/// The kernel's drop counters for `queue` (`queue_dropped` +
/// `user_dropped`), from this namespace's queue table; 0 if unreadable.
fn kernel_drops(queue: u16) -> u64 {
    let Ok(table) = fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_queue") else {
        return 0;
    };
    table
        .lines()
        .find_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.first()?.parse::<u16>().ok()? == queue).then(|| {
                let n = |i: usize| cols.get(i).and_then(|c| c.parse::<u64>().ok()).unwrap_or(0);
                n(5) + n(6)
            })
        })
        .unwrap_or(0)
}

/// Waits until `fd` is readable or `timeout` passes. `ppoll` rather than
/// `poll`: its nanosecond timeout does not round the release time to a
/// millisecond.
fn wait_readable(fd: RawFd, timeout: Duration) -> Result<bool, DelayError> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        // Bounded by STOP_POLL_INTERVAL, so these casts cannot truncate.
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one valid pollfd and a valid timespec, both outliving the call.
    let r = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(DelayError::Poll(e));
    }
    if pfd.revents & libc::POLLNVAL != 0 {
        // Cannot happen while the Queue owns the fd; never spin on it.
        return Err(DelayError::Poll(io::Error::from_raw_os_error(libc::EBADF)));
    }
    // POLLERR (e.g. a pending ENOBUFS) is also reported by recv.
    Ok(r > 0 && pfd.revents & (libc::POLLIN | libc::POLLERR) != 0)
}

/// Finds the queue's netlink socket. `nfq` 0.2.5, its newest release,
/// keeps the fd private (upstream added `AsRawFd` after that release), so
/// we look up the queue's netlink port id in
/// `/proc/thread-self/net/netfilter/nfnetlink_queue` (the calling thread's
/// namespace) and find our fd whose `getsockname` has that port id. Port
/// ids are unique per namespace, so the match is exact.
fn queue_socket_fd(queue: u16) -> Result<RawFd, DelayError> {
    let lookup = |source| DelayError::SocketLookup { queue, source };
    let table =
        fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_queue").map_err(lookup)?;
    let portid = parse_queue_portid(&table, queue);
    let Some(portid) = portid else {
        return Err(DelayError::SocketNotFound { queue, portid });
    };
    for entry in fs::read_dir("/proc/self/fd").map_err(lookup)? {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        if netlink_portid(fd) == Some(portid) {
            return Ok(fd);
        }
    }
    Err(DelayError::SocketNotFound {
        queue,
        portid: Some(portid),
    })
}

/// The `peer_portid` column of `queue`'s row in the nfnetlink_queue table
/// (`queue_num peer_portid queue_total copy_mode copy_range …`).
fn parse_queue_portid(table: &str, queue: u16) -> Option<u32> {
    table.lines().find_map(|line| {
        let mut cols = line.split_whitespace();
        let num: u16 = cols.next()?.parse().ok()?;
        let portid: u32 = cols.next()?.parse().ok()?;
        (num == queue).then_some(portid)
    })
}

/// The port id of `fd` if it is a NETLINK_NETFILTER socket.
fn netlink_portid(fd: RawFd) -> Option<u32> {
    let mut proto: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `proto` and `len` are valid for writes of the given size.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            (&mut proto as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 || proto != libc::NETLINK_NETFILTER {
        return None;
    }
    // SAFETY: sockaddr_nl is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are valid for writes of the given size.
    let r =
        unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_nl).cast(), &mut len) };
    (r == 0 && i32::from(addr.nl_family) == libc::AF_NETLINK).then_some(addr.nl_pid)
}

/// Asks for a larger netlink receive buffer so bursts queue instead of
/// failing open. Best effort: without CAP_NET_ADMIN `SO_RCVBUFFORCE` fails
/// and `SO_RCVBUF` is capped by `net.core.rmem_max`.
fn grow_rcvbuf(fd: RawFd, bytes: usize) {
    let val = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: `val` is a valid c_int for the duration of the call.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return;
        }
    }
    tracing::debug!(fd, "could not enlarge the NFQUEUE receive buffer");
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_millis(20);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// An `Instant` close to the earliest the platform can represent (on
    /// Linux, CLOCK_MONOTONIC is time since boot, so "very early" is near 0).
    fn very_early() -> Instant {
        let mut t = Instant::now();
        let mut step = Duration::from_secs(1 << 40);
        while step > Duration::from_nanos(1) {
            if let Some(earlier) = t.checked_sub(step) {
                t = earlier;
            } else {
                step /= 2;
            }
        }
        t
    }

    #[test]
    fn defaults_constraints() {
        use defaults::*;
        // The kernel must hand us overflow (our counted drop) before it
        // fails open on its own queue length.
        const { assert!(KERNEL_QUEUE_MAXLEN as usize > MAX_QUEUED) };
        const { assert!(RECV_BATCH <= MAX_QUEUED) };
        // The bound covers 100 ms of 1500-byte packets at 1 Gbit/s.
        const { assert!(MAX_QUEUED as u64 >= 1_000_000_000 / 10 / 8 / 1500) };
        // A GEO satellite hop (~600 ms) is allowed.
        assert!(MAX_DELAY >= ms(600));
        assert!(STOP_POLL_INTERVAL <= Duration::from_secs(1));
    }

    #[test]
    fn releases_after_delay_in_fifo_order() {
        let t0 = Instant::now();
        let mut s = DelaySchedule::new(D);
        assert_eq!(s.poll_timeout(), None);
        s.push(t0, 1).unwrap();
        s.push(t0 + ms(1), 2).unwrap();
        s.push(t0 + ms(1), 3).unwrap();
        assert_eq!(s.poll_timeout(), Some(t0 + D));
        assert_eq!(s.pop_due(t0 + D - Duration::from_nanos(1)), None);
        assert_eq!(s.pop_due(t0 + D), Some(1));
        assert_eq!(s.pop_due(t0 + D), None);
        assert_eq!(s.poll_timeout(), Some(t0 + ms(21)));
        assert_eq!(s.pop_due(t0 + ms(30)), Some(2));
        assert_eq!(s.pop_due(t0 + ms(30)), Some(3));
        assert_eq!(s.pop_due(t0 + ms(30)), None);
        assert_eq!(s.poll_timeout(), None);
        assert!(s.is_empty());
        assert_eq!(s.high_water(), 3);
    }

    #[test]
    fn spurious_polls_are_no_ops() {
        let t0 = Instant::now();
        let mut s = DelaySchedule::new(D);
        assert_eq!(s.pop_due(t0), None);
        s.push(t0, 7).unwrap();
        for i in 0..20 {
            assert_eq!(s.pop_due(t0 + ms(i)), None);
            assert_eq!(s.poll_timeout(), Some(t0 + D));
            assert_eq!(s.len(), 1);
        }
        // A poll with a `now` earlier than the push changes nothing either.
        assert_eq!(s.pop_due(t0 - ms(5)), None);
        assert_eq!(s.pop_due(t0 + D), Some(7));
    }

    #[test]
    fn very_early_timestamp() {
        let t0 = very_early();
        let mut s = DelaySchedule::new(D);
        s.push(t0, 1).unwrap();
        assert_eq!(s.pop_due(t0), None);
        assert_eq!(s.poll_timeout(), Some(t0 + D));
        assert_eq!(s.pop_due(t0 + D), Some(1));
        // The same with a zero delay.
        let mut z = DelaySchedule::new(Duration::ZERO);
        z.push(t0, 2).unwrap();
        assert_eq!(z.poll_timeout(), Some(t0));
        assert_eq!(z.pop_due(t0), Some(2));
    }

    #[test]
    fn clock_going_backwards_keeps_order() {
        let t0 = Instant::now();
        let mut s = DelaySchedule::new(D);
        s.push(t0 + ms(10), 1).unwrap();
        s.push(t0, 2).unwrap();
        assert_eq!(s.poll_timeout(), Some(t0 + ms(30)));
        assert_eq!(s.pop_due(t0 + ms(25)), None);
        assert_eq!(s.pop_due(t0 + ms(30)), Some(1));
        assert_eq!(s.pop_due(t0 + ms(30)), Some(2));
    }

    #[test]
    fn bounded_and_recovers() {
        let t0 = Instant::now();
        let mut s = DelaySchedule::with_max_queued(D, 3);
        for id in 0..3 {
            s.push(t0, id).unwrap();
        }
        assert_eq!(s.push(t0, 3), Err(QueueFull { max_queued: 3 }));
        assert_eq!(s.len(), 3);
        assert_eq!(s.pop_due(t0 + D), Some(0));
        s.push(t0 + D, 4).unwrap();
        assert_eq!(s.high_water(), 3);
        let rest: Vec<_> = std::iter::from_fn(|| s.pop_due(t0 + ms(100))).collect();
        assert_eq!(rest, [1, 2, 4]);
    }

    #[test]
    fn default_bound_is_enforced() {
        let t0 = Instant::now();
        let mut s = DelaySchedule::new(D);
        for id in 0..defaults::MAX_QUEUED as u32 {
            s.push(t0, id).unwrap();
        }
        assert!(s.push(t0, u32::MAX).is_err());
    }

    #[test]
    fn pop_next_flushes_regardless_of_time() {
        let t0 = Instant::now();
        let mut s = DelaySchedule::new(D);
        s.push(t0, 1).unwrap();
        s.push(t0, 2).unwrap();
        assert_eq!(s.pop_next(), Some(1));
        assert_eq!(s.pop_next(), Some(2));
        assert_eq!(s.pop_next(), None);
    }

    #[test]
    fn virtual_clock_stepping_releases_each_packet_exactly_on_time() {
        // Packets every 3 ms; the driver jumps to each poll_timeout and
        // must release each packet exactly at arrival + delay.
        let t0 = Instant::now();
        let mut s = DelaySchedule::new(D);
        let arrivals: Vec<Instant> = (0..50).map(|i| t0 + ms(3 * i)).collect();
        let mut next = 0;
        let mut now = t0;
        let mut released = Vec::new();
        for _ in 0..1000 {
            while next < arrivals.len() && arrivals[next] <= now {
                s.push(arrivals[next], next as u32).unwrap();
                next += 1;
            }
            while let Some(id) = s.pop_due(now) {
                released.push((id, now));
            }
            let wake = [s.poll_timeout(), arrivals.get(next).copied()]
                .into_iter()
                .flatten()
                .min();
            match wake {
                Some(w) => now = w,
                None => break,
            }
        }
        assert_eq!(released.len(), arrivals.len());
        for (i, (id, at)) in released.iter().enumerate() {
            assert_eq!(*id as usize, i);
            assert_eq!(*at, arrivals[i] + D);
        }
    }

    /// A packet message as the kernel builds it: netlink header, nfgenmsg,
    /// then attributes, `NFQA_PACKET_HDR` not necessarily first.
    fn packet_message(id: u32, before: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![2, 0, 0, 7]; // AF_INET, v0, queue 7
        let mut attr = |ty: u16, val: &[u8]| {
            let len = (4 + val.len()) as u16;
            body.extend_from_slice(&len.to_ne_bytes());
            body.extend_from_slice(&ty.to_ne_bytes());
            body.extend_from_slice(val);
            while body.len() % 4 != 0 {
                body.push(0);
            }
        };
        for (ty, val) in before {
            attr(*ty, val);
        }
        let mut hdr = id.to_be_bytes().to_vec();
        hdr.extend_from_slice(&[0x08, 0x00, 1]); // ETH_P_IP, hook
        attr(wire::NFQA_PACKET_HDR, &hdr);
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&(3u16 << 8).to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn parses_packet_ids_errors_and_rejects_bad_lengths() {
        let one = packet_message(0xdead_beef, &[(11, &[1, 2, 3])]);
        assert_eq!(
            parse_messages(&one),
            vec![KernelMessage::Packet(0xdead_beef)]
        );
        // Two messages in one datagram.
        let mut two = packet_message(1, &[]);
        two.extend(packet_message(2, &[(5, &[0; 4])]));
        assert_eq!(
            parse_messages(&two),
            vec![KernelMessage::Packet(1), KernelMessage::Packet(2)]
        );
        // NLMSG_ERROR carrying -ENOENT.
        let mut err = 20u32.to_ne_bytes().to_vec();
        err.extend_from_slice(&wire::NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&[0; 10]);
        err.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(
            parse_messages(&err),
            vec![KernelMessage::Error(libc::ENOENT)]
        );
        // A length past the datagram, a zero length, an attribute past
        // its message, and a truncated datagram: no panic, no id.
        let mut long = one.clone();
        long[0] = 200;
        assert_eq!(parse_messages(&long), vec![KernelMessage::Malformed]);
        let mut zero = one.clone();
        zero[..4].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(parse_messages(&zero), vec![KernelMessage::Malformed]);
        let mut bad_attr = one.clone();
        bad_attr[20] = 250;
        assert_eq!(parse_messages(&bad_attr), vec![KernelMessage::Malformed]);
        for cut in 0..one.len() {
            let _ = parse_messages(&one[..cut]);
        }
    }

    #[test]
    fn verdict_messages_have_the_kernel_layout() {
        let m = verdict_message(VerdictKind::Batch, 12, NF_ACCEPT, 0x0102_0304, 9);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 32);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), 3 << 8 | 3);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 9);
        assert_eq!(&m[16..20], &[0, 0, 0, 12]);
        assert_eq!(u16::from_ne_bytes(m[20..22].try_into().unwrap()), 12);
        assert_eq!(u16::from_ne_bytes(m[22..24].try_into().unwrap()), 2);
        assert_eq!(&m[24..32], &[0, 0, 0, 1, 1, 2, 3, 4]);
        let d = verdict_message(VerdictKind::One, 1, NF_DROP, 5, 1);
        assert_eq!(u16::from_ne_bytes(d[4..6].try_into().unwrap()), 3 << 8 | 1);
        assert_eq!(&d[24..28], &[0, 0, 0, 0]);
    }

    #[test]
    fn parses_queue_table() {
        // The kernel prints "%5u %6u %5u %1u %5u %5u %5u %8u %2d".
        let table = "    0  12345     0 1     0     0     0        5  1\n    \
                     7 4253733726     3 1     0     0     0       99  1\n";
        assert_eq!(parse_queue_portid(table, 0), Some(12345));
        assert_eq!(parse_queue_portid(table, 7), Some(4253733726));
        assert_eq!(parse_queue_portid(table, 8), None);
        assert_eq!(parse_queue_portid("", 7), None);
        assert_eq!(parse_queue_portid("garbage\n", 7), None);
    }

    #[test]
    fn rejects_excessive_delay_without_touching_the_kernel() {
        let cfg = DelayLineConfig {
            queue: 1,
            delay: defaults::MAX_DELAY + ms(1),
        };
        let stop = AtomicBool::new(true);
        assert!(matches!(
            run(&cfg, &stop),
            Err(DelayError::InvalidDelay { .. })
        ));
    }
}
