//! Engine files: round trip, FP16 weights, the timing cache, and every way a
//! file can be unusable (truncated, tampered, other version, other device,
//! not an osprey engine) — each a clear error, never a panic.

use std::collections::HashMap;
use std::sync::Arc;

use osprey_engine::file::{self, EngineFile, Precision};
use osprey_engine::fingerprint::Fingerprint;
use osprey_engine::onnx::builder::{attr_f, attr_i, attr_ints, ModelBuilder};
use osprey_engine::onnx::import;
use osprey_engine::tune::{select_tactics, TimingCache};
use osprey_engine::{passes, Engine, EngineError, ExecutionContext, Graph};

/// Test data: the engine's pseudo-random stream, seed spread so small
/// seeds give unrelated streams.
fn data(n: usize, seed: u64) -> Vec<f32> {
    osprey_engine::tune::pseudo_random(n, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// A small MobileNet-like block: conv-bn-relu6, depthwise, project + residual.
fn model() -> Graph {
    let mut m = ModelBuilder::new(13);
    m.input("x", &[1, 8, 12, 12]);
    m.init_f32("w1", &[16, 8, 1, 1], &data(128, 1));
    m.init_f32("g", &[16], &data(16, 2))
        .init_f32("b", &[16], &data(16, 3));
    m.init_f32("m", &[16], &data(16, 4))
        .init_f32("v", &[16], &[0.7; 16]);
    m.init_f32("wd", &[16, 1, 3, 3], &data(144, 5));
    m.init_f32("w2", &[8, 16, 1, 1], &data(128, 6));
    m.init_f32("lo", &[], &[0.0]).init_f32("hi", &[], &[6.0]);
    m.node("Conv", &["x", "w1"], &["c1"], vec![]);
    m.node(
        "BatchNormalization",
        &["c1", "g", "b", "m", "v"],
        &["bn"],
        vec![attr_f("epsilon", 1e-3)],
    );
    m.node("Clip", &["bn", "lo", "hi"], &["r"], vec![]);
    m.node(
        "Conv",
        &["r", "wd"],
        &["d"],
        vec![attr_i("group", 16), attr_ints("pads", &[1, 1, 1, 1])],
    );
    m.node("Conv", &["d", "w2"], &["p"], vec![]);
    m.node("Add", &["p", "x"], &["y"], vec![]);
    m.output("y");
    let mut g = import(&m.to_bytes(), &HashMap::new()).expect("import");
    passes::optimize(&mut g);
    g
}

/// An untuned INT8 engine file of `g`.
fn int8_file(g: Graph) -> EngineFile {
    EngineFile {
        graph: g,
        tactics: Vec::new(),
        fingerprint: Fingerprint::current(),
        precision: Precision::Int8,
        build: serde_json::json!({}),
    }
}

/// Bytes of the I8 tensors in an engine file.
fn i8_bytes(bytes: &[u8]) -> usize {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::I8)
        .map(|(_, v)| v.data().len())
        .sum()
}

fn run(g: Graph, tactics: &[Option<String>], x: &[f32]) -> Vec<f32> {
    let e = Arc::new(Engine::with_tactics(g, tactics).expect("engine"));
    let mut ctx = ExecutionContext::new(e, 1);
    ctx.set_input("x", x).expect("input");
    ctx.run().expect("run");
    ctx.output_index(0).expect("output").to_vec()
}

fn built(precision: Precision) -> (EngineFile, Vec<f32>) {
    let mut g = model();
    let x = data(8 * 144, 9);
    let want = run(g.clone(), &[], &x);
    if precision == Precision::Fp16 {
        file::round_constants_to_f16(&mut g);
    }
    let mut cache = TimingCache::default();
    let (tactics, layers) = select_tactics(
        &g,
        1,
        &mut cache,
        &Fingerprint::current(),
        &mut |_, _, _| {},
    )
    .expect("tune");
    assert_eq!(layers.len(), 3, "three convolutions to tune");
    assert!(layers
        .iter()
        .all(|l| !l.candidates.is_empty() && l.candidates.contains_key(&l.tactic)));
    let ef = EngineFile {
        graph: g,
        tactics,
        fingerprint: Fingerprint::current(),
        precision,
        build: serde_json::json!({}),
    };
    (ef, want)
}

#[test]
fn fp32_engine_round_trips_exactly() {
    let (ef, want) = built(Precision::Fp32);
    let bytes = file::to_bytes(&ef).unwrap();
    let back = file::from_bytes(&bytes, Some(&Fingerprint::current()), "mem").unwrap();
    assert_eq!(back.tactics, ef.tactics);
    assert_eq!(back.precision, Precision::Fp32);
    let x = data(8 * 144, 9);
    let got = run(back.graph, &back.tactics, &x);
    // Tactics change the summation order, so compare to rounding.
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
}

#[test]
fn int8_engine_stores_int8_weights_and_runs_the_same() {
    let mut g = model();
    // Every input observed in range: a scale of 4/127 for every tensor.
    let layers = osprey_engine::int8::permit_int8(&mut g, &|_| Some(4.0 / 127.0), true);
    let int8 = layers.iter().filter(|l| l.fallback.is_none()).count();
    assert_eq!(int8, 3, "{layers:?}"); // pointwise, depthwise, pointwise
    let x = data(8 * 144, 9);
    let want = run(g.clone(), &[], &x);
    let fp32 = run(osprey_engine::int8::without_int8(&g), &[], &x);
    let ef = int8_file(g);
    let bytes = file::to_bytes(&ef).unwrap();
    let e32 = EngineFile {
        precision: Precision::Fp32,
        ..ef.clone()
    };
    let bytes32 = file::to_bytes(&e32).unwrap();
    // The three INT8 layers' weights are stored as I8 (with F32 scales per
    // output channel, 16 + 16 + 8).
    let i8_values = i8_bytes(&bytes);
    assert_eq!(i8_values, 128 + 144 + 128);
    // 400 weights lose 3 bytes each, 40 scales cost 4; the header grows.
    let saved = bytes32.len() - bytes.len();
    assert!(saved > 400 * 3 - 40 * 4 - 200, "{saved}");
    let back = file::from_bytes(&bytes, Some(&Fingerprint::current()), "mem").unwrap();
    assert_eq!(back.precision, Precision::Int8);
    let got = run(back.graph, &back.tactics, &x);
    // The same integers, the same scales up to an ulp.
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
    }
    // And INT8 differs from FP32 by a quantization-sized amount (a coarse
    // scale: 4/127 for activations mostly within ±1), not more.
    let mut q = osprey_engine::int8::Sqnr::default();
    q.add(&fp32, &got);
    assert!(q.db() > 15.0 && q.db().is_finite(), "{}", q.db());
}

