//! Fuzzes the TURN client's input from a server: datagrams (STUN answers,
//! Data indications, ChannelData) to a client that has an allocation, a
//! permission and a channel, and a byte stream cut into frames as the
//! TCP/TLS driver cuts it. Nothing may panic, and peer data is never
//! larger than its input.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use natpunch_proto::turn::{stream_frame_len, Client, Credentials, Transport};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let server: SocketAddr = "192.0.2.1:3478".parse().unwrap();
    let peer: SocketAddr = "203.0.113.9:7000".parse().unwrap();
    for transport in [Transport::Udp, Transport::Tcp] {
        let mut c = Client::new(server, transport, Credentials::new("u", "p"), now);
        c.permit(now, peer.ip());
        c.bind(now, peer);
        while c.poll_transmit().is_some() {}
        if transport == Transport::Udp {
            // Each input as one datagram, then split in two.
            for d in [data, &data[..data.len() / 2], &data[data.len() / 2..]] {
                if let Some(p) = c.handle_input(now, d) {
                    assert!(p.data.len() <= d.len());
                }
            }
        } else {
            let mut buf = data.to_vec();
            while let Ok(Some(len)) = stream_frame_len(&buf) {
                if buf.len() < len {
                    break;
                }
                let frame: Vec<u8> = buf.drain(..len).collect();
                if let Some(p) = c.handle_input(now, &frame) {
                    assert!(p.data.len() <= frame.len());
                }
            }
        }
        c.handle_timeout(now + Duration::from_secs(20));
        while c.poll_transmit().is_some() {}
        while c.poll_event().is_some() {}
    }
});
