//! Builds a lab topology out of network namespaces and veth pairs, loads
//! each NAT's rule set, shapes access links, and tears it all down.
//!
//! Addresses come only from documentation and private ranges, created
//! inside the namespaces; every veth is created inside a lab namespace with
//! its peer moved straight into another, so the host's root namespace, its
//! links and routes are never touched.
//!
//! ```text
//!   server 203.0.113.10 + .11 ── inet ── NAT A 198.51.100.2 ── host A 10.0.1.2
//!                                  └──── NAT B 198.51.100.18 ── host B 10.0.2.2
//! ```
//! A carrier NAT sits between a home NAT and `inet` on 100.64.x.0/24
//! (RFC 6598); a direct host gets 192.0.2.x.
//!
//! Teardown is guaranteed three ways: [`Lab`]'s `Drop` (normal end and
//! panics), and a reaper process in its own session that holds a pipe from
//! us and deletes the namespaces when that pipe closes, which happens
//! however we die (Ctrl-C, SIGKILL). Names carry a per-process, per-lab
//! prefix, so parallel tests never collide.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::nft::{ruleset, NatPlacement};
use crate::spec::{LinkSpec, Links, NatSpec, Side, TopologySpec};
use crate::upnp::{UpnpGateway, UpnpPlan};

/// The server's two public addresses (RFC 5780 needs two).
pub const SERVER_IPS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(203, 0, 113, 10),
    Ipv4Addr::new(203, 0, 113, 11),
];
/// The STUN/rendezvous port the lab server listens on, and its alternate.
pub const SERVER_PORTS: [u16; 2] = [3478, 3479];

/// Errors building or using a lab.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    #[error("the NAT lab needs root (network namespaces and nftables); run it with sudo")]
    NotRoot,
    #[error("the NAT lab needs `{tool}` (apt-get install {package})")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the lab server did not answer on {0}")]
    ServerNotReady(SocketAddr),
    #[error("this lab has no {0:?}")]
    NoSuchNode(Node),
    #[error("{0}")]
    Measure(String),
    #[error("namespace {0}: no router at the other end of eth0")]
    NoGateway(String),
    #[error("namespace {ns}: {why}")]
    Upnp { ns: String, why: String },
}

/// A node of the lab, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Node {
    Internet,
    Server,
    HostA,
    HostB,
    /// The NAT nearest to host A (its home NAT), or the shared one.
    NatA,
    NatB,
    /// A carrier NAT above A (or the shared carrier).
    CarrierA,
    CarrierB,
}

/// Lab-wide options.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The natpunch binary, run inside namespaces (server, delay lines).
    pub natpunch: PathBuf,
    pub links: Links,
}

/// Checks that the lab can run here: root, and the tools it calls.
pub fn preflight() -> Result<(), LabError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(LabError::NotRoot);
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("sysctl", "procps"),
    ] {
        if !on_path(tool) {
            return Err(LabError::ToolMissing { tool, package });
        }
    }
    Ok(())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running lab. Dropping it tears everything down.
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    nodes: Vec<(Node, String)>,
    hosts: Vec<(Node, Ipv4Addr)>,
    /// Every veth pair: (namespace, interface) at each end.
    wires: Vec<((String, String), (String, String))>,
    children: Vec<Child>,
    /// The server among the children.
    server_pid: Option<u32>,
    reaper: Option<Reaper>,
    natpunch: PathBuf,
    spec: TopologySpec,
    delay_lines: Vec<DelayLineInfo>,
    /// NATs with `upnp=on`, waiting for the server (miniupnpd's STUN test
    /// needs it), and the ones running.
    upnp_plans: Vec<UpnpPlan>,
    upnp: Vec<UpnpGateway>,
}

/// One running delay line: where it holds packets and its daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayLineInfo {
    pub netns: String,
    /// The interface whose arriving packets it holds.
    pub iface: String,
    pub queue: u16,
    pub pid: u32,
}

/// The kernel's counters of one NFQUEUE (`/proc/net/netfilter/nfnetlink_queue`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounters {
    /// Packets waiting for a verdict now.
    pub held: u64,
    /// Dropped because the kernel queue was full.
    pub queue_dropped: u64,
    /// Dropped because the daemon's socket was full.
    pub user_dropped: u64,
    /// Packets queued so far (the last packet id).
    pub queued: u64,
}

