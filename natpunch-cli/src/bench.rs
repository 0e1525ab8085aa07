//! `natpunch bench`: measurements printed as a ratio against a reference
//! measured in the same run. Never run as a timed unit test.
//!
//! `bench stun`: Binding responses per second of `natpunch server` and of
//! coturn, each pinned to CPU 0, loaded by the same generator pinned to
//! CPU 1 (batched sends and receives over many sockets, a fixed window of
//! requests in flight per socket).

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use natpunch::batch::{RecvBatch, SendBatch};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// STUN Binding responses per second: natpunch server vs coturn.
    Stun(StunBench),
    /// Time to a direct path per NAT pair in the lab, vs the physical floor
    /// (root, Linux).
    Punch(PunchBench),
    /// Session throughput per link delay, rate and loss vs kernel TCP and
    /// iroh's dumbpipe on the same path, with CPU per GB, and keystroke
    /// latency beside a bulk copy (root, Linux).
    Session(SessionBench),
    /// Relayed throughput through `natpunch server` vs coturn (a TURN
    /// allocation, `--turn`) vs kernel TCP over the same access links, both
    /// relays' CPU per GB, and the time to the first relayed byte vs its
    /// floor (root, Linux).
    Relay(RelayBench),
    /// TCP hole punching per NAT pair, with and without limited-TTL
    /// openers, through NATs that answer unsolicited SYNs with a RST by
    /// default: success counts and time to a direct TCP stream (root, Linux).
    Tcp(TcpBench),
}

#[derive(Debug, Args)]
pub struct TcpBench {
    /// Punches per pair and per mode (with openers, without).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,
    /// Pairs, as for `natpunch lab grid --pairs`.
    #[arg(
        long,
        default_value = "port-restricted-cone:inbound-tcp=rst/port-restricted-cone:inbound-tcp=rst,port-restricted-cone:inbound-tcp=rst/symmetric-sequential:inbound-tcp=rst,symmetric-sequential:inbound-tcp=rst/symmetric-sequential:inbound-tcp=rst"
    )]
    pub pairs: String,
    /// One-way delay on each access link (ms).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub delay_ms: u64,
    /// Print one JSON object per row.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RelayBench {
    /// The NAT pair, A/B: one with no direct path, so every byte is relayed.
    #[arg(long, default_value = "symmetric-random/symmetric-random")]
    pub pair: String,
    /// MiB per transfer.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub mib: u64,
    /// The shaped run's rate in Mbit/s (tc tbf on both access links).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub rate_mbit: u64,
    /// One-way delay on each access link for the first-byte runs (ms).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub delay_ms: u64,
    /// First-byte runs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,
    /// Print JSON objects instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SessionBench {
    /// The NAT pair, A/B. With direct/direct (both hosts on public
    /// addresses) iroh's dumbpipe runs too; behind NATs it cannot.
    #[arg(long, default_value = "direct/direct")]
    pub pair: String,
    /// MiB per transfer.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub mib: u64,
    /// One-way delays per access link to measure (ms, comma-separated);
    /// each runs unshaped and at --rate-mbit.
    #[arg(long, default_value = "0,10,25,50", value_delimiter = ',')]
    pub delays: Vec<u64>,
    /// The shaped cells' rate in Mbit/s (tc tbf on both access links).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub rate_mbit: u64,
    /// The lossy cell: this much random loss (percent, each way, each
    /// access link) at --loss-delay-ms and --rate-mbit; 0 skips it.
    #[arg(long, default_value_t = 1.0, value_parser = percent)]
    pub loss: f64,
    /// The lossy cell's one-way delay per access link (ms).
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub loss_delay_ms: u64,
    /// Delays (ms) of the interactive cells at --rate-mbit: a keystroke
    /// echo every 50 ms while a bulk transfer shares the session.
    #[arg(
        long,
        default_value = "10,25",
        value_delimiter = ',',
        conflicts_with = "no_interactive"
    )]
    pub interactive: Vec<u64>,
    /// Skip the interactive cells.
    #[arg(long)]
    pub no_interactive: bool,
    /// MiB of the interactive cells' bulk transfer (long enough for a few
    /// hundred keystrokes after the startup).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub interactive_mib: u64,
    /// iroh's dumbpipe binary (default: `dumbpipe` on PATH or in
    /// ~/.cargo/bin); without it, its column is skipped with a note.
    #[arg(long, conflicts_with = "no_dumbpipe")]
    pub dumbpipe: Option<std::path::PathBuf>,
    /// Skip the dumbpipe reference.
    #[arg(long)]
    pub no_dumbpipe: bool,
    /// Print one JSON object per cell.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PunchBench {
    /// Attempts per pair (cold, then as many warm).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,
    /// Random loss on each access link, each way (percent).
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Pairs, as for `natpunch lab grid --pairs`.
    #[arg(
        long,
        default_value = "port-restricted-cone/port-restricted-cone,full-cone/linux,port-restricted-cone/symmetric-sequential,symmetric-sequential/symmetric-sequential,port-restricted-cone/symmetric-random"
    )]
    pub pairs: String,
    /// One-way delay on each access link (ms).
    #[arg(long, default_value_t = 20)]
    pub delay_ms: u64,
    /// Print one JSON object per pair.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StunBench {
    /// Seconds to measure each server.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub duration: u64,
    /// Generator sockets (distinct source ports).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub sockets: u16,
    /// Requests in flight per socket.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub window: u16,
    /// Measure natpunch only (no coturn reference).
    #[arg(long)]
    pub no_coturn: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Stun(b) => stun(b),
        BenchCommand::Punch(b) => punch(b),
        BenchCommand::Session(b) => session(b),
        BenchCommand::Relay(b) => relay(b),
        BenchCommand::Tcp(b) => tcp(b),
    }
}

