//! Prepared engines and execution contexts.
//!
//! [`Engine::new`] turns a validated [`Graph`] into a list of steps with
//! packed weights, precomputed broadcast/resize tables and arena offsets.
//! An [`ExecutionContext`] owns one arena, one scratch buffer and one thread
//! pool, all allocated when it is created; [`ExecutionContext::run`] then
//! allocates nothing.

use std::collections::BTreeMap;
use std::sync::Arc;

use osprey_kernels::activation::Activation;
use osprey_kernels::conv::{Conv2d, ConvTactic, ConvTranspose2d, ConvTranspose2dGeometry};
use osprey_kernels::eltwise::{self, BinaryOp, Broadcast};
use osprey_kernels::gemm::{self, Epilogue, MatRef, PackedA};
use osprey_kernels::layout::{self, contiguous_strides, PadMode, StridedView};
use osprey_kernels::pooling::{self, Pool2dGeometry, PoolKind};
use osprey_kernels::resize::Resize2d;
use osprey_kernels::softmax;
use osprey_kernels::ThreadPool;

use crate::error::{EngineError, Result};
use crate::ir::{ConstData, Graph, Op, TensorId};
use crate::plan::{plan_arena, MemoryPlan, ALIGN_FLOATS};

/// Where an operand's data lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operand {
    /// `len` floats at `off` in the arena.
    Arena { off: usize, len: usize },
    /// A constant owned by the engine.
    Const { idx: usize },
}

/// One strided copy of a data-movement step.
#[derive(Clone, Debug)]
struct CopyPart {
    input: usize,
    output: usize,
    shape: Vec<usize>,
    src: StridedView,
    dst: StridedView,
}

#[derive(Clone, Debug)]
enum Kind {
    Conv {
        layer: Conv2d,
        batch: usize,
        residual: bool,
    },
    ConvTranspose {
        layer: ConvTranspose2d,
        batch: usize,
    },
    Affine {
        batch: usize,
        channels: usize,
        plane: usize,
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
    Unary(Activation),
    Binary(BinaryOp, Broadcast),
    Copy(Vec<CopyPart>),
    Pool(Pool2dGeometry, PoolKind),
    GlobalAverage {
        planes: usize,
        len: usize,
    },
    ReduceMean {
        shape: Vec<usize>,
        reduce: Vec<bool>,
    },
    Resize(Resize2d),
    /// `out = packed · view(runtime input)`, optionally computed transposed in
    /// scratch first, plus an optional full-size addend.
    Gemm {
        packed: PackedA,
        input: usize,
        b_rs: usize,
        b_cs: usize,
        cols: usize,
        transpose_out: bool,
        bias: Option<Vec<f32>>,
        post_add: Option<Vec<f32>>,
    },
    MatMulRuntime {
        m: usize,
        k: usize,
        n: usize,
    },
    Softmax {
        outer: usize,
        axis: usize,
        inner: usize,
    },
    Pad {
        shape: Vec<usize>,
        begin: Vec<usize>,
        end: Vec<usize>,
        mode: PadMode,
    },
}

#[derive(Clone, Debug)]
struct Step {
    name: String,
    kind: Kind,
    ins: Vec<Operand>,
    outs: Vec<(usize, usize)>,
}

/// Name and shape of a graph input or output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDesc {
    /// Name in the model.
    pub name: String,
    /// Static shape.
    pub shape: Vec<usize>,
}

impl TensorDesc {
    /// Element count.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A model prepared for execution: immutable, shareable between contexts.
#[derive(Debug)]
pub struct Engine {
    inputs: Vec<(TensorDesc, usize)>,
    outputs: Vec<(TensorDesc, Operand)>,
    steps: Vec<Step>,
    consts: Vec<Vec<f32>>,
    plan: MemoryPlan,
    node_count: usize,
    op_histogram: BTreeMap<String, usize>,
    constant_bytes: usize,
}

impl Engine {
    /// Prepares a graph with default tactics: validates it, plans memory,
    /// packs weights.
    pub fn new(graph: Graph) -> Result<Engine> {
        Engine::with_tactics(graph, &[])
    }

