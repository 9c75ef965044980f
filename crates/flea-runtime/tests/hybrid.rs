//! The executor's staging and hybrid paths, on any machine: `Staging` below is a stand-in
//! for a GPU backend (it computes with the CPU kernels, but only from its own copies of the
//! units, which the executor must place with `make_resident` / `stage` exactly as it does for
//! a GPU). Because the arithmetic is the CPU's, every result must be bit-identical to the
//! plain CPU executor — through streaming, staging ahead, the hand-over of the hidden state
//! between the "device" and the CPU, and the KV-cache hand-over when a layer computed by
//! the CPU during decode runs on the device for a prompt (and back).

use flea_io::IoOptions;
use flea_model::backend::{AttnParams, Backend, KvShape, RopeParams, UnitStaging};
use flea_model::config::FfnActivation;
use flea_model::weights::Weight;
use flea_model::{CpuBackend, Logits, Model, Result};
use flea_runtime::plan::UnitKind;
use flea_runtime::{Links, Plan, PlanRequest, StreamedModel, Tier};
use flea_synth::{write_synthetic, Preset, QuantMix, SynthOptions};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A placed unit: key address, key length, the device copy.
type Placed = (usize, usize, Arc<Vec<u8>>);

/// A "device" whose memory is its own heap copies of units, addressed by the unit's bytes
/// in the file mapping (as on a GPU).
struct Staging {
    cpu: CpuBackend,
    /// The model file's mapping: a weight read from there must have been placed.
    file: (usize, usize),
    mapped: Mutex<Vec<Placed>>,
    /// Staged, not yet begun.
    pending: Mutex<Vec<Placed>>,
    staged: Mutex<usize>,
    max_outstanding: Mutex<usize>,
    slots: Mutex<usize>,
    /// Per layer, the cache layer it uses: after `share_kv_layers` every shared layer uses
    /// the first one's, as on the GPU (so a row not copied in or out is another layer's).
    kv_map: Mutex<Vec<usize>>,
}

impl Staging {
    fn new(model: &Model) -> Staging {
        let file = model.file.bytes();
        Staging {
            cpu: CpuBackend::new(2).unwrap(),
            file: (file.as_ptr() as usize, file.len()),
            mapped: Mutex::new(Vec::new()),
            pending: Mutex::new(Vec::new()),
            staged: Mutex::new(0),
            max_outstanding: Mutex::new(0),
            slots: Mutex::new(0),
            kv_map: Mutex::new(Vec::new()),
        }
    }

    fn kv_layer(&self, layer: usize) -> usize {
        self.kv_map
            .lock()
            .unwrap()
            .get(layer)
            .copied()
            .unwrap_or(layer)
    }

    /// Run `f` with `w` re-pointed at the device copy; a weight that was not placed is an
    /// error, as on the GPU.
    fn with<R>(&self, w: &Weight, f: impl FnOnce(&Weight) -> Result<R>) -> Result<R> {
        let p = w.data.as_ptr() as usize;
        let found = self
            .mapped
            .lock()
            .unwrap()
            .iter()
            .find(|(k, n, _)| p >= *k && p + w.data.len() <= k + n)
            .map(|(k, _, d)| (p - k, d.clone()));
        match found {
            Some((off, data)) => f(&Weight {
                data: &data[off..off + w.data.len()],
                ..*w
            }),
            // The executor's own buffers (embedding rows, output norm) are host data.
            None if p < self.file.0 || p >= self.file.0 + self.file.1 => f(w),
            None => Err(flea_model::ModelError::Backend(format!(
                "{}x{} weight of the model file not placed (or staged but not begun)",
                w.rows, w.cols
            ))),
        }
    }
}

