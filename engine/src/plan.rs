//! Memory planning: every runtime tensor gets an offset in one arena.
//!
//! Tensors that are views of another (reshape-like ops) share its storage.
//! Each storage lives from the node that defines it to the last node that
//! reads it (graph outputs live to the end). Storages are placed greedily,
//! largest first, at the lowest 64-byte-aligned offset that does not overlap
//! any already placed storage whose lifetime overlaps — the classic
//! "greedy by size" offset assignment.

use crate::ir::{Graph, TensorId};

/// Alignment of every storage, in f32 elements (64 bytes).
pub const ALIGN_FLOATS: usize = 16;

/// One block of the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Storage {
    /// Offset in f32 elements (a multiple of [`ALIGN_FLOATS`]).
    pub offset: usize,
    /// Length in f32 elements (unpadded).
    pub len: usize,
    /// First step at which it is live (0 = before the first node).
    pub first: usize,
    /// Last step at which it is live (inclusive).
    pub last: usize,
}

/// The arena layout for a graph.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Storage index per tensor (`None` for constants).
    pub storage_of: Vec<Option<usize>>,
    /// Offset of each tensor inside its storage, in f32 elements (non-zero
    /// only for slice views).
    pub offset_in_storage: Vec<usize>,
    /// Length of each tensor in f32 slots: its element count, or a quarter
    /// of it (rounded up) for an INT8 tensor.
    pub tensor_len: Vec<usize>,
    /// The storages.
    pub storages: Vec<Storage>,
    /// Arena size in f32 elements.
    pub arena_floats: usize,
    /// What one buffer per tensor would take, in f32 elements (aligned).
    pub naive_floats: usize,
}

impl MemoryPlan {
    /// Arena size in bytes.
    pub fn arena_bytes(&self) -> usize {
        self.arena_floats * 4
    }
    /// Bytes without reuse.
    pub fn naive_bytes(&self) -> usize {
        self.naive_floats * 4
    }
    /// Offset and length of a tensor's data, if it lives in the arena.
    pub fn range(&self, t: TensorId) -> Option<(usize, usize)> {
        let s = self.storages[self.storage_of.get(t).copied().flatten()?];
        Some((s.offset + self.offset_in_storage[t], self.tensor_len[t]))
    }
}

fn aligned(n: usize) -> usize {
    n.div_ceil(ALIGN_FLOATS) * ALIGN_FLOATS
}

/// Computes lifetimes and places every runtime tensor in one arena.
pub fn plan_arena(g: &Graph) -> MemoryPlan {
    plan_arena_typed(g, &[], &[])
}

