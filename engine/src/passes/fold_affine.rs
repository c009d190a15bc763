//! A constant scale or shift right after a convolution folded into its
//! weights and bias: `conv(x, W) · s = conv(x, W·s)` with bias `b·s`, and
//! `conv(x, W) + t` has bias `b + t`, for `s`, `t` scalars or one value per
//! output channel (`[c, 1, 1]`, `[1, c, 1, 1]`). PP-OCR's "learnable affine
//! blocks" write exactly this after every convolution.
//!
//! The same blocks also follow activations. There the affine folds
//! forward instead, into the convolution that reads it, when that
//! convolution has no padding (every tap reads real data, so
//! `conv(a·x + b, W) = conv(x, W·a) + Σ W·b` exactly): a scale `a` per input
//! channel multiplies the weights, a shift `b` adds `Σ_taps W·b` to the bias.

use super::{consumers, conv_params, is_output, remove_nodes, set_conv_params};
use crate::ir::{ConstData, Graph, Op, TensorId};
use osprey_kernels::eltwise::BinaryOp;
use osprey_kernels::Activation;

/// Folds every foldable `Conv → Mul/Add/Sub/Div(constant)`. Returns how many.
pub fn fold_affine(g: &mut Graph) -> usize {
    let mut folded = 0;
    // Chains (Mul then Add) fold one link per sweep.
    loop {
        let n = fold_once(g);
        if n == 0 {
            return folded;
        }
        folded += n;
    }
}

fn fold_once(g: &mut Graph) -> usize {
    fold_backward(g) + fold_forward(g)
}

/// Per-channel values of constant `t` for `c` channels (a scalar repeats),
/// if it is a scalar or `[c, 1, 1]` / `[1, c, 1, 1]`.
fn channel_values(g: &Graph, t: TensorId, c: usize) -> Option<Vec<f32>> {
    let Some(ConstData::F32(k)) = &g.tensors[t].value else {
        return None;
    };
    let ks = &g.tensors[t].shape;
    let mut s4 = vec![1usize; 4usize.saturating_sub(ks.len())];
    s4.extend_from_slice(ks);
    if k.len() == 1 {
        Some(vec![k[0]; c])
    } else if ks.len() <= 4 && s4 == [1, c, 1, 1] {
        Some(k.clone())
    } else {
        None
    }
}

/// `Mul(x, a)` / `Add(x, b)` (constants per channel) read only by a
/// convolution without padding: folded into that convolution.
fn fold_forward(g: &mut Graph) -> usize {
    let mut folded = 0;
    let mut dead = vec![false; g.nodes.len()];
    let cons = consumers(g);
    for ei in 0..g.nodes.len() {
        let Op::Binary(op @ (BinaryOp::Mul | BinaryOp::Add)) = g.nodes[ei].op else {
            continue;
        };
        if dead[ei] {
            continue;
        }
        let out = g.nodes[ei].outputs[0];
        if cons[out].len() != 1 || is_output(g, out) {
            continue;
        }
        let ci = cons[out][0];
        let Op::Conv(attrs) = g.nodes[ci].op else {
            continue;
        };
        if dead[ci]
            || attrs.pads != [0; 4]
            || attrs.channels_last
            || attrs.int8_input_scale.is_some()
            || attrs.int8_read_scale.is_some()
            || g.nodes[ci].inputs[0] != out
            || g.nodes[ci].inputs.iter().skip(1).any(|&t| t == out)
        {
            continue;
        }
        let (a, b) = (g.nodes[ei].inputs[0], g.nodes[ei].inputs[1]);
        let (x, k) = if g.tensors[b].is_const() {
            (a, b)
        } else {
            (b, a)
        };
        let c_in = g.tensors[out].shape.get(1).copied().unwrap_or(0);
        let Some(k) = channel_values(g, k, c_in) else {
            continue;
        };
        if g.tensors[x].is_const() || g.tensors[x].shape != g.tensors[out].shape {
            continue;
        }
        let Some((mut w, mut bias)) = conv_params(g, ci) else {
            continue;
        };
        let ws = &g.tensors[g.nodes[ci].inputs[1]].shape;
        let (c_out, cin_g) = (ws[0], ws[1]);
        let groups = attrs.groups.max(1);
        if c_out == 0 || cin_g * groups != c_in {
            continue;
        }
        let taps = w.len() / (c_out * cin_g);
        let cout_g = c_out / groups;
        for co in 0..c_out {
            for j in 0..cin_g {
                let ch = (co / cout_g) * cin_g + j;
                let row = &mut w[(co * cin_g + j) * taps..(co * cin_g + j + 1) * taps];
                match op {
                    BinaryOp::Mul => row.iter_mut().for_each(|v| *v *= k[ch]),
                    _ => bias[co] += row.iter().sum::<f32>() * k[ch],
                }
            }
        }
        set_conv_params(g, ci, w, bias, "affine_in");
        let onnx = g.nodes[ei].onnx_op.clone();
        let conv = &mut g.nodes[ci];
        conv.inputs[0] = x;
        conv.onnx_op = format!("{onnx}+{}", conv.onnx_op);
        dead[ei] = true;
        folded += 1;
    }
    remove_nodes(g, &dead);
    folded
}

