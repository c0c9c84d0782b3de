//! An edge of an origin → edges tree (issue 12): reads the origin's GDP feed
//! (`tcpclientsrc ! gdpdepay`) and serves it over HTTP with `rstcpserversink`.
//!
//! The serving half (`appsrc ! rstcpserversink`) stays PLAYING, with its listening
//! socket, for the life of the program; the feed half (`tcpclientsrc ! gdpdepay !
//! appsink`) is a pipeline of its own, torn down and made again whenever the
//! origin goes away, with capped exponential backoff. Viewers connected through a
//! gap continue when the new feed's streamheader is the old one (or the format has
//! none, as MPEG-TS); otherwise they are closed (the sink's `clear`), as they are
//! when no data came from the origin for `--max-gap` seconds: none is left on a
//! silent connection. Every step is printed on stdout, one line each.
//!
//! ```text
//! cargo run --release --example edge -- --origin-host 10.0.0.1 --origin-port 4953 --port 8080
//! ```

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use gst::prelude::*;

#[derive(Parser, Debug)]
#[command(about = "Serve an origin's GDP feed over HTTP, surviving origin restarts")]
struct Args {
    /// The origin's feed host (its `gdppay ! rstcpserversink`).
    #[arg(long, default_value = "127.0.0.1")]
    origin_host: String,
    /// The origin's feed port.
    #[arg(long, default_value_t = 4953)]
    origin_port: u16,
    /// Address the viewers connect to (`::` for all IPv4 and IPv6 addresses).
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    /// Port the viewers connect to (0: a free one, printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The only HTTP path served (others get 404); all paths when not given.
    #[arg(long)]
    mount: Option<String>,
    /// Where a new viewer starts (`rstcpserversink`'s `sync-method`). Streams that
    /// flag no keyframes (audio-only MPEG-TS from mpegtsmux marks every buffer a
    /// delta unit) need `latest`: with a keyframe method nobody would start.
    #[arg(long, default_value = "latest-keyframe")]
    sync_method: String,
    /// Close the viewers when no data came from the origin for this many seconds.
    #[arg(long, default_value_t = 10.0)]
    max_gap: f64,
    /// First wait before reconnecting, in seconds; doubled after each failed try.
    #[arg(long, default_value_t = 0.1)]
    backoff_initial: f64,
    /// Longest wait between tries, in seconds.
    #[arg(long, default_value_t = 2.0)]
    backoff_max: f64,
    /// A feed connection (or connection attempt) silent this many seconds is given
    /// up and made again.
    #[arg(long, default_value_t = 3)]
    feed_timeout: u32,
    /// Answer health checks on this port (e.g. HAProxy's `option httpchk`): `200`
    /// while the feed delivers, `503` while it does not.
    #[arg(long)]
    health_port: Option<u16>,
    /// Any other `rstcpserversink` property, as NAME=VALUE (repeatable), e.g.
    /// `--sink-property max-clients=500`.
    #[arg(long = "sink-property", value_name = "NAME=VALUE")]
    sink_properties: Vec<String>,
}

/// What the feed's streaming thread, the watchdog and the main loop share.
struct Edge {
    args: Args,
    appsrc: gst::Element,
    sink: gst::Element,
    /// When the last buffer came from the origin (or the program started).
    last_data: Mutex<Instant>,
    /// The caps now on `appsrc`: the current feed's.
    caps: Mutex<Option<gst::Caps>>,
    /// The next caps are the first of a new feed connection.
    new_connection: AtomicBool,
    /// This feed connection has delivered data.
    feed_up: AtomicBool,
    /// A feed connection is running (from connecting until it is lost).
    connected: AtomicBool,
    /// The viewers' fds, from the sink's client-added / client-removed.
    viewers: Mutex<HashSet<i32>>,
}

/// The caps' streamheader, as bytes (`None` when the format has none).
fn streamheader(caps: &gst::Caps) -> Option<Vec<Vec<u8>>> {
    let array = caps.structure(0)?.get::<gst::Array>("streamheader").ok()?;
    array
        .iter()
        .map(|v| {
            let buffer = v.get::<gst::Buffer>().ok()?;
            let map = buffer.map_readable().ok()?;
            Some(map.to_vec())
        })
        .collect()
}

