//! The timing loop behind the `batch_bench` examples (CPU in flea-runtime, GPU in flea-cuda):
//! decode throughput of the batched forward pass at several batch sizes under one plan.

use crate::{Result, StreamedModel};
use flea_model::backend::{Row, UnitStaging};
use flea_model::sampling::argmax;
use std::time::Instant;

/// One batch size's result.
#[derive(Clone, Copy, Debug)]
pub struct BatchResult {
    pub batch: usize,
    pub tokens_per_sec: f64,
    pub seconds_per_pass: f64,
    /// Bytes that left the host per pass: streamed from disk plus copied from the host cache.
    pub bytes_per_pass: u64,
}

/// For each batch size B: B sequences get a `prompt_len`-token prompt (one pass), then
/// `steps` decode passes of B rows are timed (greedy). The executor needs `n_seq` ≥ the
/// largest B and a capacity of B × `prompt_len` rows.
pub fn batched_decode<B: UnitStaging>(
    s: &mut StreamedModel<'_, B>,
    batches: &[usize],
    steps: usize,
    prompt_len: usize,
) -> Result<Vec<BatchResult>> {
    let vocab = s.model.cfg.n_vocab;
    let mut out = Vec::with_capacity(batches.len());
    for &b in batches {
        let mut tokens = Vec::new();
        let mut rows = Vec::new();
        let mut last = Vec::new();
        for seq in 0..b {
            for p in 0..prompt_len {
                tokens.push((1 + (seq * 7 + p * 13) % (vocab - 1)) as u32);
                rows.push(Row { seq, pos: p });
            }
            last.push(rows.len() - 1);
        }
        let logits = s.step(&tokens, &rows, &last)?;
        let mut next: Vec<u32> = logits
            .chunks_exact(vocab)
            .map(|l| argmax(l) as u32)
            .collect();
        let moved = |s: &StreamedModel<'_, B>| s.stats.bytes_streamed + s.stats.bytes_host_cache;
        let bytes0 = moved(s);
        let t0 = Instant::now();
        for k in 0..steps {
            let rows: Vec<Row> = (0..b)
                .map(|seq| Row {
                    seq,
                    pos: prompt_len + k,
                })
                .collect();
            let want: Vec<usize> = (0..b).collect();
            let logits = s.step(&next, &rows, &want)?;
            next = logits
                .chunks_exact(vocab)
                .map(|l| argmax(l) as u32)
                .collect();
        }
        let secs = t0.elapsed().as_secs_f64();
        out.push(BatchResult {
            batch: b,
            tokens_per_sec: (b * steps) as f64 / secs.max(1e-9),
            seconds_per_pass: secs / steps.max(1) as f64,
            bytes_per_pass: (moved(s) - bytes0) / steps.max(1) as u64,
        });
    }
    Ok(out)
}
