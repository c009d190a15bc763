//! Causal attention of one query row over a paged KV cache, heads spread
//! over the pool.
//!
//! Cache layout (owned by the LLM runtime): blocks of `block_tokens`
//! positions; block `b` holds, for each layer, K then V, each
//! `[slot][kv_dim]` f32. A sequence's block table lists its blocks in
//! position order.

use crate::pool::{SyncPtr, ThreadPool};
use crate::quant::{axpy, dot_f32};

/// One layer of one sequence's paged K/V.
#[derive(Debug, Clone, Copy)]
pub struct PagedKv<'a> {
    /// The whole pool.
    pub data: &'a [f32],
    /// The sequence's blocks, in position order.
    pub blocks: &'a [u32],
    /// Positions per block.
    pub block_tokens: usize,
    /// Layers per block.
    pub layers: usize,
    /// This layer.
    pub layer: usize,
    /// Width of K (and V) per position.
    pub kv_dim: usize,
}

impl PagedKv<'_> {
    /// Index in `data` of K (`which` = 0) or V (1) of `pos`: the one place
    /// the cache layout is written down.
    pub fn offset(&self, which: usize, pos: usize) -> usize {
        let block = self.blocks[pos / self.block_tokens] as usize;
        let slot = pos % self.block_tokens;
        (((block * self.layers + self.layer) * 2 + which) * self.block_tokens + slot) * self.kv_dim
    }

    fn row(&self, which: usize, pos: usize) -> &[f32] {
        let o = self.offset(which, pos);
        &self.data[o..o + self.kv_dim]
    }

    /// K of `pos`.
    pub fn k(&self, pos: usize) -> &[f32] {
        self.row(0, pos)
    }

    /// V of `pos`.
    pub fn v(&self, pos: usize) -> &[f32] {
        self.row(1, pos)
    }
}

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
    let out_ptr = SyncPtr::new(out);
    let sc_ptr = SyncPtr::new(scores);
    pool.run(heads.n_heads, &|h, slot| {
        let kh = h / group;
        let qh = &q[h * hd..(h + 1) * hd];
        // SAFETY: each pool slot owns scores[slot·len..(slot+1)·len] (the
        // assert above sized it) and runs one task at a time.
        let sc = unsafe { std::slice::from_raw_parts_mut(sc_ptr.add(slot * len), len) };
        let mut m = f32::NEG_INFINITY;
        for (j, s) in sc.iter_mut().enumerate() {
            *s = dot_f32(qh, &kv.k(j)[kh * hd..(kh + 1) * hd]) * scale;
            m = m.max(*s);
        }
        let mut sum = 0.0f32;
        for s in sc.iter_mut() {
            *s = (*s - m).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        // SAFETY: head h writes only out[h·hd..(h+1)·hd] (asserted in
        // bounds above); heads are distinct tasks.
        let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.add(h * hd), hd) };
        o.fill(0.0);
        for (j, &p) in sc.iter().enumerate() {
            axpy(p * inv, &kv.v(j)[kh * hd..(kh + 1) * hd], o);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_dense_reference() {
        let (layers, kv_dim, bt, hd) = (2, 8, 4, 4);
        let heads = Heads {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: hd,
        };
        let blocks = [2u32, 0, 1];
        let nblocks = 3;
        let data: Vec<f32> = (0..nblocks * layers * 2 * bt * kv_dim)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let kv = PagedKv {
            data: &data,
            blocks: &blocks,
            block_tokens: bt,
            layers,
            layer: 1,
            kv_dim,
        };
        let q: Vec<f32> = (0..16).map(|i| (i as f32 - 7.0) / 5.0).collect();
        let len = 10;
        for threads in [1, 3] {
            let pool = ThreadPool::new(threads);
            let mut out = vec![0.0; 16];
            let mut scores = vec![0.0; threads * len];
            attend(&pool, &kv, &q, len, heads, 0.5, &mut out, &mut scores);
            for h in 0..4 {
                let kh = h / 2;
                let s: Vec<f64> = (0..len)
                    .map(|j| {
                        (0..hd)
                            .map(|d| q[h * hd + d] as f64 * kv.k(j)[kh * hd + d] as f64)
                            .sum::<f64>()
                            * 0.5
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    let want: f64 = (0..len)
                        .map(|j| e[j] / z * kv.v(j)[kh * hd + d] as f64)
                        .sum();
                    assert!((out[h * hd + d] as f64 - want).abs() < 1e-5, "h {h} d {d}");
                }
            }
        }
    }
}
