//! Identity removal: a view that does not change the shape (ONNX Identity,
//! Dropout in inference, a no-op Reshape or Cast) is bypassed — its readers
//! read its input directly — and the node is dropped.

use super::{consumers, is_output, remove_nodes};
use crate::ir::{Graph, Op};

/// Bypasses shape-preserving views. Returns how many were removed.
pub fn remove_identities(g: &mut Graph) -> usize {
    let mut dead = vec![false; g.nodes.len()];
    let mut removed = 0;
    for i in 0..g.nodes.len() {
        if g.nodes[i].op != Op::Reshape {
            continue;
        }
        let (x, y) = (g.nodes[i].inputs[0], g.nodes[i].outputs[0]);
        // A graph output keeps its own name and tensor.
        if g.tensors[x].shape != g.tensors[y].shape || is_output(g, y) {
            continue;
        }
        let cons = consumers(g);
        for &c in &cons[y] {
            for input in g.nodes[c].inputs.iter_mut() {
                if *input == y {
                    *input = x;
                }
            }
        }
        dead[i] = true;
        removed += 1;
    }
    remove_nodes(g, &dead);
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::ModelBuilder;
    use crate::passes::test_util::*;

    #[test]
    fn identities_and_dropouts_disappear() {
        let mut m = ModelBuilder::new(13);
        m.input("x", &[1, 4]);
        m.node("Relu", &["x"], &["a"], vec![]);
        m.node("Identity", &["a"], &["b"], vec![]);
        m.node("Dropout", &["b"], &["c"], vec![]);
        m.node("Neg", &["c"], &["y"], vec![]);
        m.node("Identity", &["y"], &["out"], vec![]);
        m.output("out");
        let mut g = import(&m);
        assert_eq!(ops(&g), ["Relu", "Reshape", "Reshape", "Neg", "Reshape"]);
        let x = data(4, 1);
        let before = run(g.clone(), &x);
        assert_eq!(remove_identities(&mut g), 2);
        // The last Identity produces a graph output and stays.
        assert_eq!(ops(&g), ["Relu", "Neg", "Reshape"]);
        assert_same(&run(g, &x), &before);
    }

    #[test]
    fn real_reshapes_stay() {
        let mut m = ModelBuilder::new(13);
        m.input("x", &[2, 3]);
        m.node(
            "Flatten",
            &["x"],
            &["f"],
            vec![crate::onnx::builder::attr_i("axis", 0)],
        );
        m.node("Relu", &["f"], &["y"], vec![]);
        m.output("y");
        let mut g = import(&m);
        assert_eq!(remove_identities(&mut g), 0);
    }
}
