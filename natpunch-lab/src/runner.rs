//! Runs scenarios in labs: `verify` (discovery against every preset) and
//! the pair grid.

use std::time::Instant;

use natpunch_proto::nat::NatReport;
use serde::Serialize;

use crate::expect::{expected, expected_shared, mismatches, Expected};
use crate::grid::{GridRow, Outcome};
use crate::spec::{NatSpec, Side, SpecError, TopologySpec, PRESETS};
use crate::topology::{run, Lab, LabError, LabOptions, Node};

/// Initial RTO for `natpunch nat` inside the lab: the links add no delay
/// unless asked, so 100 ms keeps a filtering test's timeout at 1.5 s.
const LAB_RTO_MS: u64 = 100;

/// One lab to build and the hosts to check in it.
#[derive(Debug, Clone)]
pub struct VerifyCase {
    pub name: String,
    pub topology: TopologySpec,
    pub checks: Vec<(Node, String, Expected)>,
}

fn nat(s: &str) -> Result<NatSpec, SpecError> {
    NatSpec::parse(s)
}

/// Every preset, sequential delta 2, double NAT (cone outside), a carrier
/// NAT shared by both sides, both hosts behind the same NAT, and a direct
/// host: two hosts per lab, so seven labs cover it all.
pub fn verify_cases() -> Result<Vec<VerifyCase>, SpecError> {
    let mut cases = Vec::new();
    let pairs = [
        (PRESETS[0], PRESETS[1]),
        (PRESETS[2], PRESETS[3]),
        (PRESETS[4], PRESETS[5]),
        (PRESETS[6], "symmetric-sequential:delta=2"),
    ];
    for (a, b) in pairs {
        let (sa, sb) = (Side::Nat(nat(a)?), Side::Nat(nat(b)?));
        cases.push(VerifyCase {
            name: format!("{a} / {b}"),
            checks: vec![
                (Node::HostA, a.to_string(), expected(&sa)),
                (Node::HostB, b.to_string(), expected(&sb)),
            ],
            topology: TopologySpec::Pair { a: sa, b: sb },
        });
    }
    let double = Side::DoubleNat {
        home: nat("symmetric-sequential")?,
        carrier: nat("full-cone")?,
    };
    cases.push(VerifyCase {
        name: "double NAT / direct".into(),
        checks: vec![
            (Node::HostA, double.label(), expected(&double)),
            (Node::HostB, "direct".into(), expected(&Side::Direct)),
        ],
        topology: TopologySpec::Pair {
            a: double,
            b: Side::Direct,
        },
    });
    let (ha, hb, carrier) = (
        nat("port-restricted-cone")?,
        nat("full-cone")?,
        nat("restricted-cone")?,
    );
    cases.push(VerifyCase {
        name: "shared carrier NAT".into(),
        checks: vec![
            (
                Node::HostA,
                format!("{ha}+{carrier} (shared)"),
                expected_shared(&ha, &carrier),
            ),
            (
                Node::HostB,
                format!("{hb}+{carrier} (shared)"),
                expected_shared(&hb, &carrier),
            ),
        ],
        topology: TopologySpec::SharedCarrier {
            a: ha,
            b: hb,
            carrier,
        },
    });
    let same = nat("full-cone")?;
    let side = Side::Nat(same.clone());
    cases.push(VerifyCase {
        name: "same NAT".into(),
        checks: vec![
            (
                Node::HostA,
                "full-cone (same NAT, A)".into(),
                expected(&side),
            ),
            (
                Node::HostB,
                "full-cone (same NAT, B)".into(),
                expected(&side),
            ),
        ],
        topology: TopologySpec::SameNat { nat: same },
    });
    Ok(cases)
}

/// One host's verification.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub case: String,
    pub host: String,
    pub ok: bool,
    pub expected: Expected,
    /// The measured report's classic name and allocation, for the table.
    pub measured: String,
    pub mismatches: Vec<String>,
    pub elapsed_ms: u64,
}

/// Runs `natpunch nat --json` on `node` against the lab server.
pub fn nat_report(lab: &Lab, node: Node) -> Result<NatReport, LabError> {
    let mut cmd = lab.natpunch(node);
    cmd.args([
        "nat",
        "-H",
        &lab.server_addr().to_string(),
        "--json",
        "--rto-ms",
        &LAB_RTO_MS.to_string(),
    ]);
    let out = run(&mut cmd)?;
    serde_json::from_str(out.trim()).map_err(|e| LabError::Command {
        command: "natpunch nat --json".into(),
        stderr: format!("unreadable report: {e}: {out}"),
    })
}

fn summary(r: &NatReport) -> String {
    format!(
        "{} / {:?}{}",
        r.classic.as_str(),
        r.allocation.kind,
        r.allocation
            .delta
            .map(|d| format!(" {d:+}"))
            .unwrap_or_default()
    )
}

