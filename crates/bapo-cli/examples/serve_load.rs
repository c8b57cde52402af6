//! Load for `bapo serve`: N clients, each sending its share of R greedy chat requests back to
//! back; prints one JSON line with requests/s and generated tokens/s (from the responses'
//! `usage`), wall time, and the latency quantiles.
//!
//! cargo run --release -p bapo-cli --example serve_load -- URL MODEL CLIENTS REQUESTS MAX_TOKENS
//! e.g. `... -- http://127.0.0.1:8000 bapo/concise 8 32 64`

use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 5 {
        eprintln!("usage: serve_load URL MODEL CLIENTS REQUESTS MAX_TOKENS");
        std::process::exit(2);
    }
    let (url, model) = (a[0].clone(), a[1].clone());
    let parse = |s: &str| s.parse::<usize>().expect("a whole number");
    let (clients, requests, max_tokens) = (parse(&a[2]), parse(&a[3]), parse(&a[4]));
    // Distinct prompts, so no two requests are the same computation.
    let topics = [
        "the sky is blue",
        "bread rises",
        "ice floats",
        "leaves fall in autumn",
        "the moon has phases",
        "magnets attract iron",
        "bees make honey",
        "rivers flow to the sea",
    ];
    let t0 = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (url, model) = (url.clone(), model.clone());
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
                let mut out = Vec::new();
                for r in (c..requests).step_by(clients) {
                    let body = serde_json::json!({
                        "model": model,
                        "messages": [{"role": "user", "content": format!("Explain why {}.", topics[r % topics.len()])}],
                        "temperature": 0, "max_tokens": max_tokens,
                    });
                    let t = Instant::now();
                    let mut res = agent
                        .post(&format!("{url}/v1/chat/completions"))
                        .header("content-type", "application/json")
                        .send(body.to_string())
                        .expect("request");
                    let doc: serde_json::Value =
                        serde_json::from_str(&res.body_mut().read_to_string().unwrap()).unwrap();
                    let n = doc["usage"]["completion_tokens"].as_u64().expect("usage");
                    out.push((t.elapsed().as_secs_f64(), n));
                }
                out
            })
        })
        .collect();
    let mut all: Vec<(f64, u64)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let wall = t0.elapsed().as_secs_f64();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    let tokens: u64 = all.iter().map(|x| x.1).sum();
    let q = |p: f64| all[((all.len() - 1) as f64 * p).round() as usize].0;
    println!(
        "{}",
        serde_json::json!({
            "clients": clients, "requests": all.len(), "max_tokens": max_tokens,
            "wall_s": wall, "requests_per_s": all.len() as f64 / wall,
            "tokens": tokens, "tokens_per_s": tokens as f64 / wall,
            "latency_p50_s": q(0.5), "latency_p90_s": q(0.9),
        })
    );
}
