//! After the first frame, a detector pipeline (preprocessing from NV12,
//! the engine, CenterNet and YOLO decoding with NMS) and a classifier
//! allocate nothing per frame — proven with a counting global allocator.
//!
//! This file holds a single test so no other test allocates concurrently.

mod common;

use common::{const_head_engine, desc, labels_dir};
use osprey_models::vision::{Classifier, Detector, Frame, PixelFormat};

#[global_allocator]
static GLOBAL: osprey_engine::testing::Counting = osprey_engine::testing::Counting;

#[test]
fn pipelines_allocate_nothing_after_the_first_frame() {
    let dir = labels_dir("noalloc", 3);
    let (c, h, w) = (3, 16, 16);
    let heat: Vec<f32> = (0..c * h * w)
        .map(|i| ((i * 7919) % 97) as f32 / 97.0)
        .collect();
    let wh: Vec<f32> = (0..4 * h * w).map(|i| 2.0 + (i % 5) as f32).collect();
    let cn = const_head_engine(
        64,
        64,
        &[
            ("heat", vec![1, c, h, w], heat),
            ("wh", vec![1, 4, h, w], wh),
        ],
    );
    let cn_desc = r#"
kind = "detector"
decoder = "centernet"
labels = "labels.txt"
[input]
name = "images"
width = 64
height = 64
[preprocess]
filter = "tf_legacy_bilinear"
[decode]
heatmap = "heat"
boxes = "wh"
score_threshold = 0.05
max_detections = 50
"#;
    let n = 200;
    let yolo_head: Vec<f32> = (0..n * 8)
        .map(|i| match i % 8 {
            0 | 1 => ((i * 31) % 64) as f32,
            2 | 3 => 4.0 + (i % 9) as f32,
            _ => ((i * 13) % 100) as f32 / 100.0,
        })
        .collect();
    let yolo = const_head_engine(64, 64, &[("output0", vec![1, n, 8], yolo_head)]);
    let yolo_desc = cn_desc
        .replace("centernet", "yolov5")
        .replace("heatmap = \"heat\"\nboxes = \"wh\"\n", "")
        .replace("tf_legacy_bilinear\"", "bilinear\"\nresize = \"letterbox\"");
    let cls = const_head_engine(64, 64, &[("logits", vec![1, 3], vec![0.5, 2.0, -1.0])]);
    let cls_desc = r#"
kind = "classifier"
decoder = "softmax"
labels = "labels.txt"
[input]
name = "images"
width = 64
height = 64
[preprocess]
filter = "pillow_bilinear"
"#;
    let mut detectors = [
        Detector::new(cn, desc(cn_desc, &dir), 2).unwrap(),
        Detector::new(yolo, desc(&yolo_desc, &dir), 2).unwrap(),
    ];
    let mut classifier = Classifier::new(cls, desc(cls_desc, &dir), 2).unwrap();
    let nv12: Vec<u8> = (0..320 * 240 * 3 / 2)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let frame = Frame::packed(&nv12, PixelFormat::Nv12, 320, 240).unwrap();
    for d in detectors.iter_mut() {
        let found = d.detect(&frame).unwrap().0.len();
        assert!(
            found > 3,
            "the synthetic heads should give several boxes, got {found}"
        );
    }
    classifier.classify(&frame, 3).unwrap();
    let allocs = osprey_engine::testing::allocations_in(|| {
        for _ in 0..10 {
            for d in detectors.iter_mut() {
                d.detect(&frame).unwrap();
            }
            classifier.classify(&frame, 3).unwrap();
        }
    });
    assert_eq!(allocs, 0, "allocations after warm-up");
}
