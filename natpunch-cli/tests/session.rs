//! Sessions on loopback: the netcat-style pipe both ways, `--to`,
//! `--forward`/`--expose` with many connections, half-close and reset,
//! refusals (`--allow`, a wrong key) and a peer that dies mid-transfer.
//! The NAT versions of these live in `lab_session.rs`.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

struct Setup {
    _server: Proc,
    server: String,
    dir: std::path::PathBuf,
}

fn setup(tag: &str) -> Setup {
    let p = free_port_pair();
    let server = start_natpunch_server(p);
    Setup {
        _server: server,
        server: format!("127.0.0.1:{p}"),
        dir: tempdir(tag),
    }
}

impl Setup {
    fn peer(&self, key: &str) -> std::process::Command {
        let mut c = natpunch();
        c.args(["-s", &self.server, "--json", "--rto-ms", "50", "--key"])
            .arg(self.dir.join(key));
        c
    }

    fn listener(&self, args: &[&str], stdin: Stdio, stdout: Stdio) -> Listener {
        start_listener(self.peer("b").args(args).stdin(stdin).stdout(stdout))
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn pipe_carries_bytes_both_ways_and_exits_zero() {
    let s = setup("pipe");
    let to_b = test_bytes(2_000_000, 1);
    let to_a = test_bytes(300_000, 2);
    std::fs::write(s.dir.join("to_a"), &to_a).unwrap();
    let b_in = std::fs::File::open(s.dir.join("to_a")).unwrap();
    let b_out = std::fs::File::create(s.dir.join("got_b")).unwrap();
    let mut l = s.listener(&[], b_in.into(), b_out.into());
    let mut a = s
        .peer("a")
        .args(["-d", &l.id])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = a.stdin.take().unwrap();
    let data = to_b.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = a.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        out.stdout == to_a,
        "A got {} bytes, want {}",
        out.stdout.len(),
        to_a.len()
    );
    let st = l
        .wait(Duration::from_secs(10))
        .expect("listener exits after the pipe");
    assert!(st.success());
    assert!(std::fs::read(s.dir.join("got_b")).unwrap() == to_b);
    let ev = json_lines(&out.stderr);
    let session = ev
        .iter()
        .find(|e| e["event"] == "session")
        .expect("session event");
    assert_eq!(session["peer_id"], l.id.as_str());
    let done = ev
        .iter()
        .find(|e| e["event"] == "done")
        .expect("done event");
    assert_eq!(done["sent"], to_b.len() as u64);
    assert_eq!(done["received"], to_a.len() as u64);
}

/// A tiny HTTP-ish server: answers each request line with `size` bytes
/// then closes; returns its port.
fn serve_bytes(size: usize) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut req = [0u8; 1024];
                let n = c.read(&mut req).unwrap_or(0);
                let seed = req[..n].iter().map(|&b| u64::from(b)).sum::<u64>();
                let _ = c.write_all(&test_bytes(size, seed));
            });
        }
    });
    port
}

#[test]
fn forward_carries_many_concurrent_connections_and_only_named_services() {
    let s = setup("forward");
    let port = serve_bytes(500_000);
    let expose = format!("data=127.0.0.1:{port}");
    let l = s.listener(&["--expose", &expose], Stdio::null(), Stdio::null());
    let local = TcpListener::bind("127.0.0.1:0").unwrap();
    let lport = local.local_addr().unwrap().port();
    drop(local);
    let fwd = format!("127.0.0.1:{lport}=data");
    let _a = Proc(
        s.peer("a")
            .args(["-d", &l.id, "--forward", &fwd])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let connect = || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match TcpStream::connect(("127.0.0.1", lport)) {
                Ok(c) => return c,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => panic!("forward never listened: {e}"),
            }
        }
    };
    drop(connect());
    let clients: Vec<_> = (0..16u8)
        .map(|i| {
            let mut c = connect();
            std::thread::spawn(move || {
                let req = [b'a' + i; 10];
                c.write_all(&req).unwrap();
                // Half-close: the server still answers in full.
                c.shutdown(std::net::Shutdown::Write).unwrap();
                let mut got = Vec::new();
                c.read_to_end(&mut got).unwrap();
                let seed = req.iter().map(|&b| u64::from(b)).sum::<u64>();
                got == test_bytes(500_000, seed)
            })
        })
        .collect();
    for c in clients {
        assert!(c.join().unwrap(), "a forwarded connection got wrong bytes");
    }
    // The pipe and unknown names are refused with a reason.
    let out = s
        .peer("c")
        .args(["-d", &l.id])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only offers named services"));
    let out = s
        .peer("c")
        .args(["-d", &l.id, "--to", "ssh"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no service named \\\"ssh\\\""));
}