    /// As [`Engine::new`], with a tactic per node (see [`crate::tune`]);
    /// nodes without one, or beyond the table, use the default.
    pub fn with_tactics(graph: Graph, tactics: &[Option<String>]) -> Result<Engine> {
        graph.validate()?;
        let plan = plan_arena(&graph);
        let mut b = Builder {
            tactics,
            g: &graph,
            plan: &plan,
            consts: Vec::new(),
            const_of: BTreeMap::new(),
        };
        let mut steps = Vec::with_capacity(graph.nodes.len());
        for (ni, node) in graph.nodes.iter().enumerate() {
            if node.op.is_view() {
                continue;
            }
            let kind = b.kind(ni, node).map_err(|msg| EngineError::Node {
                node: node.name.clone(),
                op: node.onnx_op.clone(),
                msg,
            })?;
            let ins = node.inputs.iter().map(|&t| b.operand(t)).collect();
            let outs = node
                .outputs
                .iter()
                .map(|&t| {
                    plan.range(t)
                        .ok_or_else(|| EngineError::model("output without storage"))
                })
                .collect::<Result<Vec<_>>>()?;
            steps.push(Step {
                name: node.name.clone(),
                kind,
                ins,
                outs,
            });
        }
        let inputs = graph
            .inputs
            .iter()
            .map(|&t| {
                let (off, _) = plan
                    .range(t)
                    .ok_or_else(|| EngineError::model("input without storage"))?;
                Ok((desc(&graph, t), off))
            })
            .collect::<Result<Vec<_>>>()?;
        let outputs = graph
            .outputs
            .iter()
            .map(|&t| (desc(&graph, t), b.operand(t)))
            .collect();
        Ok(Engine {
            inputs,
            outputs,
            steps,
            consts: b.consts,
            plan,
            node_count: graph.nodes.len(),
            op_histogram: graph.op_histogram(),
            constant_bytes: graph.constant_bytes(),
        })
    }

    /// Graph inputs.
    pub fn inputs(&self) -> impl Iterator<Item = &TensorDesc> {
        self.inputs.iter().map(|(d, _)| d)
    }
    /// Graph outputs.
    pub fn outputs(&self) -> impl Iterator<Item = &TensorDesc> {
        self.outputs.iter().map(|(d, _)| d)
    }
    /// The arena layout.
    pub fn memory_plan(&self) -> &MemoryPlan {
        &self.plan
    }
    /// Nodes in the graph (views included).
    pub fn node_count(&self) -> usize {
        self.node_count
    }
    /// Kernel launches per inference (views excluded).
    pub fn step_count(&self) -> usize {
        self.steps.len()
    }
    /// Count of nodes per ONNX op type.
    pub fn op_histogram(&self) -> &BTreeMap<String, usize> {
        &self.op_histogram
    }
    /// Name and a short description (kernel, algorithm, shapes) of step `i`.
    pub fn step_info(&self, i: usize) -> Option<(String, String)> {
        let s = self.steps.get(i)?;
        let what = match &s.kind {
            Kind::Conv {
                layer, residual, ..
            } => {
                let g = layer.geometry();
                format!(
                    "Conv {} {}x{} s{} g{} {}->{} @{}x{}{}",
                    layer.tactic().name(),
                    g.kh,
                    g.kw,
                    g.stride[0],
                    g.groups,
                    g.c_in,
                    g.c_out,
                    g.h,
                    g.w,
                    if *residual { " +residual" } else { "" }
                )
            }
            Kind::ConvTranspose { .. } => "ConvTranspose gemm+col2im".into(),
            Kind::Affine { .. } => "BatchNorm affine".into(),
            Kind::Unary(a) => format!("Unary {a:?}"),
            Kind::Binary(op, _) => format!("Binary {op:?}"),
            Kind::Copy(_) => "Copy".into(),
            Kind::Pool(..) => "Pool".into(),
            Kind::GlobalAverage { .. } => "GlobalAveragePool".into(),
            Kind::ReduceMean { .. } => "ReduceMean".into(),
            Kind::Resize(_) => "Resize".into(),
            Kind::Gemm { .. } => "Gemm".into(),
            Kind::MatMulRuntime { .. } => "MatMul".into(),
            Kind::Softmax { .. } => "Softmax".into(),
            Kind::Pad { .. } => "Pad".into(),
        };
        Some((s.name.clone(), what))
    }

    /// Bytes of constants in the source graph.
    pub fn constant_bytes(&self) -> usize {
        self.constant_bytes
    }

