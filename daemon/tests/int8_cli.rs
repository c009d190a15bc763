//! `osprey build --precision int8` end to end: a model built here
//! (calibrated with --npy, INT8 layer SQNR in the report, the engine's
//! output against the FP32 engine's), bad input as one-line errors; with
//! ../shared, EfficientNet-Lite0 and CenterNet calibrated on the fixture
//! images, their INT8 engines checked against the FP32 *references* in
//! ../shared/fixtures/reference (top-1 on every image; detections matched
//! at IoU >= 0.5 with the same class, >= 0.9 of them), and the two OCR
//! models calibrated with --npy on their reference inputs.

mod cli_common;
use cli_common::{dir, ok, one_line_error, osprey, read_npy, shared, write_npy};

use std::path::{Path, PathBuf};

use osprey_engine::onnx::builder::{attr_ints, ModelBuilder};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// x [1,8,12,12] → Conv 8→16 3x3 + Relu → Conv 16→8 1x1 → y.
fn write_model(d: &Path) -> PathBuf {
    let mut m = ModelBuilder::new(13);
    m.input("x", &[1, 8, 12, 12]);
    let w1: Vec<f32> = (0..16 * 8 * 9)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 30.0)
        .collect();
    let w2: Vec<f32> = (0..8 * 16)
        .map(|i| ((i * 53 % 17) as f32 - 8.0) / 20.0)
        .collect();
    m.init_f32("w1", &[16, 8, 3, 3], &w1)
        .init_f32("b1", &[16], &[0.05; 16])
        .init_f32("w2", &[8, 16, 1, 1], &w2)
        .node(
            "Conv",
            &["x", "w1", "b1"],
            &["c1"],
            vec![attr_ints("pads", &[1, 1, 1, 1])],
        )
        .node("Relu", &["c1"], &["r1"], vec![])
        .node("Conv", &["r1", "w2"], &["y"], vec![])
        .output("y");
    let p = d.join("m.onnx");
    std::fs::write(&p, m.to_bytes()).unwrap();
    p
}

/// Four input samples for [`write_model`]'s model, in `d/npy`.
fn write_samples(d: &Path) -> PathBuf {
    let npy = d.join("npy");
    std::fs::create_dir_all(&npy).unwrap();
    for k in 0..4 {
        let data: Vec<f32> = (0..8 * 144)
            .map(|i| (((i * 7 + k * 13) % 41) as f32 - 20.0) / 8.0)
            .collect();
        write_npy(&npy.join(format!("s{k}.npy")), &[1, 8, 12, 12], &data);
    }
    npy
}

