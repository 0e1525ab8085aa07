//! A real miniupnpd (Debian's `miniupnpd` with `miniupnpd-nftables`) in a
//! lab NAT with `upnp=on`, serving UPnP IGD, NAT-PMP and PCP on the NAT's
//! inside interfaces.
//!
//! What it takes, found by running miniupnpd 2.3.1 in the lab:
//! - its WAN address is in a reserved range (all lab addresses are), so
//!   it forwards only after its own STUN test (`ext_perform_stun`, RFC
//!   5780 CHANGE-REQUEST) against the lab's `natpunch server --alt` finds
//!   no restrictive NAT beyond it; the NAT's rules let those answers in
//!   and keep the gateway's own source port ([`crate::nft`]);
//! - its nftables backend writes into an `inet` table whose chains must
//!   exist before it starts ([`crate::nft::miniupnpd_table`]; Debian's
//!   `nft_init.sh` is the iptables one and fails);
//! - it adds only an inbound DNAT per mapping: the lab mirrors each lease
//!   into the NAT's `upnp_out` map so the host's own packets from a mapped
//!   port leave from the mapped port, as a gateway's port mapping does.
//!   The watcher only adds and deletes map elements, never rules, so it
//!   does not disturb miniupnpd's view of its own rules.
//! - SIGTERM leaves its rules in place; the namespace goes with the lab.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::nft::{miniupnpd_table, UPNP_OUT};
use crate::topology::{LabError, Node};

/// miniupnpd is ready within ~0.15 s when its STUN test gets all four
/// answers; with answers missing it retries for 9 s (3 rounds of 3 s) and
/// starts with forwarding disabled (measured).
const READY_TIMEOUT: Duration = Duration::from_secs(12);
/// The lease file is mirrored this often: a new mapping leaves by its own
/// port within this time (a peer learns of the mapping later than that).
const WATCH_EVERY: Duration = Duration::from_millis(50);
/// After a failed mirror (the map missing, nft refusing), the next try:
/// not twenty `nft` processes a second on a 2-core machine.
const WATCH_BACKOFF: Duration = Duration::from_secs(1);
/// The UPnP HTTP port (miniupnpd picks a random one unless told).
pub const HTTP_PORT: u16 = 5000;

/// One mapping in miniupnpd's lease file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// `UDP` or `TCP`.
    pub protocol: String,
    pub external_port: u16,
    pub internal: SocketAddrV4,
    /// Unix time the lease ends (0: permanent).
    pub expires: u64,
    pub description: String,
}

/// Parses `PROTO:EXTPORT:IADDR:IPORT:EXPIRES:DESCRIPTION` lines; others
/// are skipped.
pub fn parse_leases(text: &str) -> Vec<Lease> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(6, ':');
            let protocol = f.next()?.to_string();
            let external_port = f.next()?.parse().ok()?;
            let ip: Ipv4Addr = f.next()?.parse().ok()?;
            let port = f.next()?.parse().ok()?;
            let expires = f.next()?.parse().ok()?;
            let description = f.next().unwrap_or("").to_string();
            Some(Lease {
                protocol,
                external_port,
                internal: SocketAddrV4::new(ip, port),
                expires,
                description,
            })
        })
        .collect()
}

/// miniupnpd's configuration for a NAT whose outside interface is `wan`.
/// `min_lifetime=2`: PCP leases as short as the tests' renewal check asks
/// for (miniupnpd's default floor is 120 s); `secure_mode`: a host maps
/// only to itself, as home gateways do.
pub fn config(lans: &[String], inside: &[String], stun: SocketAddr, lease_file: &Path) -> String {
    let mut s = String::from("ext_ifname=wan\n");
    for l in lans {
        s.push_str(&format!("listening_ip={l}\n"));
    }
    s.push_str(&format!(
        "http_port={HTTP_PORT}
enable_upnp=yes
enable_natpmp=yes
ipv6_disable=yes
ext_perform_stun=yes
ext_stun_host={}
ext_stun_port={}
upnp_table_name=miniupnpd
upnp_nat_table_name=miniupnpd
upnp_forward_chain=miniupnpd
upnp_nat_chain=prerouting_miniupnpd
upnp_nat_postrouting_chain=postrouting_miniupnpd
lease_file={}
secure_mode=yes
min_lifetime=2
",
        stun.ip(),
        stun.port(),
        lease_file.display()
    ));
    for net in inside {
        s.push_str(&format!("allow 1024-65535 {net} 1024-65535\n"));
    }
    s.push_str("deny 0-65535 0.0.0.0/0 0-65535\n");
    s
}

/// A NAT that runs miniupnpd once the lab's server is up.
#[derive(Debug, Clone)]
pub(crate) struct UpnpPlan {
    pub node: Node,
    pub ns: String,
    pub lans: Vec<String>,
    pub inside: Vec<String>,
    /// Its WAN is a carrier NAT's inside (a double NAT): miniupnpd's STUN
    /// test may find a restrictive NAT beyond it and refuse to map, as a
    /// real one does there.
    pub behind_nat: bool,
}

