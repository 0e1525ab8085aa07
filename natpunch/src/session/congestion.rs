//! Congestion control for sessions: quinn's BBR, with the data in flight
//! held near the path's bandwidth-delay product once the bandwidth is
//! known.
//!
//! Why BBR: on a path with random loss, loss-based control (quinn's
//! default CUBIC) reads each loss as congestion; at 1 % loss and a 100 ms
//! RTT it moved 36 MB in 120 s (2.4 Mbit/s) in `natpunch bench session`,
//! where BBR, which models the path's rate and RTT, kept 518 Mbit/s.
//!
//! Why the cap: quinn's BBR keeps up to twice the BDP in flight, and
//! quinn paces from the window, not from BBR's rate, so the extra BDP
//! waits in the bottleneck's queue. A keystroke behind a bulk transfer then
//! waits a whole RTT more (p99 2 × RTT, measured at 1 Gbit/s × 100 ms).
//! [`LowQueue`] measures the delivery rate itself (bytes acknowledged per
//! minimum RTT, a windowed maximum as BBR keeps it) and watches for a
//! standing queue: a round (one minimum RTT) in which even the smallest
//! RTT sample exceeds the path's minimum by a tenth (CoDel's test: a
//! queue that never empties within an interval). From the first one on,
//! it caps the window at [`defaults::CAP_GAIN`] × rate × min RTT, which
//! drains the queue and keeps it small. Before it, BBR's startup runs
//! unslowed; after it, the rate can still grow by the cap's margin each
//! round when the path frees up. A queue that stands for
//! [`defaults::STALE_ROUNDS`] rounds under the cap means the path's base
//! RTT grew (the session moved to a longer path, or a competing flow
//! keeps the queue full): the minimum is then re-learned, so the cap
//! never starves the session.
//!
//! The window never falls below the measured BDP either ([`QueueGuard`]'s
//! `bdp`): quinn's BBR answers random loss with packet conservation.
//!
//! Under the cap, the window is also at least what CUBIC (fed the same
//! events) would allow: quinn's BBR leaves startup on its first loss and
//! then grows by a quarter per probe cycle, which made a 16 MiB transfer
//! on a sub-millisecond path take 0.27 s (489 Mbit/s) where CUBIC took
//! 0.11 s (1177 Mbit/s, `natpunch demo`). Random loss keeps CUBIC's window
//! small, so there BBR's governs; CUBIC's slow start overshooting into a
//! queue is what the cap catches.
//!
//! The controller is written here because quinn offers no BBR setting for
//! the window gain, and no crate offers one for quinn.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics, CubicConfig};
use quinn_proto::RttEstimator;

/// Tunables, each with its reason.
pub mod defaults {
    use std::time::Duration;

    /// Window cap as a multiple of rate × min RTT: 1.1. The standing
    /// queue is then at most a tenth of the RTT; at 1.5 the median
    /// keystroke behind a bulk transfer waited half an RTT more (153 ms at
    /// a 102 ms RTT, 200 Mbit/s), at 1.25 a quarter (measured, bench
    /// session), at 1.1 with no loss of throughput (0.98–0.99 × kernel
    /// TCP at 1 Gbit/s, 100 ms RTT).
    pub const CAP_GAIN: f64 = 1.1;

    /// A standing queue: a round's smallest RTT sample above the minimum
    /// by a tenth of it (at least [`QUEUE_FLOOR`]), the margin the cap
    /// allows. Without this test BBR's startup ran the queue up to ~1.9
    /// BDP (p99 keystroke +209 ms at a 100 ms RTT, measured).
    pub const QUEUE_FRACTION: f64 = 0.1;
    /// The least queue that counts, and the least the cap allows: 4 ms.
    /// On a LAN (RTT ~0.1 ms) a tenth of the RTT is below the jitter of
    /// a busy host's scheduler, and a cap of 1.1 × rate × RTT would leave
    /// no room for it; 4 ms of queue is not felt by a typist.
    pub const QUEUE_FLOOR: Duration = Duration::from_millis(4);

    /// Rounds a queue may stand under the cap before the minimum RTT is
    /// taken as stale: 8, BBR's ProbeBW cycle; a cap of 1.1 × BDP drains a
    /// queue it caused within a round or two.
    pub const STALE_ROUNDS: u32 = 8;

    /// Rounds over which the delivery rate's maximum is kept: 10 (BBR's
    /// BtlBw filter length).
    pub const RATE_WINDOW: usize = 10;

    /// A minimum RTT older than this is replaced by the next sample: 10 s
    /// (BBR's min_rtt filter), so a session that moves to a longer path
    /// (direct to relay) stops using the shorter path's RTT.
    pub const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
}

