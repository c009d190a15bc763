//! The step API: sequences are added, prefilled, then advanced one decode
//! step at a time — all active sequences together in one batched pass — so
//! a scheduler can interleave generation with perception work and cancel
//! between steps. Optional speculative decoding by prompt lookup.

use std::sync::Arc;
use std::time::Instant;

use osprey_kernels::pool::ThreadPool;

use super::kv::{KvCache, SeqKv, SeqSet};
use super::model::{Logits, Model, Scratch};
use super::sample::{argmax, Sampler, SamplingParams};
use super::tokenizer::StreamDecoder;
use super::LlmError;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop when the generated text contains one of these (not included).
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// Draft tokens by prompt lookup and verify them in one pass (greedy
    /// sampling only; ignored otherwise).
    pub speculative: bool,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            speculative: false,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence token.
    Eos,
    /// `max_tokens` reached.
    MaxTokens,
    /// A stop string appeared.
    StopString,
    /// The context window is full.
    Context,
    /// Cancelled by the caller.
    Cancelled,
}

/// Figures of one finished (or running) sequence.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Time to first token, ms (prefill + first sample).
    pub ttft_ms: f64,
    /// Prefill throughput, tokens/s.
    pub prefill_tok_s: f64,
    /// Decode throughput after the first token, tokens/s.
    pub decode_tok_s: f64,
    /// Speculative drafts proposed and accepted.
    pub drafted: usize,
    /// Draft tokens accepted.
    pub accepted: usize,
}

/// Handle of a sequence in a [`Runtime`].
pub type SeqId = usize;

#[derive(Debug)]
struct Seq {
    kv: SeqKv,
    tokens: Vec<u32>,
    prompt_len: usize,
    opts: GenOptions,
    sampler: Sampler,
    decoder: StreamDecoder,
    text: String,
    emitted: usize,
    next: Option<u32>,
    done: Option<StopReason>,
    stats: GenStats,
    started: Instant,
    first_token_at: Option<Instant>,
}

/// A model, a KV pool, scratch and threads: runs many sequences.
#[derive(Debug)]
pub struct Runtime {
    model: Arc<Model>,
    kv: KvCache,
    scratch: Scratch,
    pool: ThreadPool,
    seqs: Vec<Option<Seq>>,
    batch: Vec<(usize, u32)>,
    order: Vec<SeqId>,
}

/// Bytes reserved for a sequence's text: 16 per token, at most 1 MiB.
fn opts_text_capacity(max_tokens: usize) -> usize {
    max_tokens.saturating_mul(16).clamp(64, 1 << 20)
}

/// Longest draft verified in one pass.
const MAX_DRAFT: usize = 4;

