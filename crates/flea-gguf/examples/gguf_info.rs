//! Prints a GGUF file's metadata and tensor index:
//! `cargo run --release -p flea-gguf --example gguf_info -- model.gguf [--tensors]`

use flea_gguf::{GgufFile, MetaValue};

fn short(v: &MetaValue) -> String {
    match v {
        MetaValue::Array(a) => {
            let head: Vec<String> = a.iter().take(4).map(short).collect();
            let more = if a.len() > 4 { ", ..." } else { "" };
            format!("[{}{more}] ({} items)", head.join(", "), a.len())
        }
        MetaValue::String(s) if s.len() > 80 => {
            format!("{:?}...", s.chars().take(80).collect::<String>())
        }
        MetaValue::String(s) => format!("{s:?}"),
        other => format!("{other:?}"),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: gguf_info FILE [--tensors]");
        std::process::exit(2);
    };
    let show_tensors = args.next().as_deref() == Some("--tensors");
    let t0 = std::time::Instant::now();
    let f = match GgufFile::open(std::path::Path::new(&path)) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let h = &f.header;
    println!(
        "GGUF v{}, {} bytes, {} metadata, {} tensors, {} layers, alignment {}, data at {} (opened in {:.1?})",
        h.version,
        h.file_size,
        h.metadata.len(),
        h.tensors.len(),
        h.n_layers(),
        h.alignment,
        h.data_offset,
        t0.elapsed()
    );
    for (k, v) in &h.metadata {
        println!("  {k} ({}) = {}", v.type_name(), short(v));
    }
    if show_tensors {
        for t in &h.tensors {
            println!(
                "  {:<40} {:<8} {:?} @ {} ({} bytes)",
                t.name, t.ty, t.dims, t.offset, t.size
            );
        }
    }
}
