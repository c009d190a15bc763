//! Synthetic detector models whose outputs the test controls (see
//! `osprey_models::vision::testing`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

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
    let bytes = osprey_models::vision::testing::const_head_onnx(h, w, heads);
    let g = import(&bytes, &HashMap::new()).expect("synthetic model imports");
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
