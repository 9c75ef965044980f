//! CUDA vs CPU logits on synthetic models of every architecture and every weight type.
//! Without a CUDA device every test prints "SKIP: no CUDA device" and passes.
//!
//! Each case: a prompt (Logits::All, so the prompt path — cuBLAS GEMM — is compared at every
//! position) and a few greedy decode steps (the matvec path). Criteria: relative error
//! ||cuda - cpu|| / ||cpu|| <= 5e-3 per evaluation, and the same argmax at every position.
//! Set FLEA_CUDA_REPORT=<dir> to write one JSON line per case to <dir>/parity.jsonl.

use flea_cuda::CudaBackend;
use flea_model::{CpuBackend, Logits, Model, Session};
use flea_synth::{write_synthetic, Preset, QuantMix, SynthOptions};
use std::io::Write;
use std::path::PathBuf;

const TOL: f64 = 5e-3;

fn backend() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) => {
            println!("SKIP: no CUDA device ({e})");
            None
        }
    }
}

struct Tmp(PathBuf);
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        num += ((x - y) as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

struct CaseResult {
    prompt_rel: f64,
    decode_rel: f64,
    argmax_mismatch: usize,
    positions: usize,
    ok: bool,
}

fn run_case(cuda: &CudaBackend, preset: Preset, quant: QuantMix) -> CaseResult {
    let tag = format!("{}-{:?}", preset.name(), quant);
    let path = std::env::temp_dir().join(format!(
        "flea-cuda-parity-{tag}-{}.gguf",
        std::process::id()
    ));
    let _tmp = Tmp(path.clone());
    let mut o = SynthOptions::new(preset);
    o.quant = quant;
    o.seed = 7;
    o.threads = 4;
    write_synthetic(&path, &o).expect("write synthetic model");
    let model = Model::load(&path).expect("load model");
    let vocab = model.cfg.n_vocab;
    let cpu = CpuBackend::new(4).unwrap();
    let mut sc = Session::new(&model, &cpu, 64, 32).unwrap();
    let mut sg = Session::new(&model, cuda, 64, 32).unwrap();
    // 20 prompt tokens: longer than Gemma 3's sliding window (16) in the tiny preset.
    let prompt: Vec<u32> = (0..20u32).map(|i| (i * 37 + 11) % vocab as u32).collect();
    let lc = sc.eval(&prompt, Logits::All).unwrap();
    let lg = sg.eval(&prompt, Logits::All).unwrap();
    let prompt_rel = rel_err(&lg, &lc);
    let mut mismatch = 0;
    let mut positions = 0;
    for (rc, rg) in lc.chunks_exact(vocab).zip(lg.chunks_exact(vocab)) {
        positions += 1;
        if argmax(rc) != argmax(rg) {
            mismatch += 1;
        }
    }
    let mut next = argmax(&lc[lc.len() - vocab..]) as u32;
    let mut decode_rel: f64 = 0.0;
    for _ in 0..6 {
        let c = sc.eval(&[next], Logits::Last).unwrap();
        let g = sg.eval(&[next], Logits::Last).unwrap();
        decode_rel = decode_rel.max(rel_err(&g, &c));
        positions += 1;
        if argmax(&c) != argmax(&g) {
            mismatch += 1;
        }
        next = argmax(&c) as u32;
    }
    let ok = prompt_rel <= TOL && decode_rel <= TOL && mismatch == 0;
    println!(
        "PARITY arch={} mix={:?} prompt_rel={:.3e} decode_rel={:.3e} argmax_mismatch={}/{} {}",
        preset.name(),
        quant,
        prompt_rel,
        decode_rel,
        mismatch,
        positions,
        if ok { "OK" } else { "FAIL" }
    );
    if let Some(dir) = std::env::var_os("FLEA_CUDA_REPORT") {
        let line = serde_json::json!({
            "arch": preset.name(), "mix": format!("{quant:?}"),
            "prompt_rel": prompt_rel, "decode_rel": decode_rel,
            "argmax_mismatch": mismatch, "positions": positions, "ok": ok,
            "device": cuda.device_name(),
        });
        let p = std::path::Path::new(&dir).join("parity.jsonl");
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(p) {
            let _ = writeln!(f, "{line}");
        }
    }
    CaseResult {
        prompt_rel,
        decode_rel,
        argmax_mismatch: mismatch,
        positions,
        ok,
    }
}

fn run_all(cases: &[(Preset, QuantMix)]) {
    let Some(cuda) = backend() else { return };
    println!("device: {} (kernels {})", cuda.device_name(), cuda.kernel_cache());
    let mut failed = Vec::new();
    for &(p, q) in cases {
        let r = run_case(&cuda, p, q);
        if !r.ok {
            failed.push(format!(
                "{}/{q:?}: prompt {:.2e} decode {:.2e} argmax {}/{}",
                p.name(),
                r.prompt_rel,
                r.decode_rel,
                r.argmax_mismatch,
                r.positions
            ));
        }
    }
    assert!(failed.is_empty(), "parity failures: {failed:#?}");
}

#[test]
fn architectures_match_cpu() {
    run_all(&[
        (Preset::Tiny, QuantMix::Q4_K_M),
        (Preset::TinyQwen2, QuantMix::Q4_K_M),
        (Preset::TinyGemma3, QuantMix::Q4_K_M),
    ]);
}

#[test]
fn every_type_matches_cpu() {
    let cases: Vec<_> = QuantMix::ALL
        .iter()
        .filter(|q| q.uniform_type().is_some())
        .map(|&q| (Preset::Tiny, q))
        .collect();
    run_all(&cases);
}

#[test]
fn gemma3_types_match_cpu() {
    // GeGLU, per-head norms, sliding window with the legacy formats too.
    run_all(&[
        (Preset::TinyGemma3, QuantMix::Q8_0),
        (Preset::TinyGemma3, QuantMix::Q4_0),
        (Preset::TinyQwen2, QuantMix::Q5_0),
    ]);
}

#[test]
fn new_without_device_is_an_error_not_a_panic() {
    let libs = flea_cuda::libraries();
    let r = std::panic::catch_unwind(|| CudaBackend::new(99).map(|_| ()));
    let r = r.expect("CudaBackend::new panicked");
    let e = r.expect_err("device 99 should not exist");
    println!("CudaBackend::new(99): {e} (libs {libs:?})");
    assert!(!e.0.contains('\n'), "error should be one line: {e}");
    if !libs.driver {
        assert!(e.0.contains("no CUDA driver"), "{e}");
        let e0 = CudaBackend::new(0).err().expect("no driver → Err");
        assert!(e0.0.contains("libcuda.so.1"), "{e0}");
    }
}
