//! Colour conversion for camera frames: YUV → RGB in fixed point, one row
//! at a time, into planar R, G, B.
//!
//! The arithmetic is defined by [`YuvCoeffs::rgb`] (16 fractional bits,
//! round half up, clamp to 0..255); the row kernels give exactly the same
//! bytes, the AVX2 tier eight pixels at a time.

/// Fixed-point YUV → RGB coefficients, 16 fractional bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct YuvCoeffs {
    /// Luma black level (16 for limited range, 0 for full).
    pub y_offset: i32,
    /// Luma gain.
    pub y: i32,
    /// V → R.
    pub vr: i32,
    /// U → G (negative).
    pub ug: i32,
    /// V → G (negative).
    pub vg: i32,
    /// U → B.
    pub ub: i32,
}

impl YuvCoeffs {
    /// One pixel: `(y, u, v)` → `[r, g, b]`, rounded and clamped. The
    /// reference every row kernel matches.
    #[inline(always)]
    pub fn rgb(&self, y: u8, u: u8, v: u8) -> [u8; 3] {
        let yy = (y as i32 - self.y_offset) * self.y + (1 << 15);
        let u = u as i32 - 128;
        let v = v as i32 - 128;
        let c = |x: i32| (x >> 16).clamp(0, 255) as u8;
        [
            c(yy + self.vr * v),
            c(yy + self.ug * u + self.vg * v),
            c(yy + self.ub * u),
        ]
    }
}

/// Converts one row: `luma`, `cu`, `cv` (one chroma sample per pixel) →
/// planar `r`, `g`, `b`. All slices are cut to the shortest.
pub fn yuv_to_rgb_planar(
    k: &YuvCoeffs,
    luma: &[u8],
    cu: &[u8],
    cv: &[u8],
    r: &mut [u8],
    g: &mut [u8],
    b: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::active().has_avx2() {
        // SAFETY: the AVX2 tier is only active when the CPU has AVX2
        // (checked by `isa::detect`); the function body is safe code.
        unsafe { yuv_to_rgb_planar_avx2(k, luma, cu, cv, r, g, b) };
        return;
    }
    yuv_to_rgb_planar_portable(k, luma, cu, cv, r, g, b);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn yuv_to_rgb_planar_avx2(
    k: &YuvCoeffs,
    luma: &[u8],
    cu: &[u8],
    cv: &[u8],
    r: &mut [u8],
    g: &mut [u8],
    b: &mut [u8],
) {
    // The same safe loop, compiled with AVX2 (vpmulld, 8 lanes).
    yuv_to_rgb_planar_portable(k, luma, cu, cv, r, g, b);
}

#[inline(always)]
fn yuv_to_rgb_planar_portable(
    k: &YuvCoeffs,
    luma: &[u8],
    cu: &[u8],
    cv: &[u8],
    r: &mut [u8],
    g: &mut [u8],
    b: &mut [u8],
) {
    let n = luma
        .len()
        .min(cu.len())
        .min(cv.len())
        .min(r.len())
        .min(g.len())
        .min(b.len());
    let (luma, cu, cv) = (&luma[..n], &cu[..n], &cv[..n]);
    let (r, g, b) = (&mut r[..n], &mut g[..n], &mut b[..n]);
    for i in 0..n {
        let yy = (luma[i] as i32 - k.y_offset) * k.y + (1 << 15);
        let u = cu[i] as i32 - 128;
        let v = cv[i] as i32 - 128;
        r[i] = ((yy + k.vr * v) >> 16).clamp(0, 255) as u8;
        g[i] = ((yy + k.ug * u + k.vg * v) >> 16).clamp(0, 255) as u8;
        b[i] = ((yy + k.ub * u) >> 16).clamp(0, 255) as u8;
    }
}

/// NV12 chroma row (interleaved U V, one pair per two pixels) → one U and
/// one V per pixel for `cu.len()` pixels.
/// A pair missing from a too-short `uv` reads as neutral chroma (128).
pub fn expand_nv12_chroma(uv: &[u8], cu: &mut [u8], cv: &mut [u8]) {
    let n = cu.len().min(cv.len());
    // Only the x86-64 fast path advances it.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::isa::active().has_avx2() {
        // SAFETY: AVX2 is present when this tier is active; the function
        // checks its block count against every slice's length.
        done = unsafe { expand_nv12_chroma_avx2(uv, &mut cu[..n], &mut cv[..n]) };
    }
    expand_nv12_chroma_scalar(
        &uv[done.min(uv.len())..],
        &mut cu[done..n],
        &mut cv[done..n],
    );
}

/// The reference: pixel `x` takes the pair at `x & !1`.
fn expand_nv12_chroma_scalar(uv: &[u8], cu: &mut [u8], cv: &mut [u8]) {
    for (x, (u, v)) in cu.iter_mut().zip(cv.iter_mut()).enumerate() {
        *u = uv.get(x & !1).copied().unwrap_or(128);
        *v = uv.get(x | 1).copied().unwrap_or(128);
    }
}

/// Whole blocks of 16 pixels; returns how many pixels it wrote (even).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn expand_nv12_chroma_avx2(uv: &[u8], cu: &mut [u8], cv: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    let n = uv.len().min(cu.len()).min(cv.len());
    let blocks = n / 16;
    let su = _mm_setr_epi8(0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14);
    let sv = _mm_setr_epi8(1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15);
    for b in 0..blocks {
        let o = 16 * b;
        // SAFETY: o + 16 <= n <= every slice's length; unaligned loads
        // and stores are allowed by loadu/storeu.
        unsafe {
            let v = _mm_loadu_si128(uv.as_ptr().add(o) as *const __m128i);
            _mm_storeu_si128(
                cu.as_mut_ptr().add(o) as *mut __m128i,
                _mm_shuffle_epi8(v, su),
            );
            _mm_storeu_si128(
                cv.as_mut_ptr().add(o) as *mut __m128i,
                _mm_shuffle_epi8(v, sv),
            );
        }
    }
    16 * blocks
}

