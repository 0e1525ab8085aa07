//! Generates the nftables rule set of one lab NAT from its [`NatSpec`].
//!
//! Linux conntrack NAT alone is "mapping per connection": plain masquerade
//! only looks endpoint-independent while ports do not collide, and it always
//! filters address-and-port-dependently. To get every RFC 4787 behaviour we
//! keep our own dynamic maps, learned after SNAT in a later postrouting
//! chain (where the packet already carries its external port):
//!
//! - `eim` / `adm`: internal endpoint (and, for address-dependent mapping,
//!   the destination IP) → external port, consulted before allocating, so
//!   every connection of that endpoint reuses the same external port;
//! - `rev`: external port → internal endpoint, used by a prerouting DNAT
//!   for endpoint-independent or address-dependent filtering, and for
//!   hairpinning;
//! - `adf`: external port · remote IP pairs the inside has sent to, which
//!   gate that DNAT for address-dependent filtering.
//!
//! Port allocation for a new mapping: the kernel's own choice (port
//! preserving), `fully-random`, or a `numgen inc` counter mapped through a
//! table to `start + i·delta` (the direct `numgen … offset` form is
//! byte-swapped by nft 1.0.6, so ports would step by 256).
//! Map entries expire with the UDP mapping timeout and are refreshed by
//! outbound packets (RFC 4787 REQ-6).

use std::fmt::Write;
use std::net::Ipv4Addr;

use natpunch_proto::nat::Behaviour;

use crate::spec::{NatSpec, PortAllocation, Unsolicited};

/// First port handed out by sequential allocation: far from Linux's
/// ephemeral range (32768-60999), so port preservation never collides.
pub const SEQUENTIAL_START: u16 = 10_000;
/// Entries in the sequential-allocation table; the counter wraps after
/// this many new mappings, which no lab run comes close to.
pub const SEQUENTIAL_SLOTS: u32 = 2_000;

/// Where the NAT sits.
#[derive(Debug, Clone)]
pub struct NatPlacement {
    /// Its outside interface's name (inside interfaces are all the others).
    pub wan: String,
    /// Its public (outside) address.
    pub public: Ipv4Addr,
    /// The inside networks, `a.b.c.d/len`, used to recognise hairpinned
    /// traffic in postrouting (where the input interface is unknown).
    pub inside: Vec<String>,
    /// The lab's STUN server addresses: with `upnp=on`, miniupnpd's own
    /// STUN test (RFC 5780 CHANGE-REQUEST) gets its answers from both.
    pub stun_servers: Vec<Ipv4Addr>,
}

/// The `inet` table miniupnpd's nftables backend writes its rules into
/// (named by its `upnp_*table_name` and `upnp_*chain` options); it must
/// exist before miniupnpd starts. Its DNAT runs just before the lab's
/// own filtering DNAT.
pub fn miniupnpd_table() -> &'static str {
    "table inet miniupnpd {
  chain forward { type filter hook forward priority filter; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority dstnat - 1; policy accept; jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority srcnat - 1; policy accept; jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
"
}

/// The map that gives a port mapped by miniupnpd its external port on
/// the way out too (protocol · inside address · inside port → external
/// port): miniupnpd-nftables 2.3.1 adds only the inbound DNAT, so behind
/// a symmetric NAT the host's own packets from the mapped port would
/// leave from another port. [`crate::upnp`] fills it from the lease file.
pub const UPNP_OUT: &str = "upnp_out";

const TABLE: &str = "natpunch";
const L4: &str = "meta l4proto { tcp, udp }";

