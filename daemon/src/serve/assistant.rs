//! The assistant: question intake (any thread) and its job on a lane
//! (one prefill or one batched decode step per dispatch).

use super::*;

pub(super) struct Question {
    pub(super) tokens: Vec<u32>,
    pub(super) reply: Box<dyn Reply>,
    pub(super) received: Instant,
}

pub(super) struct Answering {
    pub(super) id: SeqId,
    pub(super) reply: Box<dyn Reply>,
    pub(super) received: Instant,
    pub(super) chunks: u64,
    pub(super) first: bool,
    pub(super) ttft_ms: f64,
}

pub(super) struct AsstCore {
    pub(super) rt: Runtime,
    pub(super) active: Vec<Answering>,
    pub(super) out: Vec<u8>,
}

/// The onboard assistant: intake (any thread) and the job (lane workers).
pub(super) struct Assistant {
    pub(super) cfg: AssistantConfig,
    pub(super) model: Arc<Model>,
    pub(super) lane: usize,
    pub(super) inbox: Mutex<Vec<Question>>,
    pub(super) in_flight: AtomicUsize,
    pub(super) core: Mutex<AsstCore>,
}

impl Assistant {
    pub(super) fn load(a: &AssistantConfig, cfg: &Config, lanes: &mut [Lane]) -> Result<Assistant> {
        let mut model =
            Model::load(&a.model).map_err(|e| anyhow!("assistant: {}: {e}", a.model.display()))?;
        if a.kv_f16 {
            model.kv_precision = osprey_models::llm::kv::KvPrecision::F16;
        }
        model.set_int8_activations(a.int8_activations);
        let model = Arc::new(model);
        let li = cfg
            .scheduler
            .lanes
            .iter()
            .position(|l| l.name == a.lane)
            .ok_or_else(|| anyhow!("assistant: no lane {:?}", a.lane))?;
        let per_seq = a.max_prompt_tokens + a.max_answer_tokens + 8;
        let c = &model.cfg;
        let rows = (a.max_concurrent).clamp(1, osprey_models::llm::model::MAX_SEQS);
        let rt = Runtime::new(model.clone(), a.kv_budget_bytes, a.threads, rows.max(32))
            .map_err(|e| anyhow!("assistant: {e} (assistant.kv_budget_bytes)"))?;
        // Every admitted question must fit: refuse a budget that cannot
        // hold max_concurrent full-length answers.
        let need_blocks = a.max_concurrent * per_seq.div_ceil(rt.kv().block_tokens());
        if need_blocks > rt.kv().capacity_blocks() {
            bail!(
                "assistant.kv_budget_bytes: {} bytes hold {} KV blocks, {} questions of {} tokens need {} ({} bytes per block, {} layers)",
                a.kv_budget_bytes,
                rt.kv().capacity_blocks(),
                a.max_concurrent,
                per_seq,
                need_blocks,
                rt.kv().block_bytes(),
                c.n_layers
            );
        }
        if per_seq > c.context {
            bail!(
                "assistant: max_prompt_tokens + max_answer_tokens = {per_seq} exceeds the model's context of {}",
                c.context
            );
        }
        let st = lanes[li]
            .state
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st.assistant = Some(AsstJob {
            ready: false,
            running: false,
            deadline: Instant::now(),
        });
        Ok(Assistant {
            cfg: a.clone(),
            model,
            lane: li,
            inbox: Mutex::new(Vec::with_capacity(a.max_concurrent)),
            in_flight: AtomicUsize::new(0),
            core: Mutex::new(AsstCore {
                rt,
                active: Vec::with_capacity(a.max_concurrent),
                out: Vec::with_capacity(64 << 10),
            }),
        })
    }

    pub(super) fn options(&self) -> GenOptions {
        GenOptions {
            max_tokens: self.cfg.max_answer_tokens,
            ..GenOptions::default()
        }
    }

