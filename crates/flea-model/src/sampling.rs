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
        if c.top_k == 0 {
            let how = VocabSampling {
                temperature: c.temperature,
                top_p: c.top_p,
                min_p: c.min_p,
            };
            let r = self.draw();
            return sample_vocab(logits, &how, r);
        }
        let cand = top_candidates(logits, 0, c.top_k);
        let how = TopKSampling {
            temperature: c.temperature,
            top_k: c.top_k,
            top_p: c.top_p,
            min_p: c.min_p,
        };
        let r = self.draw();
        choose_from_top(&cand, &how, r)
    }

    /// The uniform draw `sample` takes for a token (one per sampled token): a backend that
    /// samples on the device is handed the same draw.
    pub fn draw(&mut self) -> f64 {
        self.rng.next_f64()
    }

    /// The random state, to put back what a chained decode drew for passes whose tokens
    /// were never used (`set_rng`).
    pub fn rng(&self) -> &Rng {
        &self.rng
    }
    pub fn set_rng(&mut self, rng: Rng) {
        self.rng = rng;
    }
}

/// Most candidates a backend's top-k sampling keeps (`Backend::pick_to_slot`; the CUDA
/// kernel's list lives in shared memory).
pub const SLOT_TOP_K_MAX: usize = 64;

/// How a chained decode pass picks its token on the backend.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SlotPick {
    /// The first index of the largest logit.
    Greedy,
    /// Top-k sampling with the host's uniform draw for this token.
    Sample(TopKSampling, f64),
    /// Whole-vocabulary sampling ([`sample_vocab`]) with the host's draw for this token.
    Vocab(VocabSampling, f64),
}

impl SlotPick {
    /// The token this pick chooses from a row of logits, on the host: what a backend's
    /// `pick_to_slot` / `pick_rows` computes on the device, and what [`Sampler::sample`]
    /// returns for the same configuration and draw.
    pub fn pick_on_host(&self, logits: &[f32]) -> u32 {
        match self {
            SlotPick::Greedy => argmax(logits) as u32,
            SlotPick::Sample(how, r) => {
                choose_from_top(&top_candidates(logits, 0, how.top_k), how, *r)
            }
            SlotPick::Vocab(how, r) => sample_vocab(logits, how, *r),
        }
    }

    /// The same pick with the draw `r` (greedy takes none).
    pub fn with_draw(self, r: f64) -> SlotPick {
        match self {
            SlotPick::Greedy => SlotPick::Greedy,
            SlotPick::Sample(how, _) => SlotPick::Sample(how, r),
            SlotPick::Vocab(how, _) => SlotPick::Vocab(how, r),
        }
    }
}

/// Sampling from the `top_k` largest logits with top-p, min-p and temperature, without a
/// penalty that depends on earlier tokens: what a backend may do on the device
/// (`Backend::pick_to_slot`) given the host's draw.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TopKSampling {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
}

impl SamplerConfig {
    /// This configuration as top-k sampling a backend can do on the device: Some when it
    /// samples (temperature > 0) from at most `max_k` candidates with no repetition penalty.
    pub fn top_k_sampling(&self, max_k: usize) -> Option<TopKSampling> {
        let no_penalty = self.repeat_penalty == 1.0 || self.repeat_last_n == 0;
        (self.temperature > 0.0 && no_penalty && (1..=max_k).contains(&self.top_k)).then_some(
            TopKSampling {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
            },
        )
    }
}

impl SamplerConfig {
    /// This configuration as whole-vocabulary sampling (top-k off) a backend may do on the
    /// device: Some when it samples (temperature > 0) with top-k 0 and no repetition penalty.
    pub fn vocab_sampling(&self) -> Option<VocabSampling> {
        let no_penalty = self.repeat_penalty == 1.0 || self.repeat_last_n == 0;
        (self.temperature > 0.0 && no_penalty && self.top_k == 0).then_some(VocabSampling {
            temperature: self.temperature,
            top_p: self.top_p,
            min_p: self.min_p,
        })
    }
}

