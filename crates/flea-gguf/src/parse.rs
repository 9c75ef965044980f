//! The checked GGUF header parser.
//!
//! Every read goes through [`Reader`], which never indexes past its buffer and never
//! allocates from a count it has not first checked against the bytes that remain. Error
//! context ("metadata kv 3 of 24 ('key')") is built lazily, only when a read fails, so the
//! success path stays cheap even for a 262144-entry vocabulary.

use std::collections::HashSet;

use crate::{GgmlType, GgufError, GgufHeader, MetaValue, Result, TensorInfo};

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides [`DEFAULT_ALIGNMENT`].
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml tensors have at most four dimensions.
pub const MAX_DIMS: u32 = 4;
/// Arrays may nest; real files nest at most twice. The limit keeps a hostile file from
/// exhausting the stack with a few bytes per level.
pub const MAX_ARRAY_DEPTH: usize = 16;

/// Smallest encoding of one metadata KV: key length (8) + value type (4) + a 1-byte value.
const MIN_KV_BYTES: u128 = 8 + 4 + 1;
/// Smallest encoding of one tensor info: name length (8) + n_dims (4) + type (4) + offset (8).
const MIN_TENSOR_INFO_BYTES: u128 = 8 + 4 + 4 + 8;
/// Do not pre-allocate more than this many elements from a (checked) count; larger
/// collections grow as they are actually read.
/// (Arrays may nest, so this also bounds what a chain of unfinished nested arrays can
/// hold before any of their elements are read: 16 levels x 64Ki x 32 bytes.)
const MAX_PREALLOC: usize = 1 << 16;

/// GGUF metadata value type ids.
pub(crate) mod vt {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// Name of a metadata value type id, for messages.
pub(crate) fn value_type_name(ty: u32) -> &'static str {
    match ty {
        vt::U8 => "uint8",
        vt::I8 => "int8",
        vt::U16 => "uint16",
        vt::I16 => "int16",
        vt::U32 => "uint32",
        vt::I32 => "int32",
        vt::F32 => "float32",
        vt::BOOL => "bool",
        vt::STRING => "string",
        vt::ARRAY => "array",
        vt::U64 => "uint64",
        vt::I64 => "int64",
        vt::F64 => "float64",
        _ => "unknown",
    }
}

/// Fewest bytes one value of type `ty` can occupy (None for an unknown type).
fn min_value_bytes(ty: u32) -> Option<u64> {
    Some(match ty {
        vt::U8 | vt::I8 | vt::BOOL => 1,
        vt::U16 | vt::I16 => 2,
        vt::U32 | vt::I32 | vt::F32 => 4,
        vt::U64 | vt::I64 | vt::F64 => 8,
        vt::STRING => 8,
        vt::ARRAY => 4 + 8,
        _ => return None,
    })
}

/// Prefixes context to a truncation/malformation message, computing it only on error.
pub(crate) trait Context<T> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T> Context<T> for Result<T> {
    #[inline]
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        match self {
            Ok(v) => Ok(v),
            Err(GgufError::Truncated(m)) => Err(GgufError::Truncated(format!("{} {m}", f()))),
            Err(GgufError::Malformed(m)) => Err(GgufError::Malformed(format!("{}: {m}", f()))),
            Err(e) => Err(e),
        }
    }
}

