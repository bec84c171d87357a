//! Starting the `waitless` release binary on a config text. Shared by the tests and the
//! benches (which include this file by path); each adds how it waits for the process.

use std::io;
use std::path::Path;
use std::process::Command;

/// Writes `config` to `dir/waitless.toml` and returns the command that runs waitless on it,
/// logging at `level` to stderr without colours (the logs end up in files and assertions).
pub fn command(dir: &Path, config: &str, level: &str) -> io::Result<Command> {
    let path = dir.join("waitless.toml");
    std::fs::write(&path, config)?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_waitless"));
    cmd.arg("--config")
        .arg(&path)
        .args(["--log", level])
        .env("NO_COLOR", "1");
    Ok(cmd)
}
