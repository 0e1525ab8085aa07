//! The default gateway: where PCP and NAT-PMP requests go (RFC 6887 §8.1,
//! RFC 6886 §3: "the default router"). Read from the kernel's IPv4 routing
//! table, `/proc/net/route` (of this process's network namespace).

use std::net::Ipv4Addr;

use super::PortmapError;

/// The gateway of the default route with the lowest metric.
pub fn default_gateway() -> Result<Ipv4Addr, PortmapError> {
    let table = std::fs::read_to_string("/proc/net/route").map_err(PortmapError::RouteTable)?;
    parse_route_table(&table).ok_or(PortmapError::NoGateway)
}

/// Parses `/proc/net/route`: whitespace-separated columns `Iface
/// Destination Gateway Flags RefCnt Use Metric Mask …`, addresses as
/// 8 hex digits of the address's bytes read as a native integer.
pub fn parse_route_table(table: &str) -> Option<Ipv4Addr> {
    /// RTF_UP | RTF_GATEWAY (linux/route.h).
    const UP_GATEWAY: u32 = 0x1 | 0x2;
    let mut best: Option<(u32, Ipv4Addr)> = None;
    for line in table.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(dest), Some(gw), Some(flags), Some(metric), Some(mask)) = (
            cols.get(1),
            cols.get(2),
            cols.get(3),
            cols.get(6),
            cols.get(7),
        ) else {
            continue;
        };
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let (Some(dest), Some(gw), Some(flags), Some(mask)) =
            (hex(dest), hex(gw), hex(flags), hex(mask))
        else {
            continue;
        };
        let Ok(metric) = metric.parse::<u32>() else {
            continue;
        };
        if dest != 0 || mask != 0 || flags & UP_GATEWAY != UP_GATEWAY || gw == 0 {
            continue;
        }
        // The kernel prints the address's memory as a native integer.
        let gw = Ipv4Addr::from(gw.to_ne_bytes());
        if best.is_none_or(|(m, _)| metric < m) {
            best = Some((metric, gw));
        }
    }
    best.map(|(_, gw)| gw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_default_route_with_the_lowest_metric() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
            eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        assert_eq!(parse_route_table(table), Some(Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn no_default_route_or_garbage_is_none() {
        assert_eq!(parse_route_table(""), None);
        assert_eq!(
            parse_route_table("Iface\tDestination\n eth0 0000000A 00000000 0001 0 0 0 00FFFFFF\n"),
            None
        );
        assert_eq!(parse_route_table("h\nx zz yy 3 0 0 0 0\n"), None);
        // A default route without the gateway flag (a point-to-point link).
        assert_eq!(
            parse_route_table("h\nppp0 00000000 00000000 0001 0 0 0 00000000\n"),
            None
        );
    }
}
