//! The YAML benchmark matrix. Unknown keys and bad values are errors that name the line:
//! every struct denies unknown fields, and every value with rules of its own (sizes, devices,
//! presets, ...) is checked while it is parsed, so the YAML parser reports its position.

use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::num::NonZeroUsize;

/// Most cases one config may expand to (a bound on the benchmark loop).
pub const MAX_CASES: usize = 512;
/// Most repetitions (and warm-ups) per case.
pub const MAX_REPEATS: usize = 100;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names the results.
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub models: Vec<ModelSpec>,
    #[serde(default = "default_devices")]
    pub devices: Vec<Device>,
    #[serde(default = "default_threads")]
    pub threads: Vec<Threads>,
    #[serde(default = "default_budgets")]
    pub vram_budgets: Vec<Budget>,
    #[serde(default = "default_budgets")]
    pub ram_budgets: Vec<Budget>,
    #[serde(default = "default_io")]
    pub io: Vec<Io>,
    pub prompt_tokens: Vec<NonZeroUsize>,
    /// Tokens generated per run; the first comes from the prompt, the rest are decode steps.
    pub gen_tokens: Vec<GenTokens>,
    #[serde(default = "default_batch")]
    pub batch: Vec<NonZeroUsize>,
    /// Context size (default: prompt + generated tokens, rounded up to 256).
    #[serde(default)]
    pub ctx: Option<NonZeroUsize>,
    #[serde(default)]
    pub warmup: Count,
    #[serde(default = "one")]
    pub repeats: Count,
    #[serde(default)]
    pub baseline: Baseline,
    /// Check flea's greedy tokens against llama.cpp (needs the llama.cpp baseline).
    #[serde(default = "yes")]
    pub correctness: bool,
    /// Write an SVG timeline of one token for each streamed case.
    #[serde(default)]
    pub trace: bool,
    /// Where synthetic models are written (default: `~/.cache/flea/bench-models`).
    #[serde(default)]
    pub synth_dir: Option<String>,
    /// Python with llama-cpp-python (default: $FLEA_PYTHON or python3).
    #[serde(default)]
    pub python: Option<String>,
    /// Seconds before one run is killed.
    #[serde(default = "default_timeout")]
    pub timeout_s: NonZeroUsize,
    /// Machine prices for $/token in the summary (docs/COST.md).
    #[serde(default)]
    pub prices: Vec<Price>,
    /// Before each run, wait until the 1-minute load average is at most this (shared
    /// machines), for at most `wait_idle_max_s` seconds.
    #[serde(default)]
    pub wait_idle: Option<PositiveF64>,
    #[serde(default = "default_wait_idle_max")]
    pub wait_idle_max_s: NonZeroUsize,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// What the price is for, e.g. "H100 80GB on-demand".
    pub label: String,
    /// US dollars per hour of the whole machine.
    pub usd_per_hour: PositiveF64,
}

/// One model: a GGUF file, or a synthetic preset generated on the fly.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub source: ModelSource,
}

#[derive(Debug, Clone)]
pub enum ModelSource {
    Path(String),
    Synth {
        preset: flea_synth::Preset,
        quant: flea_synth::QuantMix,
        seed: u64,
        layers: Option<usize>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    synth: Option<String>,
    #[serde(default)]
    quant: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    layers: Option<NonZeroUsize>,
}

impl<'de> Deserialize<'de> for ModelSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use clap::ValueEnum;
        let r = RawModel::deserialize(d)?;
        let source = match (r.path, r.synth) {
            (Some(p), None) => {
                if r.quant.is_some() || r.seed.is_some() || r.layers.is_some() {
                    return Err(de::Error::custom(format!(
                        "model {}: quant/seed/layers apply only to synth models",
                        r.name
                    )));
                }
                ModelSource::Path(p)
            }
            (None, Some(s)) => {
                let preset = flea_synth::Preset::from_str(&s, true).map_err(|_| {
                    de::Error::custom(format!(
                        "model {}: unknown synth preset '{s}' (one of {})",
                        r.name,
                        names(flea_synth::Preset::ALL.iter().map(|p| p.name()))
                    ))
                })?;
                let q = r.quant.as_deref().unwrap_or("q4_k_m");
                let quant = flea_synth::QuantMix::from_str(q, true).map_err(|_| {
                    de::Error::custom(format!("model {}: unknown quant '{q}'", r.name))
                })?;
                ModelSource::Synth {
                    preset,
                    quant,
                    seed: r.seed.unwrap_or(0),
                    layers: r.layers.map(NonZeroUsize::get),
                }
            }
            _ => {
                return Err(de::Error::custom(format!(
                    "model {}: give exactly one of `path` or `synth`",
                    r.name
                )))
            }
        };
        if r.name.is_empty() || !r.name.chars().all(|c| c.is_ascii_graphic()) {
            return Err(de::Error::custom(format!(
                "model name '{}' must be non-empty printable ASCII without spaces",
                r.name
            )));
        }
        Ok(ModelSpec {
            name: r.name,
            source,
        })
    }
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.collect::<Vec<_>>().join(", ")
}

