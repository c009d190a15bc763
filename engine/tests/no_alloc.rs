//! After warm-up, `ExecutionContext::run` allocates nothing — proven with a
//! counting global allocator over a model that exercises every kind of step.
//!
//! This file holds a single test so no other test allocates concurrently.

use std::collections::HashMap;
use std::sync::Arc;

use osprey_engine::onnx::builder::{attr_i, attr_ints, attr_s, ModelBuilder};
use osprey_engine::onnx::import;
use osprey_engine::{Engine, ExecutionContext};

#[global_allocator]
static GLOBAL: osprey_engine::testing::Counting = osprey_engine::testing::Counting;

fn weights(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 20.0)
        .collect()
}

#[test]
fn run_allocates_nothing_after_warmup() {
    let mut m = ModelBuilder::new(13);
    m.input("x", &[1, 4, 16, 16]);
    m.init_f32("w1", &[8, 4, 3, 3], &weights(8 * 4 * 9));
    m.init_f32("b1", &[8], &weights(8));
    m.init_f32("wx", &[8, 8, 1, 1], &weights(64));
    m.init_f32("wd", &[8, 1, 3, 3], &weights(72));
    m.init_f32("w2", &[8, 8, 1, 1], &weights(64));
    m.init_f32("g", &[8], &[1.0; 8]);
    m.init_f32("be", &[8], &[0.1; 8]);
    m.init_f32("mu", &[8], &[0.0; 8]);
    m.init_f32("var", &[8], &[1.0; 8]);
    m.init_f32("fc", &[10, 8], &weights(80));
    m.init_f32("fcb", &[10], &weights(10));
    m.init_i64("sizes", &[4], &[1, 8, 16, 16]);
    m.node(
        "Conv",
        &["x", "w1", "b1"],
        &["c1"],
        vec![
            attr_ints("pads", &[1, 1, 1, 1]),
            attr_ints("strides", &[2, 2]),
        ],
    );
    m.node(
        "BatchNormalization",
        &["c1", "g", "be", "mu", "var"],
        &["bn"],
        vec![],
    );
    m.node("Relu", &["bn"], &["r"], vec![]);
    m.node("Conv", &["r", "wx"], &["ex"], vec![]);
    m.node(
        "Conv",
        &["ex", "wd"],
        &["dw"],
        vec![attr_i("group", 8), attr_ints("pads", &[1, 1, 1, 1])],
    );
    m.node("Conv", &["dw", "w2"], &["pw"], vec![]);
    m.node("Add", &["pw", "r"], &["res"], vec![]);
    m.node(
        "Resize",
        &["res", "", "", "sizes"],
        &["up"],
        vec![attr_s("mode", "linear")],
    );
    m.node(
        "MaxPool",
        &["up"],
        &["mp"],
        vec![
            attr_ints("kernel_shape", &[2, 2]),
            attr_ints("strides", &[2, 2]),
        ],
    );
    m.node("Concat", &["mp", "res"], &["cat"], vec![attr_i("axis", 1)]);
    m.node(
        "Transpose",
        &["cat"],
        &["tr"],
        vec![attr_ints("perm", &[0, 1, 3, 2])],
    );
    m.node(
        "ReduceMean",
        &["tr"],
        &["rm"],
        vec![attr_ints("axes", &[2, 3]), attr_i("keepdims", 1)],
    );
    m.node("Split", &["rm"], &["s1", "s2"], vec![attr_i("axis", 1)]);
    m.node("Flatten", &["s1"], &["f"], vec![]);
    m.node(
        "Gemm",
        &["f", "fc", "fcb"],
        &["logits"],
        vec![attr_i("transB", 1)],
    );
    m.node("Softmax", &["logits"], &["prob"], vec![]);
    m.output("prob");
    let mut graph = import(&m.to_bytes(), &HashMap::new()).expect("import");
    // Fused convolutions (BN folded, residual and activation in the epilogue)
    // take their own kernel paths; they must not allocate either.
    let report = osprey_engine::passes::optimize(&mut graph);
    assert!(
        report.iter().map(|r| r.rewrites).sum::<usize>() >= 3,
        "{report:?}"
    );
    // The INT8 form of the same graph: INT8 convolutions (plain and
    // depthwise) with an INT8 tensor between the depthwise and the
    // pointwise layer (and between the expansion and the depthwise
    // layer), and the INT8 Gemm.
    let mut graph8 = graph.clone();
    // And the channels-last form (NHWC kernels, a layout transpose).
    let mut graph_nhwc = graph.clone();
    let layout = osprey_engine::passes::channels_last(&mut graph_nhwc);
    assert!(
        layout.converted >= 3 && layout.transposes >= 1,
        "{layout:?}"
    );
    // Its expansion and depthwise layer run as one step (a fused pair).
    let pairs = osprey_engine::fuse::fusion_candidates(&graph_nhwc, &[]);
    assert_eq!(pairs.len(), 1, "{pairs:?}");
    let mut tactics = vec![None; graph_nhwc.nodes.len()];
    tactics[pairs[0].0] = Some(osprey_engine::fuse::fused_tactic("nhwc-gemm"));
    let engine_nhwc = Arc::new(Engine::with_tactics(graph_nhwc, &tactics).expect("nhwc engine"));
    let layers = osprey_engine::int8::permit_int8(&mut graph8, &|_| Some(4.0 / 127.0), true);
    assert_eq!(layers.iter().filter(|l| l.fallback.is_none()).count(), 5);
    let engine8 = Arc::new(Engine::new(graph8).expect("int8 engine"));
    assert_eq!(engine8.int8_tensors(), 2);
    let engine = Arc::new(Engine::new(graph).expect("engine"));
    let mut ctx = ExecutionContext::new(engine, 2);
    let x = weights(4 * 16 * 16);
    ctx.set_input("x", &x).expect("input");
    ctx.run().expect("warm-up");
    let first: Vec<f32> = ctx.output("prob").expect("prob").to_vec();
    assert!((first.iter().sum::<f32>() - 1.0).abs() < 1e-5);

    let n = osprey_engine::testing::allocations_in(|| {
        for _ in 0..20 {
            ctx.set_input("x", &x).expect("input");
            ctx.run().expect("run");
        }
    });
    assert_eq!(n, 0, "{n} allocations on the inference path");
    assert_eq!(ctx.output("prob").expect("prob"), &first[..]);

    let mut ctx8 = ExecutionContext::new(engine8, 2);
    ctx8.set_input("x", &x).expect("input");
    ctx8.run().expect("warm-up");
    let first8: Vec<f32> = ctx8.output("prob").expect("prob").to_vec();
    let n = osprey_engine::testing::allocations_in(|| {
        for _ in 0..20 {
            ctx8.set_input("x", &x).expect("input");
            ctx8.run().expect("run");
        }
    });
    assert_eq!(n, 0, "{n} allocations on the INT8 inference path");
    assert_eq!(ctx8.output("prob").expect("prob"), &first8[..]);

    let mut ctx_nhwc = ExecutionContext::new(engine_nhwc, 2);
    ctx_nhwc.set_input("x", &x).expect("input");
    ctx_nhwc.run().expect("warm-up");
    let n = osprey_engine::testing::allocations_in(|| {
        for _ in 0..20 {
            ctx_nhwc.set_input("x", &x).expect("input");
            ctx_nhwc.run().expect("run");
        }
    });
    assert_eq!(n, 0, "{n} allocations on the channels-last inference path");
    let got = ctx_nhwc.output("prob").expect("prob");
    for (a, b) in got.iter().zip(&first) {
        assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
    }
}
