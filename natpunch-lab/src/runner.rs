//! Runs scenarios in labs: `verify` (discovery against every preset) and
//! the pair grid.

use std::time::Instant;

use natpunch_proto::nat::NatReport;
use serde::Serialize;

use crate::expect::{expected, expected_shared, mismatches, Expected};
use crate::grid::{GridRow, Outcome};
use natpunch_proto::punch::{classify, NoPath, PairKind, SideView, Strategy};
use natpunch_proto::rendezvous::NatSummary;

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
    /// B listens, A connects through the rendezvous server; the outcome
    /// (direct by which technique, or no direct path) is checked against
    /// [`expected_connect`].
    Connect,
    /// B listens, A pipes 1 MiB to it in one session: the session starts
    /// on the relay, and must end on the direct path [`expected_connect`]
    /// names, or stay relayed where none exists (or UDP is blocked); every
    /// byte must arrive.
    Session,
}

/// One grid entry: a topology and the labels of its two sides.
#[derive(Debug, Clone)]
pub struct GridPair {
    pub topology: TopologySpec,
    pub a: String,
    pub b: String,
}

impl GridPair {
    pub fn pair(a: Side, b: Side) -> Self {
        Self {
            a: a.label(),
            b: b.label(),
            topology: TopologySpec::Pair { a, b },
        }
    }

    pub fn same_nat(nat: NatSpec) -> Self {
        let label = format!("same NAT: {nat}");
        Self {
            a: label.clone(),
            b: label,
            topology: TopologySpec::SameNat { nat },
        }
    }
}

/// The default pairs: every preset against every other (upper triangle),
/// sequential delta 2, double NATs with a cone outside, and same NAT.
pub fn default_pairs() -> Result<Vec<GridPair>, SpecError> {
    let mut v = Vec::new();
    for (i, a) in PRESETS.iter().enumerate() {
        for b in &PRESETS[i..] {
            v.push(GridPair::pair(Side::parse(a)?, Side::parse(b)?));
        }
    }
    v.push(GridPair::pair(
        Side::parse("symmetric-sequential:delta=2")?,
        Side::parse("symmetric-sequential:delta=2")?,
    ));
    v.push(GridPair::pair(
        Side::parse("port-restricted-cone+full-cone")?,
        Side::parse("port-restricted-cone")?,
    ));
    v.push(GridPair::pair(
        Side::parse("symmetric-sequential+full-cone")?,
        Side::parse("full-cone")?,
    ));
    v.push(GridPair::same_nat(NatSpec::parse("port-restricted-cone")?));
    Ok(v)
}

/// Parses `A/B,C/D,same:PRESET` where each side is `direct`,
/// `PRESET[:params]` or `HOME+CARRIER`, and `same:PRESET` puts both hosts
/// behind one NAT.
pub fn parse_pairs(s: &str) -> Result<Vec<GridPair>, SpecError> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            if let Some(nat) = p.strip_prefix("same:") {
                return Ok(GridPair::same_nat(NatSpec::parse(nat)?));
            }
            let (a, b) = p
                .split_once('/')
                .ok_or_else(|| SpecError::BadParameter(p.to_string()))?;
            Ok(GridPair::pair(Side::parse(a)?, Side::parse(b)?))
        })
        .collect()
}

/// Runs the scenario for every pair, one lab per pair.
pub fn run_grid(
    opts: &LabOptions,
    pairs: &[GridPair],
    scenario: Scenario,
    mut progress: impl FnMut(&GridRow),
) -> Vec<GridRow> {
    let mut rows = Vec::new();
    for pair in pairs {
        let t = Instant::now();
        let mut row = GridRow {
            a: pair.a.clone(),
            b: pair.b.clone(),
            outcome: Outcome::Error,
            result: "error".into(),
            elapsed_ms: 0,
            detail: String::new(),
            expected: None,
            probes_sent: None,
            bytes_sent: None,
        };
        let r = match scenario {
            Scenario::Nat => grid_nat(opts, pair, &mut row),
            Scenario::Connect => grid_connect(opts, pair, &mut row),
            Scenario::Session => grid_session(opts, pair, &mut row),
        };
        if let Err(e) = r {
            row.outcome = Outcome::Error;
            row.detail = e.to_string();
        }
        if row.elapsed_ms == 0 {
            row.elapsed_ms = t.elapsed().as_millis() as u64;
        }
        progress(&row);
        rows.push(row);
    }
    rows
}

fn expected_side(t: &TopologySpec, host: Node) -> Option<Side> {
    match t {
        TopologySpec::Pair { a, b } => Some(if host == Node::HostA {
            a.clone()
        } else {
            b.clone()
        }),
        TopologySpec::SameNat { nat } => Some(Side::Nat(nat.clone())),
        TopologySpec::SharedCarrier { .. } => None,
    }
}

