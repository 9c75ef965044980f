//! Fidelity to llama.cpp on the real models, against the committed fixtures in
//! tests/fixtures/logits (made by scripts/gen_logit_fixtures.py).
//!
//! For every fixture prompt: flea's token ids equal llama.cpp's; with llama.cpp's tokens fed
//! in (teacher forcing) the next-token distributions are compared (top-1 agreement, mean
//! KL(llama.cpp ‖ flea)); greedy 32-token continuations are compared with llama.cpp's.
//!
//! flea's CPU backend computes what llama.cpp's CPU backend (x86, AVX-512 build, the
//! fixtures' build) computes, operation for operation in the same order, so its logits are
//! bit-identical to llama.cpp's on every fixture prompt of the three models (see
//! docs/FIDELITY.md). The bounds below leave a little margin under that (top-1 100%, KL 0,
//! greedy identical everywhere as measured) so that a machine where some libm function
//! rounds differently still passes, while an order change like the ones before this
//! (per-prompt KL 2e-4 … 1e-2, top-1 93–100%) fails.

use flea_model::{CpuBackend, Logits, Model, Session};
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Deserialize)]
struct Fixture {
    model: String,
    prompts: Vec<Prompt>,
}

#[derive(Deserialize)]
struct Prompt {
    name: String,
    text: String,
    ids: Vec<u32>,
    positions: Vec<Position>,
    greedy: Vec<u32>,
}

#[derive(Deserialize)]
struct Position {
    top_ids: Vec<u32>,
    top_logprobs: Vec<f64>,
}

fn model_path(file: &str) -> Option<PathBuf> {
    flea_gguf::model_or_skip(file)
}

fn fixture(short: &str) -> Fixture {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../tests/fixtures/logits/{short}.json"));
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v as f64 - lse).collect()
}

/// KL(llama.cpp ‖ flea) over llama.cpp's top-k ids plus one bucket for the rest (a lower
/// bound of the full KL, tight when the top-k hold nearly all the mass).
fn kl_topk(pos: &Position, flea_lp: &[f64]) -> f64 {
    let mut kl = 0.0;
    let (mut p_top, mut q_top) = (0.0, 0.0);
    for (&id, &lp) in pos.top_ids.iter().zip(&pos.top_logprobs) {
        let lq = flea_lp[id as usize];
        let p = lp.exp();
        kl += p * (lp - lq);
        p_top += p;
        q_top += lq.exp();
    }
    let (p_rest, q_rest) = ((1.0 - p_top).max(0.0), (1.0 - q_top).max(1e-300));
    if p_rest > 0.0 {
        kl += p_rest * (p_rest.ln() - q_rest.ln());
    }
    kl
}

/// Per-prompt bounds (the project's targets are top-1 ≥ 99% and KL ≤ 0.01; measured: 100%
/// and 0).
const MIN_TOP1_PER_PROMPT: f64 = 0.99;
const MAX_MEAN_KL_PER_PROMPT: f64 = 1e-4;
/// Over all positions of all prompts of a model.
const MIN_TOP1_OVERALL: f64 = 0.995;
/// Prompts (of 5 per model) whose 32 greedy tokens must equal llama.cpp's (measured: 5).
const MIN_GREEDY_IDENTICAL: usize = 4;

struct Outcome {
    greedy_identical: usize,
    prompts: usize,
}

