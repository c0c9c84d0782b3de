#!/usr/bin/env python3
"""A PyGObject app handing Gio.Socket objects to rsmultisocketsink.

It wraps its end of a socket pair in a Gio.Socket, hands it over with ``add``,
reads ``get-stats`` in ``client-removed``, and uses the socket itself again after
``client-socket-removed``. Exits non-zero if anything is off. Needs the plugin on
GST_PLUGIN_PATH.
"""
import socket
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("Gio", "2.0")
from gi.repository import Gio, Gst  # noqa: E402

Gst.init(None)
factory = sys.argv[1] if len(sys.argv) > 1 else "rsmultisocketsink"
pipeline = Gst.parse_launch(f"appsrc name=src format=bytes ! {factory} name=sink sync=false")
src, sink = pipeline.get_by_name("src"), pipeline.get_by_name("sink")
events = []


def on_removed(element, sock, status):
    sent = element.emit("get-stats", sock).get_value("bytes-sent")
    events.append(("removed", sock, status.value_nick, sent))


sink.connect("client-added", lambda element, sock: events.append(("added", sock)))
sink.connect("client-removed", on_removed)
sink.connect("client-socket-removed", lambda element, sock: events.append(("socket-removed", sock)))

viewer, ours = socket.socketpair()
gsock = Gio.Socket.new_from_fd(ours.detach())
pipeline.set_state(Gst.State.PLAYING)
sink.emit("add", gsock)
assert events == [("added", gsock)], events
src.emit("push-buffer", Gst.Buffer.new_wrapped(b"stream bytes"))
viewer.settimeout(5)
data = b""
while len(data) < 12:
    data += viewer.recv(64)
assert data == b"stream bytes", data
sink.emit("remove", gsock)  # synchronous: both signals have fired
assert events[1:] == [("removed", gsock, "removed", 12), ("socket-removed", gsock)], events
pipeline.set_state(Gst.State.NULL)

# The socket is still the app's, open and working.
gsock.set_blocking(True)
assert gsock.send(b"after") == 5
assert viewer.recv(64) == b"after"
print(f"ok: {factory}, signals {[e[0] for e in events]}")
