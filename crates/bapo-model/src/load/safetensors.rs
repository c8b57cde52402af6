//! HF safetensors reader: single `model.safetensors` or shards listed in
//! `model.safetensors.index.json`; F32, BF16 and F16 are converted to f32.
//!
//! Format: little-endian `u64` header length `n`, `n` bytes of JSON
//! `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"?: {...}}`,
//! then the data block the offsets point into.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use serde::Deserialize;

use super::{HostTensor, HostTensors};
use crate::error::{ModelError, Result};

#[derive(Deserialize, Debug, Clone)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// Largest header accepted (the format's own reference limit is 100 MB).
const MAX_HEADER: u64 = 100 * 1024 * 1024;

/// Reads every tensor of one safetensors file into `out`, one tensor's bytes at a time
/// (positioned reads, no mapping: a mapped file's pages count in the process's resident memory
/// beside the f32 copies, 2.2 GB of a 7.25 GB load peak for a 1.2 B bf16 checkpoint). Loading
/// a model reads them only when it takes them ([`index_checkpoint_dir`]).
pub fn read_file(path: &Path, out: &mut BTreeMap<String, HostTensor>) -> Result<()> {
    let mut index = BTreeMap::new();
    index_file(path, &mut index)?;
    for (name, d) in index {
        out.insert(name, d.read()?);
    }
    Ok(())
}

/// A tensor of a safetensors file, checked against the header, read when it is taken
/// ([`Deferred::read`]): a loader then holds one tensor's f32 copy at a time, not the whole
/// checkpoint's (4.9 GB for a 1.2 B-parameter model).
#[derive(Debug)]
pub struct Deferred {
    file: std::sync::Arc<File>,
    path: std::path::PathBuf,
    at: u64,
    entry: Entry,
}

impl Deferred {
    /// The tensor's shape, from the header.
    pub fn shape(&self) -> &[usize] {
        &self.entry.shape
    }

    /// Reads the tensor's bytes (one positioned read) as f32 values.
    pub fn read(&self) -> Result<HostTensor> {
        use std::os::unix::fs::FileExt;
        let [begin, end] = self.entry.data_offsets;
        let mut raw = vec![0u8; (end - begin) as usize];
        self.file
            .read_exact_at(&mut raw, self.at)
            .map_err(|e| ModelError::io(&self.path, e))?;
        Ok(to_host(self.entry.clone(), &raw))
    }
}

/// Indexes every tensor of one safetensors file into `out` (header checked, no data read).
pub fn index_file(path: &Path, out: &mut BTreeMap<String, Deferred>) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let read_at = |buf: &mut [u8], at: u64| {
        file.read_exact_at(buf, at)
            .map_err(|e| ModelError::io(path, e))
    };
    let mut head = [0u8; 8];
    if len < 8 {
        return Err(short(path));
    }
    read_at(&mut head, 0)?;
    let n = header_len(path, u64::from_le_bytes(head), len)?;
    let mut header = vec![0u8; n as usize];
    read_at(&mut header, 8)?;
    let file = std::sync::Arc::new(file);
    for (name, entry) in entries(path, &header, len - 8 - n)? {
        let at = 8 + n + entry.data_offsets[0];
        out.insert(
            name,
            Deferred {
                file: file.clone(),
                path: path.to_path_buf(),
                at,
                entry,
            },
        );
    }
    Ok(())
}

