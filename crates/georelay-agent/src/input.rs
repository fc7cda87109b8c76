//! Where readings come from: JSON objects, one per line, on standard input
//! and/or in files dropped into a watched folder.
//!
//! A line that is not a JSON object, not UTF-8 or longer than [`MAX_LINE`]
//! is reported (with its number) and skipped, never fatal, and never held in
//! memory beyond the limit. A full buffer pauses the input (back-pressure)
//! instead of dropping anything. An input that fails (a read error, the
//! buffer's disk full) stops the agent with the error: the caller exits
//! non-zero, and nothing taken so far is lost.
//!
//! Folder files: every regular file whose name does not start with `.` and
//! does not end in `.tmp` (writers should write `x.tmp` and rename it). Files
//! are taken in name order. A file is known by its name *and* a digest of
//! its content, so a new file under a used name is taken too. Each line's
//! progress is committed with the sealed record, so a restart goes on after
//! the last line taken and a file is processed once. A finished file is
//! moved into `done/` inside the folder (as `NAME.1`, `NAME.2`, … when
//! `done/NAME` exists); a file over [`MAX_FILE`] is moved into `refused/`
//! unread, with an error.

use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::buffer::{Buffer, BufferError};

/// Longest line taken, in bytes: a reading is one record, which the server
/// takes up to 64 KiB (sealed and in base64).
pub const MAX_LINE: usize = 48 * 1024;

/// Largest input file taken, in bytes.
pub const MAX_FILE: u64 = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error("cannot read {what}")]
    Read {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl InputError {
    fn read(what: impl std::fmt::Display, source: std::io::Error) -> Self {
        Self::Read {
            what: what.to_string(),
            source,
        }
    }
}

/// One line of input.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Text(String),
    TooLong,
    NotUtf8,
}

/// The next line of `reader` (without its `\n`), never holding more than
/// `max` bytes of it; `None` at the end.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> std::io::Result<Option<Line>> {
    let mut line = Vec::new();
    let (mut too_long, mut any) = (false, false);
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            if !any {
                return Ok(None);
            }
            break;
        }
        any = true;
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        if !too_long {
            if line.len() + chunk.len() > max {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let used = newline.map_or(available.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            break;
        }
    }
    if too_long {
        return Ok(Some(Line::TooLong));
    }
    Ok(Some(match String::from_utf8(line) {
        Ok(text) => Line::Text(text),
        Err(_) => Line::NotUtf8,
    }))
}

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

/// Takes one line: true if it was buffered; a line that cannot be is
/// reported with `source` and its number.
async fn take_line(
    buffer: &Buffer,
    line: Line,
    source: &str,
    file: Option<(&str, u64)>,
    line_no: u64,
    stop: &CancellationToken,
) -> Result<bool, BufferError> {
    let why = match line {
        Line::Text(text) => {
            let text = text.trim();
            if text.is_empty() {
                return Ok(false);
            }
            let text = with_capture_time(text, &crate::lines::now());
            if take(buffer, &text, file, stop).await? {
                return Ok(true);
            }
            "not a JSON object"
        }
        Line::NotUtf8 => "not UTF-8",
        Line::TooLong => {
            tracing::warn!(
                input = source,
                line = line_no,
                limit_bytes = MAX_LINE,
                "longer than the longest reading taken; skipped"
            );
            return Ok(false);
        }
    };
    tracing::warn!(input = source, line = line_no, "{why}; skipped");
    Ok(false)
}

/// Keys that say when a reading was taken: a reading with none of them gets
/// `captured_at`.
pub const TIME_KEYS: [&str; 4] = ["captured_at", "time", "timestamp", "ts"];

/// `reading` with `"captured_at": now` added first when it is a JSON object
/// that carries no time of its own, so a reading buffered through an outage
/// keeps when it was taken. Added as text: the rest stays byte for byte
/// (numbers keep every digit). Anything else is returned as it is.
pub fn with_capture_time<'a>(reading: &'a str, now: &str) -> std::borrow::Cow<'a, str> {
    use std::borrow::Cow;
    match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(reading) {
        Ok(map) if !TIME_KEYS.iter().any(|k| map.contains_key(*k)) => {
            let inner = reading.trim_start().strip_prefix('{').unwrap_or_default();
            let stamp = format!("{{\"captured_at\":\"{now}\"");
            if map.is_empty() {
                Cow::Owned(format!("{stamp}}}"))
            } else {
                Cow::Owned(format!("{stamp},{inner}"))
            }
        }
        _ => Cow::Borrowed(reading),
    }
}

