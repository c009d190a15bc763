//! Activation patterns written out in primitive ops become one activation,
//! which [`super::fuse_activation`] can then move into a convolution:
//! * SiLU: `x * Sigmoid(x)`,
//! * HardSwish: `x * HardSigmoid(x)` with alpha 1/6 and beta 1/2, and
//!   `x * Clip(x + 3, 0, 6) / 6` (or `· (1/6)`), as Paddle exports it.

use super::{consumers, is_output, producer, remove_nodes};
use crate::ir::{Graph, Op, TensorId};
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
    found += hardswish_from_clip(g, &cons, &mut dead);
    remove_nodes(g, &dead);
    found
}

/// The single scalar value of constant `t`, if it is one.
fn scalar(g: &Graph, t: TensorId) -> Option<f32> {
    match g.tensors[t].value.as_ref()?.to_f32()[..] {
        [v] => Some(v),
        _ => None,
    }
}

/// `x * Clip(x + 3, 0, 6) / 6` → `HardSwish(x)`: the last node becomes the
/// activation, the three before it die (each must have no other reader).
fn hardswish_from_clip(g: &mut Graph, cons: &[Vec<usize>], dead: &mut [bool]) -> usize {
    let mut found = 0;
    // The live producer of `t`, when `t` has no other reader.
    fn only_reader(g: &Graph, cons: &[Vec<usize>], t: TensorId, dead: &[bool]) -> Option<usize> {
        let p = producer(g, t)?;
        (cons[t].len() == 1 && !is_output(g, t) && !dead[p]).then_some(p)
    }
    for di in 0..g.nodes.len() {
        if dead[di] {
            continue;
        }
        let (a, b) = match &g.nodes[di].inputs[..] {
            &[a, b] => (a, b),
            _ => continue,
        };
        // The final scaling: `/ 6` or `· (1/6)`.
        let m = match (&g.nodes[di].op, scalar(g, b), scalar(g, a)) {
            (Op::Binary(BinaryOp::Div), Some(6.0), _) => a,
            (Op::Binary(BinaryOp::Mul), Some(k), _) if (k - 1.0 / 6.0).abs() < 1e-7 => a,
            (Op::Binary(BinaryOp::Mul), _, Some(k)) if (k - 1.0 / 6.0).abs() < 1e-7 => b,
            _ => continue,
        };
        let Some(mi) = only_reader(g, cons, m, dead) else {
            continue;
        };
        if g.nodes[mi].op != Op::Binary(BinaryOp::Mul) {
            continue;
        }
        let (p, q) = (g.nodes[mi].inputs[0], g.nodes[mi].inputs[1]);
        let mut hit = None;
        for (x, c) in [(p, q), (q, p)] {
            let Some(ci) = only_reader(g, cons, c, dead) else {
                continue;
            };
            if g.nodes[ci].op != Op::Unary(Activation::Clip { lo: 0.0, hi: 6.0 }) {
                continue;
            }
            let Some(ai) = only_reader(g, cons, g.nodes[ci].inputs[0], dead) else {
                continue;
            };
            let add = &g.nodes[ai];
            let plus3 = add.op == Op::Binary(BinaryOp::Add)
                && match &add.inputs[..] {
                    &[u, v] => {
                        (u == x && scalar(g, v) == Some(3.0))
                            || (v == x && scalar(g, u) == Some(3.0))
                    }
                    _ => false,
                };
            if plus3 {
                hit = Some((x, mi, ci, ai));
                break;
            }
        }
        let Some((x, mi, ci, ai)) = hit else { continue };
        if g.tensors[x].shape != g.tensors[g.nodes[di].outputs[0]].shape {
            continue;
        }
        let node = &mut g.nodes[di];
        node.op = Op::Unary(Activation::HardSwish);
        node.inputs = vec![x];
        node.onnx_op = format!("HardSwish({})", node.onnx_op);
        for i in [mi, ci, ai] {
            dead[i] = true;
        }
        found += 1;
    }
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

    /// Paddle's form, `x * Clip(x + 3, 0, 6) / 6`, after a convolution.
    #[test]
    fn clip_form_of_hardswish_is_recognised_then_fused() {
        for (last, k) in [("Div", 6.0f32), ("Mul", 1.0 / 6.0)] {
            let mut m = ModelBuilder::new(13);
            m.input("x", &[1, 3, 4, 4]);
            m.init_f32("w", &[5, 3, 1, 1], &data(15, 1));
            m.init_f32("three", &[], &[3.0]).init_f32("k", &[], &[k]);
            m.init_f32("lo", &[], &[0.0]).init_f32("hi", &[], &[6.0]);
            m.node("Conv", &["x", "w"], &["c"], vec![]);
            m.node("Add", &["c", "three"], &["a"], vec![]);
            m.node("Clip", &["a", "lo", "hi"], &["cl"], vec![]);
            m.node("Mul", &["c", "cl"], &["p"], vec![]);
            m.node(last, &["p", "k"], &["y"], vec![]);
            m.output("y");
            let mut g = import(&m);
            assert_eq!(ops(&g), ["Conv", "Add", "Clip", "Mul", last]);
            let x = data(48, 3);
            let before = run(g.clone(), &x);
            assert_eq!(recognize_activations(&mut g), 1);
            assert_eq!(fuse_activation(&mut g), 1);
            assert_eq!(ops(&g), ["Conv+HardSwish"]);
            assert_same(&run(g, &x), &before);
        }
        // + 2 instead of + 3 is not HardSwish.
        let mut m = ModelBuilder::new(13);
        m.input("x", &[1, 3, 4, 4]);
        m.init_f32("two", &[], &[2.0]).init_f32("six", &[], &[6.0]);
        m.init_f32("lo", &[], &[0.0]).init_f32("hi", &[], &[6.0]);
        m.node("Add", &["x", "two"], &["a"], vec![]);
        m.node("Clip", &["a", "lo", "hi"], &["cl"], vec![]);
        m.node("Mul", &["x", "cl"], &["p"], vec![]);
        m.node("Div", &["p", "six"], &["y"], vec![]);
        m.output("y");
        let mut g = import(&m);
        assert_eq!(recognize_activations(&mut g), 0);
    }
}
