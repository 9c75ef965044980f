//! Writes a few small valid GGUF files to seed the fuzzer:
//! `cargo run -p flea-gguf --example fuzz_seeds -- fuzz/corpus/parse_header`

use flea_gguf::{GgmlType, GgufWriter, MetaValue};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus/parse_header".into()),
    );
    std::fs::create_dir_all(&dir)?;

    let mut seeds: Vec<(&str, GgufWriter)> = Vec::new();
    seeds.push(("empty_v3", GgufWriter::new(3, 32)));

    let mut w = GgufWriter::new(3, 32);
    w.add_meta("general.architecture", "llama".into());
    w.add_meta("llama.block_count", MetaValue::U32(2));
    w.add_meta("llama.rope.freq_base", MetaValue::F32(10000.0));
    w.add_meta("tokenizer.ggml.tokens", vec!["<s>", "a", "b"].into());
    w.add_meta("tokenizer.ggml.scores", vec![0.0f32, -1.0, -2.0].into());
    w.add_meta("tokenizer.ggml.token_type", vec![3i32, 1, 1].into());
    w.add_tensor("token_embd.weight", &[32, 3], GgmlType::Q8_0, vec![1; 102])?;
    w.add_tensor("blk.0.attn_q.weight", &[32, 1], GgmlType::Q4_0, vec![2; 18])?;
    w.add_tensor("blk.1.attn_q.weight", &[32, 1], GgmlType::Q4_1, vec![3; 20])?;
    w.add_tensor("output_norm.weight", &[4], GgmlType::F32, vec![4; 16])?;
    seeds.push(("llama_like", w));

    let mut w = GgufWriter::new(2, 64);
    w.add_meta("u8", MetaValue::U8(1));
    w.add_meta("i8", MetaValue::I8(-1));
    w.add_meta("u16", MetaValue::U16(2));
    w.add_meta("i16", MetaValue::I16(-2));
    w.add_meta("i32", MetaValue::I32(-3));
    w.add_meta("u64", MetaValue::U64(4));
    w.add_meta("i64", MetaValue::I64(-4));
    w.add_meta("f64", MetaValue::F64(0.5));
    w.add_meta("b", MetaValue::Bool(true));
    w.add_meta(
        "nested",
        MetaValue::Array(vec![
            MetaValue::Array(vec![MetaValue::U16(1)]),
            MetaValue::Array(vec![]),
        ]),
    );
    w.add_tensor(
        "blk.0.ffn_up.weight",
        &[256, 1],
        GgmlType::Q4_K,
        vec![5; 144],
    )?;
    w.add_tensor("blk.0.norm", &[2, 2, 1, 1], GgmlType::F16, vec![6; 8])?;
    seeds.push(("all_types_v2_align64", w));

    for (name, w) in seeds {
        let path = dir.join(format!("{name}.gguf"));
        w.write_file(&path)?;
        println!("{}", path.display());
    }
    Ok(())
}
