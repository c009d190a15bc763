//! `osprey calibrate` end to end: image folders (recursive, a corrupt file
//! skipped and counted) and .npy folders, min-max scales checked against
//! the statistics computed here, entropy/percentile thresholds within the
//! range, the TensorRT cache layout, bad input as one-line errors; with
//! ../shared, EfficientNet-Lite0 on the fixture images and the two OCR
//! models on their reference inputs.

mod cli_common;
use cli_common::{dir, ok, one_line_error, osprey, shared, write_npy};

use std::path::{Path, PathBuf};

use osprey_calibration::CalibrationCache;
use osprey_engine::onnx::builder::{attr_ints, ModelBuilder};
use osprey_models::vision::desc::ModelDesc;
use osprey_models::vision::{draw, Preprocessor, RgbImage};

/// images [1,3,16,16] → Conv 3→4 (3x3, pad 1) → Relu → output "y".
fn write_model(d: &Path) -> PathBuf {
    let mut m = ModelBuilder::new(13);
    m.input("images", &[1, 3, 16, 16]);
    let w: Vec<f32> = (0..4 * 3 * 9)
        .map(|i| ((i * 37 % 19) as f32 - 9.0) / 10.0)
        .collect();
    m.init_f32("w", &[4, 3, 3, 3], &w);
    m.init_f32("b", &[4], &[0.1, -0.2, 0.3, 0.0]);
    m.node(
        "Conv",
        &["images", "w", "b"],
        &["c"],
        vec![attr_ints("pads", &[1, 1, 1, 1])],
    );
    m.node("Relu", &["c"], &["y"], vec![]);
    m.output("y");
    let p = d.join("m.onnx");
    std::fs::write(&p, m.to_bytes()).unwrap();
    p
}

fn write_desc(d: &Path) -> PathBuf {
    let p = d.join("m.toml");
    std::fs::write(
        &p,
        "kind = \"classifier\"\ndecoder = \"softmax\"\n[input]\nname = \"images\"\nwidth = 16\nheight = 16\n[preprocess]\nfilter = \"bilinear\"\nscale = 0.00392156862745098\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n",
    )
    .unwrap();
    p
}

fn image(w: usize, h: usize, seed: usize) -> RgbImage {
    RgbImage {
        width: w,
        height: h,
        data: (0..w * h * 3)
            .map(|i| ((i * 31 + seed * 97) % 256) as u8)
            .collect(),
    }
}

