//! Causal attention of one query row over a paged KV cache, spread over
//! the pool by K/V head and by chunk of positions.
//!
//! Cache layout (owned by the LLM runtime): blocks of `block_tokens`
//! positions; block `b` holds, for each layer, K then V, and inside each
//! one *run* per K/V head: `block_tokens × head_dim` values, contiguous, so
//! the hardware prefetchers stream a head's run instead of picking a slice
//! out of every row. Keys are stored transposed in their run (`[dim][slot]`)
//! so that scores come out of the FMAs sixteen (or eight) positions at a
//! time with no horizontal sums; values row by row (`[slot][dim]`). Values
//! are f32 or f16 (half the memory and half the bytes read per decoded
//! token; llama.cpp's default). A sequence's block table lists its blocks
//! in position order.
//!
//! The query heads that share a K/V head (grouped-query attention) are
//! worked together, so each key and value is read and widened once for the
//! whole group. Work is split into tasks of one K/V head × one chunk of
//! positions, in two passes over the pool: scores, then each chunk's
//! softmax numerator with its own maximum and sum; then the weights,
//! normalised with every chunk's maximum and sum, times the values into a
//! partial output per chunk, which the calling thread adds up in chunk
//! order. The chunks depend on the length only, never on the thread count,
//! so results are the same whatever the pool size.

use crate::activation::Activation;
use crate::pool::{SyncPtr, ThreadPool};
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

