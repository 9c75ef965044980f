//! Fully resident decode (and prompt) speed of GGUF models on one CUDA device, beside the
//! memory roofline: weight bytes read per token / device copy bandwidth measured in the same
//! run (1 GiB device-to-device copy, read + write bytes counted).
//!
//! usage: flea-cuda-bench [--tokens N] [--prompt N] [--json OUT] MODEL.gguf...

use flea_cuda::CudaBackend;
use flea_model::{Logits, Model, Session};
use std::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn weight_bytes_per_token(m: &Model) -> Res<u64> {
    let h = m.head_weights()?;
    let mut b = (h.output_norm.data.len() + h.output.data.len() + h.token_embd.row_bytes()) as u64;
    for il in 0..m.cfg.n_layers {
        let l = m.layer_weights(il)?;
        let mut ws = vec![
            l.attn_norm,
            l.wq,
            l.wk,
            l.wv,
            l.wo,
            l.ffn_norm,
            l.w_gate,
            l.w_up,
            l.w_down,
        ];
        ws.extend(
            [
                l.bq,
                l.bk,
                l.bv,
                l.q_norm,
                l.k_norm,
                l.attn_post_norm,
                l.ffn_post_norm,
            ]
            .into_iter()
            .flatten(),
        );
        b += ws.iter().map(|w| w.data.len() as u64).sum::<u64>();
    }
    Ok(b)
}

/// The value after a flag, as a count.
fn count_arg(flag: &str, v: Option<String>) -> Res<usize> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    Ok(v.parse()
        .map_err(|e| format!("{flag} {v}: not a count ({e})"))?)
}

