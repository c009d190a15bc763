//! Which layers may run in INT8: the builder's side of quantization.
//!
//! [`permit_int8`] marks every convolution and fully connected layer
//! (`Gemm`) that has an INT8 kernel and a calibrated scale for its input
//! (`ConvAttrs::int8_input_scale`, `Op::Gemm::int8_input_scale`); the
//! others stay FP32 and say why. Weights are quantized per output channel
//! when the engine is prepared (`osprey_kernels::qconv`), so the graph keeps
//! its FP32 weights and a layer can be reverted to FP32 by clearing the mark
//! ([`revert`]) — how per-layer fallback and the accuracy budget work.
//!
//! [`int8_flow`] decides which tensors pass between INT8 layers as INT8:
//! a tensor whose producer and every consumer run INT8 is requantized by its
//! producer (with the consumers' input scale) and read as INT8, so no
//! dequantize/quantize pair sits between the two layers.

use serde::Serialize;

use crate::ir::{Graph, Op};
use crate::plan::{plan_arena_typed, MemoryPlan};
use osprey_kernels::eltwise::BinaryOp;

/// One convolution's or `Gemm`'s INT8 status.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Int8Layer {
    /// Node index.
    pub node: usize,
    /// Node name.
    pub name: String,
    /// Input tensor name.
    pub input: String,
    /// Output tensor name.
    pub output: String,
    /// The input's scale, when INT8 is permitted.
    pub input_scale: Option<f32>,
    /// The calibrated scale, when the builder replaced it with the range
    /// the input showed on the evaluation set ([`set_input_scale`]).
    pub calibrated_scale: Option<f32>,
    /// Why the layer stays FP32 (`None` while it is INT8).
    pub fallback: Option<String>,
}

/// Marks convolutions and `Gemm`s as INT8 where possible (depthwise
/// convolutions only with `depthwise`); `scale_of(tensor name)` gives the
/// calibrated input scale. Returns one entry per convolution and `Gemm`.
pub fn permit_int8(
    g: &mut Graph,
    scale_of: &dyn Fn(&str) -> Option<f32>,
    depthwise: bool,
) -> Vec<Int8Layer> {
    let mut out = Vec::new();
    for i in 0..g.nodes.len() {
        let (x, y) = match (g.nodes[i].inputs.first(), g.nodes[i].outputs.first()) {
            (Some(&x), Some(&y)) => (x, y),
            _ => continue,
        };
        let input = g.tensors[x].name.clone();
        let output = g.tensors[y].name.clone();
        let name = g.nodes[i].name.clone();
        let scale = scale_of(&input);
        let unusable = |scale: Option<f32>| match scale {
            None => Some(format!("no calibration scale: input '{input}'")),
            Some(s) if !(s.is_finite() && s > 0.0) => {
                Some(format!("input '{input}' has an unusable scale {s}"))
            }
            Some(_) => None,
        };
        if let Op::Gemm { trans_a, .. } = g.nodes[i].op {
            // A Gemm usually reads a Flatten or Reshape of the tensor that
            // calibration saw (a view holds the same values and is never
            // computed, so it has no statistics of its own).
            let scale = scale.or_else(|| scale_of(&g.tensors[view_source(g, x)].name));
            let fallback = gemm_int8_blocker(g, i, trans_a).or_else(|| unusable(scale));
            if let Op::Gemm {
                int8_input_scale, ..
            } = &mut g.nodes[i].op
            {
                *int8_input_scale = if fallback.is_none() { scale } else { None };
            }
            out.push(Int8Layer {
                node: i,
                name,
                input,
                output,
                input_scale: if fallback.is_none() { scale } else { None },
                calibrated_scale: None,
                fallback,
            });
            continue;
        }
        let Op::Conv(a) = &mut g.nodes[i].op else {
            continue;
        };
        let channels = |t: usize| g.tensors[t].shape.get(1).copied();
        let is_depthwise =
            a.groups > 1 && a.groups == channels(x).unwrap_or(0) && channels(y) == channels(x);
        let fallback = if a.groups != 1 && !is_depthwise {
            Some(format!(
                "grouped convolution: no INT8 kernel ({} groups, not depthwise)",
                a.groups
            ))
        } else if is_depthwise && !depthwise {
            Some("depthwise convolution: INT8 not requested (--int8-depthwise)".to_string())
        } else {
            unusable(scale)
        };
        a.int8_input_scale = if fallback.is_none() { scale } else { None };
        // Without --int8-depthwise a depthwise layer keeps FP32 weights and
        // math, but may read its input as INT8 (see `int8_flow`).
        a.int8_read_scale = if is_depthwise && !depthwise && unusable(scale).is_none() {
            scale
        } else {
            None
        };
        out.push(Int8Layer {
            node: i,
            name,
            input,
            output,
            input_scale: a.int8_input_scale,
            calibrated_scale: None,
            fallback,
        });
    }
    out
}

/// The tensor whose values `t` holds: `t` itself, or the source of the
/// chain of reshaping views (Reshape, Flatten, Squeeze, Unsqueeze) that
/// produces it.
pub fn view_source(g: &Graph, mut t: usize) -> usize {
    while let Some(n) = g
        .nodes
        .iter()
        .find(|n| n.outputs.first() == Some(&t) && matches!(n.op, Op::Reshape))
    {
        match n.inputs.first() {
            Some(&s) if s != t => t = s,
            _ => break,
        }
    }
    t
}

/// Why `Gemm` node `i` cannot run INT8 (`None`: it can). The INT8 kernel
/// takes `A` as rows of a 2-D input and `C` per output column (or none).
fn gemm_int8_blocker(g: &Graph, i: usize, trans_a: bool) -> Option<String> {
    let node = &g.nodes[i];
    let shape = |k: usize| node.inputs.get(k).map(|&t| g.tensors[t].shape.as_slice());
    if trans_a {
        return Some("Gemm with transposed A: no INT8 kernel".into());
    }
    if shape(0).is_none_or(|s| s.len() != 2) {
        return Some("Gemm input is not 2-D: no INT8 kernel".into());
    }
    let n = node
        .outputs
        .first()
        .and_then(|&y| g.tensors[y].shape.get(1).copied())
        .unwrap_or(0);
    match shape(2) {
        Some(c)
            if !(c.iter().product::<usize>() == 1
                || c.last() == Some(&n) && c.iter().rev().skip(1).all(|&d| d == 1)) =>
        {
            Some(format!(
                "Gemm C of shape {c:?} is not per output column: no INT8 kernel"
            ))
        }
        _ => None,
    }
}