/// Lab options with `delay_ms` one way and `loss_percent` on both access
/// links, running this very binary.
fn same_links(delay_ms: u64, loss_percent: f64) -> anyhow::Result<natpunch_lab::LabOptions> {
    let link = natpunch_lab::LinkSpec {
        delay: (delay_ms > 0).then(|| Duration::from_millis(delay_ms)),
        loss: loss_percent / 100.0,
        ..Default::default()
    };
    Ok(natpunch_lab::LabOptions {
        natpunch: std::env::current_exe()?,
        links: natpunch_lab::Links { a: link, b: link },
    })
}

fn tcp(b: TcpBench) -> anyhow::Result<ExitCode> {
    use natpunch_lab::runner;
    natpunch_lab::topology::preflight()?;
    let pairs = runner::parse_pairs(&b.pairs)?;
    let opts = same_links(b.delay_ms, 0.0)?;
    if !b.json {
        println!(
            "TCP hole punching (--tcp --once), {} punches per pair and mode, {} ms one-way on each access link; time from the connector's process start to `connected`",
            b.runs, b.delay_ms
        );
        println!(
            "  {:<80} {:<8} {:>7} {:>8} {:>8}",
            "pair", "openers", "direct", "median", "p95"
        );
    }
    runner::run_tcp_bench(&opts, &pairs, b.runs, |r| {
        if b.json {
            crate::output::json_line(&serde_json::to_value(r).unwrap_or_default());
        } else {
            let ms = |v: Option<u64>| v.map(|x| format!("{x} ms")).unwrap_or_else(|| "-".into());
            println!(
                "  {:<80} {:<8} {:>4}/{:<2} {:>8} {:>8}",
                format!("{} / {}", r.a, r.b),
                if r.openers { "on" } else { "off" },
                r.direct,
                r.runs,
                ms(r.median_ms),
                ms(r.p95_ms),
            );
            if let (Some(f), true) = (&r.last_failure, r.direct < r.runs) {
                println!("      last failure: {f}");
            }
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

fn relay(b: RelayBench) -> anyhow::Result<ExitCode> {
    natpunch_lab::topology::preflight()?;
    let (pa, pb) = b
        .pair
        .split_once('/')
        .context("--pair wants A/B, like symmetric-random/symmetric-random")?;
    let bytes = b.mib << 20;
    if !b.json {
        println!(
            "relayed throughput, {pa} / {pb}, {} MiB per transfer, A → relay → B",
            b.mib
        );
        println!(
            "  {:<16} {:>14} {:>14} {:>14} {:>8} {:>10} {:>14} {:>15}",
            "link",
            "natpunch relay",
            "coturn",
            "kernel TCP",
            "vs TCP",
            "vs coturn",
            "relay CPU s/GB",
            "coturn CPU s/GB"
        );
    }
    for rate in [Some(b.rate_mbit * 1000), None] {
        let r =
            natpunch_lab::throughput::measure_relay(std::env::current_exe()?, pa, pb, bytes, rate)?;
        if b.json {
            crate::output::json_line(&serde_json::to_value(&r).unwrap_or_default());
            continue;
        }
        let opt = |v: Option<f64>, unit: &str| {
            v.map(|c| format!("{c:.2}{unit}"))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "  {:<16} {:>7.0} Mbit/s {:>14} {:>7.0} Mbit/s {:>7.2}x {:>10} {:>14} {:>15}",
            r.link,
            r.relay.mbit_s,
            r.coturn
                .as_ref()
                .map(|t| format!("{:.0} Mbit/s", t.mbit_s))
                .unwrap_or_else(|| "-".into()),
            r.kernel_tcp.mbit_s,
            r.vs_tcp,
            opt(r.vs_coturn, "x"),
            opt(r.relay_cpu_s_per_gb, ""),
            opt(r.coturn_cpu_s_per_gb, ""),
        );
    }
    let link = natpunch_lab::LinkSpec {
        delay: Some(Duration::from_millis(b.delay_ms)),
        ..Default::default()
    };
    let (mut times, floor) = natpunch_lab::throughput::first_relayed_byte(
        std::env::current_exe()?,
        pa,
        pb,
        natpunch_lab::Links { a: link, b: link },
        b.runs,
    )?;
    times.sort_unstable();
    let median = times.get(times.len() / 2).copied();
    let p95 = times
        .get((times.len() * 95).div_ceil(100).saturating_sub(1))
        .copied();
    let ratio = |t: Option<u64>| t.map(|t| t as f64 / floor.max(1) as f64);
    if b.json {
        crate::output::json_line(&serde_json::json!({
            "first_byte": {"delay_ms": b.delay_ms, "runs": b.runs, "delivered": times.len(),
                "median_ms": median, "p95_ms": p95, "floor_ms": floor,
                "median_vs_floor": ratio(median), "p95_vs_floor": ratio(p95)}
        }));
    } else {
        println!(
            "first relayed byte, {} ms one-way per access link, from the connector's start: median {} ms ({:.2}x the floor of {floor} ms), p95 {} ms, {}/{} delivered",
            b.delay_ms,
            median.map_or("-".into(), |m| m.to_string()),
            ratio(median).unwrap_or(0.0),
            p95.map_or("-".into(), |m| m.to_string()),
            times.len(),
            b.runs
        );
        println!("  floor: the introduction (rtt_A + rtt_B) and the QUIC handshake over the relay with the byte on its last flight (1.5 x (rtt_A + rtt_B))");
    }
    Ok(ExitCode::SUCCESS)
}

fn session(b: SessionBench) -> anyhow::Result<ExitCode> {
    use natpunch_lab::throughput::{self, Cell};
    natpunch_lab::topology::preflight()?;
    let (pa, pb) = b
        .pair
        .split_once('/')
        .context("--pair wants A/B, like full-cone/symmetric-sequential")?;
    let bytes = b.mib << 20;
    let rate = Some(b.rate_mbit * 1000);
    if let Some(bin) = b.dumbpipe.as_ref().filter(|f| !f.is_file()) {
        anyhow::bail!("--dumbpipe {}: no such file", bin.display());
    }
    let dumbpipe = if b.no_dumbpipe {
        None
    } else {
        b.dumbpipe.clone().or_else(find_dumbpipe)
    };
    let public = pb == "direct";
    let note = match (&dumbpipe, public) {
        (None, _) if b.no_dumbpipe => Some("dumbpipe skipped (--no-dumbpipe)"),
        (None, _) => Some(
            "*** dumbpipe is not installed (`cargo install dumbpipe`): its column is skipped ***",
        ),
        (Some(_), false) => Some(
            "*** dumbpipe needs B on a public address (--pair X/direct): its column is skipped ***",
        ),
        _ => None,
    };
    if let Some(n) = note {
        eprintln!("{n}");
    }
    let mut cells: Vec<Cell> = b
        .delays
        .iter()
        .flat_map(|&d| {
            [None, rate].map(|rate_kbit| Cell {
                delay_ms: d,
                rate_kbit,
                loss_percent: 0.0,
            })
        })
        .collect();
    if b.loss > 0.0 {
        cells.push(Cell {
            delay_ms: b.loss_delay_ms,
            rate_kbit: rate,
            loss_percent: b.loss,
        });
    }
    if !b.json {
        println!(
            "session throughput, {pa} / {pb}, {} MiB per transfer, A → B; delay is one way per access link (RTT = 4 ×)",
            b.mib
        );
        println!(
            "  {:<28} {:>13} {:>13} {:>7} {:>13} {:>9} {:>9} {:>9}",
            "link",
            "natpunch",
            "kernel TCP",
            "vs TCP",
            "dumbpipe",
            "vs dumbp",
            "CPU s/GB",
            "lab CPU s"
        );
    }
    let exe = std::env::current_exe()?;
    let mut failed = 0;
    for cell in cells {
        let r = match throughput::measure(
            exe.clone(),
            pa,
            pb,
            bytes,
            cell,
            dumbpipe.as_deref().filter(|_| public),
        ) {
            Ok(r) => r,
            Err(e) => {
                // One failed cell does not hide the others.
                failed += 1;
                if b.json {
                    crate::output::json_line(
                        &serde_json::json!({"link": cell.label(), "error": e.to_string()}),
                    );
                } else {
                    println!("  {:<28} failed: {e}", cell.label());
                }
                continue;
            }
        };
        if b.json {
            crate::output::json_line(&serde_json::to_value(&r).unwrap_or_default());
            continue;
        }
        let opt = |x: Option<String>| x.unwrap_or_else(|| "-".into());
        println!(
            "  {:<28} {:>6.0} Mbit/s {:>6.0} Mbit/s {:>6.2}x {:>13} {:>9} {:>9} {:>9.1}",
            r.link,
            r.natpunch.mbit_s,
            r.kernel_tcp.mbit_s,
            r.vs_tcp,
            opt(r.dumbpipe.as_ref().map(|d| {
                // A transfer cut at the time limit: at most this fast.
                let cut = if d.cut_at_limit { "≤" } else { "" };
                format!("{cut}{:.1} Mbit/s", d.mbit_s)
            })),
            opt(r.vs_dumbpipe.map(|x| format!("{x:.2}x"))),
            opt(r.natpunch.cpu_s_per_gb.map(|c| format!("{c:.2}"))),
            r.delay_line_cpu_s.max(0.0),
        );
    }
    let interactive = if b.no_interactive {
        &[][..]
    } else {
        &b.interactive[..]
    };
    for delay_ms in interactive {
        let cell = Cell {
            delay_ms: *delay_ms,
            rate_kbit: rate,
            loss_percent: 0.0,
        };
        let r = match throughput::interactive(exe.clone(), pa, pb, b.interactive_mib << 20, cell) {
            Ok(r) => r,
            Err(e) => {
                failed += 1;
                println!("interactive, {}: failed: {e}", cell.label());
                continue;
            }
        };
        if b.json {
            crate::output::json_line(&serde_json::to_value(&r).unwrap_or_default());
            continue;
        }
        println!(
            "interactive, {}: a 40-byte keystroke echo every 50 ms while {} MiB share the session \
             ({:.0} Mbit/s): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} samples after the \
             first 2 s (startup max {:.1} ms); idle RTT {:.1} ms (p99 − RTT = {:+.1} ms)",
            r.link,
            b.interactive_mib,
            r.bulk_mbit_s,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.samples,
            r.startup_max_ms,
            r.idle_rtt_ms,
            r.p99_ms - r.idle_rtt_ms
        );
    }
    if let Some(n) = note {
        println!("{n}");
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A percentage, 0 to 100.
fn percent(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a percentage from 0 to 100"))
    }
}

/// `dumbpipe` on PATH, else in ~/.cargo/bin (where `cargo install` puts it).
fn find_dumbpipe() -> Option<std::path::PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("dumbpipe"))
            .find(|f| f.is_file())
    });
    on_path.or_else(|| {
        let f = std::path::PathBuf::from(std::env::var_os("HOME")?).join(".cargo/bin/dumbpipe");
        f.is_file().then_some(f)
    })
}

/// Warm-up before measuring, so socket buffers and caches settle.
const WARMUP: Duration = Duration::from_millis(500);
/// A socket with requests in flight but no answer for this long has lost
/// them; the window is refilled (loopback loses only on buffer overflow).
const LOSS_TIMEOUT: Duration = Duration::from_millis(100);

struct Measured {
    name: &'static str,
    answered: u64,
    sent: u64,
    seconds: f64,
    cpu_seconds: Option<f64>,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.answered as f64 / self.seconds
    }
}