/// A running miniupnpd and its lease mirror.
#[derive(Debug)]
pub struct UpnpGateway {
    pub node: Node,
    pub ns: String,
    pub dir: PathBuf,
    pub lease_file: PathBuf,
    pub log: PathBuf,
    /// miniupnpd maps ports (its STUN test found no restrictive NAT
    /// beyond it); `false` only behind a carrier NAT.
    pub forwarding: bool,
    stop: Arc<AtomicBool>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

impl UpnpGateway {
    /// Loads miniupnpd's table, starts it and waits until it serves with
    /// forwarding enabled; returns it and its process (the lab kills it).
    pub(crate) fn start(
        plan: &UpnpPlan,
        stun: SocketAddr,
        dir: PathBuf,
    ) -> Result<(UpnpGateway, Child), LabError> {
        std::fs::create_dir_all(&dir).map_err(|source| LabError::Spawn {
            command: format!("mkdir {}", dir.display()),
            source,
        })?;
        let lease_file = dir.join("leases");
        let log = dir.join("miniupnpd.log");
        let conf = dir.join("miniupnpd.conf");
        let io = |what: &str, source| LabError::Spawn {
            command: what.to_string(),
            source,
        };
        std::fs::write(&conf, config(&plan.lans, &plan.inside, stun, &lease_file))
            .map_err(|e| io("write miniupnpd.conf", e))?;
        crate::topology::nft_load(&plan.ns, miniupnpd_table())?;
        let logf = std::fs::File::create(&log).map_err(|e| io("create miniupnpd.log", e))?;
        let errf = logf.try_clone().map_err(|e| io("miniupnpd.log", e))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &plan.ns, "miniupnpd", "-d", "-f"])
            .arg(&conf)
            .arg("-P")
            .arg(dir.join("miniupnpd.pid"))
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(errf);
        let mut child = cmd.spawn().map_err(|e| io("miniupnpd", e))?;
        let t = Instant::now();
        let forwarding = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let listening = text.contains("Listening for NAT-PMP/PCP traffic");
            if listening && text.contains("Port forwarding is now enabled") {
                break true;
            }
            let failed = listening && text.contains("Port forwarding is now disabled");
            if failed && plan.behind_nat {
                break false;
            }
            let died = matches!(child.try_wait(), Ok(Some(_)));
            if failed || died || t.elapsed() > READY_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                let tail: Vec<&str> = text.lines().rev().take(4).collect();
                return Err(LabError::Upnp {
                    ns: plan.ns.clone(),
                    why: format!(
                        "miniupnpd did not start forwarding within {:?}: {}",
                        t.elapsed(),
                        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                    ),
                });
            }
            // Its log grows within ~0.15 s of the start.
            std::thread::sleep(Duration::from_millis(20));
        };
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (ns, file, stop) = (plan.ns.clone(), lease_file.clone(), stop.clone());
            std::thread::spawn(move || mirror(&ns, &file, &stop))
        };
        Ok((
            UpnpGateway {
                node: plan.node,
                ns: plan.ns.clone(),
                dir,
                lease_file,
                log,
                forwarding,
                stop,
                watcher: Some(watcher),
            },
            child,
        ))
    }

    /// The mappings miniupnpd holds now.
    pub fn leases(&self) -> Vec<Lease> {
        parse_leases(&std::fs::read_to_string(&self.lease_file).unwrap_or_default())
    }

    /// Stops the lease mirror and removes the gateway's files (the lab
    /// kills the process).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for UpnpGateway {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Mirrors the lease file into the NAT's `upnp_out` map until stopped.
fn mirror(ns: &str, file: &Path, stop: &AtomicBool) {
    // (protocol, inside endpoint) → external port, as applied.
    let mut applied: BTreeMap<(String, SocketAddrV4), u16> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        let want: BTreeMap<(String, SocketAddrV4), u16> =
            parse_leases(&std::fs::read_to_string(file).unwrap_or_default())
                .into_iter()
                .map(|l| ((l.protocol.to_lowercase(), l.internal), l.external_port))
                .collect();
        let mut script = String::new();
        for (k, ext) in &applied {
            if want.get(k) != Some(ext) {
                script.push_str(&format!(
                    "delete element ip natpunch {UPNP_OUT} {{ {} . {} . {} }}\n",
                    k.0,
                    k.1.ip(),
                    k.1.port()
                ));
            }
        }
        for (k, ext) in &want {
            if applied.get(k) != Some(ext) {
                script.push_str(&format!(
                    "add element ip natpunch {UPNP_OUT} {{ {} . {} . {} : {ext} }}\n",
                    k.0,
                    k.1.ip(),
                    k.1.port()
                ));
            }
        }
        let mut pause = WATCH_EVERY;
        if !script.is_empty() {
            match crate::topology::nft_load(ns, &script) {
                Ok(()) => applied = want,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot mirror miniupnpd's leases");
                    pause = WATCH_BACKOFF;
                }
            }
        }
        std::thread::sleep(pause);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_lines_parse_and_junk_is_skipped() {
        let l = parse_leases(
            "UDP:40000:10.0.2.2:40000:1796579236:natpunch\nTCP:80:10.0.2.2:8080:0:a:b\ngarbage\n",
        );
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].external_port, 40000);
        assert_eq!(l[0].internal, "10.0.2.2:40000".parse().unwrap());
        assert_eq!(l[0].expires, 1_796_579_236);
        assert_eq!(l[1].description, "a:b");
    }

    #[test]
    fn config_names_every_lan_and_inside_network() {
        let c = config(
            &["lan1".into(), "lan2".into()],
            &["10.0.1.0/24".into(), "10.0.2.0/24".into()],
            "203.0.113.10:3478".parse().unwrap(),
            Path::new("/tmp/x/leases"),
        );
        assert!(c.contains("listening_ip=lan1\nlistening_ip=lan2\n"));
        assert!(c.contains("ext_stun_host=203.0.113.10\next_stun_port=3478"));
        assert!(c.contains("allow 1024-65535 10.0.2.0/24 1024-65535"));
        assert!(c.ends_with("deny 0-65535 0.0.0.0/0 0-65535\n"));
    }
}
