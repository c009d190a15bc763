//! Synthetic vision models built in code, for tests across crates: each
//! output is a constant head tensor plus `0 × mean(image)`, so the graph
//! really consumes the preprocessed frame while its outputs stay exactly
//! known.

use osprey_engine::onnx::builder::{attr_i, attr_ints, ModelBuilder};

/// ONNX bytes of a model with image input `images` `[1,3,h,w]` and one
/// output per `(name, shape, data)` head.
pub fn const_head_onnx(h: usize, w: usize, heads: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let mut m = ModelBuilder::new(13);
    m.input("images", &[1, 3, h as i64, w as i64]);
    m.node(
        "ReduceMean",
        &["images"],
        &["mean"],
        vec![attr_ints("axes", &[1, 2, 3]), attr_i("keepdims", 1)],
    );
    m.init_f32("zero", &[1], &[0.0]);
    m.node("Mul", &["mean", "zero"], &["nothing"], vec![]);
    for (i, (name, shape, data)) in heads.iter().enumerate() {
        let rank = shape.len();
        let flat = format!("flat{i}");
        let shp = format!("shape{i}");
        m.init_i64(&shp, &[rank], &vec![1; rank]);
        m.node("Reshape", &["nothing", &shp], &[&flat], vec![]);
        let k = format!("head{i}");
        m.init_f32(&k, shape, data);
        m.node("Add", &[&k, &flat], &[name], vec![]);
        m.output(name);
    }
    m.to_bytes()
}

/// A YOLOv5 head `[1, n, 5 + classes]` with `n` boxes spread over a
/// `size`×`size` input, deterministic scores.
pub fn yolo_head(n: usize, classes: usize, size: usize) -> Vec<f32> {
    let width = 5 + classes;
    (0..n * width)
        .map(|i| {
            let (b, k) = (i / width, i % width);
            match k {
                0 => ((b * 37) % size) as f32,
                1 => ((b * 53) % size) as f32,
                2 | 3 => 4.0 + (b % 9) as f32,
                4 => 0.5 + (b % 5) as f32 / 10.0,
                _ => ((b * 13 + k * 7) % 100) as f32 / 100.0,
            }
        })
        .collect()
}
