//! Paged KV cache: one preallocated pool of fixed-size blocks, sized from a
//! memory budget in bytes; each sequence owns a block table. Growing a
//! sequence takes blocks from the free list — never an allocation — and a
//! sequence that would exceed the budget gets [`LlmError::KvFull`].
//!
//! Layout of one block: `[layer][K or V][kv_head][run]`, f32 or f16
//! ([`KvPrecision`]), so a block holds `block_tokens` positions of every
//! layer, and one head's keys (or values) of a block are one contiguous
//! run, keys transposed in it (`osprey_kernels::attention` owns the
//! layout).

use super::model::{Config, KV_BLOCK_TOKENS};
use super::LlmError;
use half::{f16, slice::HalfFloatSliceExt};
use osprey_kernels::attention::KvData;

/// How cached K/V values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvPrecision {
    /// Exact: the values the projections computed.
    #[default]
    F32,
    /// Rounded to half precision: half the memory, so twice the tokens in
    /// the same budget and half the bytes attention reads per token
    /// (llama.cpp's default cache type).
    F16,
}

impl KvPrecision {
    /// Bytes per stored value.
    pub fn bytes(self) -> usize {
        match self {
            KvPrecision::F32 => 4,
            KvPrecision::F16 => 2,
        }
    }
}

/// The pool's storage.
#[derive(Debug)]
enum Store {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

/// A set of sequences a forward pass serves, by index (lets callers pass
/// their own storage without building a vector of references).
pub trait SeqSet {
    /// Sequences in the set.
    fn count(&self) -> usize;
    /// Sequence `i`.
    fn seq(&self, i: usize) -> &SeqKv;
    /// Sequence `i`, mutably.
    fn seq_mut(&mut self, i: usize) -> &mut SeqKv;
}

impl SeqSet for [&mut SeqKv] {
    fn count(&self) -> usize {
        self.len()
    }
    fn seq(&self, i: usize) -> &SeqKv {
        self[i]
    }
    fn seq_mut(&mut self, i: usize) -> &mut SeqKv {
        self[i]
    }
}

impl<const N: usize> SeqSet for [&mut SeqKv; N] {
    fn count(&self) -> usize {
        N
    }
    fn seq(&self, i: usize) -> &SeqKv {
        self[i]
    }
    fn seq_mut(&mut self, i: usize) -> &mut SeqKv {
        self[i]
    }
}

/// The block pool.
#[derive(Debug)]
pub struct KvCache {
    layers: usize,
    kv_dim: usize,
    head_dim: usize,
    block_tokens: usize,
    n_blocks: usize,
    budget_bytes: usize,
    data: Store,
    free: Vec<u32>,
}

/// One sequence's block table and length.
#[derive(Debug, Clone)]
pub struct SeqKv {
    blocks: Vec<u32>,
    len: usize,
}

impl SeqKv {
    /// A table holding nothing (no allocation).
    pub const fn empty() -> SeqKv {
        SeqKv {
            blocks: Vec::new(),
            len: 0,
        }
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No positions stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks held.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }
}

impl KvCache {
    /// The pool a model's passes read: its layers and heads, blocks of
    /// [`KV_BLOCK_TOKENS`] (the size the model's attention scratch is
    /// sized for), as many as `budget_bytes` holds (at least one).
    pub fn for_model(
        cfg: &Config,
        budget_bytes: usize,
        precision: KvPrecision,
    ) -> Result<KvCache, LlmError> {
        KvCache::with_precision(
            cfg.n_layers,
            cfg.kv_dim(),
            cfg.head_dim,
            KV_BLOCK_TOKENS,
            budget_bytes,
            precision,
        )
    }

