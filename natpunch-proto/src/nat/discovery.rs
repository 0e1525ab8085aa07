//! The RFC 5780 §4 discovery run as a sans-IO state machine.
//!
//! Sockets (the caller binds them all on the same local IP and tells us
//! their addresses):
//! - socket 0 runs the mapping tests (§4.3) and the hairpin test (§4.5);
//! - socket 1 runs the filtering tests (§4.4). It only ever sends to the
//!   server's primary address, so no test of socket 0 can open its filter;
//! - sockets 2.. each create one more mapping, to learn the allocation
//!   pattern;
//! - with `--lifetime`, one socket per probed interval (§4.6 style: the
//!   check is a RESPONSE-PORT request from socket 1 aimed at the mapping).
//!
//! Every request that creates a mapping runs strictly one after the other,
//! so the observed ports are in creation order, which sequential-allocation
//! detection needs. Filtering, hairpin and lifetime tests create no
//! mappings and run concurrently after that.
//!
//! **Quick mode** ([`DiscoveryConfig::quick`]) is what a peer runs while it
//! connects: the facts the punching ladder needs arrive as [`Fact`]s as
//! soon as they are measured, in about two round trips instead of seconds.
//! Every socket's first request leaves at once (the NAT creates their
//! mappings in send order; a sample whose answer took much longer than the
//! rest was probably retransmitted, so out of order, and is left out of
//! the allocation verdict). Tests II and III follow test I's answer
//! together. The filtering tests' RTO comes from the measured round trip
//! (RFC 8489 §6.2.1 lets a client base it on an RTT estimate), so a
//! filtering verdict takes about ten round trips, not 3.75 s. No hairpin
//! or lifetime test. `natpunch nat` keeps the careful mode.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::allocation;
use super::report::{AllocationKind, Behaviour, Classic, Lifetime, MappingSample, NatReport};
use crate::stun::message::{Attribute, Class, Message, TransactionId};
use crate::stun::transaction::{Client, Event, Outcome, Timing, Transmit};
use crate::SocketId;

/// Default number of extra sockets for the allocation pattern. With the
/// three mapping-test destinations that gives 5 to 8 new mappings, enough
/// for a delta to repeat 4+ times.
pub const DEFAULT_ALLOCATION_SOCKETS: usize = 6;

/// Quick mode: an allocation sample whose answer took more than this many
/// times the fastest one was probably retransmitted, so its mapping may
/// have been created out of order; it is left out of the verdict.
pub const QUICK_SLOW_SAMPLE: u32 = 2;
/// Quick mode's filtering-test RTO: twice the measured round trip plus
/// 20 ms of scheduling slack, within these bounds (the lower one still
/// covers loopback jitter, the upper one is the RFC's default initial
/// RTO). Four sends, then three RTOs of waiting: ten RTOs in all.
/// Quick mode's hedge: the mapping tests' second copy follows the first
/// after this, so one lost datagram (not a burst) costs 10 ms.
pub const QUICK_HEDGE: Duration = Duration::from_millis(10);
pub const QUICK_MIN_RTO: Duration = Duration::from_millis(50);
pub const QUICK_MAX_RTO: Duration = Duration::from_millis(500);

/// A fact about our NAT, reported in quick mode as soon as it is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fact {
    /// Mapping behaviour and port allocation, and the newest mapping the
    /// NAT made for us (a fresh mapping for port prediction).
    Mapping {
        nat: Option<bool>,
        mapping: Option<Behaviour>,
        allocation: Option<AllocationKind>,
        delta: Option<i32>,
        latest: Option<SocketAddr>,
        /// The round trip to the STUN server.
        rtt: Option<Duration>,
    },
    Filtering {
        filtering: Option<Behaviour>,
    },
    /// The limited TTL that opens our NAT(s) (measured outside this
    /// machine, by hop discovery).
    OpenerTtl {
        ttl: Option<u8>,
    },
    /// The STUN server never answered: UDP blocked, or the server is down.
    Unreachable,
}

