//! The lab's delay line under load, as the benchmarks use it: two hosts on
//! public addresses, each access link shaped and delayed both ways. Kernel
//! TCP must fill a 1 Gbit/s link with 20 ms of one-way delay per access
//! link (80 ms RTT), and a numbered UDP flood must come out in order, with
//! no loss the line did not count. Each test prints the line's packet-rate
//! ceiling and CPU cost, so that a benchmark can tell when the lab, not
//! natpunch, is the bottleneck. Needs root; in CI (CI=true) a missing
//! capability fails loudly, elsewhere the tests skip with a loud message.

mod common;

use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use natpunch_lab::throughput::cpu_seconds;
use natpunch_lab::topology::QueueCounters;
use natpunch_lab::{Lab, LabOptions, LinkSpec, Links, Node, Side, TopologySpec};

/// The tests measure rates: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One-way delay per access link, as the acceptance names it.
const DELAY: Duration = Duration::from_millis(20);
/// The shaped rate: 1 Gbit/s each way.
const RATE_KBIT: u64 = 1_000_000;
/// The TCP transfer: 1 GiB, ~9 s at the link rate, so slow start
/// (~1 s at 80 ms RTT) is a small part of it.
const TCP_BYTES: u64 = 1 << 30;
const PORT: u16 = 5301;

fn lab(rate_kbit: Option<u64>) -> Lab {
    let link = LinkSpec {
        rate_kbit,
        delay: Some(DELAY),
        ..LinkSpec::default()
    };
    let opts = LabOptions {
        natpunch: PathBuf::from(env!("CARGO_BIN_EXE_natpunch")),
        links: Links { a: link, b: link },
    };
    Lab::build(
        &TopologySpec::Pair {
            a: Side::Direct,
            b: Side::Direct,
        },
        &opts,
    )
    .expect("lab builds")
}

fn ns(lab: &Lab, node: Node) -> String {
    lab.netns(node).expect("node").to_string()
}

/// Sum of the delay lines' CPU seconds so far.
fn lines_cpu(lab: &Lab) -> f64 {
    lab.delay_lines()
        .iter()
        .filter_map(|l| cpu_seconds(l.pid))
        .sum()
}

/// Sum of the kernel's counters over every delay line.
fn counters(lab: &Lab) -> QueueCounters {
    lab.delay_lines()
        .iter()
        .map(|l| lab.queue_counters(l).expect("queue counters"))
        .fold(QueueCounters::default(), |a, c| QueueCounters {
            held: a.held + c.held,
            queue_dropped: a.queue_dropped + c.queue_dropped,
            user_dropped: a.user_dropped + c.user_dropped,
            queued: a.queued + c.queued,
        })
}

