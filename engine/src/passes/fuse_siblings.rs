//! Horizontal fusion: sibling 1x1 convolutions that read the same tensor
//! become one convolution with the weights stacked along the output
//! channels. Each original output becomes a [`Op::SliceView`] into the fused
//! output (a contiguous channel range when the batch is 1), so nothing is
//! copied: the input is read once and one larger GEMM replaces several small
//! ones (a 4-channel head no longer wastes most of a 6-row register tile).

use super::producer;
use crate::ir::{ConstData, ConvAttrs, DType, Graph, Node, Op, Tensor, TensorId};
use osprey_kernels::Activation;

fn pointwise(a: &ConvAttrs) -> bool {
    a.kernel == [1, 1] && a.strides == [1, 1] && a.pads == [0; 4] && a.groups == 1 && !a.residual
}

/// Fuses groups of sibling pointwise convolutions. Returns how many
/// convolutions were merged away.
pub fn fuse_siblings(g: &mut Graph) -> usize {
    let mut merged = 0;
    loop {
        let Some(group) = find_group(g) else {
            return merged;
        };
        merged += group.len() - 1;
        apply(g, &group);
    }
}

/// The first group (by input tensor) of ≥ 2 fusable siblings with the same
/// activation, in node order.
fn find_group(g: &Graph) -> Option<Vec<usize>> {
    let candidate = |i: usize| -> Option<(TensorId, Activation)> {
        let n = &g.nodes[i];
        let Op::Conv(a) = &n.op else { return None };
        // Channels-last outputs are not channel ranges of one buffer.
        if !pointwise(a) || n.inputs.len() > 3 || a.channels_last {
            return None;
        }
        let x = n.inputs[0];
        // Batch 1, so each output is a contiguous channel range.
        if g.tensors[x].shape.first() != Some(&1) {
            return None;
        }
        if !n.inputs[1..].iter().all(|&t| g.tensors[t].is_const()) {
            return None;
        }
        Some((x, a.activation))
    };
    for i in 0..g.nodes.len() {
        let Some((x, act)) = candidate(i) else {
            continue;
        };
        let group: Vec<usize> = (i..g.nodes.len())
            .filter(|&j| candidate(j).is_some_and(|(y, b)| y == x && b == act))
            .collect();
        if group.len() >= 2 {
            return Some(group);
        }
    }
    None
}

fn apply(g: &mut Graph, group: &[usize]) {
    let first = group[0];
    let x = g.nodes[first].inputs[0];
    let Op::Conv(attrs) = g.nodes[first].op else {
        return;
    };
    let xs = g.tensors[x].shape.clone();
    let (h, w) = (xs[2], xs[3]);
    let mut weights = Vec::new();
    let mut bias = Vec::new();
    let mut outs = Vec::new(); // (original output, channels)
    let mut names = Vec::new();
    for &i in group {
        let n = &g.nodes[i];
        let c_out = g.tensors[n.outputs[0]].shape[1];
        weights.extend(
            g.tensors[n.inputs[1]]
                .value
                .as_ref()
                .map(ConstData::to_f32)
                .unwrap_or_default(),
        );
        match n.inputs.get(2).and_then(|&b| g.tensors[b].value.as_ref()) {
            Some(b) => bias.extend(b.to_f32()),
            None => bias.extend(std::iter::repeat_n(0.0, c_out)),
        }
        outs.push((n.outputs[0], c_out));
        names.push(n.name.clone());
    }
    let total: usize = outs.iter().map(|o| o.1).sum();
    let name = names.join("+");
    let w_id = g.add_tensor(Tensor {
        name: format!("{name}:w"),
        shape: vec![total, xs[1], 1, 1],
        dtype: DType::F32,
        value: Some(ConstData::F32(weights)),
    });
    let b_id = g.add_tensor(Tensor {
        name: format!("{name}:b"),
        shape: vec![total],
        dtype: DType::F32,
        value: Some(ConstData::F32(bias)),
    });
    let y = g.add_tensor(Tensor {
        name: format!("{name}:out"),
        shape: vec![1, total, h, w],
        dtype: DType::F32,
        value: None,
    });
    let fused = Node {
        name: name.clone(),
        onnx_op: format!("Conv[{}]", group.len()),
        op: Op::Conv(attrs),
        inputs: vec![x, w_id, b_id],
        outputs: vec![y],
    };
    let mut views = Vec::new();
    let mut channel = 0;
    for (t, c) in &outs {
        views.push(Node {
            name: format!("{}:view", g.tensors[*t].name),
            onnx_op: "SliceView".into(),
            op: Op::SliceView {
                offset: channel * h * w,
            },
            inputs: vec![y],
            outputs: vec![*t],
        });
        channel += c;
    }
    // The fused conv and the views take the first sibling's place; every
    // reader of a sibling's output comes after that sibling, hence after it.
    let mut nodes = Vec::with_capacity(g.nodes.len() + 1);
    for (i, n) in g.nodes.drain(..).enumerate() {
        if i == first {
            nodes.push(fused.clone());
            nodes.append(&mut views);
        } else if !group.contains(&i) {
            nodes.push(n);
        }
    }
    g.nodes = nodes;
    debug_assert!(producer(g, y).is_some());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{attr_ints, ModelBuilder};
    use crate::passes::{fuse_activation, test_util::*};

    fn heads(batch: i64, second_act: &str) -> ModelBuilder {
        let mut m = ModelBuilder::new(13);
        m.input("x", &[batch, 8, 5, 5]);
        m.init_f32("wa", &[6, 8, 1, 1], &data(48, 1))
            .init_f32("ba", &[6], &data(6, 2));
        m.init_f32("wb", &[4, 8, 1, 1], &data(32, 3));
        m.init_f32("wc", &[3, 8, 3, 3], &data(216, 4));
        m.node("Conv", &["x", "wa", "ba"], &["a"], vec![]);
        m.node("Relu", &["a"], &["ra"], vec![]);
        m.node(
            "Conv",
            &["x", "wc"],
            &["c"],
            vec![attr_ints("pads", &[1, 1, 1, 1])],
        );
        m.node("Conv", &["x", "wb"], &["b"], vec![]);
        m.node(second_act, &["b"], &["rb"], vec![]);
        m.node(
            "Concat",
            &["ra", "rb"],
            &["sum"],
            vec![crate::onnx::builder::attr_i("axis", 1)],
        );
        m.output("sum").output("c").output("rb");
        m
    }

    #[test]
    fn siblings_with_the_same_activation_become_one_conv_and_views() {
        let mut g = import(&heads(1, "Relu"));
        assert_eq!(fuse_activation(&mut g), 2);
        assert_eq!(ops(&g), ["Conv+Relu", "Conv", "Conv+Relu", "Concat"]);
        let x = data(200, 5);
        let before = run(g.clone(), &x);
        assert_eq!(fuse_siblings(&mut g), 1);
        assert_eq!(
            ops(&g),
            ["Conv+Relu", "SliceView", "SliceView", "Conv", "Concat"]
        );
        assert_same(&run(g, &x), &before);
    }

    #[test]
    fn different_activations_or_batches_stay_apart() {
        let mut g = import(&heads(1, "Sigmoid"));
        fuse_activation(&mut g);
        assert_eq!(fuse_siblings(&mut g), 0);
        let mut g = import(&heads(2, "Relu"));
        fuse_activation(&mut g);
        assert_eq!(
            fuse_siblings(&mut g),
            0,
            "batch 2: channel ranges are not contiguous"
        );
    }
}