#[test]
fn fp16_engine_is_half_the_size_and_close_to_fp32() {
    let (e32, _) = built(Precision::Fp32);
    let (e16, want) = built(Precision::Fp16);
    let b32 = file::to_bytes(&e32).unwrap();
    let b16 = file::to_bytes(&e16).unwrap();
    // Weights the graph reads, in f32 bytes; FP16 must save half of them.
    let weight_bytes: usize = e32
        .graph
        .nodes
        .iter()
        .flat_map(|n| n.inputs.iter())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter_map(|&t| e32.graph.tensors[t].value.as_ref().map(|v| v.len() * 4))
        .sum();
    let saved = b32.len() as f64 - b16.len() as f64;
    assert!(
        saved >= 0.45 * weight_bytes as f64,
        "saved {saved} of {weight_bytes} weight bytes"
    );
    let back = file::from_bytes(&b16, None, "mem").unwrap();
    let got = run(back.graph, &back.tactics, &data(8 * 144, 9));
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(&want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= 1e-2 * scale, "fp16 error {err} vs scale {scale}");
}

fn expect_file_error(bytes: &[u8], device: Option<&Fingerprint>, needle: &str) {
    match file::from_bytes(bytes, device, "x.engine") {
        Err(e @ EngineError::EngineFile { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(needle), "expected {needle:?} in {msg:?}");
            assert!(!msg.contains('\n'));
        }
        Err(other) => panic!("wrong error kind: {other}"),
        Ok(_) => panic!("loaded a bad engine (expected {needle:?})"),
    }
}

