//! The depthwise algorithm: each output pixel's channels are one vector
//! sum over the valid taps, vectorised across channels.

use super::{Conv2dNhwc, MAX_TAPS};
use crate::isa::Isa;
use crate::pool::{SyncPtr, ThreadPool};

impl Conv2dNhwc {
    pub(super) fn run_depthwise<T: DwElem>(
        &self,
        pool: &ThreadPool,
        isa: Isa,
        x: &[T],
        res: Option<&[f32]>,
        y: &mut [f32],
        w: &[f32],
    ) {
        let c = self.g.c_out;
        let row_len = self.ow * c;
        let y_ptr = SyncPtr::new(y);
        let task = |oy: usize, _slot: usize| {
            // SAFETY: task `oy` alone writes output row `oy`, inside `y` by
            // the assert in `run`.
            let yr = unsafe { std::slice::from_raw_parts_mut(y_ptr.add(oy * row_len), row_len) };
            let rr = res.map(|r| &r[oy * row_len..(oy + 1) * row_len]);
            self.depthwise_row(isa, x, w, oy, rr, RowOut::F32(yr), None);
        };
        pool.run(self.oh, &task);
    }

    /// One output row of a depthwise layer; `x` is the whole input, or
    /// with `ring` the ring buffer holding the rows this output row reads.
    /// INT8 input (`T = i8`) is read as the floats its values are (the
    /// caller folds its scale into the weights).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn depthwise_row<T: DwElem>(
        &self,
        isa: Isa,
        x: &[T],
        w: &[f32],
        oy: usize,
        res: Option<&[f32]>,
        mut sink: RowOut,
        ring: Option<Ring>,
    ) {
        let g = &self.g;
        let c = g.c_out;
        // Every tap offset below addresses `c` floats inside `x`.
        let held_rows = ring.map_or(g.h, |r| r.rows * r.groups);
        assert!(x.len() >= held_rows * g.w * c && w.len() >= g.kh * g.kw * c);
        let clamp = crate::gemm::in_register_clamp(self.act);
        let mut taps = [(0usize, 0usize); MAX_TAPS];
        let taps_of = |ox: usize, taps: &mut [(usize, usize); MAX_TAPS]| {
            let mut n = 0;
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    if let Some(px) = self.tap_pixel(oy, ox, ky, kx) {
                        let px = match ring {
                            Some(r) => r.slot(px / g.w) * g.w + px % g.w,
                            None => px,
                        };
                        taps[n] = (px * c, (ky * g.kw + kx) * c);
                        n += 1;
                    }
                }
            }
            n
        };
        // A pixel is interior when every column of its window is inside
        // the input; the taps of interior pixels of one row differ only by
        // a shift, so they are computed once and moved along.
        let sx = g.stride[1];
        let mut n = 0;
        let mut at: Option<usize> = None;
        let mut ox = 0;
        while ox < self.ow {
            match at {
                Some(prev) if self.interior_col(ox) => {
                    let shift = (ox - prev) * sx * c;
                    taps[..n].iter_mut().for_each(|t| t.0 += shift);
                    at = Some(ox);
                }
                _ => {
                    n = taps_of(ox, &mut taps);
                    at = self.interior_col(ox).then_some(ox);
                }
            }
            // Interior neighbours share the weight loads: two with AVX2,
            // up to four with AVX-512; they are `stride · c` floats apart.
            let most = if isa.has_avx512() { DW_GROUP } else { 2 };
            let mut px = 1;
            while at.is_some() && px < most && ox + px < self.ow && self.interior_col(ox + px) {
                px += 1;
            }
            // An INT8 row with an activation applied in registers: the
            // AVX-512 kernel requantizes before its store (`quantized`).
            #[cfg(target_arch = "x86_64")]
            let out_i8 = match &mut sink {
                RowOut::I8 { y, inv, .. } if clamp.is_some() && isa.has_avx512() => {
                    Some((y[ox * c..(ox + px) * c].as_mut_ptr(), *inv))
                }
                _ => None,
            };
            #[cfg(not(target_arch = "x86_64"))]
            let out_i8: Option<(*mut i8, f32)> = None;
            let quantized = out_i8.is_some();
            let out = match &mut sink {
                RowOut::F32(y) => &mut y[ox * c..(ox + px) * c],
                RowOut::I8 { buf, .. } => &mut buf[..px * c],
            };
            let r = res.map(|r| &r[ox * c..(ox + px) * c]);
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the AVX2 tiers are active only when the CPU has
                // AVX2 and FMA (AVX-512 on its tier); every tap offset (plus,
                // for the later pixels of a group, `p · stride · c`: they are
                // interior) addresses `c` floats inside `x`, the weights
                // hold `c` floats per tap, and `out`/`r` hold `px · c`
                // floats.
                Isa::Avx2Fma | Isa::Avx512 => unsafe {
                    let (lo, hi) = clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
                    let dw = DwSimd {
                        x: x.as_ptr(),
                        w: w.as_ptr(),
                        taps: &taps[..n],
                        pstep: g.stride[1] * c,
                        bias: self.bias.as_ptr(),
                        res: r.map(|r| r.as_ptr()),
                        out: out.as_mut_ptr(),
                        out_i8,
                        c,
                        lo,
                        hi,
                    };
                    // Four interior pixels of a stride-1 layer: taps come
                    // in whole rows of `kw` columns (a sliding window).
                    let rows = px == 4 && g.stride[1] == 1 && g.dilation[1] == 1 && n % g.kw == 0;
                    match (isa.has_avx512(), px, if rows { g.kw } else { 0 }) {
                        (true, 4, 3) => dw.run_avx512::<4, 3>(),
                        (true, 4, 5) => dw.run_avx512::<4, 5>(),
                        (true, 4, _) => dw.run_avx512::<4, 0>(),
                        (true, 3, _) => dw.run_avx512::<3, 0>(),
                        (true, 2, _) => dw.run_avx512::<2, 0>(),
                        (true, _, _) => dw.run_avx512::<1, 0>(),
                        (false, 2, _) => dw.run::<2>(),
                        (false, _, _) => dw.run::<1>(),
                    }
                },
                _ => {
                    for p in 0..px {
                        depthwise_pixel_body::<T, { cfg!(target_arch = "aarch64") }>(
                            &x[p * sx * c..],
                            w,
                            &taps[..n],
                            &self.bias[..c],
                            r.map(|r| &r[p * c..(p + 1) * c]),
                            &mut out[p * c..(p + 1) * c],
                        );
                        if let Some((lo, hi)) = clamp {
                            let o = &mut out[p * c..(p + 1) * c];
                            o.iter_mut().for_each(|v| *v = v.max(lo).min(hi));
                        }
                    }
                }
            }
            if clamp.is_none() {
                self.act.apply_slice(out);
            }
            if let (RowOut::I8 { buf, y, inv }, false) = (&mut sink, quantized) {
                let q = &mut y[ox * c..(ox + px) * c];
                crate::int8::quantize_to_i8(isa, &buf[..px * c], *inv, q);
            }
            ox += px;
        }
    }
}