/// Intervals probed by `--lifetime`. Spans RFC 4787 REQ-5's 2-minute
/// minimum and the 30 s that many home routers use, up to 5 minutes.
pub const LIFETIME_STEPS: [Duration; 8] = [
    Duration::from_secs(10),
    Duration::from_secs(20),
    Duration::from_secs(30),
    Duration::from_secs(45),
    Duration::from_secs(60),
    Duration::from_secs(120),
    Duration::from_secs(180),
    Duration::from_secs(300),
];

/// What to measure.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// The server's primary address.
    pub server: SocketAddr,
    /// Extra sockets used for the allocation pattern.
    pub allocation_sockets: usize,
    /// Probe the binding lifetime at these intervals (empty: skip).
    pub lifetime_steps: Vec<Duration>,
    pub timing: Timing,
    /// Seed for transaction IDs, so runs can be replayed.
    pub seed: u64,
    /// Quick mode (see the module documentation).
    pub quick: bool,
}

impl DiscoveryConfig {
    pub fn new(server: SocketAddr, seed: u64) -> Self {
        Self {
            server,
            allocation_sockets: DEFAULT_ALLOCATION_SOCKETS,
            lifetime_steps: Vec::new(),
            timing: Timing::probe(),
            seed,
            quick: false,
        }
    }

    /// How many sockets the caller must bind.
    pub fn socket_count(&self) -> usize {
        2 + self.allocation_sockets + self.lifetime_steps.len()
    }

    fn lifetime_socket(&self, i: usize) -> SocketId {
        SocketId(2 + self.allocation_sockets + i)
    }
}

/// What a pending transaction is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A step of the serial mapping chain.
    Chain(usize),
    /// Filtering test II (change IP and port) or III (change port).
    Filter {
        change_ip: bool,
    },
    Hairpin,
    /// Creating the mapping of lifetime socket i.
    LifetimeOpen(usize),
    /// Checking lifetime socket i.
    LifetimeCheck(usize),
    /// Quick mode: a mapping-creating request, by creation index.
    Quick(usize),
}

/// One step of the serial chain.
#[derive(Debug, Clone, Copy)]
struct ChainStep {
    socket: SocketId,
    destination: SocketAddr,
}

/// The discovery machine.
#[derive(Debug)]
pub struct Discovery {
    config: DiscoveryConfig,
    locals: Vec<SocketAddr>,
    client: Client,
    rng: StdRng,
    purposes: Vec<(TransactionId, Purpose)>,
    chain: Vec<ChainStep>,
    chain_next: usize,
    started: bool,
    // Results.
    mapped: [Option<SocketAddr>; 3],
    first_rtt: Option<Duration>,
    /// The shortest round trip of a request answered on its first send.
    best_rtt: Option<Duration>,
    other: Option<SocketAddr>,
    filter_ip_port: Option<bool>,
    filter_port: Option<bool>,
    filter_pending: usize,
    hairpin: Option<bool>,
    hairpin_tid: Option<TransactionId>,
    samples: Vec<MappingSample>,
    lifetime_mapped: Vec<Option<SocketAddr>>,
    lifetime_opened_at: Vec<Option<Instant>>,
    lifetime_alive: Vec<Option<bool>>,
    notes: Vec<String>,
    report: Option<NatReport>,
    done: bool,
    quick: Quick,
    facts: std::collections::VecDeque<Fact>,
}

/// Quick mode's bookkeeping.
#[derive(Debug, Default)]
struct Quick {
    /// Samples by creation index, with their round trips.
    samples: Vec<Option<(MappingSample, Duration)>>,
    /// Requests by creation index not finished yet.
    outstanding: usize,
    /// Which requests (by creation index) have finished.
    resolved: Vec<bool>,
    /// When the first requests went out.
    started: Option<Instant>,
    /// Unanswered allocation samples are too late to count (see
    /// [`QUICK_SLOW_SAMPLE`]), so the pattern need not wait for them.
    allocation_cutoff_passed: bool,
    mapping_reported: bool,
    filtering_reported: bool,
    filter_started: bool,
}

