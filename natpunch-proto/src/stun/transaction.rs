//! Sans-IO STUN client transactions (RFC 8489 §6.2, §6.3).
//!
//! [`Client`] owns any number of outstanding requests. The caller feeds it
//! every datagram that arrives on the shared socket(s) with
//! [`Client::handle_input`] (it answers whether the datagram was one of
//! ours, so other traffic passes on), calls [`Client::handle_timeout`] when
//! [`Client::poll_timeout`] says, and drains [`Client::poll_transmit`] and
//! [`Client::poll_event`]. It never reads a clock or touches a socket.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::message::{Class, Message, TransactionId};
use crate::SocketId;
pub use crate::Transmit;

/// Retransmission timing (RFC 8489 §6.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Initial retransmission timeout. RFC 8489 §6.2.1 recommends 500 ms.
    pub rto: Duration,
    /// Total number of sends, Rc. RFC 8489 §6.2.1 default: 7.
    pub rc: u32,
    /// After the last send, wait `rm × rto` for an answer. RFC default: 16.
    pub rm: u32,
    /// Reliable transports (TCP) send once and wait this long, Ti.
    /// RFC 8489 §6.2.2: 39.5 s.
    pub ti: Duration,
    /// A second copy of each send this long after it (UDP only), for
    /// requests on a connect's critical path: one lost datagram then costs
    /// this instead of an RTO. Copies are not counted in `rc`.
    pub hedge: Option<Duration>,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            rto: Duration::from_millis(500),
            rc: 7,
            rm: 16,
            ti: Duration::from_millis(39_500),
            hedge: None,
        }
    }
}

impl Timing {
    /// Quick probing timing used by NAT discovery, where a missing answer is
    /// an expected result (a filtering test) and 39.5 s per test would be
    /// unusable: 4 sends at 0, 250, 750, 1750 ms, giving up at 3.75 s. 250 ms
    /// still covers a 200 ms RTT path on its first retransmit.
    pub fn probe() -> Self {
        Self {
            rto: Duration::from_millis(250),
            rc: 4,
            rm: 8,
            ti: Duration::from_secs(5),
            hedge: None,
        }
    }

    /// This timing with a hedged first send (see [`Timing::hedge`]).
    pub fn hedged(self, after: Duration) -> Self {
        Self {
            hedge: Some(after),
            ..self
        }
    }

    /// Time from the first send until the transaction times out.
    pub fn total(&self, reliable: bool) -> Duration {
        if reliable {
            return self.ti;
        }
        let mut t = Duration::ZERO;
        let mut rto = self.rto;
        for _ in 1..self.rc {
            t += rto;
            rto *= 2;
        }
        t + self.rto * self.rm
    }
}

/// How a transaction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A success response.
    Success { response: Message, from: SocketAddr },
    /// An error response: this is a failure, never a success.
    Error {
        code: Option<u16>,
        response: Message,
        from: SocketAddr,
    },
    /// No answer within the timing's budget.
    Timeout,
}

/// A finished transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub transaction: TransactionId,
    /// The socket the request went out on.
    pub socket: SocketId,
    /// Where the request was sent.
    pub destination: SocketAddr,
    /// The socket the answer arrived on (it may differ with RESPONSE-PORT).
    pub received_on: Option<SocketId>,
    pub outcome: Outcome,
    /// Time from the first send to the answer (or the timeout).
    pub rtt: Duration,
    /// Sends made (hedge copies not counted): with more than one, `rtt`
    /// may include a retransmission timeout (Karn's rule).
    pub sends: u32,
}

#[derive(Debug)]
struct Pending {
    tid: TransactionId,
    socket: SocketId,
    destination: SocketAddr,
    payload: Vec<u8>,
    reliable: bool,
    timing: Timing,
    sends: u32,
    first_sent: Option<Instant>,
    next: Instant,
    /// When the hedge copy of the first send is due.
    hedge_at: Option<Instant>,
    rto: Duration,
}

/// Counters for what the client has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    pub requests_sent: u64,
    pub retransmits: u64,
    pub responses: u64,
    pub timeouts: u64,
    /// STUN responses whose transaction ID is not one of ours.
    pub unmatched: u64,
    pub bytes_sent: u64,
}

/// The set of outstanding transactions.
#[derive(Debug, Default)]
pub struct Client {
    pending: Vec<Pending>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: ClientStats,
}

impl Client {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a transaction: `request` is sent from `socket` to
    /// `destination` right away (on the next [`Client::poll_transmit`]) and
    /// retransmitted per `timing`. `reliable` marks a TCP transaction, which
    /// is sent once (§6.2.2).
    pub fn start(
        &mut self,
        now: Instant,
        socket: SocketId,
        destination: SocketAddr,
        request: &Message,
        timing: Timing,
        reliable: bool,
    ) -> TransactionId {
        self.start_raw(
            now,
            socket,
            destination,
            request.transaction,
            request.to_bytes(),
            timing,
            reliable,
        )
    }

