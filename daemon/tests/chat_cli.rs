//! `osprey chat` and `osprey tokenize` end to end: the JSON contract,
//! speculative decoding giving the same tokens, and one clear error line
//! on bad input. Most tests use a tiny model built in code; the ones that
//! compare with llama.cpp need the fetched SmolLM2 and ../shared and skip
//! visibly without them.

use std::path::PathBuf;
use std::process::{Command, Output};

use osprey_models::llm::testing::tiny_gguf;

/// Context of the tiny model: room for the chat template's system prompt.
const CONTEXT: u32 = 512;
use serde_json::Value;

fn osprey() -> Command {
    Command::new(env!("CARGO_BIN_EXE_osprey"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("osprey-chat-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn tiny() -> PathBuf {
    let p = tmp("tiny.gguf");
    if !p.exists() {
        std::fs::write(&p, tiny_gguf(CONTEXT)).unwrap();
    }
    p
}

fn run(args: &[&str]) -> Output {
    osprey().args(args).output().expect("osprey runs")
}

fn json_of(out: &Output) -> Value {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failed: {err}");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn one_line_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        err.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "{err}"
    );
    assert!(err.contains(needle), "expected '{needle}' in {err}");
}

#[test]
fn chat_json_contract_and_speculative_equivalence() {
    let m = tiny();
    let m = m.to_str().unwrap();
    let base = [
        "chat",
        "--model",
        m,
        "--raw",
        "--prompt",
        "abcabcabcabc",
        "--max-tokens",
        "20",
        "--ignore-eos",
        "--json",
        "--threads",
        "1",
    ];
    let v = json_of(&run(&base));
    for k in [
        "text",
        "tokens",
        "prompt_tokens",
        "generated_tokens",
        "ttft_ms",
        "prefill_tok_s",
        "decode_tok_s",
    ] {
        assert!(!v[k].is_null(), "missing {k}: {v}");
    }
    assert_eq!(v["generated_tokens"], 20);
    assert_eq!(v["tokens"].as_array().unwrap().len(), 20);
    assert_eq!(v["prompt_tokens"], 12);
    let mut spec = base.to_vec();
    spec.push("--speculative");
    let s = json_of(&run(&spec));
    assert_eq!(
        s["tokens"], v["tokens"],
        "speculative greedy must not change the output"
    );
    assert!(s["drafted_tokens"].as_u64().unwrap() >= s["accepted_tokens"].as_u64().unwrap());
    // Seeded sampling is reproducible.
    let mut sampled = base.to_vec();
    sampled.extend(["--temperature", "0.8", "--seed", "7"]);
    assert_eq!(
        json_of(&run(&sampled))["tokens"],
        json_of(&run(&sampled))["tokens"]
    );
    // The chat template path and tokenize.
    let out = run(&[
        "chat",
        "--model",
        m,
        "--prompt",
        "hi",
        "--max-tokens",
        "3",
        "--threads",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids = json_of(&run(&["tokenize", "--model", m, "<|im_start|>ab"]));
    assert_eq!(ids, serde_json::json!([256, 97, 98]));
}

#[test]
fn bad_models_and_requests_fail_with_one_line() {
    let m = tiny();
    let bytes = std::fs::read(&m).unwrap();
    let cut = tmp("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let text = tmp("notes.gguf");
    std::fs::write(&text, "not a model").unwrap();
    let m = m.to_str().unwrap();
    one_line_error(
        &run(&["chat", "--model", cut.to_str().unwrap(), "--prompt", "x"]),
        "past the end",
    );
    one_line_error(
        &run(&["chat", "--model", text.to_str().unwrap(), "--prompt", "x"]),
        "not a GGUF",
    );
    one_line_error(
        &run(&["chat", "--model", "/nonexistent.gguf", "--prompt", "x"]),
        "No such file",
    );
    one_line_error(
        &run(&["chat", "--model", m, "--prompt", "x", "--temperature=-1"]),
        "temperature",
    );
    one_line_error(
        &run(&[
            "chat",
            "--model",
            m,
            "--prompt",
            "x",
            "--speculative",
            "--temperature",
            "0.5",
        ]),
        "--speculative",
    );
    one_line_error(
        &run(&["chat", "--model", m, "--prompt", "x", "--top-p", "0"]),
        "top-p",
    );
    one_line_error(
        &run(&["chat", "--model", m, "--prompt", "x", "--max-tokens", "0"]),
        "--max-tokens",
    );
    let long = "a".repeat(CONTEXT as usize + 10);
    one_line_error(
        &run(&["chat", "--model", m, "--raw", "--prompt", &long]),
        "context window",
    );
    one_line_error(
        &run(&["chat", "--model", m, "--prompt", "x", "--kv-mib", "0"]),
        "KV budget",
    );
}

fn smollm() -> Option<(PathBuf, Value)> {
    let model = std::env::var_os("OSPREY_LLM_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/osprey/llm/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    let reference = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/reference/llm/smollm2_llamacpp_reference.json");
    if !model.is_file() || !reference.is_file() {
        eprintln!("SKIPPED: SmolLM2 or ../shared missing (scripts/fetch-llm.sh)");
        return None;
    }
    Some((
        model,
        serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap(),
    ))
}

#[test]
fn smollm2_tokenize_and_a_greedy_completion_match_llama_cpp() {
    let Some((model, r)) = smollm() else { return };
    let m = model.to_str().unwrap();
    for case in r["tokenize"].as_array().unwrap() {
        let got = json_of(&run(&[
            "tokenize",
            "--model",
            m,
            case["text"].as_str().unwrap(),
        ]));
        assert_eq!(got, case["ids"]);
    }
    // "1, 2, 3, 4, 5," is identical to llama.cpp for all 48 tokens.
    let case = r["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["prompt"] == "1, 2, 3, 4, 5,")
        .unwrap();
    let v = json_of(&run(&[
        "chat",
        "--model",
        m,
        "--raw",
        "--prompt",
        "1, 2, 3, 4, 5,",
        "--max-tokens",
        "48",
        "--json",
        "--speculative",
    ]));
    assert_eq!(v["tokens"], case["generated_ids"]);
    assert_eq!(v["text"], case["generated_text"]);
}

#[test]
fn a_hugging_face_directory_chats_like_its_gguf() {
    let dir = tmp("tiny-hf");
    osprey_models::llm::testing::write_tiny_hf_dir(&dir, CONTEXT).unwrap();
    let gguf = tiny();
    let args = |m: &str| {
        vec![
            "chat".to_string(),
            "--model".into(),
            m.to_string(),
            "--raw".into(),
            "--prompt".into(),
            "wheel encoder".into(),
            "--max-tokens".into(),
            "12".into(),
            "--ignore-eos".into(),
            "--json".into(),
        ]
    };
    let a = json_of(
        &osprey()
            .args(args(gguf.to_str().unwrap()))
            .output()
            .unwrap(),
    );
    let b = json_of(&osprey().args(args(dir.to_str().unwrap())).output().unwrap());
    assert_eq!(a["tokens"], b["tokens"]);
}
