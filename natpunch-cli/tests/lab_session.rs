//! Sessions through real Linux NATs (nftables in network namespaces): 10 MB
//! through the pipe for three NAT pairs, an HTTP server behind B fetched
//! from A through `--forward`, a session that lives through both NATs
//! dropping their mappings, and a peer refused for its key. Needs root; in
//! CI (CI=true) a missing capability fails loudly, elsewhere the tests skip
//! with a loud message.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use natpunch_lab::{Lab, LabOptions, Links, Node, Side, TopologySpec};

struct LabPair {
    lab: Lab,
    server: String,
    dir: PathBuf,
}

fn lab_pair(a: &str, b: &str) -> LabPair {
    let topology = TopologySpec::Pair {
        a: Side::parse(a).expect("preset"),
        b: Side::parse(b).expect("preset"),
    };
    let opts = LabOptions {
        natpunch: PathBuf::from(env!("CARGO_BIN_EXE_natpunch")),
        links: Links::default(),
    };
    let mut lab = Lab::build(&topology, &opts).expect("lab builds");
    let server = lab.start_server().expect("server starts").to_string();
    LabPair {
        lab,
        server,
        dir: tempdir("lab-session"),
    }
}

impl LabPair {
    fn peer(&self, node: Node, key: &str) -> Command {
        let mut c = self.lab.natpunch(node);
        c.args(["-s", &self.server, "--json", "--rto-ms", "100", "--key"])
            .arg(self.dir.join(key));
        c
    }

    /// B listens with stdout into `output`; A connects with a piped stdin
    /// (and stderr) for the test to feed.
    fn live_pipe(&self, output: &std::path::Path) -> (Listener, std::process::Child) {
        let l = start_listener(
            self.peer(Node::HostB, "b")
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(output).unwrap()),
        );
        let a = self
            .peer(Node::HostA, "a")
            .args(["-d", &l.id])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        (l, a)
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

/// 10 MB from A to B through the punched pipe (`--no-relay`: the bytes
/// take the punched path, not the relay first); checks every byte and the
/// strategy.
fn ten_mb_through(a: &str, b: &str, strategy: &str) {
    let p = lab_pair(a, b);
    let data = test_bytes(10 << 20, 0x5eed);
    let input = p.dir.join("in");
    let output = p.dir.join("out");
    std::fs::write(&input, &data).unwrap();
    let mut l = start_listener(
        p.peer(Node::HostB, "b")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&output).unwrap()),
    );
    let t = Instant::now();
    let out = p
        .peer(Node::HostA, "a")
        .args(["-d", &l.id, "--no-relay"])
        .stdin(std::fs::File::open(&input).unwrap())
        .output()
        .unwrap();
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{a} / {b}: {err}");
    let status = l
        .wait(Duration::from_secs(15))
        .expect("B exits after the pipe");
    assert!(status.success(), "{a} / {b}: B failed");
    let got = std::fs::read(&output).unwrap();
    assert_eq!(got.len(), data.len(), "{a} / {b}");
    assert!(got == data, "{a} / {b}: the bytes differ");
    let ev = json_lines(&out.stderr);
    let c = event(&ev, "connected").expect("connected");
    assert_eq!(c["strategy"], strategy, "{a} / {b}: {c}");
    assert!(event(&ev, "session").is_some());
    eprintln!(
        "{a} / {b}: 10 MiB by {strategy} in {:.2} s (punch {} ms)",
        took.as_secs_f64(),
        c["elapsed_ms"]
    );
}

#[test]
fn ten_megabytes_through_the_pipe_cone_sequential_and_random() {
    if !lab_available() {
        return;
    }
    ten_mb_through("port-restricted-cone", "port-restricted-cone", "cone");
    ten_mb_through("symmetric-sequential", "port-restricted-cone", "predict");
    ten_mb_through("port-restricted-cone", "symmetric-random", "birthday");
}

/// A minimal HTTP/1.0 server: the body is `size` bytes derived from the path.
fn http_server(listener: std::net::TcpListener, size: usize) {
    std::thread::spawn(move || {
        for c in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut c = c;
                let mut req = Vec::new();
                let mut b = [0u8; 512];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&b[..n]),
                    }
                }
                let seed = req
                    .iter()
                    .take_while(|&&x| x != b'\r')
                    .map(|&x| u64::from(x))
                    .sum();
                let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {size}\r\n\r\n");
                let _ = c.write_all(head.as_bytes());
                let _ = c.write_all(&test_bytes(size, seed));
            });
        }
    });
}

