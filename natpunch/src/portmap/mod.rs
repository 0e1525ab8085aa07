//! Port mapping: asks the gateway to forward a port to our main socket,
//! by PCP (RFC 6887), NAT-PMP (RFC 6886) and UPnP IGD at once, and keeps
//! the first mapping that works: renewed at half its lease, deleted when
//! the peer stops (normal exit, Ctrl-C, SIGTERM: every path through the
//! peer driver's end). The protocols are spoken by `crab_nat` (PCP and
//! NAT-PMP) and `igd-next` (UPnP: SSDP discovery, SOAP control); what to
//! announce and when to renew are the sans-IO decisions of
//! [`natpunch_proto::portmap`].
//!
//! A mapped port is announced as our best candidate: the peer sends to it
//! and reaches our socket whatever either NAT does. A gateway whose own
//! external address is private (double NAT, carrier-grade NAT) gets a
//! mapping that only the network between the two NATs can use: it is
//! reported and not announced.

pub mod gateway;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crab_nat::{natpmp, pcp, GatewayAddress, InternetProtocol, PortMappingOptions, TimeoutConfig};
use igd_next::aio::tokio::Tokio;
use igd_next::aio::Gateway;
use igd_next::{PortMappingProtocol, SearchOptions};
use natpunch_proto::portmap::{check_external, renew_after, MapProtocol, Mapped, Unusable};
use tokio::sync::{mpsc, oneshot};

/// Settings.
#[derive(Debug, Clone)]
pub struct PortmapConfig {
    /// The lease asked for.
    pub lease: Duration,
    /// How long each protocol may take to answer before it counts as
    /// absent.
    pub timeout: Duration,
    /// The protocols raced (all three by default).
    pub protocols: Vec<MapProtocol>,
}

pub mod defaults {
    use std::time::Duration;
    /// RFC 6886 §3.3's recommended lifetime (two hours); renewed at half.
    pub const LEASE: Duration = Duration::from_secs(7200);
    /// The longest retransmission timeout, and how long an SSDP search
    /// waits (UPnP devices answer within the M-SEARCH's MX of 1-2 s); one
    /// protocol's whole answer is bounded by twice this ([`bound`]). It
    /// runs beside the connect and delays nothing.
    pub const TIMEOUT: Duration = Duration::from_secs(3);
    /// Deleting on exit waits at most this long for the gateway: exit
    /// must stay prompt when the gateway went away.
    pub const DELETE_TIMEOUT: Duration = Duration::from_secs(2);
    /// After a lost mapping (or none at all), the next try: gateways get
    /// rebooted and UPnP gets switched on.
    pub const RETRY: Duration = Duration::from_secs(60);
    /// A failed renewal is tried again this often (or at half the time
    /// left, when the lease is short) until the lease runs out.
    pub const RENEW_RETRY: Duration = Duration::from_secs(5);
    /// A renewal may take this long: NAT-PMP's and PCP's four tries (at
    /// most 3.75 s) or a UPnP SOAP round trip, with room.
    pub const RENEW_BOUND: Duration = Duration::from_secs(8);
    /// How long after the last expected answer a dead lease is let go:
    /// nothing (the next renewal comes well before), only a name for the
    /// sleep of a permanent UPnP lease.
    pub const NEVER: Duration = Duration::from_secs(86_400);
    /// NAT-PMP's and PCP's first retransmission timeout (RFC 6886 §3.1:
    /// 250 ms, doubling).
    pub const FIRST_RTO: Duration = Duration::from_millis(250);
    /// Retransmissions after the first request (250+500+1000+2000 ms).
    pub const RETRIES: usize = 3;
}

/// One protocol's whole exchange may take twice the configured timeout:
/// NAT-PMP's and PCP's tries (250 + 500 + 1000 + 2000 ms with the 3 s
/// cap), or an SSDP search and then the HTTP request.
fn bound(cfg: &PortmapConfig) -> Duration {
    cfg.timeout * 2
}

