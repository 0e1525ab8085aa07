//! `natpunch demo`: natpunch end to end on this machine.
//!
//! As root on Linux (with nftables), it builds a small NAT lab: host A
//! behind a port-restricted cone NAT, host B behind a sequential symmetric
//! NAT, the server with two public addresses, and prints the behaviour
//! report each host measures. Then A sends 16 MiB to B through the NATs
//! (`natpunch -s S -d B < data`), punched and encrypted, and every byte is
//! checked. Elsewhere it runs an RFC 5780 STUN server on
//! two loopback addresses and measures this host against it, saying why.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use natpunch::nat::{discover, NatOptions};
use natpunch::stun_server::RunningServer;
use natpunch_proto::stun::server::{ServerConfig, DEFAULT_RATE_LIMIT};

use crate::cmd_nat::print_report;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Print the report(s) as JSON, one object per line.
    #[arg(long)]
    pub json: bool,
    /// Skip the NAT lab even when it could run.
    #[arg(long)]
    pub loopback: bool,
}

/// The lab demo's two NATs: a common home router and the hardest NAT that
/// port prediction still handles.
const DEMO_NATS: [&str; 2] = ["port-restricted-cone", "symmetric-sequential"];

/// What the lab demo sends from A to B (`natpunch -s S -d B < data`).
const DEMO_BYTES: u64 = 16 << 20;

/// Two loopback IPs: Linux answers on all of 127.0.0.0/8 without setup.
const PRIMARY_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const ALT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Port pairs tried before giving up (another process may hold one).
const PORT_TRIES: u16 = 20;

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if !args.loopback {
        match natpunch_lab::topology::preflight() {
            Ok(()) => return lab_demo(&args),
            Err(why) => {
                if !args.json {
                    println!("natpunch demo: no NAT lab here ({why}); using loopback instead\n");
                }
            }
        }
    }
    crate::runtime()?.block_on(async move {
        let server = start_loopback_server().await?;
        let primary = server.local_addresses()[0];
        if !args.json {
            println!(
                "natpunch demo: STUN server (RFC 5780) on {} and {}; measuring this host against it\n",
                primary,
                server.local_addresses()[3]
            );
        }
        let mut opts = NatOptions::new(primary);
        opts.source_ip = Some(IpAddr::V4(PRIMARY_IP));
        let report = discover(opts).await?;
        print_report(&report, args.json);
        let stats = server.shutdown().await;
        if !args.json {
            println!(
                "\nserver: {} requests answered ({} with CHANGE-REQUEST), {} dropped",
                stats.answered,
                stats.change_requests,
                stats.malformed + stats.rate_limited
            );
        }
        anyhow::ensure!(report.mapped.is_some(), "the in-process server did not answer");
        Ok(ExitCode::SUCCESS)
    })
}

async fn start_loopback_server() -> anyhow::Result<RunningServer> {
    let mut last = None;
    for i in 0..PORT_TRIES {
        let port = 20_000 + (rand::random::<u16>() % 20_000) + i;
        let config = ServerConfig {
            primary: SocketAddr::new(IpAddr::V4(PRIMARY_IP), port),
            alternate: Some(SocketAddr::new(IpAddr::V4(ALT_IP), port + 1)),
            software: None,
            rate_limit: DEFAULT_RATE_LIMIT,
        };
        match RunningServer::start(config).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.context("no port tried")?).context("cannot start the loopback STUN server")
}

fn lab_demo(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    use natpunch_lab::{Lab, LabOptions, Links, Node, Side, TopologySpec};
    let topology = TopologySpec::Pair {
        a: Side::parse(DEMO_NATS[0])?,
        b: Side::parse(DEMO_NATS[1])?,
    };
    let opts = LabOptions {
        natpunch: std::env::current_exe().context("cannot find the natpunch binary")?,
        links: Links::default(),
    };
    let mut lab = Lab::build(&topology, &opts).context("cannot build the NAT lab")?;
    let server = lab.start_server()?;
    if !args.json {
        println!(
            "natpunch demo: NAT lab {} (network namespaces + nftables); server {server} and 203.0.113.11:3479",
            lab.prefix()
        );
    }
    for (node, nat) in [(Node::HostA, DEMO_NATS[0]), (Node::HostB, DEMO_NATS[1])] {
        let mut cmd = lab.natpunch(node);
        cmd.args(["nat", "-H", &server.to_string()]);
        if args.json {
            cmd.arg("--json");
        }
        let out = cmd.output().context("cannot run natpunch nat in the lab")?;
        anyhow::ensure!(
            out.status.success(),
            "natpunch nat failed behind {nat}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        if !args.json {
            println!(
                "\nhost {} behind a {nat} NAT:",
                if node == Node::HostA { "A" } else { "B" }
            );
        }
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    // Then the point of it all: bytes from A to B, directly and encrypted.
    let keys = std::env::temp_dir().join(format!("{}-keys", lab.prefix()));
    let _ = std::fs::create_dir_all(&keys);
    let run = natpunch_lab::throughput::pipe(&lab, DEMO_BYTES, &keys);
    let _ = std::fs::remove_dir_all(&keys);
    lab.teardown();
    let run = run.context("the session from A to B failed")?;
    anyhow::ensure!(run.intact, "bytes arrived altered");
    if args.json {
        crate::output::json_line(
            &serde_json::json!({"event": "session", "strategy": run.strategy,
            "relay_ms": run.relay_ms,
            "punch_ms": run.punch_ms, "bytes": run.transfer.bytes, "seconds": run.transfer.seconds,
            "mbit_s": run.transfer.mbit_s, "intact": run.intact}),
        );
    } else {
        println!(
            "
A → B: {}punched by {} in {} ms, then {} MiB through an encrypted QUIC session in {:.2} s ({:.0} Mbit/s), every byte checked",
            run.relay_ms
                .map(|ms| format!("on the relay in {ms} ms, "))
                .unwrap_or_default(),
            run.strategy,
            run.punch_ms,
            run.transfer.bytes >> 20,
            run.transfer.seconds,
            run.transfer.mbit_s
        );
    }
    Ok(ExitCode::SUCCESS)
}
