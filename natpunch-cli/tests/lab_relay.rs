//! The relay through real Linux NATs (nftables in network namespaces):
//! every grid pair ends on the path it should (relay first, then direct
//! where a direct path exists), a network without UDP reaches the relay
//! over TCP, a session moves to a direct path that opens late and back to
//! the relay when it is cut, and relayed sessions survive a relay
//! restart. Needs root; in CI (CI=true) a missing capability fails
//! loudly, elsewhere the tests skip with a loud message.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::*;
use natpunch_lab::{Lab, LabOptions, LinkSpec, Links, Node, Side, TopologySpec};

/// The tests here measure and time transfers: they run one at a time, so
/// that one test's processes do not slow another's.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct LabPair {
    lab: Lab,
    server: String,
    dir: PathBuf,
}

/// A lab for `a` and `b`, access links shaped to `rate_kbit` each way
/// (so that a transfer lasts long enough for things to happen during it).
fn lab_pair(a: &str, b: &str, rate_kbit: Option<u64>) -> LabPair {
    lab_pair_with(a, b, rate_kbit, &[])
}

/// [`lab_pair`] with more `natpunch server` options.
fn lab_pair_with(a: &str, b: &str, rate_kbit: Option<u64>, server: &[&str]) -> LabPair {
    let topology = TopologySpec::Pair {
        a: Side::parse(a).expect("preset"),
        b: Side::parse(b).expect("preset"),
    };
    let link = LinkSpec {
        rate_kbit,
        ..LinkSpec::default()
    };
    let opts = LabOptions {
        natpunch: PathBuf::from(env!("CARGO_BIN_EXE_natpunch")),
        links: Links { a: link, b: link },
    };
    let mut lab = Lab::build(&topology, &opts).expect("lab builds");
    let server = lab
        .start_server_with(server)
        .expect("server starts")
        .to_string();
    LabPair {
        lab,
        server,
        dir: tempdir("lab-relay"),
    }
}

impl LabPair {
    fn peer(&self, node: Node, key: &str) -> Command {
        let mut c = self.lab.natpunch(node);
        c.args(["-s", &self.server, "--json", "--rto-ms", "100", "--key"])
            .arg(self.dir.join(key));
        c
    }
}

impl Drop for LabPair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A's session to B, fed by the test: B's stdout goes to a file, A's
/// events arrive (with the time they were read) on a channel.
struct Transfer {
    listener: Listener,
    a: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    events: Receiver<(Instant, serde_json::Value)>,
    seen: Vec<(Instant, serde_json::Value)>,
    output: PathBuf,
}

impl Transfer {
    fn start(p: &LabPair) -> Transfer {
        Self::start_with(p, &[])
    }

    /// With `extra` arguments for both peers.
    fn start_with(p: &LabPair, extra: &[&str]) -> Transfer {
        let output = p.dir.join("out");
        let listener = start_listener(
            p.peer(Node::HostB, "b")
                .args(extra)
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&output).unwrap()),
        );
        let mut a = p
            .peer(Node::HostA, "a")
            .args(["-d", &listener.id])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = a.stdin.take();
        let err = a.stderr.take().unwrap();
        let (tx, events) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if tx.send((Instant::now(), v)).is_err() {
                        return;
                    }
                } else {
                    eprintln!("A: {line}");
                }
            }
        });
        Transfer {
            listener,
            a,
            stdin,
            events,
            seen: Vec::new(),
            output,
        }
    }

    /// Waits for an event matching `f`; every event read is kept.
    fn wait_for(
        &mut self,
        within: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<(Instant, serde_json::Value)> {
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok((t, v)) = self.events.recv_timeout(left) else {
                break;
            };
            self.seen.push((t, v.clone()));
            if f(&v) {
                return Some((t, v));
            }
        }
        None
    }

    /// Writes `data` from a thread (the pipe blocks while QUIC is slow).
    fn feed(&mut self, data: Vec<u8>) -> std::thread::JoinHandle<()> {
        let mut stdin = self.stdin.take().expect("stdin");
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        })
    }

    fn received(&self) -> u64 {
        std::fs::metadata(&self.output).map_or(0, |m| m.len())
    }

    /// Waits for A to exit; its status, every event, and B's bytes.
    fn finish(mut self, within: Duration) -> (bool, Vec<serde_json::Value>, Vec<u8>) {
        let deadline = Instant::now() + within;
        let ok = loop {
            match self.a.try_wait() {
                Ok(Some(s)) => break s.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = self.a.kill();
                    let _ = self.a.wait();
                    break false;
                }
            }
        };
        while let Ok(e) = self.events.recv_timeout(Duration::from_millis(300)) {
            self.seen.push(e);
        }
        let _ = self.listener.wait(Duration::from_secs(15));
        let got = std::fs::read(&self.output).unwrap_or_default();
        (ok, self.seen.into_iter().map(|(_, v)| v).collect(), got)
    }
}

