//! Sessions through a real coturn (Debian's `turnserver`) in the lab's
//! server namespace, between two NATs that pick a random port for each
//! destination, so no direct path exists: the listener allocates with
//! `--turn` over UDP, TCP and TLS, the connector pipes 10 MB through the
//! relayed address, and both report `"path":"relay","via":"turn"`. Also:
//! a wrong password is one line and exit 1; a session outlives the
//! allocation's short lifetime (refreshed); the allocation is gone from
//! coturn after exit. Needs root; in CI (CI=true) a missing capability
//! fails loudly, elsewhere the tests skip with a loud message.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use natpunch_lab::{Lab, LabOptions, LinkSpec, Links, Node, Side, TopologySpec};

const USER: &str = "carol";
const PASS: &str = "lab-Pa55word";
/// coturn grants an Allocate at most this (`--max-allocate-lifetime`):
/// the client refreshes at half, so every session here refreshes.
const LIFETIME: u64 = 6;
/// coturn's ports in the server namespace (beside natpunch's 3478/3479).
const TURN_PORT: u16 = 3490;
const TURNS_PORT: u16 = 5349;
const SERVER_IP: &str = "203.0.113.10";

/// One lab at a time (they time transfers and share coturn's ports).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct TurnLab {
    lab: Lab,
    server: String,
    dir: PathBuf,
    log: PathBuf,
    ca: PathBuf,
    cert: (PathBuf, PathBuf),
    coturn: u32,
}