impl Edge {
    fn viewers(&self) -> u32 {
        self.sink.property::<u32>("num-handles")
    }

    /// A sample from the feed: the first caps of a new connection decide whether
    /// the viewers continue; then the buffer goes to the serving half.
    fn on_sample(&self, sample: gst::Sample) -> gst::FlowReturn {
        let Some(buffer) = sample.buffer_owned() else {
            return gst::FlowReturn::Ok;
        };
        // Before the feed counts as up: a health check must see fresh data then.
        *self.last_data.lock().unwrap() = Instant::now();
        if !self.feed_up.swap(true, Ordering::SeqCst) {
            println!(
                "edge: feed up: receiving from {}:{}",
                self.args.origin_host, self.args.origin_port
            );
        }
        if let Some(caps) = sample.caps_owned() {
            let mut current = self.caps.lock().unwrap();
            if self.new_connection.swap(false, Ordering::SeqCst)
                && let Some(old) = current.as_ref()
            {
                if streamheader(old) == streamheader(&caps) {
                    println!(
                        "edge: the new feed has the same streamheader: {} viewers continue",
                        self.viewers()
                    );
                } else {
                    // Before the new caps reach the sink.
                    self.close_started_viewers();
                }
            }
            if current.as_ref() != Some(&caps) {
                self.appsrc.set_property("caps", &caps);
                *current = Some(caps);
            }
        }
        self.appsrc
            .emit_by_name::<gst::FlowReturn>("push-buffer", &[&buffer])
    }

    /// The viewers who got the old streamheader are closed (nobody gets a second
    /// header); those who got nothing yet (they connected in the gap and are
    /// placed when a buffer comes) stay and start on the new stream.
    fn close_started_viewers(&self) {
        let fds: Vec<i32> = self.viewers.lock().unwrap().iter().copied().collect();
        let (mut closed, mut waiting) = (0, 0);
        for fd in fds {
            let stats = self
                .sink
                .emit_by_name::<gst::Structure>("get-stats", &[&fd]);
            if stats.get::<u64>("bytes-sent").unwrap_or(0) > 0 {
                self.sink.emit_by_name::<()>("remove", &[&fd]);
                closed += 1;
            } else {
                waiting += 1;
            }
        }
        println!(
            "edge: the new feed has another streamheader: closing {closed} viewers, {waiting} waiting start on it"
        );
    }

    /// Closes the viewers once the origin has been silent past `--max-gap` (and
    /// any viewer who connects while it stays silent).
    fn watchdog(&self) {
        let max_gap = Duration::from_secs_f64(self.args.max_gap);
        loop {
            std::thread::sleep(Duration::from_millis(100));
            // Held until the clear is done: data arriving meanwhile waits, so a
            // viewer who connects once the feed is back is never closed for a gap
            // that just ended.
            let last_data = self.last_data.lock().unwrap();
            let gap = last_data.elapsed();
            if gap < max_gap {
                continue;
            }
            let viewers = self.viewers();
            if viewers > 0 {
                println!(
                    "edge: no data from the origin for {:.1} s: closing {viewers} viewers",
                    gap.as_secs_f64()
                );
                self.sink.emit_by_name::<()>("clear", &[]);
            }
        }
    }

    /// Whether viewers get a live stream: a feed connection that delivered data
    /// within `--feed-timeout`.
    fn healthy(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
            && self.feed_up.load(Ordering::SeqCst)
            && self.last_data.lock().unwrap().elapsed()
                < Duration::from_secs(self.args.feed_timeout.into())
    }

