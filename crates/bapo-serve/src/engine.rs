//! The one thread that runs the model. Requests queue on a channel; each round takes the
//! oldest request and, when it is greedy, every queued greedy request for the same model (up
//! to 8 rows: one batched decoding pass serves them all; a greedy request waits up to
//! `BATCH_WINDOW` for others arriving with it); sampled requests run alone with
//! their own seed. Adapters are attached to the one base model on first use and kept in a
//! bounded LRU. Text goes back to each request's handler as it is decoded.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use bapo_model::{generate_streaming, Generated, GenerationConfig, Llama, Tokenizer};
use burn::tensor::backend::Backend;
use tokio::sync::mpsc::UnboundedSender;

use crate::api::Target;

/// Most rows decoded together.
pub const MAX_BATCH: usize = 8;

/// How long a greedy request waits for others to batch with (a decoding step of SmolLM2 on 2
/// CPU cores takes ~50 ms; a request alone is delayed by at most this).
pub const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(15);

/// What the engine sends back for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text (never splits a UTF-8 character or a possible stop string).
    Text(String),
    /// The end: `stop` (EOS or a stop string) or `length`, and the completion's token count.
    Done {
        finish: &'static str,
        completion_tokens: usize,
    },
    Error(String),
}

/// One queued request.
pub struct Job {
    pub target: Target,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub stop: Vec<String>,
    pub events: UnboundedSender<Event>,
}

/// Where user `u`'s adapter lives under `root`: `<root>/<u>/`, `<root>/<u>/adapter/` or
/// `<root>/users/<u>/adapter/` (the layout `bapo train --per-user` writes). `None` for a name
/// that is not a plain directory name.
pub fn adapter_dir(root: &Path, user: &str) -> Option<PathBuf> {
    let plain = !user.is_empty()
        && user != "."
        && user != ".."
        && !user.contains(['/', '\\'])
        && !user.contains('\0');
    if !plain {
        return None;
    }
    [
        root.join(user),
        root.join(user).join("adapter"),
        root.join("users").join(user).join("adapter"),
    ]
    .into_iter()
    .find(|d| d.join("adapter_config.json").is_file())
}

/// Every user with an adapter under `root`, sorted.
pub fn list_users(root: &Path) -> Vec<String> {
    let mut users = Vec::new();
    for dir in [root.to_path_buf(), root.join("users")] {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if adapter_dir(root, &name).is_some() && !users.contains(&name) {
                users.push(name);
            }
        }
    }
    users.sort();
    users
}

/// Turns a row's tokens into text as they come: holds back an incomplete UTF-8 character and
/// any tail that could still become a stop string; cuts at the first stop string.
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    stop: Vec<String>,
    max_tokens: usize,
    sent: usize,
    pub done: bool,
}

impl<'a> TextStream<'a> {
    pub fn new(tok: &'a Tokenizer, stop: Vec<String>, max_tokens: usize) -> Self {
        Self {
            tok,
            stop,
            max_tokens,
            sent: 0,
            done: false,
        }
    }

    /// The events for `row`'s state now (`last`: decoding ended for every row).
    pub fn step(&mut self, row: &Generated, last: bool) -> Vec<Event> {
        if self.done {
            return vec![];
        }
        let mut toks = &row.tokens[..row.tokens.len().min(self.max_tokens)];
        let eos = row.stopped_on_eos && toks.len() == row.tokens.len();
        if eos {
            toks = &toks[..toks.len() - 1];
        }
        let text = match self.tok.decode(toks) {
            Ok(t) => t,
            Err(e) => {
                self.done = true;
                return vec![Event::Error(format!("decoding: {e}"))];
            }
        };
        let cut = self.stop.iter().filter_map(|s| text.find(s.as_str())).min();
        let finish = match cut {
            Some(_) => Some("stop"),
            None if eos => Some("stop"),
            None if row.tokens.len() >= self.max_tokens || last => Some("length"),
            None => None,
        };
        let end = match (cut, finish) {
            (Some(c), _) => c,
            (None, Some(_)) => text.len(),
            (None, None) => {
                // Hold back a trailing replacement character (a split UTF-8 sequence) and the
                // longest tail that begins some stop string.
                let mut end = text.trim_end_matches('\u{FFFD}').len();
                for s in &self.stop {
                    for k in (1..s.len()).rev() {
                        if s.is_char_boundary(k) && text[..end].ends_with(&s[..k]) {
                            end = end.min(text[..end].len() - k);
                            break;
                        }
                    }
                }
                end
            }
        };
        let mut out = Vec::new();
        if end > self.sent && text.is_char_boundary(end) && text.is_char_boundary(self.sent) {
            out.push(Event::Text(text[self.sent..end].to_string()));
            self.sent = end;
        }
        if let Some(finish) = finish {
            self.done = true;
            out.push(Event::Done {
                finish,
                completion_tokens: toks.len(),
            });
        }
        out
    }
}

