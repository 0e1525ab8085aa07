//! TCP hole punching through real Linux NATs (nftables in network
//! namespaces): simultaneous open across cone and sequential symmetric
//! NATs, through NATs that answer unsolicited SYNs with a RST (with
//! limited-TTL openers, measured by hand), a pair whose NAT blocks UDP,
//! and the bad cases (a peer that does not punch TCP, a taken port).
//! Needs root; in CI (CI=true) a missing capability fails loudly,
//! elsewhere the tests skip with a loud message.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use natpunch_lab::{Lab, LabOptions, LinkSpec, Links, Node, Side, TopologySpec};

struct Pair {
    lab: Lab,
    server: String,
    dir: PathBuf,
    /// One lab at a time: the openers' timing is measured in
    /// milliseconds, and the tests of this file would share two cores.
    _serial: std::sync::MutexGuard<'static, ()>,
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn pair(a: &str, b: &str, delay_ms: u64) -> Pair {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let topology = TopologySpec::Pair {
        a: Side::parse(a).expect("preset"),
        b: Side::parse(b).expect("preset"),
    };
    let link = LinkSpec {
        delay: (delay_ms > 0).then(|| Duration::from_millis(delay_ms)),
        ..Default::default()
    };
    let opts = LabOptions {
        natpunch: PathBuf::from(env!("CARGO_BIN_EXE_natpunch")),
        links: Links { a: link, b: link },
    };
    let mut lab = Lab::build(&topology, &opts).expect("lab builds");
    let server = lab.start_server().expect("server starts").to_string();
    Pair {
        lab,
        server,
        dir: tempdir("lab-tcp"),
        _serial: serial,
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pair {
    fn peer(&self, node: Node, key: &str) -> Command {
        let mut c = self.lab.natpunch(node);
        c.args(["-s", &self.server, "--json", "--rto-ms", "100", "--key"])
            .arg(self.dir.join(key))
            .env("NATPUNCH_CACHE", self.dir.join(format!("cache-{key}")));
        c
    }
}

/// Runs A with `args`, `data` on its stdin, within `secs`: it must exit
/// successfully. Its events, and its whole stderr for messages.
fn pipe_from_a(
    p: &Pair,
    args: &[&str],
    data: &[u8],
    secs: u64,
) -> (Vec<serde_json::Value>, String) {
    let mut c = p
        .peer(Node::HostA, "a")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    feed(c.stdin.take(), data.to_vec());
    let o = output_within(c, Duration::from_secs(secs)).expect("A finishes");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    (events(&o.stderr), err)
}

/// Writes `data` to a child's stdin on a thread, then closes it (a child
/// that fails early just stops reading).
fn feed(stdin: Option<std::process::ChildStdin>, data: Vec<u8>) {
    if let Some(mut w) = stdin {
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
}

/// The JSON events among a child's stderr lines (a blocked network also
/// gets plain warnings there).
fn events(stderr: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn event<'a>(events: &'a [serde_json::Value], kind: &str) -> Option<&'a serde_json::Value> {
    events.iter().find(|e| e["event"] == kind)
}

/// One punch-only connect from A over TCP: whether it connected directly
/// over a TCP stream, and how long the process ran.
fn punch_once(p: &Pair, id: &str) -> (bool, Duration, String) {
    let t = Instant::now();
    let o = run_with_timeout(
        p.peer(Node::HostA, "a")
            .args(["--once", "--tcp", "--timeout", "5", "-d", id])
            .stdin(Stdio::null()),
        30,
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let ev = events(&o.stderr);
    let ok = o.status.success()
        && event(&ev, "connected").is_some_and(|c| {
            c["path"] == "direct" && c["transport"] == "tcp" && c["strategy"] == "tcp"
        });
    (ok, t.elapsed(), err)
}

/// TCP alone (`--tcp`), no relay: each pair punches a stream by
/// simultaneous open, and 1 MiB crosses it intact inside the session.
#[test]
fn tcp_punches_cone_and_sequential_symmetric_pairs_and_carries_the_session() {
    if !lab_available() {
        return;
    }
    for (a, b) in [
        ("port-restricted-cone", "port-restricted-cone"),
        ("port-restricted-cone", "symmetric-sequential"),
        ("symmetric-sequential", "port-restricted-cone"),
        ("symmetric-sequential", "symmetric-sequential"),
    ] {
        let p = pair(a, b, 0);
        let out = p.dir.join("out");
        let mut l = start_listener(
            p.peer(Node::HostB, "b")
                .args(["--tcp", "--no-relay"])
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&out).unwrap()),
        );
        let data = test_bytes(1 << 20, 7);
        let t = Instant::now();
        let (ev, err) = pipe_from_a(&p, &["--tcp", "--no-relay", "-d", &l.id], &data, 40);
        let err = format!("{a} × {b}: {err}");
        let conn = event(&ev, "connected").unwrap_or_else(|| panic!("{err}"));
        assert_eq!(conn["transport"], "tcp", "{err}");
        assert_eq!(conn["strategy"], "tcp", "{err}");
        let session = event(&ev, "session").unwrap_or_else(|| panic!("{err}"));
        assert_eq!(session["transport"], "tcp", "{err}");
        assert!(
            wait_for_len(&out, data.len() as u64, Duration::from_secs(10)),
            "{a} × {b}: the data never arrived"
        );
        assert!(
            std::fs::read(&out).unwrap() == data,
            "{a} × {b}: bytes differ"
        );
        eprintln!(
            "{a} × {b}: TCP stream {} → {} in {} ms, 1 MiB through it; whole run {} ms",
            session["local"],
            conn["remote"],
            conn["elapsed_ms"],
            t.elapsed().as_millis()
        );
        l.wait(Duration::from_secs(5));
    }
}

/// A measurement, run by hand (`--ignored`): NATs that answer unsolicited
/// SYNs with a RST, 10 ms per access link, 20 punches per pair with
/// limited-TTL openers, the counts printed. The goal is 19 of 20; runs on
/// one machine gave 20, 20 and 9 of 20 for the three pairs, and a CI run
/// 10, 17 and 11, so it is not a CI test yet.
#[test]
#[ignore = "a measurement: the RST goal of 19 of 20 is not met reliably"]
fn tcp_punches_through_rst_sending_nats_with_limited_ttl_openers() {
    if !lab_available() {
        return;
    }
    const RUNS: usize = 20;
    let mut report = Vec::new();
    for (a, b) in [
        (
            "port-restricted-cone:inbound-tcp=rst",
            "port-restricted-cone:inbound-tcp=rst",
        ),
        (
            "port-restricted-cone:inbound-tcp=rst",
            "symmetric-sequential:inbound-tcp=rst",
        ),
        (
            "symmetric-sequential:inbound-tcp=rst",
            "symmetric-sequential:inbound-tcp=rst",
        ),
    ] {
        let p = pair(a, b, 10);
        let l = start_listener(
            p.peer(Node::HostB, "b")
                .args(["--tcp", "--keep-open"])
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
        );
        let mut ok = 0;
        let mut times = Vec::new();
        let mut last_err = String::new();
        for _ in 0..RUNS {
            let (good, took, err) = punch_once(&p, &l.id);
            if good {
                ok += 1;
                times.push(took.as_millis() as u64);
            } else {
                last_err = err;
            }
        }
        times.sort_unstable();
        let median = times.get(times.len() / 2).copied().unwrap_or(0);
        let line = format!(
            "{a} × {b}: {ok}/{RUNS} direct over TCP with openers (median {median} ms from process start to connected)"
        );
        eprintln!("{line}");
        report.push((ok, line, last_err));
    }
    for (ok, line, last_err) in &report {
        if *ok < 19 {
            eprintln!("below the goal: {line}; last failure:\n{last_err}");
        }
    }
}

/// A's NAT lets no UDP through: A reaches the server over TCP, both sides
/// (`--tcp-fallback`) punch TCP because of it, and 10 MB cross the stream
/// with their checksum verified.
#[test]
fn a_udp_blocked_pair_connects_over_tcp_and_pipes_ten_megabytes() {
    if !lab_available() {
        return;
    }
    let p = pair("port-restricted-cone:udp=block", "port-restricted-cone", 0);
    let out = p.dir.join("out");
    let l = start_listener(
        p.peer(Node::HostB, "b")
            .args(["--no-relay", "--tcp-fallback"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap()),
    );
    let data = test_bytes(10_000_000, 11);
    let (ev, err) = pipe_from_a(
        &p,
        &["--no-relay", "--tcp-fallback", "-d", &l.id],
        &data,
        60,
    );
    assert!(event(&ev, "server-tcp").is_some(), "{err}");
    let conn = event(&ev, "connected").unwrap_or_else(|| panic!("{err}"));
    assert_eq!(conn["path"], "direct", "{err}");
    assert_eq!(conn["transport"], "tcp", "{err}");
    assert!(
        wait_for_len(&out, data.len() as u64, Duration::from_secs(20)),
        "the 10 MB never arrived"
    );
    let got = std::fs::read(&out).unwrap();
    let sum = |b: &[u8]| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        b.hash(&mut h);
        h.finish()
    };
    assert_eq!(sum(&got), sum(&data), "checksums differ");
    eprintln!(
        "UDP-blocked × port-restricted cone: direct over TCP in {} ms, 10 MB intact (checksum {:016x})",
        conn["elapsed_ms"],
        sum(&got)
    );
}

/// The bad cases end with one clear line and no hang: a peer that never
/// punches TCP (the default) against `--tcp`.
#[test]
fn a_peer_that_only_speaks_udp_gives_a_clear_error_and_no_hang() {
    if !lab_available() {
        return;
    }
    let p = pair("port-restricted-cone", "port-restricted-cone", 0);
    let l = start_listener(
        p.peer(Node::HostB, "b")
            .args(["--keep-open"])
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let t = Instant::now();
    let o = run_with_timeout(
        p.peer(Node::HostA, "a")
            .args(["--tcp", "--no-relay", "--timeout", "5", "-d", &l.id])
            .stdin(Stdio::null()),
        30,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    let ev = events(&o.stderr);
    let f = event(&ev, "failed").unwrap_or_else(|| panic!("{err}"));
    eprintln!(
        "--tcp against a UDP-only peer: {} after {:?}",
        f["reason"],
        t.elapsed()
    );
}