impl Drop for TurnLab {
    fn drop(&mut self) {
        // (The lab tears itself down, coturn with it.)
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TurnLab {
    /// Two symmetric-random NATs (no direct path), 5 ms each way on each
    /// access link, the natpunch server, and coturn (long-term
    /// credentials) beside it.
    fn start() -> Option<TurnLab> {
        Self::start_pair("symmetric-random", "symmetric-random")
    }

    /// [`TurnLab::start`] with the NATs `a` and `b`.
    fn start_pair(a: &str, b: &str) -> Option<TurnLab> {
        if !lab_available() || !require_tool("turnserver", "coturn") {
            return None;
        }
        let topology = TopologySpec::Pair {
            a: Side::parse(a).expect("preset"),
            b: Side::parse(b).expect("preset"),
        };
        let link = LinkSpec {
            delay: Some(Duration::from_millis(5)),
            ..LinkSpec::default()
        };
        let opts = LabOptions {
            natpunch: PathBuf::from(env!("CARGO_BIN_EXE_natpunch")),
            links: Links { a: link, b: link },
        };
        let mut lab = Lab::build(&topology, &opts).expect("lab builds");
        let server = lab.start_server().expect("server starts").to_string();
        let dir = tempdir("lab-turn");
        let (ca, cert, key) = tls_certificates(&dir, SERVER_IP);
        let log = dir.join("turnserver.log");
        let mut t = TurnLab {
            lab,
            server,
            dir,
            log,
            ca,
            cert: (cert, key),
            coturn: 0,
        };
        t.start_coturn();
        Some(t)
    }

    /// Starts coturn and waits until it accepts connections.
    fn start_coturn(&mut self) {
        let (cert, key, log, dir) = (&self.cert.0, &self.cert.1, &self.log, &self.dir);
        let mut cmd = self.lab.command(Node::Server, "turnserver");
        cmd.args(["-n", "--no-dtls", "--no-cli", "--verbose", "--simple-log"])
            .arg(format!("--listening-ip={SERVER_IP}"))
            .arg(format!("--relay-ip={SERVER_IP}"))
            .arg(format!("--listening-port={TURN_PORT}"))
            .arg(format!("--tls-listening-port={TURNS_PORT}"))
            .arg(format!("--cert={}", cert.display()))
            .arg(format!("--pkey={}", key.display()))
            .arg("--realm=lab.test")
            .arg("--lt-cred-mech")
            .arg(format!("--user={USER}:{PASS}"))
            .arg(format!("--max-allocate-lifetime={LIFETIME}"))
            .arg(format!("--log-file={}", log.display()))
            .arg(format!(
                "--pidfile={}",
                dir.join("turnserver.pid").display()
            ))
            .arg(format!("--userdb={}", dir.join("turndb").display()));
        self.coturn = self.lab.spawn(cmd).expect("coturn starts");
        // coturn is up once its TLS port accepts (it opens it last).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.tls_up() {
            assert!(
                Instant::now() < deadline,
                "coturn did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills coturn (its allocations die with it).
    fn kill_coturn(&mut self) {
        // SAFETY: kill(2) on the pid of a process the lab started.
        unsafe { libc::kill(self.coturn as libc::pid_t, libc::SIGKILL) };
        std::thread::sleep(Duration::from_millis(300));
    }

    fn tls_up(&self) -> bool {
        let mut c = self.lab.command(Node::Server, "bash");
        c.args(["-c", &format!("exec 3<>/dev/tcp/{SERVER_IP}/{TURNS_PORT}")]);
        c.stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn uri(transport: &str) -> String {
        match transport {
            "udp" => format!("turn:{SERVER_IP}:{TURN_PORT}"),
            "tcp" => format!("turn:{SERVER_IP}:{TURN_PORT}?transport=tcp"),
            _ => format!("turns:{SERVER_IP}:{TURNS_PORT}"),
        }
    }

    fn peer(&self, node: Node, key: &str) -> Command {
        let mut c = self.lab.natpunch(node);
        c.args(["-s", &self.server, "--json", "--rto-ms", "100", "--key"])
            .arg(self.dir.join(key));
        c
    }

    /// A connecting to the listener `id`, events on a piped stderr.
    fn connector(&self, id: &str) -> Command {
        let mut c = self.peer(Node::HostA, "a");
        c.args(["-d", id])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    /// B listening with an allocation over `transport`.
    fn listener(&self, transport: &str, pass: &str, out: &std::path::Path) -> Listener {
        start_listener(
            self.peer(Node::HostB, "b")
                .args(["--turn", &Self::uri(transport), "--turn-ca"])
                .arg(&self.ca)
                .args(["--turn-user", USER, "--turn-pass", pass])
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(out).unwrap()),
        )
    }
}

/// Allocations coturn's log shows released by their client.
fn released(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("refreshed, realm=") && l.contains("lifetime=0"))
        .count()
}

/// The event that put a session on its final path: `connected`, or the
/// last `path-changed`.
fn final_path(events: &[serde_json::Value]) -> Option<&serde_json::Value> {
    events
        .iter()
        .rev()
        .find(|e| e["event"] == "path-changed" || e["event"] == "connected")
}

/// Matches events of kind `k`.
fn kind(k: &str) -> impl Fn(&serde_json::Value) -> bool + '_ {
    move |e| e["event"] == k
}

fn is_turn(e: &serde_json::Value) -> bool {
    e["path"] == "relay" && e["via"] == "turn"
}

/// Over each transport to coturn: 10 MB from A to B intact, both ends on
/// the TURN path, the allocation released when B's session ends (B's
/// `turn-released` and coturn's log), the password nowhere in the output.
#[test]
fn a_pair_with_no_direct_path_pipes_10_mb_through_coturn_over_udp_tcp_and_tls() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(t) = TurnLab::start() else { return };
    let data = test_bytes(10_000_000, 14);
    let input = t.dir.join("in");
    std::fs::write(&input, &data).unwrap();
    for transport in ["udp", "tcp", "tls"] {
        let out = t.dir.join(format!("out-{transport}"));
        let before = released(&t.log());
        let mut b = t.listener(transport, PASS, &out);
        let started = Instant::now();
        let a = t
            .connector(&b.id)
            .stdin(std::fs::File::open(&input).unwrap())
            .spawn()
            .unwrap();
        let o = output_within(a, Duration::from_secs(90)).expect("A finishes within 90 s");
        let took = started.elapsed();
        let a_err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{transport}: A failed: {a_err}");
        assert!(
            b.wait(Duration::from_secs(20)).is_some_and(|s| s.success()),
            "{transport}: B did not finish"
        );
        let mut b_events = b.early.clone();
        b_events.extend(b.drain(Duration::from_millis(500)));
        let b_text = b_events
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        let got = std::fs::read(&out).unwrap();
        assert!(
            got == data,
            "{transport}: {} of 10000000 bytes arrived intact",
            got.len()
        );
        let a_events = stderr_events(&o.stderr);
        let a_path = final_path(&a_events).unwrap_or_else(|| panic!("{transport}: {a_err}"));
        assert!(is_turn(a_path), "{transport}: A's path: {a_path}\n{a_err}");
        let b_path = final_path(&b_events).unwrap_or_else(|| panic!("{transport}: {b_text}"));
        assert!(is_turn(b_path), "{transport}: B's path: {b_path}\n{b_text}");
        // Settled on TURN at once: never stalled and punched again (a
        // TURN path lost at the end of the attempt would be).
        for (side, events) in [("A", &a_events), ("B", &b_events)] {
            assert!(
                !events.iter().any(|e| e["event"] == "stalled"),
                "{transport}: {side} stalled: {events:?}"
            );
        }
        let alloc = event(&b_events, "turn-allocated").unwrap_or_else(|| panic!("{b_text}"));
        assert_eq!(alloc["transport"], transport, "{b_text}");
        let rel = event(&b_events, "turn-released").unwrap_or_else(|| panic!("{b_text}"));
        assert_eq!(rel["confirmed"], true, "{transport}: {b_text}");
        assert!(
            !a_err.contains(PASS) && !b_text.contains(PASS),
            "{transport}: the password was printed"
        );
        // coturn logs the client's release (a Refresh with lifetime 0).
        let deadline = Instant::now() + Duration::from_secs(5);
        while released(&t.log()) <= before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            released(&t.log()),
            before + 1,
            "{transport}: coturn did not log the release"
        );
        eprintln!(
            "{transport}: A on TURN ({}) in {} ms; 10 MB intact in {:.2} s from A's start; allocation released (coturn's log)",
            a_path["remote"], a_path["elapsed_ms"], took.as_secs_f64()
        );
    }
}

/// A wrong password: one line naming the server's 401, exit 1, at once
/// (no retry storm: coturn's log shows at most two Allocates from us).
#[test]
fn a_wrong_turn_password_is_one_line_and_exit_1() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(t) = TurnLab::start() else { return };
    let out = t.dir.join("out");
    let _b = start_listener(
        t.peer(Node::HostB, "b")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap()),
    );
    // A key made beforehand: the run's only line is the error.
    peer_id_of_key(&t.dir.join("a"));
    for transport in ["udp", "tls"] {
        let started = Instant::now();
        let a = t
            .lab
            .natpunch(Node::HostA)
            .args(["-s", &t.server, "--key"])
            .arg(t.dir.join("a"))
            .args(["--turn", &TurnLab::uri(transport), "--turn-ca"])
            .arg(&t.ca)
            .args(["--turn-user", USER, "--turn-pass", "not-the-password"])
            .args(["-d", &_b.id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let o = output_within(a, Duration::from_secs(20)).expect("A exits within 20 s");
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(1), "{transport}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{transport}: {err}");
        assert!(
            lines[0].contains("TURN server") && lines[0].contains("401"),
            "{transport}: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{transport}: {err}"
        );
        eprintln!(
            "{transport}: exit 1 after {:?}: {}",
            started.elapsed(),
            lines[0]
        );
    }
}

