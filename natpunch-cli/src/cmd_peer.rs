//! `natpunch -s SERVER [-d PEER_ID]`, `natpunch listen` and
//! `natpunch connect`: register with a rendezvous server and punch through
//! to a peer.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use natpunch::keyfile;
use natpunch::net::resolve;
use natpunch::peer::{self, Mode, PeerConfig, PeerEvent};
use natpunch_proto::identity::PeerId;
use natpunch_proto::punch::PunchConfig;
use tokio::sync::mpsc;

/// The STUN/rendezvous port (RFC 8489 §18.6).
const DEFAULT_PORT: u16 = 3478;

#[derive(Debug, Args, Clone)]
pub struct PeerArgs {
    /// Rendezvous ("punch") server, HOST[:PORT].
    #[arg(short = 's', long = "server", value_name = "SERVER[:PORT]")]
    pub server: Option<String>,
    /// Connect to this peer ID (without it: register and wait).
    #[arg(short = 'd', long = "dest", value_name = "PEER_ID")]
    pub dest: Option<PeerId>,
    /// STUN server for NAT discovery (default: the rendezvous server).
    #[arg(short = 'H', long = "stun", value_name = "HOST[:PORT]")]
    pub stun: Option<String>,
    /// Local IP to use.
    #[arg(short = 'i', long = "source-ip")]
    pub source_ip: Option<IpAddr>,
    /// Local UDP port to use.
    #[arg(short = 'p', long = "source-port")]
    pub source_port: Option<u16>,
    /// TTL of the limited-TTL first probes (default: discovered).
    #[arg(short = 't', long = "ttl", value_parser = clap::value_parser!(u8).range(1..=64))]
    pub ttl: Option<u8>,
    /// Events as JSON on stderr, one object per line.
    #[arg(long)]
    pub json: bool,
    /// Identity key file (created with mode 0600 if missing).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Exit after the first connection (or failure) instead of keeping it
    /// alive until Ctrl-C.
    #[arg(long)]
    pub once: bool,
    /// Give up punching after this many seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub timeout: u64,
    /// Retransmission timeout of NAT discovery in ms.
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..=5000))]
    pub rto_ms: u64,
}

fn key_path(key: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match key {
        Some(p) => Ok(p.clone()),
        None => {
            keyfile::default_key_path().context("no key file path: set --key, NATPUNCH_KEY or HOME")
        }
    }
}

