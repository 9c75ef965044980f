//! Prompt and decode speed of the CPU backend (best of a few runs), for A/B comparisons of
//! kernel changes:
//!
//! cargo run --release -p flea-model --example cpu_speed -- MODEL.gguf [PROMPT_TOKENS] [DECODE_TOKENS] [THREADS]

use flea_model::{CpuBackend, Logits, Model, Session};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        return Err("usage: cpu_speed MODEL.gguf [PROMPT_TOKENS] [DECODE_TOKENS] [THREADS]".into());
    };
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n_prompt, n_decode, threads) = (arg(2, 128), arg(3, 32), arg(4, 1));
    let model = Model::load(std::path::Path::new(path))?;
    let backend = CpuBackend::new(threads)?;
    // Deterministic ordinary token ids.
    let vocab = model.cfg.n_vocab as u32;
    let ids: Vec<u32> = (0..n_prompt as u32)
        .map(|i| 100 + (i * 7919) % (vocab - 200))
        .collect();
    let (mut best_p, mut best_d) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let mut sess = Session::new(&model, &backend, 1024, 512)?;
        let t = Instant::now();
        let mut l = sess.eval(&ids, Logits::Last)?;
        best_p = best_p.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..n_decode {
            let tok = flea_model::sampling::argmax(&l) as u32;
            l = sess.eval(&[tok], Logits::Last)?;
        }
        best_d = best_d.min(t.elapsed().as_secs_f64());
    }
    println!(
        "prompt {n_prompt}: {:.1} tok/s   decode {n_decode}: {:.1} tok/s   ({threads} threads)",
        n_prompt as f64 / best_p,
        n_decode as f64 / best_d
    );
    Ok(())
}
