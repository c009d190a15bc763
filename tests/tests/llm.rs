//! SmolLM2-135M-Instruct (GGUF Q4_1) against two references:
//!
//! * an exact float64 forward pass in numpy (`scripts/llm-numpy-reference.py`,
//!   output checked in as tests/fixtures/smollm2_numpy_f64_reference.json):
//!   our logits must match it closely at every position;
//! * llama.cpp (../shared/fixtures/reference/llm): identical token ids;
//!   greedy completions and teacher-forced argmax that differ only where
//!   llama.cpp's own top-1 margin is small. llama.cpp multiplies 4-bit
//!   weights with activations rounded to 8 bits, which moves its logits by up
//!   to ~0.5 from the exact values (measured against the numpy pass), so a
//!   near-tie there can go either way.
//!
//! Needs the model fetched by scripts/fetch-llm.sh (and ../shared for the
//! llama.cpp file); skips visibly without them. `--nocapture` prints the
//! figures.

use osprey_kernels::pool::ThreadPool;
use osprey_models::llm::kv::{KvCache, KvPrecision};
use osprey_models::llm::model::{Logits, Model, Scratch};
use osprey_models::llm::sample::argmax;
use osprey_tests::{llm_model, shared_dir};
use serde_json::Value;

fn setup(test: &str) -> Option<(Model, Value)> {
    let shared = shared_dir(test)?;
    let path = llm_model(test)?;
    let model = Model::load(&path).expect("model loads");
    let r = std::fs::read_to_string(
        shared.join("fixtures/reference/llm/smollm2_llamacpp_reference.json"),
    )
    .unwrap();
    Some((model, serde_json::from_str(&r).unwrap()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// One pass over `toks` with logits for every position (KV cache in the
/// model's precision).
fn teacher_forced(model: &Model, toks: &[u32], pool: &ThreadPool) -> Scratch {
    let mut kv = KvCache::for_model(&model.cfg, 64 << 20, model.kv_precision).unwrap();
    let mut seq = kv.new_seq(toks.len());
    let mut scratch = model.scratch(toks.len(), true);
    let batch: Vec<(usize, u32)> = toks.iter().map(|&t| (0, t)).collect();
    model
        .forward(
            &mut kv,
            &mut [&mut seq],
            &batch,
            Logits::All,
            &mut scratch,
            pool,
        )
        .unwrap();
    scratch
}

#[test]
fn tokenizer_matches_llama_cpp() {
    let Some((model, r)) = setup("tokenizer_matches_llama_cpp") else {
        return;
    };
    for case in r["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = model.tokenizer.encode(text, true).unwrap();
        assert_eq!(got, ids(&case["ids"]), "{text:?}");
        assert_eq!(model.tokenizer.decode(&got), text);
    }
    for case in r["greedy"].as_array().unwrap() {
        let got = model
            .tokenizer
            .encode(case["prompt"].as_str().unwrap(), false)
            .unwrap();
        assert_eq!(got, ids(&case["prompt_ids"]));
    }
}

/// llama.cpp's arithmetic: every product against activations rounded to
/// 8 bits, K/V (and so the query and attention weights) in f16.
fn llama_cpp_numerics(model: &mut Model) {
    model.set_int8_activations(true);
    model.int8_prompt = true;
    model.kv_precision = KvPrecision::F16;
}

/// Teacher-forced argmax agreement with llama.cpp over the reference
/// texts (every disagreement must sit at a llama.cpp near-tie), and the
/// largest logit difference on each text's first `exact_rows` positions.
fn agreement(model: &Model, r: &Value, exact_rows: usize) -> (usize, usize, f64) {
    let pool = ThreadPool::new(2);
    let (mut agree, mut total, mut first_worst) = (0, 0, 0.0f64);
    for case in r["teacher_forced"].as_array().unwrap() {
        let toks = ids(&case["ids"]);
        let want = ids(&case["argmax_next"]);
        let margin: Vec<f64> = case["top1_margin"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let scratch = teacher_forced(model, &toks, &pool);
        let vocab = model.cfg.vocab;
        // The first logits against llama.cpp's sample.
        let sample = case["logits_first8_rows_sample"].as_array().unwrap();
        let mut worst = 0.0f64;
        for (i, row) in sample.iter().enumerate() {
            let ours = scratch.logits_row(i, vocab);
            let mut row_worst = 0.0f64;
            for (j, v) in row.as_array().unwrap().iter().enumerate() {
                row_worst = row_worst.max((ours[j] as f64 - v.as_f64().unwrap()).abs());
            }
            if std::env::var_os("OSPREY_LLM_DEBUG").is_some() {
                eprintln!("  row {i}: max |diff| {row_worst:.6}");
            }
            if i < exact_rows {
                first_worst = first_worst.max(row_worst);
            }
            worst = worst.max(row_worst);
        }
        for (i, &w) in want.iter().enumerate() {
            let got = argmax(scratch.logits_row(i, vocab));
            total += 1;
            if got == w {
                agree += 1;
            } else {
                eprintln!(
                    "  position {i}: ours {got}, llama.cpp {w} (its top-1 margin {:.4})",
                    margin[i]
                );
                assert!(
                    margin[i] < 0.35,
                    "position {i}: disagreement at llama.cpp margin {}",
                    margin[i]
                );
            }
        }
        eprintln!(
            "teacher-forced {} tokens: max |logit diff| on the sample {worst:.4}",
            toks.len()
        );
    }
    eprintln!(
        "argmax agreement with llama.cpp {agree}/{total} = {:.4}",
        agree as f64 / total as f64
    );
    (agree, total, first_worst)
}

#[test]
fn teacher_forced_argmax_agrees_with_llama_cpp() {
    let Some((model, r)) = setup("teacher_forced_argmax_agrees_with_llama_cpp") else {
        return;
    };
    // Exact f32 arithmetic (the default). The target is 0.98; the
    // logits match an exact float64 forward pass
    // (exact_logits_match_numpy_float64), while llama.cpp's own sit up to
    // ~0.75 from it, and llama.cpp itself, built for this CPU, agrees
    // 83/86 with the reference made by its AVX-512 build
    // (scripts/llamacpp-self-agreement.py).
    let (agree, total, _) = agreement(&model, &r, 0);
    assert!(
        agree as f64 / total as f64 >= 0.94,
        "agreement {agree}/{total}"
    );
}

// The references were made by llama.cpp on x86, and our AVX2 block
// products sum in its AVX2 order; NEON sums in the scalar reference's
// order (under qemu: first positions up to 0.24 apart, argmax 80/86).
#[test]
#[cfg_attr(
    not(target_arch = "x86_64"),
    ignore = "reproduces llama.cpp's x86 summation order: x86 only"
)]
fn llama_cpp_numerics_reproduce_its_logits() {
    let Some((mut model, r)) = setup("llama_cpp_numerics_reproduce_its_logits") else {
        return;
    };
    llama_cpp_numerics(&mut model);
    // Same integers, same f16 roundings: the first two positions of every
    // text (where attention sums at most two terms, so no summation order
    // differs) are bit-identical to llama.cpp's logits; later ones drift by
    // float summation order, amplified as in llama.cpp's own builds.
    let (agree, total, first) = agreement(&model, &r, 2);
    eprintln!("first two positions: max |logit diff| {first:e}");
    assert!(first < 1e-5, "first positions differ by {first}");
    // The 0.98: 85/86 since attention works a K/V head's query
    // heads together (83/86 before; the AVX2 and AVX-512 forms give the
    // same bits, so every x86 tier sees the same).
    assert!(
        agree as f64 / total as f64 >= 0.98,
        "agreement {agree}/{total}"
    );
}

#[test]
fn greedy_completions_match_llama_cpp() {
    let Some((model, r)) = setup("greedy_completions_match_llama_cpp") else {
        return;
    };
    let pool = ThreadPool::new(2);
    for case in r["greedy"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["generated_ids"]);
        let margin: Vec<f64> = case["top1_margin"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let mut kv = KvCache::for_model(&model.cfg, 64 << 20, KvPrecision::F32).unwrap();
        let mut seq = kv.new_seq(prompt.len() + want.len());
        let mut scratch = model.scratch(prompt.len().max(1), false);
        let batch: Vec<(usize, u32)> = prompt.iter().map(|&t| (0, t)).collect();
        model
            .forward(
                &mut kv,
                &mut [&mut seq],
                &batch,
                Logits::LastPerSeq,
                &mut scratch,
                &pool,
            )
            .unwrap();
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let t = argmax(scratch.logits_row(0, model.cfg.vocab));
            got.push(t);
            if Some(t) == model.tokenizer.eos {
                break;
            }
            model
                .forward(
                    &mut kv,
                    &mut [&mut seq],
                    &[(0, t)],
                    Logits::LastPerSeq,
                    &mut scratch,
                    &pool,
                )
                .unwrap();
        }
        let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
        match first_diff {
            None => eprintln!(
                "{:?}: {} tokens identical",
                case["prompt"].as_str().unwrap(),
                got.len()
            ),
            Some(i) => {
                eprintln!(
                    "{:?}: diverges at step {i} (ours {}, llama.cpp {}), llama.cpp's top-1 margin there {:.4}",
                    case["prompt"].as_str().unwrap(),
                    got[i],
                    want[i],
                    margin[i]
                );
                assert!(
                    margin[i] < 0.35,
                    "divergence at step {i} is not at a near-tie (margin {})",
                    margin[i]
                );
            }
        }
    }
}

#[test]
fn exact_logits_match_numpy_float64() {
    let Some(path) = llm_model("exact_logits_match_numpy_float64") else {
        return;
    };
    let model = Model::load(&path).expect("model loads");
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/smollm2_numpy_f64_reference.json");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let pool = ThreadPool::new(2);
    let vocab = model.cfg.vocab;
    let (mut worst, mut agree, mut total) = (0.0f64, 0, 0);
    for case in r["cases"].as_array().unwrap() {
        let toks = ids(&case["ids"]);
        let scratch = teacher_forced(&model, &toks, &pool);
        for (i, want) in ids(&case["argmax"]).iter().enumerate() {
            let row = scratch.logits_row(i, vocab);
            total += 1;
            agree += usize::from(argmax(row) == *want);
            for pair in case["top5"][i].as_array().unwrap() {
                let (t, v) = (
                    pair[0].as_u64().unwrap() as usize,
                    pair[1].as_f64().unwrap(),
                );
                worst = worst.max((row[t] as f64 - v).abs());
            }
            for (j, v) in case["first16"][i].as_array().unwrap().iter().enumerate() {
                worst = worst.max((row[j] as f64 - v.as_f64().unwrap()).abs());
            }
        }
    }
    eprintln!("vs numpy float64: argmax {agree}/{total}, max |logit diff| {worst:.2e}");
    assert_eq!(agree, total);
    assert!(worst < 5e-3, "max |logit diff| {worst}");
}
