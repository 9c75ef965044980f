//! Batched forward over several sequences (continuous batching): a batch of one sequence
//! gives exactly the bits of the single-sequence path, and with several sequences of
//! different lengths in one pass (prompts beside other sequences' decode rows) each
//! sequence's logits are bit-identical to its own separate run: the matmuls take each
//! sequence's rows as a segment of their own (see `Backend::matmuls_segmented`).

use flea_io::{IoBackend, IoOptions};
use flea_model::backend::Row;
use flea_model::sampling::argmax;
use flea_model::{CpuBackend, Logits, Model, Session};
use flea_runtime::{Links, Plan, PlanRequest, StreamedModel};
use std::path::{Path, PathBuf};

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const MIB: u64 = 1 << 20;

fn request(vram: u64, n_ctx: usize, batch: usize, n_seq: usize) -> PlanRequest {
    PlanRequest {
        vram_budget: vram,
        ram_budget: 0,
        n_ctx,
        batch,
        n_seq,
        ring_depth: Some(2),
        links: Links::default(),
        stages_units: false,
        device_scratch: 0,
        cpu_kv_layers: false,
    }
}

fn streamed<'m>(
    model: &'m Model,
    backend: &'m CpuBackend,
    path: &Path,
    vram: u64,
    n_ctx: usize,
    batch: usize,
    n_seq: usize,
) -> StreamedModel<'m> {
    let plan = Plan::build(model, &request(vram, n_ctx, batch, n_seq)).unwrap();
    assert!(plan.streams(), "the budget should force streaming");
    let opts = IoOptions {
        backend: IoBackend::Pread,
        ..IoOptions::default()
    };
    StreamedModel::new(model, backend, plan, path, &opts, n_ctx, batch).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// One sequence's greedy run alone: the prompt, then `n` tokens; every step's logits.
fn separate_run(
    model: &Model,
    backend: &CpuBackend,
    prompt: &[u32],
    n: usize,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut s = Session::new(model, backend, 128, 64).unwrap();
    let mut logits = s.eval(prompt, Logits::Last).unwrap();
    let (mut toks, mut all) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = argmax(&logits) as u32;
        toks.push(t);
        all.push(logits.clone());
        logits = s.eval(&[t], Logits::Last).unwrap();
    }
    (toks, all)
}

/// A single sequence through `step` (in any slot of a multi-slot cache) gives the same bits
/// as `eval`, streamed and in place.
fn check_single_sequence_steps_are_bit_identical(path: &Path, vram: u64) {
    let model = Model::load(path).unwrap();
    let backend = CpuBackend::new(2).unwrap();
    let prompt = model
        .tokenizer
        .encode("The quick brown fox jumps over", true, true);
    let vocab = model.cfg.n_vocab;

    let mut one = streamed(&model, &backend, path, vram, 64, 48, 1);
    let mut want = vec![one.eval(&prompt, Logits::Last).unwrap()];
    for _ in 0..3 {
        let t = argmax(&want[want.len() - 1]) as u32;
        want.push(one.eval(&[t], Logits::Last).unwrap());
    }

    for slot in [0, 2] {
        let mut s = streamed(&model, &backend, path, vram, 64, 48, 3);
        let rows = Row::consecutive(slot, 0, prompt.len());
        let mut got = vec![s.step(&prompt, &rows, &[prompt.len() - 1]).unwrap()];
        for pos in prompt.len()..prompt.len() + 3 {
            let t = argmax(&got[got.len() - 1]) as u32;
            got.push(s.step(&[t], &[Row { seq: slot, pos }], &[0]).unwrap());
        }
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.len(), vocab);
            assert!(
                bits(g) == bits(w),
                "slot {slot}, step {i}: batched step differs from eval"
            );
        }
        assert!(s.device.peak() <= s.device.budget);
    }

    // The in-place session's step, too.
    let mut sess = Session::with_seqs(&model, &backend, 64, 48, 2).unwrap();
    let got = sess
        .step(
            &prompt,
            &Row::consecutive(1, 0, prompt.len()),
            &[prompt.len() - 1],
        )
        .unwrap();
    assert!(
        bits(&got) == bits(&want[0]),
        "Session::step differs from eval"
    );
}