#[test]
fn int8_build_of_a_model_made_here() {
    let d = dir("int8", "small");
    let model = write_model(&d);
    let npy = write_samples(&d);
    let calib = d.join("m.calib");
    ok(&osprey()
        .args(["calibrate", "--onnx", s(&model), "--npy", s(&npy)])
        .args(["--method", "minmax", "--out", s(&calib)])
        .output()
        .unwrap());
    let engine = d.join("m.engine");
    let report = d.join("report.json");
    let out = ok(&osprey()
        .args(["build", "--onnx", s(&model), "--out", s(&engine)])
        .args([
            "--precision",
            "int8",
            "--calib",
            s(&calib),
            "--npy",
            s(&npy),
        ])
        .args([
            "--report",
            s(&report),
            "--threads",
            "1",
            "--json",
            "--strict-int8",
            "--layout",
            "nchw",
        ])
        .output()
        .unwrap());
    let build: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(build["precision"], "int8");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r, build["int8"]);
    assert_eq!(r["samples"], 4);
    assert_eq!(r["int8_layers"], 2, "{r}");
    for l in r["layers"].as_array().unwrap() {
        // Both layers are well conditioned: 8-bit steps give > 25 dB.
        let db = l["sqnr_db"].as_f64().unwrap();
        assert!(db > 25.0, "{l}");
    }
    let e2e = r["end_to_end"]["outputs"][0]["sqnr_db"].as_f64().unwrap();
    assert!(e2e > 20.0, "{r}");
    // --strict-int8: both layers run their INT8 kernels (in the faster of
    // the pair and dot4 forms), and the engine stays close to FP32.
    let tactics: Vec<&str> = build["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["tactic"].as_str().unwrap().trim_end_matches("-dot4"))
        .collect();
    assert_eq!(tactics, ["int8-im2col", "int8-pointwise"], "{build}");
    for l in build["layers"].as_array().unwrap() {
        let int8 = |k: &&String| k.starts_with("int8");
        let c = l["candidates"].as_object().unwrap();
        let fastest = c
            .iter()
            .filter(|(k, _)| int8(k))
            .min_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap()))
            .unwrap();
        assert_eq!(l["tactic"], fastest.0.as_str(), "{l}");
    }
    let input = npy.join("s1.npy");
    for (flag, path, dirname) in [("--engine", &engine, "q"), ("--onnx", &model, "f")] {
        ok(&osprey()
            .args(["run", flag, s(path), "--input"])
            .arg(format!("x={}", s(&input)))
            .args(["--output-dir", s(&d.join(dirname))])
            .output()
            .unwrap());
    }
    let inspect = ok(&osprey()
        .args(["inspect", "--engine", s(&engine), "--json"])
        .output()
        .unwrap());
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(inspect["int8_convolutions"], 2, "{inspect}");
    assert_eq!(inspect["convolutions"], 2, "{inspect}");
    // The ReLU output between the two INT8 layers passes as INT8.
    assert_eq!(inspect["int8_tensors"], 1, "{inspect}");
    let (q, f) = (read_npy(&d.join("q/y.npy")), read_npy(&d.join("f/y.npy")));
    let mut acc = osprey_engine::int8::Sqnr::default();
    acc.add(&f, &q);
    assert!(acc.db() > 20.0 && acc.db().is_finite(), "{}", acc.db());

    // The same INT8 engine channels-last: both layers run the channels-last
    // INT8 kernel, the ReLU output between them still passes as INT8, and
    // the outputs are the NCHW INT8 engine's (same quantization, same sums).
    let engine_nhwc = d.join("m-nhwc.engine");
    let out = ok(&osprey()
        .args(["build", "--onnx", s(&model), "--out", s(&engine_nhwc)])
        .args(["--precision", "int8", "--calib", s(&calib)])
        .args([
            "--threads",
            "1",
            "--json",
            "--strict-int8",
            "--layout",
            "nhwc",
        ])
        .output()
        .unwrap());
    let build: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(build["layout"]["layout"], "nhwc", "{build}");
    let tactics: Vec<&str> = build["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["tactic"].as_str().unwrap().trim_end_matches("-amx"))
        .collect();
    // (The AMX form where the CPU has it and it was the faster.)
    assert_eq!(tactics, ["int8-nhwc-gemm", "int8-nhwc-gemm"], "{build}");
    ok(&osprey()
        .args(["run", "--engine", s(&engine_nhwc), "--input"])
        .arg(format!("x={}", s(&input)))
        .args(["--output-dir", s(&d.join("qn"))])
        .output()
        .unwrap());
    let inspect = ok(&osprey()
        .args(["inspect", "--engine", s(&engine_nhwc), "--json"])
        .output()
        .unwrap());
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(inspect["int8_convolutions"], 2, "{inspect}");
    assert_eq!(inspect["int8_tensors"], 1, "{inspect}");
    let qn = read_npy(&d.join("qn/y.npy"));
    assert_eq!(qn.len(), q.len());
    let max = qn
        .iter()
        .zip(&q)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        max <= 1e-5 * (1.0 + q.iter().fold(0f32, |m, v| m.max(v.abs()))),
        "{max}"
    );

    // Bad input.
    let run = |extra: &[&str]| {
        osprey()
            .args([
                "build",
                "--onnx",
                s(&model),
                "--out",
                s(&d.join("x.engine")),
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    one_line_error(&run(&["--precision", "int8"]), "needs --calib");
    one_line_error(
        &run(&["--calib", s(&calib)]),
        "--calib applies to --precision int8",
    );
    let foreign = d.join("foreign.calib");
    std::fs::write(
        &foreign,
        "TRT-8601-EntropyCalibration2\nnot_here: 3c010204\n",
    )
    .unwrap();
    one_line_error(
        &run(&["--precision", "int8", "--calib", s(&foreign)]),
        "names none of this model's tensors",
    );
    one_line_error(
        &run(&[
            "--precision",
            "int8",
            "--calib",
            s(&calib),
            "--npy",
            s(&npy),
            "--accuracy-budget",
            "0.9",
        ]),
        "--accuracy-budget needs --images",
    );
}

/// A calibrated scale that clips most of a tensor (as an entropy threshold
/// can clip a ReLU6 output) costs the layer reading it its SQNR; the
/// builder widens that layer's scale to the input's observed range, which
/// is the min-max calibration's scale for the same samples, and says so.
#[test]
fn a_clipping_calibration_scale_is_widened_to_the_observed_range() {
    let d = dir("int8", "rescale");
    let model = write_model(&d);
    let npy = write_samples(&d);
    let minmax = d.join("minmax.calib");
    ok(&osprey()
        .args(["calibrate", "--onnx", s(&model), "--npy", s(&npy)])
        .args(["--method", "minmax", "--out", s(&minmax)])
        .output()
        .unwrap());
    let text = std::fs::read_to_string(&minmax).unwrap();
    let scale_of = |name: &str| {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name}:")))
            .unwrap();
        let hex = line.rsplit(':').next().unwrap().trim();
        f32::from_bits(u32::from_str_radix(hex, 16).unwrap())
    };
    let (x_scale, r_scale) = (scale_of("x"), scale_of("r1"));
    // The ReLU output's threshold at a tenth of its range.
    let tight = r_scale / 10.0;
    let clipped = d.join("clipped.calib");
    std::fs::write(
        &clipped,
        format!(
            "TRT-8601-EntropyCalibration2\nx: {:08x}\nr1: {:08x}\n",
            x_scale.to_bits(),
            tight.to_bits()
        ),
    )
    .unwrap();
    let build = |calib: &Path, extra: &[&str]| {
        let out = ok(&osprey()
            .args([
                "build",
                "--onnx",
                s(&model),
                "--out",
                s(&d.join("m.engine")),
            ])
            .args(["--precision", "int8", "--calib", s(calib), "--npy", s(&npy)])
            .args(["--threads", "1", "--json", "--strict-int8"])
            .args(extra)
            .output()
            .unwrap());
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["int8"].clone()
    };
    let r = build(&clipped, &[]);
    let layers = r["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "{r}");
    // The first layer keeps its calibrated scale.
    assert!(layers[0]["calibrated_scale"].is_null(), "{r}");
    // The second is INT8 with the observed range, well conditioned again.
    let l = &layers[1];
    assert_eq!(l["precision"], "int8", "{r}");
    assert_eq!(l["calibrated_scale"].as_f64().unwrap() as f32, tight, "{r}");
    let s1 = l["input_scale"].as_f64().unwrap() as f32;
    assert!(
        (s1 - r_scale).abs() <= 1e-6 * r_scale,
        "{s1} vs {r_scale}: {r}"
    );
    assert!(l["sqnr_db"].as_f64().unwrap() > 25.0, "{r}");
    assert!(
        r["end_to_end"]["outputs"][0]["sqnr_db"].as_f64().unwrap() > 20.0,
        "{r}"
    );
    // With the scale left as calibrated the layer is far worse: the
    // rescue is what made it pass (--min-sqnr 0 keeps it INT8 unrescued).
    let kept = build(&clipped, &["--min-sqnr", "0"]);
    let k = &kept["layers"][1];
    assert!(k["calibrated_scale"].is_null(), "{kept}");
    assert!(k["sqnr_db"].as_f64().unwrap() < 20.0, "{kept}");
}

#[test]
fn qdq_models_build_to_int8_without_a_calibration_file() {
    use osprey_kernels::activation::Activation;
    use osprey_kernels::conv::Conv2dGeometry;
    use osprey_kernels::qconv::reference_qconv2d;
    let d = dir("int8", "qdq");
    let model = d.join("qdq.onnx");
    std::fs::write(&model, osprey_engine::testing::qdq_conv_model(None)).unwrap();
    let engine = d.join("qdq.engine");
    let out = ok(&osprey()
        .args(["build", "--onnx", s(&model), "--out", s(&engine)])
        .args([
            "--precision",
            "int8",
            "--strict-int8",
            "--json",
            "--threads",
            "1",
        ])
        .output()
        .unwrap());
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["int8"]["int8_layers"], 1, "{r}");
    let tactic = r["layers"][0]["tactic"].as_str().unwrap();
    // Whichever layout won the race, the layer runs an INT8 kernel.
    assert!(
        ["int8-im2col", "int8-nhwc-gemm"]
            .contains(&tactic.trim_end_matches("-dot4").trim_end_matches("-amx")),
        "{r}"
    );
    // The engine computes the scalar INT8 reference with the model's input
    // scale (0.02) and its dequantized weights, requantized per channel.
    let x: Vec<f32> = (0..3 * 64)
        .map(|i| ((i * 29 % 61) as f32 - 30.0) / 10.0)
        .collect();
    let input = d.join("x.npy");
    write_npy(&input, &[1, 3, 8, 8], &x);
    ok(&osprey()
        .args(["run", "--engine", s(&engine), "--input"])
        .arg(format!("x={}", s(&input)))
        .args(["--output-dir", s(&d.join("o"))])
        .output()
        .unwrap());
    let got = read_npy(&d.join("o/y.npy"));
    let ws = [0.01f32, 0.02, 0.005, 0.03];
    let w: Vec<f32> = (0..108)
        .map(|i| ((i * 37) % 255) as i8 as f32 * ws[i / 27])
        .collect();
    let g = Conv2dGeometry {
        c_in: 3,
        h: 8,
        w: 8,
        c_out: 4,
        kh: 3,
        kw: 3,
        stride: [1, 1],
        dilation: [1, 1],
        pads: [1; 4],
        groups: 1,
    };
    let mut want = vec![0f32; 4 * 64];
    reference_qconv2d(&g, &x, &w, None, None, Activation::None, 0.02, &mut want);
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
            "y[{i}]: {a} vs {b}"
        );
    }
    // Without QDQ nodes and without --calib: one clear line.
    let plain = write_model(&d);
    one_line_error(
        &osprey()
            .args([
                "build",
                "--onnx",
                s(&plain),
                "--out",
                s(&d.join("p.engine")),
            ])
            .args(["--precision", "int8"])
            .output()
            .unwrap(),
        "or an explicitly quantized (QDQ) model",
    );
}

