//! Run one batched forward pass over the token ids in a file (one id per line) and write
//! every position's logits to `OUT` as raw f32. With `FLEA_DUMP` / `FLEA_FEED` set this dumps
//! or replaces the intermediate activations (src/debug.rs) for comparison with llama.cpp.
//!
//! cargo run --release -p flea-model --example forward_ids -- MODEL.gguf IDS.txt OUT.f32 [THREADS]

use flea_model::{CpuBackend, Logits, Model, Session};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, ids, out, rest @ ..] = args.as_slice() else {
        return Err("usage: forward_ids MODEL.gguf IDS.txt OUT.f32 [THREADS]".into());
    };
    let threads = match rest.first() {
        Some(t) => t.parse()?,
        None => 1,
    };
    let ids: Vec<u32> = std::fs::read_to_string(ids)?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let model = Model::load(std::path::Path::new(model))?;
    let backend = CpuBackend::new(threads)?;
    let mut sess = Session::new(&model, &backend, 1024, 512)?;
    let logits = sess.eval(&ids, Logits::All)?;
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(out, bytes)?;
    Ok(())
}
