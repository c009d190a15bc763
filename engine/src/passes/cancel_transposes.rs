//! Transpose cancellation: two transposes in a row become one, or nothing
//! (a free view) when they undo each other; an identity transpose is a view.

use super::{consumers, is_output, producer, remove_nodes};
use crate::ir::{Graph, Op};

/// Composes or removes back-to-back transposes. Returns how many nodes changed.
pub fn cancel_transposes(g: &mut Graph) -> usize {
    let mut changed = 0;
    let mut dead = vec![false; g.nodes.len()];
    let cons = consumers(g);
    for i in 0..g.nodes.len() {
        let Op::Transpose { perm: p2 } = g.nodes[i].op.clone() else {
            continue;
        };
        let t = g.nodes[i].inputs[0];
        let mut x = t;
        let mut perm = p2.clone();
        if let Some(j) = producer(g, t) {
            if let Op::Transpose { perm: p1 } = &g.nodes[j].op {
                if !dead[j] && cons[t].len() == 1 && !is_output(g, t) && p1.len() == p2.len() {
                    // out[d] = mid[p2[d]] = x[p1[p2[d]]]
                    perm = p2.iter().map(|&d| p1[d]).collect();
                    x = g.nodes[j].inputs[0];
                    dead[j] = true;
                    changed += 1;
                }
            }
        }
        let identity = perm.iter().enumerate().all(|(d, &p)| d == p);
        let node = &mut g.nodes[i];
        node.inputs[0] = x;
        if identity {
            node.op = Op::Reshape;
            changed += 1;
        } else if perm != p2 {
            node.op = Op::Transpose { perm };
        }
    }
    remove_nodes(g, &dead);
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{attr_ints, ModelBuilder};
    use crate::passes::test_util::*;

    fn model(p1: &[i64], p2: &[i64], extra_reader: bool) -> ModelBuilder {
        let mut m = ModelBuilder::new(13);
        m.input("x", &[2, 3, 4]);
        m.node("Transpose", &["x"], &["a"], vec![attr_ints("perm", p1)]);
        m.node("Transpose", &["a"], &["b"], vec![attr_ints("perm", p2)]);
        m.node("Relu", &["b"], &["y"], vec![]);
        m.output("y");
        if extra_reader {
            m.node("Neg", &["a"], &["z"], vec![]);
            m.output("z");
        }
        m
    }

    #[test]
    fn inverse_pair_becomes_a_view() {
        let mut g = import(&model(&[1, 2, 0], &[2, 0, 1], false));
        assert_eq!(ops(&g), ["Transpose", "Transpose", "Relu"]);
        let x = data(24, 1);
        let before = run(g.clone(), &x);
        assert_eq!(cancel_transposes(&mut g), 2);
        assert_eq!(ops(&g), ["Reshape", "Relu"]);
        assert_same(&run(g, &x), &before);
    }

    #[test]
    fn non_inverse_pair_is_composed() {
        let mut g = import(&model(&[1, 0, 2], &[0, 2, 1], false));
        let x = data(24, 2);
        let before = run(g.clone(), &x);
        assert_eq!(cancel_transposes(&mut g), 1);
        assert_eq!(ops(&g), ["Transpose", "Relu"]);
        assert_same(&run(g, &x), &before);
    }

    #[test]
    fn shared_intermediate_is_left_alone() {
        let mut g = import(&model(&[1, 2, 0], &[2, 0, 1], true));
        assert_eq!(cancel_transposes(&mut g), 0);
        assert_eq!(ops(&g), ["Transpose", "Transpose", "Relu", "Neg"]);
    }
}
