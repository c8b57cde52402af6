//! The job's plumbing: files written whole (temp file, then rename), progress bars, and the
//! boxed error every stage returns.

use std::io::Write;
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};

/// Any failure of the job, with its context.
pub type RunError = Box<dyn std::error::Error + Send + Sync>;

pub fn bar(len: usize, what: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(&format!(
        "{{bar:40}} {{pos}}/{{len}} {what} [{{elapsed}} < {{eta}}]"
    ))
    .expect("template");
    ProgressBar::new(len as u64).with_style(style)
}

/// Writes `bytes` to `path` through a temp file and a rename. The temp file's name is unique to
/// the call (process id and a counter), so threads writing the same path never share one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{seq}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display()))
    })
}