/// The order candidates are ranked in: larger logit first (`f32::total_cmp`), then the
/// smaller token id, so ties never depend on how the logits were scanned.
pub fn candidate_key(id: u32, logit: f32) -> u64 {
    let bits = logit.to_bits();
    // total_cmp's order as an unsigned integer: negative values reversed below the positive.
    let ordered = if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    (u64::from(ordered) << 32) | u64::from(u32::MAX - id)
}

/// The logit and id a [`candidate_key`] was made from.
fn from_candidate_key(key: u64) -> (u32, f32) {
    let ordered = (key >> 32) as u32;
    let bits = if ordered & 0x8000_0000 != 0 {
        ordered & 0x7fff_ffff
    } else {
        !ordered
    };
    (u32::MAX - key as u32, f32::from_bits(bits))
}

/// The `k` best of `logits` (ids from `id0`), best first in [`candidate_key`]'s order.
pub fn top_candidates(logits: &[f32], id0: u32, k: usize) -> Vec<(u32, f32)> {
    let mut best = Vec::with_capacity(logits.len());
    add_candidates(&mut best, logits, id0, k);
    candidates_of(&best)
}

/// Merge a chunk of `logits` (ids from `id0`) into `best`, the [`candidate_key`]s kept so
/// far: afterwards the `k` largest of both, largest first. Ranked as plain integers: a whole
/// vocabulary sorts in a fraction of the time a comparison of (id, logit) pairs takes.
pub fn add_candidates(best: &mut Vec<u64>, logits: &[f32], id0: u32, k: usize) {
    best.extend(
        logits
            .iter()
            .enumerate()
            .map(|(i, &l)| candidate_key(id0.wrapping_add(i as u32), l)),
    );
    if k == 0 {
        best.clear();
        return;
    }
    if k < best.len() {
        best.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        best.truncate(k);
    }
    best.sort_unstable_by(|a, b| b.cmp(a));
}

/// The (id, logit) of each key, in order.
pub fn candidates_of(keys: &[u64]) -> Vec<(u32, f32)> {
    keys.iter().map(|&k| from_candidate_key(k)).collect()
}

