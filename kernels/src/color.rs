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
    if crate::isa::active() == crate::isa::Isa::Avx2Fma {
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
pub fn expand_nv12_chroma(uv: &[u8], cu: &mut [u8], cv: &mut [u8]) {
    let n = cu.len().min(cv.len()).min(uv.len());
    let pairs = n / 2;
    for ((pair, u2), v2) in uv
        .chunks_exact(2)
        .zip(cu.chunks_exact_mut(2))
        .zip(cv.chunks_exact_mut(2))
        .take(pairs)
    {
        u2[0] = pair[0];
        u2[1] = pair[0];
        v2[0] = pair[1];
        v2[1] = pair[1];
    }
    if n % 2 == 1 && uv.len() > n {
        cu[n - 1] = uv[n - 1];
        cv[n - 1] = uv[n];
    }
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