impl Discovery {
    /// `locals[i]` is the bound address of socket `i`; there must be
    /// [`DiscoveryConfig::socket_count`] of them.
    pub fn new(config: DiscoveryConfig, locals: Vec<SocketAddr>) -> Self {
        let n_life = config.lifetime_steps.len();
        Self {
            rng: StdRng::seed_from_u64(config.seed),
            config,
            locals,
            client: Client::new(),
            purposes: Vec::new(),
            chain: Vec::new(),
            chain_next: 0,
            started: false,
            mapped: [None; 3],
            first_rtt: None,
            best_rtt: None,
            other: None,
            filter_ip_port: None,
            filter_port: None,
            filter_pending: 0,
            hairpin: None,
            hairpin_tid: None,
            samples: Vec::new(),
            lifetime_mapped: vec![None; n_life],
            lifetime_opened_at: vec![None; n_life],
            lifetime_alive: vec![None; n_life],
            notes: Vec::new(),
            report: None,
            done: false,
            quick: Quick::default(),
            facts: std::collections::VecDeque::new(),
        }
    }

    fn tid(&mut self) -> TransactionId {
        let mut id = [0u8; 12];
        self.rng.fill_bytes(&mut id);
        TransactionId::new(id)
    }

    fn send(
        &mut self,
        now: Instant,
        socket: SocketId,
        destination: SocketAddr,
        purpose: Purpose,
        extra: Option<Attribute>,
    ) -> TransactionId {
        let tid = self.tid();
        let mut req = Message::binding_request(tid);
        req.attributes.extend(extra);
        // Quick mode's mapping tests (I, II, III) decide the first fact a
        // connect waits for: a lost one should cost milliseconds, not an RTO.
        let base = 2 + self.config.allocation_sockets;
        let timing = match purpose {
            Purpose::Quick(i) if i == 0 || i >= base => self.config.timing.hedged(QUICK_HEDGE),
            _ => self.config.timing,
        };
        self.client
            .start(now, socket, destination, &req, timing, false);
        self.purposes.push((tid, purpose));
        tid
    }

    /// Starts the run. Calling it again does nothing.
    pub fn start(&mut self, now: Instant) {
        if self.started {
            return;
        }
        self.started = true;
        if self.locals.len() < self.config.socket_count() {
            self.notes.push(format!(
                "needs {} sockets, got {}",
                self.config.socket_count(),
                self.locals.len()
            ));
            self.finish();
            return;
        }
        if self.config.quick {
            self.quick_start(now);
            return;
        }
        let server = self.config.server;
        self.chain.push(ChainStep {
            socket: SocketId(0),
            destination: server,
        });
        self.chain.push(ChainStep {
            socket: SocketId(1),
            destination: server,
        });
        self.next_chain_step(now);
    }

    fn next_chain_step(&mut self, now: Instant) {
        if let Some(step) = self.chain.get(self.chain_next).copied() {
            let i = self.chain_next;
            self.send(now, step.socket, step.destination, Purpose::Chain(i), None);
        } else {
            self.after_chain(now);
        }
    }