/// A session that lasts three lifetimes: B's allocation is refreshed
/// (coturn's log) and still carries the data sent after 15 s; after exit
/// coturn has deleted it.
#[test]
fn a_session_longer_than_the_allocation_lifetime_keeps_it_refreshed() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(t) = TurnLab::start() else { return };
    let out = t.dir.join("out");
    let mut b = t.listener("udp", PASS, &out);
    let mut a = t.connector(&b.id).stdin(Stdio::piped()).spawn().unwrap();
    let mut stdin = a.stdin.take().unwrap();
    use std::io::Write;
    stdin.write_all(b"before the lifetime\n").unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_secs(3 * LIFETIME - 3));
    stdin.write_all(b"after three lifetimes\n").unwrap();
    drop(stdin);
    let o = output_within(a, Duration::from_secs(30)).expect("A finishes");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    assert!(
        b.wait(Duration::from_secs(20)).is_some(),
        "B did not finish"
    );
    let got = std::fs::read_to_string(&out).unwrap();
    assert_eq!(got, "before the lifetime\nafter three lifetimes\n", "{err}");
    let a_events = stderr_events(&o.stderr);
    let path = final_path(&a_events).unwrap_or_else(|| panic!("{err}"));
    assert!(is_turn(path), "{path}\n{err}");
    let log = t.log();
    let refreshes = log
        .lines()
        .filter(|l| l.contains("refreshed, realm=") && !l.contains("lifetime=0"))
        .count();
    assert!(refreshes >= 1, "no refresh in coturn's log:\n{log}");
    assert_eq!(released(&log), 1, "{log}");
    eprintln!(
        "{}-s lifetime, session of {} s: {refreshes} refreshes in coturn's log, data after the lifetime intact, released",
        LIFETIME,
        3 * LIFETIME - 3
    );
}

