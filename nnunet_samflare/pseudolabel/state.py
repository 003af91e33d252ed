"""The state file of a pseudo-label run: which steps are finished, so that a killed run continues where it stopped.

``<work_dir>/state.json`` holds the settings the run was started with and, per finished step, when it finished,
how long it took and in which invocation (1 = the first start, 2 = the first re-run, ...). A step is recorded only
after everything it writes is in place, and the file is replaced atomically, so a kill at any moment leaves either
the old or the new state. Re-running with different settings is refused, except for the ones listed in
:data:`FREE_SETTINGS`, which do not change any result.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from nnunet_samflare.errors import InputError
from nnunet_samflare.io import write_json_atomic

STATE_FILE = "state.json"
STATE_FORMAT = "samflare-pseudolabel-state"
STATE_VERSION = 1
#: Settings a re-run may change: where and how fast things run, not what they compute.
FREE_SETTINGS = frozenset({"device", "num_parts", "keep_probabilities", "num_processes"})


class RunState:
    def __init__(self, work_dir: Path, data: dict[str, Any]):
        self.path = Path(work_dir) / STATE_FILE
        self.data = data

    @classmethod
    def peek(cls, work_dir: Path, settings: dict[str, Any]) -> RunState | None:
        """The existing state of ``work_dir`` (checked against ``settings``), or None; writes nothing."""
        path = Path(work_dir) / STATE_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            cause = " ".join(str(e).split())
            raise InputError(path, f"unreadable state file ({cause}); use a new work folder") from None
        if data.get("format") != STATE_FORMAT or data.get("version") != STATE_VERSION:
            raise InputError(path, "not a samflare pseudolabel state file")
        old = data.get("settings", {})
        keys = (set(old) | set(settings)) - FREE_SETTINGS
        changed = sorted(k for k in keys if old.get(k) != settings.get(k))
        if changed:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise InputError(
                path,
                f"this work folder was started with other settings ({details}); re-run with the "
                "same settings or use another work folder (-o)",
            )
        return cls(work_dir, data)

    @classmethod
    def open(cls, work_dir: Path, settings: dict[str, Any]) -> RunState:
        """Load (or start) the state of ``work_dir`` and count this invocation."""
        state = cls.peek(work_dir, settings)
        if state is None:
            state = cls(
                work_dir,
                {
                    "format": STATE_FORMAT,
                    "version": STATE_VERSION,
                    "settings": settings,
                    "invocations": [],
                    "steps": {},
                },
            )
        state.data["settings"] = settings
        state.data["invocations"].append({"started": _now()})
        state.save()
        return state

    @property
    def invocation(self) -> int:
        return len(self.data["invocations"])

    @property
    def steps(self) -> dict[str, dict[str, Any]]:
        return self.data["steps"]

    def done(self, step: str) -> bool:
        return step in self.steps

    def record(self, step: str, wall_s: float, **extra: Any) -> None:
        self.steps[step] = {"finished": _now(), "wall_s": round(wall_s, 3), "invocation": self.invocation, **extra}
        self.save()

    def save(self) -> None:
        write_json_atomic(self.data, self.path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