    /// Scratch floats a context with `threads` threads needs.
    fn scratch_floats(&self, threads: usize) -> usize {
        self.steps
            .iter()
            .map(|s| match &s.kind {
                Kind::Conv { layer, .. } => layer.scratch_len(threads),
                Kind::ConvTranspose { layer, .. } => layer.scratch_len(threads),
                Kind::Gemm {
                    packed,
                    cols,
                    transpose_out,
                    ..
                } => {
                    gemm::scratch_len(threads) + if *transpose_out { packed.m() * cols } else { 0 }
                }
                _ => 0,
            })
            .max()
            .unwrap_or(0)
    }
}

fn desc(g: &Graph, t: TensorId) -> TensorDesc {
    TensorDesc {
        name: g.tensors[t].name.clone(),
        shape: g.tensors[t].shape.clone(),
    }
}

struct Builder<'a> {
    tactics: &'a [Option<String>],
    g: &'a Graph,
    plan: &'a MemoryPlan,
    consts: Vec<Vec<f32>>,
    const_of: BTreeMap<TensorId, usize>,
}

impl Builder<'_> {
    fn operand(&mut self, t: TensorId) -> Operand {
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

    fn kind(&mut self, ni: usize, node: &crate::ir::Node) -> std::result::Result<Kind, String> {
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
                let tactic = match self.tactics.get(ni).and_then(|t| t.as_deref()) {
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
                let geo = ConvTranspose2dGeometry {
                    c_in: xs[1],
                    h: xs[2],
                    w: xs[3],
                    c_out: ys[1],
                    kh: a.kernel[0],
                    kw: a.kernel[1],
                    stride: a.strides,
                    dilation: a.dilations,
                    pads: a.pads,
                    output_padding: a.output_padding,
                    groups: a.groups,
                };
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
                Kind::Binary(*op, plan)
            }
            Op::Concat { axis } => {
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
            } => Kind::Resize(Resize2d::new(
                xs[0] * xs[1],
                (xs[2], xs[3]),
                (ys[2], ys[3]),
                (scales[0], scales[1]),
                *mode,
                *coord,
            )),
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => {
                let (m, n) = (ys[0], ys[1]);
                let k = if *trans_a { xs[0] } else { xs[1] };
                let w = self.const_f32(node.inputs[1])?;
                let scaled: Vec<f32> = w.iter().map(|v| v * alpha).collect();
                // packed = B'ᵀ, [n, k].
                let packed = if *trans_b {
                    PackedA::pack(n, k, &scaled, k, 1)
                } else {
                    PackedA::pack(n, k, &scaled, 1, n)
                };
                let (b_rs, b_cs) = if *trans_a { (m, 1) } else { (1, k) };
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

/// Read access to everything but one output range of the arena.
struct Reader<'a> {
    left: &'a [f32],
    right: &'a [f32],
    start: usize,
    out_len: usize,
    consts: &'a [Vec<f32>],
}

/// Splits the arena around one output range: the output is writable, every
/// other byte readable.
fn split_io<'a>(
    arena: &'a mut [f32],
    (off, len): (usize, usize),
    consts: &'a [Vec<f32>],
) -> Result<(Reader<'a>, &'a mut [f32])> {
    if off + len > arena.len() {
        return Err(EngineError::model("internal: output outside the arena"));
    }
    let (left, rest) = arena.split_at_mut(off);
    let (out, right) = rest.split_at_mut(len);
    Ok((
        Reader {
            left,
            right,
            start: off,
            out_len: len,
            consts,
        },
        out,
    ))
}

impl<'a> Reader<'a> {
    fn read(&self, op: Operand) -> Result<&'a [f32]> {
        match op {
            Operand::Const { idx } => self
                .consts
                .get(idx)
                .map(|v| v.as_slice())
                .ok_or_else(|| EngineError::model("internal: constant index")),
            Operand::Arena { off, len } => {
                let end_out = self.start + self.out_len;
                if off + len <= self.start {
                    Ok(&self.left[off..off + len])
                } else if off >= end_out && off - end_out + len <= self.right.len() {
                    Ok(&self.right[off - end_out..off - end_out + len])
                } else {
                    Err(EngineError::model(
                        "internal: an input overlaps the output it feeds",
                    ))
                }
            }
        }
    }
}

/// Everything one inference needs, allocated once.
pub struct ExecutionContext {
    engine: Arc<Engine>,
    arena: Vec<f32>,
    base: usize,
    scratch: Vec<f32>,
    pool: ThreadPool,
    inputs_set: Vec<bool>,
}

impl std::fmt::Debug for ExecutionContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutionContext")
            .field("arena_floats", &self.engine.plan.arena_floats)
            .field("scratch_floats", &self.scratch.len())
            .field("threads", &self.pool.threads())
            .finish()
    }
}

