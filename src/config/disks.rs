//! An array's candidate disks as the config names them: paths, or file-name patterns (`*` any
//! run of characters, `?` one character) such as `disks = "disks/n0-*.img"`.
//!
//! The config names *candidates*, not members: which candidate fills which slot, and which is a
//! spare, is read from the superblocks when the node assembles the array (`crate::candidates`).
//! A pattern therefore lets membership change (a replaced disk, an added spare) without editing
//! the config: a new image that matches is found at the next start.
//!
//! Patterns are expanded when the config is loaded, so everything downstream (HA reservations,
//! `--check`, the node) sees one list of concrete paths. Only the file name may hold wildcards;
//! the directory part is literal (a pattern over directories would make a typo match far more
//! than intended). Matching is pure (`matches`); listing a directory is the only I/O.

use std::path::{Path, PathBuf};

/// One entry of `disks` or `spares`, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskEntry {
    Path(PathBuf),
    /// Directory (as written, may be relative) and the file-name pattern.
    Pattern {
        dir: PathBuf,
        name: String,
    },
}

/// Whether `s` holds a wildcard.
fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?'])
}

impl DiskEntry {
    /// Splits an entry; a message when the directory part holds a wildcard.
    pub fn parse(text: &str) -> Result<DiskEntry, String> {
        let path = Path::new(text);
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            return Err(format!("`{text}` does not name a file"));
        };
        if !has_wildcard(name) {
            if has_wildcard(text) {
                return Err(format!(
                    "`{text}`: wildcards are allowed in the file name only, not in directories"
                ));
            }
            return Ok(DiskEntry::Path(path.to_path_buf()));
        }
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if has_wildcard(&dir.to_string_lossy()) {
            return Err(format!(
                "`{text}`: wildcards are allowed in the file name only, not in directories"
            ));
        }
        Ok(DiskEntry::Pattern {
            dir,
            name: name.to_string(),
        })
    }

    /// The image names a creating array uses for `members` disks: the pattern with its one `*`
    /// replaced by 0, 1, ... (`n0-*.img` gives `n0-0.img`, `n0-1.img`, ...). `None` unless the
    /// pattern has exactly one `*` and no `?`.
    pub fn numbered(&self, members: u32) -> Option<Vec<PathBuf>> {
        let DiskEntry::Pattern { dir, name } = self else {
            return None;
        };
        if name.matches('*').count() != 1 || name.contains('?') {
            return None;
        }
        Some(
            (0..members)
                .map(|i| dir.join(name.replacen('*', &i.to_string(), 1)))
                .collect(),
        )
    }
}

/// Whether file name `name` matches `pattern` (`*` any run, `?` one character).
pub fn matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Greedy matching with backtracking to the last `*`: linear for patterns like `a*b*c`.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// The files in `dir_resolved` whose names match `pattern`, sorted, joined onto `dir_as_written`
/// (so relative paths stay relative). Hidden files match only a pattern starting with `.`. A
/// directory that does not exist matches nothing (an unmounted disk directory then shows as
/// "no candidate holds the array", and a new array's images as being in a missing directory).
pub fn expand(
    dir_as_written: &Path,
    dir_resolved: &Path,
    pattern: &str,
) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir_resolved) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        other => other?,
    };
    for entry in entries {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if name.starts_with('.') && !pattern.starts_with('.') {
            continue;
        }
        if matches(pattern, &name) && !entry.file_type()?.is_dir() {
            out.push(dir_as_written.join(name));
        }
    }
    out.sort();
    Ok(out)
}

impl super::ArrayConfig {
    /// How many members a new array gets (`members`, else one per `disks` entry).
    pub fn new_member_count(&self) -> usize {
        self.members.map_or(self.disk_entries.len(), |m| m as usize)
    }

    /// The disks a new array is created over, in slot order (with `create = true`).
    pub fn new_members(&self) -> &[PathBuf] {
        &self.disks[..self.new_member_count().min(self.disks.len())]
    }
}

impl super::Config {
    /// Expands every array's `disks` and `spares` into candidate paths (`ArrayConfig::disks`,
    /// `ArrayConfig::spares`). With `create = true` the members of the new array come first:
    /// the listed paths, or for a pattern with `members = N` the numbered names.
    pub(super) fn expand_disks(&mut self) -> Result<(), super::ConfigError> {
        for i in 0..self.arrays.len() {
            let (disks, spares) = self.expand_array(i)?;
            self.arrays[i].disks = disks;
            self.arrays[i].spares = spares;
        }
        Ok(())
    }

