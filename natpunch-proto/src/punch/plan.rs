//! Which technique a pair of NATs needs, and the probe streams each side
//! sends. Both peers run the same pure functions on the same exchanged
//! facts, so each can compute the other's plan, which port prediction
//! relies on: the first *new* destination each side sends to must be the
//! one the other side predicts.

use std::net::SocketAddr;
use std::time::Duration;

use crate::nat::{AllocationKind, Behaviour};
use crate::rendezvous::NatSummary;
use crate::SocketId;

use super::wire::Strategy;

/// What one side knows of a peer (or of itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideView {
    pub nat: NatSummary,
    /// The address the rendezvous server observed.
    pub observed: SocketAddr,
    /// A mapping taken just before punching (for prediction).
    pub fresh: Option<SocketAddr>,
    /// Host candidates (LAN addresses, forwarded ports).
    pub candidates: Vec<SocketAddr>,
}

impl SideView {
    /// One mapping for every destination: a cone, or no NAT at all. An
    /// unknown mapping (server without RFC 5780) is tried as a cone.
    pub fn easy(&self) -> bool {
        self.nat.nat == Some(false)
            || matches!(
                self.nat.mapping,
                Some(Behaviour::EndpointIndependent) | None
            )
    }

    /// A non-cone whose next port can be predicted.
    pub fn predictable(&self) -> bool {
        matches!(
            self.nat.allocation,
            Some(AllocationKind::Sequential | AllocationKind::Preserving)
        )
    }

    fn port_restricted(&self) -> bool {
        matches!(self.nat.filtering, Some(Behaviour::AddressAndPortDependent))
    }
}

/// The technique a pair needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairKind {
    /// Same public address: LAN candidates (and hairpin).
    Lan,
    /// Both cones: simultaneous sends to the observed addresses.
    Cone,
    /// A cone and a predictable symmetric NAT.
    Predict,
    /// Two predictable symmetric NATs: prediction with limited-TTL openers.
    Ttl,
    /// A port-restricted cone and a random symmetric NAT.
    Birthday,
    /// No direct path can exist; the string says why.
    Impossible(String),
}

impl PairKind {
    pub fn strategy(&self) -> Option<Strategy> {
        Some(match self {
            PairKind::Lan => Strategy::Lan,
            PairKind::Cone => Strategy::Cone,
            PairKind::Predict => Strategy::Predict,
            PairKind::Ttl => Strategy::Ttl,
            PairKind::Birthday => Strategy::Birthday,
            PairKind::Impossible(_) => return None,
        })
    }
}

fn describe(s: &SideView) -> String {
    let m = s
        .nat
        .mapping
        .map(|b| b.as_str())
        .unwrap_or("unknown mapping");
    let a = match s.nat.allocation {
        Some(AllocationKind::Random) => "random ports",
        Some(AllocationKind::Sequential) => "sequential ports",
        Some(AllocationKind::Preserving) => "preserved ports",
        None => "unknown ports",
    };
    format!("{m} mapping with {a}")
}

/// Classifies a pair. Symmetric: `classify(a, b) == classify(b, a)`.
pub fn classify(a: &SideView, b: &SideView) -> PairKind {
    if a.observed.ip() == b.observed.ip() {
        return PairKind::Lan;
    }
    match (a.easy(), b.easy()) {
        (true, true) => PairKind::Cone,
        (true, false) | (false, true) => {
            let (easy, hard) = if a.easy() { (a, b) } else { (b, a) };
            if hard.predictable() {
                PairKind::Predict
            } else if easy.port_restricted() {
                PairKind::Birthday
            } else {
                // The hard side's packets from any port get through a
                // filter that is not port-restricted.
                PairKind::Cone
            }
        }
        (false, false) => {
            if a.predictable() && b.predictable() {
                PairKind::Ttl
            } else {
                PairKind::Impossible(format!(
                    "no direct path possible: both NATs map per destination ({} / {}), and at least one picks ports at random, so neither side can predict the other's port; a relay is needed",
                    describe(a),
                    describe(b)
                ))
            }
        }
    }
}

/// A sequence of probe targets sent round after round from one socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stream {
    pub strategy: Strategy,
    pub socket: SocketId,
    pub targets: Vec<SocketAddr>,
    /// Delay from the start of the attempt to the first round.
    pub offset: Duration,
    /// Time between rounds.
    pub interval: Duration,
    /// Rounds to send (the attempt's deadline also stops it).
    pub rounds: u32,
    /// Gap between targets within a round (pacing).
    pub gap: Duration,
    /// TTL of the first round's packets (limited-TTL openers).
    pub first_ttl: Option<u8>,
}

