#!/usr/bin/env python3
"""The streamer of a Flumotion-style pair, in Python (PyGObject).

Receives sockets from the porter (examples/porter.rs) over a UNIX socket with
SCM_RIGHTS, writes the HTTP response headers itself, hands each socket to
rsmultifdsink with add-full and a keyframe burst, prints each client's stats
when it leaves and closes the socket. Needs the plugin on GST_PLUGIN_PATH.

    GST_PLUGIN_PATH=target/debug python3 examples/streamer.py /tmp/streamer.sock [--exit-after N]
"""
import os
import socket
import struct
import sys
import threading

import gi

gi.require_version("Gst", "1.0")
from gi.repository import GLib, Gst  # noqa: E402

Gst.init(None)
path = sys.argv[1]
exit_after = int(sys.argv[sys.argv.index("--exit-after") + 1]) if "--exit-after" in sys.argv else None

pipeline = Gst.parse_launch(
    "videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=30/1 ! "
    "vp8enc deadline=1 keyframe-max-dist=15 ! webmmux streamable=true ! "
    "rsmultifdsink name=sink bytes-min=2000000 units-max=3000"
)
sink = pipeline.get_by_name("sink")
owned = {}
left = 0
loop = GLib.MainLoop()


def on_removed(element, fd, status):
    s = element.emit("get-stats", fd)
    print(
        f"client-removed fd={fd} status={status.value_nick} "
        f"bytes-sent={s.get_value('bytes-sent')} "
        f"connect-duration-ms={s.get_value('connect-duration') // 1000000}",
        flush=True,
    )


def on_fd_removed(element, fd):
    global left
    owned.pop(fd).close()  # the app owns the socket
    left += 1
    if exit_after is not None and left >= exit_after:
        GLib.idle_add(loop.quit)


sink.connect("client-removed", on_removed)
sink.connect("client-fd-removed", on_fd_removed)
pipeline.set_state(Gst.State.PLAYING)

if os.path.exists(path):
    os.unlink(path)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(1)
print(f"streamer: waiting for the porter on {path}", flush=True)

HEAD = b"HTTP/1.0 200 OK\r\nContent-Type: video/webm\r\nCache-Control: no-cache\r\n\r\n"
sync_burst_keyframe = 4  # GstRsMultiHandleSinkSyncMethod "burst-keyframe"


def serve_porter():
    porter, _ = server.accept()
    while True:
        msg, fds, _flags, _addr = socket.recv_fds(porter, 4 + 8192, 1)
        if not msg or not fds:
            return
        (length,) = struct.unpack(">I", msg[:4])
        request = msg[4 : 4 + length].decode("latin-1")
        conn = socket.socket(fileno=fds[0])
        conn.sendall(HEAD)  # our own response headers, before add
        conn.setblocking(False)
        owned[conn.fileno()] = conn
        path_requested = request.split()[1] if len(request.split()) > 1 else "/"
        print(f"client-added fd={conn.fileno()} path={path_requested}", flush=True)
        sink.emit(
            "add-full", conn.fileno(), sync_burst_keyframe,
            Gst.Format.BYTES, 200000, Gst.Format.BYTES, 1000000,
        )


threading.Thread(target=serve_porter, daemon=True).start()
loop.run()
pipeline.set_state(Gst.State.NULL)
os.unlink(path)
