//! What the last discovery on this network measured, kept on disk so that
//! the next connect knows its NAT (and its opener TTL) from the first
//! packet: an `ssh` `ProxyCommand` starts a new process for every login.
//!
//! A network is the local address, the default gateway and the STUN
//! server; the entry also records the gateway's link-layer address, and
//! another router on the same subnet (a café after home) has another MAC,
//! so its entry is not used there. (The kernel may not know the MAC yet
//! when a process starts; then the entry is used, and checked by what
//! discovery measures a round trip later.) An entry lives [`LIFETIME`];
//! every run measures again in the background and rewrites it, and the
//! facts it measures replace the cached ones (the coordinator sends them
//! to the peer as an update), so a stale entry costs a late correction.
//!
//! The entry also keeps the rendezvous server's address cookie and our
//! round trip to it, so the next process sends its first request at once
//! (the server accepts the cookie from any port of our public address).
//!
//! The file is a line of `key=value` pairs (easy to read, and no parser a
//! hostile file could exploit: unknown or malformed content is ignored).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use natpunch_proto::coordinator::ServerMemo;
use natpunch_proto::nat::{AllocationKind, Behaviour, Fact};
use natpunch_proto::rendezvous::wire::Cookie;
use sha2::{Digest, Sha256};

/// An entry older than this is not used: NAT behaviour rarely changes, but
/// a router can be replaced or reconfigured behind the same MAC.
pub const LIFETIME: Duration = Duration::from_secs(3600);

/// A cached opener TTL younger than this is used without probing the hops
/// again: routers rate-limit the ICMP errors hop discovery needs (Linux:
/// about one per second per destination), so a burst of runs would
/// otherwise learn nothing, and the path to the first router seldom
/// changes while the network does not.
pub const HOPS_FRESH: Duration = Duration::from_secs(600);

/// Environment variable naming the cache directory (overrides the XDG
/// location); an empty value turns the cache off.
pub const CACHE_DIR_ENV: &str = "NATPUNCH_CACHE";

/// The facts a connect needs, as the last discovery measured them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cached {
    pub nat: Option<bool>,
    pub mapping: Option<Behaviour>,
    pub filtering: Option<Behaviour>,
    pub allocation: Option<AllocationKind>,
    pub delta: Option<i32>,
    pub opener_ttl: Option<u8>,
    /// When the opener TTL was measured (Unix seconds).
    pub ttl_at: Option<u64>,
    /// The gateway's link-layer address then, if the kernel knew it.
    pub gateway_mac: Option<String>,
    /// The rendezvous server's cookie, as last given.
    pub server: Option<ServerNote>,
}

/// A rendezvous server's cookie, when it was given, and our round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerNote {
    pub addr: SocketAddr,
    pub cookie: Cookie,
    /// When the cookie was given (Unix ms).
    pub at_ms: u64,
    pub rtt_ms: u32,
}

impl ServerNote {
    /// A note taken now.
    pub fn now(addr: SocketAddr, cookie: Cookie, rtt: Duration) -> Self {
        Self {
            addr,
            cookie,
            at_ms: now_unix_ms(),
            rtt_ms: rtt.as_millis().min(u128::from(u32::MAX)) as u32,
        }
    }

    /// What the coordinator starts from, for `server` (none for another
    /// server, or from a clock that went back).
    pub fn memo(&self, server: SocketAddr) -> Option<ServerMemo> {
        if self.addr != server {
            return None;
        }
        let age = now_unix_ms().checked_sub(self.at_ms)?;
        Some(ServerMemo {
            cookie: self.cookie,
            age: Duration::from_millis(age),
            rtt: Duration::from_millis(u64::from(self.rtt_ms)),
        })
    }
}

