//! Depthwise convolution of one channel plane (multiplier 1).
//!
//! The plane is first copied into a zero-padded buffer, so the inner loops
//! carry no bounds logic: every output row is a sum over taps of (possibly
//! strided) input rows scaled by one weight. The AVX2+FMA kernel
//! `avx2_fma_depthwise_rows` computes 8 outputs per vector, up to four vectors
//! at once for instruction-level parallelism, de-interleaving stride-2 inputs
//! by storing the padded plane as even then odd columns; partial vectors use
//! masked stores, and Relu/Clip are applied in registers. The portable kernel is
//! the same loop in plain Rust (LLVM vectorises the stride-1 case; on aarch64
//! to NEON).

use crate::activation::Activation;
use crate::isa::Isa;

/// Floats of slack after a padded plane: vector loads may read past the last
/// row (the extra lanes are never stored).
pub const SLACK: usize = 64;

/// Largest kernel (taps) the AVX2 kernel handles; larger ones use the portable path.
#[cfg(target_arch = "x86_64")]
const MAX_TAPS: usize = 64;

/// Geometry of one depthwise plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlaneGeometry {
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Strides (y, x).
    pub stride: [usize; 2],
    /// Dilations (y, x).
    pub dilation: [usize; 2],
    /// Pads top, left, bottom, right.
    pub pads: [usize; 4],
}

impl PlaneGeometry {
    /// Padded width.
    pub fn pw(&self) -> usize {
        self.w + self.pads[1] + self.pads[3]
    }
    /// Padded height.
    pub fn ph(&self) -> usize {
        self.h + self.pads[0] + self.pads[2]
    }
    /// Scratch floats for one padded plane.
    pub fn scratch_len(&self) -> usize {
        self.ph() * self.pw() + SLACK
    }
}

/// Where a plane's values come from.
#[derive(Clone, Copy, Debug)]
pub enum PlaneSource<'a> {
    /// f32 values, used as they are.
    F32(&'a [f32]),
    /// f32 values quantized with the reciprocal scale (integer-valued
    /// result, see [`crate::int8::quantize_to_f32`]).
    Quantize(&'a [f32], f32),
    /// INT8 values.
    I8(&'a [i8]),
}

impl PlaneSource<'_> {
    /// Writes row `y` (width `w`) into `dst` as f32.
    fn fill_row(self, isa: Isa, y: usize, w: usize, dst: &mut [f32]) {
        match self {
            PlaneSource::F32(x) => dst.copy_from_slice(&x[y * w..(y + 1) * w]),
            PlaneSource::Quantize(x, inv) => {
                crate::int8::quantize_to_f32(isa, &x[y * w..(y + 1) * w], inv, dst)
            }
            PlaneSource::I8(x) => crate::int8::widen_i8(isa, &x[y * w..(y + 1) * w], dst),
        }
    }
}

/// Copies `x` (h×w) into `buf` with zero padding, and zeroes the slack;
/// `rowbuf` (`w` floats) holds a converted row when `x` is not f32 and the
/// row is split.
///
/// With `split` (horizontal stride 2), each padded row is stored as its even
/// columns followed by its odd columns, so every tap of a stride-2 kernel reads
/// a contiguous run: column `2·ox + c` is at `ox + c/2` in phase `c % 2`.
fn pad_plane(
    isa: Isa,
    g: &PlaneGeometry,
    x: PlaneSource,
    buf: &mut [f32],
    rowbuf: &mut [f32],
    split: bool,
) {
    let pw = g.pw();
    let (pt, pl) = (g.pads[0], g.pads[1]);
    let used = g.ph() * pw;
    let ne = pw.div_ceil(2);
    buf[..pt * pw].iter_mut().for_each(|v| *v = 0.0);
    for y in 0..g.h {
        let row = &mut buf[(pt + y) * pw..(pt + y + 1) * pw];
        if split {
            row.iter_mut().for_each(|v| *v = 0.0);
            let (even, odd) = row.split_at_mut(ne);
            // src[i] sits at padded column pl + i: pairs (src[2i], src[2i+1])
            // land in (even, odd) when pl is even, in (odd, even) when odd.
            let (d0, d1) = if pl % 2 == 0 {
                (&mut even[pl / 2..], &mut odd[pl / 2..])
            } else {
                (&mut odd[pl / 2..], &mut even[pl / 2 + 1..])
            };
            match x {
                PlaneSource::F32(x) => deinterleave(isa, &x[y * g.w..(y + 1) * g.w], d0, d1),
                PlaneSource::I8(x) => deinterleave(isa, &x[y * g.w..(y + 1) * g.w], d0, d1),
                PlaneSource::Quantize(..) => {
                    x.fill_row(isa, y, g.w, &mut rowbuf[..g.w]);
                    deinterleave(isa, &rowbuf[..g.w], d0, d1);
                }
            }
        } else {
            row[..pl].iter_mut().for_each(|v| *v = 0.0);
            x.fill_row(isa, y, g.w, &mut row[pl..pl + g.w]);
            row[pl + g.w..].iter_mut().for_each(|v| *v = 0.0);
        }
    }
    buf[(pt + g.h) * pw..used + SLACK]
        .iter_mut()
        .for_each(|v| *v = 0.0);
}

/// Scratch floats of [`depthwise_plane_int`]: the padded plane, one row
/// and one plane of accumulators.
pub fn int_scratch_len(g: &PlaneGeometry) -> usize {
    g.scratch_len() + g.w + g.oh * g.ow
}

/// The epilogue of an integer plane: `clamp(acc · scale + bias, lo, hi)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Requant {
    /// Accumulator scale (weight scale × input scale).
    pub scale: f32,
    /// Bias.
    pub bias: f32,
    /// Clamp (the activation, when it is one: ±∞ for none).
    pub lo: f32,
    /// Upper clamp.
    pub hi: f32,
}