/// The connector's own allocation carries a session where nothing direct
/// works (the side that starts holds it: its peer probes it), and where a
/// direct path exists it wins over the TURN path.
#[test]
fn the_connector_s_allocation_carries_the_session_and_a_direct_path_beats_turn() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let data = test_bytes(2_000_000, 15);
    for (a_nat, b_nat, a_turn, want) in [
        ("symmetric-random", "symmetric-random", true, "turn"),
        (
            "port-restricted-cone",
            "port-restricted-cone",
            false,
            "direct",
        ),
    ] {
        let Some(t) = TurnLab::start_pair(a_nat, b_nat) else {
            return;
        };
        let input = t.dir.join("in");
        std::fs::write(&input, &data).unwrap();
        let out = t.dir.join("out");
        let mut b_cmd = t.peer(Node::HostB, "b");
        if !a_turn {
            b_cmd
                .args(["--turn", &TurnLab::uri("udp"), "--turn-user", USER])
                .args(["--turn-pass", PASS]);
        }
        let mut b = start_listener(
            b_cmd
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&out).unwrap()),
        );
        let mut a_cmd = t.connector(&b.id);
        if a_turn {
            a_cmd
                .args(["--turn", &TurnLab::uri("udp"), "--turn-user", USER])
                .args(["--turn-pass", PASS]);
        }
        let a = a_cmd
            .stdin(std::fs::File::open(&input).unwrap())
            .spawn()
            .unwrap();
        let o = output_within(a, Duration::from_secs(60)).expect("A finishes");
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{a_nat} × {b_nat}: {err}");
        assert!(
            b.wait(Duration::from_secs(20)).is_some(),
            "B did not finish"
        );
        assert!(
            std::fs::read(&out).unwrap() == data,
            "{a_nat} × {b_nat}: bytes differ"
        );
        let events = stderr_events(&o.stderr);
        let path = final_path(&events).unwrap_or_else(|| panic!("{err}"));
        match want {
            "turn" => assert!(is_turn(path), "{a_nat} × {b_nat}: {path}\n{err}"),
            _ => assert_eq!(path["path"], "direct", "{a_nat} × {b_nat}: {path}\n{err}"),
        }
        let holder = if a_turn { "A" } else { "B" };
        eprintln!(
            "{a_nat} × {b_nat}, {holder} holding the allocation: ended {} ({}), 2 MB intact",
            if want == "turn" { "on TURN" } else { "direct" },
            path["strategy"]
        );
    }
}

