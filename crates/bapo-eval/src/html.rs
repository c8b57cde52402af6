//! `report.html`: the A/B report a person reads, made from `report.json`'s document alone (plus
//! the training figure's SVG when the run drew one). One self-contained file: inline CSS and
//! SVG, no script, no network. Every number is a `<td>` with `data-key` (its path in
//! report.json, `/`-joined) and `data-value` (the JSON number itself), so a test or a scraper
//! reads back exactly what report.json holds; the cell's text is the rounded view.

use serde_json::Value;

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:1100px;\
padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid \
#ccc;padding:3px 8px;vertical-align:top}td.n{text-align:right;font-variant-numeric:tabular-nums}\
th{background:#f3f3f3}.pass{color:#176b1f}.fail{color:#b00020;font-weight:bold}\
td.text{white-space:pre-wrap;max-width:34em}svg{max-width:100%;height:auto}";

/// A numeric cell: `data-key` = `key`, `data-value` = the JSON number, text rounded to 4 places
/// (`–` when absent).
fn num(key: &str, v: &Value) -> String {
    match v.as_f64() {
        Some(x) => format!(
            "<td class=\"n\" data-key=\"{}\" data-value=\"{v}\">{x:.4}</td>",
            esc(key)
        ),
        None => "<td class=\"n\">–</td>".into(),
    }
}

/// A 95 % interval cell from a `[lo, hi]` array.
fn ci(v: &Value) -> String {
    match (v[0].as_f64(), v[1].as_f64()) {
        (Some(a), Some(b)) => format!("<td class=\"n\">[{a:.3}, {b:.3}]</td>"),
        _ => "<td class=\"n\">–</td>".into(),
    }
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\
         <style>{STYLE}</style></head><body>\n{body}</body></html>\n",
        esc(title)
    )
}

/// The report page of one `bapo eval` document (`report.json`), with the training figure's SVG
/// text when there is one.
pub fn report_page(doc: &Value, figure_svg: Option<&str>) -> String {
    let adapter = doc["adapter"].as_str().unwrap_or("(base model only)");
    let mut b = format!(
        "<h1>bapo report</h1>\n<p>model <code>{}</code><br>adapter <code>{}</code></p>\n",
        esc(doc["model"].as_str().unwrap_or("?")),
        esc(adapter)
    );
    if let Some(g) = doc.get("gate").filter(|g| !g.is_null()) {
        b.push_str(&gate_section(g));
    }
    b.push_str("<h2>Held-out answers (greedy)</h2>\n");
    match doc["answers"].as_array().filter(|a| !a.is_empty()) {
        Some(answers) => {
            b.push_str("<table><tr><th>prompt</th><th>base model</th><th>personalised</th></tr>\n");
            for a in answers {
                let cell = |k: &str| {
                    format!(
                        "<td class=\"text\">{}</td>",
                        esc(a[k].as_str().unwrap_or("–"))
                    )
                };
                b.push_str(&format!(
                    "<tr>{}{}{}</tr>\n",
                    cell("prompt"),
                    cell("base"),
                    cell("policy")
                ));
            }
            b.push_str("</table>\n");
        }
        None => b.push_str("<p>none (eval.output_prompts = 0)</p>\n"),
    }
    b.push_str(
        "<h2>Knowledge (multiple choice)</h2>\n<table><tr><th>set / format</th><th>n</th>\
                <th>base acc</th><th>95% CI</th><th>personalised acc</th><th>95% CI</th>\
                <th>Δ acc</th><th>Δ gold margin</th></tr>\n",
    );
    if let Some(base) = doc["knowledge"]["base"].as_object() {
        for (k, s) in base {
            let p = &doc["knowledge"]["policy"][k];
            b.push_str(&format!(
                "<tr><td>{}</td>{}{}{}{}{}{}{}</tr>\n",
                esc(k),
                num(&format!("knowledge/base/{k}/n"), &s["n"]),
                num(&format!("knowledge/base/{k}/acc"), &s["acc"]),
                ci(&s["acc_ci95"]),
                num(&format!("knowledge/policy/{k}/acc"), &p["acc"]),
                ci(&p["acc_ci95"]),
                num(&format!("knowledge/policy/{k}/delta_acc"), &p["delta_acc"]),
                num(
                    &format!("knowledge/policy/{k}/delta_margin"),
                    &p["delta_margin"]
                ),
            ));
        }
    }
    b.push_str(
        "</table>\n<h2>Preference, drift and output metrics</h2>\n<table><tr>\
                <th>metric</th><th>base model</th><th>personalised</th></tr>\n",
    );
    if let Some(base) = doc["base"].as_object() {
        for (k, v) in base {
            b.push_str(&format!(
                "<tr><td>{}</td>{}{}</tr>\n",
                esc(k),
                num(&format!("base/{k}"), v),
                num(&format!("policy/{k}"), &doc["policy"][k])
            ));
        }
    }
    // Metrics only the personalised model has (weight distance, personalisation).
    if let Some(p) = doc["policy"].as_object() {
        for (k, v) in p
            .iter()
            .filter(|(k, _)| doc["base"].get(k.as_str()).is_none())
        {
            b.push_str(&format!(
                "<tr><td>{}</td><td class=\"n\">–</td>{}</tr>\n",
                esc(k),
                num(&format!("policy/{k}"), v)
            ));
        }
    }
    b.push_str("</table>\n");
    if let Some(svg) = figure_svg {
        b.push_str("<h2>Training</h2>\n");
        // The figure is our own plotters output; only its root element is embedded.
        let start = svg.find("<svg").unwrap_or(0);
        b.push_str(&svg[start..]);
        b.push('\n');
    }
    page(&format!("bapo report — {adapter}"), &b)
}

