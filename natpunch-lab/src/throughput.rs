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
}

/// One link setting: natpunch and its references.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputRow {
    pub link: String,
    pub natpunch: Transfer,
    pub kernel_tcp: Transfer,
    /// natpunch / kernel TCP.
    pub vs_tcp: f64,
    /// The shaped rate, if any, and natpunch / that rate.
    pub link_mbit_s: Option<f64>,
    pub vs_link: Option<f64>,
}

fn transfer(bytes: u64, took: Duration, cpu: Option<f64>) -> Transfer {
    let seconds = took.as_secs_f64().max(1e-9);
    Transfer {
        bytes,
        seconds,
        mbit_s: bytes as f64 * 8.0 / seconds / 1e6,
        cpu_s_per_gb: cpu.map(|c| c / (bytes as f64 / 1e9)),
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

fn measure_tcp(lab: &Lab, bytes: u64) -> Result<Transfer, LabError> {
    lab.forward_tcp(Node::NatB, Node::HostB, TCP_PORT)?;
    let target: Ipv4Addr = lab.wan_ip(Node::NatB)?;
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
        let settled = match v["event"].as_str() {
            Some("connected") => v["path"] == "direct",
            Some("path-changed") => v["to"]["path"] == "direct",
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
        .find(|e| e["event"] == "path-changed" && e["to"]["path"] == "direct")
        .or(connected.filter(|c| c["path"] == "direct"));
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

/// Measures one link setting (`rate_kbit`: tbf on both access links).
pub fn measure(
    natpunch: PathBuf,
    a: &str,
    b: &str,
    bytes: u64,
    rate_kbit: Option<u64>,
) -> Result<ThroughputRow, LabError> {
    let link = LinkSpec {
        rate_kbit,
        ..Default::default()
    };
    let lab = pair_lab(natpunch, a, b, Links { a: link, b: link })?;
    let keys = std::env::temp_dir().join(format!("{}-keys", lab.prefix()));
    let _ = std::fs::create_dir_all(&keys);
    let kernel_tcp = measure_tcp(&lab, bytes);
    let run = pipe(&lab, bytes, &keys);
    let _ = std::fs::remove_dir_all(&keys);
    let (kernel_tcp, run) = (kernel_tcp?, run?);
    if !run.intact {
        return Err(LabError::Measure("natpunch delivered altered bytes".into()));
    }
    let natpunch = run.transfer;
    let link_mbit_s = rate_kbit.map(|k| k as f64 / 1000.0);
    Ok(ThroughputRow {
        link: match rate_kbit {
            Some(k) => format!("tbf {} Mbit/s", k / 1000),
            None => "unshaped".into(),
        },
        vs_tcp: natpunch.mbit_s / kernel_tcp.mbit_s.max(1e-9),
        vs_link: link_mbit_s.map(|l| natpunch.mbit_s / l),
        link_mbit_s,
        natpunch,
        kernel_tcp,
    })
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
    let lab = pair_lab(natpunch, a, b, Links { a: link, b: link })?;
    let keys = std::env::temp_dir().join(format!("{}-keys", lab.prefix()));
    let _ = std::fs::create_dir_all(&keys);
    let kernel_tcp = measure_tcp(&lab, bytes);
    let cpu_before = lab.server_pid().and_then(cpu_seconds);
    let run = pipe(&lab, bytes, &keys);
    let cpu_after = lab.server_pid().and_then(cpu_seconds);
    let _ = std::fs::remove_dir_all(&keys);
    let (kernel_tcp, run) = (kernel_tcp?, run?);
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
