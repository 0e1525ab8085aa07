//! Fuzzes the punch frame decoder and its MAC check, and the connection
//! core that receives punch frames from anywhere.
#![no_main]

use std::net::SocketAddr;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use natpunch_proto::coordinator::{Host, HostConfig, Policy};
use natpunch_proto::identity::Identity;
use natpunch_proto::punch::{wire, PunchConfig};
use natpunch_proto::SocketId;

/// Key generation costs more than a run: done once.
fn identity() -> &'static Identity {
    static ID: std::sync::OnceLock<Identity> = std::sync::OnceLock::new();
    ID.get_or_init(|| Identity::from_seed([4; 32]))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = wire::decode(data) {
        // A random MAC must not verify (16 bytes: 2^-128).
        let _ = wire::verify_mac(&frame, data, &[9; 32]);
        assert_eq!(wire::session_of(data), Some(frame.session));
    }
    let now = Instant::now();
    let server: SocketAddr = "192.0.2.1:3478".parse().unwrap();
    let mut host = Host::new(HostConfig {
        identity: identity().clone(),
        instance: 1,
        server,
        stun: server,
        local: "10.0.0.2:4000".parse().unwrap(),
        policy: Policy::default(),
        punch: PunchConfig::new(1),
        ttl: None,
        seed: 1,
        server_memo: None,
        relay: true,
        portmap: false,
        tcp: natpunch_proto::coordinator::TcpMode::Off,
        turn: 0,
    });
    host.handle_datagram(now, SocketId(0), "198.51.100.9:777".parse().unwrap(), data);
    host.handle_datagram(now, SocketId(3), "198.51.100.9:777".parse().unwrap(), data);
    while host.poll_transmit().is_some() {}
});