impl ExecutionContext {
    /// Allocates the arena, scratch and a pool of `threads` threads.
    pub fn new(engine: Arc<Engine>, threads: usize) -> ExecutionContext {
        let pool = ThreadPool::new(threads);
        let arena_floats = engine.plan.arena_floats;
        let arena = vec![0.0f32; arena_floats + ALIGN_FLOATS];
        // Start the arena on a 64-byte boundary.
        let misalign = (arena.as_ptr() as usize / 4) % ALIGN_FLOATS;
        let base = (ALIGN_FLOATS - misalign) % ALIGN_FLOATS;
        let scratch = vec![0.0f32; engine.scratch_floats(pool.threads())];
        let inputs_set = vec![false; engine.inputs.len()];
        ExecutionContext {
            engine,
            arena,
            base,
            scratch,
            pool,
            inputs_set,
        }
    }

    /// The engine this context runs.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Bytes this context holds (arena + scratch).
    pub fn allocated_bytes(&self) -> usize {
        (self.arena.len() + self.scratch.len()) * 4
    }

    /// Copies an input in. The data must have exactly the input's element
    /// count and be finite (NaN/Inf are rejected: they would poison every
    /// output silently).
    pub fn set_input(&mut self, name: &str, data: &[f32]) -> Result<()> {
        let i = self
            .engine
            .inputs
            .iter()
            .position(|(d, _)| d.name == name)
            .ok_or_else(|| EngineError::Input {
                name: name.to_string(),
                msg: format!(
                    "no such input (the model has: {})",
                    self.engine
                        .inputs
                        .iter()
                        .map(|(d, _)| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        self.set_input_index(i, data)
    }

    /// As [`ExecutionContext::set_input`], by position.
    pub fn set_input_index(&mut self, i: usize, data: &[f32]) -> Result<()> {
        let (desc, off) = self
            .engine
            .inputs
            .get(i)
            .ok_or_else(|| EngineError::Input {
                name: format!("#{i}"),
                msg: "no such input".into(),
            })?;
        if data.len() != desc.numel() {
            return Err(EngineError::Input {
                name: desc.name.clone(),
                msg: format!(
                    "got {} values, shape {:?} needs {}",
                    data.len(),
                    desc.shape,
                    desc.numel()
                ),
            });
        }
        if let Some(bad) = data.iter().position(|v| !v.is_finite()) {
            return Err(EngineError::Input {
                name: desc.name.clone(),
                msg: format!("value {} at index {bad} is not finite", data[bad]),
            });
        }
        let start = self.base + off;
        self.arena[start..start + data.len()].copy_from_slice(data);
        self.inputs_set[i] = true;
        Ok(())
    }

    /// Runs every step. All inputs must have been set at least once.
    pub fn run(&mut self) -> Result<()> {
        self.run_inner(None)
    }

    /// Runs every step and adds each step's wall time (seconds) to
    /// `seconds[i]`; `seconds` must have [`Engine::step_count`] entries.
    pub fn run_profiled(&mut self, seconds: &mut [f64]) -> Result<()> {
        if seconds.len() != self.engine.steps.len() {
            return Err(EngineError::model(
                "profile buffer length differs from the step count",
            ));
        }
        self.run_inner(Some(seconds))
    }

    fn run_inner(&mut self, mut profile: Option<&mut [f64]>) -> Result<()> {
        if let Some(i) = self.inputs_set.iter().position(|s| !s) {
            return Err(EngineError::Input {
                name: self.engine.inputs[i].0.name.clone(),
                msg: "was never set".into(),
            });
        }
        let engine = &*self.engine;
        let arena = &mut self.arena[self.base..self.base + engine.plan.arena_floats];
        for (i, step) in engine.steps.iter().enumerate() {
            let t0 = profile.as_ref().map(|_| std::time::Instant::now());
            run_step(step, arena, &engine.consts, &mut self.scratch, &self.pool).map_err(|e| {
                match e {
                    EngineError::Model(m) => {
                        EngineError::Model(format!("step '{}': {m}", step.name))
                    }
                    other => other,
                }
            })?;
            if let (Some(p), Some(t0)) = (profile.as_deref_mut(), t0) {
                p[i] += t0.elapsed().as_secs_f64();
            }
        }
        Ok(())
    }

    /// An output's data after [`ExecutionContext::run`], by position.
    pub fn output_index(&self, i: usize) -> Option<&[f32]> {
        let (_, op) = self.engine.outputs.get(i)?;
        match *op {
            Operand::Arena { off, len } => {
                Some(&self.arena[self.base + off..self.base + off + len])
            }
            Operand::Const { idx } => self.engine.consts.get(idx).map(|v| v.as_slice()),
        }
    }

    /// An output's data after [`ExecutionContext::run`], by name.
    pub fn output(&self, name: &str) -> Option<&[f32]> {
        let i = self
            .engine
            .outputs
            .iter()
            .position(|(d, _)| d.name == name)?;
        self.output_index(i)
    }
}

fn run_step(
    step: &Step,
    arena: &mut [f32],
    consts: &[Vec<f32>],
    scratch: &mut [f32],
    pool: &ThreadPool,
) -> Result<()> {
    let first_out = *step
        .outs
        .first()
        .ok_or_else(|| EngineError::model("step without output"))?;
    let input = |k: usize| {
        step.ins
            .get(k)
            .copied()
            .ok_or_else(|| EngineError::model("missing operand"))
    };
    if let Kind::Copy(parts) = &step.kind {
        for p in parts {
            let out = *step
                .outs
                .get(p.output)
                .ok_or_else(|| EngineError::model("copy output"))?;
            let (io, dst) = split_io(arena, out, consts)?;
            let src = io.read(input(p.input)?)?;
            layout::copy_strided(&p.shape, src, &p.src, dst, &p.dst);
        }
        return Ok(());
    }
    let (io, y) = split_io(arena, first_out, consts)?;
    let x = io.read(input(0)?)?;
    match &step.kind {
        Kind::Conv {
            layer,
            batch,
            residual,
        } => {
            let res = if *residual {
                Some(io.read(input(3)?)?)
            } else {
                None
            };
            layer.run_with_residual(pool, *batch, x, res, y, scratch)
        }
        Kind::ConvTranspose { layer, batch } => layer.run(pool, *batch, x, y, scratch),
        Kind::Affine {
            batch,
            channels,
            plane,
            scale,
            shift,
        } => eltwise::channel_affine(pool, *batch, *channels, *plane, scale, shift, x, y),
        Kind::Unary(act) => act.apply_parallel(pool, x, y),
        Kind::Binary(op, plan) => {
            let b = io.read(input(1)?)?;
            eltwise::binary(pool, *op, plan, x, b, y);
        }
        Kind::Pool(g, kind) => pooling::pool2d(pool, g, *kind, x, y),
        Kind::GlobalAverage { planes, len } => pooling::global_average(pool, *planes, *len, x, y),
        Kind::ReduceMean { shape, reduce } => pooling::reduce_mean(shape, reduce, x, y),
        Kind::Resize(r) => r.run(pool, x, y),
        Kind::Gemm {
            packed,
            input: which,
            b_rs,
            b_cs,
            cols,
            transpose_out,
            bias,
            post_add,
        } => {
            let b = io.read(input(*which)?)?;
            let view = MatRef {
                data: b,
                rs: *b_rs,
                cs: *b_cs,
            };
            let epi = Epilogue {
                bias: bias.as_deref(),
                act: Activation::None,
                accumulate: false,
                residual: None,
            };
            let rows = packed.m();
            if *transpose_out {
                let (tmp, gs) = scratch.split_at_mut(rows * cols);
                gemm::sgemm(pool, packed, view, *cols, tmp, *cols, epi, gs);
                // y[c, r] = tmp[r, c]
                for r in 0..rows {
                    for c in 0..*cols {
                        y[c * rows + r] = tmp[r * cols + c];
                    }
                }
            } else {
                gemm::sgemm(pool, packed, view, *cols, y, *cols, epi, scratch);
            }
            if let Some(add) = post_add {
                y.iter_mut().zip(add).for_each(|(v, a)| *v += a);
            }
        }
        Kind::MatMulRuntime { m, k, n } => {
            let b = io.read(input(1)?)?;
            for i in 0..*m {
                let row = &mut y[i * n..(i + 1) * n];
                row.iter_mut().for_each(|v| *v = 0.0);
                for kk in 0..*k {
                    let a = x[i * k + kk];
                    row.iter_mut()
                        .zip(&b[kk * n..(kk + 1) * n])
                        .for_each(|(v, bv)| *v += a * bv);
                }
            }
        }
        Kind::Softmax { outer, axis, inner } => softmax::softmax(pool, *outer, *axis, *inner, x, y),
        Kind::Pad {
            shape,
            begin,
            end,
            mode,
        } => layout::pad(shape, begin, end, *mode, x, y),
        Kind::Copy(_) => {}
    }
    Ok(())
}