/// Input rows held in a ring buffer (a fused expansion's output, see
/// [`Conv2dNhwc::run_expand_depthwise`]): rows are computed in groups of
/// `rows` consecutive ones, and group `j` sits at group slot
/// `j mod groups`, so row `iy` is at row slot
/// `((iy / rows) mod groups) · rows + iy mod rows`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ring {
    pub rows: usize,
    pub groups: usize,
}

impl Ring {
    /// The row slot of input row `iy`.
    #[inline(always)]
    pub fn slot(self, iy: usize) -> usize {
        (iy / self.rows) % self.groups * self.rows + iy % self.rows
    }
}

/// What a depthwise layer may read: f32, or INT8 values used as the
/// floats they are (exactly: every `i8` is a float). Sealed: the SIMD
/// kernels load each type their own way (`I8`).
pub trait DwElem: Copy + Into<f32> + Send + Sync + sealed::Sealed + 'static {
    /// Whether the elements are `i8` (else `f32`).
    const I8: bool;
}
impl DwElem for f32 {
    const I8: bool = false;
}
impl DwElem for i8 {
    const I8: bool = true;
}
mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for i8 {}
}

/// Most neighbouring pixels one depthwise step computes (AVX-512; two with
/// AVX2, one otherwise).
pub(super) const DW_GROUP: usize = 4;

