//! What every job shares before it trains or evaluates: the model, the seeded data split, the
//! frozen reference's base responses and its log-probs (each cached under a fingerprint of
//! everything it depends on), and `anchors.jsonl`, the anchors as a person reads them.

use std::path::{Path, PathBuf};

use bapo_data::{
    encode_examples, read_preferences, ChatTemplate, EncodeConfig, EncodedExample,
    PreferenceExample,
};
use bapo_model::{Llama, LlamaConfig, LoadedModel, Tokenizer};
use burn::tensor::backend::AutodiffBackend;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use sha2::{Digest, Sha256};

use crate::cache::{
    hash_path, hex, read_cache, AnchorCache, Numerics, ReferenceCache, ANCHOR_CACHE_FORMAT,
};
use crate::config::{expand_path, RunConfig};
use crate::generation::base_responses;
use bapo_train::io::{bar, write_atomic, RunError};
use bapo_train::train::{reference_logps, reference_of};

/// The data and the reference's numbers, ready for training or evaluation.
pub(crate) struct Prepared<B: AutodiffBackend> {
    pub(crate) reference: Llama<B::InnerBackend>,
    pub(crate) config: LlamaConfig,
    pub(crate) tok: Tokenizer,
    pub(crate) template: ChatTemplate,
    pub(crate) eos: u32,
    pub(crate) enc_cfg: EncodeConfig,
    pub(crate) train_ex: Vec<PreferenceExample>,
    pub(crate) eval_ex: Vec<PreferenceExample>,
    pub(crate) anchors: AnchorCache,
    pub(crate) train_enc: Vec<EncodedExample>,
    pub(crate) eval_enc: Vec<EncodedExample>,
    pub(crate) refs: ReferenceCache,
}

/// Loads the model and data, checks lengths, and computes (or reuses) the base responses and
/// the reference log-probs; writes `config.json` and `anchors.jsonl` into the output directory.
/// Returns the loaded model (the policy's starting point) beside the rest.
///
/// With `shared` (`--per-user`), the base responses and reference log-probs are looked up, by
/// file and line, in what one preparation over every user computed; nothing is generated or
/// cached here.
pub(crate) fn prepare<B: AutodiffBackend>(
    run: &RunConfig,
    device: &B::Device,
    shared: Option<&Shared>,
) -> Result<(Llama<B>, Prepared<B>), RunError> {
    let out = &run.output.dir;
    std::fs::create_dir_all(out).map_err(|e| RunError::file(out, e))?;
    write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(run)?.as_bytes(),
    )?;
    if run.model.base_dtype.is_half() && B::name(device).contains("ndarray") {
        return Err(format!(
            "model.base_dtype = {:?}: burn-ndarray 0.21 has no half-precision tensors; use --backend flex (the default), wgpu or cuda",
            run.model.base_dtype
        )
        .into());
    }
    let model_path = expand_path(&run.model.path);
    let LoadedModel {
        model,
        config,
        tokenizer: tok,
    } = bapo_model::load_base::<B>(&model_path, run.model.base_dtype.base_weights(), device)?;
    // The frozen base in its configured type, each weight cast as it is built: the reference,
    // the base responses and the policy's base all use it (LoRA weights are attached later, in
    // f32).
    tracing::info!(model = %model_path.display(), params = config.num_params(), "model loaded");
    let eos = tok.eos_id().ok_or("the tokenizer has no EOS token")?;
    let template =
        bapo_train::chat_template(&tok).with_kwargs(run.data.chat_template_kwargs.clone());

    let (examples, train_ex, eval_ex) = split_data(run)?;
    let users: std::collections::BTreeSet<&str> =
        examples.iter().filter_map(|e| e.user.as_deref()).collect();
    tracing::info!(
        train = train_ex.len(),
        eval = eval_ex.len(),
        ?users,
        "preference data"
    );
    let enc_cfg = EncodeConfig {
        max_length: run.data.max_length,
        max_prompt_length: run.data.max_prompt_length,
        truncation_mode: run.data.truncation()?,
    };
    let context = config.max_position_embeddings;
    let sources = Sources {
        run,
        model_path: &model_path,
        tok: &tok,
        template: &template,
        eos,
        enc_cfg: &enc_cfg,
    };
    sources.check_lengths(context, &train_ex, &eval_ex)?;
    let mut fingerprint = sources.fingerprint()?;

    let reference = reference_of(&model);
    let numerics = Numerics::of::<B::InnerBackend>(device, run.train.prompt_sharing)
        .with_base_dtype(run.model.base_dtype);
    let mut eos_ids = config.eos_token_ids.clone();
    eos_ids.push(eos);
    let all: Vec<&PreferenceExample> = train_ex.iter().chain(&eval_ex).collect();
    let anchors = match shared {
        Some(sh) => sh.anchors(&sources.keys(&train_ex, &eval_ex), &numerics)?,
        None => sources.anchors(
            &reference,
            &all,
            train_ex.len(),
            hex(fingerprint.clone()),
            &numerics,
            (eos_ids, context),
            device,
        )?,
    };
    let (train_enc, eval_enc) = sources.encode(&train_ex, &eval_ex, &anchors)?;
    fingerprint.update(serde_json::to_vec(&(
        enc_cfg.max_length,
        enc_cfg.max_prompt_length,
        &run.data.truncation_mode,
    ))?);
    // The ids themselves: any change in how pairs become tokens (a template, its arguments,
    // the conversational rule) is a different reference.
    for e in train_enc.iter().chain(&eval_enc) {
        let rows = [&e.prompt_ids, &e.chosen_ids, &e.rejected_ids];
        for ids in rows.into_iter().chain(&e.base_ids) {
            fingerprint.update((ids.len() as u64).to_le_bytes());
            ids.iter().for_each(|t| fingerprint.update(t.to_le_bytes()));
        }
    }
    let refs = match shared {
        Some(sh) => sh.refs(
            (run.data.train.as_path(), &train_enc),
            (sources.eval_file().as_path(), &eval_enc),
            &numerics,
        )?,
        None => reference_cache(
            run,
            &reference,
            (&train_enc, &eval_enc),
            eos,
            hex(fingerprint),
            &numerics,
            device,
        )?,
    };
    write_anchors_jsonl(out, &train_ex, &train_enc, &anchors, &refs)?;
    let prepared = Prepared {
        reference,
        config,
        tok,
        template,
        eos,
        enc_cfg,
        train_ex,
        eval_ex,
        anchors,
        train_enc,
        eval_enc,
        refs,
    };
    Ok((model, prepared))
}

