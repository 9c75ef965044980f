//! Writing GGUF files: in memory, or streamed with tensor data produced on demand.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use crate::parse::{self, vt, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC, MAX_ARRAY_DEPTH};
use crate::{GgmlType, GgufError, MetaValue, Result, TensorInfo};

/// A tensor queued for writing. `data` is None for a deferred tensor, whose bytes come
/// from the fill callback of [`GgufWriter::write_with`].
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    size: u64,
    data: Option<Vec<u8>>,
}

/// Builds a GGUF file in memory or on disk.
///
/// Tensors are laid out in the order added, each at the next multiple of the alignment
/// after the previous one. If the alignment is not the default 32, `general.alignment`
/// is written automatically (as uint32) unless the caller set it.
///
/// For files too big to hold in memory (synthetic 70B models), add tensors with
/// [`GgufWriter::add_tensor_deferred`] and produce their bytes one tensor at a time in
/// [`GgufWriter::write_with`]'s callback.
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
    names: HashSet<String>,
}

/// Where write errors point: the writer has no path unless given one.
const OUTPUT_LABEL: &str = "<output>";

impl GgufWriter {
    /// A writer for GGUF `version` (2 or 3; they differ only in the version field for
    /// little-endian files) with the given data alignment. Both are validated when
    /// writing, so this cannot fail.
    pub fn new(version: u32, alignment: u64) -> GgufWriter {
        GgufWriter {
            version,
            alignment,
            metadata: Vec::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
        }
    }

    /// Set metadata `key`. Keys keep the order of their first insertion; setting a key
    /// again replaces its value (GGUF forbids duplicate keys).
    pub fn add_meta(&mut self, key: &str, value: MetaValue) {
        if let Some(slot) = self.metadata.iter_mut().find(|(k, _)| k == key) {
            slot.1 = value;
        } else {
            self.metadata.push((key.to_owned(), value));
        }
    }

    /// Queue a tensor with its data. `dims` are in ggml order (dims[0] = row length, which
    /// must be a multiple of `ty`'s block size); `data` must be exactly the tensor's size.
    pub fn add_tensor(
        &mut self,
        name: &str,
        dims: &[u64],
        ty: GgmlType,
        data: Vec<u8>,
    ) -> Result<()> {
        let size = self.check_new_tensor(name, dims, ty)?;
        if data.len() as u64 != size {
            return Err(GgufError::Invalid(format!(
                "tensor '{name}' ({ty} {dims:?}) needs {size} bytes of data, got {}",
                data.len()
            )));
        }
        self.push(name, dims, ty, size, Some(data));
        Ok(())
    }

    /// Queue a tensor whose data will be produced by the callback of
    /// [`GgufWriter::write_with`] when the file is written. Returns its byte size.
    pub fn add_tensor_deferred(&mut self, name: &str, dims: &[u64], ty: GgmlType) -> Result<u64> {
        let size = self.check_new_tensor(name, dims, ty)?;
        self.push(name, dims, ty, size, None);
        Ok(size)
    }

    fn check_new_tensor(&self, name: &str, dims: &[u64], ty: GgmlType) -> Result<u64> {
        if self.names.contains(name) {
            return Err(GgufError::Invalid(format!(
                "duplicate tensor name '{name}'"
            )));
        }
        parse::tensor_size(ty, dims)
            .map_err(|m| GgufError::Invalid(format!("tensor '{name}' ({ty} {dims:?}) {m}")))
    }

    fn push(&mut self, name: &str, dims: &[u64], ty: GgmlType, size: u64, data: Option<Vec<u8>>) {
        self.names.insert(name.to_owned());
        self.tensors.push(PendingTensor {
            name: name.to_owned(),
            dims: dims.to_vec(),
            ty,
            size,
            data,
        });
    }

    /// Number of tensors queued so far (deferred ones included); the callback of
    /// [`GgufWriter::write_with`] is called with indices below this.
    pub fn n_tensors(&self) -> usize {
        self.tensors.len()
    }

    /// The tensor index exactly as a reader of the written file will see it (absolute
    /// offsets included).
    pub fn layout(&self) -> Result<Vec<TensorInfo>> {
        let (header, rel) = self.build_header()?;
        let data_offset = align_up(header.len() as u64, self.alignment)?;
        Ok(self
            .tensors
            .iter()
            .zip(rel)
            .map(|(t, r)| TensorInfo {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty: t.ty,
                offset: data_offset + r,
                size: t.size,
            })
            .collect())
    }

    /// Write the whole file to `w`. Fails if any tensor was added deferred (use
    /// [`GgufWriter::write_with`] for those). I/O errors are reported as
    /// [`GgufError::Io`] with path `<output>`.
    pub fn write_to<W: std::io::Write>(&self, w: W) -> Result<()> {
        self.write_with(w, |i, _| {
            let name = self.tensors.get(i).map_or("?", |t| t.name.as_str());
            Err(GgufError::Invalid(format!(
                "tensor '{name}' was added with add_tensor_deferred; write it with write_with"
            )))
        })
    }

    /// Write the whole file to `w`, calling `fill(index, buf)` for each deferred tensor
    /// (in index order) to produce its bytes. `buf` is zeroed and exactly the tensor's
    /// size; one buffer is reused, so memory use is bounded by the largest tensor.
    pub fn write_with<W, F>(&self, w: W, fill: F) -> Result<()>
    where
        W: std::io::Write,
        F: FnMut(usize, &mut [u8]) -> Result<()>,
    {
        self.write_impl(w, fill, OUTPUT_LABEL)
    }

