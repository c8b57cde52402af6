//! Preference JSONL (both TRL shapes), every error case, truncation and collation.

use std::path::PathBuf;

use bapo_data::{
    encode_examples, read_preferences, BaseResponse, ChatTemplate, EncodeConfig, EncodedExample,
    Message, PreferenceBatch, TruncationMode,
};

fn write(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bapo-pref-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("prefs.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

/// Byte tokenizer with two specials: `<s>` = 1, `</s>` = 2; other bytes are `byte + 10`.
fn encode(text: &str) -> Result<Vec<u32>, String> {
    let mut ids = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("<s>") {
            ids.push(1);
            rest = r;
        } else if let Some(r) = rest.strip_prefix("</s>") {
            ids.push(2);
            rest = r;
        } else {
            let c = rest.chars().next().unwrap();
            ids.extend(c.to_string().bytes().map(|b| b as u32 + 10));
            rest = &rest[c.len_utf8()..];
        }
    }
    Ok(ids)
}

#[test]
fn reads_both_trl_shapes_and_users() {
    let p = write(
        "ok",
        concat!(
            r#"{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away.", "user": "alice"}"#,
            "\n",
            r#"{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}], "chosen": [{"role": "assistant", "content": "Yes"}], "rejected": [{"role": "assistant", "content": "No"}], "persona": "bob"}"#,
            "\n"
        ),
    );
    let ex = read_preferences(&p).unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].prompt, vec![Message::user("Hi?")]);
    assert_eq!(ex[0].user.as_deref(), Some("alice"));
    assert_eq!(ex[1].prompt.len(), 4);
    assert_eq!(
        (
            ex[1].chosen.as_str(),
            ex[1].rejected.as_str(),
            ex[1].user.as_deref()
        ),
        ("Yes", "No", Some("bob"))
    );
}

