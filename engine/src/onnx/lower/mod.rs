//! Lowering of single ONNX nodes: attribute resolution, static shape
//! inference, and constant folding when every input is known.
//!
//! `spatial` holds convolution, padding and resize; `fold` constants and
//! constant shape arithmetic.

mod fold;
mod spatial;

use fold::{fold_concat, fold_slice, lower_constant, lower_unary, reshape_target};
use spatial::{lower_conv, lower_resize, pair, resolve_pads, two};

use osprey_kernels::activation::Activation;
use osprey_kernels::eltwise::{broadcast_shape, BinaryOp};
use osprey_kernels::layout::PadMode;
use osprey_kernels::pooling::{pool_out_extent, PoolKind};

use super::consts::{binary as fold_binary, remap, strides, Value};
use super::proto::{NodeProto, TensorProto};
use crate::ir::{ConstData, DType, Graph, Op, PoolAttrs, Tensor, TensorId};

/// What a node became.
pub enum Lowered {
    /// Folded to constants (one per ONNX output).
    Const(Vec<Value>),
    /// A runtime node with its resolved op, operand ids and output shapes.
    Node {
        op: Op,
        inputs: Vec<TensorId>,
        outputs: Vec<Vec<usize>>,
    },
}

const SUPPORTED: &[&str] = &[
    "Conv",
    "ConvTranspose",
    "BatchNormalization",
    "Relu",
    "LeakyRelu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Abs",
    "Neg",
    "Reciprocal",
    "Mul",
    "Add",
    "Sub",
    "Div",
    "Pow",
    "Max",
    "Min",
    "Sqrt",
    "Exp",
    "Concat",
    "Split",
    "Slice",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "ReduceMean",
    "Resize",
    "Upsample",
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Shape",
    "Gather",
    "Cast",
    "Gemm",
    "MatMul",
    "Softmax",
    "Pad",
    "Identity",
    "Dropout",
    "Constant",
    "QuantizeLinear",
    "DequantizeLinear",
];

/// True when osprey implements the node's op.
pub fn is_supported(n: &NodeProto) -> bool {
    let domain = n.domain.as_deref().unwrap_or("");
    (domain.is_empty() || domain == "ai.onnx")
        && SUPPORTED.contains(&n.op_type.as_deref().unwrap_or(""))
}

type R<T> = Result<T, String>;

/// Attribute accessors.
struct Attrs<'a>(&'a NodeProto);

impl Attrs<'_> {
    fn get(&self, name: &str) -> Option<&super::proto::AttributeProto> {
        self.0
            .attribute
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
    }
    fn i(&self, name: &str) -> Option<i64> {
        self.get(name).and_then(|a| a.i)
    }
    fn f(&self, name: &str) -> Option<f32> {
        self.get(name).and_then(|a| a.f)
    }
    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.get(name).map(|a| a.ints.clone())
    }
    fn floats(&self, name: &str) -> Option<Vec<f32>> {
        self.get(name).map(|a| a.floats.clone())
    }
    fn s(&self, name: &str) -> Option<String> {
        self.get(name)
            .and_then(|a| a.s.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }
    fn t(&self, name: &str) -> Option<&TensorProto> {
        self.get(name).and_then(|a| a.t.as_ref())
    }
    fn usizes(&self, name: &str, what: &str) -> R<Option<Vec<usize>>> {
        match self.ints(name) {
            None => Ok(None),
            Some(v) => v
                .iter()
                .map(|&x| {
                    usize::try_from(x)
                        .map_err(|_| format!("{what} '{name}' has negative value {x}"))
                })
                .collect::<R<Vec<_>>>()
                .map(Some),
        }
    }
}

/// Input accessors.
struct Ins<'a> {
    g: &'a Graph,
    ids: &'a [Option<TensorId>],
}

impl<'a> Ins<'a> {
    fn opt(&self, i: usize) -> Option<&'a Tensor> {
        self.ids
            .get(i)
            .copied()
            .flatten()
            .map(|id| &self.g.tensors[id])
    }
    fn t(&self, i: usize) -> R<&'a Tensor> {
        self.opt(i).ok_or_else(|| format!("missing input {i}"))
    }
    fn id(&self, i: usize) -> R<TensorId> {
        self.ids
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| format!("missing input {i}"))
    }
    fn value(&self, i: usize) -> R<Value> {
        let t = self.t(i)?;
        let data = t
            .value
            .clone()
            .ok_or_else(|| format!("input {i} ('{}') must be a constant", t.name))?;
        Ok(Value {
            shape: t.shape.clone(),
            dtype: t.dtype,
            data,
        })
    }
    fn opt_i64s(&self, i: usize) -> R<Option<Vec<i64>>> {
        match self.opt(i) {
            None => Ok(None),
            Some(t) => match &t.value {
                Some(v) => Ok(Some(v.to_i64())),
                None => Err(format!("input {i} ('{}') must be a constant", t.name)),
            },
        }
    }
    fn opt_f32s(&self, i: usize) -> R<Option<Vec<f32>>> {
        match self.opt(i) {
            None => Ok(None),
            Some(t) => match &t.value {
                Some(v) => Ok(Some(v.to_f32())),
                None => Err(format!("input {i} ('{}') must be a constant", t.name)),
            },
        }
    }
    fn present(&self) -> impl Iterator<Item = &'a Tensor> + '_ {
        self.ids.iter().flatten().map(|&id| &self.g.tensors[id])
    }
    fn all_const(&self) -> bool {
        self.ids.iter().any(|i| i.is_some()) && self.present().all(|t| t.is_const())
    }
    fn runtime_ids(&self) -> Vec<TensorId> {
        self.ids.iter().flatten().copied().collect()
    }
}