/// Builds each case's lab, starts the server, checks every host.
pub fn run_verify(
    opts: &LabOptions,
    cases: &[VerifyCase],
    mut progress: impl FnMut(&CheckResult),
) -> Result<Vec<CheckResult>, LabError> {
    let mut results = Vec::new();
    for case in cases {
        let mut lab = Lab::build(&case.topology, opts)?;
        lab.start_server()?;
        for (node, label, want) in &case.checks {
            let t = Instant::now();
            let r = match nat_report(&lab, *node) {
                Ok(report) => {
                    let m = mismatches(want, &report);
                    CheckResult {
                        case: case.name.clone(),
                        host: label.clone(),
                        ok: m.is_empty(),
                        expected: want.clone(),
                        measured: summary(&report),
                        mismatches: m,
                        elapsed_ms: t.elapsed().as_millis() as u64,
                    }
                }
                Err(e) => CheckResult {
                    case: case.name.clone(),
                    host: label.clone(),
                    ok: false,
                    expected: want.clone(),
                    measured: "error".into(),
                    mismatches: vec![e.to_string()],
                    elapsed_ms: t.elapsed().as_millis() as u64,
                },
            };
            progress(&r);
            results.push(r);
        }
    }
    Ok(results)
}

/// What each pair runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// `natpunch nat` on A and B at once, each checked against its NAT.
    Nat,
}

/// The default pairs: every preset against every other (upper triangle).
pub fn default_pairs() -> Result<Vec<(Side, Side)>, SpecError> {
    let mut v = Vec::new();
    for (i, a) in PRESETS.iter().enumerate() {
        for b in &PRESETS[i..] {
            v.push((Side::parse(a)?, Side::parse(b)?));
        }
    }
    Ok(v)
}

/// Parses `A/B,C/D` where each side is `direct`, `PRESET[:params]` or
/// `HOME+CARRIER`.
pub fn parse_pairs(s: &str) -> Result<Vec<(Side, Side)>, SpecError> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (a, b) = p
                .split_once('/')
                .ok_or_else(|| SpecError::BadParameter(p.to_string()))?;
            Ok((Side::parse(a)?, Side::parse(b)?))
        })
        .collect()
}

/// Runs the scenario for every pair, one lab per pair.
pub fn run_grid(
    opts: &LabOptions,
    pairs: &[(Side, Side)],
    scenario: Scenario,
    mut progress: impl FnMut(&GridRow),
) -> Vec<GridRow> {
    let mut rows = Vec::new();
    for (a, b) in pairs {
        let t = Instant::now();
        let row = match grid_pair(opts, a, b, scenario) {
            Ok((outcome, result, detail)) => GridRow {
                a: a.label(),
                b: b.label(),
                outcome,
                result,
                elapsed_ms: t.elapsed().as_millis() as u64,
                detail,
            },
            Err(e) => GridRow {
                a: a.label(),
                b: b.label(),
                outcome: Outcome::Error,
                result: "error".into(),
                elapsed_ms: t.elapsed().as_millis() as u64,
                detail: e.to_string(),
            },
        };
        progress(&row);
        rows.push(row);
    }
    rows
}

fn grid_pair(
    opts: &LabOptions,
    a: &Side,
    b: &Side,
    scenario: Scenario,
) -> Result<(Outcome, String, String), LabError> {
    let topology = TopologySpec::Pair {
        a: a.clone(),
        b: b.clone(),
    };
    let mut lab = Lab::build(&topology, opts)?;
    lab.start_server()?;
    match scenario {
        Scenario::Nat => {
            let (ra, rb) = std::thread::scope(|s| {
                let ha = s.spawn(|| nat_report(&lab, Node::HostA));
                let rb = nat_report(&lab, Node::HostB);
                let ra = ha.join().unwrap_or_else(|_| {
                    Err(LabError::Command {
                        command: "natpunch nat".into(),
                        stderr: "runner thread panicked".into(),
                    })
                });
                (ra, rb)
            });
            let (ra, rb) = (ra?, rb?);
            let mut detail = mismatches(&expected(a), &ra)
                .into_iter()
                .map(|m| format!("A {m}"))
                .collect::<Vec<_>>();
            detail.extend(
                mismatches(&expected(b), &rb)
                    .into_iter()
                    .map(|m| format!("B {m}")),
            );
            let outcome = if detail.is_empty() {
                Outcome::Pass
            } else {
                Outcome::Fail
            };
            let result = format!("{} · {}", short(&ra), short(&rb));
            Ok((outcome, result, detail.join("; ")))
        }
    }
}

fn short(r: &NatReport) -> String {
    match r.classic.as_str() {
        "full-cone" => "FC",
        "restricted-cone" => "RC",
        "port-restricted-cone" => "PRC",
        "symmetric" => "SYM",
        "open-internet" => "OPEN",
        other => other,
    }
    .to_string()
}
