//! Every model in ../shared/models against the onnxruntime references in
//! ../shared/fixtures/reference (inputs and outputs saved by onnxruntime 1.32,
//! FP32, CPU). Needs ../shared; skips visibly without it.
//!
//! Tolerance per output: max |osprey − onnxruntime| ≤ max(1e-3 × range, abs),
//! where `abs` is the per-model tolerance suggested in PREPROCESS.md §6 (it
//! matters only for the PP-OCR detector, whose probability map spans ~1e-5 on
//! these photos). Every model runs three times: as imported ("raw"), after the
//! default optimisation passes ("opt"), and optimised then laid out
//! channels-last ("nhwc", the layout pass `osprey build --layout` may pick).
//! Run with `--nocapture` to see the measured errors.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use osprey_engine::onnx::import_file;
use osprey_engine::{npy, Engine, ExecutionContext};
use osprey_tests::{max_abs_and_range, sanitize, shared_dir};

fn check_model(shared: &Path, model: &str, input: &str, abs_tol: f32) -> usize {
    let n = check_model_mode(shared, model, input, abs_tol, "raw");
    assert_eq!(check_model_mode(shared, model, input, abs_tol, "opt"), n);
    assert_eq!(check_model_mode(shared, model, input, abs_tol, "nhwc"), n);
    n
}

/// `mode`: "raw", "opt" or "nhwc" (see the module docs).
fn check_model_mode(shared: &Path, model: &str, input: &str, abs_tol: f32, mode: &str) -> usize {
    let refs = shared.join("fixtures/reference");
    let mut images: Vec<String> = std::fs::read_dir(&refs)
        .expect("reference dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| {
            n.strip_prefix(&format!("{model}__"))?
                .strip_suffix("__input.npy")
                .map(String::from)
        })
        .collect();
    images.sort();
    assert!(!images.is_empty(), "no reference inputs for {model}");
    let mut engines: HashMap<Vec<usize>, (Arc<Engine>, ExecutionContext)> = HashMap::new();
    for img in &images {
        let x =
            npy::read(&refs.join(format!("{model}__{img}__input.npy")), false).expect("input npy");
        let (engine, ctx) = engines.entry(x.shape.clone()).or_insert_with(|| {
            let mut shapes = HashMap::new();
            shapes.insert(input.to_string(), x.shape.clone());
            let mut g =
                import_file(&shared.join(format!("models/{model}.onnx")), &shapes).expect("import");
            if mode != "raw" {
                osprey_engine::passes::optimize(&mut g);
            }
            if mode == "nhwc" {
                let r = osprey_engine::passes::channels_last(&mut g);
                eprintln!("nhwc {model}: {r:?}");
                assert!(r.converted > 0, "{model}: nothing ran channels-last");
            }
            let e = Arc::new(Engine::new(g).expect("engine"));
            let ctx = ExecutionContext::new(e.clone(), 2);
            (e, ctx)
        });
        ctx.set_input(input, &x.data).expect("set input");
        ctx.run().expect("run");
        for (i, d) in engine.outputs().enumerate() {
            let want = npy::read(
                &refs.join(format!("{model}__{img}__{}.npy", sanitize(&d.name))),
                false,
            )
            .expect("reference output");
            assert_eq!(want.shape, d.shape, "{model}/{img}/{}: shape", d.name);
            let got = ctx.output_index(i).expect("output");
            let (max_abs, range) = max_abs_and_range(got, &want.data);
            let tol = (1e-3 * range).max(abs_tol);
            eprintln!(
                "{mode:4} {model:26} {img:16} {:34} max_abs {max_abs:.3e}  range {range:.3e}  max_abs/range {:.2e}  tol {tol:.1e}",
                d.name,
                max_abs / range.max(f32::MIN_POSITIVE)
            );
            assert!(
                max_abs <= tol,
                "{model}/{img}/{}: max abs {max_abs} > {tol}",
                d.name
            );
        }
    }
    images.len()
}

#[test]
fn efficientnet_lite0_matches_onnxruntime() {
    let Some(s) = shared_dir("efficientnet_lite0_matches_onnxruntime") else {
        return;
    };
    assert_eq!(check_model(&s, "efficientnet_lite0", "input", 1e-4), 8);
}

#[test]
fn centernet_matches_onnxruntime() {
    let Some(s) = shared_dir("centernet_matches_onnxruntime") else {
        return;
    };
    assert!(check_model(&s, "centernet_mbv3_coco_512", "images", 1e-5) >= 3);
}

#[test]
fn ppocr_det_matches_onnxruntime() {
    let Some(s) = shared_dir("ppocr_det_matches_onnxruntime") else {
        return;
    };
    assert!(check_model(&s, "ppocr_det_v4", "x", 1e-4) >= 2);
}

#[test]
fn ppocr_cls_matches_onnxruntime() {
    let Some(s) = shared_dir("ppocr_cls_matches_onnxruntime") else {
        return;
    };
    assert_eq!(check_model(&s, "ppocr_cls_v2", "x", 1e-5), 8);
}

/// FP16 engines (weights stored as f16, computed in f32) stay within 1e-2 of
/// the FP32 reference, relative to the output's largest magnitude.
#[test]
fn fp16_engines_stay_close_to_fp32() {
    let Some(s) = shared_dir("fp16_engines_stay_close_to_fp32") else {
        return;
    };
    use osprey_engine::file::{self, EngineFile, Precision};
    use osprey_engine::fingerprint::Fingerprint;
    let refs = s.join("fixtures/reference");
    for (model, input, img, out) in [
        ("efficientnet_lite0", "input", "dog", "logits"),
        (
            "centernet_mbv3_coco_512",
            "images",
            "dog",
            "tower_0_keypoints",
        ),
        ("ppocr_cls_v2", "x", "dog", "save_infer_model_scale_0.tmp_1"),
    ] {
        let x = npy::read(&refs.join(format!("{model}__{img}__input.npy")), false).unwrap();
        let mut shapes = HashMap::new();
        shapes.insert(input.to_string(), x.shape.clone());
        let mut g = import_file(&s.join(format!("models/{model}.onnx")), &shapes).unwrap();
        osprey_engine::passes::optimize(&mut g);
        file::round_constants_to_f16(&mut g);
        let ef = EngineFile {
            graph: g,
            tactics: vec![],
            fingerprint: Fingerprint::current(),
            precision: Precision::Fp16,
            build: serde_json::Value::Null,
        };
        let back = file::from_bytes(&file::to_bytes(&ef).unwrap(), None, model).unwrap();
        let e = Arc::new(Engine::new(back.graph).unwrap());
        let mut ctx = ExecutionContext::new(e.clone(), 2);
        ctx.set_input(input, &x.data).unwrap();
        ctx.run().unwrap();
        let want = npy::read(&refs.join(format!("{model}__{img}__{out}.npy")), false).unwrap();
        let i = e.outputs().position(|d| sanitize(&d.name) == out).unwrap();
        let got = ctx.output_index(i).unwrap();
        let scale = want.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&want.data)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!(
            "fp16 {model:26} {out:34} max_abs {err:.3e}  max|ref| {scale:.3e}  rel {:.2e}",
            err / scale
        );
        assert!(
            err <= 1e-2 * scale,
            "{model}: fp16 error {err} vs scale {scale}"
        );
    }
}
