//! TCP hole punching, the plan: which of the peer's ports our punching
//! port connects to, in which order, and whether the first SYN to each
//! leaves with a limited TTL.
//!
//! The plan is the UDP ladder's, fed with the TCP facts (a NAT may map TCP
//! differently from UDP): each side's TCP mapping comes from STUN over TCP
//! from the punching port itself, to two of the server's ports, which
//! gives its mapping behaviour and port step. A cone is reached at its
//! mapping; a predictable symmetric NAT at the window of its next ports,
//! in creation order, so that two symmetric sides line up their k-th new
//! mappings (Wei et al. 2008, "A New Method for Symmetric NAT Traversal
//! in UDP and TCP").
//!
//! Lining up exactly breaks as soon as any other new flow passes either
//! NAT between its measurement and the punch (another host behind it, a
//! UDP query of our own: the lab's CI runs saw one such flow in about
//! half of the attempts). So between two sequential symmetric NATs one
//! side *sweeps*: its k-th SYN aims at the peer's (2k + 1)-th next port
//! instead of its (k + 1)-th, while the other side aims steadily. If `a`
//! and `b` other flows took ports at the two NATs, the sweeper's k-th
//! mapping meets the steady side's (2a + b)-th exactly when k = a + b (see
//! `sweep`): any 2a + b below the window finds its pair, and with no
//! other flow the first SYNs meet as before. A random symmetric NAT cannot be punched over TCP:
//! birthday probing would need hundreds of listening sockets and SYNs.
//!
//! The limited-TTL first SYN is the paper's answer to NATs that reset an
//! unsolicited SYN (Ford et al. measured TCP punching at 64 % against
//! 82 % for UDP, mostly for that reason): it opens our NAT and dies
//! before the peer's, and the normal SYNs follow once both NATs are open.
//! The driver carries the plan out (simultaneous open, with the listening
//! socket on the same port, retries, and the kernel's every outcome).

use std::net::SocketAddr;

use super::plan::{classify, NoPath, PairKind, PlanConfig, SideView};
use super::predict::predicted;
use crate::nat::Behaviour;
use crate::rendezvous::wire::{NatSummary, Pending, TcpInfo};

/// What the driver does for one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpPlan {
    /// The peer's ports, in the order the SYNs go out.
    pub targets: Vec<SocketAddr>,
    /// TTL of the first SYN to each target, if openers are used.
    pub opener_ttl: Option<u8>,
    pub kind: PairKind,
}

/// Why no TCP plan exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TcpPlanError {
    /// The TCP facts admit no direct path.
    #[error("{0}")]
    NoPath(NoPath),
    /// A random symmetric NAT against a cone: over UDP birthday probing
    /// finds a path, over TCP it is not attempted.
    #[error("one NAT picks TCP ports at random (birthday probing is UDP only)")]
    RandomPorts,
}

/// A side's TCP facts as the plan's view. `nat` is the side's UDP summary
/// (whether a NAT was seen at all); filtering is taken as port-restricted,
/// which is what conntrack does to TCP.
fn view(t: &TcpInfo, nat: &NatSummary, lan: &[SocketAddr], opener_ttl: Option<u8>) -> SideView {
    SideView {
        nat: NatSummary {
            mapping: t.mapping,
            filtering: Some(Behaviour::AddressAndPortDependent),
            allocation: t.allocation,
            delta: t.delta,
            opener_ttl,
            nat: nat.nat,
            pending: Pending::default(),
        },
        observed: t.mapped,
        fresh: Some(t.mapped),
        candidates: lan
            .iter()
            .map(|a| SocketAddr::new(a.ip(), t.local_port))
            .collect(),
        mapped: None,
        turn: Vec::new(),
    }
}

