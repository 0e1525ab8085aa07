//! What the peer command does with a session: the netcat-style pipe,
//! `--forward`, `--to` and, on the listener, `--expose`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use natpunch::session::service::{self, Request, Services, Status};
use natpunch::session::{chain, close, Connection, Endpoint, SessionEnd, SessionError};
use natpunch_proto::identity::PeerId;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::output::Out;

/// `LOCAL_ADDR:PORT=NAME`.
pub fn parse_forward(spec: &str) -> Result<(SocketAddr, String), String> {
    let (local, name) = spec
        .rsplit_once('=')
        .ok_or_else(|| format!("--forward wants LOCAL_ADDR:PORT=NAME, got {spec:?}"))?;
    let local: SocketAddr = local.parse().map_err(|_| {
        format!("--forward: {local:?} is not LOCAL_ADDR:PORT (like 127.0.0.1:8022)")
    })?;
    if !service::valid_name(name) {
        return Err(format!(
            "--forward: bad service name {name:?} (A-Z a-z 0-9 . _ -)"
        ));
    }
    Ok((local, name.to_string()))
}

/// How long a stream error waits for the session's close to arrive: the
/// peer sends STOP_SENDING and CONNECTION_CLOSE back to back, so one RTT
/// (300 ms covers most Internet paths) tells the two apart.
const STREAM_TO_CLOSE: std::time::Duration = std::time::Duration::from_millis(300);

/// A person at the keyboard, not a file or pipe: netcat's rule then ends
/// our side of the pipe when the peer's side ends.
fn stdin_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal()
}

/// Pause after a failed TCP accept (EMFILE clears as connections close).
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

pub struct Session<'a> {
    pub endpoint: &'a Endpoint,
    pub out: Out,
    pub idle_secs: u64,
    /// Sessions to close when interrupted.
    pub live: std::sync::Mutex<Vec<Connection>>,
}

/// Why a stream failed, in terms of the session if it ended too.
async fn explain(conn: &Connection, e: &service::ServiceError, idle_secs: u64) -> (String, String) {
    use service::ServiceError as E;
    if let E::Stopped(_) | E::Reset = e {
        // A peer that goes away drops its streams (STOP_SENDING) just
        // before it closes the session: its reason says more.
        let _ = tokio::time::timeout(STREAM_TO_CLOSE, conn.closed()).await;
    }
    match (conn.end(), e) {
        (end, E::Connection(_) | E::Io(_) | E::Stopped(_) | E::Reset)
            if end != SessionEnd::Open =>
        {
            (
                end.code().to_string(),
                end.describe(conn.peer_id(), idle_secs),
            )
        }
        _ => ("stream".to_string(), e.to_string()),
    }
}

