//! Import + execution of small models built in code, one op family at a
//! time, against straightforward reference computations. No model files needed.

use std::collections::HashMap;
use std::sync::Arc;

use osprey_engine::onnx::builder::{
    attr_f, attr_i, attr_ints, attr_s, attr_t, tensor_f32, ModelBuilder,
};
use osprey_engine::onnx::{import, InputShapes};
use osprey_engine::{Engine, EngineError, ExecutionContext};
use osprey_kernels::activation::Activation;
use osprey_kernels::conv::{
    reference_conv2d, reference_conv_transpose2d, Conv2dGeometry, ConvTranspose2dGeometry,
};
use proptest::prelude::*;

/// Test data: the engine's pseudo-random stream, seed spread so small
/// seeds give unrelated streams.
fn data(n: usize, seed: u64) -> Vec<f32> {
    osprey_engine::tune::pseudo_random(n, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn run(
    m: &ModelBuilder,
    inputs: &[(&str, &[f32])],
    shapes: InputShapes,
    threads: usize,
) -> Vec<Vec<f32>> {
    let g = import(&m.to_bytes(), &shapes).expect("import");
    let engine = Arc::new(Engine::new(g).expect("engine"));
    let mut ctx = ExecutionContext::new(engine.clone(), threads);
    for (n, d) in inputs {
        ctx.set_input(n, d).expect("set_input");
    }
    ctx.run().expect("run");
    (0..engine.outputs().count())
        .map(|i| ctx.output_index(i).expect("output").to_vec())
        .collect()
}

fn run1(m: &ModelBuilder, x: &[f32]) -> Vec<f32> {
    run(m, &[("x", x)], HashMap::new(), 2).remove(0)
}

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "[{i}] {g} vs {w}");
    }
}

#[test]
fn conv_with_auto_pad_groups_and_dilation() {
    for (auto, groups, dil, stride) in [
        ("SAME_UPPER", 1, 1, 2),
        ("NOTSET", 2, 2, 1),
        ("VALID", 4, 1, 1),
        ("SAME_LOWER", 1, 1, 2),
    ] {
        let (cin, cout, h, w, k) = (4, 8, 9, 10, 3);
        let wt = data(cout * cin / groups * k * k, 1);
        let b = data(cout, 2);
        let x = data(cin * h * w, 3);
        let mut m = ModelBuilder::new(13);
        m.input("x", &[1, cin as i64, h as i64, w as i64])
            .init_f32("w", &[cout, cin / groups, k, k], &wt)
            .init_f32("b", &[cout], &b);
        let mut attrs = vec![
            attr_i("group", groups as i64),
            attr_ints("dilations", &[dil, dil]),
            attr_ints("strides", &[stride, stride]),
        ];
        if auto == "NOTSET" {
            attrs.push(attr_ints("pads", &[1, 2, 0, 1]));
        } else {
            attrs.push(attr_s("auto_pad", auto));
        }
        m.node("Conv", &["x", "w", "b"], &["y"], attrs).output("y");
        let got = run1(&m, &x);
        let (stride, dil) = (stride as usize, dil as usize);
        let pads = match auto {
            "NOTSET" => [1, 2, 0, 1],
            "VALID" => [0; 4],
            _ => {
                let total = |n: usize| {
                    ((n.div_ceil(stride) - 1) * stride + (k - 1) * dil + 1).saturating_sub(n)
                };
                let (th, tw) = (total(h), total(w));
                if auto == "SAME_UPPER" {
                    [th / 2, tw / 2, th - th / 2, tw - tw / 2]
                } else {
                    [th - th / 2, tw - tw / 2, th / 2, tw / 2]
                }
            }
        };
        let g = Conv2dGeometry {
            c_in: cin,
            h,
            w,
            c_out: cout,
            kh: k,
            kw: k,
            stride: [stride; 2],
            dilation: [dil; 2],
            pads,
            groups,
        };
        let mut want = vec![0.0; cout * g.out_h().unwrap() * g.out_w().unwrap()];
        reference_conv2d(&g, &x, &wt, Some(&b), Activation::None, &mut want);
        assert_close(&got, &want, 1e-4);
    }
}

