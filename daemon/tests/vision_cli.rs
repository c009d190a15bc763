//! `osprey detect` and `osprey classify` end to end: the JSON contract,
//! drawing, raw frame formats, and one clear error line on bad input. The
//! detector is the CenterNet bundled in models/zoo; tests that need
//! ../shared (fixture photos, EfficientNet) skip visibly without it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use osprey_models::vision::{draw, read_image, FrameLimits, RgbImage};
use serde_json::Value;

fn osprey() -> Command {
    Command::new(env!("CARGO_BIN_EXE_osprey"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn shared() -> Option<PathBuf> {
    let d = std::env::var_os("OSPREY_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared"));
    if d.join("fixtures/images").is_dir() {
        Some(d)
    } else {
        eprintln!("SKIPPED: ../shared not found (set OSPREY_SHARED)");
        None
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("osprey-vision-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn centernet() -> [String; 4] {
    let z = root().join("models/zoo");
    [
        "--onnx".into(),
        z.join("centernet_mbv3_coco_512.onnx").display().to_string(),
        "--model-desc".into(),
        z.join("centernet_mbv3_coco_512.toml").display().to_string(),
    ]
}

fn run(args: &[&str]) -> Output {
    osprey().args(args).output().expect("osprey runs")
}

fn ok_json(out: &Output) -> Value {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failed: {err}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim().lines().count(), 1, "one JSON line: {text}");
    serde_json::from_str(text.trim()).expect("valid JSON")
}

fn assert_one_line_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
}

/// A synthetic 96×64 PNG: a bright square on a gradient.
fn synthetic_png(path: &Path) {
    let (w, h) = (96, 64);
    let mut data = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let inside = (30..60).contains(&x) && (20..50).contains(&y);
            let v = if inside { 230 } else { (x + y) as u8 };
            data.extend([v, v / 2, 255 - v]);
        }
    }
    draw::save(
        &RgbImage {
            width: w,
            height: h,
            data,
        },
        path,
    )
    .unwrap();
}

#[test]
fn detect_json_contract_and_drawing() {
    let img = tmp("synthetic.png");
    synthetic_png(&img);
    let drawn = tmp("synthetic-boxes.png");
    let c = centernet();
    let out = run(&[
        "detect",
        &c[0],
        &c[1],
        &c[2],
        &c[3],
        "--image",
        img.to_str().unwrap(),
        "--json",
        "--draw",
        drawn.to_str().unwrap(),
        "--threads",
        "1",
    ]);
    let v = ok_json(&out);
    assert_eq!(
        (v["width"].as_u64(), v["height"].as_u64()),
        (Some(96), Some(64))
    );
    assert!(v["detections"].is_array());
    for d in v["detections"].as_array().unwrap() {
        assert!(d["label"].is_string() && d["class_id"].is_u64() && d["score"].is_f64());
        assert_eq!(d["box"].as_array().unwrap().len(), 4);
    }
    let lat = &v["latency_ms"];
    for k in ["preprocess", "infer", "decode", "total"] {
        assert!(lat[k].as_f64().unwrap() >= 0.0, "latency_ms.{k}");
    }
    let back = read_image(&drawn, &FrameLimits::default()).unwrap();
    assert_eq!((back.width, back.height), (96, 64));
}

