//! The engine without HTTP: concurrent requests share passes and each gets its own
//! separate run's tokens; a dropped receiver frees its slot; a full queue refuses at once;
//! context overflow is an error event; shutdown refuses new work; tokens a model picks itself
//! are the ones the host would sample.

use flea_model::backend::Row;
use flea_model::sampling::{argmax, SlotPick, SLOT_TOP_K_MAX};
use flea_model::{CpuBackend, Logits, Model, Sampler, SamplerConfig, Session};
use flea_server::engine::StepModel;
use flea_server::{Engine, EngineOptions, Event, FinishReason, GenRequest, Prompt, ServerError};
use std::sync::atomic::Ordering;
use std::time::Duration;

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn greedy(prompt: &str, max_tokens: usize) -> GenRequest {
    GenRequest {
        prompt: Prompt::Text(prompt.into()),
        max_tokens: Some(max_tokens),
        sampling: SamplerConfig::greedy(),
        stop: Vec::new(),
    }
}

/// A prompt's greedy text, computed alone.
fn alone(model: &Model, backend: &CpuBackend, prompt: &str, n: usize) -> String {
    let tok = &model.tokenizer;
    let ids = tok.encode(prompt, true, true);
    let mut s = Session::new(model, backend, 128, 64).unwrap();
    let mut logits = s.eval(&ids, Logits::Last).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let t = argmax(&logits) as u32;
        if tok.is_eog(t) {
            break;
        }
        out.push(t);
        logits = s.eval(&[t], Logits::Last).unwrap();
    }
    tok.decode(&out)
}

/// Text and finish reason of a request's events.
fn collect(rx: &mut tokio::sync::mpsc::Receiver<Event>) -> Result<(String, FinishReason), String> {
    let mut text = String::new();
    loop {
        match rx.blocking_recv() {
            Some(Event::Started { .. }) => {}
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done { finish_reason, .. }) => return Ok((text, finish_reason)),
            Some(Event::Error(e)) => return Err(e.to_string()),
            None => return Err("channel closed".into()),
        }
    }
}

/// A sampled request of 20 tokens (temperature 1, top-k `top_k`, 0: the whole vocabulary).
fn sampled(prompt: &str, seed: u64, top_k: usize) -> GenRequest {
    GenRequest {
        prompt: Prompt::Text(prompt.into()),
        max_tokens: Some(20),
        sampling: SamplerConfig {
            seed,
            top_k,
            temperature: 1.0,
            ..SamplerConfig::default()
        },
        stop: Vec::new(),
    }
}

/// A greedy request of 20 tokens that stops at " 9".
fn stopped() -> GenRequest {
    let mut r = greedy("1, 2, 3, 4,", 20);
    r.stop = vec![" 9".into()];
    r
}

/// `requests` submitted at once to an engine over `model`, each one's text and finish
/// reason, and the engine's host sampling time (ns).
fn run_all(
    model: &mut dyn StepModel,
    tokenizer: &flea_tokenizer::Tokenizer,
    requests: &[GenRequest],
    opts: EngineOptions,
) -> (Vec<(String, FinishReason)>, u64) {
    let (engine, handle) = Engine::new(model, tokenizer, None, opts);
    let reqs = requests.to_vec();
    let metrics = handle.metrics.clone();
    let out = std::thread::scope(|scope| {
        let client = scope.spawn(move || {
            let mut rxs: Vec<_> = reqs
                .into_iter()
                .map(|r| handle.submit(r).unwrap())
                .collect();
            let out: Vec<_> = rxs.iter_mut().map(|rx| collect(rx).unwrap()).collect();
            handle.shutdown();
            out
        });
        engine.run();
        client.join().unwrap()
    });
    (out, metrics.sampling_nanos_total.load(Ordering::Relaxed))
}