#[test]
fn conv_transpose_matches_reference() {
    let (cin, cout, h, w) = (4, 3, 5, 6);
    let wt = data(cin * cout * 2 * 2, 4);
    let b = data(cout, 5);
    let x = data(cin * h * w, 6);
    let mut m = ModelBuilder::new(12);
    m.input("x", &[1, cin as i64, h as i64, w as i64])
        .init_f32("w", &[cin, cout, 2, 2], &wt)
        .init_f32("b", &[cout], &b);
    m.node(
        "ConvTranspose",
        &["x", "w", "b"],
        &["y"],
        vec![attr_ints("strides", &[2, 2])],
    )
    .output("y");
    let got = run1(&m, &x);
    let g = ConvTranspose2dGeometry {
        c_in: cin,
        h,
        w,
        c_out: cout,
        kh: 2,
        kw: 2,
        stride: [2, 2],
        dilation: [1, 1],
        pads: [0; 4],
        output_padding: [0, 0],
        groups: 1,
    };
    let mut want = vec![0.0; cout * 10 * 12];
    reference_conv_transpose2d(&g, &x, &wt, Some(&b), &mut want);
    assert_close(&got, &want, 1e-5);
}

#[test]
fn batchnorm_and_activations() {
    let c = 3;
    let x = data(2 * c * 4, 7);
    let (g, b, mu, var) = (
        vec![1.5, -0.5, 2.0],
        vec![0.1, 0.2, -0.3],
        vec![0.05, -0.1, 0.2],
        vec![0.9, 1.1, 0.25],
    );
    let mut m = ModelBuilder::new(13);
    m.input("x", &[2, c as i64, 2, 2])
        .init_f32("g", &[c], &g)
        .init_f32("b", &[c], &b)
        .init_f32("m", &[c], &mu)
        .init_f32("v", &[c], &var);
    m.init_f32("lo", &[], &[-0.2]).init_f32("hi", &[], &[0.3]);
    m.node(
        "BatchNormalization",
        &["x", "g", "b", "m", "v"],
        &["bn"],
        vec![attr_f("epsilon", 1e-3)],
    );
    m.node("Clip", &["bn", "lo", "hi"], &["clip"], vec![]);
    m.node("HardSigmoid", &["bn"], &["hs"], vec![attr_f("alpha", 0.25)]);
    m.node("HardSwish", &["bn"], &["hw"], vec![]);
    m.node("LeakyRelu", &["bn"], &["lr"], vec![attr_f("alpha", 0.1)]);
    m.node("Sigmoid", &["bn"], &["sg"], vec![]);
    for o in ["bn", "clip", "hs", "hw", "lr", "sg"] {
        m.output(o);
    }
    let outs = run(&m, &[("x", &x)], HashMap::new(), 1);
    let bn: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let ch = (i / 4) % c;
            (v - mu[ch]) / (var[ch] + 1e-3f32).sqrt() * g[ch] + b[ch]
        })
        .collect();
    assert_close(&outs[0], &bn, 1e-5);
    let f = |func: &dyn Fn(f32) -> f32| bn.iter().map(|&v| func(v)).collect::<Vec<f32>>();
    assert_close(&outs[1], &f(&|v| v.clamp(-0.2, 0.3)), 1e-5);
    assert_close(&outs[2], &f(&|v| (0.25 * v + 0.5).clamp(0.0, 1.0)), 1e-5);
    assert_close(&outs[3], &f(&|v| v * (v + 3.0).clamp(0.0, 6.0) / 6.0), 1e-5);
    assert_close(&outs[4], &f(&|v| if v < 0.0 { 0.1 * v } else { v }), 1e-5);
    assert_close(&outs[5], &f(&|v| 1.0 / (1.0 + (-v).exp())), 1e-5);
}

