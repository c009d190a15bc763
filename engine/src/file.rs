//! The engine file: everything needed to start inferring without importing,
//! optimising or tuning again.
//!
//! # Format (version 2; version 1 is read too)
//!
//! A [safetensors](https://github.com/huggingface/safetensors) file, so any
//! safetensors tool can list and read the weights:
//!
//! * tensors `c<id>`: every constant the optimised graph reads, `<id>` being
//!   its index in the plan's tensor list; F32, or F16 for `--precision fp16`
//!   engines (I64 for integer constants); in `int8` engines the weights of
//!   each INT8 convolution (and INT8 `Gemm` with transposed B) are I8, per
//!   output channel, with their F32 scales in `q<id>`. Data offsets are aligned to the
//!   element size inside an 8-byte-aligned data section, so the weights can be
//!   memory-mapped.
//! * `__metadata__` (string → string), append-only keys:
//!   * `format` = `osprey-engine`
//!   * `format_version` = `2` (`1`: written before a concatenation could
//!     carry a fused activation; otherwise the same)
//!   * `precision` = `fp32` | `fp16` | `int8` (INT8 convolutions carry
//!     their input scale in the plan's node attributes)
//!   * `fingerprint` = JSON [`Fingerprint`] of the device the tactics were timed on
//!   * `plan` = JSON: the optimised graph (tensors with shapes and dtypes,
//!     nodes with resolved ops), the tactic per node, and the memory plan
//!     (arena offset and length per tensor)
//!   * `build` = JSON build report (informational)
//!   * `sha256` = hex SHA-256 over every other metadata value above (in this
//!     order, each followed by a NUL) and then, for each tensor in name order,
//!     its name, dtype, shape and bytes.
//!
//! Loading checks, in order: safetensors structure (truncation, offsets),
//! `format`, `format_version`, `sha256`, device fingerprint, and that the
//! stored memory plan is the one this version computes.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{EngineError, Result};
use crate::fingerprint::Fingerprint;
use crate::int8::int8_plan;
use crate::ir::{ConstData, DType, Graph, Node, Tensor, TensorId};
use crate::tune::Tactics;

/// A tensor as stored: name, dtype, shape, little-endian bytes.
type StoredTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// The format version this build writes.
///
/// Version 2 adds a node attribute older readers would ignore (a
/// concatenation's fused Relu or Clip), so they must refuse these files;
/// version 1 files mean the same to this reader and still load.
pub const FORMAT_VERSION: u32 = 2;

/// The oldest format version this build reads.
pub const OLDEST_READABLE_VERSION: u32 = 1;

/// Storage precision of the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precision {
    /// 32-bit float weights.
    Fp32,
    /// 16-bit float weights (computed in f32 after loading).
    Fp16,
    /// INT8 convolutions where calibrated (marked in the plan; weights are
    /// stored as f32 and quantized per output channel at load), FP32
    /// elsewhere.
    Int8,
}

impl Precision {
    /// `fp32` / `fp16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
        }
    }
    fn parse(s: &str) -> Option<Precision> {
        match s {
            "fp32" => Some(Precision::Fp32),
            "fp16" => Some(Precision::Fp16),
            "int8" => Some(Precision::Int8),
            _ => None,
        }
    }
}

/// Contents of an engine file.
#[derive(Clone, Debug)]
pub struct EngineFile {
    /// The optimised graph, constants included.
    pub graph: Graph,
    /// Tactic per node.
    pub tactics: Tactics,
    /// The device the tactics were chosen on.
    pub fingerprint: Fingerprint,
    /// Weight storage precision.
    pub precision: Precision,
    /// Build report (free-form JSON).
    pub build: serde_json::Value,
}

#[derive(Serialize, Deserialize)]
struct TensorJson {
    name: String,
    shape: Vec<usize>,
    dtype: DType,
    /// Stored as tensor `c<id>`.
    stored: bool,
}

#[derive(Serialize, Deserialize)]
struct PlanJson {
    tensors: Vec<TensorJson>,
    nodes: Vec<Node>,
    inputs: Vec<TensorId>,
    outputs: Vec<TensorId>,
    opset: i64,
    tactics: Tactics,
    /// Arena (offset, length) in f32 elements per tensor.
    memory: Vec<Option<(usize, usize)>>,
    arena_bytes: usize,
}

