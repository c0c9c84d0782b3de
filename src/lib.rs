// SPDX-License-Identifier: MPL-2.0

//! Fan-out sinks for GStreamer: `rsmultifdsink`, a drop-in `multifdsink`;
//! `rsmultisocketsink`, a drop-in `multisocketsink`; `rstcpserversink`.

pub mod access_log;
pub mod engine;
pub mod gdp;
pub mod http;
mod hub;
pub mod jwt;
pub mod metrics;
pub mod multifdsink;
pub mod multihandlesink;
pub mod multisocketsink;
pub mod proxy_protocol;
mod server;
pub mod tcpserversink;
pub mod tls;

fn plugin_init(plugin: &gst::Plugin) -> Result<(), gst::glib::BoolError> {
    multifdsink::register(plugin)?;
    tcpserversink::register(plugin)?;
    multisocketsink::register(plugin)?;
    Ok(())
}

gst::plugin_define!(
    rsmultifdsink,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    env!("CARGO_PKG_VERSION"),
    "MPL",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    "https://gstreamer.freedesktop.org",
    "2026-11-25"
);
