"""The suite keeps to its temporary folders: no cache it or its subprocesses use is the user's."""

import subprocess
import sys
import tempfile
from pathlib import Path

import huggingface_hub.constants as hf_constants

from ccld.io import hub, weights_cache
from conftest import LAUNCH_ENV, SESSION_CACHES


def inside_the_session(path) -> bool:
    return Path(path).resolve().is_relative_to(SESSION_CACHES.resolve())


def test_every_cache_of_this_process_is_the_sessions():
    assert SESSION_CACHES.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert inside_the_session(weights_cache.cache_root())
    assert inside_the_session(hub.cache_dir())
    assert inside_the_session(hf_constants.HF_HUB_CACHE)


def test_a_launched_process_inherits_the_sessions_caches():
    code = ("import huggingface_hub.constants as c; from ccld.io import hub, weights_cache; "
            "print(weights_cache.cache_root()); print(hub.cache_dir()); print(c.HF_HUB_CACHE)")
    run = subprocess.run([sys.executable, "-c", code], env=LAUNCH_ENV, capture_output=True,
                         text=True, check=True)
    paths = run.stdout.split()
    assert len(paths) == 3 and all(inside_the_session(p) for p in paths)