/// One head's run of a block (`block_tokens × head_dim` values), in the
/// storage type.
#[derive(Debug, Clone, Copy)]
enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl PagedKv<'_> {
    /// K/V heads.
    fn heads(&self) -> usize {
        self.kv_dim / self.head_dim.max(1)
    }

    /// Index in `data` of the run of K (`which` = 0) or V (1) of K/V head
    /// `head` in the sequence's `j`-th block.
    fn run_start(&self, which: usize, j: usize, head: usize) -> usize {
        let block = self.blocks[j] as usize;
        (((block * self.layers + self.layer) * 2 + which) * self.heads() + head)
            * self.block_tokens
            * self.head_dim
    }

    /// Where K (`which` = 0) or V (1) of `pos` in K/V head `head` lies in
    /// `data`: value `d` at `start + d · step`. With
    /// [`PagedKv::run_start`], the one place the cache layout is written
    /// down (keys transposed in their run, values not).
    pub fn place(&self, which: usize, pos: usize, head: usize) -> (usize, usize) {
        let start = self.run_start(which, pos / self.block_tokens, head);
        let slot = pos % self.block_tokens;
        if which == 0 {
            (start + slot, self.block_tokens)
        } else {
            (start + slot * self.head_dim, 1)
        }
    }

    /// Index in `data` of value `d` of K (`which` = 0) or V (1) of `pos` in
    /// K/V head `head`.
    pub fn index(&self, which: usize, pos: usize, head: usize, d: usize) -> usize {
        let (start, step) = self.place(which, pos, head);
        start + d * step
    }

    /// The run of K (`which` = 0) or V (1) of K/V head `head` in the
    /// sequence's `j`-th block, all `block_tokens` slots.
    fn run(&self, which: usize, j: usize, head: usize) -> Rows<'_> {
        assert!(head < self.heads());
        let o = self.run_start(which, j, head);
        let r = o..o + self.block_tokens * self.head_dim;
        match self.data {
            KvData::F32(d) => Rows::F32(&d[r]),
            KvData::F16(d) => Rows::F16(&d[r]),
        }
    }

    /// A copy of K (`which` = 0) or V (1) of `pos`, every head, as f32
    /// (for tests and tools; the kernels read the cache in place).
    fn row_f32(&self, which: usize, pos: usize) -> Vec<f32> {
        let mut row = Vec::with_capacity(self.kv_dim);
        for h in 0..self.heads() {
            for d in 0..self.head_dim {
                let i = self.index(which, pos, h, d);
                row.push(match self.data {
                    KvData::F32(v) => v[i],
                    KvData::F16(v) => v[i].to_f32(),
                });
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
    /// Asks for every cache line of the run ahead of its use: the next
    /// block's run starts far away, where the hardware prefetchers would
    /// lose their stream.
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

/// How many runs ahead of the one being worked on a task asks for: with
/// 16-position blocks, two runs (4 KiB in f16) cover DRAM latency; 1, 2, 3
/// and 4 were within noise of each other in decode, all ahead of none.
const RUNS_AHEAD: usize = 2;

/// Positions per chunk (a task's share of one K/V head), rounded to whole
/// blocks: long enough that a task outweighs its dispatch, short enough
/// that a 500-position context makes a dozen tasks for two threads.
const CHUNK_POSITIONS: usize = 128;

/// Query heads one kernel call works at once (a group of more is worked
/// in parts, each reading the run again, from L1).
const MAX_NH: usize = 4;

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

/// How [`attend`] cuts `len` positions of `block_tokens`-position blocks.
#[derive(Debug, Clone, Copy)]
struct Chunks {
    /// Blocks per chunk.
    blocks: usize,
    /// Chunks.
    count: usize,
    /// Positions per chunk (a whole number of blocks).
    span: usize,
}

impl Chunks {
    fn new(block_tokens: usize, len: usize) -> Chunks {
        let bt = block_tokens.max(1);
        let blocks = (CHUNK_POSITIONS / bt).max(1);
        Chunks {
            blocks,
            count: len.div_ceil(bt).div_ceil(blocks),
            span: blocks * bt,
        }
    }
}

/// Floats of scratch [`attend`] needs for up to `max_len` positions.
pub fn scratch_floats(heads: Heads, block_tokens: usize, max_len: usize) -> usize {
    let ch = Chunks::new(block_tokens, max_len);
    let nh = heads.n_heads;
    nh * heads.head_dim + ch.count * nh * (ch.span + 2 + heads.head_dim)
}

/// `out[h] = softmax(q[h] · K[0..len]ᵀ · scale) · V[0..len]` for every
/// query head; `scratch` holds [`scratch_floats`] floats.
///
/// With an f16 cache the attention is an f16 one, as llama.cpp computes
/// it: the query is rounded like the keys it meets, and the normalised
/// weights like the values they multiply.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    pool: &ThreadPool,
    kv: &PagedKv<'_>,
    q: &[f32],
    len: usize,
    heads: Heads,
    scale: f32,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    let (hd, nh) = (heads.head_dim, heads.n_heads);
    let group = (nh / heads.n_kv_heads.max(1)).max(1);
    let n_kv = nh.div_ceil(group);
    let bt = kv.block_tokens;
    assert!(q.len() >= nh * hd && out.len() >= nh * hd);
    assert!(len > 0 && len <= kv.blocks.len() * bt && kv.data.len() > 0);
    assert!(n_kv <= kv.heads() && hd == kv.head_dim && hd > 0);
    assert!(
        scratch.len() >= scratch_floats(heads, bt, len),
        "attention scratch of {} floats, {} needed",
        scratch.len(),
        scratch_floats(heads, bt, len)
    );
    let ch = Chunks::new(bt, len);
    let nb = len.div_ceil(bt);
    let cp = ch.span;
    let half = matches!(kv.data, KvData::F16(_));
    let (qr, rest) = scratch.split_at_mut(nh * hd);
    let (sc, rest) = rest.split_at_mut(ch.count * nh * cp);
    let (stats, rest) = rest.split_at_mut(ch.count * nh * 2);
    let partial = &mut rest[..ch.count * nh * hd];
    qr.copy_from_slice(&q[..nh * hd]);
    if half {
        round_to_f16(qr, 1.0);
    }
    let qr = &*qr;
    // Task t: K/V head t / chunks, chunk t % chunks; its query heads and
    // blocks.
    let task = |t: usize| {
        let (kvh, c) = (t / ch.count, t % ch.count);
        let h0 = kvh * group;
        let b0 = c * ch.blocks;
        (
            kvh,
            c,
            h0,
            (h0 + group).min(nh),
            b0,
            (b0 + ch.blocks).min(nb),
        )
    };
    let sc_ptr = SyncPtr::new(sc);
    let st_ptr = SyncPtr::new(stats);
    let pa_ptr = SyncPtr::new(partial);
    // Pass 1: scores, then exp(s - chunk max) and the chunk's sum.
    pool.run(n_kv * ch.count, &|t, _| {
        let (kvh, c, h0, h1, b0, b1) = task(t);
        let n = h1 - h0;
        // SAFETY: task (kvh, c) alone touches the scores of chunk c, heads
        // h0..h1 ([c][h][cp] layout, so one range) and their statistics;
        // distinct tasks have disjoint ranges, inside the slices (sized by
        // scratch_floats, asserted above).
        let (s, st) = unsafe {
            (
                std::slice::from_raw_parts_mut(sc_ptr.add((c * nh + h0) * cp), n * cp),
                std::slice::from_raw_parts_mut(st_ptr.add((c * nh + h0) * 2), n * 2),
            )
        };
        (b0..(b0 + RUNS_AHEAD).min(b1)).for_each(|b| kv.run(0, b, kvh).prefetch());
        for b in b0..b1 {
            if b + RUNS_AHEAD < b1 {
                kv.run(0, b + RUNS_AHEAD, kvh).prefetch();
            }
            let k = kv.run(0, b, kvh);
            let cnt = bt.min(len - b * bt);
            for i in (0..n).step_by(MAX_NH) {
                let m = (n - i).min(MAX_NH);
                let q = &qr[(h0 + i) * hd..(h0 + i + m) * hd];
                scores_run(
                    q,
                    m,
                    k,
                    bt,
                    cnt,
                    scale,
                    &mut s[i * cp + (b - b0) * bt..],
                    cp,
                );
            }
        }
        let used = (b1 * bt).min(len) - b0 * bt;
        for i in 0..n {
            let e = &mut s[i * cp..i * cp + used];
            let m = max(e);
            e.iter_mut().for_each(|x| *x -= m);
            Activation::Exp.apply_slice(e);
            st[2 * i] = m;
            st[2 * i + 1] = sum(e);
        }
    });
    // Pass 2: weights over every chunk's statistics, times the values.
    let stats = after_pass(st_ptr, ch.count * nh * 2);
    pool.run(n_kv * ch.count, &|t, _| {
        let (kvh, c, h0, h1, b0, b1) = task(t);
        let n = h1 - h0;
        // SAFETY: as in pass 1 for the scores; the partial output of chunk
        // c, heads h0..h1 is one range of the [c][h][hd] layout, this
        // task's alone.
        let (s, p) = unsafe {
            (
                std::slice::from_raw_parts_mut(sc_ptr.add((c * nh + h0) * cp), n * cp),
                std::slice::from_raw_parts_mut(pa_ptr.add((c * nh + h0) * hd), n * hd),
            )
        };
        (b0..(b0 + RUNS_AHEAD).min(b1)).for_each(|b| kv.run(1, b, kvh).prefetch());
        let used = (b1 * bt).min(len) - b0 * bt;
        for i in 0..n {
            let h = h0 + i;
            let stat = |c: usize| (stats[(c * nh + h) * 2], stats[(c * nh + h) * 2 + 1]);
            let top = (0..ch.count).fold(f32::NEG_INFINITY, |a, c| a.max(stat(c).0));
            let total: f32 = (0..ch.count)
                .map(|c| stat(c).1 * (stat(c).0 - top).exp())
                .sum();
            let f = (stat(c).0 - top).exp() / total;
            let w = &mut s[i * cp..i * cp + used];
            if half {
                round_to_f16(w, f);
            } else {
                w.iter_mut().for_each(|x| *x *= f);
            }
        }
        p.fill(0.0);
        for b in b0..b1 {
            if b + RUNS_AHEAD < b1 {
                kv.run(1, b + RUNS_AHEAD, kvh).prefetch();
            }
            let v = kv.run(1, b, kvh);
            let cnt = bt.min(len - b * bt);
            for i in (0..n).step_by(MAX_NH) {
                let m = (n - i).min(MAX_NH);
                let w = &s[i * cp + (b - b0) * bt..];
                wsum_run(w, cp, m, v, hd, cnt, &mut p[i * hd..(i + m) * hd]);
            }
        }
    });
    let partial = after_pass(pa_ptr, ch.count * nh * hd);
    let out = &mut out[..nh * hd];
    out.copy_from_slice(&partial[..nh * hd]);
    for c in 1..ch.count {
        let pc = &partial[c * nh * hd..(c + 1) * nh * hd];
        out.iter_mut().zip(pc).for_each(|(o, x)| *o += x);
    }
}

/// The first `n` floats behind `p` again as a shared slice, once the pool
/// pass that wrote them through it has returned.
fn after_pass<'a>(p: SyncPtr<f32>, n: usize) -> &'a [f32] {
    // SAFETY: `p` came from a live `&mut [f32]` of at least `n` floats in
    // `attend`, which outlives every use, and no task writes through it
    // any more (the pool pass returned).
    unsafe { std::slice::from_raw_parts(p.0, n) }
}

/// Largest value, eight lanes at a time (vectorises).
fn max(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, &v) in m.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    let tail = it
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    m.iter().fold(tail, |a, &v| a.max(v))
}

/// Sum, eight lanes at a time (vectorises).
fn sum(x: &[f32]) -> f32 {
    let mut s = [0.0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, &v) in s.iter_mut().zip(c) {
            *a += v;
        }
    }
    let tail: f32 = it.remainder().iter().sum();
    s.iter().sum::<f32>() + tail
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

/// Scores of `nh` query heads (`q`: `nh × hd`) against slots `0..cnt` of
/// a key run (`k`: `hd × bt`, transposed): `out[i·stride + slot] =
/// q_i · k_slot · scale`.
#[allow(clippy::too_many_arguments)]
fn scores_run(
    q: &[f32],
    nh: usize,
    k: Rows<'_>,
    bt: usize,
    cnt: usize,
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    let hd = q.len() / nh;
    assert!(nh > 0 && nh <= MAX_NH && q.len() == nh * hd && cnt <= bt);
    assert!(out.len() >= (nh - 1) * stride + cnt);
    #[cfg(target_arch = "x86_64")]
    {
        let isa = crate::isa::active();
        macro_rules! go {
            ($f:ident, $t:ty, $r:expr) => {
                // SAFETY: the tier has the features; the run holds hd × bt
                // values and bt is a whole number of vectors (checked by
                // the caller's match); `out` bounds asserted above.
                unsafe {
                    match nh {
                        1 => $f::<$t, 1>(q, $r, bt, cnt, scale, out, stride),
                        2 => $f::<$t, 2>(q, $r, bt, cnt, scale, out, stride),
                        3 => $f::<$t, 3>(q, $r, bt, cnt, scale, out, stride),
                        _ => $f::<$t, 4>(q, $r, bt, cnt, scale, out, stride),
                    }
                }
            };
        }
        if isa.has_avx512() && bt.is_multiple_of(16) {
            match k {
                Rows::F32(r) => go!(scores_run_avx512, f32, r),
                Rows::F16(r) => go!(scores_run_avx512, f16, r),
            }
            return;
        }
        if isa.has_avx2() && bt.is_multiple_of(8) {
            // Sixteen ymm registers: four heads' four accumulator sets
            // would spill, so four heads go as two pairs.
            if nh == 4 {
                let hd = q.len() / 4;
                let (q0, q1) = q.split_at(2 * hd);
                let (o0, o1) = out.split_at_mut(2 * stride);
                scores_run(q0, 2, k, bt, cnt, scale, o0, stride);
                scores_run(q1, 2, k, bt, cnt, scale, o1, stride);
                return;
            }
            match k {
                Rows::F32(r) => go!(scores_run_avx2, f32, r),
                Rows::F16(r) => go!(scores_run_avx2, f16, r),
            }
            return;
        }
    }
    for i in 0..nh {
        let o = &mut out[i * stride..i * stride + cnt];
        o.fill(0.0);
        for d in 0..hd {
            let qd = q[i * hd + d];
            let col = d * bt..d * bt + cnt;
            match k {
                Rows::F32(r) => o.iter_mut().zip(&r[col]).for_each(|(a, &x)| *a += qd * x),
                Rows::F16(r) => o
                    .iter_mut()
                    .zip(&r[col])
                    .for_each(|(a, x)| *a += qd * x.to_f32()),
            }
        }
        o.iter_mut().for_each(|a| *a *= scale);
    }
}

/// `acc[i·hd + d] += Σ_{slot < cnt} w[i·stride + slot] · v[slot·hd + d]`
/// for `nh` heads over a value run (`v`: `bt × hd`, row by row).
fn wsum_run(
    w: &[f32],
    stride: usize,
    nh: usize,
    v: Rows<'_>,
    hd: usize,
    cnt: usize,
    acc: &mut [f32],
) {
    assert!(nh > 0 && nh <= MAX_NH && acc.len() == nh * hd);
    assert!(w.len() >= (nh - 1) * stride + cnt);
    let len = match v {
        Rows::F32(r) => r.len(),
        Rows::F16(r) => r.len(),
    };
    assert!(cnt * hd <= len);
    #[cfg(target_arch = "x86_64")]
    {
        let isa = crate::isa::active();
        macro_rules! go {
            ($f:ident, $t:ty, $r:expr) => {
                // SAFETY: the tier has the features; cnt rows of hd values
                // (asserted), hd a whole number of chunks (the match).
                unsafe {
                    match nh {
                        1 => $f::<$t, 1>(w, stride, $r, hd, cnt, acc),
                        2 => $f::<$t, 2>(w, stride, $r, hd, cnt, acc),
                        3 => $f::<$t, 3>(w, stride, $r, hd, cnt, acc),
                        _ => $f::<$t, 4>(w, stride, $r, hd, cnt, acc),
                    }
                }
            };
        }
        if isa.has_avx512() && hd.is_multiple_of(64) {
            match v {
                Rows::F32(r) => go!(wsum_run_avx512, f32, r),
                Rows::F16(r) => go!(wsum_run_avx512, f16, r),
            }
            return;
        }
        if isa.has_avx2() && hd.is_multiple_of(16) {
            match v {
                Rows::F32(r) => go!(wsum_run_avx2, f32, r),
                Rows::F16(r) => go!(wsum_run_avx2, f16, r),
            }
            return;
        }
    }
    for slot in 0..cnt {
        let row = slot * hd..(slot + 1) * hd;
        for i in 0..nh {
            let wi = w[i * stride + slot];
            let a = &mut acc[i * hd..(i + 1) * hd];
            match v {
                Rows::F32(r) => a
                    .iter_mut()
                    .zip(&r[row.clone()])
                    .for_each(|(a, &x)| *a += wi * x),
                Rows::F16(r) => a
                    .iter_mut()
                    .zip(&r[row.clone()])
                    .for_each(|(a, x)| *a += wi * x.to_f32()),
            }
        }
    }
}

/// A storage type the vector kernels read as f32.
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

/// Sixteen values from `p` as f32.
///
/// # Safety
/// AVX-512F available; sixteen values readable at `p`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn load16<T: Lanes>(p: *const T) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees sixteen readable values.
    unsafe {
        if T::HALF {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        } else {
            _mm512_loadu_ps(p as *const f32)
        }
    }
}

