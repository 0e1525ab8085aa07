//! `natpunch lab`: build NAT topologies from network namespaces (root,
//! Linux), verify discovery against them, and run pair grids.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use natpunch_lab::grid::{self, Outcome};
use natpunch_lab::runner::{self, Scenario};
use natpunch_lab::topology::{preflight, sweep_stale};
use natpunch_lab::{Lab, LabOptions, LinkSpec, Links, Node, Side, TopologySpec};

use crate::output::json_line;

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Check `natpunch nat` against every preset, double NAT, shared
    /// carrier NAT and same NAT.
    Verify(VerifyArgs),
    /// Run a scenario for a list of NAT pairs and print the grid.
    Grid(GridArgs),
    /// Build a topology and keep it up until Ctrl-C, for experiments.
    Up(UpArgs),
    /// Delete namespaces left by lab runs whose process died.
    Clean,
    /// (internal) The delay line run inside a namespace.
    #[command(hide = true)]
    DelayLine(DelayLineArgs),
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// One JSON object per check, then a summary object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args, Clone)]
pub struct LinkArgs {
    /// One-way delay added on each host's access link (ms).
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Packet loss on each access link, each way (percent).
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Rate limit on each access link, each way (kbit/s).
    #[arg(long)]
    pub rate_kbit: Option<u64>,
}

impl LinkArgs {
    fn links(&self) -> anyhow::Result<Links> {
        anyhow::ensure!(
            (0.0..=100.0).contains(&self.loss),
            "--loss is a percentage (0-100)"
        );
        let l = LinkSpec {
            delay: (self.delay_ms > 0).then(|| Duration::from_millis(self.delay_ms)),
            loss: self.loss / 100.0,
            rate_kbit: self.rate_kbit,
        };
        Ok(Links { a: l, b: l })
    }
}

#[derive(Debug, Args)]
pub struct GridArgs {
    /// Pairs `A/B,C/D,same:PRESET`; a side is `direct`,
    /// `PRESET[:k=v,...]` or `HOME+CARRIER`; `same:` puts both behind one
    /// NAT. Default: every preset against every other, plus double and
    /// same NAT.
    #[arg(long)]
    pub pairs: Option<String>,
    /// What each pair runs: `connect` (B listens, A connects: the
    /// punching grid), `session` (A pipes 1 MiB to B; relay first, then
    /// the direct path where one exists; more pairs, relay-only ones too)
    /// or `nat` (both run `natpunch nat`).
    #[arg(long, default_value = "connect", value_parser = ["connect", "session", "nat"])]
    pub scenario: String,
    /// One JSON object per pair, then a summary object.
    #[arg(long)]
    pub json: bool,
    /// Write the grid picture here.
    #[arg(long, default_value = "natpunch-grid.svg")]
    pub svg: PathBuf,
    #[command(flatten)]
    pub link: LinkArgs,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Host A's side: `direct`, `PRESET[:k=v,...]` or `HOME+CARRIER`.
    #[arg(long, default_value = "port-restricted-cone")]
    pub a: String,
    /// Host B's side.
    #[arg(long, default_value = "symmetric-sequential")]
    pub b: String,
    #[command(flatten)]
    pub link: LinkArgs,
}

#[derive(Debug, Args)]
pub struct DelayLineArgs {
    #[arg(long)]
    pub queue: u16,
    #[arg(long)]
    pub delay_ms: u64,
}

fn options(links: Links) -> anyhow::Result<LabOptions> {
    Ok(LabOptions {
        natpunch: std::env::current_exe().context("cannot find the natpunch binary")?,
        links,
    })
}

