//! `osprey build --precision int8`: which layers run INT8, checked on
//! data.
//!
//! 1. The calibration cache (`osprey calibrate`) gives each tensor's scale
//!    — or, without `--calib`, the model's own QuantizeLinear /
//!    DequantizeLinear nodes do (an explicitly quantized QDQ model; an
//!    asymmetric UINT8 activation range becomes the symmetric INT8 range
//!    that covers it);
//!    every plain convolution and fully connected layer (`Gemm`) whose
//!    input has one is marked INT8 (`osprey_engine::int8::permit_int8`),
//!    depthwise convolutions too with `--int8-depthwise`; other grouped
//!    convolutions and everything else stay FP32. A `Gemm` always runs
//!    INT8 where permitted (it is not timed: at batch 1 it reads a quarter
//!    of the FP32 weight bytes, about 7x faster on EfficientNet-Lite0's
//!    classifier). Where an INT8 layer feeds only INT8 layers, the tensor
//!    between them is INT8 (`int8_flow`).
//! 2. With an evaluation set (`--images DIR --model-desc D.toml`, or
//!    `--npy DIR`; usually the calibration set), each INT8 layer is run
//!    alone on the FP32 engine's own input to that layer, and its output is
//!    compared with the FP32 layer's: the layer's SQNR. Layers below
//!    `--min-sqnr` fall back to FP32.
//! 3. The whole INT8 engine is then compared with the FP32 engine end to end:
//!    output SQNR, and with a model description the decoded results —
//!    classifier top-1 agreement and top-5 overlap, detector fraction of
//!    FP32 detections matched at IoU ≥ 0.5 with the same class.
//! 4. `--accuracy-budget A`: while the agreement (top-1 or matched
//!    fraction) is below `A`, the layers with the lowest SQNR go back to
//!    FP32 (1, 2, 4, … at a time) — automatic mixed precision.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use osprey_calibration::cache::CalibrationCache;
use osprey_calibration::dataset::Dataset;
use osprey_engine::int8::{permit_int8, revert, set_input_scale, without_int8, Int8Layer, Sqnr};
use osprey_engine::ir::{ConstData, Graph, Op};
use osprey_engine::tune::{LayerChoice, Tactics};
use osprey_engine::{Engine, ExecutionContext};
use osprey_kernels::conv::Conv2d;
use osprey_kernels::int8::{quantize_to_i8, QLinear};
use osprey_kernels::isa;
use osprey_kernels::qconv::QConv2d;
use osprey_kernels::ThreadPool;
use osprey_models::vision::decode::{iou, Detection};
use osprey_models::vision::desc::{ModelDesc, ModelKind};
use osprey_models::vision::{read_image, Classifier, Detector, FrameLimits};
use serde_json::json;

/// INT8 options of `osprey build`.
#[derive(Args, Debug, Default, Clone)]
pub struct Int8Args {
    /// Calibration cache from `osprey calibrate` (TensorRT layout); needed
    /// by `--precision int8`.
    #[arg(long, value_name = "M.calib")]
    pub calib: Option<PathBuf>,
    /// Evaluation images (JPEG/PNG, recursive; usually the calibration
    /// folder) for the accuracy report; needs --model-desc.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "npy",
        requires = "model_desc"
    )]
    pub images: Option<PathBuf>,
    /// Model description: preprocessing of --images and how outputs decode
    /// (classifier top-1/top-5, detector matches).
    #[arg(long = "model-desc", value_name = "D.toml")]
    pub model_desc: Option<PathBuf>,
    /// Evaluation tensors (.npy, preprocessed) instead of images.
    #[arg(long, value_name = "DIR")]
    pub npy: Option<PathBuf>,
    /// Use at most this many evaluation files.
    #[arg(long = "max-images", value_name = "N")]
    pub max_images: Option<usize>,
    /// A layer whose INT8 output SQNR (run alone, on FP32 inputs) is below
    /// this many dB runs FP32. Before that, a calibrated input scale is
    /// widened to the range the input showed on the evaluation set where
    /// that gives the layer a higher SQNR (reported as re-scaled).
    #[arg(long = "min-sqnr", value_name = "DB", default_value_t = 20.0)]
    pub min_sqnr: f64,
    /// Without --int8-depthwise, a depthwise layer keeps FP32 weights and
    /// math but reads its input as INT8 where the producer runs INT8 (the
    /// tensor is a quarter of the bytes, for producer and reader), unless
    /// its SQNR on the quantized input (run alone, on FP32 inputs) is below
    /// this many dB. Higher than --min-sqnr: the quantized tensor is one
    /// the INT8 engine would otherwise keep in f32, and CenterNet's matched
    /// fraction needs it (20 dB: 0.85, 25 dB: 0.90 on the fixtures).
    #[arg(long = "min-read-sqnr", value_name = "DB", default_value_t = 25.0)]
    pub min_read_sqnr: f64,
    /// Least acceptable end-to-end agreement with FP32 (classifier top-1
    /// agreement or detector matched fraction, 0..1): the lowest-SQNR layers
    /// go back to FP32 until it is met. Needs --images and --model-desc.
    #[arg(long = "accuracy-budget", value_name = "A")]
    pub accuracy_budget: Option<f64>,
    /// Run every permitted layer in INT8 even where an FP32 tactic timed
    /// faster (by default INT8 is a tactic that must win its timing, as in
    /// TensorRT without strict types).
    #[arg(long = "strict-int8")]
    pub strict: bool,
    /// Also run depthwise convolutions in INT8 (an exact INT8 kernel; with
    /// it, whole inverted-residual blocks pass INT8 tensors). With AVX-512
    /// VNNI and VBMI a `vpdpbusd` depthwise kernel makes it pay
    /// (EfficientNet-Lite0 on one core: 4.0 -> 3.3 ms); on other CPUs it is
    /// no faster than FP32 depthwise. Off by default all the same:
    /// per-tensor activation scales cost detectors accuracy (CenterNet's
    /// matched fraction on the fixtures: 0.90 -> 0.85-0.90, as tuning
    /// picks).
    #[arg(long = "int8-depthwise")]
    pub depthwise: bool,
    /// Write the accuracy report (per-layer SQNR, fallbacks, agreement) as JSON.
    #[arg(long, value_name = "report.json")]
    pub report: Option<PathBuf>,
}

