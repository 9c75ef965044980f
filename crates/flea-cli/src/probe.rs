//! `flea probe`: measure this machine's links and save the hardware profile the planner reads.
//!
//! * Disk: sequential reads of the first `--max-bytes` of a real file on the models'
//!   filesystem with O_DIRECT: pread over a sweep of chunk sizes, io_uring over block sizes ×
//!   queue depths (like fio's `rw=read` jobs); the best is what the planner uses, the whole
//!   curve is saved. Then buffered reads: cold (the range dropped from the page cache first)
//!   and again from the page cache.
//! * Host memory: read bandwidth and copy bandwidth by thread count.
//! * GPUs (a `--features cuda` build with a driver): pinned and pageable copies each way,
//!   device memory bandwidth, the Q4_K mat-vec's weight throughput.
//! * The hardware: CPU, RAM, the disk under the file, GPUs with their PCIe links.

use crate::hw;
use anyhow::{Context, Result};
use flea_io::{AlignedBuf, IoBackend, IoOptions, ALIGN};
use flea_runtime::fmt_size;
use flea_runtime::profile::{default_path, memory_read_bandwidth, DiskPoint, Profile};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct ProbeArgs {
    /// A large file on the models' filesystem to read (e.g. a model).
    #[arg(long)]
    pub file: PathBuf,
    /// Threads for the memory measurements (default: all cores).
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Bytes read from the file per disk measurement (default 1GiB; the file's size if smaller).
    #[arg(long, default_value = "1GiB")]
    pub max_bytes: String,
    /// A shorter sweep (fewer block sizes and queue depths).
    #[arg(long)]
    pub quick: bool,
    /// Save the profile here instead of the default (~/.cache/flea/profile.json).
    #[arg(long)]
    pub save: Option<PathBuf>,
}

/// Read `[0, limit)` of `file` sequentially in `chunk`-byte reads; bytes/s and what the reader was.
fn read_bandwidth(
    file: &Path,
    opts: &IoOptions,
    chunk: usize,
    limit: u64,
) -> Result<(f64, String)> {
    let size = flea_io::file_len(file)?.min(limit);
    let mut reader = flea_io::open_reader(file, opts)?;
    let mut buf = AlignedBuf::new(chunk.saturating_add(2 * ALIGN))?;
    let start = Instant::now();
    let mut off = 0u64;
    let mut sink = 0u8;
    while off < size {
        let len = (size - off).min(chunk as u64) as usize;
        let r = reader.read(off, len, &mut buf)?;
        // Touch the data so the read cannot be skipped.
        sink ^= buf.as_slice().get(r.start).copied().unwrap_or(0);
        off += len as u64;
    }
    std::hint::black_box(sink);
    Ok((
        size as f64 / start.elapsed().as_secs_f64().max(1e-9),
        reader.describe(),
    ))
}

/// Copy bandwidth of host memory: `threads` threads each copying their part of a buffer
/// larger than any cache; bytes copied per second (each read once and written once).
fn memory_copy_bandwidth(threads: usize, bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let per = bytes.div_ceil(threads.max(1));
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for (d, sp) in dst.chunks_mut(per).zip(src.chunks(per)) {
                s.spawn(move || d.copy_from_slice(sp));
            }
        });
        best = best.max(bytes as f64 / t0.elapsed().as_secs_f64().max(1e-9));
    }
    std::hint::black_box(&dst);
    best
}

/// A line above the progress bar, or plain stderr when the bar is hidden (not a terminal).
fn say(pb: &indicatif::ProgressBar, msg: String) {
    if pb.is_hidden() {
        eprintln!("{msg}");
    } else {
        pb.println(msg);
    }
}

fn bar(len: u64) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len}  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b
}