#[test]
fn concurrent_requests_get_their_own_outputs_and_slots_are_reused() {
    let Some(path) = flea_gguf::model_or_skip(SMOLLM2) else {
        return;
    };
    let model = Model::load(&path).unwrap();
    let backend = CpuBackend::new(2).unwrap();
    let prompts = [
        "Once upon a time",
        "The capital of France is",
        "1, 2, 3, 4,",
        "def fibonacci(n):",
        "Monday, Tuesday,",
        "The quick brown fox",
    ];
    let want: Vec<String> = prompts
        .iter()
        .map(|p| alone(&model, &backend, p, 12))
        .collect();

    // 4 slots for 6 concurrent requests: two wait in the queue for a free slot.
    let mut sess = Session::with_seqs(&model, &backend, 128, 64 + 4, 4).unwrap();
    let (engine, handle) = Engine::new(&mut sess, &model.tokenizer, None, EngineOptions::default());
    let results = std::thread::scope(|scope| {
        let h = handle.clone();
        let client = scope.spawn(move || {
            let mut rxs: Vec<_> = prompts
                .iter()
                .map(|p| h.submit(greedy(p, 12)).unwrap())
                .collect();
            // One more that goes away right after admission: its slot must come back.
            let dropped = h.submit(greedy("A very long story begins", 100)).unwrap();
            drop(dropped);
            let out: Vec<_> = rxs.iter_mut().map(collect).collect();
            // Errors come back as events, never as a dead engine.
            let mut over = h.submit(greedy("Hello", 1_000)).unwrap();
            let overflow = collect(&mut over);
            h.shutdown();
            (out, overflow)
        });
        engine.run();
        client.join().unwrap()
    });
    let (outs, overflow) = results;
    for ((p, got), want) in prompts.iter().zip(outs).zip(&want) {
        let (text, _) = got.unwrap();
        assert_eq!(
            &text, want,
            "prompt {p:?}: batched output differs from its own run"
        );
    }
    let err = overflow.unwrap_err();
    assert!(err.contains("context"), "{err}");
    let m = &handle.metrics;
    assert_eq!(m.active_sequences.load(Ordering::Relaxed), 0);
    assert_eq!(m.queue_depth.load(Ordering::Relaxed), 0);
    let generated = m.generated_tokens_total.load(Ordering::Relaxed);
    assert!(generated >= 6);
    // Each token comes from one row of a pass; each row is a prompt token or a token fed
    // back; the passes and the host's sampling were timed.
    let rows = m.step_rows_total.load(Ordering::Relaxed);
    let prompt = m.prompt_tokens_total.load(Ordering::Relaxed);
    assert!(
        generated <= rows && rows <= prompt + generated,
        "rows {rows}, prompt tokens {prompt}, generated {generated}"
    );
    assert!(m.forward_nanos_total.load(Ordering::Relaxed) > 0);
    assert!(m.sampling_nanos_total.load(Ordering::Relaxed) > 0);
    // After shutdown nothing new is accepted.
    assert!(matches!(
        handle.submit(greedy("x", 1)),
        Err(ServerError::ShuttingDown)
    ));
}

#[test]
fn a_full_queue_refuses_at_once() {
    let Some(path) = flea_gguf::model_or_skip(SMOLLM2) else {
        return;
    };
    let model = Model::load(&path).unwrap();
    let backend = CpuBackend::new(2).unwrap();
    let mut sess = Session::with_seqs(&model, &backend, 64, 16, 1).unwrap();
    let (engine, handle) = Engine::new(
        &mut sess,
        &model.tokenizer,
        None,
        EngineOptions {
            queue_capacity: 2,
            shutdown_grace: Duration::from_secs(0),
            ..EngineOptions::default()
        },
    );
    // The engine is not running yet: the queue fills.
    let a = handle.submit(greedy("a", 2)).unwrap();
    let b = handle.submit(greedy("b", 2)).unwrap();
    assert!(matches!(
        handle.submit(greedy("c", 2)),
        Err(ServerError::QueueFull)
    ));
    assert_eq!(handle.metrics.requests_rejected.load(Ordering::Relaxed), 1);
    // Shut down with work queued: the queued requests are refused cleanly, run returns.
    handle.shutdown();
    drop(handle);
    engine.run();
    for mut rx in [a, b] {
        let e = collect(&mut rx).unwrap_err();
        assert!(e.contains("shutting down"), "{e}");
    }
}

