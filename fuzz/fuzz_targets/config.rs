//! The config loader (`Config::parse`): arbitrary text must give a config or an error naming
//! the file, never a panic; a config that loads prints (`waitless check`) as text that
//! loads again to the same printed form.
#![no_main]

use std::path::Path;
use std::sync::Once;

use libfuzzer_sys::fuzz_target;
use waitless::config::Config;

static ISOLATE: Once = Once::new();

fuzz_target!(|data: &[u8]| {
    // Server names are resolved at load time: in a network namespace of its own the resolver
    // fails at once and no query leaves the host.
    ISOLATE.call_once(isolate_network);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    match Config::parse(text, path) {
        Ok(config) => {
            let printed = config.to_string();
            let again = Config::parse(&printed, path)
                .unwrap_or_else(|e| panic!("printed config does not load: {e}\n{printed}"));
            assert_eq!(again.to_string(), printed);
        }
        Err(e) => {
            assert_eq!(e.file, path);
        }
    }
});

fn isolate_network() {
    // SAFETY: unshare only changes this process's namespaces; no memory is involved.
    let alone = unsafe {
        libc::unshare(libc::CLONE_NEWNET) == 0
            || libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) == 0
    };
    assert!(
        alone,
        "cannot enter a network namespace of its own (needs root or user namespaces): \
         refusing to fuzz a loader that resolves host names"
    );
}
