//! Conv + residual Add fusion: `Add(conv(x), r)` becomes one convolution whose
//! epilogue adds `r` (then any activation fused later), so the sum is formed
//! while the tile is still in registers.

use super::{consumers, is_output, producer, remove_nodes};
use crate::ir::{ConstData, DType, Graph, Op, Tensor};
use osprey_kernels::eltwise::BinaryOp;
use osprey_kernels::Activation;

/// Fuses residual additions into convolutions. Returns how many.
pub fn fuse_residual(g: &mut Graph) -> usize {
    let mut fused = 0;
    let mut dead = vec![false; g.nodes.len()];
    let cons = consumers(g);
    for ai in 0..g.nodes.len() {
        let Op::Binary(BinaryOp::Add) = g.nodes[ai].op else {
            continue;
        };
        let (a, b) = (g.nodes[ai].inputs[0], g.nodes[ai].inputs[1]);
        let y = g.nodes[ai].outputs[0];
        // Try the conv on either side; the other operand is the residual.
        for (c_t, r_t) in [(a, b), (b, a)] {
            if c_t == r_t {
                continue;
            }
            let Some(ci) = producer(g, c_t) else { continue };
            if dead[ci] || cons[c_t].len() != 1 || is_output(g, c_t) {
                continue;
            }
            let Op::Conv(attrs) = g.nodes[ci].op else {
                continue;
            };
            if attrs.residual || attrs.activation != Activation::None {
                continue;
            }
            // The residual must be a runtime tensor of exactly the output's
            // shape (no broadcasting), available when the conv runs.
            let r = &g.tensors[r_t];
            if r.is_const() || r.shape != g.tensors[c_t].shape || g.tensors[y].shape != r.shape {
                continue;
            }
            if let Some(rp) = producer(g, r_t) {
                if rp >= ci {
                    continue;
                }
            }
            if g.nodes[ci].inputs.len() < 3 {
                let c_out = g.tensors[c_t].shape[1];
                let name = format!("{}:zero_bias", g.nodes[ci].name);
                let zb = g.add_tensor(Tensor {
                    name,
                    shape: vec![c_out],
                    dtype: DType::F32,
                    value: Some(ConstData::F32(vec![0.0; c_out])),
                });
                g.nodes[ci].inputs.push(zb);
            }
            let conv = &mut g.nodes[ci];
            if let Op::Conv(a) = &mut conv.op {
                a.residual = true;
            }
            conv.inputs.push(r_t);
            conv.outputs[0] = y;
            conv.onnx_op = format!("{}+Add", conv.onnx_op);
            dead[ai] = true;
            fused += 1;
            break;
        }
    }
    remove_nodes(g, &dead);
    fused
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{attr_i, attr_ints, ModelBuilder};
    use crate::passes::{fuse_activation, test_util::*};

    /// x -> Relu -> r ; Conv(r) -> c ; Add(c, r) [or Add(r, c)] -> y (-> Relu)
    fn block(conv_first: bool, depthwise: bool, relu_after: bool) -> ModelBuilder {
        let mut m = ModelBuilder::new(13);
        m.input("x", &[1, 4, 5, 5]);
        m.node("Relu", &["x"], &["r"], vec![]);
        if depthwise {
            m.init_f32("w", &[4, 1, 3, 3], &data(36, 1));
            m.node(
                "Conv",
                &["r", "w"],
                &["c"],
                vec![attr_i("group", 4), attr_ints("pads", &[1, 1, 1, 1])],
            );
        } else {
            m.init_f32("w", &[4, 4, 3, 3], &data(144, 1))
                .init_f32("b", &[4], &data(4, 2));
            m.node(
                "Conv",
                &["r", "w", "b"],
                &["c"],
                vec![attr_ints("pads", &[1, 1, 1, 1])],
            );
        }
        let ins: [&str; 2] = if conv_first { ["c", "r"] } else { ["r", "c"] };
        m.node("Add", &ins, &["y"], vec![]);
        if relu_after {
            m.node("Relu", &["y"], &["z"], vec![]);
            m.output("z");
        } else {
            m.output("y");
        }
        m
    }

    #[test]
    fn fuses_either_operand_order_then_the_activation() {
        for (conv_first, dw) in [(true, false), (false, false), (true, true)] {
            let mut g = import(&block(conv_first, dw, true));
            assert_eq!(ops(&g), ["Relu", "Conv", "Add", "Relu"]);
            let x = data(100, 3);
            let before = run(g.clone(), &x);
            assert_eq!(fuse_residual(&mut g), 1);
            assert_eq!(ops(&g), ["Relu", "Conv+Add", "Relu"]);
            assert_eq!(fuse_activation(&mut g), 1);
            assert_eq!(ops(&g), ["Relu", "Conv+Add+Relu"]);
            assert_same(&run(g, &x), &before);
        }
    }

    #[test]
    fn broadcast_or_late_residuals_are_left_alone() {
        // Residual with a broadcast shape.
        let mut m = ModelBuilder::new(13);
        m.input("x", &[1, 4, 5, 5]);
        m.init_f32("w", &[4, 4, 1, 1], &data(16, 1))
            .init_f32("s", &[1, 4, 1, 1], &data(4, 2));
        m.node("Conv", &["x", "w"], &["c"], vec![]);
        m.node("Mul", &["x", "s"], &["small"], vec![]);
        m.node(
            "ReduceMean",
            &["small"],
            &["rm"],
            vec![attr_ints("axes", &[2, 3])],
        );
        m.node("Add", &["c", "rm"], &["y"], vec![]);
        m.output("y");
        let mut g = import(&m);
        assert_eq!(fuse_residual(&mut g), 0);
        // Residual computed after the conv.
        let mut m = ModelBuilder::new(13);
        m.input("x", &[1, 4, 5, 5]);
        m.init_f32("w", &[4, 4, 1, 1], &data(16, 1));
        m.node("Conv", &["x", "w"], &["c"], vec![]);
        m.node("Sigmoid", &["x"], &["late"], vec![]);
        m.node("Add", &["c", "late"], &["y"], vec![]);
        m.output("y");
        let mut g = import(&m);
        assert_eq!(fuse_residual(&mut g), 0);
        assert_eq!(ops(&g), ["Conv", "Sigmoid", "Add"]);
    }
}
