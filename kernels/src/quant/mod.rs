//! Quantized weight formats (GGML block layouts) and the products that run
//! on them directly: no dequantized copy of a weight matrix is ever made.
//!
//! | type | elements / block | bytes / block | value |
//! |---|---|---|---|
//! | F32 | 1 | 4 | as is |
//! | F16, BF16 | 1 | 2 | widened |
//! | Q8_0 | 32 | 34 | `d · q`, `d` f16, `q` i8 |
//! | Q4_0 | 32 | 18 | `d · (q − 8)`, nibbles: low = element j, high = j + 16 |
//! | Q4_1 | 32 | 20 | `d · q + m`, `d`, `m` f16 |
//! | Q4_K | 256 | 144 | 8 sub-blocks, 6-bit scales and mins |
//! | Q6_K | 256 | 210 | 16 sub-blocks, 6-bit values, i8 scales |
//!
//! [`dequantize`] is the scalar reference every fast path is tested
//! against; [`dot`] is one row times an f32 vector (AVX2 for Q4_0, Q4_1,
//! Q8_0 and F32; other types dequantize one block at a time on the stack);
//! [`matmul`] runs many rows against one or several vectors on the pool.

use half::{bf16, f16};

use crate::pool::{SyncPtr, ThreadPool};

mod packed;
pub use packed::{PackSource, Packed, GROUP_ROWS};

/// A weight storage type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum QuantType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 8-bit, one f16 scale per 32.
    Q8_0,
    /// 4-bit, one f16 scale per 32.
    Q4_0,
    /// 4-bit, f16 scale and minimum per 32.
    Q4_1,
    /// 4-bit k-quant, 256 per super-block.
    Q4_K,
    /// 6-bit k-quant, 256 per super-block.
    Q6_K,
}

impl QuantType {
    /// From the GGML type id used in GGUF files.
    pub fn from_ggml(id: u32) -> Option<QuantType> {
        Some(match id {
            0 => QuantType::F32,
            1 => QuantType::F16,
            2 => QuantType::Q4_0,
            3 => QuantType::Q4_1,
            8 => QuantType::Q8_0,
            12 => QuantType::Q4_K,
            14 => QuantType::Q6_K,
            30 => QuantType::BF16,
            _ => return None,
        })
    }

    /// The GGML type id.
    pub fn ggml_id(self) -> u32 {
        match self {
            QuantType::F32 => 0,
            QuantType::F16 => 1,
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q8_0 => 8,
            QuantType::Q4_K => 12,
            QuantType::Q6_K => 14,
            QuantType::BF16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            QuantType::F32 | QuantType::F16 | QuantType::BF16 => 1,
            QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q4_1 => 32,
            QuantType::Q4_K | QuantType::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::F32 => 4,
            QuantType::F16 | QuantType::BF16 => 2,
            QuantType::Q8_0 => 34,
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q4_K => 144,
            QuantType::Q6_K => 210,
        }
    }

    /// Bytes of a row of `n` elements (`n` a multiple of the block).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_elems() * self.block_bytes()
    }
}

