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