#[test]
fn images_calibrate_with_minmax_scales_equal_to_the_statistics() {
    let d = dir("calib", "img");
    let model = write_model(&d);
    let desc_path = write_desc(&d);
    let imgs = d.join("images");
    std::fs::create_dir_all(imgs.join("nested")).unwrap();
    let mut expected_input_max = 0f32;
    let desc = ModelDesc::load(&desc_path).unwrap();
    let mut pre = Preprocessor::new(desc.preprocess_spec()).unwrap();
    for (k, (w, h)) in [(40, 30), (16, 16), (23, 57), (64, 48)].iter().enumerate() {
        let img = image(*w, *h, k);
        let name = if k == 3 {
            imgs.join("nested/d.png")
        } else {
            imgs.join(format!("{k}.png"))
        };
        draw::save(&img, &name).unwrap();
        let mut x = vec![0f32; 3 * 16 * 16];
        pre.run(&img.frame(), &mut x).unwrap();
        expected_input_max = x.iter().fold(expected_input_max, |m, v| m.max(v.abs()));
    }
    std::fs::write(imgs.join("broken.jpg"), b"\xff\xd8 not really a jpeg").unwrap();
    std::fs::write(imgs.join("notes.txt"), "ignored").unwrap();

    let cache = d.join("m.minmax.calib");
    let report = d.join("report.json");
    let out = osprey()
        .args(["calibrate", "--onnx", model.to_str().unwrap()])
        .args(["--images", imgs.to_str().unwrap()])
        .args(["--model-desc", desc_path.to_str().unwrap()])
        .args(["--method", "minmax", "--out", cache.to_str().unwrap()])
        .args(["--report", report.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = ok(&out);
    assert!(stdout.contains("on 4 sample(s) (1 skipped)"), "{stdout}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("skipped") && err.contains("broken.jpg"),
        "{err}"
    );
    let text = std::fs::read_to_string(&cache).unwrap();
    assert!(text.starts_with("TRT-8601-MinMaxCalibration\n"), "{text}");
    let c = CalibrationCache::parse(&text).unwrap();
    let s_in = c.scale("images").unwrap();
    assert!(
        (s_in * 127.0 - expected_input_max).abs() <= 1e-6 * expected_input_max,
        "{} vs {expected_input_max}",
        s_in * 127.0
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["samples"], 4);
    assert_eq!(r["skipped"].as_array().unwrap().len(), 1);
    // The fused Conv+Relu output is the one other tensor; its min is 0.
    let y = r["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "y")
        .unwrap();
    assert_eq!(y["min"], 0.0);
    assert!(c.scale("y").unwrap() > 0.0);

    for (method, extra) in [("entropy", None), ("percentile", Some("99.9"))] {
        let out_c = d.join(format!("m.{method}.calib"));
        let mut cmd = osprey();
        cmd.args(["calibrate", "--onnx", model.to_str().unwrap()])
            .args(["--images", imgs.to_str().unwrap()])
            .args(["--model-desc", desc_path.to_str().unwrap()])
            .args(["--method", method, "--out", out_c.to_str().unwrap()]);
        if let Some(p) = extra {
            cmd.args(["--percentile", p]);
        }
        ok(&cmd.output().unwrap());
        let e = CalibrationCache::load(&out_c).unwrap();
        assert_eq!(e.scales.len(), c.scales.len());
        for (name, scale) in &e.scales {
            let mm = c.scale(name).unwrap();
            assert!(
                *scale > 0.0 && *scale <= mm * (1.0 + 1e-6),
                "{method} {name}: {scale} > {mm}"
            );
        }
    }
    // --max-images keeps the first files in path order.
    let out = osprey()
        .args(["calibrate", "--onnx", model.to_str().unwrap()])
        .args(["--images", imgs.to_str().unwrap()])
        .args(["--model-desc", desc_path.to_str().unwrap()])
        .args([
            "--max-images",
            "2",
            "--out",
            d.join("two.calib").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(ok(&out).contains("on 2 sample(s)"));
}

#[test]
fn npy_folders_calibrate_and_bad_input_is_one_line() {
    let d = dir("calib", "npy");
    let model = write_model(&d);
    let npy = d.join("npy");
    std::fs::create_dir_all(&npy).unwrap();
    let n = 3 * 16 * 16;
    for k in 0..3 {
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7 + k * 13) % 100) as f32 / 10.0 - 5.0)
            .collect();
        write_npy(&npy.join(format!("{k}.npy")), &[1, 3, 16, 16], &x);
    }
    // The largest |x| of all: -7.5 in the last file.
    let mut x = vec![0.5f32; n];
    x[17] = -7.5;
    write_npy(&npy.join("3.npy"), &[1, 3, 16, 16], &x);
    write_npy(&npy.join("wrong.npy"), &[1, 3, 8, 8], &vec![1.0; 192]);
    let cache = d.join("n.calib");
    let out = osprey()
        .args(["calibrate", "--onnx", model.to_str().unwrap()])
        .args(["--npy", npy.to_str().unwrap(), "--method", "minmax"])
        .args(["--out", cache.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(ok(&out).contains("on 4 sample(s) (1 skipped)"));
    let c = CalibrationCache::load(&cache).unwrap();
    assert_eq!(c.scale("images"), Some(7.5 / 127.0));

    let m = model.to_str().unwrap();
    let o = cache.to_str().unwrap();
    let run = |args: &[&str]| {
        osprey()
            .args(["calibrate", "--onnx", m, "--out", o])
            .args(args)
            .output()
            .unwrap()
    };
    one_line_error(
        &run(&["--npy", d.join("nothing").to_str().unwrap()]),
        "nothing",
    );
    let empty = dir("calib", "npy-empty");
    one_line_error(&run(&["--npy", empty.to_str().unwrap()]), "no .npy files");
    one_line_error(
        &run(&[
            "--npy",
            npy.to_str().unwrap(),
            "--method",
            "percentile",
            "--percentile",
            "0",
        ]),
        "--percentile",
    );
    one_line_error(
        &run(&[]),
        "give --images DIR --model-desc D.toml, or --npy DIR",
    );
    // --images without --model-desc is a usage error (clap, exit 2).
    let out = run(&["--images", npy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    // Only unusable files: an error naming the first.
    let bad = dir("calib", "npy-bad");
    write_npy(&bad.join("a.npy"), &[2], &[1.0, 2.0]);
    one_line_error(
        &run(&["--npy", bad.to_str().unwrap()]),
        "none of the 1 calibration files",
    );
}

#[test]
fn shared_models_calibrate_on_their_fixtures() {
    let Some(s) = shared() else { return };
    let d = dir("calib", "shared");
    let zoo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/zoo");
    let cache = d.join("effnet.calib");
    let report = d.join("effnet.json");
    let out = osprey()
        .args([
            "calibrate",
            "--onnx",
            s.join("models/efficientnet_lite0.onnx").to_str().unwrap(),
        ])
        .args(["--images", s.join("fixtures/images").to_str().unwrap()])
        .args([
            "--model-desc",
            zoo.join("efficientnet_lite0.toml").to_str().unwrap(),
        ])
        .args([
            "--out",
            cache.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(ok(&out).contains("on 8 sample(s) (0 skipped)"));
    let c = CalibrationCache::load(&cache).unwrap();
    assert_eq!(c.header, "TRT-8601-EntropyCalibration2");
    assert!(c.scales.len() >= 50, "{}", c.scales.len());
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    for t in r["tensors"].as_array().unwrap() {
        let (th, amax) = (
            t["threshold"].as_f64().unwrap(),
            t["absmax"].as_f64().unwrap(),
        );
        assert!(th > 0.0 && th <= amax * (1.0 + 1e-6), "{t}");
        // Entropy clips outliers, never the bulk of a tensor.
        assert!(t["clipped_fraction"].as_f64().unwrap() < 0.05, "{t}");
    }
    // The OCR models on their reference inputs (.npy).
    for (model, shape) in [
        ("ppocr_cls_v2", [1, 3, 48, 192]),
        ("ppocr_det_v4", [1, 3, 640, 640]),
    ] {
        // Every tensor the fused engine computes gets a scale: the input and
        // at least one output per step.
        let mut shapes = std::collections::HashMap::new();
        shapes.insert("x".to_string(), shape.to_vec());
        let mut g =
            osprey_engine::onnx::import_file(&s.join(format!("models/{model}.onnx")), &shapes)
                .unwrap();
        osprey_engine::passes::optimize(&mut g);
        let engine = osprey_engine::Engine::new(g).unwrap();
        let min_tensors = engine.step_count() + engine.inputs().count();
        let npy = d.join(model);
        std::fs::create_dir_all(&npy).unwrap();
        let mut n = 0;
        for e in std::fs::read_dir(s.join("fixtures/reference"))
            .unwrap()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{model}__")) && name.ends_with("__input.npy") {
                std::fs::copy(e.path(), npy.join(&name)).unwrap();
                n += 1;
            }
        }
        let cache = d.join(format!("{model}.calib"));
        let out = osprey()
            .args([
                "calibrate",
                "--onnx",
                s.join(format!("models/{model}.onnx")).to_str().unwrap(),
            ])
            .args([
                "--npy",
                npy.to_str().unwrap(),
                "--out",
                cache.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(ok(&out).contains(&format!("on {n} sample(s) (0 skipped)")));
        let c = CalibrationCache::load(&cache).unwrap();
        assert!(c.scales.len() >= min_tensors, "{model}: {}", c.scales.len());
        assert!(c.scales.iter().all(|(_, s)| s.is_finite() && *s >= 0.0));
    }
}