impl Requant {
    #[inline(always)]
    fn apply(&self, acc: f32) -> f32 {
        (acc * self.scale + self.bias).max(self.lo).min(self.hi)
    }
}

/// What an integer plane writes.
#[derive(Debug)]
pub enum IntPlaneOut<'a> {
    /// The exact accumulators (integer-valued f32), for the caller's own
    /// epilogue.
    Acc(&'a mut [f32]),
    /// `r.apply(acc)` as f32.
    F32(&'a mut [f32], Requant),
    /// `r.apply(acc)` quantized with the reciprocal output scale (INT8).
    I8(&'a mut [i8], Requant, f32),
}

/// Integer depthwise convolution of one plane: `acc = Σ w·q(x)` with
/// integer-valued f32 weights `w` (INT8 values) and the plane's INT8
/// values (`x` quantized on the fly or already INT8), then the epilogue
/// that `out` asks for. Every product and partial sum is an integer below
/// 2^24 (at most 1024 taps of 127·127), so the f32 arithmetic is exact:
/// the accumulators equal INT32 accumulation, computed by the same
/// kernels as the f32 plane, and the AVX2 kernel applies the epilogue in
/// registers. `buf` is scratch of [`int_scratch_len`] floats.
///
/// # Panics
/// If a buffer is shorter than the geometry needs or the kernel has more
/// than 1024 taps.
pub fn depthwise_plane_int(
    isa: Isa,
    g: &PlaneGeometry,
    x: PlaneSource,
    w: &[f32],
    out: IntPlaneOut,
    buf: &mut [f32],
) {
    let n = g.oh * g.ow;
    assert!(g.kh * g.kw <= 1024, "integer depthwise: too many taps");
    assert!(w.len() >= g.kh * g.kw);
    assert!(buf.len() >= int_scratch_len(g));
    let (plane, rest) = buf.split_at_mut(g.scratch_len());
    let (rowbuf, accbuf) = rest.split_at_mut(g.w);
    let split = g.stride[1] == 2;
    pad_plane(isa, g, x, plane, rowbuf, split);
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() && g.stride[1] <= 2 && g.kh * g.kw <= MAX_TAPS {
        let inf = (f32::NEG_INFINITY, f32::INFINITY);
        let (post, clamp, dst) = match out {
            IntPlaneOut::Acc(a) => {
                assert!(a.len() >= n);
                (None, inf, RowDst::F32(a.as_mut_ptr()))
            }
            IntPlaneOut::F32(y, r) => {
                assert!(y.len() >= n);
                (
                    Some((r.scale, r.bias)),
                    (r.lo, r.hi),
                    RowDst::F32(y.as_mut_ptr()),
                )
            }
            IntPlaneOut::I8(y, r, inv) => {
                assert!(y.len() >= n);
                (
                    Some((r.scale, r.bias)),
                    (r.lo, r.hi),
                    RowDst::I8(y.as_mut_ptr(), inv),
                )
            }
        };
        // SAFETY: AVX2 and FMA are present (an AVX2 tier is active); the padded
        // plane has SLACK floats after its last row; the destination holds
        // oh·ow elements (checked above).
        unsafe { avx2_fma_depthwise_rows(g, plane, w, 0.0, post, clamp, dst) };
        return;
    }
    match out {
        IntPlaneOut::Acc(a) => portable_rows(g, plane, split, w, 0.0, &mut a[..n]),
        IntPlaneOut::F32(y, r) => {
            let y = &mut y[..n];
            portable_rows(g, plane, split, w, 0.0, y);
            y.iter_mut().for_each(|v| *v = r.apply(*v));
        }
        IntPlaneOut::I8(y, r, inv) => {
            let acc = &mut accbuf[..n];
            portable_rows(g, plane, split, w, 0.0, acc);
            acc.iter_mut().for_each(|v| *v = r.apply(*v));
            crate::int8::quantize_to_i8(isa, acc, inv, &mut y[..n]);
        }
    }
}

/// The rows of one padded plane: `y = clamp(bias + Σ w·x)`.
#[allow(clippy::too_many_arguments)]
fn rows(
    isa: Isa,
    g: &PlaneGeometry,
    buf: &[f32],
    split: bool,
    w: &[f32],
    bias: f32,
    clamp: Option<(f32, f32)>,
    y: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the AVX2 tiers are only active when the CPU has AVX2 and FMA; the
        // padded buffer has SLACK floats after the last row, which covers
        // every vector load (see `avx2_fma_depthwise_rows`).
        Isa::Avx2Fma | Isa::Avx512 if g.stride[1] <= 2 && g.kh * g.kw <= MAX_TAPS => unsafe {
            let clamp = clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
            avx2_fma_depthwise_rows(g, buf, w, bias, None, clamp, RowDst::F32(y.as_mut_ptr()))
        },
        _ => {
            portable_rows(g, buf, split, w, bias, y);
            if let Some((lo, hi)) = clamp {
                y[..g.oh * g.ow]
                    .iter_mut()
                    .for_each(|v| *v = v.max(lo).min(hi));
            }
        }
    }
}

/// Convolves one plane: `y = act(bias + Σ w·x)`. `buf` is scratch of
/// [`PlaneGeometry::scratch_len`] floats.
///
/// # Panics
/// If a buffer is shorter than the geometry needs.
#[allow(clippy::too_many_arguments)]
pub fn depthwise_plane(
    isa: Isa,
    g: &PlaneGeometry,
    x: &[f32],
    w: &[f32],
    bias: f32,
    act: Activation,
    y: &mut [f32],
    buf: &mut [f32],
) {
    assert!(x.len() >= g.h * g.w && y.len() >= g.oh * g.ow && w.len() >= g.kh * g.kw);
    assert!(buf.len() >= g.scratch_len());
    let split = g.stride[1] == 2;
    pad_plane(isa, g, PlaneSource::F32(x), buf, &mut [], split);
    let clamp = match act {
        Activation::None => Some((f32::NEG_INFINITY, f32::INFINITY)),
        Activation::Relu => Some((0.0, f32::INFINITY)),
        Activation::Clip { lo, hi } => Some((lo, hi)),
        _ => None,
    };
    rows(isa, g, buf, split, w, bias, clamp, y);
    if clamp.is_none() {
        act.apply_slice(&mut y[..g.oh * g.ow]);
    }
}

/// Plane element types [`deinterleave`] reads, with their AVX2 form.
trait Lane: Copy + Into<f32> {
    /// Deinterleaves whole SIMD blocks; returns the pairs done.
    fn deinterleave_simd(isa: Isa, src: &[Self], d0: &mut [f32], d1: &mut [f32]) -> usize;
}

impl Lane for f32 {
    fn deinterleave_simd(isa: Isa, src: &[f32], d0: &mut [f32], d1: &mut [f32]) -> usize {
        #[cfg(target_arch = "x86_64")]
        if isa.has_avx2() {
            // SAFETY: AVX2 is available (an AVX2 tier is active); the kernel
            // touches src[..16·blocks], d0/d1[..8·blocks], checked by the
            // caller.
            return unsafe { avx2_deinterleave(src, d0, d1) };
        }
        let _ = (isa, src, d0, d1);
        0
    }
}

impl Lane for i8 {
    fn deinterleave_simd(isa: Isa, src: &[i8], d0: &mut [f32], d1: &mut [f32]) -> usize {
        #[cfg(target_arch = "x86_64")]
        if isa.has_avx2() {
            // SAFETY: AVX2 is available; the kernel reads src[..16·blocks]
            // and writes d0/d1[..8·blocks], checked by the caller.
            return unsafe { avx2_deinterleave_i8(src, d0, d1) };
        }
        let _ = (isa, src, d0, d1);
        0
    }
}

/// `d0[i] = src[2i]`, `d1[i] = src[2i + 1]` for every element of `src`, as
/// f32 (exact for INT8).
fn deinterleave<T: Lane>(isa: Isa, src: &[T], d0: &mut [f32], d1: &mut [f32]) {
    let pairs = src.len() / 2;
    assert!(d0.len() >= src.len().div_ceil(2) && d1.len() >= pairs);
    let done = T::deinterleave_simd(isa, src, d0, d1);
    for i in done..pairs {
        d0[i] = src[2 * i].into();
        d1[i] = src[2 * i + 1].into();
    }
    if src.len() % 2 == 1 {
        d0[pairs] = src[2 * pairs].into();
    }
}

/// Deinterleaves and widens whole blocks of 16 bytes; returns the pairs
/// done.
///
/// # Safety
/// AVX2 must be available; `d0` and `d1` hold at least `src.len() / 2` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2_deinterleave_i8(src: &[i8], d0: &mut [f32], d1: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let blocks = src.len() / 16;
    // Even bytes to the low half, odd bytes to the high half.
    let order = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for b in 0..blocks {
        // SAFETY: 16 bytes read at 16·b < src.len(); 8 floats written at
        // 8·b into each destination, which hold src.len()/2 >= 8·blocks.
        unsafe {
            let v = _mm_shuffle_epi8(
                _mm_loadu_si128(src.as_ptr().add(16 * b) as *const __m128i),
                order,
            );
            let e = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
            let o = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(v)));
            _mm256_storeu_ps(d0.as_mut_ptr().add(8 * b), e);
            _mm256_storeu_ps(d1.as_mut_ptr().add(8 * b), o);
        }
    }
    blocks * 8
}