/// Runs `f` on a thread that has entered network namespace `ns`; sockets
/// it creates live in that namespace (threads it spawns inherit it).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, LabError> {
    use std::os::fd::AsRawFd;
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).map_err(|source| LabError::Spawn {
            command: format!("open {path}"),
            source,
        })?;
        // SAFETY: a valid namespace fd; setns only affects this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(LabError::Spawn {
                command: format!("setns {path}"),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(f())
    })
    .join()
    .map_err(|_| LabError::Command {
        command: format!("thread in {ns}"),
        stderr: "panicked".into(),
    })?
}

/// Runs a command, turning a failure into a [`LabError`] with its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String, LabError> {
    let command = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn ip(args: &[&str]) -> Result<(), LabError> {
    run(Command::new("ip").args(args)).map(|_| ())
}

impl Lab {
    /// Builds the topology. On any error, what was built is torn down.
    pub fn build(spec: &TopologySpec, opts: &LabOptions) -> Result<Lab, LabError> {
        preflight()?;
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("np{}x{n}", std::process::id());
        let mut lab = Lab {
            prefix,
            namespaces: Vec::new(),
            nodes: Vec::new(),
            hosts: Vec::new(),
            wires: Vec::new(),
            children: Vec::new(),
            server_pid: None,
            reaper: Some(Reaper::start()?),
            natpunch: opts.natpunch.clone(),
            spec: spec.clone(),
            delay_lines: Vec::new(),
            upnp_plans: Vec::new(),
            upnp: Vec::new(),
        };
        lab.build_all(spec, &opts.links)?;
        Ok(lab)
    }

