//! Browser players (issue 11): headless Chromium, on a page from the test's own
//! origin, plays a live stream of `rstcpserversink` on another port through
//! mpegts.js (from the npm registry, installed into tests/web by
//! scripts/setup-debian) in a `<video>` element. The pipeline and the page are the
//! README's browser recipe, run verbatim but for the port; the page's script reports
//! back how far the video played (time, decoded frames, size) or the error mpegts.js
//! gave. Without `cors-origin` the same page must fail.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::browser::{self, Browser, PageFile, report_fields};
use gst::prelude::*;

/// The README's browser recipe: the gst-launch-1.0 line (without the command) and
/// the page.
fn recipe() -> (String, String) {
    let block = common::readme_block("browser-recipe");
    let line = block
        .lines()
        .find_map(|l| l.strip_prefix("gst-launch-1.0 "))
        .expect("a gst-launch-1.0 line in the browser recipe")
        .to_string();
    let html_start = block.find("```html\n").expect("the page in the recipe") + "```html\n".len();
    let html_len = block[html_start..].find("```").expect("end of the page");
    (line, block[html_start..html_start + html_len].to_string())
}

/// mpegts.js as `npm ci` installed it in tests/web.
fn mpegts_js() -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/web/node_modules/mpegts.js/dist/mpegts.js");
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: scripts/setup-debian installs mpegts.js (npm ci in tests/web)",
            path.display()
        )
    })
}

/// Added after the README's page: reports to the test's origin once the video has
/// played `PLAYED_SECONDS` (with decoded frames if `WANT_VIDEO`: an audio-only
/// stream has none), or the first error mpegts.js gives;
/// mpegts.js' warnings and errors and the progress go to the test's output.
const REPORTER: &str = r#"
<script>
  const video = document.getElementById('video');
  const send = (path) => fetch(path).catch(() => {});
  const log = (text) => send('/log?' + encodeURIComponent(text));
  let reported = false;
  const report = (fields) => {
    if (reported) return;
    reported = true;
    send('/report?' + Object.entries(fields)
      .map(([k, v]) => k + '=' + encodeURIComponent(String(v))).join('&'));
  };
  mpegts.LoggingControl.addLogListener((level, text) => {
    if (level === 'error' || level === 'warn') log(level + ': ' + text);
  });
  player.on(mpegts.Events.ERROR, (type, detail, info) =>
    report({error: type, detail: detail, info: JSON.stringify(info)}));
  video.addEventListener('error', () =>
    report({error: 'MediaError', detail: video.error && video.error.message}));
  let ticks = 0;
  setInterval(() => {
    const quality = video.getVideoPlaybackQuality();
    if (++ticks % 20 === 0) {
      log('time ' + video.currentTime + ' frames ' + quality.totalVideoFrames +
          ' readyState ' + video.readyState);
    }
    if (video.currentTime >= PLAYED_SECONDS && (quality.totalVideoFrames > 0 || !WANT_VIDEO)) {
      report({time: video.currentTime, frames: quality.totalVideoFrames,
              width: video.videoWidth, height: video.videoHeight,
              audio_bytes: video.webkitAudioDecodedByteCount});
    }
  }, 100);
</script>
"#;

const PLAYED_SECONDS: f64 = 2.0;

/// What the page reported, decoded.
struct Report(Vec<(String, String)>);

