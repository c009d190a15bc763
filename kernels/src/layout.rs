//! Data movement: strided copies (transpose, slice, concat, split, gather) and padding.

use crate::eltwise::MAX_RANK;
use crate::pool::{SyncPtr, ThreadPool};

/// A strided view: element `idx` lives at `offset + Σ idx[d] * strides[d]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StridedView {
    /// Offset of element 0.
    pub offset: usize,
    /// Stride per dimension (may be negative for reversed slices).
    pub strides: [isize; MAX_RANK],
}

/// Row-major strides of a contiguous tensor.
pub fn contiguous_strides(shape: &[usize]) -> [isize; MAX_RANK] {
    let mut s = [0isize; MAX_RANK];
    let mut acc = 1isize;
    for d in (0..shape.len()).rev() {
        s[d] = acc;
        acc *= shape[d] as isize;
    }
    s
}

/// A copy's dimensions with unit dimensions dropped and neighbours that
/// are contiguous in both views merged: `n` dimensions `dims` with source
/// strides `ss` and destination strides `ds`.
struct Coalesced {
    n: usize,
    dims: [usize; MAX_RANK],
    ss: [isize; MAX_RANK],
    ds: [isize; MAX_RANK],
}

fn coalesce(shape: &[usize], src: &StridedView, dst: &StridedView) -> Coalesced {
    let mut dims = [1usize; MAX_RANK];
    let mut ss = [0isize; MAX_RANK];
    let mut ds = [0isize; MAX_RANK];
    let mut n = 0;
    for d in 0..shape.len() {
        if shape[d] == 1 {
            continue;
        }
        if n > 0
            && ss[n - 1] == src.strides[d] * shape[d] as isize
            && ds[n - 1] == dst.strides[d] * shape[d] as isize
        {
            dims[n - 1] *= shape[d];
            ss[n - 1] = src.strides[d];
            ds[n - 1] = dst.strides[d];
            continue;
        }
        dims[n] = shape[d];
        ss[n] = src.strides[d];
        ds[n] = dst.strides[d];
        n += 1;
    }
    Coalesced { n, dims, ss, ds }
}

/// Copies `shape` elements from the view `src` of `x` to the view `dst` of `y`.
///
/// # Panics
/// If a view reaches outside its buffer (views are computed from validated shapes).
pub fn copy_strided(
    shape: &[usize],
    x: &[f32],
    src: &StridedView,
    y: &mut [f32],
    dst: &StridedView,
) {
    copy_strided_clamped(shape, x, src, y, dst, None)
}

