//! Decode throughput of the batched forward pass at several batch sizes under one budget.
//!
//!     cargo run --release -p flea-runtime --example batch_bench -- MODEL.gguf VRAM_MIB \
//!         [BATCHES=1,8,32,64] [STEPS=8] [THREADS=2]
//!
//! One plan for every batch size (KV for the largest batch, so the same layers stream). For
//! each batch B: B sequences each get an 8-token prompt (one pass), then STEPS decode passes
//! of B rows (one token per sequence) are timed. Prints generated tokens per second and the
//! bytes streamed per pass. Greedy tokens; nothing here is a test.

use flea_io::{IoBackend, IoOptions};
use flea_model::{CpuBackend, Model};
use flea_runtime::{Links, Plan, PlanRequest, StreamedModel};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: batch_bench MODEL.gguf VRAM_MIB [BATCHES] [STEPS] [THREADS]".into());
    }
    let path = std::path::PathBuf::from(&args[1]);
    let vram: u64 = args[2].parse::<u64>()? << 20;
    let batches: Vec<usize> = args
        .get(3)
        .map_or("1,8,32,64", String::as_str)
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let steps: usize = args.get(4).map_or(Ok(8), |s| s.parse())?;
    let threads: usize = args.get(5).map_or(Ok(2), |s| s.parse())?;
    let max_b = batches.iter().copied().max().unwrap_or(1);
    let (n_ctx, prompt_len) = (64usize, 8usize);
    let model = Model::load(&path)?;
    let backend = CpuBackend::new(threads)?;
    let plan = Plan::build(
        &model,
        &PlanRequest {
            vram_budget: vram,
            ram_budget: 0,
            n_ctx,
            batch: max_b * prompt_len,
            n_seq: max_b,
            ring_depth: None,
            links: Links::default(),
            stages_units: false,
            device_scratch: 0,
            cpu_kv_layers: false,
        },
    )?;
    let streamed = plan
        .units
        .iter()
        .filter(|u| u.tier == flea_runtime::Tier::Disk)
        .count();
    println!(
        "{}: {} of {} units streamed, device budget {} MiB, {threads} threads",
        path.display(),
        streamed,
        plan.units.len(),
        vram >> 20
    );
    let io = IoOptions {
        backend: IoBackend::Pread,
        ..IoOptions::default()
    };
    let mut s = StreamedModel::new(
        &model,
        &backend,
        plan,
        &path,
        &io,
        n_ctx,
        max_b * prompt_len,
    )?;
    println!("batch  tok/s   s/pass  moved/pass");
    for r in flea_runtime::batch_bench::batched_decode(&mut s, &batches, steps, prompt_len)? {
        println!(
            "{:>5}  {:>6.2}  {:>6.3}  {:>8.1} MiB",
            r.batch,
            r.tokens_per_sec,
            r.seconds_per_pass,
            r.bytes_per_pass as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}
