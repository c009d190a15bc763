//! Llama-family decoder driven by GGUF metadata: RMSNorm, RoPE (base from
//! metadata, adjacent-pair rotation as GGUF's Llama layout expects),
//! grouped-query attention over the paged KV cache, SwiGLU MLP, optional
//! q/k/v biases (Qwen2), tied or separate output embeddings. Weights stay
//! quantized in the memory map; every product runs on the blocks.
//!
//! One forward pass takes a *batch of rows*: each row is one token of one
//! sequence. A prompt is many rows of one sequence (prefill); a decode step
//! is one row per active sequence (in-flight batching); speculative
//! verification is several rows of one sequence. Weight rows are read once
//! per pass for all rows.

use std::path::Path;

use osprey_kernels::attention;
use osprey_kernels::pool::ThreadPool;
use osprey_kernels::quant::{self, QuantType};

use super::gguf::{Gguf, TensorInfo, Value};
use super::kv::{KvCache, SeqSet};
use super::tokenizer::Tokenizer;
use super::LlmError;

/// Hyper-parameters, from `<arch>.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `general.architecture` (llama, qwen2, ...).
    pub arch: String,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Embedding width.
    pub dim: usize,
    /// MLP hidden width.
    pub ffn: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Dimensions rotated by RoPE (≤ head_dim).
    pub rope_dim: usize,
    /// RoPE frequency base.
    pub rope_base: f64,
    /// Linear RoPE scaling factor (1 = none).
    pub rope_scale: f64,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Trained context length.
    pub context: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

impl Config {
    /// The head geometry attention works with.
    pub fn heads(&self) -> attention::Heads {
        attention::Heads {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// Width of K (and V) per position.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// A weight matrix in one of the model's files: `rows` outputs × `cols`
/// inputs, row-major, `bytes` bytes at `offset` of store `src`.
#[derive(Debug, Clone)]
pub(crate) struct Mat {
    pub(crate) ty: QuantType,
    pub(crate) src: usize,
    pub(crate) offset: usize,
    pub(crate) bytes: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Row-interleaved copy for the 8-bit-activation products (made by
    /// [`Model::set_int8_activations`] where the CPU has the kernels).
    pub(crate) packed: Option<quant::Packed>,
}

impl Mat {
    /// This matrix's bytes, row-major, in the model's `stores`.
    fn data<'a>(&self, stores: &'a [Store]) -> &'a [u8] {
        &stores[self.src].bytes()[self.offset..self.offset + self.bytes]
    }
}

/// Where weights live: a GGUF file, or mapped safetensors files.
#[derive(Debug)]
pub(crate) enum Store {
    Gguf(Gguf),
    Map(memmap2::Mmap),
}

impl Store {
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Store::Gguf(g) => g.bytes(),
            Store::Map(m) => m,
        }
    }
}

/// How RoPE pairs dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: GGUF Llama (weights permuted at
    /// conversion).
    Norm,
    /// Halves `(i, i + d/2)`: Hugging Face checkpoints, GGUF Qwen2.
    Neox,
}

#[derive(Debug)]
pub(crate) struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) wq: Mat,
    pub(crate) wk: Mat,
    pub(crate) wv: Mat,
    pub(crate) bq: Option<Vec<f32>>,
    pub(crate) bk: Option<Vec<f32>>,
    pub(crate) bv: Option<Vec<f32>>,
    pub(crate) wo: Mat,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) gate: Mat,
    pub(crate) up: Mat,
    pub(crate) down: Mat,
}

impl Layer {
    /// The layer's weight matrices (every product of a decode step).
    fn mats(&self) -> [&Mat; 7] {
        [
            &self.wq, &self.wk, &self.wv, &self.wo, &self.gate, &self.up, &self.down,
        ]
    }

