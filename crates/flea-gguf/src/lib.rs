//! GGUF v2/v3: a checked reader (zero-copy through mmap) and a writer.
//!
//! The reader treats every file as hostile: it never panics, never allocates from a count
//! it has not checked against the bytes that remain, and checks every tensor's extent
//! against the file size, so [`GgufFile::tensor_data`] can hand out plain slices.
//!
//! ```no_run
//! # fn main() -> flea_gguf::Result<()> {
//! let f = flea_gguf::GgufFile::open(std::path::Path::new("model.gguf"))?;
//! let arch = f.header.get_str("general.architecture")?.unwrap_or("?");
//! let emb = f.tensor_data_by_name("token_embd.weight")?;
//! println!("{arch}: {} layers, embeddings {} bytes", f.header.n_layers(), emb.len());
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod file;
mod parse;
mod types;
mod writer;

pub use file::{model_or_skip, model_path, models_dir, GgufFile};
pub use parse::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC, MAX_ARRAY_DEPTH, MAX_DIMS};
pub use types::GgmlType;
pub use writer::GgufWriter;

use std::collections::BTreeSet;

/// Everything that can go wrong reading or writing GGUF. Every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// An I/O error; `path` names the file (or `<output>` for a writer's sink).
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file does not start with "GGUF"; holds the four bytes found.
    #[error("not a GGUF file (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// A GGUF version other than 2 or 3 (v1 used 32-bit counts; a byte-swapped version
    /// means a big-endian file).
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    BadVersion(u32),
    /// A read or a tensor's data would run past the end of the file.
    #[error("truncated file: {0}")]
    Truncated(String),
    /// Structurally invalid content: bad UTF-8, unknown value types, implausible counts,
    /// misaligned offsets, duplicate names, invalid dims, ...
    #[error("malformed GGUF: {0}")]
    Malformed(String),
    /// A tensor's ggml type id is not one [`GgmlType`] knows.
    #[error("tensor '{tensor}' has unknown ggml type id {id}")]
    UnknownType {
        /// The tensor's name.
        tensor: String,
        /// The type id found.
        id: u32,
    },
    /// A metadata key is present but of the wrong type or out of range.
    #[error("metadata key '{key}': {problem}")]
    Metadata {
        /// The key.
        key: String,
        /// What is wrong with its value.
        problem: String,
    },
    /// A tensor looked up by name does not exist.
    #[error("tensor '{0}' not found")]
    MissingTensor(String),
    /// [`GgufWriter`] was given something it cannot write (bad dims, data length,
    /// duplicate names, invalid version or alignment, ...).
    #[error("cannot write GGUF: {0}")]
    Invalid(String),
}

/// This crate's result type.
pub type Result<T> = std::result::Result<T, GgufError>;

/// A metadata value of any GGUF value type.
///
/// Arrays are stored as a `Vec<MetaValue>`; in a file all elements of one array share a
/// type (nested arrays may differ in length and element type).
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// UINT8 (type 0).
    U8(u8),
    /// INT8 (type 1).
    I8(i8),
    /// UINT16 (type 2).
    U16(u16),
    /// INT16 (type 3).
    I16(i16),
    /// UINT32 (type 4).
    U32(u32),
    /// INT32 (type 5).
    I32(i32),
    /// FLOAT32 (type 6).
    F32(f32),
    /// BOOL (type 7), one byte 0 or 1.
    Bool(bool),
    /// STRING (type 8), UTF-8.
    String(String),
    /// ARRAY (type 9); may nest.
    Array(Vec<MetaValue>),
    /// UINT64 (type 10).
    U64(u64),
    /// INT64 (type 11).
    I64(i64),
    /// FLOAT64 (type 12).
    F64(f64),
}

impl MetaValue {
    /// The GGUF value type id (UINT8 = 0 ... FLOAT64 = 12).
    pub fn type_id(&self) -> u32 {
        use parse::vt;
        match self {
            MetaValue::U8(_) => vt::U8,
            MetaValue::I8(_) => vt::I8,
            MetaValue::U16(_) => vt::U16,
            MetaValue::I16(_) => vt::I16,
            MetaValue::U32(_) => vt::U32,
            MetaValue::I32(_) => vt::I32,
            MetaValue::F32(_) => vt::F32,
            MetaValue::Bool(_) => vt::BOOL,
            MetaValue::String(_) => vt::STRING,
            MetaValue::Array(_) => vt::ARRAY,
            MetaValue::U64(_) => vt::U64,
            MetaValue::I64(_) => vt::I64,
            MetaValue::F64(_) => vt::F64,
        }
    }

