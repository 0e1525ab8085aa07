//! The connection core through real Linux NATs (nftables in network
//! namespaces): forty peers at once, a server restart, lossy links, a
//! re-punch that wins on another socket, and a loaded session whose NATs
//! both forget every mapping. Needs root; in CI (CI=true) a missing
//! capability fails loudly, elsewhere the tests skip with a loud message.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use natpunch_lab::{Lab, LabOptions, LinkSpec, Links, Node, Side, TopologySpec};

struct LabPair {
    lab: Lab,
    server: String,
    dir: PathBuf,
}

fn lab_with(a: &str, b: &str, link: LinkSpec) -> LabPair {
    let topology = TopologySpec::Pair {
        a: Side::parse(a).expect("preset"),
        b: Side::parse(b).expect("preset"),
    };
    let opts = LabOptions {
        natpunch: PathBuf::from(env!("CARGO_BIN_EXE_natpunch")),
        links: Links { a: link, b: link },
    };
    let mut lab = Lab::build(&topology, &opts).expect("lab builds");
    let server = lab.start_server().expect("server starts").to_string();
    LabPair {
        lab,
        server,
        dir: tempdir("lab-connect"),
    }
}

impl LabPair {
    fn peer(&self, node: Node, key: &str) -> std::process::Command {
        let mut c = self.lab.natpunch(node);
        c.args(["-s", &self.server, "--json", "--rto-ms", "100", "--key"])
            .arg(self.dir.join(key))
            .env("NATPUNCH_CACHE", self.dir.join("cache"));
        c
    }

    fn netns(&self, node: Node) -> String {
        self.lab.netns(node).expect("node exists").to_string()
    }
}