/// A bounds-checked little-endian cursor over the header bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    file_size: u64,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// The error for a read of `n` bytes at the current position that does not fit.
    fn past_end(&self, n: u64) -> GgufError {
        let end = self.pos as u128 + n as u128;
        if (self.buf.len() as u64) < self.file_size {
            GgufError::Truncated(format!(
                "ends at byte {end} past the {} bytes given (file is {} bytes)",
                self.buf.len(),
                self.file_size
            ))
        } else {
            GgufError::Truncated(format!(
                "ends at byte {end} past end of file ({} bytes)",
                self.file_size
            ))
        }
    }

    #[inline]
    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        if n > self.remaining() as u64 {
            return Err(self.past_end(n));
        }
        // n <= remaining, so it fits in usize and the range is in bounds.
        let end = self.pos + n as usize;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or_else(|| self.past_end(n))?;
        self.pos = end;
        Ok(s)
    }

    #[inline]
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N as u64)?;
        s.try_into().map_err(|_| self.past_end(N as u64))
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    /// A GGUF string: u64 length, then that many UTF-8 bytes. The length is checked
    /// against the remaining bytes before anything is allocated.
    fn string(&mut self) -> Result<String> {
        let start = self.pos;
        let len = self
            .u64()
            .ctx(|| format!("string length at byte {start}"))?;
        let bytes = self
            .take(len)
            .ctx(|| format!("string of {len} bytes at byte {start}"))?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(GgufError::Malformed(format!(
                "string of {len} bytes at byte {start} is not valid UTF-8 ({e})"
            ))),
        }
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            vt::U8 => MetaValue::U8(self.u8()?),
            vt::I8 => MetaValue::I8(i8::from_le_bytes(self.bytes()?)),
            vt::U16 => MetaValue::U16(u16::from_le_bytes(self.bytes()?)),
            vt::I16 => MetaValue::I16(i16::from_le_bytes(self.bytes()?)),
            vt::U32 => MetaValue::U32(self.u32()?),
            vt::I32 => MetaValue::I32(i32::from_le_bytes(self.bytes()?)),
            vt::F32 => MetaValue::F32(f32::from_le_bytes(self.bytes()?)),
            vt::BOOL => {
                let at = self.pos;
                match self.u8()? {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    b => {
                        return Err(GgufError::Malformed(format!(
                            "bool at byte {at} has value {b} (must be 0 or 1)"
                        )))
                    }
                }
            }
            vt::STRING => MetaValue::String(self.string()?),
            vt::ARRAY => MetaValue::Array(self.array(depth)?),
            vt::U64 => MetaValue::U64(self.u64()?),
            vt::I64 => MetaValue::I64(i64::from_le_bytes(self.bytes()?)),
            vt::F64 => MetaValue::F64(f64::from_le_bytes(self.bytes()?)),
            _ => {
                return Err(GgufError::Malformed(format!(
                    "unknown metadata value type {ty}"
                )))
            }
        })
    }

    /// An array body: u32 element type, u64 count, elements. `depth` is the nesting level
    /// of this array (0 for a top-level value).
    fn array(&mut self, depth: usize) -> Result<Vec<MetaValue>> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(GgufError::Malformed(format!(
                "arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
            )));
        }
        let start = self.pos;
        let elem_ty = self.u32().ctx(|| "array element type".into())?;
        let count = self.u64().ctx(|| "array length".into())?;
        let min = min_value_bytes(elem_ty).ok_or_else(|| {
            GgufError::Malformed(format!(
                "array at byte {start} has unknown element type {elem_ty}"
            ))
        })?;
        let need = count as u128 * min as u128;
        if need > self.remaining() as u128 {
            return Err(GgufError::Truncated(format!(
                "array of {count} {} elements at byte {start} needs at least {need} bytes but only {} remain",
                value_type_name(elem_ty),
                self.remaining()
            )));
        }
        // count * min <= remaining (and min >= 1), so count fits in usize.
        let count = count as usize;
        let mut out = Vec::with_capacity(count.min(MAX_PREALLOC));
        for i in 0..count {
            let v = self
                .value(elem_ty, depth + 1)
                .ctx(|| format!("array element {i} of {count}"))?;
            out.push(v);
        }
        Ok(out)
    }
}

/// Byte size of a tensor of type `ty` with `dims` (ggml order), or a message saying why
/// it has none.
pub(crate) fn tensor_size(ty: GgmlType, dims: &[u64]) -> std::result::Result<u64, String> {
    let Some((&row, rest)) = dims.split_first() else {
        return Err("has no dimensions".into());
    };
    if dims.len() > MAX_DIMS as usize {
        return Err(format!(
            "has {} dimensions (at most {MAX_DIMS})",
            dims.len()
        ));
    }
    if let Some(i) = dims.iter().position(|&d| d == 0) {
        return Err(format!("has a zero dimension (dims[{i}]) in {dims:?}"));
    }
    let mut elements = row;
    let mut size = ty.row_bytes(row).ok_or_else(|| {
        if row % ty.block_size() as u64 != 0 {
            format!(
                "row length {row} is not a multiple of the {ty} block size {}",
                ty.block_size()
            )
        } else {
            format!("row of {row} {ty} elements overflows 64 bits")
        }
    })?;
    for &d in rest {
        elements = elements
            .checked_mul(d)
            .ok_or_else(|| format!("element count of dims {dims:?} overflows 64 bits"))?;
        size = size
            .checked_mul(d)
            .ok_or_else(|| format!("byte size of {ty} dims {dims:?} overflows 64 bits"))?;
    }
    Ok(size)
}

