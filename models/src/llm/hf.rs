//! Hugging Face checkpoints: a directory with `config.json`, the weights
//! as `model.safetensors` or shards listed in `model.safetensors.index.json`,
//! and `tokenizer.json`. Files are memory-mapped; F32, F16 and BF16 weights
//! are used in place.

use std::collections::BTreeMap;
use std::path::Path;

use osprey_kernels::quant::{self, QuantType};
use safetensors::tensor::Dtype;
use serde::Deserialize;

use super::model::{Config, Layer, Mat, Model, RopeStyle, Store};
use super::tokenizer::Tokenizer;
use super::LlmError;

#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: String,
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    num_hidden_layers: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_ctx")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default)]
    bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_ctx() -> usize {
    2048
}

fn first_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|v| u32::try_from(v).ok()),
        Some(serde_json::Value::Array(a)) => a
            .first()
            .and_then(|n| n.as_u64())
            .and_then(|v| u32::try_from(v).ok()),
        _ => None,
    }
}

struct Tensor {
    ty: QuantType,
    shape: Vec<usize>,
    src: usize,
    offset: usize,
    bytes: usize,
}

fn io(path: &Path, e: impl std::fmt::Display) -> LlmError {
    LlmError::Io {
        path: path.display().to_string(),
        error: e.to_string(),
    }
}

