//! The continuous-batching engine: one scheduler loop owns the model and runs steps.
//!
//! ```text
//!   handlers ──try_send──▶ [bounded job queue] ──▶ admit while a KV slot is free
//!   each step: one pass over the weights with every running sequence's next token plus
//!              prompt chunks of newly admitted ones (up to the batch capacity)
//!              ─▶ sample per sequence ─▶ text to each request's own bounded channel
//! ```
//!
//! A sequence whose receiver is gone (client disconnected) is dropped at the next step and
//! its slot reused. Every queue is bounded: the job queue by `queue_capacity`, each
//! request's channel by its token limit (one message per token at most, plus two).

use crate::template::{ChatTemplate, Message};
use crate::ServerError;
use flea_model::backend::Row;
use flea_model::sampling::SlotPick;
use flea_model::{Sampler, SamplerConfig};
use flea_tokenizer::{Tokenizer, Utf8Stream};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A model that evaluates batches of rows from several sequences in one weight pass.
pub trait StepModel {
    /// Positions per sequence slot.
    fn n_ctx(&self) -> usize;
    /// Sequence slots of the KV cache.
    fn n_seq(&self) -> usize;
    /// Most rows per step.
    fn capacity(&self) -> usize;
    /// One pass: `tokens[i]` at `rows[i]`; logits of rows `logit_rows`,
    /// `[logit_rows.len()][n_vocab]`.
    fn step(
        &mut self,
        tokens: &[u32],
        rows: &[Row],
        logit_rows: &[usize],
    ) -> Result<Vec<f32>, String>;
    /// Bytes moved and memory in use, for /metrics.
    fn usage(&self) -> ModelUsage {
        ModelUsage::default()
    }
    /// How this model's device would pick what `sampler` samples next (its draw still to be
    /// filled in), for [`StepModel::step_picks`]; None: the host samples from logits.
    fn slot_pick(&self, _sampler: &Sampler) -> Option<SlotPick> {
        None
    }
    /// As `step`, each of the rows `logit_rows` getting the token `picks[i]` chooses on the
    /// device instead of its logits (only where `slot_pick` said how).
    fn step_picks(
        &mut self,
        _tokens: &[u32],
        _rows: &[Row],
        _logit_rows: &[usize],
        _picks: &[SlotPick],
    ) -> Result<Vec<u32>, String> {
        Err("this model does not pick tokens on its device".into())
    }
    /// Decode sequence slot `seq` with the tokens chosen on the device (see
    /// `StreamedModel::decode_chained_at`): `first` fed at `pos`, each new token handed to
    /// `on_token` until it returns false or `max` passes ran. Ok(None): this model cannot
    /// (nothing ran); else how many tokens `on_token` got.
    fn decode_chained(
        &mut self,
        _seq: usize,
        _pos: usize,
        _first: u32,
        _max: usize,
        _sampler: &mut Sampler,
        _on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Option<usize>, String> {
        Ok(None)
    }
}

/// Cumulative bytes read per link and arena use.
#[derive(Clone, Copy, Debug, Default)]
pub struct ModelUsage {
    pub bytes_disk: u64,
    pub bytes_host_cache: u64,
    pub bytes_resident: u64,
    pub device_used: u64,
    pub device_budget: u64,
    pub host_used: u64,
    pub host_budget: u64,
}

impl<B: flea_model::UnitStaging> StepModel for flea_runtime::StreamedModel<'_, B> {
    fn n_ctx(&self) -> usize {
        self.n_ctx
    }
    fn n_seq(&self) -> usize {
        self.plan.n_seq
    }
    fn capacity(&self) -> usize {
        flea_runtime::StreamedModel::capacity(self)
    }
    fn step(&mut self, t: &[u32], r: &[Row], l: &[usize]) -> Result<Vec<f32>, String> {
        flea_runtime::StreamedModel::step(self, t, r, l).map_err(|e| e.to_string())
    }
    fn slot_pick(&self, sampler: &Sampler) -> Option<SlotPick> {
        // Only where the backend keeps token slots: the CPU samples from the logits it has.
        (self.backend.token_slots() > 0 && self.picks_rows())
            .then(|| self.slot_pick_for(sampler))
            .flatten()
    }
    fn step_picks(
        &mut self,
        t: &[u32],
        r: &[Row],
        l: &[usize],
        picks: &[SlotPick],
    ) -> Result<Vec<u32>, String> {
        flea_runtime::StreamedModel::step_picks(self, t, r, l, picks).map_err(|e| e.to_string())
    }
    fn decode_chained(
        &mut self,
        seq: usize,
        pos: usize,
        first: u32,
        max: usize,
        sampler: &mut Sampler,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Option<usize>, String> {
        let err = |e: flea_runtime::RuntimeError| e.to_string();
        if !self.samples_on_backend(sampler) || !self.prepare_chain().map_err(err)? {
            return Ok(None);
        }
        self.decode_chained_at(seq, pos, first, max, sampler, on_token)
            .map(Some)
            .map_err(err)
    }
    fn usage(&self) -> ModelUsage {
        ModelUsage {
            bytes_disk: self.stats.bytes_streamed,
            bytes_host_cache: self.stats.bytes_host_cache,
            bytes_resident: self.stats.bytes_resident,
            device_used: self.device.used(),
            device_budget: self.device.budget,
            host_used: self.host.used(),
            host_budget: self.host.budget,
        }
    }
}

/// A session computing in place (weights read from the mmap, or on a GPU backend).
impl<B: flea_model::Backend> StepModel for flea_model::Session<'_, B> {
    fn n_ctx(&self) -> usize {
        self.n_ctx
    }
    fn n_seq(&self) -> usize {
        self.n_seq
    }
    fn capacity(&self) -> usize {
        flea_model::Session::capacity(self)
    }
    fn step(&mut self, t: &[u32], r: &[Row], l: &[usize]) -> Result<Vec<f32>, String> {
        flea_model::Session::step(self, t, r, l).map_err(|e| e.to_string())
    }
}