fn kinds(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| {
            let k = e["event"].as_str()?;
            Some(match e["event"].as_str() {
                Some("path-changed") => format!("path-changed→{}", e["to"]["path"]),
                Some("connected") => format!("connected({})", e["path"]),
                _ => k.to_string(),
            })
        })
        .collect()
}

/// Every grid pair, relay first: direct where the punching grid says so
/// (by that technique), relayed otherwise (random symmetric against any
/// symmetric NAT, a symmetric carrier NAT, a network without UDP), 1 MiB
/// intact each, over 20 ms access links.
#[test]
fn every_grid_pair_connects_on_the_path_it_should() {
    if !lab_available() {
        return;
    }
    let _serial = serial();
    let dir = tempdir("session-grid");
    let svg = dir.join("grid.svg");
    let out = natpunch()
        .args([
            "lab",
            "grid",
            "--scenario",
            "session",
            "--json",
            "--delay-ms",
            "20",
            "--svg",
        ])
        .arg(&svg)
        .output()
        .unwrap();
    let rows = json_lines(&out.stdout);
    let pairs: Vec<&serde_json::Value> =
        rows.iter().filter(|r| r.get("outcome").is_some()).collect();
    for r in &pairs {
        assert_eq!(r["outcome"], "pass", "{r}");
    }
    // Relay first: `connected` (timed from the connector's spawn) within
    // 2x the floor of an introduction and a QUIC handshake over the relay,
    // 2.5 x (rtt_A + rtt_B) = 200 ms on these links, for every pair that
    // has UDP (where it is blocked, TCP is tried after a second by design).
    let mut worst = 0;
    for r in pairs.iter().filter(|r| {
        !r["a"].as_str().unwrap_or_default().contains("udp=block")
            && !r["b"].as_str().unwrap_or_default().contains("udp=block")
    }) {
        let ms = r["elapsed_ms"].as_u64().unwrap_or(u64::MAX);
        assert!(ms <= 400, "connected after {ms} ms: {r}");
        worst = worst.max(ms);
    }
    eprintln!("relay first: every pair connected within {worst} ms of the connector's start (floor 200 ms)");
    let result = |a: &str, b: &str| {
        pairs
            .iter()
            .find(|r| r["a"] == a && r["b"] == b)
            .map(|r| r["result"].as_str().unwrap_or_default().to_string())
            .unwrap_or_else(|| panic!("pair {a} / {b} missing"))
    };
    assert_eq!(result("full-cone", "port-restricted-cone"), "cone");
    assert_eq!(
        result("port-restricted-cone", "symmetric-sequential"),
        "predict"
    );
    assert_eq!(
        result("symmetric-sequential", "symmetric-sequential"),
        "ttl"
    );
    assert_eq!(
        result("port-restricted-cone", "symmetric-random"),
        "birthday"
    );
    assert_eq!(
        result("symmetric-random", "symmetric-random"),
        "relay (no-path-possible)"
    );
    assert_eq!(
        result("symmetric-sequential", "symmetric-random"),
        "relay (no-path-possible)"
    );
    assert!(result("full-cone+symmetric-random", "symmetric-random").starts_with("relay"));
    // Without UDP the session starts on the relay over TCP and moves to
    // a punched TCP stream.
    assert_eq!(result("port-restricted-cone:udp=block", "full-cone"), "tcp");
    assert_eq!(result("full-cone", "port-restricted-cone:udp=block"), "tcp");
    assert!(pairs.len() >= 36, "{}", pairs.len());
    assert!(out.status.success());
    let _ = std::fs::remove_dir_all(dir);
}

