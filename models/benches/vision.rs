//! Vision pipeline stages on one core: preprocessing a 1920×1080 camera
//! frame into each shared model's input, and decoding each head.
//!
//! `cargo bench -p osprey-models --bench vision`. The CenterNet decode uses
//! the real heads of `dog.jpg` from ../shared/fixtures/reference when they
//! are there (a synthetic heatmap otherwise, said on stderr).

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use osprey_models::vision::decode::{CenterNet, NmsParams, Suppress, TopK, Yolo, YoloVersion};
use osprey_models::vision::preprocess::{ChannelOrder, Layout, ResizeMode};
use osprey_models::vision::resize::Filter;
use osprey_models::vision::{
    encode_rgb, Frame, PixelFormat, PreprocessSpec, Preprocessor, RgbImage, YuvMatrix,
};

/// A 1080p test card: smooth gradients plus texture, so YUV conversion
/// and clamping do real work.
fn camera_image() -> RgbImage {
    let (w, h) = (1920, 1080);
    let mut data = Vec::with_capacity(3 * w * h);
    for y in 0..h {
        for x in 0..w {
            data.push((x * 255 / w) as u8);
            data.push((y * 255 / h) as u8);
            data.push(((x ^ y) & 0xff) as u8);
        }
    }
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

fn spec(
    w: usize,
    h: usize,
    filter: Filter,
    order: ChannelOrder,
    scale: f32,
    mean: [f32; 3],
    std: [f32; 3],
) -> PreprocessSpec {
    PreprocessSpec {
        width: w,
        height: h,
        layout: Layout::Nchw,
        resize: ResizeMode::Stretch,
        filter,
        channel_order: order,
        scale,
        mean,
        std,
        pad_value: 0.0,
    }
}

fn models() -> Vec<(&'static str, PreprocessSpec)> {
    let imnet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
    vec![
        (
            "centernet_512",
            spec(
                512,
                512,
                Filter::TfLegacyBilinear,
                ChannelOrder::Rgb,
                1.0,
                [0.0; 3],
                [1.0; 3],
            ),
        ),
        (
            "effnet_224",
            spec(
                224,
                224,
                Filter::PillowBilinear,
                ChannelOrder::Rgb,
                1.0,
                [127.0; 3],
                [128.0; 3],
            ),
        ),
        (
            "ppocr_det_640",
            spec(
                640,
                640,
                Filter::Bilinear,
                ChannelOrder::Bgr,
                1.0 / 255.0,
                imnet.0,
                imnet.1,
            ),
        ),
        (
            "ppocr_cls_48x192",
            spec(
                192,
                48,
                Filter::Bilinear,
                ChannelOrder::Bgr,
                1.0 / 255.0,
                [0.5; 3],
                [0.5; 3],
            ),
        ),
    ]
}

fn preprocess(c: &mut Criterion) {
    let img = camera_image();
    let nv12 = encode_rgb(&img, PixelFormat::Nv12, YuvMatrix::Bt601Limited);
    let frames = [
        (
            "nv12",
            Frame::packed(&nv12, PixelFormat::Nv12, 1920, 1080).unwrap(),
        ),
        ("rgb8", img.frame()),
    ];
    let mut g = c.benchmark_group("preprocess_1080p");
    for (fname, frame) in &frames {
        for (model, s) in models() {
            if *fname == "rgb8" && model != "centernet_512" {
                continue;
            }
            let mut p = Preprocessor::new(s).unwrap();
            let mut out = vec![0.0f32; p.tensor_len()];
            g.bench_function(format!("{fname}_to_{model}"), |b| {
                b.iter(|| p.run(black_box(frame), &mut out).unwrap())
            });
        }
    }
    g.finish();
}

fn shared() -> Option<PathBuf> {
    let d = std::env::var_os("OSPREY_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    d.join("fixtures/reference").is_dir().then_some(d)
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    let (heat, wh) = match shared() {
        Some(d) => {
            let r = d.join("fixtures/reference");
            let rd = |n: &str| {
                osprey_models::engine::npy::read(&r.join(n), false)
                    .unwrap()
                    .data
            };
            (
                rd("centernet_mbv3_coco_512__dog__tower_0_keypoints.npy"),
                rd("centernet_mbv3_coco_512__dog__tower_0_wh.npy"),
            )
        }
        None => {
            eprintln!("../shared not found: CenterNet decode on a synthetic heatmap");
            let n = 80 * 128 * 128;
            let heat = (0..n)
                .map(|i| if i % 997 == 0 { 0.5 } else { 0.01 })
                .collect();
            (heat, vec![10.0; 4 * 128 * 128])
        }
    };
    let t = Preprocessor::new(models()[0].1.clone())
        .unwrap()
        .transform_for(1920, 1080);
    let mut cn = CenterNet::new(
        4,
        100,
        0.2,
        NmsParams {
            iou: 0.4,
            max_detections: 10,
            class_agnostic: true,
            rule: Suppress::AtOrAbove,
        },
    );
    let mut out = Vec::new();
    g.bench_function("centernet_80x128x128", |b| {
        b.iter(|| {
            cn.decode(
                black_box(&heat),
                &[1, 80, 128, 128],
                &wh,
                &[1, 4, 128, 128],
                &t,
                &mut out,
            )
            .unwrap()
        })
    });
    // YOLOv8n-style head: 84 × 8400, a few hundred anchors above 0.25.
    let n = 8400;
    let mut y = vec![0.0f32; 84 * n];
    for i in 0..n {
        y[i] = (i % 80) as f32 * 8.0;
        y[n + i] = (i / 80) as f32 * 6.0;
        y[2 * n + i] = 40.0;
        y[3 * n + i] = 30.0;
        for k in 0..80 {
            y[(4 + k) * n + i] = ((i * 31 + k * 17) % 1000) as f32 / 3000.0;
        }
    }
    let mut yolo = Yolo::new(
        YoloVersion::V8,
        0.25,
        30_000,
        NmsParams {
            iou: 0.45,
            max_detections: 300,
            class_agnostic: false,
            rule: Suppress::Above,
        },
    );
    g.bench_function("yolov8_84x8400", |b| {
        b.iter(|| {
            yolo.decode(black_box(&y), &[1, 84, n], 80, &t, &mut out)
                .unwrap()
        })
    });
    let logits: Vec<f32> = (0..1000)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
        .collect();
    let mut topk = TopK::default();
    let mut classes = Vec::new();
    g.bench_function("softmax_top5_1000", |b| {
        b.iter(|| topk.decode(black_box(&logits), true, 5, &mut classes))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = preprocess, decode
}
criterion_main!(benches);