/// The engine: owns the base model and the adapter cache; runs until every sender is gone.
pub struct Engine<B: Backend> {
    pub base: Llama<B>,
    pub tok: Tokenizer,
    pub eos_ids: Vec<u32>,
    pub adapters: PathBuf,
    pub max_adapters: usize,
    pub device: B::Device,
}

impl<B: Backend> Engine<B> {
    pub fn run(self, rx: mpsc::Receiver<Job>) {
        let mut cache: Vec<(String, Llama<B>)> = Vec::new(); // most recent last
        let mut queue: VecDeque<Job> = VecDeque::new();
        loop {
            if queue.is_empty() {
                match rx.recv() {
                    Ok(j) => queue.push_back(j),
                    Err(_) => return,
                }
            }
            queue.extend(rx.try_iter());
            // Greedy requests arriving together (clients that fire at once) share one pass:
            // wait a moment for the rest of them before decoding.
            if queue.front().is_some_and(|j| j.temperature == 0.0) {
                let deadline = std::time::Instant::now() + BATCH_WINDOW;
                while queue.len() < MAX_BATCH {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    match rx.recv_timeout(left) {
                        Ok(j) => queue.push_back(j),
                        Err(_) => break,
                    }
                }
            }
            let first = queue.pop_front().expect("non-empty");
            let mut group = vec![first];
            if group[0].temperature == 0.0 {
                let mut rest = VecDeque::new();
                while let Some(j) = queue.pop_front() {
                    if group.len() < MAX_BATCH
                        && j.temperature == 0.0
                        && j.target == group[0].target
                    {
                        group.push(j);
                    } else {
                        rest.push_back(j);
                    }
                }
                queue = rest;
            }
            // Requests whose client went away are dropped before any work.
            group.retain(|j| !j.events.is_closed());
            if group.is_empty() {
                continue;
            }
            let model = match self.model_for(&group[0].target, &mut cache) {
                Ok(m) => m,
                Err(e) => {
                    for j in &group {
                        let _ = j.events.send(Event::Error(e.clone()));
                    }
                    continue;
                }
            };
            self.decode(&model, &group);
        }
    }

    fn model_for(
        &self,
        target: &Target,
        cache: &mut Vec<(String, Llama<B>)>,
    ) -> Result<Llama<B>, String> {
        let user = match target {
            Target::Base => return Ok(self.base.clone()),
            Target::User(u) => u,
        };
        if let Some(i) = cache.iter().position(|(u, _)| u == user) {
            let hit = cache.remove(i);
            let m = hit.1.clone();
            cache.push(hit);
            return Ok(m);
        }
        let dir = adapter_dir(&self.adapters, user)
            .ok_or_else(|| format!("no adapter for user `{user}`"))?;
        let t0 = std::time::Instant::now();
        let m = bapo_model::lora::load_adapter_dir(self.base.clone(), &dir, &self.device)
            .map_err(|e| format!("loading {}: {e}", dir.display()))?;
        tracing::info!(user, dir = %dir.display(), secs = t0.elapsed().as_secs_f64(), "adapter loaded");
        if cache.len() >= self.max_adapters.max(1) {
            let (old, _) = cache.remove(0);
            tracing::info!(user = old, "adapter evicted (least recently used)");
        }
        cache.push((user.clone(), m.clone()));
        Ok(m)
    }

    fn decode(&self, model: &Llama<B>, group: &[Job]) {
        let prompts: Vec<Vec<u32>> = group.iter().map(|j| j.prompt.clone()).collect();
        let cfg = GenerationConfig {
            max_new_tokens: group.iter().map(|j| j.max_tokens).max().unwrap_or(1),
            temperature: group[0].temperature,
            top_p: group[0].top_p,
            seed: group[0].seed,
            eos_ids: self.eos_ids.clone(),
        };
        let mut streams: Vec<TextStream<'_>> = group
            .iter()
            .map(|j| TextStream::new(&self.tok, j.stop.clone(), j.max_tokens))
            .collect();
        let t0 = std::time::Instant::now();
        let send = |rows: &[Generated], streams: &mut Vec<TextStream<'_>>, last: bool| {
            for ((s, row), j) in streams.iter_mut().zip(rows).zip(group) {
                for e in s.step(row, last) {
                    if j.events.send(e).is_err() {
                        s.done = true; // the client went away
                    }
                }
            }
        };
        let rows = generate_streaming(model, &prompts, &cfg, &self.device, &mut |rows| {
            send(rows, &mut streams, false);
            if streams.iter().all(|s| s.done) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        send(&rows, &mut streams, true);
        let n: usize = rows.iter().map(|r| r.tokens.len()).sum();
        tracing::debug!(
            rows = group.len(),
            tokens = n,
            secs = t0.elapsed().as_secs_f64(),
            "decoded"
        );
    }
}