/// Deinterleaves whole blocks of 16; returns the pairs done.
///
/// # Safety
/// AVX2 must be available; `d0` and `d1` hold at least `src.len() / 2` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2_deinterleave(src: &[f32], d0: &mut [f32], d1: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let blocks = src.len() / 16;
    for b in 0..blocks {
        // SAFETY: 16 floats read at 16·b < src.len(); 8 written at 8·b into
        // each destination, which hold src.len()/2 >= 8·blocks floats.
        unsafe {
            let a = _mm256_loadu_ps(src.as_ptr().add(16 * b));
            let c = _mm256_loadu_ps(src.as_ptr().add(16 * b + 8));
            // Per 128-bit lane: evens [a0 a2 c0 c2], odds [a1 a3 c1 c3];
            // then fix the lane order with a 64-bit permute.
            let e = _mm256_shuffle_ps::<0b10_00_10_00>(a, c);
            let o = _mm256_shuffle_ps::<0b11_01_11_01>(a, c);
            let e = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(e)));
            let o = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(o)));
            _mm256_storeu_ps(d0.as_mut_ptr().add(8 * b), e);
            _mm256_storeu_ps(d1.as_mut_ptr().add(8 * b), o);
        }
    }
    blocks * 8
}

/// Offset of tap column `kx` (and its step per output) in a padded row.
#[inline(always)]
fn tap_col(pw: usize, split: bool, sx: usize, col: usize) -> (usize, usize) {
    if split {
        let ne = pw.div_ceil(2);
        ((col % 2) * ne + col / 2, 1)
    } else {
        (col, sx)
    }
}

