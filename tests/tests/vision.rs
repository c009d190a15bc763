//! Vision pipelines on the shared models against the references in
//! ../shared/fixtures/reference: preprocessing from the decoded pixels
//! (`decoded__<img>__rgb_u8.npy`) against the exact tensors onnxruntime was
//! fed, CenterNet detections against `*__detections.json`, EfficientNet-Lite0
//! top-5 against `*__top5.json`. Needs ../shared; skips visibly without it.
//! Run with `--nocapture` to see the measured differences.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use osprey_engine::onnx::import_file;
use osprey_engine::{npy, Engine};
use osprey_models::vision::decode::iou;
use osprey_models::vision::desc::ModelDesc;
use osprey_models::vision::preprocess::{ChannelOrder, Layout, ResizeMode};
use osprey_models::vision::resize::Filter;
use osprey_models::vision::{
    read_image, Classifier, Detector, Frame, FrameLimits, PixelFormat, PreprocessSpec, Preprocessor,
};
use osprey_tests::{max_abs_and_range, shared_dir};
use serde_json::Value;

fn zoo(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models/zoo")
        .join(name)
}

fn images(shared: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(shared.join("fixtures/reference"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| {
            Some(
                n.strip_prefix("decoded__")?
                    .strip_suffix("__rgb_u8.npy")?
                    .to_string(),
            )
        })
        .collect();
    v.sort();
    assert!(v.len() >= 8, "expected the 8 fixture images, found {v:?}");
    v
}

fn image_path(shared: &Path, stem: &str) -> PathBuf {
    ["jpg", "png"]
        .iter()
        .map(|e| shared.join(format!("fixtures/images/{stem}.{e}")))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no image file for {stem}"))
}

fn decoded(shared: &Path, stem: &str) -> (Vec<u8>, usize, usize) {
    let a = npy::read(
        &shared.join(format!("fixtures/reference/decoded__{stem}__rgb_u8.npy")),
        true,
    )
    .unwrap();
    assert_eq!(a.descr, "|u1");
    let (h, w) = (a.shape[0], a.shape[1]);
    (a.data.iter().map(|&v| v as u8).collect(), w, h)
}

fn engine(shared: &Path, model: &str, desc: &ModelDesc) -> Arc<Engine> {
    let mut shapes = HashMap::new();
    shapes.insert(desc.input.name.clone(), desc.input_shape());
    let mut g = import_file(&shared.join(format!("models/{model}.onnx")), &shapes).unwrap();
    osprey_engine::passes::optimize(&mut g);
    Arc::new(Engine::new(g).unwrap())
}

/// Max |got − want| of our preprocessing of every decoded fixture against
/// the reference input tensors of `model`.
fn preprocess_error(shared: &Path, model: &str, spec: &PreprocessSpec) -> f32 {
    let mut p = Preprocessor::new(spec.clone()).unwrap();
    let mut worst = 0.0f32;
    let mut n = 0;
    for stem in images(shared) {
        let want = shared.join(format!("fixtures/reference/{model}__{stem}__input.npy"));
        if !want.exists() {
            continue;
        }
        let want = npy::read(&want, false).unwrap();
        let (px, w, h) = decoded(shared, &stem);
        let frame = Frame::packed(&px, PixelFormat::Rgb8, w, h).unwrap();
        let mut got = vec![0.0; p.tensor_len()];
        p.run(&frame, &mut got).unwrap();
        assert_eq!(got.len(), want.data.len());
        let (e, _) = max_abs_and_range(&got, &want.data);
        eprintln!("{model} {stem} {w}x{h}: preprocessing max |diff| {e:.3e}");
        worst = worst.max(e);
        n += 1;
    }
    assert!(n > 0, "no reference inputs for {model}");
    worst
}

#[test]
fn preprocessing_matches_reference_inputs() {
    let Some(shared) = shared_dir("preprocessing_matches_reference_inputs") else {
        return;
    };
    let effnet = ModelDesc::load(&zoo("efficientnet_lite0.toml")).unwrap();
    assert_eq!(
        preprocess_error(&shared, "efficientnet_lite0", &effnet.preprocess_spec()),
        0.0,
        "Pillow filter must be bit-exact"
    );
    let centernet = ModelDesc::load(&zoo("centernet_mbv3_coco_512.toml")).unwrap();
    let e = preprocess_error(
        &shared,
        "centernet_mbv3_coco_512",
        &centernet.preprocess_spec(),
    );
    assert!(e <= 1e-4, "centernet preprocessing off by {e}");
    // PP-OCR det: half-pixel bilinear, BGR, ImageNet mean/std (PREPROCESS.md §3).
    let ppocr = PreprocessSpec {
        width: 640,
        height: 640,
        layout: Layout::Nchw,
        resize: ResizeMode::Stretch,
        filter: Filter::Bilinear,
        channel_order: ChannelOrder::Bgr,
        scale: 1.0 / 255.0,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
        pad_value: 0.0,
    };
    let e = preprocess_error(&shared, "ppocr_det_v4", &ppocr);
    assert!(e <= 1e-5, "ppocr_det preprocessing off by {e}");
}

/// Our detections match the reference: same count and, one to one, the
/// same label, IoU ≥ 0.9 and score within 0.02.
#[test]
fn centernet_detections_match_reference() {
    let Some(shared) = shared_dir("centernet_detections_match_reference") else {
        return;
    };
    let desc = ModelDesc::load(&zoo("centernet_mbv3_coco_512.toml")).unwrap();
    let mut det =
        Detector::new(engine(&shared, "centernet_mbv3_coco_512", &desc), desc, 2).unwrap();
    let mut checked = 0;
    for stem in images(&shared) {
        let path = shared.join(format!(
            "fixtures/reference/centernet_mbv3_coco_512__{stem}__detections.json"
        ));
        let want: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let want = want["detections"].as_array().unwrap().clone();
        // The full pipeline from the image file (JPEG decoded by the image
        // crate, not libjpeg-turbo: a few LSB may differ).
        let img = read_image(&image_path(&shared, &stem), &FrameLimits::default()).unwrap();
        let labels = det.labels().to_vec();
        let (got, times) = det.detect(&img.frame()).unwrap();
        eprintln!(
            "{stem}: {} detections (reference {}), {:.1} ms",
            got.len(),
            want.len(),
            times.total_ms()
        );
        assert_eq!(got.len(), want.len(), "{stem}: detection count");
        let mut used = vec![false; got.len()];
        for w in &want {
            let label = w["label"].as_str().unwrap();
            let score = w["score"].as_f64().unwrap() as f32;
            let b: Vec<f32> = w["box_xyxy"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let wb = [b[0], b[1], b[2], b[3]];
            let m = got.iter().enumerate().position(|(i, d)| {
                !used[i]
                    && labels[d.class_id as usize] == label
                    && iou(&d.bbox(), &wb) >= 0.9
                    && (d.score - score).abs() <= 0.02
            });
            let Some(i) = m else {
                panic!("{stem}: reference {label} {score:.3} {wb:?} has no match in {got:?}");
            };
            used[i] = true;
            eprintln!(
                "  {label:<12} score {:.4} (ref {score:.4})  IoU {:.4}",
                got[i].score,
                iou(&got[i].bbox(), &wb)
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
}

#[test]
fn efficientnet_top5_matches_reference() {
    let Some(shared) = shared_dir("efficientnet_top5_matches_reference") else {
        return;
    };
    let desc = ModelDesc::load(&zoo("efficientnet_lite0.toml")).unwrap();
    let mut cls = Classifier::new(engine(&shared, "efficientnet_lite0", &desc), desc, 2).unwrap();
    for stem in images(&shared) {
        let path = shared.join(format!(
            "fixtures/reference/efficientnet_lite0__{stem}__top5.json"
        ));
        let want: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let want: Vec<(u64, f64)> = want["top5"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["index"].as_u64().unwrap(), c["prob"].as_f64().unwrap()))
            .collect();
        let img = read_image(&image_path(&shared, &stem), &FrameLimits::default()).unwrap();
        let (got, _) = cls.classify(&img.frame(), 5).unwrap();
        let ids: Vec<u64> = got.iter().map(|c| c.class_id as u64).collect();
        let want_ids: Vec<u64> = want.iter().map(|c| c.0).collect();
        eprintln!(
            "{stem}: top-5 {ids:?} (reference {want_ids:?}), top-1 p {:.4} (ref {:.4})",
            got[0].prob, want[0].1
        );
        assert_eq!(ids, want_ids, "{stem}: top-5");
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g.prob as f64 - w.1).abs() < 0.02,
                "{stem}: prob {} vs {}",
                g.prob,
                w.1
            );
        }
    }
}