/// TCP retransmitted segments in a namespace (nstat's TcpRetransSegs).
fn retransmits(ns: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/snmp"])
        .output()
        .expect("read /proc/net/snmp");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RetransSegs")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// What a numbered UDP flood did.
struct Flood {
    sent: u64,
    received: u64,
    out_of_order: u64,
    seconds: f64,
    min_latency: Duration,
}

/// Sends `count` numbered 1200-byte datagrams from A to B, `per_ms` per
/// millisecond (0: as fast as the socket takes them), and counts what B
/// receives and in which order. The datagrams carry their send time, so B
/// also sees the shortest one-way latency (both ends share one clock).
fn flood(lab: &Lab, b_ip: Ipv4Addr, count: u64, per_ms: u64) -> Flood {
    let rx = in_netns(&ns(lab, Node::HostB), move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, PORT)).expect("bind");
        socket2::SockRef::from(&s)
            .set_recv_buffer_size(32 << 20)
            .expect("rcvbuf");
        s
    });
    // SO_RCVBUFFORCE past rmem_max: root.
    force_rcvbuf(&rx, 32 << 20);
    let base = Instant::now();
    let sink = std::thread::spawn(move || {
        rx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut buf = [0u8; 2048];
        let (mut received, mut out_of_order, mut high) = (0u64, 0u64, None::<u64>);
        let mut min_latency = Duration::MAX;
        while let Ok(n) = rx.recv(&mut buf) {
            if n < 16 {
                continue;
            }
            let seq = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
            let sent_ns = u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes"));
            let now = base.elapsed();
            min_latency = min_latency.min(now.saturating_sub(Duration::from_nanos(sent_ns)));
            received += 1;
            match high {
                Some(h) if seq < h => out_of_order += 1,
                _ => high = Some(seq),
            }
        }
        (received, out_of_order, min_latency)
    });
    let (sent, seconds) = in_netns(&ns(lab, Node::HostA), move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        s.connect((b_ip, PORT)).expect("connect");
        let mut pkt = [0u8; 1200];
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < count {
            if let Some(us) = (sent * 1000).checked_div(per_ms) {
                let due = start + Duration::from_micros(us);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            pkt[..8].copy_from_slice(&sent.to_be_bytes());
            let t = base.elapsed().as_nanos() as u64;
            pkt[8..16].copy_from_slice(&t.to_be_bytes());
            if s.send(&pkt).is_ok() {
                sent += 1;
            }
        }
        (sent, start.elapsed().as_secs_f64())
    });
    let (received, out_of_order, min_latency) = sink.join().expect("sink");
    Flood {
        sent,
        received,
        out_of_order,
        seconds,
        min_latency,
    }
}

fn force_rcvbuf(s: &UdpSocket, bytes: i32) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt on a socket we own, with a c_int value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
    }
}

#[test]
fn kernel_tcp_fills_a_gigabit_link_with_twenty_ms_each_way() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !lab_available() {
        return;
    }
    let lab = lab(Some(RATE_KBIT));
    assert_eq!(lab.delay_lines().len(), 4, "two lines per access link");
    let b_ip = lab.host_ip(Node::HostB).expect("B");
    let (a_ns, b_ns) = (ns(&lab, Node::HostA), ns(&lab, Node::HostB));

    // The handshake takes one RTT: 4 × 20 ms.
    let listener =
        in_netns(&b_ns, || TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT))).expect("listen");
    let handshake = in_netns(&a_ns, move || {
        let t = Instant::now();
        let s = TcpStream::connect((b_ip, PORT)).expect("connect");
        let took = t.elapsed();
        drop(s);
        took
    });
    drop(listener);
    let retrans_before = retransmits(&a_ns);
    let (cpu_before, before) = (lines_cpu(&lab), counters(&lab));
    let tcp = natpunch_lab::throughput::kernel_tcp(&lab, TCP_BYTES).expect("kernel TCP");
    let (cpu, after) = (lines_cpu(&lab) - cpu_before, counters(&lab));
    let retrans = retransmits(&a_ns) - retrans_before;
    let mbit = tcp.mbit_s;
    let packets = after.queued - before.queued;
    let dropped =
        (after.queue_dropped + after.user_dropped) - (before.queue_dropped + before.user_dropped);
    eprintln!(
        "kernel TCP through 1 Gbit/s + 20 ms each way (RTT {:.1} ms by handshake): {} MiB in \
         {:.2} s = {mbit:.0} Mbit/s ({:.2} × the link); {retrans} segments retransmitted; \
         delay lines: {packets} packets, {dropped} dropped, {cpu:.2} CPU s ({:.2} µs per packet)",
        handshake.as_secs_f64() * 1e3,
        tcp.bytes >> 20,
        tcp.seconds,
        mbit / 1000.0,
        cpu * 1e6 / packets.max(1) as f64,
    );
    assert_eq!(tcp.bytes, TCP_BYTES, "bytes lost");
    let rtt = DELAY * 4;
    assert!(
        handshake >= rtt && handshake < rtt + Duration::from_millis(15),
        "the handshake took {handshake:?}, not the configured RTT {rtt:?}"
    );
    assert_eq!(dropped, 0, "the delay lines dropped packets");
    assert!(
        mbit >= 800.0,
        "kernel TCP reached {mbit:.0} Mbit/s, under 0.8 × the 1 Gbit/s link"
    );
}

