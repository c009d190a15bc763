//! Causal attention of one query row over a paged KV cache, heads spread
//! over the pool.
//!
//! Cache layout (owned by the LLM runtime): blocks of `block_tokens`
//! positions; block `b` holds, for each layer, K then V, each
//! `[kv_head][slot][head_dim]`, stored as f32 or as f16 (half the memory
//! and half the bytes read per decoded token; llama.cpp's default). A
//! sequence's block table lists its blocks in position order. Head-major
//! inside a block, so one head's keys (or values) of a block are one
//! contiguous run that the hardware prefetchers stream, rather than a
//! slice of every row.

use crate::activation::Activation;
use crate::pool::{SyncPtr, ThreadPool};
use crate::quant::{axpy, dot_f32};
use half::f16;

/// The cached values: the whole pool, in its storage type.
#[derive(Debug, Clone, Copy)]
pub enum KvData<'a> {
    /// Exact.
    F32(&'a [f32]),
    /// Rounded to half precision when written.
    F16(&'a [f16]),
}

impl KvData<'_> {
    fn len(&self) -> usize {
        match self {
            KvData::F32(d) => d.len(),
            KvData::F16(d) => d.len(),
        }
    }
}

/// One layer of one sequence's paged K/V.
#[derive(Debug, Clone, Copy)]
pub struct PagedKv<'a> {
    /// The whole pool.
    pub data: KvData<'a>,
    /// The sequence's blocks, in position order.
    pub blocks: &'a [u32],
    /// Positions per block.
    pub block_tokens: usize,
    /// Layers per block.
    pub layers: usize,
    /// This layer.
    pub layer: usize,
    /// Width of K (and V) per position: K/V heads × `head_dim`.
    pub kv_dim: usize,
    /// Width of one K/V head.
    pub head_dim: usize,
}

/// `count` contiguous rows of one head in a block, in the storage type.
#[derive(Debug, Clone, Copy)]
enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl PagedKv<'_> {
    /// Index in `data` of K (`which` = 0) or V (1) of `pos` for K/V head
    /// `head`: the one place the cache layout is written down.
    pub fn offset(&self, which: usize, pos: usize, head: usize) -> usize {
        let block = self.blocks[pos / self.block_tokens] as usize;
        let slot = pos % self.block_tokens;
        let heads = self.kv_dim / self.head_dim.max(1);
        ((((block * self.layers + self.layer) * 2 + which) * heads + head) * self.block_tokens
            + slot)
            * self.head_dim
    }

    /// `count` positions from `pos` (all in one block) of K (`which` = 0)
    /// or V (1) of K/V head `head`: rows `head_dim` apart.
    fn rows(&self, which: usize, pos: usize, count: usize, head: usize) -> Rows<'_> {
        assert!(count > 0 && pos % self.block_tokens + count <= self.block_tokens);
        assert!((head + 1) * self.head_dim <= self.kv_dim);
        let o = self.offset(which, pos, head);
        let r = o..o + count * self.head_dim;
        match self.data {
            KvData::F32(d) => Rows::F32(&d[r]),
            KvData::F16(d) => Rows::F16(&d[r]),
        }
    }

    /// A copy of K (`which` = 0) or V (1) of `pos`, every head, as f32
    /// (for tests and tools; the kernels read the cache in place).
    fn row_f32(&self, which: usize, pos: usize) -> Vec<f32> {
        let heads = self.kv_dim / self.head_dim.max(1);
        let mut row = Vec::with_capacity(self.kv_dim);
        for h in 0..heads {
            let o = self.offset(which, pos, h);
            match self.data {
                KvData::F32(d) => row.extend_from_slice(&d[o..o + self.head_dim]),
                KvData::F16(d) => row.extend(d[o..o + self.head_dim].iter().map(|v| v.to_f32())),
            }
        }
        row
    }

    /// K of `pos`, as f32.
    pub fn k(&self, pos: usize) -> Vec<f32> {
        self.row_f32(0, pos)
    }

    /// V of `pos`, as f32.
    pub fn v(&self, pos: usize) -> Vec<f32> {
        self.row_f32(1, pos)
    }
}

