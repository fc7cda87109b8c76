//! Where readings come from: JSON objects, one per line, on standard input
//! and/or in files dropped into a watched folder.
//!
//! A malformed line is reported and skipped, never fatal. A full buffer
//! pauses the input (back-pressure) instead of dropping anything.
//!
//! Folder files: every regular file whose name does not start with `.` and
//! does not end in `.tmp` (writers should write `x.tmp` and rename it). Files
//! are taken in name order; each line's progress is committed with the
//! sealed record, so a restart goes on after the last line taken and a file
//! is processed once. A finished file is moved into `done/` inside the folder.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::buffer::{Buffer, BufferError};

/// Buffers one reading, waiting while the buffer is full. Returns false for a
/// malformed line (reported), true once buffered.
async fn take(
    buffer: &Buffer,
    line: &str,
    file: Option<(&str, u64)>,
    stop: &CancellationToken,
) -> Result<bool, BufferError> {
    let mut warned = false;
    loop {
        match buffer.push(line, file).await {
            Ok(_) => return Ok(true),
            Err(BufferError::NotAnObject | BufferError::Record(_)) => return Ok(false),
            Err(BufferError::Full(n)) => {
                if !warned {
                    tracing::warn!(
                        records = n,
                        "offline buffer full: input paused until records are delivered"
                    );
                    warned = true;
                }
                tokio::select! {
                    _ = stop.cancelled() => return Err(BufferError::Full(n)),
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads standard input to its end.
pub async fn stdin(
    buffer: &Buffer,
    wake: &Notify,
    stop: &CancellationToken,
) -> Result<(), BufferError> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut n = 0u64;
    loop {
        let line = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            l = lines.next_line() => l,
        };
        let Ok(Some(line)) = line else {
            return Ok(());
        };
        n += 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if take(buffer, line, None, stop).await? {
            wake.notify_one();
        } else {
            tracing::warn!(line = n, "stdin: not a JSON object; skipped");
        }
    }
}

/// Watches `dir` until `stop`.
pub async fn watch(
    dir: &Path,
    buffer: &Buffer,
    wake: &Notify,
    stop: &CancellationToken,
) -> Result<(), BufferError> {
    let done_dir = dir.join("done");
    loop {
        for path in ready_files(dir) {
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            let (taken, done) = buffer.file_progress(&name).await?;
            if !done {
                let text = match tokio::fs::read_to_string(&path).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!(file = %name, error = %e, "cannot read input file; skipped");
                        continue;
                    }
                };
                let lines: Vec<&str> = text.lines().collect();
                for (i, line) in lines.iter().enumerate().skip(taken as usize) {
                    let line_no = i as u64 + 1;
                    let line = line.trim();
                    if line.is_empty() {
                        continue;
                    }
                    if take(buffer, line, Some((&name, line_no)), stop).await? {
                        wake.notify_one();
                    } else {
                        tracing::warn!(file = %name, line = line_no, "not a JSON object; skipped");
                    }
                }
                buffer.file_done(&name, lines.len() as u64).await?;
            }
            if let Err(e) = std::fs::create_dir_all(&done_dir)
                .and_then(|()| std::fs::rename(&path, done_dir.join(&name)))
            {
                tracing::warn!(file = %name, error = %e, "cannot move a finished input file into done/");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

fn ready_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.') && !n.ends_with(".tmp"))
        })
        .collect();
    files.sort();
    files
}