/// Softmax of the candidates' logits in f64, from the first (the largest).
fn probs(logits: impl Iterator<Item = f32> + Clone) -> Vec<f64> {
    let mut it = logits.clone();
    let m = it.next().map_or(0.0, f64::from);
    let e: Vec<f64> = logits.map(|l| (f64::from(l) - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// The token `sample` picks from the ranked candidates `cand` (best first) with the uniform
/// draw `r`: top-p, then min-p, then temperature, in llama.cpp's order. A device sampler
/// repeats this arithmetic exactly (kernels.cu `topk_slot`).
pub fn choose_from_top(cand: &[(u32, f32)], how: &TopKSampling, r: f64) -> u32 {
    let mut n = cand.len();
    let logits = |n: usize| cand[..n].iter().map(|c| c.1);
    if how.top_p < 1.0 {
        let p = probs(logits(n));
        let mut acc = 0.0;
        let mut keep = n;
        for (i, pi) in p.iter().enumerate() {
            acc += pi;
            if acc >= f64::from(how.top_p) {
                keep = i + 1;
                break;
            }
        }
        n = keep.max(1).min(n);
    }
    if how.min_p > 0.0 {
        let p = probs(logits(n));
        let thr = p.first().copied().unwrap_or(0.0) * f64::from(how.min_p);
        let keep = p.iter().take_while(|&&x| x >= thr).count().max(1);
        n = keep.min(n);
    }
    let t = how.temperature;
    let p = probs(logits(n).map(|l| l / t));
    let mut acc = 0.0;
    for (i, pi) in p.iter().enumerate() {
        acc += pi;
        if r < acc {
            return cand[i].0;
        }
    }
    cand[..n].last().map_or(0, |c| c.0)
}

/// Sampling from the whole vocabulary (top-k off: OpenAI's parameters), defined so that
/// it needs no sort of the vocabulary and a device can repeat it exactly (kernels.cu
/// `vocab_*`): with m the largest logit that is not NaN and t the temperature,
/// - top-p: each token not NaN has the integer mass floor(exp(l - m) × 2^32) ([`top_p_mass`],
///   exp in f64); the kept tokens are the smallest prefix, in [`candidate_key`]'s order,
///   whose mass reaches ceil(top_p × the vocabulary's mass) (the product in f64). Integer
///   sums do not depend on their order, so a device adds them in parallel and gets the
///   same prefix;
/// - min-p: a token is kept if l equals m or l - m >= ln(min_p) (in f64);
/// - the kept tokens weigh exp(l / t - m / t) (the divisions in f32, as the top-k path's),
///   NaN logits nothing; the draw r in [0, 1) picks the token where the running sum of the
///   weights, in token order, first passes r times their total.
///
/// The running sums are taken in a fixed tree so that a device computes the same bits in
/// parallel: sums of [`DRAW_SEGMENT`] consecutive weights, sums of [`DRAW_TILE`] / 32 such
/// segments, then the tiles, each level added in order from 0.0; the draw walks the tiles,
/// then that tile's segments, then that segment's weights, with what is left of r × total.
/// If the largest logit or m / t is not finite, the token is [`argmax`]'s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VocabSampling {
    pub temperature: f32,
    /// 1.0 (or more) disables.
    pub top_p: f32,
    /// 0.0 (or less) disables.
    pub min_p: f32,
}

/// Consecutive weights summed first in a whole-vocabulary draw.
pub const DRAW_SEGMENT: usize = 32;
/// Consecutive weights (32 segments) summed next.
pub const DRAW_TILE: usize = 32 * DRAW_SEGMENT;

impl VocabSampling {
    /// The min-p bound on l - m (f64; -inf when min-p is off), as the device is handed it.
    pub fn ln_min_p(&self) -> f64 {
        if self.min_p > 0.0 {
            f64::from(self.min_p).ln()
        } else {
            f64::NEG_INFINITY
        }
    }
}

/// The largest logit that is not NaN (-inf if none).
fn max_logit(logits: &[f32]) -> f32 {
    logits
        .iter()
        .fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m })
}

/// Sum of `w(i)` for i in `range`, in order from 0.0.
fn ordered_sum(range: std::ops::Range<usize>, w: &impl Fn(usize) -> f64) -> f64 {
    range.fold(0.0, |a, i| a + w(i))
}

/// The tree sums of [`VocabSampling`]: each segment's, then each tile's.
fn segment_sum(n: usize, s: usize, w: &impl Fn(usize) -> f64) -> f64 {
    ordered_sum(s * DRAW_SEGMENT..((s + 1) * DRAW_SEGMENT).min(n), w)
}
fn tile_sum(n: usize, t: usize, w: &impl Fn(usize) -> f64) -> f64 {
    let segments = n.div_ceil(DRAW_SEGMENT);
    let per_tile = DRAW_TILE / DRAW_SEGMENT;
    ordered_sum(t * per_tile..((t + 1) * per_tile).min(segments), &|s| {
        segment_sum(n, s, w)
    })
}

/// Every tile's sum, and their total added in order (the tree's root).
fn tile_sums(n: usize, w: &impl Fn(usize) -> f64) -> (Vec<f64>, f64) {
    let tiles: Vec<f64> = (0..n.div_ceil(DRAW_TILE))
        .map(|t| tile_sum(n, t, w))
        .collect();
    let total = tiles.iter().fold(0.0, |a, &x| a + x);
    (tiles, total)
}