pub fn run(a: ProbeArgs) -> Result<()> {
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let limit = flea_runtime::parse_size(&a.max_bytes)?;
    let file = &a.file;
    let size = flea_io::file_len(file)
        .with_context(|| format!("reading {}", file.display()))?
        .min(limit);
    let hardware = hw::identify(Some(file));

    // (backend, chunk per read call, io_uring block size, queue depth)
    let mut sweep: Vec<(IoBackend, usize, usize, u32)> = Vec::new();
    let pread_chunks: &[usize] = if a.quick {
        &[1 << 20, 16 << 20]
    } else {
        &[256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
    };
    for &c in pread_chunks {
        sweep.push((IoBackend::Pread, c, c.min(1 << 20), 1));
    }
    let blocks: &[usize] = if a.quick {
        &[1 << 20]
    } else {
        &[128 << 10, 1 << 20, 4 << 20]
    };
    let depths: &[u32] = if a.quick { &[4, 16] } else { &[1, 4, 16, 32] };
    for &b in blocks {
        for &q in depths {
            // Chunks big enough for every request of the queue, like a streamed layer.
            sweep.push((IoBackend::IoUring, (b * q as usize).max(16 << 20), b, q));
        }
    }
    let mut mem_threads: Vec<usize> = std::iter::successors(Some(1usize), |t| t.checked_mul(2))
        .take_while(|t| *t <= threads)
        .collect();
    if mem_threads.last() != Some(&threads) {
        mem_threads.push(threads);
    }
    #[cfg(feature = "cuda")]
    let n_gpus = flea_cuda::device_count();
    #[cfg(not(feature = "cuda"))]
    let n_gpus = 0usize;
    let steps = sweep.len() + 3 + 2 * mem_threads.len() + n_gpus;
    let pb = bar(steps as u64);

    let mut disk_sweep = Vec::new();
    let mut curve = Vec::new();
    for (backend, chunk, block, qd) in sweep {
        pb.set_message(format!(
            "disk {backend} O_DIRECT block {} qd {qd}",
            fmt_size(block as u64)
        ));
        let opts = IoOptions {
            backend,
            direct: true,
            queue_depth: qd,
            block_size: block,
            ..IoOptions::default()
        };
        let (bps, reader) = read_bandwidth(file, &opts, chunk, size)
            .with_context(|| format!("reading {}", file.display()))?;
        let name = format!(
            "{backend} O_DIRECT chunk {} block {} qd {qd}",
            fmt_size(chunk as u64),
            fmt_size(block as u64)
        );
        say(
            &pb,
            format!("disk: {name}: {:.2} GB/s ({reader})", bps / 1e9),
        );
        curve.push((name, bps));
        disk_sweep.push(DiskPoint {
            backend: backend.to_string(),
            direct: true,
            chunk_bytes: chunk as u64,
            block_bytes: block as u64,
            queue_depth: qd,
            bytes_per_sec: bps,
            reader,
        });
        pb.inc(1);
    }
    let disk = curve.iter().map(|c| c.1).fold(0.0, f64::max);
    let best = curve
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|c| c.0.clone())
        .unwrap_or_default();

    // Buffered, best of 3 (single passes swing by ±25% on a busy machine): evict the range
    // (a read that drops each chunk after it), time a cold read that keeps the pages, then
    // time the same range again from the page cache.
    let buffered = |drop_cache: bool| IoOptions {
        backend: IoBackend::Pread,
        direct: false,
        drop_cache,
        ..IoOptions::default()
    };
    let (mut cold, mut cached) = (0.0f64, 0.0f64);
    for _ in 0..3 {
        pb.set_message("buffered: evict, cold read, page-cache read");
        read_bandwidth(file, &buffered(true), 4 << 20, size)?;
        cold = cold.max(read_bandwidth(file, &buffered(false), 4 << 20, size)?.0);
        cached = cached.max(read_bandwidth(file, &buffered(false), 4 << 20, size)?.0);
        pb.inc(1);
    }
    say(
        &pb,
        format!(
            "disk: buffered pread, 4 MiB reads, best of 3: cold {:.2} GB/s, from the page cache {:.2} GB/s",
            cold / 1e9,
            cached / 1e9
        ),
    );
    // Leave the page cache as we found it (mostly): other work on the machine needs it more.
    read_bandwidth(file, &buffered(true), 4 << 20, size)?;

    let mut mem_curve = Vec::new();
    let mut copy_curve = Vec::new();
    for &t in &mem_threads {
        pb.set_message(format!("memory: {t} threads"));
        let r = memory_read_bandwidth(t, 512 << 20);
        pb.inc(1);
        let c = memory_copy_bandwidth(t, 512 << 20);
        pb.inc(1);
        say(
            &pb,
            format!(
                "memory: {t} threads: read {:.1} GB/s, copy {:.1} GB/s",
                r / 1e9,
                c / 1e9
            ),
        );
        mem_curve.push((t, r));
        copy_curve.push((t, c));
    }
    let mem = mem_curve.iter().map(|c| c.1).fold(0.0, f64::max);

    let gpus = probe_gpus(n_gpus, &pb)?;
    pb.finish_and_clear();

    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let p = Profile {
        date,
        cpu: hardware.cpu.clone(),
        threads,
        disk_file: file.display().to_string(),
        disk_read_bps: disk,
        disk_curve: curve,
        mem_read_bps: mem,
        mem_curve,
        disk_best: best,
        disk_bytes_per_measurement: size,
        disk_sweep,
        buffered_read_bps: Some(cold),
        page_cache_read_bps: Some(cached),
        mem_copy_curve: copy_curve,
        hardware: serde_json::to_value(&hardware)?,
        gpus,
    };
    let path = a.save.unwrap_or_else(default_path);
    p.save(&path)?;
    println!("{}", serde_json::to_string_pretty(&p)?);
    eprintln!(
        "best disk read: {:.2} GB/s ({}); buffered cold {:.2} GB/s, page cache {:.2} GB/s; memory read {:.1} GB/s; {} {}",
        disk / 1e9,
        p.disk_best,
        cold / 1e9,
        cached / 1e9,
        mem / 1e9,
        hardware.disk_line(),
        if hardware.gpus.is_empty() { String::new() } else { format!("; GPUs: {}", hardware.gpu_line()) }
    );
    eprintln!("saved {}", path.display());
    Ok(())
}

