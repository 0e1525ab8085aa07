//! `natpunch -s SERVER [-d PEER_ID]` on loopback: registration, a direct
//! connection, and every kind of bad input failing clearly.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::*;

fn key_dir(tag: &str) -> std::path::PathBuf {
    tempdir(tag)
}

#[test]
fn listen_and_connect_on_loopback_with_json_events() {
    let p = free_port_pair();
    let _server = start_natpunch_server(p);
    let server = format!("127.0.0.1:{p}");
    let dir = key_dir("peer");
    let mut listener = natpunch()
        .args(["-s", &server, "--json", "--once", "--rto-ms", "50", "--key"])
        .arg(dir.join("b"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(listener.stderr.take().unwrap()).lines();
    let id = loop {
        let l = lines.next().expect("listener output").unwrap();
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        if v["event"] == "registered" {
            break v["peer_id"].as_str().unwrap().to_string();
        }
    };
    let out = natpunch()
        .args([
            "-s", &server, "-d", &id, "--json", "--once", "--rto-ms", "50", "--key",
        ])
        .arg(dir.join("a"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    // A connector does not register: it only asks for an introduction.
    assert!(
        !kinds.contains(&"registered") && kinds.contains(&"attempt"),
        "{kinds:?}"
    );
    let c = events
        .iter()
        .find(|e| e["event"] == "connected")
        .expect("connected");
    assert_eq!(c["peer_id"], id.as_str());
    assert_eq!(c["path"], "direct");
    assert_eq!(c["transport"], "udp");
    assert!(c["remote"].as_str().unwrap().starts_with("127.0.0.1:"));
    for k in ["elapsed_ms", "probes_sent", "bytes_sent"] {
        assert!(c[k].is_u64(), "{k}: {c}");
    }
    assert_eq!(c["role"], "initiator");
    // stderr is pure JSON: every line parsed.
    assert_eq!(
        events.len(),
        String::from_utf8_lossy(&out.stderr).lines().count()
    );
    // The listener saw the same connection.
    let mut got = false;
    for l in lines.map_while(Result::ok) {
        if l.contains("\"connected\"") {
            got = true;
            break;
        }
    }
    assert!(got);
    let _ = listener.wait();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn malformed_peer_id_is_one_line_and_exit_2() {
    for bad in [
        "nonsense",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ] {
        let out = natpunch()
            .args(["-s", "127.0.0.1:9", "-d", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains("--dest"), "{err}");
    }
}

#[test]
fn unreachable_server_offline_peer_and_bad_keys_fail_clearly() {
    let dir = key_dir("bad");
    // Unreachable server: nothing listens on port 9.
    let out = natpunch()
        .args(["-s", "127.0.0.1:9", "--rto-ms", "20", "--key"])
        .arg(dir.join("k"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no answer"), "{err}");

    // Offline peer: a valid ID that never registered.
    let out = natpunch()
        .args(["id", "--key"])
        .arg(dir.join("never"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let offline = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(offline.len(), 55, "{offline}");
    let p = free_port_pair();
    let _server = start_natpunch_server(p);
    let out = natpunch()
        .args([
            "-s",
            &format!("127.0.0.1:{p}"),
            "-d",
            &offline,
            "--rto-ms",
            "50",
            "--key",
        ])
        .arg(dir.join("k2"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("offline"), "{err}");

    // Key file with bad permissions.
    let k = dir.join("open");
    std::fs::write(&k, format!("natpunch-ed25519-v1 {}\n", "ab".repeat(32))).unwrap();
    std::fs::set_permissions(&k, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = natpunch()
        .args(["-s", "127.0.0.1:9", "--key"])
        .arg(&k)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    // Key file with bad contents.
    let k = dir.join("junk");
    std::fs::write(&k, "hello\n").unwrap();
    std::fs::set_permissions(&k, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = natpunch()
        .args(["-s", "127.0.0.1:9", "--key"])
        .arg(&k)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
    let _ = std::fs::remove_dir_all(dir);
}
