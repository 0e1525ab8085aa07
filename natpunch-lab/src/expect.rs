//! What `natpunch nat` must report from behind a lab side, and the check.

use natpunch_proto::nat::{AllocationKind, Behaviour, NatReport};
use serde::Serialize;

use crate::spec::{NatSpec, PortAllocation, Side};

/// The behaviour a host should measure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Expected {
    pub nat: bool,
    pub mapping: Behaviour,
    pub filtering: Behaviour,
    pub allocation: AllocationKind,
    pub delta: Option<i32>,
    /// `None` where the discovery cannot tell (a non-EIM NAT that filters
    /// drops the hairpin probe either way).
    pub hairpin: Option<bool>,
}

fn strictest(a: Behaviour, b: Behaviour) -> Behaviour {
    fn rank(x: Behaviour) -> u8 {
        match x {
            Behaviour::EndpointIndependent => 0,
            Behaviour::AddressDependent => 1,
            Behaviour::AddressAndPortDependent => 2,
        }
    }
    if rank(a) >= rank(b) {
        a
    } else {
        b
    }
}

/// What the hairpin test reports when the probe does (`arrives`) or does
/// not come back. A missing probe only proves "no hairpin" where it could
/// not have been filtered (EIM mapping or EIF filtering); otherwise the
/// discovery says it cannot tell.
fn testable_hairpin(mapping: Behaviour, filtering: Behaviour, arrives: bool) -> Option<bool> {
    if arrives {
        Some(true)
    } else {
        (mapping == Behaviour::EndpointIndependent || filtering == Behaviour::EndpointIndependent)
            .then_some(false)
    }
}

/// The expectation for a host on `side`.
pub fn expected(side: &Side) -> Expected {
    match side {
        Side::Direct => Expected {
            nat: false,
            mapping: Behaviour::EndpointIndependent,
            filtering: Behaviour::EndpointIndependent,
            allocation: AllocationKind::Preserving,
            delta: None,
            hairpin: Some(true),
        },
        Side::Nat(n) => Expected {
            nat: true,
            mapping: n.mapping,
            filtering: n.filtering,
            allocation: n.allocation.kind(),
            delta: n.allocation.delta(),
            // The lab's NATs do not filter hairpinned traffic.
            hairpin: testable_hairpin(n.mapping, n.filtering, n.hairpin),
        },
        Side::DoubleNat { home, carrier } => {
            let mapping = strictest(home.mapping, carrier.mapping);
            let filtering = strictest(home.filtering, carrier.filtering);
            // A preserving carrier passes the home NAT's ports through.
            let alloc = if carrier.allocation == PortAllocation::Preserving {
                home.allocation
            } else {
                carrier.allocation
            };
            Expected {
                nat: true,
                mapping,
                filtering,
                allocation: alloc.kind(),
                delta: alloc.delta(),
                // The probe to the outer mapping turns at the carrier and
                // comes back to the home NAT as ordinary inbound traffic:
                // from the very address it was sent to if the home NAT is
                // EIM, else from a new carrier port that only a filter not
                // keyed on ports lets in.
                hairpin: testable_hairpin(
                    mapping,
                    filtering,
                    carrier.hairpin
                        && (home.mapping == Behaviour::EndpointIndependent
                            || home.filtering != Behaviour::AddressAndPortDependent),
                ),
            }
        }
    }
}

/// The expectation for a home NAT under a shared carrier.
pub fn expected_shared(home: &NatSpec, carrier: &NatSpec) -> Expected {
    expected(&Side::DoubleNat {
        home: home.clone(),
        carrier: carrier.clone(),
    })
}

/// Differences between what was expected and what was measured.
pub fn mismatches(e: &Expected, r: &NatReport) -> Vec<String> {
    let mut m = Vec::new();
    let mut check = |what: &str, want: String, got: String| {
        if want != got {
            m.push(format!("{what}: expected {want}, measured {got}"));
        }
    };
    check("nat", format!("{:?}", Some(e.nat)), format!("{:?}", r.nat));
    check(
        "mapping",
        format!("{:?}", Some(e.mapping)),
        format!("{:?}", r.mapping),
    );
    check(
        "filtering",
        format!("{:?}", Some(e.filtering)),
        format!("{:?}", r.filtering),
    );
    check(
        "allocation",
        format!("{:?}", Some(e.allocation)),
        format!("{:?}", r.allocation.kind),
    );
    check(
        "delta",
        format!("{:?}", e.delta),
        format!("{:?}", r.allocation.delta),
    );
    check(
        "hairpin",
        format!("{:?}", e.hairpin),
        format!("{:?}", r.hairpin),
    );
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_nat_combines() {
        let e = expected(&Side::parse("full-cone+symmetric-sequential:delta=2").unwrap());
        assert_eq!(e.mapping, Behaviour::AddressAndPortDependent);
        assert_eq!(e.allocation, AllocationKind::Sequential);
        assert_eq!(e.delta, Some(2));
        assert_eq!(e.hairpin, Some(true));
        let e = expected(&Side::parse("symmetric-sequential+full-cone").unwrap());
        assert_eq!(e.hairpin, None);
        let e = expected(&Side::parse("full-cone+symmetric-random:hairpin=off").unwrap());
        assert_eq!(e.hairpin, None);
        let e = expected(&Side::parse("symmetric-random+full-cone").unwrap());
        assert_eq!(e.allocation, AllocationKind::Random);
        let e = expected(&Side::parse("port-restricted-cone+full-cone").unwrap());
        assert_eq!(e.filtering, Behaviour::AddressAndPortDependent);
        assert_eq!(e.hairpin, Some(true));
    }
}