/// Reads standard input to its end.
pub async fn stdin(
    buffer: &Buffer,
    wake: &Notify,
    stop: &CancellationToken,
) -> Result<(), InputError> {
    let mut reader = BufReader::new(tokio::io::stdin());
    let mut n = 0u64;
    loop {
        let line = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            l = read_line(&mut reader, MAX_LINE) => l,
        };
        let Some(line) = line.map_err(|e| InputError::read("standard input", e))? else {
            return Ok(());
        };
        n += 1;
        if take_line(buffer, line, "stdin", None, n, stop).await? {
            wake.notify_one();
        }
    }
}

/// Watches `dir` until `stop`.
pub async fn watch(
    dir: &Path,
    buffer: &Buffer,
    wake: &Notify,
    stop: &CancellationToken,
) -> Result<(), InputError> {
    loop {
        for path in ready_files(dir) {
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            let size = std::fs::metadata(&path)
                .map_err(|e| InputError::read(path.display(), e))?
                .len();
            if size > MAX_FILE {
                tracing::error!(file = %name, bytes = size, limit = MAX_FILE,
                    "input file too large: moved into refused/ unread; split it into smaller files");
                move_into(dir, "refused", &path, &name)?;
                continue;
            }
            let identity = format!("{name}#{}", digest(&path).await?);
            let (taken, done) = buffer.file_progress(&identity).await?;
            if !done {
                let file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| InputError::read(path.display(), e))?;
                let mut reader = BufReader::new(file);
                let mut line_no = 0u64;
                while let Some(line) = read_line(&mut reader, MAX_LINE)
                    .await
                    .map_err(|e| InputError::read(path.display(), e))?
                {
                    line_no += 1;
                    if line_no <= taken {
                        continue;
                    }
                    let at = Some((identity.as_str(), line_no));
                    if take_line(buffer, line, &name, at, line_no, stop).await? {
                        wake.notify_one();
                    }
                }
                buffer.file_done(&identity, line_no).await?;
            }
            move_into(dir, "done", &path, &name)?;
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// The first 128 bits of the SHA-256 of the file at `path`, in hex.
async fn digest(path: &Path) -> Result<String, InputError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| InputError::read(path.display(), e))?;
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = file
            .read(&mut chunk)
            .await
            .map_err(|e| InputError::read(path.display(), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&chunk[..n]);
    }
    let mut hex = String::new();
    georelay_core::ids::push_hex(&mut hex, &hasher.finalize()[..16]);
    Ok(hex)
}

/// Moves `path` into `dir/sub/`, under a name not taken there yet.
fn move_into(dir: &Path, sub: &str, path: &Path, name: &str) -> Result<(), InputError> {
    let into = dir.join(sub);
    std::fs::create_dir_all(&into).map_err(|e| InputError::read(into.display(), e))?;
    let mut target = into.join(name);
    let mut n = 0;
    while target.exists() {
        n += 1;
        target = into.join(format!("{name}.{n}"));
    }
    std::fs::rename(path, &target).map_err(|e| InputError::read(path.display(), e))
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

#[cfg(test)]
mod capture_time {
    use super::with_capture_time;

    #[test]
    fn a_reading_without_a_time_gets_one_and_keeps_its_bytes() {
        let now = "2026-11-30T04:00:00.000Z";
        assert_eq!(
            with_capture_time("{\"n\": 1.000000000000000001}", now),
            "{\"captured_at\":\"2026-11-30T04:00:00.000Z\",\"n\": 1.000000000000000001}"
        );
        assert_eq!(
            with_capture_time(" {} ", now),
            "{\"captured_at\":\"2026-11-30T04:00:00.000Z\"}"
        );
        assert_eq!(with_capture_time("{\"ts\": 5}", now), "{\"ts\": 5}");
        assert_eq!(with_capture_time("[1]", now), "[1]");
        let stamped = with_capture_time("{\"a\":{\"b\":2}}", now);
        let v: serde_json::Value = serde_json::from_str(&stamped).unwrap();
        assert_eq!(v["a"]["b"], 2);
        assert_eq!(v["captured_at"], now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded_and_bad_bytes_are_named() {
        let input: &[u8] = b"{\"a\":1}\n\xff\xfe\n0123456789abcdef\n\nlast";
        let mut reader = BufReader::with_capacity(4, input);
        let mut lines = Vec::new();
        while let Some(line) = read_line(&mut reader, 10).await.unwrap() {
            lines.push(line);
        }
        assert_eq!(
            lines,
            vec![
                Line::Text("{\"a\":1}".into()),
                Line::NotUtf8,
                Line::TooLong,
                Line::Text(String::new()),
                Line::Text("last".into()),
            ]
        );
    }
}
