//! INT8 products with exact INT32 accumulation: the building block of INT8
//! convolutions and GEMMs (symmetric per-channel weights, per-tensor
//! activations; requantization happens in the caller's epilogue).
//!
//! * [`dot_i8`]: one `i8 · i8` dot product.
//! * [`gemm_i8`]: `C[m][n] = Σ_k A[m][k] · B[n][k]` with `B` stored one
//!   output channel per row (as weights are), so both operands stream.
//! * [`QLinear`]: an INT8 fully connected layer (ONNX `Gemm` with constant
//!   weights) on those products: per-output-channel weights, a per-tensor
//!   input scale, dequantization and bias in the epilogue.
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
        Isa::Avx512 if isa::has_vnni() => {
            // SAFETY: AVX-512 BW and VNNI are present; the function reads
            // whole 64-byte blocks within `n` only.
            unsafe { dot_i8_vnni(a, b) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma | Isa::Avx512 => {
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

/// [`dot_i8`] with AVX-512 VNNI, 64 bytes per step. `vpdpbusd` multiplies
/// unsigned by signed bytes, so `a` goes in offset by 128 (`a ^ 0x80` is
/// `a + 128` as u8) and `128 · Σb` (the same instruction on bytes of 1)
/// comes off at the end: exact for every i8, −128 included.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
unsafe fn dot_i8_vnni(a: &[i8], b: &[i8]) -> i32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let blocks = n / 64;
    let flip = _mm512_set1_epi8(-128);
    let ones = _mm512_set1_epi8(1);
    let (mut prod, mut bsum) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    for i in 0..blocks {
        // SAFETY: bytes [64 i, 64 i + 64) are within both slices.
        unsafe {
            let va = _mm512_loadu_si512(a.as_ptr().add(64 * i) as *const __m512i);
            let vb = _mm512_loadu_si512(b.as_ptr().add(64 * i) as *const __m512i);
            prod = _mm512_dpbusd_epi32(prod, _mm512_xor_si512(va, flip), vb);
            bsum = _mm512_dpbusd_epi32(bsum, ones, vb);
        }
    }
    let tail = dot_i8_ref(&a[64 * blocks..n], &b[64 * blocks..n]);
    // Both lane sums may pass i32 on long rows; modulo 2^32 the difference
    // is still the exact result, which fits.
    _mm512_reduce_add_epi32(prod)
        .wrapping_sub(_mm512_reduce_add_epi32(bsum).wrapping_mul(128))
        .wrapping_add(tail)
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

/// `dst[i] = q(src[i])` as an integer-valued `f32`, where `q` is
/// [`crate::qconv::quantize`] with the reciprocal scale `inv` (clamp to ±127,
/// round half to even). Feeds integer kernels that accumulate in `f32`
/// exactly (every partial sum below 2^24).
pub fn quantize_to_f32(isa: Isa, src: &[f32], inv: f32, dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: AVX2 is present when this tier is active; the kernel
        // touches whole blocks of 8 within `n` only.
        done = unsafe { quantize_to_f32_avx2(&src[..n], inv, &mut dst[..n]) };
    }
    let _ = isa;
    for (d, &s) in dst[done..n].iter_mut().zip(&src[done..n]) {
        *d = crate::qconv::quantize(s, inv) as f32;
    }
}

/// `dst[i] = q(src[i])` as INT8 (`q` as in [`quantize_to_f32`]): how an
/// INT8 layer writes an INT8 output tensor.
pub fn quantize_to_i8(isa: Isa, src: &[f32], inv: f32, dst: &mut [i8]) {
    let n = src.len().min(dst.len());
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: AVX2 is present when this tier is active; whole blocks of
        // 16 within `n` only.
        done = unsafe { quantize_to_i8_avx2(&src[..n], inv, &mut dst[..n]) };
    }
    let _ = isa;
    for (d, &s) in dst[done..n].iter_mut().zip(&src[done..n]) {
        *d = crate::qconv::quantize(s, inv) as i8;
    }
}

/// `dst[i] = src[i] as f32` (exact).
pub fn widen_i8(isa: Isa, src: &[i8], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: AVX2 is present when this tier is active; whole blocks of
        // 8 within `n` only.
        done = unsafe { widen_i8_avx2(&src[..n], &mut dst[..n]) };
    }
    let _ = isa;
    for (d, &s) in dst[done..n].iter_mut().zip(&src[done..n]) {
        *d = s as f32;
    }
}

