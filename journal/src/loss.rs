//! Knowing when acknowledged writes were lost with the NVRAM log: a start that finds a missing,
//! blank or foreign log for a store whose journal did not stop cleanly.
//!
//! The store (the RAID array's superblocks) records a [`StoreMark`]: which log journals it (the
//! log id of the NVRAM file header), whether that journal stopped cleanly, and the time of its
//! newest consistency point. Its `applied_seq` is the log's head as of that CP. At the next start
//! the journal compares the mark with the NVRAM file it opened:
//!
//! | mark | file's log | verdict |
//! | --- | --- | --- |
//! | none recorded (nil id, older array) | any | nothing known, nothing lost |
//! | stopped clean | any | nothing lost (every record was applied) |
//! | not clean | the same log | normal recovery replays it |
//! | not clean | another log (new, blank, foreign) | writes after `applied_seq` may be lost |
//!
//! [`assess`] is the pure decision; [`check_log_continuity`] reads the two sides. The caller
//! decides what a loss means: refuse to serve, fetch the records from the partner's copy, or go
//! on because the operator accepted it.

use std::path::PathBuf;

use crate::backing::Backing;
use crate::error::JournalError;
use crate::nvram::Nvram;
use crate::pmem::PersistenceMode;
use crate::recover::backing_err;

/// What a store records about the NVRAM log that journals it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreMark {
    /// The log id; all zero when none was recorded.
    pub log_id: [u8; 16],
    /// The journal stopped cleanly: its final CP applied every record.
    pub stopped_clean: bool,
    /// Unix milliseconds of the newest CP; 0 when unknown.
    pub last_cp_unix_ms: u64,
}

/// Why the log found at start is not the one the store recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossCause {
    /// The NVRAM file was missing or blank and was formatted at this start (a power cut with the
    /// file in RAM, or the file deleted).
    MissingOrBlank,
    /// The file holds a different log (another file put in its place).
    Foreign,
}

/// Acknowledged writes that may be lost: what a start found and what it means.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LostWrites {
    /// The first seq that may be lost (the store holds every record up to the one before).
    pub first_lost_seq: u64,
    /// Unix milliseconds of the newest CP before the stop; 0 when unknown.
    pub last_cp_unix_ms: u64,
    /// The log the store recorded (UUID text).
    pub recorded_log_id: String,
    /// The log found (UUID text).
    pub found_log_id: String,
    pub cause: LossCause,
    pub nvram_path: PathBuf,
    pub persistence: PersistenceMode,
    /// The NVRAM medium keeps what was persisted across a loss of power.
    pub medium_survives_power_loss: bool,
}

impl LostWrites {
    /// One operator-readable sentence: what was lost, since when, and why.
    pub fn describe(&self) -> String {
        let when = if self.last_cp_unix_ms == 0 {
            "at an unknown time".to_string()
        } else {
            format!("at {}", format_unix_ms(self.last_cp_unix_ms))
        };
        let found = match self.cause {
            LossCause::MissingOrBlank => format!(
                "NVRAM file {} was missing or blank at this start",
                self.nvram_path.display()
            ),
            LossCause::Foreign => format!(
                "NVRAM file {} holds another log ({})",
                self.nvram_path.display(),
                self.found_log_id
            ),
        };
        let why = if self.medium_survives_power_loss {
            "the file was removed or replaced".to_string()
        } else {
            format!(
                "its medium (persistence \"{}\" or a file in RAM) does not survive a loss of power",
                persistence_name(self.persistence)
            )
        };
        format!(
            "acknowledged writes with seq {} and later may be lost: the journal did not stop \
             cleanly, its last consistency point was {when}, and the log that held the newer \
             records ({}) is gone: {found}; {why}",
            self.first_lost_seq, self.recorded_log_id
        )
    }
}

fn persistence_name(p: PersistenceMode) -> &'static str {
    match p {
        PersistenceMode::None => "none",
        PersistenceMode::Msync => "msync",
        PersistenceMode::Pmem => "pmem",
    }
}