impl Session<'_> {
    /// The connect or the endpoint failed: one line (or one JSON event).
    pub fn fail_session(&self, e: &SessionError) -> ExitCode {
        // With --json the driver already reported a failed connect as its
        // `failed` event; everything else is said here, once.
        if !(self.out.json() && matches!(e, SessionError::Connect(_))) {
            self.out.failed(None, e.code(), &chain(e));
        }
        ExitCode::FAILURE
    }

    fn fail(&self, peer: PeerId, (code, reason): (String, String)) -> ExitCode {
        self.out.failed(Some(peer.to_string()), &code, &reason);
        ExitCode::FAILURE
    }

    fn done(&self, peer: PeerId, moved: service::Moved) -> ExitCode {
        self.out.json_only(serde_json::json!({"event": "done",
            "peer_id": peer.to_string(), "sent": moved.sent, "received": moved.received}));
        ExitCode::SUCCESS
    }

    fn track(&self, conn: &Connection) {
        if let Ok(mut live) = self.live.lock() {
            live.retain(|c| c.quic().close_reason().is_none());
            live.push(conn.clone());
        }
    }

    /// Ctrl-C: tell every peer why we go, so it fails at once and clearly
    /// rather than after the idle timeout.
    pub async fn interrupt(&self) {
        let live = self.live.lock().map(|l| l.clone()).unwrap_or_default();
        tracing::debug!(sessions = live.len(), "interrupted: closing sessions");
        for c in &live {
            c.close(close::INTERRUPTED, "interrupted (Ctrl-C)");
        }
        if !live.is_empty() {
            // One pass of the connection drivers sends the CONNECTION_CLOSE.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub async fn connect(
        &self,
        peer: PeerId,
        direct: Option<SocketAddr>,
        to: Option<String>,
        forwards: Vec<(SocketAddr, String)>,
    ) -> anyhow::Result<ExitCode> {
        let conn = match direct {
            Some(addr) => self.endpoint.connect_addr(peer, addr).await,
            None => self.endpoint.connect(peer).await,
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => return Ok(self.fail_session(&e)),
        };
        self.track(&conn);
        if !forwards.is_empty() {
            return self.forward(conn, forwards).await;
        }
        let req = match to {
            Some(name) => Request::Service(name),
            None => Request::Pipe,
        };
        let out = self.out;
        let waiting = move || {
            out.event(
                serde_json::json!({"event": "queued", "peer_id": peer.to_string()}),
                || format!("{peer} is serving another pipe session; waiting for our turn"),
            )
        };
        let code = match service::open_waiting(&conn, &req, waiting).await {
            Ok((send, recv)) => {
                match service::splice_until(
                    tokio::io::stdin(),
                    tokio::io::stdout(),
                    send,
                    recv,
                    stdin_is_terminal(),
                )
                .await
                {
                    Ok(moved) => {
                        conn.close_and_wait(close::DONE, "done").await;
                        return Ok(self.done(peer, moved));
                    }
                    Err(e) => self.fail(peer, explain(&conn, &e, self.idle_secs).await),
                }
            }
            Err(e) => self.fail(peer, explain(&conn, &e, self.idle_secs).await),
        };
        conn.close_and_wait(close::ERROR, "error").await;
        Ok(code)
    }

    async fn forward(
        &self,
        conn: Connection,
        forwards: Vec<(SocketAddr, String)>,
    ) -> anyhow::Result<ExitCode> {
        let mut tasks = tokio::task::JoinSet::new();
        for (local, name) in forwards {
            let listener = match TcpListener::bind(local).await {
                Ok(l) => l,
                Err(e) => {
                    conn.close_and_wait(close::ERROR, "local error").await;
                    return Ok(self.fail(
                        conn.peer_id(),
                        (
                            "forward-bind".into(),
                            format!("--forward: cannot listen on {local}: {e}"),
                        ),
                    ));
                }
            };
            self.out.event(
                serde_json::json!({"event": "forwarding", "local": local, "service": name}),
                || format!("forwarding {local} to {}'s {name}", conn.peer_id()),
            );
            let conn = conn.clone();
            tasks.spawn(async move {
                loop {
                    let (tcp, from) = match listener.accept().await {
                        Ok(c) => c,
                        Err(e) => {
                            // Out of file descriptors and the like: back off
                            // rather than spin.
                            tracing::warn!(error = %e, "--forward: accept failed");
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                            continue;
                        }
                    };
                    let _ = tcp.set_nodelay(true);
                    let (conn, name) = (conn.clone(), name.clone());
                    tokio::spawn(async move {
                        let r = match service::open(&conn, &Request::Service(name.clone())).await {
                            Ok((send, recv)) => service::splice_tcp(tcp, send, recv).await,
                            Err(e) => Err(e),
                        };
                        match r {
                            Ok(m) => tracing::info!(%from, sent = m.sent, received = m.received, "forwarded connection done"),
                            Err(e) => tracing::warn!(%from, service = %name, error = %e, "forwarded connection failed"),
                        }
                    });
                }
            });
        }
        conn.closed().await;
        tasks.abort_all();
        let end = conn.end();
        Ok(self.fail(
            conn.peer_id(),
            (
                end.code().into(),
                end.describe(conn.peer_id(), self.idle_secs),
            ),
        ))
    }

    pub async fn listen(&self, services: Services, keep_open: bool) -> anyhow::Result<ExitCode> {
        let keep_open = keep_open || !services.is_empty();
        let pipe = Arc::new(Pipe {
            stdin: Mutex::new(Some(tokio::io::stdin())),
            turn: Mutex::new(()),
        });
        let services = Arc::new(services);
        loop {
            let Some(conn) = self.endpoint.accept().await else {
                return Ok(match self.endpoint.finished().await {
                    Err(e) => self.fail_session(&e),
                    Ok(()) => ExitCode::SUCCESS,
                });
            };
            self.track(&conn);
            let job = serve(conn.clone(), services.clone(), pipe.clone(), self.idle_secs);
            if keep_open {
                tokio::spawn(job);
                continue;
            }
            // One session only: later ones are told so at once, rather
            // than left waiting for a listener that will not serve them.
            let turn_away = async {
                while let Some(other) = self.endpoint.accept().await {
                    other.close(
                        close::ERROR,
                        "busy: this listener serves one session (see --keep-open)",
                    );
                }
                // Accepting stopped; the session itself goes on.
                std::future::pending().await
            };
            let result = tokio::select! {
                r = job => r,
                r = turn_away => r,
            };
            return Ok(match result {
                Ok(moved) => self.done(conn.peer_id(), moved),
                Err(why) => self.fail(conn.peer_id(), why),
            });
        }
    }
}

