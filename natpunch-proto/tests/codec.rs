//! STUN codec tests: RFC 5769 test vectors, property-based round trips, and
//! "corrupt input never panics".

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use natpunch_proto::stun::message::{
    attr, framed_len, verify_integrity, Attribute, Class, DecodeError, Encoder, Integrity, Message,
    TransactionId,
};
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// RFC 5769 §2.1: sample request with short-term credentials.
const RFC5769_REQUEST: &str = "
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf";

/// RFC 5769 §2.2: sample IPv4 response.
const RFC5769_RESPONSE_V4: &str = "
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96";

const RFC5769_PASSWORD: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";

#[test]
fn rfc5769_request_vector() {
    let raw = hex(RFC5769_REQUEST);
    let (m, off) = Message::decode_with_offsets(&raw).expect("vector decodes");
    assert_eq!(m.class, Class::Request);
    assert_eq!(m.method, 1);
    assert!(m.transaction.is_modern());
    assert_eq!(
        m.get(attr::SOFTWARE),
        Some(&Attribute::Software("STUN test client".into()))
    );
    assert_eq!(
        m.get(attr::USERNAME),
        Some(&Attribute::Username("evtj:h6vY".into()))
    );
    // PRIORITY (0x0024) is comprehension-required and unknown to us: kept.
    assert!(matches!(m.get(0x0024), Some(Attribute::Unknown { .. })));
    // ICE-CONTROLLED (0x8029) is comprehension-optional: skipped.
    assert!(m.get(0x8029).is_none());
    verify_integrity(&raw, off, RFC5769_PASSWORD).expect("integrity matches");
    assert!(verify_integrity(&raw, off, b"wrong").is_err());
}

#[test]
fn rfc5769_response_vector() {
    let raw = hex(RFC5769_RESPONSE_V4);
    let (m, off) = Message::decode_with_offsets(&raw).expect("vector decodes");
    assert_eq!(m.class, Class::Success);
    assert_eq!(
        m.mapped_address(),
        Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            32853
        ))
    );
    verify_integrity(&raw, off, RFC5769_PASSWORD).expect("integrity matches");
}

#[test]
fn our_encoder_reproduces_rfc5769_response_integrity_and_fingerprint() {
    let orig = hex(RFC5769_RESPONSE_V4);
    let m = Message::decode(&orig).unwrap();
    let body = Message {
        attributes: m
            .attributes
            .iter()
            .filter(|a| {
                !matches!(
                    a,
                    Attribute::MessageIntegrity(_) | Attribute::Fingerprint(_)
                )
            })
            .cloned()
            .collect(),
        ..m
    };
    let mut out = vec![];
    Encoder {
        integrity: Some((Integrity::Sha1, RFC5769_PASSWORD)),
        fingerprint: true,
    }
    .encode(&body, &mut out);
    // The vector pads SOFTWARE with a space, we pad with zero: compare the
    // MACs by re-verifying, and the structure by decoding.
    let (again, off) = Message::decode_with_offsets(&out).expect("our output decodes");
    verify_integrity(&out, off, RFC5769_PASSWORD).unwrap();
    assert_eq!(again.mapped_address(), body.mapped_address());
    assert_eq!(out.len(), orig.len());
}

#[test]
fn sha256_integrity_round_trip() {
    let m = Message::binding_request(TransactionId::new([9; 12]))
        .with(Attribute::Username("alice".into()));
    let mut out = vec![];
    Encoder {
        integrity: Some((Integrity::Sha256, b"secret")),
        fingerprint: true,
    }
    .encode(&m, &mut out);
    let (_, off) = Message::decode_with_offsets(&out).unwrap();
    assert!(off.sha256.is_some());
    verify_integrity(&out, off, b"secret").unwrap();
    assert!(verify_integrity(&out, off, b"other").is_err());
}

#[test]
fn strictness() {
    let good = Message::binding_request(TransactionId::new([1; 12])).to_bytes();
    assert_eq!(
        Message::decode(&good[..19]),
        Err(DecodeError::TooShort { len: 19 })
    );
    let mut bad = good.clone();
    bad[0] |= 0x80;
    assert_eq!(Message::decode(&bad), Err(DecodeError::NotStun));
    let mut bad = good.clone();
    bad.extend_from_slice(&[0, 0, 0, 0]);
    assert!(matches!(
        Message::decode(&bad),
        Err(DecodeError::LengthMismatch { .. })
    ));
    // Attribute overrunning the message.
    let mut bad = good.clone();
    bad.extend_from_slice(&[0x80, 0x22, 0x00, 0x10]);
    bad[3] = 4;
    assert!(matches!(
        Message::decode(&bad),
        Err(DecodeError::AttributeOverrun { .. })
    ));
    // Corrupted fingerprint.
    let mut fp = vec![];
    Encoder {
        integrity: None,
        fingerprint: true,
    }
    .encode(
        &Message::binding_request(TransactionId::new([1; 12])),
        &mut fp,
    );
    let n = fp.len();
    fp[n - 1] ^= 1;
    assert!(matches!(
        Message::decode(&fp),
        Err(DecodeError::FingerprintMismatch { .. })
    ));
    // Bad address family.
    let mut bad = good.clone();
    bad.extend_from_slice(&[0x00, 0x01, 0x00, 0x08, 0x00, 0x07, 0, 1, 1, 2, 3, 4]);
    bad[3] = 12;
    assert!(matches!(
        Message::decode(&bad),
        Err(DecodeError::BadAddressFamily { .. })
    ));
}

