//! The NAT lab, for real: Linux NATs (nftables) in network namespaces.
//! Needs root; in CI (CI=true) a missing capability fails loudly, elsewhere
//! the tests skip with a loud message.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Whether this machine can run the lab; see the module doc.
fn lab_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc_geteuid() } == 0;
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

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Namespaces whose name starts with `prefix`.
fn namespaces_with(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

#[test]
fn verify_passes_for_every_preset_double_shared_and_same_nat() {
    if !lab_available() {
        return;
    }
    let out = natpunch()
        .args(["lab", "verify", "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let checks: Vec<&serde_json::Value> =
        lines.iter().filter(|v| v.get("host").is_some()).collect();
    for c in &checks {
        assert_eq!(c["ok"], true, "{c}");
    }
    // 7 presets + delta 2 + double NAT + direct + shared carrier (2) + same NAT (2).
    assert_eq!(checks.len(), 14, "{text}");
    let hosts: Vec<&str> = checks.iter().filter_map(|c| c["host"].as_str()).collect();
    for p in [
        "full-cone",
        "restricted-cone",
        "port-restricted-cone",
        "address-dependent",
        "symmetric-sequential",
        "symmetric-random",
        "linux",
    ] {
        assert!(hosts.contains(&p), "{p} verified");
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn grid_over_eight_pairs_with_delay_writes_json_and_picture() {
    if !lab_available() {
        return;
    }
    let dir = tempdir("grid");
    let svg = dir.join("grid.svg");
    let pairs = [
        "full-cone/full-cone",
        "full-cone/restricted-cone",
        "restricted-cone/port-restricted-cone",
        "port-restricted-cone/symmetric-sequential",
        "symmetric-sequential/symmetric-sequential:delta=2",
        "symmetric-random/full-cone",
        "address-dependent/linux",
        "full-cone+port-restricted-cone/direct",
    ]
    .join(",");
    let out = natpunch()
        .args([
            "lab",
            "grid",
            "--json",
            "--delay-ms",
            "20",
            "--pairs",
            &pairs,
            "--svg",
        ])
        .arg(&svg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let pairs_run: Vec<&serde_json::Value> =
        rows.iter().filter(|r| r.get("outcome").is_some()).collect();
    assert_eq!(pairs_run.len(), 8, "{text}");
    for r in &pairs_run {
        assert_eq!(r["outcome"], "pass", "{r}");
        // 20 ms each way on both access links: discovery takes several RTTs.
        assert!(r["elapsed_ms"].as_u64().unwrap() >= 200, "{r}");
    }
    let picture = std::fs::read_to_string(&svg).expect("svg written");
    assert!(picture.starts_with("<svg"));
    assert_eq!(
        picture.matches("fill=\"#3aa655\"").count(),
        8 + 1,
        "eight green cells and the legend"
    );
    assert!(out.status.success());
    let _ = std::fs::remove_dir_all(dir);
}

fn start_lab_up() -> (std::process::Child, String) {
    let mut child = natpunch()
        .args(["lab", "up", "--a", "full-cone", "--b", "symmetric-random"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a line").unwrap();
    let prefix = first
        .split_whitespace()
        .nth(1)
        .expect("lab NAME is up")
        .to_string();
    assert!(first.contains("is up"), "{first}");
    assert!(!namespaces_with(&prefix).is_empty());
    (child, prefix)
}

fn wait_gone(prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if namespaces_with(prefix).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("namespaces left behind: {:?}", namespaces_with(prefix));
}

#[test]
fn teardown_on_ctrl_c_and_even_on_sigkill() {
    if !lab_available() {
        return;
    }
    for signal in ["-INT", "-KILL"] {
        let (mut child, prefix) = start_lab_up();
        assert!(Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap()
            .success());
        let _ = child.wait();
        // With SIGKILL only the reaper can clean up.
        wait_gone(&prefix);
    }
}

#[test]
fn non_root_is_refused_with_one_line() {
    if !lab_available() || !require_tool("setpriv", "util-linux") {
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_natpunch"))
        .args(["lab", "verify"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("needs root"), "{err}");
}
