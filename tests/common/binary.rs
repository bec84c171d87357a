//! Starting the `waitless` release binary on a config text. Shared by the tests and the
//! benches (which include this file by path); each adds how it waits for the process.

use std::io;
use std::path::Path;
use std::process::Command;

/// Writes `config` to `dir/waitless.toml` and returns the command that runs waitless on it,
/// logging at `level` to stderr without colours (the logs end up in files and assertions).
pub fn command(dir: &Path, config: &str, level: &str) -> io::Result<Command> {
    command_of(
        Path::new(env!("CARGO_BIN_EXE_waitless")),
        dir,
        config,
        level,
    )
}

/// As `command`, for the waitless binary at `bin`: a bench given another build to compare.
pub fn command_of(bin: &Path, dir: &Path, config: &str, level: &str) -> io::Result<Command> {
    let path = dir.join("waitless.toml");
    std::fs::write(&path, config)?;
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(&path)
        .args(["--log", level])
        .env("NO_COLOR", "1");
    Ok(cmd)
}