/// What to generate from.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// Plain text, tokenized with the model's BOS (as `flea run` does).
    Text(String),
    /// Messages rendered with the model's chat template.
    Chat(Vec<Message>),
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct GenRequest {
    pub prompt: Prompt,
    /// None: up to the end of the context.
    pub max_tokens: Option<usize>,
    pub sampling: SamplerConfig,
    pub stop: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// max_tokens or the context's end.
    Length,
    /// The server shut down before the request finished.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// What a request's channel carries: `Started` (or `Error`) first, then text, then `Done`.
#[derive(Debug)]
pub enum Event {
    Started {
        prompt_tokens: usize,
    },
    Text(String),
    Done {
        finish_reason: FinishReason,
        completion_tokens: usize,
    },
    Error(ServerError),
}

struct Job {
    req: GenRequest,
    tx: mpsc::Sender<Event>,
}

/// Counters shared with /metrics.
#[derive(Default)]
pub struct Metrics {
    pub requests_total: AtomicU64,
    pub requests_rejected: AtomicU64,
    pub requests_failed: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub prompt_tokens_total: AtomicU64,
    pub generated_tokens_total: AtomicU64,
    /// Of those, the tokens chosen on the device in chained bursts.
    pub chained_tokens_total: AtomicU64,
    pub steps_total: AtomicU64,
    /// Rows (tokens) fed to the weight passes, prompts and decodes alike.
    pub step_rows_total: AtomicU64,
    /// Nanoseconds in the weight passes (device work and the logits' read-back; chained
    /// bursts' on-device sampling included).
    pub forward_nanos_total: AtomicU64,
    /// Nanoseconds the engine spent choosing tokens from read-back logits on the host.
    pub sampling_nanos_total: AtomicU64,
    pub queue_depth: AtomicUsize,
    pub active_sequences: AtomicUsize,
    pub last_batch_rows: AtomicUsize,
    pub last_batch_sequences: AtomicUsize,
    /// Generated tokens per second over the recent steps (f64 bits).
    pub tokens_per_second: AtomicU64,
    pub usage: Mutex<ModelUsage>,
    pub n_seq: AtomicUsize,
    pub n_ctx: AtomicUsize,
}

/// What a step's pass gave back for its wanted rows.
enum Picked {
    /// Tokens the device picked, in the rows' order.
    Tokens(Vec<u32>),
    /// Logits for the host to sample from.
    Logits(Vec<f32>),
}

/// Adds `secs` to a nanosecond counter.
fn add_nanos(counter: &AtomicU64, secs: f64) {
    counter.fetch_add((secs * 1e9) as u64, Ordering::Relaxed);
}

/// Where requests enter. Cloneable; the engine stops when every handle is gone (or on
/// shutdown) and its work is done.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: SyncSender<Job>,
    pub metrics: Arc<Metrics>,
    shutdown: Arc<AtomicBool>,
}