/// What the INT8 preparation decided and measured.
#[derive(Debug)]
pub struct Int8Outcome {
    /// One entry per convolution and `Gemm`.
    pub layers: Vec<Int8Layer>,
    /// Isolated SQNR (dB) per entry of `layers` (None: not measured).
    pub sqnr: Vec<Option<f64>>,
    /// End-to-end comparison of the final INT8 graph with FP32 (after
    /// [`measure_engine`]: of the engine written).
    pub end_to_end: Option<EndToEnd>,
    /// Evaluation samples used.
    pub samples: usize,
    /// FP32 depthwise layers that may read their input as INT8
    /// (`ConvAttrs::int8_read_scale`), with their isolated SQNR.
    pub reads: Vec<Int8Read>,
    /// The evaluation data, kept for [`measure_engine`].
    eval: Option<Eval>,
}

/// An FP32 depthwise layer that may read its input as INT8 (when its
/// producer writes INT8): FP32 weights and math on the quantized input.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Int8Read {
    /// Node index.
    pub node: usize,
    /// Node name.
    pub name: String,
    /// The input's scale.
    pub scale: f32,
    /// SQNR (dB) of the layer on its quantized input against FP32.
    pub sqnr: Option<f64>,
    /// Why it reads f32 (`None`: it may read INT8).
    pub fallback: Option<String>,
}

/// The layers of `g` marked to read INT8 input.
fn int8_reads(g: &Graph) -> Vec<Int8Read> {
    g.nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| match &n.op {
            Op::Conv(a) => a.int8_read_scale.map(|scale| Int8Read {
                node: i,
                name: n.name.clone(),
                scale,
                sqnr: None,
                fallback: None,
            }),
            _ => None,
        })
        .collect()
}

/// End-to-end agreement of the INT8 engine with the FP32 engine.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndToEnd {
    /// SQNR (dB) per output tensor.
    pub outputs: Vec<(String, f64)>,
    /// Classifier: fraction of samples with the same top-1 class.
    pub top1_agreement: Option<f64>,
    /// Classifier: mean |top-5 ∩ top-5| / 5.
    pub top5_overlap: Option<f64>,
    /// Detector: FP32 detections matched by an INT8 one (same class,
    /// IoU ≥ 0.5), over all FP32 detections.
    pub matched_fraction: Option<f64>,
    /// Detector: FP32 detections in total.
    pub fp32_detections: Option<usize>,
    /// Undecoded (`.npy`) data whose first output is small (a classifier
    /// head, at most [`ARGMAX_MAX_LEN`] values): fraction of samples where
    /// its argmax is the FP32 engine's.
    pub output_argmax_agreement: Option<f64>,
}

/// The largest first output whose argmax is compared for `.npy` data.
const ARGMAX_MAX_LEN: usize = 4096;

impl EndToEnd {
    /// The figure `--accuracy-budget` applies to.
    pub fn agreement(&self) -> Option<f64> {
        self.top1_agreement.or(self.matched_fraction)
    }
}

/// Evaluation data and how to decode it.
struct Eval {
    data: Dataset,
    desc: Option<ModelDesc>,
    images: bool,
}

impl std::fmt::Debug for Eval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Eval")
            .field("files", &self.data.files().len())
            .field("images", &self.images)
            .finish()
    }
}

/// Input shapes a model description implies (merged into `--input-shape`).
pub fn desc_shapes(a: &Int8Args) -> Result<HashMap<String, Vec<usize>>> {
    let mut shapes = HashMap::new();
    if let Some(p) = &a.model_desc {
        let desc = ModelDesc::load(p).with_context(|| p.display().to_string())?;
        shapes.insert(desc.input.name.clone(), desc.input_shape());
    }
    Ok(shapes)
}