impl Model {
    /// Loads a Hugging Face checkpoint directory (Llama, Mistral, Qwen2).
    pub fn from_hf_dir(dir: &Path) -> Result<Model, LlmError> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| io(&cfg_path, e))?;
        let hc: HfConfig = serde_json::from_str(&text)
            .map_err(|e| LlmError::Model(format!("{}: {e}", cfg_path.display())))?;
        let arch = if hc.model_type.is_empty() {
            "llama".to_string()
        } else {
            hc.model_type.clone()
        };
        if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(LlmError::Model(format!(
                "model_type '{arch}' is not supported (llama, mistral, qwen2 are)"
            )));
        }
        // Weights: one file or an index of shards.
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<String> = if index.is_file() {
            let t = std::fs::read_to_string(&index).map_err(|e| io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&t)
                .map_err(|e| LlmError::Model(format!("{}: {e}", index.display())))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| LlmError::Model(format!("{}: no weight_map", index.display())))?;
            let mut f: Vec<String> = map
                .values()
                .filter_map(|s| s.as_str().map(String::from))
                .collect();
            f.sort();
            f.dedup();
            f
        } else {
            vec!["model.safetensors".into()]
        };
        let mut stores = Vec::new();
        let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
        for name in &files {
            if name.contains('/') || name.contains("..") {
                return Err(LlmError::Model(format!(
                    "shard name '{name}' leaves the directory"
                )));
            }
            let path = dir.join(name);
            let file = std::fs::File::open(&path).map_err(|e| io(&path, e))?;
            // SAFETY: FFI mapping of a read-only file; only read (see Gguf::open).
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io(&path, e))?;
            let (header, meta) = safetensors::SafeTensors::read_metadata(&map)
                .map_err(|e| LlmError::Model(format!("{}: {e}", path.display())))?;
            let base = 8 + header;
            for (tname, info) in meta.tensors() {
                let ty = match info.dtype {
                    Dtype::F32 => QuantType::F32,
                    Dtype::F16 => QuantType::F16,
                    Dtype::BF16 => QuantType::BF16,
                    other => {
                        return Err(LlmError::Model(format!(
                            "{}: tensor '{tname}' is {other:?} (F32, F16, BF16 are supported)",
                            path.display()
                        )))
                    }
                };
                let (a, b) = info.data_offsets;
                let end = base.checked_add(b).filter(|&e| e <= map.len() && a <= b);
                if end.is_none() {
                    return Err(LlmError::Model(format!(
                        "{}: tensor '{tname}' lies past the end",
                        path.display()
                    )));
                }
                tensors.insert(
                    tname,
                    Tensor {
                        ty,
                        shape: info.shape.clone(),
                        src: stores.len(),
                        offset: base + a,
                        bytes: b - a,
                    },
                );
            }
            stores.push(Store::Map(map));
        }
        let tokenizer = Tokenizer::from_hf_json(
            &dir.join("tokenizer.json"),
            first_id(&hc.bos_token_id),
            first_id(&hc.eos_token_id),
        )?;
        let n_heads = hc.num_attention_heads;
        let n_kv_heads = hc.num_key_value_heads.unwrap_or(n_heads);
        let dim = hc.hidden_size;
        if n_heads == 0
            || n_kv_heads == 0
            || !n_heads.is_multiple_of(n_kv_heads)
            || !dim.is_multiple_of(n_heads)
        {
            return Err(LlmError::Model(format!(
                "{dim} wide with {n_heads} heads and {n_kv_heads} KV heads does not divide"
            )));
        }
        let head_dim = hc.head_dim.unwrap_or(dim / n_heads);
        let rope_scale = match &hc.rope_scaling {
            None | Some(serde_json::Value::Null) => 1.0,
            Some(v)
                if v.get("type")
                    .or(v.get("rope_type"))
                    .and_then(|t| t.as_str())
                    == Some("linear") =>
            {
                v.get("factor").and_then(|f| f.as_f64()).unwrap_or(1.0)
            }
            Some(v) => {
                return Err(LlmError::Model(format!(
                    "rope_scaling {v} is not supported (linear is)"
                )))
            }
        };
        let vocab = tokenizer.vocab_size();
        let cfg = Config {
            arch,
            n_layers: hc.num_hidden_layers,
            dim,
            ffn: hc.intermediate_size,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dim: head_dim,
            rope_base: hc.rope_theta,
            rope_scale,
            eps: hc.rms_norm_eps as f32,
            context: hc.max_position_embeddings,
            vocab,
        };
        if head_dim * n_heads != dim {
            return Err(LlmError::Model(format!(
                "head_dim {head_dim} × {n_heads} heads ≠ hidden_size {dim}"
            )));
        }
        let get = |name: &str| {
            tensors
                .get(name)
                .ok_or_else(|| LlmError::Model(format!("tensor '{name}' missing")))
        };
        let mat = |name: &str, rows: usize, cols: usize| -> Result<Mat, LlmError> {
            let t = get(name)?;
            if t.shape != [rows, cols] {
                return Err(LlmError::Model(format!(
                    "tensor '{name}' is {:?}, expected [{rows}, {cols}]",
                    t.shape
                )));
            }
            Ok(Mat {
                ty: t.ty,
                src: t.src,
                offset: t.offset,
                bytes: t.bytes,
                rows,
                cols,
                packed: None,
            })
        };
        let vec_of = |name: &str, n: usize| -> Result<Vec<f32>, LlmError> {
            let t = get(name)?;
            if t.shape.iter().product::<usize>() != n || t.bytes != t.ty.row_bytes(n) {
                return Err(LlmError::Model(format!(
                    "tensor '{name}' is {:?}, expected [{n}]",
                    t.shape
                )));
            }
            let mut v = vec![0.0; n];
            quant::dequantize(
                t.ty,
                &stores[t.src].bytes()[t.offset..t.offset + t.bytes],
                &mut v,
            );
            Ok(v)
        };
        let opt_vec = |name: &str, n: usize| -> Result<Option<Vec<f32>>, LlmError> {
            if tensors.contains_key(name) {
                vec_of(name, n).map(Some)
            } else {
                Ok(None)
            }
        };
        let kv_dim = n_kv_heads * head_dim;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            layers.push(Layer {
                attn_norm: vec_of(&p("input_layernorm.weight"), dim)?,
                wq: mat(&p("self_attn.q_proj.weight"), dim, dim)?,
                wk: mat(&p("self_attn.k_proj.weight"), kv_dim, dim)?,
                wv: mat(&p("self_attn.v_proj.weight"), kv_dim, dim)?,
                bq: opt_vec(&p("self_attn.q_proj.bias"), dim)?,
                bk: opt_vec(&p("self_attn.k_proj.bias"), kv_dim)?,
                bv: opt_vec(&p("self_attn.v_proj.bias"), kv_dim)?,
                wo: mat(&p("self_attn.o_proj.weight"), dim, dim)?,
                ffn_norm: vec_of(&p("post_attention_layernorm.weight"), dim)?,
                gate: mat(&p("mlp.gate_proj.weight"), cfg.ffn, dim)?,
                up: mat(&p("mlp.up_proj.weight"), cfg.ffn, dim)?,
                down: mat(&p("mlp.down_proj.weight"), dim, cfg.ffn)?,
            });
        }
        let embd = mat("model.embed_tokens.weight", vocab, dim)?;
        let output = if !hc.tie_word_embeddings && tensors.contains_key("lm_head.weight") {
            mat("lm_head.weight", vocab, dim)?
        } else {
            embd.clone()
        };
        let out_norm = vec_of("model.norm.weight", dim)?;
        Ok(Model::assemble(
            stores,
            cfg,
            tokenizer,
            embd,
            layers,
            out_norm,
            output,
            RopeStyle::Neox,
        ))
    }
}