/// Three sequences of different lengths: B is admitted while A decodes (its prompt in the
/// same pass as A's decode row), C later still; each one's logits equal its separate run's,
/// bit for bit.
fn check_mixed_batches_match_separate_runs(path: &Path, vram: u64) {
    let model = Model::load(path).unwrap();
    let backend = CpuBackend::new(2).unwrap();
    let texts = [
        "Once upon a time, in a small village by the sea,",
        "1, 2, 3, 4,",
        "The capital of France is Paris. The capital of Germany is",
    ];
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| model.tokenizer.encode(t, true, true))
        .collect();
    let n_gen = 8;
    let separate: Vec<_> = prompts
        .iter()
        .map(|p| separate_run(&model, &backend, p, n_gen))
        .collect();

    let mut s = streamed(&model, &backend, path, vram, 128, 48, 4);
    // Per sequence: its slot (deliberately not its index), admission step, position,
    // pending token, tokens and logits so far.
    struct Seq {
        slot: usize,
        start: usize,
        pos: usize,
        next: Option<u32>,
        toks: Vec<u32>,
        logits: Vec<Vec<f32>>,
    }
    let mut seqs: Vec<Seq> = [(3, 0), (0, 1), (2, 3)]
        .iter()
        .map(|&(slot, start)| Seq {
            slot,
            start,
            pos: 0,
            next: None,
            toks: Vec::new(),
            logits: Vec::new(),
        })
        .collect();
    let mut step = 0;
    while seqs.iter().any(|q| q.toks.len() < n_gen) {
        let (mut tokens, mut rows, mut wanted, mut owners) = (vec![], vec![], vec![], vec![]);
        for (i, q) in seqs.iter_mut().enumerate() {
            if step < q.start || q.toks.len() >= n_gen {
                continue;
            }
            let feed: Vec<u32> = match q.next {
                None => prompts[i].clone(),
                Some(t) => vec![t],
            };
            for &t in &feed {
                tokens.push(t);
                rows.push(Row {
                    seq: q.slot,
                    pos: q.pos,
                });
                q.pos += 1;
            }
            wanted.push(rows.len() - 1);
            owners.push(i);
        }
        let logits = s.step(&tokens, &rows, &wanted).unwrap();
        let vocab = model.cfg.n_vocab;
        for (k, &i) in owners.iter().enumerate() {
            let l = logits[k * vocab..(k + 1) * vocab].to_vec();
            let t = argmax(&l) as u32;
            let q = &mut seqs[i];
            q.toks.push(t);
            q.logits.push(l);
            q.next = Some(t);
        }
        step += 1;
    }
    for (i, (q, (want_toks, want_logits))) in seqs.iter().zip(&separate).enumerate() {
        assert_eq!(
            &q.toks, want_toks,
            "sequence {i}: batched greedy tokens differ from its separate run"
        );
        for (k, (g, w)) in q.logits.iter().zip(want_logits).enumerate() {
            assert!(
                bits(g) == bits(w),
                "sequence {i}, token {k}: batched logits differ from its separate run"
            );
        }
    }
    assert!(s.device.peak() <= s.device.budget);
}

fn smollm2() -> Option<PathBuf> {
    flea_gguf::model_or_skip(SMOLLM2)
}

#[test]
fn smollm2_single_sequence_steps_are_bit_identical() {
    let Some(path) = smollm2() else { return };
    check_single_sequence_steps_are_bit_identical(&path, 48 * MIB);
}

#[test]
fn smollm2_mixed_batches_match_separate_runs() {
    let Some(path) = smollm2() else { return };
    check_mixed_batches_match_separate_runs(&path, 64 * MIB);
}

#[test]
fn kv_for_every_sequence_slot_is_inside_the_budget() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path).unwrap();
    let one = Plan::build(&model, &request(64 * MIB, 128, 16, 1)).unwrap();
    let four = Plan::build(&model, &request(64 * MIB, 128, 16, 4)).unwrap();
    assert_eq!(four.kv_bytes, 4 * one.kv_bytes);
    assert_eq!(four.n_seq, 4);
    assert!(four.device_bytes <= four.vram_budget);
    // A cache for many sequences that cannot fit is refused, not overcommitted.
    let err = Plan::build(&model, &request(64 * MIB, 2048, 16, 64)).unwrap_err();
    assert!(err.to_string().contains("64 sequences"), "{err}");
}

