//! The live dashboard on the admin listener's `/`: one page, its script and the vendored
//! chart library (uPlot, MIT, see vendor/uplot/), all compiled into the binary, so it works
//! with no network. The page polls `/stats` every second and keeps the last minutes itself.

/// The page.
pub const PAGE: &str = include_str!("dashboard.html");
/// The page's script.
pub const SCRIPT: &str = include_str!("dashboard.js");
/// The page's style.
pub const STYLE: &str = include_str!("dashboard.css");
/// uPlot, as its npm package ships it.
pub const UPLOT_JS: &str = include_str!("vendor/uplot/uPlot.iife.min.js");
/// uPlot's style sheet.
pub const UPLOT_CSS: &str = include_str!("vendor/uplot/uPlot.min.css");

/// The asset at `path`, with its content type; None for any other path.
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/" | "/dashboard" | "/dashboard/" => Some(("text/html; charset=utf-8", PAGE)),
        "/dashboard/dashboard.js" => Some(("text/javascript; charset=utf-8", SCRIPT)),
        "/dashboard/dashboard.css" => Some(("text/css; charset=utf-8", STYLE)),
        "/dashboard/uplot.js" => Some(("text/javascript; charset=utf-8", UPLOT_JS)),
        "/dashboard/uplot.css" => Some(("text/css; charset=utf-8", UPLOT_CSS)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_asks_only_for_its_own_assets() {
        // No external requests: every src and href is a path of ours.
        for (name, text) in [("page", PAGE), ("script", SCRIPT), ("style", STYLE)] {
            assert!(!text.contains("http://"), "{name} names an http:// URL");
            assert!(!text.contains("https://"), "{name} names an https:// URL");
        }
        for path in [
            "/dashboard/dashboard.js",
            "/dashboard/dashboard.css",
            "/dashboard/uplot.js",
            "/dashboard/uplot.css",
        ] {
            assert!(PAGE.contains(path), "the page does not load {path}");
            assert!(asset(path).is_some(), "{path} is not served");
        }
        assert!(asset("/nope").is_none());
    }
}
