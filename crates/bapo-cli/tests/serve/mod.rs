//! `bapo serve` over HTTP: adapters per user, streaming, stop strings, batching, the API key,
//! and bad input under load (every malformed request a 4xx JSON error, the server stays up).

use std::path::Path;
use std::process::Command;

use crate::common::{bapo, root};
use crate::{fresh_dir, persona_config};

/// `bapo serve` as a child process on a free port; killed on drop.
struct Server {
    child: std::process::Child,
    url: String,
}

impl Server {
    fn start(model: &Path, adapters: &Path) -> Self {
        Self::start_with(model, adapters, &[])
    }

    /// With extra environment variables (`BAPO_API_KEY`).
    fn start_with(model: &Path, adapters: &Path, env: &[(&str, &str)]) -> Self {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_bapo"))
            .args(["serve", "--port", "0", "--model"])
            .arg(model)
            .arg("--adapters")
            .arg(adapters)
            .envs(env.iter().copied())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let url = loop {
            let line = lines.next().expect("server exited").unwrap();
            if let Some(u) = line.split("listening on ").nth(1) {
                break u.trim().to_string();
            }
        };
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self { child, url }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client that reports every status as a response and gives up after a minute (a request
/// that hangs fails the test instead of stalling it).
fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(60)))
        .build()
        .into()
}

