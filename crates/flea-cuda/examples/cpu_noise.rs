//! CPU-vs-CPU noise floor: logits of a synthetic model on the CPU backend, written to a file,
//! so that runs with different FLEA_QUANT_ISA (different summation orders) can be compared.
//! usage: cpu_noise MIX PRESET OUT.f32
use clap::ValueEnum;
use flea_model::{CpuBackend, Logits, Model, Session};
use flea_synth::{write_synthetic, Preset, QuantMix, SynthOptions};
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let q = QuantMix::from_str(&a[1], true).unwrap();
    let p = Preset::from_str(&a[2], true).unwrap();
    let path = std::env::temp_dir().join(format!("cpu-noise-{}-{}.gguf", a[1], a[2]));
    let mut o = SynthOptions::new(p);
    o.quant = q;
    o.seed = 7;
    write_synthetic(&path, &o).unwrap();
    let model = Model::load(&path).unwrap();
    let cpu = CpuBackend::new(2).unwrap();
    let mut s = Session::new(&model, &cpu, 64, 32).unwrap();
    let vocab = model.cfg.n_vocab as u32;
    let prompt: Vec<u32> = (0..20u32).map(|i| (i * 37 + 11) % vocab).collect();
    let l = s.eval(&prompt, Logits::All).unwrap();
    let bytes: Vec<u8> = l.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(&a[3], bytes).unwrap();
    println!(
        "{} finite={} isa={:?}",
        a[1],
        l.iter().all(|x| x.is_finite()),
        flea_quant::best_isa()
    );
    let _ = std::fs::remove_file(&path);
}