impl EngineHandle {
    /// Queue a request. Its events arrive on the returned receiver. Fails at once when the
    /// queue is full or the engine is shutting down.
    pub fn submit(&self, req: GenRequest) -> Result<mpsc::Receiver<Event>, ServerError> {
        if self.shutdown.load(Ordering::SeqCst) {
            return Err(ServerError::ShuttingDown);
        }
        // Started + one message per token + Done (or a single Error): never full.
        let cap = req.max_tokens.unwrap_or(usize::MAX).min(1 << 20) + 2;
        let cap = cap.min(self.metrics.n_ctx.load(Ordering::Relaxed).max(1) + 2);
        let (tx, rx) = mpsc::channel(cap);
        self.metrics.queue_depth.fetch_add(1, Ordering::SeqCst);
        match self.jobs.try_send(Job { req, tx }) {
            Ok(()) => {
                self.metrics.requests_total.fetch_add(1, Ordering::Relaxed);
                Ok(rx)
            }
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
                self.metrics
                    .requests_rejected
                    .fetch_add(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => ServerError::QueueFull,
                    TrySendError::Disconnected(_) => ServerError::ShuttingDown,
                })
            }
        }
    }

    /// Stop admitting; finish running sequences (cancel them after the grace period).
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Requests waiting for a slot, at most.
    pub queue_capacity: usize,
    /// After shutdown starts, running sequences get this long to finish.
    pub shutdown_grace: Duration,
    /// A sequence running alone decodes with its tokens chosen on the device
    /// (`StepModel::decode_chained`), in bursts of up to [`CHAINED_BURST`] tokens that end
    /// when another request waits. Off by default: worth it where a device would idle while
    /// the host samples (a GPU).
    pub chain_decode: bool,
    /// Threads that sample a step's sequences (at most [`SAMPLE_THREADS_MAX`]; each
    /// sequence has its own sampler, so the tokens do not depend on it). Worth it where the
    /// device waits for the host between steps (a GPU): a whole-vocabulary draw costs the
    /// host ~0.5 ms a sequence. 1 (the default) samples on the engine's thread.
    pub sample_threads: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            queue_capacity: 256,
            shutdown_grace: Duration::from_secs(30),
            chain_decode: false,
            sample_threads: 1,
        }
    }
}

/// Most threads [`EngineOptions::sample_threads`] may ask for.
pub const SAMPLE_THREADS_MAX: usize = 16;

/// Most tokens of one chained burst: the engine's loop (metrics, shutdown grace) comes round
/// at least this often; the queue and the client are checked after every token.
pub const CHAINED_BURST: usize = 64;

/// One running sequence.
struct Seq {
    slot: usize,
    tx: mpsc::Sender<Event>,
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// Positions in the cache (prompt fed + generated tokens fed).
    pos: usize,
    /// The sampled token not yet fed back.
    pending: Option<u32>,
    max_new: usize,
    generated: usize,
    sampler: Sampler,
    utf8: Utf8Stream,
    stop: Vec<String>,
    /// Generated text not yet sent (held back while it may be the start of a stop string).
    held: String,
}

/// The scheduler. Create with [`Engine::new`], submit through the handle, call `run`.
pub struct Engine<'a> {
    model: &'a mut dyn StepModel,
    tokenizer: &'a Tokenizer,
    template: Option<ChatTemplate>,
    jobs: Receiver<Job>,
    metrics: Arc<Metrics>,
    shutdown: Arc<AtomicBool>,
    opts: EngineOptions,
    seqs: Vec<Seq>,
    free_slots: Vec<usize>,
    /// (generated tokens, seconds) of recent steps, for the tokens/s gauge.
    recent: VecDeque<(usize, f64)>,
}

