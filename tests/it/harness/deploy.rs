//! Deploying binaries under a running rip, as installers do: a new file written beside the
//! old one and renamed over it, so that running processes keep their (old) executable and the
//! next worker started from that path runs the new one. [`Deployed`] is a rip started from
//! such a path.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{Control, Rip, TempDir};

/// Puts a copy of `from` at `to`: a hard link when possible (cheap, and replacing `to` by
/// rename leaves `from` alone), else a copy.
pub fn place_binary(from: &Path, to: &Path) {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to)
            .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
    }
}

/// Writes a new file next to `path` with `write`, then renames it over `path`: a running
/// executable cannot be written to (ETXTBSY), but it can be replaced.
pub fn replace_file(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) {
    let tmp = path.with_extension("new");
    write(&tmp).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming over {}: {e}", path.display()));
}

/// rip started from a copy of its binary, which the test may replace as a deploy does.
#[derive(Debug)]
pub struct Deployed {
    pub rip: Rip,
    pub control: Control,
    exe: PathBuf,
    // Removed after rip is gone.
    _bin: TempDir,
}

impl Deployed {
    pub fn start(workers: usize) -> Deployed {
        let bin = TempDir::new();
        let exe = bin.path().join("rip");
        place_binary(Path::new(env!("CARGO_BIN_EXE_rip")), &exe);
        let rip = Rip::builder().program(&exe).args(&["--workers", &workers.to_string()]).start();
        rip.wait_all_ready();
        let control = Control::of(&rip);
        Deployed { rip, control, exe, _bin: bin }
    }

    /// Deploys a broken build, which says `rip-test: simulated broken build` on stderr and
    /// exits 1.
    pub fn break_binary(&self) {
        replace_file(&self.exe, |tmp| {
            std::fs::write(tmp, "#!/bin/sh\necho 'rip-test: simulated broken build' >&2\nexit 1\n")?;
            std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755))
        });
    }
}
