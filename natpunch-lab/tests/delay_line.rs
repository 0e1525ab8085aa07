//! The NFQUEUE delay line ([`natpunch_lab::delay`]) in real network
//! namespaces: accuracy against a configured delay, and rough throughput.
//!
//! Topology, all inside two fresh namespaces (nothing in the root one):
//!
//! ```text
//!   npdl<pid><tag>a  10.99.0.1/24 v0 <== veth ==> v1 10.99.0.2/24  npdl<pid><tag>b
//! ```
//!
//! In B, `mangle PREROUTING -i v1 -j NFQUEUE --queue-num 7 --queue-bypass`
//! delays only the A→B direction (B's replies are not queued), so a UDP
//! echo RTT measured from A is the baseline RTT plus the delay once.
//!
//! Needs root and `ip netns`. Without them the tests print
//! `*** SKIPPED: … ***`, or fail when `CI=true`.

#![cfg(target_os = "linux")]

use std::fs::File;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use natpunch_lab::delay::{self, DelayLineConfig, DelayStats};

/// The tests measure timing on a 2-core machine: never run them at once.
static SERIAL: Mutex<()> = Mutex::new(());

const QUEUE: u16 = 7;
const ADDR_A: &str = "10.99.0.1";
const ADDR_B: &str = "10.99.0.2";
const PORT_B: u16 = 7007;

/// Two namespaces joined by a veth pair; both deleted on drop (which also
/// destroys the veth pair), even when the test panics.
/// A reaper deletes them too if the test process is interrupted or killed.
struct Lab {
    a: String,
    b: String,
    reaper: Option<natpunch_lab::topology::Reaper>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            // A namespace that was never created just fails; ignore that.
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        if let Some(r) = self.reaper.take() {
            r.finish();
        }
    }
}

fn run_cmd(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Skips (or, with CI=true, fails) the test for `reason`.
fn skip(reason: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("delay_line test cannot run under CI=true: {reason}");
    }
    eprintln!("*** SKIPPED: {reason} ***");
}

/// Builds the topology, or returns `None` after [`skip`].
fn lab(tag: &str) -> Option<Lab> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("needs root (network namespaces, iptables, NFQUEUE)");
        return None;
    }
    let pid = std::process::id();
    let a = format!("npdl{pid}{tag}a");
    let b = format!("npdl{pid}{tag}b");
    if let Err(e) = run_cmd(&["ip", "netns", "add", &a]) {
        skip(&format!("cannot create a network namespace: {e}"));
        return None;
    }
    let mut reaper = natpunch_lab::topology::Reaper::start().expect("start the namespace reaper");
    reaper.watch(&a);
    reaper.watch(&b);
    let lab = Lab {
        a,
        b,
        reaper: Some(reaper),
    };
    let (a, b) = (lab.a.as_str(), lab.b.as_str());
    let steps: [&[&str]; 8] = [
        &["ip", "netns", "add", b],
        &[
            "ip", "-n", a, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", b,
        ],
        &["ip", "-n", a, "addr", "add", "10.99.0.1/24", "dev", "v0"],
        &["ip", "-n", b, "addr", "add", "10.99.0.2/24", "dev", "v1"],
        &["ip", "-n", a, "link", "set", "lo", "up"],
        &["ip", "-n", b, "link", "set", "lo", "up"],
        &["ip", "-n", a, "link", "set", "v0", "up"],
        &["ip", "-n", b, "link", "set", "v1", "up"],
    ];
    for step in steps {
        if let Err(e) = run_cmd(step) {
            panic!("lab setup: {e}");
        }
    }
    Some(lab)
}

fn add_nfqueue_rule(lab: &Lab) {
    // --queue-bypass: once the delay line stops, packets pass instead of
    // being dropped (fail-open does not cover a closed queue).
    let q = QUEUE.to_string();
    let args = [
        "ip",
        "netns",
        "exec",
        &lab.b,
        "iptables",
        "-w",
        "-t",
        "mangle",
        "-A",
        "PREROUTING",
        "-i",
        "v1",
        "-j",
        "NFQUEUE",
        "--queue-num",
        &q,
        "--queue-bypass",
    ];
    if let Err(e) = run_cmd(&args) {
        panic!("adding the NFQUEUE rule: {e}");
    }
}