/// A request alone in the engine decodes in chained bursts (tokens chosen by the backend)
/// and gets the text it gets step by step: greedy, seeded top-k sampling, a stop string, a
/// length limit, and two requests at once (chained only while one runs alone).
#[test]
fn a_lone_request_decodes_chained_with_the_same_text() {
    use flea_runtime::{Links, Plan, PlanRequest, StreamedModel};
    let Some(path) = flea_gguf::model_or_skip(SMOLLM2) else {
        return;
    };
    let model = Model::load(&path).unwrap();
    let backend = CpuBackend::new(2).unwrap();
    let sampled = |prompt: &str, max_tokens: usize, seed: u64| GenRequest {
        prompt: Prompt::Text(prompt.into()),
        max_tokens: Some(max_tokens),
        sampling: SamplerConfig {
            seed,
            ..SamplerConfig::default()
        },
        stop: Vec::new(),
    };
    let mut stopped = greedy("1, 2, 3, 4,", 40);
    stopped.stop = vec![" 9".into()];
    // A repetition penalty stays on the host; the requests after it chain anyway.
    let mut penalised = sampled("Monday, Tuesday,", 12, 2);
    penalised.sampling.repeat_penalty = 1.1;
    // OpenAI's parameters: the whole vocabulary (top-k off), chained too.
    let mut every_token = sampled("Lists of colours: red,", 24, 6);
    every_token.sampling.top_k = 0;
    every_token.sampling.top_p = 1.0;
    every_token.sampling.min_p = 0.0;
    let alone_requests = vec![
        penalised,
        every_token,
        greedy("The capital of France is", 20),
        sampled("Once upon a time", 70, 3),
        sampled("Once upon a time", 30, 4),
        stopped,
        greedy("Hello", 1),
    ];
    let together = [
        sampled("The quick brown fox", 40, 5),
        greedy("def fibonacci(n):", 30),
    ];
    let (n_ctx, batch) = (160, 64);
    let run = |chain: bool, alone: &[GenRequest], together: &[GenRequest]| {
        let plan = Plan::build(
            &model,
            &PlanRequest {
                vram_budget: 1 << 40,
                ram_budget: 0,
                n_ctx,
                batch,
                n_seq: 2,
                ring_depth: None,
                links: Links::default(),
                stages_units: false,
                device_scratch: 0,
                cpu_kv_layers: false,
            },
        )
        .unwrap();
        let io = flea_io::IoOptions::default();
        let mut sm = StreamedModel::new(&model, &backend, plan, &path, &io, n_ctx, batch).unwrap();
        let opts = EngineOptions {
            chain_decode: chain,
            ..EngineOptions::default()
        };
        let (engine, handle) = Engine::new(&mut sm, &model.tokenizer, None, opts);
        let (reqs, both) = (alone.to_vec(), together.to_vec());
        let out = std::thread::scope(|scope| {
            let h = handle.clone();
            let client = scope.spawn(move || {
                let mut out = Vec::new();
                for r in reqs {
                    let mut rx = h.submit(r).unwrap();
                    out.push(collect(&mut rx).unwrap());
                }
                let mut rxs: Vec<_> = both.into_iter().map(|r| h.submit(r).unwrap()).collect();
                out.extend(rxs.iter_mut().map(|rx| collect(rx).unwrap()));
                h.shutdown();
                out
            });
            engine.run();
            client.join().unwrap()
        });
        (
            out,
            handle.metrics.chained_tokens_total.load(Ordering::Relaxed),
        )
    };
    let (stepped, none) = run(false, &alone_requests, &together);
    let (chained, tokens) = run(true, &alone_requests, &together);
    assert_eq!(none, 0);
    assert!(tokens > 100, "only {tokens} tokens chained");
    // The whole-vocabulary request alone: every token after the first chained.
    let (_, vocab_tokens) = run(true, &alone_requests[1..2], &[]);
    assert_eq!(vocab_tokens, 23);
    assert_eq!(chained, stepped);
    assert_eq!(stepped[5].1, FinishReason::Stop, "{:?}", stepped[5]);
    // Another seed, another story.
    assert!(!stepped[3].0.starts_with(&stepped[4].0), "{stepped:?}");
}

/// A model whose "device" picks each wanted row's token: the session's logits, picked on the
/// host as a backend's `pick_rows` picks (`SlotPick::pick_on_host`), so that the engine's side
/// of picking — which sequences get a pick, the draws it takes before the pass, the tokens
/// handed back in order — runs without a GPU.
struct Picking<'s, 'm>(&'s mut Session<'m, CpuBackend>);