/// The INT8 kernel of a `Gemm` (`A` not transposed) with `n` outputs of
/// `k` inputs: `alpha` folded into the weights (`w` as stored: `[n][k]`
/// with `trans_b`, else `[k][n]`), `beta·C` per output column (`c`: one
/// value or `n`) as the bias.
pub fn gemm_int8_layer(
    (n, k): (usize, usize),
    (alpha, beta): (f32, f32),
    trans_b: bool,
    w: &[f32],
    c: Option<&[f32]>,
    scale: f32,
) -> Result<osprey_kernels::int8::QLinear, String> {
    if w.len() != n * k {
        return Err(format!("Gemm weights hold {} values, not {n}x{k}", w.len()));
    }
    let wt: Vec<f32> = if trans_b {
        w.iter().map(|v| v * alpha).collect()
    } else {
        (0..n * k).map(|i| w[(i % k) * n + i / k] * alpha).collect()
    };
    let bias = match c {
        None => None,
        Some([v]) => Some(vec![v * beta; n]),
        Some(cv) if cv.len() == n => Some(cv.iter().map(|v| v * beta).collect::<Vec<_>>()),
        Some(cv) => {
            return Err(format!(
                "INT8 Gemm: C of {} values is not per output column",
                cv.len()
            ))
        }
    };
    osprey_kernels::int8::QLinear::new(n, k, &wt, bias.as_deref(), scale).map_err(|e| e.to_string())
}

/// The INT8 input scale `op` is marked with (convolutions and `Gemm`s).
pub fn int8_scale(op: &Op) -> Option<f32> {
    match op {
        Op::Conv(a) => a.int8_input_scale,
        Op::Gemm {
            int8_input_scale, ..
        } => *int8_input_scale,
        _ => None,
    }
}

/// Clears the INT8 mark of `op`, if it has one.
fn clear_int8(op: &mut Op) {
    match op {
        Op::Conv(a) => {
            a.int8_input_scale = None;
            a.int8_read_scale = None;
        }
        Op::Gemm {
            int8_input_scale, ..
        } => *int8_input_scale = None,
        _ => {}
    }
}

/// Whether node `op` runs an INT8 kernel when `tactic` was chosen for it:
/// INT8 is permitted and tuning did not pick an FP32 tactic.
pub fn runs_int8(op: &Op, tactic: Option<&str>) -> bool {
    int8_scale(op).is_some() && tactic.is_none_or(|t| t.starts_with("int8"))
}

/// Whether tensor `t` is non-negative by construction: its producer ends in
/// a ReLU, a clip at or above zero, or a (hard) sigmoid. The tuner times
/// INT8 layers that read it on non-negative data, which is what decides
/// between the AVX2 kernel forms (`vpmaddubsw` is fast only on such input).
pub fn nonneg_tensor(g: &Graph, t: usize) -> bool {
    use osprey_kernels::activation::Activation;
    let nonneg = |a: &Activation| match a {
        Activation::Relu | Activation::Sigmoid | Activation::HardSigmoid { .. } => true,
        Activation::Clip { lo, .. } => *lo >= 0.0,
        _ => false,
    };
    g.nodes
        .iter()
        .find(|n| n.outputs.first() == Some(&t))
        .is_some_and(|n| match &n.op {
            Op::Conv(a) => nonneg(&a.activation),
            Op::Unary(a) => nonneg(a),
            _ => false,
        })
}

/// Whether FP32 convolution `node` runs the channels-last depthwise kernel,
/// which can requantize its output rows as it writes them
/// (`Conv2dNhwc::run_to_i8`): its INT8 readers then read INT8.
fn depthwise_writes_i8(g: &Graph, node: &crate::ir::Node, tactic: Option<&str>) -> bool {
    let Op::Conv(a) = &node.op else {
        return false;
    };
    if !a.channels_last
        || runs_int8(&node.op, tactic)
        || tactic.is_some_and(|t| t != "nhwc-depthwise")
    {
        return false;
    }
    let (Some(&x), Some(&y)) = (node.inputs.first(), node.outputs.first()) else {
        return false;
    };
    let geo = a.geometry(&g.tensors[x].shape, &g.tensors[y].shape);
    osprey_kernels::conv_nhwc::Conv2dNhwc::writes_i8_for(&geo)
}

/// The scale at which FP32 convolution `node` reads its input as INT8,
/// when it can: a channels-last depthwise layer (`Conv2dNhwc::run_from_i8`)
/// with [`crate::ir::ConvAttrs::int8_read_scale`], running the FP32
/// kernel on its own (not fused with its producer).
fn depthwise_read_scale(g: &Graph, node: &crate::ir::Node, tactic: Option<&str>) -> Option<f32> {
    let Op::Conv(a) = &node.op else {
        return None;
    };
    if tactic.is_some_and(|t| t != "nhwc-depthwise") {
        return None;
    }
    a.int8_read_scale
        .filter(|_| depthwise_writes_i8(g, node, tactic))
}