fn stems(images: &Path) -> Vec<(String, PathBuf)> {
    let mut v: Vec<_> = std::fs::read_dir(images)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("jpg" | "png")))
        .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), p))
        .collect();
    v.sort();
    v
}

/// Calibrates and builds an INT8 engine on the fixture images; returns the
/// engine and the build report.
fn build_int8(sh: &Path, d: &Path, model: &str, extra: &[&str]) -> (PathBuf, serde_json::Value) {
    let zoo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/zoo");
    let onnx = sh.join(format!("models/{model}.onnx"));
    let desc = zoo.join(format!("{model}.toml"));
    let images = sh.join("fixtures/images");
    let calib = d.join(format!("{model}.calib"));
    ok(&osprey()
        .args(["calibrate", "--onnx", s(&onnx), "--images", s(&images)])
        .args(["--model-desc", s(&desc), "--out", s(&calib)])
        .output()
        .unwrap());
    let engine = d.join(format!("{model}.int8.engine"));
    let out = ok(&osprey()
        .args(["build", "--onnx", s(&onnx), "--out", s(&engine)])
        .args(["--precision", "int8", "--calib", s(&calib)])
        .args(["--images", s(&images), "--model-desc", s(&desc), "--json"])
        .arg("--strict-int8")
        .args(extra)
        .output()
        .unwrap());
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        r["int8"]["int8_layers"].as_u64().unwrap() >= 10,
        "{}",
        r["int8"]
    );
    (engine, r)
}

