//! Where the time of a takeover goes, read from the survivor's log, and the summary of several
//! takeovers as a Markdown table.
//!
//! The failover driver knows two instants itself (the SIGKILL and the first successful I/O at
//! the dead node's address); the steps between happen inside the survivor, which logs each
//! with a UTC timestamp: the state change to `TakingOver` (partner declared failed), the end of
//! `Preempt(Partner)` (lease waited out, disks fenced), of `Assemble(Partner)` and
//! `Replay(Partner)` (journal recovery), and `HA: serving` for the partner's set. Both sides
//! use the wall clock, so the marks are comparable to the kill time on one host. Pure text
//! processing: no I/O here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Steps of one takeover, each measured from the SIGKILL.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Marks {
    /// The survivor declared the partner failed (state `TakingOver`).
    pub detected: Option<Duration>,
    /// The partner's disks were preempted (after waiting out its lease).
    pub fenced: Option<Duration>,
    /// The partner's arrays were assembled.
    pub assembled: Option<Duration>,
    /// The partner's volumes were opened, journal replay included.
    pub replayed: Option<Duration>,
    /// The survivor listened on the partner's address.
    pub serving: Option<Duration>,
}

/// One measured takeover.
#[derive(Debug, Clone, PartialEq)]
pub struct Takeover {
    pub marks: Marks,
    /// SIGKILL to the first successful read at the dead node's address.
    pub first_io: Duration,
}

/// Reads the takeover's marks from the survivor's log text, counting only lines stamped at or
/// after `killed_at`. Lines without a timestamp, or not about the takeover, are skipped.
pub fn marks_from_log(log: &str, killed_at: SystemTime) -> Marks {
    let mut m = Marks::default();
    for raw in log.lines() {
        let line = strip_ansi(raw);
        let Some((stamp, rest)) = line.split_once(' ') else {
            continue;
        };
        let Some(at) = parse_utc(stamp) else {
            continue;
        };
        let Ok(since) = at.duration_since(killed_at) else {
            continue;
        };
        let slot = if rest.contains("HA state changed") && rest.contains("to=TakingOver") {
            &mut m.detected
        } else if rest.contains("HA operation finished") && rest.contains("outcome=Done") {
            if rest.contains("op=Preempt(Partner)") {
                &mut m.fenced
            } else if rest.contains("op=Assemble(Partner)") {
                &mut m.assembled
            } else if rest.contains("op=Replay(Partner)") {
                &mut m.replayed
            } else {
                continue;
            }
        } else if rest.contains("HA: serving") && rest.contains("set=Partner") {
            &mut m.serving
        } else {
            continue;
        };
        // The first occurrence counts: a retried step keeps its first success.
        slot.get_or_insert(since);
    }
    m
}

/// The line without terminal colour sequences (`ESC [ ... letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses `2026-11-27T06:28:34.228822Z` (the log's UTC timestamps).
pub fn parse_utc(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, mo, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<u64>().ok());
    let (h, mi, sec) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&day) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos: u32 = format!("{frac:0<9}").parse().ok()?;
    let days = u64::try_from(days_from_civil(y, mo, day)).ok()?;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Median, minimum and maximum of some durations (None when there are none).
