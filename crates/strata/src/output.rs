//! Everything the commands print on stdout goes through [`outln!`]: a reader
//! that goes away (`strata status | head -1`, `| true`) ends the command
//! quietly with exit status 0, as a closed pipe is the reader's choice, not
//! a failure; any other write error is one.

use std::io::Write;

use crate::commands::{Failure, failure};

/// Writes one line to stdout; the error of a closed pipe is [`Failure::quiet`].
pub fn line(args: std::fmt::Arguments) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => Failure::quiet(),
            _ => failure(format!("stdout: {e}")),
        })
}

/// `println!` that returns `Result<(), Failure>` instead of panicking when
/// stdout is closed.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}
pub(crate) use outln;