#[test]
fn shared_int8_engines_agree_with_the_fp32_references() {
    let Some(sh) = shared() else { return };
    let d = dir("int8", "shared");
    let zoo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/zoo");
    let reference = sh.join("fixtures/reference");

    // EfficientNet-Lite0: top-1 equal to the reference on every image.
    let (engine, r) = build_int8(&sh, &d, "efficientnet_lite0", &[]);
    assert_eq!(
        r["int8"]["end_to_end"]["top1_agreement"], 1.0,
        "{}",
        r["int8"]
    );
    for (stem, path) in stems(&sh.join("fixtures/images")) {
        let out = ok(&osprey()
            .args(["classify", "--engine", s(&engine), "--image", s(&path)])
            .args(["--model-desc", s(&zoo.join("efficientnet_lite0.toml"))])
            .args(["--json"])
            .output()
            .unwrap());
        let got: serde_json::Value = serde_json::from_str(&out).unwrap();
        let want: serde_json::Value = serde_json::from_slice(
            &std::fs::read(reference.join(format!("efficientnet_lite0__{stem}__top5.json")))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            got["classes"][0]["class_id"], want["top5"][0]["index"],
            "{stem}: {got} vs {want}"
        );
    }

    // With --int8-depthwise every convolution but the classifier's runs
    // INT8 and whole blocks pass INT8 tensors; top-1 stays equal.
    let (engine_dw, r) = build_int8(&sh, &d, "efficientnet_lite0", &["--int8-depthwise"]);
    assert_eq!(
        r["int8"]["end_to_end"]["top1_agreement"], 1.0,
        "{}",
        r["int8"]
    );
    assert!(
        r["int8"]["int8_layers"].as_u64().unwrap() >= 40,
        "{}",
        r["int8"]
    );
    let inspect = ok(&osprey()
        .args(["inspect", "--engine", s(&engine_dw), "--json"])
        .output()
        .unwrap());
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert!(inspect["int8_tensors"].as_u64().unwrap() >= 16, "{inspect}");

    // CenterNet: >= 90% of the reference detections found (same class,
    // IoU >= 0.5).
    let (engine, r) = build_int8(&sh, &d, "centernet_mbv3_coco_512", &[]);
    let frac = r["int8"]["end_to_end"]["matched_fraction"]
        .as_f64()
        .unwrap();
    assert!(frac >= 0.9, "{}", r["int8"]);
    let (mut matched, mut total) = (0usize, 0usize);
    for (stem, path) in stems(&sh.join("fixtures/images")) {
        let out = ok(&osprey()
            .args(["detect", "--engine", s(&engine), "--image", s(&path)])
            .args(["--model-desc", s(&zoo.join("centernet_mbv3_coco_512.toml"))])
            .args(["--json"])
            .output()
            .unwrap());
        let got: serde_json::Value = serde_json::from_str(&out).unwrap();
        let want: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                reference.join(format!("centernet_mbv3_coco_512__{stem}__detections.json")),
            )
            .unwrap(),
        )
        .unwrap();
        let boxes = |v: &serde_json::Value, cls: &str, bx: &str| -> Vec<(u64, [f64; 4])> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|d| {
                    let b: Vec<f64> = d[bx]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap())
                        .collect();
                    (d[cls].as_u64().unwrap(), [b[0], b[1], b[2], b[3]])
                })
                .collect()
        };
        let g = boxes(&got["detections"], "class_id", "box");
        let w = boxes(&want["detections"], "class", "box_xyxy");
        let mut used = vec![false; g.len()];
        for (c, b) in &w {
            total += 1;
            if let Some(j) =
                (0..g.len()).find(|&j| !used[j] && g[j].0 == *c && iou(&g[j].1, b) >= 0.5)
            {
                used[j] = true;
                matched += 1;
            }
        }
    }
    assert!(total >= 10);
    assert!(
        matched as f64 >= 0.9 * total as f64,
        "{matched} of {total} reference detections matched"
    );
}

