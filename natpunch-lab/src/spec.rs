//! What a lab NAT does (RFC 4787 behaviours) and what a lab topology looks
//! like, with the named presets.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use natpunch_proto::nat::{AllocationKind, Behaviour};
use serde::Serialize;

/// How the NAT picks the external port of a new mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum PortAllocation {
    /// Keep the internal port when free (the kernel's own choice).
    Preserving,
    /// Each new mapping takes the previous port plus `delta`.
    Sequential { delta: u16 },
    /// Uniformly random port (`fully-random`).
    Random,
}

impl PortAllocation {
    pub fn kind(&self) -> AllocationKind {
        match self {
            PortAllocation::Preserving => AllocationKind::Preserving,
            PortAllocation::Sequential { .. } => AllocationKind::Sequential,
            PortAllocation::Random => AllocationKind::Random,
        }
    }

    pub fn delta(&self) -> Option<i32> {
        match self {
            PortAllocation::Sequential { delta } => Some(i32::from(*delta)),
            _ => None,
        }
    }
}

/// What the NAT does with an unsolicited inbound packet it has no mapping
/// (or no permission) for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unsolicited {
    /// Silently drop.
    Drop,
    /// Answer: ICMP port unreachable for UDP, RST for TCP.
    Reject,
}

/// One NAT's behaviour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NatSpec {
    /// The preset name it came from, for display.
    pub name: String,
    pub mapping: Behaviour,
    pub filtering: Behaviour,
    pub allocation: PortAllocation,
    pub hairpin: bool,
    /// Idle time after which a UDP mapping is forgotten.
    #[serde(with = "secs")]
    pub udp_timeout: Duration,
    pub inbound_udp: Unsolicited,
    pub inbound_tcp: Unsolicited,
    /// Plain kernel masquerade instead of our rule set (the `linux` preset).
    pub plain_masquerade: bool,
    /// A firewall that forwards no UDP at all, either way (`udp=block`):
    /// the networks where only TCP reaches the internet.
    pub udp_blocked: bool,
    /// A real miniupnpd on the NAT serves UPnP IGD, NAT-PMP and PCP
    /// (`upnp=on`); its mappings forward inbound and keep their port on
    /// the way out, as a home gateway's do.
    pub upnp: bool,
}

mod secs {
    use serde::Serializer;
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
}

/// Default UDP mapping timeout: RFC 4787 REQ-5 asks for at least 2 minutes;
/// the `udp_timeout` parameter lets tests try the 30 s many routers use.
pub const DEFAULT_UDP_TIMEOUT: Duration = Duration::from_secs(120);

/// The preset names, in the order grids list them.
pub const PRESETS: [&str; 7] = [
    "full-cone",
    "restricted-cone",
    "port-restricted-cone",
    "address-dependent",
    "symmetric-sequential",
    "symmetric-random",
    "linux",
];

/// Why a NAT description was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    #[error("unknown NAT preset {0:?} (known: {known})", known = PRESETS.join(", "))]
    UnknownPreset(String),
    #[error("bad NAT parameter {0:?}: expected key=value with keys delta, hairpin, timeout, inbound-udp, inbound-tcp, udp")]
    BadParameter(String),
}

impl NatSpec {
    /// A named preset (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<NatSpec, SpecError> {
        use Behaviour::*;
        let (mapping, filtering, allocation) = match name {
            "full-cone" => (
                EndpointIndependent,
                EndpointIndependent,
                PortAllocation::Preserving,
            ),
            "restricted-cone" => (
                EndpointIndependent,
                AddressDependent,
                PortAllocation::Preserving,
            ),
            "port-restricted-cone" => (
                EndpointIndependent,
                AddressAndPortDependent,
                PortAllocation::Preserving,
            ),
            "address-dependent" => (
                AddressDependent,
                AddressDependent,
                PortAllocation::Sequential { delta: 1 },
            ),
            "symmetric-sequential" => (
                AddressAndPortDependent,
                AddressAndPortDependent,
                PortAllocation::Sequential { delta: 1 },
            ),
            "symmetric-random" => (
                AddressAndPortDependent,
                AddressAndPortDependent,
                PortAllocation::Random,
            ),
            "linux" => (
                EndpointIndependent,
                AddressAndPortDependent,
                PortAllocation::Preserving,
            ),
            other => return Err(SpecError::UnknownPreset(other.to_string())),
        };
        Ok(NatSpec {
            name: name.to_string(),
            mapping,
            filtering,
            allocation,
            hairpin: name != "linux",
            udp_timeout: DEFAULT_UDP_TIMEOUT,
            // Plain Linux answers unsolicited packets (ICMP / RST); our
            // rule sets default to the silent drop most home routers use.
            inbound_udp: if name == "linux" {
                Unsolicited::Reject
            } else {
                Unsolicited::Drop
            },
            inbound_tcp: if name == "linux" {
                Unsolicited::Reject
            } else {
                Unsolicited::Drop
            },
            plain_masquerade: name == "linux",
            udp_blocked: false,
            upnp: false,
        })
    }

    /// Parses `PRESET[:key=value,...]`, e.g. `symmetric-sequential:delta=2`
    /// or `full-cone:hairpin=off,timeout=30`.
    pub fn parse(s: &str) -> Result<NatSpec, SpecError> {
        let (name, params) = s.split_once(':').unwrap_or((s, ""));
        let mut spec = NatSpec::preset(name)?;
        for p in params.split(',').filter(|p| !p.is_empty()) {
            let bad = || SpecError::BadParameter(p.to_string());
            let (k, v) = p.split_once('=').ok_or_else(bad)?;
            match k {
                "delta" => {
                    let d: u16 = v.parse().map_err(|_| bad())?;
                    if d == 0 || d > 64 {
                        return Err(bad());
                    }
                    spec.allocation = PortAllocation::Sequential { delta: d };
                }
                "hairpin" => spec.hairpin = parse_on_off(v).ok_or_else(bad)?,
                "upnp" => spec.upnp = parse_on_off(v).ok_or_else(bad)?,
                "timeout" => spec.udp_timeout = Duration::from_secs(v.parse().map_err(|_| bad())?),
                "inbound-udp" => spec.inbound_udp = parse_unsolicited(v).ok_or_else(bad)?,
                "inbound-tcp" => spec.inbound_tcp = parse_unsolicited(v).ok_or_else(bad)?,
                "udp" => {
                    spec.udp_blocked = match v {
                        "block" | "drop" | "off" => true,
                        "pass" | "on" => false,
                        _ => return Err(bad()),
                    }
                }
                _ => return Err(bad()),
            }
        }
        if !params.is_empty() {
            spec.name = s.to_string();
        }
        Ok(spec)
    }
}

