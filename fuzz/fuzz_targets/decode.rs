//! Fuzzes the STUN decoder, and everything that consumes raw datagrams:
//! the server (which must drop, count and never panic) and the client.
#![no_main]

use std::net::SocketAddr;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use natpunch_proto::stun::message::{verify_integrity, Message};
use natpunch_proto::stun::server::{Server, ServerConfig, Transport, DEFAULT_RATE_LIMIT};
use natpunch_proto::stun::transaction::Client;
use natpunch_proto::SocketId;

fuzz_target!(|data: &[u8]| {
    if let Ok((msg, offsets)) = Message::decode_with_offsets(data) {
        let _ = verify_integrity(data, offsets, b"key");
        // What decodes must re-encode to something that decodes the same.
        let again = Message::decode(&msg.to_bytes()).expect("re-encoding decodes");
        assert_eq!(again, msg);
    }
    let primary: SocketAddr = "192.0.2.1:3478".parse().unwrap();
    let mut server = Server::new(ServerConfig {
        primary,
        alternate: Some("192.0.2.2:3479".parse().unwrap()),
        software: None,
        rate_limit: DEFAULT_RATE_LIMIT,
    });
    let mut out = Vec::new();
    let from: SocketAddr = "203.0.113.1:5000".parse().unwrap();
    let now = Instant::now();
    if server
        .handle(now, Transport::Udp, primary, from, data, &mut out)
        .is_some()
    {
        Message::decode(&out).expect("server output decodes");
    }
    let mut client = Client::new();
    client.handle_input(now, SocketId(0), from, data);
});
