//! The pair form of the INT8 GEMM micro-kernel: `QMR` output channels ×
//! `QNR` pixels, INT8 values in 16-bit lanes, pairs of products summed into
//! `i32` (`vpmaddwd` on AVX2, `smlal` + `addp` on NEON), and the packing of
//! its input panels. See the parent module for the layout.

#[cfg(target_arch = "x86_64")]
use super::{accumulate_avx2, epilogue_avx2, Fused, QMAX};
use super::{quantize, QMR, QNR};
use crate::isa::Isa;

/// Interleaves two rows of up to `QNR` INT8 values into `QNR` pairs
/// (`dst[2j] = r0[j]`, `dst[2j+1] = r1[j]`); missing values are zero.
pub(super) fn pack_pair_rows_i8(isa: Isa, r0: &[i8], r1: Option<&[i8]>, dst: &mut [i16]) {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2()
        && r0.len() == QNR
        && r1.is_none_or(|r| r.len() == QNR)
        && dst.len() >= 2 * QNR
    {
        // SAFETY: AVX2 is present when this tier is active; the lengths were
        // just checked.
        unsafe { pack_pair_rows_i8_avx2(r0, r1, dst) };
        return;
    }
    let _ = isa;
    for j in 0..QNR {
        dst[2 * j] = r0.get(j).map_or(0, |&v| v as i16);
        dst[2 * j + 1] = r1.and_then(|r| r.get(j)).map_or(0, |&v| v as i16);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn pack_pair_rows_i8_avx2(r0: &[i8], r1: Option<&[i8]>, dst: &mut [i16]) {
    use std::arch::x86_64::*;
    // SAFETY: r0 (and r1) hold QNR = 16 bytes; dst holds 32 i16.
    unsafe {
        let a = _mm256_cvtepi8_epi16(_mm_loadu_si128(r0.as_ptr() as *const __m128i));
        let b = match r1 {
            Some(r) => _mm256_cvtepi8_epi16(_mm_loadu_si128(r.as_ptr() as *const __m128i)),
            None => _mm256_setzero_si256(),
        };
        // Per 128-bit lane: lo = pairs 0-3 | 8-11, hi = pairs 4-7 | 12-15.
        let lo = _mm256_unpacklo_epi16(a, b);
        let hi = _mm256_unpackhi_epi16(a, b);
        let p0 = _mm256_permute2x128_si256::<0x20>(lo, hi);
        let p1 = _mm256_permute2x128_si256::<0x31>(lo, hi);
        _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, p0);
        _mm256_storeu_si256(dst.as_mut_ptr().add(16) as *mut __m256i, p1);
    }
}

/// Quantizes two rows of up to `QNR` values and interleaves them into
/// `QNR` pairs (`dst[2j] = q(r0[j])`, `dst[2j+1] = q(r1[j])`); missing
/// values are zero.
pub(super) fn pack_pair_rows(isa: Isa, r0: &[f32], r1: Option<&[f32]>, inv: f32, dst: &mut [i16]) {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2()
        && r0.len() == QNR
        && r1.is_none_or(|r| r.len() == QNR)
        && dst.len() >= 2 * QNR
    {
        // SAFETY: AVX2 is present when this tier is active; the lengths were
        // just checked.
        unsafe { pack_pair_rows_avx2(r0, r1, inv, dst) };
        return;
    }
    let _ = isa;
    for j in 0..QNR {
        dst[2 * j] = r0.get(j).map_or(0, |&v| quantize(v, inv));
        dst[2 * j + 1] = r1.and_then(|r| r.get(j)).map_or(0, |&v| quantize(v, inv));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn pack_pair_rows_avx2(
    r0: &[f32],
    r1: Option<&[f32]>,
    inv: f32,
    dst: &mut [i16],
) {
    use std::arch::x86_64::*;
    let vinv = _mm256_set1_ps(inv);
    let (lo, hi) = (_mm256_set1_ps(-QMAX), _mm256_set1_ps(QMAX));
    let mask = _mm256_set1_epi32(0xffff);
    let q = |p: *const f32| {
        // SAFETY: callers pass pointers to 8 readable floats.
        let v = unsafe { _mm256_loadu_ps(p) };
        let v = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, vinv), lo), hi);
        _mm256_cvtps_epi32(v)
    };
    for h in 0..2 {
        let a = q(r0[8 * h..].as_ptr());
        let b = match r1 {
            Some(r) => q(r[8 * h..].as_ptr()),
            None => _mm256_setzero_si256(),
        };
        let v = _mm256_or_si256(_mm256_and_si256(a, mask), _mm256_slli_epi32::<16>(b));
        // SAFETY: dst holds 2·QNR i16; this writes 16 of them at 16·h.
        unsafe { _mm256_storeu_si256(dst.as_mut_ptr().add(16 * h) as *mut __m256i, v) };
    }
}