/// Per tensor: `Some(scale)` when it passes between INT8 layers as INT8
/// with that scale. That is when its producer runs INT8 (see
/// [`runs_int8`]), is a channels-last FP32 depthwise convolution or a Mul
/// (both requantize as they write), it is not a graph output, and every consumer
/// reads it as its data input (not as a residual) with one scale: INT8
/// layers, and FP32 channels-last depthwise layers with a read scale
/// (`depthwise_read_scale`), which widen it to float (unless the pair runs
/// fused, [`crate::fuse`]: then the tensor stays f32).
pub fn int8_flow(g: &Graph, tactics: &[Option<String>]) -> Vec<Option<f32>> {
    let n = g.tensors.len();
    let tactic = |i: usize| tactics.get(i).and_then(|t| t.as_deref());
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in g.nodes.iter().enumerate() {
        for &t in &node.inputs {
            if let Some(r) = readers.get_mut(t) {
                r.push(i);
            }
        }
    }
    // A fused pair's expanded tensor is f32 (it stays in the pair's ring).
    let fused = crate::fuse::fused_pairs(g, tactics);
    let mut flow = vec![None; n];
    for (i, node) in g.nodes.iter().enumerate() {
        let Some(&y) = node.outputs.first() else {
            continue;
        };
        // Convolutions write INT8 tensors (a Gemm's output is f32), and so
        // does a Mul (an SE gate scaling a feature map) whose readers all
        // read INT8: it requantizes as it writes
        // (`eltwise::binary_to_i8`), which for INT8 readers is the very
        // quantization they would apply, and for FP32 depthwise readers is
        // their INT8 read.
        let writes_i8 = match &node.op {
            Op::Conv(_) => {
                runs_int8(&node.op, tactic(i)) || depthwise_writes_i8(g, node, tactic(i))
            }
            Op::Binary(BinaryOp::Mul) => true,
            _ => false,
        };
        if !writes_i8 || g.outputs.contains(&y) || y >= n {
            continue;
        }
        let mut scale = None;
        let all_int8 = !readers[y].is_empty()
            && readers[y].iter().all(|&c| {
                let reader = &g.nodes[c];
                let s = match &reader.op {
                    Op::Conv(a) if runs_int8(&reader.op, tactic(c)) => a.int8_input_scale,
                    Op::Conv(_) if fused.contains(&(i, c)) => None,
                    Op::Conv(_) => depthwise_read_scale(g, reader, tactic(c)),
                    _ => None,
                };
                let data_only = reader.inputs.first() == Some(&y)
                    && !reader.inputs.iter().skip(1).any(|&t| t == y);
                let same = s.is_some() && scale.is_none_or(|v| Some(v) == s);
                scale = scale.or(s);
                data_only && same
            });
        if all_int8 {
            flow[y] = scale;
        }
    }
    flow
}

/// [`int8_flow`] and the memory plan that stores the flowing tensors as
/// INT8 (and keeps a fused pair's inputs live through the pair, see
/// [`crate::fuse`]): what an engine runs with, and what its file records.
pub fn int8_plan(g: &Graph, tactics: &[Option<String>]) -> (Vec<Option<f32>>, MemoryPlan) {
    let flow = int8_flow(g, tactics);
    let is_i8: Vec<bool> = flow.iter().map(Option::is_some).collect();
    let plan = plan_arena_typed(g, &is_i8, &crate::fuse::fused_pairs(g, tactics));
    (flow, plan)
}

/// Node `node` reads its input as f32: clears its
/// [`crate::ir::ConvAttrs::int8_read_scale`] (when the INT8 input costs it
/// too much accuracy).
pub fn read_f32(g: &mut Graph, node: usize) {
    if let Some(Op::Conv(a)) = g.nodes.get_mut(node).map(|n| &mut n.op) {
        a.int8_read_scale = None;
    }
}

/// Clears the INT8 mark of `layer` (it runs FP32), recording `why`.
pub fn revert(g: &mut Graph, layer: &mut Int8Layer, why: String) {
    if let Some(node) = g.nodes.get_mut(layer.node) {
        clear_int8(&mut node.op);
    }
    layer.input_scale = None;
    layer.fallback = Some(why);
}

/// Gives INT8 `layer` a new input scale, keeping the calibrated one in
/// [`Int8Layer::calibrated_scale`]. The scale is the reading node's own:
/// a tensor whose readers then disagree stays f32 between them
/// ([`int8_flow`]) and each reader quantizes it with its scale.
pub fn set_input_scale(g: &mut Graph, layer: &mut Int8Layer, scale: f32) {
    let Some(node) = g.nodes.get_mut(layer.node) else {
        return;
    };
    let s = match &mut node.op {
        Op::Conv(a) => &mut a.int8_input_scale,
        Op::Gemm {
            int8_input_scale, ..
        } => int8_input_scale,
        _ => return,
    };
    if s.is_none() {
        return;
    }
    *s = Some(scale);
    if layer.calibrated_scale.is_none() {
        layer.calibrated_scale = layer.input_scale;
    }
    layer.input_scale = Some(scale);
}

/// Whether any node is marked INT8.
pub fn has_int8(g: &Graph) -> bool {
    g.nodes.iter().any(|n| int8_scale(&n.op).is_some())
}

/// A copy of `g` with every INT8 mark cleared (the FP32 reference).
pub fn without_int8(g: &Graph) -> Graph {
    let mut g = g.clone();
    for n in &mut g.nodes {
        clear_int8(&mut n.op);
    }
    g
}

/// Signal-to-quantization-noise ratio in dB of `test` against `reference`
/// (infinite when they are equal; accumulate sums with [`Sqnr`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sqnr {
    signal: f64,
    noise: f64,
}

