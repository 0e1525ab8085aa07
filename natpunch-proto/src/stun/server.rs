//! Sans-IO STUN Binding server with RFC 5780 NAT-behaviour support.
//!
//! [`Server::handle`] takes one datagram (or one framed TCP message), the
//! local address it arrived on and the peer's address, and returns the
//! reply to send and the local address to send it from. With an alternate
//! address the server is four sockets (2 IPs × 2 ports) and honours
//! CHANGE-REQUEST (RFC 5780 §6.1); without one, CHANGE-REQUEST is answered
//! with 420 as that section prescribes.
//!
//! Anti-abuse: every source IP is rate-limited before the packet is even
//! parsed, malformed packets are dropped and counted, RFC 3489
//! RESPONSE-ADDRESS (which would aim replies at a third party) is never
//! honoured, and RESPONSE-PORT can only change the port on the requester's
//! own IP. A Binding answer is a fixed, bounded set of attributes (at most
//! [`MAX_REPLY_V4`] bytes for IPv4): STUN clients send 20-byte requests and
//! need the mapped address back, so the reply may exceed the request by a
//! bounded amount, which the per-source rate limit turns into a bounded
//! rate.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::message::{attr, Attribute, Class, Encoder, Message, METHOD_BINDING};
use crate::ratelimit::{RateLimit, RateLimiter};

/// Largest Binding success reply over IPv4: header, XOR-MAPPED, MAPPED,
/// RESPONSE-ORIGIN, OTHER-ADDRESS (12 bytes each) and FINGERPRINT (8),
/// without SOFTWARE. Tested in `reply_size_is_bounded`.
pub const MAX_REPLY_V4: usize = 20 + 4 * 12 + 8;

/// Default per-source limit (per IP and port: one process's socket): 50
/// Binding requests per second with a burst of 100. A full `natpunch nat`
/// run sends about 30 from all its sockets; coturn's default has no limit
/// at all. Bounded to 65 536 tracked sources (≈ 3 MB).
pub const DEFAULT_RATE_LIMIT: RateLimit = RateLimit {
    rate: 50.0,
    burst: 100.0,
    max_sources: 65_536,
};

/// Per source IP, over all its ports: many peers share one address behind
/// a carrier-grade NAT or an office router (forty peers discovering at
/// once send about 1200 requests), so this is only a cap against floods:
/// 2000 per second, burst 4000, ≈ 130 kB/s more toward a spoofed victim
/// than it sent, at most.
pub const IP_RATE_LIMIT: RateLimit = RateLimit {
    rate: 2000.0,
    burst: 4000.0,
    max_sources: 65_536,
};

/// How a request reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The primary address (what `--listen` names).
    pub primary: SocketAddr,
    /// The alternate address (`--alt`): a second IP and a second port.
    pub alternate: Option<SocketAddr>,
    /// SOFTWARE attribute to add to replies, if any.
    pub software: Option<String>,
    pub rate_limit: RateLimit,
}

/// A reply to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// Local address to send from (one of [`Server::local_addresses`]).
    pub from: SocketAddr,
    /// Where to send it.
    pub to: SocketAddr,
}

/// What the server has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    pub received: u64,
    pub answered: u64,
    pub malformed: u64,
    pub rate_limited: u64,
    /// Well-formed STUN that is not a request (ignored).
    pub ignored: u64,
    pub errors_sent: u64,
    pub change_requests: u64,
}

/// The sans-IO server.
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    limiter: RateLimiter<SocketAddr>,
    ip_limiter: RateLimiter<IpAddr>,
    stats: ServerStats,
}

