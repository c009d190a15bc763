//! Tokenizer from GGUF metadata: GPT-2 byte-level BPE (vocabulary and
//! merges from `tokenizer.ggml.*`) with the model's pre-tokenizer, built on
//! the `tokenizers` crate; special (control) tokens; the ChatML template;
//! and a streaming decoder that only ever emits whole UTF-8 characters.

use std::collections::HashMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use super::gguf::{Gguf, Value};
use super::LlmError;

/// GGUF token type of control (special) tokens.
const TOKEN_TYPE_CONTROL: i64 = 3;

/// A model's tokenizer.
pub struct Tokenizer {
    /// Splits special tokens out of the text first (`parse_special`).
    with_special: HfTokenizer,
    /// Treats every character as text.
    plain: HfTokenizer,
    /// Raw bytes of each token (byte-level decoded; specials as text).
    bytes: Vec<Vec<u8>>,
    special: Vec<bool>,
    /// Beginning-of-sequence token, if the model has one.
    pub bos: Option<u32>,
    /// End-of-sequence token.
    pub eos: Option<u32>,
    /// Whether the model wants BOS prepended.
    pub add_bos: bool,
    ids: HashMap<String, u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.bytes.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

/// GPT-2's byte ↔ printable-character table: byte `b` is shown as `CHARS[b]`.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('?')
        };
    }
    table
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer, LlmError> {
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(LlmError::Tokenizer(format!(
                "tokenizer model '{model}' is not supported (gpt2-style byte-level BPE is)"
            )));
        }
        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let tokens = g
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .ok_or_else(|| LlmError::Tokenizer("tokenizer.ggml.tokens missing".into()))?;
        let merges = g
            .get("tokenizer.ggml.merges")
            .and_then(Value::as_array)
            .ok_or_else(|| LlmError::Tokenizer("tokenizer.ggml.merges missing".into()))?;
        let types: Vec<i64> = g
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_i64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let mut vocab = HashMap::with_capacity(tokens.len());
        let mut strings = Vec::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            let s = t
                .as_str()
                .ok_or_else(|| LlmError::Tokenizer(format!("token {i} is not a string")))?;
            vocab.insert(s.to_string(), i as u32);
            strings.push(s.to_string());
        }
        let mut pairs = Vec::with_capacity(merges.len());
        for m in merges {
            let (a, b) = m
                .as_str()
                .and_then(|s| s.split_once(' '))
                .ok_or_else(|| LlmError::Tokenizer(format!("bad merge {m:?}")))?;
            pairs.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab
                    .into_iter()
                    .collect::<tokenizers::models::bpe::Vocab>(),
                pairs,
            )
            .build()
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
        let pre_tok: PreTokenizerWrapper = match pre {
            // SmolLM / StarCoder style: digits one by one, then GPT-2's regex.
            "smollm" | "starcoder" | "refact" => Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            "gpt-2" | "gpt2" | "default" => ByteLevel::new(false, true, true).into(),
            other => {
                return Err(LlmError::Tokenizer(format!(
                    "pre-tokenizer '{other}' is not supported (smollm, starcoder, gpt-2 are)"
                )))
            }
        };
        let mut plain = HfTokenizer::new(bpe);
        plain.with_pre_tokenizer(Some(pre_tok));
        plain.with_decoder(Some(ByteLevelDecoder::default()));
        let mut with_special = plain.clone();
        let special: Vec<bool> = (0..strings.len())
            .map(|i| types.get(i).copied() == Some(TOKEN_TYPE_CONTROL))
            .collect();
        let specials: Vec<AddedToken> = strings
            .iter()
            .zip(&special)
            .filter(|(_, s)| **s)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        with_special.add_special_tokens(&specials);
        let id = |k: &str| {
            g.get(k)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| (v as usize) < strings.len())
        };
        let (bos, eos) = (
            id("tokenizer.ggml.bos_token_id"),
            id("tokenizer.ggml.eos_token_id"),
        );
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Tokenizer::assemble(
            with_special,
            plain,
            strings,
            special,
            bos,
            eos,
            add_bos,
        ))
    }

    /// A byte-level BPE `tokenizer.json` (Hugging Face checkpoints); BOS and
    /// EOS ids come from the checkpoint's config.
    pub fn from_hf_json(
        path: &std::path::Path,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<Tokenizer, LlmError> {
        use tokenizers::DecoderWrapper;
        let with_special = HfTokenizer::from_file(path)
            .map_err(|e| LlmError::Tokenizer(format!("{}: {e}", path.display())))?;
        if !matches!(
            with_special.get_decoder(),
            Some(DecoderWrapper::ByteLevel(_))
        ) {
            return Err(LlmError::Tokenizer(format!(
                "{}: only byte-level BPE tokenizers (ByteLevel decoder) are supported",
                path.display()
            )));
        }
        let mut plain = with_special.clone();
        plain.set_encode_special_tokens(true);
        let vocab = with_special.get_vocab(true);
        let n = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
        if n > 1 << 22 {
            return Err(LlmError::Tokenizer(format!(
                "{}: vocabulary of {n} ids is absurd",
                path.display()
            )));
        }
        let mut strings = vec![String::new(); n];
        for (s, &i) in &vocab {
            strings[i as usize] = s.clone();
        }
        let mut special = vec![false; n];
        for (id, t) in with_special.get_added_tokens_decoder() {
            if let Some(flag) = special.get_mut(id as usize) {
                *flag = t.special;
            }
        }
        let valid = |v: Option<u32>| v.filter(|&v| (v as usize) < n);
        Ok(Tokenizer::assemble(
            with_special,
            plain,
            strings,
            special,
            valid(bos),
            valid(eos),
            false,
        ))
    }

    /// The tokenizer as `tokenizer.json` text (for checkpoints and tools).
    pub fn to_hf_json(&self) -> Result<String, LlmError> {
        self.with_special
            .to_string(false)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))
    }

    fn assemble(
        with_special: HfTokenizer,
        plain: HfTokenizer,
        strings: Vec<String>,
        special: Vec<bool>,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
    ) -> Tokenizer {
        let table = byte_chars();
        let mut inverse = HashMap::with_capacity(256);
        for (b, c) in table.iter().enumerate() {
            inverse.insert(*c, b as u8);
        }
        let bytes = strings
            .iter()
            .zip(&special)
            .map(|(s, &sp)| {
                if sp {
                    s.as_bytes().to_vec()
                } else {
                    s.chars()
                        .map(|c| inverse.get(&c).copied().unwrap_or(b'?'))
                        .collect()
                }
            })
            .collect();
        let ids = strings
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as u32))
            .collect();
        Tokenizer {
            with_special,
            plain,
            bytes,
            special,
            bos,
            eos,
            add_bos,
            ids,
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    /// Token ids of `text` (no BOS). With `parse_special`, special tokens
    /// written in the text (`<|im_start|>`) become their single ids.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, LlmError> {
        let t = if parse_special {
            &self.with_special
        } else {
            &self.plain
        };
        let enc = t
            .encode(text, false)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The raw bytes of one token (empty for an unknown id).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], |b| b.as_slice())
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The id of a token string, e.g. `<|im_end|>`.
    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }

    /// Decodes ids to text (invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// ChatML prompt: system, user, then the assistant turn opened.
    pub fn chat_prompt(system: Option<&str>, user: &str) -> String {
        let mut s = String::new();
        if let Some(sys) = system {
            s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
        }
        s.push_str(&format!(
            "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        ));
        s
    }
}

/// Turns a stream of token bytes into text, emitting only complete UTF-8
/// characters (a character split across tokens waits for its last byte).
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// Appends a token's bytes; returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        let mut out = String::new();
        self.push_into(bytes, &mut out);
        out
    }

    /// Appends a token's bytes and the text that is now complete to `out`;
    /// allocation-free once the buffers have warmed up.
    pub fn push_into(&mut self, bytes: &[u8], out: &mut String) {
        self.pending.extend_from_slice(bytes);
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    if let Ok(s) = std::str::from_utf8(&self.pending[..good]) {
                        out.push_str(s);
                    }
                    match e.error_len() {
                        // Incomplete character at the end: wait for more.
                        None => {
                            self.pending.drain(..good);
                            return;
                        }
                        // Invalid bytes: replace them and go on.
                        Some(n) => {
                            out.push('\u{fffd}');
                            self.pending.drain(..good + n);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_decoder_waits_for_whole_characters() {
        let mut d = StreamDecoder::default();
        let e = "é€😀".as_bytes();
        assert_eq!(d.push(&e[..1]), "");
        assert_eq!(d.push(&e[1..3]), "é");
        assert_eq!(d.push(&e[3..5]), "€");
        assert_eq!(d.push(&e[5..7]), "");
        assert_eq!(d.push(&e[7..]), "😀");
        assert_eq!(d.push(&[0xff, b'a']), "\u{fffd}a");
        assert_eq!(d.push(&[0xe2]), "");
        assert_eq!(d.finish(), "\u{fffd}");
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let t = byte_chars();
        let mut seen = std::collections::HashSet::new();
        assert!(t.iter().all(|c| seen.insert(*c)));
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
    }
}
