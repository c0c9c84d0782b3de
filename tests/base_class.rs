//! The base class seen from outside the crate: a subclass written only against the
//! public API (`RsMultiHandleSinkImpl`, `RsMultiHandleSinkExt`) gets its virtual
//! methods called in the documented order, and the state-dependent properties
//! (`io-threads`, the server's `port`) change where their flags say they may.

mod common;

use std::sync::{Arc, Mutex};

use common::{buffer, init, pipe, raw, read_exact};
use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::subclass::prelude::*;
use gst_check::Harness;
use gstrsmultifdsink::engine::{ClientConfig, SyncMethod};
use gstrsmultifdsink::multihandlesink::{
    ClientStatus, RsMultiHandleSink, RsMultiHandleSinkExt, RsMultiHandleSinkImpl,
    RsMultiHandleSinkImplExt,
};

mod imp {
    use super::*;

    /// Records every virtual method call; `start_serving` fails when told to, and
    /// new clients start on the next keyframe whatever `sync-method` says.
    #[derive(Default)]
    pub struct RecordingSink {
        pub calls: Arc<Mutex<Vec<String>>>,
        pub refuse_start: Mutex<bool>,
    }

    impl RecordingSink {
        fn record(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }
    }

    #[glib::object_subclass]
    impl ObjectSubclass for RecordingSink {
        const NAME: &'static str = "TestRecordingSink";
        type Type = super::RecordingSink;
        type ParentType = RsMultiHandleSink;
    }

    impl ObjectImpl for RecordingSink {}
    impl GstObjectImpl for RecordingSink {}
    impl ElementImpl for RecordingSink {}
    impl BaseSinkImpl for RecordingSink {}

    impl RsMultiHandleSinkImpl for RecordingSink {
        fn client_added(&self, fd: i32) {
            self.record(format!("added {fd}"));
            self.parent_client_added(fd)
        }

        fn client_removed(&self, fd: i32, status: ClientStatus) {
            // The client's figures still answer here.
            let sent = self
                .obj()
                .client_stats(fd)
                .get::<u64>("bytes-sent")
                .unwrap();
            self.record(format!("removed {fd} {status:?} after {sent} bytes"));
            self.parent_client_removed(fd, status)
        }

        fn client_fd_removed(&self, fd: i32) {
            self.record(format!("fd removed {fd}"));
            self.parent_client_fd_removed(fd)
        }

        fn start_serving(&self) -> Result<(), gst::ErrorMessage> {
            self.record("start".into());
            if *self.refuse_start.lock().unwrap() {
                return Err(gst::error_msg!(
                    gst::ResourceError::OpenWrite,
                    ["refused by the test"]
                ));
            }
            self.parent_start_serving()
        }

        fn stop_serving(&self) {
            self.record("stop".into());
            self.parent_stop_serving()
        }

        fn default_placement(&self) -> ClientConfig {
            ClientConfig {
                sync: SyncMethod::NextKeyframe,
                ..self.parent_default_placement()
            }
        }
    }
}

glib::wrapper! {
    pub struct RecordingSink(ObjectSubclass<imp::RecordingSink>)
        @extends RsMultiHandleSink, gst_base::BaseSink, gst::Element, gst::Object;
}

fn recording_sink() -> (RecordingSink, Arc<Mutex<Vec<String>>>) {
    init();
    let sink = glib::Object::builder::<RecordingSink>()
        .property("sync", false)
        .build();
    let calls = sink.imp().calls.clone();
    (sink, calls)
}

#[test]
fn subclass_virtual_methods_run_in_order_with_its_own_placement() {
    let (sink, calls) = recording_sink();
    let mut h = Harness::with_element(&sink, Some("sink"), None);
    h.play();
    h.set_src_caps_str("application/x-test");
    let (rd, wr) = pipe();
    let fd = raw(&wr);
    // No placement given: the subclass's default_placement (next keyframe) applies,
    // although sync-method is `latest`.
    sink.add_client(fd, None);
    h.push(buffer(b"delta", true, false)).unwrap();
    h.push(buffer(b"KEY1", false, false)).unwrap();
    h.push(buffer(b"d2", true, false)).unwrap();
    assert_eq!(read_exact(&rd, 6), b"KEY1d2");
    sink.remove_client(fd);
    sink.set_state(gst::State::Null).unwrap();
    drop(h);
    assert_eq!(
        *calls.lock().unwrap(),
        vec![
            "start".to_string(),
            format!("added {fd}"),
            format!("removed {fd} Removed after 6 bytes"),
            format!("fd removed {fd}"),
            "stop".to_string(),
        ]
    );
}

