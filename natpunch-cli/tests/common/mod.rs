//! Helpers for the CLI's integration tests: child processes that die with
//! the test, free port pairs, readiness polling, and loud skipping.

#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The natpunch binary under test.
pub fn natpunch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_natpunch"))
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn(cmd: &mut Command) -> Proc {
    Proc(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
    )
}

/// Whether a third-party tool is installed. In CI (CI=true) a missing tool
/// fails the test; elsewhere the test is skipped with a loud message.
pub fn require_tool(tool: &str, package: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if found {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{tool} is missing in CI: .ci/run must `apt-get install -y {package}`");
    }
    eprintln!("\n*** SKIPPED: {tool} not installed (apt-get install {package}); this interop test did not run ***\n");
    false
}

/// A port P such that P and P+1 are free for UDP and TCP on 127.0.0.1 and
/// 127.0.0.2.
pub fn free_port_pair() -> u16 {
    for _ in 0..200 {
        let p = 20_000 + (rand_u16() % 30_000);
        let ok = ["127.0.0.1", "127.0.0.2"].iter().all(|ip| {
            [p, p + 1].iter().all(|port| {
                let a: SocketAddr = format!("{ip}:{port}").parse().unwrap();
                UdpSocket::bind(a).is_ok() && std::net::TcpListener::bind(a).is_ok()
            })
        });
        if ok {
            return p;
        }
    }
    panic!("no free port pair");
}

fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    ((t.subsec_nanos() ^ std::process::id().wrapping_mul(2_654_435_761)) % 65_521) as u16
}

/// Polls `server` with a STUN Binding request until it answers.
pub fn wait_stun(server: SocketAddr, within: Duration) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let req = [
        0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ];
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        let _ = s.send_to(&req, server);
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            if n >= 20 && buf[0] == 0x01 && buf[1] == 0x01 {
                return;
            }
        }
    }
    panic!("STUN server {server} not answering after {within:?}");
}

/// Starts `natpunch server` with RFC 5780 on 127.0.0.1:P / 127.0.0.2:P+1.
pub fn start_natpunch_server(p: u16) -> Proc {
    let proc = spawn(natpunch().args([
        "server",
        "--listen",
        &format!("127.0.0.1:{p}"),
        "--alt",
        &format!("127.0.0.2:{}", p + 1),
    ]));
    wait_stun(
        format!("127.0.0.1:{p}").parse().unwrap(),
        Duration::from_secs(10),
    );
    proc
}

/// Starts coturn as an RFC 5780 STUN server on 127.0.0.1/127.0.0.2, ports
/// P and P+1. `-n` keeps the packaged /etc/turnserver.conf (which disables
/// RFC 5780) out of it. coturn pairs only its first -L address correctly,
/// so clients must use 127.0.0.1.
pub fn start_coturn(p: u16, dir: &std::path::Path) -> Proc {
    let proc = spawn(Command::new("turnserver").args([
        "-n",
        "-S",
        "-L",
        "127.0.0.1",
        "-L",
        "127.0.0.2",
        "-p",
        &p.to_string(),
        "--alt-listening-port",
        &(p + 1).to_string(),
        "--no-tls",
        "--no-dtls",
        "--no-cli",
        "--log-file",
        "stdout",
        "--simple-log",
        "--pidfile",
        &dir.join("turnserver.pid").to_string_lossy(),
        "-b",
        &dir.join("turndb").to_string_lossy(),
    ]));
    wait_stun(
        format!("127.0.0.1:{p}").parse().unwrap(),
        Duration::from_secs(10),
    );
    proc
}

/// Runs a command with a time limit (the turnutils clients can hang).
pub fn run_with_timeout(cmd: &mut Command, secs: u64) -> Output {
    let prog = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    Command::new("timeout")
        .arg(secs.to_string())
        .arg(prog)
        .args(args)
        .output()
        .expect("run")
}

pub fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "natpunch-test-{tag}-{}-{}",
        std::process::id(),
        rand_u16()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The JSON events among a child's stderr lines (warnings and logs in
/// between are skipped).
pub fn stderr_events(stderr: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The first event of `kind`.
pub fn event<'a>(events: &'a [serde_json::Value], kind: &str) -> Option<&'a serde_json::Value> {
    events.iter().find(|e| e["event"] == kind)
}