/// Clamped, rounded (half to even, as `cvtps2dq`/`roundps` do in the
/// default rounding mode) 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn quantize8_avx2(
    v: std::arch::x86_64::__m256,
    inv: std::arch::x86_64::__m256,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let q = crate::qconv::QMAX;
    let v = _mm256_min_ps(
        _mm256_max_ps(_mm256_mul_ps(v, inv), _mm256_set1_ps(-q)),
        _mm256_set1_ps(q),
    );
    _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
}

/// Mask of the first `r` of 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn first_lanes(r: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(r as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// Converts every element, the last partial block of 8 with masked
/// loads and stores (rows of depthwise planes are often 7, 14 or 28 wide).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_to_f32_avx2(src: &[f32], inv: f32, dst: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let len = src.len().min(dst.len());
    let n = len / 8 * 8;
    let vinv = _mm256_set1_ps(inv);
    for i in (0..n).step_by(8) {
        // SAFETY: 8 floats at i < n in both slices.
        unsafe {
            let v = _mm256_loadu_ps(src.as_ptr().add(i));
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), quantize8_avx2(v, vinv));
        }
    }
    if n < len {
        let m = first_lanes(len - n);
        // SAFETY: the masked lanes are the len - n elements left in both
        // slices; masked-off lanes are neither read nor written.
        unsafe {
            let v = _mm256_maskload_ps(src.as_ptr().add(n), m);
            _mm256_maskstore_ps(dst.as_mut_ptr().add(n), m, quantize8_avx2(v, vinv));
        }
    }
    len
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_to_i8_avx2(src: &[f32], inv: f32, dst: &mut [i8]) -> usize {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len()) / 16 * 16;
    let vinv = _mm256_set1_ps(inv);
    for i in (0..n).step_by(16) {
        // SAFETY: 16 elements at i < n in both slices.
        unsafe {
            let a = _mm256_cvtps_epi32(quantize8_avx2(_mm256_loadu_ps(src.as_ptr().add(i)), vinv));
            let b = _mm256_cvtps_epi32(quantize8_avx2(
                _mm256_loadu_ps(src.as_ptr().add(i + 8)),
                vinv,
            ));
            // packs works per 128-bit lane: fix the quarter order after it.
            let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a, b));
            let bytes =
                _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w));
            _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, bytes);
        }
    }
    n
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_i8_avx2(src: &[i8], dst: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let len = src.len().min(dst.len());
    let n = len / 8 * 8;
    for i in (0..n).step_by(8) {
        // SAFETY: 8 bytes read and 8 floats written at i < n.
        unsafe {
            let b = _mm_loadl_epi64(src.as_ptr().add(i) as *const __m128i);
            let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), v);
        }
    }
    if n < len {
        let mut tail = [0i8; 8];
        // (A byte loop: a variable-length copy would call memcpy.)
        for (t, &s) in tail.iter_mut().zip(&src[n..len]) {
            *t = s;
        }
        // SAFETY: `tail` holds 8 bytes; the masked store writes the
        // len - n floats left in dst.
        unsafe {
            let b = _mm_loadl_epi64(tail.as_ptr() as *const __m128i);
            let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
            _mm256_maskstore_ps(dst.as_mut_ptr().add(n), first_lanes(len - n), v);
        }
    }
    len
}

