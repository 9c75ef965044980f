//! Streaming must not change a single bit: logits of a streamed run equal the resident run's
//! for every I/O backend and ring depth; arenas never pass their budgets; a budget below the
//! minimum is refused with the minimum; a model file truncated mid-run is a clean error.

use flea_io::{IoBackend, IoOptions};
use flea_model::{CpuBackend, Logits, Model, Session};
use flea_runtime::{Links, Plan, PlanRequest, RuntimeError, StreamedModel};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

fn model_path(file: &str) -> Option<PathBuf> {
    flea_gguf::model_or_skip(file)
}

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const MIB: u64 = 1 << 20;

/// Prompt logits (every position) and three greedy decode steps' logits.
fn run_resident(
    model: &Model,
    backend: &CpuBackend,
    prompt: &[u32],
    n_ctx: usize,
    batch: usize,
) -> Vec<Vec<f32>> {
    let mut s = Session::new(model, backend, n_ctx, batch).unwrap();
    let mut out = vec![s.eval(prompt, Logits::All).unwrap()];
    for _ in 0..3 {
        let last = &out[out.len() - 1];
        let v = model.cfg.n_vocab;
        let t = flea_model::sampling::argmax(&last[last.len() - v..]) as u32;
        out.push(s.eval(&[t], Logits::Last).unwrap());
    }
    out
}

fn run_streamed(
    s: &mut StreamedModel,
    vocab: usize,
    prompt: &[u32],
) -> flea_runtime::Result<Vec<Vec<f32>>> {
    let mut out = vec![s.eval(prompt, Logits::All)?];
    for _ in 0..3 {
        let last = &out[out.len() - 1];
        let t = flea_model::sampling::argmax(&last[last.len() - vocab..]) as u32;
        out.push(s.eval(&[t], Logits::Last)?);
    }
    Ok(out)
}

fn request(vram: u64, ram: u64, n_ctx: usize, batch: usize, depth: Option<usize>) -> PlanRequest {
    PlanRequest {
        vram_budget: vram,
        ram_budget: ram,
        n_ctx,
        batch,
        n_seq: 1,
        ring_depth: depth,
        links: Links::default(),
        stages_units: false,
        device_scratch: 0,
        cpu_kv_layers: false,
    }
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|r| r.iter().map(|x| x.to_bits()).collect())
        .collect()
}

fn check_identical(path: &Path, vram: u64, ram: u64, backends: &[IoBackend], depths: &[usize]) {
    let model = Model::load(path).unwrap();
    let backend = CpuBackend::new(2).unwrap();
    let prompt = model.tokenizer.encode(
        "The quick brown fox jumps over the lazy dog. 12345",
        true,
        true,
    );
    let (n_ctx, batch) = (128, 16);
    let want = bits(&run_resident(&model, &backend, &prompt, n_ctx, batch));
    for &io in backends {
        for direct in [true, false] {
            for &depth in depths {
                let plan =
                    Plan::build(&model, &request(vram, ram, n_ctx, batch, Some(depth))).unwrap();
                assert!(plan.streams(), "the budget should force streaming");
                let opts = IoOptions {
                    backend: io,
                    direct,
                    ..IoOptions::default()
                };
                let mut s =
                    StreamedModel::new(&model, &backend, plan, path, &opts, n_ctx, batch).unwrap();
                let got = bits(&run_streamed(&mut s, model.cfg.n_vocab, &prompt).unwrap());
                assert!(
                    got == want,
                    "{io:?} direct={direct} depth {depth}: streamed logits differ from resident"
                );
                assert!(
                    s.device.peak() <= s.device.budget,
                    "device peak {} > budget {}",
                    s.device.peak(),
                    s.device.budget
                );
                assert!(
                    s.host.peak() <= s.host.budget,
                    "host peak {} > budget {}",
                    s.host.peak(),
                    s.host.budget
                );
                assert!(s.stats.bytes_streamed > 0);
                eprintln!(
                    "{io:?} direct={direct} depth {depth}: identical; device peak {} / {}, host peak {} / {}, streamed {} B",
                    s.device.peak(),
                    s.device.budget,
                    s.host.peak(),
                    s.host.budget,
                    s.stats.bytes_streamed
                );
            }
        }
    }
}

#[test]
fn smollm2_streamed_equals_resident_for_every_io_backend_and_ring_depth() {
    let Some(path) = model_path(SMOLLM2) else {
        return;
    };
    check_identical(
        &path,
        40 * MIB,
        0,
        &[IoBackend::Mmap, IoBackend::Pread, IoBackend::IoUring],
        &[1, 2, 4],
    );
}

#[test]
fn smollm2_streamed_with_a_host_cache_equals_resident() {
    let Some(path) = model_path(SMOLLM2) else {
        return;
    };
    check_identical(&path, 40 * MIB, 24 * MIB, &[IoBackend::Pread], &[2]);
}