/// Every line of `out` parsed as one JSON object.
pub fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// A natpunch listener (already spawned with `--json` and a piped stderr)
/// and its peer ID, once it registered. Its other events stay readable in
/// `events`.
pub struct Listener {
    pub proc: Proc,
    pub id: String,
    /// The address the server saw it at (its session socket, on loopback).
    pub observed: String,
    pub events: std::sync::mpsc::Receiver<serde_json::Value>,
    /// Events that came before `registered`.
    pub early: Vec<serde_json::Value>,
}

/// Spawns `cmd` (with `--json`) with its stderr piped here: its events
/// come on the channel as they are printed, its other lines are echoed.
pub fn spawn_with_events(
    cmd: &mut Command,
) -> (Child, std::sync::mpsc::Receiver<serde_json::Value>) {
    use std::io::{BufRead, BufReader};
    let mut child = cmd.stderr(Stdio::piped()).spawn().expect("spawn natpunch");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            match serde_json::from_str::<serde_json::Value>(&l) {
                Ok(v) => {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
                Err(_) => eprintln!("natpunch: {l}"),
            }
        }
    });
    (child, rx)
}

/// Reads events from `rx` into `seen` until one satisfies `f` (returned),
/// or `within` passes (`None`).
pub fn recv_until(
    rx: &std::sync::mpsc::Receiver<serde_json::Value>,
    within: Duration,
    seen: &mut Vec<serde_json::Value>,
    f: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    let deadline = Instant::now() + within;
    while let Ok(e) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        seen.push(e.clone());
        if f(&e) {
            return Some(e);
        }
    }
    None
}

/// Waits for the `registered` event of a listener spawned from `cmd`
/// (which must have `--json`; stderr is piped here).
pub fn start_listener(cmd: &mut Command) -> Listener {
    let (child, rx) = spawn_with_events(cmd);
    let proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut early = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(v) if v["event"] == "registered" => {
                let id = v["peer_id"].as_str().expect("peer_id").to_string();
                let observed = v["observed"].as_str().unwrap_or_default().to_string();
                return Listener {
                    proc,
                    id,
                    observed,
                    events: rx,
                    early,
                };
            }
            Ok(v) => early.push(v),
            Err(_) => panic!("the listener did not register within 20 s"),
        }
    }
}

impl Listener {
    /// The remaining events until the listener exits (or `within`).
    pub fn drain(&self, within: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + within;
        let mut v = Vec::new();
        while let Ok(e) = self
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            v.push(e);
        }
        v
    }

    /// Waits for the listener to exit; its status.
    pub fn wait(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.proc.0.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// Deterministic pseudo-random bytes, so a failure reproduces.
pub fn test_bytes(len: usize, seed: u64) -> Vec<u8> {
    natpunch_lab::throughput::xorshift_bytes(len, seed)
}

/// The peer ID of the key in `path` (created if missing).
pub fn peer_id_of_key(path: &std::path::Path) -> String {
    let out = natpunch().args(["id", "--key"]).arg(path).output().unwrap();
    assert!(out.status.success(), "natpunch id failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits until the file at `path` holds at least `len` bytes.
pub fn wait_for_len(path: &std::path::Path, len: u64, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) < len {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// Whether this machine can run the NAT lab: root, namespaces, nftables.
/// In CI (CI=true) a missing capability fails loudly, elsewhere the test
/// skips with a loud message.
pub fn lab_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let why = if !root {
        Some("not root".to_string())
    } else {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let probe = format!("npprobe{}x{n}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &probe])
            .status()
            .is_ok_and(|s| s.success());
        let _ = Command::new("ip").args(["netns", "del", &probe]).status();
        if !ok {
            Some("cannot create network namespaces".into())
        } else if !require_tool("nft", "nftables") || !require_tool("iptables", "iptables") {
            Some("nftables/iptables missing".into())
        } else {
            None
        }
    };
    match why {
        None => true,
        Some(w) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("the NAT lab cannot run in CI: {w}")
        }
        Some(w) => {
            eprintln!("\n*** SKIPPED: NAT lab test: {w}; run as root on Linux ***\n");
            false
        }
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    natpunch_lab::topology::in_netns(ns, f).expect("enter the network namespace")
}

/// Waits for a child's output at most `within`; kills it past that.
pub fn output_within(child: Child, within: Duration) -> Option<Output> {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => out.ok(),
        Err(_) => {
            // SAFETY: kill(2) on our own child's pid, not yet reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            None
        }
    }
}

/// A CA and a server certificate for `host` (an IP or a name) signed by
/// it, for a TLS server under test: (CA, certificate, key) PEM files.
pub fn tls_certificates(
    dir: &std::path::Path,
    host: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![host.to_string()]).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}
