//! The LLM runtime on a tiny Llama built in code (random Q4_1 / Q8_0 /
//! F32 weights, byte-level vocabulary): batched decoding equals decoding
//! alone, speculative greedy equals plain greedy, the KV budget and the
//! context window give typed errors, cancellation frees blocks, and the
//! model survives hostile GGUF variations.

use std::sync::Arc;

use osprey_models::llm::gguf::Gguf;
use osprey_models::llm::model::Model;
use osprey_models::llm::runtime::{GenOptions, Runtime, StopReason};
use osprey_models::llm::testing::{tiny_gguf, CONTEXT, DIM, HEADS, KV_HEADS, LAYERS};
use osprey_models::llm::LlmError;

fn model() -> Arc<Model> {
    Arc::new(Model::from_gguf(Gguf::from_bytes(tiny_gguf(CONTEXT)).unwrap()).unwrap())
}

fn greedy(max_tokens: usize) -> GenOptions {
    GenOptions {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

fn run_alone(m: &Arc<Model>, prompt: &[u32], opts: GenOptions) -> Vec<u32> {
    let mut rt = Runtime::new(m.clone(), 1 << 20, 2, 16).unwrap();
    let id = rt.add(prompt, opts).unwrap();
    rt.prefill(id).unwrap();
    while rt.done(id).is_none() {
        rt.step().unwrap();
    }
    rt.finish(id).unwrap().0
}

#[test]
fn batched_decoding_equals_decoding_alone() {
    let m = model();
    let prompts: Vec<Vec<u32>> = ["robot arm", "lidar", "a much longer prompt about wheels"]
        .iter()
        .map(|p| m.tokenizer.encode(p, false).unwrap())
        .collect();
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| run_alone(&m, p, greedy(12)))
        .collect();
    let mut rt = Runtime::new(m.clone(), 1 << 20, 2, 16).unwrap();
    let ids: Vec<_> = prompts
        .iter()
        .map(|p| rt.add(p, greedy(12)).unwrap())
        .collect();
    for &id in &ids {
        rt.prefill(id).unwrap();
    }
    let mut steps = 0;
    while ids.iter().any(|&id| rt.done(id).is_none()) {
        assert!(rt.step().unwrap() > 0);
        steps += 1;
    }
    assert!(steps <= 12, "all three advance together: {steps} steps");
    for (k, &id) in ids.iter().enumerate() {
        let (toks, _, stats, why) = rt.finish(id).unwrap();
        assert_eq!(toks, alone[k], "sequence {k}");
        assert_eq!(
            (stats.generated_tokens, why),
            (12, Some(StopReason::MaxTokens))
        );
    }
    assert_eq!(rt.kv().free_blocks(), rt.kv().capacity_blocks());
}

#[test]
fn speculative_greedy_is_identical_to_plain_greedy() {
    let m = model();
    // Repetitive prompts give prompt lookup something to find.
    for text in ["abcabcabcabcabc", "the cat the cat the cat", "xyz"] {
        let p = m.tokenizer.encode(text, false).unwrap();
        let plain = run_alone(&m, &p, greedy(30));
        let mut rt = Runtime::new(m.clone(), 1 << 20, 2, 16).unwrap();
        let id = rt
            .add(
                &p,
                GenOptions {
                    speculative: true,
                    ..greedy(30)
                },
            )
            .unwrap();
        rt.prefill(id).unwrap();
        while rt.done(id).is_none() {
            rt.step().unwrap();
        }
        let (spec, _, stats, _) = rt.finish(id).unwrap();
        assert_eq!(spec, plain, "{text:?}");
        assert!(stats.accepted <= stats.drafted);
        assert_eq!(rt.kv().free_blocks(), rt.kv().capacity_blocks());
    }
}

#[test]
fn kv_budget_and_context_give_typed_errors_and_nothing_leaks() {
    let m = model();
    let kvd = DIM / HEADS as usize * KV_HEADS as usize;
    let block = LAYERS * 2 * 16 * kvd * 4;
    // Two blocks: 32 positions.
    let mut rt = Runtime::new(m.clone(), 2 * block, 1, 16).unwrap();
    let long: Vec<u32> = (0..40).map(|i| (i % 200) as u32).collect();
    let id = rt.add(&long, greedy(4)).unwrap();
    let e = rt.prefill(id).unwrap_err();
    assert!(matches!(e, LlmError::KvFull { .. }), "{e}");
    assert_eq!(
        rt.kv().free_blocks(),
        2,
        "a failed prefill returns its blocks"
    );
    // The runtime keeps serving.
    let short = run_short(&mut rt);
    assert_eq!(short, 4);
    // Longer than the context window.
    let too_long: Vec<u32> = vec![65; CONTEXT as usize];
    assert!(matches!(
        rt.add(&too_long, greedy(1)),
        Err(LlmError::ContextFull { .. })
    ));
    // Generation stops at the window instead of failing.
    let mut big = Runtime::new(m.clone(), 1 << 20, 1, 16).unwrap();
    let p: Vec<u32> = vec![66; CONTEXT as usize - 5];
    let id = big.add(&p, greedy(100)).unwrap();
    big.prefill(id).unwrap();
    while big.done(id).is_none() {
        big.step().unwrap();
    }
    assert_eq!(big.done(id), Some(StopReason::Context));
    // Bad requests.
    assert!(rt.add(&[], greedy(1)).is_err());
    assert!(rt.add(&[9999], greedy(1)).is_err());
    assert!(rt.prefill(77).is_err());
}

fn run_short(rt: &mut Runtime) -> usize {
    let id = rt.add(&[65, 66, 67], greedy(4)).unwrap();
    rt.prefill(id).unwrap();
    while rt.done(id).is_none() {
        rt.step().unwrap();
    }
    rt.finish(id).unwrap().2.generated_tokens
}

#[test]
fn cancel_between_steps_frees_the_blocks() {
    let m = model();
    let mut rt = Runtime::new(m, 1 << 20, 1, 16).unwrap();
    let id = rt.add(&[65; 20], greedy(50)).unwrap();
    rt.prefill(id).unwrap();
    rt.step().unwrap();
    assert!(rt.kv().free_blocks() < rt.kv().capacity_blocks());
    rt.cancel(id).unwrap();
    assert_eq!(rt.done(id), Some(StopReason::Cancelled));
    assert_eq!(rt.step().unwrap(), 0);
    assert_eq!(rt.kv().free_blocks(), rt.kv().capacity_blocks());
}

#[test]
fn hostile_model_files_are_errors() {
    let good = tiny_gguf(CONTEXT);
    assert!(Model::from_gguf(Gguf::from_bytes(good.clone()).unwrap()).is_ok());
    // Every truncation is an error, never a panic.
    for cut in (0..good.len()).step_by(997) {
        assert!(
            Gguf::from_bytes(good[..cut].to_vec()).is_err(),
            "cut at {cut}"
        );
    }
    // Wrong architecture.
    let text = String::from_utf8_lossy(&good).to_string();
    assert!(text.contains("llama"));
    let mut bad = good.clone();
    let at = bad.windows(5).position(|w| w == b"llama").unwrap();
    bad[at..at + 5].copy_from_slice(b"bloom");
    let e = Model::from_gguf(Gguf::from_bytes(bad).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bloom"), "{e}");
}

#[test]
fn hf_checkpoint_of_the_same_model_gives_the_same_logits() {
    use osprey_kernels::pool::ThreadPool;
    use osprey_models::llm::kv::{KvCache, KvPrecision};
    use osprey_models::llm::model::{Logits, RopeStyle};
    let dir = std::env::temp_dir().join(format!("osprey-tiny-hf-{}", std::process::id()));
    osprey_models::llm::testing::write_tiny_hf_dir(&dir, CONTEXT).unwrap();
    let hf = Model::from_hf_dir(&dir).unwrap();
    let gg = model();
    assert_eq!(hf.rope_style(), RopeStyle::Neox);
    assert_eq!(gg.rope_style(), RopeStyle::Norm);
    let text = "wheel <|im_start|>encoder";
    let ids = gg.tokenizer.encode(text, true).unwrap();
    assert_eq!(hf.tokenizer.encode(text, true).unwrap(), ids);
    assert_eq!(
        hf.tokenizer.encode(text, false).unwrap(),
        gg.tokenizer.encode(text, false).unwrap()
    );
    assert_eq!(hf.tokenizer.eos, Some(257));
    let pool = ThreadPool::new(1);
    let logits = |m: &Model| {
        let mut kv = KvCache::for_model(&m.cfg, 1 << 20, KvPrecision::F32).unwrap();
        let mut seq = kv.new_seq(ids.len());
        let mut scratch = m.scratch(ids.len(), true);
        let batch: Vec<(usize, u32)> = ids.iter().map(|&t| (0, t)).collect();
        m.forward(
            &mut kv,
            &mut [&mut seq],
            &batch,
            Logits::All,
            &mut scratch,
            &pool,
        )
        .unwrap();
        scratch.logits[..ids.len() * m.cfg.vocab].to_vec()
    };
    let (a, b) = (logits(&hf), logits(&gg));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        // NaN (an output never written) counts as infinitely wrong:
        // `f32::max` alone would skip it.
        .map(|e| if e.is_nan() { f32::INFINITY } else { e })
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "max |logit diff| {worst}");
    // A checkpoint with a missing file or a wrong shape is a clear error.
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    assert!(Model::from_hf_dir(&dir)
        .unwrap_err()
        .to_string()
        .contains("tokenizer.json"));
    assert!(Model::from_hf_dir(&dir.join("nope"))
        .unwrap_err()
        .to_string()
        .contains("config.json"));
}

#[test]
fn f16_kv_cache_holds_twice_the_blocks_and_stays_close() {
    use osprey_models::llm::kv::KvPrecision;
    let exact = model();
    let mut half = Model::from_gguf(Gguf::from_bytes(tiny_gguf(CONTEXT)).unwrap()).unwrap();
    half.kv_precision = KvPrecision::F16;
    let half = Arc::new(half);
    let budget = 1 << 20;
    let (a, b) = (
        Runtime::new(exact.clone(), budget, 2, 16).unwrap(),
        Runtime::new(half.clone(), budget, 2, 16).unwrap(),
    );
    assert_eq!(b.kv().precision(), KvPrecision::F16);
    assert_eq!(b.kv().capacity_blocks(), 2 * a.kv().capacity_blocks());
    assert_eq!(2 * b.kv().block_bytes(), a.kv().block_bytes());
    // Same answers from the same prompts (the tiny model's margins are far
    // wider than f16 rounding moves its logits), batched as alone.
    let prompt = exact.tokenizer.encode("robot arm", false).unwrap();
    assert_eq!(
        run_alone(&exact, &prompt, greedy(12)),
        run_alone(&half, &prompt, greedy(12))
    );
}

/// 8-bit decode steps on the row-interleaved weight copies that
/// `set_int8_activations` makes (x86) give the logits of the row-major
/// weights bit for bit; turning 8-bit activations off drops the copies.
#[test]
fn packed_weights_change_no_logit() {
    use osprey_kernels::pool::ThreadPool;
    use osprey_models::llm::kv::{KvCache, KvPrecision};
    use osprey_models::llm::model::Logits;
    let load = || Model::from_gguf(Gguf::from_bytes(tiny_gguf(CONTEXT)).unwrap()).unwrap();
    let mut packed = load();
    packed.set_int8_activations(true);
    // The same switch without the copies: the products read the rows.
    let mut rows = load();
    rows.int8_activations = true;
    assert_eq!(rows.packed_bytes(), 0);
    #[cfg(target_arch = "x86_64")]
    if osprey_kernels::isa::active().has_avx2() {
        assert!(packed.packed_bytes() > 0, "nothing packed");
    }
    let prompt = packed.tokenizer.encode("robot arm torque", false).unwrap();
    let logits = |m: &Model, threads: usize| {
        let pool = ThreadPool::new(threads);
        let mut kv = KvCache::for_model(&m.cfg, 1 << 20, KvPrecision::F32).unwrap();
        let mut seq = kv.new_seq(prompt.len() + 8);
        let mut scratch = m.scratch(prompt.len(), false);
        let batch: Vec<(usize, u32)> = prompt.iter().map(|&t| (0, t)).collect();
        let mut out = Vec::new();
        m.forward(
            &mut kv,
            &mut [&mut seq],
            &batch,
            Logits::LastPerSeq,
            &mut scratch,
            &pool,
        )
        .unwrap();
        for step in 0..8u32 {
            // Decode steps (one row: 8-bit activations).
            let tok = (step * 37 + 5) % m.cfg.vocab as u32;
            m.forward(
                &mut kv,
                &mut [&mut seq],
                &[(0, tok)],
                Logits::LastPerSeq,
                &mut scratch,
                &pool,
            )
            .unwrap();
            out.extend(
                scratch
                    .logits_row(0, m.cfg.vocab)
                    .iter()
                    .map(|v| v.to_bits()),
            );
        }
        out
    };
    for threads in [1, 2] {
        assert_eq!(
            logits(&packed, threads),
            logits(&rows, threads),
            "{threads} threads"
        );
    }
    packed.set_int8_activations(false);
    assert_eq!(packed.packed_bytes(), 0);
}