    /// Answers each connection to `listener` with `200` (feed up) or `503`, then
    /// closes it: what a load balancer's health check needs.
    fn serve_health(&self, listener: std::net::TcpListener) {
        use std::io::{Read, Write};
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            // The request (if any) does not matter; read a little so that closing
            // does not reset the connection under the answer.
            let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
            let mut request = [0u8; 1024];
            let _ = conn.read(&mut request);
            let answer = if self.healthy() {
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nfeed up\n"
            } else {
                "HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\nfeed down\n"
            };
            let _ = conn.write_all(answer.as_bytes());
        }
    }

    /// One feed connection, from connecting to losing it; returns why it ended.
    fn run_feed(self: &Arc<Self>, serving: &gst::Pipeline) -> String {
        self.new_connection.store(true, Ordering::SeqCst);
        self.feed_up.store(false, Ordering::SeqCst);
        self.connected.store(true, Ordering::SeqCst);
        let pipeline = match self.feed_pipeline() {
            Ok(p) => p,
            Err(e) => return format!("cannot make the feed pipeline: {e}"),
        };
        let bus = pipeline.bus().unwrap();
        let reason = if pipeline.set_state(gst::State::Playing).is_err() {
            bus.pop_filtered(&[gst::MessageType::Error])
                .map_or_else(|| "cannot start".into(), |m| describe(&m))
        } else {
            loop {
                check_serving(serving);
                if let Some(msg) = bus.timed_pop_filtered(
                    gst::ClockTime::from_mseconds(100),
                    &[gst::MessageType::Eos, gst::MessageType::Error],
                ) {
                    break describe(&msg);
                }
            }
        };
        self.connected.store(false, Ordering::SeqCst);
        let _ = pipeline.set_state(gst::State::Null);
        reason
    }

    /// `tcpclientsrc ! gdpdepay ! appsink`, handing each sample to `on_sample`.
    fn feed_pipeline(self: &Arc<Self>) -> Result<gst::Pipeline, gst::glib::BoolError> {
        let src = gst::ElementFactory::make("tcpclientsrc")
            .property("host", self.args.origin_host.as_str())
            .property("port", i32::from(self.args.origin_port))
            .property("timeout", self.args.feed_timeout)
            .build()?;
        let depay = gst::ElementFactory::make("gdpdepay").build()?;
        let out = gst::ElementFactory::make("appsink")
            .property("sync", false)
            .property("emit-signals", true)
            .build()?;
        let edge = Arc::downgrade(self);
        out.connect("new-sample", false, move |args| {
            let appsink = args[0].get::<gst::Element>().unwrap();
            let ret = match (
                edge.upgrade(),
                appsink.emit_by_name::<Option<gst::Sample>>("pull-sample", &[]),
            ) {
                (Some(edge), Some(sample)) => edge.on_sample(sample),
                _ => gst::FlowReturn::Eos,
            };
            Some(ret.to_value())
        });
        let pipeline = gst::Pipeline::with_name("feed");
        pipeline.add_many([&src, &depay, &out])?;
        gst::Element::link_many([&src, &depay, &out])?;
        Ok(pipeline)
    }
}

fn describe(msg: &gst::Message) -> String {
    match msg.view() {
        gst::MessageView::Eos(_) => "the origin closed the connection".into(),
        // One line: the debug text's last line says what failed.
        gst::MessageView::Error(e) => match e.debug() {
            Some(debug) => format!(
                "{} ({})",
                e.error(),
                debug.lines().last().unwrap_or_default().trim()
            ),
            None => e.error().to_string(),
        },
        _ => format!("{msg:?}"),
    }
}

/// An error of the serving half ends the program: a supervisor restarts it.
fn check_serving(serving: &gst::Pipeline) {
    if let Some(msg) = serving
        .bus()
        .unwrap()
        .pop_filtered(&[gst::MessageType::Error])
    {
        eprintln!("edge: the serving pipeline failed: {}", describe(&msg));
        std::process::exit(1);
    }
}

