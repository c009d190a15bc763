//! Tactic selection: time every valid kernel implementation of each layer on
//! this device, for its exact shapes, and keep the fastest.
//!
//! Each candidate is warmed up, then run several times; the median wins.
//! Results go into a [`TimingCache`] keyed by device fingerprint, thread
//! count and op signature, so a second build of the same (or a similar)
//! model skips the timing.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use osprey_kernels::conv::{Conv2d, Conv2dGeometry, ConvTactic};
use osprey_kernels::conv_nhwc::Conv2dNhwc;
use osprey_kernels::int8::quantize_to_i8;
use osprey_kernels::qconv::{QConv2d, QIn, QOut};
use osprey_kernels::qconv_nhwc::QConv2dNhwc;
use osprey_kernels::ThreadPool;

/// One run of an INT8 layer form: input, residual, output, scratch.
type RunInt8<'a> = dyn Fn(QIn, Option<&[f32]>, QOut, &mut [f32]) + 'a;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::fingerprint::Fingerprint;
use crate::ir::{ConstData, Graph, Op};

/// One cached decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// Winning tactic name.
    pub tactic: String,
    /// Its median time, ms.
    pub ms: f64,
    /// Every candidate's median time, ms.
    pub candidates: BTreeMap<String, f64>,
}

/// A reusable record of tactic timings.
///
/// Timings describe the kernels of the osprey build that measured them, so
/// a cache names that build ([`build_id`]) and another build starts it
/// afresh (as TensorRT ties its timing caches to its version): a newer
/// kernel must not lose its race to its predecessor's time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TimingCache {
    /// Format version of the cache file.
    pub version: u32,
    /// The osprey build whose kernels were timed ([`build_id`]).
    #[serde(default)]
    pub build: String,
    /// Decisions by key (`device | threads | op signature`).
    pub entries: BTreeMap<String, CacheEntry>,
    /// Entries of another build dropped by [`TimingCache::load`].
    #[serde(skip)]
    pub discarded: usize,
}

/// This osprey build: the version and the running executable's size and
/// modification time (a rebuilt or upgraded binary is another build; an
/// installed package keeps its files' times, so robots running the same
/// package share caches).
pub fn build_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let exe = std::env::current_exe()
            .and_then(std::fs::metadata)
            .ok()
            .map(|m| {
                let t = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                format!(" exe {} bytes t{t}", m.len())
            })
            .unwrap_or_default();
        format!("osprey {}{exe}", env!("CARGO_PKG_VERSION"))
    })
    .clone()
}

impl TimingCache {
    /// An empty cache of this build.
    pub fn new() -> TimingCache {
        TimingCache {
            version: 1,
            build: build_id(),
            ..Default::default()
        }
    }

    /// Reads a cache file; a missing file is an empty cache, and so is one
    /// written by another osprey build (its entry count in `discarded`).
    pub fn load(path: &Path) -> Result<TimingCache> {
        match std::fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TimingCache::new()),
            Err(source) => Err(EngineError::Io {
                path: path.display().to_string(),
                error: source,
            }),
            Ok(bytes) => {
                let c: TimingCache = serde_json::from_slice(&bytes).map_err(|e| {
                    EngineError::Model(format!("timing cache {} is not valid: {e}", path.display()))
                })?;
                if c.version != 1 {
                    return Err(EngineError::Model(format!(
                        "timing cache {} has version {}, expected 1",
                        path.display(),
                        c.version
                    )));
                }
                if c.build != build_id() {
                    return Ok(TimingCache {
                        discarded: c.entries.len(),
                        ..TimingCache::new()
                    });
                }
                Ok(c)
            }
        }
    }

    /// Writes the cache (atomically: temp file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |source| EngineError::Io {
            path: path.display().to_string(),
            error: source,
        };
        let tmp = path.with_extension("tmp");
        let text =
            serde_json::to_string_pretty(self).map_err(|e| EngineError::Model(e.to_string()))?;
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

/// What tuning decided for one layer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerChoice {
    /// Node index in the optimized graph.
    pub node: usize,
    /// Node name.
    pub name: String,
    /// Fused op, e.g. `Conv+BatchNormalization+Clip`.
    pub op: String,
    /// Chosen tactic.
    pub tactic: String,
    /// Its median time, ms.
    pub ms: f64,
    /// Taken from the timing cache.
    pub cached: bool,
    /// Every candidate's median time, ms.
    pub candidates: BTreeMap<String, f64>,
}