pub fn run(cmd: LabCommand) -> anyhow::Result<ExitCode> {
    if let LabCommand::DelayLine(a) = cmd {
        let stop = AtomicBool::new(false);
        let config = natpunch_lab::delay::DelayLineConfig {
            queue: a.queue,
            delay: Duration::from_millis(a.delay_ms),
        };
        natpunch_lab::delay::run(&config, &stop)?;
        return Ok(ExitCode::SUCCESS);
    }
    preflight()?;
    match cmd {
        LabCommand::Verify(a) => verify(a),
        LabCommand::Grid(a) => grid_cmd(a),
        LabCommand::Up(a) => up(a),
        LabCommand::Clean => {
            let removed = sweep_stale()?;
            println!("removed {} stale lab namespaces", removed.len());
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::DelayLine(_) => Ok(ExitCode::SUCCESS),
    }
}

fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let cases = runner::verify_cases()?;
    let opts = options(Links::default())?;
    if !a.json {
        println!(
            "{:<40} {:<46} {:<6} measured",
            "lab", "host behind", "result"
        );
    }
    let results = runner::run_verify(&opts, &cases, |r| {
        if a.json {
            json_line(&serde_json::to_value(r).unwrap_or_default());
        } else {
            println!(
                "{:<40} {:<46} {:<6} {}{}",
                r.case,
                r.host,
                if r.ok { "ok" } else { "FAIL" },
                r.measured,
                if r.mismatches.is_empty() {
                    String::new()
                } else {
                    format!("\n    {}", r.mismatches.join("\n    "))
                }
            );
        }
    })?;
    let failed = results.iter().filter(|r| !r.ok).count();
    if a.json {
        json_line(
            &serde_json::json!({"event": "verify-done", "checks": results.len(), "failed": failed}),
        );
    } else {
        println!(
            "{} of {} checks passed",
            results.len() - failed,
            results.len()
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn grid_cmd(a: GridArgs) -> anyhow::Result<ExitCode> {
    let scenario = match a.scenario.as_str() {
        "connect" => Scenario::Connect,
        "session" => Scenario::Session,
        _ => Scenario::Nat,
    };
    let pairs = match &a.pairs {
        Some(p) => runner::parse_pairs(p)?,
        None if scenario == Scenario::Session => runner::session_pairs()?,
        None => runner::default_pairs()?,
    };
    anyhow::ensure!(!pairs.is_empty(), "--pairs names no pair");
    let opts = options(a.link.links()?)?;
    let rows = runner::run_grid(&opts, &pairs, scenario, |row| {
        if a.json {
            json_line(&serde_json::to_value(row).unwrap_or_default());
        } else {
            eprintln!(
                "  {} × {}: {} ({:.2} s)",
                row.a,
                row.b,
                row.outcome.as_str(),
                row.elapsed_ms as f64 / 1000.0
            );
        }
    });
    let title = format!(
        "natpunch lab grid: {} per pair{}",
        match scenario {
            Scenario::Connect => "A connects to B",
            Scenario::Session => "A's session to B (relay first, then direct)",
            Scenario::Nat => "NAT discovery",
        },
        if a.link.delay_ms > 0 {
            format!(", {} ms one-way access delay", a.link.delay_ms)
        } else {
            String::new()
        }
    );
    std::fs::write(&a.svg, grid::svg(&title, &rows))
        .with_context(|| format!("cannot write {}", a.svg.display()))?;
    let failed = rows.iter().filter(|r| r.outcome != Outcome::Pass).count();
    if a.json {
        json_line(
            &serde_json::json!({"event": "grid-done", "pairs": rows.len(), "failed": failed, "svg": a.svg}),
        );
    } else {
        print!("{}", grid::table(&rows));
        println!("picture: {}", a.svg.display());
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn up(a: UpArgs) -> anyhow::Result<ExitCode> {
    let topology = TopologySpec::Pair {
        a: Side::parse(&a.a)?,
        b: Side::parse(&a.b)?,
    };
    let mut lab = Lab::build(&topology, &options(a.link.links()?)?)?;
    let server = lab.start_server()?;
    // A closed stdout must not take the lab down: ignore write errors.
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "lab {} is up; natpunch server on {server}",
        lab.prefix()
    );
    for (node, name) in [
        (Node::HostA, "host A"),
        (Node::HostB, "host B"),
        (Node::Server, "server"),
    ] {
        if let Some(ns) = lab.netns(node) {
            let _ = writeln!(
                out,
                "  {name:<7} ip netns exec {ns} natpunch nat -H {server}"
            );
        }
    }
    let _ = writeln!(out, "Ctrl-C tears it down.");
    let _ = out.flush();
    crate::runtime()?.block_on(crate::cmd_server::wait_for_signal())?;
    lab.teardown();
    Ok(ExitCode::SUCCESS)
}