/// Where [`Conv2dNhwc::depthwise_row`] puts an output row.
pub(super) enum RowOut<'a> {
    /// The f32 row.
    F32(&'a mut [f32]),
    /// Each pixel group computed into `buf` (at least [`DW_GROUP`] pixels)
    /// and requantized into the INT8 row `y` with `inv` (1 / scale).
    I8 {
        buf: &'a mut [f32],
        y: &'a mut [i8],
        inv: f32,
    },
}

/// The AVX2 / AVX-512 depthwise kernels' operands for a group of
/// neighbouring pixels (up to two with AVX2, four with AVX-512).
#[cfg(target_arch = "x86_64")]
struct DwSimd<'a, T> {
    /// Input, f32 or INT8 ([`DwElem`]).
    x: *const T,
    w: *const f32,
    /// (input offset of pixel 0, weight offset) per valid tap.
    taps: &'a [(usize, usize)],
    /// Input offset of pixel `p + 1` relative to pixel `p`.
    pstep: usize,
    bias: *const f32,
    /// Residual of pixel 0 (each next pixel's `c` floats later).
    res: Option<*const f32>,
    /// Output of pixel 0 (each next pixel's `c` floats later).
    out: *mut f32,
    /// Instead of `out` (AVX-512 only): the INT8 output of pixel 0 and
    /// 1 / its scale; each result is requantized in registers as
    /// [`crate::int8::quantize_to_i8`] would requantize the stored float.
    out_i8: Option<(*mut i8, f32)>,
    c: usize,
    lo: f32,
    hi: f32,
}