/// As [`plan_arena`], with the tensors marked in `int8` stored as INT8:
/// four values per f32 slot, so `tensor_len` (and the storage) counts
/// `ceil(n / 4)` slots for them. For each pair `(i, j)` in `fused`, node
/// `i`'s inputs live until node `j` (the two run as one step at `i`, which
/// writes `j`'s output while it still reads its inputs; see
/// [`crate::fuse`]).
pub fn plan_arena_typed(g: &Graph, int8: &[bool], fused: &[(usize, usize)]) -> MemoryPlan {
    let mut storage_of: Vec<Option<usize>> = vec![None; g.tensors.len()];
    let mut offset_in_storage = vec![0usize; g.tensors.len()];
    let tensor_len: Vec<usize> = g
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if int8.get(i).copied().unwrap_or(false) {
                t.numel().div_ceil(4)
            } else {
                t.numel()
            }
        })
        .collect();
    let mut storages: Vec<Storage> = Vec::new();
    let end = g.nodes.len();
    let mut new_storage = |len: usize, at: usize| {
        storages.push(Storage {
            offset: 0,
            len,
            first: at,
            last: at,
        });
        storages.len() - 1
    };
    for &i in &g.inputs {
        storage_of[i] = Some(new_storage(tensor_len[i], 0));
    }
    for (step, node) in g.nodes.iter().enumerate() {
        let view_of = if node.op.is_view() {
            node.inputs.first().and_then(|&i| {
                storage_of[i].map(|s| (s, offset_in_storage[i] + node.op.view_offset()))
            })
        } else {
            None
        };
        for &o in &node.outputs {
            storage_of[o] = Some(match view_of {
                Some((s, off)) => {
                    offset_in_storage[o] = off;
                    s
                }
                None => new_storage(tensor_len[o], step),
            });
        }
    }
    // Extend lifetimes to every use.
    for (step, node) in g.nodes.iter().enumerate() {
        for &t in node.inputs.iter().chain(&node.outputs) {
            if let Some(s) = storage_of[t] {
                storages[s].last = storages[s].last.max(step);
            }
        }
    }
    for &(i, j) in fused {
        for &t in g.nodes.get(i).map_or(&[][..], |n| &n.inputs[..]) {
            if let Some(s) = storage_of[t] {
                storages[s].last = storages[s].last.max(j);
            }
        }
    }
    // Outputs live to the end; so do inputs, so a context can run again
    // on the input it was given (the bench does; so may a caller that
    // re-runs a frame): reusing an input's storage for a later tensor
    // would leave the next run computing on that tensor's bytes (an INT8
    // tensor's bytes read as f32 are denormals: 10x slower, and wrong).
    for &o in g.outputs.iter().chain(&g.inputs) {
        if let Some(s) = storage_of[o] {
            storages[s].last = end;
        }
    }

    let naive_floats = storages.iter().map(|s| aligned(s.len)).sum();
    let mut order: Vec<usize> = (0..storages.len()).collect();
    order.sort_by(|&a, &b| {
        storages[b]
            .len
            .cmp(&storages[a].len)
            .then(storages[a].first.cmp(&storages[b].first))
    });
    let mut placed: Vec<usize> = Vec::with_capacity(storages.len());
    let mut arena_floats = 0;
    for &s in &order {
        let me = storages[s];
        let mut conflicts: Vec<(usize, usize)> = placed
            .iter()
            .map(|&p| storages[p])
            .filter(|o| o.first <= me.last && me.first <= o.last)
            .map(|o| (o.offset, o.offset + aligned(o.len)))
            .collect();
        conflicts.sort_unstable();
        let need = aligned(me.len);
        let mut offset = 0;
        for (lo, hi) in conflicts {
            if offset + need <= lo {
                break;
            }
            offset = offset.max(hi);
        }
        storages[s].offset = offset;
        arena_floats = arena_floats.max(offset + need);
        placed.push(s);
    }
    MemoryPlan {
        storage_of,
        offset_in_storage,
        tensor_len,
        storages,
        arena_floats,
        naive_floats,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DType, Node, Op, Tensor};
    use osprey_kernels::activation::Activation;
    use proptest::prelude::*;

    fn t(g: &mut Graph, n: usize) -> TensorId {
        g.add_tensor(Tensor {
            name: format!("t{}", g.tensors.len()),
            shape: vec![n],
            dtype: DType::F32,
            value: None,
        })
    }

    /// Builds a random DAG: each node reads one or two earlier tensors.
    fn random_graph(sizes: &[usize], picks: &[(usize, usize, bool)]) -> Graph {
        let mut g = Graph::default();
        let x = t(&mut g, sizes[0]);
        g.inputs.push(x);
        let mut live = vec![x];
        for (k, &(a, b, view)) in picks.iter().enumerate() {
            let ia = live[a % live.len()];
            let n = if view {
                g.tensors[ia].numel()
            } else {
                sizes[(k + 1) % sizes.len()]
            };
            let o = t(&mut g, n);
            let mut inputs = vec![ia];
            if !view {
                inputs.push(live[b % live.len()]);
            }
            let op = if view {
                Op::Reshape
            } else {
                Op::Unary(Activation::Relu)
            };
            g.nodes.push(Node {
                name: format!("n{k}"),
                onnx_op: "X".into(),
                op,
                inputs,
                outputs: vec![o],
            });
            live.push(o);
        }
        g.outputs.push(*live.last().unwrap_or(&x));
        g
    }

    proptest! {
        #[test]
        fn live_storages_never_overlap(
            sizes in proptest::collection::vec(1usize..5000, 1..8),
            picks in proptest::collection::vec((0usize..100, 0usize..100, any::<bool>()), 1..40),
        ) {
            let g = random_graph(&sizes, &picks);
            let p = plan_arena(&g);
            prop_assert!(p.arena_floats <= p.naive_floats);
            for (i, a) in p.storages.iter().enumerate() {
                prop_assert_eq!(a.offset % ALIGN_FLOATS, 0);
                prop_assert!(a.offset + a.len <= p.arena_floats);
                for b in &p.storages[i + 1..] {
                    let live_overlap = a.first <= b.last && b.first <= a.last;
                    let mem_overlap = a.offset < b.offset + b.len && b.offset < a.offset + a.len;
                    prop_assert!(!(live_overlap && mem_overlap), "{:?} vs {:?}", a, b);
                }
            }
            // Every node's inputs and outputs are in the arena, with the right length.
            for node in &g.nodes {
                for &o in &node.outputs {
                    let (_, len) = p.range(o).unwrap();
                    prop_assert_eq!(len, g.tensors[o].numel());
                }
            }
        }
    }

    #[test]
    fn chain_reuses_memory() {
        // x -> a -> b -> c -> d, all 1000 floats: the input keeps its own
        // buffer (it lives to the end), and two more suffice for the chain.
        let g = random_graph(
            &[1000],
            &[(0, 0, false), (1, 1, false), (2, 2, false), (3, 3, false)],
        );
        let p = plan_arena(&g);
        assert!(p.arena_floats <= 3 * 1008, "{}", p.arena_floats);
        assert_eq!(p.naive_floats, 5 * 1008);
        // No later tensor takes the input's storage.
        let (xo, xl) = p.range(g.inputs[0]).unwrap();
        for &t in g.nodes.iter().flat_map(|n| &n.outputs) {
            let (o, l) = p.range(t).unwrap();
            assert!(o + l <= xo || xo + xl <= o, "tensor {t} overlaps the input");
        }
    }
}
