//! YOLOv5, YOLOv8 and CenterNet pipelines end to end (frame → engine →
//! decode) on synthetic ONNX graphs whose head outputs the test controls.
//! Expected boxes are worked out by hand from the Ultralytics / CENTERNET.md
//! conventions, independently of the decoder code.

mod common;

use common::{const_head_engine, desc, labels_dir};
use osprey_models::vision::{Detector, Frame, PixelFormat};

fn yolo_desc(decoder: &str, dir: &std::path::Path) -> String {
    format!(
        r#"
kind = "detector"
decoder = "{decoder}"
labels = "labels.txt"
[input]
name = "images"
width = 64
height = 64
[preprocess]
resize = "letterbox"
filter = "bilinear"
scale = 0.00392156862745098
pad_value = 114
[decode]
score_threshold = 0.25
nms_iou = 0.45
"#
    ) + &format!("# labels in {}\n", dir.display())
}

/// A 128×64 grey RGB frame: letterboxed into 64×64 it becomes 64×32 at
/// pad_y = 16, scale 2 back to the source.
fn frame_data() -> Vec<u8> {
    vec![90u8; 128 * 64 * 3]
}

fn close(a: [f32; 4], b: [f32; 4]) -> bool {
    a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-4)
}

#[test]
fn yolov5_head_decodes_with_class_aware_nms_and_letterbox() {
    let dir = labels_dir("v5", 3);
    // Rows: cx, cy, w, h, obj, p(c0), p(c1), p(c2) in 64×64 input pixels.
    let rows: [[f32; 8]; 5] = [
        [32.0, 32.0, 16.0, 8.0, 0.9, 0.1, 0.9, 0.0],  // c1, 0.81
        [33.0, 32.0, 16.0, 8.0, 0.8, 0.1, 0.9, 0.0],  // c1, 0.72, IoU 0.88 with row 0 → suppressed
        [33.0, 32.0, 16.0, 8.0, 0.9, 0.8, 0.1, 0.0],  // c0, 0.72, other class → kept
        [10.0, 20.0, 4.0, 4.0, 0.2, 0.0, 0.0, 1.0],   // objectness 0.2 ≤ 0.25 → dropped
        [60.0, 44.0, 12.0, 12.0, 0.5, 0.0, 0.0, 0.6], // c2, 0.30, crosses the right edge → clipped
    ];
    let head: Vec<f32> = rows.iter().flatten().cloned().collect();
    let engine = const_head_engine(64, 64, &[("output0", vec![1, 5, 8], head)]);
    let mut det = Detector::new(engine, desc(&yolo_desc("yolov5", &dir), &dir), 1).unwrap();
    let px = frame_data();
    let frame = Frame::packed(&px, PixelFormat::Rgb8, 128, 64).unwrap();
    let (got, _) = det.detect(&frame).unwrap();
    // Source box = ((x − 0)·2, (y − 16)·2), clipped to 128×64.
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0].class_id, 1);
    assert!((got[0].score - 0.81).abs() < 1e-6);
    assert!(
        close(got[0].bbox(), [48.0, 24.0, 80.0, 40.0]),
        "{:?}",
        got[0]
    );
    assert_eq!(got[1].class_id, 0);
    assert!(
        close(got[1].bbox(), [50.0, 24.0, 82.0, 40.0]),
        "{:?}",
        got[1]
    );
    assert_eq!(got[2].class_id, 2);
    assert!(
        close(got[2].bbox(), [108.0, 44.0, 128.0, 64.0]),
        "{:?}",
        got[2]
    );
}

