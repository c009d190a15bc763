//! Model description files: what a vision model expects and how to read
//! its outputs. One TOML file per model, conventionally
//! `models/zoo/<model file stem>.toml`:
//!
//! ```toml
//! name = "centernet_mbv3_coco_512"
//! kind = "detector"              # detector | classifier
//! decoder = "centernet"          # centernet | yolov5 | yolov8 | softmax | probabilities
//! labels = "coco80_labels.txt"   # relative to this file; line i = class i
//!
//! [input]
//! name = "images"
//! width = 512
//! height = 512
//! layout = "nchw"                # nchw | nhwc
//!
//! [preprocess]
//! resize = "stretch"             # stretch | letterbox
//! filter = "tf_legacy_bilinear"  # pillow_bilinear | tf_legacy_bilinear | bilinear | nearest
//! channel_order = "rgb"          # rgb | bgr
//! scale = 1.0                    # x = (pixel * scale - mean[c]) / std[c]
//! mean = [0.0, 0.0, 0.0]
//! std = [1.0, 1.0, 1.0]
//!
//! [decode]
//! score_threshold = 0.2
//! nms_iou = 0.4
//! max_detections = 10
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::preprocess::{ChannelOrder, Layout, PreprocessSpec, ResizeMode};
use super::resize::Filter;
use super::VisionError;

/// What the model produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Boxes with labels and scores.
    Detector,
    /// One label distribution per image.
    Classifier,
}

/// How the raw outputs become results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecoderKind {
    /// CenterNet heatmap + ltrb distances (human/TF.js variant, CENTERNET.md).
    Centernet,
    /// Ultralytics YOLOv5 head: `[1, N, 5 + classes]` (cx, cy, w, h, obj, cls…).
    Yolov5,
    /// Ultralytics YOLOv8 head: `[1, 4 + classes, N]` (cx, cy, w, h, cls…).
    Yolov8,
    /// Classifier logits; softmax is applied.
    Softmax,
    /// Classifier that already outputs probabilities.
    Probabilities,
}

impl DecoderKind {
    /// Name as written in the file.
    pub fn name(self) -> &'static str {
        match self {
            DecoderKind::Centernet => "centernet",
            DecoderKind::Yolov5 => "yolov5",
            DecoderKind::Yolov8 => "yolov8",
            DecoderKind::Softmax => "softmax",
            DecoderKind::Probabilities => "probabilities",
        }
    }

    fn kind(self) -> ModelKind {
        match self {
            DecoderKind::Centernet | DecoderKind::Yolov5 | DecoderKind::Yolov8 => {
                ModelKind::Detector
            }
            DecoderKind::Softmax | DecoderKind::Probabilities => ModelKind::Classifier,
        }
    }
}

/// `[input]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputDesc {
    /// Input tensor name in the model.
    pub name: String,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Tensor layout.
    #[serde(default)]
    pub layout: Layout,
}

fn one() -> f32 {
    1.0
}
fn ones() -> [f32; 3] {
    [1.0; 3]
}
fn grey() -> f32 {
    114.0
}

/// `[preprocess]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessDesc {
    /// Stretch or letterbox.
    #[serde(default)]
    pub resize: ResizeMode,
    /// Interpolation filter.
    pub filter: Filter,
    /// Channel order the model expects.
    #[serde(default)]
    pub channel_order: ChannelOrder,
    /// Multiplies the 0..255 pixel first (e.g. `0.00392156862745098` = 1/255).
    #[serde(default = "one")]
    pub scale: f32,
    /// Per-channel mean (model channel order), after `scale`.
    #[serde(default)]
    pub mean: [f32; 3],
    /// Per-channel std (model channel order), after `scale`.
    #[serde(default = "ones")]
    pub std: [f32; 3],
    /// Letterbox padding as a 0..255 pixel value.
    #[serde(default = "grey")]
    pub pad_value: f32,
}

/// `[decode]`; every field has a default suited to the decoder.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DecodeDesc {
    /// Minimum score of a detection (CenterNet: strictly greater).
    pub score_threshold: Option<f32>,
    /// IoU above which NMS suppresses the lower-scored box.
    pub nms_iou: Option<f32>,
    /// Most detections reported per frame.
    pub max_detections: Option<usize>,
    /// Candidates kept before NMS (CenterNet's top-k).
    pub top_k: Option<usize>,
    /// NMS across classes (a box of one class suppresses another class).
    pub class_agnostic_nms: Option<bool>,
    /// Output tensor to decode (YOLO, classifiers); default: the first.
    pub output: Option<String>,
    /// CenterNet heatmap output name.
    pub heatmap: Option<String>,
    /// CenterNet box-distance output name.
    pub boxes: Option<String>,
    /// CenterNet output stride in input pixels.
    pub stride: Option<usize>,
    /// Classes to print/report for classifiers.
    pub top: Option<usize>,
}

/// A parsed model description.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDesc {
    /// Display name (defaults to the file stem).
    #[serde(default)]
    pub name: String,
    /// Detector or classifier.
    pub kind: ModelKind,
    /// Output decoder.
    #[serde(alias = "family")]
    pub decoder: DecoderKind,
    /// Labels file, relative to the description file; line i = class i
    /// (`id<TAB>name` lines use the name).
    #[serde(default)]
    pub labels: Option<PathBuf>,
    /// Input tensor.
    pub input: InputDesc,
    /// Preprocessing.
    pub preprocess: PreprocessDesc,
    /// Decoding parameters.
    #[serde(default)]
    pub decode: DecodeDesc,
    /// Folder the description was read from (labels are relative to it).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

