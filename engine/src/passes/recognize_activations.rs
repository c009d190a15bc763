//! Activation patterns written out in primitive ops become one activation,
//! which [`super::fuse_activation`] can then move into a convolution:
//! * SiLU: `x * Sigmoid(x)`,
//! * HardSwish: `x * HardSigmoid(x)` with alpha 1/6 and beta 1/2.

use super::{consumers, is_output, producer, remove_nodes};
use crate::ir::{Graph, Op};
use osprey_kernels::eltwise::BinaryOp;
use osprey_kernels::Activation;

/// Rewrites recognised patterns. Returns how many.
pub fn recognize_activations(g: &mut Graph) -> usize {
    let mut found = 0;
    let mut dead = vec![false; g.nodes.len()];
    let cons = consumers(g);
    for mi in 0..g.nodes.len() {
        if g.nodes[mi].op != Op::Binary(BinaryOp::Mul) {
            continue;
        }
        let (a, b) = (g.nodes[mi].inputs[0], g.nodes[mi].inputs[1]);
        for (x, s) in [(a, b), (b, a)] {
            let Some(si) = producer(g, s) else { continue };
            if dead[si] || cons[s].len() != 1 || is_output(g, s) || g.nodes[si].inputs[0] != x {
                continue;
            }
            let act = match g.nodes[si].op {
                Op::Unary(Activation::Sigmoid) => Activation::Silu,
                Op::Unary(Activation::HardSigmoid { alpha, beta })
                    if (alpha - 1.0 / 6.0).abs() < 1e-6 && beta == 0.5 =>
                {
                    Activation::HardSwish
                }
                _ => continue,
            };
            if g.tensors[x].shape != g.tensors[g.nodes[mi].outputs[0]].shape {
                continue;
            }
            let node = &mut g.nodes[mi];
            node.op = Op::Unary(act);
            node.inputs = vec![x];
            node.onnx_op = format!(
                "{}*{}",
                node.onnx_op,
                if act == Activation::Silu {
                    "Sigmoid"
                } else {
                    "HardSigmoid"
                }
            );
            dead[si] = true;
            found += 1;
            break;
        }
    }
    remove_nodes(g, &dead);
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{attr_f, attr_ints, ModelBuilder};
    use crate::passes::{fuse_activation, test_util::*};

    fn model(gate: &str, alpha: f32, swap: bool) -> ModelBuilder {
        let mut m = ModelBuilder::new(13);
        m.input("x", &[1, 3, 4, 4]);
        m.init_f32("w", &[5, 3, 1, 1], &data(15, 1));
        m.node(
            "Conv",
            &["x", "w"],
            &["c"],
            vec![attr_ints("strides", &[1, 1])],
        );
        let attrs = if gate == "HardSigmoid" {
            vec![attr_f("alpha", alpha), attr_f("beta", 0.5)]
        } else {
            vec![]
        };
        m.node(gate, &["c"], &["s"], attrs);
        let ins: [&str; 2] = if swap { ["s", "c"] } else { ["c", "s"] };
        m.node("Mul", &ins, &["y"], vec![]);
        m.output("y");
        m
    }

    #[test]
    fn silu_and_hardswish_are_recognised_then_fused() {
        for (gate, swap, want) in [
            ("Sigmoid", false, "Conv+Silu"),
            ("HardSigmoid", true, "Conv+HardSwish"),
        ] {
            let mut g = import(&model(gate, 1.0 / 6.0, swap));
            assert_eq!(ops(&g), ["Conv", gate, "Mul"]);
            let x = data(48, 3);
            let before = run(g.clone(), &x);
            assert_eq!(recognize_activations(&mut g), 1);
            assert_eq!(fuse_activation(&mut g), 1);
            assert_eq!(ops(&g), [want]);
            assert_same(&run(g, &x), &before);
        }
    }

    #[test]
    fn other_hardsigmoid_parameters_are_not_hardswish() {
        let mut g = import(&model("HardSigmoid", 0.2, false));
        assert_eq!(recognize_activations(&mut g), 0);
        assert_eq!(ops(&g), ["Conv", "HardSigmoid", "Mul"]);
    }
}