fn grid_nat(opts: &LabOptions, pair: &GridPair, row: &mut GridRow) -> Result<(), LabError> {
    let mut lab = Lab::build(&pair.topology, opts)?;
    lab.start_server()?;
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
    let mut detail = Vec::new();
    for (host, r, tag) in [(Node::HostA, &ra, "A"), (Node::HostB, &rb, "B")] {
        if let Some(side) = expected_side(&pair.topology, host) {
            detail.extend(
                mismatches(&expected(&side), r)
                    .into_iter()
                    .map(|m| format!("{tag} {m}")),
            );
        }
    }
    row.outcome = if detail.is_empty() {
        Outcome::Pass
    } else {
        Outcome::Fail
    };
    row.result = format!("{} · {}", short(&ra), short(&rb));
    row.detail = detail.join("; ");
    Ok(())
}

/// Spawns a command and streams its stderr lines into a channel (stdin
/// and stdout are the caller's to set).
pub(crate) fn spawn_lines(
    mut cmd: std::process::Command,
) -> Result<(std::process::Child, std::sync::mpsc::Receiver<String>), LabError> {
    use std::io::BufRead;
    let mut child = cmd
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn {
            command: "natpunch".into(),
            source,
        })?;
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
    }
    Ok((child, rx))
}

/// Waits for a JSON event line of one of `kinds`.
pub(crate) fn wait_event(
    rx: &std::sync::mpsc::Receiver<String>,
    kinds: &[&str],
    within: std::time::Duration,
) -> Option<serde_json::Value> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let line = rx.recv_timeout(left).ok()?;
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v["event"].as_str().is_some_and(|e| kinds.contains(&e)) {
                return Some(v);
            }
        }
    }
}

/// Per-step limits for the connect scenario: setup (discovery + register)
/// takes ~2 s in the lab; punching gives up after 10 s by itself.
const SETUP_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);
const PUNCH_LIMIT: std::time::Duration = std::time::Duration::from_secs(40);

/// What one connect attempt in a lab produced: A's and B's final events.
#[derive(Debug, Clone, Default)]
pub struct ConnectRun {
    pub a: Option<serde_json::Value>,
    pub b: Option<serde_json::Value>,
}

impl ConnectRun {
    fn event(v: &Option<serde_json::Value>) -> Option<&str> {
        v.as_ref().and_then(|v| v["event"].as_str())
    }

    pub fn connected(&self) -> bool {
        Self::event(&self.a) == Some("connected") && Self::event(&self.b) == Some("connected")
    }

    pub fn strategy(&self) -> Option<&str> {
        self.a.as_ref().and_then(|v| v["strategy"].as_str())
    }

    pub fn field(&self, k: &str) -> Option<u64> {
        self.a.as_ref().and_then(|v| v[k].as_u64())
    }

    pub fn reason(&self) -> String {
        self.a
            .as_ref()
            .and_then(|v| v["reason"].as_str().map(str::to_string))
            .unwrap_or_else(|| "no result from natpunch connect".into())
    }
}

