//! `rsmultifdsink`: sends one stream to many file descriptors, a drop-in for
//! GStreamer's `multifdsink` with the same properties, signals and behaviour.

use gst::glib;
use gst::prelude::*;

use crate::engine;

pub(crate) mod imp;

glib::wrapper! {
    pub struct RsMultiFdSink(ObjectSubclass<imp::RsMultiFdSink>)
        @extends gst_base::BaseSink, gst::Element, gst::Object;
}

pub use imp::RsMultiFdSinkImpl;

/// How new clients join the stream (`GstMultiHandleSinkSyncMethod` values and nicks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, glib::Enum, Default)]
#[repr(i32)]
#[enum_type(name = "GstRsMultiHandleSinkSyncMethod")]
pub enum SyncMethod {
    #[default]
    #[enum_value(name = "Serve starting from the latest buffer", nick = "latest")]
    Latest = 0,
    #[enum_value(name = "Serve starting from the next keyframe", nick = "next-keyframe")]
    NextKeyframe = 1,
    #[enum_value(
        name = "Serve everything since the latest keyframe (burst)",
        nick = "latest-keyframe"
    )]
    LatestKeyframe = 2,
    #[enum_value(name = "Serve burst-value data to client", nick = "burst")]
    Burst = 3,
    #[enum_value(
        name = "Serve burst-value data starting on a keyframe",
        nick = "burst-keyframe"
    )]
    BurstKeyframe = 4,
    #[enum_value(
        name = "Serve burst-value data preferably starting on a keyframe",
        nick = "burst-with-keyframe"
    )]
    BurstWithKeyframe = 5,
}

/// What happens to a client over the soft limit (`GstMultiHandleSinkRecoverPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, glib::Enum, Default)]
#[repr(i32)]
#[enum_type(name = "GstRsMultiHandleSinkRecoverPolicy")]
pub enum RecoverPolicy {
    #[default]
    #[enum_value(name = "Do not try to recover", nick = "none")]
    None = 0,
    #[enum_value(name = "Resync client to latest buffer", nick = "latest")]
    Latest = 1,
    #[enum_value(name = "Resync client to soft limit", nick = "soft-limit")]
    SoftLimit = 2,
    #[enum_value(name = "Resync client to most recent keyframe", nick = "keyframe")]
    Keyframe = 3,
}

/// Why a client was removed (`GstMultiHandleSinkClientStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, glib::Enum)]
#[repr(i32)]
#[enum_type(name = "GstRsMultiHandleSinkClientStatus")]
pub enum ClientStatus {
    #[enum_value(name = "ok", nick = "ok")]
    Ok = 0,
    #[enum_value(name = "Closed", nick = "closed")]
    Closed = 1,
    #[enum_value(name = "Removed", nick = "removed")]
    Removed = 2,
    #[enum_value(name = "Too slow", nick = "slow")]
    Slow = 3,
    #[enum_value(name = "Error", nick = "error")]
    Error = 4,
    #[enum_value(name = "Duplicate", nick = "duplicate")]
    Duplicate = 5,
    #[enum_value(name = "Flushing", nick = "flushing")]
    Flushing = 6,
}

impl From<SyncMethod> for engine::SyncMethod {
    fn from(m: SyncMethod) -> Self {
        match m {
            SyncMethod::Latest => engine::SyncMethod::Latest,
            SyncMethod::NextKeyframe => engine::SyncMethod::NextKeyframe,
            SyncMethod::LatestKeyframe => engine::SyncMethod::LatestKeyframe,
            SyncMethod::Burst => engine::SyncMethod::Burst,
            SyncMethod::BurstKeyframe => engine::SyncMethod::BurstKeyframe,
            SyncMethod::BurstWithKeyframe => engine::SyncMethod::BurstWithKeyframe,
        }
    }
}

impl From<RecoverPolicy> for engine::RecoverPolicy {
    fn from(p: RecoverPolicy) -> Self {
        match p {
            RecoverPolicy::None => engine::RecoverPolicy::None,
            RecoverPolicy::Latest => engine::RecoverPolicy::Latest,
            RecoverPolicy::SoftLimit => engine::RecoverPolicy::SoftLimit,
            RecoverPolicy::Keyframe => engine::RecoverPolicy::Keyframe,
        }
    }
}

impl From<engine::ClientStatus> for ClientStatus {
    fn from(s: engine::ClientStatus) -> Self {
        match s {
            engine::ClientStatus::Ok => ClientStatus::Ok,
            engine::ClientStatus::Closed => ClientStatus::Closed,
            engine::ClientStatus::Removed => ClientStatus::Removed,
            engine::ClientStatus::Slow => ClientStatus::Slow,
            engine::ClientStatus::Error => ClientStatus::Error,
            engine::ClientStatus::Duplicate => ClientStatus::Duplicate,
            engine::ClientStatus::Flushing => ClientStatus::Flushing,
        }
    }
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "rsmultifdsink",
        gst::Rank::NONE,
        RsMultiFdSink::static_type(),
    )
}
