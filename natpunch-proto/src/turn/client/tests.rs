//! The state machine against a scripted server written with the same STUN
//! codec (coturn itself is in `natpunch-cli/tests/turn.rs`).

use super::*;

const SERVER: &str = "192.0.2.1:3478";
const REALM: &str = "example.org";

fn server() -> SocketAddr {
    SERVER.parse().unwrap()
}

fn creds() -> Credentials {
    Credentials::new("alice", "secret")
}

/// What the scripted server does with a request.
struct Script {
    nonce: &'static str,
    lifetime: u32,
    /// Answer the next authenticated request with 438 and this nonce.
    stale: Option<&'static str>,
    requests: Vec<Message>,
}

impl Script {
    fn new() -> Self {
        Self {
            nonce: "n1",
            lifetime: 30,
            stale: None,
            requests: Vec::new(),
        }
    }

    /// The server's answer to `bytes` (a request from the client).
    fn answer(&mut self, bytes: &[u8]) -> Vec<u8> {
        let (req, offsets) = Message::decode_with_offsets(bytes).unwrap();
        self.requests.push(req.clone());
        let tid = req.transaction;
        let error = |code: u16, reason: &str, nonce: &str| {
            Message::new(Class::Error, req.method, tid)
                .with(Attribute::ErrorCode {
                    code,
                    reason: reason.into(),
                })
                .with(Attribute::Unknown {
                    kind: attr::REALM,
                    value: REALM.as_bytes().to_vec(),
                })
                .with(Attribute::Unknown {
                    kind: attr::NONCE,
                    value: nonce.as_bytes().to_vec(),
                })
                .to_bytes()
        };
        if req.get(crate::stun::message::attr::USERNAME).is_none() {
            return error(401, "Unauthorized", self.nonce);
        }
        let key = creds().key(REALM);
        if verify_integrity(bytes, offsets, &key).is_err() {
            return error(401, "Unauthorized", self.nonce);
        }
        if let Some(n) = self.stale.take() {
            self.nonce = n;
            return error(438, "Stale Nonce", n);
        }
        assert_eq!(raw(&req, attr::NONCE), Some(self.nonce.as_bytes()));
        let mut ok = Message::new(Class::Success, req.method, tid);
        match req.method {
            method::ALLOCATE => {
                ok = ok
                    .with(Attribute::Unknown {
                        kind: attr::XOR_RELAYED_ADDRESS,
                        value: xor_address_value(&"192.0.2.1:50000".parse().unwrap(), &tid),
                    })
                    .with(Attribute::XorMappedAddress(
                        "198.51.100.7:4000".parse().unwrap(),
                    ))
                    .with(Attribute::Unknown {
                        kind: attr::LIFETIME,
                        value: self.lifetime.to_be_bytes().to_vec(),
                    });
            }
            method::REFRESH => {
                let asked = raw(&req, attr::LIFETIME)
                    .map(|v| u32::from_be_bytes(v.try_into().unwrap()))
                    .unwrap_or(self.lifetime);
                ok = ok.with(Attribute::Unknown {
                    kind: attr::LIFETIME,
                    value: asked.min(self.lifetime).to_be_bytes().to_vec(),
                });
            }
            _ => {}
        }
        let mut out = Vec::new();
        Encoder {
            integrity: Some((Integrity::Sha1, &key)),
            fingerprint: false,
        }
        .encode(&ok, &mut out);
        out
    }
}

/// Runs the client against the script until nothing is left to send.
fn exchange(c: &mut Client, s: &mut Script, now: Instant) {
    while let Some(t) = c.poll_transmit() {
        if Message::decode(&t).map(|m| m.class) == Ok(Class::Request) {
            let a = s.answer(&t);
            assert_eq!(c.handle_input(now, &a), None);
        }
    }
}

fn events(c: &mut Client) -> Vec<Event> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

fn allocated(transport: Transport) -> (Client, Script, Instant) {
    let t0 = Instant::now();
    let mut c = Client::new(server(), transport, creds(), t0);
    let mut s = Script::new();
    exchange(&mut c, &mut s, t0);
    let ev = events(&mut c);
    assert!(
        matches!(ev.as_slice(), [Event::Allocated { relayed, lifetime, .. }]
            if relayed.port() == 50000 && *lifetime == Duration::from_secs(30)),
        "{ev:?}"
    );
    (c, s, t0)
}