#[test]
fn forwarded_reset_reaches_the_other_side_as_a_reset() {
    let s = setup("reset");
    // A service that resets every connection once it has read a request.
    let svc = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = svc.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in svc.incoming().map_while(Result::ok) {
            let mut c = c;
            let mut b = [0u8; 4];
            let _ = c.read(&mut b);
            let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
        }
    });
    let expose = format!("rst=127.0.0.1:{port}");
    let l = s.listener(&["--expose", &expose], Stdio::null(), Stdio::null());
    let mut a = s
        .peer("a")
        .args(["-d", &l.id, "--to", "rst"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    a.stdin.take().unwrap().write_all(b"ping").unwrap();
    let out = a.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("reset"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn allow_list_and_wrong_key_are_refused_naming_both_ids() {
    let s = setup("refuse");
    let friend = peer_id_of_key(&s.dir.join("friend"));
    let l = s.listener(&["--allow", &friend], Stdio::null(), Stdio::null());
    let a_id = peer_id_of_key(&s.dir.join("a"));
    let out = s
        .peer("a")
        .args(["-d", &l.id])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    // Refused at the introduction, before any probe or handshake, with a
    // stable code beside the words.
    let failed = json_lines(&out.stderr)
        .into_iter()
        .find(|e| e["event"] == "failed")
        .unwrap_or_else(|| panic!("no failed event: {err}"));
    assert_eq!(failed["code"], "declined-not-allowed", "{err}");
    assert_eq!(
        failed["reason"],
        format!("{} declined: we are not on its allow list (--allow)", l.id).as_str()
    );
    assert!(!err.contains("\"session\""), "a session started: {err}");
    let refused = l.drain(Duration::from_secs(2));
    let reason = format!("{a_id} is not on the allow list (--allow)");
    assert!(
        refused.iter().any(|e| e["event"] == "refused"
            && e["code"] == "not-allowed"
            && e["reason"] == reason.as_str()),
        "{refused:?}"
    );
    assert!(
        !refused.iter().any(|e| e["event"] == "attempt"),
        "{refused:?}"
    );

    // Dial the listener's port directly but expect another peer's key.
    let b_addr = l.observed.clone();
    let out = s
        .peer("a")
        .args(["-d", &friend, "--direct", &b_addr])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "presented the key of {}, but we expected {friend}",
            l.id
        )),
        "{err}"
    );
}

