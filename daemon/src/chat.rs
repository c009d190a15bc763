//! `osprey chat` and `osprey tokenize`: the onboard assistant from the
//! command line.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Args;
use osprey_models::llm::model::Model;
use osprey_models::llm::runtime::{GenOptions, Runtime, StopReason};
use osprey_models::llm::sample::SamplingParams;
use osprey_models::llm::tokenizer::Tokenizer;
use serde_json::json;

use crate::cli::default_threads;

/// `osprey chat`.
#[derive(Args, Debug)]
pub struct ChatArgs {
    /// GGUF model file (e.g. from scripts/fetch-llm.sh), or a Hugging Face
    /// checkpoint directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long, value_name = "M.gguf|DIR")]
    pub model: PathBuf,
    /// Ask this and exit; without it, an interactive session that streams
    /// answers (Ctrl-D to leave).
    #[arg(long)]
    pub prompt: Option<String>,
    /// System prompt of the chat template.
    #[arg(long)]
    pub system: Option<String>,
    /// Feed the prompt as plain text to complete, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Most tokens to generate.
    #[arg(long = "max-tokens", default_value_t = 256)]
    pub max_tokens: usize,
    /// Always take the most likely token (the default unless --temperature
    /// is given).
    #[arg(long, conflicts_with = "temperature")]
    pub greedy: bool,
    /// Sampling temperature (> 0 samples; 0 is greedy).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Sample among the K most likely tokens (0 = all).
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: usize,
    /// Sample within the smallest set of tokens of this total probability.
    #[arg(long = "top-p", default_value_t = 0.95)]
    pub top_p: f32,
    /// Penalise tokens of the last 64 (1 = off).
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Random seed (same seed, same answer).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Stop when the answer contains this text (repeatable).
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Speculative decoding by prompt lookup (greedy only; same output,
    /// fewer passes when the answer repeats the context).
    #[arg(long)]
    pub speculative: bool,
    /// Keep generating past end-of-sequence up to --max-tokens (benchmarks).
    #[arg(long = "ignore-eos")]
    pub ignore_eos: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Multiply 4/8-bit weights with activations rounded to 8 bits, in
    /// integers, as llama.cpp does: faster decoding, logits within ~0.5 of
    /// the exact ones (the default computes exact f32 products).
    #[arg(long = "int8-activations")]
    pub int8_activations: bool,
    /// Store the KV cache in half precision: half the memory (twice the
    /// context in the same --kv-mib) and half the bytes attention reads per
    /// token; logits move slightly (llama.cpp's default cache type).
    #[arg(long = "kv-f16")]
    pub kv_f16: bool,
    /// KV cache budget in MiB (the paged pool is reserved at start-up).
    #[arg(long = "kv-mib", default_value_t = 256)]
    pub kv_mib: usize,
    /// Print one JSON object: {text, tokens, prompt_tokens,
    /// generated_tokens, ttft_ms, prefill_tok_s, decode_tok_s}.
    #[arg(long)]
    pub json: bool,
}

/// `osprey tokenize`.
#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// GGUF model file or Hugging Face checkpoint directory.
    #[arg(long, value_name = "M.gguf|DIR")]
    pub model: PathBuf,
    /// Text to tokenize (special tokens such as <|im_start|> count as one).
    pub text: String,
}

