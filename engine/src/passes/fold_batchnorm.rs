//! BatchNormalization folded into the convolution that feeds it:
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
        let Op::Conv(attrs) = g.nodes[ci].op else {
            continue;
        };
        if attrs.residual || attrs.activation != osprey_kernels::Activation::None {
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
        let conv = &g.nodes[ci];
        let Some(w) = const_f32(g, conv.inputs[1]) else {
            continue;
        };
        let c_out = g.tensors[conv.inputs[1]].shape[0];
        if p.iter().any(|v| v.len() != c_out) || c_out == 0 {
            continue;
        }
        let bias = match conv.inputs.get(2) {
            Some(&b) => match const_f32(g, b) {
                Some(v) => v,
                None => continue,
            },
            None => vec![0.0; c_out],
        };
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
        let name = g.nodes[ci].name.clone();
        let wshape = g.tensors[conv.inputs[1]].shape.clone();
        let w_id = g.add_tensor(Tensor {
            name: format!("{name}:w_bn"),
            shape: wshape,
            dtype: DType::F32,
            value: Some(ConstData::F32(w2)),
        });
        let b_id = g.add_tensor(Tensor {
            name: format!("{name}:b_bn"),
            shape: vec![c_out],
            dtype: DType::F32,
            value: Some(ConstData::F32(b2)),
        });
        let y = g.nodes[bi].outputs[0];
        let conv = &mut g.nodes[ci];
        conv.inputs.truncate(1);
        conv.inputs.push(w_id);
        conv.inputs.push(b_id);
        conv.outputs[0] = y;
        conv.onnx_op = format!("{}+BatchNormalization", conv.onnx_op);
        dead[bi] = true;
        folded += 1;
    }
    remove_nodes(g, &dead);
    folded
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
