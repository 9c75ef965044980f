//! Memory budgets and the accounted arenas that enforce them.
//!
//! Every byte the engine holds for weights, KV cache and activations is reserved from an
//! arena before it is allocated, so the peak is known exactly and can never pass the budget.

use crate::{Result, RuntimeError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Parse a size like `8GiB`, `512MiB`, `1.5GB`, `4096` (bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| RuntimeError::Config(format!("bad size '{s}' (e.g. 8GiB, 512MiB)")))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(RuntimeError::Config(format!(
                "bad size unit '{other}' in '{s}'"
            )))
        }
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(RuntimeError::Config(format!("size '{s}' out of range")));
    }
    Ok(bytes as u64)
}

/// Human-readable size (binary units).
pub fn fmt_size(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

/// An accounted memory pool with a hard limit.
#[derive(Debug)]
pub struct Arena {
    pub name: &'static str,
    pub budget: u64,
    used: AtomicU64,
    peak: AtomicU64,
}

impl Arena {
    pub fn new(name: &'static str, budget: u64) -> Arc<Arena> {
        Arc::new(Arena {
            name,
            budget,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        })
    }

    /// Reserve `bytes` for `what`; the reservation is returned when dropped.
    pub fn reserve(self: &Arc<Self>, bytes: u64, what: &str) -> Result<Reservation> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let next = cur
                .checked_add(bytes)
                .filter(|&n| n <= self.budget)
                .ok_or_else(|| RuntimeError::Budget {
                    arena: self.name,
                    what: what.to_string(),
                    need: bytes,
                    used: cur,
                    budget: self.budget,
                })?;
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::AcqRel);
                    return Ok(Reservation {
                        arena: Arc::clone(self),
                        bytes,
                    });
                }
                Err(actual) => cur = actual,
            }
        }
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }
}

/// Bytes held from an arena; released on drop.
#[derive(Debug)]
pub struct Reservation {
    arena: Arc<Arena>,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Give back all but `bytes` of the reservation (no-op if it holds no more).
    pub fn shrink_to(&mut self, bytes: u64) {
        if bytes < self.bytes {
            self.arena
                .used
                .fetch_sub(self.bytes - bytes, Ordering::AcqRel);
            self.bytes = bytes;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let prev = self.arena.used.fetch_sub(self.bytes, Ordering::AcqRel);
        debug_assert!(
            prev >= self.bytes,
            "arena {} released more than it held",
            self.arena.name
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("64 MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-1GiB").is_err());
    }

    #[test]
    fn arena_enforces_budget_and_tracks_peak() {
        let a = Arena::new("device", 100);
        let r1 = a.reserve(60, "x").unwrap();
        assert!(a.reserve(41, "y").is_err());
        let r2 = a.reserve(40, "y").unwrap();
        assert_eq!(a.used(), 100);
        drop(r1);
        let mut r2 = r2;
        r2.shrink_to(10);
        r2.shrink_to(30);
        assert_eq!((a.used(), r2.bytes()), (10, 10));
        drop(r2);
        assert_eq!(a.used(), 0);
        assert_eq!(a.peak(), 100);
    }
}
