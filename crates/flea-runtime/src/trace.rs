//! Spans of the streaming pipeline, written as a Chrome/Perfetto trace (chrome://tracing,
//! ui.perfetto.dev): one lane for disk reads, one for compute, one for compute stalls.

use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    Read,
    Compute,
    Stall,
}

impl Lane {
    fn name(self) -> &'static str {
        match self {
            Lane::Read => "disk read",
            Lane::Compute => "compute",
            Lane::Stall => "compute waits for weights",
        }
    }
    fn tid(self) -> u32 {
        match self {
            Lane::Read => 1,
            Lane::Compute => 2,
            Lane::Stall => 3,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub lane: Lane,
    pub unit: usize,
    pub start: Instant,
    pub end: Instant,
}

/// A bounded span log: recording is off until `enable`, and stops at `limit` spans.
#[derive(Debug, Default)]
pub struct Trace {
    enabled: bool,
    limit: usize,
    pub spans: Vec<Span>,
    pub dropped: u64,
}

impl Trace {
    pub fn enable(&mut self, limit: usize) {
        self.enabled = true;
        self.limit = limit;
        self.spans.reserve(limit.min(1 << 16));
    }

    pub fn span(&mut self, lane: Lane, unit: usize, start: Instant, end: Instant) {
        if !self.enabled {
            return;
        }
        if self.spans.len() >= self.limit {
            self.dropped += 1;
            return;
        }
        self.spans.push(Span {
            lane,
            unit,
            start,
            end,
        });
    }

    /// Chrome trace JSON; `label(unit)` names each unit (e.g. "blk.3").
    pub fn to_chrome_json(&self, label: &dyn Fn(usize) -> String) -> serde_json::Value {
        let t0 = self.spans.iter().map(|s| s.start).min();
        let mut events = Vec::with_capacity(self.spans.len() + 3);
        for lane in [Lane::Read, Lane::Compute, Lane::Stall] {
            events.push(serde_json::json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": lane.tid(), "args": {"name": lane.name()}}));
        }
        if let Some(t0) = t0 {
            for s in &self.spans {
                events.push(serde_json::json!({
                    "name": label(s.unit),
                    "cat": s.lane.name(),
                    "ph": "X",
                    "pid": 1,
                    "tid": s.lane.tid(),
                    "ts": (s.start - t0).as_secs_f64() * 1e6,
                    "dur": (s.end - s.start).as_secs_f64() * 1e6,
                }));
            }
        }
        serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms", "otherData": {"dropped_spans": self.dropped} })
    }
}

impl Trace {
    /// An SVG timeline of the last complete pass (from the last time compute started on the
    /// first unit): one lane each for disk reads, compute and stalls, units labelled.
    pub fn to_svg(
        &self,
        label: &dyn Fn(usize) -> String,
        first_unit: usize,
        title: &str,
    ) -> String {
        use std::fmt::Write;
        let starts: Vec<Instant> = self
            .spans
            .iter()
            .filter(|s| s.lane == Lane::Compute && s.unit == first_unit)
            .map(|s| s.start)
            .collect();
        let (Some(&w0), Some(w1)) = (starts.last(), self.spans.iter().map(|s| s.end).max()) else {
            return String::from("<svg xmlns=\"http://www.w3.org/2000/svg\"/>");
        };
        // If the last pass is a partial one, show the one before it.
        let (w0, w1) = if starts.len() >= 2 && w1 <= w0 {
            (starts[starts.len() - 2], w0)
        } else {
            (w0, w1)
        };
        let span_s = (w1 - w0).as_secs_f64().max(1e-9);
        let (width, left, lane_h, top) = (1400.0, 170.0, 34.0, 50.0);
        let x = |t: Instant| -> f64 {
            let d = if t > w0 {
                (t - w0).as_secs_f64()
            } else {
                -((w0 - t).as_secs_f64())
            };
            left + (d / span_s).clamp(0.0, 1.0) * (width - left - 20.0)
        };
        let lanes = [Lane::Read, Lane::Compute, Lane::Stall];
        let height = top + lanes.len() as f64 * (lane_h + 12.0) + 50.0;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(
            s,
            r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15">{}</text>"#,
            xml(title)
        );
        for (i, lane) in lanes.iter().enumerate() {
            let y = top + i as f64 * (lane_h + 12.0);
            let _ = writeln!(
                s,
                r#"<text x="10" y="{:.1}">{}</text>"#,
                y + lane_h * 0.65,
                lane.name()
            );
            let _ = writeln!(
                s,
                r##"<rect x="{left}" y="{y:.1}" width="{:.1}" height="{lane_h}" fill="#f4f4f4"/>"##,
                width - left - 20.0
            );
            let color = match lane {
                Lane::Read => "#4e79a7",
                Lane::Compute => "#59a14f",
                Lane::Stall => "#e15759",
            };
            for sp in self
                .spans
                .iter()
                .filter(|sp| sp.lane == *lane && sp.end > w0 && sp.start < w1)
            {
                let (x0, x1) = (x(sp.start), x(sp.end));
                let _ = writeln!(
                    s,
                    r#"<rect x="{x0:.2}" y="{:.1}" width="{:.2}" height="{:.1}" fill="{color}" stroke="white" stroke-width="0.5"><title>{} {:.2} ms</title></rect>"#,
                    y + 2.0,
                    (x1 - x0).max(0.5),
                    lane_h - 4.0,
                    xml(&label(sp.unit)),
                    (sp.end - sp.start).as_secs_f64() * 1e3
                );
                if x1 - x0 > 38.0 {
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" fill="white" font-size="10">{}</text>"#,
                        x0 + 3.0,
                        y + lane_h * 0.62,
                        xml(&label(sp.unit))
                    );
                }
            }
        }
        let axis_y = top + lanes.len() as f64 * (lane_h + 12.0) + 8.0;
        for k in 0..=10 {
            let t = span_s * k as f64 / 10.0;
            let xx = left + (width - left - 20.0) * k as f64 / 10.0;
            let _ = writeln!(
                s,
                r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{:.1}" y2="{:.1}" stroke="#999"/><text x="{:.1}" y="{:.1}">{:.0} ms</text>"##,
                axis_y - 4.0,
                axis_y + 2.0,
                xx - 12.0,
                axis_y + 16.0,
                t * 1e3
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