/// A server process, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stun(b: StunBench) -> anyhow::Result<ExitCode> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let pin = cpus >= 2 && which("taskset");
    if !pin {
        eprintln!("natpunch bench: warning: cannot pin to separate CPUs (need 2 CPUs and taskset); figures are less fair");
    }
    let tmp = std::env::temp_dir().join(format!("natpunch-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let mut results = Vec::new();

    let port = free_port()?;
    let exe = std::env::current_exe()?;
    let args = [
        "server".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--no-rate-limit".into(),
    ];
    let ours = spawn_pinned(pin, exe.as_os_str().to_string_lossy().as_ref(), &args)?;
    results.push(load("natpunch", ours, port, &b, pin)?);

    if !b.no_coturn {
        anyhow::ensure!(
            which("turnserver"),
            "coturn is not installed (apt-get install coturn), or pass --no-coturn"
        );
        let port = free_port()?;
        let db = tmp.join("turndb");
        let pidfile = tmp.join("turnserver.pid");
        let args: Vec<String> = [
            "-n",
            "-S",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--no-tcp",
            "-L",
            "127.0.0.1",
            "-p",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            port.to_string(),
            "--log-file".into(),
            "stdout".into(),
            "-b".into(),
        ])
        .chain([
            db.to_string_lossy().into_owned(),
            "--pidfile".into(),
            pidfile.to_string_lossy().into_owned(),
        ])
        .collect();
        let coturn = spawn_pinned(pin, "turnserver", &args)?;
        results.push(load("coturn", coturn, port, &b, pin)?);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    report(&results, &b);
    Ok(ExitCode::SUCCESS)
}

fn report(results: &[Measured], b: &StunBench) {
    let reference = results
        .iter()
        .find(|m| m.name == "coturn")
        .map(Measured::rate);
    if b.json {
        let rows: Vec<_> = results
            .iter()
            .map(|m| {
                serde_json::json!({
                    "server": m.name, "answered_per_s": m.rate().round(), "sent": m.sent,
                    "answered": m.answered, "seconds": m.seconds, "cpu_seconds": m.cpu_seconds,
                })
            })
            .collect();
        crate::output::json_line(&serde_json::json!({
            "bench": "stun", "results": rows,
            "ratio_vs_coturn": reference.map(|r| results[0].rate() / r),
        }));
        return;
    }
    println!("STUN Binding throughput, server pinned to CPU 0, generator on CPU 1 ({} sockets x {} in flight, {} s each)", b.sockets, b.window, b.duration);
    println!(
        "  {:<10} {:>14} {:>12} {:>14}",
        "server", "answers/s", "answered %", "CPU s/M req"
    );
    for m in results {
        let cpu = m
            .cpu_seconds
            .map(|c| format!("{:.2}", c / (m.answered as f64 / 1e6)))
            .unwrap_or_else(|| "-".into());
        let pct = 100.0 * m.answered as f64 / m.sent.max(1) as f64;
        println!(
            "  {:<10} {:>14.0} {:>11.1}% {:>14}",
            m.name,
            m.rate(),
            pct,
            cpu
        );
    }
    if let Some(r) = reference {
        println!("  ratio natpunch / coturn: {:.2}x", results[0].rate() / r);
    }
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn free_port() -> anyhow::Result<u16> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    Ok(s.local_addr()?.port())
}

fn spawn_pinned(pin: bool, program: &str, args: &[String]) -> anyhow::Result<Server> {
    let mut cmd = if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", program]);
        c
    } else {
        Command::new(program)
    };
    let child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    Ok(Server(child))
}

fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data, initialised by CPU_ZERO before use.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn load(
    name: &'static str,
    server: Server,
    port: u16,
    b: &StunBench,
    pin: bool,
) -> anyhow::Result<Measured> {
    let target: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    wait_ready(target).with_context(|| format!("{name} did not start on {target}"))?;
    // taskset execs the server, so the child pid is the server's pid.
    let pid = server.0.id();
    let sockets = b.sockets as usize;
    let window = b.window as usize;
    let duration = Duration::from_secs(b.duration);
    let handle = std::thread::spawn(move || -> anyhow::Result<(u64, u64, f64, Option<f64>)> {
        if pin {
            pin_current_thread(1);
        }
        generate(target, sockets, window, duration, pid)
    });
    let (answered, sent, seconds, cpu) = handle
        .join()
        .map_err(|_| anyhow::anyhow!("generator thread panicked"))??;
    drop(server);
    Ok(Measured {
        name,
        answered,
        sent,
        seconds,
        cpu_seconds: cpu,
    })
}

fn wait_ready(target: SocketAddr) -> anyhow::Result<()> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(Duration::from_millis(50)))?;
    let req = binding_request(0);
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        s.send_to(&req, target)?;
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            if n >= 20 && buf[..2] == [0x01, 0x01] {
                return Ok(());
            }
        }
    }
    anyhow::bail!("no STUN answer within 10 s")
}