#[cfg(target_arch = "x86_64")]
impl<T: DwElem> DwSimd<'_, T> {
    /// `P` pixels: 32 channels at a time in registers (taps inner), then
    /// 8 at a time, then a masked tail.
    ///
    /// # Safety
    /// AVX2 and FMA available; the pointers as the caller documents.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run<const P: usize>(&self) {
        let mut c0 = 0;
        // SAFETY: forwarded; every block stays below `c`.
        unsafe {
            while c0 + 32 <= self.c {
                self.block::<4, P>(c0, None);
                c0 += 32;
            }
            while c0 + 8 <= self.c {
                self.block::<1, P>(c0, None);
                c0 += 8;
            }
            if c0 < self.c {
                self.block::<1, P>(c0, Some(self.c - c0));
            }
        }
    }

    /// `V` vectors of channels from `c0` (the last one `tail` lanes wide
    /// when given) for `P` pixels.
    ///
    /// # Safety
    /// As [`DwSimd::run`].
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block<const V: usize, const P: usize>(&self, c0: usize, tail: Option<usize>) {
        use std::arch::x86_64::*;
        // SAFETY: full vectors lie below `c` in every buffer; a tail vector
        // is masked to its `tail` lanes, so no masked-out lane is touched.
        unsafe {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail.unwrap_or(8) as i32), lanes);
            let ld = |p: *const f32| {
                if tail.is_some() {
                    _mm256_maskload_ps(p, mask)
                } else {
                    _mm256_loadu_ps(p)
                }
            };
            // INT8 input: 8 bytes widened to 8 floats (a tail's bytes
            // copied to a zeroed block first: no read past its lanes).
            let ldx = |p: *const T| {
                if T::I8 {
                    let b = p.cast::<i8>();
                    let bytes = match tail {
                        Some(n) => {
                            let mut blk = [0i8; 8];
                            std::ptr::copy_nonoverlapping(b, blk.as_mut_ptr(), n);
                            _mm_loadl_epi64(blk.as_ptr().cast())
                        }
                        None => _mm_loadl_epi64(b.cast()),
                    };
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes))
                } else {
                    ld(p.cast::<f32>())
                }
            };
            let mut acc = [[_mm256_setzero_ps(); V]; P];
            for row in acc.iter_mut() {
                for (v, a) in row.iter_mut().enumerate() {
                    *a = ld(self.bias.add(c0 + 8 * v));
                }
            }
            for &(xo, wo) in self.taps {
                let xp = self.x.add(xo + c0);
                let wp = self.w.add(wo + c0);
                for v in 0..V {
                    let wv = ld(wp.add(8 * v));
                    for (p, row) in acc.iter_mut().enumerate() {
                        row[v] = _mm256_fmadd_ps(ldx(xp.add(p * self.pstep + 8 * v)), wv, row[v]);
                    }
                }
            }
            let (vlo, vhi) = (_mm256_set1_ps(self.lo), _mm256_set1_ps(self.hi));
            for (p, row) in acc.iter().enumerate() {
                for (v, &a) in row.iter().enumerate() {
                    let off = p * self.c + c0 + 8 * v;
                    let mut r = a;
                    if let Some(res) = self.res {
                        r = _mm256_add_ps(r, ld(res.add(off)));
                    }
                    r = _mm256_min_ps(_mm256_max_ps(r, vlo), vhi);
                    if tail.is_some() {
                        _mm256_maskstore_ps(self.out.add(off), mask, r);
                    } else {
                        _mm256_storeu_ps(self.out.add(off), r);
                    }
                }
            }
        }
    }

    /// [`DwSimd::run`] in zmm registers: 64 channels at a time, then 16,
    /// then a masked tail.
    ///
    /// # Safety
    /// AVX-512 F available; the pointers as the caller documents.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn run_avx512<const P: usize, const KW: usize>(&self) {
        let mut c0 = 0;
        // SAFETY: forwarded; every block stays below `c`.
        unsafe {
            while c0 + 64 <= self.c {
                self.block512::<4, P, KW>(c0, 16);
                c0 += 64;
            }
            while c0 + 16 <= self.c {
                self.block512::<1, P, KW>(c0, 16);
                c0 += 16;
            }
            if c0 < self.c {
                self.block512::<1, P, KW>(c0, self.c - c0);
            }
        }
    }

    /// `V` zmm vectors of channels from `c0`, the last `last` lanes wide,
    /// for `P` pixels. `KW > 0` (stride 1, no dilation, `P + KW ≤ 9`):
    /// the taps are rows of `KW` neighbouring columns, and each row's
    /// `P + KW − 1` input columns are loaded once and shared by the
    /// pixels (a sliding window) instead of once per pixel and tap.
    ///
    /// # Safety
    /// As [`DwSimd::run_avx512`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    #[inline]
    unsafe fn block512<const V: usize, const P: usize, const KW: usize>(
        &self,
        c0: usize,
        last: usize,
    ) {
        use std::arch::x86_64::*;
        // SAFETY: full vectors lie below `c` in every buffer; the last
        // vector is masked to its `last` lanes, so no masked-out lane is
        // touched.
        unsafe {
            let full: __mmask16 = 0xffff;
            let tail = ((1u32 << last) - 1) as __mmask16;
            let m = |v: usize| if v + 1 == V { tail } else { full };
            // The masked lanes of the input, as floats (INT8: 16 bytes
            // widened).
            let ldx = |k: __mmask16, p: *const T| {
                if T::I8 {
                    let b = _mm_maskz_loadu_epi8(k, p.cast::<i8>());
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b))
                } else {
                    _mm512_maskz_loadu_ps(k, p.cast::<f32>())
                }
            };
            let mut acc = [[_mm512_setzero_ps(); V]; P];
            for row in acc.iter_mut() {
                for (v, a) in row.iter_mut().enumerate() {
                    *a = _mm512_maskz_loadu_ps(m(v), self.bias.add(c0 + 16 * v));
                }
            }
            if KW > 0 {
                // Row `ky`'s taps: input columns `kx` of pixel `p` are
                // column `p + kx` of the row (`c` floats apart), weights
                // `c` apart too.
                for row in self.taps.chunks_exact(KW) {
                    let (xo, wo) = row[0];
                    let xp = self.x.add(xo + c0);
                    let wp = self.w.add(wo + c0);
                    for v in 0..V {
                        let mut cols = [_mm512_setzero_ps(); 8];
                        for (j, col) in cols.iter_mut().enumerate().take(P + KW - 1) {
                            *col = ldx(m(v), xp.add(j * self.c + 16 * v));
                        }
                        for kx in 0..KW {
                            let wv = _mm512_maskz_loadu_ps(m(v), wp.add(kx * self.c + 16 * v));
                            for (p, acc_p) in acc.iter_mut().enumerate() {
                                acc_p[v] = _mm512_fmadd_ps(cols[p + kx], wv, acc_p[v]);
                            }
                        }
                    }
                }
            } else {
                for &(xo, wo) in self.taps {
                    let xp = self.x.add(xo + c0);
                    let wp = self.w.add(wo + c0);
                    for v in 0..V {
                        let wv = _mm512_maskz_loadu_ps(m(v), wp.add(16 * v));
                        for (p, row) in acc.iter_mut().enumerate() {
                            let xv = ldx(m(v), xp.add(p * self.pstep + 16 * v));
                            row[v] = _mm512_fmadd_ps(xv, wv, row[v]);
                        }
                    }
                }
            }
            let (vlo, vhi) = (_mm512_set1_ps(self.lo), _mm512_set1_ps(self.hi));
            let qmax = crate::qconv::QMAX;
            let (qlo, qhi) = (_mm512_set1_ps(-qmax), _mm512_set1_ps(qmax));
            for (p, row) in acc.iter().enumerate() {
                for (v, &a) in row.iter().enumerate() {
                    let off = p * self.c + c0 + 16 * v;
                    let mut r = a;
                    if let Some(res) = self.res {
                        r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(m(v), res.add(off)));
                    }
                    r = _mm512_min_ps(_mm512_max_ps(r, vlo), vhi);
                    match self.out_i8 {
                        // The stored float's requantization, step for step:
                        // times 1/scale, clamped to ±127, rounded to
                        // nearest even (the conversion's default mode;
                        // in range, so the saturating narrow never
                        // saturates).
                        Some((q, inv)) => {
                            let t = _mm512_mul_ps(r, _mm512_set1_ps(inv));
                            let t = _mm512_min_ps(_mm512_max_ps(t, qlo), qhi);
                            let i = _mm512_cvtps_epi32(t);
                            _mm512_mask_cvtsepi32_storeu_epi8(q.add(off), m(v), i);
                        }
                        None => _mm512_mask_storeu_ps(self.out.add(off), m(v), r),
                    }
                }
            }
        }
    }
}

/// `out = bias + Σ_taps x[xo..] · w[wo..] (+ res)`, across the channels.
#[inline(always)]
fn depthwise_pixel_body<T: DwElem, const FMA: bool>(
    x: &[T],
    w: &[f32],
    taps: &[(usize, usize)],
    bias: &[f32],
    res: Option<&[f32]>,
    out: &mut [f32],
) {
    let c = out.len();
    out.copy_from_slice(bias);
    for &(xo, wo) in taps {
        let (xs, ws) = (&x[xo..xo + c], &w[wo..wo + c]);
        for ((o, &a), &b) in out.iter_mut().zip(xs).zip(ws) {
            let a: f32 = a.into();
            *o = if FMA { a.mul_add(b, *o) } else { *o + a * b };
        }
    }
    if let Some(r) = res {
        out.iter_mut().zip(r).for_each(|(o, &v)| *o += v);
    }
}
