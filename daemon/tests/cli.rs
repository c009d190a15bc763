//! The `osprey` binary end to end: outputs on disk, the JSON contract of
//! `bench --json`, and one clear error line (never a panic) on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use osprey_engine::npy;
use osprey_engine::onnx::builder::{attr_ints, ModelBuilder};

fn osprey() -> Command {
    Command::new(env!("CARGO_BIN_EXE_osprey"))
}

fn tmpdir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "osprey-cli-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&d).expect("tmpdir");
    d
}

/// y = Relu(Conv1x1(x, w)) with an output name that needs sanitising; w = 2·I.
fn write_model(dir: &Path, dynamic: bool) -> PathBuf {
    let mut m = ModelBuilder::new(13);
    m.input(
        "x",
        if dynamic {
            &[-1, 2, -1, -1]
        } else {
            &[1, 2, 3, 3]
        },
    );
    m.init_f32("w", &[2, 2, 1, 1], &[2.0, 0.0, 0.0, 2.0]);
    m.node(
        "Conv",
        &["x", "w"],
        &["c"],
        vec![attr_ints("strides", &[1, 1])],
    );
    m.node("Relu", &["c"], &["head/out:0"], vec![]);
    m.output("head/out:0");
    let p = dir.join("m.onnx");
    std::fs::write(&p, m.to_bytes()).expect("write model");
    p
}