    /// As [`Client::start`], with the request already encoded (for example
    /// with integrity or fingerprint).
    #[allow(clippy::too_many_arguments)]
    pub fn start_raw(
        &mut self,
        now: Instant,
        socket: SocketId,
        destination: SocketAddr,
        tid: TransactionId,
        payload: Vec<u8>,
        timing: Timing,
        reliable: bool,
    ) -> TransactionId {
        self.pending.push(Pending {
            tid,
            socket,
            destination,
            payload,
            reliable,
            timing,
            sends: 0,
            first_sent: None,
            next: now,
            hedge_at: None,
            rto: timing.rto,
        });
        self.handle_timeout(now);
        tid
    }

    /// Whether a transaction is still waiting.
    pub fn is_pending(&self, tid: &TransactionId) -> bool {
        self.pending.iter().any(|p| &p.tid == tid)
    }

    /// Abandons a transaction without an event.
    pub fn cancel(&mut self, tid: &TransactionId) {
        self.pending.retain(|p| &p.tid != tid);
    }

    /// Offers a received datagram. Returns `true` if it was a response to
    /// one of our transactions (consumed), `false` for anything else, which
    /// the caller passes on to its other protocols.
    pub fn handle_input(
        &mut self,
        now: Instant,
        socket: SocketId,
        from: SocketAddr,
        data: &[u8],
    ) -> bool {
        if !super::message::looks_like_stun(data) {
            return false;
        }
        let Ok(msg) = Message::decode(data) else {
            return false;
        };
        self.handle_message(now, socket, from, msg)
    }

    /// As [`Client::handle_input`] for an already decoded message.
    pub fn handle_message(
        &mut self,
        now: Instant,
        socket: SocketId,
        from: SocketAddr,
        msg: Message,
    ) -> bool {
        if !matches!(msg.class, Class::Success | Class::Error) {
            return false;
        }
        let Some(i) = self.pending.iter().position(|p| p.tid == msg.transaction) else {
            self.stats.unmatched += 1;
            tracing::trace!(?from, "STUN response with an unknown transaction ID");
            return false;
        };
        let p = self.pending.swap_remove(i);
        self.stats.responses += 1;
        let rtt = p
            .first_sent
            .and_then(|t| now.checked_duration_since(t))
            .unwrap_or_default();
        let outcome = if msg.class == Class::Success {
            Outcome::Success {
                response: msg,
                from,
            }
        } else {
            Outcome::Error {
                code: msg.error_code(),
                response: msg,
                from,
            }
        };
        self.events.push_back(Event {
            transaction: p.tid,
            socket: p.socket,
            destination: p.destination,
            received_on: Some(socket),
            outcome,
            rtt,
            sends: p.sends,
        });
        true
    }