#[test]
fn a_peer_that_dies_mid_transfer_fails_the_other_side_within_the_idle_timeout() {
    let s = setup("dies");
    let mut l = s.listener(&[], Stdio::null(), Stdio::null());
    let mut a = s
        .peer("a")
        .args(["-d", &l.id, "--idle-timeout", "3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = a.stdin.take().unwrap();
    // Keep data flowing until the write fails (A exited).
    let feeder = std::thread::spawn(move || {
        let chunk = vec![0u8; 65536];
        while stdin.write_all(&chunk).is_ok() {}
    });
    // Let the session start, then kill the listener without a goodbye.
    let started = l.events.recv_timeout(Duration::from_secs(20));
    assert!(started.is_ok());
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match l.events.recv_timeout(Duration::from_millis(200)) {
            Ok(e) if e["event"] == "session" => break,
            _ => {}
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let _ = l.proc.0.kill();
    let killed = Instant::now();
    let out = a.wait_with_output().unwrap();
    let took = killed.elapsed();
    let _ = feeder.join();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("went silent for 3 s"), "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn an_interrupted_peer_says_so_and_the_other_side_fails_at_once() {
    let s = setup("sigint");
    let mut l = s.listener(&[], Stdio::null(), Stdio::null());
    let mut a = s
        .peer("a")
        .args(["-d", &l.id])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = a.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let chunk = vec![7u8; 65536];
        while stdin.write_all(&chunk).is_ok() {}
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(e) = l.events.recv_timeout(Duration::from_millis(200)) {
            if e["event"] == "session" {
                break;
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let _ = std::process::Command::new("kill")
        .args(["-INT", &l.proc.0.id().to_string()])
        .status();
    let interrupted = Instant::now();
    let st = l
        .wait(Duration::from_secs(5))
        .expect("the listener exits on Ctrl-C");
    assert_eq!(st.code(), Some(130));
    let out = a.wait_with_output().unwrap();
    let took = interrupted.elapsed();
    let _ = feeder.join();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("closed the session: interrupted (Ctrl-C)"),
        "{err}"
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

/// A real OpenSSH client and server through `--expose ssh=…` and
/// `ssh -o ProxyCommand='natpunch … --to ssh'`.
#[test]
fn ssh_runs_through_the_session_as_a_proxy_command() {
    if !require_tool("sshd", "openssh-server") || !require_tool("ssh", "openssh-client") {
        return;
    }
    let s = setup("ssh");
    let d = &s.dir;
    let keygen = |name: &str| {
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join(name))
            .status()
            .unwrap();
        assert!(st.success());
    };
    keygen("host_key");
    keygen("user_key");
    std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys")).unwrap();
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let user = String::from_utf8(
        std::process::Command::new("id")
            .arg("-un")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {ak}\nPidFile {pid}\n\
         UsePAM no\nStrictModes no\nPermitRootLogin yes\nPasswordAuthentication no\nAllowUsers {user}\n",
        hk = d.join("host_key").display(),
        ak = d.join("authorized_keys").display(),
        pid = d.join("sshd.pid").display(),
    );
    std::fs::write(d.join("sshd_config"), config).unwrap();
    // sshd wants its privilege-separation directory.
    let _ = std::fs::create_dir_all("/run/sshd");
    let sshd_path = ["/usr/sbin/sshd", "/usr/bin/sshd"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("sshd");
    let _sshd = spawn(
        std::process::Command::new(sshd_path)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config")),
    );
    let expose = format!("ssh=127.0.0.1:{port}");
    let l = s.listener(&["--expose", &expose], Stdio::null(), Stdio::null());
    let proxy = format!(
        "{} -s {} --key {} --to ssh",
        env!("CARGO_BIN_EXE_natpunch"),
        s.server,
        d.join("a").display()
    );
    let proxy = format!("{proxy} -d {}", l.id);
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        let out = std::process::Command::new("ssh")
            .arg("-F")
            .arg("/dev/null")
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                d.join("known_hosts").display()
            ))
            .arg("-o")
            .arg(format!("ProxyCommand={proxy}"))
            .arg("-i")
            .arg(d.join("user_key"))
            .arg(format!("{user}@home"))
            .arg("echo through-natpunch; head -c 100000 /dev/zero | wc -c")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        // sshd may still be starting: "the peer could not reach the service".
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ssh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, "through-natpunch\n100000\n");
    // As a ProxyCommand natpunch says nothing unless something fails
    // (ssh shows its stderr on the user's terminal).
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("natpunch:"), "chatty ProxyCommand: {err}");
}

/// A pseudo-terminal: (master, slave). The slave stands in for a person's
/// terminal on stdin; nobody types on the master.
fn pty() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds it opened; null name/termios/winsize
    // are allowed.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    }
}

#[test]
fn a_receiver_typing_nothing_at_a_terminal_exits_when_the_file_has_arrived() {
    let s = setup("tty");
    let data = test_bytes(500_000, 9);
    std::fs::write(s.dir.join("file"), &data).unwrap();
    let (_master, slave) = pty();
    // `natpunch -s S > file` at home, stdin a terminal nobody types on.
    let mut l = s.listener(
        &[],
        Stdio::from(slave),
        std::fs::File::create(s.dir.join("got")).unwrap().into(),
    );
    // Without the rule both sides would wait for each other: time-boxed.
    let a = s
        .peer("a")
        .args(["-d", &l.id])
        .stdin(std::fs::File::open(s.dir.join("file")).unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = output_within(a, Duration::from_secs(20));
    let st = l.wait(Duration::from_secs(5));
    let out = out.expect("the sender exits once the receiver has everything");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = st.expect("the receiver exits without a Ctrl-D");
    assert!(st.success());
    assert!(std::fs::read(s.dir.join("got")).unwrap() == data);
}

/// Two senders overlap on a `--keep-open` pipe listener: their bytes never
/// mix. The second is told to wait and goes after the first, whole.
#[test]
fn a_keep_open_pipe_listener_serves_overlapping_senders_one_after_another() {
    let s = setup("keep-open");
    let out = s.dir.join("out");
    let l = s.listener(
        &["--keep-open"],
        Stdio::null(),
        std::fs::File::create(&out).unwrap().into(),
    );
    let sizes = [3_000_000usize, 2_000_000];
    let mut senders = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let path = s.dir.join(format!("in{i}"));
        std::fs::write(&path, test_bytes(*size, 10 + i as u64)).unwrap();
        senders.push(
            s.peer(&format!("a{i}"))
                .args(["-d", &l.id])
                .stdin(std::fs::File::open(&path).unwrap())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    let mut queued = 0;
    for c in senders {
        let o = output_within(c, Duration::from_secs(60)).expect("a sender hung");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        queued += json_lines(&o.stderr)
            .iter()
            .filter(|e| e["event"] == "queued")
            .count();
    }
    let got = std::fs::read(&out).unwrap();
    let (a, b) = (test_bytes(sizes[0], 10), test_bytes(sizes[1], 11));
    let ab = [a.clone(), b.clone()].concat();
    let ba = [b, a].concat();
    assert_eq!(got.len(), ab.len());
    assert!(got == ab || got == ba, "the two senders' bytes are mixed");
    assert_eq!(queued, 1, "the later sender is told it waits");
}

#[test]
fn connecting_to_our_own_id_says_so() {
    let s = setup("own-id");
    let me = peer_id_of_key(&s.dir.join("a"));
    let o = s
        .peer("a")
        .args(["-d", &me])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let failed = json_lines(&o.stderr)
        .into_iter()
        .find(|e| e["event"] == "failed")
        .expect("a failed event");
    assert_eq!(failed["code"], "own-peer-id");
    assert!(
        failed["reason"]
            .as_str()
            .is_some_and(|r| r.contains("this peer's own ID")),
        "{failed}"
    );
    // Every line on stderr is JSON (no stray text with --json).
    assert_eq!(
        json_lines(&o.stderr).len(),
        String::from_utf8_lossy(&o.stderr).lines().count()
    );
}

#[test]
fn a_busy_source_port_names_the_os_reason() {
    let s = setup("busy-port");
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    peer_id_of_key(&s.dir.join("k"));
    let o = natpunch()
        .args(["-s", &s.server, "-i", "127.0.0.1", "-p", &port, "--key"])
        .arg(s.dir.join("k"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("cannot bind 127.0.0.1:{port}")) && err.contains("in use"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// A second listener with the same key takes the registration over; the
/// first says so, and is back (registered, reachable) soon after the
/// second leaves cleanly.
#[test]
fn a_listener_displaced_by_a_second_process_with_its_key_says_so_and_comes_back() {
    let s = setup("displaced");
    let first = s.listener(&["--keep-open"], Stdio::null(), Stdio::null());
    let mut second = start_listener(
        s.peer("b")
            .args(["--keep-open"])
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let wait_for = |l: &Listener, kind: &str, within: Duration| {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(e) = l.events.recv_timeout(Duration::from_millis(100)) {
                if e["event"] == kind {
                    return true;
                }
            }
        }
        false
    };
    assert!(wait_for(&first, "displaced", Duration::from_secs(5)));
    // The second leaves cleanly (Ctrl-C): the first registers again.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(second.proc.0.id() as libc::pid_t, libc::SIGINT) };
    let left = Instant::now();
    assert!(second.wait(Duration::from_secs(5)).is_some());
    assert!(wait_for(&first, "registered", Duration::from_secs(5)));
    let back = left.elapsed();
    eprintln!("the first listener is registered again {back:?} after the second left");
    // And it takes connections.
    let o = s
        .peer("a")
        .args(["-d", &first.id, "--once"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
