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
//! the kernel; only its metadata crosses (copy mode `NFQNL_COPY_META`), so
//! the daemon costs two small netlink messages per packet.
//!
//! It is written by hand on the `nfq` crate (pure Rust netlink, no
//! libnetfilter_queue) because no netem is available. It has two layers:
//!
//! - [`DelaySchedule`], the sans-IO core: it is fed `(now, id)` pairs and
//!   says when the oldest packet is due. No clock, no sockets.
//! - [`run`], a thin blocking driver: it waits on the netlink socket with
//!   `ppoll` until the next release time, receives, schedules and releases.
//!
//! # Failure behaviour
//!
//! - The driver enables the queue's fail-open flag: if the kernel queue or
//!   the netlink socket overflows, the kernel accepts the packet *undelayed*
//!   instead of dropping it. Such packets are invisible to [`DelayStats`]
//!   (the kernel counts them nowhere either), so measure delivery at the
//!   receiver when you load the link. Our own bound,
//!   [`defaults::MAX_QUEUED`], drops instead and counts the drop.
//! - Fail-open does **not** cover a stopped daemon: when the netlink socket
//!   closes, the kernel destroys the queue, and the `NFQUEUE` rule then drops
//!   every packet unless it carries `--queue-bypass`. Always add that flag.
//! - On `stop` the driver accepts every held packet at once, so stopping
//!   loses nothing that had reached it.
//! - `nfq` 0.2.5 asserts on malformed kernel messages (a panic, not an
//!   error); this module has no `unwrap` of its own on kernel data.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nfq::{Message, Queue, Verdict};

/// Limits and tunables of the delay line. Each states its value's reason;
/// the unit test `defaults_constraints` checks how they relate.
pub mod defaults {
    use std::time::Duration;

    /// Most packets held at once: 10 000. A 1 Gbit/s link carries
    /// 1e9 × 0.1 / 8 / 1500 ≈ 8 333 full-size packets in 100 ms, so this
    /// covers 100 ms at 1 Gbit/s with 20 % headroom (or 1 s at ~120 Mbit/s).
    /// Memory: each held `nfq::Message` pins its own 4 KiB receive buffer,
    /// so a full line costs ~40 MiB.
    pub const MAX_QUEUED: usize = 10_000;

    /// Kernel queue length (`NFQA_CFG_QUEUE_MAXLEN`): twice [`MAX_QUEUED`].
    /// The kernel counts held packets too, and its default of 1024 would
    /// fail-open (pass undelayed) at 20 ms × 51 kpkt/s; above our own bound
    /// our counted drop acts first.
    pub const KERNEL_QUEUE_MAXLEN: u32 = 2 * MAX_QUEUED as u32;

    /// Longest delay accepted: 10 s. The longest real path a lab emulates
    /// (GEO satellite) is ~600 ms one way; more is a configuration error.
    pub const MAX_DELAY: Duration = Duration::from_secs(10);

    /// Longest single wait: 100 ms, the bound on how late `stop` is seen.
    pub const STOP_POLL_INTERVAL: Duration = Duration::from_millis(100);

    /// Messages received per wakeup before due packets are released: 256.
    /// At ~2 µs per message this bounds release lateness under a flood to
    /// ~0.5 ms.
    pub const RECV_BATCH: usize = 256;

    /// Receive errors in a row that end the driver: 8, as iroh's transports
    /// (iroh/src/socket/transports.rs). One error is usually a rejected
    /// verdict echoed back; eight means the socket is broken.
    pub const MAX_CONSECUTIVE_RECV_ERRORS: u32 = 8;

    /// Netlink receive buffer asked for: 8 MiB (`SO_RCVBUFFORCE`, root). A
    /// metadata-only message takes under 1 KiB of buffer (skb truesize), so
    /// a burst of 8 000+ unread packets fits before the kernel fails open;
    /// the default ~208 KiB holds a few hundred.
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

/// The driver's state: the queue, its socket, the schedule and the held
/// messages, in schedule order.
struct Line {
    queue: Queue,
    queue_num: u16,
    fd: RawFd,
    schedule: DelaySchedule,
    held: VecDeque<(u32, Message)>,
    next_id: u32,
    consecutive_errors: u32,
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
        queue
            .set_fail_open(q, true)
            .map_err(configure(QueueSetting::FailOpen))?;
        // We never read the payload, so GSO super-packets may stay whole:
        // the kernel then skips software segmentation.
        queue
            .set_recv_gso(q, true)
            .map_err(configure(QueueSetting::Gso))?;
        // Last: nfq's config calls discard packet messages that arrive while
        // they wait for the ack, and metadata-only mode (range 0 =
        // NFQNL_COPY_META) in /proc tells an observer that setup is done.
        queue
            .set_copy_range(q, 0)
            .map_err(configure(QueueSetting::CopyRange))?;
        let fd = queue_socket_fd(q)?;
        grow_rcvbuf(fd, defaults::RCVBUF_BYTES);
        queue.set_nonblocking(true);
        Ok(Self {
            queue,
            queue_num: q,
            fd,
            schedule: DelaySchedule::new(config.delay),
            held: VecDeque::new(),
            next_id: 0,
            consecutive_errors: 0,
            stats: DelayStats::default(),
        })
    }

    /// Drains up to [`defaults::RECV_BATCH`] messages, scheduling each.
    fn receive(&mut self) -> Result<(), DelayError> {
        let mut n = 0;
        while n < defaults::RECV_BATCH {
            let msg = match self.queue.recv() {
                Ok(msg) => msg,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
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
                    continue;
                }
            };
            self.consecutive_errors = 0;
            n += 1;
            self.stats.packets += 1;
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            match self.schedule.push(Instant::now(), id) {
                Ok(()) => {
                    tracing::trace!(id, packet_id = msg.get_packet_id(), "held");
                    self.held.push_back((id, msg));
                }
                Err(QueueFull { .. }) => {
                    self.stats.dropped_overflow += 1;
                    tracing::trace!(packet_id = msg.get_packet_id(), "delay line full, dropped");
                    self.verdict(msg, Verdict::Drop)?;
                }
            }
        }
        self.stats.max_queued = self.schedule.high_water();
        Ok(())
    }

    fn release_due(&mut self, now: Instant) -> Result<(), DelayError> {
        while let Some(id) = self.schedule.pop_due(now) {
            self.release(id)?;
        }
        Ok(())
    }

    fn release(&mut self, id: u32) -> Result<(), DelayError> {
        // Both queues are FIFO in the same order, so this is the front.
        let Some(pos) = self.held.iter().position(|(h, _)| *h == id) else {
            return Ok(());
        };
        if let Some((_, msg)) = self.held.remove(pos) {
            tracing::trace!(id, "released");
            self.verdict(msg, Verdict::Accept)?;
        }
        Ok(())
    }

    fn verdict(&mut self, mut msg: Message, verdict: Verdict) -> Result<(), DelayError> {
        msg.set_verdict(verdict);
        self.queue
            .verdict(msg)
            .map_err(|source| DelayError::Verdict {
                queue: self.queue_num,
                source,
            })
    }

    /// Accepts everything held, then whatever is already waiting in the
    /// socket (bounded), so stopping loses nothing that reached us.
    fn shutdown(&mut self) -> Result<(), DelayError> {
        while let Some(id) = self.schedule.pop_next() {
            self.release(id)?;
        }
        for _ in 0..defaults::MAX_QUEUED {
            match self.queue.recv() {
                Ok(msg) => {
                    self.stats.packets += 1;
                    self.verdict(msg, Verdict::Accept)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        Ok(())
    }
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