impl Sqnr {
    /// Adds one pair of tensors.
    pub fn add(&mut self, reference: &[f32], test: &[f32]) {
        for (&r, &t) in reference.iter().zip(test) {
            self.signal += (r as f64) * (r as f64);
            self.noise += ((r - t) as f64) * ((r - t) as f64);
        }
    }
    /// `10·log10(Σ r² / Σ (r − t)²)`; +∞ without noise.
    pub fn db(&self) -> f64 {
        if self.noise == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (self.signal / self.noise).log10()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqnr_of_known_noise() {
        let mut s = Sqnr::default();
        s.add(&[1.0, -1.0, 1.0, -1.0], &[1.1, -0.9, 0.9, -1.1]);
        // signal 4, noise 4 * 0.01 -> 20 dB.
        assert!((s.db() - 20.0).abs() < 1e-4, "{}", s.db());
        let mut e = Sqnr::default();
        e.add(&[1.0, 2.0], &[1.0, 2.0]);
        assert_eq!(e.db(), f64::INFINITY);
    }

    #[test]
    fn qdq_models_import_with_their_scales() {
        // Symmetric INT8 activations: the scale as given.
        let g = crate::onnx::import(&crate::testing::qdq_conv_model(None), &Default::default())
            .unwrap();
        assert_eq!(g.quant_scales.get("x"), Some(&0.02));
        assert_eq!(g.quant_scales.get("xd"), Some(&0.02));
        // Weights folded: (q - 0) * scale of their output channel.
        let conv = g
            .nodes
            .iter()
            .find(|n| matches!(n.op, Op::Conv(_)))
            .unwrap();
        let w = g.tensors[conv.inputs[1]].value.as_ref().unwrap().to_f32();
        assert_eq!(w.len(), 108);
        assert_eq!(w[0], 0.0);
        assert_eq!(w[1], 37.0 * 0.01);
        assert_eq!(w[27 + 4], ((4 * 37 + 27 * 37) % 255) as i8 as f32 * 0.02);
        // UINT8 with zero point 128: range [-128, 127]·s -> symmetric 128·s/127.
        let g = crate::onnx::import(
            &crate::testing::qdq_conv_model(Some(128)),
            &Default::default(),
        )
        .unwrap();
        let s = g.quant_scales["x"];
        assert!((s - 128.0 * 0.02 / 127.0).abs() < 1e-7, "{s}");
        // UINT8 with zero point 0 (post-ReLU style): [0, 255]·s.
        let g = crate::onnx::import(
            &crate::testing::qdq_conv_model(Some(0)),
            &Default::default(),
        )
        .unwrap();
        assert!((g.quant_scales["x"] - 255.0 * 0.02 / 127.0).abs() < 1e-7);
    }

    #[test]
    fn permits_plain_and_depthwise_convs_only_with_a_scale() {
        use crate::onnx::builder::{attr_i, attr_ints, ModelBuilder};
        let w = |n: usize| {
            (0..n)
                .map(|i| (i % 7) as f32 * 0.1 - 0.3)
                .collect::<Vec<_>>()
        };
        let mut b = ModelBuilder::new(13);
        b.input("x", &[1, 4, 6, 6])
            .init_f32("w1", &[4, 4, 3, 3], &w(144))
            .init_f32("w2", &[4, 1, 3, 3], &w(36))
            .init_f32("w3", &[4, 2, 1, 1], &w(8))
            .init_f32("w4", &[2, 4, 1, 1], &w(8))
            .node(
                "Conv",
                &["x", "w1"],
                &["y"],
                vec![attr_ints("pads", &[1, 1, 1, 1])],
            )
            .node(
                "Conv",
                &["y", "w2"],
                &["z"],
                vec![attr_ints("pads", &[1, 1, 1, 1]), attr_i("group", 4)],
            )
            .node("Conv", &["z", "w3"], &["u"], vec![attr_i("group", 2)])
            .node("Conv", &["u", "w4"], &["o"], vec![])
            .output("o");
        let mut g = crate::onnx::import(&b.to_bytes(), &Default::default()).unwrap();
        let plain = permit_int8(&mut g.clone(), &|n| (n != "u").then_some(0.05), false);
        assert!(plain[1]
            .fallback
            .as_deref()
            .unwrap()
            .contains("not requested"));
        assert!(plain[0].fallback.is_none());
        let layers = permit_int8(&mut g, &|n| (n != "u").then_some(0.05), true);
        assert_eq!(layers.len(), 4);
        assert_eq!(layers[0].input_scale, Some(0.05));
        assert!(layers[0].fallback.is_none());
        // Depthwise has an INT8 kernel; other grouped convolutions do not.
        assert!(layers[1].fallback.is_none(), "{:?}", layers[1].fallback);
        assert!(layers[2]
            .fallback
            .as_deref()
            .unwrap()
            .contains("not depthwise"));
        assert!(layers[3]
            .fallback
            .as_deref()
            .unwrap()
            .contains("no calibration scale"));
        // y passes INT8 from layer 0 to the depthwise layer; z does not
        // (its reader runs FP32), nor does the graph output.
        let flow = int8_flow(&g, &[]);
        let id = |n: &str| g.tensors.iter().position(|t| t.name == n).unwrap();
        assert_eq!(flow[id("y")], Some(0.05));
        assert_eq!(flow[id("z")], None);
        assert_eq!(flow[id("o")], None);
        // An FP32 tactic chosen for the depthwise layer stops the flow.
        let dw = g
            .nodes
            .iter()
            .position(|n| n.inputs.first() == Some(&id("y")))
            .unwrap();
        let mut tactics = vec![None; g.nodes.len()];
        tactics[dw] = Some("depthwise-direct".to_string());
        assert_eq!(int8_flow(&g, &tactics)[id("y")], None);
        assert!(has_int8(&g));
        assert!(!has_int8(&without_int8(&g)));
        let mut l0 = layers[0].clone();
        let y = id("y");
        revert(&mut g, &mut l0, "test".into());
        assert_eq!(int8_flow(&g, &[])[y], None);
        assert_eq!(l0.fallback.as_deref(), Some("test"));
        let mut l1 = layers[1].clone();
        revert(&mut g, &mut l1, "test".into());
        assert!(!has_int8(&g));
    }

    /// A pointwise → depthwise → pointwise chain (MobileNet's inverted
    /// residual) whose inner tensors pass as INT8, against the plain-loop
    /// INT8 reference chained with explicit quantize/dequantize steps.
    /// An SE gate's Mul read only by INT8 layers writes INT8: for an
    /// INT8 convolution the very values it would quantize itself (bit for
    /// bit the engine in which the Mul's output is also a graph output,
    /// so f32), and an FP32 depthwise layer with a read scale reads it.
    #[test]
    fn a_mul_read_by_int8_layers_writes_int8() {
        use crate::exec::{Engine, ExecutionContext};
        use crate::onnx::builder::{attr_i, attr_ints, ModelBuilder};
        let rnd = |n: usize, seed: u64| crate::tune::pseudo_random(n, seed);
        let (c, h) = (16usize, 9i64);
        // x -> conv 1x1 -> y -> Mul(y, sigmoid(conv(mean(y)))) -> m
        // m -> conv 1x1 (INT8) -> o1
        // m -> depthwise 3x3 (FP32, reads INT8) -> o2
        let model = |m_is_output: bool| {
            let mut b = ModelBuilder::new(13);
            b.input("x", &[1, c as i64, h, h])
                .init_f32("w0", &[c, c, 1, 1], &rnd(c * c, 5))
                .init_f32("wg", &[c, c, 1, 1], &rnd(c * c, 1))
                .init_f32("w1", &[8, c, 1, 1], &rnd(8 * c, 2))
                .init_f32("w2", &[c, 1, 3, 3], &rnd(c * 9, 3))
                .node("Conv", &["x", "w0"], &["y"], vec![])
                .node("GlobalAveragePool", &["y"], &["p"], vec![])
                .node("Conv", &["p", "wg"], &["q"], vec![])
                .node("Sigmoid", &["q"], &["gate"], vec![])
                .node("Mul", &["y", "gate"], &["m"], vec![])
                .node("Conv", &["m", "w1"], &["o1"], vec![])
                .node(
                    "Conv",
                    &["m", "w2"],
                    &["o2"],
                    vec![attr_ints("pads", &[1, 1, 1, 1]), attr_i("group", c as i64)],
                )
                .output("o1")
                .output("o2");
            if m_is_output {
                b.output("m");
            }
            let mut g = crate::onnx::import(&b.to_bytes(), &Default::default()).unwrap();
            let layers = permit_int8(&mut g, &|n| (n == "m").then_some(0.06), false);
            assert_eq!(layers.iter().filter(|l| l.fallback.is_none()).count(), 1);
            crate::passes::channels_last(&mut g);
            std::sync::Arc::new(Engine::new(g).unwrap())
        };
        let (flowing, f32_m) = (model(false), model(true));
        let infos = |e: &Engine| -> Vec<String> {
            (0..e.step_count())
                .map(|i| e.step_info(i).unwrap().1)
                .collect()
        };
        let fi = infos(&flowing);
        assert!(fi.iter().any(|i| i == "Binary Mul out:i8"), "{fi:?}");
        assert!(
            fi.iter()
                .any(|i| i.contains("int8-nhwc-gemm") && i.contains("in:i8")),
            "{fi:?}"
        );
        assert!(
            fi.iter()
                .any(|i| i.contains("nhwc-depthwise") && i.contains("in:i8")),
            "{fi:?}"
        );
        assert!(!infos(&f32_m).iter().any(|i| i.contains("in:i8")));
        let x: Vec<f32> = rnd(c * 81, 4).iter().map(|v| v * 1.5).collect();
        let run = |e: &std::sync::Arc<Engine>, k: usize| {
            let mut ctx = ExecutionContext::new(e.clone(), 2);
            ctx.input_mut(0).unwrap().copy_from_slice(&x);
            ctx.run().unwrap();
            ctx.output_index(k).unwrap().to_vec()
        };
        let bits = |v: Vec<f32>| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        // The INT8 convolution: the same quantized input either way.
        assert_eq!(bits(run(&flowing, 0)), bits(run(&f32_m, 0)));
        // The depthwise layer's INT8 read: within the input's rounding.
        let (got, want) = (run(&flowing, 1), run(&f32_m, 1));
        let peak = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err > 0.0 && err < 0.06 * peak, "{err} of {peak}");
    }