#[inline(always)]
fn h(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Q4_K scale and min of sub-block `j` (6 bits each, packed in 12 bytes).
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Dequantizes one block into `out` (`block_elems` values).
fn dequantize_block(ty: QuantType, b: &[u8], out: &mut [f32]) {
    match ty {
        QuantType::F32 => out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        QuantType::F16 => out[0] = h(b, 0),
        QuantType::BF16 => out[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        QuantType::Q8_0 => {
            let d = h(b, 0);
            for j in 0..32 {
                out[j] = d * (b[2 + j] as i8) as f32;
            }
        }
        QuantType::Q4_0 => {
            let d = h(b, 0);
            for j in 0..16 {
                out[j] = d * ((b[2 + j] & 0xF) as i32 - 8) as f32;
                out[j + 16] = d * ((b[2 + j] >> 4) as i32 - 8) as f32;
            }
        }
        QuantType::Q4_1 => {
            let (d, m) = (h(b, 0), h(b, 2));
            for j in 0..16 {
                out[j] = d * (b[4 + j] & 0xF) as f32 + m;
                out[j + 16] = d * (b[4 + j] >> 4) as f32 + m;
            }
        }
        QuantType::Q4_K => {
            let (d, dmin) = (h(b, 0), h(b, 2));
            let scales = &b[4..16];
            let qs = &b[16..144];
            for (g, chunk) in (0..4).map(|g| (g, &qs[32 * g..32 * g + 32])) {
                let (s1, m1) = scale_min_k4(2 * g, scales);
                let (s2, m2) = scale_min_k4(2 * g + 1, scales);
                let (d1, mm1) = (d * s1 as f32, dmin * m1 as f32);
                let (d2, mm2) = (d * s2 as f32, dmin * m2 as f32);
                for l in 0..32 {
                    out[64 * g + l] = d1 * (chunk[l] & 0xF) as f32 - mm1;
                    out[64 * g + 32 + l] = d2 * (chunk[l] >> 4) as f32 - mm2;
                }
            }
        }
        QuantType::Q6_K => {
            let ql = &b[0..128];
            let qh = &b[128..192];
            let sc = &b[192..208];
            let d = h(b, 208);
            for half in 0..2 {
                let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
                let y = &mut out[128 * half..128 * half + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
    }
}

/// Dequantizes a row: `bytes` holds `out.len() / block_elems` blocks.
/// The scalar reference for every product below.
pub fn dequantize(ty: QuantType, bytes: &[u8], out: &mut [f32]) {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    for (o, b) in out.chunks_exact_mut(be).zip(bytes.chunks_exact(bb)) {
        dequantize_block(ty, b, o);
    }
}

/// Quantizes `x` to Q8_0 / Q4_0 / Q4_1 as GGML does (for tests, tools and
/// the KV cache); other types are not produced here.
pub fn quantize(ty: QuantType, x: &[f32]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(ty.row_bytes(x.len()));
    match ty {
        QuantType::F32 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        QuantType::F16 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes())),
        QuantType::Q8_0 => {
            for b in x.chunks_exact(32) {
                let amax = b.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
        QuantType::Q4_0 => {
            for b in x.chunks_exact(32) {
                let max = b
                    .iter()
                    .fold(0.0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                for j in 0..16 {
                    let q0 = ((b[j] * id + 8.5) as i32).clamp(0, 15) as u8;
                    let q1 = ((b[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
                    out.push(q0 | (q1 << 4));
                }
            }
        }
        QuantType::Q4_1 => {
            for b in x.chunks_exact(32) {
                let min = b.iter().cloned().fold(f32::INFINITY, f32::min);
                let max = b.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_bits().to_le_bytes());
                for j in 0..16 {
                    let q0 = (((b[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    let q1 = (((b[j + 16] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    out.push(q0 | (q1 << 4));
                }
            }
        }
        _ => return None,
    }
    Some(out)
}

/// One row (`x.len()` elements, quantized in `row`) times `x`.
pub fn dot(ty: QuantType, row: &[u8], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::active().has_avx2()
        && matches!(
            ty,
            QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q8_0 | QuantType::F32
        )
    {
        // SAFETY: AVX2 and FMA are present when this tier is active; the
        // function reads only whole blocks within `row` and `x`.
        return unsafe { dot_avx2(ty, row, x) };
    }
    dot_portable(ty, row, x)
}

/// Portable product: one block dequantized on the stack at a time.
pub fn dot_portable(ty: QuantType, row: &[u8], x: &[f32]) -> f32 {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    let mut buf = [0.0f32; 256];
    let mut acc = 0.0f32;
    for (b, xs) in row.chunks_exact(bb).zip(x.chunks_exact(be)) {
        dequantize_block(ty, b, &mut buf[..be]);
        let mut s = 0.0f32;
        for (w, v) in buf[..be].iter().zip(xs) {
            s += w * v;
        }
        acc += s;
    }
    acc
}

/// The two f16 values at `b[i..i + 4]` (a block's `d` and `m`) with F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn h2(b: &[u8], i: usize) -> (f32, f32) {
    // SAFETY: the slice holds the four bytes (bounds-checked here).
    unsafe { h2p(b[i..i + 4].as_ptr()) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(ty: QuantType, row: &[u8], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    let blocks = (row.len() / bb).min(x.len() / be);
    let mut acc = _mm256_setzero_ps();
    match ty {
        QuantType::F32 => {
            let n = blocks;
            let mut i = 0;
            while i + 8 <= n {
                // SAFETY: i + 8 ≤ n ≤ both lengths (F32 rows are 4 bytes each).
                unsafe {
                    let w = _mm256_loadu_ps(row.as_ptr().add(4 * i) as *const f32);
                    acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(x.as_ptr().add(i)), acc);
                }
                i += 8;
            }
            let mut tail = 0.0;
            for j in i..n {
                let w = f32::from_le_bytes([
                    row[4 * j],
                    row[4 * j + 1],
                    row[4 * j + 2],
                    row[4 * j + 3],
                ]);
                tail += w * x[j];
            }
            // SAFETY: AVX2 is enabled in this function.
            return unsafe { hsum(acc) } + tail;
        }
        QuantType::Q8_0 => {
            for k in 0..blocks {
                let b = &row[k * bb..(k + 1) * bb];
                let xs = &x[k * 32..k * 32 + 32];
                let d = _mm256_set1_ps(h(b, 0));
                let mut s = _mm256_setzero_ps();
                for g in 0..4 {
                    // SAFETY: block bytes 2..34 and x[k·32..k·32+32] are in bounds.
                    unsafe {
                        let q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                            b.as_ptr().add(2 + 8 * g) as *const __m128i,
                        )));
                        s = _mm256_fmadd_ps(q, _mm256_loadu_ps(xs.as_ptr().add(8 * g)), s);
                    }
                }
                acc = _mm256_fmadd_ps(d, s, acc);
            }
        }
        QuantType::Q4_0 | QuantType::Q4_1 => {
            let q4_1 = ty == QuantType::Q4_1;
            let qoff = if q4_1 { 4 } else { 2 };
            let mask = _mm_set1_epi8(0x0f);
            let eight = _mm256_set1_ps(8.0);
            let mut macc = _mm256_setzero_ps();
            for k in 0..blocks {
                let b = &row[k * bb..(k + 1) * bb];
                let xs = &x[k * 32..k * 32 + 32];
                // SAFETY: 16 nibble bytes at qoff..qoff+16 ≤ bb, 32 x values;
                // F16C is part of this tier.
                unsafe {
                    let (d, m) = h2(b, 0);
                    let raw = _mm_loadu_si128(b.as_ptr().add(qoff) as *const __m128i);
                    let lo = _mm_and_si128(raw, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), mask);
                    let mut s = _mm256_setzero_ps();
                    let mut sx = _mm256_setzero_ps();
                    for (g, part) in [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)]
                        .into_iter()
                        .enumerate()
                    {
                        let mut q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
                        if !q4_1 {
                            q = _mm256_sub_ps(q, eight);
                        }
                        let xv = _mm256_loadu_ps(xs.as_ptr().add(8 * g));
                        s = _mm256_fmadd_ps(q, xv, s);
                        if q4_1 {
                            sx = _mm256_add_ps(sx, xv);
                        }
                    }
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc);
                    if q4_1 {
                        macc = _mm256_fmadd_ps(_mm256_set1_ps(m), sx, macc);
                    }
                }
            }
            // SAFETY: AVX2 is enabled in this function.
            return unsafe { hsum(_mm256_add_ps(acc, macc)) };
        }
        _ => return dot_portable(ty, row, x),
    }
    // SAFETY: AVX2 is enabled in this function.
    unsafe { hsum(acc) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps::<1>(v);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// Longest row [`matmul`] dequantizes into its per-thread buffer; longer
/// rows use the block-at-a-time product.
const ROW_BUF: usize = 8192;

/// Dequantizes one row, SIMD for the 4/8-bit types (same values as
/// [`dequantize`], which it falls back to).
pub fn dequantize_row(ty: QuantType, row: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::active().has_avx2()
        && matches!(ty, QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q8_0)
    {
        // SAFETY: AVX2 is present when this tier is active; whole blocks
        // of `row` and `out` only.
        unsafe { dequantize_row_avx2(ty, row, out) };
        return;
    }
    dequantize(ty, row, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dequantize_row_avx2(ty: QuantType, row: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let bb = ty.block_bytes();
    let blocks = (row.len() / bb).min(out.len() / 32);
    let mask = _mm_set1_epi8(0x0f);
    for k in 0..blocks {
        let b = &row[k * bb..(k + 1) * bb];
        let o = &mut out[k * 32..k * 32 + 32];
        let d = _mm256_set1_ps(h(b, 0));
        // SAFETY: 16 or 32 quant bytes inside the block, 32 outputs.
        unsafe {
            match ty {
                QuantType::Q8_0 => {
                    for g in 0..4 {
                        let q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                            b.as_ptr().add(2 + 8 * g) as *const __m128i,
                        )));
                        _mm256_storeu_ps(o.as_mut_ptr().add(8 * g), _mm256_mul_ps(d, q));
                    }
                }
                _ => {
                    let off = if ty == QuantType::Q4_1 { 4 } else { 2 };
                    let m = _mm256_set1_ps(if ty == QuantType::Q4_1 { h(b, 2) } else { 0.0 });
                    let raw = _mm_loadu_si128(b.as_ptr().add(off) as *const __m128i);
                    let lo = _mm_and_si128(raw, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), mask);
                    for (g, half) in [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)]
                        .into_iter()
                        .enumerate()
                    {
                        let q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(half));
                        // Q4_1: d·q + m. Q4_0: d·(q − 8) = d·q − 8d, exact
                        // for the small integers and f16-derived scales.
                        let v = if ty == QuantType::Q4_1 {
                            _mm256_add_ps(_mm256_mul_ps(d, q), m)
                        } else {
                            _mm256_mul_ps(d, _mm256_sub_ps(q, _mm256_set1_ps(8.0)))
                        };
                        _mm256_storeu_ps(o.as_mut_ptr().add(8 * g), v);
                    }
                }
            }
        }
    }
}

/// `Σ a·b` over f32 slices, eight lanes and four accumulators where AVX2 is.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::active().has_avx2() {
        // SAFETY: AVX2/FMA present; reads stay within the shorter slice.
        return unsafe { dot_f32_avx2(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, ac) in acc.iter_mut().enumerate() {
            // SAFETY: i + 32 ≤ n bounds every load.
            unsafe {
                let x = _mm256_loadu_ps(a.as_ptr().add(i + 8 * j));
                let y = _mm256_loadu_ps(b.as_ptr().add(i + 8 * j));
                *ac = _mm256_fmadd_ps(x, y, *ac);
            }
        }
        i += 32;
    }
    let mut tail = 0.0;
    for j in i..n {
        tail += a[j] * b[j];
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    // SAFETY: AVX2 is enabled in this function.
    unsafe { hsum(s) + tail }
}

/// Q4_1 row · `x` given `xsum[k]` = sum of `x` over block `k` (shared by
/// every row of a product, so the `m` term costs one multiply per block).
pub fn dot_q4_1_sums(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::active().has_avx2() {
        // SAFETY: AVX2/FMA/F16C present; whole blocks only (checked inside).
        return unsafe { dot_q4_1_sums_avx2(row, x, xsum) };
    }
    // The portable path recomputes the block sums itself.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = xsum;
    dot_portable(QuantType::Q4_1, row, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_1_sums_avx2(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let blocks = (row.len() / 20).min(x.len() / 32).min(xsum.len());
    let mask = _mm_set1_epi8(0x0f);
    let mut acc = _mm256_setzero_ps();
    let mut macc = 0.0f32;
    for k in 0..blocks {
        let b = &row[k * 20..(k + 1) * 20];
        let xs = &x[k * 32..k * 32 + 32];
        // SAFETY: bytes 4..20 of the block and 32 x values are in bounds.
        unsafe {
            let (d, m) = h2(b, 0);
            let raw = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
            let lo = _mm_and_si128(raw, mask);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), mask);
            let q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            let q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(lo)));
            let q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            let q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(hi)));
            let s01 = _mm256_fmadd_ps(
                q1,
                _mm256_loadu_ps(xs.as_ptr().add(8)),
                _mm256_mul_ps(q0, _mm256_loadu_ps(xs.as_ptr())),
            );
            let s23 = _mm256_fmadd_ps(
                q3,
                _mm256_loadu_ps(xs.as_ptr().add(24)),
                _mm256_mul_ps(q2, _mm256_loadu_ps(xs.as_ptr().add(16))),
            );
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_add_ps(s01, s23), acc);
            macc += m * xsum[k];
        }
    }
    // SAFETY: AVX2 is enabled in this function.
    unsafe { hsum(acc) + macc }
}

/// `y += a·x` over f32 slices (the shorter length).
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::active().has_avx2() {
        // SAFETY: AVX2/FMA present; the body is safe code.
        unsafe { axpy_avx2(a, x, y) };
        return;
    }
    for (o, v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(a: f32, x: &[f32], y: &mut [f32]) {
    for (o, v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// Floats of `wbuf` that [`matmul`] needs for `cols`-wide rows on `pool`.
pub fn matmul_scratch(pool: &ThreadPool, cols: usize) -> usize {
    pool.threads() * 4 * cols.min(ROW_BUF)
}

/// `y[t][r] = dot(row r of w, x[t])` for `t` in `0..tokens`: `w` holds
/// `rows` rows of `cols` elements of type `ty`; `x` is `tokens × cols`,
/// `y` is `tokens × rows`. Rows are split over the pool; each weight row
/// is dequantized once (into the caller's `wbuf`, [`matmul_scratch`]
/// floats) for all tokens, so prompt processing costs one unpack per
/// weight, not one per weight and token.
pub fn matmul(
    ty: QuantType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    y: &mut [f32],
    wbuf: &mut [f32],
    pool: &ThreadPool,
) {
    let rb = ty.row_bytes(cols);
    assert!(w.len() >= rows * rb && x.len() >= tokens * cols && y.len() >= tokens * rows);
    let per_thread = 4 * cols.min(ROW_BUF);
    assert!(
        wbuf.len() >= pool.threads() * per_thread,
        "matmul scratch too small"
    );
    let wb = SyncPtr::new(wbuf);
    let chunk = 16usize;
    let tasks = rows.div_ceil(chunk);
    let out = SyncPtr::new(y);
    pool.run(tasks, &|task, slot| {
        let r0 = task * chunk;
        let r1 = (r0 + chunk).min(rows);
        {
            // SAFETY: each pool slot owns wbuf[slot·per_thread..] (sized by
            // the assert above) and runs one task at a time.
            let buf =
                unsafe { std::slice::from_raw_parts_mut(wb.add(slot * per_thread), per_thread) };
            let mut r = r0;
            // Block sums of a single Q4_1 input, shared by the rows.
            let mut xsum = [0.0f32; ROW_BUF / 32];
            let sums = tokens == 1 && ty == QuantType::Q4_1 && cols <= ROW_BUF;
            if sums {
                for (k, b) in x[..cols].chunks_exact(32).enumerate() {
                    xsum[k] = b.iter().sum();
                }
            }
            while r < r1 {
                // One token: the fused product reads each weight once.
                if cols > ROW_BUF || tokens == 1 {
                    let row = &w[r * rb..(r + 1) * rb];
                    if sums {
                        let v = dot_q4_1_sums(row, &x[..cols], &xsum[..cols / 32]);
                        // SAFETY: (0, r) belongs to this task; r < y.len().
                        unsafe { *out.add(r) = v };
                        r += 1;
                        continue;
                    }
                    for t in 0..tokens {
                        let v = dot(ty, row, &x[t * cols..(t + 1) * cols]);
                        // SAFETY: each (t, r) is written by exactly one task
                        // (rows are partitioned); t·rows + r < y.len().
                        unsafe { *out.add(t * rows + r) = v };
                    }
                    r += 1;
                    continue;
                }
                // Several tokens: dequantize up to 4 rows once, then a
                // 4-row × 2-token register tile over them.
                let nr = (r1 - r).min(4);
                for i in 0..nr {
                    dequantize_row(
                        ty,
                        &w[(r + i) * rb..(r + i + 1) * rb],
                        &mut buf[i * cols..(i + 1) * cols],
                    );
                }
                let mut t = 0;
                while t < tokens {
                    let nt = (tokens - t).min(2);
                    let mut acc = [[0.0f32; 2]; 4];
                    tile_dot(
                        &buf[..nr * cols],
                        nr,
                        &x[t * cols..(t + nt) * cols],
                        nt,
                        cols,
                        &mut acc,
                    );
                    for i in 0..nr {
                        for j in 0..nt {
                            // SAFETY: as above, (t + j, r + i) belongs to this task.
                            unsafe { *out.add((t + j) * rows + r + i) = acc[i][j] };
                        }
                    }
                    t += nt;
                }
                r += nr;
            }
        }
    });
}

/// `acc[i][j] = w_i · x_j` for `nr ≤ 4` rows of `w` and `nt ≤ 2` rows of
/// `x` (all `cols` long).
fn tile_dot(w: &[f32], nr: usize, x: &[f32], nt: usize, cols: usize, acc: &mut [[f32; 2]; 4]) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::active().has_avx2() && nr == 4 && nt == 2 {
        // SAFETY: AVX2/FMA present; the function reads 4 rows of `w` and 2
        // of `x`, each `cols` long (checked inside).
        unsafe { tile_dot_4x2_avx2(w, x, cols, acc) };
        return;
    }
    for i in 0..nr {
        for j in 0..nt {
            acc[i][j] = dot_f32(&w[i * cols..(i + 1) * cols], &x[j * cols..(j + 1) * cols]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_dot_4x2_avx2(w: &[f32], x: &[f32], cols: usize, acc: &mut [[f32; 2]; 4]) {
    use std::arch::x86_64::*;
    assert!(w.len() >= 4 * cols && x.len() >= 2 * cols);
    let mut a = [[_mm256_setzero_ps(); 2]; 4];
    let mut k = 0;
    while k + 8 <= cols {
        // SAFETY: k + 8 ≤ cols and the assert bound every row read.
        unsafe {
            let x0 = _mm256_loadu_ps(x.as_ptr().add(k));
            let x1 = _mm256_loadu_ps(x.as_ptr().add(cols + k));
            for (i, ai) in a.iter_mut().enumerate() {
                let wv = _mm256_loadu_ps(w.as_ptr().add(i * cols + k));
                ai[0] = _mm256_fmadd_ps(wv, x0, ai[0]);
                ai[1] = _mm256_fmadd_ps(wv, x1, ai[1]);
            }
        }
        k += 8;
    }
    for i in 0..4 {
        for j in 0..2 {
            let mut tail = 0.0;
            for kk in k..cols {
                tail += w[i * cols + kk] * x[j * cols + kk];
            }
            // SAFETY: AVX2 is enabled in this function.
            acc[i][j] = unsafe { hsum(a[i][j]) } + tail;
        }
    }
}

/// Activations quantized to 8 bits per 32-value block, as llama.cpp's
/// `Q8_1` does before products with 4/8-bit weights: `d = max|x| / 127`
/// (rounded to f16), `q = round(x · 127 / max|x|)` (ties to even),
/// `s = d · Σq` (rounded to f16).
/// Products against Q4_0 / Q4_1 / Q8_0 weights then run in integers.
#[derive(Debug, Clone, Default)]
pub struct Q8Act {
    cols: usize,
    rows: usize,
    d: Vec<f32>,
    s: Vec<f32>,
    q: Vec<i8>,
}

impl Q8Act {
    /// Room for `rows × cols` values (`cols` a multiple of 32).
    pub fn with_capacity(rows: usize, cols: usize) -> Q8Act {
        let blocks = rows * cols / 32;
        Q8Act {
            cols,
            rows: 0,
            d: Vec::with_capacity(blocks),
            s: Vec::with_capacity(blocks),
            q: Vec::with_capacity(rows * cols),
        }
    }

    /// Quantizes `rows` rows of `cols` values from `x` (reusing the
    /// buffers: no allocation within the capacity).
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        self.cols = cols;
        self.rows = rows;
        let blocks = rows * cols / 32;
        self.d.resize(blocks, 0.0);
        self.s.resize(blocks, 0.0);
        self.q.resize(blocks * 32, 0);
        for (k, b) in x[..blocks * 32].chunks_exact(32).enumerate() {
            let (d, sum) = quantize_q8_block_best(b, &mut self.q[k * 32..k * 32 + 32]);
            self.d[k] = f16::from_f32(d).to_f32();
            self.s[k] = f16::from_f32(sum as f32 * d).to_f32();
        }
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// One 32-value block to 8 bits as llama.cpp does: the multiplier is
/// 127/amax (not 1/d) and halves round to even, so the integers are the
/// same. Returns `d` (unrounded) and `Σq`.
fn quantize_q8_block(b: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = b.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (o, v) in q.iter_mut().zip(b) {
        let r = (v * id).round_ties_even() as i32;
        sum += r;
        *o = r as i8;
    }
    (amax / 127.0, sum)
}

/// [`quantize_q8_block`] with the fastest form this CPU has.
fn quantize_q8_block_best(b: &[f32], q: &mut [i8]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::active().has_avx2() {
        // SAFETY: AVX2 is active; the function checks the 32 values.
        return unsafe { quantize_q8_block_avx2(b, q) };
    }
    quantize_q8_block(b, q)
}

/// [`quantize_q8_block`] with AVX2 (bit-identical: the same max, product
/// and round-to-nearest-even).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_q8_block_avx2(b: &[f32], q: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    assert!(b.len() >= 32 && q.len() >= 32);
    // SAFETY: 32 values are readable in b and writable in q (asserted).
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(b.as_ptr().add(8 * i)));
        let mut m = _mm256_andnot_ps(sign, v[0]);
        for x in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *x));
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m1 = _mm_max_ss(m2, _mm_movehdup_ps(m2));
        let amax = _mm_cvtss_f32(m1);
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let i: [__m256i; 4] = std::array::from_fn(|k| {
            _mm256_cvtps_epi32(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(_mm256_mul_ps(v[k], id)))
        });
        let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2));
        // Pack 32 × i32 to i8 (values are within ±127), undoing the lane
        // interleave of the 256-bit packs.
        let p01 = _mm256_packs_epi32(i[0], i[1]);
        let p23 = _mm256_packs_epi32(i[2], i[3]);
        let p = _mm256_packs_epi16(p01, p23);
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, p);
        (amax / 127.0, _mm_cvtsi128_si32(s1))
    }
}

/// Whether `ty` has an integer product with [`Q8Act`] activations.
pub fn has_q8_product(ty: QuantType) -> bool {
    matches!(ty, QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q8_0)
}

/// One weight row times activation row `t` of `xq`, in integers per block
/// (the scalar reference of [`dot_q8`]).
pub fn dot_q8_portable(ty: QuantType, row: &[u8], xq: &Q8Act, t: usize) -> f32 {
    let nb = xq.cols / 32;
    let bb = ty.block_bytes();
    let mut acc = 0.0f32;
    for k in 0..nb {
        let b = &row[k * bb..(k + 1) * bb];
        let xi = t * nb + k;
        let q = &xq.q[xi * 32..xi * 32 + 32];
        let (dx, sx) = (xq.d[xi], xq.s[xi]);
        match ty {
            QuantType::Q8_0 => {
                let sumi: i32 = (0..32).map(|j| (b[2 + j] as i8) as i32 * q[j] as i32).sum();
                acc += h(b, 0) * dx * sumi as f32;
            }
            QuantType::Q4_0 => {
                let sumi: i32 = (0..16)
                    .map(|j| {
                        ((b[2 + j] & 0xF) as i32 - 8) * q[j] as i32
                            + ((b[2 + j] >> 4) as i32 - 8) * q[j + 16] as i32
                    })
                    .sum();
                acc += h(b, 0) * dx * sumi as f32;
            }
            QuantType::Q4_1 => {
                let sumi: i32 = (0..16)
                    .map(|j| {
                        (b[4 + j] & 0xF) as i32 * q[j] as i32
                            + (b[4 + j] >> 4) as i32 * q[j + 16] as i32
                    })
                    .sum();
                acc += h(b, 0) * dx * sumi as f32 + h(b, 2) * sx;
            }
            _ => {}
        }
    }
    acc
}

/// [`dot_q8_portable`], eight-way integer SIMD where the CPU has it.
pub fn dot_q8(ty: QuantType, row: &[u8], xq: &Q8Act, t: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::active().has_avx2() {
        // SAFETY: AVX2/FMA are present when this tier is active; the
        // function reads whole blocks of `row` and of row `t` of `xq`.
        return unsafe { dot_q8_avx2(ty, row, xq, t) };
    }
    #[cfg(target_arch = "aarch64")]
    if crate::isa::active() == crate::isa::Isa::Neon {
        let mut out = [0.0f32; 1];
        if crate::isa::has_dotprod() {
            // SAFETY: the extension was just detected; the function checks
            // the bounds of every block it reads.
            unsafe { dot_q8_rows_neon::<1, true>(ty, row, row.len(), xq, t, &mut out) };
        } else {
            // SAFETY: no extension needed without DOT; bounds checked inside.
            unsafe { dot_q8_rows_neon::<1, false>(ty, row, row.len(), xq, t, &mut out) };
        }
        return out[0];
    }
    dot_q8_portable(ty, row, xq, t)
}

/// `R` consecutive weight rows (`rb` bytes apart in `w`) times activation
/// row `t` on NEON. Per block, the integer sum comes from `sdot` where the
/// CPU has the dot-product extension (`DOT`, e.g. Jetson Orin), else from
/// `smull` + pairwise adds; both are exact, and each row's float steps are
/// the portable reference's, in the same order, so the result is
/// bit-identical to [`dot_q8_portable`]. The next `R` rows are prefetched
/// while these are multiplied (as in the AVX2 form).
///
/// # Safety
/// With `DOT`, the CPU must have the dot-product extension.
#[cfg(target_arch = "aarch64")]
unsafe fn dot_q8_rows_neon<const R: usize, const DOT: bool>(
    ty: QuantType,
    w: &[u8],
    rb: usize,
    xq: &Q8Act,
    t: usize,
    out: &mut [f32; R],
) {
    use crate::dotprod::sdot;
    use std::arch::aarch64::*;
    let (nb, bb) = rows_operands(ty, w, rb, xq, t, R);
    let mut acc = [0.0f32; R];
    let ahead = w.as_ptr().wrapping_add(PREFETCH_GROUPS_AHEAD * R * rb);
    let pf_step = (R * rb).div_ceil(nb.max(1));
    for k in 0..nb {
        for l in (0..pf_step).step_by(64) {
            prefetch(ahead.wrapping_add(k * pf_step + l));
        }
        let xi = t * nb + k;
        let (dx, sx) = (xq.d[xi], xq.s[xi]);
        // SAFETY: the asserts bound the 32 activation bytes.
        let (x0, x1) = unsafe {
            let xp = xq.q.as_ptr().add(xi * 32);
            (vld1q_s8(xp), vld1q_s8(xp.add(16)))
        };
        for (r, a) in acc.iter_mut().enumerate() {
            let b = &w[r * rb + k * bb..r * rb + (k + 1) * bb];
            // SAFETY: the weight reads (16 or 32 bytes after the scales)
            // lie inside block `b`; the caller guarantees the extension
            // for `DOT`.
            let sumi = unsafe {
                let (w0, w1) = match ty {
                    QuantType::Q8_0 => (
                        vld1q_s8(b.as_ptr().add(2) as *const i8),
                        vld1q_s8(b.as_ptr().add(18) as *const i8),
                    ),
                    _ => {
                        let off = if ty == QuantType::Q4_1 { 4 } else { 2 };
                        let raw = vld1q_u8(b.as_ptr().add(off));
                        let lo = vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0f)));
                        let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(raw));
                        if ty == QuantType::Q4_0 {
                            let eight = vdupq_n_s8(8);
                            (vsubq_s8(lo, eight), vsubq_s8(hi, eight))
                        } else {
                            (lo, hi)
                        }
                    }
                };
                if DOT {
                    vaddvq_s32(sdot(sdot(vdupq_n_s32(0), w0, x0), w1, x1))
                } else {
                    let p0 = vmull_s8(vget_low_s8(w0), vget_low_s8(x0));
                    let p1 = vmull_s8(vget_high_s8(w0), vget_high_s8(x0));
                    let p2 = vmull_s8(vget_low_s8(w1), vget_low_s8(x1));
                    let p3 = vmull_s8(vget_high_s8(w1), vget_high_s8(x1));
                    let s01 = vaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1));
                    let s23 = vaddq_s32(vpaddlq_s16(p2), vpaddlq_s16(p3));
                    vaddvq_s32(vaddq_s32(s01, s23))
                }
            };
            match ty {
                QuantType::Q4_1 => *a += h(b, 0) * dx * sumi as f32 + h(b, 2) * sx,
                QuantType::Q8_0 | QuantType::Q4_0 => *a += h(b, 0) * dx * sumi as f32,
                _ => {}
            }
        }
    }
    *out = acc;
}