#[test]
fn detect_matches_the_reference_on_a_fixture_photo_in_every_frame_format() {
    let Some(s) = shared() else { return };
    let img = s.join("fixtures/images/dog.jpg");
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(
            s.join("fixtures/reference/centernet_mbv3_coco_512__dog__detections.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut want_labels: Vec<String> = want["detections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["label"].as_str().unwrap().to_string())
        .collect();
    want_labels.sort();
    let c = centernet();
    let out = run(&[
        "detect",
        &c[0],
        &c[1],
        &c[2],
        &c[3],
        "--image",
        img.to_str().unwrap(),
        "--json",
    ]);
    let v = ok_json(&out);
    let mut got: Vec<String> = v["detections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["label"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    assert_eq!(got, want_labels);
    // As a camera would send it: the strong detections survive YUV.
    for ff in ["nv12", "yuyv", "bgra8"] {
        let out = run(&[
            "detect",
            &c[0],
            &c[1],
            &c[2],
            &c[3],
            "--image",
            img.to_str().unwrap(),
            "--json",
            "--frame-format",
            ff,
        ]);
        let v = ok_json(&out);
        let labels: Vec<&str> = v["detections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["label"].as_str().unwrap())
            .collect();
        for must in ["car", "bicycle", "dog"] {
            assert!(labels.contains(&must), "{ff}: {labels:?}");
        }
    }
    // The table names the detections and the latency split.
    let out = run(&[
        "detect",
        &c[0],
        &c[1],
        &c[2],
        &c[3],
        "--image",
        img.to_str().unwrap(),
        "--repeat",
        "3",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("dog") && text.contains("preprocess") && text.contains("median of 3"),
        "{text}"
    );
}

#[test]
fn classify_json_contract() {
    let Some(s) = shared() else { return };
    let z = root().join("models/zoo");
    let out = run(&[
        "classify",
        "--onnx",
        s.join("models/efficientnet_lite0.onnx").to_str().unwrap(),
        "--model-desc",
        z.join("efficientnet_lite0.toml").to_str().unwrap(),
        "--image",
        s.join("fixtures/images/coffee.png").to_str().unwrap(),
        "--top",
        "3",
        "--json",
    ]);
    let v = ok_json(&out);
    let classes = v["classes"].as_array().unwrap();
    assert_eq!(classes.len(), 3);
    assert_eq!(classes[0]["label"], "espresso");
    assert_eq!(classes[0]["class_id"], 967);
    let p: Vec<f64> = classes
        .iter()
        .map(|c| c["prob"].as_f64().unwrap())
        .collect();
    assert!(p[0] >= p[1] && p[1] >= p[2] && p[0] <= 1.0);
    assert!(v["latency_ms"]["infer"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_images_and_descriptions_fail_with_one_line() {
    let c = centernet();
    let good = tmp("good.png");
    synthetic_png(&good);
    let bytes = std::fs::read(&good).unwrap();
    let truncated = tmp("truncated.png");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let text = tmp("notes.txt");
    std::fs::write(&text, "not an image").unwrap();
    let desc = tmp("bad.toml");
    std::fs::write(&desc, "kind = \"detector\"\ndecoder = \"ssd\"\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--image".into(), truncated.display().to_string()],
            "does not decode",
        ),
        (
            vec!["--image".into(), text.display().to_string()],
            "unknown encoding",
        ),
        (
            vec!["--image".into(), "/nonexistent/x.jpg".into()],
            "No such file",
        ),
        (
            vec![
                "--image".into(),
                good.display().to_string(),
                "--max-side".into(),
                "50".into(),
            ],
            "exceeds the limit",
        ),
        (
            vec![
                "--image".into(),
                good.display().to_string(),
                "--frame-format".into(),
                "h264".into(),
            ],
            "--frame-format",
        ),
        (
            vec![
                "--image".into(),
                good.display().to_string(),
                "--repeat".into(),
                "0".into(),
            ],
            "--repeat",
        ),
    ];
    for (extra, needle) in cases {
        let mut args: Vec<String> = vec!["detect".into()];
        args.extend(c.iter().cloned());
        args.extend(extra);
        let out = osprey().args(&args).output().unwrap();
        assert_one_line_error(&out, needle);
    }
    // A description that does not parse, and one that does not fit the model.
    let out = run(&[
        "detect",
        &c[0],
        &c[1],
        "--model-desc",
        desc.to_str().unwrap(),
        "--image",
        good.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "unknown variant");
    let wrong = tmp("wrong.toml");
    let zoo = std::fs::read_to_string(&c[3])
        .unwrap()
        .replace("name = \"images\"", "name = \"pixels\"");
    std::fs::write(&wrong, zoo.replace("labels = \"coco80_labels.txt\"", "")).unwrap();
    let out = run(&[
        "detect",
        &c[0],
        &c[1],
        "--model-desc",
        wrong.to_str().unwrap(),
        "--image",
        good.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "pixels");
    // A classifier description handed to detect.
    let cls = root().join("models/zoo/efficientnet_lite0.toml");
    let out = run(&[
        "detect",
        &c[0],
        &c[1],
        "--model-desc",
        cls.to_str().unwrap(),
        "--image",
        good.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "not a detector");
}

/// A YOLOv8-style model whose head is a constant (plus 0 × the image
/// mean, so the image really flows through): two anchors, two classes.
fn write_yolo_model(dir: &Path) -> (PathBuf, PathBuf) {
    // [1, 6, 2], channel-major: row k holds attribute k of both anchors.
    // Anchor 0: (cx 8, cy 8, w 4, h 10), p = (0.9, 0.2) → cone.
    // Anchor 1: (cx 20, cy 12, w 6, h 4), p = (0.1, 0.6) → forklift.
    let head = vec![
        8.0, 20.0, 8.0, 12.0, 4.0, 6.0, 10.0, 4.0, 0.9, 0.1, 0.2, 0.6,
    ];
    let bytes = osprey_models::vision::testing::const_head_onnx(
        32,
        32,
        &[("output0", vec![1, 6, 2], head)],
    );
    let onnx = dir.join("yolo.onnx");
    std::fs::write(&onnx, bytes).unwrap();
    std::fs::write(dir.join("labels.txt"), "cone\nforklift\n").unwrap();
    let desc = dir.join("yolo.toml");
    std::fs::write(
        &desc,
        "kind = \"detector\"\ndecoder = \"yolov8\"\nlabels = \"labels.txt\"\n[input]\nname = \"images\"\nwidth = 32\nheight = 32\n[preprocess]\nresize = \"letterbox\"\nfilter = \"bilinear\"\nscale = 0.00392156862745098\n",
    )
    .unwrap();
    (onnx, desc)
}

#[test]
fn detect_with_an_engine_file_equals_detect_from_onnx() {
    let dir = tmp("yolo");
    std::fs::create_dir_all(&dir).unwrap();
    let (onnx, desc) = write_yolo_model(&dir);
    let engine = dir.join("yolo.engine");
    let out = run(&[
        "build",
        "--onnx",
        onnx.to_str().unwrap(),
        "--out",
        engine.to_str().unwrap(),
        "--threads",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = dir.join("frame.png");
    synthetic_png(&img); // 96×64 → letterbox scale 3, pad_y 2.67 → 5 rows
    let mut results = Vec::new();
    for (flag, model) in [("--onnx", &onnx), ("--engine", &engine)] {
        let out = run(&[
            "detect",
            flag,
            model.to_str().unwrap(),
            "--model-desc",
            desc.to_str().unwrap(),
            "--image",
            img.to_str().unwrap(),
            "--json",
        ]);
        let v = ok_json(&out);
        results.push(v["detections"].clone());
    }
    assert_eq!(results[0], results[1]);
    let d = results[0].as_array().unwrap();
    assert_eq!(d.len(), 2, "{d:?}");
    assert_eq!(d[0]["label"], "cone");
    assert_eq!(d[1]["label"], "forklift");
    // Anchor 0 is x 6..10, y 3..13 in the 32×32 input; 96×64 letterboxed
    // is 32×21 at pad_y 5: x·3 → 18..30, (y − 5)·64/21 → −6.1 (clipped to
    // 0)..24.38.
    let b: Vec<f64> = d[0]["box"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let want = [18.0, 0.0, 30.0, (13.0 - 5.0) * 64.0 / 21.0];
    for (g, w) in b.iter().zip(want) {
        assert!((g - w).abs() < 1e-3, "{b:?} vs {want:?}");
    }
}
