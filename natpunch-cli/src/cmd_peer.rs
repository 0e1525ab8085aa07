//! `natpunch -s SERVER [-d PEER_ID]`, `natpunch listen` and
//! `natpunch connect`: register with a rendezvous server and punch through
//! to a peer.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Args;
use natpunch::keyfile;
use natpunch::net::resolve;
use natpunch::peer::PeerEvent;
use natpunch::session::service::Services;
use natpunch::session::{Endpoint, EndpointConfig};
use natpunch_proto::identity::PeerId;

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
    /// Punch only: report the first punched path (or failure) and exit,
    /// without a session or data.
    #[arg(long)]
    pub once: bool,
    /// Listener: keep accepting sessions after the first one ends.
    #[arg(long)]
    pub keep_open: bool,
    /// Listener: offer the local TCP service HOST:PORT to peers under NAME
    /// (repeatable; implies --keep-open). Nothing else is reachable.
    #[arg(long, value_name = "NAME=HOST:PORT")]
    pub expose: Vec<String>,
    /// Listener: accept sessions only from this peer (repeatable).
    #[arg(long, value_name = "PEER_ID")]
    pub allow: Vec<PeerId>,
    /// Connector: listen on LOCAL_ADDR:PORT and carry each TCP connection to
    /// the peer's service NAME (repeatable).
    #[arg(long, value_name = "LOCAL_ADDR:PORT=NAME")]
    pub forward: Vec<String>,
    /// Connector: join stdin/stdout to the peer's service NAME (for ssh's
    /// ProxyCommand).
    #[arg(long, value_name = "NAME")]
    pub to: Option<String>,
    /// Connector: the peer has a public or forwarded port here; dial it
    /// directly instead of punching.
    #[arg(long, value_name = "HOST:PORT")]
    pub direct: Option<String>,
    /// End a session whose path stays silent this many seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub idle_timeout: u64,
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

/// Checks the flag combinations; `Err` is the one line for exit code 2.
fn check_usage(args: &PeerArgs, connecting: bool) -> Result<(), String> {
    if args.server.is_none() {
        return Err("a rendezvous server is needed: -s SERVER[:PORT] (see --help)".into());
    }
    if connecting {
        for (set, flag) in [
            (!args.expose.is_empty(), "--expose"),
            (!args.allow.is_empty(), "--allow"),
            (args.keep_open, "--keep-open"),
        ] {
            if set {
                return Err(format!("{flag} is for the listening side (without -d)"));
            }
        }
        if args.to.is_some() && !args.forward.is_empty() {
            return Err("--to and --forward do not go together".into());
        }
    } else {
        for (set, flag) in [
            (!args.forward.is_empty(), "--forward"),
            (args.to.is_some(), "--to"),
            (args.direct.is_some(), "--direct"),
        ] {
            if set {
                return Err(format!("{flag} needs -d PEER_ID"));
            }
        }
    }
    if args.once && (args.to.is_some() || !args.forward.is_empty() || !args.expose.is_empty()) {
        return Err("--once only punches; it carries no data".into());
    }
    Ok(())
}