/// Checks the operands of a `rows`-row block product (`rows` weight rows
/// `rb` bytes apart in `w`, activation row `t` of `xq`); returns the blocks
/// per row and the bytes per block.
fn rows_operands(
    ty: QuantType,
    w: &[u8],
    rb: usize,
    xq: &Q8Act,
    t: usize,
    rows: usize,
) -> (usize, usize) {
    let nb = xq.cols / 32;
    let bb = ty.block_bytes();
    assert!(rows > 0 && rb >= nb * bb && w.len() >= (rows - 1) * rb + nb * bb);
    assert!(xq.q.len() >= (t + 1) * nb * 32);
    assert!(xq.d.len() >= (t + 1) * nb && xq.s.len() >= (t + 1) * nb);
    (nb, bb)
}

/// How many groups of rows ahead the block products prefetch weights. One
/// group (a few KiB) is too close to hide DRAM latency: decode, SmolLM2
/// Q4_1, AVX-512 machine, `osprey chat --int8-activations --kv-f16`, 3
/// alternated runs each: 1 group 102-112 tok/s on 1 thread, 161-171 on 2;
/// 3 groups 139-152 / 182-196; 6 groups 149-156 / 179-192; 12 groups
/// 139-153 / 183-187. (The NEON form uses the same distance; not timed on
/// a Jetson.)
const PREFETCH_GROUPS_AHEAD: usize = 4;

