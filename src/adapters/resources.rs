//! Host memory, worker RSS and open file handles, read from `/proc` (the worker's on a
//! blocking thread).
//! Each field fails alone (`None`); the sample as a whole is `None` only when nothing at
//! all could be read.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{substitute_worker, BoxFuture, ResourceSampler};
use crate::core::check::Resources;

/// A pid file longer than this is not a pid file; it is not read further.
const PID_FILE_MAX_BYTES: u64 = 64;

pub(super) struct ProcResourceSampler {
    proc_root: PathBuf,
    pid_file_template: Option<String>,
    /// `/proc/meminfo`, kept open: procfs regenerates it on every read from offset 0, so
    /// a check costs one `pread` instead of open, stat, eight growing reads and close.
    meminfo: Mutex<Option<File>>,
}

impl ProcResourceSampler {
    pub(super) fn new(proc_root: PathBuf, pid_file_template: Option<String>) -> Self {
        ProcResourceSampler {
            proc_root,
            pid_file_template,
            meminfo: Mutex::new(None),
        }
    }

    /// Host memory in use, from the kept-open `meminfo` (opened again after a failure).
    fn host_memory_percent(&self) -> Option<f64> {
        let mut file = self.meminfo.lock().unwrap_or_else(|p| p.into_inner());
        if file.is_none() {
            *file = File::open(self.proc_root.join("meminfo")).ok();
        }
        let text = read_whole(file.as_ref()?);
        if text.is_none() {
            *file = None;
        }
        memory_percent_from_meminfo(&text?)
    }
}

