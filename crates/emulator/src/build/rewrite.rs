//! The source rewriter: `__shared__` declarations into the emulator's
//! macros, kernel declarations found and their entry points appended, each
//! copy starting with a `#line` back to the original file.

use std::path::Path;

use super::lex::*;
use super::registry::entry_points;
use super::{BuildError, KernelDecl, Rewritten};

/// A kernel definition whose body has not opened yet.
#[derive(Debug, Clone)]
pub(super) struct PendingKernel {
    pub(super) name: String,
    pub(super) params_type: String,
    pub(super) line: usize,
    pub(super) launch_bounds: Option<String>,
}

/// A kernel whose body is open: its brace depth and what its info function needs.
#[derive(Debug, Clone)]
pub(super) struct OpenKernel {
    pub(super) depth: usize,
    pub(super) name: String,
    pub(super) launch_bounds: Option<String>,
    pub(super) extern_align: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Brace {
    Namespace,
    ExternC,
    Class,
    Code,
}

pub(super) struct Edit {
    pub(super) start: usize,
    pub(super) end: usize,
    pub(super) text: String,
}

/// Rewrites one file. `lib` is `Some(lib_name)` for translation units (kernels are
/// registered and get entry points), `None` for headers.
pub fn rewrite(src: &str, path: &Path, lib: Option<&str>) -> Result<Rewritten, BuildError> {
    let perr = |line: usize, message: String| BuildError::Parse {
        file: path.to_path_buf(),
        line,
        message,
    };
    let toks = tokenize(src).map_err(|(l, m)| perr(l, m))?;
    let t = |i: usize| &src[toks[i].start..toks[i].end];
    let is = |i: usize, s: &str| i < toks.len() && t(i) == s;

    let mut edits: Vec<Edit> = Vec::new();
    let mut kernels: Vec<KernelDecl> = Vec::new();
    let mut braces: Vec<Brace> = Vec::new();
    let mut stmt_start = 0usize; // first token of the current statement
    let mut shared_decls = 0;
    let mut i = 0;
    // Kernels whose body starts at a given brace depth: (depth, name, line).
    let mut pending_kernel: Option<PendingKernel> = None;
    let mut open_kernels: Vec<OpenKernel> = Vec::new();
    while i < toks.len() {
        let tok = toks[i];
        match tok.kind {
            Kind::Directive => {
                let text = &src[tok.start..tok.end];
                if has_word(text, "__shared__")
                    && !text
                        .trim_start_matches('#')
                        .trim_start()
                        .starts_with("error")
                {
                    let d = text.trim_start_matches('#').trim_start();
                    if d.starts_with("define") {
                        return Err(perr(
                            tok.line,
                            "`__shared__` inside a macro cannot be rewritten for the emulator; declare the variable \
                             in the function body"
                                .into(),
                        ));
                    }
                }
                if has_word(text, "__noinline__") {
                    edits.push(Edit {
                        start: tok.start,
                        end: tok.end,
                        text: replace_word(text, "__noinline__", "__attribute__((noinline))"),
                    });
                }
                stmt_start = i + 1;
                i += 1;
                continue;
            }
            Kind::Ident => {
                let word = t(i);
                if word == "__noinline__" {
                    edits.push(Edit {
                        start: tok.start,
                        end: tok.end,
                        text: "__attribute__((noinline))".into(),
                    });
                } else if word == "__shared__" {
                    if !braces.contains(&Brace::Code) {
                        return Err(perr(
                            tok.line,
                            "`__shared__` at namespace scope is not supported by the emulator; declare it inside \
                             the kernel or device function"
                                .into(),
                        ));
                    }
                    // Find the end of the statement.
                    let mut j = i + 1;
                    let mut depth = 0i32;
                    loop {
                        if j >= toks.len() {
                            return Err(perr(
                                tok.line,
                                "unterminated `__shared__` declaration".into(),
                            ));
                        }
                        let tk = toks[j];
                        if tk.kind == Kind::Directive {
                            return Err(perr(
                                tk.line,
                                "preprocessor directive inside a `__shared__` declaration".into(),
                            ));
                        }
                        let s = t(j);
                        match s {
                            "(" | "[" => depth += 1,
                            ")" | "]" => depth -= 1,
                            "{" | "}" => return Err(perr(
                                tok.line,
                                "cannot parse this `__shared__` declaration (braces before `;`; \
                                     __shared__ variables cannot have initializers)"
                                    .into(),
                            )),
                            ";" if depth == 0 => break,
                            _ => {}
                        }
                        j += 1;
                    }
                    let (text, extern_align) = shared_decl(src, &toks, stmt_start, j, path)?;
                    if let (Some(align), Some(k)) = (extern_align, open_kernels.last_mut()) {
                        k.extern_align.push(align);
                    }
                    let start = toks[stmt_start].start;
                    let end = toks[j].end;
                    let newlines = src[start..end].matches('\n').count();
                    edits.push(Edit {
                        start,
                        end,
                        text: format!("{text}{}", "\n".repeat(newlines)),
                    });
                    shared_decls += 1;
                    i = j + 1;
                    stmt_start = i;
                    continue;
                } else if word == "__global__" {
                    if let Some(k) = kernel_decl(src, &toks, stmt_start, i, &braces, path)? {
                        pending_kernel = Some(k);
                    }
                }
            }
            Kind::Punct => {
                let s = t(i);
                match s {
                    ";" => {
                        pending_kernel = None;
                        stmt_start = i + 1;
                    }
                    "{" => {
                        let kind = classify_brace(src, &toks, stmt_start, i);
                        braces.push(kind);
                        if let Some(k) = pending_kernel.take() {
                            open_kernels.push(OpenKernel {
                                depth: braces.len(),
                                name: k.name,
                                launch_bounds: k.launch_bounds,
                                extern_align: Vec::new(),
                            });
                        }
                        stmt_start = i + 1;
                    }
                    "}" => {
                        if open_kernels.last().is_some_and(|k| k.depth == braces.len()) {
                            if let (Some(k), Some(lib)) = (open_kernels.pop(), lib) {
                                if let Some(decl) = kernels.iter_mut().find(|d| d.name == k.name) {
                                    decl.extern_shared_align = k.extern_align.clone();
                                }
                                edits.push(Edit {
                                    start: tok.end,
                                    end: tok.end,
                                    text: entry_points(lib, &k),
                                });
                            }
                        }
                        braces.pop();
                        stmt_start = i + 1;
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        // Record kernel definitions when their body opens.
        if let Some(k) = &pending_kernel {
            if is(i + 1, "{")
                && lib.is_some()
                && !kernels.iter().any(|d: &KernelDecl| d.name == k.name)
            {
                kernels.push(KernelDecl {
                    name: k.name.clone(),
                    params_type: k.params_type.clone(),
                    file: path.to_path_buf(),
                    line: k.line,
                    launch_bounds: k.launch_bounds.clone(),
                    extern_shared_align: Vec::new(),
                });
            }
        }
        i += 1;
    }
    // Apply edits.
    edits.sort_by_key(|e| e.start);
    let mut out = String::with_capacity(src.len() + 256);
    out.push_str(&format!("#line 1 \"{}\"\n", escape_path(path)));
    let mut pos = 0;
    for e in &edits {
        if e.start < pos {
            continue;
        }
        out.push_str(&src[pos..e.start]);
        out.push_str(&e.text);
        pos = e.end;
    }
    out.push_str(&src[pos..]);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(Rewritten {
        text: out,
        kernels,
        shared_decls,
    })
}

pub(super) fn escape_path(p: &Path) -> String {
    p.display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
}

pub(super) fn classify_brace(src: &str, toks: &[Tok], from: usize, to: usize) -> Brace {
    let words: Vec<&str> = toks[from.min(to)..to]
        .iter()
        .map(|t| &src[t.start..t.end])
        .collect();
    let first = words.iter().position(|w| *w != "inline");
    match first.map(|f| words[f]) {
        Some("namespace") => return Brace::Namespace,
        Some("extern") if words.len() == 2 && words[1].starts_with('"') => {
            return if words[1] == "\"C\"" {
                Brace::ExternC
            } else {
                Brace::Namespace
            }
        }
        _ => {}
    }
    let has_paren = words.contains(&"(");
    let has_class = words
        .iter()
        .any(|w| matches!(*w, "struct" | "class" | "union" | "enum"));
    let has_eq = words.contains(&"=");
    if has_class && !has_paren && !has_eq {
        Brace::Class
    } else {
        Brace::Code
    }
}

/// The first argument of the `__launch_bounds__(...)` whose keyword is token `at`
/// (tokens joined by spaces), or an error message.
pub(super) fn launch_bounds_arg(src: &str, toks: &[Tok], at: usize) -> Result<String, String> {
    let t = |i: usize| &src[toks[i].start..toks[i].end];
    if at + 1 >= toks.len() || t(at + 1) != "(" {
        return Err("`__launch_bounds__` without an argument list".into());
    }
    let mut depth = 0i32;
    let mut first: Vec<&str> = Vec::new();
    let mut in_first = true;
    for j in at + 1..toks.len() {
        let s = t(j);
        match s {
            "(" | "[" | "{" => depth += 1,
            ")" | "]" | "}" => {
                depth -= 1;
                if depth == 0 {
                    return if first.is_empty() {
                        Err("empty `__launch_bounds__()`".into())
                    } else {
                        Ok(first.join(" "))
                    };
                }
            }
            "," if depth == 1 => in_first = false,
            _ => {}
        }
        if in_first && !(depth == 1 && s == "(" && j == at + 1) {
            first.push(s);
        }
    }
    Err("unbalanced parentheses after `__launch_bounds__`".into())
}

/// Parses `__global__ void [__launch_bounds__(..)] NAME(PARAMS)`. Returns the
/// kernel for extern "C" kernels, `None` for others.
pub(super) fn kernel_decl(
    src: &str,
    toks: &[Tok],
    stmt_start: usize,
    at: usize,
    braces: &[Brace],
    path: &Path,
) -> Result<Option<PendingKernel>, BuildError> {
    let t = |i: usize| &src[toks[i].start..toks[i].end];
    let line = toks[at].line;
    let perr = |message: String| BuildError::Parse {
        file: path.to_path_buf(),
        line,
        message,
    };
    let head: Vec<&str> = (stmt_start..at).map(t).collect();
    if head.contains(&"template") {
        return Ok(None);
    }
    let extern_c = head.windows(2).any(|w| w[0] == "extern" && w[1] == "\"C\"")
        || braces.contains(&Brace::ExternC);
    let mut launch_bounds = None;
    for j in stmt_start..at {
        if t(j) == "__launch_bounds__" {
            launch_bounds = Some(launch_bounds_arg(src, toks, j).map_err(&perr)?);
        }
    }
    // Skip to the name: identifiers/attributes until an identifier followed by `(`.
    let mut j = at + 1;
    let mut name = None;
    while j < toks.len() {
        let s = t(j);
        if s == "__launch_bounds__" {
            launch_bounds = Some(launch_bounds_arg(src, toks, j).map_err(&perr)?);
        }
        if s == "__launch_bounds__" || s == "__attribute__" || s == "alignas" || s == "__align__" {
            // skip balanced parens
            j += 1;
            if j < toks.len() && t(j) == "(" {
                let mut depth = 0;
                while j < toks.len() {
                    match t(j) {
                        "(" => depth += 1,
                        ")" => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
            }
            j += 1;
            continue;
        }
        if toks[j].kind == Kind::Ident && j + 1 < toks.len() && t(j + 1) == "(" {
            name = Some(j);
            break;
        }
        if matches!(s, ";" | "{" | "}" | "(" | "<") {
            break;
        }
        j += 1;
    }
    let Some(name_idx) = name else {
        return Err(perr(
            "cannot find the kernel name after `__global__`".into(),
        ));
    };
    if !extern_c {
        return Ok(None);
    }
    // Parameters.
    let mut k = name_idx + 2;
    let mut depth = 1;
    let mut params: Vec<Vec<usize>> = vec![Vec::new()];
    let mut angle = 0;
    while k < toks.len() {
        let s = t(k);
        match s {
            "(" | "[" => depth += 1,
            ")" | "]" => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            "<" => angle += 1,
            ">" if angle > 0 => angle -= 1,
            "," if depth == 1 && angle == 0 => {
                params.push(Vec::new());
                k += 1;
                continue;
            }
            _ => {}
        }
        if let Some(last) = params.last_mut() {
            last.push(k);
        }
        k += 1;
    }
    let name = t(name_idx).to_string();
    let params: Vec<Vec<usize>> = params.into_iter().filter(|p| !p.is_empty()).collect();
    let params_type = match params.len() {
        0 => String::new(),
        1 => {
            let words: Vec<&str> = params[0].iter().map(|&i| t(i)).collect();
            if words == ["void"] {
                String::new()
            } else {
                if words.contains(&"&") || words.contains(&"&&") {
                    return Err(perr(format!(
                        "kernel `{name}` takes its parameter by reference; kernels take one params struct by value"
                    )));
                }
                let mut ty: Vec<&str> = words
                    .iter()
                    .copied()
                    .filter(|w| !matches!(*w, "const" | "__restrict__" | "__grid_constant__"))
                    .collect();
                if ty.len() >= 2 && toks[params[0][params[0].len() - 1]].kind == Kind::Ident && {
                    let prev = ty[ty.len() - 2];
                    prev != "::"
                } {
                    ty.pop();
                }
                ty.join(" ")
            }
        }
        n => {
            return Err(perr(format!(
                "kernel `{name}` takes {n} parameters; the emulator registry needs exactly one params struct passed \
                 by value (wrap the arguments in a struct)"
            )))
        }
    };
    Ok(Some(PendingKernel {
        name,
        params_type,
        line,
        launch_bounds,
    }))
}

/// Translates one `__shared__` statement (tokens `from..=semi`). Also returns the
/// explicit alignment of an `extern __shared__` declaration.
pub(super) fn shared_decl(
    src: &str,
    toks: &[Tok],
    from: usize,
    semi: usize,
    path: &Path,
) -> Result<(String, Option<String>), BuildError> {
    let t = |i: usize| &src[toks[i].start..toks[i].end];
    let line = toks
        .iter()
        .take(semi + 1)
        .skip(from)
        .find(|tk| &src[tk.start..tk.end] == "__shared__")
        .map_or(toks[from].line, |tk| tk.line);
    let perr = |message: String| BuildError::Parse {
        file: path.to_path_buf(),
        line,
        message,
    };
    let mut is_extern = false;
    let mut align = String::from("0");
    let mut rest: Vec<usize> = Vec::new();
    let mut i = from;
    while i < semi {
        let s = t(i);
        match s {
            "__shared__" | "static" | "__device__" | "__restrict__" => {}
            "extern" => is_extern = true,
            "__align__" | "alignas" | "__attribute__" => {
                // Balanced parens; extract the alignment value.
                let open = i + 1;
                if open >= semi || t(open) != "(" {
                    return Err(perr(format!(
                        "cannot parse `{s}` in a `__shared__` declaration"
                    )));
                }
                let mut depth = 0;
                let mut j = open;
                while j < semi {
                    match t(j) {
                        "(" => depth += 1,
                        ")" => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                if j >= semi {
                    return Err(perr(format!("unbalanced parentheses after `{s}`")));
                }
                let inner: Vec<&str> = (open + 1..j).map(t).collect();
                let value: Vec<&str> = if s == "__attribute__" {
                    // ((aligned(N)))
                    let pos = inner
                        .iter()
                        .position(|w| *w == "aligned" || *w == "__aligned__");
                    match pos {
                        Some(p) if p + 1 < inner.len() && inner[p + 1] == "(" => inner[p + 2..]
                            .iter()
                            .copied()
                            .take_while(|w| *w != ")")
                            .collect(),
                        _ => {
                            return Err(perr(
                                "unsupported __attribute__ in a `__shared__` declaration".into(),
                            ))
                        }
                    }
                } else {
                    inner
                };
                if value.is_empty() {
                    return Err(perr(format!("empty `{s}` in a `__shared__` declaration")));
                }
                align = format!("({})", value.join(" "));
                i = j;
            }
            "=" => {
                return Err(perr(
                    "`__shared__` variables cannot have initializers".into(),
                ));
            }
            _ => rest.push(i),
        }
        i += 1;
    }
    // Split declarators at top-level commas.
    let mut decls: Vec<Vec<usize>> = vec![Vec::new()];
    let (mut paren, mut angle) = (0i32, 0i32);
    for &k in &rest {
        match t(k) {
            "(" | "[" => paren += 1,
            ")" | "]" => paren -= 1,
            "<" if paren == 0 => angle += 1,
            ">" if paren == 0 && angle > 0 => angle -= 1,
            "," if paren == 0 && angle == 0 => {
                decls.push(Vec::new());
                continue;
            }
            _ => {}
        }
        if let Some(d) = decls.last_mut() {
            d.push(k);
        }
    }
    let join = |ids: &[usize]| ids.iter().map(|&k| t(k)).collect::<Vec<_>>().join(" ");
    let mut base_type: Option<String> = None;
    let mut out = Vec::new();
    for (n, d) in decls.iter().enumerate() {
        // name = last identifier before the first top-level `[`
        let bracket = d.iter().position(|&k| t(k) == "[").unwrap_or(d.len());
        let name_pos = d[..bracket]
            .iter()
            .rposition(|&k| toks[k].kind == Kind::Ident);
        let Some(name_pos) = name_pos else {
            return Err(perr(
                "cannot find the variable name in this `__shared__` declaration".into(),
            ));
        };
        if d[..bracket].iter().any(|&k| matches!(t(k), "(" | ")")) {
            return Err(perr(
                "cannot parse this `__shared__` declaration (parentheses in the declarator)".into(),
            ));
        }
        let name = t(d[name_pos]);
        let dims = &d[bracket..];
        let ty = if n == 0 {
            let prefix = &d[..name_pos];
            if prefix.is_empty() {
                return Err(perr(format!("`__shared__` variable `{name}` has no type")));
            }
            let base_end = prefix
                .iter()
                .rposition(|&k| !matches!(t(k), "*" | "&"))
                .map_or(0, |p| p + 1);
            base_type = Some(join(&prefix[..base_end]));
            join(prefix)
        } else {
            let stars = join(&d[..name_pos]);
            format!("{} {stars}", base_type.clone().unwrap_or_default())
        };
        if is_extern {
            let dims_text = join(dims);
            if !dims_text.starts_with("[ ]") {
                return Err(perr(format!(
                    "`extern __shared__ {name}` must be an array of unknown size (`{name}[]`)"
                )));
            }
            let inner = dims_text.trim_start_matches("[ ]").trim();
            out.push(format!(
                "LINATTN_EMU_EXTERN_SHARED({align}, {name}, {ty} {inner})"
            ));
        } else {
            let dims_text = join(dims);
            if dims_text.contains("[ ]") {
                return Err(perr(format!(
                    "`__shared__ {name}[]` needs a size (or `extern`)"
                )));
            }
            out.push(format!(
                "LINATTN_EMU_SHARED({align}, {name}, {ty} {dims_text})"
            ));
        }
    }
    let extern_align = (is_extern && align != "0").then_some(align);
    Ok((format!("{};", out.join("; ")), extern_align))
}