impl ModelDesc {
    /// Reads and validates a description file.
    pub fn load(path: &Path) -> Result<ModelDesc, VisionError> {
        let text = std::fs::read_to_string(path).map_err(|e| VisionError::Io {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut d = ModelDesc::parse(&text, &base)
            .map_err(|e| VisionError::Spec(format!("{}: {e}", path.display())))?;
        if d.name.is_empty() {
            d.name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
        }
        Ok(d)
    }

    /// Parses description text; `base_dir` resolves the labels path.
    pub fn parse(text: &str, base_dir: &Path) -> Result<ModelDesc, VisionError> {
        let mut d: ModelDesc = toml::from_str(text)
            .map_err(|e| VisionError::Spec(e.to_string().lines().collect::<Vec<_>>().join(" ")))?;
        d.base_dir = base_dir.to_path_buf();
        d.validate()?;
        Ok(d)
    }

    fn validate(&self) -> Result<(), VisionError> {
        let bad = |m: String| Err(VisionError::Spec(m));
        if self.decoder.kind() != self.kind {
            return bad(format!(
                "decoder '{}' does not fit kind '{:?}'",
                self.decoder.name(),
                self.kind
            ));
        }
        let i = &self.input;
        if i.width == 0 || i.height == 0 || i.width > 16384 || i.height > 16384 {
            return bad(format!(
                "input size {}x{} is out of range",
                i.width, i.height
            ));
        }
        if let Some(t) = self.decode.nms_iou {
            if !(0.0..=1.0).contains(&t) {
                return bad(format!("decode.nms_iou {t} is outside 0..1"));
            }
        }
        if let Some(t) = self.decode.score_threshold {
            if !t.is_finite() {
                return bad(format!("decode.score_threshold {t} is not finite"));
            }
        }
        if self.decode.stride == Some(0) || self.decode.top_k == Some(0) {
            return bad("decode.stride and decode.top_k must be positive".into());
        }
        // The spec's own checks (std ≠ 0 …).
        super::preprocess::Preprocessor::new(self.preprocess_spec())?;
        Ok(())
    }

    /// The preprocessing this description asks for.
    pub fn preprocess_spec(&self) -> PreprocessSpec {
        let p = &self.preprocess;
        PreprocessSpec {
            width: self.input.width,
            height: self.input.height,
            layout: self.input.layout,
            resize: p.resize,
            filter: p.filter,
            channel_order: p.channel_order,
            scale: p.scale,
            mean: p.mean,
            std: p.std,
            pad_value: p.pad_value,
        }
    }

    /// The input tensor shape (`[1,3,H,W]` or `[1,H,W,3]`).
    pub fn input_shape(&self) -> Vec<usize> {
        let i = &self.input;
        match i.layout {
            Layout::Nchw => vec![1, 3, i.height, i.width],
            Layout::Nhwc => vec![1, i.height, i.width, 3],
        }
    }

    /// Reads the labels file (empty when the description names none).
    pub fn load_labels(&self) -> Result<Vec<String>, VisionError> {
        let Some(rel) = &self.labels else {
            return Ok(Vec::new());
        };
        let path = self.base_dir.join(rel);
        let text = std::fs::read_to_string(&path).map_err(|e| VisionError::Io {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
        Ok(parse_labels(&text))
    }
}

/// One label per line; `id<TAB>name` lines keep the name; a trailing empty
/// line is ignored.
pub fn parse_labels(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| {
            let l = l.trim_end_matches('\r');
            l.split_once('\t').map_or(l, |(_, name)| name).to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CENTERNET: &str = r#"
kind = "detector"
decoder = "centernet"
labels = "coco80_labels.txt"
[input]
name = "images"
width = 512
height = 512
[preprocess]
filter = "tf_legacy_bilinear"
[decode]
score_threshold = 0.2
"#;

    #[test]
    fn parses_with_defaults() {
        let d = ModelDesc::parse(CENTERNET, Path::new("zoo")).unwrap();
        assert_eq!(d.decoder, DecoderKind::Centernet);
        assert_eq!(d.input_shape(), vec![1, 3, 512, 512]);
        let s = d.preprocess_spec();
        assert_eq!((s.scale, s.mean, s.std), (1.0, [0.0; 3], [1.0; 3]));
        assert_eq!(s.resize, ResizeMode::Stretch);
        assert_eq!(d.decode.nms_iou, None);
    }

    #[test]
    fn mistakes_are_one_line_errors() {
        for (bad, needle) in [
            (CENTERNET.replace("centernet", "ssd"), "unknown variant"),
            (
                CENTERNET.replace("width = 512", "width = 0"),
                "out of range",
            ),
            (
                CENTERNET.replace("kind = \"detector\"", "kind = \"classifier\""),
                "does not fit",
            ),
            (
                CENTERNET.replace("[decode]", "[decode]\nnms_iou = 3.0"),
                "nms_iou",
            ),
            (
                CENTERNET.replace("[decode]", "[decode]\nscore_treshold = 3.0"),
                "unknown field",
            ),
            (
                CENTERNET.replace("[decode]", "std = [1.0, 0.0, 1.0]\n[decode]"),
                "non-zero",
            ),
            ("kind = ".to_string(), ""),
        ] {
            let e = ModelDesc::parse(&bad, Path::new("."))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn labels_keep_names_after_tabs() {
        assert_eq!(
            parse_labels("n01\ttench\nn02\tgoldfish\n"),
            vec!["tench", "goldfish"]
        );
        assert_eq!(parse_labels("person\r\ncar"), vec!["person", "car"]);
    }
}
