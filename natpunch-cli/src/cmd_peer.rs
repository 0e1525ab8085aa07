//! `natpunch -s SERVER [-d PEER_ID]`, `natpunch listen` and
//! `natpunch connect PEER_ID`: register with a rendezvous server and punch
//! through to a peer.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use natpunch::keyfile;
use natpunch::net::resolve;
use natpunch::peer::{PathView, PeerEvent};
use natpunch::portmap::PortmapNews;
use natpunch::session::service::Services;
use natpunch::session::{Endpoint, EndpointConfig};
use natpunch_proto::coordinator::TcpMode;
use natpunch_proto::identity::PeerId;
use natpunch_proto::portmap::MapProtocol;
use natpunch_proto::punch::{Role, Strategy};

use crate::output::Out;

/// The STUN/rendezvous port (RFC 8489 §18.6).
const DEFAULT_PORT: u16 = 3478;

/// Options of both sides.
#[derive(Debug, Args, Clone)]
pub struct CommonArgs {
    /// Rendezvous ("punch") server, HOST[:PORT].
    #[arg(short = 's', long = "server", value_name = "SERVER[:PORT]")]
    pub server: Option<String>,
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
    /// Print nothing but errors (implied by --to, for ssh's ProxyCommand).
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Identity key file (created with mode 0600 if missing).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Punch only: report the first punched path (or failure) and exit,
    /// without a session or data.
    #[arg(long)]
    pub once: bool,
    /// End a session whose path stays silent this many seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub idle_timeout: u64,
    /// Give up punching after this many seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub timeout: u64,
    /// Measure the NAT afresh: do not start from what the last run on this
    /// network measured (kept in ~/.cache/natpunch), nor keep this run's.
    #[arg(long)]
    pub no_nat_cache: bool,
    /// Direct paths only: do not start sessions on the server's relay
    /// while punching (a pair that cannot punch then fails).
    #[arg(long)]
    pub no_relay: bool,
    /// First retransmission timeout of NAT discovery in ms (later ones
    /// follow the measured round trip).
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..=5000))]
    pub rto_ms: u64,
    /// Port mapping protocols to ask the gateway with, all at once; PCP's
    /// mapping is used if it works, else NAT-PMP's, else UPnP's
    /// (comma-separated: pcp, nat-pmp, upnp; or none).
    #[arg(long, value_name = "LIST", default_value = "pcp,nat-pmp,upnp", value_parser = parse_portmap)]
    pub portmap: Protocols,
    /// Do not ask the gateway to map our port (--portmap none).
    #[arg(long)]
    pub no_portmap: bool,
    /// Direct paths over TCP only: punch TCP (simultaneous open from one
    /// port, limited-TTL first SYNs) and carry the session on the stream.
    /// The other peer must not run --no-tcp.
    #[arg(long, conflicts_with_all = ["no_tcp", "tcp_fallback"])]
    pub tcp: bool,
    /// Punch TCP too where UDP cannot do it: at once when either side's
    /// network blocks UDP, else beside a UDP punch that has found nothing
    /// after 2 s (the default; the flag is kept for scripts).
    #[arg(long, conflicts_with = "no_tcp")]
    pub tcp_fallback: bool,
    /// Never punch TCP (no TCP port is measured or listened on).
    #[arg(long)]
    pub no_tcp: bool,
    /// Whether TCP's first SYN to each target leaves with the limited TTL
    /// that opens our NAT but dies before the peer's (on, off).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub tcp_openers: bool,
    /// Lease asked for a port mapping, in seconds (renewed at half of
    /// what the gateway grants; deleted on exit).
    #[arg(long, default_value_t = 7200, value_parser = clap::value_parser!(u64).range(2..=604800))]
    pub portmap_lease: u64,
    /// A TURN server to relay through when nothing direct works:
    /// turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT] (TLS).
    /// Repeatable; one set of credentials for all (--turn-user with
    /// --turn-pass, or --turn-secret). The allocation is released on exit.
    #[arg(long = "turn", value_name = "URI")]
    pub turn: Vec<String>,
    #[command(flatten)]
    pub turn_creds: crate::cmd_turn::TurnCredArgs,
}

