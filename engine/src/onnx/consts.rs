//! Constant tensors: decoding `TensorProto`s and the small shape-arithmetic
//! evaluator used to fold constant subgraphs at import.

use super::proto::{tensor_proto::DataType, TensorProto};
use crate::ir::{ConstData, DType};
use crate::npy::f16_to_f32;

/// A constant value during import.
#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub data: ConstData,
}

/// Maps an ONNX element type to the IR's, or names it if unsupported.
pub fn onnx_dtype(dt: i32) -> Result<DType, String> {
    match DataType::try_from(dt) {
        Ok(DataType::Float)
        | Ok(DataType::Float16)
        | Ok(DataType::Double)
        | Ok(DataType::Bfloat16) => Ok(DType::F32),
        Ok(DataType::Int64) | Ok(DataType::Uint32) | Ok(DataType::Uint64) => Ok(DType::I64),
        Ok(DataType::Int32) | Ok(DataType::Int16) | Ok(DataType::Int8) | Ok(DataType::Uint8)
        | Ok(DataType::Uint16) => Ok(DType::I32),
        Ok(DataType::Bool) => Ok(DType::Bool),
        Ok(other) => Err(format!("{other:?}")),
        Err(_) => Err(format!("unknown type {dt}")),
    }
}

fn le_chunks<const N: usize>(raw: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    raw.chunks_exact(N).map(|c| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        a
    })
}

/// Decodes a tensor's data (raw or typed fields) into a [`Value`].
pub fn decode_tensor(t: &TensorProto) -> Result<Value, String> {
    if t.data_location == Some(1) || !t.external_data.is_empty() {
        return Err(
            "external tensor data is not supported; save the model with all tensors inside".into(),
        );
    }
    let dt = t.data_type.unwrap_or(0);
    let dtype = onnx_dtype(dt)?;
    let mut shape = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        if d < 0 {
            return Err(format!("negative dimension {d}"));
        }
        shape.push(d as usize);
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("shape overflows")?;
    let kind = DataType::try_from(dt).map_err(|_| format!("unknown type {dt}"))?;
    let data = if let Some(raw) = t.raw_data.as_ref().filter(|r| !r.is_empty()) {
        let width = match kind {
            DataType::Float | DataType::Int32 | DataType::Uint32 => 4,
            DataType::Double | DataType::Int64 | DataType::Uint64 => 8,
            DataType::Float16 | DataType::Bfloat16 | DataType::Int16 | DataType::Uint16 => 2,
            _ => 1,
        };
        if raw.len() != numel.checked_mul(width).ok_or("shape overflows")? {
            return Err(format!(
                "raw data has {} bytes, shape {:?} of {:?} needs {}",
                raw.len(),
                shape,
                kind,
                numel * width
            ));
        }
        match kind {
            DataType::Float => {
                ConstData::F32(le_chunks::<4>(raw).map(f32::from_le_bytes).collect())
            }
            DataType::Double => ConstData::F32(
                le_chunks::<8>(raw)
                    .map(|b| f64::from_le_bytes(b) as f32)
                    .collect(),
            ),
            DataType::Float16 => ConstData::F32(
                le_chunks::<2>(raw)
                    .map(|b| f16_to_f32(u16::from_le_bytes(b)))
                    .collect(),
            ),
            DataType::Bfloat16 => ConstData::F32(
                le_chunks::<2>(raw)
                    .map(|b| f32::from_bits((u16::from_le_bytes(b) as u32) << 16))
                    .collect(),
            ),
            DataType::Int64 => {
                ConstData::I64(le_chunks::<8>(raw).map(i64::from_le_bytes).collect())
            }
            DataType::Uint64 => ConstData::I64(
                le_chunks::<8>(raw)
                    .map(|b| u64::from_le_bytes(b) as i64)
                    .collect(),
            ),
            DataType::Int32 => ConstData::I64(
                le_chunks::<4>(raw)
                    .map(|b| i32::from_le_bytes(b) as i64)
                    .collect(),
            ),
            DataType::Uint32 => ConstData::I64(
                le_chunks::<4>(raw)
                    .map(|b| u32::from_le_bytes(b) as i64)
                    .collect(),
            ),
            DataType::Int16 => ConstData::I64(
                le_chunks::<2>(raw)
                    .map(|b| i16::from_le_bytes(b) as i64)
                    .collect(),
            ),
            DataType::Uint16 => ConstData::I64(
                le_chunks::<2>(raw)
                    .map(|b| u16::from_le_bytes(b) as i64)
                    .collect(),
            ),
            DataType::Int8 => ConstData::I64(raw.iter().map(|&b| b as i8 as i64).collect()),
            _ => ConstData::I64(raw.iter().map(|&b| b as i64).collect()),
        }
    } else {
        let d = match kind {
            DataType::Float => ConstData::F32(t.float_data.clone()),
            DataType::Double => ConstData::F32(t.double_data.iter().map(|&v| v as f32).collect()),
            DataType::Float16 => {
                ConstData::F32(t.int32_data.iter().map(|&v| f16_to_f32(v as u16)).collect())
            }
            DataType::Bfloat16 => ConstData::F32(
                t.int32_data
                    .iter()
                    .map(|&v| f32::from_bits((v as u32 & 0xffff) << 16))
                    .collect(),
            ),
            DataType::Int64 => ConstData::I64(t.int64_data.clone()),
            DataType::Uint64 | DataType::Uint32 => {
                ConstData::I64(t.uint64_data.iter().map(|&v| v as i64).collect())
            }
            _ => ConstData::I64(t.int32_data.iter().map(|&v| v as i64).collect()),
        };
        if d.len() != numel {
            return Err(format!(
                "tensor holds {} values, shape {:?} needs {numel}",
                d.len(),
                shape
            ));
        }
        d
    };
    Ok(Value { shape, dtype, data })
}