impl Cached {
    /// The facts for the coordinator; what the entry does not know stays
    /// pending. A symmetric NAT's mapping fact is left to this run's
    /// discovery: prediction needs the newest mapping the NAT made, and
    /// discovery's own requests keep making new ones for a round trip, so
    /// a connect behind a symmetric NAT waits for discovery's facts anyway.
    pub fn facts(&self) -> Vec<Fact> {
        let mut v = Vec::new();
        if self.mapping == Some(Behaviour::EndpointIndependent) || self.nat == Some(false) {
            v.push(Fact::Mapping {
                nat: self.nat,
                mapping: self.mapping,
                allocation: self.allocation,
                delta: self.delta,
                latest: None,
                rtt: None,
            });
        }
        if self.filtering.is_some() {
            v.push(Fact::Filtering {
                filtering: self.filtering,
            });
        }
        if self.opener_ttl.is_some() {
            v.push(Fact::OpenerTtl {
                ttl: self.opener_ttl,
            });
        }
        v
    }

    /// Takes in a fact measured now.
    pub fn learn(&mut self, fact: &Fact) {
        match *fact {
            Fact::Mapping {
                nat,
                mapping,
                allocation,
                delta,
                ..
            } => {
                self.nat = nat;
                self.mapping = mapping;
                self.allocation = allocation;
                self.delta = delta;
            }
            Fact::Filtering { filtering } => self.filtering = filtering,
            // Only a measured TTL replaces one (none may mean "not learned").
            Fact::OpenerTtl { ttl: Some(t) } => {
                self.opener_ttl = Some(t);
                self.ttl_at = Some(now_unix());
            }
            _ => {}
        }
    }

    /// The opener TTL, if measured less than [`HOPS_FRESH`] ago.
    pub fn fresh_opener_ttl(&self) -> Option<u8> {
        let at = self.ttl_at?;
        let age = now_unix().checked_sub(at)?;
        (age <= HOPS_FRESH.as_secs())
            .then_some(self.opener_ttl)
            .flatten()
    }
}

/// The cache directory: `$NATPUNCH_CACHE`, else `$XDG_CACHE_HOME/natpunch`,
/// else `~/.cache/natpunch`; `None` when turned off or unknown.
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os(CACHE_DIR_ENV) {
        Some(v) if v.is_empty() => return None,
        Some(v) => return Some(PathBuf::from(v)),
        None => {}
    }
    let var = |n: &str| {
        std::env::var_os(n)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(x) = var("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return Some(x.join("natpunch"));
    }
    var("HOME").map(|h| h.join(".cache").join("natpunch"))
}

/// This network's entry file in `dir`, and the gateway's link-layer
/// address now (if the kernel knows it).
pub fn entry_path(dir: &Path, local_ip: IpAddr, server: SocketAddr) -> (PathBuf, Option<String>) {
    let (gateway, mac) = default_gateway()
        .map(|(g, m)| (Some(g), m))
        .unwrap_or((None, None));
    let mut h = Sha256::new();
    h.update(local_ip.to_string().as_bytes());
    h.update(b"|");
    h.update(
        gateway
            .map(|g| g.to_string())
            .unwrap_or_default()
            .as_bytes(),
    );
    h.update(b"|");
    h.update(server.to_string().as_bytes());
    let d = h.finalize();
    let mut name = String::from("nat-");
    for b in &d[..8] {
        let _ = write!(name, "{b:02x}");
    }
    (dir.join(name), mac)
}

/// The default gateway's link-layer address, if the kernel knows it.
pub fn gateway_mac() -> Option<String> {
    default_gateway().and_then(|(_, mac)| mac)
}

/// The IPv4 default gateway and its link-layer address, from
/// /proc/net/route and /proc/net/arp (Linux); `None` elsewhere.
fn default_gateway() -> Option<(IpAddr, Option<String>)> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    let gw = routes.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.get(1) != Some(&"00000000") {
            return None;
        }
        let hex = u32::from_str_radix(f.get(2)?, 16).ok()?;
        // The kernel prints the address in host (little-endian) order.
        Some(Ipv4Addr::from(hex.swap_bytes()))
    })?;
    let mac = std::fs::read_to_string("/proc/net/arp")
        .ok()
        .and_then(|arp| {
            arp.lines().skip(1).find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&gw.to_string().as_str()))
                    .then(|| f.get(3).map(|m| m.to_string()))
                    .flatten()
            })
        });
    Some((IpAddr::V4(gw), mac))
}

fn behaviour(s: &str) -> Option<Behaviour> {
    Some(match s {
        "eim" => Behaviour::EndpointIndependent,
        "adm" => Behaviour::AddressDependent,
        "apdm" => Behaviour::AddressAndPortDependent,
        _ => return None,
    })
}

