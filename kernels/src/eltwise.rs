//! Broadcasting binary element-wise ops and the per-channel affine of batch norm.

use crate::error::KernelError;
use crate::pool::{Dst, SyncPtr, ThreadPool};

/// Highest rank a broadcast may have.
pub const MAX_RANK: usize = 8;

/// A binary element-wise operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum BinaryOp {
    /// a + b
    Add,
    /// a - b
    Sub,
    /// a * b
    Mul,
    /// a / b
    Div,
    /// a ^ b
    Pow,
    /// max(a, b)
    Max,
    /// min(a, b)
    Min,
}

impl BinaryOp {
    /// The scalar reference.
    #[inline(always)]
    pub fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Pow => a.powf(b),
            BinaryOp::Max => a.max(b),
            BinaryOp::Min => a.min(b),
        }
    }
}

/// Output shape of numpy-style broadcasting, or `None` if incompatible.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            a[i + a.len() - rank]
        } else {
            1
        };
        let db = if i + b.len() >= rank {
            b[i + b.len() - rank]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

/// A precomputed broadcast: output dims with both operands' strides,
/// coalesced so the innermost loop is as long as possible.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broadcast {
    dims: [usize; MAX_RANK],
    sa: [usize; MAX_RANK],
    sb: [usize; MAX_RANK],
    rank: usize,
    len: usize,
}

fn strides_for(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let rank = out.len();
    let mut s = vec![0; rank];
    let mut acc = 1;
    for i in (0..shape.len()).rev() {
        let oi = i + rank - shape.len();
        s[oi] = if shape[i] == 1 && out[oi] != 1 {
            0
        } else {
            acc
        };
        acc *= shape[i];
    }
    s
}

impl Broadcast {
    /// Plans `a ∘ b` for the given shapes.
    pub fn new(a: &[usize], b: &[usize]) -> Result<(Broadcast, Vec<usize>), KernelError> {
        let out = broadcast_shape(a, b).ok_or_else(|| KernelError::Unsupported {
            kernel: "broadcast",
            detail: format!("shapes {a:?} and {b:?} do not broadcast"),
        })?;
        if out.len() > MAX_RANK {
            return Err(KernelError::Unsupported {
                kernel: "broadcast",
                detail: format!("rank {} exceeds {MAX_RANK}", out.len()),
            });
        }
        let sa = strides_for(a, &out);
        let sb = strides_for(b, &out);
        // Drop unit dims, then merge neighbours that are contiguous for both.
        let mut dims = Vec::new();
        let mut ca = Vec::new();
        let mut cb = Vec::new();
        for i in 0..out.len() {
            if out[i] == 1 {
                continue;
            }
            if let (Some(&ld), Some(&la), Some(&lb)) = (dims.last(), ca.last(), cb.last()) {
                let _ = ld;
                if la == sa[i] * out[i] && lb == sb[i] * out[i] {
                    let n = dims.len();
                    dims[n - 1] *= out[i];
                    ca[n - 1] = sa[i];
                    cb[n - 1] = sb[i];
                    continue;
                }
            }
            dims.push(out[i]);
            ca.push(sa[i]);
            cb.push(sb[i]);
        }
        if dims.is_empty() {
            dims.push(1);
            ca.push(0);
            cb.push(0);
        }
        let mut plan = Broadcast {
            dims: [1; MAX_RANK],
            sa: [0; MAX_RANK],
            sb: [0; MAX_RANK],
            rank: dims.len(),
            len: out.iter().product(),
        };
        plan.dims[..dims.len()].copy_from_slice(&dims);
        plan.sa[..dims.len()].copy_from_slice(&ca);
        plan.sb[..dims.len()].copy_from_slice(&cb);
        Ok((plan, out))
    }

