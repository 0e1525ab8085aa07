//! The relay's sans-IO half of the server: channels, quotas, counters.
//!
//! The rendezvous server opens a channel for each authenticated
//! introduction ([`RelayServer::open`]) and moves a channel's end when
//! that peer proves a new address ([`RelayServer::rebind`]); the driver
//! hands every relay frame to [`RelayServer::handle`], which forwards it
//! to the other end or drops it, counted by cause.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::identity::PeerId;
use crate::ratelimit::{RateLimit, RateLimiter};
use crate::rendezvous::server::Outgoing;

/// A channel nobody sent on (data or keepalive) for this long is closed.
/// Clients send a keepalive every [`KEEPALIVE`] while a session may use
/// it, so four can be lost in a row.
pub const IDLE: Duration = Duration::from_secs(75);
/// A channel the target has not accepted is closed after this long, and
/// keepalives do not extend it: the introduction's own lifetime
/// ([`crate::rendezvous::server::SESSION_TTL`]), so that introductions a
/// target never took cannot fill its share of the table.
pub const UNACCEPTED_TTL: Duration = Duration::from_secs(30);
/// How often a client keeps its channels (and its NAT mapping toward the
/// server) alive: under the 30 s after which many NATs drop an idle UDP
/// mapping (RFC 4787 REQ-5 asks for at least 2 minutes; measured home
/// routers use 30–60 s).
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// Channels held at most (about 200 bytes each).
pub const MAX_CHANNELS: usize = 100_000;
/// Channels one peer may be an end of: a listener with a thousand
/// clients at once, not a peer that hoards the table.
pub const CHANNELS_PER_PEER: usize = 1024;
/// Per sending peer: 1 Gbit/s sustained, 4 MiB at once (a QUIC congestion
/// window on a fast path). A rate, not a total, so long sessions are never
/// cut off; it only stops one peer from taking a whole relay.
pub const PEER_BYTES: RateLimit = RateLimit {
    rate: 125_000_000.0,
    burst: 4_194_304.0,
    max_sources: 200_000,
};
/// Per sending peer: 100 000 packets/s, 4096 at once (about 1 Gbit/s of
/// full-size packets; small packets cost the relay as much CPU as large).
pub const PEER_PACKETS: RateLimit = RateLimit {
    rate: 100_000.0,
    burst: 4096.0,
    max_sources: 200_000,
};

/// The relay's settings.
#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    /// Off: no channels are opened and introductions say so.
    pub enabled: bool,
    pub peer_bytes: RateLimit,
    pub peer_packets: RateLimit,
    pub max_channels: usize,
    pub channels_per_peer: usize,
    /// This node's public relay address, if it names itself (listeners
    /// registered here are homed on it); `None`: peers reach it at the
    /// server's address.
    pub public: Option<SocketAddr>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            peer_bytes: PEER_BYTES,
            peer_packets: PEER_PACKETS,
            max_channels: MAX_CHANNELS,
            channels_per_peer: CHANNELS_PER_PEER,
            public: None,
        }
    }
}

impl RelayConfig {
    /// The relay turned off (`--no-relay`).
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// Per-peer rates lifted (benchmarks); the table bounds stay.
    pub fn unlimited() -> Self {
        Self {
            peer_bytes: RateLimit::unlimited(),
            peer_packets: RateLimit::unlimited(),
            ..Self::default()
        }
    }
}

/// Counters (the server's `--json` summary carries them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub channels_opened: u64,
    pub channels_expired: u64,
    /// Introductions that got no channel: the table, or the peer's share
    /// of it, was full.
    pub refused_full: u64,
    pub packets: u64,
    pub bytes: u64,
    pub keepalives: u64,
    /// Ends moved to a peer's newly proven address.
    pub rebinds: u64,
    /// Dropped: not a well-formed frame.
    pub dropped_malformed: u64,
    /// Dropped: no such channel (expired, or guessed).
    pub dropped_unknown_channel: u64,
    /// Dropped: the sender is neither end of the channel.
    pub dropped_stranger: u64,
    /// Dropped: the sending peer's byte or packet bucket was empty.
    pub dropped_rate: u64,
    /// Dropped: the target has not accepted the session (yet).
    pub dropped_unaccepted: u64,
}

/// One end of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    pub peer: PeerId,
    /// The process behind the key (two processes are two ends).
    pub instance: u64,
    pub addr: SocketAddr,
    /// The server's socket that end talks to.
    pub local: SocketAddr,
}