/// The part of `parts` (sums) where a running sum from 0.0 first passes `target`, and what
/// is left of the target inside it; if rounding leaves the target at or past the end, the
/// last part with weight and an infinite remainder (so the levels below take their last too).
fn walk(parts: &[f64], target: f64) -> (usize, f64) {
    let mut acc = 0.0;
    for (i, &x) in parts.iter().enumerate() {
        let next = acc + x;
        if target < next {
            return (i, target - acc);
        }
        acc = next;
    }
    (
        parts.iter().rposition(|&x| x > 0.0).unwrap_or(0),
        f64::INFINITY,
    )
}

/// The token index the draw `r` picks among `n` weights `w` (see [`VocabSampling`]).
pub fn draw_in_token_order(n: usize, w: impl Fn(usize) -> f64, r: f64) -> usize {
    let (tiles, total) = tile_sums(n, &w);
    let (t, left) = walk(&tiles, r * total);
    let per_tile = DRAW_TILE / DRAW_SEGMENT;
    let s0 = t * per_tile;
    let segments: Vec<f64> = (s0..(s0 + per_tile).min(n.div_ceil(DRAW_SEGMENT)))
        .map(|s| segment_sum(n, s, &w))
        .collect();
    let (s, left) = walk(&segments, left);
    let i0 = (s0 + s) * DRAW_SEGMENT;
    let weights: Vec<f64> = (i0..(i0 + DRAW_SEGMENT).min(n)).map(&w).collect();
    i0 + walk(&weights, left).0
}

/// Top-p's fixed point: a token's mass is exp(l - m) in units of 2^-32 of the best token's.
pub const TOP_P_MASS_BITS: i32 = 32;

/// A token's top-p mass (see [`VocabSampling`]): floor(exp(l - m) × 2^32), 0 for NaN.
pub fn top_p_mass(l: f32, m: f32) -> u64 {
    if l.is_nan() {
        return 0;
    }
    // `as` truncates (floor for the non-negative) and saturates.
    ((f64::from(l) - f64::from(m)).exp() * f64::from(2.0f32).powi(TOP_P_MASS_BITS)) as u64
}

/// The mass top-p's prefix must reach: ceil(top_p × total), in f64.
pub fn top_p_goal(top_p: f32, total: u64) -> u64 {
    (f64::from(top_p) * total as f64).ceil() as u64
}

/// Bits of a [`candidate_key`] above which [`top_p_key`] buckets the keys first.
const TOP_P_BUCKET_SHIFT: u32 = 53;

/// The lowest [`candidate_key`] top-p keeps (see [`VocabSampling`]), without sorting the
/// vocabulary: the keys are bucketed by their top 11 bits (the logit's sign, exponent and two
/// more bits), the buckets' masses are taken from the best bucket down until the goal is
/// reached, and only that bucket's keys are sorted and added one by one. Masses are
/// integers, so this is exactly the prefix a sort of the whole vocabulary gives.
fn top_p_key(logits: &[f32], m: f32, top_p: f32) -> u64 {
    let mass: Vec<u64> = logits.iter().map(|&l| top_p_mass(l, m)).collect();
    let total = mass.iter().fold(0u64, |a, &q| a.saturating_add(q));
    let goal = top_p_goal(top_p, total);
    let keys = || {
        logits
            .iter()
            .zip(&mass)
            .enumerate()
            .filter(|(_, (l, _))| !l.is_nan())
            .map(|(i, (&l, &q))| (candidate_key(i as u32, l), q))
    };
    let mut buckets = vec![(0u64, 0usize); 1 << (64 - TOP_P_BUCKET_SHIFT)];
    for (k, q) in keys() {
        if let Some(b) = buckets.get_mut((k >> TOP_P_BUCKET_SHIFT) as usize) {
            b.0 = b.0.saturating_add(q);
            b.1 += 1;
        }
    }
    let mut acc = 0u64;
    for (b, &(bm, count)) in buckets.iter().enumerate().rev() {
        let next = acc.saturating_add(bm);
        if count > 0 && next >= goal {
            let mut inside: Vec<(u64, u64)> = keys()
                .filter(|(k, _)| (k >> TOP_P_BUCKET_SHIFT) as usize == b)
                .collect();
            inside.sort_unstable_by_key(|k| std::cmp::Reverse(k.0));
            for &(k, q) in &inside {
                acc = acc.saturating_add(q);
                if acc >= goal {
                    return k;
                }
            }
            return inside.last().map_or(0, |&(k, _)| k);
        }
        acc = next;
    }
    0
}

