//! Per-kernel GPU time from CUDA events (`FLEA_CUDA_PROFILE=1`).
//!
//! Every launch on the compute stream is bracketed by two timing events: one recorded just
//! before it (when the stream reaches it) and one after. Kernel time is the difference; the
//! time from one kernel's end to the next one's start is the GPU waiting for the host (or for
//! the copy stream). Events come from a pool reused between reports, so a long run does not
//! create one event per launch. Library calls (cuBLAS) get no start mark: their time runs from
//! the previous mark and so also holds any time the GPU waited for the host inside the call
//! (cuBLAS choosing and loading a kernel on a shape's first call: ~50 ms per process before
//! `warm_up_gemms`).

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
        let untimed = std::mem::take(&mut self.untimed);
        let Some((_, first)) = marks.first() else {
            return Ok(ProfileReport {
                untimed,
                ..Default::default()
            });
        };
        let mut times = Vec::with_capacity(marks.len());
        for (_, e) in &marks {
            times.push(f64::from(
                first
                    .elapsed_ms(e)
                    .map_err(|e| format!("profile elapsed: {e:?}"))?,
            ));
        }
        let timed: Vec<(Option<&str>, f64)> = marks
            .iter()
            .zip(&times)
            .map(|((m, _), &t)| match m {
                Mark::Before => (None, t),
                Mark::After(name) => (Some(name.as_str()), t),
            })
            .collect();
        let mut out = aggregate(&timed);
        out.untimed = untimed;
        self.pool.extend(marks.into_iter().map(|(_, e)| e));
        Ok(out)
    }
}

/// Sums marks in stream order — `(None, t)` a kernel about to start, `(Some(name), t)` one
/// that ended, `t` in ms — into per-name GPU time and the idle time between kernels.
fn aggregate(marks: &[(Option<&str>, f64)]) -> ProfileReport {
    let mut out = ProfileReport::default();
    let mut by_name: HashMap<&str, (u64, f64)> = HashMap::new();
    // Where the previous kernel ended (for idle time) and the time of the latest mark.
    let mut prev_end: Option<f64> = None;
    let mut prev_mark: Option<f64> = None;
    for &(m, t) in marks {
        match m {
            None => {
                // Only the first start mark after a kernel ended counts the gap (a launch
                // may be marked twice, e.g. when its config was built by a helper).
                if let Some(end) = prev_end.take() {
                    out.idle_ms += (t - end).max(0.0);
                }
                prev_mark = Some(t);
            }
            Some(name) => {
                // Launches without a start mark (library calls) get the time since the
                // previous mark.
                let start = prev_mark.unwrap_or(t);
                let entry = by_name.entry(name).or_default();
                entry.0 += 1;
                entry.1 += (t - start).max(0.0);
                prev_end = Some(t);
                prev_mark = Some(t);
            }
        }
    }
    out.span_ms = match (marks.first(), marks.last()) {
        (Some(a), Some(b)) => b.1 - a.1,
        _ => 0.0,
    };
    out.kernels = by_name
        .into_iter()
        .map(|(name, (calls, ms))| KernelTime {
            name: name.to_string(),
            calls,
            ms,
        })
        .collect();
    out.kernels
        .sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_time_idle_time_and_unmarked_calls() {
        let marks = [
            (None, 0.0),
            (Some("a"), 2.0),    // a: 2 ms
            (None, 3.0),         // idle 1 ms
            (Some("b"), 7.0),    // b: 4 ms
            (Some("gemm"), 8.0), // no start mark: 1 ms since b ended
            (None, 8.5),         // idle 0.5 ms
            (None, 8.5),         // marked twice: no second idle
            (Some("a"), 9.5),    // a again: 1 ms
        ];
        let r = aggregate(&marks);
        assert_eq!(r.span_ms, 9.5);
        assert!((r.idle_ms - 1.5).abs() < 1e-9);
        let get = |n: &str| r.kernels.iter().find(|k| k.name == n).cloned().unwrap();
        assert_eq!((get("a").calls, get("a").ms), (2, 3.0));
        assert_eq!((get("b").calls, get("b").ms), (1, 4.0));
        assert_eq!((get("gemm").calls, get("gemm").ms), (1, 1.0));
        // Largest first.
        assert_eq!(r.kernels[0].name, "b");
        let text = r.to_string();
        assert!(
            text.contains("9.500 ms span") && text.contains("1.500 ms idle"),
            "{text}"
        );
        assert!(aggregate(&[]).kernels.is_empty());
    }
}