/// `natpunch id`: prints our peer ID.
pub fn print_id(key: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let path = key_path(&key)?;
    let (identity, created) = keyfile::load_or_create(&path)?;
    if created {
        eprintln!("natpunch: created a new identity key in {}", path.display());
    }
    println!("{}", identity.peer_id());
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: PeerArgs, target: Option<PeerId>) -> anyhow::Result<ExitCode> {
    let Some(server) = args.server.clone() else {
        eprintln!("natpunch: a rendezvous server is needed: -s SERVER[:PORT] (see --help)");
        return Ok(ExitCode::from(2));
    };
    let path = match &args.key {
        Some(p) => p.clone(),
        None => keyfile::default_key_path()
            .context("no key file path: set --key, NATPUNCH_KEY or HOME")?,
    };
    let (identity, created) = keyfile::load_or_create(&path)?;
    if created && !args.json {
        eprintln!("natpunch: created a new identity key in {}", path.display());
    }
    let target = target.or(args.dest);
    crate::runtime()?.block_on(async move {
        let server = resolve(
            &server,
            DEFAULT_PORT,
            args.source_ip.is_some_and(|i| i.is_ipv6()),
        )
        .await?;
        let stun = match &args.stun {
            Some(h) => Some(resolve(h, DEFAULT_PORT, server.is_ipv6()).await?),
            None => None,
        };
        let mut punch = PunchConfig::new(0);
        punch.timeout = Duration::from_secs(args.timeout);
        let cfg = PeerConfig {
            identity,
            server,
            stun,
            source_ip: args.source_ip,
            source_port: args.source_port,
            ttl: args.ttl,
            punch,
            rto: Duration::from_millis(args.rto_ms),
            once: args.once,
        };
        let mode = match target {
            Some(t) => Mode::Connect(t),
            None => Mode::Listen,
        };
        let (tx, mut rx) = mpsc::channel(256);
        let json = args.json;
        let driver = tokio::spawn(peer::run(cfg, mode, tx));
        let mut failed = false;
        let mut connected = false;
        let printer = async {
            while let Some(ev) = rx.recv().await {
                match &ev {
                    PeerEvent::Connected { .. } => connected = true,
                    PeerEvent::Failed { .. } => failed = true,
                    _ => {}
                }
                print_event(&ev, json);
            }
        };
        tokio::select! {
            _ = printer => {}
            r = crate::cmd_server::wait_for_signal() => r?,
        }
        let result = match tokio::time::timeout(Duration::from_millis(100), driver).await {
            Ok(Ok(r)) => r,
            // Still running (Ctrl-C): that's a normal stop.
            _ => Ok(()),
        };
        if let Err(e) = result {
            if json {
                crate::output::json_line_stderr(
                    &serde_json::json!({"event": "failed", "reason": e.to_string()}),
                );
            }
            return Err(anyhow::Error::new(e));
        }
        Ok(if failed && !connected {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    })
}

fn print_event(ev: &PeerEvent, json: bool) {
    use crate::output::json_line_stderr as j;
    match ev {
        PeerEvent::NatMeasured { report, opener_ttl } => {
            if json {
                j(
                    &serde_json::json!({"event": "nat", "classic": report.classic, "mapped": report.mapped,
                    "mapping": report.mapping, "filtering": report.filtering,
                    "allocation": {"kind": report.allocation.kind, "delta": report.allocation.delta},
                    "opener_ttl": opener_ttl}),
                );
            } else {
                eprintln!(
                    "natpunch: NAT {} (mapped {}, allocation {}{})",
                    report.classic.as_str(),
                    report.mapped.map(|m| m.to_string()).unwrap_or_default(),
                    report
                        .allocation
                        .kind
                        .map(|k| format!("{k:?}").to_lowercase())
                        .unwrap_or_else(|| "unknown".into()),
                    report
                        .allocation
                        .delta
                        .map(|d| format!(" {d:+}"))
                        .unwrap_or_default()
                );
            }
        }
        PeerEvent::Registered { peer_id, observed } => {
            if json {
                j(
                    &serde_json::json!({"event": "registered", "peer_id": peer_id.to_string(), "observed": observed}),
                );
            } else {
                println!("{peer_id}");
                eprintln!("natpunch: registered as {peer_id} (seen as {observed}); waiting");
            }
        }
        PeerEvent::Incoming { from } => {
            if json {
                j(&serde_json::json!({"event": "incoming", "peer_id": from.to_string()}));
            } else {
                eprintln!("natpunch: {from} wants to connect");
            }
        }
        PeerEvent::Attempt { peer_id, strategy } => {
            if json {
                j(
                    &serde_json::json!({"event": "attempt", "peer_id": peer_id.to_string(), "strategy": strategy.as_str()}),
                );
            } else {
                eprintln!(
                    "natpunch: punching to {peer_id}: trying {}…",
                    strategy.as_str()
                );
            }
        }
        PeerEvent::Connected {
            peer_id,
            strategy,
            remote,
            elapsed,
            probes_sent,
            bytes_sent,
        } => {
            if json {
                j(
                    &serde_json::json!({"event": "connected", "peer_id": peer_id.to_string(), "path": "direct",
                    "transport": "udp", "strategy": strategy.as_str(), "remote": remote,
                    "elapsed_ms": elapsed.as_millis() as u64, "probes_sent": probes_sent, "bytes_sent": bytes_sent}),
                );
            } else {
                eprintln!(
                    "natpunch: connected to {peer_id} directly at {remote} by {} in {} ms ({probes_sent} probes, {bytes_sent} bytes)",
                    strategy.as_str(),
                    elapsed.as_millis()
                );
            }
        }
        PeerEvent::Failed { peer_id, reason } => {
            if json {
                j(
                    &serde_json::json!({"event": "failed", "peer_id": peer_id.map(|p| p.to_string()), "reason": reason}),
                );
            } else {
                eprintln!("natpunch: failed: {reason}");
            }
        }
        PeerEvent::PathLost { peer_id } => {
            if json {
                j(&serde_json::json!({"event": "path-lost", "peer_id": peer_id.to_string()}));
            } else {
                eprintln!("natpunch: path to {peer_id} lost");
            }
        }
        other => tracing::debug!(?other, "unprinted peer event"),
    }
}