/// Reads every tensor of safetensors bytes already in memory into `out`; `path` only names
/// them in errors.
pub fn read_bytes(path: &Path, bytes: &[u8], out: &mut BTreeMap<String, HostTensor>) -> Result<()> {
    if bytes.len() < 8 {
        return Err(short(path));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let n = header_len(path, n, bytes.len() as u64)?;
    let data = &bytes[8 + n as usize..];
    for (name, entry) in entries(path, &bytes[8..8 + n as usize], data.len() as u64)? {
        let [begin, end] = entry.data_offsets;
        let raw = &data[begin as usize..end as usize];
        out.insert(name, to_host(entry, raw));
    }
    Ok(())
}

fn short(path: &Path) -> ModelError {
    ModelError::format(
        path,
        Some(0),
        "file is shorter than the 8-byte header length",
    )
}

/// The header length `n`, checked against the file's length and the limit.
fn header_len(path: &Path, n: u64, file_len: u64) -> Result<u64> {
    if n > MAX_HEADER || 8 + n > file_len {
        return Err(ModelError::format(
            path,
            Some(0),
            format!("header length {n} exceeds the file ({file_len} bytes) or the 100 MB limit"),
        ));
    }
    Ok(n)
}

/// The header's tensor entries, each checked: a known dtype, a sane shape, and data offsets
/// inside the `data_len`-byte data block that match the shape.
fn entries(path: &Path, header: &[u8], data_len: u64) -> Result<Vec<(String, Entry)>> {
    let n = header.len() as u64;
    let parsed: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| {
            let at = json_offset(header, e.line(), e.column());
            ModelError::format(path, Some(8 + at), format!("header JSON: {e}"))
        })?;
    let mut out = Vec::with_capacity(parsed.len());
    for (name, value) in parsed {
        if name == "__metadata__" {
            continue;
        }
        let entry: Entry = serde_json::from_value(value)
            .map_err(|e| ModelError::format(path, None, format!("header entry `{name}`: {e}")))?;
        let numel = entry
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= (1 << 40))
            .ok_or_else(|| {
                ModelError::format(
                    path,
                    None,
                    format!("tensor `{name}`: absurd shape {:?}", entry.shape),
                )
            })?;
        let width = match entry.dtype.as_str() {
            "F32" => 4,
            "BF16" | "F16" => 2,
            other => {
                return Err(ModelError::Unsupported {
                    path: path.into(),
                    what: format!("tensor `{name}` has dtype {other} (only F32, BF16, F16)"),
                })
            }
        };
        let [begin, end] = entry.data_offsets;
        if begin > end || end > data_len || end - begin != (numel * width) as u64 {
            return Err(ModelError::format(
                path,
                Some((8 + n).saturating_add(begin)),
                format!("tensor `{name}`: data_offsets [{begin}, {end}] do not fit the data block ({data_len} bytes) or its {:?} {} shape", entry.shape, entry.dtype),
            ));
        }
        out.push((name, entry));
    }
    Ok(out)
}

/// A checked entry's bytes as f32 values.
fn to_host(entry: Entry, raw: &[u8]) -> HostTensor {
    let data: Vec<f32> = match entry.dtype.as_str() {
        "F32" => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
        "BF16" => raw
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => raw
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    };
    HostTensor {
        shape: entry.shape,
        data,
    }
}

/// Byte offset of serde_json's 1-based `line`/`column` inside `text` (0 when unknown).
fn json_offset(text: &[u8], line: usize, column: usize) -> u64 {
    let line_start: usize = text
        .split(|&b| b == b'\n')
        .take(line.saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum();
    (line_start + column.saturating_sub(1)).min(text.len()) as u64
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// Reads `model.safetensors`, or every shard named by `model.safetensors.index.json`.
pub fn read_checkpoint_dir(dir: &Path) -> Result<HostTensors> {
    let mut w = index_checkpoint_dir(dir)?;
    for (name, d) in std::mem::take(&mut w.deferred) {
        w.tensors.insert(name, d.read()?);
    }
    Ok(w)
}

/// [`read_checkpoint_dir`] with every tensor left in the file until it is taken (the loader's
/// path: see [`Deferred`]).
pub fn index_checkpoint_dir(dir: &Path) -> Result<HostTensors> {
    let mut tensors = BTreeMap::new();
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let path = if single.exists() {
        index_file(&single, &mut tensors)?;
        single
    } else if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let idx: ShardIndex = serde_json::from_str(&text)
            .map_err(|e| ModelError::format(&index, None, format!("line {}: {e}", e.line())))?;
        let shards: std::collections::BTreeSet<&String> = idx.weight_map.values().collect();
        for shard in shards {
            // A shard is a file next to the index: no directories, no `..`, no absolute path.
            if shard.is_empty() || shard.contains(['/', '\\']) || shard == ".." || shard == "." {
                return Err(ModelError::format(
                    &index,
                    None,
                    format!("weight_map names shard `{shard}`, which is not a file name in this directory"),
                ));
            }
            index_file(&dir.join(shard), &mut tensors)?;
        }
        for name in idx.weight_map.keys() {
            if !tensors.contains_key(name) {
                return Err(ModelError::format(
                    &index,
                    None,
                    format!("tensor `{name}` is listed in weight_map but not in its shard"),
                ));
            }
        }
        index
    } else {
        return Err(ModelError::format(
            dir,
            None,
            "no model.safetensors or model.safetensors.index.json in this directory",
        ));
    };
    Ok(HostTensors {
        path,
        deferred: tensors,
        ..Default::default()
    })
}

/// Writes F32 tensors as a safetensors file, atomically (temp file, then rename).
pub fn write_file(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("strings"),
        );
    }
    let mut offset = 0usize;
    for (name, t) in tensors {
        let end = offset + t.data.len() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut head = serde_json::Value::Object(header).to_string().into_bytes();
    // Pad the header with spaces so the data block is 8-byte aligned, as the reference writer does.
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let res = (|| -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(File::create(&tmp)?);
        f.write_all(&(head.len() as u64).to_le_bytes())?;
        f.write_all(&head)?;
        for t in tensors.values() {
            for x in &t.data {
                f.write_all(&x.to_le_bytes())?;
            }
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ModelError::io(path, e)
    })
}