impl Backend for Staging {
    type Act = <CpuBackend as Backend>::Act;
    type Kv = <CpuBackend as Backend>::Kv;
    fn name(&self) -> String {
        "staging test device".into()
    }
    fn alloc_act(&self, rows: usize, width: usize) -> Result<Self::Act> {
        self.cpu.alloc_act(rows, width)
    }
    fn alloc_kv(&self, shape: KvShape) -> Result<Self::Kv> {
        self.cpu.alloc_kv(shape)
    }
    fn embed(&self, t: &Weight, tokens: &[u32], scale: f32, out: &mut Self::Act) -> Result<()> {
        self.with(t, |t| self.cpu.embed(t, tokens, scale, out))
    }
    fn rms_norm(
        &self,
        n: usize,
        x: &Self::Act,
        w: &Weight,
        eps: f32,
        out: &mut Self::Act,
    ) -> Result<()> {
        self.with(w, |w| self.cpu.rms_norm(n, x, w, eps, out))
    }
    fn matmul(&self, n: usize, w: &Weight, x: &Self::Act, out: &mut Self::Act) -> Result<()> {
        self.with(w, |w| self.cpu.matmul(n, w, x, out))
    }
    fn matmuls(
        &self,
        n: usize,
        x: &Self::Act,
        jobs: &mut [(&Weight, &mut Self::Act)],
    ) -> Result<()> {
        // One at a time (the CPU's fused path gives the same sums).
        for (w, out) in jobs.iter_mut() {
            self.matmul(n, w, x, out)?;
        }
        Ok(())
    }
    fn add_bias(&self, n: usize, x: &mut Self::Act, b: &Weight) -> Result<()> {
        self.with(b, |b| self.cpu.add_bias(n, x, b))
    }
    fn rope(&self, n: usize, x: &mut Self::Act, p: &RopeParams) -> Result<()> {
        self.cpu.rope(n, x, p)
    }
    fn attention(
        &self,
        n: usize,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        kv: &mut Self::Kv,
        p: &AttnParams,
        out: &mut Self::Act,
    ) -> Result<()> {
        let p = AttnParams {
            layer: self.kv_layer(p.layer),
            ..*p
        };
        self.cpu.attention(n, q, k, v, kv, &p, out)
    }
    fn glu(
        &self,
        n: usize,
        g: &Self::Act,
        u: &Self::Act,
        a: FfnActivation,
        out: &mut Self::Act,
    ) -> Result<()> {
        self.cpu.glu(n, g, u, a, out)
    }
    fn add(&self, n: usize, x: &mut Self::Act, y: &Self::Act) -> Result<()> {
        self.cpu.add(n, x, y)
    }
    fn scale_rows(&self, n: usize, x: &mut Self::Act, s: f32) -> Result<bool> {
        self.cpu.scale_rows(n, x, s)
    }
    fn copy_rows(&self, s: &Self::Act, r: usize, n: usize, d: &mut Self::Act) -> Result<()> {
        self.cpu.copy_rows(s, r, n, d)
    }
    fn copy_rows_to(
        &self,
        s: &Self::Act,
        r: usize,
        n: usize,
        d: &mut Self::Act,
        dr: usize,
    ) -> Result<()> {
        self.cpu.copy_rows_to(s, r, n, d, dr)
    }
    fn read(&self, n: usize, x: &Self::Act) -> Result<Vec<f32>> {
        self.cpu.read(n, x)
    }
    fn write(&self, data: &[f32], x: &mut Self::Act) -> Result<()> {
        self.cpu.write(data, x)
    }
    fn kv_rows(&self, kv: &Self::Kv, l: usize, p: usize, n: usize) -> Result<(Vec<u16>, Vec<u16>)> {
        self.cpu.kv_rows(kv, self.kv_layer(l), p, n)
    }
    fn kv_dim(&self, kv: &Self::Kv) -> usize {
        self.cpu.kv_dim(kv)
    }
    fn set_kv_rows(
        &self,
        kv: &mut Self::Kv,
        l: usize,
        p: usize,
        k: &[u16],
        v: &[u16],
    ) -> Result<()> {
        self.cpu.set_kv_rows(kv, self.kv_layer(l), p, k, v)
    }
    fn share_kv_layers(&self, kv: &mut Self::Kv, shared: &[bool]) -> Result<bool> {
        let Some(first) = shared.iter().position(|&s| s) else {
            return Ok(false);
        };
        *self.kv_map.lock().unwrap() = (0..kv.shape.n_layers)
            .map(|l| {
                if shared.get(l) == Some(&true) {
                    first
                } else {
                    l
                }
            })
            .collect();
        Ok(true)
    }
}

