//! Session throughput through the lab's NATs (`natpunch bench session`),
//! each figure next to a reference measured in the same lab, same run:
//!
//! - natpunch: `natpunch -s S -d B < data` on host A into `natpunch -s S >
//!   sink` on host B, the punched QUIC session through both NATs; the rate
//!   is counted at B's stdout, from the first byte to the last.
//! - kernel TCP: host A to host B through the same two NATs (NAT A's
//!   SNAT, then a port forward on NAT B), one connection.
//! - the shaped link's nominal rate, when `tc tbf` shapes both access
//!   links.
//!
//! CPU is natpunch's user + system time on both ends (from `wait4`), per
//! GB moved.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::runner::{spawn_lines, wait_event};
use crate::spec::{LinkSpec, Links, Side, TopologySpec};
use crate::topology::{in_netns, Lab, LabError, LabOptions, Node};

/// The TCP reference's port, forwarded on NAT B.
const TCP_PORT: u16 = 5201;
/// Write size of the data sources (large writes, like a bulk copy).
const CHUNK: usize = 256 * 1024;
/// The whole transfer must end in this long (1 GB at 100 Mbit/s).
const TRANSFER_LIMIT: Duration = Duration::from_secs(120);

/// One measured transfer.
#[derive(Debug, Clone, Serialize)]
pub struct Transfer {
    pub bytes: u64,
    pub seconds: f64,
    pub mbit_s: f64,
    /// natpunch only: CPU seconds (both ends) per GB.
    pub cpu_s_per_gb: Option<f64>,
    /// The transfer was cut at the time limit: `bytes` is what it moved,
    /// and the rate counts the whole limit.
    pub cut_at_limit: bool,
}

/// One cell of the session matrix: what both access links do, each way.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Cell {
    pub delay_ms: u64,
    pub rate_kbit: Option<u64>,
    pub loss_percent: f64,
}

impl Cell {
    pub fn link(&self) -> LinkSpec {
        LinkSpec {
            rate_kbit: self.rate_kbit,
            loss: self.loss_percent / 100.0,
            delay: (self.delay_ms > 0).then(|| Duration::from_millis(self.delay_ms)),
        }
    }

    /// "25 ms, 1000 Mbit/s, 1% loss".
    pub fn label(&self) -> String {
        let mut l = format!("{} ms", self.delay_ms);
        l += &match self.rate_kbit {
            Some(k) => format!(", {} Mbit/s", k / 1000),
            None => ", unshaped".into(),
        };
        if self.loss_percent > 0.0 {
            l += &format!(", {}% loss", self.loss_percent);
        }
        l
    }
}

/// One cell: natpunch and its references, measured in one lab.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputRow {
    pub link: String,
    pub cell: Cell,
    pub natpunch: Transfer,
    pub kernel_tcp: Transfer,
    /// iroh's `dumbpipe` on the same path, when installed and both hosts
    /// have public addresses.
    pub dumbpipe: Option<Transfer>,
    /// natpunch / kernel TCP.
    pub vs_tcp: f64,
    /// natpunch / dumbpipe.
    pub vs_dumbpipe: Option<f64>,
    /// The shaped rate, if any, and natpunch / that rate.
    pub link_mbit_s: Option<f64>,
    pub vs_link: Option<f64>,
    /// The lab's delay lines: CPU seconds over the whole cell, and the
    /// packets they held, so a reader sees when the lab was the limit.
    pub delay_line_cpu_s: f64,
    pub delay_line_packets: u64,
}

fn transfer(bytes: u64, took: Duration, cpu: Option<f64>) -> Transfer {
    let seconds = took.as_secs_f64().max(1e-9);
    Transfer {
        bytes,
        seconds,
        mbit_s: bytes as f64 * 8.0 / seconds / 1e6,
        cpu_s_per_gb: cpu.map(|c| c / (bytes as f64 / 1e9)),
        cut_at_limit: false,
    }
}

/// Deterministic pseudo-random bytes (xorshift64), so that a failure
/// reproduces; also the tests' data.
pub fn xorshift_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The data: one pseudo-random block, repeated, so the sink can check
/// every byte at memcmp cost.
fn pattern() -> Vec<u8> {
    xorshift_bytes(CHUNK, 0x9e37_79b9_7f4a_7c15)
}

/// What a sink saw.
struct Sunk {
    bytes: u64,
    /// First byte → last byte.
    took: Duration,
    /// Every byte matched the pattern.
    intact: bool,
}

/// Reads `input` to its end, checking it against [`pattern`].
fn count(mut input: impl Read) -> Sunk {
    let want = pattern();
    let mut buf = vec![0u8; CHUNK];
    let (mut n, mut first, mut last, mut intact) = (0u64, None, None, true);
    loop {
        match input.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
                let mut off = (n % CHUNK as u64) as usize;
                let mut got = &buf[..k];
                while !got.is_empty() {
                    let m = got.len().min(CHUNK - off);
                    intact &= got[..m] == want[off..off + m];
                    got = &got[m..];
                    off = (off + m) % CHUNK;
                }
                n += k as u64;
            }
        }
    }
    Sunk {
        bytes: n,
        took: first
            .zip(last)
            .map(|(f, l)| l.duration_since(f))
            .unwrap_or_default(),
        intact,
    }
}