/// Marks INT8 layers in `graph` (already optimised) and, with evaluation
/// data, measures them and falls back where accuracy asks for it.
pub fn prepare(
    graph: &mut Graph,
    a: &Int8Args,
    threads: usize,
    quiet: bool,
) -> Result<Int8Outcome> {
    if a.max_images == Some(0) {
        bail!("--max-images must be at least 1");
    }
    // Scales from the calibration cache, or from the model's own
    // QuantizeLinear/DequantizeLinear nodes.
    let (scales, source): (std::collections::BTreeMap<String, f32>, String) = match &a.calib {
        Some(calib) => {
            let cache =
                CalibrationCache::load(calib).with_context(|| calib.display().to_string())?;
            check_cache(graph, &cache, calib, quiet)?;
            (
                cache.scales.into_iter().collect(),
                calib.display().to_string(),
            )
        }
        None if !graph.quant_scales.is_empty() => (
            graph.quant_scales.clone(),
            "the model's QDQ nodes".to_string(),
        ),
        None => bail!(
            "--precision int8 needs --calib M.calib (made by `osprey calibrate`), or an explicitly quantized (QDQ) model"
        ),
    };
    let mut layers = permit_int8(graph, &|n| scales.get(n).copied(), a.depthwise);
    let mut reads = int8_reads(graph);
    let int8_count = layers.iter().filter(|l| l.fallback.is_none()).count();
    if int8_count == 0 {
        bail!(
            "{}: no layer can run INT8 ({} convolutions and Gemms; first: {})",
            source,
            layers.len(),
            layers
                .first()
                .and_then(|l| l.fallback.clone())
                .unwrap_or_else(|| "the model has no convolution or Gemm".into())
        );
    }
    let mut sqnr = vec![None; layers.len()];
    let mut eval = match (&a.images, &a.npy) {
        (Some(dir), None) => {
            let p = a
                .model_desc
                .as_ref()
                .context("--images needs --model-desc")?;
            let desc = ModelDesc::load(p).with_context(|| p.display().to_string())?;
            Some(Eval {
                data: Dataset::images(dir, &desc, a.max_images)?,
                desc: Some(desc),
                images: true,
            })
        }
        (None, Some(dir)) => Some(Eval {
            data: Dataset::npy(dir, a.max_images)?,
            desc: None,
            images: false,
        }),
        (None, None) => None,
        (Some(_), Some(_)) => bail!("give --images or --npy, not both"),
    };
    if a.accuracy_budget.is_some() && !eval.as_ref().is_some_and(|e| e.images) {
        bail!("--accuracy-budget needs --images DIR --model-desc D.toml (the agreement it bounds is measured on decoded results)");
    }
    if let Some(b) = a.accuracy_budget {
        if !(0.0..=1.0).contains(&b) {
            bail!("--accuracy-budget is a fraction in [0, 1], got {b}");
        }
    }
    let Some(ev) = eval.as_mut() else {
        if !quiet {
            eprintln!("note: no --images/--npy given: INT8 layers are not checked against FP32 (no SQNR fallback, no accuracy report)");
        }
        return Ok(Int8Outcome {
            layers,
            sqnr,
            reads,
            end_to_end: None,
            samples: 0,
            eval: None,
        });
    };
    // Calibrated scales may be widened to the observed range where that
    // rescues a layer (a QDQ model's own scales are kept as they are).
    let rescue = a.calib.is_some().then_some(a.min_sqnr);
    let (samples, rescaled) = layer_sqnr(
        graph, &layers, &mut reads, ev, threads, &mut sqnr, rescue, quiet,
    )?;
    for r in &mut reads {
        if let Some(db) = r.sqnr.filter(|&db| db < a.min_read_sqnr) {
            r.fallback = Some(format!(
                "SQNR below --min-read-sqnr: {db:.1} dB < {}",
                a.min_read_sqnr
            ));
            osprey_engine::int8::read_f32(graph, r.node);
        }
    }
    for r in rescaled {
        set_input_scale(graph, &mut layers[r.idx], r.scale);
        sqnr[r.idx] = Some(r.db);
    }
    for (l, s) in layers.iter_mut().zip(&sqnr) {
        if let (None, Some(db)) = (&l.fallback, s) {
            if *db < a.min_sqnr {
                let why = format!("SQNR below --min-sqnr: {db:.1} dB < {}", a.min_sqnr);
                revert(graph, l, why);
            }
        }
    }
    let mut e2e = end_to_end(graph, ev, threads, quiet)?;
    // INT8 reads are kept only where they cost nothing end to end: the
    // same agreement (decoded images), or, for .npy data, the same argmax
    // agreement of a small first output and output SQNR within 1 dB.
    // Each read passes its own SQNR check, yet small errors add up over a
    // network's depth (EfficientNet-Lite0's top-1 on the fixtures: 1.0 ->
    // 0.875 with them all). The most reads that cost nothing, highest SQNR
    // first, are found by bisection (fewer reads never cost more, as
    // with --accuracy-budget). Only channels-last depthwise layers read
    // INT8, so engines are compared channels-last (the layout is chosen
    // later).
    let mut order: Vec<usize> = (0..reads.len())
        .filter(|&i| reads[i].fallback.is_none())
        .collect();
    if !order.is_empty() {
        order.sort_by(|&x, &y| {
            let db = |i: usize| reads[i].sqnr.unwrap_or(f64::NEG_INFINITY);
            db(y).total_cmp(&db(x))
        });
        let first = |k: usize| {
            let mut g = graph.clone();
            for &i in &order[k..] {
                osprey_engine::int8::read_f32(&mut g, reads[i].node);
            }
            osprey_engine::passes::channels_last(&mut g);
            g
        };
        let n = order.len();
        let without = end_to_end(&first(0), ev, threads, quiet)?;
        let all = end_to_end(&first(n), ev, threads, quiet)?;
        if let Some(why) = reads_cost(&all, &without) {
            let (mut lo, mut hi) = (0, n - 1);
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                let e = end_to_end(&first(mid), ev, threads, quiet)?;
                if reads_cost(&e, &without).is_none() {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            if !quiet {
                eprintln!("INT8 reads: {lo} of {n} cost nothing end to end ({why})");
            }
            for &i in &order[lo..] {
                reads[i].fallback = Some(format!("{why}; the {lo} with the highest SQNR kept"));
                osprey_engine::int8::read_f32(graph, reads[i].node);
            }
            e2e = end_to_end(graph, ev, threads, quiet)?;
        }
    }
    if let Some(budget) = a.accuracy_budget {
        if e2e.agreement().is_some_and(|v| v < budget) {
            // The INT8 layers, worst SQNR first; find the fewest of them to
            // keep in FP32 (binary search: reverting more never hurts
            // much, and all of them reverted is the FP32 engine).
            let mut order: Vec<usize> = (0..layers.len())
                .filter(|&i| layers[i].fallback.is_none())
                .collect();
            order.sort_by(|&x, &y| {
                sqnr[x]
                    .unwrap_or(f64::INFINITY)
                    .total_cmp(&sqnr[y].unwrap_or(f64::INFINITY))
            });
            let with_reverted = |k: usize, layers: &[Int8Layer]| {
                let mut g = graph.clone();
                let mut ls = layers.to_vec();
                for &i in order.iter().take(k) {
                    revert(&mut g, &mut ls[i], String::new());
                }
                g
            };
            let (mut lo, mut hi) = (0usize, order.len());
            let mut best: Option<EndToEnd> = None;
            while lo < hi {
                let mid = (lo + hi) / 2;
                let e = end_to_end(&with_reverted(mid, &layers), ev, threads, quiet)?;
                if !quiet {
                    eprintln!(
                        "accuracy budget: {mid} worst layers in FP32 -> agreement {:.3}",
                        e.agreement().unwrap_or(0.0)
                    );
                }
                if e.agreement().is_some_and(|v| v >= budget) {
                    hi = mid;
                    best = Some(e);
                } else {
                    lo = mid + 1;
                }
            }
            let before = e2e.agreement().unwrap_or(0.0);
            for &i in order.iter().take(lo) {
                let why = format!(
                    "kept FP32 for --accuracy-budget: agreement {before:.3} < {budget} all INT8"
                );
                revert(graph, &mut layers[i], why);
            }
            e2e = match best {
                Some(e) if lo == hi => e,
                _ => end_to_end(graph, ev, threads, quiet)?,
            };
        }
    }
    Ok(Int8Outcome {
        layers,
        sqnr,
        reads,
        end_to_end: Some(e2e),
        samples,
        eval,
    })
}

/// Cache names against the graph: names the model lacks are a warning (all
/// of them: an error); tensors without a scale are reported per layer.
fn check_cache(g: &Graph, cache: &CalibrationCache, path: &Path, quiet: bool) -> Result<()> {
    let names: HashSet<&str> = g.tensors.iter().map(|t| t.name.as_str()).collect();
    let unknown: Vec<&str> = cache
        .scales
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !names.contains(n))
        .collect();
    if !cache.scales.is_empty() && unknown.len() == cache.scales.len() {
        bail!(
            "{}: the cache names none of this model's tensors (first: '{}'); was it made for another model?",
            path.display(),
            unknown[0]
        );
    }
    if !unknown.is_empty() && !quiet {
        eprintln!(
            "warning: {}: {} of {} cached tensors are not in this model (ignored), e.g. '{}'",
            path.display(),
            unknown.len(),
            cache.scales.len(),
            unknown[0]
        );
    }
    Ok(())
}