/// The micro-kernel: `acc[r][j] += Σ_p a[p][r]·b[p][j]` over `kpairs` pairs
/// (each term itself a pair of products).
pub fn tile(isa: Isa, kpairs: usize, a: &[i16], b: &[i16], acc: &mut [[i32; QNR]; QMR]) {
    assert!(a.len() >= kpairs * QMR * 2 && b.len() >= kpairs * QNR * 2);
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: AVX2 is present when this tier is active; lengths checked.
        unsafe { tile_avx2(kpairs, a, b, acc) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon {
        // SAFETY: NEON is baseline on aarch64; lengths checked above.
        unsafe { tile_neon(kpairs, a, b, acc) };
        return;
    }
    let _ = isa;
    tile_ref(kpairs, a, b, acc)
}

/// NEON: widening multiply-accumulate (`smlal`/`smlal2`) of each pixel's
/// pair against the broadcast weight pair, in two 8-pixel halves (24
/// accumulators each); the two products of a pair are summed at the end
/// with one pairwise add (`addp`).
#[cfg(target_arch = "aarch64")]
pub(super) unsafe fn tile_neon(kpairs: usize, a: &[i16], b: &[i16], acc: &mut [[i32; QNR]; QMR]) {
    use std::arch::aarch64::*;
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for half in 0..2 {
        // [row][quad of 2 pixels' pairs][lo/hi]
        // SAFETY: (whole block) the caller checked a (kpairs·QMR·2) and
        // b (kpairs·QNR·2); loads stay within them.
        unsafe {
            let z = vdupq_n_s32(0);
            let mut lo = [[z; 2]; QMR];
            let mut hi = [[z; 2]; QMR];
            for p in 0..kpairs {
                // 8 pixels × 2 = 16 i16: two registers of 4 pixels' pairs.
                let b0 = vld1q_s16(bp.add(p * QNR * 2 + half * 16));
                let b1 = vld1q_s16(bp.add(p * QNR * 2 + half * 16 + 8));
                for r in 0..QMR {
                    let pair = (ap.add((p * QMR + r) * 2) as *const i32).read_unaligned();
                    let av = vreinterpretq_s16_s32(vdupq_n_s32(pair));
                    lo[r][0] = vmlal_s16(lo[r][0], vget_low_s16(b0), vget_low_s16(av));
                    hi[r][0] = vmlal_high_s16(hi[r][0], b0, av);
                    lo[r][1] = vmlal_s16(lo[r][1], vget_low_s16(b1), vget_low_s16(av));
                    hi[r][1] = vmlal_high_s16(hi[r][1], b1, av);
                }
            }
            for r in 0..QMR {
                for q in 0..2 {
                    // lanes (p0k0, p0k1, p1k0, p1k1) and (p2k0, …, p3k1):
                    // pairwise sums are pixels p0..p3.
                    let sums = vpaddq_s32(lo[r][q], hi[r][q]);
                    let j = half * 8 + q * 4;
                    let cur = vld1q_s32(acc[r][j..].as_ptr());
                    vst1q_s32(acc[r][j..].as_mut_ptr(), vaddq_s32(cur, sums));
                }
            }
        }
    }
}

/// Scalar reference of [`tile`].
pub fn tile_ref(kpairs: usize, a: &[i16], b: &[i16], acc: &mut [[i32; QNR]; QMR]) {
    for p in 0..kpairs {
        let ap = &a[p * QMR * 2..(p + 1) * QMR * 2];
        let bp = &b[p * QNR * 2..(p + 1) * QNR * 2];
        for (r, row) in acc.iter_mut().enumerate() {
            let (a0, a1) = (ap[2 * r] as i32, ap[2 * r + 1] as i32);
            for (j, c) in row.iter_mut().enumerate() {
                *c += a0 * bp[2 * j] as i32 + a1 * bp[2 * j + 1] as i32;
            }
        }
    }
}

/// The AVX2 product loop: `QMR` rows × 16 pixels of `i32` sums in
/// registers (two 8-lane vectors per row).
///
/// # Safety
/// AVX2 must be present; `a` and `b` must hold `kpairs` pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn products_avx2(
    kpairs: usize,
    a: &[i16],
    b: &[i16],
) -> [[std::arch::x86_64::__m256i; 2]; QMR] {
    use std::arch::x86_64::*;
    let mut c = [[_mm256_setzero_si256(); 2]; QMR];
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for p in 0..kpairs {
        // SAFETY: forwarded contract (kpairs pairs in a and b).
        unsafe {
            let b0 = _mm256_loadu_si256(bp.add(p * QNR * 2) as *const __m256i);
            let b1 = _mm256_loadu_si256(bp.add(p * QNR * 2 + 16) as *const __m256i);
            for (r, cr) in c.iter_mut().enumerate() {
                let pair = (ap.add((p * QMR + r) * 2) as *const i32).read_unaligned();
                let av = _mm256_set1_epi32(pair);
                cr[0] = _mm256_add_epi32(cr[0], _mm256_madd_epi16(b0, av));
                cr[1] = _mm256_add_epi32(cr[1], _mm256_madd_epi16(b1, av));
            }
        }
    }
    c
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn tile_avx2(kpairs: usize, a: &[i16], b: &[i16], acc: &mut [[i32; QNR]; QMR]) {
    // SAFETY: forwarded contract (the caller checked the lengths).
    let c = unsafe { products_avx2(kpairs, a, b) };
    // SAFETY: AVX2 is enabled in this function.
    unsafe { accumulate_avx2(&c, acc) }
}

/// [`tile`] on zeroed accumulators followed by the epilogue in registers:
/// `y = act(acc · scale + bias (+ res))` for a full 16-pixel tile.
///
/// # Safety
/// AVX2 and FMA must be present; `a` and `b` must hold `kpairs` pairs; the
/// output and residual ranges described by `f` must be valid and not
/// written by anyone else meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile_avx2_fused(kpairs: usize, a: &[i16], b: &[i16], f: &Fused) {
    // SAFETY: forwarded contract.
    unsafe { epilogue_avx2(&products_avx2(kpairs, a, b), f) }
}
