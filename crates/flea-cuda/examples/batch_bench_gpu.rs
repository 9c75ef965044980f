//! Batched decode on the GPU under a VRAM budget: B sequences share every weight pass
//! (units not resident are copied from the pinned host cache once per pass).
//!
//!     batch_bench_gpu MODEL.gguf VRAM_MIB [BATCHES=1,8,32,64] [STEPS=8]
//!
//! Prints generated tokens per second per batch size, the bytes copied per pass and the
//! host→device floor of one pass. Greedy tokens; nothing here is a test.

use flea_cuda::CudaBackend;
use flea_io::IoOptions;
use flea_model::Model;
use flea_runtime::{Links, Plan, PlanRequest, StreamedModel};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: batch_bench_gpu MODEL.gguf VRAM_MIB [BATCHES] [STEPS]".into());
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
    let max_b = batches.iter().copied().max().unwrap_or(1);
    let (n_ctx, prompt_len) = (64usize, 8usize);
    let model = Model::load(&path)?;
    let cuda = CudaBackend::new(0)?;
    let h2d = cuda.measure_h2d_bandwidth(256 << 20, 3)?;
    let plan = Plan::build(
        &model,
        &PlanRequest {
            vram_budget: vram,
            ram_budget: 1 << 40,
            n_ctx,
            batch: max_b * prompt_len,
            n_seq: max_b,
            ring_depth: None,
            links: Links {
                host_to_device: Some(h2d),
                device_memory: cuda.measure_copy_bandwidth(256 << 20, 3)?,
                ..Links::default()
            },
            stages_units: true,
            device_scratch: cuda.scratch_bytes(&model, max_b * prompt_len),
            cpu_kv_layers: false,
        },
    )?;
    let p = plan.pass_bytes();
    println!(
        "{} on {}: {} MiB resident, {} MiB copied from the host cache per pass (floor {:.1} ms at {:.1} GB/s), VRAM budget {} MiB",
        path.display(),
        cuda.device_name(),
        p.resident >> 20,
        (p.host_cache + p.disk) >> 20,
        (p.host_cache + p.disk) as f64 / h2d * 1e3,
        h2d / 1e9,
        vram >> 20
    );
    let mut s = StreamedModel::new(
        &model,
        &cuda,
        plan,
        &path,
        &IoOptions::default(),
        n_ctx,
        max_b * prompt_len,
    )?;
    println!("batch  tok/s   s/pass  copied/pass");
    let results = flea_runtime::batch_bench::batched_decode(&mut s, &batches, steps, prompt_len)?;
    for r in &results {
        println!(
            "{:>5}  {:>7.2}  {:>6.3}  {:>8.1} MiB",
            r.batch,
            r.tokens_per_sec,
            r.seconds_per_pass,
            r.bytes_per_pass as f64 / (1 << 20) as f64
        );
    }
    if let (Some(first), Some(last)) = (results.first(), results.last()) {
        println!(
            "batch {} / batch {}: {:.1}x; device arena peak {} MiB of {} MiB",
            last.batch,
            first.batch,
            last.tokens_per_sec / first.tokens_per_sec,
            s.device.peak() >> 20,
            s.device.budget >> 20
        );
    }
    Ok(())
}
