//! The NAT lab, for real: Linux NATs (nftables) in network namespaces.
//! Needs root; in CI (CI=true) a missing capability fails loudly, elsewhere
//! the tests skip with a loud message.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `natpunch lab up` in the background; returns it and the lab prefix.
fn lab_up(args: &[&str]) -> (std::process::Child, String) {
    let mut child = natpunch()
        .args(["lab", "up"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a line").unwrap();
    assert!(first.contains("is up"), "{first}");
    let prefix = first
        .split_whitespace()
        .nth(1)
        .expect("lab NAME is up")
        .to_string();
    // Read to the last line it prints, so that closing the pipe cannot
    // fail one of its writes.
    for l in lines.by_ref() {
        if l.unwrap().contains("Ctrl-C") {
            break;
        }
    }
    (child, prefix)
}

fn lab_down(mut child: std::process::Child, prefix: &str) {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait();
    wait_gone(prefix);
}

/// Namespaces whose name starts with `prefix`.
fn namespaces_with(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

#[test]
fn verify_passes_for_every_preset_double_shared_and_same_nat() {
    if !lab_available() {
        return;
    }
    let out = natpunch()
        .args(["lab", "verify", "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines = json_lines(&out.stdout);
    let checks: Vec<&serde_json::Value> =
        lines.iter().filter(|v| v.get("host").is_some()).collect();
    for c in &checks {
        assert_eq!(c["ok"], true, "{c}");
    }
    // 7 presets + delta 2 + double NAT + direct + shared carrier (2) + same NAT (2).
    assert_eq!(checks.len(), 14, "{text}");
    let hosts: Vec<&str> = checks.iter().filter_map(|c| c["host"].as_str()).collect();
    for p in [
        "full-cone",
        "restricted-cone",
        "port-restricted-cone",
        "address-dependent",
        "symmetric-sequential",
        "symmetric-random",
        "linux",
    ] {
        assert!(hosts.contains(&p), "{p} verified");
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn grid_over_eight_pairs_with_delay_writes_json_and_picture() {
    if !lab_available() {
        return;
    }
    let dir = tempdir("grid");
    let svg = dir.join("grid.svg");
    let pairs = [
        "full-cone/full-cone",
        "full-cone/restricted-cone",
        "restricted-cone/port-restricted-cone",
        "port-restricted-cone/symmetric-sequential",
        "symmetric-sequential/symmetric-sequential:delta=2",
        "symmetric-random/full-cone",
        "address-dependent/linux",
        "full-cone+port-restricted-cone/direct",
    ]
    .join(",");
    let out = natpunch()
        .args([
            "lab",
            "grid",
            "--scenario",
            "nat",
            "--json",
            "--delay-ms",
            "20",
            "--pairs",
            &pairs,
            "--svg",
        ])
        .arg(&svg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let rows = json_lines(&out.stdout);
    let pairs_run: Vec<&serde_json::Value> =
        rows.iter().filter(|r| r.get("outcome").is_some()).collect();
    assert_eq!(pairs_run.len(), 8, "{text}");
    for r in &pairs_run {
        assert_eq!(r["outcome"], "pass", "{r}");
        // 20 ms each way on both access links: discovery takes several RTTs.
        assert!(r["elapsed_ms"].as_u64().unwrap() >= 200, "{r}");
    }
    let picture = std::fs::read_to_string(&svg).expect("svg written");
    assert!(picture.starts_with("<svg"));
    assert_eq!(
        picture.matches("fill=\"#3aa655\"").count(),
        8 + 1,
        "eight green cells and the legend"
    );
    assert!(out.status.success());
    let _ = std::fs::remove_dir_all(dir);
}

fn start_lab_up() -> (std::process::Child, String) {
    let mut child = natpunch()
        .args(["lab", "up", "--a", "full-cone", "--b", "symmetric-random"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a line").unwrap();
    let prefix = first
        .split_whitespace()
        .nth(1)
        .expect("lab NAME is up")
        .to_string();
    assert!(first.contains("is up"), "{first}");
    assert!(!namespaces_with(&prefix).is_empty());
    (child, prefix)
}

fn wait_gone(prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if namespaces_with(prefix).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("namespaces left behind: {:?}", namespaces_with(prefix));
}

#[test]
fn teardown_on_ctrl_c_and_even_on_sigkill() {
    if !lab_available() {
        return;
    }
    for signal in ["-INT", "-KILL"] {
        let (mut child, prefix) = start_lab_up();
        assert!(Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap()
            .success());
        let _ = child.wait();
        // With SIGKILL only the reaper can clean up.
        wait_gone(&prefix);
    }
}

#[test]
fn non_root_is_refused_with_one_line() {
    if !lab_available() || !require_tool("setpriv", "util-linux") {
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_natpunch"))
        .args(["lab", "verify"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("needs root"), "{err}");
}

#[test]
fn demo_builds_a_lab_reports_both_nats_and_carries_data_from_a_to_b() {
    if !lab_available() {
        return;
    }
    let out = natpunch().args(["demo", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines = json_lines(&out.stdout);
    let reports: Vec<_> = lines
        .iter()
        .filter(|l| l.get("classic").is_some())
        .collect();
    assert_eq!(reports.len(), 2, "{text}");
    assert_eq!(reports[0]["classic"], "port-restricted-cone");
    assert_eq!(reports[1]["classic"], "symmetric");
    assert_eq!(reports[1]["allocation"]["kind"], "sequential");
    assert_eq!(reports[1]["allocation"]["delta"], 1);
    // Then 16 MiB from A to B, punched by prediction, every byte intact.
    let session = lines
        .iter()
        .find(|l| l["event"] == "session")
        .unwrap_or_else(|| panic!("no session line: {text}"));
    assert_eq!(session["strategy"], "predict");
    assert_eq!(session["bytes"], 16u64 << 20);
    assert_eq!(session["intact"], true);
}

#[test]
fn binding_lifetime_is_bracketed_behind_a_15s_nat() {
    if !lab_available() {
        return;
    }
    let (child, prefix) = lab_up(&["--a", "full-cone:timeout=15", "--b", "direct"]);
    let out = Command::new("ip")
        .args(["netns", "exec", &format!("{prefix}-a")])
        .arg(env!("CARGO_BIN_EXE_natpunch"))
        .args([
            "nat",
            "-H",
            "203.0.113.10:3478",
            "--json",
            "--lifetime",
            "--lifetime-max",
            "30",
        ])
        .output()
        .unwrap();
    lab_down(child, &prefix);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no report ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    // Probes at 10, 20 and 30 s: alive after 10 s, gone after 20 s.
    assert_eq!(v["lifetime"]["alive"], 10, "{v}");
    assert_eq!(v["lifetime"]["expired"], 20, "{v}");
}

#[test]
fn unsolicited_inbound_is_dropped_or_rejected_as_configured() {
    if !lab_available() {
        return;
    }
    // A answers unsolicited packets (ICMP port unreachable, TCP RST); B,
    // like most home routers, stays silent.
    let (child, prefix) = lab_up(&[
        "--a",
        "full-cone:inbound-udp=reject,inbound-tcp=reject",
        "--b",
        "full-cone",
    ]);
    let results = in_netns(&format!("{prefix}-srv"), || {
        let mut r = Vec::new();
        for public in ["198.51.100.2", "198.51.100.18"] {
            let target: std::net::SocketAddr = format!("{public}:4444").parse().unwrap();
            let udp = std::net::UdpSocket::bind("203.0.113.10:0").unwrap();
            udp.connect(target).unwrap();
            udp.set_read_timeout(Some(Duration::from_millis(700)))
                .unwrap();
            udp.send(b"unsolicited").unwrap();
            let udp_kind = udp
                .recv(&mut [0u8; 64])
                .map(|_| std::io::ErrorKind::Other)
                .unwrap_err()
                .kind();
            let tcp = std::net::TcpStream::connect_timeout(&target, Duration::from_millis(700));
            let tcp_kind = tcp.map(|_| std::io::ErrorKind::Other).unwrap_err().kind();
            r.push((udp_kind, tcp_kind));
        }
        r
    });
    lab_down(child, &prefix);
    use std::io::ErrorKind::*;
    assert_eq!(
        results[0],
        (ConnectionRefused, ConnectionRefused),
        "reject: ICMP and RST"
    );
    assert!(
        matches!(results[1].0, WouldBlock | TimedOut),
        "drop: silence for UDP, got {:?}",
        results[1]
    );
    assert!(
        matches!(results[1].1, TimedOut),
        "drop: silence for TCP, got {:?}",
        results[1]
    );
}

#[test]
fn access_link_loss_drops_the_configured_share() {
    if !lab_available() {
        return;
    }
    // 20 % each way on B's (direct) access link; one way is measured.
    let (child, prefix) = lab_up(&["--a", "direct", "--b", "direct", "--loss", "20"]);
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = received.clone();
    let receiver = {
        let ns = format!("{prefix}-b");
        std::thread::spawn(move || {
            in_netns(&ns, move || {
                let s = std::net::UdpSocket::bind("192.0.2.18:5000").unwrap();
                s.set_read_timeout(Some(Duration::from_millis(800)))
                    .unwrap();
                let mut buf = [0u8; 64];
                while s.recv(&mut buf).is_ok() {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    const SENT: usize = 4000;
    in_netns(&format!("{prefix}-srv"), || {
        let s = std::net::UdpSocket::bind("203.0.113.10:0").unwrap();
        for i in 0..SENT {
            s.send_to(&(i as u32).to_be_bytes(), "192.0.2.18:5000")
                .unwrap();
            if i % 100 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });
    receiver.join().unwrap();
    lab_down(child, &prefix);
    let got = received.load(std::sync::atomic::Ordering::Relaxed) as f64;
    let loss = 1.0 - got / SENT as f64;
    eprintln!(
        "access-link loss: configured 20 %, measured {:.1} % over {SENT} datagrams",
        loss * 100.0
    );
    // Binomial sd at n=4000, p=0.2 is 0.63 %; ±3 points is ~5 sd.
    assert!((0.17..=0.23).contains(&loss), "measured loss {loss}");
}

/// The hole-punching grid: every preset against every other, double NAT
/// with a cone outside and same NAT, over 20 ms access links; every pair's
/// expected outcome (direct by which technique, or no direct path with the
/// reason) is asserted.
#[test]
fn connect_grid_meets_every_expectation() {
    if !lab_available() {
        return;
    }
    let dir = tempdir("connect-grid");
    let svg = dir.join("grid.svg");
    let out = natpunch()
        .args(["lab", "grid", "--json", "--delay-ms", "20", "--svg"])
        .arg(&svg)
        .output()
        .unwrap();
    let rows = json_lines(&out.stdout);
    let pairs: Vec<&serde_json::Value> =
        rows.iter().filter(|r| r.get("outcome").is_some()).collect();
    for r in &pairs {
        assert_eq!(r["outcome"], "pass", "{r}");
    }
    let result = |a: &str, b: &str| {
        pairs
            .iter()
            .find(|r| r["a"] == a && r["b"] == b)
            .map(|r| r["result"].as_str().unwrap_or_default().to_string())
            .unwrap_or_else(|| panic!("pair {a} / {b} missing"))
    };
    // The list of pairs that must go direct, and how.
    assert_eq!(result("full-cone", "port-restricted-cone"), "cone");
    assert_eq!(result("port-restricted-cone", "linux"), "cone");
    assert_eq!(
        result("port-restricted-cone", "symmetric-sequential"),
        "predict"
    );
    assert_eq!(
        result("symmetric-sequential", "symmetric-sequential"),
        "ttl"
    );
    assert_eq!(
        result(
            "symmetric-sequential:delta=2",
            "symmetric-sequential:delta=2"
        ),
        "ttl"
    );
    assert_eq!(result("full-cone", "symmetric-random"), "cone");
    assert_eq!(result("restricted-cone", "symmetric-random"), "cone");
    assert_eq!(
        result("port-restricted-cone", "symmetric-random"),
        "birthday"
    );
    assert_eq!(
        result("port-restricted-cone+full-cone", "port-restricted-cone"),
        "cone"
    );
    assert_eq!(
        result(
            "same NAT: port-restricted-cone",
            "same NAT: port-restricted-cone"
        ),
        "lan"
    );
    assert_eq!(result("symmetric-random", "symmetric-random"), "no path");
    assert!(pairs.len() >= 32, "{}", pairs.len());
    assert!(out.status.success());
    let _ = std::fs::remove_dir_all(dir);
}
