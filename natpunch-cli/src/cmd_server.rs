//! `natpunch server`: STUN, rendezvous and relay on one port.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use natpunch::stun_server::RunningServer;
use natpunch_proto::ratelimit::RateLimit;
use natpunch_proto::relay::server::{PEER_BYTES, PEER_PACKETS};
use natpunch_proto::relay::{RelayConfig, RelayStats};
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
    /// Disable per-source rate limiting, and the relay's per-peer rates
    /// (benchmarks on loopback only).
    #[arg(long)]
    pub no_rate_limit: bool,
    /// Do not relay: peers that cannot punch a direct path fail.
    #[arg(long)]
    pub no_relay: bool,
    /// This relay node's public address, when peers should reach its relay
    /// at another address than the one they use for the server (a name
    /// behind a load balancer, say). Listeners registered here are homed
    /// on it, and introductions name it.
    #[arg(long, value_name = "HOST:PORT")]
    pub relay_addr: Option<SocketAddr>,
    /// Relayed traffic each peer may send, in Mbit/s (sustained; bursts of
    /// 4 MiB). A rate, never a total: long sessions are not cut off.
    #[arg(long, default_value_t = PEER_BYTES.rate * 8.0 / 1e6, value_name = "MBIT")]
    pub relay_peer_mbit: f64,
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
        anyhow::ensure!(
            self.relay_peer_mbit.is_finite() && self.relay_peer_mbit > 0.0,
            "--relay-peer-mbit must be a positive number"
        );
        Ok(ServerConfig {
            primary: self.listen,
            alternate: self.alt,
            software: self.software.clone(),
            rate_limit,
        })
    }
}

impl ServerArgs {
    pub fn relay(&self) -> RelayConfig {
        if self.no_relay {
            return RelayConfig::disabled();
        }
        if self.no_rate_limit {
            return RelayConfig {
                public: self.relay_addr,
                ..RelayConfig::unlimited()
            };
        }
        let bytes = self.relay_peer_mbit * 1e6 / 8.0;
        RelayConfig {
            peer_bytes: RateLimit {
                rate: bytes,
                ..PEER_BYTES
            },
            // Packets scale with the byte rate (full-size packets), never
            // below the default.
            peer_packets: RateLimit {
                rate: (bytes / 1250.0).max(PEER_PACKETS.rate),
                ..PEER_PACKETS
            },
            public: self.relay_addr,
            ..RelayConfig::default()
        }
    }
}

/// With `--json`, the counters are printed this often (when they moved).
const STATS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

pub fn run(args: ServerArgs) -> anyhow::Result<ExitCode> {
    let config = args.config()?;
    let relay = args.relay();
    crate::runtime()?.block_on(async move {
        let server = RunningServer::start_with(config, relay)
            .await
            .context("cannot start the server")?;
        // The handlers are in place before `listening` is printed, so a
        // SIGTERM right after it still gets the summary.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot install the SIGTERM handler")?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .context("cannot install the SIGINT handler")?;
        let locals: Vec<String> = server.local_addresses().iter().map(|a| a.to_string()).collect();
        if args.json {
            crate::output::json_line(&serde_json::json!({
                "event": "listening",
                "udp": locals,
                "tcp": locals,
                "rfc5780": args.alt.is_some(),
                "relay": !args.no_relay,
                "relay_addr": args.relay_addr,
            }));
        } else {
            eprintln!(
                "natpunch server: STUN, rendezvous{} on udp {} (STUN on tcp too) ({}), rate limit {}",
                if args.no_relay { "" } else { " and relay" },
                locals.join(", "),
                if args.alt.is_some() { "RFC 5780 enabled" } else { "no --alt: CHANGE-REQUEST answered 420" },
                if args.no_rate_limit { "off".to_string() } else { format!("{}/s per source", args.rate) },
            );
        }
        let mut tick = tokio::time::interval(STATS_EVERY);
        tick.tick().await;
        let mut last = None;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = tick.tick(), if args.json => {
                    let now = (server.stats(), server.rendezvous_stats().0, server.relay_stats());
                    if last != Some(now) {
                        let mut v = stats_json("stats", &now.0);
                        v["rendezvous"] = rendezvous_json(&now.1);
                        v["relay"] = relay_json(&now.2 .0, now.2 .1, now.2 .2);
                        crate::output::json_line(&v);
                        last = Some(now);
                    }
                }
            }
        }
        let (channels, peers) = {
            let (_, c, p) = server.relay_stats();
            (c, p)
        };
        let (stats, rv, relay) = server.shutdown_all().await;
        if args.json {
            let mut v = stats_json("stopped", &stats);
            v["rendezvous"] = rendezvous_json(&rv);
            v["relay"] = relay_json(&relay, channels, peers);
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
            eprintln!(
                "natpunch server: relay: {} channels opened, {} packets ({} bytes) relayed, {} keepalives; dropped: {} over a peer's rate, {} for no channel, {} from neither end, {} before the target accepted, {} malformed; {} refused (tables full)",
                relay.channels_opened,
                relay.packets,
                relay.bytes,
                relay.keepalives,
                relay.dropped_rate,
                relay.dropped_unknown_channel,
                relay.dropped_stranger,
                relay.dropped_unaccepted,
                relay.dropped_malformed,
                relay.refused_full
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

/// The relay counters, for `--json`.
pub fn relay_json(s: &RelayStats, channels: usize, peers: usize) -> serde_json::Value {
    serde_json::json!({
        "channels": channels,
        "peers": peers,
        "channels_opened": s.channels_opened,
        "channels_expired": s.channels_expired,
        "refused_full": s.refused_full,
        "packets": s.packets,
        "bytes": s.bytes,
        "keepalives": s.keepalives,
        "rebinds": s.rebinds,
        "dropped": {
            "rate": s.dropped_rate,
            "unaccepted": s.dropped_unaccepted,
            "unknown_channel": s.dropped_unknown_channel,
            "stranger": s.dropped_stranger,
            "malformed": s.dropped_malformed,
        },
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
