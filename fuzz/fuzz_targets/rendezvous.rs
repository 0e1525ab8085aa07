//! Fuzzes the rendezvous frame decoder and everything that takes raw
//! rendezvous datagrams: the server (with its relay) and the connection
//! core (its rendezvous client, punch and STUN paths). None may panic;
//! what decodes must re-encode to the same frame.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use natpunch_proto::coordinator::{Host, HostConfig, Policy};
use natpunch_proto::identity::Identity;
use natpunch_proto::punch::PunchConfig;
use natpunch_proto::rendezvous::{wire, RendezvousServer};
use natpunch_proto::SocketId;

/// Key generation costs more than a run: done once.
fn identity() -> &'static Identity {
    static ID: std::sync::OnceLock<Identity> = std::sync::OnceLock::new();
    ID.get_or_init(|| Identity::from_seed([3; 32]))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = wire::decode(data) {
        let again = wire::decode(&wire::encode(&frame)).expect("re-encoding decodes");
        assert_eq!(again, frame);
    }
    let now = Instant::now();
    let local: SocketAddr = "192.0.2.1:3478".parse().unwrap();
    let from: SocketAddr = "203.0.113.1:5000".parse().unwrap();
    let mut server = RendezvousServer::new([7; 32]);
    server.handle(now, local, from, data);
    server.handle_relay(now, from, data);
    while let Some(o) = server.poll_transmit() {
        // Nothing unverified is answered with more than it sent.
        assert!(o.payload.len() <= data.len().max(1), "amplification");
    }
    let mut host = Host::new(HostConfig {
        identity: identity().clone(),
        instance: 1,
        server: local,
        stun: local,
        local: "10.0.0.2:4000".parse().unwrap(),
        policy: Policy {
            accept: true,
            allow: None,
        },
        punch: PunchConfig::new(1),
        ttl: None,
        seed: 1,
        server_memo: None,
        relay: true,
        portmap: false,
        tcp: natpunch_proto::coordinator::TcpMode::Off,
        turn: 0,
    });
    host.start(now);
    host.handle_datagram(now, SocketId(0), local, data);
    host.handle_datagram(now, SocketId(0), from, data);
    host.handle_timeout(now + Duration::from_secs(1));
    while host.poll_transmit().is_some() {}
    while host.poll_event().is_some() {}
});
