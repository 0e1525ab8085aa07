//! Port mapping vocabulary and its pure decisions: which protocol made a
//! mapping ([`MapProtocol`]), the mapped address a peer announces
//! ([`Mapped`]), whether a gateway's external address is worth announcing
//! ([`check_external`]) and when a lease is renewed ([`renew_after`]).
//!
//! The protocols themselves (PCP, RFC 6887; NAT-PMP, RFC 6886; UPnP IGD)
//! are spoken by the driver in the `natpunch` crate, through crates made
//! for them; nothing here does I/O.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The protocol a gateway mapped a port with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MapProtocol {
    /// Port Control Protocol (RFC 6887).
    Pcp,
    /// NAT Port Mapping Protocol (RFC 6886).
    NatPmp,
    /// UPnP Internet Gateway Device (WANIPConnection).
    Upnp,
}

impl MapProtocol {
    /// Every protocol, in the order they are reported.
    pub const ALL: [MapProtocol; 3] = [MapProtocol::Pcp, MapProtocol::NatPmp, MapProtocol::Upnp];

    pub fn as_str(&self) -> &'static str {
        match self {
            MapProtocol::Pcp => "pcp",
            MapProtocol::NatPmp => "nat-pmp",
            MapProtocol::Upnp => "upnp",
        }
    }
}

impl std::str::FromStr for MapProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pcp" => Ok(MapProtocol::Pcp),
            "nat-pmp" | "natpmp" => Ok(MapProtocol::NatPmp),
            "upnp" | "igd" => Ok(MapProtocol::Upnp),
            other => Err(format!(
                "unknown port mapping protocol {other:?} (pcp, nat-pmp, upnp)"
            )),
        }
    }
}

impl std::fmt::Display for MapProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A port the gateway forwards to our socket: anyone may send to `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mapped {
    pub addr: SocketAddr,
    pub protocol: MapProtocol,
}

/// Why a gateway's mapping is not announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    /// The gateway's own WAN address is private or shared: another NAT
    /// (a carrier's, or a second home router) sits beyond it, and the
    /// mapped port is reachable only from between the two.
    #[error("the gateway's external address {0} is not public: another NAT beyond it (double NAT or carrier-grade NAT)")]
    BehindAnotherNat(IpAddr),
    /// The gateway's external address differs from the one the rendezvous
    /// server sees us at: the traffic leaves through some other NAT.
    #[error("the gateway's external address {gateway} is not the address the server sees ({observed}): another NAT beyond it")]
    NotOurExit { gateway: IpAddr, observed: IpAddr },
    /// No address at all (0.0.0.0: the gateway has no WAN link).
    #[error("the gateway reports no external address")]
    NoAddress,
}

impl Unusable {
    /// A stable machine-readable name.
    pub fn code(&self) -> &'static str {
        match self {
            Unusable::BehindAnotherNat(_) => "behind-another-nat",
            Unusable::NotOurExit { .. } => "not-our-exit",
            Unusable::NoAddress => "no-external-address",
        }
    }
}

/// Whether `external` (what the gateway reports) can be announced, given
/// the address the server observed us at, when known. Private (RFC 1918),
/// shared (RFC 6598, carrier-grade NAT), loopback and link-local addresses
/// are not reachable from the internet; documentation ranges are (the lab
/// uses them as public addresses).
pub fn check_external(external: IpAddr, observed: Option<IpAddr>) -> Result<(), Unusable> {
    if external.is_unspecified() {
        return Err(Unusable::NoAddress);
    }
    if !is_global(external) {
        return Err(Unusable::BehindAnotherNat(external));
    }
    match observed {
        Some(o) if o != external => Err(Unusable::NotOurExit {
            gateway: external,
            observed: o,
        }),
        _ => Ok(()),
    }
}

/// Reachable from the internet, as far as port mapping cares.
fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let shared = Ipv4Addr::new(100, 64, 0, 0);
            let in_shared = u32::from(v4) & 0xffc0_0000 == u32::from(shared);
            !(v4.is_private()
                || in_shared
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_multicast())
        }
        IpAddr::V6(v6) => {
            let unique_local = v6.segments()[0] & 0xfe00 == 0xfc00;
            let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
            !(v6.is_loopback() || v6.is_multicast() || unique_local || link_local)
        }
    }
}

/// The shortest wait before a renewal: a gateway that grants a lifetime
/// of a second or less (RFC 6887 §15 lets a server grant less than asked)
/// is renewed twice a second, not in a busy loop.
pub const MIN_RENEW_AFTER: Duration = Duration::from_millis(500);

/// When to renew a lease of `lifetime` granted just now: at half of it
/// (RFC 6886 §3.3 suggests renewing at half the lifetime; RFC 6887 §11.2.1
/// between 1/2 and 5/8). A zero lifetime is permanent (UPnP's 0): never.
pub fn renew_after(lifetime: Duration) -> Option<Duration> {
    if lifetime.is_zero() {
        return None;
    }
    Some((lifetime / 2).max(MIN_RENEW_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn private_shared_and_foreign_exits_are_refused() {
        assert_eq!(
            check_external(ip("192.168.1.1"), None),
            Err(Unusable::BehindAnotherNat(ip("192.168.1.1")))
        );
        assert_eq!(
            check_external(ip("100.72.3.4"), None),
            Err(Unusable::BehindAnotherNat(ip("100.72.3.4")))
        );
        assert_eq!(check_external(ip("100.128.0.1"), None), Ok(()));
        assert!(check_external(ip("10.9.9.9"), None).is_err());
        assert_eq!(
            check_external(ip("0.0.0.0"), None),
            Err(Unusable::NoAddress)
        );
        // Documentation ranges count as public (the lab's are).
        assert_eq!(check_external(ip("198.51.100.7"), None), Ok(()));
        assert_eq!(
            check_external(ip("198.51.100.7"), Some(ip("198.51.100.7"))),
            Ok(())
        );
        assert_eq!(
            check_external(ip("198.51.100.7"), Some(ip("203.0.113.9"))),
            Err(Unusable::NotOurExit {
                gateway: ip("198.51.100.7"),
                observed: ip("203.0.113.9")
            })
        );
        assert!(check_external(ip("fd00::1"), None).is_err());
        assert_eq!(check_external(ip("2001:db8::1"), None), Ok(()));
    }

    #[test]
    fn leases_renew_at_half_life_and_permanent_ones_never() {
        assert_eq!(
            renew_after(Duration::from_secs(7200)),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            renew_after(Duration::from_millis(500)),
            Some(MIN_RENEW_AFTER)
        );
        assert_eq!(renew_after(Duration::ZERO), None);
    }
}
