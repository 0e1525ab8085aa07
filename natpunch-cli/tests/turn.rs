//! The TURN client against a real coturn (Debian's `coturn`, started by
//! each test on loopback): allocations over UDP, TCP and TLS with
//! long-term credentials and with `use-auth-secret`, data through the
//! relay to an echo peer, a wrong password, refreshes across a session
//! longer than the allocation's lifetime, and the allocation gone from
//! coturn after exit (its own log says so).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const USER: &str = "alice";
const PASS: &str = "s3cret-Pa55";
const SECRET: &str = "shared-S3cret";
const REALM: &str = "natpunch.test";
/// The allocations' lifetime in the refresh test: coturn grants at most
/// this (`--max-allocate-lifetime`), the client refreshes at half.
const SHORT_LIFETIME: u64 = 6;

struct Coturn {
    _proc: Proc,
    port: u16,
    tls_port: u16,
    log: PathBuf,
    ca: PathBuf,
    dir: PathBuf,
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Coturn {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn uri(&self, transport: &str) -> String {
        match transport {
            "udp" => format!("turn:127.0.0.1:{}", self.port),
            "tcp" => format!("turn:127.0.0.1:{}?transport=tcp", self.port),
            _ => format!("turns:127.0.0.1:{}", self.tls_port),
        }
    }
}

/// coturn on 127.0.0.1 with `auth` (`--lt-cred-mech …` or
/// `--use-auth-secret …`), TLS on the next port, loopback peers allowed,
/// a verbose log (allocations are logged only then).
fn coturn(auth: &[&str], extra: &[&str]) -> Option<Coturn> {
    if !require_tool("turnserver", "coturn") {
        return None;
    }
    let port = free_port_pair();
    let dir = tempdir("coturn-turn");
    let (ca, cert, key) = tls_certificates(&dir, "127.0.0.1");
    let log = dir.join("turnserver.log");
    let mut cmd = Command::new("turnserver");
    cmd.args(["-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1"])
        .arg(format!("--listening-port={port}"))
        .arg(format!("--tls-listening-port={}", port + 1))
        .arg(format!("--cert={}", cert.display()))
        .arg(format!("--pkey={}", key.display()))
        .arg(format!("--realm={REALM}"))
        .args(auth)
        .args(extra)
        .args([
            "--no-dtls",
            "--no-cli",
            "--allow-loopback-peers",
            "--verbose",
            "--simple-log",
        ])
        .arg(format!("--log-file={}", log.display()))
        .arg(format!(
            "--pidfile={}",
            dir.join("turnserver.pid").display()
        ))
        .arg(format!("--userdb={}", dir.join("turndb").display()))
        .stdin(Stdio::null());
    let proc = spawn(&mut cmd);
    wait_stun(
        format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(10),
    );
    // The TLS listener comes up with the rest; give it its moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port + 1)).is_err()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(Coturn {
        _proc: proc,
        port,
        tls_port: port + 1,
        log,
        ca,
        dir,
    })
}

/// Allocations coturn's log shows released by their client (a Refresh
/// with lifetime 0).
fn released_in(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("refreshed, realm=") && l.contains("lifetime=0"))
        .count()
}

fn lt_cred() -> Vec<String> {
    vec!["--lt-cred-mech".into(), format!("--user={USER}:{PASS}")]
}

/// A UDP echo peer on 127.0.0.1 (a thread), its address.
fn echo_peer() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let a = s.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut b = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut b) {
            let _ = s.send_to(&b[..n], from);
        }
    });
    a
}

fn turn_cmd(c: &Coturn, transport: &str, creds: &[&str]) -> Command {
    let mut cmd = natpunch();
    cmd.args(["turn", &c.uri(transport), "--json", "--turn-ca"])
        .arg(&c.ca)
        .args(creds)
        .stdin(Stdio::null());
    cmd
}

/// Each transport: an allocation, 3 datagrams through the relay to an
/// echo peer and back, the release confirmed, coturn's log showing the
/// allocation deleted, and the password nowhere in our output.
#[test]
fn allocates_and_relays_over_udp_tcp_and_tls_and_releases() {
    let auth = lt_cred();
    let auth: Vec<&str> = auth.iter().map(String::as_str).collect();
    let Some(c) = coturn(&auth, &[]) else { return };
    let peer = echo_peer();
    for transport in ["udp", "tcp", "tls"] {
        let o = run_with_timeout(
            turn_cmd(&c, transport, &["--turn-user", USER, "--turn-pass", PASS])
                .args(["--peer", &peer.to_string()]),
            30,
        );
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{transport}: {err}");
        assert!(
            !err.contains(PASS),
            "{transport}: the password was printed: {err}"
        );
        let ev = stderr_events(&o.stderr);
        let a = event(&ev, "turn-allocated").unwrap_or_else(|| panic!("{transport}: {err}"));
        assert_eq!(a["transport"], transport);
        let relayed: SocketAddr = a["relayed"].as_str().unwrap().parse().unwrap();
        assert_eq!(relayed.ip().to_string(), "127.0.0.1");
        let p = event(&ev, "turn-peer").unwrap_or_else(|| panic!("{transport}: {err}"));
        assert_eq!(p["answered"], 3, "{transport}: {err}");
        let r = event(&ev, "turn-released").unwrap_or_else(|| panic!("{transport}: {err}"));
        assert_eq!(r["confirmed"], true, "{transport}: {err}");
        eprintln!(
            "{transport}: relayed {relayed} in {} ms; echo peer answered {} of 3 through it (first in {:.1} ms); released",
            a["elapsed_ms"], p["answered"], p["rtt_ms"].as_f64().unwrap_or(0.0)
        );
    }
    // coturn took all three releases (its log, verbose: "refreshed, …,
    // lifetime=0" for each session; it deletes a UDP one a little later).
    std::thread::sleep(Duration::from_millis(300));
    let log = c.log();
    let released = released_in(&log);
    assert!(released >= 3, "coturn logged {released} releases:\n{log}");
    assert!(
        !log.contains("allocation timeout"),
        "an allocation timed out instead:\n{log}"
    );
}

