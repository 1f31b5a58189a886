//! cgroup v2 filesystem helpers: finding the mount, cgroup ids, levels, moving and killing
//! processes.
//!
//! The mount point is discovered from `/proc/self/mountinfo` (proc(5)); nothing is hard-coded.
//! A cgroup's id is the inode number of its directory (Documentation/admin-guide/cgroup-v2.rst;
//! the value `bpf_get_current_cgroup_id()` returns), its level the number of path components
//! below the mount (root = 0).

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

/// Errors of cgroup filesystem operations, each naming the path at fault.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem in /proc/self/mountinfo (Aegis needs cgroup v2)")]
    NoCgroup2,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: processes still present after cgroup.kill")]
    Busy { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Finds the mount point of a filesystem of type `fstype` in a mountinfo text (proc(5): field
/// 5 is the mount point, the field after ` - ` the filesystem type).
pub fn find_mount(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let mount_point = pre.split(' ').nth(4)?;
        (post.split(' ').next()? == fstype).then(|| PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The cgroup v2 mount point of this process's mount namespace.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    find_mount(&text, "cgroup2").ok_or(CgroupError::NoCgroup2)
}

/// The id of the cgroup at `path` (its inode number).
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    fs::metadata(path).map(|m| m.ino()).map_err(io_err(path))
}

/// Level of `path` below `mount` (the root cgroup is level 0).
pub fn level(mount: &Path, path: &Path) -> u32 {
    path.strip_prefix(mount)
        .map_or(0, |rel| rel.components().count() as u32)
}

/// Creates `path` and its parents.
pub fn create(path: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(path).map_err(io_err(path))
}

/// Moves process `pid` (its whole thread group) into the cgroup at `path`.
pub fn move_process(path: &Path, pid: u32) -> Result<(), CgroupError> {
    let procs = path.join("cgroup.procs");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(io_err(&procs))?;
    f.write_all(pid.to_string().as_bytes())
        .map_err(io_err(&procs))
}

/// Whether any process lives in the cgroup or below it (`populated` of `cgroup.events`).
pub fn is_populated(path: &Path) -> Result<bool, CgroupError> {
    let events = path.join("cgroup.events");
    let text = fs::read_to_string(&events).map_err(io_err(&events))?;
    Ok(text.lines().any(|l| l == "populated 1"))
}

/// Kills every process in the cgroup (`cgroup.kill`), waits up to `timeout` for them to be
/// reaped and removes the directory. A missing cgroup is not an error.
pub fn remove(path: &Path, timeout: Duration) -> Result<(), CgroupError> {
    if !path.exists() {
        return Ok(());
    }
    if is_populated(path)? {
        let kill = path.join("cgroup.kill");
        fs::write(&kill, "1").map_err(io_err(&kill))?;
    }
    let deadline = Instant::now() + timeout;
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(CgroupError::Busy {
                    path: path.to_owned(),
                });
            }
            Err(source) => {
                return Err(CgroupError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_mount(text, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_mount(text, "bpf"), None);
    }

    #[test]
    fn unescapes_mount_points_and_tolerates_optional_fields() {
        let text = "50 1 0:40 / /mnt/with\\040space rw shared:5 master:1 - cgroup2 none rw\n";
        assert_eq!(
            find_mount(text, "cgroup2"),
            Some(PathBuf::from("/mnt/with space"))
        );
    }

    #[test]
    fn levels_count_components_below_the_mount() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(level(m, m), 0);
        assert_eq!(level(m, Path::new("/sys/fs/cgroup/aegis/exec/a@b.1")), 3);
    }
}