#[test]
fn allocates_after_the_challenge_and_refreshes_at_half_a_short_lifetime() {
    let (mut c, mut s, t0) = allocated(Transport::Udp);
    assert_eq!(
        s.requests.len(),
        2,
        "the challenge, then the authenticated Allocate"
    );
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(15)));
    for k in 1..=4u64 {
        let now = t0 + Duration::from_secs(15 * k);
        c.handle_timeout(now);
        exchange(&mut c, &mut s, now);
        assert_eq!(
            events(&mut c),
            vec![Event::Refreshed {
                lifetime: Duration::from_secs(30)
            }]
        );
    }
    assert!(
        c.relayed().is_some(),
        "refreshed across 4 lifetimes' halves"
    );
}

#[test]
fn a_wrong_password_fails_at_once_with_the_servers_401() {
    let t0 = Instant::now();
    let mut c = Client::new(
        server(),
        Transport::Udp,
        Credentials::new("alice", "wrong"),
        t0,
    );
    let mut s = Script::new();
    exchange(&mut c, &mut s, t0);
    assert_eq!(s.requests.len(), 2, "no retry storm");
    let ev = events(&mut c);
    let [Event::Failed(e)] = ev.as_slice() else {
        panic!("{ev:?}")
    };
    assert!(matches!(e, TurnError::Rejected { code: 401, .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("401 Unauthorized (wrong username or password"),
        "{e}"
    );
    assert!(c.is_closed());
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn a_stale_nonce_is_answered_with_the_new_one() {
    let (mut c, mut s, t0) = allocated(Transport::Udp);
    s.stale = Some("n2");
    let now = t0 + Duration::from_secs(15);
    c.handle_timeout(now);
    exchange(&mut c, &mut s, now);
    assert!(matches!(
        events(&mut c).as_slice(),
        [Event::Refreshed { .. }]
    ));
    let last = s.requests.last().unwrap();
    assert_eq!(raw(last, attr::NONCE), Some(&b"n2"[..]));
}

#[test]
fn peer_data_goes_out_as_send_indications_then_on_a_padded_channel() {
    let (mut c, mut s, t0) = allocated(Transport::Tcp);
    let peer: SocketAddr = "203.0.113.9:7000".parse().unwrap();
    let mut out = Vec::new();
    assert_eq!(
        c.send(peer, b"hello", &mut out),
        Err(SendError::NoPermission(peer.ip()))
    );
    c.permit(t0, peer.ip());
    exchange(&mut c, &mut s, t0);
    assert_eq!(events(&mut c), vec![Event::Permitted(peer.ip())]);
    c.send(peer, b"hello", &mut out).unwrap();
    let ind = Message::decode(&out).unwrap();
    assert_eq!((ind.class, ind.method), (Class::Indication, method::SEND));
    assert_eq!(raw(&ind, attr::DATA), Some(&b"hello"[..]));
    c.bind(t0, peer);
    exchange(&mut c, &mut s, t0);
    assert_eq!(
        events(&mut c),
        vec![Event::ChannelBound {
            peer,
            channel: CHANNEL_MIN
        }]
    );
    out.clear();
    c.send(peer, b"hello", &mut out).unwrap();
    assert_eq!(out, [0x40, 0, 0, 5, b'h', b'e', b'l', b'l', b'o', 0, 0, 0]);
    assert_eq!(super::super::stream_frame_len(&out), Ok(Some(12)));
    // And back: ChannelData and a Data indication both give the peer's bytes.
    let back = c.handle_input(t0, &out).unwrap();
    assert_eq!((back.peer, back.data.as_slice()), (peer, &b"hello"[..]));
    let tid = TransactionId::new([7; 12]);
    let data = Message::new(Class::Indication, method::DATA, tid)
        .with(Attribute::Unknown {
            kind: attr::XOR_PEER_ADDRESS,
            value: xor_address_value(&peer, &tid),
        })
        .with(Attribute::Unknown {
            kind: attr::DATA,
            value: b"hi".to_vec(),
        })
        .to_bytes();
    assert_eq!(
        c.handle_input(t0, &data),
        Some(PeerData {
            peer,
            data: b"hi".to_vec()
        })
    );
    // Permissions and channels are refreshed before they lapse.
    let later = t0 + PERMISSION_REFRESH;
    assert!(c.poll_timeout().unwrap() <= later);
}

#[test]
fn garbage_and_strangers_are_dropped_and_counted() {
    let (mut c, _s, t0) = allocated(Transport::Udp);
    assert_eq!(c.handle_input(t0, &[0x41, 0x23, 0x00, 0x10, 1, 2]), None);
    assert_eq!(c.handle_input(t0, &[0xff; 40]), None);
    let stranger =
        Message::new(Class::Success, method::REFRESH, TransactionId::new([9; 12])).to_bytes();
    assert_eq!(c.handle_input(t0, &stranger), None);
    assert_eq!(c.stats().dropped, 3);
    assert!(c.relayed().is_some());
}

#[test]
fn an_unanswered_allocate_gives_up_after_its_retransmissions() {
    let t0 = Instant::now();
    let mut c = Client::new(server(), Transport::Udp, creds(), t0);
    let mut sent = 0;
    let mut now = t0;
    while !c.is_closed() {
        while c.poll_transmit().is_some() {
            sent += 1;
        }
        now = c.poll_timeout().expect("a timer while allocating");
        c.handle_timeout(now);
    }
    assert_eq!(sent, TRANSMITS);
    assert_eq!(now - t0, Duration::from_millis(15_500));
    let ev = events(&mut c);
    assert!(
        matches!(
            ev.as_slice(),
            [Event::Failed(TurnError::NoAnswer {
                what: "Allocate",
                ..
            })]
        ),
        "{ev:?}"
    );
}

#[test]
fn release_deletes_with_lifetime_zero() {
    let (mut c, mut s, t0) = allocated(Transport::Udp);
    c.release(t0);
    exchange(&mut c, &mut s, t0);
    let last = s.requests.last().unwrap();
    assert_eq!(last.method, method::REFRESH);
    assert_eq!(raw(last, attr::LIFETIME), Some(&[0u8, 0, 0, 0][..]));
    assert_eq!(events(&mut c), vec![Event::Released]);
    assert!(c.is_closed());
}

#[test]
fn a_refresh_out_leaves_no_timer_in_the_past() {
    let (mut c, _s, t0) = allocated(Transport::Udp);
    let at = t0 + Duration::from_secs(15);
    c.handle_timeout(at);
    assert!(c.poll_transmit().is_some(), "the Refresh");
    // Its retransmission is the next timer, not the refresh time again.
    assert_eq!(c.poll_timeout(), Some(at + RTO));
}

#[test]
fn an_unanswered_refresh_is_sent_again_while_the_allocation_lives() {
    let t0 = Instant::now();
    let mut c = Client::new(server(), Transport::Udp, creds(), t0);
    let mut s = Script::new();
    s.lifetime = 600;
    exchange(&mut c, &mut s, t0);
    events(&mut c);
    let mut now = t0 + Duration::from_secs(300);
    c.handle_timeout(now);
    // The server is gone: the first Refresh's 15.5 s pass, then another.
    let mut refreshes = 0;
    while now < t0 + Duration::from_secs(600) && !c.is_closed() {
        while let Some(t) = c.poll_transmit() {
            if Message::decode(&t).is_ok_and(|m| m.method == method::REFRESH) {
                refreshes += 1;
            }
        }
        now = c.poll_timeout().expect("a timer");
        c.handle_timeout(now);
    }
    assert!(refreshes > TRANSMITS as usize * 2, "{refreshes} sends");
    assert!(matches!(
        events(&mut c).as_slice(),
        [Event::Failed(TurnError::NoAnswer {
            what: "Refresh",
            ..
        })]
    ));
    assert!(
        now > t0 + Duration::from_secs(580),
        "failed at {:?}",
        now - t0
    );
}

#[test]
fn forged_or_reflected_answers_are_dropped() {
    let t0 = Instant::now();
    let mut c = Client::new(server(), Transport::Udp, creds(), t0);
    let first = c.poll_transmit().unwrap();
    // Our own request reflected back (an echo service on the port).
    assert_eq!(c.handle_input(t0, &first), None);
    assert!(c.poll_timeout().is_some(), "the Allocate is still out");
    // Past the challenge, a Success that carries ERROR-CODE 401 and no
    // integrity must not pass as the allocation.
    let mut s = Script::new();
    let challenge = s.answer(&first);
    c.handle_input(t0, &challenge);
    let authed = c.poll_transmit().unwrap();
    let tid = Message::decode(&authed).unwrap().transaction;
    let forged = Message::new(Class::Success, method::ALLOCATE, tid)
        .with(Attribute::ErrorCode {
            code: 401,
            reason: "x".into(),
        })
        .with(Attribute::Unknown {
            kind: attr::XOR_RELAYED_ADDRESS,
            value: xor_address_value(&"203.0.113.66:1".parse().unwrap(), &tid),
        })
        .to_bytes();
    assert_eq!(c.handle_input(t0, &forged), None);
    assert_eq!(c.relayed(), None);
    assert_eq!(c.stats().bad_integrity, 1);
    assert_eq!(c.stats().dropped, 1);
}

#[test]
fn a_forgotten_peer_is_no_longer_refreshed_nor_relayed_to() {
    let (mut c, mut s, t0) = allocated(Transport::Udp);
    let peer: SocketAddr = "203.0.113.9:7000".parse().unwrap();
    let other: SocketAddr = "203.0.113.10:7000".parse().unwrap();
    c.permit(t0, peer.ip());
    c.bind(t0, peer);
    c.permit(t0, other.ip());
    exchange(&mut c, &mut s, t0);
    events(&mut c);
    c.forget(peer.ip());
    let mut out = Vec::new();
    assert_eq!(
        c.send(peer, b"x", &mut out),
        Err(SendError::NoPermission(peer.ip()))
    );
    assert!(c.permitted(other.ip()));
    // Past both refreshes (the allocation's own too, every 15 s): the
    // permission refreshes cover the other peer only, and no channel is
    // bound again.
    let before = s.requests.len();
    let mut now = t0;
    while now < t0 + CHANNEL_REFRESH + Duration::from_secs(10) {
        now += Duration::from_secs(5);
        c.handle_timeout(now);
        exchange(&mut c, &mut s, now);
    }
    let sent = &s.requests[before..];
    assert!(
        sent.iter().any(|m| m.method == method::CREATE_PERMISSION),
        "{sent:?}"
    );
    assert!(
        sent.iter().all(|m| m.method != method::CHANNEL_BIND),
        "{sent:?}"
    );
    let peers: Vec<std::net::IpAddr> = sent
        .iter()
        .filter(|m| m.method == method::CREATE_PERMISSION)
        .filter_map(|m| {
            let v = raw(m, attr::XOR_PEER_ADDRESS)?;
            crate::stun::message::decode_xor_address(attr::XOR_PEER_ADDRESS, v, &m.transaction).ok()
        })
        .map(|a| a.ip())
        .collect();
    assert!(peers.contains(&other.ip()), "{peers:?}");
    assert!(!peers.contains(&peer.ip()), "{peers:?}");
}

#[test]
fn over_udp_an_idle_allocation_keeps_its_nat_mapping_with_binding_indications() {
    for transport in [Transport::Udp, Transport::Tcp] {
        let (mut c, mut s, t0) = allocated(transport);
        // A lifetime long enough that no refresh falls in the window.
        s.lifetime = 3600;
        let mut indications = 0;
        let mut now = t0;
        while now < t0 + KEEPALIVE * 4 {
            now += Duration::from_secs(1);
            c.handle_timeout(now);
            while let Some(t) = c.poll_transmit() {
                match Message::decode(&t) {
                    Ok(m) if m.class == Class::Indication && m.method == 0x001 => indications += 1,
                    Ok(m) if m.class == Class::Request => {
                        let a = s.answer(&t);
                        c.handle_input(now, &a);
                    }
                    _ => {}
                }
            }
        }
        match transport {
            Transport::Udp => assert_eq!(indications, 4, "udp"),
            _ => assert_eq!(indications, 0, "{transport:?}"),
        }
    }
}
