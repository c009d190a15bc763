//! Running one prepared step on the arena: split borrows (the output is
//! writable, every other live tensor readable) and the kernel calls.

use osprey_kernels::activation::Activation;
use osprey_kernels::conv_nhwc::DwOut;
use osprey_kernels::eltwise;
use osprey_kernels::gemm::{self, Epilogue, MatRef};
use osprey_kernels::layout;
use osprey_kernels::pooling;
use osprey_kernels::qconv::{QIn, QOut};
use osprey_kernels::softmax;
use osprey_kernels::ThreadPool;

use super::{Kind, Operand, QLayer, Step};
use crate::error::{EngineError, Result};

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

/// Operand `k` of `step`.
fn operand(step: &Step, k: usize) -> Result<Operand> {
    step.ins
        .get(k)
        .copied()
        .ok_or_else(|| EngineError::model("missing operand"))
}

/// A fused pair ([`crate::fuse`]): `first` (a channels-last expansion,
/// FP32 or INT8) and `second` (its FP32 depthwise reader) as one kernel call that reads
/// `first`'s input and writes `second`'s output; `first`'s output is never
/// written.
pub(super) fn run_fused(
    first: &Step,
    second: &Step,
    arena: &mut [f32],
    consts: &[Vec<f32>],
    scratch: &mut [f32],
    pool: &ThreadPool,
) -> Result<()> {
    let Kind::ConvNhwc {
        layer: d,
        batch,
        residual: fused,
        out_scale,
        ..
    } = &second.kind
    else {
        return Err(EngineError::model(
            "internal: a fused step whose second is not a channels-last convolution",
        ));
    };
    let out = *second
        .outs
        .first()
        .ok_or_else(|| EngineError::model("step without output"))?;
    let (io, y) = split_io(arena, out, consts)?;
    let x = io.read(operand(first, 0)?)?;
    let residual = if *fused {
        Some(io.read(operand(second, 3)?)?)
    } else {
        None
    };
    let output = match out_scale {
        // INT8 tensors sit in the f32 arena four to a slot.
        Some(s) => DwOut::I8(bytemuck::cast_slice_mut(y), *s),
        None => DwOut::F32(y),
    };
    match &first.kind {
        Kind::ConvNhwc { layer: e, .. } => {
            e.run_expand_depthwise(d, pool, *batch, x, residual, output, scratch)
        }
        Kind::QConv {
            layer: QLayer::Nhwc(e),
            in_i8,
            ..
        } => {
            // INT8 tensors sit in the f32 arena four to a slot.
            let input = if *in_i8 {
                QIn::I8(bytemuck::cast_slice(x))
            } else {
                QIn::F32(x)
            };
            e.run_expand_depthwise(d, pool, *batch, input, residual, output, scratch)
        }
        _ => {
            return Err(EngineError::model(
                "internal: a fused step whose first is not a channels-last expansion",
            ))
        }
    }
    Ok(())
}

pub(super) fn run_step(
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
    let input = |k: usize| operand(step, k);
    if let Kind::Copy(parts) = &step.kind {
        for p in parts {
            let out = *step
                .outs
                .get(p.output)
                .ok_or_else(|| EngineError::model("copy output"))?;
            let (io, dst) = split_io(arena, out, consts)?;
            let src = io.read(input(p.input)?)?;
            layout::copy_strided_parallel(pool, &p.shape, src, &p.src, dst, &p.dst, p.clamp);
        }
        return Ok(());
    }
    let (io, y) = split_io(arena, first_out, consts)?;
    let x = io.read(input(0)?)?;
    // A fused convolution's residual is its 4th operand.
    let residual =
        |fused: bool| -> Result<Option<&[f32]>> { fused.then(|| io.read(input(3)?)).transpose() };
    match &step.kind {
        Kind::Conv {
            layer,
            batch,
            residual: fused,
        } => layer.run_with_residual(pool, *batch, x, residual(*fused)?, y, scratch),
        Kind::ConvNhwc {
            layer,
            batch,
            residual: fused,
            in_i8,
            out_scale,
        } => {
            // INT8 tensors sit in the f32 arena four to a slot.
            let x8 = || -> &[i8] { bytemuck::cast_slice(x) };
            let res = residual(*fused)?;
            match (out_scale, in_i8) {
                (Some(s), false) => {
                    let y8 = bytemuck::cast_slice_mut(y);
                    layer.run_to_i8(pool, *batch, x, res, y8, *s, scratch)
                }
                (Some(s), true) => {
                    let y8 = bytemuck::cast_slice_mut(y);
                    layer.run_to_i8(pool, *batch, x8(), res, y8, *s, scratch)
                }
                (None, false) => layer.run(pool, *batch, x, res, y),
                (None, true) => layer.run_from_i8(pool, *batch, x8(), res, y),
            }
        }
        Kind::QConv {
            layer,
            batch,
            residual: fused,
            in_i8,
            out_scale,
        } => {
            // INT8 tensors sit in the f32 arena four to a slot.
            let input = if *in_i8 {
                QIn::I8(bytemuck::cast_slice(x))
            } else {
                QIn::F32(x)
            };
            let output = match out_scale {
                Some(s) => QOut::I8(bytemuck::cast_slice_mut(y), *s),
                None => QOut::F32(y),
            };
            layer.run_io(pool, *batch, input, residual(*fused)?, output, scratch)
        }
        Kind::QGemm { layer, m } => layer.run(pool, *m, x, y, scratch),
        Kind::ConvTranspose { layer, batch } => layer.run(pool, *batch, x, y, scratch),
        Kind::Affine {
            batch,
            channels,
            plane,
            scale,
            shift,
        } => eltwise::channel_affine(pool, *batch, *channels, *plane, scale, shift, x, y),
        Kind::Unary(act) => act.apply_parallel(pool, x, y),
        Kind::Binary(op, plan, out_scale) => {
            let b = io.read(input(1)?)?;
            match out_scale {
                // INT8 tensors sit in the f32 arena four to a slot.
                Some(s) => {
                    let y8 = bytemuck::cast_slice_mut(y);
                    eltwise::binary_to_i8(pool, *op, plan, x, b, y8, *s)
                }
                None => eltwise::binary(pool, *op, plan, x, b, y),
            }
        }
        Kind::Pool(g, kind) => pooling::pool2d(pool, g, *kind, x, y),
        Kind::GlobalAverage { planes, len } => pooling::global_average(pool, *planes, *len, x, y),
        Kind::ReduceMean { shape, reduce } => {
            pooling::reduce_mean_parallel(pool, shape, reduce, x, y)
        }
        Kind::Resize(r) => r.run(pool, x, y),
        Kind::ResizeNhwc(r, c) => r.run_channels_last(pool, *c, x, y),
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
        Kind::Gemv { w, k, bias } => gemm::gemv(pool, w, *k, x, bias.as_deref(), y),
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