/// The OCR models, calibrated with --npy on their reference inputs: the
/// classifier's INT8 argmax equals the reference on every input; the
/// detector's text map thresholded at 0.3 (PP-OCR's binarisation) agrees
/// with the reference map on >= 99% of pixels.
#[test]
fn shared_ocr_int8_engines_agree_with_the_fp32_references() {
    let Some(sh) = shared() else { return };
    let d = dir("int8", "ocr");
    let reference = sh.join("fixtures/reference");
    for (model, shape, out_name) in [
        (
            "ppocr_cls_v2",
            "x=1,3,48,192",
            "save_infer_model_scale_0.tmp_1",
        ),
        ("ppocr_det_v4", "x=1,3,640,640", "sigmoid_0.tmp_0"),
    ] {
        let npy = d.join(model);
        std::fs::create_dir_all(&npy).unwrap();
        let mut stems = Vec::new();
        for e in std::fs::read_dir(&reference).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name
                .strip_prefix(&format!("{model}__"))
                .and_then(|r| r.strip_suffix("__input.npy"))
            {
                std::fs::copy(e.path(), npy.join(&name)).unwrap();
                stems.push(stem.to_string());
            }
        }
        assert!(!stems.is_empty());
        let onnx = sh.join(format!("models/{model}.onnx"));
        let calib = d.join(format!("{model}.calib"));
        ok(&osprey()
            .args(["calibrate", "--onnx", s(&onnx), "--npy", s(&npy)])
            .args(["--out", s(&calib)])
            .output()
            .unwrap());
        let engine = d.join(format!("{model}.engine"));
        let out = ok(&osprey()
            .args(["build", "--onnx", s(&onnx), "--out", s(&engine)])
            .args(["--input-shape", shape, "--precision", "int8"])
            .args(["--calib", s(&calib), "--npy", s(&npy), "--json"])
            .arg("--strict-int8")
            .output()
            .unwrap());
        let r: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(
            r["int8"]["int8_layers"].as_u64().unwrap() >= 10,
            "{}",
            r["int8"]
        );
        let (mut agree, mut total) = (0usize, 0usize);
        for stem in &stems {
            let o = d.join(format!("{model}-{stem}"));
            ok(&osprey()
                .args(["run", "--engine", s(&engine), "--input"])
                .arg(format!(
                    "x={}",
                    s(&npy.join(format!("{model}__{stem}__input.npy")))
                ))
                .args(["--output-dir", s(&o)])
                .output()
                .unwrap());
            let got = read_npy(&o.join(format!("{out_name}.npy")));
            let want = read_npy(&reference.join(format!("{model}__{stem}__{out_name}.npy")));
            assert_eq!(got.len(), want.len());
            if model == "ppocr_cls_v2" {
                let argmax =
                    |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
                assert_eq!(argmax(&got), argmax(&want), "{stem}: {got:?} vs {want:?}");
            } else {
                agree += got
                    .iter()
                    .zip(&want)
                    .filter(|(a, b)| (**a > 0.3) == (**b > 0.3))
                    .count();
                total += got.len();
            }
        }
        if total > 0 {
            let f = agree as f64 / total as f64;
            assert!(f >= 0.99, "{model}: text map agreement {f}");
        }
    }
}

fn iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f64; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    inter / (area(a) + area(b) - inter)
}