/// `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device(pub String);

impl Device {
    pub fn gpu_index(&self) -> Option<usize> {
        match self.0.as_str() {
            "cuda" => Some(0),
            s => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()),
        }
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let ok = s == "cpu"
            || s == "cuda"
            || s.strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<u16>().is_ok());
        if !ok {
            return Err(de::Error::custom(format!(
                "bad device '{s}' (cpu, cuda or cuda:N)"
            )));
        }
        Ok(Device(s))
    }
}

/// A thread count or `all` (None).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threads(pub Option<usize>);

impl<'de> Deserialize<'de> for Threads {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum T {
            N(u64),
            S(String),
        }
        match T::deserialize(d)? {
            T::N(n) if (1..=4096).contains(&n) => Ok(Threads(Some(n as usize))),
            T::S(s) if s == "all" => Ok(Threads(None)),
            T::N(n) => Err(de::Error::custom(format!(
                "bad thread count {n} (1..4096 or all)"
            ))),
            T::S(s) => Err(de::Error::custom(format!(
                "bad thread count '{s}' (1..4096 or all)"
            ))),
        }
    }
}

/// A memory budget: `auto` (flea's default; for llama.cpp on a GPU every layer offloaded)
/// or a size such as `512MiB`, `8GiB`, `0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget(pub Option<u64>);

impl Budget {
    pub fn label(&self) -> String {
        match self.0 {
            None => "auto".into(),
            Some(b) => flea_runtime::fmt_size(b),
        }
    }
}

impl<'de> Deserialize<'de> for Budget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum B {
            N(u64),
            S(String),
        }
        match B::deserialize(d)? {
            B::N(n) => Ok(Budget(Some(n))),
            B::S(s) if s == "auto" => Ok(Budget(None)),
            B::S(s) => flea_runtime::parse_size(&s)
                .map(|b| Budget(Some(b)))
                .map_err(|e| de::Error::custom(format!("bad budget '{s}': {e} (or auto)"))),
        }
    }
}

/// `mmap`, `pread` or `io_uring`, and whether reads bypass the page cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Io {
    pub backend: flea_io::IoBackend,
    pub direct: bool,
}

impl Io {
    pub fn label(&self) -> String {
        format!(
            "{}{}",
            self.backend,
            if self.direct { "" } else { "+cache" }
        )
    }
}

impl<'de> Deserialize<'de> for Io {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let (name, direct) = match s.strip_suffix("+cache") {
            Some(n) => (n, false),
            None => (s.as_str(), true),
        };
        let backend = name.parse::<flea_io::IoBackend>().map_err(|_| {
            de::Error::custom(format!(
                "bad io '{s}' (mmap, pread or io_uring; add +cache to read through the page cache)"
            ))
        })?;
        Ok(Io { backend, direct })
    }
}

/// Generated tokens per run: at least 2 (one from the prompt, one decode step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenTokens(pub usize);

impl<'de> Deserialize<'de> for GenTokens {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        if !(2..=1_000_000).contains(&n) {
            return Err(de::Error::custom(format!(
                "gen_tokens {n}: need 2..1000000 (the first token comes from the prompt; decode speed needs at least one more)"
            )));
        }
        Ok(GenTokens(n as usize))
    }
}

/// A repetition count 0..=MAX_REPEATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Count(pub usize);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        if n > MAX_REPEATS as u64 {
            return Err(de::Error::custom(format!(
                "count {n} is over the limit {MAX_REPEATS}"
            )));
        }
        Ok(Count(n as usize))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PositiveF64(pub f64);