    /// The GGUF name of this value's type ("uint32", "string", "array", ...), for messages.
    pub fn type_name(&self) -> &'static str {
        parse::value_type_name(self.type_id())
    }

    /// The value as an i128 if it is an integer of any width or signedness.
    fn as_int(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Any integer value that fits in a u64 (writers differ in the integer type they use).
    pub fn as_u64(&self) -> Option<u64> {
        self.as_int().and_then(|v| u64::try_from(v).ok())
    }

    /// Any integer value that fits in a u32.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_int().and_then(|v| u32::try_from(v).ok())
    }

    /// Any integer value that fits in an i32.
    pub fn as_i32(&self) -> Option<i32> {
        self.as_int().and_then(|v| i32::try_from(v).ok())
    }

    /// A float32 value, or a float64 narrowed to f32.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::F32(v) => Some(v),
            MetaValue::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    /// A bool value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// An array value's elements.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

macro_rules! meta_from {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl From<$t> for MetaValue {
            fn from(x: $t) -> MetaValue {
                MetaValue::$v(x)
            }
        }
    )*};
}
meta_from!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
    bool => Bool, String => String, u64 => U64, i64 => I64, f64 => F64);

impl From<&str> for MetaValue {
    fn from(s: &str) -> MetaValue {
        MetaValue::String(s.to_owned())
    }
}

impl<T: Into<MetaValue>> From<Vec<T>> for MetaValue {
    fn from(v: Vec<T>) -> MetaValue {
        MetaValue::Array(v.into_iter().map(Into::into).collect())
    }
}

/// One tensor's index entry.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// ggml order: dims[0] is the row length (contiguous), dims[1] the number of rows, ...
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Absolute byte offset in the file (data section start + relative offset).
    pub offset: u64,
    /// Exact byte size of the tensor data.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements (product of dims). Saturates instead of overflowing; for a
    /// parsed tensor the product was already checked.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d))
    }

    /// One past the last byte of the tensor's data (absolute).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.size)
    }

    /// The layer N if the name is `blk.N.<something>`.
    pub fn layer(&self) -> Option<usize> {
        layer_of(&self.name)
    }
}

/// `blk.N.rest` → N.
fn layer_of(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("blk.")?;
    let (n, tail) = rest.split_once('.')?;
    if n.is_empty() || tail.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// The parsed header: metadata and tensor index. Holds no tensor data.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensor index in file order.
    pub tensors: Vec<TensorInfo>,
    /// Data alignment (`general.alignment`, default 32); a power of two.
    pub alignment: u64,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
    /// Size of the file the header was parsed from; tensor extents lie within it.
    pub file_size: u64,
}

/// All `blk.N.*` tensors of one layer and the byte extent that covers them.
#[derive(Clone, Debug)]
pub struct LayerView {
    /// The layer index N.
    pub layer: usize,
    /// Indices into `GgufHeader::tensors`, in file order.
    pub tensors: Vec<usize>,
    /// Smallest absolute start offset of those tensors.
    pub start: u64,
    /// One past the largest absolute end offset.
    pub end: u64,
    /// Sum of the tensors' sizes (≤ end - start).
    pub bytes: u64,
}

fn wrong_type(key: &str, want: &str, v: &MetaValue) -> GgufError {
    GgufError::Metadata {
        key: key.to_owned(),
        problem: format!("expected {want}, found {}", v.type_name()),
    }
}

impl GgufHeader {
    /// Parse a header from the first bytes of a file of `file_size` bytes. Every count and
    /// offset is checked against `file_size`; nothing is allocated from an unchecked count.
    ///
    /// `bytes` is normally the whole file (the mmap); it may be a prefix that holds at
    /// least the header, in which case tensor extents are still checked against
    /// `file_size`.
    pub fn parse(bytes: &[u8], file_size: u64) -> Result<GgufHeader> {
        parse::parse_header(bytes, file_size)
    }

