//! Debug taps on the forward pass, for op-by-op comparison with llama.cpp
//! (scripts/llama_cpp_tensors.py dumps llama.cpp's side, scripts/compare_tensors.py compares).
//!
//! Off unless `FLEA_DUMP` or `FLEA_FEED` is set when the process first reaches a tap; then
//! each tap costs one relaxed check of a cached flag.
//!
//! * `FLEA_DUMP=dir`: every tap writes its activation (`n` rows) to `dir/<name>-<layer>.f32`,
//!   raw little-endian f32, row-major.
//! * `FLEA_FEED=dir`: a tap whose `dir/<name>-<layer>.f32` exists replaces its activation by
//!   that file's contents (llama.cpp's tensor), so the next op runs on llama.cpp's input.

use crate::backend::Backend;
use crate::Result;
use std::path::PathBuf;
use std::sync::OnceLock;

struct Dirs {
    dump: Option<PathBuf>,
    feed: Option<PathBuf>,
}

fn dirs() -> Option<&'static Dirs> {
    static DIRS: OnceLock<Option<Dirs>> = OnceLock::new();
    DIRS.get_or_init(|| {
        let dump = std::env::var_os("FLEA_DUMP").map(PathBuf::from);
        let feed = std::env::var_os("FLEA_FEED").map(PathBuf::from);
        (dump.is_some() || feed.is_some()).then_some(Dirs { dump, feed })
    })
    .as_ref()
}

/// Whether taps dump or replace activations (then the forward pass keeps every tapped
/// activation on its own, unfused).
pub fn taps_active() -> bool {
    dirs().is_some()
}

/// Dump and/or replace activation `x` (its first `n` rows) under `name-layer`.
pub fn tap<B: Backend>(b: &B, name: &str, layer: usize, n: usize, x: &mut B::Act) -> Result<()> {
    let Some(d) = dirs() else { return Ok(()) };
    let file = format!("{name}-{layer}.f32");
    if let Some(feed) = &d.feed {
        if let Ok(bytes) = std::fs::read(feed.join(&file)) {
            let vals: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let cur = b.read(n, x)?;
            if vals.len() != cur.len() {
                return Err(crate::ModelError::Input(format!(
                    "FLEA_FEED {file}: {} values, activation has {}",
                    vals.len(),
                    cur.len()
                )));
            }
            b.write(&vals, x)?;
        }
    }
    if let Some(dump) = &d.dump {
        let vals = b.read(n, x)?;
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dump.join(&file), bytes)
            .map_err(|e| crate::ModelError::Input(format!("FLEA_DUMP {file}: {e}")))?;
    }
    Ok(())
}
