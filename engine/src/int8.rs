//! Which layers may run in INT8: the builder's side of quantization.
//!
//! [`permit_int8`] marks every convolution that has an INT8 kernel and a
//! calibrated scale for its input (`ConvAttrs::int8_input_scale`); the
//! others stay FP32 and say why. Weights are quantized per output channel
//! when the engine is prepared (`osprey_kernels::qconv`), so the graph keeps
//! its FP32 weights and a layer can be reverted to FP32 by clearing the mark
//! ([`revert`]) — how per-layer fallback and the accuracy budget work.

use serde::Serialize;

use crate::ir::{Graph, Op};

/// One convolution's INT8 status.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Int8Layer {
    /// Node index.
    pub node: usize,
    /// Node name.
    pub name: String,
    /// Input tensor name.
    pub input: String,
    /// Output tensor name.
    pub output: String,
    /// The input's scale, when INT8 is permitted.
    pub input_scale: Option<f32>,
    /// Why the layer stays FP32 (`None` while it is INT8).
    pub fallback: Option<String>,
}

/// Marks convolutions as INT8 where possible; `scale_of(tensor name)` gives
/// the calibrated input scale. Returns one entry per convolution.
pub fn permit_int8(g: &mut Graph, scale_of: &dyn Fn(&str) -> Option<f32>) -> Vec<Int8Layer> {
    let mut out = Vec::new();
    for i in 0..g.nodes.len() {
        let (x, y) = match (g.nodes[i].inputs.first(), g.nodes[i].outputs.first()) {
            (Some(&x), Some(&y)) => (x, y),
            _ => continue,
        };
        let input = g.tensors[x].name.clone();
        let output = g.tensors[y].name.clone();
        let name = g.nodes[i].name.clone();
        let Op::Conv(a) = &mut g.nodes[i].op else {
            continue;
        };
        let scale = scale_of(&input);
        let fallback = if a.groups != 1 {
            Some(format!(
                "depthwise/grouped convolution: no INT8 kernel ({} groups)",
                a.groups
            ))
        } else {
            match scale {
                None => Some(format!("no calibration scale: input '{input}'")),
                Some(s) if !(s.is_finite() && s > 0.0) => {
                    Some(format!("input '{input}' has an unusable scale {s}"))
                }
                Some(_) => None,
            }
        };
        a.int8_input_scale = if fallback.is_none() { scale } else { None };
        out.push(Int8Layer {
            node: i,
            name,
            input,
            output,
            input_scale: a.int8_input_scale,
            fallback,
        });
    }
    out
}

/// Clears the INT8 mark of `layer` (it runs FP32), recording `why`.
pub fn revert(g: &mut Graph, layer: &mut Int8Layer, why: String) {
    if let Some(node) = g.nodes.get_mut(layer.node) {
        if let Op::Conv(a) = &mut node.op {
            a.int8_input_scale = None;
        }
    }
    layer.input_scale = None;
    layer.fallback = Some(why);
}

/// Whether any node is marked INT8.
pub fn has_int8(g: &Graph) -> bool {
    g.nodes
        .iter()
        .any(|n| matches!(&n.op, Op::Conv(a) if a.int8_input_scale.is_some()))
}

/// A copy of `g` with every INT8 mark cleared (the FP32 reference).
pub fn without_int8(g: &Graph) -> Graph {
    let mut g = g.clone();
    for n in &mut g.nodes {
        if let Op::Conv(a) = &mut n.op {
            a.int8_input_scale = None;
        }
    }
    g
}

/// Signal-to-quantization-noise ratio in dB of `test` against `reference`
/// (infinite when they are equal; accumulate sums with [`Sqnr`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sqnr {
    signal: f64,
    noise: f64,
}

