//! The NAT behaviour report: plain data, serialisable, with the RFC 3489
//! "classic" name derived from the RFC 4787/5780 behaviours.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Mapping or filtering behaviour (RFC 4787 §4.1, §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Behaviour {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

impl Behaviour {
    pub fn as_str(&self) -> &'static str {
        match self {
            Behaviour::EndpointIndependent => "endpoint-independent",
            Behaviour::AddressDependent => "address-dependent",
            Behaviour::AddressAndPortDependent => "address-and-port-dependent",
        }
    }
}

/// How the NAT picks the external port of a new mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllocationKind {
    /// External port = internal port.
    Preserving,
    /// Each new mapping's port is the previous one plus a fixed delta.
    Sequential,
    /// No usable pattern.
    Random,
}

/// The port allocation verdict and how sure it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Allocation {
    /// `None` when no mapping could be observed (UDP blocked).
    pub kind: Option<AllocationKind>,
    /// The step between consecutive mappings, for `sequential`.
    pub delta: Option<i32>,
    /// Share of observations that agree with the verdict, 0..=1.
    pub confidence: f64,
    /// Number of new mappings observed.
    pub samples: usize,
}

/// RFC 3489's names, plus the firewall case it also names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Classic {
    OpenInternet,
    FullCone,
    RestrictedCone,
    PortRestrictedCone,
    Symmetric,
    /// No NAT, but a firewall filters inbound (RFC 3489 §10.1).
    SymmetricUdpFirewall,
    UdpBlocked,
    /// The server does not support RFC 5780 (no OTHER-ADDRESS), so
    /// mapping and filtering could not be measured.
    Unknown,
}

impl Classic {
    pub fn as_str(&self) -> &'static str {
        match self {
            Classic::OpenInternet => "open-internet",
            Classic::FullCone => "full-cone",
            Classic::RestrictedCone => "restricted-cone",
            Classic::PortRestrictedCone => "port-restricted-cone",
            Classic::Symmetric => "symmetric",
            Classic::SymmetricUdpFirewall => "symmetric-udp-firewall",
            Classic::UdpBlocked => "udp-blocked",
            Classic::Unknown => "unknown",
        }
    }

    /// The classic name for the measured behaviours.
    pub fn derive(
        nat_present: Option<bool>,
        mapping: Option<Behaviour>,
        filtering: Option<Behaviour>,
    ) -> Classic {
        use Behaviour::*;
        match (nat_present, mapping, filtering) {
            (None, _, _) => Classic::UdpBlocked,
            (Some(false), _, Some(EndpointIndependent)) => Classic::OpenInternet,
            (Some(false), _, Some(_)) => Classic::SymmetricUdpFirewall,
            (Some(true), Some(AddressDependent | AddressAndPortDependent), _) => Classic::Symmetric,
            (Some(true), Some(EndpointIndependent), Some(EndpointIndependent)) => Classic::FullCone,
            (Some(true), Some(EndpointIndependent), Some(AddressDependent)) => {
                Classic::RestrictedCone
            }
            (Some(true), Some(EndpointIndependent), Some(AddressAndPortDependent)) => {
                Classic::PortRestrictedCone
            }
            _ => Classic::Unknown,
        }
    }
}

/// What `--lifetime` found: the binding was alive after `alive` and gone
/// after `expired` (either may be unknown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifetime {
    #[serde(with = "secs_opt")]
    pub alive: Option<Duration>,
    #[serde(with = "secs_opt")]
    pub expired: Option<Duration>,
}

mod secs_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_secs))
    }
}

/// One observed mapping, in the order the mappings were created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingSample {
    pub local: SocketAddr,
    pub destination: SocketAddr,
    pub mapped: SocketAddr,
}

/// Everything `natpunch nat` measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NatReport {
    /// The server-reflexive address of the primary socket.
    pub mapped: Option<SocketAddr>,
    pub mapping: Option<Behaviour>,
    pub filtering: Option<Behaviour>,
    pub allocation: Allocation,
    pub hairpin: Option<bool>,
    pub classic: Classic,
    /// The primary socket's local address.
    pub local: SocketAddr,
    pub server: SocketAddr,
    /// The server's OTHER-ADDRESS (or CHANGED-ADDRESS), if it has one.
    pub other_address: Option<SocketAddr>,
    /// Whether a NAT sits between us and the server (`None`: UDP blocked).
    pub nat: Option<bool>,
    pub lifetime: Option<Lifetime>,
    /// Round-trip time of the first Binding transaction.
    pub rtt_ms: Option<u64>,
    pub samples: Vec<MappingSample>,
    /// Why some fields could not be measured.
    pub notes: Vec<String>,
}