fn node(op: Op, inputs: Vec<TensorId>, outputs: Vec<Vec<usize>>) -> R<Lowered> {
    Ok(Lowered::Node {
        op,
        inputs,
        outputs,
    })
}

fn norm_axis(axis: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) {
        return Err(format!("axis {axis} out of range for rank {rank}"));
    }
    Ok(a as usize)
}

fn view_or_fold(ins: &Ins<'_>, shape: Vec<usize>) -> R<Lowered> {
    let x = ins.t(0)?;
    if shape.iter().product::<usize>() != x.numel() {
        return Err(format!("cannot view {:?} as {:?}", x.shape, shape));
    }
    if let Some(v) = &x.value {
        return Ok(Lowered::Const(vec![Value {
            shape,
            dtype: x.dtype,
            data: v.clone(),
        }]));
    }
    node(Op::Reshape, vec![ins.id(0)?], vec![shape])
}

/// Scale, zero point and integer range of a QuantizeLinear /
/// DequantizeLinear node.
pub(crate) struct QdqParams {
    /// One scale, or one per slice along `axis`.
    pub scale: Vec<f32>,
    /// Zero points (as many as scales, or one).
    pub zero: Vec<f32>,
    /// Integer range of the quantized type.
    pub lo: f32,
    /// See `lo`.
    pub hi: f32,
    /// Whether the quantized type is signed 8-bit.
    pub signed: bool,
    axis: usize,
}

impl QdqParams {
    /// Index into `scale` of flat element `i` of a tensor of `shape`.
    fn per_axis_index(&self, shape: &[usize], i: usize) -> usize {
        if self.scale.len() == 1 {
            return 0;
        }
        let inner: usize = shape.iter().skip(self.axis + 1).product();
        (i / inner.max(1)) % self.scale.len()
    }

    /// The symmetric INT8 scale covering the same range as this
    /// (possibly asymmetric) per-tensor quantization: the larger distance
    /// from the zero point to either end of the integer range, over 127.
    pub fn symmetric_scale(&self) -> f32 {
        let z = self.zero.first().copied().unwrap_or(0.0);
        if self.signed && z == 0.0 {
            return self.scale[0];
        }
        (z - self.lo).abs().max((self.hi - z).abs()) * self.scale[0] / 127.0
    }
}

fn qdq_params(ins: &Ins<'_>, a: &Attrs<'_>, rank: usize) -> R<QdqParams> {
    let scale = ins.value(1)?.data.to_f32();
    if scale.is_empty() || scale.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(format!("scale {scale:?} must be positive and finite"));
    }
    let (zero, signed) = match ins.opt(2) {
        None => (vec![0.0], false),
        Some(_) => {
            let z = ins.value(2)?;
            let negative = matches!(&z.data, ConstData::I64(v) if v.iter().any(|&x| x < 0));
            (z.data.to_f32(), negative || zero_is_int8(ins.g, ins.id(2)?))
        }
    };
    if zero.len() != 1 && zero.len() != scale.len() {
        return Err(format!(
            "{} zero points for {} scales",
            zero.len(),
            scale.len()
        ));
    }
    let axis = if scale.len() > 1 {
        norm_axis(a.i("axis").unwrap_or(1), rank)?
    } else {
        0
    };
    let (lo, hi) = if signed {
        (-128.0, 127.0)
    } else {
        (0.0, 255.0)
    };
    Ok(QdqParams {
        scale,
        zero,
        lo,
        hi,
        signed,
        axis,
    })
}

/// Whether a zero-point constant was declared INT8 (integer constants are
/// stored as i64, so the importer records which were INT8).
fn zero_is_int8(g: &Graph, id: TensorId) -> bool {
    g.int8_constants.contains(&id)
}

/// For a QuantizeLinear/DequantizeLinear node on a runtime tensor, the
/// symmetric INT8 scale it implies (see [`QdqParams::symmetric_scale`]).
pub fn runtime_qdq_scale(n: &NodeProto, ids: &[Option<TensorId>], g: &Graph) -> Option<f32> {
    let op = n.op_type.as_deref()?;
    if op != "QuantizeLinear" && op != "DequantizeLinear" {
        return None;
    }
    let ins = Ins { g, ids };
    let x = ins.t(0).ok()?;
    if x.value.is_some() {
        return None;
    }
    let q = qdq_params(&ins, &Attrs(n), x.shape.len()).ok()?;
    (q.scale.len() == 1).then(|| q.symmetric_scale())
}

