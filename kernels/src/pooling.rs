//! Pooling (NCHW) and mean reduction.

use crate::pool::{SyncPtr, ThreadPool};

/// Max or average.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum PoolKind {
    /// Maximum over the window (padding never wins).
    Max,
    /// Average over the window.
    Average {
        /// Count padded positions in the divisor.
        count_include_pad: bool,
    },
}

/// Geometry of a 2-D pooling window over `planes` planes of `h`×`w`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2dGeometry {
    /// Number of planes (batch × channels).
    pub planes: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
    /// Window (y, x).
    pub kernel: [usize; 2],
    /// Strides (y, x).
    pub stride: [usize; 2],
    /// Dilations (y, x).
    pub dilation: [usize; 2],
    /// Pads top, left, bottom, right.
    pub pads: [usize; 4],
}

/// Output extent for ONNX pooling (`ceil_mode` rounds up, but a window must
/// start inside the input or left padding).
pub fn pool_out_extent(
    input: usize,
    k: usize,
    stride: usize,
    dil: usize,
    pad_begin: usize,
    pad_end: usize,
    ceil_mode: bool,
) -> Option<usize> {
    let span = dil.checked_mul(k.checked_sub(1)?)? + 1;
    let padded = input + pad_begin + pad_end;
    if padded < span || stride == 0 {
        return None;
    }
    let num = padded - span;
    let mut out = if ceil_mode {
        num.div_ceil(stride) + 1
    } else {
        num / stride + 1
    };
    if ceil_mode && (out - 1) * stride >= input + pad_begin {
        out -= 1;
    }
    Some(out)
}

/// Pools every plane; parallel over planes.
pub fn pool2d(pool: &ThreadPool, g: &Pool2dGeometry, kind: PoolKind, x: &[f32], y: &mut [f32]) {
    assert!(x.len() >= g.planes * g.h * g.w && y.len() >= g.planes * g.oh * g.ow);
    let y_ptr = SyncPtr::new(y);
    let task = |p: usize, _slot: usize| {
        let xp = &x[p * g.h * g.w..(p + 1) * g.h * g.w];
        // SAFETY: each task writes only plane p.
        let yp = unsafe { std::slice::from_raw_parts_mut(y_ptr.add(p * g.oh * g.ow), g.oh * g.ow) };
        pool_plane(g, kind, xp, yp);
    };
    pool.run(g.planes, &task);
}

fn pool_plane(g: &Pool2dGeometry, kind: PoolKind, x: &[f32], y: &mut [f32]) {
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let mut acc = match kind {
                PoolKind::Max => f32::NEG_INFINITY,
                PoolKind::Average { .. } => 0.0,
            };
            let mut n = 0usize;
            let mut n_padded = 0usize;
            for ky in 0..g.kernel[0] {
                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pads[0] as isize;
                for kx in 0..g.kernel[1] {
                    let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.pads[1] as isize;
                    let inside_padded =
                        iy < (g.h + g.pads[2]) as isize && ix < (g.w + g.pads[3]) as isize;
                    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                        if inside_padded {
                            n_padded += 1;
                        }
                        continue;
                    }
                    let v = x[iy as usize * g.w + ix as usize];
                    match kind {
                        PoolKind::Max => acc = if v > acc || v.is_nan() { v } else { acc },
                        PoolKind::Average { .. } => acc += v,
                    }
                    n += 1;
                }
            }
            y[oy * g.ow + ox] = match kind {
                PoolKind::Max => acc,
                PoolKind::Average { count_include_pad } => {
                    let d = if count_include_pad { n + n_padded } else { n };
                    if d == 0 {
                        0.0
                    } else {
                        acc / d as f32
                    }
                }
            };
        }
    }
}

/// Mean of each of `planes` contiguous planes of `len` elements.
pub fn global_average(pool: &ThreadPool, planes: usize, len: usize, x: &[f32], y: &mut [f32]) {
    assert!(x.len() >= planes * len && y.len() >= planes);
    let y_ptr = SyncPtr::new(y);
    let chunk = planes.div_ceil(pool.threads() * 2).max(1);
    let task = |t: usize, _slot: usize| {
        for p in t * chunk..((t + 1) * chunk).min(planes) {
            let s: f32 = sum(&x[p * len..(p + 1) * len]);
            // SAFETY: each task writes its own planes' outputs.
            unsafe { *y_ptr.add(p) = s / len as f32 };
        }
    };
    pool.run(planes.div_ceil(chunk), &task);
}

/// Sum with 8 independent partial sums (vectorisable, and closer to the exact
/// sum than one running total).
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for v in rest {
        s += v;
    }
    s
}

