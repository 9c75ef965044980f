//! Host sampling time per token for a whole-vocabulary sampler (top-k off), on logits shaped
//! like a model's (a few high, a long tail): `cargo run --release --example sample_speed`.
use flea_model::sampling::{Sampler, SamplerConfig};
use std::time::Instant;

fn main() {
    for &n in &[32000usize, 151936] {
        for &(top_p, min_p) in &[(1.0f32, 0.0f32), (0.95, 0.0), (1.0, 0.05)] {
            let cfg = SamplerConfig {
                temperature: 0.8,
                top_k: 0,
                top_p,
                min_p,
                seed: 7,
                ..Default::default()
            };
            let mut s = Sampler::new(cfg);
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let base: Vec<f32> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ((x >> 40) as f32 / (1u64 << 24) as f32) * 12.0 - 6.0
                })
                .collect();
            let reps = 50;
            let t0 = Instant::now();
            let mut sum = 0u64;
            for _ in 0..reps {
                let mut l = base.clone();
                sum += u64::from(s.sample(&mut l));
            }
            let dt = t0.elapsed().as_secs_f64() / reps as f64;
            println!(
                "n {n} top_p {top_p} min_p {min_p}: {:.3} ms a token (checksum {sum})",
                dt * 1e3
            );
        }
    }
}
