//! Directories made durable. A file written crash-safely (temporary file,
//! fsync, rename, fsync of its directory: the privacy ledger, a checkpoint)
//! survives a power loss only if its directory's own entry does too: a
//! directory the process created is lost with its contents unless its
//! parent is fsynced after the creation. The party's ledger and the
//! coordinator's checkpoints both need this, hence one definition here.
//!
//! Each function tells `note` the durable steps it takes, in order
//! (`"create dir …"`, `"sync dir …"`), for tests that check the order; the
//! steps a power loss would interrupt cannot be caused in a test, but their
//! order can be checked.

use std::path::Path;

/// Creates `dir` and its missing ancestors, each new one's parent fsynced
/// after it is made. A directory another thread or process makes meanwhile
/// has its parent fsynced here too (its maker may not have done so yet).
/// The error names the directory at fault.
pub fn create_dirs(dir: &Path, note: &mut dyn FnMut(String)) -> Result<(), String> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(Path::new(""));
    create_dirs(parent, note)?;
    match std::fs::create_dir(dir) {
        Ok(()) => note(format!("create dir {}", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    }
    sync_dir(if parent.as_os_str().is_empty() { Path::new(".") } else { parent }, note)
}

/// Fsyncs a directory, making the entries created or renamed in it durable.
/// The error names the directory.
pub fn sync_dir(dir: &Path, note: &mut dyn FnMut(String)) -> Result<(), String> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("{}: {e}", dir.display()))?;
    note(format!("sync dir {}", dir.display()));
    Ok(())
}

/// Fsyncs the parent of `dir` (which exists): a process that created `dir`
/// and crashed before fsyncing its parent left an entry a power loss could
/// still take; called once when a process starts using `dir`, it makes
/// that entry durable.
pub fn sync_parent(dir: &Path, note: &mut dyn FnMut(String)) -> Result<(), String> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    sync_dir(parent, note)
}

/// Writes `bytes` to `path` crash-safely: a synced temporary file beside
/// it, a rename, and its directory synced. The error names the file.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    write_file_mode(path, bytes, 0o644)
}

/// [`write_file`] with the file's mode. The temporary file has a name of
/// its own (process and a random value) and is created exclusively: a
/// file or symlink planted at a predictable name (`path.part`, before) is
/// neither followed nor renamed into `path` (found by review). It is
/// removed when the write fails.
///
/// Only a regular file (or nothing) at `path` is replaced: a symlink, a
/// FIFO, a device or a directory there is refused by name, not renamed
/// over (a `--out /dev/stdout` would otherwise replace the device node
/// when run as root).
pub fn write_file_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::hash::{BuildHasher as _, Hasher as _};
    if let Ok(existing) = std::fs::symlink_metadata(path)
        && !existing.file_type().is_file()
    {
        return Err(format!("{}: not a regular file; refusing to replace it", path.display()));
    }
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    name.push(format!(".{}.{random:x}.part", std::process::id()));
    let tmp = path.with_file_name(name);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .map_err(|e| format!("{}: {e}", tmp.display()))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display())));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent(path, &mut |_| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_regular_file_or_nothing_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("out");
        write_file_mode(&file, b"one", 0o600).unwrap();
        write_file_mode(&file, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"two");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        for not_a_file in [link.as_path(), dir.path()] {
            let e = write_file_mode(not_a_file, b"x", 0o600).unwrap_err();
            assert!(e.contains("not a regular file"), "{e}");
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"two", "the link's target is untouched");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    }

    #[test]
    fn missing_directories_are_created_each_with_its_parent_synced() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a").join("b");
        let mut steps = Vec::new();
        create_dirs(&dir, &mut |s| steps.push(s.replace(&root.path().display().to_string(), "ROOT"))).unwrap();
        assert_eq!(steps, ["create dir ROOT/a", "sync dir ROOT", "create dir ROOT/a/b", "sync dir ROOT/a"]);
        assert!(dir.is_dir());
        // Existing: nothing to do.
        steps.clear();
        create_dirs(&dir, &mut |s| steps.push(s)).unwrap();
        assert!(steps.is_empty());
        // A file in the way is named.
        let file = root.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let e = create_dirs(&file.join("c"), &mut |_| {}).unwrap_err();
        assert!(e.starts_with(&format!("{}: ", file.display())), "{e}");
    }
}