/// A device budget that holds the fixed parts (KV for 4 sequences) plus about two layers.
fn tight_budget(path: &Path) -> u64 {
    let model = Model::load(path).unwrap();
    let min = match Plan::build(&model, &request(1, 128, 48, 4)) {
        Err(flea_runtime::RuntimeError::BudgetTooSmall { minimum, .. }) => minimum,
        other => panic!("expected the minimum, got {other:?}"),
    };
    let layer = model
        .layout
        .layers
        .iter()
        .map(|l| l.extent_bytes())
        .max()
        .unwrap();
    min + 2 * (layer + 8192)
}

#[test]
fn synthetic_models_of_every_architecture_batch_bit_identically() {
    use flea_synth::Preset;
    for (preset, name) in [
        (Preset::Tiny, "llama"),
        (Preset::TinyQwen2, "qwen2"),
        (Preset::TinyGemma3, "gemma3"),
    ] {
        let dir = std::env::temp_dir().join(format!("flea-batched-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.gguf"));
        let mut o = flea_synth::SynthOptions::new(preset);
        o.progress = false;
        flea_synth::write_synthetic(&path, &o).unwrap();
        let vram = tight_budget(&path);
        check_single_sequence_steps_are_bit_identical(&path, vram);
        check_mixed_batches_match_separate_runs(&path, vram);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `step_picks` (each wanted row's token picked by the backend from logits that stay there)
/// chooses what the host would from `step`'s logits, for greedy, top-k and whole-vocabulary
/// picks side by side, over more rows than one chunk of logits (40 sequences); it needs the
/// output matrix in one unit.
#[test]
fn picked_tokens_are_the_picks_from_the_logits() {
    use flea_model::sampling::{SlotPick, TopKSampling, VocabSampling};
    use flea_synth::Preset;
    let dir = std::env::temp_dir().join(format!("flea-picks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    let mut o = flea_synth::SynthOptions::new(Preset::Tiny);
    o.progress = false;
    flea_synth::write_synthetic(&path, &o).unwrap();
    let model = Model::load(&path).unwrap();
    let backend = CpuBackend::new(2).unwrap();
    let (n_seq, n_ctx) = (40, 8);
    let req = PlanRequest {
        ring_depth: None,
        ..request(1 << 40, n_ctx, 48, n_seq)
    };
    let plan = Plan::build(&model, &req).unwrap();
    let opts = IoOptions {
        backend: IoBackend::Pread,
        ..IoOptions::default()
    };
    let mut s = StreamedModel::new(&model, &backend, plan, &path, &opts, n_ctx, 48).unwrap();
    assert!(s.picks_rows(), "a resident output matrix is one unit");
    let vocab = model.cfg.n_vocab;
    let top_k = TopKSampling {
        temperature: 0.9,
        top_k: 20,
        top_p: 0.9,
        min_p: 0.02,
    };
    let whole = VocabSampling {
        temperature: 1.2,
        top_p: 0.95,
        min_p: 0.0,
    };
    for pos in 0..3 {
        let tokens: Vec<u32> = (0..n_seq as u32)
            .map(|i| (i * 7 + pos as u32) % vocab as u32)
            .collect();
        let rows: Vec<Row> = (0..n_seq).map(|seq| Row { seq, pos }).collect();
        let wanted: Vec<usize> = (0..n_seq).collect();
        let picks: Vec<SlotPick> = (0..n_seq)
            .map(|i| {
                let r = ((i * 37 + pos * 11) % 100) as f64 / 100.0;
                match i % 3 {
                    0 => SlotPick::Greedy,
                    1 => SlotPick::Sample(top_k, r),
                    _ => SlotPick::Vocab(whole, r),
                }
            })
            .collect();
        let logits = s.step(&tokens, &rows, &wanted).unwrap();
        // The same pass again (the same cache rows rewritten), its tokens picked.
        let got = s.step_picks(&tokens, &rows, &wanted, &picks).unwrap();
        let want: Vec<u32> = picks
            .iter()
            .zip(logits.chunks_exact(vocab))
            .map(|(p, l)| p.pick_on_host(l))
            .collect();
        assert_eq!(got, want, "position {pos}");
    }
    // The wrong number of picks is refused, not guessed at.
    let err = s.step_picks(&[1], &[Row { seq: 0, pos: 3 }], &[0], &[]);
    assert!(err.is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