    /// Checks a question and tokenizes its chat prompt (off the inference
    /// path: on the receiving thread).
    pub(super) fn admit(&self, text: &str) -> Result<Vec<u32>> {
        let text = text.trim();
        if text.is_empty() {
            bail!("the question is empty");
        }
        if text.len() > self.cfg.max_prompt_tokens * 32 {
            bail!(
                "the question is {} bytes, far above max_prompt_tokens = {}",
                text.len(),
                self.cfg.max_prompt_tokens
            );
        }
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst);
        if n >= self.cfg.max_concurrent {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            bail!(
                "busy: {n} questions in flight (max_concurrent = {}); ask again shortly",
                self.cfg.max_concurrent
            );
        }
        let prompt = Tokenizer::chat_prompt(Some(&self.cfg.system_prompt), text);
        let tokens = match self.model.tokenizer.encode(&prompt, true) {
            Ok(t) => t,
            Err(e) => {
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                bail!("the question does not tokenize: {e}");
            }
        };
        if tokens.len() > self.cfg.max_prompt_tokens {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            bail!(
                "the question is {} tokens with the chat template, max_prompt_tokens = {}",
                tokens.len(),
                self.cfg.max_prompt_tokens
            );
        }
        Ok(tokens)
    }

    pub(super) fn warm_up(&self) -> Result<()> {
        let prompt = Tokenizer::chat_prompt(Some(&self.cfg.system_prompt), "Status?");
        let tokens = self.model.tokenizer.encode(&prompt, true)?;
        let mut c = lock(&self.core);
        let rt = &mut c.rt;
        let id = rt.add(&tokens, self.options())?;
        rt.prefill(id)?;
        rt.step()?;
        rt.step()?;
        let _ = rt.new_text(id)?;
        rt.remove(id)?;
        Ok(())
    }

    /// One job: admit one waiting question (its prefill) or run one
    /// batched decode step; stream new text; end finished answers.
    /// Returns whether more work remains.
    pub(super) fn run_job(&self, metrics: &Metrics) -> Result<bool> {
        let am = &metrics.assistant;
        let mut guard = lock(&self.core);
        let c = &mut *guard;
        let q = {
            let mut inbox = lock(&self.inbox);
            if inbox.is_empty() {
                None
            } else {
                Some(inbox.remove(0))
            }
        };
        if let Some(mut q) = q {
            am.waiting.fetch_sub(1, Ordering::Relaxed);
            let started =
                c.rt.add(&q.tokens, self.options())
                    .and_then(|id| c.rt.prefill(id).map(|_| id));
            match started {
                Ok(id) => {
                    am.active.fetch_add(1, Ordering::Relaxed);
                    c.active.push(Answering {
                        id,
                        reply: q.reply,
                        received: q.received,
                        chunks: 0,
                        first: true,
                        ttft_ms: 0.0,
                    });
                }
                Err(e) => {
                    self.in_flight.fetch_sub(1, Ordering::SeqCst);
                    am.rejected.fetch_add(1, Ordering::Relaxed);
                    let msg = serde_json::json!({ "error": e.to_string(), "done": true });
                    q.reply.send(msg.to_string().as_bytes());
                }
            }
        } else if !c.active.is_empty() {
            let t = Instant::now();
            c.rt.step()?;
            am.step.record_ms(t.elapsed().as_secs_f64() * 1e3);
        }
        let mut i = 0;
        while i < c.active.len() {
            let a = &mut c.active[i];
            let text = c.rt.new_text(a.id)?;
            if !text.is_empty() {
                c.out.clear();
                c.out.extend_from_slice(b"{\"text\":");
                serde_json::to_writer(&mut c.out, text)?;
                write!(c.out, ",\"index\":{},\"done\":false}}", a.chunks)?;
                a.chunks += 1;
                a.reply.send(&c.out);
            }
            if a.first {
                a.first = false;
                a.ttft_ms = a.received.elapsed().as_secs_f64() * 1e3;
                am.ttft.record_ms(a.ttft_ms);
            }
            if let Some(stop) = c.rt.done(a.id) {
                let (stats, _) = c.rt.remove(a.id)?;
                am.tokens
                    .fetch_add(stats.generated_tokens as u64, Ordering::Relaxed);
                c.out.clear();
                write!(
                    c.out,
                    "{{\"text\":\"\",\"index\":{},\"done\":true,\"stop\":\"{}\",\"prompt_tokens\":{},\"generated_tokens\":{},\"ttft_ms\":{:.3},\"decode_tok_s\":{:.2}}}",
                    a.chunks,
                    stop_name(stop),
                    stats.prompt_tokens,
                    stats.generated_tokens,
                    a.ttft_ms,
                    stats.decode_tok_s
                )?;
                a.reply.send(&c.out);
                // Dropping the reply ends the stream.
                c.active.swap_remove(i);
                am.active.fetch_sub(1, Ordering::Relaxed);
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
            } else {
                i += 1;
            }
        }
        Ok(!c.active.is_empty() || !lock(&self.inbox).is_empty())
    }

    /// Ends every question with a final "cancelled" reply.
    pub(super) fn cancel_all(&self) {
        let mut c = lock(&self.core);
        let c = &mut *c;
        for mut a in c.active.drain(..) {
            let _ = c.rt.cancel(a.id);
            let _ = c.rt.remove(a.id);
            a.reply.send(
                br#"{"text":"","done":true,"stop":"cancelled","error":"ospreyd is stopping"}"#,
            );
        }
        for mut q in lock(&self.inbox).drain(..) {
            q.reply
                .send(br#"{"error":"ospreyd is stopping","done":true,"stop":"cancelled"}"#);
        }
        self.in_flight.store(0, Ordering::SeqCst);
    }
}

pub(super) fn stop_name(s: StopReason) -> &'static str {
    match s {
        StopReason::Eos => "eos",
        StopReason::MaxTokens => "max_tokens",
        StopReason::StopString => "stop_string",
        StopReason::Context => "context",
        StopReason::Cancelled => "cancelled",
    }
}
