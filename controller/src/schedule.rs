//! When a GpuWorkload's next periodic checkpoint is due: a fixed interval or a cron
//! expression, both counted from the last checkpoint. The CRD schema cannot parse cron,
//! so an expression is checked here and a bad one is reported, never guessed at.

use std::str::FromStr;

use k8s_openapi::jiff::Timestamp;

use kybernate_api::CheckpointSchedule;

/// A schedule that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// `spec.schedule.cron` does not parse.
    #[error("spec.schedule.cron {expr:?} is not a valid cron expression: {reason}")]
    InvalidCron {
        /// The expression as written.
        expr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Neither field is set (the schema forbids it; kept for objects from older schemas).
    #[error("spec.schedule sets neither intervalSeconds nor cron")]
    Missing,
}

/// A usable checkpoint schedule.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Every so many seconds.
    Interval(i64),
    /// At the times a cron expression matches (UTC).
    Cron(Box<cron::Schedule>),
}

impl Schedule {
    /// Checks `spec` (cron takes precedence, the schema allows only one of the two).
    pub fn parse(spec: &CheckpointSchedule) -> Result<Self, ScheduleError> {
        match (&spec.cron, spec.interval_seconds) {
            (Some(expr), _) => parse_cron(expr).map(|c| Self::Cron(Box::new(c))),
            (None, Some(seconds)) => Ok(Self::Interval(i64::from(seconds))),
            (None, None) => Err(ScheduleError::Missing),
        }
    }

    /// The first run strictly after `last` (the last checkpoint's time), or `None` when a
    /// cron expression never matches again.
    pub fn next_after(&self, last: Timestamp) -> Option<Timestamp> {
        match self {
            Self::Interval(seconds) => last.checked_add(jiff_seconds(*seconds)).ok(),
            Self::Cron(cron) => {
                let after = chrono::DateTime::from_timestamp(last.as_second(), 0)?;
                let next = cron.after(&after).next()?;
                Timestamp::from_second(next.timestamp()).ok()
            }
        }
    }
}

fn jiff_seconds(seconds: i64) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::from_secs(seconds)
}

/// Parses a five-field cron expression (`minute hour day-of-month month day-of-week`, the
/// format of Kubernetes CronJobs). Day-of-week numbers are 0–7 with 0 and 7 = Sunday.
pub fn parse_cron(expr: &str) -> Result<cron::Schedule, ScheduleError> {
    let invalid = |reason: String| ScheduleError::InvalidCron {
        expr: expr.to_owned(),
        reason,
    };
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let [minute, hour, day, month, weekday] = fields.as_slice() else {
        return Err(invalid(format!(
            "expected 5 fields (minute hour day-of-month month day-of-week), found {}",
            fields.len()
        )));
    };
    let weekday = weekday_field(weekday).map_err(invalid)?;
    // The cron crate's format has seconds first; a checkpoint runs at second 0.
    let full = format!("0 {minute} {hour} {day} {month} {weekday}");
    cron::Schedule::from_str(&full).map_err(|e| invalid(e.to_string()))
}

/// Rewrites a day-of-week field from cron numbering (0–7, Sunday = 0 or 7) to the cron
/// crate's (1–7, Sunday = 1). Names and `*` stay as they are.
fn weekday_field(field: &str) -> Result<String, String> {
    let day = |s: &str| -> Result<Option<u8>, String> {
        if s.chars().all(|c| c.is_ascii_alphabetic()) || s == "*" {
            return Ok(None);
        }
        match s.parse::<u8>() {
            Ok(n) if n <= 7 => Ok(Some(n)),
            _ => Err(format!(
                "day-of-week {s:?} is not 0-7 (0 and 7 are Sunday) or a name"
            )),
        }
    };
    let shift = |n: u8| n % 7 + 1;
    let mut items = Vec::new();
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (item, None),
        };
        let step = step.map(|s| format!("/{s}")).unwrap_or_default();
        match range.split_once('-') {
            Some((a, b)) => match (day(a)?, day(b)?) {
                (Some(a), Some(7)) if step.is_empty() => {
                    items.push(format!("{}-7", shift(a)));
                    items.push("1".into());
                }
                (Some(_), Some(7)) => {
                    return Err(format!(
                        "day-of-week range {range:?} with a step must end at 6, not 7"
                    ))
                }
                (Some(a), Some(b)) => items.push(format!("{}-{}{step}", shift(a), shift(b))),
                (None, None) => items.push(item.to_owned()),
                _ => {
                    return Err(format!(
                        "day-of-week range {range:?} mixes names and numbers"
                    ))
                }
            },
            None => match day(range)? {
                Some(n) => items.push(format!("{}{step}", shift(n))),
                None => items.push(item.to_owned()),
            },
        }
    }
    Ok(items.join(","))
}
