//! Opening GGUF files through mmap, and where model files are cached.

use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::{GgufError, GgufHeader, Result, TensorInfo};

/// A GGUF file opened through mmap. The header is parsed and validated at open, so tensor
/// data can be handed out as plain slices of the mapping without further checks.
pub struct GgufFile {
    /// The parsed, validated header.
    pub header: GgufHeader,
    /// None for an empty file (which never parses, but mapping zero bytes is avoided).
    map: Option<Mmap>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("header", &self.header)
            .field("mapped_bytes", &self.bytes().len())
            .finish()
    }
}

impl GgufFile {
    /// Map `path` read-only and parse its header. A missing or unreadable file is
    /// [`GgufError::Io`] naming the path; a malformed one is the parser's error.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let io = |source| GgufError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: memmap2 requires that the file not be modified (or truncated) while
            // mapped, which we cannot guarantee: another process may rewrite the file. We
            // map it read-only (no writes through the mapping), treat the contents as plain
            // untrusted bytes — every value is re-validated by the parser, which never
            // assumes anything about their content — and hand out only `&[u8]` slices
            // within the mapped length. A concurrent truncation could still raise SIGBUS,
            // as with any mmap reader; that is the accepted cost of zero-copy loading.
            Some(unsafe { Mmap::map(&file) }.map_err(io)?)
        };
        let bytes: &[u8] = map.as_deref().unwrap_or(&[]);
        // Parse against the mapped length: that is what the slices will come from.
        let header = GgufHeader::parse(bytes, bytes.len() as u64)?;
        Ok(GgufFile { header, map })
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Zero-copy view of one tensor's data.
    ///
    /// Extents of this file's tensors were validated at open, so this is a plain slice.
    /// A `TensorInfo` that does not fit the file (e.g. from another file, or edited)
    /// yields an empty slice rather than a panic.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let (Ok(start), Ok(end)) = (usize::try_from(t.offset), usize::try_from(t.end())) else {
            return &[];
        };
        self.bytes().get(start..end).unwrap_or(&[])
    }

    /// The data of the tensor named `name`, or [`GgufError::MissingTensor`].
    pub fn tensor_data_by_name(&self, name: &str) -> Result<&[u8]> {
        let t = self.header.require_tensor(name)?;
        Ok(self.tensor_data(t))
    }
}

/// Where model files are cached: `$FLEA_MODELS`, else `$HOME/.cache/flea/models`.
pub fn models_dir() -> PathBuf {
    match std::env::var_os("FLEA_MODELS") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/flea/models")
        }
    }
}

/// `models_dir()/file_name`, e.g. `model_path("SmolLM2-135M-Instruct.Q4_1.gguf")`.
pub fn model_path(file_name: &str) -> PathBuf {
    models_dir().join(file_name)
}

/// For tests that need a real model: its path when it is in the cache; otherwise None after
/// printing a skip note — unless `FLEA_REQUIRE_MODELS=1` (CI), when a missing model panics,
/// so that a test can't pass by skipping.
pub fn model_or_skip(file_name: &str) -> Option<PathBuf> {
    let path = model_path(file_name);
    if path.exists() {
        return Some(path);
    }
    if std::env::var("FLEA_REQUIRE_MODELS").as_deref() == Ok("1") {
        panic!(
            "FLEA_REQUIRE_MODELS=1 but {} is missing (run scripts/fetch_models.sh)",
            path.display()
        );
    }
    eprintln!(
        "SKIP: {} not found (run scripts/fetch_models.sh)",
        path.display()
    );
    None
}
