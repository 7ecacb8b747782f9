//! The part of EDN that Jepsen histories use: maps, vectors, lists, keywords, strings,
//! integers, floats, booleans and nil. Written by hand because the EDN crates are either
//! deprecated (edn-rs) or drag in old versions of uuid, chrono and bigdecimal for types a
//! history never holds; unsupported syntax (sets, tags, characters) is a clear error.

use std::fmt::{self, Write};

/// One EDN value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Edn {
    Nil,
    Bool(bool),
    Int(i64),
    /// Kept as written: a history's floats are timings, never compared by the checkers.
    Float(String),
    Str(String),
    /// Without the colon.
    Keyword(String),
    /// A bare symbol (Jepsen writes some errors this way).
    Symbol(String),
    Vector(Vec<Edn>),
    List(Vec<Edn>),
    /// In the order written.
    Map(Vec<(Edn, Edn)>),
}

impl Edn {
    pub fn keyword(name: &str) -> Edn {
        Edn::Keyword(name.to_owned())
    }

    /// The value under keyword `key` in a map.
    pub fn get(&self, key: &str) -> Option<&Edn> {
        match self {
            Edn::Map(pairs) => pairs.iter().find(|(k, _)| matches!(k, Edn::Keyword(name) if name == key)).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_keyword(&self) -> Option<&str> {
        match self {
            Edn::Keyword(name) => Some(name),
            _ => None,
        }
    }
}

/// Deeper nesting than this is refused (a history needs three levels).
pub const NESTING_MAX: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("EDN: {what} at byte {offset}")]
pub struct EdnError {
    pub offset: usize,
    pub what: String,
}

/// Parses exactly one value (surrounding whitespace and commas allowed).
pub fn parse(text: &str) -> Result<Edn, EdnError> {
    let mut parser = Parser { bytes: text.as_bytes(), text, pos: 0 };
    let value = parser.value(0)?;
    parser.skip_blank();
    if parser.pos != parser.bytes.len() {
        return Err(parser.error("more text after the value"));
    }
    Ok(value)
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, what: impl Into<String>) -> EdnError {
        EdnError { offset: self.pos, what: what.into() }
    }

