//! End-to-end: synthetic models load and run in flea, output is deterministic, repack
//! preserves every byte and the logits.

use std::path::{Path, PathBuf};

use flea_gguf::{GgmlType, GgufFile};
use flea_model::{CpuBackend, Logits, Model, Session};
use flea_synth::{repack, write_synthetic, Preset, QuantMix, SynthOptions, REPACK_ALIGNMENT};

/// A unique temp path, removed on drop.
struct Tmp(PathBuf);

impl Tmp {
    fn new(tag: &str) -> Tmp {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        Tmp(std::env::temp_dir().join(format!(
            "flea-synth-test-{}-{n}-{tag}.gguf",
            std::process::id()
        )))
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write(o: &SynthOptions, tag: &str) -> Tmp {
    let t = Tmp::new(tag);
    write_synthetic(&t.0, o).unwrap();
    t
}

/// Logits for a short prompt, prompt processed as one batch then one decode step.
fn logits(path: &Path) -> Vec<f32> {
    let model = Model::load(path).unwrap();
    let backend = CpuBackend::new(2).unwrap();
    let mut s = Session::new(&model, &backend, 64, 32).unwrap();
    let toks = model.tokenizer.encode("the quick brown fox", true, false);
    assert!(toks.len() >= 3, "{toks:?}");
    let mut out = s.eval(&toks, Logits::All).unwrap();
    out.extend(s.eval(&[5], Logits::Last).unwrap());
    out
}

fn check_logits(l: &[f32], n_vocab: usize, what: &str) {
    assert_eq!(l.len() % n_vocab, 0);
    assert!(l.iter().all(|v| v.is_finite()), "{what}: non-finite logits");
    let mut stds = Vec::new();
    for row in l.chunks(n_vocab) {
        let mean = row.iter().sum::<f32>() / n_vocab as f32;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n_vocab as f32;
        // Not degenerate, not exploded: weights are scaled like a trained model's.
        stds.push(var.sqrt());
        assert!(
            var.sqrt() > 0.05 && var.sqrt() < 100.0,
            "{what}: logit std {}",
            var.sqrt()
        );
    }
    // Positions see different tokens: their logits must differ too (no common component
    // swamping the residual stream).
    let rows: Vec<&[f32]> = l.chunks(n_vocab).collect();
    let mut diffs = Vec::new();
    for w in rows.windows(2) {
        let d = w[0]
            .iter()
            .zip(w[1])
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            / n_vocab as f32;
        diffs.push(d.sqrt());
        assert!(
            d.sqrt() > 0.1,
            "{what}: consecutive positions give near-equal logits"
        );
    }
    eprintln!("{what}: logit std per row {stds:.2?}, rms diff of neighbours {diffs:.2?}");
}

#[test]
fn tiny_presets_load_and_run() {
    for preset in [Preset::Tiny, Preset::TinyQwen2, Preset::TinyGemma3] {
        for tied in [false, true] {
            let mut o = SynthOptions::new(preset);
            o.tied = tied;
            let f = write(&o, preset.name());
            let g = GgufFile::open(&f.0).unwrap();
            let shape = preset.shape();
            assert_eq!(g.header.n_layers(), shape.n_layers);
            assert_eq!(g.header.tensor("output.weight").is_none(), tied);
            let l = logits(&f.0);
            check_logits(&l, shape.n_vocab, preset.name());
            let m = Model::load(&f.0).unwrap();
            assert_eq!(m.cfg.head_dim, shape.head_dim);
            if preset == Preset::TinyGemma3 {
                // Both kinds of layer exist.
                assert!(m.cfg.is_swa_layer(0) && !m.cfg.is_swa_layer(5));
                assert_eq!(m.cfg.sliding_window, Some(16));
            }
        }
    }
}

#[test]
fn gemma3_runs_past_the_sliding_window() {
    let f = write(&SynthOptions::new(Preset::TinyGemma3), "gemma-long");
    let model = Model::load(&f.0).unwrap();
    let backend = CpuBackend::new(2).unwrap();
    let mut s = Session::new(&model, &backend, 64, 8).unwrap();
    let toks: Vec<u32> = (0..40).map(|i| 3 + i * 7).collect();
    let l = s.eval(&toks, Logits::All).unwrap();
    check_logits(&l, 1024, "gemma3 40 tokens");
}

#[test]
fn every_quant_mix_runs() {
    for q in QuantMix::ALL {
        let mut o = SynthOptions::new(Preset::Tiny);
        o.quant = q;
        let f = write(&o, &format!("{q:?}"));
        let g = GgufFile::open(&f.0).unwrap();
        let want = q.uniform_type();
        for t in &g.header.tensors {
            if t.dims.len() == 2 {
                if let Some(ty) = want {
                    assert_eq!(t.ty, ty, "{q:?} {}", t.name);
                }
            } else {
                assert_eq!(t.ty, GgmlType::F32);
            }
        }
        if q == QuantMix::Q4_K_M {
            let ty = |n: &str| g.header.tensor(n).unwrap().ty;
            assert_eq!(ty("blk.0.attn_v.weight"), GgmlType::Q6_K);
            assert_eq!(ty("blk.0.ffn_down.weight"), GgmlType::Q6_K);
            assert_eq!(ty("blk.0.attn_q.weight"), GgmlType::Q4_K);
            assert_eq!(ty("output.weight"), GgmlType::Q6_K);
            assert_eq!(ty("token_embd.weight"), GgmlType::Q4_K);
        }
        assert_eq!(
            g.header.get_u32("general.file_type").unwrap(),
            Some(q.file_type())
        );
        check_logits(&logits(&f.0), 1024, &format!("{q:?}"));
    }
}

#[test]
fn rows_not_multiple_of_256_fall_back() {
    let mut o = SynthOptions::new(Preset::Tiny);
    o.shape.n_ff = 800; // ffn_down rows of 800: a multiple of 32, not of 256
    for (q, want) in [
        (QuantMix::Q4_K_M, GgmlType::Q8_0),
        (QuantMix::Q4_K, GgmlType::Q5_0),
        (QuantMix::Q5_K, GgmlType::Q5_1),
        (QuantMix::Q3_K, GgmlType::Q4_0),
    ] {
        o.quant = q;
        let f = write(&o, "fallback");
        let g = GgufFile::open(&f.0).unwrap();
        assert_eq!(g.header.tensor("blk.0.ffn_down.weight").unwrap().ty, want);
        check_logits(&logits(&f.0), 1024, "fallback");
    }
}

#[test]
fn tokenizer_loads_and_round_trips() {
    let f = write(&SynthOptions::new(Preset::Tiny), "tok");
    let g = GgufFile::open(&f.0).unwrap();
    let tok = flea_tokenizer::Tokenizer::from_gguf(&g.header).unwrap();
    assert_eq!(tok.n_vocab(), 1024);
    assert_eq!(tok.bos(), Some(1022));
    assert_eq!(tok.eos(), Some(1023));
    for text in [
        "Hello, world! This is a test of the synthetic tokenizer.",
        "  spaces\tand\nnewlines 1234 ~!@#$%^&*()",
        "the then there their these",
    ] {
        let ids = tok.encode(text, false, false);
        assert_eq!(tok.decode(&ids), text);
        let with_bos = tok.encode(text, true, false);
        assert_eq!(with_bos[0], 1022);
    }
    // Merges make multi-byte tokens.
    let ids = tok.encode("the then there", false, false);
    assert!(ids.len() < "the then there".len() * 2 / 3, "{ids:?}");
}

#[test]
fn deterministic_per_seed() {
    let mut o = SynthOptions::new(Preset::TinyQwen2);
    o.seed = 11;
    let a = write(&o, "seed-a");
    o.threads = 1; // thread count must not change the bytes
    let b = write(&o, "seed-b");
    o.seed = 12;
    o.threads = 0;
    let c = write(&o, "seed-c");
    let (a, b, c) = (
        std::fs::read(&a.0).unwrap(),
        std::fs::read(&b.0).unwrap(),
        std::fs::read(&c.0).unwrap(),
    );
    assert_eq!(a, b);
    assert_eq!(a.len(), c.len());
    assert_ne!(a, c);
}

#[test]
fn refuses_without_space_and_bad_shapes() {
    let mut o = SynthOptions::new(Preset::Tiny);
    o.shape.n_vocab = 100;
    let t = Tmp::new("bad");
    assert!(write_synthetic(&t.0, &o).is_err());
    assert!(!t.0.exists());
    // I/O errors name the file.
    let o = SynthOptions::new(Preset::Tiny);
    let bad = std::env::temp_dir().join("flea-synth-no-such-dir/x.gguf");
    let err = write_synthetic(&bad, &o).unwrap_err();
    assert!(matches!(err, flea_synth::SynthError::Io { .. }), "{err}");
    assert!(err.to_string().contains("flea-synth-no-such-dir"), "{err}");
    if cfg!(target_os = "linux") {
        // 70B at 2^20 layers cannot fit anywhere.
        let mut o = SynthOptions::new(Preset::B70);
        o.shape.n_layers = 1 << 20;
        let err = write_synthetic(&t.0, &o).unwrap_err();
        assert!(
            matches!(err, flea_synth::SynthError::NoSpace { .. }),
            "{err}"
        );
        assert!(!t.0.exists());
    }
}

#[test]
fn repack_preserves_bytes_and_logits() {
    for preset in [Preset::Tiny, Preset::TinyGemma3] {
        let src = write(&SynthOptions::new(preset), "repack-src");
        let dst = Tmp::new("repack-dst");
        let r = repack(&src.0, &dst.0).unwrap();

        let a = GgufFile::open(&src.0).unwrap();
        let b = GgufFile::open(&dst.0).unwrap();
        assert_eq!(b.header.alignment, REPACK_ALIGNMENT);
        assert_eq!(a.header.tensors.len(), b.header.tensors.len());
        for t in &a.header.tensors {
            let u = b.header.tensor(&t.name).unwrap();
            assert_eq!(a.tensor_data(t), b.tensor_data(u), "{}", t.name);
        }
        // Extents: aligned, in order, each layer's tensors alone in its extent.
        let n_layers = preset.shape().n_layers;
        assert_eq!(r.layers.len(), n_layers);
        let (gs, ge) = r.globals.unwrap();
        assert_eq!(gs % REPACK_ALIGNMENT, 0);
        let mut prev = ge;
        for (i, e) in r.layers.iter().enumerate() {
            assert_eq!(e.layer, i);
            assert_eq!(e.start % REPACK_ALIGNMENT, 0);
            assert!(e.start >= prev);
            // Contiguous: only alignment padding since the previous extent.
            assert!(e.start - prev < REPACK_ALIGNMENT);
            let v = b.header.layer_view(i).unwrap();
            assert_eq!((v.start, v.end), (e.start, e.end));
            for t in &b.header.tensors {
                if t.layer() != Some(i) {
                    assert!(
                        t.end() <= e.start || t.offset >= e.end,
                        "{} inside layer {i}",
                        t.name
                    );
                }
            }
            prev = e.end;
        }
        let (la, lb) = (logits(&src.0), logits(&dst.0));
        assert_eq!(la.len(), lb.len());
        assert!(la.iter().zip(&lb).all(|(x, y)| x.to_bits() == y.to_bits()));
        // Same input and output path is refused.
        assert!(repack(&src.0, &src.0).is_err());
    }
}

/// A real model, when the model cache has it (skipped otherwise): repack keeps every byte
/// and flea's logits.
#[test]
fn repack_real_model_if_present() {
    let src = flea_gguf::model_path("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !src.exists() {
        eprintln!("skipped: {} not present", src.display());
        return;
    }
    let dst = Tmp::new("repack-real");
    let r = repack(&src, &dst.0).unwrap();
    assert!(r.layers.iter().all(|e| e.start % REPACK_ALIGNMENT == 0));
    let (la, lb) = (logits(&src), logits(&dst.0));
    assert!(la.iter().zip(&lb).all(|(x, y)| x.to_bits() == y.to_bits()));
}

/// Depth: 80 layers (the 70B depth) at tiny width still give sane logits, for every
/// architecture.
#[test]
fn deep_models_stay_sane() {
    for preset in [Preset::Tiny, Preset::TinyQwen2, Preset::TinyGemma3] {
        let mut o = SynthOptions::new(preset);
        o.shape.n_layers = 80;
        let f = write(&o, "deep");
        check_logits(&logits(&f.0), 1024, &format!("{} x80", preset.name()));
    }
}

/// A big preset end to end (slow, disk-heavy: run by hand with
/// `FLEA_SYNTH_BIG=7b cargo test -p flea-synth --test synth big_preset -- --ignored`).
#[test]
#[ignore]
fn big_preset_runs() {
    let name = std::env::var("FLEA_SYNTH_BIG").unwrap_or_else(|_| "1b".into());
    let preset = Preset::ALL.into_iter().find(|p| p.name() == name).unwrap();
    let f = write(&SynthOptions::new(preset), "big");
    let l = logits(&f.0);
    check_logits(&l, preset.shape().n_vocab, preset.name());
    let n = preset.shape().n_vocab;
    let last = &l[l.len() - n..];
    let max = last.iter().cloned().fold(f32::MIN, f32::max);
    let mean = last.iter().sum::<f32>() / n as f32;
    eprintln!(
        "{}: last-token logits mean {mean:.3}, max {max:.3}",
        preset.name()
    );
}

/// Cross-check against llama.cpp logits dumped next to synthetic models (by hand, with
/// llama-cpp-python: every `X.gguf` in `$FLEA_SYNTH_LLAMA_DIR` with an `X.gguf.llama.f32`
/// of raw f32 logits for the token ids below).
#[test]
#[ignore]
fn agrees_with_llama_cpp_dumps() {
    let Ok(dir) = std::env::var("FLEA_SYNTH_LLAMA_DIR") else {
        return;
    };
    let toks = [
        1022, 316, 101, 280, 117, 397, 107, 275, 114, 377, 110, 270, 382,
    ];
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    paths.sort();
    for p in paths {
        let dump = PathBuf::from(format!("{}.llama.f32", p.display()));
        let Ok(raw) = std::fs::read(&dump) else {
            continue;
        };
        let want: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let model = Model::load(&p).unwrap();
        let backend = CpuBackend::new(2).unwrap();
        let mut s = Session::new(&model, &backend, 64, 32).unwrap();
        let got = s.eval(&toks, Logits::All).unwrap();
        assert_eq!(got.len(), want.len());
        let n = model.cfg.n_vocab;
        let max_diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let top1 = got
            .chunks(n)
            .zip(want.chunks(n))
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count();
        eprintln!(
            "{}: max |flea - llama.cpp| {max_diff:.4}, top-1 agrees at {top1}/{} positions",
            p.file_name().unwrap().to_string_lossy(),
            toks.len()
        );
    }
}

fn argmax(x: &[f32]) -> usize {
    (0..x.len()).fold(0, |b, i| if x[i] > x[b] { i } else { b })
}
