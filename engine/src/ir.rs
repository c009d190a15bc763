//! The typed intermediate representation.
//!
//! A [`Graph`] is a list of tensors (with static shapes and dtypes; constants
//! carry their data) and a list of nodes in topological order. Every runtime
//! tensor is f32: integer tensors exist only as constants, because the
//! importer folds shape arithmetic away.

use std::collections::BTreeMap;

use osprey_kernels::activation::Activation;
use osprey_kernels::eltwise::BinaryOp;
use osprey_kernels::layout::PadMode;
use osprey_kernels::pooling::PoolKind;
use osprey_kernels::resize::{CoordMode, ResizeMode};

use crate::error::{EngineError, Result};

/// Index of a tensor in [`Graph::tensors`].
pub type TensorId = usize;

/// Element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 64-bit signed integer (constants only).
    I64,
    /// 32-bit signed integer (constants only).
    I32,
    /// Boolean (constants only).
    Bool,
}

impl DType {
    /// Name as numpy and the CLI print it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::Bool => "bool",
        }
    }
}

/// Data of a constant tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum ConstData {
    /// Float data.
    F32(Vec<f32>),
    /// Integer (and boolean) data, widened to i64.
    I64(Vec<i64>),
}

impl ConstData {
    /// Element count.
    pub fn len(&self) -> usize {
        match self {
            ConstData::F32(v) => v.len(),
            ConstData::I64(v) => v.len(),
        }
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Values as i64 (floats truncated).
    pub fn to_i64(&self) -> Vec<i64> {
        match self {
            ConstData::F32(v) => v.iter().map(|&x| x as i64).collect(),
            ConstData::I64(v) => v.clone(),
        }
    }
    /// Values as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            ConstData::F32(v) => v.clone(),
            ConstData::I64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
}

/// A tensor: name, static shape, element type, and data if constant.
#[derive(Clone, Debug)]
pub struct Tensor {
    /// Name from the model.
    pub name: String,
    /// Static shape.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
    /// Data, for constants.
    pub value: Option<ConstData>,
}

impl Tensor {
    /// Element count.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// True for constants.
    pub fn is_const(&self) -> bool {
        self.value.is_some()
    }
}

/// Convolution attributes, resolved (2-D).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConvAttrs {
    /// Kernel (h, w).
    pub kernel: [usize; 2],
    /// Strides (h, w).
    pub strides: [usize; 2],
    /// Dilations (h, w).
    pub dilations: [usize; 2],
    /// Pads top, left, bottom, right.
    pub pads: [usize; 4],
    /// Groups.
    pub groups: usize,
    /// Extra output rows/columns (transposed convolution only).
    pub output_padding: [usize; 2],
    /// Activation fused into the convolution (applied last).
    pub activation: Activation,
    /// A residual input (the 4th operand, after the bias) is added before the
    /// activation: the fused form of `Conv → Add`.
    pub residual: bool,
    /// INT8 permitted: the symmetric per-tensor scale of the input
    /// (calibration threshold / 127, or a QDQ model's scale). The builder
    /// times the INT8 kernel against the FP32 tactics; an untuned engine
    /// runs INT8 wherever this is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub int8_input_scale: Option<f32>,
    /// An FP32 depthwise layer that may read its input as INT8 at this
    /// (calibrated) scale: where the input's producer runs INT8 and every
    /// reader reads INT8 ([`crate::int8::int8_flow`]), the producer writes
    /// INT8 and this layer widens each value to float, its weights times
    /// the scale; the weights and the math stay FP32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub int8_read_scale: Option<f32>,
    /// Channels-last: input, output and residual are NHWC (set by the
    /// layout pass, [`crate::passes::channels_last`]); weights stay OIHW.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub channels_last: bool,
}

impl ConvAttrs {
    /// The kernel geometry of one image, from the input and output shapes
    /// (NCHW, or NHWC for a channels-last layer).
    pub fn geometry(
        &self,
        input: &[usize],
        output: &[usize],
    ) -> osprey_kernels::conv::Conv2dGeometry {
        let (c, h, w) = if self.channels_last {
            (3, 1, 2)
        } else {
            (1, 2, 3)
        };
        osprey_kernels::conv::Conv2dGeometry {
            c_in: input[c],
            h: input[h],
            w: input[w],
            c_out: output[c],
            kh: self.kernel[0],
            kw: self.kernel[1],
            stride: self.strides,
            dilation: self.dilations,
            pads: self.pads,
            groups: self.groups,
        }
    }

