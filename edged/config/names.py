"""Names the fleet channel puts into MQTT topics (device ids, group names, the topic prefix):
one topic level each, never a wildcard or a separator, and nothing a file name could misread.
The config validates them at load; ``edged.transport.topics`` builds topics from them."""

from __future__ import annotations

import re

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,63}){0,3}$")