fn write_pattern(mut out: impl Write, bytes: u64) -> std::io::Result<()> {
    let buf = pattern();
    let mut left = bytes;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        out.write_all(&buf[..k])?;
        left -= k as u64;
    }
    Ok(())
}

/// CPU seconds (user + system) a running process has used, from /proc.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / hz)
}

/// Waits for a child and returns its CPU seconds (user + system).
fn wait_cpu(child: &mut Child) -> Option<f64> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills; the pid is our child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    (r == pid).then(|| {
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(ru.ru_utime) + t(ru.ru_stime)
    })
}

/// Kernel TCP from host A to host B, one connection, `bytes` of the
/// checked pattern, timed at B from the first byte to the last.
pub fn kernel_tcp(lab: &Lab, bytes: u64) -> Result<Transfer, LabError> {
    let target: Ipv4Addr = public_b(lab)?;
    let b = lab
        .netns(Node::HostB)
        .ok_or(LabError::NoSuchNode(Node::HostB))?;
    let a = lab
        .netns(Node::HostA)
        .ok_or(LabError::NoSuchNode(Node::HostA))?;
    let listener = in_netns(b, || TcpListener::bind(("0.0.0.0", TCP_PORT)))?
        .map_err(|e| LabError::Measure(format!("TCP sink: {e}")))?;
    let sink = std::thread::spawn(move || {
        listener
            .accept()
            .map(|(s, _)| count(s))
            .map_err(|e| e.to_string())
    });
    in_netns(a, move || {
        let s = TcpStream::connect((target, TCP_PORT))?;
        write_pattern(&s, bytes)?;
        s.shutdown(std::net::Shutdown::Write)
    })?
    .map_err(|e| LabError::Measure(format!("TCP source: {e}")))?;
    let got = sink
        .join()
        .map_err(|_| LabError::Measure("TCP sink panicked".into()))?
        .map_err(LabError::Measure)?;
    Ok(transfer(got.bytes, got.took, None))
}

/// Where A reaches B's TCP port 5201: B's own address when B is on a
/// public address, else NAT B's, with a port forward to B.
fn public_b(lab: &Lab) -> Result<Ipv4Addr, LabError> {
    if lab.netns(Node::NatB).is_none() {
        return lab
            .host_ip(Node::HostB)
            .ok_or(LabError::NoSuchNode(Node::HostB));
    }
    lab.forward_tcp(Node::NatB, Node::HostB, TCP_PORT)?;
    lab.wan_ip(Node::NatB)
}

/// One pipe transfer through the lab: what A's events and B's sink saw.
#[derive(Debug, Clone)]
pub struct PipeRun {
    pub transfer: Transfer,
    /// How A's punch went (`cone`, `predict`, …, or `relay` where no
    /// direct path formed) and how long it took.
    pub strategy: String,
    pub punch_ms: u64,
    /// When the session started on the relay first, how long that took.
    pub relay_ms: Option<u64>,
    /// Every byte arrived, in order, unchanged.
    pub intact: bool,
}

/// A's session settles on its path (the relay hands over to a punched
/// path, or it says why it stays) within this long.
const SETTLE_LIMIT: Duration = Duration::from_secs(20);

/// `natpunch -s S -d B < data` on A into `natpunch -s S > sink` on B. The
/// session starts on the relay; the data goes once it has moved to its
/// direct path (or stays relayed, saying why), so the figures are the
/// path's own.
pub fn pipe(lab: &Lab, bytes: u64, keys: &std::path::Path) -> Result<PipeRun, LabError> {
    pipe_with(lab, bytes, keys, &[])
}