impl Drop for LabPair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP echo server in `ns` on 127.0.0.1:`port`: every byte back, then EOF.
fn echo_server(ns: &str, port: u16) {
    let l = in_netns(ns, move || {
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind the echo server")
    });
    std::thread::spawn(move || {
        for c in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut r = c.try_clone().expect("clone");
                let mut w = c;
                let mut buf = [0u8; 65536];
                loop {
                    match r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if w.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// Forty connectors behind one NAT, each with its own key, start at the
/// same moment against one listener exposing a TCP service behind another
/// NAT: every one connects and gets its megabyte back intact, in under
/// 30 s.
#[test]
fn forty_connectors_at_once_all_reach_an_exposed_service() {
    if !lab_available() {
        return;
    }
    let p = lab_with(
        "port-restricted-cone",
        "port-restricted-cone",
        LinkSpec::default(),
    );
    echo_server(&p.netns(Node::HostB), 9000);
    let l = start_listener(
        p.peer(Node::HostB, "b")
            .args(["--expose", "echo=127.0.0.1:9000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    const N: usize = 40;
    const SIZE: usize = 1 << 20;
    for i in 0..N {
        std::fs::write(p.dir.join(format!("in{i}")), test_bytes(SIZE, i as u64)).unwrap();
    }
    let t0 = Instant::now();
    let children: Vec<Child> = (0..N)
        .map(|i| {
            p.peer(Node::HostA, &format!("a{i}"))
                .args(["-d", &l.id, "--to", "echo"])
                .stdin(std::fs::File::open(p.dir.join(format!("in{i}"))).unwrap())
                .stdout(std::fs::File::create(p.dir.join(format!("out{i}"))).unwrap())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut failed = Vec::new();
    for (i, c) in children.into_iter().enumerate() {
        let left = Duration::from_secs(40).saturating_sub(t0.elapsed());
        match output_within(c, left) {
            Some(o) if o.status.success() => {
                let got = std::fs::read(p.dir.join(format!("out{i}"))).unwrap();
                if got != test_bytes(SIZE, i as u64) {
                    failed.push(format!("{i}: {} bytes back, not the ones sent", got.len()));
                }
            }
            Some(o) => failed.push(format!("{i}: {}", String::from_utf8_lossy(&o.stderr))),
            None => failed.push(format!("{i}: still running after 40 s")),
        }
    }
    let took = t0.elapsed();
    assert!(
        failed.is_empty(),
        "{} of {N} failed: {failed:#?}",
        failed.len()
    );
    eprintln!(
        "{N} connectors, 1 MiB each way through the exposed service: all intact in {took:.2?}"
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
}

/// The rendezvous server restarts: the listener says it lost the server,
/// says when it is back, and is reachable again within 5 s of its return.
#[test]
fn a_listener_is_reachable_again_within_five_seconds_of_a_server_restart() {
    if !lab_available() {
        return;
    }
    let mut p = lab_with(
        "port-restricted-cone",
        "port-restricted-cone",
        LinkSpec::default(),
    );
    let l = start_listener(
        p.peer(Node::HostB, "b")
            .args(["--keep-open"])
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    p.lab.stop_server();
    std::thread::sleep(Duration::from_secs(4));
    p.lab.start_server().expect("the server starts again");
    let back = Instant::now();
    // Connect until it works, each attempt a new process (cold).
    let reached = loop {
        let o = p
            .peer(Node::HostA, "a")
            .args(["-d", &l.id, "--once", "--timeout", "2"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if o.status.success() {
            break Some(back.elapsed());
        }
        if back.elapsed() > Duration::from_secs(15) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let events = l.drain(Duration::from_millis(500));
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    let reached = reached.unwrap_or_else(|| panic!("never reachable again; listener: {kinds:?}"));
    eprintln!("reachable again {reached:?} after the server came back; listener said {kinds:?}");
    assert!(
        kinds.contains(&"server-lost") && kinds.contains(&"server-back"),
        "{kinds:?}"
    );
    assert!(reached <= Duration::from_secs(5), "{reached:?}");
}

/// With 10 % random loss on both access links and 20 ms of delay on each,
/// ten of ten cold connects go direct.
#[test]
fn ten_cold_connects_through_ten_percent_loss_all_go_direct() {
    if !lab_available() {
        return;
    }
    let link = LinkSpec {
        delay: Some(Duration::from_millis(20)),
        loss: 0.10,
        rate_kbit: None,
    };
    let p = lab_with("port-restricted-cone", "port-restricted-cone", link);
    let l = start_listener(
        p.peer(Node::HostB, "b")
            .args(["--keep-open"])
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let mut times = Vec::new();
    for i in 0..10 {
        let t = Instant::now();
        let o = p
            .peer(Node::HostA, &format!("a{i}"))
            .args(["-d", &l.id, "--once"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "connect {i}: {err}");
        let ev = json_lines(&o.stderr);
        let c = event(&ev, "connected").unwrap_or_else(|| panic!("connect {i}: {err}"));
        assert_eq!(c["path"], "direct");
        times.push(t.elapsed().as_millis() as u64);
    }
    times.sort_unstable();
    eprintln!("10 % loss: 10/10 direct; from process start: median {} ms, worst {} ms (the benchmark reports them against the floor)", times[5], times[9]);
}

/// Whether a listener's event puts its session on a direct path.
fn is_direct(e: &serde_json::Value) -> bool {
    match e["event"].as_str() {
        Some("session") => e["path"] == "direct",
        Some("path-changed") => e["to"]["path"] == "direct",
        _ => false,
    }
}

/// The listener behind a random symmetric NAT won its first punch on one
/// of its birthday sockets; both NATs then forget every mapping and the
/// re-punch wins on another socket. The session moves there and every
/// byte arrives.
#[test]
fn a_session_moves_to_the_socket_a_re_punch_won() {
    if !lab_available() {
        return;
    }
    let p = lab_with(
        "port-restricted-cone",
        "symmetric-random",
        LinkSpec::default(),
    );
    let out = p.dir.join("out");
    let l = start_listener(
        p.peer(Node::HostB, "b")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap()),
    );
    let mut a = p
        .peer(Node::HostA, "a")
        .args(["-d", &l.id])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = test_bytes(2 << 20, 3);
    let second = test_bytes(2 << 20, 4);
    let mut stdin = a.stdin.take().unwrap();
    stdin.write_all(&first).unwrap();
    assert!(
        wait_for_len(&out, first.len() as u64, Duration::from_secs(30)),
        "the first half never arrived"
    );
    // The relay may carry the first half before the birthday punch wins:
    // the NATs are flushed only once B's session runs on a direct path.
    let mut b_events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !b_events.iter().any(is_direct) {
        let left = deadline.saturating_duration_since(Instant::now());
        match l.events.recv_timeout(left) {
            Ok(e) => b_events.push(e),
            Err(_) => panic!("B never went direct: {b_events:?}"),
        }
    }
    p.lab.flush_nat(Node::NatA).unwrap();
    p.lab.flush_nat(Node::NatB).unwrap();
    stdin.write_all(&second).unwrap();
    drop(stdin);
    let o = output_within(a, Duration::from_secs(60)).expect("A finishes");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let got = std::fs::read(&out).unwrap();
    assert!(
        got == [first, second].concat(),
        "bytes differ ({} received)",
        got.len()
    );
    b_events.extend(l.drain(Duration::from_secs(2)));
    // B's socket on its first direct path (the session starts on the
    // relay, or directly without one), and on its last.
    let direct: Vec<String> = b_events
        .iter()
        .filter_map(|e| match e["event"].as_str() {
            Some("session") if e["path"] == "direct" => e["local"].as_str(),
            Some("path-changed") if e["to"]["path"] == "direct" => e["to"]["local"].as_str(),
            _ => None,
        })
        .map(str::to_string)
        .collect();
    let started = direct.first().cloned();
    let moved = direct.last().cloned();
    eprintln!("B's session socket {started:?}, after the re-punch {moved:?}");
    assert!(
        started.is_some() && moved.is_some(),
        "{b_events:?}\nA said:\n{err}"
    );
    assert_ne!(started, moved, "the re-punch won on the same socket");
    assert!(
        event(&json_lines(&o.stderr), "path-repaired").is_some(),
        "{err}"
    );
}

/// 30 MB over 40 Mbit/s access links between a port-restricted cone and a
/// sequential symmetric NAT; both NATs forget every mapping mid-transfer
/// while the uplink is full. The transfer completes intact, with either
/// NAT on the connecting side.
#[test]
fn a_loaded_session_survives_both_nats_forgetting_everything_both_ways() {
    if !lab_available() {
        return;
    }
    let link = LinkSpec {
        delay: None,
        loss: 0.0,
        rate_kbit: Some(40_000),
    };
    for (a, b) in [
        ("port-restricted-cone", "symmetric-sequential"),
        ("symmetric-sequential", "port-restricted-cone"),
    ] {
        let p = lab_with(a, b, link);
        let out = p.dir.join("out");
        let data = test_bytes(30_000_000, 5);
        let input = p.dir.join("in");
        std::fs::write(&input, &data).unwrap();
        let mut l = start_listener(
            p.peer(Node::HostB, "b")
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&out).unwrap()),
        );
        let t0 = Instant::now();
        let sender = p
            .peer(Node::HostA, "a")
            .args(["-d", &l.id])
            .stdin(std::fs::File::open(&input).unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        assert!(
            wait_for_len(&out, 10_000_000, Duration::from_secs(30)),
            "{a} / {b}: 10 MB never arrived"
        );
        p.lab.flush_nat(Node::NatA).unwrap();
        p.lab.flush_nat(Node::NatB).unwrap();
        let flushed = t0.elapsed();
        let o = output_within(sender, Duration::from_secs(90)).expect("the sender finishes");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{a} / {b}: {err}");
        assert!(l.wait(Duration::from_secs(15)).is_some_and(|s| s.success()));
        let got = std::fs::read(&out).unwrap();
        assert!(
            got == data,
            "{a} / {b}: bytes differ ({} received)",
            got.len()
        );
        let kinds: Vec<String> = json_lines(&o.stderr)
            .iter()
            .filter_map(|e| e["event"].as_str().map(str::to_string))
            .collect();
        eprintln!(
            "{a} / {b}: 30 MB at 40 Mbit/s, flushed at {flushed:.1?}, done at {:.1?}; A's events: {kinds:?}",
            t0.elapsed()
        );
    }
}
