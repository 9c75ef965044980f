//! `flea bench`: a small matrix on a tiny synthetic model writes JSON lines with every field
//! of the seed's schema (and ours), a summary and the SVG pictures; bad configs fail with one
//! line naming the line of the config.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flea-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The seed's required metrics (CONTRIBUTING.md) and the fields flea adds.
const SCHEMA: &[&str] = &[
    "gpu",
    "nvme",
    "model",
    "baseline_tokens_per_sec",
    "optimized_tokens_per_sec",
    "vram_peak_mb",
    "correctness",
    "prompt_tokens_per_sec",
    "baseline_prompt_tokens_per_sec",
    "decode_ratio_vs_baseline",
    "prompt_ratio_vs_baseline",
    "host_rss_peak_mb",
    "floor_tokens_per_sec",
    "floor_link",
    "efficiency",
    "thermal",
    "flea_commit",
    "config_hash",
    "config",
    "date",
    "case",
    "baseline",
    "runs",
];

#[test]
fn bench_writes_schema_lines_summary_and_pictures() {
    let d = dir("run");
    let cfg = d.join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "name: test
models:
  - name: tiny
    synth: tiny
devices: [cpu]
threads: [1]
vram_budgets: [6MiB, auto]
ram_budgets: [0]
prompt_tokens: [12]
gen_tokens: [6]
warmup: 1
repeats: 2
baseline: llama_cpp
trace: true
synth_dir: {}
prices:
  - label: box
    usd_per_hour: 1.0
",
            d.join("models").display()
        ),
    )
    .unwrap();
    let out = d.join("out");
    let r = Command::new(env!("CARGO_BIN_EXE_flea"))
        .args(["bench", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "flea bench failed: {stderr}");
    let text = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for l in &lines {
        for k in SCHEMA {
            assert!(l.get(*k).is_some(), "field {k} missing in {l}");
        }
        assert!(l["error"].is_null(), "{l}");
        let decode = l["optimized_tokens_per_sec"].as_f64().expect("flea tok/s");
        assert!(decode > 0.0);
        assert!(l["prompt_tokens_per_sec"].as_f64().expect("prompt tok/s") > 0.0);
        assert!(l["host_rss_peak_mb"].as_f64().expect("RSS") > 0.0);
        assert!(l["vram_peak_mb"].as_f64().expect("device arena peak") > 0.0);
        let floor = l["floor_tokens_per_sec"].as_f64().expect("floor");
        let eff = l["efficiency"].as_f64().expect("efficiency");
        assert!((eff - decode / floor).abs() < 1e-9 * eff.max(1.0));
        assert!(l["floor_link"].is_string());
        assert_eq!(
            l["runs"]["flea_decode_tokens_per_sec"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert!(l["case"]["prompt_tokens"].as_u64().unwrap() <= 12);
        assert!(l["config_hash"].as_str().unwrap().starts_with("fnv1a64:"));
        assert!(!l["flea_commit"].as_str().unwrap().is_empty());
        // The baseline is a number only with llama-cpp-python; otherwise null with the reason.
        match l["baseline_tokens_per_sec"].as_f64() {
            Some(b) => {
                assert!(b > 0.0);
                assert!(l["decode_ratio_vs_baseline"].as_f64().is_some());
                let c = l["correctness"].as_str().unwrap();
                assert!(c.starts_with("validated vs llama.cpp"), "{c}");
            }
            None => {
                assert!(l["baseline_prompt_tokens_per_sec"].is_null());
                let note = l["baseline"]["note"].as_str().unwrap_or("");
                assert!(!note.is_empty(), "null baseline without a reason: {l}");
                assert!(l["correctness"]
                    .as_str()
                    .unwrap()
                    .starts_with("not checked"));
            }
        }
    }
    // The 6 MiB budget streams every layer from disk; auto keeps them resident.
    assert_eq!(lines[0]["floor_link"], "disk", "{}", lines[0]);
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        summary.contains("| tiny (") && summary.contains("$/Mtok"),
        "{summary}"
    );
    let chart = std::fs::read_to_string(out.join("budget-chart-00.svg")).unwrap();
    assert!(chart.starts_with("<svg") && chart.contains("floor"));
    let timeline = lines[0]["timeline_svg"].as_str().expect("a timeline");
    let t = std::fs::read_to_string(out.join(timeline)).unwrap();
    assert!(t.contains("disk read") && t.contains("blk.0"), "{t}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_configs_fail_with_the_line() {
    let d = dir("bad");
    let cases = [
        ("name: x\nmodels:\n  - name: a\n    synth: tiny\nprompt_tokens: [4]\ngen_tokens: [4]\nrepeat: 3\n", "line 7", "unknown field `repeat`"),
        ("name: x\nmodels:\n  - name: a\n    synth: tiny\nprompt_tokens: [4]\ngen_tokens: [4]\nvram_budgets: [12 bananas]\n", "line 7", "bad budget"),
        ("name: x\nmodels:\n  - name: a\n    sinth: tiny\nprompt_tokens: [4]\ngen_tokens: [4]\n", "line 4", "unknown field `sinth`"),
    ];
    for (i, (text, line, what)) in cases.iter().enumerate() {
        let cfg = d.join(format!("bad{i}.yaml"));
        std::fs::write(&cfg, text).unwrap();
        let r = Command::new(env!("CARGO_BIN_EXE_flea"))
            .args(["bench", "--dry-run", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].starts_with("error: "), "{stderr}");
        assert!(
            lines[0].contains(line) && lines[0].contains(what),
            "{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}