/// What the base responses and encodings are made from.
struct Sources<'a> {
    run: &'a RunConfig,
    model_path: &'a Path,
    tok: &'a Tokenizer,
    template: &'a ChatTemplate,
    eos: u32,
    enc_cfg: &'a EncodeConfig,
}

impl Sources<'_> {
    /// `(file, line)` of every example, train first, then eval (the order of the anchors).
    fn keys(
        &self,
        train_ex: &[PreferenceExample],
        eval_ex: &[PreferenceExample],
    ) -> Vec<(PathBuf, usize)> {
        let line = |x: &PreferenceExample| x.line;
        split_keys(
            self.run,
            train_ex.iter().map(line),
            eval_ex.iter().map(line),
        )
    }

    /// The file each split's line numbers refer to.
    fn eval_file(&self) -> &PathBuf {
        eval_file(self.run)
    }

    /// `data.max_length` within the model's context; a prompt that alone fills `max_length` is
    /// an error unless dropping is asked for. Checked before the (slow) base responses, by a
    /// dry tokenisation without them.
    fn check_lengths(
        &self,
        context: usize,
        train_ex: &[PreferenceExample],
        eval_ex: &[PreferenceExample],
    ) -> Result<(), RunError> {
        let run = self.run;
        if run.data.max_length > context {
            return Err(format!(
                "data.max_length = {} exceeds the context of {} ({context} positions, \
                 max_position_embeddings)",
                run.data.max_length,
                self.model_path.display()
            )
            .into());
        }
        if run.data.drop_long_prompts {
            return Ok(());
        }
        for (split, ex, file) in [
            ("train", train_ex, &run.data.train),
            ("eval", eval_ex, self.eval_file()),
        ] {
            let encode = bapo_train::encoder(self.tok);
            let (_, s) = encode_examples(ex, None, self.template, &encode, self.eos, self.enc_cfg)?;
            let mut lines = s.dropped_prompt_too_long;
            lines.sort_unstable();
            if let Some(first) = lines.first() {
                return Err(format!(
                    "{}:{first}: field `prompt` alone is longer than data.max_length = {} tokens \
                     ({} such line(s) in the {split} split: {:?}); raise data.max_length, set \
                     data.max_prompt_length to truncate prompts, or data.drop_long_prompts = \
                     true to skip them",
                    file.display(),
                    self.enc_cfg.max_length,
                    lines.len(),
                    lines
                )
                .into());
            }
        }
        Ok(())
    }

    /// Fingerprint of everything the base responses depend on (the reference log-probs add the
    /// encoding's lengths to it).
    fn fingerprint(&self) -> Result<Sha256, RunError> {
        let run = self.run;
        let mut h = Sha256::new();
        hash_path(&mut h, self.model_path)?;
        hash_path(&mut h, &run.data.train)?;
        if let Some(p) = &run.data.eval {
            hash_path(&mut h, p)?;
        }
        h.update(serde_json::to_vec(&run.data.users)?);
        h.update(
            self.template
                .render(&[bapo_data::Message::user("x")], true)?
                .as_bytes(),
        );
        h.update(serde_json::to_vec(self.template.kwargs())?);
        h.update(serde_json::to_vec(&run.anchor)?);
        // Base responses answer the prompt as the policy sees it (cut to max_prompt_length).
        h.update(serde_json::to_vec(&(
            run.data.max_prompt_length,
            &run.data.truncation_mode,
        ))?);
        h.update(run.train.seed.to_le_bytes());
        h.update(run.data.eval_fraction.to_le_bytes());
        Ok(h)
    }

    /// The reference's answers to every prompt (train first, then eval), from
    /// `anchors.cache.json` when it matches `fingerprint` and `numerics`, else generated and
    /// cached.
    #[allow(clippy::too_many_arguments)]
    fn anchors<B: burn::tensor::backend::Backend>(
        &self,
        reference: &Llama<B>,
        all: &[&PreferenceExample],
        n_train: usize,
        fingerprint: String,
        numerics: &Numerics,
        (eos_ids, context): (Vec<u32>, usize),
        device: &B::Device,
    ) -> Result<AnchorCache, RunError> {
        let path = self.run.output.dir.join("anchors.cache.json");
        let cached = read_cache::<AnchorCache>(&path, &fingerprint, numerics, |c| {
            (&c.fingerprint, &c.numerics)
        })
        .filter(|c| {
            if c.format != ANCHOR_CACHE_FORMAT {
                tracing::warn!(cache = %path.display(), "anchor cache predates format {ANCHOR_CACHE_FORMAT} (the reference's own token ids and EOS flags): rebuilding it");
            }
            c.format == ANCHOR_CACHE_FORMAT
                && c.bases.len() == all.len()
                && c.responses.len() == all.len()
        });
        if let Some(c) = cached {
            tracing::info!("reusing {} cached base responses", c.bases.len());
            return Ok(c);
        }
        let (bases, responses) = base_responses(
            reference,
            all,
            n_train,
            self.run,
            self.enc_cfg,
            (self.template, self.tok),
            eos_ids,
            context,
            device,
        )?;
        let c = AnchorCache {
            format: ANCHOR_CACHE_FORMAT,
            fingerprint,
            numerics: numerics.clone(),
            bases,
            responses,
        };
        write_atomic(&path, serde_json::to_string(&c)?.as_bytes())?;
        Ok(c)
    }

    /// Both splits tokenised with their base responses; drops and truncation logged.
    fn encode(
        &self,
        train_ex: &[PreferenceExample],
        eval_ex: &[PreferenceExample],
        anchors: &AnchorCache,
    ) -> Result<(Vec<EncodedExample>, Vec<EncodedExample>), RunError> {
        let encode = bapo_train::encoder(self.tok);
        let (train_bases, eval_bases) = anchors.responses.split_at(train_ex.len());
        let cut = anchors.cut_fraction(0..train_ex.len());
        if cut > 0.0 {
            tracing::info!(
                fraction = cut,
                max_new_tokens = self.run.anchor.max_new_tokens,
                "training base responses cut by anchor.max_new_tokens (scored without an EOS)"
            );
        }
        let (t, e) = (self.template, self.enc_cfg);
        let (train_enc, ts) =
            encode_examples(train_ex, Some(train_bases), t, &encode, self.eos, e)?;
        let (eval_enc, es) = encode_examples(eval_ex, Some(eval_bases), t, &encode, self.eos, e)?;
        for (split, s, file) in [
            ("train", &ts, &self.run.data.train),
            ("eval", &es, self.eval_file()),
        ] {
            if !s.dropped_prompt_too_long.is_empty() {
                tracing::warn!(split, file = %file.display(), dropped = s.dropped_prompt_too_long.len(), lines = ?s.dropped_prompt_too_long, max_length = e.max_length, "examples dropped: the prompt alone exceeds max_length");
            }
            if s.examples_truncated > 0 {
                tracing::info!(
                    split,
                    examples = s.examples_truncated,
                    prompt_tokens_cut = s.prompt_tokens_cut,
                    completion_tokens_cut = s.completion_tokens_cut,
                    "truncated"
                );
            }
        }
        if train_enc.is_empty() {
            return Err("no training examples left after truncation".into());
        }
        Ok((train_enc, eval_enc))
    }
}