/// Moves the calling thread into namespace `ns` (a per-thread switch).
fn enter_netns(ns: &str) {
    let path = format!("/var/run/netns/{ns}");
    let f = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: a valid namespace fd; CLONE_NEWNET only changes this thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {ns}: {}", io::Error::last_os_error());
}

fn spawn_in<T, F>(ns: &str, f: F) -> JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns = ns.to_owned();
    thread::spawn(move || {
        enter_netns(&ns);
        f()
    })
}

fn run_in<T, F>(ns: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    spawn_in(ns, f)
        .join()
        .expect("thread in namespace panicked")
}

/// A UDP socket bound in namespace `ns` (it stays there whatever thread
/// uses it later).
fn udp_in(ns: &str, addr: SocketAddr) -> UdpSocket {
    run_in(ns, move || {
        UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
    })
}

/// Queue `QUEUE`'s row in B's nfnetlink_queue table: (copy_mode,
/// queue_dropped, user_dropped), if the queue is bound.
fn queue_row(ns: &str) -> Option<(u32, u64, u64)> {
    run_in(ns, || {
        let table =
            std::fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_queue").ok()?;
        table.lines().find_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 7 || cols[0].parse::<u16>().ok()? != QUEUE {
                return None;
            }
            Some((
                cols[3].parse().ok()?,
                cols[5].parse().ok()?,
                cols[6].parse().ok()?,
            ))
        })
    })
}

/// A running delay line in namespace `ns`.
struct DelayLine {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<DelayStats, delay::DelayError>>>,
}

impl DelayLine {
    fn start(ns: &str, delay: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let config = DelayLineConfig {
            queue: QUEUE,
            delay,
        };
        let line = Self {
            stop,
            handle: Some(spawn_in(ns, move || delay::run(&config, &flag))),
        };
        // The driver sets metadata-only copy mode (1) last: wait for it.
        // A panic here drops `line`, which stops and joins the thread.
        let deadline = Instant::now() + Duration::from_secs(5);
        while queue_row(ns).map(|r| r.0) != Some(1) {
            let exited = match &line.handle {
                Some(h) => h.is_finished(),
                None => true,
            };
            assert!(!exited, "delay line exited during setup");
            assert!(Instant::now() < deadline, "delay line did not bind in 5 s");
            thread::sleep(Duration::from_millis(5));
        }
        line
    }