/// A hint to fetch the cache line at `p` into L1 (never faults, so `p`
/// may pass the end of its buffer).
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    #[cfg(target_arch = "aarch64")]
    // SAFETY: `prfm` is a hint: it reads nothing architecturally and never
    // faults, whatever the address.
    unsafe {
        std::arch::asm!(
            "prfm pldl1keep, [{p}]",
            p = in(reg) p,
            options(nostack, preserves_flags, readonly)
        );
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86_64; a prefetch is a hint that never
    // faults, whatever the address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
    }
    #[cfg(not(any(target_arch = "aarch64", target_arch = "x86_64")))]
    let _ = p;
}

/// Four rows `r..r + 4` (`rb` bytes apart in `w`) times activation row `t`
/// into `out`, with the four-row SIMD form this CPU has; `false` (and
/// nothing written) without one.
fn dot_q8_rows4(
    ty: QuantType,
    w: &[u8],
    rb: usize,
    xq: &Q8Act,
    t: usize,
    out: &mut [f32; 4],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::active().has_avx2() {
        // SAFETY: AVX2/FMA/F16C present; the bounds are checked inside.
        unsafe { dot_q8_rows_best::<4>(ty, w, rb, xq, t, out) };
        return true;
    }
    #[cfg(target_arch = "aarch64")]
    if crate::isa::active() == crate::isa::Isa::Neon {
        if crate::isa::has_dotprod() {
            // SAFETY: the extension was just detected; bounds checked inside.
            unsafe { dot_q8_rows_neon::<4, true>(ty, w, rb, xq, t, out) };
        } else {
            // SAFETY: no extension needed without DOT; bounds checked inside.
            unsafe { dot_q8_rows_neon::<4, false>(ty, w, rb, xq, t, out) };
        }
        return true;
    }
    let _ = (ty, w, rb, xq, t, out);
    false
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_avx2(ty: QuantType, row: &[u8], xq: &Q8Act, t: usize) -> f32 {
    let mut out = [0.0f32; 1];
    // SAFETY: AVX2/FMA/F16C are enabled here; the bounds are checked
    // inside.
    unsafe { dot_q8_rows_best::<1>(ty, row, row.len(), xq, t, &mut out) };
    out[0]
}

/// `R` rows with the x86 form this CPU has: VNNI where present, else AVX2.
///
/// # Safety
/// AVX2, FMA and F16C must be present; the bounds are checked inside.
#[cfg(target_arch = "x86_64")]
unsafe fn dot_q8_rows_best<const R: usize>(
    ty: QuantType,
    w: &[u8],
    rb: usize,
    xq: &Q8Act,
    t: usize,
    out: &mut [f32; R],
) {
    if crate::isa::has_vnni() {
        // SAFETY: AVX-512 VNNI/VL were detected; forwarded contract.
        unsafe { dot_q8_rows_vnni::<R>(ty, w, rb, xq, t, out) };
    } else {
        // SAFETY: forwarded contract.
        unsafe { dot_q8_rows_avx2::<R>(ty, w, rb, xq, t, out) };
    }
}

/// Defines a product of `R` consecutive weight rows with activation row `t`
/// (see [`dot_q8_rows_avx2`]) for one x86 feature set; `$acc4` adds each
/// group of four u8 × i8 products into an `i32` lane.
macro_rules! dot_q8_rows_x86 {
    ($(#[$doc:meta])* $name:ident, $features:literal, $acc4:ident) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize>(
            ty: QuantType,
            w: &[u8],
            rb: usize,
            xq: &Q8Act,
            t: usize,
            out: &mut [f32; R],
        ) {
            use std::arch::x86_64::*;
            let (nb, bb) = rows_operands(ty, w, rb, xq, t, R);
            let low = _mm256_set1_epi8(0x0f);
            let eight = _mm256_set1_epi8(8);
            let mut acc = [_mm256_setzero_ps(); R];
            let mut tail = [0.0f32; R];
            // Later rows follow these in memory: fetch the group of R rows
            // PREFETCH_GROUPS_AHEAD groups on while these are multiplied
            // (the weights stream from DRAM once per token, and the hardware
            // prefetcher loses track of R interleaved short rows).
            let ahead = w.as_ptr().wrapping_add(PREFETCH_GROUPS_AHEAD * R * rb);
            let pf_step = (R * rb).div_ceil(nb.max(1));
            for k in 0..nb {
                let xi = t * nb + k;
                for l in (0..pf_step).step_by(64) {
                    // A prefetch never faults, so the address may pass the end.
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(k * pf_step + l) as *const i8);
                }
                // SAFETY: the asserts above bound every read (32 i8 of x; 16 or
                // 32 weight bytes and the scales inside block k of each row).
                unsafe {
                    let xv = _mm256_loadu_si256(xq.q.as_ptr().add(xi * 32) as *const __m256i);
                    let (xd, xs) = (*xq.d.get_unchecked(xi), *xq.s.get_unchecked(xi));
                    for r in 0..R {
                        let b = w.as_ptr().add(r * rb + k * bb);
                        let (w_u8, x_s8, scale) = match ty {
                            QuantType::Q8_0 => {
                                let wv = _mm256_loadu_si256(b.add(2) as *const __m256i);
                                // |w| · sign(x, w): unsigned × signed for maddubs.
                                (_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv), h2p(b).0)
                            }
                            _ => {
                                let off = if ty == QuantType::Q4_1 { 4 } else { 2 };
                                let raw = _mm_loadu_si128(b.add(off) as *const __m128i);
                                let both = _mm256_set_m128i(_mm_srli_epi16::<4>(raw), raw);
                                let nib = _mm256_and_si256(both, low);
                                if ty == QuantType::Q4_0 {
                                    let wv = _mm256_sub_epi8(nib, eight);
                                    (_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv), h2p(b).0)
                                } else {
                                    let (d, m) = h2p(b);
                                    tail[r] += m * xs;
                                    (nib, xv, d)
                                }
                            }
                        };
                        let p32 = $acc4(_mm256_setzero_si256(), w_u8, x_s8);
                        let d = _mm256_set1_ps(scale * xd);
                        acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p32), acc[r]);
                    }
                }
            }
            for r in 0..R {
                // SAFETY: AVX2 is enabled in this function.
                out[r] = unsafe { hsum(acc[r]) } + tail[r];
            }
        }
    };
}