/// How long [`Portmapper::shutdown`] waits at most: a race still under way
/// finishing and its mapping deleted, each bounded by
/// [`defaults::DELETE_TIMEOUT`], and a moment for the task to end.
pub const SHUTDOWN_BOUND: Duration = Duration::from_millis(4_500);

impl Default for PortmapConfig {
    fn default() -> Self {
        Self {
            lease: defaults::LEASE,
            timeout: defaults::TIMEOUT,
            protocols: MapProtocol::ALL.to_vec(),
        }
    }
}

/// What went wrong with one protocol.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PortmapError {
    #[error("cannot read the routing table: {0}")]
    RouteTable(#[source] std::io::Error),
    #[error("no default gateway")]
    NoGateway,
    #[error("the main socket's port is 0")]
    NoPort,
    #[error("the socket is on a loopback address: no gateway maps it")]
    Loopback,
    #[error("the socket is IPv6: NAT-PMP, PCP over IPv4 and UPnP IGD map IPv4 ports")]
    NotIpv4,
    #[error("the gateway granted a lifetime of 0 (no mapping)")]
    ZeroLifetime,
    #[error("not asked")]
    NotAsked,
    #[error("PCP: {0}")]
    Pcp(#[from] pcp::Failure),
    #[error("NAT-PMP: {0}")]
    NatPmp(#[from] natpmp::Failure),
    #[error("UPnP: no gateway answered the search: {0}")]
    UpnpSearch(#[from] igd_next::SearchError),
    #[error("UPnP: no external address: {0}")]
    UpnpExternal(#[from] igd_next::GetExternalIpError),
    #[error("UPnP: mapping refused: {0}")]
    UpnpAdd(#[from] igd_next::AddPortError),
    #[error("UPnP: mapping refused: {0}")]
    UpnpAddAny(#[from] igd_next::AddAnyPortError),
    #[error("UPnP: deletion refused: {0}")]
    UpnpRemove(#[from] igd_next::RemovePortError),
    #[error("the gateway's external address is IPv6 while the port is IPv4")]
    Family,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// What the port mapper tells the peer driver.
#[derive(Debug, Clone)]
pub enum PortmapNews {
    /// A mapping is up (new, or renewed at another address).
    Mapped(Mapped),
    /// A gateway mapped the port, but its external address is of no use
    /// to peers; the mapping was deleted again.
    Unusable {
        protocol: MapProtocol,
        why: Unusable,
    },
    /// No protocol mapped the port: each one's reason.
    Unavailable { reasons: Vec<(MapProtocol, String)> },
    /// The mapping could not be renewed and has expired.
    Lost {
        protocol: MapProtocol,
        reason: String,
    },
}

/// A running port mapper; [`Portmapper::shutdown`] deletes the mapping.
#[derive(Debug)]
pub struct Portmapper {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Portmapper {
    /// Maps `local`'s UDP port (its IP is the internal client address),
    /// reporting on `news`.
    pub fn spawn(
        local: SocketAddr,
        cfg: PortmapConfig,
        news: mpsc::UnboundedSender<PortmapNews>,
    ) -> Self {
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(keep(local, cfg, news, stop_rx));
        Self {
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    /// Deletes the mapping (waiting at most [`SHUTDOWN_BOUND`] for the
    /// gateway) and stops.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(SHUTDOWN_BOUND, t).await;
        }
    }
}

impl Drop for Portmapper {
    fn drop(&mut self) {
        // Dropped without shutdown (a panic path): the task still deletes
        // the mapping if the runtime lets it run.
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A mapping held on the gateway.
enum Lease {
    /// PCP or NAT-PMP.
    Crab {
        mapping: crab_nat::PortMapping,
        protocol: MapProtocol,
        external_ip: IpAddr,
    },
    Upnp {
        gateway: Box<Gateway<Tokio>>,
        external: SocketAddr,
        local: SocketAddr,
        lifetime: Duration,
    },
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("mapped", &self.mapped())
            .field("lifetime", &self.lifetime())
            .finish()
    }
}

impl Lease {
    fn mapped(&self) -> Mapped {
        match self {
            Lease::Crab {
                mapping,
                protocol,
                external_ip,
            } => Mapped {
                addr: SocketAddr::new(*external_ip, mapping.external_port().get()),
                protocol: *protocol,
            },
            Lease::Upnp { external, .. } => Mapped {
                addr: *external,
                protocol: MapProtocol::Upnp,
            },
        }
    }

    fn lifetime(&self) -> Duration {
        match self {
            Lease::Crab { mapping, .. } => Duration::from_secs(u64::from(mapping.lifetime())),
            Lease::Upnp { lifetime, .. } => *lifetime,
        }
    }

    async fn renew(&mut self) -> Result<(), PortmapError> {
        match self {
            Lease::Crab {
                mapping,
                external_ip,
                ..
            } => {
                mapping.renew().await.map_err(|e| match e {
                    crab_nat::MappingFailure::NatPmp(f) => PortmapError::NatPmp(f),
                    crab_nat::MappingFailure::Pcp(f) => PortmapError::Pcp(f),
                })?;
                if mapping.lifetime() == 0 {
                    return Err(PortmapError::ZeroLifetime);
                }
                match mapping.mapping_type() {
                    crab_nat::PortMappingType::Pcp {
                        external_ip: ip, ..
                    } => {
                        *external_ip = unmap(ip);
                    }
                    // NAT-PMP's answer has no address: ask again, the WAN
                    // address may have changed.
                    crab_nat::PortMappingType::NatPmp => {
                        let ip = natpmp::external_address(
                            mapping.gateway(),
                            Some(mapping.timeout_config),
                        )
                        .await?;
                        *external_ip = IpAddr::V4(ip);
                    }
                }
                Ok(())
            }
            Lease::Upnp {
                gateway,
                external,
                local,
                lifetime,
            } => {
                gateway
                    .add_port(
                        PortMappingProtocol::UDP,
                        external.port(),
                        *local,
                        lease_secs(*lifetime),
                        DESCRIPTION,
                    )
                    .await?;
                Ok(())
            }
        }
    }

    async fn delete(self) -> Result<(), PortmapError> {
        match self {
            Lease::Crab { mapping, .. } => match mapping.try_drop().await {
                Ok(()) => Ok(()),
                Err((crab_nat::MappingFailure::NatPmp(f), _)) => Err(PortmapError::NatPmp(f)),
                Err((crab_nat::MappingFailure::Pcp(f), _)) => Err(PortmapError::Pcp(f)),
            },
            Lease::Upnp {
                gateway, external, ..
            } => Ok(gateway
                .remove_port(PortMappingProtocol::UDP, external.port())
                .await?),
        }
    }
}

/// What the mapping is called on the gateway (`upnpc -l` shows it).
const DESCRIPTION: &str = "natpunch";

/// A lease in whole seconds, at least 1 (0 would ask for a deletion).
fn lease_secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX).max(1)
}

fn timeouts(cfg: &PortmapConfig) -> TimeoutConfig {
    TimeoutConfig {
        initial_timeout: defaults::FIRST_RTO,
        max_retries: defaults::RETRIES,
        max_retry_timeout: Some(cfg.timeout),
    }
}

/// PCP: a MAP request for our port, asking for the same external port.
async fn map_pcp(
    gw: Ipv4Addr,
    local: SocketAddr,
    port: NonZeroU16,
    cfg: &PortmapConfig,
) -> Result<Lease, PortmapError> {
    let mapping = pcp::port_mapping(
        pcp::BaseMapRequest::new(
            GatewayAddress::IpV4(gw),
            local.ip(),
            InternetProtocol::Udp,
            port,
        ),
        None,
        None,
        options(port, cfg),
    )
    .await?;
    if mapping.lifetime() == 0 {
        return Err(PortmapError::ZeroLifetime);
    }
    let external_ip = match mapping.mapping_type() {
        crab_nat::PortMappingType::Pcp { external_ip, .. } => external_ip,
        crab_nat::PortMappingType::NatPmp => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    Ok(Lease::Crab {
        mapping,
        protocol: MapProtocol::Pcp,
        external_ip: unmap(external_ip),
    })
}

/// PCP carries IPv4 addresses as IPv4-mapped IPv6 (RFC 6887 §5).
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn options(port: NonZeroU16, cfg: &PortmapConfig) -> PortMappingOptions {
    PortMappingOptions {
        external_port: Some(port),
        lifetime_seconds: Some(lease_secs(cfg.lease)),
        timeout_config: Some(timeouts(cfg)),
    }
}

/// NAT-PMP: a mapping for our port (the external address was asked
/// already).
async fn map_natpmp(
    gw: Ipv4Addr,
    port: NonZeroU16,
    external: Ipv4Addr,
    cfg: &PortmapConfig,
) -> Result<Lease, PortmapError> {
    let gateway = GatewayAddress::IpV4(gw);
    let mapping =
        natpmp::port_mapping(gateway, InternetProtocol::Udp, port, options(port, cfg)).await?;
    if mapping.lifetime() == 0 {
        return Err(PortmapError::ZeroLifetime);
    }
    Ok(Lease::Crab {
        mapping,
        protocol: MapProtocol::NatPmp,
        external_ip: IpAddr::V4(external),
    })
}

/// Finds the IGD by SSDP from our own address (so the search leaves by
/// the main socket's interface).
async fn find_igd(local: SocketAddr, cfg: &PortmapConfig) -> Result<Gateway<Tokio>, PortmapError> {
    let mut opts = SearchOptions::default();
    opts.bind_addr = SocketAddr::new(local.ip(), 0);
    opts.timeout = Some(cfg.timeout);
    opts.single_search_timeout = Some(cfg.timeout);
    Ok(igd_next::aio::tokio::search_gateway(opts).await?)
}

/// UPnP IGD (found already): external address, then the same external
/// port as ours, or any port when that one is taken.
async fn map_upnp(
    gateway: Gateway<Tokio>,
    local: SocketAddr,
    cfg: &PortmapConfig,
) -> Result<Lease, PortmapError> {
    let ip = gateway.get_external_ip().await?;
    if ip.is_ipv6() != local.is_ipv6() {
        return Err(PortmapError::Family);
    }
    let mut lifetime = cfg.lease;
    let first = gateway
        .add_port(
            PortMappingProtocol::UDP,
            local.port(),
            local,
            lease_secs(lifetime),
            DESCRIPTION,
        )
        .await;
    let port = match first {
        Ok(()) => local.port(),
        Err(igd_next::AddPortError::OnlyPermanentLeasesSupported) => {
            // IGDv1 gateways that take only permanent mappings: 0, which
            // needs no renewal and is deleted on exit like any other.
            lifetime = Duration::ZERO;
            gateway
                .add_port(
                    PortMappingProtocol::UDP,
                    local.port(),
                    local,
                    0,
                    DESCRIPTION,
                )
                .await?;
            local.port()
        }
        Err(igd_next::AddPortError::PortInUse) => {
            gateway
                .add_any_port(
                    PortMappingProtocol::UDP,
                    local,
                    lease_secs(lifetime),
                    DESCRIPTION,
                )
                .await?
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Lease::Upnp {
        gateway: Box::new(gateway),
        external: SocketAddr::new(ip, port),
        local,
        lifetime,
    })
}

/// `f`, or a timeout error after `bound`.
async fn within<T>(
    bound: Duration,
    f: impl std::future::Future<Output = Result<T, PortmapError>>,
) -> Result<T, PortmapError> {
    tokio::time::timeout(bound, f)
        .await
        .unwrap_or(Err(PortmapError::Timeout(bound)))
}

/// Asks all at once, maps with one. PCP's only question is a MAP
/// request, so PCP maps at once; NAT-PMP (its external-address query) and
/// UPnP (SSDP search) are only asked, in parallel. The mapping is PCP's as
/// soon as that works; once PCP has failed, NAT-PMP's as soon as it
/// answered; once both have failed, UPnP's. Nothing waits for a slower
/// protocol that would not be used. Mapping one port by two protocols on
/// one gateway would make a single entry that the second one owns, and
/// miniupnpd then refuses the first one's deletion ("Unauthorized to
/// remove PCP mapping"), so at most one maps.
/// Counts the mapping requests in flight (a search or an address query
/// makes nothing that would need deleting).
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `f`, counted in `n` while it runs.
async fn counted<T>(n: &AtomicUsize, f: impl std::future::Future<Output = T>) -> T {
    let _guard = InFlight::new(n);
    f.await
}

async fn race(
    local: SocketAddr,
    cfg: &PortmapConfig,
    mapping: &AtomicUsize,
) -> Result<Lease, Vec<(MapProtocol, String)>> {
    let refuse = |e: PortmapError| {
        let why = e.to_string();
        Err(cfg.protocols.iter().map(|p| (*p, why.clone())).collect())
    };
    if local.ip().is_loopback() {
        return refuse(PortmapError::Loopback);
    }
    if !local.is_ipv4() {
        return refuse(PortmapError::NotIpv4);
    }
    let gw = match gateway::default_gateway() {
        Ok(gw) => gw,
        Err(e) => return refuse(e),
    };
    let Some(port) = NonZeroU16::new(local.port()) else {
        return refuse(PortmapError::NoPort);
    };
    let limit = bound(cfg);
    let wants = |p| cfg.protocols.contains(&p);
    fn skipped<T>() -> Result<T, PortmapError> {
        Err(PortmapError::NotAsked)
    }
    let mut pcp_f = std::pin::pin!(counted(
        mapping,
        within(limit, map_pcp(gw, local, port, cfg))
    ));
    let mut natpmp_f = std::pin::pin!(within(limit, async {
        Ok(natpmp::external_address(GatewayAddress::IpV4(gw), Some(timeouts(cfg))).await?)
    }));
    let mut upnp_f = std::pin::pin!(within(limit, find_igd(local, cfg)));
    // None: still asking; a protocol not wanted counts as failed at once.
    let mut pcp = (!wants(MapProtocol::Pcp)).then(skipped);
    let mut nat = (!wants(MapProtocol::NatPmp)).then(skipped);
    let mut upnp = (!wants(MapProtocol::Upnp)).then(skipped);
    let mut reasons = Vec::new();
    let note = |p: MapProtocol, e: PortmapError, reasons: &mut Vec<(MapProtocol, String)>| {
        // A failure is noted once; it then stands as "not asked".
        if wants(p) && !matches!(e, PortmapError::NotAsked) {
            tracing::debug!(protocol = %p, error = %e, "no mapping");
            reasons.push((p, e.to_string()));
        }
    };
    loop {
        // Decide as far as the answers so far allow, in preference order.
        match pcp.take() {
            Some(Ok(lease)) => return Ok(lease),
            Some(Err(e)) => {
                note(MapProtocol::Pcp, e, &mut reasons);
                pcp = Some(skipped());
            }
            None => {}
        }
        let pcp_failed = pcp.is_some();
        if pcp_failed {
            match nat.take() {
                Some(Ok(external)) => {
                    match counted(mapping, within(limit, map_natpmp(gw, port, external, cfg))).await
                    {
                        Ok(lease) => return Ok(lease),
                        Err(e) => {
                            note(MapProtocol::NatPmp, e, &mut reasons);
                            nat = Some(skipped());
                        }
                    }
                }
                Some(Err(e)) => {
                    note(MapProtocol::NatPmp, e, &mut reasons);
                    nat = Some(skipped());
                }
                None => {}
            }
        }
        if pcp_failed && nat.is_some() {
            match upnp.take() {
                Some(Ok(igd)) => {
                    return match counted(mapping, within(limit, map_upnp(igd, local, cfg))).await {
                        Ok(lease) => Ok(lease),
                        Err(e) => {
                            note(MapProtocol::Upnp, e, &mut reasons);
                            Err(reasons)
                        }
                    };
                }
                Some(Err(e)) => {
                    note(MapProtocol::Upnp, e, &mut reasons);
                    return Err(reasons);
                }
                None => {}
            }
        }
        tokio::select! {
            r = &mut pcp_f, if pcp.is_none() => pcp = Some(r),
            r = &mut natpmp_f, if nat.is_none() => nat = Some(r),
            r = &mut upnp_f, if upnp.is_none() => upnp = Some(r),
            // (Every answer in: decided above; never reached.)
            else => return Err(reasons),
        }
    }
}

/// The port mapper's life: map, announce, renew, and delete on stop.
async fn keep(
    local: SocketAddr,
    cfg: PortmapConfig,
    news: mpsc::UnboundedSender<PortmapNews>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let mapping = AtomicUsize::new(0);
        let mut racing = std::pin::pin!(race(local, &cfg, &mapping));
        let lease = tokio::select! {
            r = &mut racing => r,
            _ = &mut stop => {
                // A mapping the gateway may be granting right now is
                // deleted, not left to live out its lease. Only a search
                // or a query under way: nothing to wait for (a short
                // session on a network without UPnP exits at once).
                if mapping.load(Ordering::Relaxed) == 0 {
                    return;
                }
                if let Ok(Ok(lease)) = tokio::time::timeout(defaults::DELETE_TIMEOUT, racing).await {
                    let _ = tokio::time::timeout(defaults::DELETE_TIMEOUT, lease.delete()).await;
                }
                return;
            }
        };
        let lease = match lease {
            Ok(lease) => lease,
            Err(reasons) => {
                let _ = news.send(PortmapNews::Unavailable { reasons });
                tokio::select! {
                    _ = tokio::time::sleep(defaults::RETRY) => continue,
                    _ = &mut stop => return,
                }
            }
        };
        let mapped = lease.mapped();
        if let Err(why) = check_external(mapped.addr.ip(), None) {
            let _ = news.send(PortmapNews::Unusable {
                protocol: mapped.protocol,
                why,
            });
            let _ = tokio::time::timeout(defaults::DELETE_TIMEOUT, lease.delete()).await;
            // Gateways get their WAN address later, and double NATs get
            // taken apart: ask again now and then.
            tokio::select! {
                _ = tokio::time::sleep(defaults::RETRY) => continue,
                _ = &mut stop => return,
            }
        }
        let _ = news.send(PortmapNews::Mapped(mapped));
        match hold(lease, &news, &mut stop).await {
            Held::Stopped => return,
            Held::Lost => {
                tokio::select! {
                    _ = tokio::time::sleep(defaults::RETRY) => continue,
                    _ = &mut stop => return,
                }
            }
        }
    }
}

enum Held {
    Stopped,
    Lost,
}

async fn delete_on_stop(lease: Lease) -> Held {
    let mapped = lease.mapped();
    match tokio::time::timeout(defaults::DELETE_TIMEOUT, lease.delete()).await {
        Ok(Ok(())) => tracing::debug!(?mapped, "mapping deleted"),
        Ok(Err(e)) => tracing::warn!(?mapped, error = %e, "could not delete the port mapping"),
        Err(_) => tracing::warn!(?mapped, "the gateway did not answer the deletion"),
    }
    Held::Stopped
}

/// Renews `lease` at half-life until stopped (then deletes it, even in the
/// middle of a renewal) or lost.
async fn hold(
    mut lease: Lease,
    news: &mpsc::UnboundedSender<PortmapNews>,
    stop: &mut oneshot::Receiver<()>,
) -> Held {
    let start = tokio::time::Instant::now();
    let mut expires = start + lease.lifetime();
    let mut next = renew_after(lease.lifetime()).map(|d| start + d);
    loop {
        let wake = next.unwrap_or_else(|| tokio::time::Instant::now() + defaults::NEVER);
        tokio::select! {
            _ = &mut *stop => return delete_on_stop(lease).await,
            _ = tokio::time::sleep_until(wake) => {}
        }
        if next.is_none() {
            continue;
        }
        let before = lease.mapped();
        let renewed = tokio::select! {
            r = within(defaults::RENEW_BOUND, lease.renew()) => Some(r),
            _ = &mut *stop => None,
        };
        let Some(renewed) = renewed else {
            return delete_on_stop(lease).await;
        };
        let now = tokio::time::Instant::now();
        match renewed {
            Ok(()) => {
                expires = now + lease.lifetime();
                next = renew_after(lease.lifetime()).map(|d| now + d);
                tracing::debug!(mapped = ?lease.mapped(), lifetime = ?lease.lifetime(), "mapping renewed");
                if lease.mapped() != before {
                    let _ = news.send(PortmapNews::Mapped(lease.mapped()));
                }
            }
            Err(e) => {
                let left = expires.saturating_duration_since(now);
                let retry = defaults::RENEW_RETRY.min(left / 2);
                if retry.is_zero() {
                    let _ = news.send(PortmapNews::Lost {
                        protocol: before.protocol,
                        reason: e.to_string(),
                    });
                    return Held::Lost;
                }
                tracing::debug!(error = %e, ?retry, "renewal failed; trying again");
                next = Some(now + retry);
            }
        }
    }
}

/// One protocol's answer, for `natpunch nat`.
#[derive(Debug, Clone)]
pub struct ProtocolReport {
    pub protocol: MapProtocol,
    /// The external address the gateway reports, when it answered.
    pub external: Result<IpAddr, String>,
}

/// Asks the gateway which protocols it speaks and what external address
/// each reports: NAT-PMP's and UPnP's read-only queries; PCP has none
/// (ANNOUNCE carries no address), so a short mapping of `local`'s port is
/// made and deleted at once.
pub async fn probe(local: SocketAddr, cfg: &PortmapConfig) -> Vec<ProtocolReport> {
    let gw = match gateway::default_gateway() {
        Ok(gw) => gw,
        Err(e) => {
            return MapProtocol::ALL
                .iter()
                .map(|p| ProtocolReport {
                    protocol: *p,
                    external: Err(e.to_string()),
                })
                .collect();
        }
    };
    let bound = bound(cfg);
    let pcp = async {
        let port = NonZeroU16::new(local.port()).ok_or(PortmapError::NoPort)?;
        // Short, and deleted at once (120 s is miniupnpd's shortest PCP
        // lifetime by default).
        let short = PortmapConfig {
            lease: Duration::from_secs(120),
            ..cfg.clone()
        };
        let lease = map_pcp(gw, local, port, &short).await?;
        let ip = lease.mapped().addr.ip();
        let _ = tokio::time::timeout(defaults::DELETE_TIMEOUT, lease.delete()).await;
        Ok::<_, PortmapError>(ip)
    };
    let natpmp = async {
        Ok::<_, PortmapError>(IpAddr::V4(
            natpmp::external_address(GatewayAddress::IpV4(gw), Some(timeouts(cfg))).await?,
        ))
    };
    let upnp = async {
        let gateway = find_igd(local, cfg).await?;
        Ok::<_, PortmapError>(gateway.get_external_ip().await?)
    };
    let (pcp, natpmp, upnp) = tokio::join!(
        within(bound, pcp),
        within(bound, natpmp),
        within(bound, upnp)
    );
    [
        (MapProtocol::Pcp, pcp),
        (MapProtocol::NatPmp, natpmp),
        (MapProtocol::Upnp, upnp),
    ]
    .into_iter()
    .map(|(protocol, r)| ProtocolReport {
        protocol,
        external: r.map_err(|e| e.to_string()),
    })
    .collect()
}