impl Runtime {
    /// A runtime with a KV pool of `kv_budget_bytes`, `threads` threads and
    /// passes of up to `max_rows` rows (prompt chunks, batch size).
    pub fn new(
        model: Arc<Model>,
        kv_budget_bytes: usize,
        threads: usize,
        max_rows: usize,
    ) -> Result<Runtime, LlmError> {
        let kv = KvCache::for_model(&model.cfg, kv_budget_bytes, model.kv_precision)?;
        let rows = max_rows.max(MAX_DRAFT + 1);
        let scratch = model.scratch(rows, true);
        Ok(Runtime {
            model,
            kv,
            scratch,
            pool: ThreadPool::new(threads.clamp(1, super::model::MAX_THREADS)),
            seqs: Vec::new(),
            batch: Vec::with_capacity(rows),
            order: Vec::with_capacity(rows),
        })
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The KV pool (free blocks, capacity).
    pub fn kv(&self) -> &KvCache {
        &self.kv
    }

    /// Adds a sequence for `prompt` (token ids); nothing runs yet.
    pub fn add(&mut self, prompt: &[u32], opts: GenOptions) -> Result<SeqId, LlmError> {
        opts.sampling.validate()?;
        let ctx = self.model.cfg.context;
        if prompt.is_empty() {
            return Err(LlmError::Request("the prompt is empty".into()));
        }
        if prompt.len() >= ctx {
            return Err(LlmError::ContextFull {
                tokens: prompt.len() + 1,
                context: ctx,
            });
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= self.model.cfg.vocab) {
            return Err(LlmError::Request(format!(
                "token {bad} is outside the vocabulary"
            )));
        }
        let cap = (prompt.len() + opts.max_tokens + MAX_DRAFT + 1).min(ctx);
        let max_tokens = opts.max_tokens;
        let mut tokens = Vec::with_capacity(cap);
        tokens.extend_from_slice(prompt);
        let seq = Seq {
            kv: self.kv.new_seq(cap),
            tokens,
            prompt_len: prompt.len(),
            sampler: Sampler::new(opts.sampling.clone()),
            opts,
            decoder: StreamDecoder::default(),
            // Room for the whole answer up front: streaming text does not
            // reallocate on the decode path (tokens average ~4 bytes).
            text: String::with_capacity(opts_text_capacity(max_tokens)),
            emitted: 0,
            next: None,
            done: None,
            stats: GenStats {
                prompt_tokens: prompt.len(),
                ..Default::default()
            },
            started: Instant::now(),
            first_token_at: None,
        };
        let id = match self.seqs.iter().position(Option::is_none) {
            Some(i) => {
                self.seqs[i] = Some(seq);
                i
            }
            None => {
                self.seqs.push(Some(seq));
                self.seqs.len() - 1
            }
        };
        Ok(id)
    }

    fn seq_mut(&mut self, id: SeqId) -> Result<&mut Seq, LlmError> {
        self.seqs
            .get_mut(id)
            .and_then(Option::as_mut)
            .ok_or_else(|| LlmError::Request(format!("no sequence {id}")))
    }

    /// Runs the prompt of `id` (in chunks of the pass size) and samples its
    /// first token. On a KV or context error the sequence is released.
    pub fn prefill(&mut self, id: SeqId) -> Result<(), LlmError> {
        let rows = self.scratch.max_rows();
        let t0 = Instant::now();
        let mut seq = self
            .seqs
            .get_mut(id)
            .and_then(Option::take)
            .ok_or_else(|| LlmError::Request(format!("no sequence {id}")))?;
        let result = (|| {
            let n = seq.prompt_len;
            let mut start = seq.kv.len();
            while start < n {
                let end = (start + rows).min(n);
                self.batch.clear();
                self.batch
                    .extend(seq.tokens[start..end].iter().map(|&t| (0, t)));
                self.model.forward(
                    &mut self.kv,
                    &mut [&mut seq.kv],
                    &self.batch,
                    Logits::LastPerSeq,
                    &mut self.scratch,
                    &self.pool,
                )?;
                start = end;
            }
            Ok::<(), LlmError>(())
        })();
        if let Err(e) = result {
            self.kv.release(&mut seq.kv);
            return Err(e);
        }
        let secs = t0.elapsed().as_secs_f64();
        seq.stats.prefill_tok_s = seq.prompt_len as f64 / secs.max(1e-9);
        let vocab = self.model.cfg.vocab;
        let logits = &mut self.scratch.logits[..vocab];
        let tok = seq.sampler.sample(logits, &seq.tokens);
        self.accept(&mut seq, tok);
        seq.first_token_at = Some(Instant::now());
        seq.stats.ttft_ms = seq.started.elapsed().as_secs_f64() * 1e3;
        self.seqs[id] = Some(seq);
        Ok(())
    }

    /// Records a sampled token: text, stop checks.
    fn accept(&self, seq: &mut Seq, tok: u32) {
        if seq.done.is_some() {
            return;
        }
        let tk = &self.model.tokenizer;
        let is_eos = Some(tok) == tk.eos || tk.token_id("<|im_end|>") == Some(tok);
        if is_eos && !seq.opts.ignore_eos {
            seq.done = Some(StopReason::Eos);
            seq.next = None;
            return;
        }
        seq.tokens.push(tok);
        seq.stats.generated_tokens += 1;
        if !tk.is_special(tok) {
            seq.decoder.push_into(tk.token_bytes(tok), &mut seq.text);
        }
        seq.next = Some(tok);
        if let Some(stop) = seq
            .opts
            .stop
            .iter()
            .find(|s| !s.is_empty() && seq.text.contains(s.as_str()))
        {
            if let Some(at) = seq.text.find(stop.as_str()) {
                seq.text.truncate(at);
            }
            seq.emitted = seq.emitted.min(seq.text.len());
            seq.done = Some(StopReason::StopString);
            seq.next = None;
        } else if seq.stats.generated_tokens >= seq.opts.max_tokens {
            seq.done = Some(StopReason::MaxTokens);
            seq.next = None;
        } else if seq.tokens.len() + 1 >= self.model.cfg.context {
            seq.done = Some(StopReason::Context);
            seq.next = None;
        }
    }

    /// One decode step for every active, prefilled sequence, batched in
    /// one pass (speculative sequences verify their drafts in their own
    /// pass). Returns how many sequences advanced. Allocates nothing.
    pub fn step(&mut self) -> Result<usize, LlmError> {
        let mut advanced = 0;
        for id in 0..self.seqs.len() {
            let spec = self.seqs[id].as_ref().is_some_and(|s| {
                s.done.is_none()
                    && s.next.is_some()
                    && s.opts.speculative
                    && s.opts.sampling.temperature == 0.0
            });
            if spec {
                self.speculative_step(id)?;
                advanced += 1;
            }
        }
        self.order.clear();
        self.batch.clear();
        for (i, s) in self.seqs.iter().enumerate() {
            if let Some(s) = s {
                if s.done.is_none() && !(s.opts.speculative && s.opts.sampling.temperature == 0.0) {
                    if let Some(t) = s.next {
                        if self.order.len() < self.batch.capacity() {
                            self.batch.push((self.order.len(), t));
                            self.order.push(i);
                        }
                    }
                }
            }
        }
        if self.order.is_empty() {
            return Ok(advanced);
        }
        let mut view = Active {
            seqs: &mut self.seqs,
            order: &self.order,
        };
        self.model.forward(
            &mut self.kv,
            &mut view,
            &self.batch,
            Logits::LastPerSeq,
            &mut self.scratch,
            &self.pool,
        )?;
        let vocab = self.model.cfg.vocab;
        for k in 0..self.order.len() {
            let id = self.order[k];
            let Some(mut s) = self.seqs[id].take() else {
                continue;
            };
            let logits = &mut self.scratch.logits[k * vocab..(k + 1) * vocab];
            let tok = s.sampler.sample(logits, &s.tokens);
            self.accept(&mut s, tok);
            self.update_rate(&mut s);
            self.seqs[id] = Some(s);
        }
        Ok(advanced + self.order.len())
    }

    fn update_rate(&self, s: &mut Seq) {
        if let Some(t) = s.first_token_at {
            let n = s.stats.generated_tokens.saturating_sub(1);
            s.stats.decode_tok_s = n as f64 / t.elapsed().as_secs_f64().max(1e-9);
        }
    }

    /// Greedy step with prompt-lookup drafts: the last `n` tokens (n = 3,
    /// 2, 1) are looked up earlier in the context; the tokens that followed
    /// are verified together with the pending token in one pass; every
    /// draft token that equals the greedy choice is kept, plus the model's
    /// own next token. Output is identical to plain greedy decoding.
    fn speculative_step(&mut self, id: SeqId) -> Result<(), LlmError> {
        let mut s = self.seqs[id]
            .take()
            .ok_or_else(|| LlmError::Request(format!("no sequence {id}")))?;
        let Some(next) = s.next else {
            self.seqs[id] = Some(s);
            return Ok(());
        };
        let budget = s.opts.max_tokens.saturating_sub(s.stats.generated_tokens);
        let room = self.model.cfg.context.saturating_sub(s.tokens.len() + 2);
        let max_draft = MAX_DRAFT.min(budget).min(room);
        let r = lookup_draft(&s.tokens, max_draft);
        let mut buf = [0u32; MAX_DRAFT];
        let draft = &mut buf[..r.len()];
        draft.copy_from_slice(&s.tokens[r]);
        let draft = &*draft;
        self.batch.clear();
        self.batch.push((0, next));
        self.batch.extend(draft.iter().map(|&t| (0, t)));
        let base = s.kv.len();
        let r = self.model.forward(
            &mut self.kv,
            &mut [&mut s.kv],
            &self.batch,
            Logits::All,
            &mut self.scratch,
            &self.pool,
        );
        if let Err(e) = r {
            self.seqs[id] = Some(s);
            return Err(e);
        }
        let vocab = self.model.cfg.vocab;
        s.stats.drafted += draft.len();
        let mut kept = 0;
        for i in 0..=draft.len() {
            let tok = argmax(&self.scratch.logits[i * vocab..(i + 1) * vocab]);
            self.accept(&mut s, tok);
            if i < draft.len() && s.done.is_none() && tok == draft[i] {
                kept += 1;
                continue;
            }
            break;
        }
        s.stats.accepted += kept;
        // Positions past the accepted ones hold rejected drafts.
        self.kv.truncate(&mut s.kv, base + 1 + kept);
        self.update_rate(&mut s);
        self.seqs[id] = Some(s);
        Ok(())
    }

    /// Text generated since the last call (whole UTF-8 characters only).
    pub fn take_text(&mut self, id: SeqId) -> Result<String, LlmError> {
        let s = self.seq_mut(id)?;
        let out = s.text[s.emitted..].to_string();
        s.emitted = s.text.len();
        Ok(out)
    }

    /// Text generated since the last call, borrowed (whole UTF-8
    /// characters only; allocation-free, for the daemon's decode path).
    pub fn new_text(&mut self, id: SeqId) -> Result<&str, LlmError> {
        let s = self.seq_mut(id)?;
        let from = s.emitted.min(s.text.len());
        s.emitted = s.text.len();
        Ok(s.text.get(from..).unwrap_or(""))
    }

    /// Figures of a live sequence so far.
    pub fn stats(&self, id: SeqId) -> Option<&GenStats> {
        self.seqs.get(id).and_then(Option::as_ref).map(|s| &s.stats)
    }

    /// Whether `id` has finished, and why.
    pub fn done(&self, id: SeqId) -> Option<StopReason> {
        self.seqs
            .get(id)
            .and_then(Option::as_ref)
            .and_then(|s| s.done)
    }

    /// Stops `id` between steps (its KV blocks go back to the pool).
    pub fn cancel(&mut self, id: SeqId) -> Result<(), LlmError> {
        let s = self
            .seqs
            .get_mut(id)
            .and_then(Option::as_mut)
            .ok_or_else(|| LlmError::Request(format!("no sequence {id}")))?;
        s.done.get_or_insert(StopReason::Cancelled);
        s.next = None;
        let mut kv = std::mem::replace(&mut s.kv, SeqKv::empty());
        self.kv.release(&mut kv);
        Ok(())
    }

    /// Removes a sequence, returning its figures and why it stopped (the
    /// KV blocks go back to the pool; allocation-free).
    pub fn remove(&mut self, id: SeqId) -> Result<(GenStats, Option<StopReason>), LlmError> {
        let mut s = self
            .seqs
            .get_mut(id)
            .and_then(Option::take)
            .ok_or_else(|| LlmError::Request(format!("no sequence {id}")))?;
        self.kv.release(&mut s.kv);
        Ok((s.stats, s.done))
    }

    /// Removes a sequence: its generated tokens, full text and figures.
    pub fn finish(
        &mut self,
        id: SeqId,
    ) -> Result<(Vec<u32>, String, GenStats, Option<StopReason>), LlmError> {
        let mut s = self
            .seqs
            .get_mut(id)
            .and_then(Option::take)
            .ok_or_else(|| LlmError::Request(format!("no sequence {id}")))?;
        self.kv.release(&mut s.kv);
        let tail = s.decoder.finish();
        s.text.push_str(&tail);
        let generated = s.tokens[s.prompt_len..].to_vec();
        Ok((generated, s.text, s.stats, s.done))
    }
}

/// The active sequences of a step, in batch order.
struct Active<'a> {
    seqs: &'a mut [Option<Seq>],
    order: &'a [SeqId],
}

