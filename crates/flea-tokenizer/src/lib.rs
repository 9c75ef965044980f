//! llama.cpp-compatible tokenizers built from GGUF metadata.
//!
//! INTERFACE SKELETON — the bodies are being written; signatures are the contract other
//! crates code against.

use flea_gguf::GgufHeader;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer metadata: {0}")]
    Metadata(String),
    #[error("unsupported tokenizer model '{0}'")]
    UnsupportedModel(String),
    #[error("unsupported pre-tokenizer '{0}'")]
    UnsupportedPre(String),
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

pub struct Tokenizer {
    _private: (),
}

impl Tokenizer {
    pub fn from_gguf(_h: &GgufHeader) -> Result<Tokenizer> {
        todo!()
    }
    /// llama.cpp's `llama_tokenize(text, add_special, parse_special)`.
    pub fn encode(&self, _text: &str, _add_special: bool, _parse_special: bool) -> Vec<u32> {
        todo!()
    }
    /// The bytes this token stands for when printed (llama.cpp's `token_to_piece` with
    /// special tokens rendered).
    pub fn token_bytes(&self, _id: u32) -> Vec<u8> {
        todo!()
    }
    pub fn decode(&self, _ids: &[u32]) -> String {
        todo!()
    }
    pub fn n_vocab(&self) -> usize {
        todo!()
    }
    pub fn bos(&self) -> Option<u32> {
        todo!()
    }
    pub fn eos(&self) -> Option<u32> {
        todo!()
    }
    /// End-of-generation tokens (eos, eot, im_end, end_of_turn ...).
    pub fn is_eog(&self, _id: u32) -> bool {
        todo!()
    }
    pub fn token_text(&self, _id: u32) -> Option<&str> {
        todo!()
    }
}

/// Turns a stream of token byte pieces into valid UTF-8 text, holding back an incomplete
/// trailing sequence until the next piece completes it.
#[derive(Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    pub fn push(&mut self, _piece: &[u8]) -> String {
        let _ = &self.pending;
        todo!()
    }
    /// Whatever is left, with invalid bytes replaced.
    pub fn finish(&mut self) -> String {
        todo!()
    }
}