    /// The kernel geometry of one image of a transposed convolution, from
    /// the NCHW input shape and the output channel count.
    pub fn transpose_geometry(
        &self,
        input: &[usize],
        c_out: usize,
    ) -> osprey_kernels::conv::ConvTranspose2dGeometry {
        osprey_kernels::conv::ConvTranspose2dGeometry {
            c_in: input[1],
            h: input[2],
            w: input[3],
            c_out,
            kh: self.kernel[0],
            kw: self.kernel[1],
            stride: self.strides,
            dilation: self.dilations,
            pads: self.pads,
            output_padding: self.output_padding,
            groups: self.groups,
        }
    }
}

/// Pooling attributes, resolved (2-D).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolAttrs {
    /// Max or average.
    pub kind: PoolKind,
    /// Window (h, w).
    pub kernel: [usize; 2],
    /// Strides (h, w).
    pub strides: [usize; 2],
    /// Dilations (h, w).
    pub dilations: [usize; 2],
    /// Pads top, left, bottom, right.
    pub pads: [usize; 4],
}

/// Serde default of a fused activation (engine files written before a
/// node kind could take one).
fn no_activation() -> Activation {
    Activation::None
}

fn is_no_activation(a: &Activation) -> bool {
    *a == Activation::None
}

/// An operation on f32 tensors, with every attribute resolved at import.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Op {
    /// 2-D convolution; inputs x, w (const), optional b (const), and the
    /// residual when [`ConvAttrs::residual`] is set (then b is present).
    Conv(ConvAttrs),
    /// 2-D transposed convolution; inputs x, w (const), optional b (const).
    ConvTranspose(ConvAttrs),
    /// Inference batch norm; inputs x, scale, bias, mean, var (all const).
    BatchNorm {
        /// Variance epsilon.
        epsilon: f32,
    },
    /// Element-wise unary function.
    Unary(Activation),
    /// Broadcasting binary function.
    Binary(BinaryOp),
    /// Concatenation along an axis.
    Concat {
        /// Axis (non-negative).
        axis: usize,
        /// A fused Relu or Clip applied to every element as it is copied
        /// (`None`: values unchanged).
        #[serde(default = "no_activation", skip_serializing_if = "is_no_activation")]
        act: Activation,
    },
    /// Split along an axis into the given sizes (one output each).
    Split {
        /// Axis (non-negative).
        axis: usize,
    },
    /// Strided slice: per dimension, first index and step (negative steps reverse).
    Slice {
        /// First index per dimension.
        starts: Vec<usize>,
        /// Step per dimension.
        steps: Vec<isize>,
    },
    /// 2-D max/average pooling.
    Pool(PoolAttrs),
    /// Mean over the spatial plane of each channel.
    GlobalAveragePool,
    /// Mean over axes.
    ReduceMean {
        /// Reduced axes (non-negative).
        axes: Vec<usize>,
    },
    /// 2-D resize over the last two dimensions (NCHW), or the middle two.
    Resize {
        /// Interpolation.
        mode: ResizeMode,
        /// Coordinate transformation.
        coord: CoordMode,
        /// Output/input scale (h, w).
        scales: [f32; 2],
        /// Channels-last: resize dimensions 1 and 2 of `[n, h, w, c]`
        /// (set by the layout pass).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        channels_last: bool,
    },
    /// A view with another shape (Reshape, Flatten, Squeeze, Unsqueeze,
    /// Identity, Dropout): no data moves.
    Reshape,
    /// A view of a contiguous part of the input, starting `offset` elements
    /// in (the output shape gives its extent): how the outputs of
    /// horizontally fused convolutions are read. No data moves.
    SliceView {
        /// First element, in f32 elements from the input's start.
        offset: usize,
    },
    /// Permutation of dimensions.
    Transpose {
        /// `out[d] = in[perm[d]]`.
        perm: Vec<usize>,
    },
    /// Gather along an axis with constant indices.
    Gather {
        /// Axis (non-negative).
        axis: usize,
        /// Indices (normalised, in range).
        indices: Vec<usize>,
    },
    /// `alpha * A' B' + beta * C`; B (and C) constant.
    Gemm {
        /// Scale of the product.
        alpha: f32,
        /// Scale of C.
        beta: f32,
        /// Transpose A.
        trans_a: bool,
        /// Transpose B.
        trans_b: bool,
        /// INT8 permitted: the symmetric per-tensor scale of A (as
        /// [`ConvAttrs::int8_input_scale`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        int8_input_scale: Option<f32>,
    },
    /// Matrix product with numpy semantics.
    MatMul,
    /// Softmax over `[outer, axis, inner]`.
    Softmax {
        /// Axis (non-negative).
        axis: usize,
        /// Opset < 13: coerce to 2-D at the axis (softmax over all trailing dims).
        legacy: bool,
    },
    /// Padding.
    Pad {
        /// Border mode.
        mode: PadMode,
        /// Pads before, per dimension.
        begin: Vec<usize>,
        /// Pads after, per dimension.
        end: Vec<usize>,
    },
}

