//! Where a decode token's time goes between passes (`FLEA_CUDA_GAPS=1`, printed when the
//! backend drops): the GPU's idle time from the end of one decode pass's work (before its
//! logits are read back) to the next pass's embedding, the GPU span of each pass, and the
//! host's share of the idle time (outside the backend: sampling, printing, the executor's
//! pass set-up; inside `embed`: the upload of the token's row). Two events a pass; passes of
//! more than one row (prompts) are not counted. Meant for resident decode: the hybrid's
//! read-backs of the hidden state inside a pass would end its span early. A chained greedy
//! decode (chain.rs) queues a pass before the host reads the one before: passes are matched
//! to their reads in order, and a pass whose token is never read (queued past a stop) may
//! be counted against the wrong read afterwards.

use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Default)]
struct State {
    /// Recorded after the embedding launch of a pass whose end is not queued yet.
    start: Option<CudaEvent>,
    /// Queued passes not yet read back: (start if a decode pass, end), oldest first.
    queued: VecDeque<(Option<CudaEvent>, CudaEvent)>,
    /// The end of the last pass read back.
    last_end: Option<CudaEvent>,
    host_read_end: Option<Instant>,
    embed_begin: Option<Instant>,
    idle_ms: f64,
    span_ms: f64,
    host_outside_ms: f64,
    embed_ms: f64,
    passes: u64,
}

#[derive(Default)]
pub(crate) struct PassGaps(Mutex<State>);

fn timed_event(ctx: &Arc<CudaContext>, stream: &CudaStream) -> Result<CudaEvent, String> {
    let e = ctx
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| format!("gap probe event: {e:?}"))?;
    e.record(stream)
        .map_err(|e| format!("gap probe record: {e:?}"))?;
    Ok(e)
}

impl PassGaps {
    pub(crate) fn from_env() -> Option<PassGaps> {
        std::env::var_os("FLEA_CUDA_GAPS")
            .filter(|v| v != "0")
            .map(|_| PassGaps::default())
    }

    fn state(&self) -> Result<std::sync::MutexGuard<'_, State>, String> {
        self.0
            .lock()
            .map_err(|_| "gap probe lock poisoned".to_string())
    }

    /// `embed` of `rows` rows starts (the host side of the next pass reaches the backend).
    pub(crate) fn embed_begin(&self, rows: usize) -> Result<(), String> {
        let mut g = self.state()?;
        let now = Instant::now();
        if let (Some(t), 1) = (g.host_read_end, rows) {
            g.host_outside_ms += (now - t).as_secs_f64() * 1e3;
        }
        g.embed_begin = (rows == 1).then_some(now);
        Ok(())
    }

    /// The embedding kernel of a one-row pass is launched: the pass's GPU work starts.
    pub(crate) fn embed_end(
        &self,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
        rows: usize,
    ) -> Result<(), String> {
        if rows != 1 {
            return Ok(());
        }
        let e = timed_event(ctx, stream)?;
        let mut g = self.state()?;
        g.start = Some(e);
        if let Some(t0) = g.embed_begin.take() {
            g.embed_ms += t0.elapsed().as_secs_f64() * 1e3;
        }
        Ok(())
    }

    /// The pass's GPU work is all queued (before its read-back is).
    pub(crate) fn pass_end(
        &self,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
    ) -> Result<(), String> {
        let end = timed_event(ctx, stream)?;
        let mut g = self.state()?;
        let start = g.start.take();
        g.queued.push_back((start, end));
        Ok(())
    }

    /// After a read-back waited for the oldest queued pass: count it (if it had one row
    /// and a pass came before it).
    pub(crate) fn after_read(&self) -> Result<(), String> {
        let mut g = self.state()?;
        // At most two passes are queued when one is read (a chained decode); more means a
        // pass was never read: drop it.
        while g.queued.len() > 2 {
            g.queued.pop_front();
        }
        let Some((start, end)) = g.queued.pop_front() else {
            return Ok(());
        };
        if let Some(start) = start {
            // (A pass whose events cannot be timed is left out rather than failing the run.)
            let times = g.last_end.as_ref().and_then(|last| {
                Some((last.elapsed_ms(&start).ok()?, start.elapsed_ms(&end).ok()?))
            });
            if let Some((idle, span)) = times {
                g.idle_ms += f64::from(idle);
                g.span_ms += f64::from(span);
                g.passes += 1;
            }
        }
        g.last_end = Some(end);
        g.host_read_end = Some(Instant::now());
        Ok(())
    }

    pub(crate) fn report(&self) -> Option<String> {
        let g = self.state().ok()?;
        let k = g.passes.max(1) as f64;
        Some(format!(
            "cuda gaps: {} decode passes: GPU idle between passes {:.1} us, pass span {:.3} ms; \
             of the idle time on the host: {:.1} us outside the backend, {:.1} us in embed",
            g.passes,
            g.idle_ms * 1e3 / k,
            g.span_ms / k,
            g.host_outside_ms * 1e3 / k,
            g.embed_ms * 1e3 / k,
        ))
    }
}
