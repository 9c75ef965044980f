//! GGUF v2/v3: a checked reader (zero-copy through mmap) and a writer.
//!
//! INTERFACE SKELETON — the bodies are being written; signatures are the contract other
//! crates code against.

mod types;
pub use types::GgmlType;

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not a GGUF file (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    BadVersion(u32),
    #[error("truncated file: {0}")]
    Truncated(String),
    #[error("malformed GGUF: {0}")]
    Malformed(String),
    #[error("tensor '{tensor}' has unknown ggml type id {id}")]
    UnknownType { tensor: String, id: u32 },
    #[error("metadata key '{key}': {problem}")]
    Metadata { key: String, problem: String },
    #[error("tensor '{0}' not found")]
    MissingTensor(String),
}

pub type Result<T> = std::result::Result<T, GgufError>;

/// A metadata value of any GGUF value type.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// One tensor's index entry.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: dims[0] is the row length (contiguous), dims[1] the number of rows, ...
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset in the file (data section start + relative offset).
    pub offset: u64,
    /// Exact byte size of the tensor data.
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The parsed header: metadata and tensor index. Holds no tensor data.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
    pub file_size: u64,
}

/// All `blk.N.*` tensors of one layer and the byte extent that covers them.
#[derive(Clone, Debug)]
pub struct LayerView {
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

impl GgufHeader {
    /// Parse a header from the first bytes of a file of `file_size` bytes. Every count and
    /// offset is checked against `file_size`; nothing is allocated from an unchecked count.
    pub fn parse(_bytes: &[u8], _file_size: u64) -> Result<GgufHeader> {
        todo!()
    }
    pub fn get(&self, _key: &str) -> Option<&MetaValue> {
        todo!()
    }
    pub fn get_u32(&self, _key: &str) -> Result<Option<u32>> {
        todo!()
    }
    pub fn get_f32(&self, _key: &str) -> Result<Option<f32>> {
        todo!()
    }
    pub fn get_bool(&self, _key: &str) -> Result<Option<bool>> {
        todo!()
    }
    pub fn get_str(&self, _key: &str) -> Result<Option<&str>> {
        todo!()
    }
    pub fn get_array(&self, _key: &str) -> Result<Option<&[MetaValue]>> {
        todo!()
    }
    pub fn tensor(&self, _name: &str) -> Option<&TensorInfo> {
        todo!()
    }
    pub fn n_layers(&self) -> usize {
        todo!()
    }
    pub fn layer_view(&self, _layer: usize) -> Option<LayerView> {
        todo!()
    }
}

/// A GGUF file opened through mmap.
pub struct GgufFile {
    pub header: GgufHeader,
    _private: (),
}

impl GgufFile {
    pub fn open(_path: &Path) -> Result<GgufFile> {
        todo!()
    }
    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        todo!()
    }
    /// Zero-copy view of one tensor's data.
    pub fn tensor_data(&self, _t: &TensorInfo) -> &[u8] {
        todo!()
    }
}

/// Builds a GGUF file in memory or on disk.
pub struct GgufWriter {
    _private: (),
}

impl GgufWriter {
    pub fn new(_version: u32, _alignment: u64) -> GgufWriter {
        todo!()
    }
    pub fn add_meta(&mut self, _key: &str, _value: MetaValue) {
        todo!()
    }
    pub fn add_tensor(
        &mut self,
        _name: &str,
        _dims: &[u64],
        _ty: GgmlType,
        _data: Vec<u8>,
    ) -> Result<()> {
        todo!()
    }
    pub fn write_to<W: std::io::Write>(&self, _w: W) -> Result<()> {
        todo!()
    }
}