#[cfg(feature = "cuda")]
fn probe_gpus(n_gpus: usize, pb: &indicatif::ProgressBar) -> Result<Vec<serde_json::Value>> {
    let mut gpus = Vec::with_capacity(n_gpus);
    for g in 0..n_gpus {
        pb.set_message(format!("GPU {g}"));
        match flea_cuda::probe::probe_gpu(g, 256 << 20, 5) {
            Ok(l) => {
                say(pb, format!(
                    "gpu {g} {}: pinned h2d {:.1} GB/s d2h {:.1} GB/s, pageable h2d {:.1} d2h {:.1}, device copy {:.0} GB/s, Q4_K mat-vec {:.0} GB/s of weights",
                    l.name,
                    l.pinned_h2d_bps / 1e9,
                    l.pinned_d2h_bps / 1e9,
                    l.pageable_h2d_bps / 1e9,
                    l.pageable_d2h_bps / 1e9,
                    l.device_copy_bps / 1e9,
                    l.q4k_matvec_weight_bps / 1e9
                ));
                gpus.push(serde_json::to_value(&l)?);
            }
            Err(e) => {
                say(pb, format!("gpu {g}: {e}"));
                gpus.push(serde_json::json!({"ordinal": g, "error": e.to_string()}));
            }
        }
        pb.inc(1);
    }
    Ok(gpus)
}

/// Without the `cuda` feature there is nothing to measure on a GPU.
#[cfg(not(feature = "cuda"))]
fn probe_gpus(_n_gpus: usize, _pb: &indicatif::ProgressBar) -> Result<Vec<serde_json::Value>> {
    Ok(Vec::new())
}
