//! After warm-up, a decode pass of the LLM (one row per sequence, two
//! sequences batched, through the paged KV cache and the pooled attention
//! and product kernels) allocates nothing — proven with a counting global
//! allocator on the tiny in-code model.
//!
//! This file holds a single test so no other test allocates concurrently.

use osprey_kernels::pool::ThreadPool;
use osprey_models::llm::gguf::Gguf;
use osprey_models::llm::kv::{KvCache, KvPrecision};
use osprey_models::llm::model::{Logits, Model};
use osprey_models::llm::sample::{Sampler, SamplingParams};
use osprey_models::llm::testing::tiny_gguf;

#[global_allocator]
static GLOBAL: osprey_engine::testing::Counting = osprey_engine::testing::Counting;

#[test]
fn decode_passes_allocate_nothing_after_warmup() {
    for (int8, precision) in [
        (false, KvPrecision::F32),
        (true, KvPrecision::F32),
        (true, KvPrecision::F16),
    ] {
        let mut model = Model::from_gguf(Gguf::from_bytes(tiny_gguf(256)).unwrap()).unwrap();
        model.set_int8_activations(int8);
        let pool = ThreadPool::new(2);
        let mut kv = KvCache::for_model(&model.cfg, 1 << 20, precision).unwrap();
        let mut a = kv.new_seq(200);
        let mut b = kv.new_seq(200);
        let mut scratch = model.scratch(16, false);
        let mut sampler = Sampler::new(SamplingParams {
            temperature: 0.8,
            ..Default::default()
        });
        let history = Vec::with_capacity(256);
        // Prefill both, then warm up one decode pass.
        let prompt: Vec<(usize, u32)> = (0..10)
            .map(|i| (0, 65 + i))
            .chain((0..6).map(|i| (1, 97 + i)))
            .collect();
        model
            .forward(
                &mut kv,
                &mut [&mut a, &mut b],
                &prompt,
                Logits::LastPerSeq,
                &mut scratch,
                &pool,
            )
            .unwrap();
        model
            .forward(
                &mut kv,
                &mut [&mut a, &mut b],
                &[(0, 70), (1, 71)],
                Logits::LastPerSeq,
                &mut scratch,
                &pool,
            )
            .unwrap();
        let vocab = model.cfg.vocab;
        sampler.sample(&mut scratch.logits[..vocab], &history);
        let mut toks = [72u32, 73];
        let allocs = osprey_engine::testing::allocations_in(|| {
            for _ in 0..40 {
                model
                    .forward(
                        &mut kv,
                        &mut [&mut a, &mut b],
                        &[(0, toks[0]), (1, toks[1])],
                        Logits::LastPerSeq,
                        &mut scratch,
                        &pool,
                    )
                    .unwrap();
                for (k, t) in toks.iter_mut().enumerate() {
                    *t = sampler.sample(&mut scratch.logits[k * vocab..(k + 1) * vocab], &history);
                }
            }
        });
        assert_eq!(allocs, 0, "allocations in 40 decode passes (int8 {int8})");
        assert_eq!(a.len(), 10 + 41);
    }
}
