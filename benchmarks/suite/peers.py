"""The peers' environment: momentumnet, revlib and memcnn from PyPI, apart from the main one.

``ensure(path)`` creates a virtual environment at ``path`` (once), makes the main environment's
packages visible in it read-only (a ``.pth`` file naming the main ``site-packages``: torch and
revnets are the same, nothing is installed into the main environment), and installs each peer with
``pip install --no-deps`` (their declared dependencies — torchvision, vit-pytorch, SimpleITK — are
not needed by the parts used here). Each peer is then imported in that environment; the outcome of
every step is returned (and reported), a failure with its error.
"""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

from .contenders import PEERS


def _run(command: list[str], timeout: float) -> tuple[bool, str]:
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, f"{type(error).__name__}: {error}"
    output = (done.stdout + done.stderr).strip()
    return done.returncode == 0, output[-600:]


def ensure(path: Path, log=print) -> tuple[str | None, dict]:
    """(the environment's interpreter or None, ``{step or peer: outcome}``)."""
    python = path / "bin" / "python"
    status: dict = {"path": str(path)}
    if not python.exists():
        log(f"creating the peers' environment at {path} ...")
        ok, out = _run([sys.executable, "-m", "venv", str(path)], 300)
        if not ok:
            status["venv"] = f"failed: {out}"
            return None, status
    ok, target = _run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], 60)
    if not ok:
        status["venv"] = f"failed: {target}"
        return None, status
    main_site = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(target.splitlines()[-1]) / "_revnets_main_env.pth").write_text("\n".join(main_site) + "\n")
    for peer in PEERS:
        ok, out = _run([str(python), "-c", f"import {peer}"], 300)
        if not ok:
            log(f"  pip install --no-deps {peer} ...")
            ok, out = _run([str(python), "-m", "pip", "install", "--no-deps", "-q", peer], 600)
            if ok:
                ok, out = _run([str(python), "-c", f"import {peer}"], 300)
        status[peer] = "ok" if ok else f"failed: {out}"
    usable = any(status[p] == "ok" for p in PEERS)
    return (str(python) if usable else None), status