/// Tactic per node (`None` where an op has a single implementation).
pub type Tactics = Vec<Option<String>>;

fn conv_geometry(g: &Graph, node: usize) -> Option<(Conv2dGeometry, usize)> {
    let n = &g.nodes[node];
    let Op::Conv(a) = &n.op else { return None };
    let xs = &g.tensors[*n.inputs.first()?].shape;
    let ys = &g.tensors[*n.outputs.first()?].shape;
    Some((a.geometry(xs, ys), xs[0]))
}

/// Convolution `node`'s weights and bias as f32 (empty weights when not
/// constant: the kernel then refuses the layer).
fn conv_weights(g: &Graph, node: usize) -> (Vec<f32>, Option<Vec<f32>>) {
    let n = &g.nodes[node];
    let value = |t: usize| g.tensors.get(t).and_then(|t| t.value.as_ref());
    let w = n
        .inputs
        .get(1)
        .and_then(|&t| value(t))
        .map(ConstData::to_f32)
        .unwrap_or_default();
    let b = n
        .inputs
        .get(2)
        .and_then(|&t| value(t))
        .map(ConstData::to_f32);
    (w, b)
}

/// Deterministic pseudo-random values in [-1, 1) (xorshift), for timing
/// and benchmarks.
pub fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Median wall time (ms) of `f` after one warm-up; repeats adapt to the
/// cost so a build stays short (3–15 runs, about 40 ms per candidate).
fn time_ms(mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    f();
    let first = t.elapsed().as_secs_f64() * 1e3;
    let reps = ((40.0 / first.max(1e-3)).ceil() as usize).clamp(3, 15);
    let mut samples: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Chooses a tactic for every layer that has more than one. `progress` is
/// called with (done, total, layer name) as layers finish.
pub fn select_tactics(
    g: &Graph,
    threads: usize,
    cache: &mut TimingCache,
    fp: &Fingerprint,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<(Tactics, Vec<LayerChoice>)> {
    let pool = ThreadPool::new(threads);
    let mut tactics: Tactics = vec![None; g.nodes.len()];
    let mut choices = Vec::new();
    let layers: Vec<usize> = (0..g.nodes.len())
        .filter(|&i| matches!(g.nodes[i].op, Op::Conv(_)))
        .collect();
    // INT8 layers are timed with the tensors they would pass if their
    // neighbours ran INT8 too (INT8 in and out where the flow allows), so
    // a chain of INT8 layers is judged by what it costs as a chain.
    let flow = crate::int8::int8_flow(g, &[]);
    let flow_of = |t: Option<&usize>| t.and_then(|&t| flow.get(t).copied().flatten());
    for (done, &i) in layers.iter().enumerate() {
        let node = &g.nodes[i];
        let Op::Conv(attrs) = &node.op else { continue };
        let Some((geo, batch)) = conv_geometry(g, i) else {
            continue;
        };
        let weights = || conv_weights(g, i);
        // A channels-last layer has one kernel; it is timed so the report
        // shows what it costs.
        let nhwc = if attrs.channels_last {
            let (w, b) = weights();
            Some(Conv2dNhwc::new(geo, &w, b.as_deref(), attrs.activation)?)
        } else {
            None
        };
        // The channels-last INT8 kernel competes with the channels-last
        // FP32 one where the graph permits INT8.
        let int8_nhwc = match (attrs.int8_input_scale, &nhwc) {
            (Some(s), Some(_)) => {
                let (w, b) = weights();
                QConv2dNhwc::new(geo, &w, b.as_deref(), attrs.activation, s).ok()
            }
            _ => None,
        };
        // Its AMX form competes too where this CPU has AMX.
        let int8_nhwc_amx = int8_nhwc
            .as_ref()
            .map(|q| q.clone().with_amx(true))
            .filter(QConv2dNhwc::amx);
        // The INT8 kernel competes with the FP32 tactics where the graph
        // permits INT8 (layers it cannot run stay FP32).
        let int8 = match attrs.int8_input_scale.filter(|_| nhwc.is_none()) {
            Some(s) => {
                let (w, b) = weights();
                QConv2d::new(geo, &w, b.as_deref(), attrs.activation, s).ok()
            }
            None => None,
        };
        let (in_i8, out_scale) = if int8.is_some() || int8_nhwc.is_some() {
            (flow_of(node.inputs.first()), flow_of(node.outputs.first()))
        } else {
            (None, None)
        };
        // Both INT8 forms compete where this CPU has a dot4 kernel; on
        // AVX2 its speed depends on the input's sign, so layers whose input
        // is non-negative by construction are timed on such data.
        let dot4 = int8
            .as_ref()
            .map(|q| q.clone().with_dot4(true))
            .filter(QConv2d::dot4);
        let nonneg = dot4.is_some()
            && node
                .inputs
                .first()
                .is_some_and(|&t| crate::int8::nonneg_tensor(g, t));
        let key = format!(
            "{}|t{}|conv|{}x{}x{}->{}|k{}x{} s{:?} d{:?} p{:?} g{}|b{}|{:?}|res{}{}{}{}{}{}{}{}",
            fp.key(),
            pool.threads(),
            geo.c_in,
            geo.h,
            geo.w,
            geo.c_out,
            geo.kh,
            geo.kw,
            geo.stride,
            geo.dilation,
            geo.pads,
            geo.groups,
            batch,
            attrs.activation,
            attrs.residual,
            if int8.is_some() || int8_nhwc.is_some() {
                "|int8"
            } else {
                ""
            },
            if in_i8.is_some() { "|in:i8" } else { "" },
            if out_scale.is_some() { "|out:i8" } else { "" },
            if dot4.is_some() { "|dot4" } else { "" },
            if int8_nhwc_amx.is_some() { "|amx" } else { "" },
            if nonneg { "|nonneg" } else { "" },
            if nhwc.is_some() { "|nhwc" } else { "" },
        );
        let candidates = if nhwc.is_some() {
            Vec::new()
        } else {
            ConvTactic::candidates(&geo)
        };
        let int8_forms: Vec<&QConv2d> = int8.iter().chain(&dot4).collect();
        let cached = cache
            .entries
            .get(&key)
            .filter(|e| {
                candidates.iter().any(|c| c.name() == e.tactic)
                    || nhwc.as_ref().is_some_and(|c| c.algorithm() == e.tactic)
                    || int8_forms.iter().any(|q| q.algorithm() == e.tactic)
                    || int8_nhwc
                        .iter()
                        .chain(&int8_nhwc_amx)
                        .any(|q| q.algorithm() == e.tactic)
            })
            .cloned();
        let entry = match cached {
            Some(e) => (e, true),
            None => {
                let (w, b) = weights();
                let (oh, ow) = (geo.out_h().unwrap_or(0), geo.out_w().unwrap_or(0));
                let mut x = pseudo_random(batch * geo.c_in * geo.h * geo.w, 7);
                if nonneg {
                    x.iter_mut().for_each(|v| *v = v.abs());
                }
                let r = pseudo_random(batch * geo.c_out * oh * ow, 11);
                let mut y = vec![0.0f32; batch * geo.c_out * oh * ow];
                let mut times = BTreeMap::new();
                for t in &candidates {
                    let conv = Conv2d::with_tactic(geo, &w, b.as_deref(), attrs.activation, *t)?;
                    let mut scratch = vec![0.0f32; conv.scratch_len(pool.threads())];
                    let res = attrs.residual.then_some(&r[..]);
                    let ms = time_ms(|| {
                        conv.run_with_residual(&pool, batch, &x, res, &mut y, &mut scratch)
                    });
                    times.insert(t.name(), ms);
                }
                if let Some(conv) = &nhwc {
                    let res = attrs.residual.then_some(&r[..]);
                    let ms = time_ms(|| conv.run(&pool, batch, &x, res, &mut y));
                    times.insert(conv.algorithm().to_string(), ms);
                }
                // An INT8 form, timed with the tensors it would read and
                // write (INT8 where the flow allows).
                let mut time_int8 = |scratch_len: usize, run: &RunInt8| {
                    let mut scratch = vec![0.0f32; scratch_len];
                    let res = attrs.residual.then_some(&r[..]);
                    let mut x8 = vec![0i8; if in_i8.is_some() { x.len() } else { 0 }];
                    if let Some(s) = in_i8 {
                        quantize_to_i8(osprey_kernels::isa::active(), &x, 1.0 / s, &mut x8);
                    }
                    let mut y8 = vec![0i8; if out_scale.is_some() { y.len() } else { 0 }];
                    time_ms(|| {
                        let input = if in_i8.is_some() {
                            QIn::I8(&x8)
                        } else {
                            QIn::F32(&x)
                        };
                        let output = match out_scale {
                            Some(s) => QOut::I8(&mut y8, s),
                            None => QOut::F32(&mut y),
                        };
                        run(input, res, output, &mut scratch)
                    })
                };
                for q in int8_nhwc.iter().chain(&int8_nhwc_amx) {
                    let ms = time_int8(q.scratch_len(pool.threads()), &|i, r, o, s| {
                        q.run_io(&pool, batch, i, r, o, s)
                    });
                    times.insert(q.algorithm().to_string(), ms);
                }
                for q in &int8_forms {
                    let ms = time_int8(q.scratch_len(pool.threads()), &|i, r, o, s| {
                        q.run_io(&pool, batch, i, r, o, s)
                    });
                    times.insert(q.algorithm().to_string(), ms);
                }
                let (best, ms) = times
                    .iter()
                    .min_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(k, v)| (k.clone(), *v))
                    .ok_or_else(|| {
                        EngineError::model(format!("no tactic for node '{}'", node.name))
                    })?;
                let e = CacheEntry {
                    tactic: best,
                    ms,
                    candidates: times,
                };
                cache.entries.insert(key, e.clone());
                (e, false)
            }
        };
        tactics[i] = Some(entry.0.tactic.clone());
        choices.push(LayerChoice {
            node: i,
            name: node.name.clone(),
            op: node.onnx_op.clone(),
            tactic: entry.0.tactic,
            ms: entry.0.ms,
            cached: entry.1,
            candidates: entry.0.candidates,
        });
        progress(done + 1, layers.len(), &node.name);
    }
    time_fusions(g, &pool, cache, fp, &mut tactics, &mut choices)?;
    Ok((tactics, choices))
}

/// The expansion of a pair [`time_fusions`] times: FP32 or INT8.
enum Expansion {
    F32(Conv2dNhwc),
    I8(QConv2dNhwc),
}

impl Expansion {
    fn algorithm(&self) -> &'static str {
        match self {
            Expansion::F32(l) => l.algorithm(),
            Expansion::I8(l) => l.algorithm(),
        }
    }

    fn fuses_into(&self, d: &Conv2dNhwc) -> bool {
        match self {
            Expansion::F32(l) => l.fuses_into(d),
            Expansion::I8(l) => l.fuses_into(d),
        }
    }

    /// Scratch floats for the pair fused or apart.
    fn scratch_len(&self, d: &Conv2dNhwc, threads: usize) -> usize {
        match self {
            Expansion::F32(l) => l.fused_scratch_len(d, threads),
            Expansion::I8(l) => l.fused_scratch_len(d, threads).max(l.scratch_len(threads)),
        }
    }
}

