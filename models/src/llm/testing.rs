//! Small models built in code, for tests across crates (no model files).

use osprey_kernels::quant::{quantize, QuantType};

use super::gguf::{GgufWriter, Value};

/// Width of the tiny model.
pub const DIM: usize = 64;
/// MLP width.
pub const FFN: usize = 128;
/// Query heads.
pub const HEADS: u32 = 4;
/// KV heads.
pub const KV_HEADS: u32 = 2;
/// Layers.
pub const LAYERS: usize = 2;
/// Default context.
pub const CONTEXT: u32 = 96;

/// Deterministic values in ±scale.
pub fn rand(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// GPT-2's byte → character table.
pub fn byte_char(b: u32) -> char {
    let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    if printable {
        char::from_u32(b).unwrap()
    } else {
        let mut n = 0;
        for c in 0..b {
            let p = (33..=126).contains(&c) || (161..=172).contains(&c) || (174..=255).contains(&c);
            if !p {
                n += 1;
            }
        }
        char::from_u32(256 + n).unwrap()
    }
}

/// A tiny Llama GGUF (2 layers, 64 wide, byte-level vocabulary of 256 +
/// `<|im_start|>`, `<|im_end|>`; random Q4_1 / Q4_0 / Q8_0 / F32 weights)
/// with the given context length.
pub fn tiny_gguf(context: u32) -> Vec<u8> {
    let mut tokens: Vec<Value> = (0..256)
        .map(|b| Value::String(byte_char(b).to_string()))
        .collect();
    tokens.push(Value::String("<|im_start|>".into()));
    tokens.push(Value::String("<|im_end|>".into()));
    let vocab = tokens.len();
    let mut types = vec![Value::I32(1); 256];
    types.extend([Value::I32(3), Value::I32(3)]);
    let mut w = GgufWriter::default();
    w.kv("general.architecture", &Value::String("llama".into()))
        .kv("llama.block_count", &Value::U32(LAYERS as u32))
        .kv("llama.context_length", &Value::U32(context))
        .kv("llama.embedding_length", &Value::U32(DIM as u32))
        .kv("llama.feed_forward_length", &Value::U32(FFN as u32))
        .kv("llama.attention.head_count", &Value::U32(HEADS))
        .kv("llama.attention.head_count_kv", &Value::U32(KV_HEADS))
        .kv("llama.rope.freq_base", &Value::F32(10000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", &Value::F32(1e-5))
        .kv("tokenizer.ggml.model", &Value::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", &Value::String("smollm".into()))
        .kv("tokenizer.ggml.tokens", &Value::Array(tokens))
        .kv("tokenizer.ggml.token_type", &Value::Array(types))
        .kv("tokenizer.ggml.merges", &Value::Array(vec![]))
        .kv("tokenizer.ggml.eos_token_id", &Value::U32(257));
    let kvd = DIM / HEADS as usize * KV_HEADS as usize;
    let mat =
        |w: &mut GgufWriter, name: &str, rows: usize, cols: usize, ty: QuantType, seed: u64| {
            let q = quantize(ty, &rand(rows * cols, seed, 0.3)).unwrap();
            w.tensor(name, &[cols as u64, rows as u64], ty, &q);
        };
    let ones = |n: usize| quantize(QuantType::F32, &vec![1.0; n]).unwrap();
    mat(&mut w, "token_embd.weight", vocab, DIM, QuantType::Q8_0, 1);
    w.tensor(
        "output_norm.weight",
        &[DIM as u64],
        QuantType::F32,
        &ones(DIM),
    );
    for l in 0..LAYERS {
        let s = 100 * (l as u64 + 1);
        let p = |n: &str| format!("blk.{l}.{n}");
        w.tensor(
            &p("attn_norm.weight"),
            &[DIM as u64],
            QuantType::F32,
            &ones(DIM),
        );
        w.tensor(
            &p("ffn_norm.weight"),
            &[DIM as u64],
            QuantType::F32,
            &ones(DIM),
        );
        mat(
            &mut w,
            &p("attn_q.weight"),
            DIM,
            DIM,
            QuantType::Q4_1,
            s + 1,
        );
        mat(
            &mut w,
            &p("attn_k.weight"),
            kvd,
            DIM,
            QuantType::Q4_1,
            s + 2,
        );
        mat(
            &mut w,
            &p("attn_v.weight"),
            kvd,
            DIM,
            QuantType::Q4_0,
            s + 3,
        );
        mat(
            &mut w,
            &p("attn_output.weight"),
            DIM,
            DIM,
            QuantType::Q8_0,
            s + 4,
        );
        mat(
            &mut w,
            &p("ffn_gate.weight"),
            FFN,
            DIM,
            QuantType::Q4_1,
            s + 5,
        );
        mat(&mut w, &p("ffn_up.weight"), FFN, DIM, QuantType::F32, s + 6);
        mat(
            &mut w,
            &p("ffn_down.weight"),
            DIM,
            FFN,
            QuantType::Q4_1,
            s + 7,
        );
    }
    w.finish()
}

/// Writes a Hugging Face checkpoint directory equivalent to
/// [`tiny_gguf`]: every weight dequantized to F32 under its HF name, Q and K
/// rows un-permuted (GGUF's Llama conversion interleaves them for
/// adjacent-pair RoPE; HF checkpoints rotate halves), `config.json` and
/// `tokenizer.json`. The same model, so the same logits.
pub fn write_tiny_hf_dir(dir: &std::path::Path, context: u32) -> Result<(), super::LlmError> {
    use super::gguf::Gguf;
    use super::tokenizer::Tokenizer;
    use std::collections::HashMap;
    let io = |e: std::io::Error| super::LlmError::Io {
        path: dir.display().to_string(),
        error: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let g = Gguf::from_bytes(tiny_gguf(context))?;
    let hd = DIM / HEADS as usize;
    let f32s = |name: &str| -> Vec<f32> {
        let t = g.tensor(name).expect("tiny tensor");
        let mut v = vec![0.0; t.numel() as usize];
        osprey_kernels::quant::dequantize(t.ty, g.data(t), &mut v);
        v
    };
    // GGUF row h·hd + 2i + j came from HF row h·hd + j·hd/2 + i.
    let unpermute = |w: Vec<f32>, heads: usize| -> Vec<f32> {
        let mut out = vec![0.0; w.len()];
        for h in 0..heads {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    let src = (h * hd + 2 * i + j) * DIM;
                    let dst = (h * hd + j * hd / 2 + i) * DIM;
                    out[dst..dst + DIM].copy_from_slice(&w[src..src + DIM]);
                }
            }
        }
        out
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let vocab = 258;
    tensors.push((
        "model.embed_tokens.weight".into(),
        vec![vocab, DIM],
        f32s("token_embd.weight"),
    ));
    tensors.push((
        "model.norm.weight".into(),
        vec![DIM],
        f32s("output_norm.weight"),
    ));
    let kvd = hd * KV_HEADS as usize;
    for l in 0..LAYERS {
        let gname = |n: &str| format!("blk.{l}.{n}");
        let hname = |n: &str| format!("model.layers.{l}.{n}");
        tensors.push((
            hname("input_layernorm.weight"),
            vec![DIM],
            f32s(&gname("attn_norm.weight")),
        ));
        tensors.push((
            hname("post_attention_layernorm.weight"),
            vec![DIM],
            f32s(&gname("ffn_norm.weight")),
        ));
        tensors.push((
            hname("self_attn.q_proj.weight"),
            vec![DIM, DIM],
            unpermute(f32s(&gname("attn_q.weight")), HEADS as usize),
        ));
        tensors.push((
            hname("self_attn.k_proj.weight"),
            vec![kvd, DIM],
            unpermute(f32s(&gname("attn_k.weight")), KV_HEADS as usize),
        ));
        tensors.push((
            hname("self_attn.v_proj.weight"),
            vec![kvd, DIM],
            f32s(&gname("attn_v.weight")),
        ));
        tensors.push((
            hname("self_attn.o_proj.weight"),
            vec![DIM, DIM],
            f32s(&gname("attn_output.weight")),
        ));
        tensors.push((
            hname("mlp.gate_proj.weight"),
            vec![FFN, DIM],
            f32s(&gname("ffn_gate.weight")),
        ));
        tensors.push((
            hname("mlp.up_proj.weight"),
            vec![FFN, DIM],
            f32s(&gname("ffn_up.weight")),
        ));
        tensors.push((
            hname("mlp.down_proj.weight"),
            vec![DIM, FFN],
            f32s(&gname("ffn_down.weight")),
        ));
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::tensor::Dtype::F32, s.clone(), b)
                    .expect("view"),
            )
        })
        .collect();
    let data = safetensors::tensor::serialize(views, &None::<HashMap<String, String>>)
        .map_err(|e| super::LlmError::Model(e.to_string()))?;
    std::fs::write(dir.join("model.safetensors"), data).map_err(io)?;
    let config = format!(
        r#"{{"model_type": "llama", "hidden_size": {DIM}, "intermediate_size": {FFN}, "num_attention_heads": {HEADS}, "num_key_value_heads": {KV_HEADS}, "num_hidden_layers": {LAYERS}, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": {context}, "tie_word_embeddings": true, "eos_token_id": 257}}"#
    );
    std::fs::write(dir.join("config.json"), config).map_err(io)?;
    let tk = Tokenizer::from_gguf(&g)?;
    std::fs::write(dir.join("tokenizer.json"), tk.to_hf_json()?).map_err(io)?;
    Ok(())
}