/// coturn restarts under a session: the listener's allocation (over
/// TCP) is lost and said so, the session carries on (on the server's
/// relay meanwhile), the allocation is made again on the new coturn, and
/// the same session moves back onto it; every byte arrives.
#[test]
fn an_allocation_lost_with_a_turn_server_restart_is_made_again_and_the_session_returns() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut t) = TurnLab::start() else {
        return;
    };
    let out = t.dir.join("out");
    let mut b = t.listener("tcp", PASS, &out);
    let mut seen = b.early.clone();
    let first = seen
        .iter()
        .find(|e| e["event"] == "turn-allocated")
        .cloned()
        .or_else(|| {
            recv_until(
                &b.events,
                Duration::from_secs(10),
                &mut seen,
                kind("turn-allocated"),
            )
        })
        .unwrap_or_else(|| panic!("no allocation: {seen:?}"));
    let (mut a, a_events) = spawn_with_events(t.connector(&b.id).stdin(Stdio::piped()));
    let mut stdin = a.stdin.take().unwrap();
    use std::io::Write;
    stdin.write_all(b"before the restart\n").unwrap();
    stdin.flush().unwrap();
    assert!(
        wait_for_len(&out, 19, Duration::from_secs(20)),
        "the first line did not arrive"
    );
    t.kill_coturn();
    let lost = Instant::now();
    recv_until(
        &b.events,
        Duration::from_secs(10),
        &mut seen,
        kind("turn-lost"),
    )
    .unwrap_or_else(|| panic!("the loss was not reported: {seen:?}"));
    t.start_coturn();
    let again = recv_until(
        &b.events,
        Duration::from_secs(30),
        &mut seen,
        kind("turn-allocated"),
    )
    .unwrap_or_else(|| panic!("no new allocation: {seen:?}"));
    let made = lost.elapsed();
    // A's session moves back onto the new relayed address.
    let mut a_seen = Vec::new();
    let back = recv_until(&a_events, Duration::from_secs(60), &mut a_seen, |e| {
        e["event"] == "path-changed" && is_turn(e) && e["remote"] == again["relayed"]
    })
    .unwrap_or_else(|| panic!("A's session did not return to TURN: {a_seen:?}"));
    let returned = lost.elapsed();
    // The stall is seen within seconds and punched again at once (not at
    // the next periodic retry, 30 s on).
    assert!(
        returned < Duration::from_secs(15),
        "{returned:?}: {a_seen:?}"
    );
    stdin.write_all(b"after the restart\n").unwrap();
    drop(stdin);
    let status = a.wait().unwrap();
    assert!(status.success(), "{a_seen:?}");
    assert!(
        b.wait(Duration::from_secs(20)).is_some(),
        "B did not finish"
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "before the restart\nafter the restart\n"
    );
    eprintln!(
        "coturn restarted under a session: {} lost, {} allocated {:.1} s after the loss, the session back on it after {:.1} s ({}), every byte delivered",
        first["relayed"],
        again["relayed"],
        made.as_secs_f64(),
        returned.as_secs_f64(),
        back["from"]["path"]
    );
}

/// An allocation left idle longer than B's NAT keeps an idle UDP mapping
/// (30 s here) still works: its keepalives hold the mapping, so coturn
/// never sees the allocation's requests from a new port (437), and a
/// session made afterwards goes through it.
#[test]
fn an_idle_udp_allocation_outlives_the_nat_mapping_timeout() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(t) = TurnLab::start_pair("symmetric-random", "symmetric-random:timeout=30") else {
        return;
    };
    let out = t.dir.join("out");
    let mut b = t.listener("udp", PASS, &out);
    std::thread::sleep(Duration::from_secs(45));
    let mut a = t.connector(&b.id).stdin(Stdio::piped()).spawn().unwrap();
    {
        use std::io::Write;
        a.stdin
            .take()
            .unwrap()
            .write_all(b"after 45 s idle\n")
            .unwrap();
    }
    let o = output_within(a, Duration::from_secs(30)).expect("A finishes");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    assert!(
        b.wait(Duration::from_secs(20)).is_some(),
        "B did not finish"
    );
    let mut b_events = b.early.clone();
    b_events.extend(b.drain(Duration::from_millis(300)));
    assert!(
        !b_events.iter().any(|e| e["event"] == "turn-lost"),
        "{b_events:?}"
    );
    let path = final_path(&stderr_events(&o.stderr))
        .cloned()
        .unwrap_or_default();
    assert!(is_turn(&path), "{path}\n{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "after 45 s idle\n");
    eprintln!(
        "45 s idle behind a NAT with a 30 s UDP timeout: allocation kept, session on TURN ({})",
        path["remote"]
    );
}