/// The complete rule set, to be loaded with `nft -f` in the NAT's netns.
pub fn ruleset(spec: &NatSpec, at: &NatPlacement) -> String {
    let mut s = String::new();
    let t = spec.udp_timeout.as_secs().max(1);
    let wan = &at.wan;
    let public = at.public;
    let inside = at.inside.join(", ");
    let _ = writeln!(s, "table ip {TABLE} {{");
    if spec.udp_blocked {
        // No UDP through, either way (TCP only: some corporate and hotel
        // networks).
        s.push_str(
            "  chain forward {\n    type filter hook forward priority filter; policy accept;\n    meta l4proto udp drop\n  }\n",
        );
    }
    if spec.plain_masquerade {
        if spec.upnp {
            upnp_map(&mut s);
        }
        let _ = writeln!(
            s,
            "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;"
        );
        if spec.upnp {
            upnp_out(&mut s, wan, public);
        }
        let _ = writeln!(s, "    oifname \"{wan}\" masquerade\n  }}\n}}");
        return s;
    }
    let eim = spec.mapping == Behaviour::EndpointIndependent;
    let adm = spec.mapping == Behaviour::AddressDependent;
    let needs_rev = spec.filtering != Behaviour::AddressAndPortDependent || spec.hairpin;
    let adf = spec.filtering == Behaviour::AddressDependent;
    let dynamic = |s: &mut String, kind: &str, name: &str, ty: &str| {
        let _ = writeln!(
            s,
            "  {kind} {name} {{\n    type {ty}\n    flags dynamic,timeout\n    timeout {t}s\n    size 65535\n  }}"
        );
    };
    if eim {
        dynamic(
            &mut s,
            "map",
            "eim",
            "inet_proto . ipv4_addr . inet_service : inet_service",
        );
    }
    if adm {
        dynamic(
            &mut s,
            "map",
            "adm",
            "inet_proto . ipv4_addr . inet_service . ipv4_addr : inet_service",
        );
    }
    if needs_rev {
        dynamic(
            &mut s,
            "map",
            "rev",
            "inet_proto . inet_service : ipv4_addr . inet_service",
        );
    }
    if adf {
        dynamic(
            &mut s,
            "set",
            "adf",
            "inet_proto . inet_service . ipv4_addr",
        );
    }
    let alloc = match spec.allocation {
        PortAllocation::Preserving => String::new(),
        PortAllocation::Random => " :1024-65535 fully-random".to_string(),
        PortAllocation::Sequential { delta } => {
            let slots = SEQUENTIAL_SLOTS
                .min((u32::from(u16::MAX) - u32::from(SEQUENTIAL_START)) / u32::from(delta));
            let elems: Vec<String> = (0..slots)
                .map(|i| {
                    format!(
                        "{i} : {}",
                        u32::from(SEQUENTIAL_START) + i * u32::from(delta)
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "  map seq {{\n    typeof numgen inc mod {slots} : udp sport\n    elements = {{ {} }}\n  }}",
                elems.join(", ")
            );
            format!(" : numgen inc mod {slots} map @seq")
        }
    };

    if spec.upnp {
        upnp_map(&mut s);
    }
    // Source NAT: reuse a learned mapping, else allocate.
    let _ = writeln!(
        s,
        "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;"
    );
    if spec.upnp {
        upnp_out(&mut s, wan, public);
    }
    let reuse_key = if eim {
        Some("meta l4proto . ip saddr . th sport map @eim")
    } else if adm {
        Some("meta l4proto . ip saddr . th sport . ip daddr map @adm")
    } else {
        None
    };
    if let Some(k) = reuse_key {
        let _ = writeln!(s, "    oifname \"{wan}\" {L4} snat ip to {public} : {k}");
    }
    // Only the first packet of a connection allocates: the RST the
    // router itself sends for an unsolicited SYN is related to that SYN's
    // entry and passes this chain too, and took a sequential port each.
    let _ = writeln!(
        s,
        "    oifname \"{wan}\" ct direction original {L4} snat ip to {public}{alloc}"
    );
    let _ = writeln!(s, "    oifname \"{wan}\" snat ip to {public}");
    if spec.hairpin {
        // Hairpinned: from inside, DNATed back inside. Give it the sender's
        // external address (RFC 4787 REQ-9).
        if let Some(k) = reuse_key {
            let _ = writeln!(s, "    oifname != \"{wan}\" ct status dnat ip saddr {{ {inside} }} {L4} snat ip to {public} : {k}");
        }
        let _ = writeln!(s, "    oifname != \"{wan}\" ct status dnat ip saddr {{ {inside} }} {L4} snat ip to {public}{alloc}");
    }
    s.push_str("  }\n");

    // Learn mappings after SNAT.
    if eim || adm || needs_rev || adf {
        let _ = writeln!(s, "  chain learn {{\n    type filter hook postrouting priority srcnat + 10; policy accept;");
        let orig = "ct original ip saddr . ct original proto-src";
        if eim {
            let _ = writeln!(s, "    oifname \"{wan}\" ct direction original {L4} update @eim {{ meta l4proto . {orig} timeout {t}s : th sport }}");
        }
        if adm {
            let _ = writeln!(s, "    oifname \"{wan}\" ct direction original {L4} update @adm {{ meta l4proto . {orig} . ip daddr timeout {t}s : th sport }}");
        }
        if needs_rev {
            let _ = writeln!(s, "    oifname \"{wan}\" ct direction original {L4} update @rev {{ meta l4proto . th sport timeout {t}s : {orig} }}");
        }
        if adf {
            let _ = writeln!(s, "    oifname \"{wan}\" {L4} update @adf {{ meta l4proto . th sport . ip daddr timeout {t}s }}");
        }
        s.push_str("  }\n");
    }

    // Inbound: filtering DNAT and hairpin DNAT.
    let _ = writeln!(
        s,
        "  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;"
    );
    match spec.filtering {
        Behaviour::EndpointIndependent => {
            let _ = writeln!(
                s,
                "    iifname \"{wan}\" {L4} dnat ip to meta l4proto . th dport map @rev"
            );
        }
        Behaviour::AddressDependent => {
            let _ = writeln!(s, "    iifname \"{wan}\" {L4} meta l4proto . th dport . ip saddr @adf dnat ip to meta l4proto . th dport map @rev");
        }
        // Conntrack alone admits only replies from the exact endpoint.
        Behaviour::AddressAndPortDependent => {}
    }
    if spec.hairpin {
        let _ = writeln!(s, "    iifname != \"{wan}\" ip daddr {public} {L4} dnat ip to meta l4proto . th dport map @rev");
    }
    s.push_str("  }\n");

    // What reaches the NAT box itself unmatched.
    let _ = writeln!(
        s,
        "  chain input {{\n    type filter hook input priority filter; policy accept;"
    );
    s.push_str("    ct state established,related accept\n");
    if spec.upnp && !at.stun_servers.is_empty() {
        // miniupnpd's STUN test: answers from the server's addresses and
        // ports, changed on request (RFC 5780), to the gateway itself.
        let servers: Vec<String> = at.stun_servers.iter().map(|a| a.to_string()).collect();
        let ports: Vec<String> = crate::topology::SERVER_PORTS
            .iter()
            .map(|p| p.to_string())
            .collect();
        let _ = writeln!(
            s,
            "    iifname \"{wan}\" ip saddr {{ {} }} udp sport {{ {} }} accept",
            servers.join(", "),
            ports.join(", ")
        );
    }
    if !spec.hairpin {
        let _ = writeln!(s, "    iifname != \"{wan}\" ip daddr {public} {L4} drop");
    }
    let _ = writeln!(
        s,
        "    iifname \"{wan}\" meta l4proto udp {}",
        match spec.inbound_udp {
            Unsolicited::Drop => "drop",
            Unsolicited::Reject => "reject with icmp type port-unreachable",
        }
    );
    let _ = writeln!(
        s,
        "    iifname \"{wan}\" meta l4proto tcp {}",
        match spec.inbound_tcp {
            Unsolicited::Drop => "drop",
            Unsolicited::Reject => "reject with tcp reset",
        }
    );
    s.push_str("  }\n}\n");
    s
}

/// The `upnp_out` map the lab fills from miniupnpd's leases.
fn upnp_map(s: &mut String) {
    let _ = writeln!(
        s,
        "  map {UPNP_OUT} {{\n    type inet_proto . ipv4_addr . inet_service : inet_service\n  }}"
    );
}

/// First in postrouting with `upnp=on`: the gateway's own packets
/// (miniupnpd's STUN test) keep their port, and a mapped port leaves as
/// itself.
fn upnp_out(s: &mut String, wan: &str, public: Ipv4Addr) {
    let _ = writeln!(s, "    oifname \"{wan}\" ip saddr {public} accept");
    let _ = writeln!(s, "    oifname \"{wan}\" {L4} snat ip to {public} : meta l4proto . ip saddr . th sport map @{UPNP_OUT}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::PRESETS;

    fn at() -> NatPlacement {
        NatPlacement {
            wan: "wan".into(),
            public: Ipv4Addr::new(198, 51, 100, 2),
            inside: vec!["10.0.1.0/24".into()],
            stun_servers: vec![Ipv4Addr::new(203, 0, 113, 10)],
        }
    }

    #[test]
    fn each_behaviour_gets_its_rules() {
        let full = ruleset(&NatSpec::preset("full-cone").unwrap(), &at());
        assert!(
            full.contains("map eim")
                && full.contains("dnat ip to meta l4proto . th dport map @rev")
        );
        assert!(!full.contains("@adf"));
        let rc = ruleset(&NatSpec::preset("restricted-cone").unwrap(), &at());
        assert!(rc.contains("@adf dnat"));
        let prc = ruleset(&NatSpec::preset("port-restricted-cone").unwrap(), &at());
        assert!(!prc.contains("iifname \"wan\" meta l4proto { tcp, udp } dnat"));
        let sym = ruleset(&NatSpec::preset("symmetric-sequential").unwrap(), &at());
        assert!(!sym.contains("map eim") && sym.contains("numgen inc mod 2000 map @seq"));
        assert!(sym.contains("0 : 10000, 1 : 10001"));
        let rnd = ruleset(&NatSpec::preset("symmetric-random").unwrap(), &at());
        assert!(rnd.contains("fully-random"));
        let adm = ruleset(&NatSpec::preset("address-dependent").unwrap(), &at());
        assert!(adm.contains("map adm") && adm.contains(". ip daddr map @adm"));
        let linux = ruleset(&NatSpec::preset("linux").unwrap(), &at());
        assert!(linux.contains("masquerade") && !linux.contains("map"));
        assert!(!linux.contains("hook forward"));
        let blocked = ruleset(&NatSpec::parse("linux:udp=block").unwrap(), &at());
        assert!(blocked.contains("hook forward") && blocked.contains("meta l4proto udp drop"));
        for p in PRESETS {
            let r = ruleset(&NatSpec::preset(p).unwrap(), &at());
            assert_eq!(r.matches('{').count(), r.matches('}').count(), "{p}");
            let u = ruleset(&NatSpec::parse(&format!("{p}:upnp=on")).unwrap(), &at());
            assert_eq!(u.matches('{').count(), u.matches('}').count(), "{p}");
            assert!(
                u.contains("map upnp_out") && u.contains("map @upnp_out"),
                "{p}: {u}"
            );
            assert!(u.contains("ip saddr 198.51.100.2 accept"), "{p}: {u}");
        }
        let u = ruleset(&NatSpec::parse("symmetric-random:upnp=on").unwrap(), &at());
        assert!(u.contains("ip saddr { 203.0.113.10 } udp sport { 3478, 3479 } accept"));
        // The mapped port's SNAT comes before the random allocation.
        assert!(u.find("@upnp_out").unwrap() < u.find("fully-random").unwrap());
    }

    #[test]
    fn sequential_delta_and_timeout() {
        let s = NatSpec::parse("symmetric-sequential:delta=2,timeout=30").unwrap();
        let r = ruleset(&s, &at());
        assert!(r.contains("1 : 10002"), "{r}");
        assert!(r.contains("timeout 30s"));
    }
}