    /// A pool of as many blocks of `precision` as `budget_bytes` holds (at
    /// least one); `kv_dim` is a whole number of heads of `head_dim`.
    pub fn with_precision(
        layers: usize,
        kv_dim: usize,
        head_dim: usize,
        block_tokens: usize,
        budget_bytes: usize,
        precision: KvPrecision,
    ) -> Result<KvCache, LlmError> {
        if head_dim == 0 || !kv_dim.is_multiple_of(head_dim) {
            return Err(LlmError::Request(format!(
                "K/V width {kv_dim} is not a whole number of heads of {head_dim}"
            )));
        }
        let block_tokens = block_tokens.max(1);
        let block_floats = layers * 2 * block_tokens * kv_dim;
        let block_bytes = block_floats * precision.bytes();
        let n_blocks = budget_bytes.checked_div(block_bytes).unwrap_or(0);
        if n_blocks == 0 {
            return Err(LlmError::Request(format!(
                "KV budget of {budget_bytes} bytes is below one block ({block_bytes} bytes: {block_tokens} tokens x {layers} layers x K,V x {kv_dim})"
            )));
        }
        Ok(KvCache {
            layers,
            kv_dim,
            head_dim,
            block_tokens,
            n_blocks,
            budget_bytes,
            data: match precision {
                KvPrecision::F32 => Store::F32(vec![0.0; n_blocks * block_floats]),
                KvPrecision::F16 => Store::F16(vec![f16::ZERO; n_blocks * block_floats]),
            },
            free: (0..n_blocks as u32).rev().collect(),
        })
    }

    /// Tokens per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Blocks in the pool.
    pub fn capacity_blocks(&self) -> usize {
        self.n_blocks
    }

    /// Blocks not held by any sequence.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// How values are stored.
    pub fn precision(&self) -> KvPrecision {
        match self.data {
            Store::F32(_) => KvPrecision::F32,
            Store::F16(_) => KvPrecision::F16,
        }
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.layers * 2 * self.block_tokens * self.kv_dim * self.precision().bytes()
    }

    /// Bytes the pool holds.
    pub fn bytes(&self) -> usize {
        self.n_blocks * self.block_bytes()
    }

    /// A new, empty sequence whose table can grow to `max_tokens` without
    /// allocating.
    pub fn new_seq(&self, max_tokens: usize) -> SeqKv {
        SeqKv {
            blocks: Vec::with_capacity(max_tokens.div_ceil(self.block_tokens).min(self.n_blocks)),
            len: 0,
        }
    }

    /// Makes room for `extra` more positions in `seq` (blocks from the free
    /// list); on failure nothing changes.
    pub fn reserve(&mut self, seq: &mut SeqKv, extra: usize) -> Result<(), LlmError> {
        let need_blocks = (seq.len + extra).div_ceil(self.block_tokens);
        let need = need_blocks.saturating_sub(seq.blocks.len());
        if need > self.free.len() {
            return Err(LlmError::KvFull {
                need,
                free: self.free.len(),
                block_tokens: self.block_tokens,
                budget_bytes: self.budget_bytes,
            });
        }
        for _ in 0..need {
            if let Some(b) = self.free.pop() {
                seq.blocks.push(b);
            }
        }
        Ok(())
    }

    /// Marks `n` reserved positions as written.
    pub fn advance(&mut self, seq: &mut SeqKv, n: usize) {
        seq.len = (seq.len + n).min(seq.blocks.len() * self.block_tokens);
    }

    /// Forgets positions from `len` on (speculative rollback); blocks past
    /// the new end go back to the pool.
    pub fn truncate(&mut self, seq: &mut SeqKv, len: usize) {
        seq.len = seq.len.min(len);
        let keep = seq.len.div_ceil(self.block_tokens);
        while seq.blocks.len() > keep {
            if let Some(b) = seq.blocks.pop() {
                self.free.push(b);
            }
        }
    }

    /// Returns every block of `seq` to the pool.
    pub fn release(&mut self, seq: &mut SeqKv) {
        self.truncate(seq, 0);
    }

