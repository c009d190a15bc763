//! Internal layout choice: run the convolutional body of a model
//! channels-last (NHWC), with the layout conversions at the region's
//! boundary only.
//!
//! ONNX tensors are NCHW. Depthwise convolutions and element-wise chains
//! vectorise best across channels, which NHWC makes contiguous (see
//! [`osprey_kernels::conv_nhwc`]). This pass gives every 4-D tensor produced
//! by a node it can convert a channels-last twin, and converts:
//!
//! * `Conv` (FP32 or INT8; groups 1 or depthwise) → the same convolution with
//!   [`ConvAttrs::channels_last`](crate::ir::ConvAttrs::channels_last);
//! * element-wise `Unary`, and `Binary` whose other operand is 4-D at run
//!   time or a per-channel / scalar constant (permuted here);
//! * `GlobalAveragePool`, and `ReduceMean` over H and W keeping them, →
//!   `ReduceMean` over the channels-last spatial axes;
//! * `Resize` → the same resize of the middle two dimensions;
//! * `Concat` along channels → along the last axis.
//!
//! Element-wise ops and concatenations are converted only where one of their
//! inputs is already channels-last, so a region starts at a convolution.
//! Every other reader of a converted tensor, and every graph output, gets
//! the NCHW tensor back through one `Transpose`; a graph input is
//! transposed once, on its first channels-last reader. A tensor of 1×1
//! pixels is the same bytes in both layouts: its conversions are free
//! views. Graph inputs and outputs keep their names, shapes and layout.
//!
//! The pass is not in the default pipeline: `osprey build --layout`
//! chooses (by default it times the model both ways and keeps the faster).

use std::collections::HashMap;

use osprey_kernels::conv_nhwc::Conv2dNhwc;
use osprey_kernels::qconv_nhwc::QConv2dNhwc;

use crate::ir::{ConstData, Graph, Node, Op, Tensor, TensorId};

/// What the pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LayoutReport {
    /// Nodes now running channels-last.
    pub converted: usize,
    /// Layout conversions inserted that move data (`Transpose`).
    pub transposes: usize,
    /// Conversions that are free views (tensors of 1×1 pixels).
    pub views: usize,
}

/// `[n, c, h, w]` → `[n, h, w, c]`.
fn nhwc_shape(s: &[usize]) -> Vec<usize> {
    vec![s[0], s[2], s[3], s[1]]
}

/// Rewrites `g` to run channels-last where it can; see the module docs.
pub fn channels_last(g: &mut Graph) -> LayoutReport {
    let mut p = Rewriter {
        twin: HashMap::new(),
        ready: vec![true; g.tensors.len()],
        out: Vec::with_capacity(g.nodes.len()),
        report: LayoutReport::default(),
    };
    for n in &g.nodes {
        for &o in &n.outputs {
            p.ready[o] = false;
        }
    }
    let nodes = std::mem::take(&mut g.nodes);
    for node in nodes {
        match convertible(g, &node, &p.twin) {
            Some(op) => p.convert(g, node, op),
            None => {
                for &t in &node.inputs {
                    p.nchw(g, t);
                }
                for &o in &node.outputs {
                    p.ready[o] = true;
                }
                p.out.push(node);
            }
        }
    }
    for t in g.outputs.clone() {
        p.nchw(g, t);
    }
    g.nodes = p.out;
    p.report
}

struct Rewriter {
    /// NCHW tensor → its channels-last twin.
    twin: HashMap<TensorId, TensorId>,
    /// The NCHW tensor exists at this point of the new node list.
    ready: Vec<bool>,
    out: Vec<Node>,
    report: LayoutReport,
}

impl Rewriter {
    /// Emits a conversion node `from → to` (a view for 1×1 pixels).
    fn conversion(&mut self, g: &Graph, from: TensorId, to: TensorId, perm: [usize; 4], hw: usize) {
        let (op, onnx_op) = if hw == 1 {
            self.report.views += 1;
            (Op::Reshape, "Reshape")
        } else {
            self.report.transposes += 1;
            (
                Op::Transpose {
                    perm: perm.to_vec(),
                },
                "Transpose",
            )
        };
        self.out.push(Node {
            name: format!("{}:layout", g.tensors[to].name),
            onnx_op: onnx_op.into(),
            op,
            inputs: vec![from],
            outputs: vec![to],
        });
    }