/// `ms` since the Unix epoch as UTC `YYYY-MM-DD hh:mm:ss.mmm UTC`.
pub fn format_unix_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's civil-from-days).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// What a start knows about its log, for [`assess`].
#[derive(Debug, Clone)]
pub struct FoundLog {
    pub log_id: [u8; 16],
    /// The own log was never written: the file was formatted at this start (missing or all
    /// zero), or at an earlier start that refused to serve.
    pub formatted: bool,
    pub path: PathBuf,
    pub persistence: PersistenceMode,
    pub survives_power_loss: bool,
}

/// The pure decision of the module table: `Some` when acknowledged writes may be lost.
pub fn assess(mark: Option<StoreMark>, applied_seq: u64, found: &FoundLog) -> Option<LostWrites> {
    let mark = mark?;
    if mark.log_id == [0; 16] || mark.stopped_clean || mark.log_id == found.log_id {
        return None;
    }
    Some(LostWrites {
        first_lost_seq: applied_seq.saturating_add(1),
        last_cp_unix_ms: mark.last_cp_unix_ms,
        recorded_log_id: uuid::Uuid::from_bytes(mark.log_id).to_string(),
        found_log_id: uuid::Uuid::from_bytes(found.log_id).to_string(),
        cause: if found.formatted {
            LossCause::MissingOrBlank
        } else {
            LossCause::Foreign
        },
        nvram_path: found.path.clone(),
        persistence: found.persistence,
        medium_survives_power_loss: found.survives_power_loss,
    })
}

/// Compares the store's mark with the NVRAM file just opened (before the journal opens on it).
/// `Ok(Some(..))`: acknowledged writes may be lost; nothing was written anywhere.
pub async fn check_log_continuity<B: Backing>(
    nvram: &Nvram,
    backing: &B,
) -> Result<Option<LostWrites>, JournalError> {
    let mark = backing
        .journal_mark()
        .await
        .map_err(backing_err("journal_mark", 0))?;
    let applied = backing
        .applied_seq()
        .await
        .map_err(backing_err("applied_seq", 0))?;
    Ok(assess(mark, applied, &found_log(nvram)))
}

/// What `nvram` is, for [`assess`].
pub fn found_log(nvram: &Nvram) -> FoundLog {
    FoundLog {
        log_id: nvram.log_id(),
        formatted: nvram.formatted() || nvram.own_log_unused(),
        path: nvram.path().to_path_buf(),
        persistence: nvram.persistence(),
        survives_power_loss: nvram.survives_power_loss(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(id: u8, formatted: bool) -> FoundLog {
        FoundLog {
            log_id: [id; 16],
            formatted,
            path: "/dev/shm/x.nvram".into(),
            persistence: PersistenceMode::None,
            survives_power_loss: false,
        }
    }

    fn mark(id: u8, clean: bool) -> Option<StoreMark> {
        Some(StoreMark {
            log_id: [id; 16],
            stopped_clean: clean,
            last_cp_unix_ms: 1_800_000_000_123,
        })
    }

    #[test]
    fn unclean_stop_with_a_new_blank_log_is_a_loss() {
        let l = assess(mark(1, false), 41, &found(2, true)).unwrap();
        assert_eq!(l.first_lost_seq, 42);
        assert_eq!(l.cause, LossCause::MissingOrBlank);
        let text = l.describe();
        assert!(text.contains("seq 42"), "{text}");
        assert!(text.contains("2027-01-15 08:00:00.123 UTC"), "{text}");
        assert!(text.contains("does not survive a loss of power"), "{text}");
    }

    #[test]
    fn unclean_stop_with_another_existing_log_is_a_foreign_loss() {
        let l = assess(mark(1, false), 7, &found(3, false)).unwrap();
        assert_eq!(l.cause, LossCause::Foreign);
    }

    #[test]
    fn same_log_is_not_a_loss() {
        assert_eq!(assess(mark(1, false), 7, &found(1, false)), None);
    }

    #[test]
    fn clean_stop_loses_nothing_whatever_the_log() {
        assert_eq!(assess(mark(1, true), 7, &found(2, true)), None);
    }

    #[test]
    fn store_without_a_mark_is_not_judged() {
        assert_eq!(assess(None, 7, &found(2, true)), None);
        assert_eq!(assess(mark(0, false), 7, &found(2, true)), None);
    }

    #[test]
    fn dates_are_formatted_in_utc() {
        assert_eq!(format_unix_ms(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(
            format_unix_ms(951_782_400_000),
            "2000-02-29 00:00:00.000 UTC"
        );
    }
}