pub fn spread(mut v: Vec<Duration>) -> Option<(Duration, Duration, Duration)> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    };
    Some((median, v[0], v[n - 1]))
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// The runs as a Markdown table: one row per step, median / min / max in milliseconds from the
/// SIGKILL, and how many runs logged that step.
pub fn markdown_table(runs: &[Takeover]) -> String {
    type Pick = fn(&Takeover) -> Option<Duration>;
    let rows: [(&str, Pick); 6] = [
        ("partner declared failed (detection)", |t| t.marks.detected),
        ("disks preempted (lease waited out, fence)", |t| {
            t.marks.fenced
        }),
        ("arrays assembled", |t| t.marks.assembled),
        ("volumes open, journal replayed", |t| t.marks.replayed),
        ("listening on the dead node's address", |t| t.marks.serving),
        ("**first successful I/O at the dead node's address**", |t| {
            Some(t.first_io)
        }),
    ];
    let mut out = String::from(
        "| step (ms after SIGKILL) | median | min | max | runs |\n| --- | ---: | ---: | ---: | ---: |\n",
    );
    for (name, pick) in rows {
        let v: Vec<Duration> = runs.iter().filter_map(pick).collect();
        let n = v.len();
        match spread(v) {
            Some((med, lo, hi)) => out.push_str(&format!(
                "| {name} | {} | {} | {} | {n} |\n",
                ms(med),
                ms(lo),
                ms(hi)
            )),
            None => out.push_str(&format!("| {name} | - | - | - | 0 |\n")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_timestamps_parse_to_the_right_instant() {
        let t = parse_utc("1970-01-02T00:00:01.5Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_millis(86_401_500)
        );
        let t = parse_utc("2026-11-27T06:28:34.228822Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_795_760_914
        );
        assert_eq!(parse_utc("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_utc("garbage"), None);
        assert_eq!(parse_utc("2026-11-27T06:28:34.12x4Z"), None);
    }

    #[test]
    fn takeover_steps_are_read_from_a_coloured_log() {
        let kill = parse_utc("2026-11-27T06:00:00.000000Z").unwrap();
        let log = "\
2026-11-27T05:59:59.900000Z  INFO HA state changed from=Normal to=TakingOver
\u{1b}[2m2026-11-27T06:00:00.500000Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m HA state changed \u{1b}[3mfrom\u{1b}[0m\u{1b}[2m=\u{1b}[0mNormal \u{1b}[3mto\u{1b}[0m\u{1b}[2m=\u{1b}[0mTakingOver
2026-11-27T06:00:00.600000Z  INFO HA operation finished op=Preempt(Partner) outcome=Done
2026-11-27T06:00:00.610000Z  INFO HA operation finished op=Assemble(Partner) outcome=Failed(\"x\")
2026-11-27T06:00:00.700000Z  INFO HA operation finished op=Assemble(Partner) outcome=Done
2026-11-27T06:00:00.750000Z  INFO HA operation finished op=Replay(Partner) outcome=Done
2026-11-27T06:00:00.760000Z  INFO HA: serving set=Partner bound=[127.0.0.1:10810]
2026-11-27T06:00:00.800000Z  INFO HA operation finished op=Replay(Partner) outcome=Done
not a log line
";
        let m = marks_from_log(log, kill);
        let ms = Duration::from_millis;
        assert_eq!(
            m,
            Marks {
                detected: Some(ms(500)),
                fenced: Some(ms(600)),
                assembled: Some(ms(700)),
                replayed: Some(ms(750)),
                serving: Some(ms(760)),
            }
        );
    }

    #[test]
    fn spread_gives_median_min_max() {
        let ms = Duration::from_millis;
        assert_eq!(spread(vec![]), None);
        assert_eq!(
            spread(vec![ms(30), ms(10), ms(20)]),
            Some((ms(20), ms(10), ms(30)))
        );
        assert_eq!(
            spread(vec![ms(40), ms(10), ms(20), ms(30)]),
            Some((ms(25), ms(10), ms(40)))
        );
    }

    #[test]
    fn table_has_a_row_per_step_and_counts_missing_marks() {
        let ms = Duration::from_millis;
        let runs = vec![
            Takeover {
                marks: Marks {
                    detected: Some(ms(500)),
                    ..Marks::default()
                },
                first_io: ms(900),
            },
            Takeover {
                marks: Marks::default(),
                first_io: ms(1100),
            },
        ];
        let t = markdown_table(&runs);
        assert!(t.contains("| partner declared failed (detection) | 500 | 500 | 500 | 1 |"));
        assert!(t.contains("| arrays assembled | - | - | - | 0 |"));
        assert!(t.contains(
            "first successful I/O at the dead node's address** | 1000 | 900 | 1100 | 2 |"
        ));
        assert_eq!(t.lines().count(), 8);
    }
}