/// The listener's one stdin and stdout: pipe sessions take turns (as
/// netcat -k does), so two senders' bytes never mix.
struct Pipe {
    /// Read by the first pipe session only.
    stdin: Mutex<Option<tokio::io::Stdin>>,
    /// Held while a pipe session writes to stdout.
    turn: Mutex<()>,
}

/// Serves one accepted session: each stream is a pipe or a service. Ends
/// when the pipe finished (or, with services only, when the session ends).
async fn serve(
    conn: Connection,
    services: Arc<Services>,
    pipe: Arc<Pipe>,
    idle_secs: u64,
) -> Result<service::Moved, (String, String)> {
    let peer = conn.peer_id();
    let ended = |conn: &Connection| {
        let end = conn.end();
        (end.code().to_string(), end.describe(peer, idle_secs))
    };
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return Err(ended(&conn)),
        };
        let req = match service::read_request(&mut recv).await {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(%peer, error = %e, "bad stream request");
                let _ = service::respond(&mut send, Status::Refused, &e.to_string()).await;
                continue;
            }
        };
        match req {
            Request::Service(name) => {
                let services = services.clone();
                tokio::spawn(async move {
                    if let Err(e) = services.serve(&name, send, recv).await {
                        tracing::info!(%peer, service = %name, error = %e, "service stream ended");
                    }
                });
            }
            Request::Pipe if !services.is_empty() => {
                let _ = service::respond(
                    &mut send,
                    Status::Refused,
                    "this peer only offers named services (--to NAME)",
                )
                .await;
            }
            Request::Pipe => {
                let turn = match pipe.turn.try_lock() {
                    Ok(t) => t,
                    Err(_) => {
                        // Another pipe session has stdout: this one waits,
                        // and its sender is told why.
                        let _ = service::respond(&mut send, Status::Queued, "").await;
                        pipe.turn.lock().await
                    }
                };
                let input = pipe.stdin.lock().await.take();
                let _ = service::respond(&mut send, Status::Ok, "").await;
                let r = match input {
                    Some(i) => {
                        service::splice_until(
                            i,
                            tokio::io::stdout(),
                            send,
                            recv,
                            stdin_is_terminal(),
                        )
                        .await
                    }
                    None => {
                        service::splice(tokio::io::empty(), tokio::io::stdout(), send, recv).await
                    }
                };
                drop(turn);
                return match r {
                    Ok(m) => {
                        conn.close_and_wait(close::DONE, "done").await;
                        Ok(m)
                    }
                    Err(e) => {
                        let why = match conn.end() {
                            SessionEnd::Open => ("stream".to_string(), e.to_string()),
                            _ => ended(&conn),
                        };
                        conn.close_and_wait(close::ERROR, "error").await;
                        Err(why)
                    }
                };
            }
        }
    }
}