/// A network that drops all UDP: the peer reaches the server over TCP,
/// its session is relayed over that connection, and 10 MB arrive intact
/// (`--no-tcp`: a punched TCP stream would take the session over; the
/// session grid checks that).
#[test]
fn a_peer_without_udp_moves_ten_megabytes_over_the_tcp_relay() {
    if !lab_available() {
        return;
    }
    let _serial = serial();
    let p = lab_pair(
        "port-restricted-cone:udp=block",
        "port-restricted-cone",
        None,
    );
    let data = test_bytes(10 << 20, 0x7c9);
    let mut t = Transfer::start_with(&p, &["--no-tcp"]);
    let (at, c) = t
        .wait_for(Duration::from_secs(20), |e| e["event"] == "connected")
        .expect("connected");
    assert_eq!(c["path"], "relay", "{c}");
    assert_eq!(c["transport"], "tcp", "{c}");
    let start = at;
    let writer = t.feed(data.clone());
    let (ok, events, got) = t.finish(Duration::from_secs(120));
    let _ = writer.join();
    assert!(ok, "A failed: {:?}", kinds(&events));
    assert!(
        events.iter().any(|e| e["event"] == "server-tcp"),
        "{:?}",
        kinds(&events)
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "relayed" && e["code"] == "udp-blocked"),
        "{:?}",
        kinds(&events)
    );
    assert!(
        got == data,
        "B received {} of {} bytes",
        got.len(),
        data.len()
    );
    eprintln!(
        "no UDP on A's side: 10 MiB over the TCP relay in {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

/// The direct path opens only after a while (A's NAT drops UDP to and
/// from B's NAT, then the rule is lifted): the session starts on the
/// relay, moves to the punched path mid-transfer, and 20 MB arrive intact.
#[test]
fn a_relayed_session_moves_to_a_direct_path_that_opens_late() {
    if !lab_available() {
        return;
    }
    let _serial = serial();
    let p = lab_pair("port-restricted-cone", "port-restricted-cone", Some(40_000));
    let b_wan = p.lab.wan_ip(Node::NatB).unwrap();
    p.lab.block_udp(Node::NatA, b_wan).unwrap();
    let data = test_bytes(20 << 20, 0xd17ec7);
    let mut t = Transfer::start(&p);
    let c = t
        .wait_for(Duration::from_secs(20), |e| e["event"] == "connected")
        .expect("connected");
    assert_eq!(c.1["path"], "relay", "{}", c.1);
    let writer = t.feed(data.clone());
    std::thread::sleep(Duration::from_millis(1500));
    let before = t.received();
    let lifted = Instant::now();
    p.lab.unblock_udp(Node::NatA).unwrap();
    let moved = t.wait_for(Duration::from_secs(15), |e| {
        e["event"] == "path-changed" && e["to"]["path"] == "direct"
    });
    let at_move = t.received();
    let (ok, events, got) = t.finish(Duration::from_secs(60));
    let _ = writer.join();
    let (moved_at, mv) = moved.unwrap_or_else(|| panic!("never went direct: {:?}", kinds(&events)));
    assert_eq!(mv["from"]["path"], "relay");
    assert_eq!(mv["strategy"], "cone");
    assert!(ok, "A failed: {:?}", kinds(&events));
    assert!(
        before > 0 && at_move < data.len() as u64,
        "the switch was not mid-transfer ({before} bytes before the rule was lifted, {at_move} at the move)"
    );
    assert!(
        got == data,
        "B received {} of {} bytes",
        got.len(),
        data.len()
    );
    eprintln!(
        "relay → direct {} ms after the rule was lifted, {:.1} of 20 MiB over the relay; events {:?}",
        moved_at.saturating_duration_since(lifted).as_millis(),
        at_move as f64 / (1 << 20) as f64,
        kinds(&events)
    );
}

/// The direct path is cut mid-transfer (A's NAT starts dropping UDP to
/// and from B's NAT): the session falls back to the relay within seconds
/// and the transfer completes, every byte intact.
#[test]
fn a_session_falls_back_to_the_relay_when_the_direct_path_is_cut() {
    if !lab_available() {
        return;
    }
    let _serial = serial();
    let p = lab_pair("port-restricted-cone", "full-cone", Some(40_000));
    let b_wan = p.lab.wan_ip(Node::NatB).unwrap();
    let data = test_bytes(20 << 20, 0xfa11);
    let mut t = Transfer::start(&p);
    t.wait_for(Duration::from_secs(20), |e| {
        e["event"] == "path-changed" && e["to"]["path"] == "direct"
    })
    .unwrap_or_else(|| panic!("never went direct: {:?}", kinds(&[])));
    let writer = t.feed(data.clone());
    std::thread::sleep(Duration::from_millis(1500));
    p.lab.block_udp(Node::NatA, b_wan).unwrap();
    let cut = Instant::now();
    let at_cut = t.received();
    let back = t.wait_for(Duration::from_secs(10), |e| {
        e["event"] == "path-changed" && e["to"]["path"] == "relay"
    });
    let (ok, events, got) = t.finish(Duration::from_secs(90));
    let _ = writer.join();
    let (back_at, _) =
        back.unwrap_or_else(|| panic!("never fell back to the relay: {:?}", kinds(&events)));
    let fallback = back_at.saturating_duration_since(cut);
    assert!(ok, "A failed: {:?}", kinds(&events));
    assert!(
        at_cut > 0 && at_cut < data.len() as u64,
        "the cut was not mid-transfer ({at_cut} bytes)"
    );
    assert!(
        got == data,
        "B received {} of {} bytes",
        got.len(),
        data.len()
    );
    assert!(
        fallback < Duration::from_secs(3),
        "fell back after {fallback:?}"
    );
    eprintln!(
        "direct → relay {} ms after the cut; events {:?}",
        fallback.as_millis(),
        kinds(&events)
    );
}

/// Two random symmetric NATs (relay only): the server restarts in the
/// middle of a transfer; the session finds the new relay and completes.
#[test]
fn relayed_sessions_survive_a_relay_restart() {
    if !lab_available() {
        return;
    }
    let _serial = serial();
    let mut p = lab_pair("symmetric-random", "symmetric-random", Some(40_000));
    let data = test_bytes(20 << 20, 0x2e57a27);
    let mut t = Transfer::start(&p);
    let c = t
        .wait_for(Duration::from_secs(20), |e| e["event"] == "connected")
        .expect("connected");
    assert_eq!(c.1["path"], "relay");
    let writer = t.feed(data.clone());
    std::thread::sleep(Duration::from_millis(1500));
    let at_restart = t.received();
    p.lab.stop_server();
    p.lab.start_server().expect("server restarts");
    let restarted = Instant::now();
    let (ok, events, got) = t.finish(Duration::from_secs(120));
    let _ = writer.join();
    assert!(ok, "A failed: {:?}", kinds(&events));
    assert!(
        at_restart > 0 && at_restart < data.len() as u64,
        "the restart was not mid-transfer ({at_restart} bytes)"
    );
    assert!(
        got == data,
        "B received {} of {} bytes",
        got.len(),
        data.len()
    );
    eprintln!(
        "relay restart after {:.1} MiB; done {:.1} s after it; events {:?}",
        at_restart as f64 / (1 << 20) as f64,
        restarted.elapsed().as_secs_f64(),
        kinds(&events)
    );
}

/// One relayed pipe: `from` connects to a listener on `to` and sends
/// `bytes`; returns the seconds from the listener's first byte to the
/// last (and whether every byte arrived).
fn relayed_pipe(
    p: &LabPair,
    from: Node,
    to: Node,
    tag: &str,
    bytes: usize,
) -> std::thread::JoinHandle<(f64, bool)> {
    let data = test_bytes(bytes, tag.len() as u64 * 7919);
    let mut l = p
        .peer(to, &format!("{tag}-listener"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = l.stderr.take().unwrap();
    let id = {
        use std::io::BufRead;
        let mut id = None;
        let mut lines = std::io::BufReader::new(err).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["event"] == "registered" {
                    id = v["peer_id"].as_str().map(str::to_string);
                    break;
                }
            }
        }
        std::thread::spawn(move || for _ in lines {});
        id.expect("listener registered")
    };
    let mut a = p
        .peer(from, &format!("{tag}-sender"))
        .args(["-d", &id])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = a.stdin.take().unwrap();
    let mut out = l.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::Read;
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
            data
        });
        let mut got = Vec::with_capacity(bytes);
        let mut buf = vec![0u8; 1 << 16];
        let mut first = None;
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    first.get_or_insert_with(Instant::now);
                    got.extend_from_slice(&buf[..n]);
                }
            }
        }
        let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let data = writer.join().unwrap_or_default();
        let _ = a.wait();
        let _ = l.wait();
        (secs, got == data)
    })
}

