//! Interop with real third-party STUN peers from Debian: coturn
//! (turnserver, turnutils_stunclient, turnutils_natdiscovery) and the
//! classic stun-client. All on loopback (127.0.0.1 and 127.0.0.2).

mod common;

use common::*;

#[test]
fn natpunch_nat_against_coturn_reports_open_internet() {
    if !require_tool("turnserver", "coturn") {
        return;
    }
    let p = free_port_pair();
    let dir = tempdir("coturn");
    let _coturn = start_coturn(p, &dir);
    let out = natpunch()
        .args([
            "nat",
            "-H",
            &format!("127.0.0.1:{p}"),
            "-i",
            "127.0.0.1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["mapped"], v["local"], "{v}");
    assert!(v["mapped"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(v["classic"], "open-internet", "{v}");
    assert_eq!(v["mapping"], "endpoint-independent");
    assert_eq!(v["filtering"], "endpoint-independent");
    assert_eq!(v["other_address"], format!("127.0.0.2:{}", p + 1));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn natpunch_stun_over_tcp_against_coturn() {
    if !require_tool("turnserver", "coturn") {
        return;
    }
    let p = free_port_pair();
    let dir = tempdir("coturn-tcp");
    let _coturn = start_coturn(p, &dir);
    let out = natpunch()
        .args(["stun", "--tcp", "-H", &format!("127.0.0.1:{p}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("127.0.0.1:"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn turnutils_stunclient_reads_our_other_address_and_response_origin() {
    if !require_tool("turnutils_stunclient", "coturn") {
        return;
    }
    let p = free_port_pair();
    let _server = start_natpunch_server(p);
    let out = run_with_timeout(
        std::process::Command::new("turnutils_stunclient").args([
            "-p",
            &p.to_string(),
            "127.0.0.1",
        ]),
        20,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    // Response 1: the primary answered and named the other address.
    assert!(
        text.contains(&format!("Response origin: : 127.0.0.1:{p}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("Other addr: : 127.0.0.2:{}", p + 1)),
        "{text}"
    );
    // Responses 2 and 3 asked for a change of IP and port (response 2 via
    // RESPONSE-PORT): they must come from the alternate address.
    assert!(
        text.contains(&format!("Response origin: : 127.0.0.2:{}", p + 1)),
        "{text}"
    );
    assert!(text.contains("RFC 5780 response 3"), "{text}");
}

#[test]
fn turnutils_natdiscovery_measures_our_server() {
    if !require_tool("turnutils_natdiscovery", "coturn") {
        return;
    }
    let p = free_port_pair();
    let _server = start_natpunch_server(p);
    let out = run_with_timeout(
        std::process::Command::new("turnutils_natdiscovery").args([
            "-m",
            "-f",
            "-p",
            &p.to_string(),
            "127.0.0.1",
        ]),
        30,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("timeout"), "{text}");
    assert!(text.contains("Endpoint Independent Mapping"), "{text}");
    assert!(
        text.contains("NAT with Endpoint Independent Filtering!"),
        "{text}"
    );
    // Mapping test II went to OTHER-ADDRESS's IP on the primary port.
    assert!(
        text.contains(&format!("Response origin: : 127.0.0.2:{p}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("Other addr: : 127.0.0.1:{}", p + 1)),
        "{text}"
    );
    // Filtering test II (CHANGE-REQUEST ip+port) came from the alternate.
    assert!(
        text.contains(&format!("Response origin: : 127.0.0.2:{}", p + 1)),
        "{text}"
    );
}

#[test]
fn classic_stun_client_gets_rfc3489_answers() {
    if !require_tool("stun", "stun-client") {
        return;
    }
    let p = free_port_pair();
    let _server = start_natpunch_server(p);
    let out = run_with_timeout(
        std::process::Command::new("stun").args([&format!("127.0.0.1:{p}"), "-v"]),
        20,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("Primary: Open"), "{stdout}\n{stderr}");
    // stun-client encodes the NAT type in bits 1..3 of its exit code
    // (0 = open); bit 0 is "port preserved", bit 4 "no hairpin".
    let code = out.status.code().expect("exited");
    assert_eq!(code & 0x0e, 0, "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("ChangedAddress = 127.0.0.2:{}", p + 1)),
        "{stderr}"
    );
    assert!(stderr.contains("SourceAddress = 127.0.0.2:"), "{stderr}");
}