/// Row groups of a spatial mean: each group's rows are summed in order,
/// then the group sums in order: the same arithmetic whichever threads sum
/// the groups (and a shorter chain of additions than one running sum).
const MEAN_GROUPS: usize = 8;
/// Widest rows that are summed by groups (a group's partial sums live on
/// the stack); wider ones are summed in one run.
const MEAN_GROUP_WIDTH: usize = 1024;

/// [`reduce_mean`] on `pool`: the spatial mean of a channels-last tensor
/// (reduced axes in one run with channels after it) sums its row groups
/// as tasks of their own (rows up to [`MEAN_GROUP_WIDTH`] channels), or
/// splits wider rows' channels into blocks of whole cache lines; either
/// way every channel is summed in the serial order (the same results bit
/// for bit). Other reductions run on the calling thread.
pub fn reduce_mean_parallel(
    pool: &ThreadPool,
    shape: &[usize],
    reduce: &[bool],
    x: &[f32],
    y: &mut [f32],
) {
    let rank = shape.len();
    let first = reduce.iter().position(|&r| r).unwrap_or(rank);
    let last = rank - reduce.iter().rev().position(|&r| r).unwrap_or(0);
    let middle = first < last && last < rank && reduce[first..last].iter().all(|&r| r);
    let outer: usize = shape[..first].iter().product();
    let count: usize = shape[first..last].iter().product();
    let inner: usize = shape[last..].iter().product();
    if !middle || pool.threads() == 1 || count * inner < 64 * 1024 || count == 0 {
        return reduce_mean(shape, reduce, x, y);
    }
    assert!(x.len() >= outer * count * inner && y.len() >= outer * inner);
    let inv = 1.0 / count as f32;
    if inner <= MEAN_GROUP_WIDTH {
        // Each group's sums apart (tasks read whole stretches of rows:
        // splitting channels had every task read a few lines of every
        // row, and the prefetchers fetch the rest for nothing).
        let mut parts = [0.0f32; MEAN_GROUPS * MEAN_GROUP_WIDTH];
        for o in 0..outer {
            let pp = SyncPtr::new(&mut parts);
            pool.run(MEAN_GROUPS, &|g, _| {
                // SAFETY: task g alone writes partial sums g·inner.. of
                // `parts` (MEAN_GROUPS · inner ≤ its length).
                let part = unsafe { std::slice::from_raw_parts_mut(pp.add(g * inner), inner) };
                sum_rows(x, o, count, inner, 0, group(count, g), part);
            });
            let row = &mut y[o * inner..(o + 1) * inner];
            row.copy_from_slice(&parts[..inner]);
            for part in parts[inner..].chunks_exact(inner).take(MEAN_GROUPS - 1) {
                row.iter_mut().zip(part).for_each(|(v, p)| *v += p);
            }
            row.iter_mut().for_each(|v| *v *= inv);
        }
        return;
    }
    // Cache lines of 16 floats per block, at least two blocks per thread.
    const LINE: usize = 16;
    let blocks = inner.div_ceil(LINE).min(2 * pool.threads());
    let lines = inner.div_ceil(LINE);
    let yp = SyncPtr::new(y);
    pool.run(outer * blocks, &|t, _| {
        let (o, blk) = (t / blocks, t % blocks);
        let c0 = (blk * lines / blocks * LINE).min(inner);
        let c1 = ((blk + 1) * lines / blocks * LINE).min(inner);
        // SAFETY: task (o, blk) alone writes channels c0..c1 of output row
        // o, inside `y` (asserted above).
        let row = unsafe { std::slice::from_raw_parts_mut(yp.add(o * inner + c0), c1 - c0) };
        sum_rows(x, o, count, inner, c0, 0..count, row);
        row.iter_mut().for_each(|v| *v *= inv);
    });
}

/// Rows of row group `g` of `count` (of [`MEAN_GROUPS`]).
fn group(count: usize, g: usize) -> std::ops::Range<usize> {
    g * count / MEAN_GROUPS..(g + 1) * count / MEAN_GROUPS
}

/// Output row `o` of a spatial mean (`count` input rows of `inner` values
/// each), in [`reduce_mean_parallel`]'s order of additions.
fn mean_rows(x: &[f32], o: usize, count: usize, inner: usize, inv: f32, row: &mut [f32]) {
    if inner <= MEAN_GROUP_WIDTH {
        let mut part = [0.0f32; MEAN_GROUP_WIDTH];
        let part = &mut part[..inner];
        sum_rows(x, o, count, inner, 0, group(count, 0), row);
        for g in 1..MEAN_GROUPS {
            sum_rows(x, o, count, inner, 0, group(count, g), part);
            row.iter_mut().zip(&*part).for_each(|(v, p)| *v += p);
        }
    } else {
        sum_rows(x, o, count, inner, 0, 0..count, row);
    }
    row.iter_mut().for_each(|v| *v *= inv);
}

