//! The rendezvous server machine: key-bound registration, address cookies,
//! introductions, and its refusals.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natpunch_proto::identity::Identity;
use natpunch_proto::rendezvous::wire::{self, context, Cookie, ErrorCode, Frame, Offer, PeerInfo};
use natpunch_proto::rendezvous::RendezvousServer;

const LOCAL: &str = "192.0.2.1:3478";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Sends `frame` from `from`, returns the replies (destination, frame) and
/// checks that no reply to an unverified source is larger than its request.
fn ask(s: &mut RendezvousServer, now: Instant, from: &str, raw: &[u8]) -> Vec<(SocketAddr, Frame)> {
    s.handle(now, addr(LOCAL), addr(from), raw);
    let mut v = Vec::new();
    while let Some(o) = s.poll_transmit() {
        let f = wire::decode(&o.payload).expect("server frames decode");
        if matches!(f, Frame::Challenge { .. } | Frame::Error { .. }) {
            assert!(
                o.payload.len() <= raw.len(),
                "unverified reply larger than request: {f:?}"
            );
        }
        v.push((o.to, f));
    }
    v
}

fn signed(id: &Identity, mut f: Frame) -> Vec<u8> {
    let sig = id.sign(context::FRAME, &wire::signed_bytes(&f)).to_vec();
    match &mut f {
        Frame::Register { sig: s, .. }
        | Frame::Connect { sig: s, .. }
        | Frame::Accept { sig: s, .. }
        | Frame::Decline { sig: s, .. } => *s = sig,
        _ => {}
    }
    wire::encode(&f)
}

fn cookie(s: &mut RendezvousServer, now: Instant, id: &Identity, from: &str) -> Cookie {
    let r = ask(
        s,
        now,
        from,
        &wire::encode(&Frame::Hello { peer: id.peer_id() }),
    );
    match r.as_slice() {
        [(_, Frame::Challenge { cookie })] => *cookie,
        other => panic!("{other:?}"),
    }
}

fn register(
    s: &mut RendezvousServer,
    now: Instant,
    id: &Identity,
    from: &str,
) -> Vec<(SocketAddr, Frame)> {
    let c = cookie(s, now, id, from);
    let f = Frame::Register {
        peer: id.peer_id(),
        cookie: c,
        info: PeerInfo::default(),
        sig: vec![],
    };
    ask(s, now, from, &signed(id, f))
}

fn offer() -> Offer {
    Offer {
        ephemeral: [5; 32],
        sig: vec![0; 64],
    }
}

#[test]
fn registration_records_the_observed_address() {
    let mut s = RendezvousServer::new([1; 32]);
    let now = Instant::now();
    let a = Identity::from_seed([1; 32]);
    let r = register(&mut s, now, &a, "198.51.100.7:4000");
    assert_eq!(
        r,
        vec![(
            addr("198.51.100.7:4000"),
            Frame::Registered {
                observed: addr("198.51.100.7:4000"),
                expires_s: 75
            }
        )]
    );
    assert_eq!(s.registered(), 1);
}

#[test]
fn nobody_registers_without_the_key_or_from_another_address() {
    let mut s = RendezvousServer::new([1; 32]);
    let now = Instant::now();
    let a = Identity::from_seed([1; 32]);
    let mallory = Identity::from_seed([9; 32]);
    // Signed by the wrong key.
    let c = cookie(&mut s, now, &a, "198.51.100.7:4000");
    let f = Frame::Register {
        peer: a.peer_id(),
        cookie: c,
        info: PeerInfo::default(),
        sig: vec![],
    };
    let r = ask(
        &mut s,
        now,
        "198.51.100.7:4000",
        &signed(&mallory, f.clone()),
    );
    assert!(
        matches!(
            r.as_slice(),
            [(
                _,
                Frame::Error {
                    code: ErrorCode::BadSignature,
                    ..
                }
            )]
        ),
        "{r:?}"
    );
    // A cookie issued to another address (spoofed source).
    let r = ask(&mut s, now, "203.0.113.66:1", &signed(&a, f));
    assert!(
        matches!(
            r.as_slice(),
            [(
                _,
                Frame::Error {
                    code: ErrorCode::BadCookie,
                    ..
                }
            )]
        ),
        "{r:?}"
    );
    // An expired cookie.
    let c = cookie(&mut s, now, &a, "198.51.100.7:4000");
    let f = Frame::Register {
        peer: a.peer_id(),
        cookie: c,
        info: PeerInfo::default(),
        sig: vec![],
    };
    let r = ask(
        &mut s,
        now + Duration::from_secs(600),
        "198.51.100.7:4000",
        &signed(&a, f),
    );
    assert!(
        matches!(
            r.as_slice(),
            [(
                _,
                Frame::Error {
                    code: ErrorCode::BadCookie,
                    ..
                }
            )]
        ),
        "{r:?}"
    );
    assert_eq!(s.registered(), 0);
}

