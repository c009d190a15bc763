//! Turning graph nodes into prepared steps: packed weights, broadcast and
//! resize tables, copy plans, tactics.

use std::collections::BTreeMap;

use osprey_kernels::conv::{Conv2d, ConvTactic, ConvTranspose2d};
use osprey_kernels::conv_nhwc::Conv2dNhwc;
use osprey_kernels::eltwise::{self, BinaryOp, Broadcast};
use osprey_kernels::gemm::PackedA;
use osprey_kernels::layout::{contiguous_strides, StridedView};
use osprey_kernels::pooling::Pool2dGeometry;
use osprey_kernels::qconv::{dot4_kernel, QConv2d};
use osprey_kernels::qconv_nhwc::QConv2dNhwc;
use osprey_kernels::resize::Resize2d;
use osprey_kernels::{Activation, ThreadPool};

use super::{CopyPart, Kind, Operand, QLayer};
use crate::int8::runs_int8;
use crate::ir::{ConstData, Graph, Op, TensorId};
use crate::plan::MemoryPlan;

pub(super) struct Builder<'a> {
    pub(super) tactics: &'a [Option<String>],
    pub(super) g: &'a Graph,
    pub(super) plan: &'a MemoryPlan,
    /// Per tensor: its INT8 scale when it flows INT8 (`crate::int8::int8_flow`).
    pub(super) flow: &'a [Option<f32>],
    pub(super) consts: Vec<Vec<f32>>,
    pub(super) const_of: BTreeMap<TensorId, usize>,
}

