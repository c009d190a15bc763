//! An engine, a preprocessor and a decoder together: frames in,
//! detections or classes out, with the time each stage took.

use std::sync::Arc;
use std::time::Instant;

use osprey_engine::{Engine, ExecutionContext};

use super::decode::{
    CenterNet, ClassScore, Detection, NmsParams, Suppress, TopK, Yolo, YoloVersion,
};
use super::desc::{DecoderKind, ModelDesc, ModelKind};
use super::frame::Frame;
use super::preprocess::{ImageTransform, Preprocessor};
use super::VisionError;

/// Wall time of each stage of one frame, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimes {
    /// Conversion, resize, normalisation into the input tensor.
    pub preprocess_ms: f64,
    /// The engine run.
    pub infer_ms: f64,
    /// Output decoding (peaks, NMS, top-k).
    pub decode_ms: f64,
}

impl StageTimes {
    /// Sum of the stages.
    pub fn total_ms(&self) -> f64 {
        self.preprocess_ms + self.infer_ms + self.decode_ms
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Engine context + preprocessor for one model input.
#[derive(Debug)]
struct Front {
    ctx: ExecutionContext,
    input: usize,
    pre: Preprocessor,
}

impl Front {
    fn new(engine: Arc<Engine>, desc: &ModelDesc, threads: usize) -> Result<Front, VisionError> {
        let want = desc.input_shape();
        let inputs: Vec<_> = engine.inputs().cloned().collect();
        let Some(input) = inputs.iter().position(|d| d.name == desc.input.name) else {
            return Err(VisionError::Spec(format!(
                "model description names input '{}', the model has: {}",
                desc.input.name,
                inputs
                    .iter()
                    .map(|d| format!("'{}' {:?}", d.name, d.shape))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        if inputs[input].shape != want {
            return Err(VisionError::Spec(format!(
                "input '{}' has shape {:?}, the model description says {:?}",
                desc.input.name, inputs[input].shape, want
            )));
        }
        if inputs.len() != 1 {
            return Err(VisionError::Spec(format!(
                "the model has {} inputs; vision pipelines feed exactly one",
                inputs.len()
            )));
        }
        Ok(Front {
            ctx: ExecutionContext::new(engine, threads),
            input,
            pre: Preprocessor::new(desc.preprocess_spec())?,
        })
    }

    /// Preprocess into the engine input and run it.
    fn run(
        &mut self,
        frame: &Frame,
        times: &mut StageTimes,
    ) -> Result<ImageTransform, VisionError> {
        let t = Instant::now();
        let tensor = self.ctx.input_mut(self.input)?;
        let tf = self.pre.run(frame, tensor)?;
        times.preprocess_ms = ms(t);
        let t = Instant::now();
        self.ctx.run()?;
        times.infer_ms = ms(t);
        Ok(tf)
    }

    fn output(&self, i: usize) -> Result<&[f32], VisionError> {
        self.ctx.output_index(i).ok_or_else(|| VisionError::Output {
            decoder: "engine",
            detail: format!("output #{i} missing"),
        })
    }
}

/// Index and shape of a named (or the default) output.
fn find_output(
    engine: &Engine,
    name: Option<&str>,
    fallback: impl Fn(&[usize]) -> bool,
    what: &str,
) -> Result<(usize, Vec<usize>), VisionError> {
    let outs: Vec<_> = engine.outputs().cloned().collect();
    let found = match name {
        Some(n) => outs.iter().position(|d| d.name == n),
        None => outs.iter().position(|d| fallback(&d.shape)),
    };
    found.map(|i| (i, outs[i].shape.clone())).ok_or_else(|| {
        VisionError::Spec(format!(
            "no {what} output{} among: {}",
            name.map(|n| format!(" named '{n}'")).unwrap_or_default(),
            outs.iter()
                .map(|d| format!("'{}' {:?}", d.name, d.shape))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

#[derive(Debug)]
enum DetDecoder {
    CenterNet {
        dec: CenterNet,
        heat: (usize, Vec<usize>),
        wh: (usize, Vec<usize>),
    },
    Yolo {
        dec: Yolo,
        out: (usize, Vec<usize>),
    },
}

/// A detector: frame → boxes in source pixels.
#[derive(Debug)]
pub struct Detector {
    desc: ModelDesc,
    labels: Vec<String>,
    front: Front,
    decoder: DetDecoder,
    dets: Vec<Detection>,
}

impl Detector {
    /// Checks `engine` against `desc` (input name and shape, decoder
    /// outputs, label count) and prepares every buffer.
    pub fn new(
        engine: Arc<Engine>,
        desc: ModelDesc,
        threads: usize,
    ) -> Result<Detector, VisionError> {
        if desc.kind != ModelKind::Detector {
            return Err(VisionError::Spec(format!(
                "'{}' is a {:?}, not a detector",
                desc.name, desc.kind
            )));
        }
        let labels = desc.load_labels()?;
        let d = &desc.decode;
        let decoder = match desc.decoder {
            DecoderKind::Centernet => {
                let heat = find_output(
                    &engine,
                    d.heatmap.as_deref(),
                    |s| s.len() == 4 && s[1] != 4,
                    "heatmap",
                )?;
                let wh = find_output(
                    &engine,
                    d.boxes.as_deref(),
                    |s| s.len() == 4 && s[1] == 4,
                    "box (ltrb)",
                )?;
                if !labels.is_empty() && heat.1.get(1) != Some(&labels.len()) {
                    return Err(VisionError::Spec(format!(
                        "heatmap {:?} has {} classes, the labels file {}",
                        heat.1,
                        heat.1.get(1).copied().unwrap_or(0),
                        labels.len()
                    )));
                }
                let stride = d.stride.unwrap_or_else(|| {
                    heat.1
                        .get(3)
                        .filter(|&&w| w > 0)
                        .map_or(4, |w| desc.input.width / w)
                        .max(1)
                });
                DetDecoder::CenterNet {
                    dec: CenterNet::new(
                        stride,
                        d.top_k.unwrap_or(100),
                        d.score_threshold.unwrap_or(0.2),
                        NmsParams {
                            iou: d.nms_iou.unwrap_or(0.4),
                            max_detections: d.max_detections.unwrap_or(10),
                            class_agnostic: d.class_agnostic_nms.unwrap_or(true),
                            rule: Suppress::AtOrAbove,
                        },
                    ),
                    heat,
                    wh,
                }
            }
            DecoderKind::Yolov5 | DecoderKind::Yolov8 => {
                let out = find_output(
                    &engine,
                    d.output.as_deref(),
                    |s| s.len() == 3,
                    "detection head",
                )?;
                let version = if desc.decoder == DecoderKind::Yolov5 {
                    YoloVersion::V5
                } else {
                    YoloVersion::V8
                };
                DetDecoder::Yolo {
                    dec: Yolo::new(
                        version,
                        d.score_threshold.unwrap_or(0.25),
                        d.top_k.unwrap_or(30_000),
                        NmsParams {
                            iou: d.nms_iou.unwrap_or(0.45),
                            max_detections: d.max_detections.unwrap_or(300),
                            class_agnostic: d.class_agnostic_nms.unwrap_or(false),
                            rule: Suppress::Above,
                        },
                    ),
                    out,
                }
            }
            other => {
                return Err(VisionError::Spec(format!(
                    "decoder '{}' is not a detector decoder",
                    other.name()
                )))
            }
        };
        Ok(Detector {
            front: Front::new(engine, &desc, threads)?,
            desc,
            labels,
            decoder,
            dets: Vec::with_capacity(64),
        })
    }

    /// Runs one frame: detections in source-image pixels, highest score
    /// first, and the time per stage.
    pub fn detect(&mut self, frame: &Frame) -> Result<(&[Detection], StageTimes), VisionError> {
        let mut times = StageTimes::default();
        let tf = self.front.run(frame, &mut times)?;
        let t = Instant::now();
        match &mut self.decoder {
            DetDecoder::CenterNet { dec, heat, wh } => {
                let h = self.front.output(heat.0)?;
                let b = self.front.output(wh.0)?;
                dec.decode(h, &heat.1, b, &wh.1, &tf, &mut self.dets)?;
            }
            DetDecoder::Yolo { dec, out } => {
                let y = self.front.output(out.0)?;
                dec.decode(y, &out.1, self.labels.len(), &tf, &mut self.dets)?;
            }
        }
        times.decode_ms = ms(t);
        Ok((&self.dets, times))
    }

    /// The class names (may be empty when the description names no file).
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The detections of the last frame.
    pub fn detections(&self) -> &[Detection] {
        &self.dets
    }

    /// Bytes this detector holds for its engine context (arena, inputs,
    /// outputs), reserved at construction.
    pub fn allocated_bytes(&self) -> usize {
        self.front.ctx.allocated_bytes()
    }

    /// The description this detector was built from.
    pub fn desc(&self) -> &ModelDesc {
        &self.desc
    }
}

/// A classifier: frame → most probable classes.
#[derive(Debug)]
pub struct Classifier {
    desc: ModelDesc,
    labels: Vec<String>,
    front: Front,
    out: (usize, Vec<usize>),
    topk: TopK,
    classes: Vec<ClassScore>,
}

impl Classifier {
    /// Checks `engine` against `desc` and prepares every buffer.
    pub fn new(
        engine: Arc<Engine>,
        desc: ModelDesc,
        threads: usize,
    ) -> Result<Classifier, VisionError> {
        if desc.kind != ModelKind::Classifier {
            return Err(VisionError::Spec(format!(
                "'{}' is a {:?}, not a classifier",
                desc.name, desc.kind
            )));
        }
        let labels = desc.load_labels()?;
        let out = find_output(&engine, desc.decode.output.as_deref(), |_| true, "score")?;
        let n: usize = out.1.iter().product();
        if !labels.is_empty() && n != labels.len() {
            return Err(VisionError::Spec(format!(
                "output {:?} has {n} scores, the labels file {}",
                out.1,
                labels.len()
            )));
        }
        Ok(Classifier {
            front: Front::new(engine, &desc, threads)?,
            desc,
            labels,
            out,
            topk: TopK::default(),
            classes: Vec::with_capacity(16),
        })
    }

    /// Runs one frame: the `k` most probable classes, most probable first.
    pub fn classify(
        &mut self,
        frame: &Frame,
        k: usize,
    ) -> Result<(&[ClassScore], StageTimes), VisionError> {
        let mut times = StageTimes::default();
        self.front.run(frame, &mut times)?;
        let t = Instant::now();
        let scores = self.front.output(self.out.0)?;
        let softmax = self.desc.decoder == DecoderKind::Softmax;
        self.topk.decode(scores, softmax, k, &mut self.classes);
        times.decode_ms = ms(t);
        Ok((&self.classes, times))
    }

    /// The class names.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Bytes held for the engine context, reserved at construction.
    pub fn allocated_bytes(&self) -> usize {
        self.front.ctx.allocated_bytes()
    }

    /// The classes of the last frame.
    pub fn classes(&self) -> &[ClassScore] {
        &self.classes
    }

    /// The description this classifier was built from.
    pub fn desc(&self) -> &ModelDesc {
        &self.desc
    }
}

/// The label of class `id`, or `class <id>` when there is no such line.
pub fn label_of(labels: &[String], id: u32) -> String {
    labels
        .get(id as usize)
        .cloned()
        .unwrap_or_else(|| format!("class {id}"))
}