/// Knobs for the plan.
#[derive(Debug, Clone)]
pub struct PlanConfig {
    /// Ports probed around a predicted one.
    pub window: u16,
    /// Sockets the hard side opens for birthday probing.
    pub birthday_sockets: u16,
    /// Random ports the easy side sprays.
    pub birthday_probes: u32,
    /// Spray rate (probes per second).
    pub spray_rate: u32,
    /// Time between probe rounds to a target.
    pub interval: Duration,
    /// Override of the limited TTL (`-t`).
    pub ttl: Option<u8>,
    pub seed: u64,
}

/// Adds `k · delta` to a port, staying in 1..=65535.
pub fn port_step(base: u16, delta: i32, k: i32) -> Option<u16> {
    let p = i64::from(base) + i64::from(delta) * i64::from(k);
    (1..=65535).contains(&p).then_some(p as u16)
}

/// The streams `me` sends to `peer` for `kind` from the coordinated start,
/// except those aimed at predicted ports (see [`prediction_streams`]).
pub fn streams(kind: &PairKind, me: &SideView, peer: &SideView, cfg: &PlanConfig) -> Vec<Stream> {
    match kind {
        PairKind::Lan => super::lan::streams(me, peer, cfg),
        PairKind::Cone => super::cone::streams(peer, cfg, Strategy::Cone),
        PairKind::Birthday => super::birthday::streams(me, peer, cfg),
        PairKind::Predict | PairKind::Ttl | PairKind::Impossible(_) => Vec::new(),
    }
}

/// The streams aimed at the peer's predicted ports. They start when both
/// sides have taken their fresh mappings: the initiator on the server's
/// `Accepted`, the responder on `Go`, which the server times together.
pub fn prediction_streams(
    kind: &PairKind,
    me: &SideView,
    peer: &SideView,
    cfg: &PlanConfig,
) -> Vec<Stream> {
    match kind {
        // Both sides: the symmetric side's first new mapping (toward the
        // cone) must not reach the cone's NAT before the cone's probes to it
        // leave, so it starts with them, behind openers.
        PairKind::Predict => super::predict::streams(me, peer, cfg),
        PairKind::Ttl => super::ttl::streams(me, peer, cfg),
        _ => Vec::new(),
    }
}

/// Extra sockets `me` needs (birthday: the hard side's many mappings).
pub fn extra_sockets(kind: &PairKind, me: &SideView, cfg: &PlanConfig) -> usize {
    if *kind == PairKind::Birthday && !me.easy() {
        cfg.birthday_sockets as usize
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(mapping: Behaviour, filtering: Behaviour, alloc: AllocationKind, ip: &str) -> SideView {
        SideView {
            nat: NatSummary {
                mapping: Some(mapping),
                filtering: Some(filtering),
                allocation: Some(alloc),
                delta: (alloc == AllocationKind::Sequential).then_some(1),
                opener_ttl: Some(2),
                nat: Some(true),
            },
            observed: format!("{ip}:4000").parse().unwrap(),
            fresh: None,
            candidates: vec![],
        }
    }

    #[test]
    fn classification_is_symmetric_and_right() {
        use AllocationKind::*;
        use Behaviour::*;
        let fc = side(
            EndpointIndependent,
            EndpointIndependent,
            Preserving,
            "198.51.100.2",
        );
        let prc = side(
            EndpointIndependent,
            AddressAndPortDependent,
            Preserving,
            "198.51.100.3",
        );
        let seq = side(
            AddressAndPortDependent,
            AddressAndPortDependent,
            Sequential,
            "198.51.100.4",
        );
        let seq2 = side(
            AddressAndPortDependent,
            AddressAndPortDependent,
            Sequential,
            "198.51.100.6",
        );
        let rnd = side(
            AddressAndPortDependent,
            AddressAndPortDependent,
            Random,
            "198.51.100.5",
        );
        let rnd2 = side(
            AddressAndPortDependent,
            AddressAndPortDependent,
            Random,
            "198.51.100.7",
        );
        let cases = [
            (&fc, &prc, PairKind::Cone),
            (&fc, &seq, PairKind::Predict),
            (&seq, &seq2, PairKind::Ttl),
            (&fc, &rnd, PairKind::Cone),
            (&prc, &rnd, PairKind::Birthday),
        ];
        for (a, b, want) in cases {
            assert_eq!(classify(a, b), want);
            assert_eq!(classify(b, a), want);
        }
        assert!(matches!(classify(&rnd, &rnd2), PairKind::Impossible(_)));
        assert!(matches!(classify(&rnd, &seq), PairKind::Impossible(_)));
        let mut same = prc.clone();
        same.observed = "198.51.100.2:5000".parse().unwrap();
        assert_eq!(classify(&fc, &same), PairKind::Lan);
    }

    #[test]
    fn port_step_stays_in_range() {
        assert_eq!(port_step(65534, 1, 1), Some(65535));
        assert_eq!(port_step(65535, 1, 1), None);
        assert_eq!(port_step(10, -2, 5), Some(0).filter(|_| false));
        assert_eq!(port_step(10000, 2, 3), Some(10006));
    }
}