/// [`scores_run`] sixteen slots per vector: per dimension one key vector,
/// widened once, meets each head's query value (broadcast); four
/// accumulator sets over the dimensions keep the FMA pipes full.
///
/// # Safety
/// AVX-512F present; `k` holds `hd × bt` values, `bt` a multiple of 16;
/// `out` holds `(NH - 1)·stride + cnt` values; `q` holds `NH × hd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn scores_run_avx512<T: Lanes, const NH: usize>(
    q: &[f32],
    k: &[T],
    bt: usize,
    cnt: usize,
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    use std::arch::x86_64::*;
    let hd = q.len() / NH;
    assert!(k.len() >= hd * bt && bt.is_multiple_of(16));
    let mut g = 0;
    while g < cnt {
        // SAFETY: rows d·bt + g .. + 16 lie inside the run (g < cnt ≤ bt,
        // bt a multiple of 16); q has NH × hd values.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NH]; 4];
            let mut d = 0;
            while d + 4 <= hd {
                for (u, a) in acc.iter_mut().enumerate() {
                    let kv = load16(k.as_ptr().add((d + u) * bt + g));
                    for (i, ai) in a.iter_mut().enumerate() {
                        let qv = _mm512_set1_ps(*q.get_unchecked(i * hd + d + u));
                        *ai = _mm512_fmadd_ps(kv, qv, *ai);
                    }
                }
                d += 4;
            }
            while d < hd {
                let kv = load16(k.as_ptr().add(d * bt + g));
                for (i, ai) in acc[0].iter_mut().enumerate() {
                    let qv = _mm512_set1_ps(*q.get_unchecked(i * hd + d));
                    *ai = _mm512_fmadd_ps(kv, qv, *ai);
                }
                d += 1;
            }
            let take = (cnt - g).min(16);
            let mut lanes = [0.0f32; 16];
            for i in 0..NH {
                let s = _mm512_add_ps(
                    _mm512_add_ps(acc[0][i], acc[1][i]),
                    _mm512_add_ps(acc[2][i], acc[3][i]),
                );
                _mm512_storeu_ps(lanes.as_mut_ptr(), _mm512_mul_ps(s, _mm512_set1_ps(scale)));
                out[i * stride + g..i * stride + g + take].copy_from_slice(&lanes[..take]);
            }
        }
        g += 16;
    }
}

