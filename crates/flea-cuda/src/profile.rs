//! Per-kernel GPU time from CUDA events (`FLEA_CUDA_PROFILE=1`).
//!
//! Every launch on the compute stream is bracketed by two timing events: one recorded just
//! before it (when the stream reaches it) and one after. Kernel time is the difference; the
//! time from one kernel's end to the next one's start is the GPU waiting for the host (or for
//! the copy stream). Events come from a pool reused between reports, so a long run does not
//! create one event per launch.

use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream};
use std::collections::HashMap;
use std::sync::Arc;

/// The most launches one report holds; further launches are counted but not timed.
const MAX_MARKS: usize = 1 << 20;

enum Mark {
    Before,
    After(String),
}

#[derive(Default)]
pub(crate) struct KernelProfile {
    marks: Vec<(Mark, CudaEvent)>,
    pool: Vec<CudaEvent>,
    untimed: u64,
}

/// One kernel name's share of a report.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    pub name: String,
    pub calls: u64,
    pub ms: f64,
}

/// What the GPU did between two reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProfileReport {
    /// Kernels (and library calls) by total time, largest first.
    pub kernels: Vec<KernelTime>,
    /// Time the stream sat between kernels.
    pub idle_ms: f64,
    /// First mark to last.
    pub span_ms: f64,
    /// Launches past the mark limit (not timed).
    pub untimed: u64,
}

impl KernelProfile {
    fn event(&mut self, ctx: &Arc<CudaContext>) -> Result<CudaEvent, String> {
        match self.pool.pop() {
            Some(e) => Ok(e),
            None => ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| format!("profile event: {e:?}")),
        }
    }

    fn mark(&mut self, m: Mark, ctx: &Arc<CudaContext>, stream: &CudaStream) -> Result<(), String> {
        if self.marks.len() >= MAX_MARKS {
            if matches!(m, Mark::After(_)) {
                self.untimed += 1;
            }
            return Ok(());
        }
        let e = self.event(ctx)?;
        e.record(stream)
            .map_err(|e| format!("profile record: {e:?}"))?;
        self.marks.push((m, e));
        Ok(())
    }

    pub(crate) fn before(
        &mut self,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
    ) -> Result<(), String> {
        self.mark(Mark::Before, ctx, stream)
    }

    pub(crate) fn after(
        &mut self,
        name: &str,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
    ) -> Result<(), String> {
        self.mark(Mark::After(name.to_string()), ctx, stream)
    }

    /// Waits for the marked work, sums it up and starts over.
    pub(crate) fn report(&mut self) -> Result<ProfileReport, String> {
        let marks = std::mem::take(&mut self.marks);
        let mut out = ProfileReport {
            untimed: std::mem::take(&mut self.untimed),
            ..Default::default()
        };
        let Some((_, first)) = marks.first() else {
            return Ok(out);
        };
        let mut times = Vec::with_capacity(marks.len());
        for (_, e) in &marks {
            times.push(f64::from(
                first
                    .elapsed_ms(e)
                    .map_err(|e| format!("profile elapsed: {e:?}"))?,
            ));
        }
        let mut by_name: HashMap<String, (u64, f64)> = HashMap::new();
        // Where the previous kernel ended (for idle time) and the last mark's time.
        let mut prev_end: Option<f64> = None;
        let mut prev_mark: Option<(bool, f64)> = None; // (was a Before, time)
        for ((m, _), &t) in marks.iter().zip(&times) {
            match m {
                Mark::Before => {
                    if let Some(end) = prev_end {
                        out.idle_ms += (t - end).max(0.0);
                    }
                    prev_mark = Some((true, t));
                }
                Mark::After(name) => {
                    // Launches without a Before mark (library calls) get the time since the
                    // previous mark.
                    let start = prev_mark.map_or(t, |(_, s)| s);
                    let entry = by_name.entry(name.clone()).or_default();
                    entry.0 += 1;
                    entry.1 += (t - start).max(0.0);
                    prev_end = Some(t);
                    prev_mark = Some((false, t));
                }
            }
        }
        out.span_ms = times.last().copied().unwrap_or(0.0);
        out.kernels = by_name
            .into_iter()
            .map(|(name, (calls, ms))| KernelTime { name, calls, ms })
            .collect();
        out.kernels
            .sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
        self.pool.extend(marks.into_iter().map(|(_, e)| e));
        Ok(out)
    }
}

impl std::fmt::Display for ProfileReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let busy: f64 = self.kernels.iter().map(|k| k.ms).sum();
        writeln!(
            f,
            "GPU profile: {:.3} ms span, {:.3} ms in kernels, {:.3} ms idle between them{}",
            self.span_ms,
            busy,
            self.idle_ms,
            if self.untimed > 0 {
                format!(", {} launches not timed (mark limit)", self.untimed)
            } else {
                String::new()
            }
        )?;
        writeln!(
            f,
            "  {:<28} {:>8} {:>11} {:>10} {:>6}",
            "kernel", "calls", "total ms", "mean us", "%"
        )?;
        for k in &self.kernels {
            let pct = if busy > 0.0 { 100.0 * k.ms / busy } else { 0.0 };
            writeln!(
                f,
                "  {:<28} {:>8} {:>11.3} {:>10.2} {:>6.1}",
                k.name,
                k.calls,
                k.ms,
                1000.0 * k.ms / k.calls.max(1) as f64,
                pct
            )?;
        }
        Ok(())
    }
}