#[test]
fn broadcasting_arithmetic_with_constants() {
    let x = data(2 * 3 * 4, 8);
    let s = vec![2.0, -1.0, 0.5];
    let mut m = ModelBuilder::new(13);
    m.input("x", &[2, 3, 4])
        .init_f32("s", &[3, 1], &s)
        .init_f32("two", &[], &[2.0]);
    m.node("Mul", &["x", "s"], &["a"], vec![]);
    m.node("Sub", &["s", "a"], &["b"], vec![]);
    m.node("Div", &["b", "two"], &["c"], vec![]);
    m.node("Pow", &["c", "two"], &["d"], vec![]);
    m.output("d");
    let got = run1(&m, &x);
    let want: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let sv = s[(i / 4) % 3];
            let c = (sv - v * sv) / 2.0;
            c * c
        })
        .collect();
    assert_close(&got, &want, 1e-5);
}

#[test]
fn shape_arithmetic_is_folded_away() {
    // Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])) : [2,3,4] -> [2,12]
    let x = data(24, 9);
    let mut m = ModelBuilder::new(13);
    m.input("x", &[2, 3, 4])
        .init_i64("zero", &[], &[0])
        .init_i64("ax", &[1], &[0])
        .init_i64("minus1", &[1], &[-1]);
    m.node("Shape", &["x"], &["s"], vec![]);
    m.node("Gather", &["s", "zero"], &["n"], vec![]);
    m.node("Unsqueeze", &["n", "ax"], &["n1"], vec![]);
    m.node(
        "Concat",
        &["n1", "minus1"],
        &["target"],
        vec![attr_i("axis", 0)],
    );
    m.node("Cast", &["target"], &["t64"], vec![attr_i("to", 7)]);
    m.node("Reshape", &["x", "t64"], &["y"], vec![]);
    m.node("Relu", &["y"], &["z"], vec![]);
    m.output("z");
    let g = import(&m.to_bytes(), &HashMap::new()).unwrap();
    assert_eq!(
        g.nodes.len(),
        2,
        "only Reshape (a view) and Relu remain: {:?}",
        g.op_histogram()
    );
    let out = g.outputs[0];
    assert_eq!(g.tensors[out].shape, vec![2, 12]);
    let got = run1(&m, &x);
    assert_close(&got, &x.iter().map(|v| v.max(0.0)).collect::<Vec<_>>(), 0.0);
}

#[test]
fn slice_split_concat_transpose_gather() {
    let x = data(2 * 6 * 5, 10);
    let mut m = ModelBuilder::new(13);
    m.input("x", &[2, 6, 5]);
    m.init_i64("st", &[2], &[4, -1])
        .init_i64("en", &[2], &[0, -100])
        .init_i64("axes", &[2], &[1, 2])
        .init_i64("steps", &[2], &[-2, -2]);
    m.init_i64("split", &[2], &[2, 4])
        .init_i64("idx", &[2], &[4, -5]);
    m.node(
        "Slice",
        &["x", "st", "en", "axes", "steps"],
        &["sl"],
        vec![],
    );
    m.node(
        "Split",
        &["x", "split"],
        &["p", "q"],
        vec![attr_i("axis", 1)],
    );
    m.node("Concat", &["q", "p"], &["cat"], vec![attr_i("axis", 1)]);
    m.node(
        "Transpose",
        &["x"],
        &["tr"],
        vec![attr_ints("perm", &[2, 0, 1])],
    );
    m.node("Gather", &["x", "idx"], &["ga"], vec![attr_i("axis", 2)]);
    for o in ["sl", "cat", "tr", "ga"] {
        m.output(o);
    }
    let outs = run(&m, &[("x", &x)], HashMap::new(), 2);
    let at = |b: usize, c: usize, w: usize| x[(b * 6 + c) * 5 + w];
    // Slice: channels 4, 2 (step -2 from 4, end 0 exclusive); width 4, 2, 0.
    let mut want = vec![];
    for b in 0..2 {
        for c in [4, 2] {
            for w in [4, 2, 0] {
                want.push(at(b, c, w));
            }
        }
    }
    assert_eq!(outs[0], want);
    let mut want = vec![];
    for b in 0..2 {
        for c in [2, 3, 4, 5, 0, 1] {
            for w in 0..5 {
                want.push(at(b, c, w));
            }
        }
    }
    assert_eq!(outs[1], want);
    let mut want = vec![];
    for w in 0..5 {
        for b in 0..2 {
            for c in 0..6 {
                want.push(at(b, c, w));
            }
        }
    }
    assert_eq!(outs[2], want);
    let mut want = vec![];
    for b in 0..2 {
        for c in 0..6 {
            for w in [4, 0] {
                want.push(at(b, c, w));
            }
        }
    }
    assert_eq!(outs[3], want);
}

