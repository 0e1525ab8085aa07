//! The simultaneous open of one attempt ([`natpunch_proto::punch::tcp`]
//! made the plan; the coordinator gave the limited TTL to one side only).
//!
//! Each target gets a SYN from the punching port at the coordinated
//! moment. A side with an *opener* TTL first sends a SYN with it: it
//! creates our NAT's mapping and opens its filter to the peer, and dies
//! before the peer's NAT, so a NAT that resets unsolicited SYNs never sees
//! it. The real SYN follows from a new socket on the same 4-tuple, with
//! the normal TTL, once the opener is over. Both sides do the same at the
//! same moment, so each real SYN reaches the other NAT after that NAT's
//! opener: the start skew must stay under the opener's life.
//!
//! That life is bounded from above. A NAT built on Linux conntrack that
//! sees the peer's SYN between our opener and our real SYN keeps the
//! opener's initial sequence number, and drops our answer (not NATed, it
//! leaks with our private source address) unless its sequence number lies
//! within the peer's SYN window (64240 for Linux) of the opener's. With
//! CAP_NET_ADMIN we choose both numbers (`TCP_REPAIR`, [`ISN_STEP`]
//! apart), and the opener lives until the router past our NAT answers it
//! with ICMP "time exceeded", which aborts its socket (until then that
//! socket answers an early peer SYN itself, with the number our NAT saw),
//! or [`OPENER_MAX_LIFE_CHOSEN_ISN`]; without it the kernel's ISN clock
//! (15.6 per µs) leaves about 4 ms, and the opener lives [`OPENER_LIFE`]
//! (or less, if its ICMP comes sooner). The openers, the precise waits and
//! the real SYNs run on a blocking thread (`ppoll` on the openers'
//! sockets), not on tokio's 1 ms timer wheel: with the timer the gap was
//! 3.2–4.5 ms in the lab, and the runs at 4.5 ms failed just so (an
//! answer from 10.0.2.2 on the NAT's WAN).
//!
//! Whichever way the kernel resolves it (our connect completes, the
//! listener accepts the peer's SYN, or the two SYNs cross) one stream
//! results. A connect refused (a RST) or unreachable is tried again on a
//! new socket: with openers on the next round of the coordinated start
//! (both sides retry on the same rounds, behind openers again), without
//! them after a short jittered pause; one still pending is left to the
//! kernel's SYN retransmission.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natpunch_proto::punch::tcp::TcpPlan;
use rand::RngExt;
use socket2::Socket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{reuse_socket, TcpNews};

/// A failed connect is tried again on the next round, rounds this far
/// apart from the coordinated start (with openers; see [`retry_at`]), or
/// after this plus up to [`JITTER`] (without): a RST from a NAT that had
/// no mapping yet comes back in one round trip (tens of ms), and a round
/// of 20 targets takes a few ms to send.
pub const RETRY: Duration = Duration::from_millis(250);
/// Spread of the retries without openers, so two sides do not retry in
/// lockstep into each other's RSTs forever.
pub const JITTER: Duration = Duration::from_millis(150);
/// The whole punch gives up after this at most (the attempt's own
/// deadline is 10 s, [`natpunch_proto::punch::defaults::TIMEOUT`], and the
/// coordinator's `until` is just before it).
pub const GIVE_UP: Duration = Duration::from_secs(9);

/// How one connect ended.
enum Ended {
    Up(tokio::net::TcpStream),
    Failed(std::io::Error),
}