fn portable_rows(g: &PlaneGeometry, buf: &[f32], split: bool, w: &[f32], bias: f32, y: &mut [f32]) {
    let pw = g.pw();
    let (sy, sx) = (g.stride[0], g.stride[1]);
    let (dy, dx) = (g.dilation[0], g.dilation[1]);
    for oy in 0..g.oh {
        let out = &mut y[oy * g.ow..(oy + 1) * g.ow];
        out.iter_mut().for_each(|v| *v = bias);
        for ky in 0..g.kh {
            let row = &buf[(oy * sy + ky * dy) * pw..];
            for kx in 0..g.kw {
                let wv = w[ky * g.kw + kx];
                let (off, step) = tap_col(pw, split, sx, kx * dx);
                let src = &row[off..];
                if step == 1 {
                    for (o, s) in out.iter_mut().zip(src) {
                        *o += wv * *s;
                    }
                } else {
                    for (o, s) in out.iter_mut().zip(src.iter().step_by(step)) {
                        *o += wv * *s;
                    }
                }
            }
        }
    }
}

/// Where the AVX2 rows kernel stores.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum RowDst {
    F32(*mut f32),
    /// INT8, with the reciprocal output scale.
    I8(*mut i8, f32),
}

/// `dst = clamp(post(init + Σ w·x))`, where `post` is `acc·scale + bias`
/// when given.
///
/// # Safety
/// AVX2 and FMA must be available; `buf` holds the padded plane plus
/// [`SLACK`] floats; `dst` holds oh·ow elements; stride x is 1 or 2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_fma_depthwise_rows(
    g: &PlaneGeometry,
    buf: &[f32],
    w: &[f32],
    init: f32,
    post: Option<(f32, f32)>,
    clamp: (f32, f32),
    dst: RowDst,
) {
    use std::arch::x86_64::*;
    let pw = g.pw();
    let (sy, sx) = (g.stride[0], g.stride[1]);
    let (dy, dx) = (g.dilation[0], g.dilation[1]);
    let ow = g.ow;
    let taps = g.kh * g.kw;
    // Largest element read: row (oh-1)*sy + (kh-1)*dy, column below
    // pw + 8 (a vector starting inside the row) — inside the plane plus SLACK.
    debug_assert!(((g.oh - 1) * sy + (g.kh - 1) * dy + 1) * pw + 24 <= buf.len());
    let bp = buf.as_ptr();
    let dst_base = dst;
    let plane_len = g.oh * g.ow;
    let lane_ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);

    // SAFETY: every load reads at most 16 floats from an address inside the
    // padded plane, covered by SLACK; every store writes inside the output
    // row (full vectors) or is masked to the row's remaining lanes.
    unsafe {
        // Stride 2 was split into column phases by `pad_plane`, so every tap
        // reads a contiguous run.
        let load = |p: *const f32| -> __m256 { _mm256_loadu_ps(p) };
        let split = sx == 2;
        let (vlo, vhi) = (_mm256_set1_ps(clamp.0), _mm256_set1_ps(clamp.1));
        let vinit = _mm256_set1_ps(init);
        let (ps, pb) = post.unwrap_or((1.0, 0.0));
        let (vps, vpb) = (_mm256_set1_ps(ps), _mm256_set1_ps(pb));
        let q = crate::qconv::QMAX;
        let (qlo, qhi) = (_mm256_set1_ps(-q), _mm256_set1_ps(q));
        // Tap offsets into the padded plane, computed once (no divisions in
        // the hot loop).
        let mut offs = [0usize; MAX_TAPS];
        // (Nested loops: an integer division per tap costs more than the
        // whole convolution of a 7x7 plane.)
        let mut t = 0;
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                offs[t] = ky * dy * pw + tap_col(pw, split, sx, kx * dx).0;
                t += 1;
            }
        }
        // Every output vector (8 outputs of one row; the row's last one may be
        // partial) is a "job". Jobs are computed four at a time so four
        // independent FMA chains hide the FMA latency even on 7-wide planes.
        const GROUP: usize = 4;
        let mut src = [bp; GROUP];
        let mut dst = [0usize; GROUP];
        let mut rem = [0usize; GROUP];
        let mut n = 0;
        let vecs_per_row = ow.div_ceil(8);
        let flush =
            |src: &[*const f32; GROUP], dst: &[usize; GROUP], rem: &[usize; GROUP], n: usize| {
                let mut acc = [vinit; GROUP];
                for t in 0..taps {
                    let off = *offs.get_unchecked(t);
                    let wv = _mm256_set1_ps(*w.get_unchecked(t));
                    for j in 0..GROUP {
                        acc[j] = _mm256_fmadd_ps(wv, load(src[j].add(off)), acc[j]);
                    }
                }
                for j in 0..n {
                    if post.is_some() {
                        acc[j] = _mm256_fmadd_ps(acc[j], vps, vpb);
                    }
                    acc[j] = _mm256_min_ps(_mm256_max_ps(acc[j], vlo), vhi);
                    match dst_base {
                        RowDst::F32(y) => {
                            let d = y.add(dst[j]);
                            if rem[j] >= 8 {
                                _mm256_storeu_ps(d, acc[j]);
                            } else {
                                let mask =
                                    _mm256_cmpgt_epi32(_mm256_set1_epi32(rem[j] as i32), lane_ids);
                                _mm256_maskstore_ps(d, mask, acc[j]);
                            }
                        }
                        RowDst::I8(y, inv) => {
                            let v = _mm256_mul_ps(acc[j], _mm256_set1_ps(inv));
                            let v = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, qlo), qhi));
                            let h = _mm_packs_epi32(
                                _mm256_castsi256_si128(v),
                                _mm256_extracti128_si256::<1>(v),
                            );
                            let b = _mm_packs_epi16(h, h);
                            let d = y.add(dst[j]);
                            // A row's partial vector may spill into the
                            // next rows: jobs are stored in order, so
                            // those bytes are rewritten by later jobs. Only
                            // the plane's end must not be crossed.
                            if rem[j] >= 8 || dst[j] + 8 <= plane_len {
                                _mm_storel_epi64(d as *mut __m128i, b);
                            } else {
                                let mut tmp = [0i8; 16];
                                _mm_storeu_si128(tmp.as_mut_ptr() as *mut __m128i, b);
                                for (k, &v) in tmp.iter().enumerate().take(rem[j]) {
                                    *d.add(k) = v;
                                }
                            }
                        }
                    }
                }
            };
        for oy in 0..g.oh {
            let row_in = bp.add(oy * sy * pw);
            for v in 0..vecs_per_row {
                let ox = v * 8;
                src[n] = row_in.add(ox);
                dst[n] = oy * ow + ox;
                rem[n] = ow - ox;
                n += 1;
                if n == GROUP {
                    flush(&src, &dst, &rem, n);
                    n = 0;
                }
            }
        }
        if n > 0 {
            // Unused slots recompute job 0 (in bounds) and are not stored.
            for j in n..GROUP {
                src[j] = src[0];
            }
            flush(&src, &dst, &rem, n);
        }
    }
}