dot_q8_rows_x86!(
    /// `R` consecutive weight rows (`rb` bytes apart in `w`) times activation
    /// row `t`: `R` independent accumulation chains hide the FMA latency and
    /// share each activation block load. Each row's sum runs in the same order
    /// as llama.cpp's AVX2 `vec_dot_q4_1_q8_1` (one 8-lane accumulator, block
    /// by block; the `m·s` terms summed apart), so results are bit-identical
    /// to it.
    dot_q8_rows_avx2,
    "avx2,fma,f16c",
    acc4_maddubs
);

dot_q8_rows_x86!(
    /// [`dot_q8_rows_avx2`] with AVX-512 VNNI: `vpdpbusd` forms each group's
    /// `i32` sum in one instruction (AVX2: `vpmaddubsw` + `vpmaddwd`). The
    /// integer sums are the same exact values, so the results are too
    /// (llama.cpp uses the same instruction on such CPUs).
    dot_q8_rows_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    acc4_vnni
);

/// `acc` plus, per `i32` lane, the sum of its four u8 × i8 products:
/// `vpmaddubsw` (exact here: no pair sum reaches the i16 limit with
/// |values| ≤ 127, or nibbles ≤ 15 times |x| ≤ 127), `vpmaddwd` by ones,
/// `vpaddd`. Shared by the LLM block products and the INT8 convolution.
///
/// # Safety
/// AVX2 must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn acc4_maddubs(
    acc: std::arch::x86_64::__m256i,
    u: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)),
    )
}

