//! Per-source token buckets with a bounded table, sans-IO.
//!
//! Used by every server machine so that it cannot be turned into a
//! reflector: each source IP gets `burst` packets and then `rate` per
//! second. The table holds at most `max_sources` entries; when full, the
//! entry idle the longest is evicted, so memory stays bounded whatever the
//! number of (possibly spoofed) sources.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Token-bucket parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained packets per second per source.
    pub rate: f64,
    /// Packets a source may send at once.
    pub burst: f64,
    /// Sources tracked at most (memory bound).
    pub max_sources: usize,
}

impl RateLimit {
    /// No limit at all (benchmarks on loopback).
    pub fn unlimited() -> Self {
        Self {
            rate: f64::INFINITY,
            burst: f64::INFINITY,
            max_sources: 0,
        }
    }

    fn is_unlimited(&self) -> bool {
        self.rate.is_infinite()
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// A table of buckets keyed by source IP (or any other key, such as a
/// peer ID).
#[derive(Debug)]
pub struct RateLimiter<K = IpAddr> {
    limit: RateLimit,
    buckets: HashMap<K, Bucket>,
}

impl<K: Hash + Eq + Copy> RateLimiter<K> {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: HashMap::new(),
        }
    }

    /// Takes one token for `source`; `false` means drop the packet.
    pub fn allow(&mut self, now: Instant, source: K) -> bool {
        self.allow_n(now, source, 1.0)
    }

    /// Takes `cost` tokens for `source` (a byte bucket takes a packet's
    /// length); `false` means drop the packet.
    pub fn allow_n(&mut self, now: Instant, source: K, cost: f64) -> bool {
        if self.limit.is_unlimited() {
            return true;
        }
        if !self.buckets.contains_key(&source) && self.buckets.len() >= self.limit.max_sources {
            self.evict(now);
        }
        let limit = self.limit;
        let b = self.buckets.entry(source).or_insert(Bucket {
            tokens: limit.burst,
            last: now,
        });
        let elapsed = now
            .checked_duration_since(b.last)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        b.tokens = (b.tokens + elapsed * limit.rate).min(limit.burst);
        b.last = now.max(b.last);
        if b.tokens >= cost {
            b.tokens -= cost;
            true
        } else {
            false
        }
    }

    /// How long until `source` has a token again (zero if it has one now).
    pub fn retry_after(&self, now: Instant, source: K) -> Duration {
        let Some(b) = self.buckets.get(&source) else {
            return Duration::ZERO;
        };
        if self.limit.is_unlimited() || self.limit.rate <= 0.0 {
            return Duration::ZERO;
        }
        let elapsed = now
            .checked_duration_since(b.last)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        let missing = 1.0 - (b.tokens + elapsed * self.limit.rate);
        if missing <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(missing / self.limit.rate)
        }
    }

    /// Drops full buckets (sources that are idle long enough to be back at
    /// their burst), or if none are full, the one idle the longest.
    fn evict(&mut self, now: Instant) {
        let limit = self.limit;
        let before = self.buckets.len();
        self.buckets.retain(|_, b| {
            let idle = now.checked_duration_since(b.last).unwrap_or(Duration::ZERO);
            b.tokens + idle.as_secs_f64() * limit.rate < limit.burst
        });
        if self.buckets.len() == before {
            if let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.last)
                .map(|(k, _)| *k)
            {
                self.buckets.remove(&oldest);
            }
        }
    }

    /// Sources currently tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(RateLimit {
            rate: 10.0,
            burst: 5.0,
            max_sources: 4,
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!((0..10).filter(|_| r.allow(t0, ip)).count(), 5);
        // 100 ms later one more token has accrued.
        let t1 = t0 + Duration::from_millis(100);
        assert!(r.allow(t1, ip));
        assert!(!r.allow(t1, ip));
        // The next token is 100 ms away.
        let wait = r.retry_after(t1, ip);
        assert!(wait > Duration::from_millis(99) && wait <= Duration::from_millis(100));
        assert_eq!(r.retry_after(t1 + wait, ip), Duration::ZERO);
    }

    #[test]
    fn table_is_bounded() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(RateLimit {
            rate: 1.0,
            burst: 2.0,
            max_sources: 16,
        });
        for i in 0..1000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            r.allow(t0 + Duration::from_millis(i as u64), ip);
            assert!(r.tracked() <= 16);
        }
    }
}