#[test]
fn a_udp_flood_comes_out_delayed_in_order_and_states_the_ceiling() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !lab_available() {
        return;
    }
    // Unshaped, so the line itself is what limits the flood.
    let lab = lab(None);
    let b_ip = lab.host_ip(Node::HostB).expect("B");
    // Warm up (ARP).
    let _ = flood(&lab, b_ip, 100, 10);

    // Paced at 50 kpkt/s (480 Mbit/s of 1200-byte datagrams): every
    // datagram arrives, in order, no earlier than two access links' delay.
    let before = counters(&lab);
    let cpu_before = lines_cpu(&lab);
    let paced = flood(&lab, b_ip, 100_000, 50);
    let cpu = lines_cpu(&lab) - cpu_before;
    let after = counters(&lab);
    let dropped =
        (after.queue_dropped + after.user_dropped) - (before.queue_dropped + before.user_dropped);
    let through = after.queued - before.queued;
    eprintln!(
        "paced flood: {} sent at {:.0} pkt/s, {} received, {} out of order, shortest one-way \
         {:.2} ms; delay lines: {through} packets, {dropped} dropped, {:.2} µs CPU per packet",
        paced.sent,
        paced.sent as f64 / paced.seconds,
        paced.received,
        paced.out_of_order,
        paced.min_latency.as_secs_f64() * 1e3,
        cpu * 1e6 / through.max(1) as f64,
    );

    // As fast as A can send: the line's ceiling. It may drop (counted),
    // but never reorders or passes a packet early.
    let before = counters(&lab);
    let cpu_before = lines_cpu(&lab);
    let t = Instant::now();
    let fast = flood(&lab, b_ip, 400_000, 0);
    let wall = t.elapsed().as_secs_f64() - 2.0; // less the sink's idle timeout
    let cpu = lines_cpu(&lab) - cpu_before;
    let after = counters(&lab);
    let fast_dropped =
        (after.queue_dropped + after.user_dropped) - (before.queue_dropped + before.user_dropped);
    let through = after.queued - before.queued;
    eprintln!(
        "unpaced flood: {} sent at {:.0} pkt/s, {} received ({:.0} pkt/s), {} out of order; \
         delay lines: {fast_dropped} dropped, {:.2} µs CPU per packet; ceiling of this lab on \
         this machine {} {:.0} kpkt/s per direction ({:.0} Mbit/s of 1200-byte packets)",
        fast.sent,
        fast.sent as f64 / fast.seconds,
        fast.received,
        fast.received as f64 / wall.max(1e-3),
        fast.out_of_order,
        cpu * 1e6 / through.max(1) as f64,
        // With no drop the line kept up with the sender: a lower bound.
        if fast_dropped == 0 { "≥" } else { "≈" },
        fast.received as f64 / wall.max(1e-3) / 1e3,
        fast.received as f64 / wall.max(1e-3) * 1200.0 * 8.0 / 1e6,
    );

    assert_eq!(paced.out_of_order, 0, "the delay line reordered");
    assert_eq!(dropped, 0, "the delay lines dropped at 50 kpkt/s");
    assert_eq!(paced.received, paced.sent, "datagrams lost at 50 kpkt/s");
    let floor = DELAY * 2;
    assert!(
        paced.min_latency >= floor,
        "a datagram arrived in {:?}, under the configured {floor:?}",
        paced.min_latency
    );
    assert_eq!(
        fast.out_of_order, 0,
        "the delay line reordered under overload"
    );
    assert!(
        fast.min_latency >= floor,
        "under overload a datagram arrived in {:?}, under the configured {floor:?}",
        fast.min_latency
    );
}