/// [`scores_run`] eight slots per vector, with the AVX-512 form's four
/// accumulator sets and their order of sums, so both give the same bits.
///
/// # Safety
/// AVX2/FMA/F16C present; `k` holds `hd × bt` values, `bt` a multiple of
/// 8; `out` holds `(NH - 1)·stride + cnt` values; `q` holds `NH × hd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_run_avx2<T: Lanes, const NH: usize>(
    q: &[f32],
    k: &[T],
    bt: usize,
    cnt: usize,
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    use std::arch::x86_64::*;
    let hd = q.len() / NH;
    assert!(k.len() >= hd * bt && bt.is_multiple_of(8));
    let mut g = 0;
    while g < cnt {
        // SAFETY: as in scores_run_avx512, eight slots at a time.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); NH]; 4];
            let mut d = 0;
            while d + 4 <= hd {
                for (u, a) in acc.iter_mut().enumerate() {
                    let kv = load8(k.as_ptr().add((d + u) * bt + g));
                    for (i, ai) in a.iter_mut().enumerate() {
                        let qv = _mm256_broadcast_ss(q.get_unchecked(i * hd + d + u));
                        *ai = _mm256_fmadd_ps(kv, qv, *ai);
                    }
                }
                d += 4;
            }
            while d < hd {
                let kv = load8(k.as_ptr().add(d * bt + g));
                for (i, ai) in acc[0].iter_mut().enumerate() {
                    let qv = _mm256_broadcast_ss(q.get_unchecked(i * hd + d));
                    *ai = _mm256_fmadd_ps(kv, qv, *ai);
                }
                d += 1;
            }
            let take = (cnt - g).min(8);
            let mut lanes = [0.0f32; 8];
            for i in 0..NH {
                let s = _mm256_add_ps(
                    _mm256_add_ps(acc[0][i], acc[1][i]),
                    _mm256_add_ps(acc[2][i], acc[3][i]),
                );
                _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_mul_ps(s, _mm256_set1_ps(scale)));
                out[i * stride + g..i * stride + g + take].copy_from_slice(&lanes[..take]);
            }
        }
        g += 8;
    }
}

