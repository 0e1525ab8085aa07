//! `natpunch demo`: natpunch end to end on this machine. For now: an
//! RFC 5780 STUN server on two loopback addresses, and the NAT behaviour
//! report measured against it.

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
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Two loopback IPs: Linux answers on all of 127.0.0.0/8 without setup.
const PRIMARY_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const ALT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Port pairs tried before giving up (another process may hold one).
const PORT_TRIES: u16 = 20;

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
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
            println!("(run as root on Linux once the NAT lab lands to see real NATs)");
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