impl SeqSet for Active<'_> {
    fn count(&self) -> usize {
        self.order.len()
    }
    fn seq(&self, i: usize) -> &SeqKv {
        match &self.seqs[self.order[i]] {
            Some(s) => &s.kv,
            None => &EMPTY,
        }
    }
    fn seq_mut(&mut self, i: usize) -> &mut SeqKv {
        match &mut self.seqs[self.order[i]] {
            Some(s) => &mut s.kv,
            // `order` only names live sequences (built in `step`).
            None => unreachable!("step orders only live sequences"),
        }
    }
}

static EMPTY: SeqKv = SeqKv::empty();

/// Prompt-lookup draft: the range of `tokens` that followed the most
/// recent earlier occurrence of the context's last 3- or 2-gram (at most
/// `max` tokens; empty when nothing matches — a single-token match is too
/// weak a signal to pay for verifying).
pub fn lookup_draft(tokens: &[u32], max: usize) -> std::ops::Range<usize> {
    if max == 0 {
        return 0..0;
    }
    for n in (2..=3).rev() {
        if tokens.len() <= n {
            continue;
        }
        let tail = &tokens[tokens.len() - n..];
        for start in (0..tokens.len() - n).rev() {
            if &tokens[start..start + n] == tail {
                let from = start + n;
                let to = (from + max).min(tokens.len());
                if from < to {
                    return from..to;
                }
            }
        }
    }
    0..0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drafts_follow_the_latest_ngram_match() {
        let t = [1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 8, 2, 3, 4];
        assert_eq!(&t[lookup_draft(&t, 2)], &[7, 8]);
        assert!(lookup_draft(&[5, 6, 7], 4).is_empty());
        assert!(
            lookup_draft(&[5, 6, 5], 4).is_empty(),
            "unigram matches do not draft"
        );
        assert_eq!(&[5, 6, 5, 6][lookup_draft(&[5, 6, 5, 6], 4)], &[5, 6]);
        assert!(lookup_draft(&t, 0).is_empty());
    }
}
