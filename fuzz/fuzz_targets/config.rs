//! Pure config parsing (`waitless::config::parse`): arbitrary text must give a config or an
//! error naming the file, never a panic; a config that parses prints as text that parses
//! again to the same printed form. Parsing looks no name up and reads no variable (that is
//! the resolve step, not fuzzed here), so the target needs no network isolation.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use waitless::config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    match config::parse(text, path) {
        Ok(parsed) => {
            // A password written in the file is never printed, so such a config cannot
            // parse back from its print; everything else must.
            if parsed.config.mysql_users.iter().any(|u| u.password.is_some()) {
                return;
            }
            let printed = parsed.to_string();
            let again = config::parse(&printed, path)
                .unwrap_or_else(|e| panic!("printed config does not parse: {e}\n{printed}"));
            assert_eq!(again.to_string(), printed);
        }
        Err(e) => {
            assert_eq!(e.file, path);
        }
    }
});
