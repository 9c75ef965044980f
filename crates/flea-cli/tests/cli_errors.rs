//! Bad input to the `flea` binary: one line on stderr naming the problem, exit code 1, never
//! a panic. Covers a missing file, malformed GGUFs, an unsupported architecture and an
//! unsupported tensor type.

use flea_gguf::{GgmlType, GgufFile, GgufWriter, MetaValue};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flea-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Run `flea ARGS`, expect failure with one `error:` line mentioning `needle`.
fn expect_error(args: &[&str], needle: &str) {
    expect_error_any(args, &[needle]);
}

/// As `expect_error`, with any of `needles`.
fn expect_error_any(args: &[&str], needles: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_flea"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "flea {args:?}: exit {:?}, stderr: {stderr}",
        out.status
    );
    assert!(
        !stderr.contains("panicked"),
        "flea {args:?} panicked: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "flea {args:?}: expected one line, got: {stderr}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    let low = lines[0].to_lowercase();
    assert!(
        needles.iter().any(|n| low.contains(&n.to_lowercase())),
        "flea {args:?}: none of {needles:?} in: {stderr}"
    );
}

fn tiny_model(path: &Path) {
    let mut o = flea_synth::SynthOptions::new(flea_synth::Preset::Tiny);
    o.progress = false;
    flea_synth::write_synthetic(path, &o).unwrap();
}

/// Rewrite `src` with `edit` applied to its metadata and tensors.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl Fn(&str, &MetaValue) -> MetaValue,
    retype: Option<(&str, GgmlType)>,
) {
    let f = GgufFile::open(src).unwrap();
    let mut w = GgufWriter::new(3, f.header.alignment);
    for (k, v) in &f.header.metadata {
        w.add_meta(k, edit(k, v));
    }
    for t in &f.header.tensors {
        let mut data = f.tensor_data(t).to_vec();
        let mut ty = t.ty;
        if let Some((name, new_ty)) = retype {
            if t.name == name {
                ty = new_ty;
                let n = t.dims.iter().product::<u64>();
                data = vec![
                    0u8;
                    (n / new_ty.block_size() as u64 * new_ty.type_size() as u64) as usize
                ];
            }
        }
        w.add_tensor(&t.name, &t.dims, ty, data).unwrap();
    }
    w.write_file(dst).unwrap();
}

#[test]
fn missing_file() {
    expect_error(
        &["info", "/nonexistent/model.gguf"],
        "/nonexistent/model.gguf",
    );
    expect_error(
        &["run", "-m", "/nonexistent/model.gguf", "-p", "hi"],
        "/nonexistent/model.gguf",
    );
}

#[test]
fn malformed_files() {
    let good = tmp("good.gguf");
    tiny_model(&good);
    let bytes = std::fs::read(&good).unwrap();

    let bad_magic = tmp("magic.gguf");
    let mut b = bytes.clone();
    b[..4].copy_from_slice(b"GGML");
    std::fs::write(&bad_magic, &b).unwrap();
    expect_error(&["info", bad_magic.to_str().unwrap()], "magic");

    let bad_version = tmp("version.gguf");
    let mut b = bytes.clone();
    b[4..8].copy_from_slice(&7u32.to_le_bytes());
    std::fs::write(&bad_version, &b).unwrap();
    expect_error(
        &["run", "-m", bad_version.to_str().unwrap(), "-p", "hi"],
        "version",
    );

    for cut in [10, 200, bytes.len() / 3, bytes.len() - 100] {
        let truncated = tmp(&format!("cut{cut}.gguf"));
        std::fs::write(&truncated, &bytes[..cut]).unwrap();
        // Cut inside the header the reader sees that the counts can't fit; later, a truncation.
        expect_error_any(
            &["run", "-m", truncated.to_str().unwrap(), "-p", "hi"],
            &["truncated", "only", "past end"],
        );
    }

    let huge_count = tmp("count.gguf");
    let mut b = bytes.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&huge_count, &b).unwrap();
    expect_error(&["info", huge_count.to_str().unwrap()], "tensor");
}

#[test]
fn unsupported_architecture_and_tensor_type() {
    let good = tmp("good2.gguf");
    tiny_model(&good);
    let arch = tmp("arch.gguf");
    rewrite(
        &good,
        &arch,
        |k, v| {
            if k == "general.architecture" {
                MetaValue::String("mamba".into())
            } else {
                v.clone()
            }
        },
        None,
    );
    expect_error(
        &["run", "-m", arch.to_str().unwrap(), "-p", "hi"],
        "unsupported architecture 'mamba'",
    );

    let iq = tmp("iq.gguf");
    rewrite(
        &good,
        &iq,
        |_, v| v.clone(),
        Some(("blk.1.ffn_up.weight", GgmlType::IQ4_NL)),
    );
    expect_error(
        &["run", "-m", iq.to_str().unwrap(), "-p", "hi"],
        "'blk.1.ffn_up.weight' has type IQ4_NL",
    );
}

#[test]
fn budget_below_minimum() {
    let good = tmp("good3.gguf");
    tiny_model(&good);
    expect_error(
        &[
            "run",
            "-m",
            good.to_str().unwrap(),
            "-p",
            "hi",
            "--vram-budget",
            "64KiB",
        ],
        "below the minimum",
    );
    expect_error(
        &[
            "plan",
            "-m",
            good.to_str().unwrap(),
            "--vram-budget",
            "12 parsecs",
        ],
        "bad size",
    );
    // `flea plan --device cuda` plans for the GPU as `flea run` does, so without one (or
    // without the cuda feature) it fails as `flea run` would instead of showing a CPU plan.
    // (Where an NVIDIA device node exists it may plan; the GPU checks cover that machine.)
    if !std::path::Path::new("/dev/nvidia0").exists() {
        expect_error(
            &["plan", "-m", good.to_str().unwrap(), "--device", "cuda"],
            "cuda",
        );
    }
}
