//! Grid results: one row per NAT pair, rendered as a terminal table, JSON
//! lines, or an SVG picture of the pair × pair matrix coloured by outcome.

use std::fmt::Write;

use serde::Serialize;

/// How a pair's scenario ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Ran and met its expectation.
    Pass,
    /// Ran and did not meet its expectation.
    Fail,
    /// Could not run (lab or tool error).
    Error,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "FAIL",
            Outcome::Error => "ERROR",
        }
    }

    fn colour(&self) -> &'static str {
        match self {
            Outcome::Pass => "#3aa655",
            Outcome::Fail => "#d64541",
            Outcome::Error => "#8c8c8c",
        }
    }
}

/// One pair's result.
#[derive(Debug, Clone, Serialize)]
pub struct GridRow {
    pub a: String,
    pub b: String,
    pub outcome: Outcome,
    /// Short result text shown in the cell (e.g. a strategy, or "ok").
    pub result: String,
    pub elapsed_ms: u64,
    /// Why, for failures; empty otherwise.
    pub detail: String,
    /// What the pair was expected to do, with the reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probes_sent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
}

/// An aligned terminal table.
pub fn table(rows: &[GridRow]) -> String {
    let wa = rows.iter().map(|r| r.a.len()).max().unwrap_or(1).max(6);
    let wb = rows.iter().map(|r| r.b.len()).max().unwrap_or(1).max(6);
    let wr = rows
        .iter()
        .map(|r| r.result.len())
        .max()
        .unwrap_or(1)
        .max(6);
    let mut s = format!(
        "{:<wa$}  {:<wb$}  {:<7}  {:<wr$}  {:>9}\n",
        "A", "B", "outcome", "result", "time"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<wa$}  {:<wb$}  {:<7}  {:<wr$}  {:>7.2} s{}",
            r.a,
            r.b,
            r.outcome.as_str(),
            r.result,
            r.elapsed_ms as f64 / 1000.0,
            if r.detail.is_empty() {
                String::new()
            } else {
                format!("  ({})", r.detail)
            }
        );
    }
    let pass = rows.iter().filter(|r| r.outcome == Outcome::Pass).count();
    let _ = writeln!(s, "{pass}/{} pairs passed", rows.len());
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An SVG of the pair × pair grid: rows are A's NAT, columns B's.
pub fn svg(title: &str, rows: &[GridRow]) -> String {
    let mut row_labels: Vec<&str> = Vec::new();
    let mut col_labels: Vec<&str> = Vec::new();
    for r in rows {
        if !row_labels.contains(&r.a.as_str()) {
            row_labels.push(&r.a);
        }
        if !col_labels.contains(&r.b.as_str()) {
            col_labels.push(&r.b);
        }
    }
    let (label_w, cell_w, cell_h, top) = (230, 130, 44, 150);
    let width = label_w + cell_w * col_labels.len() + 20;
    let height = top + cell_h * row_labels.len() + 70;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="24" font-size="17" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="{}" fill="#555">rows: host A's NAT · columns: host B's NAT · cell: result and time</text>"##,
        44
    );
    for (j, c) in col_labels.iter().enumerate() {
        let x = label_w + j * cell_w + cell_w / 2;
        let _ = writeln!(
            s,
            r#"<text x="{x}" y="{}" transform="rotate(-35 {x} {})" text-anchor="start">{}</text>"#,
            top - 8,
            top - 8,
            esc(c)
        );
    }
    for (i, rl) in row_labels.iter().enumerate() {
        let y = top + i * cell_h;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            label_w - 8,
            y + cell_h / 2 + 5,
            esc(rl)
        );
        for (j, cl) in col_labels.iter().enumerate() {
            let x = label_w + j * cell_w;
            let cell = rows.iter().find(|r| r.a == *rl && r.b == *cl);
            let (fill, line1, line2) = match cell {
                Some(r) => (
                    r.outcome.colour(),
                    r.result.clone(),
                    format!("{:.2} s", r.elapsed_ms as f64 / 1000.0),
                ),
                None => ("#eeeeee", String::new(), String::new()),
            };
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="{y}" width="{}" height="{}" fill="{fill}" stroke="white" stroke-width="2"/>"#,
                cell_w, cell_h
            );
            if let Some(r) = cell {
                let _ = writeln!(
                    s,
                    r#"<title>{} × {}: {} {}</title>"#,
                    esc(&r.a),
                    esc(&r.b),
                    r.outcome.as_str(),
                    esc(&r.detail)
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle" fill="white">{}</text>"#,
                x + cell_w / 2,
                y + 19,
                esc(&line1)
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle" fill="white" font-size="11">{}</text>"#,
                x + cell_w / 2,
                y + 35,
                esc(&line2)
            );
        }
    }
    let ly = top + cell_h * row_labels.len() + 30;
    for (k, o) in [Outcome::Pass, Outcome::Fail, Outcome::Error]
        .iter()
        .enumerate()
    {
        let x = 10 + k * 120;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{}" width="16" height="16" fill="{}"/>"#,
            ly - 13,
            o.colour()
        );
        let _ = writeln!(s, r#"<text x="{}" y="{ly}">{}</text>"#, x + 22, o.as_str());
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_pair() {
        let rows = vec![
            GridRow {
                a: "full-cone".into(),
                b: "linux".into(),
                outcome: Outcome::Pass,
                result: "ok".into(),
                elapsed_ms: 1200,
                detail: String::new(),
                expected: None,
                probes_sent: None,
                bytes_sent: None,
            },
            GridRow {
                a: "symmetric-random".into(),
                b: "linux".into(),
                outcome: Outcome::Fail,
                result: "mismatch".into(),
                elapsed_ms: 900,
                detail: "a<b".into(),
                expected: None,
                probes_sent: None,
                bytes_sent: None,
            },
        ];
        let t = table(&rows);
        assert!(t.contains("1/2 pairs passed"));
        let svg = svg("grid", &rows);
        assert_eq!(
            svg.matches("<rect x=").count(),
            2 + 3,
            "two cells and three legend boxes"
        );
        assert!(svg.contains("a&lt;b"));
    }
}