/// Options of the listening side.
#[derive(Debug, Args, Clone, Default)]
pub struct ListenOpts {
    /// Keep accepting sessions after the first one ends (pipe sessions are
    /// served one after another).
    #[arg(long)]
    pub keep_open: bool,
    /// Offer the local TCP service HOST:PORT to peers under NAME
    /// (repeatable; implies --keep-open). Nothing else is reachable.
    #[arg(long, value_name = "NAME=HOST:PORT")]
    pub expose: Vec<String>,
    /// Accept sessions only from this peer (repeatable).
    #[arg(long, value_name = "PEER_ID")]
    pub allow: Vec<PeerId>,
    /// Also serve rendezvous and relay, on this UDP and TCP port (0: any),
    /// to the peers that have a session with us: for a peer others can
    /// reach directly (public address, forwarded port). They use it with
    /// `-s OUR_ADDRESS:PORT`.
    #[arg(long, value_name = "PORT")]
    pub serve_relay: Option<u16>,
}

/// Options of the connecting side.
#[derive(Debug, Args, Clone, Default)]
pub struct ConnectOpts {
    /// Listen on LOCAL_ADDR:PORT and carry each TCP connection to the
    /// peer's service NAME (repeatable).
    #[arg(long, value_name = "LOCAL_ADDR:PORT=NAME")]
    pub forward: Vec<String>,
    /// Join stdin/stdout to the peer's service NAME (ssh's ProxyCommand).
    #[arg(long, value_name = "NAME")]
    pub to: Option<String>,
    /// The peer has a public or forwarded port here; dial it directly
    /// instead of punching.
    #[arg(long, value_name = "HOST:PORT")]
    pub direct: Option<String>,
}

/// `natpunch listen`.
#[derive(Debug, Args)]
pub struct ListenArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub listen: ListenOpts,
}

/// `natpunch connect PEER_ID`.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// The peer to connect to.
    pub peer_id: PeerId,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub connect: ConnectOpts,
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
fn check_usage(
    common: &CommonArgs,
    target: Option<PeerId>,
    listen: &ListenOpts,
    connect: &ConnectOpts,
) -> Result<(), String> {
    if common.server.is_none() {
        return Err("a rendezvous server is needed: -s SERVER[:PORT] (see --help)".into());
    }
    if target.is_some() {
        for (set, flag) in [
            (!listen.expose.is_empty(), "--expose"),
            (!listen.allow.is_empty(), "--allow"),
            (listen.keep_open, "--keep-open"),
            (listen.serve_relay.is_some(), "--serve-relay"),
        ] {
            if set {
                return Err(format!("{flag} is for the listening side (without -d)"));
            }
        }
        if connect.to.is_some() && !connect.forward.is_empty() {
            return Err("--to and --forward do not go together".into());
        }
    } else {
        for (set, flag) in [
            (!connect.forward.is_empty(), "--forward"),
            (connect.to.is_some(), "--to"),
            (connect.direct.is_some(), "--direct"),
        ] {
            if set {
                return Err(format!("{flag} needs a peer to connect to (-d PEER_ID)"));
            }
        }
    }
    if common.once
        && (connect.to.is_some() || !connect.forward.is_empty() || !listen.expose.is_empty())
    {
        return Err("--once only punches; it carries no data".into());
    }
    Ok(())
}