    #[test]
    fn int8_tensors_flow_through_a_chain_exactly_as_quantized_steps() {
        use crate::exec::{Engine, ExecutionContext};
        use crate::onnx::builder::{attr_i, attr_ints, ModelBuilder};
        use osprey_kernels::activation::Activation;
        use osprey_kernels::conv::Conv2dGeometry;
        use osprey_kernels::qconv::{quantize, reference_qconv2d};
        let rnd = |n: usize, seed: u32, amp: f32| {
            let mut s = seed | 1;
            (0..n)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 17;
                    s ^= s << 5;
                    (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 * amp - amp
                })
                .collect::<Vec<_>>()
        };
        let (c, e, h) = (8, 16, 10);
        let (w1, w2, w3) = (rnd(e * c, 1, 0.4), rnd(e * 9, 2, 0.4), rnd(c * e, 3, 0.3));
        let x = rnd(c * h * h, 4, 1.0);
        let mut b = ModelBuilder::new(13);
        b.input("x", &[1, c as i64, h as i64, h as i64])
            .init_f32("w1", &[e, c, 1, 1], &w1)
            .init_f32("w2", &[e, 1, 3, 3], &w2)
            .init_f32("w3", &[c, e, 1, 1], &w3)
            .node("Conv", &["x", "w1"], &["a"], vec![])
            .node(
                "Conv",
                &["a", "w2"],
                &["d"],
                vec![attr_ints("pads", &[1, 1, 1, 1]), attr_i("group", e as i64)],
            )
            .node("Conv", &["d", "w3"], &["o"], vec![])
            .output("o");
        let mut g = crate::onnx::import(&b.to_bytes(), &Default::default()).unwrap();
        let (sx, sa, sd) = (1.0 / 127.0, 2.0 / 127.0, 3.0 / 127.0);
        let scales = [("x", sx), ("a", sa), ("d", sd)];
        let layers = permit_int8(
            &mut g,
            &|n| scales.iter().find(|s| s.0 == n).map(|s| s.1),
            true,
        );
        assert!(layers.iter().all(|l| l.fallback.is_none()));
        let engine = std::sync::Arc::new(Engine::new(g.clone()).unwrap());
        let infos: Vec<String> = (0..engine.step_count())
            .map(|i| engine.step_info(i).unwrap().1)
            .collect();
        assert!(
            infos[0].ends_with("out:i8") && !infos[0].contains("in:i8"),
            "{infos:?}"
        );
        assert!(
            infos[1].contains("int8-depthwise") && infos[1].ends_with("in:i8 out:i8"),
            "{infos:?}"
        );
        assert!(infos[2].ends_with("in:i8"), "{infos:?}");
        // INT8 tensors take a quarter of the arena space.
        let plain = crate::plan::plan_arena(&g);
        assert!(engine.memory_plan().arena_floats < plain.arena_floats);
        let mut ctx = ExecutionContext::new(engine, 2);
        ctx.input_mut(0).unwrap().copy_from_slice(&x);
        ctx.run().unwrap();
        let got = ctx.output_index(0).unwrap().to_vec();

