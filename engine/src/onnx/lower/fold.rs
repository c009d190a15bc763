//! Constant nodes, constant folding of unary ops, and the shape arithmetic
//! of Reshape, Concat and Slice on constants.

use osprey_kernels::activation::Activation;

use super::super::consts::{remap, strides, Value};
use super::{node, Attrs, Ins, Lowered, R};
use crate::ir::{ConstData, DType, Op, Tensor};
use crate::onnx::consts::decode_tensor;

pub(super) fn lower_constant(a: &Attrs<'_>) -> R<Lowered> {
    let v = if let Some(t) = a.t("value") {
        decode_tensor(t)?
    } else if let Some(f) = a.f("value_float") {
        Value {
            shape: vec![],
            dtype: DType::F32,
            data: ConstData::F32(vec![f]),
        }
    } else if let Some(fs) = a.floats("value_floats").filter(|v| !v.is_empty()) {
        Value {
            shape: vec![fs.len()],
            dtype: DType::F32,
            data: ConstData::F32(fs),
        }
    } else if let Some(i) = a.i("value_int") {
        Value {
            shape: vec![],
            dtype: DType::I64,
            data: ConstData::I64(vec![i]),
        }
    } else if let Some(is) = a.ints("value_ints").filter(|v| !v.is_empty()) {
        Value {
            shape: vec![is.len()],
            dtype: DType::I64,
            data: ConstData::I64(is),
        }
    } else {
        return Err("Constant without a supported value attribute".into());
    };
    Ok(Lowered::Const(vec![v]))
}

pub(super) fn lower_unary(ins: &Ins<'_>, act: Activation) -> R<Lowered> {
    let x = ins.t(0)?;
    if let Some(v) = &x.value {
        let data: Vec<f32> = v.to_f32().into_iter().map(|e| act.apply(e)).collect();
        return Ok(Lowered::Const(vec![Value {
            shape: x.shape.clone(),
            dtype: DType::F32,
            data: ConstData::F32(data),
        }]));
    }
    node(Op::Unary(act), vec![ins.id(0)?], vec![x.shape.clone()])
}

pub(super) fn reshape_target(input: &[usize], target: &[i64], allow_zero: bool) -> R<Vec<usize>> {
    let total: usize = input.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            -1 => {
                if infer.replace(i).is_some() {
                    return Err("more than one -1 in reshape target".into());
                }
                out.push(1);
            }
            0 if !allow_zero => out.push(
                *input
                    .get(i)
                    .ok_or("0 in reshape target beyond the input rank")?,
            ),
            t if t >= 0 => out.push(t as usize),
            t => return Err(format!("invalid reshape dimension {t}")),
        }
    }
    if let Some(i) = infer {
        let known: usize = out.iter().product();
        if known == 0 || !total.is_multiple_of(known) {
            return Err(format!("cannot reshape {input:?} to {target:?}"));
        }
        out[i] = total / known;
    }
    if out.iter().product::<usize>() != total {
        return Err(format!(
            "cannot reshape {input:?} ({total} elements) to {target:?}"
        ));
    }
    Ok(out)
}

pub(super) fn fold_concat(parts: &[&Tensor], axis: usize, out: Vec<usize>) -> R<Value> {
    let outer: usize = out[..axis].iter().product();
    let inner: usize = out[axis + 1..].iter().product();
    let any_f32 = parts.iter().any(|p| p.dtype == DType::F32);
    let dtype = if any_f32 { DType::F32 } else { parts[0].dtype };
    let mut f = Vec::new();
    let mut i = Vec::new();
    for o in 0..outer {
        for p in parts {
            let span = p.shape[axis] * inner;
            let v = p.value.as_ref().ok_or("non-constant part")?;
            match v {
                ConstData::F32(d) => f.extend_from_slice(&d[o * span..(o + 1) * span]),
                ConstData::I64(d) if any_f32 => {
                    f.extend(d[o * span..(o + 1) * span].iter().map(|&x| x as f32))
                }
                ConstData::I64(d) => i.extend_from_slice(&d[o * span..(o + 1) * span]),
            }
        }
    }
    let data = if any_f32 {
        ConstData::F32(f)
    } else {
        ConstData::I64(i)
    };
    Ok(Value {
        shape: out,
        dtype,
        data,
    })
}

pub(super) fn fold_slice(
    v: &ConstData,
    dtype: DType,
    shape: &[usize],
    first: &[usize],
    step: &[isize],
    out: Vec<usize>,
) -> Value {
    let st = strides(shape);
    let data = remap(v, &out, |idx| {
        idx.iter()
            .enumerate()
            .map(|(d, &i)| ((first[d] as isize + i as isize * step[d]) as usize) * st[d])
            .sum()
    });
    Value {
        shape: out,
        dtype,
        data,
    }
}