#[test]
fn resize_modes_match_onnx_formulas() {
    let x = data(2 * 3 * 4, 11);
    let mut m = ModelBuilder::new(13);
    m.input("x", &[1, 2, 3, 4])
        .init_f32("scales", &[4], &[1.0, 1.0, 2.0, 2.0])
        .init_i64("sizes", &[4], &[1, 2, 5, 7]);
    m.node(
        "Resize",
        &["x", "", "scales"],
        &["nn"],
        vec![
            attr_s("mode", "nearest"),
            attr_s("coordinate_transformation_mode", "asymmetric"),
            attr_s("nearest_mode", "floor"),
        ],
    );
    m.node(
        "Resize",
        &["x", "", "", "sizes"],
        &["lin"],
        vec![attr_s("mode", "linear")],
    );
    m.output("nn").output("lin");
    let outs = run(&m, &[("x", &x)], HashMap::new(), 1);
    let at = |c: usize, y: usize, xx: usize| x[(c * 3 + y) * 4 + xx];
    let mut want = vec![];
    for c in 0..2 {
        for y in 0..6 {
            for xx in 0..8 {
                want.push(at(c, y / 2, xx / 2));
            }
        }
    }
    assert_eq!(outs[0], want);
    // Linear, half_pixel (the default), sizes 5x7 from 3x4.
    let coord = |o: usize, scale: f32, len: usize| -> (usize, usize, f32) {
        let s = ((o as f32 + 0.5) / scale - 0.5).clamp(0.0, (len - 1) as f32);
        let i0 = s.floor() as usize;
        let i1 = (i0 + 1).min(len - 1);
        (i0, i1, s - i0 as f32)
    };
    let mut want = vec![];
    for c in 0..2 {
        for y in 0..5 {
            let (y0, y1, fy) = coord(y, 5.0 / 3.0, 3);
            for xx in 0..7 {
                let (x0, x1, fx) = coord(xx, 7.0 / 4.0, 4);
                let top = at(c, y0, x0) * (1.0 - fx) + at(c, y0, x1) * fx;
                let bot = at(c, y1, x0) * (1.0 - fx) + at(c, y1, x1) * fx;
                want.push(top * (1.0 - fy) + bot * fy);
            }
        }
    }
    assert_close(&outs[1], &want, 1e-5);
}