pub fn run(args: PeerArgs, target: Option<PeerId>) -> anyhow::Result<ExitCode> {
    let target = target.or(args.dest);
    if let Err(line) = check_usage(&args, target.is_some()) {
        eprintln!("natpunch: {line}");
        return Ok(ExitCode::from(2));
    }
    let mut services = Services::default();
    for spec in &args.expose {
        if let Err(line) = services.add(spec) {
            eprintln!("natpunch: {line}");
            return Ok(ExitCode::from(2));
        }
    }
    let mut forwards = Vec::new();
    for spec in &args.forward {
        match crate::cmd_session::parse_forward(spec) {
            Ok(f) => forwards.push(f),
            Err(line) => {
                eprintln!("natpunch: {line}");
                return Ok(ExitCode::from(2));
            }
        }
    }
    let path = key_path(&args.key)?;
    let (identity, created) = keyfile::load_or_create(&path)?;
    if created && !args.json {
        eprintln!("natpunch: created a new identity key in {}", path.display());
    }
    let rt = crate::runtime()?;
    let result = rt.block_on(async move {
        let v6 = args.source_ip.is_some_and(|i| i.is_ipv6());
        let direct = match &args.direct {
            Some(d) => {
                let addr = resolve(d, 0, v6).await?;
                if addr.port() == 0 {
                    eprintln!("natpunch: --direct needs HOST:PORT, the peer's session port");
                    return Ok(ExitCode::from(2));
                }
                Some(addr)
            }
            None => None,
        };
        let server = resolve(args.server.as_deref().unwrap_or_default(), DEFAULT_PORT, v6).await?;
        let stun = match &args.stun {
            Some(h) => Some(resolve(h, DEFAULT_PORT, server.is_ipv6()).await?),
            None => None,
        };
        let mut cfg = EndpointConfig::new(identity, server);
        cfg.peer.stun = stun;
        cfg.peer.source_ip = args.source_ip;
        cfg.peer.source_port = args.source_port;
        cfg.peer.ttl = args.ttl;
        cfg.peer.punch.timeout = Duration::from_secs(args.timeout);
        cfg.peer.rto = Duration::from_millis(args.rto_ms);
        cfg.peer.once = args.once;
        cfg.accept = target.is_none();
        cfg.idle_timeout = Duration::from_secs(args.idle_timeout);
        if !args.allow.is_empty() {
            cfg.allow = Some(args.allow.iter().copied().collect::<HashSet<_>>());
        }
        let endpoint = Endpoint::bind(cfg)?;
        let status = Arc::new(Mutex::new(Seen::default()));
        let printer = {
            let (json, status) = (args.json, status.clone());
            let events = endpoint.events();
            tokio::spawn(async move {
                let Some(mut rx) = events else { return };
                while let Some(ev) = rx.recv().await {
                    if let Ok(mut s) = status.lock() {
                        s.note(&ev);
                    }
                    print_event(&ev, json);
                }
            })
        };
        let session = crate::cmd_session::Session {
            endpoint: &endpoint,
            json: args.json,
            idle_secs: args.idle_timeout,
            live: Default::default(),
        };
        let work = async {
            if args.once {
                if let Some(t) = target {
                    // The driver stops after the punch; the reply never comes.
                    let _ = tokio::join!(endpoint.connect(t), endpoint.finished());
                }
                endpoint.finished().await?;
                let s = status.lock().map(|s| *s).unwrap_or_default();
                return Ok(if s.failed && !s.connected {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                });
            }
            match target {
                Some(t) => session.connect(t, direct, args.to.clone(), forwards).await,
                None => session.listen(services, args.keep_open).await,
            }
        };
        let code = tokio::select! {
            r = work => r,
            r = crate::cmd_server::wait_for_signal() => {
                r?;
                session.interrupt().await;
                Ok(ExitCode::from(130))
            }
        };
        // Let the last events reach the terminal.
        tokio::time::sleep(Duration::from_millis(20)).await;
        printer.abort();
        code
    });
    // stdin's blocking read cannot be cancelled: do not wait for it.
    rt.shutdown_background();
    result
}

/// What the events said, for the exit code of punch-only runs.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    connected: bool,
    failed: bool,
}

impl Seen {
    fn note(&mut self, ev: &PeerEvent) {
        match ev {
            PeerEvent::Connected { .. } => self.connected = true,
            PeerEvent::Failed { .. } => self.failed = true,
            _ => {}
        }
    }
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
                // stdout is for the peer's data; the ID goes to stderr.
                eprintln!("natpunch: registered as {peer_id} (seen as {observed})");
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
        PeerEvent::SessionStarted { peer_id, remote } => {
            if json {
                j(
                    &serde_json::json!({"event": "session", "peer_id": peer_id.to_string(), "remote": remote}),
                );
            } else {
                eprintln!("natpunch: encrypted session with {peer_id} at {remote}");
            }
        }
        PeerEvent::PathChanged { peer_id, remote } => {
            if json {
                j(
                    &serde_json::json!({"event": "path-changed", "peer_id": peer_id.to_string(), "remote": remote}),
                );
            } else {
                eprintln!("natpunch: path to {peer_id} moved to {remote}");
            }
        }
        PeerEvent::Stalled { peer_id } => {
            if json {
                j(&serde_json::json!({"event": "stalled", "peer_id": peer_id.to_string()}));
            } else {
                eprintln!("natpunch: path to {peer_id} stopped answering; punching again");
            }
        }
        PeerEvent::SessionEnded { peer_id } => {
            if json {
                j(&serde_json::json!({"event": "session-ended", "peer_id": peer_id.to_string()}));
            }
        }
        PeerEvent::Refused { peer_id, reason } => {
            if json {
                j(
                    &serde_json::json!({"event": "refused", "peer_id": peer_id.to_string(), "reason": reason}),
                );
            } else {
                eprintln!("natpunch: refused a session: {reason}");
            }
        }
        other => tracing::debug!(?other, "unprinted peer event"),
    }
}