fn date_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() -> Res<()> {
    let mut tokens = 128usize;
    let mut prompt = 512usize;
    let mut json: Option<String> = None;
    let mut models = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--tokens" => tokens = count_arg("--tokens", args.next())?,
            "--prompt" => prompt = count_arg("--prompt", args.next())?,
            "--json" => json = args.next(),
            _ => models.push(a),
        }
    }
    if models.is_empty() {
        eprintln!("usage: flea-cuda-bench [--tokens N] [--prompt N] [--json OUT] MODEL.gguf...");
        std::process::exit(2);
    }
    let date = date_utc();
    let mut rows = Vec::new();
    let mut bw = 0.0;
    let mut card = String::new();
    for path in &models {
        // A fresh backend per model: the weight cache is keyed by host address.
        let cuda = match CudaBackend::new(0) {
            Ok(b) => b,
            Err(e) => {
                println!("SKIP: no CUDA device ({e})");
                return Ok(());
            }
        };
        card = cuda.device_name().to_string();
        if bw == 0.0 {
            bw = cuda.measure_copy_bandwidth(1 << 30, 5)?;
            eprintln!("device copy bandwidth: {:.0} GB/s (read+write)", bw / 1e9);
        }
        let model = Model::load(std::path::Path::new(path))?;
        let bytes = weight_bytes_per_token(&model)?;
        let vocab = model.cfg.n_vocab as u32;
        let n_ctx = (prompt + tokens + 16).max(64);
        // Prompt speed (also uploads every weight).
        let ptoks: Vec<u32> = (0..prompt as u32)
            .map(|i| (i * 7919 + 13) % vocab)
            .collect();
        let mut s = Session::new(&model, &cuda, n_ctx, prompt.max(1))?;
        let t = Instant::now();
        s.eval(&ptoks, Logits::Last)?;
        let first_prompt = t.elapsed().as_secs_f64();
        s.reset();
        let t = Instant::now();
        s.eval(&ptoks, Logits::Last)?;
        let prompt_s = t.elapsed().as_secs_f64();
        // The same prompt with the precise (F32) GEMM.
        cuda.set_precise_gemm(true);
        s.reset();
        let t = Instant::now();
        s.eval(&ptoks, Logits::Last)?;
        let prompt_f32_s = t.elapsed().as_secs_f64();
        cuda.set_precise_gemm(false);
        s.reset();
        let l = s.eval(&ptoks, Logits::Last)?;
        // Decode.
        let mut next = argmax(&l);
        for _ in 0..4 {
            next = argmax(&s.eval(&[next], Logits::Last)?);
        }
        let t = Instant::now();
        for _ in 0..tokens {
            next = argmax(&s.eval(&[next], Logits::Last)?);
        }
        let dec_s = t.elapsed().as_secs_f64();
        let tok_s = tokens as f64 / dec_s;
        // Matvec alone on layer 0's matrices and the output: GB/s per weight type.
        {
            use flea_model::Backend;
            let l = model.layer_weights(0)?;
            let h = model.head_weights()?;
            for (name, w) in [
                ("wq", l.wq),
                ("wv", l.wv),
                ("gate", l.w_gate),
                ("down", l.w_down),
                ("output", h.output),
            ] {
                let x = cuda.alloc_act(1, w.cols)?;
                let mut o = cuda.alloc_act(1, w.rows)?;
                cuda.matmul(1, &w, &x, &mut o)?;
                cuda.synchronize()?;
                let reps = 50;
                let t = Instant::now();
                for _ in 0..reps {
                    cuda.matmul(1, &w, &x, &mut o)?;
                }
                cuda.synchronize()?;
                let dt = t.elapsed().as_secs_f64() / reps as f64;
                eprintln!(
                    "matvec {name} {} {}x{}: {:.1} us, {:.0} GB/s",
                    w.ty,
                    w.rows,
                    w.cols,
                    dt * 1e6,
                    w.data.len() as f64 / dt / 1e9
                );
            }
        }
        let roof = bw / bytes as f64;
        eprintln!(
            "{path}: first prompt pass {first_prompt:.2} s (uploads {:.2} GiB), {}, mmvq alignment fallbacks {}",
            cuda.uploaded_bytes() as f64 / (1u64 << 30) as f64,
            cuda.kernel_cache(),
            cuda.mmvq_misaligned()
        );
        rows.push(serde_json::json!({
            "model": path,
            "arch": format!("{:?}", model.cfg.arch),
            "layers": model.cfg.n_layers,
            "weight_bytes_per_token": bytes,
            "decode_tokens": tokens,
            "decode_tok_s": tok_s,
            "ms_per_token": 1e3 / tok_s,
            "roofline_tok_s": roof,
            "roofline_fraction": tok_s / roof,
            "achieved_gb_s": tok_s * bytes as f64 / 1e9,
            "prompt_tokens": prompt,
            "prompt_tok_s": prompt as f64 / prompt_s,
            "prompt_f32_gemm_tok_s": prompt as f64 / prompt_f32_s,
        }));
    }
    println!();
    println!(
        "card: {card}; date: {date}; device copy bandwidth (read+write): {:.0} GB/s",
        bw / 1e9
    );
    println!(
        "| model | weights/token GiB | decode tok/s | ms/token | roofline tok/s | fraction | achieved GB/s | prompt {} tok/s (F16 GEMM) | (F32 GEMM) |",
        prompt
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.2} | {:.1} | {:.2} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} |",
            r["model"].as_str().unwrap_or("?"),
            r["weight_bytes_per_token"].as_u64().unwrap_or(0) as f64 / (1u64 << 30) as f64,
            r["decode_tok_s"].as_f64().unwrap_or(f64::NAN),
            r["ms_per_token"].as_f64().unwrap_or(f64::NAN),
            r["roofline_tok_s"].as_f64().unwrap_or(f64::NAN),
            r["roofline_fraction"].as_f64().unwrap_or(f64::NAN),
            r["achieved_gb_s"].as_f64().unwrap_or(f64::NAN),
            r["prompt_tok_s"].as_f64().unwrap_or(f64::NAN),
            r["prompt_f32_gemm_tok_s"].as_f64().unwrap_or(f64::NAN),
        );
    }
    if let Some(p) = json {
        let doc = serde_json::json!({
            "card": card, "date": date, "copy_bandwidth_bytes_s": bw, "runs": rows,
        });
        std::fs::write(&p, serde_json::to_string_pretty(&doc)?)
            .map_err(|e| format!("writing {p}: {e}"))?;
    }
    Ok(())
}
