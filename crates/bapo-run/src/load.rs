//! Reading a run config: TOML into [`RunConfig`] (unknown keys and wrong types are errors
//! naming the file, line and key), `--set` overrides, paths resolved against the file's folder,
//! then [`RunConfig::validate`] with each failure placed at its line or override.

use std::path::Path;

use crate::config::{ConfigError, RunConfig};

impl RunConfig {
    /// Like [`RunConfig::from_file`], then applies `section.key=value` overrides (the value is
    /// read as TOML — `3`, `1e-4`, `true`, `["a", "b"]` — or, failing that, as a string).
    pub fn from_file_with(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        if overrides.is_empty() {
            return Self::from_file(path);
        }
        let err = |what: String| ConfigError {
            path: path.into(),
            what,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| err(e.message().to_string()))?;
        for o in overrides {
            let (key, raw) = o
                .split_once('=')
                .ok_or_else(|| err(format!("--set {o}: expected section.key=value")))?;
            let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_string()));
            let mut parts: Vec<&str> = key.trim().split('.').collect();
            let last = parts
                .pop()
                .filter(|k| !k.is_empty())
                .ok_or_else(|| err(format!("--set {o}: empty key")))?;
            let mut at = &mut table;
            for p in parts {
                at = at
                    .entry(p.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| err(format!("--set {o}: `{p}` is not a section")))?;
            }
            at.insert(last.to_string(), value);
        }
        let cfg: RunConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| err(format!("after --set overrides: {}", e.message())))?;
        cfg.resolve(path, &text, overrides)
    }

    /// Parses and validates a TOML config; `data.train` is resolved against the file's folder.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let err = |what: String| ConfigError {
            path: path.into(),
            what,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: RunConfig = toml::from_str(&text).map_err(|e| {
            let at = e.span().map(|s| {
                let line = text[..s.start].matches('\n').count() + 1;
                format!("line {line}: ")
            });
            err(format!("{}{}", at.unwrap_or_default(), e.message()))
        })?;
        cfg.resolve(path, &text, &[])
    }

    /// Resolves `data.train` against the config file's folder, then validates; a value out of
    /// range is reported at its line in `text`, or at the `--set` override that gave it.
    fn resolve(
        mut self,
        path: &Path,
        text: &str,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        if self.data.train.is_relative() {
            self.data.train = base.join(&self.data.train);
        }
        if let Some(e) = self.data.eval.as_mut().filter(|e| e.is_relative()) {
            *e = base.join(&*e);
        }
        for k in self.eval.knowledge.iter_mut().filter(|k| k.is_relative()) {
            *k = base.join(&*k);
        }
        self.validate().map_err(|bad| {
            let set = overrides
                .iter()
                .rev()
                .find(|o| o.split_once('=').is_some_and(|(k, _)| k.trim() == bad.key));
            let at = match (set, crate::validate::line_of(text, &bad.key)) {
                (Some(o), _) => format!("--set {o}: "),
                (None, Some(line)) => format!("line {line}: "),
                (None, None) => String::new(),
            };
            ConfigError {
                path: path.into(),
                what: format!("{at}{bad}"),
            }
        })?;
        Ok(self)
    }
}
