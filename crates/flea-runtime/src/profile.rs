//! The hardware profile: link speeds measured by `flea probe`, read by the planner.

use crate::plan::Links;
use crate::{Result, RuntimeError};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Profile {
    pub date: String,
    pub cpu: String,
    pub threads: usize,
    /// The file the disk was measured with.
    pub disk_file: String,
    /// Sequential O_DIRECT read, best of the backends tried, bytes/s.
    pub disk_read_bps: f64,
    /// Every disk measurement: (backend and block size, bytes/s).
    pub disk_curve: Vec<(String, f64)>,
    /// Host memory read bandwidth with all threads, bytes/s.
    pub mem_read_bps: f64,
    /// Memory read bandwidth by thread count.
    pub mem_curve: Vec<(usize, f64)>,
    /// Which disk measurement was the best (a `disk_curve` name).
    #[serde(default)]
    pub disk_best: String,
    /// Bytes read per disk measurement (the start of `disk_file`).
    #[serde(default)]
    pub disk_bytes_per_measurement: u64,
    /// The disk sweep with its parameters.
    #[serde(default)]
    pub disk_sweep: Vec<DiskPoint>,
    /// Buffered sequential read of a range not in the page cache, bytes/s.
    #[serde(default)]
    pub buffered_read_bps: Option<f64>,
    /// The same range read again from the page cache, bytes/s.
    #[serde(default)]
    pub page_cache_read_bps: Option<f64>,
    /// Host memory copy bandwidth (bytes copied per second) by thread count.
    #[serde(default)]
    pub mem_copy_curve: Vec<(usize, f64)>,
    /// CPU, RAM, disk and GPU identification.
    #[serde(default)]
    pub hardware: serde_json::Value,
    /// Per-GPU link measurements (host<->device, device memory, mat-vec).
    #[serde(default)]
    pub gpus: Vec<serde_json::Value>,
}

/// One disk measurement of the probe's sweep.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DiskPoint {
    pub backend: String,
    pub direct: bool,
    /// Bytes per read call.
    pub chunk_bytes: u64,
    /// io_uring request size (pread: one request per call).
    pub block_bytes: u64,
    pub queue_depth: u32,
    pub bytes_per_sec: f64,
    /// What the reader was after any fallback (e.g. O_DIRECT refused by the filesystem).
    pub reader: String,
}

/// `$FLEA_PROFILE`, else `$XDG_CACHE_HOME/flea/profile.json`, else `~/.cache/flea/profile.json`.
pub fn default_path() -> PathBuf {
    if let Some(p) = std::env::var_os("FLEA_PROFILE") {
        return PathBuf::from(p);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("flea/profile.json");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/flea/profile.json")
}

impl Profile {
    pub fn load(path: &Path) -> Option<Profile> {
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)
                .map_err(|e| RuntimeError::Config(format!("{}: {e}", d.display())))?;
        }
        let s =
            serde_json::to_string_pretty(self).map_err(|e| RuntimeError::Config(e.to_string()))?;
        std::fs::write(path, s)
            .map_err(|e| RuntimeError::Config(format!("{}: {e}", path.display())))
    }

    pub fn links(&self) -> Links {
        Links {
            disk: self.disk_read_bps,
            host_to_device: None,
            device_memory: self.mem_read_bps,
            cpu_compute: None,
            measured: true,
            device_measured: false,
        }
    }
}

/// Read bandwidth of host memory with `threads` threads summing disjoint parts of a buffer
/// larger than any cache.
pub fn memory_read_bandwidth(threads: usize, bytes: usize) -> f64 {
    let words = bytes / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let per = words.div_ceil(threads.max(1));
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for part in buf.chunks(per) {
                s.spawn(move || {
                    // Eight independent sums keep the loads in flight.
                    let mut acc = [0u64; 8];
                    for c in part.chunks_exact(8) {
                        for i in 0..8 {
                            acc[i] = acc[i].wrapping_add(c[i]);
                        }
                    }
                    std::hint::black_box(acc);
                });
            }
        });
        best = best.max((words * 8) as f64 / t0.elapsed().as_secs_f64().max(1e-9));
    }
    best
}