/// An INT8 fully connected layer, `y[i][j] = Σ_k x[i][k]·w[j][k] + b[j]`:
/// weights quantized per output channel (symmetric), the input quantized
/// per tensor with `input_scale` as it is read, exact `i32` sums
/// ([`dot_i8`]), then `acc · s_w[j] · s_x + b[j]`. At batch 1 it is a
/// matrix-vector product bound by reading the weights, so INT8's quarter of
/// the bytes is what makes it fast.
#[derive(Clone, Debug)]
pub struct QLinear {
    n: usize,
    k: usize,
    /// `[n][k]`.
    w: Vec<i8>,
    out_scale: Vec<f32>,
    bias: Vec<f32>,
    input_scale: f32,
    /// `Σ_k w[j][k]` per row: the VNNI rows form's correction.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    wsum: Vec<i32>,
}

/// Output rows per task of [`QLinear::run`].
const QLINEAR_ROWS: usize = 64;

/// `acc[r] = Σ (x[c] + 128) · w_r[c]` (wrapping) for the 4 rows of `k`
/// bytes at the start of `rows`, 64 bytes a step with `vpdpbusd`, the
/// last step masked; `x` is flipped to unsigned once per step for all four
/// rows. While it reads them it prefetches the same columns of the next
/// four rows (inside `all`, the whole matrix): the weights come from
/// memory once per inference. The caller subtracts `128 · Σ w_r`.
///
/// # Safety
/// AVX-512 F/BW and VNNI must be present; `rows` holds `4 · k` bytes and
/// `x` `k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot4_vnni(x: &[i8], rows: &[i8], k: usize, all: &[i8]) -> [i32; 4] {
    use std::arch::x86_64::*;
    assert!(rows.len() >= 4 * k && x.len() >= k);
    let w = rows.as_ptr();
    let room = (all.as_ptr_range().end as usize).saturating_sub(w as usize);
    let flip = _mm512_set1_epi8(-128);
    let mut acc = [_mm512_setzero_si512(); 4];
    let mut c = 0;
    // SAFETY: loads cover columns c..c+64 ≤ k under the mask, of rows < 4
    // (checked above); prefetch addresses stay below `room` bytes from `w`,
    // inside `all`.
    unsafe {
        while c < k {
            let mask: __mmask64 = if k - c >= 64 {
                u64::MAX
            } else {
                (1u64 << (k - c)) - 1
            };
            // Masked-off lanes: x 0 flips to 128, times a weight of 0.
            let xv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, x.as_ptr().add(c)), flip);
            for (r, a) in acc.iter_mut().enumerate() {
                let off = r * k + c;
                if 4 * k + off < room {
                    _mm_prefetch::<_MM_HINT_T0>(w.add(4 * k + off).cast());
                }
                let wv = _mm512_maskz_loadu_epi8(mask, w.add(off));
                *a = _mm512_dpbusd_epi32(*a, xv, wv);
            }
            c += 64;
        }
        acc.map(|a| _mm512_reduce_add_epi32(a))
    }
}

impl QLinear {
    /// `weights` `[n][k]` (one output channel per row), `bias` `[n]`.
    pub fn new(
        n: usize,
        k: usize,
        weights: &[f32],
        bias: Option<&[f32]>,
        input_scale: f32,
    ) -> Result<QLinear, crate::error::KernelError> {
        let bad = |detail: String| crate::error::KernelError::Unsupported {
            kernel: "qlinear",
            detail,
        };
        if n == 0 || k == 0 {
            return Err(bad(format!("empty product {n}x{k}")));
        }
        if k > 1 << 17 {
            return Err(bad(format!("{k} inputs: exact i32 sums take at most 2^17")));
        }
        if !(input_scale.is_finite() && input_scale > 0.0) {
            return Err(bad(format!("input scale {input_scale} is not positive")));
        }
        if weights.len() != n * k {
            return Err(bad(format!("{} weights for {n}x{k}", weights.len())));
        }
        if let Some(b) = bias.filter(|b| b.len() != n) {
            return Err(bad(format!("{} biases for {n} outputs", b.len())));
        }
        let (scales, w) = crate::qconv::quantize_weights(weights, n);
        let wsum = w
            .chunks_exact(k)
            .map(|row| row.iter().map(|&v| v as i32).sum())
            .collect();
        Ok(QLinear {
            n,
            k,
            wsum,
            w,
            out_scale: scales.iter().map(|s| s * input_scale).collect(),
            bias: bias.map_or_else(|| vec![0.0; n], <[f32]>::to_vec),
            input_scale,
        })
    }

