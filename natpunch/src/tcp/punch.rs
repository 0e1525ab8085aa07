//! The simultaneous open of one attempt ([`natpunch_proto::punch::tcp`]
//! made the plan; the coordinator gave the limited TTL to one side only).
//!
//! Each target gets a SYN from the punching port at the coordinated
//! moment. The side with an *opener* TTL sends its SYN with it: the SYN
//! creates our NAT's mapping and opens its filter to the peer, and dies
//! before the peer's NAT, so a NAT that resets unsolicited SYNs never
//! sees one; the socket's TTL goes back to normal at once, so everything
//! after it (the answer in a simultaneous open, the kernel's own SYN
//! retransmissions) travels the whole way. The other side sends its SYN
//! [`natpunch_proto::coordinator::defaults::TCP_OPENER_LEAD`] later with
//! the normal TTL; it finds the opener's mapping and reaches the socket
//! in SYN-SENT, and the kernel completes the simultaneous open. The
//! opener stays on one socket (one initial sequence number): a second
//! socket on the same 4-tuple would carry another one, and the NATs'
//! connection tracking, still holding the first, would drop its answers
//! as out of window.
//!
//! Whichever way the kernel resolves it (our connect completes, the
//! listener accepts the peer's SYN, or the two SYNs cross) one stream
//! results. A connect refused (a RST) or unreachable is tried again on a
//! new socket after a short jittered pause; one still pending is left to
//! the kernel's SYN retransmission.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natpunch_proto::punch::tcp::TcpPlan;
use rand::RngExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{reuse_socket, TcpNews};

/// A failed connect is tried again after this, plus up to [`JITTER`]: a
/// RST from a NAT that had no mapping yet comes back in one round trip,
/// and the peer's own SYN has usually opened its NAT by then.
pub const RETRY: Duration = Duration::from_millis(250);
pub const JITTER: Duration = Duration::from_millis(150);
/// The whole punch gives up after this (the attempt's own deadline is
/// 10 s, [`natpunch_proto::punch::defaults::TIMEOUT`]).
pub const GIVE_UP: Duration = Duration::from_secs(9);

/// How one connect ended.
enum Ended {
    Up(tokio::net::TcpStream),
    Failed(std::io::Error),
    /// An opener did its work ([`OPENER_LIFE`] passed, or a router's ICMP
    /// killed it first): the real SYN goes now.
    Opened,
}

/// The real SYN follows the opener this long after, from a new socket on
/// the same 4-tuple (a router's ICMP "time exceeded" aborts the opener's
/// socket anyway). Short, because a NAT built on Linux conntrack holds
/// the opener's initial sequence number, and when the peer's SYN reaches
/// that NAT before our real SYN does, our answer must fall within the
/// peer's window (64240 bytes for Linux) of it; the kernel's ISN clock
/// advances 15.6 per µs (RFC 6528: 4 µs ticks, Linux 64 ns), so 2 ms is
/// 31250, half the window. It also bounds the start skew the openers
/// absorb: the server aligns both starts within about a millisecond.
pub const OPENER_LIFE: Duration = Duration::from_millis(2);

