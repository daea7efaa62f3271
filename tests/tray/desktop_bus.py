"""A desktop's D-Bus side, written for the tests with jeepney: a private session bus
(dbus-daemon), a StatusNotifierWatcher (what GNOME's AppIndicator extension and Plasma run), a
notification server, and a client that reads and clicks a StatusNotifierItem's menu the way a
panel does (com.canonical.dbusmenu)."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jeepney import (
    DBusAddress,
    HeaderFields,
    Message,
    MessageType,
    new_error,
    new_method_call,
    new_method_return,
)
from jeepney.bus_messages import Monitoring, message_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection

WATCHER = "org.kde.StatusNotifierWatcher"
NOTIFICATIONS = "org.freedesktop.Notifications"
ITEM = "org.kde.StatusNotifierItem"
PROPERTIES = "org.freedesktop.DBus.Properties"
DBUSMENU = "com.canonical.dbusmenu"

# No service directories: nothing is started on demand, the bus holds only what a test runs.
CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={dir}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@contextlib.contextmanager
def session_bus(folder: Path) -> Iterator[str]:
    """A private dbus-daemon; yields its address for DBUS_SESSION_BUS_ADDRESS."""
    config = folder / "session.conf"
    config.write_text(CONFIG.format(dir=folder))
    process = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork",
                                "--print-address=1"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    address = process.stdout.readline().strip()  # printed once it listens
    try:
        if not address:
            raise RuntimeError("dbus-daemon did not start")
        yield address
    finally:
        process.terminate()
        process.wait(timeout=10)


class CallMonitor:
    """Sees method calls on the bus as they pass (dbus-daemon's monitoring interface)."""

    def __init__(self, address: str, member: str) -> None:
        self.conn = open_dbus_connection(address)
        rule = f"type='method_call',member='{member}'"
        reply = self.conn.send_and_get_reply(Monitoring().BecomeMonitor([rule]), timeout=5)
        assert reply.header.message_type is MessageType.method_return, reply.body

    def wait(self, first_arg: str, timeout: float) -> None:
        """Return once a watched call with this first argument has passed."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no call with {first_arg!r} in {timeout} s")
            try:
                msg = self.conn.receive(timeout=left)
            except TimeoutError:
                continue
            if msg.body and msg.body[0] == first_arg:
                return

    def close(self) -> None:
        self.conn.close()


Handler = Callable[[Message], tuple[str | None, tuple[Any, ...]]]


class Service(threading.Thread):
    """Owns a well-known name and answers method calls on its own thread."""

    def __init__(self, address: str, name: str) -> None:
        super().__init__(name=f"dbus-{name}", daemon=True)
        self.conn: DBusConnection = open_dbus_connection(address)
        reply = self.conn.send_and_get_reply(message_bus.RequestName(name, 4), timeout=5)
        assert reply.body == (1,), f"could not own {name}: {reply.body}"
        self.lock = threading.Lock()
        self.methods: dict[tuple[str, str], Handler] = {}
        self.properties: dict[str, dict[str, tuple[str, Any]]] = {}
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                msg = self.conn.receive(timeout=0.1)
            except TimeoutError:
                continue
            if msg.header.message_type is MessageType.method_call:
                self.conn.send(self._answer(msg))

    def _answer(self, msg: Message) -> Message:
        fields = msg.header.fields
        interface, member = fields.get(HeaderFields.interface), fields.get(HeaderFields.member)
        if interface == PROPERTIES and member == "Get":
            props = self.properties.get(msg.body[0], {})
            if msg.body[1] in props:
                return new_method_return(msg, "v", (props[msg.body[1]],))
        elif interface == PROPERTIES and member == "GetAll":
            return new_method_return(msg, "a{sv}", (self.properties.get(msg.body[0], {}),))
        elif (interface, member) in self.methods:
            with self.lock:
                signature, body = self.methods[(interface, member)](msg)
            return new_method_return(msg, signature, body)
        return new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "s",
                         (f"{interface}.{member} is not served here",))

    def close(self) -> None:
        """Leave the bus (its names go with the connection); safe to call twice."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=5)
        self.conn.close()


@dataclass(frozen=True)
class Registration:
    bus_name: str  # the item's unique connection name
    path: str


class Watcher(Service):
    """org.kde.StatusNotifierWatcher with a host registered, as a panel provides it."""

    def __init__(self, address: str) -> None:
        super().__init__(address, WATCHER)
        self.items: list[Registration] = []
        self.methods[(WATCHER, "RegisterStatusNotifierItem")] = self._register
        self.methods[(WATCHER, "RegisterStatusNotifierHost")] = lambda msg: (None, ())
        self.properties[WATCHER] = {"IsStatusNotifierHostRegistered": ("b", True),
                                    "ProtocolVersion": ("i", 0),
                                    "RegisteredStatusNotifierItems": ("as", [])}

    def _register(self, msg: Message) -> tuple[None, tuple[()]]:
        service = msg.body[0]
        sender = msg.header.fields[HeaderFields.sender]
        # The spec allows a bus name or, as libayatana-appindicator sends, an object path.
        if service.startswith("/"):
            self.items.append(Registration(sender, service))
        else:
            self.items.append(Registration(service, "/StatusNotifierItem"))
        return None, ()


@dataclass(frozen=True)
class Notification:
    app_name: str
    summary: str
    body: str


class NotificationServer(Service):
    """org.freedesktop.Notifications that records every notification it is sent."""

    def __init__(self, address: str) -> None:
        super().__init__(address, NOTIFICATIONS)
        self.received: list[Notification] = []
        self.methods[(NOTIFICATIONS, "Notify")] = self._notify
        self.methods[(NOTIFICATIONS, "CloseNotification")] = lambda msg: (None, ())
        self.methods[(NOTIFICATIONS, "GetCapabilities")] = lambda msg: ("as", (["body"],))
        self.methods[(NOTIFICATIONS, "GetServerInformation")] = \
            lambda msg: ("ssss", ("tests", "qwen-appliance", "1", "1.2"))

    def _notify(self, msg: Message) -> tuple[str, tuple[int]]:
        app_name, _, _, summary, body = msg.body[:5]
        self.received.append(Notification(app_name, summary, body))
        return "u", (len(self.received),)

    def matching(self, text: str) -> list[Notification]:
        with self.lock:
            return [n for n in self.received if text in n.summary]


def display_label(label: str) -> str:
    """A dbusmenu label as shown: "__" is one underscore, other underscores mark access keys."""
    return "_".join(part.replace("_", "") for part in label.split("__"))


@dataclass
class MenuNode:
    id: int
    props: dict[str, Any]
    children: list[MenuNode] = field(default_factory=list)
    path: tuple[str, ...] = ()  # the labels from the root down to this item

    @property
    def label(self) -> str:
        return display_label(self.props.get("label", ""))

    @property
    def enabled(self) -> bool:
        return self.props.get("enabled", True)

    @property
    def ticked(self) -> bool:
        return self.props.get("toggle-state", 0) == 1

    def find(self, label: str) -> MenuNode:
        """The first item, at any depth, whose label starts with `label`."""
        for child in self.children:
            if child.label.startswith(label):
                return child
            with contextlib.suppress(KeyError):
                return child.find(label)
        raise KeyError(f"no menu item {label!r} in {self.labels()}")

    def labels(self) -> list[str]:
        return [c.label for c in self.children if c.props.get("type") != "separator"]

    def at(self, path: tuple[str, ...]) -> MenuNode | None:
        """The item at exactly this label path, if the menu has it."""
        if not path:
            return self
        child = next((c for c in self.children if c.label == path[0]), None)
        return child and child.at(path[1:])


def _node(raw: tuple[int, dict[str, tuple[str, Any]], list[tuple[str, Any]]],
          parent: tuple[str, ...] = ()) -> MenuNode:
    item_id, raw_props, children = raw
    props = {k: v for k, (_, v) in raw_props.items()}
    path = (*parent, display_label(props.get("label", ""))) if item_id else ()
    return MenuNode(item_id, props, [_node(value, path) for _, value in children], path)


class StaleMenuItem(RuntimeError):
    """The item's id is gone: the menu was rebuilt after it was read."""


class Panel:
    """What a panel does with an item: read its properties, read its menu, click entries."""

    def __init__(self, address: str) -> None:
        self.conn = open_dbus_connection(address)

    def call(self, bus_name: str, path: str, interface: str, member: str,
             signature: str | None = None, body: tuple[Any, ...] = ()) -> tuple[Any, ...]:
        reply = self.conn.send_and_get_reply(
            new_method_call(DBusAddress(path, bus_name, interface), member, signature, body),
            timeout=5)
        if reply.header.message_type is MessageType.error:
            if "does not refer to a menu item" in str(reply.body):
                raise StaleMenuItem(f"{interface}.{member}: {reply.body}")
            raise RuntimeError(f"{interface}.{member}: {reply.body}")
        return reply.body

    def prop(self, item: Registration, name: str) -> Any:
        return self.call(item.bus_name, item.path, PROPERTIES, "Get", "ss", (ITEM, name))[0][1]

    def menu(self, item: Registration) -> MenuNode:
        path = self.prop(item, "Menu")
        _, layout = self.call(item.bus_name, path, DBUSMENU, "GetLayout", "iias", (0, -1, []))
        return _node(layout)

    def click(self, item: Registration, node: MenuNode, timeout: float = 10) -> float:
        """Send the click; returns the monotonic time it was sent.

        The tray may rebuild its menu (new ids) between our read and the click, as it does
        when its state changes. A panel re-reads the layout on LayoutUpdated, so a user clicks
        the rebuilt menu: likewise, a stale id is looked up again by its label path."""
        path = self.prop(item, "Menu")
        deadline = time.monotonic() + timeout
        while True:
            sent = time.monotonic()
            try:
                self.call(item.bus_name, path, DBUSMENU, "Event", "isvu",
                          (node.id, "clicked", ("i", 0), int(time.time())))
                return sent
            except StaleMenuItem:
                if time.monotonic() > deadline:
                    raise
            fresh = self.menu(item).at(node.path)
            if fresh is None:
                raise KeyError(f"the rebuilt menu has no item {node.path}")
            node = fresh

    def name_has_owner(self, name: str) -> bool:
        return self.conn.send_and_get_reply(message_bus.NameHasOwner(name), timeout=5).body[0]

    def close(self) -> None:
        self.conn.close()