/// [`pipe`], with more options for B (the listener).
pub fn pipe_with(
    lab: &Lab,
    bytes: u64,
    keys: &std::path::Path,
    b_extra: &[&str],
) -> Result<PipeRun, LabError> {
    let server = lab.server_addr().to_string();
    let key = |k: &str| keys.join(k).to_string_lossy().into_owned();
    let mut b = lab.natpunch(Node::HostB);
    b.args([
        "-s",
        &server,
        "--json",
        "--rto-ms",
        "100",
        "--key",
        &key("b"),
    ])
    .args(b_extra)
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    let (mut bchild, brx) = spawn_lines(b)?;
    let id = wait_event(&brx, &["registered"], Duration::from_secs(20))
        .and_then(|v| v["peer_id"].as_str().map(str::to_string))
        .ok_or_else(|| LabError::Measure("B did not register".into()))?;
    let bout = bchild
        .stdout
        .take()
        .ok_or_else(|| LabError::Measure("no stdout".into()))?;
    let sink = std::thread::spawn(move || count(bout));
    let mut a = lab.natpunch(Node::HostA);
    a.args([
        "-s",
        &server,
        "-d",
        &id,
        "--json",
        "--rto-ms",
        "100",
        "--key",
        &key("a"),
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::null());
    let (mut achild, arx) = spawn_lines(a)?;
    let ain = achild
        .stdin
        .take()
        .ok_or_else(|| LabError::Measure("no stdin".into()))?;
    let mut events: Vec<serde_json::Value> = Vec::new();
    let settle = Instant::now() + SETTLE_LIMIT;
    while let Some(left) = settle.checked_duration_since(Instant::now()) {
        let Ok(line) = arx.recv_timeout(left) else {
            break;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        // A TURN path is final where no direct path can form (the
        // benchmarks' pairs), and the relay is what they measure.
        let settled = match v["event"].as_str() {
            Some("connected") => v["path"] == "direct" || v["via"] == "turn",
            Some("path-changed") => v["to"]["path"] == "direct" || v["to"]["via"] == "turn",
            Some("relayed" | "failed") => true,
            _ => false,
        };
        events.push(v);
        if settled {
            break;
        }
    }
    let source = std::thread::spawn(move || write_pattern(ain, bytes));
    // A transfer that stalls (say, the punch failed) must not hang the
    // bench: past the limit both ends are killed, which ends the sink.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let pids = [achild.id(), bchild.id()];
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(TRANSFER_LIMIT).is_err() {
            for pid in pids {
                // SAFETY: plain kill(2) on our own children's pids.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    });
    let started = Instant::now();
    let got = sink
        .join()
        .map_err(|_| LabError::Measure("sink panicked".into()));
    let _ = source.join();
    let failed = match &got {
        Ok(g) => (started.elapsed() > TRANSFER_LIMIT || g.bytes != bytes)
            .then(|| format!("natpunch moved {} of {bytes} bytes", g.bytes)),
        Err(e) => Some(e.to_string()),
    };
    if failed.is_some() {
        let _ = achild.kill();
        let _ = bchild.kill();
    }
    // Reaped while the watchdog still guards a hang on the way out.
    let cpu = wait_cpu(&mut achild)
        .zip(wait_cpu(&mut bchild))
        .map(|(x, y)| x + y);
    let _ = done_tx.send(());
    let _ = watchdog.join();
    if let Some(why) = failed {
        return Err(LabError::Measure(why));
    }
    let got = got?;
    // The session's first path (the relay, usually) and the direct path
    // it moved to, if it did.
    events.extend(arx.try_iter().filter_map(|l| serde_json::from_str(&l).ok()));
    let connected = events.iter().find(|e| e["event"] == "connected");
    let direct = events
        .iter()
        .find(|e| {
            e["event"] == "path-changed"
                && (e["to"]["path"] == "direct" || e["to"]["via"] == "turn")
        })
        .or(connected.filter(|c| c["path"] == "direct" || c["via"] == "turn"));
    let relay_ms = connected
        .filter(|c| c["path"] == "relay")
        .and_then(|c| c["elapsed_ms"].as_u64());
    Ok(PipeRun {
        transfer: transfer(got.bytes, got.took, cpu),
        strategy: direct
            .or(connected)
            .and_then(|c| c["strategy"].as_str())
            .unwrap_or("?")
            .to_string(),
        punch_ms: direct
            .or(connected)
            .and_then(|c| c["elapsed_ms"].as_u64())
            .unwrap_or(0),
        relay_ms,
        intact: got.intact,
    })
}

/// A lab for the pair `a`/`b` with these access links, its server up.
fn pair_lab(natpunch: PathBuf, a: &str, b: &str, links: Links) -> Result<Lab, LabError> {
    let bad = |e: crate::spec::SpecError| LabError::Measure(e.to_string());
    let topology = TopologySpec::Pair {
        a: Side::parse(a).map_err(bad)?,
        b: Side::parse(b).map_err(bad)?,
    };
    let mut lab = Lab::build(&topology, &LabOptions { natpunch, links })?;
    lab.start_server()?;
    Ok(lab)
}

/// Measures one cell: kernel TCP, natpunch's pipe and, when `dumbpipe`
/// names the binary and B has a public address, iroh's dumbpipe, one
/// after another in one lab.
pub fn measure(
    natpunch: PathBuf,
    a: &str,
    b: &str,
    bytes: u64,
    cell: Cell,
    dumbpipe: Option<&std::path::Path>,
) -> Result<ThroughputRow, LabError> {
    let link = cell.link();
    let lab = pair_lab(natpunch, a, b, Links { a: link, b: link })?;
    let cpu = |lab: &Lab| -> f64 {
        lab.delay_lines()
            .iter()
            .filter_map(|l| cpu_seconds(l.pid))
            .sum()
    };
    let keys = std::env::temp_dir().join(format!("{}-keys", lab.prefix()));
    let _ = std::fs::create_dir_all(&keys);
    let kernel_tcp = kernel_tcp(&lab, bytes);
    let run = pipe(&lab, bytes, &keys);
    let _ = std::fs::remove_dir_all(&keys);
    let (kernel_tcp, run) = (kernel_tcp?, run?);
    if !run.intact {
        return Err(LabError::Measure("natpunch delivered altered bytes".into()));
    }
    let dumbpipe = match dumbpipe {
        Some(bin) if lab.netns(Node::NatB).is_none() => Some(measure_dumbpipe(&lab, bin, bytes)?),
        _ => None,
    };
    let delay_line_packets = lab
        .delay_lines()
        .iter()
        .filter_map(|l| lab.queue_counters(l).ok())
        .map(|c| c.queued)
        .sum();
    let natpunch = run.transfer;
    let link_mbit_s = cell.rate_kbit.map(|k| k as f64 / 1000.0);
    Ok(ThroughputRow {
        link: cell.label(),
        cell,
        vs_tcp: natpunch.mbit_s / kernel_tcp.mbit_s.max(1e-9),
        vs_dumbpipe: dumbpipe
            .as_ref()
            .map(|d| natpunch.mbit_s / d.mbit_s.max(1e-9)),
        vs_link: link_mbit_s.map(|l| natpunch.mbit_s / l),
        link_mbit_s,
        delay_line_cpu_s: cpu(&lab),
        delay_line_packets,
        natpunch,
        kernel_tcp,
        dumbpipe,
    })
}

/// dumbpipe's listener prints its ticket after giving up on its home
/// relay (~10 s without internet, measured); it needs no relay for a
/// direct address.
const DUMBPIPE_READY: Duration = Duration::from_secs(30);
/// dumbpipe's fixed UDP port on B (its `--ipv4-addr`).
const DUMBPIPE_PORT: u16 = 5202;

/// iroh's `dumbpipe listen` on B into the checking sink, `dumbpipe
/// connect TICKET` on A fed the same data as natpunch's pipe. Counted at
/// B's stdout from the first byte to the last, as natpunch is.
fn measure_dumbpipe(lab: &Lab, bin: &std::path::Path, bytes: u64) -> Result<Transfer, LabError> {
    let b_ip = lab
        .host_ip(Node::HostB)
        .ok_or(LabError::NoSuchNode(Node::HostB))?;
    let mut listen = lab.command(Node::HostB, bin);
    listen
        .args(["listen", "--ipv4-addr", &format!("{b_ip}:{DUMBPIPE_PORT}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let (mut lchild, lrx) = spawn_lines(listen)?;
    let ticket = {
        let deadline = Instant::now() + DUMBPIPE_READY;
        let mut found = None;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = lrx.recv_timeout(left) else {
                break;
            };
            // "dumbpipe connect TICKET" (after "Listening. To connect,
            // use:"; a warning about the unreachable home relay comes
            // first, ~10 s in, as this lab has no internet).
            if let Some(t) = line.trim().strip_prefix("dumbpipe connect ") {
                found = Some(t.trim().to_string());
                break;
            }
        }
        found
    };
    let Some(ticket) = ticket else {
        let _ = lchild.kill();
        let _ = lchild.wait();
        return Err(LabError::Measure(
            "dumbpipe listen printed no ticket".into(),
        ));
    };
    let out = lchild
        .stdout
        .take()
        .ok_or_else(|| LabError::Measure("no stdout".into()))?;
    // dumbpipe's listener may outlive the connection: stop at the count.
    let sink = std::thread::spawn(move || count(out.take(bytes)));
    let mut connect = lab.command(Node::HostA, bin);
    connect
        .args(["connect", &ticket])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut cchild = connect.spawn().map_err(|source| LabError::Spawn {
        command: "dumbpipe connect".into(),
        source,
    })?;
    let input = cchild
        .stdin
        .take()
        .ok_or_else(|| LabError::Measure("no stdin".into()))?;
    let source = std::thread::spawn(move || write_pattern(input, bytes));
    let pids = [lchild.id(), cchild.id()];
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(TRANSFER_LIMIT).is_err() {
            for pid in pids {
                // SAFETY: plain kill(2) on our own children's pids.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    });
    let got = sink.join();
    let _ = source.join();
    for c in [&mut cchild, &mut lchild] {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = done_tx.send(());
    let _ = watchdog.join();
    let got = got.map_err(|_| LabError::Measure("dumbpipe sink panicked".into()))?;
    if !got.intact {
        return Err(LabError::Measure("dumbpipe delivered altered bytes".into()));
    }
    if got.bytes != bytes {
        // Cut by the watchdog: the rate is what it moved in the limit.
        let mut t = transfer(got.bytes, TRANSFER_LIMIT, None);
        t.cut_at_limit = true;
        return Ok(t);
    }
    Ok(transfer(got.bytes, got.took, None))
}

/// An interactive stream's echo times while a bulk transfer shares its
/// session.
#[derive(Debug, Clone, Serialize)]
pub struct Interactive {
    pub link: String,
    /// The echo's median round trip on the idle session, before the bulk
    /// transfer starts: the path's RTT as the user sees it.
    pub idle_rtt_ms: f64,
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The largest echo time in the bulk transfer's first 2 s (the
    /// congestion controller's startup), not in the percentiles.
    pub startup_max_ms: f64,
    /// The bulk transfer's rate over the same time.
    pub bulk_mbit_s: f64,
}

/// Keystroke size: an ssh keystroke packet carries ~40 bytes of payload.
const KEYSTROKE: usize = 40;
/// One keystroke every 50 ms (a fast typist, or a held key).
const KEYSTROKE_EVERY: Duration = Duration::from_millis(50);
/// Echo samples on the idle session, for its RTT.
const IDLE_SAMPLES: usize = 20;
/// Keystrokes sent in the bulk transfer's first 2 s are reported apart
/// (as the startup maximum): at these RTTs that is the congestion
/// controller's startup and drain (~1.5 s at 100 ms, measured), a
/// one-time event; the percentiles describe the transfer after it.
const BULK_RAMP: Duration = Duration::from_secs(2);
/// Local ports of the interactive test's services and forwards.
const SINK_PORT: u16 = 6201;
const ECHO_PORT: u16 = 6202;

/// A bulk transfer and a keystroke echo through one session, as an ssh
/// user with a file copy running sees it: B exposes a sink and an echo
/// service (`natpunch listen --expose`), A forwards both (`natpunch
/// connect --forward`); each TCP connection is a stream of the one QUIC
/// session. A writes `bytes` into the sink while it sends a 40-byte
/// keystroke every 50 ms and times its echo.
pub fn interactive(
    natpunch: PathBuf,
    a: &str,
    b: &str,
    bytes: u64,
    cell: Cell,
) -> Result<Interactive, LabError> {
    let link = cell.link();
    let lab = pair_lab(natpunch, a, b, Links { a: link, b: link })?;
    let keys = std::env::temp_dir().join(format!("{}-keys", lab.prefix()));
    let _ = std::fs::create_dir_all(&keys);
    let r = interactive_in(&lab, &keys, bytes, cell);
    let _ = std::fs::remove_dir_all(&keys);
    r
}

fn interactive_in(
    lab: &Lab,
    keys: &std::path::Path,
    bytes: u64,
    cell: Cell,
) -> Result<Interactive, LabError> {
    let err = |e: std::io::Error| LabError::Measure(e.to_string());
    let b_ns = lab
        .netns(Node::HostB)
        .ok_or(LabError::NoSuchNode(Node::HostB))?;
    let a_ns = lab
        .netns(Node::HostA)
        .ok_or(LabError::NoSuchNode(Node::HostA))?;
    // B's services, on its loopback.
    let (sink_l, echo_l) = in_netns(b_ns, || {
        Ok::<_, std::io::Error>((
            TcpListener::bind(("127.0.0.1", SINK_PORT))?,
            TcpListener::bind(("127.0.0.1", ECHO_PORT))?,
        ))
    })?
    .map_err(err)?;
    let (sink_tx, sink_rx) = std::sync::mpsc::channel();
    let drained = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drained_flag = drained.clone();
    std::thread::spawn(move || {
        let got = sink_l
            .accept()
            .map(|(s, _)| count(s))
            .map_err(|e| e.to_string());
        drained_flag.store(true, std::sync::atomic::Ordering::Release);
        let _ = sink_tx.send(got);
    });
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = echo_l.accept() {
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    let server = lab.server_addr().to_string();
    let key = |k: &str| keys.join(k).to_string_lossy().into_owned();
    let mut bcmd = lab.natpunch(Node::HostB);
    bcmd.args([
        "listen",
        "-s",
        &server,
        "--json",
        "--key",
        &key("b"),
        "--expose",
        &format!("sink=127.0.0.1:{SINK_PORT}"),
        "--expose",
        &format!("echo=127.0.0.1:{ECHO_PORT}"),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    let (mut bchild, brx) = spawn_lines(bcmd)?;
    let mut children = vec![];
    let result = (|| {
        let id = wait_event(&brx, &["registered"], Duration::from_secs(20))
            .and_then(|v| v["peer_id"].as_str().map(str::to_string))
            .ok_or_else(|| LabError::Measure("B did not register".into()))?;
        let mut acmd = lab.natpunch(Node::HostA);
        acmd.args([
            "connect",
            &id,
            "-s",
            &server,
            "--json",
            "--key",
            &key("a"),
            "--forward",
            &format!("127.0.0.1:{SINK_PORT}=sink"),
            "--forward",
            &format!("127.0.0.1:{ECHO_PORT}=echo"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        let (achild, arx) = spawn_lines(acmd)?;
        children.push(achild);
        // Both forwards listen, and the session has settled on its path.
        let mut forwarding = 0;
        let deadline = Instant::now() + SETTLE_LIMIT;
        let mut direct = false;
        while forwarding < 2 || !direct {
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or_else(|| LabError::Measure("A's forwards did not come up".into()))?;
            let Ok(line) = arx.recv_timeout(left) else {
                return Err(LabError::Measure("A ended before forwarding".into()));
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            match v["event"].as_str() {
                Some("forwarding") => forwarding += 1,
                Some("connected") => direct |= v["path"] == "direct",
                Some("path-changed") => direct |= v["to"]["path"] == "direct",
                Some("relayed") => direct = true,
                Some("failed") => return Err(LabError::Measure(format!("A failed: {line}"))),
                _ => {}
            }
        }
        in_netns(a_ns, move || keystrokes(bytes, &drained))?
    })();
    // A's writer is done when its bytes are in A's socket; the sink ends
    // when they have all crossed.
    let got = match &result {
        Ok(_) => sink_rx
            .recv_timeout(TRANSFER_LIMIT)
            .map_err(|_| LabError::Measure("the bulk stream did not end".into())),
        Err(_) => Err(LabError::Measure(String::new())),
    };
    for c in children.iter_mut().chain(std::iter::once(&mut bchild)) {
        let _ = c.kill();
        let _ = c.wait();
    }
    let (idle, loaded, startup, _writer_took) = result?;
    let got = got?.map_err(LabError::Measure)?;
    if got.bytes != bytes || !got.intact {
        return Err(LabError::Measure(format!(
            "the bulk stream moved {} of {bytes} bytes",
            got.bytes
        )));
    }
    let ms = |mut v: Vec<Duration>, q: f64| -> f64 {
        v.sort();
        let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len().max(1)) - 1;
        v.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Ok(Interactive {
        link: cell.label(),
        idle_rtt_ms: ms(idle, 0.5),
        samples: loaded.len(),
        p50_ms: ms(loaded.clone(), 0.5),
        p99_ms: ms(loaded.clone(), 0.99),
        max_ms: ms(loaded, 1.0),
        startup_max_ms: startup.as_secs_f64() * 1e3,
        bulk_mbit_s: got.bytes as f64 * 8.0 / got.took.as_secs_f64().max(1e-9) / 1e6,
    })
}

/// In A's namespace: idle echo samples, then the bulk transfer with a
/// keystroke every 50 ms until B's sink has it all (`drained`). Returns
/// (idle RTTs, loaded RTTs after the startup, the startup's largest RTT,
/// the bulk writer's duration).
type Keystrokes = Result<(Vec<Duration>, Vec<Duration>, Duration, Duration), LabError>;

fn keystrokes(bytes: u64, drained: &std::sync::atomic::AtomicBool) -> Keystrokes {
    let err =
        |what: &'static str| move |e: std::io::Error| LabError::Measure(format!("{what}: {e}"));
    let mut echo = TcpStream::connect(("127.0.0.1", ECHO_PORT)).map_err(err("echo"))?;
    echo.set_nodelay(true).map_err(err("echo"))?;
    echo.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(err("echo"))?;
    let key = [b'k'; KEYSTROKE];
    let mut back = [0u8; KEYSTROKE];
    let mut once = |echo: &mut TcpStream| -> Result<Duration, LabError> {
        let t = Instant::now();
        echo.write_all(&key).map_err(err("keystroke"))?;
        echo.read_exact(&mut back).map_err(err("echo"))?;
        Ok(t.elapsed())
    };
    let mut idle = Vec::new();
    for _ in 0..IDLE_SAMPLES {
        idle.push(once(&mut echo)?);
        std::thread::sleep(KEYSTROKE_EVERY);
    }
    let bulk = TcpStream::connect(("127.0.0.1", SINK_PORT)).map_err(err("sink"))?;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        let r = write_pattern(&bulk, bytes).and_then(|()| bulk.shutdown(std::net::Shutdown::Write));
        let _ = done_tx.send((r, started.elapsed()));
    });
    // Keystrokes go out every 50 ms whatever the echo does (a typist
    // does not wait for the screen); a reader thread matches each echo to
    // its send time by the sequence number it carries.
    let mut reader = echo.try_clone().map_err(err("echo"))?;
    let sent_at = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let sent_log = sent_at.clone();
    let echoes = std::thread::spawn(move || {
        let mut rtts = Vec::new();
        let mut back = [0u8; KEYSTROKE];
        while reader.read_exact(&mut back).is_ok() {
            let now = Instant::now();
            let seq = u32::from_be_bytes([back[0], back[1], back[2], back[3]]) as usize;
            let sent = sent_log.lock().ok().and_then(|s| s.get(seq).copied());
            if let Some(sent) = sent {
                rtts.push((sent, now.duration_since(sent)));
            }
        }
        rtts
    });
    let mut next = Instant::now();
    let mut wrote = None;
    let mut key = [b'k'; KEYSTROKE];
    let end = loop {
        match done_rx.try_recv() {
            Ok((r, took)) => {
                r.map_err(err("bulk"))?;
                wrote = Some(took);
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) if wrote.is_none() => {
                return Err(LabError::Measure("bulk writer vanished".into()))
            }
            Err(_) => {}
        }
        if let Some(took) = wrote.filter(|_| drained.load(std::sync::atomic::Ordering::Acquire)) {
            break took;
        }
        if started.elapsed() > TRANSFER_LIMIT {
            return Err(LabError::Measure("the bulk transfer did not end".into()));
        }
        let seq = sent_at.lock().map(|mut s| {
            s.push(Instant::now());
            s.len() - 1
        });
        let seq = seq.map_err(|_| LabError::Measure("keystroke log poisoned".into()))?;
        key[..4].copy_from_slice(&(seq as u32).to_be_bytes());
        echo.write_all(&key).map_err(err("keystroke"))?;
        next += KEYSTROKE_EVERY;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    };
    // The last echoes are in flight: give them a few RTTs, then close.
    let last_sent = sent_at.lock().ok().and_then(|s| s.last().copied());
    std::thread::sleep(idle.iter().max().copied().unwrap_or_default() * 3);
    let _ = echo.shutdown(std::net::Shutdown::Both);
    let rtts = echoes
        .join()
        .map_err(|_| LabError::Measure("echo reader panicked".into()))?;
    let ramp_end = started + BULK_RAMP;
    let loaded: Vec<Duration> = rtts
        .iter()
        .filter(|(sent, _)| *sent >= ramp_end)
        .map(|(_, rtt)| *rtt)
        .collect();
    let startup = rtts
        .iter()
        .filter(|(sent, _)| *sent < ramp_end)
        .map(|(_, rtt)| *rtt)
        .max()
        .unwrap_or_default();
    let answered = rtts.len();
    let asked = sent_at.lock().map(|s| s.len()).unwrap_or(0);
    if answered < asked || last_sent.is_none() {
        return Err(LabError::Measure(format!(
            "{} of {asked} keystrokes were echoed",
            answered
        )));
    }
    Ok((idle, loaded, startup, end))
}

/// The relay benchmark's figures for one link setting.
#[derive(Debug, Clone, Serialize)]
pub struct RelayRow {
    pub link: String,
    /// The pipe through `natpunch server`'s relay (both NATs relay-only).
    pub relay: Transfer,
    /// Kernel TCP from A to B over the same two access links.
    pub kernel_tcp: Transfer,
    /// relay / kernel TCP.
    pub vs_tcp: f64,
    /// The relay server's own CPU seconds per GB relayed.
    pub relay_cpu_s_per_gb: Option<f64>,
    /// The same pipe through coturn (B allocates with `--turn` over UDP),
    /// when coturn is installed, and coturn's CPU seconds per GB.
    pub coturn: Option<Transfer>,
    pub coturn_cpu_s_per_gb: Option<f64>,
    /// natpunch's relay / coturn.
    pub vs_coturn: Option<f64>,
}

/// coturn's port in a benchmark lab's server namespace.
const COTURN_PORT: u16 = 3490;

/// The pipe through coturn, started in the server's namespace: the
/// transfer and coturn's CPU seconds per GB (`None` without coturn).
fn through_coturn(
    lab: &mut Lab,
    bytes: u64,
    keys: &std::path::Path,
) -> Result<Option<(Transfer, Option<f64>)>, LabError> {
    let installed = std::process::Command::new("turnserver")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !installed {
        eprintln!(
            "coturn (turnserver) is not installed: no coturn column (apt-get install coturn)"
        );
        return Ok(None);
    }
    let ip = lab.server_addr().ip();
    let mut cmd = lab.command(Node::Server, "turnserver");
    cmd.args(["-n", "--no-dtls", "--no-tls", "--no-cli", "--lt-cred-mech"])
        .arg(format!("--listening-ip={ip}"))
        .arg(format!("--relay-ip={ip}"))
        .arg(format!("--listening-port={COTURN_PORT}"))
        .args(["--realm=bench", "--user=bench:bench", "--log-file=stdout"])
        .arg(format!(
            "--pidfile={}",
            keys.join("turnserver.pid").display()
        ))
        .arg(format!("--userdb={}", keys.join("turndb").display()));
    let pid = lab.spawn(cmd)?;
    let uri = format!("turn:{ip}:{COTURN_PORT}");
    // coturn answers STUN once it is up (one Binding retransmits for
    // 3.75 s).
    let mut probe = lab.natpunch(Node::Server);
    probe.args(["stun", "-H", &format!("{ip}:{COTURN_PORT}")]);
    let up = probe
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !up {
        return Err(LabError::Measure("coturn did not start".into()));
    }
    let before = cpu_seconds(pid);
    let run = pipe_with(
        lab,
        bytes,
        keys,
        &[
            "--turn",
            &uri,
            "--turn-user",
            "bench",
            "--turn-pass",
            "bench",
        ],
    )?;
    let after = cpu_seconds(pid);
    if !run.intact {
        return Err(LabError::Measure("coturn delivered altered bytes".into()));
    }
    if run.strategy != "turn" {
        return Err(LabError::Measure(format!(
            "the session did not settle on coturn ({})",
            run.strategy
        )));
    }
    let cpu = before
        .zip(after)
        .map(|(x, y)| (y - x) / (bytes as f64 / 1e9));
    Ok(Some((run.transfer, cpu)))
}

/// Relayed throughput against kernel TCP over the same access links, in
/// one lab (`a`/`b` should admit no direct path, so every byte is
/// relayed), with the relay server's CPU per GB.
pub fn measure_relay(
    natpunch: PathBuf,
    a: &str,
    b: &str,
    bytes: u64,
    rate_kbit: Option<u64>,
) -> Result<RelayRow, LabError> {
    let link = LinkSpec {
        rate_kbit,
        ..Default::default()
    };
    let mut lab = pair_lab(natpunch, a, b, Links { a: link, b: link })?;
    let keys = std::env::temp_dir().join(format!("{}-keys", lab.prefix()));
    let _ = std::fs::create_dir_all(&keys);
    let kernel_tcp = kernel_tcp(&lab, bytes);
    let cpu_before = lab.server_pid().and_then(cpu_seconds);
    let run = pipe(&lab, bytes, &keys);
    let cpu_after = lab.server_pid().and_then(cpu_seconds);
    let coturn = through_coturn(&mut lab, bytes, &keys);
    let _ = std::fs::remove_dir_all(&keys);
    let (kernel_tcp, run, coturn) = (kernel_tcp?, run?, coturn?);
    if !run.intact {
        return Err(LabError::Measure(
            "the relay delivered altered bytes".into(),
        ));
    }
    if run.strategy != "relay" {
        return Err(LabError::Measure(format!(
            "{a} / {b} went direct ({}): pick a pair with no direct path",
            run.strategy
        )));
    }
    let relay_cpu_s_per_gb = cpu_before
        .zip(cpu_after)
        .map(|(x, y)| (y - x) / (bytes as f64 / 1e9));
    Ok(RelayRow {
        link: match rate_kbit {
            Some(k) => format!("tbf {} Mbit/s", k / 1000),
            None => "unshaped".into(),
        },
        vs_tcp: run.transfer.mbit_s / kernel_tcp.mbit_s.max(1e-9),
        vs_coturn: coturn
            .as_ref()
            .map(|(t, _)| run.transfer.mbit_s / t.mbit_s.max(1e-9)),
        coturn_cpu_s_per_gb: coturn.as_ref().and_then(|(_, c)| *c),
        coturn: coturn.map(|(t, _)| t),
        relay: run.transfer,
        kernel_tcp,
        relay_cpu_s_per_gb,
    })
}

/// Time from the connector's process start to the first byte B writes
/// out, relayed (`runs` times, in one lab with these links), and the
/// floor: the introduction (A → server → B → server → A: rtt_A + rtt_B)
/// and the QUIC handshake over the relay with the first byte riding on
/// its last flight (1.5 × (rtt_A + rtt_B)), from each host's measured
/// round trip to the server.
pub fn first_relayed_byte(
    natpunch: PathBuf,
    a: &str,
    b: &str,
    links: Links,
    runs: u32,
) -> Result<(Vec<u64>, u64), LabError> {
    let lab = pair_lab(natpunch, a, b, links)?;
    let rtt = |n| {
        crate::runner::nat_report(&lab, n)
            .ok()
            .and_then(|r| r.rtt_ms)
            .unwrap_or(0)
    };
    let floor_ms = (rtt(Node::HostA) + rtt(Node::HostB)) * 5 / 2;
    let keys = std::env::temp_dir().join(format!("{}-keys", lab.prefix()));
    let _ = std::fs::create_dir_all(&keys);
    let server = lab.server_addr().to_string();
    let mut times = Vec::new();
    for i in 0..runs {
        let key = |k: String| keys.join(k).to_string_lossy().into_owned();
        let mut b = lab.natpunch(Node::HostB);
        b.args(["-s", &server, "--json", "--key", &key(format!("b{i}"))])
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let (mut bchild, brx) = spawn_lines(b)?;
        let Some(id) = wait_event(&brx, &["registered"], Duration::from_secs(20))
            .and_then(|v| v["peer_id"].as_str().map(str::to_string))
        else {
            let _ = bchild.kill();
            let _ = bchild.wait();
            continue;
        };
        let mut bout = bchild.stdout.take();
        let mut a = lab.natpunch(Node::HostA);
        a.args(["-s", &server, "-d", &id, "--key", &key(format!("a{i}"))])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let t0 = Instant::now();
        let mut achild = a.spawn().map_err(|source| LabError::Spawn {
            command: "natpunch".into(),
            source,
        })?;
        if let Some(mut s) = achild.stdin.take() {
            let _ = s.write_all(b"x");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut one = [0u8; 1];
            let got = bout
                .as_mut()
                .is_some_and(|o| o.read_exact(&mut one).is_ok());
            let _ = tx.send(got.then(|| t0.elapsed()));
        });
        if let Ok(Some(took)) = rx.recv_timeout(Duration::from_secs(20)) {
            times.push(took.as_millis() as u64);
        }
        for c in [&mut achild, &mut bchild] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    let _ = std::fs::remove_dir_all(&keys);
    Ok((times, floor_ms))
}