/// Channels `c0..c0 + out.len()` of the sum of input rows `rows` (of the
/// `count` rows of `inner` values that output row `o` reduces), in order.
fn sum_rows(
    x: &[f32],
    o: usize,
    count: usize,
    inner: usize,
    c0: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let c1 = c0 + out.len();
    out.iter_mut().for_each(|v| *v = 0.0);
    for r in rows {
        let at = (o * count + r) * inner;
        out.iter_mut()
            .zip(&x[at + c0..at + c1])
            .for_each(|(v, s)| *v += s);
    }
}

/// Mean over arbitrary axes: `shape` is the input shape, `reduce[i]` marks the
/// reduced axes; `y` has the product of the kept dimensions.
pub fn reduce_mean(shape: &[usize], reduce: &[bool], x: &[f32], y: &mut [f32]) {
    // Fast path: reduced axes are a contiguous suffix.
    let rank = shape.len();
    let first_reduced = reduce.iter().position(|&r| r).unwrap_or(rank);
    if reduce[first_reduced..].iter().all(|&r| r) {
        let outer: usize = shape[..first_reduced].iter().product();
        let inner: usize = shape[first_reduced..].iter().product();
        for (o, v) in y.iter_mut().enumerate().take(outer) {
            *v = if inner == 0 {
                f32::NAN
            } else {
                sum(&x[o * inner..(o + 1) * inner]) / inner as f32
            };
        }
        return;
    }
    // Reduced axes in one run in the middle (the spatial mean of a
    // channels-last tensor): sum whole rows of `inner` values.
    let last_reduced = rank - reduce.iter().rev().position(|&r| r).unwrap_or(0);
    if first_reduced < rank && reduce[first_reduced..last_reduced].iter().all(|&r| r) {
        let outer: usize = shape[..first_reduced].iter().product();
        let count: usize = shape[first_reduced..last_reduced].iter().product();
        let inner: usize = shape[last_reduced..].iter().product();
        let inv = if count == 0 {
            f32::NAN
        } else {
            1.0 / count as f32
        };
        for o in 0..outer {
            mean_rows(x, o, count, inner, inv, &mut y[o * inner..(o + 1) * inner]);
        }
        return;
    }
    // General path: accumulate into y by walking x once.
    let out_len: usize = shape
        .iter()
        .zip(reduce)
        .map(|(&d, &r)| if r { 1 } else { d })
        .product();
    y[..out_len].iter_mut().for_each(|v| *v = 0.0);
    let count: usize = shape
        .iter()
        .zip(reduce)
        .filter(|(_, &r)| r)
        .map(|(&d, _)| d)
        .product();
    let mut idx = [0usize; 8];
    let total: usize = shape.iter().product();
    for &v in x.iter().take(total) {
        let mut o = 0;
        for a in 0..rank {
            if !reduce[a] {
                o = o * shape[a] + idx[a];
            }
        }
        y[o] += v;
        for a in (0..rank).rev() {
            idx[a] += 1;
            if idx[a] < shape[a] {
                break;
            }
            idx[a] = 0;
        }
    }
    let c = count.max(1) as f32;
    y[..out_len].iter_mut().for_each(|v| *v /= c);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference_pool(g: &Pool2dGeometry, kind: PoolKind, x: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0; g.planes * g.oh * g.ow];
        for p in 0..g.planes {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let mut vals = Vec::new();
                    let mut padded = 0;
                    for ky in 0..g.kernel[0] {
                        for kx in 0..g.kernel[1] {
                            let iy =
                                (oy * g.stride[0] + ky * g.dilation[0]) as i64 - g.pads[0] as i64;
                            let ix =
                                (ox * g.stride[1] + kx * g.dilation[1]) as i64 - g.pads[1] as i64;
                            if iy >= 0 && ix >= 0 && iy < g.h as i64 && ix < g.w as i64 {
                                vals.push(x[p * g.h * g.w + iy as usize * g.w + ix as usize]);
                            } else if iy < (g.h + g.pads[2]) as i64 && ix < (g.w + g.pads[3]) as i64
                            {
                                padded += 1;
                            }
                        }
                    }
                    y[(p * g.oh + oy) * g.ow + ox] = match kind {
                        PoolKind::Max => vals.iter().cloned().fold(f32::NEG_INFINITY, f32::max),
                        PoolKind::Average { count_include_pad } => {
                            let d = vals.len() + if count_include_pad { padded } else { 0 };
                            vals.iter().sum::<f32>() / d.max(1) as f32
                        }
                    };
                }
            }
        }
        y
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn pool_matches_reference(planes in 1usize..4, h in 1usize..10, w in 1usize..10,
                                  k in 1usize..4, s in 1usize..3, pad in 0usize..2,
                                  ceil: bool, avg: bool, cip: bool) {
            prop_assume!(pad < k);
            let oh = pool_out_extent(h, k, s, 1, pad, pad, ceil);
            let ow = pool_out_extent(w, k, s, 1, pad, pad, ceil);
            prop_assume!(oh.is_some() && ow.is_some());
            let g = Pool2dGeometry { planes, h, w, oh: oh.unwrap(), ow: ow.unwrap(), kernel: [k, k],
                stride: [s, s], dilation: [1, 1], pads: [pad; 4] };
            let x: Vec<f32> = (0..planes * h * w).map(|i| ((i * 7919) % 101) as f32 - 50.0).collect();
            let kind = if avg { PoolKind::Average { count_include_pad: cip } } else { PoolKind::Max };
            let mut y = vec![0.0; planes * g.oh * g.ow];
            pool2d(&ThreadPool::new(2), &g, kind, &x, &mut y);
            let want = reference_pool(&g, kind, &x);
            for (a, b) in y.iter().zip(&want) {
                prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()));
            }
        }

        #[test]
        fn reduce_mean_matches_naive(d0 in 1usize..4, d1 in 1usize..5, d2 in 1usize..5, mask in 0u8..8) {
            let shape = [d0, d1, d2];
            let reduce = [mask & 1 != 0, mask & 2 != 0, mask & 4 != 0];
            let x: Vec<f32> = (0..d0 * d1 * d2).map(|i| i as f32 * 0.5 - 3.0).collect();
            let out: Vec<usize> = shape.iter().zip(&reduce).map(|(&d, &r)| if r { 1 } else { d }).collect();
            let mut y = vec![0.0; out.iter().product()];
            reduce_mean(&shape, &reduce, &x, &mut y);
            for (o, v) in y.iter().enumerate() {
                let (o0, o1, o2) = (o / (out[1] * out[2]), (o / out[2]) % out[1], o % out[2]);
                let mut s = 0.0; let mut n = 0;
                for i in 0..d0 { for j in 0..d1 { for k in 0..d2 {
                    if (reduce[0] || i == o0) && (reduce[1] || j == o1) && (reduce[2] || k == o2) {
                        s += x[(i * d1 + j) * d2 + k]; n += 1;
                    }
                }}}
                prop_assert!((v - s / n as f32).abs() < 1e-4);
            }
        }
    }

    /// The pool's channel blocks give the serial mean bit for bit
    /// (channels-last spatial means, one and two images, channel counts
    /// off the 16-float lines), and other reductions fall back to it.
    #[test]
    fn parallel_reduce_mean_is_the_serial_one() {
        let cases: [(&[usize], &[bool]); 5] = [
            (&[1, 40, 37, 200], &[false, true, true, false]),
            (&[1, 9, 11, 1100], &[false, true, true, false]),
            (&[2, 33, 30, 72], &[false, true, true, false]),
            (&[1, 128, 128, 128], &[false, true, true, false]),
            (&[1, 64, 40, 40], &[false, false, true, true]),
        ];
        for (shape, reduce) in cases {
            let n: usize = shape.iter().product();
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 1013) as f32 * 0.37 - 150.0)
                .collect();
            let m: usize = shape
                .iter()
                .zip(reduce)
                .map(|(&d, &r)| if r { 1 } else { d })
                .product();
            let mut want = vec![0.0; m];
            reduce_mean(shape, reduce, &x, &mut want);
            for threads in [1, 2, 3] {
                let pool = ThreadPool::new(threads);
                let mut got = vec![f32::NAN; m];
                reduce_mean_parallel(&pool, shape, reduce, &x, &mut got);
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{shape:?}, {threads} threads");
            }
        }
    }

    #[test]
    fn global_average_is_mean() {
        let x: Vec<f32> = (0..3 * 49).map(|i| i as f32).collect();
        let mut y = vec![0.0; 3];
        global_average(&ThreadPool::new(2), 3, 49, &x, &mut y);
        assert_eq!(y, vec![24.0, 73.0, 122.0]);
    }
}
