//! A loaded model (file, config, tensor layout, tokenizer) and an inference session.

use crate::backend::{Backend, KvShape, Row};
use crate::config::ModelConfig;
use crate::forward::{self, HeadWeights, Logits, Scratch};
use crate::weights::{LayerWeights, ModelLayout};
use crate::{ModelError, Result};
use flea_gguf::GgufFile;
use flea_tokenizer::Tokenizer;
use std::path::Path;

pub struct Model {
    pub file: GgufFile,
    pub cfg: ModelConfig,
    pub layout: ModelLayout,
    pub tokenizer: Tokenizer,
}

impl Model {
    /// Open a GGUF model: parse, validate every tensor the architecture needs (types and
    /// shapes) and build the tokenizer. Weights stay in the file's mmap.
    pub fn load(path: &Path) -> Result<Model> {
        let file = GgufFile::open(path)?;
        let cfg = ModelConfig::from_gguf(&file.header)?;
        let layout = ModelLayout::from_gguf(&file.header, &cfg)?;
        let tokenizer = Tokenizer::from_gguf(&file.header)?;
        Ok(Model {
            file,
            cfg,
            layout,
            tokenizer,
        })
    }

    /// Views of the embedding, final norm and output weights in the mmap.
    pub fn head_weights(&self) -> Result<HeadWeights<'_>> {
        let bytes = self.file.bytes();
        Ok(HeadWeights {
            token_embd: self.layout.token_embd.view(bytes, 0)?,
            output_norm: self.layout.output_norm.view(bytes, 0)?,
            output: self.layout.output.view(bytes, 0)?,
        })
    }

    /// Views of layer `il`'s weights in the mmap.
    pub fn layer_weights(&self, il: usize) -> Result<LayerWeights<'_>> {
        let l = self
            .layout
            .layers
            .get(il)
            .ok_or_else(|| ModelError::Input(format!("no layer {il}")))?;
        l.views(self.file.bytes(), 0)
    }
}

/// One sequence being evaluated: its KV cache, scratch buffers and position.
pub struct Session<'m, B: Backend> {
    pub model: &'m Model,
    pub backend: &'m B,
    kv: B::Kv,
    scratch: Scratch<B>,
    pub n_ctx: usize,
    /// Sequence slots of the KV cache.
    pub n_seq: usize,
    /// Tokens already in the KV cache.
    pub pos: usize,
}

impl<'m, B: Backend> Session<'m, B> {
    /// `max_batch`: the most prompt tokens evaluated per weight pass.
    pub fn new(model: &'m Model, backend: &'m B, n_ctx: usize, max_batch: usize) -> Result<Self> {
        Self::with_seqs(model, backend, n_ctx, max_batch, 1)
    }

    /// As `new`, with a KV cache of `n_seq` sequence slots of `n_ctx` positions each, for
    /// [`Session::step`] (`eval` uses slot 0).
    pub fn with_seqs(
        model: &'m Model,
        backend: &'m B,
        n_ctx: usize,
        max_batch: usize,
        n_seq: usize,
    ) -> Result<Self> {
        let cfg = &model.cfg;
        if n_ctx == 0 || n_seq == 0 {
            return Err(ModelError::Input(
                "context size and sequence count must be at least 1".into(),
            ));
        }
        let kv = backend.alloc_kv(KvShape {
            n_layers: cfg.n_layers,
            n_ctx,
            n_head_kv: cfg.n_head_kv,
            head_dim: cfg.head_dim,
            n_seq,
        })?;
        // Every sequence's decode row fits one step.
        let rows = max_batch.clamp(1, n_ctx * n_seq).max(n_seq);
        let scratch = Scratch::new(backend, cfg, rows)?;
        Ok(Session {
            model,
            backend,
            kv,
            scratch,
            n_ctx,
            n_seq,
            pos: 0,
        })
    }

    /// Forget the sequence (the cache is overwritten from position 0).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Evaluate `tokens` after what is already cached, one weight pass per batch of up to
    /// `max_batch` tokens. Returns the last token's logits, or every token's with
    /// `Logits::All` (`[tokens][n_vocab]`).
    pub fn eval(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(ModelError::Input(
                "nothing to evaluate (empty token list)".into(),
            ));
        }
        if self.pos + tokens.len() > self.n_ctx {
            return Err(ModelError::Input(format!(
                "context full: {} + {} tokens exceed the context size {}",
                self.pos,
                tokens.len(),
                self.n_ctx
            )));
        }
        let m = self.model;
        let cfg = &m.cfg;
        let head = m.head_weights()?;
        let mut out = Vec::new();
        let n_chunks = tokens.len().div_ceil(self.scratch.capacity);
        for (ci, chunk) in tokens.chunks(self.scratch.capacity).enumerate() {
            let n = chunk.len();
            forward::embed(self.backend, cfg, &head, chunk, &mut self.scratch)?;
            for il in 0..cfg.n_layers {
                let w = m.layer_weights(il)?;
                forward::block(
                    self.backend,
                    cfg,
                    il,
                    &w,
                    &Row::consecutive(0, self.pos, n),
                    &mut self.kv,
                    &mut self.scratch,
                )?;
            }
            self.pos += n;
            let last_chunk = ci + 1 == n_chunks;
            match which {
                Logits::All => out.extend(forward::head(
                    self.backend,
                    cfg,
                    &head,
                    n,
                    Logits::All,
                    &mut self.scratch,
                )?),
                Logits::Last if last_chunk => {
                    out =
                        forward::head(self.backend, cfg, &head, n, Logits::Last, &mut self.scratch)?
                }
                Logits::Last => {}
            }
        }
        Ok(out)
    }

    /// Rows a single `step` may hold.
    pub fn capacity(&self) -> usize {
        self.scratch.capacity
    }

    /// One weight pass over a batch that may mix sequences: `tokens[i]` goes to `rows[i]`
    /// (sequence slot and position). Returns the logits of the rows `logit_rows` (indices
    /// into the batch; may be empty), `[logit_rows.len()][n_vocab]`. Does not move `pos`.
    pub fn step(&mut self, tokens: &[u32], rows: &[Row], logit_rows: &[usize]) -> Result<Vec<f32>> {
        if tokens.is_empty() || tokens.len() != rows.len() {
            return Err(ModelError::Input(format!(
                "a step of {} tokens with {} rows",
                tokens.len(),
                rows.len()
            )));
        }
        let m = self.model;
        let cfg = &m.cfg;
        let head = m.head_weights()?;
        forward::embed(self.backend, cfg, &head, tokens, &mut self.scratch)?;
        for il in 0..cfg.n_layers {
            let w = m.layer_weights(il)?;
            forward::block(
                self.backend,
                cfg,
                il,
                &w,
                rows,
                &mut self.kv,
                &mut self.scratch,
            )?;
        }
        let n_out = forward::head_norm_rows(
            self.backend,
            cfg,
            &head.output_norm,
            rows.len(),
            logit_rows,
            &mut self.scratch,
        )?;
        let mut logits = vec![0.0f32; n_out * cfg.n_vocab];
        if n_out == 0 {
            return Ok(logits);
        }
        forward::head_project(
            self.backend,
            cfg,
            n_out,
            &head.output,
            0,
            &mut logits,
            &mut self.scratch,
        )?;
        Ok(logits)
    }
}