fn binding_request(i: usize) -> [u8; 20] {
    let mut r = [0u8; 20];
    r[1] = 0x01;
    r[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
    r[8..16].copy_from_slice(&(i as u64).to_be_bytes());
    r
}

/// Runs the closed-loop generator; returns (answered, sent, seconds, server
/// CPU seconds) for the measured period.
fn generate(
    target: SocketAddr,
    n: usize,
    window: usize,
    duration: Duration,
    pid: u32,
) -> anyhow::Result<(u64, u64, f64, Option<f64>)> {
    let socks: Vec<UdpSocket> = (0..n)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<std::io::Result<_>>()?;
    let reqs: Vec<[u8; 20]> = (0..n).map(binding_request).collect();
    let mut outstanding = vec![0usize; n];
    let mut last_answer = vec![Instant::now(); n];
    let mut sb = SendBatch::new();
    let mut rb = RecvBatch::new();
    let start = Instant::now();
    let measure_from = start + WARMUP;
    let end = measure_from + duration;
    let (mut answered, mut sent) = (0u64, 0u64);
    let mut cpu_start = None;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let measuring = now >= measure_from;
        if measuring && cpu_start.is_none() {
            cpu_start = Some(natpunch_lab::throughput::cpu_seconds(pid));
            answered = 0;
            sent = 0;
        }
        for i in 0..n {
            if outstanding[i] > 0 && now.duration_since(last_answer[i]) > LOSS_TIMEOUT {
                outstanding[i] = 0;
            }
            let need = window - outstanding[i];
            if need > 0 {
                sb.clear();
                for _ in 0..need.min(natpunch::batch::BATCH) {
                    sb.push(&reqs[i], target);
                }
                if let Ok(k) = sb.send(&socks[i], 0) {
                    outstanding[i] += k;
                    sent += k as u64;
                    if outstanding[i] == k {
                        last_answer[i] = now;
                    }
                }
            }
            while let Ok(k) = rb.recv(&socks[i]) {
                let ok = (0..k)
                    .filter(|j| rb.get(*j).0.get(..2) == Some(&[0x01, 0x01][..]))
                    .count();
                answered += ok as u64;
                outstanding[i] = outstanding[i].saturating_sub(k);
                last_answer[i] = now;
            }
        }
    }
    let seconds = Instant::now().duration_since(measure_from).as_secs_f64();
    let cpu = match (
        cpu_start.flatten(),
        natpunch_lab::throughput::cpu_seconds(pid),
    ) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Ok((answered, sent, seconds, cpu))
}