fn load(path: &std::path::Path) -> Result<Model> {
    Model::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `osprey tokenize`.
pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let m = load(&a.model)?;
    let ids = m.tokenizer.encode(&a.text, true)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

fn options(a: &ChatArgs) -> Result<GenOptions> {
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let temperature = if a.greedy {
        0.0
    } else {
        a.temperature.unwrap_or(0.0)
    };
    if a.speculative && temperature != 0.0 {
        bail!("--speculative needs greedy decoding (drop --temperature)");
    }
    let sampling = SamplingParams {
        temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repeat_penalty,
        repeat_last_n: 64,
        seed: a.seed,
    };
    sampling.validate()?;
    Ok(GenOptions {
        max_tokens: a.max_tokens,
        sampling,
        stop: a.stop.clone(),
        ignore_eos: a.ignore_eos,
        speculative: a.speculative,
    })
}

/// One answer: streams text to `out` as it comes (unless `quiet`).
fn answer(
    rt: &mut Runtime,
    prompt_ids: &[u32],
    opts: GenOptions,
    out: &mut dyn Write,
    quiet: bool,
) -> Result<(
    Vec<u32>,
    String,
    osprey_models::llm::runtime::GenStats,
    Option<StopReason>,
)> {
    let id = rt.add(prompt_ids, opts)?;
    if let Err(e) = rt.prefill(id) {
        let _ = rt.finish(id);
        return Err(e.into());
    }
    loop {
        if !quiet {
            let piece = rt.take_text(id)?;
            if !piece.is_empty() {
                out.write_all(piece.as_bytes())?;
                out.flush()?;
            }
        }
        if rt.done(id).is_some() {
            break;
        }
        rt.step()?;
    }
    let (tokens, text, stats, why) = rt.finish(id)?;
    Ok((tokens, text, stats, why))
}

/// `osprey chat`.
pub fn chat(a: ChatArgs) -> Result<()> {
    let opts = options(&a)?;
    let threads = match a.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => n,
        None => default_threads(),
    };
    let mut model = load(&a.model)?;
    model.set_int8_activations(a.int8_activations);
    if a.kv_f16 {
        model.kv_precision = osprey_models::llm::kv::KvPrecision::F16;
    }
    let model = Arc::new(model);
    let mut rt = Runtime::new(model.clone(), a.kv_mib << 20, threads, 64)
        .map_err(|e| anyhow::anyhow!("{e} (--kv-mib)"))?;
    let tk = &model.tokenizer;
    let build = |history: &str, user: &str| -> String {
        if a.raw {
            format!("{history}{user}")
        } else {
            format!("{history}{}", Tokenizer::chat_prompt(None, user))
        }
    };
    let system = if a.raw {
        String::new()
    } else {
        let sys = a.system.clone().unwrap_or_else(|| {
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face".into()
        });
        format!("<|im_start|>system\n{sys}<|im_end|>\n")
    };
    if let Some(p) = &a.prompt {
        let text = build(&system, p);
        let ids = tk.encode(&text, !a.raw)?;
        let mut stdout = std::io::stdout();
        let (tokens, text, stats, _) = answer(&mut rt, &ids, opts, &mut stdout, a.json)?;
        if a.json {
            let mut v = json!({
                "text": text,
                "tokens": tokens,
                "prompt_tokens": stats.prompt_tokens,
                "generated_tokens": stats.generated_tokens,
                "ttft_ms": stats.ttft_ms,
                "prefill_tok_s": stats.prefill_tok_s,
                "decode_tok_s": stats.decode_tok_s,
                "weight_bytes_per_token": model.weight_bytes_per_token(),
                "kv_bytes_per_position": model.kv_bytes_per_position(),
            });
            if a.speculative {
                v["drafted_tokens"] = json!(stats.drafted);
                v["accepted_tokens"] = json!(stats.accepted);
            }
            println!("{v}");
        } else {
            println!();
            eprintln!(
                "[{} prompt tokens, {} generated; first token {:.0} ms; prefill {:.1} tok/s; decode {:.1} tok/s{}]",
                stats.prompt_tokens,
                stats.generated_tokens,
                stats.ttft_ms,
                stats.prefill_tok_s,
                stats.decode_tok_s,
                if a.speculative {
                    format!("; {}/{} drafts accepted", stats.accepted, stats.drafted)
                } else {
                    String::new()
                }
            );
        }
        return Ok(());
    }
    // Interactive: the conversation so far is the prompt of each turn.
    eprintln!(
        "osprey chat — {} ({} layers). Ctrl-D to leave.",
        a.model.display(),
        model.cfg.n_layers
    );
    let mut history = system;
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            eprintln!();
            return Ok(());
        }
        let user = line.trim();
        if user.is_empty() {
            continue;
        }
        let text = build(&history, user);
        let ids = tk.encode(&text, !a.raw)?;
        match answer(&mut rt, &ids, opts.clone(), &mut stdout, false) {
            Ok((_, reply, _, _)) => {
                println!();
                history = if a.raw {
                    format!("{text}{reply}")
                } else {
                    format!("{text}{reply}<|im_end|>\n")
                };
            }
            Err(e) => eprintln!("error: {e:#}"),
        }
    }
}