    /// Called when the chain step `i` ended with `mapped` (or no answer).
    fn chain_done(
        &mut self,
        now: Instant,
        i: usize,
        mapped: Option<SocketAddr>,
        resp: Option<&Message>,
        rtt: Duration,
    ) {
        let step = self.chain[i];
        if let Some(m) = mapped {
            self.samples.push(MappingSample {
                local: self.locals[step.socket.0],
                destination: step.destination,
                mapped: m,
            });
        }
        match i {
            0 => {
                self.mapped[0] = mapped;
                self.first_rtt = resp.is_some().then_some(rtt);
                let Some(resp) = resp else {
                    // UDP blocked (or server down): nothing else can work.
                    self.notes
                        .push("no answer from the server: UDP blocked or server down".into());
                    self.finish();
                    return;
                };
                self.other = resp.other_address();
                let server = self.config.server;
                match self.other {
                    Some(o) if o.ip() != server.ip() && o.port() != server.port() => {
                        // Mapping tests II and III.
                        self.chain.push(ChainStep {
                            socket: SocketId(0),
                            destination: SocketAddr::new(o.ip(), server.port()),
                        });
                        self.chain.push(ChainStep {
                            socket: SocketId(0),
                            destination: o,
                        });
                    }
                    Some(_) => {
                        self.notes.push(
                            "server's OTHER-ADDRESS does not differ in both IP and port".into(),
                        );
                        self.other = None;
                    }
                    None => self.notes.push(
                        "server has no OTHER-ADDRESS (not RFC 5780): mapping and filtering not measured"
                            .into(),
                    ),
                }
                for k in 0..self.config.allocation_sockets {
                    self.chain.push(ChainStep {
                        socket: SocketId(2 + k),
                        destination: server,
                    });
                }
            }
            1 if mapped.is_some() && self.other.is_some() => {
                let server = self.config.server;
                for change_ip in [true, false] {
                    let cr = Attribute::ChangeRequest {
                        change_ip,
                        change_port: true,
                    };
                    self.send(
                        now,
                        SocketId(1),
                        server,
                        Purpose::Filter { change_ip },
                        Some(cr),
                    );
                    self.filter_pending += 1;
                }
            }
            2 => self.mapped[1] = mapped,
            3 => self.mapped[2] = mapped,
            _ => {}
        }
        self.chain_next += 1;
        self.next_chain_step(now);
    }

    fn after_chain(&mut self, now: Instant) {
        // Hairpin: socket 0 sends a request to its own mapped address.
        if let Some(m0) = self.mapped[0] {
            let tid = self.send(now, SocketId(0), m0, Purpose::Hairpin, None);
            self.hairpin_tid = Some(tid);
        }
        let server = self.config.server;
        for i in 0..self.config.lifetime_steps.len() {
            let s = self.config.lifetime_socket(i);
            self.send(now, s, server, Purpose::LifetimeOpen(i), None);
        }
        self.maybe_finish();
    }

    /// Offers a datagram received on `socket` from `from`. Returns `true`
    /// if it belonged to the discovery run.
    pub fn handle_input(
        &mut self,
        now: Instant,
        socket: SocketId,
        from: SocketAddr,
        data: &[u8],
    ) -> bool {
        let Ok(msg) = Message::decode(data) else {
            return false;
        };
        if msg.class == Class::Request && Some(msg.transaction) == self.hairpin_tid {
            // Our own hairpin request came back through the NAT.
            self.client.cancel(&msg.transaction);
            self.purposes.retain(|(t, _)| *t != msg.transaction);
            self.hairpin = Some(true);
            self.hairpin_tid = None;
            self.maybe_finish();
            return true;
        }
        let ours = self.client.handle_message(now, socket, from, msg);
        self.drain_events(now);
        ours
    }

