//! A progress bar on stderr for rounds of libvirt calls that take longer
//! than a second (about 30 calls), drawn only when stderr is a terminal.

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ckptstore::{Progress, ProgressFn, StepPhase};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Show the bar only for rounds that last longer than this.
const SHOW_AFTER: Duration = Duration::from_secs(1);

/// The progress callback for the store, or `None` when stderr is not a
/// terminal (logs, pipes, tests).
pub fn bar() -> Option<ProgressFn> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let round: Mutex<Option<(Instant, ProgressBar)>> = Mutex::new(None);
    Some(Arc::new(move |p: &Progress| {
        let mut round = round
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if p.done == 0 || round.is_none() {
            *round = Some((Instant::now(), ProgressBar::hidden()));
        }
        let Some((started, bar)) = round.as_ref() else {
            return ControlFlow::Continue(());
        };
        bar.set_length(p.total);
        bar.set_position(p.done);
        if bar.is_hidden() && p.done < p.total && started.elapsed() >= SHOW_AFTER {
            let what = match p.phase {
                StepPhase::Apply => "syncing",
                StepPhase::Rollback => "rolling back",
            };
            let style = ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} libvirt calls, {eta} left",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(format!("{what} {}", p.domain));
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        if p.done >= p.total {
            bar.finish_and_clear();
            *round = None;
        }
        ControlFlow::Continue(())
    }))
}