/// Without chosen sequence numbers the real SYN follows the opener at most
/// this long after (see the module doc): the start skew it absorbs (the server aligns both starts to its
/// millisecond; the lab measured 0.2–1.5 ms between the two NATs'
/// openers) against the 4.1 ms an answer's sequence number may drift from
/// the opener's (64240 / 15.6 per µs), with room for the pause's own
/// overshoot and the sockets' set-up (the drift measured 2.7 ms for a
/// 2.5 ms pause in the lab, 4.2 ms once on a loaded listener).
pub const OPENER_LIFE: Duration = Duration::from_micros(2500);
/// With chosen sequence numbers (CAP_NET_ADMIN), the real SYN's is the
/// opener's plus this: inside the peer's SYN window (64240) of it, so a
/// NAT that kept the opener's still passes our answer, and outside the
/// one-number window an ICMP "time exceeded" for the opener must hit to
/// abort the real connect (`tcp_v4_err` checks it against snd_una..snd_nxt).
const ISN_STEP: u32 = 16384;
/// With chosen sequence numbers the real SYN waits for the opener's ICMP
/// "time exceeded" (the opener's socket answers an early peer SYN until
/// then, with the number our NAT saw), so the start skew the pair absorbs
/// is the round trip to the router past our NAT (20 ms in the lab, whose
/// access links carry the delay), not a fixed few ms; a router that sends
/// no ICMP (or rate-limits it: Linux allows bursts of 6) leaves the
/// opener this long at most.
const OPENER_MAX_LIFE_CHOSEN_ISN: Duration = Duration::from_millis(30);
/// The openers' start is slept on tokio's timer (1 ms ticks, rounded up)
/// to this long before it, and the rest with `nanosleep`: both sides'
/// openers then leave within the server's alignment of each other, not
/// within two timer ticks (the lab saw 3 ms of skew that way, and the
/// peer's real SYN met a NAT its opener had not passed yet).
const PRECISE_START: Duration = Duration::from_millis(3);