    /// `seq`'s K/V of `layer` as the attention kernel reads them.
    pub fn paged<'a>(
        &'a self,
        seq: &'a SeqKv,
        layer: usize,
    ) -> osprey_kernels::attention::PagedKv<'a> {
        osprey_kernels::attention::PagedKv {
            data: match &self.data {
                Store::F32(d) => KvData::F32(d),
                Store::F16(d) => KvData::F16(d),
            },
            blocks: &seq.blocks,
            block_tokens: self.block_tokens,
            layers: self.layers,
            layer,
            kv_dim: self.kv_dim,
            head_dim: self.head_dim,
        }
    }

    /// Writes K and V of `pos` in `layer` (rows of `kv_dim`, head after
    /// head) where the attention kernel reads them.
    pub fn write(&mut self, seq: &SeqKv, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        let heads = self.kv_dim / hd;
        for (which, row) in [(0, k), (1, v)] {
            for (head, x) in row.chunks_exact(hd).take(heads).enumerate() {
                let (start, step) = self.paged(seq, layer).place(which, pos, head);
                let end = start + (hd - 1) * step + 1;
                match &mut self.data {
                    Store::F32(s) => {
                        let dst = s[start..end].iter_mut().step_by(step);
                        dst.zip(x).for_each(|(o, &x)| *o = x);
                    }
                    Store::F16(s) if step == 1 => s[start..end].convert_from_f32_slice(x),
                    Store::F16(s) => {
                        let dst = s[start..end].iter_mut().step_by(step);
                        dst.zip(x).for_each(|(o, &x)| *o = f16::from_f32(x));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_come_from_the_budget_and_go_back() {
        for precision in [KvPrecision::F32, KvPrecision::F16] {
            blocks_cycle(precision);
        }
    }

    fn blocks_cycle(precision: KvPrecision) {
        // 2 layers × K,V × 4 tokens × 8 values × 4 (or 2) bytes = 512 (256)
        // bytes a block.
        let block = 128 * precision.bytes();
        let mut kv = KvCache::with_precision(2, 8, 4, 4, block * 3 + 100, precision).unwrap();
        assert_eq!(kv.capacity_blocks(), 3);
        assert_eq!((kv.block_bytes(), kv.bytes()), (block, 3 * block));
        let mut a = kv.new_seq(100);
        let mut b = kv.new_seq(100);
        kv.reserve(&mut a, 6).unwrap(); // 2 blocks
        kv.advance(&mut a, 6);
        assert_eq!((a.len(), a.blocks(), kv.free_blocks()), (6, 2, 1));
        let e = kv.reserve(&mut b, 5).unwrap_err();
        assert!(
            matches!(
                e,
                LlmError::KvFull {
                    need: 2,
                    free: 1,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(b.blocks(), 0, "a failed reserve takes nothing");
        // Writes land in the sequence's own blocks.
        for p in 0..6 {
            kv.write(&a, 1, p, &[p as f32; 8], &[-(p as f32); 8]);
        }
        kv.reserve(&mut b, 4).unwrap();
        kv.advance(&mut b, 4);
        kv.write(&b, 1, 0, &[99.0; 8], &[98.0; 8]);
        for p in 0..6 {
            kv.write(&a, 0, p, &[0.5; 8], &[0.25; 8]);
        }
        for p in 0..6 {
            // Every value of both heads reads back as written, and the
            // other layer's writes did not land on it.
            assert_eq!(kv.paged(&a, 1).k(p), vec![p as f32; 8]);
            assert_eq!(kv.paged(&a, 1).v(p), vec![-(p as f32); 8]);
            assert_eq!(kv.paged(&a, 0).k(p), vec![0.5; 8]);
        }
        assert_eq!(kv.paged(&b, 1).v(0), vec![98.0; 8]);
        kv.truncate(&mut a, 3);
        assert_eq!((a.len(), a.blocks(), kv.free_blocks()), (3, 1, 1));
        kv.release(&mut a);
        kv.release(&mut b);
        assert_eq!(kv.free_blocks(), 3);
        assert!(KvCache::with_precision(2, 8, 4, 4, block - 1, precision).is_err());
        assert!(KvCache::with_precision(2, 8, 3, 4, block * 3, precision).is_err());
        assert!(KvCache::with_precision(2, 8, 0, 4, block * 3, precision).is_err());
    }
}