/// [`acc4_maddubs`] in one `vpdpbusd` (nothing can saturate).
///
/// # Safety
/// AVX-512 VNNI and VL must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
#[inline]
pub(crate) unsafe fn acc4_vnni(
    acc: std::arch::x86_64::__m256i,
    u: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_dpbusd_epi32(acc, u, s)
}

/// [`h2`] from a raw block pointer.
///
/// # Safety
/// Four bytes readable at `b`; F16C available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn h2p(b: *const u8) -> (f32, f32) {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees four readable bytes.
    let bits = unsafe { (b as *const u32).read_unaligned() };
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps::<1>(v, v)))
}

/// As [`matmul`], against activations already quantized to [`Q8Act`]
/// (`ty` must satisfy [`has_q8_product`]).
pub fn matmul_q8(
    ty: QuantType,
    w: &[u8],
    rows: usize,
    xq: &Q8Act,
    y: &mut [f32],
    pool: &ThreadPool,
) {
    matmul_q8_many(
        &mut [Q8Product {
            ty,
            w,
            packed: None,
            rows,
            y,
        }],
        xq,
        pool,
    );
}

/// One weight matrix of [`matmul_q8_many`]: `y = xq · wᵀ`, `rows` rows.
#[derive(Debug)]
pub struct Q8Product<'a> {
    /// Weight type (must satisfy [`has_q8_product`]).
    pub ty: QuantType,
    /// The weights, `rows` rows of `xq.cols` values.
    pub w: &'a [u8],
    /// The same weights' first rows row-interleaved ([`Packed::new`] of
    /// `w`), which the products then read instead.
    pub packed: Option<&'a Packed>,
    /// Output rows (weight rows).
    pub rows: usize,
    /// `[token][row]` outputs.
    pub y: &'a mut [f32],
}

/// A product of [`matmul_q8_many`] as its tasks see it: type, weights,
/// packed weights, rows, output, first task.
type GroupJob<'a> = (
    QuantType,
    &'a [u8],
    Option<&'a Packed>,
    usize,
    SyncPtr<f32>,
    usize,
);

/// Most matrices one [`matmul_q8_many`] call takes.
pub const MAX_PRODUCTS: usize = 4;

