//! The vocabulary every technique shares ([`SideView`], [`Stream`],
//! [`PlanConfig`]) and the pure decisions: which technique a pair of NATs
//! needs ([`classify`]), which groups of streams each side runs for it
//! ([`groups`]) and which may start before the coordinated start
//! ([`starts_early`]). Both peers run the same functions on the same
//! exchanged facts, so each can compute the other's plan, which port
//! prediction relies on: the first *new* destination each side sends to
//! must be the one the other side predicts. This module imports no
//! technique; the dispatcher in [`super`] does.

use std::net::SocketAddr;
use std::time::Duration;

use crate::nat::{AllocationKind, Behaviour};
use crate::portmap::Mapped;
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
    /// The port its gateway maps for it, if any: reachable by anyone.
    pub mapped: Option<Mapped>,
    /// Addresses TURN servers relay to it (relay paths, not direct ones).
    pub turn: Vec<SocketAddr>,
}

impl SideView {
    /// The mapping behaviour is still being measured.
    pub fn mapping_pending(&self) -> bool {
        self.nat.pending.mapping
    }

    /// One mapping for every destination: a cone, or no NAT at all. An
    /// unknown mapping (server without RFC 5780) is tried as a cone; one
    /// still being measured is neither easy nor hard yet.
    pub fn easy(&self) -> bool {
        !self.mapping_pending()
            && (self.nat.nat == Some(false)
                || matches!(
                    self.nat.mapping,
                    Some(Behaviour::EndpointIndependent) | None
                ))
    }

    /// A mapping per destination (known, not pending).
    pub fn hard(&self) -> bool {
        !self.mapping_pending() && !self.easy()
    }

    /// A non-cone whose next port can be predicted.
    pub fn predictable(&self) -> bool {
        matches!(
            self.nat.allocation,
            Some(AllocationKind::Sequential | AllocationKind::Preserving)
        )
    }

    /// Filters by address and port. Filtering not measured (yet) counts as
    /// port-restricted: it is the common home-router behaviour, and the
    /// techniques for it also work through laxer filters.
    fn port_restricted(&self) -> bool {
        matches!(
            self.nat.filtering,
            Some(Behaviour::AddressAndPortDependent) | None
        )
    }
}

/// The technique a pair needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// No direct path can exist: both NATs map per destination and at
    /// least one picks ports at random ([`NoPath`] says why in words).
    Impossible,
    /// A mapping behaviour is still being measured.
    Undecided,
}

impl PairKind {
    pub fn strategy(&self) -> Option<Strategy> {
        Some(match self {
            PairKind::Lan => Strategy::Lan,
            PairKind::Cone => Strategy::Cone,
            PairKind::Predict => Strategy::Predict,
            PairKind::Ttl => Strategy::Ttl,
            PairKind::Birthday => Strategy::Birthday,
            PairKind::Impossible | PairKind::Undecided => return None,
        })
    }
}

/// Why two NATs admit no direct path, for people: both map per
/// destination, and at least one allocates ports at random.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoPath {
    pub me: NatSummary,
    pub peer: NatSummary,
}

impl std::fmt::Display for NoPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no direct path possible: both NATs map per destination ({} / {}), and at least one picks ports at random, so neither side can predict the other's port; a relay is needed",
            describe(&self.me),
            describe(&self.peer)
        )
    }
}

fn describe(s: &NatSummary) -> String {
    let m = s.mapping.map(|b| b.as_str()).unwrap_or("unknown mapping");
    let a = match s.allocation {
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
    if a.mapping_pending() || b.mapping_pending() {
        return PairKind::Undecided;
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
                PairKind::Impossible
            }
        }
    }
}

/// A group of probe streams a side runs for some technique; each starts
/// once and runs until the attempt ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    /// LAN candidates, and hairpin through the shared NAT.
    Lan,
    /// From the main socket to the peer's observed address: the whole of
    /// the cone technique, and the hard side's part of prediction.
    Direct,
    /// The easy side's probes to the hard side's predicted ports.
    PredictEasy,
    /// Matched prediction on both symmetric sides, behind openers.
    Ttl,
    /// The easy side's spray over the hard side's ports.
    BirthdayEasy,
    /// The hard side's many sockets, each opening one mapping.
    BirthdayHard,
    /// From the main socket to the port the peer's gateway maps for it:
    /// open to anyone, so it works whatever either NAT does.
    Portmap,
    /// Over a punched TCP stream ([`super::tcp`]): the driver connects it,
    /// the machine then probes through it like any other path.
    Tcp,
    /// From the main socket to the peer's TURN relayed addresses: a relay
    /// path, run beside the direct groups ([`super::turn`]).
    Turn,
}

/// The groups `me` runs for a pair of kind `kind`.
pub fn groups(kind: PairKind, me: &SideView) -> Vec<Group> {
    match kind {
        PairKind::Lan => vec![Group::Lan],
        PairKind::Cone => vec![Group::Direct],
        PairKind::Predict if me.easy() => vec![Group::Direct, Group::PredictEasy],
        PairKind::Predict => vec![Group::Direct],
        PairKind::Ttl => vec![Group::Ttl],
        PairKind::Birthday if me.easy() => vec![Group::Direct, Group::BirthdayEasy],
        PairKind::Birthday => vec![Group::Direct, Group::BirthdayHard],
        PairKind::Impossible | PairKind::Undecided => Vec::new(),
    }
}

/// Whether `group` may start before the server's coordinated start
/// ("go", once both mappings are known). Prediction, birthday and anything
/// a symmetric NAT sends (each new destination takes one of its ports)
/// wait for it, so that both sides begin together; LAN probes and a cone's
/// direct probes do not.
pub fn starts_early(group: Group, me: &SideView, peer: &SideView) -> bool {
    match group {
        Group::Lan | Group::Portmap | Group::Tcp | Group::Turn => true,
        Group::BirthdayEasy | Group::BirthdayHard => false,
        // An easy side's probes cost it nothing. A side still measuring
        // may send to a known cone: if it turns out symmetric, that is its
        // part of prediction, and its fresh mapping comes after.
        Group::Direct => me.easy() || (me.mapping_pending() && peer.easy()),
        Group::PredictEasy | Group::Ttl => false,
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
    /// TCP's first SYNs go out with the limited TTL (off only to measure
    /// what the openers are worth: `--tcp-openers off`).
    pub tcp_openers: bool,
    pub seed: u64,
}

/// Adds `k · delta` to a port, staying in 1..=65535.
pub fn port_step(base: u16, delta: i32, k: i32) -> Option<u16> {
    let p = i64::from(base) + i64::from(delta) * i64::from(k);
    (1..=65535).contains(&p).then_some(p as u16)
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
                pending: Default::default(),
            },
            observed: format!("{ip}:4000").parse().unwrap(),
            fresh: None,
            candidates: vec![],
            mapped: None,
            turn: vec![],
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
        assert_eq!(classify(&rnd, &rnd2), PairKind::Impossible);
        assert_eq!(classify(&rnd, &seq), PairKind::Impossible);
        // A side still measuring leaves the pair undecided, except on one
        // NAT.
        let mut pending = prc.clone();
        pending.nat = NatSummary::measuring();
        assert_eq!(classify(&pending, &fc), PairKind::Undecided);
        // Unmeasured filtering counts as port-restricted.
        let mut unknown_filter = prc.clone();
        unknown_filter.nat.filtering = None;
        assert_eq!(classify(&unknown_filter, &rnd), PairKind::Birthday);
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
