//! The node's generation number: persisted in `ha.generation` in the data directory and increased
//! at every start.
//!
//! Status records are ordered by (generation, sequence), and the sequence restarts at every start,
//! so a restarted node must use a strictly greater generation or its partner would take its new
//! records for old ones and ignore them. The file is written before the node sends anything
//! (temp file, fsync, rename, fsync of the directory), so a crash right after a start cannot make
//! the next start reuse the number.
//!
//! Format (version 1, documented in `docs/FORMATS.md`): one line of ASCII text,
//! `twinblock-generation 1 <decimal u64>\n`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name inside the node's data directory.
pub const GENERATION_FILE: &str = "ha.generation";
/// First word of the file.
const MAGIC_WORD: &str = "twinblock-generation";
/// Format version written and accepted.
const FORMAT_VERSION: u32 = 1;
/// Longest file accepted; anything longer is not ours.
const MAX_FILE_BYTES: u64 = 256;

#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    #[error("generation file {path}: {action} failed: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error(
        "generation file {path} is damaged ({problem}); the node cannot know which generation is \
         safe to use. If the node is stopped, its partner's `twinctl status` shows the last \
         generation it saw: write `twinblock-generation 1 <that + 1>` into the file"
    )]
    Damaged { path: PathBuf, problem: String },
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> GenerationError {
    let path = path.to_path_buf();
    move |source| GenerationError::Io {
        path,
        action,
        source,
    }
}

/// Parses the file's text; `Err(problem)` when it is not a version-1 generation line.
pub fn parse(text: &str) -> Result<u64, String> {
    let mut words = text.split_ascii_whitespace();
    if words.next() != Some(MAGIC_WORD) {
        return Err(format!("does not start with `{MAGIC_WORD}`"));
    }
    match words.next().map(str::parse::<u32>) {
        Some(Ok(FORMAT_VERSION)) => {}
        Some(Ok(v)) => {
            return Err(format!(
                "format version {v}, this build reads {FORMAT_VERSION}"
            ))
        }
        _ => return Err("no format version".into()),
    }
    let value = words
        .next()
        .ok_or("no generation number")?
        .parse::<u64>()
        .map_err(|e| format!("generation number: {e}"))?;
    if words.next().is_some() {
        return Err("trailing text after the generation number".into());
    }
    Ok(value)
}

/// The text stored for `generation`.
pub fn render(generation: u64) -> String {
    format!("{MAGIC_WORD} {FORMAT_VERSION} {generation}\n")
}

/// Reads the generation stored in `dir` (0 when there is no file yet).
pub fn read(dir: &Path) -> Result<u64, GenerationError> {
    let path = dir.join(GENERATION_FILE);
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err(&path, "stat")(e)),
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(GenerationError::Damaged {
            path,
            problem: format!(
                "{} bytes long, at most {MAX_FILE_BYTES} expected",
                meta.len()
            ),
        });
    }
    let text = fs::read_to_string(&path).map_err(io_err(&path, "read"))?;
    parse(&text).map_err(|problem| GenerationError::Damaged { path, problem })
}

/// Increases the stored generation by one, durably, and returns the new value.
pub fn next(dir: &Path) -> Result<u64, GenerationError> {
    let previous = read(dir)?;
    let path = dir.join(GENERATION_FILE);
    let value = previous
        .checked_add(1)
        .ok_or_else(|| GenerationError::Damaged {
            path: path.clone(),
            problem: "generation number at its maximum".into(),
        })?;
    fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
    let temp = dir.join(format!("{GENERATION_FILE}.tmp"));
    let mut f = fs::File::create(&temp).map_err(io_err(&temp, "create"))?;
    f.write_all(render(value).as_bytes())
        .map_err(io_err(&temp, "write"))?;
    f.sync_all().map_err(io_err(&temp, "fsync"))?;
    drop(f);
    fs::rename(&temp, &path).map_err(io_err(&path, "rename"))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync directory"))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_start_gets_a_greater_generation() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), 0);
        assert_eq!(next(dir.path()).unwrap(), 1);
        assert_eq!(next(dir.path()).unwrap(), 2);
        assert_eq!(read(dir.path()).unwrap(), 2);
        let text = fs::read_to_string(dir.path().join(GENERATION_FILE)).unwrap();
        assert_eq!(text, "twinblock-generation 1 2\n");
    }

    #[test]
    fn a_damaged_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(GENERATION_FILE);
        for bad in [
            "",
            "garbage",
            "twinblock-generation 2 5\n",
            "twinblock-generation 1 x\n",
            "twinblock-generation 1 5 6\n",
        ] {
            fs::write(&p, bad).unwrap();
            let e = next(dir.path()).unwrap_err().to_string();
            assert!(e.contains("damaged"), "{bad:?}: {e}");
            assert_eq!(fs::read_to_string(&p).unwrap(), bad);
        }
    }
}