fn bar(len: usize, what: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len as u64);
    b.set_style(
        ProgressStyle::with_template("{msg:18} {bar:30} {pos}/{len} samples  {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b.set_message(what.to_string());
    b
}

/// An INT8 layer's kernel, prepared alone for [`layer_sqnr`].
enum Kernel {
    Conv(Box<QConv2d>),
    Gemm(QLinear),
    /// An FP32 layer reading its input quantized with `scale`
    /// ([`Int8Read`]; the probe's `idx` indexes the reads).
    Read(Box<Conv2d>, f32),
}

/// One INT8 layer run alone on the FP32 engine's tensors.
struct Probe {
    /// Index into the layers.
    idx: usize,
    /// The input scale it was prepared with.
    scale: f32,
    layer: Kernel,
    batch: usize,
    input: String,
    residual: Option<String>,
    output: String,
    out_len: usize,
    acc: Sqnr,
    samples: usize,
    /// Largest |input| seen.
    amax: f32,
}

/// Why the INT8 reads cost too much end to end (`with` them against
/// `without`), or `None`.
fn reads_cost(with: &EndToEnd, without: &EndToEnd) -> Option<String> {
    match (with.agreement(), without.agreement()) {
        (Some(a), Some(b)) if a < b => Some(format!(
            "end-to-end agreement with the INT8 reads {a:.3} < {b:.3} without"
        )),
        (Some(_), Some(_)) => None,
        _ => {
            if let (Some(a), Some(b)) = (
                with.output_argmax_agreement,
                without.output_argmax_agreement,
            ) {
                if a < b {
                    return Some(format!(
                        "output argmax agreement with the INT8 reads {a:.3} < {b:.3} without"
                    ));
                }
            }
            let worst = |e: &EndToEnd| e.outputs.iter().map(|o| o.1).fold(f64::INFINITY, f64::min);
            let (a, b) = (worst(with), worst(without));
            (a < b - 1.0).then(|| {
                format!("output SQNR with the INT8 reads {a:.1} dB < {b:.1} dB - 1 without")
            })
        }
    }
}

/// What a probe needs of convolution or Gemm `node`: its input and
/// output shapes, constant weights and bias, and the name of its fused
/// residual operand; `None` for a node without the shapes it needs.
struct NodeParts {
    xs: Vec<usize>,
    ys: Vec<usize>,
    w: Vec<f32>,
    b: Option<Vec<f32>>,
    residual: Option<String>,
}

fn node_parts(graph: &Graph, node: &osprey_engine::ir::Node) -> Result<Option<NodeParts>> {
    let (Some(&x), Some(&y)) = (node.inputs.first(), node.outputs.first()) else {
        return Ok(None);
    };
    let value = |i: usize| {
        node.inputs
            .get(i)
            .and_then(|&t| graph.tensors[t].value.as_ref())
            .map(ConstData::to_f32)
    };
    let residual = match &node.op {
        Op::Conv(a) if a.residual => node.inputs.get(3).map(|&t| graph.tensors[t].name.clone()),
        _ => None,
    };
    Ok(Some(NodeParts {
        xs: graph.tensors[x].shape.clone(),
        ys: graph.tensors[y].shape.clone(),
        w: value(1).context("layer without constant weights")?,
        b: value(2),
        residual,
    }))
}

/// The probe of read `r` (entry `idx` of the reads): its FP32 kernel on
/// the quantized input; `None` for a node without the shapes it needs.
fn make_read_probe(graph: &Graph, r: &Int8Read, idx: usize) -> Result<Option<Probe>> {
    let node = &graph.nodes[r.node];
    let (Op::Conv(attrs), Some(p)) = (&node.op, node_parts(graph, node)?) else {
        return Ok(None);
    };
    let layer = Conv2d::new(
        attrs.geometry(&p.xs, &p.ys),
        &p.w,
        p.b.as_deref(),
        attrs.activation,
    )?;
    Ok(Some(Probe {
        idx,
        scale: r.scale,
        layer: Kernel::Read(Box::new(layer), r.scale),
        batch: p.xs.first().copied().unwrap_or(1),
        input: graph.tensors[node.inputs[0]].name.clone(),
        residual: p.residual,
        output: graph.tensors[node.outputs[0]].name.clone(),
        out_len: p.ys.iter().product(),
        acc: Sqnr::default(),
        samples: 0,
        amax: 0.0,
    }))
}

/// The probe of layer `l` (entry `idx`) with input scale `scale`; `None`
/// for a node without the shapes it needs.
fn make_probe(graph: &Graph, l: &Int8Layer, idx: usize, scale: f32) -> Result<Option<Probe>> {
    let node = &graph.nodes[l.node];
    let Some(p) = node_parts(graph, node)? else {
        return Ok(None);
    };
    let (xs, ys, w, b) = (&p.xs, &p.ys, &p.w, p.b.as_deref());
    let layer = match &node.op {
        Op::Conv(attrs) => {
            let geo = attrs.geometry(xs, ys);
            Kernel::Conv(Box::new(QConv2d::new(geo, w, b, attrs.activation, scale)?))
        }
        Op::Gemm {
            alpha,
            beta,
            trans_b,
            ..
        } => {
            let (n, k) = (ys.get(1).copied(), xs.get(1).copied());
            let (Some(n), Some(k)) = (n, k) else {
                return Ok(None);
            };
            let layer = osprey_engine::int8::gemm_int8_layer(
                (n, k),
                (*alpha, *beta),
                *trans_b,
                w,
                b,
                scale,
            )
            .map_err(|e| anyhow::anyhow!("layer '{}': {e}", l.name))?;
            Kernel::Gemm(layer)
        }
        _ => return Ok(None),
    };
    // A Gemm reading a Flatten sees the values of the flattened tensor
    // (the view itself is never computed, so never observed).
    let source = osprey_engine::int8::view_source(graph, node.inputs[0]);
    Ok(Some(Probe {
        idx,
        scale,
        layer,
        batch: xs.first().copied().unwrap_or(1),
        input: graph.tensors[source].name.clone(),
        residual: p.residual.clone(),
        output: l.output.clone(),
        out_len: ys.iter().product(),
        acc: Sqnr::default(),
        samples: 0,
        amax: 0.0,
    }))
}

/// A layer whose calibrated input scale was replaced by the range its
/// input showed on the evaluation set (see [`layer_sqnr`]).
struct Rescaled {
    idx: usize,
    scale: f32,
    db: f64,
}

/// Runs each INT8 layer alone on the FP32 engine's tensors; fills `sqnr`.
/// Returns the number of samples used, and with `rescue = Some(min_db)`
/// the layers below `min_db` whose SQNR is higher with their input's
/// observed range as the scale (`max |x| / 127`): a calibration threshold
/// (entropy, percentile) can clip a bounded activation, such as a ReLU6
/// output, well inside its range, which costs the one layer reading it
/// far more than the resolution a wider scale gives up.
#[allow(clippy::too_many_arguments)]
fn layer_sqnr(
    graph: &Graph,
    layers: &[Int8Layer],
    reads: &mut [Int8Read],
    ev: &mut Eval,
    threads: usize,
    sqnr: &mut [Option<f64>],
    rescue: Option<f64>,
    quiet: bool,
) -> Result<(usize, Vec<Rescaled>)> {
    let fp32 = Arc::new(Engine::new(without_int8(graph))?);
    let mut ctx = ExecutionContext::new(fp32.clone(), threads);
    let pool = ThreadPool::new(threads);
    let mut probes = Vec::new();
    for (idx, l) in layers.iter().enumerate() {
        let (Some(scale), None) = (l.input_scale, &l.fallback) else {
            continue;
        };
        probes.extend(make_probe(graph, l, idx, scale)?);
    }
    for (idx, r) in reads.iter().enumerate() {
        probes.extend(make_read_probe(graph, r, idx)?);
    }
    let used = sqnr_pass(&mut ctx, &pool, ev, &mut probes, "INT8 layer SQNR", quiet)?;
    for p in probes.iter().filter(|p| p.samples > 0) {
        match p.layer {
            Kernel::Read(..) => reads[p.idx].sqnr = Some(p.acc.db()),
            _ => sqnr[p.idx] = Some(p.acc.db()),
        }
    }
    // Re-scaling is for INT8 layers (a read's scale is its producer's).
    probes.retain(|p| !matches!(p.layer, Kernel::Read(..)));
    let Some(min_db) = rescue else {
        return Ok((used, Vec::new()));
    };
    let mut wider = Vec::new();
    for p in probes
        .iter()
        .filter(|p| p.samples > 0 && p.acc.db() < min_db)
    {
        let scale = p.amax / osprey_kernels::qconv::QMAX;
        if scale.is_finite() && scale > p.scale {
            wider.extend(make_probe(graph, &layers[p.idx], p.idx, scale)?);
        }
    }
    if wider.is_empty() {
        return Ok((used, Vec::new()));
    }
    sqnr_pass(&mut ctx, &pool, ev, &mut wider, "INT8 re-scaled", quiet)?;
    let rescaled = wider
        .iter()
        .filter(|p| p.samples > 0 && sqnr[p.idx].is_some_and(|db| p.acc.db() > db))
        .map(|p| Rescaled {
            idx: p.idx,
            scale: p.scale,
            db: p.acc.db(),
        })
        .collect();
    Ok((used, rescaled))
}

/// One pass over the evaluation set: every probe runs on the FP32
/// engine's own input to its layer and is compared with its output.
fn sqnr_pass(
    ctx: &mut ExecutionContext,
    pool: &ThreadPool,
    ev: &mut Eval,
    probes: &mut [Probe],
    what: &str,
    quiet: bool,
) -> Result<usize> {
    let wanted: HashSet<String> = probes
        .iter()
        .flat_map(|p| {
            [
                Some(p.input.clone()),
                p.residual.clone(),
                Some(p.output.clone()),
            ]
        })
        .flatten()
        .collect();
    let n = ev.data.files().len();
    let pb = bar(n, what, quiet);
    let mut used = 0;
    let scratch_len = probes
        .iter()
        .map(|p| match &p.layer {
            Kernel::Conv(l) => l.scratch_len(pool.threads()),
            Kernel::Gemm(l) => l.scratch_len(p.batch),
            Kernel::Read(l, _) => l.scratch_len(pool.threads()),
        })
        .max()
        .unwrap_or(0);
    let mut scratch = vec![0f32; scratch_len];
    for i in 0..n {
        pb.inc(1);
        if ev.data.load(i, ctx.input_mut(0)?).is_err() {
            continue;
        }
        used += 1;
        let mut seen: HashMap<String, Vec<f32>> = HashMap::new();
        ctx.run_observed(&mut |name, x| {
            if wanted.contains(name) {
                seen.insert(name.to_string(), x.to_vec());
            }
        })?;
        for p in probes.iter_mut() {
            let (Some(x), Some(want)) = (seen.get(&p.input), seen.get(&p.output)) else {
                continue;
            };
            let res = p.residual.as_ref().and_then(|r| seen.get(r));
            if p.residual.is_some() && res.is_none() {
                continue;
            }
            let mut y = vec![0f32; p.out_len];
            match &p.layer {
                Kernel::Conv(l) => l.run(
                    pool,
                    p.batch,
                    x,
                    res.map(|r| r.as_slice()),
                    &mut y,
                    &mut scratch,
                ),
                Kernel::Gemm(l) => l.run(pool, p.batch, x, &mut y, &mut scratch),
                Kernel::Read(l, scale) => {
                    // What the INT8 tensor holds: the values quantized
                    // as the producer's epilogue does, back to floats.
                    let mut q = vec![0i8; x.len()];
                    quantize_to_i8(isa::active(), x, 1.0 / scale, &mut q);
                    let xq: Vec<f32> = q.iter().map(|&v| f32::from(v) * scale).collect();
                    let res = res.map(|r| r.as_slice());
                    l.run_with_residual(pool, p.batch, &xq, res, &mut y, &mut scratch)
                }
            }
            p.amax = x.iter().fold(p.amax, |m, v| m.max(v.abs()));
            p.acc.add(want, &y);
            p.samples += 1;
        }
    }
    pb.finish_and_clear();
    if used == 0 {
        bail!("none of the {n} evaluation files could be used");
    }
    Ok(used)
}

/// Compares the INT8 graph (every permitted layer INT8, default kernels)
/// with its FP32 twin over the evaluation set.
fn end_to_end(graph: &Graph, ev: &mut Eval, threads: usize, quiet: bool) -> Result<EndToEnd> {
    let fp32 = Arc::new(Engine::new(without_int8(graph))?);
    let int8 = Arc::new(Engine::new(graph.clone())?);
    compare_engines(fp32, int8, ev, threads, quiet)
}

/// Measures the end-to-end agreement again on the engine the build writes
/// (its layout and the kernels tuning chose, some layers possibly FP32),
/// so the report describes that engine. A no-op without evaluation data.
pub fn measure_engine(
    o: &mut Int8Outcome,
    graph: &Graph,
    tactics: &[Option<String>],
    threads: usize,
    quiet: bool,
) -> Result<()> {
    settle_reads(&mut o.reads, graph, tactics);
    let Some(ev) = o.eval.as_mut() else {
        return Ok(());
    };
    let fp32 = Arc::new(Engine::new(without_int8(graph))?);
    let int8 = Arc::new(Engine::with_tactics(graph.clone(), tactics)?);
    o.end_to_end = Some(compare_engines(fp32, int8, ev, threads, quiet)?);
    Ok(())
}

/// Marks the INT8 reads that the engine written does not make: tuning ran
/// the producer in FP32, or fused the depthwise layer with its expansion
/// (the pair passes f32 rows through its ring).
fn settle_reads(reads: &mut [Int8Read], graph: &Graph, tactics: &[Option<String>]) {
    let flow = osprey_engine::int8::int8_flow(graph, tactics);
    let fused = osprey_engine::fuse::fused_pairs(graph, tactics);
    for r in reads.iter_mut().filter(|r| r.fallback.is_none()) {
        let input = graph.nodes.get(r.node).and_then(|n| n.inputs.first());
        if input.is_some_and(|&t| flow.get(t).copied().flatten().is_some()) {
            continue;
        }
        r.fallback = Some(match fused.iter().find(|&&(_, dw)| dw == r.node) {
            Some(&(e, _)) => format!(
                "fused with its expansion: reads its f32 rows ({} runs {})",
                graph.nodes.get(e).map_or("?", |n| n.name.as_str()),
                tactics.get(e).and_then(|t| t.as_deref()).unwrap_or("?")
            ),
            None => "its producer writes f32 in the engine written (tuning kept it FP32)".into(),
        });
    }
}

/// Runs both engines over the evaluation set and compares their outputs
/// (and decoded results, for images).
fn compare_engines(
    fp32: Arc<Engine>,
    int8: Arc<Engine>,
    ev: &mut Eval,
    threads: usize,
    quiet: bool,
) -> Result<EndToEnd> {
    let names: Vec<String> = fp32.outputs().map(|d| d.name.clone()).collect();
    let mut out_sqnr = vec![Sqnr::default(); names.len()];
    let n = ev.data.files().len();
    let pb = bar(n, "INT8 vs FP32", quiet);
    let mut top1 = (0usize, 0usize);
    let mut top5 = 0f64;
    let mut matched = (0usize, 0usize);
    let mut argmax = (0usize, 0usize);
    enum Decoded {
        None,
        Cls(Box<Classifier>, Box<Classifier>),
        Det(Box<Detector>, Box<Detector>),
    }
    let mut decoded = match (&ev.desc, ev.images) {
        (Some(d), true) if d.kind == ModelKind::Classifier => Decoded::Cls(
            Box::new(Classifier::new(fp32.clone(), d.clone(), threads)?),
            Box::new(Classifier::new(int8.clone(), d.clone(), threads)?),
        ),
        (Some(d), true) if d.kind == ModelKind::Detector => Decoded::Det(
            Box::new(Detector::new(fp32.clone(), d.clone(), threads)?),
            Box::new(Detector::new(int8.clone(), d.clone(), threads)?),
        ),
        _ => Decoded::None,
    };
    let mut cf = ExecutionContext::new(fp32, threads);
    let mut cq = ExecutionContext::new(int8, threads);
    for i in 0..n {
        pb.inc(1);
        if ev.data.load(i, cf.input_mut(0)?).is_err() {
            continue;
        }
        ev.data
            .load(i, cq.input_mut(0)?)
            .map_err(anyhow::Error::msg)?;
        cf.run()?;
        cq.run()?;
        for (k, acc) in out_sqnr.iter_mut().enumerate() {
            if let (Some(r), Some(t)) = (cf.output_index(k), cq.output_index(k)) {
                acc.add(r, t);
            }
        }
        let path = &ev.data.files()[i];
        match &mut decoded {
            Decoded::None => {
                if let (Some(r), Some(t)) = (cf.output_index(0), cq.output_index(0)) {
                    if (2..=ARGMAX_MAX_LEN).contains(&r.len()) {
                        argmax.1 += 1;
                        if arg_max(r) == arg_max(t) {
                            argmax.0 += 1;
                        }
                    }
                }
            }
            Decoded::Cls(f, q) => {
                let img = read_image(path, &FrameLimits::default())?;
                let a: Vec<u32> = f
                    .classify(&img.frame(), 5)?
                    .0
                    .iter()
                    .map(|c| c.class_id)
                    .collect();
                let b: Vec<u32> = q
                    .classify(&img.frame(), 5)?
                    .0
                    .iter()
                    .map(|c| c.class_id)
                    .collect();
                top1.1 += 1;
                if a.first() == b.first() {
                    top1.0 += 1;
                }
                top5 += a.iter().filter(|c| b.contains(c)).count() as f64 / a.len().max(1) as f64;
            }
            Decoded::Det(f, q) => {
                let img = read_image(path, &FrameLimits::default())?;
                let a = f.detect(&img.frame())?.0.to_vec();
                let b = q.detect(&img.frame())?.0.to_vec();
                matched.0 += matches(&a, &b);
                matched.1 += a.len();
            }
        }
    }
    pb.finish_and_clear();
    let (t1, t5) = if top1.1 > 0 {
        (
            Some(top1.0 as f64 / top1.1 as f64),
            Some(top5 / top1.1 as f64),
        )
    } else {
        (None, None)
    };
    let det = matches!(decoded, Decoded::Det(..));
    Ok(EndToEnd {
        outputs: names
            .into_iter()
            .zip(out_sqnr.iter().map(Sqnr::db))
            .collect(),
        top1_agreement: t1,
        top5_overlap: t5,
        matched_fraction: det.then(|| {
            if matched.1 == 0 {
                1.0
            } else {
                matched.0 as f64 / matched.1 as f64
            }
        }),
        fp32_detections: det.then_some(matched.1),
        output_argmax_agreement: (argmax.1 > 0).then(|| argmax.0 as f64 / argmax.1 as f64),
    })
}

/// Index of the largest value (the first of equals); 0 for none.
fn arg_max(v: &[f32]) -> usize {
    (0..v.len())
        .rev()
        .max_by(|&a, &b| v[a].total_cmp(&v[b]))
        .unwrap_or(0)
}

/// FP32 detections matched one-to-one (greedy, highest score first) by an
/// INT8 detection of the same class with IoU ≥ 0.5.
pub fn matches(fp32: &[Detection], int8: &[Detection]) -> usize {
    let mut used = vec![false; int8.len()];
    let mut n = 0;
    for d in fp32 {
        let bx = [d.x1, d.y1, d.x2, d.y2];
        let best = int8
            .iter()
            .enumerate()
            .filter(|(j, e)| !used[*j] && e.class_id == d.class_id)
            .map(|(j, e)| (j, iou(&bx, &[e.x1, e.y1, e.x2, e.y2])))
            .filter(|(_, v)| *v >= 0.5)
            .max_by(|x, y| x.1.total_cmp(&y.1));
        if let Some((j, _)) = best {
            used[j] = true;
            n += 1;
        }
    }
    n
}

/// The accuracy report as JSON (also the `int8` part of the build report).
pub fn report_json(o: &Int8Outcome) -> serde_json::Value {
    let finite = |v: f64| {
        if v.is_finite() {
            json!(v)
        } else {
            json!("inf")
        }
    };
    json!({
        "samples": o.samples,
        "int8_layers": o.layers.iter().filter(|l| l.fallback.is_none()).count(),
        "fp32_layers": o.layers.iter().filter(|l| l.fallback.is_some()).count(),
        "layers": o.layers.iter().zip(&o.sqnr).map(|(l, s)| json!({
            "name": l.name,
            "input": l.input,
            "output": l.output,
            "precision": if l.fallback.is_none() { "int8" } else { "fp32" },
            "input_scale": l.input_scale,
            "calibrated_scale": l.calibrated_scale,
            "sqnr_db": s.map(finite),
            "fallback": l.fallback,
        })).collect::<Vec<_>>(),
        "int8_reads": o.reads.iter().map(|r| json!({
            "name": r.name,
            "input_scale": r.scale,
            "sqnr_db": r.sqnr.map(finite),
            "reads": if r.fallback.is_none() { "int8" } else { "fp32" },
            "fallback": r.fallback,
        })).collect::<Vec<_>>(),
        "end_to_end": o.end_to_end.as_ref().map(|e| json!({
            "outputs": e.outputs.iter().map(|(n, v)| json!({"name": n, "sqnr_db": finite(*v)})).collect::<Vec<_>>(),
            "top1_agreement": e.top1_agreement,
            "top5_overlap": e.top5_overlap,
            "matched_fraction": e.matched_fraction,
            "output_argmax_agreement": e.output_argmax_agreement,
            "fp32_detections": e.fp32_detections,
        })),
    })
}

/// The readable summary printed by `osprey build`.
pub fn print_summary(o: &Int8Outcome) {
    let int8 = o.layers.iter().filter(|l| l.fallback.is_none()).count();
    println!(
        "  int8        {int8} of {} layers INT8 (convolutions and Gemms; checked on {} samples)",
        o.layers.len(),
        o.samples
    );
    let mut measured: Vec<(f64, &Int8Layer)> = o
        .sqnr
        .iter()
        .zip(&o.layers)
        .filter_map(|(s, l)| s.map(|v| (v, l)))
        .collect();
    measured.sort_by(|a, b| a.0.total_cmp(&b.0));
    if !measured.is_empty() {
        println!("    lowest layer SQNR (INT8 alone on FP32 inputs):");
        for (v, l) in measured.iter().take(5) {
            println!(
                "    {:>7.1} dB  {}{}",
                v,
                l.name,
                if l.fallback.is_some() {
                    "  -> fp32"
                } else {
                    ""
                }
            );
        }
    }
    for l in o.layers.iter().filter(|l| l.fallback.is_none()) {
        if let (Some(c), Some(s)) = (l.calibrated_scale, l.input_scale) {
            println!(
                "    re-scaled {}: input scale {c:.3e} (calibrated) -> {s:.3e} (observed range {:.3})",
                l.name,
                s * osprey_kernels::qconv::QMAX
            );
        }
    }
    let mut reasons: HashMap<String, usize> = HashMap::new();
    for l in o.layers.iter().filter_map(|l| l.fallback.as_ref()) {
        let key = l.split(':').next().unwrap_or(l).to_string();
        *reasons.entry(key).or_default() += 1;
    }
    let mut reasons: Vec<_> = reasons.into_iter().collect();
    reasons.sort();
    for (why, count) in reasons {
        println!("    fp32 x{count}: {why}");
    }
    if !o.reads.is_empty() {
        let kept = o.reads.iter().filter(|r| r.fallback.is_none()).count();
        println!(
            "    {kept} of {} FP32 depthwise layers read INT8 input in the engine written",
            o.reads.len()
        );
        let mut why: Vec<&str> = o
            .reads
            .iter()
            .filter_map(|r| r.fallback.as_deref())
            .collect();
        why.sort();
        why.dedup_by_key(|w| w.split(':').next().unwrap_or(w).to_string());
        for w in why {
            println!("    reads f32: {w}");
        }
        let mut low: Vec<&Int8Read> = o.reads.iter().filter(|r| r.sqnr.is_some()).collect();
        low.sort_by(|a, b| a.sqnr.unwrap_or(0.0).total_cmp(&b.sqnr.unwrap_or(0.0)));
        for r in low.iter().take(3) {
            println!(
                "    {:>7.1} dB  {} (INT8 input){}",
                r.sqnr.unwrap_or(0.0),
                r.name,
                if r.fallback.is_some() {
                    "  -> reads f32"
                } else {
                    ""
                }
            );
        }
    }
    if let Some(e) = &o.end_to_end {
        for (n, v) in &e.outputs {
            println!("    output {n}: SQNR {v:.1} dB vs FP32");
        }
        if let (Some(t1), Some(t5)) = (e.top1_agreement, e.top5_overlap) {
            println!("    top-1 agreement {:.3}, top-5 overlap {:.3}", t1, t5);
        }
        if let (Some(m), Some(n)) = (e.matched_fraction, e.fp32_detections) {
            println!(
                "    detections matched {m:.3} of {n} FP32 detections (IoU >= 0.5, same class)"
            );
        }
        if let Some(a) = e.output_argmax_agreement {
            println!("    output argmax agreement {a:.3} (first output, per sample)");
        }
    }
}

/// `--strict-int8`: every INT8-marked convolution takes its INT8 kernel,
/// whatever the timings said: the fastest of its `int8-*` candidates (the
/// pair and dot4 forms; only INT8-marked layers have any), whose name and
/// time come from the tuner. A layer already INT8 keeps its tactic (fused
/// with its depthwise reader too, where that reader stays FP32).
pub fn force_int8(
    graph: &Graph,
    mut tactics: Tactics,
    mut layers: Vec<LayerChoice>,
) -> (Tactics, Vec<LayerChoice>) {
    for l in &mut layers {
        // Already INT8 (alone, or fused with its depthwise reader).
        if l.tactic.starts_with("int8") {
            continue;
        }
        // The layer's own INT8 kernels, not a pair's timings.
        let fastest = l
            .candidates
            .iter()
            .filter(|(k, _)| k.starts_with("int8") && osprey_engine::fuse::is_own_kernel(k))
            .min_by(|a, b| a.1.total_cmp(b.1));
        let Some((name, &ms)) = fastest else {
            continue;
        };
        let name = name.clone();
        if let Some(t) = tactics.get_mut(l.node) {
            *t = Some(name.clone());
        }
        l.ms = ms;
        l.tactic = name;
    }
    // An expansion fused with a depthwise reader that now runs INT8
    // (--int8-depthwise) runs apart: a fused pair has an FP32 reader.
    let pairs = osprey_engine::fuse::fused_pairs(graph, &tactics);
    for l in &mut layers {
        if osprey_engine::fuse::is_fused(Some(&l.tactic)) && !pairs.iter().any(|p| p.0 == l.node) {
            let own = osprey_engine::fuse::unfused(&l.tactic).to_string();
            l.ms = l.candidates.get(&own).copied().unwrap_or(l.ms);
            if let Some(t) = tactics.get_mut(l.node) {
                *t = Some(own.clone());
            }
            l.tactic = own;
        }
    }
    (tactics, layers)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use osprey_engine::onnx::builder::{attr_i, attr_ints, ModelBuilder};

    use super::*;

    fn choice(node: usize, tactic: &str, candidates: &[(&str, f64)]) -> LayerChoice {
        LayerChoice {
            node,
            name: format!("#{node}"),
            op: "Conv".into(),
            tactic: tactic.into(),
            ms: 1.0,
            cached: false,
            candidates: candidates
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    /// `--strict-int8 --int8-depthwise` on an INT8 expansion fused with
    /// its FP32 depthwise reader: the reader takes its INT8 kernel, so the
    /// pair runs apart (the expansion's own INT8 kernel and time), and the
    /// engine builds.
    #[test]
    fn strict_int8_unfuses_a_pair_whose_reader_turns_int8() {
        let (c, e, h) = (8usize, 24usize, 12i64);
        let mut b = ModelBuilder::new(13);
        b.input("x", &[1, c as i64, h, h])
            .init_f32("w1", &[e, c, 1, 1], &vec![0.1; e * c])
            .init_f32("w2", &[e, 1, 3, 3], &vec![0.2; e * 9])
            .node("Conv", &["x", "w1"], &["a"], vec![])
            .node(
                "Conv",
                &["a", "w2"],
                &["d"],
                vec![attr_ints("pads", &[1, 1, 1, 1]), attr_i("group", e as i64)],
            )
            .output("d");
        let mut g = osprey_engine::onnx::import(&b.to_bytes(), &Default::default()).unwrap();
        let permitted = permit_int8(&mut g, &|_| Some(0.02), true);
        assert_eq!(permitted.iter().filter(|l| l.fallback.is_none()).count(), 2);
        osprey_engine::passes::channels_last(&mut g);
        let convs: Vec<usize> = (0..g.nodes.len())
            .filter(|&i| matches!(g.nodes[i].op, Op::Conv(_)))
            .collect();
        let (ex, dw) = (convs[0], convs[1]);
        let mut tactics: Tactics = vec![None; g.nodes.len()];
        tactics[ex] = Some("int8-nhwc-gemm+dw".into());
        tactics[dw] = Some("nhwc-depthwise".into());
        assert_eq!(osprey_engine::fuse::fused_pairs(&g, &tactics), [(ex, dw)]);
        let layers = vec![
            choice(
                ex,
                "int8-nhwc-gemm+dw",
                &[
                    ("int8-nhwc-gemm", 0.5),
                    ("int8-nhwc-gemm+dw", 0.7),
                    ("int8-nhwc-gemm,nhwc-depthwise", 0.9),
                ],
            ),
            choice(
                dw,
                "nhwc-depthwise",
                &[("nhwc-depthwise", 0.3), ("int8-nhwc-depthwise", 0.4)],
            ),
        ];
        let (tactics, layers) = force_int8(&g, tactics, layers);
        assert_eq!(tactics[ex].as_deref(), Some("int8-nhwc-gemm"));
        assert_eq!(tactics[dw].as_deref(), Some("int8-nhwc-depthwise"));
        assert_eq!(
            (layers[0].tactic.as_str(), layers[0].ms),
            ("int8-nhwc-gemm", 0.5)
        );
        Engine::with_tactics(g, &tactics).unwrap();
    }

    /// The report's INT8 reads are those of the engine written: a read
    /// whose producer tuning kept FP32, or whose pair runs fused (f32 rows
    /// in the ring), is reported as reading f32, with why.
    #[test]
    fn reads_are_settled_by_the_tactics() {
        let (c, e, h) = (8usize, 24usize, 12i64);
        let mut b = ModelBuilder::new(13);
        b.input("x", &[1, c as i64, h, h])
            .init_f32("w1", &[e, c, 1, 1], &vec![0.1; e * c])
            .init_f32("w2", &[e, 1, 3, 3], &vec![0.2; e * 9])
            .node("Conv", &["x", "w1"], &["a"], vec![])
            .node(
                "Conv",
                &["a", "w2"],
                &["d"],
                vec![attr_ints("pads", &[1, 1, 1, 1]), attr_i("group", e as i64)],
            )
            .output("d");
        let mut g = osprey_engine::onnx::import(&b.to_bytes(), &Default::default()).unwrap();
        permit_int8(&mut g, &|_| Some(0.02), false);
        osprey_engine::passes::channels_last(&mut g);
        let convs: Vec<usize> = (0..g.nodes.len())
            .filter(|&i| matches!(g.nodes[i].op, Op::Conv(_)))
            .collect();
        let (ex, dw) = (convs[0], convs[1]);
        let fresh = int8_reads(&g);
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh[0].node, dw);
        for (expansion, want) in [
            ("int8-nhwc-gemm", None),
            ("int8-nhwc-gemm+dw", Some("fused with its expansion")),
            ("nhwc-gemm", Some("its producer writes f32")),
        ] {
            let mut tactics: Tactics = vec![None; g.nodes.len()];
            tactics[ex] = Some(expansion.into());
            tactics[dw] = Some("nhwc-depthwise".into());
            let mut reads = fresh.clone();
            settle_reads(&mut reads, &g, &tactics);
            let got = reads[0].fallback.as_deref();
            match want {
                None => assert_eq!(got, None, "{expansion}"),
                Some(w) => assert!(
                    got.is_some_and(|f| f.starts_with(w)),
                    "{expansion}: {got:?}"
                ),
            }
        }
    }
}