/// [`wsum_run`] over 64-value slices of the head: NH × 4 accumulators held
/// across the run's slots; each value vector widened once for every head.
///
/// # Safety
/// AVX-512F present; `v` holds `cnt × hd` values, `hd` a multiple of 64;
/// `w` holds `(NH - 1)·stride + cnt`; `acc` holds `NH × hd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn wsum_run_avx512<T: Lanes, const NH: usize>(
    w: &[f32],
    stride: usize,
    v: &[T],
    hd: usize,
    cnt: usize,
    acc: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut d = 0;
    while d < hd {
        // SAFETY: d + 64 ≤ hd; slot rows in bounds; weights in bounds.
        unsafe {
            let mut a = [[_mm512_setzero_ps(); 4]; NH];
            for (i, ai) in a.iter_mut().enumerate() {
                for (u, x) in ai.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(acc.as_ptr().add(i * hd + d + 16 * u));
                }
            }
            for slot in 0..cnt {
                let r = v.as_ptr().add(slot * hd + d);
                let x = [
                    load16(r),
                    load16(r.add(16)),
                    load16(r.add(32)),
                    load16(r.add(48)),
                ];
                for (i, ai) in a.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*w.get_unchecked(i * stride + slot));
                    for (u, y) in ai.iter_mut().enumerate() {
                        *y = _mm512_fmadd_ps(b, x[u], *y);
                    }
                }
            }
            for (i, ai) in a.iter().enumerate() {
                for (u, x) in ai.iter().enumerate() {
                    _mm512_storeu_ps(acc.as_mut_ptr().add(i * hd + d + 16 * u), *x);
                }
            }
        }
        d += 64;
    }
}