/// Runs `plan` for `session` from `local` (the punching port) starting at
/// `at` and giving up by `until`; streams and the end go to `news`.
/// Cancelled by aborting its task.
pub async fn run(
    session: u64,
    plan: TcpPlan,
    local: SocketAddr,
    at: Instant,
    until: Instant,
    news: mpsc::UnboundedSender<TcpNews>,
) {
    // With openers, the last stretch to each round is slept on the
    // blocking thread, to the microsecond (see `open_then_connect`).
    let lead = match plan.opener_ttl {
        Some(_) => PRECISE_START,
        None => Duration::ZERO,
    };
    if until <= at {
        let _ = news.send(TcpNews::Over {
            session,
            reason: "no time was left before the attempt's deadline".into(),
        });
        return;
    }
    tokio::time::sleep_until(at.checked_sub(lead).unwrap_or(at).into()).await;
    let give_up = (Instant::now().max(at) + GIVE_UP).min(until);
    let mut connects: JoinSet<(SocketAddr, Ended)> = JoinSet::new();
    let mut errors: Vec<String> = Vec::new();
    let mut due: Vec<SocketAddr> = plan.targets.clone();
    let mut retries: Vec<(Instant, SocketAddr)> = Vec::new();
    let mut round = at;
    let mut up = false;
    loop {
        let now = Instant::now();
        retries.retain(|(when, t)| {
            if *when <= now + lead {
                due.push(*t);
                round = *when;
                false
            } else {
                true
            }
        });
        let started: Vec<_> = match plan.opener_ttl {
            // Openers, the pauses and the real SYNs, off the runtime.
            Some(ttl) if !due.is_empty() => {
                let targets = std::mem::take(&mut due);
                tokio::task::spawn_blocking(move || open_then_connect(local, &targets, ttl, round))
                    .await
                    .unwrap_or_default()
            }
            _ => due
                .drain(..)
                .map(|t| (t, start_connect(local, t, None, None)))
                .collect(),
        };
        let again = retry_at(at, lead, plan.opener_ttl.is_some());
        for (target, started) in started {
            started_connect(
                session,
                target,
                started,
                (!up).then_some(again),
                &mut connects,
                &mut errors,
                &mut retries,
            );
        }
        if connects.is_empty() && retries.is_empty() {
            break;
        }
        let wake = retries
            .iter()
            .map(|(w, _)| *w)
            .min()
            .map(|w| w.checked_sub(lead).unwrap_or(w))
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
                    Ended::Failed(e) => {
                        tracing::debug!(session, %target, error = %e, "TCP connect failed");
                        errors.push(format!("{target}: {}", describe(&e)));
                        if up {
                            continue;
                        }
                        retries.push((retry_at(at, lead, plan.opener_ttl.is_some()), target));
                    }
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    if !up {
        let reason = summary(&plan, &errors, Instant::now().saturating_duration_since(at));
        let _ = news.send(TcpNews::Over { session, reason });
    }
}

/// When a failed connect is tried again. With openers, at the next round
/// of the coordinated start (`at` + k × [`RETRY`], at least `lead` away):
/// the peer's connects fail and retry on the same rounds, so every round
/// is again a simultaneous open behind openers; a lone retry would meet
/// the peer's NAT with no mapping and its RST would close ours (through
/// two NATs that answer with a RST, unaligned retries never met). Without
/// openers, after [`RETRY`] plus up to [`JITTER`].
fn retry_at(at: Instant, lead: Duration, openers: bool) -> Instant {
    let now = Instant::now();
    if !openers {
        return now + RETRY + JITTER.mul_f64(rand::rng().random::<f64>());
    }
    let past = (now + lead).saturating_duration_since(at);
    let rounds = past.as_nanos() / RETRY.as_nanos() + 1;
    at + RETRY * u32::try_from(rounds).unwrap_or(u32::MAX)
}

/// Puts a started connect to work: its end is awaited; one that could not
/// start is retried at `again` (none once a stream is up) only when its
/// 4-tuple was taken.
fn started_connect(
    session: u64,
    target: SocketAddr,
    started: std::io::Result<Socket>,
    again: Option<Instant>,
    connects: &mut JoinSet<(SocketAddr, Ended)>,
    errors: &mut Vec<String>,
    retries: &mut Vec<(Instant, SocketAddr)>,
) {
    match started.and_then(|s| tokio::net::TcpStream::from_std(s.into())) {
        Ok(stream) => {
            connects.spawn(async move { (target, finish_connect(stream).await) });
        }
        Err(e) => {
            tracing::debug!(session, %target, error = %e, "TCP connect not started");
            errors.push(format!("{target}: {}", describe(&e)));
            if let (Some(again), Some(libc::EADDRNOTAVAIL)) = (again, e.raw_os_error()) {
                // The 4-tuple is taken: the peer's SYN reached our
                // listener first, which completes it (or not: then try
                // again later).
                retries.push((again, target));
            }
            // Anything else (the port cannot be bound): no retry helps.
        }
    }
}

/// Blocking: at `at` to the microsecond, an opener SYN with `ttl` to
/// each target, then each target's real SYN from a new socket as soon as
/// its opener is over: the router past our NAT answered it with ICMP
/// "time exceeded" (which aborts the opener's socket), or its longest
/// life ran out. An opener the peer's SYN already reached (our answer is
/// out, or the stream is up) is kept instead.
fn open_then_connect(
    local: SocketAddr,
    targets: &[SocketAddr],
    ttl: u8,
    at: Instant,
) -> Vec<(SocketAddr, std::io::Result<Socket>)> {
    // Where we may choose sequence numbers, the opener's and the real
    // SYN's are fixed (see `ISN_STEP`), and the gap is no longer bound by
    // the kernel's ISN clock.
    let mut isn: u32 = rand::rng().random::<u32>() | 1;
    let chosen = Socket::new(
        socket2::Domain::for_address(local),
        socket2::Type::STREAM,
        None,
    )
    .and_then(|probe| preset_isn(&probe, isn))
    .is_ok();
    let life = if chosen {
        OPENER_MAX_LIFE_CHOSEN_ISN
    } else {
        OPENER_LIFE
    };
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
    let mut waiting = Vec::new();
    let mut out = Vec::new();
    for &t in targets {
        isn = isn.wrapping_add(ISN_STEP * 2);
        let seq = chosen.then_some(isn);
        match start_connect(local, t, Some(ttl), seq) {
            Ok(o) => waiting.push((t, seq, Instant::now() + life, o)),
            Err(e) => out.push((t, Err(e))),
        }
    }
    while !waiting.is_empty() {
        let now = Instant::now();
        let next = waiting.iter().map(|w| w.2).min().unwrap_or(now);
        let mut fds: Vec<libc::pollfd> = waiting
            .iter()
            .map(|w| libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&w.3),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        let wait = next.saturating_duration_since(now);
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(wait.subsec_nanos() as i32),
        };
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the
        // call's duration; a null sigmask leaves the mask unchanged.
        let ready = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        let now = Instant::now();
        let mut k = 0;
        while k < waiting.len() {
            // Without chosen numbers the opener keeps its fixed life even
            // past its ICMP: the listener's kernel ISN would answer an early
            // peer SYN no worse than the real socket's, and a short first
            // hop must not shrink the skew the pair absorbs.
            let answered = waiting[k].3.peer_addr().is_ok();
            let over = ready > 0 && fds[k].revents != 0 && (chosen || answered);
            if !over && waiting[k].2 > now {
                k += 1;
                continue;
            }
            fds.remove(k);
            let (target, seq, _, opener) = waiting.remove(k);
            // getpeername fails in SYN-SENT only: the peer answered.
            if opener.peer_addr().is_ok() && matches!(opener.take_error(), Ok(None)) {
                out.push((target, Ok(opener)));
                continue;
            }
            // Closing in SYN-SENT sends nothing, and frees the 4-tuple.
            drop(opener);
            let real = seq.map(|x| x.wrapping_add(ISN_STEP));
            out.push((target, start_connect(local, target, None, real)));
        }
    }
    out
}