#[test]
fn yolov8_head_decodes_channel_major() {
    let dir = labels_dir("v8", 2);
    // [1, 4 + 2, 3]: anchors in columns.
    let anchors: [[f32; 6]; 3] = [
        [16.0, 40.0, 8.0, 8.0, 0.7, 0.1],  // c0 0.7
        [17.0, 40.0, 8.0, 8.0, 0.6, 0.65], // c1 0.65: other class → kept
        [48.0, 24.0, 10.0, 4.0, 0.1, 0.2], // 0.2 ≤ 0.25 → dropped
    ];
    let mut head = vec![0.0f32; 6 * 3];
    for (i, a) in anchors.iter().enumerate() {
        for (k, v) in a.iter().enumerate() {
            head[k * 3 + i] = *v;
        }
    }
    let engine = const_head_engine(64, 64, &[("output0", vec![1, 6, 3], head)]);
    let mut det = Detector::new(engine, desc(&yolo_desc("yolov8", &dir), &dir), 1).unwrap();
    let px = frame_data();
    let frame = Frame::packed(&px, PixelFormat::Rgb8, 128, 64).unwrap();
    let (got, _) = det.detect(&frame).unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!((got[0].class_id, got[0].score), (0, 0.7));
    assert!(
        close(got[0].bbox(), [24.0, 40.0, 40.0, 56.0]),
        "{:?}",
        got[0]
    );
    assert_eq!((got[1].class_id, got[1].score), (1, 0.65));
    // Class-agnostic NMS would drop the second (IoU 0.78).
    let text = yolo_desc("yolov8", &dir).replace("[decode]", "[decode]\nclass_agnostic_nms = true");
    let engine = const_head_engine(
        64,
        64,
        &[("output0", vec![1, 6, 3], {
            let mut h = vec![0.0f32; 18];
            for (i, a) in anchors.iter().enumerate() {
                for (k, v) in a.iter().enumerate() {
                    h[k * 3 + i] = *v;
                }
            }
            h
        })],
    );
    let mut det = Detector::new(engine, desc(&text, &dir), 1).unwrap();
    assert_eq!(det.detect(&frame).unwrap().0.len(), 1);
}

#[test]
fn yolo_shape_and_label_mismatches_are_errors() {
    let dir = labels_dir("bad", 4);
    // Labels say 4 classes, head has 3.
    let engine = const_head_engine(64, 64, &[("output0", vec![1, 2, 8], vec![0.0; 16])]);
    let mut det = Detector::new(engine, desc(&yolo_desc("yolov5", &dir), &dir), 1).unwrap();
    let px = frame_data();
    let frame = Frame::packed(&px, PixelFormat::Rgb8, 128, 64).unwrap();
    let e = det.detect(&frame).unwrap_err().to_string();
    assert!(e.contains("classes"), "{e}");
    // Input size in the description differs from the model.
    let engine = const_head_engine(32, 32, &[("output0", vec![1, 2, 9], vec![0.0; 18])]);
    let e = Detector::new(engine, desc(&yolo_desc("yolov5", &dir), &dir), 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("shape"), "{e}");
}

#[test]
fn centernet_pipeline_maps_peaks_to_source_pixels() {
    let dir = labels_dir("cn", 2);
    let (c, h, w) = (2, 8, 8);
    let mut heat = vec![0.0f32; c * h * w];
    let at = |ch: usize, y: usize, x: usize| (ch * h + y) * w + x;
    heat[at(0, 2, 3)] = 0.9; // class 0 at cell (3, 2)
    heat[at(0, 2, 4)] = 0.5; // its neighbour: not a peak
    heat[at(1, 6, 6)] = 0.4; // class 1 at (6, 6)
    heat[at(1, 0, 0)] = 0.2; // not > 0.2
    let mut wh = vec![1.0f32; 4 * h * w];
    for (k, v) in [2.0, 3.0, 4.0, 5.0].iter().enumerate() {
        wh[(k * h + 2) * w + 3] = *v;
    }
    let engine = const_head_engine(
        32,
        32,
        &[
            ("heat", vec![1, c, h, w], heat),
            ("wh", vec![1, 4, h, w], wh),
        ],
    );
    let text = r#"
kind = "detector"
decoder = "centernet"
labels = "labels.txt"
[input]
name = "images"
width = 32
height = 32
[preprocess]
filter = "tf_legacy_bilinear"
[decode]
heatmap = "heat"
boxes = "wh"
"#;
    let mut det = Detector::new(engine, desc(text, &dir), 1).unwrap();
    // 64×48 NV12 frame: stretch scale (2, 1.5).
    let px = vec![128u8; 64 * 48 * 3 / 2];
    let frame = Frame::packed(&px, PixelFormat::Nv12, 64, 48).unwrap();
    let (got, _) = det.detect(&frame).unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    // Anchor (12, 8): box (12−2, 8−3, 12+4, 8+5) in input pixels.
    assert_eq!(got[0].class_id, 0);
    assert!(
        close(got[0].bbox(), [20.0, 7.5, 32.0, 19.5]),
        "{:?}",
        got[0]
    );
    // Anchor (24, 24), distances 1: (23, 23, 25, 25).
    assert_eq!(got[1].class_id, 1);
    assert!(
        close(got[1].bbox(), [46.0, 34.5, 50.0, 37.5]),
        "{:?}",
        got[1]
    );
}