impl<'a> Engine<'a> {
    pub fn new(
        model: &'a mut dyn StepModel,
        tokenizer: &'a Tokenizer,
        template: Option<ChatTemplate>,
        opts: EngineOptions,
    ) -> (Engine<'a>, EngineHandle) {
        let (tx, rx) = sync_channel(opts.queue_capacity.max(1));
        let metrics = Arc::new(Metrics::default());
        metrics.n_seq.store(model.n_seq(), Ordering::Relaxed);
        metrics.n_ctx.store(model.n_ctx(), Ordering::Relaxed);
        let handle = EngineHandle {
            jobs: tx,
            metrics,
            shutdown: Arc::new(AtomicBool::new(false)),
        };
        let n_seq = model.n_seq().max(1);
        let engine = Engine {
            model,
            tokenizer,
            template,
            jobs: rx,
            metrics: handle.metrics.clone(),
            shutdown: handle.shutdown.clone(),
            opts,
            seqs: Vec::with_capacity(n_seq),
            // Lowest slot first.
            free_slots: (0..n_seq).rev().collect(),
            recent: VecDeque::with_capacity(RECENT_STEPS),
        };
        (engine, handle)
    }

    /// Run until shut down (or every handle dropped) and no work is left.
    pub fn run(mut self) {
        let shutdown = self.shutdown.clone();
        let metrics = self.metrics.clone();
        let mut disconnected = false;
        let mut shutdown_at: Option<Instant> = None;
        loop {
            if shutdown.load(Ordering::SeqCst) && shutdown_at.is_none() {
                shutdown_at = Some(Instant::now());
            }
            // Admit while slots are free: wait for work only when idle.
            while !self.free_slots.is_empty() && !disconnected {
                let job = if self.seqs.is_empty() && shutdown_at.is_none() {
                    match self.jobs.recv_timeout(Duration::from_millis(100)) {
                        Ok(j) => j,
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => {
                            disconnected = true;
                            break;
                        }
                    }
                } else {
                    match self.jobs.try_recv() {
                        Ok(j) => j,
                        Err(std::sync::mpsc::TryRecvError::Empty) => break,
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                            disconnected = true;
                            break;
                        }
                    }
                };
                metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
                if shutdown_at.is_some() {
                    let _ = job.tx.try_send(Event::Error(ServerError::ShuttingDown));
                    continue;
                }
                self.admit(job);
            }
            if let Some(t0) = shutdown_at {
                // Refuse what is still queued.
                while let Ok(job) = self.jobs.try_recv() {
                    metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
                    let _ = job.tx.try_send(Event::Error(ServerError::ShuttingDown));
                }
                if t0.elapsed() > self.opts.shutdown_grace {
                    for s in self.seqs.drain(..) {
                        metrics.requests_cancelled.fetch_add(1, Ordering::Relaxed);
                        let _ = s.tx.try_send(Event::Done {
                            finish_reason: FinishReason::Cancelled,
                            completion_tokens: s.generated,
                        });
                    }
                }
            }
            // Clients that went away free their slots now.
            self.drop_disconnected();
            if self.seqs.is_empty() {
                self.publish_state();
                if disconnected || shutdown_at.is_some() {
                    return;
                }
                continue;
            }
            self.step();
            self.publish_state();
        }
    }

    /// Tokenize, check the context, take a slot.
    fn admit(&mut self, job: Job) {
        let metrics = &self.metrics;
        // A panic while preparing one request fails that request only.
        let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.tokenize(&job.req.prompt)
        }))
        .unwrap_or_else(|_| {
            Err(ServerError::InvalidRequest(
                "the prompt could not be tokenized".into(),
            ))
        });
        let prompt = match prepared {
            Ok(p) => p,
            Err(e) => {
                metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
                let _ = job.tx.try_send(Event::Error(e));
                return;
            }
        };
        let n_ctx = self.model.n_ctx();
        let room = n_ctx.saturating_sub(prompt.len());
        let max_new = match job.req.max_tokens {
            Some(m) if prompt.len() + m > n_ctx => {
                metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
                let _ = job.tx.try_send(Event::Error(ServerError::ContextOverflow {
                    prompt: prompt.len(),
                    max_tokens: m,
                    n_ctx,
                }));
                return;
            }
            Some(m) => m,
            None => room,
        };
        if prompt.is_empty() || prompt.len() >= n_ctx {
            metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
            let _ = job.tx.try_send(Event::Error(if prompt.is_empty() {
                ServerError::InvalidRequest("the prompt tokenized to nothing".into())
            } else {
                ServerError::ContextOverflow {
                    prompt: prompt.len(),
                    max_tokens: 1,
                    n_ctx,
                }
            }));
            return;
        }
        let Some(slot) = self.free_slots.pop() else {
            // Admission only runs with a free slot.
            let _ = job.tx.try_send(Event::Error(ServerError::QueueFull));
            return;
        };
        if job
            .tx
            .try_send(Event::Started {
                prompt_tokens: prompt.len(),
            })
            .is_err()
        {
            self.free_slots.push(slot);
            return;
        }
        metrics
            .prompt_tokens_total
            .fetch_add(prompt.len() as u64, Ordering::Relaxed);
        let mut sampler = Sampler::new(job.req.sampling.clone());
        prompt.iter().for_each(|&t| sampler.accept(t));
        self.seqs.push(Seq {
            slot,
            tx: job.tx,
            prompt,
            fed: 0,
            pos: 0,
            pending: None,
            max_new,
            generated: 0,
            sampler,
            utf8: Utf8Stream::default(),
            stop: job.req.stop,
            held: String::new(),
        });
    }

    fn tokenize(&self, p: &Prompt) -> Result<Vec<u32>, ServerError> {
        let tok = self.tokenizer;
        Ok(match p {
            Prompt::Text(t) => tok.encode(t, true, true),
            Prompt::Chat(messages) => {
                let tmpl = self.template.as_ref().ok_or_else(|| {
                    ServerError::InvalidRequest("this model has no chat template".into())
                })?;
                let rendered = tmpl
                    .render(messages, true)
                    .map_err(|e| ServerError::InvalidRequest(e.to_string()))?;
                // Templates that write the BOS token themselves must not get a second one.
                let has_bos = tok
                    .bos()
                    .and_then(|b| tok.token_text(b))
                    .is_some_and(|b| !b.is_empty() && rendered.starts_with(b));
                tok.encode(&rendered, !has_bos, true)
            }
        })
    }

    fn drop_disconnected(&mut self) {
        let metrics = &self.metrics;
        let mut i = 0;
        while i < self.seqs.len() {
            if self.seqs[i].tx.is_closed() {
                let s = self.seqs.swap_remove(i);
                metrics.requests_cancelled.fetch_add(1, Ordering::Relaxed);
                self.free_slots.push(s.slot);
            } else {
                i += 1;
            }
        }
    }

    /// One pass: every decoding sequence's pending token, then prompt chunks in admission
    /// order while capacity remains.
    fn step(&mut self) {
        if self.opts.chain_decode && self.chained_burst() {
            return;
        }
        let cap = self.model.capacity().max(1);
        let mut tokens = Vec::with_capacity(cap);
        let mut rows = Vec::with_capacity(cap);
        // (index into seqs, batch row whose logits it samples from)
        let mut wants: Vec<(usize, usize)> = Vec::with_capacity(self.seqs.len());
        // Prompt tokens each sequence feeds this step, and whether its pending token goes in.
        let mut feeds = vec![0usize; self.seqs.len()];
        let mut decodes = vec![false; self.seqs.len()];
        for (i, s) in self.seqs.iter().enumerate() {
            if let (Some(t), true) = (s.pending, rows.len() < cap) {
                tokens.push(t);
                rows.push(Row {
                    seq: s.slot,
                    pos: s.pos,
                });
                wants.push((i, rows.len() - 1));
                decodes[i] = true;
            }
        }
        let mut chunked = false;
        for (i, s) in self.seqs.iter().enumerate() {
            let left = s.prompt.len() - s.fed;
            if s.pending.is_some() || left == 0 || rows.len() >= cap {
                continue;
            }
            let room = cap - rows.len();
            // A whole prompt in one pass computes exactly as `flea run` does; a prompt that
            // does not fit waits for a later step, except the first one waiting, which
            // takes what is left (in multiples of 64 rows where it can) so nothing starves.
            let n = if left <= room {
                left
            } else if !chunked {
                chunked = true;
                if room >= 64 {
                    room / 64 * 64
                } else {
                    room
                }
            } else {
                continue;
            };
            for k in 0..n {
                tokens.push(s.prompt[s.fed + k]);
                rows.push(Row {
                    seq: s.slot,
                    pos: s.pos + k,
                });
            }
            feeds[i] = n;
            if n == left {
                wants.push((i, rows.len() - 1));
            }
        }
        if rows.is_empty() {
            return;
        }
        let logit_rows: Vec<usize> = wants.iter().map(|w| w.1).collect();
        // Where the device can pick every wanted token, it does, and only the tokens come
        // back; each sampler's draw is taken now, as its own `sample` would take it.
        let picks = self.device_picks(&wants);
        let t0 = Instant::now();
        let model = &mut *self.model;
        // A panic in the pass fails the requests in it, not the server.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &picks {
            Some(p) => model
                .step_picks(&tokens, &rows, &logit_rows, p)
                .map(Picked::Tokens),
            None => model.step(&tokens, &rows, &logit_rows).map(Picked::Logits),
        }));
        let secs = t0.elapsed().as_secs_f64();
        let metrics = self.metrics.clone();
        metrics.steps_total.fetch_add(1, Ordering::Relaxed);
        metrics
            .step_rows_total
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        add_nanos(&metrics.forward_nanos_total, secs);
        metrics.last_batch_rows.store(rows.len(), Ordering::Relaxed);
        metrics
            .last_batch_sequences
            .store(wants.len().max(1), Ordering::Relaxed);
        let out = match result {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return self.fail_all(&e),
            Err(_) => return self.fail_all("the forward pass panicked"),
        };
        // Positions advance for everything fed.
        for (i, s) in self.seqs.iter_mut().enumerate() {
            if decodes[i] {
                s.pending = None;
                s.pos += 1;
            }
            s.fed += feeds[i];
            s.pos += feeds[i];
        }
        let picked = match out {
            Picked::Tokens(t) if t.len() == wants.len() => {
                wants.iter().map(|w| w.0).zip(t).collect::<Vec<_>>()
            }
            Picked::Tokens(t) => {
                let why = format!("{} tokens picked for {} sequences", t.len(), wants.len());
                return self.fail_all(&why);
            }
            Picked::Logits(mut logits) => {
                let vocab = if wants.is_empty() {
                    1
                } else {
                    logits.len() / wants.len()
                };
                let t_sample = Instant::now();
                let Some(picked) = self.sample_rows(&wants, &mut logits, vocab) else {
                    return self.fail_all("sampling panicked");
                };
                add_nanos(
                    &metrics.sampling_nanos_total,
                    t_sample.elapsed().as_secs_f64(),
                );
                picked
            }
        };
        let mut finished = Vec::new();
        let mut generated_now = 0;
        let n_ctx = self.model.n_ctx();
        for (i, next) in picked {
            generated_now += 1;
            if let Some(reason) = take_token(&mut self.seqs[i], self.tokenizer, n_ctx, next) {
                finished.push((i, reason));
            }
        }
        metrics
            .generated_tokens_total
            .fetch_add(generated_now as u64, Ordering::Relaxed);
        self.note_rate(generated_now, secs);
        self.finish(finished);
    }

    /// The device's pick for each wanted sequence (`wants[k].0`), its draw taken; None (and
    /// no draw taken) unless the model can pick every one of them.
    fn device_picks(&mut self, wants: &[(usize, usize)]) -> Option<Vec<SlotPick>> {
        if wants.is_empty() {
            return None;
        }
        let model = &*self.model;
        let how: Vec<SlotPick> = wants
            .iter()
            .map(|w| self.seqs.get(w.0).and_then(|s| model.slot_pick(&s.sampler)))
            .collect::<Option<_>>()?;
        Some(
            how.into_iter()
                .zip(wants)
                .map(|(p, w)| match (p, self.seqs.get_mut(w.0)) {
                    (SlotPick::Greedy, _) | (_, None) => p,
                    (_, Some(s)) => p.with_draw(s.sampler.draw()),
                })
                .collect(),
        )
    }

    /// The next token of each sequence `wants[k].0` from its row `k` of `logits` (`vocab`
    /// wide), sampled on up to `sample_threads` threads; in `wants`' order (ascending).
    /// None if a sampling thread panicked.
    fn sample_rows(
        &mut self,
        wants: &[(usize, usize)],
        logits: &mut [f32],
        vocab: usize,
    ) -> Option<Vec<(usize, u32)>> {
        // Each wanted sequence's sampler beside its row (`wants` ascends by sequence).
        let mut rows = logits.chunks_exact_mut(vocab.max(1));
        let mut jobs: Vec<(usize, &mut Sampler, &mut [f32])> = Vec::with_capacity(wants.len());
        let mut want = wants.iter().map(|w| w.0).peekable();
        for (i, s) in self.seqs.iter_mut().enumerate() {
            if want.peek() == Some(&i) {
                want.next();
                if let Some(row) = rows.next() {
                    jobs.push((i, &mut s.sampler, row));
                }
            }
        }
        debug_assert_eq!(jobs.len(), wants.len());
        let threads = self
            .opts
            .sample_threads
            .clamp(1, SAMPLE_THREADS_MAX)
            .min(jobs.len());
        let sample = |part: &mut [(usize, &mut Sampler, &mut [f32])]| {
            part.iter_mut()
                .map(|(i, sampler, row)| (*i, sampler.sample(row)))
                .collect::<Vec<_>>()
        };
        if threads <= 1 {
            return Some(sample(&mut jobs));
        }
        let per = jobs.len().div_ceil(threads);
        // Each part behind a lock, so that a part whose thread cannot be started is sampled
        // on this thread instead.
        let parts: Vec<std::sync::Mutex<&mut [_]>> =
            jobs.chunks_mut(per).map(std::sync::Mutex::new).collect();
        let run = |m: &std::sync::Mutex<&mut [_]>| m.lock().ok().map(|mut p| sample(&mut p));
        std::thread::scope(|scope| {
            let spawned: Vec<_> = parts
                .iter()
                .map(|m| {
                    std::thread::Builder::new()
                        .name("flea-sample".into())
                        .spawn_scoped(scope, move || run(m))
                })
                .collect();
            let mut picked = Vec::with_capacity(wants.len());
            for (m, h) in parts.iter().zip(spawned) {
                let part = match h {
                    Ok(h) => h.join().ok().flatten(),
                    Err(_) => run(m),
                };
                picked.extend(part?);
            }
            Some(picked)
        })
    }

    /// A lone decoding sequence with nothing waiting: its next tokens chosen on the device,
    /// one burst. False: not taken (more than one sequence, a prompt to feed, a request
    /// queued, or the model cannot), and the caller steps as usual.
    fn chained_burst(&mut self) -> bool {
        let n_ctx = self.model.n_ctx();
        let [s] = self.seqs.as_mut_slice() else {
            return false;
        };
        let Some(first) = s.pending else {
            return false;
        };
        if self.metrics.queue_depth.load(Ordering::SeqCst) > 0 {
            return false;
        }
        // Passes that may run: the tokens still allowed, and the context's room.
        let max = (s.max_new.saturating_sub(s.generated))
            .min(n_ctx.saturating_sub(s.pos))
            .min(CHAINED_BURST);
        if max == 0 {
            return false;
        }
        let (slot, pos0) = (s.slot, s.pos);
        let tokenizer = self.tokenizer;
        let metrics = self.metrics.clone();
        let shutdown = self.shutdown.clone();
        // (The sampler leaves the sequence for the burst: the callback holds the sequence.)
        let greedy = Sampler::new(SamplerConfig::greedy());
        let mut sampler = std::mem::replace(&mut s.sampler, greedy);
        let mut finished = None;
        let t0 = Instant::now();
        let model = &mut *self.model;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.decode_chained(slot, pos0, first, max, &mut sampler, &mut |next| {
                // The pass that chose `next` fed the pending token.
                s.pending = None;
                s.pos += 1;
                if let Some(reason) = take_token(s, tokenizer, n_ctx, next) {
                    finished = Some(reason);
                    return false;
                }
                // Others wait, the client left or the server stops: back to the step loop.
                metrics.queue_depth.load(Ordering::SeqCst) == 0
                    && !s.tx.is_closed()
                    && !shutdown.load(Ordering::SeqCst)
            })
        }));
        s.sampler = sampler;
        let secs = t0.elapsed().as_secs_f64();
        let delivered = match result {
            Ok(Ok(Some(n))) => n,
            // Nothing ran (this request's sampling, or a model that cannot): step as usual.
            // (Asking every step is cheap: the executor keeps its answer for the model.)
            Ok(Ok(None)) => return false,
            Ok(Err(e)) => {
                self.fail_all(&e);
                return true;
            }
            Err(_) => {
                self.fail_all("the forward pass panicked");
                return true;
            }
        };
        let m = &self.metrics;
        m.steps_total.fetch_add(delivered as u64, Ordering::Relaxed);
        m.step_rows_total
            .fetch_add(delivered as u64, Ordering::Relaxed);
        add_nanos(&m.forward_nanos_total, secs);
        m.last_batch_rows.store(1, Ordering::Relaxed);
        m.last_batch_sequences.store(1, Ordering::Relaxed);
        m.generated_tokens_total
            .fetch_add(delivered as u64, Ordering::Relaxed);
        m.chained_tokens_total
            .fetch_add(delivered as u64, Ordering::Relaxed);
        self.note_rate(delivered, secs);
        if let Some(reason) = finished {
            self.finish(vec![(0, reason)]);
        }
        true
    }

    /// Remove finished sequences (indices into `seqs`), send their last event, free slots.
    fn finish(&mut self, mut finished: Vec<(usize, FinishReason)>) {
        // Highest index first so indices stay valid.
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (i, reason) in finished {
            let s = self.seqs.swap_remove(i);
            let _ = s.tx.try_send(Event::Done {
                finish_reason: reason,
                completion_tokens: s.generated,
            });
            self.free_slots.push(s.slot);
        }
    }

    /// The tokens/s gauge over the recent steps.
    fn note_rate(&mut self, generated: usize, secs: f64) {
        self.recent.push_back((generated, secs));
        if self.recent.len() > RECENT_STEPS {
            self.recent.pop_front();
        }
        let (n, t) = self
            .recent
            .iter()
            .fold((0usize, 0f64), |a, b| (a.0 + b.0, a.1 + b.1));
        let rate = if t > 0.0 { n as f64 / t } else { 0.0 };
        self.metrics
            .tokens_per_second
            .store(rate.to_bits(), Ordering::Relaxed);
    }

    fn fail_all(&mut self, why: &str) {
        let metrics = &self.metrics;
        for s in self.seqs.drain(..) {
            metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
            let _ =
                s.tx.try_send(Event::Error(ServerError::Engine(why.to_string())));
            self.free_slots.push(s.slot);
        }
    }

    fn publish_state(&self) {
        let m = &self.metrics;
        m.active_sequences.store(self.seqs.len(), Ordering::Relaxed);
        if let Ok(mut u) = m.usage.lock() {
            *u = self.model.usage();
        }
    }
}