#[test]
fn pooling_and_reductions() {
    let x = data(2 * 5 * 5, 12);
    let mut m = ModelBuilder::new(13);
    m.input("x", &[1, 2, 5, 5]);
    m.node(
        "MaxPool",
        &["x"],
        &["mp"],
        vec![
            attr_ints("kernel_shape", &[2, 2]),
            attr_ints("strides", &[2, 2]),
            attr_i("ceil_mode", 1),
        ],
    );
    m.node(
        "AveragePool",
        &["x"],
        &["ap"],
        vec![
            attr_ints("kernel_shape", &[3, 3]),
            attr_ints("pads", &[1, 1, 1, 1]),
            attr_i("count_include_pad", 1),
        ],
    );
    m.node("GlobalAveragePool", &["x"], &["gap"], vec![]);
    m.node(
        "ReduceMean",
        &["x"],
        &["rm"],
        vec![attr_ints("axes", &[1]), attr_i("keepdims", 0)],
    );
    for o in ["mp", "ap", "gap", "rm"] {
        m.output(o);
    }
    let outs = run(&m, &[("x", &x)], HashMap::new(), 2);
    let at = |c: usize, y: isize, xx: isize| -> Option<f32> {
        (y >= 0 && xx >= 0 && y < 5 && xx < 5).then(|| x[(c * 5 + y as usize) * 5 + xx as usize])
    };
    let mut mp = vec![];
    let mut ap = vec![];
    for c in 0..2 {
        for oy in 0..3 {
            for ox in 0..3 {
                let vals: Vec<f32> = (0..2)
                    .flat_map(|dy| (0..2).filter_map(move |dx| at(c, oy * 2 + dy, ox * 2 + dx)))
                    .collect();
                mp.push(vals.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
            }
        }
        for oy in 0..5isize {
            for ox in 0..5isize {
                let s: f32 = (-1..=1)
                    .flat_map(|dy| (-1..=1).filter_map(move |dx| at(c, oy + dy, ox + dx)))
                    .sum();
                ap.push(s / 9.0);
            }
        }
    }
    assert_close(&outs[0], &mp, 0.0);
    assert_close(&outs[1], &ap, 1e-5);
    let gap: Vec<f32> = (0..2)
        .map(|c| x[c * 25..(c + 1) * 25].iter().sum::<f32>() / 25.0)
        .collect();
    assert_close(&outs[2], &gap, 1e-5);
    let rm: Vec<f32> = (0..25).map(|i| (x[i] + x[25 + i]) / 2.0).collect();
    assert_close(&outs[3], &rm, 1e-6);
}

#[test]
fn gemm_matmul_softmax() {
    let (mm, k, n) = (3, 5, 4);
    let a = data(mm * k, 13);
    let b = data(n * k, 14);
    let c = data(n, 15);
    let mut m = ModelBuilder::new(13);
    m.input("x", &[mm as i64, k as i64])
        .init_f32("b", &[n, k], &b)
        .init_f32("c", &[n], &c)
        .init_f32("bt", &[k, n], &b);
    m.node(
        "Gemm",
        &["x", "b", "c"],
        &["g"],
        vec![
            attr_i("transB", 1),
            attr_f("alpha", 0.5),
            attr_f("beta", 2.0),
        ],
    );
    m.node("MatMul", &["x", "bt"], &["mm"], vec![]);
    m.node("MatMul", &["g", "g2"], &["rr"], vec![]);
    m.node("Transpose", &["g"], &["g2"], vec![]);
    m.node("Softmax", &["mm"], &["sm"], vec![]);
    m.output("g").output("mm").output("sm");
    // Nodes out of order (rr before g2) must be rejected, not mis-run.
    let err = import(&m.to_bytes(), &HashMap::new()).unwrap_err();
    assert!(
        err.to_string().contains("not produced by any earlier node"),
        "{err}"
    );
    let mut m = ModelBuilder::new(13);
    m.input("x", &[mm as i64, k as i64])
        .init_f32("b", &[n, k], &b)
        .init_f32("c", &[n], &c)
        .init_f32("bt", &[k, n], &b);
    m.node(
        "Gemm",
        &["x", "b", "c"],
        &["g"],
        vec![
            attr_i("transB", 1),
            attr_f("alpha", 0.5),
            attr_f("beta", 2.0),
        ],
    );
    m.node("MatMul", &["x", "bt"], &["mm"], vec![]);
    m.node("Transpose", &["g"], &["g2"], vec![]);
    m.node("MatMul", &["g", "g2"], &["rr"], vec![]);
    m.node("Softmax", &["mm"], &["sm"], vec![]);
    m.output("g").output("mm").output("sm").output("rr");
    let outs = run(&m, &[("x", &a)], HashMap::new(), 2);
    let mut g = vec![0.0; mm * n];
    let mut p = vec![0.0; mm * n];
    for i in 0..mm {
        for j in 0..n {
            let dot_t: f32 = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum();
            let dot: f32 = (0..k).map(|t| a[i * k + t] * b[t * n + j]).sum();
            g[i * n + j] = 0.5 * dot_t + 2.0 * c[j];
            p[i * n + j] = dot;
        }
    }
    assert_close(&outs[0], &g, 1e-5);
    assert_close(&outs[1], &p, 1e-5);
    let mut sm = p.clone();
    for row in sm.chunks_mut(n) {
        let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let s: f32 = row.iter().map(|v| (v - mx).exp()).sum();
        row.iter_mut().for_each(|v| *v = (*v - mx).exp() / s);
    }
    assert_close(&outs[2], &sm, 1e-5);
    let mut rr = vec![0.0; mm * mm];
    for i in 0..mm {
        for j in 0..mm {
            rr[i * mm + j] = (0..n).map(|t| g[i * n + t] * g[j * n + t]).sum();
        }
    }
    assert_close(&outs[3], &rr, 1e-4);
}

/// A one-row `Gemm` (a classifier head at batch 1) runs as a matrix-vector
/// product: both weight orientations, alpha, beta and a per-column bias.
#[test]
fn one_row_gemm_is_a_matrix_vector_product() {
    let (k, n) = (37, 21);
    let a = data(k, 21);
    let b = data(n * k, 22);
    let c = data(n, 23);
    let bt: Vec<f32> = (0..k * n).map(|i| b[(i % n) * k + i / n]).collect();
    for trans_b in [1, 0] {
        let mut m = ModelBuilder::new(13);
        m.input("x", &[1, k as i64]).init_f32("c", &[n], &c);
        if trans_b == 1 {
            m.init_f32("b", &[n, k], &b);
        } else {
            m.init_f32("b", &[k, n], &bt);
        }
        m.node(
            "Gemm",
            &["x", "b", "c"],
            &["y"],
            vec![
                attr_i("transB", trans_b),
                attr_f("alpha", 0.5),
                attr_f("beta", 2.0),
            ],
        );
        m.output("y");
        let y = run1(&m, &a);
        let want: Vec<f32> = (0..n)
            .map(|j| 0.5 * (0..k).map(|t| a[t] * b[j * k + t]).sum::<f32>() + 2.0 * c[j])
            .collect();
        assert_close(&y, &want, 1e-5);
    }
}

#[test]
fn softmax_axis_semantics_differ_by_opset() {
    let x = data(2 * 3 * 4, 16);
    let build = |opset: i64| {
        let mut m = ModelBuilder::new(opset);
        m.input("x", &[2, 3, 4]);
        m.node("Softmax", &["x"], &["y"], vec![attr_i("axis", 1)])
            .output("y");
        m
    };
    let legacy = run1(&build(11), &x);
    let modern = run1(&build(13), &x);
    // opset 11: softmax over the 12 trailing values per batch; opset 13: over axis 1 only.
    for b in 0..2 {
        let s: f32 = legacy[b * 12..(b + 1) * 12].iter().sum();
        assert!((s - 1.0).abs() < 1e-5);
        for w in 0..4 {
            let s: f32 = (0..3).map(|c| modern[b * 12 + c * 4 + w]).sum();
            assert!((s - 1.0).abs() < 1e-5);
        }
    }
}

#[test]
fn pad_modes_and_constant_nodes() {
    let x = data(3 * 4, 17);
    let mut m = ModelBuilder::new(13);
    m.input("x", &[1, 1, 3, 4]);
    m.node(
        "Constant",
        &[],
        &["pads"],
        vec![attr_t(
            "value",
            osprey_engine::onnx::proto::TensorProto {
                dims: vec![8],
                data_type: Some(7),
                int64_data: vec![0, 0, 1, 2, 0, 0, 1, 0],
                ..Default::default()
            },
        )],
    );
    m.node(
        "Constant",
        &[],
        &["v"],
        vec![attr_t("value", tensor_f32("v", &[], &[9.0]))],
    );
    m.node(
        "Pad",
        &["x", "pads"],
        &["r"],
        vec![attr_s("mode", "reflect")],
    );
    m.node("Pad", &["x", "pads", "v"], &["c"], vec![]);
    m.output("r").output("c");
    let outs = run(&m, &[("x", &x)], HashMap::new(), 1);
    let refl = |i: isize, n: isize| -> usize {
        (if i < 0 {
            -i
        } else if i >= n {
            2 * (n - 1) - i
        } else {
            i
        }) as usize
    };
    let mut r = vec![];
    let mut c = vec![];
    for y in -1..4isize {
        for xx in -2..4isize {
            r.push(x[refl(y, 3) * 4 + refl(xx, 4)]);
            c.push(if (0..3).contains(&y) && (0..4).contains(&xx) {
                x[y as usize * 4 + xx as usize]
            } else {
                9.0
            });
        }
    }
    assert_eq!(outs[0], r);
    assert_eq!(outs[1], c);
}

// ---- bad input -------------------------------------------------------------

fn small_model() -> ModelBuilder {
    let mut m = ModelBuilder::new(13);
    m.input("x", &[1, 2, 4, 4])
        .init_f32("w", &[3, 2, 1, 1], &data(6, 1));
    m.node("Conv", &["x", "w"], &["y"], vec![]).output("y");
    m
}

#[test]
fn truncated_and_garbage_models_are_decode_errors() {
    let bytes = small_model().to_bytes();
    for cut in [1, bytes.len() / 3, bytes.len() - 1] {
        match import(&bytes[..cut], &HashMap::new()) {
            Err(EngineError::Decode(_)) | Err(EngineError::Model(_)) => {}
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
    assert!(import(b"definitely not onnx", &HashMap::new()).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn corrupted_models_never_panic(pos in 0usize..10_000, byte: u8, cut in 0usize..10_000) {
        let mut bytes = small_model().to_bytes();
        let n = bytes.len();
        bytes[pos % n] = byte;
        bytes.truncate(n - cut % n);
        if let Ok(g) = import(&bytes, &HashMap::new()) {
            let _ = Engine::new(g);
        }
    }
}

#[test]
fn every_unsupported_op_is_listed() {
    let mut m = ModelBuilder::new(13);
    m.input("x", &[1, 4]);
    m.node("LSTM", &["x"], &["a"], vec![]);
    m.node("Relu", &["a"], &["b"], vec![]);
    m.node("NonMaxSuppression", &["b"], &["c"], vec![]);
    m.output("c");
    let e = import(&m.to_bytes(), &HashMap::new()).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, EngineError::Unsupported { count: 2, .. }),
        "{msg}"
    );
    assert!(msg.contains("'LSTM' (node 'lstm_0', opset 13)"), "{msg}");
    assert!(
        msg.contains("'NonMaxSuppression' (node 'nonmaxsuppression_2', opset 13)"),
        "{msg}"
    );
}

#[test]
fn bad_shapes_and_values_are_typed_errors() {
    let g = import(&small_model().to_bytes(), &HashMap::new()).unwrap();
    let mut ctx = ExecutionContext::new(Arc::new(Engine::new(g).unwrap()), 1);
    assert!(
        matches!(ctx.run(), Err(EngineError::Input { .. })),
        "running before inputs are set"
    );
    assert!(matches!(
        ctx.set_input("x", &[0.0; 5]),
        Err(EngineError::Input { .. })
    ));
    assert!(matches!(
        ctx.set_input("nope", &[0.0; 32]),
        Err(EngineError::Input { .. })
    ));
    let mut v = vec![0.5; 32];
    v[7] = f32::NAN;
    let e = ctx.set_input("x", &v).unwrap_err().to_string();
    assert!(e.contains("index 7"), "{e}");
    ctx.set_input("x", &[0.5; 32]).unwrap();
    ctx.run().unwrap();

    // A conv whose weights do not fit the input channels.
    let mut m = ModelBuilder::new(13);
    m.input("x", &[1, 3, 4, 4])
        .init_f32("w", &[3, 2, 1, 1], &data(6, 1));
    m.node("Conv", &["x", "w"], &["y"], vec![]).output("y");
    let e = import(&m.to_bytes(), &HashMap::new()).unwrap_err();
    assert!(matches!(e, EngineError::Node { .. }), "{e}");
    assert!(e.to_string().contains("conv_0"), "{e}");
}

#[test]
fn dynamic_inputs_need_a_shape() {
    let mut m = ModelBuilder::new(13);
    m.input("x", &[-1, 2, -1, -1])
        .init_f32("w", &[3, 2, 1, 1], &data(6, 1));
    m.node("Conv", &["x", "w"], &["y"], vec![]).output("y");
    let e = import(&m.to_bytes(), &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("--input-shape x="), "{e}");
    let mut shapes = HashMap::new();
    shapes.insert("x".to_string(), vec![1, 3, 4, 4]);
    let e = import(&m.to_bytes(), &shapes).unwrap_err().to_string();
    assert!(e.contains("conflicts"), "{e}");
    shapes.insert("x".to_string(), vec![2, 2, 3, 5]);
    let x = data(2 * 2 * 15, 3);
    let out = run(&m, &[("x", &x)], shapes, 1);
    assert_eq!(out[0].len(), 2 * 3 * 15);
}
