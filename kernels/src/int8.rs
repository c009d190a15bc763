//! INT8 products with exact INT32 accumulation: the building block of INT8
//! convolutions and GEMMs (symmetric per-channel weights, per-tensor
//! activations; requantization happens in the caller's epilogue).
//!
//! * [`dot_i8`]: one `i8 · i8` dot product.
//! * [`gemm_i8`]: `C[m][n] = Σ_k A[m][k] · B[n][k]` with `B` stored one
//!   output channel per row (as weights are), so both operands stream.
//!
//! Every tier is bit-exact with [`dot_i8_ref`]: the products are widened
//! to 16 bits before any addition (`i8 × i8` fits `i16`; pairs are summed
//! into `i32`), so nothing saturates — unlike `maddubs`, which saturates
//! pairs of `u8 × i8` products. AVX2: sign-extend to `i16`, `madd_epi16`.
//! NEON: `smull` to `i16`, pairwise-accumulate (`sadalp`) into `i32`.

use crate::isa::{self, Isa};

/// The scalar reference: defines correctness for every tier.
pub fn dot_i8_ref(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

/// `Σ a[i]·b[i]` over the shorter length, exact in `i32` for lengths up to
/// 2^17 (|a·b| ≤ 2^14 per term).
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    match isa::active() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => {
            // SAFETY: AVX2 is present when this tier is active; the
            // function reads whole 32-byte blocks within `n` only.
            unsafe { dot_i8_avx2(a, b) }
        }
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => {
            // SAFETY: NEON is baseline on aarch64; whole 16-byte blocks
            // within `n` only.
            unsafe { dot_i8_neon(a, b) }
        }
        _ => dot_i8_ref(a, b),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_i8_avx2(a: &[i8], b: &[i8]) -> i32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let blocks = n / 32;
    let mut acc = _mm256_setzero_si256();
    for i in 0..blocks {
        // SAFETY: bytes [32 i, 32 i + 32) are within both slices.
        unsafe {
            let va = _mm256_loadu_si256(a.as_ptr().add(32 * i) as *const __m256i);
            let vb = _mm256_loadu_si256(b.as_ptr().add(32 * i) as *const __m256i);
            let (a0, a1) = (
                _mm256_cvtepi8_epi16(_mm256_castsi256_si128(va)),
                _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(va)),
            );
            let (b0, b1) = (
                _mm256_cvtepi8_epi16(_mm256_castsi256_si128(vb)),
                _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(vb)),
            );
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(a0, b0));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(a1, b1));
        }
    }
    // Horizontal sum of 8 lanes.
    let mut lanes = [0i32; 8];
    // SAFETY: `lanes` is 32 bytes.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc) };
    let tail = dot_i8_ref(&a[32 * blocks..n], &b[32 * blocks..n]);
    lanes.iter().sum::<i32>() + tail
}

#[cfg(target_arch = "aarch64")]
unsafe fn dot_i8_neon(a: &[i8], b: &[i8]) -> i32 {
    use std::arch::aarch64::*;
    let n = a.len().min(b.len());
    let blocks = n / 16;
    // SAFETY: NEON is baseline; every load reads 16 bytes within `n`.
    unsafe {
        let mut acc = vdupq_n_s32(0);
        for i in 0..blocks {
            let va = vld1q_s8(a.as_ptr().add(16 * i));
            let vb = vld1q_s8(b.as_ptr().add(16 * i));
            let lo = vmull_s8(vget_low_s8(va), vget_low_s8(vb));
            let hi = vmull_high_s8(va, vb);
            acc = vpadalq_s16(acc, lo);
            acc = vpadalq_s16(acc, hi);
        }
        vaddvq_s32(acc) + dot_i8_ref(&a[16 * blocks..n], &b[16 * blocks..n])
    }
}

/// `c[i·n + j] = Σ_k a[i·k_len + k] · b[j·k_len + k]` for `i < m`, `j < n`
/// (`a`: `m × k` row-major activations; `b`: `n × k`, one output channel
/// per row). Panics never: short slices are an error.
pub fn gemm_i8(
    m: usize,
    n: usize,
    k: usize,
    a: &[i8],
    b: &[i8],
    c: &mut [i32],
) -> Result<(), crate::error::KernelError> {
    let need = |have: usize, want: usize| {
        if have < want {
            Err(crate::error::KernelError::BufferTooSmall {
                kernel: "gemm_i8",
                need: want,
                have,
            })
        } else {
            Ok(())
        }
    };
    need(a.len(), m * k)?;
    need(b.len(), n * k)?;
    need(c.len(), m * n)?;
    for i in 0..m {
        let row = &a[i * k..(i + 1) * k];
        for j in 0..n {
            c[i * n + j] = dot_i8(row, &b[j * k..(j + 1) * k]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn extremes_do_not_saturate() {
        // 255 × (-128·-128) would overflow i16 pair sums and saturate in
        // maddubs; the result must be exact.
        for n in [1, 15, 16, 31, 32, 33, 64, 100, 4096] {
            let a = vec![-128i8; n];
            let b = vec![-128i8; n];
            assert_eq!(dot_i8(&a, &b), 16384 * n as i32, "n = {n}");
            let b = vec![127i8; n];
            assert_eq!(dot_i8(&a, &b), -16256 * n as i32, "n = {n}");
        }
    }

    #[test]
    fn gemm_checks_its_slices() {
        let mut c = [0i32; 4];
        assert!(gemm_i8(2, 2, 3, &[1; 5], &[1; 6], &mut c).is_err());
        gemm_i8(2, 2, 3, &[1, 2, 3, 4, 5, 6], &[1, 0, 0, 0, 1, -1], &mut c).unwrap();
        assert_eq!(c, [1, -1, 4, -1]);
    }

    proptest! {
        #[test]
        fn dot_equals_the_reference(a in proptest::collection::vec(any::<i8>(), 0..300),
                                    b in proptest::collection::vec(any::<i8>(), 0..300)) {
            let n = a.len().min(b.len());
            prop_assert_eq!(dot_i8(&a, &b), dot_i8_ref(&a[..n], &b[..n]));
        }

        #[test]
        fn gemm_equals_the_reference(m in 1usize..5, n in 1usize..6, k in 1usize..70, seed in any::<u64>()) {
            let mut s = seed | 1;
            let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; (s >> 56) as i8 };
            let a: Vec<i8> = (0..m * k).map(|_| next()).collect();
            let b: Vec<i8> = (0..n * k).map(|_| next()).collect();
            let mut c = vec![0i32; m * n];
            gemm_i8(m, n, k, &a, &b, &mut c).unwrap();
            for i in 0..m {
                for j in 0..n {
                    prop_assert_eq!(c[i * n + j], dot_i8_ref(&a[i * k..(i + 1) * k], &b[j * k..(j + 1) * k]));
                }
            }
        }
    }
}