fn check_model(short: &str, file: &str) -> Option<Outcome> {
    let path = model_path(file)?;
    let fx = fixture(short);
    assert_eq!(fx.model, file);
    let model = Model::load(&path).expect("load model");
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let backend = CpuBackend::new(threads).expect("backend");
    let vocab = model.cfg.n_vocab;
    let mut failures = Vec::new();
    let mut greedy_identical = 0;
    let (mut agree_all, mut n_all) = (0usize, 0usize);
    for p in &fx.prompts {
        let ids = model.tokenizer.encode(&p.text, true, true);
        if ids != p.ids {
            failures.push(format!(
                "{short}/{}: token ids differ from llama.cpp",
                p.name
            ));
        }
        let mut sess = Session::new(&model, &backend, 1024, 512).expect("session");
        let logits = sess.eval(&p.ids, Logits::All).expect("eval");
        assert_eq!(logits.len(), p.ids.len() * vocab);
        let (mut agree, mut kl_sum) = (0usize, 0.0f64);
        for (t, pos) in p.positions.iter().enumerate() {
            let row = &logits[t * vocab..(t + 1) * vocab];
            let lp = log_softmax(row);
            if flea_model::sampling::argmax(row) as u32 == pos.top_ids[0] {
                agree += 1;
            }
            kl_sum += kl_topk(pos, &lp);
        }
        let n = p.positions.len();
        agree_all += agree;
        n_all += n;
        let top1 = agree as f64 / n as f64;
        let kl = kl_sum / n as f64;

        // Greedy continuation from the prompt, one token per decode like llama.cpp.
        let mut sess = Session::new(&model, &backend, 1024, 512).expect("session");
        let mut l = sess.eval(&p.ids, Logits::Last).expect("eval");
        let mut gen = Vec::new();
        for _ in 0..p.greedy.len() {
            let t = flea_model::sampling::argmax(&l) as u32;
            gen.push(t);
            l = sess.eval(&[t], Logits::Last).expect("eval");
        }
        let same = gen == p.greedy;
        let first_diff = gen
            .iter()
            .zip(&p.greedy)
            .take_while(|(a, b)| a == b)
            .count();
        greedy_identical += same as usize;
        eprintln!(
            "{short}/{:<8} {:>4} tokens  top-1 {:6.2}%  mean KL {:.5}  greedy {}",
            p.name,
            n,
            top1 * 100.0,
            kl,
            if same {
                "identical".to_string()
            } else {
                format!("differs at {first_diff}")
            }
        );
        if top1 < MIN_TOP1_PER_PROMPT {
            failures.push(format!(
                "{short}/{}: top-1 agreement {:.2}% < {}%",
                p.name,
                top1 * 100.0,
                MIN_TOP1_PER_PROMPT * 100.0
            ));
        }
        if kl > MAX_MEAN_KL_PER_PROMPT {
            failures.push(format!(
                "{short}/{}: mean KL {kl:.5} > {MAX_MEAN_KL_PER_PROMPT}",
                p.name
            ));
        }
    }
    let overall = agree_all as f64 / n_all as f64;
    eprintln!(
        "{short}: top-1 agreement over all {n_all} positions {:.2}%",
        overall * 100.0
    );
    if overall < MIN_TOP1_OVERALL {
        failures.push(format!(
            "{short}: overall top-1 agreement {:.2}% < {}%",
            overall * 100.0,
            MIN_TOP1_OVERALL * 100.0
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Some(Outcome {
        greedy_identical,
        prompts: fx.prompts.len(),
    })
}

fn check_greedy(short: &str, o: Outcome) {
    eprintln!(
        "{short}: greedy identical on {} of {} prompts",
        o.greedy_identical, o.prompts
    );
    assert!(
        o.greedy_identical >= MIN_GREEDY_IDENTICAL,
        "{short}: greedy identical on {} of {} prompts (need ≥ {MIN_GREEDY_IDENTICAL})",
        o.greedy_identical,
        o.prompts
    );
}

#[test]
fn smollm2_matches_llama_cpp() {
    if let Some(o) = check_model("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf") {
        check_greedy("smollm2", o);
    }
}

#[test]
fn qwen2_matches_llama_cpp() {
    if let Some(o) = check_model("qwen2", "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf") {
        check_greedy("qwen2", o);
    }
}

#[test]
fn gemma3_matches_llama_cpp() {
    if let Some(o) = check_model("gemma3", "gemma-3-270m.Q4_K_M.gguf") {
        check_greedy("gemma3", o);
    }
}
