//! What the bench binaries read from their environment and from `/proc`; each includes this
//! with `mod measure;` and uses what it needs.
#![allow(dead_code)]

/// `name` from the environment as a number, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The name and the CPU seconds (user + system) in a `/proc/<pid>/stat` or
/// `/proc/<pid>/task/<tid>/stat` file: a process's cover all its threads, exited ones
/// included. Linux reports them in USER_HZ, which is 100.
pub fn stat_cpu(path: &str) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    Some((
        stat[open + 1..close].to_string(),
        (tick(11)? + tick(12)?) / 100.0,
    ))
}

/// CPU seconds of a process (0 when it cannot be read).
pub fn cpu_secs(pid: u32) -> f64 {
    stat_cpu(&format!("/proc/{pid}/stat")).map_or(0.0, |(_, secs)| secs)
}

/// Bytes a process handed to `write`-like calls so far (`wchar` of `/proc/<pid>/io`).
pub fn bytes_written(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("wchar:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Bytes a process caused to be sent to the storage layer so far (`write_bytes` of
/// `/proc/<pid>/io`): what reaches the disk (flash), unlike `wchar`, which counts socket writes
/// and rewrites of a page that is still dirty.
pub fn storage_written(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, or `VmHWM`, the peak), in MiB; 0 when it
/// cannot be read.
pub fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(field)?
                    .strip_prefix(':')?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Resets a process's peak RSS (`VmHWM`) to its current RSS, so that the next reading of
/// `VmHWM` is the peak of what ran since; false when the kernel refuses (not the owner).
pub fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}