/// The whole of a small file from offset 0, with positioned reads into one buffer.
fn read_whole(file: &File) -> Option<String> {
    use std::os::unix::fs::FileExt;
    const LIMIT: usize = 64 * 1024;
    let mut bytes = vec![0u8; 4096];
    let mut len = 0;
    loop {
        if len == bytes.len() {
            if len >= LIMIT {
                break;
            }
            bytes.resize(len * 2, 0);
        }
        match file.read_at(&mut bytes[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    bytes.truncate(len);
    String::from_utf8(bytes).ok()
}

impl ResourceSampler for ProcResourceSampler {
    fn sample<'a>(&'a self, worker: &'a str) -> BoxFuture<'a, Option<Resources>> {
        let proc_root = self.proc_root.clone();
        let host_memory_percent = self.host_memory_percent();
        let pid_file = self
            .pid_file_template
            .as_deref()
            .map(|template| PathBuf::from(substitute_worker(template, worker)));
        Box::pin(async move {
            let resources = match pid_file {
                // Only /proc/meminfo: a small read the kernel answers from memory, done in
                // place — a hop to the blocking pool cost more than the read itself.
                None => worker_sample(&proc_root, None),
                // A worker's fd directory can be long: off the runtime thread.
                Some(pid_file) => {
                    tokio::task::spawn_blocking(move || worker_sample(&proc_root, Some(&pid_file)))
                        .await
                        .ok()?
                }
            };
            let resources = Resources {
                host_memory_percent,
                ..resources
            };
            let nothing = resources.host_memory_percent.is_none()
                && resources.worker_rss_bytes.is_none()
                && resources.worker_open_files.is_none();
            (!nothing).then_some(resources)
        })
    }
}

/// The worker's RSS and open files (host memory is filled in by the caller).
fn worker_sample(proc_root: &Path, pid_file: Option<&Path>) -> Resources {
    let pid = pid_file.and_then(read_pid);
    let (worker_rss_bytes, worker_open_files) = match pid {
        None => (None, None),
        Some(pid) => {
            let process = proc_root.join(pid.to_string());
            let rss = std::fs::read_to_string(process.join("status"))
                .ok()
                .and_then(|text| rss_bytes_from_status(&text));
            let open_files = std::fs::read_dir(process.join("fd"))
                .ok()
                .map(|entries| entries.filter(|entry| entry.is_ok()).count() as u64);
            (rss, open_files)
        }
    };
    Resources {
        host_memory_percent: None,
        worker_rss_bytes,
        worker_open_files,
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(PID_FILE_MAX_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    text.trim().parse::<u32>().ok().filter(|pid| *pid > 0)
}

/// The value in kB of a `Key:   1234 kB` line.
fn kilobytes(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// (MemTotal − MemAvailable) / MemTotal × 100.
pub(super) fn memory_percent_from_meminfo(text: &str) -> Option<f64> {
    let total = kilobytes(text, "MemTotal")?;
    let available = kilobytes(text, "MemAvailable")?;
    if total == 0 || available > total {
        return None;
    }
    Some((total - available) as f64 / total as f64 * 100.0)
}

/// `VmRSS` in bytes; absent for kernel threads and zombies.
pub(super) fn rss_bytes_from_status(text: &str) -> Option<u64> {
    kilobytes(text, "VmRSS")?.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo() {
        let text = "MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    4000000 kB\n";
        assert_eq!(memory_percent_from_meminfo(text), Some(75.0));
        assert_eq!(
            memory_percent_from_meminfo("MemTotal: 0 kB\nMemAvailable: 0 kB"),
            None
        );
        assert_eq!(memory_percent_from_meminfo("MemTotal: 10 kB"), None);
        assert_eq!(memory_percent_from_meminfo("garbage"), None);
    }

    #[test]
    fn vmrss() {
        let text = "Name:\tapp\nVmPeak:\t  9000 kB\nVmRSS:\t    2048 kB\n";
        assert_eq!(rss_bytes_from_status(text), Some(2048 * 1024));
        assert_eq!(rss_bytes_from_status("Name:\tkworker\n"), None);
    }

    #[tokio::test]
    async fn fake_proc_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(
            root.path().join("meminfo"),
            "MemTotal: 1000 kB\nMemAvailable: 250 kB\n",
        )
        .unwrap();
        let process = root.path().join("4242");
        std::fs::create_dir_all(process.join("fd")).unwrap();
        for fd in ["0", "1", "2"] {
            std::fs::write(process.join("fd").join(fd), "").unwrap();
        }
        std::fs::write(process.join("status"), "VmRSS:\t10 kB\n").unwrap();
        std::fs::write(root.path().join("w1.pid"), "4242\n").unwrap();
        let template = format!("{}/{{worker}}.pid", root.path().display());
        let sampler = ProcResourceSampler::new(root.path().into(), Some(template));
        let sample = sampler.sample("w1").await.unwrap();
        assert_eq!(sample.host_memory_percent, Some(75.0));
        assert_eq!(sample.worker_rss_bytes, Some(10 * 1024));
        assert_eq!(sample.worker_open_files, Some(3));
        // A worker without a pid file: only the host field.
        let other = sampler.sample("w2").await.unwrap();
        assert_eq!(other.worker_rss_bytes, None);
        assert_eq!(other.host_memory_percent, Some(75.0));
        // Nothing readable at all: no sample.
        let empty = tempfile::tempdir().unwrap();
        let nothing = ProcResourceSampler::new(empty.path().into(), None);
        assert_eq!(nothing.sample("w1").await, None);
    }

    #[test]
    fn the_kept_open_meminfo_reads_whole_and_fresh() {
        // Longer than the first buffer, and changed in place between two reads.
        let root = tempfile::tempdir().unwrap();
        let padding = "Filler:    1 kB\n".repeat(600);
        let path = root.path().join("meminfo");
        std::fs::write(
            &path,
            format!("{padding}MemTotal: 1000 kB\nMemAvailable: 250 kB\n"),
        )
        .unwrap();
        let sampler = ProcResourceSampler::new(root.path().into(), None);
        assert_eq!(sampler.host_memory_percent(), Some(75.0));
        std::fs::write(
            &path,
            format!("{padding}MemTotal: 1000 kB\nMemAvailable: 900 kB\n"),
        )
        .unwrap();
        assert_eq!(sampler.host_memory_percent(), Some(10.0));
        // The real one, twice through the same descriptor.
        if std::path::Path::new("/proc/meminfo").exists() {
            let real = ProcResourceSampler::new("/proc".into(), None);
            for _ in 0..2 {
                let percent = real.host_memory_percent().expect("a reading");
                assert!((0.0..=100.0).contains(&percent), "{percent}");
            }
        }
    }
}