impl Report {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl std::fmt::Debug for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Runs `line` (the recipe's pipeline, its port swapped for a free one) and opens
/// the recipe's page, pointed at it, from another origin; returns the page's report.
/// `video`: the stream has video, so playing means decoded frames too.
fn play_in_chromium(line: &str, page: &str, video: bool) -> Report {
    common::init();
    let pipeline = common::Running::launch(&common::with_port(line, 0));
    let sink = pipeline.tcp_server_sink();
    let port = common::current_port(&sink);
    // gst-launch-1.0 gets `*` from the shell; the parser unquotes `"*"` alike.
    let cors_origin = sink.property::<Option<String>>("cors-origin");
    assert_eq!(
        cors_origin.as_deref(),
        line.contains(r#"cors-origin="*""#).then_some("*")
    );
    let stream_url = format!("http://127.0.0.1:{port}/");
    assert!(
        page.contains("'http://127.0.0.1:8080/'"),
        "the README's page plays http://127.0.0.1:8080/"
    );
    let html = page.replace("'http://127.0.0.1:8080/'", &format!("'{stream_url}'"))
        + &REPORTER
            .replace("PLAYED_SECONDS", &PLAYED_SECONDS.to_string())
            .replace("WANT_VIDEO", &video.to_string());
    let server = browser::serve_page_with(
        html,
        vec![PageFile {
            path: "/mpegts.js".into(),
            content_type: "text/javascript",
            body: mpegts_js(),
        }],
    );
    let _browser = Browser::open(
        &format!("{}/", server.origin()),
        &["--autoplay-policy=no-user-gesture-required"],
    );
    let report = server.wait_report(Duration::from_secs(60), || {
        common::assert_no_error(&pipeline, &format!("{line}: the server pipeline failed"))
    });
    pipeline.set_state(gst::State::Null).unwrap();
    eprintln!("the page reported: {report}");
    Report(report_fields(&report))
}

/// `line` with `from` replaced by `to` (which must be there).
fn swap(line: &str, from: &str, to: &str) -> String {
    assert!(line.contains(from), "{from:?} not in {line:?}");
    line.replace(from, to)
}

/// The README's line of the `recipes` block that uses `muxer`.
fn readme_recipe_with(muxer: &str) -> String {
    common::readme_recipes()
        .into_iter()
        .find(|l| l.contains(&format!("! {muxer} ")))
        .unwrap_or_else(|| panic!("no README recipe with {muxer}"))
}

/// Played past `PLAYED_SECONDS` with no error, audio decoded, and (`video`)
/// decoded frames of the recipe's 640x360.
fn assert_played(report: &Report, video: bool) {
    assert_eq!(report.get("error"), None, "mpegts.js failed: {report:?}");
    let number = |key: &str| -> f64 {
        report
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {report:?}"))
    };
    assert!(number("time") >= PLAYED_SECONDS, "{report:?}");
    assert!(number("audio_bytes") > 0.0, "no audio decoded: {report:?}");
    if video {
        // 25 frames a second; Chromium may still hold a few in its pipeline.
        assert!(number("frames") >= 25.0, "{report:?}");
        assert_eq!(report.get("width"), Some("640"), "{report:?}");
        assert_eq!(report.get("height"), Some("360"), "{report:?}");
    }
}

/// The README's recipe, `cors-origin="*"`: MPEG-TS with H.264 and AAC plays (its
/// time advances past 2 s with decoded frames of the stream's size and audio).
#[test]
fn mpegts_js_plays_the_readme_recipe_from_another_origin() {
    let (line, page) = recipe();
    assert!(line.contains(r#"cors-origin="*""#), "{line}");
    let report = play_in_chromium(&line, &page, true);
    assert_played(&report, true);
}

/// The same H.264 and AAC in FLV (`flvmux streamable=true`, `type: 'flv'`).
#[test]
fn mpegts_js_plays_flv_from_another_origin() {
    let (line, page) = recipe();
    let line = swap(
        &line,
        "mpegtsmux name=mux",
        "flvmux name=mux streamable=true",
    );
    let page = swap(&page, "type: 'mpegts'", "type: 'flv'");
    let report = play_in_chromium(&line, &page, true);
    assert_played(&report, true);
}

/// The README's MP3 recipes (MPEG-TS and FLV, audio only) with `cors-origin="*"`
/// play in the same page.
#[test]
fn mpegts_js_plays_the_mp3_recipes_from_another_origin() {
    let (_, page) = recipe();
    for (muxer, kind) in [("mpegtsmux", "mpegts"), ("flvmux", "flv")] {
        let line = readme_recipe_with(muxer);
        let line = swap(&line, "http=true", r#"http=true cors-origin="*""#);
        let page = swap(&page, "type: 'mpegts'", &format!("type: '{kind}'"));
        let report = play_in_chromium(&line, &page, false);
        assert_played(&report, false);
    }
}

/// The control: the README's recipe without `cors-origin` is blocked by Chromium,
/// and mpegts.js says so with a network error.
#[test]
fn mpegts_js_fails_without_cors_origin() {
    let (line, page) = recipe();
    let without = swap(&line, r#" cors-origin="*""#, "");
    let report = play_in_chromium(&without, &page, true);
    assert_eq!(report.get("error"), Some("NetworkError"), "{report:?}");
    assert_eq!(report.get("time"), None, "{report:?}");
}