/// B listens, A connects, in a lab whose server is up. Keys live in
/// `keys` so that runs can reuse them.
pub fn connect_once(lab: &Lab, keys: &std::path::Path) -> Result<ConnectRun, LabError> {
    let server = lab.server_addr().to_string();
    let key = |n: &str| keys.join(n).to_string_lossy().into_owned();
    let common = |c: &mut std::process::Command, k: String| {
        c.args([
            "-s", &server, "--json", "--once", "--rto-ms", "100", "--key", &k,
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    };
    let mut listen = lab.natpunch(Node::HostB);
    listen.arg("listen");
    common(&mut listen, key("b"));
    let (mut lchild, lrx) = spawn_lines(listen)?;
    let registered = wait_event(&lrx, &["registered"], SETUP_LIMIT);
    let Some(id) = registered
        .as_ref()
        .and_then(|v| v["peer_id"].as_str())
        .map(str::to_string)
    else {
        let _ = lchild.kill();
        let _ = lchild.wait();
        return Err(LabError::Command {
            command: "natpunch listen".into(),
            stderr: "did not register".into(),
        });
    };
    let mut connect = lab.natpunch(Node::HostA);
    connect.args(["connect", &id]);
    common(&mut connect, key("a"));
    let (mut cchild, crx) = spawn_lines(connect)?;
    let a = wait_event(&crx, &["connected", "failed"], PUNCH_LIMIT);
    let b = wait_event(
        &lrx,
        &["connected", "failed"],
        std::time::Duration::from_secs(3),
    );
    for c in [&mut cchild, &mut lchild] {
        let _ = c.kill();
        let _ = c.wait();
    }
    Ok(ConnectRun { a, b })
}

fn grid_connect(opts: &LabOptions, pair: &GridPair, row: &mut GridRow) -> Result<(), LabError> {
    let (want, reason) = expected_connect(&pair.topology);
    row.expected = Some(match want {
        Some(s) => format!("direct by {} ({reason})", s.as_str()),
        None => format!("no direct path ({reason})"),
    });
    let mut lab = Lab::build(&pair.topology, opts)?;
    lab.start_server()?;
    let keys = std::env::temp_dir().join(format!("{}-keys", lab.prefix()));
    let _ = std::fs::create_dir_all(&keys);
    let run = connect_once(&lab, &keys);
    let _ = std::fs::remove_dir_all(&keys);
    let run = run?;
    match (ConnectRun::event(&run.a), want) {
        (Some("connected"), Some(s)) => {
            row.elapsed_ms = run.field("elapsed_ms").unwrap_or(0);
            row.probes_sent = run.field("probes_sent");
            row.bytes_sent = run.field("bytes_sent");
            let got = run.strategy().unwrap_or_default().to_string();
            row.result = got.clone();
            row.outcome = if got == s.as_str() && run.connected() {
                Outcome::Pass
            } else {
                Outcome::Fail
            };
            if !run.connected() {
                row.detail = format!("B did not report connected ({:?})", run.b);
            } else if got != s.as_str() {
                row.detail = format!("expected {}, connected by {got}", s.as_str());
            }
        }
        (Some("failed"), None) => {
            let r = run.reason();
            row.result = "no path".into();
            row.outcome = if r.contains("no direct path possible") {
                Outcome::Pass
            } else {
                Outcome::Fail
            };
            row.detail = r;
        }
        (Some("connected"), None) => {
            row.result = run.strategy().unwrap_or_default().to_string();
            row.outcome = Outcome::Fail;
            row.detail = "connected where no direct path was expected".into();
        }
        _ => {
            row.result = "failed".into();
            row.outcome = Outcome::Fail;
            row.detail = run.reason();
        }
    }
    Ok(())
}

/// The pairs of the session grid: the default ones, and those only the
/// relay connects (a symmetric carrier NAT, a network without UDP).
pub fn session_pairs() -> Result<Vec<GridPair>, SpecError> {
    let mut v = default_pairs()?;
    v.push(GridPair::pair(
        Side::parse("port-restricted-cone+symmetric-random")?,
        Side::parse("port-restricted-cone")?,
    ));
    v.push(GridPair::pair(
        Side::parse("full-cone+symmetric-random")?,
        Side::parse("symmetric-random")?,
    ));
    v.push(GridPair::pair(
        Side::parse("port-restricted-cone:udp=block")?,
        Side::parse("full-cone")?,
    ));
    v.push(GridPair::pair(
        Side::parse("symmetric-random:udp=block")?,
        Side::parse("symmetric-random")?,
    ));
    // A listener without UDP (it registers over TCP).
    v.push(GridPair::pair(
        Side::parse("full-cone")?,
        Side::parse("port-restricted-cone:udp=block")?,
    ));
    Ok(v)
}

/// Whether TCP punching connects a pair where UDP is blocked: every NAT
/// maps TCP once for all destinations, or predictably (the lab's NATs map
/// TCP as they map UDP; TCP has no birthday probing).
fn tcp_punchable(t: &TopologySpec) -> bool {
    let ok = |s: &Side| {
        let e = expected(s);
        e.mapping == natpunch_proto::nat::Behaviour::EndpointIndependent
            || e.allocation != natpunch_proto::nat::AllocationKind::Random
    };
    match t {
        TopologySpec::Pair { a, b } => ok(a) && ok(b),
        TopologySpec::SameNat { .. } => true,
        TopologySpec::SharedCarrier { .. } => false,
    }
}

/// A side behind a home NAT behind a carrier NAT that maps per
/// destination.
fn symmetric_carrier(t: &TopologySpec) -> bool {
    let side = |s: &Side| match s {
        Side::DoubleNat { carrier, .. } => {
            carrier.mapping != natpunch_proto::nat::Behaviour::EndpointIndependent
        }
        _ => false,
    };
    match t {
        TopologySpec::Pair { a, b } => side(a) || side(b),
        TopologySpec::SameNat { .. } => false,
        TopologySpec::SharedCarrier { carrier, .. } => {
            carrier.mapping != natpunch_proto::nat::Behaviour::EndpointIndependent
        }
    }
}

fn udp_blocked(t: &TopologySpec) -> bool {
    let side = |s: &Side| match s {
        Side::Direct => false,
        Side::Nat(n) => n.udp_blocked,
        Side::DoubleNat { home, carrier } => home.udp_blocked || carrier.udp_blocked,
    };
    match t {
        TopologySpec::Pair { a, b } => side(a) || side(b),
        TopologySpec::SameNat { nat } => nat.udp_blocked,
        TopologySpec::SharedCarrier { a, b, carrier } => {
            a.udp_blocked || b.udp_blocked || carrier.udp_blocked
        }
    }
}

/// Bytes A sends in the session scenario: half before the path settles,
/// half after, so the move from the relay happens mid-session.
const SESSION_BYTES: usize = 1 << 20;
/// The path settles (moves to direct, or stays relayed with a reason)
/// within this long: a punch gives up after 10 s.
const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

fn grid_session(opts: &LabOptions, pair: &GridPair, row: &mut GridRow) -> Result<(), LabError> {
    use std::io::Write;
    let (mut want, mut reason) = expected_connect(&pair.topology);
    let mut birthday_may_win = false;
    if udp_blocked(&pair.topology) {
        if tcp_punchable(&pair.topology) {
            want = Some(Strategy::Tcp);
            reason = "a side's network drops all UDP: relayed over TCP, then a punched TCP stream"
                .into();
        } else {
            want = None;
            reason = "a side's network drops all UDP, and a NAT picks TCP ports at random: relayed over TCP".into();
        }
    } else if symmetric_carrier(&pair.topology) {
        // The punching grid has no such pair: birthday probing rarely
        // gets through a home NAT behind a symmetric carrier (0 of 4 in
        // the connect scenario, then 1 win in CI once the delay lines
        // stopped splitting conntrack entries), so the relay carries it,
        // and a birthday win by chance is a pass too.
        want = None;
        birthday_may_win = true;
        reason = "a symmetric carrier NAT behind the home NAT: relayed, unless birthday probing wins by chance".into();
    }
    row.expected = Some(match want {
        Some(s) => format!("relay, then direct by {} ({reason})", s.as_str()),
        None => format!("relay ({reason})"),
    });
    let mut lab = Lab::build(&pair.topology, opts)?;
    lab.start_server()?;
    let dir = std::env::temp_dir().join(format!("{}-session", lab.prefix()));
    let _ = std::fs::create_dir_all(&dir);
    let r = session_run(&lab, &dir, want);
    let _ = std::fs::remove_dir_all(&dir);
    let run = r?;
    row.elapsed_ms = run.connected_ms.unwrap_or(0);
    let intact = run.received.as_deref() == Some(run.sent.as_slice());
    let (path, strategy) = (run.path.clone(), run.strategy.clone());
    row.result = match (&path, &strategy) {
        (Some(p), Some(s)) if p == "direct" => s.clone(),
        (Some(p), _) => format!(
            "{p}{}",
            run.code
                .as_ref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default()
        ),
        (None, _) => "failed".into(),
    };
    let path_ok = match want {
        Some(s) => path.as_deref() == Some("direct") && strategy.as_deref() == Some(s.as_str()),
        None => {
            path.as_deref() == Some("relay")
                || (birthday_may_win
                    && path.as_deref() == Some("direct")
                    && strategy.as_deref() == Some("birthday"))
        }
    };
    let relay_first = run.first_path.as_deref() == Some("relay");
    row.outcome = if path_ok && intact && relay_first && run.exit_ok {
        Outcome::Pass
    } else {
        Outcome::Fail
    };
    row.detail = if !relay_first {
        format!(
            "the session did not start on the relay (first path {:?})",
            run.first_path
        )
    } else if !path_ok {
        format!("ended on {path:?} by {strategy:?}; {}", run.detail)
    } else if !intact {
        format!(
            "B received {} of {} bytes, not intact",
            run.received.as_ref().map_or(0, Vec::len),
            run.sent.len()
        )
    } else if !run.exit_ok {
        format!("natpunch connect failed: {}", run.detail)
    } else {
        String::new()
    };
    let _ = std::io::stderr().flush();
    Ok(())
}

/// What one session scenario saw.
#[derive(Debug, Default)]
struct SessionRun {
    sent: Vec<u8>,
    received: Option<Vec<u8>>,
    /// The path of A's `connected` event, and its time.
    first_path: Option<String>,
    connected_ms: Option<u64>,
    /// Where A's session ended up, by what, and why it stayed relayed.
    path: Option<String>,
    strategy: Option<String>,
    code: Option<String>,
    exit_ok: bool,
    detail: String,
}

fn session_run(
    lab: &Lab,
    dir: &std::path::Path,
    want: Option<Strategy>,
) -> Result<SessionRun, LabError> {
    use std::io::Write;
    let server = lab.server_addr().to_string();
    let out_path = dir.join("received");
    let out = std::fs::File::create(&out_path).map_err(|source| LabError::Spawn {
        command: "create the output file".into(),
        source,
    })?;
    let mut listen = lab.natpunch(Node::HostB);
    listen
        .args([
            "listen", "-s", &server, "--json", "--rto-ms", "100", "--key",
        ])
        .arg(dir.join("b"))
        .stdin(std::process::Stdio::null())
        .stdout(out);
    let (mut lchild, lrx) = spawn_lines(listen)?;
    let Some(id) = wait_event(&lrx, &["registered"], SETUP_LIMIT)
        .and_then(|v| v["peer_id"].as_str().map(str::to_string))
    else {
        let _ = lchild.kill();
        let _ = lchild.wait();
        return Err(LabError::Command {
            command: "natpunch listen".into(),
            stderr: "did not register".into(),
        });
    };
    let mut run = SessionRun {
        sent: (0..SESSION_BYTES)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
        ..SessionRun::default()
    };
    let mut connect = lab.natpunch(Node::HostA);
    connect
        .args([
            "connect", &id, "-s", &server, "--json", "--rto-ms", "100", "--key",
        ])
        .arg(dir.join("a"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null());
    let t0 = Instant::now();
    let (mut cchild, crx) = spawn_lines(connect)?;
    // The bytes go in from a thread (a write blocks until the session
    // reads it), the second half once the path has settled.
    let stdin = cchild.stdin.take();
    let half = SESSION_BYTES / 2;
    let (settled_tx, settled_rx) = std::sync::mpsc::channel::<()>();
    let data = run.sent.clone();
    let writer = std::thread::spawn(move || {
        if let Some(mut s) = stdin {
            let _ = s.write_all(&data[..half]);
            let _ = settled_rx.recv();
            let _ = s.write_all(&data[half..]);
        }
    });
    // Until the path settles: a move to direct, or a reason to stay.
    let deadline = Instant::now() + SETTLE_LIMIT;
    let mut events = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = crx.recv_timeout(left) else {
            break;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let ev = v["event"].as_str().unwrap_or_default().to_string();
        events.push(v.clone());
        match ev.as_str() {
            "connected" => {
                run.first_path = v["path"].as_str().map(str::to_string);
                run.connected_ms = Some(t0.elapsed().as_millis() as u64);
                run.path = run.first_path.clone();
            }
            "path-changed" => {
                run.path = v["to"]["path"].as_str().map(str::to_string);
                run.strategy = v["strategy"].as_str().map(str::to_string);
                if run.path.as_deref() == Some("direct") && want.is_some() {
                    break;
                }
            }
            "relayed" => {
                run.code = v["code"].as_str().map(str::to_string);
                run.detail = v["reason"].as_str().unwrap_or_default().to_string();
                break;
            }
            "failed" => {
                run.detail = v["reason"].as_str().unwrap_or_default().to_string();
                break;
            }
            _ => {}
        }
    }
    let _ = settled_tx.send(());
    let exit = wait_exit(&mut cchild, SETTLE_LIMIT);
    let _ = writer.join();
    run.exit_ok = exit == Some(true);
    // Later moves count too (a path that moved on after the data).
    while let Ok(line) = crx.try_recv() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v["event"] == "path-changed" {
                run.path = v["to"]["path"].as_str().map(str::to_string);
                run.strategy = v["strategy"].as_str().map(str::to_string);
            }
        }
    }
    let _ = wait_exit(&mut lchild, std::time::Duration::from_secs(5));
    run.received = std::fs::read(&out_path).ok();
    if run.detail.is_empty() && !run.exit_ok {
        run.detail = format!("events: {events:?}");
    }
    Ok(run)
}

/// Waits for a child to exit (killing it after `within`): whether it
/// exited 0.
fn wait_exit(child: &mut std::process::Child, within: std::time::Duration) -> Option<bool> {
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st.success()),
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// One pair's benchmark figures.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub a: String,
    pub b: String,
    pub strategy: Option<String>,
    pub runs: u32,
    /// Cold connects that went direct.
    pub direct: u32,
    /// Cold connects direct within 5 s.
    pub within_5s: u32,
    /// Cold: from the connector's process start to its `connected` event,
    /// with the NAT facts the previous run on this network kept.
    pub cold_median_ms: Option<u64>,
    pub cold_p95_ms: Option<u64>,
    pub cold_ratio: Option<f64>,
    pub cold_p95_ratio: Option<f64>,
    /// Cold on a network seen for the first time (`--no-nat-cache`).
    pub first_direct: u32,
    pub first_median_ms: Option<u64>,
    pub first_p95_ms: Option<u64>,
    pub first_ratio: Option<f64>,
    /// Warm: from `Endpoint::connect` on an endpoint that has run a while
    /// (its NAT measured) to its `Connected` event.
    pub warm_direct: u32,
    pub warm_median_ms: Option<u64>,
    pub warm_ratio: Option<f64>,
    /// The physical floor measured in the same lab: when B can first learn
    /// of the attempt (A→server→B) plus one A↔B round trip.
    pub floor_ms: u64,
    pub median_probes: Option<u64>,
    pub median_bytes: Option<u64>,
    /// Every successful connect's time, in the order run (ms).
    pub cold_ms: Vec<u64>,
    pub first_ms: Vec<u64>,
    pub warm_ms: Vec<u64>,
}