/// Builds [`LowQueue`] controllers around quinn's BBR.
#[derive(Debug, Default)]
pub struct LowQueueFactory {
    bbr: Arc<BbrConfig>,
    cubic: Arc<CubicConfig>,
}

impl ControllerFactory for LowQueueFactory {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(LowQueue {
            inner: self.bbr.clone().build(now, current_mtu),
            cubic: self.cubic.clone().build(now, current_mtu),
            guard: QueueGuard::default(),
        })
    }
}

/// BBR with the window capped near the BDP (module doc).
pub struct LowQueue {
    inner: Box<dyn Controller>,
    /// CUBIC on the same events: the window is at least its window
    /// (module doc).
    cubic: Box<dyn Controller>,
    guard: QueueGuard,
}

impl Controller for LowQueue {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
        self.cubic.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.guard.on_ack(now, sent, bytes);
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
        self.cubic.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.guard.on_end_acks(now, app_limited);
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
        self.cubic
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        self.cubic
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
        self.cubic.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        let mut w = self.inner.window().max(self.cubic.window());
        if let Some(bdp) = self.guard.bdp() {
            w = w.max(bdp);
        }
        self.guard
            .cap(self.inner.initial_window())
            .map_or(w, |cap| w.min(cap))
    }

    fn metrics(&self) -> ControllerMetrics {
        // BBR's pacing rate, but the window this controller really grants.
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(LowQueue {
            inner: self.inner.clone_box(),
            cubic: self.cubic.clone_box(),
            guard: self.guard.clone(),
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// The standing-queue test and the cap (module doc). Sans-IO: fed
/// acknowledgements and their times.
#[derive(Debug, Clone, Default)]
struct QueueGuard {
    rate: RateFilter,
    /// (minimum RTT, when it was taken).
    min_rtt: Option<(Duration, Instant)>,
    /// The smallest RTT sample of the round under way.
    round_min: Option<Duration>,
    /// A standing queue was seen: the cap is on.
    capped: bool,
    /// Rounds in a row with a standing queue while capped.
    standing: u32,
}

impl QueueGuard {
    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64) {
        let sample = now.saturating_duration_since(sent);
        self.round_min = Some(self.round_min.map_or(sample, |m| m.min(sample)));
        match self.min_rtt {
            Some((min, at))
                if sample > min && now.saturating_duration_since(at) < defaults::MIN_RTT_WINDOW => {
            }
            _ if !sample.is_zero() => self.min_rtt = Some((sample, now)),
            _ => {}
        }
        self.rate.acked(bytes);
    }

    fn on_end_acks(&mut self, now: Instant, app_limited: bool) {
        let Some((rtt, _)) = self.min_rtt else {
            return;
        };
        if self.rate.end_acks(now, rtt, app_limited) {
            // A round ended: did a queue stand through it?
            let queue = rtt
                .mul_f64(defaults::QUEUE_FRACTION)
                .max(defaults::QUEUE_FLOOR);
            match self.round_min {
                Some(m) if m > rtt + queue => {
                    if self.capped {
                        self.standing += 1;
                    }
                    self.capped = true;
                    if self.standing >= defaults::STALE_ROUNDS {
                        // The cap does not drain it: a longer path.
                        self.min_rtt = Some((m, now));
                        self.standing = 0;
                    }
                }
                _ => self.standing = 0,
            }
            self.round_min = None;
        }
    }

    /// The measured bandwidth-delay product (largest recent delivery rate
    /// × minimum RTT): the window's floor. quinn's BBR answers each loss
    /// with packet conservation (a window of what is in flight), so at 1 %
    /// random loss it spent most rounds below the BDP (553 Mbit/s against
    /// kernel TCP's 581 at a 100 ms RTT, measured); the floor keeps BBR's
    /// own model, rate × RTT, in force. It never exceeds the path: the
    /// rate is what was delivered.
    fn bdp(&self) -> Option<u64> {
        let (rtt, _) = self.min_rtt?;
        let rate = Some(self.rate.max()).filter(|r| *r > 0.0)?;
        Some((rate * rtt.as_secs_f64()) as u64)
    }

    /// The cap, once a standing queue was seen; never below `floor` (the
    /// controller's initial window).
    fn cap(&self, floor: u64) -> Option<u64> {
        if !self.capped {
            return None;
        }
        let (rtt, _) = self.min_rtt?;
        let rate = Some(self.rate.max()).filter(|r| *r > 0.0)?;
        let allowed = rtt
            .mul_f64(defaults::CAP_GAIN)
            .max(rtt + defaults::QUEUE_FLOOR);
        let cap = rate * allowed.as_secs_f64();
        Some((cap as u64).max(floor))
    }
}

/// Delivery rate per round (one minimum RTT) and its windowed maximum.
/// Sans-IO: fed acknowledged bytes and times.
#[derive(Debug, Clone, Default)]
struct RateFilter {
    round_start: Option<Instant>,
    round_bytes: u64,
    /// The last rounds' rates (bytes/s), newest last.
    rounds: std::collections::VecDeque<f64>,
}

impl RateFilter {
    fn acked(&mut self, bytes: u64) {
        self.round_bytes += bytes;
    }

    /// Closes the round when a minimum RTT has passed since it opened;
    /// says whether it did. App-limited rounds only count when they beat
    /// the maximum (they under-measure the path otherwise).
    fn end_acks(&mut self, now: Instant, min_rtt: Duration, app_limited: bool) -> bool {
        let Some(start) = self.round_start else {
            self.round_start = Some(now);
            self.round_bytes = 0;
            return false;
        };
        let took = now.saturating_duration_since(start);
        if took < min_rtt || took.is_zero() {
            return false;
        }
        let rate = self.round_bytes as f64 / took.as_secs_f64();
        self.round_start = Some(now);
        self.round_bytes = 0;
        if app_limited && rate <= self.max() {
            return true;
        }
        self.rounds.push_back(rate);
        while self.rounds.len() > defaults::RATE_WINDOW {
            self.rounds.pop_front();
        }
        true
    }

    /// The largest rate of the last rounds (bytes/s); 0 before any.
    fn max(&self) -> f64 {
        self.rounds.iter().copied().fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(100);

    /// Feeds `rounds` rounds at `rate` bytes/s, acked in 10 batches each.
    fn feed(f: &mut RateFilter, t: &mut Instant, rate: f64, rounds: u32, app_limited: bool) {
        for _ in 0..rounds {
            for _ in 0..10 {
                *t += RTT / 10;
                f.acked((rate * RTT.as_secs_f64() / 10.0) as u64);
                f.end_acks(*t, RTT, app_limited);
            }
        }
    }

    #[test]
    fn the_rate_is_the_windowed_maximum_and_app_limited_rounds_do_not_lower_it() {
        let mut f = RateFilter::default();
        let mut t = Instant::now();
        assert!(!f.end_acks(t, RTT, false));
        feed(&mut f, &mut t, 125e6, 5, false);
        assert!((f.max() - 125e6).abs() / 125e6 < 0.02, "{}", f.max());
        feed(&mut f, &mut t, 1e5, 20, true);
        assert!(f.max() > 120e6, "{}", f.max());
        // Ten full rounds at a lower rate replace the maximum.
        feed(&mut f, &mut t, 50e6, 11, false);
        assert!(f.max() < 55e6, "{}", f.max());
    }

    /// Feeds a guard one RTT per round, `rounds` times, every sample
    /// `rtt` long, 12.5 MB/s acknowledged.
    fn rounds(g: &mut QueueGuard, t: &mut Instant, rtt: Duration, rounds: u32) {
        for _ in 0..rounds {
            for _ in 0..10 {
                *t += RTT / 10;
                let sent = *t - rtt;
                g.on_ack(*t, sent, 125_000);
                g.on_end_acks(*t, false);
            }
        }
    }

    #[test]
    fn a_standing_queue_caps_the_window_near_the_bdp_and_a_longer_path_is_relearned() {
        let mut g = QueueGuard::default();
        let mut t = Instant::now() + Duration::from_secs(1);
        // No queue: BBR's own window.
        rounds(&mut g, &mut t, RTT, 12);
        assert_eq!(g.cap(0), None);
        // Every sample 40 ms late: a standing queue; cap 1.1 × BDP.
        rounds(&mut g, &mut t, RTT + Duration::from_millis(40), 2);
        let cap = g.cap(0).expect("capped");
        let bdp = 12.5e6 * RTT.as_secs_f64();
        assert!(
            (cap as f64) > bdp * 1.05 && (cap as f64) < bdp * 1.2,
            "cap {cap} vs BDP {bdp}"
        );
        assert_eq!(g.cap(u64::MAX), Some(u64::MAX), "never below the floor");
        // A few late samples in a round are noise, not a standing queue.
        let mut quiet = QueueGuard::default();
        rounds(&mut quiet, &mut t, RTT, 3);
        for i in 0..10u32 {
            t += RTT / 10;
            let late = if i % 3 == 0 {
                Duration::from_millis(60)
            } else {
                Duration::ZERO
            };
            quiet.on_ack(t, t - RTT - late, 125_000);
            quiet.on_end_acks(t, false);
        }
        assert_eq!(quiet.cap(0), None);
        // The path's RTT doubled for good (a longer path): the queue
        // "stands" under the cap, and the minimum is re-learned.
        rounds(&mut g, &mut t, RTT * 2, defaults::STALE_ROUNDS + 2);
        let (min, _) = g.min_rtt.expect("min");
        assert!(min >= RTT * 2 - Duration::from_millis(1), "{min:?}");
    }
}