#[test]
fn failing_start_serving_fails_the_state_change_with_its_message() {
    let (sink, calls) = recording_sink();
    *sink.imp().refuse_start.lock().unwrap() = true;
    let bus = gst::Bus::new();
    sink.set_bus(Some(&bus));
    assert!(sink.set_state(gst::State::Ready).is_err());
    let msg = bus
        .timed_pop_filtered(gst::ClockTime::from_seconds(5), &[gst::MessageType::Error])
        .expect("an error message");
    let gst::MessageView::Error(err) = msg.view() else {
        unreachable!()
    };
    assert!(err.error().matches(gst::ResourceError::OpenWrite));
    assert!(err.debug().unwrap().contains("refused by the test"));
    // The IO threads were stopped again: adding is refused as in NULL.
    sink.add_client(0, None);
    assert_eq!(sink.property::<u32>("num-handles"), 0);
    assert_eq!(*calls.lock().unwrap(), vec!["start".to_string()]);
}

#[test]
fn io_threads_change_in_ready_without_clients_but_not_with_them() {
    init();
    let sink = gst::ElementFactory::make("rsmultifdsink").build().unwrap();
    let pspec = sink.find_property("io-threads").unwrap();
    assert!(pspec.flags().contains(gst::PARAM_FLAG_MUTABLE_READY));
    sink.set_state(gst::State::Ready).unwrap();
    sink.set_property("io-threads", 3u32);
    assert_eq!(sink.property::<u32>("io-threads"), 3);
    // The new threads serve: a client added now gets its bytes.
    let (_rd, wr) = pipe();
    sink.emit_by_name::<()>("add", &[&raw(&wr)]);
    assert_eq!(sink.property::<u32>("num-handles"), 1);
    // With a client, the threads stay.
    sink.set_property("io-threads", 2u32);
    assert_eq!(sink.property::<u32>("io-threads"), 3);
    assert_eq!(sink.property::<u32>("num-handles"), 1);
    sink.set_state(gst::State::Null).unwrap();
}

#[test]
fn server_port_changes_in_ready_and_listens_again() {
    init();
    let sink = gst::ElementFactory::make("rstcpserversink")
        .property("host", "127.0.0.1")
        .property("port", 0)
        .build()
        .unwrap();
    assert!(
        sink.find_property("port")
            .unwrap()
            .flags()
            .contains(gst::PARAM_FLAG_MUTABLE_READY)
    );
    sink.set_state(gst::State::Ready).unwrap();
    let first = sink.property::<i32>("current-port");
    assert!(first > 0);
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let wanted = free.local_addr().unwrap().port();
    drop(free);
    sink.set_property("port", i32::from(wanted));
    assert_eq!(sink.property::<i32>("current-port"), i32::from(wanted));
    std::net::TcpStream::connect(("127.0.0.1", wanted)).expect("listening on the new port");
    assert!(std::net::TcpStream::connect(("127.0.0.1", first as u16)).is_err());
    sink.set_state(gst::State::Null).unwrap();
}

#[test]
fn add_in_null_warns_in_glibs_default_log_domain() {
    init();
    let warnings = Arc::new(Mutex::new(Vec::new()));
    let seen = warnings.clone();
    let handler = glib::log_set_handler(
        None,
        glib::LogLevels::LEVEL_WARNING,
        false,
        false,
        move |domain, _level, message| {
            seen.lock()
                .unwrap()
                .push((domain.map(str::to_owned), message.to_owned()));
        },
    );
    let sink = gst::ElementFactory::make("rsmultifdsink")
        .name("warns-in-null")
        .build()
        .unwrap();
    sink.emit_by_name::<()>("add", &[&1i32]);
    glib::log_remove_handler(None, handler);
    // Only this sink's: other tests of this file run meanwhile and may warn too.
    let mut warnings = warnings.lock().unwrap().clone();
    warnings.retain(|(_, message)| message.contains("warns-in-null"));
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].0, None);
    assert!(warnings[0].1.contains("READY, PAUSED or PLAYING"));
}
