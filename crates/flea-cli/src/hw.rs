//! What machine this is (CPU, RAM, the disk under a file, GPUs) and a clock/temperature
//! watch that runs beside a benchmark and flags runs whose clocks dropped.
//!
//! Sources: /proc/cpuinfo, /proc/meminfo, sysfs (`/sys/dev/block/M:m`, cpufreq) and
//! `nvidia-smi --query-gpu` when it is on the PATH. Missing sources give empty fields, never
//! errors: a benchmark must run on a machine without a GPU or without cpufreq.

use serde::Serialize;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Default, Serialize)]
pub struct Hardware {
    pub cpu: String,
    pub logical_cpus: usize,
    pub ram_bytes: u64,
    pub kernel: String,
    /// The block device under the measured file (when one was given).
    pub disk: Option<Disk>,
    pub gpus: Vec<Gpu>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Disk {
    /// Kernel name of the whole device, e.g. `nvme0n1`, `vda`.
    pub device: String,
    /// `device/model` from sysfs, or a description of what sysfs has instead.
    pub model: String,
    pub rotational: Option<bool>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Gpu {
    pub index: usize,
    pub name: String,
    pub memory_mib: Option<u64>,
    pub pcie_gen_current: Option<u32>,
    pub pcie_gen_max: Option<u32>,
    pub pcie_width_current: Option<u32>,
    pub pcie_width_max: Option<u32>,
    pub driver: String,
}

impl Hardware {
    /// One line for tables: GPU names or the CPU.
    pub fn gpu_line(&self) -> String {
        if self.gpus.is_empty() {
            return "none".into();
        }
        let names: Vec<String> = self
            .gpus
            .iter()
            .map(|g| match g.memory_mib {
                Some(m) => format!("{} {} GiB", g.name, m / 1024),
                None => g.name.clone(),
            })
            .collect();
        names.join(", ")
    }

    pub fn disk_line(&self) -> String {
        match &self.disk {
            Some(d) => format!("{} ({})", d.model, d.device),
            None => "unknown".into(),
        }
    }
}

fn read(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

pub fn cpu_model() -> String {
    read("/proc/cpuinfo")
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn ram_bytes() -> u64 {
    read("/proc/meminfo")
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("MemTotal:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Identify this machine; `file` (a model) picks the disk to describe.
pub fn identify(file: Option<&Path>) -> Hardware {
    Hardware {
        cpu: cpu_model(),
        logical_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        ram_bytes: ram_bytes(),
        kernel: read("/proc/sys/kernel/osrelease").unwrap_or_default(),
        disk: file.and_then(disk_of),
        gpus: nvidia_gpus(),
    }
}

/// The whole block device holding `file`, from its st_dev through /sys/dev/block.
pub fn disk_of(file: &Path) -> Option<Disk> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(file).ok()?.dev();
    // Linux's dev_t encoding (glibc's gnu_dev_major/minor).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let mut sys = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    if sys.join("partition").exists() {
        sys = sys.parent()?.to_path_buf();
    }
    // Device-mapper / md devices: describe the first device underneath.
    if let Some(slave) = std::fs::read_dir(sys.join("slaves"))
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
    {
        if let Ok(p) = std::fs::canonicalize(slave.path()) {
            sys = if p.join("partition").exists() {
                p.parent().map(Path::to_path_buf).unwrap_or(p)
            } else {
                p
            };
        }
    }
    let device = sys.file_name()?.to_string_lossy().into_owned();
    let model = match (
        read(sys.join("device/model")),
        read(sys.join("device/vendor")),
    ) {
        (Some(m), _) if !m.is_empty() => m,
        (_, Some(v)) if v == "0x1af4" => "virtio disk (sysfs has no model)".into(),
        (_, Some(v)) => format!("vendor {v} (sysfs has no model)"),
        _ => "sysfs has no model".into(),
    };
    let rotational = read(sys.join("queue/rotational")).map(|r| r == "1");
    Some(Disk {
        device,
        model,
        rotational,
    })
}

fn nvidia_smi(query: &str) -> Option<String> {
    let out = Command::new("nvidia-smi")
        .arg(format!("--query-gpu={query}"))
        .arg("--format=csv,noheader,nounits")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn num<T: std::str::FromStr>(s: Option<&str>) -> Option<T> {
    s.and_then(|v| v.trim().parse().ok())
}

/// GPUs as `nvidia-smi` lists them (empty when it is missing or fails).
pub fn nvidia_gpus() -> Vec<Gpu> {
    let Some(out) = nvidia_smi(
        "index,name,memory.total,pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current,pcie.link.width.max,driver_version",
    ) else {
        return Vec::new();
    };
    out.lines()
        .take(64)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            Some(Gpu {
                index: num(f.first().copied())?,
                name: f.get(1)?.to_string(),
                memory_mib: num(f.get(2).copied()),
                pcie_gen_current: num(f.get(3).copied()),
                pcie_gen_max: num(f.get(4).copied()),
                pcie_width_current: num(f.get(5).copied()),
                pcie_width_max: num(f.get(6).copied()),
                driver: f.get(7).map(|s| s.to_string()).unwrap_or_default(),
            })
        })
        .collect()
}

/// CPU clock in MHz per core: cpufreq's scaling_cur_freq, else /proc/cpuinfo's "cpu MHz".
fn cpu_mhz() -> (Vec<f64>, &'static str) {
    let mut v = Vec::new();
    for i in 0..1024 {
        match read(format!(
            "/sys/devices/system/cpu/cpu{i}/cpufreq/scaling_cur_freq"
        )) {
            Some(k) => match k.parse::<f64>() {
                Ok(khz) => v.push(khz / 1e3),
                Err(_) => break,
            },
            None => break,
        }
    }
    if !v.is_empty() {
        return (v, "cpufreq");
    }
    let v = read("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("cpu MHz"))
                .filter_map(|l| l.split(':').nth(1)?.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default();
    (v, "/proc/cpuinfo")
}

/// nvidia-smi's throttle-reason bits that mean the clocks were pulled down (not idle, not
/// application clocks): SW power cap, HW slowdown, SW thermal, HW thermal, HW power brake.
const THROTTLE_BITS: u64 = 0x4 | 0x8 | 0x20 | 0x40 | 0x80;
const IDLE_BIT: u64 = 0x1;

#[derive(Clone, Debug, Default)]
struct Samples {
    count: usize,
    cpu_min: f64,
    cpu_max: f64,
    cpu_source: &'static str,
    /// Per GPU: (min busy SM MHz, max SM MHz, max temperature C, OR of throttle bits, peak MiB used).
    gpu: Vec<(f64, f64, f64, u64, u64)>,
}

/// What the watch saw during one run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ThermalReport {
    pub samples: usize,
    pub cpu_mhz_min: Option<f64>,
    pub cpu_mhz_max: Option<f64>,
    pub cpu_mhz_source: String,
    pub gpu_sm_mhz_min_busy: Vec<f64>,
    pub gpu_sm_mhz_max: Vec<f64>,
    pub gpu_temp_c_max: Vec<f64>,
    pub gpu_throttle_reasons: Vec<String>,
    pub gpu_memory_used_peak_mib: Vec<u64>,
    /// True when a clock dropped by more than 10% during the run or a throttle reason fired.
    pub flagged: bool,
    pub notes: Vec<String>,
}

/// Samples clocks every `interval` on a thread until [`Watch::stop`].
pub struct Watch {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Samples>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// At most this many samples per run are taken (a bound on the watch's loop, ~1 h at 0.5 s).
const MAX_SAMPLES: usize = 7200;

impl Watch {
    pub fn start(interval: Duration, gpus: bool) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Samples {
            cpu_min: f64::MAX,
            ..Samples::default()
        }));
        let (s2, st2) = (samples.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut next = Instant::now();
            for _ in 0..MAX_SAMPLES {
                if st2.load(Ordering::Relaxed) {
                    break;
                }
                sample(&s2, gpus);
                next += interval;
                // Sleep in short steps so stop() returns quickly.
                while Instant::now() < next && !st2.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        Watch {
            stop,
            samples,
            handle: Some(handle),
        }
    }

    pub fn stop(mut self) -> ThermalReport {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        let s = self.samples.lock().map(|s| s.clone()).unwrap_or_default();
        report(&s)
    }
}

fn sample(into: &Mutex<Samples>, gpus: bool) {
    let (mhz, source) = cpu_mhz();
    let gpu_rows: Vec<(f64, f64, u64, u64)> = if gpus {
        nvidia_smi("clocks.sm,temperature.gpu,clocks_throttle_reasons.active,memory.used")
            .map(|out| {
                out.lines()
                    .take(64)
                    .map(|l| {
                        let f: Vec<&str> = l.split(',').map(str::trim).collect();
                        let bits = f
                            .get(2)
                            .and_then(|b| u64::from_str_radix(b.trim_start_matches("0x"), 16).ok())
                            .unwrap_or(0);
                        (
                            num(f.first().copied()).unwrap_or(0.0),
                            num(f.get(1).copied()).unwrap_or(0.0),
                            bits,
                            num(f.get(3).copied()).unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let Ok(mut s) = into.lock() else { return };
    s.count += 1;
    s.cpu_source = source;
    for m in mhz {
        s.cpu_min = s.cpu_min.min(m);
        s.cpu_max = s.cpu_max.max(m);
    }
    if s.gpu.len() < gpu_rows.len() {
        s.gpu.resize(gpu_rows.len(), (f64::MAX, 0.0, 0.0, 0, 0));
    }
    for (g, (sm, temp, bits, used)) in s.gpu.iter_mut().zip(gpu_rows) {
        if bits & IDLE_BIT == 0 {
            g.0 = g.0.min(sm);
        }
        g.1 = g.1.max(sm);
        g.2 = g.2.max(temp);
        g.3 |= bits & !IDLE_BIT;
        g.4 = g.4.max(used);
    }
}

fn throttle_names(bits: u64) -> Vec<&'static str> {
    [
        (0x2, "applications clocks"),
        (0x4, "SW power cap"),
        (0x8, "HW slowdown"),
        (0x10, "sync boost"),
        (0x20, "SW thermal"),
        (0x40, "HW thermal"),
        (0x80, "HW power brake"),
        (0x100, "display clock"),
    ]
    .iter()
    .filter(|(b, _)| bits & b != 0)
    .map(|(_, n)| *n)
    .collect()
}

fn report(s: &Samples) -> ThermalReport {
    let mut r = ThermalReport {
        samples: s.count,
        cpu_mhz_source: s.cpu_source.to_string(),
        ..ThermalReport::default()
    };
    if s.cpu_max > 0.0 {
        r.cpu_mhz_min = Some(s.cpu_min);
        r.cpu_mhz_max = Some(s.cpu_max);
        if s.cpu_min < 0.9 * s.cpu_max {
            r.flagged = true;
            r.notes.push(format!(
                "CPU clock dropped to {:.0} MHz (max {:.0})",
                s.cpu_min, s.cpu_max
            ));
        }
    }
    for (i, g) in s.gpu.iter().enumerate() {
        let min_busy = if g.0 == f64::MAX { g.1 } else { g.0 };
        r.gpu_sm_mhz_min_busy.push(min_busy);
        r.gpu_sm_mhz_max.push(g.1);
        r.gpu_temp_c_max.push(g.2);
        r.gpu_memory_used_peak_mib.push(g.4);
        let names = throttle_names(g.3);
        r.gpu_throttle_reasons.push(names.join("+"));
        if g.3 & THROTTLE_BITS != 0 {
            r.flagged = true;
            r.notes
                .push(format!("GPU {i} throttled: {}", names.join(", ")));
        }
        if min_busy < 0.9 * g.1 {
            r.flagged = true;
            r.notes.push(format!(
                "GPU {i} SM clock dropped to {min_busy:.0} MHz while busy (max {:.0})",
                g.1
            ));
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_bits_flag_a_run() {
        let s = Samples {
            count: 3,
            cpu_min: 2000.0,
            cpu_max: 2000.0,
            cpu_source: "test",
            gpu: vec![(1980.0, 1980.0, 70.0, 0x20, 1000)],
        };
        let r = report(&s);
        assert!(r.flagged);
        assert_eq!(r.gpu_throttle_reasons, vec!["SW thermal".to_string()]);
        let quiet = Samples {
            gpu: vec![(1980.0, 1980.0, 70.0, 0, 1000)],
            ..s.clone()
        };
        assert!(!report(&quiet).flagged);
        let slow = Samples {
            gpu: vec![(1200.0, 1980.0, 70.0, 0, 1000)],
            ..s
        };
        assert!(report(&slow).flagged);
    }
}
