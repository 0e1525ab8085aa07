//! In-process NAT models (RFC 4787) for deterministic tests.
//!
//! A [`Nat`] translates datagrams like a real NAT would: mapping behaviour
//! (endpoint-independent, address-dependent, address-and-port-dependent),
//! filtering behaviour (the same three), port allocation (preserving,
//! sequential with a delta, or seeded random) and hairpinning. It has no
//! clock and no sockets, so the sans-IO machines of `natpunch-proto` can be
//! run against it in a loop that finishes in milliseconds. The real-kernel
//! counterpart is the netns lab.

pub mod world;

use std::net::{IpAddr, SocketAddr};

use natpunch_proto::nat::Behaviour;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// How a NAT picks the external port of a new mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortAllocation {
    /// Keep the internal port when it is free, else the next free one.
    Preserving,
    /// Previous allocation plus `delta`, starting at `start`.
    Sequential { start: u16, delta: i32 },
    /// Uniform over 1024..=65535, seeded.
    Random,
}

/// A NAT's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatConfig {
    pub public_ip: IpAddr,
    pub mapping: Behaviour,
    pub filtering: Behaviour,
    pub allocation: PortAllocation,
    pub hairpin: bool,
    pub seed: u64,
}

/// A datagram in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Mapping {
    internal: SocketAddr,
    /// The destination that created it, reduced per mapping behaviour.
    key_dst: Option<SocketAddr>,
    external_port: u16,
    /// Remote endpoints this mapping has sent to (for filtering).
    sent_to: Vec<SocketAddr>,
    /// A port mapping (PCP, NAT-PMP, UPnP): one external port for every
    /// destination, open to every sender.
    fixed: bool,
}

/// One NAT.
#[derive(Debug)]
pub struct Nat {
    config: NatConfig,
    mappings: Vec<Mapping>,
    last_port: Option<u16>,
    rng: StdRng,
    /// Packets dropped by filtering.
    pub filtered: u64,
}

impl Nat {
    pub fn new(config: NatConfig) -> Self {
        Self {
            rng: StdRng::seed_from_u64(config.seed),
            config,
            mappings: Vec::new(),
            last_port: None,
            filtered: 0,
        }
    }

    pub fn public_ip(&self) -> IpAddr {
        self.config.public_ip
    }

    pub fn config(&self) -> &NatConfig {
        &self.config
    }

    fn key_for(&self, dst: SocketAddr) -> Option<SocketAddr> {
        match self.config.mapping {
            Behaviour::EndpointIndependent => None,
            Behaviour::AddressDependent => Some(SocketAddr::new(dst.ip(), 0)),
            Behaviour::AddressAndPortDependent => Some(dst),
        }
    }

    fn port_free(&self, p: u16) -> bool {
        p >= 1024 && !self.mappings.iter().any(|m| m.external_port == p)
    }

    fn allocate(&mut self, internal: SocketAddr) -> u16 {
        let mut candidate = match self.config.allocation {
            PortAllocation::Preserving => internal.port(),
            PortAllocation::Sequential { start, delta } => match self.last_port {
                None => start,
                Some(p) => wrap(i32::from(p) + delta),
            },
            PortAllocation::Random => self.rng.random_range(1024..=65535u16),
        };
        while !self.port_free(candidate) {
            candidate = match self.config.allocation {
                PortAllocation::Random => self.rng.random_range(1024..=65535u16),
                PortAllocation::Sequential { delta, .. } => wrap(i32::from(candidate) + delta),
                PortAllocation::Preserving => wrap(i32::from(candidate) + 1),
            };
        }
        self.last_port = Some(candidate);
        candidate
    }

    /// Translates an outbound datagram from the inside. Creates a mapping
    /// when needed. A datagram to the NAT's own public IP is hairpinned
    /// (returned already translated back inside) or dropped.
    pub fn outbound(&mut self, mut p: Packet) -> Option<Packet> {
        let key = self.key_for(p.dst);
        let fixed = self
            .mappings
            .iter()
            .position(|m| m.internal == p.src && m.fixed);
        let found = fixed.or_else(|| {
            self.mappings
                .iter()
                .position(|m| m.internal == p.src && m.key_dst == key)
        });
        let idx = match found {
            Some(i) => i,
            None => {
                let external_port = self.allocate(p.src);
                self.mappings.push(Mapping {
                    internal: p.src,
                    key_dst: key,
                    external_port,
                    sent_to: Vec::new(),
                    fixed: false,
                });
                self.mappings.len() - 1
            }
        };
        let m = &mut self.mappings[idx];
        if !m.sent_to.contains(&p.dst) {
            m.sent_to.push(p.dst);
        }
        p.src = SocketAddr::new(self.config.public_ip, m.external_port);
        if p.dst.ip() == self.config.public_ip {
            if !self.config.hairpin {
                return None;
            }
            return self.inbound(p);
        }
        Some(p)
    }

    /// Translates an inbound datagram to the public address, or drops it
    /// per the filtering behaviour.
    pub fn inbound(&mut self, mut p: Packet) -> Option<Packet> {
        if p.dst.ip() != self.config.public_ip {
            return None;
        }
        let filtering = self.config.filtering;
        let Some(m) = self
            .mappings
            .iter()
            .find(|m| m.external_port == p.dst.port())
        else {
            self.filtered += 1;
            return None;
        };
        let allowed = match filtering {
            _ if m.fixed => true,
            Behaviour::EndpointIndependent => true,
            Behaviour::AddressDependent => m.sent_to.iter().any(|d| d.ip() == p.src.ip()),
            Behaviour::AddressAndPortDependent => m.sent_to.contains(&p.src),
        };
        if !allowed {
            self.filtered += 1;
            return None;
        }
        p.dst = m.internal;
        Some(p)
    }

    /// A port mapping for `internal`, as a gateway makes one for PCP,
    /// NAT-PMP or UPnP: the same external port when free; every sender
    /// reaches `internal` there, and its packets leave from there.
    pub fn map_port(&mut self, internal: SocketAddr) -> SocketAddr {
        let port = if self.port_free(internal.port()) {
            internal.port()
        } else {
            self.allocate(internal)
        };
        self.mappings.push(Mapping {
            internal,
            key_dst: None,
            external_port: port,
            sent_to: Vec::new(),
            fixed: true,
        });
        SocketAddr::new(self.config.public_ip, port)
    }

    /// Forgets every mapping (a reboot, or a conntrack flush).
    pub fn flush(&mut self) {
        self.mappings.clear();
    }
}

fn wrap(p: i32) -> u16 {
    // Stay in the non-privileged range, as NATs do.
    (1024 + (p - 1024).rem_euclid(65536 - 1024)) as u16
}