#[test]
fn introductions_reach_both_sides_and_offline_is_an_error() {
    let mut s = RendezvousServer::new([1; 32]);
    let now = Instant::now();
    let (a, b, c) = (
        Identity::from_seed([1; 32]),
        Identity::from_seed([2; 32]),
        Identity::from_seed([3; 32]),
    );
    register(&mut s, now, &a, "198.51.100.7:4000");
    register(&mut s, now, &b, "198.51.100.8:5000");
    let ck = cookie(&mut s, now, &a, "198.51.100.7:4000");
    let connect = |target| Frame::Connect {
        peer: a.peer_id(),
        target,
        cookie: ck,
        session: 7,
        offer: offer(),
        fresh: None,
        sig: vec![],
    };
    let r = ask(
        &mut s,
        now,
        "198.51.100.7:4000",
        &signed(&a, connect(b.peer_id())),
    );
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(
        matches!(&r[0], (to, Frame::Peer { observed, .. }) if *to == addr("198.51.100.7:4000") && *observed == addr("198.51.100.8:5000"))
    );
    assert!(
        matches!(&r[1], (to, Frame::Incoming { observed, .. }) if *to == addr("198.51.100.8:5000") && *observed == addr("198.51.100.7:4000"))
    );
    // C never registered.
    let mut f = connect(c.peer_id());
    if let Frame::Connect { session, .. } = &mut f {
        *session = 8;
    }
    let r = ask(&mut s, now, "198.51.100.7:4000", &signed(&a, f));
    assert!(
        matches!(
            r.as_slice(),
            [(
                _,
                Frame::Error {
                    code: ErrorCode::PeerOffline,
                    session: Some(8)
                }
            )]
        ),
        "{r:?}"
    );
    // B accepts: A hears the answer, B gets Go.
    let ckb = cookie(&mut s, now, &b, "198.51.100.8:5000");
    let acc = Frame::Accept {
        peer: b.peer_id(),
        cookie: ckb,
        session: 7,
        offer: offer(),
        fresh: Some(addr("198.51.100.8:5002")),
        sig: vec![],
    };
    let r = ask(&mut s, now, "198.51.100.8:5000", &signed(&b, acc));
    assert!(
        matches!(&r[0], (_, Frame::Accepted { fresh: Some(_), .. })),
        "{r:?}"
    );
    assert!(matches!(&r[1], (_, Frame::Go { session: 7, .. })), "{r:?}");
}

#[test]
fn unknown_version_and_garbage_are_rejected_cleanly() {
    let mut s = RendezvousServer::new([1; 32]);
    let now = Instant::now();
    let r = ask(
        &mut s,
        now,
        "198.51.100.7:4000",
        &[wire::MAGIC, 9, 0, 0, 0, 0, 0, 0],
    );
    assert!(
        matches!(
            r.as_slice(),
            [(
                _,
                Frame::Error {
                    code: ErrorCode::UnsupportedVersion,
                    ..
                }
            )]
        ),
        "{r:?}"
    );
    // Too short to carry even the error: nothing is sent (no amplification).
    assert!(ask(&mut s, now, "198.51.100.7:4000", &[wire::MAGIC, 9]).is_empty());
    assert!(ask(
        &mut s,
        now,
        "198.51.100.7:4000",
        &[wire::MAGIC, 1, 0xff, 0xff, 0xff]
    )
    .is_empty());
    assert_eq!(s.stats().malformed, 1);
    assert_eq!(s.stats().amplification_dropped, 1);
}

#[test]
fn a_flood_from_one_source_is_rate_limited() {
    let mut s = RendezvousServer::new([1; 32]);
    let now = Instant::now();
    let a = Identity::from_seed([1; 32]);
    let hello = wire::encode(&Frame::Hello { peer: a.peer_id() });
    let answered = (0..1000)
        .filter(|_| !ask(&mut s, now, "198.51.100.7:4000", &hello).is_empty())
        .count();
    assert!(answered <= 40, "{answered}");
}

