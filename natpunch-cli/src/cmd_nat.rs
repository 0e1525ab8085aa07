//! `natpunch nat` (behaviour report) and `natpunch stun` (one Binding).

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use natpunch::nat::{discover, tcp_binding, udp_binding, NatOptions};
use natpunch::net::{bind_udp, resolve, route_source};
use natpunch::portmap::{self, PortmapConfig, ProtocolReport};
use natpunch_proto::nat::discovery::LIFETIME_STEPS;
use natpunch_proto::nat::{Classic, NatReport};
use natpunch_proto::portmap::{check_external, MapProtocol};
use natpunch_proto::stun::transaction::Timing;

use crate::output::{human_report, json_line, json_report};

/// The STUN port (RFC 8489 §18.6).
const STUN_PORT: u16 = 3478;

#[derive(Debug, Args)]
pub struct NatArgs {
    /// STUN server, HOST[:PORT] (an RFC 5780 server for the full report).
    #[arg(
        short = 'H',
        long = "stun",
        visible_alias = "host",
        value_name = "HOST[:PORT]"
    )]
    pub host: String,
    /// Local IP to send from (default: the one routing picks).
    #[arg(short = 'i', long = "source-ip")]
    pub source_ip: Option<IpAddr>,
    /// Local port of the primary socket (default: any).
    #[arg(short = 'p', long = "source-port")]
    pub source_port: Option<u16>,
    /// Print one JSON object instead of the human report.
    #[arg(long)]
    pub json: bool,
    /// Also measure the binding lifetime (slow: up to 5 minutes).
    #[arg(long)]
    pub lifetime: bool,
    /// With --lifetime: probe intervals up to this many seconds only.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..=300))]
    pub lifetime_max: u64,
    /// Extra sockets used to learn the port allocation pattern.
    #[arg(long, default_value_t = natpunch_proto::nat::discovery::DEFAULT_ALLOCATION_SOCKETS as u16, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub samples: u16,
    /// Initial retransmission timeout in ms (4 sends, then 8 x RTO wait).
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..=5000))]
    pub rto_ms: u64,
    /// Do not ask the gateway which port mapping protocols it speaks
    /// (PCP, NAT-PMP, UPnP IGD).
    #[arg(long)]
    pub no_portmap: bool,
}

pub async fn nat_report(args: &NatArgs) -> anyhow::Result<NatReport> {
    let server = resolve(
        &args.host,
        STUN_PORT,
        args.source_ip.is_some_and(|i| i.is_ipv6()),
    )
    .await?;
    let mut opts = NatOptions::new(server);
    opts.source_ip = args.source_ip;
    opts.source_port = args.source_port;
    opts.discovery.allocation_sockets = args.samples as usize;
    opts.discovery.timing = Timing {
        rto: Duration::from_millis(args.rto_ms),
        ..Timing::probe()
    };
    if args.lifetime {
        opts.discovery.lifetime_steps = LIFETIME_STEPS
            .iter()
            .copied()
            .filter(|d| d.as_secs() <= args.lifetime_max)
            .collect();
    }
    Ok(discover(opts).await?)
}

/// Which port mapping protocols the gateway answers, from a socket of
/// our own (PCP's answer costs a short mapping of its port, deleted at
/// once).
async fn portmap_report(args: &NatArgs) -> anyhow::Result<Vec<ProtocolReport>> {
    let server = resolve(&args.host, STUN_PORT, false).await?;
    let ip = match args.source_ip {
        Some(ip) => ip,
        None => route_source(server)?,
    };
    let sock = bind_udp(SocketAddr::new(ip, 0), false)?;
    let local = sock.local_addr()?;
    Ok(portmap::probe(local, &PortmapConfig::default()).await)
}

/// How the NAT maps one TCP port (STUN over TCP from it to two of the
/// server's ports): what TCP hole punching works from.
async fn tcp_report(args: &NatArgs) -> anyhow::Result<natpunch_proto::rendezvous::wire::TcpInfo> {
    let server = resolve(&args.host, STUN_PORT, false).await?;
    let ip = match args.source_ip {
        Some(ip) => ip,
        None => route_source(server)?,
    };
    // Held while measuring, so that every binding leaves from this port.
    let port = natpunch::tcp::reuse_socket(SocketAddr::new(ip, 0))?;
    let local = port
        .local_addr()?
        .as_socket()
        .ok_or_else(|| anyhow::anyhow!("no local TCP address"))?;
    Ok(natpunch::tcp::discover::discover(local, server).await?)
}

fn tcp_json(t: &anyhow::Result<natpunch_proto::rendezvous::wire::TcpInfo>) -> serde_json::Value {
    match t {
        Ok(t) => serde_json::json!({"mapped": t.mapped, "mapping": t.mapping,
            "allocation": {"kind": t.allocation, "delta": t.delta}}),
        Err(e) => serde_json::json!({"error": e.to_string()}),
    }
}