/// The plan for our side of a pair. `me_nat` and `peer_nat` are the UDP
/// summaries, `peer_lan` the peer's host candidates.
pub fn plan(
    me: &TcpInfo,
    me_nat: &NatSummary,
    peer: &TcpInfo,
    peer_nat: &NatSummary,
    peer_lan: &[SocketAddr],
    cfg: &PlanConfig,
) -> Result<TcpPlan, TcpPlanError> {
    let ttl = cfg.ttl.or(me_nat.opener_ttl).filter(|_| cfg.tcp_openers);
    let me_v = view(me, me_nat, &[], ttl);
    let peer_v = view(peer, peer_nat, peer_lan, peer_nat.opener_ttl);
    let kind = classify(&me_v, &peer_v);
    let targets = match kind {
        PairKind::Lan => {
            let mut t = peer_v.candidates.clone();
            t.push(peer.mapped);
            t
        }
        PairKind::Cone => vec![peer.mapped],
        PairKind::Predict | PairKind::Ttl if peer_v.hard() => {
            let targets = predicted(&peer_v, cfg.window);
            // Only between two sequential NATs: a port-preserving one
            // sends every SYN from one port, which a sweep would miss.
            let stepping = |t: &TcpInfo| t.delta.is_some_and(|d| d != 0);
            if me_v.hard() && stepping(me) && stepping(peer) && sweeps(me, peer) {
                sweep(peer, cfg.window, &targets)
            } else {
                targets
            }
        }
        PairKind::Predict | PairKind::Ttl | PairKind::Undecided => vec![peer.mapped],
        PairKind::Birthday => return Err(TcpPlanError::RandomPorts),
        PairKind::Impossible => {
            return Err(TcpPlanError::NoPath(NoPath {
                me: me_v.nat,
                peer: peer_v.nat,
            }))
        }
    };
    Ok(TcpPlan {
        targets,
        // Within one NAT (LAN) an opener would die before the peer.
        opener_ttl: ttl.filter(|_| kind != PairKind::Lan),
        kind,
    })
}

/// Which of two sequential symmetric sides sweeps: the one whose mapped
/// address sorts higher (both sides decide the same from the same facts).
fn sweeps(me: &TcpInfo, peer: &TcpInfo) -> bool {
    (me.mapped.ip(), me.mapped.port()) > (peer.mapped.ip(), peer.mapped.port())
}