fn gate_section(g: &Value) -> String {
    let mut b = String::from("<h2>Retention gate</h2>\n");
    b.push_str(&format!(
        "<p>against {}: at most {} accuracy and {} nats of gold margin lost per set and format</p>\n",
        esc(g["against"].as_str().unwrap_or("?")),
        g["max_acc_drop"],
        g["max_margin_drop"]
    ));
    b.push_str(if g["pass"].as_bool() == Some(true) {
        "<p class=\"pass\">passed</p>\n"
    } else {
        "<p class=\"fail\">FAILED</p>\n"
    });
    if let Some(rows) = g["rows"].as_array() {
        b.push_str(
            "<table><tr><th>set / format</th><th>n</th><th>acc drop</th><th>margin drop</th>\
                    <th>lost</th><th>gained</th><th>McNemar p</th><th></th></tr>\n",
        );
        for (i, r) in rows.iter().enumerate() {
            let pass = r["pass"].as_bool().unwrap_or(false);
            b.push_str(&format!(
                "<tr><td>{}</td>{}{}{}{}{}{}<td class=\"{}\">{}</td></tr>\n",
                esc(r["key"].as_str().unwrap_or("?")),
                num(&format!("gate/rows/{i}/n"), &r["n"]),
                num(&format!("gate/rows/{i}/acc_drop"), &r["acc_drop"]),
                num(&format!("gate/rows/{i}/margin_drop"), &r["margin_drop"]),
                num(&format!("gate/rows/{i}/lost"), &r["lost"]),
                num(&format!("gate/rows/{i}/gained"), &r["gained"]),
                num(&format!("gate/rows/{i}/mcnemar_p"), &r["mcnemar_p"]),
                if pass { "pass" } else { "fail" },
                if pass { "pass" } else { "FAIL" },
            ));
        }
        b.push_str("</table>\n");
    }
    b
}

/// The index of a `--per-user` evaluation: one row per user, linking its page.
pub fn index_page(rows: &[Value], cols: &[(&str, &str)]) -> String {
    let mut b = String::from(
        "<h1>bapo report — every user</h1>\n<table><tr><th>user</th>\
                              <th>status</th>",
    );
    for (h, _) in cols {
        b.push_str(&format!("<th>{}</th>", esc(h)));
    }
    b.push_str("</tr>\n");
    for (i, r) in rows.iter().enumerate() {
        let user = r["user"].as_str().unwrap_or("?");
        b.push_str(&format!(
            "<tr><td><a href=\"users/{0}/report.html\">{0}</a></td><td>{1}</td>",
            esc(user),
            esc(r["status"].as_str().unwrap_or("?"))
        ));
        for (_, k) in cols {
            b.push_str(&num(&format!("users/{i}/metrics/{k}"), &r["metrics"][k]));
        }
        b.push_str("</tr>\n");
    }
    b.push_str("</table>\n");
    page("bapo report — every user", &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_numbers_carry_their_json_value() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        let doc = serde_json::json!({
            "model": "m", "adapter": "a<b>",
            "base": {"eval_kl/token": 0.0},
            "policy": {"eval_kl/token": 0.012345678901234, "eval_weight_distance": 1.5},
            "knowledge": {"base": {}, "policy": {}},
            "answers": [{"prompt": "user: 2<3?", "base": "yes & no", "policy": "yes"}],
            "gate": null,
        });
        let html = report_page(&doc, None);
        assert!(
            html.contains("a&lt;b&gt;")
                && html.contains("2&lt;3?")
                && html.contains("yes &amp; no")
        );
        assert!(html.contains(
            "data-key=\"policy/eval_kl/token\" data-value=\"0.012345678901234\">0.0123<"
        ));
        assert!(html.contains("data-key=\"policy/eval_weight_distance\""));
        assert!(!html.contains("<script"));
    }
}