/// POSTs `body` to the chat endpoint: status and body text.
fn post_chat(url: &str, body: &str) -> (u16, String) {
    let mut res = http()
        .post(&format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    (
        res.status().as_u16(),
        res.body_mut().read_to_string().unwrap(),
    )
}

fn chat_body(model: &str, prompt: &str, extra: &str) -> String {
    format!(
        r#"{{"model": "{model}", "messages": [{{"role": "user", "content": {}}}], "temperature": 0, "max_tokens": 12{extra}}}"#,
        serde_json::json!(prompt)
    )
}

/// The `content` of a non-streamed answer.
fn content(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A streamed answer's `data:` documents, reassembled: text, finish reason, `[DONE]` last.
fn reassemble(body: &str) -> (String, String) {
    let datas: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .collect();
    assert_eq!(datas.last(), Some(&"[DONE]"), "{body}");
    let (mut text, mut finish) = (String::new(), String::new());
    for d in &datas[..datas.len() - 1] {
        let v: serde_json::Value = serde_json::from_str(d).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        text.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish)
}

#[test]
fn serve_answers_each_user_with_their_adapter_over_http() {
    let dir = fresh_dir("bapo-serve");
    let (_, cfg) = persona_config(
        &dir,
        &["concise", "child"],
        &[
            ("learning_rate = 1e-2", "learning_rate = 5e-2"),
            ("max_steps = 3", "max_steps = 6"),
        ],
    );
    let res = bapo(&["train", "--config", cfg.to_str().unwrap(), "--per-user"]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let (model, run) = (root().join("tests/fixtures/tiny-llama"), dir.join("run"));
    let server = Server::start(&model, &run);
    let url = server.url.clone();

    let mut res = http().get(&format!("{url}/health")).call().unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert!(res.body_mut().read_to_string().unwrap().contains("ok"));
    let mut res = http().get(&format!("{url}/v1/models")).call().unwrap();
    let models: serde_json::Value =
        serde_json::from_str(&res.body_mut().read_to_string().unwrap()).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["bapo/base", "bapo/child", "bapo/concise"]);

    // Each user's answer is `bapo generate --adapter`'s, and the users' answers differ.
    let prompt = "Why is the sky blue?";
    let mut answers = std::collections::BTreeMap::new();
    for user in ["base", "child", "concise"] {
        let (status, body) = post_chat(&url, &chat_body(&format!("bapo/{user}"), prompt, ""));
        assert_eq!(status, 200, "{body}");
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["model"], format!("bapo/{user}"));
        assert_eq!(doc["usage"]["completion_tokens"], 12, "{body}");
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            prompt,
        ];
        let adapter = run.join("users").join(user).join("adapter");
        if user != "base" {
            args.extend(["--adapter", adapter.to_str().unwrap()]);
        }
        args.extend(["--max-new-tokens", "12"]);
        let out = bapo(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        assert_eq!(
            content(&body),
            line["completion"].as_str().unwrap(),
            "{user}"
        );
        answers.insert(user, content(&body));
    }
    assert_ne!(answers["child"], answers["concise"]);
    // The `user` field selects the adapter too.
    let by_field = post_chat(&url, &chat_body("any", prompt, r#", "user": "child""#));
    assert_eq!(content(&by_field.1), answers["child"]);

    // Streaming reassembles to the same answer; a stop string cuts both the same way.
    let (status, body) = post_chat(
        &url,
        &chat_body("bapo/child", prompt, r#", "stream": true"#),
    );
    assert_eq!(status, 200);
    assert_eq!(
        reassemble(&body),
        (answers["child"].clone(), "length".into())
    );
    let whole = &answers["concise"];
    let cut = whole
        .char_indices()
        .nth(whole.chars().count() / 2)
        .unwrap()
        .0;
    let stop = whole[cut..].chars().take(2).collect::<String>();
    let want = &whole[..whole.find(&stop).unwrap()];
    let extra = format!(r#", "stop": [{}]"#, serde_json::json!(stop));
    let (_, body) = post_chat(&url, &chat_body("bapo/concise", prompt, &extra));
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            content(&body).as_str(),
            doc["choices"][0]["finish_reason"].as_str()
        ),
        (want, Some("stop"))
    );
    let (_, body) = post_chat(
        &url,
        &chat_body(
            "bapo/concise",
            prompt,
            &format!("{extra}, \"stream\": true"),
        ),
    );
    assert_eq!(reassemble(&body), (want.to_string(), "stop".into()));

    // Concurrent requests (batched by adapter) give the sequential answers.
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let url = url.clone();
            let user = ["child", "concise", "base"][i % 3];
            let body = chat_body(&format!("bapo/{user}"), prompt, "");
            std::thread::spawn(move || (user, post_chat(&url, &body)))
        })
        .collect();
    for h in handles {
        let (user, (status, body)) = h.join().unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(content(&body), answers[user], "{user} under concurrency");
    }

    // Bad requests: OpenAI's error shape, the server stays up.
    for (body, status, want) in [
        ("{not json".to_string(), 400, "invalid_request_error"),
        (chat_body("bapo/nobody", prompt, ""), 404, "model_not_found"),
        (chat_body("bapo/../x", prompt, ""), 404, "model_not_found"),
        (
            chat_body("bapo/child", prompt, "")
                .replace("\"max_tokens\": 12", "\"max_tokens\": 100000"),
            400,
            "context_length_exceeded",
        ),
        (
            r#"{"model": "bapo/child", "messages": []}"#.to_string(),
            400,
            "messages",
        ),
    ] {
        let (s, b) = post_chat(&url, &body);
        assert_eq!(s, status, "{body}: {b}");
        let e: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert!(e["error"]["message"].is_string(), "{b}");
        assert!(b.contains(want), "{b}");
    }

    // Ctrl-C drains: a request in flight is answered, then the server exits 0.
    let long =
        chat_body("bapo/base", prompt, "").replace("\"max_tokens\": 12", "\"max_tokens\": 200");
    let u = url.clone();
    let inflight = std::thread::spawn(move || post_chat(&u, &long));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut server = server;
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let (s, b) = inflight.join().unwrap();
    assert_eq!(s, 200, "{b}");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends `body` to `path` with `method` and an optional `Authorization` header: status, body.
fn request(url: &str, method: &str, path: &str, auth: Option<&str>, body: &[u8]) -> (u16, String) {
    try_request(url, method, path, auth, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// [`request`], with a transport error returned instead of a panic.
fn try_request(
    url: &str,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &[u8],
) -> Result<(u16, String), ureq::Error> {
    let agent = http();
    let uri = format!("{url}{path}");
    let res = match method {
        "GET" => {
            let mut r = agent.get(&uri);
            if let Some(a) = auth {
                r = r.header("authorization", a);
            }
            r.call()
        }
        _ => {
            let mut r = agent.post(&uri).header("content-type", "application/json");
            if let Some(a) = auth {
                r = r.header("authorization", a);
            }
            r.send(body)
        }
    };
    let mut res = res?;
    let status = res.status().as_u16();
    let text = res
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .unwrap_or_default();
    Ok((status, text))
}

/// OpenAI's error document, checked: `error.message` a string, `error.type` one of its kinds.
fn error_doc(body: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    assert!(v["error"]["message"].is_string(), "{body}");
    assert!(v["error"]["type"].is_string(), "{body}");
    v
}

#[test]
fn serve_requires_its_key_and_answers_bad_input_with_4xx_under_load() {
    let dir = fresh_dir("bapo-serve-key");
    let adapters = dir.join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    let model = root().join("tests/fixtures/tiny-llama");
    let key = "sk-bapo-test-4f1c";
    let server = Server::start_with(&model, &adapters, &[("BAPO_API_KEY", key)]);
    let url = server.url.clone();
    let bearer = format!("Bearer {key}");
    let good = chat_body("bapo/base", "Why is the sky blue?", "");

    // `/health` is open; everything else needs the key, in OpenAI's 401 shape.
    assert_eq!(request(&url, "GET", "/health", None, b"").0, 200);
    for auth in [
        None,
        Some("Bearer wrong"),
        Some(&bearer[..bearer.len() - 1]),
        Some(key),
    ] {
        for (method, path) in [
            ("GET", "/v1/models"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/nothing"),
        ] {
            let (status, body) = request(&url, method, path, auth, good.as_bytes());
            assert_eq!(status, 401, "{method} {path} with {auth:?}: {body}");
            let e = error_doc(&body);
            assert_eq!(e["error"]["code"], "invalid_api_key", "{body}");
        }
    }
    let (status, body) = request(&url, "GET", "/v1/models", Some(&bearer), b"");
    assert_eq!(status, 200, "{body}");
    let (status, alone) = request(
        &url,
        "POST",
        "/v1/chat/completions",
        Some(&bearer),
        good.as_bytes(),
    );
    assert_eq!(status, 200, "{alone}");

    // Bad input: every request a 4xx JSON error, fired all at once beside good requests.
    let with = |extra: &str| chat_body("bapo/base", "Hi", extra).into_bytes();
    let replace = |from: &str, to: &str| {
        chat_body("bapo/base", "Hi", "")
            .replace(from, to)
            .into_bytes()
    };
    let long = "word ".repeat(2000);
    let mut huge = br#"{"model": "bapo/base", "messages": [{"role": "user", "content": ""#.to_vec();
    huge.extend(std::iter::repeat_n(b'x', 3 << 20));
    huge.extend(br#""}]}"#);
    let bad: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        ("POST", "empty body", vec![], 400),
        ("POST", "invalid UTF-8", b"{\"model\": \"bapo/base\", \"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}".to_vec(), 400),
        ("POST", "an array", b"[]".to_vec(), 400),
        ("POST", "a number", b"12".to_vec(), 400),
        ("POST", "null", b"null".to_vec(), 400),
        ("POST", "nested 10k deep", "[".repeat(10_000).into_bytes(), 400),
        ("POST", "messages a string", br#"{"model": "bapo/base", "messages": "hi"}"#.to_vec(), 400),
        ("POST", "content a number", br#"{"model": "bapo/base", "messages": [{"role": "user", "content": 5}]}"#.to_vec(), 400),
        ("POST", "message not an object", br#"{"model": "bapo/base", "messages": [7]}"#.to_vec(), 400),
        ("POST", "unknown role", replace("\"role\": \"user\"", "\"role\": \"robot\""), 400),
        ("POST", "model a number", replace("\"model\": \"bapo/base\"", "\"model\": 5"), 400),
        ("POST", "negative max_tokens", replace("\"max_tokens\": 12", "\"max_tokens\": -5"), 400),
        ("POST", "fractional max_tokens", replace("\"max_tokens\": 12", "\"max_tokens\": 2.5"), 400),
        ("POST", "max_tokens 1e300", replace("\"max_tokens\": 12", "\"max_tokens\": 1e300"), 400),
        ("POST", "max_tokens a string", replace("\"max_tokens\": 12", "\"max_tokens\": \"ten\""), 400),
        ("POST", "temperature -1", replace("\"temperature\": 0", "\"temperature\": -1"), 400),
        ("POST", "temperature 2.5", replace("\"temperature\": 0", "\"temperature\": 2.5"), 400),
        ("POST", "temperature a string", replace("\"temperature\": 0", "\"temperature\": \"hot\""), 400),
        ("POST", "top_p 0", with(r#", "top_p": 0"#), 400),
        ("POST", "top_p 1.5", with(r#", "top_p": 1.5"#), 400),
        ("POST", "seed -1", with(r#", "seed": -1"#), 400),
        ("POST", "n 3", with(r#", "n": 3"#), 400),
        ("POST", "stream a string", with(r#", "stream": "yes""#), 400),
        ("POST", "stop of numbers", with(r#", "stop": [1]"#), 400),
        ("POST", "five stops", with(r#", "stop": ["a", "b", "c", "d", "e"]"#), 400),
        ("POST", "empty stop", with(r#", "stop": """#), 400),
        ("POST", "prompt beyond the context", chat_body("bapo/base", &long, "").into_bytes(), 400),
        ("POST", "3 MiB body", huge, 413),
        ("POST", "no such user", chat_body("bapo/nobody", "Hi", "").into_bytes(), 404),
        ("GET", "wrong method", vec![], 405),
    ];
    let prompts = [
        "Why is the sky blue?",
        "Name a colour.",
        "What is 2 + 2?",
        "Say hello.",
    ];
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            let (s, b) = request(
                &url,
                "POST",
                "/v1/chat/completions",
                Some(&bearer),
                chat_body("bapo/base", p, "").as_bytes(),
            );
            assert_eq!(s, 200, "{b}");
            content(&b)
        })
        .collect();
    let mut handles = Vec::new();
    for round in 0..2 {
        for (method, what, body, want) in bad.clone() {
            let (url, bearer) = (url.clone(), bearer.clone());
            handles.push(std::thread::spawn(move || {
                let sent = try_request(&url, method, "/v1/chat/completions", Some(&bearer), &body);
                let (status, text) = match sent {
                    // The server answers 413 after reading 2 MiB and closes the connection (as
                    // HTTP allows); under load the client may still be writing the rest and
                    // see the close as a broken pipe or a reset before it reads the answer.
                    Err(ureq::Error::Io(e))
                        if want == 413
                            && matches!(
                                e.kind(),
                                std::io::ErrorKind::BrokenPipe
                                    | std::io::ErrorKind::ConnectionReset
                            ) =>
                    {
                        return;
                    }
                    other => other.unwrap_or_else(|e| panic!("{what} (round {round}): {e}")),
                };
                assert_eq!(status, want, "{what} (round {round}): {text}");
                error_doc(&text);
            }));
        }
        for (p, want) in prompts.iter().zip(&alone) {
            let (url, bearer, want) = (url.clone(), bearer.clone(), want.clone());
            let body = chat_body("bapo/base", p, "");
            handles.push(std::thread::spawn(move || {
                let (status, text) = request(
                    &url,
                    "POST",
                    "/v1/chat/completions",
                    Some(&bearer),
                    body.as_bytes(),
                );
                assert_eq!(status, 200, "{text}");
                assert_eq!(
                    content(&text),
                    want,
                    "a greedy answer under load differs from alone"
                );
            }));
        }
    }
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(request(&url, "GET", "/health", None, b"").0, 200);

    // The `openai` Python client (where `cargo xtask test` made its venv: BAPO_PYTHON).
    match std::env::var_os("BAPO_PYTHON") {
        None => eprintln!("BAPO_PYTHON not set: the openai client check is not run"),
        Some(python) => {
            let script = r#"
import json, sys, openai
url, key, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
ok = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
r = ok.chat.completions.create(model="bapo/base", messages=[{"role": "user", "content": prompt}],
                               max_tokens=12, temperature=0)
out = {"content": r.choices[0].message.content, "models": [m.id for m in ok.models.list()]}
bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
try:
    bad.models.list()
except openai.AuthenticationError as e:
    out["wrong_key"] = [e.status_code, e.code]
print(json.dumps(out))
"#;
            let out = Command::new(python)
                .args(["-c", script, &url, key, prompts[0]])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["content"], alone[0].as_str(), "{v}");
            assert_eq!(v["models"], serde_json::json!(["bapo/base"]), "{v}");
            assert_eq!(
                v["wrong_key"],
                serde_json::json!([401, "invalid_api_key"]),
                "{v}"
            );
        }
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