/// Two-tap interpolation gathered from a u8 row: `out[x] = a + (b − a)·f[x]`
/// with `a = src[idx[x]]`, `b = src[idx[x] + 1]`, in f32, multiply then add
/// (no fused multiply-add, so every tier gives the same bits).
///
/// `src` must hold at least `max(idx) + 2` bytes; with `max(idx) + 4` or
/// more the AVX2 tier gathers eight outputs at a time.
pub fn lerp_gather_u8(src: &[u8], idx: &[u32], f: &[f32], out: &mut [f32]) {
    let n = idx.len().min(f.len()).min(out.len());
    // Only the x86-64 fast path advances it.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::isa::active().has_avx2() {
        // SAFETY: AVX2 is present when this tier is active; the function
        // checks every index against `src.len() - 4` before gathering.
        done = unsafe { lerp_gather_u8_avx2(src, &idx[..n], &f[..n], &mut out[..n]) };
    }
    lerp_gather_u8_scalar(src, &idx[done..n], &f[done..n], &mut out[done..n]);
}

/// The reference.
fn lerp_gather_u8_scalar(src: &[u8], idx: &[u32], f: &[f32], out: &mut [f32]) {
    for ((&i, &f), o) in idx.iter().zip(f).zip(out.iter_mut()) {
        let p = &src[i as usize..i as usize + 2];
        let (a, b) = (p[0] as f32, p[1] as f32);
        *o = a + (b - a) * f;
    }
}

/// Whole blocks of 8 whose indices all allow a 4-byte read; returns how
/// many outputs it wrote (a prefix: indices are expected to be sorted, as
/// resize taps are, and it stops at the first block that is not safe).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lerp_gather_u8_avx2(src: &[u8], idx: &[u32], f: &[f32], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    if src.len() < 4 || src.len() > i32::MAX as usize {
        return 0;
    }
    let limit = (src.len() - 4) as u32;
    let n = idx.len().min(f.len()).min(out.len());
    let mask = _mm256_set1_epi32(0xff);
    let mut x = 0;
    while x + 8 <= n {
        let block = &idx[x..x + 8];
        if block.iter().any(|&i| i > limit) {
            break;
        }
        // SAFETY: every index is ≤ len − 4, so each 4-byte gather stays in
        // `src`; x + 8 ≤ n bounds the loads and the store.
        unsafe {
            let vi = _mm256_loadu_si256(block.as_ptr() as *const __m256i);
            let g = _mm256_i32gather_epi32::<1>(src.as_ptr() as *const i32, vi);
            let a = _mm256_cvtepi32_ps(_mm256_and_si256(g, mask));
            let b = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32::<8>(g), mask));
            let fv = _mm256_loadu_ps(f.as_ptr().add(x));
            let v = _mm256_add_ps(a, _mm256_mul_ps(_mm256_sub_ps(b, a), fv));
            _mm256_storeu_ps(out.as_mut_ptr().add(x), v);
        }
        x += 8;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn row_kernel_matches_pixel_reference(
            px in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u8>()), 0..80),
            full in any::<bool>(),
        ) {
            let k = if full {
                YuvCoeffs { y_offset: 0, y: 65536, vr: 91881, ug: -22554, vg: -46802, ub: 116130 }
            } else {
                YuvCoeffs { y_offset: 16, y: 76309, vr: 104597, ug: -25675, vg: -53279, ub: 132201 }
            };
            let n = px.len();
            let l: Vec<u8> = px.iter().map(|p| p.0).collect();
            let u: Vec<u8> = px.iter().map(|p| p.1).collect();
            let v: Vec<u8> = px.iter().map(|p| p.2).collect();
            let (mut r, mut g, mut b) = (vec![0; n], vec![0; n], vec![0; n]);
            yuv_to_rgb_planar(&k, &l, &u, &v, &mut r, &mut g, &mut b);
            for i in 0..n {
                prop_assert_eq!([r[i], g[i], b[i]], k.rgb(l[i], u[i], v[i]));
            }
        }

        #[test]
        fn gather_lerp_matches_reference(
            src in proptest::collection::vec(any::<u8>(), 2..90),
            picks in proptest::collection::vec((any::<u32>(), 0.0f32..1.0), 0..60),
        ) {
            let mut idx: Vec<u32> = picks.iter().map(|p| p.0 % (src.len() as u32 - 1)).collect();
            idx.sort();
            let f: Vec<f32> = picks.iter().map(|p| p.1).collect();
            let mut got = vec![0.0; idx.len()];
            lerp_gather_u8(&src, &idx, &f, &mut got);
            let mut want = vec![0.0; idx.len()];
            lerp_gather_u8_scalar(&src, &idx, &f, &mut want);
            prop_assert_eq!(got, want);
        }

        #[test]
        fn chroma_expansion(uv in proptest::collection::vec(any::<u8>(), 2..40), odd in any::<bool>()) {
            let pairs = uv.len() / 2;
            let n = (2 * pairs).saturating_sub(odd as usize).max(1);
            let (mut cu, mut cv) = (vec![0; n], vec![0; n]);
            expand_nv12_chroma(&uv, &mut cu, &mut cv);
            for x in 0..n {
                prop_assert_eq!((cu[x], cv[x]), (uv[x & !1], uv[(x & !1) + 1]));
            }
        }
    }
}