impl<'de> Deserialize<'de> for PositiveF64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let x = f64::deserialize(d)?;
        if !(x.is_finite() && x > 0.0) {
            return Err(de::Error::custom(format!("{x} must be a positive number")));
        }
        Ok(PositiveF64(x))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    /// No comparison run.
    #[default]
    None,
    /// llama.cpp through llama-cpp-python, same GGUF, same threads.
    LlamaCpp,
}

fn default_devices() -> Vec<Device> {
    vec![Device("cpu".into())]
}
fn default_threads() -> Vec<Threads> {
    vec![Threads(None)]
}
fn default_budgets() -> Vec<Budget> {
    vec![Budget(None)]
}
fn default_io() -> Vec<Io> {
    vec![Io {
        backend: flea_io::IoBackend::Pread,
        direct: true,
    }]
}
fn default_batch() -> Vec<NonZeroUsize> {
    vec![NonZeroUsize::new(512).unwrap_or(NonZeroUsize::MIN)]
}
fn default_timeout() -> NonZeroUsize {
    NonZeroUsize::new(600).unwrap_or(NonZeroUsize::MIN)
}
fn default_wait_idle_max() -> NonZeroUsize {
    NonZeroUsize::new(120).unwrap_or(NonZeroUsize::MIN)
}
fn one() -> Count {
    Count(1)
}
fn yes() -> bool {
    true
}

/// One point of the matrix.
#[derive(Debug, Clone)]
pub struct Case {
    pub model: usize,
    pub device: Device,
    pub threads: Threads,
    pub vram: Budget,
    pub ram: Budget,
    pub io: Io,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub batch: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The 1-based line where top-level `key:` is written, for errors found after parsing.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let pat = format!("{key}:");
    text.lines()
        .position(|l| l.starts_with(&pat))
        .map(|i| i + 1)
}