impl Op {
    /// A short name for reports and histograms.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Conv(_) => "Conv",
            Op::ConvTranspose(_) => "ConvTranspose",
            Op::BatchNorm { .. } => "BatchNormalization",
            Op::Unary(a) => match a {
                Activation::None => "Identity",
                Activation::Relu => "Relu",
                Activation::Clip { .. } => "Clip",
                Activation::LeakyRelu { .. } => "LeakyRelu",
                Activation::Sigmoid => "Sigmoid",
                Activation::HardSigmoid { .. } => "HardSigmoid",
                Activation::HardSwish => "HardSwish",
                Activation::HardSwishScaled { .. } => "HardSwishScaled",
                Activation::Silu => "Silu",
                Activation::Exp => "Exp",
                Activation::Sqrt => "Sqrt",
                Activation::Pow { .. } => "Pow",
                Activation::Neg => "Neg",
                Activation::Tanh => "Tanh",
                Activation::Abs => "Abs",
                Activation::Reciprocal => "Reciprocal",
            },
            Op::Binary(b) => match b {
                BinaryOp::Add => "Add",
                BinaryOp::Sub => "Sub",
                BinaryOp::Mul => "Mul",
                BinaryOp::Div => "Div",
                BinaryOp::Pow => "Pow",
                BinaryOp::Max => "Max",
                BinaryOp::Min => "Min",
            },
            Op::Concat { .. } => "Concat",
            Op::Split { .. } => "Split",
            Op::Slice { .. } => "Slice",
            Op::Pool(p) => match p.kind {
                PoolKind::Max => "MaxPool",
                PoolKind::Average { .. } => "AveragePool",
            },
            Op::GlobalAveragePool => "GlobalAveragePool",
            Op::ReduceMean { .. } => "ReduceMean",
            Op::Resize { .. } => "Resize",
            Op::Reshape => "Reshape",
            Op::SliceView { .. } => "SliceView",
            Op::Transpose { .. } => "Transpose",
            Op::Gather { .. } => "Gather",
            Op::Gemm { .. } => "Gemm",
            Op::MatMul => "MatMul",
            Op::Softmax { .. } => "Softmax",
            Op::Pad { .. } => "Pad",
        }
    }

    /// True for ops whose output is a view of their first input.
    pub fn is_view(&self) -> bool {
        matches!(self, Op::Reshape | Op::SliceView { .. })
    }

    /// Where a view starts inside its input, in elements (0 for non-views).
    pub fn view_offset(&self) -> usize {
        match self {
            Op::SliceView { offset } => *offset,
            _ => 0,
        }
    }
}

/// One operation with its operands.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Node {
    /// Name from the model (or `#index`).
    pub name: String,
    /// The ONNX op type it came from.
    pub onnx_op: String,
    /// What it computes.
    pub op: Op,
    /// Input tensors.
    pub inputs: Vec<TensorId>,
    /// Output tensors.
    pub outputs: Vec<TensorId>,
}