#[test]
fn every_malformed_line_names_file_line_and_field() {
    let ok = r#"{"prompt": "p", "chosen": "c", "rejected": "r"}"#;
    let cases = [
        (r#"{"prompt": "p", "chosen": "c""#, "invalid JSON"),
        (r#"["prompt"]"#, "expected a JSON object"),
        (r#"{"chosen": "c", "rejected": "r"}"#, "`prompt` is missing"),
        (
            r#"{"prompt": 5, "chosen": "c", "rejected": "r"}"#,
            "`prompt` must be a string or a message list, found a number",
        ),
        (
            r#"{"prompt": "p", "chosen": null, "rejected": "r"}"#,
            "`chosen` must be a string or a message list, found null",
        ),
        (r#"{"prompt": "p", "chosen": "c"}"#, "`rejected` is missing"),
        (
            r#"{"prompt": "p", "chosen": "  ", "rejected": "r"}"#,
            "`chosen` is empty",
        ),
        (
            r#"{"prompt": "p", "chosen": "same", "rejected": "same"}"#,
            "identical",
        ),
        (
            r#"{"prompt": [{"role": "assistant", "content": "x"}], "chosen": "c", "rejected": "r"}"#,
            "`prompt[0].role` is `assistant` but `user` was expected",
        ),
        (
            r#"{"prompt": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "chosen": "c", "rejected": "r"}"#,
            "`prompt[1].role` is `user` but `assistant` was expected",
        ),
        (
            r#"{"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "chosen": "c", "rejected": "r"}"#,
            "must end with a user message",
        ),
        (
            r#"{"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}"#,
            "`prompt[0].content` is missing",
        ),
        (
            r#"{"prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"}"#,
            "`chosen[0].role` must be `assistant`",
        ),
        (
            r#"{"prompt": "p", "chosen": [], "rejected": "r"}"#,
            "exactly one assistant message, found 0",
        ),
        (
            r#"{"prompt": "p", "chosen": "c", "rejected": "r", "user": 3}"#,
            "`user` must be a string",
        ),
    ];
    for (bad, want) in cases {
        let p = write("bad", &format!("{ok}\n\n{bad}\n"));
        let e = read_preferences(&p).unwrap_err().to_string();
        assert!(
            e.contains("prefs.jsonl:3:") && e.contains(want),
            "{bad}\n  gave: {e}\n  wanted: {want}"
        );
    }
}

fn template() -> ChatTemplate {
    let src = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}";
    ChatTemplate::new(Some(src.into()), Some("<s>".into()), Some("</s>".into()))
}

#[test]
fn no_duplicated_bos_or_eos() {
    let ex = read_preferences(&write(
        "bos",
        "{\"prompt\": \"hi\", \"chosen\": \"ok</s>\", \"rejected\": \"no\"}\n",
    ))
    .unwrap();
    let cfg = EncodeConfig {
        max_length: 100,
        max_prompt_length: None,
        truncation_mode: TruncationMode::KeepEnd,
    };
    let (enc, _) = encode_examples(&ex, None, &template(), &encode, 2, &cfg).unwrap();
    let e = &enc[0];
    assert_eq!(
        e.prompt_ids.iter().filter(|&&t| t == 1).count(),
        1,
        "one BOS, from the template"
    );
    assert_eq!(e.prompt_ids[0], 1);
    // "ok</s>" already ends with EOS: not doubled; "no" gets one.
    assert_eq!(e.chosen_ids, vec![b'o' as u32 + 10, b'k' as u32 + 10, 2]);
    assert_eq!(e.rejected_ids, vec![b'n' as u32 + 10, b'o' as u32 + 10, 2]);
}

#[test]
fn truncation_is_counted_and_long_prompts_dropped() {
    let lines = [
        r#"{"prompt": "short", "chosen": "a fairly long chosen answer", "rejected": "no"}"#,
        r#"{"prompt": "this prompt is far too long for the limit", "chosen": "c", "rejected": "r"}"#,
    ];
    let ex = read_preferences(&write("trunc", &lines.join("\n"))).unwrap();
    let t = template();
    let plen = encode(&t.render(&ex[0].prompt, true).unwrap())
        .unwrap()
        .len(); // <s>[user]short</s>[assistant]
    let cfg = EncodeConfig {
        max_length: plen + 5,
        max_prompt_length: None,
        truncation_mode: TruncationMode::KeepEnd,
    };
    let bases = vec![
        BaseResponse::from_text(&encode, "base one", 2, 1).unwrap(),
        BaseResponse::from_text(&encode, "b", 2, 2).unwrap(),
    ];
    let (enc, stats) = encode_examples(&ex, Some(&bases), &t, &encode, 2, &cfg).unwrap();
    assert_eq!(enc.len(), 1);
    assert_eq!(stats.dropped_prompt_too_long, vec![2]);
    assert_eq!(stats.examples_truncated, 1);
    // chosen: 27 chars + EOS = 28 → 5 kept; base: 8 + 1 = 9 → 5 kept; rejected "no" + EOS fits.
    assert_eq!(stats.completion_tokens_cut, (28 - 5) + (9 - 5));
    assert_eq!(enc[0].chosen_ids.len(), 5);
    assert_eq!(enc[0].rejected_ids.len(), 3);
    // max_prompt_length with both modes.
    for (mode, first) in [
        (TruncationMode::KeepEnd, false),
        (TruncationMode::KeepStart, true),
    ] {
        let cfg = EncodeConfig {
            max_length: 1000,
            max_prompt_length: Some(6),
            truncation_mode: mode,
        };
        let (enc, stats) = encode_examples(&ex, None, &t, &encode, 2, &cfg).unwrap();
        assert_eq!(enc[1].prompt_ids.len(), 6);
        assert_eq!(enc[1].prompt_ids[0] == 1, first, "{mode:?}");
        assert!(stats.prompt_tokens_cut > 0);
    }
    // A base response the reference finished ends on EOS; one cut by `max_new_tokens` is scored
    // as exactly the reference's ids, with no EOS it never emitted.
    let cut = BaseResponse {
        ids: vec![5, 6, 7],
        eos: false,
    };
    let bases = vec![bases[0].clone(), cut];
    let cfg = EncodeConfig {
        max_length: 1000,
        max_prompt_length: None,
        truncation_mode: TruncationMode::KeepEnd,
    };
    let (enc, _) = encode_examples(&ex, Some(&bases), &t, &encode, 2, &cfg).unwrap();
    let finished = enc[0].base_ids.as_ref().unwrap();
    assert_eq!((finished.len(), finished.last()), (9, Some(&2)));
    assert_eq!(enc[1].base_ids.as_deref(), Some(&[5, 6, 7][..]));
}

#[test]
fn collate_orders_chosen_rejected_base_with_masks() {
    let a = EncodedExample {
        prompt_ids: vec![5, 6],
        chosen_ids: vec![7, 2],
        rejected_ids: vec![8, 9, 2],
        base_ids: Some(vec![2]),
        line: 1,
    };
    let b = EncodedExample {
        prompt_ids: vec![5],
        chosen_ids: vec![3, 2],
        rejected_ids: vec![2],
        base_ids: Some(vec![4, 2]),
        line: 2,
    };
    let batch = PreferenceBatch::collate(&[&a, &b], 0);
    assert_eq!(
        (batch.rows, batch.len, batch.pairs, batch.has_base),
        (6, 5, 2, true)
    );
    let row = |r: usize| &batch.tokens[r * 5..(r + 1) * 5];
    assert_eq!(row(0), [5, 6, 7, 2, 0]); // chosen a
    assert_eq!(row(1), [5, 3, 2, 0, 0]); // chosen b
    assert_eq!(row(2), [5, 6, 8, 9, 2]); // rejected a
    assert_eq!(row(4), [5, 6, 2, 0, 0]); // base a
    assert_eq!(&batch.completion_mask[0..5], [0.0, 0.0, 1.0, 1.0, 0.0]);
    assert_eq!(&batch.attention[5..10], [true, true, true, false, false]);
    let no_base = EncodedExample {
        base_ids: None,
        ..b.clone()
    };
    assert!(!PreferenceBatch::collate(&[&a, &no_base], 0).has_base);
}

fn decode(ids: &[u32]) -> String {
    ids.iter()
        .map(|&t| match t {
            1 => "<s>".to_string(),
            2 => "</s>".to_string(),
            t => char::from_u32(t - 10).unwrap().to_string(),
        })
        .collect()
}

/// A conversational pair is cut as TRL cuts it: Qwen3's real template puts an empty think block
/// and `<|im_end|>\n` in the completion, no EOS is appended, and base responses (generated
/// after the full generation prompt) keep what the generation prompt adds to the shared one.
#[test]
fn conversational_pairs_take_the_template_turn_as_completion() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/templates/Qwen-Qwen3-0.6B.jinja");
    let qwen3 = ChatTemplate::new(
        Some(std::fs::read_to_string(p).unwrap()),
        None,
        Some("<|im_end|>".into()),
    );
    let ex = read_preferences(&write(
        "conv",
        concat!(
            r#"{"prompt": [{"role": "user", "content": "Capital of France?"}], "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": [{"role": "assistant", "content": "Lyon."}]}"#,
            "\n",
            r#"{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}"#,
            "\n"
        ),
    ))
    .unwrap();
    assert!(ex[0].conversational && !ex[1].conversational);
    let cfg = EncodeConfig {
        max_length: 200,
        max_prompt_length: None,
        truncation_mode: TruncationMode::KeepEnd,
    };
    let base = BaseResponse::from_text(&encode, "Paris", 2, 1).unwrap();
    let bases = [base.clone(), base];
    let mut kwargs = bapo_data::TemplateKwargs::new();
    for thinking in [None, Some(false)] {
        if let Some(t) = thinking {
            kwargs.insert("enable_thinking".into(), t.into());
        }
        let t = qwen3.clone().with_kwargs(kwargs.clone());
        let (enc, _) = encode_examples(&ex, Some(&bases), &t, &encode, 2, &cfg).unwrap();
        let (conv, std) = (&enc[0], &enc[1]);
        let think = "<think>\n\n</think>\n\n";
        let prompt = "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n";
        match thinking {
            // Thinking on: the generation prompt stops before the think block the history
            // rendering writes, so the block is the completion's.
            None => {
                assert_eq!(decode(&conv.prompt_ids), prompt);
                assert_eq!(
                    decode(&conv.chosen_ids),
                    format!("{think}Paris.<|im_end|>\n")
                );
                assert_eq!(decode(conv.base_ids.as_ref().unwrap()), "Paris</s>");
            }
            // Thinking off: the generation prompt ends with the block, so the prompt does.
            Some(_) => {
                assert_eq!(decode(&conv.prompt_ids), format!("{prompt}{think}"));
                assert_eq!(decode(&conv.chosen_ids), "Paris.<|im_end|>\n");
                assert_eq!(decode(&conv.rejected_ids), "Lyon.<|im_end|>\n");
            }
        }
        // The standard pair keeps TRL's rule for plain text: the text, then EOS.
        assert_eq!(decode(&std.chosen_ids), "Paris.</s>");
        assert_eq!(decode(&std.prompt_ids), decode(&conv.prompt_ids));
    }
}
