//! `natpunch turn`: allocates a relayed address on a TURN server (RFC
//! 8656) and reports it: whether the server and the credentials work
//! (over UDP, TCP or TLS), and with `--peer` whether a peer's datagrams
//! come back through the relay. The allocation is refreshed while held
//! (`--hold`) and released on exit, Ctrl-C included.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use natpunch::turn::{Allocation, Report, TurnServer};
use natpunch_proto::turn::client::Event;
use natpunch_proto::turn::{Credentials, TurnUri};

use crate::output::Out;

/// Time-limited credentials made from `--turn-secret` are valid this long
/// (the TURN REST API draft's suggested day).
const SECRET_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Datagrams `--peer` sends, and how long it waits for the last answer.
const PEER_PINGS: u32 = 3;
const PEER_WAIT: Duration = Duration::from_secs(3);

/// How to log in to a TURN server. `Debug` hides the password and the
/// secret.
#[derive(Clone, Default, Args)]
pub struct TurnCredArgs {
    /// Username for the TURN server's long-term credentials (with
    /// --turn-pass), or the user part of time-limited ones (with
    /// --turn-secret)
    #[arg(long = "turn-user", value_name = "NAME")]
    pub user: Option<String>,
    /// Password for --turn-user (never logged or printed). Other users
    /// can read a command line: the environment variable keeps it out
    #[arg(
        long = "turn-pass",
        value_name = "PASSWORD",
        env = "NATPUNCH_TURN_PASS",
        hide_env_values = true
    )]
    pub pass: Option<String>,
    /// Shared secret for time-limited credentials (coturn's
    /// use-auth-secret / static-auth-secret), instead of --turn-pass
    #[arg(
        long = "turn-secret",
        value_name = "SECRET",
        conflicts_with = "pass",
        env = "NATPUNCH_TURN_SECRET",
        hide_env_values = true
    )]
    pub secret: Option<String>,
    /// CA certificate file (PEM) to trust for turns: servers (default:
    /// the web's usual roots)
    #[arg(long = "turn-ca", value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

impl std::fmt::Debug for TurnCredArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| "<hidden>");
        f.debug_struct("TurnCredArgs")
            .field("user", &self.user)
            .field("pass", &hidden(&self.pass))
            .field("secret", &hidden(&self.secret))
            .field("ca", &self.ca)
            .finish()
    }
}

impl TurnCredArgs {
    /// The credentials, or the line that says what is missing.
    pub fn credentials(&self) -> Result<Credentials, String> {
        match (&self.user, &self.pass, &self.secret) {
            (Some(u), Some(p), None) => Ok(Credentials::new(u.clone(), p.clone())),
            (u, None, Some(s)) => {
                let expires = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    + SECRET_VALIDITY;
                Ok(Credentials::time_limited(
                    s.as_bytes(),
                    u.as_deref().unwrap_or_default(),
                    expires.as_secs(),
                ))
            }
            (None, Some(_), None) => Err("--turn-pass needs --turn-user".into()),
            _ => Err("a TURN server needs --turn-user NAME --turn-pass PASSWORD, or --turn-secret SECRET".into()),
        }
    }

    /// The server of `uri` with these credentials, or the usage line.
    pub fn server(&self, uri: &str) -> Result<TurnServer, String> {
        let uri: TurnUri = uri
            .parse()
            .map_err(|e: natpunch_proto::turn::UriError| e.to_string())?;
        Ok(TurnServer {
            uri,
            credentials: self.credentials()?,
            ca: self.ca.clone(),
        })
    }
}

#[derive(Debug, Args)]
pub struct TurnArgs {
    /// The TURN server: turn:HOST[:PORT][?transport=udp|tcp] or
    /// turns:HOST[:PORT] (TLS)
    #[arg(value_name = "URI")]
    pub uri: String,
    #[command(flatten)]
    pub creds: TurnCredArgs,
    /// Keep the allocation this many seconds (refreshed as the server
    /// asks) before releasing it
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub hold: u64,
    /// Also send a few datagrams through the relay to this peer (an echo
    /// service) and report its answers (after --hold)
    #[arg(long, value_name = "IP:PORT")]
    pub peer: Option<SocketAddr>,
    /// JSON events, one object a line, on stderr
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: TurnArgs) -> anyhow::Result<ExitCode> {
    let server = match args.creds.server(&args.uri) {
        Ok(s) => s,
        Err(line) => {
            eprintln!("natpunch: {line}");
            return Ok(ExitCode::from(2));
        }
    };
    let out = Out::new(args.json, false);
    crate::runtime()?.block_on(async move {
        // Ctrl-C at any point ends with the allocation released.
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let started = Instant::now();
        let mut alloc = tokio::select! {
            a = Allocation::start(&server) => a?,
            _ = &mut ctrl_c => return Ok(ExitCode::SUCCESS),
        };
        let relayed = tokio::select! {
            r = allocated(&mut alloc, &out, started) => Some(r?),
            _ = &mut ctrl_c => None,
        };
        let mut result = Ok(());
        if let Some(relayed) = relayed {
            let hold = tokio::time::sleep(Duration::from_secs(args.hold));
            tokio::pin!(hold);
            let interrupted = tokio::select! {
                _ = &mut hold => false,
                _ = &mut ctrl_c => true,
                r = held(&mut alloc, &out) => {
                    result = r;
                    true
                }
            };
            // After the hold: the allocation still relays.
            if let (Some(peer), false) = (args.peer, interrupted) {
                result = tokio::select! {
                    r = ping_peer(&mut alloc, &out, relayed, peer) => r,
                    _ = &mut ctrl_c => Ok(()),
                };
            }
        }
        // Released whatever happened (a failed --peer too).
        let released = alloc.release().await;
        out.event(
            serde_json::json!({"event": "turn-released", "confirmed": released}),
            || {
                if released {
                    "allocation released".to_string()
                } else {
                    "allocation release sent (not confirmed)".to_string()
                }
            },
        );
        result.map(|()| ExitCode::SUCCESS)
    })
}