/// Runs the command and asserts that it succeeded (its stderr in the
/// message otherwise).
fn succeed(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn assert_clean_failure(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

#[test]
fn run_writes_sanitised_outputs() {
    let d = tmpdir();
    let model = write_model(&d, false);
    let x: Vec<f32> = (0..18).map(|i| i as f32 - 9.0).collect();
    npy::write(&d.join("x.npy"), &[1, 2, 3, 3], &x).unwrap();
    succeed(
        osprey()
            .args(["run", "--onnx"])
            .arg(&model)
            .arg("--input")
            .arg(format!("x={}", d.join("x.npy").display()))
            .arg("--output-dir")
            .arg(d.join("out")),
    );
    let y = npy::read(&d.join("out/head_out_0.npy"), false).unwrap();
    assert_eq!(y.shape, vec![1, 2, 3, 3]);
    let want: Vec<f32> = x.iter().map(|v| (2.0 * v).max(0.0)).collect();
    assert_eq!(y.data, want);
}

#[test]
fn run_takes_dynamic_shapes_from_the_npy() {
    let d = tmpdir();
    let model = write_model(&d, true);
    npy::write(&d.join("x.npy"), &[2, 2, 1, 4], &[1.0; 16]).unwrap();
    succeed(
        osprey()
            .args(["run", "--onnx"])
            .arg(&model)
            .arg(format!("--input=x={}", d.join("x.npy").display()))
            .arg("--output-dir")
            .arg(&d),
    );
    assert_eq!(
        npy::read(&d.join("head_out_0.npy"), false).unwrap().shape,
        vec![2, 2, 1, 4]
    );
}

#[test]
fn bench_json_is_one_object_with_the_contract_fields() {
    let d = tmpdir();
    let model = write_model(&d, false);
    let out = succeed(osprey().args(["bench", "--onnx"]).arg(&model).args([
        "--threads",
        "2",
        "--iterations",
        "7",
        "--warmup",
        "1",
        "--json",
    ]));
    let text = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect("exactly one JSON object");
    for k in ["min", "mean", "median", "p90", "p99", "max"] {
        assert!(v["latency_ms"][k].as_f64().unwrap() > 0.0, "latency_ms.{k}");
    }
    let lat = &v["latency_ms"];
    assert!(
        lat["min"].as_f64() <= lat["median"].as_f64()
            && lat["median"].as_f64() <= lat["max"].as_f64()
    );
    assert!(v["throughput_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["arena_bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["threads"], 2);
    assert_eq!(v["iterations"], 7);
}

#[test]
fn bench_profile_gives_every_step_its_median_and_mean() {
    let d = tmpdir();
    let model = write_model(&d, false);
    let out = succeed(osprey().args(["bench", "--onnx"]).arg(&model).args([
        "--iterations",
        "9",
        "--warmup",
        "1",
        "--profile",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let rows = v["profile"].as_array().expect("profile rows");
    assert_eq!(rows.len() as u64, v["steps"].as_u64().unwrap());
    let (mut share, mut last) = (0.0, f64::INFINITY);
    for r in rows {
        let (ms, mean) = (r["ms"].as_f64().unwrap(), r["mean_ms"].as_f64().unwrap());
        assert!(ms >= 0.0 && mean >= 0.0 && r["step"].is_string() && r["kernel"].is_string());
        // Slowest median first.
        assert!(ms <= last, "rows not sorted by median: {ms} after {last}");
        last = ms;
        share += r["share"].as_f64().unwrap();
    }
    assert!((share - 1.0).abs() < 1e-9, "shares sum to {share}");
    // The text form says what it shows.
    let out = osprey()
        .args(["bench", "--onnx"])
        .arg(&model)
        .args(["--iterations", "3", "--profile"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("per-step median ms (mean)"));
}

#[test]
fn inspect_lists_io_and_ops() {
    let d = tmpdir();
    let model = write_model(&d, false);
    let out = osprey()
        .args(["inspect", "--onnx"])
        .arg(&model)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("head/out:0") && text.contains("[1, 2, 3, 3]"),
        "{text}"
    );
    assert!(text.contains("Conv") && text.contains("Relu"), "{text}");
    assert!(text.contains("arena"), "{text}");
}

#[test]
fn bad_inputs_fail_with_one_clear_line() {
    let d = tmpdir();
    let model = write_model(&d, false);
    let run = |model: &Path, input: &str| {
        osprey()
            .args(["run", "--onnx"])
            .arg(model)
            .arg("--input")
            .arg(input)
            .arg("--output-dir")
            .arg(d.join("o"))
            .output()
            .unwrap()
    };
    // Truncated model.
    let bytes = std::fs::read(&model).unwrap();
    let trunc = d.join("trunc.onnx");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    npy::write(&d.join("x.npy"), &[1, 2, 3, 3], &[1.0; 18]).unwrap();
    let good_input = format!("x={}", d.join("x.npy").display());
    assert_clean_failure(&run(&trunc, &good_input), "trunc.onnx");
    // Missing file.
    assert_clean_failure(&run(&d.join("nope.onnx"), &good_input), "nope.onnx");
    // Wrong input shape.
    npy::write(&d.join("bad.npy"), &[1, 2, 4, 4], &[1.0; 32]).unwrap();
    assert_clean_failure(
        &run(&model, &format!("x={}", d.join("bad.npy").display())),
        "conflicts",
    );
    // NaN in the input.
    let mut v = vec![1.0; 18];
    v[5] = f32::NAN;
    npy::write(&d.join("nan.npy"), &[1, 2, 3, 3], &v).unwrap();
    assert_clean_failure(
        &run(&model, &format!("x={}", d.join("nan.npy").display())),
        "not finite",
    );
    // Wrong dtype (float64).
    let mut f64_bytes = npy::to_bytes(&[1], &[0.0, 0.0]);
    let at = f64_bytes.windows(3).position(|w| w == b"<f4").unwrap();
    f64_bytes[at + 2] = b'8';
    std::fs::write(d.join("f64.npy"), &f64_bytes).unwrap();
    assert_clean_failure(
        &run(&model, &format!("x={}", d.join("f64.npy").display())),
        "float64",
    );
    // Unknown input name, then a missing input.
    assert_clean_failure(
        &run(&model, &format!("y={}", d.join("x.npy").display())),
        "no such model input",
    );
    // Dynamic model without a shape, for bench.
    let dynm = write_model(&tmpdir(), true);
    let out = osprey()
        .args(["bench", "--onnx"])
        .arg(&dynm)
        .output()
        .unwrap();
    assert_clean_failure(&out, "--input-shape x=");
}

#[test]
fn run_matches_onnxruntime_on_a_shared_model() {
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    if !shared.join("models").is_dir() {
        eprintln!("SKIPPED run_matches_onnxruntime_on_a_shared_model: ../shared not found");
        return;
    }
    let d = tmpdir();
    let refs = shared.join("fixtures/reference");
    succeed(
        osprey()
            .args(["run", "--onnx"])
            .arg(shared.join("models/ppocr_cls_v2.onnx"))
            .arg(format!(
                "--input=x={}",
                refs.join("ppocr_cls_v2__eagle__input.npy").display()
            ))
            .arg("--output-dir")
            .arg(&d),
    );
    let name = "save_infer_model_scale_0.tmp_1";
    let got = npy::read(&d.join(format!("{name}.npy")), false).unwrap();
    let want = npy::read(
        &refs.join(format!("ppocr_cls_v2__eagle__{name}.npy")),
        false,
    )
    .unwrap();
    assert_eq!(got.shape, want.shape);
    for (a, b) in got.data.iter().zip(&want.data) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn build_then_run_and_bench_the_engine() {
    let d = tmpdir();
    let model = write_model(&d, true);
    let engine = d.join("m.engine");
    let cache = d.join("tc.json");
    let build = |precision: &str| {
        osprey()
            .args(["build", "--onnx"])
            .arg(&model)
            .arg("--out")
            .arg(&engine)
            .args([
                "--precision",
                precision,
                "--threads",
                "1",
                "--input-shape",
                "x=1,2,3,3",
                "--json",
                "--timing-cache",
            ])
            .arg(&cache)
            .output()
            .unwrap()
    };
    let out = build("fp32");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON report");
    assert_eq!(report["nodes_imported"], 2);
    assert_eq!(report["nodes_after_fusion"], 1, "Conv+Relu fused");
    assert_eq!(report["layers"].as_array().unwrap().len(), 1);
    assert!(report["layers"][0]["tactic"]
        .as_str()
        .unwrap()
        .contains("gemm"));
    assert!(
        report["engine_bytes"].as_u64().unwrap() > 0 && report["build_ms"].as_f64().unwrap() > 0.0
    );
    assert!(cache.exists());
    // Second build: everything from the cache.
    let again: serde_json::Value = serde_json::from_slice(&build("fp16").stdout).unwrap();
    assert_eq!(again["timing_cache"]["hits"], 1);
    assert_eq!(again["precision"], "fp16");

    // run --engine gives what run --onnx gives (weights 2.0 and 0.0 are exact in fp16).
    let x: Vec<f32> = (0..18).map(|i| i as f32 - 9.0).collect();
    npy::write(&d.join("x.npy"), &[1, 2, 3, 3], &x).unwrap();
    // `osprey run --engine E` on x.npy; returns the output.
    let run_engine = |engine: &Path, dir: &str| {
        succeed(
            osprey()
                .args(["run", "--engine"])
                .arg(engine)
                .arg(format!("--input=x={}", d.join("x.npy").display()))
                .arg("--output-dir")
                .arg(d.join(dir)),
        );
        npy::read(&d.join(dir).join("head_out_0.npy"), false).unwrap()
    };
    let y = run_engine(&engine, "e");
    assert_eq!(
        y.data,
        x.iter().map(|v| (2.0 * v).max(0.0)).collect::<Vec<_>>()
    );

    // The channels-last layout, asked for: reported, and the same results.
    let nhwc = d.join("nhwc.engine");
    let out = succeed(
        osprey()
            .args(["build", "--onnx"])
            .arg(&model)
            .arg("--out")
            .arg(&nhwc)
            .args(["--layout", "nhwc", "--input-shape", "x=1,2,3,3", "--json"]),
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["layout"]["layout"], "nhwc");
    assert_eq!(r["layout"]["channels_last"]["converted"], 1);
    assert_eq!(r["layers"][0]["tactic"], "nhwc-gemm");
    assert_eq!(run_engine(&nhwc, "n").data, y.data);
    // INT8 engines may run channels-last too; INT8 still needs its scales.
    let out = osprey()
        .args(["build", "--onnx"])
        .arg(&model)
        .arg("--out")
        .arg(&nhwc)
        .args([
            "--layout",
            "nhwc",
            "--precision",
            "int8",
            "--input-shape",
            "x=1,2,3,3",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --calib"));

    let out = osprey()
        .args(["bench", "--engine"])
        .arg(&engine)
        .args(["--iterations", "3", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["latency_ms"]["median"].as_f64().unwrap() > 0.0);

    // A wrong input shape for the engine, and --input-shape with an engine.
    npy::write(&d.join("big.npy"), &[1, 2, 4, 4], &[1.0; 32]).unwrap();
    let out = osprey()
        .args(["run", "--engine"])
        .arg(&engine)
        .arg(format!("--input=x={}", d.join("big.npy").display()))
        .arg("--output-dir")
        .arg(&d)
        .output()
        .unwrap();
    assert_clean_failure(&out, "built for [1, 2, 3, 3]");
    let out = osprey()
        .args(["bench", "--engine"])
        .arg(&engine)
        .args(["--input-shape", "x=1,2,3,3"])
        .output()
        .unwrap();
    assert_clean_failure(&out, "does not apply to an engine");
    // A damaged engine.
    let mut bytes = std::fs::read(&engine).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 1;
    std::fs::write(d.join("bad.engine"), &bytes).unwrap();
    let out = osprey()
        .args(["inspect", "--engine"])
        .arg(d.join("bad.engine"))
        .output()
        .unwrap();
    assert_clean_failure(&out, "checksum mismatch");
    std::fs::write(d.join("short.engine"), &bytes[..n / 3]).unwrap();
    let out = osprey()
        .args(["inspect", "--engine"])
        .arg(d.join("short.engine"))
        .output()
        .unwrap();
    assert_clean_failure(&out, "truncated or corrupt");
}

#[test]
fn doctor_reports_every_check_and_fails_on_a_bad_engine() {
    let out = osprey().args(["doctor", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for want in [
        "gpu",
        "nvrtc",
        "memlock",
        "cpu governor",
        "realtime scheduling",
        "zenoh",
        "engine/device match",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for c in v["checks"].as_array().unwrap() {
        let s = c["status"].as_str().unwrap();
        assert!(["pass", "warn", "fail", "skip"].contains(&s));
        if s == "warn" || s == "fail" {
            assert!(!c["fix"].as_str().unwrap().is_empty(), "{c} has no fix");
        }
    }
    // An unusable engine is a failed check and exit code 1.
    let d = tmpdir();
    std::fs::write(d.join("junk.engine"), b"not an engine").unwrap();
    let out = osprey()
        .args(["doctor", "--engine"])
        .arg(d.join("junk.engine"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[FAIL] engine/device match"), "{text}");
    // An unreachable zenoh endpoint (a closed port on loopback) fails too.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = osprey()
        .args(["doctor", "--connect"])
        .arg(format!("tcp/127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("[FAIL] zenoh"));
}
