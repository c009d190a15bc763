//! BatchNormalization folded into the convolution (or Gemm) that feeds it:
//! `BN(conv(x, W) + b) = conv(x, W·s) + (b − μ)·s + β` with `s = γ/√(σ² + ε)`
//! per output channel.

use super::{consumers, is_output, producer, remove_nodes};
use crate::ir::{ConstData, DType, Graph, Op, Tensor, TensorId};

fn const_f32(g: &Graph, t: TensorId) -> Option<Vec<f32>> {
    g.tensors[t].value.as_ref().map(ConstData::to_f32)
}

/// Folds every foldable BatchNormalization. Returns how many.
pub fn fold_batchnorm(g: &mut Graph) -> usize {
    let mut folded = 0;
    let mut dead = vec![false; g.nodes.len()];
    let cons = consumers(g);
    for bi in 0..g.nodes.len() {
        let Op::BatchNorm { epsilon } = g.nodes[bi].op else {
            continue;
        };
        let x = g.nodes[bi].inputs[0];
        // Preconditions: produced by a plain Conv (no fused activation or
        // residual), read only by this BN, not a graph output, every
        // parameter constant with one value per output channel.
        let Some(ci) = producer(g, x) else { continue };
        if let Op::Gemm { .. } = g.nodes[ci].op {
            if cons[x].len() == 1
                && !is_output(g, x)
                && !dead[ci]
                && fold_into_gemm(g, ci, bi, epsilon)
            {
                dead[bi] = true;
                folded += 1;
            }
            continue;
        }
        let Op::Conv(attrs) = g.nodes[ci].op else {
            continue;
        };
        // (A channels-last convolution's BatchNorm would scale another axis.)
        if attrs.residual
            || attrs.activation != osprey_kernels::Activation::None
            || attrs.channels_last
        {
            continue;
        }
        if cons[x].len() != 1 || is_output(g, x) || dead[ci] {
            continue;
        }
        let params: Option<Vec<Vec<f32>>> = g.nodes[bi].inputs[1..5]
            .iter()
            .map(|&t| const_f32(g, t))
            .collect();
        let Some(p) = params else { continue };
        let Some((w, bias)) = super::conv_params(g, ci) else {
            continue;
        };
        let c_out = g.tensors[g.nodes[ci].inputs[1]].shape[0];
        if p.iter().any(|v| v.len() != c_out) || c_out == 0 {
            continue;
        }
        let (gamma, beta, mean, var) = (&p[0], &p[1], &p[2], &p[3]);
        let per = w.len() / c_out;
        let mut w2 = w.clone();
        let mut b2 = vec![0.0; c_out];
        for co in 0..c_out {
            let s = gamma[co] / (var[co] + epsilon).sqrt();
            w2[co * per..(co + 1) * per]
                .iter_mut()
                .for_each(|v| *v *= s);
            b2[co] = (bias[co] - mean[co]) * s + beta[co];
        }
        super::set_conv_params(g, ci, w2, b2, "bn");
        let y = g.nodes[bi].outputs[0];
        let conv = &mut g.nodes[ci];
        conv.outputs[0] = y;
        conv.onnx_op = format!("{}+BatchNormalization", conv.onnx_op);
        dead[bi] = true;
        folded += 1;
    }
    remove_nodes(g, &dead);
    folded
}