    fn skip_blank(&mut self) {
        while let Some(&b) = self.bytes.get(self.pos) {
            match b {
                b' ' | b'\t' | b'\n' | b'\r' | b',' => self.pos += 1,
                b';' => {
                    while self.bytes.get(self.pos).is_some_and(|&b| b != b'\n') {
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Edn, EdnError> {
        if depth > NESTING_MAX {
            return Err(self.error(format!("nested deeper than {NESTING_MAX}")));
        }
        self.skip_blank();
        let Some(&first) = self.bytes.get(self.pos) else {
            return Err(self.error("a value is missing"));
        };
        match first {
            b'{' => {
                self.pos += 1;
                let items = self.sequence(b'}', depth)?;
                if items.len() % 2 != 0 {
                    return Err(self.error("a map with an odd number of forms"));
                }
                let mut pairs = Vec::with_capacity(items.len() / 2);
                let mut items = items.into_iter();
                while let (Some(k), Some(v)) = (items.next(), items.next()) {
                    pairs.push((k, v));
                }
                Ok(Edn::Map(pairs))
            }
            b'[' => {
                self.pos += 1;
                Ok(Edn::Vector(self.sequence(b']', depth)?))
            }
            b'(' => {
                self.pos += 1;
                Ok(Edn::List(self.sequence(b')', depth)?))
            }
            b'"' => self.string(),
            b':' => {
                self.pos += 1;
                let token = self.token();
                if token.is_empty() {
                    return Err(self.error("a keyword with no name"));
                }
                Ok(Edn::Keyword(token.to_owned()))
            }
            b'#' | b'\\' => Err(self.error(format!("unsupported EDN syntax '{}'", first as char))),
            _ => self.atom(),
        }
    }

    fn sequence(&mut self, close: u8, depth: usize) -> Result<Vec<Edn>, EdnError> {
        let mut items = Vec::new();
        loop {
            self.skip_blank();
            match self.bytes.get(self.pos) {
                None => return Err(self.error(format!("'{}' is missing", close as char))),
                Some(&b) if b == close => {
                    self.pos += 1;
                    return Ok(items);
                }
                Some(b'}' | b']' | b')') => return Err(self.error("a closing bracket that does not match")),
                Some(_) => items.push(self.value(depth + 1)?),
            }
        }
    }

    fn token(&mut self) -> &str {
        let start = self.pos;
        while let Some(&b) = self.bytes.get(self.pos) {
            if b.is_ascii_whitespace() || b",{}[]()\";".contains(&b) {
                break;
            }
            self.pos += 1;
        }
        &self.text[start..self.pos]
    }

    fn atom(&mut self) -> Result<Edn, EdnError> {
        let start = self.pos;
        let token = self.token();
        let value = match token {
            "nil" => Edn::Nil,
            "true" => Edn::Bool(true),
            "false" => Edn::Bool(false),
            _ if token.starts_with(|c: char| c.is_ascii_digit()) || (token.len() > 1 && token.starts_with(['-', '+'])) => {
                let digits = token.strip_suffix('N').unwrap_or(token);
                match digits.parse::<i64>() {
                    Ok(n) => Edn::Int(n),
                    Err(_) if digits.parse::<f64>().is_ok() => Edn::Float(token.to_owned()),
                    Err(_) => return Err(EdnError { offset: start, what: format!("'{token}' is not a number this reader handles") }),
                }
            }
            "" => return Err(EdnError { offset: start, what: "an unexpected character".into() }),
            _ => Edn::Symbol(token.to_owned()),
        };
        Ok(value)
    }

    fn string(&mut self) -> Result<Edn, EdnError> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            let rest = &self.text[self.pos..];
            let Some(at) = rest.find(['"', '\\']) else {
                return Err(self.error("a string that does not end"));
            };
            out.push_str(&rest[..at]);
            self.pos += at;
            if self.bytes[self.pos] == b'"' {
                self.pos += 1;
                return Ok(Edn::Str(out));
            }
            let escaped = self.bytes.get(self.pos + 1).copied();
            out.push(match escaped {
                Some(b'n') => '\n',
                Some(b't') => '\t',
                Some(b'r') => '\r',
                Some(b'"') => '"',
                Some(b'\\') => '\\',
                _ => return Err(self.error("an unsupported escape in a string")),
            });
            self.pos += 2;
        }
    }
}

impl fmt::Display for Edn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Edn::Nil => f.write_str("nil"),
            Edn::Bool(b) => write!(f, "{b}"),
            Edn::Int(n) => write!(f, "{n}"),
            Edn::Float(text) | Edn::Symbol(text) => f.write_str(text),
            Edn::Keyword(name) => write!(f, ":{name}"),
            Edn::Str(text) => {
                f.write_char('"')?;
                for c in text.chars() {
                    match c {
                        '"' => f.write_str("\\\"")?,
                        '\\' => f.write_str("\\\\")?,
                        '\n' => f.write_str("\\n")?,
                        '\t' => f.write_str("\\t")?,
                        '\r' => f.write_str("\\r")?,
                        c => f.write_char(c)?,
                    }
                }
                f.write_char('"')
            }
            Edn::Vector(items) => write_sequence(f, "[", items.iter(), "]"),
            Edn::List(items) => write_sequence(f, "(", items.iter(), ")"),
            Edn::Map(pairs) => {
                f.write_char('{')?;
                for (i, (k, v)) in pairs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k} {v}")?;
                }
                f.write_char('}')
            }
        }
    }
}

fn write_sequence<'a>(f: &mut fmt::Formatter<'_>, open: &str, items: impl Iterator<Item = &'a Edn>, close: &str) -> fmt::Result {
    f.write_str(open)?;
    for (i, item) in items.enumerate() {
        if i > 0 {
            f.write_char(' ')?;
        }
        write!(f, "{item}")?;
    }
    f.write_str(close)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jepsen_event_line_reads_and_writes_back_the_same() {
        let line = r#"{:process 6, :type :invoke, :f :append, :key "0", :value "x 6 0 y"}"#;
        let value = parse(line).unwrap();
        assert_eq!(value.get("process"), Some(&Edn::Int(6)));
        assert_eq!(value.get("f").and_then(Edn::as_keyword), Some("append"));
        assert_eq!(value.to_string(), line);
        let cas = parse("{:process 2, :type :ok, :f :cas, :value [3 0], :time 1.5e3}").unwrap();
        assert_eq!(cas.get("value"), Some(&Edn::Vector(vec![Edn::Int(3), Edn::Int(0)])));
        let text = Edn::Str("a \"quoted\" \\ line\n".into());
        assert_eq!(parse(&text.to_string()).unwrap(), text);
    }

    #[test]
    fn malformed_text_is_an_error_with_its_offset_never_a_panic() {
        for bad in ["{:a 1", "{:a}", "[1 2)", "\"open", ":", "#{1 2}", "{:a 1} x", "\"\\q\"", "99999999999999999999x"] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        let deep = "[".repeat(NESTING_MAX + 2) + &"]".repeat(NESTING_MAX + 2);
        assert!(parse(&deep).unwrap_err().what.contains("nested"));
        assert_eq!(parse("[1 2)").unwrap_err().offset, 4);
    }
}
