//! Conv + activation fusion: an element-wise activation that is the only
//! reader of a convolution's output is applied in the convolution's epilogue
//! (in registers for Relu/Clip, over the cache-hot tile otherwise). A Relu
//! or Clip that is the only reader of a concatenation is applied by the
//! copy as it writes (CenterNet's neck: `Relu(Concat(skip, upsampled))`).

use super::{consumers, is_output, producer, remove_nodes};
use crate::ir::{Graph, Op};
use osprey_kernels::Activation;

/// Activations a convolution epilogue can take.
fn fusable(a: Activation) -> bool {
    matches!(
        a,
        Activation::Relu
            | Activation::Clip { .. }
            | Activation::LeakyRelu { .. }
            | Activation::Sigmoid
            | Activation::HardSigmoid { .. }
            | Activation::HardSwish
            | Activation::HardSwishScaled { .. }
            | Activation::Silu
            | Activation::Tanh
    )
}

/// Fuses activations into the convolutions that feed them. Returns how many.
pub fn fuse_activation(g: &mut Graph) -> usize {
    let mut fused = 0;
    let mut dead = vec![false; g.nodes.len()];
    let cons = consumers(g);
    for ui in 0..g.nodes.len() {
        let Op::Unary(act) = g.nodes[ui].op else {
            continue;
        };
        if !fusable(act) {
            continue;
        }
        let x = g.nodes[ui].inputs[0];
        let Some(ci) = producer(g, x) else { continue };
        if dead[ci] || cons[x].len() != 1 || is_output(g, x) {
            continue;
        }
        let y = g.nodes[ui].outputs[0];
        let act_name = g.nodes[ui].onnx_op.clone();
        let conv = &mut g.nodes[ci];
        match &mut conv.op {
            Op::Conv(a) | Op::ConvTranspose(a) if a.activation == Activation::None => {
                a.activation = act
            }
            // A concatenation clamps while it copies (Relu, Clip).
            Op::Concat { act: a, .. }
                if *a == Activation::None
                    && matches!(act, Activation::Relu | Activation::Clip { .. }) =>
            {
                *a = act
            }
            _ => continue,
        }
        conv.outputs[0] = y;
        conv.onnx_op = format!("{}+{act_name}", conv.onnx_op);
        dead[ui] = true;
        fused += 1;
    }
    remove_nodes(g, &dead);
    fused
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{attr_i, attr_ints, ModelBuilder};
    use crate::passes::test_util::*;

    fn model(act: &str, second_reader: bool, depthwise: bool) -> ModelBuilder {
        let mut m = ModelBuilder::new(13);
        m.input("x", &[1, 4, 5, 5]);
        if depthwise {
            m.init_f32("w", &[4, 1, 3, 3], &data(36, 1));
            m.node(
                "Conv",
                &["x", "w"],
                &["c"],
                vec![attr_i("group", 4), attr_ints("pads", &[1, 1, 1, 1])],
            );
        } else {
            m.init_f32("w", &[6, 4, 1, 1], &data(24, 1));
            m.node("Conv", &["x", "w"], &["c"], vec![]);
        }
        with_activation(m, act, second_reader)
    }

    #[test]
    fn fuses_each_supported_activation() {
        for act in [
            "Relu",
            "Clip",
            "Sigmoid",
            "HardSwish",
            "HardSigmoid",
            "LeakyRelu",
            "Tanh",
        ] {
            for dw in [false, true] {
                let mut g = import(&model(act, false, dw));
                assert_eq!(ops(&g), ["Conv", act]);
                let x = data(100, 7);
                let before = run(g.clone(), &x);
                assert_eq!(fuse_activation(&mut g), 1, "{act}");
                assert_eq!(g.nodes.len(), 1);
                assert_same(&run(g, &x), &before);
            }
        }
    }

    /// `y = act(c)` as the model's output; `second_reader`: `c` is also
    /// read by a Neg whose result is a second output.
    fn with_activation(mut m: ModelBuilder, act: &str, second_reader: bool) -> ModelBuilder {
        if act == "Clip" {
            m.init_f32("lo", &[], &[-0.1]).init_f32("hi", &[], &[0.3]);
            m.node("Clip", &["c", "lo", "hi"], &["y"], vec![]);
        } else {
            m.node(act, &["c"], &["y"], vec![]);
        }
        m.output("y");
        if second_reader {
            m.node("Neg", &["c"], &["z"], vec![]);
            m.output("z");
        }
        m
    }

    /// `act(Concat(a, b))` with `a` and `b` from two convolutions, the
    /// concatenation's output optionally read by a second node too.
    fn concat_model(act: &str, second_reader: bool) -> ModelBuilder {
        let mut m = ModelBuilder::new(13);
        m.input("x", &[1, 4, 5, 5]);
        m.init_f32("wa", &[3, 4, 1, 1], &data(12, 1));
        m.init_f32("wb", &[5, 4, 1, 1], &data(20, 2));
        m.node("Conv", &["x", "wa"], &["a"], vec![]);
        m.node("Conv", &["x", "wb"], &["b"], vec![]);
        m.node("Concat", &["a", "b"], &["c"], vec![attr_i("axis", 1)]);
        with_activation(m, act, second_reader)
    }

    #[test]
    fn a_relu_or_clip_after_a_concat_is_applied_by_the_copy() {
        for act in ["Relu", "Clip"] {
            let mut g = import(&concat_model(act, false));
            assert_eq!(ops(&g), ["Conv", "Conv", "Concat", act]);
            let x = data(100, 7);
            let before = run(g.clone(), &x);
            // Some values sit at the lower bound: the activation changed
            // them.
            let lo = if act == "Relu" { 0.0 } else { -0.1 };
            assert!(before[0].contains(&lo), "{act}");
            assert_eq!(fuse_activation(&mut g), 1, "{act}");
            assert_eq!(ops(&g), ["Conv", "Conv", "Concat"]);
            assert_same(&run(g, &x), &before);
        }
        // Left alone: a concatenation read by another node too, and an
        // activation a copy does not apply.
        let mut g = import(&concat_model("Relu", true));
        assert_eq!(fuse_activation(&mut g), 0);
        assert_eq!(ops(&g), ["Conv", "Conv", "Concat", "Relu", "Neg"]);
        let mut g = import(&concat_model("Sigmoid", false));
        assert_eq!(fuse_activation(&mut g), 0);
        assert_eq!(ops(&g), ["Conv", "Conv", "Concat", "Sigmoid"]);
    }

    #[test]
    fn not_fused_when_conv_output_has_another_reader_or_op_is_not_an_activation() {
        let mut g = import(&model("Relu", true, false));
        assert_eq!(fuse_activation(&mut g), 0);
        assert_eq!(ops(&g), ["Conv", "Relu", "Neg"]);
        let mut g = import(&model("Exp", false, false));
        assert_eq!(fuse_activation(&mut g), 0);
        assert_eq!(ops(&g), ["Conv", "Exp"]);
    }
}