fn behaviour_str(b: Behaviour) -> &'static str {
    match b {
        Behaviour::EndpointIndependent => "eim",
        Behaviour::AddressDependent => "adm",
        Behaviour::AddressAndPortDependent => "apdm",
    }
}

fn allocation(s: &str) -> Option<AllocationKind> {
    Some(match s {
        "preserving" => AllocationKind::Preserving,
        "sequential" => AllocationKind::Sequential,
        "random" => AllocationKind::Random,
        _ => return None,
    })
}

fn allocation_str(a: AllocationKind) -> &'static str {
    match a {
        AllocationKind::Preserving => "preserving",
        AllocationKind::Sequential => "sequential",
        AllocationKind::Random => "random",
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Encodes an entry (with the time it was saved).
pub fn encode(c: &Cached, saved_unix: u64) -> String {
    let mut s = format!("v1 saved={saved_unix}");
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            let _ = write!(s, " {k}={v}");
        }
    };
    put("nat", c.nat.map(|n| u8::from(n).to_string()));
    put("mapping", c.mapping.map(|b| behaviour_str(b).into()));
    put("filtering", c.filtering.map(|b| behaviour_str(b).into()));
    put("allocation", c.allocation.map(|a| allocation_str(a).into()));
    put("delta", c.delta.map(|d| d.to_string()));
    put("ttl", c.opener_ttl.map(|t| t.to_string()));
    put("ttl_at", c.ttl_at.map(|t| t.to_string()));
    put("mac", c.gateway_mac.clone());
    if let Some(n) = &c.server {
        let mut mac = String::new();
        for b in n.cookie.mac {
            let _ = write!(mac, "{b:02x}");
        }
        put("rv", Some(n.addr.to_string()));
        put("cookie", Some(format!("{}.{mac}", n.cookie.issued_ms)));
        put("cookie_at", Some(n.at_ms.to_string()));
        put("rtt", Some(n.rtt_ms.to_string()));
    }
    s.push('\n');
    s
}

/// Decodes an entry saved no longer than [`LIFETIME`] before `now_unix`;
/// anything malformed is `None`.
pub fn decode(text: &str, now_unix: u64) -> Option<Cached> {
    let mut words = text.split_whitespace();
    if words.next()? != "v1" {
        return None;
    }
    let mut c = Cached::default();
    let mut saved = None;
    let (mut rv, mut cookie, mut cookie_at, mut rtt) = (None, None, None, None);
    for w in words {
        let (k, v) = w.split_once('=')?;
        match k {
            "saved" => saved = Some(v.parse::<u64>().ok()?),
            "nat" => c.nat = Some(v == "1"),
            "mapping" => c.mapping = Some(behaviour(v)?),
            "filtering" => c.filtering = Some(behaviour(v)?),
            "allocation" => c.allocation = Some(allocation(v)?),
            "delta" => c.delta = Some(v.parse().ok()?),
            "ttl" => c.opener_ttl = Some(v.parse().ok()?),
            "ttl_at" => c.ttl_at = Some(v.parse().ok()?),
            "mac" if v.len() <= 64 => c.gateway_mac = Some(v.to_string()),
            "rv" => rv = Some(v.parse::<SocketAddr>().ok()?),
            "cookie" => cookie = Some(parse_cookie(v)?),
            "cookie_at" => cookie_at = Some(v.parse::<u64>().ok()?),
            "rtt" => rtt = Some(v.parse::<u32>().ok()?),
            // A later version's field: ignored.
            _ => {}
        }
    }
    if let (Some(addr), Some(cookie), Some(at_ms), Some(rtt_ms)) = (rv, cookie, cookie_at, rtt) {
        c.server = Some(ServerNote {
            addr,
            cookie,
            at_ms,
            rtt_ms,
        });
    }
    let age = now_unix.checked_sub(saved?)?;
    (age <= LIFETIME.as_secs()).then_some(c)
}