    /// The channels-last twin of a 4-D runtime tensor, converting it first
    /// if it only exists as NCHW.
    fn nhwc(&mut self, g: &mut Graph, t: TensorId) -> TensorId {
        if let Some(&u) = self.twin.get(&t) {
            return u;
        }
        let s = g.tensors[t].shape.clone();
        let u = g.add_tensor(Tensor {
            name: format!("{}:nhwc", g.tensors[t].name),
            shape: nhwc_shape(&s),
            dtype: g.tensors[t].dtype,
            value: None,
        });
        self.ready.push(false);
        self.conversion(g, t, u, [0, 2, 3, 1], s[2] * s[3]);
        self.twin.insert(t, u);
        u
    }

    /// Makes the NCHW tensor `t` exist (converting its twin back if needed).
    fn nchw(&mut self, g: &Graph, t: TensorId) {
        if self.ready[t] {
            return;
        }
        if let Some(&u) = self.twin.get(&t) {
            let s = &g.tensors[t].shape;
            self.conversion(g, u, t, [0, 3, 1, 2], s[2] * s[3]);
            self.ready[t] = true;
        }
    }

    fn convert(&mut self, g: &mut Graph, mut node: Node, op: Op) {
        let conv = matches!(op, Op::Conv(_));
        let mut inputs = Vec::with_capacity(node.inputs.len());
        for (k, &t) in node.inputs.iter().enumerate() {
            // A convolution's weights and bias (operands 1 and 2) stay as they are.
            let operand = !conv || k == 0 || k == 3;
            inputs.push(if !operand {
                t
            } else if g.tensors[t].is_const() {
                per_channel_const(g, t)
            } else {
                self.nhwc(g, t)
            });
        }
        let mut outputs = Vec::with_capacity(node.outputs.len());
        for &o in &node.outputs {
            let u = g.add_tensor(Tensor {
                name: format!("{}:nhwc", g.tensors[o].name),
                shape: nhwc_shape(&g.tensors[o].shape),
                dtype: g.tensors[o].dtype,
                value: None,
            });
            self.ready.push(true);
            self.twin.insert(o, u);
            outputs.push(u);
        }
        node.op = op;
        node.inputs = inputs;
        node.outputs = outputs;
        self.out.push(node);
        self.report.converted += 1;
    }
}

/// A constant operand of a channels-last `Binary`: per-channel
/// (`[.., c, 1, 1]`) becomes `[.., 1, 1, c]` (same values); a single value
/// is used as it is.
fn per_channel_const(g: &mut Graph, t: TensorId) -> TensorId {
    let s = &g.tensors[t].shape;
    if s.iter().product::<usize>() == 1 {
        return t;
    }
    let mut s4 = vec![1usize; 4usize.saturating_sub(s.len())];
    s4.extend_from_slice(s);
    let mut c = g.tensors[t].clone();
    c.name = format!("{}:nhwc", c.name);
    c.shape = nhwc_shape(&s4);
    g.add_tensor(c)
}

/// True for a constant [`per_channel_const`] can lay out channels-last.
fn const_fits(t: &Tensor) -> bool {
    let numel: usize = t.shape.iter().product();
    let r = t.shape.len();
    numel == 1
        || ((3..=4).contains(&r)
            && t.shape[r - 1] == 1
            && t.shape[r - 2] == 1
            && matches!(t.value, Some(ConstData::F32(_))))
}

