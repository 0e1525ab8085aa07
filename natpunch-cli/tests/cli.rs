//! End-to-end tests of the natpunch binary on loopback: the demo, the
//! report's JSON contract, the server's hygiene, and error handling.

mod common;

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn demo_prints_open_internet_report() {
    let out = natpunch()
        .args(["demo", "--json", "--loopback"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["classic"], "open-internet");
    assert_eq!(v["hairpin"], true);
    assert_eq!(v["allocation"]["kind"], "preserving");
    assert!(v["allocation"]["delta"].is_null());
}

#[test]
fn nat_json_has_exactly_the_documented_shapes() {
    let p = free_port_pair();
    let _server = start_natpunch_server(p);
    let out = natpunch()
        .args([
            "nat",
            "-H",
            &format!("127.0.0.1:{p}"),
            "--json",
            "-i",
            "127.0.0.1",
            "-p",
            "0",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "one object on one line");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let behaviours = [
        "endpoint-independent",
        "address-dependent",
        "address-and-port-dependent",
    ];
    assert!(v["mapped"]
        .as_str()
        .unwrap()
        .parse::<std::net::SocketAddr>()
        .is_ok());
    assert!(behaviours.contains(&v["mapping"].as_str().unwrap()));
    assert!(behaviours.contains(&v["filtering"].as_str().unwrap()));
    assert!(
        ["preserving", "sequential", "random"].contains(&v["allocation"]["kind"].as_str().unwrap())
    );
    assert!(v["allocation"]["delta"].is_null() || v["allocation"]["delta"].is_i64());
    assert!(v["hairpin"].is_boolean() || v["hairpin"].is_null());
    assert!(v["classic"].is_string());
}

#[test]
fn human_report_is_aligned() {
    let p = free_port_pair();
    let _server = start_natpunch_server(p);
    let out = natpunch()
        .args(["nat", "-H", &format!("127.0.0.1:{p}")])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let cols: Vec<usize> = text
        .lines()
        .skip(1)
        .filter(|l| !l.trim_start().starts_with("note:"))
        .map(|l| {
            l.find("  ")
                .and_then(|i| l[i..].find(|c: char| c != ' ').map(|j| i + j))
                .unwrap_or(0)
        })
        .collect();
    assert!(cols.len() >= 8, "{text}");
    assert!(
        cols.iter().all(|c| *c == cols[0]),
        "values start in one column:\n{text}"
    );
    assert!(text.contains("classic type"), "{text}");
}

#[test]
fn misuse_is_one_line_and_exit_2() {
    for args in [
        vec!["nat"],
        vec!["nat", "-H", "x", "--bogus"],
        vec!["server", "--listen", "nope"],
        vec!["nat", "-H", "x", "-p", "70000"],
    ] {
        let out = natpunch().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("natpunch: "), "{err}");
    }
}

#[test]
fn unreachable_server_and_dns_failure_are_clear_errors() {
    // Nothing listens on the discard port of 127.0.0.1.
    let out = natpunch()
        .args(["nat", "-H", "127.0.0.1:9", "--rto-ms", "20"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no answer from 127.0.0.1:9"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    let out = natpunch()
        .args(["nat", "-H", "no-such-host.invalid"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot resolve no-such-host.invalid"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn server_drops_garbage_keeps_serving_and_exits_cleanly_on_sigterm() {
    let p = free_port_pair();
    let mut child = natpunch()
        .args(["server", "--listen", &format!("127.0.0.1:{p}"), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "listening");
    let server = format!("127.0.0.1:{p}");
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for junk in [
        &b"hello"[..],
        &[0u8; 19],
        &[
            0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    ] {
        s.send_to(junk, &server).unwrap();
    }
    // A CHANGE-REQUEST without --alt gets 420 (RFC 5780 §6.1).
    let mut req = vec![0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42];
    req.extend_from_slice(&[7; 12]);
    req.extend_from_slice(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 6]);
    s.send_to(&req, &server).unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = s.recv_from(&mut buf).expect("420 answer");
    assert_eq!(&buf[..2], &[0x01, 0x11], "error class");
    let code_at = buf[20..n]
        .windows(2)
        .position(|w| w == [0x00, 0x09])
        .expect("ERROR-CODE")
        + 20;
    assert_eq!(buf[code_at + 6], 4);
    assert_eq!(buf[code_at + 7], 20);
    // SIGTERM: clean exit with the counters.
    let status = Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let stopped: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(stopped["event"], "stopped");
    assert_eq!(stopped["malformed"], 3);
    assert_eq!(stopped["errors_sent"], 1);
    assert!(child.wait().unwrap().success());
}

#[test]
fn stun_over_udp_and_tcp_against_our_server() {
    let p = free_port_pair();
    let _server = start_natpunch_server(p);
    for tcp in [false, true] {
        let mut args = vec![
            "stun".to_string(),
            "-H".into(),
            format!("127.0.0.1:{p}"),
            "--json".into(),
        ];
        if tcp {
            args.push("--tcp".into());
        }
        let out = natpunch().args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v["mapped"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
}

/// Each subcommand offers only what it does.
#[test]
fn help_matches_what_each_side_accepts() {
    let help = |args: &[&str]| {
        let o = natpunch().args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let listen = help(&["listen", "--help"]);
    assert!(
        !listen.contains("--dest") && !listen.contains("--forward") && !listen.contains("--to "),
        "{listen}"
    );
    assert!(
        listen.contains("--expose") && listen.contains("--allow") && listen.contains("--keep-open")
    );
    let connect = help(&["connect", "--help"]);
    for flag in ["--dest", "--keep-open", "--expose", "--allow"] {
        assert!(!connect.contains(flag), "connect offers {flag}: {connect}");
    }
    assert!(connect.contains("<PEER_ID>") && connect.contains("--forward"));
    let top = help(&["--help"]);
    assert!(
        top.contains("-s SERVER -d PEER_ID") && top.contains("Peer mode"),
        "{top}"
    );
    // The first line, which `-h` shows too, names peer mode first.
    let short = help(&["-h"]);
    let first = short.lines().next().unwrap_or_default();
    assert!(
        first.contains("peers") && first.contains("connect"),
        "{first}"
    );
    for sub in [&["nat", "--help"][..], &["listen", "--help"][..]] {
        assert!(help(sub).contains("-H, --stun"), "{sub:?}");
    }
}