impl Server {
    pub fn new(config: ServerConfig) -> Self {
        Self {
            limiter: RateLimiter::new(config.rate_limit),
            ip_limiter: RateLimiter::new(if config.rate_limit.rate.is_infinite() {
                RateLimit::unlimited()
            } else {
                IP_RATE_LIMIT
            }),
            config,
            stats: ServerStats::default(),
        }
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub fn stats(&self) -> ServerStats {
        self.stats
    }

    /// Every address the server must listen on: the primary alone, or the
    /// four IP × port combinations with an alternate.
    pub fn local_addresses(&self) -> Vec<SocketAddr> {
        let p = self.config.primary;
        match self.config.alternate {
            None => vec![p],
            Some(a) => vec![
                p,
                SocketAddr::new(p.ip(), a.port()),
                SocketAddr::new(a.ip(), p.port()),
                a,
            ],
        }
    }

    /// The address that differs from `local` in IP and port (OTHER-ADDRESS).
    fn other_of(&self, local: SocketAddr) -> Option<SocketAddr> {
        let alt = self.config.alternate?;
        let p = self.config.primary;
        let ip = if local.ip() == p.ip() {
            alt.ip()
        } else {
            p.ip()
        };
        let port = if local.port() == p.port() {
            alt.port()
        } else {
            p.port()
        };
        Some(SocketAddr::new(ip, port))
    }

    /// Handles one request that arrived on `local` from `remote`. Writes the
    /// reply into `out` (cleared first) and says where to send it, or
    /// returns `None` to drop.
    pub fn handle(
        &mut self,
        now: Instant,
        transport: Transport,
        local: SocketAddr,
        remote: SocketAddr,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<Reply> {
        out.clear();
        self.stats.received += 1;
        if !self.limiter.allow(now, remote) || !self.ip_limiter.allow(now, remote.ip()) {
            self.stats.rate_limited += 1;
            tracing::trace!(%remote, "rate-limited");
            return None;
        }
        let req = match Message::decode(data) {
            Ok(m) => m,
            Err(e) => {
                self.stats.malformed += 1;
                tracing::trace!(%remote, error = %e, "dropped malformed packet");
                return None;
            }
        };
        if req.class != Class::Request {
            self.stats.ignored += 1;
            return None;
        }
        let back = Reply {
            from: local,
            to: remote,
        };
        if req.method != METHOD_BINDING {
            return Some(self.error(&req, 400, "Bad Request", None, back, out));
        }
        let (change_ip, change_port) = req.change_request();
        let wants_change = change_ip || change_port;
        if wants_change {
            self.stats.change_requests += 1;
        }
        let mut unknown: Vec<u16> = req
            .attributes
            .iter()
            .filter_map(|a| match a {
                // RESPONSE-ADDRESS (RFC 3489) is known and deliberately
                // ignored: honouring it would reflect to third parties.
                Attribute::Unknown { kind, .. } if *kind != attr::RESPONSE_ADDRESS => Some(*kind),
                _ => None,
            })
            .collect();
        if wants_change && (self.config.alternate.is_none() || transport == Transport::Tcp) {
            unknown.push(attr::CHANGE_REQUEST);
        }
        if !unknown.is_empty() {
            unknown.truncate(8);
            return Some(self.error(&req, 420, "Unknown Attribute", Some(unknown), back, out));
        }

        let other = self.other_of(local);
        let from = match other {
            Some(o) if transport == Transport::Udp => SocketAddr::new(
                if change_ip { o.ip() } else { local.ip() },
                if change_port { o.port() } else { local.port() },
            ),
            _ => local,
        };
        let mut to = remote;
        if transport == Transport::Udp {
            if let Some(Attribute::ResponsePort(p)) = req.get(attr::RESPONSE_PORT) {
                to.set_port(*p);
            }
        }
        let modern = req.transaction.is_modern();
        let mut resp = Message::new(Class::Success, METHOD_BINDING, req.transaction);
        if modern {
            resp.attributes.push(Attribute::XorMappedAddress(remote));
        }
        resp.attributes.push(Attribute::MappedAddress(remote));
        let origin_known = !is_unspecified(from.ip());
        match (modern, origin_known) {
            (true, true) => resp.attributes.push(Attribute::ResponseOrigin(from)),
            (false, true) => resp.attributes.push(Attribute::SourceAddress(from)),
            _ => {}
        }
        if let Some(o) = other {
            resp.attributes.push(if modern {
                Attribute::OtherAddress(o)
            } else {
                Attribute::ChangedAddress(o)
            });
        }
        if let Some(s) = &self.config.software {
            resp.attributes.push(Attribute::Software(s.clone()));
        }
        let fingerprint = modern && req.get(attr::FINGERPRINT).is_some();
        Encoder {
            integrity: None,
            fingerprint,
        }
        .encode(&resp, out);
        self.stats.answered += 1;
        Some(Reply { from, to })
    }

    fn error(
        &mut self,
        req: &Message,
        code: u16,
        reason: &str,
        unknown: Option<Vec<u16>>,
        back: Reply,
        out: &mut Vec<u8>,
    ) -> Reply {
        let mut resp =
            Message::new(Class::Error, req.method, req.transaction).with(Attribute::ErrorCode {
                code,
                reason: reason.into(),
            });
        if let Some(u) = unknown {
            resp.attributes.push(Attribute::UnknownAttributes(u));
        }
        resp.encode(out);
        self.stats.errors_sent += 1;
        back
    }
}

fn is_unspecified(ip: IpAddr) -> bool {
    ip.is_unspecified()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::message::TransactionId;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn server(alt: bool) -> Server {
        Server::new(ServerConfig {
            primary: addr("192.0.2.1:3478"),
            alternate: alt.then(|| addr("192.0.2.2:3479")),
            software: None,
            rate_limit: DEFAULT_RATE_LIMIT,
        })
    }

    fn ask(s: &mut Server, req: &Message, local: &str) -> Option<(Reply, Message)> {
        let mut out = vec![];
        let r = s.handle(
            Instant::now(),
            Transport::Udp,
            addr(local),
            addr("203.0.113.9:40000"),
            &req.to_bytes(),
            &mut out,
        )?;
        Some((r, Message::decode(&out).expect("server output decodes")))
    }

    #[test]
    fn binding_reply_carries_rfc5780_attributes() {
        let mut s = server(true);
        let req = Message::binding_request(TransactionId::new([1; 12]));
        let (r, m) = ask(&mut s, &req, "192.0.2.1:3478").unwrap();
        assert_eq!(r.from, addr("192.0.2.1:3478"));
        assert_eq!(m.class, Class::Success);
        assert_eq!(m.mapped_address(), Some(addr("203.0.113.9:40000")));
        assert_eq!(m.other_address(), Some(addr("192.0.2.2:3479")));
        assert_eq!(m.response_origin(), Some(addr("192.0.2.1:3478")));
        assert!(m.get(attr::MAPPED_ADDRESS).is_some());
    }

    #[test]
    fn change_request_picks_the_right_socket() {
        let mut s = server(true);
        let cases = [
            (true, true, "192.0.2.2:3479"),
            (false, true, "192.0.2.1:3479"),
            (true, false, "192.0.2.2:3478"),
        ];
        for (ip, port, want) in cases {
            let req = Message::binding_request(TransactionId::new([2; 12])).with(
                Attribute::ChangeRequest {
                    change_ip: ip,
                    change_port: port,
                },
            );
            let (r, m) = ask(&mut s, &req, "192.0.2.1:3478").unwrap();
            assert_eq!(r.from, addr(want));
            assert_eq!(m.response_origin(), Some(addr(want)));
        }
        // From the alternate socket, OTHER-ADDRESS points back at primary.
        let req = Message::binding_request(TransactionId::new([3; 12]));
        let (_, m) = ask(&mut s, &req, "192.0.2.2:3479").unwrap();
        assert_eq!(m.other_address(), Some(addr("192.0.2.1:3478")));
    }

    #[test]
    fn change_request_without_alt_gets_420() {
        let mut s = server(false);
        let req =
            Message::binding_request(TransactionId::new([4; 12])).with(Attribute::ChangeRequest {
                change_ip: true,
                change_port: true,
            });
        let (_, m) = ask(&mut s, &req, "192.0.2.1:3478").unwrap();
        assert_eq!(m.class, Class::Error);
        assert_eq!(m.error_code(), Some(420));
        assert_eq!(
            m.get(attr::UNKNOWN_ATTRIBUTES),
            Some(&Attribute::UnknownAttributes(vec![attr::CHANGE_REQUEST]))
        );
    }

    #[test]
    fn classic_rfc3489_request_gets_classic_answer() {
        let mut s = server(true);
        let tid = TransactionId {
            cookie: 0xdead_beef,
            id: [5; 12],
        };
        let (_, m) = ask(&mut s, &Message::binding_request(tid), "192.0.2.1:3478").unwrap();
        assert_eq!(m.transaction, tid);
        assert!(m.get(attr::XOR_MAPPED_ADDRESS).is_none());
        assert_eq!(m.mapped_address(), Some(addr("203.0.113.9:40000")));
        assert!(m.get(attr::CHANGED_ADDRESS).is_some());
        assert!(m.get(attr::SOURCE_ADDRESS).is_some());
    }

    #[test]
    fn response_port_only_changes_the_port() {
        let mut s = server(false);
        let req =
            Message::binding_request(TransactionId::new([6; 12])).with(Attribute::ResponsePort(9));
        let (r, _) = ask(&mut s, &req, "192.0.2.1:3478").unwrap();
        assert_eq!(r.to, addr("203.0.113.9:9"));
    }

    #[test]
    fn malformed_and_rate_limited_are_dropped_and_counted() {
        let mut s = Server::new(ServerConfig {
            rate_limit: RateLimit {
                rate: 1.0,
                burst: 3.0,
                max_sources: 8,
            },
            ..server(false).config().clone()
        });
        let mut out = vec![];
        let now = Instant::now();
        let (l, r) = (addr("192.0.2.1:3478"), addr("203.0.113.9:1"));
        assert!(s
            .handle(now, Transport::Udp, l, r, &[0u8; 7], &mut out)
            .is_none());
        let req = Message::binding_request(TransactionId::new([7; 12])).to_bytes();
        let answered = (0..10)
            .filter(|_| {
                s.handle(now, Transport::Udp, l, r, &req, &mut out)
                    .is_some()
            })
            .count();
        assert_eq!(answered, 2);
        assert_eq!(s.stats().malformed, 1);
        assert_eq!(s.stats().rate_limited, 8);
    }

    #[test]
    fn reply_size_is_bounded() {
        let mut s = server(true);
        let req =
            Message::binding_request(TransactionId::new([8; 12])).with(Attribute::Fingerprint(0));
        let mut raw = vec![];
        crate::stun::message::Encoder {
            integrity: None,
            fingerprint: true,
        }
        .encode(&Message::binding_request(req.transaction), &mut raw);
        let mut out = vec![];
        s.handle(
            Instant::now(),
            Transport::Udp,
            addr("192.0.2.1:3478"),
            addr("203.0.113.9:1"),
            &raw,
            &mut out,
        )
        .unwrap();
        assert_eq!(out.len(), MAX_REPLY_V4);
    }
}