    /// Advances retransmissions and timeouts. A spurious call is a no-op.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.pending.len() {
            let p = &mut self.pending[i];
            if p.hedge_at.is_some_and(|h| now >= h) {
                p.hedge_at = None;
                self.stats.bytes_sent += p.payload.len() as u64;
                self.transmits.push_back(Transmit {
                    socket: p.socket,
                    destination: p.destination,
                    payload: p.payload.clone(),
                    ttl: None,
                });
            }
            if now < p.next {
                i += 1;
                continue;
            }
            let max_sends = if p.reliable { 1 } else { p.timing.rc.max(1) };
            if p.sends >= max_sends {
                let p = self.pending.swap_remove(i);
                self.stats.timeouts += 1;
                let rtt = p
                    .first_sent
                    .and_then(|t| now.checked_duration_since(t))
                    .unwrap_or_default();
                self.events.push_back(Event {
                    transaction: p.tid,
                    socket: p.socket,
                    destination: p.destination,
                    received_on: None,
                    outcome: Outcome::Timeout,
                    rtt,
                    sends: p.sends,
                });
                continue;
            }
            p.sends += 1;
            if !p.reliable {
                p.hedge_at = p.timing.hedge.map(|h| now + h);
            }
            if p.first_sent.is_none() {
                p.first_sent = Some(now);
                self.stats.requests_sent += 1;
            } else {
                self.stats.retransmits += 1;
            }
            self.stats.bytes_sent += p.payload.len() as u64;
            self.transmits.push_back(Transmit {
                socket: p.socket,
                destination: p.destination,
                payload: p.payload.clone(),
                ttl: None,
            });
            p.next = if p.reliable {
                now + p.timing.ti
            } else if p.sends >= max_sends {
                now + p.timing.rto * p.timing.rm
            } else {
                let wait = p.rto;
                p.rto *= 2;
                now + wait
            };
            i += 1;
        }
    }

    /// The next instant [`Client::handle_timeout`] must be called, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending
            .iter()
            .map(|p| p.hedge_at.map_or(p.next, |h| h.min(p.next)))
            .min()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    /// Number of outstanding transactions.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::message::{Attribute, Message};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn retransmits_on_rfc_schedule_then_times_out() {
        let t0 = Instant::now();
        let mut c = Client::new();
        let req = Message::binding_request(TransactionId::new([1; 12]));
        c.start(
            t0,
            SocketId(0),
            addr("192.0.2.1:3478"),
            &req,
            Timing::default(),
            false,
        );
        let mut sends = vec![];
        let mut now = t0;
        loop {
            while c.poll_transmit().is_some() {
                sends.push(now.duration_since(t0).as_millis());
            }
            if let Some(ev) = c.poll_event() {
                assert_eq!(ev.outcome, Outcome::Timeout);
                break;
            }
            now = c.poll_timeout().expect("a timer while pending");
            c.handle_timeout(now);
        }
        // RFC 8489 §6.2.1 example: 0, 500, 1500, 3500, 7500, 15500, 31500,
        // then failure at 39500.
        assert_eq!(sends, vec![0, 500, 1500, 3500, 7500, 15500, 31500]);
        assert_eq!(now.duration_since(t0).as_millis(), 39500);
        assert_eq!(Timing::default().total(false).as_millis(), 39500);
    }

    /// A hedged transaction sends each copy `hedge` after its original and
    /// keeps the RFC schedule and timeout of the unhedged one.
    #[test]
    fn a_hedged_transaction_doubles_each_send_on_the_same_schedule() {
        let t0 = Instant::now();
        let mut c = Client::new();
        let req = Message::binding_request(TransactionId::new([2; 12]));
        let timing = Timing::probe().hedged(Duration::from_millis(10));
        c.start(t0, SocketId(0), addr("192.0.2.1:3478"), &req, timing, false);
        let mut sends = vec![];
        let mut now = t0;
        loop {
            while c.poll_transmit().is_some() {
                sends.push(now.duration_since(t0).as_millis());
            }
            if let Some(ev) = c.poll_event() {
                assert_eq!(ev.outcome, Outcome::Timeout);
                break;
            }
            now = c.poll_timeout().expect("a timer while pending");
            c.handle_timeout(now);
        }
        assert_eq!(
            sends,
            vec![0, 10, 250, 260, 750, 760, 1750, 1760],
            "four sends at 0, 250, 750, 1750 ms, each with its copy"
        );
        assert_eq!(now.duration_since(t0), Timing::probe().total(false));
        assert_eq!(c.stats().retransmits, 3);
    }

    #[test]
    fn matches_by_transaction_id_and_reports_errors_as_errors() {
        let t0 = Instant::now();
        let mut c = Client::new();
        let tid = TransactionId::new([7; 12]);
        let req = Message::binding_request(tid);
        c.start(
            t0,
            SocketId(0),
            addr("192.0.2.1:3478"),
            &req,
            Timing::probe(),
            false,
        );
        assert!(c.poll_transmit().is_some());
        // An unrelated response is not ours.
        let other = Message::new(Class::Success, 1, TransactionId::new([8; 12]))
            .with(Attribute::XorMappedAddress(addr("198.51.100.1:1")));
        assert!(!c.handle_input(t0, SocketId(0), addr("192.0.2.1:3478"), &other.to_bytes()));
        // Non-STUN traffic passes through.
        assert!(!c.handle_input(t0, SocketId(0), addr("192.0.2.1:3478"), &[0xC0; 40]));
        let err = Message::new(Class::Error, 1, tid).with(Attribute::ErrorCode {
            code: 420,
            reason: "Unknown Attribute".into(),
        });
        assert!(c.handle_input(t0, SocketId(0), addr("192.0.2.1:3478"), &err.to_bytes()));
        let ev = c.poll_event().expect("event");
        assert!(matches!(
            ev.outcome,
            Outcome::Error {
                code: Some(420),
                ..
            }
        ));
        assert_eq!(c.pending(), 0);
        assert_eq!(c.stats().unmatched, 1);
    }

    #[test]
    fn reliable_sends_once_and_waits_ti() {
        let t0 = Instant::now();
        let mut c = Client::new();
        let req = Message::binding_request(TransactionId::new([2; 12]));
        c.start(
            t0,
            SocketId(0),
            addr("192.0.2.1:3478"),
            &req,
            Timing::default(),
            true,
        );
        assert!(c.poll_transmit().is_some());
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_millis(39_500)));
        c.handle_timeout(t0 + Duration::from_secs(1));
        assert!(c.poll_transmit().is_none());
        c.handle_timeout(t0 + Duration::from_millis(39_500));
        assert_eq!(c.poll_event().map(|e| e.outcome), Some(Outcome::Timeout));
    }

    #[test]
    fn spurious_timeout_and_very_early_now_are_harmless() {
        let t0 = Instant::now();
        let mut c = Client::new();
        c.handle_timeout(t0);
        assert!(c.poll_transmit().is_none());
        let req = Message::binding_request(TransactionId::new([3; 12]));
        c.start(
            t0,
            SocketId(0),
            addr("192.0.2.1:3478"),
            &req,
            Timing::probe(),
            false,
        );
        c.poll_transmit();
        // A response "before" the send must not underflow.
        let ok = Message::new(Class::Success, 1, req.transaction);
        let earlier = t0.checked_sub(Duration::from_millis(1)).unwrap_or(t0);
        assert!(c.handle_input(earlier, SocketId(0), addr("192.0.2.1:3478"), &ok.to_bytes()));
        assert_eq!(c.poll_event().map(|e| e.rtt), Some(Duration::ZERO));
    }
}
