//! `flea serve` against the official `openai` Python client (tests/openai_client.py): whole
//! and streamed chat and completions, greedy output equal to `flea run`, 16 concurrent
//! streams, bad requests, a dropped client, the API key, and a graceful SIGTERM.
//!
//! The client comes from the package registry: scripts/test.sh installs `openai` into
//! ~/.cache/flea/py-openai (FLEA_OPENAI_PYTHONPATH overrides). Without it (or without
//! Python) the test skips, unless FLEA_REQUIRE_MODELS=1 makes that a failure.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FLEA: &str = env!("CARGO_BIN_EXE_flea");

fn required() -> bool {
    std::env::var("FLEA_REQUIRE_MODELS").is_ok_and(|v| v == "1")
}

/// PYTHONPATH holding the `openai` package, if python3 can import it from there.
fn openai_pythonpath() -> Option<String> {
    let dir = std::env::var("FLEA_OPENAI_PYTHONPATH").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/flea/py-openai")
    });
    let ok = Command::new("python3")
        .args(["-c", "import openai"])
        .env("PYTHONPATH", &dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Some(dir)
    } else if required() {
        panic!(
            "python3 with the openai package in {dir} is required (scripts/test.sh installs it)"
        );
    } else {
        eprintln!("skipping: python3 cannot import openai from {dir} (run scripts/test.sh)");
        None
    }
}

/// `flea run --temp 0 -n 16` output for `prompt` (stdout without the final newline).
fn flea_run(model: &Path, prompt: &str) -> String {
    let out = Command::new(FLEA)
        .args(["run", "-m"])
        .arg(model)
        .args([
            "-p", prompt, "-n", "16", "--temp", "0", "-t", "2", "-c", "256",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "flea run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    s.strip_suffix('\n').unwrap_or(&s).to_string()
}

#[test]
fn the_openai_client_talks_to_flea_serve() {
    let Some(model) = flea_gguf::model_or_skip("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let Some(pythonpath) = openai_pythonpath() else {
        return;
    };
    // A sequence batched with others computes bit-identically to its own run, so greedy
    // outputs through the server equal `flea run`'s exactly, concurrent or not.
    let prompts = [
        "Once upon a time",
        "1, 2, 3, 4, 5, 6,",
        "Monday, Tuesday, Wednesday,",
        "The capital of France is",
        "January, February, March,",
        "a b c d e f g",
        "def fibonacci(n):",
        "The quick brown fox",
    ];
    let expected: serde_json::Map<String, serde_json::Value> = prompts
        .iter()
        .map(|p| (p.to_string(), serde_json::json!(flea_run(&model, p))))
        .collect();

    let key = "test-key-123";
    let mut server = Command::new(FLEA)
        .args(["serve", "-m"])
        .arg(&model)
        .args([
            "--port",
            "0",
            "--api-key",
            key,
            "--parallel",
            "16",
            "-c",
            "256",
            "-t",
            "2",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = server.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Forward the server's log and pick out the bound address.
    let log = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[serve] {line}");
            if let Some(rest) = line.split("listening on ").nth(1) {
                let url = rest.split_whitespace().next().unwrap_or("").to_string();
                let _ = tx.send(url);
            }
        }
    });
    let base = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(u) => u,
        Err(_) => {
            let _ = server.kill();
            panic!("flea serve did not start");
        }
    };
    let script: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "openai_client.py"]
        .iter()
        .collect();
    let status = Command::new("python3")
        .arg(&script)
        .args([
            &base,
            key,
            "SmolLM2-135M-Instruct.Q4_1",
            &serde_json::Value::Object(expected).to_string(),
            &server.id().to_string(),
        ])
        .env("PYTHONPATH", &pythonpath)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .status()
        .unwrap();
    if !status.success() {
        let _ = server.kill();
        let _ = server.wait();
        panic!("the openai client checks failed ({status})");
    }
    // The script sent SIGTERM mid-stream: the server finishes and exits cleanly.
    let t0 = Instant::now();
    let exit = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = server.kill();
            panic!("flea serve did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = log.join();
    assert!(
        exit.success(),
        "flea serve exited with {exit} after SIGTERM"
    );
}
