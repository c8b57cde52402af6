//! The chat templates real checkpoints ship (tests/fixtures/templates), rendered by bapo and
//! compared byte for byte with transformers' `apply_chat_template` (expected.json, made by
//! tests/fixtures/templates/make_expected.py).

use std::path::PathBuf;

use bapo_data::{ChatTemplate, Message, TemplateKwargs};
use serde::Deserialize;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/templates")
}

#[derive(Deserialize)]
struct Expected {
    conversations: std::collections::BTreeMap<String, Vec<Message>>,
    renderings: Vec<Rendering>,
}

#[derive(Deserialize)]
struct Rendering {
    template: String,
    conversation: String,
    add_generation_prompt: bool,
    kwargs: TemplateKwargs,
    special_tokens: std::collections::BTreeMap<String, String>,
    /// Tool schemas, passed as the `tools` variable.
    #[serde(default)]
    tools: Option<Value>,
    text: Option<String>,
    error: Option<String>,
}

fn expected() -> Expected {
    let p = fixtures().join("expected.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The template `name` with the special tokens and arguments of one case.
fn template(
    name: &str,
    special: &std::collections::BTreeMap<String, String>,
    kwargs: &TemplateKwargs,
) -> ChatTemplate {
    let p = fixtures().join(format!("{name}.jinja"));
    let src = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut t = ChatTemplate::new(Some(src), None, None);
    for (k, v) in special {
        t = t.with_special(k, Some(v.clone()));
    }
    t.with_kwargs(kwargs.clone())
}

/// Replaces `\0TODAY:<format>\0` markers by today's date in that format.
fn with_today(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("\0TODAY:") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 7..];
        let end = after.find('\0').expect("closed TODAY marker");
        out.push_str(&jiff::Zoned::now().strftime(&after[..end]).to_string());
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

fn first_difference(a: &str, b: &str) -> String {
    let i = a
        .char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map(|((i, _), _)| i)
        .unwrap_or(a.len().min(b.len()));
    let ctx = |s: &str| {
        s[s.floor_char_boundary(i.saturating_sub(30))..s.ceil_char_boundary((i + 30).min(s.len()))]
            .to_string()
    };
    format!("at byte {i}: bapo {:?} / transformers {:?}", ctx(a), ctx(b))
}

#[test]
fn real_chat_templates_render_as_transformers() {
    let exp = expected();
    let mut failures = Vec::new();
    let mut per_template: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for r in &exp.renderings {
        let conv = &exp.conversations[&r.conversation];
        let mut kwargs = r.kwargs.clone();
        if let Some(tools) = &r.tools {
            kwargs.insert("tools".into(), tools.clone());
        }
        let t = template(&r.template, &r.special_tokens, &kwargs);
        let got = t.render(conv, r.add_generation_prompt);
        let case = format!(
            "{} / {}{} / gen {} / {}",
            r.template,
            r.conversation,
            if r.tools.is_some() { " + tools" } else { "" },
            r.add_generation_prompt,
            Value::Object(r.kwargs.clone())
        );
        let ok = match (&got, &r.text, &r.error) {
            (Ok(g), Some(want), _) => {
                let want = with_today(want);
                if *g == want {
                    true
                } else {
                    failures.push(format!("{case}: {}", first_difference(g, &want)));
                    false
                }
            }
            (Err(e), None, Some(want)) => {
                // The template's own message (raise_exception) reaches the user.
                let msg = want.split_once(": ").map_or(want.as_str(), |(_, m)| m);
                let ok = e.to_string().contains(msg);
                if !ok {
                    failures.push(format!("{case}: error {e} lacks {msg:?}"));
                }
                ok
            }
            (Ok(_), None, Some(want)) => {
                failures.push(format!("{case}: rendered, transformers raised {want}"));
                false
            }
            (Err(e), _, _) => {
                failures.push(format!("{case}: {e:#}"));
                false
            }
            (Ok(_), None, None) => panic!("{case}: expected.json has neither text nor error"),
        };
        let e = per_template.entry(&r.template).or_default();
        e.0 += usize::from(ok);
        e.1 += 1;
    }
    for (t, (ok, n)) in &per_template {
        eprintln!("{t}: {ok}/{n} equal");
    }
    assert!(
        failures.is_empty(),
        "{} of {} renderings differ from transformers:\n{}",
        failures.len(),
        exp.renderings.len(),
        failures.join("\n")
    );
}

#[test]
fn an_unsupported_construct_is_named() {
    let t = ChatTemplate::new(
        Some("{% for m in messages %}{{ m.content | wordwrap_python(3) }}{% endfor %}".into()),
        None,
        None,
    );
    let err = t.render(&[Message::user("x")], true).unwrap_err();
    assert!(err.to_string().contains("wordwrap_python"), "{err}");
    let t = ChatTemplate::new(
        Some("{{ messages[0].content.zfill(5) }}".into()),
        None,
        None,
    );
    let err = t.render(&[Message::user("x")], true).unwrap_err();
    assert!(err.to_string().contains("zfill"), "{err}");
}

#[derive(Deserialize)]
struct TrlFile {
    pairs: std::collections::BTreeMap<String, TrlPair>,
    trl: Vec<TrlCase>,
}

#[derive(Deserialize)]
struct TrlPair {
    prompt: Vec<Message>,
    chosen: Vec<Message>,
    rejected: Vec<Message>,
}

#[derive(Deserialize)]
struct TrlCase {
    template: String,
    pair: String,
    kwargs: TemplateKwargs,
    special_tokens: std::collections::BTreeMap<String, String>,
    prompt: Option<String>,
    chosen: Option<String>,
    rejected: Option<String>,
    error: Option<String>,
}

#[test]
fn conversational_pairs_split_as_trl_does() {
    let p = fixtures().join("expected.json");
    let file: TrlFile = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let mut failures = Vec::new();
    let mut equal = 0;
    for c in &file.trl {
        let pair = &file.pairs[&c.pair];
        let t = template(&c.template, &c.special_tokens, &c.kwargs);
        let case = format!(
            "{} / {} / {}",
            c.template,
            c.pair,
            Value::Object(c.kwargs.clone())
        );
        let got = t.pair_texts(
            &pair.prompt,
            &pair.chosen[0].content,
            &pair.rejected[0].content,
        );
        match (got, &c.error) {
            (Ok(g), None) => {
                let want = (
                    with_today(c.prompt.as_deref().unwrap()),
                    with_today(c.chosen.as_deref().unwrap()),
                    with_today(c.rejected.as_deref().unwrap()),
                );
                if (g.prompt.clone(), g.chosen.clone(), g.rejected.clone()) == want {
                    assert!(g.generation_prompt.starts_with(&g.prompt), "{case}");
                    equal += 1;
                } else {
                    failures.push(format!("{case}: bapo {g:?}, TRL {want:?}"));
                }
            }
            (Err(_), Some(_)) => equal += 1,
            (Ok(_), Some(e)) => failures.push(format!("{case}: rendered, TRL raised {e}")),
            (Err(e), None) => failures.push(format!("{case}: {e:#}")),
        }
    }
    eprintln!("{equal}/{} TRL pairs equal", file.trl.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