/// `BN(alpha·A'B' + beta·C)` → `A'(B'·s) + ((beta·C − μ)·s + β)` per output
/// column. Returns false (graph untouched) when a precondition fails.
fn fold_into_gemm(g: &mut Graph, gi: usize, bi: usize, epsilon: f32) -> bool {
    let Op::Gemm {
        alpha,
        beta,
        trans_a,
        trans_b,
        int8_input_scale,
    } = g.nodes[gi].op
    else {
        return false;
    };
    let params: Option<Vec<Vec<f32>>> = g.nodes[bi].inputs[1..5]
        .iter()
        .map(|&t| const_f32(g, t))
        .collect();
    let Some(p) = params else { return false };
    let gemm = &g.nodes[gi];
    let out_shape = g.tensors[gemm.outputs[0]].shape.clone();
    let n = out_shape[1];
    if p.iter().any(|v| v.len() != n) {
        return false;
    }
    let Some(w) = const_f32(g, gemm.inputs[1]) else {
        return false;
    };
    let wshape = g.tensors[gemm.inputs[1]].shape.clone();
    // C must be absent or broadcast per column ([N], [1, N] or a scalar).
    let c: Vec<f32> = match gemm.inputs.get(2) {
        None => vec![0.0; n],
        Some(&ct) => {
            let Some(cv) = const_f32(g, ct) else {
                return false;
            };
            match cv.len() {
                1 => vec![cv[0]; n],
                len if len == n && g.tensors[ct].shape.iter().rev().skip(1).all(|&d| d == 1) => cv,
                _ => return false,
            }
        }
    };
    let (gamma, bb, mean, var) = (&p[0], &p[1], &p[2], &p[3]);
    let s: Vec<f32> = (0..n)
        .map(|j| gamma[j] / (var[j] + epsilon).sqrt())
        .collect();
    let mut w2 = w.clone();
    let k = w.len() / n.max(1);
    for j in 0..n {
        for kk in 0..k {
            // B' = B (trans_b: B is [N, K]) or Bᵀ (B is [K, N]).
            let idx = if trans_b { j * k + kk } else { kk * n + j };
            w2[idx] *= s[j];
        }
    }
    let c2: Vec<f32> = (0..n)
        .map(|j| (beta * c[j] - mean[j]) * s[j] + bb[j])
        .collect();
    let name = gemm.name.clone();
    let w_id = g.add_tensor(Tensor {
        name: format!("{name}:w_bn"),
        shape: wshape,
        dtype: DType::F32,
        value: Some(ConstData::F32(w2)),
    });
    let c_id = g.add_tensor(Tensor {
        name: format!("{name}:c_bn"),
        shape: vec![n],
        dtype: DType::F32,
        value: Some(ConstData::F32(c2)),
    });
    let y = g.nodes[bi].outputs[0];
    let gemm = &mut g.nodes[gi];
    gemm.op = Op::Gemm {
        alpha,
        beta: 1.0,
        trans_a,
        trans_b,
        int8_input_scale,
    };
    gemm.inputs.truncate(1);
    gemm.inputs.push(w_id);
    gemm.inputs.push(c_id);
    gemm.outputs[0] = y;
    gemm.onnx_op = format!("{}+BatchNormalization", gemm.onnx_op);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{attr_f, attr_ints, ModelBuilder};
    use crate::passes::test_util::*;

    fn conv_bn(extra_reader: bool, with_bias: bool) -> ModelBuilder {
        let mut m = ModelBuilder::new(13);
        m.input("x", &[1, 3, 6, 6]);
        m.init_f32("w", &[4, 3, 3, 3], &data(108, 1))
            .init_f32("b", &[4], &data(4, 2));
        m.init_f32("g", &[4], &[1.5, 0.5, -1.0, 2.0])
            .init_f32("be", &[4], &data(4, 3));
        m.init_f32("mu", &[4], &data(4, 4))
            .init_f32("var", &[4], &[0.5, 1.0, 2.0, 0.1]);
        let conv_in: &[&str] = if with_bias {
            &["x", "w", "b"]
        } else {
            &["x", "w"]
        };
        m.node(
            "Conv",
            conv_in,
            &["c"],
            vec![attr_ints("pads", &[1, 1, 1, 1])],
        );
        m.node(
            "BatchNormalization",
            &["c", "g", "be", "mu", "var"],
            &["y"],
            vec![attr_f("epsilon", 1e-3)],
        );
        m.output("y");
        if extra_reader {
            m.node("Relu", &["c"], &["z"], vec![]);
            m.output("z");
        }
        m
    }

    #[test]
    fn folds_into_conv_with_and_without_bias() {
        for with_bias in [true, false] {
            let mut g = import(&conv_bn(false, with_bias));
            assert_eq!(ops(&g), ["Conv", "BatchNormalization"]);
            let x = data(108, 9);
            let before = run(g.clone(), &x);
            assert_eq!(fold_batchnorm(&mut g), 1);
            assert_eq!(ops(&g), ["Conv"]);
            assert_same(&run(g, &x), &before);
        }
    }

    #[test]
    fn folds_into_gemm_for_both_weight_layouts() {
        for (trans_b, with_c) in [(true, true), (false, false), (true, false)] {
            let mut m = ModelBuilder::new(13);
            m.input("x", &[2, 5]);
            let wshape: &[usize] = if trans_b { &[3, 5] } else { &[5, 3] };
            m.init_f32("w", wshape, &data(15, 1))
                .init_f32("c", &[3], &data(3, 2));
            m.init_f32("g", &[3], &[1.5, -0.5, 2.0])
                .init_f32("be", &[3], &data(3, 3));
            m.init_f32("mu", &[3], &data(3, 4))
                .init_f32("var", &[3], &[0.5, 1.0, 2.0]);
            let ins: &[&str] = if with_c {
                &["x", "w", "c"]
            } else {
                &["x", "w"]
            };
            m.node(
                "Gemm",
                ins,
                &["y0"],
                vec![
                    crate::onnx::builder::attr_i("transB", trans_b as i64),
                    attr_f("alpha", 0.5),
                    attr_f("beta", 2.0),
                ],
            );
            m.node(
                "BatchNormalization",
                &["y0", "g", "be", "mu", "var"],
                &["y"],
                vec![],
            );
            m.output("y");
            let mut g = import(&m);
            assert_eq!(ops(&g), ["Gemm", "BatchNormalization"]);
            let x = data(10, 5);
            let before = run(g.clone(), &x);
            assert_eq!(fold_batchnorm(&mut g), 1);
            assert_eq!(ops(&g), ["Gemm"]);
            assert_same(&run(g, &x), &before);
        }
    }

    #[test]
    fn shared_conv_output_is_left_alone() {
        let mut g = import(&conv_bn(true, true));
        assert_eq!(fold_batchnorm(&mut g), 0);
        assert_eq!(ops(&g), ["Conv", "BatchNormalization", "Relu"]);
    }

    #[test]
    fn batchnorm_without_conv_is_left_alone() {
        let mut m = ModelBuilder::new(13);
        m.input("x", &[1, 2, 2, 2]);
        for (n, v) in [
            ("g", [1.0, 2.0]),
            ("b", [0.0, 1.0]),
            ("m", [0.5, 0.5]),
            ("v", [1.0, 1.0]),
        ] {
            m.init_f32(n, &[2], &v);
        }
        m.node("Relu", &["x"], &["r"], vec![]);
        m.node(
            "BatchNormalization",
            &["r", "g", "b", "m", "v"],
            &["y"],
            vec![],
        );
        m.output("y");
        let mut g = import(&m);
        assert_eq!(fold_batchnorm(&mut g), 0);
        assert_eq!(ops(&g), ["Relu", "BatchNormalization"]);
    }
}