    /// Output elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the output is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// `y = a ∘ b` under a precomputed broadcast; parallel over outer rows.
pub fn binary(
    pool: &ThreadPool,
    op: BinaryOp,
    plan: &Broadcast,
    a: &[f32],
    b: &[f32],
    y: &mut [f32],
) {
    assert!(y.len() >= plan.len);
    binary_out(pool, op, plan, a, b, Dst::F32(SyncPtr::new(y)));
}

/// [`binary`] with an INT8 output: each value requantized with `scale`
/// as it is written ([`crate::int8::quantize_to_i8`], the rounding an
/// INT8 reader would apply to the f32 tensor), so an INT8 tensor passes
/// to INT8 readers (an SE gate's `Mul` feeding INT8 layers) without the
/// f32 tensor ever being written.
pub fn binary_to_i8(
    pool: &ThreadPool,
    op: BinaryOp,
    plan: &Broadcast,
    a: &[f32],
    b: &[f32],
    y: &mut [i8],
    scale: f32,
) {
    assert!(y.len() >= plan.len);
    binary_out(pool, op, plan, a, b, Dst::I8(SyncPtr::new(y), 1.0 / scale));
}

fn binary_out(pool: &ThreadPool, op: BinaryOp, plan: &Broadcast, a: &[f32], b: &[f32], y: Dst) {
    match op {
        BinaryOp::Add => binary_with(pool, plan, a, b, y, |x, z| x + z),
        BinaryOp::Sub => binary_with(pool, plan, a, b, y, |x, z| x - z),
        BinaryOp::Mul => binary_with(pool, plan, a, b, y, |x, z| x * z),
        BinaryOp::Div => binary_with(pool, plan, a, b, y, |x, z| x / z),
        BinaryOp::Pow => binary_with(pool, plan, a, b, y, f32::powf),
        BinaryOp::Max => binary_with(pool, plan, a, b, y, f32::max),
        BinaryOp::Min => binary_with(pool, plan, a, b, y, f32::min),
    }
}

/// Values an INT8 output computes at a time (on the stack) before
/// requantizing them.
const I8_RUN: usize = 256;

/// Elements `k..k + m` of a row operand (a 1-element operand broadcasts).
fn run(v: &[f32], k: usize, m: usize) -> &[f32] {
    if v.len() == 1 {
        &v[..1]
    } else {
        &v[k..k + m]
    }
}

/// Elements one task handles: large enough to amortise scheduling.
const SEG: usize = 32 * 1024;

/// The caller checked that `y` holds `plan.len` elements.
fn binary_with<F: Fn(f32, f32) -> f32 + Copy + Sync>(
    pool: &ThreadPool,
    plan: &Broadcast,
    a: &[f32],
    b: &[f32],
    y: Dst,
    f: F,
) {
    if plan.len == 0 {
        return;
    }
    let r = plan.rank;
    let inner = plan.dims[r - 1];
    let outer = plan.len / inner;
    // Tasks cover whole rows when rows are short, row segments when long.
    let segs = inner.div_ceil(SEG);
    let rows_per_task = if segs > 1 {
        1
    } else {
        (SEG / inner.max(1)).max(1)
    };
    let tasks = if segs > 1 {
        outer * segs
    } else {
        outer.div_ceil(rows_per_task)
    };
    let isa = crate::isa::active();
    let task = |t: usize, _slot: usize| {
        let (rows, lo, hi) = if segs > 1 {
            let (o, s) = (t / segs, t % segs);
            (o..o + 1, s * SEG, ((s + 1) * SEG).min(inner))
        } else {
            (
                t * rows_per_task..((t + 1) * rows_per_task).min(outer),
                0,
                inner,
            )
        };
        for o in rows {
            let (mut oa, mut ob) = (0, 0);
            let mut rest = o;
            for d in (0..r - 1).rev() {
                let i = rest % plan.dims[d];
                rest /= plan.dims[d];
                oa += i * plan.sa[d];
                ob += i * plan.sb[d];
            }
            let (sa, sb) = (plan.sa[r - 1], plan.sb[r - 1]);
            let a_row = if sa == 0 {
                &a[oa..oa + 1]
            } else {
                &a[oa + lo..oa + hi]
            };
            let b_row = if sb == 0 {
                &b[ob..ob + 1]
            } else {
                &b[ob + lo..ob + hi]
            };
            match y {
                Dst::F32(p) => {
                    // SAFETY: tasks write disjoint (row, segment) ranges
                    // of y, which holds plan.len elements.
                    let yr =
                        unsafe { std::slice::from_raw_parts_mut(p.add(o * inner + lo), hi - lo) };
                    row_op(isa, yr, a_row, b_row, f);
                }
                Dst::I8(p, inv) => {
                    // SAFETY: as above.
                    let yr =
                        unsafe { std::slice::from_raw_parts_mut(p.add(o * inner + lo), hi - lo) };
                    let mut buf = [0f32; I8_RUN];
                    for (i, yq) in yr.chunks_mut(I8_RUN).enumerate() {
                        let (k, m) = (i * I8_RUN, yq.len());
                        row_op(isa, &mut buf[..m], run(a_row, k, m), run(b_row, k, m), f);
                        crate::int8::quantize_to_i8(isa, &buf[..m], inv, yq);
                    }
                }
            }
        }
    };
    if tasks == 1 {
        task(0, 0);
    } else {
        pool.run(tasks, &task);
    }
}

/// One output row segment; a 1-element operand is broadcast.
#[inline(always)]
fn row_op<F: Fn(f32, f32) -> f32 + Copy>(
    isa: crate::isa::Isa,
    y: &mut [f32],
    a: &[f32],
    b: &[f32],
    f: F,
) {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: AVX2 and FMA are available on the AVX2 tiers.
        unsafe { row_op_avx2(y, a, b, f) };
        return;
    }
    let _ = isa;
    row_op_body(y, a, b, f)
}