#[test]
fn stream_framing_length() {
    let m =
        Message::binding_request(TransactionId::new([1; 12])).with(Attribute::Software("x".into()));
    let raw = m.to_bytes();
    assert_eq!(framed_len(&raw[..4]), Some(raw.len()));
    assert_eq!(framed_len(&raw[..3]), None);
}

fn arb_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), p)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), p)),
    ]
}

fn arb_attr() -> impl Strategy<Value = Attribute> {
    prop_oneof![
        arb_addr().prop_map(Attribute::MappedAddress),
        arb_addr().prop_map(Attribute::XorMappedAddress),
        arb_addr().prop_map(Attribute::ResponseOrigin),
        arb_addr().prop_map(Attribute::OtherAddress),
        arb_addr().prop_map(Attribute::ChangedAddress),
        arb_addr().prop_map(Attribute::SourceAddress),
        (any::<bool>(), any::<bool>()).prop_map(|(change_ip, change_port)| {
            Attribute::ChangeRequest {
                change_ip,
                change_port,
            }
        }),
        any::<u16>().prop_map(Attribute::ResponsePort),
        (0u16..64).prop_map(|n| Attribute::Padding(n * 4)),
        "[a-zA-Z0-9 ./-]{0,40}".prop_map(Attribute::Software),
        "[a-z0-9:]{0,40}".prop_map(Attribute::Username),
        (3u16..=6, 0u16..100, "[a-zA-Z ]{0,30}").prop_map(|(c, n, reason)| Attribute::ErrorCode {
            code: c * 100 + n,
            reason
        }),
        proptest::collection::vec(any::<u16>(), 0..8).prop_map(Attribute::UnknownAttributes),
        (
            0x0030u16..0x7fff,
            proptest::collection::vec(any::<u8>(), 0..32)
        )
            .prop_filter("not a known type", |(k, _)| ![0x0002].contains(k))
            .prop_map(|(kind, value)| Attribute::Unknown { kind, value }),
    ]
}

fn arb_message() -> impl Strategy<Value = Message> {
    (
        prop_oneof![
            Just(Class::Request),
            Just(Class::Indication),
            Just(Class::Success),
            Just(Class::Error)
        ],
        0u16..0x1000,
        any::<bool>(),
        any::<u32>(),
        any::<[u8; 12]>(),
        proptest::collection::vec(arb_attr(), 0..12),
    )
        .prop_map(|(class, method, modern, cookie, id, attributes)| Message {
            class,
            method,
            transaction: TransactionId {
                cookie: if modern { 0x2112_A442 } else { cookie },
                id,
            },
            attributes,
        })
}

proptest! {
    #[test]
    fn round_trip(m in arb_message()) {
        let raw = m.to_bytes();
        prop_assert_eq!(raw.len(), m.encoded_len());
        let back = Message::decode(&raw).expect("own encoding decodes");
        prop_assert_eq!(back, m);
    }

    #[test]
    fn round_trip_with_trailers(m in arb_message(), key in proptest::collection::vec(any::<u8>(), 1..32), sha256 in any::<bool>()) {
        let mut raw = vec![];
        let kind = if sha256 { Integrity::Sha256 } else { Integrity::Sha1 };
        Encoder { integrity: Some((kind, &key)), fingerprint: true }.encode(&m, &mut raw);
        let (back, off) = Message::decode_with_offsets(&raw).expect("decodes");
        prop_assert!(verify_integrity(&raw, off, &key).is_ok());
        prop_assert_eq!(&back.attributes[..m.attributes.len()], &m.attributes[..]);
    }

    #[test]
    fn corrupt_input_never_panics(m in arb_message(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
        let mut raw = m.to_bytes();
        for (i, x) in flips {
            let n = raw.len();
            raw[i % n] ^= x;
        }
        let cut = cut % (raw.len() + 1);
        let _ = Message::decode(&raw[..cut]);
        let _ = Message::decode(&raw);
    }

    #[test]
    fn random_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = Message::decode(&raw);
        let _ = framed_len(&raw);
    }
}