    /// [`Layer::mats`], to change.
    fn mats_mut(&mut self) -> [&mut Mat; 7] {
        [
            &mut self.wq,
            &mut self.wk,
            &mut self.wv,
            &mut self.wo,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }
}

/// A loaded model: metadata, tokenizer and weights (mapped, not copied).
#[derive(Debug)]
pub struct Model {
    stores: Vec<Store>,
    /// Hyper-parameters.
    pub cfg: Config,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    embd: Mat,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    output: Mat,
    inv_freq: Vec<f64>,
    rope: RopeStyle,
    /// In decode passes (≤ 2 rows), quantize activations to 8 bits for
    /// 4/8-bit weights and multiply in integers, as llama.cpp does (faster,
    /// noisier: logits move by up to ~0.5 on SmolLM2). Off by default:
    /// products are exact f32 on the dequantized blocks.
    pub int8_activations: bool,
    /// With `int8_activations`, quantize prompt rows too: llama.cpp's
    /// arithmetic in every product (slower prefill; with an f16 KV cache the
    /// first positions' logits are bit-identical to llama.cpp's).
    pub int8_prompt: bool,
    /// How [`super::runtime::Runtime`] stores the KV cache (f32 by
    /// default; f16 halves its memory and the bytes attention reads).
    pub kv_precision: super::kv::KvPrecision,
}

/// Most pool threads a runtime runs.
pub const MAX_THREADS: usize = 64;

/// Positions per KV-cache block: the block size [`Model::scratch`] sizes
/// the attention scratch for, and the one [`KvCache::for_model`] makes.
pub const KV_BLOCK_TOKENS: usize = 16;

/// Most sequences one pass may serve.
pub const MAX_SEQS: usize = 256;

/// Which logits a pass produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// One row per sequence: after its last token in the batch.
    LastPerSeq,
    /// One row per batch row (teacher forcing, speculative verification).
    All,
}

/// Activation buffers for up to `max_rows` rows, allocated once.
#[derive(Debug)]
pub struct Scratch {
    max_rows: usize,
    x: Vec<f32>,
    xb: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    scores: Vec<f32>,
    last: Vec<f32>,
    logit_rows: Vec<usize>,
    /// cos/sin of every RoPE frequency for each row's position.
    rope: Vec<f32>,
    /// Per-thread dequantized weight rows of the multi-row products.
    wbuf: Vec<f32>,
    /// Activations quantized for integer products.
    xq: quant::Q8Act,
    /// Per-sequence row counts, first positions, running positions.
    counts: Vec<usize>,
    first: Vec<usize>,
    pos: Vec<usize>,
    /// Logits of the last pass: `rows × vocab`, in the order of
    /// [`Scratch::logit_rows`] (batch row indices).
    pub logits: Vec<f32>,
}

impl Scratch {
    /// Logits of output `i` of the last pass.
    pub fn logits_row(&self, i: usize, vocab: usize) -> &[f32] {
        &self.logits[i * vocab..(i + 1) * vocab]
    }

    /// Batch rows the last pass produced logits for.
    pub fn logit_rows(&self) -> &[usize] {
        &self.logit_rows
    }

    /// Most rows one pass takes.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }
}

fn f32_vec(g: &Gguf, t: &TensorInfo) -> Vec<f32> {
    let mut v = vec![0.0; t.numel() as usize];
    quant::dequantize(t.ty, g.data(t), &mut v);
    v
}

impl Model {
    /// Loads a GGUF model file, or a Hugging Face checkpoint directory.
    pub fn load(path: &Path) -> Result<Model, LlmError> {
        if path.is_dir() {
            return Model::from_hf_dir(path);
        }
        let gguf = Gguf::open(path)?;
        Model::from_gguf(gguf)
    }

