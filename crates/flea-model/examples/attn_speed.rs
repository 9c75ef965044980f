//! One decode row's CPU attention over a long context, 13b-shaped by default (40 heads of
//! 128, no grouping), for timing the attention path alone:
//!
//! cargo run --release -p flea-model --example attn_speed -- [CONTEXT] [THREADS] [HEADS] [KV_HEADS] [HEAD_DIM] [LAYERS]
//!
//! With LAYERS > 1 each call reads the next layer's cache, so a cache larger than the CPU's
//! caches is read from memory, as in a decode step.

use flea_model::backend::{AttnParams, Backend, KvShape, Row};
use flea_model::CpuBackend;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (ctx, threads, n_head, n_head_kv, hd) =
        (arg(1, 540), arg(2, 1), arg(3, 40), arg(4, 40), arg(5, 128));
    let n_layers = arg(6, 1).max(1);
    let b = CpuBackend::new(threads)?;
    let shape = KvShape {
        n_layers,
        n_ctx: ctx + 1,
        n_head_kv,
        head_dim: hd,
        n_seq: 1,
    };
    let mut kv = b.alloc_kv(shape)?;
    let kvd = n_head_kv * hd;
    let val = |i: usize| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5;
    // Fill the cache: ctx rows, one batch.
    let rows: Vec<Row> = (0..ctx).map(|p| Row { seq: 0, pos: p }).collect();
    let mut k = b.alloc_act(ctx, kvd)?;
    let mut v = b.alloc_act(ctx, kvd)?;
    let mut q = b.alloc_act(ctx, n_head * hd)?;
    let kvals: Vec<f32> = (0..ctx * kvd).map(val).collect();
    b.write(&kvals, &mut k)?;
    b.write(&kvals, &mut v)?;
    let qvals: Vec<f32> = (0..ctx * n_head * hd).map(|i| val(i + 17)).collect();
    b.write(&qvals, &mut q)?;
    let mut out = b.alloc_act(ctx, n_head * hd)?;
    let mut p = AttnParams {
        layer: 0,
        rows: &rows,
        n_head,
        n_head_kv,
        head_dim: hd,
        window: None,
        scale: 0.088,
    };
    for layer in 0..n_layers {
        p.layer = layer;
        b.attention(ctx, &q, &k, &v, &mut kv, &p, &mut out)?;
    }
    // Now one decode row at the last position, repeatedly.
    let row = [Row { seq: 0, pos: ctx }];
    let mut p1 = AttnParams { rows: &row, ..p };
    let (q1, k1, v1) = (
        b.alloc_act(1, n_head * hd)?,
        b.alloc_act(1, kvd)?,
        b.alloc_act(1, kvd)?,
    );
    let mut o1 = b.alloc_act(1, n_head * hd)?;
    let reps = 200;
    let t = Instant::now();
    for r in 0..reps {
        p1.layer = r % n_layers;
        b.attention(1, &q1, &k1, &v1, &mut kv, &p1, &mut o1)?;
    }
    let s = t.elapsed().as_secs_f64() / reps as f64;
    println!("attention, 1 row over {ctx} keys, {n_head}x{hd} heads ({n_head_kv} kv), {threads} threads: {:.1} us", s * 1e6);
    Ok(())
}
