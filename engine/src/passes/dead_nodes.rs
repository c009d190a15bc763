//! Dead-node elimination: nodes none of whose outputs is read or exported.

use super::{consumers, is_output, remove_nodes};
use crate::ir::Graph;

/// Removes nodes whose results are never used. Returns how many.
pub fn eliminate_dead_nodes(g: &mut Graph) -> usize {
    let mut removed = 0;
    loop {
        let cons = consumers(g);
        let dead: Vec<bool> = g
            .nodes
            .iter()
            .map(|n| {
                n.outputs
                    .iter()
                    .all(|&t| cons[t].is_empty() && !is_output(g, t))
            })
            .collect();
        let n = dead.iter().filter(|&&d| d).count();
        if n == 0 {
            return removed;
        }
        remove_nodes(g, &dead);
        removed += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::ModelBuilder;
    use crate::passes::test_util::*;

    #[test]
    fn unused_branches_go_used_ones_stay() {
        let mut m = ModelBuilder::new(13);
        m.input("x", &[1, 4]);
        m.node("Relu", &["x"], &["a"], vec![]);
        m.node("Sigmoid", &["a"], &["unused1"], vec![]);
        m.node("Exp", &["unused1"], &["unused2"], vec![]);
        m.node("Neg", &["a"], &["y"], vec![]);
        m.output("y");
        let mut g = import(&m);
        assert_eq!(ops(&g), ["Relu", "Sigmoid", "Exp", "Neg"]);
        let before = run(g.clone(), &data(4, 1));
        assert_eq!(eliminate_dead_nodes(&mut g), 2);
        assert_eq!(ops(&g), ["Relu", "Neg"]);
        assert_same(&run(g, &data(4, 1)), &before);
    }
}