impl UnitStaging for Staging {
    type Staged = usize;
    fn computes_in_place(&self) -> bool {
        false
    }
    fn prepare_slots(&self, depth: usize, _slot_bytes: usize) -> Result<()> {
        *self.slots.lock().unwrap() = depth;
        Ok(())
    }
    fn make_resident(&self, key: &[u8], host: &[u8]) -> Result<()> {
        self.mapped.lock().unwrap().push((
            key.as_ptr() as usize,
            key.len(),
            Arc::new(host.to_vec()),
        ));
        Ok(())
    }
    fn stage(&self, key: &[u8], host: &[u8]) -> Result<usize> {
        let mut staged = self.staged.lock().unwrap();
        *staged += 1;
        // Never more units in flight than device slots.
        assert!(
            *staged <= *self.slots.lock().unwrap(),
            "more units staged than slots"
        );
        let mut m = self.max_outstanding.lock().unwrap();
        *m = (*m).max(*staged);
        // Readable only after `begin`, as on the GPU (where compute waits for the copy there).
        self.pending.lock().unwrap().push((
            key.as_ptr() as usize,
            key.len(),
            Arc::new(host.to_vec()),
        ));
        Ok(key.as_ptr() as usize)
    }
    fn begin(&self, key: &usize) -> Result<()> {
        let mut pending = self.pending.lock().unwrap();
        let i = pending
            .iter()
            .position(|(k, _, _)| k == key)
            .expect("begin of an unstaged unit");
        self.mapped.lock().unwrap().push(pending.remove(i));
        Ok(())
    }
    fn release_units(&self) {
        self.mapped.lock().unwrap().clear();
        self.pending.lock().unwrap().clear();
        self.kv_map.lock().unwrap().clear();
    }
    fn finish(&self, key: usize, _release_host: bool) -> Result<()> {
        *self.staged.lock().unwrap() -= 1;
        // A unit staged but never begun (the CPU-rate measurement's copies) was not used.
        let mut pending = self.pending.lock().unwrap();
        if let Some(i) = pending.iter().position(|(k, _, _)| *k == key) {
            pending.remove(i);
            return Ok(());
        }
        let mut m = self.mapped.lock().unwrap();
        let i = m
            .iter()
            .position(|(k, _, _)| *k == key)
            .expect("finish of an unstaged unit");
        m.remove(i);
        Ok(())
    }
}

struct Tmp(PathBuf);
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn request(vram: u64, stages: bool, cpu_share: bool) -> PlanRequest {
    PlanRequest {
        vram_budget: vram,
        ram_budget: 1 << 40,
        n_ctx: 64,
        batch: 16,
        n_seq: 1,
        ring_depth: if vram < 1 << 40 { Some(2) } else { None },
        links: Links {
            host_to_device: Some(50e9),
            cpu_compute: cpu_share.then_some(50e9),
            ..Links::default()
        },
        stages_units: stages,
        device_scratch: 0,
        cpu_kv_layers: false,
    }
}

/// The first token of the largest logit.
fn greedy(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .fold((0, f32::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a })
        .0 as u32
}

/// A Q4_K_M model of `preset` (with `layers` layers if given) in a temporary file.
fn synth(preset: Preset, tag: &str, layers: Option<usize>) -> (Tmp, PathBuf, Model) {
    let path = std::env::temp_dir().join(format!(
        "flea-{tag}-{}-{}.gguf",
        preset.name(),
        std::process::id()
    ));
    let tmp = Tmp(path.clone());
    let mut o = SynthOptions::new(preset);
    o.quant = QuantMix::Q4_K_M;
    o.threads = 2;
    if let Some(l) = layers {
        o.shape.n_layers = l;
    }
    write_synthetic(&path, &o).unwrap();
    let model = Model::load(&path).unwrap();
    (tmp, path, model)
}

