//! Perception models on lane workers, and what identifies their files.

use super::*;

/// A loaded perception model on one worker.
#[derive(Debug)]
pub(super) enum Perceiver {
    Det(Box<Detector>),
    Cls(Box<Classifier>, usize),
}

impl Perceiver {
    pub(super) fn allocated_bytes(&self) -> usize {
        match self {
            Perceiver::Det(d) => d.allocated_bytes(),
            Perceiver::Cls(c, _) => c.allocated_bytes(),
        }
    }
}

/// Loads one model's engine and builds a perceiver for each of `n` workers.
pub(super) fn load_perceivers(m: &ModelConfig, n: usize) -> Result<Vec<Perceiver>> {
    let desc = ModelDesc::load(&m.model_desc)
        .with_context(|| format!("model {:?}: {}", m.name, m.model_desc.display()))?;
    let args = ModelArgs {
        onnx: m.onnx.clone(),
        engine: m.engine.clone(),
        input_shapes: Vec::new(),
        threads: Some(m.threads),
        no_optimize: false,
    };
    let mut shapes = HashMap::new();
    shapes.insert(desc.input.name.clone(), desc.input_shape());
    let engine = load_engine(&args, shapes).with_context(|| format!("model {:?}", m.name))?;
    (0..n)
        .map(|_| {
            Ok(match desc.kind {
                ModelKind::Detector => Perceiver::Det(Box::new(
                    Detector::new(engine.clone(), desc.clone(), m.threads)
                        .with_context(|| format!("model {:?}", m.name))?,
                )),
                ModelKind::Classifier => {
                    let top = desc.decode.top.unwrap_or(5);
                    Perceiver::Cls(
                        Box::new(
                            Classifier::new(engine.clone(), desc.clone(), m.threads)
                                .with_context(|| format!("model {:?}", m.name))?,
                        ),
                        top,
                    )
                }
            })
        })
        .collect()
}

/// What identifies a model's loaded files (a change triggers a swap on
/// reload).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Stamp {
    pub(super) files: Vec<(PathBuf, Option<SystemTime>, u64)>,
    pub(super) threads: usize,
}

impl Stamp {
    pub(super) fn of(m: &ModelConfig) -> Stamp {
        let files = [m.engine.as_ref(), m.onnx.as_ref(), Some(&m.model_desc)]
            .into_iter()
            .flatten()
            .map(|p| {
                let meta = std::fs::metadata(p).ok();
                (
                    p.clone(),
                    meta.as_ref().and_then(|m| m.modified().ok()),
                    meta.map_or(0, |m| m.len()),
                )
            })
            .collect();
        Stamp {
            files,
            threads: m.threads,
        }
    }
}
