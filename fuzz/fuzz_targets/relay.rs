//! Fuzzes the relay frame decoder, the relay's forwarding (a frame is
//! forwarded unchanged or dropped, never grown) and the stream decoder
//! that splits a TCP byte stream into records (bounded memory).
#![no_main]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use natpunch_proto::identity::{Identity, PeerId};
use natpunch_proto::relay::server::End;
use natpunch_proto::relay::stream::{Decoder, MAX_RECORD, RECORD_HEADER};
use natpunch_proto::relay::{decode, RelayConfig, RelayServer};

/// Key generation costs more than a run: done once.
fn peers() -> &'static [PeerId; 3] {
    static P: std::sync::OnceLock<[PeerId; 3]> = std::sync::OnceLock::new();
    P.get_or_init(|| [0u8, 1, 2].map(|s| Identity::from_seed([s; 32]).peer_id()))
}

fuzz_target!(|data: &[u8]| {
    let _ = decode(data);
    let now = Instant::now();
    let a: SocketAddr = "198.51.100.1:4000".parse().unwrap();
    let b: SocketAddr = "198.51.100.2:5000".parse().unwrap();
    let local: SocketAddr = "192.0.2.1:3478".parse().unwrap();
    let mut r = RelayServer::new(RelayConfig::default());
    let end = |seed: u8, addr| End {
        peer: peers()[usize::from(seed)],
        instance: u64::from(seed),
        addr,
        local,
    };
    // Channel 0x2C2C...: the number the fuzzer finds first from a
    // frame-looking input.
    let id = u64::from_be_bytes([0x2C; 8]);
    let _ = r.open(now, id, end(1, a), end(2, b));
    r.accept(id);
    let mut out = VecDeque::new();
    r.handle(now, a, data, &mut out);
    r.handle(now, "192.0.2.77:1".parse().unwrap(), data, &mut out);
    for o in out {
        assert_eq!(o.payload, data, "relayed frames are forwarded unchanged");
        assert_eq!(o.to, b);
    }
    let mut d = Decoder::new();
    for chunk in data.chunks(7) {
        d.push(chunk);
        loop {
            match d.next_record() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(d.buffered() <= MAX_RECORD + RECORD_HEADER + 7);
    }
});
