//! Port allocation pattern: from the mappings observed in creation order,
//! decide whether the NAT preserves ports, allocates sequentially with a
//! fixed delta, or picks at random. Port prediction (punch) needs exactly
//! this.

use std::collections::HashMap;

use super::report::{Allocation, AllocationKind, MappingSample};

/// Largest |delta| still called sequential. Prediction probes a window of a
/// few deltas around the guess; beyond 64 the window stops being small and
/// the NAT is better treated as random.
pub const MAX_SEQUENTIAL_DELTA: i32 = 64;

/// Share of observations that must agree for a verdict other than random.
/// Other hosts behind the same NAT can take ports between our mappings, so
/// a sequential NAT seldom agrees 100 %; 0.6 still rejects random NATs,
/// whose deltas almost never repeat.
pub const MIN_AGREEMENT: f64 = 0.6;

/// Classifies the mappings, given in the order they were created.
pub fn classify(samples: &[MappingSample]) -> Allocation {
    // A new mapping is the first time a (local, mapped) pair is seen.
    let mut new_mappings: Vec<&MappingSample> = Vec::new();
    for s in samples {
        if !new_mappings
            .iter()
            .any(|m| m.local == s.local && m.mapped == s.mapped)
        {
            new_mappings.push(s);
        }
    }
    let n = new_mappings.len();
    if n == 0 {
        return Allocation {
            kind: None,
            delta: None,
            confidence: 0.0,
            samples: 0,
        };
    }
    // Preserving: each socket's first mapping kept its local port.
    let mut firsts: Vec<&MappingSample> = Vec::new();
    for m in &new_mappings {
        if !firsts.iter().any(|f| f.local == m.local) {
            firsts.push(m);
        }
    }
    let preserved = firsts
        .iter()
        .filter(|f| f.local.port() == f.mapped.port())
        .count();
    let preserved_share = preserved as f64 / firsts.len() as f64;
    if preserved_share >= MIN_AGREEMENT {
        return Allocation {
            kind: Some(AllocationKind::Preserving),
            delta: None,
            confidence: preserved_share,
            samples: n,
        };
    }
    let diffs: Vec<i32> = new_mappings
        .windows(2)
        .map(|w| i32::from(w[1].mapped.port()) - i32::from(w[0].mapped.port()))
        .collect();
    let mut counts: HashMap<i32, usize> = HashMap::new();
    for d in &diffs {
        *counts.entry(*d).or_default() += 1;
    }
    // The most common delta; ties go to the smallest magnitude.
    let mode = counts
        .iter()
        .max_by_key(|(d, c)| (**c, -d.abs()))
        .map(|(d, c)| (*d, *c));
    if let Some((delta, count)) = mode {
        let share = count as f64 / diffs.len() as f64;
        if delta != 0 && delta.abs() <= MAX_SEQUENTIAL_DELTA && share >= MIN_AGREEMENT && count >= 2
        {
            return Allocation {
                kind: Some(AllocationKind::Sequential),
                delta: Some(delta),
                confidence: share,
                samples: n,
            };
        }
    }
    let small = diffs
        .iter()
        .filter(|d| **d != 0 && d.abs() <= MAX_SEQUENTIAL_DELTA)
        .count();
    let confidence = if diffs.is_empty() {
        0.0
    } else {
        1.0 - small as f64 / diffs.len() as f64
    };
    Allocation {
        kind: Some(AllocationKind::Random),
        delta: None,
        confidence,
        samples: n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn sample(local: u16, mapped: u16) -> MappingSample {
        let l: SocketAddr = format!("10.0.0.2:{local}").parse().unwrap();
        MappingSample {
            local: l,
            destination: "192.0.2.1:3478".parse().unwrap(),
            mapped: format!("198.51.100.1:{mapped}").parse().unwrap(),
        }
    }

    #[test]
    fn preserving() {
        let s: Vec<_> = [40001, 51234, 33333, 44444]
            .iter()
            .map(|p| sample(*p, *p))
            .collect();
        let a = classify(&s);
        assert_eq!(a.kind, Some(AllocationKind::Preserving));
        assert_eq!(a.confidence, 1.0);
    }

    #[test]
    fn sequential_with_delta_and_noise() {
        let ports = [1000, 1002, 1004, 1010, 1012, 1014, 1016];
        let s: Vec<_> = ports
            .iter()
            .enumerate()
            .map(|(i, p)| sample(40000 + i as u16 * 7, *p))
            .collect();
        let a = classify(&s);
        assert_eq!(a.kind, Some(AllocationKind::Sequential));
        assert_eq!(a.delta, Some(2));
        assert!((a.confidence - 5.0 / 6.0).abs() < 1e-9);
    }

    #[test]
    fn endpoint_independent_repeats_are_one_mapping() {
        // Socket 0 seen three times with the same mapping, then new sockets.
        let s = vec![
            sample(40000, 2000),
            sample(40000, 2000),
            sample(40000, 2000),
            sample(40100, 2001),
            sample(40200, 2002),
            sample(40300, 2003),
        ];
        let a = classify(&s);
        assert_eq!(a.kind, Some(AllocationKind::Sequential));
        assert_eq!(a.delta, Some(1));
        assert_eq!(a.samples, 4);
    }

    #[test]
    fn random() {
        let ports = [31000, 12000, 55000, 2000, 40321, 8000];
        let s: Vec<_> = ports
            .iter()
            .enumerate()
            .map(|(i, p)| sample(40000 + i as u16, *p))
            .collect();
        let a = classify(&s);
        assert_eq!(a.kind, Some(AllocationKind::Random));
        assert_eq!(a.delta, None);
        assert_eq!(a.confidence, 1.0);
    }

    #[test]
    fn nothing_observed() {
        assert_eq!(classify(&[]).kind, None);
    }
}
