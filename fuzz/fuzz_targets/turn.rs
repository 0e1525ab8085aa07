//! Fuzzes the TURN client's input from a server: datagrams (STUN answers,
//! Data indications, ChannelData) to a client that holds an allocation, a
//! permission and a channel (made first against a scripted server, with
//! the challenge and integrity a real one uses), and a byte stream cut
//! into frames as the TCP/TLS driver cuts it. Nothing may panic, and peer
//! data is never larger than its input.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use natpunch_proto::stun::message::{xor_address_value, Encoder, Integrity};
use natpunch_proto::stun::{Attribute, Class, Message};
use natpunch_proto::turn::{attr, method, stream_frame_len, Client, Credentials, Event, Transport};

const REALM: &str = "fuzz.test";

fn creds() -> Credentials {
    Credentials::new("u", "p")
}

/// A scripted server's answer to one of the client's requests: the 401
/// challenge to an unauthenticated one, else success (with the relayed
/// address and lifetime for an Allocate), integrity-protected.
fn answer(request: &[u8]) -> Option<Vec<u8>> {
    let req = Message::decode(request).ok()?;
    if req.class != Class::Request {
        return None;
    }
    let tid = req.transaction;
    if req
        .get(natpunch_proto::stun::message::attr::USERNAME)
        .is_none()
    {
        return Some(
            Message::new(Class::Error, req.method, tid)
                .with(Attribute::ErrorCode {
                    code: 401,
                    reason: "Unauthorized".into(),
                })
                .with(Attribute::Unknown {
                    kind: attr::REALM,
                    value: REALM.as_bytes().to_vec(),
                })
                .with(Attribute::Unknown {
                    kind: attr::NONCE,
                    value: b"nonce".to_vec(),
                })
                .to_bytes(),
        );
    }
    let mut ok = Message::new(Class::Success, req.method, tid);
    if req.method == method::ALLOCATE {
        let relayed: SocketAddr = "192.0.2.1:50000".parse().ok()?;
        ok = ok
            .with(Attribute::Unknown {
                kind: attr::XOR_RELAYED_ADDRESS,
                value: xor_address_value(&relayed, &tid),
            })
            .with(Attribute::Unknown {
                kind: attr::LIFETIME,
                value: 600u32.to_be_bytes().to_vec(),
            });
    }
    let key = creds().key(REALM);
    let mut out = Vec::new();
    Encoder {
        integrity: Some((Integrity::Sha1, &key)),
        fingerprint: false,
    }
    .encode(&ok, &mut out);
    Some(out)
}

/// A client with an allocation, a permission for `peer` and a channel to
/// it, as the scripted server grants them.
fn ready(server: SocketAddr, transport: Transport, peer: SocketAddr, now: Instant) -> Client {
    let mut c = Client::new(server, transport, creds(), now);
    let (mut allocated, mut bound) = (false, false);
    for _ in 0..8 {
        let sent: Vec<Vec<u8>> = std::iter::from_fn(|| c.poll_transmit()).collect();
        for s in sent {
            if let Some(a) = answer(&s) {
                c.handle_input(now, &a);
            }
        }
        while let Some(e) = c.poll_event() {
            match e {
                Event::Allocated { .. } => {
                    allocated = true;
                    c.permit(now, peer.ip());
                    c.bind(now, peer);
                }
                Event::ChannelBound { .. } => bound = true,
                _ => {}
            }
        }
    }
    // The fuzzed input must meet the allocated state, not the challenge.
    assert!(
        allocated && bound,
        "the scripted server did not set the client up"
    );
    c
}

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let server: SocketAddr = "192.0.2.1:3478".parse().unwrap();
    let peer: SocketAddr = "203.0.113.9:7000".parse().unwrap();
    for transport in [Transport::Udp, Transport::Tcp] {
        let mut c = ready(server, transport, peer, now);
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