fn median(mut v: Vec<u64>) -> Option<u64> {
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

/// The 95th percentile (nearest rank).
fn p95(mut v: Vec<u64>) -> Option<u64> {
    v.sort_unstable();
    let rank = (v.len() * 95).div_ceil(100);
    v.get(rank.saturating_sub(1)).copied()
}

/// Between first-use runs: Linux routers answer about one ICMP error per
/// second per destination, and hop discovery needs one from each router.
const ICMP_REFILL: std::time::Duration = std::time::Duration::from_millis(1200);

/// A listener on B (`natpunch listen --keep-open --json`) and its peer ID.
pub struct BenchListener {
    child: std::process::Child,
    pub id: String,
}

impl Drop for BenchListener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a listener on B that has measured its NAT (warm), keys in
/// `keys`, with `extra` arguments.
pub fn bench_listener(
    lab: &Lab,
    keys: &std::path::Path,
    extra: &[&str],
) -> Result<BenchListener, LabError> {
    let server = lab.server_addr().to_string();
    let mut listen = lab.natpunch(Node::HostB);
    listen
        .args([
            "listen",
            "-s",
            &server,
            "--json",
            "--keep-open",
            "--rto-ms",
            "100",
            "--key",
        ])
        .arg(keys.join("b"))
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let (mut child, rx) = spawn_lines(listen)?;
    // Registered and measured, in whichever order they come.
    let (mut id, mut measured) = (None, false);
    let mut said = Vec::new();
    let deadline = Instant::now() + SETUP_LIMIT;
    while id.is_none() || !measured {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        match v["event"].as_str() {
            Some("registered") => id = v["peer_id"].as_str().map(str::to_string),
            Some("nat") => measured = true,
            _ => said.push(line),
        }
    }
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    match (id, measured) {
        (Some(id), true) => Ok(BenchListener { child, id }),
        _ => Err(LabError::Command {
            command: "natpunch listen".into(),
            stderr: format!(
                "did not register and measure its NAT (exit: {:?}); it said: {said:?}",
                child.try_wait()
            ),
        }),
    }
}

/// One cold connect from A: `natpunch connect ID --once --json` with
/// `extra` arguments, timed from the spawn to its `connected` (or
/// `failed`) line. The event and the time.
pub fn cold_connect(
    lab: &Lab,
    id: &str,
    key: &std::path::Path,
    cache: Option<&std::path::Path>,
    extra: &[&str],
) -> Result<(Option<serde_json::Value>, std::time::Duration), LabError> {
    let server = lab.server_addr().to_string();
    let mut connect = lab.natpunch(Node::HostA);
    connect
        .args(["connect", id, "-s", &server, "--json", "--once", "--key"])
        .arg(key)
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    match cache {
        Some(dir) => connect.env("NATPUNCH_CACHE", dir),
        None => connect.arg("--no-nat-cache"),
    };
    let t0 = Instant::now();
    let (mut child, rx) = spawn_lines(connect)?;
    let ev = wait_event(&rx, &["connected", "failed"], PUNCH_LIMIT);
    let took = t0.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    Ok((ev, took))
}

/// Time to a direct path per pair, cold and warm, against the floor.
///
/// The floor uses each host's measured RTT to the server (its `natpunch
/// nat` first transaction): B learns of the attempt after rtt_A/2 +
/// rtt_B/2, and the A↔B round trip is rtt_A + rtt_B (every path crosses
/// the two access links, which carry all the lab's delay; the hop through
/// the internet router and server is sub-millisecond).
///
/// `warm(lab, server, listener_id, runs)` runs the warm connects (the
/// library, in A's namespace) and returns each one's time to `Connected`.
pub fn run_punch_bench(
    opts: &LabOptions,
    pairs: &[GridPair],
    runs: u32,
    mut warm: impl FnMut(&Lab, &str, u32) -> Vec<Option<std::time::Duration>>,
    mut progress: impl FnMut(&BenchRow),
) -> Result<Vec<BenchRow>, LabError> {
    let mut out = Vec::new();
    for pair in pairs {
        let mut lab = Lab::build(&pair.topology, opts)?;
        lab.start_server()?;
        let rtt = |n| nat_report(&lab, n).ok().and_then(|r| r.rtt_ms).unwrap_or(0);
        let (ra, rb) = (rtt(Node::HostA), rtt(Node::HostB));
        let floor_ms = (ra + rb) / 2 + (ra + rb);
        let keys = std::env::temp_dir().join(format!("{}-keys", lab.prefix()));
        let _ = std::fs::create_dir_all(&keys);
        let listener = bench_listener(&lab, &keys, &[])?;
        let (mut probes, mut bytes) = (Vec::new(), Vec::new());
        let mut strategy = None;
        // Repeated use (the cache the first run of the series left), then
        // first use on a network (no cache), spaced so that the lab
        // router's ICMP budget for hop discovery (Linux: about one error
        // per second per destination) refills between runs as it would
        // between real first uses.
        let cache = keys.join("cache");
        let mut series = Vec::new();
        for cached in [true, false] {
            let (mut times, mut direct) = (Vec::new(), 0u32);
            for i in 0..runs {
                let key = keys.join(format!("a{i}"));
                let dir = cached.then_some(cache.as_path());
                if !cached {
                    std::thread::sleep(ICMP_REFILL);
                }
                let Ok((Some(ev), took)) = cold_connect(&lab, &listener.id, &key, dir, &[]) else {
                    continue;
                };
                if ev["event"] == "connected" {
                    direct += 1;
                    strategy = ev["strategy"].as_str().map(str::to_string);
                    times.push(took.as_millis() as u64);
                    probes.extend(ev["probes_sent"].as_u64());
                    bytes.extend(ev["bytes_sent"].as_u64());
                }
            }
            series.push((times, direct));
        }
        let (times, direct) = series.remove(0);
        let (first, first_direct) = series.remove(0);
        let warm_times: Vec<u64> = warm(&lab, &listener.id, runs)
            .into_iter()
            .flatten()
            .map(|d| d.as_millis() as u64)
            .collect();
        drop(listener);
        let _ = std::fs::remove_dir_all(&keys);
        let within_5s = times.iter().filter(|t| **t <= 5000).count() as u32;
        let ratio = |v: Option<u64>| {
            v.filter(|_| floor_ms > 0)
                .map(|m| m as f64 / floor_ms as f64)
        };
        let (cold_median_ms, cold_p95_ms) = (median(times.clone()), p95(times.clone()));
        let (first_median_ms, first_p95_ms) = (median(first.clone()), p95(first.clone()));
        let warm_median_ms = median(warm_times.clone());
        let row = BenchRow {
            a: pair.a.clone(),
            b: pair.b.clone(),
            strategy,
            runs,
            direct,
            within_5s,
            cold_median_ms,
            cold_p95_ms,
            cold_ratio: ratio(cold_median_ms),
            cold_p95_ratio: ratio(cold_p95_ms),
            first_direct,
            first_median_ms,
            first_p95_ms,
            first_ratio: ratio(first_median_ms),
            warm_direct: warm_times.len() as u32,
            warm_median_ms,
            warm_ratio: ratio(warm_median_ms),
            floor_ms,
            median_probes: median(probes),
            median_bytes: median(bytes),
            cold_ms: times,
            first_ms: first,
            warm_ms: warm_times,
        };
        progress(&row);
        out.push(row);
    }
    Ok(out)
}

/// Whether a side's gateway maps a port that peers reach: miniupnpd on
/// its own NAT, or on a home NAT whose carrier is a full cone that keeps
/// ports (miniupnpd's STUN test then announces the carrier's address, and
/// the carrier forwards the same port to it); behind any other carrier
/// miniupnpd refuses to map.
fn maps_port(side: &Side) -> bool {
    use natpunch_proto::nat::Behaviour::EndpointIndependent;
    match side {
        Side::Direct => false,
        Side::Nat(spec) => spec.upnp,
        Side::DoubleNat { home, carrier } => {
            home.upnp
                && !carrier.plain_masquerade
                && carrier.mapping == EndpointIndependent
                && carrier.filtering == EndpointIndependent
                && carrier.allocation == crate::spec::PortAllocation::Preserving
        }
    }
}

/// The outcome a pair must reach, and why: computed from the configured
/// NATs with the same classification the peers apply to their measured
/// reports, so a wrong measurement or a broken technique fails the grid.
pub fn expected_connect(t: &TopologySpec) -> (Option<Strategy>, String) {
    let view = |side: &Side, ip: &str| {
        let e = expected(side);
        SideView {
            nat: NatSummary {
                mapping: Some(e.mapping),
                filtering: Some(e.filtering),
                allocation: Some(e.allocation),
                delta: e.delta,
                opener_ttl: None,
                nat: Some(e.nat),
                pending: Default::default(),
            },
            observed: format!("{ip}:3478")
                .parse()
                .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
            fresh: None,
            candidates: Vec::new(),
            // A gateway running miniupnpd maps the port; PCP answers
            // first, the others are only asked. (Under a carrier NAT its
            // external address is not public: nothing is announced.)
            mapped: maps_port(side)
                .then(|| format!("{ip}:3478").parse().ok())
                .flatten()
                .map(|addr| natpunch_proto::portmap::Mapped {
                    addr,
                    protocol: natpunch_proto::portmap::MapProtocol::Pcp,
                }),
            turn: vec![],
        }
    };
    let (a, b) = match t {
        TopologySpec::Pair { a, b } => (view(a, "198.51.100.2"), view(b, "198.51.100.18")),
        TopologySpec::SameNat { nat } => {
            let s = Side::Nat(nat.clone());
            (view(&s, "198.51.100.2"), view(&s, "198.51.100.2"))
        }
        TopologySpec::SharedCarrier { .. } => {
            return (
                None,
                "shared carrier NAT: not part of the connect grid".into(),
            )
        }
    };
    let kind = classify(&a, &b);
    if kind != PairKind::Lan {
        if let Some(m) = a.mapped.or(b.mapped) {
            return (
                Some(Strategy::Portmap(m.protocol)),
                "a gateway maps a port (miniupnpd): the other side sends straight to it".into(),
            );
        }
    }
    let reason = match &kind {
        PairKind::Lan => "same NAT: LAN addresses reach each other".to_string(),
        PairKind::Cone => {
            "each side's own send opens its filter for the other's mapping".to_string()
        }
        PairKind::Predict => {
            "the symmetric side allocates predictably; the cone side probes its next ports"
                .to_string()
        }
        PairKind::Ttl => {
            "both symmetric but sequential: matched prediction with limited-TTL openers".to_string()
        }
        PairKind::Birthday => {
            "random symmetric against a port-restricted cone: many mappings meet many probes"
                .to_string()
        }
        PairKind::Impossible => NoPath {
            me: a.nat,
            peer: b.nat,
        }
        .to_string(),
        PairKind::Undecided => "a side's NAT is not known".to_string(),
    };
    // The lab measures the opener TTL, so a Ttl pair is labelled ttl.
    (kind.strategy(), reason)
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

/// One row of the TCP punching benchmark: a pair, with or without
/// limited-TTL openers.
#[derive(Debug, Clone, Serialize)]
pub struct TcpBenchRow {
    pub a: String,
    pub b: String,
    pub openers: bool,
    pub runs: u32,
    /// Punches that went direct over a TCP stream.
    pub direct: u32,
    /// From the connector's process start to its `connected` event.
    pub median_ms: Option<u64>,
    pub p95_ms: Option<u64>,
    /// The last failure's reason, if any failed.
    pub last_failure: Option<String>,
}

/// `runs` TCP-only punches (`--tcp --once`) per pair from cold processes
/// (the network's NAT facts cached), with openers and then without
/// (`--tcp-openers off`).
pub fn run_tcp_bench(
    opts: &LabOptions,
    pairs: &[GridPair],
    runs: u32,
    mut progress: impl FnMut(&TcpBenchRow),
) -> Result<Vec<TcpBenchRow>, LabError> {
    let mut out = Vec::new();
    for pair in pairs {
        let mut lab = Lab::build(&pair.topology, opts)?;
        lab.start_server()?;
        let keys = std::env::temp_dir().join(format!("{}-keys", lab.prefix()));
        let _ = std::fs::create_dir_all(&keys);
        let listener = bench_listener(&lab, &keys, &["--tcp"])?;
        let cache = keys.join("cache");
        for openers in [true, false] {
            let extra: &[&str] = if openers {
                &["--tcp", "--timeout", "5"]
            } else {
                &["--tcp", "--timeout", "5", "--tcp-openers", "off"]
            };
            let (mut times, mut last_failure) = (Vec::new(), None);
            for i in 0..runs {
                let key = keys.join(format!("a{i}"));
                let Ok((ev, took)) = cold_connect(&lab, &listener.id, &key, Some(&cache), extra)
                else {
                    continue;
                };
                match ev {
                    Some(e)
                        if e["event"] == "connected"
                            && e["transport"] == "tcp"
                            && e["path"] == "direct" =>
                    {
                        times.push(took.as_millis() as u64)
                    }
                    Some(e) => last_failure = e["reason"].as_str().map(str::to_string),
                    None => last_failure = Some("no event".into()),
                }
            }
            let direct = times.len() as u32;
            let row = TcpBenchRow {
                a: pair.a.clone(),
                b: pair.b.clone(),
                openers,
                runs,
                direct,
                median_ms: median(times.clone()),
                p95_ms: p95(times),
                last_failure,
            };
            progress(&row);
            out.push(row);
        }
        drop(listener);
        let _ = std::fs::remove_dir_all(&keys);
    }
    Ok(out)
}
