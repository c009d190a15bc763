//! Activation patterns written out in primitive ops become one activation,
//! which [`super::fuse_activation`] can then move into a convolution:
//! * SiLU: `x * Sigmoid(x)`,
//! * HardSwish: `x * HardSigmoid(x)` with alpha 1/6 and beta 1/2, and
//!   `x * Clip(x + 3, 0, 6) / 6` (or `· (1/6)`), as Paddle exports it,
//! * HardSwishScaled: `(x · k) * Clip(x + 3, 0, 6)` for a scalar `k`, as
//!   TensorFlow's MobileNetV3 exports write it (`k` an f16-rounded 1/6; the
//!   activation computes these ops in this order, so exactly).

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
    found += scaled_hardswish(g, &cons, &mut dead);
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
        let Some(mi) = sole_producer(g, cons, m, dead) else {
            continue;
        };
        if g.nodes[mi].op != Op::Binary(BinaryOp::Mul) {
            continue;
        }
        let (p, q) = (g.nodes[mi].inputs[0], g.nodes[mi].inputs[1]);
        let hit = [(p, q), (q, p)].into_iter().find_map(|(x, c)| {
            clip_of_x_plus_3(g, cons, c, x, dead).map(|(ci, ai)| (x, mi, ci, ai))
        });
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

/// The live producer of `t` when `t` has no other reader.
fn sole_producer(g: &Graph, cons: &[Vec<usize>], t: TensorId, dead: &[bool]) -> Option<usize> {
    let p = producer(g, t)?;
    (cons[t].len() == 1 && !is_output(g, t) && !dead[p]).then_some(p)
}

/// When `d` is `Clip(x + 3, 0, 6)` (either operand order of the Add), and
/// `d` and the sum each have no other reader: the Clip's and the Add's
/// nodes.
fn clip_of_x_plus_3(
    g: &Graph,
    cons: &[Vec<usize>],
    d: TensorId,
    x: TensorId,
    dead: &[bool],
) -> Option<(usize, usize)> {
    let ci = sole_producer(g, cons, d, dead)?;
    if g.nodes[ci].op != Op::Unary(Activation::Clip { lo: 0.0, hi: 6.0 }) {
        return None;
    }
    let ai = sole_producer(g, cons, g.nodes[ci].inputs[0], dead)?;
    let add = &g.nodes[ai];
    let plus3 = add.op == Op::Binary(BinaryOp::Add)
        && match &add.inputs[..] {
            &[u, v] => {
                (u == x && scalar(g, v) == Some(3.0)) || (v == x && scalar(g, u) == Some(3.0))
            }
            _ => false,
        };
    plus3.then_some((ci, ai))
}

/// `(x · k) * Clip(x + 3, 0, 6)` → `HardSwishScaled { k }(x)`: the last
/// node becomes the activation, the three before it die (each must have no
/// other reader).
fn scaled_hardswish(g: &mut Graph, cons: &[Vec<usize>], dead: &mut [bool]) -> usize {
    let mut found = 0;
    for di in 0..g.nodes.len() {
        if dead[di] || g.nodes[di].op != Op::Binary(BinaryOp::Mul) {
            continue;
        }
        let (p, q) = match &g.nodes[di].inputs[..] {
            &[p, q] => (p, q),
            _ => continue,
        };
        let mut hit = None;
        for (a, d) in [(p, q), (q, p)] {
            // a = x · k
            let Some(mi) = sole_producer(g, cons, a, dead) else {
                continue;
            };
            let scaled = match (&g.nodes[mi].op, &g.nodes[mi].inputs[..]) {
                (Op::Binary(BinaryOp::Mul), &[u, v]) => match (scalar(g, u), scalar(g, v)) {
                    (None, Some(k)) => Some((u, k)),
                    (Some(k), None) => Some((v, k)),
                    _ => None,
                },
                _ => None,
            };
            let Some((x, k)) = scaled else { continue };
            // d = Clip(x + 3, 0, 6)
            let Some((ci, ai)) = clip_of_x_plus_3(g, cons, d, x, dead) else {
                continue;
            };
            if k.is_finite() {
                hit = Some((x, k, mi, ci, ai));
                break;
            }
        }
        let Some((x, k, mi, ci, ai)) = hit else {
            continue;
        };
        // Every operand has the output's shape (no broadcasting hidden in
        // the pattern).
        let ys = &g.tensors[g.nodes[di].outputs[0]].shape;
        if &g.tensors[x].shape != ys {
            continue;
        }
        let node = &mut g.nodes[di];
        node.op = Op::Unary(Activation::HardSwishScaled { k });
        node.inputs = vec![x];
        node.onnx_op = format!("HardSwishScaled({})", node.onnx_op);
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

    /// TensorFlow's MobileNetV3 form, `(k · x) * Clip(x + 3, 0, 6)` with
    /// `k` an f16-rounded 1/6, after a convolution: one fused layer whose
    /// outputs equal the unfused graph's bit for bit (same ops, same order).
    #[test]
    fn scaled_form_of_hardswish_is_recognised_then_fused() {
        let tf = |swap_mul: bool, swap_add: bool, extra_reader: bool, plus: f32| {
            let mut m = ModelBuilder::new(13);
            m.input("x", &[1, 3, 4, 4]);
            m.init_f32("w", &[5, 3, 1, 1], &data(15, 1));
            m.init_f32("three", &[], &[plus])
                .init_f32("k", &[], &[0.16662598]);
            m.init_f32("lo", &[], &[0.0]).init_f32("hi", &[], &[6.0]);
            m.node("Conv", &["x", "w"], &["c"], vec![]);
            let ins: [&str; 2] = if swap_mul { ["k", "c"] } else { ["c", "k"] };
            m.node("Mul", &ins, &["s"], vec![]);
            let ins: [&str; 2] = if swap_add {
                ["three", "c"]
            } else {
                ["c", "three"]
            };
            m.node("Add", &ins, &["a"], vec![]);
            m.node("Clip", &["a", "lo", "hi"], &["cl"], vec![]);
            m.node("Mul", &["s", "cl"], &["y"], vec![]);
            m.output("y");
            if extra_reader {
                // The scaled value is also an output: the pattern's middle
                // must stay.
                m.output("s");
            }
            import(&m)
        };
        let x = data(48, 3);
        for (swap_mul, swap_add) in [(false, false), (true, true), (true, false)] {
            let mut g = tf(swap_mul, swap_add, false, 3.0);
            assert_eq!(ops(&g), ["Conv", "Mul", "Add", "Clip", "Mul"]);
            let before = run(g.clone(), &x);
            assert_eq!(recognize_activations(&mut g), 1);
            assert_eq!(fuse_activation(&mut g), 1);
            assert_eq!(ops(&g), ["Conv+HardSwishScaled"]);
            let after = run(g, &x);
            for (p, q) in after[0].iter().zip(&before[0]) {
                assert_eq!(p.to_bits(), q.to_bits(), "{p} vs {q}");
            }
        }
        // Not the pattern: + 2, or a middle value read elsewhere.
        let mut g = tf(false, false, false, 2.0);
        assert_eq!(recognize_activations(&mut g), 0);
        let mut g = tf(false, false, true, 3.0);
        assert_eq!(recognize_activations(&mut g), 0);
        assert_eq!(ops(&g), ["Conv", "Mul", "Add", "Clip", "Mul"]);
    }
}
