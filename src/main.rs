//! The stock `rip` binary: the demo app (or static files with `--root`) under rip's supervision.

use std::process::ExitCode;

fn main() -> ExitCode {
    rip::main_with(rip::app::stock)
}
