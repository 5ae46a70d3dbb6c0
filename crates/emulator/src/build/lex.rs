//! A small C++ tokenizer for the rewriter: identifiers, numbers, strings,
//! character literals, comments, preprocessor lines and punctuation, with
//! byte offsets into the source; and whole-word search helpers.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Ident,
    Number,
    Str,
    Punct,
    /// A whole preprocessor directive (statement boundary).
    Directive,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Tok {
    pub(super) kind: Kind,
    pub(super) start: usize,
    pub(super) end: usize,
    pub(super) line: usize,
}

pub(super) fn tokenize(src: &str) -> Result<Vec<Tok>, (usize, String)> {
    let b = src.as_bytes();
    let n = b.len();
    let mut toks = Vec::new();
    let mut i = 0;
    let mut line = 1;
    let mut at_line_start = true;
    while i < n {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            at_line_start = true;
            i += 1;
            continue;
        }
        if c == b' ' || c == b'\t' || c == b'\r' || c == 0x0c || c == 0x0b {
            i += 1;
            continue;
        }
        if c == b'\\'
            && i + 1 < n
            && (b[i + 1] == b'\n' || (b[i + 1] == b'\r' && i + 2 < n && b[i + 2] == b'\n'))
        {
            i += if b[i + 1] == b'\n' { 2 } else { 3 };
            line += 1;
            continue;
        }
        if c == b'/' && i + 1 < n && b[i + 1] == b'/' {
            while i < n && b[i] != b'\n' {
                if b[i] == b'\\' && i + 1 < n && b[i + 1] == b'\n' {
                    line += 1;
                    i += 1;
                }
                i += 1;
            }
            continue;
        }
        if c == b'/' && i + 1 < n && b[i + 1] == b'*' {
            let start_line = line;
            i += 2;
            loop {
                if i + 1 >= n {
                    return Err((start_line, "unterminated /* comment".into()));
                }
                if b[i] == b'*' && b[i + 1] == b'/' {
                    i += 2;
                    break;
                }
                if b[i] == b'\n' {
                    line += 1;
                }
                i += 1;
            }
            continue;
        }
        if c == b'#' && at_line_start {
            let start = i;
            let start_line = line;
            while i < n && b[i] != b'\n' {
                if b[i] == b'\\' && i + 1 < n && b[i + 1] == b'\n' {
                    line += 1;
                    i += 2;
                    continue;
                }
                if b[i] == b'/' && i + 1 < n && b[i + 1] == b'*' {
                    i += 2;
                    while i + 1 < n && !(b[i] == b'*' && b[i + 1] == b'/') {
                        if b[i] == b'\n' {
                            line += 1;
                        }
                        i += 1;
                    }
                    i += 2;
                    continue;
                }
                i += 1;
            }
            let end = i.min(n);
            toks.push(Tok {
                kind: Kind::Directive,
                start,
                end,
                line: start_line,
            });
            continue;
        }
        at_line_start = false;
        let start = i;
        // Raw string literal.
        if (c == b'R' || c == b'u' || c == b'U' || c == b'L') && {
            let mut j = i;
            while j < n && (b[j] == b'u' || b[j] == b'U' || b[j] == b'L' || b[j] == b'8') {
                j += 1;
            }
            j < n && b[j] == b'R' && j + 1 < n && b[j + 1] == b'"'
        } {
            let mut j = i;
            while b[j] != b'R' {
                j += 1;
            }
            j += 2;
            let dstart = j;
            while j < n && b[j] != b'(' {
                j += 1;
            }
            let delim = format!("){}\"", &src[dstart..j.min(n)]);
            let close = src[j.min(n)..]
                .find(&delim)
                .ok_or((line, "unterminated raw string".to_string()))?;
            let end = j + close + delim.len();
            line += src[start..end].matches('\n').count();
            toks.push(Tok {
                kind: Kind::Str,
                start,
                end,
                line,
            });
            i = end;
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            while i < n && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80) {
                i += 1;
            }
            // Encoding prefix of a string or char literal.
            if i < n
                && (b[i] == b'"' || b[i] == b'\'')
                && matches!(&src[start..i], "u8" | "u" | "U" | "L")
            {
                // fall through to literal scanning below
            } else {
                toks.push(Tok {
                    kind: Kind::Ident,
                    start,
                    end: i,
                    line,
                });
                continue;
            }
        }
        if i < n && (b[i] == b'"' || b[i] == b'\'') {
            let q = b[i];
            i += 1;
            while i < n && b[i] != q {
                if b[i] == b'\\' {
                    i += 1;
                }
                if i < n && b[i] == b'\n' {
                    return Err((line, "unterminated literal".into()));
                }
                i += 1;
            }
            i += 1;
            toks.push(Tok {
                kind: Kind::Str,
                start,
                end: i.min(n),
                line,
            });
            continue;
        }
        if c.is_ascii_digit() || (c == b'.' && i + 1 < n && b[i + 1].is_ascii_digit()) {
            while i < n
                && (b[i].is_ascii_alphanumeric()
                    || b[i] == b'.'
                    || b[i] == b'\''
                    || ((b[i] == b'+' || b[i] == b'-')
                        && matches!(b[i - 1], b'e' | b'E' | b'p' | b'P')))
            {
                i += 1;
            }
            toks.push(Tok {
                kind: Kind::Number,
                start,
                end: i,
                line,
            });
            continue;
        }
        // Punctuation: `::` as one token, everything else one char.
        if c == b':' && i + 1 < n && b[i + 1] == b':' {
            i += 2;
        } else {
            i += 1;
        }
        toks.push(Tok {
            kind: Kind::Punct,
            start,
            end: i,
            line,
        });
    }
    Ok(toks)
}

pub(super) fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

pub(super) fn word_positions(text: &str, word: &str) -> Vec<usize> {
    let b = text.as_bytes();
    text.match_indices(word)
        .map(|(p, _)| p)
        .filter(|&p| {
            (p == 0 || !is_ident_byte(b[p - 1]))
                && (p + word.len() >= b.len() || !is_ident_byte(b[p + word.len()]))
        })
        .collect()
}

pub(super) fn has_word(text: &str, word: &str) -> bool {
    !word_positions(text, word).is_empty()
}

pub(super) fn replace_word(text: &str, word: &str, with: &str) -> String {
    let mut out = String::new();
    let mut last = 0;
    for p in word_positions(text, word) {
        out.push_str(&text[last..p]);
        out.push_str(with);
        last = p + word.len();
    }
    out.push_str(&text[last..]);
    out
}
