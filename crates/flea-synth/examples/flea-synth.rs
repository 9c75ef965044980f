//! Stand-alone driver for the two commands until the CLI wires them in:
//! `cargo run --release -p flea-synth --example flea-synth -- synth /tmp/m.gguf --preset 7b`.

use clap::Parser;

#[derive(Parser)]
enum Cmd {
    /// Write a synthetic GGUF model.
    Synth(flea_synth::SynthArgs),
    /// Rewrite a GGUF with 4 KiB-aligned contiguous layers.
    Repack(flea_synth::RepackArgs),
}

fn main() {
    let r = match Cmd::parse() {
        Cmd::Synth(a) => flea_synth::run_synth(a),
        Cmd::Repack(a) => flea_synth::run_repack(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