/// Steps the tokens/s gauge averages over.
const RECENT_STEPS: usize = 32;

/// Sequence `s` takes its new token `next` (sampled on the host or on the device): its
/// text goes out unless it may begin a stop string; Some when the sequence is finished.
fn take_token(s: &mut Seq, tok: &Tokenizer, n_ctx: usize, next: u32) -> Option<FinishReason> {
    s.sampler.accept(next);
    s.generated += 1;
    if tok.is_eog(next) {
        let rest = s.utf8.finish();
        s.held.push_str(&rest);
        let cut = find_stop(&s.held, &s.stop).unwrap_or(s.held.len());
        flush(s, cut);
        return Some(FinishReason::Stop);
    }
    let piece = s.utf8.push(&tok.token_bytes(next));
    s.held.push_str(&piece);
    if let Some(cut) = find_stop(&s.held, &s.stop) {
        flush(s, cut);
        return Some(FinishReason::Stop);
    }
    // The token just sampled would be fed at `pos`: no room left means the end.
    let at_limit = s.generated >= s.max_new || s.pos >= n_ctx;
    if at_limit {
        let rest = s.utf8.finish();
        s.held.push_str(&rest);
        let cut = find_stop(&s.held, &s.stop).unwrap_or(s.held.len());
        flush(s, cut);
        return Some(FinishReason::Length);
    }
    let safe = s.held.len() - stop_prefix_len(&s.held, &s.stop);
    flush(s, safe);
    s.pending = Some(next);
    None
}

/// Send the first `upto` bytes of the held text.
fn flush(s: &mut Seq, upto: usize) {
    if upto == 0 {
        return;
    }
    let text: String = s.held.drain(..upto).collect();
    let _ = s.tx.try_send(Event::Text(text));
}

/// Byte offset of the earliest stop string in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop string (held
/// back until the next token decides), on a char boundary.
fn stop_prefix_len(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (k, _) in s.char_indices().skip(1) {
            let prefix = &s[..k];
            if k > best && text.ends_with(prefix) {
                best = k;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_and_their_prefixes_held_back() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(find_stop("abc\n\ndef", &stops), Some(3));
        assert_eq!(find_stop("xxENDyy\n\n", &stops), Some(2));
        assert_eq!(find_stop("abc", &stops), None);
        assert_eq!(stop_prefix_len("abc\n", &stops), 1);
        assert_eq!(stop_prefix_len("abcEN", &stops), 2);
        assert_eq!(stop_prefix_len("abc", &stops), 0);
        assert_eq!(stop_prefix_len("é", &["éa".to_string()]), 2);
    }
}