pub fn run(
    common: CommonArgs,
    target: Option<PeerId>,
    listen: ListenOpts,
    connect: ConnectOpts,
) -> anyhow::Result<ExitCode> {
    if let Err(line) = check_usage(&common, target, &listen, &connect) {
        eprintln!("natpunch: {line}");
        return Ok(ExitCode::from(2));
    }
    let mut services = Services::default();
    for spec in &listen.expose {
        if let Err(line) = services.add(spec) {
            eprintln!("natpunch: {line}");
            return Ok(ExitCode::from(2));
        }
    }
    let mut forwards = Vec::new();
    for spec in &connect.forward {
        match crate::cmd_session::parse_forward(spec) {
            Ok(f) => forwards.push(f),
            Err(line) => {
                eprintln!("natpunch: {line}");
                return Ok(ExitCode::from(2));
            }
        }
    }
    // ssh reads a ProxyCommand's stderr onto the user's terminal: stay
    // quiet there unless asked (-v) or scripted (--json).
    let quiet = common.quiet || connect.to.is_some();
    let out = Out::new(common.json, quiet);
    let path = key_path(&common.key)?;
    let (identity, created) = keyfile::load_or_create(&path)?;
    if created {
        out.note(&format!("created a new identity key in {}", path.display()));
    }
    let rt = crate::runtime()?;
    let result = rt.block_on(async move {
        let v6 = common.source_ip.is_some_and(|i| i.is_ipv6());
        let direct = match &connect.direct {
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
        let server = resolve(
            common.server.as_deref().unwrap_or_default(),
            DEFAULT_PORT,
            v6,
        )
        .await?;
        let stun = match &common.stun {
            Some(h) => Some(resolve(h, DEFAULT_PORT, server.is_ipv6()).await?),
            None => None,
        };
        let mut turn = Vec::new();
        for uri in &common.turn {
            match common.turn_creds.server(uri) {
                Ok(t) => turn.push(t),
                Err(line) => {
                    eprintln!("natpunch: --turn {uri}: {line}");
                    return Ok(ExitCode::from(2));
                }
            }
        }
        let mut cfg = EndpointConfig::new(identity, server);
        cfg.peer.turn = turn;
        cfg.peer.stun = stun;
        cfg.peer.source_ip = common.source_ip;
        cfg.peer.source_port = common.source_port;
        cfg.peer.ttl = common.ttl;
        cfg.peer.punch.timeout = Duration::from_secs(common.timeout);
        cfg.peer.rto = Duration::from_millis(common.rto_ms);
        cfg.peer.once = common.once;
        cfg.peer.nat_cache = !common.no_nat_cache;
        cfg.peer.relay = !common.no_relay;
        cfg.peer.serve_relay = listen.serve_relay;
        cfg.peer.punch.plan.tcp_openers = common.tcp_openers;
        cfg.peer.tcp = if common.tcp {
            TcpMode::Only
        } else if common.no_tcp {
            TcpMode::Off
        } else {
            TcpMode::Fallback
        };
        cfg.peer.portmap = (!common.no_portmap && !common.portmap.0.is_empty()).then(|| {
            natpunch::portmap::PortmapConfig {
                lease: Duration::from_secs(common.portmap_lease),
                protocols: common.portmap.0.clone(),
                ..Default::default()
            }
        });
        cfg.accept = target.is_none();
        cfg.idle_timeout = Duration::from_secs(common.idle_timeout);
        if !listen.allow.is_empty() {
            cfg.allow = Some(listen.allow.iter().copied().collect::<HashSet<_>>());
        }
        let endpoint = Endpoint::bind(cfg)?;
        let status = Arc::new(Mutex::new(Seen::default()));
        let printer = {
            let status = status.clone();
            let events = endpoint.events();
            tokio::spawn(async move {
                let Some(mut rx) = events else { return };
                while let Some(ev) = rx.recv().await {
                    if let Ok(mut s) = status.lock() {
                        s.note(&ev);
                    }
                    print_event(&out, &ev);
                }
            })
        };
        let session = crate::cmd_session::Session {
            endpoint: &endpoint,
            out,
            idle_secs: common.idle_timeout,
            live: Default::default(),
        };
        let work = async {
            if common.once {
                if let Some(t) = target {
                    // The driver stops after the punch; the reply never comes.
                    let _ = tokio::join!(endpoint.connect(t), endpoint.finished());
                }
                if let Err(e) = endpoint.finished().await {
                    return Ok(session.fail_session(&e));
                }
                let s = status.lock().map(|s| *s).unwrap_or_default();
                return Ok(if s.failed && !s.connected {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                });
            }
            match target {
                Some(t) => {
                    session
                        .connect(t, direct, connect.to.clone(), forwards)
                        .await
                }
                None => session.listen(services, listen.keep_open).await,
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
        // A listener leaves cleanly: the server stops introducing others
        // to it at once.
        endpoint.close().await;
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

/// A path as JSON: `{"path": "direct"|"relay", "remote": …, "local": …}`.
/// `"tcp"` for a punched TCP stream, else `"udp"` (a relay path's
/// transport to the server is in `connected`).
fn transport(p: &PathView) -> &'static str {
    match p {
        PathView::Direct { tcp: true, .. } => "tcp",
        _ => "udp",
    }
}

fn path_json(p: &PathView) -> serde_json::Value {
    match p {
        PathView::Direct { remote, local, tcp } => {
            serde_json::json!({"path": "direct", "remote": remote, "local": local,
                "transport": if *tcp { "tcp" } else { "udp" }})
        }
        PathView::Relay { server } => serde_json::json!({"path": "relay", "remote": server}),
        PathView::Turn { remote, relayed } => {
            serde_json::json!({"path": "relay", "via": "turn", "remote": remote, "relayed": relayed})
        }
    }
}

fn print_event(out: &Out, ev: &PeerEvent) {
    use serde_json::json;
    match ev {
        PeerEvent::NatMeasured { report, opener_ttl } => out.event(
            json!({"event": "nat", "classic": report.classic, "mapped": report.mapped,
                "mapping": report.mapping, "filtering": report.filtering,
                "allocation": {"kind": report.allocation.kind, "delta": report.allocation.delta},
                "opener_ttl": opener_ttl}),
            || {
                format!(
                    "NAT {} (mapped {}, allocation {}{})",
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
                )
            },
        ),
        PeerEvent::Registered { peer_id, observed } => out.event(
            json!({"event": "registered", "peer_id": peer_id.to_string(), "observed": observed}),
            // stdout is for the peer's data; the ID goes to stderr.
            || format!("registered as {peer_id} (seen as {observed})"),
        ),
        PeerEvent::ServerLost { server } => out.event(
            json!({"event": "server-lost", "server": server}),
            || format!("the rendezvous server {server} stopped answering; peers cannot reach us until it is back (retrying every second)"),
        ),
        PeerEvent::ServerBack { server } => out.event(
            json!({"event": "server-back", "server": server}),
            || format!("the rendezvous server {server} answers again"),
        ),
        PeerEvent::Displaced { peer_id } => out.warn(
            json!({"event": "displaced", "peer_id": peer_id.to_string()}),
            &format!("another process registered with this key ({peer_id}); this one gets no new sessions until that one leaves"),
        ),
        PeerEvent::Incoming { from } => out.event(
            json!({"event": "incoming", "peer_id": from.to_string()}),
            || format!("{from} wants to connect"),
        ),
        PeerEvent::Attempt { peer_id, strategy } => out.event(
            json!({"event": "attempt", "peer_id": peer_id.to_string(), "strategy": strategy.as_str()}),
            || format!("punching to {peer_id}: trying {}…", strategy.as_str()),
        ),
        PeerEvent::Connected {
            peer_id,
            strategy,
            remote,
            role,
            elapsed,
            probes_sent,
            bytes_sent,
            reused,
            over_tcp,
        } => out.event(
            json!({"event": "connected", "peer_id": peer_id.to_string(),
                "path": if matches!(strategy, Strategy::Relay | Strategy::Turn) { "relay" } else { "direct" },
                "via": (*strategy == Strategy::Turn).then_some("turn"),
                "transport": if *over_tcp { "tcp" } else { "udp" },
                "strategy": strategy.as_str(), "protocol": strategy.protocol().map(|p| p.as_str()),
                "remote": remote,
                "role": match role { Role::Initiator => "initiator", Role::Responder => "responder" },
                "reused": reused,
                "elapsed_ms": elapsed.as_millis() as u64, "probes_sent": probes_sent, "bytes_sent": bytes_sent}),
            || {
                if *reused {
                    format!("connected to {peer_id} at {remote} over the live path")
                } else if *strategy == Strategy::Relay {
                    format!(
                        "connected to {peer_id} through the relay at {remote} in {} ms; punching for a direct path",
                        elapsed.as_millis()
                    )
                } else if *strategy == Strategy::Turn {
                    format!(
                        "connected to {peer_id} through TURN at {remote} in {} ms; punching for a direct path",
                        elapsed.as_millis()
                    )
                } else {
                    format!(
                        "connected to {peer_id} directly at {remote} by {} in {} ms ({})",
                        technique(strategy),
                        elapsed.as_millis(),
                        probes_and_bytes(*probes_sent, *bytes_sent)
                    )
                }
            },
        ),
        PeerEvent::Failed { peer_id, error } => {
            // Our own connect's failure is said once, by the session, as
            // the final line; the JSON event is the script's record.
            out.json_only(json!({"event": "failed", "peer_id": peer_id.to_string(),
                "code": error.code(), "reason": error.to_string()}));
        }
        PeerEvent::Refused { peer_id, reason } => out.event(
            json!({"event": "refused", "peer_id": peer_id.to_string(), "code": reason.code(),
                "reason": refusal(peer_id, *reason)}),
            || format!("refused a session: {}", refusal(peer_id, *reason)),
        ),
        PeerEvent::SessionStarted { peer_id, path } => {
            let local = match path {
                PathView::Direct { local, .. } => *local,
                PathView::Turn { relayed, .. } => *relayed,
                PathView::Relay { .. } => None,
            };
            out.event(
                json!({"event": "session", "peer_id": peer_id.to_string(), "path": path.kind(),
                    "via": path.via(),
                    "transport": transport(path), "remote": path.remote(), "local": local}),
                || match path {
                    PathView::Relay { server } => {
                        format!("encrypted session with {peer_id} through the relay at {server}")
                    }
                    PathView::Turn { remote, .. } => {
                        format!("encrypted session with {peer_id} through TURN ({remote})")
                    }
                    PathView::Direct { remote, .. } => {
                        format!("encrypted session with {peer_id} at {remote}")
                    }
                },
            )
        }
        PeerEvent::PathChanged {
            peer_id,
            from,
            to,
            strategy,
            elapsed,
        } => {
            let (remote, local) = match to {
                PathView::Direct { remote, local, .. } => (*remote, *local),
                PathView::Relay { server } => (*server, None),
                PathView::Turn { remote, relayed } => (*remote, *relayed),
            };
            out.event(
                json!({"event": "path-changed", "peer_id": peer_id.to_string(),
                    "from": from.as_ref().map(path_json), "to": path_json(to),
                    "strategy": strategy.map(|s| s.as_str()),
                    "protocol": strategy.and_then(|s| s.protocol()).map(|p| p.as_str()),
                    "elapsed_ms": elapsed.map(|e| e.as_millis() as u64),
                    "path": to.kind(), "via": to.via(), "transport": transport(to), "remote": remote, "local": local}),
                || match (from, to) {
                    (_, PathView::Turn { .. }) => {
                        format!("path to {peer_id} moved to TURN ({remote}); punching for a direct path")
                    }
                    (Some(PathView::Relay { .. } | PathView::Turn { .. }), PathView::Direct { .. }) => {
                        format!(
                            "path to {peer_id} moved from the relay to a direct path at {remote}{}{}",
                            strategy.map(|s| format!(" (by {})", technique(&s))).unwrap_or_default(),
                            elapsed.map(|e| format!(" after {} ms", e.as_millis())).unwrap_or_default()
                        )
                    }
                    (_, PathView::Relay { server }) => {
                        format!("path to {peer_id} moved to the relay at {server}; punching again")
                    }
                    _ => format!("path to {peer_id} moved to {remote}"),
                },
            )
        }
        PeerEvent::Portmap { news } => print_portmap(out, news),
        PeerEvent::ServingRelay { addr } => out.event(
            json!({"event": "serving-relay", "addr": addr}),
            || format!("serving rendezvous and relay at {addr} (udp and tcp) to the peers with a session to us"),
        ),
        PeerEvent::ServerRefused { server, code } => out.event(
            json!({"event": "server-refused", "server": server, "code": code}),
            || format!("{server} refused our registration ({code}): it serves only peers with a session to its owner"),
        ),
        PeerEvent::ServerOverTcp { server } => out.event(
            json!({"event": "server-tcp", "server": server}),
            || format!("no answer from {server} on UDP: reaching it (and the relay) over TCP"),
        ),
        PeerEvent::Relayed { peer_id, error } => out.event(
            json!({"event": "relayed", "peer_id": peer_id.to_string(), "code": error.code(),
                "reason": error.to_string()}),
            || format!("staying on the relay with {peer_id}: {error}"),
        ),
        PeerEvent::PathRepaired {
            peer_id,
            remote,
            local,
            strategy,
        } => out.event(
            json!({"event": "path-repaired", "peer_id": peer_id.to_string(), "remote": remote,
                "local": local, "strategy": strategy.as_str()}),
            || format!("path to {peer_id} works again at {remote} (punched by {})", strategy.as_str()),
        ),
        PeerEvent::Stalled { peer_id } => out.event(
            json!({"event": "stalled", "peer_id": peer_id.to_string()}),
            || format!("path to {peer_id} stopped answering; punching again"),
        ),
        PeerEvent::TurnAllocated {
            server,
            transport,
            relayed,
            elapsed,
        } => out.event(
            json!({"event": "turn-allocated", "server": server, "transport": transport,
                "relayed": relayed, "elapsed_ms": elapsed.as_millis() as u64}),
            || format!("TURN server {server} ({transport}) relays {relayed} to us"),
        ),
        PeerEvent::TurnLost { error } => out.warn(
            json!({"event": "turn-lost", "reason": error}),
            &format!("TURN allocation lost ({error}); making another"),
        ),
        PeerEvent::TurnReleased { confirmed } => out.json_only(
            json!({"event": "turn-released", "confirmed": confirmed}),
        ),
        PeerEvent::SessionEnded { peer_id, end } => out.json_only(
            json!({"event": "session-ended", "peer_id": peer_id.to_string(), "code": end.code()}),
        ),
        other => tracing::debug!(?other, "unprinted peer event"),
    }
}

/// `on` or `off`.
fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("expected on or off, not {s:?}")),
    }
}

/// `--portmap`'s list.
#[derive(Debug, Clone, Default)]
pub struct Protocols(pub Vec<MapProtocol>);

fn parse_portmap(s: &str) -> Result<Protocols, String> {
    if s == "none" || s == "off" {
        return Ok(Protocols(Vec::new()));
    }
    let mut v = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p: MapProtocol = p.parse()?;
        if !v.contains(&p) {
            v.push(p);
        }
    }
    if v.is_empty() {
        return Err("an empty list: name pcp, nat-pmp, upnp, or none".into());
    }
    Ok(Protocols(v))
}

/// A technique for people: `portmap (upnp)`, `birthday`.
fn technique(s: &Strategy) -> String {
    match s.protocol() {
        Some(p) => format!("{} ({p})", s.as_str()),
        None => s.as_str().to_string(),
    }
}

fn print_portmap(out: &Out, news: &PortmapNews) {
    use serde_json::json;
    match news {
        PortmapNews::Mapped(m) => out.event(
            json!({"event": "portmap", "mapped": m.addr, "protocol": m.protocol.as_str()}),
            || {
                format!(
                    "the gateway maps {} to us ({}): peers can reach us there",
                    m.addr, m.protocol
                )
            },
        ),
        PortmapNews::Unusable { protocol, why } => out.event(
            json!({"event": "portmap", "mapped": null, "protocol": protocol.as_str(),
                "code": why.code(), "reason": why.to_string()}),
            || format!("port mapping by {protocol} is of no use here: {why}"),
        ),
        PortmapNews::Unavailable { reasons } => {
            // No gateway protocol is the common case: said in JSON and at -v.
            let r: serde_json::Map<String, serde_json::Value> = reasons
                .iter()
                .map(|(p, why)| (p.as_str().to_string(), json!(why)))
                .collect();
            tracing::info!(?reasons, "no port mapping");
            out.json_only(
                json!({"event": "portmap", "mapped": null, "code": "unavailable", "reasons": r}),
            );
        }
        PortmapNews::Lost { protocol, reason } => out.event(
            json!({"event": "portmap", "mapped": null, "protocol": protocol.as_str(),
                "code": "lost", "reason": reason}),
            || format!("the port mapping by {protocol} could not be renewed: {reason}"),
        ),
    }
}

fn probes_and_bytes(probes: u64, bytes: u64) -> String {
    let p = if probes == 1 { "probe" } else { "probes" };
    format!("{probes} {p}, {bytes} bytes")
}

fn refusal(peer: &PeerId, reason: natpunch_proto::rendezvous::wire::DeclineReason) -> String {
    use natpunch_proto::rendezvous::wire::DeclineReason as D;
    match reason {
        D::NotAllowed => format!("{peer} is not on the allow list (--allow)"),
        D::NotAccepting => {
            format!("{peer} asked to connect, but this peer does not accept sessions")
        }
        D::Busy => format!("{peer} asked to connect while too many connections were being set up"),
        _ => format!("{peer} was turned away"),
    }
}