    /// The per-lab name prefix (every namespace starts with it).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn spec(&self) -> &TopologySpec {
        &self.spec
    }

    /// The namespace of a node, if the topology has it.
    pub fn netns(&self, node: Node) -> Option<&str> {
        self.nodes
            .iter()
            .find(|(n, _)| *n == node)
            .map(|(_, s)| s.as_str())
    }

    /// A host's own (inside) address.
    pub fn host_ip(&self, node: Node) -> Option<Ipv4Addr> {
        self.hosts.iter().find(|(n, _)| *n == node).map(|(_, a)| *a)
    }

    /// The lab server's primary STUN address.
    pub fn server_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(SERVER_IPS[0]), SERVER_PORTS[0])
    }

    /// A command that runs `program` inside `node`'s namespace.
    pub fn command(&self, node: Node, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let ns = self.netns(node).unwrap_or("missing-node").to_string();
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns]).arg(program);
        c
    }

    /// `natpunch ARGS` inside `node`.
    pub fn natpunch(&self, node: Node) -> Command {
        self.command(node, &self.natpunch)
    }

    /// Starts a long-running process in `node`, killed at teardown; its
    /// process ID.
    pub fn spawn(&mut self, mut cmd: Command) -> Result<u32, LabError> {
        let command = describe(&cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| LabError::Spawn { command, source })?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// The process id of the server [`Lab::start_server`] started.
    pub fn server_pid(&self) -> Option<u32> {
        self.server_pid
    }

    /// Kills the server [`Lab::start_server`] started (a crash, or a
    /// restart when started again): its registrations and cookies are gone.
    pub fn stop_server(&mut self) {
        let Some(pid) = self.server_pid.take() else {
            return;
        };
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut c = self.children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts `natpunch server` (RFC 5780, both addresses) on the server
    /// node and waits until it answers.
    pub fn start_server(&mut self) -> Result<SocketAddr, LabError> {
        self.start_server_with(&[])
    }

    /// [`Lab::start_server`] with more `natpunch server` options (relay
    /// quotas, say).
    pub fn start_server_with(&mut self, extra: &[&str]) -> Result<SocketAddr, LabError> {
        let primary = self.server_addr();
        let alt = SocketAddr::new(IpAddr::V4(SERVER_IPS[1]), SERVER_PORTS[1]);
        let mut cmd = self.natpunch(Node::Server);
        cmd.args([
            "server",
            "--listen",
            &primary.to_string(),
            "--alt",
            &alt.to_string(),
        ]);
        cmd.args(extra);
        self.server_pid = Some(self.spawn(cmd)?);
        // One Binding from inside the server node: it retransmits until
        // the server is up (about 250 ms), or fails after 3.75 s.
        let mut probe = self.natpunch(Node::Server);
        probe.args(["stun", "-H", &primary.to_string()]);
        run(&mut probe).map_err(|_| LabError::ServerNotReady(primary))?;
        self.start_upnp(primary)?;
        Ok(primary)
    }

    /// Starts miniupnpd on every `upnp=on` NAT not yet serving.
    fn start_upnp(&mut self, stun: SocketAddr) -> Result<(), LabError> {
        for plan in std::mem::take(&mut self.upnp_plans) {
            if !on_path("miniupnpd") {
                return Err(LabError::ToolMissing {
                    tool: "miniupnpd",
                    package: "miniupnpd miniupnpd-nftables",
                });
            }
            let dir = std::env::temp_dir().join(format!("{}-upnp", plan.ns));
            let (gw, child) = UpnpGateway::start(&plan, stun, dir)?;
            self.children.push(child);
            self.upnp.push(gw);
        }
        Ok(())
    }

    /// The miniupnpd running on NAT `node` (`upnp=on`), once the server is
    /// up.
    pub fn upnp(&self, node: Node) -> Option<&UpnpGateway> {
        self.upnp.iter().find(|g| g.node == node)
    }

    fn add_ns(&mut self, node: Node, role: &str) -> Result<String, LabError> {
        let name = format!("{}-{role}", self.prefix);
        ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        if let Some(r) = self.reaper.as_mut() {
            r.watch(&name);
        }
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        self.nodes.push((node, name.clone()));
        Ok(name)
    }

    /// A veth pair between two namespaces, each end addressed, both up.
    fn wire(&mut self, a: (&str, &str, &str), b: (&str, &str, &str)) -> Result<(), LabError> {
        let (ns_a, if_a, _) = a;
        let (ns_b, if_b, _) = b;
        ip(&[
            "-n", ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b,
        ])?;
        for (ns, ifc, addr) in [a, b] {
            for one in addr.split(' ').filter(|s| !s.is_empty()) {
                ip(&["-n", ns, "addr", "add", one, "dev", ifc])?;
            }
            ip(&["-n", ns, "link", "set", ifc, "up"])?;
        }
        self.wires.push((
            (ns_a.to_string(), if_a.to_string()),
            (ns_b.to_string(), if_b.to_string()),
        ));
        Ok(())
    }

    fn sysctl(&self, ns: &str, kv: &str) -> Result<(), LabError> {
        run(Command::new("ip").args(["netns", "exec", ns, "sysctl", "-qw", kv])).map(|_| ())
    }

    /// Loads NAT `node`'s rules into `ns`; `lans` are its inside
    /// interfaces (where miniupnpd listens with `upnp=on`).
    fn load_nat(
        &mut self,
        node: Node,
        ns: &str,
        spec: &NatSpec,
        at: &NatPlacement,
        lans: &[&str],
    ) -> Result<(), LabError> {
        if spec.upnp {
            self.upnp_plans.push(UpnpPlan {
                node,
                ns: ns.to_string(),
                lans: lans.iter().map(|l| l.to_string()).collect(),
                inside: at.inside.clone(),
                // 100.64.0.0/10: a carrier NAT's inside.
                behind_nat: u32::from(at.public) & 0xffc0_0000 == 0x6440_0000,
            });
        }
        self.sysctl(ns, "net.ipv4.ip_forward=1")?;
        let rules = ruleset(spec, at);
        nft_load(ns, &rules)?;
        let t = spec.udp_timeout.as_secs().max(1);
        // Per-namespace conntrack timeouts = the mapping timeout (the
        // table exists once the NAT rules are loaded).
        self.sysctl(ns, &format!("net.netfilter.nf_conntrack_udp_timeout={t}"))?;
        self.sysctl(
            ns,
            &format!("net.netfilter.nf_conntrack_udp_timeout_stream={t}"),
        )?;
        Ok(())
    }

    fn build_all(&mut self, spec: &TopologySpec, links: &Links) -> Result<(), LabError> {
        let inet = self.add_ns(Node::Internet, "inet")?;
        self.sysctl(&inet, "net.ipv4.ip_forward=1")?;
        let srv = self.add_ns(Node::Server, "srv")?;
        self.wire(
            (&inet, "srv", "203.0.113.1/24"),
            (&srv, "eth0", "203.0.113.10/24 203.0.113.11/24"),
        )?;
        ip(&["-n", &srv, "route", "add", "default", "via", "203.0.113.1"])?;
        match spec {
            TopologySpec::Pair { a, b } => {
                self.build_side(&inet, 1, a)?;
                self.build_side(&inet, 2, b)?;
            }
            TopologySpec::SharedCarrier { a, b, carrier } => {
                let cgn = self.add_ns(Node::CarrierA, "cgn")?;
                self.nodes.push((Node::CarrierB, cgn.clone()));
                self.wire(
                    (&inet, "cgn", "198.51.100.49/28"),
                    (&cgn, "wan", "198.51.100.50/28"),
                )?;
                ip(&[
                    "-n",
                    &cgn,
                    "route",
                    "add",
                    "default",
                    "via",
                    "198.51.100.49",
                ])?;
                let mut inside = Vec::new();
                for (i, home) in [(1u8, a), (2u8, b)] {
                    let (nat_node, host_node) = roles(i);
                    let nat = self.add_home_nat(&cgn, &format!("lan{i}"), i, nat_node)?;
                    inside.push(format!("100.64.{i}.0/24"));
                    self.build_home(&nat, i, home, Ipv4Addr::new(100, 64, i, 2), host_node)?;
                }
                let at = NatPlacement {
                    wan: "wan".into(),
                    public: Ipv4Addr::new(198, 51, 100, 50),
                    inside,
                    stun_servers: SERVER_IPS.to_vec(),
                };
                self.load_nat(Node::CarrierA, &cgn, carrier, &at, &["lan1", "lan2"])?;
            }
            TopologySpec::SameNat { nat: spec } => {
                let nat = self.add_ns(Node::NatA, "nat")?;
                self.nodes.push((Node::NatB, nat.clone()));
                self.wire(
                    (&inet, "nat", "198.51.100.1/28"),
                    (&nat, "wan", "198.51.100.2/28"),
                )?;
                ip(&["-n", &nat, "route", "add", "default", "via", "198.51.100.1"])?;
                let mut inside = Vec::new();
                for i in [1u8, 2] {
                    let (_, host_node) = roles(i);
                    self.add_host(&nat, &format!("lan{i}"), i, host_node)?;
                    inside.push(format!("10.0.{i}.0/24"));
                }
                let at = NatPlacement {
                    wan: "wan".into(),
                    public: Ipv4Addr::new(198, 51, 100, 2),
                    inside,
                    stun_servers: SERVER_IPS.to_vec(),
                };
                self.load_nat(Node::NatA, &nat, spec, &at, &["lan1", "lan2"])?;
            }
        }
        for (node, link) in [(Node::HostA, links.a), (Node::HostB, links.b)] {
            self.impair(node, &link)?;
        }
        Ok(())
    }

    /// Side `i` (1 = A, 2 = B) on its own uplink to `inet`.
    fn build_side(&mut self, inet: &str, i: u8, side: &Side) -> Result<(), LabError> {
        let (nat_node, host_node) = roles(i);
        let base = 16 * (i - 1);
        let (inet_ip, up_ip) = (base + 1, base + 2);
        match side {
            Side::Direct => {
                self.attach_host(
                    (inet, &format!("h{i}")),
                    Ipv4Addr::new(192, 0, 2, inet_ip),
                    Ipv4Addr::new(192, 0, 2, up_ip),
                    28,
                    i,
                    host_node,
                )?;
            }
            Side::Nat(spec) => {
                let nat = self.add_ns(nat_node, &format!("nat{}", side_letter(i)))?;
                self.uplink(inet, i, &nat, inet_ip, up_ip)?;
                self.build_home(&nat, i, spec, Ipv4Addr::new(198, 51, 100, up_ip), host_node)?;
            }
            Side::DoubleNat { home, carrier } => {
                let carrier_node = if i == 1 {
                    Node::CarrierA
                } else {
                    Node::CarrierB
                };
                let cgn = self.add_ns(carrier_node, &format!("cgn{}", side_letter(i)))?;
                self.uplink(inet, i, &cgn, inet_ip, up_ip)?;
                let nat = self.add_home_nat(&cgn, "lan0", i, nat_node)?;
                let at = NatPlacement {
                    wan: "wan".into(),
                    public: Ipv4Addr::new(198, 51, 100, up_ip),
                    inside: vec![format!("100.64.{i}.0/24")],
                    stun_servers: SERVER_IPS.to_vec(),
                };
                self.load_nat(carrier_node, &cgn, carrier, &at, &["lan0"])?;
                self.build_home(&nat, i, home, Ipv4Addr::new(100, 64, i, 2), host_node)?;
            }
        }
        Ok(())
    }

    fn uplink(
        &mut self,
        inet: &str,
        i: u8,
        ns: &str,
        inet_ip: u8,
        up_ip: u8,
    ) -> Result<(), LabError> {
        self.wire(
            (inet, &format!("n{i}"), &format!("198.51.100.{inet_ip}/28")),
            (ns, "wan", &format!("198.51.100.{up_ip}/28")),
        )?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &format!("198.51.100.{inet_ip}"),
        ])
    }

    /// Host `i` behind the (already uplinked) NAT namespace `nat`.
    fn build_home(
        &mut self,
        nat: &str,
        i: u8,
        spec: &NatSpec,
        public: Ipv4Addr,
        host_node: Node,
    ) -> Result<(), LabError> {
        self.add_host(nat, "lan0", i, host_node)?;
        let at = NatPlacement {
            wan: "wan".into(),
            public,
            inside: vec![format!("10.0.{i}.0/24")],
            stun_servers: SERVER_IPS.to_vec(),
        };
        let nat_node = if i == 1 { Node::NatA } else { Node::NatB };
        self.load_nat(nat_node, nat, spec, &at, &["lan0"])
    }

    /// Home NAT `i` (100.64.i.2) on the carrier namespace's inside
    /// interface `lan`; returns its namespace.
    fn add_home_nat(
        &mut self,
        carrier: &str,
        lan: &str,
        i: u8,
        nat_node: Node,
    ) -> Result<String, LabError> {
        let nat = self.add_ns(nat_node, &format!("nat{}", side_letter(i)))?;
        self.wire(
            (carrier, lan, &format!("100.64.{i}.1/24")),
            (&nat, "wan", &format!("100.64.{i}.2/24")),
        )?;
        ip(&[
            "-n",
            &nat,
            "route",
            "add",
            "default",
            "via",
            &format!("100.64.{i}.1"),
        ])?;
        Ok(nat)
    }

    /// Host `i` (10.0.i.2) on the NAT namespace's inside interface `lan`.
    fn add_host(&mut self, nat: &str, lan: &str, i: u8, host_node: Node) -> Result<(), LabError> {
        self.attach_host(
            (nat, lan),
            Ipv4Addr::new(10, 0, i, 1),
            Ipv4Addr::new(10, 0, i, 2),
            24,
            i,
            host_node,
        )
    }

    /// Host `i` at `addr`/`prefix`, wired to `up` (namespace, interface),
    /// which gets `gateway` and is its default route.
    fn attach_host(
        &mut self,
        up: (&str, &str),
        gateway: Ipv4Addr,
        addr: Ipv4Addr,
        prefix: u8,
        i: u8,
        host_node: Node,
    ) -> Result<(), LabError> {
        let host = self.add_ns(host_node, side_letter(i))?;
        self.wire(
            (up.0, up.1, &format!("{gateway}/{prefix}")),
            (&host, "eth0", &format!("{addr}/{prefix}")),
        )?;
        ip(&[
            "-n",
            &host,
            "route",
            "add",
            "default",
            "via",
            &gateway.to_string(),
        ])?;
        // A host tuned for long fat paths (ESnet fasterdata's host tuning:
        // 64 MiB maximum TCP buffers), so kernel TCP, the benchmarks'
        // reference, can fill 1 Gbit/s at 200 ms RTT (25 MB in flight);
        // Linux's default 4 MiB send buffer caps it at 400 Mbit/s on a
        // 80 ms RTT (measured in this lab).
        self.sysctl(&host, "net.ipv4.tcp_rmem=4096 131072 67108864")?;
        self.sysctl(&host, "net.ipv4.tcp_wmem=4096 16384 67108864")?;
        self.hosts.push((host_node, addr));
        Ok(())
    }

    /// Rate (tbf), loss (nft numgen) and delay (NFQUEUE delay line) on a
    /// host's access link, both ways.
    fn impair(&mut self, node: Node, link: &LinkSpec) -> Result<(), LabError> {
        let Some(ns) = self.netns(node).map(str::to_string) else {
            return Ok(());
        };
        if let Some(kbit) = link.rate_kbit {
            // Egress of the host; ingress is shaped on the router's side of
            // the same veth, found as the host's default gateway interface.
            tbf(&ns, "eth0", kbit)?;
            if let Some((peer_ns, peer_if)) = self.peer_of(&ns) {
                tbf(&peer_ns, &peer_if, kbit)?;
            }
        }
        if link.loss > 0.0 {
            // numgen draws from 0..1_000_000: loss resolution of 1 ppm.
            let threshold = (link.loss.clamp(0.0, 1.0) * 1_000_000.0).round() as u64;
            // Each direction is dropped where it arrives (prerouting, before
            // conntrack), so a lost packet is silent as on a real link: a
            // drop in the sender's output hook would fail its sendmsg with
            // EPERM, which no real loss does.
            let drop_arriving = |iface: &str| {
                let table: String = iface
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect();
                format!(
                    "table ip natpunch_link_{table} {{\n  chain in {{\n    type filter hook prerouting priority -300; policy accept;\n    iifname \"{iface}\" numgen random mod 1000000 < {threshold} drop\n  }}\n}}\n"
                )
            };
            nft_load(&ns, &drop_arriving("eth0"))?;
            let Some((peer_ns, peer_if)) = self.peer_of(&ns) else {
                return Err(LabError::NoGateway(ns));
            };
            nft_load(&peer_ns, &drop_arriving(&peer_if))?;
        }
        if let Some(delay) = link.delay {
            if !on_path("iptables") {
                return Err(LabError::ToolMissing {
                    tool: "iptables",
                    package: "iptables",
                });
            }
            let Some((peer_ns, peer_if)) = self.peer_of(&ns) else {
                return Err(LabError::NoGateway(ns));
            };
            // Each direction is held where it *arrives* (PREROUTING), never
            // in the sender's OUTPUT hook: a packet held there is still
            // charged to its socket, and TCP small queues then cap the
            // sender at a few packets per delay (4.4 Mbit/s at 10 ms,
            // measured). On arrival the skb has crossed the veth and
            // belongs to no socket, as on a real wire.
            let queue_of_side = match node {
                Node::HostB => 12,
                _ => 11,
            };
            for (line_ns, iface, queue) in [
                (ns.as_str(), "eth0", 1u16),
                (&peer_ns, &peer_if, queue_of_side),
            ] {
                self.delay_line(line_ns, iface, queue, delay)?;
            }
        }
        Ok(())
    }

    /// Holds every packet arriving on `iface` in namespace `ns` for
    /// `delay`: an `NFQUEUE` rule (the kernel has no nft `queue`
    /// expression) and a `natpunch lab delay-line` daemon bound to it.
    fn delay_line(
        &mut self,
        ns: &str,
        iface: &str,
        queue: u16,
        delay: Duration,
    ) -> Result<(), LabError> {
        // --queue-bypass lets packets through (undelayed) rather than
        // dropping them whenever no daemon is bound to the queue. The raw
        // table runs before conntrack: a packet held after conntrack (in
        // mangle) holds an unconfirmed entry, and the next packet of its
        // flow gets a second one, which a NAT maps to another port (the
        // lab's sequential NATs stopped being predictable).
        let queue_num = queue.to_string();
        run(Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "iptables",
            "-t",
            "raw",
            "-A",
            "PREROUTING",
            "-i",
            iface,
            "-j",
            "NFQUEUE",
            "--queue-num",
            &queue_num,
            "--queue-bypass",
        ]))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(&self.natpunch).args([
            "lab",
            "delay-line",
            "--queue",
            &queue_num,
            "--delay-ms",
            &delay.as_millis().to_string(),
        ]);
        let pid = self.spawn(cmd)?;
        wait_queue_bound(ns, queue)?;
        self.delay_lines.push(DelayLineInfo {
            netns: ns.to_string(),
            iface: iface.to_string(),
            queue,
            pid,
        });
        Ok(())
    }

    /// The delay lines this lab runs (two per delayed access link).
    pub fn delay_lines(&self) -> &[DelayLineInfo] {
        &self.delay_lines
    }

    /// The kernel's counters for a delay line's queue.
    pub fn queue_counters(&self, line: &DelayLineInfo) -> Result<QueueCounters, LabError> {
        let table = run(Command::new("ip").args([
            "netns",
            "exec",
            &line.netns,
            "cat",
            "/proc/net/netfilter/nfnetlink_queue",
        ]))?;
        // Columns: queue, portid, held, copy mode, copy range,
        // queue_dropped, user_dropped, id_sequence, 1.
        table
            .lines()
            .find_map(|l| {
                let f: Vec<u64> = l
                    .split_whitespace()
                    .map(|c| c.parse().unwrap_or(0))
                    .collect();
                (f.first() == Some(&u64::from(line.queue)) && f.len() >= 8).then(|| QueueCounters {
                    held: f[2],
                    queue_dropped: f[5],
                    user_dropped: f[6],
                    queued: f[7],
                })
            })
            .ok_or_else(|| LabError::Command {
                command: format!("NFQUEUE {} in {}", line.queue, line.netns),
                stderr: "queue not bound".into(),
            })
    }

    /// The namespace and interface on the other end of a host's eth0.
    fn peer_of(&self, host_ns: &str) -> Option<(String, String)> {
        self.wires.iter().find_map(|(a, b)| {
            if a.0 == host_ns && a.1 == "eth0" {
                Some(b.clone())
            } else if b.0 == host_ns && b.1 == "eth0" {
                Some(a.clone())
            } else {
                None
            }
        })
    }

    /// Forgets every NAT mapping on a node (conntrack flush and our maps):
    /// what a NAT reboot or a rebinding looks like to the hosts.
    pub fn flush_nat(&self, node: Node) -> Result<(), LabError> {
        let ns = self.netns(node).unwrap_or("missing-node");
        for set in ["eim", "adm", "rev", "adf"] {
            let _ = run(Command::new("ip").args([
                "netns", "exec", ns, "nft", "flush", "set", "ip", "natpunch", set,
            ]));
            let _ = run(Command::new("ip").args([
                "netns", "exec", ns, "nft", "flush", "map", "ip", "natpunch", set,
            ]));
        }
        if on_path("conntrack") {
            let _ = run(Command::new("ip").args(["netns", "exec", ns, "conntrack", "-F"]));
        }
        Ok(())
    }

    /// Forwards TCP port `port` on a NAT's outside interface to a host
    /// behind it: the manual port forward users set on a home router.
    pub fn forward_tcp(&self, nat: Node, host: Node, port: u16) -> Result<(), LabError> {
        let ns = self.netns(nat).ok_or(LabError::NoSuchNode(nat))?;
        let ip = self.host_ip(host).ok_or(LabError::NoSuchNode(host))?;
        nft_load(
            ns,
            &format!("table ip natpunch_fwd {{\n  chain pre {{\n    type nat hook prerouting priority dstnat - 10; policy accept;\n    iifname \"wan\" tcp dport {port} dnat ip to {ip}\n  }}\n}}\n"),
        )
    }

    /// Drops all UDP between the hosts behind `nat` and `peer` (a public
    /// address), both ways, until [`Lab::unblock_udp`]: a firewall rule
    /// that closes the direct path while the server (and the relay) stays
    /// reachable.
    pub fn block_udp(&self, nat: Node, peer: Ipv4Addr) -> Result<(), LabError> {
        let ns = self.netns(nat).ok_or(LabError::NoSuchNode(nat))?;
        nft_load(
            ns,
            &format!("table ip natpunch_block {{\n  chain cut {{\n    type filter hook forward priority filter - 10; policy accept;\n    ip daddr {peer} meta l4proto udp drop\n    ip saddr {peer} meta l4proto udp drop\n  }}\n}}\n"),
        )
    }

    /// Lifts [`Lab::block_udp`].
    pub fn unblock_udp(&self, nat: Node) -> Result<(), LabError> {
        let ns = self.netns(nat).ok_or(LabError::NoSuchNode(nat))?;
        run(Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "nft",
            "delete",
            "table",
            "ip",
            "natpunch_block",
        ]))
        .map(|_| ())
    }

    /// A NAT's outside (public) address.
    pub fn wan_ip(&self, nat: Node) -> Result<Ipv4Addr, LabError> {
        let ns = self.netns(nat).ok_or(LabError::NoSuchNode(nat))?;
        let out =
            run(Command::new("ip").args(["-n", ns, "-4", "-o", "addr", "show", "dev", "wan"]))?;
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|cidr| cidr.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or(LabError::NoSuchNode(nat))
    }

    /// Tears everything down now (also done on drop).
    pub fn teardown(&mut self) {
        for g in &mut self.upnp {
            g.stop();
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        for ns in self.namespaces.drain(..).rev() {
            if let Ok(pids) = run(Command::new("ip").args(["netns", "pids", &ns])) {
                for p in pids
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe {
                        libc::kill(p, libc::SIGKILL);
                    }
                }
            }
            let _ = ip(&["netns", "del", &ns]);
        }
        if let Some(r) = self.reaper.take() {
            r.finish();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn roles(i: u8) -> (Node, Node) {
    if i == 1 {
        (Node::NatA, Node::HostA)
    } else {
        (Node::NatB, Node::HostB)
    }
}

fn side_letter(i: u8) -> &'static str {
    if i == 1 {
        "a"
    } else {
        "b"
    }
}

/// Polls the namespace's nfnetlink_queue table until `queue` is bound with
/// metadata-only copy mode (the delay line's last setup step).
fn wait_queue_bound(ns: &str, queue: u16) -> Result<(), LabError> {
    // Binding takes a few ms; 5 s covers a loaded CI machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let table = run(Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "cat",
            "/proc/net/netfilter/nfnetlink_queue",
        ]))?;
        // Columns: queue, portid, queued, copy mode (1 = metadata), ...
        let bound = table.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&queue.to_string().as_str()) && f.get(3) == Some(&"1")
        });
        if bound {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(LabError::Command {
        command: format!("natpunch lab delay-line --queue {queue} (in {ns})"),
        stderr: "the delay line did not bind its queue within 5 s".into(),
    })
}