#[test]
fn qwen2_in_a_64mib_device_budget_from_disk_matches_resident() {
    let Some(path) = model_path("Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf") else {
        return;
    };
    check_identical(&path, 64 * MIB, 0, &[IoBackend::Pread], &[2]);
}

#[test]
fn a_budget_below_the_minimum_is_refused_with_the_minimum() {
    let Some(path) = model_path(SMOLLM2) else {
        return;
    };
    let model = Model::load(&path).unwrap();
    let err = Plan::build(&model, &request(4 * MIB, 0, 128, 16, None)).unwrap_err();
    assert!(matches!(err, RuntimeError::BudgetTooSmall { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("below the minimum") && msg.contains("one ring slot"),
        "{msg}"
    );
    // The stated minimum is enough.
    let RuntimeError::BudgetTooSmall { minimum, .. } = err else {
        unreachable!()
    };
    let plan = Plan::build(&model, &request(minimum, 0, 128, 16, None)).unwrap();
    assert_eq!(plan.ring_depth, 1);
}

#[test]
fn a_model_file_truncated_while_streaming_is_a_clean_error() {
    let Some(src) = model_path(SMOLLM2) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("flea-trunc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    std::fs::copy(&src, &path).unwrap();
    let model = Model::load(&src).unwrap();
    let (tx, rx) = mpsc::channel();
    let p2 = path.clone();
    let handle = std::thread::spawn(move || {
        let backend = CpuBackend::new(2).unwrap();
        let plan = Plan::build(&model, &request(40 * MIB, 0, 64, 8, Some(2))).unwrap();
        let mut s =
            StreamedModel::new(&model, &backend, plan, &p2, &IoOptions::default(), 64, 8).unwrap();
        let prompt = [1u32, 2, 3];
        assert!(s.eval(&prompt, Logits::Last).is_ok());
        // Cut the file in half under the running executor.
        let f = std::fs::OpenOptions::new().write(true).open(&p2).unwrap();
        f.set_len(std::fs::metadata(&p2).unwrap().len() / 2)
            .unwrap();
        let mut errors = Vec::new();
        for _ in 0..3 {
            match s.eval(&[4], Logits::Last) {
                Ok(_) => {}
                Err(e) => errors.push(e.to_string()),
            }
        }
        tx.send(errors).unwrap();
    });
    let errors = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the executor hung after truncation");
    handle
        .join()
        .expect("the executor panicked after truncation");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !errors.is_empty(),
        "truncating the model file went unnoticed"
    );
    eprintln!("errors: {errors:?}");
    assert!(
        errors.iter().all(|e| !e.contains('\n')),
        "errors must be one line: {errors:?}"
    );
    assert!(
        errors[0].contains("truncated"),
        "the first error should name the cause: {errors:?}"
    );
}

/// A synthetic model of `preset` in a fresh temp file (removed by the caller).
fn synthetic(preset: flea_synth::Preset, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flea-stream-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.gguf"));
    let mut o = flea_synth::SynthOptions::new(preset);
    o.progress = false;
    flea_synth::write_synthetic(&path, &o).unwrap();
    path
}

/// A device budget that holds the fixed parts plus about two layers, so most layers stream.
fn tight_budget(path: &Path) -> u64 {
    let model = Model::load(path).unwrap();
    let min = match Plan::build(&model, &request(1, 0, 128, 16, None)) {
        Err(RuntimeError::BudgetTooSmall { minimum, .. }) => minimum,
        other => panic!("expected the minimum, got {other:?}"),
    };
    let layer = model
        .layout
        .layers
        .iter()
        .map(|l| l.extent_bytes())
        .max()
        .unwrap();
    min + 3 * (layer + 8192)
}

#[test]
fn synthetic_models_of_every_architecture_stream_bit_identically() {
    use flea_synth::Preset;
    for (preset, name) in [
        (Preset::Tiny, "llama"),
        (Preset::TinyQwen2, "qwen2"),
        (Preset::TinyGemma3, "gemma3"),
    ] {
        let path = synthetic(preset, name);
        let vram = tight_budget(&path);
        check_identical(
            &path,
            vram,
            0,
            &[IoBackend::Pread, IoBackend::IoUring, IoBackend::Mmap],
            &[1, 2, 4],
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}

/// Greedy tokens of a plain decode loop: `n` after the prompt, each from the host's argmax.
fn host_greedy(s: &mut StreamedModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let vocab = s.model.cfg.n_vocab;
    let mut logits = s.eval(prompt, Logits::Last).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let t = flea_model::sampling::argmax(&logits[logits.len() - vocab..]) as u32;
        out.push(t);
        logits = s.eval(&[t], Logits::Last).unwrap();
    }
    out
}

#[test]
fn chained_greedy_decode_yields_the_host_loops_tokens_and_stops_cleanly() {
    use flea_synth::Preset;
    for (preset, name) in [
        (Preset::Tiny, "chain-llama"),
        (Preset::TinyQwen2, "chain-qwen2"),
        (Preset::TinyGemma3, "chain-gemma3"),
    ] {
        let path = synthetic(preset, name);
        let model = Model::load(&path).unwrap();
        let backend = CpuBackend::new(2).unwrap();
        let prompt = model.tokenizer.encode("one two three four", true, true);
        let (n_ctx, batch, n) = (96, 8, 12);
        let open = |vram: u64| {
            let plan = Plan::build(&model, &request(vram, 0, n_ctx, batch, None)).unwrap();
            StreamedModel::new(
                &model,
                &backend,
                plan,
                &path,
                &IoOptions::default(),
                n_ctx,
                batch,
            )
            .unwrap()
        };
        let want = host_greedy(&mut open(1 << 30), &prompt, n + 1);

        // The whole run chained: the first token from the prompt's logits, then n passes.
        let mut s = open(1 << 30);
        assert!(
            s.prepare_chain().unwrap(),
            "{name}: everything resident should chain"
        );
        let logits = s.eval(&prompt, Logits::Last).unwrap();
        let first = flea_model::sampling::argmax(&logits) as u32;
        let mut got = vec![first];
        let passes = s.decode_greedy(first, n, &mut |t| {
            got.push(t);
            true
        });
        assert_eq!(passes.unwrap(), n, "{name}");
        assert_eq!(
            got, want,
            "{name}: chained tokens differ from the host loop's"
        );
        assert_eq!(s.pos, prompt.len() + n, "{name}");

        // Stopped after 4 tokens (a pass was queued past the stop), then resumed by a plain
        // pass and chained again: the same tokens, so the queued pass left nothing behind.
        let mut s = open(1 << 30);
        s.eval(&prompt, Logits::Last).unwrap();
        let mut got = vec![first];
        let passes = s
            .decode_greedy(first, n, &mut |t| {
                got.push(t);
                got.len() < 5
            })
            .unwrap();
        assert_eq!((passes, s.pos), (4, prompt.len() + 4), "{name}");
        let logits = s.eval(&[got[4]], Logits::Last).unwrap();
        got.push(flea_model::sampling::argmax(&logits) as u32);
        let rest = n - got.len() + 1;
        let last = got[got.len() - 1];
        s.decode_greedy(last, rest, &mut |t| {
            got.push(t);
            true
        })
        .unwrap();
        assert_eq!(
            got, want,
            "{name}: stopping and resuming changed the tokens"
        );

        // Streamed layers: no chaining, and saying so is not an error.
        let mut s = open(tight_budget(&path));
        assert!(
            !s.prepare_chain().unwrap(),
            "{name}: streamed layers cannot chain"
        );
        assert!(s.decode_greedy(first, 2, &mut |_| true).is_err());
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}

/// Top-k sampling as `flea run` does it by default, but with a seed of the test's.
fn sampling_config(seed: u64) -> flea_model::SamplerConfig {
    flea_model::SamplerConfig {
        temperature: 0.9,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        seed,
        ..Default::default()
    }
}

#[test]
fn chained_sampled_decode_draws_as_the_host_sampler_and_resumes_where_it_stopped() {
    use flea_model::Sampler;
    use flea_synth::Preset;
    for (preset, name) in [
        (Preset::Tiny, "chains-llama"),
        (Preset::TinyGemma3, "chains-gemma3"),
    ] {
        let path = synthetic(preset, name);
        let model = Model::load(&path).unwrap();
        let backend = CpuBackend::new(2).unwrap();
        let prompt = model.tokenizer.encode("one two three four", true, true);
        let (n_ctx, batch, n) = (96, 8, 16);
        let open = || {
            let plan = Plan::build(&model, &request(1 << 30, 0, n_ctx, batch, None)).unwrap();
            let io = IoOptions::default();
            StreamedModel::new(&model, &backend, plan, &path, &io, n_ctx, batch).unwrap()
        };
        // Top-k sampling, then the whole vocabulary (top-k off: OpenAI's parameters) with
        // and without top-p.
        let vocab = |seed, top_p| flea_model::SamplerConfig {
            top_k: 0,
            top_p,
            temperature: 1.1,
            ..sampling_config(seed)
        };
        for cfg in [
            sampling_config(7),
            sampling_config(8),
            vocab(9, 1.0),
            vocab(10, 0.9),
        ] {
            let seed = cfg.seed;
            // The host loop: logits back, sampled on the host.
            let mut s = open();
            let mut sampler = Sampler::new(cfg.clone());
            let mut logits = s.eval(&prompt, Logits::Last).unwrap();
            let mut want = Vec::new();
            for _ in 0..=n {
                let t = sampler.sample(&mut logits);
                want.push(t);
                logits = s.eval(&[t], Logits::Last).unwrap();
            }
            assert!(
                want.iter().collect::<std::collections::HashSet<_>>().len() > 3,
                "{name}: the draws should matter ({want:?})"
            );

            // Chained: the same sampler's draws, the token picked by the backend.
            let mut s = open();
            let mut sampler = Sampler::new(cfg.clone());
            assert!(s.prepare_chain().unwrap() && s.samples_on_backend(&sampler));
            let mut logits = s.eval(&prompt, Logits::Last).unwrap();
            let first = sampler.sample(&mut logits);
            let mut got = vec![first];
            let passes = s
                .decode_sampled(first, n, &mut sampler, &mut |t| {
                    got.push(t);
                    true
                })
                .unwrap();
            assert_eq!(passes, n, "{name}");
            assert_eq!(got, want, "{name} seed {seed}: chained sampling differs");

            // Stopped after 5 tokens with a pass queued past the stop: its draw is put
            // back, so a host step and a second chained run continue the host's sequence.
            let mut s = open();
            let mut sampler = Sampler::new(cfg.clone());
            let mut logits = s.eval(&prompt, Logits::Last).unwrap();
            let first = sampler.sample(&mut logits);
            let mut got = vec![first];
            s.decode_sampled(first, n, &mut sampler, &mut |t| {
                got.push(t);
                got.len() < 5
            })
            .unwrap();
            let mut logits = s.eval(&[got[4]], Logits::Last).unwrap();
            got.push(sampler.sample(&mut logits));
            let (last, rest) = (got[got.len() - 1], n + 1 - got.len());
            s.decode_sampled(last, rest, &mut sampler, &mut |t| {
                got.push(t);
                true
            })
            .unwrap();
            assert_eq!(
                got, want,
                "{name} seed {seed}: stop and resume changed the draws"
            );
        }

        // Sampling a backend cannot do (a repetition penalty): not chained, and an error if
        // asked.
        let all = flea_model::SamplerConfig {
            repeat_penalty: 1.1,
            ..sampling_config(1)
        };
        let mut s = open();
        let mut sampler = Sampler::new(all);
        assert!(!s.samples_on_backend(&sampler));
        s.eval(&prompt, Logits::Last).unwrap();
        assert!(s.decode_sampled(1, 2, &mut sampler, &mut |_| true).is_err());
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}

/// A resident plan keeps an output matrix larger than a layer whole (one mat-vec and one
/// token pick a pass) where its wider logits buffer fits the budget, and slices it where
/// only the slices' buffer does; the logits are the same bits either way, and a session's.
#[test]
fn a_resident_output_is_one_unit_where_its_logits_buffer_fits() {
    let dir = std::env::temp_dir().join(format!("flea-stream-{}-whole-out", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny-5000.gguf");
    let mut o = flea_synth::SynthOptions::new(flea_synth::Preset::Tiny);
    o.progress = false;
    o.shape.n_vocab = 5000;
    flea_synth::write_synthetic(&path, &o).unwrap();
    let model = Model::load(&path).unwrap();
    let outputs = |p: &Plan| {
        p.units
            .iter()
            .filter(|u| matches!(u.kind, flea_runtime::plan::UnitKind::Output { .. }))
            .count()
    };
    let (n_ctx, batch) = (64, 8);
    let whole = Plan::build(&model, &request(1 << 40, 0, n_ctx, batch, None)).unwrap();
    assert_eq!(outputs(&whole), 1);
    assert_eq!(whole.output_rows_per_unit, 5000);
    // A byte less than the whole output's plan needs: every unit still resident, sliced.
    let budget = whole.device_bytes - 1;
    let sliced = Plan::build(&model, &request(budget, 0, n_ctx, batch, None)).unwrap();
    assert!(outputs(&sliced) > 1, "{} output units", outputs(&sliced));
    assert!(sliced
        .units
        .iter()
        .all(|u| u.tier == flea_runtime::Tier::Resident));
    assert!(sliced.device_bytes <= budget && whole.act_bytes > sliced.act_bytes);

    let cpu = CpuBackend::new(2).unwrap();
    let prompt: Vec<u32> = (0..12u32).map(|i| (i * 37 + 11) % 5000).collect();
    let want = bits(&run_resident(&model, &cpu, &prompt, n_ctx, batch));
    let io = IoOptions::default();
    for plan in [whole, sliced] {
        let mut s = StreamedModel::new(&model, &cpu, plan, &path, &io, n_ctx, batch).unwrap();
        let got = run_streamed(&mut s, 5000, &prompt).unwrap();
        assert_eq!(bits(&got), want);
    }
    drop(model);
    let _ = std::fs::remove_dir_all(&dir);
}