impl StepModel for Picking<'_, '_> {
    fn n_ctx(&self) -> usize {
        self.0.n_ctx
    }
    fn n_seq(&self) -> usize {
        self.0.n_seq
    }
    fn capacity(&self) -> usize {
        self.0.capacity()
    }
    fn step(&mut self, t: &[u32], r: &[Row], l: &[usize]) -> Result<Vec<f32>, String> {
        self.0.step(t, r, l).map_err(|e| e.to_string())
    }
    fn slot_pick(&self, sampler: &Sampler) -> Option<SlotPick> {
        let c = &sampler.cfg;
        if c.is_plain_greedy() {
            Some(SlotPick::Greedy)
        } else if let Some(how) = c.top_k_sampling(SLOT_TOP_K_MAX) {
            Some(SlotPick::Sample(how, 0.0))
        } else {
            c.vocab_sampling().map(|how| SlotPick::Vocab(how, 0.0))
        }
    }
    fn step_picks(
        &mut self,
        t: &[u32],
        r: &[Row],
        l: &[usize],
        picks: &[SlotPick],
    ) -> Result<Vec<u32>, String> {
        let logits = self.step(t, r, l)?;
        let vocab = logits.len() / picks.len().max(1);
        Ok(picks
            .iter()
            .zip(logits.chunks_exact(vocab.max(1)))
            .map(|(p, row)| p.pick_on_host(row))
            .collect())
    }
}

#[test]
fn tokens_picked_by_the_model_are_the_host_samplers() {
    // The same requests (sampled of several kinds, greedy, a stop, and one with a repetition
    // penalty, which only the host samples) through an engine whose model picks the tokens:
    // the same texts as the engine sampling on the host.
    let Some(path) = flea_gguf::model_or_skip(SMOLLM2) else {
        return;
    };
    let model = Model::load(&path).unwrap();
    let backend = CpuBackend::new(2).unwrap();
    let mut penalised = sampled("Monday, Tuesday,", 5, 40);
    penalised.sampling.repeat_penalty = 1.3;
    let all = vec![
        sampled("Once upon a time", 1, 0),
        sampled("The quick brown fox", 3, 40),
        greedy("The capital of France is", 20),
        stopped(),
        penalised,
    ];
    let run = |requests: &[GenRequest], picking: bool| {
        let mut sess = Session::with_seqs(&model, &backend, 128, 64 + 6, 6).unwrap();
        let opts = EngineOptions::default();
        if picking {
            run_all(&mut Picking(&mut sess), &model.tokenizer, requests, opts)
        } else {
            run_all(&mut sess, &model.tokenizer, requests, opts)
        }
    };
    // Every request pickable: no step samples on the host.
    let (picked, host_nanos) = run(&all[..4], true);
    assert_eq!(host_nanos, 0, "a step sampled on the host");
    assert_eq!(picked, run(&all[..4], false).0);
    // With the penalised request in the batch the steps fall back to the host.
    let (mixed, host_nanos) = run(&all, true);
    assert!(host_nanos > 0);
    assert_eq!(mixed, run(&all, false).0);
    assert_ne!(picked[0].0, picked[1].0, "{picked:?}");
}

#[test]
fn sampling_threads_change_no_token() {
    // A step's sequences sampled on 1 or 3 threads: each keeps its own sampler, so the same
    // texts (sampled requests of several kinds, a greedy one, a stop).
    let Some(path) = flea_gguf::model_or_skip(SMOLLM2) else {
        return;
    };
    let model = Model::load(&path).unwrap();
    let backend = CpuBackend::new(2).unwrap();
    let requests = vec![
        sampled("Once upon a time", 1, 0),
        sampled("Once upon a time", 2, 0),
        sampled("The quick brown fox", 3, 40),
        greedy("The capital of France is", 20),
        sampled("Monday, Tuesday,", 4, 0),
        stopped(),
    ];
    let run = |threads: usize| {
        let mut sess = Session::with_seqs(&model, &backend, 128, 64 + 6, 6).unwrap();
        let opts = EngineOptions {
            sample_threads: threads,
            ..EngineOptions::default()
        };
        run_all(&mut sess, &model.tokenizer, &requests, opts).0
    };
    let one = run(1);
    assert_eq!(run(3), one);
    // The seeds matter: two draws of one prompt differ.
    assert_ne!(one[0].0, one[1].0, "{one:?}");
}
