//! The view spec (TOML, docs/VIEWS.md): named sources and the maps that
//! place their directories in the view, with filters and renames. Parsing
//! checks everything a mount would trip over, and every error says where
//! (line and column in the spec).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    #[serde(default)]
    sources: BTreeMap<String, Spanned<String>>,
    #[serde(default, rename = "map")]
    maps: Vec<RawMap>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMap {
    path: Spanned<String>,
    from: Spanned<String>,
    #[serde(default)]
    include: Vec<Spanned<String>>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
    #[serde(default = "yes")]
    hidden: bool,
    #[serde(default)]
    rename: Vec<Spanned<String>>,
    #[serde(default)]
    archives: Option<Spanned<String>>,
}

fn yes() -> bool {
    true
}

/// A source: a host directory or an archive file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub path: PathBuf,
}

/// One map: the directory `sub` of source `source` shown at `path`.
#[derive(Clone, Debug)]
pub struct Map {
    /// Components of the place in the view (empty: the root).
    pub path: Vec<Vec<u8>>,
    /// Index into [`Spec::sources`].
    pub source: usize,
    /// Components of the directory in the source (empty: its root).
    pub sub: Vec<Vec<u8>>,
    /// Globs a non-directory's name must match one of (empty: all).
    pub include: Vec<glob::Pattern>,
    /// Globs that hide a name (any kind).
    pub exclude: Vec<glob::Pattern>,
    /// Whether names starting with `.` show.
    pub hidden: bool,
    /// Extension renames `(from, to)`, dots included: `X.BIN` shows as `X.ROM`.
    pub renames: Vec<(Vec<u8>, Vec<u8>)>,
    /// How archive files in the source show.
    pub archives: ArchiveMode,
}

/// How a map shows the archive files (zip, tar, ...) of its source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ArchiveMode {
    /// As the files they are.
    #[default]
    File,
    /// As directories of their members, under the archive's own name.
    Dir,
    /// Their top-level members in the archive's directory, the archive
    /// itself not shown (one that does not open shows as the file).
    Flatten,
    /// The one file an archive holds (after the map's filters) in the
    /// archive's directory; an archive of more shows as a directory.
    Auto,
}

/// A checked spec.
#[derive(Clone, Debug)]
pub struct Spec {
    pub sources: Vec<Source>,
    pub maps: Vec<Map>,
}

/// `line:column` (1-based) of byte `at` in `text`.
fn position(text: &str, at: usize) -> String {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("{line}:{col}")
}

/// Splits a `/`-separated path into components, each a valid name.
fn components(path: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if let Some(why) = strata_image::entry_name_problem(part.as_bytes()) {
            return Err(format!("component {part:?} {why}"));
        }
        out.push(part.as_bytes().to_vec());
    }
    Ok(out)
}

impl Spec {
    /// Reads and checks the spec at `file`; relative source paths are
    /// relative to the spec's directory. Errors: one line each, `FILE:LINE:COL: what`.
    pub fn load(file: &Path) -> Result<Spec, Vec<String>> {
        let text =
            std::fs::read_to_string(file).map_err(|e| vec![format!("{}: {e}", file.display())])?;
        Spec::parse(&text, file)
    }