/// The channels-last form of `node`, or `None` to leave it NCHW.
fn convertible(g: &Graph, node: &Node, twin: &HashMap<TensorId, TensorId>) -> Option<Op> {
    let rank4 = |t: TensorId| g.tensors[t].shape.len() == 4 && !g.tensors[t].is_const();
    let x = *node.inputs.first()?;
    let y = *node.outputs.first()?;
    let any_nhwc = node.inputs.iter().any(|t| twin.contains_key(t));
    match &node.op {
        Op::Conv(a) if !a.channels_last => {
            if !rank4(x) || g.tensors[y].shape.len() != 4 {
                return None;
            }
            if node.inputs[1..]
                .iter()
                .take(2)
                .any(|&t| !g.tensors[t].is_const())
            {
                return None;
            }
            if a.residual && !node.inputs.get(3).is_some_and(|&t| rank4(t)) {
                return None;
            }
            let geo = a.geometry(&g.tensors[x].shape, &g.tensors[y].shape);
            // An INT8 layer needs both kernels: tuning may keep it FP32.
            let int8_ok = a.int8_input_scale.is_none() || QConv2dNhwc::supports(&geo);
            (Conv2dNhwc::supports(&geo) && int8_ok).then(|| {
                let mut b = *a;
                b.channels_last = true;
                Op::Conv(b)
            })
        }
        Op::Unary(_) if any_nhwc && rank4(x) => Some(node.op.clone()),
        Op::Binary(_) if any_nhwc && g.tensors[y].shape.len() == 4 => {
            let ok = node.inputs.iter().all(|&t| {
                let tensor = &g.tensors[t];
                if tensor.is_const() {
                    const_fits(tensor)
                } else {
                    tensor.shape.len() == 4
                }
            });
            ok.then(|| node.op.clone())
        }
        Op::GlobalAveragePool if any_nhwc && rank4(x) => Some(Op::ReduceMean { axes: vec![1, 2] }),
        // The spatial mean with kept dimensions (how TF exports squeeze-excitation).
        Op::ReduceMean { axes }
            if any_nhwc && rank4(x) && axes[..] == [2, 3] && g.tensors[y].shape.len() == 4 =>
        {
            Some(Op::ReduceMean { axes: vec![1, 2] })
        }
        Op::Resize {
            mode,
            coord,
            scales,
            channels_last: false,
        } if any_nhwc && rank4(x) => Some(Op::Resize {
            mode: *mode,
            coord: *coord,
            scales: *scales,
            channels_last: true,
        }),
        Op::Concat { axis: 1, act } if any_nhwc && node.inputs.iter().all(|&t| rank4(t)) => {
            Some(Op::Concat { axis: 3, act: *act })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{attr_i, attr_ints, attr_s, ModelBuilder};
    use crate::passes::test_util::*;
    use crate::passes::{fuse_activation, fuse_residual, recognize_activations};

    /// Runs a graph on input "x" before and after the pass (outputs must
    /// agree); returns the rewritten graph's op list and the report.
    fn check(m: &ModelBuilder, x_len: usize) -> (Vec<String>, LayoutReport) {
        let mut g = import(m);
        fuse_residual(&mut g);
        recognize_activations(&mut g);
        fuse_activation(&mut g);
        let x = data(x_len, 5);
        let before = run(g.clone(), &x);
        let report = channels_last(&mut g);
        g.validate().expect("valid graph");
        let after = run(g.clone(), &x);
        assert_same(&after, &before);
        (ops(&g), report)
    }

    #[allow(clippy::too_many_arguments)]
    fn conv(
        m: &mut ModelBuilder,
        name: &str,
        x: &str,
        cin: usize,
        cout: usize,
        k: usize,
        groups: usize,
        y: &str,
    ) {
        let w = data(cout * cin / groups * k * k, cin as u64 * 31 + cout as u64);
        let wn = format!("{name}.w");
        let bn = format!("{name}.b");
        m.init_f32(&wn, &[cout, cin / groups, k, k], &w);
        m.init_f32(&bn, &[cout], &data(cout, 3));
        let p = (k / 2) as i64;
        m.node(
            "Conv",
            &[x, &wn, &bn],
            &[y],
            vec![
                attr_ints("pads", &[p, p, p, p]),
                attr_i("group", groups as i64),
            ],
        );
    }

    /// An inverted-residual block with squeeze-excitation, pooled and
    /// flattened: every op converts, so only the input is transposed.
    #[test]
    fn mobile_block_runs_channels_last_between_input_and_pool() {
        let mut m = ModelBuilder::new(13);
        m.input("x", &[1, 8, 9, 10]);
        conv(&mut m, "e", "x", 8, 24, 1, 1, "e");
        m.node("Relu", &["e"], &["er"], vec![]);
        conv(&mut m, "d", "er", 24, 24, 3, 24, "d");
        m.node("Sigmoid", &["d"], &["ds"], vec![]);
        m.node("Mul", &["d", "ds"], &["dm"], vec![]);
        m.node("GlobalAveragePool", &["dm"], &["se"], vec![]);
        conv(&mut m, "s", "se", 24, 24, 1, 1, "sg");
        m.node("Sigmoid", &["sg"], &["sgs"], vec![]);
        m.node("Mul", &["dm", "sgs"], &["scaled"], vec![]);
        conv(&mut m, "p", "scaled", 24, 8, 1, 1, "p");
        m.node("Add", &["p", "x"], &["r"], vec![]);
        m.init_f32("k", &[8, 1, 1], &data(8, 9));
        m.node("Mul", &["r", "k"], &["rk"], vec![]);
        m.node("GlobalAveragePool", &["rk"], &["g"], vec![]);
        m.node("Flatten", &["g"], &["y"], vec![]);
        m.output("y");
        let (ops, r) = check(&m, 8 * 90);
        assert_eq!(
            ops,
            [
                "Transpose",
                "Conv+Relu",
                "Conv+Silu",
                "ReduceMean",
                "Conv+Sigmoid",
                "Mul",
                "Conv+Add",
                "Mul",
                "ReduceMean",
                "Reshape",
                "Reshape"
            ]
        );
        assert_eq!((r.converted, r.transposes, r.views), (8, 1, 1), "{r:?}");
    }

    /// A reader without a channels-last form (MaxPool), a grouped
    /// convolution and a spatially varying constant stay NCHW, with the
    /// conversions around them; outputs are NCHW.
    #[test]
    fn unsupported_readers_get_nchw_back() {
        let mut m = ModelBuilder::new(13);
        m.input("x", &[2, 4, 6, 6]);
        conv(&mut m, "a", "x", 4, 8, 3, 1, "a");
        m.node(
            "MaxPool",
            &["a"],
            &["mp"],
            vec![
                attr_ints("kernel_shape", &[2, 2]),
                attr_ints("strides", &[2, 2]),
            ],
        );
        conv(&mut m, "g", "a", 8, 8, 3, 2, "grouped");
        m.init_f32("plane", &[1, 1, 6, 6], &data(36, 4));
        m.node("Add", &["a", "plane"], &["ap"], vec![]);
        m.node("Relu", &["a"], &["ar"], vec![]);
        m.output("mp");
        m.output("grouped");
        m.output("ap");
        m.output("ar");
        let (ops, r) = check(&m, 2 * 4 * 36);
        assert_eq!(
            ops,
            [
                "Transpose",
                "Conv",
                "Transpose",
                "MaxPool",
                "Conv",
                "Add",
                "Relu",
                "Transpose"
            ]
        );
        assert_eq!((r.converted, r.transposes, r.views), (2, 3, 0));
    }

    /// Convolutions the channels-last kernels do not cover (grouped) are
    /// left alone, and nothing is converted around them.
    #[test]
    fn a_graph_without_convertible_convolutions_is_unchanged() {
        let mut m = ModelBuilder::new(13);
        m.input("x", &[1, 8, 5, 5]);
        conv(&mut m, "g", "x", 8, 8, 3, 4, "y0");
        m.node("Relu", &["y0"], &["y"], vec![]);
        m.output("y");
        let (ops, r) = check(&m, 200);
        assert_eq!(ops, ["Conv+Relu"]);
        assert_eq!(r, LayoutReport::default());
    }

    #[test]
    fn channel_concat_and_resize_stay_channels_last() {
        let mut m = ModelBuilder::new(13);
        m.input("x", &[1, 3, 7, 5]);
        conv(&mut m, "a", "x", 3, 5, 3, 1, "a");
        conv(&mut m, "b", "x", 3, 6, 1, 1, "b");
        m.node("Concat", &["a", "b", "x"], &["c"], vec![attr_i("axis", 1)]);
        m.init_i64("sizes", &[4], &[1, 14, 11, 8]);
        m.node(
            "Resize",
            &["c", "", "", "sizes"],
            &["up"],
            vec![attr_s("mode", "linear")],
        );
        conv(&mut m, "c", "up", 14, 4, 3, 1, "y");
        m.output("y");
        let (ops, r) = check(&m, 105);
        assert_eq!(
            ops,
            [
                "Transpose",
                "Conv",
                "Conv",
                "Concat",
                "Resize",
                "Conv",
                "Transpose"
            ]
        );
        assert_eq!((r.converted, r.transposes), (5, 2));
    }
}
