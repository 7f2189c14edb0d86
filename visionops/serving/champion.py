"""The version being served, and the thread that follows the `champion` alias.

Every `poll_seconds` the alias is read; a version other than the one served is loaded
(`load_registered_version`, the one safe way), warmed and checked with a prediction, then
swapped in by replacing a single reference. A request reads that reference once, so it is
answered by one whole version, never a half-loaded one. A load that fails leaves the old
version serving and is tried again at the next poll. A deleted alias leaves the version
served serving too (logged once, counted as `alias_gone`)."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from visionops.core.config import Params
from visionops.core.pipeline import model_input, predict_pixels
from visionops.io.models import LoadedVersion, load_registered_version
from visionops.io.registry import CHAMPION, Registry

LOGGER = logging.getLogger("visionops.serving")
WARM_BATCHES = (1, 2)  # two batch sizes: Keras then traces once for any batch size
USERINFO = re.compile(r"(?<=://)[^/@\s]+@")  # user:password@ in a URL an error quotes


class LoadRefused(ValueError):
    """A registered version that loaded but cannot be served."""


@dataclass(frozen=True)
class Served:
    """One loaded version, as requests use it."""

    loaded: LoadedVersion
    model_name: str
    loaded_at: str
    size: int = field(init=False)
    channels: int = field(init=False)

    def __post_init__(self):
        size, channels = model_input(self.loaded.model)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "channels", channels)

    @property
    def version(self) -> str:
        return self.loaded.version

    @property
    def class_names(self) -> list[str]:
        return self.loaded.class_names

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities (N, classes) for uint8 pixels (N, size, size, channels)."""
        return predict_pixels(self.loaded.model, pixels, self.loaded.input_contract)

    def describe(self) -> dict:
        return {"model_name": self.model_name, "model_version": self.version,
                "data_version": self.loaded.data_version, "run_id": self.loaded.run_id,
                "loaded_at": self.loaded_at, "alias": CHAMPION}


def ready_to_serve(loaded: LoadedVersion, model_name: str) -> Served:
    """The loaded version, warmed up; LoadRefused if its outputs cannot be named."""
    if not loaded.class_names:
        raise LoadRefused(f"v{loaded.version} has no class_names tag: its outputs cannot be "
                          "named")
    served = Served(loaded, model_name, time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    for batch in WARM_BATCHES:
        outputs = served.predict(np.zeros((batch, served.size, served.size, served.channels),
                                          np.uint8))
        if outputs.shape != (batch, len(loaded.class_names)):
            raise LoadRefused(f"v{loaded.version} outputs shape {outputs.shape[1:]} for "
                              f"{len(loaded.class_names)} class names")
    return served


class ChampionFollower:
    """Holds the served version (`current`, None until the first load) and keeps it the
    champion's from a background thread."""

    def __init__(self, params: Params, on_load: Callable[[str, Served | None], None],
                 on_poll: Callable[[], None] = lambda: None):
        self.params = params
        self.poll_seconds = params.serving.poll_seconds
        self.on_load = on_load  # (outcome, served): counts and gauges
        self.on_poll = on_poll  # told each poll that read the alias, once it is done
        self.current: Served | None = None
        self._registry: Registry | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="champion-follower",
                                        daemon=True)
        self._last_problem = ""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)  # a load under way is left to end with the process

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _follow(self) -> None:
        import keras  # noqa: F401  the seconds of its import while no version is wanted yet

        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # a fault of its own: logged, and the next poll tries again
                LOGGER.exception("following the %s alias failed", CHAMPION)
            self._stop.wait(self.poll_seconds)

    def poll_once(self) -> None:
        """Read the alias; load and swap in its version if it is not the one served."""
        try:
            self._registry = self._registry or Registry(self.params)
            champion = self._registry.champion()
        except Exception as exc:  # the tracking server down or refusing: try again later
            self._report("alias_unreadable", f"could not read the {CHAMPION} alias: {exc}")
            return
        if champion is None and self.current is None:
            self._report(None, f"{self.params.registry.model_name} has no {CHAMPION} yet; "
                               "waiting", level=logging.INFO)
        elif champion is None:
            self._report("alias_gone", f"the {CHAMPION} alias is gone; still serving "
                                       f"v{self.current.version}")
        elif self.current is not None and self.current.version == str(champion.version):
            self._last_problem = ""
        else:
            self._load(str(champion.version), champion.name)
        self.on_poll()

    def _load(self, version: str, model_name: str) -> None:
        try:
            served = ready_to_serve(load_registered_version(self.params, version), model_name)
        except Exception as exc:  # unsafe files, a network fault, a model that cannot serve
            serving = f"v{self.current.version}" if self.current else "nothing"
            self._report("failed", f"v{version} not loaded, still serving {serving}: {exc}")
            return
        previous, self.current = self.current, served  # the swap: one reference
        self._last_problem = ""
        self.on_load("loaded", served)
        LOGGER.info("now serving %s v%s (data %s)%s", served.model_name, version,
                    served.loaded.data_version or "untagged",
                    f", was v{previous.version}" if previous else "")

    def _report(self, outcome: str | None, message: str, level: int = logging.WARNING
                ) -> None:
        if outcome:
            self.on_load(outcome, None)
        if message != self._last_problem:  # once per problem, not once per poll
            LOGGER.log(level, USERINFO.sub("***@", message))
            self._last_problem = message