#[test]
fn a_retransmitted_connect_is_answered_again_and_a_decline_reaches_the_initiator() {
    let mut s = RendezvousServer::new([1; 32]);
    let now = Instant::now();
    let (a, b, mallory) = (
        Identity::from_seed([1; 32]),
        Identity::from_seed([2; 32]),
        Identity::from_seed([9; 32]),
    );
    register(&mut s, now, &a, "198.51.100.7:4000");
    register(&mut s, now, &b, "198.51.100.8:5000");
    let ck = cookie(&mut s, now, &a, "198.51.100.7:4000");
    let connect = signed(
        &a,
        Frame::Connect {
            peer: a.peer_id(),
            target: b.peer_id(),
            cookie: ck,
            session: 11,
            offer: offer(),
            fresh: None,
            sig: vec![],
        },
    );
    let first = ask(&mut s, now, "198.51.100.7:4000", &connect);
    // The Peer answer was lost: the same Connect again gets it again.
    let again = ask(&mut s, now, "198.51.100.7:4000", &connect);
    assert_eq!(again.len(), 2, "{again:?}");
    assert!(
        matches!(&again[0], (_, Frame::Peer { session: 11, .. })),
        "{again:?}"
    );
    assert_eq!(first.len(), again.len());
    // Only the target may decline, with its key.
    let ckm = cookie(&mut s, now, &mallory, "198.51.100.9:6000");
    let forged = Frame::Decline {
        peer: mallory.peer_id(),
        cookie: ckm,
        session: 11,
        sig: vec![],
    };
    let r = ask(&mut s, now, "198.51.100.9:6000", &signed(&mallory, forged));
    assert!(
        matches!(
            r.as_slice(),
            [(
                _,
                Frame::Error {
                    code: ErrorCode::NoSession,
                    ..
                }
            )]
        ),
        "{r:?}"
    );
    let ckb = cookie(&mut s, now, &b, "198.51.100.8:5000");
    let decline = Frame::Decline {
        peer: b.peer_id(),
        cookie: ckb,
        session: 11,
        sig: vec![],
    };
    let r = ask(&mut s, now, "198.51.100.8:5000", &signed(&b, decline));
    let declined = |to: &str| {
        r.iter().any(|(t, f)| {
            *t == addr(to)
                && matches!(
                    f,
                    Frame::Error {
                        code: ErrorCode::Declined,
                        session: Some(11)
                    }
                )
        })
    };
    assert!(declined("198.51.100.7:4000"), "A is told: {r:?}");
    assert!(
        declined("198.51.100.8:5000"),
        "B gets its acknowledgement: {r:?}"
    );
    // A late copy of A's Connect is not introduced again: it is declined.
    let late = ask(&mut s, now, "198.51.100.7:4000", &connect);
    assert!(
        matches!(
            late.as_slice(),
            [(
                _,
                Frame::Error {
                    code: ErrorCode::Declined,
                    session: Some(11)
                }
            )]
        ),
        "{late:?}"
    );
    // A repeated Decline is acknowledged again; A is not told twice.
    let ckb = cookie(&mut s, now, &b, "198.51.100.8:5000");
    let again = Frame::Decline {
        peer: b.peer_id(),
        cookie: ckb,
        session: 11,
        sig: vec![],
    };
    let r2 = ask(&mut s, now, "198.51.100.8:5000", &signed(&b, again));
    assert!(
        matches!(r2.as_slice(), [(to, Frame::Error { code: ErrorCode::Declined, .. })] if *to == addr("198.51.100.8:5000")),
        "{r2:?}"
    );
    // The session is gone: an Accept for it now fails.
    let ckb = cookie(&mut s, now, &b, "198.51.100.8:5000");
    let acc = Frame::Accept {
        peer: b.peer_id(),
        cookie: ckb,
        session: 11,
        offer: offer(),
        fresh: None,
        sig: vec![],
    };
    let r = ask(&mut s, now, "198.51.100.8:5000", &signed(&b, acc));
    assert!(
        matches!(
            r.as_slice(),
            [(
                _,
                Frame::Error {
                    code: ErrorCode::NoSession,
                    ..
                }
            )]
        ),
        "{r:?}"
    );
}
