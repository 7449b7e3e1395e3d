//! SIGINT and SIGTERM during `train` (Ctrl-C, a preemptible machine being reclaimed): the first
//! one sets the trainer's stop flag (it finishes the step under way, writes a checkpoint and
//! returns); a second one ends the process at once with the conventional status 128 + signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::Context;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::flag;

/// The handlers of one run.
pub struct StopSignals {
    stop: Arc<AtomicBool>,
    which: Arc<AtomicUsize>,
}

impl StopSignals {
    /// Installs the handlers for SIGINT and SIGTERM.
    pub fn install() -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let which = Arc::new(AtomicUsize::new(0));
        for sig in [SIGINT, SIGTERM] {
            // Registration order is the order the actions run in: a signal that finds the flag
            // already set (a second one) exits before setting it again.
            flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&stop))
                .and_then(|_| flag::register_usize(sig, Arc::clone(&which), sig as usize))
                .and_then(|_| flag::register(sig, Arc::clone(&stop)))
                .context("installing the SIGINT / SIGTERM handlers")?;
        }
        Ok(StopSignals { stop, which })
    }

    /// The flag the trainer checks between steps.
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// The signal that set the flag: its name and the exit status that reports it.
    pub fn received(&self) -> Option<(&'static str, i32)> {
        match self.which.load(Ordering::SeqCst) as i32 {
            0 => None,
            SIGINT => Some(("SIGINT", 128 + SIGINT)),
            sig => Some(("SIGTERM", 128 + sig)),
        }
    }
}