/// A typed graph with static shapes, nodes in topological order.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// All tensors.
    pub tensors: Vec<Tensor>,
    /// Nodes in execution order.
    pub nodes: Vec<Node>,
    /// Graph inputs (runtime f32 tensors).
    pub inputs: Vec<TensorId>,
    /// Graph outputs.
    pub outputs: Vec<TensorId>,
    /// Default-domain opset the model was written against.
    pub opset: i64,
    /// Symmetric INT8 scales an explicitly quantized (QDQ) model gives its
    /// runtime tensors, by tensor name (import only; the INT8 builder reads
    /// them instead of a calibration cache).
    pub quant_scales: std::collections::BTreeMap<String, f32>,
    /// Constants whose ONNX element type was INT8 (QDQ zero points need
    /// their signedness; integer constants are otherwise stored as i64).
    pub int8_constants: std::collections::BTreeSet<TensorId>,
}

impl Graph {
    /// Adds a tensor and returns its id.
    pub fn add_tensor(&mut self, t: Tensor) -> TensorId {
        self.tensors.push(t);
        self.tensors.len() - 1
    }

    /// Finds a graph input by name.
    pub fn input_id(&self, name: &str) -> Option<TensorId> {
        self.inputs
            .iter()
            .copied()
            .find(|&i| self.tensors[i].name == name)
    }

    /// Finds a graph output by name.
    pub fn output_id(&self, name: &str) -> Option<TensorId> {
        self.outputs
            .iter()
            .copied()
            .find(|&i| self.tensors[i].name == name)
    }

    /// Count of nodes per ONNX op type (of the nodes that remain after folding).
    pub fn op_histogram(&self) -> BTreeMap<String, usize> {
        let mut h = BTreeMap::new();
        for n in &self.nodes {
            *h.entry(n.onnx_op.clone()).or_insert(0) += 1;
        }
        h
    }

    /// Bytes of constant data that nodes or outputs still reference
    /// (constants orphaned by rewrites are not counted).
    pub fn constant_bytes(&self) -> usize {
        let mut used = vec![false; self.tensors.len()];
        for n in &self.nodes {
            for &t in &n.inputs {
                used[t] = true;
            }
        }
        for &t in &self.outputs {
            used[t] = true;
        }
        self.tensors
            .iter()
            .zip(&used)
            .filter(|(_, &u)| u)
            .filter_map(|(t, _)| t.value.as_ref())
            .map(|v| match v {
                ConstData::F32(d) => d.len() * 4,
                ConstData::I64(d) => d.len() * 8,
            })
            .sum()
    }

    /// Checks the invariants the planner and executor rely on: ids in range,
    /// every tensor defined once and before use, runtime tensors are f32.
    pub fn validate(&self) -> Result<()> {
        let n = self.tensors.len();
        let mut defined = vec![false; n];
        for (id, t) in self.tensors.iter().enumerate() {
            if let Some(v) = &t.value {
                if v.len() != t.numel() {
                    return Err(EngineError::model(format!(
                        "constant '{}' has {} values for shape {:?}",
                        t.name,
                        v.len(),
                        t.shape
                    )));
                }
                defined[id] = true;
            }
        }
        for &i in &self.inputs {
            if i >= n {
                return Err(EngineError::model("graph input id out of range"));
            }
            if self.tensors[i].dtype != DType::F32 {
                return Err(EngineError::model(format!(
                    "graph input '{}' is {}; osprey runs float32 inputs",
                    self.tensors[i].name,
                    self.tensors[i].dtype.name()
                )));
            }
            defined[i] = true;
        }
        for node in &self.nodes {
            for &i in &node.inputs {
                if i >= n || !defined[i] {
                    return Err(EngineError::model(format!(
                        "node '{}' reads a tensor that is not yet defined (graph not in topological order?)",
                        node.name
                    )));
                }
            }
            for &o in &node.outputs {
                if o >= n || defined[o] {
                    return Err(EngineError::model(format!(
                        "node '{}' writes tensor #{o} that is already defined",
                        node.name
                    )));
                }
                if self.tensors[o].dtype != DType::F32 {
                    return Err(EngineError::model(format!(
                        "node '{}' computes '{}' of type {} at run time; osprey computes float32 only",
                        node.name,
                        self.tensors[o].name,
                        self.tensors[o].dtype.name()
                    )));
                }
                defined[o] = true;
            }
        }
        for &o in &self.outputs {
            if o >= n || !defined[o] {
                return Err(EngineError::model("a graph output is never computed"));
            }
        }
        Ok(())
    }
}