#[test]
fn http_behind_b_is_fetched_from_a_through_forward() {
    if !lab_available() {
        return;
    }
    let p = lab_pair("port-restricted-cone", "symmetric-sequential");
    let web = in_netns(&p.netns(Node::HostB), || {
        std::net::TcpListener::bind("127.0.0.1:8080").expect("bind in B")
    });
    http_server(web, 1 << 20);
    let l = start_listener(
        p.peer(Node::HostB, "b")
            .args(["--expose", "web=127.0.0.1:8080"])
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let _a = Proc(
        p.peer(Node::HostA, "a")
            .args(["-d", &l.id, "--forward", "127.0.0.1:8081=web"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ok = in_netns(&p.netns(Node::HostA), || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect("127.0.0.1:8081").is_err() {
            assert!(Instant::now() < deadline, "--forward never listened");
            std::thread::sleep(Duration::from_millis(200));
        }
        let fetches: Vec<_> = (0..8)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut c = std::net::TcpStream::connect("127.0.0.1:8081").unwrap();
                    let line = format!("GET /file{i} HTTP/1.0");
                    c.write_all(format!("{line}\r\nHost: b\r\n\r\n").as_bytes())
                        .unwrap();
                    let mut resp = Vec::new();
                    c.read_to_end(&mut resp).unwrap();
                    let split = resp
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .expect("headers")
                        + 4;
                    let seed = line.bytes().map(u64::from).sum();
                    resp.starts_with(b"HTTP/1.0 200 OK")
                        && resp[split..] == test_bytes(1 << 20, seed)[..]
                })
            })
            .collect();
        fetches.into_iter().all(|f| f.join().unwrap_or(false))
    });
    assert!(ok, "an HTTP fetch through --forward got wrong bytes");
}

#[test]
fn a_session_survives_both_nats_dropping_their_mappings() {
    if !lab_available() {
        return;
    }
    let p = lab_pair("symmetric-sequential", "port-restricted-cone");
    let output = p.dir.join("out");
    let (mut l, mut a) = p.live_pipe(&output);
    let first = test_bytes(2 << 20, 1);
    let second = test_bytes(2 << 20, 2);
    let mut stdin = a.stdin.take().unwrap();
    stdin.write_all(&first).unwrap();
    if !wait_for_len(&output, first.len() as u64, Duration::from_secs(30)) {
        let _ = a.kill();
        let out = a.wait_with_output().unwrap();
        panic!(
            "the first half never arrived; A said: {}; B said: {:?}",
            String::from_utf8_lossy(&out.stderr),
            l.drain(Duration::from_millis(100))
        );
    }
    // Both NATs forget every mapping (conntrack and our EIM/filter sets).
    p.lab.flush_nat(Node::NatA).unwrap();
    p.lab.flush_nat(Node::NatB).unwrap();
    let flushed = Instant::now();
    stdin.write_all(&second).unwrap();
    drop(stdin);
    let out = a.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let recovered = flushed.elapsed();
    assert!(l.wait(Duration::from_secs(15)).is_some_and(|s| s.success()));
    let got = std::fs::read(&output).unwrap();
    assert!(
        got.len() == first.len() + second.len()
            && got[..first.len()] == first[..]
            && got[first.len()..] == second[..],
        "bytes differ ({} of {})",
        got.len(),
        first.len() + second.len()
    );
    let ev = json_lines(&out.stderr);
    assert!(
        event(&ev, "stalled").is_some(),
        "the flush went unnoticed: {err}"
    );
    let kinds: Vec<&str> = ev.iter().filter_map(|e| e["event"].as_str()).collect();
    eprintln!(
        "survived a flush of both NATs; done {:.1} s after it; A's events: {kinds:?}",
        recovered.as_secs_f64()
    );
}

#[test]
fn a_peer_outside_the_allow_list_is_refused_through_the_nats() {
    if !lab_available() {
        return;
    }
    let p = lab_pair("port-restricted-cone", "full-cone");
    let friend = peer_id_of_key(&p.dir.join("friend"));
    let l = start_listener(
        p.peer(Node::HostB, "b")
            .args(["--allow", &friend])
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let out = p
        .peer(Node::HostA, "a")
        .args(["-d", &l.id])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let failed = json_lines(&out.stderr)
        .into_iter()
        .find(|e| e["event"] == "failed")
        .unwrap_or_else(|| panic!("no failed event: {err}"));
    assert_eq!(failed["code"], "declined-not-allowed", "{err}");
    assert!(
        err.contains(&format!("{} declined: we are not on its allow list", l.id)),
        "{err}"
    );
}

#[test]
fn keepalives_hold_an_idle_session_open_through_15s_nat_timeouts() {
    if !lab_available() {
        return;
    }
    // Both NATs forget an idle UDP mapping after 15 s; the session idles
    // for 25 s, so only keepalives (every 10 s) can keep the path.
    let p = lab_pair(
        "port-restricted-cone:timeout=15",
        "port-restricted-cone:timeout=15",
    );
    let output = p.dir.join("out");
    let (mut l, mut a) = p.live_pipe(&output);
    let mut stdin = a.stdin.take().unwrap();
    stdin.write_all(b"before the pause\n").unwrap();
    assert!(
        wait_for_len(&output, 17, Duration::from_secs(30)),
        "the first line never arrived"
    );
    std::thread::sleep(Duration::from_secs(25));
    stdin.write_all(b"after the pause\n").unwrap();
    drop(stdin);
    let out = a.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(l.wait(Duration::from_secs(15)).is_some_and(|s| s.success()));
    assert_eq!(
        std::fs::read_to_string(&output).unwrap(),
        "before the pause\nafter the pause\n"
    );
    let ev = json_lines(&out.stderr);
    assert!(
        event(&ev, "stalled").is_none(),
        "the path broke although keepalives ran: {err}"
    );
}