/// Parse a header; see [`GgufHeader::parse`].
pub(crate) fn parse_header(bytes: &[u8], file_size: u64) -> Result<GgufHeader> {
    let avail = usize::try_from(file_size).map_or(bytes.len(), |fs| bytes.len().min(fs));
    let buf = bytes.get(..avail).unwrap_or(bytes);
    let mut r = Reader {
        buf,
        pos: 0,
        file_size,
    };

    let magic: [u8; 4] = r.bytes().ctx(|| "GGUF magic".into())?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic(magic));
    }
    let version = r.u32().ctx(|| "GGUF version".into())?;
    if version != 2 && version != 3 {
        return Err(GgufError::BadVersion(version));
    }
    let tensor_count = r.u64().ctx(|| "tensor count".into())?;
    let kv_count = r.u64().ctx(|| "metadata count".into())?;
    let need = kv_count as u128 * MIN_KV_BYTES + tensor_count as u128 * MIN_TENSOR_INFO_BYTES;
    if need > r.remaining() as u128 {
        return Err(GgufError::Malformed(format!(
            "header claims {kv_count} metadata entries and {tensor_count} tensors, which need at least {need} bytes, but only {} bytes follow the header{}",
            r.remaining(),
            if (buf.len() as u64) < file_size {
                " in the bytes given"
            } else {
                ""
            }
        )));
    }
    // Both counts are now bounded by the file size (checked above).
    let kv_count = kv_count as usize;
    let tensor_count = tensor_count as usize;

    let mut metadata: Vec<(String, MetaValue)> = Vec::with_capacity(kv_count.min(MAX_PREALLOC));
    for i in 0..kv_count {
        let key = r
            .string()
            .ctx(|| format!("metadata kv {i} of {kv_count} key"))?;
        let ty = r
            .u32()
            .ctx(|| format!("metadata kv {i} of {kv_count} ('{key}') value type"))?;
        let value = r
            .value(ty, 0)
            .ctx(|| format!("metadata kv {i} of {kv_count} ('{key}')"))?;
        metadata.push((key, value));
    }
    {
        let mut seen = HashSet::with_capacity(metadata.len());
        for (i, (key, _)) in metadata.iter().enumerate() {
            if !seen.insert(key.as_str()) {
                return Err(GgufError::Malformed(format!(
                    "duplicate metadata key '{key}' (kv {i} of {kv_count})"
                )));
            }
        }
    }

    // Re-check the tensor count against what the metadata left.
    let need = tensor_count as u128 * MIN_TENSOR_INFO_BYTES;
    if need > r.remaining() as u128 {
        return Err(GgufError::Malformed(format!(
            "header claims {tensor_count} tensors, which need at least {need} bytes, but only {} bytes follow the metadata",
            r.remaining()
        )));
    }

    // Raw tensor infos: (name, dims, type, relative offset).
    let mut raw: Vec<(String, Vec<u64>, GgmlType, u64)> =
        Vec::with_capacity(tensor_count.min(MAX_PREALLOC));
    for i in 0..tensor_count {
        let name = r
            .string()
            .ctx(|| format!("tensor info {i} of {tensor_count} name"))?;
        let ctx = || format!("tensor info {i} of {tensor_count} ('{name}')");
        let n_dims = r.u32().ctx(ctx)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::Malformed(format!(
                "{}: n_dims is {n_dims} (must be 1..={MAX_DIMS})",
                ctx()
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64().ctx(ctx)?);
        }
        let id = r.u32().ctx(ctx)?;
        let rel = r.u64().ctx(ctx)?;
        let Some(ty) = GgmlType::from_id(id) else {
            return Err(GgufError::UnknownType { tensor: name, id });
        };
        raw.push((name, dims, ty, rel));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => {
            let a = v.as_u64().ok_or_else(|| GgufError::Metadata {
                key: ALIGNMENT_KEY.into(),
                problem: format!("expected a non-negative integer, found {}", v.type_name()),
            })?;
            if a == 0 || !a.is_power_of_two() {
                return Err(GgufError::Metadata {
                    key: ALIGNMENT_KEY.into(),
                    problem: format!("alignment {a} is not a non-zero power of two"),
                });
            }
            a
        }
    };
    let header_end = r.pos as u64;
    let data_offset = header_end
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| {
            GgufError::Malformed(format!(
                "data section offset overflows (header ends at {header_end}, alignment {alignment})"
            ))
        })?;

    let mut tensors = Vec::with_capacity(raw.len());
    for (i, (name, dims, ty, rel)) in raw.into_iter().enumerate() {
        let ctx = || format!("tensor {i} of {tensor_count} ('{name}')");
        if rel % alignment != 0 {
            return Err(GgufError::Malformed(format!(
                "{}: data offset {rel} is not a multiple of the alignment {alignment}",
                ctx()
            )));
        }
        let size =
            tensor_size(ty, &dims).map_err(|m| GgufError::Malformed(format!("{}: {m}", ctx())))?;
        let offset = data_offset.checked_add(rel).ok_or_else(|| {
            GgufError::Malformed(format!("{}: data offset {rel} overflows 64 bits", ctx()))
        })?;
        let end = offset as u128 + size as u128;
        if end > file_size as u128 {
            return Err(GgufError::Truncated(format!(
                "{}: {size} bytes of {ty} data at byte {offset} end at byte {end} past end of file ({file_size} bytes)",
                ctx()
            )));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
            size,
        });
    }
    {
        let mut seen = HashSet::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if !seen.insert(t.name.as_str()) {
                return Err(GgufError::Malformed(format!(
                    "duplicate tensor name '{}' (tensor {i} of {tensor_count})",
                    t.name
                )));
            }
        }
    }

    // Tensor data must not overlap: no writer shares bytes between tensors, and disjoint
    // extents keep `LayerView::bytes <= end - start` true.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_unstable_by_key(|&i| tensors.get(i).map_or(0, |t| t.offset));
    for pair in order.windows(2) {
        let &[i, j] = pair else { continue };
        if let (Some(a), Some(b)) = (tensors.get(i), tensors.get(j)) {
            if b.offset < a.end() {
                return Err(GgufError::Malformed(format!(
                    "tensor '{}' data [{}, {}) overlaps tensor '{}' data [{}, {})",
                    b.name,
                    b.offset,
                    b.end(),
                    a.name,
                    a.offset,
                    a.end()
                )));
            }
        }
    }

    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
        file_size,
    })
}