    /// Create (or truncate) `path` and write the file there; see
    /// [`GgufWriter::write_to`].
    pub fn write_file(&self, path: &Path) -> Result<()> {
        self.write_file_with(path, |i, _| {
            let name = self.tensors.get(i).map_or("?", |t| t.name.as_str());
            Err(GgufError::Invalid(format!(
                "tensor '{name}' was added with add_tensor_deferred; write it with write_file_with"
            )))
        })
    }

    /// Create (or truncate) `path` and write the file there; see
    /// [`GgufWriter::write_with`].
    pub fn write_file_with<F>(&self, path: &Path, fill: F) -> Result<()>
    where
        F: FnMut(usize, &mut [u8]) -> Result<()>,
    {
        let label = path.display().to_string();
        let file = std::fs::File::create(path).map_err(|source| GgufError::Io {
            path: label.clone(),
            source,
        })?;
        self.write_impl(file, fill, &label)
    }

    fn write_impl<W, F>(&self, w: W, mut fill: F, label: &str) -> Result<()>
    where
        W: std::io::Write,
        F: FnMut(usize, &mut [u8]) -> Result<()>,
    {
        let io = |source| GgufError::Io {
            path: label.to_owned(),
            source,
        };
        let (header, rel) = self.build_header()?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, w);
        w.write_all(&header).map_err(io)?;
        let mut pos = header.len() as u64;
        let data_offset = align_up(pos, self.alignment)?;
        write_zeros(&mut w, data_offset - pos).map_err(io)?;
        pos = data_offset;

        let mut buf = Vec::new();
        for (i, (t, r)) in self.tensors.iter().zip(rel).enumerate() {
            let start = data_offset + r;
            write_zeros(&mut w, start - pos).map_err(io)?;
            let bytes: &[u8] = match &t.data {
                Some(d) => d,
                None => {
                    let size = usize::try_from(t.size).map_err(|_| {
                        GgufError::Invalid(format!(
                            "tensor '{}' of {} bytes does not fit in memory",
                            t.name, t.size
                        ))
                    })?;
                    buf.clear();
                    buf.resize(size, 0);
                    fill(i, &mut buf)?;
                    &buf
                }
            };
            w.write_all(bytes).map_err(io)?;
            pos = start + t.size;
        }
        // Pad the last tensor too, as other writers do, so the file length is aligned.
        if !self.tensors.is_empty() {
            let end = align_up(pos, self.alignment)?;
            write_zeros(&mut w, end - pos).map_err(io)?;
        }
        w.flush().map_err(io)?;
        Ok(())
    }

    /// Header bytes (magic .. last tensor info, unpadded) and each tensor's offset
    /// relative to the data section.
    fn build_header(&self) -> Result<(Vec<u8>, Vec<u64>)> {
        if self.version != 2 && self.version != 3 {
            return Err(GgufError::Invalid(format!(
                "unsupported GGUF version {} (supported: 2, 3)",
                self.version
            )));
        }
        let a = self.alignment;
        if a == 0 || !a.is_power_of_two() || a > u64::from(u32::MAX) {
            return Err(GgufError::Invalid(format!(
                "alignment {a} is not a non-zero power of two that fits in u32"
            )));
        }
        let mut extra = None;
        match self.metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            Some((_, v)) if v.as_u64() != Some(a) => {
                return Err(GgufError::Invalid(format!(
                    "metadata {ALIGNMENT_KEY} = {v:?} disagrees with the writer's alignment {a}"
                )))
            }
            Some(_) => {}
            None if a != DEFAULT_ALIGNMENT => extra = Some(MetaValue::U32(a as u32)),
            None => {}
        }

        let mut out = Vec::with_capacity(4096);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        let n_kv = self.metadata.len() + usize::from(extra.is_some());
        out.extend_from_slice(&(n_kv as u64).to_le_bytes());
        let extra_kv = extra.as_ref().map(|v| (ALIGNMENT_KEY, v));
        let kvs = self
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .chain(extra_kv);
        for (key, value) in kvs {
            put_str(&mut out, key);
            out.extend_from_slice(&value.type_id().to_le_bytes());
            put_value(&mut out, value, 0)
                .map_err(|m| GgufError::Invalid(format!("metadata key '{key}': {m}")))?;
        }

        let mut rel = Vec::with_capacity(self.tensors.len());
        let mut next = 0u64;
        for t in &self.tensors {
            let off = align_up(next, a)?;
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&off.to_le_bytes());
            rel.push(off);
            next = off.checked_add(t.size).ok_or_else(|| {
                GgufError::Invalid(format!("tensor '{}' ends past 2^64 bytes", t.name))
            })?;
        }
        // The last tensor's end must be addressable too.
        align_up(next, a)?;
        align_up(out.len() as u64, a)?
            .checked_add(next)
            .ok_or_else(|| GgufError::Invalid("file would exceed 2^64 bytes".into()))?;
        Ok((out, rel))
    }
}

fn align_up(x: u64, a: u64) -> Result<u64> {
    x.checked_next_multiple_of(a)
        .ok_or_else(|| GgufError::Invalid(format!("offset {x} aligned to {a} overflows")))
}

fn write_zeros<W: Write>(w: &mut W, mut n: u64) -> std::io::Result<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        w.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Encode a value body (without its type id). Arrays must be homogeneous; an empty array
/// is written with element type uint8.
fn put_value(out: &mut Vec<u8>, v: &MetaValue, depth: usize) -> std::result::Result<(), String> {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Array(items) => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(format!(
                    "arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
                ));
            }
            let elem = items.first().map_or(vt::U8, MetaValue::type_id);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for (i, item) in items.iter().enumerate() {
                if item.type_id() != elem {
                    return Err(format!(
                        "array element {i} is {} but element 0 is {} (arrays must be homogeneous)",
                        item.type_name(),
                        parse::value_type_name(elem)
                    ));
                }
                put_value(out, item, depth + 1)?;
            }
        }
    }
    Ok(())
}