/// Scalar reference for one plane, straight from the definition.
pub fn reference_depthwise_plane(
    g: &PlaneGeometry,
    x: &[f32],
    w: &[f32],
    bias: f32,
    y: &mut [f32],
) {
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let mut s = bias as f64;
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pads[0] as isize;
                    let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.pads[1] as isize;
                    if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                        s += x[iy as usize * g.w + ix as usize] as f64 * w[ky * g.kw + kx] as f64;
                    }
                }
            }
            y[oy * g.ow + ox] = s as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn fast_paths_match_reference(
            h in 1usize..40, w in 1usize..70, k in 1usize..6, s in 1usize..4, d in 1usize..3,
            pt in 0usize..3, pl in 0usize..3, pb in 0usize..3, pr in 0usize..3, portable: bool,
        ) {
            let span = (k - 1) * d + 1;
            prop_assume!(h + pt + pb >= span && w + pl + pr >= span);
            let g = PlaneGeometry {
                h, w, oh: (h + pt + pb - span) / s + 1, ow: (w + pl + pr - span) / s + 1,
                kh: k, kw: k, stride: [s, s], dilation: [d, d], pads: [pt, pl, pb, pr],
            };
            let x: Vec<f32> = (0..h * w).map(|i| ((i * 7919) % 211) as f32 / 100.0 - 1.0).collect();
            let wt: Vec<f32> = (0..k * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut want = vec![0.0; g.oh * g.ow];
            reference_depthwise_plane(&g, &x, &wt, 0.25, &mut want);
            let isa = if portable { Isa::Scalar } else { crate::isa::active() };
            let mut got = vec![f32::NAN; g.oh * g.ow + 9];
            let mut buf = vec![f32::NAN; g.scratch_len()];
            depthwise_plane(isa, &g, &x, &wt, 0.25, Activation::None, &mut got, &mut buf);
            for (a, b) in got.iter().zip(&want) {
                prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
            // Nothing written past the output.
            prop_assert!(got[g.oh * g.ow..].iter().all(|v| v.is_nan()));
        }

        #[test]
        fn integer_planes_are_exact(
            h in 1usize..30, w in 1usize..50, k in 1usize..8, s in 1usize..4,
            pt in 0usize..3, pl in 0usize..3, pb in 0usize..3, pr in 0usize..3,
            portable: bool, from_f32: bool, seed in any::<u64>(),
        ) {
            prop_assume!(h + pt + pb >= k && w + pl + pr >= k);
            let g = PlaneGeometry {
                h, w, oh: (h + pt + pb - k) / s + 1, ow: (w + pl + pr - k) / s + 1,
                kh: k, kw: k, stride: [s, s], dilation: [1, 1], pads: [pt, pl, pb, pr],
            };
            let mut st = seed | 1;
            let mut next = || { st ^= st << 13; st ^= st >> 7; st ^= st << 17; ((st >> 56) as i8).max(-127) };
            // Extremes often: all ±127 products make the largest sums.
            let x: Vec<i8> = (0..h * w).map(|i| if i % 3 == 0 { 127 } else { next() }).collect();
            let wt: Vec<i8> = (0..k * k).map(|i| if i % 2 == 0 { 127 } else { next() }).collect();
            let isa = if portable { Isa::Scalar } else { crate::isa::active() };
            let mut acc = vec![f32::NAN; g.oh * g.ow];
            let mut buf = vec![f32::NAN; int_scratch_len(&g)];
            let wf: Vec<f32> = wt.iter().map(|&v| v as f32).collect();
            // The same integers reach the kernel from INT8 or from f32
            // values quantized on the fly (x·scale, scale 0.5).
            let xf: Vec<f32> = x.iter().map(|&v| v as f32 * 0.5).collect();
            let src = if from_f32 { PlaneSource::Quantize(&xf, 2.0) } else { PlaneSource::I8(&x) };
            depthwise_plane_int(isa, &g, src, &wf, IntPlaneOut::Acc(&mut acc), &mut buf);
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let mut want = 0i64;
                    for ky in 0..k {
                        for kx in 0..k {
                            let (iy, ix) = ((oy * s + ky) as isize - pt as isize, (ox * s + kx) as isize - pl as isize);
                            if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                want += x[iy as usize * w + ix as usize] as i64 * wt[ky * k + kx] as i64;
                            }
                        }
                    }
                    prop_assert_eq!(acc[oy * g.ow + ox], want as f32);
                    prop_assert_eq!(acc[oy * g.ow + ox] as i64, want);
                }
            }
            // The fused epilogues equal the accumulators' epilogue (to the
            // FMA's rounding: one ulp, or one INT8 step at a half-step tie).
            let r = Requant { scale: 0.013, bias: -0.7, lo: 0.0, hi: 6.0 };
            let mut y = vec![f32::NAN; g.oh * g.ow];
            depthwise_plane_int(isa, &g, src, &wf, IntPlaneOut::F32(&mut y, r), &mut buf);
            let mut y8 = vec![99i8; g.oh * g.ow + 16];
            let inv = 127.0 / 6.0;
            let plane = g.oh * g.ow;
            depthwise_plane_int(isa, &g, src, &wf, IntPlaneOut::I8(&mut y8[..plane], r, inv), &mut buf);
            // Nothing written past the plane.
            prop_assert!(y8[plane..].iter().all(|&v| v == 99));
            for i in 0..y.len() {
                let want = r.apply(acc[i]);
                prop_assert!((y[i] - want).abs() <= 1e-6 * (1.0 + want.abs()), "{} vs {}", y[i], want);
                let q = crate::qconv::quantize(want, inv);
                prop_assert!((y8[i] as i16 - q).abs() <= 1, "{} vs {}", y8[i], q);
            }
        }
    }
}
