//! The dot4 form of the INT8 GEMM micro-kernel (groups of four INT8
//! values: `vpmaddubsw` on AVX2, `sdot` on NEON with the dot-product
//! extension) and the packing of its input panels. See
//! [`super::QConv2d::with_dot4`].

#[cfg(target_arch = "x86_64")]
use super::QMAX;
use super::{QIn, QMR, QNR};
use crate::isa::Isa;

/// The dot4 product loop on groups of four reduction indices (INT8 bytes;
/// see [`super::QConv2d`]'s quad layout): `QMR` rows × 16 pixels of `i32`
/// sums, with AVX-512 VNNI where present, else AVX2. Each group's four
/// products go in as unsigned input bytes times signed weights:
/// non-negative inputs (`nonneg`, e.g. after a ReLU) as they are; otherwise
/// the input's magnitude goes in and its sign moves to the weight
/// (`vpabsb`, `vpsignb`). Exact for every value in [-127, 127] (see
/// [`crate::quant::acc4_maddubs`]).
///
/// # Safety
/// AVX2 must be present; `a` must hold `kquads·QMR·4` bytes and `b`
/// `kquads·QNR·4`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn products_quad_avx2(
    kquads: usize,
    a: &[i8],
    b: &[i8],
    nonneg: bool,
) -> [[std::arch::x86_64::__m256i; 2]; QMR] {
    if crate::isa::has_vnni() {
        // SAFETY: AVX-512 VNNI and VL were detected; forwarded contract.
        unsafe { products_quad_vnni(kquads, a, b, nonneg) }
    } else {
        // SAFETY: forwarded contract.
        unsafe { products_quad_maddubs(kquads, a, b, nonneg) }
    }
}

/// Defines the product loop of [`products_quad_avx2`] for one x86 feature
/// set; `$acc4` adds each group of four u8 × i8 products to an `i32` lane.
macro_rules! products_quad_x86 {
    ($(#[$doc:meta])* $name:ident, $features:literal, $acc4:path) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(
            kquads: usize,
            a: &[i8],
            b: &[i8],
            nonneg: bool,
        ) -> [[std::arch::x86_64::__m256i; 2]; QMR] {
            use std::arch::x86_64::*;
            let mut c = [[_mm256_setzero_si256(); 2]; QMR];
            let (ap, bp) = (a.as_ptr(), b.as_ptr());
            // SAFETY: forwarded contract; every load is within the kquads
            // groups of a and b.
            unsafe {
                for q in 0..kquads {
                    let b0 = _mm256_loadu_si256(bp.add(q * QNR * 4) as *const __m256i);
                    let b1 = _mm256_loadu_si256(bp.add(q * QNR * 4 + 32) as *const __m256i);
                    if nonneg {
                        for (r, cr) in c.iter_mut().enumerate() {
                            let quad = (ap.add((q * QMR + r) * 4) as *const i32).read_unaligned();
                            let av = _mm256_set1_epi32(quad);
                            cr[0] = $acc4(cr[0], b0, av);
                            cr[1] = $acc4(cr[1], b1, av);
                        }
                    } else {
                        // |input| unsigned, the input's sign moved to the weight.
                        let (m0, m1) = (_mm256_abs_epi8(b0), _mm256_abs_epi8(b1));
                        for (r, cr) in c.iter_mut().enumerate() {
                            let quad = (ap.add((q * QMR + r) * 4) as *const i32).read_unaligned();
                            let av = _mm256_set1_epi32(quad);
                            cr[0] = $acc4(cr[0], m0, _mm256_sign_epi8(av, b0));
                            cr[1] = $acc4(cr[1], m1, _mm256_sign_epi8(av, b1));
                        }
                    }
                }
            }
            c
        }
    };
}

products_quad_x86!(
    /// [`products_quad_avx2`] with `vpmaddubsw` + `vpmaddwd` + `vpaddd`.
    ///
    /// # Safety
    /// As [`products_quad_avx2`].
    products_quad_maddubs,
    "avx2",
    crate::quant::acc4_maddubs
);

products_quad_x86!(
    /// [`products_quad_avx2`] with AVX-512 VNNI: one `vpdpbusd` per group.
    ///
    /// # Safety
    /// AVX-512 VNNI and VL must be present; otherwise as
    /// [`products_quad_avx2`].
    products_quad_vnni,
    "avx2,avx512f,avx512vl,avx512vnni",
    crate::quant::acc4_vnni
);