fn parse_on_off(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

fn parse_unsolicited(v: &str) -> Option<Unsolicited> {
    match v {
        "drop" => Some(Unsolicited::Drop),
        "reject" | "rst" | "icmp" => Some(Unsolicited::Reject),
        _ => None,
    }
}

impl FromStr for NatSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NatSpec::parse(s)
    }
}

impl fmt::Display for NatSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Impairment of one access link (host to its first router), each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LinkSpec {
    /// One-way delay added by the lab's delay line.
    #[serde(with = "millis_opt")]
    pub delay: Option<Duration>,
    /// Share of packets dropped each way, 0..1.
    pub loss: f64,
    /// Rate limit each way in kbit/s (tc tbf).
    pub rate_kbit: Option<u64>,
}

mod millis_opt {
    use serde::Serializer;
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }
}

/// How one host reaches the internet.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Side {
    /// A public address, no NAT.
    Direct,
    /// Behind one NAT.
    Nat(NatSpec),
    /// Behind a home NAT behind a carrier-grade NAT (100.64.0.0/10).
    DoubleNat { home: NatSpec, carrier: NatSpec },
}

impl Side {
    /// Parses `direct`, `PRESET[:params]` or `HOME+CARRIER` (double NAT).
    pub fn parse(s: &str) -> Result<Side, SpecError> {
        if s == "direct" {
            return Ok(Side::Direct);
        }
        if let Some((home, carrier)) = s.split_once('+') {
            return Ok(Side::DoubleNat {
                home: NatSpec::parse(home)?,
                carrier: NatSpec::parse(carrier)?,
            });
        }
        Ok(Side::Nat(NatSpec::parse(s)?))
    }

    pub fn label(&self) -> String {
        match self {
            Side::Direct => "direct".into(),
            Side::Nat(n) => n.name.clone(),
            Side::DoubleNat { home, carrier } => format!("{}+{}", home.name, carrier.name),
        }
    }
}

/// A whole lab: a server with two public IPs, hosts A and B.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum TopologySpec {
    /// A and B each reach the internet their own way.
    Pair { a: Side, b: Side },
    /// A and B each behind their own home NAT, both behind one carrier NAT.
    SharedCarrier {
        a: NatSpec,
        b: NatSpec,
        carrier: NatSpec,
    },
    /// A and B behind the same NAT (hairpinning between them).
    SameNat { nat: NatSpec },
}

/// Both sides' access-link impairment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Links {
    pub a: LinkSpec,
    pub b: LinkSpec,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_parameters_parse() {
        for p in PRESETS {
            assert!(NatSpec::preset(p).is_ok(), "{p}");
        }
        let s = NatSpec::parse("symmetric-sequential:delta=2,timeout=30,hairpin=off").unwrap();
        assert_eq!(s.allocation, PortAllocation::Sequential { delta: 2 });
        assert_eq!(s.udp_timeout, Duration::from_secs(30));
        assert!(!s.hairpin);
        assert!(NatSpec::parse("nope").is_err());
        assert!(NatSpec::parse("full-cone:delta=0").is_err());
        assert!(NatSpec::parse("full-cone:colour=red").is_err());
        assert!(NatSpec::parse("full-cone:udp=block").unwrap().udp_blocked);
        assert!(NatSpec::parse("full-cone:udp=maybe").is_err());
        assert!(matches!(
            Side::parse("full-cone+symmetric-random"),
            Ok(Side::DoubleNat { .. })
        ));
        assert_eq!(Side::parse("direct"), Ok(Side::Direct));
    }
}