/// The token whole-vocabulary sampling `how` picks from `logits` with the draw `r` (see
/// [`VocabSampling`]); ids are indices into `logits`.
pub fn sample_vocab(logits: &[f32], how: &VocabSampling, r: f64) -> u32 {
    let m = max_logit(logits);
    let t = how.temperature;
    let mt = m / t;
    if !m.is_finite() || !mt.is_finite() {
        return argmax(logits) as u32;
    }
    let keep_key = if how.top_p < 1.0 {
        top_p_key(logits, m, how.top_p)
    } else {
        0
    };
    let ln_min_p = how.ln_min_p();
    let (m64, mt64) = (f64::from(m), f64::from(mt));
    let weight = |i: usize| match logits.get(i) {
        Some(&l)
            if !l.is_nan()
                && (l == m || f64::from(l) - m64 >= ln_min_p)
                && candidate_key(i as u32, l) >= keep_key =>
        {
            (f64::from(l / t) - mt64).exp()
        }
        _ => 0.0,
    };
    draw_in_token_order(logits.len(), weight, r) as u32
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
    fn candidates_rank_by_total_cmp_then_the_lower_id() {
        let xs = [
            1.0,
            f32::NEG_INFINITY,
            -0.0,
            0.0,
            1.0,
            -2.5,
            f32::NAN,
            1.0,
            0.0,
            -f32::NAN,
        ];
        let mut want: Vec<(u32, f32)> =
            xs.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
        want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let bits = |c: &[(u32, f32)]| c.iter().map(|&(i, v)| (i, v.to_bits())).collect::<Vec<_>>();
        assert_eq!(bits(&top_candidates(&xs, 0, xs.len())), bits(&want));
        assert_eq!(bits(&top_candidates(&xs, 0, 4)), bits(&want[..4]));
        // Chunks merged in any order give the same list, ids offset by each chunk's start.
        let mut merged = Vec::new();
        add_candidates(&mut merged, &xs[5..], 5, 3);
        add_candidates(&mut merged, &xs[..5], 0, 3);
        assert_eq!(bits(&candidates_of(&merged)), bits(&want[..3]));
    }

    #[test]
    fn top_k_sampling_only_where_a_backend_can_sample() {
        let base = SamplerConfig::default();
        assert!(base.top_k_sampling(64).is_some());
        assert!(base.top_k_sampling(39).is_none());
        assert!(SamplerConfig::greedy().top_k_sampling(64).is_none());
        let all = SamplerConfig {
            top_k: 0,
            ..base.clone()
        };
        assert!(all.top_k_sampling(64).is_none());
        let penalty = SamplerConfig {
            repeat_penalty: 1.1,
            ..base
        };
        assert!(penalty.top_k_sampling(64).is_none());
        assert!(penalty.vocab_sampling().is_none());
        assert!(base.vocab_sampling().is_none());
        assert_eq!(
            all.vocab_sampling(),
            Some(VocabSampling {
                temperature: 0.8,
                top_p: 0.95,
                min_p: 0.05
            })
        );
        assert!(SamplerConfig {
            top_k: 0,
            ..SamplerConfig::greedy()
        }
        .vocab_sampling()
        .is_none());
    }

    #[test]
    fn slot_picks_on_the_host_are_what_the_sampler_samples() {
        // Greedy, top-k (with top-p and min-p) and whole-vocabulary configurations: the pick
        // built from a sampler's configuration and its next draw chooses the token the
        // sampler itself chooses, token after token.
        let configs = [
            SamplerConfig::greedy(),
            SamplerConfig {
                seed: 7,
                ..SamplerConfig::default()
            },
            SamplerConfig {
                seed: 9,
                top_k: 0,
                ..SamplerConfig::default()
            },
            SamplerConfig {
                seed: 11,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                temperature: 1.3,
                ..SamplerConfig::default()
            },
        ];
        for cfg in configs {
            let pick = if cfg.is_plain_greedy() {
                SlotPick::Greedy
            } else if let Some(how) = cfg.top_k_sampling(SLOT_TOP_K_MAX) {
                SlotPick::Sample(how, 0.0)
            } else {
                SlotPick::Vocab(cfg.vocab_sampling().unwrap(), 0.0)
            };
            let mut by_sampler = Sampler::new(cfg.clone());
            let mut by_pick = Sampler::new(cfg.clone());
            let mut distinct = std::collections::HashSet::new();
            for step in 0..40u64 {
                let logits = model_like_logits(3000, 1000 + step);
                let want = by_sampler.sample(&mut logits.clone());
                let p = match pick {
                    SlotPick::Greedy => pick,
                    _ => pick.with_draw(by_pick.draw()),
                };
                assert_eq!(p.pick_on_host(&logits), want, "{cfg:?} step {step}");
                distinct.insert(want);
            }
            // The sampled configurations really sample (the draws move the token).
            assert!(cfg.is_plain_greedy() || distinct.len() > 1, "{cfg:?}");
        }
    }

    /// Logits like a model's: a few high ones over a wide low tail (xorshift, seeded).
    fn model_like_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x >> 40) as f32 / (1u64 << 24) as f32;
                if x.is_multiple_of(97) {
                    8.0 + 6.0 * u
                } else {
                    12.0 * u - 6.0
                }
            })
            .collect()
    }

    #[test]
    fn vocab_draws_follow_the_softmax_in_token_order() {
        // Draws on a fine grid of r: each token's share of the grid is its probability, and
        // the token never goes down as r goes up (the draw walks the vocabulary in order).
        let logits = [1.0f32, -0.5, 2.0, f32::NAN, 0.25, f32::NEG_INFINITY, 2.0];
        for &(t, min_p) in &[(1.0f32, 0.0f32), (0.7, 0.0), (1.3, 0.3)] {
            let how = VocabSampling {
                temperature: t,
                top_p: 1.0,
                min_p,
            };
            let kept = |l: f32| l == 2.0 || f64::from(l) - 2.0 >= how.ln_min_p();
            let w: Vec<f64> = logits
                .iter()
                .map(|&l| {
                    if l.is_nan() || !kept(l) {
                        0.0
                    } else {
                        (f64::from(l / t) - f64::from(2.0 / t)).exp()
                    }
                })
                .collect();
            let total: f64 = w.iter().sum();
            let grid = 20000;
            let mut counts = vec![0usize; logits.len()];
            let mut prev = 0;
            for j in 0..grid {
                let tok = sample_vocab(&logits, &how, (j as f64 + 0.5) / grid as f64) as usize;
                assert!(tok >= prev, "t {t}: token {tok} after {prev}");
                prev = tok;
                counts[tok] += 1;
            }
            for (i, &c) in counts.iter().enumerate() {
                let want = w[i] / total;
                let got = c as f64 / grid as f64;
                assert!(
                    (got - want).abs() <= 1.0 / grid as f64,
                    "token {i}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn vocab_draws_cross_tiles_and_segments_exactly() {
        // Many tiles and a partial last one: the tree walk lands where a running sum of the
        // same weights passes the target, give or take the sums' rounding (checked to 1e-12
        // of the total), and r near 1 takes the last token with weight.
        let logits = model_like_logits(5000, 3);
        let how = VocabSampling {
            temperature: 0.8,
            top_p: 1.0,
            min_p: 0.0,
        };
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| (f64::from(l / 0.8) - f64::from(m / 0.8)).exp())
            .collect();
        let total: f64 = w.iter().sum();
        for j in 0..200 {
            let r = (j as f64 * 0.618_033_988_7) % 1.0;
            let tok = sample_vocab(&logits, &how, r) as usize;
            let before: f64 = w[..tok].iter().sum();
            let target = r * total;
            assert!(before <= target + 1e-12 * total, "r {r}: token {tok}");
            assert!(
                before + w[tok] > target - 1e-12 * total,
                "r {r}: token {tok}"
            );
        }
        let last = sample_vocab(&logits, &how, 1.0 - f64::EPSILON / 2.0);
        assert_eq!(last, 4999);
        let mut cut = logits.clone();
        cut[4000..].fill(f32::NEG_INFINITY);
        assert_eq!(sample_vocab(&cut, &how, 1.0 - f64::EPSILON / 2.0), 3999);
    }

    #[test]
    fn vocab_top_p_keeps_the_sorted_nucleus() {
        // The bucketed top-p keeps exactly what a sort of the whole vocabulary keeps.
        for (n, seed) in [(300usize, 1u64), (5000, 2), (5000, 3), (40000, 9)] {
            let mut logits = model_like_logits(n, seed);
            logits[n / 3] = logits[n / 2]; // a tie, ranked by the lower id
            logits[n / 4] = f32::NAN; // never kept, no mass
            if seed == 3 {
                // Hundreds of tokens a value: the cut falls among ties.
                logits
                    .iter_mut()
                    .for_each(|l| *l = (*l * 2.0).round() / 2.0);
            }
            let m = max_logit(&logits);
            let total: u64 = logits.iter().map(|&l| top_p_mass(l, m)).sum();
            let mut keys: Vec<u64> = (0..n)
                .filter(|&i| !logits[i].is_nan())
                .map(|i| candidate_key(i as u32, logits[i]))
                .collect();
            keys.sort_unstable_by(|a, b| b.cmp(a));
            for top_p in [0.0f32, 0.3, 0.9, 0.95, 0.999, 0.999_999_9] {
                let goal = top_p_goal(top_p, total);
                let mut acc = 0u64;
                let mut want = *keys.last().unwrap();
                for &k in &keys {
                    acc += top_p_mass(from_candidate_key(k).1, m);
                    if acc >= goal {
                        want = k;
                        break;
                    }
                }
                assert_eq!(top_p_key(&logits, m, top_p), want, "n {n} top-p {top_p}");
            }
            // Sampled tokens come from the nucleus only.
            let how = VocabSampling {
                temperature: 1.5,
                top_p: 0.3,
                min_p: 0.0,
            };
            let thr = top_p_key(&logits, m, 0.3);
            for j in 0..100 {
                let tok = sample_vocab(&logits, &how, j as f64 / 100.0);
                assert!(candidate_key(tok, logits[tok as usize]) >= thr);
            }
        }
    }

    #[test]
    fn vocab_sampling_edge_cases_fall_back_to_argmax() {
        let how = VocabSampling {
            temperature: 1.0,
            top_p: 1.0,
            min_p: 0.0,
        };
        let nan = f32::NAN;
        let inf = f32::INFINITY;
        assert_eq!(sample_vocab(&[nan, nan, nan], &how, 0.5), 0);
        assert_eq!(sample_vocab(&[f32::NEG_INFINITY; 4], &how, 0.9), 0);
        assert_eq!(sample_vocab(&[1.0, inf, 3.0, inf], &how, 0.1), 1);
        assert_eq!(sample_vocab(&[-1.0, nan, 5.0], &how, 0.999), 2);
        let cold = VocabSampling {
            temperature: 1e-40,
            ..how
        };
        assert_eq!(sample_vocab(&[1.0, 3.0, 3.0, 2.0], &cold, 0.9), 1);
        // min-p above 1 keeps only the largest.
        let strict = VocabSampling { min_p: 2.0, ..how };
        assert_eq!(sample_vocab(&[1.0, 3.0, 2.9, 2.0], &strict, 0.99), 1);
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
