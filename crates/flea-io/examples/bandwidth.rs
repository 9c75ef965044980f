//! Sequential read bandwidth of each backend / block size / queue depth.
//!
//! `cargo run --release -p flea-io --example bandwidth -- [DIR] [SIZE_MIB] [REPS]`
//!
//! Creates a SIZE_MIB (default 1024) file in DIR (default the current directory), evicts it from
//! the page cache (fsync + POSIX_FADV_DONTNEED) before every run so that buffered runs are cold
//! too, prints a markdown table (median, min and max of REPS runs, default 3), and deletes the
//! file.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use flea_io::{open_reader, sequential_read_bandwidth, IoBackend, IoOptions};

struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn evict(path: &Path) {
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.sync_all();
        // SAFETY: advisory call on a valid descriptor; errors are irrelevant for a benchmark.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).map_or(".", String::as_str));
    let mib: usize = args.get(2).map_or(Ok(1024), |s| s.parse())?;
    let reps: usize = args.get(3).map_or(Ok(3), |s| s.parse())?;
    let reps = reps.max(1);
    let path = dir.join(format!("flea-io-bandwidth-{}.bin", std::process::id()));
    let _guard = Remove(path.clone());
    {
        let mut f = std::fs::File::create(&path)?;
        let mut block = vec![0u8; 1 << 20];
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..mib {
            for b in block.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            f.write_all(&block)?;
        }
        f.sync_all()?;
    }
    let gib = |bps: f64| bps / (1u64 << 30) as f64;
    println!("file: {} ({mib} MiB)", path.display());
    println!(
        "| backend | direct | block | qd | read() size | GiB/s median | min | max | describe() |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let run = |opts: IoOptions, chunk: usize| -> Result<(), Box<dyn std::error::Error>> {
        let desc = open_reader(&path, &opts)?.describe();
        let mut bws = Vec::with_capacity(reps);
        for _ in 0..reps {
            evict(&path);
            bws.push(gib(sequential_read_bandwidth(&path, &opts, chunk)?));
        }
        bws.sort_by(f64::total_cmp);
        let qd = if opts.backend == IoBackend::IoUring {
            opts.queue_depth.to_string()
        } else {
            "-".to_string()
        };
        let block = if opts.backend == IoBackend::IoUring {
            format!("{} KiB", opts.block_size >> 10)
        } else {
            "-".to_string()
        };
        println!(
            "| {} | {} | {block} | {qd} | {} KiB | {:.2} | {:.2} | {:.2} | {desc} |",
            opts.backend,
            opts.direct,
            chunk >> 10,
            bws[bws.len() / 2],
            bws[0],
            bws[bws.len() - 1],
        );
        Ok(())
    };
    let sizes = [256 << 10, 1 << 20, 4 << 20];
    for direct in [true, false] {
        for &chunk in sizes.iter().chain([64usize << 20].iter()) {
            run(
                IoOptions {
                    backend: IoBackend::Pread,
                    direct,
                    ..Default::default()
                },
                chunk,
            )?;
        }
        for &bs in &sizes {
            for qd in [1, 4, 16] {
                run(
                    IoOptions {
                        backend: IoBackend::IoUring,
                        direct,
                        block_size: bs,
                        queue_depth: qd,
                        ..Default::default()
                    },
                    64 << 20,
                )?;
            }
        }
    }
    for &chunk in sizes.iter().chain([64usize << 20].iter()) {
        run(
            IoOptions {
                backend: IoBackend::Mmap,
                direct: false,
                ..Default::default()
            },
            chunk,
        )?;
    }
    Ok(())
}
