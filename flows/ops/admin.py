"""The CLI's old door to the ops modules: the same names, re-exported from where they live
now (`server`, `provision`, `run_history`, `resume`, `health`). New code imports them from
`flows.ops`."""

from __future__ import annotations

from flows.ops.health import doctor as doctor
from flows.ops.provision import DEFAULT_HEARTBEAT_GRACE as DEFAULT_HEARTBEAT_GRACE
from flows.ops.provision import DEFAULT_POOL as DEFAULT_POOL
from flows.ops.provision import setup as setup
from flows.ops.resume import earlier_run as earlier_run
from flows.ops.resume import mark_crashed as mark_crashed
from flows.ops.run_history import format_history as format_history
from flows.ops.run_history import history as history
from flows.ops.run_history import history_rows as history_rows
from flows.ops.server import ApiUnreachable as ApiUnreachable
from flows.ops.server import api_target as api_target
from flows.ops.server import check_reachable as check_reachable
from flows.ops.server import start_temporary_server as start_temporary_server
