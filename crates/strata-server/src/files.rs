//! The node's files are its own: the data directory is 0700 and every file in it 0600,
//! whatever the umask it was started under (volume data, the cluster secret, the API
//! token and the metadata log are nobody else's to read).
//!
//! [`make_private`] runs first thing at start: it sets the process's umask to 077, so
//! everything the node creates from then on is private, and tightens what an earlier run
//! (or an operator's `cp`) left readable. [`warn_if_exposed`] is for files the operator
//! provides (a TLS key, a secret file outside the data directory): Strata does not change
//! those, it says what is wrong.

use anyhow::Context;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// How deep [`make_private`] looks for files left readable (the data directory's layout
/// is a few levels deep; a bound keeps a stray symlink loop or a huge tree from stalling
/// the start).
const DEPTH_MAX: usize = 4;

/// Sets the umask to 077 and makes `dir` 0700 and everything in it 0600 (directories
/// 0700). Returns how many modes it tightened.
pub fn make_private(dir: &Path) -> anyhow::Result<usize> {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    tighten(dir, 0, true).with_context(|| format!("make {} private", dir.display()))
}

fn tighten(path: &Path, depth: usize, is_dir: bool) -> std::io::Result<usize> {
    let mut changed = 0;
    let meta = std::fs::symlink_metadata(path)?;
    let mode = meta.permissions().mode() & 0o777;
    let wanted = if is_dir { mode & 0o700 } else { mode & 0o600 };
    if mode != wanted {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(wanted))?;
        changed += 1;
    }
    if is_dir && depth < DEPTH_MAX {
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            // Symlinks are not followed: what they point at is not the node's to change.
            if kind.is_dir() || kind.is_file() {
                changed += tighten(&entry.path(), depth + 1, kind.is_dir())?;
            }
        }
    }
    Ok(changed)
}

/// Logs a warning if `path` (a secret, token or key: `what`) can be read or written by
/// anyone but its owner.
pub fn warn_if_exposed(path: &Path, what: &str) {
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "{what} {} can be read by others (mode {mode:04o}): chmod 600 it",
                path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_left_readable_is_made_private_and_symlinks_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("meta")).unwrap();
        std::fs::write(data.join("catalog"), b"x").unwrap();
        std::fs::write(data.join("meta/log"), b"x").unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"x").unwrap();
        for p in [&data, &data.join("meta")] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for p in [&data.join("catalog"), &data.join("meta/log"), &outside] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        std::os::unix::fs::symlink(&outside, data.join("link")).unwrap();
        let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
        assert_eq!(make_private(&data).unwrap(), 4);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("meta")), 0o700);
        assert_eq!(mode(&data.join("catalog")), 0o600);
        assert_eq!(mode(&data.join("meta/log")), 0o600);
        assert_eq!(mode(&outside), 0o644, "not followed through the symlink");
        std::fs::write(data.join("new"), b"x").unwrap();
        assert_eq!(mode(&data.join("new")), 0o600, "the umask is 077 now");
        assert_eq!(make_private(&data).unwrap(), 0, "nothing left to tighten");
        rustix::process::umask(old);
    }
}
