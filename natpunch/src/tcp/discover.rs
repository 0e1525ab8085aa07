//! How the NAT maps the TCP punching port: STUN over TCP (RFC 8489
//! §6.2.2) from that very port, to the server and then to its other port
//! and other address (RFC 5780's OTHER-ADDRESS): one mapping for all
//! destinations is a cone for TCP; otherwise the ports' steps give the
//! allocation (sequential with its delta, or random).

use std::net::SocketAddr;
use std::time::Duration;

use natpunch_proto::nat::{AllocationKind, Behaviour};
use natpunch_proto::rendezvous::wire::TcpInfo;

use crate::nat::{tcp_binding_on, NatError};

/// A step between two successive mappings at most this large counts as
/// sequential allocation; a larger one as random (RFC 4787 §4.1 calls
/// small fixed steps "port contiguity"; the lab's sequential NAT steps 1,
/// real ones by 1–2 per new mapping, more under load).
const MAX_STEP: i32 = 64;

/// Each connect and answer gets this long: a handshake and one answer
/// are two round trips, so 2 s is ten times a slow path's. RFC 8489
/// §6.2.2's Ti (39.5 s) is for a client that has nothing else to do; here
/// a server without TCP must not hold `natpunch nat` or a `--tcp` connect
/// (which waits for these facts) for long.
pub const TI: Duration = Duration::from_secs(2);

async fn one(
    local: SocketAddr,
    server: SocketAddr,
) -> Result<(SocketAddr, Option<SocketAddr>), NatError> {
    let s = super::reuse_socket(local).map_err(|source| NatError::Tcp { server, source })?;
    let socket = tokio::net::TcpSocket::from_std_stream(s.into());
    let stream = tokio::time::timeout(TI, socket.connect(server))
        .await
        .map_err(|_| NatError::NoAnswer { server, waited: TI })?
        .map_err(|source| NatError::Tcp { server, source })?;
    tcp_binding_on(stream, server, TI).await
}

/// The punching port's facts: mapping behaviour, allocation and its step,
/// from up to three bindings made one after another from `local`.
pub async fn discover(local: SocketAddr, server: SocketAddr) -> Result<TcpInfo, NatError> {
    let (first, other) = one(local, server).await?;
    let mut mapped = vec![first];
    if let Some(o) = other {
        // Same IP, other port; then the other IP (each a new destination).
        for dest in [SocketAddr::new(server.ip(), o.port()), o] {
            match one(local, dest).await {
                Ok((m, _)) => mapped.push(m),
                Err(e) => {
                    tracing::debug!(%dest, error = %e, "TCP binding to the other address failed");
                    break;
                }
            }
        }
    }
    let info = facts(local, &mapped);
    tracing::debug!(%local, ?mapped, ?info, "TCP punching port measured");
    Ok(info)
}

/// The facts from the successive mappings of `local`.
fn facts(local: SocketAddr, mapped: &[SocketAddr]) -> TcpInfo {
    let last = *mapped.last().unwrap_or(&local);
    let steps: Vec<i32> = mapped
        .windows(2)
        .map(|w| i32::from(w[1].port()) - i32::from(w[0].port()))
        .collect();
    let (mapping, allocation, delta) = if steps.is_empty() {
        // One binding: no mapping test; a kept port is likely a cone's.
        let kept = mapped.first().is_some_and(|m| m.port() == local.port());
        (
            None,
            kept.then_some(AllocationKind::Preserving),
            kept.then_some(0),
        )
    } else if steps.iter().all(|s| *s == 0) && mapped.iter().all(|m| m.ip() == last.ip()) {
        let kept = last.port() == local.port();
        (
            Some(Behaviour::EndpointIndependent),
            Some(if kept {
                AllocationKind::Preserving
            } else {
                AllocationKind::Random
            }),
            Some(0),
        )
    } else if steps.iter().all(|s| *s != 0 && s.abs() <= MAX_STEP)
        && steps.windows(2).all(|w| w[0].signum() == w[1].signum())
    {
        // The smallest step: other traffic through the NAT between two
        // bindings only makes a step larger.
        let d = steps.iter().copied().min_by_key(|s| s.abs()).unwrap_or(1);
        (
            Some(Behaviour::AddressAndPortDependent),
            Some(AllocationKind::Sequential),
            Some(d),
        )
    } else {
        (
            Some(Behaviour::AddressAndPortDependent),
            Some(AllocationKind::Random),
            None,
        )
    };
    TcpInfo {
        mapped: last,
        mapping,
        allocation,
        delta,
        local_port: local.port(),
        only: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn mappings_give_behaviour_and_step() {
        let local = a("10.0.1.2:4000");
        let cone = facts(local, &[a("198.51.100.2:4000"), a("198.51.100.2:4000")]);
        assert_eq!(cone.mapping, Some(Behaviour::EndpointIndependent));
        assert_eq!(cone.allocation, Some(AllocationKind::Preserving));
        let seq = facts(
            local,
            &[
                a("198.51.100.2:10010"),
                a("198.51.100.2:10011"),
                a("198.51.100.2:10013"),
            ],
        );
        assert_eq!(seq.allocation, Some(AllocationKind::Sequential));
        assert_eq!(seq.delta, Some(1));
        assert_eq!(seq.mapped.port(), 10013);
        let rnd = facts(local, &[a("198.51.100.2:31000"), a("198.51.100.2:5012")]);
        assert_eq!(rnd.allocation, Some(AllocationKind::Random));
        let one = facts(local, &[a("198.51.100.2:4000")]);
        assert_eq!(one.mapping, None);
        assert_eq!(one.allocation, Some(AllocationKind::Preserving));
    }
}