/// A fused pair wins only when it is at least this much faster than the
/// two layers run apart (the timings are medians of a few runs).
const FUSION_MARGIN: f64 = 0.97;

/// Times each expansion → depthwise pair that may run as one step
/// ([`crate::fuse`]) both ways, and marks the expansion's tactic fused
/// where that is faster by [`FUSION_MARGIN`]. Pairs whose expanded tensor
/// is under [`crate::fuse::MIN_FUSED_BYTES`] stay apart untimed.
///
/// Where the graph permits the expansion INT8, the fused pair is timed
/// with both precisions of expansion: the tuned one, and the other (its
/// fastest kernel from the layer's timings). A layer whose FP32 kernel
/// beat its INT8 one alone — both writing the expanded tensor to memory —
/// may be faster INT8 once that tensor stays in cache. An INT8 expansion
/// is timed as it would run: INT8 input where its input flows INT8, and
/// apart, an INT8 expanded tensor where the depthwise layer reads INT8.
fn time_fusions(
    g: &Graph,
    pool: &ThreadPool,
    cache: &mut TimingCache,
    fp: &Fingerprint,
    tactics: &mut Tactics,
    choices: &mut [LayerChoice],
) -> Result<()> {
    use osprey_kernels::conv_nhwc::DwOut;
    let flow = crate::int8::int8_flow(g, tactics);
    let flow_of = |t: Option<&usize>| t.and_then(|&t| flow.get(t).copied().flatten());
    let threads = pool.threads();
    for (i, j) in crate::fuse::fusion_candidates(g, tactics) {
        let (Some((eg, batch)), Some((dg, _))) = (conv_geometry(g, i), conv_geometry(g, j)) else {
            continue;
        };
        if Conv2dNhwc::expanded_bytes(&eg) < crate::fuse::MIN_FUSED_BYTES {
            continue;
        }
        let (Op::Conv(ea), Op::Conv(da)) = (&g.nodes[i].op, &g.nodes[j].op) else {
            continue;
        };
        let d = {
            let (w, b) = conv_weights(g, j);
            Conv2dNhwc::new(dg, &w, b.as_deref(), da.activation)?
        };
        // The expansion as tactic `t` runs it: INT8 (the AMX form where
        // named) or FP32.
        let expansion = |t: &str| -> Result<Expansion> {
            let (w, b) = conv_weights(g, i);
            Ok(match ea.int8_input_scale {
                Some(s) if t.starts_with("int8") => Expansion::I8(
                    QConv2dNhwc::new(eg, &w, b.as_deref(), ea.activation, s)?
                        .with_amx(t.ends_with("-amx")),
                ),
                _ => Expansion::F32(Conv2dNhwc::new(eg, &w, b.as_deref(), ea.activation)?),
            })
        };
        let tuned = match tactics[i].clone() {
            Some(t) => t,
            None => expansion("")?.algorithm().to_string(),
        };
        // The other precision's fastest kernel, where INT8 is permitted.
        let choice = choices.iter().find(|c| c.node == i);
        let other = ea.int8_input_scale.and_then(|_| {
            let want_int8 = !tuned.starts_with("int8");
            choice?
                .candidates
                .iter()
                .filter(|(k, _)| {
                    crate::fuse::is_own_kernel(k) && k.starts_with("int8") == want_int8
                })
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map(|(k, _)| k.clone())
        });

        let e = expansion(&tuned)?;
        // An INT8 expansion fuses only where its tensor is larger still.
        let may_fuse = |x: &Expansion| {
            x.fuses_into(&d)
                && (matches!(x, Expansion::F32(_))
                    || Conv2dNhwc::expanded_bytes(&eg) >= crate::fuse::MIN_FUSED_BYTES_INT8)
        };
        let alt = other
            .as_deref()
            .map(expansion)
            .transpose()?
            .filter(|a| may_fuse(a));
        let other = alt.as_ref().and(other);
        let e_fuses = may_fuse(&e);
        if !e.fuses_into(&d) || (!e_fuses && alt.is_none()) {
            continue;
        }
        let out_scale = flow_of(g.nodes[j].outputs.first());
        let in_scale = flow_of(g.nodes[i].inputs.first());
        let mid_scale = flow_of(g.nodes[i].outputs.first());
        let key =
            format!(
            "{}|t{}|fuse|{}x{}x{}->{}|{:?}|dw k{}x{} s{:?} d{:?} p{:?}|{:?}|b{}|res{}|{}{}{}{}{}",
            fp.key(),
            threads,
            eg.c_in,
            eg.h,
            eg.w,
            eg.c_out,
            ea.activation,
            dg.kh,
            dg.kw,
            dg.stride,
            dg.dilation,
            dg.pads,
            da.activation,
            batch,
            da.residual,
            tuned,
            other.as_deref().map(|o| format!("|or {o}")).unwrap_or_default(),
            if in_scale.is_some() { "|in:i8" } else { "" },
            if mid_scale.is_some() { "|mid:i8" } else { "" },
            if out_scale.is_some() { "|out:i8" } else { "" },
        );
        let fused_name = crate::fuse::fused_tactic(&tuned);
        let apart_name = format!("{tuned},{}", d.algorithm());
        let alt_name = other.as_deref().map(crate::fuse::fused_tactic);
        let known = |t: &str| t == fused_name || t == apart_name || alt_name.as_deref() == Some(t);
        let entry = match cache.entries.get(&key) {
            Some(e) if known(&e.tactic) => e.clone(),
            _ => {
                let x = pseudo_random(batch * eg.c_in * eg.h * eg.w, 7);
                let mut x8 = vec![0i8; if in_scale.is_some() { x.len() } else { 0 }];
                if let Some(s) = in_scale {
                    quantize_to_i8(osprey_kernels::isa::active(), &x, 1.0 / s, &mut x8);
                }
                let (oh, ow) = d.out_hw();
                let n_out = batch * dg.c_out * oh * ow;
                let r = pseudo_random(n_out, 11);
                let res = da.residual.then_some(&r[..]);
                let n_mid = batch * eg.c_out * eg.h * eg.w;
                let mut mid = vec![0.0f32; n_mid];
                let mid_i8 = mid_scale.filter(|_| matches!(e, Expansion::I8(_)));
                let mut mid8 = vec![0i8; if mid_i8.is_some() { n_mid } else { 0 }];
                let mut y = vec![0.0f32; n_out];
                let mut y8 = vec![0i8; if out_scale.is_some() { n_out } else { 0 }];
                let len = [Some(&e), alt.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(|e| e.scratch_len(&d, threads))
                    .max()
                    .unwrap_or(0);
                let mut scratch = vec![0.0f32; len.max(d.scratch_len_i8(threads))];
                // An INT8 expansion reads INT8 where its input flows INT8
                // (an FP32 one reads f32: its producer then writes f32).
                let input = |e: &Expansion| match (e, in_scale) {
                    (Expansion::I8(_), Some(_)) => QIn::I8(&x8),
                    _ => QIn::F32(&x),
                };
                let apart = time_ms(|| {
                    match (&e, mid_i8) {
                        (Expansion::F32(l), _) => l.run(pool, batch, &x, None, &mut mid),
                        (Expansion::I8(l), Some(s)) => {
                            let out = QOut::I8(&mut mid8, s);
                            l.run_io(pool, batch, input(&e), None, out, &mut scratch)
                        }
                        (Expansion::I8(l), None) => {
                            let out = QOut::F32(&mut mid);
                            l.run_io(pool, batch, input(&e), None, out, &mut scratch)
                        }
                    }
                    match (out_scale, mid_i8) {
                        (Some(s), Some(_)) => {
                            d.run_to_i8(pool, batch, &mid8, res, &mut y8, s, &mut scratch)
                        }
                        (Some(s), None) => {
                            d.run_to_i8(pool, batch, &mid, res, &mut y8, s, &mut scratch)
                        }
                        (None, Some(_)) => d.run_from_i8(pool, batch, &mid8, res, &mut y),
                        (None, None) => d.run(pool, batch, &mid, res, &mut y),
                    }
                });
                let mut fused = |e: &Expansion| {
                    time_ms(|| {
                        let out = match out_scale {
                            Some(s) => DwOut::I8(&mut y8, s),
                            None => DwOut::F32(&mut y),
                        };
                        match e {
                            Expansion::F32(l) => {
                                l.run_expand_depthwise(&d, pool, batch, &x, res, out, &mut scratch)
                            }
                            Expansion::I8(l) => {
                                let x = input(e);
                                l.run_expand_depthwise(&d, pool, batch, x, res, out, &mut scratch)
                            }
                        }
                    })
                };
                let mut candidates = BTreeMap::from([(apart_name.clone(), apart)]);
                if e_fuses {
                    candidates.insert(fused_name.clone(), fused(&e));
                }
                if let (Some(a), Some(name)) = (&alt, &alt_name) {
                    candidates.insert(name.clone(), fused(a));
                }
                // The fastest fused form, where it beats the pair apart by
                // the margin.
                let (tactic, ms) = candidates
                    .iter()
                    .filter(|(k, _)| crate::fuse::is_fused(Some(k)))
                    .min_by(|a, b| a.1.total_cmp(b.1))
                    .filter(|(_, &ms)| ms < FUSION_MARGIN * apart)
                    .map_or((apart_name.clone(), apart), |(k, &ms)| (k.clone(), ms));
                let entry = CacheEntry {
                    tactic,
                    ms,
                    candidates,
                };
                cache.entries.insert(key, entry.clone());
                entry
            }
        };
        // The report: the expansion's line lists the ways of running the
        // pair, and carries the pair's time where it runs fused.
        let fused = crate::fuse::is_fused(Some(&entry.tactic));
        if let Some(c) = choices.iter_mut().find(|c| c.node == i) {
            c.candidates.extend(entry.candidates);
            if fused {
                c.tactic = entry.tactic.clone();
                c.ms = entry.ms;
            }
        }
        if fused {
            tactics[i] = Some(entry.tactic);
        }
    }
    Ok(())
}