        let geo = |c_in, c_out, k, p, groups| Conv2dGeometry {
            c_in,
            h,
            w: h,
            c_out,
            kh: k,
            kw: k,
            stride: [1, 1],
            dilation: [1, 1],
            pads: [p; 4],
            groups,
        };
        let requantize = |v: &[f32], s: f32| -> Vec<f32> {
            v.iter().map(|&v| quantize(v, 1.0 / s) as f32 * s).collect()
        };
        let none = Activation::None;
        let mut a = vec![0f32; e * h * h];
        reference_qconv2d(&geo(c, e, 1, 0, 1), &x, &w1, None, None, none, sx, &mut a);
        let mut d = vec![0f32; e * h * h];
        let a = requantize(&a, sa);
        reference_qconv2d(&geo(e, e, 3, 1, e), &a, &w2, None, None, none, sa, &mut d);
        let mut want = vec![0f32; c * h * h];
        let d = requantize(&d, sd);
        reference_qconv2d(
            &geo(e, c, 1, 0, 1),
            &d,
            &w3,
            None,
            None,
            none,
            sd,
            &mut want,
        );
        // The kernels' FMA epilogue may round a value at a half-step
        // boundary the other way: rare, and one step of one term.
        let agree = |got: &[f32], want: &[f32]| {
            let close = got
                .iter()
                .zip(want)
                .filter(|(a, b)| (*a - *b).abs() <= 1e-5 * (1.0 + b.abs()))
                .count();
            assert!(close * 100 >= want.len() * 98, "{close} of {}", want.len());
            let max = got
                .iter()
                .zip(want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(max <= 0.05, "max difference {max}");
        };
        let check = |got: &[f32]| agree(got, &want);
        check(&got);

        // The same chain channels-last: the three layers run the NHWC INT8
        // kernels, INT8 tensors between them, the conversions at the ends.
        let mut gl = g.clone();
        crate::passes::channels_last(&mut gl);
        let engine = std::sync::Arc::new(Engine::new(gl).unwrap());
        let infos: Vec<String> = (0..engine.step_count())
            .map(|i| engine.step_info(i).unwrap().1)
            .collect();
        let convs: Vec<&String> = infos.iter().filter(|i| i.starts_with("Conv")).collect();
        assert_eq!(convs.len(), 3, "{infos:?}");
        assert!(convs[0].contains("int8-nhwc-gemm") && convs[0].ends_with("out:i8"));
        assert!(convs[1].contains("int8-nhwc-depthwise") && convs[1].ends_with("in:i8 out:i8"));
        assert!(convs[2].contains("int8-nhwc-gemm") && convs[2].ends_with("in:i8"));
        let mut ctx = ExecutionContext::new(engine, 2);
        ctx.input_mut(0).unwrap().copy_from_slice(&x);
        ctx.run().unwrap();
        let nhwc = ctx.output_index(0).unwrap().to_vec();
        check(&nhwc);

        // The depthwise layer left FP32 (no --int8-depthwise): NCHW, it
        // reads f32 and the INT8 projection quantizes its f32 input;
        // channels-last, the expansion writes INT8, the FP32 depthwise
        // kernel reads it (its weights times the scale), requantizes its
        // rows as it writes them, and the projection reads INT8. Each
        // against the plain loops (FP32 kernels may round a sum
        // differently, which can move a value by one step: rarely).
        let mut gf = crate::onnx::import(&b.to_bytes(), &Default::default()).unwrap();
        let layers = permit_int8(
            &mut gf,
            &|n| scales.iter().find(|s| s.0 == n).map(|s| s.1),
            false,
        );
        assert_eq!(layers.iter().filter(|l| l.fallback.is_none()).count(), 2);
        let run = |g: Graph| {
            let engine = std::sync::Arc::new(Engine::new(g).unwrap());
            let infos: Vec<String> = (0..engine.step_count())
                .map(|i| engine.step_info(i).unwrap().1)
                .collect();
            let mut ctx = ExecutionContext::new(engine, 2);
            ctx.input_mut(0).unwrap().copy_from_slice(&x);
            ctx.run().unwrap();
            (ctx.output_index(0).unwrap().to_vec(), infos)
        };
        let read_a = gf.nodes.iter().any(|n| match &n.op {
            Op::Conv(a) => a.int8_read_scale == Some(sa) && a.int8_input_scale.is_none(),
            _ => false,
        });
        assert!(read_a, "the depthwise layer may read 'a' as INT8");
        let (nchw, infos) = run(gf.clone());
        assert!(
            infos
                .iter()
                .all(|i| !i.contains("out:i8") || i.contains("int8")),
            "{infos:?}"
        );
        crate::passes::channels_last(&mut gf);
        // Left to read f32 (as the builder leaves a layer whose SQNR on
        // the quantized input is too low): the expansion writes f32.
        let mut gr = gf.clone();
        let dw = gr
            .nodes
            .iter()
            .position(|n| matches!(&n.op, Op::Conv(a) if a.int8_read_scale.is_some()));
        read_f32(&mut gr, dw.unwrap());
        let (_, infos) = run(gr);
        let convs: Vec<&String> = infos.iter().filter(|i| i.starts_with("Conv")).collect();
        assert!(
            !convs[0].ends_with("out:i8") && !convs[1].contains("in:i8"),
            "{infos:?}"
        );
        let (nhwc, infos) = run(gf);
        let convs: Vec<&String> = infos.iter().filter(|i| i.starts_with("Conv")).collect();
        assert!(
            convs[0].contains("int8-nhwc-gemm") && convs[0].ends_with("out:i8"),
            "{infos:?}"
        );
        assert!(
            convs[1].contains("Conv nhwc-depthwise") && convs[1].ends_with("in:i8 out:i8"),
            "{infos:?}"
        );
        assert!(
            convs[2].contains("int8-nhwc-gemm") && convs[2].ends_with("in:i8"),
            "{infos:?}"
        );
        // The plain loops: INT8 expansion, FP32 depthwise on `a` as f32
        // (NCHW) or requantized (channels-last), INT8 projection.
        let fp32_depthwise = |a: &[f32]| {
            let mut d = vec![0f32; e * h * h];
            osprey_kernels::conv::reference_conv2d(&geo(e, e, 3, 1, e), a, &w2, None, none, &mut d);
            let mut o = vec![0f32; c * h * h];
            let d = requantize(&d, sd);
            reference_qconv2d(&geo(e, c, 1, 0, 1), &d, &w3, None, None, none, sd, &mut o);
            o
        };
        let mut a_f32 = vec![0f32; e * h * h];
        reference_qconv2d(
            &geo(c, e, 1, 0, 1),
            &x,
            &w1,
            None,
            None,
            none,
            sx,
            &mut a_f32,
        );
        agree(&nchw, &fp32_depthwise(&a_f32));
        agree(&nhwc, &fp32_depthwise(&requantize(&a_f32, sa)));
        // The INT8 read is visible: the two differ.
        assert!(nhwc.iter().zip(&nchw).any(|(p, q)| p != q));
    }

