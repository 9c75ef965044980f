//! Where a decode token's time goes between passes (`FLEA_CUDA_GAPS=1`, printed when the
//! backend drops): the GPU's idle time from the end of one decode pass's work (before its
//! logits are read back) to the next pass's embedding, the GPU span of each pass, and the
//! host's share of the idle time (outside the backend: sampling, printing, the executor's
//! pass set-up; inside `embed`: the upload of the token's row). Two events a pass; passes of
//! more than one row (prompts) are not counted. Meant for resident decode: the hybrid's
//! read-backs of the hidden state inside a pass would end its span early.

use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Default)]
struct State {
    /// Recorded after this pass's embedding launch.
    start: Option<CudaEvent>,
    /// Recorded before the previous pass's logits read-back.
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

    /// Before a read-back: the pass's GPU work is all queued.
    pub(crate) fn before_read(
        &self,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
    ) -> Result<CudaEvent, String> {
        timed_event(ctx, stream)
    }

    /// After the read-back waited for `end`: count the pass (if it had one row and a pass
    /// came before it).
    pub(crate) fn after_read(&self, end: CudaEvent) -> Result<(), String> {
        let mut g = self.state()?;
        if let Some(start) = g.start.take() {
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