/// `appsrc ! rstcpserversink http=true sync=false sync-method=...` with the
/// options, listening before it returns.
fn serving_pipeline(args: &Args) -> Result<(gst::Pipeline, gst::Element, gst::Element), String> {
    let appsrc = gst::ElementFactory::make("appsrc")
        .property("is-live", true)
        .property("block", false)
        // Only to bound memory: the sink never holds the streaming thread long.
        .property("max-bytes", 64u64 << 20)
        .build()
        .map_err(|e| e.to_string())?;
    appsrc.set_property_from_str("format", "time");
    let sink = gst::ElementFactory::make("rstcpserversink")
        .property("http", true)
        .property("host", args.host.as_str())
        .property("port", i32::from(args.port))
        // The origin's timestamps are its own: send as the data comes.
        .property("sync", false)
        .build()
        .map_err(|e| e.to_string())?;
    if sink.find_property("sync-method").and_then(|p| {
        p.downcast_ref::<gst::glib::ParamSpecEnum>()
            .map(|e| e.enum_class().to_value_by_nick(&args.sync_method).is_some())
    }) != Some(true)
    {
        return Err(format!(
            "--sync-method {}: no such sync method",
            args.sync_method
        ));
    }
    sink.set_property_from_str("sync-method", &args.sync_method);
    if let Some(mount) = &args.mount {
        sink.set_property("mount", mount.as_str());
    }
    for prop in &args.sink_properties {
        let (name, value) = prop
            .split_once('=')
            .ok_or_else(|| format!("--sink-property {prop}: not NAME=VALUE"))?;
        if sink.find_property(name).is_none() {
            return Err(format!("rstcpserversink has no property {name}"));
        }
        sink.set_property_from_str(name, value);
    }
    let pipeline = gst::Pipeline::with_name("serving");
    pipeline
        .add_many([&appsrc, &sink])
        .map_err(|e| e.to_string())?;
    appsrc.link(&sink).map_err(|e| e.to_string())?;
    pipeline.set_state(gst::State::Playing).map_err(|_| {
        match pipeline
            .bus()
            .unwrap()
            .pop_filtered(&[gst::MessageType::Error])
        {
            Some(m) => describe(&m),
            None => "cannot start the serving pipeline".into(),
        }
    })?;
    Ok((pipeline, appsrc, sink))
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("edge: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    gst::init()?;
    gstrsmultifdsink::plugin_register_static()?;
    let (serving, appsrc, sink) = serving_pipeline(&args)?;
    println!(
        "edge: listening on {}:{}",
        args.host,
        sink.property::<i32>("current-port")
    );
    let initial = Duration::from_secs_f64(args.backoff_initial);
    let max = Duration::from_secs_f64(args.backoff_max).max(initial);
    let edge = Arc::new(Edge {
        args,
        appsrc,
        sink,
        last_data: Mutex::new(Instant::now()),
        caps: Mutex::new(None),
        new_connection: AtomicBool::new(true),
        feed_up: AtomicBool::new(false),
        connected: AtomicBool::new(false),
        viewers: Mutex::new(HashSet::new()),
    });
    let tracked = Arc::downgrade(&edge);
    edge.sink.connect("client-added", false, move |args| {
        if let (Some(edge), Ok(fd)) = (tracked.upgrade(), args[1].get::<i32>()) {
            edge.viewers.lock().unwrap().insert(fd);
        }
        None
    });
    let tracked = Arc::downgrade(&edge);
    edge.sink.connect("client-removed", false, move |args| {
        if let (Some(edge), Ok(fd)) = (tracked.upgrade(), args[1].get::<i32>()) {
            edge.viewers.lock().unwrap().remove(&fd);
        }
        None
    });
    if let Some(port) = edge.args.health_port {
        let listener = std::net::TcpListener::bind((edge.args.host.as_str(), port))?;
        println!(
            "edge: health checks on {}:{}",
            edge.args.host,
            listener.local_addr()?.port()
        );
        let health = edge.clone();
        std::thread::Builder::new()
            .name("edge-health".into())
            .spawn(move || health.serve_health(listener))?;
    }
    let watchdog = edge.clone();
    std::thread::Builder::new()
        .name("edge-watchdog".into())
        .spawn(move || watchdog.watchdog())?;

    let mut delay = initial;
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        println!(
            "edge: connecting to origin {}:{} (attempt {attempt})",
            edge.args.origin_host, edge.args.origin_port
        );
        let started = Instant::now();
        let reason = edge.run_feed(&serving);
        if edge.feed_up.load(Ordering::SeqCst) {
            // It worked for a while: the next outage starts its backoff afresh.
            delay = initial;
            attempt = 0;
        }
        println!(
            "edge: feed down after {:.1} s: {reason}; next attempt in {:.1} s",
            started.elapsed().as_secs_f64(),
            delay.as_secs_f64()
        );
        let wait_until = Instant::now() + delay;
        while Instant::now() < wait_until {
            check_serving(&serving);
            std::thread::sleep(
                Duration::from_millis(50).min(wait_until.saturating_duration_since(Instant::now())),
            );
        }
        if !edge.feed_up.load(Ordering::SeqCst) {
            delay = (delay * 2).min(max);
        }
    }
}
