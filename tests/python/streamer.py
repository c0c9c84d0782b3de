#!/usr/bin/env python3
"""A Flumotion-style streamer in Python (PyGObject) driving rsmultifdsink.

It writes its own response headers on each socket, hands the fd over with
``add``, reads ``get-stats`` in ``client-removed`` and closes the fd in
``client-fd-removed``. Exits non-zero if anything is off. Needs the plugin on
GST_PLUGIN_PATH.
"""
import socket
import sys
import time

import gi

gi.require_version("Gst", "1.0")
from gi.repository import Gst  # noqa: E402

Gst.init(None)
factory = sys.argv[1] if len(sys.argv) > 1 else "rsmultifdsink"
pipeline = Gst.parse_launch(
    "videotestsrc is-live=true num-buffers=20 ! video/x-raw,width=64,height=48,framerate=60/1 ! jpegenc ! "
    f"{factory} name=sink sync=false"
)
sink = pipeline.get_by_name("sink")
events, stats, owned = [], {}, {}


def on_removed(element, fd, status):
    s = element.emit("get-stats", fd)
    stats[fd] = (status.value_nick, s.get_value("bytes-sent"))
    events.append(("removed", fd))


def on_fd_removed(element, fd):
    owned.pop(fd).close()  # the app closes its own socket
    events.append(("fd-removed", fd))


sink.connect("client-added", lambda element, fd: events.append(("added", fd)))
sink.connect("client-removed", on_removed)
sink.connect("client-fd-removed", on_fd_removed)

pipeline.set_state(Gst.State.READY)
viewer, ours = socket.socketpair()
ours.setblocking(False)
HEADERS = b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\n\r\n"
ours.send(HEADERS)
owned[ours.fileno()] = ours
fd = ours.fileno()
sink.emit("add", fd)
assert events == [("added", fd)], events

pipeline.set_state(Gst.State.PLAYING)
msg = pipeline.get_bus().timed_pop_filtered(
    30 * Gst.SECOND, Gst.MessageType.EOS | Gst.MessageType.ERROR
)
assert msg and msg.type == Gst.MessageType.EOS, msg
# The IO thread writes after render returned: wait until the client got data, and
# with rsmultifdsink (which places a client added before PLAYING on the first
# buffer) until it got everything. The C element places it when its thread gets
# to it, so it may start later.
want_all = factory == "rsmultifdsink"
deadline = time.monotonic() + 10
while True:
    served = sink.get_property("bytes-served")
    if served > 0 and (not want_all or served == sink.get_property("bytes-to-serve")):
        break
    assert time.monotonic() < deadline, "the sink did not send the stream"
    time.sleep(0.01)
sink.emit("remove", fd)  # synchronous: both signals have fired
assert events == [("added", fd), ("removed", fd), ("fd-removed", fd)], events
status, sent = stats[fd]
assert status == "removed" and sent >= served, (status, sent, served)
pipeline.set_state(Gst.State.NULL)

viewer.settimeout(5)
data = b""
while True:
    chunk = viewer.recv(65536)
    if not chunk:
        break
    data += chunk
assert data.startswith(HEADERS + b"\xff\xd8"), data[:64]
assert len(data) == len(HEADERS) + sent, (len(data), sent)
print(f"ok: {sent} bytes of JPEG after the app's headers, signals {events}")