impl Sqnr {
    /// Adds one pair of tensors.
    pub fn add(&mut self, reference: &[f32], test: &[f32]) {
        for (&r, &t) in reference.iter().zip(test) {
            self.signal += (r as f64) * (r as f64);
            self.noise += ((r - t) as f64) * ((r - t) as f64);
        }
    }
    /// `10·log10(Σ r² / Σ (r − t)²)`; +∞ without noise.
    pub fn db(&self) -> f64 {
        if self.noise == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (self.signal / self.noise).log10()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqnr_of_known_noise() {
        let mut s = Sqnr::default();
        s.add(&[1.0, -1.0, 1.0, -1.0], &[1.1, -0.9, 0.9, -1.1]);
        // signal 4, noise 4 * 0.01 -> 20 dB.
        assert!((s.db() - 20.0).abs() < 1e-4, "{}", s.db());
        let mut e = Sqnr::default();
        e.add(&[1.0, 2.0], &[1.0, 2.0]);
        assert_eq!(e.db(), f64::INFINITY);
    }

    #[test]
    fn qdq_models_import_with_their_scales() {
        // Symmetric INT8 activations: the scale as given.
        let g = crate::onnx::import(&crate::testing::qdq_conv_model(None), &Default::default())
            .unwrap();
        assert_eq!(g.quant_scales.get("x"), Some(&0.02));
        assert_eq!(g.quant_scales.get("xd"), Some(&0.02));
        // Weights folded: (q - 0) * scale of their output channel.
        let conv = g
            .nodes
            .iter()
            .find(|n| matches!(n.op, Op::Conv(_)))
            .unwrap();
        let w = g.tensors[conv.inputs[1]].value.as_ref().unwrap().to_f32();
        assert_eq!(w.len(), 108);
        assert_eq!(w[0], 0.0);
        assert_eq!(w[1], 37.0 * 0.01);
        assert_eq!(w[27 + 4], ((4 * 37 + 27 * 37) % 255) as i8 as f32 * 0.02);
        // UINT8 with zero point 128: range [-128, 127]·s -> symmetric 128·s/127.
        let g = crate::onnx::import(
            &crate::testing::qdq_conv_model(Some(128)),
            &Default::default(),
        )
        .unwrap();
        let s = g.quant_scales["x"];
        assert!((s - 128.0 * 0.02 / 127.0).abs() < 1e-7, "{s}");
        // UINT8 with zero point 0 (post-ReLU style): [0, 255]·s.
        let g = crate::onnx::import(
            &crate::testing::qdq_conv_model(Some(0)),
            &Default::default(),
        )
        .unwrap();
        assert!((g.quant_scales["x"] - 255.0 * 0.02 / 127.0).abs() < 1e-7);
    }

    #[test]
    fn permits_plain_convs_only_with_a_scale() {
        use crate::onnx::builder::{attr_i, attr_ints, ModelBuilder};
        let w = |n: usize| {
            (0..n)
                .map(|i| (i % 7) as f32 * 0.1 - 0.3)
                .collect::<Vec<_>>()
        };
        let mut b = ModelBuilder::new(13);
        b.input("x", &[1, 4, 6, 6])
            .init_f32("w1", &[4, 4, 3, 3], &w(144))
            .init_f32("w2", &[4, 1, 3, 3], &w(36))
            .init_f32("w3", &[2, 4, 1, 1], &w(8))
            .node(
                "Conv",
                &["x", "w1"],
                &["y"],
                vec![attr_ints("pads", &[1, 1, 1, 1])],
            )
            .node(
                "Conv",
                &["y", "w2"],
                &["z"],
                vec![attr_ints("pads", &[1, 1, 1, 1]), attr_i("group", 4)],
            )
            .node("Conv", &["z", "w3"], &["o"], vec![])
            .output("o");
        let mut g = crate::onnx::import(&b.to_bytes(), &Default::default()).unwrap();
        let layers = permit_int8(&mut g, &|n| (n == "x").then_some(0.05));
        assert_eq!(layers.len(), 3);
        assert_eq!(layers[0].input_scale, Some(0.05));
        assert!(layers[0].fallback.is_none());
        assert!(layers[1].fallback.as_deref().unwrap().contains("depthwise"));
        assert!(layers[2]
            .fallback
            .as_deref()
            .unwrap()
            .contains("no calibration scale"));
        assert!(has_int8(&g));
        assert!(!has_int8(&without_int8(&g)));
        let mut l0 = layers[0].clone();
        revert(&mut g, &mut l0, "test".into());
        assert!(!has_int8(&g));
        assert_eq!(l0.fallback.as_deref(), Some("test"));
    }
}