/// `ISSUED.MAC` (decimal, then 32 hex digits).
fn parse_cookie(v: &str) -> Option<Cookie> {
    let (issued, hex) = v.split_once('.')?;
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    let mut mac = [0u8; 16];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(Cookie {
        issued_ms: issued.parse().ok()?,
        mac,
    })
}

/// The entry at `path`, if fresh and not from another router (`mac`: the
/// gateway's link-layer address now, if known).
pub fn load(path: &Path, mac: Option<&str>) -> Option<Cached> {
    let text = std::fs::read_to_string(path).ok()?;
    // A cache entry is one short line; a big file is not ours.
    if text.len() > 1024 {
        return None;
    }
    let c = decode(&text, now_unix())?;
    match (mac, c.gateway_mac.as_deref()) {
        (Some(now), Some(then)) if now != then => None,
        _ => Some(c),
    }
}

/// Writes the entry at `path` (atomically: a temporary file renamed).
pub fn store(path: &Path, c: &Cached) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, encode(c, now_unix()))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_age_out() {
        let c = Cached {
            nat: Some(true),
            mapping: Some(Behaviour::AddressAndPortDependent),
            filtering: Some(Behaviour::AddressAndPortDependent),
            allocation: Some(AllocationKind::Sequential),
            delta: Some(-2),
            opener_ttl: Some(2),
            ttl_at: Some(990),
            gateway_mac: Some("02:00:00:00:00:01".into()),
            server: Some(ServerNote {
                addr: "203.0.113.10:3478".parse().unwrap(),
                cookie: Cookie {
                    issued_ms: 123_456,
                    mac: [0xab; 16],
                },
                at_ms: 999_000,
                rtt_ms: 41,
            }),
        };
        let text = encode(&c, 1000);
        assert_eq!(decode(&text, 1000 + 60), Some(c));
        assert_eq!(decode(&text, 1000 + LIFETIME.as_secs() + 1), None);
        // From the future (a clock set back): not trusted.
        assert_eq!(decode(&text, 10), None);
    }

    #[test]
    fn a_server_note_serves_only_its_server() {
        let server: SocketAddr = "203.0.113.10:3478".parse().unwrap();
        let cookie = Cookie {
            issued_ms: 7,
            mac: [1; 16],
        };
        let note = ServerNote::now(server, cookie, Duration::from_millis(42));
        let memo = note.memo(server).expect("same server");
        assert_eq!(memo.cookie, cookie);
        assert_eq!(memo.rtt, Duration::from_millis(42));
        assert!(memo.age < Duration::from_secs(5));
        assert_eq!(note.memo("203.0.113.11:3478".parse().unwrap()), None);
        // Taken "in the future" (a clock set back since): not used.
        let future = ServerNote {
            at_ms: now_unix_ms() + 60_000,
            ..note
        };
        assert_eq!(future.memo(server), None);
    }

    #[test]
    fn another_router_does_not_use_the_entry() {
        let dir = std::env::temp_dir().join(format!("natpunch-cache-test-{}", std::process::id()));
        let path = dir.join("nat-x");
        let c = Cached {
            mapping: Some(Behaviour::EndpointIndependent),
            gateway_mac: Some("02:00:00:00:00:01".into()),
            ..Cached::default()
        };
        store(&path, &c).unwrap();
        assert_eq!(load(&path, Some("02:00:00:00:00:01")), Some(c.clone()));
        // The kernel does not know the MAC yet: used, checked later.
        assert_eq!(load(&path, None), Some(c));
        assert_eq!(load(&path, Some("02:00:00:00:00:02")), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn malformed_entries_are_ignored() {
        for bad in [
            "",
            "v2 saved=1",
            "v1 mapping=eim",
            "v1 saved=1 mapping=what",
            "v1 saved=x",
            "v1 saved=1 delta",
            "v1 saved=1 ttl=300",
            "v1 saved=1 cookie=12.abc",
            "v1 saved=1 cookie=x.abababababababababababababababab",
            "v1 saved=1 cookie=1.zzababababababababababababababab",
            "v1 saved=1 rv=nowhere",
        ] {
            assert_eq!(decode(bad, 2), None, "{bad:?}");
        }
        // An unknown field from a later version is fine.
        assert!(decode("v1 saved=1 colour=blue", 2).is_some());
    }
}