/// The dot4 micro-kernel: `acc[r][j] += Σ_q Σ_t a[q][r][t]·b[q][j][t]` over
/// `kquads` groups of four INT8 values (the layout of
/// [`super::QConv2d::with_dot4`]). Exact for every value in [-127, 127].
pub fn tile_quad(isa: Isa, kquads: usize, a: &[i8], b: &[i8], acc: &mut [[i32; QNR]; QMR]) {
    assert!(a.len() >= kquads * QMR * 4 && b.len() >= kquads * QNR * 4);
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: AVX2 is present when this tier is active; lengths checked.
        // The signed form is exact on any input.
        unsafe { super::accumulate_avx2(&products_quad_avx2(kquads, a, b, false), acc) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon && crate::isa::has_dotprod() {
        // SAFETY: the dot-product extension was just detected; lengths
        // checked above.
        unsafe { tile_quad_sdot(kquads, a, b, acc) };
        return;
    }
    let _ = isa;
    tile_quad_ref(kquads, a, b, acc)
}

/// Scalar reference of [`tile_quad`].
pub fn tile_quad_ref(kquads: usize, a: &[i8], b: &[i8], acc: &mut [[i32; QNR]; QMR]) {
    for q in 0..kquads {
        let aq = &a[q * QMR * 4..(q + 1) * QMR * 4];
        let bq = &b[q * QNR * 4..(q + 1) * QNR * 4];
        for (r, row) in acc.iter_mut().enumerate() {
            let w = &aq[4 * r..4 * r + 4];
            for (j, c) in row.iter_mut().enumerate() {
                let x = &bq[4 * j..4 * j + 4];
                *c += w
                    .iter()
                    .zip(x)
                    .map(|(&w, &x)| w as i32 * x as i32)
                    .sum::<i32>();
            }
        }
    }
}

/// NEON dot product: per group of four, the panel's 16 pixels are four
/// registers of four pixels' groups, and each weight row's group is one
/// lane of the row registers; one `sdot` by element adds four products
/// to each of four pixels. 24 accumulators (6 rows × 4 registers), 4 input
/// and 2 weight registers: 30 of the 32 vector registers.
///
/// # Safety
/// The CPU must have the dot-product extension; `a` must hold
/// `kquads·QMR·4` bytes and `b` `kquads·QNR·4`.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "dotprod")]
pub(super) unsafe fn tile_quad_sdot(
    kquads: usize,
    a: &[i8],
    b: &[i8],
    acc: &mut [[i32; QNR]; QMR],
) {
    use crate::dotprod::sdot_lane;
    use std::arch::aarch64::*;
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    // SAFETY: (whole block) loads stay within the kquads groups of a and b
    // (contract); the extension is present (contract).
    unsafe {
        let z = vdupq_n_s32(0);
        let mut c = [[z; 4]; QMR];
        for q in 0..kquads {
            let bq = bp.add(q * QNR * 4);
            let bv = [
                vld1q_s8(bq),
                vld1q_s8(bq.add(16)),
                vld1q_s8(bq.add(32)),
                vld1q_s8(bq.add(48)),
            ];
            let aq = ap.add(q * QMR * 4);
            // Rows 0-3, then rows 4-5 in the low half.
            let a0 = vld1q_s8(aq);
            let a1 = vcombine_s8(vld1_s8(aq.add(16)), vdup_n_s8(0));
            for (j, &bj) in bv.iter().enumerate() {
                c[0][j] = sdot_lane::<0>(c[0][j], bj, a0);
                c[1][j] = sdot_lane::<1>(c[1][j], bj, a0);
                c[2][j] = sdot_lane::<2>(c[2][j], bj, a0);
                c[3][j] = sdot_lane::<3>(c[3][j], bj, a0);
                c[4][j] = sdot_lane::<0>(c[4][j], bj, a1);
                c[5][j] = sdot_lane::<1>(c[5][j], bj, a1);
            }
        }
        for (row, cr) in acc.iter_mut().zip(&c) {
            for (j, &v) in cr.iter().enumerate() {
                let p = row[4 * j..].as_mut_ptr();
                vst1q_s32(p, vaddq_s32(vld1q_s32(p), v));
            }
        }
    }
}

/// Interleaves four rows of 16 INT8 values into 16 groups of four
/// (`dst[4j + r] = rows[r][j]`, `dst` 64 bytes); returns whether any value
/// is negative.
pub(super) fn interleave4(isa: Isa, rows: &[[i8; QNR]; 4], dst: &mut [i8]) -> bool {
    assert!(dst.len() >= 4 * QNR);
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: AVX2 is present when this tier is active; dst holds 64
        // bytes (checked).
        return unsafe { interleave4_avx2(rows, dst.as_mut_ptr()) };
    }
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon {
        // SAFETY: NEON is baseline on aarch64; dst holds 64 bytes (checked).
        return unsafe { interleave4_neon(rows, dst.as_mut_ptr()) };
    }
    let _ = isa;
    for (j, group) in dst.chunks_exact_mut(4).take(QNR).enumerate() {
        for (r, v) in group.iter_mut().enumerate() {
            *v = rows[r][j];
        }
    }
    rows.iter().flatten().any(|&v| v < 0)
}

