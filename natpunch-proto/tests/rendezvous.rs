//! The rendezvous server machine: key-bound registration, address cookies,
//! introductions whose facts arrive late, the start of prediction,
//! heartbeats, a second process with one key, limits, and its refusals.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natpunch_proto::identity::Identity;
use natpunch_proto::portmap::{MapProtocol, Mapped};
use natpunch_proto::rendezvous::server::{Limits, COOKIE_LIFETIME, INCOMING_REPEAT, TARGET_LIMIT};
use natpunch_proto::rendezvous::wire::{
    self, context, Cookie, DeclineReason, ErrorCode, Frame, NatSummary, Offer, PeerInfo, RegStatus,
};
use natpunch_proto::rendezvous::RendezvousServer;

const LOCAL: &str = "192.0.2.1:3478";
const A: &str = "198.51.100.7:4000";
const B: &str = "198.51.100.8:5000";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Sends `raw` from `from`; the replies (destination, frame). Checks that
/// no reply to an unverified request is larger than the request.
fn ask(s: &mut RendezvousServer, now: Instant, from: &str, raw: &[u8]) -> Vec<(SocketAddr, Frame)> {
    s.handle(now, addr(LOCAL), addr(from), raw);
    let mut v = Vec::new();
    while let Some(o) = s.poll_transmit() {
        let f = wire::decode(&o.payload).expect("server frames decode");
        if o.to == addr(from) && matches!(f, Frame::Challenge { .. } | Frame::Error { .. }) {
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
    if let Some(s) = f.sig_mut() {
        *s = sig;
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

fn register_as(
    s: &mut RendezvousServer,
    now: Instant,
    id: &Identity,
    instance: u64,
    from: &str,
) -> Vec<(SocketAddr, Frame)> {
    let c = cookie(s, now, id, from);
    let f = Frame::Register {
        peer: id.peer_id(),
        instance,
        cookie: c,
        info: PeerInfo::default(),
        rtt_ms: None,
        home: None,
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

/// Facts with the mapping known (`pending: false`) or still measured.
fn info(mapping_known: bool) -> PeerInfo {
    let mut nat = NatSummary::measuring();
    nat.pending.mapping = !mapping_known;
    PeerInfo {
        nat,
        candidates: vec![],
        mapped: None,
        tcp: None,
        turn: vec![],
    }
}

fn connect_frame(
    s: &mut RendezvousServer,
    now: Instant,
    a: &Identity,
    target: &Identity,
    session: u64,
    mapping_known: bool,
) -> Vec<u8> {
    let ck = cookie(s, now, a, A);
    signed(
        a,
        Frame::Connect {
            peer: a.peer_id(),
            instance: 1,
            target: target.peer_id(),
            cookie: ck,
            session,
            offer: offer(),
            info: info(mapping_known),
            fresh: None,
            rtt_ms: None,
            sig: vec![],
        },
    )
}

fn error_code(r: &[(SocketAddr, Frame)]) -> Option<ErrorCode> {
    r.iter().find_map(|(_, f)| match f {
        Frame::Error { code, .. } => Some(*code),
        _ => None,
    })
}

#[test]
fn registration_records_the_observed_address() {
    let mut s = RendezvousServer::new([1; 32]);
    let now = Instant::now();
    let a = Identity::from_seed([1; 32]);
    let r = register_as(&mut s, now, &a, 1, A);
    assert_eq!(
        r,
        vec![(
            addr(A),
            Frame::Registered {
                observed: addr(A),
                expires_s: 15,
                home: None,
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
    let c = cookie(&mut s, now, &a, A);
    let f = Frame::Register {
        peer: a.peer_id(),
        instance: 1,
        cookie: c,
        info: PeerInfo::default(),
        rtt_ms: None,
        home: None,
        sig: vec![],
    };
    // Signed by the wrong key.
    let r = ask(&mut s, now, A, &signed(&mallory, f.clone()));
    assert_eq!(error_code(&r), Some(ErrorCode::BadSignature), "{r:?}");
    // A cookie issued to another address (spoofed source).
    let r = ask(&mut s, now, "203.0.113.66:1", &signed(&a, f.clone()));
    assert_eq!(error_code(&r), Some(ErrorCode::BadCookie), "{r:?}");
    // An expired cookie.
    let later = now + COOKIE_LIFETIME + Duration::from_secs(1);
    let r = ask(&mut s, later, A, &signed(&a, f.clone()));
    assert_eq!(error_code(&r), Some(ErrorCode::BadCookie), "{r:?}");
    assert_eq!(s.registered(), 0);
    // The cookie proves the IP address, not the port: another socket (or
    // a later process) of the same host may use it, minutes later.
    let r = ask(
        &mut s,
        now + COOKIE_LIFETIME / 2,
        "198.51.100.7:4999",
        &signed(&a, f),
    );
    assert!(
        matches!(r.as_slice(), [(to, Frame::Registered { .. })] if *to == addr("198.51.100.7:4999")),
        "{r:?}"
    );
}

/// A connector needs no registration; the target hears of it twice
/// (hedged); prediction starts only once both mappings are known.
#[test]
fn introductions_sync_both_sides_and_start_when_both_mappings_are_known() {
    let mut s = RendezvousServer::new([1; 32]);
    let now = Instant::now();
    let (a, b, c) = (
        Identity::from_seed([1; 32]),
        Identity::from_seed([2; 32]),
        Identity::from_seed([3; 32]),
    );
    register_as(&mut s, now, &b, 2, B);
    // A, not registered, with its mapping still being measured.
    let connect = connect_frame(&mut s, now, &a, &b, 7, false);
    let r = ask(&mut s, now, A, &connect);
    assert!(
        matches!(&r[0], (to, Frame::Peer { observed, yours, instance: 2, .. })
            if *to == addr(A) && *observed == addr(B) && *yours == addr(A)),
        "{r:?}"
    );
    let incoming = r
        .iter()
        .filter(|(to, f)| *to == addr(B) && matches!(f, Frame::Incoming { observed, instance: 1, .. } if *observed == addr(A)))
        .count();
    assert_eq!(incoming, 2, "hedged: {r:?}");
    // An unregistered target is offline, and that costs its budget nothing.
    let f = connect_frame(&mut s, now, &a, &c, 8, true);
    let r = ask(&mut s, now, A, &f);
    assert_eq!(error_code(&r), Some(ErrorCode::PeerOffline), "{r:?}");
    // Before B has accepted, nothing of B's is held: a Sync to B says so,
    // so that B keeps re-sending an Accept that was lost (ack 0 would
    // read as "your Accept arrived").
    let ckb = cookie(&mut s, now, &b, B);
    let poll = wire::encode(&Frame::Poll {
        peer: b.peer_id(),
        cookie: ckb,
        session: 7,
    });
    let r = ask(&mut s, now, B, &poll);
    assert!(
        matches!(
            r.as_slice(),
            [(
                _,
                Frame::Sync {
                    ack: None,
                    peer: Some(_),
                    ..
                }
            )]
        ),
        "{r:?}"
    );
    // B accepts with its mapping known: B's answer acknowledges it, A is
    // pushed B's state, but nobody starts while A's mapping is pending.
    let ckb = cookie(&mut s, now, &b, B);
    let acc = Frame::Accept {
        peer: b.peer_id(),
        cookie: ckb,
        session: 7,
        offer: offer(),
        info: info(true),
        fresh: Some(addr("198.51.100.8:5002")),
        sig: vec![],
    };
    let r = ask(&mut s, now, B, &signed(&b, acc));
    assert!(
        r.iter().any(|(to, f)| *to == addr(B)
            && matches!(
                f,
                Frame::Sync {
                    ack: Some(0),
                    start_in_ms: None,
                    ..
                }
            )),
        "{r:?}"
    );
    assert!(
        r.iter().any(|(to, f)| *to == addr(A)
            && matches!(f, Frame::Sync { peer: Some(p), start_in_ms: None, .. } if p.fresh == Some(addr("198.51.100.8:5002")))),
        "{r:?}"
    );
    // A's mapping is measured: its Update brings the start to both.
    let cka = cookie(&mut s, now, &a, A);
    let upd = Frame::Update {
        peer: a.peer_id(),
        cookie: cka,
        session: 7,
        seq: 1,
        info: info(true),
        fresh: Some(addr("198.51.100.7:4002")),
        sig: vec![],
    };
    let r = ask(&mut s, now, A, &signed(&a, upd.clone()));
    assert!(
        r.iter().any(|(to, f)| *to == addr(A)
            && matches!(
                f,
                Frame::Sync {
                    ack: Some(1),
                    start_in_ms: Some(_),
                    ..
                }
            )),
        "{r:?}"
    );
    assert!(
        r.iter().any(|(to, f)| *to == addr(B)
            && matches!(f, Frame::Sync { peer: Some(p), start_in_ms: Some(_), .. } if p.fresh == Some(addr("198.51.100.7:4002")))),
        "{r:?}"
    );
    // A Poll from either side gets the other's state and the start.
    let cka = cookie(&mut s, now, &a, A);
    let poll = wire::encode(&Frame::Poll {
        peer: a.peer_id(),
        cookie: cka,
        session: 7,
    });
    let r = ask(&mut s, now + Duration::from_millis(5), A, &poll);
    assert!(
        matches!(
            r.as_slice(),
            [(
                _,
                Frame::Sync {
                    ack: Some(1),
                    peer: Some(_),
                    start_in_ms: Some(_),
                    ..
                }
            )]
        ),
        "{r:?}"
    );
    // A late copy of the Update changes nothing and is only acknowledged.
    let r = ask(&mut s, now, A, &signed(&a, upd));
    assert_eq!(r.len(), 1, "{r:?}");
    // Someone else's poll for the session learns nothing.
    let ckc = cookie(&mut s, now, &c, "198.51.100.9:6000");
    let poll = wire::encode(&Frame::Poll {
        peer: c.peer_id(),
        cookie: ckc,
        session: 7,
    });
    let r = ask(&mut s, now, "198.51.100.9:6000", &poll);
    assert_eq!(error_code(&r), Some(ErrorCode::NoSession), "{r:?}");
}

#[test]
fn an_initiator_that_waits_has_the_incoming_repeated_now_and_then() {
    let mut s = RendezvousServer::new([1; 32]);
    let now = Instant::now();
    let (a, b) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
    register_as(&mut s, now, &b, 2, B);
    let f = connect_frame(&mut s, now, &a, &b, 7, true);
    ask(&mut s, now, A, &f);
    let poll = |s: &mut RendezvousServer, at: Instant| {
        let ck = cookie(s, at, &a, A);
        let p = wire::encode(&Frame::Poll {
            peer: a.peer_id(),
            cookie: ck,
            session: 7,
        });
        ask(s, at, A, &p)
            .iter()
            .filter(|(to, f)| *to == addr(B) && matches!(f, Frame::Incoming { .. }))
            .count()
    };
    assert_eq!(poll(&mut s, now + Duration::from_millis(100)), 0);
    assert_eq!(poll(&mut s, now + INCOMING_REPEAT), 2);
    assert_eq!(
        poll(&mut s, now + INCOMING_REPEAT + Duration::from_millis(100)),
        0
    );
}

#[test]
fn unknown_version_and_garbage_are_rejected_cleanly() {
    let mut s = RendezvousServer::new([1; 32]);
    let now = Instant::now();
    let r = ask(&mut s, now, A, &[wire::MAGIC, 9, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(error_code(&r), Some(ErrorCode::UnsupportedVersion), "{r:?}");
    // Too short to carry even the error: nothing is sent (no amplification).
    assert!(ask(&mut s, now, A, &[wire::MAGIC, 9]).is_empty());
    assert!(ask(
        &mut s,
        now,
        A,
        &[wire::MAGIC, wire::VERSION, 0xff, 0xff, 0xff]
    )
    .is_empty());
    assert_eq!(s.stats().malformed, 1);
    assert_eq!(s.stats().amplification_dropped, 1);
}

#[test]
fn a_flood_from_one_source_is_limited_but_many_peers_behind_one_ip_are_not() {
    let mut s = RendezvousServer::new([1; 32]);
    let now = Instant::now();
    let a = Identity::from_seed([1; 32]);
    let hello = wire::encode(&Frame::Hello { peer: a.peer_id() });
    let answered = (0..1000)
        .filter(|_| !ask(&mut s, now, A, &hello).is_empty())
        .count();
    assert!(answered <= 80, "{answered}");
    // Forty peers behind one carrier NAT, each asking a few times.
    let answered = (0..40u16)
        .flat_map(|p| (0..5).map(move |_| p))
        .filter(|p| !ask(&mut s, now, &format!("203.0.113.50:{}", 20000 + p), &hello).is_empty())
        .count();
    assert_eq!(answered, 200);
}

#[test]
fn a_targets_introduction_budget_is_counted_and_says_when_to_retry() {
    let now = Instant::now();
    let (a, b) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
    for limits in [Limits::default(), Limits::unlimited()] {
        let mut s = RendezvousServer::with_limits([1; 32], limits);
        register_as(&mut s, now, &b, 2, B);
        let mut limited = None;
        // Each introduction from its own address, as many peers would.
        for i in 0..(TARGET_LIMIT.burst as u64 + 1) {
            let from = format!("198.51.100.{}:{}", 20 + i / 50, 4000 + i);
            let ck = cookie(&mut s, now, &a, &from);
            let f = signed(
                &a,
                Frame::Connect {
                    peer: a.peer_id(),
                    instance: 1,
                    target: b.peer_id(),
                    cookie: ck,
                    session: 100 + i,
                    offer: offer(),
                    info: info(true),
                    fresh: None,
                    rtt_ms: None,
                    sig: vec![],
                },
            );
            let r = ask(&mut s, now, &from, &f);
            if let Some((
                _,
                Frame::Error {
                    code,
                    retry_after_ms,
                    ..
                },
            )) = r.first()
            {
                limited = Some((*code, *retry_after_ms));
            }
        }
        if limits.target.rate.is_infinite() {
            assert_eq!(limited, None);
            assert_eq!(s.stats().introduction_limited, 0);
        } else {
            let (code, retry) = limited.expect("the 101st is limited");
            assert_eq!(code, ErrorCode::IntroductionLimit);
            // 20 per second: the next in about 50 ms.
            assert!(retry.is_some_and(|ms| ms > 0 && ms <= 50), "{retry:?}");
            assert_eq!(s.stats().introduction_limited, 1);
        }
    }
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
    register_as(&mut s, now, &b, 2, B);
    let connect = connect_frame(&mut s, now, &a, &b, 11, true);
    let first = ask(&mut s, now, A, &connect);
    // The Peer answer was lost: the same Connect again gets it again.
    let again = ask(&mut s, now, A, &connect);
    assert!(
        matches!(&again[0], (_, Frame::Peer { session: 11, .. })),
        "{again:?}"
    );
    assert!(first.len() >= again.len());
    // Only the target may decline, with its key.
    let ckm = cookie(&mut s, now, &mallory, "198.51.100.9:6000");
    let forged = Frame::Decline {
        peer: mallory.peer_id(),
        cookie: ckm,
        session: 11,
        reason: DeclineReason::NotAllowed,
        sig: vec![],
    };
    let r = ask(&mut s, now, "198.51.100.9:6000", &signed(&mallory, forged));
    assert_eq!(error_code(&r), Some(ErrorCode::NoSession), "{r:?}");
    let decline = |s: &mut RendezvousServer| {
        let ckb = cookie(s, now, &b, B);
        let f = Frame::Decline {
            peer: b.peer_id(),
            cookie: ckb,
            session: 11,
            reason: DeclineReason::NotAllowed,
            sig: vec![],
        };
        ask(s, now, B, &signed(&b, f))
    };
    let r = decline(&mut s);
    let declined = |r: &[(SocketAddr, Frame)], to: &str| {
        r.iter()
            .filter(|(t, f)| {
                *t == addr(to)
                    && matches!(
                        f,
                        Frame::Error {
                            code: ErrorCode::Declined(DeclineReason::NotAllowed),
                            session: Some(11),
                            ..
                        }
                    )
            })
            .count()
    };
    assert!(declined(&r, A) >= 1, "A is told: {r:?}");
    assert_eq!(declined(&r, B), 1, "B gets its acknowledgement: {r:?}");
    // A late copy of A's Connect is not introduced again: it is declined.
    let late = ask(&mut s, now, A, &connect);
    assert_eq!(
        error_code(&late),
        Some(ErrorCode::Declined(DeclineReason::NotAllowed))
    );
    // A repeated Decline is acknowledged again; A is not told twice.
    let r2 = decline(&mut s);
    assert_eq!(declined(&r2, A), 0, "{r2:?}");
    assert_eq!(declined(&r2, B), 1, "{r2:?}");
}

/// A second process with one key takes the registration over; the first
/// is told at once, keeps being told when it asks, and hears when the
/// second leaves. Nobody else learns anything from a ping.
#[test]
fn a_displaced_instance_is_told_and_told_again_when_the_key_is_free() {
    let mut s = RendezvousServer::new([1; 32]);
    let now = Instant::now();
    let b = Identity::from_seed([2; 32]);
    let second = "198.51.100.9:7000";
    register_as(&mut s, now, &b, 1, B);
    let r = register_as(&mut s, now, &b, 2, second);
    assert!(
        r.iter().any(|(to, f)| *to == addr(B)
            && matches!(
                f,
                Frame::Pong {
                    status: RegStatus::HeldByOther
                }
            )),
        "{r:?}"
    );
    assert_eq!(s.stats().displaced, 1);
    let ping = |s: &mut RendezvousServer, from: &str, instance: u64| {
        let r = ask(
            s,
            now,
            from,
            &wire::encode(&Frame::Ping {
                peer: b.peer_id(),
                instance,
            }),
        );
        match r.as_slice() {
            [(_, Frame::Pong { status })] => *status,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(ping(&mut s, B, 1), RegStatus::HeldByOther);
    assert_eq!(ping(&mut s, second, 2), RegStatus::Registered);
    assert_eq!(ping(&mut s, "203.0.113.5:1", 3), RegStatus::NotRegistered);
    // The second leaves cleanly: the first is told it may come back.
    let ck = cookie(&mut s, now, &b, second);
    let bye = Frame::Unregister {
        peer: b.peer_id(),
        instance: 2,
        cookie: ck,
        sig: vec![],
    };
    let r = ask(&mut s, now, second, &signed(&b, bye));
    assert!(
        r.iter().any(|(to, f)| *to == addr(B)
            && matches!(
                f,
                Frame::Pong {
                    status: RegStatus::NotRegistered
                }
            )),
        "{r:?}"
    );
    assert_eq!(s.registered(), 0);
}

/// A new server (a restart) knows no registrations: a heartbeat says so.
#[test]
fn a_heartbeat_tells_a_listener_that_the_server_forgot_it() {
    let now = Instant::now();
    let b = Identity::from_seed([2; 32]);
    let mut s = RendezvousServer::new([1; 32]);
    register_as(&mut s, now, &b, 1, B);
    let ping = wire::encode(&Frame::Ping {
        peer: b.peer_id(),
        instance: 1,
    });
    assert!(matches!(
        ask(&mut s, now, B, &ping).as_slice(),
        [(
            _,
            Frame::Pong {
                status: RegStatus::Registered
            }
        )]
    ));
    let mut restarted = RendezvousServer::new([7; 32]);
    assert!(matches!(
        ask(&mut restarted, now, B, &ping).as_slice(),
        [(
            _,
            Frame::Pong {
                status: RegStatus::NotRegistered
            }
        )]
    ));
    // A registration without heartbeats expires.
    assert!(matches!(
        ask(&mut s, now + Duration::from_secs(20), B, &ping).as_slice(),
        [(
            _,
            Frame::Pong {
                status: RegStatus::NotRegistered
            }
        )]
    ));
}

/// A listener that registers again with an old cookie (its facts changed)
/// says what its round trip is; the server must not take the cookie's age
/// for it, or both sides' starts drift apart by half of it.
#[test]
fn an_old_cookie_does_not_skew_the_start() {
    let mut s = RendezvousServer::new([1; 32]);
    let now = Instant::now();
    let (a, b) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
    let c = cookie(&mut s, now, &b, B);
    let later = now + Duration::from_secs(2);
    let f = Frame::Register {
        peer: b.peer_id(),
        instance: 2,
        cookie: c,
        info: PeerInfo::default(),
        rtt_ms: Some(40),
        home: None,
        sig: vec![],
    };
    ask(&mut s, later, B, &signed(&b, f));
    let f = connect_frame(&mut s, later, &a, &b, 9, true);
    let r = ask(&mut s, later, A, &f);
    let starts: Vec<u16> = r
        .iter()
        .filter_map(|(_, f)| match f {
            Frame::Peer { start_in_ms, .. } | Frame::Incoming { start_in_ms, .. } => {
                Some(*start_in_ms)
            }
            _ => None,
        })
        .collect();
    assert!(
        !starts.is_empty() && starts.iter().all(|ms| *ms <= 40),
        "{starts:?}"
    );
}

/// A listener is homed on the node it registers with, which names itself
/// when it has a public relay address; an introduction names the node
/// that relays the session (the target's home), and a node opens no
/// channel for a target homed on another node.
#[test]
fn registrations_name_their_relay_node_and_introductions_return_it() {
    use natpunch_proto::relay::RelayConfig;
    use natpunch_proto::rendezvous::server::Limits;
    use natpunch_proto::rendezvous::wire::RelayNode;
    let node: SocketAddr = addr("203.0.113.10:3478");
    let mut s = RendezvousServer::with_relay(
        [1; 32],
        Limits::default(),
        RelayConfig {
            public: Some(node),
            ..RelayConfig::default()
        },
    );
    let now = Instant::now();
    let (a, b) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
    let r = register_as(&mut s, now, &b, 2, B);
    assert!(
        matches!(r.as_slice(), [(_, Frame::Registered { home: Some(h), .. })] if *h == node),
        "{r:?}"
    );
    let f = connect_frame(&mut s, now, &a, &b, 7, true);
    let r = ask(&mut s, now, A, &f);
    let relays: Vec<Option<RelayNode>> = r
        .iter()
        .filter_map(|(_, f)| match f {
            Frame::Peer { relay, .. } | Frame::Incoming { relay, .. } => Some(*relay),
            _ => None,
        })
        .collect();
    assert!(!relays.is_empty());
    assert!(
        relays
            .iter()
            .all(|r| *r == Some(RelayNode { addr: Some(node) })),
        "{relays:?}"
    );
    // Homed on another node: introduced here, relayed there (not here).
    let c = Identity::from_seed([3; 32]);
    let cookie = cookie(&mut s, now, &c, "198.51.100.30:5000");
    let f = Frame::Register {
        peer: c.peer_id(),
        instance: 3,
        cookie,
        info: PeerInfo::default(),
        rtt_ms: None,
        home: Some(addr("203.0.113.99:3478")),
        sig: vec![],
    };
    ask(&mut s, now, "198.51.100.30:5000", &signed(&c, f));
    let f = connect_frame(&mut s, now, &a, &c, 8, true);
    let r = ask(&mut s, now, A, &f);
    assert!(
        r.iter()
            .any(|(_, f)| matches!(f, Frame::Peer { relay: None, .. })),
        "{r:?}"
    );
    assert_eq!(
        s.relay_stats().1,
        1,
        "one channel: the first introduction's"
    );
}

/// A mapped port is passed on only on the address the request came from:
/// a peer cannot point the other side's probes at somebody else.
#[test]
fn a_mapped_port_on_a_foreign_address_is_not_passed_on() {
    let mut s = RendezvousServer::new([1; 32]);
    let now = Instant::now();
    let (a, b) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
    let register = |s: &mut RendezvousServer, mapped: &str| {
        let c = cookie(s, now, &b, B);
        let f = Frame::Register {
            peer: b.peer_id(),
            instance: 2,
            cookie: c,
            info: PeerInfo {
                mapped: Some(Mapped {
                    addr: addr(mapped),
                    protocol: MapProtocol::Pcp,
                }),
                ..PeerInfo::default()
            },
            rtt_ms: None,
            home: None,
            sig: vec![],
        };
        ask(s, now, B, &signed(&b, f));
    };
    let peer_mapped = |r: &[(SocketAddr, Frame)]| {
        r.iter().find_map(|(_, f)| match f {
            Frame::Peer { info, .. } => Some(info.mapped),
            _ => None,
        })
    };
    let b_ip = addr(B).ip();
    register(&mut s, &format!("{b_ip}:4444"));
    let f = connect_frame(&mut s, now, &a, &b, 7, true);
    let r = ask(&mut s, now, A, &f);
    let got = peer_mapped(&r).expect("introduced");
    assert_eq!(
        got.map(|m| m.addr),
        Some(SocketAddr::new(b_ip, 4444)),
        "{r:?}"
    );
    register(&mut s, "192.0.2.99:53");
    let f = connect_frame(&mut s, now, &a, &b, 8, true);
    let r = ask(&mut s, now, A, &f);
    assert_eq!(peer_mapped(&r), Some(None), "{r:?}");
}