/// `Conv → Mul/Add/Sub/Div(constant)`: folded into the convolution.
fn fold_backward(g: &mut Graph) -> usize {
    let mut folded = 0;
    let mut dead = vec![false; g.nodes.len()];
    let cons = consumers(g);
    for ci in 0..g.nodes.len() {
        let Op::Conv(attrs) = g.nodes[ci].op else {
            continue;
        };
        // Preconditions: a plain convolution (no fused activation or
        // residual; NCHW), read only by one element-wise op with a
        // constant, not a graph output, weights and bias constant.
        if attrs.residual
            || attrs.activation != Activation::None
            || attrs.channels_last
            || attrs.int8_input_scale.is_some()
            || attrs.int8_read_scale.is_some()
            || dead[ci]
        {
            continue;
        }
        let y = g.nodes[ci].outputs[0];
        if cons[y].len() != 1 || is_output(g, y) {
            continue;
        }
        let ei = cons[y][0];
        let Op::Binary(op) = g.nodes[ei].op else {
            continue;
        };
        let e = &g.nodes[ei];
        let (other, conv_first) = match (e.inputs[0] == y, e.inputs[1] == y) {
            (true, false) => (e.inputs[1], true),
            (false, true) => (e.inputs[0], false),
            _ => continue,
        };
        // Sub and Div only with the convolution on the left.
        let op = match (op, conv_first) {
            (BinaryOp::Mul | BinaryOp::Add, _) => op,
            (BinaryOp::Sub | BinaryOp::Div, true) => op,
            _ => continue,
        };
        let c_out = g.tensors[g.nodes[ci].inputs[1]].shape[0];
        let Some(k) = channel_values(g, other, c_out) else {
            continue;
        };
        if g.tensors[e.outputs[0]].shape != g.tensors[y].shape {
            continue;
        }
        let Some((mut w, mut b)) = conv_params(g, ci) else {
            continue;
        };
        let per = w.len() / c_out.max(1);
        for (co, &v) in k.iter().enumerate() {
            match op {
                BinaryOp::Mul | BinaryOp::Div => {
                    let s = if op == BinaryOp::Mul { v } else { 1.0 / v };
                    w[co * per..(co + 1) * per].iter_mut().for_each(|x| *x *= s);
                    b[co] *= s;
                }
                BinaryOp::Add => b[co] += v,
                _ => b[co] -= v,
            }
        }
        set_conv_params(g, ci, w, b, "affine");
        let out = g.nodes[ei].outputs[0];
        let onnx = g.nodes[ei].onnx_op.clone();
        let conv = &mut g.nodes[ci];
        conv.outputs[0] = out;
        conv.onnx_op = format!("{}+{onnx}", conv.onnx_op);
        dead[ei] = true;
        folded += 1;
    }
    // The folded element-wise node comes after its convolution; moving the
    // convolution's output to the element-wise output keeps the order valid
    // because nothing between them could read it (single consumer).
    remove_nodes(g, &dead);
    folded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{attr_ints, ModelBuilder};
    use crate::passes::test_util::*;

    fn model(k_shape: &[usize], ops: &[&str], extra_reader: bool) -> ModelBuilder {
        let mut m = ModelBuilder::new(13);
        m.input("x", &[1, 3, 6, 6]);
        m.init_f32("w", &[4, 3, 3, 3], &data(108, 1));
        m.init_f32("b", &[4], &data(4, 2));
        m.node(
            "Conv",
            &["x", "w", "b"],
            &["c0"],
            vec![attr_ints("pads", &[1, 1, 1, 1])],
        );
        let n: usize = k_shape.iter().product();
        for (i, op) in ops.iter().enumerate() {
            let k = format!("k{i}");
            let vals: Vec<f32> = data(n, 10 + i as u64).iter().map(|v| v + 1.5).collect();
            m.init_f32(&k, k_shape, &vals);
            m.node(
                op,
                &[&format!("c{i}"), &k],
                &[&format!("c{}", i + 1)],
                vec![],
            );
        }
        m.node("Relu", &[&format!("c{}", ops.len())], &["y"], vec![]);
        m.output("y");
        if extra_reader {
            m.node("Neg", &["c0"], &["z"], vec![]);
            m.output("z");
        }
        m
    }

    #[test]
    fn scalar_and_per_channel_chains_fold_into_the_convolution() {
        for k_shape in [&[1usize][..], &[4, 1, 1], &[1, 4, 1, 1]] {
            let mut g = import(&model(k_shape, &["Mul", "Add", "Div", "Sub"], false));
            assert_eq!(ops(&g), ["Conv", "Mul", "Add", "Div", "Sub", "Relu"]);
            let x = data(108, 3);
            let before = run(g.clone(), &x);
            assert_eq!(fold_affine(&mut g), 4);
            assert_eq!(ops(&g), ["Conv", "Relu"]);
            assert_same(&run(g, &x), &before);
        }
    }

    #[test]
    fn preconditions_that_fail_leave_the_graph_alone() {
        // The convolution's output has a second reader.
        let mut g = import(&model(&[1], &["Mul"], true));
        assert_eq!(fold_affine(&mut g), 0);
        // A spatially varying constant is not an affine of the channels.
        let mut g = import(&model(&[1, 1, 6, 6], &["Add"], false));
        assert_eq!(fold_affine(&mut g), 0);
        // k / conv is not a scale of the convolution.
        let mut m = ModelBuilder::new(13);
        m.input("x", &[1, 3, 6, 6]);
        m.init_f32("w", &[4, 3, 1, 1], &data(12, 1));
        m.init_f32("k", &[1], &[2.0]);
        m.node("Conv", &["x", "w"], &["c"], vec![]);
        m.node("Div", &["k", "c"], &["y"], vec![]);
        m.output("y");
        let mut g = import(&m);
        assert_eq!(fold_affine(&mut g), 0);
        assert_eq!(ops(&g), ["Conv", "Div"]);
    }

    /// Scale and shift (scalar and per channel) in front of convolutions
    /// without padding fold into them; in front of a padded one they stay
    /// (the padding would see the shift).
    #[test]
    fn an_affine_folds_forward_into_an_unpadded_reader() {
        for (k, groups, pad, folds) in [
            (1usize, 1usize, 0i64, 2usize),
            (3, 1, 0, 2),
            (3, 4, 0, 2),
            (3, 4, 1, 0),
        ] {
            for per_channel in [false, true] {
                let mut m = ModelBuilder::new(13);
                m.input("x", &[1, 4, 7, 7]);
                let kshape: &[usize] = if per_channel { &[1, 4, 1, 1] } else { &[1] };
                let n = kshape.iter().product();
                m.init_f32(
                    "s",
                    kshape,
                    &data(n, 4).iter().map(|v| v + 1.5).collect::<Vec<_>>(),
                );
                m.init_f32("t", kshape, &data(n, 5));
                m.init_f32(
                    "w",
                    &[8, 4 / groups, k, k],
                    &data(8 * 4 / groups * k * k, 6),
                );
                m.init_f32("b", &[8], &data(8, 7));
                m.node("Relu", &["x"], &["r"], vec![]);
                m.node("Mul", &["s", "r"], &["m"], vec![]);
                m.node("Add", &["m", "t"], &["a"], vec![]);
                let groups = groups as i64;
                m.node(
                    "Conv",
                    &["a", "w", "b"],
                    &["y"],
                    vec![
                        attr_ints("pads", &[pad, pad, pad, pad]),
                        crate::onnx::builder::attr_i("group", groups),
                    ],
                );
                m.output("y");
                let mut g = import(&m);
                let x = data(196, 8);
                let before = run(g.clone(), &x);
                assert_eq!(
                    fold_affine(&mut g),
                    folds,
                    "k {k} groups {groups} pad {pad}"
                );
                let want: &[&str] = if folds > 0 {
                    &["Relu", "Conv"]
                } else {
                    &["Relu", "Mul", "Add", "Conv"]
                };
                assert_eq!(ops(&g), want);
                assert_same(&run(g, &x), &before);
            }
        }
    }
}
