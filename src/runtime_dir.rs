//! The private directory that holds worker sockets. Invariant: every directory rip puts a
//! socket in is a real directory (not a symlink), owned by us and closed to other users, so a
//! directory or link planted in /tmp by someone else can never receive our traffic.

use std::fs::{self, DirBuilder};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::sys::signal::kill;
use nix::unistd::{geteuid, Pid};

/// Longest path a Unix socket address can hold (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// One `rip serve` instance's directory: `<base>/<pid>`. Removed with everything in it on drop.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// Creates `<base>/<pid>`, where `base` is the given directory or the per-user default.
    pub fn create(base: Option<&Path>) -> Result<RuntimeDir> {
        let base = match base {
            Some(b) => b.to_path_buf(),
            None => default_base(),
        };
        ensure_private(&base)?;
        remove_stale_instances(&base);
        let path = base.join(std::process::id().to_string());
        if fs::symlink_metadata(&path).is_ok() {
            fs::remove_dir_all(&path)
                .with_context(|| format!("removing stale runtime directory {}", path.display()))?;
        }
        DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating runtime directory {}", path.display()))?;
        let dir = RuntimeDir { path };
        // Fail now, not at the first spawn, if the longest socket name cannot be bound.
        dir.socket_path(9999, u64::MAX)?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The socket of worker `slot` in generation `generation`.
    pub fn socket_path(&self, slot: usize, generation: u64) -> Result<PathBuf> {
        let path = self.path.join(format!("w{slot}.{generation}.sock"));
        // The hand-off channel's name is the longer of the two.
        if crate::handoff::channel_path(&path).as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "runtime directory {} is too long for Unix sockets; set --runtime-dir to a shorter path",
                self.path.display()
            );
        }
        Ok(path)
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// `$XDG_RUNTIME_DIR/rip` if that directory exists, else `/tmp/rip-<uid>`.
pub fn default_base() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() && Path::new(&dir).is_dir() => PathBuf::from(dir).join("rip"),
        _ => std::env::temp_dir().join(format!("rip-{}", geteuid())),
    }
}

/// Creates `dir` with mode 0700, or accepts an existing one only if it is a real directory,
/// ours, and closed to group and others.
pub fn ensure_private(dir: &Path) -> Result<()> {
    match DirBuilder::new().recursive(false).mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating runtime directory {}", dir.display()))?;
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("creating runtime directory {}", dir.display())),
    }
    let meta = fs::symlink_metadata(dir)
        .with_context(|| format!("inspecting runtime directory {}", dir.display()))?;
    let shown = dir.display();
    if meta.file_type().is_symlink() {
        bail!("refusing runtime directory {shown}: it is a symbolic link");
    }
    if !meta.is_dir() {
        bail!("refusing runtime directory {shown}: it is not a directory");
    }
    if meta.uid() != geteuid().as_raw() {
        bail!("refusing runtime directory {shown}: owned by uid {}, not {}", meta.uid(), geteuid());
    }
    if meta.mode() & 0o077 != 0 {
        bail!(
            "refusing runtime directory {shown}: mode {:o} lets other users in (want 700)",
            meta.mode() & 0o777
        );
    }
    Ok(())
}

/// Removes instance directories left by a `rip serve` that was killed without cleaning up.
fn remove_stale_instances(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let dead = matches!(kill(Pid::from_raw(pid), None), Err(nix::errno::Errno::ESRCH));
        if dead {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("rip-rt-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        let _ = fs::remove_file(&p);
        p
    }

    #[test]
    fn creates_private_instance_directory_and_removes_it() {
        let base = scratch("create");
        let path = {
            let dir = RuntimeDir::create(Some(&base)).unwrap();
            let mode = fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700);
            assert_eq!(fs::metadata(&base).unwrap().permissions().mode() & 0o777, 0o700);
            dir.path().to_path_buf()
        };
        assert!(!path.exists());
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn refuses_loose_permissions() {
        let base = scratch("loose");
        fs::create_dir(&base).unwrap();
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).unwrap();
        let err = RuntimeDir::create(Some(&base)).unwrap_err().to_string();
        assert!(err.contains("lets other users in"), "{err}");
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn refuses_a_symlink() {
        let base = scratch("link");
        let target = scratch("link-target");
        fs::create_dir(&target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(&target, &base).unwrap();
        let err = RuntimeDir::create(Some(&base)).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        fs::remove_file(&base).unwrap();
        fs::remove_dir_all(&target).unwrap();
    }

    #[test]
    fn removes_directories_of_dead_instances() {
        let base = scratch("stale");
        ensure_private(&base).unwrap();
        // No process has pid 2^22 + 1 (above the kernel's pid_max ceiling).
        let stale = base.join("4194305");
        fs::create_dir(&stale).unwrap();
        let _dir = RuntimeDir::create(Some(&base)).unwrap();
        assert!(!stale.exists());
        drop(_dir);
        fs::remove_dir_all(&base).unwrap();
    }
}
