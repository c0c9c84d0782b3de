// SPDX-License-Identifier: MPL-2.0

//! `rstcpserversink`: `rsmultifdsink` that listens and accepts by itself, like
//! `tcpserversink`, and can serve HTTP clients (browsers, VLC, ffplay, curl).
//!
//! ## Example pipelines
//! ```sh
//! # raw TCP, to tcpclientsrc
//! gst-launch-1.0 videotestsrc is-live=true ! theoraenc ! oggmux ! rstcpserversink port=4953 sync-method=latest-keyframe
//! # HTTP, for browsers, VLC, ffplay, curl
//! gst-launch-1.0 videotestsrc is-live=true ! vp8enc deadline=1 ! webmmux streamable=true ! rstcpserversink http=true port=8080 sync-method=latest-keyframe
//! ```

use gst::glib;
use gst::prelude::*;

use crate::multifdsink::RsMultiFdSink;
use crate::multihandlesink::RsMultiHandleSink;

mod imp;

glib::wrapper! {
    pub struct RsTcpServerSink(ObjectSubclass<imp::RsTcpServerSink>)
        @extends RsMultiFdSink, RsMultiHandleSink, gst_base::BaseSink, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "rstcpserversink",
        gst::Rank::NONE,
        RsTcpServerSink::static_type(),
    )
}

/// The HTTP media type for a stream of these caps.
pub fn content_type(caps: &gst::CapsRef) -> String {
    let Some(s) = caps.structure(0) else {
        return "application/octet-stream".into();
    };
    match s.name().as_str() {
        "video/webm" => "video/webm".into(),
        "audio/webm" => "audio/webm".into(),
        "video/x-matroska" => "video/x-matroska".into(),
        "audio/x-matroska" => "audio/x-matroska".into(),
        "application/ogg" | "video/ogg" => "application/ogg".into(),
        "audio/ogg" => "audio/ogg".into(),
        "video/x-flv" => "video/x-flv".into(),
        "video/mpegts" => "video/mp2t".into(),
        "audio/mpeg" => match s.get::<i32>("mpegversion") {
            Ok(2) | Ok(4) => "audio/aac".into(),
            _ => "audio/mpeg".into(),
        },
        "multipart/x-mixed-replace" => {
            let boundary = s.get::<&str>("boundary").unwrap_or("ThisRandomString");
            format!("multipart/x-mixed-replace;boundary={boundary}")
        }
        "image/jpeg" => "image/jpeg".into(),
        "video/quicktime" => "video/mp4".into(),
        "audio/x-wav" => "audio/wav".into(),
        "text/plain" | "text/x-raw" => "text/plain".into(),
        _ => "application/octet-stream".into(),
    }
}