/// The sweeper's order of the peer's ports: its k-th SYN goes to the
/// peer's (2k + 1)-th next port (for `window` SYNs), then the ports just
/// behind the peer's measured one that `predicted` lists.
///
/// Why it meets: say `a` other flows took ports at the sweeper's NAT and
/// `b` at the steady side's after they were measured. The sweeper's k-th
/// SYN then leaves from its (k + 1 + a)-th next port to the peer's
/// (2k + 1)-th; the steady side's m-th leaves from its (m + 1 + b)-th
/// next port to the sweeper's (m + 1)-th. They are one 4-tuple when
/// m = k + a and 2k = m + b, that is k = a + b and m = 2a + b: one pair
/// meets for every 2a + b below the window.
fn sweep(peer: &TcpInfo, window: u16, predicted: &[SocketAddr]) -> Vec<SocketAddr> {
    let (Some(delta), fresh) = (peer.delta, peer.mapped) else {
        return predicted.to_vec();
    };
    let mut order: Vec<SocketAddr> = (0..i32::from(window))
        .map_while(|k| super::plan::port_step(fresh.port(), delta, 2 * k + 1))
        .map(|p| SocketAddr::new(fresh.ip(), p))
        .collect();
    // The ports behind the measured one, as `predicted` has them.
    let behind = |a: &&SocketAddr| {
        (i32::from(a.port()) - i32::from(fresh.port())).signum() == -delta.signum()
    };
    order.extend(predicted.iter().filter(behind));
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::AllocationKind;

    fn info(mapped: &str, mapping: Behaviour, alloc: AllocationKind, delta: i32) -> TcpInfo {
        TcpInfo {
            mapped: mapped.parse().unwrap(),
            mapping: Some(mapping),
            allocation: Some(alloc),
            delta: Some(delta),
            local_port: 4000,
            only: false,
        }
    }

    fn cone(mapped: &str) -> TcpInfo {
        info(
            mapped,
            Behaviour::EndpointIndependent,
            AllocationKind::Preserving,
            0,
        )
    }

    fn sequential(mapped: &str, delta: i32) -> TcpInfo {
        info(
            mapped,
            Behaviour::AddressAndPortDependent,
            AllocationKind::Sequential,
            delta,
        )
    }

    fn nat() -> NatSummary {
        NatSummary {
            nat: Some(true),
            opener_ttl: Some(2),
            ..NatSummary::default()
        }
    }

    fn cfg() -> PlanConfig {
        crate::punch::PunchConfig::new(1).plan
    }

    #[test]
    fn cones_connect_to_each_others_mapping_behind_openers() {
        let a = cone("198.51.100.2:4000");
        let b = cone("198.51.100.18:5000");
        let p = plan(&a, &nat(), &b, &nat(), &[], &cfg()).unwrap();
        assert_eq!(p.kind, PairKind::Cone);
        assert_eq!(p.targets, vec![b.mapped]);
        assert_eq!(p.opener_ttl, Some(2));
    }

    #[test]
    fn two_sequential_symmetric_nats_aim_at_the_same_rank_of_new_ports() {
        let a = sequential("198.51.100.2:10010", 1);
        let b = sequential("198.51.100.18:10020", 1);
        let pa = plan(&a, &nat(), &b, &nat(), &[], &cfg()).unwrap();
        let pb = plan(&b, &nat(), &a, &nat(), &[], &cfg()).unwrap();
        assert_eq!(pa.kind, PairKind::Ttl);
        // A's k-th SYN leaves from 10010 + k and aims at 10020 + k; B's
        // k-th leaves from 10020 + k and aims at 10010 + k.
        assert_eq!(pa.targets[0].port(), 10021);
        assert_eq!(pb.targets[0].port(), 10011);
        assert_eq!(pa.targets[5].port(), 10026);
    }

    #[test]
    fn one_sequential_side_sweeps_so_other_flows_at_either_nat_still_meet() {
        let a = sequential("198.51.100.2:10010", 1);
        let b = sequential("198.51.100.18:10020", 1);
        let pa = plan(&a, &nat(), &b, &nat(), &[], &cfg()).unwrap();
        let pb = plan(&b, &nat(), &a, &nat(), &[], &cfg()).unwrap();
        // B sorts higher and sweeps; A aims steadily.
        assert_eq!(pa.targets[0].port(), 10021);
        assert_eq!(pa.targets[5].port(), 10026);
        let ports: Vec<u16> = pb.targets.iter().map(|t| t.port()).take(4).collect();
        assert_eq!(ports, [10011, 10013, 10015, 10017]);
        let window = usize::from(cfg().window);
        let unique: std::collections::HashSet<_> = pb.targets.iter().collect();
        assert_eq!(unique.len(), pb.targets.len(), "no 4-tuple twice");
        // Each side's SYNs leave in order from its next ports, after `x`
        // and `y` other flows took some: a pair meets for every x + y the
        // window allows.
        for x in 0..4u16 {
            for y in 0..4u16 {
                let from_a: Vec<(u16, u16)> = (0..window as u16)
                    .map(|m| (10011 + m + x, pa.targets[usize::from(m)].port()))
                    .collect();
                let met = (0..window as u16).any(|k| {
                    let b_from = 10021 + k + y;
                    let b_to = pb.targets[usize::from(k)].port();
                    from_a.contains(&(b_to, b_from))
                });
                assert!(met, "{x} other flows at A's NAT, {y} at B's: no pair meets");
            }
        }
    }

    #[test]
    fn a_port_preserving_symmetric_side_never_sweeps() {
        // It sorts higher, but sends every SYN from one port: a sweep
        // would meet the steady side only for an even count of flows.
        let keep = info(
            "198.51.100.18:4000",
            Behaviour::AddressAndPortDependent,
            AllocationKind::Preserving,
            0,
        );
        let seq = sequential("198.51.100.2:10010", 1);
        let p = plan(&keep, &nat(), &seq, &nat(), &[], &cfg()).unwrap();
        let ports: Vec<u16> = p.targets.iter().map(|t| t.port()).take(3).collect();
        assert_eq!(ports, [10011, 10012, 10013]);
    }

    #[test]
    fn the_cone_aims_at_the_window_and_the_symmetric_side_at_the_cone() {
        let cone = cone("198.51.100.2:4000");
        let sym = sequential("198.51.100.18:10020", 2);
        let pc = plan(&cone, &nat(), &sym, &nat(), &[], &cfg()).unwrap();
        assert_eq!(pc.kind, PairKind::Predict);
        assert_eq!(pc.targets[0].port(), 10022);
        assert_eq!(pc.targets[1].port(), 10024);
        let ps = plan(&sym, &nat(), &cone, &nat(), &[], &cfg()).unwrap();
        assert_eq!(ps.targets, vec![cone.mapped]);
    }

    #[test]
    fn random_ports_get_no_tcp_plan() {
        let cone = cone("198.51.100.2:4000");
        let rnd = info(
            "198.51.100.18:31337",
            Behaviour::AddressAndPortDependent,
            AllocationKind::Random,
            0,
        );
        assert_eq!(
            plan(&cone, &nat(), &rnd, &nat(), &[], &cfg()),
            Err(TcpPlanError::RandomPorts)
        );
        let other = TcpInfo {
            mapped: "198.51.100.2:31000".parse().unwrap(),
            ..rnd
        };
        assert!(matches!(
            plan(&other, &nat(), &rnd, &nat(), &[], &cfg()),
            Err(TcpPlanError::NoPath(_))
        ));
    }
}