/// The file the eval split's line numbers refer to: `data.eval`, else the training file.
fn eval_file(run: &RunConfig) -> &PathBuf {
    run.data.eval.as_ref().unwrap_or(&run.data.train)
}

/// `(file, line)` of each training line, then of each eval line: the key under which
/// [`Shared`] keeps an example's base response and reference log-probs.
fn split_keys(
    run: &RunConfig,
    train: impl Iterator<Item = usize>,
    eval: impl Iterator<Item = usize>,
) -> Vec<(PathBuf, usize)> {
    let (t, e) = (&run.data.train, eval_file(run));
    let train = train.map(|l| (t.clone(), l));
    train.chain(eval.map(|l| (e.clone(), l))).collect()
}

/// What one preparation over several users computed, by `(file, line)`: the base response
/// of each prompt and the reference's log-probs of each encoded example. A user's own
/// preparation looks its examples up here instead of generating and scoring them again.
pub(crate) struct Shared {
    numerics: Numerics,
    bases: std::collections::HashMap<(PathBuf, usize), (String, bapo_data::BaseResponse)>,
    refs: std::collections::HashMap<(PathBuf, usize), bapo_train::train::ReferenceLogps>,
}

impl Shared {
    /// From the preparation of `run` (whose `data.users` covers every user to be trained).
    pub(crate) fn of<B: AutodiffBackend>(run: &RunConfig, p: &Prepared<B>) -> Self {
        let examples = split_keys(
            run,
            p.train_ex.iter().map(|x| x.line),
            p.eval_ex.iter().map(|x| x.line),
        );
        let bases = examples
            .into_iter()
            .zip(
                p.anchors
                    .bases
                    .iter()
                    .cloned()
                    .zip(p.anchors.responses.iter().cloned()),
            )
            .collect();
        let enc = split_keys(
            run,
            p.train_enc.iter().map(|x| x.line),
            p.eval_enc.iter().map(|x| x.line),
        );
        let refs = enc
            .into_iter()
            .zip(p.refs.train.iter().chain(&p.refs.eval).cloned())
            .collect();
        Self {
            numerics: p.anchors.numerics.clone(),
            bases,
            refs,
        }
    }