fn file_err(path: &str, msg: impl Into<String>) -> EngineError {
    EngineError::EngineFile {
        path: path.to_string(),
        msg: msg.into(),
    }
}

/// Rounds every f32 constant to f16 and back, so a graph computes exactly
/// with the weights an fp16 engine stores.
pub fn round_constants_to_f16(g: &mut Graph) {
    for t in &mut g.tensors {
        if let Some(ConstData::F32(v)) = &mut t.value {
            v.iter_mut()
                .for_each(|x| *x = half::f16::from_f32(*x).to_f32());
        }
    }
}

fn referenced(g: &Graph) -> Vec<bool> {
    let mut used = vec![false; g.tensors.len()];
    for n in &g.nodes {
        for &t in &n.inputs {
            used[t] = true;
        }
    }
    for &t in &g.outputs {
        used[t] = true;
    }
    used
}

fn digest(meta: &[(&str, &str)], tensors: &[StoredTensor]) -> String {
    let mut h = Sha256::new();
    for (_, v) in meta {
        h.update(v.as_bytes());
        h.update([0u8]);
    }
    for (name, dtype, shape, bytes) in tensors {
        h.update(name.as_bytes());
        h.update(format!("{dtype:?}{shape:?}").as_bytes());
        h.update(bytes);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Weight tensors of the convolutions an INT8 engine runs in INT8 (marked
/// INT8, and not tuned to an FP32 tactic), with their output channels.
fn int8_weight_tensors(ef: &EngineFile) -> HashMap<TensorId, usize> {
    let mut out = HashMap::new();
    if ef.precision != Precision::Int8 {
        return out;
    }
    for (i, n) in ef.graph.nodes.iter().enumerate() {
        let tactic = ef.tactics.get(i).and_then(|t| t.as_deref());
        if !crate::int8::runs_int8(&n.op, tactic) {
            continue;
        }
        // A Gemm's weights are per output row only when B is transposed
        // ([n][k]); otherwise they stay f32 in the file.
        if matches!(n.op, crate::ir::Op::Gemm { trans_b: false, .. }) {
            continue;
        }
        let Some(&w) = n.inputs.get(1) else { continue };
        // Only weights no other node reads.
        let shared = ef
            .graph
            .nodes
            .iter()
            .enumerate()
            .any(|(j, m)| j != i && m.inputs.contains(&w));
        if let (false, Some(&c_out)) = (shared, ef.graph.tensors[w].shape.first()) {
            out.insert(w, c_out);
        }
    }
    out
}

/// Serialises an engine.
pub fn to_bytes(ef: &EngineFile) -> Result<Vec<u8>> {
    let g = &ef.graph;
    let used = referenced(g);
    let (_, plan) = int8_plan(g, &ef.tactics);
    let mut tensors: Vec<StoredTensor> = Vec::new();
    let mut tjson = Vec::with_capacity(g.tensors.len());
    let int8_weights = int8_weight_tensors(ef);
    for (id, t) in g.tensors.iter().enumerate() {
        let stored = used[id] && t.value.is_some();
        if let (true, Some(ConstData::F32(d)), Some(&c_out)) =
            (stored, &t.value, int8_weights.get(&id))
        {
            // An INT8 layer's weights: per-output-channel INT8 values and
            // their scales (`q<id>`), exactly what the kernel computes with.
            let (scales, q) = osprey_kernels::qconv::quantize_weights(d, c_out);
            tensors.push((
                format!("c{id}"),
                Dtype::I8,
                t.shape.clone(),
                q.iter().map(|&v| v as u8).collect(),
            ));
            tensors.push((
                format!("q{id}"),
                Dtype::F32,
                vec![c_out],
                scales.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
        } else if let (true, Some(v)) = (stored, &t.value) {
            let (dtype, bytes) = match (v, ef.precision) {
                (ConstData::F32(d), Precision::Fp16) => (
                    Dtype::F16,
                    d.iter()
                        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                        .collect(),
                ),
                (ConstData::F32(d), Precision::Fp32 | Precision::Int8) => {
                    (Dtype::F32, d.iter().flat_map(|x| x.to_le_bytes()).collect())
                }
                (ConstData::I64(d), _) => {
                    (Dtype::I64, d.iter().flat_map(|x| x.to_le_bytes()).collect())
                }
            };
            tensors.push((format!("c{id}"), dtype, t.shape.clone(), bytes));
        }
        tjson.push(TensorJson {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype: t.dtype,
            stored,
        });
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let memory: Vec<Option<(usize, usize)>> = (0..g.tensors.len()).map(|t| plan.range(t)).collect();
    let pj = PlanJson {
        tensors: tjson,
        nodes: g.nodes.clone(),
        inputs: g.inputs.clone(),
        outputs: g.outputs.clone(),
        opset: g.opset,
        tactics: {
            // One entry per node; missing entries mean "default tactic".
            let mut t = ef.tactics.clone();
            t.resize(g.nodes.len(), None);
            t
        },
        memory,
        arena_bytes: plan.arena_bytes(),
    };
    let json = |v: &dyn erased::Ser| v.to_json();
    let plan_s = json(&pj)?;
    let fp_s = json(&ef.fingerprint)?;
    let build_s = json(&ef.build)?;
    let version = FORMAT_VERSION.to_string();
    let meta: Vec<(&str, &str)> = vec![
        ("format", "osprey-engine"),
        ("format_version", &version),
        ("precision", ef.precision.name()),
        ("fingerprint", &fp_s),
        ("plan", &plan_s),
        ("build", &build_s),
    ];
    let sha = digest(&meta, &tensors);
    let mut info: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    info.insert("sha256".into(), sha);
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| EngineError::Model(format!("engine tensor {name}: {e:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize(views, &Some(info))
        .map_err(|e| EngineError::Model(format!("serialising engine: {e:?}")))
}

/// Writes an engine file; returns its size in bytes.
pub fn save(path: &Path, ef: &EngineFile) -> Result<u64> {
    let bytes = to_bytes(ef)?;
    std::fs::write(path, &bytes).map_err(|source| EngineError::Io {
        path: path.display().to_string(),
        error: source,
    })?;
    Ok(bytes.len() as u64)
}

/// Reads and verifies an engine file. With `device` set, an engine tuned
/// for another device is refused.
pub fn load(path: &Path, device: Option<&Fingerprint>) -> Result<EngineFile> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| EngineError::Io {
        path: p.clone(),
        error: source,
    })?;
    from_bytes(&bytes, device, &p)
}

/// As [`load`], from bytes; `path` names the source in errors.
pub fn from_bytes(bytes: &[u8], device: Option<&Fingerprint>, path: &str) -> Result<EngineFile> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| file_err(path, format!("truncated or corrupt engine file ({e:?})")))?;
    let (_, md) = SafeTensors::read_metadata(bytes)
        .map_err(|e| file_err(path, format!("truncated or corrupt engine file ({e:?})")))?;
    let info = md.metadata().clone().unwrap_or_default();
    let get = |k: &str| info.get(k).map(String::as_str);
    if get("format") != Some("osprey-engine") {
        return Err(file_err(
            path,
            "not an osprey engine (a safetensors file without osprey metadata)",
        ));
    }
    let version = get("format_version").unwrap_or("?");
    let readable = OLDEST_READABLE_VERSION..=FORMAT_VERSION;
    if !version.parse::<u32>().is_ok_and(|v| readable.contains(&v)) {
        return Err(file_err(
            path,
            format!("engine format version {version}; this osprey reads versions {OLDEST_READABLE_VERSION} to {FORMAT_VERSION}: rebuild the engine with `osprey build`"),
        ));
    }
    let mut tensors: Vec<StoredTensor> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| (name, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let keys = [
        "format",
        "format_version",
        "precision",
        "fingerprint",
        "plan",
        "build",
    ];
    let meta: Vec<(&str, &str)> = keys.iter().map(|k| (*k, get(k).unwrap_or(""))).collect();
    if get("sha256") != Some(digest(&meta, &tensors).as_str()) {
        return Err(file_err(
            path,
            "checksum mismatch: the engine file was modified or damaged; rebuild it",
        ));
    }
    let precision = Precision::parse(get("precision").unwrap_or(""))
        .ok_or_else(|| file_err(path, "unknown precision"))?;
    let fingerprint: Fingerprint = serde_json::from_str(get("fingerprint").unwrap_or(""))
        .map_err(|e| file_err(path, format!("bad fingerprint: {e}")))?;
    if let Some(dev) = device {
        if !fingerprint.compatible_with(dev) {
            return Err(file_err(
                path,
                format!(
                    "engine was tuned for another device ({}); this device is {}: rebuild it here with `osprey build`",
                    fingerprint.describe(),
                    dev.describe()
                ),
            ));
        }
    }
    let pj: PlanJson = serde_json::from_str(get("plan").unwrap_or(""))
        .map_err(|e| file_err(path, format!("bad plan: {e}")))?;
    let by_name: HashMap<&str, &StoredTensor> = tensors.iter().map(|t| (t.0.as_str(), t)).collect();
    let mut g = Graph {
        opset: pj.opset,
        inputs: pj.inputs,
        outputs: pj.outputs,
        nodes: pj.nodes,
        tensors: Vec::new(),
        ..Graph::default()
    };
    for (id, t) in pj.tensors.into_iter().enumerate() {
        let value = if t.stored {
            let (_, dtype, shape, data) = by_name
                .get(format!("c{id}").as_str())
                .ok_or_else(|| file_err(path, format!("tensor c{id} missing")))?;
            if *shape != t.shape {
                return Err(file_err(
                    path,
                    format!("tensor c{id} has shape {shape:?}, plan says {:?}", t.shape),
                ));
            }
            Some(match dtype {
                Dtype::F32 => ConstData::F32(
                    data.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ),
                Dtype::F16 => ConstData::F32(
                    data.chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect(),
                ),
                Dtype::I8 => {
                    // INT8 weights: dequantized with their per-channel
                    // scales; the INT8 kernel requantizes them to the same
                    // integers.
                    let scales = by_name
                        .get(format!("q{id}").as_str())
                        .filter(|(_, dt, sh, _)| *dt == Dtype::F32 && sh.len() == 1)
                        .map(|(_, _, _, b)| {
                            b.chunks_exact(4)
                                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                                .collect::<Vec<f32>>()
                        })
                        .ok_or_else(|| {
                            file_err(path, format!("INT8 tensor c{id} without its scales q{id}"))
                        })?;
                    let per = data.len().checked_div(scales.len()).unwrap_or(0);
                    if scales.is_empty() || per * scales.len() != data.len() {
                        return Err(file_err(path, format!("tensor q{id} does not fit c{id}")));
                    }
                    ConstData::F32(
                        data.iter()
                            .enumerate()
                            .map(|(i, &b)| b as i8 as f32 * scales[i / per])
                            .collect(),
                    )
                }
                Dtype::I64 => ConstData::I64(
                    data.chunks_exact(8)
                        .map(|c| {
                            i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                        })
                        .collect(),
                ),
                other => {
                    return Err(file_err(
                        path,
                        format!("tensor c{id} has unsupported dtype {other:?}"),
                    ))
                }
            })
        } else {
            None
        };
        g.tensors.push(Tensor {
            name: t.name,
            shape: t.shape,
            dtype: t.dtype,
            value,
        });
    }
    if pj.tactics.len() != g.nodes.len() {
        return Err(file_err(path, "tactic table does not match the graph"));
    }
    for &t in g.inputs.iter().chain(&g.outputs) {
        if t >= g.tensors.len() {
            return Err(file_err(path, "input/output index out of range"));
        }
    }
    for n in &g.nodes {
        if n.inputs
            .iter()
            .chain(&n.outputs)
            .any(|&t| t >= g.tensors.len())
        {
            return Err(file_err(
                path,
                format!("node '{}' refers to a missing tensor", n.name),
            ));
        }
    }
    g.validate()
        .map_err(|e| file_err(path, format!("invalid graph: {e}")))?;
    let (_, plan) = int8_plan(&g, &pj.tactics);
    let memory: Vec<Option<(usize, usize)>> = (0..g.tensors.len()).map(|t| plan.range(t)).collect();
    if memory != pj.memory {
        return Err(file_err(
            path,
            "stored memory plan differs from this version's planner: rebuild the engine",
        ));
    }
    let build =
        serde_json::from_str(get("build").unwrap_or("null")).unwrap_or(serde_json::Value::Null);
    Ok(EngineFile {
        graph: g,
        tactics: pj.tactics,
        fingerprint,
        precision,
        build,
    })
}

/// JSON encoding of the metadata values behind one small trait object.
mod erased {
    use crate::error::{EngineError, Result};

    pub trait Ser {
        fn to_json(&self) -> Result<String>;
    }

    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> Result<String> {
            serde_json::to_string(self).map_err(|e| EngineError::Model(e.to_string()))
        }
    }
}