impl Rows<'_> {
    /// Asks for every cache line of the rows ahead of their use: a head's
    /// run in the next block starts on a new page-distant address, where
    /// the hardware prefetchers would lose their stream.
    fn prefetch(&self) {
        let (p, bytes) = match self {
            Rows::F32(r) => (r.as_ptr() as *const u8, std::mem::size_of_val(*r)),
            Rows::F16(r) => (r.as_ptr() as *const u8, std::mem::size_of_val(*r)),
        };
        for l in (0..bytes).step_by(64) {
            crate::quant::prefetch(p.wrapping_add(l));
        }
    }
}

/// How many runs (one head's keys or values of one block) ahead of the
/// one being worked on the attention kernel asks for: with 16-position
/// blocks, two runs (4 KiB in f16) cover DRAM latency; 1, 2, 3 and 4 were
/// within noise of each other in decode, all ahead of no prefetch.
const RUNS_AHEAD: usize = 2;

/// Head geometry.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    /// Query heads.
    pub n_heads: usize,
    /// K/V heads (grouped-query attention: query head `h` reads K/V head
    /// `h / (n_heads / n_kv_heads)`).
    pub n_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
}

/// `out[h] = softmax(q[h] · K[0..len]ᵀ · scale) · V[0..len]` for every
/// query head. `scores` needs `pool.threads() × len` floats.
///
/// Per head, the cache is walked block by block (positions of a block are
/// contiguous rows): scores eight positions at a time, one vectorised
/// `exp` pass, then the weighted sum of V with the head's output held in
/// registers across all positions.
pub fn attend(
    pool: &ThreadPool,
    kv: &PagedKv<'_>,
    q: &[f32],
    len: usize,
    heads: Heads,
    scale: f32,
    out: &mut [f32],
    scores: &mut [f32],
) {
    let hd = heads.head_dim;
    let group = (heads.n_heads / heads.n_kv_heads.max(1)).max(1);
    assert!(q.len() >= heads.n_heads * hd && out.len() >= heads.n_heads * hd);
    assert!(scores.len() >= pool.threads() * len && len > 0);
    assert!(heads.n_heads.div_ceil(group) * hd <= kv.kv_dim && hd == kv.head_dim);
    assert!(len <= kv.blocks.len() * kv.block_tokens && kv.data.len() > 0);
    let out_ptr = SyncPtr::new(out);
    let sc_ptr = SyncPtr::new(scores);
    pool.run(heads.n_heads, &|h, slot| {
        let kv_head = h / group;
        let mut q16 = [0.0f32; MAX_HALF_HEAD];
        let half = matches!(kv.data, KvData::F16(_)) && hd <= MAX_HALF_HEAD;
        let qh = if half {
            // An f16 cache is read as an f16 attention: the query is
            // rounded like the keys it meets.
            q16[..hd].copy_from_slice(&q[h * hd..(h + 1) * hd]);
            round_to_f16(&mut q16[..hd], 1.0);
            &q16[..hd]
        } else {
            &q[h * hd..(h + 1) * hd]
        };
        // SAFETY: each pool slot owns scores[slot·len..(slot+1)·len] (the
        // assert above sized it) and runs one task at a time.
        let sc = unsafe { std::slice::from_raw_parts_mut(sc_ptr.add(slot * len), len) };
        let bt = kv.block_tokens;
        let nb = len.div_ceil(bt);
        // Block j+1's run is asked for while block j is worked on; the
        // first V run while the last K run is.
        let run = |which: usize, j: usize| kv.rows(which, j * bt, bt.min(len - j * bt), kv_head);
        // The head's runs in the order they are read: K of every block,
        // then V of every block; run i is asked for `ahead` runs early.
        let ahead = RUNS_AHEAD;
        let ask = |i: usize| {
            if i < nb {
                run(0, i).prefetch();
            } else if i < 2 * nb {
                run(1, i - nb).prefetch();
            }
        };
        (0..ahead).for_each(ask);
        for (j, s) in sc.chunks_mut(bt).enumerate() {
            ask(j + ahead);
            scores_block(qh, run(0, j), hd, scale, s);
        }
        let m = sc.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        sc.iter_mut().for_each(|s| *s -= m);
        Activation::Exp.apply_slice(sc);
        let mut inv = 1.0 / sc.iter().sum::<f32>();
        if half {
            // ... and the weights like the values they multiply.
            round_to_f16(sc, inv);
            inv = 1.0;
        }
        // SAFETY: head h writes only out[h·hd..(h+1)·hd] (asserted in
        // bounds above); heads are distinct tasks.
        let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.add(h * hd), hd) };
        o.fill(0.0);
        for (j, p) in sc.chunks(bt).enumerate() {
            ask(nb + j + ahead);
            weighted_sum_block(p, run(1, j), hd, o);
        }
        o.iter_mut().for_each(|v| *v *= inv);
    });
}