    /// The pair and dot4 forms of the INT8 kernels are two tactics of one
    /// layer with identical results; the tuner times both where the CPU has
    /// a dot4 kernel, on non-negative data where the input is non-negative
    /// by construction; a tactic of the wrong shape is refused.
    #[test]
    fn int8_kernel_forms_are_tactics_with_identical_results() {
        use crate::exec::{Engine, ExecutionContext};
        use crate::onnx::builder::{attr_ints, ModelBuilder};
        use crate::tune::{pseudo_random, select_tactics, TimingCache};
        use osprey_kernels::qconv::dot4_kernel;
        let (c, e, h) = (12, 24, 9);
        let w = |n: usize, seed| {
            pseudo_random(n, seed)
                .iter()
                .map(|v| v * 0.3)
                .collect::<Vec<_>>()
        };
        let mut b = ModelBuilder::new(13);
        b.input("x", &[1, c as i64, h as i64, h as i64])
            .init_f32("w1", &[e, c, 1, 1], &w(e * c, 1))
            .init_f32("w2", &[c, e, 3, 3], &w(c * e * 9, 2))
            .init_f32("w3", &[e, c, 1, 1], &w(e * c, 3))
            .node("Conv", &["x", "w1"], &["a"], vec![])
            .node("Relu", &["a"], &["r"], vec![])
            .node(
                "Conv",
                &["r", "w2"],
                &["d"],
                vec![attr_ints("pads", &[1, 1, 1, 1])],
            )
            .node("Conv", &["d", "w3"], &["o"], vec![])
            .output("o");
        let mut g = crate::onnx::import(&b.to_bytes(), &Default::default()).unwrap();
        let layers = permit_int8(&mut g, &|_| Some(2.0 / 127.0), false);
        assert!(layers.iter().all(|l| l.fallback.is_none()));
        let convs: Vec<usize> = (0..g.nodes.len())
            .filter(|&i| matches!(g.nodes[i].op, Op::Conv(_)))
            .collect();
        assert_eq!(convs.len(), 3, "ReLU fused into the first convolution");
        let id = |n: &str| g.tensors.iter().position(|t| t.name == n).unwrap();
        let input_of = |i: usize| g.nodes[convs[i]].inputs[0];
        assert!(!nonneg_tensor(&g, id("x")));
        assert!(nonneg_tensor(&g, input_of(1)));
        assert!(!nonneg_tensor(&g, input_of(2)));

        let names = |dot4: bool| {
            let mut t = vec![None; g.nodes.len()];
            for (i, name) in convs
                .iter()
                .zip(["int8-pointwise", "int8-im2col", "int8-pointwise"])
            {
                t[*i] = Some(if dot4 {
                    format!("{name}-dot4")
                } else {
                    name.to_string()
                });
            }
            t
        };
        let x = pseudo_random(c * h * h, 9);
        let run = |tactics: &[Option<String>]| {
            let engine = std::sync::Arc::new(Engine::with_tactics(g.clone(), tactics).unwrap());
            let infos: Vec<String> = (0..engine.step_count())
                .map(|i| engine.step_info(i).unwrap().1)
                .collect();
            let mut ctx = ExecutionContext::new(engine, 2);
            ctx.input_mut(0).unwrap().copy_from_slice(&x);
            ctx.run().unwrap();
            (ctx.output_index(0).unwrap().to_vec(), infos)
        };
        let (pairs, pair_infos) = run(&names(false));
        let (dot4, dot4_infos) = run(&names(true));
        // Exact integer products and the same epilogue: equal bit for bit.
        assert_eq!(pairs, dot4);
        let dot4_steps = dot4_infos.iter().filter(|s| s.contains("-dot4")).count();
        assert_eq!(
            dot4_steps,
            if dot4_kernel().is_some() { 3 } else { 0 },
            "{dot4_infos:?}"
        );
        assert!(
            !pair_infos.iter().any(|s| s.contains("-dot4")),
            "{pair_infos:?}"
        );
        // A tactic of another shape does not fit.
        let mut wrong = names(false);
        wrong[convs[0]] = Some("int8-im2col".into());
        let Err(err) = Engine::with_tactics(g.clone(), &wrong) else {
            panic!("a pair tactic of the wrong shape was accepted");
        };
        assert!(err.to_string().contains("does not fit"), "{err}");

        let mut cache = TimingCache::default();
        let fp = crate::fingerprint::Fingerprint::current();
        let (_, choices) = select_tactics(&g, 1, &mut cache, &fp, &mut |_, _, _| {}).unwrap();
        for (i, l) in choices.iter().enumerate() {
            let forms = l
                .candidates
                .keys()
                .filter(|k| k.starts_with("int8"))
                .count();
            assert_eq!(forms, if dot4_kernel().is_some() { 2 } else { 1 }, "{l:?}");
            let nonneg = cache
                .entries
                .keys()
                .filter(|k| k.contains("|nonneg"))
                .count();
            if i == 0 {
                assert_eq!(
                    nonneg,
                    usize::from(dot4_kernel().is_some()),
                    "{:?}",
                    cache.entries.keys()
                );
            }
        }
    }