    fn stop(mut self) -> DelayStats {
        self.stop.store(true, Ordering::Release);
        let handle = self.handle.take().expect("stopped twice");
        match handle.join().expect("delay line panicked") {
            Ok(stats) => stats,
            Err(e) => panic!("delay line failed: {e} ({e:?})"),
        }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Echoes datagrams until dropped.
struct Echo {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Echo {
    fn start(sock: UdpSocket) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("set_read_timeout");
        let handle = thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !flag.load(Ordering::Acquire) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Sends `count` probes at `interval` on a connected socket and returns
/// each probe's RTT (`None` if lost). Probes carry their sequence number
/// and send time, so several can be in flight.
fn probe(sock: &UdpSocket, count: usize, interval: Duration) -> Vec<Option<Duration>> {
    let base = Instant::now();
    let rx = sock.try_clone().expect("try_clone");
    rx.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("set_read_timeout");
    let end = base + interval * count as u32 + Duration::from_secs(1);
    let receiver = thread::spawn(move || {
        let mut rtts = vec![None; count];
        let mut got = 0;
        let mut buf = [0u8; 64];
        while got < count && Instant::now() < end {
            let Ok(n) = rx.recv(&mut buf) else { continue };
            let now = Instant::now();
            if n != 12 {
                continue;
            }
            let seq = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
            let sent = u64::from_be_bytes(buf[4..12].try_into().expect("8 bytes"));
            if seq < count && rtts[seq].is_none() {
                rtts[seq] = Some(now - (base + Duration::from_nanos(sent)));
                got += 1;
            }
        }
        rtts
    });
    for seq in 0..count {
        let slot = base + interval * seq as u32;
        if let Some(wait) = slot.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let mut msg = [0u8; 12];
        msg[..4].copy_from_slice(&(seq as u32).to_be_bytes());
        let sent = Instant::now().duration_since(base).as_nanos() as u64;
        msg[4..].copy_from_slice(&sent.to_be_bytes());
        sock.send(&msg).expect("send probe");
    }
    receiver.join().expect("probe receiver panicked")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Sorted values' (mean, p50, p99, min, max).
fn summary(v: &mut [f64]) -> (f64, f64, f64, f64, f64) {
    assert!(!v.is_empty());
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n as f64;
    let p = |q: f64| v[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
    (mean, p(0.50), p(0.99), v[0], v[n - 1])
}

const DELAY: Duration = Duration::from_millis(20);
const PROBES: usize = 200;
const PROBE_INTERVAL: Duration = Duration::from_millis(10);

#[test]
fn delay_line_adds_the_configured_delay() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = lab("d") else { return };

    let server: SocketAddr = format!("{ADDR_B}:{PORT_B}").parse().expect("addr");
    let echo = Echo::start(udp_in(&lab.b, server));
    let client = udp_in(&lab.a, format!("{ADDR_A}:0").parse().expect("addr"));
    client.connect(server).expect("connect");

    // Warm up (ARP), then the baseline without any NFQUEUE rule.
    let warm = probe(&client, 5, PROBE_INTERVAL);
    assert!(
        warm.iter().all(Option::is_some),
        "echo unreachable: {warm:?}"
    );
    let base: Vec<Option<Duration>> = probe(&client, PROBES, PROBE_INTERVAL);
    let base_lost = base.iter().filter(|r| r.is_none()).count();
    let mut base_ms: Vec<f64> = base.iter().flatten().map(|d| ms(*d)).collect();
    let (b_mean, b_p50, b_p99, _, b_max) = summary(&mut base_ms);
    eprintln!(
        "baseline RTT ({PROBES} probes, {base_lost} lost): mean {b_mean:.3} ms, \
         p50 {b_p50:.3} ms, p99 {b_p99:.3} ms, max {b_max:.3} ms"
    );

    add_nfqueue_rule(&lab);
    let line = DelayLine::start(&lab.b, DELAY);
    let _ = probe(&client, 5, PROBE_INTERVAL);
    let rtts = probe(&client, PROBES, PROBE_INTERVAL);
    let kernel = queue_row(&lab.b);
    let stats = line.stop();
    drop(echo);

    let lost = rtts.iter().filter(|r| r.is_none()).count();
    // Error = RTT − baseline median − configured delay (one direction).
    let mut err: Vec<f64> = rtts
        .iter()
        .flatten()
        .map(|d| ms(*d) - b_p50 - ms(DELAY))
        .collect();
    let (mean, p50, p99, min, max) = summary(&mut err);
    let mut abs: Vec<f64> = err.iter().map(|e| e.abs()).collect();
    let (_, abs_p50, abs_p99, _, _) = summary(&mut abs);
    eprintln!(
        "delay line {} ms one way, {PROBES} probes at 100/s, {lost} lost: error vs. configured \
         delay (baseline p50 subtracted): mean {mean:+.3} ms, p50 {p50:+.3} ms, \
         p99 {p99:+.3} ms, min {min:+.3} ms, max {max:+.3} ms",
        DELAY.as_millis()
    );
    eprintln!(
        "delay line stats: {stats:?}; kernel (copy_mode, queue_dropped, user_dropped): {kernel:?}"
    );

    assert_eq!(lost, 0, "probes lost through the delay line");
    assert!(stats.packets >= (PROBES + 5) as u64, "{stats:?}");
    assert_eq!(stats.dropped_overflow, 0);
    // A packet that bypassed the line would show an error near −20 ms.
    assert!(
        min > -1.0,
        "a probe came back faster than the delay: {min:+.3} ms"
    );
    // Measured on the 2-core VM (debug build): |error| p50 0.05-0.32 ms,
    // p99 0.1-1.1 ms, max 1.65 ms, mostly idle-CPU wakeup latency (a
    // loaded machine is tighter). Limits keep ~3x headroom.
    assert!(abs_p50 < 1.0, "median |error| {abs_p50:.3} ms");
    assert!(abs_p99 < 3.0, "p99 |error| {abs_p99:.3} ms");
    drop(lab);
}

#[test]
fn delay_line_throughput() {
    const BLAST: u32 = 20_000;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = lab("t") else { return };

    let server: SocketAddr = format!("{ADDR_B}:{PORT_B}").parse().expect("addr");
    let sink = udp_in(&lab.b, server);
    // Room for the whole blast, so the sink itself drops nothing.
    let bytes: libc::c_int = 32 << 20;
    // SAFETY: a valid socket and a c_int option value.
    let r = unsafe {
        libc::setsockopt(
            sink.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_RCVBUFFORCE: {}", io::Error::last_os_error());
    sink.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("set_read_timeout");
    let client = udp_in(&lab.a, format!("{ADDR_A}:0").parse().expect("addr"));
    client.connect(server).expect("connect");
    // ARP before the clock starts.
    client.send(b"warm").expect("send");
    let mut buf = [0u8; 64];
    sink.recv(&mut buf).expect("warm-up datagram");

    add_nfqueue_rule(&lab);
    let line = DelayLine::start(&lab.b, Duration::from_millis(1));

    let counter = thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut got = 0u32;
        let mut last = None;
        let start = Instant::now();
        loop {
            match sink.recv(&mut buf) {
                Ok(_) => {
                    got += 1;
                    last = Some(Instant::now());
                }
                Err(_) => {
                    let idle_since = last.unwrap_or(start);
                    if got >= BLAST || idle_since.elapsed() > Duration::from_millis(500) {
                        break;
                    }
                }
            }
            if got >= BLAST {
                break;
            }
        }
        (got, last)
    });
    let t0 = Instant::now();
    let mut send_errors = 0u32;
    for i in 0..BLAST {
        if client.send(&i.to_be_bytes()).is_err() {
            send_errors += 1;
        }
    }
    let sent_in = t0.elapsed();
    let (delivered, last) = counter.join().expect("counter panicked");
    let kernel = queue_row(&lab.b);
    let stats = line.stop();

    let elapsed = last.map_or(Duration::ZERO, |l| l - t0);
    let delayed = stats.packets - stats.dropped_overflow;
    let bypassed = u64::from(delivered).saturating_sub(delayed);
    let rate = delayed as f64 / elapsed.as_secs_f64();
    eprintln!(
        "throughput: {BLAST} × 4-byte datagrams sent in {:.1} ms ({send_errors} send errors), \
         {delivered} delivered in {:.1} ms; through the delay line: {delayed} \
         ({} overflow drops, max held {}), undelayed: {bypassed}; \
         ≈ {rate:.0} pkt/s delayed",
        ms(sent_in),
        ms(elapsed),
        stats.dropped_overflow,
        stats.max_queued,
    );
    eprintln!(
        "delay line stats: {stats:?}; kernel (copy_mode, queue_dropped, user_dropped): {kernel:?}"
    );
    assert!(delivered > 0);
    // Fail-open is off: nothing passes undelayed.
    assert_eq!(bypassed, 0, "packets passed the delay line undelayed");
    assert!(rate > 20_000.0, "delay line sustained only {rate:.0} pkt/s");
    drop(lab);
}