    /// The reference's log-probs of the example at `file:line` (`None` if dropped).
    pub(crate) fn reference(
        &self,
        file: &Path,
        line: usize,
    ) -> Option<&bapo_train::train::ReferenceLogps> {
        self.refs.get(&(file.to_path_buf(), line))
    }

    /// The base response (text) to the prompt at `file:line`.
    pub(crate) fn base_text(&self, file: &Path, line: usize) -> Option<&str> {
        self.bases
            .get(&(file.to_path_buf(), line))
            .map(|(t, _)| t.as_str())
    }

    fn missing(key: &(PathBuf, usize)) -> RunError {
        format!(
            "{}:{}: not in the shared preparation (a different data file or settings?)",
            key.0.display(),
            key.1
        )
        .into()
    }

    fn check(&self, numerics: &Numerics) -> Result<(), RunError> {
        if self.numerics.backend != numerics.backend || self.numerics.logps != numerics.logps {
            return Err(format!(
                "the shared base responses were computed on {} ({}), this run is on {} ({})",
                self.numerics.backend, self.numerics.logps, numerics.backend, numerics.logps
            )
            .into());
        }
        Ok(())
    }

    fn anchors(
        &self,
        keys: &[(PathBuf, usize)],
        numerics: &Numerics,
    ) -> Result<AnchorCache, RunError> {
        self.check(numerics)?;
        let mut bases = Vec::with_capacity(keys.len());
        let mut responses = Vec::with_capacity(keys.len());
        for k in keys {
            let (b, r) = self.bases.get(k).ok_or_else(|| Self::missing(k))?;
            bases.push(b.clone());
            responses.push(r.clone());
        }
        Ok(AnchorCache {
            format: ANCHOR_CACHE_FORMAT,
            fingerprint: "shared".into(),
            numerics: self.numerics.clone(),
            bases,
            responses,
        })
    }