    /// Advances timers. A spurious call is a no-op.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.client.handle_timeout(now);
        self.drain_events(now);
        if self.config.quick
            && !self.quick.mapping_reported
            && self.allocation_cutoff().is_some_and(|c| now >= c)
        {
            self.quick.allocation_cutoff_passed = true;
            self.maybe_finish();
        }
        // Lifetime checks fire on their own schedule.
        for i in 0..self.config.lifetime_steps.len() {
            let (Some(opened), Some(m), None) = (
                self.lifetime_opened_at[i],
                self.lifetime_mapped[i],
                self.lifetime_alive[i],
            ) else {
                continue;
            };
            let due = opened + self.config.lifetime_steps[i];
            if now >= due && !self.lifetime_checking(i) {
                let server = self.config.server;
                let rp = Attribute::ResponsePort(m.port());
                self.send(
                    now,
                    SocketId(1),
                    server,
                    Purpose::LifetimeCheck(i),
                    Some(rp),
                );
            }
        }
    }

    fn lifetime_checking(&self, i: usize) -> bool {
        self.purposes
            .iter()
            .any(|(_, p)| *p == Purpose::LifetimeCheck(i))
    }

    fn drain_events(&mut self, now: Instant) {
        while let Some(ev) = self.client.poll_event() {
            let Some(idx) = self.purposes.iter().position(|(t, _)| *t == ev.transaction) else {
                continue;
            };
            let (_, purpose) = self.purposes.swap_remove(idx);
            self.on_event(now, purpose, ev);
        }
    }

    fn on_event(&mut self, now: Instant, purpose: Purpose, ev: Event) {
        if ev.sends == 1 && matches!(ev.outcome, Outcome::Success { .. }) {
            self.best_rtt = Some(self.best_rtt.map_or(ev.rtt, |b| b.min(ev.rtt)));
        }
        let (mapped, resp) = match &ev.outcome {
            Outcome::Success { response, .. } => (response.mapped_address(), Some(response)),
            Outcome::Error { code, .. } => {
                self.notes
                    .push(format!("server answered error {}", code.unwrap_or(0)));
                (None, None)
            }
            Outcome::Timeout => (None, None),
        };
        match purpose {
            Purpose::Chain(i) => {
                let resp = resp.cloned();
                self.chain_done(now, i, mapped, resp.as_ref(), ev.rtt);
            }
            Purpose::Quick(i) => {
                let resp = resp.cloned();
                self.quick_done(now, i, mapped, resp.as_ref(), ev.rtt);
            }
            Purpose::Filter { change_ip } => {
                let answered = matches!(ev.outcome, Outcome::Success { .. });
                if change_ip {
                    self.filter_ip_port = Some(answered);
                } else {
                    self.filter_port = Some(answered);
                }
                self.filter_pending -= 1;
            }
            Purpose::Hairpin => {
                // Timed out (or, oddly, answered by someone): not hairpinned.
                self.hairpin.get_or_insert(false);
                self.hairpin_tid = None;
            }
            Purpose::LifetimeOpen(i) => {
                self.lifetime_mapped[i] = mapped;
                self.lifetime_opened_at[i] = Some(now);
                if mapped.is_none() {
                    self.lifetime_alive[i] = Some(false);
                }
            }
            Purpose::LifetimeCheck(i) => {
                let alive = ev.received_on == Some(self.config.lifetime_socket(i))
                    && matches!(ev.outcome, Outcome::Success { .. });
                self.lifetime_alive[i] = Some(alive);
            }
        }
        self.maybe_finish();
    }

    fn maybe_finish(&mut self) {
        if self.config.quick {
            self.quick_progress();
        }
        // `purposes` empties only once every transaction's event has been
        // handled, even when several end at the same instant.
        if self.done || self.chain_next < self.chain.len() || !self.purposes.is_empty() {
            return;
        }
        let lifetime_waiting = self
            .lifetime_alive
            .iter()
            .zip(&self.lifetime_mapped)
            .any(|(a, m)| a.is_none() && m.is_some());
        if lifetime_waiting || self.filter_pending > 0 {
            return;
        }
        self.finish();
    }

    fn finish(&mut self) {
        self.done = true;
        let allocation = if self.config.quick {
            self.samples = self
                .quick
                .samples
                .iter()
                .flatten()
                .map(|(s, _)| s.clone())
                .collect();
            allocation::classify(&self.quick_ordered())
        } else {
            allocation::classify(&self.samples)
        };
        let mapping = match (self.other, self.mapped) {
            (Some(_), [Some(m1), Some(m2), m3]) => Some(if m1 == m2 {
                Behaviour::EndpointIndependent
            } else if Some(m2) == m3 {
                Behaviour::AddressDependent
            } else {
                Behaviour::AddressAndPortDependent
            }),
            (Some(_), _) => {
                self.notes
                    .push("no answer from the server's other address: mapping unknown".into());
                None
            }
            _ => None,
        };
        let filtering = match (self.filter_ip_port, self.filter_port) {
            (Some(true), _) => Some(Behaviour::EndpointIndependent),
            (Some(false), Some(true)) => Some(Behaviour::AddressDependent),
            (Some(false), Some(false)) => Some(Behaviour::AddressAndPortDependent),
            _ => None,
        };
        if self.hairpin == Some(false)
            && matches!(mapping, Some(m) if m != Behaviour::EndpointIndependent)
            && matches!(filtering, Some(f) if f != Behaviour::EndpointIndependent)
        {
            // The hairpinned request left through a new mapping (the NAT is
            // not EIM), and the target mapping's filter only admits the
            // server, so a missing packet says nothing about hairpinning.
            self.hairpin = None;
            self.notes.push(
                "hairpinning untestable: a non-EIM mapping with filtering drops the test either way"
                    .into(),
            );
        }
        let local = self.locals.first().copied().unwrap_or(self.config.server);
        let nat = self.mapped[0].map(|m| m != local);
        let lifetime = (!self.config.lifetime_steps.is_empty()).then(|| {
            let steps = &self.config.lifetime_steps;
            let alive = (0..steps.len())
                .filter(|i| self.lifetime_alive[*i] == Some(true))
                .map(|i| steps[i])
                .max();
            let expired = (0..steps.len())
                .filter(|i| {
                    self.lifetime_alive[*i] == Some(false) && self.lifetime_mapped[*i].is_some()
                })
                .map(|i| steps[i])
                .min();
            Lifetime { alive, expired }
        });
        self.report = Some(NatReport {
            mapped: self.mapped[0],
            mapping,
            filtering,
            allocation,
            hairpin: self.hairpin,
            classic: Classic::derive(nat, mapping, filtering),
            local,
            server: self.config.server,
            other_address: self.other,
            nat,
            lifetime,
            // Karn's rule: an answer after a retransmission does not say
            // how long the path takes; the first answer stands in only when
            // no request was answered on its first send.
            rtt_ms: self
                .best_rtt
                .or(self.first_rtt)
                .map(|d| d.as_millis() as u64),
            samples: std::mem::take(&mut self.samples),
            notes: std::mem::take(&mut self.notes),
        });
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.client.poll_transmit()
    }

    /// Quick mode: the next fact measured.
    pub fn poll_fact(&mut self) -> Option<Fact> {
        self.facts.pop_front()
    }

    /// Quick mode: every socket's first request at once; creation index i
    /// is socket i's request to the primary address.
    fn quick_start(&mut self, now: Instant) {
        let n = 2 + self.config.allocation_sockets;
        self.quick.samples = vec![None; n];
        self.quick.resolved = vec![false; n];
        self.quick.outstanding = n;
        self.quick.started = Some(now);
        let server = self.config.server;
        for i in 0..n {
            self.send(now, SocketId(i), server, Purpose::Quick(i), None);
        }
    }

    fn quick_done(
        &mut self,
        now: Instant,
        i: usize,
        mapped: Option<SocketAddr>,
        resp: Option<&Message>,
        rtt: Duration,
    ) {
        self.quick.outstanding = self.quick.outstanding.saturating_sub(1);
        if let Some(r) = self.quick.resolved.get_mut(i) {
            *r = true;
        }
        let socket = match i {
            // Tests II and III go from socket 0.
            i if i >= 2 + self.config.allocation_sockets => 0,
            i => i,
        };
        let destination = match (i, self.other) {
            (i, Some(o)) if i == 2 + self.config.allocation_sockets => {
                SocketAddr::new(o.ip(), self.config.server.port())
            }
            (i, Some(o)) if i == 3 + self.config.allocation_sockets => o,
            _ => self.config.server,
        };
        if let (Some(m), Some(slot)) = (mapped, self.quick.samples.get_mut(i)) {
            *slot = Some((
                MappingSample {
                    local: self.locals[socket],
                    destination,
                    mapped: m,
                },
                rtt,
            ));
        }
        if i == 0 {
            self.mapped[0] = mapped;
            self.first_rtt = resp.is_some().then_some(rtt);
            match resp {
                None => {
                    self.notes
                        .push("no answer from the server: UDP blocked or server down".into());
                    self.facts.push_back(Fact::Unreachable);
                    self.quick.filtering_reported = true;
                    self.quick.mapping_reported = true;
                    self.finish();
                    return;
                }
                Some(r) => self.other = r.other_address(),
            }
            let server = self.config.server;
            match self.other {
                Some(o) if o.ip() != server.ip() && o.port() != server.port() => {
                    // Tests II and III together, and the filtering tests
                    // with an RTO from this round trip.
                    let base = 2 + self.config.allocation_sockets;
                    self.quick.samples.resize(base + 2, None);
                    self.quick.resolved.resize(base + 2, false);
                    self.quick.outstanding += 2;
                    let ii = SocketAddr::new(o.ip(), server.port());
                    self.send(now, SocketId(0), ii, Purpose::Quick(base), None);
                    self.send(now, SocketId(0), o, Purpose::Quick(base + 1), None);
                    let rtt = self.round_trip();
                    self.quick_filter(now, rtt);
                }
                Some(_) => {
                    self.notes
                        .push("server's OTHER-ADDRESS does not differ in both IP and port".into());
                    self.other = None;
                }
                None => self.notes.push(
                    "server has no OTHER-ADDRESS (not RFC 5780): mapping and filtering not measured"
                        .into(),
                ),
            }
        }
        if self.other.is_some() {
            let base = 2 + self.config.allocation_sockets;
            if i == base {
                self.mapped[1] = mapped;
            } else if i == base + 1 {
                self.mapped[2] = mapped;
            }
        }
        self.maybe_finish();
    }

    /// The round trip from the samples so far, by Karn's rule: only an
    /// answer that came before the first retransmission measures it (a
    /// later one may answer the retransmission). Without one, the
    /// configured RTO bounds it.
    fn round_trip(&self) -> Duration {
        let rto = self.config.timing.rto;
        self.quick
            .samples
            .iter()
            .flatten()
            .map(|(_, rtt)| *rtt)
            .filter(|rtt| *rtt < rto)
            .min()
            .unwrap_or(rto)
    }

    fn quick_filter(&mut self, now: Instant, rtt: Duration) {
        if self.quick.filter_started {
            return;
        }
        self.quick.filter_started = true;
        let rto = (rtt * 2 + Duration::from_millis(20)).clamp(QUICK_MIN_RTO, QUICK_MAX_RTO);
        let timing = Timing {
            rto,
            rc: 4,
            rm: 3,
            ti: self.config.timing.ti,
            hedge: None,
        };
        let server = self.config.server;
        for change_ip in [true, false] {
            let cr = Attribute::ChangeRequest {
                change_ip,
                change_port: true,
            };
            let tid = self.tid();
            let mut req = Message::binding_request(tid);
            req.attributes.push(cr);
            self.client
                .start(now, SocketId(1), server, &req, timing, false);
            self.purposes.push((tid, Purpose::Filter { change_ip }));
            self.filter_pending += 1;
        }
    }

    /// The fastest answer among the quick samples so far.
    fn quick_fastest(&self) -> Option<Duration> {
        self.quick
            .samples
            .iter()
            .flatten()
            .map(|(_, rtt)| *rtt)
            .min()
    }

    /// When an allocation sample still unanswered is too slow to be used:
    /// the verdict keeps only answers within [`QUICK_SLOW_SAMPLE`] times
    /// the fastest (plus 5 ms), so waiting past that changes nothing.
    fn allocation_cutoff(&self) -> Option<Instant> {
        let fastest = self.quick_fastest()?;
        Some(self.quick.started? + fastest * QUICK_SLOW_SAMPLE + Duration::from_millis(5))
    }

    /// The allocation samples in creation order, without those answered
    /// so late that their mapping may have been made out of order.
    fn quick_ordered(&self) -> Vec<MappingSample> {
        let fastest = self.quick_fastest().unwrap_or_default();
        self.quick
            .samples
            .iter()
            .flatten()
            .filter(|(_, rtt)| *rtt <= fastest * QUICK_SLOW_SAMPLE + Duration::from_millis(5))
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Whether the mapping fact can be told: the mapping tests are over
    /// and, unless the mapping is endpoint-independent (one mapping, so no
    /// port to predict), the allocation pattern is as known as it will be.
    fn quick_mapping_ready(&self) -> bool {
        if self.quick.outstanding == 0 {
            return true;
        }
        let resolved = |i: usize| self.quick.resolved.get(i).copied().unwrap_or(false);
        let base = 2 + self.config.allocation_sockets;
        let (tests_over, eim) = match (self.other, self.mapped) {
            (None, _) => (resolved(0), false),
            (Some(_), [Some(m1), Some(m2), _]) if m1 == m2 => (true, true),
            (Some(_), _) => (resolved(0) && resolved(base) && resolved(base + 1), false),
        };
        let allocation_over = self.quick.allocation_cutoff_passed || (1..base).all(resolved);
        tests_over && (eim || allocation_over)
    }

    /// Reports what quick mode has measured, once each.
    fn quick_progress(&mut self) {
        if !self.quick.mapping_reported
            && self.quick.started.is_some()
            && self.quick_mapping_ready()
        {
            self.quick.mapping_reported = true;
            let mapping = match (self.other, self.mapped) {
                (Some(_), [Some(m1), Some(m2), m3]) => Some(if m1 == m2 {
                    Behaviour::EndpointIndependent
                } else if Some(m2) == m3 {
                    Behaviour::AddressDependent
                } else {
                    Behaviour::AddressAndPortDependent
                }),
                _ => None,
            };
            let allocation = super::allocation::classify(&self.quick_ordered());
            // The newest mapping the NAT made (a reused one, as tests II and
            // III get through an endpoint-independent NAT, is not new).
            let mut seen: Vec<(SocketAddr, SocketAddr)> = Vec::new();
            let mut latest = None;
            for (s, _) in self.quick.samples.iter().flatten() {
                if !seen.contains(&(s.local, s.mapped)) {
                    seen.push((s.local, s.mapped));
                    latest = Some(s.mapped);
                }
            }
            let local = self.locals.first().copied();
            let nat = self.mapped[0].zip(local).map(|(m, l)| m != l);
            let rtt = self.round_trip();
            self.facts.push_back(Fact::Mapping {
                nat,
                mapping,
                allocation: allocation.kind,
                delta: allocation.delta,
                latest,
                rtt: Some(rtt),
            });
            if self.other.is_none() {
                // No RFC 5780 server: filtering cannot be measured either.
                self.quick.filtering_reported = true;
                self.facts.push_back(Fact::Filtering { filtering: None });
            }
        }
        if !self.quick.filtering_reported && self.quick.filter_started && self.filter_pending == 0 {
            self.quick.filtering_reported = true;
            let filtering = match (self.filter_ip_port, self.filter_port) {
                (Some(true), _) => Some(Behaviour::EndpointIndependent),
                (Some(false), Some(true)) => Some(Behaviour::AddressDependent),
                (Some(false), Some(false)) => Some(Behaviour::AddressAndPortDependent),
                _ => None,
            };
            self.facts.push_back(Fact::Filtering { filtering });
        }
    }

    /// The next instant to call [`Discovery::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.done {
            return None;
        }
        let life = (0..self.config.lifetime_steps.len())
            .filter(|i| self.lifetime_alive[*i].is_none() && !self.lifetime_checking(*i))
            .filter_map(|i| Some(self.lifetime_opened_at[i]? + self.config.lifetime_steps[i]))
            .min();
        let cutoff = (self.config.quick
            && !self.quick.mapping_reported
            && !self.quick.allocation_cutoff_passed)
            .then(|| self.allocation_cutoff())
            .flatten();
        [self.client.poll_timeout(), life, cutoff]
            .into_iter()
            .flatten()
            .min()
    }

    /// The report, once the run is over (taken once).
    pub fn poll_report(&mut self) -> Option<NatReport> {
        self.report.take()
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Bytes sent so far (requests and retransmits).
    pub fn bytes_sent(&self) -> u64 {
        self.client.stats().bytes_sent
    }
}