/// Waits for the allocation; reports it.
async fn allocated(
    alloc: &mut Allocation,
    out: &Out,
    started: Instant,
) -> anyhow::Result<SocketAddr> {
    let transport = alloc.transport().as_str();
    loop {
        match alloc.next().await {
            Some(Report::Event(Event::Allocated {
                relayed,
                mapped,
                lifetime,
            })) => {
                let ms = started.elapsed().as_millis() as u64;
                out.event(
                    serde_json::json!({
                        "event": "turn-allocated", "server": alloc.server(), "transport": transport,
                        "relayed": relayed, "mapped": mapped, "lifetime_s": lifetime.as_secs(),
                        "elapsed_ms": ms,
                    }),
                    || {
                        format!(
                            "{} ({transport}): relayed address {relayed} for {} s, in {ms} ms{}",
                            alloc.server(),
                            lifetime.as_secs(),
                            mapped
                                .map(|m| format!("; it sees us at {m}"))
                                .unwrap_or_default()
                        )
                    },
                );
                return Ok(relayed);
            }
            Some(Report::Event(Event::Failed(e))) => anyhow::bail!(e),
            Some(_) => {}
            None => anyhow::bail!("the TURN client stopped"),
        }
    }
}

/// Reports refreshes while the allocation is held; returns only when it
/// failed.
async fn held(alloc: &mut Allocation, out: &Out) -> anyhow::Result<()> {
    loop {
        match alloc.next().await {
            Some(Report::Event(Event::Refreshed { lifetime })) => out.event(
                serde_json::json!({"event": "turn-refreshed", "lifetime_s": lifetime.as_secs()}),
                || format!("allocation refreshed for {} s", lifetime.as_secs()),
            ),
            Some(Report::Event(Event::Failed(e))) => anyhow::bail!(e),
            Some(_) => {}
            None => anyhow::bail!("the TURN client stopped"),
        }
    }
}

/// Binds `peer` to a channel and sends it [`PEER_PINGS`] datagrams: each
/// answer that comes back through the relay is counted.
async fn ping_peer(
    alloc: &mut Allocation,
    out: &Out,
    relayed: SocketAddr,
    peer: SocketAddr,
) -> anyhow::Result<()> {
    alloc.bind(peer);
    tokio::time::timeout(PEER_WAIT, async {
        while let Some(r) = alloc.next().await {
            match r {
                Report::Event(Event::ChannelBound { .. }) => return Ok(()),
                Report::Event(Event::ChannelFailed { error, .. } | Event::Failed(error)) => {
                    return Err(anyhow::anyhow!(error))
                }
                _ => {}
            }
        }
        Err(anyhow::anyhow!("the TURN client stopped"))
    })
    .await
    .map_err(|_| anyhow::anyhow!("no channel to {peer} within {} s", PEER_WAIT.as_secs()))??;
    let started = Instant::now();
    for k in 0..PEER_PINGS {
        alloc.send(
            peer,
            format!("natpunch turn check {k} via {relayed}").into_bytes(),
        );
    }
    let mut answers = 0;
    let mut rtt = None;
    let _ = tokio::time::timeout(PEER_WAIT, async {
        while let Some(r) = alloc.next().await {
            if let Report::Data(d) = r {
                if d.peer == peer && d.data.starts_with(b"natpunch turn check ") {
                    answers += 1;
                    rtt.get_or_insert(started.elapsed());
                    if answers == PEER_PINGS {
                        return;
                    }
                }
            }
        }
    })
    .await;
    let ms = rtt.map(|r| r.as_secs_f64() * 1000.0);
    out.event(
        serde_json::json!({"event": "turn-peer", "peer": peer, "sent": PEER_PINGS, "answered": answers, "rtt_ms": ms}),
        || match ms {
            Some(ms) => format!("{peer} answered {answers} of {PEER_PINGS} through the relay (first in {ms:.1} ms)"),
            None => format!("{peer} answered none of {PEER_PINGS} through the relay"),
        },
    );
    if answers == 0 {
        anyhow::bail!("{peer} did not answer through the TURN relay");
    }
    Ok(())
}