    /// Builds the model from a parsed file.
    pub fn from_gguf(gguf: Gguf) -> Result<Model, LlmError> {
        let arch = gguf.get_str("general.architecture")?.to_string();
        if !matches!(arch.as_str(), "llama" | "qwen2" | "mistral") {
            return Err(LlmError::Model(format!(
                "architecture '{arch}' is not supported (llama, qwen2, mistral are)"
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let u = |k: &str| -> Result<usize, LlmError> {
            let v = gguf.get_u64(&key(k))?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0 && v < (1 << 24))
                .ok_or_else(|| LlmError::Model(format!("{} = {v} is out of range", key(k))))
        };
        let n_layers = u("block_count")?;
        let dim = u("embedding_length")?;
        let ffn = u("feed_forward_length")?;
        let n_heads = u("attention.head_count")?;
        let n_kv_heads = match gguf.get(&key("attention.head_count_kv")) {
            Some(_) => u("attention.head_count_kv")?,
            None => n_heads,
        };
        if dim % n_heads != 0 || n_heads % n_kv_heads != 0 {
            return Err(LlmError::Model(format!(
                "{dim} wide with {n_heads} heads and {n_kv_heads} KV heads does not divide"
            )));
        }
        let head_dim = dim / n_heads;
        let rope_dim = gguf
            .get(&key("rope.dimension_count"))
            .and_then(Value::as_u64)
            .map_or(head_dim, |v| v as usize);
        if rope_dim > head_dim || !rope_dim.is_multiple_of(2) {
            return Err(LlmError::Model(format!(
                "rope dimension {rope_dim} does not fit head {head_dim}"
            )));
        }
        let rope_base = gguf
            .get(&key("rope.freq_base"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let rope_scale = match gguf.get(&key("rope.scaling.type")).and_then(Value::as_str) {
            Some("linear") => gguf
                .get(&key("rope.scaling.factor"))
                .and_then(Value::as_f64)
                .unwrap_or(1.0),
            Some("none") | None => 1.0,
            Some(other) => {
                return Err(LlmError::Model(format!(
                    "rope scaling '{other}' is not supported (linear is)"
                )))
            }
        };
        let eps = gguf
            .get(&key("attention.layer_norm_rms_epsilon"))
            .and_then(Value::as_f64)
            .unwrap_or(1e-5) as f32;
        let context = u("context_length")?;
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        let vocab = tokenizer.vocab_size();
        let tensor = |name: &str| {
            gguf.tensor(name)
                .cloned()
                .ok_or_else(|| LlmError::Model(format!("tensor '{name}' missing")))
        };
        let mat = |name: &str, rows: usize, cols: usize| -> Result<Mat, LlmError> {
            let t = tensor(name)?;
            if t.dims != [cols as u64, rows as u64] {
                return Err(LlmError::Model(format!(
                    "tensor '{name}' is {:?}, expected [{cols}, {rows}]",
                    t.dims
                )));
            }
            Ok(Mat {
                ty: t.ty,
                src: 0,
                offset: t.offset,
                bytes: t.bytes,
                rows,
                cols,
                packed: None,
            })
        };
        let vec_of = |name: &str, n: usize| -> Result<Vec<f32>, LlmError> {
            let t = tensor(name)?;
            if t.numel() != n as u64 {
                return Err(LlmError::Model(format!(
                    "tensor '{name}' has {} values, expected {n}",
                    t.numel()
                )));
            }
            Ok(f32_vec(&gguf, &t))
        };
        let opt_vec = |name: &str, n: usize| -> Result<Option<Vec<f32>>, LlmError> {
            match gguf.tensor(name) {
                Some(_) => vec_of(name, n).map(Some),
                None => Ok(None),
            }
        };
        let kv_dim = n_kv_heads * head_dim;
        let mut layers = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let p = |s: &str| format!("blk.{l}.{s}");
            layers.push(Layer {
                attn_norm: vec_of(&p("attn_norm.weight"), dim)?,
                wq: mat(&p("attn_q.weight"), dim, dim)?,
                wk: mat(&p("attn_k.weight"), kv_dim, dim)?,
                wv: mat(&p("attn_v.weight"), kv_dim, dim)?,
                bq: opt_vec(&p("attn_q.bias"), dim)?,
                bk: opt_vec(&p("attn_k.bias"), kv_dim)?,
                bv: opt_vec(&p("attn_v.bias"), kv_dim)?,
                wo: mat(&p("attn_output.weight"), dim, dim)?,
                ffn_norm: vec_of(&p("ffn_norm.weight"), dim)?,
                gate: mat(&p("ffn_gate.weight"), ffn, dim)?,
                up: mat(&p("ffn_up.weight"), ffn, dim)?,
                down: mat(&p("ffn_down.weight"), dim, ffn)?,
            });
        }
        let embd = mat("token_embd.weight", vocab, dim)?;
        let output = match gguf.tensor("output.weight") {
            Some(_) => mat("output.weight", vocab, dim)?,
            None => embd.clone(),
        };
        let out_norm = vec_of("output_norm.weight", dim)?;
        // llama.cpp rotates Qwen2 by halves, Llama/Mistral by pairs.
        let rope = if arch == "qwen2" {
            RopeStyle::Neox
        } else {
            RopeStyle::Norm
        };
        let cfg = Config {
            arch,
            n_layers,
            dim,
            ffn,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dim,
            rope_base,
            rope_scale,
            eps,
            context,
            vocab,
        };
        Ok(Model::assemble(
            vec![Store::Gguf(gguf)],
            cfg,
            tokenizer,
            embd,
            layers,
            out_norm,
            output,
            rope,
        ))
    }

    /// Puts a model together from its parts (both loaders end here).
    pub(crate) fn assemble(
        stores: Vec<Store>,
        cfg: Config,
        tokenizer: Tokenizer,
        embd: Mat,
        layers: Vec<Layer>,
        out_norm: Vec<f32>,
        output: Mat,
        rope: RopeStyle,
    ) -> Model {
        let inv_freq = (0..cfg.rope_dim / 2)
            .map(|i| cfg.rope_base.powf(-2.0 * i as f64 / cfg.rope_dim as f64) / cfg.rope_scale)
            .collect();
        Model {
            stores,
            cfg,
            tokenizer,
            embd,
            layers,
            out_norm,
            output,
            inv_freq,
            rope,
            int8_activations: false,
            int8_prompt: false,
            kv_precision: super::kv::KvPrecision::F32,
        }
    }

    fn data(&self, m: &Mat) -> &[u8] {
        m.data(&self.stores)
    }

    /// Every matrix a decode step multiplies by: the layers' and the
    /// output projection.
    fn product_mats(&self) -> impl Iterator<Item = &Mat> {
        self.layers
            .iter()
            .flat_map(Layer::mats)
            .chain(std::iter::once(&self.output))
    }

    /// Turns 8-bit activations on or off (see [`Model::int8_activations`]).
    /// Turning them on also makes the row-interleaved copies of the Q4_1 /
    /// Q8_0 matrices that the x86 products read ([`quant::Packed`]: the
    /// same bytes reordered, about the size of those weights again, made
    /// once here and never on the inference path).
    pub fn set_int8_activations(&mut self, on: bool) {
        self.int8_activations = on;
        let stores = &self.stores;
        let mut mats: Vec<&mut Mat> = self
            .layers
            .iter_mut()
            .flat_map(Layer::mats_mut)
            .chain(std::iter::once(&mut self.output))
            .collect();
        if !on {
            // Nothing reads the copies now: give the memory back.
            for m in mats {
                m.packed = None;
            }
            return;
        }
        mats.retain(|m| m.packed.is_none());
        let sources: Vec<quant::PackSource<'_>> = mats
            .iter()
            .map(|m| (m.ty, m.data(stores), m.rows, m.cols))
            .collect();
        for (m, p) in mats.iter_mut().zip(quant::Packed::pack_all(&sources)) {
            m.packed = p;
        }
    }

    /// Bytes held by the row-interleaved weight copies.
    pub fn packed_bytes(&self) -> usize {
        self.product_mats()
            .map(|m| m.packed.as_ref().map_or(0, |p| p.bytes()))
            .sum()
    }

    /// How RoPE pairs dimensions in this model.
    pub fn rope_style(&self) -> RopeStyle {
        self.rope
    }

    /// Bytes of weights one decode step reads (every matrix once, the
    /// embedding row aside): the memory-bandwidth bound's numerator.
    pub fn weight_bytes_per_token(&self) -> usize {
        self.product_mats().map(|m| m.bytes).sum()
    }

    /// Bytes of KV cache a decode step reads per cached position (every
    /// layer's K and V in [`Model::kv_precision`]): with
    /// [`Model::weight_bytes_per_token`], what one step touches.
    pub fn kv_bytes_per_position(&self) -> usize {
        self.cfg.n_layers * 2 * self.cfg.kv_dim() * self.kv_precision.bytes()
    }

    /// Buffers for passes of up to `max_rows` rows (`all_logits`: room for
    /// logits of every row).
    pub fn scratch(&self, max_rows: usize, all_logits: bool) -> Scratch {
        let c = &self.cfg;
        let r = max_rows.max(1);
        Scratch {
            max_rows: r,
            x: vec![0.0; r * c.dim],
            xb: vec![0.0; r * c.dim],
            q: vec![0.0; r * c.dim],
            k: vec![0.0; r * c.kv_dim()],
            v: vec![0.0; r * c.kv_dim()],
            att: vec![0.0; r * c.dim],
            o: vec![0.0; r * c.dim],
            g: vec![0.0; r * c.ffn],
            u: vec![0.0; r * c.ffn],
            scores: vec![0.0; attention::scratch_floats(c.heads(), KV_BLOCK_TOKENS, c.context)],
            last: vec![0.0; r * c.dim],
            logit_rows: Vec::with_capacity(r),
            xq: quant::Q8Act::with_capacity(r, c.dim.max(c.ffn)),
            rope: vec![0.0; r * c.rope_dim],
            wbuf: Vec::new(),
            counts: Vec::with_capacity(MAX_SEQS),
            first: Vec::with_capacity(MAX_SEQS),
            pos: Vec::with_capacity(MAX_SEQS),
            logits: vec![0.0; if all_logits { r } else { r.min(64) } * c.vocab],
        }
    }

    /// Whether a pass of `rows` rows multiplies with 8-bit activations.
    /// Integer products pay off for decode rows; prompts go through the
    /// exact row-reusing tile product, which is faster there (unless
    /// `int8_prompt` asks for llama.cpp's arithmetic everywhere).
    fn int8_rows(&self, rows: usize) -> bool {
        self.int8_activations && (rows <= 2 || self.int8_prompt)
    }

    /// `y = x · mᵀ` for `rows` rows of `x`. 4/8-bit weights multiply
    /// activations quantized to 8 bits (as llama.cpp does; `xq` holds that
    /// quantization), in integers.
    fn matmul(
        &self,
        m: &Mat,
        x: &[f32],
        rows: usize,
        y: &mut [f32],
        xq: &mut quant::Q8Act,
        wbuf: &mut Vec<f32>,
        pool: &ThreadPool,
    ) {
        let w = self.data(m);
        if self.int8_rows(rows) && quant::has_q8_product(m.ty) && m.cols.is_multiple_of(32) {
            xq.quantize(x, rows, m.cols);
            quant::matmul_q8_many(&mut [self.q8_product(m, y)], xq, pool);
        } else {
            let need = quant::matmul_scratch(pool, m.cols);
            if wbuf.len() < need {
                // Once per size, in the first (warm-up) pass.
                wbuf.resize(need, 0.0);
            }
            quant::matmul(m.ty, w, m.rows, m.cols, x, rows, y, wbuf, pool);
        }
    }

    /// `m` as an 8-bit-activation product into `y` (its packed copy where
    /// there is one).
    fn q8_product<'a>(&'a self, m: &'a Mat, y: &'a mut [f32]) -> quant::Q8Product<'a> {
        quant::Q8Product {
            ty: m.ty,
            w: self.data(m),
            packed: m.packed.as_ref(),
            rows: m.rows,
            y,
        }
    }

    /// `y_i = x · m_iᵀ` for matrices sharing the input `x` (Q, K, V; gate,
    /// up): one pool job over all their rows when they all take 8-bit
    /// activations, else one product after the other.
    #[allow(clippy::too_many_arguments)]
    fn matmul_shared<const N: usize>(
        &self,
        mats: [(&Mat, &mut [f32]); N],
        x: &[f32],
        rows: usize,
        xq: &mut quant::Q8Act,
        wbuf: &mut Vec<f32>,
        pool: &ThreadPool,
    ) {
        let cols = mats.first().map_or(0, |(m, _)| m.cols);
        let grouped = N <= quant::MAX_PRODUCTS
            && self.int8_rows(rows)
            && cols.is_multiple_of(32)
            && mats
                .iter()
                .all(|(m, _)| quant::has_q8_product(m.ty) && m.cols == cols);
        if grouped {
            xq.quantize(x, rows, cols);
            let mut products = mats.map(|(m, y)| self.q8_product(m, y));
            quant::matmul_q8_many(&mut products, xq, pool);
        } else {
            for (m, y) in mats {
                self.matmul(m, x, rows, y, xq, wbuf, pool);
            }
        }
    }

    fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let ss: f64 = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
        let scale = (1.0 / (ss + eps as f64).sqrt()) as f32;
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
            *o = v * scale * g;
        }
    }

