//! `bapo serve`: An OpenAI-compatible HTTP server: one base model, every user's LoRA adapter over it
//! (`model: "bapo/<user>"` or the `user` field; `bapo/base` for the base model).

use crate::prelude::*;

/// An OpenAI-compatible HTTP server: one base model, every user's LoRA adapter over it
/// (`model: "bapo/<user>"` or the `user` field; `bapo/base` for the base model).
#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub model: PathBuf,
    /// Adapters: `<dir>/<user>/`, `<dir>/<user>/adapter/`, or the output of
    /// `bapo train --per-user` (`<dir>/users/<user>/adapter/`).
    #[arg(long)]
    pub adapters: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// 0 picks a free port (the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Adapters kept attached at once (least recently used dropped first).
    #[arg(long, default_value_t = 8)]
    pub max_adapters: usize,
    /// `max_tokens` of a request that gives none (cut to what the context leaves).
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// `f16` (or `bf16`) keeps the base model's projection, embedding and head weights in that type
    /// (adapters stay f32); `gguf` keeps a GGUF file's quantised blocks; as `bapo generate --weights`.
    #[arg(long, default_value = "f32")]
    pub weights: String,
    /// Every endpoint but `/health` then requires `Authorization: Bearer KEY` (401
    /// otherwise). Prefer the environment variable: a flag shows in `ps`.
    #[arg(long, env = "BAPO_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Chat-template arguments every request gets, as a JSON object (e.g.
    /// '{"enable_thinking": false}'); a request's `chat_template_kwargs` go on top.
    #[arg(long, value_parser = super::template_kwargs, default_value = "{}")]
    pub chat_template_kwargs: bapo_data::TemplateKwargs,
}

pub fn run<B: Backend>(args: Args, device: B::Device) -> Result<()> {
    let Args {
        model,
        adapters,
        host,
        port,
        max_adapters,
        default_max_tokens,
        weights,
        api_key,
        chat_template_kwargs,
    } = args;
    if api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        anyhow::bail!("--api-key / BAPO_API_KEY is empty: give a key, or unset it");
    }
    let base = bapo_model::precision::parse_base_weights("--weights", &weights)
        .map_err(anyhow::Error::msg)?;
    let loaded = bapo_model::load_base::<B>(&model, base, &device)?;
    let opts = bapo_serve::ServeOptions {
        addr: std::net::SocketAddr::new(host, port),
        adapters,
        max_adapters,
        default_max_tokens,
        api_key,
        chat_template_kwargs,
    };
    bapo_serve::serve(loaded, device, opts, |addr| {
        eprintln!("bapo serve: listening on http://{addr}");
    })
}
