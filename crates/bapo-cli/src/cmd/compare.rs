//! `bapo compare`: The forgetting experiment: design A (each user alone, no profile turn) and design B (users
//! mixed); DPO over β, BAPO over λ, DPO + NLL and rehearsal on the same data, seed and
//! budget; writes compare.json, compare.md and figures (heterogeneity, trade-off).

use crate::prelude::*;

/// The forgetting experiment: design A (each user alone, no profile turn) and design B
/// (users mixed); DPO over β, BAPO over λ, DPO + NLL and rehearsal on the same data, seed
/// and budget; writes compare.json, compare.md and figures (heterogeneity, trade-off).
#[derive(clap::Args)]
pub struct Args {
    /// Base run configuration (configs/compare.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// A small version that shows the pipeline (≤ 20 min on 2 CPU cores): design A for
    /// three users, DPO and BAPO λ 1, one seed, 16 training / 8 held-out pairs, 6 steps of
    /// 2 pairs at a 4× higher learning rate, chat-format knowledge (16 items per set).
    #[arg(long)]
    pub quick: bool,
    /// Seeds 0..N per level and method.
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Levels to run (default: designs A and B; `a` = design A's solo_<user> levels, `a2` =
    /// design A′'s near_<user> and far_<user> halves (each user's pairs split at the median
    /// reference gap, scanned first), `b` = design B's one_user, two_compatible, two_opposing,
    /// all_six, all_six_no_profile).
    #[arg(long, value_delimiter = ',')]
    pub levels: Vec<String>,
    /// Methods to run (default: all; known: dpo, dpo_beta0.3, dpo_beta1, dpo_nll,
    /// bapo_l0.03, bapo_l0.1, bapo_l0.3, bapo_l1, rehearsal).
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Output directory (default: runs/compare, or runs/compare-quick).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Training pairs per level, balanced over its users, drawn by the seed (default: all;
    /// --quick: 16).
    #[arg(long)]
    pub max_train_pairs: Option<usize>,
    /// Held-out pairs per level, the same for every seed (default: all; --quick: 8).
    #[arg(long)]
    pub max_eval_pairs: Option<usize>,
    /// Override any base config value for every run.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Train nothing: write compare.{json,md} and the figures from the runs that have
    /// finished (e.g. to combine a grid run in several processes).
    #[arg(long)]
    pub report_only: bool,
}

pub fn run<B: Backend>(
    args: Args,
    device: B::Device,
    trainer: impl FnOnce(&RunConfig, &B::Device, Job) -> Result<PathBuf>,
) -> Result<()> {
    let Args {
        config,
        quick,
        seeds,
        levels,
        methods,
        out,
        max_train_pairs,
        max_eval_pairs,
        set,
        report_only,
    } = args;
    use bapo_lab::compare::{
        default_levels, default_methods, design_a2_levels, design_a_levels, design_b_levels,
        CompareSpec,
    };
    let (def_levels, def_methods, mut overrides, caps) = if quick {
        (
            ["solo_concise", "solo_expert", "solo_friendly"]
                .map(String::from)
                .to_vec(),
            vec!["dpo".to_string(), "bapo_l1".to_string()],
            [
                "train.max_steps=6",
                "train.warmup_steps=1",
                "train.grad_accum=1",
                "train.learning_rate=2e-3",
                "eval.knowledge_items=16",
                "eval.formats=[\"chat\"]",
                "eval.output_prompts=4",
                "eval.output_max_new_tokens=64",
                "anchor.max_new_tokens=32",
                "output.eval_steps=6",
                "output.save_steps=6",
            ]
            .map(String::from)
            .to_vec(),
            (Some(16), Some(8)),
        )
    } else {
        (Vec::new(), Vec::new(), Vec::new(), (None, None))
    };
    overrides.extend(set);
    // `a` and `b` stand for the designs' levels.
    let group = |names: Vec<bapo_lab::compare::Level>| -> Vec<String> {
        names.into_iter().map(|l| l.name).collect()
    };
    let levels: Vec<String> = if levels.is_empty() {
        def_levels
    } else {
        levels
    }
    .into_iter()
    .flat_map(|l| match l.as_str() {
        "a" => group(design_a_levels()),
        "a2" => group(design_a2_levels()),
        "b" => group(design_b_levels()),
        _ => vec![l],
    })
    .collect();
    // An empty list is the default grid (A and B); A′ only by name.
    let known = match levels.is_empty() {
        true => default_levels(),
        false => default_levels()
            .into_iter()
            .chain(design_a2_levels())
            .collect(),
    };
    let levels = pick(known, &levels, "level", |l| l.name.as_str())?;
    let methods = pick(
        default_methods(),
        if methods.is_empty() {
            &def_methods
        } else {
            &methods
        },
        "method",
        |m| m.name.as_str(),
    )?;
    let spec = CompareSpec {
        levels,
        methods,
        seeds: (0..seeds.max(1)).collect(),
        out: out.unwrap_or_else(|| {
            PathBuf::from(if quick {
                "runs/compare-quick"
            } else {
                "runs/compare"
            })
        }),
        max_train_pairs: max_train_pairs.or(caps.0),
        max_eval_pairs: max_eval_pairs.or(caps.1),
        overrides,
        report_only,
    };
    let cfg = RunConfig::from_file_with(&config, &spec.overrides)?;
    println!(
        "{}",
        trainer(&cfg, &device, Job::Compare { config, spec })?.display()
    );
    Ok(())
}

/// `want` (by name) out of `all`; everything when `want` is empty.
fn pick<T: Clone>(
    all: Vec<T>,
    want: &[String],
    kind: &str,
    name: fn(&T) -> &str,
) -> Result<Vec<T>> {
    if want.is_empty() {
        return Ok(all);
    }
    want.iter()
        .map(|w| {
            all.iter().find(|x| name(x) == w).cloned().ok_or_else(|| {
                let known: Vec<&str> = all.iter().map(name).collect();
                anyhow::anyhow!("unknown {kind} `{w}` (known: {})", known.join(", "))
            })
        })
        .collect()
}
