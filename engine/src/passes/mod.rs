//! Graph optimisation passes.
//!
//! Each pass is a local rewrite in its own module, with tests that show the
//! graph before and after and check that outputs are unchanged beyond float
//! rounding. A pass only fires when its preconditions hold (single consumer,
//! not a graph output, constant parameters, matching shapes); otherwise the
//! graph is left as it was.
//!
//! Constant folding and identity/dropout removal already happen at import
//! (see [`crate::onnx`]); the passes here work on the typed graph.

mod cancel_transposes;
mod channels_last;
mod dead_nodes;
mod fold_affine;
mod fold_batchnorm;
mod fuse_activation;
mod fuse_residual;
mod fuse_siblings;
mod recognize_activations;
mod remove_identities;

pub use cancel_transposes::cancel_transposes;
pub use channels_last::{channels_last, LayoutReport};
pub use dead_nodes::eliminate_dead_nodes;
pub use fold_affine::fold_affine;
pub use fold_batchnorm::fold_batchnorm;
pub use fuse_activation::fuse_activation;
pub use fuse_residual::fuse_residual;
pub use fuse_siblings::fuse_siblings;
pub use recognize_activations::recognize_activations;
pub use remove_identities::remove_identities;

use crate::ir::{ConstData, DType, Graph, Tensor, TensorId};

/// What one pass did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassReport {
    /// Pass name.
    pub name: &'static str,
    /// Rewrites applied.
    pub rewrites: usize,
}

/// A pass: rewrites the graph in place, returns the number of rewrites.
pub type Pass = fn(&mut Graph) -> usize;

/// The default pipeline, in order. Returns what each pass did.
pub fn optimize(g: &mut Graph) -> Vec<PassReport> {
    let passes: [(&'static str, Pass); 9] = [
        ("remove_identities", remove_identities),
        ("cancel_transposes", cancel_transposes),
        ("eliminate_dead_nodes", eliminate_dead_nodes),
        ("fold_batchnorm", fold_batchnorm),
        ("fold_affine", fold_affine),
        ("fuse_residual", fuse_residual),
        ("recognize_activations", recognize_activations),
        ("fuse_activation", fuse_activation),
        ("fuse_siblings", fuse_siblings),
    ];
    passes
        .iter()
        .map(|&(name, pass)| PassReport {
            name,
            rewrites: pass(g),
        })
        .collect()
}

/// For every tensor, the indices of the nodes that read it.
pub(crate) fn consumers(g: &Graph) -> Vec<Vec<usize>> {
    let mut c = vec![Vec::new(); g.tensors.len()];
    for (i, n) in g.nodes.iter().enumerate() {
        for &t in &n.inputs {
            if !c[t].contains(&i) {
                c[t].push(i);
            }
        }
    }
    c
}

/// True when `t` is a graph output (it must stay materialised).
pub(crate) fn is_output(g: &Graph, t: TensorId) -> bool {
    g.outputs.contains(&t)
}

/// Index of the node producing `t`, if any.
pub(crate) fn producer(g: &Graph, t: TensorId) -> Option<usize> {
    g.nodes.iter().position(|n| n.outputs.contains(&t))
}

/// A convolution's constant weights and bias (zeros when it has none), or
/// `None` when either is not a constant.
pub(crate) fn conv_params(g: &Graph, ci: usize) -> Option<(Vec<f32>, Vec<f32>)> {
    let n = &g.nodes[ci];
    let wt = &g.tensors[*n.inputs.get(1)?];
    let w = wt.value.as_ref()?.to_f32();
    let c_out = *wt.shape.first()?;
    let b = match n.inputs.get(2) {
        Some(&t) => g.tensors[t].value.as_ref()?.to_f32(),
        None => vec![0.0; c_out],
    };
    Some((w, b))
}

/// Gives convolution `ci` new constant weights (same shape) and bias,
/// named after it with `tag`; its input and a fused residual stay.
pub(crate) fn set_conv_params(g: &mut Graph, ci: usize, w: Vec<f32>, b: Vec<f32>, tag: &str) {
    let name = g.nodes[ci].name.clone();
    let wshape = g.tensors[g.nodes[ci].inputs[1]].shape.clone();
    let b_len = b.len();
    let w_id = g.add_tensor(Tensor {
        name: format!("{name}:w_{tag}"),
        shape: wshape,
        dtype: DType::F32,
        value: Some(ConstData::F32(w)),
    });
    let b_id = g.add_tensor(Tensor {
        name: format!("{name}:b_{tag}"),
        shape: vec![b_len],
        dtype: DType::F32,
        value: Some(ConstData::F32(b)),
    });
    let node = &mut g.nodes[ci];
    let rest: Vec<TensorId> = node.inputs.iter().skip(3).copied().collect();
    node.inputs = [node.inputs[0], w_id, b_id]
        .into_iter()
        .chain(rest)
        .collect();
}

/// Removes the nodes marked in `dead` (keeps order).
pub(crate) fn remove_nodes(g: &mut Graph, dead: &[bool]) {
    let mut i = 0;
    g.nodes.retain(|_| {
        let keep = !dead[i];
        i += 1;
        keep
    });
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::collections::HashMap;
    use std::sync::Arc;

    use crate::ir::Graph;
    use crate::onnx::builder::ModelBuilder;
    use crate::{Engine, ExecutionContext};

    /// Test data: the engine's pseudo-random stream, seed spread so small
    /// seeds give unrelated streams.
    pub fn data(n: usize, seed: u64) -> Vec<f32> {
        crate::tune::pseudo_random(n, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    pub fn import(m: &ModelBuilder) -> Graph {
        crate::onnx::import(&m.to_bytes(), &HashMap::new()).expect("import")
    }

    /// Node op names in order, e.g. `["Conv", "Relu"]`.
    pub fn ops(g: &Graph) -> Vec<String> {
        g.nodes
            .iter()
            .map(|n| match &n.op {
                crate::ir::Op::Conv(a) => {
                    let mut s = "Conv".to_string();
                    if a.residual {
                        s.push_str("+Add");
                    }
                    if a.activation != osprey_kernels::Activation::None {
                        let act = format!("+{:?}", a.activation);
                        s.push_str(act.split(' ').next().unwrap_or(""));
                    }
                    s
                }
                op => op.name().to_string(),
            })
            .collect()
    }

    /// Runs a graph on one input named "x" and returns all outputs.
    pub fn run(g: Graph, x: &[f32]) -> Vec<Vec<f32>> {
        let e = Arc::new(Engine::new(g).expect("engine"));
        let mut ctx = ExecutionContext::new(e.clone(), 2);
        ctx.set_input("x", x).expect("input");
        ctx.run().expect("run");
        (0..e.outputs().count())
            .map(|i| ctx.output_index(i).unwrap().to_vec())
            .collect()
    }

    /// Asserts two runs agree to float rounding.
    pub fn assert_same(a: &[Vec<f32>], b: &[Vec<f32>]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.len(), y.len());
            for (p, q) in x.iter().zip(y) {
                assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()), "{p} vs {q}");
            }
        }
    }
}