/// Time-limited credentials from coturn's shared secret.
#[test]
fn time_limited_credentials_from_a_shared_secret() {
    let secret = format!("--static-auth-secret={SECRET}");
    let Some(c) = coturn(&["--use-auth-secret", &secret], &[]) else {
        return;
    };
    let o = run_with_timeout(
        &mut turn_cmd(&c, "tcp", &["--turn-user", "bob", "--turn-secret", SECRET]),
        30,
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    assert!(!err.contains(SECRET), "the secret was printed: {err}");
    assert!(
        event(&stderr_events(&o.stderr), "turn-allocated").is_some(),
        "{err}"
    );
}

/// A wrong password: one clear line naming the server's 401, exit 1, at
/// once (no retry storm: coturn saw two Allocates).
#[test]
fn a_wrong_password_is_the_servers_401_in_one_line() {
    let auth = lt_cred();
    let auth: Vec<&str> = auth.iter().map(String::as_str).collect();
    let Some(c) = coturn(&auth, &[]) else { return };
    for transport in ["udp", "tls"] {
        let t = Instant::now();
        let o = run_with_timeout(
            natpunch()
                .args(["turn", &c.uri(transport), "--turn-ca"])
                .arg(&c.ca)
                .args(["--turn-user", USER, "--turn-pass", "wrong"]),
            30,
        );
        let took = t.elapsed();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("answered 401 Unauthorized"), "{err}");
        assert!(took < Duration::from_secs(3), "took {took:?}");
        eprintln!(
            "{transport}, wrong password, after {took:?}: {}",
            err.trim()
        );
    }
    let log = c.log();
    let refused = log
        .lines()
        .filter(|l| l.contains("credentials are incorrect"))
        .count();
    assert!(refused <= 2, "coturn refused {refused} times:\n{log}");
}

/// An allocation coturn grants for 6 s, held 20 s: refreshed at half its
/// lifetime (coturn grants a refresh its default 600 s whatever the cap,
/// so one refresh carries it), still relaying after the hold, then
/// released; and one held until Ctrl-C is released too.
#[test]
fn refreshes_across_a_session_longer_than_the_lifetime_and_releases_on_ctrl_c() {
    let auth = lt_cred();
    let auth: Vec<&str> = auth.iter().map(String::as_str).collect();
    let max = format!("--max-allocate-lifetime={SHORT_LIFETIME}");
    let Some(c) = coturn(&auth, &[&max]) else {
        return;
    };
    let peer = echo_peer();
    let o = run_with_timeout(
        turn_cmd(&c, "udp", &["--turn-user", USER, "--turn-pass", PASS]).args([
            "--hold",
            "20",
            "--peer",
            &peer.to_string(),
        ]),
        40,
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    let ev = stderr_events(&o.stderr);
    let a = event(&ev, "turn-allocated").unwrap_or_else(|| panic!("{err}"));
    assert_eq!(a["lifetime_s"], SHORT_LIFETIME, "{err}");
    let refreshes: Vec<u64> = ev
        .iter()
        .filter(|e| e["event"] == "turn-refreshed")
        .filter_map(|e| e["lifetime_s"].as_u64())
        .collect();
    assert!(
        !refreshes.is_empty(),
        "no refresh in 20 s of a 6 s lifetime: {err}"
    );
    let p = event(&ev, "turn-peer").unwrap_or_else(|| panic!("{err}"));
    assert_eq!(p["answered"], 3, "the relay after 20 s: {err}");
    assert_eq!(
        event(&ev, "turn-released").unwrap()["confirmed"],
        true,
        "{err}"
    );
    let log = c.log();
    assert!(
        !log.contains("allocation timeout"),
        "the allocation lapsed:\n{log}"
    );
    eprintln!(
        "6 s lifetime held 20 s: refreshed for {refreshes:?} s, the echo peer answered {} of 3 after the hold, released",
        p["answered"]
    );

    // Ctrl-C (SIGINT) while holding.
    let child = turn_cmd(&c, "tcp", &["--turn-user", USER, "--turn-pass", PASS])
        .args(["--hold", "60"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let o = output_within(child, Duration::from_secs(10)).expect("exits on SIGINT");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    assert_eq!(
        event(&stderr_events(&o.stderr), "turn-released").unwrap()["confirmed"],
        true,
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(released_in(&c.log()) >= 2, "{}", c.log());
}