/// Lowers one node (see the module doc).
pub fn lower_node(n: &NodeProto, ids: &[Option<TensorId>], g: &Graph, opset: i64) -> R<Lowered> {
    let a = Attrs(n);
    let ins = Ins { g, ids };
    let op_type = n.op_type.as_deref().unwrap_or("");
    match op_type {
        "Constant" => lower_constant(&a),
        "Identity" | "Dropout" => {
            let x = ins.t(0)?;
            if n.output.iter().skip(1).any(|o| !o.is_empty()) && op_type == "Dropout" {
                // The mask output is all ones in inference; only constants can have it.
                let Some(v) = &x.value else {
                    return Err("Dropout's mask output is not supported at run time".into());
                };
                let mask = Value {
                    shape: x.shape.clone(),
                    dtype: DType::Bool,
                    data: ConstData::I64(vec![1; x.numel()]),
                };
                let out = Value {
                    shape: x.shape.clone(),
                    dtype: x.dtype,
                    data: v.clone(),
                };
                return Ok(Lowered::Const(vec![out, mask]));
            }
            view_or_fold(&ins, x.shape.clone())
        }
        "QuantizeLinear" | "DequantizeLinear" => {
            let x = ins.t(0)?;
            let q = qdq_params(&ins, &a, x.shape.len())?;
            let Some(v) = &x.value else {
                // A runtime tensor: the value stays FP32 (the import records
                // the scale for the INT8 builder, `quant_scales`), but the
                // quantizer's range is kept as a clamp: quantizers replace
                // the Relu/Clip they absorbed.
                if q.scale.len() != 1 {
                    return Err("per-axis quantization of a runtime tensor is not supported (only of weights)".into());
                }
                if op_type == "DequantizeLinear" {
                    return view_or_fold(&ins, x.shape.clone());
                }
                let z = q.zero.first().copied().unwrap_or(0.0);
                let (lo, hi) = ((q.lo - z) * q.scale[0], (q.hi - z) * q.scale[0]);
                return lower_unary(&ins, Activation::Clip { lo, hi });
            };
            let dequantize = op_type == "DequantizeLinear";
            let values: Vec<f32> = v
                .to_f32()
                .iter()
                .enumerate()
                .map(|(i, &xv)| {
                    let k = q.per_axis_index(&x.shape, i);
                    let (s, z) = (q.scale[k], q.zero[k.min(q.zero.len() - 1)]);
                    if dequantize {
                        (xv - z) * s
                    } else {
                        ((xv / s).round_ties_even() + z).clamp(q.lo, q.hi)
                    }
                })
                .collect();
            let (data, dtype) = if dequantize {
                (ConstData::F32(values), DType::F32)
            } else {
                // Integers in [lo, hi]: exact in f32.
                let ints = values.iter().map(|&v| v as i64).collect();
                (ConstData::I64(ints), DType::I32)
            };
            Ok(Lowered::Const(vec![Value {
                shape: x.shape.clone(),
                dtype,
                data,
            }]))
        }
        "Shape" => {
            let x = ins.t(0)?;
            let r = x.shape.len() as i64;
            let clampi = |v: i64| if v < 0 { (v + r).clamp(0, r) } else { v.clamp(0, r) } as usize;
            let start = clampi(a.i("start").unwrap_or(0));
            let end = clampi(a.i("end").unwrap_or(r));
            let dims: Vec<i64> = x.shape[start..end.max(start)]
                .iter()
                .map(|&d| d as i64)
                .collect();
            Ok(Lowered::Const(vec![Value {
                shape: vec![dims.len()],
                dtype: DType::I64,
                data: ConstData::I64(dims),
            }]))
        }
        "Cast" => {
            let x = ins.t(0)?;
            let to = a.i("to").ok_or("missing 'to'")? as i32;
            let dtype = super::consts::onnx_dtype(to)?;
            if let Some(v) = &x.value {
                let data = match dtype {
                    DType::F32 => ConstData::F32(v.to_f32()),
                    DType::Bool => {
                        ConstData::I64(v.to_i64().iter().map(|&x| (x != 0) as i64).collect())
                    }
                    _ => ConstData::I64(match v {
                        ConstData::F32(f) => f.iter().map(|&x| x as i64).collect(),
                        ConstData::I64(i) => i.clone(),
                    }),
                };
                return Ok(Lowered::Const(vec![Value {
                    shape: x.shape.clone(),
                    dtype,
                    data,
                }]));
            }
            if dtype != DType::F32 {
                return Err(format!(
                    "cast of a runtime tensor to {} (osprey computes float32 only)",
                    dtype.name()
                ));
            }
            view_or_fold(&ins, x.shape.clone())
        }
        "Reshape" => {
            let x = ins.t(0)?;
            let target = match ins.opt_i64s(1)? {
                Some(v) => v,
                None => a.ints("shape").ok_or("missing shape")?,
            };
            let allow_zero = a.i("allowzero").unwrap_or(0) != 0;
            let shape = reshape_target(&x.shape, &target, allow_zero)?;
            view_or_fold(&ins, shape)
        }
        "Flatten" => {
            let x = ins.t(0)?;
            let axis = a.i("axis").unwrap_or(1);
            let r = x.shape.len() as i64;
            let ax = if axis < 0 { axis + r } else { axis };
            if ax < 0 || ax > r {
                return Err(format!("axis {axis} out of range for rank {r}"));
            }
            let ax = ax as usize;
            let shape = vec![
                x.shape[..ax].iter().product(),
                x.shape[ax..].iter().product(),
            ];
            view_or_fold(&ins, shape)
        }
        "Squeeze" => {
            let x = ins.t(0)?;
            let axes = if opset >= 13 {
                ins.opt_i64s(1)?
            } else {
                a.ints("axes")
            };
            let shape = match axes {
                None => x.shape.iter().copied().filter(|&d| d != 1).collect(),
                Some(ax) => {
                    let ax: Vec<usize> = ax
                        .iter()
                        .map(|&v| norm_axis(v, x.shape.len()))
                        .collect::<R<_>>()?;
                    for &d in &ax {
                        if x.shape[d] != 1 {
                            return Err(format!("cannot squeeze axis {d} of size {}", x.shape[d]));
                        }
                    }
                    x.shape
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !ax.contains(i))
                        .map(|(_, &d)| d)
                        .collect()
                }
            };
            view_or_fold(&ins, shape)
        }
        "Unsqueeze" => {
            let x = ins.t(0)?;
            let axes = if opset >= 13 {
                ins.opt_i64s(1)?
            } else {
                a.ints("axes")
            }
            .ok_or("missing axes")?;
            let out_rank = x.shape.len() + axes.len();
            let mut ax: Vec<usize> = axes
                .iter()
                .map(|&v| norm_axis(v, out_rank))
                .collect::<R<_>>()?;
            ax.sort_unstable();
            ax.dedup();
            if ax.len() != axes.len() {
                return Err("repeated axes".into());
            }
            let mut shape = Vec::with_capacity(out_rank);
            let mut src = x.shape.iter();
            for d in 0..out_rank {
                if ax.contains(&d) {
                    shape.push(1);
                } else {
                    shape.push(*src.next().ok_or("axes out of range")?);
                }
            }
            view_or_fold(&ins, shape)
        }
        "Relu" | "Sigmoid" | "Exp" | "Sqrt" | "Tanh" | "Abs" | "Neg" | "Reciprocal"
        | "HardSwish" | "LeakyRelu" | "HardSigmoid" | "Clip" => {
            let act = match op_type {
                "Relu" => Activation::Relu,
                "Sigmoid" => Activation::Sigmoid,
                "Exp" => Activation::Exp,
                "Sqrt" => Activation::Sqrt,
                "Tanh" => Activation::Tanh,
                "Abs" => Activation::Abs,
                "Neg" => Activation::Neg,
                "Reciprocal" => Activation::Reciprocal,
                "HardSwish" => Activation::HardSwish,
                "LeakyRelu" => Activation::LeakyRelu {
                    alpha: a.f("alpha").unwrap_or(0.01),
                },
                "HardSigmoid" => Activation::HardSigmoid {
                    alpha: a.f("alpha").unwrap_or(0.2),
                    beta: a.f("beta").unwrap_or(0.5),
                },
                _ => {
                    let (lo, hi) = if opset < 11 {
                        (
                            a.f("min").unwrap_or(f32::NEG_INFINITY),
                            a.f("max").unwrap_or(f32::INFINITY),
                        )
                    } else {
                        let scalar = |i: usize| -> R<Option<f32>> {
                            Ok(match ins.opt_f32s(i)? {
                                None => None,
                                Some(v) if v.len() == 1 => Some(v[0]),
                                Some(_) => return Err("Clip bounds must be scalars".into()),
                            })
                        };
                        (
                            scalar(1)?.unwrap_or(f32::NEG_INFINITY),
                            scalar(2)?.unwrap_or(f32::INFINITY),
                        )
                    };
                    Activation::Clip { lo, hi }
                }
            };
            lower_unary(&ins, act)
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Max" | "Min" => {
            if ins.runtime_ids().len() != 2 {
                return Err(format!(
                    "{op_type} with {} inputs (osprey takes exactly 2)",
                    ins.runtime_ids().len()
                ));
            }
            let (x, y) = (ins.t(0)?, ins.t(1)?);
            let out = broadcast_shape(&x.shape, &y.shape).ok_or_else(|| {
                format!("shapes {:?} and {:?} do not broadcast", x.shape, y.shape)
            })?;
            if ins.all_const() {
                let (va, vb) = (ins.value(0)?, ins.value(1)?);
                let dtype = if va.dtype == DType::F32 || vb.dtype == DType::F32 {
                    DType::F32
                } else {
                    va.dtype
                };
                let data = fold_binary(&va, &vb, &out, op_type)?;
                return Ok(Lowered::Const(vec![Value {
                    shape: out,
                    dtype,
                    data,
                }]));
            }
            if op_type == "Pow" {
                if let Some(ConstData::F32(p)) = &y.value {
                    if p.len() == 1 && out == x.shape {
                        return node(
                            Op::Unary(Activation::Pow { p: p[0] }),
                            vec![ins.id(0)?],
                            vec![out],
                        );
                    }
                }
            }
            for t in [x, y] {
                if t.dtype != DType::F32 {
                    return Err(format!(
                        "'{}' is {}; runtime arithmetic is float32",
                        t.name,
                        t.dtype.name()
                    ));
                }
            }
            let op = match op_type {
                "Add" => BinaryOp::Add,
                "Sub" => BinaryOp::Sub,
                "Mul" => BinaryOp::Mul,
                "Div" => BinaryOp::Div,
                "Pow" => BinaryOp::Pow,
                "Max" => BinaryOp::Max,
                _ => BinaryOp::Min,
            };
            node(Op::Binary(op), vec![ins.id(0)?, ins.id(1)?], vec![out])
        }
        "Conv" => lower_conv(&a, &ins, false),
        "ConvTranspose" => lower_conv(&a, &ins, true),
        "BatchNormalization" => {
            let x = ins.t(0)?;
            if x.shape.len() < 2 {
                return Err(format!("input rank {} < 2", x.shape.len()));
            }
            if n.output.iter().skip(1).any(|o| !o.is_empty()) {
                return Err("training-mode outputs (running mean/var) are not supported".into());
            }
            let c = x.shape[1];
            for i in 1..5 {
                let p = ins.t(i)?;
                if !p.is_const() {
                    return Err(format!("parameter '{}' must be a constant", p.name));
                }
                if p.numel() != c {
                    return Err(format!(
                        "parameter '{}' has {} values for {c} channels",
                        p.name,
                        p.numel()
                    ));
                }
            }
            node(
                Op::BatchNorm {
                    epsilon: a.f("epsilon").unwrap_or(1e-5),
                },
                (0..5).map(|i| ins.id(i)).collect::<R<_>>()?,
                vec![x.shape.clone()],
            )
        }
        "Concat" => {
            let parts: Vec<&Tensor> = ins.present().collect();
            let first = parts.first().ok_or("no inputs")?;
            let rank = first.shape.len();
            let axis = norm_axis(a.i("axis").ok_or("missing axis")?, rank)?;
            let mut out = first.shape.clone();
            out[axis] = 0;
            for p in &parts {
                if p.shape.len() != rank
                    || p.shape
                        .iter()
                        .enumerate()
                        .any(|(d, &v)| d != axis && v != first.shape[d])
                {
                    return Err(format!(
                        "shapes {:?} and {:?} cannot concatenate on axis {axis}",
                        first.shape, p.shape
                    ));
                }
                out[axis] += p.shape[axis];
            }
            if ins.all_const() {
                return Ok(Lowered::Const(vec![fold_concat(&parts, axis, out)?]));
            }
            if parts.iter().any(|p| p.dtype != DType::F32) {
                return Err("runtime concatenation of integer tensors".into());
            }
            let act = Activation::None;
            node(Op::Concat { axis, act }, ins.runtime_ids(), vec![out])
        }
        "Split" => {
            let x = ins.t(0)?;
            let axis = norm_axis(a.i("axis").unwrap_or(0), x.shape.len())?;
            let n_out = n.output.len();
            let sizes: Vec<usize> = match if opset >= 13 {
                ins.opt_i64s(1)?
            } else {
                a.ints("split")
            } {
                Some(s) => s
                    .iter()
                    .map(|&v| usize::try_from(v).map_err(|_| format!("negative split {v}")))
                    .collect::<R<_>>()?,
                None => {
                    let parts = a
                        .i("num_outputs")
                        .map(|v| v as usize)
                        .unwrap_or(n_out)
                        .max(1);
                    let dim = x.shape[axis];
                    let chunk = dim.div_ceil(parts);
                    (0..parts)
                        .map(|i| chunk.min(dim.saturating_sub(i * chunk)))
                        .collect()
                }
            };
            if sizes.iter().sum::<usize>() != x.shape[axis] || sizes.len() != n_out {
                return Err(format!(
                    "split {:?} does not fit dimension {} into {n_out} outputs",
                    sizes, x.shape[axis]
                ));
            }
            let outs: Vec<Vec<usize>> = sizes
                .iter()
                .map(|&s| {
                    let mut sh = x.shape.clone();
                    sh[axis] = s;
                    sh
                })
                .collect();
            if let Some(v) = &x.value {
                let mut offset = 0;
                let mut vals = Vec::new();
                for sh in outs {
                    let starts: Vec<usize> = (0..sh.len())
                        .map(|d| if d == axis { offset } else { 0 })
                        .collect();
                    offset += sh[axis];
                    vals.push(fold_slice(
                        v,
                        x.dtype,
                        &x.shape,
                        &starts,
                        &vec![1; sh.len()],
                        sh,
                    ));
                }
                return Ok(Lowered::Const(vals));
            }
            node(Op::Split { axis }, vec![ins.id(0)?], outs)
        }
        "Slice" => {
            let x = ins.t(0)?;
            let (starts, ends, axes, steps) = if opset >= 10 {
                (
                    ins.opt_i64s(1)?.ok_or("missing starts")?,
                    ins.opt_i64s(2)?.ok_or("missing ends")?,
                    ins.opt_i64s(3)?,
                    ins.opt_i64s(4)?,
                )
            } else {
                (
                    a.ints("starts").ok_or("missing starts")?,
                    a.ints("ends").ok_or("missing ends")?,
                    a.ints("axes"),
                    None,
                )
            };
            let rank = x.shape.len();
            let axes: Vec<usize> = match axes {
                Some(v) => v.iter().map(|&ax| norm_axis(ax, rank)).collect::<R<_>>()?,
                None => (0..starts.len()).collect(),
            };
            let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
            if ends.len() != starts.len()
                || axes.len() != starts.len()
                || steps.len() != starts.len()
            {
                return Err("starts, ends, axes and steps differ in length".into());
            }
            let mut first = vec![0usize; rank];
            let mut step = vec![1isize; rank];
            let mut out = x.shape.clone();
            for k in 0..starts.len() {
                let d = axes[k];
                let dim = x.shape[d] as i64;
                let st = steps[k];
                if st == 0 {
                    return Err("slice step 0".into());
                }
                let fix = |v: i64| if v < 0 { v + dim } else { v };
                let (s, e) = if st > 0 {
                    (fix(starts[k]).clamp(0, dim), fix(ends[k]).clamp(0, dim))
                } else {
                    (
                        fix(starts[k]).clamp(0, dim - 1),
                        fix(ends[k]).clamp(-1, dim - 1),
                    )
                };
                let len = if st > 0 {
                    ((e - s).max(0) + st - 1) / st
                } else {
                    ((s - e).max(0) + (-st) - 1) / (-st)
                };
                first[d] = s.max(0) as usize;
                step[d] = st as isize;
                out[d] = len as usize;
            }
            if let Some(v) = &x.value {
                return Ok(Lowered::Const(vec![fold_slice(
                    v, x.dtype, &x.shape, &first, &step, out,
                )]));
            }
            node(
                Op::Slice {
                    starts: first,
                    steps: step,
                },
                vec![ins.id(0)?],
                vec![out],
            )
        }
        "Transpose" => {
            let x = ins.t(0)?;
            let rank = x.shape.len();
            let perm = a
                .usizes("perm", "attribute")?
                .unwrap_or_else(|| (0..rank).rev().collect());
            let mut seen = vec![false; rank];
            if perm.len() != rank
                || perm
                    .iter()
                    .any(|&p| p >= rank || std::mem::replace(&mut seen[p], true))
            {
                return Err(format!("perm {perm:?} is not a permutation of rank {rank}"));
            }
            let out: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
            if let Some(v) = &x.value {
                let st = strides(&x.shape);
                let data = remap(v, &out, |idx| {
                    idx.iter().zip(&perm).map(|(i, &p)| i * st[p]).sum()
                });
                return Ok(Lowered::Const(vec![Value {
                    shape: out,
                    dtype: x.dtype,
                    data,
                }]));
            }
            node(Op::Transpose { perm }, vec![ins.id(0)?], vec![out])
        }
        "Gather" => {
            let x = ins.t(0)?;
            let idx_t = ins.t(1)?;
            let raw = ins.opt_i64s(1)?.ok_or("indices must be constant")?;
            let axis = norm_axis(a.i("axis").unwrap_or(0), x.shape.len())?;
            let dim = x.shape[axis] as i64;
            let indices: Vec<usize> = raw
                .iter()
                .map(|&i| {
                    let j = if i < 0 { i + dim } else { i };
                    if j < 0 || j >= dim {
                        Err(format!("index {i} out of range for dimension {dim}"))
                    } else {
                        Ok(j as usize)
                    }
                })
                .collect::<R<_>>()?;
            let mut out = x.shape[..axis].to_vec();
            out.extend_from_slice(&idx_t.shape);
            out.extend_from_slice(&x.shape[axis + 1..]);
            if let Some(v) = &x.value {
                let st = strides(&x.shape);
                let ir = idx_t.shape.len();
                let idx_strides = strides(&idx_t.shape);
                let data = remap(v, &out, |o| {
                    let mut off = 0;
                    for d in 0..axis {
                        off += o[d] * st[d];
                    }
                    let flat: usize = (0..ir).map(|k| o[axis + k] * idx_strides[k]).sum();
                    off += indices[flat] * st[axis];
                    for d in axis + 1..x.shape.len() {
                        off += o[d + ir - 1] * st[d];
                    }
                    off
                });
                return Ok(Lowered::Const(vec![Value {
                    shape: out,
                    dtype: x.dtype,
                    data,
                }]));
            }
            node(Op::Gather { axis, indices }, vec![ins.id(0)?], vec![out])
        }
        "MaxPool" | "AveragePool" => {
            if n.output.iter().skip(1).any(|o| !o.is_empty()) {
                return Err("MaxPool's Indices output is not supported".into());
            }
            let x = ins.t(0)?;
            if x.shape.len() != 4 {
                return Err(format!(
                    "only 2-D pooling (rank-4 input) is supported, got {:?}",
                    x.shape
                ));
            }
            let kernel = two(
                a.usizes("kernel_shape", "attribute")?
                    .ok_or("missing kernel_shape")?,
                "kernel_shape",
            )?;
            let strides = pair(&a, "strides", 1)?;
            let dilations = pair(&a, "dilations", 1)?;
            let ceil = a.i("ceil_mode").unwrap_or(0) != 0;
            let pads = resolve_pads(&a, [x.shape[2], x.shape[3]], kernel, strides, dilations)?;
            let oh = pool_out_extent(
                x.shape[2],
                kernel[0],
                strides[0],
                dilations[0],
                pads[0],
                pads[2],
                ceil,
            )
            .ok_or("window larger than the padded input")?;
            let ow = pool_out_extent(
                x.shape[3],
                kernel[1],
                strides[1],
                dilations[1],
                pads[1],
                pads[3],
                ceil,
            )
            .ok_or("window larger than the padded input")?;
            let kind = if op_type == "MaxPool" {
                PoolKind::Max
            } else {
                PoolKind::Average {
                    count_include_pad: a.i("count_include_pad").unwrap_or(0) != 0,
                }
            };
            node(
                Op::Pool(PoolAttrs {
                    kind,
                    kernel,
                    strides,
                    dilations,
                    pads,
                }),
                vec![ins.id(0)?],
                vec![vec![x.shape[0], x.shape[1], oh, ow]],
            )
        }
        "GlobalAveragePool" => {
            let x = ins.t(0)?;
            if x.shape.len() < 3 {
                return Err(format!("input rank {} < 3", x.shape.len()));
            }
            let mut out = x.shape.clone();
            out[2..].iter_mut().for_each(|d| *d = 1);
            node(Op::GlobalAveragePool, vec![ins.id(0)?], vec![out])
        }
        "ReduceMean" => {
            let x = ins.t(0)?;
            let rank = x.shape.len();
            let axes = if opset >= 18 {
                ins.opt_i64s(1)?
            } else {
                a.ints("axes")
            };
            let keep = a.i("keepdims").unwrap_or(1) != 0;
            let axes: Vec<usize> = match axes {
                Some(v) if !v.is_empty() => {
                    v.iter().map(|&ax| norm_axis(ax, rank)).collect::<R<_>>()?
                }
                _ if a.i("noop_with_empty_axes").unwrap_or(0) != 0 => {
                    return view_or_fold(&ins, x.shape.clone());
                }
                _ => (0..rank).collect(),
            };
            if rank > osprey_kernels::eltwise::MAX_RANK {
                return Err(format!("rank {rank} too large"));
            }
            let out: Vec<usize> = (0..rank)
                .filter_map(|d| {
                    if axes.contains(&d) {
                        keep.then_some(1)
                    } else {
                        Some(x.shape[d])
                    }
                })
                .collect();
            node(Op::ReduceMean { axes }, vec![ins.id(0)?], vec![out])
        }
        "Resize" | "Upsample" => lower_resize(&a, &ins, op_type, opset),
        "Gemm" => {
            let (x, w) = (ins.t(0)?, ins.t(1)?);
            let trans_a = a.i("transA").unwrap_or(0) != 0;
            let trans_b = a.i("transB").unwrap_or(0) != 0;
            if x.shape.len() != 2 || w.shape.len() != 2 {
                return Err(format!(
                    "Gemm needs 2-D operands, got {:?} and {:?}",
                    x.shape, w.shape
                ));
            }
            if !w.is_const() {
                return Err("Gemm with a runtime B operand is not supported".into());
            }
            let (m, k) = if trans_a {
                (x.shape[1], x.shape[0])
            } else {
                (x.shape[0], x.shape[1])
            };
            let (kb, nn) = if trans_b {
                (w.shape[1], w.shape[0])
            } else {
                (w.shape[0], w.shape[1])
            };
            if k != kb {
                return Err(format!(
                    "inner dimensions differ: {:?} x {:?}",
                    x.shape, w.shape
                ));
            }
            let mut inputs = vec![ins.id(0)?, ins.id(1)?];
            if let Some(c) = ins.opt(2) {
                if !c.is_const() {
                    return Err("Gemm with a runtime C operand is not supported".into());
                }
                if broadcast_shape(&c.shape, &[m, nn]).as_deref() != Some(&[m, nn][..]) {
                    return Err(format!(
                        "C of shape {:?} does not broadcast to [{m}, {nn}]",
                        c.shape
                    ));
                }
                inputs.push(ins.id(2)?);
            }
            node(
                Op::Gemm {
                    alpha: a.f("alpha").unwrap_or(1.0),
                    beta: a.f("beta").unwrap_or(1.0),
                    trans_a,
                    trans_b,
                    int8_input_scale: None,
                },
                inputs,
                vec![vec![m, nn]],
            )
        }
        "MatMul" => {
            let (x, y) = (ins.t(0)?, ins.t(1)?);
            if x.shape.is_empty() || y.shape.is_empty() {
                return Err("MatMul of a scalar".into());
            }
            let xs = if x.shape.len() == 1 {
                vec![1, x.shape[0]]
            } else {
                x.shape.clone()
            };
            let ys = if y.shape.len() == 1 {
                vec![y.shape[0], 1]
            } else {
                y.shape.clone()
            };
            let (m, k) = (xs[xs.len() - 2], xs[xs.len() - 1]);
            let (kb, nn) = (ys[ys.len() - 2], ys[ys.len() - 1]);
            if k != kb {
                return Err(format!(
                    "inner dimensions differ: {:?} x {:?}",
                    x.shape, y.shape
                ));
            }
            let batch =
                broadcast_shape(&xs[..xs.len() - 2], &ys[..ys.len() - 2]).ok_or_else(|| {
                    format!(
                        "batch dims of {:?} and {:?} do not broadcast",
                        x.shape, y.shape
                    )
                })?;
            let mut out = batch;
            if x.shape.len() > 1 {
                out.push(m);
            }
            if y.shape.len() > 1 {
                out.push(nn);
            }
            let both_2d = x.shape.len() == 2 && y.shape.len() == 2;
            if !y.is_const() && !both_2d {
                return Err("batched MatMul with two runtime operands is not supported".into());
            }
            node(Op::MatMul, vec![ins.id(0)?, ins.id(1)?], vec![out])
        }
        "Softmax" => {
            let x = ins.t(0)?;
            let default = if opset >= 13 { -1 } else { 1 };
            let axis = norm_axis(a.i("axis").unwrap_or(default), x.shape.len())?;
            node(
                Op::Softmax {
                    axis,
                    legacy: opset < 13,
                },
                vec![ins.id(0)?],
                vec![x.shape.clone()],
            )
        }
        "Pad" => {
            let x = ins.t(0)?;
            let rank = x.shape.len();
            let mode_s = a.s("mode").unwrap_or_else(|| "constant".into());
            let (pads, value, axes) = if opset >= 11 {
                let p = ins.opt_i64s(1)?.ok_or("missing pads")?;
                let v = ins
                    .opt_f32s(2)?
                    .and_then(|v| v.first().copied())
                    .unwrap_or(0.0);
                (p, v, ins.opt_i64s(3)?)
            } else {
                (
                    a.ints("pads").ok_or("missing pads")?,
                    a.f("value").unwrap_or(0.0),
                    None,
                )
            };
            let axes: Vec<usize> = match axes {
                Some(v) => v.iter().map(|&ax| norm_axis(ax, rank)).collect::<R<_>>()?,
                None => (0..rank).collect(),
            };
            if pads.len() != 2 * axes.len() {
                return Err(format!("{} pads for {} axes", pads.len(), axes.len()));
            }
            let mut begin = vec![0usize; rank];
            let mut end = vec![0usize; rank];
            for (k, &d) in axes.iter().enumerate() {
                let (b, e) = (pads[k], pads[k + axes.len()]);
                if b < 0 || e < 0 {
                    return Err("negative pads (cropping) are not supported".into());
                }
                begin[d] = b as usize;
                end[d] = e as usize;
            }
            let mode = match mode_s.as_str() {
                "constant" => PadMode::Constant(value),
                "reflect" => {
                    if axes
                        .iter()
                        .any(|&d| begin[d].max(end[d]) >= x.shape[d] && x.shape[d] > 1)
                    {
                        return Err("reflect padding wider than the input".into());
                    }
                    PadMode::Reflect
                }
                "edge" => PadMode::Edge,
                other => return Err(format!("pad mode '{other}' is not supported")),
            };
            if rank > osprey_kernels::eltwise::MAX_RANK {
                return Err(format!("rank {rank} too large"));
            }
            let out: Vec<usize> = (0..rank).map(|d| x.shape[d] + begin[d] + end[d]).collect();
            node(Op::Pad { mode, begin, end }, vec![ins.id(0)?], vec![out])
        }
        other => Err(format!("op '{other}' is not supported")),
    }
}