#[test]
fn unusable_files_are_clear_errors() {
    let (ef, _) = built(Precision::Fp32);
    let bytes = file::to_bytes(&ef).unwrap();
    // Truncated anywhere.
    for cut in [0, 7, 100, bytes.len() / 2, bytes.len() - 1] {
        expect_file_error(&bytes[..cut], None, "truncated or corrupt");
    }
    // One weight byte changed.
    let mut tampered = bytes.clone();
    let n = tampered.len();
    tampered[n - 5] ^= 0x40;
    expect_file_error(&tampered, None, "checksum mismatch");
    // Another format version (same length, so only the version differs).
    let pos = bytes
        .windows(20)
        .position(|w| w == br#""format_version":"2""#)
        .expect("version key");
    let mut other = bytes.clone();
    other[pos + 18] = b'7';
    expect_file_error(&other, None, "format version 7");
    // Version 1 passes the version check (then fails the checksum, which
    // covers the version).
    other[pos + 18] = b'1';
    expect_file_error(&other, None, "checksum mismatch");
    // Tuned for another device.
    let mut foreign = ef.clone();
    foreign.fingerprint.isa = "avx512-from-elsewhere".into();
    let fb = file::to_bytes(&foreign).unwrap();
    expect_file_error(
        &fb,
        Some(&Fingerprint::current()),
        "tuned for another device",
    );
    assert!(
        file::from_bytes(&fb, None, "x").is_ok(),
        "without a device check it loads"
    );
    // A safetensors file that is not an engine.
    let plain = safetensors::tensor::serialize(
        Vec::<(String, safetensors::tensor::TensorView)>::new(),
        &None,
    )
    .unwrap();
    expect_file_error(&plain, None, "not an osprey engine");
}

#[test]
fn timing_cache_makes_the_second_tuning_free() {
    let g = model();
    let fp = Fingerprint::current();
    let mut cache = TimingCache::new();
    let (t1, l1) = select_tactics(&g, 1, &mut cache, &fp, &mut |_, _, _| {}).unwrap();
    assert!(l1.iter().any(|l| !l.cached));
    let dir = std::env::temp_dir().join(format!("osprey-tc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cache.json");
    cache.save(&path).unwrap();
    let mut loaded = TimingCache::load(&path).unwrap();
    assert_eq!(loaded.discarded, 0);
    assert_eq!(loaded.entries.len(), cache.entries.len());
    for (k, e) in &cache.entries {
        assert_eq!(loaded.entries[k].tactic, e.tactic);
    }
    let (t2, l2) = select_tactics(&g, 1, &mut loaded, &fp, &mut |_, _, _| {}).unwrap();
    assert!(l2.iter().all(|l| l.cached));
    assert_eq!(t1, t2);
    // Another thread count is another key.
    let (_, l3) = select_tactics(&g, 2, &mut loaded, &fp, &mut |_, _, _| {}).unwrap();
    assert!(l3.iter().any(|l| !l.cached));
    // A cache another osprey build wrote (its kernels timed, not ours)
    // starts afresh, and says how many entries it dropped.
    let mut foreign = cache.clone();
    foreign.build = "osprey 0.0.1 exe 1 bytes t0".into();
    foreign.save(&path).unwrap();
    let mut fresh = TimingCache::load(&path).unwrap();
    assert!(fresh.entries.is_empty());
    assert_eq!(fresh.discarded, cache.entries.len());
    assert_eq!(fresh.build, osprey_engine::tune::build_id());
    let (_, l4) = select_tactics(&g, 1, &mut fresh, &fp, &mut |_, _, _| {}).unwrap();
    assert!(l4.iter().all(|l| !l.cached));
    std::fs::write(&path, b"{ not json").unwrap();
    assert!(TimingCache::load(&path).is_err());
}

/// INT8 `Gemm`s survive the file: the weights of one with transposed B are
/// stored as I8 per output row; an untransposed B stays F32 (its rows are
/// not output channels); outputs equal the in-memory engine's.
#[test]
fn int8_gemm_engine_round_trips() {
    let (k, n1, n2) = (24, 20, 7);
    let mut m = ModelBuilder::new(13);
    m.input("x", &[1, 6, 2, 2])
        .init_f32("w1", &[n1, k], &data(n1 * k, 1))
        .init_f32("b1", &[n1], &data(n1, 2))
        .init_f32("w2", &[n1, n2], &data(n1 * n2, 3))
        .node("Flatten", &["x"], &["f"], vec![attr_i("axis", 1)])
        .node(
            "Gemm",
            &["f", "w1", "b1"],
            &["h"],
            vec![attr_i("transB", 1)],
        )
        .node("Gemm", &["h", "w2"], &["y"], vec![attr_f("alpha", 0.5)])
        .output("y");
    let mut g = import(&m.to_bytes(), &HashMap::new()).expect("import");
    passes::optimize(&mut g);
    let layers = osprey_engine::int8::permit_int8(&mut g, &|_| Some(4.0 / 127.0), false);
    assert_eq!(layers.iter().filter(|l| l.fallback.is_none()).count(), 2);
    let x = data(k, 9);
    let want = run(g.clone(), &[], &x);
    let ef = int8_file(g);
    let bytes = file::to_bytes(&ef).unwrap();
    let i8_values = i8_bytes(&bytes);
    assert_eq!(i8_values, n1 * k);
    let back = file::from_bytes(&bytes, Some(&Fingerprint::current()), "mem").unwrap();
    let got = run(back.graph, &back.tactics, &x);
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
    }
}

/// A channels-last engine (`osprey build --layout nhwc`) keeps its layout
/// through the file: the convolutions are still channels-last when loaded,
/// their tactics are the NHWC kernels, and outputs match the NCHW graph.
#[test]
fn channels_last_engine_round_trips() {
    let mut g = model();
    let x = data(8 * 144, 9);
    let want = run(g.clone(), &[], &x);
    let layout = passes::channels_last(&mut g);
    assert_eq!((layout.converted, layout.transposes), (3, 2), "{layout:?}");
    let (tactics, layers) = select_tactics(
        &g,
        1,
        &mut TimingCache::default(),
        &Fingerprint::current(),
        &mut |_, _, _| {},
    )
    .expect("tune");
    let names: Vec<&str> = layers.iter().map(|l| l.tactic.as_str()).collect();
    assert_eq!(names, ["nhwc-gemm", "nhwc-depthwise", "nhwc-gemm"]);
    let ef = EngineFile {
        graph: g,
        tactics,
        fingerprint: Fingerprint::current(),
        precision: Precision::Fp32,
        build: serde_json::json!({}),
    };
    let bytes = file::to_bytes(&ef).unwrap();
    let back = file::from_bytes(&bytes, Some(&Fingerprint::current()), "mem").unwrap();
    let convs = back
        .graph
        .nodes
        .iter()
        .filter(|n| matches!(&n.op, osprey_engine::ir::Op::Conv(a) if a.channels_last))
        .count();
    assert_eq!(convs, 3);
    let got = run(back.graph, &back.tactics, &x);
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
    // An NCHW tactic on a channels-last layer is refused with the reason.
    let wrong: Vec<Option<String>> = ef
        .tactics
        .iter()
        .map(|t| t.as_ref().map(|_| "pointwise-gemm/nc128".to_string()))
        .collect();
    let Err(e) = Engine::with_tactics(ef.graph.clone(), &wrong) else {
        panic!("an NCHW tactic on a channels-last layer was accepted");
    };
    assert!(e.to_string().contains("channels-last"), "{e}");
}