/// A prompt (device for every layer), decode (hybrid), a second multi-token turn (device
/// again: needs the KV rows the CPU wrote), decode again; all logits as bits.
fn script<B: UnitStaging>(s: &mut StreamedModel<'_, B>, vocab: usize) -> Vec<u32> {
    let prompt: Vec<u32> = (0..12u32).map(|i| (i * 37 + 11) % vocab as u32).collect();
    let mut out = s.eval(&prompt, Logits::All).unwrap();
    let mut next = 5u32;
    for step in 0..10 {
        if step == 5 {
            let turn: Vec<u32> = (0..7u32).map(|i| (i * 13 + 3) % vocab as u32).collect();
            out.extend(s.eval(&turn, Logits::All).unwrap());
        }
        let l = s.eval(&[next], Logits::Last).unwrap();
        next = greedy(&l);
        out.extend(l);
    }
    out.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn staged_and_hybrid_runs_equal_the_cpu_executor() {
    for preset in [Preset::Tiny, Preset::TinyQwen2, Preset::TinyGemma3] {
        let (_tmp, path, model) = synth(preset, "hybrid", None);
        let vocab = model.cfg.n_vocab;
        let io = IoOptions::default();

        let cpu = CpuBackend::new(2).unwrap();
        let plan = Plan::build(&model, &request(1 << 40, false, false)).unwrap();
        let want = script(
            &mut StreamedModel::new(&model, &cpu, plan.clone(), &path, &io, 64, 16).unwrap(),
            vocab,
        );
        let fixed = plan.kv_bytes + plan.act_bytes + plan.misc_bytes;
        let small = fixed + 3 * plan.slot_bytes;

        let dev = Staging::new(&model);
        // A dropped executor leaves nothing placed for the next one to find.
        let released = |dev: &Staging| {
            assert!(dev.mapped.lock().unwrap().is_empty() && dev.pending.lock().unwrap().is_empty())
        };
        // Everything resident on the "device".
        let p = Plan::build(&model, &request(1 << 40, true, false)).unwrap();
        let got = script(
            &mut StreamedModel::new(&model, &dev, p, &path, &io, 64, 16).unwrap(),
            vocab,
        );
        released(&dev);
        assert!(got == want, "{}: resident staging differs", preset.name());

        // Streamed from the host cache through 2 device slots, no CPU share.
        let p = Plan::build(&model, &request(small, true, false)).unwrap();
        assert!(p.units.iter().any(|u| u.tier == Tier::HostCache));
        let got = script(
            &mut StreamedModel::new(&model, &dev, p, &path, &io, 64, 16).unwrap(),
            vocab,
        );
        released(&dev);
        assert!(
            got == want,
            "{}: host-cache streaming differs",
            preset.name()
        );

        // Hybrid: about half the host-cached layers on the CPU.
        let p = Plan::build(&model, &request(small, true, true)).unwrap();
        let on_cpu = p.units.iter().filter(|u| u.on_cpu).count();
        assert!(
            on_cpu > 0,
            "{}: the split gave the CPU nothing",
            preset.name()
        );
        let mut s = StreamedModel::new(&model, &dev, p, &path, &io, 64, 16).unwrap();
        s.attach_cpu(&cpu, Some(50e9)).unwrap();

        let got = script(&mut s, vocab);
        assert!(s.stats.bytes_host_cpu > 0, "the CPU computed nothing");
        // Decode passes stage the next one's first GPU units; the multi-token turn
        // after decode lets them go.
        assert!(
            s.stats.units_carried_over > 0 && s.stats.units_carried_dropped > 0,
            "{}: carried {} / dropped {}",
            preset.name(),
            s.stats.units_carried_over,
            s.stats.units_carried_dropped
        );
        assert!(got == want, "{}: hybrid differs", preset.name());
        assert!(s.host.peak() <= s.host.budget && s.device.peak() <= s.device.budget);
        drop(s);
        released(&dev);
        // Three slots: the split switches sides every two layers, and two streamed layers
        // are staged ahead while the CPU computes two.
        let mut r = request(small + plan.slot_bytes, true, true);
        r.ring_depth = Some(3);
        let p = Plan::build(&model, &r).unwrap();
        let runs = p
            .units
            .windows(2)
            .filter(|w| w[0].on_cpu && w[1].on_cpu)
            .count();
        assert!(runs > 0, "{}: no run of two CPU layers", preset.name());
        let mut s = StreamedModel::new(&model, &dev, p, &path, &io, 64, 16).unwrap();
        s.attach_cpu(&cpu, Some(50e9)).unwrap();
        assert!(
            script(&mut s, vocab) == want,
            "{}: hybrid in runs of two differs",
            preset.name()
        );
        drop(s);
        released(&dev);
        // A split far off the CPU's real rate, re-balanced during decode (layers move both
        // ways, with their KV caches): still the same bits.
        let p = Plan::build(&model, &request(small, true, false)).unwrap();
        let mut s = StreamedModel::new(&model, &dev, p, &path, &io, 64, 16).unwrap();
        // (Layers whose device caches are shared stay on the CPU: keep them all here.)
        s.set_kv_sharing(false);
        s.attach_cpu(&cpu, Some(1e15)).unwrap();
        s.adapt_hybrid(true);
        let before: Vec<bool> = s.plan.units.iter().map(|u| u.on_cpu).collect();
        assert!(
            script(&mut s, vocab) == want,
            "{}: re-balanced hybrid differs",
            preset.name()
        );
        let after: Vec<bool> = s.plan.units.iter().map(|u| u.on_cpu).collect();
        let report = s.hybrid.expect("a split");
        assert!(
            report.rebalanced.is_some() && before != after,
            "{}: the split was not re-balanced",
            preset.name()
        );
        // The measured choice (whichever it is on this machine) gives the same bits.
        let p = Plan::build(&model, &request(small, true, false)).unwrap();
        drop(s);
        released(&dev);
        let mut s2 = StreamedModel::new(&model, &dev, p, &path, &io, 64, 16).unwrap();
        let report = s2
            .attach_cpu(&cpu, None)
            .unwrap()
            .expect("a measured choice");
        assert!(report.cpu_alone > 0.0 && report.copy_contended > 0.0);
        assert!(
            script(&mut s2, vocab) == want,
            "{}: measured hybrid differs",
            preset.name()
        );
        println!("{}: measured choice {:?}", preset.name(), report.choice);
        println!(
            "{}: {on_cpu} layers on the CPU, at most {} units staged at once: bit-identical",
            preset.name(),
            dev.max_outstanding.lock().unwrap()
        );
    }
}

/// A long prompt in several passes, decode (hybrid), a second turn, decode, a rewind and
/// decode again; all logits as bits.
fn long_script<B: UnitStaging>(s: &mut StreamedModel<'_, B>, vocab: usize) -> Vec<u32> {
    let v = vocab as u32;
    let prompt: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % v).collect();
    let mut out = s.eval(&prompt, Logits::All).unwrap();
    let mut next = 5u32;
    for step in 0..12 {
        if step == 4 {
            let turn: Vec<u32> = (0..19u32).map(|i| (i * 13 + 3) % v).collect();
            out.extend(s.eval(&turn, Logits::All).unwrap());
        }
        if step == 8 {
            let back = s.pos - 3;
            s.rewind(back);
        }
        let l = s.eval(&[next], Logits::Last).unwrap();
        next = greedy(&l);
        out.extend(l);
    }
    out.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn shared_device_kv_caches_equal_the_cpu_executor() {
    for preset in [Preset::Tiny, Preset::TinyQwen2, Preset::TinyGemma3] {
        // Enough layers that a split at 0.6 of the CPU's rate still gives it some.
        let (_tmp, path, model) = synth(preset, "kvshare", Some(12));
        let vocab = model.cfg.n_vocab;
        let io = IoOptions::default();
        // A context long enough that a layer's cache outweighs a layer's weights (as at a
        // few thousand positions of a 13B without grouped KV heads).
        let probe = Plan::build(&model, &request(1 << 40, true, false)).unwrap();
        let kv_per_pos = probe.kv_bytes / (64 * model.cfg.n_layers as u64);
        let n_ctx = ((2 * probe.slot_bytes / kv_per_pos.max(1)) as usize).clamp(256, 1 << 15);
        let req = |vram: u64, stages: bool, cpu: bool| {
            let mut r = request(vram, stages, cpu);
            r.n_ctx = n_ctx;
            r
        };

        let cpu = CpuBackend::new(2).unwrap();
        let plan = Plan::build(&model, &req(1 << 40, false, false)).unwrap();
        let want = long_script(
            &mut StreamedModel::new(&model, &cpu, plan, &path, &io, n_ctx, 16).unwrap(),
            vocab,
        );
        let p = Plan::build(&model, &req(1 << 40, true, false)).unwrap();
        let small = p.kv_bytes + p.act_bytes + p.misc_bytes + 3 * p.slot_bytes;
        let dev = Staging::new(&model);
        for (sharing, rate) in [(true, 50e9), (true, 1e15), (false, 50e9)] {
            let p = Plan::build(&model, &req(small, true, false)).unwrap();
            let resident = p.units.iter().filter(|u| u.tier == Tier::Resident).count();
            let mut s = StreamedModel::new(&model, &dev, p, &path, &io, n_ctx, 16).unwrap();
            s.set_kv_sharing(sharing);
            let report = s.attach_cpu(&cpu, Some(rate)).unwrap().expect("a split");
            let now = s
                .plan
                .units
                .iter()
                .filter(|u| u.tier == Tier::Resident)
                .count();
            let what = format!("{} sharing {sharing} rate {rate:e}", preset.name());
            if sharing {
                assert!(
                    report.kv_shared_layers >= 2 && report.promoted_units >= 1,
                    "{what}: {} layers shared, {} units promoted",
                    report.kv_shared_layers,
                    report.promoted_units
                );
                assert_eq!(now, resident + report.promoted_units, "{what}");
                // The KV budget shrank by the shared caches' room.
                let full = probe.kv_bytes / 64 * n_ctx as u64;
                let per_layer = full / model.cfg.n_layers as u64;
                assert_eq!(
                    s.plan.kv_bytes,
                    full - (report.kv_shared_layers as u64 - 1) * per_layer,
                    "{what}"
                );
                println!(
                    "{what}: n_ctx {n_ctx}, {} layers' device caches shared, {} units made resident",
                    report.kv_shared_layers, report.promoted_units
                );
            } else {
                assert_eq!((report.kv_shared_layers, now), (0, resident), "{what}");
            }
            let got = long_script(&mut s, vocab);
            assert!(
                s.stats.bytes_host_cpu > 0,
                "{what}: the CPU computed nothing"
            );
            assert!(got == want, "{what}: differs from the CPU executor");
            assert!(
                s.device.peak() <= s.device.budget && s.host.peak() <= s.host.budget,
                "{what}: over budget"
            );
            drop(s);
            assert!(dev.mapped.lock().unwrap().is_empty());
        }
    }
}

#[test]
fn a_budget_below_every_layers_cache_plans_shared_caches_for_the_cpu() {
    // A VRAM budget that holds every layer's device KV cache only if some layers share one:
    // with the hybrid allowed, the plan shares the last layers' caches from the start, those
    // layers stay host-cached and on the CPU in decode, and the run equals the CPU
    // executor's; without the hybrid the same budget is refused.
    for preset in [Preset::Tiny, Preset::TinyQwen2, Preset::TinyGemma3] {
        let (_tmp, path, model) = synth(preset, "kvforced", Some(12));
        let (vocab, n_layers) = (model.cfg.n_vocab, model.cfg.n_layers);
        let io = IoOptions::default();
        let probe = Plan::build(&model, &request(1 << 40, true, false)).unwrap();
        let kv_per_pos = probe.kv_bytes / (64 * n_layers as u64);
        let n_ctx = ((2 * probe.slot_bytes / kv_per_pos.max(1)) as usize).clamp(256, 1 << 15);
        let req = |vram: u64, cpu_kv: bool| {
            let mut r = request(vram, true, false);
            r.n_ctx = n_ctx;
            r.cpu_kv_layers = cpu_kv;
            r
        };
        let cpu = CpuBackend::new(2).unwrap();
        let plan = Plan::build(&model, &req(1 << 40, false)).unwrap();
        let want = long_script(
            &mut StreamedModel::new(&model, &cpu, plan, &path, &io, n_ctx, 16).unwrap(),
            vocab,
        );
        let full = Plan::build(&model, &req(1 << 40, false)).unwrap();
        let kv_layer = full.kv_bytes / n_layers as u64;
        // Three layers' caches short of the minimum with one ring slot: four share one.
        let minimum = full.kv_bytes + full.act_bytes + full.misc_bytes + full.slot_bytes;
        let budget = minimum - 3 * kv_layer;
        let what = preset.name();
        assert!(
            Plan::build(&model, &req(budget, false)).is_err(),
            "{what}: planned below the minimum"
        );
        let dev = Staging::new(&model);
        // A CPU so slow that a free split would give it nothing, with and without the
        // promotion into freed room; a balanced one; one that takes everything.
        for (rate, sharing) in [(1e6, false), (1e6, true), (50e9, true), (1e15, true)] {
            let p = Plan::build(&model, &req(budget, true)).unwrap();
            let forced: Vec<usize> = (0..n_layers).filter(|&il| p.kv_shared[il]).collect();
            assert_eq!(
                forced,
                (n_layers - 4..n_layers).collect::<Vec<_>>(),
                "{what}"
            );
            assert_eq!(p.kv_bytes, (n_layers as u64 - 3) * kv_layer, "{what}");
            for u in &p.units {
                if let UnitKind::Layer(il) = u.kind {
                    if p.kv_shared[il] {
                        assert_eq!(u.tier, Tier::HostCache, "{what}: layer {il}");
                    }
                }
            }
            // Without the CPU attached, a pass that reaches those layers fails.
            {
                let mut s =
                    StreamedModel::new(&model, &dev, p.clone(), &path, &io, n_ctx, 16).unwrap();
                let err = s.eval(&[1, 2, 3], Logits::Last).unwrap_err().to_string();
                assert!(err.contains("no device KV cache"), "{what}: {err}");
            }
            let mut s = StreamedModel::new(&model, &dev, p, &path, &io, n_ctx, 16).unwrap();
            s.set_kv_sharing(sharing);
            s.attach_cpu(&cpu, Some(rate)).unwrap().expect("a split");
            for il in n_layers - 4..n_layers {
                let on_cpu = s
                    .plan
                    .units
                    .iter()
                    .any(|u| u.kind == UnitKind::Layer(il) && u.on_cpu);
                assert!(on_cpu, "{what} rate {rate:e}: layer {il} not on the CPU");
            }
            let got = long_script(&mut s, vocab);
            assert!(
                got == want,
                "{what} rate {rate:e}: differs from the CPU executor"
            );
            assert!(
                s.device.peak() <= s.device.budget && s.device.budget == budget,
                "{what} rate {rate:e}: over budget"
            );
            drop(s);
            assert!(dev.mapped.lock().unwrap().is_empty());
        }
    }
}