/// Runs `plan` for `session` from `local` (the punching port) starting at
/// `at`; streams and the end go to `news`. Cancelled by aborting its task.
pub async fn run(
    session: u64,
    plan: TcpPlan,
    local: SocketAddr,
    at: Instant,
    news: mpsc::UnboundedSender<TcpNews>,
) {
    tokio::time::sleep_until(at.into()).await;
    let give_up = Instant::now() + GIVE_UP;
    let mut connects: JoinSet<(SocketAddr, Ended)> = JoinSet::new();
    let mut errors: Vec<String> = Vec::new();
    let mut due: Vec<SocketAddr> = plan.targets.clone();
    let mut retries: Vec<(Instant, SocketAddr)> = Vec::new();
    let mut first = true;
    let mut up = false;
    loop {
        let now = Instant::now();
        retries.retain(|(when, t)| {
            if *when <= now {
                due.push(*t);
                false
            } else {
                true
            }
        });
        // Only the first SYN to each target is an opener.
        let ttl = plan.opener_ttl.filter(|_| first);
        first = false;
        for target in due.drain(..) {
            match start_connect(local, target, ttl) {
                Ok(stream) if ttl.is_some() => {
                    connects.spawn(async move {
                        let until = tokio::time::Instant::now() + OPENER_LIFE;
                        let ended = tokio::time::timeout_at(until, finish_connect(stream)).await;
                        if let Ok(Ended::Up(s)) = ended {
                            return (target, Ended::Up(s));
                        }
                        // (Dropping the socket closes it silently.) The
                        // real SYN keeps its time after the opener even if
                        // an ICMP ended the opener sooner.
                        tokio::time::sleep_until(until).await;
                        (target, Ended::Opened)
                    });
                }
                Ok(stream) => {
                    connects.spawn(async move { (target, finish_connect(stream).await) });
                }
                Err(e) => {
                    tracing::debug!(session, %target, error = %e, "TCP connect not started");
                    errors.push(format!("{target}: {}", describe(&e)));
                    if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) && !up {
                        // The 4-tuple is taken: the peer's SYN reached our
                        // listener first, which completes it (or not: then
                        // try again later).
                        retries.push((Instant::now() + RETRY, target));
                    }
                    // Anything else (the port cannot be bound): no retry helps.
                }
            }
        }
        if connects.is_empty() && retries.is_empty() {
            break;
        }
        let wake = retries
            .iter()
            .map(|(w, _)| *w)
            .min()
            .unwrap_or(give_up)
            .min(give_up);
        if Instant::now() >= give_up {
            break;
        }
        tokio::select! {
            Some(done) = connects.join_next() => {
                let Ok((target, ended)) = done else { continue };
                match ended {
                    Ended::Up(stream) => {
                        let _ = stream.set_nodelay(true);
                        tracing::debug!(session, %target, "TCP stream up by our connect");
                        if news.send(TcpNews::Up { session: Some(session), stream, remote: target }).is_err() {
                            return;
                        }
                        // The attempt authenticates it; no new SYNs (those
                        // in flight may still bring another stream).
                        up = true;
                        retries.clear();
                    }
                    Ended::Opened => {
                        tracing::trace!(session, %target, "opener sent; SYN follows");
                        retries.push((Instant::now(), target));
                    }
                    Ended::Failed(e) => {
                        tracing::debug!(session, %target, error = %e, "TCP connect failed");
                        errors.push(format!("{target}: {}", describe(&e)));
                        if up {
                            continue;
                        }
                        let pause = RETRY + JITTER.mul_f64(rand::rng().random::<f64>());
                        retries.push((Instant::now() + pause, target));
                    }
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    if !up {
        let reason = summary(&plan, &errors);
        let _ = news.send(TcpNews::Over { session, reason });
    }
}

/// Starts a connect from `local` to `target`; the SYN leaves now, with
/// `ttl` if given (the socket's TTL is normal again right after).
fn start_connect(
    local: SocketAddr,
    target: SocketAddr,
    ttl: Option<u8>,
) -> std::io::Result<tokio::net::TcpStream> {
    let s = reuse_socket(local)?;
    let normal = match (ttl, target.is_ipv4()) {
        (Some(t), true) => {
            let n = s.ttl_v4()?;
            s.set_ttl_v4(u32::from(t))?;
            Some(n)
        }
        (Some(t), false) => {
            let n = s.unicast_hops_v6()?;
            s.set_unicast_hops_v6(u32::from(t))?;
            Some(n)
        }
        (None, _) => None,
    };
    match s.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    if let Some(n) = normal {
        if target.is_ipv4() {
            s.set_ttl_v4(n)?;
        } else {
            s.set_unicast_hops_v6(n)?;
        }
    }
    tokio::net::TcpStream::from_std(s.into())
}

/// Waits for a started connect to complete or fail.
async fn finish_connect(stream: tokio::net::TcpStream) -> Ended {
    if let Err(e) = stream.writable().await {
        return Ended::Failed(e);
    }
    match stream.take_error() {
        Ok(None) => match stream.peer_addr() {
            Ok(_) => Ended::Up(stream),
            Err(e) => Ended::Failed(e),
        },
        Ok(Some(e)) | Err(e) => Ended::Failed(e),
    }
}

fn describe(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => {
            "connection refused (a RST: the peer's NAT had no mapping yet, or nothing listens)"
                .into()
        }
        std::io::ErrorKind::TimedOut => "no answer to the SYNs".into(),
        _ => match e.raw_os_error() {
            Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => format!("no route ({e})"),
            _ => e.to_string(),
        },
    }
}

/// Why the punch ended without a stream, in one line.
fn summary(plan: &TcpPlan, errors: &[String]) -> String {
    let targets = match plan.targets.as_slice() {
        [one] => one.to_string(),
        many => format!(
            "{} ports of {}",
            many.len(),
            many.first().map(|a| a.ip().to_string()).unwrap_or_default()
        ),
    };
    match errors.last() {
        Some(last) => format!(
            "{} s of SYNs to {targets} ({} failed connects; last: {last})",
            GIVE_UP.as_secs(),
            errors.len()
        ),
        None => format!("{} s of SYNs to {targets} got no answer", GIVE_UP.as_secs()),
    }
}