/// [`copy_strided`], each value clamped to `clamp`'s bounds as it is
/// written (`v.max(lo).min(hi)`, as [`crate::Activation::apply`] computes
/// Relu and Clip), for a fused `Concat → Relu`: the activation costs no
/// pass of its own over the tensor.
///
/// # Panics
/// As [`copy_strided`].
pub fn copy_strided_clamped(
    shape: &[usize],
    x: &[f32],
    src: &StridedView,
    y: &mut [f32],
    dst: &StridedView,
    clamp: Option<(f32, f32)>,
) {
    let f = |v: f32| match clamp {
        Some((lo, hi)) => v.max(lo).min(hi),
        None => v,
    };
    let rank = shape.len();
    assert!(rank <= MAX_RANK);
    if shape.contains(&0) {
        return;
    }
    let Coalesced { n, dims, ss, ds } = coalesce(shape, src, dst);
    if n == 0 {
        y[dst.offset] = f(x[src.offset]);
        return;
    }
    let inner = dims[n - 1];
    let (si, di) = (ss[n - 1], ds[n - 1]);
    // A transpose-like copy takes its last two dimensions as one plane,
    // tile by tile, so the strided side's cache lines are used while they
    // are hot (an NHWC ↔ NCHW conversion reads or writes one line per
    // element otherwise); any other copy goes row by row.
    // (Clamped copies are concatenations, never transposes: they take the
    // element loop below if they are strided.)
    let plane = ((si != 1 || di != 1) && n >= 2 && clamp.is_none()).then(|| Plane2d {
        dims: [dims[n - 2], inner],
        src: [ss[n - 2], si],
        dst: [ds[n - 2], di],
    });
    let walked = if plane.is_some() { n - 2 } else { n - 1 };
    let outer: usize = dims[..walked].iter().product();
    let mut idx = [0usize; MAX_RANK];
    for _ in 0..outer {
        let mut so = src.offset as isize;
        let mut dof = dst.offset as isize;
        for d in 0..walked {
            so += idx[d] as isize * ss[d];
            dof += idx[d] as isize * ds[d];
        }
        if let Some(p) = &plane {
            p.copy(x, so, y, dof);
        } else if si == 1 && di == 1 {
            let (so, dof) = (so as usize, dof as usize);
            let (from, to) = (&x[so..so + inner], &mut y[dof..dof + inner]);
            match clamp {
                Some((lo, hi)) => {
                    for (d, &v) in to.iter_mut().zip(from) {
                        *d = v.max(lo).min(hi);
                    }
                }
                None => to.copy_from_slice(from),
            }
        } else {
            for i in 0..inner as isize {
                y[(dof + i * di) as usize] = f(x[(so + i * si) as usize]);
            }
        }
        for d in (0..walked).rev() {
            idx[d] += 1;
            if idx[d] < dims[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// [`copy_strided_clamped`] split over the pool when the copy is large and its
/// destination is a whole contiguous tensor (a layout conversion, a
/// transpose): each task writes its own contiguous range of outermost
/// indices.
///
/// # Panics
/// As [`copy_strided`].
pub fn copy_strided_parallel(
    pool: &ThreadPool,
    shape: &[usize],
    x: &[f32],
    src: &StridedView,
    y: &mut [f32],
    dst: &StridedView,
    clamp: Option<(f32, f32)>,
) {
    let total: usize = shape.iter().product();
    if clamp.is_none() && pool.threads() > 1 && total >= 64 * 1024 && shape.len() <= MAX_RANK {
        // A channels-last → planes conversion (few planes, many pixels):
        // split by pixels, not by planes (the outermost dimension), so that
        // each task reads whole source lines instead of a few values of
        // every one.
        let Coalesced { n, dims, ss, ds } = coalesce(shape, src, dst);
        let disjoint_rows = ds[0] >= dims[1] as isize;
        let few_planes = dims[0] <= dims[1];
        if n == 2 && ss[0] == 1 && ss[1] > 0 && ds[1] == 1 && disjoint_rows && few_planes {
            let strides = [ss[1] as usize, ds[0] as usize];
            return transpose_by_columns(
                pool,
                [dims[0], dims[1]],
                strides,
                x,
                src.offset,
                y,
                dst.offset,
            );
        }
    }
    let outer = shape.iter().position(|&n| n > 1);
    let Some(d) = outer else {
        return copy_strided_clamped(shape, x, src, y, dst, clamp);
    };
    // Tasks split the outermost non-unit dimension. Each index along it
    // must own one run of the destination, `step` apart and `span` long:
    // a contiguous destination, or a slice of a larger one (a channel
    // range of a channels-last concatenation: each row's pixels are one
    // run of the output's rows).
    let step = dst.strides[d];
    let span = 1 + shape
        .iter()
        .zip(&dst.strides)
        .skip(d + 1)
        .map(|(&n, &s)| (n as isize - 1) * s)
        .sum::<isize>();
    let runs = dst.strides[d..shape.len()].iter().all(|&s| s >= 0) && span <= step;
    if !runs || pool.threads() == 1 || total < 64 * 1024 {
        return copy_strided_clamped(shape, x, src, y, dst, clamp);
    }
    let (step, span) = (step as usize, span as usize);
    let end = dst.offset + (shape[d] - 1) * step + span;
    assert!(end <= y.len(), "copy destination past its buffer");
    let tasks = shape[d].min(4 * pool.threads());
    let per = shape[d].div_ceil(tasks);
    let base = SyncPtr::new(&mut y[dst.offset..end]);
    pool.run(shape[d].div_ceil(per), &|t, _| {
        let (lo, hi) = (t * per, ((t + 1) * per).min(shape[d]));
        let mut part = [0usize; MAX_RANK];
        part[..shape.len()].copy_from_slice(shape);
        part[d] = hi - lo;
        // SAFETY: indices lo..hi along dimension d are the runs from
        // lo·step to (hi − 1)·step + span of the destination (inside `y`,
        // asserted above); runs do not overlap (span ≤ step), so the
        // tasks' ranges are disjoint.
        let out = unsafe {
            std::slice::from_raw_parts_mut(base.add(lo * step), (hi - 1 - lo) * step + span)
        };
        let sub_src = StridedView {
            offset: (src.offset as isize + lo as isize * src.strides[d]) as usize,
            strides: src.strides,
        };
        let sub_dst = StridedView {
            offset: 0,
            strides: dst.strides,
        };
        copy_strided_clamped(&part[..shape.len()], x, &sub_src, out, &sub_dst, clamp);
    });
}

/// The transpose of `rows × cols` values whose source columns are
/// contiguous (`rows` values each, `strides[0]` apart, from `so` in `x`)
/// into destination rows that are contiguous (`cols` values each,
/// `strides[1]` apart, from `dof` in `y`), split over the pool by columns:
/// each task reads one stretch of the source (some pixels of a
/// channels-last image, every channel) and writes those columns of every
/// destination row (the pixels of every plane).
///
/// # Panics
/// If either side reaches outside its buffer.
fn transpose_by_columns(
    pool: &ThreadPool,
    [rows, cols]: [usize; 2],
    [src_col, dst_row]: [usize; 2],
    x: &[f32],
    so: usize,
    y: &mut [f32],
    dof: usize,
) {
    assert!(
        so + (cols - 1) * src_col + rows <= x.len(),
        "copy source past its buffer"
    );
    let end = dof + (rows - 1) * dst_row + cols;
    assert!(end <= y.len(), "copy destination past its buffer");
    let tile = Plane2d::TILE;
    let tasks = cols.div_ceil(tile).min(4 * pool.threads());
    // Whole 8-column blocks per task (all but the last).
    let per = cols.div_ceil(tasks).next_multiple_of(8);
    let base = SyncPtr::new(&mut y[dof..end]);
    pool.run(cols.div_ceil(per), &|t, _| {
        let (c0, c1) = (t * per, ((t + 1) * per).min(cols));
        for c in (c0..c1).step_by(tile) {
            let extent = [rows, (c1 - c).min(tile)];
            // SAFETY: the task writes columns c0..c1 of rows 0..rows only:
            // elements r·dst_row + c' with c' < cols ≤ dst_row, inside
            // `base`'s `end − dof` elements (asserted above), and distinct
            // for distinct (r, c') — the tasks' column ranges are disjoint.
            unsafe { transpose_columns(x, so, src_col, base.add(0), dst_row, c, extent) };
        }
    });
}

/// Columns `c..c + extent[1]` of every row `0..extent[0]` of
/// [`transpose_by_columns`]' destination `y`: element `(r, c')` is
/// `x[so + c'·src_col + r]`, written to `y + r·dst_row + c'`.
///
/// # Safety
/// Those destination elements are valid for writes and no other thread
/// reads or writes them meanwhile.
///
/// # Panics
/// If a source index is outside `x`.
unsafe fn transpose_columns(
    x: &[f32],
    so: usize,
    src_col: usize,
    y: *mut f32,
    dst_row: usize,
    c: usize,
    [rows, cols]: [usize; 2],
) {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let (mut br, mut bc) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if crate::isa::active().has_avx2() && rows >= 8 && cols >= 8 {
        (br, bc) = (rows / 8 * 8, cols / 8 * 8);
        assert!(
            so + (c + bc - 1) * src_col + br <= x.len(),
            "copy source past its buffer"
        );
        for j in (c..c + bc).step_by(8) {
            for r in (0..br).step_by(8) {
                // SAFETY: AVX2 is active; the block's source is 8 columns
                // of 8 values inside `x` (asserted above), its destination
                // 8 rows of 8 elements the caller lets us write.
                unsafe {
                    transpose8_avx2(
                        x.as_ptr().add(so + j * src_col + r),
                        src_col as isize,
                        y.add(r * dst_row + j),
                        dst_row as isize,
                    )
                };
            }
        }
    }
    // The rest element by element: rows below the blocks, then the columns
    // right of them.
    for (from_row, cs) in [(br, c..c + bc), (0, c + bc..c + cols)] {
        for cc in cs {
            let column = &x[so + cc * src_col..so + cc * src_col + rows];
            for (r, &v) in column.iter().enumerate().skip(from_row) {
                // SAFETY: row r < rows, column cc of the caller's range.
                unsafe { *y.add(r * dst_row + cc) = v };
            }
        }
    }
}

/// Two dimensions of a strided copy, with their source and destination
/// strides.
struct Plane2d {
    dims: [usize; 2],
    src: [isize; 2],
    dst: [isize; 2],
}

impl Plane2d {
    /// Side of the square tiles: 32 × 32 floats are 4 KiB on each side.
    const TILE: usize = 32;

    /// Copies the plane at source offset `so` to destination offset `dof`.
    fn copy(&self, x: &[f32], so: isize, y: &mut [f32], dof: isize) {
        if self.interleave(x, so, y, dof) {
            return;
        }
        let t = Plane2d::TILE;
        let transpose = self.transpose_form();
        for r0 in (0..self.dims[0]).step_by(t) {
            for c0 in (0..self.dims[1]).step_by(t) {
                let (tr, tc) = ((self.dims[0] - r0).min(t), (self.dims[1] - c0).min(t));
                // The tile's whole 8 × 8 blocks in registers (a partial
                // tile too: 80 channels are 2½ tiles but ten blocks), the
                // rest element by element.
                let (br, bc) = match transpose {
                    Some(form) if self.tile_simd(form, x, so, y, dof, [r0, c0], [tr, tc]) => {
                        (tr / 8 * 8, tc / 8 * 8)
                    }
                    _ => (0, 0),
                };
                for r in r0..r0 + tr {
                    let sb = so + r as isize * self.src[0];
                    let db = dof + r as isize * self.dst[0];
                    let from = if r < r0 + br { c0 + bc } else { c0 };
                    for c in from as isize..(c0 + tc) as isize {
                        y[(db + c * self.dst[1]) as usize] = x[(sb + c * self.src[1]) as usize];
                    }
                }
            }
        }
    }

    /// Planes to interleaved pixels (a 1–4 channel image to channels-last):
    /// the second dimension is a few planes of contiguous rows, written
    /// densely, pixel after pixel. `false` (nothing written) for any other
    /// plane.
    fn interleave(&self, x: &[f32], so: isize, y: &mut [f32], dof: isize) -> bool {
        match self.dims[1] {
            1 => self.interleave_n::<1>(x, so, y, dof),
            2 => self.interleave_n::<2>(x, so, y, dof),
            3 => self.interleave_n::<3>(x, so, y, dof),
            4 => self.interleave_n::<4>(x, so, y, dof),
            _ => false,
        }
    }

    fn interleave_n<const C: usize>(
        &self,
        x: &[f32],
        so: isize,
        y: &mut [f32],
        dof: isize,
    ) -> bool {
        let n = self.dims[0];
        let dense = self.src[0] == 1 && self.dst == [C as isize, 1] && self.src[1] > 0;
        if !dense || so < 0 || dof < 0 {
            return false;
        }
        let (so, dof, plane) = (so as usize, dof as usize, self.src[1] as usize);
        let planes: [&[f32]; C] = std::array::from_fn(|c| &x[so + c * plane..so + c * plane + n]);
        for (r, px) in y[dof..dof + n * C].chunks_exact_mut(C).enumerate() {
            for (c, v) in px.iter_mut().enumerate() {
                *v = planes[c][r];
            }
        }
        true
    }

    /// Whether the plane is a transpose of contiguous rows (all strides
    /// positive): `Some(false)` when source rows run along the second
    /// dimension and destination rows along the first, `Some(true)` the
    /// other way round.
    fn transpose_form(&self) -> Option<bool> {
        let positive = self.src.iter().chain(&self.dst).all(|&v| v > 0);
        match (self.src, self.dst) {
            _ if !positive => None,
            ([_, 1], [1, _]) => Some(false),
            ([1, _], [_, 1]) => Some(true),
            _ => None,
        }
    }

    /// The whole 8 × 8 blocks of the tile at `at` with `extent` rows and
    /// columns (its first `extent / 8 · 8`) as register transposes (AVX2);
    /// `false` (nothing written) without AVX2.
    #[allow(clippy::too_many_arguments)]
    fn tile_simd(
        &self,
        swapped: bool,
        x: &[f32],
        so: isize,
        y: &mut [f32],
        dof: isize,
        at: [usize; 2],
        extent: [usize; 2],
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if crate::isa::active().has_avx2() {
            let (tr, tc) = ((extent[0] / 8 * 8) as isize, (extent[1] / 8 * 8) as isize);
            if tr == 0 || tc == 0 {
                return true;
            }
            let (r0, c0) = (at[0] as isize, at[1] as isize);
            // Every index of the blocks lies between their first and last
            // element (positive strides): check those once.
            let span = |o: isize, s: [isize; 2]| {
                (
                    o + r0 * s[0] + c0 * s[1],
                    o + (r0 + tr - 1) * s[0] + (c0 + tc - 1) * s[1],
                )
            };
            let (slo, shi) = span(so, self.src);
            let (dlo, dhi) = span(dof, self.dst);
            assert!(
                slo >= 0 && (shi as usize) < x.len(),
                "copy source past its buffer"
            );
            assert!(
                dlo >= 0 && (dhi as usize) < y.len(),
                "copy destination past its buffer"
            );
            // Source rows: along the contiguous dimension of the source.
            let (s_row, d_row) = if swapped {
                (self.src[1], self.dst[0])
            } else {
                (self.src[0], self.dst[1])
            };
            for i in (0..tr).step_by(8) {
                for j in (0..tc).step_by(8) {
                    // Block rows `i..` of the first dimension, `j..` of the second.
                    let (r, c) = (r0 + i, c0 + j);
                    let (src, dst) = if swapped {
                        // Source rows are columns c.. (r contiguous),
                        // destination rows are r.. (c contiguous).
                        (so + r + c * self.src[1], dof + r * self.dst[0] + c)
                    } else {
                        (so + r * self.src[0] + c, dof + r + c * self.dst[1])
                    };
                    // SAFETY: AVX2 is active; the block's 8 rows of 8
                    // floats on either side lie inside the blocks' extent,
                    // checked against both buffers above.
                    unsafe {
                        transpose8_avx2(
                            x.as_ptr().offset(src),
                            s_row,
                            y.as_mut_ptr().offset(dst),
                            d_row,
                        )
                    };
                }
            }
            return true;
        }
        let _ = (swapped, x, so, y, dof, at, extent);
        false
    }
}

/// `dst` row `j` = column `j` of the 8 × 8 block whose row `i` is the 8
/// floats at `src + i·ss`; destination rows are `ds` floats apart.
///
/// # Safety
/// AVX2 available; the 8 rows of 8 floats are readable at `src` and
/// writable at `dst`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose8_avx2(src: *const f32, ss: isize, dst: *mut f32, ds: isize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees the 8 rows on both sides.
    unsafe {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.offset(i as isize * ss)));
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let out = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (j, v) in out.iter().enumerate() {
            _mm256_storeu_ps(dst.offset(j as isize * ds), *v);
        }
    }
}

/// Border handling for [`pad`].
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum PadMode {
    /// Fill with a constant.
    Constant(f32),
    /// Mirror without repeating the edge.
    Reflect,
    /// Repeat the edge.
    Edge,
}

/// Pads `x` of `shape` by `begin`/`end` per dimension into `y`.
pub fn pad(
    shape: &[usize],
    begin: &[usize],
    end: &[usize],
    mode: PadMode,
    x: &[f32],
    y: &mut [f32],
) {
    let rank = shape.len();
    let out: Vec<usize> = (0..rank).map(|d| shape[d] + begin[d] + end[d]).collect();
    let total: usize = out.iter().product();
    let in_strides = contiguous_strides(shape);
    if let PadMode::Constant(v) = mode {
        y[..total].iter_mut().for_each(|e| *e = v);
        let dst = StridedView {
            offset: (0..rank)
                .map(|d| begin[d] * contiguous_strides(&out)[d] as usize)
                .sum(),
            strides: contiguous_strides(&out),
        };
        let src = StridedView {
            offset: 0,
            strides: in_strides,
        };
        copy_strided(shape, x, &src, y, &dst);
        return;
    }
    let mut idx = [0usize; MAX_RANK];
    for v in y.iter_mut().take(total) {
        let mut off = 0usize;
        for d in 0..rank {
            let i = idx[d] as isize - begin[d] as isize;
            let n = shape[d] as isize;
            let src = match mode {
                PadMode::Edge => i.clamp(0, n - 1),
                _ => {
                    // Reflect (n >= 2 is validated by the engine; n == 1 repeats).
                    if n == 1 {
                        0
                    } else {
                        let period = 2 * (n - 1);
                        let m = i.rem_euclid(period);
                        if m < n {
                            m
                        } else {
                            period - m
                        }
                    }
                }
            };
            off += src as usize * in_strides[d] as usize;
        }
        *v = x[off];
        for d in (0..rank).rev() {
            idx[d] += 1;
            if idx[d] < out[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn transpose_2d() {
        let x: Vec<f32> = (0..6).map(|i| i as f32).collect(); // [2,3]
        let mut y = vec![0.0; 6]; // [3,2]
        let mut s = [0isize; MAX_RANK];
        s[0] = 1;
        s[1] = 3;
        copy_strided(
            &[3, 2],
            &x,
            &StridedView {
                offset: 0,
                strides: s,
            },
            &mut y,
            &StridedView {
                offset: 0,
                strides: contiguous_strides(&[3, 2]),
            },
        );
        assert_eq!(y, vec![0., 3., 1., 4., 2., 5.]);
    }

    /// Layout conversions larger than a tile, both ways, against direct
    /// indexing.
    #[test]
    fn nchw_nhwc_conversions_across_tiles() {
        for (c, h, w) in [(3, 37, 45), (80, 9, 70), (33, 1, 65)] {
            let x: Vec<f32> = (0..c * h * w).map(|i| i as f32).collect();
            // NCHW -> NHWC: output [h, w, c] reads x[ch][y][x].
            let mut s = [0isize; MAX_RANK];
            s[..3].copy_from_slice(&[w as isize, 1, (h * w) as isize]);
            let mut y = vec![0.0; x.len()];
            let out = StridedView {
                offset: 0,
                strides: contiguous_strides(&[h, w, c]),
            };
            copy_strided(
                &[h, w, c],
                &x,
                &StridedView {
                    offset: 0,
                    strides: s,
                },
                &mut y,
                &out,
            );
            for (i, v) in y.iter().enumerate() {
                let (p, ch) = (i / c, i % c);
                assert_eq!(*v, x[ch * h * w + p], "{c}x{h}x{w} nhwc {i}");
            }
            // And back: output [c, h, w] reads y[y][x][ch].
            let mut s = [0isize; MAX_RANK];
            s[..3].copy_from_slice(&[1, (w * c) as isize, c as isize]);
            let mut back = vec![0.0; x.len()];
            let out = StridedView {
                offset: 0,
                strides: contiguous_strides(&[c, h, w]),
            };
            copy_strided(
                &[c, h, w],
                &y,
                &StridedView {
                    offset: 0,
                    strides: s,
                },
                &mut back,
                &out,
            );
            assert_eq!(back, x, "{c}x{h}x{w} round trip");
        }
    }

    /// A row-major matrix written through a column-major view (the other
    /// transposing form), larger than a tile, against direct indexing.
    #[test]
    fn transposed_destination_views() {
        let (r, c) = (45, 70);
        let x: Vec<f32> = (0..r * c).map(|i| i as f32).collect();
        let mut y = vec![0.0; r * c];
        let mut ds = [0isize; MAX_RANK];
        ds[..2].copy_from_slice(&[1, r as isize]);
        let src = StridedView {
            offset: 0,
            strides: contiguous_strides(&[r, c]),
        };
        copy_strided(
            &[r, c],
            &x,
            &src,
            &mut y,
            &StridedView {
                offset: 0,
                strides: ds,
            },
        );
        for i in 0..r {
            for j in 0..c {
                assert_eq!(y[i + j * r], x[i * c + j], "({i}, {j})");
            }
        }
    }

    /// The pool's split copies every element once, to the same place, for
    /// conversions, slices and reversed views.
    #[test]
    fn parallel_copies_equal_serial_ones() {
        let (c, h, w) = (80, 40, 37);
        let x: Vec<f32> = (0..c * h * w).map(|i| i as f32).collect();
        let nhwc = {
            let mut s = [0isize; MAX_RANK];
            s[..3].copy_from_slice(&[1, (w * c) as isize, c as isize]);
            StridedView {
                offset: 0,
                strides: s,
            }
        };
        let reversed = {
            let mut s = contiguous_strides(&[c, h, w]);
            s[1] = -s[1];
            StridedView {
                offset: (h - 1) * w,
                strides: s,
            }
        };
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for src in [nhwc, reversed] {
                let out = StridedView {
                    offset: 0,
                    strides: contiguous_strides(&[c, h, w]),
                };
                let (mut a, mut b) = (vec![-1.0; x.len()], vec![-2.0; x.len()]);
                copy_strided(&[c, h, w], &x, &src, &mut a, &out);
                copy_strided_parallel(&pool, &[c, h, w], &x, &src, &mut b, &out, None);
                assert_eq!(a, b, "{threads} threads, {src:?}");
            }
        }
    }

    /// Channels-last to planes split by pixels: plane counts and pixel
    /// counts off the 8-blocks, into a larger buffer at an offset with
    /// padded rows (nothing outside the planes is touched).
    #[test]
    fn pixel_split_conversions_equal_serial_ones() {
        for (c, hw) in [(21, 3907), (8, 8200), (80, 1031)] {
            let x: Vec<f32> = (0..c * hw).map(|i| i as f32).collect();
            let mut s = [0isize; MAX_RANK];
            s[..2].copy_from_slice(&[1, c as isize]);
            let src = StridedView {
                offset: 0,
                strides: s,
            };
            let mut d = [0isize; MAX_RANK];
            d[..2].copy_from_slice(&[(hw + 5) as isize, 1]);
            let out = StridedView {
                offset: 3,
                strides: d,
            };
            let len = 3 + c * (hw + 5);
            let mut want = vec![-1.0; len];
            copy_strided(&[c, hw], &x, &src, &mut want, &out);
            for threads in [2, 3] {
                let pool = ThreadPool::new(threads);
                let mut got = vec![-1.0; len];
                copy_strided_parallel(&pool, &[c, hw], &x, &src, &mut got, &out, None);
                assert_eq!(got, want, "{c} planes of {hw} on {threads} threads");
            }
        }
    }

    /// A channels-last concatenation with a fused clamp equals the plain
    /// copy followed by the activation, element for element, on 1 and 3
    /// threads (rows of a part's channels, and a strided part).
    #[test]
    fn clamped_copies_are_the_copy_then_the_activation() {
        let (h, w, c1, c2) = (67, 45, 24, 13);
        let c = c1 + c2;
        let a: Vec<f32> = (0..h * w * c1)
            .map(|i| ((i * 37) % 101) as f32 - 50.0)
            .collect();
        let b: Vec<f32> = (0..h * w * c2)
            .map(|i| ((i * 53) % 89) as f32 - 44.0)
            .collect();
        let dst = |off: usize| StridedView {
            offset: off,
            strides: contiguous_strides(&[h, w, c]),
        };
        let plain = |n: usize| StridedView {
            offset: 0,
            strides: contiguous_strides(&[h, w, n]),
        };
        // Part b read transposed (channels-first source): a strided part.
        let b_planes = {
            let mut s = [0isize; MAX_RANK];
            s[..3].copy_from_slice(&[w as isize, 1, (h * w) as isize]);
            StridedView {
                offset: 0,
                strides: s,
            }
        };
        for (lo, hi) in [(0.0, f32::INFINITY), (-3.0, 6.0)] {
            let act = |v: f32| crate::Activation::Clip { lo, hi }.apply(v);
            let mut want = vec![0.0; h * w * c];
            copy_strided(&[h, w, c1], &a, &plain(c1), &mut want, &dst(0));
            copy_strided(&[h, w, c2], &b, &b_planes, &mut want, &dst(c1));
            want.iter_mut().for_each(|v| *v = act(*v));
            for threads in [1, 3] {
                let pool = ThreadPool::new(threads);
                let mut got = vec![f32::NAN; h * w * c];
                let clamp = Some((lo, hi));
                copy_strided_parallel(&pool, &[h, w, c1], &a, &plain(c1), &mut got, &dst(0), clamp);
                copy_strided_parallel(&pool, &[h, w, c2], &b, &b_planes, &mut got, &dst(c1), clamp);
                assert_eq!(got, want, "[{lo}, {hi}] on {threads} threads");
            }
        }
    }

    #[test]
    fn pad_modes() {
        let x = [1.0, 2.0, 3.0];
        let mut y = [0.0; 7];
        pad(&[3], &[2], &[2], PadMode::Reflect, &x, &mut y);
        assert_eq!(y, [3., 2., 1., 2., 3., 2., 1.]);
        pad(&[3], &[2], &[2], PadMode::Edge, &x, &mut y);
        assert_eq!(y, [1., 1., 1., 2., 3., 3., 3.]);
        pad(&[3], &[1], &[3], PadMode::Constant(9.0), &x, &mut y);
        assert_eq!(y, [9., 1., 2., 3., 9., 9., 9.]);
    }

    proptest! {
        #[test]
        fn permutation_roundtrip(d0 in 1usize..5, d1 in 1usize..5, d2 in 1usize..5, p in 0usize..6) {
            let perms = [[0,1,2],[0,2,1],[1,0,2],[1,2,0],[2,0,1],[2,1,0]];
            let perm = perms[p];
            let shape = [d0, d1, d2];
            let x: Vec<f32> = (0..d0*d1*d2).map(|i| i as f32).collect();
            let in_s = contiguous_strides(&shape);
            let out_shape = [shape[perm[0]], shape[perm[1]], shape[perm[2]]];
            let mut s = [0isize; MAX_RANK];
            for d in 0..3 { s[d] = in_s[perm[d]]; }
            let mut y = vec![0.0; x.len()];
            copy_strided(&out_shape, &x, &StridedView { offset: 0, strides: s }, &mut y,
                         &StridedView { offset: 0, strides: contiguous_strides(&out_shape) });
            for a in 0..out_shape[0] { for b in 0..out_shape[1] { for c in 0..out_shape[2] {
                let mut src = [0; 3];
                src[perm[0]] = a; src[perm[1]] = b; src[perm[2]] = c;
                let want = x[(src[0] * d1 + src[1]) * d2 + src[2]];
                prop_assert_eq!(y[(a * out_shape[1] + b) * out_shape[2] + c], want);
            }}}
        }
    }
}