fn punch(b: PunchBench) -> anyhow::Result<ExitCode> {
    use natpunch_lab::runner;
    natpunch_lab::topology::preflight()?;
    anyhow::ensure!(
        (0.0..100.0).contains(&b.loss),
        "--loss is a percentage below 100"
    );
    let pairs = runner::parse_pairs(&b.pairs)?;
    let opts = same_links(b.delay_ms, b.loss)?;
    if !b.json {
        println!(
            "time to a direct path, {} cold and {} warm connects per pair, {} ms one-way on each access link{}",
            b.runs,
            b.runs,
            b.delay_ms,
            if b.loss > 0.0 { format!(", {} % loss", b.loss) } else { String::new() }
        );
        println!("  cold: from the connector's process start to its `connected` event (the network's NAT facts cached by an earlier run)");
        println!("  first: cold on a network seen for the first time (--no-nat-cache)");
        println!("  warm: from Endpoint::connect on an endpoint that has measured its NAT");
        println!(
            "  {:<44} {:<9} {:>7} {:>8} {:>8} {:>7} {:>8} {:>7} {:>8} {:>7} {:>8} {:>7} {:>6} {:>7}",
            "pair", "strategy", "direct", "floor", "cold", "ratio", "cold p95", "ratio", "first", "ratio", "warm", "ratio", "probes", "bytes"
        );
    }
    runner::run_punch_bench(&opts, &pairs, b.runs, warm_connects, |r| {
        if b.json {
            crate::output::json_line(&serde_json::to_value(r).unwrap_or_default());
        } else {
            let ms = |v: Option<u64>| v.map(|x| format!("{x} ms")).unwrap_or_else(|| "-".into());
            let x = |v: Option<f64>| v.map(|x| format!("{x:.2}x")).unwrap_or_else(|| "-".into());
            println!(
                "  {:<44} {:<9} {:>4}/{:<2} {:>5} ms {:>8} {:>7} {:>8} {:>7} {:>8} {:>7} {:>8} {:>7} {:>6} {:>7}",
                format!("{} / {}", r.a, r.b),
                r.strategy.as_deref().unwrap_or("-"),
                r.direct.min(r.first_direct),
                r.runs,
                r.floor_ms,
                ms(r.cold_median_ms),
                x(r.cold_ratio),
                ms(r.cold_p95_ms),
                x(r.cold_p95_ratio),
                ms(r.first_median_ms),
                x(r.first_ratio),
                ms(r.warm_median_ms),
                x(r.warm_ratio),
                r.median_probes.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                r.median_bytes.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            );
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// How long a warm endpoint may take to measure its NAT before its
/// connects are timed (discovery finishes in a second or two in the lab).
const WARM_SETUP: Duration = Duration::from_secs(20);
/// A warm connect that takes longer counts as failed.
const WARM_LIMIT: Duration = Duration::from_secs(15);

/// `runs` connects from one library endpoint in A's namespace to the
/// listener, after the endpoint has measured its NAT; each one's time from
/// `Endpoint::connect` to its `Connected` event. Each session is closed
/// before the next connect, so every connect punches anew.
fn warm_connects(lab: &natpunch_lab::Lab, target: &str, runs: u32) -> Vec<Option<Duration>> {
    use natpunch::peer::PeerEvent;
    use natpunch::session::{close, Endpoint, EndpointConfig};
    let Some(ns) = lab.netns(natpunch_lab::Node::HostA).map(str::to_string) else {
        return Vec::new();
    };
    let Ok(target) = target.parse::<natpunch_proto::identity::PeerId>() else {
        return Vec::new();
    };
    let server = lab.server_addr();
    let r = natpunch_lab::topology::in_netns(&ns, move || {
        let Ok(rt) = crate::runtime() else {
            return Vec::new();
        };
        rt.block_on(async move {
            let identity = natpunch_proto::identity::Identity::from_seed(rand::random());
            let mut cfg = EndpointConfig::new(identity, server);
            cfg.accept = false;
            cfg.peer.rto = Duration::from_millis(100);
            // Time to the punched path: relay-first would answer the
            // connect from the relay first.
            cfg.peer.relay = false;
            let Ok(ep) = Endpoint::bind(cfg) else {
                return Vec::new();
            };
            let Some(mut events) = ep.events() else {
                return Vec::new();
            };
            let measured = tokio::time::timeout(WARM_SETUP, async {
                while let Some(e) = events.recv().await {
                    if matches!(e, PeerEvent::NatMeasured { .. }) {
                        return true;
                    }
                }
                false
            })
            .await;
            if !matches!(measured, Ok(true)) {
                return Vec::new();
            }
            let mut out = Vec::new();
            for _ in 0..runs {
                let took = match tokio::time::timeout(WARM_LIMIT, ep.connect(target)).await {
                    Ok(Ok(conn)) => {
                        let mut punched = None;
                        while let Ok(e) = events.try_recv() {
                            if let PeerEvent::Connected { elapsed, .. } = e {
                                punched = Some(elapsed);
                            }
                        }
                        conn.close_and_wait(close::DONE, "bench").await;
                        // Until the session is gone, a connect reuses it.
                        let _ = tokio::time::timeout(Duration::from_secs(3), async {
                            while let Some(e) = events.recv().await {
                                if matches!(e, PeerEvent::SessionEnded { .. }) {
                                    break;
                                }
                            }
                        })
                        .await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        punched
                    }
                    _ => None,
                };
                out.push(took);
            }
            ep.close().await;
            out
        })
    });
    r.unwrap_or_default()
}