    fn expand_array(&self, i: usize) -> Result<(Vec<PathBuf>, Vec<PathBuf>), super::ConfigError> {
        let a = &self.arrays[i];
        let key = |k: &str| format!("array[{i}].{k}");
        if a.disk_entries.is_empty() {
            return Err(self.invalid(key("disks"), "names no disk"));
        }
        let parse = |list: &[String], name: &str| {
            list.iter()
                .enumerate()
                .map(|(j, t)| {
                    DiskEntry::parse(t).map_err(|m| self.invalid(key(&format!("{name}[{j}]")), m))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let entries = parse(&a.disk_entries, "disks")?;
        let spare_entries = parse(&a.spare_entries, "spares")?;
        let mut disks: Vec<PathBuf> = Vec::new();
        if let Some(m) = a.members {
            let numbered = match (a.create, entries.as_slice()) {
                (true, [one]) => one.numbered(m),
                _ => None,
            };
            let Some(numbered) = numbered else {
                return Err(self.invalid(
                    key("members"),
                    "only used with `create = true` and `disks` one pattern with a single `*` \
                     (e.g. \"disks/n0-*.img\"), to name the new array's images",
                ));
            };
            disks.extend(numbered);
        } else if a.create
            && entries
                .iter()
                .any(|e| matches!(e, DiskEntry::Pattern { .. }))
        {
            return Err(self.invalid(
                key("members"),
                "a new array over a pattern needs `members = N` (how many disks it has)",
            ));
        }
        let mut spares = Vec::new();
        for (list, out, name) in [
            (&entries, &mut disks, "disks"),
            (&spare_entries, &mut spares, "spares"),
        ] {
            for (j, e) in list.iter().enumerate() {
                match e {
                    DiskEntry::Path(p) => {
                        if out.contains(p) && a.members.is_none() {
                            return Err(self.invalid(
                                key(&format!("{name}[{j}]")),
                                format!("disk {} is listed more than once", p.display()),
                            ));
                        }
                        push_new(out, p.clone());
                    }
                    DiskEntry::Pattern { dir, name: pat } => {
                        let resolved = self.resolve(dir);
                        let found = expand(dir, &resolved, pat).map_err(|e| {
                            self.invalid(
                                key(&format!("{name}[{j}]")),
                                format!("cannot list directory {}: {e}", resolved.display()),
                            )
                        })?;
                        for p in found {
                            push_new(out, p);
                        }
                    }
                }
            }
        }
        spares.retain(|s| !disks.contains(s));
        Ok((disks, spares))
    }
}

fn push_new(v: &mut Vec<PathBuf>, p: PathBuf) {
    if !v.contains(&p) {
        v.push(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_and_question_mark_match_file_names() {
        assert!(matches("n0-*.img", "n0-3.img"));
        assert!(matches("n0-*.img", "n0-.img"));
        assert!(matches("n0-*.img", "n0-spare-1.img"));
        assert!(!matches("n0-*.img", "n1-3.img"));
        assert!(!matches("n0-*.img", "n0-3.img.bak"));
        assert!(matches("d?.img", "d7.img"));
        assert!(!matches("d?.img", "d10.img"));
        assert!(matches("*a*b", "xxaxxbxb"));
        assert!(matches("*", ""));
    }

    #[test]
    fn wildcard_in_a_directory_is_refused() {
        assert!(DiskEntry::parse("disks/*/d.img").is_err());
        assert!(DiskEntry::parse("d*/x*.img").is_err());
        assert_eq!(
            DiskEntry::parse("disks/d0.img").unwrap(),
            DiskEntry::Path("disks/d0.img".into())
        );
    }

    #[test]
    fn numbered_names_fill_the_single_star() {
        let e = DiskEntry::parse("../disks/n0-*.img").unwrap();
        assert_eq!(
            e.numbered(2).unwrap(),
            vec![
                PathBuf::from("../disks/n0-0.img"),
                PathBuf::from("../disks/n0-1.img")
            ]
        );
        assert!(DiskEntry::parse("d*-*.img").unwrap().numbered(2).is_none());
        assert!(DiskEntry::parse("d.img").unwrap().numbered(2).is_none());
    }

    #[test]
    fn expansion_lists_matching_files_sorted_and_skips_directories() {
        let d = tempfile::tempdir().unwrap();
        for f in ["n0-b.img", "n0-a.img", "n1-a.img", ".n0-hidden.img"] {
            std::fs::write(d.path().join(f), b"").unwrap();
        }
        std::fs::create_dir(d.path().join("n0-dir.img")).unwrap();
        let got = expand(Path::new("disks"), d.path(), "n0-*.img").unwrap();
        assert_eq!(
            got,
            vec![PathBuf::from("disks/n0-a.img"), "disks/n0-b.img".into()]
        );
    }
}
