//! Logging set-up: `simplelog` for text lines, or one JSON object per line.

use log::{LevelFilter, Log, Metadata, Record};

use crate::config::LogFormat;

/// Installs the global logger. Text goes to stderr through `simplelog`.
pub fn init(level: LevelFilter, format: LogFormat) {
    match format {
        LogFormat::Text => {
            let config = simplelog::ConfigBuilder::new()
                .set_time_format_rfc3339()
                .set_target_level(LevelFilter::Off)
                .set_thread_level(LevelFilter::Off)
                .build();
            let _ = simplelog::TermLogger::init(
                level,
                config,
                simplelog::TerminalMode::Stderr,
                simplelog::ColorChoice::Never,
            );
        }
        LogFormat::Json => {
            if log::set_boxed_logger(Box::new(JsonLogger)).is_ok() {
                log::set_max_level(level);
            }
        }
    }
}

/// Writes `{"ts": "...", "level": "INFO", "target": "...", "msg": "..."}` lines to stderr.
struct JsonLogger;

impl Log for JsonLogger {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &Record<'_>) {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut line = Vec::with_capacity(160);
        line.extend_from_slice(b"{\"ts\":\"");
        crate::time::write_iso8601(&mut line, crate::time::UnixMicros(wall.as_micros() as u64));
        line.extend_from_slice(b"\",\"level\":\"");
        line.extend_from_slice(record.level().as_str().as_bytes());
        line.extend_from_slice(b"\",\"target\":");
        crate::protocol::json_str(&mut line, record.target());
        line.extend_from_slice(b",\"msg\":");
        crate::protocol::json_str(&mut line, &record.args().to_string());
        line.extend_from_slice(b"}\n");
        use std::io::Write as _;
        let _ = std::io::stderr().lock().write_all(&line);
    }

    fn flush(&self) {}
}
