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
use osprey_kernels::conv::{Conv2d, ConvTranspose2d};
use osprey_kernels::conv_nhwc::Conv2dNhwc;
use osprey_kernels::eltwise::{BinaryOp, Broadcast};
use osprey_kernels::gemm::{self, PackedA};
use osprey_kernels::int8::QLinear;
use osprey_kernels::layout::{PadMode, StridedView};
use osprey_kernels::pooling::{Pool2dGeometry, PoolKind};
use osprey_kernels::qconv::{QConv2d, QIn, QOut};
use osprey_kernels::qconv_nhwc::QConv2dNhwc;
use osprey_kernels::resize::Resize2d;
use osprey_kernels::ThreadPool;

use crate::error::{EngineError, Result};
use crate::ir::{Graph, TensorId};
use crate::plan::{MemoryPlan, ALIGN_FLOATS};

mod prepare;
mod step;

use prepare::Builder;
use step::{run_fused, run_step};

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
    /// Bounds every copied value is clamped to (a fused Relu or Clip).
    clamp: Option<(f32, f32)>,
}

/// An INT8 convolution: NCHW (`osprey_kernels::qconv`) or channels-last
/// (`osprey_kernels::qconv_nhwc`).
#[derive(Clone, Debug)]
pub(crate) enum QLayer {
    Nchw(QConv2d),
    Nhwc(QConv2dNhwc),
}

impl QLayer {
    pub(crate) fn geometry(&self) -> &osprey_kernels::conv::Conv2dGeometry {
        match self {
            QLayer::Nchw(l) => l.geometry(),
            QLayer::Nhwc(l) => l.geometry(),
        }
    }

