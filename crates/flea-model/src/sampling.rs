//! Turning logits into the next token: greedy or seeded random sampling with the usual
//! filters, applied in llama.cpp's order (penalties, top-k, top-p, min-p, temperature).

#[derive(Clone, Debug)]
pub struct SamplerConfig {
    /// 0 (or less) means greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0x5EED,
        }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            repeat_penalty: 1.0,
            ..Default::default()
        }
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, reproducible across platforms.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

pub struct Sampler {
    pub cfg: SamplerConfig,
    rng: Rng,
    history: Vec<u32>,
}

/// Index of the largest value (first on ties; NaNs never win); 0 for an empty slice or one
/// with nothing above -inf.
pub fn argmax(xs: &[f32]) -> usize {
    // The maximum in 16 independent lanes (the compiler keeps them in vector registers),
    // then the first index holding it: 5-6x faster than one running index over a
    // vocabulary's logits, and a greedy decode token waits for it with the GPU idle.
    const LANES: usize = 16;
    let mut lane_max = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &v) in lane_max.iter_mut().zip(c) {
            if v > *m {
                *m = v;
            }
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in lane_max.iter().chain(rest) {
        if v > max {
            max = v;
        }
    }
    if max > f32::NEG_INFINITY {
        xs.iter().position(|&v| v == max).unwrap_or(0)
    } else {
        0
    }
}

impl SamplerConfig {
    /// Whether `sample` is the plain arg-max of the logits (no temperature, no penalty
    /// that depends on earlier tokens), which a backend can compute without the host.
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature <= 0.0 && (self.repeat_penalty == 1.0 || self.repeat_last_n == 0)
    }
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Sampler {
        let rng = Rng::new(cfg.seed);
        Sampler {
            cfg,
            rng,
            history: Vec::new(),
        }
    }

    /// Record tokens (e.g. the prompt) for the repetition penalty.
    pub fn accept(&mut self, tok: u32) {
        self.history.push(tok);
        let keep = self.cfg.repeat_last_n.max(1) * 4;
        if self.history.len() > keep {
            self.history
                .drain(..self.history.len() - self.cfg.repeat_last_n);
        }
    }

    /// Choose the next token. `logits` is modified (penalties applied).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        let c = &self.cfg;
        if c.repeat_penalty != 1.0 && c.repeat_last_n > 0 {
            let start = self.history.len().saturating_sub(c.repeat_last_n);
            let mut seen: Vec<u32> = self.history[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l <= 0.0 {
                        *l * c.repeat_penalty
                    } else {
                        *l / c.repeat_penalty
                    };
                }
            }
        }
        if c.temperature <= 0.0 {
            return argmax(logits) as u32;
        }
        // Candidates sorted by logit, descending.
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        let k = if c.top_k > 0 {
            c.top_k.min(cand.len())
        } else {
            cand.len()
        };
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            cand.truncate(k);
        }
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let probs = |cand: &[(u32, f32)]| -> Vec<f64> {
            let m = cand.first().map_or(0.0, |c| c.1) as f64;
            let e: Vec<f64> = cand.iter().map(|c| (c.1 as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|x| x / s).collect()
        };
        if c.top_p < 1.0 {
            let p = probs(&cand);
            let mut acc = 0.0;
            let mut keep = cand.len();
            for (i, pi) in p.iter().enumerate() {
                acc += pi;
                if acc >= c.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        if c.min_p > 0.0 {
            let p = probs(&cand);
            let thr = p.first().copied().unwrap_or(0.0) * c.min_p as f64;
            let keep = p.iter().take_while(|&&x| x >= thr).count().max(1);
            cand.truncate(keep);
        }
        let t = c.temperature;
        for x in cand.iter_mut() {
            x.1 /= t;
        }
        let p = probs(&cand);
        let r = self.rng.next_f64();
        let mut acc = 0.0;
        for (i, pi) in p.iter().enumerate() {
            acc += pi;
            if r < acc {
                return cand[i].0;
            }
        }
        cand.last().map_or(0, |c| c.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_keeps_the_first_of_ties_and_skips_nans() {
        // The plain scan argmax replaced, for its exact answers.
        fn scan(xs: &[f32]) -> usize {
            let (mut best, mut bv) = (0, f32::NEG_INFINITY);
            for (i, &v) in xs.iter().enumerate() {
                if v > bv {
                    (best, bv) = (i, v);
                }
            }
            best
        }
        let nan = f32::NAN;
        let ninf = f32::NEG_INFINITY;
        let mut cases: Vec<Vec<f32>> = vec![
            vec![],
            vec![nan, ninf, 1.0],
            vec![nan; 40],
            vec![ninf; 3],
            vec![nan, ninf],
            vec![1.0, 3.0, 3.0, 2.0],
            (0..100)
                .map(|i| match i {
                    37 | 90 => 5.0,
                    _ if i % 7 == 0 => nan,
                    _ => 1.0,
                })
                .collect(),
        ];
        let mut long: Vec<f32> = (0..32003).map(|i| (i as f32 * 0.731).sin()).collect();
        cases.push(long.clone());
        long[32002] = 9.0; // in the remainder after the 16-lane chunks
        cases.push(long);
        for c in &cases {
            assert_eq!(argmax(c), scan(c), "{c:?}");
        }
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplerConfig::greedy());
        let mut l = vec![0.1, 3.0, -1.0, 2.9];
        assert_eq!(s.sample(&mut l), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            min_p: 0.0,
            seed: 42,
            ..Default::default()
        };
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
        let run = || {
            let mut s = Sampler::new(cfg.clone());
            (0..50)
                .map(|_| s.sample(&mut logits.clone()))
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        // top-2 of values 0..6 (value 6 at indices 6, 13, ...): only indices holding 6.
        assert!(a.iter().all(|&t| t % 7 == 6));
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplerConfig {
            repeat_penalty: 2.0,
            ..SamplerConfig::greedy()
        });
        s.accept(0);
        let mut l = vec![3.0, 2.0];
        assert_eq!(s.sample(&mut l), 1);
        assert_eq!(l[0], 1.5);
    }

    #[test]
    fn min_p_and_top_p_keep_the_best() {
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            min_p: 0.0,
            seed: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(cfg);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [10.0, 0.0, 0.0]), 0);
        }
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            seed: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(cfg);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 5.0, 0.0]), 1);
        }
    }
}