/// NEON form of [`interleave4`]: two rounds of zips (bytes, then pairs).
///
/// # Safety
/// `dst` must hold 64 bytes.
#[cfg(target_arch = "aarch64")]
pub(super) unsafe fn interleave4_neon(rows: &[[i8; QNR]; 4], dst: *mut i8) -> bool {
    use std::arch::aarch64::*;
    // SAFETY: each row is 16 bytes; dst holds 64 bytes (contract).
    unsafe {
        let [a, b, c, d] = rows.map(|r| vld1q_s8(r.as_ptr()));
        let (ab_lo, ab_hi) = (
            vreinterpretq_s16_s8(vzip1q_s8(a, b)),
            vreinterpretq_s16_s8(vzip2q_s8(a, b)),
        );
        let (cd_lo, cd_hi) = (
            vreinterpretq_s16_s8(vzip1q_s8(c, d)),
            vreinterpretq_s16_s8(vzip2q_s8(c, d)),
        );
        vst1q_s8(dst, vreinterpretq_s8_s16(vzip1q_s16(ab_lo, cd_lo)));
        vst1q_s8(dst.add(16), vreinterpretq_s8_s16(vzip2q_s16(ab_lo, cd_lo)));
        vst1q_s8(dst.add(32), vreinterpretq_s8_s16(vzip1q_s16(ab_hi, cd_hi)));
        vst1q_s8(dst.add(48), vreinterpretq_s8_s16(vzip2q_s16(ab_hi, cd_hi)));
        vminvq_s8(vorrq_s8(vorrq_s8(a, b), vorrq_s8(c, d))) < 0
    }
}

/// Four rows of a pointwise layer's input (`starts`: offsets of 16 values
/// each, `None` for zero rows), quantized with `inv` when f32, interleaved
/// into 16 groups of four at `dst` (64 bytes); returns whether any value is
/// negative. `rows` is scratch.
pub(super) fn pack_quad(
    isa: Isa,
    x: QIn,
    starts: [Option<usize>; 4],
    inv: f32,
    dst: &mut [i8],
    rows: &mut [[i8; QNR]; 4],
) -> bool {
    assert!(dst.len() >= 4 * QNR);
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        let len = match x {
            QIn::F32(x) => x.len(),
            QIn::I8(x) => x.len(),
        };
        assert!(starts.iter().flatten().all(|&s| s + QNR <= len));
        // SAFETY: AVX2 is present when this tier is active; each start has
        // 16 values in x and dst holds 64 bytes (checked).
        return unsafe {
            match x {
                QIn::F32(x) => pack_quad_f32_avx2(x, starts, inv, dst.as_mut_ptr()),
                QIn::I8(x) => pack_quad_i8_avx2(x, starts, dst.as_mut_ptr()),
            }
        };
    }
    for (row, s) in rows.iter_mut().zip(starts) {
        match (x, s) {
            (QIn::F32(x), Some(s)) => crate::int8::quantize_to_i8(isa, &x[s..s + QNR], inv, row),
            (QIn::I8(x), Some(s)) => row.copy_from_slice(&x[s..s + QNR]),
            (_, None) => row.fill(0),
        }
    }
    interleave4(isa, rows, dst)
}

