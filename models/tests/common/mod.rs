//! Synthetic detector models whose outputs the test controls: each output
//! is a constant head tensor plus `0 × mean(image)`, so the graph really
//! consumes the preprocessed frame while its outputs stay exactly known.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use osprey_engine::onnx::builder::{attr_i, attr_ints, ModelBuilder};
use osprey_engine::onnx::import;
use osprey_engine::Engine;
use osprey_models::vision::desc::ModelDesc;

/// An engine with image input `images` `[1,3,h,w]` and one output per
/// `(name, shape, data)` head.
pub fn const_head_engine(
    h: usize,
    w: usize,
    heads: &[(&str, Vec<usize>, Vec<f32>)],
) -> Arc<Engine> {
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
    let g = import(&m.to_bytes(), &HashMap::new()).expect("synthetic model imports");
    Arc::new(Engine::new(g).expect("synthetic engine"))
}

/// A description parsed from TOML text, with labels resolved against `dir`.
pub fn desc(text: &str, dir: &Path) -> ModelDesc {
    ModelDesc::parse(text, dir).expect("description parses")
}

/// A labels file with `n` classes `c0`, `c1`, … in a temp dir.
pub fn labels_dir(tag: &str, n: usize) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("osprey-labels-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text: String = (0..n).map(|i| format!("c{i}\n")).collect();
    std::fs::write(dir.join("labels.txt"), text).unwrap();
    dir
}