/// Row-major strides.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Applies `f` to every element of a const, keeping its kind.
pub fn map_elems<T: Copy>(
    v: &[T],
    out_shape: &[usize],
    index: impl Fn(&[usize]) -> usize,
) -> Vec<T> {
    let n: usize = out_shape.iter().product();
    let mut idx = vec![0usize; out_shape.len()];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(v[index(&idx)]);
        for d in (0..out_shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < out_shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// Runs a per-element index mapping over either kind of const data.
pub fn remap(
    data: &ConstData,
    out_shape: &[usize],
    index: impl Fn(&[usize]) -> usize,
) -> ConstData {
    match data {
        ConstData::F32(v) => ConstData::F32(map_elems(v, out_shape, index)),
        ConstData::I64(v) => ConstData::I64(map_elems(v, out_shape, index)),
    }
}

/// Broadcasting binary op on constants.
pub fn binary(a: &Value, b: &Value, out_shape: &[usize], op: &str) -> Result<ConstData, String> {
    let sa = broadcast_strides(&a.shape, out_shape);
    let sb = broadcast_strides(&b.shape, out_shape);
    let ia = |idx: &[usize]| idx.iter().zip(&sa).map(|(i, s)| i * s).sum::<usize>();
    let ib = |idx: &[usize]| idx.iter().zip(&sb).map(|(i, s)| i * s).sum::<usize>();
    let n: usize = out_shape.iter().product();
    let mut idx = vec![0usize; out_shape.len()];
    let step = |idx: &mut Vec<usize>| {
        for d in (0..out_shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < out_shape[d] {
                break;
            }
            idx[d] = 0;
        }
    };
    match (&a.data, &b.data) {
        (ConstData::I64(x), ConstData::I64(y)) => {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let (p, q) = (x[ia(&idx)], y[ib(&idx)]);
                out.push(match op {
                    "Add" => p.wrapping_add(q),
                    "Sub" => p.wrapping_sub(q),
                    "Mul" => p.wrapping_mul(q),
                    "Div" => {
                        if q == 0 {
                            return Err("integer division by zero in a constant".into());
                        }
                        p.wrapping_div(q) // truncates toward zero, as ONNX does
                    }
                    "Max" => p.max(q),
                    "Min" => p.min(q),
                    _ => return Err(format!("cannot fold integer {op}")),
                });
                step(&mut idx);
            }
            Ok(ConstData::I64(out))
        }
        _ => {
            let (x, y) = (a.data.to_f32(), b.data.to_f32());
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let (p, q) = (x[ia(&idx)], y[ib(&idx)]);
                out.push(match op {
                    "Add" => p + q,
                    "Sub" => p - q,
                    "Mul" => p * q,
                    "Div" => p / q,
                    "Pow" => p.powf(q),
                    "Max" => p.max(q),
                    "Min" => p.min(q),
                    _ => return Err(format!("cannot fold {op}")),
                });
                step(&mut idx);
            }
            Ok(ConstData::F32(out))
        }
    }
}

/// Strides of `shape` broadcast to `out` (0 on broadcast dims).
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let own = strides(shape);
    let off = out.len() - shape.len();
    (0..out.len())
        .map(|d| {
            if d < off || shape[d - off] == 1 {
                0
            } else {
                own[d - off]
            }
        })
        .collect()
}