/// # Safety
/// AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_op_avx2<F: Fn(f32, f32) -> f32 + Copy>(y: &mut [f32], a: &[f32], b: &[f32], f: F) {
    row_op_body(y, a, b, f)
}

#[inline(always)]
fn row_op_body<F: Fn(f32, f32) -> f32 + Copy>(y: &mut [f32], a: &[f32], b: &[f32], f: F) {
    let n = y.len();
    match (a.len() == 1 && n > 1, b.len() == 1 && n > 1) {
        (true, true) => {
            let v = f(a[0], b[0]);
            y.iter_mut().for_each(|e| *e = v);
        }
        (true, false) => {
            let av = a[0];
            y.iter_mut()
                .zip(&b[..n])
                .for_each(|(e, bv)| *e = f(av, *bv));
        }
        (false, true) => {
            let bv = b[0];
            y.iter_mut()
                .zip(&a[..n])
                .for_each(|(e, av)| *e = f(*av, bv));
        }
        (false, false) => y
            .iter_mut()
            .zip(a[..n].iter().zip(&b[..n]))
            .for_each(|(e, (av, bv))| *e = f(*av, *bv)),
    }
}

/// `y[n, c, i] = x[n, c, i] * scale[c] + shift[c]` over `[batch, channels, plane]`.
#[allow(clippy::too_many_arguments)]
pub fn channel_affine(
    pool: &ThreadPool,
    batch: usize,
    channels: usize,
    plane: usize,
    scale: &[f32],
    shift: &[f32],
    x: &[f32],
    y: &mut [f32],
) {
    let planes = batch * channels;
    assert!(x.len() >= planes * plane && y.len() >= planes * plane);
    assert!(scale.len() >= channels && shift.len() >= channels);
    let y_ptr = SyncPtr::new(y);
    let per_task = (32 * 1024 / plane.max(1)).max(1);
    let task = |t: usize, _slot: usize| {
        for p in t * per_task..((t + 1) * per_task).min(planes) {
            let c = p % channels;
            let (s, h) = (scale[c], shift[c]);
            // SAFETY: each plane is written by one task.
            let yr = unsafe { std::slice::from_raw_parts_mut(y_ptr.add(p * plane), plane) };
            yr.iter_mut()
                .zip(&x[p * plane..(p + 1) * plane])
                .for_each(|(v, xv)| *v = xv * s + h);
        }
    };
    pool.run(planes.div_ceil(per_task), &task);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn index(shape: &[usize], out: &[usize], flat: usize) -> usize {
        // Map an output flat index to the (broadcast) input flat index.
        let mut rem = flat;
        let mut coord = vec![0; out.len()];
        for d in (0..out.len()).rev() {
            coord[d] = rem % out[d];
            rem /= out[d];
        }
        let mut idx = 0;
        for (i, &s) in shape.iter().enumerate() {
            let c = coord[i + out.len() - shape.len()];
            idx = idx * s + if s == 1 { 0 } else { c };
        }
        idx
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn broadcast_matches_naive(
            dims in proptest::collection::vec(1usize..5, 1..5),
            mask_a in 0u8..16, mask_b in 0u8..16, drop_a in 0usize..3, op_i in 0usize..5,
        ) {
            let a_shape: Vec<usize> = dims.iter().enumerate().map(|(i, &d)| if mask_a & (1 << i) != 0 { 1 } else { d }).collect();
            let a_shape = a_shape[drop_a.min(a_shape.len() - 1)..].to_vec();
            let b_shape: Vec<usize> = dims.iter().enumerate().map(|(i, &d)| if mask_b & (1 << i) != 0 { 1 } else { d }).collect();
            let op = [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max][op_i];
            let a: Vec<f32> = (0..a_shape.iter().product::<usize>()).map(|i| i as f32 + 1.0).collect();
            let b: Vec<f32> = (0..b_shape.iter().product::<usize>()).map(|i| i as f32 * 0.5 + 2.0).collect();
            let (plan, out) = Broadcast::new(&a_shape, &b_shape).unwrap();
            let mut y = vec![0.0; plan.len()];
            binary(&ThreadPool::new(2), op, &plan, &a, &b, &mut y);
            for (i, v) in y.iter().enumerate() {
                let want = op.apply(a[index(&a_shape, &out, i)], b[index(&b_shape, &out, i)]);
                prop_assert_eq!(*v, want);
            }
        }
    }

    #[test]
    fn long_rows_are_split_across_tasks() {
        // Rows longer than one task's segment, with and without broadcasting.
        let n = 3 * SEG + 17;
        let a: Vec<f32> = (0..2 * n).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
        let (plan, out) = Broadcast::new(&[2, n], &[1, n]).unwrap();
        assert_eq!(out, vec![2, n]);
        let mut y = vec![0.0; 2 * n];
        binary(&ThreadPool::new(3), BinaryOp::Sub, &plan, &a, &b, &mut y);
        for i in 0..2 * n {
            assert_eq!(y[i], a[i] - b[i % n]);
        }
        let (plan, _) = Broadcast::new(&[2, n], &[2, n]).unwrap();
        binary(&ThreadPool::new(2), BinaryOp::Mul, &plan, &a, &a, &mut y);
        assert!(y.iter().zip(&a).all(|(v, x)| *v == x * x));
    }

    /// The INT8 output is the f32 output requantized, bit for bit: an SE
    /// gate's channels-last Mul (`[1, h, w, c] * [1, 1, 1, c]`, rows of
    /// `c` that are several requantized runs and a partial one), a
    /// scalar broadcast, and rows longer than a task's segment; values
    /// that saturate included.
    #[test]
    fn int8_output_is_the_f32_output_requantized() {
        let data = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + seed * 104_729) % 2001) as f32 - 1000.0) / 97.0)
                .collect()
        };
        let cases: [(&[usize], &[usize]); 4] = [
            (&[1, 9, 7, 600], &[1, 1, 1, 600]),
            (&[1, 5, 5, 24], &[1, 1, 1, 24]),
            (&[3, 40_000], &[1]),
            (&[2, 70_001], &[2, 70_001]),
        ];
        for (sa, sb) in cases {
            let (plan, out) = Broadcast::new(sa, sb).unwrap();
            let a = data(sa.iter().product(), 1);
            let b = data(sb.iter().product(), 2);
            let n: usize = out.iter().product();
            for threads in [1, 3] {
                let pool = ThreadPool::new(threads);
                for op in [BinaryOp::Mul, BinaryOp::Add] {
                    let mut y = vec![0.0; n];
                    binary(&pool, op, &plan, &a, &b, &mut y);
                    let scale = 0.05;
                    let mut want = vec![0i8; n];
                    crate::int8::quantize_to_i8(crate::isa::active(), &y, 1.0 / scale, &mut want);
                    let mut got = vec![7i8; n];
                    binary_to_i8(&pool, op, &plan, &a, &b, &mut got, scale);
                    assert_eq!(got, want, "{sa:?} {op:?} {sb:?}, {threads} threads");
                    assert!(want.iter().any(|&v| v.abs() == 127), "saturates");
                }
            }
        }
    }

    #[test]
    fn incompatible_shapes_are_an_error() {
        assert!(Broadcast::new(&[2, 3], &[4, 3]).is_err());
        assert_eq!(
            broadcast_shape(&[1, 3, 1, 1], &[2, 3, 4, 5]),
            Some(vec![2, 3, 4, 5])
        );
    }

    #[test]
    fn affine_per_channel() {
        let x = vec![1.0; 2 * 3 * 4];
        let mut y = vec![0.0; 24];
        channel_affine(
            &ThreadPool::new(2),
            2,
            3,
            4,
            &[1.0, 2.0, 3.0],
            &[0.5, 0.0, -1.0],
            &x,
            &mut y,
        );
        assert_eq!(
            &y[..12],
            &[1.5, 1.5, 1.5, 1.5, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
        );
        assert_eq!(y[12], 1.5);
    }
}