/// Several products of the same activations (a layer's Q, K and V, or its
/// gate and up projections) as one pool job: one fork/join instead of one
/// per matrix, and the load balanced over all their rows.
pub fn matmul_q8_many(products: &mut [Q8Product<'_>], xq: &Q8Act, pool: &ThreadPool) {
    assert!(products.len() <= MAX_PRODUCTS);
    let tokens = xq.rows;
    let total: usize = products.iter().map(|p| p.rows).sum();
    // Two tasks per thread, in whole four-row groups: long runs of rows
    // keep each thread's weight prefetching a step ahead of its own
    // products (a task starts cold, and the rows its predecessor
    // prefetched past its end belong to a task another thread may have).
    // Decode tok/s, 2 threads, 5-6 alternated runs (medians): 8 tasks per
    // thread 171, 4: 204, 2: 200-234, 1: 236.
    // Whole packed groups per task.
    let chunk = (total / (2 * pool.threads()))
        .max(16)
        .next_multiple_of(GROUP_ROWS);
    let mut jobs: [Option<GroupJob<'_>>; MAX_PRODUCTS] = [None; MAX_PRODUCTS];
    let mut tasks = 0;
    for (slot, p) in jobs.iter_mut().zip(products.iter_mut()) {
        let rb = p.ty.row_bytes(xq.cols);
        assert!(has_q8_product(p.ty) && p.w.len() >= p.rows * rb && p.y.len() >= tokens * p.rows);
        let packed = p
            .packed
            .filter(|k| k.ty() == p.ty && k.cols() == xq.cols && k.rows() <= p.rows);
        *slot = Some((p.ty, p.w, packed, p.rows, SyncPtr::new(p.y), tasks));
        tasks += p.rows.div_ceil(chunk);
    }
    pool.run(tasks, &|task, _| {
        let Some(&(ty, w, packed, rows, out, first)) =
            jobs.iter().flatten().take_while(|j| j.5 <= task).last()
        else {
            return;
        };
        let rb = ty.row_bytes(xq.cols);
        let r0 = (task - first) * chunk;
        let r1 = (r0 + chunk).min(rows);
        let mut r = r0;
        // Packed groups first (tasks start on group boundaries) ...
        if let Some(pk) = packed {
            let mut v = [0.0f32; GROUP_ROWS];
            while r + GROUP_ROWS <= r1.min(pk.rows()) {
                for t in 0..tokens {
                    pk.dot_group(r / GROUP_ROWS, xq, t, &mut v);
                    for (i, &x) in v.iter().enumerate() {
                        // SAFETY: as below.
                        unsafe { *out.add(t * rows + r + i) = x };
                    }
                }
                r += GROUP_ROWS;
            }
        }
        // ... then the row-major rows.
        let mut v = [0.0f32; 4];
        // Four rows at a time where the CPU has the SIMD form (the first
        // token's product is the test), then single rows.
        while r + 4 <= r1 && dot_q8_rows4(ty, &w[r * rb..], rb, xq, 0, &mut v) {
            for t in 0..tokens {
                if t > 0 {
                    dot_q8_rows4(ty, &w[r * rb..], rb, xq, t, &mut v);
                }
                for (i, &x) in v.iter().enumerate() {
                    // SAFETY: as below.
                    unsafe { *out.add(t * rows + r + i) = x };
                }
            }
            r += 4;
        }
        for r in r..r1 {
            let row = &w[r * rb..(r + 1) * rb];
            for t in 0..tokens {
                let v = dot_q8(ty, row, xq, t);
                // SAFETY: each (t, r) of a product is written by exactly
                // one task and t·rows + r < y.len() (asserted above).
                unsafe { *out.add(t * rows + r) = v };
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic values in [-1, 1) (the packed layout's tests use
    /// them too).
    pub(super) fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn reference_dot(ty: QuantType, row: &[u8], x: &[f32]) -> f64 {
        let mut w = vec![0.0; x.len()];
        dequantize(ty, row, &mut w);
        w.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum()
    }

    #[test]
    fn quantize_roundtrip_is_close() {
        let x = data(256, 1);
        for (ty, tol) in [
            (QuantType::Q8_0, 0.01),
            (QuantType::Q4_0, 0.15),
            (QuantType::Q4_1, 0.08),
            (QuantType::F16, 1e-3),
        ] {
            let q = quantize(ty, &x).unwrap();
            assert_eq!(q.len(), ty.row_bytes(256));
            let mut back = vec![0.0; 256];
            dequantize(ty, &q, &mut back);
            let err = x
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                // NaN (an output never written) counts as infinitely wrong:
                // `f32::max` alone would skip it.
                .map(|e| if e.is_nan() { f32::INFINITY } else { e })
                .fold(0.0, f32::max);
            assert!(err < tol, "{ty:?}: {err}");
        }
    }

    #[test]
    fn k_quants_decode_a_hand_made_block() {
        // Q4_K: d = 1, dmin = 0.5, sub-block 0 scale 2 min 3, nibbles 5/7.
        let mut b = vec![0u8; 144];
        b[0..2].copy_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        b[4] = 2; // scale of sub-block 0
        b[8] = 3; // min of sub-block 0
        b[16] = 5 | (7 << 4);
        let mut out = vec![0.0; 256];
        dequantize(QuantType::Q4_K, &b, &mut out);
        assert_eq!(out[0], 2.0 * 5.0 - 0.5 * 3.0);
        assert_eq!(out[32], 0.0); // sub-block 1: scale 0, min 0
                                  // Q6_K: d = 0.25, scale[0] = -2, first value 6 bits = 40 → (40 − 32).
        let mut b = vec![0u8; 210];
        b[0] = 40 & 0xF;
        b[128] = (40 >> 4) & 3;
        b[192] = (-2i8) as u8;
        b[208..210].copy_from_slice(&f16::from_f32(0.25).to_bits().to_le_bytes());
        dequantize(QuantType::Q6_K, &b, &mut out);
        assert_eq!(out[0], 0.25 * -2.0 * 8.0);
        assert_eq!(out[1], 0.25 * -2.0 * -32.0); // all-zero bits decode to −32
    }

    proptest! {
        #[test]
        fn dot_matches_dequantized_reference(blocks in 1usize..9, seed in any::<u64>(), t in 0usize..8) {
            let ty = [QuantType::F32, QuantType::F16, QuantType::BF16, QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1, QuantType::Q4_K, QuantType::Q6_K][t];
            let n = blocks * 256;
            let x = data(n, seed);
            let row: Vec<u8> = match quantize(ty, &data(n, seed ^ 7)) {
                Some(r) => r,
                None => {
                    // Random bytes with a small, finite f16 scale where it lives.
                    let mut r: Vec<u8> = data(ty.row_bytes(n), seed ^ 9).iter().map(|v| (v * 127.0) as i8 as u8).collect();
                    let bb = ty.block_bytes();
                    let at = if ty == QuantType::Q6_K { 208 } else { 0 };
                    for b in r.chunks_exact_mut(bb) {
                        b[at..at + 2].copy_from_slice(&f16::from_f32(0.01).to_bits().to_le_bytes());
                        if ty == QuantType::Q4_K {
                            b[2..4].copy_from_slice(&f16::from_f32(0.02).to_bits().to_le_bytes());
                        }
                        if ty == QuantType::BF16 {
                            // keep bf16 values finite: zero the exponent's top bit
                            for p in b.chunks_exact_mut(2) { p[1] &= 0x3f; }
                        }
                    }
                    r
                }
            };
            let want = reference_dot(ty, &row, &x);
            let got = dot(ty, &row, &x) as f64;
            let scale: f64 = {
                let mut w = vec![0.0; n];
                dequantize(ty, &row, &mut w);
                w.iter().zip(&x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum::<f64>()
            };
            prop_assert!((got - want).abs() <= 1e-5 * scale.max(1.0), "{:?}: {} vs {}", ty, got, want);
        }
    }

    proptest! {
        #[test]
        fn q8_products_match_reference(blocks in 1usize..6, seed in any::<u64>(), t in 0usize..3) {
            let ty = [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1][t];
            let n = blocks * 32;
            let w = quantize(ty, &data(n, seed)).unwrap();
            let mut xq = Q8Act::with_capacity(2, n);
            xq.quantize(&data(2 * n, seed ^ 5), 2, n);
            for r in 0..2 {
                let want = dot_q8_portable(ty, &w, &xq, r);
                let got = dot_q8(ty, &w, &xq, r);
                prop_assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{:?}: {} vs {}", ty, got, want);
                // And close to the float product of the dequantized values.
                let mut wf = vec![0.0; n];
                dequantize(ty, &w, &mut wf);
                let xs = &data(2 * n, seed ^ 5)[r * n..(r + 1) * n];
                let exact: f32 = wf.iter().zip(xs).map(|(a, b)| a * b).sum();
                let mag: f32 = wf.iter().zip(xs).map(|(a, b)| (a * b).abs()).sum();
                prop_assert!((got - exact).abs() <= 0.02 * mag.max(1e-3), "{:?}: {} vs exact {}", ty, got, exact);
            }
        }
    }

    proptest! {
        #[test]
        fn q8_block_quantizers_agree_bit_for_bit(seed in any::<u64>(), ties in any::<bool>()) {
            let mut b = data(32, seed);
            if ties {
                // amax 127 makes the multiplier 1: x.5 values are exact
                // ties, which round to even.
                for (i, v) in b.iter_mut().enumerate() {
                    *v = ((i as f32) * 4.0 - 63.5).clamp(-126.5, 126.5);
                }
                b[0] = 127.0;
            }
            let mut want = [0i8; 32];
            let (d0, s0) = quantize_q8_block(&b, &mut want);
            if ties {
                prop_assert_eq!(want[1], -60); // -59.5 → -60 (even)
                prop_assert_eq!(want[2], -56); // -55.5 → -56
            }
            #[cfg(target_arch = "x86_64")]
            if crate::isa::active().has_avx2() {
                let mut got = [0i8; 32];
                // SAFETY: AVX2 is active; 32 values each.
                let (d1, s1) = unsafe { quantize_q8_block_avx2(&b, &mut got) };
                prop_assert_eq!(got, want);
                prop_assert_eq!((d1.to_bits(), s1), (d0.to_bits(), s0));
            }
            prop_assert_eq!(s0, want.iter().map(|&q| q as i32).sum::<i32>());
            let amax = b.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            prop_assert_eq!(d0, amax / 127.0);
        }
    }

    proptest! {
        #[test]
        fn fast_row_dequantization_matches_reference(blocks in 1usize..5, seed in any::<u64>(), t in 0usize..3) {
            let ty = [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1][t];
            let q = quantize(ty, &data(blocks * 32, seed)).unwrap();
            let (mut a, mut b) = (vec![0.0; blocks * 32], vec![0.0; blocks * 32]);
            dequantize(ty, &q, &mut a);
            dequantize_row(ty, &q, &mut b);
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn q4_1_dot_with_block_sums() {
        let x = data(256, 11);
        let w = quantize(QuantType::Q4_1, &data(256, 12)).unwrap();
        let sums: Vec<f32> = x.chunks(32).map(|b| b.iter().sum()).collect();
        let want = reference_dot(QuantType::Q4_1, &w, &x);
        assert!((dot_q4_1_sums(&w, &x, &sums) as f64 - want).abs() < 1e-4);
    }

    #[test]
    fn matmul_matches_per_row_dots() {
        for tokens in [1, 3] {
            matmul_case(tokens);
        }
    }

    #[test]
    fn matmul_q8_matches_single_row_products() {
        let (rows, cols) = (37, 96);
        for ty in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1] {
            let w = quantize(ty, &data(rows * cols, 7)).unwrap();
            let rb = ty.row_bytes(cols);
            for tokens in 1..=3 {
                let mut xq = Q8Act::with_capacity(tokens, cols);
                xq.quantize(&data(tokens * cols, 8), tokens, cols);
                for threads in [1, 3] {
                    let mut y = vec![0.0; tokens * rows];
                    matmul_q8(ty, &w, rows, &xq, &mut y, &ThreadPool::new(threads));
                    for t in 0..tokens {
                        for r in 0..rows {
                            let row = &w[r * rb..(r + 1) * rb];
                            // Row groups sum in the single-row order: the
                            // same bits.
                            let one = dot_q8(ty, row, &xq, t);
                            assert_eq!(
                                y[t * rows + r].to_bits(),
                                one.to_bits(),
                                "{ty:?} t {t} r {r}"
                            );
                            let want = dot_q8_portable(ty, row, &xq, t);
                            assert!((one - want).abs() <= 1e-4 * want.abs().max(1.0));
                            // NEON keeps the portable float order exactly.
                            #[cfg(target_arch = "aarch64")]
                            assert_eq!(one.to_bits(), want.to_bits(), "{ty:?}");
                        }
                    }
                }
            }
        }
    }

    /// The VNNI form forms the same exact integer sums as the AVX2 one, so
    /// every result has the same bits (and llama.cpp's on either CPU).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vnni_rows_equal_avx2_rows_bit_for_bit() {
        if !crate::isa::has_vnni() {
            eprintln!("SKIPPED: this CPU has no AVX-512 VNNI (or OSPREY_ISA caps it)");
            return;
        }
        let cols = 160;
        for ty in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1] {
            for seed in 0..20u64 {
                let w = quantize(ty, &data(4 * cols, seed)).unwrap();
                let mut xq = Q8Act::with_capacity(2, cols);
                xq.quantize(&data(2 * cols, seed ^ 9), 2, cols);
                let rb = ty.row_bytes(cols);
                for t in 0..2 {
                    let (mut a, mut b) = ([0.0f32; 4], [0.0f32; 4]);
                    // SAFETY: VNNI was detected (so AVX2/FMA/F16C too); the
                    // buffers hold four rows of `cols` and two activation
                    // rows (the functions check the bounds).
                    unsafe {
                        dot_q8_rows_avx2::<4>(ty, &w, rb, &xq, t, &mut a);
                        dot_q8_rows_vnni::<4>(ty, &w, rb, &xq, t, &mut b);
                    }
                    assert_eq!(
                        a.map(f32::to_bits),
                        b.map(f32::to_bits),
                        "{ty:?} seed {seed}"
                    );
                }
            }
        }
    }

    #[test]
    fn grouped_products_equal_separate_ones() {
        let cols = 64;
        let shapes = [
            (QuantType::Q4_1, 37),
            (QuantType::Q8_0, 5),
            (QuantType::Q4_0, 70),
            (QuantType::Q8_0, 44),
        ];
        let ws: Vec<Vec<u8>> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(ty, rows))| quantize(ty, &data(rows * cols, 20 + i as u64)).unwrap())
            .collect();
        let tokens = 2;
        let mut xq = Q8Act::with_capacity(tokens, cols);
        xq.quantize(&data(tokens * cols, 9), tokens, cols);
        // Packed where this CPU packs (Q4_1 and Q8_0 with eight rows or
        // more; the rows past the last whole group stay row-major).
        let packs: Vec<Option<Packed>> = shapes
            .iter()
            .zip(&ws)
            .map(|(&(ty, rows), w)| Packed::new(ty, w, rows, cols))
            .collect();
        for (threads, pack) in [
            (1, false),
            (2, false),
            (3, false),
            (1, true),
            (2, true),
            (3, true),
        ] {
            let pool = ThreadPool::new(threads);
            let mut ys: Vec<Vec<f32>> = shapes
                .iter()
                .map(|&(_, r)| vec![f32::NAN; tokens * r])
                .collect();
            {
                let mut products: Vec<Q8Product<'_>> = shapes
                    .iter()
                    .zip(&ws)
                    .zip(ys.iter_mut())
                    .zip(&packs)
                    .map(|(((&(ty, rows), w), y), k)| Q8Product {
                        ty,
                        w,
                        packed: k.as_ref().filter(|_| pack),
                        rows,
                        y,
                    })
                    .collect();
                matmul_q8_many(&mut products, &xq, &pool);
            }
            for ((&(ty, rows), w), y) in shapes.iter().zip(&ws).zip(&ys) {
                let mut want = vec![0.0; tokens * rows];
                matmul_q8(ty, w, rows, &xq, &mut want, &ThreadPool::new(1));
                let same = y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{ty:?} with {threads} threads, packed {pack}");
            }
        }
    }

    fn matmul_case(tokens: usize) {
        let (rows, cols) = (37, 64);
        let w = quantize(QuantType::Q4_1, &data(rows * cols, 3)).unwrap();
        let x = data(tokens * cols, 4);
        for threads in [1, 3] {
            let pool = ThreadPool::new(threads);
            let mut y = vec![0.0; tokens * rows];
            let mut wbuf = vec![0.0; matmul_scratch(&pool, cols)];
            matmul(
                QuantType::Q4_1,
                &w,
                rows,
                cols,
                &x,
                tokens,
                &mut y,
                &mut wbuf,
                &pool,
            );
            let rb = QuantType::Q4_1.row_bytes(cols);
            for t in 0..tokens {
                for r in 0..rows {
                    let want = dot_portable(
                        QuantType::Q4_1,
                        &w[r * rb..(r + 1) * rb],
                        &x[t * cols..(t + 1) * cols],
                    );
                    assert!((y[t * rows + r] - want).abs() < 1e-4);
                }
            }
        }
    }
}