impl Config {
    /// Parse and check a config; `origin` names it in errors (a file name).
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let c: Config =
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        let at = |key: &str| match line_of(text, key) {
            Some(l) => format!("{origin}: line {l}: "),
            None => format!("{origin}: "),
        };
        let lists: [(&str, usize); 9] = [
            ("models", c.models.len()),
            ("devices", c.devices.len()),
            ("threads", c.threads.len()),
            ("vram_budgets", c.vram_budgets.len()),
            ("ram_budgets", c.ram_budgets.len()),
            ("io", c.io.len()),
            ("prompt_tokens", c.prompt_tokens.len()),
            ("gen_tokens", c.gen_tokens.len()),
            ("batch", c.batch.len()),
        ];
        let mut cases = 1usize;
        for (key, n) in lists {
            if n == 0 {
                return Err(ConfigError(format!("{}`{key}` is empty", at(key))));
            }
            cases = cases.saturating_mul(n);
        }
        if cases > MAX_CASES {
            return Err(ConfigError(format!(
                "{origin}: the matrix has {cases} cases, over the limit {MAX_CASES}"
            )));
        }
        if c.repeats.0 == 0 {
            return Err(ConfigError(format!(
                "{}`repeats` must be at least 1",
                at("repeats")
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for m in &c.models {
            if !seen.insert(m.name.as_str()) {
                return Err(ConfigError(format!(
                    "{}model name '{}' is used twice",
                    at("models"),
                    m.name
                )));
            }
        }
        if let Some(ctx) = c.ctx {
            let need = c.prompt_tokens.iter().map(|p| p.get()).max().unwrap_or(0)
                + c.gen_tokens.iter().map(|g| g.0).max().unwrap_or(0);
            if ctx.get() < need {
                return Err(ConfigError(format!(
                    "{}ctx {} is smaller than the longest prompt + generation ({need})",
                    at("ctx"),
                    ctx
                )));
            }
        }
        Ok(c)
    }

    /// Every case, models outermost (so each model is prepared once), budgets innermost.
    pub fn cases(&self) -> Vec<Case> {
        let mut v = Vec::new();
        for model in 0..self.models.len() {
            for device in &self.devices {
                for &threads in &self.threads {
                    for io in &self.io {
                        for &prompt in &self.prompt_tokens {
                            for &gen in &self.gen_tokens {
                                for &batch in &self.batch {
                                    for &ram in &self.ram_budgets {
                                        for &vram in &self.vram_budgets {
                                            v.push(Case {
                                                model,
                                                device: device.clone(),
                                                threads,
                                                vram,
                                                ram,
                                                io: io.clone(),
                                                prompt_tokens: prompt.get(),
                                                gen_tokens: gen.0,
                                                batch: batch.get(),
                                            });
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        v
    }

    pub fn ctx_for(&self, case: &Case) -> usize {
        match self.ctx {
            Some(c) => c.get(),
            None => (case.prompt_tokens + case.gen_tokens).next_multiple_of(256),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
name: t
models:
  - name: tiny
    synth: tiny
  - name: real
    path: /x.gguf
threads: [1, all]
vram_budgets: [auto, 64MiB]
io: [pread, io_uring+cache]
prompt_tokens: [8]
gen_tokens: [4]
repeats: 2
prices:
  - label: box
    usd_per_hour: 1.5
";

    fn err(text: &str) -> String {
        match Config::parse(text, "c.yaml") {
            Ok(_) => panic!("config was accepted:\n{text}"),
            Err(e) => e.0,
        }
    }

    #[test]
    fn a_good_config_expands_to_its_matrix() {
        let c = Config::parse(GOOD, "c.yaml").expect("valid config");
        assert_eq!(c.cases().len(), 2 * 2 * 2 * 2);
        assert_eq!(c.vram_budgets[1], Budget(Some(64 << 20)));
        assert_eq!(c.threads, vec![Threads(Some(1)), Threads(None)]);
        assert!(!c.io[1].direct);
        assert_eq!(c.ctx_for(&c.cases()[0]), 256);
    }

    #[test]
    fn unknown_keys_name_their_line() {
        let e = err(&GOOD.replace("repeats: 2", "repeat: 2"));
        assert!(e.contains("unknown field `repeat`"), "{e}");
        assert!(e.contains("line 12"), "{e}");
        let e = err(&GOOD.replace("    synth: tiny", "    synth: tiny\n    colour: red"));
        assert!(
            e.contains("unknown field `colour`") && e.contains("line 5"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_their_line() {
        let e = err(&GOOD.replace("64MiB", "64XB"));
        assert!(
            e.contains("bad budget '64XB'") && e.contains("line 8"),
            "{e}"
        );
        // Checks across a model's keys point at the model's entry.
        let e = err(&GOOD.replace("synth: tiny", "synth: huge"));
        assert!(
            e.contains("unknown synth preset 'huge'") && e.contains("line 3"),
            "{e}"
        );
        let e = err(&GOOD.replace("[pread, io_uring+cache]", "[pread, floppy]"));
        assert!(e.contains("bad io 'floppy'") && e.contains("line 9"), "{e}");
        let e = err(&GOOD.replace("gen_tokens: [4]", "gen_tokens: [1]"));
        assert!(e.contains("gen_tokens 1") && e.contains("line 11"), "{e}");
        let e = err(&GOOD.replace("threads: [1, all]", "threads: [0]"));
        assert!(
            e.contains("bad thread count 0") && e.contains("line 7"),
            "{e}"
        );
        let e = err(&GOOD.replace("usd_per_hour: 1.5", "usd_per_hour: -1"));
        assert!(e.contains("positive") && e.contains("line 14"), "{e}");
        let e = err(&GOOD.replace("repeats: 2", "repeats: 0"));
        assert!(e.contains("line 12") && e.contains("at least 1"), "{e}");
        let e = err(&GOOD.replace("    path: /x.gguf", "    path: /x.gguf\n    synth: 7b"));
        assert!(e.contains("exactly one of `path` or `synth`"), "{e}");
        let e = err(&GOOD.replace("name: real", "name: tiny"));
        assert!(e.contains("used twice") && e.contains("line 2"), "{e}");
        let e = err("name: t\nmodels: []\nprompt_tokens: [8]\ngen_tokens: [4]\n");
        assert!(
            e.contains("line 2") && e.contains("`models` is empty"),
            "{e}"
        );
        let e = err(&format!("{GOOD}ctx: 8\n"));
        assert!(e.contains("line 16") && e.contains("smaller"), "{e}");
    }

    #[test]
    fn oversized_matrices_are_refused() {
        let big: Vec<String> = (1..=40).map(|i| i.to_string()).collect();
        let t = GOOD.replace(
            "prompt_tokens: [8]",
            &format!("prompt_tokens: [{}]", big.join(",")),
        );
        assert!(err(&t).contains("over the limit"));
    }
}