#[derive(Debug, Clone)]
struct Channel {
    ends: [End; 2],
    last: Instant,
    opened: Instant,
    /// The target accepted: until then nothing is forwarded (a peer that
    /// declines never receives a relayed packet).
    accepted: bool,
}

/// Why an introduction got no channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayRefusal {
    #[error("the relay is off")]
    Disabled,
    #[error("the relay holds as many channels as it may")]
    Full,
    #[error("a peer is an end of as many channels as it may")]
    PeerFull,
    #[error("the channel number belongs to another pair")]
    Taken,
}

/// See the module documentation.
#[derive(Debug)]
pub struct RelayServer {
    cfg: RelayConfig,
    channels: HashMap<u64, Channel>,
    by_peer: HashMap<PeerId, Vec<u64>>,
    bytes: RateLimiter<PeerId>,
    packets: RateLimiter<PeerId>,
    stats: RelayStats,
}

impl RelayServer {
    pub fn new(cfg: RelayConfig) -> Self {
        Self {
            cfg,
            channels: HashMap::new(),
            by_peer: HashMap::new(),
            bytes: RateLimiter::new(cfg.peer_bytes),
            packets: RateLimiter::new(cfg.peer_packets),
            stats: RelayStats::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    /// This node's public relay address, if it names itself.
    pub fn public(&self) -> Option<SocketAddr> {
        self.cfg.public
    }

    pub fn stats(&self) -> RelayStats {
        self.stats
    }

    /// Channels open now.
    pub fn channels(&self) -> usize {
        self.channels.len()
    }

    /// Peers that are an end of some channel now.
    pub fn peers(&self) -> usize {
        self.by_peer.len()
    }

    /// Opens channel `id` between two authenticated ends (or refreshes it:
    /// a retransmitted `Connect`).
    pub fn open(&mut self, now: Instant, id: u64, a: End, b: End) -> Result<(), RelayRefusal> {
        if !self.cfg.enabled {
            return Err(RelayRefusal::Disabled);
        }
        if let Some(c) = self.channels.get_mut(&id) {
            let same = |x: &End, y: &End| x.peer == y.peer && x.instance == y.instance;
            if !(same(&c.ends[0], &a) && same(&c.ends[1], &b)) {
                return Err(RelayRefusal::Taken);
            }
            c.ends = [a, b];
            c.last = now;
            return Ok(());
        }
        if self.channels.len() >= self.cfg.max_channels {
            self.stats.refused_full += 1;
            return Err(RelayRefusal::Full);
        }
        // The initiator answers for every channel it asked for; the target
        // only for those it took (others cannot fill its share).
        let asked = self.by_peer.get(&a.peer).map_or(0, Vec::len);
        let taken = self.by_peer.get(&b.peer).map_or(0, |ids| {
            ids.iter()
                .filter(|id| self.channels.get(id).is_some_and(|c| c.accepted))
                .count()
        });
        if asked >= self.cfg.channels_per_peer || taken >= self.cfg.channels_per_peer {
            self.stats.refused_full += 1;
            return Err(RelayRefusal::PeerFull);
        }
        self.channels.insert(
            id,
            Channel {
                ends: [a, b],
                last: now,
                opened: now,
                accepted: false,
            },
        );
        for p in [a.peer, b.peer] {
            let v = self.by_peer.entry(p).or_default();
            if !v.contains(&id) {
                v.push(id);
            }
        }
        self.stats.channels_opened += 1;
        Ok(())
    }

    /// `peer` (the process `instance`) proved that it is at `addr` now:
    /// its channels follow.
    pub fn rebind(&mut self, peer: PeerId, instance: u64, addr: SocketAddr, local: SocketAddr) {
        let Some(ids) = self.by_peer.get(&peer) else {
            return;
        };
        for id in ids {
            let Some(c) = self.channels.get_mut(id) else {
                continue;
            };
            for e in c.ends.iter_mut() {
                if e.peer == peer && e.instance == instance && (e.addr, e.local) != (addr, local) {
                    tracing::debug!(channel = id, %peer, from = %e.addr, to = %addr, "relay end moves");
                    e.addr = addr;
                    e.local = local;
                    self.stats.rebinds += 1;
                }
            }
        }
    }

    /// The target of channel `id` accepted: it carries data from now on.
    pub fn accept(&mut self, id: u64) {
        if let Some(c) = self.channels.get_mut(&id) {
            c.accepted = true;
        }
    }

    /// Closes channel `id` (the target declined).
    pub fn close(&mut self, id: u64) {
        if let Some(c) = self.channels.remove(&id) {
            self.unindex(id, &c);
        }
    }

    fn unindex(&mut self, id: u64, c: &Channel) {
        for e in &c.ends {
            if let Some(v) = self.by_peer.get_mut(&e.peer) {
                v.retain(|x| *x != id);
                if v.is_empty() {
                    self.by_peer.remove(&e.peer);
                }
            }
        }
    }

    /// One relay frame from `from`: forwarded to `out`, or dropped and
    /// counted.
    pub fn handle(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
        out: &mut VecDeque<Outgoing>,
    ) {
        let (id, payload) = match super::decode(data) {
            Ok(x) => x,
            Err(e) => {
                self.stats.dropped_malformed += 1;
                tracing::trace!(%from, error = %e, "dropped malformed relay frame");
                return;
            }
        };
        let Some(c) = self.channels.get_mut(&id) else {
            self.stats.dropped_unknown_channel += 1;
            tracing::trace!(%from, channel = id, "relay frame for no channel");
            return;
        };
        let Some(side) = c.ends.iter().position(|e| e.addr == from) else {
            self.stats.dropped_stranger += 1;
            tracing::trace!(%from, channel = id, "relay frame from neither end");
            return;
        };
        // The target sending on the channel is its consent (its Accept
        // may still be on the way).
        if side == 1 {
            c.accepted = true;
        }
        if !c.accepted {
            self.stats.dropped_unaccepted += 1;
            return;
        }
        c.last = now;
        if payload.is_empty() {
            self.stats.keepalives += 1;
            return;
        }
        let (me, other) = (c.ends[side], c.ends[1 - side]);
        if !self.packets.allow(now, me.peer) || !self.bytes.allow_n(now, me.peer, data.len() as f64)
        {
            self.stats.dropped_rate += 1;
            return;
        }
        self.stats.packets += 1;
        self.stats.bytes += payload.len() as u64;
        out.push_back(Outgoing {
            from: other.local,
            to: other.addr,
            payload: data.to_vec(),
        });
    }

    /// Closes channels idle for [`IDLE`].
    pub fn expire(&mut self, now: Instant) {
        let dead: Vec<u64> = self
            .channels
            .iter()
            .filter(|(_, c)| {
                now.saturating_duration_since(c.last) >= IDLE
                    || (!c.accepted && now.saturating_duration_since(c.opened) >= UNACCEPTED_TTL)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            if let Some(c) = self.channels.remove(&id) {
                self.unindex(id, &c);
                self.stats.channels_expired += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn end(seed: u8, addr: &str) -> End {
        End {
            peer: Identity::from_seed([seed; 32]).peer_id(),
            instance: u64::from(seed),
            addr: addr.parse().unwrap(),
            local: "203.0.113.1:3478".parse().unwrap(),
        }
    }

    #[test]
    fn forwards_between_the_two_ends_only() {
        let t = Instant::now();
        let mut r = RelayServer::new(RelayConfig::default());
        let (a, b) = (end(1, "198.51.100.1:4000"), end(2, "198.51.100.2:5000"));
        r.open(t, 9, a, b).unwrap();
        let mut out = VecDeque::new();
        let f = super::super::encode(9, b"\x40hello");
        // Nothing goes through before the target accepts.
        r.handle(t, a.addr, &f, &mut out);
        assert!(out.is_empty());
        assert_eq!(r.stats().dropped_unaccepted, 1);
        r.accept(9);
        r.handle(t, a.addr, &f, &mut out);
        let o = out.pop_front().unwrap();
        assert_eq!(
            (o.to, o.from, o.payload.as_slice()),
            (b.addr, b.local, &f[..])
        );
        r.handle(t, b.addr, &f, &mut out);
        assert_eq!(out.pop_front().unwrap().to, a.addr);
        // A stranger, an unknown channel, a keepalive, garbage: nothing out.
        r.handle(t, "192.0.2.9:1".parse().unwrap(), &f, &mut out);
        r.handle(t, a.addr, &super::super::encode(10, b"x"), &mut out);
        r.handle(t, a.addr, &super::super::encode(9, &[]), &mut out);
        r.handle(t, a.addr, &[0x2C, 1], &mut out);
        assert!(out.is_empty());
        let s = r.stats();
        assert_eq!(
            (
                s.packets,
                s.dropped_stranger,
                s.dropped_unknown_channel,
                s.keepalives,
                s.dropped_malformed
            ),
            (2, 1, 1, 1, 1)
        );
    }

    #[test]
    fn ends_follow_their_peer_and_channels_expire() {
        let t = Instant::now();
        let mut r = RelayServer::new(RelayConfig::default());
        let (a, b) = (end(1, "198.51.100.1:4000"), end(2, "198.51.100.2:5000"));
        r.open(t, 9, a, b).unwrap();
        r.accept(9);
        // Another pair cannot take the number.
        assert_eq!(
            r.open(t, 9, end(3, "192.0.2.3:1"), b),
            Err(RelayRefusal::Taken)
        );
        let moved: SocketAddr = "198.51.100.1:4999".parse().unwrap();
        // Another process with a's key does not move a's end.
        r.rebind(a.peer, 77, moved, a.local);
        let mut out = VecDeque::new();
        let f = super::super::encode(9, b"\x40x");
        r.handle(t, moved, &f, &mut out);
        assert!(out.is_empty());
        r.rebind(a.peer, a.instance, moved, a.local);
        r.handle(t, moved, &f, &mut out);
        assert_eq!(out.len(), 1);
        r.handle(
            t + IDLE - Duration::from_secs(1),
            b.addr,
            &[0x2C, 0, 0, 0, 0, 0, 0, 0, 9],
            &mut out,
        );
        r.expire(t + IDLE);
        assert_eq!(r.channels(), 1, "a keepalive keeps it");
        r.expire(t + IDLE * 2);
        assert_eq!((r.channels(), r.peers()), (0, 0));
    }

    #[test]
    fn introductions_a_target_never_took_cannot_fill_its_share() {
        let t = Instant::now();
        let cfg = RelayConfig {
            channels_per_peer: 2,
            ..RelayConfig::default()
        };
        let mut r = RelayServer::new(cfg);
        let target = end(2, "198.51.100.2:5000");
        // Many initiators ask; the target takes none.
        for i in 0..10u8 {
            let a = end(10 + i, "198.51.100.1:4000");
            r.open(t, u64::from(i), a, target).unwrap();
            // Keepalives from the initiator do not keep it.
            r.handle(
                t,
                a.addr,
                &super::super::encode(u64::from(i), &[]),
                &mut VecDeque::new(),
            );
        }
        r.expire(t + UNACCEPTED_TTL);
        assert_eq!(r.channels(), 0);
        // The target sending on a channel is its consent.
        let a = end(30, "198.51.100.3:4000");
        r.open(t, 99, a, target).unwrap();
        let mut out = VecDeque::new();
        r.handle(
            t,
            target.addr,
            &super::super::encode(99, b"\x40x"),
            &mut out,
        );
        assert_eq!(out.len(), 1);
        r.expire(t + UNACCEPTED_TTL);
        assert_eq!(r.channels(), 1);
    }

    #[test]
    fn a_flooding_peer_is_held_to_its_rate() {
        let t = Instant::now();
        let cfg = RelayConfig {
            peer_packets: RateLimit {
                rate: 100.0,
                burst: 10.0,
                max_sources: 16,
            },
            ..RelayConfig::default()
        };
        let mut r = RelayServer::new(cfg);
        let (a, b) = (end(1, "198.51.100.1:4000"), end(2, "198.51.100.2:5000"));
        r.open(t, 9, a, b).unwrap();
        r.accept(9);
        let mut out = VecDeque::new();
        let f = super::super::encode(9, b"\x40x");
        for _ in 0..50 {
            r.handle(t, a.addr, &f, &mut out);
        }
        assert_eq!(out.len(), 10);
        assert_eq!(r.stats().dropped_rate, 40);
        // The other end has its own budget.
        r.handle(t, b.addr, &f, &mut out);
        assert_eq!(out.len(), 11);
    }

    #[test]
    fn the_tables_are_bounded() {
        let t = Instant::now();
        let cfg = RelayConfig {
            channels_per_peer: 2,
            ..RelayConfig::default()
        };
        let mut r = RelayServer::new(cfg);
        let (a, b) = (end(1, "198.51.100.1:4000"), end(2, "198.51.100.2:5000"));
        r.open(t, 1, a, b).unwrap();
        r.open(t, 2, a, b).unwrap();
        assert_eq!(r.open(t, 3, a, b), Err(RelayRefusal::PeerFull));
        let mut off = RelayServer::new(RelayConfig::disabled());
        assert_eq!(off.open(t, 1, a, b), Err(RelayRefusal::Disabled));
    }
}