fn tbf(ns: &str, ifname: &str, kbit: u64) -> Result<(), LabError> {
    // Burst: 10 ms worth of data (at least 16 kB) so short bursts pass at
    // line rate; latency 200 ms bounds the queue like a home router's.
    let burst = (kbit * 1000 / 8 / 100).max(16_000);
    run(Command::new("ip")
        .args([
            "netns", "exec", ns, "tc", "qdisc", "replace", "dev", ifname, "root", "tbf",
        ])
        .args([
            "rate",
            &format!("{kbit}kbit"),
            "burst",
            &burst.to_string(),
            "latency",
            "200ms",
        ]))
    .map(|_| ())
}

/// Loads an nft rule set from our own generated text (never from
/// `nft list ruleset` output, which for map-based SNAT cannot be reloaded).
pub(crate) fn nft_load(ns: &str, rules: &str) -> Result<(), LabError> {
    let command = format!("ip netns exec {ns} nft -f -");
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(rules.as_bytes());
    }
    let out = child.wait_with_output().map_err(|source| LabError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command,
            stderr: format!(
                "{}\n--- rules ---\n{rules}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// Deletes namespaces left by lab runs whose process is gone (a previous
/// run killed before its reaper could act, e.g. on a crashed machine).
pub fn sweep_stale() -> Result<Vec<String>, LabError> {
    let out = run(Command::new("ip").args(["netns", "list"]))?;
    let mut removed = Vec::new();
    for line in out.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("np") else {
            continue;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = ip(&["netns", "del", name]);
        removed.push(name.to_string());
    }
    Ok(removed)
}

/// A process in its own session that deletes the namespaces it is told
/// about once our end of its pipe closes, however this process ends
/// (return, panic, Ctrl-C, SIGKILL). Anything that creates namespaces for
/// a test should hold one.
pub struct Reaper {
    child: Child,
    stdin: ChildStdin,
}

impl Reaper {
    /// Starts the reaper (`sh`, reading names until end of input).
    pub fn start() -> Result<Reaper, LabError> {
        // It kills what runs in each namespace, then deletes it. setsid
        // keeps the terminal's Ctrl-C from reaching it.
        let script = "while read ns; do set -- \"$@\" \"$ns\"; done; \
                      for ns in \"$@\"; do for p in $(ip netns pids \"$ns\" 2>/dev/null); do kill -9 \"$p\" 2>/dev/null; done; \
                      ip netns del \"$ns\" 2>/dev/null; done; exit 0";
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe and touches no shared state.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| LabError::Spawn {
            command: "sh (lab reaper)".into(),
            source,
        })?;
        let stdin = child.stdin.take().ok_or_else(|| LabError::Command {
            command: "sh (lab reaper)".into(),
            stderr: "no stdin pipe".into(),
        })?;
        Ok(Reaper { child, stdin })
    }

    /// Adds a namespace to delete.
    pub fn watch(&mut self, ns: &str) {
        let _ = writeln!(self.stdin, "{ns}");
        let _ = self.stdin.flush();
    }

    /// Closes the pipe (the reaper deletes what is left) and waits for it.
    pub fn finish(self) {
        let Reaper { mut child, stdin } = self;
        drop(stdin);
        let _ = child.wait();
    }
}
