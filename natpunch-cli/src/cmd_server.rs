//! `natpunch server`: the STUN server (later also rendezvous and relay).

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use natpunch::stun_server::RunningServer;
use natpunch_proto::ratelimit::RateLimit;
use natpunch_proto::rendezvous::server::RendezvousStats;
use natpunch_proto::stun::server::{ServerConfig, ServerStats, DEFAULT_RATE_LIMIT};

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Primary address to serve on (UDP and TCP).
    #[arg(long, default_value = "0.0.0.0:3478")]
    pub listen: SocketAddr,
    /// Alternate address (another IP and another port): enables RFC 5780
    /// CHANGE-REQUEST on 2 IPs x 2 ports.
    #[arg(long)]
    pub alt: Option<SocketAddr>,
    /// Print events as JSON, one object per line, on stdout.
    #[arg(long)]
    pub json: bool,
    /// SOFTWARE attribute to add to replies.
    #[arg(long)]
    pub software: Option<String>,
    /// Requests per second allowed per source IP (burst: twice this).
    #[arg(long, default_value_t = DEFAULT_RATE_LIMIT.rate, conflicts_with = "no_rate_limit")]
    pub rate: f64,
    /// Disable per-source rate limiting (benchmarks on loopback only).
    #[arg(long)]
    pub no_rate_limit: bool,
}

impl ServerArgs {
    pub fn config(&self) -> anyhow::Result<ServerConfig> {
        let rate_limit = if self.no_rate_limit {
            RateLimit::unlimited()
        } else {
            anyhow::ensure!(
                self.rate.is_finite() && self.rate > 0.0,
                "--rate must be a positive number"
            );
            RateLimit {
                rate: self.rate,
                burst: self.rate * 2.0,
                ..DEFAULT_RATE_LIMIT
            }
        };
        Ok(ServerConfig {
            primary: self.listen,
            alternate: self.alt,
            software: self.software.clone(),
            rate_limit,
        })
    }
}

pub fn run(args: ServerArgs) -> anyhow::Result<ExitCode> {
    let config = args.config()?;
    crate::runtime()?.block_on(async move {
        let server = RunningServer::start(config).await.context("cannot start the server")?;
        let locals: Vec<String> = server.local_addresses().iter().map(|a| a.to_string()).collect();
        if args.json {
            crate::output::json_line(&serde_json::json!({
                "event": "listening",
                "udp": locals,
                "tcp": locals,
                "rfc5780": args.alt.is_some(),
            }));
        } else {
            eprintln!(
                "natpunch server: STUN on udp+tcp {} ({}), rate limit {}",
                locals.join(", "),
                if args.alt.is_some() { "RFC 5780 enabled" } else { "no --alt: CHANGE-REQUEST answered 420" },
                if args.no_rate_limit { "off".to_string() } else { format!("{}/s per source", args.rate) },
            );
        }
        wait_for_signal().await?;
        let (stats, rv) = server.shutdown_all().await;
        if args.json {
            let mut v = stats_json("stopped", &stats);
            v["rendezvous"] = rendezvous_json(&rv);
            crate::output::json_line(&v);
        } else {
            eprintln!(
                "natpunch server: stopped; STUN: {} received, {} answered, {} errors sent, {} malformed, {} rate-limited",
                stats.received, stats.answered, stats.errors_sent, stats.malformed, stats.rate_limited
            );
            eprintln!(
                "natpunch server: rendezvous: {} received, {} registrations, {} introductions, {} introductions over a target's budget, {} rate-limited, {} bad cookies, {} bad signatures, {} displaced, {} refused (tables full)",
                rv.received,
                rv.registrations,
                rv.introductions,
                rv.introduction_limited,
                rv.rate_limited,
                rv.bad_cookie,
                rv.bad_signature,
                rv.displaced,
                rv.server_full
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn stats_json(event: &str, s: &ServerStats) -> serde_json::Value {
    serde_json::json!({
        "event": event,
        "received": s.received,
        "answered": s.answered,
        "errors_sent": s.errors_sent,
        "malformed": s.malformed,
        "rate_limited": s.rate_limited,
        "ignored": s.ignored,
        "change_requests": s.change_requests,
    })
}

/// The rendezvous counters, for `--json`.
pub fn rendezvous_json(s: &RendezvousStats) -> serde_json::Value {
    serde_json::json!({
        "received": s.received,
        "malformed": s.malformed,
        "unsupported_version": s.unsupported_version,
        "bad_cookie": s.bad_cookie,
        "bad_signature": s.bad_signature,
        "rate_limited": s.rate_limited,
        "introduction_limited": s.introduction_limited,
        "server_full": s.server_full,
        "amplification_dropped": s.amplification_dropped,
        "registrations": s.registrations,
        "displaced": s.displaced,
        "introductions": s.introductions,
        "updates": s.updates,
        "pings": s.pings,
    })
}

/// Returns on SIGINT or SIGTERM.
pub async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot wait for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}