/// [`wsum_run`] over 16-value slices of the head, NH × 2 accumulators.
///
/// # Safety
/// AVX2/FMA/F16C present; `v` holds `cnt × hd` values, `hd` a multiple of
/// 16; `w` holds `(NH - 1)·stride + cnt`; `acc` holds `NH × hd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn wsum_run_avx2<T: Lanes, const NH: usize>(
    w: &[f32],
    stride: usize,
    v: &[T],
    hd: usize,
    cnt: usize,
    acc: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut d = 0;
    while d < hd {
        // SAFETY: d + 16 ≤ hd; slot rows in bounds; weights in bounds.
        unsafe {
            let mut a = [[_mm256_setzero_ps(); 2]; NH];
            for (i, ai) in a.iter_mut().enumerate() {
                for (u, x) in ai.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(acc.as_ptr().add(i * hd + d + 8 * u));
                }
            }
            for slot in 0..cnt {
                let r = v.as_ptr().add(slot * hd + d);
                let x = [load8(r), load8(r.add(8))];
                for (i, ai) in a.iter_mut().enumerate() {
                    let b = _mm256_broadcast_ss(w.get_unchecked(i * stride + slot));
                    for (u, y) in ai.iter_mut().enumerate() {
                        *y = _mm256_fmadd_ps(b, x[u], *y);
                    }
                }
            }
            for (i, ai) in a.iter().enumerate() {
                for (u, x) in ai.iter().enumerate() {
                    _mm256_storeu_ps(acc.as_mut_ptr().add(i * hd + d + 8 * u), *x);
                }
            }
        }
        d += 16;
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
    /// an f16 cache it rounds the query and the weights to f16 too, and
    /// allows one weight to round the other way (computed in f32, a weight
    /// that falls next to a rounding midpoint can): one f16 step of the
    /// largest weight times the largest value. Outputs are the same bits
    /// at every pool size.
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
        let keys: Vec<Vec<f32>> = (0..len).map(|j| kv.k(j)).collect();
        let values: Vec<Vec<f32>> = (0..len).map(|j| kv.v(j)).collect();
        let mut first: Option<Vec<f32>> = None;
        for threads in [1, 3] {
            let pool = ThreadPool::new(threads);
            let mut out = vec![0.0; nh * hd];
            let mut scratch = vec![f32::NAN; scratch_floats(heads, bt, len)];
            attend(&pool, &kv, &q, len, heads, 0.5, &mut out, &mut scratch);
            for h in 0..nh {
                let kh = h / group;
                let s: Vec<f64> = keys
                    .iter()
                    .map(|k| {
                        (0..hd)
                            .map(|d| r16(q[h * hd + d] as f64) * k[kh * hd + d] as f64)
                            .sum::<f64>()
                            * 0.5
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                let vmax = values
                    .iter()
                    .flatten()
                    .fold(0.0f64, |a, &v| a.max(v.abs() as f64));
                let wmax = e.iter().fold(0.0f64, |a, &x| a.max(x / z));
                let tol = if half {
                    tol + (2.0f64).powi(wmax.log2().floor() as i32 - 10) * vmax
                } else {
                    tol
                };
                for d in 0..hd {
                    let want: f64 = (0..len)
                        .map(|j| r16(e[j] / z) * values[j][kh * hd + d] as f64)
                        .sum();
                    let got = out[h * hd + d] as f64;
                    assert!(
                        (got - want).abs() < tol,
                        "kv_dim {kv_dim} bt {bt} len {len} half {half}: h {h} d {d}: {got} vs {want}"
                    );
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            match &first {
                None => first = Some(out),
                Some(f) => assert_eq!(bits(f), bits(&out), "{threads} threads"),
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
        // Head widths the vector kernels take: one partial slot vector, a
        // part-filled block, eight-slot blocks (AVX2 kernels on an AVX-512
        // CPU), values in 16-wide slices.
        check(192, 16, heads(9, 3, 64), &[3, 1, 0, 2], 53);
        check(160, 16, heads(4, 2, 80), &[1, 0], 19);
        check(96, 8, heads(2, 1, 96), &[0], 7);
        check(256, 32, heads(2, 2, 128), &[1, 0], 64);
        // Several chunks (the second pass's cross-chunk normalisation), the
        // last one short, on SmolLM2's shape and with 32-position blocks.
        let many: Vec<u32> = (0..20).rev().collect();
        check(192, 16, heads(9, 3, 64), &many, 300);
        check(256, 32, heads(4, 2, 128), &many[..10], 290);
        // Groups wider than one kernel call (6 and 8 heads on one K/V
        // head, 16-wide heads) and a portable block size with chunks.
        check(128, 16, heads(12, 2, 64), &many[..9], 140);
        check(16, 16, heads(8, 1, 16), &many[..10], 150);
        check(8, 4, heads(4, 2, 4), &many, 77);
    }

    /// The AVX2 and AVX-512 forms of both kernels give the same bits (same
    /// FMAs, same order of sums), so attention, and the LLM's logits, do
    /// not depend on which tier a CPU runs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_and_avx512_forms_agree_bit_for_bit() {
        if !crate::isa::detect().has_avx512() {
            eprintln!("skipped: no AVX-512 on this CPU (nothing to compare the AVX2 form with)");
            return;
        }
        let val = |i: usize| ((i * 7919 % 1013) as f32 - 506.0) / 317.0;
        let (bt, stride) = (16, 40);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        macro_rules! both {
            ($t:ty, $nh:literal, $hd:expr, $cnt:expr, $conv:expr) => {{
                let (hd, cnt) = ($hd, $cnt);
                let run: Vec<$t> = (0..hd * bt).map(|i| $conv(val(i))).collect();
                let q: Vec<f32> = (0..$nh * hd).map(|i| val(i + 5)).collect();
                let w: Vec<f32> = (0..stride * $nh).map(|i| val(i + 11).abs()).collect();
                let (mut a, mut b) = (vec![0.5f32; stride * $nh], vec![0.5f32; stride * $nh]);
                let (mut c, mut d) = (vec![0.25f32; $nh * hd], vec![0.25f32; $nh * hd]);
                // SAFETY: AVX-512 (so AVX2) present; sizes as the kernels
                // require (run hd × bt, out/weights (NH-1)·stride + cnt,
                // accumulators NH × hd, hd a multiple of 64).
                unsafe {
                    scores_run_avx2::<$t, $nh>(&q, &run, bt, cnt, 0.3, &mut a, stride);
                    scores_run_avx512::<$t, $nh>(&q, &run, bt, cnt, 0.3, &mut b, stride);
                    wsum_run_avx2::<$t, $nh>(&w, stride, &run, hd, cnt, &mut c);
                    wsum_run_avx512::<$t, $nh>(&w, stride, &run, hd, cnt, &mut d);
                }
                assert_eq!(
                    bits(&a),
                    bits(&b),
                    "scores, {} heads, hd {hd}, {cnt} slots",
                    $nh
                );
                assert_eq!(
                    bits(&c),
                    bits(&d),
                    "sums, {} heads, hd {hd}, {cnt} slots",
                    $nh
                );
            }};
        }
        for (hd, cnt) in [(64, 16), (64, 5), (128, 11)] {
            both!(f32, 1, hd, cnt, |x| x);
            both!(f32, 3, hd, cnt, |x| x);
            both!(f16, 2, hd, cnt, f16::from_f32);
            both!(f16, 3, hd, cnt, f16::from_f32);
        }
    }

    /// Every (K or V, position, head, value) of a sequence has its own
    /// place in the pool, and the places fill it.
    #[test]
    fn layout_is_one_to_one() {
        let (bt, layers, kv_dim, hd) = (8, 3, 12, 4);
        let blocks = [2u32, 0, 1];
        let data = vec![0.0f32; blocks.len() * layers * 2 * bt * kv_dim];
        let mut seen = vec![false; data.len()];
        for layer in 0..layers {
            let kv = PagedKv {
                data: KvData::F32(&data),
                blocks: &blocks,
                block_tokens: bt,
                layers,
                layer,
                kv_dim,
                head_dim: hd,
            };
            for which in 0..2 {
                for pos in 0..blocks.len() * bt {
                    for head in 0..kv_dim / hd {
                        for d in 0..hd {
                            let i = kv.index(which, pos, head, d);
                            assert!(!seen[i], "{which} {pos} {head} {d} -> {i} twice");
                            seen[i] = true;
                        }
                    }
                }
            }
        }
        assert!(seen.iter().all(|&s| s));
    }
}
