//! What transformers' Jinja environment has and minijinja does not: Python's way of printing
//! values (`None`, `True`, `['a']`), its `tojson` filter (`json.dumps` with `ensure_ascii`,
//! `indent`, `separators`, `sort_keys`) and `strftime_now` (the local date).

use std::fmt::Write as _;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Output, State, Value};

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg.into())
}

/// `{{ value }}` as Jinja2 under Python prints it: `None`, `True`/`False`, lists and dicts by
/// their Python `repr`, everything else as its string.
pub(super) fn formatter(
    out: &mut Output<'_>,
    _: &State<'_, '_>,
    value: &Value,
) -> Result<(), Error> {
    let text = match value.kind() {
        ValueKind::Undefined => return Ok(()),
        ValueKind::String => {
            return out
                .write_str(value.as_str().unwrap_or_default())
                .map_err(Error::from)
        }
        ValueKind::None | ValueKind::Bool | ValueKind::Seq | ValueKind::Map => repr(value)?,
        _ => value.to_string(),
    };
    out.write_str(&text).map_err(Error::from)
}

/// Python's `repr` of a template value (strings quoted, as inside a printed list).
fn repr(value: &Value) -> Result<String, Error> {
    Ok(match value.kind() {
        ValueKind::Undefined | ValueKind::None => "None".into(),
        ValueKind::Bool => if value.is_true() { "True" } else { "False" }.into(),
        ValueKind::String => py_str_repr(value.as_str().unwrap_or_default()),
        ValueKind::Number => number(value)?,
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Result<Vec<_>, _> = value.try_iter()?.map(|v| repr(&v)).collect();
            format!("[{}]", items?.join(", "))
        }
        ValueKind::Map => {
            let mut parts = Vec::new();
            for k in value.try_iter()? {
                parts.push(format!("{}: {}", repr(&k)?, repr(&value.get_item(&k)?)?));
            }
            format!("{{{}}}", parts.join(", "))
        }
        _ => value.to_string(),
    })
}

fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// A number as Python prints it: integers plainly, floats by `repr(float)` (shortest
/// round-trip digits; exponent form outside 1e-4 ≤ |x| < 1e16).
fn number(value: &Value) -> Result<String, Error> {
    if let Ok(i) = i64::try_from(value.clone()) {
        if !value.is_integer() {
            // A float that happens to be whole: Python prints `1.0`.
            return Ok(format!("{i}.0"));
        }
        return Ok(i.to_string());
    }
    if value.is_integer() {
        return Ok(value.to_string());
    }
    let f = f64::try_from(value.clone())?;
    Ok(py_float(f))
}

fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // `{:e}` gives the shortest round-trip digits: `d.ddde-x`.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    if (-4..16).contains(&exp) {
        let s = f.to_string();
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, with no HTML escaping.
pub(super) fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")?.or(indent) {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(usize::try_from(i64::try_from(v)?.max(0)).unwrap_or(0)),
        }),
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators = match kwargs.get::<Option<Value>>("separators")? {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] => (a.to_string(), b.to_string()),
                _ => return Err(invalid("tojson: `separators` must be a pair of strings")),
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    kwargs.assert_all_used()?;
    let opts = JsonOpts {
        indent,
        ensure_ascii,
        sort_keys,
        item_sep: separators.0,
        key_sep: separators.1,
    };
    let mut out = String::new();
    opts.write(&mut out, value, 0)?;
    Ok(Value::from(out))
}

struct JsonOpts {
    indent: Option<String>,
    ensure_ascii: bool,
    sort_keys: bool,
    item_sep: String,
    key_sep: String,
}

impl JsonOpts {
    fn newline(&self, out: &mut String, level: usize) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    /// Writes `items` (already JSON) between `open` and `close` as `json.dumps` lays them out.
    fn container(
        &self,
        out: &mut String,
        open: char,
        close: char,
        items: Vec<String>,
        level: usize,
    ) {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return;
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            self.newline(out, level + 1);
            out.push_str(item);
        }
        self.newline(out, level);
        out.push(close);
    }

    fn write(&self, out: &mut String, value: &Value, level: usize) -> Result<(), Error> {
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Undefined => return Err(invalid("tojson: value is undefined")),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&number(value)?),
            ValueKind::String => self.string(out, value.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let mut items = Vec::new();
                for v in value.try_iter()? {
                    let mut s = String::new();
                    self.write(&mut s, &v, level + 1)?;
                    items.push(s);
                }
                self.container(out, '[', ']', items, level);
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                let mut items = Vec::new();
                for k in keys {
                    let mut s = String::new();
                    let key = match k.kind() {
                        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
                        ValueKind::None => "null".into(),
                        ValueKind::Bool => if k.is_true() { "true" } else { "false" }.into(),
                        _ => k.to_string(),
                    };
                    self.string(&mut s, &key);
                    s.push_str(&self.key_sep);
                    self.write(&mut s, &value.get_item(&k)?, level + 1)?;
                    items.push(s);
                }
                self.container(out, '{', '}', items, level);
            }
            other => return Err(invalid(format!("tojson: cannot serialise a {other}"))),
        }
        Ok(())
    }

    fn string(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Jinja2's `iterable` test under Python: `None`, numbers and booleans are not iterable
/// (minijinja's test says yes to `none`, which Qwen3-Coder's `tools is iterable` trips on).
pub(super) fn is_iterable(value: &Value) -> bool {
    matches!(
        value.kind(),
        ValueKind::String
            | ValueKind::Seq
            | ValueKind::Map
            | ValueKind::Iterable
            | ValueKind::Bytes
    )
}

/// `strftime_now(format)`: the local date and time in `format` (Python's `strftime` codes).
pub(super) fn strftime_now(format: String) -> Result<String, Error> {
    let now = jiff::Zoned::now();
    let mut out = String::new();
    write!(out, "{}", now.strftime(&format)).map_err(|_| {
        invalid(format!(
            "strftime_now: cannot format the date with {format:?}"
        ))
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_does() {
        for (f, want) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (1e16, "1e+16"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (123456.789, "123456.789"),
            (-2.0, "-2.0"),
        ] {
            assert_eq!(py_float(f), want, "{f}");
        }
    }

    #[test]
    fn strings_repr_as_python_does() {
        assert_eq!(py_str_repr("a'b"), "\"a'b\"");
        assert_eq!(py_str_repr("a\"b'c\n"), "'a\"b\\'c\\n'");
    }
}