/// `x = f16(x · scale)` (round to nearest even), F16C where present.
fn round_to_f16(x: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    let done = if crate::isa::active().has_avx2() {
        // SAFETY: AVX2/F16C present (the active tier).
        unsafe { round_to_f16_avx2(x, scale) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for v in &mut x[done..] {
        *v = f16::from_f32(*v * scale).to_f32();
    }
}

/// [`round_to_f16`] eight at a time; returns how many values it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn round_to_f16_avx2(x: &mut [f32], scale: f32) -> usize {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 8 <= x.len() {
        // SAFETY: i + 8 ≤ len.
        unsafe {
            let p = x.as_mut_ptr().add(i);
            let v = _mm256_mul_ps(_mm256_loadu_ps(p), _mm256_set1_ps(scale));
            let h = _mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(v);
            _mm256_storeu_ps(p, _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    i
}

/// Widest head whose query an f16 cache rounds to f16 (wider heads keep
/// an f32 query).
const MAX_HALF_HEAD: usize = 256;

/// `s[i] = q · row i · scale` for each `i`.
fn scores_block(q: &[f32], rows: Rows<'_>, stride: usize, scale: f32, s: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::active().has_avx2() && q.len().is_multiple_of(8) {
        // SAFETY: AVX2/FMA/F16C present; `rows` holds s.len() rows of
        // q.len() values at `stride` (PagedKv::rows sized it; re-checked
        // inside).
        unsafe {
            match rows {
                Rows::F32(r) => scores_block_avx2(q, r, stride, scale, s),
                Rows::F16(r) => scores_block_avx2(q, r, stride, scale, s),
            }
        }
        return;
    }
    let hd = q.len();
    for (i, v) in s.iter_mut().enumerate() {
        let r = i * stride..i * stride + hd;
        *v = match rows {
            Rows::F32(d) => dot_f32(q, &d[r]),
            Rows::F16(d) => q.iter().zip(&d[r]).map(|(a, b)| a * b.to_f32()).sum(),
        } * scale;
    }
}

/// `o += Σ p[i] · row i`.
fn weighted_sum_block(p: &[f32], rows: Rows<'_>, stride: usize, o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::active().has_avx2() && o.len().is_multiple_of(8) {
        // SAFETY: as in scores_block.
        unsafe {
            match rows {
                Rows::F32(r) => weighted_sum_avx2(p, r, stride, o),
                Rows::F16(r) => weighted_sum_avx2(p, r, stride, o),
            }
        }
        return;
    }
    let hd = o.len();
    for (i, &w) in p.iter().enumerate() {
        let r = i * stride..i * stride + hd;
        match rows {
            Rows::F32(d) => axpy(w, &d[r], o),
            Rows::F16(d) => o
                .iter_mut()
                .zip(&d[r])
                .for_each(|(y, x)| *y += w * x.to_f32()),
        }
    }
}

/// A storage type the vector kernels read eight at a time as f32.
#[cfg(target_arch = "x86_64")]
trait Lanes: Copy {
    const HALF: bool;
}

#[cfg(target_arch = "x86_64")]
impl Lanes for f32 {
    const HALF: bool = false;
}

#[cfg(target_arch = "x86_64")]
impl Lanes for f16 {
    const HALF: bool = true;
}

/// Eight values from `p` as f32.
///
/// # Safety
/// AVX2/F16C available; eight values readable at `p`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8<T: Lanes>(p: *const T) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees eight readable values.
    unsafe {
        if T::HALF {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        } else {
            _mm256_loadu_ps(p as *const f32)
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_block_avx2<T: Lanes>(
    q: &[f32],
    rows: &[T],
    stride: usize,
    scale: f32,
    s: &mut [f32],
) {
    use std::arch::x86_64::*;
    let hd = q.len();
    let n = s.len();
    assert!(hd.is_multiple_of(8) && (n == 0 || rows.len() >= (n - 1) * stride + hd));
    let vs = _mm256_set1_ps(scale);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: rows i..i+8 are in bounds (asserted); q has hd values.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut d = 0;
            while d < hd {
                let qv = _mm256_loadu_ps(q.as_ptr().add(d));
                for (r, a) in acc.iter_mut().enumerate() {
                    let k = load8(rows.as_ptr().add((i + r) * stride + d));
                    *a = _mm256_fmadd_ps(qv, k, *a);
                }
                d += 8;
            }
            // Eight horizontal sums at once: lane r of the result is Σ acc[r].
            let t0 = _mm256_hadd_ps(acc[0], acc[1]);
            let t1 = _mm256_hadd_ps(acc[2], acc[3]);
            let t2 = _mm256_hadd_ps(acc[4], acc[5]);
            let t3 = _mm256_hadd_ps(acc[6], acc[7]);
            let u0 = _mm256_hadd_ps(t0, t1);
            let u1 = _mm256_hadd_ps(t2, t3);
            let lo = _mm256_permute2f128_ps::<0x20>(u0, u1);
            let hi = _mm256_permute2f128_ps::<0x31>(u0, u1);
            let sum = _mm256_mul_ps(_mm256_add_ps(lo, hi), vs);
            _mm256_storeu_ps(s.as_mut_ptr().add(i), sum);
        }
        i += 8;
    }
    while i < n {
        // SAFETY: row i is in bounds (asserted).
        unsafe {
            let mut acc = _mm256_setzero_ps();
            let mut d = 0;
            while d < hd {
                let k = load8(rows.as_ptr().add(i * stride + d));
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(d)), k, acc);
                d += 8;
            }
            s[i] = crate::quant::hsum(acc) * scale;
        }
        i += 1;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum_avx2<T: Lanes>(p: &[f32], rows: &[T], stride: usize, o: &mut [f32]) {
    let hd = o.len();
    let n = p.len();
    assert!(hd.is_multiple_of(8) && (n == 0 || rows.len() >= (n - 1) * stride + hd));
    // The output in chunks of up to 64 values (8 registers) kept across
    // every position.
    let mut d = 0;
    while d < hd {
        let w = (hd - d).min(64);
        // SAFETY: rows have hd values from d (asserted), o has hd values.
        unsafe {
            match w / 8 {
                8 => wsum_chunk::<T, 8>(p, rows, stride, d, o),
                7 => wsum_chunk::<T, 7>(p, rows, stride, d, o),
                6 => wsum_chunk::<T, 6>(p, rows, stride, d, o),
                5 => wsum_chunk::<T, 5>(p, rows, stride, d, o),
                4 => wsum_chunk::<T, 4>(p, rows, stride, d, o),
                3 => wsum_chunk::<T, 3>(p, rows, stride, d, o),
                2 => wsum_chunk::<T, 2>(p, rows, stride, d, o),
                _ => wsum_chunk::<T, 1>(p, rows, stride, d, o),
            }
        }
        d += w;
    }
}

/// # Safety
/// AVX2/FMA/F16C available; `o[d..d + 8W]` and, for each `i < p.len()`,
/// `rows[i·stride + d..][..8W]` in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn wsum_chunk<T: Lanes, const W: usize>(
    p: &[f32],
    rows: &[T],
    stride: usize,
    d: usize,
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees the bounds.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); W];
        for (v, a) in acc.iter_mut().enumerate() {
            *a = _mm256_loadu_ps(o.as_ptr().add(d + 8 * v));
        }
        for (i, &w) in p.iter().enumerate() {
            let b = _mm256_set1_ps(w);
            let r = rows.as_ptr().add(i * stride + d);
            for (v, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(b, load8(r.add(8 * v)), *a);
            }
        }
        for (v, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(o.as_mut_ptr().add(d + 8 * v), *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every head against a float64 softmax(q·Kᵀ·scale)·V.
    fn check(kv_dim: usize, bt: usize, heads: Heads, blocks: &[u32], len: usize) {
        let layers = 2;
        let nblocks = blocks.iter().max().map_or(0, |&b| b as usize + 1);
        let data: Vec<f32> = (0..nblocks * layers * 2 * bt * kv_dim)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let half: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
        check_data(KvData::F32(&data), kv_dim, bt, heads, blocks, len);
        check_data(KvData::F16(&half), kv_dim, bt, heads, blocks, len);
    }

    /// The reference reads the same stored values (f16 ones widened); with
    /// an f16 cache it rounds the query and the weights to f16 too (a
    /// little slack: a weight computed in f32 could round the other way).
    fn check_data(
        data: KvData<'_>,
        kv_dim: usize,
        bt: usize,
        heads: Heads,
        blocks: &[u32],
        len: usize,
    ) {
        let layers = 2;
        let kv = PagedKv {
            data,
            blocks,
            block_tokens: bt,
            layers,
            layer: 1,
            kv_dim,
            head_dim: heads.head_dim,
        };
        let (hd, nh) = (heads.head_dim, heads.n_heads);
        let group = nh / heads.n_kv_heads;
        let half = matches!(data, KvData::F16(_));
        let r16 = |v: f64| if half { f16::from_f64(v).to_f64() } else { v };
        let tol = if half { 1e-4 } else { 1e-5 };
        let q: Vec<f32> = (0..nh * hd)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0)
            .collect();
        for threads in [1, 3] {
            let pool = ThreadPool::new(threads);
            let mut out = vec![0.0; nh * hd];
            let mut scores = vec![0.0; threads * len];
            attend(&pool, &kv, &q, len, heads, 0.5, &mut out, &mut scores);
            for h in 0..nh {
                let kh = h / group;
                let s: Vec<f64> = (0..len)
                    .map(|j| {
                        (0..hd)
                            .map(|d| r16(q[h * hd + d] as f64) * kv.k(j)[kh * hd + d] as f64)
                            .sum::<f64>()
                            * 0.5
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    let want: f64 = (0..len)
                        .map(|j| r16(e[j] / z) * kv.v(j)[kh * hd + d] as f64)
                        .sum();
                    let got = out[h * hd + d] as f64;
                    assert!((got - want).abs() < tol, "h {h} d {d}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn matches_a_dense_reference() {
        let heads = |n_heads, n_kv_heads, head_dim| Heads {
            n_heads,
            n_kv_heads,
            head_dim,
        };
        // Narrow heads (portable path), blocks out of order.
        check(8, 4, heads(4, 2, 4), &[2, 0, 1], 10);
        // Head widths the vector kernels take: full and partial 64-wide
        // chunks, eight-position groups plus a tail, a part-filled block.
        check(192, 16, heads(9, 3, 64), &[3, 1, 0, 2], 53);
        check(160, 16, heads(4, 2, 80), &[1, 0], 19);
        check(96, 8, heads(2, 1, 96), &[0], 7);
        check(256, 32, heads(2, 2, 128), &[1, 0], 64);
    }
}