/// A peer floods the relay (as fast as it can, in the other direction)
/// while another peer's relayed transfer runs: the latter keeps at least
/// 80 % of the throughput it had alone. The access links are unshaped, so
/// the relay is the one thing the two share (on shaped links the flood's
/// data would queue ahead of the transfer's acknowledgements, a link
/// effect no relay can undo); each peer is held to 100 Mbit/s there.
#[test]
fn a_flooding_peer_does_not_starve_another_relayed_transfer() {
    if !lab_available() {
        return;
    }
    let _serial = serial();
    let p = lab_pair_with(
        "symmetric-random",
        "symmetric-random",
        None,
        &["--relay-peer-mbit", "100"],
    );
    const BYTES: usize = 20 << 20;
    let (alone, ok) = relayed_pipe(&p, Node::HostA, Node::HostB, "solo", BYTES)
        .join()
        .unwrap();
    assert!(ok, "the solo transfer was not intact");
    let flood = relayed_pipe(&p, Node::HostB, Node::HostA, "flood", 3 * BYTES);
    std::thread::sleep(Duration::from_millis(1500));
    let (shared, ok) = relayed_pipe(&p, Node::HostA, Node::HostB, "victim", BYTES)
        .join()
        .unwrap();
    let (_, flood_ok) = flood.join().unwrap();
    assert!(ok && flood_ok, "a transfer was not intact");
    let mbit = |s: f64| BYTES as f64 * 8.0 / s.max(1e-9) / 1e6;
    eprintln!(
        "relayed transfer alone {:.1} Mbit/s, beside a flood {:.1} Mbit/s ({:.0} %)",
        mbit(alone),
        mbit(shared),
        100.0 * alone / shared
    );
    assert!(
        shared <= alone / 0.8,
        "beside the flood the transfer took {shared:.2} s, alone {alone:.2} s"
    );
}