/// Starts a connect from `local` to `target`; the SYN leaves now, with
/// `ttl` if given (the socket's TTL is normal again right after).
fn start_connect(
    local: SocketAddr,
    target: SocketAddr,
    ttl: Option<u8>,
    isn: Option<u32>,
) -> std::io::Result<Socket> {
    let s = reuse_socket(local)?;
    if let Some(isn) = isn {
        preset_isn(&s, isn)?;
    }
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
    Ok(s)
}

/// The send queue, for `TCP_REPAIR_QUEUE` (linux/tcp.h: `TCP_SEND_QUEUE`;
/// the libc crate names the option, not its values).
const TCP_SEND_QUEUE: libc::c_int = 2;
/// `TCP_REPAIR` off without a window probe (linux/tcp.h:
/// `TCP_REPAIR_OFF_NO_WP`): the socket is not connected yet.
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;

/// Makes `isn` the initial sequence number of the next `connect` on the
/// unconnected `s` (`TCP_REPAIR`, as CRIU restores sockets: a send queue
/// sequence set while closed is kept by `tcp_v4_connect`). Needs
/// CAP_NET_ADMIN.
fn preset_isn(s: &Socket, isn: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let set = |opt: libc::c_int, val: libc::c_int| -> std::io::Result<()> {
        // SAFETY: a plain int option on a socket we own.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                opt,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    set(libc::TCP_REPAIR, 1)?;
    let r = set(libc::TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        .and_then(|()| set(libc::TCP_QUEUE_SEQ, isn as libc::c_int));
    set(libc::TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)?;
    r
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
fn summary(plan: &TcpPlan, errors: &[String], spent: Duration) -> String {
    let secs = format!("{:.1}", spent.as_secs_f64());
    let targets = match plan.targets.as_slice() {
        [one] => one.to_string(),
        many => format!(
            "{} ports of {}",
            many.len(),
            many.first().map(|a| a.ip().to_string()).unwrap_or_default()
        ),
    };
    match errors.last() {
        // Over at once (no route, the port cannot be bound): the error
        // itself, which names its target.
        Some(last) if errors.len() == 1 && spent < RETRY => last.clone(),
        Some(last) if spent < RETRY => format!(
            "{} connects to {targets} failed at once; last: {last}",
            errors.len()
        ),
        Some(last) => format!(
            "{secs} s of SYNs to {targets} ({} failed connects; last: {last})",
            errors.len()
        ),
        None => format!("{secs} s of SYNs to {targets} got no answer"),
    }
}