    /// The value of a metadata key (linear scan: headers have tens of keys).
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Look up `key` and convert it with `f`; a present value `f` rejects is an error.
    fn get_as<'a, T>(
        &'a self,
        key: &str,
        want: &str,
        f: impl FnOnce(&'a MetaValue) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => f(v).map(Some).ok_or_else(|| wrong_type(key, want, v)),
        }
    }

    /// An integer of any GGUF integer type that fits in u32 (writers vary in which type
    /// they use for counts such as `block_count`).
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>> {
        self.get_as(key, "an integer in u32 range", MetaValue::as_u32)
    }

    /// An integer of any GGUF integer type that fits in u64.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get_as(key, "a non-negative integer", MetaValue::as_u64)
    }

    /// An integer of any GGUF integer type that fits in i32.
    pub fn get_i32(&self, key: &str) -> Result<Option<i32>> {
        self.get_as(key, "an integer in i32 range", MetaValue::as_i32)
    }

    /// A float32, or a float64 narrowed to f32.
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        self.get_as(key, "float32 or float64", MetaValue::as_f32)
    }

    /// A bool.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get_as(key, "bool", MetaValue::as_bool)
    }

    /// A string, borrowed.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.get_as(key, "string", MetaValue::as_str)
    }

    /// An array's elements, borrowed.
    pub fn get_array(&self, key: &str) -> Result<Option<&[MetaValue]>> {
        self.get_as(key, "array", MetaValue::as_array)
    }

    /// Convert every element of an array with `f`; the first element `f` rejects is an
    /// error naming its index.
    fn get_array_of<'a, T>(
        &'a self,
        key: &str,
        want: &str,
        f: impl Fn(&'a MetaValue) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        let Some(arr) = self.get_array(key)? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(arr.len());
        for (i, v) in arr.iter().enumerate() {
            match f(v) {
                Some(x) => out.push(x),
                None => {
                    return Err(GgufError::Metadata {
                        key: key.to_owned(),
                        problem: format!(
                            "element {i} of {}: expected {want}, found {}",
                            arr.len(),
                            v.type_name()
                        ),
                    })
                }
            }
        }
        Ok(Some(out))
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`), borrowed.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        self.get_array_of(key, "string", MetaValue::as_str)
    }

    /// An array of float32 or float64 (e.g. `tokenizer.ggml.scores`).
    pub fn get_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        self.get_array_of(key, "float32 or float64", MetaValue::as_f32)
    }

    /// An array of integers that fit in i32 (e.g. `tokenizer.ggml.token_type`).
    pub fn get_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>> {
        self.get_array_of(key, "an integer in i32 range", MetaValue::as_i32)
    }

    /// An array of integers that fit in u32.
    pub fn get_u32_array(&self, key: &str) -> Result<Option<Vec<u32>>> {
        self.get_array_of(key, "an integer in u32 range", MetaValue::as_u32)
    }

    /// The tensor named `name` (linear scan).
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Like [`GgufHeader::tensor`], but a missing tensor is [`GgufError::MissingTensor`].
    pub fn require_tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_owned()))
    }

    /// Number of distinct N among tensor names `blk.N.*` (0 if there are none). This is
    /// the layer count as the tensors show it, independent of `<arch>.block_count`.
    pub fn n_layers(&self) -> usize {
        self.tensors
            .iter()
            .filter_map(TensorInfo::layer)
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// All `blk.{layer}.*` tensors with the byte extent covering them, or None if the
    /// layer has no tensors. Useful to prefetch / madvise one layer at a time.
    pub fn layer_view(&self, layer: usize) -> Option<LayerView> {
        let mut view = LayerView {
            layer,
            tensors: Vec::new(),
            start: u64::MAX,
            end: 0,
            bytes: 0,
        };
        for (i, t) in self.tensors.iter().enumerate() {
            if t.layer() == Some(layer) {
                view.tensors.push(i);
                view.start = view.start.min(t.offset);
                view.end = view.end.max(t.end());
                view.bytes = view.bytes.saturating_add(t.size);
            }
        }
        if view.tensors.is_empty() {
            None
        } else {
            Some(view)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names() {
        assert_eq!(layer_of("blk.0.attn_q.weight"), Some(0));
        assert_eq!(layer_of("blk.29.ffn_down.weight"), Some(29));
        assert_eq!(layer_of("blk..x"), None);
        assert_eq!(layer_of("blk.3"), None);
        assert_eq!(layer_of("blk.3."), None);
        assert_eq!(layer_of("blk.+3.x"), None);
        assert_eq!(layer_of("blk.99999999999999999999999.x"), None);
        assert_eq!(layer_of("token_embd.weight"), None);
    }

    #[test]
    fn integer_getters_accept_any_width() {
        assert_eq!(MetaValue::I64(7).as_u32(), Some(7));
        assert_eq!(MetaValue::U8(7).as_u32(), Some(7));
        assert_eq!(MetaValue::I32(-1).as_u32(), None);
        assert_eq!(MetaValue::U64(1 << 40).as_u32(), None);
        assert_eq!(MetaValue::U64(1 << 40).as_u64(), Some(1 << 40));
        assert_eq!(MetaValue::F32(1.0).as_u32(), None);
        assert_eq!(MetaValue::F64(0.5).as_f32(), Some(0.5));
    }
}
