//! A chained decode pass recorded as a CUDA graph (stream capture) and launched as one unit
//! (`Backend::begin_pass_recording`): the pass's few hundred kernel launches then leave the
//! host once, as one graph launch, and the GPU takes the kernels from a prepared list.
//!
//! Each pass is recorded again (its positions differ) and the recording is written into an
//! executable graph kept from before (`cuGraphExecUpdate`: same kernels and shapes, new
//! arguments), instantiating a new one only when the shape of the pass changed. Executables
//! rotate, so the one updated is never the one the GPU may still be running.
//!
//! While a pass is recorded nothing may allocate device memory or copy from host memory (a
//! stream-ordered allocation would be recorded, not made): those paths check
//! [`PassGraphs::recording`] and fail, which ends the recording without running anything;
//! the executor then runs the pass as usual.

use cudarc::driver::sys;

/// Executables in rotation: more than the passes a chained decode keeps queued (two).
const EXECS: usize = 3;

/// Consecutive failed recordings after which recording stops for this backend.
const MAX_FAILURES_IN_A_ROW: u32 = 8;

/// An instantiated graph, destroyed on drop (asynchronously by the driver if it still runs).
struct Exec(sys::CUgraphExec);

// SAFETY: a graph executable is a driver handle usable from any thread of the context;
// `PassGraphs` sits behind the backend's mutex.
unsafe impl Send for Exec {}

impl Drop for Exec {
    fn drop(&mut self) {
        // SAFETY: instantiated by cuGraphInstantiateWithFlags and destroyed only here; the
        // driver frees it after any launch still running.
        let _ = unsafe { sys::cuGraphExecDestroy(self.0) };
    }
}

/// A recorded graph, destroyed on drop.
struct Graph(sys::CUgraph);

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: from cuStreamEndCapture, destroyed only here (executables made from it
        // are independent of it).
        let _ = unsafe { sys::cuGraphDestroy(self.0) };
    }
}

/// Counts of what the recorded passes did (tests and the summary read them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphCounts {
    /// Passes launched as a graph.
    pub launched: u64,
    /// Of those, the ones that needed a new executable (the first of each in rotation, or
    /// a pass of another shape).
    pub instantiated: u64,
    /// Recordings that ran nothing (the pass then ran without one).
    pub failed: u64,
}

/// The recording state of one backend's compute stream.
#[derive(Default)]
pub(crate) struct PassGraphs {
    execs: [Option<Exec>; EXECS],
    next: usize,
    recording: bool,
    /// Token slots whose `written` event is recorded after the graph's launch (an event
    /// recorded during capture would become a graph dependency, not a mark the host can wait
    /// for).
    pub(crate) marks: Vec<usize>,
    failures_in_a_row: u32,
    pub(crate) counts: GraphCounts,
}

fn ce(what: &str, e: impl std::fmt::Debug) -> String {
    format!("{what}: {e:?}")
}

impl PassGraphs {
    /// Whether a pass is being recorded (nothing may allocate or copy from the host).
    pub(crate) fn recording(&self) -> bool {
        self.recording
    }

    /// Whether recording has been given up after repeated failures.
    pub(crate) fn gave_up(&self) -> bool {
        self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW
    }

    /// Start recording `stream`'s work. Relaxed mode: other threads' CUDA calls (the copy
    /// stream, the probes) are not affected.
    pub(crate) fn begin(&mut self, stream: sys::CUstream) -> Result<(), String> {
        if self.recording {
            return Err("a pass is already being recorded".into());
        }
        // SAFETY: a live stream of the current context, not capturing (checked above: only
        // this type starts captures on it).
        unsafe {
            sys::cuStreamBeginCapture_v2(
                stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
            )
            .result()
        }
        .map_err(|e| ce("begin graph capture", e))?;
        self.recording = true;
        self.marks.clear();
        Ok(())
    }

    /// End the recording; with `run`, launch it on `stream` (Ok(true)). Ok(false): nothing
    /// ran (not `run`, or the capture was invalidated by an operation it cannot hold).
    pub(crate) fn end(&mut self, stream: sys::CUstream, run: bool) -> Result<bool, String> {
        if !self.recording {
            return Err("no pass is being recorded".into());
        }
        self.recording = false;
        let mut raw: sys::CUgraph = std::ptr::null_mut();
        // SAFETY: the stream is capturing (begun above); `raw` receives the graph or stays
        // null when the capture was invalidated.
        let ended = unsafe { sys::cuStreamEndCapture(stream, &mut raw) }.result();
        let graph = (!raw.is_null()).then_some(Graph(raw));
        let launched = match (ended, graph) {
            (Ok(()), Some(g)) if run => match self.launch(&g, stream) {
                Ok(()) => true,
                // Nothing of it ran: the pass runs directly; say why once.
                Err(e) => {
                    if self.counts.failed == 0 {
                        eprintln!("flea: a recorded decode pass was not launched as a graph ({e})");
                    }
                    false
                }
            },
            (ended, graph) => {
                // The capture was invalidated (an operation a graph cannot hold); say so once.
                if run && self.counts.failed == 0 {
                    let why = match ended {
                        Err(e) => format!("{e:?}"),
                        Ok(()) if graph.is_none() => "no graph".to_string(),
                        Ok(()) => "not run".to_string(),
                    };
                    eprintln!("flea: a decode pass's recording ended without a graph ({why})");
                }
                false
            }
        };
        if launched {
            self.failures_in_a_row = 0;
            self.counts.launched += 1;
        } else {
            self.failures_in_a_row += 1;
            self.counts.failed += 1;
            self.marks.clear();
        }
        Ok(launched)
    }

    /// Put `g` into the next executable in rotation and launch it.
    fn launch(&mut self, g: &Graph, stream: sys::CUstream) -> Result<(), String> {
        let slot = self.next;
        self.next = (self.next + 1) % EXECS;
        let updated = match &self.execs[slot] {
            Some(exec) => {
                // SAFETY: plain output struct filled by the driver.
                let mut info: sys::CUgraphExecUpdateResultInfo = unsafe { std::mem::zeroed() };
                // SAFETY: both handles live; `exec` is not running (the rotation is longer
                // than the queue of passes, and launched work is only appended after it).
                unsafe { sys::cuGraphExecUpdate_v2(exec.0, g.0, &mut info) }
                    .result()
                    .is_ok()
            }
            None => false,
        };
        if !updated {
            self.execs[slot] = None;
            let mut raw: sys::CUgraphExec = std::ptr::null_mut();
            // SAFETY: a complete graph from a valid capture; `raw` receives the executable.
            unsafe { sys::cuGraphInstantiateWithFlags(&mut raw, g.0, 0) }
                .result()
                .map_err(|e| ce("instantiate a pass graph", e))?;
            self.execs[slot] = Some(Exec(raw));
            self.counts.instantiated += 1;
        }
        let exec = self.execs[slot]
            .as_ref()
            .ok_or_else(|| "no pass graph".to_string())?;
        // SAFETY: an instantiated graph of this context, launched on its stream.
        unsafe { sys::cuGraphLaunch(exec.0, stream) }
            .result()
            .map_err(|e| ce("launch a pass graph", e))
    }
}
