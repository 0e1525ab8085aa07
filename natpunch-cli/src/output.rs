//! Human and JSON output.

use std::io::Write;

use natpunch_proto::nat::{AllocationKind, NatReport};

/// Prints one JSON object on its own line on stdout and flushes, so a
/// script reading line by line sees it at once.
pub fn json_line(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{v}\n").as_bytes());
    let _ = out.flush();
}

/// One JSON object per line on stderr (peer events; stdout stays free for
/// data).
pub fn json_line_stderr(v: &serde_json::Value) {
    // Whole lines in one write: stderr is unbuffered, and a line written
    // piecewise could be split by another writer (a log line).
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(format!("{v}\n").as_bytes());
    let _ = err.flush();
}

/// How a peer command talks on stderr: JSON events for scripts (nothing
/// else, so every line parses), or lines for people, which `--quiet`
/// reduces to warnings and errors.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    json: bool,
    quiet: bool,
}

impl Out {
    pub fn new(json: bool, quiet: bool) -> Self {
        Self { json, quiet }
    }

    pub fn json(&self) -> bool {
        self.json
    }

    /// An event: its JSON object, or its line (unless quiet).
    pub fn event(&self, v: serde_json::Value, text: impl FnOnce() -> String) {
        if self.json {
            json_line_stderr(&v);
        } else if !self.quiet {
            eprintln!("natpunch: {}", text());
        }
    }

    /// An event people must see even when quiet.
    pub fn warn(&self, v: serde_json::Value, text: &str) {
        if self.json {
            json_line_stderr(&v);
        } else {
            eprintln!("natpunch: {text}");
        }
    }

    /// An event only scripts need.
    pub fn json_only(&self, v: serde_json::Value) {
        if self.json {
            json_line_stderr(&v);
        }
    }

    /// A line only people need (not in JSON, not when quiet).
    pub fn note(&self, text: &str) {
        if !self.json && !self.quiet {
            eprintln!("natpunch: {text}");
        }
    }

    /// The final failure: one `failed` event with a stable code, or one
    /// line.
    pub fn failed(&self, peer: Option<String>, code: &str, reason: &str) {
        if self.json {
            json_line_stderr(&serde_json::json!({"event": "failed", "peer_id": peer,
                "code": code, "reason": reason}));
        } else {
            eprintln!("natpunch: {reason}");
        }
    }
}

fn yes_no(b: Option<bool>, unknown: &str) -> String {
    match b {
        Some(true) => "yes".into(),
        Some(false) => "no".into(),
        None => unknown.into(),
    }
}

/// The tidy, aligned report for humans.
pub fn human_report(r: &NatReport) -> String {
    let mut rows: Vec<(&str, String)> = Vec::new();
    rows.push((
        "server",
        match r.other_address {
            Some(o) => format!("{} (other address {o})", r.server),
            None => format!("{} (no RFC 5780 other address)", r.server),
        },
    ));
    rows.push(("local address", r.local.to_string()));
    rows.push((
        "mapped address",
        match (r.mapped, r.nat) {
            (Some(m), Some(false)) => format!("{m} (no NAT)"),
            (Some(m), _) => m.to_string(),
            (None, _) => "none (no answer)".into(),
        },
    ));
    let b = |x: Option<natpunch_proto::nat::Behaviour>| {
        x.map(|b| b.as_str().to_string())
            .unwrap_or_else(|| "unknown".into())
    };
    rows.push(("mapping", b(r.mapping)));
    rows.push(("filtering", b(r.filtering)));
    let a = &r.allocation;
    let alloc = match (a.kind, a.delta) {
        (Some(AllocationKind::Sequential), Some(d)) => format!("sequential, delta {d:+}"),
        (Some(AllocationKind::Preserving), _) => "preserving".into(),
        (Some(AllocationKind::Random), _) => "random".into(),
        _ => "unknown".into(),
    };
    rows.push((
        "port allocation",
        format!(
            "{alloc} (confidence {:.0}%, {} mappings observed)",
            a.confidence * 100.0,
            a.samples
        ),
    ));
    rows.push(("hairpinning", yes_no(r.hairpin, "unknown")));
    rows.push((
        "binding lifetime",
        match &r.lifetime {
            None => "not measured (--lifetime)".into(),
            Some(l) => match (l.alive, l.expired) {
                (Some(a), Some(e)) => format!("between {}s and {}s", a.as_secs(), e.as_secs()),
                (Some(a), None) => format!("more than {}s", a.as_secs()),
                (None, Some(e)) => format!("less than {}s", e.as_secs()),
                (None, None) => "unknown".into(),
            },
        },
    ));
    rows.push(("classic type", r.classic.as_str().to_string()));
    if let Some(rtt) = r.rtt_ms {
        rows.push(("round trip", format!("{rtt} ms")));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut s = String::from("NAT behaviour report\n");
    for (k, v) in rows {
        s.push_str(&format!("  {k:<width$}  {v}\n"));
    }
    for n in &r.notes {
        s.push_str(&format!("  note: {n}\n"));
    }
    s
}

/// The JSON form of the report: the documented keys first, then details.
pub fn json_report(r: &NatReport) -> serde_json::Value {
    serde_json::json!({
        "mapped": r.mapped,
        "mapping": r.mapping,
        "filtering": r.filtering,
        "allocation": {
            "kind": r.allocation.kind,
            "delta": r.allocation.delta,
            "confidence": r.allocation.confidence,
            "samples": r.allocation.samples,
        },
        "hairpin": r.hairpin,
        "classic": r.classic,
        "nat": r.nat,
        "local": r.local,
        "server": r.server,
        "other_address": r.other_address,
        "lifetime": r.lifetime,
        "rtt_ms": r.rtt_ms,
        "samples": r.samples,
        "notes": r.notes,
    })
}