    /// Outputs per row.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The input scale.
    pub fn input_scale(&self) -> f32 {
        self.input_scale
    }

    /// Bytes of quantized weights held.
    pub fn weight_bytes(&self) -> usize {
        self.w.len()
    }

    /// Scratch f32 elements [`QLinear::run`] needs for `m` rows (the
    /// quantized input, four bytes per element).
    pub fn scratch_len(&self, m: usize) -> usize {
        (m * self.k).div_ceil(4)
    }

    /// `m` rows: `x` `[m][k]`, `y` `[m][n]`.
    ///
    /// # Panics
    /// If a buffer is shorter than `m` rows need (the engine checks sizes
    /// when it plans memory).
    pub fn run(
        &self,
        pool: &crate::pool::ThreadPool,
        m: usize,
        x: &[f32],
        y: &mut [f32],
        scratch: &mut [f32],
    ) {
        let (n, k) = (self.n, self.k);
        assert!(x.len() >= m * k && y.len() >= m * n && scratch.len() >= self.scratch_len(m));
        // SAFETY: f32 is at least as aligned as i8; m·k bytes lie within
        // the scratch's 4·scratch_len bytes.
        let xq = unsafe { std::slice::from_raw_parts_mut(scratch.as_mut_ptr() as *mut i8, m * k) };
        quantize_to_i8(isa::active(), &x[..m * k], 1.0 / self.input_scale, xq);
        let xq = &*xq;
        let out = crate::pool::SyncPtr::new(y);
        #[cfg(target_arch = "x86_64")]
        let vnni = isa::active() == Isa::Avx512 && isa::has_vnni();
        pool.run(n.div_ceil(QLINEAR_ROWS), &|t, _| {
            let (j0, j1) = (t * QLINEAR_ROWS, ((t + 1) * QLINEAR_ROWS).min(n));
            #[cfg(not(target_arch = "x86_64"))]
            let j = j0;
            #[cfg(target_arch = "x86_64")]
            let mut j = j0;
            #[cfg(target_arch = "x86_64")]
            while vnni && j + 4 <= j1 {
                for i in 0..m {
                    // SAFETY: AVX-512 BW and VNNI present; rows j..j+4
                    // (k bytes each) lie in `w` (j + 4 ≤ n), row i of `xq`
                    // holds k bytes.
                    let acc =
                        unsafe { dot4_vnni(&xq[i * k..(i + 1) * k], &self.w[j * k..], k, &self.w) };
                    for (r, a) in acc.iter().enumerate() {
                        let acc = a.wrapping_sub(self.wsum[j + r].wrapping_mul(128));
                        let (s, b) = (self.out_scale[j + r], self.bias[j + r]);
                        // SAFETY: as below: column j + r is this task's.
                        unsafe { *out.add(i * n + j + r) = acc as f32 * s + b };
                    }
                }
                j += 4;
            }
            for j in j..j1 {
                let w = &self.w[j * k..(j + 1) * k];
                let (s, b) = (self.out_scale[j], self.bias[j]);
                for i in 0..m {
                    let acc = dot_i8(&xq[i * k..(i + 1) * k], w);
                    // SAFETY: each output (i, j) is written by the one task
                    // owning column j; i·n + j < m·n ≤ y.len() (asserted).
                    unsafe { *out.add(i * n + j) = acc as f32 * s + b };
                }
            }
        });
    }
}