/// A peer with a public address serves rendezvous and relay
/// (`--serve-relay`) to the peers that have sessions with it: two of them
/// meet through it (relayed first, then direct), and a stranger is refused.
#[test]
fn a_public_peer_serves_rendezvous_and_relay_to_its_session_peers() {
    if !lab_available() {
        return;
    }
    let _serial = serial();
    let p = lab_pair("port-restricted-cone", "direct", None);
    let b_ip = p.lab.host_ip(Node::HostB).expect("B's address");
    let served = format!("{b_ip}:3479");
    let hub = start_listener(
        p.peer(Node::HostB, "hub")
            .args(["--keep-open", "--serve-relay", "3479"])
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    // X (behind A's NAT) and Y (on B's host) hold sessions with the hub.
    let mut members = Vec::new();
    for (node, key) in [(Node::HostA, "x"), (Node::HostB, "y")] {
        members.push(
            p.peer(node, key)
                .args(["-d", &hub.id])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sessions = 0;
    while sessions < 2 && Instant::now() < deadline {
        sessions += hub
            .drain(Duration::from_millis(300))
            .iter()
            .filter(|e| e["event"] == "session")
            .count();
    }
    assert_eq!(sessions, 2, "the members' sessions with the hub");
    // Y registers with the hub's server; X connects to Y through it.
    let key = |k: &str| p.dir.join(k);
    let out = p.dir.join("y-out");
    let mut y = start_listener(
        p.lab
            .natpunch(Node::HostB)
            .args(["listen", "-s", &served, "--json", "--key"])
            .arg(key("y"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap()),
    );
    let mut x = p
        .lab
        .natpunch(Node::HostA)
        .args(["-s", &served, "-d", &y.id, "--json", "--key"])
        .arg(key("x"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(mut s) = x.stdin.take() {
        s.write_all(b"met through a peer's relay").unwrap();
    }
    let o = output_within(x, Duration::from_secs(30)).expect("X finishes");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let ev = json_lines(&o.stderr);
    let c = ev
        .iter()
        .find(|e| e["event"] == "connected")
        .unwrap_or_else(|| panic!("{err}"));
    assert_eq!(c["path"], "relay", "{c}");
    assert_eq!(c["remote"], served.as_str(), "relayed by the hub: {c}");
    assert!(y.wait(Duration::from_secs(15)).is_some_and(|s| s.success()));
    assert_eq!(std::fs::read(&out).unwrap(), b"met through a peer's relay");
    // A peer without a session to the hub is refused.
    let z = p
        .lab
        .natpunch(Node::HostA)
        .args(["listen", "-s", &served, "--json", "--key"])
        .arg(key("z"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let zo = output_within_killing(z, Duration::from_secs(4));
    let zev = json_lines(&zo);
    assert!(
        zev.iter()
            .any(|e| e["event"] == "server-refused" && e["code"] == "not-member"),
        "{zev:?}"
    );
    assert!(!zev.iter().any(|e| e["event"] == "registered"), "{zev:?}");
    for mut m in members {
        let _ = m.kill();
        let _ = m.wait();
    }
    eprintln!("two session peers met through a peer's relay; a stranger was refused");
}

/// Runs `child` for `within`, then kills it; its stderr.
fn output_within_killing(mut child: std::process::Child, within: Duration) -> Vec<u8> {
    use std::io::Read;
    std::thread::sleep(within);
    let _ = child.kill();
    let mut err = Vec::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_end(&mut err);
    }
    let _ = child.wait();
    err
}