    /// Checks a spec's `text` (read from `file`, which names it in errors).
    pub fn parse(text: &str, file: &Path) -> Result<Spec, Vec<String>> {
        let shown = file.display();
        let raw: RawSpec = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(String::new(), |s| position(text, s.start));
            vec![format!("{shown}:{at}: {}", e.message().trim())]
        })?;
        let base = file.parent().unwrap_or(Path::new("."));
        let mut errors = Vec::new();
        let mut err =
            |at: usize, msg: String| errors.push(format!("{shown}:{}: {msg}", position(text, at)));
        let mut sources = Vec::new();
        for (name, path) in &raw.sources {
            let p = base.join(path.get_ref());
            if name.is_empty() || name.contains(':') {
                err(
                    path.span().start,
                    format!("source name {name:?} must be non-empty, without ':'"),
                );
            }
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() || m.is_file() => {}
                Ok(_) => err(
                    path.span().start,
                    format!(
                        "source {name}: {} is neither a directory nor an archive",
                        p.display()
                    ),
                ),
                Err(e) => err(
                    path.span().start,
                    format!("source {name}: {}: {e}", p.display()),
                ),
            }
            sources.push(Source {
                name: name.clone(),
                path: p,
            });
        }
        let mut maps = Vec::new();
        for (i, m) in raw.maps.iter().enumerate() {
            let n = i + 1;
            let path = components(m.path.get_ref()).unwrap_or_else(|why| {
                err(m.path.span().start, format!("map {n}: path: {why}"));
                Vec::new()
            });
            let (src_name, sub) = m
                .from
                .get_ref()
                .split_once(':')
                .unwrap_or((m.from.get_ref().as_str(), ""));
            let source = sources.iter().position(|s| s.name == src_name);
            if source.is_none() {
                let known: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
                err(
                    m.from.span().start,
                    format!(
                        "map {n}: from = {:?} names no source (sources: {})",
                        m.from.get_ref(),
                        known.join(", ")
                    ),
                );
            }
            let sub = components(sub).unwrap_or_else(|why| {
                err(m.from.span().start, format!("map {n}: from: {why}"));
                Vec::new()
            });
            let mut globs = |list: &[Spanned<String>], what: &str| -> Vec<glob::Pattern> {
                list.iter()
                    .filter_map(|g| match glob::Pattern::new(g.get_ref()) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            err(
                                g.span().start,
                                format!("map {n}: {what} {:?}: {e}", g.get_ref()),
                            );
                            None
                        }
                    })
                    .collect()
            };
            let include = globs(&m.include, "include");
            let exclude = globs(&m.exclude, "exclude");
            let mut renames: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            for r in &m.rename {
                let ok = r.get_ref().split_once(':').filter(|(a, b)| {
                    let good = |e: &str| !e.is_empty() && !e.contains(['/', '\0', '.', ':']);
                    good(a) && good(b) && a != b
                });
                let Some((from, to)) = ok else {
                    err(
                        r.span().start,
                        format!(
                            "map {n}: rename {:?}: expected FROM:TO, two different extensions without '.', '/' or ':'",
                            r.get_ref()
                        ),
                    );
                    continue;
                };
                let (from, to) = (
                    format!(".{from}").into_bytes(),
                    format!(".{to}").into_bytes(),
                );
                if renames
                    .iter()
                    .any(|(f, t)| *f == from || *t == to || *f == to || *t == from)
                {
                    err(
                        r.span().start,
                        format!(
                            "map {n}: rename {:?} collides with another rename of this map",
                            r.get_ref()
                        ),
                    );
                    continue;
                }
                renames.push((from, to));
            }
            let archives = match m
                .archives
                .as_ref()
                .map(|a| (a.get_ref().as_str(), a.span().start))
            {
                None | Some(("file", _)) => ArchiveMode::File,
                Some(("dir", _)) => ArchiveMode::Dir,
                Some(("flatten", _)) => ArchiveMode::Flatten,
                Some(("auto", _)) => ArchiveMode::Auto,
                Some((other, at)) => {
                    err(
                        at,
                        format!(
                            "map {n}: archives = {other:?}: expected \"file\", \"dir\", \"flatten\" or \"auto\""
                        ),
                    );
                    ArchiveMode::File
                }
            };
            maps.push(Map {
                path,
                source: source.unwrap_or(0),
                sub,
                include,
                exclude,
                hidden: m.hidden,
                renames,
                archives,
            });
        }
        if raw.maps.is_empty() {
            errors.push(format!("{shown}: no [[map]]: the view would be empty"));
        }
        if errors.is_empty() {
            Ok(Spec { sources, maps })
        } else {
            Err(errors)
        }
    }

    /// What each map shows where, one line each (for `strata view check`).
    pub fn describe(&self) -> Vec<String> {
        let join = |c: &[Vec<u8>]| -> String {
            c.iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect::<Vec<_>>()
                .join("/")
        };
        self.maps
            .iter()
            .map(|m| {
                let src = &self.sources[m.source];
                let from = if m.sub.is_empty() {
                    src.path.clone()
                } else {
                    src.path.join(join(&m.sub))
                };
                let mut line = format!("/{} <- {}", join(&m.path), from.display());
                if !m.include.is_empty() {
                    let g: Vec<&str> = m.include.iter().map(|p| p.as_str()).collect();
                    line += &format!(" include {}", g.join(","));
                }
                if !m.exclude.is_empty() {
                    let g: Vec<&str> = m.exclude.iter().map(|p| p.as_str()).collect();
                    line += &format!(" exclude {}", g.join(","));
                }
                if !m.hidden {
                    line += " no-hidden";
                }
                match m.archives {
                    ArchiveMode::File => {}
                    ArchiveMode::Dir => line += " archives-as-dirs",
                    ArchiveMode::Flatten => line += " archives-flattened",
                    ArchiveMode::Auto => line += " archives-auto",
                }
                for (f, t) in &m.renames {
                    line += &format!(
                        " rename *{}->*{}",
                        String::from_utf8_lossy(f),
                        String::from_utf8_lossy(t)
                    );
                }
                line
            })
            .collect()
    }
}