    /// Fully connected layers run INT8 (`QLinear`) where the kernel fits:
    /// A plain and 2-D, C per output column. The scale of a Flatten's
    /// source serves the Gemm that reads the Flatten; alpha, beta and an
    /// untransposed B are folded the way the FP32 Gemm takes them.
    #[test]
    fn gemms_run_int8_where_the_kernel_fits() {
        use crate::exec::{Engine, ExecutionContext};
        use crate::onnx::builder::{attr_f, attr_i, ModelBuilder};
        use crate::tune::pseudo_random;
        use osprey_kernels::int8::reference_qlinear;
        let (c, hw, n1, n2) = (6, 4, 20, 7);
        let k = c * hw;
        let w1 = pseudo_random(n1 * k, 1);
        let b1 = pseudo_random(n1, 2);
        let w2 = pseudo_random(n1 * n2, 3); // [k = n1][n2]: not transposed
        let b2 = pseudo_random(n2, 4);
        let mut b = ModelBuilder::new(13);
        b.input("x", &[1, c as i64, 2, 2])
            .init_f32("w1", &[n1, k], &w1)
            .init_f32("b1", &[n1], &b1)
            .init_f32("w2", &[n1, n2], &w2)
            .init_f32("b2", &[n2], &b2)
            .node("Relu", &["x"], &["r"], vec![])
            .node("Flatten", &["r"], &["f"], vec![attr_i("axis", 1)])
            .node(
                "Gemm",
                &["f", "w1", "b1"],
                &["h"],
                vec![attr_i("transB", 1)],
            )
            .node(
                "Gemm",
                &["h", "w2", "b2"],
                &["y"],
                vec![attr_f("alpha", 0.5), attr_f("beta", 2.0)],
            )
            .output("y");
        let mut g = crate::onnx::import(&b.to_bytes(), &Default::default()).unwrap();
        let (sr, sh) = (1.0 / 127.0, 3.0 / 127.0);
        // Calibration saw "r" (the Flatten is a view, never computed) and "h".
        let layers = permit_int8(
            &mut g,
            &|t| match t {
                "r" => Some(sr),
                "h" => Some(sh),
                _ => None,
            },
            false,
        );
        assert_eq!(layers.len(), 2, "{layers:?}");
        assert!(layers.iter().all(|l| l.fallback.is_none()), "{layers:?}");
        assert_eq!(layers[0].input_scale, Some(sr));
        let engine = std::sync::Arc::new(Engine::new(g.clone()).unwrap());
        let infos: Vec<String> = (0..engine.step_count())
            .map(|i| engine.step_info(i).unwrap().1)
            .collect();
        assert_eq!(
            infos.iter().filter(|s| s.starts_with("Gemm int8")).count(),
            2,
            "{infos:?}"
        );
        let x = pseudo_random(k, 5);
        let mut ctx = ExecutionContext::new(engine, 1);
        ctx.input_mut(0).unwrap().copy_from_slice(&x);
        ctx.run().unwrap();
        let got = ctx.output_index(0).unwrap().to_vec();
        // The reference: the same quantization, chained.
        let r: Vec<f32> = x.iter().map(|v| v.max(0.0)).collect();
        let mut h = vec![0f32; n1];
        reference_qlinear(n1, k, &w1, Some(&b1), sr, &r, &mut h);
        let w2t: Vec<f32> = (0..n2 * n1)
            .map(|i| 0.5 * w2[(i % n1) * n2 + i / n1])
            .collect();
        let b2s: Vec<f32> = b2.iter().map(|v| 2.0 * v).collect();
        let mut want = vec![0f32; n2];
        reference_qlinear(n2, n1, &w2t, Some(&b2s), sh, &h, &mut want);
        for (a, w) in got.iter().zip(&want) {
            assert!(
                (a - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{got:?} vs {want:?}"
            );
        }
        assert!(
            !int8_flow(&g, &[]).iter().any(Option::is_some),
            "Gemm outputs stay f32"
        );
        assert!(has_int8(&g) && !has_int8(&without_int8(&g)));

        // Transposed A, or a C that is not per column: left FP32, saying why.
        let mut b = ModelBuilder::new(13);
        b.input("x", &[k as i64, 1])
            .input("z", &[1, k as i64])
            .init_f32("w1", &[n1, k], &w1)
            .init_f32("cfull", &[1, n1], &b1)
            .init_f32("ccol", &[1, 1], &b1[..1])
            .input("z2", &[2, k as i64])
            .init_f32("cmat", &[2, n1], &[b1.clone(), b1.clone()].concat())
            .node(
                "Gemm",
                &["x", "w1"],
                &["y1"],
                vec![attr_i("transA", 1), attr_i("transB", 1)],
            )
            .node(
                "Gemm",
                &["z", "w1", "ccol"],
                &["y2"],
                vec![attr_i("transB", 1)],
            )
            .node(
                "Gemm",
                &["z", "w1", "cfull"],
                &["y3"],
                vec![attr_i("transB", 1)],
            )
            .node(
                "Gemm",
                &["z2", "w1", "cmat"],
                &["y4"],
                vec![attr_i("transB", 1)],
            )
            .output("y1")
            .output("y2")
            .output("y3")
            .output("y4");
        let mut g = crate::onnx::import(&b.to_bytes(), &Default::default()).unwrap();
        let layers = permit_int8(&mut g, &|_| Some(sr), false);
        let why: Vec<Option<&str>> = layers.iter().map(|l| l.fallback.as_deref()).collect();
        assert!(
            why[0].is_some_and(|w| w.contains("transposed A")),
            "{why:?}"
        );
        assert_eq!(why[1], None, "a scalar C is a bias");
        assert_eq!(why[2], None, "a [1, n] C is per column");
        assert!(
            why[3].is_some_and(|w| w.contains("not per output column")),
            "{why:?}"
        );
    }
}