impl Builder<'_> {
    pub(super) fn operand(&mut self, t: TensorId) -> Operand {
        if let Some((off, len)) = self.plan.range(t) {
            return Operand::Arena { off, len };
        }
        if let Some(&idx) = self.const_of.get(&t) {
            return Operand::Const { idx };
        }
        let data = self.g.tensors[t]
            .value
            .as_ref()
            .map(ConstData::to_f32)
            .unwrap_or_default();
        self.consts.push(data);
        let idx = self.consts.len() - 1;
        self.const_of.insert(t, idx);
        Operand::Const { idx }
    }

    fn shape(&self, t: TensorId) -> &[usize] {
        &self.g.tensors[t].shape
    }

    fn const_f32(&self, t: TensorId) -> std::result::Result<Vec<f32>, String> {
        self.g.tensors[t]
            .value
            .as_ref()
            .map(ConstData::to_f32)
            .ok_or_else(|| format!("'{}' must be a constant", self.g.tensors[t].name))
    }

    pub(super) fn kind(
        &mut self,
        ni: usize,
        node: &crate::ir::Node,
    ) -> std::result::Result<Kind, String> {
        let x = node.inputs.first().copied().ok_or("node without inputs")?;
        let y = node
            .outputs
            .first()
            .copied()
            .ok_or("node without outputs")?;
        let xs = self.shape(x).to_vec();
        let ys = self.shape(y).to_vec();
        Ok(match &node.op {
            Op::Conv(a) => {
                let w = self.const_f32(node.inputs[1])?;
                let bias = node.inputs.get(2).map(|&b| self.const_f32(b)).transpose()?;
                let geo = a.geometry(&xs, &ys);
                if a.residual && node.inputs.len() != 4 {
                    return Err("fused residual without its operand".into());
                }
                let chosen = self.tactics.get(ni).and_then(|t| t.as_deref());
                if a.channels_last {
                    // INT8 where the graph permits it, unless tuning chose
                    // the FP32 kernel.
                    if let (Some(scale), true) = (a.int8_input_scale, runs_int8(&node.op, chosen)) {
                        // The AMX form where the tuner chose it (on a CPU
                        // without AMX, or with OSPREY_AMX=off, the VNNI
                        // form: the same results).
                        // The fused form (`+dw`) runs this layer's kernel too.
                        let chosen = chosen.map(crate::fuse::unfused);
                        let amx = chosen.is_some_and(|n| n.ends_with("-amx"));
                        let layer = QConv2dNhwc::new(geo, &w, bias.as_deref(), a.activation, scale)
                            .map_err(|e| e.to_string())?
                            .with_amx(amx);
                        let form = |n: &str| n.trim_end_matches("-amx").to_string();
                        if let Some(name) = chosen.filter(|&n| form(n) != form(layer.algorithm())) {
                            return Err(format!(
                                "tactic '{name}' does not fit this channels-last INT8 layer (it runs {})",
                                layer.algorithm()
                            ));
                        }
                        let flow = |t: TensorId| self.flow.get(t).copied().flatten();
                        return Ok(Kind::QConv {
                            layer: QLayer::Nhwc(layer),
                            batch: xs[0],
                            residual: a.residual,
                            in_i8: flow(x).is_some(),
                            out_scale: flow(y),
                        });
                    }
                    // An INT8 input (a depthwise layer reading its INT8
                    // producer): the values widen to floats, so the
                    // weights carry the input's scale.
                    let in_scale = self.flow.get(x).copied().flatten();
                    let w = match in_scale {
                        Some(s) => w.iter().map(|v| v * s).collect(),
                        None => w,
                    };
                    let layer = Conv2dNhwc::new(geo, &w, bias.as_deref(), a.activation)
                        .map_err(|e| e.to_string())?;
                    if in_scale.is_some() && !layer.reads_i8() {
                        return Err(format!(
                            "an INT8 input planned for a channels-last {} layer, which reads f32 only",
                            layer.algorithm()
                        ));
                    }
                    // The fused form (`+dw`) runs this layer's kernel too.
                    if let Some(name) =
                        chosen.filter(|&n| crate::fuse::unfused(n) != layer.algorithm())
                    {
                        return Err(format!(
                            "tactic '{name}' does not fit this channels-last layer (it runs {})",
                            layer.algorithm()
                        ));
                    }
                    let out_scale = self.flow.get(y).copied().flatten();
                    if out_scale.is_some() && !layer.writes_i8() {
                        return Err(format!(
                            "an INT8 output planned for a channels-last {} layer, which writes f32 only",
                            layer.algorithm()
                        ));
                    }
                    return Ok(Kind::ConvNhwc {
                        layer,
                        batch: xs[0],
                        residual: a.residual,
                        in_i8: in_scale.is_some(),
                        out_scale,
                    });
                }
                // INT8 where the graph permits it, unless tuning chose an
                // FP32 tactic for this layer.
                if let (Some(scale), true) = (a.int8_input_scale, runs_int8(&node.op, chosen)) {
                    // The dot4 form where the tuner chose it; untuned, where
                    // it is the faster on any input (NEON sdot, AVX-512 VNNI).
                    let dot4 = match chosen {
                        Some(name) => name.ends_with("-dot4"),
                        None => matches!(dot4_kernel(), Some("sdot" | "vpdpbusd")),
                    };
                    let layer = QConv2d::new(geo, &w, bias.as_deref(), a.activation, scale)
                        .map_err(|e| e.to_string())?
                        .with_dot4(dot4);
                    // A dot4 tactic on a CPU capped below its kernel
                    // (OSPREY_ISA) runs the pair form: the same results.
                    let form = |n: &str| n.trim_end_matches("-dot4").to_string();
                    if let Some(name) = chosen.filter(|&n| form(n) != form(layer.algorithm())) {
                        return Err(format!(
                            "tactic '{name}' does not fit this layer (it runs {})",
                            layer.algorithm()
                        ));
                    }
                    let flow = |t: TensorId| self.flow.get(t).copied().flatten();
                    return Ok(Kind::QConv {
                        layer: QLayer::Nchw(layer),
                        batch: xs[0],
                        residual: a.residual,
                        in_i8: flow(x).is_some(),
                        out_scale: flow(y),
                    });
                }
                let tactic = match chosen {
                    None => ConvTactic::default_for(&geo),
                    Some(name) => ConvTactic::parse(name)
                        .filter(|t| t.supports(&geo))
                        .ok_or_else(|| {
                            format!("tactic '{name}' is unknown or does not fit this layer")
                        })?,
                };
                let layer = Conv2d::with_tactic(geo, &w, bias.as_deref(), a.activation, tactic)
                    .map_err(|e| e.to_string())?;
                if a.residual && node.inputs.len() != 4 {
                    return Err("fused residual without its operand".into());
                }
                Kind::Conv {
                    layer,
                    batch: xs[0],
                    residual: a.residual,
                }
            }
            Op::ConvTranspose(a) => {
                let w = self.const_f32(node.inputs[1])?;
                let bias = node.inputs.get(2).map(|&b| self.const_f32(b)).transpose()?;
                let geo = a.transpose_geometry(&xs, ys[1]);
                let layer = ConvTranspose2d::new(geo, &w, bias.as_deref(), a.activation)
                    .map_err(|e| e.to_string())?;
                Kind::ConvTranspose {
                    layer,
                    batch: xs[0],
                }
            }
            Op::BatchNorm { epsilon } => {
                let p: Vec<Vec<f32>> = node.inputs[1..5]
                    .iter()
                    .map(|&t| self.const_f32(t))
                    .collect::<std::result::Result<_, _>>()?;
                let (gamma, beta, mean, var) = (&p[0], &p[1], &p[2], &p[3]);
                let scale: Vec<f32> = gamma
                    .iter()
                    .zip(var)
                    .map(|(g, v)| g / (v + epsilon).sqrt())
                    .collect();
                let shift: Vec<f32> = beta
                    .iter()
                    .zip(mean)
                    .zip(&scale)
                    .map(|((b, m), s)| b - m * s)
                    .collect();
                Kind::Affine {
                    batch: xs[0],
                    channels: xs[1],
                    plane: xs[2..].iter().product(),
                    scale,
                    shift,
                }
            }
            Op::Unary(act) => Kind::Unary(*act),
            Op::Binary(op) => {
                let (plan, out) =
                    Broadcast::new(&xs, self.shape(node.inputs[1])).map_err(|e| e.to_string())?;
                if out != ys {
                    return Err(format!("broadcast shape {out:?} differs from {ys:?}"));
                }
                Kind::Binary(*op, plan, self.flow.get(y).copied().flatten())
            }
            Op::Concat { axis, act } => {
                let clamp = clamp_of(*act)?;
                let st = contiguous_strides(&ys);
                let mut offset = 0;
                let mut parts = Vec::new();
                for (i, &t) in node.inputs.iter().enumerate() {
                    let s = self.shape(t).to_vec();
                    let along = s[*axis];
                    parts.push(CopyPart {
                        input: i,
                        output: 0,
                        src: StridedView {
                            offset: 0,
                            strides: contiguous_strides(&s),
                        },
                        dst: StridedView {
                            offset: offset * st[*axis] as usize,
                            strides: st,
                        },
                        shape: s,
                        clamp,
                    });
                    offset += along;
                }
                Kind::Copy(parts)
            }
            Op::Split { axis } => {
                let st = contiguous_strides(&xs);
                let mut offset = 0;
                let mut parts = Vec::new();
                for (o, &t) in node.outputs.iter().enumerate() {
                    let s = self.shape(t).to_vec();
                    parts.push(CopyPart {
                        input: 0,
                        output: o,
                        src: StridedView {
                            offset: offset * st[*axis] as usize,
                            strides: st,
                        },
                        dst: StridedView {
                            offset: 0,
                            strides: contiguous_strides(&s),
                        },
                        shape: s.clone(),
                        clamp: None,
                    });
                    offset += s[*axis];
                }
                Kind::Copy(parts)
            }
            Op::Slice { starts, steps } => {
                let st = contiguous_strides(&xs);
                let mut strides = [0isize; eltwise::MAX_RANK];
                let mut offset = 0usize;
                for d in 0..xs.len() {
                    strides[d] = st[d] * steps[d];
                    offset += starts[d] * st[d] as usize;
                }
                Kind::Copy(vec![CopyPart {
                    input: 0,
                    output: 0,
                    src: StridedView { offset, strides },
                    dst: StridedView {
                        offset: 0,
                        strides: contiguous_strides(&ys),
                    },
                    shape: ys.clone(),
                    clamp: None,
                }])
            }
            Op::Transpose { perm } => {
                let st = contiguous_strides(&xs);
                let mut strides = [0isize; eltwise::MAX_RANK];
                for (d, &p) in perm.iter().enumerate() {
                    strides[d] = st[p];
                }
                Kind::Copy(vec![CopyPart {
                    input: 0,
                    output: 0,
                    src: StridedView { offset: 0, strides },
                    dst: StridedView {
                        offset: 0,
                        strides: contiguous_strides(&ys),
                    },
                    shape: ys.clone(),
                    clamp: None,
                }])
            }
            Op::Gather { axis, indices } => {
                let outer: usize = xs[..*axis].iter().product();
                let inner: usize = xs[axis + 1..].iter().product();
                let dim = xs[*axis];
                let nidx = indices.len();
                let parts = indices
                    .iter()
                    .enumerate()
                    .map(|(k, &i)| {
                        let mut s_src = [0isize; eltwise::MAX_RANK];
                        s_src[0] = (dim * inner) as isize;
                        s_src[1] = 1;
                        let mut s_dst = [0isize; eltwise::MAX_RANK];
                        s_dst[0] = (nidx * inner) as isize;
                        s_dst[1] = 1;
                        CopyPart {
                            input: 0,
                            output: 0,
                            shape: vec![outer, inner],
                            src: StridedView {
                                offset: i * inner,
                                strides: s_src,
                            },
                            dst: StridedView {
                                offset: k * inner,
                                strides: s_dst,
                            },
                            clamp: None,
                        }
                    })
                    .collect();
                Kind::Copy(parts)
            }
            Op::Pool(a) => Kind::Pool(
                Pool2dGeometry {
                    planes: xs[0] * xs[1],
                    h: xs[2],
                    w: xs[3],
                    oh: ys[2],
                    ow: ys[3],
                    kernel: a.kernel,
                    stride: a.strides,
                    dilation: a.dilations,
                    pads: a.pads,
                },
                a.kind,
            ),
            Op::GlobalAveragePool => Kind::GlobalAverage {
                planes: xs[0] * xs[1],
                len: xs[2..].iter().product(),
            },
            Op::ReduceMean { axes } => Kind::ReduceMean {
                reduce: (0..xs.len()).map(|d| axes.contains(&d)).collect(),
                shape: xs.clone(),
            },
            Op::Resize {
                mode,
                coord,
                scales,
                channels_last,
            } => {
                // (n, c, h, w, oh, ow) whichever the layout.
                let (c, h, w) = if *channels_last { (3, 1, 2) } else { (1, 2, 3) };
                let r = Resize2d::new(
                    xs[0] * xs[c],
                    (xs[h], xs[w]),
                    (ys[h], ys[w]),
                    (scales[0], scales[1]),
                    *mode,
                    *coord,
                );
                if *channels_last {
                    Kind::ResizeNhwc(r, xs[3])
                } else {
                    Kind::Resize(r)
                }
            }
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
                int8_input_scale,
            } => {
                let (m, n) = (ys[0], ys[1]);
                let k = if *trans_a { xs[0] } else { xs[1] };
                let w = self.const_f32(node.inputs[1])?;
                let chosen = self.tactics.get(ni).and_then(|t| t.as_deref());
                if let (Some(scale), true) = (*int8_input_scale, runs_int8(&node.op, chosen)) {
                    if *trans_a {
                        return Err("INT8 Gemm with transposed A".into());
                    }
                    let c = node.inputs.get(2).map(|&c| self.const_f32(c)).transpose()?;
                    let layer = crate::int8::gemm_int8_layer(
                        (n, k),
                        (*alpha, *beta),
                        *trans_b,
                        &w,
                        c.as_deref(),
                        scale,
                    )?;
                    return Ok(Kind::QGemm { layer, m });
                }
                let scaled: Vec<f32> = w.iter().map(|v| v * alpha).collect();
                let (bias, post_add) = match node.inputs.get(2) {
                    None => (None, None),
                    Some(&c) => {
                        let cv: Vec<f32> = self.const_f32(c)?.iter().map(|v| v * beta).collect();
                        let cs = self.shape(c).to_vec();
                        let per_col = cs.iter().rev().skip(1).all(|&d| d == 1);
                        if cv.len() == 1 {
                            (Some(vec![cv[0]; n]), None)
                        } else if per_col && cv.len() == n {
                            (Some(cv), None)
                        } else {
                            // Materialise beta*C broadcast to [m, n].
                            let (bc, _) =
                                Broadcast::new(&[m, n], &cs).map_err(|e| e.to_string())?;
                            let zeros = vec![0.0; m * n];
                            let mut full = vec![0.0; m * n];
                            eltwise::binary(
                                &ThreadPool::new(1),
                                BinaryOp::Add,
                                &bc,
                                &zeros,
                                &cv,
                                &mut full,
                            );
                            (None, Some(full))
                        }
                    }
                };
                if m == 1 && !*trans_a && post_add.is_none() {
                    // One row: a matrix-vector product over row-major weights.
                    let rows = if *trans_b {
                        scaled
                    } else {
                        (0..n * k).map(|i| scaled[(i % k) * n + i / k]).collect()
                    };
                    return Ok(Kind::Gemv { w: rows, k, bias });
                }
                // packed = B'ᵀ, [n, k].
                let packed = if *trans_b {
                    PackedA::pack(n, k, &scaled, k, 1)
                } else {
                    PackedA::pack(n, k, &scaled, 1, n)
                };
                let (b_rs, b_cs) = if *trans_a { (m, 1) } else { (1, k) };
                Kind::Gemm {
                    packed,
                    input: 0,
                    b_rs,
                    b_cs,
                    cols: m,
                    transpose_out: m > 1,
                    bias,
                    post_add,
                }
            }
            Op::MatMul => {
                let ws = self.shape(node.inputs[1]).to_vec();
                let w_const = self.g.tensors[node.inputs[1]].is_const();
                let x_const = self.g.tensors[x].is_const();
                let k = *xs.last().ok_or("scalar operand")?;
                if w_const && ws.len() <= 2 {
                    let n = if ws.len() == 1 { 1 } else { ws[1] };
                    let m = xs.iter().product::<usize>() / k.max(1);
                    let w = self.const_f32(node.inputs[1])?;
                    let packed = PackedA::pack(n, k, &w, 1, n);
                    Kind::Gemm {
                        packed,
                        input: 0,
                        b_rs: 1,
                        b_cs: k,
                        cols: m,
                        transpose_out: m > 1,
                        bias: None,
                        post_add: None,
                    }
                } else if x_const && xs.len() == 2 && ws.len() == 2 {
                    let a = self.const_f32(x)?;
                    let (m, n) = (xs[0], ws[1]);
                    let packed = PackedA::pack(m, k, &a, k, 1);
                    Kind::Gemm {
                        packed,
                        input: 1,
                        b_rs: n,
                        b_cs: 1,
                        cols: n,
                        transpose_out: false,
                        bias: None,
                        post_add: None,
                    }
                } else if xs.len() == 2 && ws.len() == 2 {
                    Kind::MatMulRuntime {
                        m: xs[0],
                        k,
                        n: ws[1],
                    }
                } else {
                    return Err(format!("MatMul of {xs:?} by {ws:?} is not supported"));
                }
            }
            Op::Softmax { axis, legacy } => {
                let outer: usize = xs[..*axis].iter().product();
                if *legacy {
                    Kind::Softmax {
                        outer,
                        axis: xs[*axis..].iter().product(),
                        inner: 1,
                    }
                } else {
                    Kind::Softmax {
                        outer,
                        axis: xs[*axis],
                        inner: xs[axis + 1..].iter().product(),
                    }
                }
            }
            Op::Pad { mode, begin, end } => Kind::Pad {
                shape: xs.clone(),
                begin: begin.clone(),
                end: end.clone(),
                mode: *mode,
            },
            Op::Reshape | Op::SliceView { .. } => return Err("views have no step".into()),
        })
    }
}

/// The bounds of an activation a copy applies while it writes (Relu,
/// Clip; `None` for none); any other is a model error (the fusion pass
/// fuses only those).
fn clamp_of(act: Activation) -> std::result::Result<Option<(f32, f32)>, String> {
    match act {
        Activation::None => Ok(None),
        Activation::Relu => Ok(Some((0.0, f32::INFINITY))),
        Activation::Clip { lo, hi } => Ok(Some((lo, hi))),
        other => Err(format!("a copy cannot apply {other:?}")),
    }
}