fn tcp_human(t: &anyhow::Result<natpunch_proto::rendezvous::wire::TcpInfo>) -> String {
    match t {
        Ok(t) => format!(
            "  tcp mapping       {}, {} mapping, {} ports{}",
            t.mapped,
            t.mapping.map(|m| m.as_str()).unwrap_or("unknown"),
            t.allocation
                .map(|k| format!("{k:?}").to_lowercase())
                .unwrap_or_else(|| "unknown".into()),
            t.delta
                .filter(|d| *d != 0)
                .map(|d| format!(" (step {d:+})"))
                .unwrap_or_default()
        ),
        Err(e) => format!("  tcp mapping       not measured ({e})"),
    }
}

pub fn run_nat(args: NatArgs) -> anyhow::Result<ExitCode> {
    let (report, portmap, tcp) = crate::runtime()?.block_on(async {
        if args.no_portmap {
            let (r, t) = tokio::join!(nat_report(&args), tcp_report(&args));
            return (r, None, t);
        }
        let (r, p, t) = tokio::join!(nat_report(&args), portmap_report(&args), tcp_report(&args));
        (r, p.ok(), t)
    });
    let report = report?;
    if args.json {
        let mut v = json_report(&report);
        if let Some(p) = &portmap {
            v["portmap"] = portmap_json(p);
        }
        v["tcp"] = tcp_json(&tcp);
        json_line(&v);
    } else {
        print!("{}", human_report(&report));
        println!("{}", tcp_human(&tcp));
        if let Some(p) = &portmap {
            println!("{}", portmap_human(p));
        }
    }
    if report.classic == Classic::UdpBlocked {
        eprintln!(
            "natpunch: no answer from {}: the server is down or UDP is blocked",
            report.server
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `{"pcp": {"external": IP} | {"error": WHY}, "nat-pmp": …, "upnp": …}`.
fn portmap_json(p: &[ProtocolReport]) -> serde_json::Value {
    let m: serde_json::Map<String, serde_json::Value> = p
        .iter()
        .map(|r| {
            let v = match &r.external {
                Ok(ip) => serde_json::json!({"external": ip}),
                Err(e) => serde_json::json!({"error": e}),
            };
            (r.protocol.as_str().to_string(), v)
        })
        .collect();
    serde_json::Value::Object(m)
}

fn portmap_human(p: &[ProtocolReport]) -> String {
    let name = |p: MapProtocol| match p {
        MapProtocol::Pcp => "PCP",
        MapProtocol::NatPmp => "NAT-PMP",
        MapProtocol::Upnp => "UPnP IGD",
    };
    let answered: Vec<String> = p
        .iter()
        .filter_map(|r| {
            let ip = r.external.as_ref().ok()?;
            let note = match check_external(*ip, None) {
                Ok(()) => String::new(),
                Err(_) => " (not public: another NAT beyond the gateway)".into(),
            };
            Some(format!("{} external {ip}{note}", name(r.protocol)))
        })
        .collect();
    let v = if answered.is_empty() {
        "none (the gateway answers neither PCP, NAT-PMP nor UPnP IGD)".to_string()
    } else {
        answered.join("; ")
    };
    // Aligned with the report's rows (its widest key is 16 wide).
    format!("  {:<16}  {v}", "port mapping")
}

pub fn print_report(report: &NatReport, json: bool) {
    if json {
        json_line(&json_report(report));
    } else {
        print!("{}", human_report(report));
    }
}

#[derive(Debug, Args)]
pub struct StunArgs {
    /// STUN server, HOST[:PORT].
    #[arg(
        short = 'H',
        long = "stun",
        visible_alias = "host",
        value_name = "HOST[:PORT]"
    )]
    pub host: String,
    /// Use TCP (RFC 8489 §6.2.2) instead of UDP.
    #[arg(long)]
    pub tcp: bool,
    /// Local IP to send from (UDP).
    #[arg(short = 'i', long = "source-ip")]
    pub source_ip: Option<IpAddr>,
    /// Local port to send from (UDP).
    #[arg(short = 'p', long = "source-port")]
    pub source_port: Option<u16>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run_stun(args: StunArgs) -> anyhow::Result<ExitCode> {
    crate::runtime()?.block_on(async {
        let server = resolve(
            &args.host,
            STUN_PORT,
            args.source_ip.is_some_and(|i| i.is_ipv6()),
        )
        .await?;
        let (local, mapped) = if args.tcp {
            (None, tcp_binding(server, Timing::default().ti).await?)
        } else {
            let ip = match args.source_ip {
                Some(ip) => ip,
                None => route_source(server)?,
            };
            let sock = bind_udp(SocketAddr::new(ip, args.source_port.unwrap_or(0)), false)?;
            let local = sock.local_addr().ok();
            (local, udp_binding(&sock, server, Timing::probe()).await?)
        };
        if args.json {
            json_line(&serde_json::json!({
                "mapped": mapped, "local": local, "server": server,
                "transport": if args.tcp { "tcp" } else { "udp" },
            }));
        } else {
            println!("{mapped}");
        }
        Ok(ExitCode::SUCCESS)
    })
}