    pub(crate) fn algorithm(&self) -> &'static str {
        match self {
            QLayer::Nchw(l) => l.algorithm(),
            QLayer::Nhwc(l) => l.algorithm(),
        }
    }

    pub(crate) fn input_scale(&self) -> f32 {
        match self {
            QLayer::Nchw(l) => l.input_scale(),
            QLayer::Nhwc(l) => l.input_scale(),
        }
    }

    pub(crate) fn scratch_len(&self, threads: usize) -> usize {
        match self {
            QLayer::Nchw(l) => l.scratch_len(threads),
            QLayer::Nhwc(l) => l.scratch_len(threads),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run_io(
        &self,
        pool: &osprey_kernels::pool::ThreadPool,
        batch: usize,
        input: QIn,
        residual: Option<&[f32]>,
        output: QOut,
        scratch: &mut [f32],
    ) {
        match self {
            QLayer::Nchw(l) => l.run_io(pool, batch, input, residual, output, scratch),
            QLayer::Nhwc(l) => l.run_io(pool, batch, input, residual, output, scratch),
        }
    }
}

#[derive(Clone, Debug)]
enum Kind {
    Conv {
        layer: Conv2d,
        batch: usize,
        residual: bool,
    },
    /// Channels-last convolution (tensors NHWC; see the layout pass).
    ConvNhwc {
        layer: Conv2dNhwc,
        batch: usize,
        residual: bool,
        /// The input is INT8 (a depthwise layer reading its INT8
        /// producer's output; its weights carry the input's scale).
        in_i8: bool,
        /// The output's INT8 scale when it flows INT8 (a depthwise layer
        /// read only by INT8 layers requantizes as it writes).
        out_scale: Option<f32>,
    },
    /// INT8 convolution (see `osprey_kernels::qconv`): input f32 or INT8
    /// (`in_i8`), output f32 or INT8 with `out_scale`.
    QConv {
        layer: QLayer,
        batch: usize,
        residual: bool,
        in_i8: bool,
        out_scale: Option<f32>,
    },
    /// INT8 fully connected layer (a `Gemm` with constant weights): `m`
    /// rows of f32 in, f32 out.
    QGemm {
        layer: QLinear,
        m: usize,
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
    /// Element-wise binary op; the output INT8 with this scale where it
    /// flows INT8 (an SE gate's Mul read only by INT8 readers).
    Binary(BinaryOp, Broadcast, Option<f32>),
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
    /// Channels-last resize: the tables, and the channel count.
    ResizeNhwc(Resize2d, usize),
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
    /// A one-row `Gemm`: `y = w·x + bias` with `w` row-major `[n, k]`.
    Gemv {
        w: Vec<f32>,
        k: usize,
        bias: Option<Vec<f32>>,
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
    /// Tensor names of `outs` (calibration observes them by name).
    out_names: Vec<String>,
    /// An INT8 first output: its element count and scale (observers see
    /// it dequantized).
    out_i8: Option<(usize, f32)>,
    /// This step (a channels-last expansion) and the next (its depthwise
    /// reader) run as one ([`crate::fuse`]), except in observed runs.
    fuse_next: bool,
}

/// Sees each tensor (name, values) as a run computes it.
pub type Observer<'a> = dyn FnMut(&str, &[f32]) + 'a;

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
        let (flow, plan) = crate::int8::int8_plan(&graph, tactics);
        let mut b = Builder {
            tactics,
            g: &graph,
            plan: &plan,
            flow: &flow,
            consts: Vec::new(),
            const_of: BTreeMap::new(),
        };
        let mut steps = Vec::with_capacity(graph.nodes.len());
        let mut step_of = vec![usize::MAX; graph.nodes.len()];
        for (ni, node) in graph.nodes.iter().enumerate() {
            if node.op.is_view() {
                continue;
            }
            step_of[ni] = steps.len();
            let kind = b.kind(ni, node).map_err(|msg| EngineError::Node {
                node: node.name.clone(),
                op: node.onnx_op.clone(),
                msg,
            })?;
            let out_i8 = match (&kind, node.outputs.first()) {
                (
                    Kind::QConv {
                        out_scale: Some(s), ..
                    }
                    | Kind::ConvNhwc {
                        out_scale: Some(s), ..
                    }
                    | Kind::Binary(_, _, Some(s)),
                    Some(&y),
                ) => Some((graph.tensors[y].numel(), *s)),
                _ => None,
            };
            let ins = node.inputs.iter().map(|&t| b.operand(t)).collect();
            let outs = node
                .outputs
                .iter()
                .map(|&t| {
                    plan.range(t)
                        .ok_or_else(|| EngineError::model("output without storage"))
                })
                .collect::<Result<Vec<_>>>()?;
            let out_names = node
                .outputs
                .iter()
                .map(|&t| graph.tensors[t].name.clone())
                .collect();
            steps.push(Step {
                name: node.name.clone(),
                kind,
                ins,
                outs,
                out_names,
                out_i8,
                fuse_next: false,
            });
        }
        // Every expansion whose tactic asks for the fused form runs with
        // its reader as the next step, or the engine is refused.
        let pairs = crate::fuse::fused_pairs(&graph, tactics);
        for (i, tactic) in tactics.iter().enumerate().take(graph.nodes.len()) {
            if !crate::fuse::is_fused(tactic.as_deref()) {
                continue;
            }
            let si = step_of[i];
            let reader = pairs.iter().find(|p| p.0 == i).map(|p| step_of[p.1]);
            // The reader: the next step, an FP32 channels-last layer
            // reading f32; the expansion: FP32 or INT8, writing f32.
            let dw = match steps.get(si + 1).map(|s| &s.kind) {
                Some(Kind::ConvNhwc {
                    layer: d,
                    batch,
                    in_i8: false,
                    ..
                }) if reader == Some(si + 1) => Some((d, *batch)),
                _ => None,
            };
            let fits = dw.is_some_and(|(d, b2)| match &steps[si].kind {
                Kind::ConvNhwc {
                    layer: e,
                    residual: false,
                    in_i8: false,
                    out_scale: None,
                    batch,
                } => e.fuses_into(d) && *batch == b2,
                Kind::QConv {
                    layer: QLayer::Nhwc(e),
                    residual: false,
                    out_scale: None,
                    batch,
                    ..
                } => e.fuses_into(d) && *batch == b2,
                _ => false,
            });
            if !fits {
                let node = &graph.nodes[i];
                return Err(EngineError::Node {
                    node: node.name.clone(),
                    op: node.onnx_op.clone(),
                    msg: "a fused tactic ('+dw') on a layer that cannot run with its reader".into(),
                });
            }
            steps[si].fuse_next = true;
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
            } => conv_info(&layer.tactic().name(), layer.geometry(), *residual),
            Kind::ConvNhwc {
                layer,
                residual,
                in_i8,
                out_scale,
                ..
            } => {
                let info = conv_info(layer.algorithm(), layer.geometry(), *residual);
                let info = format!(
                    "{info}{}{}",
                    if *in_i8 { " in:i8" } else { "" },
                    if out_scale.is_some() { " out:i8" } else { "" }
                );
                // A fused pair: the expansion's step runs both layers,
                // the depthwise step's time is in it.
                if s.fuse_next {
                    format!("{info} +dw fused with the next step")
                } else if i > 0 && self.steps[i - 1].fuse_next {
                    format!("{info} (run fused by the previous step)")
                } else {
                    info
                }
            }
            Kind::QConv {
                layer,
                residual,
                in_i8,
                out_scale,
                ..
            } => {
                let g = layer.geometry();
                let info = format!(
                    "Conv {} {}x{} s{} {}->{} @{}x{} x-scale {:.3e}{}{}{}",
                    layer.algorithm(),
                    g.kh,
                    g.kw,
                    g.stride[0],
                    g.c_in,
                    g.c_out,
                    g.h,
                    g.w,
                    layer.input_scale(),
                    if *residual { " +residual" } else { "" },
                    if *in_i8 { " in:i8" } else { "" },
                    if out_scale.is_some() { " out:i8" } else { "" }
                );
                if s.fuse_next {
                    format!("{info} +dw fused with the next step")
                } else {
                    info
                }
            }
            Kind::ConvTranspose { .. } => "ConvTranspose gemm+col2im".into(),
            Kind::Affine { .. } => "BatchNorm affine".into(),
            Kind::Unary(a) => format!("Unary {a:?}"),
            Kind::Binary(op, _, s) => {
                format!("Binary {op:?}{}", if s.is_some() { " out:i8" } else { "" })
            }
            Kind::Copy(parts) => match parts.first().and_then(|p| p.clamp) {
                Some((lo, hi)) => format!("Copy clamp [{lo}, {hi}]"),
                None => "Copy".into(),
            },
            Kind::Pool(..) => "Pool".into(),
            Kind::GlobalAverage { .. } => "GlobalAveragePool".into(),
            Kind::ReduceMean { .. } => "ReduceMean".into(),
            Kind::Resize(_) => "Resize".into(),
            Kind::ResizeNhwc(..) => "Resize nhwc".into(),
            Kind::Gemm { .. } => "Gemm".into(),
            Kind::Gemv { w, k, .. } => format!("Gemm gemv {k}->{}", w.len() / (*k).max(1)),
            Kind::QGemm { layer, m } => format!(
                "Gemm int8 {}x{}->{} x-scale {:.3e}",
                m,
                layer.k(),
                layer.n(),
                layer.input_scale()
            ),
            Kind::MatMulRuntime { .. } => "MatMul".into(),
            Kind::Softmax { .. } => "Softmax".into(),
            Kind::Pad { .. } => "Pad".into(),
        };
        Some((s.name.clone(), what))
    }

    /// Convolution steps that run INT8, and convolution steps in all.
    pub fn int8_convolutions(&self) -> (usize, usize) {
        let int8 = self
            .steps
            .iter()
            .filter(|s| matches!(s.kind, Kind::QConv { .. }))
            .count();
        let fp = self
            .steps
            .iter()
            .filter(|s| matches!(s.kind, Kind::Conv { .. } | Kind::ConvNhwc { .. }))
            .count();
        (int8, int8 + fp)
    }

    /// Tensors that pass between INT8 layers as INT8 (see
    /// [`crate::int8::int8_flow`]).
    pub fn int8_tensors(&self) -> usize {
        self.steps.iter().filter(|s| s.out_i8.is_some()).count()
    }

    /// Bytes of constants in the source graph.
    pub fn constant_bytes(&self) -> usize {
        self.constant_bytes
    }

    /// Scratch floats a context with `threads` threads needs.
    fn scratch_floats(&self, threads: usize) -> usize {
        let fused = self
            .steps
            .windows(2)
            .map(|w| match (&w[0].kind, &w[1].kind) {
                (Kind::ConvNhwc { layer: e, .. }, Kind::ConvNhwc { layer: d, .. })
                    if w[0].fuse_next =>
                {
                    e.fused_scratch_len(d, threads)
                }
                (
                    Kind::QConv {
                        layer: QLayer::Nhwc(e),
                        ..
                    },
                    Kind::ConvNhwc { layer: d, .. },
                ) if w[0].fuse_next => e.fused_scratch_len(d, threads),
                _ => 0,
            });
        self.steps
            .iter()
            .map(|s| match &s.kind {
                Kind::Conv { layer, .. } => layer.scratch_len(threads),
                Kind::QConv { layer, .. } => layer.scratch_len(threads),
                Kind::ConvNhwc {
                    layer,
                    out_scale: Some(_),
                    ..
                } => layer.scratch_len_i8(threads),
                Kind::QGemm { layer, m } => layer.scratch_len(*m),
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
            .chain(fused)
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

/// Everything one inference needs, allocated once.
pub struct ExecutionContext {
    engine: Arc<Engine>,
    arena: Vec<f32>,
    base: usize,
    scratch: Vec<f32>,
    /// Where the scratch's first 64-byte boundary is.
    scratch_base: usize,
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
        // The scratch too: kernels pack rows and keep rings there.
        let scratch = vec![0.0f32; engine.scratch_floats(pool.threads()) + ALIGN_FLOATS];
        let misalign = (scratch.as_ptr() as usize / 4) % ALIGN_FLOATS;
        let scratch_base = (ALIGN_FLOATS - misalign) % ALIGN_FLOATS;
        let inputs_set = vec![false; engine.inputs.len()];
        ExecutionContext {
            engine,
            arena,
            base,
            scratch,
            scratch_base,
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

    /// Input `i`'s description and arena offset.
    fn input_slot(&self, i: usize) -> Result<(&TensorDesc, usize)> {
        self.engine
            .inputs
            .get(i)
            .map(|(d, off)| (d, *off))
            .ok_or_else(|| EngineError::Input {
                name: format!("#{i}"),
                msg: "no such input".into(),
            })
    }

    /// As [`ExecutionContext::set_input`], by position.
    pub fn set_input_index(&mut self, i: usize, data: &[f32]) -> Result<()> {
        let (desc, _) = self.input_slot(i)?;
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
        self.input_mut(i)?.copy_from_slice(data);
        Ok(())
    }

    /// The input's storage in the arena, by position, for producers that
    /// write it in place (camera preprocessing) instead of copying a
    /// finished tensor in. The input counts as set from now on; the caller
    /// must write finite values (they are not checked, unlike
    /// [`ExecutionContext::set_input`]).
    pub fn input_mut(&mut self, i: usize) -> Result<&mut [f32]> {
        let (desc, off) = self.input_slot(i)?;
        let start = self.base + off;
        let len = desc.numel();
        self.inputs_set[i] = true;
        Ok(&mut self.arena[start..start + len])
    }

    /// Runs every step. All inputs must have been set at least once.
    pub fn run(&mut self) -> Result<()> {
        self.run_inner(None, None)
    }

    /// Runs every step and adds each step's wall time (seconds) to
    /// `seconds[i]`; `seconds` must have [`Engine::step_count`] entries.
    pub fn run_profiled(&mut self, seconds: &mut [f64]) -> Result<()> {
        if seconds.len() != self.engine.steps.len() {
            return Err(EngineError::model(
                "profile buffer length differs from the step count",
            ));
        }
        self.run_inner(Some(seconds), None)
    }

    fn run_inner(
        &mut self,
        mut profile: Option<&mut [f64]>,
        mut observe: Option<&mut Observer<'_>>,
    ) -> Result<()> {
        if let Some(i) = self.inputs_set.iter().position(|s| !s) {
            return Err(EngineError::Input {
                name: self.engine.inputs[i].0.name.clone(),
                msg: "was never set".into(),
            });
        }
        let engine = &*self.engine;
        let arena = &mut self.arena[self.base..self.base + engine.plan.arena_floats];
        let scratch = &mut self.scratch[self.scratch_base..];
        if let Some(f) = observe.as_deref_mut() {
            for (desc, off) in &engine.inputs {
                f(&desc.name, &arena[*off..*off + desc.numel()]);
            }
        }
        // A fused pair runs at its first step, unless every tensor is
        // observed (the pair's intermediate exists only in the split run).
        let fuse = observe.is_none();
        let mut fused_done = false;
        for (i, step) in engine.steps.iter().enumerate() {
            if std::mem::take(&mut fused_done) {
                continue;
            }
            let t0 = profile.as_ref().map(|_| std::time::Instant::now());
            let next = engine.steps.get(i + 1).filter(|_| fuse && step.fuse_next);
            let ran = match next {
                Some(next) => {
                    fused_done = true;
                    run_fused(step, next, arena, &engine.consts, scratch, &self.pool)
                }
                None => run_step(step, arena, &engine.consts, scratch, &self.pool),
            };
            ran.map_err(|e| match e {
                EngineError::Model(m) => EngineError::Model(format!("step '{}': {m}", step.name)),
                other => other,
            })?;
            if let (Some(p), Some(t0)) = (profile.as_deref_mut(), t0) {
                p[i] += t0.elapsed().as_secs_f64();
            }
            if let Some(f) = observe.as_deref_mut() {
                for (k, ((off, len), name)) in step.outs.iter().zip(&step.out_names).enumerate() {
                    let data = &arena[*off..*off + *len];
                    match step.out_i8 {
                        // Observation is for calibration and reports, off
                        // the real-time path: a dequantized copy is fine.
                        Some((n, scale)) if k == 0 => {
                            let q: &[i8] = bytemuck::cast_slice(data);
                            let v: Vec<f32> = q.iter().take(n).map(|&q| q as f32 * scale).collect();
                            f(name, &v);
                        }
                        _ => f(name, data),
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs every step and shows `observe` each graph input and each
    /// step's outputs, by tensor name, right after they are computed (the
    /// arena reuses memory, so this is the only time every intermediate
    /// tensor can be seen). For calibration; allocates nothing itself.
    pub fn run_observed(&mut self, observe: &mut Observer<'_>) -> Result<()> {
        self.run_inner(None, Some(observe))
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

/// "Conv <kernel> KxK sS gG in->out @HxW [+residual]" for reports.
fn conv_info(kernel: &str, g: &osprey_kernels::conv::Conv2dGeometry, residual: bool) -> String {
    format!(
        "Conv {kernel} {}x{} s{} g{} {}->{} @{}x{}{}",
        g.kh,
        g.kw,
        g.stride[0],
        g.groups,
        g.c_in,
        g.c_out,
        g.h,
        g.w,
        if residual { " +residual" } else { "" }
    )
}
