//! A small JSON reader, enough for `cargo metadata`'s output (xtask stays std only, so it
//! builds in a second). Invariant: it never panics on any input; malformed JSON is an error
//! naming the byte offset.

/// A JSON value. Numbers keep their text (`cargo metadata` has none we read).
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    /// `null`
    Null,
    /// `true` or `false`
    Bool(bool),
    /// A number, as written.
    Num(String),
    /// A string, unescaped.
    Str(String),
    /// An array.
    Arr(Vec<Json>),
    /// An object's members, in order.
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// The member `key` of an object (`None` for a missing key or a non-object).
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Arr(a) => Some(a),
            _ => None,
        }
    }
}

/// Parses one JSON document (surrounding whitespace allowed, nothing else after it).
pub fn parse(text: &str) -> Result<Json, String> {
    let mut p = Parser { b: text.as_bytes(), at: 0, depth: 0 };
    let v = p.value()?;
    p.ws();
    if p.at != p.b.len() {
        return Err(p.error("trailing bytes"));
    }
    Ok(v)
}

/// Nesting deeper than this is refused (no stack overflow on hostile input).
const DEPTH_MAX: usize = 128;

struct Parser<'a> {
    b: &'a [u8],
    at: usize,
    depth: usize,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> String {
        format!("JSON: {what} at byte {}", self.at)
    }

    fn ws(&mut self) {
        while self.b.get(self.at).is_some_and(|c| c.is_ascii_whitespace()) {
            self.at += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Result<(), String> {
        if self.b.get(self.at) == Some(&c) {
            self.at += 1;
            Ok(())
        } else {
            Err(self.error(&format!("expected '{}'", c as char)))
        }
    }

    fn literal(&mut self, word: &str, v: Json) -> Result<Json, String> {
        if self.b[self.at..].starts_with(word.as_bytes()) {
            self.at += word.len();
            Ok(v)
        } else {
            Err(self.error("unknown literal"))
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.b.get(self.at) {
            None => Err(self.error("unexpected end")),
            Some(b'n') => self.literal("null", Json::Null),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'"') => self.string().map(Json::Str),
            Some(b'[') => self.nested(|p| {
                p.at += 1;
                let mut items = Vec::new();
                p.ws();
                if p.b.get(p.at) == Some(&b']') {
                    p.at += 1;
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(p.value()?);
                    p.ws();
                    match p.b.get(p.at) {
                        Some(b',') => p.at += 1,
                        Some(b']') => {
                            p.at += 1;
                            return Ok(Json::Arr(items));
                        }
                        _ => return Err(p.error("expected ',' or ']'")),
                    }
                }
            }),
            Some(b'{') => self.nested(|p| {
                p.at += 1;
                let mut members = Vec::new();
                p.ws();
                if p.b.get(p.at) == Some(&b'}') {
                    p.at += 1;
                    return Ok(Json::Obj(members));
                }
                loop {
                    p.ws();
                    let key = p.string()?;
                    p.ws();
                    p.eat(b':')?;
                    members.push((key, p.value()?));
                    p.ws();
                    match p.b.get(p.at) {
                        Some(b',') => p.at += 1,
                        Some(b'}') => {
                            p.at += 1;
                            return Ok(Json::Obj(members));
                        }
                        _ => return Err(p.error("expected ',' or '}'")),
                    }
                }
            }),
            Some(c) if *c == b'-' || c.is_ascii_digit() => {
                let start = self.at;
                while self
                    .b
                    .get(self.at)
                    .is_some_and(|c| c.is_ascii_digit() || b"+-.eE".contains(c))
                {
                    self.at += 1;
                }
                let text = std::str::from_utf8(&self.b[start..self.at])
                    .map_err(|_| self.error("bad number"))?;
                Ok(Json::Num(text.to_owned()))
            }
            Some(_) => Err(self.error("unexpected byte")),
        }
    }

    fn nested(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<Json, String>,
    ) -> Result<Json, String> {
        if self.depth == DEPTH_MAX {
            return Err(self.error("nested too deep"));
        }
        self.depth += 1;
        let v = f(self);
        self.depth -= 1;
        v
    }

    fn string(&mut self) -> Result<String, String> {
        self.eat(b'"')?;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.b.get(self.at) else { return Err(self.error("open string")) };
            self.at += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.b.get(self.at) else {
                        return Err(self.error("open escape"));
                    };
                    self.at += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hex = self
                                .b
                                .get(self.at..self.at + 4)
                                .and_then(|h| std::str::from_utf8(h).ok())
                                .and_then(|h| u32::from_str_radix(h, 16).ok())
                                .ok_or_else(|| self.error("bad \\u escape"))?;
                            self.at += 4;
                            // A lone or paired surrogate: not in any name we read.
                            char::from_u32(hex).unwrap_or('\u{fffd}')
                        }
                        _ => return Err(self.error("unknown escape")),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                _ => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| self.error("string not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_cargo_metadata_writes() {
        let v = parse(r#" {"a": [1, -2.5e3, true, null], "b\"\u00e9": {"c": "x\ny"}, "d": []} "#)
            .expect("valid");
        assert_eq!(
            v.get("a"),
            Some(&Json::Arr(vec![
                Json::Num("1".into()),
                Json::Num("-2.5e3".into()),
                Json::Bool(true),
                Json::Null
            ]))
        );
        assert_eq!(v.get("b\"é").and_then(|o| o.get("c")).and_then(Json::as_str), Some("x\ny"));
        assert_eq!(v.get("d").and_then(Json::as_array).map(<[Json]>::len), Some(0));
        assert_eq!(v.get("missing"), None);
    }

    #[test]
    fn malformed_is_an_error_never_a_panic() {
        for bad in ["", "{", "[1,", r#"{"a" 1}"#, r#""\u12"#, "nul", "[1] x", r#""\q""#, "{]"] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse(&"[".repeat(10_000)).is_err(), "deep nesting is refused");
    }
}