    /// `table` = (cos, sin) of every frequency at `pos`.
    fn rope_table(&self, pos: usize, table: &mut [f32]) {
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let (s, c) = (pos as f64 * f).sin_cos();
            table[2 * i] = c as f32;
            table[2 * i + 1] = s as f32;
        }
    }

    fn rope(&self, v: &mut [f32], heads: usize, table: &[f32]) {
        let hd = self.cfg.head_dim;
        let half = self.cfg.rope_dim / 2;
        for h in 0..heads {
            let head = &mut v[h * hd..(h + 1) * hd];
            for i in 0..half {
                let (c, s) = (table[2 * i], table[2 * i + 1]);
                let (ia, ib) = match self.rope {
                    RopeStyle::Norm => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + half),
                };
                let (a, b) = (head[ia], head[ib]);
                head[ia] = a * c - b * s;
                head[ib] = a * s + b * c;
            }
        }
    }

    /// One forward pass over `batch` rows: `(sequence index into seqs,
    /// token)`. Rows of one sequence must be in position order; each
    /// sequence's new tokens go after what it already holds. Afterwards
    /// the sequences hold the new positions, and `scratch.logits` the
    /// requested logits (row order of `scratch.logit_rows()`).
    pub fn forward<S: SeqSet + ?Sized>(
        &self,
        kv: &mut KvCache,
        seqs: &mut S,
        batch: &[(usize, u32)],
        logits: Logits,
        scratch: &mut Scratch,
        pool: &ThreadPool,
    ) -> Result<(), LlmError> {
        let c = &self.cfg;
        let n = batch.len();
        if n == 0 {
            return Ok(());
        }
        if n > scratch.max_rows {
            return Err(LlmError::Request(format!(
                "{n} rows exceed the pass limit of {}",
                scratch.max_rows
            )));
        }
        // Positions, context and KV room for every sequence first: a
        // failure leaves everything untouched.
        if seqs.count() > MAX_SEQS {
            return Err(LlmError::Request(format!(
                "{} sequences exceed the batch limit of {MAX_SEQS}",
                seqs.count()
            )));
        }
        scratch.counts.clear();
        scratch.counts.resize(seqs.count(), 0);
        for &(s, tok) in batch {
            if s >= seqs.count() {
                return Err(LlmError::Request(format!(
                    "row names sequence {s}, there are {}",
                    seqs.count()
                )));
            }
            if tok as usize >= c.vocab {
                return Err(LlmError::Request(format!(
                    "token {tok} is outside the vocabulary ({})",
                    c.vocab
                )));
            }
            scratch.counts[s] += 1;
        }
        let mut blocks_needed = 0;
        for (s, &cnt) in scratch.counts.iter().enumerate() {
            let total = seqs.seq(s).len() + cnt;
            if total > c.context {
                return Err(LlmError::ContextFull {
                    tokens: total,
                    context: c.context,
                });
            }
            blocks_needed += total
                .div_ceil(kv.block_tokens())
                .saturating_sub(seqs.seq(s).blocks());
        }
        if blocks_needed > kv.free_blocks() {
            return Err(LlmError::KvFull {
                need: blocks_needed,
                free: kv.free_blocks(),
                block_tokens: kv.block_tokens(),
                budget_bytes: kv.capacity_blocks() * kv.block_bytes(),
            });
        }
        for (s, &cnt) in scratch.counts.iter().enumerate() {
            kv.reserve(seqs.seq_mut(s), cnt)?;
        }
        let (dim, kvd, hd, ffn) = (c.dim, c.kv_dim(), c.head_dim, c.ffn);
        let scale = 1.0 / (hd as f32).sqrt();
        scratch.first.clear();
        scratch
            .first
            .extend((0..seqs.count()).map(|i| seqs.seq(i).len()));
        // RoPE angles once per row, shared by every layer and head.
        let rd = c.rope_dim;
        scratch.pos.clear();
        scratch.pos.extend_from_slice(&scratch.first);
        for (r, &(s, _)) in batch.iter().enumerate() {
            let pos = scratch.pos[s];
            scratch.pos[s] += 1;
            self.rope_table(pos, &mut scratch.rope[r * rd..(r + 1) * rd]);
        }
        let er = self.embd.ty.row_bytes(dim);
        let edata = self.data(&self.embd);
        for (r, &(_, tok)) in batch.iter().enumerate() {
            let t = tok as usize;
            quant::dequantize(
                self.embd.ty,
                &edata[t * er..(t + 1) * er],
                &mut scratch.x[r * dim..(r + 1) * dim],
            );
        }
        for (l, layer) in self.layers.iter().enumerate() {
            for r in 0..n {
                Self::rmsnorm(
                    &scratch.x[r * dim..(r + 1) * dim],
                    &layer.attn_norm,
                    c.eps,
                    &mut scratch.xb[r * dim..(r + 1) * dim],
                );
            }
            self.matmul_shared(
                [
                    (&layer.wq, &mut scratch.q[..]),
                    (&layer.wk, &mut scratch.k[..]),
                    (&layer.wv, &mut scratch.v[..]),
                ],
                &scratch.xb,
                n,
                &mut scratch.xq,
                &mut scratch.wbuf,
                pool,
            );
            for (buf, bias, w) in [
                (&mut scratch.q, &layer.bq, dim),
                (&mut scratch.k, &layer.bk, kvd),
                (&mut scratch.v, &layer.bv, kvd),
            ] {
                if let Some(b) = bias {
                    for row in buf[..n * w].chunks_exact_mut(w) {
                        for (x, bb) in row.iter_mut().zip(b) {
                            *x += bb;
                        }
                    }
                }
            }
            // RoPE and K/V into the cache.
            scratch.pos.clear();
            scratch.pos.extend_from_slice(&scratch.first);
            for (r, &(s, _)) in batch.iter().enumerate() {
                let pos = scratch.pos[s];
                scratch.pos[s] += 1;
                let table = &scratch.rope[r * rd..(r + 1) * rd];
                self.rope(&mut scratch.q[r * dim..(r + 1) * dim], c.n_heads, table);
                self.rope(&mut scratch.k[r * kvd..(r + 1) * kvd], c.n_kv_heads, table);
                kv.write(
                    seqs.seq(s),
                    l,
                    pos,
                    &scratch.k[r * kvd..(r + 1) * kvd],
                    &scratch.v[r * kvd..(r + 1) * kvd],
                );
            }
            // Attention, causal per sequence.
            scratch.pos.clear();
            scratch.pos.extend_from_slice(&scratch.first);
            for (r, &(s, _)) in batch.iter().enumerate() {
                let pos = scratch.pos[s];
                scratch.pos[s] += 1;
                let seq = seqs.seq(s);
                attention::attend(
                    pool,
                    &kv.paged(seq, l),
                    &scratch.q[r * dim..(r + 1) * dim],
                    pos + 1,
                    c.heads(),
                    scale,
                    &mut scratch.att[r * dim..(r + 1) * dim],
                    &mut scratch.scores,
                );
            }
            self.matmul(
                &layer.wo,
                &scratch.att,
                n,
                &mut scratch.o,
                &mut scratch.xq,
                &mut scratch.wbuf,
                pool,
            );
            for (x, o) in scratch.x[..n * dim].iter_mut().zip(&scratch.o) {
                *x += o;
            }
            for r in 0..n {
                Self::rmsnorm(
                    &scratch.x[r * dim..(r + 1) * dim],
                    &layer.ffn_norm,
                    c.eps,
                    &mut scratch.xb[r * dim..(r + 1) * dim],
                );
            }
            self.matmul_shared(
                [
                    (&layer.gate, &mut scratch.g[..]),
                    (&layer.up, &mut scratch.u[..]),
                ],
                &scratch.xb,
                n,
                &mut scratch.xq,
                &mut scratch.wbuf,
                pool,
            );
            for (g, u) in scratch.g[..n * ffn].iter_mut().zip(&scratch.u) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            self.matmul(
                &layer.down,
                &scratch.g,
                n,
                &mut scratch.o,
                &mut scratch.xq,
                &mut scratch.wbuf,
                pool,
            );
            for (x, o) in scratch.x[..n * dim].iter_mut().zip(&scratch.o) {
                *x += o;
            }
        }
        for (s, &cnt) in scratch.counts.iter().enumerate() {
            kv.advance(seqs.seq_mut(s), cnt);
        }
        // Which rows get logits.
        scratch.logit_rows.clear();
        match logits {
            Logits::All => scratch.logit_rows.extend(0..n),
            Logits::LastPerSeq => {
                for s in 0..seqs.count() {
                    if let Some(r) = batch.iter().rposition(|&(q, _)| q == s) {
                        scratch.logit_rows.push(r);
                    }
                }
            }
        }
        let m = scratch.logit_rows.len();
        if m * c.vocab > scratch.logits.len() {
            return Err(LlmError::Request(format!(
                "logits for {m} rows do not fit the scratch (made for {})",
                scratch.logits.len() / c.vocab
            )));
        }
        for (i, &r) in scratch.logit_rows.iter().enumerate() {
            Self::rmsnorm(
                &scratch.x[r * dim..(r + 1) * dim],
                &self.out_norm,
                c.eps,
                &mut scratch.last[i * dim..(i + 1) * dim],
            );
        }
        self.matmul(
            &self.output,
            &scratch.last,
            m,
            &mut scratch.logits,
            &mut scratch.xq,
            &mut scratch.wbuf,
            pool,
        );
        Ok(())
    }
}