/// Interleaves four rows of 16 INT8 values into 16 groups of four
/// (`dst[4j + r] = rows[r][j]`); returns whether any value is negative.
///
/// # Safety
/// AVX2 must be present; `dst` must hold 64 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn interleave4_avx2(rows: &[[i8; QNR]; 4], dst: *mut i8) -> bool {
    use std::arch::x86_64::*;
    let ld = |r: &[i8; QNR]| {
        // SAFETY: each row is 16 bytes.
        unsafe { _mm_loadu_si128(r.as_ptr() as *const __m128i) }
    };
    // SAFETY: dst holds 64 bytes (contract).
    unsafe { interleave4_regs(ld(&rows[0]), ld(&rows[1]), ld(&rows[2]), ld(&rows[3]), dst) }
}

/// Four rows (`starts`: offsets of 16 f32 values each, `None` for zero
/// rows) quantized with `inv` and interleaved into 16 groups of four at
/// `dst`; returns whether any value is negative.
///
/// # Safety
/// AVX2 must be present; each start must have 16 values in `x`; `dst` must
/// hold 64 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn pack_quad_f32_avx2(
    x: &[f32],
    starts: [Option<usize>; 4],
    inv: f32,
    dst: *mut i8,
) -> bool {
    use std::arch::x86_64::*;
    let vinv = _mm256_set1_ps(inv);
    let (lo, hi) = (_mm256_set1_ps(-QMAX), _mm256_set1_ps(QMAX));
    let row = |s: Option<usize>| match s {
        // SAFETY: 16 floats at s (contract).
        Some(s) => unsafe {
            let q = |p: *const f32| {
                let v = _mm256_loadu_ps(p);
                _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, vinv), lo), hi))
            };
            let p = x.as_ptr().add(s);
            let w =
                _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q(p), q(p.add(8))));
            _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w))
        },
        None => _mm_setzero_si128(),
    };
    let [a, b, c, d] = starts.map(row);
    // SAFETY: dst holds 64 bytes (contract).
    unsafe { interleave4_regs(a, b, c, d, dst) }
}

/// As [`pack_quad_f32_avx2`] for INT8 rows (no quantization).
///
/// # Safety
/// AVX2 must be present; each start must have 16 values in `x`; `dst` must
/// hold 64 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn pack_quad_i8_avx2(x: &[i8], starts: [Option<usize>; 4], dst: *mut i8) -> bool {
    use std::arch::x86_64::*;
    let row = |s: Option<usize>| match s {
        // SAFETY: 16 bytes at s (contract).
        Some(s) => unsafe { _mm_loadu_si128(x.as_ptr().add(s) as *const __m128i) },
        None => _mm_setzero_si128(),
    };
    let [a, b, c, d] = starts.map(row);
    // SAFETY: dst holds 64 bytes (contract).
    unsafe { interleave4_regs(a, b, c, d, dst) }
}

/// Interleaves four registers of 16 bytes into 16 groups of four at `dst`;
/// returns whether any byte is negative.
///
/// # Safety
/// AVX2 must be present; `dst` must hold 64 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn interleave4_regs(
    a: std::arch::x86_64::__m128i,
    b: std::arch::x86_64::__m128i,
    c: std::arch::x86_64::__m128i,
    d: std::arch::x86_64::__m128i,
    dst: *mut i8,
) -> bool {
    use std::arch::x86_64::*;
    let (ab_lo, ab_hi) = (_mm_unpacklo_epi8(a, b), _mm_unpackhi_epi8(a, b));
    let (cd_lo, cd_hi) = (_mm_unpacklo_epi8(c, d), _mm_unpackhi_epi8(c, d));
    let out = dst as *mut __m128i;
    // SAFETY: dst holds 64 bytes (contract).
    unsafe {
        _mm_storeu_si128(out, _mm_unpacklo_epi16(ab_lo, cd_lo));
        _mm_storeu_si128(out.add(1), _mm_unpackhi_epi16(ab_lo, cd_lo));
        _mm_storeu_si128(out.add(2), _mm_unpacklo_epi16(ab_hi, cd_hi));
        _mm_storeu_si128(out.add(3), _mm_unpackhi_epi16(ab_hi, cd_hi));
    }
    let any = _mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d));
    _mm_movemask_epi8(any) != 0
}
