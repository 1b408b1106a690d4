//! Progress of a long operation on the terminal (issue 6): a bar with the rate and the
//! time to go, redrawn in place on a terminal; plain lines when stderr is not one (a log,
//! a pipe), one per tenth of the work or every 5 s, whichever comes first. Always on
//! stderr, so a command's output (`--json`) stays clean.
//!
//! Users: `strata fsck --data` (blocks checked), `strata volume info --watch` (a
//! volume's resync, whose total grows while a copy still misses writes) and `strata
//! snapshot delete --wait` (the space the cleaner gives back).

use std::io::Write;
use std::time::{Duration, Instant};
use strata_types::format_size;

/// A terminal is redrawn at most this often.
const REDRAW_EVERY: Duration = Duration::from_millis(100);
/// Without a terminal, a line at least this often.
const LINE_EVERY: Duration = Duration::from_secs(5);
/// Work that has not moved for this long shows no rate and no time to go (an average
/// since the start would promise an end that is not coming).
const STILL_AFTER: Duration = Duration::from_secs(3);

/// One operation's progress, in bytes.
pub struct Progress {
    what: String,
    total: u64,
    started: Instant,
    shown: Option<Instant>,
    /// Tenths of the work already reported (plain lines).
    tenths: u64,
    /// The whole is shown done already.
    ended: bool,
    terminal: bool,
    /// The latest `done` told, and when it last changed.
    moved: (u64, Instant),
}

impl Progress {
    /// Progress of `what` over `total` bytes, on stderr.
    pub fn new(what: impl Into<String>, total: u64) -> Progress {
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let started = Instant::now();
        let what = what.into();
        let moved = (0, started);
        Progress { what, total, started, shown: None, tenths: 0, ended: false, terminal, moved }
    }

    /// The work turned out to be `total` bytes (a resync's grows while writes miss a
    /// copy; a reclaim's shrinks when other work frees the same space).
    pub fn set_total(&mut self, total: u64) {
        self.total = total;
    }

    /// Prints `line` on its own (above the bar on a terminal, which the next update
    /// redraws): an event worth keeping in the scrollback, like a copy changing state.
    pub fn note(&mut self, line: &str) {
        let mut err = std::io::stderr().lock();
        let _ =
            if self.terminal { writeln!(err, "\r\x1b[K{line}") } else { writeln!(err, "{line}") };
        let _ = err.flush();
        // Redraw the bar at the next update.
        self.shown = None;
    }

    /// `done` bytes of the total are done.
    pub fn update(&mut self, done: u64) {
        let now = Instant::now();
        if done != self.moved.0 {
            self.moved = (done, now);
        }
        let due = if self.terminal {
            self.shown.is_none_or(|t| now - t >= REDRAW_EVERY)
        } else {
            let tenths = (done * 10).checked_div(self.total).unwrap_or(10);
            let due = tenths > self.tenths || self.shown.is_none_or(|t| now - t >= LINE_EVERY);
            self.tenths = self.tenths.max(tenths);
            due
        };
        if due {
            self.shown = Some(now);
            self.show(done);
        }
    }

    /// The work is done: a last line at 100 % (unless it was just shown).
    pub fn finish(&mut self) {
        if !self.ended || self.terminal {
            self.show(self.total);
        }
        if self.terminal {
            eprintln!();
        }
    }

    /// The work ends short of done (given up, or failed): ends the bar's line on a
    /// terminal, so what follows starts on its own.
    pub fn stop(&mut self) {
        if self.terminal && self.shown.is_some() {
            eprintln!();
        }
        self.shown = None;
    }

    fn show(&mut self, done: u64) {
        self.ended = done >= self.total;
        let still = self.moved.1.elapsed() >= STILL_AFTER;
        let line = self.line(done, self.started.elapsed(), still);
        let mut err = std::io::stderr().lock();
        let _ = if self.terminal { write!(err, "\r{line}\x1b[K") } else { writeln!(err, "{line}") };
        let _ = err.flush();
    }

    /// `what [#####-----]  50%  1.0G of 2.0G  100 MB/s  ETA 10s`.
    fn line(&self, done: u64, elapsed: Duration, still: bool) -> String {
        let done = done.min(self.total);
        let permille = (done * 1000).checked_div(self.total).unwrap_or(1000);
        let filled = (permille / 50) as usize;
        let bar = format!("[{}{}]", "#".repeat(filled), "-".repeat(20 - filled));
        let secs = elapsed.as_secs_f64();
        // (A rate over the first moments means little.)
        let rate = if secs >= 0.5 { done as f64 / secs } else { 0.0 };
        let eta = if done >= self.total {
            "done".to_owned()
        } else if still {
            return format!(
                "{} {bar} {:>3}%  {} of {}  not moving",
                self.what,
                permille / 10,
                format_size(done),
                format_size(self.total),
            );
        } else if rate > 0.0 {
            format!("ETA {}s", ((self.total - done) as f64 / rate).ceil() as u64)
        } else {
            "ETA ?".to_owned()
        };
        let rate = if rate > 0.0 { format!("{:.0} MB/s", rate / 1e6) } else { "- MB/s".into() };
        format!(
            "{} {bar} {:>3}%  {} of {}  {rate}  {eta}",
            self.what,
            permille / 10,
            format_size(done),
            format_size(self.total),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_shows_the_bar_share_sizes_rate_and_time_to_go() {
        let p = Progress {
            what: "checking".into(),
            total: 2 << 30,
            started: Instant::now(),
            shown: None,
            tenths: 0,
            ended: false,
            terminal: false,
            moved: (0, Instant::now()),
        };
        let line = p.line(1 << 30, Duration::from_secs(10), false);
        assert!(line.starts_with("checking [##########----------]  50%"), "{line}");
        assert!(line.contains("1G of 2G") && line.contains("107 MB/s"), "{line}");
        assert!(line.ends_with("ETA 10s"), "{line}");
        // Stuck: no rate, no promise.
        let stuck = p.line(1 << 30, Duration::from_secs(60), true);
        assert!(stuck.ends_with("50%  1G of 2G  not moving"), "{stuck}");
        assert!(p
            .line(2 << 30, Duration::from_secs(20), false)
            .ends_with("100%  2G of 2G  107 MB/s  done"));
        // Nothing to do: done at once, no division by zero.
        let empty = Progress { total: 0, ..p };
        assert!(
            empty.line(0, Duration::ZERO, false).contains("100%"),
            "{}",
            empty.line(0, Duration::ZERO, false)
        );
    }
}