/// Plain-loop reference of [`QLinear::run`]: quantize input and weights as
/// it does, accumulate in `i64`, then dequantize and add the bias.
pub fn reference_qlinear(
    n: usize,
    k: usize,
    weights: &[f32],
    bias: Option<&[f32]>,
    input_scale: f32,
    x: &[f32],
    y: &mut [f32],
) {
    let (scales, w) = crate::qconv::quantize_weights(weights, n);
    let m = x.len() / k;
    for i in 0..m {
        for j in 0..n {
            let acc: i64 = (0..k)
                .map(|c| {
                    let q = crate::qconv::quantize(x[i * k + c], 1.0 / input_scale) as i64;
                    q * w[j * k + c] as i64
                })
                .sum();
            y[i * n + j] = acc as f32 * (scales[j] * input_scale) + bias.map_or(0.0, |b| b[j]);
        }
    }
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

        #[test]
        fn row_conversions_equal_the_scalar_forms(
            v in proptest::collection::vec(-300f32..300.0, 0..70),
            inv in 0.01f32..2.0,
        ) {
            let isa = isa::active();
            let mut f = vec![0f32; v.len()];
            quantize_to_f32(isa, &v, inv, &mut f);
            let mut q = vec![0i8; v.len()];
            quantize_to_i8(isa, &v, inv, &mut q);
            let mut back = vec![0f32; v.len()];
            widen_i8(isa, &q, &mut back);
            for i in 0..v.len() {
                let want = crate::qconv::quantize(v[i], inv);
                prop_assert_eq!(f[i], want as f32);
                prop_assert_eq!(q[i] as i16, want);
                prop_assert_eq!(back[i], want as f32);
            }
            // Exact ties round half to even.
            let ties: Vec<f32> = (-20..20).map(|i| i as f32 + 0.5).collect();
            let mut t = vec![0i8; ties.len()];
            quantize_to_i8(isa, &ties, 1.0, &mut t);
            for (x, q) in ties.iter().zip(&t) {
                prop_assert_eq!(*q as f32, x.round_ties_even());
            }
        }
    }

    proptest! {
        #[test]
        fn qlinear_equals_the_reference(
            m in 1usize..4, n in 1usize..150, k in 1usize..300, threads in 1usize..4,
            seed in any::<u64>(), bias: bool,
        ) {
            let rnd = |n: usize, seed: u64| -> Vec<f32> {
                let mut s = seed | 1;
                (0..n).map(|_| { s ^= s << 13; s ^= s >> 7; s ^= s << 17; (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0 }).collect()
            };
            let (w, x, b) = (rnd(n * k, seed), rnd(m * k, seed ^ 0x55), rnd(n, seed ^ 0xaa));
            let b = bias.then_some(&b[..]);
            let scale = 0.8 / 127.0; // clips the tails of x
            let layer = QLinear::new(n, k, &w, b, scale).unwrap();
            let mut scratch = vec![f32::NAN; layer.scratch_len(m)];
            let mut y = vec![f32::NAN; m * n];
            layer.run(&crate::pool::ThreadPool::new(threads), m, &x, &mut y, &mut scratch);
            let mut want = vec![0f32; m * n];
            reference_qlinear(n, k, &w, b, scale, &x, &mut want);
            for (i, (a, r)) in y.iter().zip(&want).enumerate() {
                // Exact integer sums; the epilogue is the same two steps.
                prop_assert!((a - r).abs() <= 1e-6 * (1.0 + r.abs()), "at {}: {} vs {}", i, a, r);
            }
        }
    }

    #[test]
    fn qlinear_refuses_bad_layers() {
        assert!(QLinear::new(2, 3, &[0.0; 6], None, 0.1).is_ok());
        assert!(QLinear::new(2, 3, &[0.0; 5], None, 0.1).is_err());
        assert!(QLinear::new(2, 3, &[0.0; 6], Some(&[0.0; 3]), 0.1).is_err());
        assert!(QLinear::new(2, 3, &[0.0; 6], None, 0.0).is_err());
        assert!(QLinear::new(0, 3, &[], None, 0.1).is_err());
    }
}