    fn refs(
        &self,
        (train_file, train_enc): (&Path, &[EncodedExample]),
        (eval_file, eval_enc): (&Path, &[EncodedExample]),
        numerics: &Numerics,
    ) -> Result<ReferenceCache, RunError> {
        self.check(numerics)?;
        let look = |file: &Path, enc: &[EncodedExample]| {
            enc.iter()
                .map(|x| {
                    let k = (file.to_path_buf(), x.line);
                    self.refs.get(&k).cloned().ok_or_else(|| Self::missing(&k))
                })
                .collect::<Result<Vec<_>, RunError>>()
        };
        Ok(ReferenceCache {
            fingerprint: "shared".into(),
            numerics: self.numerics.clone(),
            train: look(train_file, train_enc)?,
            eval: look(eval_file, eval_enc)?,
        })
    }
}

/// The reference's log-probs of every encoded example, from `reference_logps.cache.json` when
/// it matches, else computed and cached.
fn reference_cache<B: burn::tensor::backend::Backend>(
    run: &RunConfig,
    reference: &Llama<B>,
    (train_enc, eval_enc): (&[EncodedExample], &[EncodedExample]),
    eos: u32,
    fingerprint: String,
    numerics: &Numerics,
    device: &B::Device,
) -> Result<ReferenceCache, RunError> {
    let path = run.output.dir.join("reference_logps.cache.json");
    let cached = read_cache::<ReferenceCache>(&path, &fingerprint, numerics, |c| {
        (&c.fingerprint, &c.numerics)
    });
    if let Some(c) = cached {
        if c.train.len() == train_enc.len() && c.eval.len() == eval_enc.len() {
            return Ok(c);
        }
    }
    let pb = bar(train_enc.len() + eval_enc.len(), "reference log-probs");
    let bs = run.train.batch_size.max(1) * 2;
    let share = run.train.prompt_sharing;
    let train = reference_logps(reference, train_enc, bs, eos, share, device, |n| {
        pb.set_position(n as u64)
    });
    let eval = reference_logps(reference, eval_enc, bs, eos, share, device, |n| {
        pb.set_position((train_enc.len() + n) as u64)
    });
    pb.finish_and_clear();
    let c = ReferenceCache {
        fingerprint,
        numerics: numerics.clone(),
        train,
        eval,
    };
    write_atomic(&path, serde_json::to_string(&c)?.as_bytes())?;
    Ok(c)
}

/// `anchors.jsonl`: per training example its line, prompt, base response, token count, whether
/// the reference ended it with EOS, the scored ids and the reference's log-prob.
fn write_anchors_jsonl(
    out: &Path,
    train_ex: &[PreferenceExample],
    train_enc: &[EncodedExample],
    anchors: &AnchorCache,
    refs: &ReferenceCache,
) -> Result<(), RunError> {
    let mut lines = String::new();
    for (i, e) in train_enc.iter().enumerate() {
        // Dropped examples leave gaps, so find the source example (and its base) by line.
        let j = train_ex
            .iter()
            .position(|x| x.line == e.line)
            .expect("same data");
        let row = serde_json::json!({"line": e.line, "prompt": train_ex[j].prompt, "base": anchors.bases[j], "tokens": anchors.responses[j].ids.len(), "eos": anchors.responses[j].eos, "base_ids": e.base_ids, "reference_logp": refs.train[i].sum[2]});
        lines.push_str(&format!("{row}\n"));
    }
    write_atomic(&out.join("anchors.jsonl"), lines.as_bytes())?;
    Ok(())
}

/// Reads the preference data, keeps `data.users`, shuffles with the seed and splits off the
/// held-out examples (or reads `data.eval`): `(all, train, eval)`.
#[allow(clippy::type_complexity)]
pub(crate) fn split_data(
    run: &RunConfig,
) -> Result<
    (
        Vec<PreferenceExample>,
        Vec<PreferenceExample>,
        Vec<PreferenceExample>,
    ),
    RunError,
> {
    let keep = |mut v: Vec<PreferenceExample>, path: &Path| -> Result<_, RunError> {
        if let Some(users) = &run.data.users {
            v.retain(|e| e.user.as_ref().is_some_and(|u| users.contains(u)));
            if v.is_empty() {
                return Err(format!(
                    "{}: no pair has a `user` in data.users {users:?}",
                    path.display()
                )
                .into());
            }
        }
        Ok(v)
    };
    let mut examples = keep(read_preferences(&run.data.train)?, &run.data.train)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(run.train.seed);
    examples.shuffle(&mut rng);
    let (eval_ex, train_ex) = match &run.data.eval {
        Some(p) => (keep(read_preferences(p)?, p)?, examples.clone()),
        None => {
            let n_eval = ((examples.len() as f64) * run.data.eval_fraction).round() as usize;
            (examples[..n_eval].to_vec(), examples[n_eval..].to_vec())
        }
    };
    Ok((examples, train_ex, eval_ex))
}
